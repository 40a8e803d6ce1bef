//! Remote editor access: the `editor` streams the platform opens, one per
//! browser connection, each carrying one engineer's signed access grant
//! (`docs/protocol.md` §16).
//!
//! For every stream the agent checks the grant ([`grant`]), then serves
//! HTTP/1.1 on it with hyper and proxies each request the engineer's role
//! allows ([`policy`]) to the local Node-RED at [`EditorTarget`], the
//! `/comms` WebSocket included (`proxy`). Sessions, deploys and refusals
//! are recorded ([`crate::audit`]); instance protection mode ([`protection`])
//! makes the flows read-only for everyone.
//!
//! This module owns everything between an accepted `editor` stream and the
//! local Node-RED. It never lets a byte of a request reach Node-RED before
//! the stream's grant verified and the request's route is allowed for the
//! role; compresses answers the browser accepts gzip for ([`compress`]);
//! never forwards the browser's or the platform's credentials
//! (`Authorization`, `Cookie`) or any `X-Tether-*` header it did not set
//! itself; never logs a grant, a token, a cookie or an `Authorization`
//! header; and never buffers a whole body, except Node-RED's small answer
//! to a deploy (at most 64 KiB) to record the new flow revision. Starting,
//! configuring and locking down Node-RED belong to the `node_red` module,
//! which plugs in through [`TokenSource`].

pub mod assets;
pub mod compress;
pub mod grant;
pub mod headers;
pub mod keys;
pub mod policy;
pub mod protection;
mod proxy;
mod reply;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tether_proto::ServiceHeader;
use tether_proto::grant::ReplayGuard;
use tether_proto::tokio_io::TunnelStream;
use tracing::debug;

pub use crate::audit::{Audit, AuditEvent};
pub use grant::{Device, REPLAY_CAPACITY, Refusal};
pub use keys::TrustedKeys;
pub use policy::{Access, Route, decide, permissions};
pub use protection::Protection;

use crate::clock::Clock;

/// Where Node-RED answers unless told otherwise.
pub const DEFAULT_NODE_RED: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    1880,
));
/// How long Node-RED has to answer a request (its headers) by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle stream, or one whose next request's headers take longer than
/// this, is closed; the platform opens a new one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// A refused stream waits this long for the request to answer with 403.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer per stream, which bounds a request's headers.
const MAX_BUF: usize = 64 * 1024;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer on an editor stream.
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// Mints the local token Node-RED accepts (`docs/protocol.md` §16.4) for a
/// user with a list of Node-RED permissions (`["*"]`, `["read"]` or a list
/// like `["read", "flows.write"]`, see [`permissions`]). Sent in the
/// `x-tether-token` header of every proxied request. Any
/// `Fn(&str, &[&str]) -> String` is one.
pub trait TokenSource: Send + Sync {
    fn token(&self, user: &str, permissions: &[&str]) -> String;
}

impl<F> TokenSource for F
where
    F: Fn(&str, &[&str]) -> String + Send + Sync,
{
    fn token(&self, user: &str, permissions: &[&str]) -> String {
        self(user, permissions)
    }
}

/// The local Node-RED the editor streams reach.
#[derive(Clone)]
pub struct EditorTarget {
    /// Where Node-RED listens, on this host.
    pub addr: SocketAddr,
    /// Node-RED's `httpAdminRoot`: the platform's paths are served under it.
    pub admin_root: String,
    /// The token minter of a locked-down Node-RED; `None` sends no token
    /// (a Node-RED without `adminAuth`, as in tests).
    pub auth: Option<Arc<dyn TokenSource>>,
    /// Time for Node-RED to answer a request (its headers): beyond it, 504.
    pub request_timeout: Duration,
    /// The editor client's public folder, whose manifest the platform's
    /// asset cache asks for ([`assets`]); `None` announces nothing.
    pub assets: Option<std::path::PathBuf>,
}

impl Default for EditorTarget {
    fn default() -> Self {
        EditorTarget {
            addr: DEFAULT_NODE_RED,
            admin_root: "/".into(),
            auth: None,
            request_timeout: REQUEST_TIMEOUT,
            assets: None,
        }
    }
}

