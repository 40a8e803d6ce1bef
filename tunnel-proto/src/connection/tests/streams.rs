//! Streams: open and accept, data both ways, FIN, reset, release and the
//! limits on how many may be open or waiting.

use std::time::Duration;

use super::pair::{Device, Pair, Platform, configs, pattern, tcp};
use crate::codes::ResetCode;
use crate::connection::{Event, OpenError, ReadError, WriteError};
use crate::frame::{Frame, StreamId};
use crate::service::{Service, ServiceHeader};

#[test]
fn open_and_accept_deliver_the_service_header_and_its_metadata() {
    let mut pair = Pair::connected();
    let header = ServiceHeader::new(Service::Editor)
        .with("user", "alice")
        .with("role", "admin");

    let id = pair.open(Device, header.clone()).unwrap();
    assert_eq!(id, StreamId(1), "the device opens odd ids");
    pair.drive();
    assert_eq!(pair.events(Platform), [Event::Incoming]);
    let (accepted, got) = pair.conn(Platform).accept().unwrap();
    assert_eq!(accepted, id);
    assert_eq!(got, header);
    assert_eq!(
        (got.get("user"), got.get("role"), got.get("other")),
        (Some("alice"), Some("admin"), None)
    );
    assert_eq!(pair.conn(Platform).accept(), None);
    pair.drive();
    assert_eq!(pair.events(Device), [Event::Accepted(id)]);

    let id = pair.open_accepted(Platform, tcp());
    assert_eq!(id, StreamId(2), "the platform opens even ids");
    let id = pair.open_accepted(Device, ServiceHeader::new(Service::Mqtt));
    assert_eq!(id, StreamId(3));
    assert_eq!(pair.conn(Device).stats().streams_opened, 2);
    assert_eq!(pair.conn(Device).stats().streams_accepted, 1);
}

#[test]
fn data_flows_both_ways_in_order() {
    let mut pair = Pair::connected();
    let id = pair.open_accepted(Device, tcp());
    let up = pattern(1, 100_000);
    let down = pattern(2, 70_000);

    // Many writes of odd sizes each way, all in flight together.
    for (i, chunk) in up.chunks(3001).enumerate() {
        assert_eq!(pair.write_some(Device, id, chunk), chunk.len());
        if let Some(chunk) = down.chunks(2999).nth(i) {
            assert_eq!(pair.write_some(Platform, id, chunk), chunk.len());
        }
    }
    pair.drive();

    assert_eq!(pair.read_available(Platform, id), (up, false));
    assert_eq!(pair.read_available(Device, id), (down, false));
}

#[test]
fn data_written_before_the_accept_arrives_is_delivered() {
    let mut pair = Pair::connected();
    let id = pair.open(Device, tcp()).unwrap();
    pair.write_some(Device, id, b"early bytes");
    pair.conn(Device).finish(id).unwrap();
    pair.drive();
    let (accepted, _) = pair.conn(Platform).accept().unwrap();
    assert_eq!(
        pair.read_available(Platform, accepted),
        (b"early bytes".to_vec(), true)
    );
}

#[test]
fn finishing_one_direction_ends_the_peers_reads_and_leaves_the_other_open() {
    for closer in [Device, Platform] {
        let mut pair = Pair::connected();
        let id = pair.open_accepted(Device, tcp());
        let reader = closer.other();

        assert_eq!(pair.conn(reader).read(id, 100), Err(ReadError::Blocked));
        pair.write_some(closer, id, b"last words");
        pair.conn(closer).finish(id).unwrap();
        assert_eq!(
            pair.conn(closer).write(id, b"more"),
            Err(WriteError::Finished)
        );
        assert_eq!(pair.conn(closer).finish(id), Err(WriteError::Finished));
        pair.drive();

        assert_eq!(
            pair.events(reader),
            [Event::Readable(id)],
            "{closer:?} finished"
        );
        assert_eq!(
            pair.conn(reader).read(id, 4).unwrap().as_deref(),
            Some(&b"last"[..])
        );
        assert_eq!(pair.read_available(reader, id), (b" words".to_vec(), true));
        assert_eq!(
            pair.conn(reader).read(id, 100),
            Ok(None),
            "end of stream stays"
        );

        // The other direction still works, and closes the same way.
        pair.write_some(reader, id, b"reply");
        pair.conn(reader).finish(id).unwrap();
        pair.drive();
        assert_eq!(pair.read_available(closer, id), (b"reply".to_vec(), true));

        let fins = pair
            .sent(closer)
            .iter()
            .filter(|f| matches!(f, Frame::Data { fin: true, .. }))
            .count();
        assert_eq!(fins, 1, "exactly one FIN from {closer:?}");
    }
}

