//! The state directory: the device's identity record, its key and
//! certificate, the pinned platform CA, and where the status file goes.
//!
//! Layout (`/var/lib/tether` by default):
//!
//! ```text
//! identity.json      the identity record: the commit point of every change
//! ca.crt             the platform CA pinned at enrollment
//! device-N.key       the current private key (0600), N = generation
//! device-N.crt       the current certificate
//! status.json        written by the running daemon
//! ```
//!
//! Keys and certificates are never overwritten in place: a renewal writes
//! `device-(N+1).*`, then replaces `identity.json` (an atomic rename, the
//! commit point), then removes the old pair. A crash at any point leaves a
//! record that names a complete key and certificate. This module owns the
//! layout and the record; it never talks to the network.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tether_proto::api::PinnedKeys;

use crate::files::{self, FileError, Mode};

/// Largest PEM file read from the state directory.
const MAX_PEM_FILE: u64 = 256 * 1024;
/// Largest identity record read.
const MAX_RECORD: u64 = 64 * 1024;
/// The record format this version writes.
const FORMAT: u32 = 1;

/// The agent's state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

/// What the device knows about itself after enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Record format, 1.
    pub format: u32,
    pub device_id: String,
    pub name: String,
    /// The platform's base URL as given at enrollment.
    pub platform: String,
    /// `wss://HOST:PORT/v1/tunnel`, from the enrollment response.
    pub tunnel_url: String,
    /// Public keys pinned at enrollment.
    pub keys: PinnedKeys,
    /// When the device enrolled, seconds since the Unix epoch.
    pub enrolled_at: u64,
    /// When the certificate was last renewed, if ever.
    #[serde(default)]
    pub renewed_at: Option<u64>,
    /// Counts key pairs: 1 at enrollment, one more per renewal.
    pub generation: u64,
    /// File names (inside the state directory) of the current pair and CA.
    pub key_file: String,
    pub cert_file: String,
    pub ca_file: String,
}

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "identity record '{path}' is damaged: {reason}; help: re-enroll with 'tetherd enroll --force'"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("'{path}' holds no usable {what}: {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// A certificate that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate in the PEM text")]
    Missing,
    #[error("the certificate is malformed: {0}")]
    Malformed(String),
}

/// Facts read from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER, lowercase hex: how the platform knows the device.
    pub fingerprint: String,
    /// Serial number, hex.
    pub serial: String,
    /// Subject common name (the device id, for device certificates).
    pub common_name: Option<String>,
    pub not_before: u64,
    pub not_after: u64,
    /// The subject public key, raw (an uncompressed EC point for P-256).
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &[u8]) -> Result<CertInfo, CertError> {
        let der = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or(CertError::Missing)?
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        CertInfo::from_der(der)
    }

    /// Reads a DER certificate.
    pub fn from_der(der: CertificateDer<'static>) -> Result<CertInfo, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let validity = cert.validity();
        let info = CertInfo {
            fingerprint: hex(ring::digest::digest(&ring::digest::SHA256, &der).as_ref()),
            serial: hex(cert.raw_serial()),
            common_name,
            not_before: validity.not_before.timestamp().max(0) as u64,
            not_after: validity.not_after.timestamp().max(0) as u64,
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            der: CertificateDer::from(Vec::new()),
        };
        Ok(CertInfo { der, ..info })
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    tether_proto::hex::encode(bytes)
}

/// Everything a tunnel connection needs, loaded from the state directory.
#[derive(Debug)]
pub struct Credentials {
    pub key: PrivateKeyDer<'static>,
    pub cert: CertInfo,
    /// The pinned platform CA certificates.
    pub ca: Vec<CertificateDer<'static>>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            key: self.key.clone_key(),
            cert: self.cert.clone(),
            ca: self.ca.clone(),
        }
    }
}

