//! Editor access grants: who may open the device's editor, as what, until
//! when, signed by the platform's grant key.
//!
//! For every editor stream the platform signs a [`Grant`] with the Ed25519
//! key whose public half the device pinned at enrollment, and sends it in the
//! stream's OPEN header under [`GRANT_METADATA_KEY`]. The device checks it
//! with [`verify`] (signature, device, lifetime, clock) and then with a
//! [`ReplayGuard`] (nonce not seen before) before a single byte reaches
//! Node-RED (`docs/protocol.md` §16).
//!
//! This module owns the grant's wire form and every check that needs no
//! state beyond the replay guard's. It never reads a clock: callers pass
//! Unix seconds in. It never decides what a role may do: that is the
//! agent's editor policy.
//!
//! Wire form: `BASE64URL(payload) "." BASE64URL(signature)`, no padding,
//! where `payload` is the grant as JSON and the signature covers
//! [`SIGNING_CONTEXT`] followed by the payload bytes, so a signature made for
//! anything else with the same key can never pass as a grant.

use std::collections::{BTreeSet, HashMap};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The OPEN metadata key that carries the grant.
pub const GRANT_METADATA_KEY: &str = "grant";
/// Longest grant accepted, in bytes of its wire form.
pub const MAX_GRANT_LEN: usize = 2048;
/// Longest lifetime (`expires_at - issued_at`) a device accepts, seconds.
pub const MAX_LIFETIME_SECS: u64 = 300;
/// Clock difference between platform and device a device tolerates, seconds.
pub const CLOCK_SKEW_SECS: u64 = 30;
/// Prefix of every signed message.
pub const SIGNING_CONTEXT: &[u8] = b"tether-grant-v1\n";

/// A role on the platform, from most to least power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Member,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "owner" => Ok(Role::Owner),
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            _ => Err(format!(
                "'{s}' is not a role; expected owner, member or viewer"
            )),
        }
    }
}

/// What the platform vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The platform user's name, as audit records name them.
    pub user: String,
    pub role: Role,
    pub team: String,
    /// The device the grant is for; any other device refuses it.
    pub device: String,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; refused from this second on.
    pub expires_at: u64,
    /// 128 random bits as 32 lowercase hex digits; each is accepted once.
    pub nonce: String,
    /// The device's instance protection mode as the platform has it when it
    /// signs. The device applies the stricter of this and the value its
    /// control stream last set, so a control message lost or late never
    /// makes the flows writable. Absent (older platforms): `false`.
    #[serde(default)]
    pub protected: bool,
}

/// Why a grant was refused. Each says what was wrong; none echoes the grant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("no access grant was sent with the editor stream")]
    Missing,
    #[error("the access grant is longer than {MAX_GRANT_LEN} bytes")]
    TooLong,
    #[error("the access grant is malformed: {0}")]
    Malformed(&'static str),
    #[error("the access grant's signature does not verify with the pinned grant key")]
    BadSignature,
    #[error("the access grant is for device '{0}', not this one")]
    WrongDevice(String),
    #[error("the access grant expired at {expires_at} (device clock {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error(
        "the access grant is issued in the future ({issued_at}, device clock {now}); check the clocks"
    )]
    NotYetValid { issued_at: u64, now: u64 },
    #[error("the access grant lives {0} s; at most {MAX_LIFETIME_SECS} s is accepted")]
    LifetimeTooLong(u64),
    #[error("the access grant was already used (nonce seen before)")]
    Replayed,
    #[error("too many live access grants to remember; try again in a few seconds")]
    ReplayGuardFull,
}

