//! The platform grant keys this device trusts: the one pinned at
//! enrollment, then each key the platform rotated to, as long as every step
//! is signed by the key before it (`tether_proto::grant::follow`). A key a
//! rotation retired is still accepted for
//! [`RETIRED_KEY_GRACE_SECS`]
//! (grants signed just before the rotation), then refused.
//!
//! Kept in `STATE_DIR/grant-keys.json` (written atomically; the state
//! directory is the agent's alone), with the key pinned at enrollment: after
//! a new enrollment (another pinned key) the file starts over. This module
//! never trusts a key that no trusted key signed, and never logs anything
//! but public keys.

use serde::{Deserialize, Serialize};
use tether_proto::grant::{self, KeyRotation, MAX_ROTATIONS, RETIRED_KEY_GRACE_SECS};

use crate::files::{self, FileError, Mode};
use crate::identity::StateDir;

/// The file in the state directory.
pub const GRANT_KEYS_FILE: &str = "grant-keys.json";
/// Largest file read.
const MAX_FILE: u64 = 64 * 1024;

/// A key a rotation retired, accepted until `until` (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub key: String,
    pub until: u64,
}

/// The grant keys a device trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKeys {
    /// The key pinned at enrollment, where the chain starts.
    pub enrolled: String,
    /// The newest key: grants are signed with it.
    pub current: String,
    #[serde(default)]
    pub retired: Vec<Retired>,
}

impl TrustedKeys {
    /// Only the key pinned at enrollment.
    pub fn pinned(key: &str) -> TrustedKeys {
        TrustedKeys {
            enrolled: key.to_string(),
            current: key.to_string(),
            retired: Vec::new(),
        }
    }

    /// The stored keys if they start from `enrolled`, else just `enrolled`.
    pub fn load(state: &StateDir, enrolled: &str) -> TrustedKeys {
        let path = state.root().join(GRANT_KEYS_FILE);
        files::read_bounded(&path, MAX_FILE)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<TrustedKeys>(&bytes).ok())
            .filter(|keys| keys.enrolled == enrolled)
            .unwrap_or_else(|| TrustedKeys::pinned(enrolled))
    }

    /// Writes the keys to the state directory.
    pub fn store(&self, state: &StateDir) -> Result<(), FileError> {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        files::write_atomic(&state.root().join(GRANT_KEYS_FILE), &json, Mode::Public)
    }

    /// The keys a grant may be signed with at `now`, newest first.
    pub fn accepted(&self, now: u64) -> Vec<String> {
        let mut keys = vec![self.current.clone()];
        keys.extend(
            self.retired
                .iter()
                .rev()
                .filter(|r| r.until > now)
                .map(|r| r.key.clone()),
        );
        keys
    }

    /// Follows the platform's rotations from the current key at `now`;
    /// returns how many steps were taken (0: nothing new, or nothing a
    /// trusted key signed).
    pub fn follow(&mut self, rotations: &[KeyRotation], now: u64) -> usize {
        let steps = grant::follow(&self.current, rotations);
        for step in &steps {
            self.retired.push(Retired {
                key: step.from.clone(),
                until: now.saturating_add(RETIRED_KEY_GRACE_SECS),
            });
            self.current = step.to.clone();
        }
        self.retired.retain(|r| r.until > now);
        let excess = self.retired.len().saturating_sub(MAX_ROTATIONS);
        self.retired.drain(..excess);
        steps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn new_key() -> Ed25519KeyPair {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap()
    }

    fn public(key: &Ed25519KeyPair) -> String {
        crate::identity::hex(key.public_key().as_ref())
    }

    #[test]
    fn a_rotation_is_followed_and_the_old_key_refused_after_its_grace() {
        let (k1, k2, k3) = (new_key(), new_key(), new_key());
        let mut keys = TrustedKeys::pinned(&public(&k1));
        let rotations = [
            KeyRotation::sign(&k1, &public(&k2), 10),
            KeyRotation::sign(&k2, &public(&k3), 20),
        ];
        assert_eq!(keys.follow(&rotations, 1000), 2);
        assert_eq!(keys.current, public(&k3));
        assert_eq!(keys.accepted(1000), [public(&k3), public(&k2), public(&k1)]);
        // Once the grace is over only the newest key is accepted.
        let later = 1000 + RETIRED_KEY_GRACE_SECS;
        assert_eq!(keys.accepted(later), [public(&k3)]);
        // Seen again, the same rotations change nothing.
        assert_eq!(keys.follow(&rotations, later), 0);
        assert!(keys.retired.is_empty());
        // A rotation from a key nobody trusts is ignored.
        let stranger = new_key();
        let forged = [KeyRotation::sign(&stranger, &public(&new_key()), 30)];
        assert_eq!(keys.follow(&forged, later), 0);
        assert_eq!(keys.current, public(&k3));
    }

    #[test]
    fn the_file_starts_over_after_a_new_enrollment() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let (k1, k2) = (new_key(), new_key());
        let mut keys = TrustedKeys::pinned(&public(&k1));
        keys.follow(&[KeyRotation::sign(&k1, &public(&k2), 1)], 5);
        keys.store(&state).unwrap();
        assert_eq!(TrustedKeys::load(&state, &public(&k1)), keys);
        let other = public(&new_key());
        assert_eq!(
            TrustedKeys::load(&state, &other),
            TrustedKeys::pinned(&other)
        );
    }
}
