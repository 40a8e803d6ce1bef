//! Shipping the audit queue on the tunnel's `audit` stream
//! (`docs/protocol.md` §17): the platform says what it holds, the device
//! sends every record after it in order, in batches, each batch followed by
//! a checkpoint the device signs; the platform acknowledges the highest
//! record it stored durably and the queue deletes up to it.
//!
//! This module owns one stream's exchange. It never deletes a record the
//! platform did not acknowledge, never holds more than [`MAX_IN_FLIGHT`]
//! bytes sent and not acknowledged, and reads records from the store's
//! committed state only. A session opens a new stream after a reconnect;
//! whatever was in flight is sent again and the platform deduplicates.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use tether_proto::audit::{self, Checkpoint, Frame, FrameDecoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::AuditQueue;

/// Records per batch read from the store.
const BATCH_RECORDS: usize = 1024;
/// About this many bytes per batch.
const BATCH_BYTES: usize = 256 * 1024;
/// Bytes sent and not yet acknowledged, at most.
pub const MAX_IN_FLIGHT: usize = 1024 * 1024;
/// A checkpoint after a batch at most this often (and one for the last
/// record sent once this long has passed): a trickle of events does not
/// cost a signature each.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long the platform may take to say what it holds.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Signs checkpoints with the device's current key: returns the signature
/// (ECDSA P-256, ASN.1) and the certificate (DER) of the key that made it.
pub type Signer = Arc<dyn Fn(&[u8]) -> Option<(Vec<u8>, Vec<u8>)> + Send + Sync>;

/// Why shipping stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("the audit stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the platform sent a malformed audit frame: {0}")]
    Frame(#[from] audit::AuditError),
    #[error("the platform sent {0} on the audit stream, which it never sends")]
    Unexpected(&'static str),
    #[error("the platform did not say what it holds within {HELLO_TIMEOUT:?}")]
    NoHello,
    #[error("the audit stream was closed by the platform")]
    Closed,
    #[error("the audit store cannot be read: {0}")]
    Store(String),
}

/// Ships the queue on `stream` until it fails or closes.
pub async fn run<S>(
    queue: Arc<AuditQueue>,
    stream: S,
    device_id: String,
    signer: Signer,
    clock: crate::clock::Clock,
) -> Result<(), ShipError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 8192];
    let stored = match tokio::time::timeout(
        HELLO_TIMEOUT,
        next_frame(&mut rd, &mut decoder, &mut buf),
    )
    .await
    {
        Err(_) => return Err(ShipError::NoHello),
        Ok(Ok(Frame::Hello { stored })) => stored,
        Ok(Ok(_)) => return Err(ShipError::Unexpected("a frame before its hello")),
        Ok(Err(e)) => return Err(e),
    };
    let last = queue.stats().last_seq;
    if stored > last {
        warn!(
            platform = stored,
            device = last,
            "the platform holds audit records beyond this device's last one: was the state directory restored from a copy? New records with those numbers are flagged on the platform"
        );
    }
    if stored > 0 {
        queue.ack(stored.min(last));
    }
    let mut next = stored.max(queue.stats().acked) + 1;
    let mut committed = queue.committed();
    // Sent batches: (last sequence number, bytes).
    let mut in_flight: VecDeque<(u64, usize)> = VecDeque::new();
    let mut in_flight_bytes = 0usize;
    let mut caught_up = false;
    // The last record sent without a checkpoint after it.
    let mut unsigned: Option<(u64, bytes::Bytes)> = None;
    let mut last_checkpoint = tokio::time::Instant::now() - CHECKPOINT_EVERY;
    let sign = |seq: u64, body: &[u8]| checkpoint(seq, body, &device_id, &signer, &clock);
    loop {
        if !caught_up && in_flight_bytes < MAX_IN_FLIGHT {
            let batch = read_batch(&queue, next).await?;
            if batch.is_empty() {
                caught_up = true;
                continue;
            }
            let sign_last = last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
            let (out, last_seq) = encode_batch(&batch, sign_last, &sign)?;
            if sign_last {
                last_checkpoint = tokio::time::Instant::now();
                unsigned = None;
            } else {
                unsigned = batch.last().cloned();
            }
            wr.write_all(&out).await?;
            wr.flush().await?;
            in_flight.push_back((last_seq, out.len()));
            in_flight_bytes += out.len();
            next = last_seq + 1;
            continue;
        }
        tokio::select! {
            frame = next_frame(&mut rd, &mut decoder, &mut buf) => match frame? {
                Frame::Ack { seq } => {
                    queue.ack(seq);
                    while let Some(&(last, bytes)) = in_flight.front() && last <= seq {
                        in_flight.pop_front();
                        in_flight_bytes -= bytes;
                    }
                    debug!(seq, "audit records acknowledged");
                }
                Frame::Hello { .. } => return Err(ShipError::Unexpected("a second hello")),
                Frame::Record(_) | Frame::Checkpoint(_) => {
                    return Err(ShipError::Unexpected("a record or a checkpoint"));
                }
            },
            changed = committed.changed(), if caught_up => {
                if changed.is_err() {
                    return Ok(());
                }
                caught_up = false;
            }
            () = tokio::time::sleep_until(last_checkpoint + CHECKPOINT_EVERY), if unsigned.is_some() => {
                let (seq, body) = unsigned.take().expect("checked");
                if let Some(c) = sign(seq, &body) {
                    let mut out = BytesMut::new();
                    Frame::Checkpoint(c).encode(&mut out)?;
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                }
                last_checkpoint = tokio::time::Instant::now();
            }
        }
    }
}

