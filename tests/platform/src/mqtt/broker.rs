//! Which MQTT broker the platform bridges devices to: an embedded rumqttd
//! on loopback, or an external broker named by a `mqtt://` or `mqtts://`
//! URL (TLS: rustls with the ring provider, trusting only `--mqtt-ca`).
//!
//! This module owns choosing and starting the broker and the broker's
//! address and credentials. It never logs or prints a password (the
//! [`BrokerUrl`]'s `Debug` and `Display` leave it out), never binds
//! anything but 127.0.0.1, and never speaks MQTT itself (`super::link`
//! does).
//!
//! rumqttd cannot be stopped: once started, the embedded broker runs on its
//! own threads until the process exits.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::api::Secret;
use tracing::{info, warn};

/// How long the embedded broker may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the embedded broker holds at once (one per device, plus
/// platform-side clients). rumqttd allocates its tables for this many up
/// front.
pub const EMBEDDED_MAX_CONNECTIONS: usize = 10_000;
/// Bytes of one commit-log segment of the embedded broker (per topic:
/// rumqttd keeps a log per filter and per topic published without a
/// subscriber). A segment holds at least one whole message.
const SEGMENT_BYTES: usize = 2 * 1024 * 1024;
/// Segments kept per log.
const SEGMENTS: usize = 2;

/// Why the broker could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "'{url}' is not a usable MQTT broker URL: {why}; help: give mqtt://[USER[:PASSWORD]@]HOST[:PORT]"
    )]
    BadUrl { url: String, why: String },
    #[error(
        "cannot use port {port} on 127.0.0.1 for the embedded MQTT broker: {cause}; help: pass another --mqtt-port (0 picks a free one), or --mqtt-broker URL to use a running broker"
    )]
    Port { port: u16, cause: std::io::Error },
    #[error("the embedded MQTT broker did not start: {0}")]
    Start(String),
    #[error(
        "TLS to the MQTT broker cannot be set up: {0}; help: pass --mqtt-ca with the PEM file of the CA that signed the broker's certificate"
    )]
    Tls(String),
}

/// Where the platform's broker is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MqttBroker {
    /// No broker: devices' `mqtt` streams are refused.
    #[default]
    Off,
    /// An embedded rumqttd on 127.0.0.1: MQTT 5 on `port`, and MQTT 3.1.1
    /// on `v4_port` if set (0 picks a free port for either).
    Embedded { port: u16, v4_port: Option<u16> },
    /// A broker that runs on its own (mosquitto, EMQX, ...).
    External(BrokerUrl),
}

/// `mqtt://[USER[:PASSWORD]@]HOST[:PORT]` (port 1883 by default), or
/// `mqtts://...` (TLS, port 8883 by default).
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `mqtts://`: TLS, the broker's certificate checked against
    /// [`BrokerUrl::ca_file`] and the host.
    pub tls: bool,
    /// The CA (PEM) of an `mqtts://` broker; not part of the URL
    /// (`--mqtt-ca`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl BrokerUrl {
    /// Parses a broker URL. `tcp://` is taken as `mqtt://`, `ssl://` as
    /// `mqtts://`; WebSocket is not supported.
    pub fn parse(url: &str) -> Result<BrokerUrl, BrokerError> {
        // The error shows the URL without its user part (it may hold a password).
        let shown = match url.rsplit_once('@') {
            Some((before, host)) => match before.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://...@{host}"),
                None => format!("...@{host}"),
            },
            None => url.to_owned(),
        };
        let bad = |why: &str| BrokerError::BadUrl {
            url: shown.clone(),
            why: why.to_owned(),
        };
        let (rest, tls) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false),
            Some(("mqtts" | "ssl", rest)) => (rest, true),
            Some(("ws" | "wss", _)) => {
                return Err(bad(
                    "MQTT over WebSocket is not supported: use mqtt:// or mqtts://",
                ));
            }
            _ => return Err(bad("it must start with mqtt:// or mqtts://")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(bad("a broker URL has no path, query or fragment"));
        }
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((user, hostport)) => (Some(user), hostport),
            None => (None, rest),
        };
        let (username, password) = match user {
            None => (None, None),
            Some(user) => match user.split_once(':') {
                Some((name, password)) => (Some(name.to_owned()), Some(Secret::new(password))),
                None => (Some(user.to_owned()), None),
            },
        };
        if username.as_deref() == Some("") {
            return Err(bad("the user name is empty"));
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing ']'"))?;
            match after {
                "" => (host, None),
                port => (
                    host,
                    Some(
                        port.strip_prefix(':')
                            .ok_or_else(|| bad("expected ':PORT' after the IPv6 address"))?,
                    ),
                ),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad("the host is empty or has spaces"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
        };
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            username,
            password,
            tls,
            ca_file: None,
        })
    }

    /// The socket address, when the host is an IP address.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

impl std::fmt::Display for BrokerUrl {
    /// `mqtt(s)://HOST:PORT`, with the user name but never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls { "mqtts://" } else { "mqtt://" })?;
        if let Some(user) = &self.username {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = BrokerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BrokerUrl::parse(s)
    }
}

/// The broker in use, once started.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// What the per-device clients connect to.
    pub(crate) url: BrokerUrl,
    /// The embedded broker's MQTT 3.1.1 listener.
    pub(crate) v4: Option<SocketAddr>,
    /// rumqttd: it ignores MQTT 5's "no local" subscription option.
    pub(crate) embedded: bool,
    /// For an `mqtts://` broker: rustls with the ring provider, trusting
    /// only its CA file.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// Starts the broker `broker` names; `None` when it is [`MqttBroker::Off`].
