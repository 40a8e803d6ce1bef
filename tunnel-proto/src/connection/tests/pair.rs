//! The two-peer harness: a device and a platform [`Connection`] joined by a
//! simulated link, after `quinn-proto`'s `tests::util::Pair`.
//!
//! The link is reliable and in order, with a fixed one-way latency. Time is
//! simulated: it starts at one real `Instant` and only moves when the harness
//! delivers a message or fires a timer. [`Pair::drive`] runs until nothing is
//! in flight; [`Pair::advance`] lets simulated time pass, timers included.
//!
//! Every message a side transmits is decoded and checked on the way out: it
//! must decode, fit the receiver's `max_frame_payload`, and a DATA frame must
//! fit the sender's `data_split` and the credit the receiver granted (tracked
//! from the HELLO and WINDOW_UPDATE frames delivered to the sender). So every
//! test checks flow control, whatever it is about.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codes::CloseCode;
use crate::config::Config;
use crate::connection::{Connection, ConnectionError, Event, ReadError, WriteError};
use crate::frame::{Frame, HEADER_LEN, StreamId};
use crate::hello::Role;
use crate::service::{Service, ServiceHeader};

/// Steps [`Pair::drive`] and friends may take before they call it a livelock.
pub(super) const MAX_STEPS: usize = 200_000;

/// One-way latency of [`Pair::new`].
pub(super) const LATENCY: Duration = Duration::from_millis(10);

/// The origin of simulated time: the single place these tests read the clock.
// The crate's clippy.toml bans `Instant::now` because the state machine must
// never read the clock; the tests need one real `Instant` to count from, and
// nothing depends on its value.
#[allow(clippy::disallowed_methods)]
pub(super) fn start_time() -> Instant {
    Instant::now()
}

/// Which end of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Who {
    Device,
    Platform,
}

pub(super) use Who::{Device, Platform};

impl Who {
    pub(super) fn other(self) -> Who {
        match self {
            Device => Platform,
            Platform => Device,
        }
    }
}

/// One end: its connection and what the harness saw of it.
pub(super) struct Side {
    pub(super) conn: Connection,
    /// Events polled from `conn` and not yet taken by the test.
    pub(super) events: VecDeque<Event>,
    /// Every frame this side transmitted, with the time it left.
    pub(super) sent: Vec<(Instant, Frame)>,
    /// Every message delivered to this side, with the time it arrived.
    pub(super) received: Vec<(Instant, Bytes)>,
    /// Messages on their way to this side, with their arrival time.
    pub(super) inbound: VecDeque<(Instant, Bytes)>,
    /// When false, the shell no longer reads this side's output: nothing it
    /// queues reaches the wire (a stuck transport or a dead peer).
    pub(super) transmitting: bool,
    /// Credit this side may still use, as granted by frames delivered to it.
    credit: Credit,
}

/// Send credit as the receiver granted it, kept independently of the
/// connection's own books.
#[derive(Default)]
struct Credit {
    initial_stream: u64,
    connection: u64,
    streams: HashMap<StreamId, u64>,
}

impl Credit {
    fn stream(&mut self, id: StreamId) -> &mut u64 {
        self.streams.entry(id).or_insert(self.initial_stream)
    }
}

impl Side {
    fn new(conn: Connection) -> Side {
        Side {
            conn,
            events: VecDeque::new(),
            sent: Vec::new(),
            received: Vec::new(),
            inbound: VecDeque::new(),
            transmitting: true,
            credit: Credit::default(),
        }
    }

    fn collect_events(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            self.events.push_back(event);
        }
    }

    /// Hands one message to the connection and updates the credit books.
    fn handle(&mut self, now: Instant, msg: Bytes) {
        match Frame::decode(&msg) {
            Ok(Frame::Hello(hello)) => {
                self.credit.initial_stream = hello.settings.initial_stream_window.into();
                self.credit.connection = hello.settings.connection_window.into();
            }
            Ok(Frame::WindowUpdate { stream, increment }) if stream.is_connection() => {
                self.credit.connection += u64::from(increment);
            }
            Ok(Frame::WindowUpdate { stream, increment }) => {
                *self.credit.stream(stream) += u64::from(increment);
            }
            _ => {}
        }
        self.received.push((now, msg.clone()));
        self.conn.handle_message(now, msg);
        self.collect_events();
    }
}

