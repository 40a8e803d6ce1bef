//! Deterministic tests of the state machine.
//!
//! Each test runs a device and a platform [`Connection`](super::Connection)
//! through [`pair::Pair`], a simulated link with a simulated clock, or feeds
//! one side hand-made frames. The harness checks on every transmitted frame
//! that it decodes, fits the peer's limits and never exceeds the credit the
//! peer granted, so each test also checks flow control.

mod flow;
mod handshake;
mod lifecycle;
mod pair;
mod streams;
mod violations;
