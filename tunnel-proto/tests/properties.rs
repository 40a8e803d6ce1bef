//! Property tests of the codec and the state machine.
//!
//! - Every valid frame survives encode then decode.
//! - No byte string makes `Frame::decode` or a `Connection` panic, and a
//!   connection fed anything keeps its buffers within the connection window
//!   plus `max_send_buffer`.
//! - Random interleavings of stream operations between two connections
//!   deliver exactly the bytes written, in order, per stream, and no DATA
//!   frame ever exceeds the credit the receiver granted.
//!
//! Case counts are kept moderate so the file runs in seconds in debug builds.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use tether_proto::hello::PROTOCOL_MAJOR;
use tether_proto::{
    CloseCode, Config, Connection, ConnectionError, Event, Frame, Hello, MAX_WINDOW, ReadError,
    ResetCode, Role, Service, ServiceHeader, Settings, StreamId, WriteError,
};

/// The origin of simulated time.
// The crate's clippy.toml bans `Instant::now` because the state machine must
// never read the clock; these tests need one real `Instant` to count from,
// and nothing depends on its value.
#[allow(clippy::disallowed_methods)]
fn start_time() -> Instant {
    Instant::now()
}

// ---------------------------------------------------------------------------
// Strategies for frames.

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

/// At most 64 characters of at most 4 bytes: never above the 256-byte limit.
fn reason() -> impl Strategy<Value = String> {
    ".{0,64}"
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        1024u32..=16 << 20,
        any::<u32>(),
        1024u32..=MAX_WINDOW,
        1024u32..=MAX_WINDOW,
        64u32..=65535,
    )
        .prop_map(
            |(
                max_frame_payload,
                max_concurrent_streams,
                initial_stream_window,
                connection_window,
                max_open_payload,
            )| {
                Settings {
                    max_frame_payload,
                    max_concurrent_streams,
                    initial_stream_window,
                    connection_window,
                    max_open_payload,
                }
            },
        )
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Device), Just(Role::Platform)]
}

fn hello() -> impl Strategy<Value = Hello> {
    prop_oneof![
        4 => (role(), any::<u8>(), settings())
            .prop_map(|(role, minor, settings)| {
                Hello { major: PROTOCOL_MAJOR, minor, role, settings }
            }),
        // Another major version: only magic and version survive decoding.
        1 => (any::<u8>().prop_filter("another major", |m| *m != PROTOCOL_MAJOR), any::<u8>())
            .prop_map(|(major, minor)| {
                Hello { major, minor, role: Role::Device, settings: Settings::DEFAULT }
            }),
    ]
}

fn service() -> impl Strategy<Value = Service> {
    prop_oneof![
        Just(Service::Control),
        Just(Service::Editor),
        Just(Service::Mqtt),
        token().prop_map(Service::Tcp),
        (
            any::<u8>().prop_filter("an unknown kind", |k| !(0x01..=0x04).contains(k)),
            prop_oneof![Just(String::new()), token()],
        )
            .prop_map(|(kind, name)| Service::Other { kind, name }),
    ]
}

fn header() -> impl Strategy<Value = ServiceHeader> {
    (service(), vec((token(), ".{0,32}"), 0..8)).prop_map(|(service, entries)| {
        let mut header = ServiceHeader::new(service);
        for (key, value) in entries {
            if header.get(&key).is_none() {
                header = header.with(key, value);
            }
        }
        header
    })
}