impl Grant {
    /// Signs the grant: the wire form to put in the OPEN header.
    pub fn sign(&self, key: &Ed25519KeyPair) -> String {
        // A struct of strings and integers always encodes.
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let signature = key.sign(&signed_message(&payload));
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    message.extend_from_slice(SIGNING_CONTEXT);
    message.extend_from_slice(payload);
    message
}

/// Checks a grant's wire form: size, shape, signature by `key` (the pinned
/// 32-byte Ed25519 public key), device, lifetime and expiry at `now` (Unix
/// seconds) with [`CLOCK_SKEW_SECS`] of tolerance. The nonce is checked by
/// a [`ReplayGuard`] afterwards.
pub fn verify(wire: &str, key: &[u8], device: &str, now: u64) -> Result<Grant, GrantError> {
    if wire.len() > MAX_GRANT_LEN {
        return Err(GrantError::TooLong);
    }
    let (payload, signature) = wire.split_once('.').ok_or(GrantError::Malformed(
        "no '.' between payload and signature",
    ))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| GrantError::Malformed("payload is not base64url"))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| GrantError::Malformed("signature is not base64url"))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&signed_message(&payload), &signature)
        .map_err(|_| GrantError::BadSignature)?;
    // Parsed only once signed: nothing unsigned is ever interpreted.
    let grant: Grant = serde_json::from_slice(&payload)
        .map_err(|_| GrantError::Malformed("payload is not a grant"))?;
    if !is_nonce(&grant.nonce) {
        return Err(GrantError::Malformed(
            "nonce is not 32 lowercase hex digits",
        ));
    }
    if grant.device != device {
        return Err(GrantError::WrongDevice(grant.device));
    }
    let lifetime = grant.expires_at.saturating_sub(grant.issued_at);
    if grant.expires_at <= grant.issued_at || lifetime > MAX_LIFETIME_SECS {
        return Err(GrantError::LifetimeTooLong(lifetime));
    }
    if grant.issued_at > now + CLOCK_SKEW_SECS {
        return Err(GrantError::NotYetValid {
            issued_at: grant.issued_at,
            now,
        });
    }
    if now >= grant.expires_at + CLOCK_SKEW_SECS {
        return Err(GrantError::Expired {
            expires_at: grant.expires_at,
            now,
        });
    }
    Ok(grant)
}

/// Prefix of every signed grant key rotation.
pub const ROTATION_CONTEXT: &[u8] = b"tether-grant-key-rotation-v1\n";
/// Rotations a platform sends at most (the newest); a device more than this
/// many rotations behind must be enrolled again.
pub const MAX_ROTATIONS: usize = 16;
/// How long a device keeps accepting grants signed by the key a rotation
/// retired: the longest a grant signed just before it can still verify.
pub const RETIRED_KEY_GRACE_SECS: u64 = MAX_LIFETIME_SECS + CLOCK_SKEW_SECS;

pub use crate::control::KeyRotation;

impl KeyRotation {
    /// The rotation from `old` (the private key of `from`) to `to` at `at`.
    pub fn sign(old: &Ed25519KeyPair, to: &str, at: u64) -> KeyRotation {
        let from = crate::hex::encode(old.public_key().as_ref());
        let signature = old.sign(&rotation_message(&from, to, at));
        KeyRotation {
            from,
            to: to.to_string(),
            at,
            signature: URL_SAFE_NO_PAD.encode(signature.as_ref()),
        }
    }

    /// True if `from` signed this rotation and `to` is a key.
    pub fn verifies(&self) -> bool {
        let (Some(from), true) = (
            crate::hex::decode32(&self.from),
            crate::hex::decode32(&self.to).is_some(),
        ) else {
            return false;
        };
        let Ok(signature) = URL_SAFE_NO_PAD.decode(&self.signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, from)
            .verify(&rotation_message(&self.from, &self.to, self.at), &signature)
            .is_ok()
    }
}

fn rotation_message(from: &str, to: &str, at: u64) -> Vec<u8> {
    let mut message = ROTATION_CONTEXT.to_vec();
    message.extend_from_slice(format!("{from}\n{to}\n{at}\n").as_bytes());
    message
}

/// Follows `chain` (oldest first) from the trusted key `trusted`: the keys
/// it leads to, in order, each signed by the one before. Rotations before
/// `trusted` are skipped; a step whose signature does not verify ends the
/// walk (nothing after a forged step is trusted). Empty if `trusted` is
/// already the newest or does not appear in the chain.
pub fn follow(trusted: &str, chain: &[KeyRotation]) -> Vec<KeyRotation> {
    let mut current = trusted.to_string();
    let mut steps = Vec::new();
    for rotation in chain {
        if rotation.from != current {
            continue;
        }
        if !rotation.verifies() {
            break;
        }
        current = rotation.to.clone();
        steps.push(rotation.clone());
    }
    steps
}

