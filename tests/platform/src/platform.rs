//! [`Platform`]: start, run and stop the reference platform, and the
//! operations the admin API and the library API share.
//!
//! This module owns the platform's state ([`State`]: configuration, store,
//! CA, keys, live tunnels, users' password checks, live editor streams,
//! rate limiters, events) and its life cycle: load
//! or create everything in the data directory, bind the listener, write
//! `platform.json`, serve, and on shutdown stop accepting, close tunnels
//! gracefully within a bound and release the database file. It never
//! handles HTTP itself ([`crate::server`] does).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tether_proto::api::{PinnedKeys, ProvisioningToken, Secret};
use tether_proto::grant::Role;
use tether_proto::tokio_io::{Tunnel, TunnelStream};
use tether_proto::{CloseCode, OpenError, Service, ServiceHeader};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::ca::{Ca, CaError, SERVER_CERT_FILE};
use crate::config::PlatformConfig;
use crate::csrf::CsrfKey;
use crate::files::{self, FileError, PUBLIC_MODE};
use crate::handoff::{EditorSessions, Handoffs};
use crate::keys::{self, KeyError, SigningKeys};
use crate::listen::Listeners;
use crate::rate_limit::{RateLimiter, UserSource};
use crate::server;
use crate::sessions::LiveStreams;
use crate::store::{Store, StoreError, TokenRecord, TokenSummary, UserRecord};
use crate::tunnels::Registry;
use crate::users::{Passwords, UserError, UserInfo};

/// File the running platform writes so admin commands find it.
pub const PLATFORM_JSON: &str = "platform.json";
/// Events kept for slow subscribers before they miss some.
const EVENT_BACKLOG: usize = 1024;

/// Why the platform could not start or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {cause}; help: is another process using the port?")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid token request: {0}")]
    BadTokenSpec(String),
    #[error("no device '{0}'")]
    NoDevice(String),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshots::SnapshotError),
    #[error("unknown Node-RED action '{0}': expected start, stop or restart")]
    BadAction(String),
    #[error(
        "{0}; help: 'tether-platform device list --json' shows each device's current certificate"
    )]
    NoCertificate(String),
    #[error("a start-up task failed: {0}")]
    Task(String),
    #[error(transparent)]
    User(#[from] UserError),
    #[error("a user named '{0}' already exists; remove it first to change it")]
    UserExists(String),
    #[error("no user '{0}'")]
    NoUser(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::BrokerError),
}

/// Why a stream to a device's service could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no device '{0}'; list devices with `tether-platform device list`")]
    UnknownDevice(String),
    #[error("device '{0}' has no live tunnel (it is offline)")]
    DeviceOffline(String),
    #[error("'{0}' is not a valid service name (1 to 64 characters of A-Z a-z 0-9 . _ -)")]
    BadService(String),
    #[error("cannot open a stream on the tunnel: {0}")]
    Open(#[from] OpenError),
    #[error("the device refused the stream: {0}")]
    Refused(String),
    #[error("the device did not accept the stream within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a provisioning token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSpec {
    /// How long the token stays valid. `None` means
    /// [`DEFAULT_TOKEN_TTL`], for a single-use token only: a multi-use token
    /// must name its expiry.
    pub ttl: Option<Duration>,
    pub uses: u32,
    pub team: String,
}

/// Lifetime of a single-use token created without one.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

impl Default for TokenSpec {
    /// One hour, one use, team `default`.
    fn default() -> TokenSpec {
        TokenSpec {
            ttl: None,
            uses: 1,
            team: "default".to_string(),
        }
    }
}

/// A device as the admin API lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub name: String,
    pub team: String,
    /// Unix seconds.
    pub enrolled_at: u64,
    pub revoked: bool,
    pub online: bool,
    /// Unix seconds, while online.
    pub connected_since: Option<u64>,
    /// Unix seconds of the last heartbeat on the live tunnel.
    pub last_heartbeat: Option<u64>,
    /// `not_after` of the newest certificate, Unix seconds.
    pub cert_not_after: u64,
    /// The live tunnel's smoothed round-trip time.
    pub rtt_micros: Option<u64>,
    /// Instance protection mode (`docs/protocol.md` §16.3).
    #[serde(default)]
    pub protected: bool,
    /// SHA-256 fingerprint of the device's current certificate.
    #[serde(default)]
    pub current_certificate: Option<String>,
    /// When a superseded certificate of the device was last presented
    /// (Unix seconds): another copy of its identity may exist.
    #[serde(default)]
    pub superseded_seen_at: Option<u64>,
    /// The device's audit queue as its last heartbeat reported it (its
    /// error, such as a full disk, included), while online.
    #[serde(default)]
    pub audit: Option<tether_proto::control::AuditHealth>,
    /// The device's snapshots as its last heartbeat reported them, while
    /// online.
    #[serde(default)]
    pub snapshot: Option<tether_proto::control::SnapshotHealth>,
    /// The maintenance window the platform set for the device, if any.
    #[serde(default)]
    pub window: Option<String>,
    /// The device's health figures, from its last heartbeat, while online.
    #[serde(default)]
    pub health: Option<tether_proto::control::DeviceHealth>,
    /// Its health over the last hour, oldest first.
    #[serde(default)]
    pub history: Vec<crate::health::HealthPoint>,
    /// Its MQTT bridge counts, if it opened an `mqtt` stream since the
    /// platform started.
    #[serde(default)]
    pub mqtt: Option<crate::mqtt::MqttStats>,
}

