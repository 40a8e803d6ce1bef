//! The control stream: heartbeats every `heartbeat_interval`, renewal of
//! the device certificate when it has less than `renewal.before` left or
//! when the platform asks (`RenewNow`), and
//! the platform's instance protection mode (kept by the editor, stored in
//! the state directory).
//!
//! Renewal makes a NEW key, sends its CSR in a `RenewRequest`, checks the
//! `RenewResponse` (the certificate parses, carries the new key and the same
//! device id), stores the new pair and switches the identity record
//! (`identity::StateDir::switch_pair`, whose rename is the commit point).
//! The current tunnel carries on with the old certificate, which stays valid
//! until its own expiry; the next connection uses the new one. This module
//! never logs keys or certificates, and never trusts a message to be well
//! formed: a malformed stream ends the control stream, not the agent.

use std::sync::Arc;
use std::time::Duration;

use tether_proto::control::{self, ControlDecoder, ControlMessage, Heartbeat};
use tether_proto::tokio_io::{Tunnel, TunnelStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::agent::Shared;
use crate::audit::{Audit, AuditEvent};
use crate::clock;
use crate::identity::CertInfo;
use crate::snapshot::apply::Notice;

/// After a failed or unanswered renewal, wait this long before the next.
const RENEW_RETRY: Duration = Duration::from_secs(3600);
/// A renewal not answered within this time is given up.
const RENEW_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the control stream ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("control stream out of step: {0}")]
    Decode(#[from] control::ControlError),
}

/// A renewal in flight.
struct Pending {
    id: u64,
    key: rcgen::KeyPair,
    sent: Instant,
}

/// Runs the control stream until it or the tunnel ends.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tunnel: Tunnel,
    stream: TunnelStream,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    match drive(&shared, &tunnel, stream, stop).await {
        Ok(()) => debug!("control stream closed by the platform"),
        Err(e) => {
            if !tunnel.is_closed() {
                warn!(cause = %e, "control stream ended");
            }
        }
    }
}

async fn drive(
    shared: &Arc<Shared>,
    tunnel: &Tunnel,
    stream: TunnelStream,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ControlError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut decoder = ControlDecoder::new();
    let mut buf = vec![0u8; 8 * 1024];
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut next_id = 1u64;
    let mut pending: Option<Pending> = None;
    let mut renew_after: Option<Instant> = None;
    loop {
        tokio::select! {
            // The agent is stopping: end the stream cleanly (FIN) so the
            // tunnel's graceful shutdown does not wait for it.
            _ = crate::agent::stopped(&mut stop) => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            _ = heartbeat.tick() => {
                seq += 1;
                let beat = heartbeat_message(shared, tunnel, seq);
                send(&mut wr, &beat).await?;
                if pending.as_ref().is_some_and(|p| p.sent.elapsed() > RENEW_TIMEOUT) {
                    warn!("certificate renewal not answered; retrying later");
                    pending = None;
                    renew_after = Some(Instant::now() + RENEW_RETRY);
                }
                if pending.is_none() && renew_after.is_none_or(|t| Instant::now() >= t) && needs_renewal(shared) {
                    info!(id = next_id, "certificate expires soon: requesting a new one");
                    request_renewal(&mut wr, &mut next_id, &mut pending, &mut renew_after).await?;
                }
            }
            read = rd.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                decoder.push(&buf[..n]);
                let mut asked = false;
                while let Some(message) = decoder.next_message()? {
                    match message {
                        ControlMessage::RenewNow => {
                            asked = true;
                            continue;
                        }
                        ControlMessage::SnapshotAvailable { version } => {
                            shared.notify_snapshots(Notice::Available { version, tunnel: tunnel.clone() });
                            continue;
                        }
                        ControlMessage::NodeRed { action, by } => {
                            shared.notify_snapshots(Notice::NodeRed { action, by });
                            continue;
                        }
                        ControlMessage::MaintenanceWindow { window, by } => {
                            shared.notify_snapshots(Notice::Window { window, by });
                            continue;
                        }
                        _ => {}
                    }
                    handle(shared, message, &mut pending, &mut renew_after).await;
                }
                if asked && pending.is_none() {
                    info!(id = next_id, "the platform asks for a new certificate: requesting one");
                    request_renewal(&mut wr, &mut next_id, &mut pending, &mut renew_after).await?;
                }
            }
        }
    }
}

