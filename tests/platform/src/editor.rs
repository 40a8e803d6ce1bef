//! The editor proxy: each device's Node-RED editor, served from the
//! device's own origin `https://dev-<hex>.EDITOR_DOMAIN:PORT/`
//! ([`crate::origin`]) and carried to the device over `editor` streams of
//! its tunnel (`docs/protocol.md` §16).
//!
//! On the platform's origin, `GET /devices/{id}/editor/...` only checks the
//! session (none or stale: 303 to the login page), the device (unknown:
//! 404), the user's team (another team's device: 403) and revocation
//! (403), then hands the browser over to the device's origin with a
//! single-use code ([`crate::handoff`]). The platform's session cookie never
//! reaches a device origin.
//!
//! On a device origin, every request passes, in order: the fetch-metadata
//! and `Origin` rules ([`crate::origin::check_request`]: other origins may
//! only navigate here, never post, fetch or open a WebSocket); no service
//! worker script (`Service-Worker: script` is refused, so no page a device
//! serves can install one); the handoff path, or else the editor cookie,
//! bound to this device, its user and a platform session that is still
//! alive (none: a navigation goes back to the platform for a new handoff,
//! anything else gets 401); the device, team and revocation again; a live
//! tunnel (none: 503 at once). Then it opens an `editor` stream whose OPEN
//! header carries a fresh access grant (user, role, team, device, the
//! device's protection mode, five minutes, a 128-bit nonce) signed with the
//! platform's grant key, and speaks HTTP/1.1 to the device over it as a
//! client. One stream serves one browser connection for as long as its
//! grant has more than [`REUSE_MARGIN_SECS`] left; a WebSocket upgrade gets
//! a stream of its own, and after the device's `101` the bytes are copied
//! both ways untouched. Bodies stream both ways; nothing buffers a whole
//! body, except a file the asset cache fills ([`crate::editor_cache`]):
//! a `GET` of a path the device announced is answered from the cache, or
//! read whole (up to its announced size), checked and stored first. Every
//! stream counts against its platform session
//! ([`crate::sessions::LiveStreams`]), so logging out closes it.
//!
//! It owns what crosses to the device: the path and query as the browser
//! sent them, and the browser's headers minus `Cookie`, `Authorization`,
//! `Proxy-Authorization`, hop-by-hop headers and `X-Tether-*`; and what
//! comes back, which is data, never instructions to the browser: the
//! device's answer minus hop-by-hop headers, `Set-Cookie`,
//! `Service-Worker-Allowed`, `Clear-Site-Data`, `Refresh`, CORS grants, its
//! own Content-Security-Policy and any `Location` that leaves the origin;
//! plus the platform's [`DEVICE_CSP`], `X-Content-Type-Options: nosniff`
//! and a same-origin `Referrer-Policy`.
//!
//! It never forwards the platform's cookies or a browser's credentials to a
//! device, never logs headers, cookies, codes or grants, and never decides
//! what a role may do on the device: the device enforces that with the
//! grant.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self as client, SendRequest};
use hyper_util::rt::TokioIo;
use tether_proto::editor_headers::{accepts_gzip, strip_hop_by_hop, strip_request};
use tether_proto::grant::{GRANT_METADATA_KEY, Grant, MAX_LIFETIME_SECS};
use tether_proto::tokio_io::TunnelStream;
use tether_proto::{OpenError, Service, ServiceHeader};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::editor_cache::{self, Asset};
use crate::handoff::{self, Bound, HANDOFF_PATH, HandoffError};
use crate::html;
use crate::http::{self as reply, Body};
use crate::keys::{self, KeyError};
use crate::origin;
use crate::platform::{State, unix_now};
use crate::server::ConnInfo;
use crate::sessions::{self, LiveGuard, Session};
use crate::store::DeviceRecord;
use crate::tunnels::LiveTunnel;

/// A browser connection's stream is reused only while its grant has more
/// than this many seconds left; then a new one with a fresh grant is
/// opened.
pub const REUSE_MARGIN_SECS: u64 = 30;
/// Buffer per direction when copying a WebSocket's bytes.
const WEBSOCKET_BUFFER: usize = 16 * 1024;
/// Largest response head read from a device.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The editor stream a browser connection uses, kept between its requests.
#[derive(Debug, Default)]
pub struct Slot(Mutex<Option<Upstream>>);

impl Slot {
    fn take(&self) -> Option<Upstream> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn put(&self, upstream: Upstream) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(upstream);
    }
}

