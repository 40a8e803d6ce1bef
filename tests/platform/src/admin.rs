//! The admin API under `/v1/admin/`, on the same HTTPS listener as devices.
//!
//! This module owns authentication of fleet managers (a bearer token,
//! compared by SHA-256 in constant time; failures are rate limited per
//! source address) and the routes: create, list and revoke provisioning
//! tokens (a list never carries a secret), list and revoke devices, set a device's protection mode, create, list and remove
//! platform users, connect to a TCP service through a device's tunnel (an
//! HTTP upgrade to `tether-tcp`, then raw bytes both ways), and ask the
//! platform to listen for such connections itself ([`crate::listen`]). The
//! operations themselves live on [`crate::platform::State`], shared with the
//! library API. It never logs the Authorization header, a token or a
//! password.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tether_proto::api::{ErrorCode, Secret};
use tether_proto::grant::Role;
use tracing::{Instrument, debug, info_span, warn};

use crate::http::{self as reply, Body};
use crate::keys;
use crate::platform::{ConnectError, PlatformError, State, TokenSpec};
use crate::rate_limit::retry_after_secs;
use crate::server::ConnInfo;

/// The upgrade protocol of the connect endpoint.
pub const TCP_UPGRADE: &str = "tether-tcp";
/// Largest admin request body.
pub(crate) const MAX_ADMIN_BODY: usize = 4 * 1024;
/// Largest `POST /v1/admin/users` body: a password of 1024 bytes may take
/// up to six times that once escaped in JSON.
const MAX_USER_BODY: usize = 8 * 1024;
/// Longest lifetime of a provisioning token.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most uses of one provisioning token.
const MAX_TOKEN_USES: u32 = 100_000;

/// `POST /v1/admin/tokens` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime in seconds. May be left out only for a single-use token
    /// (then one hour); a multi-use token must name its expiry.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    pub uses: u32,
    pub team: String,
}

/// `POST /v1/admin/tokens` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateTokenResponse {
    /// The whole token, `tpt_<secret>.<ca hash>`: shown once, never stored.
    pub token: Secret,
    /// Its id in `token list` / `token revoke`.
    #[serde(default)]
    pub id: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub uses: u32,
}

/// `POST /v1/admin/devices/{id}/revoke` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RevokeResponse {
    pub device_id: String,
    pub revoked: bool,
    /// True if a live tunnel was closed.
    pub disconnected: bool,
}

/// `POST /v1/admin/devices/{id}/protection` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionRequest {
    pub enabled: bool,
}

/// `POST /v1/admin/devices/{id}/protection` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProtectionResponse {
    pub device_id: String,
    pub protected: bool,
    /// True if the device is online and its control stream was told.
    pub pushed: bool,
}

/// `POST /v1/admin/devices/{id}/snapshots/{version}/push` and
/// `.../snapshots/rollback` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushResponse {
    pub snapshot: crate::snapshots::SnapshotInfo,
    /// For a rollback: the version copied.
    #[serde(default)]
    pub copied_from: Option<u64>,
    /// True if the device is online and its control stream was told.
    pub pushed: bool,
}

/// `POST /v1/admin/devices/{id}/node-red` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRedRequest {
    /// `start`, `stop` or `restart`.
    pub action: String,
}

/// `POST /v1/admin/devices/{id}/node-red` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRedResponse {
    pub device_id: String,
    pub action: String,
    /// True if the device is online and its control stream was told.
    pub pushed: bool,
}

/// `PUT /v1/admin/devices/{id}/window` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowRequest {
    /// `"22:00-06:00"` (the device's local time), or null to clear it.
    pub window: Option<String>,
}

/// `PUT /v1/admin/devices/{id}/window` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WindowResponse {
    pub device_id: String,
    pub window: Option<String>,
    /// True if the device is online and its control stream was told.
    pub pushed: bool,
}

