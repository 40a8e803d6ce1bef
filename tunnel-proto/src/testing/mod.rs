//! A test harness: a simulated link between two [`Connection`]s with a
//! simulated clock, checking every frame against the receiver's limits and
//! the credit it granted; for tests and fuzzing, not for production.
//!
//! This module is a supported test utility, compiled only with the `testing`
//! feature. The crate's own unit tests, its property tests and its fuzz
//! targets all run on it, and other crates may use it to test code built on
//! `tether-proto`:
//!
//! ```toml
//! [dev-dependencies]
//! tether-proto = { path = "../tunnel-proto", features = ["testing"] }
//! ```
//!
//! - [`Link`] joins a device and a platform [`Connection`] by a reliable,
//!   in-order link with a fixed one-way latency. Time is simulated: it starts
//!   at one real `Instant` ([`start_time`]) and only moves when the harness
//!   delivers a message or lets time pass. Every message a side transmits is
//!   decoded and checked on the way out: it must decode, fit the receiver's
//!   `max_frame_payload`, and a DATA frame must fit the sender's `data_split`
//!   and the stream and connection credit the receiver granted (tracked from
//!   the HELLO and WINDOW_UPDATE frames delivered to the sender, apart from
//!   the connection's own books). So whatever a test is about, it also checks
//!   flow control.
//! - [`World`] runs random [`Op`]s (opens, writes, reads, resets, deliveries,
//!   time passing, ...) on a [`Link`] and models every stream, checking that
//!   readers only ever get what writers wrote, in order, and, once all is
//!   settled, that every stream not reset carried exactly the bytes written.
//!
//! The harness never panics on its own account: a violated check comes back
//! as a [`Failure`], for the test to turn into its own kind of failure (a
//! panic, a `TestCaseError`, a fuzzer crash).
//!
//! [`Connection`]: crate::Connection

mod link;
mod world;

use std::time::Instant;

use crate::connection::Stats;
use crate::frame::{FrameError, StreamId};

pub use link::{Link, Peer};
pub use world::{Op, World};

/// Steps [`Link::drive`], [`Link::advance`] and [`World::settle`] may take
/// before they report a livelock.
pub const MAX_STEPS: usize = 200_000;

/// The origin of simulated time: the one place the harness reads the clock.
///
/// Nothing depends on the value; it is only a real `Instant` to count from.
// The crate's clippy.toml bans `Instant::now` because the state machine must
// never read the clock. A simulation needs one real `Instant` to start from
// (`Instant` has no constructor), and this is the only place it is read.
#[allow(clippy::disallowed_methods)]
pub fn start_time() -> Instant {
    Instant::now()
}

/// Which end of a [`Link`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Device,
    Platform,
}

impl Side {
    /// Both sides, in the order of [`Link::peers`].
    pub const ALL: [Side; 2] = [Side::Device, Side::Platform];

    /// The other end.
    pub fn other(self) -> Side {
        match self {
            Side::Device => Side::Platform,
            Side::Platform => Side::Device,
        }
    }

    /// The position of this side in [`Link::peers`]: 0 for the device, 1 for
    /// the platform.
    pub fn index(self) -> usize {
        match self {
            Side::Device => 0,
            Side::Platform => 1,
        }
    }
}

/// A check the harness made failed: the connections under test broke a rule,
/// or the simulation livelocked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("{from:?} sent an undecodable frame ({error}): {message:02x?}")]
    Undecodable {
        from: Side,
        error: FrameError,
        message: Vec<u8>,
    },
    #[error("{from:?} sent a {payload}-byte payload, the peer accepts {limit}")]
    FrameTooLarge {
        from: Side,
        payload: usize,
        limit: usize,
    },
    #[error("{from:?} sent {len} bytes of DATA, data_split is {split}")]
    DataAboveSplit {
        from: Side,
        len: usize,
        split: usize,
    },
    #[error("{from:?} sent {len} bytes on stream {stream} with {credit} credit")]
    StreamCredit {
        from: Side,
        stream: StreamId,
        len: u64,
        credit: u64,
    },
    #[error("{from:?} sent {len} bytes with {credit} connection credit")]
    ConnectionCredit { from: Side, len: u64, credit: u64 },
    #[error(
        "{what} still busy after {MAX_STEPS} steps (livelock?): \
         device {device:?}, platform {platform:?}"
    )]
    Livelock {
        what: &'static str,
        device: Stats,
        platform: Stats,
    },
    /// A check of [`World`]'s stream model failed.
    #[error("{0}")]
    Model(String),
}
