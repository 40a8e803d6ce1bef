//! The device's durable audit trail: every event is kept on the device
//! until the platform has stored it, in order, hash-chained, and shipped
//! with the device's signed checkpoints (`docs/audit-events.md`,
//! `docs/protocol.md` §17).
//!
//! [`AuditQueue`] is the one way to record: [`AuditQueue::record_durable`]
//! returns once the event is on disk; [`Audit::record`] hands it over and
//! returns at once (the editor proxy and the tunnel never wait on a disk).
//! Both go to one writer thread that commits everything waiting in one
//! redb transaction (group commit: many producers, one fsync). [`ship`]
//! sends the records on the tunnel's `audit` stream and deletes them once
//! acknowledged; [`store`] owns the file.
//!
//! This module owns recording, its bounds and the writer thread. It never
//! decides what is worth recording (the callers do), never logs a secret
//! (events carry none, see [`event`]), and never relies on the journal:
//! the log line each event gets is for diagnostics only.

pub mod event;
pub mod ship;
pub mod store;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

pub use event::{AuditEvent, SnapshotOutcome};
use store::{NewRecord, Reader, Store};

use crate::clock::Clock;

/// Events waiting for the writer, at most. Beyond it an event handed over
/// with [`Audit::record`] is counted as lost (and an `events_lost` record
/// says so once the store takes records again); a durable recording fails.
pub const MAX_PENDING: usize = 65_536;
/// Most records one commit takes.
const MAX_BATCH: usize = 2048;
/// How long the writer waits for the producers its last commit released
/// before it commits what it has.
const GATHER: Duration = Duration::from_micros(200);
/// How long the writer waits before trying a failed store again.
const RETRY: Duration = Duration::from_secs(1);

/// Where audit events go.
pub trait Audit: Send + Sync + std::fmt::Debug {
    /// Hands `event` over without waiting for the disk.
    fn record(&self, event: AuditEvent);
}

/// Why an event could not be recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Store(String),
    #[error(
        "too many audit events are waiting for the disk ({MAX_PENDING}); help: see the audit store's error in 'tetherd status'"
    )]
    Busy,
    #[error("the audit queue is closed (the agent is stopping)")]
    Closed,
}

/// The queue's figures, for status and heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Records on disk, not yet acknowledged.
    pub queued: u64,
    /// Their counted size, bytes.
    pub queued_bytes: u64,
    /// The store file's size on disk, bytes.
    pub file_bytes: u64,
    /// The last sequence number given (0 for none).
    pub last_seq: u64,
    /// The highest sequence number the platform acknowledged.
    pub acked: u64,
    /// Events replaced by drop markers since the store was made.
    pub dropped: u64,
    /// Events lost from memory while the store could not be written.
    pub lost: u64,
    /// The store's current error (a full disk), cleared once it writes.
    pub error: Option<String>,
    /// Commits since the queue was opened, and the time they took.
    pub commits: u64,
    pub commit_micros: u64,
}

impl From<QueueStats> for tether_proto::control::AuditHealth {
    fn from(s: QueueStats) -> Self {
        tether_proto::control::AuditHealth {
            queued: s.queued,
            file_bytes: s.file_bytes,
            last_seq: s.last_seq,
            dropped: s.dropped,
            lost: s.lost,
            error: s.error,
        }
    }
}

type Done = oneshot::Sender<Result<u64, AuditError>>;

struct Item {
    record: NewRecord,
    done: Option<Done>,
}

#[derive(Default)]
struct Pending {
    items: VecDeque<Item>,
    ack: Option<u64>,
    stop: bool,
    /// Handed-over events dropped from memory; recorded as `events_lost`.
    lost: u64,
}

