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
//! the log but for the tail of a failure. It then installs into a scratch
//! folder beside its cache, which the agent copies into `lib/` as its own
//! files: Node-RED's user cannot change a sealed version's modules, and no
//! file of its stays in a version's folder. After npm, every pinned module
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
/// Where npm, as Node-RED's user, installs, inside the cache folder.
const SCRATCH: &str = "lib";
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
        // Where npm writes: `lib/` itself, or, as Node-RED's user, a
        // scratch folder copied into `lib/` afterwards.
        let target = match &self.run_as {
            Some(run_as) => {
                let scratch = self.cache.join(SCRATCH);
                remove_tree(&scratch, run_as)?;
                scratch
            }
            None => lib.clone(),
        };
        crate::files::ensure_dir(&target).map_err(|e| e.to_string())?;
        crate::files::ensure_dir(&self.cache).map_err(|e| e.to_string())?;
        let package = target.join("package.json");
        std::fs::write(
            &package,
            br#"{"name": "tether-snapshot-modules", "version": "0.0.0", "private": true}"#,
        )
        .map_err(|e| format!("cannot write {}: {e}", package.display()))?;
        if let Some(run_as) = &self.run_as {
            // npm, as Node-RED's user, reads the tarballs and writes its
            // scratch folder and cache, all shared through its group.
            let mut shared = vec![(dir.to_owned(), 0o750)];
            if let Some(root) = dir.parent() {
                shared.push((root.to_owned(), 0o750));
            }
            if !tarballs.is_empty() {
                shared.push((dir.join(TARBALLS), 0o750));
            }
            shared.extend(tarballs.iter().map(|t| (t.clone(), 0o640)));
            shared.extend([
                (self.cache.clone(), 0o770),
                (target.clone(), 0o770),
                (package.clone(), 0o660),
            ]);
            for (path, mode) in shared {
                share_with(&path, run_as.gid, mode)?;
            }
        }
        let specs: Vec<String> = if tarballs.is_empty() {
            list.iter().map(Module::spec).collect()
        } else {
            tarballs.iter().map(|p| p.display().to_string()).collect()
        };
        let started = Instant::now();
        self.run_npm(&npm, &target, &specs, !tarballs.is_empty())?;
        tracing::info!(
            modules = list.len(),
            from_tarballs = !tarballs.is_empty(),
            took_ms = started.elapsed().as_millis() as u64,
            "npm installed the snapshot's modules"
        );
        if let Some(run_as) = &self.run_as {
            copy_tree(&target, &lib)?;
            if let Err(e) = remove_tree(&target, run_as) {
                tracing::warn!("{e}; it is removed before the next install");
            }
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

/// Copies the tree at `from` into `to` as the agent's own files:
/// directories (merged with those there: a snapshot may carry files under
/// `lib/`), regular files with their modes and links as links (each
/// replacing a file there); nothing else.
fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let failed =
        |e: std::io::Error| format!("cannot copy {} to {}: {e}", from.display(), to.display());
    let kind = std::fs::symlink_metadata(from).map_err(failed)?.file_type();
    if kind.is_dir() {
        match std::fs::DirBuilder::new().mode(0o750).create(to) {
            Err(e) if !(e.kind() == std::io::ErrorKind::AlreadyExists && to.is_dir()) => {
                return Err(failed(e));
            }
            _ => {}
        }
        for entry in std::fs::read_dir(from).map_err(failed)? {
            let entry = entry.map_err(failed)?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    if !kind.is_symlink() && !kind.is_file() {
        return Ok(());
    }
    match std::fs::remove_file(to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
        _ => {}
    }
    if kind.is_symlink() {
        let link = std::fs::read_link(from).map_err(failed)?;
        std::os::unix::fs::symlink(link, to).map_err(failed)
    } else {
        std::fs::copy(from, to).map(|_| ()).map_err(failed)
    }
}

/// Removes the tree at `path`, which npm wrote as `run_as`; what the agent
/// cannot remove (a folder an install script made without group write)
/// Node-RED's user removes.
fn remove_tree(path: &Path, run_as: &RunAs) -> Result<(), String> {
    let first = match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => e,
    };
    let removed = crate::node_red::user::command_as(Some(run_as), "rm".as_ref())
        .args(["-rf", "--"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match removed {
        Ok(status) if status.success() && std::fs::symlink_metadata(path).is_err() => Ok(()),
        _ => Err(format!(
            "cannot remove npm's scratch folder {}: {first}",
            path.display()
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn npm_s_tree_is_copied_with_folders_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("scratch");
        std::fs::create_dir_all(from.join("node_modules/m/bin")).unwrap();
        std::fs::write(from.join("package.json"), "{}").unwrap();
        let bin = from.join("node_modules/m/bin/m.js");
        std::fs::write(&bin, "#!/usr/bin/env node\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::create_dir(from.join("node_modules/.bin")).unwrap();
        std::os::unix::fs::symlink("../m/bin/m.js", from.join("node_modules/.bin/m")).unwrap();
        let to = dir.path().join("lib");
        copy_tree(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("package.json")).unwrap(), b"{}");
        let copied = to.join("node_modules/m/bin/m.js");
        assert_eq!(
            std::fs::metadata(&copied).unwrap().permissions().mode() & 0o777,
            0o750
        );
        let link = to.join("node_modules/.bin/m");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../m/bin/m.js")
        );
        assert_eq!(std::fs::read(&link).unwrap(), b"#!/usr/bin/env node\n");
        // Into a lib/ the snapshot carries files in: merged, npm's files
        // replacing the snapshot's of the same name.
        let carried = dir.path().join("carried");
        std::fs::create_dir_all(carried.join("node_modules/m")).unwrap();
        std::fs::write(carried.join("own.js"), "mine").unwrap();
        std::fs::write(carried.join("package.json"), "old").unwrap();
        copy_tree(&from, &carried).unwrap();
        assert_eq!(std::fs::read(carried.join("own.js")).unwrap(), b"mine");
        assert_eq!(std::fs::read(carried.join("package.json")).unwrap(), b"{}");
        assert!(carried.join("node_modules/m/bin/m.js").is_file());
        // A file where npm made a folder is an error.
        std::fs::remove_dir_all(&carried).unwrap();
        std::fs::create_dir(&carried).unwrap();
        std::fs::write(carried.join("node_modules"), "").unwrap();
        assert!(copy_tree(&from, &carried).is_err());
    }
}