/// Any valid frame, with stream ids drawn from `ids`.
fn frame_with(ids: impl Strategy<Value = u32> + Clone + 'static) -> BoxedStrategy<Frame> {
    let stream = ids.clone().prop_map(|id| StreamId(id.max(1)));
    prop_oneof![
        hello().prop_map(Frame::Hello),
        (stream.clone(), header()).prop_map(|(stream, header)| Frame::Open { stream, header }),
        stream.clone().prop_map(|stream| Frame::Accept { stream }),
        (stream.clone(), any::<bool>(), vec(any::<u8>(), 0..1500)).prop_map(
            |(stream, fin, payload)| Frame::Data {
                stream,
                fin,
                payload: payload.into()
            }
        ),
        (ids.prop_map(StreamId), 1..=MAX_WINDOW)
            .prop_map(|(stream, increment)| Frame::WindowUpdate { stream, increment }),
        (stream, any::<u32>(), reason()).prop_map(|(stream, code, reason)| Frame::Reset {
            stream,
            code: ResetCode(code),
            reason
        }),
        (any::<bool>(), any::<u64>()).prop_map(|(ack, opaque)| Frame::Ping { ack, opaque }),
        (any::<u32>(), any::<u32>(), reason()).prop_map(|(last, code, reason)| Frame::GoAway {
            last_stream: StreamId(last),
            code: CloseCode(code),
            reason
        }),
        (any::<u32>(), reason()).prop_map(|(code, reason)| Frame::Close {
            code: CloseCode(code),
            reason
        }),
        any::<u8>()
            .prop_filter("an unknown type", |k| !(0x01..=0x09).contains(k))
            .prop_map(|kind| Frame::Ignored { kind }),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_valid_frame_survives_encode_then_decode(frame in frame_with(any::<u32>())) {
        let bytes = frame.to_bytes();
        prop_assert_eq!(bytes.len(), frame.encoded_len());
        prop_assert_eq!(Frame::decode(&Bytes::from(bytes)), Ok(frame));
    }

    #[test]
    fn arbitrary_bytes_never_make_decode_panic(bytes in vec(any::<u8>(), 0..512)) {
        let _ = Frame::decode(&Bytes::from(bytes));
    }

    /// Damaged frames reach deep into the payload parsers. Whatever decodes
    /// must encode to a canonical form that decodes to the same frame.
    #[test]
    fn damaged_frames_decode_to_errors_or_to_stable_frames(
        frame in frame_with(any::<u32>()),
        damage in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = frame.to_bytes();
        for (at, value) in damage {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(decoded) = Frame::decode(&Bytes::from(bytes)) {
            prop_assert_eq!(Frame::decode(&Bytes::from(decoded.to_bytes())), Ok(decoded));
        }
    }
}

// ---------------------------------------------------------------------------
// A connection fed anything.

#[derive(Clone, Debug)]
enum Input {
    Bytes(Vec<u8>),
    Frame(Frame),
    Accept,
    Read(u32, usize),
    Write(u32, usize),
    Transmit,
    Advance(u64),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        2 => vec(any::<u8>(), 0..64).prop_map(Input::Bytes),
        8 => frame_with(0u32..8).prop_map(Input::Frame),
        1 => Just(Input::Accept),
        1 => (0u32..8, 0usize..5000).prop_map(|(id, max)| Input::Read(id, max)),
        1 => (0u32..8, 0usize..5000).prop_map(|(id, len)| Input::Write(id, len)),
        1 => Just(Input::Transmit),
        1 => (0u64..20_000).prop_map(Input::Advance),
    ]
}

fn small_config(role: Role) -> Config {
    let mut config = Config::new(role);
    config.settings.initial_stream_window = 2048;
    config.settings.connection_window = 8192;
    config.max_stream_window = 4096;
    config.max_send_buffer = 4096;
    config.max_stream_send_buffer = 2048;
    config.max_pending_control = 16;
    config.accept_backlog = 4;
    config.data_split = 700;
    config
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_connection_fed_anything_never_panics_and_stays_bounded(
        hello_first in any::<bool>(),
        inputs in vec(input(), 0..80),
    ) {
        let config = small_config(Role::Platform);
        let bound = config.settings.connection_window as usize + config.max_send_buffer;
        let mut now = start_time();
        let mut conn = Connection::new(config, now).unwrap();
        if hello_first {
            let hello = Frame::Hello(Hello::new(Role::Device, Settings::DEFAULT));
            conn.handle_message(now, hello.to_bytes().into());
        }
        let payload = vec![0x5a; 5000];
        for input in inputs {
            match input {
                Input::Bytes(bytes) => conn.handle_message(now, bytes.into()),
                Input::Frame(frame) => conn.handle_message(now, frame.to_bytes().into()),
                Input::Accept => {
                    let _ = conn.accept();
                }
                Input::Read(id, max) => {
                    let _ = conn.read(StreamId(id), max);
                }
                Input::Write(id, len) => {
                    let _ = conn.write(StreamId(id), &payload[..len]);
                }
                Input::Transmit => {
                    while let Some(msg) = conn.poll_transmit(now) {
                        let frame = Frame::decode(&Bytes::from(msg));
                        prop_assert!(frame.is_ok(), "sent an undecodable frame: {:?}", frame);
                    }
                }
                Input::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    if conn.poll_timeout().is_some_and(|t| t <= now) {
                        conn.handle_timeout(now);
                    }
                }
            }
            while conn.poll_event().is_some() {}
            let buffered = conn.buffered_bytes();
            prop_assert!(buffered <= bound, "{} bytes buffered", buffered);
        }
    }
}

