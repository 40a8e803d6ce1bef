//! The agent's configuration file (TOML) and the validated [`Config`] the
//! rest of the agent runs on.
//!
//! The file is read into a `toml::Table` first and every key is checked
//! against the known set and its expected type, so that all the problems in a
//! file are reported at once, each naming its key. Only then is the typed
//! [`Config`] built: it has defaults filled in and no unchecked values. This
//! module never touches the network or the state directory's contents, and
//! never shows a secret: the provisioning token is a [`ProvisioningToken`]
//! (redacted in `Debug`), and [`Config::load`] refuses a file holding one
//! that its group or others may read.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_proto::api::{ProvisioningToken, is_device_name};
use toml::{Table, Value};

use crate::clock::Clock;
use crate::duration;
use crate::window::Window;

/// Where the agent keeps its identity and status unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether";
/// Largest config file read, in bytes.
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// The validated configuration of one agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Identity, keys and the status file live here.
    pub state_dir: PathBuf,
    /// The platform's base URL (`https://HOST:PORT`). Taken from the
    /// enrollment record unless set; needed here only to enroll from `run`.
    pub platform: Option<String>,
    /// CA file to trust for enrollment from `run` (the OS roots without it).
    pub ca: Option<PathBuf>,
    /// One-time token to enroll with when the device has no identity yet.
    /// Ignored once the device is enrolled.
    pub provisioning_token: Option<ProvisioningToken>,
    /// The device's name at enrollment (the hostname without it).
    pub name: Option<String>,
    /// Log filter (`info` without it; `TETHERD_LOG` overrides).
    pub log_level: Option<String>,
    /// Local TCP services the platform may open streams to.
    pub services: Vec<ServiceConfig>,
    /// Overrides of the tunnel's keepalive.
    pub tunnel: TunnelConfig,
    /// Delays between connection attempts.
    pub reconnect: ReconnectConfig,
    /// When to renew the device certificate.
    pub renewal: RenewalConfig,
    /// How often a heartbeat goes to the platform.
    pub heartbeat_interval: Duration,
    /// The local Node-RED: off, launched by the agent, or started by the
    /// operator with the settings the agent writes.
    pub node_red: NodeRedConfig,
    /// `[audit]`: the durable audit queue.
    pub audit: AuditConfig,
    /// `[snapshot]`: how a new snapshot proves healthy.
    pub snapshot: SnapshotConfig,
    /// `[mqtt]`: the bridge between the local broker and the platform's;
    /// off without the section.
    pub mqtt: Option<MqttConfig>,
    /// SHA-256 (hex) of the file this config was loaded from; not a file
    /// key. The agent records `config_changed` when it differs from the
    /// last start's.
    pub source_sha256: Option<String>,
    /// The wall clock; not a file key. Tests shift it to play a device whose
    /// clock is far off.
    pub clock: Clock,
}

/// `[mqtt]`: the local broker and what the bridge carries
/// (`docs/mqtt.md`).
#[derive(Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// The local broker: `HOST:PORT`, `mqtt://HOST[:PORT]` or
    /// `mqtts://HOST[:PORT]` ([`BrokerAddr`]).
    pub broker: String,
    /// With `mqtts://`: the CA (PEM) that the broker's certificate must
    /// chain to, and the agent's own certificate and key for mutual TLS.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The agent's client id on it (`tetherd-<device id>` without it).
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// Never logged, never in `Debug`.
    pub password: Option<String>,
    /// Local topic filters whose messages go to the platform
    /// (`tether/+/<device id>/out/#` without it).
    pub publish: Vec<String>,
    /// Filters the platform routes to the device (its inbound topics and
    /// its team's broadcast topics without it).
    pub subscribe: Option<Vec<String>>,
    /// Largest payload carried; larger messages are refused and audited.
    pub max_payload: usize,
    /// Bounds of the outbox on disk.
    pub outbox_max_bytes: u64,
    pub outbox_max_messages: u64,
    /// `[[mqtt.topic]]`: short local topics for the wire's (none: topics
    /// cross unchanged).
    pub topics: Vec<crate::mqtt::topics::TopicMap>,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("broker", &self.broker)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("publish", &self.publish)
            .field("subscribe", &self.subscribe)
            .field("max_payload", &self.max_payload)
            .field("outbox_max_bytes", &self.outbox_max_bytes)
            .field("outbox_max_messages", &self.outbox_max_messages)
            .field("topics", &self.topics)
            .finish()
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            broker: "127.0.0.1:1883".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            client_id: None,
            username: None,
            password: None,
            publish: Vec::new(),
            subscribe: None,
            max_payload: 256 * 1024,
            outbox_max_bytes: 64 * 1024 * 1024,
            outbox_max_messages: 100_000,
            topics: Vec::new(),
        }
    }
}

impl MqttConfig {
    /// Where the local broker is (`None` if `broker` does not say: the
    /// config check refuses that).
    pub fn endpoint(&self) -> Option<BrokerAddr> {
        BrokerAddr::parse(&self.broker)
    }
}

/// The local broker's address as `[mqtt] broker` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddr {
    /// A name or an IP address (without the brackets of an IPv6 one): what
    /// the broker's certificate must name with TLS.
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddr {
    /// `HOST:PORT`, `mqtt://HOST[:PORT]` (port 1883) or
    /// `mqtts://HOST[:PORT]` (TLS, port 8883); an IPv6 address in brackets.
    pub fn parse(s: &str) -> Option<BrokerAddr> {
        let (rest, tls, default) = if let Some(rest) = s.strip_prefix("mqtts://") {
            (rest, true, Some(8883))
        } else if let Some(rest) = s.strip_prefix("mqtt://") {
            (rest, false, Some(1883))
        } else {
            (s, false, None)
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']')?;
            match after {
                "" => (host, default?),
                port => (host, port.strip_prefix(':')?.parse::<u16>().ok()?),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') => (host, port.parse::<u16>().ok()?),
                Some(_) => return None,
                None => (rest, default?),
            }
        };
        let bad = host.is_empty()
            || port == 0
            || host
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || "/@?#[]".contains(c));
        (!bad).then(|| BrokerAddr {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

/// One `[[service]]` entry: a name the platform asks for and where it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub target: SocketAddr,
}

/// An npm registry URL: `http://` or `https://`, no spaces or control
/// characters, at most 2,048 bytes.
fn is_registry_url(s: &str) -> bool {
    s.len() <= 2048
        && (s.starts_with("https://") || s.starts_with("http://"))
        && s.len() > "https://".len()
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `[tunnel]`: keepalive and window overrides; `None` keeps the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    pub keepalive_interval: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// `max_stream_window_kib`, in bytes.
    pub max_stream_window: Option<u32>,
}

/// Bounds of `tunnel.max_stream_window_kib`: from tether-proto's initial
/// stream window to half its connection window (what
/// `tether_proto::Config::validate` accepts).
fn stream_window_kib() -> (i64, i64) {
    let settings = tether_proto::Settings::DEFAULT;
    (
        i64::from(settings.initial_stream_window / 1024),
        i64::from(settings.connection_window / 2 / 1024),
    )
}

/// `[audit]`: the durable audit queue (`docs/operations.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// `max_size_mib`: the store's bound on disk, in bytes (default 64 MiB).
    /// When full, the oldest events not yet shipped are replaced by one
    /// `events_dropped` marker.
    pub max_size: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_size: crate::audit::store::DEFAULT_MAX_BYTES,
        }
    }
}

