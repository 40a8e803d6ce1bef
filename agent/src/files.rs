//! Durable file writes: every file the agent keeps is replaced atomically, so
//! a power cut leaves either the old content or the new, never a torn file.
//!
//! A write goes to a temporary file in the same directory (created with the
//! final mode, 0600 for secrets, before any byte is written), is synced,
//! renamed over the target, and the directory is synced so the rename itself
//! survives. This module owns that sequence and bounded reads; it never
//! decides what goes into a file or where files live (`identity` does).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Who may read a file the agent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Keys and anything else secret: owner read/write only (0600).
    Secret,
    /// Certificates, the identity record, the status file (0644).
    Public,
}

impl Mode {
    fn bits(self) -> u32 {
        match self {
            Mode::Secret => 0o600,
            Mode::Public => 0o644,
        }
    }
}

/// A file operation that failed, naming the path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} '{path}': {source}")]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FileError {
    fn new(action: &'static str, path: &Path, source: io::Error) -> FileError {
        FileError {
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// True if the file (or a directory on its path) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

/// Tells concurrent writers in one process apart.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `contents` atomically, with the given mode. The
/// parent directory must exist.
pub fn write_atomic(path: &Path, contents: &[u8], mode: Mode) -> Result<(), FileError> {
    write_atomic_as(path, contents, mode, None)
}

/// [`write_atomic`], the file given to `owner` (uid, gid) before it
/// appears under its name: root writing a file the agent's own user must
/// read.
pub fn write_atomic_owned(
    path: &Path,
    contents: &[u8],
    mode: Mode,
    owner: (u32, u32),
) -> Result<(), FileError> {
    write_atomic_as(path, contents, mode, Some(owner))
}

fn write_atomic_as(
    path: &Path,
    contents: &[u8],
    mode: Mode,
    owner: Option<(u32, u32)>,
) -> Result<(), FileError> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_then_rename(&tmp, path, contents, mode, owner);
    if result.is_err() {
        // Best effort: the temporary file is garbage either way.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

fn write_then_rename(
    tmp: &Path,
    path: &Path,
    contents: &[u8],
    mode: Mode,
    owner: Option<(u32, u32)>,
) -> Result<(), FileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.bits())
        .open(tmp)
        .map_err(|e| FileError::new("create", tmp, e))?;
    // The umask may have cleared bits of `mode` (never added any): set it
    // exactly, so a public file is readable whatever the umask.
    file.set_permissions(fs::Permissions::from_mode(mode.bits()))
        .map_err(|e| FileError::new("set the mode of", tmp, e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            .map_err(|e| FileError::new("change the owner of", tmp, e))?;
    }
    file.write_all(contents)
        .map_err(|e| FileError::new("write", tmp, e))?;
    file.sync_all()
        .map_err(|e| FileError::new("sync", tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| FileError::new("replace", path, e))
}

/// Syncs a directory so that renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::new("sync directory", dir, e))
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist.
pub fn ensure_dir(dir: &Path) -> Result<(), FileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| FileError::new("create directory", dir, e))
}

/// Checks that files can be created in `dir` by creating and removing one.
pub fn check_writable(dir: &Path) -> Result<(), FileError> {
    let probe = dir.join(format!(".probe.{}", std::process::id()));
    write_atomic(&probe, b"", Mode::Secret)?;
    fs::remove_file(&probe).map_err(|e| FileError::new("remove", &probe, e))
}

/// Reads at most `max` bytes of `path`; a longer file is an error.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let file = File::open(path).map_err(|e| FileError::new("open", path, e))?;
    let mut out = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| FileError::new("read", path, e))?;
    if out.len() as u64 > max {
        return Err(FileError::new(
            "read",
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file is larger than {max} bytes"),
            ),
        ));
    }
    Ok(out)
}

/// Removes a file; a file that is already gone is not an error.
pub fn remove_if_exists(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FileError::new("remove", path, e)),
        _ => Ok(()),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_secret_is_written_with_mode_0600_and_a_public_file_with_0644() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("device.key");
        let cert = dir.path().join("device.crt");
        write_atomic(&key, b"secret", Mode::Secret).unwrap();
        write_atomic(&cert, b"public", Mode::Public).unwrap();
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(mode_of(&cert), 0o644);
        assert_eq!(fs::read(&key).unwrap(), b"secret");
    }

    #[test]
    fn a_rewrite_replaces_the_content_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        write_atomic(&path, b"one", Mode::Public).unwrap();
        write_atomic(&path, b"two", Mode::Public).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("identity.json")]);
    }

    #[test]
    fn a_rewrite_of_a_secret_that_was_world_readable_makes_it_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new", Mode::Secret).unwrap();
        assert_eq!(mode_of(&path), 0o600);
    }

    #[test]
    fn a_write_into_a_missing_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("x");
        let err = write_atomic(&path, b"x", Mode::Public).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn an_oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, vec![0u8; 11]).unwrap();
        assert!(read_bounded(&path, 10).is_err());
        assert_eq!(read_bounded(&path, 11).unwrap().len(), 11);
    }

    #[test]
    fn ensure_dir_makes_a_private_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        ensure_dir(&state).unwrap();
        assert_eq!(mode_of(&state), 0o700);
        check_writable(&state).unwrap();
        assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
    }
}
