//! Hand-written wire vectors for every frame type.
//!
//! Valid vectors must decode to the expected [`Frame`] and encode back to the
//! same bytes. Invalid vectors must fail with the exact [`FrameError`], so a
//! change in what the codec accepts or how it reports a fault shows up here.

use bytes::Bytes;
use hex_literal::hex;
use tether_proto::frame::MAX_REASON_LEN;
use tether_proto::hello::MAX_SETTINGS;
use tether_proto::{
    CloseCode, Frame, FrameError, Hello, ResetCode, Role, Service, ServiceError, ServiceHeader,
    Settings, StreamId,
};

fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    Frame::decode(&Bytes::copy_from_slice(bytes))
}

/// Joins pieces of a frame: hex fields and readable text.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The settings part of a HELLO carrying the defaults, in id order.
const DEFAULT_SETTINGS: [u8; 30] = hex!(
    "0001 00010000"
    "0002 00000100"
    "0003 00040000"
    "0004 01000000"
    "0005 00001000"
);

fn valid_vectors() -> Vec<(&'static str, Vec<u8>, Frame)> {
    let tcp = ServiceHeader::new(Service::Tcp("node-red".into()))
        .with("user", "alice")
        .with("role", "admin");
    vec![
        (
            "hello from a device with default settings",
            cat(&[
                &hex!("01 00 00000000 54544852 01 00 01 00"),
                &DEFAULT_SETTINGS,
            ]),
            Frame::Hello(Hello::new(Role::Device, Settings::DEFAULT)),
        ),
        (
            "hello from the platform with extreme settings",
            hex!(
                "01 00 00000000 54544852 01 00 02 00"
                "0001 00000400 0002 00000000 0003 7fffffff 0004 7fffffff 0005 0000ffff"
            )
            .to_vec(),
            Frame::Hello(Hello::new(
                Role::Platform,
                Settings {
                    max_frame_payload: 1024,
                    max_concurrent_streams: 0,
                    initial_stream_window: 0x7fff_ffff,
                    connection_window: 0x7fff_ffff,
                    max_open_payload: 65535,
                },
            )),
        ),
        (
            "hello of another major version, rest unparsed",
            cat(&[
                &hex!("01 00 00000000 54544852 02 07 01 00"),
                &DEFAULT_SETTINGS,
            ]),
            Frame::Hello(Hello {
                major: 2,
                minor: 7,
                role: Role::Device,
                settings: Settings::DEFAULT,
            }),
        ),
        (
            "open of a tcp service with metadata",
            cat(&[
                &hex!("02 00 00000001 04 08"),
                b"node-red",
                &hex!("02 04"),
                b"user",
                &hex!("0005"),
                b"alice",
                &hex!("04"),
                b"role",
                &hex!("0005"),
                b"admin",
            ]),
            Frame::Open {
                stream: StreamId(1),
                header: tcp,
            },
        ),
        (
            "open of control",
            hex!("02 00 00000002 01 00 00").to_vec(),
            Frame::Open {
                stream: StreamId(2),
                header: ServiceHeader::new(Service::Control),
            },
        ),
        (
            "open of the editor",
            hex!("02 00 00000003 02 00 00").to_vec(),
            Frame::Open {
                stream: StreamId(3),
                header: ServiceHeader::new(Service::Editor),
            },
        ),
        (
            "open of mqtt with an empty value",
            cat(&[&hex!("02 00 fffffffe 03 00 01 01"), b"k", &hex!("0000")]),
            Frame::Open {
                stream: StreamId(0xffff_fffe),
                header: ServiceHeader::new(Service::Mqtt).with("k", ""),
            },
        ),
        (
            "open of an unknown service kind",
            cat(&[&hex!("02 00 00000005 42 03"), b"a.b", &hex!("00")]),
            Frame::Open {
                stream: StreamId(5),
                header: ServiceHeader::new(Service::Other {
                    kind: 0x42,
                    name: "a.b".into(),
                }),
            },
        ),
        (
            "open of unknown kind 0 without a name",
            hex!("02 00 00000007 00 00 00").to_vec(),
            Frame::Open {
                stream: StreamId(7),
                header: ServiceHeader::new(Service::Other {
                    kind: 0,
                    name: String::new(),
                }),
            },
        ),
        (
            "accept",
            hex!("03 00 00000001").to_vec(),
            Frame::Accept {
                stream: StreamId(1),
            },
        ),
        (
            "data",
            cat(&[&hex!("04 00 00000001"), b"hello"]),
            Frame::Data {
                stream: StreamId(1),
                fin: false,
                payload: Bytes::from_static(b"hello"),
            },
        ),
        (
            "data with fin",
            cat(&[&hex!("04 01 00000002"), b"bye"]),
            Frame::Data {
                stream: StreamId(2),
                fin: true,
                payload: Bytes::from_static(b"bye"),
            },
        ),
        (
            "a bare fin",
            hex!("04 01 ffffffff").to_vec(),
            Frame::Data {
                stream: StreamId(u32::MAX),
                fin: true,
                payload: Bytes::new(),
            },
        ),
        (
            "window update of a stream",
            hex!("05 00 00000001 00000001").to_vec(),
            Frame::WindowUpdate {
                stream: StreamId(1),
                increment: 1,
            },
        ),
        (
            "window update of the connection",
            hex!("05 00 00000000 7fffffff").to_vec(),
            Frame::WindowUpdate {
                stream: StreamId::CONNECTION,
                increment: 0x7fff_ffff,
            },
        ),
        (
            "reset with a reason",
            cat(&[&hex!("06 00 00000003 00001000"), "refusé".as_bytes()]),
            Frame::Reset {
                stream: StreamId(3),
                code: ResetCode::APPLICATION_MIN,
                reason: "refusé".into(),
            },
        ),
        (
            "reset without a reason",
            hex!("06 00 00000003 00000005").to_vec(),
            Frame::Reset {
                stream: StreamId(3),
                code: ResetCode::STREAM_LIMIT,
                reason: String::new(),
            },
        ),
        (
            "ping",
            hex!("07 00 00000000 0102030405060708").to_vec(),
            Frame::Ping {
                ack: false,
                opaque: 0x0102_0304_0506_0708,
            },
        ),
        (
            "ping answer",
            hex!("07 01 00000000 ffffffffffffffff").to_vec(),
            Frame::Ping {
                ack: true,
                opaque: u64::MAX,
            },
        ),
        (
            "goaway",
            cat(&[&hex!("08 00 00000000 00000007 00000000"), b"maintenance"]),
            Frame::GoAway {
                last_stream: StreamId(7),
                code: CloseCode::NO_ERROR,
                reason: "maintenance".into(),
            },
        ),
        (
            "close with an unknown code",
            hex!("09 00 00000000 deadbeef").to_vec(),
            Frame::Close {
                code: CloseCode(0xdead_beef),
                reason: String::new(),
            },
        ),
        (
            "close with a reason of the maximum length",
            cat(&[&hex!("09 00 00000000 00000005"), &[b'x'; MAX_REASON_LEN]]),
            Frame::Close {
                code: CloseCode::VERSION_MISMATCH,
                reason: "x".repeat(MAX_REASON_LEN),
            },
        ),
        (
            "an ignorable frame of an unknown type",
            hex!("42 80 00000000").to_vec(),
            Frame::Ignored { kind: 0x42 },
        ),
    ]
}

