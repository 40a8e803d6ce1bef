//! The device's audit trail on the wire: the record format both ends hash,
//! the hash chain and its rules, signed checkpoints, and the framing of the
//! `audit` stream (`docs/protocol.md` §17, `docs/audit-events.md`).
//!
//! A record is one JSON object ([`Record`]); its exact bytes, as the device
//! wrote them, are what is stored, shipped and hashed, so neither end ever
//! re-serialises a record to check it. Each record names the link of the
//! one before it (`prev`), from the zero hash at the device's first record
//! on. Events that had to be dropped are replaced by one `events_dropped`
//! record ([`Dropped`]) that says which sequence numbers it covers and
//! carries the chain across them. The device signs the link of a record
//! from time to time with its own key ([`Checkpoint`]), so the platform can
//! show both that nothing between two checkpoints was removed or altered
//! and that the device wrote it.
//!
//! This module owns the formats and [`verify_chain`]; it never does I/O,
//! never signs (the device holds its key) and never decides what an event
//! means beyond the drop marker.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Version of the record format, the `v` of every record.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest record, in bytes. The device refuses to record a longer one
/// (details are truncated before that); a receiver resets the stream.
pub const MAX_RECORD: usize = 16 * 1024;
/// Largest frame on the audit stream.
pub const MAX_FRAME: usize = MAX_RECORD + 4096;
/// The `prev` of a device's first record.
pub const GENESIS: [u8; 32] = [0; 32];
/// Type of the drop marker.
pub const EVENTS_DROPPED: &str = "events_dropped";
/// Domain separation of checkpoint signatures.
pub const CHECKPOINT_CONTEXT: &str = "tether-audit-checkpoint-v1";

/// Who did what a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// A person, through the platform (an engineer in the editor).
    User,
    /// The platform itself (a setting it pushed, a renewal it asked for).
    Platform,
    /// The agent on its own account.
    Agent,
    /// The local Node-RED or its flows.
    NodeRed,
}

/// The actor of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: ActorKind,
    /// The user's name for [`ActorKind::User`]; otherwise usually absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One audit record as written by the device. Field order is the order of
/// the JSON the device writes; readers accept any order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// [`SCHEMA_VERSION`].
    pub v: u32,
    /// Per device, from 1, never repeated.
    pub seq: u64,
    /// Wall-clock time of the event, milliseconds since the Unix epoch.
    pub time: u64,
    /// The link of the record before (lowercase hex SHA-256), or of
    /// [`GENESIS`] for the first.
    pub prev: String,
    pub actor: Actor,
    /// The event type (`docs/audit-events.md`).
    #[serde(rename = "type")]
    pub kind: String,
    /// What the event is about: a path, a stream, a certificate, a setting.
    #[serde(default)]
    pub subject: String,
    /// Type-specific fields, a JSON object.
    #[serde(default)]
    pub details: serde_json::Value,
}

/// The details of an [`EVENTS_DROPPED`] record: the sequence numbers it
/// stands for (`first_seq..=last_seq`, where `last_seq` is its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Events that were lost; `None` when not known (a store that could
    /// not be read).
    pub count: Option<u64>,
    /// Why: `queue_full`, `store_corrupt`.
    pub reason: String,
    /// The link of the last dropped event, which the next record names as
    /// its `prev`. Absent when the chain starts again after this marker
    /// (the events are not known): the next record then names this
    /// marker's own hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_prev: Option<String>,
}

impl Record {
    /// Parses a record's bytes, checking the version and the size.
    pub fn parse(body: &[u8]) -> Result<Record, AuditError> {
        if body.len() > MAX_RECORD {
            return Err(AuditError::TooLarge { len: body.len() });
        }
        let record: Record = serde_json::from_slice(body)?;
        if record.v != SCHEMA_VERSION {
            return Err(AuditError::Version(record.v));
        }
        if !is_hash_hex(&record.prev) {
            return Err(AuditError::Field("prev is not 64 lowercase hex digits"));
        }
        if record.seq == 0 {
            return Err(AuditError::Field("seq starts at 1"));
        }
        Ok(record)
    }