/// An open editor stream with an HTTP/1.1 client on it.
#[derive(Debug)]
struct Upstream {
    device_id: String,
    /// The tunnel's generation: a stream of an older tunnel is never reused.
    generation: u64,
    /// The session hash it was opened for.
    session: String,
    /// When its grant expires, Unix seconds.
    grant_expires_at: u64,
    sender: SendRequest<Body>,
    /// The client connection's task; aborted (closing the stream) when the
    /// upstream is dropped.
    _task: AbortOnDrop,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why an editor stream could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("device {0} is offline")]
    Offline(String),
    #[error("cannot open a stream to device {device}: {cause}")]
    Open { device: String, cause: OpenError },
    #[error("device {device} refused the editor stream: {reason}")]
    Refused { device: String, reason: String },
    #[error("device {device} did not accept the editor stream within {wait:?}")]
    AcceptTimeout { device: String, wait: Duration },
    #[error("device {device} did not answer within {wait:?}")]
    Timeout { device: String, wait: Duration },
    #[error("the editor connection to device {device} failed: {cause}")]
    Http { device: String, cause: hyper::Error },
    #[error(transparent)]
    Random(#[from] KeyError),
}

impl ProxyError {
    /// The page the browser gets.
    fn page(&self) -> Response<Body> {
        let text = self.to_string();
        match self {
            ProxyError::Offline(_) => {
                html::message(StatusCode::SERVICE_UNAVAILABLE, "Device offline", &text)
            }
            ProxyError::Open { .. } => {
                html::message(StatusCode::SERVICE_UNAVAILABLE, "Device unavailable", &text)
            }
            ProxyError::Refused { .. } | ProxyError::Http { .. } => {
                html::message(StatusCode::BAD_GATEWAY, "Editor unavailable", &text)
            }
            ProxyError::AcceptTimeout { .. } | ProxyError::Timeout { .. } => {
                html::message(StatusCode::GATEWAY_TIMEOUT, "Device did not answer", &text)
            }
            ProxyError::Random(_) => html::internal(),
        }
    }
}

/// The device id and the rest of an editor path on the platform's origin:
/// `("dev_1", "/x")` for `/devices/dev_1/editor/x`, `("dev_1", "")` for
/// `/devices/dev_1/editor`.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/devices/")?;
    let (id, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("editor")?;
    (rest.is_empty() || rest.starts_with('/')).then_some((id, rest))
}

/// `GET /devices/{id}/editor/...` on the platform's origin: checks who is
/// asking for which device, then sends the browser to the device's editor
/// origin with a handoff code.
pub async fn start(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let Some((device_id, rest)) = split_path(req.uri().path()) else {
        return reply::not_found();
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return html::message(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "The editor is served from the device's own address; this one only leads there.",
        );
    }
    if !tether_proto::api::is_device_id(device_id) {
        return crate::web::no_device(device_id);
    }
    let Some(domain) = state.config.editor_domain() else {
        return html::message(
            StatusCode::NOT_FOUND,
            "Editor access not configured",
            "This platform has no editor domain: start it with a DNS name as its first --name, or set --editor-domain.",
        );
    };
    let rest = if rest.is_empty() { "/" } else { rest };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let here = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let session = match sessions::current(&state, req.headers()).await {
        Ok(Some(session)) => session,
        Ok(None) => return html::see_other(&crate::web::login_location(&here)),
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read sessions");
            return html::internal();
        }
    };
    if let Err(page) = allowed_device(&state, &session, device_id).await {
        return page;
    }
    let bound = Bound {
        session: session.hash.clone(),
        user: session.user.name.clone(),
        device: device_id.to_string(),
        expires_at: session.expires_at,
    };
    let code = match state
        .handoffs
        .issue(bound, &format!("{rest}{query}"), unix_now())
    {
        Ok(code) => code,
        Err(HandoffError::Full) => {
            return html::message(
                StatusCode::SERVICE_UNAVAILABLE,
                "Busy",
                &HandoffError::Full.to_string(),
            );
        }
        Err(HandoffError::Random(e)) => {
            tracing::warn!(cause = %e, "cannot make a handoff code");
            return html::internal();
        }
    };
    let port = origin::request_host(req.headers()).and_then(|(_, port)| port);
    let target = origin::device_origin(&domain, device_id, port);
    debug!(user = %session.user.name, device = %device_id, "editor handoff");
    let mut response = html::see_other(&format!("{target}{HANDOFF_PATH}?code={}", code.expose()));
    if let Some(cookie) = sessions::refresh_cookie(req.headers(), &session) {
        response
            .headers_mut()
            .insert(http::header::SET_COOKIE, cookie);
    }
    response
}

