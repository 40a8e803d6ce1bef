//! The service header carried by OPEN frames: which local service a stream is
//! for, and a little metadata about it.
//!
//! This module owns the header's byte layout and its validation. It never
//! decides whether a service is *allowed*: that is the application's call,
//! made when it accepts or resets the stream.

use bytes::{BufMut, Bytes};

use crate::frame::{FrameError, take_bytes, take_u8, take_u16};

/// Longest service name or metadata key, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most metadata entries one OPEN may carry.
pub const MAX_METADATA_ENTRIES: usize = 32;

/// The kinds this version knows; others decode as [`Service::Other`].
pub const KNOWN_KINDS: std::ops::RangeInclusive<u8> = 0x01..=0x06;

/// What a stream carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// Agent-to-platform control messages (heartbeats, renewal, notices).
    Control,
    /// The device's Node-RED editor, HTTP and its WebSocket.
    Editor,
    /// MQTT traffic between the local broker and the platform's.
    Mqtt,
    /// A raw TCP connection to an allow-listed local service, by name.
    Tcp(String),
    /// The device's audit trail: events shipped in order, acknowledged by
    /// the platform (`tether_proto::audit`, `docs/protocol.md` §17).
    Audit,
    /// A signed snapshot, pulled by the device after the platform's notice
    /// (`tether_proto::snapshot::pull`, `docs/snapshots.md`).
    Snapshot,
    /// A kind this version does not know. The receiver resets the stream
    /// with `UNKNOWN_SERVICE`; the connection continues.
    Other { kind: u8, name: String },
}

impl Service {
    /// True for the services whose DATA yields to the others' when both
    /// have something to send (`docs/protocol.md` §7, "Send order"): raw
    /// TCP and snapshot downloads, bulk by nature. The editor, control,
    /// MQTT and audit streams are interactive.
    pub fn is_bulk(&self) -> bool {
        matches!(self, Service::Tcp(_) | Service::Snapshot)
    }

    fn kind(&self) -> u8 {
        match self {
            Service::Control => 0x01,
            Service::Editor => 0x02,
            Service::Mqtt => 0x03,
            Service::Tcp(_) => 0x04,
            Service::Audit => 0x05,
            Service::Snapshot => 0x06,
            Service::Other { kind, .. } => *kind,
        }
    }

    fn name(&self) -> &str {
        match self {
            Service::Tcp(name) | Service::Other { name, .. } => name,
            _ => "",
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Service::Control => f.write_str("control"),
            Service::Editor => f.write_str("editor"),
            Service::Mqtt => f.write_str("mqtt"),
            Service::Tcp(name) => write!(f, "tcp:{name}"),
            Service::Audit => f.write_str("audit"),
            Service::Snapshot => f.write_str("snapshot"),
            Service::Other { kind, name } => write!(f, "unknown(0x{kind:02x}):{name}"),
        }
    }
}

/// Why a service header is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("a tcp service needs a name")]
    MissingName,
    #[error("service kind 0x{kind:02x} takes no name")]
    UnexpectedName { kind: u8 },
    #[error("service kind 0x{kind:02x} is a known kind: use its own variant")]
    KnownKindAsOther { kind: u8 },
    #[error("name or key {0:?} is not 1 to 64 characters of [A-Za-z0-9._-]")]
    InvalidToken(String),
    #[error("metadata has more than {MAX_METADATA_ENTRIES} entries")]
    TooManyEntries,
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("metadata value for {0:?} is not valid UTF-8")]
    ValueNotUtf8(String),
    #[error("metadata value for {0:?} is longer than 65535 bytes")]
    ValueTooLong(String),
}

/// The payload of an OPEN frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHeader {
    pub service: Service,
    /// Small key/value pairs for the service (for example the user and role
    /// an editor stream acts for). Keys are unique tokens.
    pub metadata: Vec<(String, String)>,
}

impl ServiceHeader {
    /// A header with no metadata.
    pub fn new(service: Service) -> ServiceHeader {
        ServiceHeader {
            service,
            metadata: Vec::new(),
        }
    }

