//! Signed snapshots: what a device may run, and the keys it trusts to say
//! so (`docs/snapshots.md`).
//!
//! The trust model follows TUF's (`docs/decisions.md`): a **root key**,
//! pinned at enrollment (`keys.snapshot` of the enrollment answer), signs
//! [`Root`] metadata that names the **snapshot keys**; a snapshot key signs
//! a snapshot's [`Manifest`], which lists every component (flows,
//! credentials, settings, environment, modules) with its length and
//! SHA-256, for one device, with a version that only grows and an expiry.
//! Root metadata is rotated one version at a time, each new version signed
//! by the root key before it and by its own; keys can be revoked.
//!
//! Everything signed travels as an [`Envelope`]: the signed document's
//! exact bytes (base64url), never re-serialised, with the signatures. Sizes
//! are checked before anything is decoded, signatures before anything is
//! parsed, and lengths and hashes before a component is used.
//!
//! This module owns the formats and every check, as pure functions of their
//! inputs and `now`; it never does I/O and never decides what to do with a
//! refusal beyond naming it ([`Refusal`]).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// Largest envelope (root metadata or manifest), bytes.
pub const MAX_ENVELOPE: usize = 256 * 1024;
/// Most components in one manifest.
pub const MAX_COMPONENTS: usize = 1024;
/// Largest single component, bytes.
pub const MAX_COMPONENT: u64 = 256 * 1024 * 1024;
/// Largest snapshot, all components together, bytes.
pub const MAX_TOTAL: u64 = 1024 * 1024 * 1024;
/// Most keys one root names (snapshot keys plus revoked ones).
pub const MAX_KEYS: usize = 64;
/// Most root versions one update may walk through.
pub const MAX_ROOT_STEPS: usize = 64;
/// Longest component path, bytes.
pub const MAX_PATH: usize = 200;
/// Domain separation of the two kinds of signed documents.
pub const ROOT_CONTEXT: &[u8] = b"tether-snapshot-root-v1\n";
pub const MANIFEST_CONTEXT: &[u8] = b"tether-snapshot-manifest-v1\n";
/// The component every snapshot has.
pub const FLOWS: &str = "flows.json";

/// A signed document: its bytes exactly as signed, and who signed them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The document's JSON bytes, base64url without padding.
    pub signed: String,
    pub signatures: Vec<Signature>,
}

/// One Ed25519 signature over the context and the document's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signing key, 64 lowercase hex digits.
    pub key: String,
    /// base64url without padding.
    pub sig: String,
}

/// Root metadata: which keys sign snapshots, which are revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// 1 for the root pinned at enrollment (which has no document), then
    /// one more per rotation.
    pub version: u64,
    /// The root key of this version (hex): it signs the next version.
    pub root_key: String,
    /// Keys that may sign manifests (hex).
    pub snapshot_keys: Vec<String>,
    /// Keys never to trust again, root or snapshot (hex).
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Unix seconds. Only the newest root's expiry matters.
    pub expires_at: u64,
}

/// One component of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Relative path inside the snapshot folder: `/`-separated segments of
    /// `[A-Za-z0-9._-]`, none empty, `.` or `..`.
    pub path: String,
    pub length: u64,
    /// SHA-256, 64 lowercase hex digits.
    pub sha256: String,
}

impl Component {
    /// The manifest entry for `bytes` stored at `path`.
    pub fn describe(path: &str, bytes: &[u8]) -> Component {
        Component {
            path: path.to_owned(),
            length: bytes.len() as u64,
            sha256: hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()),
        }
    }
}

/// What a snapshot is: signed by a snapshot key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// 1.
    pub format: u32,
    /// The one device it is for.
    pub device: String,
    /// Grows with every snapshot for the device; a device never installs a
    /// version at or below the one it has.
    pub version: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; a device refuses it from then on.
    pub expires_at: u64,
    pub components: Vec<Component>,
}

