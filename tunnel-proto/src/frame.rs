//! The wire codec: one [`Frame`] per WebSocket binary message.
//!
//! This module owns the byte layout of every frame (see `docs/protocol.md`,
//! "Frames") and nothing else: it does not know about stream states, windows or
//! time. Decoding is total: any byte string yields either a frame or a
//! [`FrameError`], never a panic, and no allocation is larger than the input.
//!
//! Every frame starts with a 6-byte header:
//!
//! ```text
//!  0        1        2                                 6
//! +--------+--------+--------+--------+--------+--------+----------
//! |  type  | flags  |        stream id (u32, BE)        | payload…
//! +--------+--------+--------+--------+--------+--------+----------
//! ```
//!
//! The payload runs to the end of the message; there is no length field
//! because the WebSocket message already delimits the frame.

use bytes::{Buf, BufMut, Bytes};

use crate::codes::{CloseCode, ResetCode};
use crate::hello::Hello;
use crate::service::ServiceHeader;

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 6;
/// Longest reason text carried by RESET, GOAWAY and CLOSE frames.
pub const MAX_REASON_LEN: usize = 256;

/// Frame type octets (`docs/protocol.md`, "Frame types").
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const OPEN: u8 = 0x02;
    pub const ACCEPT: u8 = 0x03;
    pub const DATA: u8 = 0x04;
    pub const WINDOW_UPDATE: u8 = 0x05;
    pub const RESET: u8 = 0x06;
    pub const PING: u8 = 0x07;
    pub const GOAWAY: u8 = 0x08;
    pub const CLOSE: u8 = 0x09;
}

/// Flag bits (`docs/protocol.md`, "Flags").
pub mod flags {
    /// DATA: the sender will send nothing more on this stream (half-close).
    pub const FIN: u8 = 0x01;
    /// PING: this frame answers a ping.
    pub const ACK: u8 = 0x01;
    /// Any type: a receiver that does not know the type may skip the frame.
    pub const IGNORABLE: u8 = 0x80;
}

/// Identifies a stream within one tunnel. Stream 0 is the connection itself.
///
/// The device opens odd ids, the platform even ids, so both sides can open
/// streams without coordination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u32);

impl StreamId {
    /// The connection-level pseudo stream.
    pub const CONNECTION: StreamId = StreamId(0);

    /// True for stream 0, which addresses the connection rather than a stream.
    pub fn is_connection(self) -> bool {
        self.0 == 0
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame each side sends: version, role and limits.
    Hello(Hello),
    /// Opens a stream to a service.
    Open {
        stream: StreamId,
        header: ServiceHeader,
    },
    /// The receiver of an OPEN has handed the stream to its application.
    Accept { stream: StreamId },
    /// Stream bytes; `fin` half-closes the sender's direction.
    Data {
        stream: StreamId,
        fin: bool,
        payload: Bytes,
    },
    /// Grants `increment` more bytes of credit on a stream, or on the
    /// connection when `stream` is [`StreamId::CONNECTION`].
    WindowUpdate { stream: StreamId, increment: u32 },
    /// Abandons a stream in both directions.
    Reset {
        stream: StreamId,
        code: ResetCode,
        reason: String,
    },
    /// Keepalive probe (`ack == false`) or its answer (`ack == true`).
    Ping { ack: bool, opaque: u64 },
    /// No new streams; streams up to `last_stream` (opened by the receiver of
    /// this frame) will be finished.
    GoAway {
        last_stream: StreamId,
        code: CloseCode,
        reason: String,
    },
    /// Last frame of a connection.
    Close { code: CloseCode, reason: String },
    /// A frame of a type this version does not know, marked IGNORABLE.
    Ignored { kind: u8 },
}

/// Why bytes could not be decoded as a frame.
///
/// [`FrameError::Incomplete`] means the bytes end before the frame does; all
/// other variants mean these bytes can never be a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is incomplete: {needed} more bytes are needed")]
    Incomplete { needed: usize },
    #[error("unknown frame type 0x{kind:02x} not marked ignorable")]
    UnknownType { kind: u8 },
    #[error("frame type 0x{kind:02x} does not allow flags 0x{flags:02x}")]
    UnexpectedFlags { kind: u8, flags: u8 },
    #[error("frame type 0x{kind:02x} needs a non-zero stream id")]
    MissingStreamId { kind: u8 },
    #[error("frame type 0x{kind:02x} is connection-level but names stream {stream}")]
    UnexpectedStreamId { kind: u8, stream: u32 },
    #[error("frame type 0x{kind:02x} has {extra} unexpected trailing bytes")]
    TrailingBytes { kind: u8, extra: usize },
    #[error("window increment must be between 1 and 2^31-1, got {increment}")]
    InvalidWindowIncrement { increment: u32 },
    #[error("reason text is {len} bytes, the limit is {MAX_REASON_LEN}")]
    ReasonTooLong { len: usize },
    #[error("reason text is not valid UTF-8")]
    ReasonNotUtf8,
    #[error("hello does not start with the magic bytes \"TTHR\"")]
    BadMagic,
    #[error("hello sets {setting:#06x} twice")]
    DuplicateSetting { setting: u16 },
    #[error("hello setting {setting:#06x} has invalid value {value}")]
    InvalidSetting { setting: u16, value: u32 },
    #[error("hello carries more than {} settings", crate::hello::MAX_SETTINGS)]
    TooManySettings,
    #[error("unknown role {role}")]
    UnknownRole { role: u8 },
    #[error("invalid service header: {0}")]
    Service(#[from] crate::service::ServiceError),
}

impl FrameError {
    /// The close code a receiver sends when a peer's frame fails to decode.
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::Incomplete { .. } | FrameError::TrailingBytes { .. } => {
                CloseCode::FRAME_SIZE_ERROR
            }
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

impl Frame {
    /// The type octet this frame is sent with.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::Open { .. } => kind::OPEN,
            Frame::Accept { .. } => kind::ACCEPT,
            Frame::Data { .. } => kind::DATA,
            Frame::WindowUpdate { .. } => kind::WINDOW_UPDATE,
            Frame::Reset { .. } => kind::RESET,
            Frame::Ping { .. } => kind::PING,
            Frame::GoAway { .. } => kind::GOAWAY,
            Frame::Close { .. } => kind::CLOSE,
            Frame::Ignored { kind } => *kind,
        }
    }

