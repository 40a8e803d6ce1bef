//! The snapshot root this device trusts (`docs/snapshots.md`, "Keys").
//!
//! Root version 1 is the key pinned at enrollment (`keys.snapshot` in
//! `identity.json`). The platform sends the root versions the device has
//! not walked before a snapshot (`docs/protocol.md` §18); [`super::pull`]
//! walks them (`tether_proto::snapshot::Trust::update`) and hands the trust
//! it reaches to [`TrustStore::keep`], which writes it to
//! `STATE_DIR/snapshot-trust.json` (0600, atomically, in the agent's own
//! directory, which Node-RED cannot read) before anything is verified with
//! it, so a restart trusts the same root. The file names the pinned key it
//! started from: after a new enrollment (another pinned key) it starts
//! over.
//!
//! The trust never goes back: a version at or below the one kept is never
//! written. A file that is there but cannot be read is an error that says
//! what to do, and the device refuses snapshots until it is repaired; it
//! never falls back to the pinned key on its own, which would forget the
//! revocations it walked. This module never decides whether a root or a
//! manifest is valid (`tether_proto::snapshot` does).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_proto::snapshot::{Root, Trust};
use tracing::{info, warn};

use crate::files::{self, Mode};

/// The file in the state directory.
pub const TRUST_FILE: &str = "snapshot-trust.json";
/// Largest file read or written (a root with its revocations accumulated
/// over many rotations stays far below it).
const MAX_FILE: u64 = 1024 * 1024;

/// What the file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    /// The key pinned at enrollment, where the chain starts (hex).
    enrolled: String,
    /// The newest root walked, revocations accumulated.
    root: Root,
}

/// The kept trust could not be read or written.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "the snapshot trust in '{path}' cannot be read ({why}); snapshots are refused until it is repaired; help: restore it from a backup, or remove it (the device then walks the platform's key rotations again from the key pinned at enrollment, at its next snapshot)"
    )]
    Unreadable { path: PathBuf, why: String },
    #[error(
        "cannot keep the snapshot trust in '{path}' ({why}); the device keeps trusting root version {kept} and pulls the snapshot again at the next notice"
    )]
    Write {
        path: PathBuf,
        why: String,
        kept: u64,
    },
}

/// The trust a device verifies snapshots with, and where it is kept.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    enrolled: String,
    trust: Result<Trust, TrustError>,
}

impl TrustStore {
    /// The trust kept in `state_dir`, or the pinned key `enrolled` alone
    /// when none is kept (or it was kept for another enrollment). A file
    /// that cannot be read is remembered as an error: see
    /// [`TrustStore::current`].
    pub fn load(state_dir: &Path, enrolled: &str) -> TrustStore {
        let path = state_dir.join(TRUST_FILE);
        let trust = read(&path, enrolled);
        match &trust {
            Ok(trust) if trust.root.version > 1 => {
                info!(
                    root_version = trust.root.version,
                    "snapshot keys: trusting the root walked before"
                );
            }
            Ok(_) => {}
            Err(e) => warn!("{e}"),
        }
        TrustStore {
            path,
            enrolled: enrolled.to_owned(),
            trust,
        }
    }

    /// The trust to verify with, or why there is none.
    pub fn current(&self) -> Result<&Trust, &TrustError> {
        self.trust.as_ref()
    }

    /// Keeps `trust` if it is newer than the one kept: written to disk
    /// first (atomically, 0600), then used. One at or below the kept
    /// version changes nothing (false). On an error nothing changes.
    pub async fn keep(&mut self, trust: Trust) -> Result<bool, TrustError> {
        let kept = match &self.trust {
            Ok(current) => current.root.version,
            // `current` already refuses every snapshot; nothing walked
            // from elsewhere replaces a file nobody could read.
            Err(_) => return Ok(false),
        };
        if trust.root.version <= kept {
            return Ok(false);
        }
        let failed = |why: String| TrustError::Write {
            path: self.path.clone(),
            why,
            kept,
        };
        let stored = Stored {
            enrolled: self.enrolled.clone(),
            root: trust.root.clone(),
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| failed(e.to_string()))?;
        if json.len() as u64 > MAX_FILE {
            return Err(failed(format!(
                "{} bytes, more than the {MAX_FILE}-byte limit",
                json.len()
            )));
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || files::write_atomic(&path, &json, Mode::Secret))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        info!(
            from = kept,
            to = trust.root.version,
            "snapshot keys: walked the platform's root rotations"
        );
        self.trust = Ok(trust);
        Ok(true)
    }
}

