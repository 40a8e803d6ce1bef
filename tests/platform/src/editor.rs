//! The editor proxy: `https://PLATFORM/devices/{id}/editor/...` carried to
//! the device's Node-RED editor over `editor` streams of its tunnel
//! (`docs/protocol.md` §16).
//!
//! For each request this module checks, in order: the path (a device id,
//! then `/editor` alone is redirected to `/editor/`), the session cookie
//! (none or stale: 303 to the login page), the device (unknown: 404), the
//! user's team (another team's device: 403), revocation (403), a live tunnel
//! (none: 503 at once). Then it opens an `editor` stream whose OPEN header
//! carries a fresh access grant (user, role, team, device, five minutes,
//! a 128-bit nonce) signed with the platform's grant key, and speaks
//! HTTP/1.1 to the device over it as a client. One stream serves one browser
//! connection for as long as its grant has more than [`REUSE_MARGIN_SECS`]
//! left; a WebSocket upgrade gets a stream of its own, and after the
//! device's `101` the bytes are copied both ways untouched. Bodies stream
//! both ways; nothing buffers a whole body. Every stream counts against its
//! session ([`crate::sessions::LiveStreams`]), so logging out closes it.
//!
//! It owns what crosses to the device: the path without the
//! `/devices/{id}/editor` prefix (the query kept) and the browser's headers
//! minus `Cookie`, `Authorization`, `Proxy-Authorization`, hop-by-hop
//! headers and `X-Tether-*`; and what comes back: the device's answer minus
//! hop-by-hop headers and `Set-Cookie` (a device must not set cookies on the
//! platform's origin), with a local `Location` put back under the prefix.
//!
//! It never forwards the platform's cookies or a browser's credentials to a
//! device, never logs headers, cookies or grants, and never decides what a
//! role may do on the device: the device enforces that with the grant.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::header;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self as client, SendRequest};
use hyper_util::rt::TokioIo;
use tether_proto::editor_headers::{strip_hop_by_hop, strip_request};
use tether_proto::grant::{GRANT_METADATA_KEY, Grant, MAX_LIFETIME_SECS};
use tether_proto::tokio_io::TunnelStream;
use tether_proto::{OpenError, Service, ServiceHeader};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::html;
use crate::http::{self as reply, Body};
use crate::keys::{self, KeyError};
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

/// The device id and the rest of an editor path: `("dev_1", "/x")` for
/// `/devices/dev_1/editor/x`, `("dev_1", "")` for `/devices/dev_1/editor`.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/devices/")?;
    let (id, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("editor")?;
    (rest.is_empty() || rest.starts_with('/')).then_some((id, rest))
}

/// Handles one request under `/devices/{id}/editor`, and logs it (method,
/// path, status, user; never headers).
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut user = None;
    let response = proxy(&state, &conn, req, &mut user).await;
    debug!(
        %method,
        %path,
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
    user: &mut Option<String>,
) -> Response<Body> {
    let Some((device_id, rest)) = split_path(req.uri().path()) else {
        return reply::not_found();
    };
    if !tether_proto::api::is_device_id(device_id) {
        return crate::web::no_device(device_id);
    }
    let device_id = device_id.to_string();
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    if rest.is_empty() {
        let location = format!("/devices/{device_id}/editor/{query}");
        return html::redirect(StatusCode::PERMANENT_REDIRECT, &location);
    }
    let upstream_uri = match Uri::try_from(format!("{rest}{query}")) {
        Ok(uri) => uri,
        Err(_) => {
            return html::message(StatusCode::BAD_REQUEST, "Bad request", "Invalid path.");
        }
    };
    let here = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let to_login = || html::see_other(&crate::web::login_location(&here));
    let Some(hash) = sessions::cookie_hash(req.headers()) else {
        return to_login();
    };
    // Counted before the session is read: a logout that lands after the
    // read still finds this stream and closes it.
    let Some(guard) = state.live.register(&hash) else {
        return too_many_streams();
    };
    let session = match sessions::by_hash(state, hash).await {
        Ok(Some(session)) => session,
        Ok(None) => return to_login(),
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read sessions");
            return html::internal();
        }
    };
    *user = Some(session.user.name.clone());
    let id = device_id.clone();
    let device = match state.store.blocking(move |s| s.device(&id)).await {
        Ok(Some(device)) => device,
        Ok(None) => return crate::web::no_device(&device_id),
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read devices");
            return html::internal();
        }
    };
    if device.team != session.user.team {
        return html::message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("Device {device_id} belongs to another team than yours."),
        );
    }
    if device.revoked {
        return html::message(
            StatusCode::FORBIDDEN,
            "Device revoked",
            &format!("Device {device_id} was revoked by a fleet manager."),
        );
    }
    let Some(live) = state
        .registry
        .get(&device_id)
        .filter(|live| !live.tunnel.is_closed())
    else {
        return ProxyError::Offline(device_id).page();
    };
    let target = Target {
        state,
        session: &session,
        device: &device,
        live: &live,
    };
    if reply::wants_upgrade(req.headers(), "websocket") {
        websocket(target, req, upstream_uri, guard).await
    } else {
        http(target, conn, req, upstream_uri, guard).await
    }
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
            expires_at: now + MAX_LIFETIME_SECS,
            nonce: keys::random_hex(16)?,
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

