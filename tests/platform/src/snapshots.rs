//! Signed snapshots on the platform (`docs/snapshots.md`): made from files
//! an operator gives (`tether-platform snapshot create`), signed with the
//! snapshot key, kept on disk per device, pushed (the device is told over
//! its control stream and pulls) and rolled back (the version pushed
//! before, signed again as a new, higher version: a device never goes
//! down a version).
//!
//! Layout, under `DATA_DIR/snapshots/DEVICE/`: `N/` per version (its
//! components and `manifest.json`, the signed envelope), `pushed.json`
//! (the versions pushed, oldest first; the last is what the device should
//! run) and `credential-secret` (the device's `credentialSecret`, 0600).
//!
//! This module checks what it is given as a device would (plain paths,
//! limits, a flows file that is a list) and serves a device only its own
//! snapshots, the device id always from the tunnel's certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tether_proto::snapshot::pull::{self, Answer, Request};
use tether_proto::snapshot::{self, Component, Envelope, Manifest};
use tether_proto::tokio_io::TunnelStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::files::{self, FileError, PUBLIC_MODE, SECRET_MODE};
use crate::platform::State;

/// The folder under the data directory.
pub const SNAPSHOTS_DIR: &str = "snapshots";
const PUSHED: &str = "pushed.json";
/// The device's maintenance window and who set it.
const WINDOW: &str = "window.json";
const SECRET: &str = "credential-secret";
const MANIFEST: &str = "manifest.json";
/// A snapshot's files: each path and its bytes.
pub type Files = Vec<(String, Vec<u8>)>;
/// Default validity of a snapshot.
pub const DEFAULT_EXPIRY_SECS: u64 = 30 * 86_400;
/// Largest `create` request body (base64 of every file), bytes.
pub const MAX_CREATE_BODY: usize = 96 * 1024 * 1024;
/// Settings a snapshot may carry (the agent applies only these).
pub const CONTROLLED_SETTINGS: &[&str] = &[
    "credentialSecret",
    "debugMaxLength",
    "nodeMessageBufferMaxLength",
    "functionExternalModules",
    "functionTimeout",
    "exportGlobalContextKeys",
    "externalModules",
    "contextStorage",
];

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    File(#[from] FileError),
    #[error("the snapshot is not valid: {0}")]
    Invalid(String),
    #[error("device {device} has no snapshot version {version}")]
    NoVersion { device: String, version: u64 },
    #[error("device {0} has no earlier pushed snapshot to roll back to")]
    NothingToRollBack(String),
    #[error("the maintenance window is not valid: {0}")]
    BadWindow(String),
}

/// One file of a `create` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    /// The bytes, base64 (standard alphabet).
    pub data: String,
}

/// `POST /v1/admin/devices/{id}/snapshots`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateRequest {
    pub files: Vec<FileEntry>,
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// One snapshot, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub device: String,
    pub version: u64,
    pub created_at: u64,
    pub expires_at: u64,
    pub components: usize,
    pub bytes: u64,
    /// The version last pushed to the device (what it should run).
    pub target: bool,
}

/// The snapshots of every device, on disk.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    /// One change at a time (versions are numbered under it).
    lock: tokio::sync::Mutex<()>,
}

