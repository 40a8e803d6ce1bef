//! Local editor tokens: the only credential the locked-down Node-RED accepts
//! (`docs/protocol.md` §16.4).
//!
//! [`LocalAuth`] holds an Ed25519 key pair made in memory at start and
//! replaced by [`LocalAuth::rotate`] (every [`ROTATE_EVERY`]); the previous
//! public key stays accepted for [`OVERLAP`], so tokens signed just before a
//! rotation still work. Only public keys are ever written, to
//! [`KEYS_FILE`] in Node-RED's user directory, which the generated settings
//! read. A token is `v1.BASE64URL(payload).BASE64URL(signature)`, the
//! signature over [`SIGNING_CONTEXT`] followed by the payload
//! `{"u": user, "p": permissions, "exp": Unix seconds}`, valid
//! [`TOKEN_LIFETIME`].
//!
//! This module never writes a private key anywhere and never logs a token.
//! Expiry is read from the system clock, not the config's [`crate::Clock`]:
//! Node-RED checks it against the same machine's clock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use tether_proto::grant::Role;

use super::NodeRedError;
use crate::files::{self, Mode};

/// The file, in Node-RED's user directory, that holds the public keys.
pub const KEYS_FILE: &str = "tether-editor-keys.json";
/// Prefix of every signed message.
pub const SIGNING_CONTEXT: &[u8] = b"tether-editor-v1\n";
/// How long a token is valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(120);
/// A cached token is handed out again while it is younger than this, so a
/// page load (dozens of requests) signs once per user.
pub const TOKEN_REUSE: Duration = Duration::from_secs(60);
/// How often the key pair is replaced.
pub const ROTATE_EVERY: Duration = Duration::from_secs(24 * 3600);
/// How long the previous public key stays accepted after a rotation: longer
/// than a token lives.
pub const OVERLAP: Duration = Duration::from_secs(300);
/// Most cached tokens; the cache is emptied of expired ones when full.
const MAX_CACHED: usize = 256;

/// The permissions presented to Node-RED (`docs/protocol.md` §16.3).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Permissions {
    /// `"*"`: everything.
    All,
    /// `"read"`: every read permission, nothing else.
    Read,
    /// A list of Node-RED permissions, like `["read", "flows.write"]`.
    List(Vec<String>),
}

impl Permissions {
    /// The permissions a role is presented with (`docs/protocol.md` §16.3),
    /// as the editor's policy defines them ([`crate::editor::permissions`]).
    pub fn for_role(role: Role, protection: bool) -> Permissions {
        Permissions::from_list(crate::editor::permissions(role, protection))
    }

    /// From a list of Node-RED permissions: `["*"]` is [`Permissions::All`],
    /// `["read"]` is [`Permissions::Read`], anything else a list.
    pub fn from_list(items: &[&str]) -> Permissions {
        match items {
            ["*"] => Permissions::All,
            ["read"] => Permissions::Read,
            _ => Permissions::list(items),
        }
    }

    fn list(items: &[&str]) -> Permissions {
        Permissions::List(items.iter().map(|s| (*s).to_owned()).collect())
    }
}

/// Shorthand for [`Permissions::for_role`].
pub fn for_role(role: Role, protection: bool) -> Permissions {
    Permissions::for_role(role, protection)
}

impl Serialize for Permissions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Permissions::All => s.serialize_str("*"),
            Permissions::Read => s.serialize_str("read"),
            Permissions::List(items) => items.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Permissions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            One(String),
            Many(Vec<String>),
        }
        match Wire::deserialize(d)? {
            Wire::One(s) if s == "*" => Ok(Permissions::All),
            Wire::One(s) if s == "read" => Ok(Permissions::Read),
            Wire::One(s) => Err(serde::de::Error::custom(format!(
                "'{s}' is not a permission; expected \"*\", \"read\" or a list"
            ))),
            Wire::Many(items) => Ok(Permissions::List(items)),
        }
    }
}

/// A token's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's name, as Node-RED logs it.
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "p")]
    pub permissions: Permissions,
    /// Unix seconds after which the token is refused.
    pub exp: u64,
}

