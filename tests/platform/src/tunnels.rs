//! The tunnel endpoint (`GET /v1/tunnel`) and the registry of live tunnels.
//!
//! This module owns who a tunnel belongs to and its life: the device id
//! comes from the client certificate's fingerprint (never from anything the
//! device says), a revoked or unknown certificate is refused before the
//! WebSocket upgrade, one device has at most one live tunnel (a new one
//! replaces the old), and revocation closes a live tunnel with
//! `CloseCode::REVOKED`. Streams the device opens are accepted only for the
//! control service ([`crate::control`] serves them), the audit trail
//! ([`crate::audit`]), snapshots ([`crate::snapshots`]) and MQTT
//! ([`crate::mqtt`], unless it is off); anything else is refused. Each live tunnel carries a signal that its device's protection
//! mode changed, which its control stream turns into a push. It never parses certificates: rustls has verified the chain and
//! the validity before a request reaches here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tether_proto::api::ErrorCode;
use tether_proto::tokio_io::Tunnel;
use tether_proto::{CloseCode, ResetCode, Service, ServiceHeader};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::http::{self as reply, Body};
use crate::platform::{PlatformEvent, State, unix_now};
use crate::server::ConnInfo;
use crate::store::{DeviceRecord, TunnelAdmission};

/// What the registry knows about one live tunnel.
#[derive(Clone, Debug)]
pub struct LiveTunnel {
    pub tunnel: Tunnel,
    /// Tells this tunnel from an earlier or later one of the same device.
    pub generation: u64,
    pub fingerprint: String,
    pub connected_since: SystemTime,
    pub last_heartbeat: Option<SystemTime>,
    /// The device's audit queue, from its last heartbeat.
    pub audit: Option<tether_proto::control::AuditHealth>,
    /// The snapshots, as the last heartbeat reported them.
    pub snapshot: Option<tether_proto::control::SnapshotHealth>,
    /// The device's health figures, from its last heartbeat.
    pub health: Option<tether_proto::control::DeviceHealth>,
    /// Signalled after what the platform pushes to the device changed
    /// (protection mode, a renewal request, the grant key's rotations); the
    /// control stream reads them again and pushes them.
    settings: watch::Sender<()>,
    /// Signalled to end the device's control stream.
    control_reset: Arc<tokio::sync::Notify>,
}

/// Live tunnels by device id.
#[derive(Debug, Default)]
pub struct Registry {
    live: Mutex<HashMap<String, LiveTunnel>>,
    next_generation: AtomicU64,
    /// Per device, recent times a new tunnel replaced one that was still
    /// up: two holders of one identity keep taking the tunnel from each
    /// other.
    takeovers: Mutex<HashMap<String, Vec<std::time::Instant>>>,
    /// Each device's health figures over the last hour.
    history: crate::health::History,
}

