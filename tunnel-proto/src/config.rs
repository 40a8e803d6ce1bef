//! Tunables of one connection, with defaults sized for an edge gateway.
//!
//! A [`Config`] is validated once, in [`crate::Connection::new`]; after that
//! the connection trusts it. Every limit here bounds memory or work that a peer
//! could otherwise make unbounded (`docs/protocol.md`, "Limits").

use std::time::Duration;

use crate::hello::{Role, Settings};

/// Longest timeout accepted, in milliseconds (one day).
const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

/// Configuration of one [`crate::Connection`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Which end of the tunnel this is.
    pub role: Role,
    /// The limits announced to the peer in HELLO; this side enforces them.
    pub settings: Settings,
    /// Largest receive window one stream may grow to by auto-tuning. At most
    /// half of `settings.connection_window`: connection credit returns in
    /// steps of half that window, so a larger stream window left unread could
    /// hold back the credit every other stream needs.
    pub max_stream_window: u32,
    /// DATA payloads are cut at this size so that control frames and other
    /// streams interleave with bulk transfers.
    pub data_split: usize,
    /// Bytes the application may queue on one stream before writes block.
    pub max_stream_send_buffer: usize,
    /// Bytes the application may queue on all streams together.
    pub max_send_buffer: usize,
    /// Streams this side may have opened but not yet seen accepted.
    pub max_pending_opens: usize,
    /// Streams the peer opened that the application has not yet accepted;
    /// more are refused.
    pub accept_backlog: usize,
    /// An OPEN not accepted within this time is reset.
    pub open_timeout: Duration,
    /// The peer's HELLO must arrive within this time.
    pub handshake_timeout: Duration,
    /// A PING is sent this often to measure the round trip and keep
    /// middleboxes from dropping an idle tunnel.
    pub keepalive_interval: Duration,
    /// With no frame at all from the peer for this long, it is declared dead.
    pub idle_timeout: Duration,
    /// Control frames (PONG, RESET, ACCEPT, ...) that may wait for the
    /// transport; a peer that makes more pile up is disconnected.
    pub max_pending_control: usize,
}

/// Why a [`Config`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "max_stream_window ({stream}) must be at most half the connection window ({connection}); \
         help: a larger stream window left unread stalls all other streams"
    )]
    StreamWindowTooLarge { stream: u32, connection: u32 },
    #[error("max_stream_window ({max}) is below the initial stream window ({initial})")]
    StreamWindowBelowInitial { max: u32, initial: u32 },
    #[error("{name} ({value}) is outside {min}..={max} (durations in milliseconds)")]
    OutOfRange {
        name: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("idle_timeout must be longer than keepalive_interval")]
    IdleNotAboveKeepalive,
}

impl Config {
    /// Defaults for `role` (`docs/protocol.md`, "Limits").
    pub fn new(role: Role) -> Config {
        Config {
            role,
            settings: Settings::DEFAULT,
            max_stream_window: 4 * 1024 * 1024,
            data_split: 16 * 1024,
            max_stream_send_buffer: 256 * 1024,
            max_send_buffer: 8 * 1024 * 1024,
            max_pending_opens: 128,
            accept_backlog: 128,
            open_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            max_pending_control: 1024,
        }
    }

    /// Checks the relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.settings;
        range(
            "max_frame_payload",
            s.max_frame_payload.into(),
            1024,
            16 << 20,
        )?;
        range(
            "initial_stream_window",
            s.initial_stream_window.into(),
            1024,
            crate::MAX_WINDOW.into(),
        )?;
        range(
            "connection_window",
            s.connection_window.into(),
            1024,
            crate::MAX_WINDOW.into(),
        )?;
        range("max_open_payload", s.max_open_payload.into(), 64, 65535)?;
        range(
            "data_split",
            self.data_split as u64,
            1,
            s.max_frame_payload.into(),
        )?;
        range(
            "max_stream_send_buffer",
            self.max_stream_send_buffer as u64,
            1,
            u32::MAX.into(),
        )?;
        range("max_send_buffer", self.max_send_buffer as u64, 1, u64::MAX)?;
        range("accept_backlog", self.accept_backlog as u64, 1, 65535)?;
        range("max_pending_opens", self.max_pending_opens as u64, 1, 65535)?;
        range(
            "max_pending_control",
            self.max_pending_control as u64,
            16,
            1 << 20,
        )?;
        if self.max_stream_window < s.initial_stream_window {
            return Err(ConfigError::StreamWindowBelowInitial {
                max: self.max_stream_window,
                initial: s.initial_stream_window,
            });
        }
        if self.max_stream_window > s.connection_window / 2 {
            return Err(ConfigError::StreamWindowTooLarge {
                stream: self.max_stream_window,
                connection: s.connection_window,
            });
        }
        for (name, value) in [
            ("open_timeout", self.open_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("idle_timeout", self.idle_timeout),
        ] {
            // Bounded so that `now + timeout` can never overflow.
            range(
                name,
                value.as_millis().min(u64::MAX.into()) as u64,
                1,
                MAX_TIMEOUT_MS,
            )?;
        }
        if self.idle_timeout <= self.keepalive_interval {
            return Err(ConfigError::IdleNotAboveKeepalive);
        }
        Ok(())
    }
}

fn range(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            name,
            value,
            min,
            max,
        })
    }
}