/// The keys file's content: public keys only, newest first.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeysFile {
    /// Raw Ed25519 public keys (32 bytes), BASE64URL without padding: the
    /// `x` of a JWK.
    pub keys: Vec<String>,
}

/// Signs local editor tokens and keeps the keys file up to date.
///
/// Shared behind an `Arc`; every method takes `&self`. Signing never waits
/// for a file write: the keys file is written outside the state's lock.
pub struct LocalAuth {
    keys_path: PathBuf,
    rng: SystemRandom,
    state: Mutex<State>,
    /// Serializes rotations and retirements, which write the keys file.
    writing: Mutex<()>,
}

struct State {
    current: Ed25519KeyPair,
    /// The public key of the pair before `current`, until it is retired.
    previous: Option<Vec<u8>>,
    cache: HashMap<(String, Permissions), Cached>,
}

struct Cached {
    token: String,
    exp: u64,
}

impl std::fmt::Debug for LocalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key pair, never a token.
        f.debug_struct("LocalAuth")
            .field("keys_path", &self.keys_path)
            .finish_non_exhaustive()
    }
}

impl LocalAuth {
    /// Makes a fresh key pair and writes its public key to
    /// `USER_DIR/tether-editor-keys.json` (the directory must exist).
    pub fn new(user_dir: &Path) -> Result<LocalAuth, NodeRedError> {
        let rng = SystemRandom::new();
        let auth = LocalAuth {
            keys_path: user_dir.join(KEYS_FILE),
            state: Mutex::new(State {
                current: generate(&rng)?,
                previous: None,
                cache: HashMap::new(),
            }),
            rng,
            writing: Mutex::new(()),
        };
        let public = auth.lock().current.public_key().as_ref().to_vec();
        auth.write_keys(&[&public])?;
        Ok(auth)
    }

    /// The keys file this instance writes.
    pub fn keys_path(&self) -> &Path {
        &self.keys_path
    }

    /// A token for `user` with `permissions`, valid [`TOKEN_LIFETIME`]. The
    /// same token is returned for the same user and permissions while it is
    /// younger than [`TOKEN_REUSE`].
    pub fn token(&self, user: &str, permissions: &Permissions) -> String {
        let now = unix_now();
        let lifetime = TOKEN_LIFETIME.as_secs();
        let fresh_after = now + lifetime - TOKEN_REUSE.as_secs();
        let mut state = self.lock();
        let key = (user.to_owned(), permissions.clone());
        if let Some(hit) = state.cache.get(&key)
            && hit.exp > fresh_after
        {
            return hit.token.clone();
        }
        let claims = Claims {
            user: user.to_owned(),
            permissions: permissions.clone(),
            exp: now + lifetime,
        };
        let token = sign(&state.current, &claims);
        if state.cache.len() >= MAX_CACHED {
            state.cache.retain(|_, c| c.exp > fresh_after);
            if state.cache.len() >= MAX_CACHED {
                state.cache.clear();
            }
        }
        state.cache.insert(
            key,
            Cached {
                token: token.clone(),
                exp: claims.exp,
            },
        );
        token
    }

    /// Signs exactly these claims with the current key, bypassing the
    /// cache. For tests and tools; the agent uses [`LocalAuth::token`].
    pub fn sign(&self, claims: &Claims) -> String {
        sign(&self.lock().current, claims)
    }

