//! The snapshot task: one per agent, the only owner of the snapshot
//! folder. The control stream hands it notices; it pulls the version named
//! ([`super::pull`]), verifies and stages it while the running Node-RED
//! carries on, switches `current`, restarts Node-RED on it and waits for it
//! to prove healthy (answering, with the snapshot's flows started, and
//! still the same process a moment later; then the tunnel up). A healthy
//! version is committed; anything else is rolled back: `current` returns
//! to the previous version and Node-RED is restarted on it. Every outcome
//! is recorded as an audit event and shown in the status.
//!
//! This module never runs a snapshot that failed a check and never changes
//! a version's folder; it does not decide what a role may do in the editor.

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use tether_proto::control::SnapshotHealth;
use tether_proto::snapshot::modules;
use tether_proto::tokio_io::Tunnel;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::content::{self, Content};
use super::modules::Installer;
use super::pull::{self, Checks};
use super::trust::TrustStore;
use super::{Folder, Phase, Recovered};
use crate::agent::Shared;
use crate::audit::{Audit, AuditEvent, SnapshotOutcome};
use crate::duration::Human;
use crate::node_red::{NodeRedHandle, RunFrom, probe};
use crate::status::TunnelState;
use crate::window::Window;

/// Notices waiting for the task, at most.
pub const MAX_NOTICES: usize = 16;
/// A healthy Node-RED must stay the same process this long before the
/// snapshot counts as started.
const SETTLE: Duration = Duration::from_secs(2);
/// Between two health probes.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// While a version waits for its window: how often the window and a local
/// `apply-now` request are checked.
const WAIT_TICK: Duration = Duration::from_secs(1);

/// What the task is told.
#[derive(Debug)]
pub enum Notice {
    /// The platform has `version` for this device, to pull on `tunnel`.
    Available { version: u64, tunnel: Tunnel },
    /// Start, stop or restart Node-RED, on a person's request.
    NodeRed { action: String, by: String },
    /// The platform's maintenance window for this device (`None`: none).
    Window { window: Option<String>, by: String },
}

/// The task's state.
#[derive(Debug)]
pub struct Applier {
    shared: Arc<Shared>,
    folder: Option<Folder>,
    node_red: Option<NodeRedHandle>,
    /// The snapshot root trusted now, kept in the state directory.
    trust: TrustStore,
    /// The time zone maintenance windows are read in.
    tz: TimeZone,
}

/// What Node-RED runs for `version` of `folder` (the flows in its user
/// directory for `None`).
pub fn run_from(folder: &Folder, version: Option<u64>) -> Result<RunFrom, String> {
    let Some(version) = version else {
        return Ok(RunFrom::default());
    };
    let dir = folder.version_dir(version);
    let Content { env, .. } = content::check(&dir)?;
    Ok(RunFrom {
        snapshot: Some(dir),
        flows: Some(folder.work_dir(version).join(tether_proto::snapshot::FLOWS)),
        env,
    })
}

impl Applier {
    pub(crate) fn new(
        shared: Arc<Shared>,
        folder: Folder,
        node_red: Option<NodeRedHandle>,
        snapshot_key: &str,
    ) -> Applier {
        let tz = match crate::window::time_zone(shared.config.snapshot.timezone.as_deref()) {
            Ok(tz) => tz,
            Err(e) => {
                warn!(cause = %e, "maintenance windows are read in UTC");
                TimeZone::UTC
            }
        };
        // A kept trust that cannot be read is logged here and refuses
        // every snapshot with what to do; the running flows stay.
        let trust = TrustStore::load(shared.state.root(), snapshot_key);
        Applier {
            shared,
            folder: Some(folder),
            node_red,
            trust,
            tz,
        }
    }

