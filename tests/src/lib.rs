//! Home of Tether's end-to-end tests: they start the real `tetherd` and the
//! reference platform (`tests/platform`, arriving with the identity work) on
//! 127.0.0.1 and check what a user would see. The protocol's own tests live
//! in `tunnel-proto`.
