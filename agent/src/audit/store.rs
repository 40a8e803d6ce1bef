//! The audit queue on disk: one redb file, `STATE_DIR/audit.redb`, holding
//! the records the platform has not acknowledged yet, and a small lease
//! file, `STATE_DIR/audit.lease`, that keeps sequence numbers from ever
//! repeating even if the store is lost.
//!
//! This module owns the file's layout and every write to it: appending a
//! batch of records in one transaction (the writer's group commit), the
//! size bound and its drop marker, deleting what the platform acknowledged,
//! and what happens to a store that cannot be opened (moved aside, a new
//! chain started with a marker that links to the last known hash). Its
//! methods block on disk I/O; only the queue's writer thread calls the
//! writing ones. It never ships anything and never reads the clock: times
//! come with the records.
//!
//! Layout: `records` maps a sequence number to the record's bytes (the JSON
//! the platform stores and hashes); `meta` holds one [`Head`] under
//! `"head"`. The lease file holds the highest sequence number the store may
//! use before it writes a new lease, and the last acknowledged record's
//! sequence number and link.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tether_proto::audit::{
    self, Actor, ActorKind, Dropped, EVENTS_DROPPED, GENESIS, MAX_RECORD, Record, SCHEMA_VERSION,
};

use crate::files::{self, Mode};

/// File name of the store inside the state directory.
pub const STORE_FILE: &str = "audit.redb";
/// File name of the sequence lease inside the state directory.
pub const LEASE_FILE: &str = "audit.lease";
/// Default bound of the store on disk.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest bound the config accepts.
pub const MIN_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Sequence numbers reserved by one lease.
const LEASE: u64 = 1 << 16;
/// Bytes counted per record on top of its length: redb's own keeping.
const RECORD_OVERHEAD: u64 = 40;
/// redb's page cache: the queue is written once and read once, so a small
/// cache costs little and keeps an idle agent small.
const CACHE_BYTES: usize = 1024 * 1024;

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HEAD: &str = "head";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the disk holding '{}' is full: audit events cannot be stored; help: free space on that file system (events are kept in memory for a while and written when there is room)",
        .0.display()
    )]
    DiskFull(PathBuf),
    #[error("cannot write the audit store '{}': {source}; help: check the state directory's disk and permissions", .path.display())]
    Storage { path: PathBuf, source: redb::Error },
    #[error("cannot write the audit lease: {0}")]
    Lease(files::FileError),
    #[error("an audit record could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

impl StoreError {
    fn storage(path: &Path, e: impl Into<redb::Error>) -> StoreError {
        let e: redb::Error = e.into();
        if is_disk_full(&e) {
            return StoreError::DiskFull(path.to_owned());
        }
        StoreError::Storage {
            path: path.to_owned(),
            source: e,
        }
    }

    /// Whether the store must be closed and opened again before the next
    /// write (redb refuses writes after an I/O error).
    pub fn needs_reopen(&self) -> bool {
        matches!(self, StoreError::DiskFull(_) | StoreError::Storage { .. })
    }
}

fn is_disk_full(e: &redb::Error) -> bool {
    let io = match e {
        redb::Error::Io(io) => Some(io),
        _ => None,
    };
    io.and_then(std::io::Error::raw_os_error) == Some(28) // ENOSPC
        || e.to_string().contains("No space left")
}

/// The store's own record of where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The sequence number the next record gets.
    pub next_seq: u64,
    /// The link of the last record written (hex), which the next one names.
    pub link: String,
    /// Records up to this one are acknowledged (and deleted).
    pub acked: u64,
    /// The link of record `acked_link_seq` (hex).
    pub acked_link: String,
    pub acked_link_seq: u64,
    /// Records stored, and their counted size.
    pub records: u64,
    pub bytes: u64,
    /// Events replaced by drop markers since the store was made.
    pub dropped: u64,
}

impl Head {
    fn new(next_seq: u64, link: [u8; 32], acked: u64, acked_link: String) -> Head {
        Head {
            next_seq,
            link: audit::to_hex(&link),
            acked,
            acked_link_seq: acked,
            acked_link,
            records: 0,
            bytes: 0,
            dropped: 0,
        }
    }
}

