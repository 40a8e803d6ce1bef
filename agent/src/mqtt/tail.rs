//! The outbox's write-behind tail (decision 26): QoS 1 messages from the
//! local broker, numbered and on their way to the platform, that are not
//! on disk.
//!
//! While a stream is up, a batch of QoS 1 messages from the local broker
//! is held here instead of being written and synced: the stream sends it
//! from memory (after what the outbox file holds), and the local broker
//! gets its acknowledgement once the platform has the message. The tail goes to the outbox file (and the local broker is
//! acknowledged then) when a batch would pass its bounds, when its oldest
//! message has waited [`MAX_AGE`], when a batch holds anything but valid
//! QoS 1 messages, and when the stream ends. A message the local broker
//! has acknowledged is therefore always on the device's disk or in the
//! platform's broker; one it has not, it delivers again after a crash.
//!
//! This module also owns the numbering of messages, for both paths: a
//! held message takes a number only below what the outbox file has
//! reserved, so numbers are never reused after a crash.
//!
//! It is state only: no I/O, and no clock it is not handed. Its callers
//! acknowledge the local broker with the receipts it returns while still
//! holding it, so acknowledgements leave in the order messages came.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tether_mqtt_client::QoS;
use tether_proto::mqtt::Message;

/// Messages held at most: four of the stream's windows, so that the local
/// broker keeps delivering while a window is on its way to the platform.
pub const MAX_MESSAGES: usize = 4 * super::stream::WINDOW_MESSAGES;
/// Bytes of messages held at most.
pub const MAX_BYTES: usize = 2 * super::stream::WINDOW_BYTES;
/// How long a message is held at most before it goes to disk: the
/// platform is slow, and the local broker should not keep waiting.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// How long a batch waits for room in a full tail before everything goes
/// to disk: the platform acknowledges a window at a time, and a local
/// broker faster than the platform must not be held back for long (its
/// own queue is bounded).
pub const FULL_WAIT: Duration = Duration::from_millis(100);
/// Numbers the outbox file reserves at once for held messages (one synced
/// write per this many).
pub const RESERVE: u64 = 65_536;

/// Where a message from the local broker came from: what acknowledges it
/// there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub connection: u64,
    pub pkid: u16,
    pub qos: QoS,
}

#[derive(Debug)]
struct Held {
    seq: u64,
    message: Message,
    receipt: Receipt,
    size: usize,
    at: Instant,
}

/// What to do with a batch from the local broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Hold it ([`Tail::hold`]).
    Hold,
    /// The tail has no room for it now: wait a moment for the platform to
    /// release some ([`FULL_WAIT`]), else store it.
    Full,
    /// Reserve numbers up to (not including) this in the outbox file
    /// first, then ask again.
    Reserve(u64),
    /// Write it to the outbox file with everything held ([`Tail::plan`]).
    Store,
}

/// What goes to the outbox file in one append: everything held, then the
/// batch, numbered.
#[derive(Debug)]
pub struct Plan {
    pub records: Vec<(u64, Message)>,
    /// The last held message in `records` (0: none).
    held_through: u64,
}

/// What an append of a [`Plan`] settled.
#[derive(Debug, Default)]
pub struct Stored {
    /// Held messages now on disk, for the local broker, in order.
    pub receipts: Vec<Receipt>,
    /// The platform acknowledged held messages while they were being
    /// written: they are on disk too and can be deleted up to here.
    pub delete_through: Option<u64>,
}

/// The tail and the numbering.
#[derive(Debug)]
pub struct Tail {
    held: VecDeque<Held>,
    bytes: usize,
    /// The number the next message gets.
    next: u64,
    /// Numbers below this are reserved in the outbox file.
    reserved: u64,
    /// The highest number ever written to the outbox file.
    durable: u64,
    /// A stream is up.
    streaming: bool,
}

impl Tail {
    /// A tail numbering from `next` (the outbox file's next number) after
    /// `durable` (the highest number it has written).
    pub fn new(next: u64, durable: u64) -> Tail {
        Tail {
            held: VecDeque::new(),
            bytes: 0,
            next,
            reserved: next,
            durable,
            streaming: false,
        }
    }

    /// Messages held and their bytes.
    pub fn len(&self) -> (usize, usize) {
        (self.held.len(), self.bytes)
    }

    /// Where a batch of `count` messages of `bytes` goes; `eligible`:
    /// every one is a valid QoS 1 message.
    pub fn route(&self, count: usize, bytes: usize, eligible: bool) -> Route {
        if !eligible || !self.streaming || count > MAX_MESSAGES || bytes > MAX_BYTES {
            return Route::Store;
        }
        if self.held.len() + count > MAX_MESSAGES || self.bytes + bytes > MAX_BYTES {
            return Route::Full;
        }
        let end = self.next + count as u64;
        if end > self.reserved {
            return Route::Reserve(end + RESERVE);
        }
        Route::Hold
    }

    /// The outbox file has reserved numbers below `upto`.
    pub fn reserved(&mut self, upto: u64) {
        self.reserved = self.reserved.max(upto);
    }