/// Takeovers of a live tunnel within [`TAKEOVER_WINDOW`] that make an
/// identity conflict: a device whose connection broke replaces its stale
/// tunnel once; two copies of one identity do it again and again.
pub const TAKEOVERS_FOR_CONFLICT: usize = 3;
/// See [`TAKEOVERS_FOR_CONFLICT`].
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(120);

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, LiveTunnel>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `tunnel` as the device's live tunnel and returns its
    /// generation, and whether the device now looks held twice (see
    /// [`TAKEOVERS_FOR_CONFLICT`]). An older tunnel of the same device is
    /// closed.
    pub fn insert(&self, device_id: &str, tunnel: Tunnel, fingerprint: &str) -> (u64, bool) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let entry = LiveTunnel {
            tunnel,
            generation,
            fingerprint: fingerprint.to_string(),
            connected_since: SystemTime::now(),
            last_heartbeat: None,
            audit: None,
            snapshot: None,
            health: None,
            settings: watch::channel(()).0,
            control_reset: Arc::new(tokio::sync::Notify::new()),
        };
        let replaced = self.lock().insert(device_id.to_string(), entry);
        let mut conflict = false;
        if let Some(old) = replaced {
            if !old.tunnel.is_closed() {
                conflict = self.took_over(device_id);
            }
            old.tunnel.close(
                CloseCode::NO_ERROR,
                "replaced by a newer tunnel from this device",
            );
        }
        (generation, conflict)
    }

    /// Notes that a live tunnel of the device was taken over; true once
    /// that happened [`TAKEOVERS_FOR_CONFLICT`] times within
    /// [`TAKEOVER_WINDOW`].
    fn took_over(&self, device_id: &str) -> bool {
        let now = std::time::Instant::now();
        let mut all = self
            .takeovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Bounded by the number of devices; drop quiet ones first.
        all.retain(|_, times| {
            times.retain(|t| now.duration_since(*t) < TAKEOVER_WINDOW);
            !times.is_empty()
        });
        let times = all.entry(device_id.to_string()).or_default();
        times.push(now);
        times.len() >= TAKEOVERS_FOR_CONFLICT
    }

    /// Forgets the tunnel, if it is still generation `generation`.
    pub fn remove(&self, device_id: &str, generation: u64) {
        let mut live = self.lock();
        if live
            .get(device_id)
            .is_some_and(|t| t.generation == generation)
        {
            live.remove(device_id);
        }
    }

    /// The device's live tunnel, if any.
    /// A device's health figures over the last hour, oldest first.
    pub fn history(&self, device_id: &str) -> Vec<crate::health::HealthPoint> {
        self.history.of(device_id, unix_now())
    }

    pub fn get(&self, device_id: &str) -> Option<LiveTunnel> {
        self.lock().get(device_id).cloned()
    }

    /// Notes a heartbeat on the device's tunnel of generation `generation`.
    /// Notes a heartbeat of the live tunnel and the audit figures it
    /// carried. Returns the audit error when it is new (to be logged once).
    pub fn heartbeat(
        &self,
        device_id: &str,
        generation: u64,
        beat: tether_proto::control::Heartbeat,
    ) -> Option<String> {
        let mut live = self.lock();
        let t = live
            .get_mut(device_id)
            .filter(|t| t.generation == generation)?;
        t.last_heartbeat = Some(SystemTime::now());
        let before = t.audit.as_ref().and_then(|a| a.error.clone());
        t.audit = beat.audit;
        t.snapshot = beat.snapshot;
        if let Some(health) = &beat.health {
            self.history.note(device_id, unix_now(), health);
        }
        t.health = beat.health.map(|h| *h);
        let now = t.audit.as_ref().and_then(|a| a.error.clone());
        now.filter(|e| before.as_ref() != Some(e))
    }

    /// Signals the device's live tunnel that what the platform pushes to it
    /// changed. True if a control stream is there to push it.
    pub fn settings_changed(&self, device_id: &str) -> bool {
        match self.lock().get(device_id) {
            Some(t) => {
                t.settings.send_replace(());
                t.settings.receiver_count() > 0
            }
            None => false,
        }
    }

    /// Signals every live tunnel's control stream to push the device's
    /// settings again (after a grant key rotation). Returns how many.
    pub fn signal_all(&self) -> usize {
        let live = self.lock();
        for t in live.values() {
            t.settings.send_replace(());
        }
        live.len()
    }

    /// Ends the control stream of the device's live tunnel (the device
    /// then closes the tunnel and connects again). True if there was one.
    pub fn reset_control(&self, device_id: &str) -> bool {
        match self.lock().get(device_id) {
            Some(t) => {
                // A permit, so a control stream not yet waiting still sees it.
                t.control_reset.notify_one();
                true
            }
            None => false,
        }
    }

    /// What ends the control stream of the device's tunnel of generation
    /// `generation`, if it is still live.
    pub fn control_reset(
        &self,
        device_id: &str,
        generation: u64,
    ) -> Option<Arc<tokio::sync::Notify>> {
        self.lock()
            .get(device_id)
            .filter(|t| t.generation == generation)
            .map(|t| t.control_reset.clone())
    }

    /// A receiver of the signals of [`Registry::settings_changed`] for the
    /// device's tunnel of generation `generation`, if it is still live.
    pub fn settings_changes(
        &self,
        device_id: &str,
        generation: u64,
    ) -> Option<watch::Receiver<()>> {
        self.lock()
            .get(device_id)
            .filter(|t| t.generation == generation)
            .map(|t| t.settings.subscribe())
    }

    /// Closes the device's live tunnel at once. True if there was one.
    pub fn close(&self, device_id: &str, code: CloseCode, reason: &str) -> bool {
        let removed = self.lock().remove(device_id);
        if let Some(t) = &removed {
            t.tunnel.close(code, reason);
        }
        removed.is_some()
    }

    /// Shuts every tunnel down gracefully, waits up to `grace`, then closes
    /// what is left.
    pub async fn shutdown_all(&self, grace: Duration) {
        let tunnels: Vec<Tunnel> = self.lock().drain().map(|(_, t)| t.tunnel).collect();
        for tunnel in &tunnels {
            tunnel.shutdown(CloseCode::NO_ERROR, "the platform is shutting down");
        }
        let all_closed = futures_util::future::join_all(tunnels.iter().map(Tunnel::closed));
        if tokio::time::timeout(grace, all_closed).await.is_err() {
            warn!(?grace, "tunnels did not close in time; closing them now");
            for tunnel in &tunnels {
                tunnel.close(CloseCode::NO_ERROR, "the platform is shutting down");
            }
        }
    }

    /// Number of live tunnels.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True if no tunnel is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `GET /v1/tunnel`: authenticates the device by its certificate, answers