/// The files a new enrollment stores.
#[derive(Debug)]
pub struct NewEnrollment<'a> {
    pub device_id: &'a str,
    pub name: &'a str,
    pub platform: &'a str,
    pub tunnel_url: &'a str,
    pub keys: &'a PinnedKeys,
    pub enrolled_at: u64,
    pub key_pem: &'a str,
    pub cert_pem: &'a str,
    pub ca_pem: &'a str,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity.json")
    }

    pub fn status_path(&self) -> PathBuf {
        self.root.join("status.json")
    }

    /// The identity record, or `None` if the device is not enrolled.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        let path = self.identity_path();
        let bytes = match files::read_bounded(&path, MAX_RECORD) {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let identity: Identity =
            serde_json::from_slice(&bytes).map_err(|e| IdentityError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if identity.format != FORMAT {
            return Err(IdentityError::Damaged {
                path,
                reason: format!(
                    "format {} is not one this version reads ({FORMAT})",
                    identity.format
                ),
            });
        }
        for name in [&identity.key_file, &identity.cert_file, &identity.ca_file] {
            if !is_plain_file_name(name) {
                return Err(IdentityError::Damaged {
                    path,
                    reason: format!(
                        "file name '{name}' is not a plain name in the state directory"
                    ),
                });
            }
        }
        Ok(Some(identity))
    }

    /// Loads the key, certificate and pinned CA an identity names.
    pub fn credentials(&self, identity: &Identity) -> Result<Credentials, IdentityError> {
        let key_path = self.root.join(&identity.key_file);
        let key_pem = files::read_bounded(&key_path, MAX_PEM_FILE)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| IdentityError::Pem {
            path: key_path,
            what: "private key",
            reason: e.to_string(),
        })?;
        let cert_path = self.root.join(&identity.cert_file);
        let cert =
            CertInfo::from_pem(&files::read_bounded(&cert_path, MAX_PEM_FILE)?).map_err(|e| {
                IdentityError::Pem {
                    path: cert_path,
                    what: "certificate",
                    reason: e.to_string(),
                }
            })?;
        let ca_path = self.root.join(&identity.ca_file);
        let ca = read_certs(&ca_path)?;
        Ok(Credentials { key, cert, ca })
    }

    /// Stores a new enrollment: CA, key, certificate, then the record (the
    /// commit point). Files of a previous identity are removed afterwards.
    pub fn store_enrollment(&self, new: &NewEnrollment<'_>) -> Result<Identity, IdentityError> {
        files::ensure_dir(&self.root)?;
        // A previous record may be damaged; it is being replaced anyway.
        let previous = self.load().ok().flatten();
        let generation = previous.as_ref().map_or(1, |p| p.generation + 1);
        let (key_file, cert_file) = pair_names(generation);
        let ca_file = "ca.crt".to_owned();
        files::write_atomic(
            &self.root.join(&ca_file),
            new.ca_pem.as_bytes(),
            Mode::Public,
        )?;
        files::write_atomic(
            &self.root.join(&key_file),
            new.key_pem.as_bytes(),
            Mode::Secret,
        )?;
        files::write_atomic(
            &self.root.join(&cert_file),
            new.cert_pem.as_bytes(),
            Mode::Public,
        )?;
        let identity = Identity {
            format: FORMAT,
            device_id: new.device_id.to_owned(),
            name: new.name.to_owned(),
            platform: new.platform.to_owned(),
            tunnel_url: new.tunnel_url.to_owned(),
            keys: new.keys.clone(),
            enrolled_at: new.enrolled_at,
            renewed_at: None,
            generation,
            key_file,
            cert_file,
            ca_file,
        };
        self.commit(&identity)?;
        if let Some(old) = previous {
            self.remove_pair(&old);
        }
        Ok(identity)
    }

    /// Switches to a renewed key and certificate: new files first, then the
    /// record (the commit point), then the old pair is removed.
    pub fn switch_pair(
        &self,
        current: &Identity,
        key_pem: &str,
        cert_pem: &str,
        renewed_at: u64,
    ) -> Result<Identity, IdentityError> {
        let generation = current.generation + 1;
        let (key_file, cert_file) = pair_names(generation);
        files::write_atomic(&self.root.join(&key_file), key_pem.as_bytes(), Mode::Secret)?;
        files::write_atomic(
            &self.root.join(&cert_file),
            cert_pem.as_bytes(),
            Mode::Public,
        )?;
        let next = Identity {
            generation,
            key_file,
            cert_file,
            renewed_at: Some(renewed_at),
            ..current.clone()
        };
        self.commit(&next)?;
        self.remove_pair(current);
        Ok(next)
    }

    fn commit(&self, identity: &Identity) -> Result<(), IdentityError> {
        let mut json = serde_json::to_vec_pretty(identity).map_err(|e| IdentityError::Damaged {
            path: self.identity_path(),
            reason: e.to_string(),
        })?;
        json.push(b'\n');
        files::write_atomic(&self.identity_path(), &json, Mode::Public)?;
        Ok(())
    }

    /// Removes a superseded key pair. Failure only leaves garbage behind.
    fn remove_pair(&self, old: &Identity) {
        for name in [&old.key_file, &old.cert_file] {
            if let Err(e) = files::remove_if_exists(&self.root.join(name)) {
                tracing::warn!(cause = %e, "could not remove a superseded key or certificate");
            }
        }
        let _ = files::sync_dir(&self.root);
    }
}

