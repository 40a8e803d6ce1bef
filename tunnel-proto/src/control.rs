//! Messages on the `control` stream: heartbeats with health figures,
//! certificate renewal, and whatever later versions add.
//!
//! The device opens one stream to [`crate::Service::Control`] right after the
//! handshake and keeps it for the life of the tunnel. Each message is a
//! 4-byte big-endian length followed by that many bytes of JSON, an object
//! with a `"type"` field. Messages of a type this version does not know
//! decode as [`ControlMessage::Unknown`] and are ignored, so either side may
//! add types without a version bump (`docs/protocol.md`, "Control stream").
//!
//! This module owns the framing and the message shapes; it never does I/O.
//! [`ControlDecoder`] takes bytes in whatever pieces they arrive and yields
//! whole messages, holding at most one message's worth of bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Largest control message body, in bytes. A longer length prefix is a
/// protocol violation: the receiver resets the stream.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// One control message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Device → platform, every heartbeat interval.
    Heartbeat(Heartbeat),
    /// Device → platform: please sign this CSR (PEM) for my device id. The
    /// platform takes the identity from the tunnel's certificate, never from
    /// the CSR.
    RenewRequest { id: u64, csr: String },
    /// Platform → device: the renewed certificate (PEM), valid until
    /// `not_after` (seconds since the Unix epoch).
    RenewResponse {
        id: u64,
        certificate: String,
        not_after: u64,
    },
    /// Platform → device, after each handshake and on every change: whether
    /// instance protection mode is on. While it is, the device's flows are
    /// read-only in the editor for every role; changes arrive only as signed
    /// snapshots. The device keeps the last value across restarts.
    Protection { enabled: bool },
    /// Platform → device: renew the certificate now, inside the renewal
    /// window or not (an operator asked, for example after a copy of the
    /// device's identity was found). The device answers with a
    /// `RenewRequest` as it does when its certificate nears expiry.
    RenewNow,
    /// Platform → device, after each handshake when there are any: the
    /// grant key's rotations, oldest first (at most
    /// `tether_proto::grant::MAX_ROTATIONS`). The device follows them from
    /// the key it trusts, each step signed by the key before it.
    GrantKeys { rotations: Vec<KeyRotation> },
    /// Platform → device, after each handshake and whenever an operator
    /// pushes one: the snapshot version the device should run. A device
    /// that has it (or a newer one) ignores the notice; otherwise it pulls
    /// it on a `snapshot` stream (`docs/snapshots.md`).
    SnapshotAvailable { version: u64 },
    /// Platform → device: start, stop or restart the local Node-RED
    /// (`start`, `stop`, `restart`), for the person named in `by`.
    NodeRed { action: String, by: String },
    /// Platform → device: the device's maintenance window (`"22:00-06:00"`,
    /// the device's local time), or none; set by the person in `by`. Sent
    /// when it changes and after every tunnel start. A window in the
    /// device's own config wins over this one.
    MaintenanceWindow { window: Option<String>, by: String },
    /// Either direction: a request failed. `id` names the request.
    Error {
        id: Option<u64>,
        code: String,
        message: String,
    },
    /// A type this version does not know; ignore it.
    #[serde(other)]
    Unknown,
}

/// One step of the grant key's history: the platform's grant key `from`
/// (64 lowercase hex digits) hands over to `to`, signed by `from`'s private
/// key, so a device that trusts `from` can trust `to` without enrolling
/// again (`docs/protocol.md` §16.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotation {
    pub from: String,
    pub to: String,
    /// Unix seconds.
    pub at: u64,
    /// Ed25519 by `from` over `tether_proto::grant::ROTATION_CONTEXT` and `from`, `to` and
    /// `at` (decimal), each followed by `\n`; base64url without padding.
    pub signature: String,
}

/// Health figures a device reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Counts up from 1 per tunnel.
    pub seq: u64,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// The agent's version.
    pub agent_version: String,
    /// The tunnel's smoothed round-trip time, once measured.
    #[serde(default)]
    pub rtt_micros: Option<u64>,
    /// When the device certificate expires, seconds since the Unix epoch.
    #[serde(default)]
    pub cert_not_after: Option<u64>,
    /// Resident memory of the agent, bytes.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Streams open on the tunnel.
    #[serde(default)]
    pub streams: Option<u64>,
    /// The device's audit queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditHealth>,
    /// The device's snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotHealth>,
    /// The device's and its processes' figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Box<DeviceHealth>>,
}

/// A device's health figures, in a heartbeat. CPU percentages are of one
/// core (a busy 4-core device reads up to 400) over the time since the
/// previous heartbeat; sizes are bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceHealth {
    /// The whole device's CPU use, percent of one core.
    pub cpu_percent: f32,
    /// CPU cores.
    pub cpus: u32,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    pub memory_total: u64,
    pub memory_used: u64,
    /// The file system of the agent's state.
    pub disk_total: u64,
    pub disk_free: u64,
    /// Seconds since the device booted.
    pub uptime_secs: u64,
    /// The agent process.
    pub agent: ProcessHealth,
    /// The local Node-RED, when the agent launched it and it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_red: Option<ProcessHealth>,
}