/// The device record if `session`'s user may open its editor, else the
/// page to answer with (404, 403 for another team or a revoked device).
async fn allowed_device(
    state: &State,
    session: &Session,
    device_id: &str,
) -> Result<DeviceRecord, Response<Body>> {
    let id = device_id.to_string();
    let device = match state.store.blocking(move |s| s.device(&id)).await {
        Ok(Some(device)) => device,
        Ok(None) => return Err(crate::web::no_device(device_id)),
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read devices");
            return Err(html::internal());
        }
    };
    if device.team != session.user.team {
        return Err(html::message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("Device {device_id} belongs to another team than yours."),
        ));
    }
    if device.revoked {
        return Err(html::message(
            StatusCode::FORBIDDEN,
            "Device revoked",
            &format!("Device {device_id} was revoked by a fleet manager."),
        ));
    }
    Ok(device)
}

/// Handles one request to device `device_id`'s editor origin, and logs it
/// (method, path, status, user; never headers).
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
    device_id: String,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut user = None;
    let response = proxy(&state, &conn, req, &device_id, &mut user).await;
    debug!(
        %method,
        %path,
        device = %device_id,
        status = response.status().as_u16(),
        user = user.as_deref().unwrap_or("-"),
        "editor request"
    );
    response
}

async fn proxy(
    state: &Arc<State>,
    conn: &ConnInfo,
    req: Request<Incoming>,
    device_id: &str,
    user: &mut Option<String>,
) -> Response<Body> {
    let port = origin::request_host(req.headers()).and_then(|(_, port)| port);
    let Some(domain) = state.config.editor_domain() else {
        return reply::not_found();
    };
    let own = origin::device_origin(&domain, device_id, port);
    let websocket = reply::wants_upgrade(req.headers(), "websocket");
    if let Err(refused) = origin::check_request(req.headers(), req.method(), websocket, &own) {
        return html::message(StatusCode::FORBIDDEN, "Forbidden", refused.message());
    }
    if req
        .headers()
        .get("service-worker")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"script"))
    {
        return html::message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "A device's editor may not install a service worker.",
        );
    }
    let platform = origin::https_origin(state.config.public_host(), port);
    let now = unix_now();
    if req.uri().path() == HANDOFF_PATH {
        return take_handoff(state, &req, device_id, &platform, now);
    }
    // The device answers `/__tether/...` itself (the asset manifest is the
    // platform's to ask for): no browser reaches those paths.
    if req.uri().path().starts_with("/__tether/") {
        return reply::not_found();
    }
    let upstream_uri = match req
        .uri()
        .path_and_query()
        .map(|pq| Uri::try_from(pq.as_str()))
    {
        Some(Ok(uri)) => uri,
        _ => Uri::from_static("/"),
    };
    let safe = req.method() == Method::GET || req.method() == Method::HEAD;
    let back = || {
        if safe && !websocket {
            let here = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            html::see_other(&format!("{platform}/devices/{device_id}/editor{here}"))
        } else {
            html::message(
                StatusCode::UNAUTHORIZED,
                "Editor session ended",
                "Your editor session on this device ended; reload the page to open it again.",
            )
        }
    };
    let Some(bound) = state.editor_sessions.resolve(req.headers(), device_id, now) else {
        return back();
    };
    // Counted before the session is read: a logout that lands after the
    // read still finds this stream and closes it.
    let Some(guard) = state.live.register(&bound.session) else {
        return too_many_streams();
    };
    let session = match sessions::by_hash(state, bound.session.clone()).await {
        Ok(Some(session)) if session.user.name == bound.user => session,
        Ok(_) => {
            state.editor_sessions.end_session(&bound.session);
            return back();
        }
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read sessions");
            return html::internal();
        }
    };
    *user = Some(session.user.name.clone());
    let device = match allowed_device(state, &session, device_id).await {
        Ok(device) => device,
        Err(page) => return page,
    };
    let Some(live) = state
        .registry
        .get(device_id)
        .filter(|live| !live.tunnel.is_closed())
    else {
        return ProxyError::Offline(device_id.to_string()).page();
    };
    let target = Target {
        state,
        session: &session,
        device: &device,
        live: &live,
    };
    if websocket {
        websocket_proxy(target, req, upstream_uri, guard).await
    } else {
        http(target, conn, req, upstream_uri, guard).await
    }
}

