//! The Tether tunnel protocol, without I/O.
//!
//! `tether-proto` is a deterministic state machine for the multiplexed tunnel
//! between a device (`tetherd`) and the platform: a versioned handshake,
//! streams opened by either side to typed services, credit-based flow control
//! per stream and per connection, keepalive with RTT measurement, and graceful
//! shutdown. It contains no networking code, never reads the clock and uses no
//! randomness: messages and `now` go in, messages to send, events and the next
//! deadline come out. The byte-level specification is `docs/protocol.md`.
//!
//! # Where to start
//!
//! - [`Connection`] is the state machine; its module docs describe the
//!   `handle_*` / `poll_*` loop a shell runs.
//! - [`Frame`] is the wire codec, one frame per WebSocket binary message.
//! - [`Config`] holds every limit, with defaults for an edge gateway.
//! - With the `api` feature, [`api`] holds the enrollment API's JSON shapes
//!   and [`control`] the messages of the control stream.
//! - With the `tokio` feature, [`tokio_io`] drives a `Connection` over a
//!   tokio-tungstenite WebSocket and hands out streams as
//!   `AsyncRead + AsyncWrite`.
#![forbid(unsafe_code)]

#[cfg(feature = "api")]
pub mod api;
mod arena;
#[cfg(feature = "audit")]
pub mod audit;
pub mod codes;
pub mod config;
pub mod connection;
#[cfg(feature = "api")]
pub mod control;
#[cfg(feature = "grant")]
pub mod editor_headers;
pub mod frame;
#[cfg(feature = "grant")]
pub mod grant;
pub mod hello;
#[cfg(any(feature = "grant", feature = "audit", feature = "snapshot"))]
pub mod hex;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod service;
#[cfg(feature = "snapshot")]
pub mod snapshot;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "tokio")]
pub mod tokio_io;

pub use codes::{CloseCode, ResetCode};
pub use config::{Config, ConfigError};
pub use connection::{Connection, ConnectionError, Event, OpenError, ReadError, Stats, WriteError};
pub use frame::{Frame, FrameError, StreamId};
pub use hello::{Hello, PROTOCOL_MAJOR, PROTOCOL_MINOR, PROTOCOL_VERSION, Role, Settings};
pub use service::{KNOWN_KINDS, Service, ServiceError, ServiceHeader};

/// Largest window or window increment: 2^31-1, as in RFC 9113 §6.9.1.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_text_matches_the_version_numbers() {
        let text = format!("{}.{}", super::PROTOCOL_MAJOR, super::PROTOCOL_MINOR);
        assert_eq!(super::PROTOCOL_VERSION, text);
    }
}