impl std::fmt::Debug for EditorTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EditorTarget")
            .field("addr", &self.addr)
            .field("admin_root", &self.admin_root)
            .field("auth", &self.auth.as_ref().map(|_| "token source"))
            .field("request_timeout", &self.request_timeout)
            .field("assets", &self.assets)
            .finish()
    }
}

impl EditorTarget {
    /// The path prefix for Node-RED: `admin_root` with one leading `/` and
    /// none trailing (empty for `/`).
    fn prefix(&self) -> String {
        match self.admin_root.trim_matches('/') {
            "" => String::new(),
            root => format!("/{root}"),
        }
    }
}

/// The editor's state for the agent's life: the target, the replay guard,
/// protection mode and the audit sink.
pub struct Editor {
    target: EditorTarget,
    guard: Mutex<ReplayGuard>,
    protection: Protection,
    audit: Arc<dyn Audit>,
    clock: Clock,
    /// The gzip encoders every stream's answers share.
    encoders: compress::Encoders,
    /// The asset manifest as JSON, made on the first request for it; `None`
    /// inside when there is none to give.
    manifest: tokio::sync::OnceCell<Option<Bytes>>,
}

impl std::fmt::Debug for Editor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Editor")
            .field("target", &self.target)
            .field("protection", &self.protection.enabled())
            .finish_non_exhaustive()
    }
}

impl Editor {
    pub fn new(
        target: EditorTarget,
        protection: Protection,
        audit: Arc<dyn Audit>,
        clock: Clock,
    ) -> Editor {
        Editor {
            target,
            guard: Mutex::new(ReplayGuard::new(REPLAY_CAPACITY)),
            protection,
            audit,
            clock,
            encoders: compress::Encoders::default(),
            manifest: tokio::sync::OnceCell::new(),
        }
    }

    /// The asset manifest ([`assets`]) as JSON, made once on the blocking
    /// pool; `None` without a public folder or when it cannot be read.
    pub(crate) async fn manifest(&self) -> Option<Bytes> {
        self.manifest
            .get_or_init(|| async {
                let dir = self.target.assets.clone()?;
                let made = tokio::task::spawn_blocking(move || assets::manifest(&dir)).await;
                match made {
                    Ok(Ok(manifest)) => {
                        debug!(files = manifest.files.len(), version = %manifest.version, "editor asset manifest made");
                        serde_json::to_vec(&manifest).ok().map(Bytes::from)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(cause = %e, "no editor asset manifest; the platform will not cache the editor's files");
                        None
                    }
                    Err(_) => None,
                }
            })
            .await
            .clone()
    }

    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    pub fn target(&self) -> &EditorTarget {
        &self.target
    }

    /// Serves one accepted `editor` stream until it ends: the grant in
    /// `header` is checked for `device`; a refused one is answered with a
    /// page (403, or 503 when the replay guard is full) and the stream
    /// closed; an admitted one is proxied to Node-RED.
    pub async fn serve(
        self: Arc<Self>,
        stream: TunnelStream,
        header: &ServiceHeader,
        device: &Device,
    ) {
        let id = u64::from(stream.id().0);
        let now = self.clock.now_unix();
        match grant::admit(header, device, &self.guard, now) {
            Ok(grant) => proxy::session(self, stream, grant, id, now).await,
            Err(refusal) => self.refuse(stream, refusal).await,
        }
    }

    /// Answers the stream's first request with the refusal page, closes it
    /// and records the refusal (with that request's method and path).
    async fn refuse(&self, stream: TunnelStream, refusal: Refusal) {
        let seen: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let slot = seen.clone();
        let status = refusal.status();
        let message = refusal.to_string();
        let service = service_fn(move |req: Request<Incoming>| {
            let first = (req.method().to_string(), req.uri().path().to_owned());
            slot.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert(first);
            let page = reply::page(status, "Editor access refused", &message);
            std::future::ready(Ok::<_, Infallible>(page))
        });
        let served = http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(REFUSAL_READ_TIMEOUT)
            .max_buf_size(MAX_BUF)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(e) = served {
            debug!(cause = %e, "refused editor stream ended");
        }
        let (method, path) = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        self.audit.record(AuditEvent::Refused {
            user: refusal.user().map(str::to_owned),
            reason: refusal.to_string(),
            method,
            path,
        });
    }
}

/// The HTTP server settings of an admitted editor stream.
fn server() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF);
    builder
}
