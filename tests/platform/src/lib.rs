//! The reference Tether platform: the server half of the protocol.
//!
//! It enrolls devices (provisioning tokens, a CA of its own, device
//! certificates), terminates their tunnels (mutual TLS, WebSocket,
//! `tether-proto` in the platform role), serves their control streams
//! (heartbeats, certificate renewal), and offers an admin API and CLI to
//! fleet managers (tokens, device list, revocation, TCP connect through a
//! tunnel, TCP listeners on the platform's host). It is real, not a mock:
//! real TLS, state in redb, rate limits and bounds everywhere, so platform
//! implementers can read it as a guide and end-to-end tests can trust it. `docs/protocol.md` ("Enrollment, tunnel
//! endpoint and control stream") specifies what it speaks.
//!
//! # Layout
//!
//! - [`Platform`] (module `platform`): start, stop, and the library API.
//! - `server`: TLS accept, connection limits, HTTP routing.
//! - `enroll`: `POST /v1/enroll`. `tunnels`: `GET /v1/tunnel` and the
//!   registry of live tunnels. `control`: the control stream.
//!   `admin`: `/v1/admin/...`. `listen`: platform-side listeners that
//!   carry local TCP connections to a device's service.
//! - People in a browser: `web` (login, logout, the device list, protection
//!   mode), `editor` (the proxy to a device's Node-RED editor over `editor`
//!   streams with signed access grants), `users` (names, roles, Argon2
//!   password hashes), `sessions` (the session cookie, live editor streams
//!   per session), `html` (the pages' layout and escaping).
//! - `mqtt`: the MQTT bridge: the broker (embedded rumqttd or external),
//!   one broker client per device, the devices' `mqtt` streams.
//! - `store` (redb), `ca` (certificates), `keys` (Ed25519 keys, admin token,
//!   randomness, hashes), `files` (atomic 0600 writes), `rate_limit`.
//! - `cli`, `client`, `connect`: the `tether-platform` command, its admin
//!   client, and the engineer-side TCP proxy of `connect --remote`.
#![forbid(unsafe_code)]
// Handlers return the HTTP answer to send as their error (`Result<T,
// Response>`), built once per refused request; boxing it would buy nothing.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod audit;
mod bridge;
pub mod ca;
pub mod capture;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod connect;
pub mod control;
pub mod csrf;
pub mod editor;
pub mod editor_cache;
pub mod enroll;
pub mod files;
pub mod handoff;
pub mod health;
pub mod html;
pub mod http;
pub mod keys;
pub mod listen;
pub mod mqtt;
pub mod origin;
pub mod platform;
pub mod rate_limit;
pub mod server;
pub mod sessions;
pub mod snapshots;
pub mod store;
pub mod tunnels;
pub mod users;
pub mod web;

pub use config::PlatformConfig;
pub use platform::{ConnectError, DeviceInfo, Platform, PlatformError, PlatformEvent, TokenSpec};
pub use rate_limit::RateLimit;
