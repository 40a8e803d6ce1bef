//! Instance protection mode: while it is on, the flows are read-only in the
//! editor for every role and changes arrive only as signed snapshots
//! (`docs/protocol.md` §16.3).
//!
//! The platform pushes the value over the control stream
//! (`ControlMessage::Protection`); this module keeps it in memory for the
//! proxy and in `STATE_DIR/protection.json` (written atomically) so that it
//! survives restarts. It is off until the platform first says otherwise. A
//! file that exists but cannot be read counts as **on**: a damaged file must
//! not unlock the editor, and the platform sends the real value after the
//! next handshake anyway. This module never decides what protection
//! forbids: `policy` does.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::files::{self, FileError, Mode};
use crate::identity::StateDir;

/// The file in the state directory.
pub const PROTECTION_FILE: &str = "protection.json";
/// Largest file read.
const MAX_FILE: u64 = 4 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    enabled: bool,
}

/// The current protection mode and where it is kept.
#[derive(Debug)]
pub struct Protection {
    enabled: AtomicBool,
    path: PathBuf,
}

impl Protection {
    /// Loads the stored value: off if there is none, on if it is unreadable.
    pub fn load(state: &StateDir) -> Protection {
        let path = state.root().join(PROTECTION_FILE);
        let enabled = match read(&path) {
            Ok(enabled) => enabled.unwrap_or(false),
            Err(reason) => {
                warn!(path = %path.display(), %reason, "cannot read the stored protection mode; it stays on until the platform sends it again");
                true
            }
        };
        Protection {
            enabled: AtomicBool::new(enabled),
            path,
        }
    }

    /// Whether protection mode is on now.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Takes the platform's value: in effect at once, then stored (a
    /// blocking, synced write; run it off the async threads). Returns
    /// whether it changed; an unchanged value is not written again.
    pub fn set(&self, enabled: bool) -> Result<bool, FileError> {
        if self.enabled.swap(enabled, Ordering::SeqCst) == enabled {
            return Ok(false);
        }
        let mut json = serde_json::to_vec(&Record { enabled }).unwrap_or_default();
        json.push(b'\n');
        files::write_atomic(&self.path, &json, Mode::Public)?;
        Ok(true)
    }
}

/// The stored value for `tetherd status`: `None` if there is no file.
pub fn stored(state: &StateDir) -> Result<Option<bool>, String> {
    read(&state.root().join(PROTECTION_FILE))
}

fn read(path: &Path) -> Result<Option<bool>, String> {
    let bytes = match files::read_bounded(path, MAX_FILE) {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok(Some(record.enabled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_then_stored_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let p = Protection::load(&state);
        assert!(!p.enabled());
        assert_eq!(stored(&state), Ok(None));
        assert!(!p.set(false).unwrap(), "no change, no write");
        assert_eq!(stored(&state), Ok(None));
        assert!(p.set(true).unwrap());
        assert!(p.enabled());
        assert!(Protection::load(&state).enabled(), "survives a restart");
        assert!(p.set(false).unwrap());
        assert!(!Protection::load(&state).enabled());
        assert_eq!(stored(&state), Ok(Some(false)));
    }

    #[test]
    fn a_damaged_file_keeps_the_editor_protected() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        std::fs::write(dir.path().join(PROTECTION_FILE), b"{not json").unwrap();
        let p = Protection::load(&state);
        assert!(p.enabled());
        assert!(p.set(false).unwrap(), "the platform's word replaces it");
        assert!(!Protection::load(&state).enabled());
    }
}
