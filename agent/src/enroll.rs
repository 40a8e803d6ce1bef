//! Enrollment: turn a one-time provisioning token into a device identity.
//!
//! The token names the platform's CA by the SHA-256 of its public key; the
//! platform is trusted only if its TLS chain reaches that CA
//! ([`tls::PinnedCaVerifier`]), never through the system's Web PKI, and the
//! answer must carry that same CA, which must have issued the returned
//! device certificate. Only the token's secret part is sent.
//!
//! The key pair is made here (ECDSA P-256) and never leaves the device: only
//! a CSR goes to `POST /v1/enroll`. The answer (device id, certificate,
//! platform CA, tunnel URL, pinned keys) is checked and stored in the state
//! directory. Before the token is spent, the state directory is checked for
//! an existing enrollment and for write access, so a failure there never
//! burns a token. Every failure is an [`EnrollError`] whose message is one
//! line saying what happened and what to do, with an exit code.
//!
//! This module never logs the token and never writes the key anywhere but
//! the state directory.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, UnixTime};
use tether_proto::api::{
    self, ApiError, EnrollRequest, EnrollResponse, ErrorCode, Facts, ProvisioningToken,
    is_device_id, is_device_name, is_ed25519_public_key,
};

use crate::clock::{self, Clock};
use crate::exit;
use crate::files::{self, FileError};
use crate::identity::{self, CertInfo, Identity, IdentityError, NewEnrollment, StateDir};
use crate::net::{self, DialError, Endpoint};
use crate::tls::{self, TlsFailure};

/// Deadline for the TLS handshake with the platform.
pub const TLS_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline for the enrollment request and its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A platform clock this far from the device clock is worth a warning.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// What to enroll with.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    /// The platform's base URL, `https://HOST[:PORT]`.
    pub platform: String,
    /// The provisioning token: its secret and the platform CA's hash.
    pub token: ProvisioningToken,
    /// A CA file for the platform, optional: it must hold the CA the token
    /// names (useful when the platform does not send its CA in its chain).
    pub ca: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// The device's name (the hostname without it).
    pub name: Option<String>,
    /// Replace an existing enrollment.
    pub force: bool,
    pub clock: Clock,
}

impl EnrollOptions {
    /// Options with the defaults: no CA file, the hostname as name, no
    /// force, the system clock.
    pub fn new(
        platform: impl Into<String>,
        token: ProvisioningToken,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        EnrollOptions {
            platform: platform.into(),
            token,
            ca: None,
            state_dir: state_dir.into(),
            name: None,
            force: false,
            clock: Clock::system(),
        }
    }
}

/// A successful enrollment.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub identity: Identity,
    /// Platform clock minus device clock, seconds.
    pub clock_skew_secs: i64,
}

/// Why enrollment failed. `Display` is one line with a `help:` part.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "the provisioning token is malformed (expected 'tpt_', 64 lowercase hex digits, '.' and the CA hash's 64 hex digits); help: copy the whole token from `tether-platform token create`"
    )]
    TokenMalformed,
    #[error(
        "the provisioning token was revoked on the platform; help: create a new token on the platform"
    )]
    TokenRevoked,
    #[error(
        "the CA file '{}' does not hold the CA named by the provisioning token; help: leave out --ca (the token names the CA), or check that token and CA belong to the same platform",
        path.display()
    )]
    CaNotTheTokens { path: PathBuf },
    #[error(
        "the platform does not know this provisioning token; help: check that it was copied whole and belongs to this platform, or create a new one"
    )]
    TokenUnknown,
    #[error("the provisioning token was already used; help: create a new token on the platform")]
    TokenUsed,
    #[error("the provisioning token has expired; help: create a new token on the platform")]
    TokenExpired,
    #[error("this device is already enrolled as {device_id} (state in '{}'); help: pass --force to replace that enrollment", state_dir.display())]
    AlreadyEnrolled {
        device_id: String,
        state_dir: PathBuf,
    },
    #[error(
        "cannot write the state directory: {0}; help: run as the tetherd user or pass --state-dir"
    )]
    StateDir(String),
    #[error("cannot use the CA file '{}': {reason}; help: pass the platform's CA certificate (PEM)", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "platform {target} is unreachable: {reason}; help: check the URL, DNS and the network, then retry"
    )]
    Unreachable { target: String, reason: String },
    #[error("platform {target} is unavailable ({reason}); help: retry later")]
    Unavailable { target: String, reason: String },
    #[error("the platform is rate limiting enrollments; help: retry after {} s", retry_after.unwrap_or(60))]
    RateLimited { retry_after: Option<u64> },
    #[error("the platform at {target} is not trusted: its certificate {reason}; help: {help}")]
    Untrusted {
        target: String,
        reason: String,
        help: &'static str,
    },
    #[error(
        "the device clock reads {device_time}, {detail}; help: set the clock (enable NTP) and retry"
    )]
    ClockSkew { device_time: String, detail: String },
    #[error(
        "the platform answered unexpectedly: {0}; help: check that the URL points at a Tether platform of a compatible version"
    )]
    Protocol(String),
    #[error("cannot make a key pair: {0}")]
    Key(String),
}

