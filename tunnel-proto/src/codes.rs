//! Error and close codes carried by RESET, GOAWAY and CLOSE frames.
//!
//! Codes are open newtypes rather than enums: a peer may send a code this
//! version does not know, and it must survive decoding and logging intact.

use std::fmt;

/// Why a connection is closing (GOAWAY and CLOSE frames).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u32);

impl CloseCode {
    /// Orderly shutdown; nothing went wrong.
    pub const NO_ERROR: CloseCode = CloseCode(0x00);
    /// The peer broke a rule of the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(0x01);
    /// The sender failed for reasons of its own.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(0x02);
    /// The peer sent more than its window allowed.
    pub const FLOW_CONTROL_ERROR: CloseCode = CloseCode(0x03);
    /// A frame was larger than the negotiated maximum, or truncated.
    pub const FRAME_SIZE_ERROR: CloseCode = CloseCode(0x04);
    /// The peer speaks a major version this side does not.
    pub const VERSION_MISMATCH: CloseCode = CloseCode(0x05);
    /// The peer did not answer within the keepalive deadline.
    pub const KEEPALIVE_TIMEOUT: CloseCode = CloseCode(0x06);
    /// The peer exceeded a limit (streams, pending control frames, ...).
    pub const LIMIT_EXCEEDED: CloseCode = CloseCode(0x07);
    /// The handshake did not complete in time, the first frame was not a
    /// HELLO, or both ends claimed the same role.
    pub const HANDSHAKE_FAILED: CloseCode = CloseCode(0x08);
    /// The platform revoked the device's credentials. The device must not
    /// reconnect quickly: its certificate will be refused.
    pub const REVOKED: CloseCode = CloseCode(0x09);

    /// A short lower-case name for logs, or `None` for unknown codes.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            CloseCode::NO_ERROR => "no error",
            CloseCode::PROTOCOL_ERROR => "protocol error",
            CloseCode::INTERNAL_ERROR => "internal error",
            CloseCode::FLOW_CONTROL_ERROR => "flow control error",
            CloseCode::FRAME_SIZE_ERROR => "frame size error",
            CloseCode::VERSION_MISMATCH => "version mismatch",
            CloseCode::KEEPALIVE_TIMEOUT => "keepalive timeout",
            CloseCode::LIMIT_EXCEEDED => "limit exceeded",
            CloseCode::HANDSHAKE_FAILED => "handshake failed",
            CloseCode::REVOKED => "revoked",
            _ => return None,
        })
    }
}

/// Why a stream was reset (RESET frames).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResetCode(pub u32);

impl ResetCode {
    /// The application abandoned the stream.
    pub const CANCEL: ResetCode = ResetCode(0x00);
    /// The receiver will not serve this stream (service not allowed, not
    /// available, or shutting down). Safe to retry elsewhere or later.
    pub const REFUSED: ResetCode = ResetCode(0x01);
    /// The service kind is unknown to the receiver.
    pub const UNKNOWN_SERVICE: ResetCode = ResetCode(0x02);
    /// The OPEN was not accepted within the open timeout.
    pub const OPEN_TIMEOUT: ResetCode = ResetCode(0x03);
    /// The connection is going away and the stream was above the last id the
    /// peer processed. Safe to retry on a new connection.
    pub const GOING_AWAY: ResetCode = ResetCode(0x04);
    /// Too many streams are open or waiting to be accepted.
    pub const STREAM_LIMIT: ResetCode = ResetCode(0x05);
    /// The sender failed for reasons of its own.
    pub const INTERNAL_ERROR: ResetCode = ResetCode(0x06);
    /// The connection under the stream closed.
    pub const CONNECTION_CLOSED: ResetCode = ResetCode(0x07);
    /// First code free for applications; lower codes are the protocol's.
    pub const APPLICATION_MIN: ResetCode = ResetCode(0x1000);

    /// A short lower-case name for logs, or `None` for unknown codes.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            ResetCode::CANCEL => "cancelled",
            ResetCode::REFUSED => "refused",
            ResetCode::UNKNOWN_SERVICE => "unknown service",
            ResetCode::OPEN_TIMEOUT => "open timed out",
            ResetCode::GOING_AWAY => "connection going away",
            ResetCode::STREAM_LIMIT => "stream limit reached",
            ResetCode::INTERNAL_ERROR => "internal error",
            ResetCode::CONNECTION_CLOSED => "connection closed",
            _ => return None,
        })
    }
}

macro_rules! code_fmt {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => write!(f, "{name} (0x{:x})", self.0),
                    None => write!(f, "code 0x{:x}", self.0),
                }
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($ty))
            }
        }
    };
}

code_fmt!(CloseCode);
code_fmt!(ResetCode);
