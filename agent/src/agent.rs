//! The running agent: [`Agent::start`] loads (or first makes, from a
//! provisioning token) the device identity, then spawns the reconnect loop
//! and the status-file writer on the current tokio runtime. The handle
//! publishes a [`Status`] channel and stops everything on
//! [`Agent::shutdown`].
//!
//! This module owns the agent's shared state ([`Shared`]): the config, the
//! current identity and credentials (replaced by renewal), the status
//! channel, and the editor (its target, replay guard, protection mode and
//! audit sink, from [`AgentOptions`]). It never does I/O itself beyond
//! loading the identity and the stored protection mode.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::audit::{AuditEvent, AuditQueue};
use crate::config::Config;
use crate::editor::{self, Editor, EditorTarget, Protection};
use crate::enroll::{self, EnrollError, EnrollOptions};
use crate::identity::{Credentials, Identity, IdentityError, StateDir};
use crate::node_red::{NodeRed, NodeRedError, Permissions};
use crate::services::Services;
use crate::snapshot::Folder;
use crate::status::{self, Status, StatusFile};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("this device is not enrolled (no identity in '{}'); help: run 'tetherd enroll' or set provisioning_token in the config", .0.display())]
    NotEnrolled(std::path::PathBuf),
    #[error(
        "the config has a provisioning_token but no platform URL; help: set platform = \"https://HOST:PORT\""
    )]
    NoPlatform,
    #[error("enrollment failed: {0}")]
    Enroll(#[from] EnrollError),
    #[error("cannot load the device identity: {0}")]
    Identity(#[from] IdentityError),
    #[error(
        "another tetherd already runs with the state directory '{}'; help: stop it first (tetherd status --state-dir shows its pid), or give this one its own state_dir",
        .0.display()
    )]
    AlreadyRunning(std::path::PathBuf),
    #[error("cannot lock '{}': {source}; help: check that the state directory is writable by this user", .path.display())]
    Lock {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the local Node-RED: {0}")]
    NodeRed(#[from] NodeRedError),
    #[error("cannot open the audit store: {0}")]
    Audit(crate::audit::AuditError),
    #[error("cannot open the snapshot folder: {0}")]
    Snapshot(#[from] crate::snapshot::FolderError),
    #[error("cannot start the MQTT bridge: {0}")]
    Mqtt(#[from] crate::mqtt::MqttError),
}

impl AgentError {
    /// The process exit code (`docs/operations.md`).
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::NotEnrolled(_) | AgentError::NoPlatform => crate::exit::CONFIG,
            AgentError::Enroll(e) => e.exit_code(),
            AgentError::Identity(_)
            | AgentError::Lock { .. }
            | AgentError::Audit(_)
            | AgentError::Snapshot(_)
            | AgentError::Mqtt(crate::mqtt::MqttError::Outbox(_)) => crate::exit::CANTCREAT,
            AgentError::Mqtt(_) => crate::exit::CONFIG,
            AgentError::AlreadyRunning(_) => crate::exit::TEMPFAIL,
            AgentError::NodeRed(NodeRedError::Write(_)) => crate::exit::CANTCREAT,
            AgentError::NodeRed(_) => crate::exit::CONFIG,
        }
    }
}

/// The identity in use and its loaded key material.
#[derive(Debug)]
pub(crate) struct Current {
    pub(crate) identity: Identity,
    pub(crate) creds: Credentials,
}

/// State shared by the agent's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) state: StateDir,
    pub(crate) services: Services,
    /// Editor access; `None` when it is off.
    pub(crate) editor: Option<Arc<Editor>>,
    /// The durable audit queue.
    pub(crate) audit: Arc<AuditQueue>,
    /// The local Node-RED, when the agent locked one down.
    pub(crate) node_red: Option<crate::node_red::NodeRedHandle>,
    /// Where the flows are, for the platform's captures, when there is a
    /// local Node-RED.
    pub(crate) capture: Option<crate::snapshot::capture::Source>,
    /// The MQTT bridge, when `[mqtt]` is configured.
    pub(crate) mqtt: Option<Arc<crate::mqtt::Bridge>>,
    /// The snapshot task's inbox, when there is a local Node-RED.
    pub(crate) snapshots: Option<tokio::sync::mpsc::Sender<crate::snapshot::apply::Notice>>,
    current: Mutex<Current>,
    /// The platform grant keys trusted now (`editor::keys`).
    grant_keys: Mutex<editor::TrustedKeys>,
    status: watch::Sender<Status>,
    /// When the agent started, for heartbeat uptime.
    pub(crate) started: tokio::time::Instant,
    /// Health figures, sampled at each heartbeat.
    health: Mutex<crate::health::Health>,
}