/// The name recorded for requests made with the admin token.
pub const ADMIN_ACTOR: &str = "admin";

/// `POST /v1/admin/devices/{id}/renew` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewResponse {
    pub device_id: String,
    /// True if the device is online and its control stream was told.
    pub pushed: bool,
}

/// `POST /v1/admin/devices/{id}/certificates/{fingerprint}/revoke` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RevokeCertificateResponse {
    pub device_id: String,
    pub fingerprint: String,
    /// True if a live tunnel authenticated with it was closed.
    pub disconnected: bool,
}

/// `POST /v1/admin/users` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub name: String,
    pub team: String,
    pub role: Role,
    pub password: Secret,
}

/// `POST /v1/admin/keys/grant/rotate` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RotateGrantKeyResponse {
    /// The new grant key (Ed25519 public key, hex).
    pub grant_key: String,
    /// Rotations on record (sent to every device on its control stream).
    pub rotations: usize,
}

/// `POST /v1/admin/keys/snapshot/rotate` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateSnapshotKeysRequest {
    /// Revoke the old root key and snapshot key: after a leak. Devices then
    /// refuse anything they sign.
    #[serde(default)]
    pub revoke_old: bool,
}

/// `POST /v1/admin/keys/snapshot/rotate` answer: the new root.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RotateSnapshotKeysResponse {
    /// The new root version.
    pub root_version: u64,
    /// Its root key (Ed25519 public key, hex): signs the next rotation.
    pub root_key: String,
    /// Its snapshot key (hex): signs every manifest from now on.
    pub snapshot_key: String,
    /// The keys this rotation revoked (hex; empty without `revoke_old`).
    pub revoked: Vec<String>,
    /// When the new root expires (Unix seconds).
    pub expires_at: u64,
}

/// `DELETE /v1/admin/users/{name}` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveUserResponse {
    pub name: String,
    pub removed: bool,
    /// Sessions that ended (their live editor streams were closed).
    pub sessions_ended: usize,
}

/// `POST /v1/admin/users/{name}/password` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPasswordRequest {
    pub password: Secret,
}

/// `POST /v1/admin/users/{name}/role` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRoleRequest {
    pub role: Role,
}

/// `POST /v1/admin/users/{name}/password` and `.../role` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserChangeResponse {
    pub name: String,
    /// Sessions that ended (their editor cookies and live editor streams
    /// were closed).
    pub sessions_ended: usize,
}