/// A device and a platform joined by a simulated link.
pub(super) struct Pair {
    pub(super) now: Instant,
    /// One-way delay of every message, both ways.
    pub(super) latency: Duration,
    pub(super) device: Side,
    pub(super) platform: Side,
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

impl Pair {
    /// Two connections, created now, with nothing sent yet.
    pub(super) fn new(device: Config, platform: Config) -> Pair {
        let now = start_time();
        let device = Connection::new(device, now).expect("device config is valid");
        let platform = Connection::new(platform, now).expect("platform config is valid");
        Pair {
            now,
            latency: LATENCY,
            device: Side::new(device),
            platform: Side::new(platform),
        }
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

    pub(super) fn side(&mut self, who: Who) -> &mut Side {
        match who {
            Device => &mut self.device,
            Platform => &mut self.platform,
        }
    }

    pub(super) fn conn(&mut self, who: Who) -> &mut Connection {
        &mut self.side(who).conn
    }

    /// The sending and the receiving side of one direction.
    fn link(&mut self, from: Who) -> (&mut Side, &mut Side) {
        match from {
            Device => (&mut self.device, &mut self.platform),
            Platform => (&mut self.platform, &mut self.device),
        }
    }

    /// Takes the events `who` raised so far.
    pub(super) fn events(&mut self, who: Who) -> Vec<Event> {
        let side = self.side(who);
        side.collect_events();
        side.events.drain(..).collect()
    }

    /// Fires `who`'s timer if due and puts everything it has to send on the
    /// link. Returns true if anything happened.
    pub(super) fn transmit(&mut self, who: Who) -> bool {
        let now = self.now;
        let arrival = now + self.latency;
        let (from, to) = self.link(who);
        let mut busy = false;
        if from.conn.poll_timeout().is_some_and(|t| t <= now) {
            from.conn.handle_timeout(now);
            busy = true;
        }
        if from.transmitting {
            while let Some(msg) = from.conn.poll_transmit(now) {
                let frame = check_outgoing(who, from, to, &msg);
                from.sent.push((now, frame));
                to.inbound.push_back((arrival, Bytes::from(msg)));
                busy = true;
            }
        }
        from.collect_events();
        busy
    }

    /// The earliest moment something is due: a message arrives or a timer
    /// fires.
    fn next_wakeup(&self, timers: bool) -> Option<Instant> {
        let arrivals = [&self.device, &self.platform]
            .into_iter()
            .filter_map(|side| side.inbound.front().map(|(at, _)| *at));
        let next_arrival = arrivals.min();
        if !timers {
            return next_arrival;
        }
        let timers = [&self.device, &self.platform]
            .into_iter()
            .filter_map(|s| s.conn.poll_timeout());
        next_arrival.into_iter().chain(timers).min()
    }

    /// Delivers every message due at the current time.
    fn deliver_due(&mut self) {
        let now = self.now;
        for who in [Device, Platform] {
            let side = self.side(who);
            while side.inbound.front().is_some_and(|(at, _)| *at <= now) {
                let (_, msg) = side.inbound.pop_front().expect("front exists");
                side.handle(now, msg);
            }
        }
    }

    /// One round: both sides transmit, then time moves to the next arrival
    /// (or to an earlier timer, while messages are in flight) and what is due
    /// is delivered. Returns false once nothing happened and nothing is in
    /// flight.
    pub(super) fn step(&mut self) -> bool {
        let mut busy = self.transmit(Device);
        busy |= self.transmit(Platform);
        if self.next_wakeup(false).is_some() {
            let next = self.next_wakeup(true).expect("a message is in flight");
            self.now = self.now.max(next);
            self.deliver_due();
            busy = true;
        }
        busy
    }

    /// Moves messages until both sides are idle: nothing to send, nothing
    /// in flight. Timers fire only while messages are in flight, so keepalive
    /// does not keep this running forever.
    pub(super) fn drive(&mut self) {
        for _ in 0..MAX_STEPS {
            if !self.step() {
                return;
            }
        }
        panic!(
            "drive() still busy after {MAX_STEPS} steps (livelock?): device {:?}, platform {:?}",
            self.device.conn.stats(),
            self.platform.conn.stats()
        );
    }

    /// Lets `duration` of simulated time pass, delivering messages and firing
    /// timers in time order.
    pub(super) fn advance(&mut self, duration: Duration) {
        self.advance_to(self.now + duration);
    }

    /// Lets simulated time pass until `target`; see [`Pair::advance`].
    pub(super) fn advance_to(&mut self, target: Instant) {
        for _ in 0..MAX_STEPS {
            self.transmit(Device);
            self.transmit(Platform);
            match self.next_wakeup(true) {
                Some(next) if next <= target => {
                    self.now = self.now.max(next);
                    self.deliver_due();
                }
                _ => {
                    self.now = target;
                    self.transmit(Device);
                    self.transmit(Platform);
                    return;
                }
            }
        }
        panic!("advance() did not reach its target after {MAX_STEPS} steps (livelock?)");
    }

    /// Delivers the next message in flight to `to`, whenever it is due, and
    /// returns it decoded. Nothing is transmitted in answer.
    pub(super) fn deliver_one(&mut self, to: Who) -> Option<Frame> {
        let (at, msg) = self.side(to).inbound.pop_front()?;
        self.now = self.now.max(at);
        let frame = Frame::decode(&msg).ok();
        let now = self.now;
        self.side(to).handle(now, msg);
        frame
    }

    /// Feeds raw bytes to `to` as if the peer had sent them, bypassing the
    /// peer's state machine and the link.
    pub(super) fn inject(&mut self, to: Who, msg: impl Into<Bytes>) {
        let now = self.now;
        self.side(to).handle(now, msg.into());
    }

    /// Frames in flight toward `to`, decoded.
    pub(super) fn in_flight(&self, to: Who) -> Vec<Frame> {
        let side = match to {
            Device => &self.device,
            Platform => &self.platform,
        };
        side.inbound
            .iter()
            .map(|(_, msg)| Frame::decode(msg).expect("checked when sent"))
            .collect()
    }

    /// Frames `who` transmitted so far.
    pub(super) fn sent(&self, who: Who) -> Vec<Frame> {
        let side = match who {
            Device => &self.device,
            Platform => &self.platform,
        };
        side.sent.iter().map(|(_, f)| f.clone()).collect()
    }

    /// Forgets the frames both sides transmitted so far.
    pub(super) fn clear_sent(&mut self) {
        self.device.sent.clear();
        self.platform.sent.clear();
    }

    /// Opens a stream from `who` and has the peer accept it.
    pub(super) fn open_accepted(&mut self, who: Who, header: ServiceHeader) -> StreamId {
        let id = self.conn(who).open(header.clone()).expect("open");
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
    pub(super) fn read_available(&mut self, who: Who, id: StreamId) -> (Vec<u8>, bool) {
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
    pub(super) fn read_exact(&mut self, who: Who, id: StreamId, len: usize) -> Vec<u8> {
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
    pub(super) fn write_some(&mut self, who: Who, id: StreamId, data: &[u8]) -> usize {
        match self.conn(who).write(id, data) {
            Ok(n) => n,
            Err(WriteError::Blocked) => 0,
            Err(e) => panic!("write on stream {id} failed: {e}"),
        }
    }

    /// Sends `data` from `from` on `id`, the peer reading everything as it
    /// arrives, and returns what the peer read. Panics if the transfer
    /// stalls.
    pub(super) fn transfer(&mut self, from: Who, id: StreamId, data: &[u8]) -> Vec<u8> {
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
    pub(super) fn receive(&mut self, who: Who, id: StreamId, len: usize) -> Vec<u8> {
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
    pub(super) fn assert_violation(&mut self, who: Who, code: CloseCode) {
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
    pub(super) fn last_close(&self, who: Who) -> Option<CloseCode> {
        self.sent(who).iter().rev().find_map(|f| match f {
            Frame::Close { code, .. } => Some(*code),
            _ => None,
        })
    }
}

/// Decodes and checks one message `who` sent; returns the frame.
fn check_outgoing(who: Who, from: &mut Side, to: &Side, msg: &[u8]) -> Frame {
    let frame = Frame::decode(&Bytes::copy_from_slice(msg))
        .unwrap_or_else(|e| panic!("{who:?} sent an undecodable frame ({e}): {msg:02x?}"));
    let limit = to.conn.config().settings.max_frame_payload as usize;
    assert!(
        msg.len() - HEADER_LEN <= limit,
        "{who:?} sent a {}-byte payload, the peer accepts {limit}",
        msg.len() - HEADER_LEN
    );
    if let Frame::Data {
        stream, payload, ..
    } = &frame
    {
        let len = payload.len() as u64;
        let split = from.conn.config().data_split;
        assert!(
            payload.len() <= split,
            "{who:?} sent {len} bytes of DATA, data_split is {split}"
        );
        let stream_credit = from.credit.stream(*stream);
        assert!(
            len <= *stream_credit,
            "{who:?} sent {len} bytes on stream {stream} with {stream_credit} credit"
        );
        *stream_credit -= len;
        let conn_credit = &mut from.credit.connection;
        assert!(
            len <= *conn_credit,
            "{who:?} sent {len} bytes with {conn_credit} connection credit"
        );
        *conn_credit -= len;
    }
    frame
}