/// `[snapshot]`: how long a switched-to snapshot has to prove healthy
/// (`docs/snapshots.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// `health_timeout`: Node-RED must answer with the snapshot's flows
    /// started within this time of the switch (default 60 s).
    pub health_timeout: Duration,
    /// `tunnel_timeout`: the tunnel must be up within this time of the
    /// switch (default 5 min); otherwise the snapshot is rolled back.
    pub tunnel_timeout: Duration,
    /// `npm`: the npm that installs a snapshot's modules (default `npm`,
    /// found in `PATH`).
    pub npm: String,
    /// `registry`: the npm registry for modules a snapshot does not carry
    /// as tarballs (default: npm's own setting).
    pub registry: Option<String>,
    /// `install_timeout`: npm must have installed a snapshot's modules
    /// within this time (default 10 min), else the snapshot is rejected.
    pub install_timeout: Duration,
    /// `window`: the daily maintenance window in which a snapshot may be
    /// switched in (`"22:00-06:00"`, local time); outside it a snapshot is
    /// staged and waits. `None`: the platform's setting, if any, else at
    /// once.
    pub window: Option<Window>,
    /// `timezone`: the IANA time zone the window is read in (default: the
    /// system's).
    pub timezone: Option<String>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            health_timeout: Duration::from_secs(60),
            tunnel_timeout: Duration::from_secs(300),
            npm: "npm".into(),
            registry: None,
            install_timeout: Duration::from_secs(600),
            window: None,
            timezone: None,
        }
    }
}

/// `[reconnect]`: exponential backoff with full jitter between `min_delay`
/// and `max_delay`, reset after a session that stayed up `stable_after`;
/// `slow_delay` after failures that retrying soon cannot fix (revoked,
/// untrusted, expired).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconnectConfig {
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub stable_after: Duration,
    pub slow_delay: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
            slow_delay: Duration::from_secs(300),
        }
    }
}

/// `[renewal]`: renew when the certificate has less than `before` left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenewalConfig {
    pub before: Duration,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        RenewalConfig {
            before: Duration::from_secs(10 * 86_400),
        }
    }
}

/// `[node_red]`: how the agent runs the local Node-RED (`docs/protocol.md`
/// §16.4, `docs/operations.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRedConfig {
    pub mode: NodeRedMode,
    /// The program to start in launch mode: a name looked up in `PATH` or an
    /// absolute path. Arguments are the agent's (`-u DIR -s SETTINGS`).
    pub command: String,
    /// Node-RED's user directory; when `None`, `STATE_DIR/node-red`, or
    /// with [`NodeRedConfig::user`] `STATE_DIR-node-red` beside the state
    /// directory (which Node-RED's user must not enter).
    pub user_dir: Option<PathBuf>,
    /// The port Node-RED listens on, on 127.0.0.1 only.
    pub port: u16,
    /// The system user launch mode runs Node-RED as (`node_red::user`);
    /// needed when the agent runs as root, and what the packaged service
    /// (its own user, able to switch users) sets, so that flows never run
    /// with the agent's rights.
    pub user: Option<String>,
    /// Launch mode: a Node-RED whose process lives but whose admin API has
    /// not answered for this long (or, while starting, for this long or
    /// 2 minutes, whichever is longer) is hung, and is restarted.
    pub hang_timeout: Duration,
}

impl NodeRedConfig {
    /// The user directory: the configured one; or, when Node-RED runs as a
    /// user of its own, `STATE_DIR-node-red` beside the state directory;
    /// else `node-red` in `state_dir`.
    pub fn user_dir_in(&self, state_dir: &Path) -> PathBuf {
        if let Some(dir) = &self.user_dir {
            return dir.clone();
        }
        match (&self.user, state_dir.file_name()) {
            (Some(_), Some(name)) => {
                let mut sibling = name.to_os_string();
                sibling.push("-node-red");
                state_dir.with_file_name(sibling)
            }
            _ => state_dir.join("node-red"),
        }
    }

    /// Where Node-RED answers: `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Default for NodeRedConfig {
    fn default() -> Self {
        NodeRedConfig {
            mode: NodeRedMode::Off,
            command: "node-red".into(),
            user_dir: None,
            port: 1880,
            user: None,
            hang_timeout: Duration::from_secs(30),
        }
    }
}

/// `node_red.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRedMode {
    /// No local Node-RED: nothing is written or started; editor streams are
    /// refused. The default when `[node_red]` is absent.
    Off,
    /// The agent writes the settings and the keys and starts Node-RED itself.
    Launch,
    /// The agent writes the settings and the keys; the operator starts
    /// Node-RED with `--settings USER_DIR/tether-settings.js`.
    External,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config '{path}': {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: crate::files::FileError,
    },
    #[error("config{} is not valid TOML: {message}", at(path))]
    Syntax {
        path: Option<PathBuf>,
        message: String,
    },
    #[error(
        "config '{}' holds a provisioning_token but is readable by others (mode {mode:04o}); help: chmod 600 '{}' (or chmod go-rwx), or pass the token with --token-file or --token-stdin",
        path.display(),
        path.display()
    )]
    TokenReadable { path: PathBuf, mode: u32 },
    #[error("{}", Problems { path, problems })]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<String>,
    },
}

impl ConfigError {
    /// Every problem found, one per key (syntax and read errors give one).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems, .. } => problems.clone(),
            other => vec![other.to_string()],
        }
    }

    fn with_path(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: Some(file.to_owned()),
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: Some(file.to_owned()),
                problems,
            },
            other => other,
        }
    }
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" '{}'", p.display()))
        .unwrap_or_default()
}

struct Problems<'a> {
    path: &'a Option<PathBuf>,
    problems: &'a [String],
}

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "config{} has {n} problem{}: {}",
            at(self.path),
            if n == 1 { "" } else { "s" },
            self.problems.join("; ")
        )
    }
}