fn read(path: &Path, enrolled: &str) -> Result<Trust, TrustError> {
    let unreadable = |why: String| TrustError::Unreadable {
        path: path.to_owned(),
        why,
    };
    let bytes = match files::read_bounded(path, MAX_FILE) {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(Trust::pinned(enrolled)),
        Err(e) => return Err(unreadable(e.source.to_string())),
    };
    let stored: Stored =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(format!("not valid: {e}")))?;
    if stored.enrolled != enrolled {
        info!(
            "snapshot keys: the kept trust belongs to an earlier enrollment; starting from the key pinned now"
        );
        return Ok(Trust::pinned(enrolled));
    }
    if stored.root.version < 2 {
        return Err(unreadable(format!(
            "it names root version {}, and only walked versions (2 and up) are kept",
            stored.root.version
        )));
    }
    Ok(Trust { root: stored.root })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ring::signature::{Ed25519KeyPair, KeyPair};
    use tether_proto::snapshot::{ROOT_CONTEXT, seal};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> Ed25519KeyPair {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap()
    }

    fn public(key: &Ed25519KeyPair) -> String {
        crate::identity::hex(key.public_key().as_ref())
    }

    /// `pinned`'s trust walked to root version 2.
    fn rotated(pinned: &Ed25519KeyPair) -> Trust {
        let next = key();
        let root = Root {
            version: 2,
            root_key: public(&next),
            snapshot_keys: vec![public(&next)],
            revoked: vec![public(pinned)],
            expires_at: NOW + 3600,
        };
        let envelope = seal(
            ROOT_CONTEXT,
            &serde_json::to_vec(&root).unwrap(),
            &[pinned, &next],
        );
        Trust::pinned(&public(pinned))
            .update(&[envelope], NOW)
            .unwrap()
    }

    #[tokio::test]
    async fn a_walked_trust_is_kept_0600_survives_a_restart_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = key();
        let mut store = TrustStore::load(dir.path(), &public(&pinned));
        assert_eq!(store.current().unwrap(), &Trust::pinned(&public(&pinned)));
        assert!(!dir.path().join(TRUST_FILE).exists());

        let two = rotated(&pinned);
        assert!(store.keep(two.clone()).await.unwrap());
        assert_eq!(store.current().unwrap(), &two);
        let path = dir.path().join(TRUST_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A restart trusts the same root.
        let mut store = TrustStore::load(dir.path(), &public(&pinned));
        assert_eq!(store.current().unwrap(), &two);
        // Nothing lower or equal replaces it, on disk or in memory.
        assert!(!store.keep(Trust::pinned(&public(&pinned))).await.unwrap());
        assert!(!store.keep(rotated(&pinned)).await.unwrap());
        assert_eq!(store.current().unwrap(), &two);
        assert_eq!(
            TrustStore::load(dir.path(), &public(&pinned))
                .current()
                .unwrap(),
            &two
        );

        // Another enrollment starts from its own pinned key.
        let other = key();
        let store = TrustStore::load(dir.path(), &public(&other));
        assert_eq!(store.current().unwrap(), &Trust::pinned(&public(&other)));
    }

    #[tokio::test]
    async fn a_damaged_file_is_an_error_that_says_what_to_do_never_the_pinned_key() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = key();
        let path = dir.path().join(TRUST_FILE);
        for damage in [
            &b"{\"enrolled\": "[..],
            b"[]",
            b"{\"enrolled\": \"x\", \"root\": {}}",
        ] {
            std::fs::write(&path, damage).unwrap();
            let mut store = TrustStore::load(dir.path(), &public(&pinned));
            let err = store.current().unwrap_err().to_string();
            assert!(err.contains(TRUST_FILE), "{err}");
            assert!(
                err.contains("help: restore it from a backup, or remove it"),
                "{err}"
            );
            // Nothing walked replaces it either.
            assert!(!store.keep(rotated(&pinned)).await.unwrap());
            assert_eq!(std::fs::read(&path).unwrap(), damage);
        }
        // A kept version 1 is not something this module writes.
        let stored = Stored {
            enrolled: public(&pinned),
            root: Trust::pinned(&public(&pinned)).root,
        };
        std::fs::write(&path, serde_json::to_vec(&stored).unwrap()).unwrap();
        let store = TrustStore::load(dir.path(), &public(&pinned));
        assert!(store.current().is_err());
        // Larger than any trust is.
        std::fs::write(&path, vec![b' '; MAX_FILE as usize + 1]).unwrap();
        let store = TrustStore::load(dir.path(), &public(&pinned));
        let err = store.current().unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    #[tokio::test]
    async fn a_trust_that_cannot_be_written_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = key();
        let gone = dir.path().join("gone");
        let mut store = TrustStore::load(&gone, &public(&pinned));
        let err = store.keep(rotated(&pinned)).await.unwrap_err().to_string();
        assert!(err.contains("keeps trusting root version 1"), "{err}");
        assert_eq!(store.current().unwrap().root.version, 1);
    }
}
