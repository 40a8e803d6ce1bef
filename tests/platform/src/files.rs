//! Atomic writes of the platform's files: keys, tokens, certificates and
//! `platform.json`.
//!
//! This module owns how a file reaches the disk: a temporary file in the same
//! directory, created with its final mode (0600 for secrets, so a secret is
//! never readable by others, not even for an instant), written, fsynced,
//! renamed over the target, and the directory fsynced so the rename itself
//! survives a power cut. A reader sees the old file or the new one, never a
//! torn one. It never decides what goes in a file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Mode of files holding secrets: the owner reads and writes, nobody else.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of public files (certificates, `platform.json`).
pub const PUBLIC_MODE: u32 = 0o644;

/// A file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} '{path}': {cause}")]
pub struct FileError {
    action: &'static str,
    path: PathBuf,
    cause: io::Error,
}

impl FileError {
    pub fn new(action: &'static str, path: &Path, cause: io::Error) -> FileError {
        FileError {
            action,
            path: path.to_path_buf(),
            cause,
        }
    }

    /// The I/O error itself, without the path.
    pub fn cause(&self) -> &io::Error {
        &self.cause
    }

    /// True if the file does not exist.
    pub fn is_not_found(&self) -> bool {
        self.cause.kind() == io::ErrorKind::NotFound
    }
}

/// Replaces `path` with `contents`, atomically, with permission bits `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    let result = write_new(&tmp, contents, mode)
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| sync_dir(dir));
    if result.is_err() {
        // Best effort: a stray temporary file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| FileError::new("write", path, e))
}

/// Reads a whole file.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|e| FileError::new("read", path, e))
}

/// Reads a whole file as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|e| FileError::new("read", path, e))
}

/// Creates `dir` (and its parents) if it does not exist, mode 0700: it holds
/// the CA key.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| FileError::new("create directory", dir, e))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Writes a fresh file whose mode is set at creation (`O_CREAT` with `mode`),
/// not changed afterwards. `create_new` refuses to follow a planted symlink.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_secret_is_written_whole_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic(&path, b"first", SECRET_MODE).unwrap();
        write_atomic(&path, b"second", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file stays behind");
    }
}
