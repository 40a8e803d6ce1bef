//! The platform's side of the MQTT bridge (`docs/protocol.md` §19,
//! `docs/mqtt.md`): the broker devices' messages go to, and each device's
//! `mqtt` stream.
//!
//! This module owns the broker (an embedded rumqttd on loopback, or an
//! external broker; `broker`), one MQTT 5 client per device that lives on
//! while the device is offline so messages for it are kept, bounded
//! (`link`), each stream's exchange and publish rate (`stream`), and the
//! per-device counts `tether-platform device show` prints ([`MqttStats`]).
//! A device's namespace comes from the platform's record of it (its id
//! from the tunnel's certificate, its team from the store), never from
//! anything the device says. It never publishes or routes a message
//! outside that namespace, never drops a device's QoS 1 or 2 message to
//! slow it down (it reads the stream more slowly), never keeps more than
//! its bounds per device, and never logs broker credentials.

mod broker;
mod link;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tether_proto::mqtt::{Figures, MAX_FRAME, MAX_PAYLOAD, Namespace};
use tokio::io::{AsyncRead, AsyncWrite};

pub use broker::{BrokerError, BrokerUrl, EMBEDDED_MAX_CONNECTIONS, MqttBroker, embedded_config};
pub use link::{MAX_PENDING, MAX_PENDING_BYTES};
pub use stream::StreamError;

use link::Link;

/// The MQTT bridge's configuration ([`crate::PlatformConfig::mqtt`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttConfig {
    /// Which broker; [`MqttBroker::Off`] by default (`tether-platform
    /// serve` starts an embedded one unless told otherwise).
    pub broker: MqttBroker,
    /// Largest payload a device may publish, at most
    /// `tether_proto::mqtt::MAX_PAYLOAD` (1 MiB, the default).
    pub max_payload: usize,
    /// Messages a second one device may publish; past it its stream is
    /// read more slowly (nothing is dropped).
    pub rate_per_sec: u32,
    /// Messages one device may publish at once before the rate applies.
    pub rate_burst: u32,
    /// Messages kept for one device until it acknowledges them, also while
    /// it is offline; when full the oldest is dropped and counted.
    pub queue_messages: usize,
    /// ... and their bytes (topic, properties and payload).
    pub queue_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> MqttConfig {
        MqttConfig {
            broker: MqttBroker::Off,
            max_payload: MAX_PAYLOAD,
            rate_per_sec: 50_000,
            rate_burst: 100_000,
            queue_messages: 10_000,
            queue_bytes: 16 * 1024 * 1024,
        }
    }
}

impl MqttConfig {
    /// The defaults with an embedded broker on free ports (MQTT 5 only).
    pub fn embedded() -> MqttConfig {
        MqttConfig {
            broker: MqttBroker::Embedded {
                port: 0,
                v4_port: None,
            },
            ..MqttConfig::default()
        }
    }

    /// Checks what would otherwise fail later.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_payload == 0 || self.max_payload > MAX_PAYLOAD {
            return Err(format!(
                "the MQTT payload limit must be 1 to {MAX_PAYLOAD} bytes"
            ));
        }
        if self.rate_per_sec == 0 || self.rate_burst == 0 {
            return Err("the MQTT publish rate and burst must be at least 1".into());
        }
        if self.queue_messages == 0 || self.queue_bytes < MAX_PAYLOAD {
            return Err(format!(
                "a device's MQTT queue must hold at least 1 message and {MAX_PAYLOAD} bytes"
            ));
        }
        Ok(())
    }
}

/// One device's bridge counts (`device show`, the admin API's device JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttStats {
    /// An `mqtt` stream of the device is open now.
    pub stream: bool,
    /// The device's client on the platform's broker is connected.
    pub broker_connected: bool,
    /// The filters the device subscribed to (those accepted).
    pub filters: Vec<String>,
    /// The broker confirmed those subscriptions: messages on them are
    /// routed to the device from now on.
    pub subscribed: bool,
    /// The device's messages up to this `seq` are handled.
    pub delivered: u64,
    /// Messages from the device its broker accepted.
    pub from_device: u64,
    /// Messages sent to the device (resends after a reconnect not
    /// counted again).
    pub to_device: u64,
    /// QoS 1 and 2 messages the device acknowledged.
    pub acked_by_device: u64,
    /// Messages and filters refused either way: outside the namespace,
    /// over a limit, refused by the broker or by the device.
    pub refused: u64,
    /// The last refusal: what and why.
    pub last_refusal: Option<String>,
    /// Messages the device sent again that were already handled (ignored,
    /// acknowledged).
    pub duplicates: u64,
    /// Messages waiting for the device now (sent or not, not yet
    /// acknowledged) and their bytes.
    pub waiting: u64,
    pub waiting_bytes: u64,
    /// QoS 1 and 2 messages that arrived while the device had no stream,
    /// kept for it.
    pub queued_offline: u64,
    /// Oldest messages dropped because the device's queue was full.
    pub dropped: u64,
    /// QoS 0 messages for the device dropped while it had no stream.
    pub qos0_dropped: u64,
    /// The device's last figures (its outbox), if it sent any.
    pub figures: Option<Figures>,
}