#[test]
fn a_blocked_reader_learns_of_a_fin_that_carries_no_data() {
    let mut pair = Pair::connected();
    let id = pair.open_accepted(Device, tcp());
    assert_eq!(pair.conn(Platform).read(id, 10), Err(ReadError::Blocked));
    pair.conn(Device).finish(id).unwrap();
    pair.drive();
    assert_eq!(pair.events(Platform), [Event::Readable(id)]);
    assert_eq!(pair.conn(Platform).read(id, 10), Ok(None));
}

#[test]
fn a_reset_by_either_side_reaches_the_other_with_its_code() {
    let code = ResetCode(ResetCode::APPLICATION_MIN.0 + 7);
    for resetter in [Device, Platform] {
        let mut pair = Pair::connected();
        let id = pair.open_accepted(Device, tcp());
        let other = resetter.other();
        pair.write_some(Device, id, &pattern(3, 50_000));
        pair.write_some(Platform, id, &pattern(4, 50_000));
        pair.drive();
        assert_eq!(
            pair.conn(other).read(id, 10).unwrap().map(|b| b.len()),
            Some(10)
        );

        pair.conn(resetter).reset(id, code, "no longer needed");
        assert_eq!(
            pair.conn(resetter).read(id, 10),
            Err(ReadError::UnknownStream(id))
        );
        assert_eq!(pair.conn(resetter).stream_count(), 0);
        pair.drive();

        let reset = Event::Reset {
            stream: id,
            code,
            reason: "no longer needed".into(),
        };
        assert_eq!(pair.events(other), [reset], "{resetter:?} reset");
        assert_eq!(
            pair.conn(other).read(id, 10),
            Err(ReadError::Reset {
                code,
                reason: "no longer needed".into()
            })
        );
        assert_eq!(
            pair.conn(other).write(id, b"x"),
            Err(WriteError::Reset {
                code,
                reason: "no longer needed".into()
            })
        );
        assert_eq!(
            pair.conn(other).finish(id),
            Err(WriteError::Reset {
                code,
                reason: "no longer needed".into()
            })
        );
        assert_eq!(
            pair.conn(other).buffered_bytes(),
            0,
            "buffers of a reset stream are dropped"
        );
        pair.conn(other).release(id);
        assert_eq!(pair.conn(other).stream_count(), 0);
        let resets = pair
            .sent(resetter)
            .iter()
            .filter(|f| matches!(f, Frame::Reset { .. }))
            .count();
        assert_eq!(resets, 1);
        assert!(
            pair.sent(other)
                .iter()
                .all(|f| !matches!(f, Frame::Reset { .. })),
            "a reset is not answered"
        );
        assert!(pair.conn(Device).is_connected() && pair.conn(Platform).is_connected());
    }
}

#[test]
fn release_finishes_discards_and_forgets_the_stream() {
    let mut pair = Pair::connected();
    let id = pair.open_accepted(Device, tcp());
    pair.write_some(Device, id, b"request");
    pair.conn(Device).release(id);
    assert_eq!(
        pair.conn(Device).stream_count(),
        1,
        "kept until both directions are done"
    );
    pair.drive();
    assert_eq!(
        pair.read_available(Platform, id),
        (b"request".to_vec(), true)
    );

    // More than a whole window of reply: discarded bytes must still return
    // credit, or this transfer stalls.
    let window = pair.conn(Device).config().settings.initial_stream_window as usize;
    let reply = pattern(5, 3 * window);
    let mut written = 0;
    for _ in 0..1000 {
        written += pair.write_some(Platform, id, &reply[written..]);
        pair.drive();
        if written == reply.len() {
            break;
        }
    }
    assert_eq!(
        written,
        reply.len(),
        "the platform was starved by a released stream"
    );
    pair.conn(Platform).finish(id).unwrap();
    pair.drive();

    assert_eq!(pair.conn(Device).stream_count(), 0);
    assert_eq!(pair.conn(Device).buffered_bytes(), 0);
    assert_eq!(
        pair.conn(Device).read(id, 10),
        Err(ReadError::UnknownStream(id))
    );
    assert!(pair.events(Device).is_empty());
    pair.conn(Platform).release(id);
    assert_eq!(pair.conn(Platform).stream_count(), 0);
    assert!(pair.conn(Device).is_idle() && pair.conn(Platform).is_idle());
}