/// `GET /__tether/handoff?code=...` on a device origin: spends the code
/// and sets the editor cookie, then goes where the engineer was going.
fn take_handoff(
    state: &State,
    req: &Request<Incoming>,
    device_id: &str,
    platform: &str,
    now: u64,
) -> Response<Body> {
    let code = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(key, _)| key == "code")
            .map(|(_, value)| value.into_owned())
    });
    let redeemed = (req.method() == Method::GET)
        .then_some(code)
        .flatten()
        .and_then(|code| state.handoffs.redeem(&code, device_id, now));
    let Some((bound, next)) = redeemed else {
        return html::page(
            StatusCode::FORBIDDEN,
            "Editor link expired",
            &format!(
                "<h1>Editor link expired</h1>\n<p>This link to the editor was used already or is too old. \
Open the editor again from <a href=\"{}/\">the device list</a>.</p>",
                html::escape(platform)
            ),
        );
    };
    let user = bound.user.clone();
    let value = match state.editor_sessions.start(bound, now) {
        Ok(value) => value,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot start an editor session");
            return html::message(StatusCode::SERVICE_UNAVAILABLE, "Busy", &e.to_string());
        }
    };
    let Some(cookie) = handoff::set_editor_cookie(&value) else {
        return html::internal();
    };
    debug!(%user, device = %device_id, "editor session started");
    let mut response = html::see_other(&next);
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

fn too_many_streams() -> Response<Body> {
    html::message(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many editor connections",
        "This session has too many editor connections open; close some tabs.",
    )
}

/// Who is asking for which device, over which tunnel.
#[derive(Clone, Copy)]
struct Target<'a> {
    state: &'a Arc<State>,
    session: &'a Session,
    device: &'a DeviceRecord,
    live: &'a LiveTunnel,
}

impl Target<'_> {
    /// Opens an editor stream with a fresh grant and waits until the device
    /// accepts it. Returns it with the grant's expiry.
    async fn open_stream(&self) -> Result<(TunnelStream, u64), ProxyError> {
        let device = &self.device.id;
        let now = unix_now();
        let grant = Grant {
            user: self.session.user.name.clone(),
            role: self.session.user.role,
            team: self.device.team.clone(),
            device: device.clone(),
            issued_at: now,
            expires_at: now
                + self
                    .state
                    .config
                    .grant_lifetime
                    .as_secs()
                    .min(MAX_LIFETIME_SECS),
            nonce: keys::random_hex(16)?,
            protected: self.device.protected,
        };
        let header = ServiceHeader::new(Service::Editor)
            .with(GRANT_METADATA_KEY, self.state.keys.sign_grant(&grant));
        let tunnel = &self.live.tunnel;
        let wait = self.state.config.open_timeout;
        let open = async {
            if tunnel.connected().await.is_err() {
                return Err(ProxyError::Offline(device.clone()));
            }
            let stream = tunnel.open(header).map_err(|cause| ProxyError::Open {
                device: device.clone(),
                cause,
            })?;
            match stream.accepted().await {
                Ok(()) => Ok(stream),
                Err(e) if tunnel.is_closed() => {
                    debug!(cause = %e, "the tunnel closed while opening an editor stream");
                    Err(ProxyError::Offline(device.clone()))
                }
                Err(e) => Err(ProxyError::Refused {
                    device: device.clone(),
                    reason: e.to_string(),
                }),
            }
        };
        let stream = tokio::time::timeout(wait, open).await.unwrap_or_else(|_| {
            Err(ProxyError::AcceptTimeout {
                device: device.clone(),
                wait,
            })
        })?;
        Ok((stream, grant.expires_at))
    }

    /// A new upstream: an editor stream, the HTTP/1.1 handshake, and the
    /// client connection's task, which ends when the session does.
    async fn open_upstream(&self, mut guard: LiveGuard) -> Result<Upstream, ProxyError> {
        let (stream, grant_expires_at) = self.open_stream().await?;
        let (sender, connection) = client_builder()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|cause| self.http_error(cause))?;
        let task = tokio::spawn(async move {
            tokio::select! {
                result = connection => if let Err(e) = result {
                    debug!(cause = %e, "editor stream ended with an error");
                },
                () = guard.ended() => debug!("session ended; editor stream closed"),
            }
        });
        Ok(Upstream {
            device_id: self.device.id.clone(),
            generation: self.live.generation,
            session: self.session.hash.clone(),
            grant_expires_at,
            sender,
            _task: AbortOnDrop(task),
        })
    }

    fn http_error(&self, cause: hyper::Error) -> ProxyError {
        ProxyError::Http {
            device: self.device.id.clone(),
            cause,
        }
    }

    fn timeout(&self) -> ProxyError {
        ProxyError::Timeout {
            device: self.device.id.clone(),
            wait: self.state.config.editor_timeout,
        }
    }
}