/// Why a root update or a snapshot is refused. Each names what was wrong;
/// the running flows are left alone in every case.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the signed document is {len} bytes, more than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("the signed document is malformed: {0}")]
    Malformed(String),
    #[error("no valid signature by a trusted key ({0})")]
    BadSignature(&'static str),
    #[error("signed by key {0}, which is revoked")]
    RevokedKey(String),
    #[error(
        "root version {offered} does not follow version {trusted}: each rotation must be the next version, signed by the root before it"
    )]
    RootNotSuccessor { trusted: u64, offered: u64 },
    #[error("more than {MAX_ROOT_STEPS} root versions in one update")]
    TooManyRoots,
    #[error("the newest root expired at {expires_at}")]
    RootExpired { expires_at: u64 },
    #[error("the snapshot is for device {offered}, not this one")]
    WrongDevice { offered: String },
    #[error(
        "snapshot version {offered} is not newer than the installed version {installed} (a replay or a rollback)"
    )]
    NotNewer { installed: u64, offered: u64 },
    #[error(
        "the snapshot expired at {expires_at}; the running one stays: ask for a fresh snapshot"
    )]
    Expired { expires_at: u64 },
    #[error("snapshot format {0} is not known (this device reads format 1)")]
    Format(u32),
    #[error("component path {0:?} is not a plain relative path inside the snapshot")]
    BadPath(String),
    #[error("component {0:?} is listed twice")]
    Duplicate(String),
    #[error("the snapshot has no {FLOWS}")]
    NoFlows,
    #[error("the snapshot is too large: {0}")]
    Limits(String),
    #[error("component {path:?}: {why}")]
    Component { path: String, why: String },
}

/// Signs `document` (its exact bytes) with each key.
pub fn seal(
    context: &[u8],
    document: &[u8],
    keys: &[&ring::signature::Ed25519KeyPair],
) -> Envelope {
    use ring::signature::KeyPair;
    let message = [context, document].concat();
    Envelope {
        signed: URL_SAFE_NO_PAD.encode(document),
        signatures: keys
            .iter()
            .map(|k| Signature {
                key: hex(k.public_key().as_ref()),
                sig: URL_SAFE_NO_PAD.encode(k.sign(&message).as_ref()),
            })
            .collect(),
    }
}

impl Envelope {
    /// Parses an envelope from its bytes, within [`MAX_ENVELOPE`].
    pub fn parse(bytes: &[u8]) -> Result<Envelope, Refusal> {
        if bytes.len() > MAX_ENVELOPE {
            return Err(Refusal::TooLarge {
                len: bytes.len(),
                max: MAX_ENVELOPE,
            });
        }
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if envelope.signatures.len() > MAX_KEYS {
            return Err(Refusal::Malformed("too many signatures".into()));
        }
        Ok(envelope)
    }

    /// The signed document's bytes (not verified: verify first).
    pub fn document(&self) -> Result<Vec<u8>, Refusal> {
        URL_SAFE_NO_PAD
            .decode(&self.signed)
            .map_err(|_| Refusal::Malformed("`signed` is not base64url".into()))
    }

    /// Whether `key` (hex) signed this envelope's document under
    /// `context` (a signature that verifies, not just one listed under the
    /// key's name). The platform uses it to recognise its own signatures.
    pub fn is_signed_by(&self, context: &[u8], key: &str) -> bool {
        self.document()
            .is_ok_and(|document| self.signed_by(context, &document, key))
    }

    /// Whether `key` (hex) signed the document under `context`.
    fn signed_by(&self, context: &[u8], document: &[u8], key: &str) -> bool {
        let Some(public) = from_hex32(key) else {
            return false;
        };
        let message = [context, document].concat();
        self.signatures.iter().filter(|s| s.key == key).any(|s| {
            URL_SAFE_NO_PAD.decode(&s.sig).is_ok_and(|sig| {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
                    .verify(&message, &sig)
                    .is_ok()
            })
        })
    }
}

/// What a device trusts now: the newest root it accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    pub root: Root,
}

impl Trust {
    /// The trust of a device that just enrolled: version 1, the pinned key
    /// as both the root key and the one snapshot key (the platform signs
    /// with it until it first rotates).
    pub fn pinned(key: &str) -> Trust {
        Trust {
            root: Root {
                version: 1,
                root_key: key.to_owned(),
                snapshot_keys: vec![key.to_owned()],
                revoked: Vec::new(),
                expires_at: u64::MAX,
            },
        }
    }

