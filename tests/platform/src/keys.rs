//! The platform's own secrets besides the CA: the Ed25519 keys that sign
//! snapshots and editor access grants, and the admin token.
//!
//! The grant key can be rotated without enrolling the fleet again
//! ([`SigningKeys::rotate_grant_key`]): the old key signs a
//! [`KeyRotation`] naming the new one, the rotation is kept (the last
//! [`MAX_ROTATIONS`] of them, in `grant-key-rotations.json`, public) and
//! sent to every device on its control stream, and the old private key is
//! deleted. A crash in the middle leaves either the old key or the new one
//! with its rotation recorded, never a key devices cannot follow to.
//!
//! This module owns making them (from `ring::rand::SystemRandom`), storing
//! them (PKCS#8 or text, 0600, through [`crate::files`]) and loading them on
//! restart. Only public keys, hashes and signatures leave it: the private
//! keys stay behind [`SigningKeys`] (which signs editor access grants with
//! [`SigningKeys::sign_grant`]), and the admin token is handed out once, to
//! the token file the admin CLI reads. It never logs a key or a token.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use tether_proto::api::{PinnedKeys, Secret};
use tether_proto::grant::{Grant, KeyRotation, MAX_ROTATIONS};

use crate::files::{self, FileError, PUBLIC_MODE, SECRET_MODE};

/// File of the snapshot signing key (PKCS#8 DER).
pub const SNAPSHOT_KEY_FILE: &str = "snapshot-key.pk8";
/// File of the grant signing key (PKCS#8 DER).
pub const GRANT_KEY_FILE: &str = "grant-key.pk8";
/// The next grant key while a rotation is being written.
const GRANT_KEY_NEXT_FILE: &str = "grant-key.next.pk8";
/// The grant key's rotations, oldest first (public: JSON).
pub const GRANT_ROTATIONS_FILE: &str = "grant-key-rotations.json";
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
    #[error("'{0}' is not a valid list of grant key rotations; help: restore it from a backup")]
    BadRotations(String),
}

/// The Ed25519 keys whose public halves devices pin at enrollment.
#[derive(Debug)]
pub struct SigningKeys {
    snapshot: Ed25519KeyPair,
    grant: RwLock<Ed25519KeyPair>,
    rotations: RwLock<Vec<KeyRotation>>,
    dir: PathBuf,
}

impl SigningKeys {
    /// Loads both keys from `dir`, creating any that is missing, and
    /// finishes a grant key rotation a crash interrupted.
    pub fn load_or_create(dir: &Path) -> Result<SigningKeys, KeyError> {
        let rotations = load_rotations(dir)?;
        let next = dir.join(GRANT_KEY_NEXT_FILE);
        if let Ok(pkcs8) = files::read(&next) {
            let recorded = Ed25519KeyPair::from_pkcs8(&pkcs8).ok().is_some_and(|key| {
                rotations.last().map(|r| r.to.as_str()) == Some(&hex(key.public_key().as_ref()))
            });
            if recorded {
                // The rotation was recorded: the new key is the key.
                files::write_atomic(&dir.join(GRANT_KEY_FILE), &pkcs8, SECRET_MODE)?;
            }
            let _ = std::fs::remove_file(&next);
        }
        Ok(SigningKeys {
            snapshot: load_or_create_ed25519(&dir.join(SNAPSHOT_KEY_FILE))?,
            grant: RwLock::new(load_or_create_ed25519(&dir.join(GRANT_KEY_FILE))?),
            rotations: RwLock::new(rotations),
            dir: dir.to_path_buf(),
        })
    }

    /// The public keys as `EnrollResponse.keys` carries them (the current
    /// grant key).
    pub fn pinned(&self) -> PinnedKeys {
        PinnedKeys {
            snapshot: hex(self.snapshot.public_key().as_ref()),
            grant: hex(self.grant_key().public_key().as_ref()),
        }
    }

