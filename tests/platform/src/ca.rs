//! The platform's certificate authority: the root devices pin, the server
//! certificate of the HTTPS listener, and device certificates.
//!
//! This module owns the certificate profiles (`docs/protocol.md`,
//! "Certificate profile") and the CA key. It takes only the public key from a
//! CSR, after checking the CSR's signature: the subject, the names and the
//! validity are always the platform's choice. It never stores anything but
//! its own key and certificates, and never decides who may have a
//! certificate; the callers (enrollment, renewal) do.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::files::{self, FileError, PUBLIC_MODE, SECRET_MODE};
use crate::keys::{self, KeyError};

/// File of the CA key (PKCS#8 PEM).
pub const CA_KEY_FILE: &str = "ca.key";
/// File of the CA certificate (PEM), what devices and the admin CLI trust.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File of the listener's certificate (PEM), re-issued at every start.
pub const SERVER_CERT_FILE: &str = "server.crt";
/// File of the listener's key (PKCS#8 PEM), replaced at every start.
pub const SERVER_KEY_FILE: &str = "server.key";
/// Largest CSR accepted, in bytes of PEM. A P-256 CSR is under 1 KiB.
pub const MAX_CSR_PEM: usize = 16 * 1024;
/// Backdating of `not_before`, so a device whose clock is a little behind
/// accepts its new certificate at once.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_COMMON_NAME: &str = "Tether platform CA";

/// Why the CA could not load, or could not issue a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "'{path}' cannot be used: {cause}; help: restore it from a backup, or start with a new data directory"
    )]
    BadCaFile { path: String, cause: rcgen::Error },
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
}

/// Why a CSR was refused. The message is safe to show the device.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is larger than {MAX_CSR_PEM} bytes")]
    TooLarge,
    #[error("the CSR is not a PEM PKCS#10 request whose signature verifies")]
    Invalid,
    #[error("the CSR's key is not ECDSA P-256; generate a P-256 key")]
    WrongKeyType,
}

/// A public key taken from a CSR whose signature verified.
#[derive(Debug)]
pub struct CsrKey(rcgen::PublicKey);

/// A freshly issued certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    pub pem: String,
    /// SHA-256 of the DER, lowercase hex: how the tunnel endpoint finds the
    /// device.
    pub fingerprint: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
}

/// The listener's certificate chain and key, for rustls.
#[derive(Debug)]
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The CA: its certificate and an issuer holding its key.
#[derive(Clone)]
pub struct Ca {
    inner: Arc<CaInner>,
}

struct CaInner {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// SHA-256 of the CA's SubjectPublicKeyInfo (DER): the trust anchor a
    /// provisioning token carries.
    spki_sha256: [u8; 32],
    /// Device certificates signed since start: how a test sees that a
    /// refused enrollment cost no signature.
    issued: AtomicU64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from `dir`, or creates it there on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let (key, cert_pem) = match files::read_text(&key_path) {
            Ok(key_pem) => (
                parse_key(&key_path, &key_pem)?,
                files::read_text(&cert_path)?,
            ),
            Err(e) if e.is_not_found() => create_ca(&key_path, &cert_path)?,
            Err(e) => return Err(e.into()),
        };
        let bad_cert = |cause| CaError::BadCaFile {
            path: cert_path.display().to_string(),
            cause,
        };
        let cert_der = pem_to_der(&cert_pem).map_err(bad_cert)?;
        let spki_sha256 = keys::sha256(&key.subject_public_key_info());
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(bad_cert)?;
        Ok(Ca {
            inner: Arc::new(CaInner {
                issuer,
                cert_pem,
                cert_der,
                spki_sha256,
                issued: AtomicU64::new(0),
            }),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.inner.cert_pem
    }

    /// SHA-256 of the CA's SubjectPublicKeyInfo (DER), the second part of
    /// every provisioning token.
    pub fn spki_sha256(&self) -> [u8; 32] {
        self.inner.spki_sha256
    }

    /// How many device certificates this CA signed since it was loaded.
    pub fn issued_count(&self) -> u64 {
        self.inner.issued.load(Ordering::Relaxed)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.inner.cert_der
    }

    /// Issues the listener's certificate for `names` (DNS names or IP
    /// addresses) with a new key, and writes both to `dir`.
    pub fn issue_server(&self, names: &[String], dir: &Path) -> Result<ServerIdentity, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = common_name(names.first().map_or("tether", String::as_str));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, SERVER_VALIDITY)?;
        let cert = params.signed_by(&key, &self.inner.issuer)?;
        files::write_atomic(
            &dir.join(SERVER_KEY_FILE),
            key.serialize_pem().as_bytes(),
            SECRET_MODE,
        )?;
        files::write_atomic(
            &dir.join(SERVER_CERT_FILE),
            cert.pem().as_bytes(),
            PUBLIC_MODE,
        )?;
        Ok(ServerIdentity {
            chain: vec![cert.der().clone(), self.inner.cert_der.clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        })
    }