/// Something that happened, for tests and dashboards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformEvent {
    Enrolled {
        device_id: String,
    },
    TunnelUp {
        device_id: String,
        fingerprint: String,
    },
    TunnelDown {
        device_id: String,
        reason: String,
    },
    Heartbeat {
        device_id: String,
        seq: u64,
    },
    Renewed {
        device_id: String,
        not_after: u64,
    },
    /// Two holders of one identity: a superseded certificate presented, or
    /// two connections taking the tunnel from each other.
    IdentityConflict {
        device_id: String,
        fingerprint: String,
        reason: String,
    },
    /// A batch of the device's audit records is stored durably and was
    /// acknowledged up to `through`; `stored` of them were new.
    AuditStored {
        device_id: String,
        through: u64,
        stored: u64,
    },
}

/// `platform.json`: where the running platform listens.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformFile {
    /// `https://HOST:PORT`, HOST being the first name in the server
    /// certificate.
    pub url: String,
    /// The bound socket address.
    pub listen: SocketAddr,
    /// The MQTT broker devices' messages go to, `mqtt://HOST:PORT`
    /// (MQTT 5), if MQTT is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<String>,
    /// The embedded broker's MQTT 3.1.1 listener, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_v311: Option<String>,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct State {
    pub config: PlatformConfig,
    pub store: Store,
    pub ca: Ca,
    pub admin_hash: [u8; 32],
    pub tunnel_url: String,
    pub registry: Registry,
    pub enroll_limiter: RateLimiter,
    pub admin_limiter: RateLimiter,
    /// Login attempts per source address.
    pub login_limiter: RateLimiter,
    /// Failed logins per (user name, source prefix).
    pub login_failures: RateLimiter<UserSource>,
    /// Recent failed logins per user name, for the per-user slow-down.
    pub login_slowdown: RateLimiter<String>,
    pub listeners: Listeners,
    /// Signs editor access grants.
    pub keys: SigningKeys,
    pub passwords: Passwords,
    /// Live editor streams by session.
    pub live: LiveStreams,
    /// Makes and checks the platform forms' CSRF tokens.
    pub csrf: CsrfKey,
    /// Handoff codes from the platform's origin to device editor origins.
    pub handoffs: Handoffs,
    /// Editor cookies of the device editor origins.
    pub editor_sessions: EditorSessions,
    /// Node-RED's editor files, by version and hash (`editor_cache`).
    pub editor_cache: crate::editor_cache::AssetCache,
    /// Signed snapshots per device.
    pub snapshots: crate::snapshots::Snapshots,
    /// Node-RED start, stop and restart requests waiting for each device's
    /// control stream: (action, requested by).
    pub node_red_requests:
        std::sync::Mutex<std::collections::HashMap<String, Vec<(String, String)>>>,
    /// The MQTT bridge, unless MQTT is off.
    pub mqtt: Option<crate::mqtt::Bridge>,
    events: broadcast::Sender<PlatformEvent>,
}