// ---------------------------------------------------------------------------
// Two connections and random interleavings of stream operations.

/// Send credit as granted by frames the other side delivered, kept apart
/// from the connection's own books.
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

/// Two connections on a reliable, in-order link with a fixed latency.
struct Net {
    now: Instant,
    latency: Duration,
    peers: [Peer; 2],
}

const DEVICE: usize = 0;
const PLATFORM: usize = 1;

impl Net {
    fn new(device: Config, platform: Config, latency: Duration) -> Net {
        let now = start_time();
        let peer = |config| Peer {
            conn: Connection::new(config, now).expect("valid config"),
            inbound: VecDeque::new(),
            credit: Credit::default(),
        };
        Net {
            now,
            latency,
            peers: [peer(device), peer(platform)],
        }
    }

    /// Fires `from`'s due timer and puts all it has to send on the link,
    /// checking every frame. Returns whether anything was sent.
    fn transmit(&mut self, from: usize) -> Result<bool, TestCaseError> {
        let now = self.now;
        let arrival = now + self.latency;
        let [a, b] = &mut self.peers;
        let (sender, receiver) = if from == DEVICE { (a, b) } else { (b, a) };
        if sender.conn.poll_timeout().is_some_and(|t| t <= now) {
            sender.conn.handle_timeout(now);
        }
        let mut sent = false;
        while let Some(msg) = sender.conn.poll_transmit(now) {
            let msg = Bytes::from(msg);
            let frame = Frame::decode(&msg);
            prop_assert!(
                frame.is_ok(),
                "peer {} sent an undecodable frame: {:?}",
                from,
                frame
            );
            let limit = receiver.conn.config().settings.max_frame_payload as usize;
            prop_assert!(
                msg.len() - 6 <= limit,
                "frame above the peer's max_frame_payload"
            );
            if let Ok(Frame::Data {
                stream, payload, ..
            }) = frame
            {
                let len = payload.len() as u64;
                prop_assert!(payload.len() <= sender.conn.config().data_split);
                let initial = sender.credit.initial_stream;
                let credit = sender.credit.streams.entry(stream).or_insert(initial);
                prop_assert!(
                    len <= *credit,
                    "{} bytes on stream {} with {} credit",
                    len,
                    stream,
                    credit
                );
                *credit -= len;
                let conn = &mut sender.credit.connection;
                prop_assert!(
                    len <= *conn,
                    "{} bytes with {} connection credit",
                    len,
                    conn
                );
                *conn -= len;
            }
            receiver.inbound.push_back((arrival, msg));
            sent = true;
        }
        Ok(sent)
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

    /// Delivers up to `count` messages in flight to `to`, moving the clock to
    /// their arrival.
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
        for to in [DEVICE, PLATFORM] {
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

    /// Lets time pass, delivering messages and firing timers in order.
    fn advance(&mut self, duration: Duration) -> Result<(), TestCaseError> {
        let target = self.now + duration;
        for _ in 0..100_000 {
            self.transmit(DEVICE)?;
            self.transmit(PLATFORM)?;
            let timers = self.peers.iter().filter_map(|p| p.conn.poll_timeout());
            match self.next_arrival().into_iter().chain(timers).min() {
                Some(next) if next <= target => {
                    self.now = self.now.max(next);
                    self.deliver_due();
                }
                _ => {
                    self.now = target;
                    return Ok(());
                }
            }
        }
        Err(TestCaseError::fail("advance() livelocked"))
    }
}

/// One direction of a stream, named by the side that writes it.
#[derive(Default)]
struct Direction {
    written: Vec<u8>,
    read: Vec<u8>,
    finished: bool,
    eof: bool,
    /// The reader released the stream: it reads no more.
    reader_gone: bool,
}

struct Tracked {
    id: StreamId,
    opener: usize,
    accepted: bool,
    /// Reset by either side, refused, timed out or going away.
    reset: bool,
    released: [bool; 2],
    /// Indexed by the writing side.
    dirs: [Direction; 2],
}

impl Tracked {
    /// Whether `side`'s application holds this stream.
    fn usable_by(&self, side: usize) -> bool {
        (side == self.opener || self.accepted) && !self.released[side]
    }
}

#[derive(Clone, Debug)]
enum Op {
    Open(usize),
    Accept(usize),
    Write(usize, usize, usize),
    Read(usize, usize, usize),
    Finish(usize, usize),
    Reset(usize, usize),
    Release(usize, usize),
    Transmit(usize),
    Deliver(usize, usize),
    Advance(u64),
    Shutdown(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let side = 0usize..2;
    let stream = 0usize..16;
    prop_oneof![
        3 => side.clone().prop_map(Op::Open),
        3 => side.clone().prop_map(Op::Accept),
        8 => (side.clone(), stream.clone(), 0usize..6000).prop_map(|(s, i, n)| Op::Write(s, i, n)),
        8 => (side.clone(), stream.clone(), 0usize..6000).prop_map(|(s, i, n)| Op::Read(s, i, n)),
        1 => (side.clone(), stream.clone()).prop_map(|(s, i)| Op::Finish(s, i)),
        1 => (side.clone(), stream.clone()).prop_map(|(s, i)| Op::Reset(s, i)),
        1 => (side.clone(), stream).prop_map(|(s, i)| Op::Release(s, i)),
        5 => side.clone().prop_map(Op::Transmit),
        8 => (side, 1usize..8).prop_map(|(s, k)| Op::Deliver(s, k)),
        2 => (0u64..4000).prop_map(Op::Advance),
    ]
}

/// Configs with small windows and buffers, so that flow control, buffer
/// limits and stream limits are hit often.
fn config(role: Role) -> impl Strategy<Value = Config> {
    (
        1024u32..4096,
        1u32..=3,
        1u32..=3,
        64usize..2048,
        256usize..8192,
        1024usize..16384,
        1u32..8,
        1usize..6,
    )
        .prop_map(
            move |(window, growth, spare, split, stream_buf, buf, streams, backlog)| {
                let mut config = Config::new(role);
                config.settings.initial_stream_window = window;
                config.max_stream_window = window * growth;
                config.settings.connection_window = window * growth * 2 * spare;
                config.data_split = split;
                config.max_stream_send_buffer = stream_buf;
                config.max_send_buffer = buf;
                config.settings.max_concurrent_streams = streams;
                config.accept_backlog = backlog;
                config
            },
        )
}

/// Deterministic bytes that reveal loss, duplication and reordering.
fn bytes_for(stream: StreamId, side: usize, offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(stream.0 * 7 + side as u32) as u8
        })
        .collect()
}

struct World {
    net: Net,
    streams: Vec<Tracked>,
}

impl World {
    fn stream_index(&self, id: StreamId) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// Takes both sides' events into the model.
    fn observe(&mut self) {
        for side in [DEVICE, PLATFORM] {
            while let Some(event) = self.net.peers[side].conn.poll_event() {
                let Event::Reset { stream, .. } = event else {
                    continue;
                };
                if let Some(i) = self.stream_index(stream) {
                    self.streams[i].reset = true;
                }
            }
        }
    }

