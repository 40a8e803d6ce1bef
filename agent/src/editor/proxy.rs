//! One admitted editor stream: HTTP/1.1 served with hyper on the tunnel
//! stream, each request checked by the policy and proxied to the local
//! Node-RED, WebSocket upgrades spliced through.
//!
//! Requests are served while the grant could still verify (its expiry plus
//! the clock-skew allowance); then the stream closes once the answer in
//! progress is sent, and the platform opens a new one with a fresh grant.
//! Each proxied request gets its own connection to Node-RED. Measured on
//! loopback (debug build, 500 sequential `GET`s), a fresh connection costs
//! about 0.25 ms against about 1.3 ms for the whole request through the
//! tunnel; and a fresh connection can never be one that Node-RED closes
//! (its keep-alive timeout is 5 s) just as a deploy is sent on it, which
//! could not safely be retried. Bodies stream
//! both ways; only the answer to `POST /flows` (at most
//! [`MAX_DEPLOY_ANSWER`]) is read to record the new revision. This module
//! never decides what a role may do (`policy` does) and never logs a header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::header::HeaderValue;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tether_proto::grant::{CLOCK_SKEW_SECS, Grant, Role};
use tether_proto::tokio_io::TunnelStream;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info};

use super::policy::{self, Access, Route};
use super::{AuditEvent, Body, BoxError, Editor, EditorTarget, assets, compress, headers, reply};

/// Largest deploy answer read to find the new revision.
const MAX_DEPLOY_ANSWER: usize = 64 * 1024;
/// Both sides of a WebSocket must finish switching protocols within this.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest flow revision recorded.
const MAX_REV_LEN: usize = 128;

/// One admitted stream: who, as what, since when. Dropped when the stream
/// and any WebSocket it carried have ended, which records the session's
/// end.
struct Session {
    editor: Arc<Editor>,
    user: String,
    role: Role,
    /// Protection mode as the grant says: the stricter of this and the
    /// stored value applies.
    protected: bool,
    /// When the grant can no longer verify (expiry plus the clock-skew
    /// allowance): no request is served and no WebSocket lives beyond it.
    deadline: Instant,
    opened: Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.editor.audit.record(AuditEvent::EditorSessionClosed {
            user: std::mem::take(&mut self.user),
            role: self.role,
            duration: self.opened.elapsed(),
        });
    }
}

impl Session {
    fn refused(&self, reason: String, method: &Method, path: &str) {
        self.editor.audit.record(AuditEvent::Refused {
            user: Some(self.user.clone()),
            reason,
            method: method.to_string(),
            path: path.to_owned(),
        });
    }

    fn deployed(&self, rev: Option<String>) {
        self.editor.audit.record(AuditEvent::Deploy {
            user: self.user.clone(),
            rev,
        });
    }

    /// The `x-tether-token` value for this user with the permissions of
    /// their role under the current protection mode.
    fn token(&self, protection: bool) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(auth) = &self.editor.target.auth else {
            return Ok(None);
        };
        let token = auth.token(&self.user, policy::permissions(self.role, protection));
        HeaderValue::from_str(&token)
            .map(Some)
            .map_err(|_| UpstreamError::BadToken)
    }
}

/// Serves an admitted stream until it ends or its grant runs out.
pub(super) async fn session(
    editor: Arc<Editor>,
    stream: TunnelStream,
    grant: Grant,
    stream_id: u64,
    now: u64,
) {
    let (user, role, protected) = (grant.user, grant.role, grant.protected);
    editor.audit.record(AuditEvent::EditorSessionOpened {
        user: user.clone(),
        role,
        stream: stream_id,
    });
    let serve_for = (grant.expires_at + CLOCK_SKEW_SECS).saturating_sub(now);
    let deadline = Instant::now() + Duration::from_secs(serve_for);
    let session = Arc::new(Session {
        editor,
        user,
        role,
        protected,
        deadline,
        opened: Instant::now(),
    });
    let service = service_fn(move |req| {
        let session = session.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(session, req).await) }
    });
    let conn = super::server()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = tokio::time::sleep_until(deadline) => {
            debug!("the grant's lifetime is over: closing the stream after the answer in progress");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(cause = %e, "editor stream ended");
    }
}