    /// The stream this frame addresses ([`StreamId::CONNECTION`] for
    /// connection-level frames).
    pub fn stream(&self) -> StreamId {
        match self {
            Frame::Open { stream, .. }
            | Frame::Accept { stream }
            | Frame::Data { stream, .. }
            | Frame::WindowUpdate { stream, .. }
            | Frame::Reset { stream, .. } => *stream,
            _ => StreamId::CONNECTION,
        }
    }

    /// Number of bytes [`Frame::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Frame::Hello(h) => h.encoded_len(),
                Frame::Open { header, .. } => header.encoded_len(),
                Frame::Accept { .. } | Frame::Ignored { .. } => 0,
                Frame::Data { payload, .. } => payload.len(),
                Frame::WindowUpdate { .. } => 4,
                Frame::Ping { .. } => 8,
                Frame::Reset { reason, .. } | Frame::Close { reason, .. } => {
                    4 + truncate_reason(reason).len()
                }
                Frame::GoAway { reason, .. } => 8 + truncate_reason(reason).len(),
            }
    }

    /// Appends the wire form of this frame to `out`.
    ///
    /// Reason texts longer than [`MAX_REASON_LEN`] are cut at a character
    /// boundary so that every encoded frame decodes again.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let flags = match self {
            Frame::Data { fin: true, .. } => flags::FIN,
            Frame::Ping { ack: true, .. } => flags::ACK,
            Frame::Ignored { .. } => flags::IGNORABLE,
            _ => 0,
        };
        out.reserve(self.encoded_len());
        out.put_u8(self.kind());
        out.put_u8(flags);
        out.put_u32(self.stream().0);
        match self {
            Frame::Hello(h) => h.encode(out),
            Frame::Open { header, .. } => header.encode(out),
            Frame::Accept { .. } | Frame::Ignored { .. } => {}
            Frame::Data { payload, .. } => out.extend_from_slice(payload),
            Frame::WindowUpdate { increment, .. } => out.put_u32(*increment),
            Frame::Ping { opaque, .. } => out.put_u64(*opaque),
            Frame::Reset { code, reason, .. } => {
                out.put_u32(code.0);
                put_reason(out, reason);
            }
            Frame::GoAway {
                last_stream,
                code,
                reason,
            } => {
                out.put_u32(last_stream.0);
                out.put_u32(code.0);
                put_reason(out, reason);
            }
            Frame::Close { code, reason } => {
                out.put_u32(code.0);
                put_reason(out, reason);
            }
        }
    }

    /// Encodes the frame into a fresh buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }

    /// Decodes one whole frame from `msg`.
    ///
    /// The payload of DATA frames is a zero-copy slice of `msg`.
    pub fn decode(msg: &Bytes) -> Result<Frame, FrameError> {
        let header = Header::parse(msg)?;
        let mut body = msg.slice(HEADER_LEN..);
        header.check_flags()?;
        header.check_stream_id()?;
        let frame = match header.kind {
            kind::HELLO => Frame::Hello(Hello::decode(&mut body)?),
            kind::OPEN => Frame::Open {
                stream: header.stream,
                header: ServiceHeader::decode(&mut body)?,
            },
            kind::ACCEPT => Frame::Accept {
                stream: header.stream,
            },
            kind::DATA => Frame::Data {
                stream: header.stream,
                fin: header.flags & flags::FIN != 0,
                payload: std::mem::take(&mut body),
            },
            kind::WINDOW_UPDATE => {
                let increment = take_u32(&mut body)?;
                if increment == 0 || increment > crate::MAX_WINDOW {
                    return Err(FrameError::InvalidWindowIncrement { increment });
                }
                Frame::WindowUpdate {
                    stream: header.stream,
                    increment,
                }
            }
            kind::RESET => Frame::Reset {
                stream: header.stream,
                code: ResetCode(take_u32(&mut body)?),
                reason: take_reason(&mut body)?,
            },
            kind::PING => Frame::Ping {
                ack: header.flags & flags::ACK != 0,
                opaque: take_u64(&mut body)?,
            },
            kind::GOAWAY => Frame::GoAway {
                last_stream: StreamId(take_u32(&mut body)?),
                code: CloseCode(take_u32(&mut body)?),
                reason: take_reason(&mut body)?,
            },
            kind::CLOSE => Frame::Close {
                code: CloseCode(take_u32(&mut body)?),
                reason: take_reason(&mut body)?,
            },
            other => {
                body.clear();
                Frame::Ignored { kind: other }
            }
        };
        if !body.is_empty() {
            return Err(FrameError::TrailingBytes {
                kind: header.kind,
                extra: body.len(),
            });
        }
        Ok(frame)
    }
}