impl Snapshots {
    pub fn new(data_dir: &Path) -> Snapshots {
        Snapshots {
            dir: data_dir.join(SNAPSHOTS_DIR),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    fn device_dir(&self, device: &str) -> PathBuf {
        self.dir.join(device)
    }

    /// The device's maintenance window (`None` inside: cleared) and who set
    /// it, if it was ever set.
    pub fn window(&self, device: &str) -> Option<(Option<String>, String)> {
        files::read(&self.device_dir(device).join(WINDOW))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Sets (or, with `None`, clears) the device's maintenance window.
    pub async fn set_window(
        &self,
        device: &str,
        window: Option<&str>,
        by: &str,
    ) -> Result<Option<String>, SnapshotError> {
        let window = match window {
            Some(text) => Some(
                tether_proto::snapshot::window::Window::parse(text)
                    .map_err(SnapshotError::BadWindow)?
                    .to_string(),
            ),
            None => None,
        };
        let _guard = self.lock.lock().await;
        let dir = self.device_dir(device);
        std::fs::create_dir_all(&dir).map_err(|e| file_error("create", &dir, e))?;
        let json = serde_json::to_vec(&(&window, by)).unwrap_or_default();
        files::write_atomic(&dir.join(WINDOW), &json, PUBLIC_MODE)?;
        info!(device, window = ?window, by, "maintenance window set");
        Ok(window)
    }

    /// The version the device should run, if one was pushed.
    pub fn target(&self, device: &str) -> Option<u64> {
        self.pushed(device).last().copied()
    }

    fn pushed(&self, device: &str) -> Vec<u64> {
        files::read(&self.device_dir(device).join(PUSHED))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn versions(&self, device: &str) -> Vec<u64> {
        let mut versions: Vec<u64> = std::fs::read_dir(self.device_dir(device))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        versions.sort_unstable();
        versions
    }

    /// Makes and signs a new version for `device` from `files`.
    pub async fn create(
        &self,
        keys: &crate::keys::SigningKeys,
        device: &str,
        given: Vec<(String, Vec<u8>)>,
        expires_in_secs: u64,
        now: u64,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let _guard = self.lock.lock().await;
        let dir = self.device_dir(device);
        std::fs::create_dir_all(&dir).map_err(|e| file_error("create", &dir, e))?;
        let secret = self.credential_secret(device)?;
        let components = prepare(given, &secret)?;
        let version = self.versions(device).last().copied().unwrap_or(0) + 1;
        let manifest = Manifest {
            format: 1,
            device: device.to_owned(),
            version,
            created_at: now,
            expires_at: now.saturating_add(expires_in_secs),
            components: components
                .iter()
                .map(|(path, bytes)| Component::describe(path, bytes))
                .collect(),
        };
        let document =
            serde_json::to_vec(&manifest).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        if document.len() > snapshot::MAX_ENVELOPE / 2 {
            return Err(SnapshotError::Invalid(format!(
                "the manifest is {} bytes; list fewer files",
                document.len()
            )));
        }
        let envelope = keys.sign_snapshot(&document);
        let tmp = dir.join(format!(".tmp-{version}"));
        let _ = std::fs::remove_dir_all(&tmp);
        for (path, bytes) in &components {
            let file = tmp.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| file_error("create", parent, e))?;
            }
            files::write_atomic(&file, bytes, SECRET_MODE)?;
        }
        let json = serde_json::to_vec(&envelope).unwrap_or_default();
        files::write_atomic(&tmp.join(MANIFEST), &json, SECRET_MODE)?;
        let target = dir.join(version.to_string());
        std::fs::rename(&tmp, &target).map_err(|e| file_error("rename", &tmp, e))?;
        info!(
            device,
            version,
            components = components.len(),
            "snapshot created and signed"
        );
        Ok(self.info(device, version, &manifest))
    }

    fn info(&self, device: &str, version: u64, manifest: &Manifest) -> SnapshotInfo {
        SnapshotInfo {
            device: device.to_owned(),
            version,
            created_at: manifest.created_at,
            expires_at: manifest.expires_at,
            components: manifest.components.len(),
            bytes: manifest.components.iter().map(|c| c.length).sum(),
            target: self.target(device) == Some(version),
        }
    }

    /// The device's `credentialSecret`, made on first use.
    fn credential_secret(&self, device: &str) -> Result<String, SnapshotError> {
        let path = self.device_dir(device).join(SECRET);
        match files::read_text(&path) {
            Ok(secret) => Ok(secret.trim().to_owned()),
            Err(e) if e.is_not_found() => {
                let mut bytes = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                    .map_err(|_| SnapshotError::Invalid("the random source failed".into()))?;
                let secret = tether_proto::hex::encode(&bytes);
                files::write_atomic(&path, secret.as_bytes(), SECRET_MODE)?;
                Ok(secret)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A version's manifest, read back from its envelope.
    fn manifest(&self, device: &str, version: u64) -> Result<(Envelope, Manifest), SnapshotError> {
        let missing = || SnapshotError::NoVersion {
            device: device.to_owned(),
            version,
        };
        let path = self
            .device_dir(device)
            .join(version.to_string())
            .join(MANIFEST);
        let bytes = files::read(&path).map_err(|_| missing())?;
        let envelope = Envelope::parse(&bytes).map_err(|_| missing())?;
        let document = envelope.document().map_err(|_| missing())?;
        let manifest: Manifest = serde_json::from_slice(&document).map_err(|_| missing())?;
        Ok((envelope, manifest))
    }

    /// Every snapshot of `device` (or of every device), oldest first.
    pub fn list(&self, device: Option<&str>) -> Vec<SnapshotInfo> {
        let devices: Vec<String> = match device {
            Some(d) => vec![d.to_owned()],
            None => {
                let mut all: Vec<String> = std::fs::read_dir(&self.dir)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
                    .filter(|d| tether_proto::api::is_device_id(d))
                    .collect();
                all.sort();
                all
            }
        };
        devices
            .iter()
            .flat_map(|d| {
                self.versions(d)
                    .into_iter()
                    .filter_map(move |v| Some(self.info(d, v, &self.manifest(d, v).ok()?.1)))
            })
            .collect()
    }

    /// Makes `version` the one the device should run.
    pub async fn push(&self, device: &str, version: u64) -> Result<SnapshotInfo, SnapshotError> {
        let _guard = self.lock.lock().await;
        let (_, manifest) = self.manifest(device, version)?;
        let mut pushed = self.pushed(device);
        pushed.retain(|v| *v != version);
        pushed.push(version);
        let json = serde_json::to_vec(&pushed).unwrap_or_default();
        files::write_atomic(&self.device_dir(device).join(PUSHED), &json, PUBLIC_MODE)?;
        info!(device, version, "snapshot pushed");
        Ok(self.info(device, version, &manifest))
    }

    /// The version pushed before the last, signed again as a new version.
    pub async fn rollback_copy(
        &self,
        keys: &crate::keys::SigningKeys,
        device: &str,
        now: u64,
    ) -> Result<(u64, SnapshotInfo), SnapshotError> {
        let pushed = self.pushed(device);
        let Some(&earlier) = pushed.len().checked_sub(2).and_then(|i| pushed.get(i)) else {
            return Err(SnapshotError::NothingToRollBack(device.to_owned()));
        };
        let (given, expiry) = self.files(device, earlier)?;
        let info = self.create(keys, device, given, expiry, now).await?;
        Ok((earlier, info))
    }

    /// A version's files (path and bytes, the manifest's order) and how
    /// long it was valid for.
    pub fn files(&self, device: &str, version: u64) -> Result<(Files, u64), SnapshotError> {
        let (_, manifest) = self.manifest(device, version)?;
        let dir = self.device_dir(device).join(version.to_string());
        let mut given = Vec::new();
        for c in &manifest.components {
            given.push((c.path.clone(), files::read(&dir.join(&c.path))?));
        }
        Ok((
            given,
            manifest.expires_at.saturating_sub(manifest.created_at),
        ))
    }
}

/// Checks the operator's files and fills in the settings the platform
/// controls (the device's credential secret).
fn prepare(
    given: Vec<(String, Vec<u8>)>,
    secret: &str,
) -> Result<Vec<(String, Vec<u8>)>, SnapshotError> {
    let invalid = |m: String| SnapshotError::Invalid(m);
    let mut out: Vec<(String, Vec<u8>)> = Vec::with_capacity(given.len() + 1);
    let mut total = 0u64;
    for (path, bytes) in given {
        if !snapshot::is_plain_path(&path) || path == MANIFEST {
            return Err(invalid(format!(
                "{path:?} is not a plain relative path (segments of [A-Za-z0-9._-], not manifest.json)"
            )));
        }
        if out.iter().any(|(p, _)| *p == path) {
            return Err(invalid(format!("{path:?} is given twice")));
        }
        total += bytes.len() as u64;
        if bytes.len() as u64 > snapshot::MAX_COMPONENT || total > snapshot::MAX_TOTAL {
            return Err(invalid(
                "the files are larger than a snapshot may be".into(),
            ));
        }
        out.push((path, bytes));
    }
    if out.len() > snapshot::MAX_COMPONENTS - 1 {
        return Err(invalid(format!(
            "{} files, more than a snapshot may hold",
            out.len()
        )));
    }
    let Some((_, flows)) = out.iter().find(|(p, _)| p == snapshot::FLOWS) else {
        return Err(invalid("there is no flows.json".into()));
    };
    if serde_json::from_slice::<Vec<serde_json::Map<String, serde_json::Value>>>(flows).is_err() {
        return Err(invalid("flows.json is not a JSON list of nodes".into()));
    }
    snapshot::modules::check_paths(out.iter().map(|(p, _)| p.as_str())).map_err(invalid)?;
    if let Some((_, list)) = out.iter().find(|(p, _)| p == snapshot::modules::MODULES) {
        snapshot::modules::parse(list).map_err(invalid)?;
    }
    if let Some((_, env)) = out.iter().find(|(p, _)| p == "env.json")
        && serde_json::from_slice::<std::collections::BTreeMap<String, String>>(env).is_err()
    {
        return Err(invalid(
            "env.json is not an object of names to strings".into(),
        ));
    }
    let mut settings = match out.iter().position(|(p, _)| p == "settings.json") {
        Some(i) => {
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&out.remove(i).1)
                .map_err(|e| invalid(format!("settings.json is not a JSON object: {e}")))?
        }
        None => serde_json::Map::new(),
    };
    if let Some(key) = settings
        .keys()
        .find(|k| !CONTROLLED_SETTINGS.contains(&k.as_str()))
    {
        return Err(invalid(format!(
            "settings.json sets {key:?}, which a snapshot may not (it may set {})",
            CONTROLLED_SETTINGS.join(", ")
        )));
    }
    settings
        .entry("credentialSecret")
        .or_insert_with(|| secret.into());
    let settings = serde_json::to_vec_pretty(&settings).unwrap_or_default();
    out.push(("settings.json".into(), settings));
    Ok(out)
}

fn file_error(action: &'static str, path: &Path, source: std::io::Error) -> SnapshotError {
    SnapshotError::File(FileError::new(action, path, source))
}

/// Decodes a `create` request's files.
pub fn decode_files(request: &CreateRequest) -> Result<Vec<(String, Vec<u8>)>, SnapshotError> {
    request
        .files
        .iter()
        .map(|f| {
            STANDARD
                .decode(&f.data)
                .map(|bytes| (f.path.clone(), bytes))
                .map_err(|e| SnapshotError::Invalid(format!("{:?}: not base64: {e}", f.path)))
        })
        .collect()
}

/// Serves one `snapshot` stream of `device`: its own version, only.
pub async fn serve(state: Arc<State>, device: String, mut stream: TunnelStream) {
    match answer(&state, &device, &mut stream).await {
        Ok(Some(version)) => debug!(version, "snapshot sent"),
        Ok(None) => {}
        Err(e) => debug!(cause = %e, "snapshot stream ended"),
    }
    let _ = stream.shutdown().await;
}

async fn answer(
    state: &State,
    device: &str,
    stream: &mut TunnelStream,
) -> std::io::Result<Option<u64>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = pull::body_len(header, pull::MAX_REQUEST).map_err(std::io::Error::other)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let request: Request = pull::decode(&body).map_err(std::io::Error::other)?;
    let (stored, manifest) = match state.snapshots.manifest(device, request.version) {
        Ok(found) => found,
        Err(e) => {
            warn!(
                device,
                version = request.version,
                "a device asked for a snapshot the platform does not have"
            );
            let refused = Answer::Refused {
                message: e.to_string(),
            };
            stream.write_all(&pull::encode(&refused)).await?;
            return Ok(None);
        }
    };
    // The roots the device has not walked yet, oldest first: it verifies
    // the manifest, signed with the newest root's key, with the trust it
    // reaches.
    let (roots, envelope, again) = match state.keys.snapshot_answer(request.root_version, stored) {
        Ok(answer) => answer,
        Err(e) => {
            warn!(device, cause = %e, "cannot read the snapshot root chain");
            let refused = Answer::Refused {
                message:
                    "the platform cannot read its snapshot root chain; an operator must restore it"
                        .into(),
            };
            stream.write_all(&pull::encode(&refused)).await?;
            return Ok(None);
        }
    };
    if !roots.is_empty() {
        debug!(
            device,
            from = request.root_version,
            roots = roots.len(),
            "sending the device the snapshot roots it has not walked"
        );
    }
    for envelope in roots {
        stream
            .write_all(&pull::encode(&Answer::Root { envelope }))
            .await?;
    }
    if again {
        debug!(
            device,
            version = request.version,
            "snapshot signed before a key rotation: signed again with the current snapshot key"
        );
    }
    stream
        .write_all(&pull::encode(&Answer::Snapshot { envelope }))
        .await?;
    let dir = state
        .snapshots
        .device_dir(device)
        .join(request.version.to_string());
    for component in &manifest.components {
        let mut file = tokio::fs::File::open(dir.join(&component.path)).await?;
        tokio::io::copy(&mut file, stream).await?;
    }
    stream.flush().await?;
    Ok(Some(request.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(extra: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![("flows.json".to_owned(), b"[]".to_vec())];
        out.extend(extra.iter().map(|(p, b)| (p.to_string(), b.to_vec())));
        out
    }

    #[test]
    fn modules_are_pinned_exactly_and_tarballs_come_with_a_list() {
        let ok = prepare(
            files(&[
                ("modules.json", br#"{"node-red-contrib-x": "1.2.3"}"#),
                ("modules/node-red-contrib-x-1.2.3.tgz", b"tgz"),
            ]),
            "secret",
        )
        .unwrap();
        assert_eq!(ok.len(), 4, "flows, list, tarball, settings");
        for (extra, says) in [
            (
                vec![("modules.json", &br#"{"node-red-contrib-x": "^1.2.3"}"#[..])],
                "not an exact version",
            ),
            (
                vec![("modules/node-red-contrib-x-1.2.3.tgz", &b"tgz"[..])],
                "no modules.json",
            ),
            (
                vec![
                    ("modules.json", &b"{}"[..]),
                    ("modules/install.sh", &b"rm -rf /"[..]),
                ],
                "only npm tarballs",
            ),
        ] {
            let err = prepare(files(&extra), "secret").unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}