    /// Replaces the key pair. The new public key and the previous one are
    /// written; call [`LocalAuth::retire_previous`] once [`OVERLAP`] has
    /// passed. Cached tokens are dropped. If the file cannot be written the
    /// old pair stays in use.
    pub fn rotate(&self) -> Result<(), NodeRedError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = generate(&self.rng)?;
        let old = self.lock().current.public_key().as_ref().to_vec();
        self.write_keys(&[fresh.public_key().as_ref(), &old])?;
        let mut state = self.lock();
        state.current = fresh;
        state.previous = Some(old);
        state.cache.clear();
        Ok(())
    }

    /// Stops accepting the key pair before the current one.
    pub fn retire_previous(&self) -> Result<(), NodeRedError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let (current, previous) = {
            let state = self.lock();
            let current = state.current.public_key().as_ref().to_vec();
            (current, state.previous.is_some())
        };
        if previous {
            self.write_keys(&[&current])?;
            self.lock().previous = None;
        }
        Ok(())
    }

    /// The public keys Node-RED accepts, newest first, as in the keys file.
    pub fn public_keys(&self) -> KeysFile {
        keys_file(&self.lock())
    }

    /// The state, even if a panic poisoned the lock: it is consistent after
    /// every statement.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_keys(&self, keys: &[&[u8]]) -> Result<(), NodeRedError> {
        let file = KeysFile {
            keys: keys.iter().map(|k| URL_SAFE_NO_PAD.encode(k)).collect(),
        };
        // Serializing a list of strings cannot fail.
        let json = serde_json::to_vec_pretty(&file).unwrap_or_default();
        files::write_atomic(&self.keys_path, &json, Mode::Public).map_err(NodeRedError::Write)
    }
}

fn keys_file(state: &State) -> KeysFile {
    let current = state.current.public_key().as_ref();
    let keys = std::iter::once(current)
        .chain(state.previous.as_deref())
        .map(|k| URL_SAFE_NO_PAD.encode(k))
        .collect();
    KeysFile { keys }
}

fn generate(rng: &SystemRandom) -> Result<Ed25519KeyPair, NodeRedError> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| NodeRedError::KeyGeneration)?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| NodeRedError::KeyGeneration)
}