#[test]
fn valid_vectors_decode_to_the_expected_frame_and_encode_to_the_same_bytes() {
    for (name, bytes, frame) in valid_vectors() {
        assert_eq!(decode(&bytes), Ok(frame.clone()), "decoding {name}");
        assert_eq!(frame.to_bytes(), bytes, "encoding {name}");
        assert_eq!(frame.encoded_len(), bytes.len(), "length of {name}");
    }
}

#[test]
fn every_frame_type_has_a_valid_vector() {
    let kinds: std::collections::BTreeSet<u8> = valid_vectors()
        .iter()
        .map(|(_, bytes, _)| bytes[0])
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x42]
    );
}

#[test]
fn lenient_vectors_decode_to_their_meaning() {
    let device_hello = |settings| Frame::Hello(Hello::new(Role::Device, settings));
    let cases: Vec<(&str, Vec<u8>, Frame)> = vec![
        (
            "hello without settings takes the defaults",
            hex!("01 00 00000000 54544852 01 00 01 00").to_vec(),
            device_hello(Settings::DEFAULT),
        ),
        (
            "hello skips unknown settings and accepts any order",
            hex!("01 00 00000000 54544852 01 05 01 00 0005 00000040 7777 ffffffff 0001 00000800")
                .to_vec(),
            Frame::Hello(Hello {
                major: 1,
                minor: 5,
                role: Role::Device,
                settings: Settings {
                    max_open_payload: 64,
                    max_frame_payload: 2048,
                    ..Settings::DEFAULT
                },
            }),
        ),
        (
            "hello with exactly the most settings",
            hello_with_settings(MAX_SETTINGS),
            device_hello(Settings::DEFAULT),
        ),
        (
            "ignorable unknown frame with a stream and payload",
            hex!("fe 81 00000009 010203").to_vec(),
            Frame::Ignored { kind: 0xfe },
        ),
        (
            "known type with the ignorable bit",
            hex!("07 80 00000000 0000000000000001").to_vec(),
            Frame::Ping {
                ack: false,
                opaque: 1,
            },
        ),
    ];
    for (name, bytes, frame) in cases {
        assert_eq!(decode(&bytes), Ok(frame), "{name}");
    }
}