impl Shared {
    pub(crate) fn current(&self) -> MutexGuard<'_, Current> {
        // Nothing panics while holding the lock; a poisoned lock still holds
        // a consistent identity.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's and its processes' figures now.
    pub(crate) fn health_sample(&self) -> tether_proto::control::DeviceHealth {
        let node_red = self
            .node_red
            .as_ref()
            .and_then(|n| n.launcher.as_ref())
            .and_then(|l| l.pid());
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sample(node_red)
    }

    pub(crate) fn device_id(&self) -> String {
        self.current().identity.device_id.clone()
    }

    /// What editor grants are checked against: this device and the grant
    /// keys it trusts now (pinned at enrollment, or rotated to since).
    pub(crate) fn editor_device(&self) -> editor::Device {
        let id = self.current().identity.device_id.clone();
        let now = self.config.clock.now_unix();
        editor::Device {
            id,
            grant_keys: self.trusted_keys().accepted(now),
        }
    }

    fn trusted_keys(&self) -> MutexGuard<'_, editor::TrustedKeys> {
        self.grant_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Follows the platform's grant key rotations and stores the result.
    /// Returns the new current key if it changed.
    pub(crate) fn follow_grant_keys(
        &self,
        rotations: &[tether_proto::grant::KeyRotation],
    ) -> Result<Option<String>, crate::files::FileError> {
        let now = self.config.clock.now_unix();
        let mut keys = self.trusted_keys();
        let before = keys.clone();
        if keys.follow(rotations, now) == 0 && keys.retired == before.retired {
            return Ok(None);
        }
        if let Err(e) = keys.store(&self.state) {
            *keys = before;
            return Err(e);
        }
        Ok(Some(keys.current.clone()))
    }

    /// Switches to a renewed identity (already stored on disk).
    pub(crate) fn replace_current(&self, identity: Identity, creds: Credentials) {
        let (not_after, fingerprint) = (creds.cert.not_after, creds.cert.fingerprint.clone());
        *self.current() = Current { identity, creds };
        self.update(|s, _| {
            s.cert_not_after = not_after;
            s.cert_fingerprint = fingerprint;
            s.renewals += 1;
        });
    }

    /// Changes the status; `now` is the agent clock's Unix time.
    /// Changes the status. Watchers (and with them `status.json`, which is
    /// synced to flash on every change) hear of it only if something
    /// actually changed: the RTT refresh, say, mostly finds the same value.
    pub(crate) fn update(&self, change: impl FnOnce(&mut Status, u64)) {
        let now = self.config.clock.now_unix();
        change_status(&self.status, |s| change(s, now));
    }

    pub(crate) fn set_error(&self, message: String) {
        self.update(|s, _| s.last_error = Some(message));
    }

    pub(crate) fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Where the snapshots stand, with the launched Node-RED's state.
    pub(crate) fn snapshot_health(&self) -> Option<tether_proto::control::SnapshotHealth> {
        let mut health = self.status.borrow().snapshot.clone()?;
        health.node_red = self
            .node_red
            .as_ref()
            .and_then(|n| n.launcher.as_ref())
            .map(|l| l.state().to_string());
        Some(health)
    }

