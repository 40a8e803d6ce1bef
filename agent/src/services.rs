//! TCP services: the allow-list of `[[service]]` entries, and the bridge
//! between an accepted tunnel stream and a local TCP connection.
//!
//! A stream for `tcp:NAME` is accepted only if NAME is in the allow-list;
//! every other stream is reset with `REFUSED` and a reason the platform
//! shows to the person who asked. This module never opens a connection to an
//! address that is not in the config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::tokio_io::{Tunnel, TunnelStream};
use tether_proto::{ResetCode, Service, ServiceHeader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::agent::Shared;
use crate::config::ServiceConfig;

/// Deadline for connecting to a local service.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction.
const COPY_BUFFER: usize = 64 * 1024;

/// The allow-list: service name to local address.
#[derive(Clone, Debug, Default)]
pub struct Services {
    targets: HashMap<String, SocketAddr>,
}

impl Services {
    pub fn new(services: &[ServiceConfig]) -> Services {
        Services {
            targets: services
                .iter()
                .map(|s| (s.name.clone(), s.target))
                .collect(),
        }
    }

    /// Whether a stream the platform opens may be accepted; the reset code
    /// and reason if not.
    pub fn decide(&self, header: &ServiceHeader) -> Result<SocketAddr, (ResetCode, String)> {
        let refuse = |reason: String| Err((ResetCode::REFUSED, reason));
        match &header.service {
            Service::Tcp(name) => match self.targets.get(name) {
                Some(addr) => Ok(*addr),
                None => refuse(format!("service '{name}' is not allow-listed on this device")),
            },
            Service::Editor => refuse("editor access is not available in this version of tetherd; it arrives in a later version".into()),
            Service::Mqtt => refuse("mqtt is not available in this version of tetherd; it arrives in a later version".into()),
            Service::Control => refuse("the device opens the control stream; the platform may not".into()),
            other => refuse(format!("service '{other}' is not known to this device")),
        }
    }
}

/// Accepts the platform's streams until the tunnel closes.
pub(crate) async fn serve(shared: Arc<Shared>, tunnel: Tunnel) {
    let mut bridges = JoinSet::new();
    loop {
        let accepted = tunnel
            .accept_filtered(|header| match shared.services.decide(header) {
                Ok(_) => Ok(()),
                Err((code, reason)) => {
                    warn!(service = %header.service, %reason, "stream refused");
                    Err((code, reason))
                }
            })
            .await;
        let Some((stream, header)) = accepted else {
            break;
        };
        // Accepted above, so the lookup succeeds; a refusal here would mean
        // the allow-list changed, which it cannot.
        let Ok(target) = shared.services.decide(&header) else {
            continue;
        };
        let span = info_span!("stream", id = stream.id().0, service = %header.service, %target);
        bridges.spawn(bridge(stream, target).instrument(span));
        // Reap finished bridges so the set does not grow with the tunnel's age.
        while bridges.try_join_next().is_some() {}
    }
    bridges.abort_all();
    while bridges.join_next().await.is_some() {}
}

/// Connects to the local target and copies both ways until both sides end.
async fn bridge(mut stream: TunnelStream, target: SocketAddr) {
    let tcp = match tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            warn!(cause = %e, "cannot connect to the local service");
            stream.reset(
                ResetCode::REFUSED,
                &format!("the device cannot connect to {target}: {e}"),
            );
            return;
        }
        Err(_) => {
            warn!("the local service did not answer in time");
            stream.reset(
                ResetCode::REFUSED,
                &format!(
                    "the device cannot connect to {target}: no answer within {} s",
                    TARGET_CONNECT_TIMEOUT.as_secs()
                ),
            );
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    debug!("stream open");
    match tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, COPY_BUFFER, COPY_BUFFER)
        .await
    {
        Ok((to_service, from_service)) => info!(to_service, from_service, "stream closed"),
        Err(e) => {
            info!(cause = %e, "stream ended with an error");
            stream.reset(ResetCode::CANCEL, "the local connection failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Services {
        Services::new(&[ServiceConfig {
            name: "ssh".into(),
            target: "127.0.0.1:22".parse().unwrap(),
        }])
    }

    #[test]
    fn only_allow_listed_tcp_services_are_accepted() {
        let s = services();
        assert_eq!(
            s.decide(&ServiceHeader::new(Service::Tcp("ssh".into()))),
            Ok("127.0.0.1:22".parse().unwrap())
        );
        let (code, reason) = s
            .decide(&ServiceHeader::new(Service::Tcp("db".into())))
            .unwrap_err();
        assert_eq!(code, ResetCode::REFUSED);
        assert_eq!(reason, "service 'db' is not allow-listed on this device");
        for service in [Service::Editor, Service::Mqtt] {
            let (code, reason) = s.decide(&ServiceHeader::new(service)).unwrap_err();
            assert_eq!(code, ResetCode::REFUSED);
            assert!(reason.contains("later version"), "{reason}");
        }
        assert!(s.decide(&ServiceHeader::new(Service::Control)).is_err());
    }
}
