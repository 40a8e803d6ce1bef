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

use std::time::Duration;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use tether_proto::hello::PROTOCOL_MAJOR;
use tether_proto::testing::{Link, Op, Side, World, start_time};
use tether_proto::{
    CloseCode, Config, Connection, Frame, Hello, MAX_WINDOW, ResetCode, Role, Service,
    ServiceHeader, Settings, StreamId,
};

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
        Just(Service::Audit),
        Just(Service::Snapshot),
        token().prop_map(Service::Tcp),
        (
            any::<u8>().prop_filter("an unknown kind", |k| !tether_proto::KNOWN_KINDS
                .contains(k)),
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
                        let frame = Frame::decode(&msg);
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
// Two connections and random interleavings of stream operations, on the
// harness's `Link` (which checks every frame against the receiver's limits and
// credit) and `World` (which models every stream).

fn side() -> impl Strategy<Value = Side> + Clone {
    prop_oneof![Just(Side::Device), Just(Side::Platform)]
}

fn op() -> impl Strategy<Value = Op> {
    let stream = 0usize..16;
    prop_oneof![
        3 => side().prop_map(Op::Open),
        3 => side().prop_map(Op::Accept),
        8 => (side(), stream.clone(), 0usize..6000)
            .prop_map(|(side, stream, len)| Op::Write { side, stream, len }),
        8 => (side(), stream.clone(), 0usize..6000)
            .prop_map(|(side, stream, max)| Op::Read { side, stream, max }),
        1 => (side(), stream.clone()).prop_map(|(side, stream)| Op::Finish { side, stream }),
        1 => (side(), stream.clone()).prop_map(|(side, stream)| Op::Reset {
            side,
            stream,
            code: ResetCode::CANCEL
        }),
        1 => (side(), stream).prop_map(|(side, stream)| Op::Release { side, stream }),
        5 => side().prop_map(Op::Transmit),
        8 => (side(), 1usize..8).prop_map(|(to, count)| Op::Deliver { to, count }),
        2 => (0u64..4000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_interleavings_deliver_exactly_what_was_written(
        device in config(Role::Device),
        platform in config(Role::Platform),
        latency in 0u64..40,
        ops in vec(op(), 1..250),
        shutdown in proptest::option::weighted(0.2, (side(), 0usize..250)),
    ) {
        let link = Link::new(device, platform, Duration::from_millis(latency))?;
        let mut world = World::connect(link)?;
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