/// The broker and every device's link to it.
#[derive(Debug)]
pub struct Bridge {
    config: MqttConfig,
    endpoint: broker::Endpoint,
    /// Names this process's sequence of messages to devices.
    epoch: u64,
    links: Mutex<HashMap<String, Arc<Link>>>,
    streams: AtomicU64,
}

impl Bridge {
    /// Starts the configured broker (or checks the external one's URL);
    /// `None` when MQTT is off.
    pub async fn start(config: &MqttConfig) -> Result<Option<Bridge>, BrokerError> {
        let max_packet = MAX_FRAME + 64 * 1024;
        let Some(endpoint) = broker::start(&config.broker, max_packet).await? else {
            return Ok(None);
        };
        Ok(Some(Bridge {
            config: config.clone(),
            endpoint,
            epoch: epoch(),
            links: Mutex::default(),
            streams: AtomicU64::new(0),
        }))
    }

    /// `mqtt://HOST:PORT` of the broker (without credentials).
    pub fn broker_url(&self) -> String {
        let mut url = self.endpoint.url.clone();
        url.username = None;
        url.to_string()
    }

    /// The broker's address: the embedded broker's MQTT 5 listener, or the
    /// external broker's when its host is an IP address.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.endpoint.url.socket_addr()
    }

    /// The embedded broker's MQTT 3.1.1 listener, if it has one.
    pub fn v4_addr(&self) -> Option<SocketAddr> {
        self.endpoint.v4
    }

    /// The hello's `epoch`: fixed for the process.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The device's counts, if it ever opened an `mqtt` stream since the
    /// platform started.
    pub fn stats(&self, device_id: &str) -> Option<MqttStats> {
        self.lock().get(device_id).map(|l| l.stats())
    }

    /// Serves one `mqtt` stream of device `device_id` of team `team` (the
    /// platform's record, not the device's word) until it ends. A newer
    /// stream of the same device replaces this one.
    pub async fn serve<S>(&self, device_id: &str, team: &str, io: S) -> Result<(), StreamError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ns = Namespace::new(team, device_id).map_err(StreamError::Namespace)?;
        let link = self.link(device_id, ns);
        let stream = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        stream::run(link, stream, self.epoch, self.config.max_payload, io).await
    }

    /// Disconnects a device's client and forgets what was kept for it
    /// (the device was revoked).
    pub fn forget(&self, device_id: &str) {
        if let Some(link) = self.lock().remove(device_id) {
            link.stop();
        }
    }

    /// Disconnects every device's client from the broker.
    pub fn shutdown(&self) {
        for link in self.lock().drain().map(|(_, l)| l) {
            link.stop();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Link>>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's link, started on first use (or again if its namespace
    /// changed: its team was changed).
    fn link(&self, device_id: &str, ns: Namespace) -> Arc<Link> {
        let mut links = self.lock();
        if let Some(link) = links.get(device_id) {
            if link.ns == ns {
                return link.clone();
            }
            link.stop();
        }
        let link = Link::start(&self.endpoint, device_id, ns, &self.config);
        links.insert(device_id.to_owned(), link.clone());
        link
    }
}

/// A random epoch (the start time if no randomness is to be had).
fn epoch() -> u64 {
    match crate::keys::random_bytes::<8>() {
        Ok(bytes) => u64::from_be_bytes(bytes),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// Serves a device's `mqtt` stream on its tunnel. It is refused (reset,
/// with the reason) when the device has no namespace; a malformed frame
/// resets it too.
pub(crate) async fn serve_tunnel(
    state: Arc<crate::platform::State>,
    device_id: String,
    mut stream: tether_proto::tokio_io::TunnelStream,
) {
    use tether_proto::ResetCode;
    use tracing::{debug, warn};
    let Some(bridge) = &state.mqtt else {
        return stream.reset(ResetCode::REFUSED, &StreamError::Off.to_string());
    };
    let id = device_id.clone();
    let team = match state.store.blocking(move |s| s.device(&id)).await {
        Ok(Some(device)) => device.team,
        Ok(None) => return stream.reset(ResetCode::REFUSED, "the device is not enrolled"),
        Err(e) => {
            warn!(cause = %e, "MQTT: cannot read the device's record; refusing its mqtt stream");
            return stream.reset(
                ResetCode::INTERNAL_ERROR,
                "the platform cannot read its device records",
            );
        }
    };
    match bridge.serve(&device_id, &team, &mut stream).await {
        Ok(()) => debug!("MQTT: stream ended"),
        Err(StreamError::Io(e)) => debug!(cause = %e, "MQTT: stream failed"),
        Err(StreamError::Replaced) => {
            stream.reset(ResetCode::CANCEL, &StreamError::Replaced.to_string());
        }
        Err(e) => {
            warn!(cause = %e, "MQTT: refusing the device's mqtt stream");
            stream.reset(ResetCode::REFUSED, &e.to_string());
        }
    }
}
