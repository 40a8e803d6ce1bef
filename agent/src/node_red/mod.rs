//! The local Node-RED, locked down so that only the agent can use its editor
//! and admin API (`docs/protocol.md` §16.4).
//!
//! At start ([`NodeRed::start`]) the agent, in Node-RED's user directory:
//!
//! - makes a fresh Ed25519 key pair in memory and writes only its public
//!   key to `tether-editor-keys.json` ([`token`]); the pair is replaced
//!   every 24 h, the previous public key staying accepted a few minutes;
//! - writes `tether-settings.js` ([`settings`]): Node-RED on 127.0.0.1
//!   only, `adminAuth` with just a `tokens` function that accepts tokens
//!   signed by that key, sent in the `x-tether-token` header;
//! - removes `.sessions.json`, Node-RED's stored logins from any earlier
//!   configuration, which would otherwise still open the editor;
//! - in launch mode, starts Node-RED with those settings ([`launcher`]).
//!
//! The editor proxy then asks [`LocalAuth::token`] for a token per request,
//! naming the real user and the permissions of their role
//! ([`Permissions::for_role`]), and sends it to [`NodeRed::addr`] in
//! [`TOKEN_HEADER`]. Without such a token Node-RED answers 401 to everything
//! but its static editor files; flows' own HTTP endpoints stay open.
//!
//! This module never writes a private key to disk, never logs a token, and
//! never makes Node-RED listen on anything but 127.0.0.1. It does not proxy
//! (that is `editor`) and does not decide what a role may do beyond the
//! permissions it presents.

pub mod launcher;
pub mod probe;
pub mod settings;
pub mod token;
pub mod user;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{error, info};

pub use launcher::{LaunchSpec, Launcher, RunFrom, RunState, wait_ready};
pub use settings::{ADMIN_ROOT, SETTINGS_FILE, TOKEN_HEADER};
pub use token::{Claims, KEYS_FILE, LocalAuth, Permissions, for_role};

use crate::config::{NodeRedConfig, NodeRedMode};
use crate::files::{self, FileError, Mode};

/// Node-RED's stored login sessions, in its user directory.
const SESSIONS_FILE: &str = ".sessions.json";

/// What went wrong with the local Node-RED.
#[derive(Debug, thiserror::Error)]
pub enum NodeRedError {
    #[error(
        "cannot prepare Node-RED's user directory: {0}; help: check that the agent may create and write it ([node_red] user_dir)"
    )]
    Write(#[source] FileError),
    #[error(
        "cannot make a key pair for the local editor tokens: the system's random source failed"
    )]
    KeyGeneration,
    #[error(
        "cannot start Node-RED '{command}': {source}; help: install Node-RED 4 (tests/nodered/install.sh) or set [node_red] command to its absolute path; Node-RED starts through setpriv (util-linux)"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Node-RED did not answer on {addr} within {waited}{last}; help: see its log lines above"
    )]
    NotReady {
        addr: SocketAddr,
        waited: String,
        last: String,
    },
    #[error(
        "tetherd runs as root, and Node-RED must not: flows would run with the agent's rights; help: create a system user (useradd --system --no-create-home --shell /usr/sbin/nologin tether-nodered) and set [node_red] user = \"tether-nodered\""
    )]
    NoUser,
    #[error(
        "[node_red] user '{0}' does not exist; help: create it (useradd --system --no-create-home --shell /usr/sbin/nologin {0}) or name an existing unprivileged user"
    )]
    NoSuchUser(String),
    #[error("[node_red] user '{0}' is root; help: name an unprivileged user")]
    RootUser(String),
    #[error(
        "[node_red] user '{user}' is not the agent's own user (uid {euid}), and the agent cannot start Node-RED as another user without {missing}; help: run tetherd as the packaged service (User=tether with AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL), start it with those capabilities (setpriv --inh-caps=+setuid,+setgid,+kill --ambient-caps=+setuid,+setgid,+kill), run it as root, or remove [node_red] user"
    )]
    CannotSwitch {
        user: String,
        euid: u32,
        missing: String,
    },
    #[error(
        "the agent shares Node-RED's files through the group of [node_red] user '{user}', '{group}' (gid {gid}), and is not a member of it; help: add SupplementaryGroups={group} to the unit (the packaged one has SupplementaryGroups=tether-nodered), or usermod --append --groups {group} AGENT_USER, or run tetherd as root"
    )]
    NotInGroup {
        user: String,
        group: String,
        gid: u32,
    },
    #[error(
        "cannot prepare Node-RED's user directory '{}' for its user: {source}; help: it must belong to the agent's user, in Node-RED's group (chown AGENT_USER:NODE_RED_GROUP '{}'; the package does), on a file system with Unix owners", .dir.display(), .dir.display()
    )]
    Ownership {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{addr} answers GET /settings with {status} without a token: it is not a Node-RED locked down by the agent; help: stop it, or start it with --settings USER_DIR/{SETTINGS_FILE}"
    )]
    NotLockedDown { addr: SocketAddr, status: u16 },
}

