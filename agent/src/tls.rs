//! TLS client configurations and what TLS failures mean for an operator.
//!
//! Two configurations: one for enrollment (the platform verified against the
//! OS roots, or only against a CA file given on the command line) and one for
//! the tunnel (only the CA pinned at enrollment, and the device certificate
//! as client certificate). Both use the ring provider and take their notion
//! of "now" from the agent's [`Clock`], so certificate validity follows an
//! injected clock in tests. This module never opens a connection.

use std::error::Error as StdError;
use std::io;
use std::sync::Arc;

use rustls::client::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::{AlertDescription, CertificateError, RootCertStore};

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
}

/// The ring provider, the only one this project uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// For enrollment: trust `ca` if given, else the operating system's roots.
pub fn enroll_config(
    ca: Option<&[CertificateDer<'static>]>,
    clock: Clock,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(certs) => {
            for cert in certs {
                roots.add(cert.clone()).map_err(|e| {
                    TlsError::NoRoots(format!("the CA file holds an unusable certificate: {e}"))
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(TlsError::NoRoots(
                    "the operating system has no CA certificates; help: install ca-certificates or pass --ca".into(),
                ));
            }
        }
    }
    let config = ClientConfig::builder_with_details(provider(), clock.time_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
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
