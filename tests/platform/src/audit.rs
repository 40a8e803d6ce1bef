//! The platform's side of the device audit trail (`docs/protocol.md` §17):
//! the `audit` stream a device opens, and the checked view of what was
//! stored (`tether-platform audit`, `GET /v1/admin/audit`, the `/audit`
//! page).
//!
//! This module owns the exchange and the verification. The device id
//! always comes from the tunnel (its certificate), never from a record: a
//! device can only add to its own trail. A batch is acknowledged only
//! after [`crate::store::Store::store_audit`] committed it. Verification
//! reads the whole stored chain of a device and reports every place it
//! does not hold (a gap no drop marker covers, an altered or removed
//! record, a record that arrived again with other bytes, a checkpoint that
//! does not match or does not verify): flagged, never hidden or repaired.
//! It never trusts a checkpoint's certificate beyond the platform's own
//! records: the certificate must be one the platform issued to this device.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tether_proto::ResetCode;
use tether_proto::audit::{self, ActorKind, Checkpoint, Frame, FrameDecoder, Problem, Record};
use tether_proto::tokio_io::TunnelStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::platform::{PlatformEvent, State};
use crate::store::{Store, StoreError, StoredCheckpoint};

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Most entries one query returns.
pub const MAX_ENTRIES: usize = 10_000;

/// Serves one device's audit stream until it ends.
pub async fn serve(state: Arc<State>, device_id: String, mut stream: TunnelStream) {
    let id = device_id.clone();
    let stored = match state.store.blocking(move |s| s.audit_last_seq(&id)).await {
        Ok(seq) => seq,
        Err(e) => {
            warn!(cause = %e, "cannot read the device's audit trail; refusing its audit stream");
            stream.reset(
                ResetCode::INTERNAL_ERROR,
                "the platform cannot read its audit store",
            );
            return;
        }
    };
    let mut out = BytesMut::new();
    let hello = Frame::Hello { stored };
    if hello.encode(&mut out).is_err() || stream.write_all(&out).await.is_err() {
        return;
    }
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut keys = KeyCache::default();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => return debug!("audit stream ended"),
            Ok(n) => n,
            Err(e) => return debug!(cause = %e, "audit stream failed"),
        };
        decoder.push(&buf[..n]);
        let mut records: Vec<(u64, Bytes)> = Vec::new();
        let mut checkpoints = Vec::new();
        loop {
            match decoder.next_frame() {
                Ok(Some(Frame::Record(body))) => match Record::parse(&body) {
                    Ok(record) => records.push((record.seq, body)),
                    Err(e) => return refuse(&mut stream, &format!("malformed audit record: {e}")),
                },
                Ok(Some(Frame::Checkpoint(c))) => {
                    let stored = keys.check(&state.store, &device_id, c).await;
                    checkpoints.push(stored);
                }
                Ok(Some(Frame::Hello { .. } | Frame::Ack { .. })) => {
                    return refuse(&mut stream, "a device sends records and checkpoints only");
                }
                Ok(None) => break,
                Err(e) => return refuse(&mut stream, &format!("malformed audit frame: {e}")),
            }
        }
        if records.is_empty() && checkpoints.is_empty() {
            continue;
        }
        let id = device_id.clone();
        let write = state
            .store
            .blocking(move |s| s.store_audit(&id, &records, &checkpoints))
            .await;
        let write = match write {
            Ok(w) => w,
            Err(e) => {
                warn!(cause = %e, "cannot store audit records; the device keeps them and sends them again");
                stream.reset(
                    ResetCode::INTERNAL_ERROR,
                    "the platform cannot store audit records",
                );
                return;
            }
        };
        if write.conflicts > 0 {
            warn!(
                conflicts = write.conflicts,
                "audit records arrived again with other contents than the stored ones; kept beside them and flagged"
            );
        }
        if write.highest == 0 {
            continue;
        }
        out.clear();
        let _ = Frame::Ack { seq: write.highest }.encode(&mut out);
        if stream.write_all(&out).await.is_err() {
            return;
        }
        state.emit(PlatformEvent::AuditStored {
            device_id: device_id.clone(),
            through: write.highest,
            stored: write.stored,
        });
    }
}