    /// Walks root rotations, oldest first, from the trusted root. Each must
    /// be the next version, signed by the root key before it and by its own
    /// root key, and must not use a key any root revoked; intermediate
    /// expiry does not matter, the newest root's does (TUF 5.3). Returns the
    /// new trust; nothing changes on a refusal.
    pub fn update(&self, roots: &[Envelope], now: u64) -> Result<Trust, Refusal> {
        if roots.len() > MAX_ROOT_STEPS {
            return Err(Refusal::TooManyRoots);
        }
        let mut trusted = self.root.clone();
        for envelope in roots {
            let document = envelope.document()?;
            if document.len() > MAX_ENVELOPE {
                return Err(Refusal::TooLarge {
                    len: document.len(),
                    max: MAX_ENVELOPE,
                });
            }
            // The old root must have signed before anything is parsed.
            if !envelope.signed_by(ROOT_CONTEXT, &document, &trusted.root_key) {
                return Err(Refusal::BadSignature(
                    "a root rotation not signed by the trusted root key",
                ));
            }
            let next: Root =
                serde_json::from_slice(&document).map_err(|e| Refusal::Malformed(e.to_string()))?;
            if next.version != trusted.version + 1 {
                return Err(Refusal::RootNotSuccessor {
                    trusted: trusted.version,
                    offered: next.version,
                });
            }
            if next.snapshot_keys.len() + next.revoked.len() > MAX_KEYS {
                return Err(Refusal::Malformed("too many keys".into()));
            }
            if !envelope.signed_by(ROOT_CONTEXT, &document, &next.root_key) {
                return Err(Refusal::BadSignature(
                    "a root rotation not signed by its own new root key",
                ));
            }
            // Revocations accumulate: a key revoked once stays revoked.
            let mut revoked = trusted.revoked.clone();
            for key in &next.revoked {
                if !revoked.contains(key) {
                    revoked.push(key.clone());
                }
            }
            if let Some(key) = std::iter::once(&next.root_key)
                .chain(&next.snapshot_keys)
                .find(|k| revoked.contains(k))
            {
                return Err(Refusal::RevokedKey(key.clone()));
            }
            trusted = Root { revoked, ..next };
        }
        if now >= trusted.expires_at {
            return Err(Refusal::RootExpired {
                expires_at: trusted.expires_at,
            });
        }
        Ok(Trust { root: trusted })
    }

    /// Checks a snapshot's manifest envelope for `device`, which has
    /// `installed` (0 for none), at `now`: a signature by a trusted,
    /// unrevoked snapshot key, then the manifest's own rules. The
    /// components are checked as they are read ([`check_component`]).
    pub fn verify_manifest(
        &self,
        envelope: &Envelope,
        device: &str,
        installed: u64,
        now: u64,
    ) -> Result<Manifest, Refusal> {
        let document = envelope.document()?;
        if document.len() > MAX_ENVELOPE {
            return Err(Refusal::TooLarge {
                len: document.len(),
                max: MAX_ENVELOPE,
            });
        }
        if now >= self.root.expires_at {
            return Err(Refusal::RootExpired {
                expires_at: self.root.expires_at,
            });
        }
        let signer = envelope
            .signatures
            .iter()
            .map(|s| s.key.as_str())
            .find(|k| envelope.signed_by(MANIFEST_CONTEXT, &document, k));
        let Some(signer) = signer else {
            return Err(Refusal::BadSignature("no signature verifies"));
        };
        if self.root.revoked.iter().any(|k| k == signer) {
            return Err(Refusal::RevokedKey(signer.to_owned()));
        }
        if !self.root.snapshot_keys.iter().any(|k| k == signer) {
            return Err(Refusal::BadSignature(
                "signed by a key the trusted root does not name",
            ));
        }
        let manifest: Manifest =
            serde_json::from_slice(&document).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if manifest.format != 1 {
            return Err(Refusal::Format(manifest.format));
        }
        if manifest.device != device {
            return Err(Refusal::WrongDevice {
                offered: manifest.device,
            });
        }
        if manifest.version <= installed {
            return Err(Refusal::NotNewer {
                installed,
                offered: manifest.version,
            });
        }
        if now >= manifest.expires_at {
            return Err(Refusal::Expired {
                expires_at: manifest.expires_at,
            });
        }
        check_components(&manifest.components)?;
        Ok(manifest)
    }
}

fn check_components(components: &[Component]) -> Result<(), Refusal> {
    if components.len() > MAX_COMPONENTS {
        return Err(Refusal::Limits(format!(
            "{} components, more than {MAX_COMPONENTS}",
            components.len()
        )));
    }
    let mut total = 0u64;
    let mut seen = std::collections::HashSet::new();
    for c in components {
        if !is_plain_path(&c.path) {
            return Err(Refusal::BadPath(c.path.clone()));
        }
        if !seen.insert(c.path.as_str()) {
            return Err(Refusal::Duplicate(c.path.clone()));
        }
        if from_hex32(&c.sha256).is_none() {
            return Err(Refusal::Component {
                path: c.path.clone(),
                why: "its sha256 is not 64 lowercase hex digits".into(),
            });
        }
        if c.length > MAX_COMPONENT {
            return Err(Refusal::Limits(format!(
                "{:?} is {} bytes, more than {MAX_COMPONENT}",
                c.path, c.length
            )));
        }
        total += c.length;
    }
    if total > MAX_TOTAL {
        return Err(Refusal::Limits(format!(
            "{total} bytes in all, more than {MAX_TOTAL}"
        )));
    }
    if !seen.contains(FLOWS) {
        return Err(Refusal::NoFlows);
    }
    Ok(())
}