/// Checks one request against the policy and proxies it.
async fn handle(session: Arc<Session>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The stricter of what the platform signed and what the control stream
    // last said: a lost or late control message never makes flows writable.
    let protection = session.editor.protection.enabled() || session.protected;
    let upgrade = headers::is_websocket_upgrade(req.headers());
    let gzip = compress::accepts_gzip(req.headers());
    if path == assets::MANIFEST_PATH && method == Method::GET {
        let manifest = manifest_answer(&session.editor).await;
        return session.editor.encoders.apply(gzip, &method, manifest);
    }
    if let Access::Deny(reason) = policy::decide(session.role, protection, &method, &path, upgrade)
    {
        session.refused(reason.clone(), &method, &path);
        return reply::forbidden(&reason, req.headers().get(http::header::ACCEPT));
    }
    let response = if upgrade {
        websocket(session, req, protection).await
    } else {
        let response = proxy(session.clone(), req, protection, &method, &path).await;
        session.editor.encoders.apply(gzip, &method, response)
    };
    debug!(%method, %path, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "editor request");
    response
}

/// The answer to [`assets::MANIFEST_PATH`], made by the agent itself: the
/// manifest, or 404 when there is none.
async fn manifest_answer(editor: &Editor) -> Response<Body> {
    match editor.manifest().await {
        Some(json) => {
            let mut response = Response::new(reply::full(json));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response.headers_mut().insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            response
        }
        None => reply::page(
            StatusCode::NOT_FOUND,
            "No asset manifest",
            "This device announces no editor files to cache.",
        ),
    }
}

/// Proxies a plain request; records a successful deploy.
async fn proxy(
    session: Arc<Session>,
    req: Request<Incoming>,
    protection: bool,
    method: &Method,
    path: &str,
) -> Response<Body> {
    let response = match forward(&session, req, protection).await {
        Ok(response) => response,
        Err(e) => return e.reply(&session.editor.target),
    };
    let deploy = policy::classify(method, path) == Route::Deploy;
    if !(deploy && response.status().is_success()) {
        return plain(response);
    }
    if is_full_deploy(method, path) {
        return full_deploy_answer(&session, response).await;
    }
    session.deployed(None);
    plain(response)
}

/// `POST /flows`, the editor's deploy button (Node-RED answers `{"rev"}`).
fn is_full_deploy(method: &Method, path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    *method == Method::POST && path.eq_ignore_ascii_case("/flows")
}

/// Reads the deploy answer (up to [`MAX_DEPLOY_ANSWER`]) for its `rev`,
/// records the deploy, and passes the answer on unchanged.
async fn full_deploy_answer(session: &Session, response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    headers::from_node_red(&mut parts.headers, false);
    let (body, rev) = match read_head(body, MAX_DEPLOY_ANSWER).await {
        Ok(Head::Complete(bytes)) => {
            let rev = revision(&bytes);
            (reply::full(bytes), rev)
        }
        Ok(Head::Partial(chunks, rest)) => (chained(chunks, rest), None),
        Err(e) => {
            session.deployed(None);
            let error = UpstreamError::Http(e);
            return error.reply(&session.editor.target);
        }
    };
    session.deployed(rev);
    Response::from_parts(parts, body)
}

/// The first bytes of a body: all of it, or the first `limit` and the rest.
enum Head {
    Complete(Bytes),
    Partial(Vec<Bytes>, Incoming),
}

async fn read_head(mut body: Incoming, limit: usize) -> Result<Head, hyper::Error> {
    let mut chunks = Vec::new();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers: Node-RED sends none, and they carry no rev
        };
        total += data.len();
        chunks.push(data);
        if total > limit {
            return Ok(Head::Partial(chunks, body));
        }
    }
    Ok(Head::Complete(chunks.concat().into()))
}