    /// The drop marker's details, if this is one.
    pub fn dropped(&self) -> Option<Result<Dropped, AuditError>> {
        (self.kind == EVENTS_DROPPED).then(|| {
            let d: Dropped = serde_json::from_value(self.details.clone())?;
            let valid = d.first_seq >= 1
                && d.first_seq <= d.last_seq
                && d.last_seq == self.seq
                && d.next_prev.as_deref().is_none_or(is_hash_hex);
            if valid {
                Ok(d)
            } else {
                Err(AuditError::Field(
                    "events_dropped must cover first_seq..=its own seq",
                ))
            }
        })
    }
}

/// SHA-256 of a record's bytes.
pub fn hash(body: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// What the record after this one names as its `prev`: the record's own
/// hash, or for a drop marker the link of the last event it replaced.
pub fn link(record: &Record, body: &[u8]) -> [u8; 32] {
    if let Some(Ok(Dropped {
        next_prev: Some(next),
        ..
    })) = record.dropped()
        && let Some(bytes) = from_hex(&next)
    {
        return bytes;
    }
    hash(body)
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    crate::hex::encode(bytes)
}

/// 64 lowercase hex digits to 32 bytes.
pub fn from_hex(s: &str) -> Option<[u8; 32]> {
    crate::hex::decode32(s)
}

fn is_hash_hex(s: &str) -> bool {
    from_hex(s).is_some()
}

/// The device's signature over the link of one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    /// SHA-256 of the record at `seq` (its bytes; for a drop marker too),
    /// lowercase hex.
    pub hash: String,
    /// Unix seconds when it was signed.
    pub time: u64,
    /// The device certificate whose key signed, DER, base64url without
    /// padding: the platform checks that it issued it to this device.
    pub cert: String,
    /// ECDSA P-256 with SHA-256 (ASN.1 DER) over [`Checkpoint::message`],
    /// base64url without padding.
    pub signature: String,
}

impl Checkpoint {
    /// The bytes signed: [`CHECKPOINT_CONTEXT`], the device id, `seq`,
    /// `hash` and `time`, each followed by `\n`.
    pub fn message(device_id: &str, seq: u64, hash: &str, time: u64) -> Vec<u8> {
        format!("{CHECKPOINT_CONTEXT}\n{device_id}\n{seq}\n{hash}\n{time}\n").into_bytes()
    }

    /// Checks the signature with the raw public key (an uncompressed P-256
    /// point) of the certificate in `cert`.
    pub fn verify(&self, device_id: &str, public_key: &[u8]) -> bool {
        use base64::Engine;
        let Ok(signature) =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&self.signature)
        else {
            return false;
        };
        let message = Checkpoint::message(device_id, self.seq, &self.hash, self.time);
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            public_key,
        )
        .verify(&message, &signature)
        .is_ok()
    }
}

/// Why a record or a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit record or frame of {len} bytes is larger than the limit")]
    TooLarge { len: usize },
    #[error("audit record version {0} is not known (this end reads version 1)")]
    Version(u32),
    #[error("audit record is not valid: {0}")]
    Field(&'static str),
    #[error("audit record or checkpoint is not valid JSON of the documented shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("audit frame of unknown type 0x{0:02x}")]
    UnknownFrame(u8),
    #[error("audit frame is truncated")]
    Truncated,
}

/// One frame on the audit stream. Each is a 4-byte big-endian length (of
/// the type byte and the payload), a type byte and the payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// Platform → device, first: the highest sequence number it holds for
    /// the device (0 for none). The device ships from after it.
    Hello { stored: u64 },
    /// Device → platform: one record's bytes.
    Record(Bytes),
    /// Device → platform: a signed checkpoint (JSON).
    Checkpoint(Checkpoint),
    /// Platform → device: every record up to `seq` that was sent is stored
    /// durably; the device may delete them.
    Ack { seq: u64 },
}

