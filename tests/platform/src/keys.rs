//! The platform's own secrets besides the CA: the Ed25519 keys that sign
//! snapshots and editor access grants, and the admin token.
//!
//! The snapshot keys follow TUF's roots (`docs/snapshots.md`, "Keys"):
//! `snapshot-key.pk8` is root version 1, the key every device pins at
//! enrollment, and signs manifests until the first rotation
//! ([`SigningKeys::rotate_snapshot_keys`]). A rotation makes a new root key
//! and a new snapshot key, and root version N+1 naming them, signed by the
//! root key of version N and by the new one. Everything lives in
//! `snapshot-roots/` (0700): `N.json` (root version N's signed envelope,
//! public, kept for every N from 2 on: devices walk the chain from the
//! version they trust), `root-key-N.pk8` and `snapshot-key-N.pk8` (0600, the
//! current version's only) and `current.json` (the version in use and the
//! key devices pin). The new keys and the root document are written first
//! and `current.json` last, atomically: a crash before it leaves the old
//! version in use (the next start removes the unfinished one's files), a
//! crash after it the new one; the platform never signs with a key no
//! device can walk to. The old private keys are removed once the new
//! version is in use. Devices are sent the roots newer than theirs before
//! each snapshot (`docs/protocol.md` §18).
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
use serde::{Deserialize, Serialize};
use tether_proto::api::{PinnedKeys, Secret};
use tether_proto::grant::{Grant, KeyRotation, MAX_ROTATIONS};
use tether_proto::snapshot::{
    Envelope, MANIFEST_CONTEXT, MAX_ENVELOPE, MAX_ROOT_STEPS, ROOT_CONTEXT, Root, Trust, pull,
};

use crate::files::{self, FileError, PUBLIC_MODE, SECRET_MODE};

/// File of the snapshot signing key (PKCS#8 DER).
pub const SNAPSHOT_KEY_FILE: &str = "snapshot-key.pk8";
/// Folder of the snapshot root chain, made by the first rotation.
pub const SNAPSHOT_ROOTS_DIR: &str = "snapshot-roots";
/// In [`SNAPSHOT_ROOTS_DIR`]: the root version in use and the key devices
/// pin; replaced last in a rotation (its commit point).
pub const SNAPSHOT_ROOTS_CURRENT_FILE: &str = "current.json";
/// How long a root made by a rotation is valid. A device refuses every
/// snapshot once the root it trusts has expired, until the platform rotates
/// again: rotate at least this often.
pub const ROOT_EXPIRY_SECS: u64 = 10 * 365 * 86_400;
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
    #[error(
        "{0}; help: restore the data directory's {SNAPSHOT_ROOTS_DIR} folder from a backup (devices trust only the root chain they walked; a new chain means enrolling them again)"
    )]
    BadRoots(String),
}

/// `snapshot-roots/current.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CurrentRoot {
    /// The root version in use (2 or more: version 1 has no folder).
    version: u64,
    /// Root version 1's key (hex), which devices pin at enrollment.
    pinned: String,
}

/// The snapshot keys in use and the root chain behind them.
#[derive(Debug)]
struct SnapshotKeys {
    /// Root version 1's key, the one devices pin at enrollment.
    pinned: String,
    /// The newest root, revocations accumulated, as a device that walked
    /// the chain trusts it.
    root: Root,
    /// Its root key: signs the next version.
    root_key: Ed25519KeyPair,
    /// Its snapshot key: signs manifests.
    signer: Ed25519KeyPair,
    /// Every key a root of the chain named as a snapshot key.
    named: Vec<String>,
}

/// The Ed25519 keys whose public halves devices pin at enrollment.
#[derive(Debug)]
pub struct SigningKeys {
    snapshot: RwLock<SnapshotKeys>,
    grant: RwLock<Ed25519KeyPair>,
    rotations: RwLock<Vec<KeyRotation>>,
    dir: PathBuf,
}