    fn accept_all(&mut self, side: usize) -> Result<(), TestCaseError> {
        while let Some((id, _)) = self.net.peers[side].conn.accept() {
            let i = self.stream_index(id);
            prop_assert!(i.is_some(), "accepted stream {} that nobody opened", id);
            let stream = &mut self.streams[i.expect("checked")];
            prop_assert!(
                stream.opener != side && !stream.accepted,
                "stream {} accepted twice",
                id
            );
            stream.accepted = true;
        }
        Ok(())
    }

    fn read(&mut self, side: usize, i: usize, max: usize) -> Result<bool, TestCaseError> {
        let writer = 1 - side;
        let id = self.streams[i].id;
        let result = self.net.peers[side].conn.read(id, max);
        let stream = &mut self.streams[i];
        let dir = &mut stream.dirs[writer];
        match result {
            Ok(Some(chunk)) => {
                prop_assert!(!dir.eof, "data on stream {} after its end", id);
                prop_assert!(chunk.len() <= max);
                dir.read.extend_from_slice(&chunk);
                prop_assert!(
                    dir.written.starts_with(&dir.read),
                    "stream {} delivered bytes that were not written, or out of order",
                    id
                );
                Ok(!chunk.is_empty())
            }
            Ok(None) => {
                prop_assert!(dir.finished, "stream {} ended without a finish", id);
                prop_assert_eq!(
                    dir.read.len(),
                    dir.written.len(),
                    "stream {} ended early",
                    id
                );
                dir.eof = true;
                Ok(false)
            }
            Err(ReadError::Reset(_)) => {
                stream.reset = true;
                Ok(false)
            }
            Err(
                ReadError::Blocked | ReadError::UnknownStream(_) | ReadError::ConnectionLost(_),
            ) => Ok(false),
        }
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        let pick = |streams: &Vec<Tracked>, side: usize, i: usize| {
            let usable: Vec<usize> = (0..streams.len())
                .filter(|&j| streams[j].usable_by(side))
                .collect();
            (!usable.is_empty()).then(|| usable[i % usable.len()])
        };
        match op {
            Op::Open(side) => {
                let header = ServiceHeader::new(Service::Tcp("svc".into()));
                if let Ok(id) = self.net.peers[side].conn.open(header) {
                    prop_assert!(self.stream_index(id).is_none(), "stream id {} reused", id);
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
            Op::Accept(side) => self.accept_all(side)?,
            Op::Write(side, i, len) => {
                let Some(i) = pick(&self.streams, side, i) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                let offset = self.streams[i].dirs[side].written.len();
                let data = bytes_for(id, side, offset, len);
                let result = self.net.peers[side].conn.write(id, &data);
                let stream = &mut self.streams[i];
                match result {
                    Ok(n) => {
                        prop_assert!(!stream.dirs[side].finished, "write after finish on {}", id);
                        prop_assert!(n <= len && (n > 0 || len == 0));
                        stream.dirs[side].written.extend_from_slice(&data[..n]);
                    }
                    Err(WriteError::Finished) => prop_assert!(stream.dirs[side].finished),
                    Err(WriteError::Reset(_)) => stream.reset = true,
                    Err(
                        WriteError::Blocked
                        | WriteError::UnknownStream(_)
                        | WriteError::ConnectionLost(_),
                    ) => {}
                }
            }
            Op::Read(side, i, max) => {
                if let Some(i) = pick(&self.streams, side, i) {
                    self.read(side, i, max)?;
                }
            }
            Op::Finish(side, i) => {
                let Some(i) = pick(&self.streams, side, i) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                if self.net.peers[side].conn.finish(id).is_ok() {
                    let dir = &mut self.streams[i].dirs[side];
                    prop_assert!(!dir.finished, "finished {} twice", id);
                    dir.finished = true;
                }
            }
            Op::Reset(side, i) => {
                let Some(i) = pick(&self.streams, side, i) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                self.net.peers[side]
                    .conn
                    .reset(id, ResetCode::CANCEL, "property test");
                self.streams[i].reset = true;
                self.streams[i].released[side] = true;
            }
            Op::Release(side, i) => {
                let Some(i) = pick(&self.streams, side, i) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                self.net.peers[side].conn.release(id);
                let stream = &mut self.streams[i];
                stream.released[side] = true;
                stream.dirs[side].finished = true;
                stream.dirs[1 - side].reader_gone = true;
            }
            Op::Transmit(side) => {
                self.net.transmit(side)?;
            }
            Op::Deliver(side, count) => self.net.deliver(side, count),
            Op::Advance(ms) => self.net.advance(Duration::from_millis(ms))?,
            Op::Shutdown(side) => self.net.peers[side]
                .conn
                .shutdown(CloseCode::NO_ERROR, "done"),
        }
        self.observe();
        for peer in &self.net.peers {
            let config = peer.conn.config();
            let bound = config.settings.connection_window as usize + config.max_send_buffer;
            prop_assert!(
                peer.conn.buffered_bytes() <= bound,
                "{} bytes buffered",
                peer.conn.buffered_bytes()
            );
        }
        Ok(())
    }

    /// Accepts and reads everything and moves every message, until quiet.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..100_000 {
            self.accept_all(DEVICE)?;
            self.accept_all(PLATFORM)?;
            let mut progress = false;
            for i in 0..self.streams.len() {
                for side in [DEVICE, PLATFORM] {
                    while self.streams[i].usable_by(side) && self.read(side, i, usize::MAX)? {
                        progress = true;
                    }
                }
            }
            progress |= self.net.transmit(DEVICE)?;
            progress |= self.net.transmit(PLATFORM)?;
            if let Some(next) = self.net.next_arrival() {
                self.net.now = self.net.now.max(next);
                self.net.deliver_due();
                progress = true;
            }
            self.observe();
            if !progress {
                return Ok(());
            }
        }
        Err(TestCaseError::fail("settle() livelocked"))
    }

