//! Keepalive, dead-peer detection and graceful shutdown.

use std::time::Duration;

use super::pair::{Device, Pair, Platform, configs, tcp};
use crate::codes::{CloseCode, ResetCode};
use crate::connection::{ConnectionError, Event, OpenError};
use crate::frame::Frame;

#[test]
fn keepalive_pings_at_the_interval_and_measures_twice_the_latency() {
    let (device, platform) = configs();
    let interval = device.keepalive_interval;
    let mut pair = Pair::new(device, platform);
    pair.link.latency = Duration::from_millis(25);
    let start = pair.link.now;
    pair.drive();
    pair.advance(4 * interval + Duration::from_millis(100));

    for who in [Device, Platform] {
        let side = pair.link.peer(who);
        let pings: Vec<Duration> = side
            .sent
            .iter()
            .filter(|(_, f)| matches!(f, Frame::Ping { ack: false, .. }))
            .map(|(at, _)| *at - start)
            .collect();
        let expected: Vec<Duration> = (0..5).map(|i| i * interval).collect();
        assert_eq!(pings, expected, "{who:?} pings");
        assert_eq!(
            side.conn.rtt(),
            Some(Duration::from_millis(50)),
            "{who:?} rtt"
        );
        assert!(side.conn.is_connected());
    }
    let pongs = pair
        .sent(Device)
        .iter()
        .filter(|f| matches!(f, Frame::Ping { ack: true, .. }))
        .count();
    assert_eq!(pongs, 5, "every ping is answered");
}

#[test]
fn a_silent_peer_is_declared_dead_after_the_idle_timeout() {
    let (device, platform) = configs();
    let idle = platform.idle_timeout;
    let mut pair = Pair::connected_with(device, platform);
    pair.link.peer_mut(Device).transmitting = false;
    let last_heard = pair.link.peer(Platform).received.last().unwrap().0;

    pair.advance_to(last_heard + idle - Duration::from_millis(1));
    assert!(
        pair.conn(Platform).is_connected(),
        "closed before the idle timeout"
    );
    pair.advance(Duration::from_millis(1));

    assert_eq!(
        pair.conn(Platform).close_reason(),
        Some(&ConnectionError::TimedOut(idle))
    );
    assert_eq!(pair.events(Platform), [Event::Closed]);
    let (closed_at, close) = pair.link.peer(Platform).sent.last().unwrap().clone();
    assert_eq!(closed_at, last_heard + idle);
    assert!(matches!(
        close,
        Frame::Close {
            code: CloseCode::KEEPALIVE_TIMEOUT,
            ..
        }
    ));
    // The device still hears the platform, so it learns why.
    pair.drive();
    assert!(matches!(
        pair.conn(Device).close_reason(),
        Some(ConnectionError::PeerClosed {
            code: CloseCode::KEEPALIVE_TIMEOUT,
            ..
        })
    ));
}

#[test]
fn shutdown_refuses_new_streams_lets_open_ones_finish_then_closes() {
    let mut pair = Pair::connected();
    let id = pair.open_accepted(Device, tcp());
    pair.write_some(Device, id, b"before");

    pair.conn(Platform)
        .shutdown(CloseCode::NO_ERROR, "maintenance");
    assert_eq!(pair.open(Platform, tcp()), Err(OpenError::ShuttingDown));
    // This open crosses the GOAWAY on the wire.
    let racing = pair.open(Device, tcp()).unwrap();
    pair.drive();

    let events = pair.events(Device);
    let going_away = Event::Reset {
        stream: racing,
        code: ResetCode::GOING_AWAY,
        reason: "the peer is going away".into(),
    };
    let goaway = Event::GoAway {
        code: CloseCode::NO_ERROR,
        reason: "maintenance".into(),
    };
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events.contains(&going_away) && events.contains(&goaway),
        "{events:?}"
    );
    assert!(
        pair.events(Platform).is_empty(),
        "the racing open is refused, not announced"
    );
    assert_eq!(pair.open(Device, tcp()), Err(OpenError::PeerGoingAway));
    pair.conn(Device).release(racing);

    // The stream that was open keeps working both ways.
    pair.write_some(Device, id, b" and after");
    pair.conn(Device).finish(id).unwrap();
    pair.drive();
    assert_eq!(
        pair.read_available(Platform, id),
        (b"before and after".to_vec(), true)
    );
    assert!(
        pair.conn(Platform).is_connected(),
        "closed with a stream still open"
    );
    pair.write_some(Platform, id, b"bye");
    pair.conn(Platform).finish(id).unwrap();
    pair.conn(Platform).release(id);
    pair.drive();

    assert_eq!(
        pair.read_available(Device, id),
        (b"bye".to_vec(), true),
        "bytes sent before CLOSE stay readable"
    );
    let reason = "maintenance".to_string();
    let local = ConnectionError::LocallyClosed {
        code: CloseCode::NO_ERROR,
        reason: reason.clone(),
    };
    assert_eq!(pair.conn(Platform).close_reason(), Some(&local));
    assert_eq!(
        pair.conn(Device).close_reason(),
        Some(&ConnectionError::PeerClosed {
            code: CloseCode::NO_ERROR,
            reason
        })
    );
    assert_eq!(pair.last_close(Platform), Some(CloseCode::NO_ERROR));
    for who in [Device, Platform] {
        assert!(pair.conn(who).is_closed());
        assert_eq!(pair.events(who), [Event::Closed], "{who:?}");
        assert_eq!(pair.conn(who).poll_timeout(), None);
    }
}

