//! Process exit codes, sysexits style (`docs/operations.md`, "Exit codes").
//! Scripts and fleet tooling may rely on these numbers: never renumber.

/// Bad command line or arguments (EX_USAGE).
pub const USAGE: u8 = 64;
/// The provisioning token was rejected: malformed, unknown, used or expired
/// (EX_DATAERR).
pub const DATAERR: u8 = 65;
/// The platform cannot be reached: DNS, connection refused, timeout
/// (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// A fault inside the agent (EX_SOFTWARE).
pub const SOFTWARE: u8 = 70;
/// The state directory cannot be written, or an enrollment exists and
/// `--force` was not given (EX_CANTCREAT).
pub const CANTCREAT: u8 = 73;
/// Temporary: rate limited or the platform is overloaded; retry later
/// (EX_TEMPFAIL).
pub const TEMPFAIL: u8 = 75;
/// The platform answered something this agent does not understand
/// (EX_PROTOCOL).
pub const PROTOCOL: u8 = 76;
/// The platform is not trusted: its certificate does not chain to the CA
/// (EX_NOPERM).
pub const NOPERM: u8 = 77;
/// Configuration problem, unreadable CA file, or the device clock is far
/// off (EX_CONFIG).
pub const CONFIG: u8 = 78;
