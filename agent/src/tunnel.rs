//! One connection to the platform: TCP, TLS with the device certificate,
//! the WebSocket upgrade to `/v1/tunnel` and the tether-proto handshake, each
//! within a deadline. A failure is a [`ConnectError`] that knows whether
//! retrying soon can help ([`ConnectError::retry`]).
//!
//! This module owns a single attempt. It never retries, never sleeps and
//! never decides on delays: `reconnect` does.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tether_proto::api::{ApiError, ErrorCode};
use tether_proto::tokio_io::{DriverError, Tunnel, websocket_config};
use tether_proto::{CloseCode, ConnectionError};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite;

use crate::clock::{self, Clock};
use crate::net::{self, DialError, Endpoint};
use crate::tls::{self, TlsFailure};

/// Deadline for TLS, the WebSocket upgrade and the HELLO exchange together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether an attempt is worth repeating soon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// A transient fault: retry with exponential backoff.
    Soon,
    /// Only an operator can fix it (revoked, untrusted, expired, clock):
    /// retry slowly so that a fix is picked up without a hot loop.
    Slowly,
}

/// Why a connection attempt failed. `Display` is one line with help.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("platform unreachable: {0}")]
    Dial(#[from] DialError),
    #[error("no tunnel handshake with {target} within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout { target: String },
    #[error(
        "this device was revoked by the platform; help: re-enroll it with a new token ('tetherd enroll --force') if that was a mistake"
    )]
    Revoked,
    #[error(
        "the platform does not know this device's certificate; help: re-enroll it ('tetherd enroll --force')"
    )]
    UnknownDevice,
    #[error(
        "the platform refused this device's certificate: {reason}; help: if this is the device's only copy, re-enroll it ('tetherd enroll --force'); if the state directory was copied to another machine, only one of them may keep this identity"
    )]
    CertificateRefused { reason: String },
    #[error("the device certificate expired at {}; help: re-enroll it with a new token ('tetherd enroll --force')", clock::rfc3339(*not_after))]
    CertificateExpired { not_after: u64 },
    #[error(
        "the platform at {target} is not the one this device enrolled with: its certificate {reason}; help: check the platform address, or re-enroll against the new platform"
    )]
    Untrusted { target: String, reason: String },
    #[error(
        "the platform refused this device's certificate ({alert}); help: the certificate may have expired or been replaced: re-enroll ('tetherd enroll --force')"
    )]
    Rejected { alert: String },
    #[error("the device clock reads {device_time}, {detail}; help: set the clock (enable NTP)")]
    Clock { device_time: String, detail: String },
    #[error("the platform answered the tunnel request with HTTP {status}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Http { status: u16, detail: Option<String> },
    #[error("tunnel connection failed: {0}")]
    Transport(String),
    #[error("tunnel handshake failed: {0}")]
    Handshake(ConnectionError),
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

impl ConnectError {
    /// Whether retrying soon can help.
    pub fn retry(&self) -> Retry {
        match self {
            ConnectError::Revoked
            | ConnectError::UnknownDevice
            | ConnectError::CertificateRefused { .. }
            | ConnectError::CertificateExpired { .. }
            | ConnectError::Untrusted { .. }
            | ConnectError::Rejected { .. }
            | ConnectError::Clock { .. }
            | ConnectError::Setup(_) => Retry::Slowly,
            ConnectError::Handshake(ConnectionError::VersionMismatch { .. }) => Retry::Slowly,
            ConnectError::Handshake(e) if closed_as_revoked(e) => Retry::Slowly,
            _ => Retry::Soon,
        }
    }
}

/// True if the platform closed the tunnel because the device is revoked.
pub fn closed_as_revoked(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::PeerClosed { code, .. } if *code == CloseCode::REVOKED)
}

/// A tunnel that completed its handshake, and its running driver.
#[derive(Debug)]
pub struct Connected {
    pub tunnel: Tunnel,
    pub driver: JoinHandle<Result<(), DriverError>>,
}

/// Bytes read from the tunnel's socket per system call at most.
const TUNNEL_READ_BUFFER: usize = 64 * 1024;