#[test]
fn shutdown_with_no_open_stream_closes_at_once() {
    let mut pair = Pair::connected();
    pair.conn(Device).shutdown(CloseCode::NO_ERROR, "bye");
    assert_eq!(pair.open(Device, tcp()), Err(OpenError::ShuttingDown));
    pair.transmit(Device);
    assert!(
        pair.conn(Device).is_closed(),
        "closed once its frames are out"
    );
    assert!(matches!(
        pair.sent(Device).last(),
        Some(Frame::Close {
            code: CloseCode::NO_ERROR,
            ..
        })
    ));
    pair.drive();
    let local = ConnectionError::LocallyClosed {
        code: CloseCode::NO_ERROR,
        reason: "bye".into(),
    };
    let remote = ConnectionError::PeerClosed {
        code: CloseCode::NO_ERROR,
        reason: "bye".into(),
    };
    assert_eq!(pair.conn(Device).close_reason(), Some(&local));
    assert_eq!(pair.conn(Platform).close_reason(), Some(&remote));
    assert_eq!(pair.events(Platform).last(), Some(&Event::Closed));
}

#[test]
fn both_sides_shutting_down_at_once_still_finish_their_streams() {
    let mut pair = Pair::connected();
    let id = pair.open_accepted(Device, tcp());
    pair.conn(Device).shutdown(CloseCode::NO_ERROR, "device");
    pair.conn(Platform)
        .shutdown(CloseCode::NO_ERROR, "platform");
    pair.drive();
    for who in [Device, Platform] {
        assert!(pair.conn(who).is_connected(), "{who:?}");
        pair.write_some(who, id, b"last");
        pair.conn(who).finish(id).unwrap();
    }
    pair.drive();
    for who in [Device, Platform] {
        assert_eq!(pair.read_available(who, id), (b"last".to_vec(), true));
        pair.conn(who).release(id);
    }
    pair.drive();
    for who in [Device, Platform] {
        assert!(pair.conn(who).is_closed(), "{who:?}");
        assert!(matches!(
            pair.conn(who).close_reason(),
            Some(
                ConnectionError::LocallyClosed {
                    code: CloseCode::NO_ERROR,
                    ..
                } | ConnectionError::PeerClosed {
                    code: CloseCode::NO_ERROR,
                    ..
                }
            )
        ));
    }
}

#[test]
fn repeated_goaways_raise_one_event() {
    let mut pair = Pair::connected();
    pair.events(Device);
    for _ in 0..100 {
        let goaway = Frame::GoAway {
            last_stream: crate::frame::StreamId(0),
            code: CloseCode::NO_ERROR,
            reason: String::new(),
        };
        pair.inject(Device, goaway.to_bytes());
    }
    let goaways = pair
        .events(Device)
        .iter()
        .filter(|e| matches!(e, Event::GoAway { .. }))
        .count();
    assert_eq!(goaways, 1);
}