struct Inner {
    pending: Mutex<Pending>,
    wake: Condvar,
    clock: Clock,
    stats: Mutex<QueueStats>,
    reader: Mutex<Option<Reader>>,
    /// The last committed sequence number; the shipper waits on it.
    committed: watch::Sender<u64>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditQueue").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The durable audit queue (see the module docs).
#[derive(Debug)]
pub struct AuditQueue {
    inner: Arc<Inner>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AuditQueue {
    /// Opens the store in `dir` (bounded at `max_bytes`) and starts the
    /// writer thread. A store that cannot be read is moved aside and a new
    /// chain started (see [`Store::open`]); the report is logged and kept
    /// in the stats' error until the next write.
    pub fn open(dir: &Path, max_bytes: u64, clock: Clock) -> Result<AuditQueue, AuditError> {
        let opened = Store::open(dir, max_bytes, unix_ms(&clock))
            .map_err(|e| AuditError::Store(e.to_string()))?;
        if let Some(report) = &opened.recovered {
            error!("{report}");
        }
        let store = opened.store;
        let head = store.head().clone();
        let stats = QueueStats {
            queued: head.records,
            queued_bytes: head.bytes,
            file_bytes: store.file_size(),
            last_seq: head.next_seq - 1,
            acked: head.acked,
            dropped: head.dropped,
            lost: 0,
            error: opened.recovered,
            commits: 0,
            commit_micros: 0,
        };
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            clock,
            stats: Mutex::new(stats),
            reader: Mutex::new(Some(store.reader())),
            committed: watch::channel(head.next_seq - 1).0,
        });
        let dir = dir.to_owned();
        let thread_inner = inner.clone();
        let writer = std::thread::Builder::new()
            .name("tetherd-audit".into())
            .spawn(move || write_loop(&thread_inner, Some(store), &dir, max_bytes))
            .map_err(|e| AuditError::Store(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditQueue {
            inner,
            writer: Mutex::new(Some(writer)),
        })
    }

    fn now_ms(&self) -> u64 {
        unix_ms(&self.inner.clock)
    }

    fn push(
        &self,
        parts: event::Parts,
        done: Option<Done>,
    ) -> Result<(), (AuditError, Option<Done>)> {
        let record = NewRecord {
            time: self.now_ms(),
            parts,
        };
        let mut pending = lock(&self.inner.pending);
        if pending.stop {
            return Err((AuditError::Closed, done));
        }
        if pending.items.len() >= MAX_PENDING {
            if done.is_some() {
                return Err((AuditError::Busy, done));
            }
            pending.lost += 1;
            return Ok(());
        }
        pending.items.push_back(Item { record, done });
        drop(pending);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Records `event` and returns its sequence number once it is on disk.
    pub async fn record_durable(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let parts = event.parts();
        parts.log();
        let (tx, rx) = oneshot::channel();
        if let Err((e, _)) = self.push(parts, Some(tx)) {
            return Err(e);
        }
        rx.await.unwrap_or(Err(AuditError::Closed))
    }

    /// The platform stored every record up to `seq`: they may be deleted
    /// (with the writer's next commit).
    pub fn ack(&self, seq: u64) {
        let mut pending = lock(&self.inner.pending);
        pending.ack = Some(pending.ack.map_or(seq, |a| a.max(seq)));
        drop(pending);
        self.inner.wake.notify_one();
    }

    pub fn stats(&self) -> QueueStats {
        lock(&self.inner.stats).clone()
    }

    /// A reader of the committed records, unless the store is closed after
    /// an error.
    pub fn reader(&self) -> Option<Reader> {
        lock(&self.inner.reader).clone()
    }

    /// The last committed sequence number, announced on every commit.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.inner.committed.subscribe()
    }

