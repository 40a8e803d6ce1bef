//! The platform's side of a device's control stream: heartbeats,
//! certificate renewal (within `crate::certs`' rules) and the pushes of the
//! platform's settings for the device (`docs/protocol.md`, "Control
//! stream").
//!
//! This module owns the request/answer loop and the platform's own
//! messages: as soon as the stream is up, and again whenever the tunnel's
//! registry entry signals a change, it reads the device's record from the
//! store and sends `Protection`, the grant key's rotations (`GrantKeys`) and,
//! while one is requested, `RenewNow`. A platform reset ends the stream (the
//! device then reconnects). Reading the store
//! after the signal (rather than carrying the value in it) means a push can
//! never overtake a newer change. The device id always comes from
//! the tunnel (its certificate), never from a message, so a device can only
//! ever renew its own certificate. It never holds more than one message's
//! worth of bytes ([`ControlDecoder`] bounds it at 64 KiB), and a message it
//! cannot decode ends the stream, not the tunnel.

use std::sync::Arc;

use tether_proto::ResetCode;
use tether_proto::control::{ControlDecoder, ControlMessage, encode};
use tether_proto::tokio_io::TunnelStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::ca::{self, Issued};
use crate::platform::{PlatformEvent, State, unix_now};
use crate::store::StoreError;

/// Bytes read from the stream at a time. Heartbeats are ~200 bytes, renewal
/// requests ~700: small keeps an idle tunnel small.
const READ_CHUNK: usize = 2048;