/// The chunks already read, then the rest of the body as it comes.
fn chained(chunks: Vec<Bytes>, rest: Incoming) -> Body {
    let read = futures_util::stream::iter(chunks.into_iter().map(|b| Ok(Frame::data(b))));
    let rest = TryStreamExt::map_err(BodyStream::new(rest), BoxError::from);
    BodyExt::boxed(StreamBody::new(read.chain(rest)))
}

/// The `rev` of a deploy answer, if it has a short one.
fn revision(answer: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let rev = value.get("rev")?.as_str()?;
    (rev.len() <= MAX_REV_LEN).then(|| rev.to_owned())
}

/// Proxies a WebSocket upgrade; after both `101`s the bytes are copied both
/// ways in a task of their own that keeps the session open, until either
/// side ends or the grant's lifetime is over.
async fn websocket(
    session: Arc<Session>,
    mut req: Request<Incoming>,
    protection: bool,
) -> Response<Body> {
    let from_platform = hyper::upgrade::on(&mut req);
    let mut response = match forward(&session, req, protection).await {
        Ok(response) => response,
        Err(e) => return e.reply(&session.editor.target),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return plain(response);
    }
    let from_node_red = hyper::upgrade::on(&mut response);
    tokio::spawn(splice(session, from_platform, from_node_red));
    let (mut parts, _) = response.into_parts();
    headers::from_node_red(&mut parts.headers, true);
    let mut switching = Response::new(reply::full(Bytes::new()));
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *switching.headers_mut() = parts.headers;
    switching
}

/// Copies WebSocket bytes between the platform and Node-RED until either
/// side ends.
async fn splice(session: Arc<Session>, platform: OnUpgrade, node_red: OnUpgrade) {
    let both = tokio::time::timeout(UPGRADE_TIMEOUT, async {
        tokio::try_join!(platform, node_red)
    })
    .await;
    let (platform, node_red) = match both {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return debug!(cause = %e, "WebSocket upgrade failed"),
        Err(_) => return debug!("WebSocket upgrade did not complete in time"),
    };
    let (mut platform, mut node_red) = (TokioIo::new(platform), TokioIo::new(node_red));
    // A WebSocket lives no longer than its grant: at the deadline both ends
    // are dropped; the editor reconnects through a fresh grant.
    let copy = tokio::io::copy_bidirectional(&mut platform, &mut node_red);
    match tokio::time::timeout_at(session.deadline, copy).await {
        Ok(Ok((to_node_red, to_platform))) => {
            debug!(user = %session.user, to_node_red, to_platform, "editor WebSocket closed")
        }
        Ok(Err(e)) => debug!(user = %session.user, cause = %e, "editor WebSocket ended"),
        Err(_) => {
            debug!(user = %session.user, "the grant's lifetime is over: editor WebSocket closed")
        }
    }
}

/// Node-RED's answer with its hop-by-hop headers removed, body streamed.
fn plain(response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    headers::from_node_red(&mut parts.headers, false);
    Response::from_parts(parts, BodyExt::boxed(body.map_err(BoxError::from)))
}

/// Rewrites the request for Node-RED and sends it within the timeout.
async fn forward(
    session: &Session,
    req: Request<Incoming>,
    protection: bool,
) -> Result<Response<Incoming>, UpstreamError> {
    let target = &session.editor.target;
    let req = to_node_red(req, target, session.token(protection)?)?;
    tokio::time::timeout(target.request_timeout, send(target.addr, req))
        .await
        .map_err(|_| UpstreamError::TimedOut(target.request_timeout))?
}

/// The request as Node-RED gets it: under `admin_root`, HTTP/1.1, headers
/// cleaned (`headers::to_node_red`), no server-side extensions.
fn to_node_red(
    req: Request<Incoming>,
    target: &EditorTarget,
    token: Option<HeaderValue>,
) -> Result<Request<Incoming>, UpstreamError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{}{path}", target.prefix())
        .parse::<Uri>()
        .map_err(|_| UpstreamError::BadPath)?;
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    headers::to_node_red(&mut parts.headers, &target.addr.to_string(), token);
    Ok(Request::from_parts(parts, body))
}