/// the WebSocket upgrade and runs the tunnel in a task of its own.
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let Some(fingerprint) = conn.fingerprint.clone() else {
        return reply::error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::DeviceUnknown,
            "the tunnel needs the device's client certificate; enroll the device first",
        );
    };
    let device = match lookup(&state, &fingerprint, conn.peer).await {
        Ok(device) => device,
        Err(response) => return response,
    };
    let Some(key) = websocket_key(&req) else {
        return reply::error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "expected a WebSocket upgrade (version 13) on this endpoint",
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let span = info_span!("tunnel", device_id = %device.id, peer = %conn.peer);
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(upgraded) => run(state, conn, device.id, fingerprint, upgraded).await,
                Err(e) => debug!(cause = %e, "the WebSocket upgrade did not complete"),
            }
        }
        .instrument(span),
    );
    let mut response = reply::empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// The device behind a certificate fingerprint, or the answer refusing it
/// (`crate::certs`: only the device's current certificate, or the previous
/// one in its grace period, opens a tunnel).
async fn lookup(
    state: &State,
    fingerprint: &str,
    peer: SocketAddr,
) -> Result<DeviceRecord, Response<Body>> {
    let fp = fingerprint.to_string();
    let now = unix_now();
    match state
        .store
        .blocking(move |s| s.admit_certificate(&fp, now))
        .await
    {
        Ok(TunnelAdmission::Accepted(device)) => Ok(device),
        Ok(TunnelAdmission::DeviceRevoked(_)) => Err(reply::error(
            StatusCode::FORBIDDEN,
            ErrorCode::DeviceRevoked,
            "this device was revoked by a fleet manager; it must be enrolled again with a new provisioning token",
        )),
        Ok(TunnelAdmission::CertRevoked(device)) => {
            warn!(device_id = %device.id, %peer, "a revoked certificate of the device was presented");
            Err(reply::error(
                StatusCode::FORBIDDEN,
                ErrorCode::CertificateRevoked,
                "this certificate of the device was revoked by a fleet manager",
            ))
        }
        Ok(TunnelAdmission::Superseded(device)) => {
            warn!(
                device_id = %device.id,
                %peer,
                fingerprint = %fingerprint,
                "a superseded certificate of the device was presented: another copy of its identity (a copied state directory) may exist"
            );
            state.emit(PlatformEvent::IdentityConflict {
                device_id: device.id.clone(),
                fingerprint: fingerprint.to_string(),
                reason: "a superseded certificate was presented".into(),
            });
            Err(reply::error(
                StatusCode::FORBIDDEN,
                ErrorCode::CertificateSuperseded,
                "this certificate was superseded when the device renewed: this is an older copy of the device's identity",
            ))
        }
        Ok(TunnelAdmission::Unknown) => Err(reply::error(
            StatusCode::FORBIDDEN,
            ErrorCode::DeviceUnknown,
            "this certificate was not issued to any device of this platform; enroll the device",
        )),
        Err(e) => {
            warn!(cause = %e, "device lookup failed");
            Err(reply::internal())
        }
    }
}