impl EnrollError {
    /// The process exit code for this failure (`docs/operations.md`).
    pub fn exit_code(&self) -> u8 {
        match self {
            EnrollError::Usage(_) => exit::USAGE,
            EnrollError::TokenMalformed
            | EnrollError::TokenRevoked
            | EnrollError::TokenUnknown
            | EnrollError::TokenUsed
            | EnrollError::TokenExpired => exit::DATAERR,
            EnrollError::AlreadyEnrolled { .. } | EnrollError::StateDir(_) => exit::CANTCREAT,
            EnrollError::CaFile { .. } | EnrollError::ClockSkew { .. } => exit::CONFIG,
            EnrollError::Unreachable { .. } => exit::UNAVAILABLE,
            EnrollError::Unavailable { .. } | EnrollError::RateLimited { .. } => exit::TEMPFAIL,
            EnrollError::Untrusted { .. } | EnrollError::CaNotTheTokens { .. } => exit::NOPERM,
            EnrollError::Protocol(_) => exit::PROTOCOL,
            EnrollError::Key(_) => exit::SOFTWARE,
        }
    }
}

impl From<FileError> for EnrollError {
    fn from(e: FileError) -> Self {
        EnrollError::StateDir(e.to_string())
    }
}

impl From<IdentityError> for EnrollError {
    fn from(e: IdentityError) -> Self {
        EnrollError::StateDir(e.to_string())
    }
}

/// Enrolls the device and stores its identity.
pub async fn enroll(options: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    let endpoint = Endpoint::parse(&options.platform, "https")
        .map_err(|e| EnrollError::Usage(e.to_string()))?;
    let name = match &options.name {
        Some(name) if is_device_name(name) => name.clone(),
        Some(_) => {
            return Err(EnrollError::Usage(
                "the device name must be 1 to 64 characters with no control characters".into(),
            ));
        }
        None => default_name(),
    };
    let ca = match &options.ca {
        Some(path) => Some(identity::read_certs(path).map_err(|e| EnrollError::CaFile {
            path: path.clone(),
            reason: match e {
                IdentityError::File(f) => f.source.to_string(),
                other => other.to_string(),
            },
        })?),
        None => None,
    };

    // Never spend the token when the result could not be stored.
    let state = StateDir::new(&options.state_dir);
    files::ensure_dir(state.root())?;
    match state.load() {
        Ok(Some(existing)) if !options.force => {
            return Err(EnrollError::AlreadyEnrolled {
                device_id: existing.device_id,
                state_dir: options.state_dir.clone(),
            });
        }
        Err(e) if !options.force => return Err(e.into()),
        _ => {}
    }
    files::check_writable(state.root())?;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let csr = csr_pem(&key).map_err(EnrollError::Key)?;
    let request = EnrollRequest {
        token: options.token.secret().clone(),
        csr,
        name: name.clone(),
        facts: facts(),
    };
    let (tls, verifier) = tls::enroll_config(
        *options.token.ca_spki_sha256(),
        ca.as_deref(),
        options.clock,
    )
    .map_err(|e| match e {
        tls::TlsError::NotTheTokensCa => EnrollError::CaNotTheTokens {
            path: options.ca.clone().unwrap_or_default(),
        },
        other => EnrollError::CaFile {
            path: options.ca.clone().unwrap_or_default(),
            reason: other.to_string(),
        },
    })?;
    let response = post_enroll(&endpoint, tls, &request, options).await?;
    let anchored = verifier.anchored().ok_or_else(|| {
        EnrollError::Protocol("the TLS handshake finished without the token's CA".into())
    })?;
    let answer = check_response(response, &key)?;
    check_answer_ca(&answer, &anchored, options)?;

    let now = options.clock.now_unix();
    let skew = answer.platform_time as i64 - now as i64;
    let key_pem = key.serialize_pem();
    let identity = state.store_enrollment(&NewEnrollment {
        device_id: &answer.device_id,
        name: &name,
        platform: options.platform.trim_end_matches('/'),
        tunnel_url: &answer.tunnel_url,
        keys: &answer.keys,
        enrolled_at: now,
        key_pem: &key_pem,
        cert_pem: &answer.certificate,
        ca_pem: &answer.ca,
    })?;
    Ok(Enrolled {
        identity,
        clock_skew_secs: skew,
    })
}