/// hyper's read buffer per connection to Node-RED. It also bounds the body
/// chunks handed to the stream's side, whose write buffer grows to hold one
/// chunk: with hyper's default (about 400 KiB) 50 editors loading at once
/// held 48 MiB in these two buffers (`docs/benchmarks.md`, "Editor").
const UPSTREAM_BUF: usize = 32 * 1024;

/// Sends one request on a new connection to Node-RED. The connection's task
/// is aborted if this future is dropped before the answer's headers arrive
/// (the timeout); after that it lives as long as the answer's body (or the
/// WebSocket) does.
async fn send(
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, UpstreamError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(UpstreamError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(UPSTREAM_BUF)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(UpstreamError::Http)?;
    let mut task = AbortOnDrop(Some(tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(cause = %e, "connection to Node-RED ended");
        }
    })));
    let response = sender
        .send_request(req)
        .await
        .map_err(UpstreamError::Http)?;
    task.0.take();
    Ok(response)
}

/// Aborts a task when dropped, unless taken out first.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Why a request did not get Node-RED's answer.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("the exchange failed: {0}")]
    Http(hyper::Error),
    #[error("no answer within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("the request path cannot be forwarded")]
    BadPath,
    #[error("the local editor token is not a valid header value")]
    BadToken,
}

impl UpstreamError {
    /// The page the engineer sees.
    fn reply(&self, target: &EditorTarget) -> Response<Body> {
        let addr = target.addr;
        let (status, message) = match self {
            UpstreamError::Connect(e) => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "The device's Node-RED is not reachable at {addr} ({e}). It may be stopped or still starting; try again in a moment."
                ),
            ),
            UpstreamError::Http(e) => (
                StatusCode::BAD_GATEWAY,
                format!("The device's Node-RED at {addr} broke off the exchange ({e})."),
            ),
            UpstreamError::TimedOut(t) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "The device's Node-RED at {addr} did not answer within {} s.",
                    t.as_secs()
                ),
            ),
            UpstreamError::BadPath => (StatusCode::BAD_REQUEST, self.to_string()),
            UpstreamError::BadToken => (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()),
        };
        info!(status = status.as_u16(), cause = %self, "editor request not proxied");
        reply::page(status, "Node-RED did not answer", &message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_post_flows_is_a_full_deploy() {
        assert!(is_full_deploy(&Method::POST, "/flows"));
        assert!(is_full_deploy(&Method::POST, "/Flows/"));
        assert!(!is_full_deploy(&Method::POST, "/flow"));
        assert!(!is_full_deploy(&Method::GET, "/flows"));
    }

    #[test]
    fn the_revision_is_read_from_the_deploy_answer() {
        assert_eq!(revision(br#"{"rev":"abc123"}"#), Some("abc123".into()));
        assert_eq!(revision(br#"{"id":"f1"}"#), None);
        assert_eq!(revision(b"not json"), None);
        let long = format!(r#"{{"rev":"{}"}}"#, "a".repeat(MAX_REV_LEN + 1));
        assert_eq!(revision(long.as_bytes()), None);
    }

    #[test]
    fn paths_go_under_the_admin_root() {
        let target = |root: &str| EditorTarget {
            admin_root: root.into(),
            ..EditorTarget::default()
        };
        for (root, want) in [
            ("/", "/settings?x=1"),
            ("", "/settings?x=1"),
            ("/admin/", "/admin/settings?x=1"),
            ("admin", "/admin/settings?x=1"),
        ] {
            let uri: Uri = format!("{}{}", target(root).prefix(), "/settings?x=1")
                .parse()
                .unwrap();
            assert_eq!(uri.to_string(), want, "{root}");
        }
    }
}
