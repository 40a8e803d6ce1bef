//! Platform-side listeners: `POST /v1/admin/devices/{id}/services/{name}/listen`.
//!
//! A fleet manager asks the platform to accept TCP connections on an
//! address of the platform's host and carry each one to `tcp:{name}` on the
//! device's live tunnel. The request is an HTTP upgrade (`tether-listen`):
//! the upgraded connection is the listener's *session*, and the listener
//! lives exactly as long as the session. Either side sends a newline every
//! [`KEEPALIVE`]; end of stream, an error, [`SILENCE`] without a byte, or
//! platform shutdown ends the session, which closes the listener and every
//! connection it accepted. There are no orphan listeners: nothing but a
//! live session owns one.
//!
//! This module owns the address policy (loopback only unless the platform
//! was started with `allow_remote_listen`), the bounds (listeners per
//! platform, connections per listener), the accept loop and the copying. It
//! never binds an address the policy refuses, never keeps a listener past
//! its session, and never logs the admin token or payload bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tether_proto::api::ErrorCode;
use tether_proto::{Service, ServiceHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::MAX_ADMIN_BODY;
use crate::http::{self as reply, Body};
use crate::platform::State;
use crate::server::ConnInfo;

/// The upgrade protocol of the listen endpoint.
pub const LISTEN_UPGRADE: &str = "tether-listen";
/// Header of the 101 answer with the address the platform bound.
pub const LISTEN_ADDR_HEADER: &str = "tether-listen-addr";
/// How often each side of a session sends a newline.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// A session silent this long is over.
pub const SILENCE: Duration = Duration::from_secs(15);
/// How long a closing session may take to say goodbye.
const GOODBYE: Duration = Duration::from_secs(1);

/// Why a listen session ended (other than by this side's own choice).
#[derive(Debug)]
pub enum SessionEnd {
    /// The other side closed its end.
    Closed,
    /// Reading or writing failed.
    Failed(std::io::Error),
    /// Nothing arrived for [`SILENCE`].
    Silent,
    /// A keepalive could not be written within [`KEEPALIVE`]: the other
    /// side stopped reading.
    NotReading,
}

/// Keeps a listen session alive from one side: writes a newline every
/// [`KEEPALIVE`], reads and ignores whatever the other side writes, and
/// returns once the session is over. Both ends of a session run this; each
/// also stops it by dropping the future when it wants to end the session.
pub async fn hold_session<R, W>(rd: &mut R, wr: &mut W) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    let silence = tokio::time::sleep(SILENCE);
    tokio::pin!(silence);
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            read = rd.read(&mut scratch) => match read {
                Ok(0) => return SessionEnd::Closed,
                Ok(_) => silence.as_mut().reset(tokio::time::Instant::now() + SILENCE),
                Err(e) => return SessionEnd::Failed(e),
            },
            () = &mut silence => return SessionEnd::Silent,
            _ = keepalive.tick() => {
                let sent = tokio::time::timeout(KEEPALIVE, async {
                    wr.write_all(b"\n").await?;
                    wr.flush().await
                }).await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return SessionEnd::Failed(e),
                    Err(_) => return SessionEnd::NotReading,
                }
            }
        }
    }
}

/// `POST .../listen` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenRequest {
    /// Where the platform should listen; port 0 picks a free port.
    pub listen: SocketAddr,
}

/// The platform's live listeners: a bound on their number and a way to
/// close them all.
#[derive(Debug)]
pub struct Listeners {
    max: usize,
    slots: Arc<Semaphore>,
    stop: watch::Sender<bool>,
}

impl Listeners {
    /// At most `max` listeners at once.
    pub fn new(max: usize) -> Listeners {
        Listeners {
            max,
            slots: Arc::new(Semaphore::new(max)),
            stop: watch::channel(false).0,
        }
    }

    /// Listeners open now.
    pub fn active(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    /// Ends every session (platform shutdown); later requests are refused.
    pub fn close_all(&self) {
        self.stop.send_replace(true);
    }

    fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }
}

/// Why a listen address is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "{0} is not a loopback address; the platform listens only on 127.0.0.0/8 or ::1 unless it was started with `tether-platform serve --allow-remote-listen`"
    )]
    NotLoopback(SocketAddr),
}

/// The address policy: loopback only, unless `allow_remote` is set.
pub fn check_address(addr: SocketAddr, allow_remote: bool) -> Result<(), AddressError> {
    let loopback = match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    if loopback || allow_remote {
        Ok(())
    } else {
        Err(AddressError::NotLoopback(addr))
    }
}

