//! The two-peer harness of the unit tests: [`Pair`], a [`Link`] between a
//! device and a platform [`Connection`] that records what each side sent and
//! received, with conveniences for the tests on top.
//!
//! The link, the simulated clock and the checks on every transmitted frame
//! (it decodes, fits the receiver's `max_frame_payload`, and DATA fits the
//! sender's `data_split` and the credit the receiver granted) are
//! [`crate::testing`]'s, shared with the property tests and the fuzz targets.
//! A failed check panics here. So every test checks flow control, whatever it
//! is about.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codes::CloseCode;
use crate::config::Config;
use crate::connection::{Connection, ConnectionError, Event, ReadError, WriteError};
use crate::frame::{Frame, StreamId};
use crate::hello::Role;
use crate::service::{Service, ServiceHeader};
use crate::testing::{Failure, Link};

pub(super) use crate::testing::MAX_STEPS;
pub(super) use crate::testing::Side::{self, Device, Platform};

/// One-way latency of [`Pair::new`].
pub(super) const LATENCY: Duration = Duration::from_millis(10);

/// A device and a platform joined by a simulated link, recording every frame
/// each side sent and every message it received.
pub(super) struct Pair {
    pub(super) link: Link,
}

/// Default configs for both ends.
pub(super) fn configs() -> (Config, Config) {
    (Config::new(Role::Device), Config::new(Role::Platform))
}

/// A header for a TCP stream to the local Node-RED.
pub(super) fn tcp() -> ServiceHeader {
    ServiceHeader::new(Service::Tcp("node-red".into()))
}

/// `len` bytes of a pattern that makes misordered or lost bytes visible.
pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

/// The value, or a panic with the harness's report of what failed.
fn checked<T>(result: Result<T, Failure>) -> T {
    result.unwrap_or_else(|failure| panic!("{failure}"))
}

impl Pair {
    /// Two connections, created now, with nothing sent yet.
    pub(super) fn new(device: Config, platform: Config) -> Pair {
        let mut link = Link::new(device, platform, LATENCY).expect("configs are valid");
        link.record = true;
        Pair { link }
    }

    /// Two connections with default configs, handshake done.
    pub(super) fn connected() -> Pair {
        let (device, platform) = configs();
        Pair::connected_with(device, platform)
    }

    /// Two connections, handshake done and its events consumed.
    pub(super) fn connected_with(device: Config, platform: Config) -> Pair {
        let mut pair = Pair::new(device, platform);
        pair.drive();
        assert_eq!(pair.events(Device), [Event::Connected], "device handshake");
        assert_eq!(
            pair.events(Platform),
            [Event::Connected],
            "platform handshake"
        );
        pair
    }

    pub(super) fn conn(&mut self, who: Side) -> &mut Connection {
        self.link.conn_mut(who)
    }

    /// Takes the events `who` raised so far.
    pub(super) fn events(&mut self, who: Side) -> Vec<Event> {
        let conn = self.conn(who);
        std::iter::from_fn(|| conn.poll_event()).collect()
    }

    /// Fires `who`'s timer if due and puts everything it has to send on the
    /// link. Returns true if anything happened.
    pub(super) fn transmit(&mut self, who: Side) -> bool {
        checked(self.link.transmit(who))
    }

    /// One round: both sides transmit, then time moves to the next arrival
    /// (or to an earlier timer, while messages are in flight) and what is due
    /// is delivered. Returns false once nothing happened and nothing is in
    /// flight.
    pub(super) fn step(&mut self) -> bool {
        checked(self.link.step())
    }

    /// Moves messages until both sides are idle: nothing to send, nothing
    /// in flight. Timers fire only while messages are in flight, so keepalive
    /// does not keep this running forever.
    pub(super) fn drive(&mut self) {
        checked(self.link.drive())
    }

    /// Lets `duration` of simulated time pass, delivering messages and firing
    /// timers in time order, then transmits what is due at the end.
    pub(super) fn advance(&mut self, duration: Duration) {
        self.advance_to(self.link.now + duration);
    }

    /// Lets simulated time pass until `target`; see [`Pair::advance`].
    pub(super) fn advance_to(&mut self, target: Instant) {
        checked(self.link.advance_to(target));
        self.transmit(Device);
        self.transmit(Platform);
    }

    /// Delivers the next message in flight to `to`, whenever it is due, and
    /// returns it decoded. Nothing is transmitted in answer.
    pub(super) fn deliver_one(&mut self, to: Side) -> Option<Frame> {
        let msg = self.link.deliver_one(to)?;
        Frame::decode(&msg).ok()
    }

    /// Feeds raw bytes to `to` as if the peer had sent them, bypassing the
    /// peer's state machine and the link.
    pub(super) fn inject(&mut self, to: Side, msg: impl Into<Bytes>) {
        self.link.receive(to, msg.into());
    }

    /// Frames in flight toward `to`, decoded.
    pub(super) fn in_flight(&self, to: Side) -> Vec<Frame> {
        self.link
            .peer(to)
            .inbound
            .iter()
            .map(|(_, msg)| Frame::decode(msg).expect("checked when sent"))
            .collect()
    }