fn refuse(stream: &mut TunnelStream, why: &str) {
    warn!(cause = %why, "refusing the device's audit stream");
    stream.reset(ResetCode::REFUSED, why);
}

/// The public keys of the certificates checkpoints name, per stream.
#[derive(Default)]
struct KeyCache {
    /// Fingerprint -> raw public key; empty when the certificate was not
    /// issued to this device.
    keys: HashMap<String, Vec<u8>>,
}

impl KeyCache {
    /// Checks the checkpoint's certificate and signature; returns it as
    /// stored (with an empty key when either fails, so that the
    /// verification flags it).
    async fn check(
        &mut self,
        store: &Store,
        device_id: &str,
        c: Checkpoint,
    ) -> (u64, StoredCheckpoint) {
        let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&c.cert)
            .unwrap_or_default();
        let fingerprint = crate::keys::sha256_hex(&der);
        if !self.keys.contains_key(&fingerprint) && self.keys.len() < 16 {
            let fp = fingerprint.clone();
            let owner = store
                .blocking(move |s| s.device_by_fingerprint(&fp))
                .await
                .ok()
                .flatten();
            let key = match owner {
                Some(device) if device.id == device_id => public_key(&der).unwrap_or_default(),
                _ => Vec::new(),
            };
            self.keys.insert(fingerprint.clone(), key);
        }
        let key = self.keys.get(&fingerprint).cloned().unwrap_or_default();
        if key.is_empty() || !c.verify(device_id, &key) {
            warn!(
                seq = c.seq,
                "an audit checkpoint does not verify with a certificate issued to this device; stored and flagged"
            );
        }
        (
            c.seq,
            StoredCheckpoint {
                hash: c.hash,
                time: c.time,
                signature: c.signature,
                cert_fingerprint: fingerprint,
                public_key: crate::keys::hex(&key),
            },
        )
    }
}

fn public_key(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// How far a device's stored trail can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainState {
    /// Nothing stored yet.
    Empty,
    /// The chain holds and a valid checkpoint covers its last record.
    Verified,
    /// The chain holds; records after the last valid checkpoint are not
    /// signed yet (they are when the next batch's checkpoint arrives).
    Unsigned,
    /// Something does not hold: see the problems.
    Broken,
}

impl std::fmt::Display for ChainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChainState::Empty => "empty",
            ChainState::Verified => "verified",
            ChainState::Unsigned => "unsigned tail",
            ChainState::Broken => "BROKEN",
        })
    }
}

/// The verification of one device's stored trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub device_id: String,
    pub state: ChainState,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The highest record a valid checkpoint covers (0 for none).
    pub verified_through: u64,
    pub checkpoints: u64,
    /// Events the device reported dropped.
    pub dropped: u64,
    pub problems: Vec<Problem>,
}

/// Stored records by sequence number.
pub type Records = Vec<(u64, Vec<u8>)>;