impl Config {
    /// Defaults, with the state kept in `dir` and no services.
    pub fn for_state_dir(dir: impl Into<PathBuf>) -> Config {
        Config {
            state_dir: dir.into(),
            platform: None,
            ca: None,
            provisioning_token: None,
            name: None,
            log_level: None,
            services: Vec::new(),
            tunnel: TunnelConfig::default(),
            reconnect: ReconnectConfig::default(),
            renewal: RenewalConfig::default(),
            heartbeat_interval: Duration::from_secs(30),
            node_red: NodeRedConfig::default(),
            audit: AuditConfig::default(),
            snapshot: SnapshotConfig::default(),
            mqtt: None,
            source_sha256: None,
            clock: Clock::system(),
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let bytes = crate::files::read_bounded(path, MAX_CONFIG_FILE).map_err(|source| {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Syntax {
            path: Some(path.to_owned()),
            message: "the file is not UTF-8".into(),
        })?;
        let mut config = Config::from_toml_str(&text).map_err(|e| e.with_path(path))?;
        config.source_sha256 = Some(crate::identity::hex(
            ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref(),
        ));
        if config.provisioning_token.is_some() {
            // A token in a file others can read is a token others have.
            use std::os::unix::fs::MetadataExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| ConfigError::Read {
                    path: path.to_owned(),
                    source: crate::files::FileError {
                        action: "read the mode of",
                        path: path.to_owned(),
                        source: e,
                    },
                })?
                .mode()
                & 0o7777;
            if mode & 0o077 != 0 {
                return Err(ConfigError::TokenReadable {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        Ok(config)
    }

    /// Validates a config given as TOML text, reporting every problem.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: None,
                message: e.message().trim().to_owned(),
            })?;
        let mut check = Checker::default();
        let mut config = Config::for_state_dir(DEFAULT_STATE_DIR);
        for (key, value) in &table {
            match key.as_str() {
                "state_dir" => {
                    if let Some(s) = check.string(key, value) {
                        if s.is_empty() {
                            check.problem(key, "expected a directory path, found an empty string");
                        } else {
                            config.state_dir = PathBuf::from(s);
                        }
                    }
                }
                "platform" => {
                    if let Some(s) = check.string(key, value) {
                        match crate::net::Endpoint::parse(s, "https") {
                            Ok(_) => config.platform = Some(s.to_owned()),
                            Err(e) => check.problem(key, &e.to_string()),
                        }
                    }
                }
                "ca" => {
                    if let Some(s) = check.string(key, value) {
                        config.ca = Some(PathBuf::from(s));
                    }
                }
                "provisioning_token" => {
                    if let Some(s) = check.string(key, value) {
                        if let Some(token) = ProvisioningToken::parse(s) {
                            config.provisioning_token = Some(token);
                        } else {
                            // Never echo the value: it may be a real token
                            // with a typo.
                            check.problem(
                                key,
                                "expected a provisioning token ('tpt_', 64 lowercase hex digits, '.', and the CA hash's 64 hex digits)",
                            );
                        }
                    }
                }
                "name" => {
                    if let Some(s) = check.string(key, value) {
                        if is_device_name(s) {
                            config.name = Some(s.to_owned());
                        } else {
                            check
                                .problem(key, "expected 1 to 64 characters, no control characters");
                        }
                    }
                }
                "log_level" => {
                    if let Some(s) = check.string(key, value) {
                        if tracing_subscriber::EnvFilter::builder().parse(s).is_ok() {
                            config.log_level = Some(s.to_owned());
                        } else {
                            check.problem(
                                key,
                                &format!("'{s}' is not a log filter; expected trace, debug, info, warn or error"),
                            );
                        }
                    }
                }
                "heartbeat_interval" => {
                    if let Some(d) = check.duration_in(key, value, SECOND, HOUR) {
                        config.heartbeat_interval = d;
                    }
                }
                "service" => config.services = check.services(value),
                "tunnel" => {
                    if let Some(t) = check.table(key, value) {
                        config.tunnel = check.tunnel(t);
                    }
                }
                "reconnect" => {
                    if let Some(t) = check.table(key, value) {
                        config.reconnect = check.reconnect(t);
                    }
                }
                "renewal" => {
                    if let Some(t) = check.table(key, value) {
                        for (k, v) in t {
                            let full = format!("renewal.{k}");
                            match k.as_str() {
                                "before" => {
                                    if let Some(d) = check.duration_in(&full, v, HOUR, 365 * DAY) {
                                        config.renewal.before = d;
                                    }
                                }
                                _ => check.unknown(&full, "before"),
                            }
                        }
                    }
                }
                "node_red" => {
                    if let Some(t) = check.table(key, value) {
                        config.node_red = check.node_red(t);
                    }
                }
                "audit" => {
                    if let Some(t) = check.table(key, value) {
                        for (k, v) in t {
                            let full = format!("audit.{k}");
                            match k.as_str() {
                                "max_size_mib" => match v.as_integer() {
                                    Some(mib) if (4..=4096).contains(&mib) => {
                                        config.audit.max_size = mib as u64 * 1024 * 1024
                                    }
                                    _ => check.problem(
                                        &full,
                                        "expected a whole number of MiB from 4 to 4096",
                                    ),
                                },
                                _ => check.unknown(&full, "max_size_mib"),
                            }
                        }
                    }
                }
                "snapshot" => {
                    if let Some(t) = check.table(key, value) {
                        for (k, v) in t {
                            let full = format!("snapshot.{k}");
                            match k.as_str() {
                                "health_timeout" => {
                                    if let Some(d) = check.duration_in(&full, v, SECOND, HOUR) {
                                        config.snapshot.health_timeout = d;
                                    }
                                }
                                "tunnel_timeout" => {
                                    if let Some(d) = check.duration_in(&full, v, SECOND, DAY) {
                                        config.snapshot.tunnel_timeout = d;
                                    }
                                }
                                "install_timeout" => {
                                    if let Some(d) = check.duration_in(&full, v, SECOND, DAY) {
                                        config.snapshot.install_timeout = d;
                                    }
                                }
                                "npm" => {
                                    if let Some(s) = check.command(&full, v) {
                                        config.snapshot.npm = s;
                                    }
                                }
                                "registry" => {
                                    if let Some(s) = check.string(&full, v) {
                                        if is_registry_url(s) {
                                            config.snapshot.registry = Some(s.to_owned());
                                        } else {
                                            check.problem(&full, &format!("'{s}' is not an http:// or https:// URL"));
                                        }
                                    }
                                }
                                "window" => {
                                    if let Some(s) = check.string(&full, v) {
                                        match Window::parse(s) {
                                            Ok(w) => config.snapshot.window = Some(w),
                                            Err(e) => check.problem(&full, &e),
                                        }
                                    }
                                }
                                "timezone" => {
                                    if let Some(s) = check.string(&full, v) {
                                        match crate::window::time_zone(Some(s)) {
                                            Ok(_) => config.snapshot.timezone = Some(s.to_owned()),
                                            Err(e) => check.problem(&full, &e),
                                        }
                                    }
                                }
                                _ => check.unknown(
                                    &full,
                                    "health_timeout, tunnel_timeout, npm, registry, install_timeout, window, timezone",
                                ),
                            }
                        }
                    }
                }
                "mqtt" => {
                    if let Some(t) = check.table(key, value) {
                        config.mqtt = Some(check.mqtt(t));
                    }
                }
                _ => check.unknown(
                    key,
                    "state_dir, platform, ca, provisioning_token, name, log_level, \
                     heartbeat_interval, [[service]], [tunnel], [reconnect], [renewal], \
                     [node_red], [audit], [snapshot], [mqtt]",
                ),
            }
        }
        if check.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: None,
                problems: check.problems,
            })
        }
    }

    /// The log filter to use: the config's, or `info`.
    pub fn log_filter(&self) -> &str {
        self.log_level.as_deref().unwrap_or("info")
    }
}

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Collects problems while walking the table.
#[derive(Default)]
struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn problem(&mut self, key: &str, what: &str) {
        self.problems.push(format!("'{key}': {what}"));
    }

    fn unknown(&mut self, key: &str, known: &str) {
        self.problem(key, &format!("unknown key; expected one of: {known}"));
    }

    fn wrong_type(&mut self, key: &str, expected: &str, value: &Value) {
        self.problem(
            key,
            &format!("expected {expected}, found {}", value.type_str()),
        );
    }

    fn string<'v>(&mut self, key: &str, value: &'v Value) -> Option<&'v str> {
        match value {
            Value::String(s) => Some(s),
            other => {
                self.wrong_type(key, "a string", other);
                None
            }
        }
    }

    fn table<'v>(&mut self, key: &str, value: &'v Value) -> Option<&'v Table> {
        match value {
            Value::Table(t) => Some(t),
            other => {
                self.wrong_type(key, &format!("a table ([{key}])"), other);
                None
            }
        }
    }

    fn duration_in(
        &mut self,
        key: &str,
        value: &Value,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let Value::String(text) = value else {
            self.wrong_type(key, "a duration string like \"30s\"", value);
            return None;
        };
        match duration::parse(text) {
            Ok(d) if d < min || d > max => {
                self.problem(
                    key,
                    &format!(
                        "'{text}' is out of range; expected {} to {}",
                        duration::Human(min),
                        duration::Human(max)
                    ),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(key, &e.to_string());
                None
            }
        }
    }

    fn services(&mut self, value: &Value) -> Vec<ServiceConfig> {
        let Value::Array(entries) = value else {
            self.wrong_type("service", "an array of tables ([[service]])", value);
            return Vec::new();
        };
        let mut services = Vec::new();
        let mut seen = HashSet::new();
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("service[{i}]");
            let Value::Table(t) = entry else {
                self.wrong_type(&at, "a table with name and target", entry);
                continue;
            };
            let mut name = None;
            let mut target = None;
            for (k, v) in t {
                let full = format!("{at}.{k}");
                match k.as_str() {
                    "name" => {
                        if let Some(s) = self.string(&full, v) {
                            if !is_service_name(s) {
                                self.problem(&full, &format!("'{s}' is not a service name; expected 1 to 64 characters of A-Z a-z 0-9 . _ -"));
                            } else if !seen.insert(s.to_owned()) {
                                self.problem(
                                    &full,
                                    &format!("service '{s}' is listed twice; names must be unique"),
                                );
                            } else {
                                name = Some(s.to_owned());
                            }
                        }
                    }
                    "target" => {
                        if let Some(s) = self.string(&full, v) {
                            match s.parse::<SocketAddr>() {
                                Ok(addr) => target = Some(addr),
                                Err(_) => self.problem(&full, &format!("'{s}' is not a socket address; expected IP:PORT like \"127.0.0.1:22\"")),
                            }
                        }
                    }
                    _ => self.unknown(&full, "name, target"),
                }
            }
            for (key, present) in [
                ("name", t.contains_key("name")),
                ("target", t.contains_key("target")),
            ] {
                if !present {
                    self.problem(
                        &format!("{at}.{key}"),
                        "missing; every [[service]] needs a name and a target",
                    );
                }
            }
            if let (Some(name), Some(target)) = (name, target) {
                services.push(ServiceConfig { name, target });
            }
        }
        services
    }

    fn tunnel(&mut self, t: &Table) -> TunnelConfig {
        let mut out = TunnelConfig::default();
        for (k, v) in t {
            let full = format!("tunnel.{k}");
            match k.as_str() {
                "keepalive_interval" => {
                    out.keepalive_interval = self.duration_in(&full, v, SECOND, HOUR)
                }
                "idle_timeout" => out.idle_timeout = self.duration_in(&full, v, SECOND, HOUR),
                "max_stream_window_kib" => out.max_stream_window = self.stream_window(&full, v),
                _ => self.unknown(
                    &full,
                    "keepalive_interval, idle_timeout, max_stream_window_kib",
                ),
            }
        }
        let keepalive = out
            .keepalive_interval
            .unwrap_or(tether_proto::Config::new(tether_proto::Role::Device).keepalive_interval);
        let idle = out
            .idle_timeout
            .unwrap_or(tether_proto::Config::new(tether_proto::Role::Device).idle_timeout);
        if (out.keepalive_interval.is_some() || out.idle_timeout.is_some()) && idle <= keepalive {
            self.problem(
                "tunnel.idle_timeout",
                &format!(
                    "must be longer than the keepalive interval ({} <= {})",
                    duration::Human(idle),
                    duration::Human(keepalive)
                ),
            );
        }
        out
    }

    fn stream_window(&mut self, key: &str, v: &Value) -> Option<u32> {
        let (min, max) = stream_window_kib();
        match v.as_integer() {
            Some(kib) if (min..=max).contains(&kib) => u32::try_from(kib * 1024).ok(),
            _ => {
                self.problem(
                    key,
                    &format!("expected a whole number of KiB from {min} to {max}, like 512"),
                );
                None
            }
        }
    }

    fn reconnect(&mut self, t: &Table) -> ReconnectConfig {
        let mut out = ReconnectConfig::default();
        for (k, v) in t {
            let full = format!("reconnect.{k}");
            let slot = match k.as_str() {
                "min_delay" => &mut out.min_delay,
                "max_delay" => &mut out.max_delay,
                "stable_after" => &mut out.stable_after,
                "slow_delay" => &mut out.slow_delay,
                _ => {
                    self.unknown(&full, "min_delay, max_delay, stable_after, slow_delay");
                    continue;
                }
            };
            if let Some(d) = self.duration_in(&full, v, Duration::from_millis(10), DAY) {
                *slot = d;
            }
        }
        if out.min_delay > out.max_delay {
            self.problem(
                "reconnect.min_delay",
                &format!(
                    "must not exceed max_delay ({} > {})",
                    duration::Human(out.min_delay),
                    duration::Human(out.max_delay)
                ),
            );
        }
        out
    }
}