fn pair_names(generation: u64) -> (String, String) {
    (
        format!("device-{generation}.key"),
        format!("device-{generation}.crt"),
    )
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Reads every certificate of a PEM file; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = files::read_bounded(path, MAX_PEM_FILE)?;
    let pem_error = |reason: String| IdentityError::Pem {
        path: path.to_owned(),
        what: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no PEM certificate found".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_pem(cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (key.serialize_pem(), cert.pem())
    }

    fn keys() -> PinnedKeys {
        PinnedKeys {
            snapshot: "0".repeat(64),
            grant: "1".repeat(64),
        }
    }

    fn enroll(state: &StateDir) -> Identity {
        let (key_pem, cert) = cert_pem("dev_00000000000000000001");
        let (_, ca) = cert_pem("ca");
        state
            .store_enrollment(&NewEnrollment {
                device_id: "dev_00000000000000000001",
                name: "press-7",
                platform: "https://127.0.0.1:1",
                tunnel_url: "wss://127.0.0.1:1/v1/tunnel",
                keys: &keys(),
                enrolled_at: 1,
                key_pem: &key_pem,
                cert_pem: &cert,
                ca_pem: &ca,
            })
            .unwrap()
    }

    #[test]
    fn an_empty_state_dir_has_no_identity() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            StateDir::new(dir.path().join("nothing")).load().unwrap(),
            None
        );
    }

    #[test]
    fn an_enrollment_round_trips_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let identity = enroll(&state);
        assert_eq!(state.load().unwrap(), Some(identity.clone()));
        let creds = state.credentials(&identity).unwrap();
        assert_eq!(
            creds.cert.common_name.as_deref(),
            Some("dev_00000000000000000001")
        );
        assert_eq!(creds.cert.fingerprint.len(), 64);
        assert_eq!(creds.ca.len(), 1);
        let mode = std::fs::metadata(dir.path().join("state").join(&identity.key_file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_switch_commits_the_new_pair_and_removes_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let first = enroll(&state);
        let (key_pem, cert) = cert_pem("dev_00000000000000000001");
        let second = state.switch_pair(&first, &key_pem, &cert, 99).unwrap();
        assert_eq!(second.generation, 2);
        assert_eq!(second.renewed_at, Some(99));
        assert_eq!(state.load().unwrap(), Some(second.clone()));
        assert!(!dir.path().join(&first.key_file).exists());
        assert!(!dir.path().join(&first.cert_file).exists());
        let creds = state.credentials(&second).unwrap();
        assert_eq!(
            creds.cert.der,
            CertInfo::from_pem(cert.as_bytes()).unwrap().der
        );
    }

    #[test]
    fn a_damaged_record_is_reported_with_help() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        std::fs::write(state.identity_path(), b"{not json").unwrap();
        let err = state.load().unwrap_err();
        assert!(err.to_string().contains("re-enroll"), "{err}");
    }

    #[test]
    fn a_record_naming_a_file_outside_the_state_dir_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let mut identity = enroll(&state);
        identity.key_file = "../../etc/shadow".into();
        std::fs::write(
            state.identity_path(),
            serde_json::to_vec(&identity).unwrap(),
        )
        .unwrap();
        assert!(matches!(state.load(), Err(IdentityError::Damaged { .. })));
    }

    #[test]
    fn a_certificate_gives_its_public_key_and_validity() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let info = CertInfo::from_pem(cert.pem().as_bytes()).unwrap();
        assert_eq!(info.public_key, key.public_key_raw());
        assert!(info.not_after > info.not_before);
        assert!(matches!(
            CertInfo::from_pem(b"junk"),
            Err(CertError::Missing)
        ));
    }
}
