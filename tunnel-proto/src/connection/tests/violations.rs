//! A peer that breaks the rules: hand-made frames fed to the platform as if
//! the device had sent them. Each rule broken closes the connection with the
//! code `docs/protocol.md` gives it; frames within the rules do not.

use hex_literal::hex;

use super::pair::{Device, Pair, Platform, configs, tcp};
use crate::codes::{CloseCode, ResetCode};
use crate::frame::{Frame, StreamId};
use crate::service::{Service, ServiceHeader};

const STREAM_WINDOW: usize = 4096;
const CONNECTION_WINDOW: usize = 16384;

/// A connected pair where the platform grants 4 KiB per stream and 16 KiB
/// per connection, and the device has opened `streams` streams (1, 3, ...).
fn victim(streams: usize) -> (Pair, Vec<StreamId>) {
    let (device, mut platform) = configs();
    platform.settings.initial_stream_window = STREAM_WINDOW as u32;
    platform.max_stream_window = STREAM_WINDOW as u32;
    platform.settings.connection_window = CONNECTION_WINDOW as u32;
    platform.max_pending_control = 16;
    let mut pair = Pair::connected_with(device, platform);
    let ids = (0..streams)
        .map(|_| pair.open(Device, tcp()).unwrap())
        .collect();
    pair.drive();
    pair.events(Platform);
    (pair, ids)
}

fn data(stream: StreamId, fin: bool, len: usize) -> Vec<u8> {
    Frame::Data {
        stream,
        fin,
        payload: vec![0xaa; len].into(),
    }
    .to_bytes()
}

/// Feeds `frames` to the platform: all but the last must be accepted, the
/// last must close the connection with `code`.
fn assert_last_breaks_the_rules(pair: &mut Pair, frames: &[Vec<u8>], code: CloseCode) {
    let (last, fine) = frames.split_last().expect("at least one frame");
    for (i, frame) in fine.iter().enumerate() {
        pair.inject(Platform, frame.clone());
        assert!(
            pair.conn(Platform).is_connected(),
            "frame {i} was refused: {:?}",
            pair.conn(Platform).close_reason()
        );
    }
    pair.inject(Platform, last.clone());
    pair.assert_violation(Platform, code);
}

#[test]
fn a_peer_exceeding_the_stream_window_is_closed_with_flow_control_error() {
    let (mut pair, ids) = victim(1);
    let frames = [
        data(ids[0], false, STREAM_WINDOW - 1),
        data(ids[0], false, 1),
        data(ids[0], false, 1),
    ];
    assert_last_breaks_the_rules(&mut pair, &frames, CloseCode::FLOW_CONTROL_ERROR);

    let (mut pair, ids) = victim(1);
    assert_last_breaks_the_rules(
        &mut pair,
        &[data(ids[0], false, STREAM_WINDOW + 1)],
        CloseCode::FLOW_CONTROL_ERROR,
    );
}

#[test]
fn a_peer_exceeding_the_connection_window_is_closed_with_flow_control_error() {
    let streams = CONNECTION_WINDOW / STREAM_WINDOW + 1;
    let (mut pair, ids) = victim(streams);
    let mut frames: Vec<Vec<u8>> = ids[..streams - 1]
        .iter()
        .map(|&id| data(id, false, STREAM_WINDOW))
        .collect();
    frames.push(data(ids[streams - 1], false, 1));
    assert_last_breaks_the_rules(&mut pair, &frames, CloseCode::FLOW_CONTROL_ERROR);
}

#[test]
fn bytes_on_a_closed_stream_still_count_against_the_connection_window() {
    let streams = CONNECTION_WINDOW / STREAM_WINDOW;
    let (mut pair, ids) = victim(streams);
    for &id in &ids {
        pair.conn(Platform).reset(id, ResetCode::REFUSED, "");
    }
    let mut frames: Vec<Vec<u8>> = ids
        .iter()
        .map(|&id| data(id, false, STREAM_WINDOW))
        .collect();
    frames.push(data(ids[0], false, 1));
    assert_last_breaks_the_rules(&mut pair, &frames, CloseCode::FLOW_CONTROL_ERROR);
}