/// A PEM CSR for `key`. The platform takes only the public key from it.
pub fn csr_pem(key: &rcgen::KeyPair) -> Result<String, String> {
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| e.to_string())
}

/// What the device says about itself.
fn facts() -> Facts {
    Facts {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: tether_proto::PROTOCOL_VERSION.to_owned(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        hostname: hostname(),
        extra: Default::default(),
    }
}

/// The host name, from the kernel.
pub fn hostname() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(api::MAX_DEVICE_NAME)
        .collect();
    (!name.is_empty()).then_some(name)
}

fn default_name() -> String {
    hostname().unwrap_or_else(|| "device".to_owned())
}

async fn post_enroll(
    endpoint: &Endpoint,
    tls: rustls::ClientConfig,
    request: &EnrollRequest,
    options: &EnrollOptions,
) -> Result<EnrollResponse, EnrollError> {
    let target = endpoint.authority();
    let unreachable = |reason: String| EnrollError::Unreachable {
        target: target.clone(),
        reason,
    };
    let tcp = net::dial(endpoint).await.map_err(|e| match e {
        DialError::Timeout { .. } => unreachable(format!(
            "no answer within {} s",
            net::CONNECT_TIMEOUT.as_secs()
        )),
        other => unreachable(other.to_string()),
    })?;
    let server_name = ServerName::try_from(endpoint.host.clone())
        .map_err(|_| EnrollError::Usage(format!("'{}' is not a valid host name", endpoint.host)))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let stream = match tokio::time::timeout(TLS_TIMEOUT, connector.connect(server_name, tcp)).await
    {
        Err(_) => {
            return Err(unreachable(format!(
                "no TLS handshake within {} s",
                TLS_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(e)) => {
            return Err(tls_failure(&e, &target, options)
                .unwrap_or_else(|| unreachable(format!("TLS failed: {e}"))));
        }
        Ok(Ok(stream)) => stream,
    };
    let body = serde_json::to_vec(request).map_err(|e| EnrollError::Key(e.to_string()))?;
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(format!("HTTP failed: {e}")))?;
        let conn = tokio::spawn(conn);
        let http_request = http::Request::post(api::ENROLL_PATH)
            .header(http::header::HOST, endpoint.authority())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("tetherd/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| EnrollError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| unreachable(format!("the request failed: {e}")))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = Limited::new(response.into_body(), api::MAX_ENROLL_RESPONSE)
            .collect()
            .await
            .map_err(|e| EnrollError::Protocol(format!("reading the answer failed: {e}")))?
            .to_bytes();
        conn.abort();
        Ok::<_, EnrollError>((status, retry_after, bytes))
    };
    let (status, retry_after, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())))??;
    if status == http::StatusCode::OK {
        return serde_json::from_slice(&bytes).map_err(|e| {
            EnrollError::Protocol(format!("the enrollment answer is not valid: {e}"))
        });
    }
    let error: Option<ApiError> = serde_json::from_slice(&bytes).ok();
    Err(api_failure(status, error, retry_after, &target))
}