    /// Frames `who` transmitted so far.
    pub(super) fn sent(&self, who: Side) -> Vec<Frame> {
        let sent = &self.link.peer(who).sent;
        sent.iter().map(|(_, f)| f.clone()).collect()
    }

    /// Forgets the frames both sides transmitted so far.
    pub(super) fn clear_sent(&mut self) {
        for peer in &mut self.link.peers {
            peer.sent.clear();
        }
    }

    /// Opens a stream from `who` at the link's current time.
    pub(super) fn open(
        &mut self,
        who: Side,
        header: ServiceHeader,
    ) -> Result<StreamId, crate::connection::OpenError> {
        let now = self.link.now;
        self.conn(who).open(now, header)
    }

    /// Starts a PING from `who` at the link's current time.
    pub(super) fn ping(&mut self, who: Side) {
        let now = self.link.now;
        self.conn(who).ping(now);
    }

    /// Opens a stream from `who` and has the peer accept it.
    pub(super) fn open_accepted(&mut self, who: Side, header: ServiceHeader) -> StreamId {
        let id = self.open(who, header.clone()).expect("open");
        self.drive();
        assert_eq!(self.events(who.other()), [Event::Incoming]);
        let (accepted, got) = self.conn(who.other()).accept().expect("an incoming stream");
        assert_eq!((accepted, got), (id, header));
        self.drive();
        assert_eq!(self.events(who), [Event::Accepted(id)]);
        id
    }

    /// Reads what `who` has buffered on `id`. Returns the bytes and whether
    /// the end of the stream was reached.
    pub(super) fn read_available(&mut self, who: Side, id: StreamId) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        loop {
            match self.conn(who).read(id, usize::MAX) {
                Ok(Some(chunk)) => out.extend_from_slice(&chunk),
                Ok(None) => return (out, true),
                Err(ReadError::Blocked) => return (out, false),
                Err(e) => panic!("read on stream {id} failed: {e}"),
            }
        }
    }

    /// Reads exactly `len` bytes that `who` already has buffered on `id`.
    pub(super) fn read_exact(&mut self, who: Side, id: StreamId, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < len {
            match self.conn(who).read(id, len - out.len()) {
                Ok(Some(chunk)) => out.extend_from_slice(&chunk),
                other => panic!(
                    "read on stream {id} gave {other:?} after {} of {len} bytes",
                    out.len()
                ),
            }
        }
        out
    }

    /// Writes as much of `data` as `who` takes now; returns how much.
    pub(super) fn write_some(&mut self, who: Side, id: StreamId, data: &[u8]) -> usize {
        match self.conn(who).write(id, data) {
            Ok(n) => n,
            Err(WriteError::Blocked) => 0,
            Err(e) => panic!("write on stream {id} failed: {e}"),
        }
    }

    /// Sends `data` from `from` on `id`, the peer reading everything as it
    /// arrives, and returns what the peer read. Panics if the transfer
    /// stalls.
    pub(super) fn transfer(&mut self, from: Side, id: StreamId, data: &[u8]) -> Vec<u8> {
        let mut written = 0;
        let mut received = Vec::new();
        for _ in 0..MAX_STEPS {
            written += self.write_some(from, id, &data[written..]);
            let (chunk, _) = self.read_available(from.other(), id);
            let read = !chunk.is_empty();
            received.extend_from_slice(&chunk);
            if received.len() == data.len() {
                return received;
            }
            if !self.step() && !read {
                panic!(
                    "transfer stalled after {} of {} bytes ({written} written)",
                    received.len(),
                    data.len()
                );
            }
        }
        panic!("transfer did not finish after {MAX_STEPS} steps (livelock?)");
    }

    /// Has `who` read `len` bytes from `id` as they arrive, driving the pair
    /// meanwhile, and returns them. Panics if they do not all come.
    pub(super) fn receive(&mut self, who: Side, id: StreamId, len: usize) -> Vec<u8> {
        let mut received = Vec::new();
        for _ in 0..MAX_STEPS {
            let (chunk, eof) = self.read_available(who, id);
            received.extend_from_slice(&chunk);
            if received.len() >= len || eof {
                return received;
            }
            if !self.step() && chunk.is_empty() {
                panic!("stalled after receiving {} of {len} bytes", received.len());
            }
        }
        panic!("receive did not finish after {MAX_STEPS} steps (livelock?)");
    }

    /// Asserts that `who` closed because the peer broke a rule, with `code`,
    /// and that the last frame it sent is a CLOSE with that code.
    pub(super) fn assert_violation(&mut self, who: Side, code: CloseCode) {
        self.transmit(who);
        let conn = self.conn(who);
        assert!(conn.is_closed(), "{who:?} is still open");
        match conn.close_reason() {
            Some(ConnectionError::ProtocolViolation { code: got, .. }) => {
                assert_eq!(*got, code, "{who:?} closed with {:?}", conn.close_reason())
            }
            other => panic!("{who:?} closed with {other:?}, expected a violation with {code}"),
        }
        assert_eq!(self.last_close(who), Some(code));
    }

    /// The code of the last CLOSE frame `who` sent.
    pub(super) fn last_close(&self, who: Side) -> Option<CloseCode> {
        self.sent(who).iter().rev().find_map(|f| match f {
            Frame::Close { code, .. } => Some(*code),
            _ => None,
        })
    }
}
