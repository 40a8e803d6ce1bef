//! The MQTT outbox on disk: one redb file, `STATE_DIR/mqtt-outbox.redb`,
//! holding the QoS 1 and 2 messages from the local broker that the
//! platform has not acknowledged yet, in the order they arrived.
//!
//! This module owns the file's layout and every write to it: appending a
//! batch in one durable transaction (the local broker is acknowledged only
//! after it), the bounds (bytes and messages; the oldest are dropped and
//! counted when a batch would pass them), and deleting what the platform
//! acknowledged. Its methods block on disk I/O: callers run them on a
//! blocking thread. It never talks to a broker or the tunnel.
//!
//! Layout: `messages` maps a sequence number (growing with each message,
//! never reused, also after the outbox empties) to the message as
//! `tether_proto::mqtt::Message::encode` writes it; `meta` holds the lowest
//! number never handed out (numbers of messages held in memory are
//! reserved here before they are: [`Outbox::reserve`]) and the number of
//! messages ever dropped. A new outbox
//! numbers from the time it is created (milliseconds since the epoch times
//! 1,000), so a device whose state was wiped never reuses numbers the
//! platform already holds for it.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tether_proto::mqtt::Message;

/// File name of the outbox inside the state directory.
pub const FILE: &str = "mqtt-outbox.redb";
/// Bytes counted per message on top of its encoding: redb's own keeping.
const OVERHEAD: u64 = 40;
/// redb's page cache: written once, read once.
const CACHE_BYTES: usize = 1024 * 1024;

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT: &str = "next";
const DROPPED: &str = "dropped";

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "the MQTT outbox '{path}' cannot be used ({why}); messages from the local broker are not acknowledged until it can; help: check the disk and the file's owner, or move the file aside (its messages are then lost) and restart tetherd"
    )]
    Store { path: PathBuf, why: String },
}

/// What the outbox holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub messages: u64,
    pub bytes: u64,
    /// Oldest messages ever dropped because the outbox was full.
    pub dropped: u64,
    /// The lowest number never handed out (stored, or reserved for
    /// messages held in memory).
    pub next: u64,
    /// The highest number ever written (0: none since the outbox opened
    /// empty).
    pub last: u64,
}