fn api_failure(
    status: http::StatusCode,
    error: Option<ApiError>,
    retry_after: Option<u64>,
    target: &str,
) -> EnrollError {
    let code = error.as_ref().map(|e| e.error);
    match code {
        Some(ErrorCode::TokenMalformed) => EnrollError::TokenMalformed,
        Some(ErrorCode::TokenUnknown) => EnrollError::TokenUnknown,
        Some(ErrorCode::TokenUsed) => EnrollError::TokenUsed,
        Some(ErrorCode::TokenExpired) => EnrollError::TokenExpired,
        Some(ErrorCode::TokenRevoked) => EnrollError::TokenRevoked,
        Some(ErrorCode::RateLimited) => EnrollError::RateLimited { retry_after },
        _ if status == http::StatusCode::TOO_MANY_REQUESTS => {
            EnrollError::RateLimited { retry_after }
        }
        Some(ErrorCode::Overloaded) | Some(ErrorCode::Internal) => EnrollError::Unavailable {
            target: target.to_owned(),
            reason: format!("HTTP {}", status.as_u16()),
        },
        _ if status.is_server_error() => EnrollError::Unavailable {
            target: target.to_owned(),
            reason: format!("HTTP {}", status.as_u16()),
        },
        _ => EnrollError::Protocol(match error {
            // The platform's message is meant for people; keep it on one line.
            Some(e) => format!(
                "HTTP {} {:?}: {}",
                status.as_u16(),
                e.error,
                one_line(&e.message)
            ),
            None => format!("HTTP {} without an error body", status.as_u16()),
        }),
    }
}

/// The meaning of a TLS failure during enrollment, if it has one.
fn tls_failure(err: &std::io::Error, target: &str, options: &EnrollOptions) -> Option<EnrollError> {
    let device_time = clock::rfc3339(options.clock.now_unix());
    let failure = tls::classify(err)?;
    let clock_detail = failure.clock_detail();
    Some(match failure {
        TlsFailure::NotValidYet { .. } | TlsFailure::Expired { .. } => EnrollError::ClockSkew {
            device_time,
            detail: clock_detail.unwrap_or_default(),
        },
        TlsFailure::Untrusted(reason) => EnrollError::Untrusted {
            target: target.to_owned(),
            reason,
            help: "the token was made by another platform, or the URL points at a platform other than the token's; create the token on the platform at this URL",
        },
        TlsFailure::Rejected(alert) => {
            EnrollError::Protocol(format!("the platform ended the TLS handshake ({alert})"))
        }
    })
}

/// Checks the answer against the request: a device id, a certificate for
/// our key, a CA, a tunnel URL and pinned keys.
fn check_response(
    answer: EnrollResponse,
    key: &rcgen::KeyPair,
) -> Result<EnrollResponse, EnrollError> {
    let bad = |what: String| EnrollError::Protocol(what);
    if !is_device_id(&answer.device_id) {
        return Err(bad(format!(
            "'{}' is not a device id",
            one_line(&answer.device_id)
        )));
    }
    let cert = CertInfo::from_pem(answer.certificate.as_bytes())
        .map_err(|e| bad(format!("the device certificate: {e}")))?;
    if cert.public_key != key.public_key_raw() {
        return Err(bad(
            "the certificate is not for the key this device sent".into()
        ));
    }
    if cert.common_name.as_deref() != Some(answer.device_id.as_str()) {
        return Err(bad("the certificate does not name the device id".into()));
    }
    if CertInfo::from_pem(answer.ca.as_bytes()).is_err() {
        return Err(bad("the platform CA is missing or malformed".into()));
    }
    Endpoint::parse(&answer.tunnel_url, "wss").map_err(|e| bad(format!("the tunnel URL: {e}")))?;
    if !is_ed25519_public_key(&answer.keys.snapshot) || !is_ed25519_public_key(&answer.keys.grant) {
        return Err(bad("the pinned keys are malformed".into()));
    }
    Ok(answer)
}

/// The answer's CA must be exactly the CA the TLS handshake chained to (the
/// token's), and it must have issued the device certificate: a platform
/// cannot hand the device another CA to pin.
fn check_answer_ca(
    answer: &EnrollResponse,
    anchored: &CertificateDer<'static>,
    options: &EnrollOptions,
) -> Result<(), EnrollError> {
    let bad = |what: &str| EnrollError::Protocol(what.to_owned());
    let returned: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(answer.ca.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("the platform CA is missing or malformed"))?;
    if returned.len() != 1 || returned[0] != *anchored {
        return Err(bad(
            "the CA in the answer is not the CA named by the token (the one the platform's TLS certificate chains to)",
        ));
    }
    let device: CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(answer.certificate.as_bytes())
            .map_err(|_| bad("the device certificate is malformed"))?;
    let now = UnixTime::since_unix_epoch(Duration::from_secs(options.clock.now_unix()));
    tls::check_issued_by(anchored, &device, now).map_err(|e| {
        EnrollError::Protocol(format!(
            "the device certificate was not issued by the token's CA: {e}"
        ))
    })
}