    fn check_delivery(&self) -> Result<(), TestCaseError> {
        let closed = self.net.peers.iter().any(|p| p.conn.is_closed());
        for peer in &self.net.peers {
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
            prop_assert!(orderly, "an honest pair closed with {:?}", reason);
        }
        for stream in &self.streams {
            for writer in [DEVICE, PLATFORM] {
                let dir = &stream.dirs[writer];
                prop_assert!(dir.written.starts_with(&dir.read));
                if stream.reset || closed || dir.reader_gone {
                    continue;
                }
                prop_assert!(
                    stream.accepted,
                    "stream {} was neither accepted nor reset",
                    stream.id
                );
                prop_assert_eq!(
                    dir.read.len(),
                    dir.written.len(),
                    "stream {} from peer {} delivered {} of {} bytes",
                    stream.id,
                    writer,
                    dir.read.len(),
                    dir.written.len()
                );
                prop_assert_eq!(
                    dir.eof,
                    dir.finished,
                    "stream {} from peer {}: end of stream",
                    stream.id,
                    writer
                );
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_interleavings_deliver_exactly_what_was_written(
        device in config(Role::Device),
        platform in config(Role::Platform),
        latency in 0u64..40,
        ops in vec(op(), 1..250),
        shutdown in proptest::option::weighted(0.2, (0usize..2, 0usize..250)),
    ) {
        let net = Net::new(device, platform, Duration::from_millis(latency));
        let mut world = World { net, streams: Vec::new() };
        world.settle()?;
        for peer in &world.net.peers {
            prop_assert!(peer.conn.is_connected());
        }
        world.observe();
        for (i, op) in ops.into_iter().enumerate() {
            if let Some((side, _)) = shutdown.filter(|&(_, at)| at == i) {
                world.apply(Op::Shutdown(side))?;
            }
            world.apply(op)?;
        }
        world.settle()?;
        world.check_delivery()?;
    }
}
