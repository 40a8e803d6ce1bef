//! One tunnel session, from the completed handshake to the close: opens the
//! control stream and runs it, serves the platform's TCP streams, keeps the
//! status's RTT fresh, and on shutdown closes the tunnel gracefully within
//! [`SHUTDOWN_GRACE`]. A session never runs without its control stream
//! (protection mode, renewal and heartbeats travel on it): if it cannot be
//! opened or it ends while the tunnel is up, the tunnel is closed and the
//! reconnect loop dials again.
//!
//! This module owns the session's tasks and their end; it never reconnects
//! (`reconnect` does) and never reads the configuration files.

use std::time::Duration;

use tether_proto::tokio_io::Tunnel;
use tether_proto::{CloseCode, ConnectionError, Service, ServiceHeader};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::agent::Shared;
use crate::tunnel::{Connected, closed_as_revoked};

/// How long a graceful close may take before the tunnel is closed hard.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// After the control stream ended, how long the tunnel may take to report
/// an end of its own before the session closes it.
const CONTROL_END_GRACE: Duration = Duration::from_millis(500);
/// How often the status's RTT is refreshed while connected.
const RTT_REFRESH: Duration = Duration::from_secs(5);

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The agent is stopping; the tunnel was closed.
    Shutdown,
    /// The platform revoked the device (CloseCode::REVOKED).
    Revoked(String),
    /// The tunnel closed or failed; reconnect with backoff.
    Lost(String),
}

/// Runs a connected tunnel until it closes or `shutdown` turns true.
pub(crate) async fn run(
    shared: &std::sync::Arc<Shared>,
    connected: Connected,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let Connected { tunnel, driver } = connected;
    let span = info_span!("tunnel", device = %shared.device_id());
    let mut tasks = JoinSet::new();
    let (stop_control, stop) = watch::channel(false);
    let mut control = match tunnel.open(ServiceHeader::new(Service::Control)) {
        Ok(stream) => Some(tokio::spawn(
            crate::control::run(shared.clone(), tunnel.clone(), stream, stop)
                .instrument(span.clone()),
        )),
        Err(e) => {
            warn!(parent: &span, cause = %e, "cannot open the control stream; reconnecting");
            tunnel.close(
                CloseCode::NO_ERROR,
                "the device could not open its control stream",
            );
            None
        }
    };
    tasks.spawn(crate::services::serve(shared.clone(), tunnel.clone()).instrument(span.clone()));
    // Not among `tasks`: it ends before the graceful close, which would
    // otherwise wait for its stream.
    let audit = tokio::spawn(ship_audit(shared.clone(), tunnel.clone()).instrument(span.clone()));
    if let Some(bridge) = &shared.mqtt {
        tasks.spawn(bridge_mqtt(bridge.clone(), tunnel.clone()).instrument(span.clone()));
    }

    let mut rtt = tokio::time::interval(RTT_REFRESH);
    let end = loop {
        tokio::select! {
            reason = tunnel.closed() => break ended(reason),
            _ = crate::agent::stopped(shutdown) => {
                let _ = stop_control.send(true);
                audit.abort();
                // Once done, the task is not awaited again below.
                if let Some(mut task) = control.take()
                    && tokio::time::timeout(Duration::from_millis(500), &mut task)
                        .await
                        .is_err()
                {
                    control = Some(task);
                }
                close_gracefully(&tunnel).await;
                break SessionEnd::Shutdown;
            }
            _ = async { control.as_mut().expect("checked").await }, if control.is_some() => {
                // Not while stopping (handled above): the platform ended the
                // control stream, or it failed. The device does not run
                // without it.
                control = None;
                // The tunnel's own end (a revocation, a lost connection)
                // ends the control stream too, a moment before the tunnel
                // reports it: that end is the one to report.
                if let Ok(reason) =
                    tokio::time::timeout(CONTROL_END_GRACE, tunnel.closed()).await
                {
                    break ended(reason);
                }
                warn!(parent: &span, "the control stream ended while the tunnel was up; closing the tunnel to connect again");
                tunnel.close(CloseCode::NO_ERROR, "the device's control stream ended");
                let reason = tunnel.closed().await;
                debug!(parent: &span, %reason, "tunnel closed after the control stream ended");
                break SessionEnd::Lost("the control stream ended; reconnecting".into());
            }
            _ = rtt.tick() => {
                let now_rtt = tunnel.rtt();
                shared.update(|s, _| s.rtt = now_rtt);
            }
        }
    };
    if let Some(control) = control {
        control.abort();
        let _ = control.await;
    }
    audit.abort();
    let _ = audit.await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    match tokio::time::timeout(SHUTDOWN_GRACE, driver).await {
        Ok(Ok(Err(e))) => debug!(parent: &span, cause = %e, "tunnel driver ended"),
        Ok(_) => {}
        Err(_) => warn!(parent: &span, "tunnel driver did not stop in time"),
    }
    end
}