/// Serves one control stream until it ends.
pub async fn serve(
    state: Arc<State>,
    device_id: String,
    fingerprint: String,
    generation: u64,
    mut stream: TunnelStream,
) {
    let mut decoder = ControlDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    // Subscribed before the first read of the store: a change after that
    // read is signalled, one before it is read.
    let mut changes = state.registry.settings_changes(&device_id, generation);
    let reset = state.registry.control_reset(&device_id, generation);
    let reset = async {
        match reset {
            Some(notify) => notify.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(reset);
    if let Err(e) = push_settings(&state, &device_id, &mut stream).await {
        return debug!(cause = %e, "cannot push the device's settings");
    }
    loop {
        let read = tokio::select! {
            read = stream.read(&mut buf) => read,
            () = &mut reset => {
                info!("ending the control stream");
                stream.reset(ResetCode::CANCEL, "control stream ended by the platform");
                return;
            }
            () = settings_changed(&mut changes) => {
                if let Err(e) = push_settings(&state, &device_id, &mut stream).await {
                    return debug!(cause = %e, "cannot push the device's settings");
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) => return debug!("control stream ended"),
            Ok(n) => n,
            Err(e) => return debug!(cause = %e, "control stream failed"),
        };
        decoder.push(&buf[..n]);
        loop {
            let message = match decoder.next_message() {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    warn!(cause = %e, "malformed control message; resetting the control stream");
                    stream.reset(ResetCode::CANCEL, "malformed control message");
                    return;
                }
            };
            let tunnel = Tunnel {
                device_id: &device_id,
                fingerprint: &fingerprint,
                generation,
            };
            let Some(answer) = handle(&state, tunnel, message).await else {
                continue;
            };
            if let Err(e) = send(&mut stream, &answer).await {
                return debug!(cause = %e, "cannot answer on the control stream");
            }
        }
    }
}

/// The tunnel a control stream belongs to.
#[derive(Clone, Copy)]
struct Tunnel<'a> {
    device_id: &'a str,
    /// Of the certificate the tunnel was authenticated with.
    fingerprint: &'a str,
    generation: u64,
}

/// Acts on one message; returns the answer to send, if any.
async fn handle(
    state: &Arc<State>,
    tunnel: Tunnel<'_>,
    message: ControlMessage,
) -> Option<ControlMessage> {
    let Tunnel {
        device_id,
        generation,
        ..
    } = tunnel;
    match message {
        ControlMessage::Heartbeat(beat) => {
            debug!(seq = beat.seq, rtt_micros = ?beat.rtt_micros, "heartbeat");
            let seq = beat.seq;
            if let Some(error) = state.registry.heartbeat(device_id, generation, beat) {
                warn!(%error, "the device cannot write its audit trail; its events wait in its memory until it can");
            }
            state.emit(PlatformEvent::Heartbeat {
                device_id: device_id.to_string(),
                seq,
            });
            None
        }
        ControlMessage::RenewRequest { id, csr } => Some(renew(state, tunnel, id, &csr).await),
        ControlMessage::Error { id, code, message } => {
            warn!(?id, %code, %message, "the device reported an error");
            None
        }
        // A device does not send these; ignore them as unknown types are.
        ControlMessage::RenewResponse { .. }
        | ControlMessage::Protection { .. }
        | ControlMessage::RenewNow
        | ControlMessage::GrantKeys { .. }
        | ControlMessage::SnapshotAvailable { .. }
        | ControlMessage::NodeRed { .. }
        | ControlMessage::MaintenanceWindow { .. }
        | ControlMessage::Unknown => None,
    }
}

/// Resolves when what the platform pushes to the device changed; never without a
/// live registry entry.
async fn settings_changed(changes: &mut Option<watch::Receiver<()>>) {
    let Some(receiver) = changes else {
        return std::future::pending().await;
    };
    if receiver.changed().await.is_err() {
        // The tunnel left the registry: no more changes will come.
        *changes = None;
        std::future::pending::<()>().await;
    }
}

/// Reads the device's record from the store and sends its protection
/// mode, the grant key's rotations (if any), and `RenewNow` while a renewal
/// is requested.
async fn push_settings(
    state: &Arc<State>,
    device_id: &str,
    stream: &mut TunnelStream,
) -> std::io::Result<()> {
    let id = device_id.to_string();
    let device = match state.store.blocking(move |s| s.device(&id)).await {
        Ok(Some(device)) => device,
        Ok(None) => return Ok(()),
        Err(e) => {
            warn!(cause = %e, "cannot read the protection mode; not pushed");
            return Ok(());
        }
    };
    let enabled = device.protected;
    debug!(enabled, "pushing the protection mode");
    send(stream, &ControlMessage::Protection { enabled }).await?;
    let rotations = state.keys.rotations();
    if !rotations.is_empty() {
        send(stream, &ControlMessage::GrantKeys { rotations }).await?;
    }
    if device.certs.renew_requested {
        debug!("asking the device to renew its certificate");
        send(stream, &ControlMessage::RenewNow).await?;
    }
    if let Some(version) = state.snapshots.target(device_id) {
        debug!(version, "telling the device which snapshot to run");
        send(stream, &ControlMessage::SnapshotAvailable { version }).await?;
    }
    if let Some((window, by)) = state.snapshots.window(device_id) {
        debug!(?window, "telling the device its maintenance window");
        send(stream, &ControlMessage::MaintenanceWindow { window, by }).await?;
    }
    let requests = state
        .node_red_requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(device_id)
        .unwrap_or_default();
    for (action, by) in requests {
        info!(%action, %by, "asking the device to {action} its Node-RED");
        send(stream, &ControlMessage::NodeRed { action, by }).await?;
    }
    Ok(())
}

/// Issues a certificate for the tunnel's device with the CSR's key, if it
/// may renew now: inside the renewal window or asked to, a few times an
/// hour at most, over its current certificate (`crate::certs`). Checked
/// before the CSR is parsed or anything is signed.
async fn renew(state: &Arc<State>, tunnel: Tunnel<'_>, id: u64, csr: &str) -> ControlMessage {
    let device_id = tunnel.device_id;
    let policy = state.config.cert_policy();
    let (device, fp, now) = (
        device_id.to_string(),
        tunnel.fingerprint.to_string(),
        unix_now(),
    );
    match state
        .store
        .blocking(move |s| s.check_renewal(&device, &fp, &policy, now))
        .await
    {
        Ok(()) => {}
        Err(StoreError::Renewal(refusal)) => {
            info!(cause = %refusal, "renewal refused");
            return error(id, "renewal_refused", refusal.to_string());
        }
        Err(StoreError::Revoked(_)) => {
            return error(id, "device_revoked", "this device is revoked".into());
        }
        Err(e) => {
            warn!(cause = %e, "cannot check a renewal");
            return error(
                id,
                "internal",
                "the platform could not check the renewal".into(),
            );
        }
    }
    let key = match ca::parse_csr(csr) {
        Ok(key) => key,
        Err(e) => return error(id, "bad_csr", e.to_string()),
    };
    let issued = match state
        .ca
        .issue_device(device_id, &key, state.config.cert_validity)
    {
        Ok(issued) => issued,
        Err(e) => {
            warn!(cause = %e, "cannot issue a renewed certificate");
            return error(
                id,
                "internal",
                "the platform could not issue a certificate".into(),
            );
        }
    };
    let Issued {
        pem,
        fingerprint,
        not_after,
    } = issued;
    let (device, old, fp) = (
        device_id.to_string(),
        tunnel.fingerprint.to_string(),
        fingerprint.clone(),
    );
    let stored = state
        .store
        .blocking(move |s| s.renew_certificate(&device, &old, &fp, not_after, &policy, now))
        .await;
    match stored {
        Ok(()) => {
            info!(not_after, "certificate renewed");
            state.emit(PlatformEvent::Renewed {
                device_id: device_id.to_string(),
                not_after,
            });
            ControlMessage::RenewResponse {
                id,
                certificate: pem,
                not_after,
            }
        }
        Err(StoreError::Revoked(_)) => error(id, "device_revoked", "this device is revoked".into()),
        Err(StoreError::Renewal(refusal)) => error(id, "renewal_refused", refusal.to_string()),
        Err(e) => {
            warn!(cause = %e, "cannot record a renewed certificate");
            error(
                id,
                "internal",
                "the platform could not record the certificate".into(),
            )
        }
    }
}

fn error(id: u64, code: &str, message: String) -> ControlMessage {
    ControlMessage::Error {
        id: Some(id),
        code: code.to_string(),
        message,
    }
}

async fn send(stream: &mut TunnelStream, message: &ControlMessage) -> std::io::Result<()> {
    let bytes = encode(message).map_err(std::io::Error::other)?;
    stream.write_all(&bytes).await
}
