//! Replays an arbitrary sequence of application and transport operations on
//! two connected `Connection`s joined by a reliable, in-order link.
//!
//! Checked throughout: no panic; every frame sent decodes and DATA never
//! exceeds the credit the receiver granted (tracked from the HELLO and
//! WINDOW_UPDATE frames delivered to the sender); buffers stay within the
//! connection window plus `max_send_buffer`; what a reader gets is always a
//! prefix of what the writer wrote. At the end, once everything is read and
//! delivered, each stream not reset carried exactly the bytes written, and an
//! honest pair never closed with an error.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_proto::{
    CloseCode, Config, Connection, ConnectionError, Event, Frame, ReadError, ResetCode, Role,
    Service, ServiceHeader, StreamId, WriteError,
};

#[derive(Arbitrary, Debug)]
struct Input {
    device: Knobs,
    platform: Knobs,
    latency_ms: u8,
    ops: Vec<Op>,
}

/// Config values, mapped into valid and small ranges so that flow control
/// and the limits are hit often.
#[derive(Arbitrary, Debug)]
struct Knobs {
    window: u16,
    growth: u8,
    spare: u8,
    split: u16,
    stream_buffer: u16,
    buffer: u16,
    streams: u8,
    backlog: u8,
}

impl Knobs {
    fn config(&self, role: Role) -> Config {
        let window = 1024 + u32::from(self.window % 4096);
        let growth = 1 + u32::from(self.growth % 4);
        let mut config = Config::new(role);
        config.settings.initial_stream_window = window;
        config.max_stream_window = window * growth;
        config.settings.connection_window = window * growth * 2 * (1 + u32::from(self.spare % 3));
        config.data_split = 1 + usize::from(self.split % 4096);
        config.max_stream_send_buffer = 1 + usize::from(self.stream_buffer % 16384);
        config.max_send_buffer = 1 + usize::from(self.buffer % 32768);
        config.settings.max_concurrent_streams = 1 + u32::from(self.streams % 16);
        config.accept_backlog = 1 + usize::from(self.backlog % 8);
        config
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Side {
    Device,
    Platform,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::Device => 0,
            Side::Platform => 1,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Open(Side),
    Accept(Side),
    Write { side: Side, stream: u8, len: u16 },
    Read { side: Side, stream: u8, max: u16 },
    Finish { side: Side, stream: u8 },
    Reset { side: Side, stream: u8, code: u16 },
    Release { side: Side, stream: u8 },
    Transmit(Side),
    Deliver { to: Side, count: u8 },
    Advance { ms: u16 },
    Ping(Side),
    Shutdown(Side),
}

/// The origin of simulated time.
// tether-proto's clippy.toml bans `Instant::now` because the state machine
// must never read the clock; the harness needs one real `Instant` to count
// from, and nothing depends on its value.
#[allow(clippy::disallowed_methods)]
fn start_time() -> Instant {
    Instant::now()
}

#[derive(Default)]
struct Credit {
    initial_stream: u64,
    connection: u64,
    streams: HashMap<StreamId, u64>,
}

struct Peer {
    conn: Connection,
    inbound: VecDeque<(Instant, Bytes)>,
    credit: Credit,
}

#[derive(Default)]
struct Direction {
    written: Vec<u8>,
    read: Vec<u8>,
    finished: bool,
    eof: bool,
    reader_gone: bool,
}

struct Tracked {
    id: StreamId,
    opener: usize,
    accepted: bool,
    reset: bool,
    released: [bool; 2],
    /// Indexed by the writing side.
    dirs: [Direction; 2],
}

impl Tracked {
    fn usable_by(&self, side: usize) -> bool {
        (side == self.opener || self.accepted) && !self.released[side]
    }
}

struct World {
    now: Instant,
    latency: Duration,
    peers: [Peer; 2],
    streams: Vec<Tracked>,
}

impl World {
    fn new(input: &Input) -> World {
        let now = start_time();
        let peer = |config| Peer {
            conn: Connection::new(config, now).expect("knobs make valid configs"),
            inbound: VecDeque::new(),
            credit: Credit::default(),
        };
        World {
            now,
            latency: Duration::from_millis(u64::from(input.latency_ms % 50)),
            peers: [
                peer(input.device.config(Role::Device)),
                peer(input.platform.config(Role::Platform)),
            ],
            streams: Vec::new(),
        }
    }

    fn transmit(&mut self, from: usize) -> bool {
        let now = self.now;
        let arrival = now + self.latency;
        let [a, b] = &mut self.peers;
        let (sender, receiver) = if from == 0 { (a, b) } else { (b, a) };
        if sender.conn.poll_timeout().is_some_and(|t| t <= now) {
            sender.conn.handle_timeout(now);
        }
        let mut sent = false;
        while let Some(msg) = sender.conn.poll_transmit(now) {
            let msg = Bytes::from(msg);
            let frame = Frame::decode(&msg).expect("every frame sent decodes");
            let limit = receiver.conn.config().settings.max_frame_payload as usize;
            assert!(
                msg.len() - 6 <= limit,
                "frame above the peer's max_frame_payload"
            );
            if let Frame::Data {
                stream, payload, ..
            } = frame
            {
                let len = payload.len() as u64;
                assert!(
                    payload.len() <= sender.conn.config().data_split,
                    "DATA above data_split"
                );
                let initial = sender.credit.initial_stream;
                let credit = sender.credit.streams.entry(stream).or_insert(initial);
                assert!(
                    len <= *credit,
                    "{len} bytes on stream {stream} with {credit} credit"
                );
                *credit -= len;
                let conn = &mut sender.credit.connection;
                assert!(len <= *conn, "{len} bytes with {conn} connection credit");
                *conn -= len;
            }
            receiver.inbound.push_back((arrival, msg));
            sent = true;
        }
        sent
    }

    fn deliver_to(&mut self, to: usize, msg: Bytes) {
        let peer = &mut self.peers[to];
        match Frame::decode(&msg) {
            Ok(Frame::Hello(hello)) => {
                peer.credit.initial_stream = hello.settings.initial_stream_window.into();
                peer.credit.connection = hello.settings.connection_window.into();
            }
            Ok(Frame::WindowUpdate { stream, increment }) if stream.is_connection() => {
                peer.credit.connection += u64::from(increment);
            }
            Ok(Frame::WindowUpdate { stream, increment }) => {
                let initial = peer.credit.initial_stream;
                *peer.credit.streams.entry(stream).or_insert(initial) += u64::from(increment);
            }
            _ => {}
        }
        peer.conn.handle_message(self.now, msg);
    }

    fn deliver(&mut self, to: usize, count: usize) {
        for _ in 0..count {
            let Some((at, msg)) = self.peers[to].inbound.pop_front() else {
                return;
            };
            self.now = self.now.max(at);
            self.deliver_to(to, msg);
        }
    }

    fn deliver_due(&mut self) {
        for to in 0..2 {
            while self.peers[to]
                .inbound
                .front()
                .is_some_and(|(at, _)| *at <= self.now)
            {
                let (_, msg) = self.peers[to].inbound.pop_front().expect("front exists");
                self.deliver_to(to, msg);
            }
        }
    }

    fn next_arrival(&self) -> Option<Instant> {
        self.peers
            .iter()
            .filter_map(|p| p.inbound.front().map(|(at, _)| *at))
            .min()
    }

    fn advance(&mut self, duration: Duration) {
        let target = self.now + duration;
        for _ in 0..100_000 {
            self.transmit(0);
            self.transmit(1);
            let timers = self.peers.iter().filter_map(|p| p.conn.poll_timeout());
            match self.next_arrival().into_iter().chain(timers).min() {
                Some(next) if next <= target => {
                    self.now = self.now.max(next);
                    self.deliver_due();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("advance() livelocked");
    }

    fn observe(&mut self) {
        for side in 0..2 {
            while let Some(event) = self.peers[side].conn.poll_event() {
                let Event::Reset { stream, .. } = event else {
                    continue;
                };
                if let Some(s) = self.streams.iter_mut().find(|s| s.id == stream) {
                    s.reset = true;
                }
            }
        }
    }

    fn pick(&self, side: usize, i: u8) -> Option<usize> {
        let usable: Vec<usize> = (0..self.streams.len())
            .filter(|&j| self.streams[j].usable_by(side))
            .collect();
        (!usable.is_empty()).then(|| usable[usize::from(i) % usable.len()])
    }

    fn accept_all(&mut self, side: usize) {
        while let Some((id, _)) = self.peers[side].conn.accept() {
            let stream = self
                .streams
                .iter_mut()
                .find(|s| s.id == id)
                .expect("accepted a stream nobody opened");
            assert!(
                stream.opener != side && !stream.accepted,
                "stream {id} accepted twice"
            );
            stream.accepted = true;
        }
    }

    /// One read; returns whether it produced bytes.
    fn read(&mut self, side: usize, i: usize, max: usize) -> bool {
        let id = self.streams[i].id;
        let result = self.peers[side].conn.read(id, max);
        let stream = &mut self.streams[i];
        let dir = &mut stream.dirs[1 - side];
        match result {
            Ok(Some(chunk)) => {
                assert!(!dir.eof, "data on stream {id} after its end");
                assert!(chunk.len() <= max);
                dir.read.extend_from_slice(&chunk);
                assert!(
                    dir.written.starts_with(&dir.read),
                    "stream {id} delivered bytes not written, or out of order"
                );
                !chunk.is_empty()
            }
            Ok(None) => {
                assert!(dir.finished, "stream {id} ended without a finish");
                assert_eq!(dir.read.len(), dir.written.len(), "stream {id} ended early");
                dir.eof = true;
                false
            }
            Err(ReadError::Reset(_)) => {
                stream.reset = true;
                false
            }
            Err(
                ReadError::Blocked | ReadError::UnknownStream(_) | ReadError::ConnectionLost(_),
            ) => false,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Open(side) => {
                let side = side.index();
                let header = ServiceHeader::new(Service::Tcp("svc".into()));
                if let Ok(id) = self.peers[side].conn.open(header) {
                    assert!(
                        self.streams.iter().all(|s| s.id != id),
                        "stream id {id} reused"
                    );
                    self.streams.push(Tracked {
                        id,
                        opener: side,
                        accepted: false,
                        reset: false,
                        released: [false; 2],
                        dirs: Default::default(),
                    });
                }
            }
            Op::Accept(side) => self.accept_all(side.index()),
            Op::Write { side, stream, len } => {
                let side = side.index();
                let Some(i) = self.pick(side, stream) else {
                    return;
                };
                let id = self.streams[i].id;
                let offset = self.streams[i].dirs[side].written.len();
                let data: Vec<u8> = (offset..offset + usize::from(len))
                    .map(|n| {
                        (n as u32)
                            .wrapping_mul(31)
                            .wrapping_add(id.0 * 7 + side as u32) as u8
                    })
                    .collect();
                let result = self.peers[side].conn.write(id, &data);
                let stream = &mut self.streams[i];
                match result {
                    Ok(n) => {
                        assert!(!stream.dirs[side].finished, "write after finish on {id}");
                        assert!(n <= data.len() && (n > 0 || data.is_empty()));
                        stream.dirs[side].written.extend_from_slice(&data[..n]);
                    }
                    Err(WriteError::Finished) => assert!(stream.dirs[side].finished),
                    Err(WriteError::Reset(_)) => stream.reset = true,
                    Err(
                        WriteError::Blocked
                        | WriteError::UnknownStream(_)
                        | WriteError::ConnectionLost(_),
                    ) => {}
                }
            }
            Op::Read { side, stream, max } => {
                let side = side.index();
                if let Some(i) = self.pick(side, stream) {
                    self.read(side, i, usize::from(max));
                }
            }
            Op::Finish { side, stream } => {
                let side = side.index();
                let Some(i) = self.pick(side, stream) else {
                    return;
                };
                if self.peers[side].conn.finish(self.streams[i].id).is_ok() {
                    let dir = &mut self.streams[i].dirs[side];
                    assert!(!dir.finished, "finished twice");
                    dir.finished = true;
                }
            }
            Op::Reset { side, stream, code } => {
                let side = side.index();
                let Some(i) = self.pick(side, stream) else {
                    return;
                };
                self.peers[side]
                    .conn
                    .reset(self.streams[i].id, ResetCode(code.into()), "fuzz");
                self.streams[i].reset = true;
                self.streams[i].released[side] = true;
            }
            Op::Release { side, stream } => {
                let side = side.index();
                let Some(i) = self.pick(side, stream) else {
                    return;
                };
                self.peers[side].conn.release(self.streams[i].id);
                let stream = &mut self.streams[i];
                stream.released[side] = true;
                stream.dirs[side].finished = true;
                stream.dirs[1 - side].reader_gone = true;
            }
            Op::Transmit(side) => {
                self.transmit(side.index());
            }
            Op::Deliver { to, count } => self.deliver(to.index(), usize::from(count % 16)),
            Op::Advance { ms } => self.advance(Duration::from_millis(u64::from(ms % 20_000))),
            Op::Ping(side) => self.peers[side.index()].conn.ping(),
            Op::Shutdown(side) => self.peers[side.index()]
                .conn
                .shutdown(CloseCode::NO_ERROR, "fuzz"),
        }
        self.observe();
        for peer in &self.peers {
            let config = peer.conn.config();
            let bound = config.settings.connection_window as usize + config.max_send_buffer;
            assert!(
                peer.conn.buffered_bytes() <= bound,
                "{} bytes buffered",
                peer.conn.buffered_bytes()
            );
        }
    }

    /// Accepts and reads everything and moves every message, until quiet.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            self.accept_all(0);
            self.accept_all(1);
            let mut progress = false;
            for i in 0..self.streams.len() {
                for side in 0..2 {
                    while self.streams[i].usable_by(side) && self.read(side, i, usize::MAX) {
                        progress = true;
                    }
                }
            }
            progress |= self.transmit(0);
            progress |= self.transmit(1);
            if let Some(next) = self.next_arrival() {
                self.now = self.now.max(next);
                self.deliver_due();
                progress = true;
            }
            self.observe();
            if !progress {
                return;
            }
        }
        panic!("settle() livelocked");
    }

    fn check(&self) {
        let closed = self.peers.iter().any(|p| p.conn.is_closed());
        for peer in &self.peers {
            let reason = peer.conn.close_reason();
            let orderly = matches!(
                reason,
                None | Some(
                    ConnectionError::LocallyClosed {
                        code: CloseCode::NO_ERROR,
                        ..
                    } | ConnectionError::PeerClosed {
                        code: CloseCode::NO_ERROR,
                        ..
                    }
                )
            );
            assert!(orderly, "an honest pair closed with {reason:?}");
        }
        for stream in &self.streams {
            for writer in 0..2 {
                let dir = &stream.dirs[writer];
                if stream.reset || closed || dir.reader_gone {
                    continue;
                }
                assert!(
                    stream.accepted,
                    "stream {} was neither accepted nor reset",
                    stream.id
                );
                assert_eq!(
                    dir.read, dir.written,
                    "stream {} from side {writer}",
                    stream.id
                );
                assert_eq!(
                    dir.eof, dir.finished,
                    "end of stream {} from side {writer}",
                    stream.id
                );
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let mut world = World::new(&input);
    world.settle();
    world.observe();
    assert!(
        world.peers.iter().all(|p| p.conn.is_connected()),
        "handshake failed"
    );
    for op in input.ops.iter().take(2000) {
        world.apply(op);
    }
    world.settle();
    world.check();
});