    /// Holds `batch` (after [`Route::Hold`]); returns the first number.
    pub fn hold(&mut self, batch: Vec<(Message, Receipt)>, now: Instant) -> u64 {
        let first = self.next;
        for (message, receipt) in batch {
            let size = message.size();
            self.bytes += size;
            self.held.push_back(Held {
                seq: self.next,
                message,
                receipt,
                size,
                at: now,
            });
            self.next += 1;
        }
        debug_assert!(self.next <= self.reserved);
        first
    }

    /// Numbers `batch` after everything held, for one append to the
    /// outbox file. The held messages stay held (and readable) until
    /// [`Tail::stored`].
    pub fn plan(&mut self, batch: Vec<Message>) -> Plan {
        let mut records: Vec<(u64, Message)> = self
            .held
            .iter()
            .map(|h| (h.seq, h.message.clone()))
            .collect();
        let held_through = self.held.back().map_or(0, |h| h.seq);
        for message in batch {
            records.push((self.next, message));
            self.next += 1;
        }
        Plan {
            records,
            held_through,
        }
    }

    /// `plan` is on disk: what was held of it is released.
    pub fn stored(&mut self, plan: &Plan) -> Stored {
        let mut stored = Stored::default();
        if let Some((last, _)) = plan.records.last() {
            self.durable = self.durable.max(*last);
            self.reserved = self.reserved.max(last + 1);
        }
        if plan.held_through == 0 {
            return stored;
        }
        let first_planned = plan.records.first().map_or(0, |(seq, _)| *seq);
        match self.held.front() {
            // Everything planned was acknowledged meanwhile.
            None => stored.delete_through = Some(plan.held_through),
            Some(h) if h.seq > plan.held_through => {
                stored.delete_through = Some(plan.held_through);
            }
            Some(h) if h.seq > first_planned => stored.delete_through = Some(h.seq - 1),
            Some(_) => {}
        }
        while self
            .held
            .front()
            .is_some_and(|h| h.seq <= plan.held_through)
        {
            let h = self.held.pop_front().expect("front exists");
            self.bytes -= h.size;
            stored.receipts.push(h.receipt);
        }
        stored
    }

    /// The platform has every message up to `seq`: the held ones among
    /// them are released, for the local broker, in order.
    pub fn acked(&mut self, seq: u64) -> Vec<Receipt> {
        let mut receipts = Vec::new();
        while self.held.front().is_some_and(|h| h.seq <= seq) {
            let h = self.held.pop_front().expect("front exists");
            self.bytes -= h.size;
            receipts.push(h.receipt);
        }
        receipts
    }

    /// Held messages after `after` for the stream, at most `max`, if they
    /// are next: the stream has sent everything on disk, or `disk_empty`
    /// (the outbox file has nothing after `after`). `None`: read the disk
    /// first.
    pub fn read(&self, after: u64, disk_empty: bool, max: usize) -> Option<Vec<(u64, Message)>> {
        if !disk_empty && after < self.durable {
            return None;
        }
        let from = self.held.partition_point(|h| h.seq <= after);
        Some(
            self.held
                .range(from..)
                .take(max)
                .map(|h| (h.seq, h.message.clone()))
                .collect(),
        )
    }

    /// A stream is up: batches may be held.
    pub fn stream_started(&mut self) {
        self.streaming = true;
    }

    /// The stream ended: what is held goes to disk now ([`Tail::due`]).
    pub fn stream_ended(&mut self) {
        self.streaming = false;
    }

    /// New messages are numbered from `next` on if that is higher.
    pub fn skip_to(&mut self, next: u64) {
        self.next = self.next.max(next);
        self.reserved = self.reserved.max(next);
    }

