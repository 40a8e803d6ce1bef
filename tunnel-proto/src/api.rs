//! The HTTPS half of the protocol: enrollment, the tunnel's URL, and the
//! errors the platform answers with. Both the agent and the platform build
//! these types, so they are defined once, here. `docs/protocol.md`
//! ("Enrollment") is the specification.
//!
//! This module owns the JSON shapes and the syntax checks of identifiers
//! (provisioning tokens, device ids, public keys). It never does I/O, never
//! hashes, never decides whether a token is valid: the platform does that.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Path of the enrollment endpoint (`POST`, JSON [`EnrollRequest`]).
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Path of the tunnel endpoint (WebSocket upgrade, client certificate).
pub const TUNNEL_PATH: &str = "/v1/tunnel";
/// Largest enrollment request body the platform reads, in bytes.
pub const MAX_ENROLL_BODY: usize = 64 * 1024;
/// Largest enrollment response body the agent reads, in bytes.
pub const MAX_ENROLL_RESPONSE: usize = 256 * 1024;
/// Most entries in [`Facts::extra`].
pub const MAX_FACTS: usize = 32;
/// Longest device name, in characters.
pub const MAX_DEVICE_NAME: usize = 64;

/// Every provisioning token starts with this.
pub const PROVISIONING_TOKEN_PREFIX: &str = "tpt_";
/// Random bytes in a provisioning token (256 bits), written as lowercase hex.
pub const PROVISIONING_TOKEN_BYTES: usize = 32;
/// Separates a provisioning token's secret from its CA hash.
pub const PROVISIONING_TOKEN_CA_SEPARATOR: char = '.';
/// Length of a whole provisioning token: `tpt_`, 64 hex digits of secret,
/// `.`, 64 hex digits of the CA's public key hash.
pub const PROVISIONING_TOKEN_LEN: usize = 4 + 64 + 1 + 64;
/// Every device id starts with this.
pub const DEVICE_ID_PREFIX: &str = "dev_";
/// Random bytes in a device id (80 bits), written as lowercase hex.
pub const DEVICE_ID_BYTES: usize = 10;

/// A secret string: shown as `[redacted]` by `Debug` and `Display`, so it
/// cannot reach a log line by accident. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Never pass the result to a log macro.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// True if `token` has the syntax of a provisioning token's secret part
/// (what a device sends and the platform hashes): the prefix and 64
/// lowercase hex digits. Says nothing about whether it was ever issued.
pub fn is_provisioning_token(token: &str) -> bool {
    token
        .strip_prefix(PROVISIONING_TOKEN_PREFIX)
        .is_some_and(|rest| is_lower_hex(rest, PROVISIONING_TOKEN_BYTES))
}

/// A whole provisioning token as a fleet manager copies it:
/// `tpt_<secret>.<ca>`, where `<ca>` is the SHA-256 of the platform CA's
/// SubjectPublicKeyInfo (DER), 64 lowercase hex digits. The secret part is
/// what the device sends and the platform hashes; the CA hash is not secret,
/// and it is the only thing the device trusts for enrollment (as
/// `kubeadm join --discovery-token-ca-cert-hash`).
#[derive(Clone, PartialEq, Eq)]
pub struct ProvisioningToken {
    secret: Secret,
    ca_spki_sha256: [u8; 32],
}

impl ProvisioningToken {
    /// Joins a secret part (`tpt_` and 64 hex digits) and a CA hash.
    /// `None` if the secret part is malformed.
    pub fn new(secret: &str, ca_spki_sha256: [u8; 32]) -> Option<Self> {
        is_provisioning_token(secret).then(|| ProvisioningToken {
            secret: Secret::new(secret),
            ca_spki_sha256,
        })
    }

    /// Parses a whole token; surrounding whitespace (a trailing newline from
    /// a file or a pipe) is ignored. `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != PROVISIONING_TOKEN_LEN {
            return None;
        }
        let (secret, ca) = text.split_once(PROVISIONING_TOKEN_CA_SEPARATOR)?;
        if !is_lower_hex(ca, 32) {
            return None;
        }
        let mut hash = [0u8; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&ca[2 * i..2 * i + 2], 16).ok()?;
        }
        ProvisioningToken::new(secret, hash)
    }

    /// The secret part, `tpt_` and 64 hex digits: what goes to the platform.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// SHA-256 of the platform CA's SubjectPublicKeyInfo (DER).
    pub fn ca_spki_sha256(&self) -> &[u8; 32] {
        &self.ca_spki_sha256
    }

    /// The whole token, to show a fleet manager once. Never log it.
    pub fn expose(&self) -> String {
        let mut text = String::with_capacity(PROVISIONING_TOKEN_LEN);
        text.push_str(self.secret.expose());
        text.push(PROVISIONING_TOKEN_CA_SEPARATOR);
        for byte in self.ca_spki_sha256 {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }
}