/// A running platform.
#[derive(Debug)]
pub struct Platform {
    state: Arc<State>,
    local_addr: SocketAddr,
    admin_token: Secret,
    stop: watch::Sender<bool>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

/// Everything loaded from (or created in) the data directory.
struct Loaded {
    store: Store,
    ca: Ca,
    keys: SigningKeys,
    admin_token: Secret,
    identity: crate::ca::ServerIdentity,
    passwords: Passwords,
}

impl Platform {
    /// Loads or creates the data directory, binds the listener and starts
    /// serving.
    pub async fn start(config: PlatformConfig) -> Result<Platform, PlatformError> {
        config.validate().map_err(PlatformError::Config)?;
        let (dir, names, cost) = (
            config.data_dir.clone(),
            config.certificate_names(),
            config.password_cost,
        );
        let loaded = tokio::task::spawn_blocking(move || load(&dir, &names, cost))
            .await
            .map_err(|e| PlatformError::Task(e.to_string()))??;
        let acceptor = server::tls_acceptor(&loaded.ca, loaded.identity)?;
        let mqtt = crate::mqtt::Bridge::start(&config.mqtt).await?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|cause| PlatformError::Bind {
                    addr: config.listen,
                    cause,
                })?;
        let local_addr = listener.local_addr().map_err(|cause| PlatformError::Bind {
            addr: config.listen,
            cause,
        })?;
        let host = config.public_host().to_string();
        let port = local_addr.port();
        let platform_file = PlatformFile {
            url: format!("https://{host}:{port}"),
            listen: local_addr,
            mqtt: mqtt.as_ref().map(crate::mqtt::Bridge::broker_url),
            mqtt_v311: mqtt
                .as_ref()
                .and_then(crate::mqtt::Bridge::v4_addr)
                .map(|a| format!("mqtt://{a}")),
        };
        let json = serde_json::to_vec_pretty(&platform_file).unwrap_or_default();
        files::write_atomic(&config.data_dir.join(PLATFORM_JSON), &json, PUBLIC_MODE)?;
        let max_sources = config.rate_limit_max_sources;
        let state = Arc::new(State {
            store: loaded.store,
            ca: loaded.ca,
            admin_hash: keys::sha256(loaded.admin_token.expose().as_bytes()),
            tunnel_url: format!("wss://{host}:{port}{}", tether_proto::api::TUNNEL_PATH),
            registry: Registry::default(),
            enroll_limiter: RateLimiter::with_max_sources(config.enroll_rate, max_sources),
            admin_limiter: RateLimiter::with_max_sources(config.admin_failure_rate, max_sources),
            login_limiter: RateLimiter::with_max_sources(config.login_rate, max_sources),
            login_failures: RateLimiter::with_max_sources(config.login_failure_rate, max_sources),
            login_slowdown: RateLimiter::with_max_sources(config.login_slowdown_rate, max_sources),
            listeners: Listeners::new(config.max_listeners),
            keys: loaded.keys,
            passwords: loaded.passwords,
            live: LiveStreams::default(),
            csrf: CsrfKey::generate()?,
            handoffs: Handoffs::default(),
            editor_sessions: EditorSessions::default(),
            editor_cache: crate::editor_cache::AssetCache::new(config.editor_cache_bytes),
            snapshots: crate::snapshots::Snapshots::new(&config.data_dir),
            node_red_requests: std::sync::Mutex::default(),
            mqtt,
            events: broadcast::channel(EVENT_BACKLOG).0,
            config,
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server::accept_loop(
            state.clone(),
            listener,
            acceptor,
            stopped,
        ));
        info!(url = %platform_file.url, listen = %local_addr, data_dir = %state.config.data_dir.display(), "platform listening");
        Ok(Platform {
            state,
            local_addr,
            admin_token: loaded.admin_token,
            stop,
            acceptor: Mutex::new(Some(task)),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The MQTT broker devices' messages go to: the embedded broker's
    /// MQTT 5 listener, or the external broker's address when its host is
    /// an IP address. `None` when MQTT is off.
    pub fn mqtt_broker_addr(&self) -> Option<SocketAddr> {
        self.state.mqtt.as_ref()?.broker_addr()
    }

    /// `mqtt://HOST:PORT` of the broker (without credentials), if MQTT is
    /// on.
    pub fn mqtt_broker_url(&self) -> Option<String> {
        self.state
            .mqtt
            .as_ref()
            .map(crate::mqtt::Bridge::broker_url)
    }

    /// The embedded broker's MQTT 3.1.1 listener, if configured.
    pub fn mqtt_v311_addr(&self) -> Option<SocketAddr> {
        self.state.mqtt.as_ref()?.v4_addr()
    }

    /// A device's MQTT bridge counts, if it opened an `mqtt` stream since
    /// the platform started.
    pub fn mqtt_stats(&self, device_id: &str) -> Option<crate::mqtt::MqttStats> {
        self.state.mqtt.as_ref()?.stats(device_id)
    }

    /// `https://HOST:PORT`, HOST being the first configured name.
    /// Drops every file of the editor asset cache (`editor_cache`): the
    /// next editor load fetches them from the device again.
    pub fn clear_editor_cache(&self) {
        self.state.editor_cache.clear();
    }

    /// Bytes and files held by the editor asset cache.
    pub fn editor_cache_usage(&self) -> (usize, usize) {
        self.state.editor_cache.usage()
    }

    pub fn url(&self) -> String {
        format!(
            "https://{}:{}",
            self.state.config.public_host(),
            self.local_addr.port()
        )
    }

    /// The CA certificate, PEM: what devices pin and clients trust.
    pub fn ca_pem(&self) -> String {
        self.state.ca.cert_pem().to_string()
    }

    /// `DIR/ca.crt`.
    pub fn ca_path(&self) -> PathBuf {
        self.state.config.data_dir.join(crate::ca::CA_CERT_FILE)
    }

    /// `DIR/server.crt`, the listener's certificate.
    pub fn server_cert_path(&self) -> PathBuf {
        self.state.config.data_dir.join(SERVER_CERT_FILE)
    }

    /// The admin token (also in `DIR/admin-token`).
    pub fn admin_token(&self) -> Secret {
        self.admin_token.clone()
    }

    /// Creates a provisioning token: its secret and this platform's CA hash.
    pub async fn create_token(&self, spec: TokenSpec) -> Result<ProvisioningToken, PlatformError> {
        crate::admin::check_spec(&spec).map_err(PlatformError::BadTokenSpec)?;
        Ok(self.state.create_token(&spec).await?.0)
    }

    /// Every provisioning token, without its secret.
    pub async fn tokens(&self) -> Result<Vec<TokenSummary>, PlatformError> {
        self.state.tokens().await
    }

    /// Revokes the provisioning token with this id (from [`Self::tokens`]).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenSummary, PlatformError> {
        self.state.revoke_token(id).await
    }

    /// SHA-256 of the CA's SubjectPublicKeyInfo: the second part of every
    /// provisioning token this platform creates.
    pub fn ca_spki_sha256(&self) -> [u8; 32] {
        self.state.ca.spki_sha256()
    }

    /// Device certificates signed since start (renewals included).
    pub fn certificates_issued(&self) -> u64 {
        self.state.ca.issued_count()
    }

    /// Every enrolled device, with its live tunnel's figures.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, PlatformError> {
        self.state.devices().await
    }

    /// The stored audit trails the query selects, verified.
    pub async fn audit(
        &self,
        query: crate::audit::AuditQuery,
    ) -> Result<crate::audit::AuditReport, PlatformError> {
        self.state.audit(query).await
    }

    /// The store, for tests that play someone with write access to the
    /// platform's disk.
    #[doc(hidden)]
    pub fn store(&self) -> &crate::store::Store {
        &self.state.store
    }

    /// Revokes a device and closes its live tunnel with `REVOKED`. Returns
    /// true if a live tunnel was closed.
    pub async fn revoke(&self, device_id: &str) -> Result<bool, PlatformError> {
        self.state.revoke(device_id).await
    }

    /// The device's live tunnel.
    pub fn tunnel(&self, device_id: &str) -> Option<Tunnel> {
        self.state.registry.get(device_id).map(|live| live.tunnel)
    }

    /// See [`State::snapshot_from_device`].
    pub async fn snapshot_from_device(
        &self,
        device_id: &str,
        by: &str,
        expires_in_secs: Option<u64>,
    ) -> Result<crate::snapshots::SnapshotInfo, PlatformError> {
        self.state
            .snapshot_from_device(device_id, by, expires_in_secs)
            .await
    }

    /// Opens `tcp:<service>` on the device and waits until it is accepted.
    pub async fn open_tcp(
        &self,
        device_id: &str,
        service: &str,
    ) -> Result<TunnelStream, ConnectError> {
        self.state.open_tcp(device_id, service).await
    }

    /// Creates a platform user (the password is hashed with Argon2id).
    pub async fn add_user(
        &self,
        name: &str,
        team: &str,
        role: Role,
        password: &Secret,
    ) -> Result<UserInfo, PlatformError> {
        self.state.add_user(name, team, role, password).await
    }

    /// Every platform user.
    pub async fn users(&self) -> Result<Vec<UserInfo>, PlatformError> {
        self.state.users().await
    }

    /// Removes a user and ends their sessions (closing their live editor
    /// streams). Returns how many sessions ended.
    pub async fn remove_user(&self, name: &str) -> Result<usize, PlatformError> {
        self.state.remove_user(name).await
    }

    /// Sets a user's password (hashed with Argon2id) and ends every session
    /// of theirs, closing their editor cookies and live editor streams.
    /// Returns how many sessions ended.
    pub async fn set_password(
        &self,
        name: &str,
        password: &Secret,
    ) -> Result<usize, PlatformError> {
        self.state.set_password(name, password).await
    }

    /// Changes a user's role and ends every session of theirs, closing
    /// their editor cookies and live editor streams: the new role applies
    /// from their next login. Returns how many sessions ended.
    pub async fn set_role(&self, name: &str, role: Role) -> Result<usize, PlatformError> {
        self.state.set_role(name, role).await
    }

    /// Turns a device's protection mode on or off and pushes it to the
    /// device if it is online. Returns true if it was pushed.
    pub async fn set_protection(
        &self,
        device_id: &str,
        enabled: bool,
    ) -> Result<bool, PlatformError> {
        self.state.set_protection(device_id, enabled).await
    }

    /// Asks a device to renew its certificate now, inside the renewal
    /// window or not: stored, and pushed (`RenewNow`) to its control stream
    /// if it is online, or at its next connection. True if pushed now.
    pub async fn request_renewal(&self, device_id: &str) -> Result<bool, PlatformError> {
        self.state.request_renewal(device_id).await
    }

    /// See [`State::create_snapshot`].
    pub async fn create_snapshot(
        &self,
        device_id: &str,
        files: Vec<(String, Vec<u8>)>,
        expires_in_secs: Option<u64>,
    ) -> Result<crate::snapshots::SnapshotInfo, PlatformError> {
        self.state
            .create_snapshot(device_id, files, expires_in_secs)
            .await
    }

    /// See [`State::push_snapshot`].
    pub async fn push_snapshot(
        &self,
        device_id: &str,
        version: u64,
    ) -> Result<(crate::snapshots::SnapshotInfo, bool), PlatformError> {
        self.state.push_snapshot(device_id, version).await
    }

    /// See [`State::rollback_snapshot`].
    pub async fn rollback_snapshot(
        &self,
        device_id: &str,
    ) -> Result<(u64, crate::snapshots::SnapshotInfo, bool), PlatformError> {
        self.state.rollback_snapshot(device_id).await
    }

    /// Every snapshot of a device (or of all), oldest first.
    pub fn snapshots(&self, device_id: Option<&str>) -> Vec<crate::snapshots::SnapshotInfo> {
        self.state.snapshots.list(device_id)
    }

    /// See [`State::set_window`].
    pub async fn set_window(
        &self,
        device_id: &str,
        window: Option<&str>,
        by: &str,
    ) -> Result<(Option<String>, bool), PlatformError> {
        self.state.set_window(device_id, window, by).await
    }

    /// See [`State::node_red_action`].
    pub async fn node_red_action(
        &self,
        device_id: &str,
        action: &str,
        by: &str,
    ) -> Result<bool, PlatformError> {
        self.state.node_red_action(device_id, action, by).await
    }

    /// Revokes one certificate of a device (by SHA-256 fingerprint, hex),
    /// not the device; a live tunnel authenticated with it is closed.
    /// True if one was.
    pub async fn revoke_certificate(
        &self,
        device_id: &str,
        fingerprint: &str,
    ) -> Result<bool, PlatformError> {
        self.state.revoke_certificate(device_id, fingerprint).await
    }

    /// Rotates the editor grant key (`keys::SigningKeys::rotate_grant_key`)
    /// and tells every live device; devices offline now learn it when they
    /// connect. Returns the new public key (hex).
    pub async fn rotate_grant_key(&self) -> Result<String, PlatformError> {
        self.state.rotate_grant_key().await
    }

    /// Rotates the snapshot keys (`keys::SigningKeys::rotate_snapshot_keys`):
    /// a new root version signed by the old root key and the new one, and a
    /// new snapshot key that signs every manifest from now on; with
    /// `revoke_old`, the old root and snapshot keys are revoked. Devices
    /// walk the new root at their next snapshot pull. Returns the new root.
    pub async fn rotate_snapshot_keys(
        &self,
        revoke_old: bool,
    ) -> Result<tether_proto::snapshot::Root, PlatformError> {
        self.state.rotate_snapshot_keys(revoke_old).await
    }

    /// Ends the control stream of a device's live tunnel; a device does
    /// not run without one, so it closes the tunnel and connects again.
    /// True if the device was online.
    pub fn reset_control_stream(&self, device_id: &str) -> bool {
        self.state.registry.reset_control(device_id)
    }

    /// The public keys devices pin at enrollment.
    pub fn pinned_keys(&self) -> PinnedKeys {
        self.state.keys.pinned()
    }

    /// Live editor streams (HTTP connections and WebSockets) of all
    /// sessions.
    pub fn live_editor_streams(&self) -> usize {
        self.state.live.total()
    }

    /// Platform-side listeners open now (admin listen sessions).
    pub fn listener_count(&self) -> usize {
        self.state.listeners.active()
    }

    /// A receiver of every event from now on.
    pub fn events(&self) -> broadcast::Receiver<PlatformEvent> {
        self.state.events.subscribe()
    }

    /// Stops accepting connections, closes platform-side listeners, closes
    /// tunnels gracefully (bounded by `shutdown_grace`, then at once) and
    /// releases the database file, so a new platform can start on the same
    /// data directory.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.state.listeners.close_all();
        if let Some(task) = self.acceptor.lock().await.take() {
            let _ = task.await;
        }
        self.state
            .registry
            .shutdown_all(self.state.config.shutdown_grace)
            .await;
        if let Some(mqtt) = &self.state.mqtt {
            mqtt.shutdown();
        }
        self.state.store.close_and_wait().await;
        info!("platform stopped");
    }
}

fn load(
    dir: &Path,
    names: &[String],
    cost: crate::users::PasswordCost,
) -> Result<Loaded, PlatformError> {
    files::create_private_dir(dir)?;
    let store = Store::open(dir)?;
    let ca = Ca::load_or_create(dir)?;
    let keys = SigningKeys::load_or_create(dir)?;
    let admin_token = keys::load_or_create_admin_token(dir)?;
    store.set_admin_token_hash(&keys::sha256(admin_token.expose().as_bytes()))?;
    let identity = ca.issue_server(names, dir)?;
    let passwords = Passwords::new(cost)?;
    Ok(Loaded {
        store,
        ca,
        keys,
        admin_token,
        identity,
        passwords,
    })
}

impl State {
    /// Publishes an event; nobody listening is fine.
    pub fn emit(&self, event: PlatformEvent) {
        let _ = self.events.send(event);
    }