    fn grant_key(&self) -> std::sync::RwLockReadGuard<'_, Ed25519KeyPair> {
        self.grant.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signs an editor access grant with the grant key: the wire form the
    /// `editor` stream's OPEN header carries (`docs/protocol.md` §16.2).
    pub fn sign_grant(&self, grant: &Grant) -> String {
        grant.sign(&self.grant_key())
    }

    /// Signs a snapshot manifest (its exact bytes) with the snapshot key.
    pub fn sign_snapshot(&self, manifest: &[u8]) -> tether_proto::snapshot::Envelope {
        tether_proto::snapshot::seal(
            tether_proto::snapshot::MANIFEST_CONTEXT,
            manifest,
            &[&self.snapshot],
        )
    }

    /// The grant key's rotations, oldest first.
    pub fn rotations(&self) -> Vec<KeyRotation> {
        self.rotations
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the grant key with a new one at `now` (Unix seconds): the
    /// new key is written aside, the rotation signed by the old key is
    /// recorded, then the new key takes the old one's place (the old private
    /// key is gone). Returns the rotation.
    pub fn rotate_grant_key(&self, now: u64) -> Result<KeyRotation, KeyError> {
        let mut grant = self.grant.write().unwrap_or_else(PoisonError::into_inner);
        let document =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
        let next = Ed25519KeyPair::from_pkcs8(document.as_ref())
            .map_err(|_| KeyError::BadKey(GRANT_KEY_NEXT_FILE.into()))?;
        files::write_atomic(
            &self.dir.join(GRANT_KEY_NEXT_FILE),
            document.as_ref(),
            SECRET_MODE,
        )?;
        let rotation = KeyRotation::sign(&grant, &hex(next.public_key().as_ref()), now);
        let mut rotations = self
            .rotations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut kept = rotations.clone();
        kept.push(rotation.clone());
        let excess = kept.len().saturating_sub(MAX_ROTATIONS);
        kept.drain(..excess);
        let json = serde_json::to_vec_pretty(&kept).unwrap_or_default();
        files::write_atomic(&self.dir.join(GRANT_ROTATIONS_FILE), &json, PUBLIC_MODE)?;
        // The commit point is the rotations file: from here on a crash
        // finishes the rotation at the next start.
        files::write_atomic(
            &self.dir.join(GRANT_KEY_FILE),
            document.as_ref(),
            SECRET_MODE,
        )?;
        let _ = std::fs::remove_file(self.dir.join(GRANT_KEY_NEXT_FILE));
        *rotations = kept;
        *grant = next;
        Ok(rotation)
    }
}

fn load_rotations(dir: &Path) -> Result<Vec<KeyRotation>, KeyError> {
    let path = dir.join(GRANT_ROTATIONS_FILE);
    match files::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|_| KeyError::BadRotations(path.display().to_string())),
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        Err(e) => Err(e.into()),
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
    fn a_rotated_grant_key_is_signed_by_the_old_one_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        let first = keys.pinned().grant;
        let rotation = keys.rotate_grant_key(100).unwrap();
        assert_eq!(rotation.from, first);
        assert_eq!(rotation.to, keys.pinned().grant);
        assert!(rotation.verifies());
        let second = keys.rotate_grant_key(200).unwrap();
        assert_eq!(
            tether_proto::grant::follow(&first, &keys.rotations()).len(),
            2
        );
        let reloaded = SigningKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(reloaded.pinned().grant, second.to);
        assert_eq!(reloaded.rotations(), [rotation, second]);
        assert!(!dir.path().join(GRANT_KEY_NEXT_FILE).exists());
        // A crash after the new key was written aside but before the
        // rotation was recorded: the old key stays.
        std::fs::write(dir.path().join(GRANT_KEY_NEXT_FILE), b"junk").unwrap();
        let again = SigningKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(again.pinned().grant, reloaded.pinned().grant);
        assert!(!dir.path().join(GRANT_KEY_NEXT_FILE).exists());
    }

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