/// Text from the network, cut to one short line.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_map_to_token_messages_and_exit_codes() {
        let cases = [
            (ErrorCode::TokenUsed, 403, "already used", exit::DATAERR),
            (ErrorCode::TokenUnknown, 403, "does not know", exit::DATAERR),
            (ErrorCode::TokenExpired, 403, "expired", exit::DATAERR),
            (ErrorCode::TokenMalformed, 400, "malformed", exit::DATAERR),
            (
                ErrorCode::RateLimited,
                429,
                "retry after 7 s",
                exit::TEMPFAIL,
            ),
            (ErrorCode::Overloaded, 503, "unavailable", exit::TEMPFAIL),
            (ErrorCode::BadCsr, 400, "unexpectedly", exit::PROTOCOL),
        ];
        for (code, status, words, exit_code) in cases {
            let err = api_failure(
                http::StatusCode::from_u16(status).unwrap(),
                Some(ApiError {
                    error: code,
                    message: "m".into(),
                }),
                Some(7),
                "h:1",
            );
            let line = err.to_string();
            assert!(line.contains(words), "{code:?}: {line}");
            assert!(line.contains("help: "), "{line}");
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(err.exit_code(), exit_code, "{code:?}");
        }
    }

    #[test]
    fn a_certificate_for_another_key_is_refused() {
        let ours = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let theirs = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dev_00000000000000000001");
        let cert = params.self_signed(&theirs).unwrap();
        let answer = EnrollResponse {
            device_id: "dev_00000000000000000001".into(),
            certificate: cert.pem(),
            ca: cert.pem(),
            tunnel_url: "wss://127.0.0.1:1/v1/tunnel".into(),
            platform_time: 0,
            keys: tether_proto::api::PinnedKeys {
                snapshot: "0".repeat(64),
                grant: "0".repeat(64),
            },
        };
        let err = check_response(answer.clone(), &ours).unwrap_err();
        assert!(err.to_string().contains("not for the key"), "{err}");
        assert!(check_response(answer, &theirs).is_ok());
    }

    #[tokio::test]
    async fn an_existing_enrollment_is_kept_without_force_and_no_request_is_made() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("identity.json"),
            r#"{"format":1,"device_id":"dev_00000000000000000001","name":"n","platform":"https://127.0.0.1:1",
               "tunnel_url":"wss://127.0.0.1:1/v1/tunnel","keys":{"snapshot":"","grant":""},"enrolled_at":0,
               "generation":1,"key_file":"device-1.key","cert_file":"device-1.crt","ca_file":"ca.crt"}"#,
        )
        .unwrap();
        let token = ProvisioningToken::new(&format!("tpt_{}", "a".repeat(64)), [7; 32]).unwrap();
        // Port 1 on loopback: a request would fail as unreachable.
        let options = EnrollOptions::new("https://127.0.0.1:1", token, dir.path());
        let err = enroll(&options).await.unwrap_err();
        assert!(matches!(err, EnrollError::AlreadyEnrolled { .. }), "{err}");
        assert_eq!(err.exit_code(), exit::CANTCREAT);
    }

    #[test]
    fn a_token_without_its_ca_hash_does_not_parse() {
        let secret = format!("tpt_{}", "a".repeat(64));
        assert!(ProvisioningToken::parse(&secret).is_none());
        assert!(ProvisioningToken::parse("tpt_short.00").is_none());
        let whole = format!("{secret}.{}\n", "0f".repeat(32));
        let token = ProvisioningToken::parse(&whole).unwrap();
        assert_eq!(token.secret().expose(), secret);
        assert_eq!(token.ca_spki_sha256(), &[0x0f; 32]);
        assert_eq!(token.expose(), whole.trim());
        assert_eq!(format!("{token:?}"), "[redacted]");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let token = ProvisioningToken::new(&format!("tpt_{}", "a".repeat(64)), [7; 32]).unwrap();
        let mut options = EnrollOptions::new(
            format!("https://127.0.0.1:{port}"),
            token,
            dir.path().join("s"),
        );
        options.name = Some("press-7".into());
        let err = enroll(&options).await.unwrap_err();
        assert!(matches!(err, EnrollError::Unreachable { .. }), "{err}");
        assert_eq!(err.exit_code(), exit::UNAVAILABLE);
    }
}