impl SigningKeys {
    /// Loads both keys from `dir`, creating any that is missing, finishes a
    /// grant key rotation a crash interrupted, and checks the snapshot root
    /// chain (removing what an unfinished rotation left).
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
            snapshot: RwLock::new(load_snapshot_keys(dir)?),
            grant: RwLock::new(load_or_create_ed25519(&dir.join(GRANT_KEY_FILE))?),
            rotations: RwLock::new(rotations),
            dir: dir.to_path_buf(),
        })
    }

    /// The public keys as `EnrollResponse.keys` carries them: root version
    /// 1's snapshot key (whatever the version in use: a device walks the
    /// chain from it) and the current grant key.
    pub fn pinned(&self) -> PinnedKeys {
        PinnedKeys {
            snapshot: self.snapshot_keys().pinned.clone(),
            grant: hex(self.grant_key().public_key().as_ref()),
        }
    }

    fn snapshot_keys(&self) -> std::sync::RwLockReadGuard<'_, SnapshotKeys> {
        self.snapshot.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn grant_key(&self) -> std::sync::RwLockReadGuard<'_, Ed25519KeyPair> {
        self.grant.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signs an editor access grant with the grant key: the wire form the
    /// `editor` stream's OPEN header carries (`docs/protocol.md` §16.2).
    pub fn sign_grant(&self, grant: &Grant) -> String {
        grant.sign(&self.grant_key())
    }

    /// Signs a snapshot manifest (its exact bytes) with the snapshot key of
    /// the root version in use.
    pub fn sign_snapshot(&self, manifest: &[u8]) -> Envelope {
        tether_proto::snapshot::seal(MANIFEST_CONTEXT, manifest, &[&self.snapshot_keys().signer])
    }

    /// The root in use: its version, keys, every revocation so far and its
    /// expiry (version 1: the pinned key, never expiring).
    pub fn snapshot_root(&self) -> Root {
        self.snapshot_keys().root.clone()
    }

    /// The root versions newer than `trusted` and not newer than the one
    /// in use, oldest first, at most [`MAX_ROOT_STEPS`]: what a device
    /// trusting `trusted` is sent before a snapshot. Read from
    /// `snapshot-roots/` as stored, like the manifests (the device judges
    /// them); the version in use bounds it, so a rotation that has not
    /// reached its commit point is never sent.
    pub fn snapshot_roots_after(&self, trusted: u64) -> Result<Vec<Envelope>, KeyError> {
        self.roots_after(&self.snapshot_keys(), trusted)
    }

    fn roots_after(&self, keys: &SnapshotKeys, trusted: u64) -> Result<Vec<Envelope>, KeyError> {
        let roots = self.dir.join(SNAPSHOT_ROOTS_DIR);
        pull::root_versions_after(trusted, keys.root.version)
            .map(|version| read_root(&roots, version))
            .collect()
    }

    /// What a `snapshot` stream sends a device trusting `trusted` for the
    /// stored manifest envelope `stored`: the roots
    /// ([`SigningKeys::snapshot_roots_after`]) and the envelope as served
    /// ([`SigningKeys::served_manifest`]), both from the same root version
    /// (a rotation cannot fall between them).
    pub fn snapshot_answer(
        &self,
        trusted: u64,
        stored: Envelope,
    ) -> Result<(Vec<Envelope>, Envelope, bool), KeyError> {
        let keys = self.snapshot_keys();
        let roots = self.roots_after(&keys, trusted)?;
        let (envelope, again) = served(&keys, stored);
        Ok((roots, envelope, again))
    }

    /// A stored manifest envelope as it is served. One the current snapshot
    /// key signed is served as it is. One signed before a rotation by a key
    /// a root of this platform named and never revoked is signed again, the
    /// same bytes, with the current key: a snapshot made before a rotation
    /// still reaches the devices that walked it. Anything else (a revoked
    /// key's signature, or a stranger's) is served as it is: the device
    /// refuses it, with its reason. Also returns whether it was signed
    /// again.
    pub fn served_manifest(&self, envelope: Envelope) -> (Envelope, bool) {
        served(&self.snapshot_keys(), envelope)
    }

    /// Rotates the snapshot keys at `now` (Unix seconds): a new root key
    /// and a new snapshot key, and root version N+1 naming them (valid for
    /// [`ROOT_EXPIRY_SECS`]), signed by root key N and the new root key;
    /// with `revoke_old`, it revokes version N's root and snapshot keys.
    /// The keys and the document are written first, `current.json` last;
    /// from then on manifests are signed with the new snapshot key, and
    /// the old private keys are removed. Returns the new root as signed.
    pub fn rotate_snapshot_keys(&self, revoke_old: bool, now: u64) -> Result<Root, KeyError> {
        let mut keys = self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let roots = self.dir.join(SNAPSHOT_ROOTS_DIR);
        files::create_private_dir(&roots)?;
        let old = keys.root.version;
        let next = old + 1;
        let (root_pkcs8, root_key) = generate_ed25519()?;
        let (signer_pkcs8, signer) = generate_ed25519()?;
        files::write_atomic(&roots.join(root_key_file(next)), &root_pkcs8, SECRET_MODE)?;
        files::write_atomic(
            &roots.join(snapshot_key_file(next)),
            &signer_pkcs8,
            SECRET_MODE,
        )?;
        let mut revoked = Vec::new();
        if revoke_old {
            for key in [&keys.signer, &keys.root_key] {
                let key = hex(key.public_key().as_ref());
                if !revoked.contains(&key) {
                    revoked.push(key);
                }
            }
        }
        let root = Root {
            version: next,
            root_key: hex(root_key.public_key().as_ref()),
            snapshot_keys: vec![hex(signer.public_key().as_ref())],
            revoked,
            expires_at: now.saturating_add(ROOT_EXPIRY_SECS),
        };
        let document = serde_json::to_vec(&root).unwrap_or_default();
        let envelope =
            tether_proto::snapshot::seal(ROOT_CONTEXT, &document, &[&keys.root_key, &root_key]);
        // Walked as a device walks it, before anything depends on it.
        let trusted = Trust {
            root: keys.root.clone(),
        }
        .update(std::slice::from_ref(&envelope), now)
        .map_err(|refusal| {
            KeyError::BadRoots(format!("the new root does not verify: {refusal}"))
        })?;
        let json = serde_json::to_vec(&envelope).unwrap_or_default();
        files::write_atomic(&roots.join(format!("{next}.json")), &json, PUBLIC_MODE)?;
        let current = CurrentRoot {
            version: next,
            pinned: keys.pinned.clone(),
        };
        let json = serde_json::to_vec_pretty(&current).unwrap_or_default();
        // The commit point: from here on version `next` is in use, after a
        // crash too.
        files::write_atomic(&roots.join(SNAPSHOT_ROOTS_CURRENT_FILE), &json, PUBLIC_MODE)?;
        remove_old_snapshot_keys(&self.dir, next);
        keys.named.extend(root.snapshot_keys.iter().cloned());
        keys.root = trusted.root;
        keys.root_key = root_key;
        keys.signer = signer;
        Ok(root)
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

fn root_key_file(version: u64) -> String {
    format!("root-key-{version}.pk8")
}

fn snapshot_key_file(version: u64) -> String {
    format!("snapshot-key-{version}.pk8")
}

/// A new Ed25519 key: its PKCS#8 document and the pair.
fn generate_ed25519() -> Result<(Vec<u8>, Ed25519KeyPair), KeyError> {
    let document =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).map_err(|_| KeyError::Random)?;
    Ok((document.as_ref().to_vec(), pair))
}

