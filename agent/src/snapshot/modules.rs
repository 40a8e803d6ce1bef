//! Installs the Node-RED modules a staged snapshot pins (`modules.json`,
//! `tether_proto::snapshot::modules`) into that snapshot's own `lib/`
//! folder with npm, while the running Node-RED keeps running on the
//! current version. Node-RED finds them through its generated settings
//! (`nodesDir`), so each version runs the modules it was signed with and a
//! rollback returns to the old ones with nothing to reinstall.
//!
//! A snapshot that carries tarballs (`modules/*.tgz`) is installed from
//! them alone, with npm offline: a device with no route to any registry
//! installs it. Without tarballs npm fetches the exact versions from the
//! configured registry. npm runs as Node-RED's user when it has one (a
//! module's install scripts never run with the agent's rights), with its
//! own cache and configuration, a time limit, and its output kept out of
//! the log but for the tail of a failure. After npm, every pinned module
//! must be installed at its pinned version, and everything is synced to
//! disk before the version's folder is sealed.
//!
//! This module never touches a sealed version's folder and never decides
//! whether a snapshot runs: a failure is a reason, returned to `apply`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tether_proto::snapshot::modules::{self, MODULES, Module, TARBALLS};

use crate::node_red::user::RunAs;

/// Where a version's modules are installed, inside its folder (where the
/// generated settings tell Node-RED to look).
pub const LIB: &str = crate::node_red::settings::MODULES_DIR;
/// How much of npm's output a failure quotes.
const TAIL: u64 = 1500;
/// Environment variables passed through to npm (a proxy to the registry).
const PASS_ENV: &[&str] = &[
    "PATH",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// How npm is run.
#[derive(Clone, Debug)]
pub struct Installer {
    /// The npm program (a name in `PATH` or an absolute path).
    pub npm: String,
    /// The registry for modules not carried as tarballs.
    pub registry: Option<String>,
    /// npm must be done within this.
    pub timeout: Duration,
    /// npm's cache and home (outside every version's folder).
    pub cache: PathBuf,
    /// Node-RED's user, if it has one: npm runs as it.
    pub run_as: Option<RunAs>,
}

/// What an install did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub modules: usize,
    pub from_tarballs: bool,
}

impl Installer {
    /// Installs the modules `dir/modules.json` pins into `dir/lib`. Nothing
    /// to do without a `modules.json` (or an empty one). The error says,
    /// for a person, what failed.
    pub fn install(&self, dir: &Path) -> Result<Option<Installed>, String> {
        let list = match std::fs::read(dir.join(MODULES)) {
            Ok(bytes) => modules::parse(&bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read modules.json: {e}")),
        };
        let tarballs = tarballs(&dir.join(TARBALLS))?;
        if list.is_empty() {
            return Ok(None);
        }
        let npm = crate::node_red::launcher::find_program(&self.npm).ok_or_else(|| {
            format!(
                "the snapshot pins {} module(s) but npm ('{}') is not installed on this device; help: install npm, or set [snapshot] npm",
                list.len(),
                self.npm
            )
        })?;
        let lib = dir.join(LIB);
        crate::files::ensure_dir(&lib).map_err(|e| e.to_string())?;
        crate::files::ensure_dir(&self.cache).map_err(|e| e.to_string())?;
        std::fs::write(
            lib.join("package.json"),
            br#"{"name": "tether-snapshot-modules", "version": "0.0.0", "private": true}"#,
        )
        .map_err(|e| format!("cannot write {}: {e}", lib.join("package.json").display()))?;
        if let Some(run_as) = &self.run_as {
            // npm, as Node-RED's user, reads the tarballs and writes `lib/`
            // and its cache; it is given back to the agent afterwards.
            let mut readable = vec![(dir.to_owned(), 0o750)];
            if let Some(root) = dir.parent() {
                readable.push((root.to_owned(), 0o750));
            }
            if !tarballs.is_empty() {
                readable.push((dir.join(TARBALLS), 0o750));
            }
            readable.extend(tarballs.iter().map(|t| (t.clone(), 0o640)));
            for (path, mode) in readable {
                share_with(&path, run_as.gid, mode)?;
            }
            chown_tree(&lib, run_as.uid, run_as.gid)?;
            chown_tree(&self.cache, run_as.uid, run_as.gid)?;
        }
        let specs: Vec<String> = if tarballs.is_empty() {
            list.iter().map(Module::spec).collect()
        } else {
            tarballs.iter().map(|p| p.display().to_string()).collect()
        };
        let started = Instant::now();
        self.run_npm(&npm, &lib, &specs, !tarballs.is_empty())?;
        tracing::info!(
            modules = list.len(),
            from_tarballs = !tarballs.is_empty(),
            took_ms = started.elapsed().as_millis() as u64,
            "npm installed the snapshot's modules"
        );
        if self.run_as.is_some() {
            let (uid, gid) = (rustix::process::geteuid(), rustix::process::getegid());
            chown_tree(&lib, uid.as_raw(), gid.as_raw())?;
        }
        for module in &list {
            check_installed(&lib, module)?;
        }
        sync_tree(&lib)?;
        Ok(Some(Installed {
            modules: list.len(),
            from_tarballs: !tarballs.is_empty(),
        }))
    }

    fn run_npm(
        &self,
        npm: &Path,
        lib: &Path,
        specs: &[String],
        offline: bool,
    ) -> Result<(), String> {
        let log_path = self.cache.join("install.log");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        // npm never outlives the agent: the parent-death signal follows
        // this blocking thread, which waits for npm until it ends.
        let mut command = crate::node_red::user::command_as(self.run_as.as_ref(), npm.as_os_str());
        command
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
                "--omit=dev",
                "--loglevel=warn",
            ])
            .arg("--cache")
            .arg(self.cache.join("cache"))
            .arg("--userconfig")
            .arg(self.cache.join("npmrc"));
        if offline {
            command.arg("--offline");
        } else if let Some(registry) = &self.registry {
            command.arg("--registry").arg(registry);
        }
        command
            .args(specs)
            .env_clear()
            .envs(
                PASS_ENV
                    .iter()
                    .filter_map(|k| Some((k, std::env::var_os(k)?))),
            )
            .env("HOME", &self.cache)
            .env("LANG", "C")
            .envs(
                self.run_as
                    .iter()
                    .flat_map(|r| [("USER", &r.name), ("LOGNAME", &r.name)]),
            )
            .current_dir(lib)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log.try_clone().map_err(|e| e.to_string())?);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start npm ({}): {e}", npm.display()))?;
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    kill_group(child.id());
                    let _ = child.wait();
                    return Err(format!(
                        "npm did not install the modules within {} ([snapshot] install_timeout): {}",
                        crate::duration::Human(self.timeout),
                        tail(&mut log)
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(format!("cannot wait for npm: {e}")),
            }
        };
        if status.success() {
            return Ok(());
        }
        let how = if offline {
            "from the snapshot's tarballs (offline; every dependency must be a tarball too)"
        } else {
            "from the registry"
        };
        Err(format!(
            "npm could not install the modules {how} ({status}): {}",
            tail(&mut log)
        ))
    }
}