impl fmt::Debug for ProvisioningToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// True if `id` has the syntax of a device id: the prefix and 20 lowercase
/// hex digits.
pub fn is_device_id(id: &str) -> bool {
    id.strip_prefix(DEVICE_ID_PREFIX)
        .is_some_and(|rest| is_lower_hex(rest, DEVICE_ID_BYTES))
}

/// True if `name` is a valid device name: 1 to 64 characters, none of them
/// control characters.
pub fn is_device_name(name: &str) -> bool {
    let count = name.chars().count();
    (1..=MAX_DEVICE_NAME).contains(&count) && !name.chars().any(char::is_control)
}

fn is_lower_hex(text: &str, bytes: usize) -> bool {
    text.len() == bytes * 2 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a device sends to enroll: `POST /v1/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The provisioning token's secret part (`tpt_` and 64 hex digits),
    /// never its CA hash.
    pub token: Secret,
    /// A PKCS#10 certificate signing request, PEM. Only its public key is
    /// used: the platform chooses the subject.
    pub csr: String,
    /// A human name for the device (1 to 64 characters).
    pub name: String,
    /// What the device says about itself. Informational only.
    #[serde(default)]
    pub facts: Facts,
}

/// Facts a device reports at enrollment. Never used for authorization.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Facts {
    pub agent_version: String,
    pub protocol_version: String,
    pub os: String,
    pub arch: String,
    #[serde(default)]
    pub hostname: Option<String>,
    /// Anything else, at most [`MAX_FACTS`] entries.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// The platform's answer to a successful enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The device's id; also the certificate's subject common name.
    pub device_id: String,
    /// The device's client certificate, PEM.
    pub certificate: String,
    /// The platform CA certificate(s), PEM. The device pins these: from now
    /// on it trusts the platform only if its server certificate chains to
    /// them.
    pub ca: String,
    /// Where to open the tunnel, `wss://HOST:PORT/v1/tunnel`.
    pub tunnel_url: String,
    /// The platform's clock, seconds since the Unix epoch, so the device can
    /// tell when its own clock is far off.
    pub platform_time: u64,
    /// Public keys the device pins for later checks.
    pub keys: PinnedKeys,
}

/// Public keys the platform signs with, pinned by the device at enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedKeys {
    /// Ed25519 public key (64 lowercase hex digits) that signs snapshots.
    pub snapshot: String,
    /// Ed25519 public key (64 lowercase hex digits) that signs editor access
    /// grants.
    pub grant: String,
}

/// True if `key` is 32 bytes written as 64 lowercase hex digits.
pub fn is_ed25519_public_key(key: &str) -> bool {
    is_lower_hex(key, 32)
}

/// The body of every error answer from the platform's HTTPS API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ErrorCode,
    /// One sentence for a person: what was wrong and what to do.
    pub message: String,
}

/// Machine-readable error codes of the HTTPS API. Unknown codes from a newer
/// platform decode as [`ErrorCode::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The token does not have the syntax of a provisioning token.
    TokenMalformed,
    /// No such token was ever issued (or it was deleted).
    TokenUnknown,
    /// The token was issued but all its uses are spent.
    TokenUsed,
    /// The token's lifetime is over.
    TokenExpired,
    /// A fleet manager revoked the token.
    TokenRevoked,
    /// The CSR could not be parsed or its signature does not verify.
    BadCsr,
    /// The request is malformed (not JSON, wrong fields, too large, ...).
    BadRequest,
    /// Too many attempts from this source; retry after `Retry-After`.
    RateLimited,
    /// The device was revoked by a fleet manager.
    DeviceRevoked,
    /// The certificate does not belong to any device the platform knows.
    DeviceUnknown,
    /// Missing or wrong admin token.
    Unauthorized,
    /// No such route or object.
    NotFound,
    /// The device has no live tunnel.
    DeviceOffline,
    /// The device refused the stream (service not allow-listed, ...).
    ServiceRefused,
    /// The platform is at its connection or tunnel limit.
    Overloaded,
    /// A fault inside the platform.
    Internal,
    /// This one certificate of the device was revoked (the device was not).
    CertificateRevoked,
    /// The device renewed its certificate since this one was current: an
    /// older copy of the device's identity (a copied state directory).
    CertificateSuperseded,
    #[serde(other)]
    Other,
}
