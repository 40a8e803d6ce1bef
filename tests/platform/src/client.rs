//! The admin client the `tether-platform` commands use: HTTPS to the
//! running platform, found through `DIR/platform.json`, trusting only
//! `DIR/ca.crt`, authenticated with `DIR/admin-token`.
//!
//! This module owns finding the platform, the TLS connection, the
//! request/answer exchange and the client side of listen sessions
//! (keepalives, ending the session), and turns every failure into an error
//! that says what to do. It never prints anything and never logs the token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::DeserializeOwned;
use tether_proto::api::{ApiError, Secret};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::admin::{
    CreateTokenRequest, CreateTokenResponse, CreateUserRequest, ProtectionRequest,
    ProtectionResponse, RemoveUserResponse, RenewResponse, RevokeCertificateResponse,
    RevokeResponse, RotateGrantKeyResponse, RotateSnapshotKeysRequest, RotateSnapshotKeysResponse,
    SetPasswordRequest, SetRoleRequest, TCP_UPGRADE, UserChangeResponse,
};
use crate::ca::CA_CERT_FILE;
use crate::files;
use crate::keys::ADMIN_TOKEN_FILE;
use crate::listen::{
    LISTEN_ADDR_HEADER, LISTEN_UPGRADE, ListenRequest, SILENCE, SessionEnd, hold_session,
};
use crate::platform::{DeviceInfo, PLATFORM_JSON, PlatformFile};
use crate::store::TokenSummary;
use crate::users::UserInfo;
use tether_proto::grant::Role;

/// Largest answer read, in bytes.
const MAX_ANSWER: usize = 8 * 1024 * 1024;
/// How long ending a listen session may take.
const GOODBYE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot read '{path}': {reason}; help: is `tether-platform serve --data-dir {dir}` running, and is --data-dir right?"
    )]
    DataDir {
        path: PathBuf,
        dir: String,
        reason: String,
    },
    #[error(
        "cannot reach the platform at {url}: {cause}; help: start it with `tether-platform serve --data-dir {dir}`"
    )]
    Unreachable {
        url: String,
        dir: String,
        cause: std::io::Error,
    },
    #[error(
        "TLS with the platform at {url} failed: {reason}; help: the data directory must be the one the running platform uses"
    )]
    Tls { url: String, reason: String },
    #[error("HTTP exchange with the platform failed: {0}")]
    Http(String),
    #[error("the platform answered {status}: {message}")]
    Api {
        status: StatusCode,
        code: Option<tether_proto::api::ErrorCode>,
        message: String,
    },
    #[error("the platform's answer was not what was expected: {0}")]
    BadAnswer(String),
    #[error(
        "'{0}' is not a provisioning token id; help: copy the 16 hex digits from `tether-platform token list`"
    )]
    BadTokenId(String),
    #[error("the platform closed the listener: {0}")]
    SessionEnded(String),
    #[error("{0}")]
    BadInput(String),
}