    /// Runs until the channel closes. `recovered` is what opening the
    /// folder found: an apply to probe again, or one rolled back.
    pub(crate) async fn run(mut self, recovered: Recovered, mut notices: mpsc::Receiver<Notice>) {
        self.publish().await;
        match recovered {
            Recovered::Clean => {}
            Recovered::Resume { to, attempts } => {
                info!(
                    version = to,
                    attempts, "an apply was under way when the agent stopped: probing it again"
                );
                self.prove(to).await;
            }
            Recovered::RolledBack { from, .. } => {
                let reason = self
                    .journal_outcome()
                    .unwrap_or_else(|| "an apply did not finish".into());
                warn!(version = from, "{reason}");
                self.record(from, SnapshotOutcome::RolledBack, Some(reason));
            }
        }
        loop {
            // A staged version waits for its window or a local request:
            // both are checked every tick, with the time read each time.
            if let Some(version) = self.waiting() {
                self.due(version).await;
            }
            let notice = if self.waiting().is_some() {
                match tokio::time::timeout(WAIT_TICK, notices.recv()).await {
                    Ok(notice) => notice,
                    Err(_) => continue,
                }
            } else {
                notices.recv().await
            };
            let Some(notice) = notice else { break };
            match notice {
                Notice::Available { version, tunnel } => self.available(version, &tunnel).await,
                Notice::NodeRed { action, by } => self.node_red_action(&action, &by).await,
                Notice::Window { window, by } => self.platform_window(window, &by).await,
            }
        }
    }

    /// The version staged and waiting, if any.
    fn waiting(&self) -> Option<u64> {
        match self.folder().journal().phase {
            Phase::Staged { version } => Some(version),
            _ => None,
        }
    }

    /// The window that applies, and where it comes from: the device's own
    /// config wins over the platform's.
    fn window(&self) -> Option<(Window, &'static str)> {
        if let Some(window) = &self.shared.config.snapshot.window {
            return Some((window.clone(), "the device's config"));
        }
        let set = self.folder().platform_window()?;
        Window::parse(&set).ok().map(|w| (w, "set by the platform"))
    }