    /// Writes what is waiting, then stops the writer. Bounded: a store
    /// that cannot be written is given up on after one more try.
    pub fn close(&self) {
        lock(&self.inner.pending).stop = true;
        self.inner.wake.notify_one();
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
    }
}

impl Drop for AuditQueue {
    fn drop(&mut self) {
        self.close();
    }
}

impl Audit for AuditQueue {
    fn record(&self, event: AuditEvent) {
        let parts = event.parts();
        parts.log();
        if let Err((e, _)) = self.push(parts, None) {
            warn!(cause = %e, "an audit event was not queued");
        }
    }
}

/// Milliseconds since the Unix epoch on the agent's clock.
pub fn unix_ms(clock: &Clock) -> u64 {
    clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The writer thread: takes what is waiting, commits it in one
/// transaction, answers the producers; on a failed store, keeps what it
/// can in memory and tries again every [`RETRY`].
fn write_loop(inner: &Inner, mut store: Option<Store>, dir: &Path, max_bytes: u64) {
    // Producers that waited for the last commit: they come back together,
    // a moment apart, and are worth a short wait (see below).
    let mut last_waiters = 0usize;
    loop {
        let (batch, ack, lost, stop) = {
            let mut pending = lock(&inner.pending);
            while pending.items.is_empty() && pending.ack.is_none() && !pending.stop {
                pending = inner
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            // Group commit: producers the last commit released record again
            // within microseconds of each other; committing as soon as the
            // first is back would make every other commit hold only a few.
            // Wait up to GATHER for them all, never when there is nothing
            // to wait for (one producer waits on its own commit).
            let deadline = std::time::Instant::now() + GATHER;
            while last_waiters > 1 && pending.items.len() < last_waiters && !pending.stop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                pending = inner
                    .wake
                    .wait_timeout(pending, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let n = pending.items.len().min(MAX_BATCH);
            let batch: Vec<Item> = pending.items.drain(..n).collect();
            let lost = std::mem::take(&mut pending.lost);
            (batch, pending.ack.take(), lost, pending.stop)
        };
        if store.is_none() {
            store = reopen(inner, dir, max_bytes);
        }
        let Some(open) = store.as_mut() else {
            // Still failing: durable producers hear so now; handed-over
            // events wait in memory (bounded) for the next try.
            give_back(inner, batch, ack, lost, "the audit store cannot be opened");
            if stop {
                return;
            }
            std::thread::sleep(RETRY);
            continue;
        };
        let lost_record = (lost > 0).then(|| NewRecord {
            time: unix_ms(&inner.clock),
            parts: AuditEvent::EventsLost {
                count: lost,
                reason: "the audit store could not be written (disk full?)".into(),
            }
            .parts(),
        });
        let records = batch.iter().map(|i| &i.record).chain(lost_record.as_ref());
        last_waiters = batch.iter().filter(|i| i.done.is_some()).count();
        let started = std::time::Instant::now();
        let appended = open.append(records, ack);
        let took = started.elapsed().as_micros() as u64;
        match appended {
            Ok(seqs) => {
                let head = open.head().clone();
                let mut stats = lock(&inner.stats);
                let recovered = stats.error.take().is_some();
                *stats = QueueStats {
                    queued: head.records,
                    queued_bytes: head.bytes,
                    file_bytes: if seqs.is_empty() {
                        stats.file_bytes
                    } else {
                        open.file_size()
                    },
                    last_seq: head.next_seq - 1,
                    acked: head.acked,
                    dropped: head.dropped,
                    lost: stats.lost,
                    error: None,
                    commits: stats.commits + 1,
                    commit_micros: stats.commit_micros + took,
                };
                drop(stats);
                if recovered {
                    info!("the audit store writes again");
                }
                inner.committed.send_replace(head.next_seq - 1);
                // Last: a producer that hears back sees the figures (and
                // the committed number) that include its event.
                for (item, seq) in batch.into_iter().zip(&seqs) {
                    if let Some(done) = item.done {
                        let _ = done.send(Ok(*seq));
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                if e.needs_reopen() {
                    store = None;
                    *lock(&inner.reader) = None;
                }
                give_back(inner, batch, ack, lost, &message);
                if !stop {
                    std::thread::sleep(RETRY);
                }
            }
        }
        if stop && lock(&inner.pending).items.is_empty() {
            return;
        }
    }
}

/// Opens the store again after an error, if it can.
fn reopen(inner: &Inner, dir: &Path, max_bytes: u64) -> Option<Store> {
    match Store::open(dir, max_bytes, unix_ms(&inner.clock)) {
        Ok(opened) => {
            if let Some(report) = opened.recovered {
                error!("{report}");
            }
            *lock(&inner.reader) = Some(opened.store.reader());
            Some(opened.store)
        }
        Err(e) => {
            set_error(inner, e.to_string());
            None
        }
    }
}

fn set_error(inner: &Inner, message: String) {
    let mut stats = lock(&inner.stats);
    if stats.error.as_deref() != Some(message.as_str()) {
        error!(cause = %message, "the audit store cannot be written");
    }
    stats.error = Some(message);
}

/// After a failed commit: durable producers get the error; handed-over
/// events go back to the front of the queue (those beyond
/// [`MAX_PENDING`] are counted lost); the ack is kept for the next try.
fn give_back(inner: &Inner, batch: Vec<Item>, ack: Option<u64>, lost: u64, message: &str) {
    set_error(inner, message.to_owned());
    let mut pending = lock(&inner.pending);
    pending.lost += lost;
    if let Some(ack) = ack {
        pending.ack = Some(pending.ack.map_or(ack, |a| a.max(ack)));
    }
    for item in batch.into_iter().rev() {
        match item.done {
            Some(done) => {
                let _ = done.send(Err(AuditError::Store(message.to_owned())));
            }
            None if pending.items.len() < MAX_PENDING => pending.items.push_front(item),
            None => pending.lost += 1,
        }
    }
    let lost = pending.lost;
    drop(pending);
    lock(&inner.stats).lost = lost;
}

#[cfg(test)]
mod tests;