fn websocket_key(req: &Request<Incoming>) -> Option<String> {
    let headers = req.headers();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    if !version_ok || !reply::wants_upgrade(headers, "websocket") {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?.to_str().ok()?;
    Some(key.to_string())
}

/// One tunnel, from the upgraded connection to its end.
async fn run(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    device_id: String,
    fingerprint: String,
    upgraded: hyper::upgrade::Upgraded,
) {
    let io = TokioIo::new(upgraded);
    let ws =
        WebSocketStream::from_raw_socket(io, Role::Server, Some(state.config.websocket())).await;
    let (tunnel, driver) = match Tunnel::new(ws, state.config.tunnel.clone()) {
        Ok(pair) => pair,
        Err(e) => return warn!(cause = %e, "invalid tunnel configuration"),
    };
    // Registered before the driver runs, so the tunnel is known before the
    // device can see the handshake complete.
    let (generation, conflict) = state
        .registry
        .insert(&device_id, tunnel.clone(), &fingerprint);
    if conflict {
        warn!(
            peer = %conn.peer,
            "this device's tunnel keeps being taken over by another connection with the same certificate: two machines hold one identity (a copied state directory?); renew the real device ('tether-platform device renew') and revoke the other certificate"
        );
        state.emit(PlatformEvent::IdentityConflict {
            device_id: device_id.clone(),
            fingerprint: fingerprint.clone(),
            reason: "two connections keep taking the tunnel from each other".into(),
        });
    }
    let driver = tokio::spawn(driver);
    // A revocation between the lookup above and the insert would have found
    // no tunnel to close: look again now that the tunnel is registered.
    if is_revoked(&state, &device_id).await {
        state
            .registry
            .close(&device_id, CloseCode::REVOKED, "device revoked");
    }
    match tunnel.connected().await {
        Ok(_) => {
            info!("tunnel up");
            state.emit(PlatformEvent::TunnelUp {
                device_id: device_id.clone(),
                fingerprint: fingerprint.clone(),
            });
            accept_streams(&state, &device_id, &fingerprint, generation, &tunnel).await;
        }
        Err(e) => debug!(cause = %e, "tunnel handshake failed"),
    }
    let reason = tunnel.closed().await.to_string();
    if let Ok(Err(e)) = driver.await {
        debug!(cause = %e, "tunnel driver ended with an error");
    }
    state.registry.remove(&device_id, generation);
    info!(%reason, "tunnel down");
    state.emit(PlatformEvent::TunnelDown { device_id, reason });
    // The connection's slot is released with its last holder.
    drop(conn);
}

async fn is_revoked(state: &State, device_id: &str) -> bool {
    let id = device_id.to_string();
    matches!(
        state.store.blocking(move |s| s.device(&id)).await,
        Ok(Some(device)) if device.revoked
    )
}

/// Accepts the device's control, audit, snapshot and mqtt streams until
/// the tunnel closes; refuses every other service (mqtt too when MQTT is
/// off).
async fn accept_streams(
    state: &Arc<State>,
    device_id: &str,
    fingerprint: &str,
    generation: u64,
    tunnel: &Tunnel,
) {
    let only_control = |header: &ServiceHeader| match header.service {
        Service::Control | Service::Audit | Service::Snapshot => Ok(()),
        Service::Mqtt if state.mqtt.is_some() => Ok(()),
        Service::Mqtt => Err((
            ResetCode::REFUSED,
            crate::mqtt::StreamError::Off.to_string(),
        )),
        ref other => Err((
            ResetCode::REFUSED,
            format!("the platform does not serve '{other}' streams opened by a device"),
        )),
    };
    while let Some((stream, header)) = tunnel.accept_filtered(only_control).await {
        let state = state.clone();
        let (device_id, fingerprint) = (device_id.to_string(), fingerprint.to_string());
        if header.service == Service::Audit {
            tokio::spawn(crate::audit::serve(state, device_id, stream).in_current_span());
            continue;
        }
        if header.service == Service::Mqtt {
            tokio::spawn(crate::mqtt::serve_tunnel(state, device_id, stream).in_current_span());
            continue;
        }
        if header.service == Service::Snapshot {
            tokio::spawn(crate::snapshots::serve(state, device_id, stream).in_current_span());
            continue;
        }
        tokio::spawn(
            crate::control::serve(state, device_id, fingerprint, generation, stream)
                .in_current_span(),
        );
    }
}