/// Makes one connection attempt to `endpoint` (`wss://HOST:PORT/v1/tunnel`).
pub async fn connect(
    endpoint: &Endpoint,
    tls_config: Arc<rustls::ClientConfig>,
    proto: tether_proto::Config,
    clock: Clock,
) -> Result<Connected, ConnectError> {
    let tcp = net::dial(endpoint).await?;
    let target = endpoint.authority();
    let handshake = async {
        let server_name = ServerName::try_from(endpoint.host.clone()).map_err(|_| {
            ConnectError::Setup(format!("'{}' is not a valid host name", endpoint.host))
        })?;
        // rustls reads the socket 4 KiB at a time; a buffer under it turns the
        // four or five reads per 16 KiB TLS record into one system call
        // (`docs/benchmarks.md`, "Bulk throughput").
        let tcp = tokio::io::BufReader::with_capacity(TUNNEL_READ_BUFFER, tcp);
        let tls = tokio_rustls::TlsConnector::from(tls_config)
            .connect(server_name, tcp)
            .await
            .map_err(|e| classify_io(&e, &target, clock))?;
        let url = format!("wss://{}{}", endpoint.authority(), endpoint.path);
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            tls,
            Some(websocket_config(&proto.settings)),
        )
        .await
        .map_err(|e| classify_ws(e, &target, clock))?;
        let (tunnel, driver) =
            Tunnel::new(ws, proto).map_err(|e| ConnectError::Setup(e.to_string()))?;
        let driver = tokio::spawn(driver);
        match tunnel.connected().await {
            Ok(_) => Ok(Connected { tunnel, driver }),
            Err(e) => {
                driver.abort();
                Err(ConnectError::Handshake(e))
            }
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(result) => result.map_err(|e| match e {
            ConnectError::Handshake(e) if closed_as_revoked(&e) => ConnectError::Revoked,
            other => other,
        }),
        Err(_) => Err(ConnectError::Timeout { target }),
    }
}

fn classify_io(err: &std::io::Error, target: &str, clock: Clock) -> ConnectError {
    match tls::classify(err) {
        Some(failure) => from_tls(failure, target, clock),
        None => ConnectError::Transport(err.to_string()),
    }
}

fn from_tls(failure: TlsFailure, target: &str, clock: Clock) -> ConnectError {
    let device_time = clock::rfc3339(clock.now_unix());
    let clock_detail = failure.clock_detail();
    match failure {
        TlsFailure::NotValidYet { .. } | TlsFailure::Expired { .. } => ConnectError::Clock {
            device_time,
            detail: clock_detail.unwrap_or_default(),
        },
        TlsFailure::Untrusted(reason) => ConnectError::Untrusted {
            target: target.to_owned(),
            reason,
        },
        TlsFailure::Rejected(alert) => ConnectError::Rejected { alert },
    }
}

fn classify_ws(err: tungstenite::Error, target: &str, clock: Clock) -> ConnectError {
    match err {
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let api: Option<ApiError> = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok());
            match api.as_ref().map(|a| a.error) {
                Some(ErrorCode::DeviceRevoked) => ConnectError::Revoked,
                Some(ErrorCode::DeviceUnknown) => ConnectError::UnknownDevice,
                Some(ErrorCode::CertificateRevoked | ErrorCode::CertificateSuperseded) => {
                    ConnectError::CertificateRefused {
                        reason: api
                            .map(|a| crate::enroll::one_line(&a.message))
                            .unwrap_or_default(),
                    }
                }
                _ => ConnectError::Http {
                    status,
                    detail: api.map(|a| crate::enroll::one_line(&a.message)),
                },
            }
        }
        tungstenite::Error::Io(io) => classify_io(&io, target, clock),
        other => match tls::classify(&other) {
            Some(failure) => from_tls(failure, target, clock),
            None => ConnectError::Transport(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_problems_are_retried_slowly_and_network_problems_soon() {
        assert_eq!(ConnectError::Revoked.retry(), Retry::Slowly);
        assert_eq!(
            ConnectError::CertificateExpired { not_after: 0 }.retry(),
            Retry::Slowly
        );
        assert_eq!(
            ConnectError::Untrusted {
                target: "x".into(),
                reason: "y".into()
            }
            .retry(),
            Retry::Slowly
        );
        assert_eq!(
            ConnectError::Timeout { target: "x".into() }.retry(),
            Retry::Soon
        );
        assert_eq!(
            ConnectError::Handshake(ConnectionError::TransportClosed).retry(),
            Retry::Soon
        );
        assert_eq!(
            ConnectError::Handshake(ConnectionError::PeerClosed {
                code: CloseCode::REVOKED,
                reason: String::new()
            })
            .retry(),
            Retry::Slowly
        );
    }

    #[test]
    fn a_403_device_revoked_answer_means_revoked() {
        let body = serde_json::to_vec(&ApiError {
            error: ErrorCode::DeviceRevoked,
            message: "revoked".into(),
        })
        .unwrap();
        let response = http::Response::builder()
            .status(403)
            .body(Some(body))
            .unwrap();
        let err = classify_ws(
            tungstenite::Error::Http(Box::new(response)),
            "x",
            Clock::system(),
        );
        assert!(matches!(err, ConnectError::Revoked), "{err}");
    }
}