/// The lease file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    reserved_until: u64,
    acked: u64,
    acked_link: String,
}

/// A record to append, before it has a sequence number and a place in the
/// chain.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRecord {
    /// Milliseconds since the Unix epoch.
    pub time: u64,
    pub parts: super::event::Parts,
}

/// What opening found.
#[derive(Debug)]
pub struct Opened {
    pub store: Store,
    /// The old store could not be used: why, and where it was moved.
    pub recovered: Option<String>,
}

/// The writer's handle on the store.
#[derive(Debug)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    lease_path: PathBuf,
    head: Head,
    reserved_until: u64,
    /// Records are dropped above this many counted bytes.
    budget: u64,
}

/// Opens `path` with redb, catching redb's checks that panic in debug
/// builds on some corrupt files.
fn open_db(path: &Path) -> Result<Database, String> {
    let open = || Database::builder().set_cache_size(CACHE_BYTES).create(path);
    match std::panic::catch_unwind(open) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the store is corrupt (its structure does not hold)".into()),
    }
}

fn read_head(db: &Database) -> Result<Option<Head>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let Some(raw) = meta.get(HEAD).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let head: Head = serde_json::from_slice(raw.value()).map_err(|e| e.to_string())?;
    // The last record must be the head's: a cheap check that the file and
    // its head agree.
    let records = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
    if let Some((seq, body)) = records.last().map_err(|e| e.to_string())? {
        let seq = seq.value();
        let record = Record::parse(body.value()).map_err(|e| e.to_string())?;
        if seq + 1 != head.next_seq
            || audit::to_hex(&audit::link(&record, body.value())) != head.link
        {
            return Err(format!(
                "the last record ({seq}) does not match the store's head (next {})",
                head.next_seq
            ));
        }
    }
    Ok(Some(head))
}

impl Store {
    /// Opens (or makes) the store in `dir`, bounded at `max_bytes` on disk.
    /// A store that cannot be read is moved aside to
    /// `audit.redb.corrupt-UNIX` and a new one started; the new chain begins
    /// with an `events_dropped` marker (reason `store_corrupt`) that covers
    /// every sequence number the old store could have used and links to the
    /// last record the platform acknowledged. `now` (Unix seconds) names
    /// the moved file and times the marker.
    pub fn open(dir: &Path, max_bytes: u64, now_ms: u64) -> Result<Opened, StoreError> {
        let path = dir.join(STORE_FILE);
        let lease_path = dir.join(LEASE_FILE);
        let lease = read_lease(&lease_path);
        let existed = path.exists();
        // redb keeps records in B-tree pages about half to two thirds full
        // (1.5 to 2 bytes on disk per counted byte, measured) and frees
        // pages of deleted records for reuse rather than giving them back:
        // counting up to 2/5 of the bound keeps the file within it.
        let budget = max_bytes / 5 * 2;
        let mut recovered = None;
        let opened = open_db(&path).and_then(|db| Ok((read_head(&db)?, db)));
        let (db, head) = match opened {
            Ok((Some(head), db)) => (db, head),
            Ok((None, db)) if !existed || lease.is_none() => {
                let head = Head::new(1, GENESIS, 0, audit::to_hex(&GENESIS));
                (db, head)
            }
            Ok((None, _)) => {
                // A file without a head, where a lease says records were
                // written: treat it as corrupt.
                let why = "the store has no head record".to_owned();
                let (db, head, report) = Self::start_over(&path, &lease, &why, now_ms)?;
                recovered = Some(report);
                (db, head)
            }
            Err(why) => {
                let (db, head, report) = Self::start_over(&path, &lease, &why, now_ms)?;
                recovered = Some(report);
                (db, head)
            }
        };
        let mut store = Store {
            db: Arc::new(db),
            path,
            lease_path,
            reserved_until: 0,
            budget,
            head,
        };
        match &lease {
            Some(l) if l.reserved_until >= store.head.next_seq => {
                store.reserved_until = l.reserved_until
            }
            _ => store.write_lease(store.head.next_seq)?,
        }
        if recovered.is_some() {
            store.commit_head_only()?;
        }
        Ok(Opened { store, recovered })
    }