const HELLO: u8 = 1;
const RECORD: u8 = 2;
const CHECKPOINT: u8 = 3;
const ACK: u8 = 4;

impl Frame {
    /// Appends the frame's wire form to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), AuditError> {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Hello { stored } => (HELLO, stored.to_be_bytes().to_vec().into()),
            Frame::Ack { seq } => (ACK, seq.to_be_bytes().to_vec().into()),
            Frame::Record(body) => (RECORD, body.as_ref().into()),
            Frame::Checkpoint(c) => (CHECKPOINT, serde_json::to_vec(c)?.into()),
        };
        if payload.len() + 1 > MAX_FRAME {
            return Err(AuditError::TooLarge {
                len: payload.len() + 1,
            });
        }
        out.reserve(5 + payload.len());
        out.put_u32(payload.len() as u32 + 1);
        out.put_u8(kind);
        out.put_slice(&payload);
        Ok(())
    }
}

/// Reassembles frames from a byte stream, holding at most one frame's
/// worth of bytes beyond what was pushed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived. After an error the stream
    /// is out of step and must be abandoned.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, AuditError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(AuditError::TooLarge { len });
        }
        if len == 0 {
            return Err(AuditError::Truncated);
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let mut body = self.buf.split_to(len).freeze();
        let kind = body.get_u8();
        let number = |body: &Bytes| -> Result<u64, AuditError> {
            let bytes: [u8; 8] = body[..].try_into().map_err(|_| AuditError::Truncated)?;
            Ok(u64::from_be_bytes(bytes))
        };
        Ok(Some(match kind {
            HELLO => Frame::Hello {
                stored: number(&body)?,
            },
            ACK => Frame::Ack {
                seq: number(&body)?,
            },
            RECORD => Frame::Record(body),
            CHECKPOINT => Frame::Checkpoint(serde_json::from_slice(&body)?),
            other => return Err(AuditError::UnknownFrame(other)),
        }))
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// What is wrong at one place in a stored chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub seq: u64,
    pub what: String,
}

/// The result of [`verify_chain`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReport {
    /// Records looked at.
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Events the device reported dropped (drop markers' counts).
    pub dropped: u64,
    /// Drop markers whose count is not known.
    pub unknown_drops: u64,
    /// Every place the chain does not hold: a gap no marker covers, a
    /// `prev` that does not match, a record that does not parse or whose
    /// sequence number is not where it is stored.
    pub problems: Vec<Problem>,
}

