//! The handshake: HELLO exchange, version and role checks, its deadline.

use std::time::Duration;

use hex_literal::hex;

use super::pair::{Device, LATENCY, Pair, Platform, configs, tcp};
use crate::codes::CloseCode;
use crate::config::Config;
use crate::connection::{ConnectionError, Event, OpenError};
use crate::frame::Frame;
use crate::hello::Role;

#[test]
fn the_handshake_completes_and_both_sides_see_connected() {
    let (device, platform) = configs();
    let mut pair = Pair::new(device, platform);
    assert!(!pair.conn(Device).is_connected());
    assert_eq!(pair.open(Device, tcp()), Err(OpenError::Handshaking));
    let start = pair.link.now;

    pair.drive();

    for who in [Device, Platform] {
        assert_eq!(pair.events(who), [Event::Connected], "{who:?}");
        let conn = pair.conn(who);
        assert!(conn.is_connected() && !conn.is_closed());
        assert_eq!(conn.peer_hello().map(|h| h.role), Some(conn.role().peer()));
        assert!(
            matches!(pair.sent(who)[0], Frame::Hello(_)),
            "HELLO goes first"
        );
    }
    // Both HELLOs travel at once: the handshake costs one one-way trip.
    let connected_at = pair.link.peer(Device).received[0].0;
    assert_eq!(connected_at, start + LATENCY);
}

#[test]
fn the_handshake_times_out_when_no_hello_arrives() {
    let (device, platform) = configs();
    let wait = device.handshake_timeout;
    let mut pair = Pair::new(device, platform);
    pair.link.peer_mut(Platform).transmitting = false;

    pair.advance(wait - Duration::from_millis(1));
    assert!(!pair.conn(Device).is_closed(), "closed before the deadline");
    pair.advance(Duration::from_millis(1));

    assert_eq!(
        pair.conn(Device).close_reason(),
        Some(&ConnectionError::HandshakeTimeout(wait))
    );
    assert_eq!(pair.events(Device), [Event::Closed]);
    assert_eq!(pair.last_close(Device), Some(CloseCode::HANDSHAKE_FAILED));
    assert_eq!(pair.conn(Device).poll_timeout(), None);
}

#[test]
fn a_hello_of_another_major_version_is_refused_with_version_mismatch() {
    let (device, platform) = configs();
    let mut pair = Pair::new(device, platform);
    pair.transmit(Device);

    // HELLO, major 2, minor 3, role platform, then bytes of a layout this
    // version does not know: they must not be parsed.
    pair.inject(
        Device,
        hex!("01 00 00000000 54544852 02 03 02 00 ffff abcdef").to_vec(),
    );
    pair.transmit(Device);

    let error = ConnectionError::VersionMismatch { major: 2, minor: 3 };
    assert_eq!(pair.conn(Device).close_reason(), Some(&error));
    assert_eq!(pair.events(Device), [Event::Closed]);
    assert_eq!(pair.last_close(Device), Some(CloseCode::VERSION_MISMATCH));
    assert!(matches!(
        pair.sent(Device).last(),
        Some(Frame::Close { .. })
    ));
}

#[test]
fn both_ends_claiming_the_same_role_fail_the_handshake() {
    for role in [Role::Device, Role::Platform] {
        let mut pair = Pair::new(Config::new(role), Config::new(role));
        pair.drive();
        for who in [Device, Platform] {
            assert_eq!(pair.events(who), [Event::Closed], "{role:?}");
            pair.assert_violation(who, CloseCode::HANDSHAKE_FAILED);
        }
    }
}

#[test]
fn a_frame_before_hello_fails_the_handshake() {
    let cases: [(&str, &[u8]); 4] = [
        ("ping", &hex!("07 00 00000000 0000000000000001")),
        ("open", &hex!("02 00 00000002 01 00 00")),
        ("window update", &hex!("05 00 00000000 00001000")),
        ("ignorable unknown type", &hex!("42 80 00000000")),
    ];
    for (name, bytes) in cases {
        let (device, platform) = configs();
        let mut pair = Pair::new(device, platform);
        pair.inject(Device, bytes.to_vec());
        assert!(pair.conn(Device).is_closed(), "{name}");
        pair.assert_violation(Device, CloseCode::HANDSHAKE_FAILED);
    }
}

#[test]
fn a_second_hello_is_a_protocol_error() {
    let mut pair = Pair::connected();
    let hello = pair.sent(Platform)[0].to_bytes();
    pair.inject(Device, hello);
    pair.assert_violation(Device, CloseCode::PROTOCOL_ERROR);
}

#[test]
fn a_peer_closing_ends_the_tunnel_on_both_sides() {
    let mut pair = Pair::connected();
    pair.conn(Device)
        .close(CloseCode::INTERNAL_ERROR, "disk full");
    pair.drive();
    let local = ConnectionError::LocallyClosed {
        code: CloseCode::INTERNAL_ERROR,
        reason: "disk full".into(),
    };
    let remote = ConnectionError::PeerClosed {
        code: CloseCode::INTERNAL_ERROR,
        reason: "disk full".into(),
    };
    assert_eq!(pair.conn(Device).close_reason(), Some(&local));
    assert_eq!(pair.conn(Platform).close_reason(), Some(&remote));
    assert_eq!(pair.events(Platform), [Event::Closed]);
    assert_eq!(pair.open(Platform, tcp()), Err(OpenError::Closed));
}

#[test]
fn a_close_before_the_peers_hello_is_taken_with_its_reason() {
    let (device, platform) = configs();
    let mut pair = Pair::new(device, platform);
    pair.link.peer_mut(Platform).transmitting = false;
    let close = Frame::Close {
        code: CloseCode::VERSION_MISMATCH,
        reason: "speak 2.0".into(),
    };
    pair.inject(Device, close.to_bytes());
    assert_eq!(
        pair.conn(Device).close_reason(),
        Some(&ConnectionError::PeerClosed {
            code: CloseCode::VERSION_MISMATCH,
            reason: "speak 2.0".into()
        })
    );
}

#[test]
fn timeouts_too_long_to_add_to_an_instant_are_refused() {
    let mut config = Config::new(Role::Device);
    config.open_timeout = Duration::MAX;
    assert!(config.validate().is_err());
    config.open_timeout = Duration::from_secs(10);
    config.idle_timeout = Duration::from_secs(400 * 24 * 3600);
    assert!(config.validate().is_err());
}