    /// Moves a store that cannot be used aside and starts a new one whose
    /// first record is the recovery marker.
    fn start_over(
        path: &Path,
        lease: &Option<Lease>,
        why: &str,
        now_ms: u64,
    ) -> Result<(Database, Head, String), StoreError> {
        let aside = path.with_file_name(format!("{STORE_FILE}.corrupt-{}", now_ms / 1000));
        std::fs::rename(path, &aside).map_err(|e| StoreError::Storage {
            path: path.to_owned(),
            source: e.into(),
        })?;
        let db = open_db(path).map_err(|e| StoreError::Storage {
            path: path.to_owned(),
            source: std::io::Error::other(e).into(),
        })?;
        // Every sequence number the old store may have used is covered: up
        // to the end of its lease, or, with no lease, up to the time in
        // milliseconds (larger than any count of records written).
        let (first, last, prev) = match lease {
            Some(l) => (
                l.acked + 1,
                l.reserved_until.max(l.acked + 1),
                l.acked_link.clone(),
            ),
            None => (1, now_ms.max(1), audit::to_hex(&GENESIS)),
        };
        let dropped = Dropped {
            first_seq: first,
            last_seq: last,
            count: None,
            reason: "store_corrupt".into(),
            next_prev: None,
        };
        let subject = format!("store moved to {}", aside.display());
        let body = marker(&dropped, now_ms, &prev, subject)?;
        let mut head = Head::new(last + 1, audit::hash(&body), first - 1, prev);
        head.records = 1;
        head.bytes = body.len() as u64 + RECORD_OVERHEAD;
        let txn = db.begin_write().map_err(|e| StoreError::storage(path, e))?;
        {
            let mut records = txn
                .open_table(RECORDS)
                .map_err(|e| StoreError::storage(path, e))?;
            records
                .insert(last, body.as_slice())
                .map_err(|e| StoreError::storage(path, e))?;
        }
        txn.commit().map_err(|e| StoreError::storage(path, e))?;
        let report = format!(
            "the audit store could not be read ({why}); it was moved to '{}' and a new one started: events {first} to {last} are marked as lost",
            aside.display()
        );
        Ok((db, head, report))
    }

    fn commit_head_only(&mut self) -> Result<(), StoreError> {
        let txn = self.begin()?;
        self.put_head(&txn)?;
        txn.commit().map_err(|e| StoreError::storage(&self.path, e))
    }

    fn begin(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.db
            .begin_write()
            .map_err(|e| StoreError::storage(&self.path, e))
    }