    /// Stores a new token (by the hash of its secret); returns it, with
    /// this platform's CA hash, and its expiry (Unix seconds).
    pub async fn create_token(
        &self,
        spec: &TokenSpec,
    ) -> Result<(ProvisioningToken, u64), PlatformError> {
        let secret = format!(
            "{}{}",
            tether_proto::api::PROVISIONING_TOKEN_PREFIX,
            keys::random_hex(tether_proto::api::PROVISIONING_TOKEN_BYTES)?
        );
        let token = ProvisioningToken::new(&secret, self.ca.spki_sha256()).ok_or_else(|| {
            PlatformError::BadTokenSpec("the generated token is malformed".into())
        })?;
        let now = unix_now();
        let ttl = spec.ttl.unwrap_or(DEFAULT_TOKEN_TTL);
        let record = TokenRecord {
            team: spec.team.clone(),
            created: now,
            expires_at: now.saturating_add(ttl.as_secs().max(1)),
            uses_left: spec.uses,
            uses: spec.uses,
            revoked: false,
        };
        let expires_at = record.expires_at;
        let hash = keys::sha256_hex(secret.as_bytes());
        let id: String = hash.chars().take(crate::store::TOKEN_ID_LEN).collect();
        self.store
            .blocking(move |s| s.insert_token(&hash, &record))
            .await?;
        info!(%id, team = %spec.team, uses = spec.uses, expires_at, "provisioning token created");
        Ok((token, expires_at))
    }