/// See [`SigningKeys::served_manifest`].
fn served(keys: &SnapshotKeys, envelope: Envelope) -> (Envelope, bool) {
    let current = hex(keys.signer.public_key().as_ref());
    if envelope.is_signed_by(MANIFEST_CONTEXT, &current) {
        return (envelope, false);
    }
    let ours = keys
        .named
        .iter()
        .filter(|k| !keys.root.revoked.contains(k))
        .any(|k| envelope.is_signed_by(MANIFEST_CONTEXT, k));
    match envelope.document() {
        Ok(document) if ours => (
            tether_proto::snapshot::seal(MANIFEST_CONTEXT, &document, &[&keys.signer]),
            true,
        ),
        _ => (envelope, false),
    }
}

/// Root version `version`'s envelope from `roots`, read within
/// [`MAX_ENVELOPE`].
fn read_root(roots: &Path, version: u64) -> Result<Envelope, KeyError> {
    use std::io::Read;
    let path = roots.join(format!("{version}.json"));
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|file| file.take(MAX_ENVELOPE as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| FileError::new("read", &path, e))?;
    Envelope::parse(&bytes).map_err(|e| KeyError::BadRoots(format!("'{}': {e}", path.display())))
}

fn load_ed25519(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let pkcs8 = files::read(path)?;
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::BadKey(path.display().to_string()))
}

