//! The platform's streams: the allow-list of `[[service]]` entries, the
//! bridge between an accepted `tcp:NAME` stream and a local TCP connection,
//! and the hand-off of `editor` streams to [`crate::editor`].
//!
//! A stream for `tcp:NAME` is accepted only if NAME is in the allow-list;
//! an `editor` stream is accepted whenever editor access is on (its grant
//! is checked by the editor, which answers a bad one over HTTP); every
//! other stream is reset with `REFUSED` and a reason the platform shows to
//! the person who asked. This module never opens a connection to an
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
use crate::editor::{self, Editor};

/// Deadline for connecting to a local service.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The allow-list: service name to local address, and whether editor
/// streams are served.
#[derive(Clone, Debug, Default)]
pub struct Services {
    targets: HashMap<String, SocketAddr>,
    editor: bool,
    capture: bool,
}

/// Where an accepted stream goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A local TCP service.
    Tcp(SocketAddr),
    /// The editor proxy.
    Editor,
    /// A capture of the flows (`snapshot::capture`).
    Capture,
}

impl Services {
    /// The allow-list of `services`; editor streams are accepted if
    /// `editor` (the agent has an editor target).
    pub fn new(services: &[ServiceConfig], editor: bool) -> Services {
        Services {
            targets: services
                .iter()
                .map(|s| (s.name.clone(), s.target))
                .collect(),
            editor,
            capture: false,
        }
    }

    /// Also accepts the platform's captures of the flows (the agent has a
    /// snapshot folder).
    pub fn with_capture(mut self, capture: bool) -> Services {
        self.capture = capture;
        self
    }

    /// Whether a stream the platform opens may be accepted; the reset code
    /// and reason if not.
    pub fn decide(&self, header: &ServiceHeader) -> Result<Target, (ResetCode, String)> {
        let refuse = |reason: String| Err((ResetCode::REFUSED, reason));
        match &header.service {
            Service::Tcp(name) => match self.targets.get(name) {
                Some(addr) => Ok(Target::Tcp(*addr)),
                None => refuse(format!(
                    "service '{name}' is not allow-listed on this device"
                )),
            },
            Service::Editor if self.editor => Ok(Target::Editor),
            Service::Editor => refuse(
                "editor access is off on this device (no local Node-RED is configured)".into(),
            ),
            Service::Mqtt => refuse(
                "mqtt is not available in this version of tetherd; it arrives in a later version"
                    .into(),
            ),
            Service::Snapshot if self.capture && crate::snapshot::capture::is_capture(header) => {
                Ok(Target::Capture)
            }
            Service::Snapshot if self.capture => {
                refuse("a snapshot stream from the platform must ask for a capture".into())
            }
            Service::Snapshot => refuse(
                "this device has no local Node-RED launched or locked down by the agent, so no flows to capture"
                    .into(),
            ),
            Service::Control => {
                refuse("the device opens the control stream; the platform may not".into())
            }
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
        match (target, &shared.editor) {
            (Target::Tcp(target), _) => {
                let span =
                    info_span!("stream", id = stream.id().0, service = %header.service, %target);
                bridges.spawn(bridge(stream, target).instrument(span));
            }
            (Target::Editor, Some(editor)) => {
                let span = info_span!("stream", id = stream.id().0, service = %header.service);
                let serve = serve_editor(editor.clone(), shared.editor_device(), stream, header);
                bridges.spawn(serve.instrument(span));
            }
            (Target::Capture, _) => match &shared.capture {
                Some(source) => {
                    let span = info_span!("stream", id = stream.id().0, service = %header.service);
                    let by = header
                        .get(tether_proto::snapshot::capture::BY_KEY)
                        .unwrap_or("the platform")
                        .to_owned();
                    let (source, shared) = (source.clone(), shared.clone());
                    bridges.spawn(
                        async move {
                            crate::snapshot::capture::serve(source, stream, by, &shared.audit).await
                        }
                        .instrument(span),
                    );
                }
                None => {
                    let mut stream = stream;
                    stream.reset(ResetCode::REFUSED, "no flows to capture on this device");
                }
            },
            // `decide` accepts editor streams only when there is an editor.
            (Target::Editor, None) => {
                let mut stream = stream;
                stream.reset(ResetCode::REFUSED, "editor access is off on this device");
            }
        }
        // Reap finished bridges so the set does not grow with the tunnel's age.
        while bridges.try_join_next().is_some() {}
    }
    bridges.abort_all();
    while bridges.join_next().await.is_some() {}
}

/// Serves one editor stream (the editor checks its grant first).
async fn serve_editor(
    editor: Arc<Editor>,
    device: editor::Device,
    stream: TunnelStream,
    header: ServiceHeader,
) {
    editor.serve(stream, &header, &device).await;
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
    match tether_proto::tokio_io::copy_bidirectional(&mut stream, &mut tcp).await {
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

    fn services(editor: bool) -> Services {
        Services::new(
            &[ServiceConfig {
                name: "ssh".into(),
                target: "127.0.0.1:22".parse().unwrap(),
            }],
            editor,
        )
    }

    #[test]
    fn only_allow_listed_tcp_services_are_accepted() {
        let s = services(true);
        assert_eq!(
            s.decide(&ServiceHeader::new(Service::Tcp("ssh".into()))),
            Ok(Target::Tcp("127.0.0.1:22".parse().unwrap()))
        );
        let (code, reason) = s
            .decide(&ServiceHeader::new(Service::Tcp("db".into())))
            .unwrap_err();
        assert_eq!(code, ResetCode::REFUSED);
        assert_eq!(reason, "service 'db' is not allow-listed on this device");
        let (code, reason) = s.decide(&ServiceHeader::new(Service::Mqtt)).unwrap_err();
        assert_eq!(code, ResetCode::REFUSED);
        assert!(reason.contains("later version"), "{reason}");
        assert!(s.decide(&ServiceHeader::new(Service::Control)).is_err());
    }

    #[test]
    fn editor_streams_go_to_the_editor_when_it_is_on() {
        let editor = ServiceHeader::new(Service::Editor);
        assert_eq!(services(true).decide(&editor), Ok(Target::Editor));
        let (code, reason) = services(false).decide(&editor).unwrap_err();
        assert_eq!(code, ResetCode::REFUSED);
        assert!(reason.contains("editor access is off"), "{reason}");
    }

    #[test]
    fn captures_are_taken_only_with_a_snapshot_folder_and_when_asked_for() {
        use tether_proto::snapshot::capture::{ACTION_KEY, CAPTURE};
        let capture = ServiceHeader::new(Service::Snapshot).with(ACTION_KEY, CAPTURE);
        let with = services(true).with_capture(true);
        assert_eq!(with.decide(&capture), Ok(Target::Capture));
        let (_, reason) = with
            .decide(&ServiceHeader::new(Service::Snapshot))
            .unwrap_err();
        assert!(reason.contains("must ask for a capture"), "{reason}");
        let (_, reason) = services(true).decide(&capture).unwrap_err();
        assert!(reason.contains("no flows to capture"), "{reason}");
    }
}