/// Checks the request, binds the address, answers 101 and runs the session
/// until it ends.
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
    device_id: &str,
    service: &str,
) -> Response<Body> {
    let bad =
        |message: String| reply::error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message);
    if !reply::wants_upgrade(req.headers(), LISTEN_UPGRADE) {
        return bad(format!(
            "send `Connection: Upgrade` and `Upgrade: {LISTEN_UPGRADE}` to listen"
        ));
    }
    let (parts, body) = req.into_parts();
    let request: ListenRequest = match reply::read_json(body, MAX_ADMIN_BODY).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    if ServiceHeader::new(Service::Tcp(service.to_string()))
        .validate()
        .is_err()
    {
        return bad(format!(
            "'{service}' is not a valid service name (1 to 64 characters of A-Z a-z 0-9 . _ -)"
        ));
    }
    if let Err(e) = check_address(request.listen, state.config.allow_remote_listen) {
        warn!(peer = %conn.peer, listen = %request.listen, "listen request refused: not a loopback address");
        return bad(e.to_string());
    }
    let id = device_id.to_string();
    match state.store.blocking(move |s| s.device(&id)).await {
        Ok(Some(device)) if device.revoked => {
            return reply::error(
                StatusCode::FORBIDDEN,
                ErrorCode::DeviceRevoked,
                format!("device '{device_id}' is revoked"),
            );
        }
        Ok(Some(_)) => {}
        Ok(None) => {
            return reply::error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                format!("no device '{device_id}'; list devices with `tether-platform device list`"),
            );
        }
        Err(e) => {
            warn!(cause = %e, "cannot look the device up");
            return reply::internal();
        }
    }
    if *state.listeners.stop.borrow() {
        return overloaded("the platform is shutting down".to_string());
    }
    let Some(slot) = state.listeners.slot() else {
        warn!(
            limit = state.listeners.max,
            "listener limit reached; request refused"
        );
        return overloaded(format!(
            "the platform already holds its maximum of {} listeners; stop one first",
            state.listeners.max
        ));
    };
    let listener = match TcpListener::bind(request.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            return bad(format!(
                "cannot listen on {}: {e}; pick a free port",
                request.listen
            ));
        }
    };
    let bound = match listener.local_addr() {
        Ok(bound) => bound,
        Err(e) => {
            warn!(cause = %e, "a bound listener has no address");
            return reply::internal();
        }
    };
    let Ok(bound_header) = HeaderValue::from_str(&bound.to_string()) else {
        return reply::internal();
    };
    let upgrade = hyper::upgrade::on(Request::from_parts(parts, ()));
    let listening = Listening {
        state,
        listener,
        device_id: device_id.to_string(),
        service: service.to_string(),
        _slot: slot,
    };
    let span = info_span!("listen", %device_id, %service, listen = %bound, peer = %conn.peer);
    tokio::spawn(
        async move {
            let _connection_slot = conn;
            match upgrade.await {
                Ok(upgraded) => listening.run(TokioIo::new(upgraded)).await,
                Err(e) => debug!(cause = %e, "the upgrade did not complete; listener closed"),
            }
        }
        .instrument(span),
    );
    let mut response = reply::empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(LISTEN_UPGRADE));
    headers.insert(LISTEN_ADDR_HEADER, bound_header);
    response
}

fn overloaded(message: String) -> Response<Body> {
    reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Overloaded,
        message,
    )
}

/// One bound listener, waiting for its session.
struct Listening {
    state: Arc<State>,
    listener: TcpListener,
    device_id: String,
    service: String,
    _slot: OwnedSemaphorePermit,
}