impl Checker {
    fn mqtt(&mut self, t: &Table) -> MqttConfig {
        let mut mqtt = MqttConfig::default();
        for (k, v) in t {
            let full = format!("mqtt.{k}");
            match k.as_str() {
                "broker" => {
                    if let Some(s) = self.string(&full, v) {
                        match BrokerAddr::parse(s) {
                            Some(_) => mqtt.broker = s.to_owned(),
                            None => self.problem(&full, &format!("'{s}' is not HOST:PORT, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (for example \"127.0.0.1:1883\")")),
                        }
                    }
                }
                "ca_file" | "cert_file" | "key_file" => {
                    let path = self.absolute_file(&full, v);
                    match k.as_str() {
                        "ca_file" => mqtt.ca_file = path,
                        "cert_file" => mqtt.cert_file = path,
                        _ => mqtt.key_file = path,
                    }
                }
                "client_id" | "username" | "password" => {
                    if let Some(s) = self.string(&full, v) {
                        if s.is_empty() || s.len() > 256 {
                            self.problem(&full, "expected 1 to 256 bytes");
                            continue;
                        }
                        let s = Some(s.to_owned());
                        match k.as_str() {
                            "client_id" => mqtt.client_id = s,
                            "username" => mqtt.username = s,
                            _ => mqtt.password = s,
                        }
                    }
                }
                "publish" | "subscribe" => {
                    let Some(list) = v.as_array() else {
                        self.wrong_type(&full, "an array of topic filters", v);
                        continue;
                    };
                    if list.is_empty() || list.len() > tether_proto::mqtt::MAX_FILTERS {
                        self.problem(&full, "expected 1 to 64 topic filters");
                        continue;
                    }
                    let mut filters = Vec::new();
                    for item in list {
                        match item.as_str().map(|f| (f, tether_proto::mqtt::check_filter(f))) {
                            Some((f, Ok(()))) => filters.push(f.to_owned()),
                            Some((_, Err(e))) => self.problem(&full, &e.to_string()),
                            None => self.wrong_type(&full, "an array of topic filters", v),
                        }
                    }
                    if k == "publish" {
                        mqtt.publish = filters;
                    } else {
                        mqtt.subscribe = Some(filters);
                    }
                }
                "max_payload_kib" => match v.as_integer() {
                    Some(kib) if (1..=1024).contains(&kib) => mqtt.max_payload = kib as usize * 1024,
                    _ => self.problem(&full, "expected a whole number of KiB from 1 to 1024"),
                },
                "outbox_max_mib" => match v.as_integer() {
                    Some(mib) if (1..=4096).contains(&mib) => {
                        mqtt.outbox_max_bytes = mib as u64 * 1024 * 1024
                    }
                    _ => self.problem(&full, "expected a whole number of MiB from 1 to 4096"),
                },
                "outbox_max_messages" => match v.as_integer() {
                    Some(n) if (100..=10_000_000).contains(&n) => mqtt.outbox_max_messages = n as u64,
                    _ => self.problem(&full, "expected a whole number from 100 to 10000000"),
                },
                "topic" => {
                    let Some(list) = v.as_array() else {
                        self.wrong_type(&full, "[[mqtt.topic]] tables", v);
                        continue;
                    };
                    if list.len() > tether_proto::mqtt::MAX_FILTERS {
                        self.problem(&full, "expected at most 64 [[mqtt.topic]] entries");
                        continue;
                    }
                    for (i, item) in list.iter().enumerate() {
                        let key = format!("{full}[{i}]");
                        match item.as_table() {
                            Some(t) => {
                                if let Some(map) = self.topic_map(&key, t) {
                                    mqtt.topics.push(map);
                                }
                            }
                            None => self.wrong_type(&key, "a table", item),
                        }
                    }
                }
                _ => self.unknown(
                    &full,
                    "broker, ca_file, cert_file, key_file, client_id, username, password, publish, subscribe, max_payload_kib, outbox_max_mib, outbox_max_messages, topic",
                ),
            }
        }
        let tls = mqtt.endpoint().is_some_and(|b| b.tls);
        if tls && mqtt.ca_file.is_none() {
            self.problem(
                "mqtt.ca_file",
                "an mqtts:// broker needs the CA its certificate chains to (a PEM file)",
            );
        }
        if !tls && (mqtt.ca_file.is_some() || mqtt.cert_file.is_some() || mqtt.key_file.is_some()) {
            self.problem(
                "mqtt.ca_file",
                "ca_file, cert_file and key_file are for TLS; help: write the broker as \"mqtts://HOST[:PORT]\"",
            );
        }
        if mqtt.cert_file.is_some() != mqtt.key_file.is_some() {
            self.problem(
                "mqtt.cert_file",
                "cert_file and key_file go together (mutual TLS)",
            );
        }
        mqtt
    }

