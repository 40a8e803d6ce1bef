//! A small device-side client for the platform's tests: real TLS on
//! 127.0.0.1, rcgen CSRs, hand-driven HTTP/1.1 with hyper and tunnels with
//! tether-proto. It does not use the agent crate, on purpose: these tests
//! pin the platform's side of the contract on their own.
#![allow(dead_code, unreachable_pub)]

pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tether_platform::{Platform, PlatformConfig, PlatformEvent, RateLimit, TokenSpec};
use tether_proto::api::{ApiError, EnrollRequest, EnrollResponse, Facts, Secret};
use tether_proto::tokio_io::{DriverError, Tunnel, websocket_config};
use tether_proto::{Config, Role};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// A platform on 127.0.0.1 port 0 in a fresh directory, with an enrollment
/// rate limit high enough not to get in the way.
pub async fn start() -> (Platform, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let platform = Platform::start(config(dir.path()))
        .await
        .expect("platform starts");
    (platform, dir)
}

pub fn config(dir: &std::path::Path) -> PlatformConfig {
    let mut config = PlatformConfig::new(dir, "127.0.0.1:0".parse().unwrap());
    config.enroll_rate = RateLimit {
        burst: 1000,
        refill: Duration::from_millis(1),
    };
    config.login_rate = RateLimit {
        burst: 1000,
        refill: Duration::from_millis(1),
    };
    // Argon2 at its real cost takes ~0.4 s a hash in a debug build.
    config.password_cost = tether_platform::users::PasswordCost {
        memory_kib: 256,
        iterations: 1,
        parallelism: 1,
    };
    config
}

/// A device's key and what it got at enrollment.
pub struct Device {
    pub key: KeyPair,
    pub id: String,
    pub certificate: String,
    pub response: EnrollResponse,
}

pub fn new_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

/// A CSR for `key` asking for a subject the platform must ignore.
pub fn csr(key: &KeyPair) -> String {
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dev_ffffffffffffffffffff");
    params.serialize_request(key).unwrap().pem().unwrap()
}

pub fn enroll_request(token: &str, csr: String) -> EnrollRequest {
    EnrollRequest {
        token: Secret::new(token),
        csr,
        name: "press-7".to_string(),
        facts: Facts {
            agent_version: "0.1.0".into(),
            protocol_version: "1.0".into(),
            os: "linux".into(),
            arch: "aarch64".into(),
            ..Facts::default()
        },
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn api_error(&self) -> ApiError {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not an ApiError ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// `POST /v1/enroll` with `request`.
pub async fn post_enroll(platform: &Platform, request: &EnrollRequest) -> Answer {
    let body = serde_json::to_vec(request).unwrap();
    send(platform, Method::POST, "/v1/enroll", &[], body, None)
        .await
        .expect("enroll request")
}

/// Creates a token and enrolls a new device with it.
pub async fn enroll_new(platform: &Platform) -> Device {
    let token = platform.create_token(TokenSpec::default()).await.unwrap();
    let key = new_key();
    let answer = post_enroll(
        platform,
        &enroll_request(token.secret().expose(), csr(&key)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let response: EnrollResponse = serde_json::from_slice(&answer.body).unwrap();
    Device {
        key,
        id: response.device_id.clone(),
        certificate: response.certificate.clone(),
        response,
    }
}

/// A client certificate and its key, for mutual TLS.
pub type Identity = (String, KeyPair);

/// TLS to the platform, trusting only its CA, optionally with a client
/// certificate.
pub async fn tls(
    platform: &Platform,
    identity: Option<(&str, &KeyPair)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_to(addr(platform), &platform.ca_pem(), identity).await
}

/// TLS to a platform at `addr` whose CA is `ca_pem`.
pub async fn tls_to(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &KeyPair)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_from(addr, ca_pem, identity, None).await
}

/// TLS to a platform at `addr` from the loopback address `source` (such as
/// 127.0.0.2), or from any if `None`.
pub async fn tls_from(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &KeyPair)>,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert_pem, key)) => {
            let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = match source {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

pub fn addr(platform: &Platform) -> SocketAddr {
    platform.local_addr()
}

/// One HTTP/1.1 request on a fresh TLS connection.
pub async fn send(
    platform: &Platform,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    identity: Option<(&str, &KeyPair)>,
) -> Result<Answer, String> {
    let ca = platform.ca_pem();
    send_to(addr(platform), &ca, method, path, headers, body, identity).await
}

/// One HTTP/1.1 request to a platform at `addr` whose CA is `ca_pem`.
pub async fn send_to(
    addr: SocketAddr,
    ca_pem: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    identity: Option<(&str, &KeyPair)>,
) -> Result<Answer, String> {
    let tls = tls_to(addr, ca_pem, identity)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// An admin request with `token` as the bearer.
pub async fn admin(
    platform: &Platform,
    method: Method,
    path: &str,
    token: &str,
    body: Vec<u8>,
) -> Answer {
    let bearer = format!("Bearer {token}");
    send(
        platform,
        method,
        path,
        &[("authorization", &bearer)],
        body,
        None,
    )
    .await
    .expect("admin request")
}

/// A device-side tunnel and its driver.
pub struct DeviceTunnel {
    pub tunnel: Tunnel,
    pub driver: JoinHandle<Result<(), DriverError>>,
}

/// Why a tunnel could not be opened.
#[derive(Debug)]
pub enum TunnelRefused {
    /// The platform answered the upgrade with an HTTP error.
    Http(StatusCode, ApiError),
    /// TLS, TCP or the WebSocket handshake failed.
    Transport(String),
}

/// Opens a tunnel with `cert_pem`/`key` and waits for the handshake.
pub async fn open_tunnel(
    platform: &Platform,
    identity: Option<(&str, &KeyPair)>,
) -> Result<DeviceTunnel, TunnelRefused> {
    open_tunnel_to(addr(platform), &platform.ca_pem(), identity).await
}

/// Opens a tunnel to a platform at `addr` whose CA is `ca_pem`.
pub async fn open_tunnel_to(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &KeyPair)>,
) -> Result<DeviceTunnel, TunnelRefused> {
    let config = Config::new(Role::Device);
    let tls = tls_to(addr, ca_pem, identity)
        .await
        .map_err(|e| TunnelRefused::Transport(e.to_string()))?;
    let url = format!("wss://localhost:{}/v1/tunnel", addr.port());
    let ws = tokio_tungstenite::client_async_with_config(
        url,
        tls,
        Some(websocket_config(&config.settings)),
    )
    .await;
    let (ws, _) = ws.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            let body = response.body().clone().unwrap_or_default();
            let error = serde_json::from_slice(&body).unwrap_or_else(|_| {
                panic!("not an ApiError: {:?}", String::from_utf8_lossy(&body))
            });
            TunnelRefused::Http(response.status(), error)
        }
        other => TunnelRefused::Transport(other.to_string()),
    })?;
    let (tunnel, driver) = Tunnel::new(ws, config).unwrap();
    let driver = tokio::spawn(driver);
    tunnel
        .connected()
        .await
        .map_err(|e| TunnelRefused::Transport(e.to_string()))?;
    Ok(DeviceTunnel { tunnel, driver })
}

/// The next event matching `pick`, within 5 s.
pub async fn next_event<T>(
    events: &mut broadcast::Receiver<PlatformEvent>,
    mut pick: impl FnMut(&PlatformEvent) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("event channel closed: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("the expected event within 5 s")
}
