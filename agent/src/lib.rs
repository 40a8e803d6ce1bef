//! `tether-agent`: the Tether device agent, `tetherd`.
//!
//! The agent enrolls a device with a platform (a key made on the device, a
//! certificate from the platform), then keeps one outbound mutual-TLS
//! WebSocket tunnel to it, speaking tether-proto as the device. Over the
//! tunnel it sends heartbeats, renews its certificate, and bridges the
//! platform's streams to allow-listed local TCP services and to the local
//! Node-RED editor.
//!
//! # Layout
//!
//! - [`cli`]: the command line and exit codes; the binary calls [`cli::main`].
//! - [`config`] and [`duration`]: the TOML config and its validation.
//! - [`enroll`]: enrollment over HTTPS.
//! - [`identity`] and [`files`]: the state directory and atomic writes.
//! - [`clock`] and [`tls`]: the wall clock and the TLS client configurations.
//! - [`net`] and [`tunnel`]: one connection attempt.
//! - [`reconnect`]: the backoff loop; `session`: one connected tunnel.
//! - [`control`]: heartbeats, renewal and protection mode; [`services`]:
//!   which streams are accepted, and TCP bridging.
//! - [`editor`]: editor streams: grants, roles, the proxy to Node-RED.
//! - [`audit`]: the durable audit trail: recording, the store, shipping.
//! - [`snapshot`]: the snapshot folder: staging, the atomic switch, the
//!   apply journal and rollback.
//! - [`status`]: the status channel, `status.json` and `tetherd status`.
//! - [`Agent`]: start and stop the whole.

#![forbid(unsafe_code)]

mod agent;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod doctor;
pub mod duration;
pub mod editor;
pub mod enroll;
pub mod exit;
pub mod files;
pub mod health;
pub mod identity;
pub mod mqtt;
pub mod net;
pub mod node_red;
pub mod reconnect;
pub mod services;
mod session;
pub mod snapshot;
pub mod status;
pub mod systemd;
pub mod tls;
pub mod tunnel;
pub mod window;

pub use agent::{Agent, AgentError, AgentOptions};
pub use clock::Clock;
pub use status::{Status, TunnelState};