    /// Adds a metadata entry.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> ServiceHeader {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Checks the rules that decoding an OPEN enforces, so that a sender
    /// learns of a bad header before it goes on the wire.
    pub fn validate(&self) -> Result<(), ServiceError> {
        check_name(&self.service)?;
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(ServiceError::TooManyEntries);
        }
        for (i, (key, value)) in self.metadata.iter().enumerate() {
            check_token(key)?;
            if value.len() > usize::from(u16::MAX) {
                return Err(ServiceError::ValueTooLong(key.clone()));
            }
            if self.metadata[..i].iter().any(|(k, _)| k == key) {
                return Err(ServiceError::DuplicateKey(key.clone()));
            }
        }
        Ok(())
    }

    pub(crate) fn encoded_len(&self) -> usize {
        let entries: usize = self
            .metadata
            .iter()
            .map(|(k, v)| 3 + k.len() + v.len())
            .sum();
        3 + self.service.name().len() + entries
    }

    /// Appends the wire form. The header must have passed
    /// [`ServiceHeader::validate`]; lengths are written as given.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let name = self.service.name();
        out.put_u8(self.service.kind());
        out.put_u8(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.put_u8(self.metadata.len() as u8);
        for (key, value) in &self.metadata {
            out.put_u8(key.len() as u8);
            out.extend_from_slice(key.as_bytes());
            out.put_u16(value.len() as u16);
            out.extend_from_slice(value.as_bytes());
        }
    }

    pub(crate) fn decode(body: &mut Bytes) -> Result<ServiceHeader, FrameError> {
        let kind = take_u8(body)?;
        let name_len = usize::from(take_u8(body)?);
        let name = token(take_bytes(body, name_len)?)?;
        if kind != 0x04 && KNOWN_KINDS.contains(&kind) && !name.is_empty() {
            return Err(ServiceError::UnexpectedName { kind }.into());
        }
        let service = match kind {
            0x01 => Service::Control,
            0x02 => Service::Editor,
            0x03 => Service::Mqtt,
            0x04 => Service::Tcp(name),
            0x05 => Service::Audit,
            0x06 => Service::Snapshot,
            kind => Service::Other { kind, name },
        };
        check_name(&service)?;
        let count = usize::from(take_u8(body)?);
        if count > MAX_METADATA_ENTRIES {
            return Err(ServiceError::TooManyEntries.into());
        }
        let mut metadata: Vec<(String, String)> = Vec::with_capacity(count);
        for _ in 0..count {
            let key_len = usize::from(take_u8(body)?);
            let key = token(take_bytes(body, key_len)?)?;
            check_token(&key)?;
            let value_len = usize::from(take_u16(body)?);
            let value = String::from_utf8(take_bytes(body, value_len)?.to_vec())
                .map_err(|_| ServiceError::ValueNotUtf8(key.clone()))?;
            if metadata.iter().any(|(k, _)| *k == key) {
                return Err(ServiceError::DuplicateKey(key).into());
            }
            metadata.push((key, value));
        }
        Ok(ServiceHeader { service, metadata })
    }
}

fn check_name(service: &Service) -> Result<(), ServiceError> {
    match service {
        Service::Control | Service::Editor | Service::Mqtt | Service::Audit | Service::Snapshot => {
            Ok(())
        }
        Service::Tcp(name) if name.is_empty() => Err(ServiceError::MissingName),
        Service::Tcp(name) => check_token(name),
        Service::Other { kind, .. } if KNOWN_KINDS.contains(kind) => {
            Err(ServiceError::KnownKindAsOther { kind: *kind })
        }
        Service::Other { name, .. } if name.is_empty() => Ok(()),
        Service::Other { name, .. } => check_token(name),
    }
}

/// Tokens (names and keys) are 1 to 64 bytes of `[A-Za-z0-9._-]`: safe to put
/// in logs and file names without escaping.
fn check_token(token: &str) -> Result<(), ServiceError> {
    let valid = !token.is_empty()
        && token.len() <= MAX_NAME_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ServiceError::InvalidToken(token.to_string()))
    }
}

/// Decodes a token that may be empty (an absent name); content is checked
/// by [`check_name`] or [`check_token`].
fn token(bytes: Bytes) -> Result<String, FrameError> {
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if !text.is_empty() {
        check_token(&text)?;
    }
    Ok(text)
}