impl Listening {
    /// Accepts connections until the session ends, then closes the listener
    /// and every connection it accepted.
    async fn run<S: AsyncRead + AsyncWrite>(self, session: S) {
        let (mut rd, mut wr) = tokio::io::split(session);
        let mut stop = self.state.listeners.stop.subscribe();
        let max_connections = self.state.config.max_listener_connections;
        let slots = Arc::new(Semaphore::new(max_connections));
        let mut tasks = JoinSet::new();
        let mut accepted = 0u64;
        info!("listener open");
        // The session borrows `wr` until the loop ends; the goodbye below
        // needs it back.
        let mut session = Box::pin(hold_session(&mut rd, &mut wr));
        let reason = loop {
            tokio::select! {
                () = stopped(&mut stop) => break "the platform is shutting down".to_string(),
                end = &mut session => break match end {
                    SessionEnd::Closed => "the client ended the session".to_string(),
                    SessionEnd::Failed(e) => format!("the session failed: {e}"),
                    SessionEnd::Silent => format!("the session was silent for {SILENCE:?}"),
                    SessionEnd::NotReading => "the session stopped reading".to_string(),
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                incoming = self.listener.accept() => match incoming {
                    Ok((tcp, peer)) => {
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            warn!(%peer, limit = max_connections, "connection limit of this listener reached; closing the connection");
                            continue;
                        };
                        accepted += 1;
                        let state = self.state.clone();
                        let (device_id, service) = (self.device_id.clone(), self.service.clone());
                        tasks.spawn(
                            async move {
                                let _permit = permit;
                                forward(&state, tcp, &device_id, &service).await;
                            }
                            .instrument(info_span!("connection", %peer)),
                        );
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(cause = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        };
        drop(session);
        drop(self.listener);
        let open = tasks.len();
        tasks.abort_all();
        info!(%reason, accepted, closed_connections = open, "listener closed");
        let _ = tokio::time::timeout(GOODBYE, wr.shutdown()).await;
    }
}

/// Resolves once every listener is to close (or the platform is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Carries one accepted connection to the device's service.
async fn forward(state: &State, mut tcp: TcpStream, device_id: &str, service: &str) {
    let _ = tcp.set_nodelay(true);
    let mut stream = match state.open_tcp(device_id, service).await {
        Ok(stream) => stream,
        Err(e) => return warn!(cause = %e, "closing the connection: the service cannot be reached"),
    };
    crate::bridge::bridge(&mut tcp, &mut stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    // The session's promises, on an in-memory pipe with tokio's paused
    // clock: each would fail if its branch of `hold_session` broke.

    #[tokio::test(start_paused = true)]
    async fn a_session_writes_keepalives_and_ends_when_the_peer_closes() {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let (mut rd, mut wr) = tokio::io::split(&mut ours);
        let peer = async {
            let mut got = [0u8; 2];
            theirs.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"\n\n", "a keepalive at once and one after KEEPALIVE");
            drop(theirs);
        };
        let (end, ()) = tokio::join!(hold_session(&mut rd, &mut wr), peer);
        assert!(matches!(end, SessionEnd::Closed), "{end:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_ends_the_session_after_silence_and_a_talking_one_does_not() {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let (mut rd, mut wr) = tokio::io::split(&mut ours);
        let started = tokio::time::Instant::now();
        let end = hold_session(&mut rd, &mut wr).await;
        assert!(matches!(end, SessionEnd::Silent), "{end:?}");
        assert_eq!(started.elapsed(), SILENCE);

        // A peer that writes a newline every KEEPALIVE keeps it going.
        let (mut rd, mut wr) = tokio::io::split(&mut ours);
        let talking = async {
            for _ in 0..10 {
                theirs.write_all(b"\n").await.unwrap();
                tokio::time::sleep(KEEPALIVE).await;
            }
        };
        tokio::select! {
            end = hold_session(&mut rd, &mut wr) => panic!("ended early: {end:?}"),
            () = talking => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_ends_the_session() {
        // One byte of room: the first keepalive fits, the second cannot be
        // written, so the session gives up after KEEPALIVE.
        let (mut ours, mut theirs) = tokio::io::duplex(1);
        let (mut rd, mut wr) = tokio::io::split(&mut ours);
        let talking = async {
            loop {
                theirs.write_all(b"\n").await.unwrap();
                tokio::time::sleep(KEEPALIVE).await;
            }
        };
        let end = tokio::select! {
            end = hold_session(&mut rd, &mut wr) => end,
            () = talking => unreachable!(),
        };
        assert!(matches!(end, SessionEnd::NotReading), "{end:?}");
    }

    #[test]
    fn only_loopback_addresses_pass_without_the_opt_in() {
        for ok in [
            "127.0.0.1:0",
            "127.1.2.3:8080",
            "[::1]:22",
            "[::ffff:127.0.0.1]:1",
        ] {
            let addr: SocketAddr = ok.parse().unwrap();
            assert_eq!(check_address(addr, false), Ok(()), "{ok}");
        }
        for refused in ["0.0.0.0:0", "192.0.2.7:22", "[::]:22", "[2001:db8::1]:22"] {
            let addr: SocketAddr = refused.parse().unwrap();
            let error = check_address(addr, false).unwrap_err();
            assert!(
                error.to_string().contains("--allow-remote-listen"),
                "{error}"
            );
            assert_eq!(check_address(addr, true), Ok(()), "{refused}");
        }
    }

    #[test]
    fn the_limit_counts_listeners() {
        let listeners = Listeners::new(2);
        let a = listeners.slot().unwrap();
        let _b = listeners.slot().unwrap();
        assert!(listeners.slot().is_none());
        assert_eq!(listeners.active(), 2);
        drop(a);
        assert_eq!(listeners.active(), 1);
    }
}