#[test]
fn opens_beyond_max_concurrent_streams_are_refused_and_the_connection_survives() {
    let (device, mut platform) = configs();
    platform.settings.max_concurrent_streams = 1;
    let mut pair = Pair::connected_with(device, platform);

    let first = pair.open_accepted(Device, tcp());
    assert_eq!(
        pair.open(Device, tcp()),
        Err(OpenError::StreamLimit { limit: 1 })
    );

    // The device forgets the stream once both sides finished it, but the
    // platform's application still holds it: the platform must refuse.
    pair.conn(Device).release(first);
    pair.conn(Platform).finish(first).unwrap();
    pair.drive();
    assert_eq!(pair.read_available(Platform, first), (vec![], true));
    assert_eq!(pair.conn(Device).stream_count(), 0);
    assert_eq!(pair.conn(Platform).stream_count(), 1);
    let second = pair.open(Device, tcp()).unwrap();
    pair.drive();
    let reason = "stream limit reached".to_string();
    assert_eq!(
        pair.events(Device),
        [Event::Reset {
            stream: second,
            code: ResetCode::STREAM_LIMIT,
            reason
        }]
    );
    assert!(
        pair.events(Platform).is_empty(),
        "a refused open is not announced"
    );
    assert!(pair.conn(Device).is_connected() && pair.conn(Platform).is_connected());

    pair.conn(Device).release(second);
    pair.conn(Platform).release(first);
    let third = pair.open_accepted(Device, tcp());
    assert_eq!(third, StreamId(5));
}

#[test]
fn opens_beyond_the_accept_backlog_are_refused_with_stream_limit() {
    let (device, mut platform) = configs();
    platform.accept_backlog = 2;
    let mut pair = Pair::connected_with(device, platform);

    let ids: Vec<StreamId> = (0..3).map(|_| pair.open(Device, tcp()).unwrap()).collect();
    pair.drive();

    assert_eq!(pair.events(Platform), [Event::Incoming, Event::Incoming]);
    let reason = "stream limit reached".to_string();
    assert_eq!(
        pair.events(Device),
        [Event::Reset {
            stream: ids[2],
            code: ResetCode::STREAM_LIMIT,
            reason
        }]
    );
    assert_eq!(pair.conn(Platform).accept().map(|(id, _)| id), Some(ids[0]));
    assert_eq!(pair.conn(Platform).accept().map(|(id, _)| id), Some(ids[1]));
    assert_eq!(pair.conn(Platform).accept(), None);
    assert!(pair.conn(Platform).is_connected());
    // With the backlog drained, opens succeed again.
    pair.drive();
    pair.events(Device);
    pair.open_accepted(Device, tcp());
}

#[test]
fn an_open_nobody_accepts_is_reset_with_open_timeout() {
    let (device, platform) = configs();
    let timeout = device.open_timeout;
    let mut pair = Pair::connected_with(device, platform);
    let opened = pair.link.now;
    let id = pair.open(Device, tcp()).unwrap();
    pair.write_some(Device, id, b"hello?");
    pair.drive();
    assert_eq!(pair.events(Platform), [Event::Incoming]);

    pair.advance_to(opened + timeout - Duration::from_millis(1));
    assert!(
        pair.events(Device).is_empty(),
        "reset before the open timeout"
    );
    pair.advance(Duration::from_millis(1));

    let reason = format!("not accepted within {timeout:?}");
    let reset = Event::Reset {
        stream: id,
        code: ResetCode::OPEN_TIMEOUT,
        reason: reason.clone(),
    };
    assert_eq!(pair.events(Device), [reset]);
    assert!(
        pair.sent(Device).iter().any(|f| matches!(
            f,
            Frame::Reset {
                code: ResetCode::OPEN_TIMEOUT,
                ..
            }
        )),
        "the peer is told"
    );
    assert_eq!(
        pair.conn(Device).write(id, b"x"),
        Err(WriteError::Reset {
            code: ResetCode::OPEN_TIMEOUT,
            reason
        })
    );
    pair.conn(Device).release(id);
    assert_eq!(pair.conn(Device).stream_count(), 0);
    pair.drive();
    // The platform forgets the stream its application never took.
    assert_eq!(pair.conn(Platform).accept(), None);
    assert_eq!(pair.conn(Platform).stream_count(), 0);
    assert_eq!(pair.conn(Platform).buffered_bytes(), 0);
    assert!(pair.conn(Device).is_connected() && pair.conn(Platform).is_connected());
}