/// The local Node-RED: its lock-down files, its token signer and, in launch
/// mode, its process. Dropping it kills a launched Node-RED; call
/// [`NodeRed::shutdown`] to stop it gracefully.
#[derive(Debug)]
pub struct NodeRed {
    auth: Arc<LocalAuth>,
    addr: SocketAddr,
    user_dir: PathBuf,
    launcher: Option<Arc<Launcher>>,
    run_as: Option<user::RunAs>,
    rotation: JoinHandle<()>,
}

/// The folder of snapshots in Node-RED's user directory
/// (`crate::snapshot::Folder`): the agent's, readable by Node-RED.
pub const SNAPSHOTS_DIR: &str = "snapshots";

impl NodeRed {
    /// Writes the keys and settings and, in launch mode, starts Node-RED;
    /// `None` when `[node_red]` is off. Does a little blocking file I/O;
    /// needs a tokio runtime. Returns at once: see [`NodeRed::ready`].
    pub fn start(
        config: &NodeRedConfig,
        state_dir: &Path,
    ) -> Result<Option<NodeRed>, NodeRedError> {
        NodeRed::start_from(config, state_dir, |_, _| RunFrom::default())
    }

    /// Like [`NodeRed::start`], running what `from(user_dir, run_as)` says
    /// (the current snapshot, once the caller has prepared its folder).
    pub fn start_from(
        config: &NodeRedConfig,
        state_dir: &Path,
        from: impl FnOnce(&Path, Option<&user::RunAs>) -> RunFrom,
    ) -> Result<Option<NodeRed>, NodeRedError> {
        if config.mode == NodeRedMode::Off {
            return Ok(None);
        }
        let user_dir = config.user_dir_in(state_dir);
        let me = user::Privileges::current();
        let run_as = match config.mode {
            NodeRedMode::Launch => user::plan(config.user.as_deref(), &me)?,
            _ => None,
        };
        if let Some(run_as) = &run_as {
            user::prepare_dir(
                &user_dir,
                run_as,
                &[SETTINGS_FILE, KEYS_FILE, SNAPSHOTS_DIR],
                &me,
            )
            .map_err(|source| NodeRedError::Ownership {
                dir: user_dir.clone(),
                source,
            })?;
            info!(user = %run_as.name, uid = run_as.uid, user_dir = %user_dir.display(), "Node-RED runs as its own user");
        }
        let auth = Arc::new(prepare(&user_dir, config.port)?);
        let launcher = if config.mode == NodeRedMode::Launch {
            let spec = LaunchSpec {
                command: config.command.clone(),
                user_dir: user_dir.clone(),
                settings: user_dir.join(SETTINGS_FILE),
                addr: config.addr(),
                run_as: run_as.clone(),
                hang_timeout: config.hang_timeout,
            };
            launcher::check_programs(&spec)?;
            let from = from(&user_dir, run_as.as_ref());
            Some(Arc::new(Launcher::start_from(spec, from)))
        } else {
            None
        };
        if launcher.is_none() {
            info!(
                settings = %user_dir.join(SETTINGS_FILE).display(),
                "node-red settings written; start Node-RED with --settings pointing at them"
            );
        }
        Ok(Some(NodeRed {
            rotation: tokio::spawn(rotate_keys(auth.clone())),
            auth,
            addr: config.addr(),
            user_dir,
            launcher,
            run_as,
        }))
    }