/// A client of one running platform.
#[derive(Clone)]
pub struct AdminClient {
    addr: SocketAddr,
    url: String,
    dir: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    token: Secret,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("url", &self.url)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// Finds the platform through `dir` (`platform.json`, `ca.crt`,
    /// `admin-token`).
    pub fn from_data_dir(dir: &Path) -> Result<AdminClient, ClientError> {
        let shown = dir.display().to_string();
        let read = |name: &str| {
            let path = dir.join(name);
            files::read_text(&path).map_err(|e| ClientError::DataDir {
                path: path.clone(),
                dir: shown.clone(),
                reason: e.cause().to_string(),
            })
        };
        let bad = |name: &str, reason: String| ClientError::DataDir {
            path: dir.join(name),
            dir: shown.clone(),
            reason,
        };
        let platform: PlatformFile = serde_json::from_str(&read(PLATFORM_JSON)?)
            .map_err(|e| bad(PLATFORM_JSON, e.to_string()))?;
        let ca = CertificateDer::from_pem_slice(read(CA_CERT_FILE)?.as_bytes())
            .map_err(|e| bad(CA_CERT_FILE, e.to_string()))?;
        let token = Secret::new(read(ADMIN_TOKEN_FILE)?.trim());
        let host = host_of(&platform.url)
            .ok_or_else(|| bad(PLATFORM_JSON, "no host in the url".into()))?;
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| bad(PLATFORM_JSON, e.to_string()))?;
        let mut addr = platform.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Ok(AdminClient {
            addr,
            url: platform.url,
            dir: shown.clone(),
            server_name,
            connector: connector(ca).map_err(|e| bad(CA_CERT_FILE, e.to_string()))?,
            token,
        })
    }

    /// The platform's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `POST /v1/admin/tokens`.
    pub async fn create_token(
        &self,
        request: &CreateTokenRequest,
    ) -> Result<CreateTokenResponse, ClientError> {
        let body =
            serde_json::to_vec(request).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        self.json(Method::POST, "/v1/admin/tokens", Some(body))
            .await
    }

    /// `GET /v1/admin/tokens`: every provisioning token, never a secret.
    pub async fn tokens(&self) -> Result<Vec<TokenSummary>, ClientError> {
        self.json(Method::GET, "/v1/admin/tokens", None).await
    }

    /// `POST /v1/admin/tokens/{id}/revoke`.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenSummary, ClientError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ClientError::BadTokenId(id.to_owned()));
        }
        let path = format!("/v1/admin/tokens/{id}/revoke");
        self.json(Method::POST, &path, Some(Vec::new())).await
    }

    /// `GET /v1/admin/devices`.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        self.json(Method::GET, "/v1/admin/devices", None).await
    }

    /// `GET /v1/admin/audit`: the stored audit trails the query selects,
    /// verified.
    pub async fn audit(
        &self,
        query: &crate::audit::AuditQuery,
    ) -> Result<crate::audit::AuditReport, ClientError> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let pairs = [
            ("device", query.device.clone()),
            ("team", query.team.clone()),
            ("type", query.kind.clone()),
            ("user", query.user.clone()),
            ("since", Some(query.since.to_string())),
            ("limit", query.limit.map(|l| l.to_string())),
        ];
        for (key, value) in pairs {
            if let Some(value) = value {
                q.append_pair(key, &value);
            }
        }
        let path = format!("/v1/admin/audit?{}", q.finish());
        self.json(Method::GET, &path, None).await
    }

    /// `POST /v1/admin/devices/{id}/revoke`.
    pub async fn revoke(&self, device_id: &str) -> Result<RevokeResponse, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/revoke");
        self.json(Method::POST, &path, Some(Vec::new())).await
    }

    /// `POST /v1/admin/keys/grant/rotate`.
    pub async fn rotate_grant_key(&self) -> Result<RotateGrantKeyResponse, ClientError> {
        self.json(
            Method::POST,
            "/v1/admin/keys/grant/rotate",
            Some(Vec::new()),
        )
        .await
    }

    /// `POST /v1/admin/keys/snapshot/rotate`.
    pub async fn rotate_snapshot_keys(
        &self,
        revoke_old: bool,
    ) -> Result<RotateSnapshotKeysResponse, ClientError> {
        let body = serde_json::to_vec(&RotateSnapshotKeysRequest { revoke_old })
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.json(Method::POST, "/v1/admin/keys/snapshot/rotate", Some(body))
            .await
    }

    /// `POST /v1/admin/devices/{id}/renew`.
    pub async fn request_renewal(&self, device_id: &str) -> Result<RenewResponse, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/renew");
        self.json(Method::POST, &path, Some(Vec::new())).await
    }

    /// `POST /v1/admin/devices/{id}/certificates/{fingerprint}/revoke`.
    pub async fn revoke_certificate(
        &self,
        device_id: &str,
        fingerprint: &str,
    ) -> Result<RevokeCertificateResponse, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/certificates/{fingerprint}/revoke");
        self.json(Method::POST, &path, Some(Vec::new())).await
    }

    /// `POST /v1/admin/devices/{id}/protection`.
    pub async fn set_protection(
        &self,
        device_id: &str,
        enabled: bool,
    ) -> Result<ProtectionResponse, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/protection");
        let body = serde_json::to_vec(&ProtectionRequest { enabled })
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        self.json(Method::POST, &path, Some(body)).await
    }

    /// `GET /v1/admin/devices/{id}`.
    pub async fn device(&self, device_id: &str) -> Result<DeviceInfo, ClientError> {
        self.json(Method::GET, &format!("/v1/admin/devices/{device_id}"), None)
            .await
    }

    /// `POST /v1/admin/devices/{id}/snapshots`.
    pub async fn create_snapshot(
        &self,
        device_id: &str,
        request: &crate::snapshots::CreateRequest,
    ) -> Result<crate::snapshots::SnapshotInfo, ClientError> {
        let body =
            serde_json::to_vec(request).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let path = format!("/v1/admin/devices/{device_id}/snapshots");
        self.json(Method::POST, &path, Some(body)).await
    }

    /// `GET /v1/admin/snapshots`.
    pub async fn snapshots(
        &self,
        device_id: Option<&str>,
    ) -> Result<Vec<crate::snapshots::SnapshotInfo>, ClientError> {
        let path = match device_id {
            Some(id) => format!("/v1/admin/snapshots?device={id}"),
            None => "/v1/admin/snapshots".into(),
        };
        self.json(Method::GET, &path, None).await
    }

    /// `POST /v1/admin/devices/{id}/snapshots/{version}/push`.
    pub async fn push_snapshot(
        &self,
        device_id: &str,
        version: u64,
    ) -> Result<crate::admin::PushResponse, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/snapshots/{version}/push");
        self.json(Method::POST, &path, Some(b"{}".to_vec())).await
    }

    /// `POST /v1/admin/devices/{id}/snapshots/rollback`.
    pub async fn rollback_snapshot(
        &self,
        device_id: &str,
    ) -> Result<crate::admin::PushResponse, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/snapshots/rollback");
        self.json(Method::POST, &path, Some(b"{}".to_vec())).await
    }

    /// `POST /v1/admin/devices/{id}/snapshots/capture`.
    pub async fn snapshot_from_device(
        &self,
        device_id: &str,
        expires_in_secs: Option<u64>,
    ) -> Result<crate::snapshots::SnapshotInfo, ClientError> {
        let body = serde_json::to_vec(&crate::admin::CaptureRequest { expires_in_secs })
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let path = format!("/v1/admin/devices/{device_id}/snapshots/capture");
        self.json(Method::POST, &path, Some(body)).await
    }

    /// `PUT /v1/admin/devices/{id}/window`.
    pub async fn set_window(
        &self,
        device_id: &str,
        window: Option<&str>,
    ) -> Result<crate::admin::WindowResponse, ClientError> {
        let body = serde_json::to_vec(&crate::admin::WindowRequest {
            window: window.map(str::to_string),
        })
        .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let path = format!("/v1/admin/devices/{device_id}/window");
        self.json(Method::PUT, &path, Some(body)).await
    }

    /// `POST /v1/admin/devices/{id}/node-red`.
    pub async fn node_red(
        &self,
        device_id: &str,
        action: &str,
    ) -> Result<crate::admin::NodeRedResponse, ClientError> {
        let body = serde_json::to_vec(&crate::admin::NodeRedRequest {
            action: action.to_string(),
        })
        .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let path = format!("/v1/admin/devices/{device_id}/node-red");
        self.json(Method::POST, &path, Some(body)).await
    }

    /// `POST /v1/admin/users`.
    pub async fn create_user(&self, request: &CreateUserRequest) -> Result<UserInfo, ClientError> {
        let body =
            serde_json::to_vec(request).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        self.json(Method::POST, "/v1/admin/users", Some(body)).await
    }

    /// `GET /v1/admin/users`.
    pub async fn users(&self) -> Result<Vec<UserInfo>, ClientError> {
        self.json(Method::GET, "/v1/admin/users", None).await
    }

    /// `DELETE /v1/admin/users/{name}`.
    pub async fn remove_user(&self, name: &str) -> Result<RemoveUserResponse, ClientError> {
        // A valid name needs no escaping in a path; an invalid one names no
        // user.
        let path = user_path(name)?;
        self.json(Method::DELETE, &path, None).await
    }

    /// `POST /v1/admin/users/{name}/password`: sets the password and ends
    /// the user's sessions.
    pub async fn set_password(
        &self,
        name: &str,
        password: Secret,
    ) -> Result<UserChangeResponse, ClientError> {
        let body = serde_json::to_vec(&SetPasswordRequest { password })
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let path = format!("{}/password", user_path(name)?);
        self.json(Method::POST, &path, Some(body)).await
    }

    /// `POST /v1/admin/users/{name}/role`: changes the role and ends the
    /// user's sessions.
    pub async fn set_role(
        &self,
        name: &str,
        role: Role,
    ) -> Result<UserChangeResponse, ClientError> {
        let body = serde_json::to_vec(&SetRoleRequest { role })
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let path = format!("{}/role", user_path(name)?);
        self.json(Method::POST, &path, Some(body)).await
    }

    /// Opens a connect session to `service` on `device_id`: the upgraded
    /// connection carries the service's bytes.
    pub async fn connect(
        &self,
        device_id: &str,
        service: &str,
    ) -> Result<TokioIo<Upgraded>, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/services/{service}/connect");
        let request = self
            .request(Method::GET, &path)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, TCP_UPGRADE)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let response = self.send(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(api_error(response).await);
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(TokioIo::new(upgraded))
    }

    /// Asks the platform to listen on `listen` (on its own host) and carry
    /// each connection to `service` on `device_id`. The listener lives as
    /// long as the returned session.
    pub async fn listen(
        &self,
        device_id: &str,
        service: &str,
        listen: SocketAddr,
    ) -> Result<ListenSession, ClientError> {
        let path = format!("/v1/admin/devices/{device_id}/services/{service}/listen");
        let body = serde_json::to_vec(&ListenRequest { listen })
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let request = self
            .request(Method::POST, &path)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, LISTEN_UPGRADE)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let response = self.send(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(api_error(response).await);
        }
        let addr = response
            .headers()
            .get(LISTEN_ADDR_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .ok_or_else(|| {
                ClientError::BadAnswer(format!("no valid {LISTEN_ADDR_HEADER} header"))
            })?;
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(ListenSession {
            addr,
            io: TokioIo::new(upgraded),
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let mut builder = self.request(method, path);
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let response = self.send(request).await?;
        if !response.status().is_success() {
            return Err(api_error(response).await);
        }
        let bytes = read_body(response).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.url.trim_start_matches("https://"))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            )
    }

    /// One request on a fresh connection.
    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let tcp =
            TcpStream::connect(self.addr)
                .await
                .map_err(|cause| ClientError::Unreachable {
                    url: self.url.clone(),
                    dir: self.dir.clone(),
                    cause,
                })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| ClientError::Tls {
                url: self.url.clone(),
                reason: e.to_string(),
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(connection.with_upgrades());
        sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))
    }
}

