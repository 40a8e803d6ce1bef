//! TLS client configurations and what TLS failures mean for an operator.
//!
//! Two configurations: one for enrollment (the platform verified against
//! exactly the CA whose public key hash the provisioning token carries,
//! [`PinnedCaVerifier`]; never the operating system's roots) and one for the
//! tunnel (only the CA pinned at enrollment, and the device certificate as
//! client certificate). Both use the ring provider and take their notion
//! of "now" from the agent's [`Clock`], so certificate validity follows an
//! injected clock in tests. This module never opens a connection.

use std::error::Error as StdError;
use std::io;
use std::sync::{Arc, Mutex};

use rustls::client::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::clock::Clock;
use crate::identity::Credentials;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no usable trust anchor: {0}")]
    NoRoots(String),
    #[error("the device key or certificate is not usable: {0}")]
    ClientCert(rustls::Error),
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
    #[error("the CA file does not hold the CA named by the provisioning token")]
    NotTheTokensCa,
}

/// The ring provider, the only one this project uses, with the cipher
/// suites in the order this CPU runs fastest (`docs/decisions.md` 19).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider_for(aes_in_hardware()))
}

/// The ring provider with ChaCha20-Poly1305 first when the CPU has no AES
/// instructions (a Raspberry Pi 4's Cortex-A72, most ARMv7 gateways):
/// there ring's AES-GCM runs in constant-time software several times
/// slower than ChaCha20. The platform's rustls follows the client's order.
fn provider_for(aes: bool) -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    if !aes {
        // A stable sort: the AES suites keep their order behind ChaCha20.
        provider.cipher_suites.sort_by_key(|suite| {
            suite
                .suite()
                .as_str()
                .is_none_or(|name| !name.contains("CHACHA20"))
        });
    }
    provider
}

/// Does this CPU have AES (and carry-less multiply) instructions, which
/// ring's AES-GCM uses?
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        // 32-bit ARM: ring's AES runs without the ARMv8 crypto extensions
        // there, and ChaCha20 with NEON is the faster cipher.
        false
    }
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER), or `None` if the
/// certificate cannot be parsed.
pub fn spki_sha256(cert: &[u8]) -> Option<[u8; 32]> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        parsed.tbs_certificate.subject_pki.raw,
    );
    digest.as_ref().try_into().ok()
}

/// The certificate's chain does not reach the CA the token names.
#[derive(Debug, thiserror::Error)]
#[error("it does not chain to the CA named by the provisioning token")]
pub struct NotTheTokensCa;

/// Verifies the platform for enrollment against one CA only: the one whose
/// SubjectPublicKeyInfo hashes to the token's CA hash. The CA certificate
/// is taken from the chain the server sends (or from a `--ca` file); once
/// found it is the only root, and webpki does the usual signature, name,
/// time and key-usage checks. The CA that anchored the handshake is kept,
/// so the enrollment answer can be checked against it.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: [u8; 32],
    /// Certificates from a `--ca` file, candidates besides the server's chain.
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    anchored: Mutex<Option<CertificateDer<'static>>>,
}

impl PinnedCaVerifier {
    /// The CA certificate the last successful handshake chained to.
    pub fn anchored(&self) -> Option<CertificateDer<'static>> {
        self.anchored.lock().ok().and_then(|a| a.clone())
    }

    fn find_ca<'a>(
        &'a self,
        intermediates: &'a [CertificateDer<'a>],
    ) -> Option<&'a CertificateDer<'a>> {
        intermediates
            .iter()
            .chain(self.extra.iter())
            .find(|cert| spki_sha256(cert).is_some_and(|hash| hash == self.pin))
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let not_pinned = || {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                NotTheTokensCa,
            ))))
        };
        let ca = self
            .find_ca(intermediates)
            .ok_or_else(not_pinned)?
            .clone()
            .into_owned();
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone()).map_err(|_| not_pinned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Ok(mut anchored) = self.anchored.lock() {
            *anchored = Some(ca);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// For enrollment: trust only the CA whose public key hashes to `pin` (the
/// token's CA hash), found in the server's chain or in `ca` (a `--ca` file,
/// which must then hold that CA). Returns the verifier too, to ask which CA
/// anchored the handshake.
pub fn enroll_config(
    pin: [u8; 32],
    ca: Option<&[CertificateDer<'static>]>,
    clock: Clock,
) -> Result<(ClientConfig, Arc<PinnedCaVerifier>), TlsError> {
    let extra: Vec<CertificateDer<'static>> = match ca {
        Some(certs) => {
            let matching: Vec<_> = certs
                .iter()
                .filter(|cert| spki_sha256(cert).is_some_and(|hash| hash == pin))
                .cloned()
                .collect();
            if matching.is_empty() {
                return Err(TlsError::NotTheTokensCa);
            }
            matching
        }
        None => Vec::new(),
    };
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        extra,
        provider: provider(),
        anchored: Mutex::new(None),
    });
    let config = ClientConfig::builder_with_details(provider(), clock.time_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((config, verifier))
}

/// Checks that `ca` issued `device_cert` (a client certificate valid at
/// `now`): the enrollment answer's CA must be the one that signed both the
/// platform's TLS certificate and the device's new certificate.
pub fn check_issued_by(
    ca: &CertificateDer<'static>,
    device_cert: &CertificateDer<'static>,
    now: UnixTime,
) -> Result<(), TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| TlsError::NoRoots(format!("the platform CA is unusable: {e}")))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::NoRoots(e.to_string()))?;
    verifier
        .verify_client_cert(device_cert, &[], now)
        .map(|_| ())
        .map_err(TlsError::Setup)
}