#[test]
fn an_accepted_open_does_not_time_out() {
    let (device, platform) = configs();
    let timeout = device.open_timeout;
    let mut pair = Pair::connected_with(device, platform);
    let id = pair.open_accepted(Device, tcp());
    pair.advance(timeout * 3);
    assert!(pair.events(Device).is_empty());
    assert_eq!(pair.write_some(Device, id, b"still here"), 10);
}

#[test]
fn an_unknown_service_is_refused_and_the_connection_survives() {
    let mut pair = Pair::connected();
    let id = pair
        .open(
            Device,
            ServiceHeader::new(Service::Other {
                kind: 0x42,
                name: String::new(),
            }),
        )
        .unwrap();
    pair.drive();
    let reason = "unknown service".to_string();
    assert_eq!(
        pair.events(Device),
        [Event::Reset {
            stream: id,
            code: ResetCode::UNKNOWN_SERVICE,
            reason
        }]
    );
    assert!(pair.events(Platform).is_empty());
    pair.open_accepted(Device, tcp());
}

#[test]
fn a_reset_crossing_an_accept_on_the_wire_is_harmless() {
    let mut pair = Pair::connected();
    let id = pair.open(Device, tcp()).unwrap();
    pair.transmit(Device);
    assert!(matches!(
        pair.deliver_one(Platform),
        Some(Frame::Open { .. })
    ));
    assert_eq!(pair.events(Platform), [Event::Incoming]);
    assert_eq!(pair.conn(Platform).accept().map(|(got, _)| got), Some(id));
    pair.transmit(Platform);
    pair.conn(Device)
        .reset(id, ResetCode::CANCEL, "changed my mind");
    pair.transmit(Device);
    assert!(matches!(pair.in_flight(Device)[..], [Frame::Accept { .. }]));
    assert!(matches!(
        pair.in_flight(Platform)[..],
        [Frame::Reset { .. }]
    ));

    // The ACCEPT reaches a stream the device already forgot; the RESET reaches
    // a stream the platform's application holds.
    pair.deliver_one(Device);
    pair.deliver_one(Platform);
    assert!(pair.events(Device).is_empty());
    let reset = Event::Reset {
        stream: id,
        code: ResetCode::CANCEL,
        reason: "changed my mind".into(),
    };
    assert_eq!(pair.events(Platform), [reset]);
    pair.conn(Platform).release(id);
    pair.drive();
    for who in [Device, Platform] {
        assert!(pair.conn(who).is_connected());
        assert_eq!(pair.conn(who).stream_count(), 0);
    }
}

#[test]
fn writing_on_an_incoming_stream_before_accepting_it_is_refused() {
    let mut pair = Pair::connected();
    let id = pair.open(Device, tcp()).expect("open");
    pair.drive();
    assert_eq!(
        pair.conn(Platform).write(id, b"early"),
        Err(WriteError::NotAccepted(id))
    );
    assert_eq!(
        pair.conn(Platform).finish(id),
        Err(WriteError::NotAccepted(id))
    );
    pair.conn(Platform).accept().expect("incoming");
    assert_eq!(pair.conn(Platform).write(id, b"now"), Ok(3));
}

/// The first editor request after an idle tunnel failed at once with "open
/// timed out": the open deadline was taken from the last time the
/// connection was told, not from the call.
#[test]
fn a_stream_opened_after_an_idle_gap_gets_its_whole_open_timeout() {
    let (device, platform) = configs();
    let timeout = platform.open_timeout;
    let mut pair = Pair::connected_with(device, platform);
    // Time passes with nothing for either side to do: no message, no timer
    // due (the keepalive interval is longer than the gap).
    pair.link.now += timeout + Duration::from_secs(1);
    let id = pair.open(Platform, tcp()).unwrap();
    pair.drive();
    assert_eq!(pair.events(Device), [Event::Incoming]);
    // The device takes a moment to accept: well within the open timeout
    // counted from the call.
    pair.advance(timeout / 2);
    let (accepted, _) = pair.conn(Device).accept().expect("an incoming stream");
    assert_eq!(accepted, id);
    pair.drive();
    assert_eq!(pair.events(Platform), [Event::Accepted(id)]);
}

/// The same class of bug for PING: an RTT sample must start at the call.
#[test]
fn a_ping_after_an_idle_gap_measures_the_round_trip_not_the_gap() {
    let mut pair = Pair::connected();
    pair.link.now += Duration::from_secs(5);
    pair.ping(Device);
    pair.drive();
    let rtt = pair.conn(Device).rtt().expect("an RTT sample");
    assert!(
        rtt < Duration::from_millis(100),
        "RTT {rtt:?} includes the idle gap"
    );
}