/// One process's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessHealth {
    /// Percent of one core.
    pub cpu_percent: f32,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
}

/// Where a device's snapshots stand, in a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHealth {
    /// The version Node-RED runs, if any.
    pub current: Option<u64>,
    /// A verified version staged, waiting for the maintenance window or
    /// `tetherd snapshot apply-now`.
    #[serde(default)]
    pub staged: Option<u64>,
    /// The last outcome, for a person: `applied 7`, `rejected 8: ...`,
    /// `rolled back 9: ...`.
    #[serde(default)]
    pub outcome: Option<String>,
    /// The local Node-RED: `running`, `stopped`, `crash loop`...
    #[serde(default)]
    pub node_red: Option<String>,
}

/// The audit queue's figures in a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHealth {
    /// Records on the device not yet acknowledged.
    pub queued: u64,
    /// The store file's size, bytes.
    pub file_bytes: u64,
    /// The last sequence number recorded.
    pub last_seq: u64,
    /// Events replaced by drop markers, and lost from memory, since the
    /// store was made.
    pub dropped: u64,
    pub lost: u64,
    /// The store's error, such as a full disk; `None` while it writes.
    #[serde(default)]
    pub error: Option<String>,
}

/// Why a control message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control message of {len} bytes is larger than the {MAX_CONTROL_MESSAGE}-byte limit")]
    TooLarge { len: usize },
    #[error("control message is not valid JSON of a known shape: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes one message with its length prefix.
pub fn encode(message: &ControlMessage) -> Result<Bytes, ControlError> {
    let json = serde_json::to_vec(message)?;
    if json.len() > MAX_CONTROL_MESSAGE {
        return Err(ControlError::TooLarge { len: json.len() });
    }
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    Ok(out.freeze())
}

/// Reassembles messages from a byte stream.
#[derive(Debug, Default)]
pub struct ControlDecoder {
    buf: BytesMut,
}

impl ControlDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived. After an error the stream
    /// is out of step and must be abandoned.
    pub fn next_message(&mut self) -> Result<Option<ControlMessage>, ControlError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_CONTROL_MESSAGE {
            return Err(ControlError::TooLarge { len });
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        let body = self.buf.split_to(len);
        Ok(Some(serde_json::from_slice(&body)?))
    }

    /// Bytes held that do not yet make a whole message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renew() -> ControlMessage {
        ControlMessage::RenewRequest {
            id: 7,
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        }
    }

    #[test]
    fn messages_survive_any_split() {
        let messages = [
            renew(),
            ControlMessage::RenewNow,
            ControlMessage::Heartbeat(Heartbeat {
                seq: 1,
                uptime_secs: 5,
                agent_version: "0.1.0".into(),
                rtt_micros: Some(120),
                snapshot: Some(SnapshotHealth {
                    current: Some(3),
                    staged: None,
                    outcome: Some("applied 3".into()),
                    node_red: Some("running (pid 9)".into()),
                }),
                ..Heartbeat::default()
            }),
            ControlMessage::SnapshotAvailable { version: 4 },
            ControlMessage::NodeRed {
                action: "restart".into(),
                by: "olga".into(),
            },
            ControlMessage::MaintenanceWindow {
                window: Some("22:00-06:00".into()),
                by: "olga".into(),
            },
        ];
        let mut wire = Vec::new();
        for m in &messages {
            wire.extend_from_slice(&encode(m).unwrap());
        }
        for split in 0..wire.len() {
            let mut decoder = ControlDecoder::new();
            let mut got = Vec::new();
            for piece in [&wire[..split], &wire[split..]] {
                decoder.push(piece);
                while let Some(m) = decoder.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, messages, "split at {split}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn an_unknown_type_decodes_as_unknown() {
        let body = br#"{"type":"from_the_future","x":1}"#;
        let mut decoder = ControlDecoder::new();
        decoder.push(&(body.len() as u32).to_be_bytes());
        decoder.push(body);
        assert_eq!(
            decoder.next_message().unwrap(),
            Some(ControlMessage::Unknown)
        );
    }

    #[test]
    fn an_oversized_length_is_refused_before_buffering() {
        let mut decoder = ControlDecoder::new();
        decoder.push(&u32::MAX.to_be_bytes());
        let err = decoder.next_message().unwrap_err();
        assert!(matches!(err, ControlError::TooLarge { len } if len == u32::MAX as usize));
        assert!(decoder.buffered() <= 4);
    }

    #[test]
    fn malformed_json_is_an_error() {
        let mut decoder = ControlDecoder::new();
        decoder.push(&3u32.to_be_bytes());
        decoder.push(b"{x}");
        assert!(matches!(decoder.next_message(), Err(ControlError::Json(_))));
    }
}