/// The snapshot keys in `dir`: root version 1 alone (`snapshot-key.pk8`,
/// made if this is a new data directory) before the first rotation, else
/// the chain `current.json` names, walked as a device walks it, with its
/// newest keys.
fn load_snapshot_keys(dir: &Path) -> Result<SnapshotKeys, KeyError> {
    let roots = dir.join(SNAPSHOT_ROOTS_DIR);
    let current_path = roots.join(SNAPSHOT_ROOTS_CURRENT_FILE);
    let current = match files::read(&current_path) {
        Ok(bytes) => serde_json::from_slice::<CurrentRoot>(&bytes)
            .ok()
            .filter(|c| c.version >= 2)
            .ok_or_else(|| {
                KeyError::BadRoots(format!(
                    "'{}' does not name a root version",
                    current_path.display()
                ))
            })?,
        Err(e) if e.is_not_found() => return first_root(dir),
        Err(e) => return Err(e.into()),
    };
    let mut chain = Vec::new();
    let mut named = vec![current.pinned.clone()];
    for version in 2..=current.version {
        let envelope = read_root(&roots, version)?;
        // Parsed unverified here; the walk below verifies every one.
        let root = envelope
            .document()
            .ok()
            .and_then(|d| serde_json::from_slice::<Root>(&d).ok());
        named.extend(root.into_iter().flat_map(|r| r.snapshot_keys));
        chain.push(envelope);
    }
    // Walked as a device walks it. An expired newest root is not refused
    // here (time 0): the platform must load to rotate to a fresh one.
    let mut trust = Trust::pinned(&current.pinned);
    for steps in chain.chunks(MAX_ROOT_STEPS) {
        trust = trust.update(steps, 0).map_err(|refusal| {
            KeyError::BadRoots(format!(
                "the snapshot root chain in '{}' does not verify: {refusal}",
                roots.display()
            ))
        })?;
    }
    let root_key = load_ed25519(&roots.join(root_key_file(current.version)))?;
    let signer = load_ed25519(&roots.join(snapshot_key_file(current.version)))?;
    if hex(root_key.public_key().as_ref()) != trust.root.root_key
        || !trust
            .root
            .snapshot_keys
            .contains(&hex(signer.public_key().as_ref()))
    {
        return Err(KeyError::BadRoots(format!(
            "the keys in '{}' are not those root version {} names",
            roots.display(),
            current.version
        )));
    }
    remove_old_snapshot_keys(dir, current.version);
    Ok(SnapshotKeys {
        pinned: current.pinned,
        root: trust.root,
        root_key,
        signer,
        named,
    })
}

/// Root version 1: `snapshot-key.pk8`, the key devices pin, is both the
/// root key and the snapshot key. What an unfinished first rotation left
/// is removed.
fn first_root(dir: &Path) -> Result<SnapshotKeys, KeyError> {
    let path = dir.join(SNAPSHOT_KEY_FILE);
    let exists = path.exists();
    let roots = dir.join(SNAPSHOT_ROOTS_DIR);
    if !exists && roots.join("2.json").exists() {
        // A chain without its commit point and without the first key: not
        // something a crash leaves. A new key here would cut off every
        // enrolled device.
        return Err(KeyError::BadRoots(format!(
            "'{}' and '{}' are missing",
            path.display(),
            roots.join(SNAPSHOT_ROOTS_CURRENT_FILE).display()
        )));
    }
    let root_key = load_or_create_ed25519(&path)?;
    let signer = load_ed25519(&path)?;
    remove_old_snapshot_keys(dir, 1);
    let pinned = hex(root_key.public_key().as_ref());
    Ok(SnapshotKeys {
        root: Trust::pinned(&pinned).root,
        named: vec![pinned.clone()],
        pinned,
        root_key,
        signer,
    })
}

