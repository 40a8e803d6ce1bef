//! Home of Tether's end-to-end tests: they start the real `tetherd` and the
//! reference platform (`tests/platform`) on 127.0.0.1 and check what a user
//! would see. The protocol's own tests live in `tunnel-proto`.
//!
//! The library holds what the tests and the benchmark binaries share:
//! [`bench`](mod@bench) (figures from `/proc`, verdict lines) and [`tools`] (where
//! Node-RED, playwright-core and chromium are) and [`web`] (a browser's side
//! of the platform's pages and editor origins) and [`npm`] (npm packages
//! made on the spot for a snapshot's modules).

pub mod bench;
pub mod flows;
pub mod mqtt;
pub mod npm;
pub mod shaper;
pub mod tools;
pub mod web;