    /// One `[[mqtt.topic]]` entry (`key` names it in problems).
    fn topic_map(&mut self, key: &str, t: &Table) -> Option<crate::mqtt::topics::TopicMap> {
        use crate::mqtt::topics::{Direction, TopicMap};
        let mut map = TopicMap::new("#", "", "", Direction::Both);
        let (mut local, mut remote) = (false, false);
        let before = self.problems.len();
        for (k, v) in t {
            let full = format!("{key}.{k}");
            match k.as_str() {
                "pattern" | "local" | "remote" => {
                    let Some(s) = self.string(&full, v) else {
                        continue;
                    };
                    if s.len() > tether_proto::mqtt::MAX_TOPIC {
                        self.problem(&full, "expected at most 1024 bytes");
                        continue;
                    }
                    match k.as_str() {
                        "pattern" => map.pattern = s.to_owned(),
                        "local" => (map.local, local) = (s.to_owned(), true),
                        _ => (map.remote, remote) = (s.to_owned(), true),
                    }
                }
                "direction" => match v.as_str() {
                    Some("out") => map.direction = Direction::Out,
                    Some("in") => map.direction = Direction::In,
                    Some("both") => map.direction = Direction::Both,
                    _ => self.problem(&full, "expected \"out\", \"in\" or \"both\""),
                },
                "qos" => match v.as_integer() {
                    Some(q) if (0..=2).contains(&q) => map.qos = q as u8,
                    _ => self.problem(&full, "expected 0, 1 or 2"),
                },
                _ => self.unknown(&full, "pattern, local, remote, direction, qos"),
            }
        }
        if !local || !remote {
            self.problem(
                key,
                "expected both 'local' (the flows' prefix, \"\" for none) and 'remote' (the wire's, \"tether/{team}/{device}/out/...\")",
            );
            return None;
        }
        if self.problems.len() != before {
            return None;
        }
        match map.check() {
            Ok(()) => Some(map),
            Err(e) => {
                self.problem(key, &e.to_string());
                None
            }
        }
    }