fn ended(reason: ConnectionError) -> SessionEnd {
    if closed_as_revoked(&reason) {
        SessionEnd::Revoked(
            "the platform revoked this device and closed its tunnel; help: re-enroll it with a new token ('tetherd enroll --force') if that was a mistake"
                .into(),
        )
    } else {
        SessionEnd::Lost(reason.to_string())
    }
}

/// How long after a failed audit stream the session opens another.
const AUDIT_RETRY: Duration = Duration::from_secs(5);

/// Ships the audit queue on an `audit` stream for the session's life,
/// opening a new stream after one fails.
async fn ship_audit(shared: std::sync::Arc<Shared>, tunnel: Tunnel) {
    loop {
        let stream = match tunnel.open(ServiceHeader::new(Service::Audit)) {
            Ok(stream) => stream,
            Err(e) => return debug!(cause = %e, "cannot open the audit stream"),
        };
        let result = match stream.accepted().await {
            Ok(()) => {
                crate::audit::ship::run(
                    shared.audit.clone(),
                    stream,
                    shared.device_id(),
                    signer(&shared),
                    shared.config.clock,
                )
                .await
            }
            Err(e) => Err(crate::audit::ship::ShipError::Io(std::io::Error::other(e))),
        };
        if tunnel.is_closed() {
            return;
        }
        if let Err(e) = result {
            warn!(cause = %e, retry_in = ?AUDIT_RETRY, "audit shipping stopped; opening a new audit stream");
        }
        tokio::time::sleep(AUDIT_RETRY).await;
    }
}

/// Runs the MQTT bridge on an `mqtt` stream for the session's life,
/// opening a new stream after one fails.
async fn bridge_mqtt(bridge: std::sync::Arc<crate::mqtt::Bridge>, tunnel: Tunnel) {
    loop {
        let stream = match tunnel.open(ServiceHeader::new(Service::Mqtt)) {
            Ok(stream) => stream,
            Err(e) => return debug!(cause = %e, "cannot open the mqtt stream"),
        };
        let result = match stream.accepted().await {
            Ok(()) => crate::mqtt::stream::run(bridge.clone(), stream).await,
            Err(e) => Err(crate::mqtt::stream::StreamError::Io(std::io::Error::other(
                e,
            ))),
        };
        if tunnel.is_closed() {
            return;
        }
        if let Err(e) = result {
            warn!(cause = %e, retry_in = ?AUDIT_RETRY, "the MQTT bridge stopped; opening a new mqtt stream");
        }
        tokio::time::sleep(AUDIT_RETRY).await;
    }
}

/// Signs audit checkpoints with the device's current key (renewal replaces
/// it), keeping the parsed key until it changes.
fn signer(shared: &std::sync::Arc<Shared>) -> crate::audit::ship::Signer {
    let shared = shared.clone();
    let cached: std::sync::Mutex<Option<(String, crate::audit::ship::Signer)>> =
        std::sync::Mutex::new(None);
    std::sync::Arc::new(move |message: &[u8]| {
        let (fingerprint, key, cert) = {
            let current = shared.current();
            let creds = &current.creds;
            (
                creds.cert.fingerprint.clone(),
                creds.key.secret_der().to_vec(),
                creds.cert.der.to_vec(),
            )
        };
        let mut cached = cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.as_ref().is_none_or(|(f, _)| *f != fingerprint) {
            *cached = crate::audit::ship::signer_from_pkcs8(&key, cert).map(|s| (fingerprint, s));
        }
        cached.as_ref().and_then(|(_, sign)| sign(message))
    })
}

/// GOAWAY, let open streams finish for up to [`SHUTDOWN_GRACE`], then close.
async fn close_gracefully(tunnel: &Tunnel) {
    info!("closing the tunnel");
    tunnel.shutdown(CloseCode::NO_ERROR, "agent stopping");
    if tokio::time::timeout(SHUTDOWN_GRACE, tunnel.closed())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, streams = tunnel.stream_count(), "open streams did not finish in time; closing the tunnel");
        tunnel.close(CloseCode::NO_ERROR, "agent stopping");
        let _ = tokio::time::timeout(Duration::from_millis(500), tunnel.closed()).await;
    }
}
