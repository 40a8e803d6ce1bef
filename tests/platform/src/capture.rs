//! Snapshots from a device's own flows, as FlowFuse's "snapshot from
//! device" makes them: the platform opens a `snapshot` stream to the device
//! asking for a capture (`tether_proto::snapshot::capture`), reads the
//! flows Node-RED runs there with their encrypted credentials, and signs a
//! new snapshot of them with the rest (settings, environment, modules)
//! taken from the version the device runs.
//!
//! This module reads the device's answer within its bounds; it never
//! trusts a path or a length it did not check.

use std::time::Duration;

use tether_proto::snapshot::capture::{Captured, MAX_HEADER};
use tether_proto::snapshot::pull;
use tether_proto::tokio_io::TunnelStream;
use tokio::io::AsyncReadExt;

/// The device must send something at least this often.
const IDLE: Duration = Duration::from_secs(60);

/// What a device sent.
#[derive(Clone, Debug)]
pub struct Capture {
    pub captured: Captured,
    /// Each file's path and bytes, in the header's order.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the device's capture is not valid: {0}")]
    Invalid(String),
    #[error("the device's capture broke off: {0}")]
    Io(#[from] std::io::Error),
    #[error("the device sent nothing for {0:?}")]
    Stalled(Duration),
}

/// Reads a capture from `stream`: the header (bounded before it is read),
/// checked, then each file exactly as long as announced, then the end.
pub async fn read(mut stream: TunnelStream) -> Result<Capture, CaptureError> {
    let invalid = |e: pull::PullError| CaptureError::Invalid(e.to_string());
    let mut head = [0u8; 4];
    idle(stream.read_exact(&mut head)).await?;
    let len = pull::body_len(head, MAX_HEADER).map_err(invalid)?;
    let mut body = vec![0u8; len];
    idle(stream.read_exact(&mut body)).await?;
    let captured: Captured = pull::decode(&body).map_err(invalid)?;
    captured.check().map_err(CaptureError::Invalid)?;
    let mut files = Vec::with_capacity(captured.files.len());
    for file in &captured.files {
        // Bounded by `check` (at most `capture::MAX_FILE` each).
        let mut bytes = vec![0u8; file.length as usize];
        idle(stream.read_exact(&mut bytes)).await?;
        files.push((file.path.clone(), bytes));
    }
    let mut extra = [0u8; 1];
    if idle(stream.read(&mut extra)).await? != 0 {
        return Err(CaptureError::Invalid(
            "the device sent more than it announced".into(),
        ));
    }
    Ok(Capture { captured, files })
}

async fn idle<T>(
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, CaptureError> {
    tokio::time::timeout(IDLE, read)
        .await
        .map_err(|_| CaptureError::Stalled(IDLE))?
        .map_err(CaptureError::Io)
}

/// The files of a new snapshot: `base`'s (the version the device runs, if
/// the platform has it), with the captured flows and credentials in place
/// of its own, and, when the credentials are encrypted with a secret of
/// the device's own, that secret in `settings.json`.
pub fn merge(
    base: Vec<(String, Vec<u8>)>,
    capture: Capture,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let captured_paths: Vec<String> = capture.files.iter().map(|(p, _)| p.clone()).collect();
    let mut out: Vec<(String, Vec<u8>)> = base
        .into_iter()
        .filter(|(p, _)| {
            !captured_paths.contains(p) && p != "flows_cred.json" && p != "credentials.json"
        })
        .collect();
    out.extend(capture.files);
    if let Some(secret) = capture.captured.credential_secret {
        let mut settings = match out.iter().position(|(p, _)| p == "settings.json") {
            Some(i) => serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(
                &out.remove(i).1,
            )
            .map_err(|e| format!("the base snapshot's settings.json is not an object: {e}"))?,
            None => serde_json::Map::new(),
        };
        settings.insert("credentialSecret".into(), secret.into());
        out.push((
            "settings.json".into(),
            serde_json::to_vec_pretty(&settings).unwrap_or_default(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::snapshot::capture::CapturedFile;

    fn capture(secret: Option<&str>) -> Capture {
        Capture {
            captured: Captured {
                base: Some(2),
                files: vec![CapturedFile {
                    path: "flows.json".into(),
                    length: 3,
                }],
                credential_secret: secret.map(str::to_owned),
            },
            files: vec![("flows.json".into(), b"[9]".to_vec())],
        }
    }

    #[test]
    fn the_captured_flows_replace_the_bases_and_the_rest_is_kept() {
        let base = vec![
            ("flows.json".to_owned(), b"[1]".to_vec()),
            ("flows_cred.json".to_owned(), b"{}".to_vec()),
            ("env.json".to_owned(), b"{\"A\":\"b\"}".to_vec()),
            (
                "settings.json".to_owned(),
                b"{\"credentialSecret\":\"p\"}".to_vec(),
            ),
        ];
        let merged = merge(base.clone(), capture(None)).unwrap();
        let get = |m: &[(String, Vec<u8>)], p: &str| {
            m.iter().find(|(q, _)| q == p).map(|(_, b)| b.clone())
        };
        assert_eq!(get(&merged, "flows.json").unwrap(), b"[9]");
        assert_eq!(
            get(&merged, "flows_cred.json"),
            None,
            "the base's credentials go"
        );
        assert_eq!(get(&merged, "env.json").unwrap(), b"{\"A\":\"b\"}");
        assert_eq!(
            get(&merged, "settings.json").unwrap(),
            b"{\"credentialSecret\":\"p\"}"
        );

        let merged = merge(base, capture(Some("own"))).unwrap();
        let settings: serde_json::Value =
            serde_json::from_slice(&get(&merged, "settings.json").unwrap()).unwrap();
        assert_eq!(settings["credentialSecret"], "own");
    }
}