/// Routes a request under `/v1/admin/`.
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<Body> {
    if let Err(response) = authenticate(&state, &conn, req.headers()) {
        return response;
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches("/v1/admin/").split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::POST, ["tokens"]) => create_token(&state, req.into_body()).await,
        (&Method::GET, ["tokens"]) => list_tokens(&state).await,
        (&Method::POST, ["tokens", id, "revoke"]) => revoke_token(&state, id).await,
        (&Method::GET, ["devices"]) => list_devices(&state).await,
        (&Method::GET, ["devices", id]) => show_device(&state, id).await,
        (&Method::GET, ["snapshots"]) => {
            let device = query_param(req.uri().query(), "device");
            reply::json(StatusCode::OK, &state.snapshots.list(device.as_deref()))
        }
        (&Method::POST, ["devices", id, "snapshots"]) => {
            let id = id.to_string();
            create_snapshot(&state, &id, req.into_body()).await
        }
        (&Method::POST, ["devices", id, "snapshots", "capture"]) => {
            let id = id.to_string();
            capture_snapshot(&state, &id, req.into_body()).await
        }
        (&Method::POST, ["devices", id, "snapshots", "rollback"]) => snapshot_answer(
            id,
            state
                .rollback_snapshot(id)
                .await
                .map(|(from, info, told)| (Some(from), info, told)),
        ),
        (&Method::POST, ["devices", id, "snapshots", version, "push"]) => match version.parse() {
            Ok(version) => snapshot_answer(
                id,
                state
                    .push_snapshot(id, version)
                    .await
                    .map(|(info, told)| (None, info, told)),
            ),
            Err(_) => reply::error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("'{version}' is not a snapshot version number"),
            ),
        },
        (&Method::PUT, ["devices", id, "window"]) => {
            let id = id.to_string();
            window(&state, &id, req.into_body()).await
        }
        (&Method::POST, ["devices", id, "node-red"]) => {
            let id = id.to_string();
            node_red(&state, &id, req.into_body()).await
        }
        (&Method::GET, ["audit"]) => audit(&state, req.uri().query()).await,
        (&Method::POST, ["devices", id, "revoke"]) => revoke(&state, id).await,
        (&Method::POST, ["devices", id, "renew"]) => renew(&state, id).await,
        (&Method::POST, ["keys", "grant", "rotate"]) => match state.rotate_grant_key().await {
            Ok(grant_key) => reply::json(
                StatusCode::OK,
                &RotateGrantKeyResponse {
                    grant_key,
                    rotations: state.keys.rotations().len(),
                },
            ),
            Err(e) => {
                warn!(cause = %e, "cannot rotate the grant key");
                reply::internal()
            }
        },
        (&Method::POST, ["keys", "snapshot", "rotate"]) => {
            rotate_snapshot_keys(&state, req.into_body()).await
        }
        (&Method::POST, ["devices", id, "certificates", fp, "revoke"]) => {
            revoke_certificate(&state, id, fp).await
        }
        (&Method::POST, ["devices", id, "protection"]) => {
            let id = id.to_string();
            protect(&state, &id, req.into_body()).await
        }
        (&Method::POST, ["users"]) => create_user(&state, req.into_body()).await,
        (&Method::GET, ["users"]) => list_users(&state).await,
        (&Method::DELETE, ["users", name]) => remove_user(&state, name).await,
        (&Method::POST, ["users", name, "password"]) => {
            let name = name.to_string();
            set_password(&state, &name, req.into_body()).await
        }
        (&Method::POST, ["users", name, "role"]) => {
            let name = name.to_string();
            set_role(&state, &name, req.into_body()).await
        }
        (&Method::GET, ["devices", id, "services", name, "connect"]) => {
            let (id, name) = (id.to_string(), name.to_string());
            connect(state, conn, req, &id, &name).await
        }
        (&Method::POST, ["devices", id, "services", name, "listen"]) => {
            let (id, name) = (id.to_string(), name.to_string());
            crate::listen::handle(state, conn, req, &id, &name).await
        }
        _ => reply::not_found(),
    }
}