/// A device HELLO with `count` distinct unknown settings.
fn hello_with_settings(count: usize) -> Vec<u8> {
    let mut bytes = hex!("01 00 00000000 54544852 01 00 01 00").to_vec();
    for id in 0..count {
        bytes.extend_from_slice(&(0x1000 + id as u16).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 1]);
    }
    bytes
}

fn assert_rejected(cases: &[(&str, Vec<u8>, FrameError)]) {
    for (name, bytes, error) in cases {
        assert_eq!(decode(bytes), Err(error.clone()), "{name}");
    }
}

#[test]
fn truncated_frames_say_how_many_bytes_are_missing() {
    assert_rejected(&[
        (
            "empty message",
            vec![],
            FrameError::Incomplete { needed: 6 },
        ),
        (
            "header cut short",
            hex!("07 00 0000").to_vec(),
            FrameError::Incomplete { needed: 2 },
        ),
        (
            "ping without its opaque value",
            hex!("07 00 00000000 010203").to_vec(),
            FrameError::Incomplete { needed: 5 },
        ),
        (
            "window update cut short",
            hex!("05 00 00000001 0000").to_vec(),
            FrameError::Incomplete { needed: 2 },
        ),
        (
            "reset without a whole code",
            hex!("06 00 00000001 00").to_vec(),
            FrameError::Incomplete { needed: 3 },
        ),
        (
            "goaway without a code",
            hex!("08 00 00000000 00000001").to_vec(),
            FrameError::Incomplete { needed: 4 },
        ),
        (
            "close without a code",
            hex!("09 00 00000000").to_vec(),
            FrameError::Incomplete { needed: 4 },
        ),
        (
            "hello with half the magic",
            hex!("01 00 00000000 5454").to_vec(),
            FrameError::Incomplete { needed: 2 },
        ),
        (
            "hello without a role",
            hex!("01 00 00000000 54544852 01 00").to_vec(),
            FrameError::Incomplete { needed: 1 },
        ),
        (
            "hello with half a setting",
            hex!("01 00 00000000 54544852 01 00 01 00 0001 0001").to_vec(),
            FrameError::Incomplete { needed: 2 },
        ),
        (
            "open without a kind",
            hex!("02 00 00000001").to_vec(),
            FrameError::Incomplete { needed: 1 },
        ),
        (
            "open whose name runs past the end",
            hex!("02 00 00000001 04 05 616263").to_vec(),
            FrameError::Incomplete { needed: 2 },
        ),
        (
            "open without a metadata count",
            hex!("02 00 00000001 01 00").to_vec(),
            FrameError::Incomplete { needed: 1 },
        ),
        (
            "open whose value runs past the end",
            cat(&[
                &hex!("02 00 00000001 01 00 01 01"),
                b"k",
                &hex!("0004 6162"),
            ]),
            FrameError::Incomplete { needed: 2 },
        ),
    ]);
}