/// `max_packet` is the largest MQTT packet the embedded broker accepts.
pub(crate) async fn start(
    broker: &MqttBroker,
    max_packet: usize,
) -> Result<Option<Endpoint>, BrokerError> {
    match broker {
        MqttBroker::Off => Ok(None),
        MqttBroker::External(url) => {
            info!(broker = %url, "MQTT: using an external broker");
            Ok(Some(Endpoint {
                url: url.clone(),
                v4: None,
                embedded: false,
                tls: tls_config(url)?,
            }))
        }
        MqttBroker::Embedded { port, v4_port } => {
            let v5 = free_port(*port)?;
            let v4 = match v4_port {
                Some(p) => Some(free_port(*p)?),
                None => None,
            };
            if Some(v5) == v4 {
                return Err(BrokerError::Start(format!(
                    "the MQTT 5 and MQTT 3.1.1 listeners cannot share port {}",
                    v5.port()
                )));
            }
            let config = embedded_config(v5, v4, max_packet);
            std::thread::Builder::new()
                .name("mqtt-broker".into())
                .spawn(move || {
                    let mut broker = rumqttd::Broker::new(config);
                    if let Err(e) = broker.start() {
                        warn!(cause = %e, "the embedded MQTT broker stopped");
                    }
                })
                .map_err(|e| BrokerError::Start(format!("cannot start its thread: {e}")))?;
            for addr in std::iter::once(v5).chain(v4) {
                wait_listening(addr).await?;
            }
            info!(mqtt5 = %v5, mqtt311 = ?v4, "MQTT: embedded broker listening");
            Ok(Some(Endpoint {
                url: BrokerUrl {
                    host: Ipv4Addr::LOCALHOST.to_string(),
                    port: v5.port(),
                    username: None,
                    password: None,
                    tls: false,
                    ca_file: None,
                },
                v4,
                embedded: true,
                tls: None,
            }))
        }
    }
}

/// The TLS settings for `url` (`None` without TLS): its CA file as the only
/// trust anchor, read once when the platform starts.
fn tls_config(url: &BrokerUrl) -> Result<Option<Arc<rustls::ClientConfig>>, BrokerError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    if !url.tls {
        return Ok(None);
    }
    let path = url
        .ca_file
        .as_ref()
        .ok_or_else(|| BrokerError::Tls(format!("{url} needs a CA file")))?;
    let tls = |why: String| BrokerError::Tls(format!("'{}': {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| tls(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(|e| tls(e.to_string()))?)
            .map_err(|e| tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(tls("no certificate in it".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// 127.0.0.1:`port`, after checking that it is free (rumqttd only logs a
/// failure to bind, and another broker on the port would answer in its
/// place); port 0 picks a free port.
fn free_port(port: u16) -> Result<SocketAddr, BrokerError> {
    let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|cause| BrokerError::Port { port, cause })?;
    probe
        .local_addr()
        .map_err(|cause| BrokerError::Port { port, cause })
}

/// Waits until something listens on `addr` (the port was free just
/// before). A bare TCP probe, not an MQTT session: rumqttd reuses a closed
/// session's connection id before it is done with it, and the next client
/// to connect can be dropped in its place.
async fn wait_listening(addr: SocketAddr) -> Result<(), BrokerError> {
    let start = Instant::now();
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > START_TIMEOUT => {
                return Err(BrokerError::Start(format!(
                    "nothing listens on {addr} after {START_TIMEOUT:?} ({e}); TETHER_PLATFORM_LOG=rumqttd=info shows rumqttd's reason"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The embedded broker's rumqttd configuration: MQTT 5 on `v5`, MQTT 3.1.1
/// on `v4` if given, packets up to `max_packet` bytes. Public for tests
/// that run the same broker in a process of their own.
pub fn embedded_config(
    v5: SocketAddr,
    v4: Option<SocketAddr>,
    max_packet: usize,
) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_packet,
        max_inflight_count: 256,
        auth: None,
        external_auth: None,
        // Without it rumqttd disconnects a client that publishes on a
        // topic nobody subscribed to.
        dynamic_filters: true,
    };
    let server = |name: &str, listen| rumqttd::ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let mut v5_servers = HashMap::new();
    v5_servers.insert("1".to_owned(), server("mqtt5", v5));
    let v4_servers = v4.map(|addr| {
        let mut servers = HashMap::new();
        servers.insert("1".to_owned(), server("mqtt311", addr));
        servers
    });
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: EMBEDDED_MAX_CONNECTIONS,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENTS,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: v4_servers,
        v5: Some(v5_servers),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_and_never_show_the_password() {
        let url = BrokerUrl::parse("mqtt://bridge:s3cr:et@broker.example:8883").unwrap();
        assert_eq!(url.host, "broker.example");
        assert_eq!(url.port, 8883);
        assert_eq!(url.username.as_deref(), Some("bridge"));
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("s3cr:et"));
        assert_eq!(url.to_string(), "mqtt://bridge@broker.example:8883");
        assert!(!format!("{url:?}").contains("s3cr"));
        let v6 = BrokerUrl::parse("tcp://[::1]").unwrap();
        assert_eq!(v6.socket_addr(), Some("[::1]:1883".parse().unwrap()));
        assert_eq!(v6.to_string(), "mqtt://[::1]:1883");
        let tls = BrokerUrl::parse("mqtts://broker").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.to_string(), "mqtts://broker:8883");
        for bad in [
            "broker:1883",
            "wss://broker",
            "mqtt://",
            "mqtt://host:0",
            "mqtt://host:x",
            "mqtt://host/path",
            "mqtt://:pw@host",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
        let e = BrokerUrl::parse("wss://u:topsecret@h").unwrap_err();
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }
}