/// Sends a renewal request with a fresh key and notes it in flight.
async fn request_renewal<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    next_id: &mut u64,
    pending: &mut Option<Pending>,
    renew_after: &mut Option<Instant>,
) -> Result<(), ControlError> {
    match renewal_request(*next_id) {
        Ok((message, key)) => {
            send(wr, &message).await?;
            *pending = Some(Pending {
                id: *next_id,
                key,
                sent: Instant::now(),
            });
            *next_id += 1;
        }
        Err(e) => {
            warn!(cause = %e, "cannot make a renewal request");
            *renew_after = Some(Instant::now() + RENEW_RETRY);
        }
    }
    Ok(())
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    message: &ControlMessage,
) -> Result<(), ControlError> {
    let bytes = control::encode(message)?;
    wr.write_all(&bytes).await?;
    wr.flush().await?;
    Ok(())
}

fn heartbeat_message(shared: &Shared, tunnel: &Tunnel, seq: u64) -> ControlMessage {
    let status = shared.status();
    ControlMessage::Heartbeat(Heartbeat {
        seq,
        uptime_secs: shared.started.elapsed().as_secs(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        rtt_micros: tunnel.rtt().map(|r| r.as_micros() as u64),
        cert_not_after: Some(status.cert_not_after),
        rss_bytes: rss_bytes(),
        streams: Some(tunnel.stream_count() as u64),
        audit: Some(shared.audit.stats().into()),
        snapshot: shared.snapshot_health(),
        health: Some(Box::new(shared.health_sample())),
    })
}

fn needs_renewal(shared: &Shared) -> bool {
    let not_after = shared.current().creds.cert.not_after;
    let now = shared.config.clock.now_unix();
    not_after.saturating_sub(now) < shared.config.renewal.before.as_secs()
}

fn renewal_request(id: u64) -> Result<(ControlMessage, rcgen::KeyPair), String> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let csr = crate::enroll::csr_pem(&key)?;
    Ok((ControlMessage::RenewRequest { id, csr }, key))
}

async fn handle(
    shared: &Arc<Shared>,
    message: ControlMessage,
    pending: &mut Option<Pending>,
    renew_after: &mut Option<Instant>,
) {
    match message {
        ControlMessage::RenewResponse {
            id, certificate, ..
        } => {
            let Some(p) = pending.take_if(|p| p.id == id) else {
                warn!(id, "renewal answer for no request in flight; ignored");
                return;
            };
            match store_renewal(shared, p.key, certificate).await {
                Ok(not_after) => {
                    info!(valid_until = %clock::rfc3339(not_after), "certificate renewed; the next connection uses it");
                    let fingerprint = shared.current().creds.cert.fingerprint.clone();
                    shared.audit.record(AuditEvent::CertificateRenewed {
                        fingerprint,
                        not_after,
                    });
                }
                Err(e) => {
                    warn!(cause = %e, "renewed certificate not used; retrying later");
                }
            }
            // Whatever happened, the next renewal is not due before this.
            *renew_after = Some(Instant::now() + RENEW_RETRY);
        }
        ControlMessage::Error { id, code, message } => {
            if id.is_some() && pending.as_ref().map(|p| p.id) == id {
                *pending = None;
                *renew_after = Some(Instant::now() + RENEW_RETRY);
                warn!(code = %crate::enroll::one_line(&code), message = %crate::enroll::one_line(&message), "the platform refused to renew the certificate; retrying later");
            } else {
                warn!(code = %crate::enroll::one_line(&code), message = %crate::enroll::one_line(&message), "error from the platform on the control stream");
            }
        }
        ControlMessage::Protection { enabled } => set_protection(shared, enabled).await,
        ControlMessage::GrantKeys { rotations } => {
            let audit = shared.audit.clone();
            let shared = shared.clone();
            match tokio::task::spawn_blocking(move || shared.follow_grant_keys(&rotations)).await {
                Ok(Ok(Some(key))) => {
                    info!(grant_key = %key, "the platform rotated its grant key; editor grants are now checked against the new key");
                    audit.record(AuditEvent::GrantKeyRotated { key });
                }
                Ok(Ok(None)) => debug!("grant key rotations: nothing new"),
                Ok(Err(e)) => {
                    warn!(cause = %e, "cannot store the rotated grant key; keeping the old one")
                }
                Err(e) => warn!(cause = %e, "following the grant key rotations failed"),
            }
        }
        // Handled by the stream's loop, which has the tunnel.
        ControlMessage::SnapshotAvailable { .. }
        | ControlMessage::NodeRed { .. }
        | ControlMessage::MaintenanceWindow { .. } => {}
        ControlMessage::Heartbeat(_)
        | ControlMessage::RenewRequest { .. }
        | ControlMessage::RenewNow
        | ControlMessage::Unknown => {
            debug!("control message ignored");
        }
    }
}

