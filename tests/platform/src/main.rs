//! `tether-platform` (in progress).
fn main() {}