/// `v1.BASE64URL(payload).BASE64URL(signature)`.
fn sign(key: &Ed25519KeyPair, claims: &Claims) -> String {
    // Serializing a struct of strings and integers cannot fail.
    let payload = serde_json::to_vec(claims).unwrap_or_default();
    let mut message = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    message.extend_from_slice(SIGNING_CONTEXT);
    message.extend_from_slice(&payload);
    let signature = key.sign(&message);
    format!(
        "v1.{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use ring::signature::{ED25519, UnparsedPublicKey};

    use super::*;

    /// Checks a token the way the generated settings do; returns its claims.
    fn verify(token: &str, keys: &KeysFile) -> Option<Claims> {
        let mut parts = token.split('.');
        let (Some("v1"), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let payload = URL_SAFE_NO_PAD.decode(p).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        let message = [SIGNING_CONTEXT, &payload].concat();
        keys.keys.iter().find(|k| {
            let raw = URL_SAFE_NO_PAD.decode(k).unwrap();
            UnparsedPublicKey::new(&ED25519, raw)
                .verify(&message, &sig)
                .is_ok()
        })?;
        serde_json::from_slice(&payload).ok()
    }

    fn auth() -> (tempfile::TempDir, LocalAuth) {
        let dir = tempfile::tempdir().unwrap();
        let auth = LocalAuth::new(dir.path()).unwrap();
        (dir, auth)
    }

    #[test]
    fn a_token_carries_user_permissions_and_expiry_and_verifies() {
        let (_dir, auth) = auth();
        let token = auth.token("alice", &Permissions::Read);
        let claims = verify(&token, &auth.public_keys()).expect("verifies");
        assert_eq!(claims.user, "alice");
        assert_eq!(claims.permissions, Permissions::Read);
        assert!(claims.exp.abs_diff(unix_now() + 120) <= 1, "{claims:?}");
        let payload = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(json["u"], "alice");
        assert_eq!(json["p"], "read");
        assert!(json["exp"].is_u64());
    }

    #[test]
    fn permissions_have_node_reds_json_form() {
        let cases = [
            (Permissions::All, r#""*""#),
            (Permissions::Read, r#""read""#),
            (
                Permissions::List(vec!["read".into(), "flows.write".into()]),
                r#"["read","flows.write"]"#,
            ),
        ];
        for (perms, json) in cases {
            assert_eq!(serde_json::to_string(&perms).unwrap(), json);
            assert_eq!(serde_json::from_str::<Permissions>(json).unwrap(), perms);
        }
        assert!(serde_json::from_str::<Permissions>(r#""write""#).is_err());
        assert_eq!(Permissions::from_list(&["*"]), Permissions::All);
        assert_eq!(Permissions::from_list(&["read"]), Permissions::Read);
        assert_eq!(
            Permissions::from_list(&["read", "flows.write"]),
            Permissions::List(vec!["read".into(), "flows.write".into()])
        );
    }

    #[test]
    fn a_tampered_token_or_another_key_does_not_verify() {
        let (_dir, auth) = auth();
        let (_other_dir, other) = self::auth();
        let token = auth.token("alice", &Permissions::Read);
        assert!(verify(&token, &other.public_keys()).is_none());
        let forged = Claims {
            user: "alice".into(),
            permissions: Permissions::All,
            exp: unix_now() + 60,
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let sig = token.rsplit('.').next().unwrap();
        assert!(verify(&format!("v1.{payload}.{sig}"), &auth.public_keys()).is_none());
    }

    #[test]
    fn tokens_are_reused_per_user_and_permissions() {
        let (_dir, auth) = auth();
        let a = auth.token("alice", &Permissions::Read);
        assert_eq!(a, auth.token("alice", &Permissions::Read));
        assert_ne!(a, auth.token("alice", &Permissions::All));
        assert_ne!(a, auth.token("bob", &Permissions::Read));
        for i in 0..(MAX_CACHED + 10) {
            auth.token(&format!("user{i}"), &Permissions::Read);
        }
        assert!(auth.lock().cache.len() <= MAX_CACHED);
    }

    #[test]
    fn only_public_keys_are_written_and_rotation_keeps_the_previous_one() {
        let (dir, auth) = auth();
        let path = dir.path().join(KEYS_FILE);
        let read = || serde_json::from_slice::<KeysFile>(&std::fs::read(&path).unwrap()).unwrap();
        let first = read().keys;
        assert_eq!(first.len(), 1);
        assert_eq!(URL_SAFE_NO_PAD.decode(&first[0]).unwrap().len(), 32);
        let old_token = auth.token("alice", &Permissions::Read);

        auth.rotate().unwrap();
        let rotated = read().keys;
        assert_eq!(rotated.len(), 2);
        assert_eq!(rotated[1], first[0]);
        let new_token = auth.token("alice", &Permissions::Read);
        assert_ne!(new_token, old_token, "the cache is dropped on rotation");
        assert!(verify(&old_token, &read()).is_some());
        assert!(verify(&new_token, &read()).is_some());

        auth.retire_previous().unwrap();
        assert_eq!(read().keys, rotated[..1]);
        assert!(verify(&old_token, &read()).is_none());
        assert!(verify(&new_token, &read()).is_some());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn debug_output_shows_no_key() {
        let (_dir, auth) = auth();
        let shown = format!("{auth:?}");
        assert!(shown.starts_with("LocalAuth { keys_path"), "{shown}");
        assert!(!shown.contains(&auth.public_keys().keys[0]), "{shown}");
    }

    #[test]
    fn roles_map_to_node_red_permissions() {
        // §16.3, written out: the member's list.
        let member: Vec<String> = [
            "read",
            "flows.write",
            "library.write",
            "inject.write",
            "debug.write",
            "context.write",
            "settings.write",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let protected: Vec<String> = member
            .iter()
            .filter(|p| *p != "flows.write")
            .cloned()
            .collect();
        let cases = [
            (Role::Viewer, false, Permissions::Read),
            (Role::Viewer, true, Permissions::Read),
            (Role::Member, false, Permissions::List(member.clone())),
            (Role::Member, true, Permissions::List(protected.clone())),
            (Role::Owner, false, Permissions::All),
            (Role::Owner, true, Permissions::List(protected.clone())),
        ];
        for (role, protection, want) in cases {
            assert_eq!(for_role(role, protection), want, "{role} {protection}");
        }
        assert_eq!(
            member,
            [
                "read",
                "flows.write",
                "library.write",
                "inject.write",
                "debug.write",
                "context.write",
                "settings.write"
            ]
        );
        assert!(!protected.iter().any(|p| p == "nodes.write"));
    }
}