#[test]
fn header_faults_are_rejected_with_the_exact_error() {
    assert_rejected(&[
        (
            "unknown type",
            hex!("42 00 00000000").to_vec(),
            FrameError::UnknownType { kind: 0x42 },
        ),
        (
            "type zero",
            hex!("00 00 00000000").to_vec(),
            FrameError::UnknownType { kind: 0 },
        ),
        (
            "unknown type with other flags",
            hex!("0a 01 00000000").to_vec(),
            FrameError::UnknownType { kind: 0x0a },
        ),
        (
            "data with an undefined flag",
            hex!("04 02 00000001").to_vec(),
            FrameError::UnexpectedFlags {
                kind: 0x04,
                flags: 0x02,
            },
        ),
        (
            "ping with an undefined flag",
            hex!("07 40 00000000 0000000000000000").to_vec(),
            FrameError::UnexpectedFlags {
                kind: 0x07,
                flags: 0x40,
            },
        ),
        (
            "hello with the fin bit",
            hex!("01 01 00000000").to_vec(),
            FrameError::UnexpectedFlags {
                kind: 0x01,
                flags: 0x01,
            },
        ),
        (
            "accept with a flag",
            hex!("03 81 00000001").to_vec(),
            FrameError::UnexpectedFlags {
                kind: 0x03,
                flags: 0x81,
            },
        ),
        (
            "data on stream 0",
            hex!("04 00 00000000 ff").to_vec(),
            FrameError::MissingStreamId { kind: 0x04 },
        ),
        (
            "open on stream 0",
            hex!("02 00 00000000 01 00 00").to_vec(),
            FrameError::MissingStreamId { kind: 0x02 },
        ),
        (
            "accept on stream 0",
            hex!("03 00 00000000").to_vec(),
            FrameError::MissingStreamId { kind: 0x03 },
        ),
        (
            "reset on stream 0",
            hex!("06 00 00000000 00000000").to_vec(),
            FrameError::MissingStreamId { kind: 0x06 },
        ),
        (
            "ping on a stream",
            hex!("07 00 00000001 0000000000000000").to_vec(),
            FrameError::UnexpectedStreamId {
                kind: 0x07,
                stream: 1,
            },
        ),
        (
            "hello on a stream",
            hex!("01 00 00000002 54544852 01 00 01 00").to_vec(),
            FrameError::UnexpectedStreamId {
                kind: 0x01,
                stream: 2,
            },
        ),
        (
            "goaway on a stream",
            hex!("08 00 80000000 00000000 00000000").to_vec(),
            FrameError::UnexpectedStreamId {
                kind: 0x08,
                stream: 0x8000_0000,
            },
        ),
        (
            "close on a stream",
            hex!("09 00 ffffffff 00000000").to_vec(),
            FrameError::UnexpectedStreamId {
                kind: 0x09,
                stream: u32::MAX,
            },
        ),
    ]);
}

#[test]
fn payload_faults_are_rejected_with_the_exact_error() {
    assert_rejected(&[
        (
            "zero window increment",
            hex!("05 00 00000001 00000000").to_vec(),
            FrameError::InvalidWindowIncrement { increment: 0 },
        ),
        (
            "window increment of 2^31",
            hex!("05 00 00000000 80000000").to_vec(),
            FrameError::InvalidWindowIncrement {
                increment: 0x8000_0000,
            },
        ),
        (
            "window increment of 2^32-1",
            hex!("05 00 00000001 ffffffff").to_vec(),
            FrameError::InvalidWindowIncrement {
                increment: u32::MAX,
            },
        ),
        (
            "ping with a trailing byte",
            hex!("07 00 00000000 0000000000000000 00").to_vec(),
            FrameError::TrailingBytes {
                kind: 0x07,
                extra: 1,
            },
        ),
        (
            "window update with trailing bytes",
            hex!("05 00 00000001 00000001 0000").to_vec(),
            FrameError::TrailingBytes {
                kind: 0x05,
                extra: 2,
            },
        ),
        (
            "accept with a payload",
            hex!("03 00 00000001 00").to_vec(),
            FrameError::TrailingBytes {
                kind: 0x03,
                extra: 1,
            },
        ),
        (
            "open with bytes after the metadata",
            hex!("02 00 00000001 01 00 00 abcd").to_vec(),
            FrameError::TrailingBytes {
                kind: 0x02,
                extra: 2,
            },
        ),
        (
            "close with a reason one byte too long",
            cat(&[
                &hex!("09 00 00000000 00000000"),
                &[b'x'; MAX_REASON_LEN + 1],
            ]),
            FrameError::ReasonTooLong {
                len: MAX_REASON_LEN + 1,
            },
        ),
        (
            "goaway with a reason far too long",
            cat(&[&hex!("08 00 00000000 00000000 00000000"), &[b'x'; 1000]]),
            FrameError::ReasonTooLong { len: 1000 },
        ),
        (
            "reset with a reason that is not UTF-8",
            hex!("06 00 00000001 00000000 c328").to_vec(),
            FrameError::ReasonNotUtf8,
        ),
        (
            "close with a reason that is not UTF-8",
            hex!("09 00 00000000 00000000 ff").to_vec(),
            FrameError::ReasonNotUtf8,
        ),
        (
            "goaway with a reason that is not UTF-8",
            hex!("08 00 00000000 00000000 00000000 80").to_vec(),
            FrameError::ReasonNotUtf8,
        ),
    ]);
}