fn client_builder() -> client::Builder {
    let mut builder = client::Builder::new();
    builder.max_buf_size(MAX_RESPONSE_HEAD);
    builder
}

/// A plain HTTP request: from the asset cache when it is an announced
/// editor file, else on the browser connection's stream if it can still be
/// used, else on a new one.
async fn http(
    target: Target<'_>,
    conn: &ConnInfo,
    req: Request<Incoming>,
    uri: Uri,
    guard: LiveGuard,
) -> Response<Body> {
    let cacheable = req.method() == Method::GET
        && editor_cache::cacheable_path(uri.path())
        && !req.headers().contains_key(header::RANGE);
    if cacheable {
        cached(target, conn, req, uri, guard).await
    } else {
        proxied(target, conn, req, uri, Some(guard)).await
    }
}

/// Sends `request` on the browser connection's stream if it can still be
/// used, else on a new one (registered with `guard`, or a new guard); the
/// device's answer, or the page to answer the browser with.
async fn send(
    target: Target<'_>,
    conn: &ConnInfo,
    request: Request<Body>,
    guard: Option<LiveGuard>,
) -> Result<Response<Incoming>, Response<Body>> {
    let now = unix_now();
    let reusable = conn.editor.take().filter(|u| {
        u.device_id == target.device.id
            && u.generation == target.live.generation
            && u.session == target.session.hash
            && u.grant_expires_at > now + REUSE_MARGIN_SECS
            && !u.sender.is_closed()
    });
    let register = |guard: Option<LiveGuard>| {
        guard
            .or_else(|| target.state.live.register(&target.session.hash))
            .ok_or_else(too_many_streams)
    };
    let wait = target.state.config.editor_timeout;
    let (mut upstream, request) = match reusable {
        Some(mut upstream) => {
            drop(guard);
            // The previous answer on this connection is over, so this is
            // ready at once unless the device closed the stream.
            let sent = tokio::time::timeout(wait, upstream.sender.try_send_request(request)).await;
            match sent {
                Err(_) => return Err(target.timeout().page()),
                Ok(Ok(response)) => {
                    conn.editor.put(upstream);
                    return Ok(response);
                }
                Ok(Err(mut e)) => match e.take_message() {
                    // Never sent: the stream was closed in the meantime.
                    // Retry once on a new one.
                    Some(request) => {
                        debug!(cause = %e.error(), "editor stream closed; opening a new one");
                        let guard = register(None).map_err(|_| html::internal())?;
                        match target.open_upstream(guard).await {
                            Ok(fresh) => (fresh, request),
                            Err(e) => return Err(e.page()),
                        }
                    }
                    None => return Err(target.http_error(e.into_error()).page()),
                },
            }
        }
        None => match target.open_upstream(register(guard)?).await {
            Ok(fresh) => (fresh, request),
            Err(e) => return Err(e.page()),
        },
    };
    match tokio::time::timeout(wait, upstream.sender.send_request(request)).await {
        Ok(Ok(response)) => {
            conn.editor.put(upstream);
            Ok(response)
        }
        Ok(Err(e)) => Err(target.http_error(e).page()),
        // Dropping the upstream closes the stream: an HTTP/1.1 request
        // cannot be abandoned on its own.
        Err(_) => Err(target.timeout().page()),
    }
}

