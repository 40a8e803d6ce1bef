//! Capturing a device's flows, as FlowFuse's "snapshot from device" does:
//! the platform opens a `snapshot` stream to the device (the device never
//! opens one for this), and the device answers with one frame
//! ([`Captured`], framed as the pull stream's frames are:
//! [`super::pull::encode`]) followed by each file's bytes, in order, then
//! FIN. The platform makes a new signed snapshot from them.
//!
//! Only the flows and their credentials travel: `flows.json` and, if the
//! flows have any, `flows_cred.json` (still encrypted). When the flows were
//! never deployed from a snapshot, their credentials are encrypted with
//! the secret Node-RED made for itself; the device then sends that secret
//! too, so that the new snapshot can carry it and the credentials stay
//! readable. Pure types and checks.

use serde::{Deserialize, Serialize};

/// The metadata key of the stream's header that names who asked.
pub const BY_KEY: &str = "by";
/// The metadata key that marks a capture (value [`CAPTURE`]).
pub const ACTION_KEY: &str = "action";
/// The value of [`ACTION_KEY`] for a capture.
pub const CAPTURE: &str = "capture";
/// Largest captured file, bytes.
pub const MAX_FILE: u64 = 64 * 1024 * 1024;
/// Largest header frame, bytes.
pub const MAX_HEADER: usize = 16 * 1024;
/// The files a capture may carry.
pub const FILES: [&str; 2] = ["flows.json", "flows_cred.json"];
/// Longest credential secret, bytes.
const MAX_SECRET: usize = 1024;

/// Device → platform: what follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Captured {
    /// The snapshot the flows were deployed on top of, if any.
    pub base: Option<u64>,
    /// The files that follow, in this order.
    pub files: Vec<CapturedFile>,
    /// The secret the credentials are encrypted with, when it is not the
    /// one the platform gave the device (flows never deployed from a
    /// snapshot).
    #[serde(default)]
    pub credential_secret: Option<String>,
}

/// One file of a capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturedFile {
    pub path: String,
    pub length: u64,
}

impl Captured {
    /// Checks what the device says will follow: known files, each once,
    /// `flows.json` among them, each within [`MAX_FILE`]; a secret of
    /// printable ASCII within bounds.
    pub fn check(&self) -> Result<(), String> {
        for (i, file) in self.files.iter().enumerate() {
            if !FILES.contains(&file.path.as_str()) {
                return Err(format!(
                    "a capture may carry only {}, not {:?}",
                    FILES.join(" and "),
                    file.path
                ));
            }
            if self.files[..i].iter().any(|f| f.path == file.path) {
                return Err(format!("{} is in the capture twice", file.path));
            }
            if file.length > MAX_FILE {
                return Err(format!(
                    "{} is {} bytes, more than a capture may carry ({MAX_FILE})",
                    file.path, file.length
                ));
            }
        }
        if !self.files.iter().any(|f| f.path == FILES[0]) {
            return Err("the capture has no flows.json".into());
        }
        if let Some(secret) = &self.credential_secret
            && (secret.is_empty()
                || secret.len() > MAX_SECRET
                || !secret.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(
                "the capture's credential secret is not printable text of a sane length".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, length: u64) -> CapturedFile {
        CapturedFile {
            path: path.into(),
            length,
        }
    }

    #[test]
    fn a_capture_carries_the_flows_and_their_credentials_only() {
        let ok = Captured {
            base: Some(3),
            files: vec![file("flows.json", 10), file("flows_cred.json", 5)],
            credential_secret: None,
        };
        assert_eq!(ok.check(), Ok(()));
        for (files, secret, says) in [
            (vec![file("flows_cred.json", 5)], None, "no flows.json"),
            (
                vec![file("flows.json", 1), file("../etc/passwd", 1)],
                None,
                "only flows.json and flows_cred.json",
            ),
            (
                vec![file("flows.json", 1), file("flows.json", 1)],
                None,
                "twice",
            ),
            (vec![file("flows.json", MAX_FILE + 1)], None, "more than"),
            (
                vec![file("flows.json", 1)],
                Some("a b".to_string()),
                "secret",
            ),
            (vec![file("flows.json", 1)], Some(String::new()), "secret"),
        ] {
            let err = Captured {
                base: None,
                files,
                credential_secret: secret,
            }
            .check()
            .unwrap_err();
            assert!(err.contains(says), "{err}");
        }
        let json = br#"{"base": null, "files": [], "extra": 1}"#;
        assert!(serde_json::from_slice::<Captured>(json).is_err());
    }
}