#[test]
fn hello_faults_are_rejected_with_the_exact_error() {
    let hello = |tail: &[u8]| cat(&[&hex!("01 00 00000000 54544852 01 00 01 00"), tail]);
    let invalid = |setting, value| FrameError::InvalidSetting { setting, value };
    assert_rejected(&[
        (
            "bad magic",
            hex!("01 00 00000000 54544853 01 00 01 00").to_vec(),
            FrameError::BadMagic,
        ),
        (
            "lower-case magic",
            hex!("01 00 00000000 74746872 01 00 01 00").to_vec(),
            FrameError::BadMagic,
        ),
        (
            "role zero",
            hex!("01 00 00000000 54544852 01 00 00 00").to_vec(),
            FrameError::UnknownRole { role: 0 },
        ),
        (
            "role three",
            hex!("01 00 00000000 54544852 01 00 03 00").to_vec(),
            FrameError::UnknownRole { role: 3 },
        ),
        (
            "a setting twice",
            hello(&hex!("0003 00001000 0001 00001000 0003 00002000")),
            FrameError::DuplicateSetting { setting: 3 },
        ),
        (
            "an unknown setting twice",
            hello(&hex!("7777 00000000 7777 00000000")),
            FrameError::DuplicateSetting { setting: 0x7777 },
        ),
        (
            "max frame payload below 1 KiB",
            hello(&hex!("0001 000003ff")),
            invalid(1, 1023),
        ),
        (
            "max frame payload above 16 MiB",
            hello(&hex!("0001 01000001")),
            invalid(1, 0x0100_0001),
        ),
        (
            "initial stream window below 1 KiB",
            hello(&hex!("0003 00000000")),
            invalid(3, 0),
        ),
        (
            "initial stream window above 2^31-1",
            hello(&hex!("0003 80000000")),
            invalid(3, 0x8000_0000),
        ),
        (
            "connection window below 1 KiB",
            hello(&hex!("0004 000003ff")),
            invalid(4, 1023),
        ),
        (
            "max open payload below 64",
            hello(&hex!("0005 0000003f")),
            invalid(5, 63),
        ),
        (
            "max open payload above 65535",
            hello(&hex!("0005 00010000")),
            invalid(5, 65536),
        ),
        (
            "one setting too many",
            hello_with_settings(MAX_SETTINGS + 1),
            FrameError::TooManySettings,
        ),
    ]);
}

