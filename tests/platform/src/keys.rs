//! The platform's own secrets besides the CA: the Ed25519 keys that sign
//! snapshots and editor access grants, and the admin token.
//!
//! This module owns making them (from `ring::rand::SystemRandom`), storing
//! them (PKCS#8 or text, 0600, through [`crate::files`]) and loading them on
//! restart. Only public keys, hashes and signatures leave it: the private
//! keys stay behind [`SigningKeys`] (which signs editor access grants with
//! [`SigningKeys::sign_grant`]), and the admin token is handed out once, to
//! the token file the admin CLI reads. It never logs a key or a token.

use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use tether_proto::api::{PinnedKeys, Secret};
use tether_proto::grant::Grant;

use crate::files::{self, FileError, SECRET_MODE};

/// File of the snapshot signing key (PKCS#8 DER).
pub const SNAPSHOT_KEY_FILE: &str = "snapshot-key.pk8";
/// File of the grant signing key (PKCS#8 DER).
pub const GRANT_KEY_FILE: &str = "grant-key.pk8";
/// File of the admin token, read by the admin CLI.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Every admin token starts with this, so a leaked one is recognisable.
const ADMIN_TOKEN_PREFIX: &str = "tat_";

/// A key or token could not be made, read or stored.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "'{0}' is not a valid Ed25519 PKCS#8 key; help: restore it from a backup, or start with a new data directory"
    )]
    BadKey(String),
    #[error("the system random number generator failed")]
    Random,
}

/// The Ed25519 keys whose public halves devices pin at enrollment.
#[derive(Debug)]
pub struct SigningKeys {
    snapshot: Ed25519KeyPair,
    grant: Ed25519KeyPair,
}

impl SigningKeys {
    /// Loads both keys from `dir`, creating any that is missing.
    pub fn load_or_create(dir: &Path) -> Result<SigningKeys, KeyError> {
        Ok(SigningKeys {
            snapshot: load_or_create_ed25519(&dir.join(SNAPSHOT_KEY_FILE))?,
            grant: load_or_create_ed25519(&dir.join(GRANT_KEY_FILE))?,
        })
    }

    /// The public keys as `EnrollResponse.keys` carries them.
    pub fn pinned(&self) -> PinnedKeys {
        PinnedKeys {
            snapshot: hex(self.snapshot.public_key().as_ref()),
            grant: hex(self.grant.public_key().as_ref()),
        }
    }

    /// Signs an editor access grant with the grant key: the wire form the
    /// `editor` stream's OPEN header carries (`docs/protocol.md` §16.2).
    pub fn sign_grant(&self, grant: &Grant) -> String {
        grant.sign(&self.grant)
    }
}

fn load_or_create_ed25519(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let pkcs8 = match files::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => {
            let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| KeyError::Random)?;
            files::write_atomic(path, document.as_ref(), SECRET_MODE)?;
            document.as_ref().to_vec()
        }
        Err(e) => return Err(e.into()),
    };
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::BadKey(path.display().to_string()))
}

/// Reads the admin token from `dir`, creating it (256 random bits) if it is
/// missing. The caller stores only its hash.
pub fn load_or_create_admin_token(dir: &Path) -> Result<Secret, KeyError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    match files::read_text(&path) {
        Ok(text) => Ok(Secret::new(text.trim())),
        Err(e) if e.is_not_found() => {
            let token = format!("{ADMIN_TOKEN_PREFIX}{}", random_hex(32)?);
            files::write_atomic(&path, format!("{token}\n").as_bytes(), SECRET_MODE)?;
            Ok(Secret::new(token))
        }
        Err(e) => Err(e.into()),
    }
}

/// `bytes` random bytes from the operating system, as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| KeyError::Random)?;
    Ok(hex(&buf))
}

/// `N` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut buf = [0u8; N];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| KeyError::Random)?;
    Ok(buf)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// SHA-256 of `data` as lowercase hex: the key under which tokens and
/// certificates are stored.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha256(data))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let first = SigningKeys::load_or_create(dir.path()).unwrap().pinned();
        let second = SigningKeys::load_or_create(dir.path()).unwrap().pinned();
        assert_eq!(first, second);
        assert!(tether_proto::api::is_ed25519_public_key(&first.snapshot));
        assert_ne!(first.snapshot, first.grant);
    }

    #[test]
    fn a_signed_grant_verifies_with_the_pinned_grant_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        let grant = Grant {
            user: "alice".into(),
            role: tether_proto::grant::Role::Member,
            team: "line-3".into(),
            device: "dev_1".into(),
            issued_at: 1000,
            expires_at: 1300,
            nonce: "0".repeat(32),
            protected: false,
        };
        let wire = keys.sign_grant(&grant);
        let unhex = |text: &str| -> Vec<u8> {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
                .collect()
        };
        let pinned = keys.pinned();
        let verified = tether_proto::grant::verify(&wire, &unhex(&pinned.grant), "dev_1", 1010);
        assert_eq!(verified, Ok(grant));
        assert!(
            tether_proto::grant::verify(&wire, &unhex(&pinned.snapshot), "dev_1", 1010).is_err()
        );
    }

    #[test]
    fn the_admin_token_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_admin_token(dir.path()).unwrap();
        let second = load_or_create_admin_token(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.expose().len(), 4 + 64);
    }
}