#[test]
fn a_window_above_two_to_the_31_is_a_flow_control_error() {
    for stream in [StreamId(1), StreamId::CONNECTION] {
        let (mut pair, _) = victim(1);
        let update = Frame::WindowUpdate {
            stream,
            increment: crate::MAX_WINDOW,
        }
        .to_bytes();
        assert_last_breaks_the_rules(&mut pair, &[update], CloseCode::FLOW_CONTROL_ERROR);
    }
}

#[test]
fn a_frame_larger_than_max_frame_payload_is_closed_with_frame_size_error() {
    let (mut pair, ids) = victim(1);
    let limit = pair.conn(Platform).config().settings.max_frame_payload as usize;
    assert_last_breaks_the_rules(
        &mut pair,
        &[data(ids[0], false, limit + 1)],
        CloseCode::FRAME_SIZE_ERROR,
    );

    // Padding after a fixed-size payload is a size error too.
    let (mut pair, _) = victim(0);
    let mut ping = Frame::Ping {
        ack: false,
        opaque: 1,
    }
    .to_bytes();
    ping.push(0);
    assert_last_breaks_the_rules(&mut pair, &[ping], CloseCode::FRAME_SIZE_ERROR);
}

#[test]
fn data_after_fin_is_a_protocol_error() {
    let (mut pair, ids) = victim(1);
    let frames = [
        data(ids[0], false, 10),
        data(ids[0], true, 10),
        data(ids[0], false, 1),
    ];
    assert_last_breaks_the_rules(&mut pair, &frames, CloseCode::PROTOCOL_ERROR);

    // An empty DATA frame after FIN too.
    let (mut pair, ids) = victim(1);
    assert_last_breaks_the_rules(
        &mut pair,
        &[data(ids[0], true, 0), data(ids[0], true, 0)],
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn a_frame_for_a_stream_never_opened_is_a_protocol_error() {
    // The device opened stream 1 only; the platform opened none.
    let reset = |id| {
        Frame::Reset {
            stream: StreamId(id),
            code: ResetCode::CANCEL,
            reason: String::new(),
        }
        .to_bytes()
    };
    let update = |id| {
        Frame::WindowUpdate {
            stream: StreamId(id),
            increment: 1,
        }
        .to_bytes()
    };
    let cases: [(&str, Vec<u8>); 6] = [
        (
            "DATA on a device id above the highest opened",
            data(StreamId(3), false, 1),
        ),
        (
            "DATA on a platform id not yet used",
            data(StreamId(2), false, 1),
        ),
        ("WINDOW_UPDATE on a device id", update(5)),
        ("RESET on a platform id", reset(4)),
        (
            "ACCEPT of a platform id",
            Frame::Accept {
                stream: StreamId(2),
            }
            .to_bytes(),
        ),
        (
            "ACCEPT of a stream the device opened itself",
            Frame::Accept {
                stream: StreamId(1),
            }
            .to_bytes(),
        ),
    ];
    for (name, frame) in cases {
        let (mut pair, _) = victim(1);
        pair.inject(Platform, frame);
        assert!(pair.conn(Platform).is_closed(), "{name}");
        pair.assert_violation(Platform, CloseCode::PROTOCOL_ERROR);
    }
}

#[test]
fn opens_with_bad_ids_or_headers_are_refused() {
    let open = |id, header: ServiceHeader| {
        Frame::Open {
            stream: StreamId(id),
            header,
        }
        .to_bytes()
    };
    let big = ServiceHeader::new(Service::Editor).with("token", "x".repeat(5000));
    let cases: [(&str, Vec<Vec<u8>>, CloseCode); 5] = [
        (
            "an even id from the device",
            vec![open(2, tcp())],
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            "an id reused",
            vec![open(3, tcp()), open(3, tcp())],
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            "an id going down",
            vec![open(7, tcp()), open(5, tcp())],
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            "a header above max_open_payload",
            vec![open(3, big)],
            CloseCode::LIMIT_EXCEEDED,
        ),
        (
            "a tcp service without a name",
            vec![hex!("02 00 00000003 04 00 00").to_vec()],
            CloseCode::PROTOCOL_ERROR,
        ),
    ];
    for (name, frames, code) in cases {
        let (mut pair, _) = victim(1);
        for frame in frames {
            pair.inject(Platform, frame);
        }
        assert!(pair.conn(Platform).is_closed(), "{name}");
        pair.assert_violation(Platform, code);
    }
}

#[test]
fn undecodable_frames_close_with_the_matching_code() {
    let cases: [(&str, &[u8], CloseCode); 7] = [
        (
            "a truncated header",
            &hex!("07 00 0000"),
            CloseCode::FRAME_SIZE_ERROR,
        ),
        (
            "a truncated ping",
            &hex!("07 00 00000000 00000001"),
            CloseCode::FRAME_SIZE_ERROR,
        ),
        (
            "an unknown type not marked ignorable",
            &hex!("42 00 00000000"),
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            "an undefined flag",
            &hex!("07 02 00000000 0000000000000001"),
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            "DATA on stream 0",
            &hex!("04 00 00000000 ff"),
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            "a zero window increment",
            &hex!("05 00 00000001 00000000"),
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            "a reason that is not UTF-8",
            &hex!("09 00 00000000 00000000 ff"),
            CloseCode::PROTOCOL_ERROR,
        ),
    ];
    for (name, bytes, code) in cases {
        let (mut pair, _) = victim(1);
        pair.inject(Platform, bytes.to_vec());
        assert!(pair.conn(Platform).is_closed(), "{name}");
        pair.assert_violation(Platform, code);
    }
}

#[test]
fn ignorable_unknown_frames_are_skipped() {
    let (mut pair, ids) = victim(1);
    pair.inject(Platform, hex!("42 80 00000007 0102030405").to_vec());
    pair.inject(Platform, hex!("ff 81 00000000").to_vec());
    assert!(pair.conn(Platform).is_connected());
    pair.drive();
    let (id, _) = pair.conn(Platform).accept().unwrap();
    assert_eq!(id, ids[0]);
}

#[test]
fn a_ping_flood_with_our_output_unread_ends_with_limit_exceeded() {
    let (mut pair, _) = victim(0);
    let limit = pair.conn(Platform).config().max_pending_control;
    pair.link.peer_mut(Platform).transmitting = false;
    pair.clear_sent();
    for i in 0..limit {
        pair.inject(
            Platform,
            Frame::Ping {
                ack: false,
                opaque: i as u64,
            }
            .to_bytes(),
        );
        assert!(
            pair.conn(Platform).is_connected(),
            "closed after {} pings",
            i + 1
        );
    }
    pair.inject(
        Platform,
        Frame::Ping {
            ack: false,
            opaque: 0,
        }
        .to_bytes(),
    );
    pair.link.peer_mut(Platform).transmitting = true;
    pair.assert_violation(Platform, CloseCode::LIMIT_EXCEEDED);
    let pongs = pair
        .sent(Platform)
        .iter()
        .filter(|f| matches!(f, Frame::Ping { ack: true, .. }))
        .count();
    assert_eq!(pongs, 0, "only the CLOSE leaves a closed connection");
}

#[test]
fn a_ping_flood_whose_answers_are_read_is_served() {
    let (mut pair, _) = victim(0);
    for i in 0..1000 {
        pair.inject(
            Platform,
            Frame::Ping {
                ack: false,
                opaque: i,
            }
            .to_bytes(),
        );
        pair.transmit(Platform);
    }
    assert!(pair.conn(Platform).is_connected());
    let pongs = pair
        .sent(Platform)
        .iter()
        .filter(|f| matches!(f, Frame::Ping { ack: true, .. }))
        .count();
    assert!(pongs >= 1000);
}

#[test]
fn an_open_flood_with_our_output_unread_ends_with_limit_exceeded() {
    let (mut pair, _) = victim(0);
    pair.link.peer_mut(Platform).transmitting = false;
    let mut id = 1;
    while pair.conn(Platform).is_connected() {
        assert!(id < 2 * 1000, "never closed");
        pair.inject(
            Platform,
            Frame::Open {
                stream: StreamId(id),
                header: tcp(),
            }
            .to_bytes(),
        );
        id += 2;
    }
    pair.link.peer_mut(Platform).transmitting = true;
    pair.assert_violation(Platform, CloseCode::LIMIT_EXCEEDED);
    let backlog = pair.conn(Platform).config().accept_backlog;
    assert!(pair.conn(Platform).stream_count() <= backlog);
}
