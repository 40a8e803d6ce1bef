//! One `mqtt` stream of a device (`docs/protocol.md` §19): the hello, then
//! the device's frames read in order and the platform's written as they
//! come, each direction on its own so neither waits for the other.
//!
//! This module owns the stream's framing and pacing: the per-device publish
//! rate (past it the stream is read more slowly, nothing is dropped), and
//! reading no further while the broker has not taken what the device sent
//! ([`super::link::MAX_PENDING`]). It never decides what a frame means for
//! the device's queues ([`super::link`] does) and never allocates more than
//! one read chunk, one frame and one write batch.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tether_proto::mqtt::{Frame, FrameDecoder, Hello, MqttError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::link::{Cursor, Link};

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes of messages written at a time (one message more may be over it).
const WRITE_BATCH: usize = 256 * 1024;
/// A publish rate debt shorter than this is carried, not slept.
const MIN_SLEEP: Duration = Duration::from_millis(1);

/// Why a device's `mqtt` stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("this platform has no MQTT broker (started with --no-mqtt)")]
    Off,
    #[error("the device has no MQTT namespace on this platform: {0}")]
    Namespace(MqttError),
    #[error("the device sent a malformed mqtt frame: {0}")]
    Frame(#[from] MqttError),
    #[error("the device sent a {0} frame, which only the platform sends")]
    Unexpected(&'static str),
    #[error("a newer mqtt stream of the device replaced this one")]
    Replaced,
    #[error("the mqtt stream failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A token bucket: `rate` messages a second, `burst` at once.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Bucket {
        Bucket {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Takes one token; returns how long to wait before the message may
    /// go on (zero within the budget). The debt is kept, so short waits
    /// can be carried and the rate still holds on average.
    pub(crate) fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Runs one stream of the device behind `link` until it ends.
/// `stream` numbers it among the device's streams (a newer one replaces
/// it); `epoch` and `max_payload` go into the hello.
pub(crate) async fn run<S>(
    link: Arc<Link>,
    stream: u64,
    epoch: u64,
    max_payload: usize,
    io: S,
) -> Result<(), StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (cursor, delivered) = link.attach(stream);
    let hello = Hello {
        team: link.ns.team().to_owned(),
        epoch,
        delivered,
        max_payload: u32::try_from(max_payload).unwrap_or(u32::MAX),
    };
    let _detach = Detach {
        link: &link,
        stream,
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut out = BytesMut::new();
    Frame::Hello(hello).encode(&mut out)?;
    wr.write_all(&out).await?;
    wr.flush().await?;
    tokio::select! {
        r = read_loop(&link, &link.bucket, stream, &mut rd, max_payload) => r,
        r = write_loop(&link, cursor, &mut wr, out) => r,
    }
}

/// Marks the device offline when its stream ends, however it ends.
struct Detach<'a> {
    link: &'a Link,
    stream: u64,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.link.detach(self.stream);
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    link: &Link,
    bucket: &Mutex<Bucket>,
    stream: u64,
    rd: &mut R,
    max_payload: usize,
) -> Result<(), StreamError> {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut room = link.room_receiver();
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            debug!(device_id = %link.device_id, "MQTT: the device ended its stream");
            return Ok(());
        }
        decoder.push(&buf[..n]);
        while let Some(frame) = decoder.next_frame()? {
            if !link.is_current(stream) {
                return Err(StreamError::Replaced);
            }
            match frame {
                Frame::Hello(_) => return Err(StreamError::Unexpected("hello")),
                Frame::Subscribe(list) => link.subscribe(list),
                Frame::Publish { seq, message } => {
                    let wait = bucket
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take(Instant::now());
                    if wait >= MIN_SLEEP {
                        tokio::time::sleep(wait).await;
                    }
                    loop {
                        room.borrow_and_update();
                        if !link.is_current(stream) {
                            return Err(StreamError::Replaced);
                        }
                        if link.has_room() {
                            break;
                        }
                        if room.changed().await.is_err() {
                            return Ok(());
                        }
                    }
                    link.device_published(seq, message, max_payload);
                }
                Frame::Ack { seq } => link.device_ack(seq),
                Frame::Refused(refusal) => link.device_refused(refusal),
                Frame::Figures(figures) => link.figures(figures),
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    link: &Link,
    mut cursor: Cursor,
    wr: &mut W,
    mut out: BytesMut,
) -> Result<(), StreamError> {
    let mut wake = link.wake_receiver();
    loop {
        wake.borrow_and_update();
        let Some(batch) = link.next_batch(&mut cursor, WRITE_BATCH) else {
            return Err(StreamError::Replaced);
        };
        if batch.is_empty() {
            if wake.changed().await.is_err() {
                return Ok(());
            }
            continue;
        }
        out.clear();
        // Refusals first: an ack covers the refused messages.
        let frames = batch
            .refusals
            .into_iter()
            .map(Frame::Refused)
            .chain(batch.ack.map(|seq| Frame::Ack { seq }))
            .chain(
                batch
                    .publishes
                    .into_iter()
                    .map(|(seq, message)| Frame::Publish { seq, message }),
            );
        for frame in frames {
            if let Err(e) = frame.encode(&mut out) {
                // Messages were checked against the limits when routed.
                debug!(device_id = %link.device_id, cause = %e, "MQTT: a frame for the device cannot be encoded; skipped");
            }
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 10, t0);
        for _ in 0..10 {
            assert_eq!(b.take(t0), Duration::ZERO);
        }
        // The 11th at once owes one token: 1 ms at 1000/s.
        let wait = b.take(t0);
        assert!(
            wait > Duration::from_micros(900) && wait < Duration::from_micros(1100),
            "{wait:?}"
        );
        // 10 ms later ten tokens came back, less the one owed.
        let later = t0 + Duration::from_millis(10);
        for _ in 0..9 {
            assert_eq!(b.take(later), Duration::ZERO);
        }
        assert!(b.take(later) > Duration::ZERO);
        // Never more than the burst, however long it was idle.
        let much_later = t0 + Duration::from_secs(3600);
        for _ in 0..10 {
            assert_eq!(b.take(much_later), Duration::ZERO);
        }
        assert!(b.take(much_later) > Duration::ZERO);
    }
}