    /// The wall clock, read now, for the window.
    fn now(&self) -> jiff::Timestamp {
        let secs = i64::try_from(self.shared.config.clock.now_unix()).unwrap_or(i64::MAX);
        jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    /// Why a staged version may not be switched in now, if it may not.
    fn must_wait(&self) -> Option<String> {
        let (window, source) = self.window()?;
        let now = self.now();
        if crate::window::is_open(&window, now, &self.tz) {
            return None;
        }
        let zone = self.tz.iana_name().unwrap_or("the system's time zone");
        info!(
            window = %window,
            opens_in = %Human(crate::window::until_open(&window, now, &self.tz)),
            "outside the maintenance window: the snapshot waits"
        );
        Some(format!(
            "waits for the maintenance window {window} ({zone}, {source}) or for `tetherd snapshot apply-now` on the device"
        ))
    }

    /// Switches in the waiting `version` if someone on site asked for it or
    /// its window is open.
    async fn due(&mut self, version: u64) {
        match self.folder().take_apply_now() {
            Ok(Some(request)) if request.version == version => {
                info!(version, by = %request.by, "switching in the staged snapshot on a local request");
                self.shared.audit.record(AuditEvent::SnapshotApplyNow {
                    version,
                    by: request.by,
                });
                return self.apply_staged(version).await;
            }
            Ok(Some(request)) => warn!(
                asked = request.version,
                staged = version,
                "an apply-now request for another version than the staged one: ignored"
            ),
            Ok(None) => {}
            Err(e) => warn!(cause = %e, "an apply-now request could not be read: ignored"),
        }
        if self
            .window()
            .is_none_or(|(w, _)| crate::window::is_open(&w, self.now(), &self.tz))
        {
            info!(
                version,
                "the maintenance window is open: switching in the staged snapshot"
            );
            self.apply_staged(version).await;
        }
    }

    /// Applies a staged version: its content checked again (it was staged
    /// before a restart, maybe), then switched to and proved.
    async fn apply_staged(&mut self, version: u64) {
        let Some(launcher) = self.node_red.as_ref().and_then(|n| n.launcher.clone()) else {
            let reason =
                "snapshots need the agent to launch Node-RED ([node_red] mode = \"launch\")";
            let _ = self.with_folder(move |f| f.discard(version)).await;
            return self.reject(version, reason.into()).await;
        };
        match content::check(&self.folder().version_dir(version)) {
            Ok(content) => self.apply(version, content, &launcher).await,
            Err(why) => {
                if let Err(e) = self.with_folder(move |f| f.discard(version)).await {
                    warn!(cause = %e, "cannot discard the staged snapshot");
                }
                self.reject(version, why).await
            }
        }
    }

    /// Keeps the platform's maintenance window, and records a change.
    async fn platform_window(&mut self, window: Option<String>, by: &str) {
        if let Some(text) = &window
            && let Err(e) = Window::parse(text)
        {
            warn!(window = %text, cause = %e, "the platform sent a maintenance window that is not valid: ignored");
            return;
        }
        if self.folder().platform_window() == window {
            return;
        }
        let keep = window.clone();
        if let Err(e) = self
            .with_folder(move |f| f.set_platform_window(keep.as_deref()))
            .await
        {
            warn!(cause = %e, "cannot keep the platform's maintenance window");
            return;
        }
        if self.shared.config.snapshot.window.is_some() {
            info!(window = ?window, by, "the platform set a maintenance window; the device's config has its own, which wins");
        } else {
            info!(window = ?window, by, "the platform set the maintenance window");
        }
        self.shared.audit.record(AuditEvent::MaintenanceWindow {
            window,
            by: by.to_owned(),
        });
    }

    fn journal_outcome(&self) -> Option<String> {
        self.folder
            .as_ref()
            .and_then(|f| f.journal().last_outcome.clone())
    }

    /// Runs `f` on the folder on the blocking pool (it syncs to disk).
    async fn with_folder<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Folder) -> T + Send + 'static,
    ) -> T {
        let Some(mut folder) = self.folder.take() else {
            unreachable_folder()
        };
        let (folder, out) = tokio::task::spawn_blocking(move || {
            let out = f(&mut folder);
            (folder, out)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        self.folder = Some(folder);
        out
    }

    /// How this device installs a snapshot's modules.
    fn installer(&self) -> Installer {
        let config = &self.shared.config.snapshot;
        Installer {
            npm: config.npm.clone(),
            registry: config.registry.clone(),
            timeout: config.install_timeout,
            cache: self.folder().root().join("npm"),
            run_as: self.node_red.as_ref().and_then(|n| n.run_as.clone()),
        }
    }

    fn folder(&self) -> &Folder {
        match &self.folder {
            Some(folder) => folder,
            None => unreachable_folder(),
        }
    }

    async fn available(&mut self, version: u64, tunnel: &Tunnel) {
        let journal = self.folder().journal().clone();
        if version <= journal.highest
            || matches!(journal.phase, Phase::Staged { version: v } if v >= version)
        {
            return;
        }
        let Some(launcher) = self.node_red.as_ref().and_then(|n| n.launcher.clone()) else {
            let reason =
                "snapshots need the agent to launch Node-RED ([node_red] mode = \"launch\")";
            self.reject(version, reason.into()).await;
            return;
        };
        let checks = Checks {
            device: self.shared.device_id(),
            installed: journal.highest,
            now: self.shared.config.clock.now_unix(),
        };
        info!(version, "pulling snapshot");
        let fetched = pull::fetch_manifest(tunnel, version, &checks, &mut self.trust).await;
        let (envelope, manifest, stream) = match fetched {
            Ok(fetched) => fetched,
            Err(e) if e.is_rejection() => return self.reject(version, e.to_string()).await,
            Err(e) => {
                warn!(version, cause = %e, "cannot pull the snapshot; it is pulled again at the next notice");
                return;
            }
        };
        let runtime = tokio::runtime::Handle::current();
        let run_as = self.node_red.as_ref().and_then(|n| n.run_as.clone());
        let installer = self.installer();
        let staged = self
            .with_folder(move |folder| {
                // Checked in the staging folder, before npm runs and before
                // the version is sealed: a content that fails never becomes
                // a version, and counts as seen.
                let mut checked = None;
                let prepared = pull::stage_from_stream(
                    folder,
                    &envelope,
                    &manifest,
                    stream,
                    runtime,
                    |staging| {
                        let content = modules::check_paths(
                            manifest.components.iter().map(|c| c.path.as_str()),
                        )
                        .and_then(|()| content::check(staging));
                        let ok = content.is_ok();
                        checked = Some(content);
                        if !ok {
                            return Err(String::new());
                        }
                        installer.install(staging).map(|_| ())
                    },
                );
                match (prepared, checked) {
                    (Err(super::FolderError::Prepare(_)), Some(Err(why))) => {
                        folder.discard(manifest.version)?;
                        Ok(Err(why))
                    }
                    (Err(super::FolderError::Prepare(why)), _) => Ok(Err(why)),
                    (Err(e), _) => Err(e),
                    (Ok(dir), Some(Ok(content))) => {
                        if let Some(run_as) = &run_as {
                            super::share(folder, &dir, run_as)?;
                        }
                        Ok(Ok(content))
                    }
                    (Ok(_), _) => Err(super::FolderError::State(
                        "the staged snapshot was not checked".into(),
                    )),
                }
            })
            .await;
        let content = match staged {
            Ok(Ok(content)) => content,
            Ok(Err(why)) => return self.reject(version, why).await,
            Err(e @ super::FolderError::Refused(_)) => {
                return self.reject(version, e.to_string()).await;
            }
            Err(e) => {
                error!(version, cause = %e, "cannot stage the snapshot; the running flows stay");
                return;
            }
        };
        info!(version, "snapshot verified and staged");
        self.record(version, SnapshotOutcome::Received, None);
        if let Some(why) = self.must_wait() {
            let outcome = format!("staged {version}: {why}");
            if let Err(e) = self
                .with_folder(move |folder| folder.note_outcome(outcome))
                .await
            {
                warn!(cause = %e, "cannot note the outcome in the snapshot journal");
            }
            self.publish().await;
            return;
        }
        self.publish().await;
        self.apply(version, content, &launcher).await;
    }

    async fn reject(&mut self, version: u64, reason: String) {
        warn!(
            version,
            "snapshot rejected: {reason}; the running flows stay"
        );
        let outcome = format!("rejected {version}: {reason}");
        if let Err(e) = self
            .with_folder(move |folder| folder.note_outcome(outcome))
            .await
        {
            warn!(cause = %e, "cannot note the outcome in the snapshot journal");
        }
        self.record(version, SnapshotOutcome::Rejected, Some(reason));
        self.publish().await;
    }

    /// Switches to a staged version and proves it.
    async fn apply(
        &mut self,
        version: u64,
        content: Content,
        launcher: &crate::node_red::Launcher,
    ) {
        let run_as = self.node_red.as_ref().and_then(|n| n.run_as.clone());
        let switched = self
            .with_folder(move |folder| {
                let work = folder.prepare_work(version)?;
                if let Some(run_as) = &run_as {
                    super::share_work(&work, run_as)?;
                }
                folder.switch(version)
            })
            .await;
        if let Err(e) = switched {
            error!(version, cause = %e, "cannot switch to the snapshot; the running flows stay");
            return;
        }
        let from = RunFrom {
            snapshot: Some(self.folder().version_dir(version)),
            flows: Some(
                self.folder()
                    .work_dir(version)
                    .join(tether_proto::snapshot::FLOWS),
            ),
            env: content.env,
        };
        info!(
            version,
            "switched to the snapshot: restarting Node-RED on it"
        );
        let old = launcher.pid();
        launcher.restart(from);
        self.publish().await;
        self.judge(version, old, &content.expect).await;
    }

    /// Probes an apply resumed after a restart of the agent.
    async fn prove(&mut self, version: u64) {
        let expect = match content::check(&self.folder().version_dir(version)) {
            Ok(content) => content.expect,
            Err(why) => return self.roll_back(version, why).await,
        };
        self.judge(version, None, &expect).await;
    }

    /// Commits `version` if it proves healthy, else rolls it back.
    async fn judge(&mut self, version: u64, old_pid: Option<u32>, expect: &probe::Expect) {
        match self.healthy(old_pid, expect).await {
            Ok(()) => {}
            Err(why) => return self.roll_back(version, why).await,
        }
        if let Err(why) = self.tunnel_up().await {
            return self.roll_back(version, why).await;
        }
        match self.with_folder(Folder::commit).await {
            Ok(_) => {
                info!(version, "snapshot applied: Node-RED runs it healthily");
                self.record(version, SnapshotOutcome::Applied, None);
            }
            Err(e) => error!(version, cause = %e, "cannot commit the snapshot"),
        }
        self.publish().await;
    }

    /// Node-RED answers (a new process, not `old_pid`), runs the expected
    /// flows, and is still the same process [`SETTLE`] later, within the
    /// health timeout.
    async fn healthy(&self, old_pid: Option<u32>, expect: &probe::Expect) -> Result<(), String> {
        let Some(node_red) = &self.node_red else {
            return Err("no local Node-RED".into());
        };
        let timeout = self.shared.config.snapshot.health_timeout;
        let deadline = Instant::now() + timeout;
        let mut last = "Node-RED did not start".to_owned();
        let launcher = node_red.launcher.as_deref();
        while Instant::now() < deadline {
            let pid = launcher.and_then(|l| l.pid());
            let fresh = pid.is_some() && (old_pid.is_none() || pid != old_pid);
            if fresh {
                match probe::flows_running(node_red.addr, &node_red.auth, expect).await {
                    Ok(()) => {
                        tokio::time::sleep(SETTLE).await;
                        let same = launcher.and_then(|l| l.pid()) == pid;
                        match probe::flows_running(node_red.addr, &node_red.auth, expect).await {
                            Ok(()) if same => return Ok(()),
                            Ok(()) => last = "Node-RED exited after it started".into(),
                            Err(why) => last = why,
                        }
                    }
                    Err(why) => last = why,
                }
            } else if let Some(l) = launcher
                && l.state() == crate::node_red::RunState::CrashLoop
            {
                return Err("Node-RED keeps exiting (a crash loop)".into());
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        Err(format!("not healthy within {}: {last}", Human(timeout)))
    }

    /// The tunnel is up, or comes up within the tunnel timeout.
    async fn tunnel_up(&self) -> Result<(), String> {
        let timeout = self.shared.config.snapshot.tunnel_timeout;
        let mut status = self.shared.subscribe();
        let up = status.wait_for(|s| s.state == TunnelState::Connected);
        match tokio::time::timeout(timeout, up).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("the agent is stopping".into()),
            Err(_) => Err(format!(
                "the tunnel stayed down for {} after the switch",
                Human(timeout)
            )),
        }
    }

    async fn roll_back(&mut self, version: u64, reason: String) {
        warn!(version, "snapshot rolled back: {reason}");
        let why = reason.clone();
        let rolled = self
            .with_folder(move |folder| {
                let to = folder.roll_back(&why)?;
                Ok::<_, super::FolderError>((to, run_from(folder, to)))
            })
            .await;
        match rolled {
            Ok((to, from)) => {
                let from = from.unwrap_or_else(|why| {
                    error!(version = ?to, "the previous snapshot no longer passes its checks ({why}); Node-RED runs the flows in its user directory");
                    RunFrom::default()
                });
                if let Some(launcher) = self.node_red.as_ref().and_then(|n| n.launcher.as_deref()) {
                    launcher.restart(from);
                }
                info!(version = ?to, "Node-RED restarted on the previous snapshot");
            }
            Err(e) => error!(version, cause = %e, "cannot roll the snapshot back"),
        }
        self.record(version, SnapshotOutcome::RolledBack, Some(reason));
        self.publish().await;
    }

    async fn node_red_action(&mut self, action: &str, by: &str) {
        let Some(launcher) = self.node_red.as_ref().and_then(|n| n.launcher.clone()) else {
            warn!(
                action,
                by, "Node-RED is not launched by the agent: the request is ignored"
            );
            return;
        };
        match action {
            "start" => launcher.resume(),
            "stop" => launcher.pause(),
            "restart" => launcher.restart(launcher.run_from()),
            other => {
                warn!(action = other, by, "unknown Node-RED action: ignored");
                return;
            }
        }
        info!(
            action,
            by, "Node-RED {action} requested through the platform"
        );
        self.shared.audit.record(AuditEvent::NodeRedAction {
            action: action.to_owned(),
            by: by.to_owned(),
        });
    }

    fn record(&self, version: u64, outcome: SnapshotOutcome, reason: Option<String>) {
        self.shared.audit.record(AuditEvent::Snapshot {
            version,
            outcome,
            reason,
        });
    }

    /// Puts where the snapshots stand into the status.
    async fn publish(&self) {
        let folder = self.folder();
        let journal = folder.journal();
        let health = SnapshotHealth {
            current: folder.current(),
            staged: match journal.phase {
                Phase::Staged { version } => Some(version),
                _ => None,
            },
            outcome: journal.last_outcome.clone(),
            node_red: None,
        };
        self.shared.update(|s, _| s.snapshot = Some(health));
    }
}

fn unreachable_folder() -> ! {
    // The folder is only taken for the length of one blocking call, which
    // gives it back or panics (and the panic is resumed).
    panic!("the snapshot folder is in use by another step")
}