/// A `GET` of an editor file (`editor_cache`): from the cache when it holds
/// the file the device announced for this path; else fetched from the
/// device, checked and stored; else (no announcement, a mismatch, no fill
/// permit free in time) proxied as any request.
async fn cached(
    target: Target<'_>,
    conn: &ConnInfo,
    req: Request<Incoming>,
    uri: Uri,
    guard: LiveGuard,
) -> Response<Body> {
    let cache = &target.state.editor_cache;
    let gzip = accepts_gzip(req.headers());
    let host = req.headers().get(header::HOST).cloned();
    let mut guard = Some(guard);
    let cell = cache.manifest_cell(&target.device.id, target.live.generation);
    let manifest = cell
        .get_or_try_init(|| fetch_manifest(target, conn, host, guard.take()))
        .await
        .ok()
        .cloned()
        .flatten();
    let announced = manifest
        .as_ref()
        .and_then(|m| Some((m.version.as_str(), m.files.get(uri.path())?)));
    let Some((version, file)) = announced else {
        return proxied(target, conn, req, uri, guard).await;
    };
    if let Some(asset) = cache.get(version, &file.sha256) {
        return from_cache(&asset, req.headers(), gzip);
    }
    let Some(_permit) = cache.fill_permit().await else {
        return proxied(target, conn, req, uri, guard).await;
    };
    let request_headers = req.headers().clone();
    let mut request = upstream_request(req, uri.clone(), false);
    let headers = request.headers_mut();
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::ACCEPT_ENCODING,
    ] {
        headers.remove(name);
    }
    if gzip {
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let response = match send(target, conn, request, guard).await {
        Ok(response) => response,
        Err(page) => return page,
    };
    let encoding = response.headers().get(header::CONTENT_ENCODING).cloned();
    let gzipped = encoding.as_ref().is_some_and(|e| e == "gzip");
    let storable = response.status() == StatusCode::OK
        && !response.headers().contains_key(header::SET_COOKIE)
        && (encoding.is_none() || gzipped);
    if !storable {
        return downstream(response);
    }
    let (mut parts, body) = response.into_parts();
    let limit = if gzipped {
        editor_cache::gzip_limit(file.size)
    } else {
        usize::try_from(file.size).unwrap_or(usize::MAX)
    };
    let bytes = match editor_cache::read_body(body, limit).await {
        Ok(editor_cache::ReadBody::Whole(bytes)) => bytes,
        Ok(editor_cache::ReadBody::Over(chunks, rest)) => {
            mismatch(&target, uri.path());
            device_headers(&mut parts.headers);
            parts.extensions = http::Extensions::new();
            return Response::from_parts(parts, chained(chunks, rest));
        }
        Err(e) => return target.http_error(e).page(),
    };
    let (body, announced) = (bytes.clone(), file.clone());
    let verified =
        tokio::task::spawn_blocking(move || editor_cache::verify(&body, gzipped, &announced))
            .await
            .ok()
            .flatten();
    let Some(identity) = verified else {
        mismatch(&target, uri.path());
        device_headers(&mut parts.headers);
        parts.extensions = http::Extensions::new();
        return Response::from_parts(parts, reply::full(bytes));
    };
    let asset = cache.insert(
        version,
        Asset {
            sha256: file.sha256.clone(),
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            identity,
            gzip: gzipped.then_some(bytes),
        },
    );
    from_cache(&asset, &request_headers, gzip)
}

/// Proxies a request the cache does not answer.
async fn proxied(
    target: Target<'_>,
    conn: &ConnInfo,
    req: Request<Incoming>,
    uri: Uri,
    guard: Option<LiveGuard>,
) -> Response<Body> {
    let request = upstream_request(req, uri, false);
    match send(target, conn, request, guard).await {
        Ok(response) => downstream(response),
        Err(page) => page,
    }
}

fn mismatch(target: &Target<'_>, path: &str) {
    tracing::warn!(
        device = %target.device.id,
        %path,
        "the device's file does not match the hash it announced; not cached"
    );
}

/// Asks the device for its asset manifest. `Ok(None)` when it has none (or
/// an invalid one): nothing of this tunnel is cached; `Err` when it could
/// not be asked (tried again on the next request).
async fn fetch_manifest(
    target: Target<'_>,
    conn: &ConnInfo,
    host: Option<HeaderValue>,
    guard: Option<LiveGuard>,
) -> Result<Option<Arc<editor_cache::Manifest>>, ()> {
    let mut request = Request::new(reply::full(Vec::new()));
    *request.uri_mut() = Uri::from_static(editor_cache::MANIFEST_PATH);
    if let Some(host) = host {
        request.headers_mut().insert(header::HOST, host);
    }
    request
        .headers_mut()
        .insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    let response = send(target, conn, request, guard).await.map_err(|_| ())?;
    if response.status() != StatusCode::OK {
        debug!(device = %target.device.id, status = response.status().as_u16(), "the device announces no editor files");
        return Ok(None);
    }
    let gzipped = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| e == "gzip");
    let body = match editor_cache::read_body(response.into_body(), editor_cache::MAX_MANIFEST).await
    {
        Ok(editor_cache::ReadBody::Whole(body)) => body,
        Ok(editor_cache::ReadBody::Over(..)) | Err(_) => return Ok(None),
    };
    let json = if gzipped {
        let mut decoded = Vec::new();
        let decoder = flate2::read::GzDecoder::new(&body[..]);
        if std::io::Read::read_to_end(
            &mut std::io::Read::take(decoder, editor_cache::MAX_MANIFEST as u64 + 1),
            &mut decoded,
        )
        .is_err()
        {
            return Ok(None);
        }
        Bytes::from(decoded)
    } else {
        body
    };
    match editor_cache::Manifest::parse(&json) {
        Ok(manifest) => {
            debug!(device = %target.device.id, version = %manifest.version, files = manifest.files.len(), "editor asset manifest");
            Ok(Some(Arc::new(manifest)))
        }
        Err(e) => {
            tracing::warn!(device = %target.device.id, cause = %e, "the device's editor asset manifest is refused; nothing of it is cached");
            Ok(None)
        }
    }
}