    /// When what is held must go to disk: at once without a stream, else
    /// when the oldest has waited [`MAX_AGE`].
    pub fn due(&self) -> Option<Instant> {
        let oldest = self.held.front()?.at;
        Some(if self.streaming {
            oldest + MAX_AGE
        } else {
            oldest
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tether_proto::mqtt::Properties;

    fn batch(n: usize, connection: u64) -> Vec<(Message, Receipt)> {
        (0..n)
            .map(|i| {
                (
                    Message {
                        topic: format!("tether/t/d/out/{i}"),
                        qos: 1,
                        retain: false,
                        properties: Properties::default(),
                        payload: Bytes::from_static(b"0123456789"),
                    },
                    Receipt {
                        connection,
                        pkid: i as u16 + 1,
                        qos: QoS::AtLeastOnce,
                    },
                )
            })
            .collect()
    }

    /// A tail numbering from 1 with a stream up and numbers reserved.
    fn streaming() -> Tail {
        let mut tail = Tail::new(1, 0);
        tail.stream_started();
        tail.reserved(1000);
        tail
    }

    fn pkids(receipts: &[Receipt]) -> Vec<u16> {
        receipts.iter().map(|r| r.pkid).collect()
    }

    #[test]
    fn a_batch_is_held_only_while_a_stream_is_up_and_read_after_the_disk() {
        let mut tail = Tail::new(101, 100);
        assert_eq!(tail.route(3, 30, true), Route::Store, "no stream");
        tail.stream_started();
        assert_eq!(tail.route(3, 30, false), Route::Store, "QoS 2 or refused");
        assert_eq!(
            tail.route(3, 30, true),
            Route::Reserve(104 + RESERVE),
            "numbers are reserved on disk before they are handed out"
        );
        tail.reserved(104 + RESERVE);
        assert_eq!(tail.route(3, 30, true), Route::Hold);
        assert_eq!(tail.route(MAX_MESSAGES + 1, 30, true), Route::Store);
        assert_eq!(tail.route(1, MAX_BYTES + 1, true), Route::Store);
        let now = Instant::now();
        assert_eq!(tail.hold(batch(3, 1), now), 101);
        assert_eq!(tail.route(MAX_MESSAGES - 2, 30, true), Route::Full);
        assert_eq!(tail.route(1, MAX_BYTES - 30, true), Route::Full);
        assert_eq!(tail.len().0, 3);
        // 100 is on disk and unsent: the stream reads the disk first.
        assert_eq!(tail.read(99, false, 10), None);
        // Then the held ones from memory, after what it sent.
        assert_eq!(tail.read(100, false, 10).unwrap().len(), 3);
        let read = tail.read(101, false, 10).unwrap();
        assert_eq!(read.iter().map(|r| r.0).collect::<Vec<_>>(), [102, 103]);
        assert_eq!(tail.read(101, false, 1).unwrap().len(), 1);
        assert_eq!(tail.due(), Some(now + MAX_AGE));
        tail.stream_ended();
        assert_eq!(tail.due(), Some(now), "no stream: to disk at once");
        assert_eq!(tail.route(1, 10, true), Route::Store);
    }

    #[test]
    fn the_platforms_acknowledgement_releases_held_messages_in_order() {
        let mut tail = streaming();
        let now = Instant::now();
        tail.hold(batch(3, 1), now);
        tail.hold(batch(2, 2), now);
        assert_eq!(pkids(&tail.acked(2)), [1, 2]);
        assert!(tail.acked(2).is_empty(), "once only");
        let rest = tail.acked(10);
        assert_eq!(pkids(&rest), [3, 1, 2]);
        assert_eq!(rest[2].connection, 2);
        assert_eq!(tail.len(), (0, 0));
        assert_eq!(tail.due(), None);
    }

    #[test]
    fn stored_releases_what_is_held_behind_the_batch_and_numbers_follow() {
        let mut tail = streaming();
        let now = Instant::now();
        tail.hold(batch(3, 1), now);
        let new: Vec<Message> = batch(2, 1).into_iter().map(|(m, _)| m).collect();
        let plan = tail.plan(new);
        let seqs: Vec<u64> = plan.records.iter().map(|r| r.0).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5], "held first, then the batch");
        // Until the append lands the stream still reads them from memory.
        assert_eq!(tail.read(0, false, 10).unwrap().len(), 3);
        // The platform acknowledged 1 while the append ran: its receipt
        // went then; 1 is on disk and may be deleted.
        assert_eq!(pkids(&tail.acked(1)), [1]);
        let stored = tail.stored(&plan);
        assert_eq!(pkids(&stored.receipts), [2, 3]);
        assert_eq!(stored.delete_through, Some(1));
        assert_eq!(tail.len(), (0, 0));
        // New messages are held behind 4 and 5, which are on disk and
        // are read from there first.
        assert_eq!(tail.route(1, 10, true), Route::Hold);
        assert_eq!(tail.hold(batch(1, 1), now), 6);
        assert_eq!(tail.read(3, false, 10), None, "4 and 5 are on disk");
        assert_eq!(tail.read(3, true, 10).unwrap()[0].0, 6);
        assert_eq!(tail.read(5, false, 10).unwrap()[0].0, 6);

        // Everything held acknowledged during the append.
        let plan = tail.plan(Vec::new());
        assert_eq!(pkids(&tail.acked(6)), [1]);
        let stored = tail.stored(&plan);
        assert!(stored.receipts.is_empty());
        assert_eq!(stored.delete_through, Some(6));
        // Nothing acknowledged during it: nothing to delete.
        tail.hold(batch(2, 1), now);
        let plan = tail.plan(Vec::new());
        let stored = tail.stored(&plan);
        assert_eq!(
            (pkids(&stored.receipts), stored.delete_through),
            (vec![1, 2], None)
        );
    }

    #[test]
    fn skipping_ahead_moves_numbering_and_reservation() {
        let mut tail = Tail::new(10, 9);
        tail.stream_started();
        tail.skip_to(500);
        assert_eq!(tail.route(2, 10, true), Route::Reserve(502 + RESERVE));
        tail.reserved(502 + RESERVE);
        assert_eq!(tail.route(2, 10, true), Route::Hold);
        assert_eq!(tail.hold(batch(2, 1), Instant::now()), 500);
        tail.skip_to(100);
        assert_eq!(tail.hold(batch(1, 1), Instant::now()), 502, "never lowered");
    }
}
