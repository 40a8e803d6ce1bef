//! The snapshot folder:
//!
//! ```text
//! ROOT/journal.json      where an apply stands (written atomically)
//! ROOT/versions/N/       a whole snapshot: its components and manifest.json
//! ROOT/versions/N/lib/   its modules (installed before it was sealed)
//! ROOT/current -> versions/N    what Node-RED runs
//! ROOT/previous -> versions/M   what a rollback returns to
//! ROOT/staging-N/        a snapshot being written (removed on recovery)
//! ```
//!
//! A version's folder appears only by renaming a staging folder whose files
//! and directories were all synced, and `current` changes only by renaming
//! a new link over it, then syncing `ROOT`: a kill at any point leaves
//! `current` at the old version or the new one, whole. The journal makes a
//! crash loop end: every start during an unfinished apply counts an
//! attempt, and after [`MAX_ATTEMPTS`] the folder switches back.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_proto::snapshot::{Component, ComponentCheck, Manifest, Refusal};

use crate::files::{self, FileError, Mode};

/// The envelope, as received, inside each version's folder.
pub const SNAPSHOT_MANIFEST: &str = "manifest.json";
/// Starts during one unfinished apply before it is rolled back.
pub const MAX_ATTEMPTS: u32 = 3;
const JOURNAL: &str = "journal.json";
const VERSIONS: &str = "versions";
/// Node-RED's working copies of each version's flows (`work/N`).
const WORK: &str = "work";
const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
/// The credentials component: Node-RED's name for it, next to the flows.
pub const CREDENTIALS: &str = "flows_cred.json";
/// Bytes read from a component at a time.
const CHUNK: usize = 64 * 1024;
/// A request from someone on site to switch in the staged version now.
const APPLY_NOW: &str = "apply-now.json";
/// The maintenance window the platform set.
const WINDOW: &str = "window.json";
/// Largest request or window file, bytes.
const MAX_SMALL_FILE: u64 = 4096;

/// `tetherd snapshot apply-now`'s request: switch in `version` (the one
/// staged when it was asked), for the local account `by`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyNow {
    pub version: u64,
    pub by: String,
}

/// Leaves an [`ApplyNow`] request for the agent in the snapshot folder at
/// `root` (written atomically, 0600: only the agent's own user can), given
/// to `owner` (uid, gid: the agent's user) when root writes it.
pub fn request_apply_now(
    root: &Path,
    request: &ApplyNow,
    owner: Option<(u32, u32)>,
) -> Result<(), FolderError> {
    let json = serde_json::to_vec(request).map_err(|e| FolderError::State(e.to_string()))?;
    let path = root.join(APPLY_NOW);
    match owner {
        Some(owner) => files::write_atomic_owned(&path, &json, Mode::Secret, owner)?,
        None => files::write_atomic(&path, &json, Mode::Secret)?,
    }
    Ok(())
}

/// Where an apply stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Nothing under way.
    Idle,
    /// A version is staged, not switched to yet.
    Staged { version: u64 },
    /// `current` is being moved from `from` to `to`.
    Switching {
        from: Option<u64>,
        to: u64,
        attempts: u32,
    },
    /// `current` is `to`; it has not proved healthy yet.
    Probing {
        from: Option<u64>,
        to: u64,
        attempts: u32,
    },
    /// `current` is being moved back from `from` to `to`.
    RollingBack {
        from: u64,
        to: Option<u64>,
        reason: String,
    },
}

/// The journal: the phase, what is committed, and the highest version ever
/// switched to (a device never takes a version at or below it again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub phase: Phase,
    pub committed: Option<u64>,
    pub highest: u64,
    /// The last outcome, for status: `applied 7`, `rolled back 8: ...`.
    pub last_outcome: Option<String>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            phase: Phase::Idle,
            committed: None,
            highest: 0,
            last_outcome: None,
        }
    }
}

/// What [`Folder::open`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// Nothing was under way (or only a staged version, kept).
    Clean,
    /// An apply was under way: `current` is `to`, to be probed again.
    Resume { to: u64, attempts: u32 },
    /// An apply crashed too often, or a rollback was under way: `current`
    /// is back at `to`.
    RolledBack { from: u64, to: Option<u64> },
}

/// Why a folder operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the snapshot was refused: {0}")]
    Refused(#[from] Refusal),
    #[error("cannot read component {path:?} of the snapshot: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the snapshot journal '{}' is unreadable ({why}); help: move it aside to start over from what 'current' points at", .path.display())]
    Journal { path: PathBuf, why: String },
    #[error("{0}")]
    State(String),
    /// What preparing a staged version (installing its modules) found.
    #[error("{0}")]
    Prepare(String),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |e| FileError {
        action,
        path: path.to_owned(),
        source: e,
    }
}