/// Removes what the root version in use does not need: the private keys of
/// other versions (older ones, and those of a rotation that did not reach
/// its commit point, with its root document), `snapshot-key.pk8` once a
/// rotation is in use, and temporary files. Best effort: a file left
/// behind is removed at the next start.
fn remove_old_snapshot_keys(dir: &Path, version: u64) {
    if version >= 2 {
        let _ = std::fs::remove_file(dir.join(SNAPSHOT_KEY_FILE));
    }
    let Ok(entries) = std::fs::read_dir(dir.join(SNAPSHOT_ROOTS_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let number = |prefix: &str, suffix: &str| {
            name.strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse::<u64>()
                .ok()
        };
        let stale = match (
            number("root-key-", ".pk8").or_else(|| number("snapshot-key-", ".pk8")),
            number("", ".json"),
        ) {
            (Some(n), _) => n != version,
            (None, Some(n)) => n > version,
            (None, None) => name.starts_with('.') && name.contains(".tmp."),
        };
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
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

    const NOW: u64 = 1_800_000_000;

    fn manifest(version: u64) -> Vec<u8> {
        serde_json::to_vec(&tether_proto::snapshot::Manifest {
            format: 1,
            device: "dev_1".into(),
            version,
            created_at: NOW,
            expires_at: NOW + 3600,
            components: vec![tether_proto::snapshot::Component::describe(
                "flows.json",
                b"[]",
            )],
        })
        .unwrap()
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// What a device that pinned `keys` at enrollment trusts after walking
    /// every root the platform sends it.
    fn walked(keys: &SigningKeys) -> Trust {
        Trust::pinned(&keys.pinned().snapshot)
            .update(&keys.snapshot_roots_after(1).unwrap(), NOW)
            .unwrap()
    }

    #[test]
    fn snapshot_keys_rotate_along_a_chain_devices_walk_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        let pinned = keys.pinned().snapshot;
        assert_eq!(keys.snapshot_root().version, 1);
        assert!(keys.snapshot_roots_after(1).unwrap().is_empty());
        let first = keys.sign_snapshot(&manifest(1));
        assert!(
            Trust::pinned(&pinned)
                .verify_manifest(&first, "dev_1", 0, NOW)
                .is_ok()
        );

        let two = keys.rotate_snapshot_keys(false, NOW).unwrap();
        assert_eq!(two.version, 2);
        assert!(two.revoked.is_empty());
        assert_eq!(two.expires_at, NOW + ROOT_EXPIRY_SECS);
        let three = keys.rotate_snapshot_keys(true, NOW).unwrap();
        assert_eq!(three.version, 3);
        // Version 2's snapshot key and root key.
        assert_eq!(three.revoked, [two.snapshot_keys[0].clone(), two.root_key]);
        // Devices still pin version 1's key and walk from it.
        assert_eq!(keys.pinned().snapshot, pinned);
        assert_eq!(keys.snapshot_roots_after(1).unwrap().len(), 2);
        assert_eq!(keys.snapshot_roots_after(2).unwrap().len(), 1);
        assert!(keys.snapshot_roots_after(3).unwrap().is_empty());
        let trust = walked(&keys);
        assert_eq!(trust.root, keys.snapshot_root());
        assert_eq!(trust.root.snapshot_keys, three.snapshot_keys);
        let signed = keys.sign_snapshot(&manifest(2));
        assert!(trust.verify_manifest(&signed, "dev_1", 1, NOW).is_ok());
        assert!(
            Trust::pinned(&pinned)
                .verify_manifest(&signed, "dev_1", 1, NOW)
                .is_err(),
            "the new key is trusted only through the chain"
        );

        // On disk: the chain, the current keys (0600), no old private key.
        let roots = dir.path().join(SNAPSHOT_ROOTS_DIR);
        for file in ["2.json", "3.json", SNAPSHOT_ROOTS_CURRENT_FILE] {
            assert_eq!(mode(&roots.join(file)), 0o644, "{file}");
        }
        assert_eq!(mode(&roots), 0o700);
        for file in ["root-key-3.pk8", "snapshot-key-3.pk8"] {
            assert_eq!(mode(&roots.join(file)), 0o600, "{file}");
        }
        let mut names: Vec<String> = std::fs::read_dir(&roots)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "2.json",
                "3.json",
                "current.json",
                "root-key-3.pk8",
                "snapshot-key-3.pk8"
            ]
        );
        assert!(!dir.path().join(SNAPSHOT_KEY_FILE).exists());

        // A restart signs with version 3's key and sends the same chain.
        let reloaded = SigningKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(reloaded.pinned().snapshot, pinned);
        assert_eq!(reloaded.snapshot_root(), keys.snapshot_root());
        assert_eq!(
            reloaded.snapshot_roots_after(1).unwrap(),
            keys.snapshot_roots_after(1).unwrap()
        );
        let again = reloaded.sign_snapshot(&manifest(3));
        assert!(trust.verify_manifest(&again, "dev_1", 2, NOW).is_ok());

        // The roots are served as stored: one that can no longer be read is
        // an error, for the devices that need it only.
        std::fs::write(roots.join("2.json"), b"{").unwrap();
        let err = reloaded.snapshot_roots_after(1).unwrap_err().to_string();
        assert!(err.contains("2.json"), "{err}");
        assert_eq!(reloaded.snapshot_roots_after(2).unwrap().len(), 1);
    }

    #[test]
    fn a_manifest_signed_before_a_rotation_is_served_signed_again_unless_its_key_was_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        let before = keys.sign_snapshot(&manifest(1));
        assert_eq!(
            keys.served_manifest(before.clone()),
            (before.clone(), false)
        );
        keys.rotate_snapshot_keys(false, NOW).unwrap();
        let at_two = keys.sign_snapshot(&manifest(2));
        let (served, again) = keys.served_manifest(before.clone());
        assert!(again);
        assert_eq!(served.signed, before.signed, "the same bytes");
        assert!(
            walked(&keys)
                .verify_manifest(&served, "dev_1", 0, NOW)
                .is_ok()
        );

        // Version 2's keys revoked: what they signed is served as it is,
        // and a device refuses it, naming the key.
        keys.rotate_snapshot_keys(true, NOW).unwrap();
        let (served, again) = keys.served_manifest(at_two.clone());
        assert!(!again);
        assert_eq!(served, at_two);
        let revoked = at_two.signatures[0].key.clone();
        assert_eq!(
            walked(&keys).verify_manifest(&served, "dev_1", 0, NOW),
            Err(tether_proto::snapshot::Refusal::RevokedKey(revoked))
        );
        // Version 1's key was not revoked: still signed again, and sent
        // after the roots a device at version 1 walks to verify it.
        assert!(keys.served_manifest(before.clone()).1);
        let (roots, served, again) = keys.snapshot_answer(1, before).unwrap();
        assert_eq!(roots.len(), 2);
        assert!(again);
        let trust = Trust::pinned(&keys.pinned().snapshot)
            .update(&roots, NOW)
            .unwrap();
        assert!(trust.verify_manifest(&served, "dev_1", 0, NOW).is_ok());
        // A stranger's signature is served as it is.
        let (_, stranger) = generate_ed25519().unwrap();
        let forged = tether_proto::snapshot::seal(MANIFEST_CONTEXT, &manifest(4), &[&stranger]);
        assert_eq!(keys.served_manifest(forged.clone()), (forged, false));
    }

    #[test]
    fn an_unfinished_rotation_leaves_the_old_keys_in_use_and_a_finished_one_the_new() {
        let dir = tempfile::tempdir().unwrap();
        let roots = dir.path().join(SNAPSHOT_ROOTS_DIR);
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        let pinned = keys.pinned().snapshot;
        drop(keys);

        // Killed during the first rotation, before its commit point: the
        // new keys and root document written, `current.json` not.
        std::fs::create_dir(&roots).unwrap();
        for file in [
            "root-key-2.pk8",
            "snapshot-key-2.pk8",
            "2.json",
            ".2.json.tmp.77",
        ] {
            std::fs::write(roots.join(file), b"half").unwrap();
        }
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(keys.snapshot_root().version, 1);
        assert_eq!(keys.pinned().snapshot, pinned);
        assert!(keys.snapshot_roots_after(1).unwrap().is_empty());
        assert!(
            Trust::pinned(&pinned)
                .verify_manifest(&keys.sign_snapshot(&manifest(1)), "dev_1", 0, NOW)
                .is_ok(),
            "still signing with a key devices trust"
        );
        assert_eq!(std::fs::read_dir(&roots).unwrap().count(), 0);

        // A rotation that goes through, then one killed before its commit
        // point: version 2 stays in use.
        keys.rotate_snapshot_keys(false, NOW).unwrap();
        let old_root_key = std::fs::read(roots.join("root-key-2.pk8")).unwrap();
        drop(keys);
        for file in ["root-key-3.pk8", "snapshot-key-3.pk8", "3.json"] {
            std::fs::write(roots.join(file), b"half").unwrap();
        }
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(keys.snapshot_root().version, 2);
        assert!(
            walked(&keys)
                .verify_manifest(&keys.sign_snapshot(&manifest(1)), "dev_1", 0, NOW)
                .is_ok()
        );
        assert!(!roots.join("3.json").exists());
        assert!(!roots.join("root-key-3.pk8").exists());

        // Killed after the commit point, before the old keys were removed:
        // the new version is in use, and the old key goes at the start.
        keys.rotate_snapshot_keys(false, NOW).unwrap();
        drop(keys);
        std::fs::write(roots.join("root-key-2.pk8"), &old_root_key).unwrap();
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(keys.snapshot_root().version, 3);
        assert!(!roots.join("root-key-2.pk8").exists());
        assert!(
            walked(&keys)
                .verify_manifest(&keys.sign_snapshot(&manifest(1)), "dev_1", 0, NOW)
                .is_ok()
        );
    }

    #[test]
    fn a_damaged_root_chain_stops_the_platform_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let roots = dir.path().join(SNAPSHOT_ROOTS_DIR);
        let keys = SigningKeys::load_or_create(dir.path()).unwrap();
        keys.rotate_snapshot_keys(false, NOW).unwrap();
        keys.rotate_snapshot_keys(false, NOW).unwrap();
        drop(keys);
        let good = std::fs::read(roots.join("2.json")).unwrap();

        // Root 2 replaced by one signed only by its own new key.
        let (_, stranger) = generate_ed25519().unwrap();
        let forged = Root {
            version: 2,
            root_key: hex(stranger.public_key().as_ref()),
            snapshot_keys: vec![hex(stranger.public_key().as_ref())],
            revoked: Vec::new(),
            expires_at: NOW + 1,
        };
        let forged = tether_proto::snapshot::seal(
            ROOT_CONTEXT,
            &serde_json::to_vec(&forged).unwrap(),
            &[&stranger],
        );
        std::fs::write(roots.join("2.json"), serde_json::to_vec(&forged).unwrap()).unwrap();
        let err = SigningKeys::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not verify"), "{err}");
        assert!(err.contains("help: restore"), "{err}");
        std::fs::write(roots.join("2.json"), &good).unwrap();

        // The commit point unreadable.
        let current = std::fs::read(roots.join(SNAPSHOT_ROOTS_CURRENT_FILE)).unwrap();
        std::fs::write(roots.join(SNAPSHOT_ROOTS_CURRENT_FILE), b"{\"version\": ").unwrap();
        let err = SigningKeys::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not name a root version"), "{err}");
        std::fs::write(roots.join(SNAPSHOT_ROOTS_CURRENT_FILE), &current).unwrap();

        // The current keys swapped for others.
        let (other, _) = generate_ed25519().unwrap();
        let signer = roots.join("snapshot-key-3.pk8");
        let kept = std::fs::read(&signer).unwrap();
        std::fs::write(&signer, &other).unwrap();
        let err = SigningKeys::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not those root version 3 names"), "{err}");
        std::fs::write(&signer, &kept).unwrap();
        assert_eq!(
            SigningKeys::load_or_create(dir.path())
                .unwrap()
                .snapshot_root()
                .version,
            3
        );

        // The chain without its commit point and without the first key: no
        // new first key is made in its place.
        std::fs::remove_file(roots.join(SNAPSHOT_ROOTS_CURRENT_FILE)).unwrap();
        let err = SigningKeys::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("are missing"), "{err}");
        assert!(!dir.path().join(SNAPSHOT_KEY_FILE).exists());
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
