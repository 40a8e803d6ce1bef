//! The HTTPS listener: TCP accept, TLS with optional client certificates,
//! HTTP/1.1 with hyper, and routing to the endpoints: devices (`/v1/enroll`,
//! `/v1/tunnel`), fleet managers (`/v1/admin/`) and people in a browser
//! (`/`, `/login`, `/logout`, `/devices/...`); a request whose `Host` is a
//! device's editor origin (`crate::origin`) goes to that editor, whatever
//! its path.
//!
//! This module owns the connection-level limits a fleet needs: a bound on
//! concurrent connections (a semaphore permit per connection, held by a
//! tunnel for its whole life), a bound on the TLS handshake and on reading
//! request headers (a silent client cannot hold a slot), and a bounded
//! header buffer. It never looks inside a request beyond its method, path
//! and `Host`, and never logs headers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use tether_proto::api::{ENROLL_PATH, TUNNEL_PATH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, debug_span, warn};

use crate::ca::{Ca, ServerIdentity};
use crate::http::{self as reply, Body};
use crate::keys;
use crate::platform::State;

/// Largest buffer hyper uses to read a request's headers.
const MAX_HEADER_BUFFER: usize = 16 * 1024;

/// What the handlers know about the connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// SHA-256 (hex) of the client certificate, if the client sent one. rustls
    /// has checked that it chains to the platform CA and is within its
    /// validity.
    pub fingerprint: Option<String>,
    /// The editor stream this connection's editor requests reuse.
    pub editor: crate::editor::Slot,
    /// The connection's slot; released when the last holder (the
    /// connection, or a tunnel or connect session it became) drops it.
    _permit: OwnedSemaphorePermit,
}

/// The rustls configuration: the server certificate, and client
/// certificates optional but, when sent, required to chain to the CA.
pub fn tls_acceptor(ca: &Ca, identity: ServerIdentity) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until `shutdown` turns true.
pub async fn accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(state.config.max_connections));
    loop {
        let (tcp, peer) = tokio::select! {
            () = stopped(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%peer, limit = state.config.max_connections, "connection limit reached; dropping the connection");
            continue;
        };
        let task = serve_connection(
            state.clone(),
            tcp,
            peer,
            acceptor.clone(),
            permit,
            shutdown.clone(),
        );
        tokio::spawn(task.instrument(debug_span!("conn", %peer)));
    }
}

async fn serve_connection(
    state: Arc<State>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    permit: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    tether_proto::tokio_io::tune_socket(&tcp);
    let tls = match tokio::time::timeout(state.config.handshake_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return debug!(cause = %e, "TLS handshake failed"),
        Err(_) => return debug!("TLS handshake timed out"),
    };
    let fingerprint = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| keys::sha256_hex(cert));
    let conn = Arc::new(ConnInfo {
        peer,
        fingerprint,
        editor: crate::editor::Slot::default(),
        _permit: permit,
    });
    let service = {
        let (state, conn) = (state.clone(), conn.clone());
        service_fn(move |req| {
            let (state, conn) = (state.clone(), conn.clone());
            async move { Ok::<_, Infallible>(route(state, conn, req).await) }
        })
    };
    drop(conn);
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.handshake_timeout)
        .max_buf_size(MAX_HEADER_BUFFER)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result { debug!(cause = %e, "connection ended with an error") }
        }
        () = stopped(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            let grace = state.config.shutdown_grace;
            let _ = tokio::time::timeout(grace, connection).await;
        }
    }
}

/// Resolves once shutdown is requested (or the platform is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn route(state: Arc<State>, conn: Arc<ConnInfo>, req: Request<Incoming>) -> Response<Body> {
    // A device's editor origin serves that editor and nothing else.
    let host = crate::origin::request_host(req.headers());
    let device = host.as_ref().and_then(|(host, _)| {
        let domain = state.config.editor_domain()?;
        crate::origin::device_of_host(host, &domain)
    });
    if let Some(device) = device {
        return crate::editor::handle(state, conn, req, device).await;
    }
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::POST, ENROLL_PATH) => crate::enroll::handle(state, conn, req.into_body()).await,
        (&Method::GET, TUNNEL_PATH) => crate::tunnels::handle(state, conn, req).await,
        (_, p) if p.starts_with("/v1/admin/") => crate::admin::handle(state, conn, req).await,
        (_, "/" | "/login" | "/logout" | "/audit") => crate::web::handle(state, conn, req).await,
        (_, p) if p.starts_with("/devices/") => crate::web::handle(state, conn, req).await,
        _ => reply::not_found(),
    }
}
