//! Pulling a snapshot from the platform on a `snapshot` stream
//! (`docs/protocol.md` §18): ask for a version, naming the root version
//! the device trusts; read the root versions the platform sends first and
//! the manifest's envelope (each frame bounded before it is read, the roots
//! counted); walk the roots and keep the trust they lead to
//! ([`super::trust`]), verify the envelope with it, then stage the
//! components straight from the stream, each read only up to the length the
//! verified manifest gives and checked while it is written.
//!
//! This module never runs what it pulls and never writes outside the
//! snapshot folder's staging area and the kept trust.

use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;
use std::time::Duration;

use tether_proto::snapshot::pull::{self, Answers, Pulled, Request};
use tether_proto::snapshot::{Envelope, Manifest, Refusal};
use tether_proto::tokio_io::{Tunnel, TunnelStream};
use tether_proto::{Service, ServiceHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::trust::{TrustError, TrustStore};
use super::{Folder, FolderError};

/// The platform must send something at least this often while a snapshot
/// is pulled.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot open a snapshot stream: {0}")]
    Open(String),
    #[error("the snapshot stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the platform sent nothing for {IDLE_TIMEOUT:?} while the snapshot was pulled")]
    Stalled,
    #[error("the platform answered out of step: {0}")]
    Wire(#[from] pull::PullError),
    #[error("the platform refused to send snapshot {version}: {message}")]
    Refused { version: u64, message: String },
    #[error("{0}")]
    Rejected(#[from] Refusal),
    #[error(
        "the platform's snapshot key rotation was refused: {refusal}; the device keeps trusting root version {trusted}"
    )]
    Root { trusted: u64, refusal: Refusal },
    #[error("{0}")]
    Trust(#[from] TrustError),
    #[error("{0}")]
    Folder(#[from] FolderError),
}

impl PullError {
    /// True when the snapshot itself is at fault (a refusal), not the
    /// link: it is rejected rather than tried again.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            PullError::Rejected(_)
                | PullError::Root { .. }
                | PullError::Trust(TrustError::Unreadable { .. })
                | PullError::Folder(FolderError::Refused(_))
        )
    }
}

/// What the device checks a manifest against (besides the trust).
#[derive(Clone, Debug)]
pub struct Checks {
    pub device: String,
    /// The highest version the device ever switched to.
    pub installed: u64,
    /// Unix seconds.
    pub now: u64,
}

/// Asks for `version` and reads the answers: the root versions newer than
/// the trusted one, walked and kept in `trust` (written before it is
/// used), then the envelope, verified with the trust they lead to. Returns
/// it verified, with the stream positioned at the first component. A walk
/// that fails changes nothing and rejects the snapshot; so does a kept
/// trust that cannot be read.
pub async fn fetch_manifest(
    tunnel: &Tunnel,
    version: u64,
    checks: &Checks,
    trust: &mut TrustStore,
) -> Result<(Envelope, Manifest, TunnelStream), PullError> {
    let trusted = trust
        .current()
        .map_err(|e| PullError::Trust(e.clone()))?
        .clone();
    let mut stream = tunnel
        .open(ServiceHeader::new(Service::Snapshot))
        .map_err(|e| PullError::Open(e.to_string()))?;
    let request = Request {
        version,
        root_version: trusted.root.version,
    };
    stream.write_all(&pull::encode(&request)).await?;
    stream.flush().await?;
    let mut answers = Answers::new();
    let (roots, envelope) = loop {
        let mut header = [0u8; 4];
        idle(stream.read_exact(&mut header)).await?;
        let len = pull::body_len(header, pull::MAX_ANSWER)?;
        let mut body = vec![0u8; len];
        idle(stream.read_exact(&mut body)).await?;
        match answers.take(&body)? {
            None => continue,
            Some(Pulled::Snapshot { roots, envelope }) => break (roots, envelope),
            Some(Pulled::Refused { message }) => {
                return Err(PullError::Refused { version, message });
            }
        }
    };
    let walked = if roots.is_empty() {
        trusted
    } else {
        let walked = trusted
            .update(&roots, checks.now)
            .map_err(|refusal| PullError::Root {
                trusted: trusted.root.version,
                refusal,
            })?;
        // Kept once the roots verified, before the manifest is checked
        // (as TUF does): the walk stands whatever the snapshot turns out
        // to be, and a device too far behind for one pull gets on at the
        // next one.
        trust.keep(walked.clone()).await?;
        walked
    };
    let manifest =
        walked.verify_manifest(&envelope, &checks.device, checks.installed, checks.now)?;
    if manifest.version != version {
        return Err(PullError::Rejected(Refusal::Malformed(format!(
            "asked for version {version}, the platform sent version {}",
            manifest.version
        ))));
    }
    Ok((envelope, manifest, stream))
}

async fn idle<T>(
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, PullError> {
    tokio::time::timeout(IDLE_TIMEOUT, read)
        .await
        .map_err(|_| PullError::Stalled)?
        .map_err(PullError::Io)
}

/// Stages the components that follow the envelope on `stream` into
/// `folder`. Blocking: call it on the blocking pool, with the runtime's
/// handle.
pub fn stage_from_stream(
    folder: &mut Folder,
    envelope: &Envelope,
    manifest: &Manifest,
    stream: TunnelStream,
    runtime: tokio::runtime::Handle,
    prepare: impl FnOnce(&std::path::Path) -> Result<(), String>,
) -> Result<std::path::PathBuf, FolderError> {
    let bytes = serde_json::to_vec(envelope).map_err(|e| FolderError::State(e.to_string()))?;
    // Owned by the `open` closure: the stream closes when the folder drops
    // it, once every component is read, before `prepare` runs.
    let source = Rc::new(RefCell::new(Blocking { stream, runtime }));
    folder.stage_with(
        &bytes,
        manifest,
        move |component| {
            Ok(Part {
                source: Rc::clone(&source),
                left: component.length,
            })
        },
        prepare,
    )
}

/// The stream, read from blocking code.
struct Blocking {
    stream: TunnelStream,
    runtime: tokio::runtime::Handle,
}

impl Read for Blocking {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.stream.read(buf);
        match self
            .runtime
            .block_on(tokio::time::timeout(IDLE_TIMEOUT, read))
        {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                PullError::Stalled.to_string(),
            )),
        }
    }
}

/// One component: at most its length from the shared stream; the stream
/// ending early is an error (the component's check reports the length).
struct Part {
    source: Rc<RefCell<Blocking>>,
    left: u64,
}

impl Read for Part {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.source.borrow_mut().read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the platform ended the stream before the component's end",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