    fn put_head(&self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| StoreError::storage(&self.path, e))?;
        let head = serde_json::to_vec(&self.head)?;
        meta.insert(HEAD, head.as_slice())
            .map_err(|e| StoreError::storage(&self.path, e))?;
        Ok(())
    }

    /// Writes a lease that covers sequence numbers up to `needed` and
    /// [`LEASE`] more, before any record that needs it is committed.
    fn write_lease(&mut self, needed: u64) -> Result<(), StoreError> {
        let lease = Lease {
            reserved_until: needed + LEASE,
            acked: self.head.acked_link_seq,
            acked_link: self.head.acked_link.clone(),
        };
        let json = serde_json::to_vec(&lease)?;
        files::write_atomic(&self.lease_path, &json, Mode::Secret).map_err(StoreError::Lease)?;
        self.reserved_until = lease.reserved_until;
        Ok(())
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// A handle for reading records while the writer goes on.
    pub fn reader(&self) -> Reader {
        Reader {
            db: self.db.clone(),
        }
    }

    /// Bytes the file takes on disk.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Appends `batch` (and deletes records up to `ack`, if given) in one
    /// transaction, durable when this returns; returns the sequence numbers
    /// given. When the records do not fit in the bound, the oldest
    /// unacknowledged ones are replaced by one drop marker first.
    pub fn append<'a>(
        &mut self,
        batch: impl IntoIterator<Item = &'a NewRecord>,
        ack: Option<u64>,
    ) -> Result<Vec<u64>, StoreError> {
        let batch: Vec<&NewRecord> = batch.into_iter().collect();
        let before = self.head.clone();
        let result = self.append_inner(&batch, ack);
        if result.is_err() {
            self.head = before;
        }
        result
    }

    fn append_inner(
        &mut self,
        batch: &[&NewRecord],
        ack: Option<u64>,
    ) -> Result<Vec<u64>, StoreError> {
        let needed = self.head.next_seq + batch.len() as u64;
        if needed > self.reserved_until {
            self.write_lease(needed)?;
        }
        let path = self.path.clone();
        let err = |e: redb::Error| StoreError::storage(&path, e);
        let txn = self.begin()?;
        let mut seqs = Vec::with_capacity(batch.len());
        {
            let mut records = txn.open_table(RECORDS).map_err(|e| err(e.into()))?;
            if let Some(ack) = ack {
                self.delete_acked(&mut records, ack).map_err(err)?;
            }
            let mut encoded = Vec::with_capacity(batch.len());
            let mut size = 0;
            for new in batch {
                let body = self.encode(new)?;
                size += body.len() as u64 + RECORD_OVERHEAD;
                seqs.push(self.head.next_seq - 1);
                encoded.push(body);
            }
            if self.head.bytes + size > self.budget {
                // Free more than the batch needs, so that a full queue
                // grows its marker now and then, not on every record.
                let free = self.head.bytes + size - self.budget + self.budget / 16;
                self.drop_oldest(&mut records, free, batch.first().map_or(0, |r| r.time))?;
            }
            for (seq, body) in seqs.iter().zip(&encoded) {
                records
                    .insert(*seq, body.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            self.head.records += encoded.len() as u64;
            self.head.bytes += size;
        }
        self.put_head(&txn)?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(seqs)
    }

    /// Encodes `new` as the next record and moves the head past it.
    fn encode(&mut self, new: &NewRecord) -> Result<Vec<u8>, StoreError> {
        let parts = &new.parts;
        let mut record = RecordRef {
            v: SCHEMA_VERSION,
            seq: self.head.next_seq,
            time: new.time,
            prev: &self.head.link,
            actor: &parts.actor,
            kind: &parts.kind,
            subject: &parts.subject,
            details: &parts.details,
        };
        let mut body = Vec::with_capacity(256);
        serde_json::to_writer(&mut body, &record)?;
        let truncated = serde_json::json!({ "truncated": true });
        if body.len() > MAX_RECORD {
            record.details = &truncated;
            record.subject = cut_str(record.subject, 256);
            body.clear();
            serde_json::to_writer(&mut body, &record)?;
        }
        self.head.link = audit::to_hex(&audit::hash(&body));
        self.head.next_seq += 1;
        Ok(body)
    }

    /// Deletes records up to `ack` (at most up to the last one written).
    fn delete_acked(
        &mut self,
        records: &mut redb::Table<'_, u64, &[u8]>,
        ack: u64,
    ) -> Result<(), redb::Error> {
        let ack = ack.min(self.head.next_seq - 1);
        if ack <= self.head.acked {
            return Ok(());
        }
        let mut last = None;
        for entry in records.extract_from_if(..=ack, |_, _| true)? {
            let (seq, body) = entry?;
            let body = body.value();
            self.head.records -= 1;
            self.head.bytes = self
                .head
                .bytes
                .saturating_sub(body.len() as u64 + RECORD_OVERHEAD);
            last = Some((seq.value(), body.to_vec()));
        }
        if let Some((seq, body)) = last
            && let Ok(record) = Record::parse(&body)
        {
            self.head.acked_link = audit::to_hex(&audit::link(&record, &body));
            self.head.acked_link_seq = seq;
        }
        self.head.acked = ack;
        Ok(())
    }

    /// Replaces the oldest unacknowledged records, at least `free` counted
    /// bytes of them, with one `events_dropped` marker at the last one's
    /// sequence number. An older marker among them is merged into it.
    fn drop_oldest(
        &mut self,
        records: &mut redb::Table<'_, u64, &[u8]>,
        free: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e: redb::Error| StoreError::storage(&path, e);
        let mut freed = 0;
        let mut first: Option<(u64, String)> = None;
        let mut count = 0u64;
        // Events dropped now (an older marker's are counted already).
        let mut events = 0u64;
        let mut last: Option<(u64, [u8; 32])> = None;
        while freed < free {
            let Some((seq, body)) = records.pop_first().map_err(|e| err(e.into()))? else {
                break;
            };
            let (seq, body) = (seq.value(), body.value().to_vec());
            freed += body.len() as u64 + RECORD_OVERHEAD;
            self.head.records -= 1;
            let record = Record::parse(&body).ok();
            let marker = record
                .as_ref()
                .and_then(|r| r.dropped())
                .and_then(Result::ok);
            if first.is_none() {
                first = Some(match (&marker, &record) {
                    (Some(d), Some(r)) => (d.first_seq, r.prev.clone()),
                    (_, Some(r)) => (seq, r.prev.clone()),
                    _ => (seq, self.head.acked_link.clone()),
                });
            }
            match &marker {
                Some(d) => count += d.count.unwrap_or(0),
                None => {
                    count += 1;
                    events += 1;
                }
            }
            let link = match &record {
                Some(r) => audit::link(r, &body),
                None => audit::hash(&body),
            };
            last = Some((seq, link));
        }
        self.head.bytes = self.head.bytes.saturating_sub(freed);
        let (Some((first_seq, prev)), Some((last_seq, next_prev))) = (first, last) else {
            return Ok(());
        };
        let dropped = Dropped {
            first_seq,
            last_seq,
            count: Some(count),
            reason: "queue_full".into(),
            next_prev: Some(audit::to_hex(&next_prev)),
        };
        let body = marker(&dropped, now_ms, &prev, String::new())?;
        records
            .insert(last_seq, body.as_slice())
            .map_err(|e| err(e.into()))?;
        self.head.records += 1;
        self.head.bytes += body.len() as u64 + RECORD_OVERHEAD;
        self.head.dropped += events;
        tracing::warn!(
            first_seq,
            last_seq,
            count,
            "the audit queue is full: the oldest events not yet shipped were replaced by a drop marker"
        );
        Ok(())
    }
}

/// A record borrowed for encoding: the same JSON as [`Record`], without
/// copying the event's parts.
#[derive(Serialize)]
struct RecordRef<'a> {
    v: u32,
    seq: u64,
    time: u64,
    prev: &'a str,
    actor: &'a Actor,
    #[serde(rename = "type")]
    kind: &'a str,
    subject: &'a str,
    details: &'a serde_json::Value,
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The bytes of an `events_dropped` record for `dropped` (its own sequence
/// number is `dropped.last_seq`).
fn marker(
    dropped: &Dropped,
    time: u64,
    prev: &str,
    subject: String,
) -> Result<Vec<u8>, StoreError> {
    let record = Record {
        v: SCHEMA_VERSION,
        seq: dropped.last_seq,
        time,
        prev: prev.to_owned(),
        actor: Actor {
            kind: ActorKind::Agent,
            name: None,
        },
        kind: EVENTS_DROPPED.into(),
        subject,
        details: serde_json::to_value(dropped)?,
    };
    Ok(serde_json::to_vec(&record)?)
}

fn read_lease(path: &Path) -> Option<Lease> {
    let bytes = files::read_bounded(path, 4096).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Reads records while the writer goes on (redb's readers see the last
/// committed state).
#[derive(Clone, Debug)]
pub struct Reader {
    db: Arc<Database>,
}

impl Reader {
    /// Records from `from` on, at most `max_records` of them and about
    /// `max_bytes` (at least one record).
    pub fn read_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, redb::Error> {
        let txn = self.db.begin_read()?;
        let records = match txn.open_table(RECORDS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in records.range(from..)? {
            let (seq, body) = entry?;
            bytes += body.value().len();
            out.push((seq.value(), Bytes::copy_from_slice(body.value())));
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