/// The outbox file, open.
pub struct Outbox {
    db: Database,
    path: PathBuf,
    max_bytes: u64,
    max_messages: u64,
    stats: OutboxStats,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens (or creates, 0600) the outbox in `dir`, bounded to
    /// `max_bytes` and `max_messages`; a new one numbers from `now_ms`.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        max_messages: u64,
        now_ms: u64,
    ) -> Result<Outbox, OutboxError> {
        let path = dir.join(FILE);
        let fail = |why: String| OutboxError::Store {
            path: path.clone(),
            why,
        };
        if !path.exists() {
            // Created 0600 before redb opens it: the messages are the
            // flows' data.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_0600()
                .open(&path)
                .map_err(|e| fail(e.to_string()))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| fail(e.to_string()))?;
        let mut outbox = Outbox {
            db,
            path: path.clone(),
            max_bytes,
            max_messages,
            stats: OutboxStats::default(),
        };
        outbox.stats = outbox.load(now_ms).map_err(fail)?;
        Ok(outbox)
    }

    fn load(&self, now_ms: u64) -> Result<OutboxStats, String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let stats = {
            let messages = txn.open_table(MESSAGES).map_err(|e| e.to_string())?;
            let meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let mut stats = OutboxStats {
                next: meta
                    .get(NEXT)
                    .map_err(|e| e.to_string())?
                    .map_or(now_ms.saturating_mul(1000).max(1), |v| v.value()),
                dropped: meta
                    .get(DROPPED)
                    .map_err(|e| e.to_string())?
                    .map_or(0, |v| v.value()),
                ..OutboxStats::default()
            };
            for entry in messages.iter().map_err(|e| e.to_string())? {
                let (seq, body) = entry.map_err(|e| e.to_string())?;
                stats.messages += 1;
                stats.bytes += body.value().len() as u64 + OVERHEAD;
                stats.next = stats.next.max(seq.value() + 1);
                stats.last = stats.last.max(seq.value());
            }
            stats
        };
        {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            meta.insert(NEXT, stats.next).map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(stats)
    }

    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    fn fail(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::Store {
            path: self.path.clone(),
            why: e.to_string(),
        }
    }

    /// Appends `batch`, numbered in increasing order above everything
    /// stored, in one durable transaction, dropping the oldest messages the
    /// bounds cannot hold; returns how many were dropped (messages of the
    /// batch itself included when it alone is larger than the bounds).
    pub fn append(&mut self, batch: &[(u64, Message)]) -> Result<u64, OutboxError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.fail(e))?;
        let mut stats = self.stats;
        let mut dropped = 0u64;
        {
            let mut messages = txn.open_table(MESSAGES).map_err(|e| self.fail(e))?;
            let mut buf = BytesMut::new();
            for (seq, message) in batch {
                debug_assert!(*seq > stats.last || stats.last == 0);
                buf.clear();
                message.encode(&mut buf);
                messages
                    .insert(*seq, buf.as_ref())
                    .map_err(|e| self.fail(e))?;
                stats.next = stats.next.max(seq + 1);
                stats.last = stats.last.max(*seq);
                stats.messages += 1;
                stats.bytes += buf.len() as u64 + OVERHEAD;
            }
            while stats.messages > self.max_messages || stats.bytes > self.max_bytes {
                let Some((_, body)) = messages.pop_first().map_err(|e| self.fail(e))? else {
                    break;
                };
                stats.messages -= 1;
                stats.bytes -= body.value().len() as u64 + OVERHEAD;
                dropped += 1;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.fail(e))?;
            meta.insert(NEXT, stats.next).map_err(|e| self.fail(e))?;
            if dropped > 0 {
                stats.dropped += dropped;
                meta.insert(DROPPED, stats.dropped)
                    .map_err(|e| self.fail(e))?;
            }
        }
        txn.commit().map_err(|e| self.fail(e))?;
        self.stats = stats;
        Ok(dropped)
    }

    /// Up to `max_messages` messages (about `max_bytes`) after `after`, in
    /// order. A message that no longer decodes (written by another
    /// version) is skipped with its sequence number, so it is acknowledged
    /// away rather than blocking the outbox.
    pub fn read_after(
        &self,
        after: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Option<Message>)>, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let messages = txn.open_table(MESSAGES).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in messages
            .range(after.saturating_add(1)..)
            .map_err(|e| self.fail(e))?
        {
            let (seq, body) = entry.map_err(|e| self.fail(e))?;
            bytes += body.value().len();
            out.push((
                seq.value(),
                Message::decode(Bytes::copy_from_slice(body.value())).ok(),
            ));
            if out.len() >= max_messages || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Numbers new messages from `next` on if that is higher (the platform
    /// holds numbers up to `next - 1`: this outbox was restored from an
    /// older copy).
    pub fn skip_to(&mut self, next: u64) -> Result<(), OutboxError> {
        self.reserve(next)
    }

    /// Reserves every number below `upto`, durably: after a crash, new
    /// messages are numbered above them (messages held in memory took
    /// them and the platform may have seen them).
    pub fn reserve(&mut self, upto: u64) -> Result<(), OutboxError> {
        if upto <= self.stats.next {
            return Ok(());
        }
        let next = upto;
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.fail(e))?;
            meta.insert(NEXT, next).map_err(|e| self.fail(e))?;
        }
        txn.commit().map_err(|e| self.fail(e))?;
        self.stats.next = next;
        Ok(())
    }

    /// Deletes every message up to and including `seq` (the platform has
    /// them). Not synced on its own: a crash before the next append
    /// resends them, and the platform ignores what it already has.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        let mut txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.fail(e))?;
        let mut stats = self.stats;
        {
            let mut messages = txn.open_table(MESSAGES).map_err(|e| self.fail(e))?;
            let (mut count, mut bytes) = (0u64, 0u64);
            for entry in messages.range(..=seq).map_err(|e| self.fail(e))? {
                let (_, body) = entry.map_err(|e| self.fail(e))?;
                count += 1;
                bytes += body.value().len() as u64 + OVERHEAD;
            }
            if count > 0 {
                messages
                    .retain_in(..=seq, |_, _| false)
                    .map_err(|e| self.fail(e))?;
            }
            stats.messages -= count;
            stats.bytes -= bytes;
        }
        txn.commit().map_err(|e| self.fail(e))?;
        self.stats = stats;
        Ok(())
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::mqtt::Properties;

    /// `batch` numbered from the outbox's next number.
    fn numbered(outbox: &Outbox, batch: &[Message]) -> Vec<(u64, Message)> {
        (outbox.stats().next..).zip(batch.iter().cloned()).collect()
    }

    fn message(n: usize, len: usize) -> Message {
        Message {
            topic: format!("tether/t/d/out/{n}"),
            qos: 1,
            retain: false,
            properties: Properties::default(),
            payload: Bytes::from(vec![b'x'; len]),
        }
    }

    #[test]
    fn messages_survive_a_reopen_in_order_and_acks_delete_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1000, 0).unwrap();
        let batch: Vec<Message> = (0..10).map(|n| message(n, 10)).collect();
        assert_eq!(outbox.append(&numbered(&outbox, &batch)).unwrap(), 0);
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1000, 0).unwrap();
        assert_eq!(outbox.stats().messages, 10);
        let read = outbox.read_after(0, 100, 1 << 20).unwrap();
        let seqs: Vec<u64> = read.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        assert_eq!(read[3].1.as_ref().unwrap(), &batch[3]);
        outbox.ack(4).unwrap();
        assert_eq!(outbox.stats().messages, 6);
        assert_eq!(outbox.read_after(0, 100, 1 << 20).unwrap()[0].0, 5);
        outbox.ack(10).unwrap();
        // Numbers are never reused once the outbox is empty.
        outbox
            .append(&numbered(&outbox, &[message(11, 1)]))
            .unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 1 << 20, 1000, 0).unwrap();
        assert_eq!(outbox.read_after(0, 100, 1 << 20).unwrap()[0].0, 11);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 5, 0).unwrap();
        let batch: Vec<Message> = (0..8).map(|n| message(n, 10)).collect();
        assert_eq!(outbox.append(&numbered(&outbox, &batch)).unwrap(), 3);
        let stats = outbox.stats();
        assert_eq!((stats.messages, stats.dropped), (5, 3));
        let read = outbox.read_after(0, 100, 1 << 20).unwrap();
        assert_eq!(read[0].1.as_ref().unwrap().topic, "tether/t/d/out/3");
        // The byte bound too.
        drop(outbox);
        let mut small = Outbox::open(dir.path(), 2_000, 1000, 0).unwrap();
        small.ack(u64::MAX).unwrap();
        let batch = numbered(&small, &[message(0, 900), message(1, 900), message(2, 900)]);
        small.append(&batch).unwrap();
        assert!(small.stats().bytes <= 2_000);
        assert_eq!(small.stats().messages, 2);
        drop(small);
        let reopened = Outbox::open(dir.path(), 2_000, 1000, 0).unwrap();
        assert_eq!(reopened.stats().dropped, 3 + 1);
    }

    #[test]
    fn a_new_outbox_numbers_from_its_creation_time_and_can_skip_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1000, 1_700_000_000_000).unwrap();
        assert_eq!(outbox.stats().next, 1_700_000_000_000_000);
        outbox.skip_to(5).unwrap();
        assert_eq!(outbox.stats().next, 1_700_000_000_000_000, "never lowered");
        outbox.skip_to(1_800_000_000_000_000).unwrap();
        drop(outbox);
        // Reopened later: the stored number wins over the clock.
        let mut outbox = Outbox::open(dir.path(), 1 << 20, 1000, 1_900_000_000_000).unwrap();
        outbox.append(&numbered(&outbox, &[message(0, 1)])).unwrap();
        let read = outbox.read_after(0, 10, 1 << 20).unwrap();
        assert_eq!(read[0].0, 1_800_000_000_000_000);
        assert_eq!(outbox.stats().last, 1_800_000_000_000_000);
        // Numbers reserved for messages held in memory are never handed
        // out again after a reopen; the last stored stays what it was.
        outbox.reserve(1_800_000_000_070_000).unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 1 << 20, 1000, 0).unwrap();
        assert_eq!(outbox.stats().next, 1_800_000_000_070_000);
        assert_eq!(outbox.stats().last, 1_800_000_000_000_000);
    }
}