    /// The launcher, in launch mode: to restart Node-RED on another
    /// snapshot, or stop and start it on request.
    pub fn launcher(&self) -> Option<Arc<Launcher>> {
        self.launcher.clone()
    }

    /// The user Node-RED runs as, when not the agent's own.
    pub fn run_as(&self) -> Option<&user::RunAs> {
        self.run_as.as_ref()
    }

    /// Signs the tokens Node-RED accepts.
    pub fn auth(&self) -> Arc<LocalAuth> {
        self.auth.clone()
    }

    /// Where Node-RED listens: `127.0.0.1:port`; the editor and admin API
    /// are at [`ADMIN_ROOT`].
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id of a launched Node-RED while it runs; `None` in
    /// external mode.
    pub fn pid(&self) -> Option<u32> {
        self.launcher.as_deref().and_then(Launcher::pid)
    }

    /// Node-RED's user directory.
    pub fn user_dir(&self) -> &Path {
        &self.user_dir
    }

    /// Waits until Node-RED answers and refuses requests without a token,
    /// at most `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Result<(), NodeRedError> {
        match self.launcher.as_deref() {
            Some(launcher) => launcher.ready(timeout).await,
            None => wait_ready(self.addr, timeout).await,
        }
    }

    /// Stops key rotation and a launched Node-RED (SIGTERM, then SIGKILL
    /// after [`launcher::STOP_GRACE`]).
    pub async fn shutdown(mut self) {
        self.rotation.abort();
        if let Some(launcher) = self.launcher.take() {
            launcher.stop().await;
        }
    }
}

/// What the agent's tasks need of the local Node-RED: where it listens,
/// tokens for its admin API, its launcher (in launch mode) and its user.
#[derive(Clone, Debug)]
pub struct NodeRedHandle {
    pub addr: SocketAddr,
    pub auth: Arc<LocalAuth>,
    pub launcher: Option<Arc<Launcher>>,
    pub run_as: Option<user::RunAs>,
    pub user_dir: PathBuf,
}

impl NodeRed {
    /// A handle for the agent's tasks.
    pub fn handle(&self) -> NodeRedHandle {
        NodeRedHandle {
            addr: self.addr,
            auth: self.auth.clone(),
            launcher: self.launcher.clone(),
            run_as: self.run_as.clone(),
            user_dir: self.user_dir.clone(),
        }
    }
}

impl Drop for NodeRed {
    fn drop(&mut self) {
        self.rotation.abort();
    }
}

/// Creates the user directory if needed and writes the lock-down files.
fn prepare(user_dir: &Path, port: u16) -> Result<LocalAuth, NodeRedError> {
    files::ensure_dir(user_dir).map_err(NodeRedError::Write)?;
    files::remove_if_exists(&user_dir.join(SESSIONS_FILE)).map_err(NodeRedError::Write)?;
    let auth = LocalAuth::new(user_dir)?;
    let js = settings::render(port);
    files::write_atomic(&user_dir.join(SETTINGS_FILE), js.as_bytes(), Mode::Public)
        .map_err(NodeRedError::Write)?;
    Ok(auth)
}

/// Every [`token::ROTATE_EVERY`]: a new key pair; [`token::OVERLAP`] later,
/// the previous public key is dropped from the keys file.
async fn rotate_keys(auth: Arc<LocalAuth>) {
    loop {
        tokio::time::sleep(token::ROTATE_EVERY).await;
        blocking(&auth, LocalAuth::rotate, "rotating the editor token key").await;
        tokio::time::sleep(token::OVERLAP).await;
        blocking(
            &auth,
            LocalAuth::retire_previous,
            "retiring the previous editor token key",
        )
        .await;
    }
}

async fn blocking(
    auth: &Arc<LocalAuth>,
    step: fn(&LocalAuth) -> Result<(), NodeRedError>,
    what: &str,
) {
    let auth = auth.clone();
    match tokio::task::spawn_blocking(move || step(&auth)).await {
        Ok(Ok(())) => info!("node-red: {what}: done"),
        Ok(Err(e)) => error!("node-red: {what}: failed, the current keys stay in use: {e}"),
        Err(e) => error!("node-red: {what}: failed, the current keys stay in use: {e}"),
    }
}