#[test]
fn service_header_faults_are_rejected_with_the_exact_error() {
    let service = |e: ServiceError| FrameError::Service(e);
    let open = |body: &[u8]| cat(&[&hex!("02 00 00000001"), body]);
    let mut too_many = hex!("02 00 00000001 02 00 21").to_vec();
    for i in 0..33u8 {
        too_many.extend_from_slice(&[1, b'a' + i % 26, 0, 0]);
    }
    assert_rejected(&[
        (
            "tcp without a name",
            open(&hex!("04 00 00")),
            service(ServiceError::MissingName),
        ),
        (
            "control with a name",
            cat(&[&open(&hex!("01 03")), b"abc", &hex!("00")]),
            service(ServiceError::UnexpectedName { kind: 1 }),
        ),
        (
            "mqtt with a name",
            cat(&[&open(&hex!("03 01")), b"a", &hex!("00")]),
            service(ServiceError::UnexpectedName { kind: 3 }),
        ),
        (
            "a name with a space",
            cat(&[&open(&hex!("04 03")), b"a b", &hex!("00")]),
            service(ServiceError::InvalidToken("a b".into())),
        ),
        (
            "a name with a slash",
            cat(&[&open(&hex!("04 04")), b"../x", &hex!("00")]),
            service(ServiceError::InvalidToken("../x".into())),
        ),
        (
            "a name of 65 bytes",
            cat(&[&open(&hex!("04 41")), &[b'n'; 65], &hex!("00")]),
            service(ServiceError::InvalidToken("n".repeat(65))),
        ),
        (
            "a name that is not UTF-8",
            open(&hex!("04 01 ff 00")),
            service(ServiceError::InvalidToken("\u{fffd}".into())),
        ),
        (
            "an unknown kind with a bad name",
            cat(&[&open(&hex!("42 01")), b"?", &hex!("00")]),
            service(ServiceError::InvalidToken("?".into())),
        ),
        (
            "an empty metadata key",
            open(&hex!("01 00 01 00 0000")),
            service(ServiceError::InvalidToken(String::new())),
        ),
        (
            "a metadata key with a colon",
            cat(&[&open(&hex!("01 00 01 02")), b"a:", &hex!("0000")]),
            service(ServiceError::InvalidToken("a:".into())),
        ),
        (
            "a duplicate metadata key",
            cat(&[
                &open(&hex!("02 00 02 04")),
                b"user",
                &hex!("0001"),
                b"a",
                &hex!("04"),
                b"user",
                &hex!("0001"),
                b"b",
            ]),
            service(ServiceError::DuplicateKey("user".into())),
        ),
        (
            "a metadata value that is not UTF-8",
            cat(&[&open(&hex!("02 00 01 04")), b"user", &hex!("0001 ff")]),
            service(ServiceError::ValueNotUtf8("user".into())),
        ),
        (
            "33 metadata entries",
            too_many,
            service(ServiceError::TooManyEntries),
        ),
    ]);
}

#[test]
fn decode_errors_map_to_close_codes() {
    let size = [
        FrameError::Incomplete { needed: 1 },
        FrameError::TrailingBytes { kind: 7, extra: 1 },
    ];
    for error in size {
        assert_eq!(error.close_code(), CloseCode::FRAME_SIZE_ERROR, "{error}");
    }
    let protocol = [
        FrameError::UnknownType { kind: 0x42 },
        FrameError::UnexpectedFlags { kind: 4, flags: 2 },
        FrameError::BadMagic,
        FrameError::ReasonNotUtf8,
        FrameError::Service(ServiceError::MissingName),
    ];
    for error in protocol {
        assert_eq!(error.close_code(), CloseCode::PROTOCOL_ERROR, "{error}");
    }
}

#[test]
fn encoding_cuts_long_reasons_on_a_character_boundary() {
    // 255 ASCII bytes then a two-byte character: the character does not fit.
    let reason = format!("{}é and more", "x".repeat(MAX_REASON_LEN - 1));
    let frame = Frame::Close {
        code: CloseCode::NO_ERROR,
        reason,
    };
    let bytes = frame.to_bytes();
    assert_eq!(bytes.len(), frame.encoded_len());
    let expected = Frame::Close {
        code: CloseCode::NO_ERROR,
        reason: "x".repeat(MAX_REASON_LEN - 1),
    };
    assert_eq!(decode(&bytes), Ok(expected));

    let frame = Frame::Reset {
        stream: StreamId(1),
        code: ResetCode::CANCEL,
        reason: "é".repeat(200),
    };
    let expected = Frame::Reset {
        stream: StreamId(1),
        code: ResetCode::CANCEL,
        reason: "é".repeat(MAX_REASON_LEN / 2),
    };
    assert_eq!(decode(&frame.to_bytes()), Ok(expected));
}