/// Checks a device's stored records, checkpoints and conflicts. Returns the
/// verification and the records.
pub fn verify_device(
    store: &Store,
    device_id: &str,
) -> Result<(Verification, Records), StoreError> {
    let crate::store::StoredTrail {
        records,
        checkpoints,
        conflicts,
    } = store.audit_trail(device_id)?;
    let chain = audit::verify_chain(records.iter().map(|(s, b)| (*s, b.as_slice())));
    let mut problems = chain.problems;
    let by_seq: HashMap<u64, &[u8]> = records.iter().map(|(s, b)| (*s, b.as_slice())).collect();
    let mut verified_through = 0;
    for (seq, c) in &checkpoints {
        let mut problem = |what: &str| {
            problems.push(Problem {
                seq: *seq,
                what: what.to_owned(),
            })
        };
        let Some(body) = by_seq.get(seq) else {
            problem("a checkpoint names this record, and it is missing");
            continue;
        };
        if audit::to_hex(&audit::hash(body)) != c.hash {
            problem("the record differs from what the device signed");
            continue;
        }
        let key = hex_bytes(&c.public_key);
        let checkpoint = Checkpoint {
            seq: *seq,
            hash: c.hash.clone(),
            time: c.time,
            cert: String::new(),
            signature: c.signature.clone(),
        };
        if key.is_empty() || !checkpoint.verify(device_id, &key) {
            problem(
                "the checkpoint's signature does not verify with a certificate issued to this device",
            );
            continue;
        }
        verified_through = verified_through.max(*seq);
    }
    for (seq, _) in &conflicts {
        problems.push(Problem {
            seq: *seq,
            what: "this record arrived again with other contents than the stored ones".into(),
        });
    }
    problems.sort_by_key(|p| p.seq);
    let state = if !problems.is_empty() {
        ChainState::Broken
    } else if records.is_empty() {
        ChainState::Empty
    } else if Some(verified_through) == chain.last_seq {
        ChainState::Verified
    } else {
        ChainState::Unsigned
    };
    let verification = Verification {
        device_id: device_id.to_owned(),
        state,
        records: chain.records,
        first_seq: chain.first_seq,
        last_seq: chain.last_seq,
        verified_through,
        checkpoints: checkpoints.len() as u64,
        dropped: chain.dropped,
        problems,
    };
    Ok((verification, records))
}

fn hex_bytes(s: &str) -> Vec<u8> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Vec::new();
    }
    (0..s.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// What to show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// One device, or every device of one team (or, with neither, every
    /// device).
    pub device: Option<String>,
    pub team: Option<String>,
    /// Records from this sequence number on.
    #[serde(default)]
    pub since: u64,
    /// Only this event type.
    pub kind: Option<String>,
    /// Only this user's events.
    pub user: Option<String>,
    /// At most this many entries (newest kept), up to [`MAX_ENTRIES`].
    pub limit: Option<usize>,
}

/// One stored event as shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub device_id: String,
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time: u64,
    pub actor: ActorKind,
    pub user: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub details: serde_json::Value,
}

/// The answer to an [`AuditQuery`]: each device's verification, and the
/// matching entries, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub devices: Vec<Verification>,
    pub entries: Vec<AuditEntry>,
}

/// Runs a query against the store (blocking).
pub fn report(store: &Store, query: &AuditQuery) -> Result<AuditReport, StoreError> {
    let devices: Vec<String> = match &query.device {
        Some(id) => {
            store
                .device(id)?
                .ok_or_else(|| StoreError::NoDevice(id.clone()))?;
            vec![id.clone()]
        }
        None => store
            .devices()?
            .into_iter()
            .filter(|d| query.team.as_ref().is_none_or(|t| *t == d.team))
            .map(|d| d.id)
            .collect(),
    };
    let limit = query.limit.unwrap_or(MAX_ENTRIES).min(MAX_ENTRIES);
    let mut verifications = Vec::new();
    let mut entries = Vec::new();
    for id in devices {
        let (verification, records) = verify_device(store, &id)?;
        verifications.push(verification);
        for (seq, body) in records.into_iter().rev() {
            if seq < query.since {
                break;
            }
            let Ok(record) = Record::parse(&body) else {
                continue;
            };
            if query.kind.as_ref().is_some_and(|k| *k != record.kind)
                || query.user.is_some() && query.user != record.actor.name
            {
                continue;
            }
            entries.push(AuditEntry {
                device_id: id.clone(),
                seq,
                time: record.time,
                actor: record.actor.kind,
                user: record.actor.name,
                kind: record.kind,
                subject: record.subject,
                details: record.details,
            });
            if entries.len() >= limit * (verifications.len()) {
                break;
            }
        }
    }
    entries.sort_by(|a, b| b.time.cmp(&a.time).then(b.seq.cmp(&a.seq)));
    entries.truncate(limit);
    Ok(AuditReport {
        devices: verifications,
        entries,
    })
}
