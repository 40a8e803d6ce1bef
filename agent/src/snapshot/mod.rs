//! Snapshots on the device (`docs/snapshots.md`): pulled from the platform,
//! verified with `tether_proto::snapshot`, staged into a folder of their own
//! and switched in atomically, the previous one kept to switch back to.
//!
//! [`Folder`] owns the snapshot folder and its journal: what is staged,
//! which version is current, and where an apply stood when the agent
//! stopped. It writes a component only after checking it against the
//! manifest, never changes a version's folder once it exists, and never
//! points `current` at anything but a whole, synced version.
//! [`pull`] fetches a version on a `snapshot` stream (walking the
//! platform's key rotations into [`trust`], the root the device trusts),
//! [`content`] checks
//! what Node-RED will read, and [`apply`] is the task that ties them to the
//! launcher and the health probe: it alone switches, commits and rolls back.
//! Nothing here decides what a role may do in the editor.

pub mod apply;
pub mod capture;
pub mod content;
mod folder;
pub mod modules;
pub mod pull;
pub mod trust;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub use folder::{
    ApplyNow, CREDENTIALS, Folder, FolderError, Journal, MAX_ATTEMPTS, Phase, Recovered,
    SNAPSHOT_MANIFEST, request_apply_now,
};

use crate::files::FileError;
use crate::node_red::user::RunAs;

fn fs_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FolderError + 'a {
    move |source| {
        FolderError::File(FileError {
            action,
            path: path.to_owned(),
            source,
        })
    }
}

/// Lets Node-RED's user read `dir` and what is in it, and nothing more:
/// group `run_as.gid`, directories `0750`, files `0640`; the owner stays
/// the agent.
pub fn share(folder: &Folder, dir: &Path, run_as: &RunAs) -> Result<(), FolderError> {
    for parent in [folder.root().to_owned(), folder.root().join("versions")] {
        set(&parent, None, run_as.gid, 0o750)?;
    }
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(fs_err("inspect", &path))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            set(&path, None, run_as.gid, 0o750)?;
            for entry in std::fs::read_dir(&path).map_err(fs_err("list", &path))? {
                pending.push(entry.map_err(fs_err("list", &path))?.path());
            }
        } else {
            set(&path, None, run_as.gid, 0o640)?;
        }
    }
    Ok(())
}

/// Lets Node-RED's user change a working copy (`Folder::prepare_work`): it
/// writes its deploys there. The agent keeps owning it and shares it
/// through Node-RED's group: the directory `0770`, its files `0660`. What
/// Node-RED wrote there is its own (readable and removable by its group:
/// it runs with umask `0007`) and stays as it is, unless the agent may
/// change others' files (root).
pub fn share_work(dir: &Path, run_as: &RunAs) -> Result<(), FolderError> {
    let me = crate::node_red::user::Privileges::current();
    if let Some(parent) = dir.parent() {
        set(parent, None, run_as.gid, 0o750)?;
    }
    let mut entries = vec![(dir.to_owned(), 0o770)];
    for entry in std::fs::read_dir(dir).map_err(fs_err("list", dir))? {
        entries.push((entry.map_err(fs_err("list", dir))?.path(), 0o660));
    }
    for (path, mode) in entries {
        let meta = std::fs::symlink_metadata(&path).map_err(fs_err("inspect", &path))?;
        if meta.file_type().is_symlink() || !me.may_change(&meta) {
            continue;
        }
        set(&path, None, run_as.gid, mode)?;
    }
    Ok(())
}

fn set(path: &Path, uid: Option<u32>, gid: u32, mode: u32) -> Result<(), FolderError> {
    std::os::unix::fs::lchown(path, uid, Some(gid)).map_err(fs_err("change the owner of", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(fs_err("change the mode of", path))
}
