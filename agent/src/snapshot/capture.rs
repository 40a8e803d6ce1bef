//! Answers the platform's capture of this device's flows
//! (`tether_proto::snapshot::capture`): the flows Node-RED runs now, with
//! their still-encrypted credentials, from the running snapshot's working
//! copy (`work/N`, where deploys go) or, before any snapshot, from
//! Node-RED's user directory. Each capture is an audit event.
//!
//! This module only reads: it never changes the snapshot folder or a file
//! of Node-RED's, and sends nothing but the two flow files (and, for flows
//! never deployed from a snapshot, the secret Node-RED encrypted their
//! credentials with).

use std::path::{Path, PathBuf};

use tether_proto::ResetCode;
use tether_proto::snapshot::capture::{self, Captured, CapturedFile, FILES, MAX_FILE};
use tether_proto::snapshot::pull;
use tether_proto::tokio_io::TunnelStream;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::audit::{Audit, AuditEvent, AuditQueue};

/// Node-RED's own record of the secret it made for credentials.
const RUNTIME_CONFIG: &str = ".config.runtime.json";

/// Where the flows are.
#[derive(Clone, Debug)]
pub struct Source {
    /// The snapshot folder (`current` and `work/N` in it).
    pub snapshots: PathBuf,
    /// Node-RED's user directory, for flows never deployed from a snapshot.
    pub user_dir: PathBuf,
}

impl Source {
    /// The header and each file's bytes, read now. Blocking.
    pub fn collect(&self) -> Result<(Captured, Vec<Vec<u8>>), String> {
        let base = current_version(&self.snapshots);
        let dir = match base {
            Some(version) => self.snapshots.join("work").join(version.to_string()),
            None => self.user_dir.clone(),
        };
        let mut files = Vec::new();
        let mut bodies = Vec::new();
        for name in FILES {
            match read_bounded(&dir.join(name)) {
                Ok(Some(bytes)) => {
                    files.push(CapturedFile {
                        path: name.to_owned(),
                        length: bytes.len() as u64,
                    });
                    bodies.push(bytes);
                }
                Ok(None) if name == FILES[0] => {
                    return Err(format!(
                        "Node-RED has no flows to capture yet (no {})",
                        dir.join(name).display()
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let credential_secret = if base.is_none() && files.len() > 1 {
            own_secret(&self.user_dir)
        } else {
            None
        };
        let captured = Captured {
            base,
            files,
            credential_secret,
        };
        captured.check()?;
        Ok((captured, bodies))
    }
}

/// Sends a capture on `stream`, for `by`; a failure resets the stream with
/// the reason.
pub async fn serve(source: Source, mut stream: TunnelStream, by: String, audit: &AuditQueue) {
    let collected = tokio::task::spawn_blocking(move || source.collect())
        .await
        .unwrap_or_else(|e| Err(format!("the capture failed: {e}")));
    let (captured, bodies) = match collected {
        Ok(collected) => collected,
        Err(why) => {
            warn!(%by, "cannot capture the flows: {why}");
            stream.reset(ResetCode::REFUSED, &why);
            return;
        }
    };
    let sent = async {
        stream.write_all(&pull::encode(&captured)).await?;
        for body in &bodies {
            stream.write_all(body).await?;
        }
        stream.shutdown().await
    }
    .await;
    match sent {
        Ok(()) => {
            info!(%by, base = ?captured.base, "flows captured by the platform");
            audit.record(AuditEvent::FlowsCaptured {
                by,
                base: captured.base,
            });
        }
        Err(e) => warn!(%by, cause = %e, "the flows could not be sent to the platform"),
    }
}

/// The version `current` points at, if any.
fn current_version(snapshots: &Path) -> Option<u64> {
    let target = std::fs::read_link(snapshots.join("current")).ok()?;
    target.file_name()?.to_str()?.parse().ok()
}

/// A file's bytes (at most [`MAX_FILE`]); `None` if it does not exist.
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!(
            "{} is larger than a capture may carry ({MAX_FILE} bytes)",
            path.display()
        ));
    }
    Ok(Some(bytes))
}

/// The secret Node-RED made for its credentials, from its runtime config.
fn own_secret(user_dir: &Path) -> Option<String> {
    let bytes = read_bounded(&user_dir.join(RUNTIME_CONFIG)).ok()??;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    json.get("_credentialSecret")?.as_str().map(str::to_owned)
}

/// True if a stream header asks for a capture.
pub fn is_capture(header: &tether_proto::ServiceHeader) -> bool {
    header.get(capture::ACTION_KEY) == Some(capture::CAPTURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_copy_of_the_current_snapshot_is_captured() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = dir.path().join("snapshots");
        let user_dir = dir.path().join("nr");
        std::fs::create_dir_all(snapshots.join("work/4")).unwrap();
        std::fs::create_dir_all(snapshots.join("versions/4")).unwrap();
        std::fs::create_dir_all(&user_dir).unwrap();
        std::os::unix::fs::symlink("versions/4", snapshots.join("current")).unwrap();
        std::fs::write(snapshots.join("work/4/flows.json"), b"[1]").unwrap();
        std::fs::write(snapshots.join("work/4/flows_cred.json"), b"{}").unwrap();
        std::fs::write(user_dir.join("flows.json"), b"[2]").unwrap();
        let source = Source {
            snapshots: snapshots.clone(),
            user_dir: user_dir.clone(),
        };
        let (captured, bodies) = source.collect().unwrap();
        assert_eq!(captured.base, Some(4));
        assert_eq!(captured.files.len(), 2);
        assert_eq!(bodies[0], b"[1]");
        assert_eq!(captured.credential_secret, None);

        // Before any snapshot: the user directory, with Node-RED's secret.
        std::fs::remove_file(snapshots.join("current")).unwrap();
        std::fs::write(user_dir.join("flows_cred.json"), b"{\"$\":\"x\"}").unwrap();
        std::fs::write(
            user_dir.join(RUNTIME_CONFIG),
            br#"{"_credentialSecret": "abc123"}"#,
        )
        .unwrap();
        let (captured, bodies) = source.collect().unwrap();
        assert_eq!(captured.base, None);
        assert_eq!(bodies[0], b"[2]");
        assert_eq!(captured.credential_secret.as_deref(), Some("abc123"));

        // No flows at all: said so.
        std::fs::remove_file(user_dir.join("flows.json")).unwrap();
        let err = source.collect().unwrap_err();
        assert!(err.contains("no flows to capture"), "{err}");
    }
}