/// The fixed header, parsed before the payload.
struct Header {
    kind: u8,
    flags: u8,
    stream: StreamId,
}

impl Header {
    fn parse(msg: &[u8]) -> Result<Header, FrameError> {
        if msg.len() < HEADER_LEN {
            return Err(FrameError::Incomplete {
                needed: HEADER_LEN - msg.len(),
            });
        }
        Ok(Header {
            kind: msg[0],
            flags: msg[1],
            stream: StreamId(u32::from_be_bytes([msg[2], msg[3], msg[4], msg[5]])),
        })
    }

    /// Flags a type does not define are an error: a receiver must not guess
    /// what a newer sender meant by them.
    fn check_flags(&self) -> Result<(), FrameError> {
        let allowed = match self.kind {
            kind::DATA => flags::FIN,
            kind::PING => flags::ACK,
            kind::HELLO..=kind::CLOSE => 0,
            _ if self.flags & flags::IGNORABLE != 0 => return Ok(()),
            _ => return Err(FrameError::UnknownType { kind: self.kind }),
        } | flags::IGNORABLE;
        if self.flags & !allowed != 0 {
            return Err(FrameError::UnexpectedFlags {
                kind: self.kind,
                flags: self.flags,
            });
        }
        Ok(())
    }

    fn check_stream_id(&self) -> Result<(), FrameError> {
        let stream_frame = matches!(
            self.kind,
            kind::OPEN | kind::ACCEPT | kind::DATA | kind::RESET
        );
        let connection_frame = matches!(
            self.kind,
            kind::HELLO | kind::PING | kind::GOAWAY | kind::CLOSE
        );
        if stream_frame && self.stream.is_connection() {
            return Err(FrameError::MissingStreamId { kind: self.kind });
        }
        if connection_frame && !self.stream.is_connection() {
            return Err(FrameError::UnexpectedStreamId {
                kind: self.kind,
                stream: self.stream.0,
            });
        }
        Ok(())
    }
}

pub(crate) fn take_u8(body: &mut Bytes) -> Result<u8, FrameError> {
    need(body, 1)?;
    Ok(body.get_u8())
}

pub(crate) fn take_u16(body: &mut Bytes) -> Result<u16, FrameError> {
    need(body, 2)?;
    Ok(body.get_u16())
}

pub(crate) fn take_u32(body: &mut Bytes) -> Result<u32, FrameError> {
    need(body, 4)?;
    Ok(body.get_u32())
}

fn take_u64(body: &mut Bytes) -> Result<u64, FrameError> {
    need(body, 8)?;
    Ok(body.get_u64())
}

/// Takes `len` bytes, or reports how many are missing.
pub(crate) fn take_bytes(body: &mut Bytes, len: usize) -> Result<Bytes, FrameError> {
    need(body, len)?;
    Ok(body.split_to(len))
}

fn need(body: &Bytes, len: usize) -> Result<(), FrameError> {
    if body.len() < len {
        return Err(FrameError::Incomplete {
            needed: len - body.len(),
        });
    }
    Ok(())
}

/// A reason is the rest of the frame: UTF-8, at most [`MAX_REASON_LEN`] bytes.
fn take_reason(body: &mut Bytes) -> Result<String, FrameError> {
    if body.len() > MAX_REASON_LEN {
        return Err(FrameError::ReasonTooLong { len: body.len() });
    }
    let text = std::mem::take(body);
    String::from_utf8(text.to_vec()).map_err(|_| FrameError::ReasonNotUtf8)
}

fn put_reason(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(truncate_reason(reason).as_bytes());
}

/// Cuts `reason` to at most [`MAX_REASON_LEN`] bytes on a character boundary.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