/// Checks `Authorization: Bearer <admin token>`.
fn authenticate(
    state: &State,
    conn: &ConnInfo,
    headers: &http::HeaderMap,
) -> Result<(), Response<Body>> {
    let source = conn.peer.ip();
    if state.admin_limiter.is_limited(&source, Instant::now()) {
        return Err(reply::rate_limited(
            retry_after_secs(state.config.admin_failure_rate.refill),
            "too many failed admin logins from this address; wait before trying again",
        ));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let valid = presented.is_some_and(|token| {
        // Comparing hashes, in constant time: neither the token's length nor
        // the position of the first wrong byte shows in the timing.
        constant_time_eq(&keys::sha256(token.as_bytes()), &state.admin_hash)
    });
    if valid {
        return Ok(());
    }
    let _ = state.admin_limiter.take(source, Instant::now());
    warn!(peer = %conn.peer, "admin request with a missing or wrong admin token");
    Err(reply::error(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        "missing or wrong admin token; send `Authorization: Bearer <token>` with the token in DIR/admin-token",
    ))
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn create_token(state: &State, body: Incoming) -> Response<Body> {
    let request: CreateTokenRequest = match reply::read_json(body, MAX_ADMIN_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let spec = TokenSpec {
        ttl: request.ttl_secs.map(Duration::from_secs),
        uses: request.uses,
        team: request.team,
    };
    if let Err(message) = check_spec(&spec) {
        return reply::error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message);
    }
    match state.create_token(&spec).await {
        Ok((token, expires_at)) => reply::json(
            StatusCode::OK,
            &CreateTokenResponse {
                id: keys::sha256_hex(token.secret().expose().as_bytes())
                    .chars()
                    .take(crate::store::TOKEN_ID_LEN)
                    .collect(),
                token: Secret::new(token.expose()),
                expires_at,
                uses: spec.uses,
            },
        ),
        Err(e) => {
            warn!(cause = %e, "cannot create a provisioning token");
            reply::internal()
        }
    }
}

/// Bounds on what a token request may ask for.
pub fn check_spec(spec: &TokenSpec) -> Result<(), String> {
    if spec.uses == 0 || spec.uses > MAX_TOKEN_USES {
        return Err(format!("uses must be between 1 and {MAX_TOKEN_USES}"));
    }
    match spec.ttl {
        None if spec.uses > 1 => {
            return Err(format!(
                "a token for {} devices needs an explicit expiry: pass a ttl (e.g. --ttl 1d) as well as the use count",
                spec.uses
            ));
        }
        Some(ttl) if ttl.is_zero() || ttl > MAX_TOKEN_TTL => {
            return Err("ttl must be between 1 second and 365 days".into());
        }
        _ => {}
    }
    if !tether_proto::api::is_device_name(&spec.team) {
        return Err("team must be 1 to 64 characters without control characters".into());
    }
    Ok(())
}

async fn list_tokens(state: &State) -> Response<Body> {
    match state.tokens().await {
        Ok(tokens) => reply::json(StatusCode::OK, &tokens),
        Err(e) => {
            warn!(cause = %e, "cannot list provisioning tokens");
            reply::internal()
        }
    }
}

async fn revoke_token(state: &State, id: &str) -> Response<Body> {
    match state.revoke_token(id).await {
        Ok(summary) => reply::json(StatusCode::OK, &summary),
        Err(PlatformError::Store(e @ crate::store::StoreError::NoToken(_))) => {
            reply::error(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
        }
        Err(e) => {
            warn!(cause = %e, "cannot revoke a provisioning token");
            reply::internal()
        }
    }
}

/// `GET /v1/admin/audit?device=ID&team=T&since=SEQ&type=TYPE&user=NAME&limit=N`.
async fn audit(state: &State, query: Option<&str>) -> Response<Body> {
    let mut q = crate::audit::AuditQuery::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let value = value.into_owned();
        let number = |v: &str| v.parse::<u64>().ok();
        match key.as_ref() {
            "device" => q.device = Some(value),
            "team" => q.team = Some(value),
            "type" => q.kind = Some(value),
            "user" => q.user = Some(value),
            "since" => match number(&value) {
                Some(n) => q.since = n,
                None => {
                    return reply::error(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadRequest,
                        "since must be a sequence number",
                    );
                }
            },
            "limit" => match number(&value) {
                Some(n) => q.limit = Some(n.min(crate::audit::MAX_ENTRIES as u64) as usize),
                None => {
                    return reply::error(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadRequest,
                        "limit must be a number",
                    );
                }
            },
            _ => {}
        }
    }
    match state.audit(q).await {
        Ok(report) => reply::json(StatusCode::OK, &report),
        Err(PlatformError::NoDevice(id)) => no_device(&id),
        Err(e) => {
            warn!(cause = %e, "cannot read the audit trail");
            reply::internal()
        }
    }
}

async fn list_devices(state: &State) -> Response<Body> {
    match state.devices().await {
        Ok(devices) => reply::json(StatusCode::OK, &devices),
        Err(e) => {
            warn!(cause = %e, "cannot list devices");
            reply::internal()
        }
    }
}

async fn show_device(state: &State, id: &str) -> Response<Body> {
    match state.devices().await {
        Ok(devices) => match devices.into_iter().find(|d| d.id == id) {
            Some(device) => reply::json(StatusCode::OK, &device),
            None => no_device(id),
        },
        Err(e) => {
            warn!(cause = %e, "cannot list devices");
            reply::internal()
        }
    }
}

/// `name=value` from a query string, percent signs not decoded (device ids
/// need none).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

async fn create_snapshot(state: &State, id: &str, body: Incoming) -> Response<Body> {
    let request: crate::snapshots::CreateRequest =
        match reply::read_json(body, crate::snapshots::MAX_CREATE_BODY).await {
            Ok(request) => request,
            Err(response) => return response,
        };
    let files = match crate::snapshots::decode_files(&request) {
        Ok(files) => files,
        Err(e) => {
            return reply::error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                e.to_string(),
            );
        }
    };
    match state
        .create_snapshot(id, files, request.expires_in_secs)
        .await
    {
        Ok(info) => reply::json(StatusCode::CREATED, &info),
        Err(e) => snapshot_error(id, e),
    }
}

/// `POST /v1/admin/devices/{id}/snapshots/capture` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

async fn capture_snapshot(state: &State, id: &str, body: Incoming) -> Response<Body> {
    let request: CaptureRequest = match reply::read_json(body, MAX_ADMIN_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    match state
        .snapshot_from_device(id, ADMIN_ACTOR, request.expires_in_secs)
        .await
    {
        Ok(info) => reply::json(StatusCode::CREATED, &info),
        Err(e @ (PlatformError::Connect(_) | PlatformError::Capture(_))) => reply::error(
            StatusCode::BAD_GATEWAY,
            ErrorCode::BadRequest,
            e.to_string(),
        ),
        Err(e) => snapshot_error(id, e),
    }
}

fn snapshot_answer(
    id: &str,
    result: Result<(Option<u64>, crate::snapshots::SnapshotInfo, bool), PlatformError>,
) -> Response<Body> {
    match result {
        Ok((copied_from, snapshot, pushed)) => reply::json(
            StatusCode::OK,
            &PushResponse {
                snapshot,
                copied_from,
                pushed,
            },
        ),
        Err(e) => snapshot_error(id, e),
    }
}

fn snapshot_error(id: &str, e: PlatformError) -> Response<Body> {
    use crate::snapshots::SnapshotError;
    match e {
        PlatformError::NoDevice(_) => no_device(id),
        PlatformError::Snapshot(e @ SnapshotError::Invalid(_)) => reply::error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        ),
        PlatformError::Snapshot(
            e @ (SnapshotError::NoVersion { .. } | SnapshotError::NothingToRollBack(_)),
        ) => reply::error(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string()),
        e => {
            warn!(cause = %e, "snapshot operation failed");
            reply::internal()
        }
    }
}

async fn window(state: &State, id: &str, body: Incoming) -> Response<Body> {
    let request: WindowRequest = match reply::read_json(body, MAX_ADMIN_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    match state
        .set_window(id, request.window.as_deref(), ADMIN_ACTOR)
        .await
    {
        Ok((window, pushed)) => reply::json(
            StatusCode::OK,
            &WindowResponse {
                device_id: id.to_string(),
                window,
                pushed,
            },
        ),
        Err(PlatformError::NoDevice(_)) => no_device(id),
        Err(e @ PlatformError::Snapshot(crate::snapshots::SnapshotError::BadWindow(_))) => {
            reply::error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                e.to_string(),
            )
        }
        Err(e) => {
            warn!(cause = %e, "cannot set the maintenance window");
            reply::internal()
        }
    }
}

async fn node_red(state: &State, id: &str, body: Incoming) -> Response<Body> {
    let request: NodeRedRequest = match reply::read_json(body, MAX_ADMIN_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    match state
        .node_red_action(id, &request.action, ADMIN_ACTOR)
        .await
    {
        Ok(pushed) => reply::json(
            StatusCode::OK,
            &NodeRedResponse {
                device_id: id.to_string(),
                action: request.action,
                pushed,
            },
        ),
        Err(PlatformError::NoDevice(_)) => no_device(id),
        Err(e @ PlatformError::BadAction(_)) => reply::error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        ),
        Err(e) => {
            warn!(cause = %e, "cannot send the Node-RED request");
            reply::internal()
        }
    }
}

async fn revoke(state: &State, id: &str) -> Response<Body> {
    match state.revoke(id).await {
        Ok(disconnected) => reply::json(
            StatusCode::OK,
            &RevokeResponse {
                device_id: id.to_string(),
                revoked: true,
                disconnected,
            },
        ),
        Err(PlatformError::NoDevice(_)) => no_device(id),
        Err(e) => {
            warn!(cause = %e, "cannot revoke a device");
            reply::internal()
        }
    }
}

async fn renew(state: &State, id: &str) -> Response<Body> {
    match state.request_renewal(id).await {
        Ok(pushed) => reply::json(
            StatusCode::OK,
            &RenewResponse {
                device_id: id.to_string(),
                pushed,
            },
        ),
        Err(PlatformError::NoDevice(_)) => no_device(id),
        Err(e) => {
            warn!(cause = %e, "cannot request a renewal");
            reply::internal()
        }
    }
}

async fn revoke_certificate(state: &State, id: &str, fingerprint: &str) -> Response<Body> {
    match state.revoke_certificate(id, fingerprint).await {
        Ok(disconnected) => reply::json(
            StatusCode::OK,
            &RevokeCertificateResponse {
                device_id: id.to_string(),
                fingerprint: fingerprint.to_ascii_lowercase(),
                disconnected,
            },
        ),
        Err(PlatformError::NoDevice(_)) => no_device(id),
        Err(e @ PlatformError::NoCertificate(_)) => {
            reply::error(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
        }
        Err(e) => {
            warn!(cause = %e, "cannot revoke a certificate");
            reply::internal()
        }
    }
}

async fn protect(state: &State, id: &str, body: Incoming) -> Response<Body> {
    let request: ProtectionRequest = match reply::read_json(body, MAX_ADMIN_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    match state.set_protection(id, request.enabled).await {
        Ok(pushed) => reply::json(
            StatusCode::OK,
            &ProtectionResponse {
                device_id: id.to_string(),
                protected: request.enabled,
                pushed,
            },
        ),
        Err(PlatformError::NoDevice(_)) => no_device(id),
        Err(e) => {
            warn!(cause = %e, "cannot set the protection mode");
            reply::internal()
        }
    }
}

async fn rotate_snapshot_keys(state: &Arc<State>, body: Incoming) -> Response<Body> {
    let request: RotateSnapshotKeysRequest = match reply::read_json(body, MAX_ADMIN_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    match state.rotate_snapshot_keys(request.revoke_old).await {
        Ok(root) => reply::json(
            StatusCode::OK,
            &RotateSnapshotKeysResponse {
                root_version: root.version,
                root_key: root.root_key,
                snapshot_key: root.snapshot_keys.first().cloned().unwrap_or_default(),
                revoked: root.revoked,
                expires_at: root.expires_at,
            },
        ),
        Err(e) => {
            warn!(cause = %e, "cannot rotate the snapshot keys");
            reply::internal()
        }
    }
}

async fn create_user(state: &State, body: Incoming) -> Response<Body> {
    let request: CreateUserRequest = match reply::read_json(body, MAX_USER_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let created = state
        .add_user(
            &request.name,
            &request.team,
            request.role,
            &request.password,
        )
        .await;
    match created {
        Ok(info) => reply::json(StatusCode::OK, &info),
        Err(PlatformError::User(e)) => reply::error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        ),
        Err(e @ PlatformError::UserExists(_)) => {
            reply::error(StatusCode::CONFLICT, ErrorCode::BadRequest, e.to_string())
        }
        Err(e) => {
            warn!(cause = %e, "cannot create a user");
            reply::internal()
        }
    }
}

async fn list_users(state: &State) -> Response<Body> {
    match state.users().await {
        Ok(users) => reply::json(StatusCode::OK, &users),
        Err(e) => {
            warn!(cause = %e, "cannot list users");
            reply::internal()
        }
    }
}

async fn remove_user(state: &State, name: &str) -> Response<Body> {
    match state.remove_user(name).await {
        Ok(sessions_ended) => reply::json(
            StatusCode::OK,
            &RemoveUserResponse {
                name: name.to_string(),
                removed: true,
                sessions_ended,
            },
        ),
        Err(PlatformError::NoUser(_)) => reply::error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no user '{name}'; list users with `tether-platform user list`"),
        ),
        Err(e) => {
            warn!(cause = %e, "cannot remove a user");
            reply::internal()
        }
    }
}

async fn set_password(state: &State, name: &str, body: Incoming) -> Response<Body> {
    let request: SetPasswordRequest = match reply::read_json(body, MAX_USER_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    user_changed(name, state.set_password(name, &request.password).await)
}

async fn set_role(state: &State, name: &str, body: Incoming) -> Response<Body> {
    let request: SetRoleRequest = match reply::read_json(body, MAX_USER_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    user_changed(name, state.set_role(name, request.role).await)
}

fn user_changed(name: &str, result: Result<usize, PlatformError>) -> Response<Body> {
    match result {
        Ok(sessions_ended) => reply::json(
            StatusCode::OK,
            &UserChangeResponse {
                name: name.to_string(),
                sessions_ended,
            },
        ),
        Err(PlatformError::User(e)) => reply::error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.to_string(),
        ),
        Err(PlatformError::NoUser(_)) => reply::error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no user '{name}'; list users with `tether-platform user list`"),
        ),
        Err(e) => {
            warn!(cause = %e, "cannot change a user");
            reply::internal()
        }
    }
}

fn no_device(id: &str) -> Response<Body> {
    reply::error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("no device '{id}'; list devices with `tether-platform device list`"),
    )
}

/// Opens `tcp:<name>` on the device, then upgrades the HTTP connection and
/// copies bytes both ways until either side ends.
async fn connect(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
    device_id: &str,
    service: &str,
) -> Response<Body> {
    if !reply::wants_upgrade(req.headers(), TCP_UPGRADE) {
        return reply::error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("send `Connection: Upgrade` and `Upgrade: {TCP_UPGRADE}` to connect"),
        );
    }
    let mut stream = match state.open_tcp(device_id, service).await {
        Ok(stream) => stream,
        Err(e) => return connect_refused(device_id, e),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let span = info_span!("connect", %device_id, %service, peer = %conn.peer);
    tokio::spawn(
        async move {
            let _slot = conn;
            let mut client = match upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => return debug!(cause = %e, "the upgrade did not complete"),
            };
            crate::bridge::bridge(&mut client, &mut stream).await;
        }
        .instrument(span),
    );
    let mut response = reply::empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(TCP_UPGRADE));
    response
}

fn connect_refused(device_id: &str, error: ConnectError) -> Response<Body> {
    let message = error.to_string();
    match error {
        ConnectError::UnknownDevice(_) => no_device(device_id),
        ConnectError::DeviceOffline(_) => {
            reply::error(StatusCode::CONFLICT, ErrorCode::DeviceOffline, message)
        }
        ConnectError::BadService(_) => {
            reply::error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
        }
        ConnectError::Refused(_) | ConnectError::Timeout(_) | ConnectError::Open(_) => {
            reply::error(StatusCode::BAD_GATEWAY, ErrorCode::ServiceRefused, message)
        }
        ConnectError::Store(_) => reply::internal(),
    }
}
