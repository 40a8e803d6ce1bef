//! The HELLO frame: protocol version, role and the limits a side enforces.
//!
//! Each side sends HELLO as its first frame without waiting for the other, so
//! the handshake costs no round trip (`docs/protocol.md`, "Handshake"). This
//! module owns the payload layout and the validation of each setting; the
//! decision to accept or refuse a peer's hello lives in `connection`.

use bytes::{BufMut, Bytes};

use crate::frame::{FrameError, take_bytes, take_u8, take_u16, take_u32};

/// Major version: peers with different majors refuse each other.
pub const PROTOCOL_MAJOR: u8 = 1;
/// Minor version: additions a peer of the same major may ignore.
pub const PROTOCOL_MINOR: u8 = 0;
/// `PROTOCOL_MAJOR.PROTOCOL_MINOR` as text, for version strings.
pub const PROTOCOL_VERSION: &str = "1.0";

/// First bytes of every HELLO payload.
pub const MAGIC: [u8; 4] = *b"TTHR";

/// Most settings one HELLO may carry; more is a protocol error.
pub const MAX_SETTINGS: usize = 64;

/// Setting identifiers (`docs/protocol.md`, "Settings").
pub mod setting {
    pub const MAX_FRAME_PAYLOAD: u16 = 0x0001;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x0002;
    pub const INITIAL_STREAM_WINDOW: u16 = 0x0003;
    pub const CONNECTION_WINDOW: u16 = 0x0004;
    pub const MAX_OPEN_PAYLOAD: u16 = 0x0005;
}

/// Which end of the tunnel a peer is. Devices open odd stream ids, the
/// platform even ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Device,
    Platform,
}

impl Role {
    fn to_wire(self) -> u8 {
        match self {
            Role::Device => 0x01,
            Role::Platform => 0x02,
        }
    }

    fn from_wire(role: u8) -> Result<Role, FrameError> {
        match role {
            0x01 => Ok(Role::Device),
            0x02 => Ok(Role::Platform),
            role => Err(FrameError::UnknownRole { role }),
        }
    }

    /// The role at the other end of a tunnel.
    pub fn peer(self) -> Role {
        match self {
            Role::Device => Role::Platform,
            Role::Platform => Role::Device,
        }
    }

    /// Parity of the stream ids this role opens: 1 for odd, 0 for even.
    pub fn stream_parity(self) -> u32 {
        match self {
            Role::Device => 1,
            Role::Platform => 0,
        }
    }
}

/// The limits a side announces. Each is what the *sender* of the HELLO is
/// prepared to receive; the peer must stay within them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Largest frame payload the sender accepts, in bytes.
    pub max_frame_payload: u32,
    /// Most streams the peer may have open toward the sender at once.
    pub max_concurrent_streams: u32,
    /// Credit each new stream starts with, in each direction it receives.
    pub initial_stream_window: u32,
    /// Credit the connection as a whole starts with.
    pub connection_window: u32,
    /// Largest OPEN payload (service header and metadata) the sender accepts.
    pub max_open_payload: u32,
}

impl Settings {
    /// Values assumed for settings a peer does not send.
    pub const DEFAULT: Settings = Settings {
        max_frame_payload: 64 * 1024,
        max_concurrent_streams: 256,
        initial_stream_window: 256 * 1024,
        connection_window: 16 * 1024 * 1024,
        max_open_payload: 4 * 1024,
    };

    /// Checks a setting's value against the range `docs/protocol.md` allows.
    fn validate(id: u16, value: u32) -> Result<(), FrameError> {
        let ok = match id {
            setting::MAX_FRAME_PAYLOAD => (1024..=16 * 1024 * 1024).contains(&value),
            setting::MAX_CONCURRENT_STREAMS => true,
            setting::INITIAL_STREAM_WINDOW | setting::CONNECTION_WINDOW => {
                (1024..=crate::MAX_WINDOW).contains(&value)
            }
            setting::MAX_OPEN_PAYLOAD => (64..=65535).contains(&value),
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(FrameError::InvalidSetting { setting: id, value })
        }
    }

    fn pairs(&self) -> [(u16, u32); 5] {
        [
            (setting::MAX_FRAME_PAYLOAD, self.max_frame_payload),
            (setting::MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
            (setting::INITIAL_STREAM_WINDOW, self.initial_stream_window),
            (setting::CONNECTION_WINDOW, self.connection_window),
            (setting::MAX_OPEN_PAYLOAD, self.max_open_payload),
        ]
    }

    fn set(&mut self, id: u16, value: u32) {
        match id {
            setting::MAX_FRAME_PAYLOAD => self.max_frame_payload = value,
            setting::MAX_CONCURRENT_STREAMS => self.max_concurrent_streams = value,
            setting::INITIAL_STREAM_WINDOW => self.initial_stream_window = value,
            setting::CONNECTION_WINDOW => self.connection_window = value,
            setting::MAX_OPEN_PAYLOAD => self.max_open_payload = value,
            // Unknown settings belong to a newer minor version: ignore them.
            _ => {}
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::DEFAULT
    }
}

/// The payload of a HELLO frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub major: u8,
    pub minor: u8,
    pub role: Role,
    pub settings: Settings,
}

impl Hello {
    /// A hello for this version of the protocol.
    pub fn new(role: Role, settings: Settings) -> Hello {
        Hello {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            role,
            settings,
        }
    }

    pub(crate) fn encoded_len(&self) -> usize {
        8 + 6 * self.settings.pairs().len()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.put_u8(self.major);
        out.put_u8(self.minor);
        out.put_u8(self.role.to_wire());
        out.put_u8(0);
        for (id, value) in self.settings.pairs() {
            out.put_u16(id);
            out.put_u32(value);
        }
    }

    /// Decodes a HELLO payload. Settings not present keep their
    /// [`Settings::DEFAULT`] values; unknown setting ids are skipped.
    ///
    /// Only the magic and the major version are read before the rest: a peer
    /// of another major version may lay out the remainder differently, and
    /// must get a version error, not a parse error.
    pub(crate) fn decode(body: &mut Bytes) -> Result<Hello, FrameError> {
        if take_bytes(body, 4)?[..] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let major = take_u8(body)?;
        let minor = take_u8(body)?;
        let role_byte = take_u8(body)?;
        let _reserved = take_u8(body)?;
        if major != PROTOCOL_MAJOR {
            // Let the connection refuse the version with a clear reason.
            body.clear();
            return Ok(Hello {
                major,
                minor,
                role: Role::Device,
                settings: Settings::DEFAULT,
            });
        }
        let role = Role::from_wire(role_byte)?;
        let mut settings = Settings::DEFAULT;
        let mut seen = Vec::new();
        while !body.is_empty() {
            let id = take_u16(body)?;
            let value = take_u32(body)?;
            if seen.len() == MAX_SETTINGS {
                return Err(FrameError::TooManySettings);
            }
            if seen.contains(&id) {
                return Err(FrameError::DuplicateSetting { setting: id });
            }
            seen.push(id);
            Settings::validate(id, value)?;
            settings.set(id, value);
        }
        Ok(Hello {
            major,
            minor,
            role,
            settings,
        })
    }
}