impl ChainReport {
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a device's stored records, in ascending order of sequence
/// number: each record's `prev` must be the link of the record just before
/// it (a drop marker's: of the record before the first one it covers), the
/// first stored record must start at 1 from [`GENESIS`] (or be covered by a
/// marker that does), and no sequence number may be missing unless a drop
/// marker covers it.
pub fn verify_chain<'a>(records: impl IntoIterator<Item = (u64, &'a [u8])>) -> ChainReport {
    let mut report = ChainReport::default();
    // Link of every record seen, by sequence number.
    let mut links: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    let mut last: Option<u64> = None;
    for (seq, body) in records {
        report.records += 1;
        report.first_seq.get_or_insert(seq);
        report.last_seq = Some(seq);
        let mut problem = |what: String| report.problems.push(Problem { seq, what });
        let record = match Record::parse(body) {
            Ok(r) if r.seq == seq => r,
            Ok(r) => {
                problem(format!("stored as {seq} but says seq {}", r.seq));
                last = Some(seq);
                continue;
            }
            Err(e) => {
                problem(e.to_string());
                last = Some(seq);
                continue;
            }
        };
        // The record whose link this one names: the one before it, or for
        // a marker the one before the first event it covers.
        let before = match record.dropped() {
            Some(Ok(d)) => {
                report.dropped += d.count.unwrap_or(0);
                report.unknown_drops += u64::from(d.count.is_none());
                let covered = last.map_or(1, |l| l + 1);
                if d.first_seq > covered {
                    problem(format!(
                        "events {covered} to {} are missing and no drop marker covers them",
                        d.first_seq - 1
                    ));
                }
                d.first_seq - 1
            }
            Some(Err(e)) => {
                problem(e.to_string());
                seq - 1
            }
            None => {
                let expected = last.map_or(1, |l| l + 1);
                if seq > expected {
                    problem(format!(
                        "events {expected} to {} are missing and no drop marker covers them",
                        seq - 1
                    ));
                }
                seq - 1
            }
        };
        let expected = if before == 0 {
            Some(GENESIS)
        } else {
            links.get(&before).copied()
        };
        match expected {
            Some(link) if to_hex(&link) == record.prev => {}
            Some(_) => problem(format!(
                "prev does not match record {before}: it was altered, or a record was removed or replaced"
            )),
            // The record before is missing: reported as a gap above.
            None if before > last.unwrap_or(0) => {}
            None => problem(format!("record {before}, which it links to, is missing")),
        }
        links.insert(seq, link(&record, body));
        last = Some(seq);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, prev: [u8; 32], kind: &str, details: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&Record {
            v: SCHEMA_VERSION,
            seq,
            time: 1_700_000_000_000 + seq,
            prev: to_hex(&prev),
            actor: Actor {
                kind: ActorKind::Agent,
                name: None,
            },
            kind: kind.into(),
            subject: format!("s{seq}"),
            details,
        })
        .unwrap()
    }

    /// A chain of `n` plain events from 1.
    fn chain(n: u64) -> Vec<(u64, Vec<u8>)> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let body = record(seq, prev, "tunnel_up", serde_json::json!({}));
                prev = hash(&body);
                (seq, body)
            })
            .collect()
    }

    fn verify(records: &[(u64, Vec<u8>)]) -> ChainReport {
        verify_chain(records.iter().map(|(s, b)| (*s, b.as_slice())))
    }

    fn marker(first: u64, last: u64, prev: [u8; 32], next_prev: Option<[u8; 32]>) -> Vec<u8> {
        record(
            last,
            prev,
            EVENTS_DROPPED,
            serde_json::json!({
                "first_seq": first, "last_seq": last, "count": last - first + 1,
                "reason": "queue_full", "next_prev": next_prev.map(|h| to_hex(&h)),
            }),
        )
    }

    #[test]
    fn an_intact_chain_verifies() {
        let records = chain(50);
        let report = verify(&records);
        assert!(report.intact(), "{:?}", report.problems);
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (50, Some(1), Some(50))
        );
    }

    #[test]
    fn an_altered_removed_or_reordered_record_is_found() {
        let records = chain(10);
        // Altered: the subject of 4 changed; 5's prev no longer matches.
        let mut altered = records.clone();
        let text = String::from_utf8(altered[3].1.clone()).unwrap();
        altered[3].1 = text.replace("\"s4\"", "\"s9\"").into_bytes();
        let report = verify(&altered);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].seq, 5);
        // Removed: 6 is gone.
        let mut removed = records.clone();
        removed.remove(5);
        let report = verify(&removed);
        assert_eq!(report.problems[0].seq, 7);
        assert!(report.problems[0].what.contains("missing"), "{:?}", report);
        // The last record removed cannot show in the chain: only
        // checkpoints can say it existed.
        // Renumbered: 3 stored under 4.
        let mut moved = records.clone();
        moved[3].1 = moved[2].1.clone();
        assert!(!verify(&moved).intact());
        // The first record must start from the genesis hash.
        let report = verify(&records[1..]);
        assert!(!report.intact());
    }

    #[test]
    fn a_drop_marker_carries_the_chain_across_its_gap() {
        let mut records = chain(10);
        // 4..=7 dropped, replaced by a marker at 7.
        let next_prev = hash(&records[6].1);
        let prev = hash(&records[2].1);
        records.drain(3..7);
        records.insert(3, (7, marker(4, 7, prev, Some(next_prev))));
        let report = verify(&records);
        assert!(report.intact(), "{:?}", report.problems);
        assert_eq!(report.dropped, 4);
        // A marker that claims a wider range than it replaced breaks the
        // link to the record before its first event.
        let mut wider = records.clone();
        wider[3].1 = marker(3, 7, prev, Some(next_prev));
        assert!(!verify(&wider).intact());
        // A gap with no marker over it is flagged.
        let mut bare = records.clone();
        bare.remove(3);
        assert!(!verify(&bare).intact());
    }

    #[test]
    fn a_marker_that_starts_a_new_chain_links_by_its_own_hash() {
        let mut records = chain(3);
        let restart = marker(4, 1000, hash(&records[2].1), None);
        let next = record(1001, hash(&restart), "tunnel_up", serde_json::json!({}));
        records.push((1000, restart));
        records.push((1001, next));
        assert!(verify(&records).intact());
    }

    #[test]
    fn frames_round_trip_in_any_pieces_and_bad_frames_are_refused() {
        let checkpoint = Checkpoint {
            seq: 9,
            hash: to_hex(&[7; 32]),
            time: 5,
            cert: "AA".into(),
            signature: "BB".into(),
        };
        let frames = vec![
            Frame::Hello { stored: 41 },
            Frame::Record(Bytes::from(chain(1).remove(0).1)),
            Frame::Checkpoint(checkpoint),
            Frame::Ack { seq: u64::MAX },
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire).unwrap();
        }
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for byte in wire.iter() {
            decoder.push(&[*byte]);
            while let Some(f) = decoder.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(decoder.buffered(), 0);
        let mut huge = FrameDecoder::new();
        huge.push(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(
            huge.next_frame(),
            Err(AuditError::TooLarge { .. })
        ));
        let mut unknown = FrameDecoder::new();
        unknown.push(&[0, 0, 0, 1, 0x7f]);
        assert!(matches!(
            unknown.next_frame(),
            Err(AuditError::UnknownFrame(0x7f))
        ));
        let mut short = FrameDecoder::new();
        short.push(&[0, 0, 0, 3, ACK, 0, 0]);
        assert!(matches!(short.next_frame(), Err(AuditError::Truncated)));
        let too_big = Frame::Record(Bytes::from(vec![b'x'; MAX_FRAME]));
        assert!(too_big.encode(&mut BytesMut::new()).is_err());
    }

    #[test]
    fn checkpoints_verify_only_with_the_signing_key_and_the_same_fields() {
        use base64::Engine;
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let hash = to_hex(&[3; 32]);
        let signature = key
            .sign(&rng, &Checkpoint::message("dev_a", 12, &hash, 99))
            .unwrap();
        let checkpoint = Checkpoint {
            seq: 12,
            hash,
            time: 99,
            cert: String::new(),
            signature: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature.as_ref()),
        };
        let public = key.public_key().as_ref();
        assert!(checkpoint.verify("dev_a", public));
        assert!(!checkpoint.verify("dev_b", public));
        let moved = Checkpoint {
            seq: 13,
            ..checkpoint.clone()
        };
        assert!(!moved.verify("dev_a", public));
        let other = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let other = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, other.as_ref(), &rng)
            .unwrap();
        assert!(!checkpoint.verify("dev_a", other.public_key().as_ref()));
    }

    #[test]
    fn records_are_parsed_strictly() {
        let good = chain(1).remove(0).1;
        assert!(Record::parse(&good).is_ok());
        let text = String::from_utf8(good).unwrap();
        assert!(Record::parse(text.replace("\"v\":1", "\"v\":2").as_bytes()).is_err());
        assert!(Record::parse(text.replace("\"seq\":1", "\"seq\":0").as_bytes()).is_err());
        assert!(Record::parse(b"{}").is_err());
        assert!(Record::parse(&vec![b' '; MAX_RECORD + 1]).is_err());
    }
}