async fn read_batch(queue: &AuditQueue, from: u64) -> Result<Vec<(u64, bytes::Bytes)>, ShipError> {
    let Some(reader) = queue.reader() else {
        // The store is closed after an error; the writer opens it again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        return Ok(Vec::new());
    };
    tokio::task::spawn_blocking(move || reader.read_from(from, BATCH_RECORDS, BATCH_BYTES))
        .await
        .map_err(|e| ShipError::Store(e.to_string()))?
        .map_err(|e| ShipError::Store(e.to_string()))
}

/// Marks a drop marker's bytes (the agent writes the type this way).
const MARKER: &[u8] = b"\"type\":\"events_dropped\"";

/// The frames of one batch: every record, a checkpoint after each drop
/// marker and, with `sign_last`, after the last record.
fn encode_batch(
    batch: &[(u64, bytes::Bytes)],
    sign_last: bool,
    sign: &impl Fn(u64, &[u8]) -> Option<Checkpoint>,
) -> Result<(BytesMut, u64), ShipError> {
    let mut out =
        BytesMut::with_capacity(batch.iter().map(|(_, b)| b.len() + 5).sum::<usize>() + 1024);
    let last = batch.len() - 1;
    for (i, (seq, body)) in batch.iter().enumerate() {
        Frame::Record(body.clone()).encode(&mut out)?;
        let marker = || body.windows(MARKER.len()).any(|w| w == MARKER);
        if (i == last && sign_last || marker())
            && let Some(checkpoint) = sign(*seq, body)
        {
            Frame::Checkpoint(checkpoint).encode(&mut out)?;
        }
    }
    Ok((out, batch[last].0))
}

fn checkpoint(
    seq: u64,
    body: &[u8],
    device_id: &str,
    signer: &Signer,
    clock: &crate::clock::Clock,
) -> Option<Checkpoint> {
    let hash = audit::to_hex(&audit::hash(body));
    let time = clock.now_unix();
    let (signature, cert) = signer(&Checkpoint::message(device_id, seq, &hash, time))?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    Some(Checkpoint {
        seq,
        hash,
        time,
        cert: b64.encode(cert),
        signature: b64.encode(signature),
    })
}

async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Frame, ShipError> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(frame);
        }
        let n = rd.read(buf).await?;
        if n == 0 {
            return Err(ShipError::Closed);
        }
        decoder.push(&buf[..n]);
    }
}

/// A [`Signer`] from a PKCS#8 ECDSA P-256 key and its certificate.
pub fn signer_from_pkcs8(pkcs8: &[u8], cert_der: Vec<u8>) -> Option<Signer> {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng).ok()?;
    Some(Arc::new(move |message: &[u8]| {
        let signature = key.sign(&rng, message).ok()?;
        Some((signature.as_ref().to_vec(), cert_der.clone()))
    }))
}