fn is_nonce(nonce: &str) -> bool {
    nonce.len() == 32
        && nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Remembers the nonces of grants that could still verify, so each is
/// accepted once. Bounded: a nonce is forgotten once its grant can no longer
/// pass [`verify`], and when `capacity` live nonces are held, new grants are
/// refused (the platform retries) instead of forgetting a live one.
#[derive(Debug)]
pub struct ReplayGuard {
    capacity: usize,
    /// Nonce -> the second from which its grant fails `verify`.
    seen: HashMap<String, u64>,
    /// (forget_at, nonce), to drop the dead ones in order.
    order: BTreeSet<(u64, String)>,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> ReplayGuard {
        ReplayGuard {
            capacity,
            seen: HashMap::new(),
            order: BTreeSet::new(),
        }
    }

    /// Records `grant`'s nonce, or refuses it if it was seen before.
    pub fn admit(&mut self, grant: &Grant, now: u64) -> Result<(), GrantError> {
        self.forget_dead(now);
        if self.seen.contains_key(&grant.nonce) {
            return Err(GrantError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(GrantError::ReplayGuardFull);
        }
        let forget_at = grant.expires_at + CLOCK_SKEW_SECS;
        self.seen.insert(grant.nonce.clone(), forget_at);
        self.order.insert((forget_at, grant.nonce.clone()));
        Ok(())
    }

    /// Nonces held now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn forget_dead(&mut self, now: u64) {
        while let Some((forget_at, _)) = self.order.first() {
            if *forget_at > now {
                break;
            }
            if let Some((_, nonce)) = self.order.pop_first() {
                self.seen.remove(&nonce);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    const DEVICE: &str = "dev-1";
    const NOW: u64 = 1_800_000_000;

    fn new_key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn grant(nonce: u8) -> Grant {
        Grant {
            user: "alice".into(),
            role: Role::Viewer,
            team: "plant-a".into(),
            device: DEVICE.into(),
            issued_at: NOW,
            expires_at: NOW + 300,
            nonce: format!("{nonce:032x}"),
            protected: false,
        }
    }

    fn check(wire: &str, key: &Ed25519KeyPair, now: u64) -> Result<Grant, GrantError> {
        verify(wire, key.public_key().as_ref(), DEVICE, now)
    }

    /// Re-signs a tampered payload with `key`.
    fn signed_json(json: &str, key: &Ed25519KeyPair) -> String {
        let sig = key.sign(&signed_message(json.as_bytes()));
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json),
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        )
    }

    #[test]
    fn a_fresh_grant_verifies_and_round_trips() {
        let key = new_key();
        let g = grant(1);
        assert_eq!(check(&g.sign(&key), &key, NOW + 10), Ok(g));
    }

    #[test]
    fn the_verification_table() {
        let key = new_key();
        let other = new_key();
        let good = grant(1).sign(&key);
        let (payload, signature) = good.split_once('.').unwrap();
        let mut flipped = URL_SAFE_NO_PAD.decode(payload).unwrap();
        let at = flipped.iter().position(|&b| b == b'v').unwrap(); // "viewer"
        flipped[at..at + 6].copy_from_slice(b"owner\"");
        let tampered = format!("{}.{signature}", URL_SAFE_NO_PAD.encode(&flipped));
        let with = |f: &dyn Fn(&mut Grant)| {
            let mut g = grant(2);
            f(&mut g);
            g.sign(&key)
        };
        let cases: Vec<(&str, String, u64, GrantError)> = vec![
            (
                "expired",
                good.clone(),
                NOW + 300 + CLOCK_SKEW_SECS,
                GrantError::Expired {
                    expires_at: NOW + 300,
                    now: NOW + 330,
                },
            ),
            (
                "from the future",
                good.clone(),
                NOW - CLOCK_SKEW_SECS - 1,
                GrantError::NotYetValid {
                    issued_at: NOW,
                    now: NOW - 31,
                },
            ),
            (
                "wrong device",
                with(&|g| g.device = "dev-2".into()),
                NOW,
                GrantError::WrongDevice("dev-2".into()),
            ),
            (
                "wrong key",
                grant(1).sign(&other),
                NOW,
                GrantError::BadSignature,
            ),
            ("tampered", tampered, NOW, GrantError::BadSignature),
            (
                "lives too long",
                with(&|g| g.expires_at = NOW + 301),
                NOW,
                GrantError::LifetimeTooLong(301),
            ),
            (
                "ends before it starts",
                with(&|g| g.expires_at = NOW),
                NOW,
                GrantError::LifetimeTooLong(0),
            ),
            (
                "bad nonce",
                with(&|g| g.nonce = "ABC".into()),
                NOW,
                GrantError::Malformed("nonce is not 32 lowercase hex digits"),
            ),
            (
                "no dot",
                "abc".into(),
                NOW,
                GrantError::Malformed("no '.' between payload and signature"),
            ),
            (
                "not base64",
                "a*b.c".into(),
                NOW,
                GrantError::Malformed("payload is not base64url"),
            ),
            (
                "signed junk",
                signed_json("{\"user\":1}", &key),
                NOW,
                GrantError::Malformed("payload is not a grant"),
            ),
            (
                "unknown field",
                signed_json(
                    &serde_json::to_string(&grant(3))
                        .unwrap()
                        .replace('}', ",\"admin\":true}"),
                    &key,
                ),
                NOW,
                GrantError::Malformed("payload is not a grant"),
            ),
            (
                "too long",
                "a".repeat(MAX_GRANT_LEN + 1),
                NOW,
                GrantError::TooLong,
            ),
        ];
        for (name, wire, now, want) in cases {
            assert_eq!(check(&wire, &key, now), Err(want), "{name}");
        }
    }

    #[test]
    fn a_signature_over_the_bare_payload_is_not_a_grant() {
        let key = new_key();
        let payload = serde_json::to_vec(&grant(1)).unwrap();
        let sig = key.sign(&payload);
        let wire = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        );
        assert_eq!(check(&wire, &key, NOW), Err(GrantError::BadSignature));
    }

    #[test]
    fn each_nonce_is_admitted_once_and_forgotten_when_dead() {
        let mut guard = ReplayGuard::new(2);
        assert_eq!(guard.admit(&grant(1), NOW), Ok(()));
        assert_eq!(guard.admit(&grant(1), NOW + 1), Err(GrantError::Replayed));
        assert_eq!(guard.admit(&grant(2), NOW), Ok(()));
        assert_eq!(
            guard.admit(&grant(3), NOW),
            Err(GrantError::ReplayGuardFull)
        );
        // Once the grants can no longer verify, their nonces go.
        let dead = NOW + 300 + CLOCK_SKEW_SECS;
        assert_eq!(guard.admit(&grant(3), dead), Ok(()));
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn roles_parse_and_print() {
        for role in [Role::Owner, Role::Member, Role::Viewer] {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!(
            "admin"
                .parse::<Role>()
                .unwrap_err()
                .contains("owner, member or viewer")
        );
    }

    fn public(key: &Ed25519KeyPair) -> String {
        crate::hex::encode(key.public_key().as_ref())
    }

    #[test]
    fn a_device_follows_a_signed_chain_of_rotations_and_nothing_else() {
        let (k1, k2, k3) = (new_key(), new_key(), new_key());
        let r12 = KeyRotation::sign(&k1, &public(&k2), 10);
        let r23 = KeyRotation::sign(&k2, &public(&k3), 20);
        let chain = [r12.clone(), r23.clone()];
        // 1 -> 2 -> 3, from 1; from 2 only the last step; from 3 nothing.
        assert_eq!(follow(&public(&k1), &chain), [r12.clone(), r23.clone()]);
        assert_eq!(follow(&public(&k2), &chain), std::slice::from_ref(&r23));
        assert!(follow(&public(&k3), &chain).is_empty());
        // A skipped step leads nowhere: 1 does not know 3.
        assert!(follow(&public(&k1), std::slice::from_ref(&r23)).is_empty());
        // A rotation not signed by its `from` stops the walk.
        let forged = KeyRotation {
            to: public(&new_key()),
            ..r12.clone()
        };
        assert!(!forged.verifies());
        assert!(follow(&public(&k1), &[forged, r23.clone()]).is_empty());
        // Signed by the right key but claiming another `from`.
        let evil = new_key();
        let mut claimed = KeyRotation::sign(&evil, &public(&new_key()), 30);
        claimed.from = public(&k1);
        assert!(follow(&public(&k1), &[claimed]).is_empty());
        // A changed time breaks the signature too.
        let mut moved = r12;
        moved.at = 11;
        assert!(!moved.verifies());
    }
}