/// A plain HTTP request: on the browser connection's stream if it can
/// still be used, else on a new one.
async fn http(
    target: Target<'_>,
    conn: &ConnInfo,
    req: Request<Incoming>,
    uri: Uri,
    guard: LiveGuard,
) -> Response<Body> {
    let now = unix_now();
    let reusable = conn.editor.take().filter(|u| {
        u.device_id == target.device.id
            && u.generation == target.live.generation
            && u.session == target.session.hash
            && u.grant_expires_at > now + REUSE_MARGIN_SECS
            && !u.sender.is_closed()
    });
    let request = upstream_request(req, uri, false);
    let wait = target.state.config.editor_timeout;
    let (mut upstream, request) = match reusable {
        Some(mut upstream) => {
            drop(guard);
            // The previous answer on this connection is over, so this is
            // ready at once unless the device closed the stream.
            let sent = tokio::time::timeout(wait, upstream.sender.try_send_request(request)).await;
            match sent {
                Err(_) => return target.timeout().page(),
                Ok(Ok(response)) => {
                    conn.editor.put(upstream);
                    return downstream(response, &target.device.id);
                }
                Ok(Err(mut e)) => match e.take_message() {
                    // Never sent: the stream was closed in the meantime.
                    // Retry once on a new one.
                    Some(request) => {
                        debug!(cause = %e.error(), "editor stream closed; opening a new one");
                        let Some(guard) = target.state.live.register(&target.session.hash) else {
                            return html::internal();
                        };
                        match target.open_upstream(guard).await {
                            Ok(fresh) => (fresh, request),
                            Err(e) => return e.page(),
                        }
                    }
                    None => return target.http_error(e.into_error()).page(),
                },
            }
        }
        None => match target.open_upstream(guard).await {
            Ok(fresh) => (fresh, request),
            Err(e) => return e.page(),
        },
    };
    match tokio::time::timeout(wait, upstream.sender.send_request(request)).await {
        Ok(Ok(response)) => {
            conn.editor.put(upstream);
            downstream(response, &target.device.id)
        }
        Ok(Err(e)) => target.http_error(e).page(),
        // Dropping the upstream closes the stream: an HTTP/1.1 request
        // cannot be abandoned on its own.
        Err(_) => target.timeout().page(),
    }
}

/// A WebSocket: a stream of its own, the upgrade forwarded, and after the
/// device's 101 the bytes copied both ways until either side ends or the
/// session does.
async fn websocket(
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
        return downstream(response, &target.device.id);
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
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::SET_COOKIE);
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

/// The device's answer as the browser gets it: the body streamed, without
/// hop-by-hop headers or `Set-Cookie`, a local `Location` under the prefix.
fn downstream(response: Response<Incoming>, device_id: &str) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::SET_COOKIE);
    let location = parts
        .headers
        .get(header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .filter(|location| location.starts_with('/') && !location.starts_with("//"))
        .and_then(|location| {
            HeaderValue::from_str(&format!("/devices/{device_id}/editor{location}")).ok()
        });
    if let Some(location) = location {
        parts.headers.insert(header::LOCATION, location);
    }
    parts.extensions = http::Extensions::new();
    Response::from_parts(parts, body.boxed())
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
}