    /// Every provisioning token, without secrets.
    pub async fn tokens(&self) -> Result<Vec<TokenSummary>, PlatformError> {
        Ok(self.store.blocking(|s| s.tokens()).await?)
    }

    /// Revokes one provisioning token by id.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenSummary, PlatformError> {
        let id = id.to_owned();
        let summary = self.store.blocking(move |s| s.revoke_token(&id)).await?;
        info!(id = %summary.id, team = %summary.team, "provisioning token revoked");
        Ok(summary)
    }

    /// The stored audit trails the query selects, verified.
    pub async fn audit(
        &self,
        query: crate::audit::AuditQuery,
    ) -> Result<crate::audit::AuditReport, PlatformError> {
        let report = self
            .store
            .blocking(move |s| crate::audit::report(s, &query))
            .await;
        match report {
            Err(StoreError::NoDevice(id)) => Err(PlatformError::NoDevice(id)),
            other => Ok(other?),
        }
    }

    /// Every device, joined with the registry's live figures.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, PlatformError> {
        let records = self.store.blocking(|s| s.devices()).await?;
        Ok(records
            .into_iter()
            .map(|d| {
                let live = self.registry.get(&d.id);
                DeviceInfo {
                    online: live.is_some(),
                    connected_since: live.as_ref().map(|l| unix(l.connected_since)),
                    last_heartbeat: live.as_ref().and_then(|l| l.last_heartbeat.map(unix)),
                    audit: live.as_ref().and_then(|l| l.audit.clone()),
                    snapshot: live.as_ref().and_then(|l| l.snapshot.clone()),
                    window: self.snapshots.window(&d.id).and_then(|(w, _)| w),
                    health: live.as_ref().and_then(|l| l.health.clone()),
                    history: self.registry.history(&d.id),
                    mqtt: self.mqtt.as_ref().and_then(|m| m.stats(&d.id)),
                    rtt_micros: live
                        .as_ref()
                        .and_then(|l| l.tunnel.rtt())
                        .map(|rtt| u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX)),
                    current_certificate: d.certs.current.clone(),
                    superseded_seen_at: d.certs.superseded_seen.as_ref().map(|(at, _)| *at),
                    id: d.id,
                    name: d.name,
                    team: d.team,
                    enrolled_at: d.enrolled_at,
                    revoked: d.revoked,
                    cert_not_after: d.cert_not_after,
                    protected: d.protected,
                }
            })
            .collect())
    }

    /// Marks the device revoked, then closes its live tunnel.
    pub async fn revoke(&self, device_id: &str) -> Result<bool, PlatformError> {
        let id = device_id.to_string();
        match self.store.blocking(move |s| s.revoke(&id)).await {
            Ok(_) => {}
            Err(StoreError::NoDevice(id)) => return Err(PlatformError::NoDevice(id)),
            Err(e @ StoreError::NoCertificate { .. }) => {
                return Err(PlatformError::NoCertificate(e.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
        let closed = self.registry.close(
            device_id,
            CloseCode::REVOKED,
            "device revoked by a fleet manager",
        );
        if let Some(mqtt) = &self.mqtt {
            mqtt.forget(device_id);
        }
        info!(%device_id, disconnected = closed, "device revoked");
        Ok(closed)
    }

    /// Creates a user after checking name, team and password.
    pub async fn add_user(
        &self,
        name: &str,
        team: &str,
        role: Role,
        password: &Secret,
    ) -> Result<UserInfo, PlatformError> {
        crate::users::check_new_user(name, team, password.expose())?;
        let password_hash = self.passwords.hash(password).await?;
        let record = UserRecord {
            name: name.to_string(),
            team: team.to_string(),
            role,
            password_hash,
            created_at: unix_now(),
        };
        let info = UserInfo::from(&record);
        match self.store.blocking(move |s| s.insert_user(&record)).await {
            Ok(()) => {}
            Err(StoreError::UserExists(name)) => return Err(PlatformError::UserExists(name)),
            Err(e) => return Err(e.into()),
        }
        info!(user = %info.name, team = %info.team, role = %info.role, "user created");
        Ok(info)
    }

    /// Every user, without password hashes.
    pub async fn users(&self) -> Result<Vec<UserInfo>, PlatformError> {
        let users = self.store.blocking(|s| s.users()).await?;
        Ok(users.iter().map(UserInfo::from).collect())
    }

    /// Removes a user and their sessions, then closes the sessions' live
    /// editor streams. Returns how many sessions ended.
    pub async fn remove_user(&self, name: &str) -> Result<usize, PlatformError> {
        let key = name.to_string();
        let sessions = match self.store.blocking(move |s| s.remove_user(&key)).await {
            Ok(sessions) => sessions,
            Err(StoreError::NoUser(name)) => return Err(PlatformError::NoUser(name)),
            Err(e) => return Err(e.into()),
        };
        self.close_sessions(&sessions);
        info!(user = %name, sessions = sessions.len(), "user removed");
        Ok(sessions.len())
    }

    /// Sets a user's password and ends their sessions.
    pub async fn set_password(
        &self,
        name: &str,
        password: &Secret,
    ) -> Result<usize, PlatformError> {
        crate::users::check_password(password.expose())?;
        let password_hash = self.passwords.hash(password).await?;
        let key = name.to_string();
        let sessions = match self
            .store
            .blocking(move |s| s.set_password_hash(&key, &password_hash))
            .await
        {
            Ok(sessions) => sessions,
            Err(StoreError::NoUser(name)) => return Err(PlatformError::NoUser(name)),
            Err(e) => return Err(e.into()),
        };
        self.close_sessions(&sessions);
        info!(user = %name, sessions = sessions.len(), "password changed");
        Ok(sessions.len())
    }

    /// Changes a user's role and ends their sessions.
    pub async fn set_role(&self, name: &str, role: Role) -> Result<usize, PlatformError> {
        let key = name.to_string();
        let sessions = match self.store.blocking(move |s| s.set_role(&key, role)).await {
            Ok(sessions) => sessions,
            Err(StoreError::NoUser(name)) => return Err(PlatformError::NoUser(name)),
            Err(e) => return Err(e.into()),
        };
        self.close_sessions(&sessions);
        info!(user = %name, %role, sessions = sessions.len(), "role changed");
        Ok(sessions.len())
    }

    /// Closes the editor cookies and live editor streams of sessions just
    /// removed from the store.
    fn close_sessions(&self, hashes: &[String]) {
        for hash in hashes {
            self.editor_sessions.end_session(hash);
            self.live.close_session(hash);
        }
    }

    /// Asks a device to renew its certificate now, inside the renewal
    /// window or not: stored, and pushed (`RenewNow`) to its control stream
    /// if it is online, or at its next connection. True if pushed now.
    pub async fn request_renewal(&self, device_id: &str) -> Result<bool, PlatformError> {
        let id = device_id.to_string();
        match self.store.blocking(move |s| s.request_renewal(&id)).await {
            Ok(_) => {}
            Err(StoreError::NoDevice(id)) => return Err(PlatformError::NoDevice(id)),
            Err(e) => return Err(e.into()),
        }
        let pushed = self.registry.settings_changed(device_id);
        info!(%device_id, pushed, "certificate renewal requested");
        Ok(pushed)
    }

    /// Fails with `NoDevice` unless the device is enrolled.
    async fn known_device(&self, device_id: &str) -> Result<(), PlatformError> {
        let id = device_id.to_string();
        match self.store.blocking(move |s| s.device(&id)).await? {
            Some(_) => Ok(()),
            None => Err(PlatformError::NoDevice(device_id.to_string())),
        }
    }

    /// Makes and signs a snapshot for a device from `files` (path, bytes).
    pub async fn create_snapshot(
        &self,
        device_id: &str,
        files: Vec<(String, Vec<u8>)>,
        expires_in_secs: Option<u64>,
    ) -> Result<crate::snapshots::SnapshotInfo, PlatformError> {
        self.known_device(device_id).await?;
        let expiry = expires_in_secs.unwrap_or(crate::snapshots::DEFAULT_EXPIRY_SECS);
        Ok(self
            .snapshots
            .create(&self.keys, device_id, files, expiry, unix_now())
            .await?)
    }

    /// Makes `version` the one the device should run and tells it (now if
    /// online, else at its next connection). True if told now.
    pub async fn push_snapshot(
        &self,
        device_id: &str,
        version: u64,
    ) -> Result<(crate::snapshots::SnapshotInfo, bool), PlatformError> {
        self.known_device(device_id).await?;
        let info = self.snapshots.push(device_id, version).await?;
        Ok((info, self.registry.settings_changed(device_id)))
    }

    /// Pushes the version pushed before the last again, as a new version.
    /// Returns the version it copies, the new one, and whether told now.
    pub async fn rollback_snapshot(
        &self,
        device_id: &str,
    ) -> Result<(u64, crate::snapshots::SnapshotInfo, bool), PlatformError> {
        self.known_device(device_id).await?;
        let (earlier, info) = self
            .snapshots
            .rollback_copy(&self.keys, device_id, unix_now())
            .await?;
        let (info, told) = self.push_snapshot(device_id, info.version).await?;
        Ok((earlier, info, told))
    }

    /// Sets (or clears) a device's maintenance window, for `by`: the device
    /// switches snapshots in only inside it. Returns the window as stored
    /// and whether the device was told now (else at its next connection).
    pub async fn set_window(
        &self,
        device_id: &str,
        window: Option<&str>,
        by: &str,
    ) -> Result<(Option<String>, bool), PlatformError> {
        self.known_device(device_id).await?;
        let window = self.snapshots.set_window(device_id, window, by).await?;
        Ok((window, self.registry.settings_changed(device_id)))
    }

    /// Asks a device to start, stop or restart its Node-RED, for `by`.
    /// True if told now (else at its next connection).
    pub async fn node_red_action(
        &self,
        device_id: &str,
        action: &str,
        by: &str,
    ) -> Result<bool, PlatformError> {
        if !matches!(action, "start" | "stop" | "restart") {
            return Err(PlatformError::BadAction(action.to_string()));
        }
        self.known_device(device_id).await?;
        self.node_red_requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(device_id.to_string())
            .or_default()
            .push((action.to_string(), by.to_string()));
        Ok(self.registry.settings_changed(device_id))
    }

    /// Revokes one certificate of a device (by SHA-256 fingerprint, hex),
    /// not the device; a live tunnel authenticated with it is closed.
    /// True if one was.
    pub async fn revoke_certificate(
        &self,
        device_id: &str,
        fingerprint: &str,
    ) -> Result<bool, PlatformError> {
        let (id, fp) = (device_id.to_string(), fingerprint.to_ascii_lowercase());
        let fp2 = fp.clone();
        match self
            .store
            .blocking(move |s| s.revoke_certificate(&id, &fp2))
            .await
        {
            Ok(()) => {}
            Err(StoreError::NoDevice(id)) => return Err(PlatformError::NoDevice(id)),
            Err(e @ StoreError::NoCertificate { .. }) => {
                return Err(PlatformError::NoCertificate(e.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
        let closed = match self.registry.get(device_id) {
            Some(live) if live.fingerprint == fp => self.registry.close(
                device_id,
                CloseCode::REVOKED,
                "this certificate of the device was revoked",
            ),
            _ => false,
        };
        info!(%device_id, fingerprint = %fp, closed, "certificate revoked");
        Ok(closed)
    }

    /// Rotates the grant key and pushes the rotations to every live device.
    pub async fn rotate_grant_key(self: &Arc<Self>) -> Result<String, PlatformError> {
        let state = self.clone();
        let rotation = tokio::task::spawn_blocking(move || state.keys.rotate_grant_key(unix_now()))
            .await
            .map_err(|e| PlatformError::Task(e.to_string()))??;
        let told = self.registry.signal_all();
        info!(new_key = %rotation.to, devices_told = told, "grant key rotated");
        Ok(rotation.to)
    }

    /// Rotates the snapshot keys; see [`Platform::rotate_snapshot_keys`].
    pub async fn rotate_snapshot_keys(
        self: &Arc<Self>,
        revoke_old: bool,
    ) -> Result<tether_proto::snapshot::Root, PlatformError> {
        let state = self.clone();
        let root = tokio::task::spawn_blocking(move || {
            state.keys.rotate_snapshot_keys(revoke_old, unix_now())
        })
        .await
        .map_err(|e| PlatformError::Task(e.to_string()))??;
        info!(
            root_version = root.version,
            revoked = root.revoked.len(),
            "snapshot keys rotated"
        );
        Ok(root)
    }

    /// Stores the device's protection mode, then tells its live control
    /// stream, which pushes it to the device. True if a control stream was
    /// there to tell.
    pub async fn set_protection(
        &self,
        device_id: &str,
        enabled: bool,
    ) -> Result<bool, PlatformError> {
        let id = device_id.to_string();
        match self
            .store
            .blocking(move |s| s.set_protected(&id, enabled))
            .await
        {
            Ok(_) => {}
            Err(StoreError::NoDevice(id)) => return Err(PlatformError::NoDevice(id)),
            Err(e) => return Err(e.into()),
        }
        let pushed = self.registry.settings_changed(device_id);
        info!(%device_id, enabled, pushed, "protection mode set");
        Ok(pushed)
    }

    /// Opens `tcp:<service>` on the device's live tunnel and waits for the
    /// device to accept it.
    pub async fn open_tcp(
        &self,
        device_id: &str,
        service: &str,
    ) -> Result<TunnelStream, ConnectError> {
        let header = ServiceHeader::new(Service::Tcp(service.to_string()));
        if header.validate().is_err() {
            return Err(ConnectError::BadService(service.to_string()));
        }
        self.open_stream(device_id, header).await
    }

    /// Makes and signs a new snapshot for `device_id` from the flows its
    /// Node-RED runs now (captured over the tunnel, for `by`) and the rest
    /// of the version it should run (settings, environment, modules).
    /// Not pushed.
    pub async fn snapshot_from_device(
        &self,
        device_id: &str,
        by: &str,
        expires_in_secs: Option<u64>,
    ) -> Result<crate::snapshots::SnapshotInfo, PlatformError> {
        use tether_proto::snapshot::capture;
        self.known_device(device_id).await?;
        let header = ServiceHeader::new(Service::Snapshot)
            .with(capture::ACTION_KEY, capture::CAPTURE)
            .with(capture::BY_KEY, by);
        let stream = self.open_stream(device_id, header).await?;
        let captured = crate::capture::read(stream).await?;
        // Only a version the device ran: the flows were deployed on it.
        let base = captured.captured.base;
        let (files, expiry) = match base {
            Some(version) => self.snapshots.files(device_id, version)?,
            None => (Vec::new(), crate::snapshots::DEFAULT_EXPIRY_SECS),
        };
        let files = crate::capture::merge(files, captured)
            .map_err(crate::snapshots::SnapshotError::Invalid)?;
        let expiry = expires_in_secs.unwrap_or(expiry);
        let info = self
            .snapshots
            .create(&self.keys, device_id, files, expiry, unix_now())
            .await?;
        info!(device_id, version = info.version, by, base = ?base, "snapshot made from the device's flows");
        Ok(info)
    }

    /// Opens a stream with `header` on the device's live tunnel and waits
    /// for the device to accept it.
    async fn open_stream(
        &self,
        device_id: &str,
        header: ServiceHeader,
    ) -> Result<TunnelStream, ConnectError> {
        let Some(live) = self.registry.get(device_id) else {
            let id = device_id.to_string();
            let known = self.store.blocking(move |s| s.device(&id)).await?;
            return Err(match known {
                Some(_) => ConnectError::DeviceOffline(device_id.to_string()),
                None => ConnectError::UnknownDevice(device_id.to_string()),
            });
        };
        let wait = self.config.open_timeout;
        let open_and_wait = async {
            // A tunnel is registered before its handshake ends: wait for it.
            if live.tunnel.connected().await.is_err() {
                return Err(ConnectError::DeviceOffline(device_id.to_string()));
            }
            let stream = live.tunnel.open(header)?;
            match stream.accepted().await {
                Ok(()) => Ok(stream),
                Err(e) => Err(ConnectError::Refused(e.to_string())),
            }
        };
        tokio::time::timeout(wait, open_and_wait)
            .await
            .unwrap_or(Err(ConnectError::Timeout(wait)))
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        // Without `shutdown`, at least stop accepting.
        let _ = self.stop.send(true);
        self.state.listeners.close_all();
        if !self.state.registry.is_empty() {
            warn!("platform dropped without shutdown; live tunnels end with the runtime");
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    unix(SystemTime::now())
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
