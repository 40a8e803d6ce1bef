//! Admission of an editor stream: the access grant in its OPEN header,
//! verified against the grant keys the device trusts (the one pinned at
//! enrollment or the ones it rotated to, `super::keys`), this device's id
//! and the agent's clock, then admitted once by the replay guard
//! (`docs/protocol.md` §16.2).
//!
//! This module owns that sequence and what a refusal answers (status and
//! sentence). It never logs or returns the grant's wire form; a refusal
//! names what was wrong, in `GrantError`'s words.

use std::sync::{Mutex, PoisonError};

use http::StatusCode;
use tether_proto::ServiceHeader;
use tether_proto::grant::{self, GRANT_METADATA_KEY, Grant, GrantError, ReplayGuard};

/// Nonces the agent remembers at most; beyond that new grants get 503.
pub const REPLAY_CAPACITY: usize = 4096;

/// What a grant is checked against: this device as enrolled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The device id the grant must name.
    pub id: String,
    /// The grant keys accepted now, newest first, each 64 lowercase hex
    /// digits (`PinnedKeys.grant`, then `super::keys::TrustedKeys`).
    pub grant_keys: Vec<String>,
}

/// Why a stream was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{error}")]
    Grant {
        error: GrantError,
        /// The user of a grant that verified but was refused later.
        user: Option<String>,
    },
    #[error(
        "this device has no usable grant key from its enrollment; help: re-enroll it ('tetherd enroll --force')"
    )]
    NoGrantKey,
}

impl Refusal {
    /// The HTTP status of the refusal page.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Grant {
                error: GrantError::ReplayGuardFull,
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Grant { .. } => StatusCode::FORBIDDEN,
            Refusal::NoGrantKey => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The user named by the grant, if it verified.
    pub fn user(&self) -> Option<&str> {
        match self {
            Refusal::Grant { user, .. } => user.as_deref(),
            Refusal::NoGrantKey => None,
        }
    }
}

impl From<GrantError> for Refusal {
    fn from(error: GrantError) -> Refusal {
        Refusal::Grant { error, user: None }
    }
}

/// Checks the grant of a stream's OPEN header at `now` (Unix seconds, the
/// agent's clock) and records its nonce in `guard`.
pub fn admit(
    header: &ServiceHeader,
    device: &Device,
    guard: &Mutex<ReplayGuard>,
    now: u64,
) -> Result<Grant, Refusal> {
    let wire = header.get(GRANT_METADATA_KEY).ok_or(GrantError::Missing)?;
    let keys: Vec<[u8; 32]> = device
        .grant_keys
        .iter()
        .filter_map(|k| decode_key(k))
        .collect();
    if keys.is_empty() {
        return Err(Refusal::NoGrantKey);
    }
    // The first key whose signature verifies decides; a grant no trusted
    // key signed is a bad signature.
    let mut verified = Err(GrantError::BadSignature);
    for key in &keys {
        verified = grant::verify(wire, key, &device.id, now);
        if verified != Err(GrantError::BadSignature) {
            break;
        }
    }
    let grant = verified?;
    let admitted = guard
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .admit(&grant, now);
    match admitted {
        Ok(()) => Ok(grant),
        Err(error) => Err(Refusal::Grant {
            error,
            user: Some(grant.user),
        }),
    }
}

/// 64 lowercase hex digits to 32 bytes.
fn decode_key(hex: &str) -> Option<[u8; 32]> {
    if !tether_proto::api::is_ed25519_public_key(hex) {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use tether_proto::Service;
    use tether_proto::grant::Role;

    const NOW: u64 = 1_800_000_000;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn grant() -> Grant {
        Grant {
            user: "alice".into(),
            role: Role::Member,
            team: "line-3".into(),
            device: "dev_1".into(),
            issued_at: NOW,
            expires_at: NOW + 60,
            nonce: "0123456789abcdef0123456789abcdef".into(),
            protected: false,
        }
    }

    fn device(key: &Ed25519KeyPair) -> Device {
        Device {
            id: "dev_1".into(),
            grant_keys: vec![crate::identity::hex(key.public_key().as_ref())],
        }
    }

    fn header(wire: &str) -> ServiceHeader {
        ServiceHeader::new(Service::Editor).with(GRANT_METADATA_KEY, wire)
    }

    #[test]
    fn a_grant_is_admitted_once() {
        let key = key();
        let guard = Mutex::new(ReplayGuard::new(8));
        let wire = grant().sign(&key);
        assert_eq!(
            admit(&header(&wire), &device(&key), &guard, NOW),
            Ok(grant())
        );
        let again = admit(&header(&wire), &device(&key), &guard, NOW).unwrap_err();
        assert_eq!(again.user(), Some("alice"));
        assert_eq!(again.status(), StatusCode::FORBIDDEN);
        assert_eq!(again.to_string(), GrantError::Replayed.to_string());
    }

    #[test]
    fn refusals_answer_403_503_or_500() {
        let key = key();
        let guard = Mutex::new(ReplayGuard::new(0));
        let missing = admit(
            &ServiceHeader::new(Service::Editor),
            &device(&key),
            &guard,
            NOW,
        );
        assert_eq!(missing, Err(GrantError::Missing.into()));
        let full = admit(&header(&grant().sign(&key)), &device(&key), &guard, NOW).unwrap_err();
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        let broken = Device {
            grant_keys: vec!["zz".into()],
            ..device(&key)
        };
        let no_key = admit(&header(&grant().sign(&key)), &broken, &guard, NOW).unwrap_err();
        assert_eq!(no_key, Refusal::NoGrantKey);
        assert_eq!(no_key.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn the_pinned_key_is_read_from_hex() {
        let key = key();
        let hex = crate::identity::hex(key.public_key().as_ref());
        assert_eq!(
            decode_key(&hex).unwrap().as_slice(),
            key.public_key().as_ref()
        );
        assert_eq!(decode_key(&hex.to_uppercase()), None);
        assert_eq!(decode_key(&hex[2..]), None);
    }
}