    /// Issues a device certificate: CN = `device_id`, SAN URI
    /// `urn:tether:device:<id>`, EKU clientAuth, valid for `validity`.
    pub fn issue_device(
        &self,
        device_id: &str,
        key: &CsrKey,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(device_id);
        let uri = format!("urn:tether:device:{device_id}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let not_after = set_validity(&mut params, validity)?;
        let cert = params.signed_by(&key.0, &self.inner.issuer)?;
        self.inner.issued.fetch_add(1, Ordering::Relaxed);
        Ok(Issued {
            pem: cert.pem(),
            fingerprint: keys::sha256_hex(cert.der()),
            not_after,
        })
    }
}

/// Checks a CSR and keeps only its public key. Everything else in it (the
/// subject, requested names and extensions) is ignored.
pub fn parse_csr(pem: &str) -> Result<CsrKey, CsrError> {
    if pem.len() > MAX_CSR_PEM {
        return Err(CsrError::TooLarge);
    }
    // `from_pem` parses the request and verifies its self-signature, which
    // proves the requester holds the private key.
    let csr = CertificateSigningRequestParams::from_pem(pem).map_err(|_| CsrError::Invalid)?;
    if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::WrongKeyType);
    }
    Ok(CsrKey(csr.public_key))
}

impl CsrKey {
    /// The key's SubjectPublicKeyInfo bit string, for comparisons in tests.
    pub fn raw(&self) -> &[u8] {
        self.0.der_bytes()
    }
}

fn create_ca(key_path: &Path, cert_path: &Path) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY)?;
    let cert = params.self_signed(&key)?;
    // The key first: a certificate without its key would be useless, a key
    // without its certificate is recreated next start.
    files::write_atomic(key_path, key.serialize_pem().as_bytes(), SECRET_MODE)?;
    files::write_atomic(cert_path, cert.pem().as_bytes(), PUBLIC_MODE)?;
    Ok((key, cert.pem()))
}

fn parse_key(path: &Path, pem: &str) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(pem).map_err(|cause| CaError::BadCaFile {
        path: path.display().to_string(),
        cause,
    })
}

fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, rcgen::Error> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Sets `not_before` to a little in the past, `not_after` to `validity` from
/// now, and a random serial number. Returns `not_after` in Unix seconds.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<u64, CaError> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    let mut serial = keys::random_bytes::<16>()?;
    serial[0] &= 0x7f; // A positive DER INTEGER.
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(u64::try_from(params.not_after.unix_timestamp()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_pem(key: &KeyPair) -> String {
        let params = CertificateParams::new(vec!["ignored.example".to_string()]).unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn the_ca_is_reloaded_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path()).unwrap();
        let second = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
    }

    #[test]
    fn a_device_certificate_carries_the_csr_key_and_the_platform_subject() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let device_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = parse_csr(&csr_pem(&device_key)).unwrap();
        assert_eq!(key.raw(), device_key.public_key_raw());
        let issued = ca
            .issue_device("dev_0123456789abcdef0123", &key, Duration::from_secs(60))
            .unwrap();
        assert!(issued.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(issued.fingerprint.len(), 64);
    }

    #[test]
    fn a_csr_with_a_broken_signature_is_refused() {
        let device_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = csr_pem(&device_key);
        use rustls::pki_types::pem::PemObject;
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let forged = pem_encode("CERTIFICATE REQUEST", &der);
        assert!(matches!(parse_csr(&forged), Err(CsrError::Invalid)));
        assert!(matches!(parse_csr("not a csr"), Err(CsrError::Invalid)));
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        // A minimal base64 encoder, enough for a test.
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        while !b64.len().is_multiple_of(4) {
            b64.push('=');
        }
        format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
    }
}