/// The tarballs in `dir`, sorted (none if it does not exist).
fn tarballs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot list {}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "tgz") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The module is in `lib/node_modules` at its pinned version.
fn check_installed(lib: &Path, module: &Module) -> Result<(), String> {
    let path = lib
        .join("node_modules")
        .join(&module.name)
        .join("package.json");
    let found = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned));
    match found {
        Some(version) if version == module.version => Ok(()),
        Some(version) => Err(format!(
            "npm installed {} {version}, not the pinned {}; help: a tarball of another version? pack the pinned one",
            module.name, module.version
        )),
        None => Err(format!(
            "npm did not install {} (no {}); help: is its tarball in the snapshot?",
            module.spec(),
            path.display()
        )),
    }
}

/// The last [`TAIL`] bytes of npm's output, on one line.
fn tail(log: &mut std::fs::File) -> String {
    let len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = log.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut bytes = Vec::new();
    let _ = log.take(TAIL).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    // npm's error lines, without the stack trace and the error object.
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_start_matches("npm error").trim())
        .filter(|l| {
            let noise = l.is_empty()
                || l.starts_with("at ")
                || l.ends_with('{')
                || l.starts_with('}')
                || (l.ends_with(',') && l.contains(": "));
            !noise
        })
        .collect();
    if lines.is_empty() {
        "npm said nothing".into()
    } else {
        lines.join(" | ")
    }
}

fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Lets group `gid` read `path` (`mode`); the owner stays.
fn share_with(path: &Path, gid: u32, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::lchown(path, None, Some(gid))
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| format!("cannot let Node-RED's group read {}: {e}", path.display()))
}

/// Gives `root` and everything under it (links themselves, not followed)
/// to `uid:gid`.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<(), String> {
    walk(root, &mut |path| {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| format!("cannot give {} to {uid}:{gid}: {e}", path.display()))
    })
}

/// Syncs what npm wrote to disk: the whole file system `root` is on, in
/// one call (npm writes thousands of small files; one `fsync` each would
/// take longer than the install).
fn sync_tree(root: &Path) -> Result<(), String> {
    std::fs::File::open(root)
        .map_err(|e| format!("cannot open {}: {e}", root.display()))
        .and_then(|dir| {
            rustix::fs::syncfs(&dir).map_err(|e| format!("cannot sync {}: {e}", root.display()))
        })
}

/// Calls `f` on everything under `root`, children before their folder.
fn walk(root: &Path, f: &mut dyn FnMut(&Path) -> Result<(), String>) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(root)
        .map_err(|e| format!("cannot inspect {}: {e}", root.display()))?;
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(root).map_err(|e| format!("cannot list {}: {e}", root.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", root.display()))?;
            walk(&entry.path(), f)?;
        }
    }
    f(root)
}