    /// Hands a notice to the snapshot task; says so when there is none or
    /// it is overwhelmed.
    pub(crate) fn notify_snapshots(&self, notice: crate::snapshot::apply::Notice) {
        match &self.snapshots {
            Some(tx) => {
                if tx.try_send(notice).is_err() {
                    warn!(
                        "the snapshot task is busy: a notice was dropped (the platform repeats it at the next connection)"
                    );
                }
            }
            None => warn!(
                "the platform sent a snapshot or Node-RED notice, but this agent has no local Node-RED ([node_red] mode = \"off\"): ignored"
            ),
        }
    }

    /// The tunnel settings, with the config's keepalive overrides.
    pub(crate) fn proto_config(&self) -> tether_proto::Config {
        proto_config(&self.config.tunnel)
    }
}

/// tether-proto's device settings with the device's own limits and the
/// config's `[tunnel]` overrides.
fn proto_config(tunnel: &crate::config::TunnelConfig) -> tether_proto::Config {
    let mut proto = tether_proto::Config::new(tether_proto::Role::Device);
    proto.max_stream_window = tunnel.max_stream_window.unwrap_or(DEVICE_MAX_STREAM_WINDOW);
    proto.max_send_buffer = DEVICE_MAX_SEND_BUFFER;
    if let Some(k) = tunnel.keepalive_interval {
        proto.keepalive_interval = k;
    }
    if let Some(i) = tunnel.idle_timeout {
        proto.idle_timeout = i;
    }
    proto
}

/// The largest receive window one stream on the device may grow to, unless
/// `tunnel.max_stream_window_kib` says otherwise. Every byte the platform may
/// send ahead of a stream's reader can sit in a queue in front of another
/// stream's bytes (sockets, the platform's outbox, the agent's own read
/// batch), so this bounds how long a keystroke in the editor waits behind a
/// bulk transfer: 512 KiB gave a p99 of 3.5-3.7 ms beside a bulk stream
/// where 1 MiB gave 4.7-7.3 ms, at the same bulk rate on loopback
/// (`docs/benchmarks.md`). It still allows 40 Mbit/s per stream on a 100 ms
/// path; links that are both fast and long can raise it.
const DEVICE_MAX_STREAM_WINDOW: u32 = 512 * 1024;

/// The most the device's streams may have written and not yet sent, all
/// together (tether-proto's default is 8 MiB). Each stream still buffers up
/// to 256 KiB, so one bulk stream runs as before; many at once (50 editors
/// loading) wait for the tunnel instead of filling the gateway's memory.
const DEVICE_MAX_SEND_BUFFER: usize = 2 * 1024 * 1024;

/// What the agent is started with besides its config.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// The local Node-RED for editor streams. `None` (the default) takes it
    /// from the config's `[node_red]` section: editor streams are refused
    /// when its mode is `off`, and otherwise go to the Node-RED the agent
    /// locked down (and, in `launch` mode, started). `Some` overrides the
    /// config, for tests and embedders.
    pub editor: Option<EditorTarget>,
}

/// A running agent. Dropping it without [`Agent::shutdown`] leaves its
/// tasks running until the runtime ends.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    status: watch::Receiver<Status>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The local Node-RED the agent locked down (and maybe launched).
    node_red: Option<NodeRed>,
    /// Held for the agent's life: one daemon per state directory.
    _lock: std::fs::File,
}

/// Takes `STATE_DIR/tetherd.lock` for this process, so two daemons never
/// share one identity, renew over each other or race on `status.json`. The
/// operating system releases the lock when the process ends, however it
/// ends.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("tetherd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| AgentError::Lock {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::AlreadyRunning(dir.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => Err(AgentError::Lock { path, source }),
    }
}

impl Agent {
    /// Loads the identity (enrolling first if the device has none and the
    /// config has a provisioning token), then spawns the agent's tasks on
    /// the current tokio runtime, with the default [`AgentOptions`].
    pub async fn start(config: Config) -> Result<Agent, AgentError> {
        Agent::start_with(config, AgentOptions::default()).await
    }