    fn node_red(&mut self, t: &Table) -> NodeRedConfig {
        let mut out = NodeRedConfig::default();
        let mut command_set = false;
        for (k, v) in t {
            let full = format!("node_red.{k}");
            match k.as_str() {
                "mode" => out.mode = self.node_red_mode(&full, v).unwrap_or(out.mode),
                "command" => {
                    if let Some(c) = self.command(&full, v) {
                        out.command = c;
                    }
                    command_set = true;
                }
                "user_dir" => out.user_dir = self.absolute_dir(&full, v),
                "port" => out.port = self.port(&full, v).unwrap_or(out.port),
                "user" => {
                    if let Some(name) = self.string(&full, v) {
                        if crate::node_red::user::is_user_name(name) {
                            out.user = Some(name.to_owned());
                        } else {
                            self.problem(
                                &full,
                                &format!("'{name}' is not a user name (letters, digits, '_', '-', '.', at most 32)"),
                            );
                        }
                    }
                }
                "hang_timeout" => {
                    if let Some(d) = self.duration_in(&full, v, SECOND, HOUR) {
                        out.hang_timeout = d;
                    }
                }
                _ => self.unknown(&full, "mode, command, user_dir, port, user, hang_timeout"),
            }
        }
        if !t.contains_key("mode") {
            self.problem(
                "node_red.mode",
                "missing; expected \"launch\", \"external\" or \"off\"",
            );
        } else if command_set && out.mode != NodeRedMode::Launch {
            self.problem(
                "node_red.command",
                "only used with mode = \"launch\"; remove it or change the mode",
            );
        }
        out
    }

    fn node_red_mode(&mut self, key: &str, v: &Value) -> Option<NodeRedMode> {
        match self.string(key, v)? {
            "launch" => Some(NodeRedMode::Launch),
            "external" => Some(NodeRedMode::External),
            "off" => Some(NodeRedMode::Off),
            other => {
                self.problem(
                    key,
                    &format!(
                        "'{other}' is not a mode; expected \"launch\", \"external\" or \"off\""
                    ),
                );
                None
            }
        }
    }

    fn command(&mut self, key: &str, v: &Value) -> Option<String> {
        let s = self.string(key, v)?;
        let valid = !s.is_empty()
            && !s.chars().any(char::is_control)
            && (!s.contains('/') || s.starts_with('/'));
        if valid {
            Some(s.to_owned())
        } else {
            self.problem(
                key,
                "expected a program name looked up in PATH (\"node-red\", \"npm\") or an absolute path",
            );
            None
        }
    }

    fn absolute_file(&mut self, key: &str, v: &Value) -> Option<PathBuf> {
        self.absolute(key, v, "file", "/etc/tether/mqtt-ca.pem")
    }

    fn absolute_dir(&mut self, key: &str, v: &Value) -> Option<PathBuf> {
        self.absolute(key, v, "directory", "/var/lib/tether/node-red")
    }

    /// An absolute path (a `what`, like `example`).
    fn absolute(&mut self, key: &str, v: &Value, what: &str, example: &str) -> Option<PathBuf> {
        let s = self.string(key, v)?;
        if s.starts_with('/') && !s.chars().any(char::is_control) {
            Some(PathBuf::from(s))
        } else {
            self.problem(
                key,
                &format!("'{s}' is not an absolute {what} path; expected one like \"{example}\""),
            );
            None
        }
    }

    fn port(&mut self, key: &str, v: &Value) -> Option<u16> {
        match v.as_integer().map(u16::try_from) {
            Some(Ok(port)) if port > 0 => Some(port),
            _ => {
                self.problem(key, "expected a TCP port from 1 to 65535, like 1880");
                None
            }
        }
    }
}

