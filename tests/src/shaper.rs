//! A shaping TCP proxy on 127.0.0.1 for tests and benchmarks: the link a
//! cellular gateway has, reproduced on loopback.
//!
//! Every connection accepted on [`Shaper::addr`] is joined to `upstream`,
//! and each byte crossing it in either direction:
//!
//! - first takes its turn on **one serial link shared by both directions
//!   and every connection**: `rate` bytes per second, first come first
//!   served, as on a half-duplex radio or a saturated uplink/downlink pair
//!   sharing a modem;
//! - then travels for `latency` (one way) before it is written on the other
//!   side.
//!
//! A chunk read at `t` on an idle link is written at
//! `t + len / rate + latency`; a busy link queues it behind what it carries.
//! [`Shaper::cut`] drops every connection at once, as a radio dropping out
//! does (new connections are accepted again afterwards). [`Shaper::bytes`]
//! counts what was delivered in each direction: the bytes that crossed the
//! shaped link.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (more are closed
//! on accept); reads of at most [`CHUNK`] bytes; a reader waits for the link
//! before it reads again, and at most about what the link carries in one
//! `latency` (rate × latency, at most 4104 chunks) waits per direction. It listens on
//! 127.0.0.1 only and never connects anywhere but `upstream`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Largest read, and so the link's scheduling unit.
pub const CHUNK: usize = 4 * 1024;
/// Connections open at once through one shaper.
pub const MAX_CONNECTIONS: usize = 256;

/// The link's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// One-way delay added to every byte.
    pub latency: Duration,
    /// Bytes per second, shared by both directions and all connections.
    pub rate: u64,
}

impl Shape {
    /// `latency_ms` each way and `mbit` megabits per second shared.
    pub fn new(latency_ms: u64, mbit: f64) -> Shape {
        Shape {
            latency: Duration::from_millis(latency_ms),
            rate: ((mbit * 1_000_000.0 / 8.0) as u64).max(1),
        }
    }
}

/// Bytes delivered through the shaper.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crossed {
    /// From the accepting side (the client) to `upstream`.
    pub up: u64,
    /// From `upstream` back to the client.
    pub down: u64,
}

impl Crossed {
    pub fn total(&self) -> u64 {
        self.up + self.down
    }
}

/// A running shaping proxy; dropping it stops it and drops its
/// connections.
#[derive(Debug)]
pub struct Shaper {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    shape: Shape,
    /// When the serial link is next free.
    link: Mutex<Instant>,
    up: AtomicU64,
    down: AtomicU64,
    connections: Mutex<JoinSet<()>>,
}

impl Shared {
    /// Books `len` bytes on the link from `now`: when they have been sent.
    fn reserve(&self, now: Instant, len: usize) -> Instant {
        let mut free = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        let start = (*free).max(now);
        let nanos = (len as u128 * 1_000_000_000) / u128::from(self.shape.rate);
        *free = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        *free
    }
}

impl Shaper {
    /// Listens on 127.0.0.1 (a free port) and joins every connection to
    /// `upstream` through a link of `shape`.
    pub async fn start(upstream: SocketAddr, shape: Shape) -> std::io::Result<Shaper> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            shape,
            link: Mutex::new(Instant::now()),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            connections: Mutex::new(JoinSet::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(Shaper {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes delivered each way since the start or the last
    /// [`Shaper::reset_bytes`].
    pub fn bytes(&self) -> Crossed {
        Crossed {
            up: self.shared.up.load(Ordering::Relaxed),
            down: self.shared.down.load(Ordering::Relaxed),
        }
    }

    pub fn reset_bytes(&self) {
        self.shared.up.store(0, Ordering::Relaxed);
        self.shared.down.store(0, Ordering::Relaxed);
    }

    /// Drops every connection now; bytes in flight are lost. Later
    /// connections are accepted as before.
    pub fn cut(&self) {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .abort_all();
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mut connections = shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            continue; // dropped: closed at once
        }
        connections.spawn(connection(client, upstream, shared.clone()));
    }
}

/// One client connection joined to `upstream` until either side ends.
async fn connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        direction(client_read, server_write, shared.clone(), Dir::Up),
        direction(server_read, client_write, shared, Dir::Down),
    );
}

#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
}

/// One direction: chunks are read, booked on the link, and written once
/// sent and `latency` later. End of stream is passed on after the bytes
/// before it.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: Arc<Shared>, dir: Dir) {
    // The reader books each chunk and waits for the link before it reads
    // the next, so about rate × latency bytes are in flight; the channel
    // holds that many chunks and a few more, and a writer that cannot write
    // (the receiver stopped reading) stops the reader.
    let latency = shared.shape.latency;
    let in_flight = shared.shape.rate as u128 * latency.as_millis() / 1000 / CHUNK as u128;
    let capacity = usize::try_from(in_flight)
        .unwrap_or(usize::MAX)
        .clamp(8, 4096)
        + 8;
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(capacity);
    let reader = {
        let shared = shared.clone();
        async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let sent = shared.reserve(Instant::now(), n);
                if tx
                    .send((sent + latency, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep_until(sent).await;
            }
            // Dropping `tx` ends the writer after what is in flight.
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            let counter = match dir {
                Dir::Up => &shared.up,
                Dir::Down => &shared.down,
            };
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Points the tunnel of the agent enrolled in `state_dir` from the
/// platform's port `from` to a shaper's port `to`: its `identity.json`'s
/// tunnel URL keeps the host name, so the platform's certificate still
/// verifies. Call it before the agent starts.
pub fn route_tunnel(state_dir: &std::path::Path, from: u16, to: u16) -> anyhow::Result<()> {
    let path = state_dir.join("identity.json");
    let text = std::fs::read_to_string(&path)?;
    let mut identity: serde_json::Value = serde_json::from_str(&text)?;
    let url = identity["tunnel_url"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{} has no tunnel_url", path.display()))?;
    let (from, to) = (format!(":{from}/"), format!(":{to}/"));
    anyhow::ensure!(
        url.contains(&from),
        "the tunnel URL {url} is not on port {from}"
    );
    identity["tunnel_url"] = url.replacen(&from, &to, 1).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&identity)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_convert_megabits_to_bytes_per_second() {
        assert_eq!(Shape::new(75, 4.0).rate, 500_000);
        assert_eq!(Shape::new(75, 4.0).latency, Duration::from_millis(75));
    }

    #[tokio::test]
    async fn the_link_is_booked_in_turn_by_everyone() {
        let shared = Shared {
            shape: Shape {
                latency: Duration::ZERO,
                rate: 1000,
            },
            link: Mutex::new(Instant::now()),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            connections: Mutex::new(JoinSet::new()),
        };
        let now = Instant::now();
        let first = shared.reserve(now, 500);
        let second = shared.reserve(now, 500);
        assert_eq!(first - now, Duration::from_millis(500));
        assert_eq!(second - now, Duration::from_secs(1));
        // An idle link starts from the moment of the booking.
        let later = now + Duration::from_secs(5);
        assert_eq!(
            shared.reserve(later, 100) - later,
            Duration::from_millis(100)
        );
    }
}