/// A stored editor file as the browser gets it: the gzip form when it
/// accepts it, `ETag` and `Cache-Control: no-cache`, 304 for a matching
/// `If-None-Match`; the device headers' policy on top.
fn from_cache(asset: &Asset, request: &HeaderMap, gzip: bool) -> Response<Body> {
    let mut response = if asset.not_modified(request) {
        let mut response = Response::new(reply::full(Vec::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let (body, encoded) = match (&asset.gzip, gzip) {
            (Some(gz), true) => (gz.clone(), true),
            _ => (asset.identity.clone(), false),
        };
        let mut response = Response::new(reply::full(body));
        if encoded {
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        if let Some(content_type) = &asset.content_type {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type.clone());
        }
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, asset.etag());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if asset.gzip.is_some() {
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    device_headers(headers);
    response
}

/// The chunks already read, then the rest of the body as it comes.
fn chained(chunks: Vec<Bytes>, rest: Incoming) -> Body {
    use futures_util::StreamExt;
    let read =
        futures_util::stream::iter(chunks.into_iter().map(|b| Ok(hyper::body::Frame::data(b))));
    let rest = http_body_util::BodyStream::new(rest);
    BodyExt::boxed(http_body_util::StreamBody::new(read.chain(rest)))
}

/// A WebSocket: a stream of its own, the upgrade forwarded, and after the
/// device's 101 the bytes copied both ways until either side ends or the
/// session does.
async fn websocket_proxy(
    target: Target<'_>,
    mut req: Request<Incoming>,
    uri: Uri,
    guard: LiveGuard,
) -> Response<Body> {
    let (stream, _) = match target.open_stream().await {
        Ok(opened) => opened,
        Err(e) => return e.page(),
    };
    let (mut sender, connection) = match client_builder().handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return target.http_error(e).page(),
    };
    let mut ended = guard.signal();
    tokio::spawn(async move {
        tokio::select! {
            result = connection.with_upgrades() => if let Err(e) = result {
                debug!(cause = %e, "editor WebSocket stream ended with an error");
            },
            () = ended.wait() => debug!("session ended; editor WebSocket closed"),
        }
    });
    let browser = hyper::upgrade::on(&mut req);
    let request = upstream_request(req, uri, true);
    let wait = target.state.config.editor_timeout;
    let mut response = match tokio::time::timeout(wait, sender.send_request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return target.http_error(e).page(),
        Err(_) => return target.timeout().page(),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return downstream(response);
    }
    let device_side = hyper::upgrade::on(&mut response);
    let upgrade = response.headers().get(header::UPGRADE).cloned();
    tokio::spawn(async move {
        let mut guard = guard;
        let both = async { tokio::try_join!(browser, device_side) };
        let (browser, device) = tokio::select! {
            both = both => match both {
                Ok(pair) => pair,
                Err(e) => return debug!(cause = %e, "the WebSocket upgrade did not complete"),
            },
            () = guard.ended() => return,
        };
        let (mut browser, mut device) = (TokioIo::new(browser), TokioIo::new(device));
        let copy = tokio::io::copy_bidirectional_with_sizes(
            &mut browser,
            &mut device,
            WEBSOCKET_BUFFER,
            WEBSOCKET_BUFFER,
        );
        tokio::select! {
            result = copy => match result {
                Ok((up, down)) => debug!(to_device = up, from_device = down, "editor WebSocket closed"),
                Err(e) => debug!(cause = %e, "editor WebSocket ended with an error"),
            },
            () = guard.ended() => debug!("session ended; editor WebSocket closed"),
        }
    });
    let (mut parts, _) = response.into_parts();
    device_headers(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(upgrade) = upgrade {
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    parts.extensions = http::Extensions::new();
    Response::from_parts(parts, reply::full(Vec::new()))
}

/// The request as the device gets it: the editor's own path, the
/// browser's headers minus what never crosses, and the body streamed.
fn upstream_request(req: Request<Incoming>, uri: Uri, websocket: bool) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    let host = parts.headers.get(header::HOST).cloned();
    strip_request(&mut parts.headers);
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    if websocket && let Some(upgrade) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    Request::from_parts(parts, body.boxed())
}

/// The device's answer as the browser gets it: the body streamed, the
/// headers through [`device_headers`].
fn downstream(response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    device_headers(&mut parts.headers);
    parts.extensions = http::Extensions::new();
    Response::from_parts(parts, body.boxed())
}

/// The Content-Security-Policy of every answer from a device: scripts and
/// styles as Node-RED's editor needs them (inline, and eval for the node
/// editors), but nothing fetched, posted, framed or connected to outside
/// the device's own origin.
pub const DEVICE_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; \
style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; \
worker-src 'self' blob:; frame-src 'self'; frame-ancestors 'self'; form-action 'self'; base-uri 'self'; \
object-src 'none'";

/// Headers a device's answer may not carry to the browser: they would set
/// state in it or tell it what to trust.
const DROPPED_FROM_DEVICE: &[&str] = &[
    "set-cookie",
    "service-worker-allowed",
    "clear-site-data",
    "refresh",
    "content-security-policy",
    "content-security-policy-report-only",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-expose-headers",
    "access-control-allow-private-network",
    "cross-origin-embedder-policy",
    "cross-origin-opener-policy",
    "cross-origin-resource-policy",
    "permissions-policy",
    "strict-transport-security",
    "alt-svc",
    "origin-agent-cluster",
    "nel",
    "report-to",
    "reporting-endpoints",
    "x-frame-options",
    "referrer-policy",
    "x-content-type-options",
    "link",
];

/// What a device's answer keeps: no hop-by-hop headers, nothing from
/// `DROPPED_FROM_DEVICE`, a `Location` only if it is a path on the same
/// origin; and the platform's own policy headers.
pub fn device_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in DROPPED_FROM_DEVICE {
        headers.remove(*name);
    }
    let local = headers
        .get(header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|location| handoff::local_path(location).is_some());
    if !local {
        headers.remove(header::LOCATION);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(DEVICE_CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_paths_split_into_device_and_rest() {
        assert_eq!(
            split_path("/devices/dev_1/editor/x/y"),
            Some(("dev_1", "/x/y"))
        );
        assert_eq!(split_path("/devices/dev_1/editor/"), Some(("dev_1", "/")));
        assert_eq!(split_path("/devices/dev_1/editor"), Some(("dev_1", "")));
        assert_eq!(split_path("/devices/dev_1/editorx"), None);
        assert_eq!(split_path("/devices/dev_1/protection"), None);
        assert_eq!(split_path("/devices/dev_1"), None);
    }

    #[test]
    fn a_devices_answer_keeps_no_instruction_to_the_browser() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("set-cookie", "__Host-tether_session=x; Path=/; Secure"),
            ("service-worker-allowed", "/"),
            ("clear-site-data", "\"*\""),
            ("refresh", "0; url=https://evil.example/"),
            ("content-security-policy", "default-src *"),
            ("access-control-allow-origin", "https://localhost"),
            ("access-control-allow-credentials", "true"),
            ("connection", "close"),
            ("content-type", "text/html"),
            ("x-node-red", "kept"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        headers.insert(
            header::LOCATION,
            HeaderValue::from_static("//evil.example/"),
        );
        device_headers(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "content-security-policy",
                "content-type",
                "cross-origin-resource-policy",
                "referrer-policy",
                "x-content-type-options",
                "x-node-red",
            ]
        );
        assert_eq!(headers[header::CONTENT_SECURITY_POLICY], DEVICE_CSP);
        for (location, kept) in [
            ("/red/main.js", true),
            ("https://evil.example/", false),
            ("//evil.example", false),
            ("/\\evil.example", false),
            ("flows", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::LOCATION, HeaderValue::from_str(location).unwrap());
            device_headers(&mut headers);
            assert_eq!(headers.contains_key(header::LOCATION), kept, "{location}");
        }
    }
}