/// True if `name` is a valid tether service name: 1 to 64 characters of
/// `[A-Za-z0-9._-]` (`docs/protocol.md`, service header).
pub fn is_service_name(name: &str) -> bool {
    (1..=tether_proto::service::MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tpt_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    #[test]
    fn a_full_config_parses_into_typed_values() {
        let text = format!(
            r#"
            state_dir = "/tmp/tether"
            platform = "https://platform.example:8443"
            provisioning_token = "{TOKEN}"
            name = "press-7"
            log_level = "debug"
            heartbeat_interval = "10s"

            [[service]]
            name = "ssh"
            target = "127.0.0.1:22"

            [[service]]
            name = "plc.web"
            target = "[::1]:8080"

            [tunnel]
            keepalive_interval = "5s"
            idle_timeout = "20s"
            max_stream_window_kib = 2048

            [reconnect]
            min_delay = "1s"
            max_delay = "2m"
            stable_after = "30s"
            slow_delay = "10m"

            [renewal]
            before = "5d"
            "#
        );
        let config = Config::from_toml_str(&text).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/tmp/tether"));
        assert_eq!(config.services.len(), 2);
        assert_eq!(config.services[1].target, "[::1]:8080".parse().unwrap());
        assert_eq!(config.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(config.reconnect.max_delay, Duration::from_secs(120));
        assert_eq!(config.renewal.before, Duration::from_secs(5 * 86_400));
        assert_eq!(config.tunnel.idle_timeout, Some(Duration::from_secs(20)));
        assert_eq!(config.tunnel.max_stream_window, Some(2048 * 1024));
        assert_eq!(config.provisioning_token.unwrap().expose(), TOKEN);
    }

    #[test]
    fn an_empty_config_gives_the_defaults() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config, Config::for_state_dir(DEFAULT_STATE_DIR));
        assert_eq!(config.renewal.before, Duration::from_secs(864_000));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(30));
    }

    #[test]
    fn every_invalid_key_is_reported_at_once() {
        let text = r#"
            heartbeat_interval = 30
            colour = "blue"
            name = ""
            provisioning_token = "tpt_nope"
            [[service]]
            name = "ssh"
            target = "localhost:22"
            [[service]]
            name = "ssh"
            target = "127.0.0.1:2222"
            port = 1
            [[service]]
            name = "bad name"
            [reconnect]
            min_delay = "fast"
            slow = "1m"
            [renewal]
            before = "1s"
        "#;
        let err = Config::from_toml_str(text).unwrap_err();
        let problems = err.problems();
        let expect = [
            "'heartbeat_interval': expected a duration string like \"30s\", found integer",
            "'colour': unknown key",
            "'name': expected 1 to 64 characters",
            "'provisioning_token': expected a provisioning token",
            "'service[0].target': 'localhost:22' is not a socket address",
            "'service[1].name': service 'ssh' is listed twice",
            "'service[1].port': unknown key; expected one of: name, target",
            "'service[2].name': 'bad name' is not a service name",
            "'service[2].target': missing",
            "'reconnect.min_delay': 'fast' is not a duration",
            "'reconnect.slow': unknown key",
            "'renewal.before': '1s' is out of range; expected 1h to 365d",
        ];
        for want in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "missing {want:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        let line = err.to_string();
        assert!(line.starts_with("config has 12 problems: "), "{line}");
        assert!(!line.contains("tpt_nope"), "{line}");
    }

    #[test]
    fn a_wrongly_typed_section_is_named() {
        let err = Config::from_toml_str("reconnect = 5\nservice = \"ssh\"").unwrap_err();
        assert_eq!(
            err.problems(),
            vec![
                "'reconnect': expected a table ([reconnect]), found integer".to_owned(),
                "'service': expected an array of tables ([[service]]), found string".to_owned(),
            ]
        );
    }

    #[test]
    fn syntax_errors_are_one_problem() {
        let err = Config::from_toml_str("name = ").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn the_token_is_redacted_in_debug_output() {
        let text = format!("provisioning_token = \"{TOKEN}\"");
        let config = Config::from_toml_str(&text).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains(TOKEN), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }

    #[test]
    fn idle_timeout_must_exceed_keepalive() {
        let err =
            Config::from_toml_str("[tunnel]\nkeepalive_interval = \"30s\"\nidle_timeout = \"10s\"")
                .unwrap_err();
        assert!(
            err.problems()[0].starts_with("'tunnel.idle_timeout': must be longer"),
            "{err}"
        );
    }

    #[test]
    fn stream_window_must_be_a_bounded_whole_number_of_kib() {
        for bad in ["255", "8193", "\"1MiB\"", "512.5"] {
            let err = Config::from_toml_str(&format!("[tunnel]\nmax_stream_window_kib = {bad}"))
                .unwrap_err();
            assert!(
                err.problems()[0].starts_with(
                    "'tunnel.max_stream_window_kib': expected a whole number of KiB from 256 to 8192"
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tetherd.toml");
        std::fs::write(&path, "nope = 1").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(err.to_string().contains("tetherd.toml"), "{err}");
        let err = Config::load(dir.path().join("missing.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn a_config_holding_a_token_is_refused_unless_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tetherd.toml");
        std::fs::write(&path, format!("provisioning_token = \"{TOKEN}\"\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(
            matches!(err, ConfigError::TokenReadable { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert!(!err.to_string().contains(TOKEN), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Config::load(&path).unwrap().provisioning_token.is_some());
        // A config without a token may stay world-readable.
        std::fs::write(&path, "name = \"gw\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load(&path).unwrap();
    }

    #[test]
    fn mqtt_brokers_are_host_port_or_mqtt_urls_and_tls_needs_its_ca() {
        let addr = |s: &str| BrokerAddr::parse(s).map(|b| (b.host, b.port, b.tls));
        let cases = [
            ("127.0.0.1:1883", Some(("127.0.0.1", 1883, false))),
            ("mqtt://broker.local", Some(("broker.local", 1883, false))),
            ("mqtts://127.0.0.1", Some(("127.0.0.1", 8883, true))),
            ("mqtts://[::1]:9883", Some(("::1", 9883, true))),
            ("[::1]:1883", Some(("::1", 1883, false))),
            ("nohost", None),
            ("::1:1883", None),
            ("mqtts://h:0", None),
            ("mqtts://user@h", None),
            ("http://h:1", None),
        ];
        for (s, want) in cases {
            let want = want.map(|(h, p, t)| (h.to_owned(), p, t));
            assert_eq!(addr(s), want, "{s}");
        }
        let config = Config::from_toml_str(
            "[mqtt]\nbroker = \"mqtts://127.0.0.1:8883\"\nca_file = \"/etc/tether/ca.pem\"\ncert_file = \"/etc/tether/c.pem\"\nkey_file = \"/etc/tether/c.key\"",
        )
        .unwrap();
        assert_eq!(
            config.mqtt.unwrap().ca_file.as_deref(),
            Some(Path::new("/etc/tether/ca.pem"))
        );
        let problems = |toml: &str| Config::from_toml_str(toml).unwrap_err().problems();
        let p = problems("[mqtt]\nbroker = \"mqtts://127.0.0.1\"\ncert_file = \"/c.pem\"");
        assert!(
            p[0].contains("'mqtt.ca_file': an mqtts:// broker needs the CA"),
            "{p:?}"
        );
        assert!(
            p[1].contains("'mqtt.cert_file': cert_file and key_file go together"),
            "{p:?}"
        );
        let p = problems("[mqtt]\nbroker = \"127.0.0.1:1883\"\nca_file = \"/ca.pem\"");
        assert!(p[0].contains("are for TLS"), "{p:?}");
    }

    #[test]
    fn mqtt_topic_mappings_are_read_and_one_leaving_the_namespace_is_named() {
        let config = Config::from_toml_str(
            "[mqtt]\n[[mqtt.topic]]\nlocal = \"sensors/\"\nremote = \"tether/{team}/{device}/out/sensors/\"\ndirection = \"out\"\nqos = 1\n[[mqtt.topic]]\npattern = \"+/out/#\"\nlocal = \"team/\"\nremote = \"tether/{team}/\"\ndirection = \"in\"",
        )
        .unwrap();
        let topics = config.mqtt.unwrap().topics;
        assert_eq!(topics.len(), 2);
        assert_eq!(topics[0].pattern, "#");
        assert_eq!(topics[0].qos, 1);
        assert_eq!(topics[1].direction, crate::mqtt::topics::Direction::In);
        let err = Config::from_toml_str(
            "[mqtt]\n[[mqtt.topic]]\nlocal = \"x/\"\nremote = \"tether/{team}/other/out/\"\n[[mqtt.topic]]\nlocal = \"y/\"\ndirection = \"sideways\"",
        )
        .unwrap_err();
        let problems = err.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "'mqtt.topic[0]': remote 'tether/{team}/other/out/' leaves the device's namespace"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("'mqtt.topic[1].direction'"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("'mqtt.topic[1]': expected both 'local'"),
            "{problems:?}"
        );
    }

    #[test]
    fn mqtt_is_off_without_its_section_and_checked_with_it() {
        assert_eq!(Config::from_toml_str("").unwrap().mqtt, None);
        let config = Config::from_toml_str(
            "[mqtt]\nbroker = \"127.0.0.1:1884\"\nusername = \"agent\"\npassword = \"s3cret\"\npublish = [\"tether/+/d/out/#\"]\nsubscribe = [\"tether/t/+/out/#\"]\nmax_payload_kib = 64\noutbox_max_mib = 8\noutbox_max_messages = 1000",
        )
        .unwrap();
        let mqtt = config.mqtt.unwrap();
        assert_eq!(mqtt.broker, "127.0.0.1:1884");
        assert_eq!(mqtt.max_payload, 64 * 1024);
        assert_eq!(mqtt.outbox_max_bytes, 8 << 20);
        assert_eq!(
            mqtt.subscribe.as_deref(),
            Some(&["tether/t/+/out/#".to_owned()][..])
        );
        // The password never shows in Debug (nor, so, in a log line).
        assert!(!format!("{mqtt:?}").contains("s3cret"));
        let defaults = Config::from_toml_str("[mqtt]").unwrap().mqtt.unwrap();
        assert_eq!(defaults, MqttConfig::default());
        let err = Config::from_toml_str(
            "[mqtt]\nbroker = \"nohost\"\npublish = [\"a/#/b\"]\nmax_payload_kib = 4096\nretain = true",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "mqtt.broker",
            "mqtt.publish",
            "mqtt.max_payload_kib",
            "mqtt.retain",
        ] {
            assert!(err.contains(expected), "{expected} in {err}");
        }
    }

    #[test]
    fn node_red_is_off_without_its_section_and_launched_with_defaults() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.node_red.mode, NodeRedMode::Off);
        let config = Config::from_toml_str("[node_red]\nmode = \"launch\"").unwrap();
        let nr = &config.node_red;
        assert_eq!(nr.mode, NodeRedMode::Launch);
        assert_eq!(nr.command, "node-red");
        assert_eq!(nr.addr(), "127.0.0.1:1880".parse().unwrap());
        assert_eq!(
            nr.user_dir_in(Path::new("/var/lib/tether")),
            PathBuf::from("/var/lib/tether/node-red")
        );
    }

    #[test]
    fn a_full_node_red_section_parses() {
        let text = r#"
            [node_red]
            mode = "launch"
            command = "/opt/node-red/bin/node-red"
            user_dir = "/srv/node-red"
            port = 1881
            hang_timeout = "45s"
        "#;
        let nr = Config::from_toml_str(text).unwrap().node_red;
        assert_eq!(nr.hang_timeout, Duration::from_secs(45));
        assert_eq!(nr.command, "/opt/node-red/bin/node-red");
        assert_eq!(
            nr.user_dir_in(Path::new("/x")),
            PathBuf::from("/srv/node-red")
        );
        assert_eq!(nr.port, 1881);
        let text = "[node_red]\nmode = \"external\"\nport = 1880";
        let nr = Config::from_toml_str(text).unwrap().node_red;
        assert_eq!(nr.mode, NodeRedMode::External);
    }

    #[test]
    fn every_invalid_node_red_key_is_reported_at_once() {
        let text = r#"
            [node_red]
            mode = "external"
            command = ""
            user_dir = "relative/dir"
            port = 70000
            host = "0.0.0.0"
        "#;
        let problems = Config::from_toml_str(text).unwrap_err().problems();
        let expect = [
            "'node_red.command': expected a program name",
            "'node_red.user_dir': 'relative/dir' is not an absolute directory path",
            "'node_red.port': expected a TCP port from 1 to 65535",
            "'node_red.host': unknown key; expected one of: mode, command, user_dir, port",
            "'node_red.command': only used with mode = \"launch\"",
        ];
        for want in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "missing {want:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        for (bad, want) in [
            ("[node_red]\nport = 1880", "'node_red.mode': missing"),
            (
                "[node_red]\nmode = \"on\"",
                "'node_red.mode': 'on' is not a mode",
            ),
            ("[node_red]\nmode = \"launch\"\nport = 0", "'node_red.port'"),
            (
                "[node_red]\nmode = \"launch\"\ncommand = \"bin/node-red\"",
                "'node_red.command'",
            ),
            ("node_red = 1", "'node_red': expected a table"),
            (
                "[node_red]\nmode = \"launch\"\nhang_timeout = \"500ms\"",
                "'node_red.hang_timeout': '500ms' is out of range",
            ),
        ] {
            let problems = Config::from_toml_str(bad).unwrap_err().problems();
            assert!(problems[0].starts_with(want), "{bad}: {problems:?}");
        }
    }

    #[test]
    fn service_names_follow_the_protocol() {
        assert!(is_service_name("ssh"));
        assert!(is_service_name("plc-1.web_ui"));
        assert!(!is_service_name(""));
        assert!(!is_service_name("a b"));
        assert!(!is_service_name(&"a".repeat(65)));
    }
}

#[cfg(test)]
mod packaged_tests {
    use super::*;

    #[test]
    fn the_packaged_example_config_loads() {
        let text = include_str!("../../packaging/agent.toml.example");
        let config = Config::from_toml_str(text).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/tether"));
        assert_eq!(config.node_red.mode, NodeRedMode::Launch);
        assert_eq!(config.node_red.user.as_deref(), Some("tether-nodered"));
        assert_eq!(
            config.node_red.user_dir_in(&config.state_dir),
            PathBuf::from("/var/lib/tether-node-red"),
            "the unit's StateDirectory= names this directory"
        );
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    #[test]
    fn the_snapshot_timeouts_parse_and_bad_ones_are_named() {
        let config =
            Config::from_toml_str("[snapshot]\nhealth_timeout = \"20s\"\ntunnel_timeout = \"10m\"")
                .unwrap();
        assert_eq!(config.snapshot.health_timeout, Duration::from_secs(20));
        assert_eq!(config.snapshot.tunnel_timeout, Duration::from_secs(600));
        let config = Config::from_toml_str(
            "[snapshot]\nnpm = \"/usr/bin/npm\"\nregistry = \"https://npm.plant.example/\"\ninstall_timeout = \"30m\"",
        )
        .unwrap();
        assert_eq!(config.snapshot.npm, "/usr/bin/npm");
        assert_eq!(
            config.snapshot.registry.as_deref(),
            Some("https://npm.plant.example/")
        );
        assert_eq!(config.snapshot.install_timeout, Duration::from_secs(1800));
        let config =
            Config::from_toml_str("[snapshot]\nwindow = \"22:00-06:00\"\ntimezone = \"UTC\"")
                .unwrap();
        assert_eq!(config.snapshot.window.unwrap().to_string(), "22:00-06:00");
        assert_eq!(config.snapshot.timezone.as_deref(), Some("UTC"));
        assert_eq!(
            Config::from_toml_str("").unwrap().snapshot,
            SnapshotConfig::default()
        );
        for bad in [
            "[snapshot]\nhealth_timeout = \"2h\"",
            "[snapshot]\nregistry = \"ftp://npm.example\"",
            "[snapshot]\nnpm = \"bin/npm\"",
            "[snapshot]\ninstall_timeout = \"0s\"",
            "[snapshot]\nwindow = \"22:00-30:00\"",
            "[snapshot]\ntimezone = \"Mars/Olympus\"",
            "[snapshot]\nwindows = \"22:00-06:00\"",
        ] {
            let err = Config::from_toml_str(bad).unwrap_err().to_string();
            assert!(err.contains("snapshot."), "{bad}: {err}");
        }
    }
}