/// The snapshot folder (see the module docs).
#[derive(Debug)]
pub struct Folder {
    root: PathBuf,
    journal: Journal,
}

impl Folder {
    /// Opens (or makes) the folder and finishes what a crash left: removes
    /// staging folders and half-made links, counts an attempt of an
    /// unfinished apply and rolls it back after [`MAX_ATTEMPTS`], completes
    /// an unfinished rollback.
    pub fn open(root: &Path) -> Result<(Folder, Recovered), FolderError> {
        files::ensure_dir(&root.join(VERSIONS))?;
        let path = root.join(JOURNAL);
        let journal = match files::read_bounded(&path, 64 * 1024) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| FolderError::Journal {
                path: path.clone(),
                why: e.to_string(),
            })?,
            Err(e) if e.is_not_found() => Journal::default(),
            Err(e) => return Err(e.into()),
        };
        let mut folder = Folder {
            root: root.to_owned(),
            journal,
        };
        for entry in std::fs::read_dir(root).map_err(io("list", root))? {
            let entry = entry.map_err(io("list", root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("staging-") {
                std::fs::remove_dir_all(entry.path()).map_err(io("remove", &entry.path()))?;
            } else if name.ends_with(".tmp") {
                std::fs::remove_file(entry.path()).map_err(io("remove", &entry.path()))?;
            }
        }
        let recovered = match folder.journal.phase.clone() {
            Phase::Idle | Phase::Staged { .. } => Recovered::Clean,
            Phase::Switching { from, to, attempts } | Phase::Probing { from, to, attempts } => {
                let attempts = attempts + 1;
                if attempts > MAX_ATTEMPTS {
                    let reason = format!("the agent stopped {MAX_ATTEMPTS} times during the apply");
                    folder.roll_back_from(to, from, &reason)?;
                    Recovered::RolledBack { from: to, to: from }
                } else {
                    // Finish the switch if it was cut short; either way
                    // `current` is `to` now, to be probed again.
                    folder.point(CURRENT, to)?;
                    folder.journal.phase = Phase::Probing { from, to, attempts };
                    folder.save()?;
                    Recovered::Resume { to, attempts }
                }
            }
            Phase::RollingBack { from, to, reason } => {
                folder.roll_back_from(from, to, &reason)?;
                Recovered::RolledBack { from, to }
            }
        };
        Ok((folder, recovered))
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The folder Node-RED runs from (a link to the current version).
    pub fn current_dir(&self) -> PathBuf {
        self.root.join(CURRENT)
    }

    /// The version `current` points at.
    pub fn current(&self) -> Option<u64> {
        self.target(CURRENT)
    }

    fn target(&self, link: &str) -> Option<u64> {
        let to = std::fs::read_link(self.root.join(link)).ok()?;
        to.file_name()?.to_str()?.parse().ok()
    }

    /// The folder of version `version` (which may not exist).
    pub fn version_dir(&self, version: u64) -> PathBuf {
        self.root.join(VERSIONS).join(version.to_string())
    }

    /// Node-RED's working copy of version `version`'s flows: `flows.json`
    /// and `flows_cred.json` there are what it loads and what a deploy
    /// changes, while the version's own folder stays as signed.
    pub fn work_dir(&self, version: u64) -> PathBuf {
        self.root.join(WORK).join(version.to_string())
    }

    /// The folder everything lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes `work/N` from version `N`'s flows and credentials unless it
    /// exists (it then holds deploys made since): copied into `work/N.tmp`,
    /// synced, renamed. Returns it.
    pub fn prepare_work(&self, version: u64) -> Result<PathBuf, FolderError> {
        let work = self.work_dir(version);
        if work.is_dir() {
            return Ok(work);
        }
        let parent = self.root.join(WORK);
        files::ensure_dir(&parent)?;
        let tmp = parent.join(format!("{version}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
        }
        files::ensure_dir(&tmp)?;
        for name in [tether_proto::snapshot::FLOWS, CREDENTIALS] {
            let from = self.version_dir(version).join(name);
            if from.exists() {
                let to = tmp.join(name);
                std::fs::copy(&from, &to).map_err(io("copy", &from))?;
                std::fs::File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(io("sync", &to))?;
            }
        }
        files::sync_dir(&tmp)?;
        std::fs::rename(&tmp, &work).map_err(io("rename", &tmp))?;
        files::sync_dir(&parent)?;
        Ok(work)
    }

    /// Removes a staged version that will not be switched to (it failed a
    /// check made after staging).
    pub fn discard(&mut self, version: u64) -> Result<(), FolderError> {
        if self.current() == Some(version) || self.target(PREVIOUS) == Some(version) {
            return Err(FolderError::State(format!(
                "version {version} is in use and cannot be discarded"
            )));
        }
        let dir = self.version_dir(version);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        if self.journal.phase == (Phase::Staged { version }) {
            self.journal.phase = Phase::Idle;
        }
        self.journal.highest = self.journal.highest.max(version);
        self.save()
    }

    /// Takes (reads and removes) a waiting [`ApplyNow`] request; a
    /// malformed one is removed and named in the error.
    pub fn take_apply_now(&self) -> Result<Option<ApplyNow>, FolderError> {
        let path = self.root.join(APPLY_NOW);
        let bytes = match files::read_bounded(&path, MAX_SMALL_FILE) {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
        };
        std::fs::remove_file(&path).map_err(io("remove", &path))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| FolderError::State(format!("{} is malformed: {e}", path.display())))
    }

    /// The maintenance window the platform set, if any (as it sent it).
    pub fn platform_window(&self) -> Option<String> {
        let bytes = files::read_bounded(&self.root.join(WINDOW), MAX_SMALL_FILE).ok()?;
        serde_json::from_slice::<Option<String>>(&bytes).ok()?
    }

    /// Keeps the maintenance window the platform set (`None`: it cleared
    /// it) across restarts.
    pub fn set_platform_window(&self, window: Option<&str>) -> Result<(), FolderError> {
        let json = serde_json::to_vec(&window).map_err(|e| FolderError::State(e.to_string()))?;
        files::write_atomic(&self.root.join(WINDOW), &json, Mode::Public)?;
        Ok(())
    }

    /// Notes an outcome for status without changing anything else.
    pub fn note_outcome(&mut self, outcome: String) -> Result<(), FolderError> {
        self.journal.last_outcome = Some(outcome);
        self.save()
    }

    fn save(&self) -> Result<(), FolderError> {
        let json = serde_json::to_vec_pretty(&self.journal)
            .map_err(|e| FolderError::State(e.to_string()))?;
        files::write_atomic(&self.root.join(JOURNAL), &json, Mode::Public)?;
        Ok(())
    }

    /// Writes a verified snapshot into `versions/N`: each component read
    /// through `open`, checked against the manifest as it is written (a
    /// byte too many stops it), synced; then `manifest.json` (the envelope
    /// as received); then the folder appears whole by one rename.
    pub fn stage<R: Read>(
        &mut self,
        envelope: &[u8],
        manifest: &Manifest,
        open: impl FnMut(&Component) -> std::io::Result<R>,
    ) -> Result<PathBuf, FolderError> {
        self.stage_with(envelope, manifest, open, |_| Ok(()))
    }

    /// [`Folder::stage`], with `prepare` run on the staging folder once
    /// every component is written and `open` is dropped, before the folder
    /// is sealed: what it adds (a version's modules) is part of the version
    /// from the start. Its error removes the staging folder and is returned
    /// as [`FolderError::Prepare`]; the version may be offered again.
    pub fn stage_with<R: Read>(
        &mut self,
        envelope: &[u8],
        manifest: &Manifest,
        mut open: impl FnMut(&Component) -> std::io::Result<R>,
        prepare: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, FolderError> {
        if manifest.version <= self.journal.highest {
            return Err(Refusal::NotNewer {
                installed: self.journal.highest,
                offered: manifest.version,
            }
            .into());
        }
        let staging = self.root.join(format!("staging-{}", manifest.version));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io("remove", &staging))?;
        }
        files::ensure_dir(&staging)?;
        let mut dirs = BTreeSet::from([staging.clone()]);
        let mut buf = vec![0u8; CHUNK];
        for component in &manifest.components {
            if !tether_proto::snapshot::is_plain_path(&component.path) {
                return Err(Refusal::BadPath(component.path.clone()).into());
            }
            let path = staging.join(&component.path);
            let mut dir = path.parent().unwrap_or(&staging).to_owned();
            files::ensure_dir(&dir)?;
            while dir.starts_with(&staging) && dirs.insert(dir.clone()) {
                dir = dir.parent().unwrap_or(&staging).to_owned();
            }
            let read_err = |source| FolderError::Read {
                path: component.path.clone(),
                source,
            };
            let mut reader = open(component).map_err(read_err)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&path)
                .map_err(io("create", &path))?;
            let mut check = ComponentCheck::new(component);
            loop {
                let n = reader.read(&mut buf).map_err(read_err)?;
                if n == 0 {
                    break;
                }
                check.update(&buf[..n])?;
                file.write_all(&buf[..n]).map_err(io("write", &path))?;
            }
            check.finish()?;
            file.sync_all().map_err(io("sync", &path))?;
        }
        drop(open);
        if let Err(why) = prepare(&staging) {
            std::fs::remove_dir_all(&staging).map_err(io("remove", &staging))?;
            return Err(FolderError::Prepare(why));
        }
        let manifest_path = staging.join(SNAPSHOT_MANIFEST);
        files::write_atomic(&manifest_path, envelope, Mode::Public)?;
        // Deepest first, the staging folder itself last.
        for dir in dirs.iter().rev() {
            files::sync_dir(dir)?;
        }
        let target = self.version_dir(manifest.version);
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io("remove", &target))?;
        }
        std::fs::rename(&staging, &target).map_err(io("rename", &staging))?;
        files::sync_dir(&self.root.join(VERSIONS))?;
        files::sync_dir(&self.root)?;
        self.journal.phase = Phase::Staged {
            version: manifest.version,
        };
        self.save()?;
        Ok(target)
    }

    /// Points `link` at `versions/N` by renaming a new link over it.
    fn point(&self, link: &str, version: u64) -> Result<(), FolderError> {
        let tmp = self.root.join(format!("{link}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let relative = Path::new(VERSIONS).join(version.to_string());
        std::os::unix::fs::symlink(&relative, &tmp).map_err(io("link", &tmp))?;
        let path = self.root.join(link);
        std::fs::rename(&tmp, &path).map_err(io("replace", &path))?;
        files::sync_dir(&self.root)?;
        Ok(())
    }

    /// Switches `current` to the staged version `to`, keeping the old one
    /// as `previous`. The journal says so first: a crash on the way is
    /// finished (and counted) by the next [`Folder::open`].
    pub fn switch(&mut self, to: u64) -> Result<(), FolderError> {
        if !self.version_dir(to).is_dir() {
            return Err(FolderError::State(format!("version {to} is not staged")));
        }
        let from = self.current();
        self.journal.phase = Phase::Switching {
            from,
            to,
            attempts: 0,
        };
        self.journal.highest = self.journal.highest.max(to);
        self.save()?;
        if let Some(from) = from {
            self.point(PREVIOUS, from)?;
        }
        self.point(CURRENT, to)?;
        self.journal.phase = Phase::Probing {
            from,
            to,
            attempts: 0,
        };
        self.save()
    }

    /// The version being probed proved healthy: it is committed, and
    /// versions other than it and the previous one are removed.
    pub fn commit(&mut self) -> Result<u64, FolderError> {
        let Phase::Probing { from, to, .. } = self.journal.phase else {
            return Err(FolderError::State("no apply to commit".into()));
        };
        self.journal.phase = Phase::Idle;
        self.journal.committed = Some(to);
        self.journal.last_outcome = Some(format!("applied {to}"));
        self.save()?;
        self.prune(&[Some(to), from])?;
        Ok(to)
    }

    /// The version being probed failed: `current` goes back to the
    /// previous one (or away, if there was none).
    pub fn roll_back(&mut self, reason: &str) -> Result<Option<u64>, FolderError> {
        let Phase::Probing { from, to, .. } = self.journal.phase.clone() else {
            return Err(FolderError::State("no apply to roll back".into()));
        };
        self.roll_back_from(to, from, reason)?;
        Ok(from)
    }

    fn roll_back_from(
        &mut self,
        from: u64,
        to: Option<u64>,
        reason: &str,
    ) -> Result<(), FolderError> {
        self.journal.phase = Phase::RollingBack {
            from,
            to,
            reason: reason.to_owned(),
        };
        self.save()?;
        match to {
            Some(to) => self.point(CURRENT, to)?,
            None => {
                let current = self.root.join(CURRENT);
                if std::fs::symlink_metadata(&current).is_ok() {
                    std::fs::remove_file(&current).map_err(io("remove", &current))?;
                    files::sync_dir(&self.root)?;
                }
            }
        }
        self.journal.phase = Phase::Idle;
        self.journal.committed = to;
        self.journal.last_outcome = Some(format!("rolled back {from}: {reason}"));
        self.save()?;
        self.prune(&[to])
    }

    /// Removes every version folder (and working copy) but `keep`.
    fn prune(&self, keep: &[Option<u64>]) -> Result<(), FolderError> {
        for dir in [VERSIONS, WORK] {
            self.prune_in(dir, keep)?;
        }
        Ok(())
    }

    fn prune_in(&self, dir: &str, keep: &[Option<u64>]) -> Result<(), FolderError> {
        let versions = self.root.join(dir);
        if !versions.exists() {
            return Ok(());
        }
        for entry in std::fs::read_dir(&versions).map_err(io("list", &versions))? {
            let entry = entry.map_err(io("list", &versions))?;
            let version = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok());
            if version.is_none_or(|v| !keep.contains(&Some(v))) {
                std::fs::remove_dir_all(entry.path()).map_err(io("remove", &entry.path()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