    /// Like [`Agent::start`], with the editor target given.
    pub async fn start_with(config: Config, options: AgentOptions) -> Result<Agent, AgentError> {
        let state = StateDir::new(&config.state_dir);
        let identity = match state.load()? {
            Some(identity) => {
                if config.provisioning_token.is_some() {
                    info!(device = %identity.device_id, "the device is enrolled: provisioning_token in the config is no longer used and may be removed");
                }
                if let Some(platform) = &config.platform
                    && platform.trim_end_matches('/') != identity.platform
                {
                    warn!(config = %platform, enrolled = %identity.platform, "the config names another platform than the one this device enrolled with; the enrolled one is used: re-enroll to move the device");
                }
                identity
            }
            None => {
                let Some(token) = config.provisioning_token.clone() else {
                    return Err(AgentError::NotEnrolled(config.state_dir.clone()));
                };
                let platform = config.platform.clone().ok_or(AgentError::NoPlatform)?;
                info!(%platform, "not enrolled yet: enrolling with the provisioning token from the config");
                let options = EnrollOptions {
                    platform,
                    token,
                    ca: config.ca.clone(),
                    state_dir: config.state_dir.clone(),
                    name: config.name.clone(),
                    force: false,
                    clock: config.clock,
                };
                let enrolled = enroll::enroll(&options).await?;
                info!(device = %enrolled.identity.device_id, "enrolled; the provisioning_token in the config is no longer used and may be removed");
                enrolled.identity
            }
        };
        let lock = lock_state_dir(&config.state_dir)?;
        let creds = state.credentials(&identity)?;
        let audit = open_audit(&config, &identity)?;
        let now = config.clock.now_unix();
        let initial = Status::new(
            identity.device_id.clone(),
            creds.cert.not_after,
            creds.cert.fingerprint.clone(),
            now,
        );
        info!(
            device = %identity.device_id,
            name = %identity.name,
            tunnel = %identity.tunnel_url,
            cert_not_after = %crate::clock::rfc3339(creds.cert.not_after),
            services = config.services.len(),
            "agent starting"
        );
        let (status_tx, status_rx) = watch::channel(initial);
        let folder = match (&options.editor, config.node_red.mode) {
            (None, crate::config::NodeRedMode::Launch | crate::config::NodeRedMode::External) => {
                let root = config
                    .node_red
                    .user_dir_in(&config.state_dir)
                    .join(crate::node_red::SNAPSHOTS_DIR);
                Some(Folder::open(&root)?)
            }
            _ => None,
        };
        let node_red = match options.editor {
            Some(_) => None,
            None => NodeRed::start_from(&config.node_red, &config.state_dir, |_, run_as| {
                run_from_current(folder.as_ref().map(|(f, _)| f), run_as)
            })?,
        };
        let target = options.editor.or_else(|| {
            let command = &config.node_red.command;
            node_red.as_ref().map(|n| editor_target(n, command))
        });
        let editor = target.map(|target| {
            let protection = Protection::load(&state);
            info!(node_red = %target.addr, protection = protection.enabled(), "editor access on");
            Arc::new(Editor::new(target, protection, audit.clone(), config.clock))
        });
        let grant_keys = Mutex::new(editor::TrustedKeys::load(&state, &identity.keys.grant));
        let (snapshots_tx, snapshots_rx) =
            tokio::sync::mpsc::channel(crate::snapshot::apply::MAX_NOTICES);
        let snapshot_key = identity.keys.snapshot.clone();
        let node_red_handle = node_red.as_ref().map(NodeRed::handle);
        let capture = match (&folder, &node_red_handle) {
            (Some((folder, _)), Some(node_red)) => Some(crate::snapshot::capture::Source {
                snapshots: folder.root().to_owned(),
                user_dir: node_red.user_dir.clone(),
            }),
            _ => None,
        };
        let state_root = state.root().to_owned();
        let mqtt = match &config.mqtt {
            Some(mqtt) => Some(crate::mqtt::Bridge::start(
                mqtt,
                &config.state_dir,
                &identity.device_id,
                audit.clone(),
                crate::audit::unix_ms(&config.clock),
            )?),
            None => None,
        };
        let shared = Arc::new(Shared {
            mqtt,
            node_red: node_red_handle.clone(),
            services: Services::new(&config.services, editor.is_some())
                .with_capture(capture.is_some()),
            capture,
            snapshots: folder.is_some().then_some(snapshots_tx),
            grant_keys,
            editor,
            audit,
            config,
            state,
            current: Mutex::new(Current { identity, creds }),
            status: status_tx,
            started: tokio::time::Instant::now(),
            health: Mutex::new(crate::health::Health::new(&state_root)),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        if let Some((folder, recovered)) = folder {
            let applier = crate::snapshot::apply::Applier::new(
                shared.clone(),
                folder,
                node_red_handle,
                &snapshot_key,
            );
            tokio::spawn(applier.run(recovered, snapshots_rx));
        }
        let tasks = vec![
            tokio::spawn(crate::reconnect::run(shared.clone(), shutdown_rx.clone())),
            tokio::spawn(write_status(
                shared.clone(),
                status_rx.clone(),
                shutdown_rx,
                now,
            )),
        ];
        Ok(Agent {
            shared,
            status: status_rx,
            shutdown: shutdown_tx,
            tasks,
            node_red,
            _lock: lock,
        })
    }

    /// The agent's status; changes are announced on the channel.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The MQTT bridge's figures, with `[mqtt]`.
    pub fn mqtt_figures(&self) -> Option<tether_proto::mqtt::Figures> {
        self.shared.mqtt.as_ref().map(|m| m.figures())
    }

    /// The device id in use.
    pub fn device_id(&self) -> String {
        self.shared.device_id()
    }

    /// The durable audit queue, to record events of the embedder's own.
    pub fn audit(&self) -> Arc<AuditQueue> {
        self.shared.audit.clone()
    }

    /// Whether instance protection mode is on (always off without editor
    /// access).
    pub fn protection(&self) -> bool {
        self.shared
            .editor
            .as_ref()
            .is_some_and(|e| e.protection().enabled())
    }

    /// Stops the agent: closes the tunnel gracefully (bounded), writes the
    /// final status, and waits for its tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let mut tasks = self.tasks.into_iter();
        if let Some(reconnect) = tasks.next() {
            let _ = reconnect.await;
        }
        // The status writer ends after writing the final state; bound the
        // wait in case the reconnect task died without reporting it.
        for mut task in tasks {
            if tokio::time::timeout(std::time::Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        if let Some(node_red) = self.node_red {
            node_red.shutdown().await;
        }
        // What is waiting is written before the agent ends.
        let audit = self.shared.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.close()).await;
    }
}

/// What Node-RED runs at the agent's start: the current snapshot, its
/// folder readable by Node-RED's user; the flows in its user directory when
/// there is none (or it no longer passes its checks, which the log says).
fn run_from_current(
    folder: Option<&Folder>,
    run_as: Option<&crate::node_red::user::RunAs>,
) -> crate::node_red::RunFrom {
    let Some(folder) = folder else {
        return crate::node_red::RunFrom::default();
    };
    let current = folder.current();
    if let (Some(run_as), Some(version)) = (run_as, current) {
        let prepared = crate::snapshot::share(folder, &folder.version_dir(version), run_as)
            .and_then(|()| folder.prepare_work(version))
            .and_then(|work| crate::snapshot::share_work(&work, run_as));
        if let Err(e) = prepared {
            warn!(cause = %e, "cannot give Node-RED's user the current snapshot");
        }
    }
    crate::snapshot::apply::run_from(folder, current).unwrap_or_else(|why| {
        warn!(version = ?current, "the current snapshot does not pass its checks ({why}): Node-RED runs the flows in its user directory");
        crate::node_red::RunFrom::default()
    })
}

/// File, in the state directory, naming the device the audit store
/// belongs to.
const AUDIT_DEVICE_FILE: &str = "audit.device";

/// A trail belongs to one device: after `tetherd enroll --force` made a new
/// identity, the old device's store (its events could only be shipped as
/// the old device, which no longer connects) is moved aside as
/// `audit.redb.DEVICE` with its lease, and the new device starts its own
/// chain from `enrolled`.
fn set_aside_other_devices_trail(dir: &std::path::Path, device_id: &str) {
    let path = dir.join(AUDIT_DEVICE_FILE);
    let owner = crate::files::read_bounded(&path, 256)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    match owner {
        Some(owner) if owner == device_id => return,
        Some(owner) if tether_proto::api::is_device_id(&owner) => {
            for file in [
                crate::audit::store::STORE_FILE,
                crate::audit::store::LEASE_FILE,
            ] {
                let from = dir.join(file);
                let to = dir.join(format!("{file}.{owner}"));
                if from.exists()
                    && let Err(e) = std::fs::rename(&from, &to)
                {
                    warn!(cause = %e, file = %from.display(), "cannot set the previous device's audit trail aside");
                    return;
                }
            }
            warn!(previous = %owner, "this device enrolled again with a new identity: the previous identity's audit trail was set aside (audit.redb.{owner}); events it had not shipped stay there");
        }
        _ => {}
    }
    if let Err(e) =
        crate::files::write_atomic(&path, device_id.as_bytes(), crate::files::Mode::Secret)
    {
        warn!(cause = %e, "cannot note which device the audit trail belongs to");
    }
}

/// File, in the state directory, of the SHA-256 of the config file the
/// last `config_changed` (or first start) recorded.
const CONFIG_SEEN_FILE: &str = "audit.config";

/// Opens the audit queue; records `enrolled` as the first event of a new
/// chain and `config_changed` when the config file differs from the last
/// start's.
fn open_audit(config: &Config, identity: &Identity) -> Result<Arc<AuditQueue>, AgentError> {
    set_aside_other_devices_trail(&config.state_dir, &identity.device_id);
    let audit = Arc::new(
        AuditQueue::open(&config.state_dir, config.audit.max_size, config.clock)
            .map_err(AgentError::Audit)?,
    );
    use crate::audit::Audit;
    if audit.stats().last_seq == 0 {
        audit.record(AuditEvent::Enrolled {
            device: identity.device_id.clone(),
            platform: identity.platform.clone(),
        });
    }
    if let Some(sha) = &config.source_sha256 {
        let path = config.state_dir.join(CONFIG_SEEN_FILE);
        let seen = crate::files::read_bounded(&path, 128).ok();
        if seen.as_deref() != Some(sha.as_bytes()) {
            audit.record(AuditEvent::ConfigChanged {
                sha256: sha.clone(),
            });
            if let Err(e) =
                crate::files::write_atomic(&path, sha.as_bytes(), crate::files::Mode::Secret)
            {
                warn!(cause = %e, "cannot note the config's hash; config_changed will be recorded again at the next start");
            }
        }
    }
    Ok(audit)
}

/// The editor proxy's view of the locked-down Node-RED: its address, and
/// tokens from its [`crate::node_red::LocalAuth`]. Says so in the log if
/// Node-RED does not come up locked down within a minute.
fn editor_target(node_red: &NodeRed, command: &str) -> EditorTarget {
    let auth = node_red.auth();
    let addr = node_red.addr();
    tokio::spawn(async move {
        if let Err(e) = crate::node_red::wait_ready(addr, NODE_RED_READY).await {
            warn!(cause = %e, "the local Node-RED is not answering; the editor is unavailable until it does");
        }
    });
    let assets = crate::editor::assets::public_dir_of(command);
    if assets.is_none() {
        info!(%command, "the editor's static files were not found from the Node-RED command; the platform will not cache them");
    }
    EditorTarget {
        addr,
        admin_root: crate::node_red::ADMIN_ROOT.into(),
        auth: Some(Arc::new(move |user: &str, permissions: &[&str]| {
            auth.token(user, &Permissions::from_list(permissions))
        })),
        assets,
        ..EditorTarget::default()
    }
}

/// How long Node-RED may take to answer after the agent starts.
const NODE_RED_READY: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes `status.json` on every change and every [`status::STATUS_REFRESH`];
/// a final time when the agent stops.
async fn write_status(
    shared: Arc<Shared>,
    mut status: watch::Receiver<Status>,
    mut shutdown: watch::Receiver<bool>,
    started_at: u64,
) {
    // The file is synced to disk; that may take milliseconds on a gateway's
    // flash, so it happens on the blocking pool, never on the thread that
    // drives the tunnel.
    let write = |shared: &Arc<Shared>| {
        let shared = Arc::clone(shared);
        async move {
            let _ =
                tokio::task::spawn_blocking(move || write_status_file(&shared, started_at)).await;
        }
    };
    let mut refresh = tokio::time::interval(status::STATUS_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                let stopped = status.borrow_and_update().state == crate::status::TunnelState::Stopped;
                write(&shared).await;
                if stopped && stopping {
                    break;
                }
            }
            _ = refresh.tick() => write(&shared).await,
            _ = crate::agent::stopped(&mut shutdown), if !stopping => {
                stopping = true;
                if shared.status().state == crate::status::TunnelState::Stopped {
                    write(&shared).await;
                    break;
                }
            }
        }
    }
}