/// For the tunnel: trust only the pinned CA, present the device certificate.
pub fn tunnel_config(creds: &Credentials, clock: Clock) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in &creds.ca {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError::NoRoots(format!("the pinned CA is unusable: {e}")))?;
    }
    let config = ClientConfig::builder_with_details(provider(), clock.time_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![creds.cert.der.clone()], creds.key.clone_key())
        .map_err(TlsError::ClientCert)?;
    Ok(config)
}

/// For the local MQTT broker (`mqtts://`): trust only the CAs in `ca`, and
/// present `client` (a certificate chain and its key) when given. The
/// system clock checks validity: the local broker is not the platform,
/// whose clock the tunnel's checks may follow.
pub fn broker_config(
    ca: &[CertificateDer<'static>],
    client: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError::NoRoots(format!("the broker's CA is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots(
            "the broker's CA file holds no certificate".into(),
        ));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots);
    match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::ClientCert),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// What a TLS failure means for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The platform's certificate is not valid yet by the device clock.
    NotValidYet { not_before: Option<u64> },
    /// The platform's certificate has expired by the device clock.
    Expired { not_after: Option<u64> },
    /// The platform's certificate does not chain to a trusted CA, or does
    /// not name the host: a different platform or the wrong CA file.
    Untrusted(String),
    /// The platform refused this device's certificate (an alert from it).
    Rejected(String),
}

impl TlsFailure {
    /// For a certificate outside its validity by the device clock: what that
    /// says about the clock, for a person. `None` for other failures.
    pub fn clock_detail(&self) -> Option<String> {
        let (when, bound, hint) = match self {
            TlsFailure::NotValidYet { not_before } => (
                "before",
                not_before.map(|t| format!(" (from {})", crate::clock::rfc3339(t))),
                "the device clock is probably behind",
            ),
            TlsFailure::Expired { not_after } => (
                "after",
                not_after.map(|t| format!(" (until {})", crate::clock::rfc3339(t))),
                "the device clock is probably ahead, or the platform certificate expired",
            ),
            _ => return None,
        };
        Some(format!(
            "{when} the platform certificate's validity{}: {hint}",
            bound.unwrap_or_default()
        ))
    }
}

/// Finds the TLS failure in an error's cause chain, if there is one.
pub fn classify(err: &(dyn StdError + 'static)) -> Option<TlsFailure> {
    let tls = find_cause::<rustls::Error>(err)?;
    Some(match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::NotValidYet => TlsFailure::NotValidYet { not_before: None },
            CertificateError::NotValidYetContext { not_before, .. } => TlsFailure::NotValidYet {
                not_before: Some(not_before.as_secs()),
            },
            CertificateError::Expired => TlsFailure::Expired { not_after: None },
            CertificateError::ExpiredContext { not_after, .. } => TlsFailure::Expired {
                not_after: Some(not_after.as_secs()),
            },
            other => TlsFailure::Untrusted(tls_reason(other)),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
            | AlertDescription::DecryptError => TlsFailure::Rejected(format!("{alert:?}")),
            _ => return None,
        },
        _ => return None,
    })
}

fn tls_reason(err: &CertificateError) -> String {
    match err {
        CertificateError::UnknownIssuer => "it is not signed by a trusted CA".into(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "it is not valid for this host name".into()
        }
        CertificateError::BadSignature => "its signature does not verify".into(),
        CertificateError::Revoked => "it is revoked".into(),
        CertificateError::Other(other) => other.to_string(),
        other => format!("{other:?}"),
    }
}

/// Walks an error's cause chain (looking inside `io::Error`s, whose
/// `source()` skips the wrapped error) for a cause of type `T`.
pub fn find_cause<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref)
            && let Some(found) = find_cause::<T>(inner)
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn chacha20_comes_first_only_without_aes_instructions_and_is_what_a_handshake_picks() {
        use rustls::{ClientConnection, ServerConnection};
        let name = |p: &rustls::crypto::CryptoProvider| format!("{:?}", p.cipher_suites[0].suite());
        assert!(name(&super::provider_for(false)).contains("CHACHA20"));
        assert!(name(&super::provider_for(true)).contains("AES"));
        // Every suite is still offered: only the order changes.
        assert_eq!(
            super::provider_for(false).cipher_suites.len(),
            super::provider_for(true).cipher_suites.len()
        );

        // A real handshake in memory with a rustls server of default
        // settings (as the platform's): the client's order decides.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["platform.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let negotiated = |aes: bool| {
            let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.der().clone()).unwrap();
            let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                super::provider_for(aes),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let mut c = ClientConnection::new(
                std::sync::Arc::new(client),
                "platform.test".try_into().unwrap(),
            )
            .unwrap();
            let mut s = ServerConnection::new(std::sync::Arc::new(server)).unwrap();
            while c.is_handshaking() || s.is_handshaking() {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
            format!("{:?}", c.negotiated_cipher_suite().unwrap().suite())
        };
        assert!(
            negotiated(false).contains("CHACHA20"),
            "{}",
            negotiated(false)
        );
        assert!(negotiated(true).contains("AES"), "{}", negotiated(true));
    }

    use super::*;

    #[test]
    fn a_tls_error_inside_an_io_error_is_found() {
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(
            classify(&io),
            Some(TlsFailure::Untrusted(
                "it is not signed by a trusted CA".into()
            ))
        );
        let alert = io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::CertificateExpired,
        ));
        assert!(matches!(classify(&alert), Some(TlsFailure::Rejected(_))));
        assert_eq!(classify(&io::Error::other("plain")), None);
    }
}