/// Applies the platform's protection mode (at once) and stores it (a
/// synced write, on the blocking pool).
async fn set_protection(shared: &Arc<Shared>, enabled: bool) {
    let Some(editor) = shared.editor.clone() else {
        debug!(enabled, "protection mode ignored: editor access is off");
        return;
    };
    let stored = tokio::task::spawn_blocking(move || editor.protection().set(enabled)).await;
    match stored {
        Ok(Ok(true)) => {
            info!(enabled, "instance protection mode changed");
            shared
                .audit
                .record(AuditEvent::ProtectionChanged { enabled });
        }
        Ok(Ok(false)) => debug!(enabled, "instance protection mode unchanged"),
        Ok(Err(e)) => {
            warn!(enabled, cause = %e, "instance protection mode applied but not stored; it may not survive a restart")
        }
        Err(e) => warn!(cause = %e, "storing the protection mode failed"),
    }
}

/// Checks a renewed certificate against the new key and stores the pair.
async fn store_renewal(
    shared: &Arc<Shared>,
    key: rcgen::KeyPair,
    certificate: String,
) -> Result<u64, String> {
    let info = CertInfo::from_pem(certificate.as_bytes())
        .map_err(|e| format!("the renewed certificate: {e}"))?;
    if info.public_key != key.public_key_raw() {
        return Err("the renewed certificate is not for the new key".into());
    }
    let current = shared.current().identity.clone();
    if info.common_name.as_deref() != Some(current.device_id.as_str()) {
        return Err("the renewed certificate names another device".into());
    }
    let not_after = info.not_after;
    let shared2 = shared.clone();
    let key_pem = key.serialize_pem();
    let now = shared.config.clock.now_unix();
    tokio::task::spawn_blocking(move || {
        let next = shared2
            .state
            .switch_pair(&current, &key_pem, &certificate, now)
            .map_err(|e| e.to_string())?;
        let creds = shared2
            .state
            .credentials(&next)
            .map_err(|e| e.to_string())?;
        shared2.replace_current(next, creds);
        Ok::<_, String>(())
    })
    .await
    .map_err(|e| format!("storing the renewal failed: {e}"))??;
    Ok(not_after)
}

/// Resident memory of this process, from `/proc/self/status`.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_proc() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 1024 * 1024, "{rss}");
    }

    #[test]
    fn a_renewal_request_carries_a_csr_of_a_fresh_key() {
        let (message, key) = renewal_request(3).unwrap();
        let ControlMessage::RenewRequest { id, csr } = message else {
            panic!("not a renew request")
        };
        assert_eq!(id, 3);
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let (_, other) = renewal_request(4).unwrap();
        assert_ne!(key.public_key_raw(), other.public_key_raw());
    }
}