fn write_status_file(shared: &Shared, started_at: u64) {
    let file = StatusFile {
        pid: std::process::id(),
        updated_at: shared.config.clock.now_unix(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        status: shared.status(),
        audit: Some(shared.audit.stats()),
        mqtt: shared.mqtt.as_ref().map(|m| m.figures()),
        snapshot_root: (shared.config.node_red.mode != crate::config::NodeRedMode::Off).then(
            || {
                shared
                    .config
                    .node_red
                    .user_dir_in(&shared.config.state_dir)
                    .join(crate::node_red::SNAPSHOTS_DIR)
                    .display()
                    .to_string()
            },
        ),
    };
    let mut file = file;
    file.status.snapshot = shared.snapshot_health();
    if let Err(e) = status::write_file(&shared.state, &file) {
        warn!(cause = %e, "cannot write the status file");
    }
}

/// Applies `change` and wakes the watchers only if the status differs.
fn change_status(status: &watch::Sender<Status>, change: impl FnOnce(&mut Status)) {
    status.send_if_modified(|s| {
        let before = s.clone();
        change(s);
        *s != before
    });
}

/// Resolves once `shutdown` turns true (or its sender is gone). Holds no
/// borrow of the channel across an await, so the future is `Send`.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TunnelConfig};

    #[test]
    fn the_device_limits_and_the_tunnel_overrides_reach_tether_proto() {
        let default = proto_config(&TunnelConfig::default());
        assert_eq!(default.max_stream_window, 512 * 1024);
        assert_eq!(default.max_send_buffer, 2 * 1024 * 1024);
        assert_eq!(default.validate(), Ok(()));
        // Both ends of `max_stream_window_kib`'s range are valid settings.
        for kib in [256, 8192] {
            let config =
                Config::from_toml_str(&format!("[tunnel]\nmax_stream_window_kib = {kib}\nkeepalive_interval = \"5s\"\nidle_timeout = \"20s\""))
                    .unwrap();
            let proto = proto_config(&config.tunnel);
            assert_eq!(proto.max_stream_window, kib * 1024);
            assert_eq!(proto.keepalive_interval, std::time::Duration::from_secs(5));
            assert_eq!(proto.idle_timeout, std::time::Duration::from_secs(20));
            assert_eq!(proto.validate(), Ok(()), "{kib} KiB");
        }
    }

    #[test]
    fn watchers_hear_of_a_status_change_only_when_something_changed() {
        let (tx, mut rx) = watch::channel(Status::new("dev_1".into(), 100, "ab".into(), 1));
        rx.borrow_and_update();
        change_status(&tx, |s| s.rtt = None);
        assert!(
            !rx.has_changed().unwrap(),
            "the same value again is no change"
        );
        change_status(&tx, |s| s.rtt = Some(std::time::Duration::from_micros(250)));
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update().rtt,
            Some(std::time::Duration::from_micros(250))
        );
    }
}