/// A relative path that stays inside the folder it is joined to.
pub fn is_plain_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// Checks a component's bytes against its entry: the length first, then
/// the hash. A reader streaming a component calls [`ComponentCheck`]
/// instead, to stop at the first byte too many.
pub fn check_component(entry: &Component, bytes: &[u8]) -> Result<(), Refusal> {
    let mut check = ComponentCheck::new(entry);
    check.update(bytes)?;
    check.finish()
}

/// A component's length and hash, checked while it is read.
pub struct ComponentCheck<'a> {
    entry: &'a Component,
    seen: u64,
    digest: ring::digest::Context,
}

impl std::fmt::Debug for ComponentCheck<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentCheck")
            .field("path", &self.entry.path)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl<'a> ComponentCheck<'a> {
    pub fn new(entry: &'a Component) -> ComponentCheck<'a> {
        ComponentCheck {
            entry,
            seen: 0,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    /// Takes the next bytes; refuses as soon as there are more than the
    /// manifest said (no endless data).
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        self.seen += bytes.len() as u64;
        if self.seen > self.entry.length {
            return Err(Refusal::Component {
                path: self.entry.path.clone(),
                why: format!(
                    "longer than the {} bytes the manifest says",
                    self.entry.length
                ),
            });
        }
        self.digest.update(bytes);
        Ok(())
    }

    pub fn finish(self) -> Result<(), Refusal> {
        let path = self.entry.path.clone();
        if self.seen != self.entry.length {
            return Err(Refusal::Component {
                path,
                why: format!(
                    "{} bytes where the manifest says {}",
                    self.seen, self.entry.length
                ),
            });
        }
        if hex(self.digest.finish().as_ref()) != self.entry.sha256 {
            return Err(Refusal::Component {
                path,
                why: "its SHA-256 differs from the manifest's (altered, or from another snapshot)"
                    .into(),
            });
        }
        Ok(())
    }
}

/// The `snapshot` stream (`docs/protocol.md` §18): the device asks for a
/// version and says which root version it trusts; the platform answers
/// with every newer root version it has (oldest first, at most
/// [`MAX_ROOT_STEPS`]), then the manifest's envelope, then every
/// component's bytes in the manifest's order, each exactly as long as the
/// manifest says. The device walks the roots ([`Trust::update`]) and
/// verifies the envelope with the trust it arrives at before it reads a
/// component byte, and reads no more than the verified lengths.
///
/// Every message is framed: a 4-byte big-endian length, then that many
/// bytes of JSON. This module only encodes and checks; it does no I/O.
pub mod pull {
    use serde::{Deserialize, Serialize};

    use super::{Envelope, MAX_ENVELOPE, MAX_KEYS, MAX_ROOT_STEPS};

    /// Largest request, bytes.
    pub const MAX_REQUEST: usize = 1024;
    /// Largest answer frame (a root, the snapshot's envelope or a
    /// refusal): an envelope (at most [`MAX_ENVELOPE`] once serialised) and
    /// a little JSON around it.
    pub const MAX_ANSWER: usize = MAX_ENVELOPE + 1024;
    /// The root version of a device that never walked a rotation: the key
    /// it pinned at enrollment.
    pub const PINNED_ROOT: u64 = 1;

    /// Device → platform: the version the notice named, and the root
    /// version the device trusts.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Request {
        pub version: u64,
        /// The root version the device trusts. Left out when it is
        /// [`PINNED_ROOT`], so a request reads the same as before rotation
        /// existed (a platform that predates it still understands it); a
        /// request without it means [`PINNED_ROOT`].
        #[serde(default = "pinned_root", skip_serializing_if = "is_pinned_root")]
        pub root_version: u64,
    }

    fn pinned_root() -> u64 {
        PINNED_ROOT
    }

    fn is_pinned_root(version: &u64) -> bool {
        *version == PINNED_ROOT
    }

    /// Platform → device.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum Answer {
        /// A root version newer than the one the device trusts, signed by
        /// the root key before it and by its own; before the snapshot,
        /// oldest first.
        Root { envelope: Envelope },
        /// The manifest's envelope; the components follow, in order.
        Snapshot { envelope: Envelope },
        /// The platform has no such snapshot for this device (or will not
        /// send it): why, for a person.
        Refused { message: String },
    }

    /// Why a frame was refused.
    #[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
    pub enum PullError {
        #[error("a snapshot stream message of {len} bytes is larger than the {max}-byte limit")]
        TooLarge { len: usize, max: usize },
        #[error("a snapshot stream message is not valid JSON of the expected shape: {0}")]
        Malformed(String),
        #[error("the platform sent more than {MAX_ROOT_STEPS} root versions before the snapshot")]
        TooManyRoots,
    }

    /// `value` framed: its length, then its JSON.
    pub fn encode(value: &impl Serialize) -> Vec<u8> {
        let json = serde_json::to_vec(value).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + json.len());
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// The body length a frame header announces, refused above `max`
    /// before anything is read or allocated.
    pub fn body_len(header: [u8; 4], max: usize) -> Result<usize, PullError> {
        let len = u32::from_be_bytes(header) as usize;
        if len > max {
            return Err(PullError::TooLarge { len, max });
        }
        Ok(len)
    }

    /// Parses a frame's body.
    pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PullError> {
        serde_json::from_slice(body).map_err(|e| PullError::Malformed(e.to_string()))
    }

    /// What the answer frames of one pull came to.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Pulled {
        /// The roots to walk (oldest first, maybe none), then the
        /// manifest's envelope; the components follow on the stream.
        Snapshot {
            roots: Vec<Envelope>,
            envelope: Envelope,
        },
        /// The platform will not send the snapshot.
        Refused { message: String },
    }

    /// The device's side of the answers: root frames, at most
    /// [`MAX_ROOT_STEPS`], then the snapshot or a refusal. Each frame's
    /// size is checked by [`body_len`] before it is read; this counts the
    /// roots (so at most `MAX_ROOT_STEPS` frames of [`MAX_ANSWER`] bytes
    /// are held) and bounds each envelope's signatures. The roots are not
    /// verified here: [`super::Trust::update`] does that.
    #[derive(Debug, Default)]
    pub struct Answers {
        roots: Vec<Envelope>,
    }

    impl Answers {
        pub fn new() -> Answers {
            Answers::default()
        }

        /// Takes the next frame's body: `None` after a root (read the next
        /// frame), the outcome after the snapshot or a refusal (read no
        /// more frames: the components follow a snapshot).
        pub fn take(&mut self, body: &[u8]) -> Result<Option<Pulled>, PullError> {
            match decode::<Answer>(body)? {
                Answer::Root { envelope } => {
                    if self.roots.len() >= MAX_ROOT_STEPS {
                        return Err(PullError::TooManyRoots);
                    }
                    bounded(&envelope)?;
                    self.roots.push(envelope);
                    Ok(None)
                }
                Answer::Snapshot { envelope } => {
                    bounded(&envelope)?;
                    Ok(Some(Pulled::Snapshot {
                        roots: std::mem::take(&mut self.roots),
                        envelope,
                    }))
                }
                Answer::Refused { message } => Ok(Some(Pulled::Refused { message })),
            }
        }
    }

    fn bounded(envelope: &Envelope) -> Result<(), PullError> {
        if envelope.signatures.len() > MAX_KEYS {
            return Err(PullError::Malformed(format!(
                "an envelope with {} signatures, more than {MAX_KEYS}",
                envelope.signatures.len()
            )));
        }
        Ok(())
    }

    /// The platform's side: the root versions to send a device that
    /// trusts `trusted` when the newest is `newest`, oldest first: each
    /// after `trusted`, at most [`MAX_ROOT_STEPS`] of them (empty when the
    /// device is not behind). Version 1 is the pinned key and has no
    /// document, so the first version ever sent is 2. A device further
    /// behind walks the rest at its next pull.
    pub fn root_versions_after(trusted: u64, newest: u64) -> impl Iterator<Item = u64> {
        (trusted.max(PINNED_ROOT)..newest)
            .map(|before| before + 1)
            .take(MAX_ROOT_STEPS)
    }
}

use crate::hex::{decode32 as from_hex32, encode as hex};

pub mod capture;
pub mod modules;
pub mod window;

#[cfg(test)]
mod tests;