/// A platform-side listener, open while this session is.
#[derive(Debug)]
pub struct ListenSession {
    addr: SocketAddr,
    io: TokioIo<Upgraded>,
}

impl ListenSession {
    /// The address the platform listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Keeps the session alive until `stop` resolves, then ends it (the
    /// platform closes the listener). Fails if the platform ends it first.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<(), ClientError> {
        let (mut rd, mut wr) = tokio::io::split(self.io);
        let ended = tokio::select! {
            () = stop => None,
            end = hold_session(&mut rd, &mut wr) => Some(match end {
                SessionEnd::Closed => "the session ended (is the platform still running?)".to_string(),
                SessionEnd::Failed(e) => e.to_string(),
                SessionEnd::Silent => format!("no keepalive for {SILENCE:?}"),
                SessionEnd::NotReading => "the platform stopped reading".to_string(),
            }),
        };
        match ended {
            None => {
                let _ = tokio::time::timeout(GOODBYE, wr.shutdown()).await;
                Ok(())
            }
            Some(reason) => Err(ClientError::SessionEnded(reason)),
        }
    }
}

async fn read_body(response: http::Response<hyper::body::Incoming>) -> Result<Bytes, ClientError> {
    Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Http(e.to_string()))
}

async fn api_error(response: http::Response<hyper::body::Incoming>) -> ClientError {
    let status = response.status();
    let body = read_body(response).await.unwrap_or_default();
    match serde_json::from_slice::<ApiError>(&body) {
        Ok(error) => ClientError::Api {
            status,
            code: Some(error.error),
            message: error.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: None,
            message: String::from_utf8_lossy(&body).chars().take(200).collect(),
        },
    }
}

fn connector(ca: CertificateDer<'static>) -> Result<TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `localhost` from `https://localhost:8443`.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    Some(host.trim_start_matches('[').trim_end_matches(']')).filter(|h| !h.is_empty())
}

/// `/v1/admin/users/{name}`. A valid name needs no escaping in a path; an
/// invalid one names no user.
fn user_path(name: &str) -> Result<String, ClientError> {
    if !crate::users::is_user_name(name) {
        return Err(ClientError::BadInput(format!(
            "'{name}' is not a valid user name, so no user has it"
        )));
    }
    Ok(format!("/v1/admin/users/{name}"))
}
