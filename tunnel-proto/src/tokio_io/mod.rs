//! A thin tokio shell around [`Connection`]: drives it over a
//! tokio-tungstenite WebSocket and hands streams to the application as
//! `AsyncRead + AsyncWrite`.
//!
//! [`Tunnel::new`] returns two halves:
//!
//! - a [`Tunnel`] handle (cheap to clone) to open, accept and shut down;
//! - a [`Driver`] future that owns the WebSocket and must be spawned (this
//!   library spawns nothing). It resolves when the tunnel is closed.
//!
//! The state machine sits behind one mutex shared by the driver and the
//! streams, as in quinn. The lock is never held across I/O: the driver reads
//! a batch of messages, then locks to hand them in and take a batch of frames
//! out, then unlocks and writes. Streams lock only to copy bytes in or out.
//! The WebSocket is flushed only when the state machine has nothing more to
//! send, so bulk data leaves in full TLS records.
//!
//! This module reads the clock (`tokio::time::Instant`, so paused time in
//! tests works) and passes it in; the core never does.

pub mod copy;
mod driver;
mod stream;

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{
    CloseCode, Config, ConfigError, Connection, ConnectionError, Event, Hello, OpenError,
    ResetCode, ServiceHeader, Settings, Stats, StreamId,
};
pub use copy::copy_bidirectional;
pub use driver::{Driver, DriverError};
pub use stream::TunnelStream;

/// The WebSocket limits matching a side's protocol settings: one message is
/// one frame, so nothing larger than a frame is ever accepted, and the write
/// buffer is bounded (tungstenite's defaults are 64 MiB messages and an
/// unbounded write buffer). The read buffer is 32 KiB: tungstenite zero-fills
/// it before every read, so a larger one costs CPU per byte
/// (`docs/decisions.md`, 7); a larger frame still fits, the buffer grows.
pub fn websocket_config(settings: &Settings) -> WebSocketConfig {
    let max_message = crate::frame::HEADER_LEN + settings.max_frame_payload as usize;
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .read_buffer_size(32 * 1024)
        .write_buffer_size(128 * 1024)
        .max_write_buffer_size(1024 * 1024)
}

/// How many bytes of a tunnel's socket may wait unsent in the kernel, for
/// `TCP_NOTSENT_LOWAT`. Bytes above it wait in the tunnel instead, where a
/// control frame or another stream's data can still go ahead of them; in
/// the kernel's send queue nothing overtakes. Data already sent but not yet
/// acknowledged is not counted, so throughput over long paths is unaffected.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 128 * 1024;

/// Sets the options every tunnel socket wants, on either end: no Nagle
/// delay (control frames and keystrokes leave at once) and
/// [`TUNNEL_NOTSENT_LOWAT`]. Best effort: a kernel without an option still
/// carries the tunnel, a little less well.
pub fn tune_socket(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(TUNNEL_NOTSENT_LOWAT);
}

/// A handle to a running tunnel. Clones share the tunnel.
#[derive(Clone, Debug)]
pub struct Tunnel {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
}

/// Everything the driver and the streams share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) conn: Connection,
    driver: Option<Waker>,
    readers: HashMap<StreamId, Waker>,
    writers: HashMap<StreamId, Waker>,
    /// Tasks waiting in `TunnelStream::accepted`.
    openers: HashMap<StreamId, Waker>,
    acceptor: Option<Waker>,
    /// Tasks waiting for the handshake or the close.
    watchers: Vec<Waker>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in this crate; the state
        // machine itself stays consistent, so keep going with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Wakes the tasks that the state machine's events concern. Call after
    /// every change to `conn`.
    pub(crate) fn dispatch(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Readable(id) => wake(self.readers.remove(&id)),
                Event::Writable(id) => wake(self.writers.remove(&id)),
                Event::Accepted(id) => wake(self.openers.remove(&id)),
                Event::Reset { stream, .. } => {
                    wake(self.readers.remove(&stream));
                    wake(self.writers.remove(&stream));
                    wake(self.openers.remove(&stream));
                }
                Event::Incoming => wake(self.acceptor.take()),
                Event::Connected | Event::GoAway { .. } => self.wake_watchers(),
                Event::Closed => {
                    self.readers.drain().for_each(|(_, w)| w.wake());
                    self.writers.drain().for_each(|(_, w)| w.wake());
                    self.openers.drain().for_each(|(_, w)| w.wake());
                    wake(self.acceptor.take());
                    self.wake_watchers();
                }
            }
        }
        if self.conn.wants_transmit() {
            self.wake_driver();
        }
    }

    pub(crate) fn wake_driver(&mut self) {
        wake(self.driver.take());
    }

    fn wake_watchers(&mut self) {
        self.watchers.drain(..).for_each(Waker::wake);
    }

    fn watch(&mut self, waker: &Waker) {
        if !self.watchers.iter().any(|w| w.will_wake(waker)) {
            self.watchers.push(waker.clone());
        }
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The shell's clock. The only place the crate reads time.
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Tunnel {
    /// Starts a tunnel over an established WebSocket. Spawn the returned
    /// [`Driver`]; nothing moves until it runs.
    pub fn new<S>(
        ws: tokio_tungstenite::WebSocketStream<S>,
        config: Config,
    ) -> Result<(Tunnel, Driver<S>), ConfigError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let conn = Connection::new(config, now())?;
        let inner = Inner {
            conn,
            driver: None,
            readers: HashMap::new(),
            writers: HashMap::new(),
            openers: HashMap::new(),
            acceptor: None,
            watchers: Vec::new(),
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
        });
        let driver = Driver::new(ws, shared.clone());
        Ok((Tunnel { shared }, driver))
    }

    /// Waits for the handshake; returns the peer's HELLO.
    pub async fn connected(&self) -> Result<Hello, ConnectionError> {
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(hello) = inner
                .conn
                .peer_hello()
                .filter(|_| inner.conn.is_connected())
            {
                return Poll::Ready(Ok(*hello));
            }
            if let Some(error) = inner.conn.close_reason() {
                return Poll::Ready(Err(error.clone()));
            }
            inner.watch(cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Opens a stream to a service on the peer. Bytes may be written at once
    /// (within the peer's initial window); [`TunnelStream::accepted`] waits
    /// for the peer's answer, and a refusal also surfaces as a reset error on
    /// the first read or write.
    pub fn open(&self, header: ServiceHeader) -> Result<TunnelStream, OpenError> {
        let mut inner = self.shared.lock();
        let id = inner.conn.open(now(), header)?;
        inner.dispatch();
        Ok(TunnelStream::new(id, self.shared.clone()))
    }

    /// Waits for the next stream the peer opens. Returns `None` once the
    /// tunnel is closed. One task should accept at a time.
    pub async fn accept(&self) -> Option<(TunnelStream, ServiceHeader)> {
        self.accept_filtered(|_| Ok(())).await
    }

    /// Like [`Tunnel::accept`], but `decide` sees each service header first;
    /// streams it refuses are reset with its code and reason, and the opener
    /// learns of it instead of an ACCEPT.
    pub async fn accept_filtered<F>(&self, mut decide: F) -> Option<(TunnelStream, ServiceHeader)>
    where
        F: FnMut(&ServiceHeader) -> Result<(), (ResetCode, String)>,
    {
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            while let Some((id, header)) = inner.conn.peek_incoming() {
                if let Err((code, reason)) = decide(header) {
                    inner.conn.reset(id, code, &reason);
                    continue;
                }
                let Some((id, header)) = inner.conn.accept() else {
                    break;
                };
                inner.dispatch();
                return Poll::Ready(Some((TunnelStream::new(id, self.shared.clone()), header)));
            }
            inner.dispatch();
            if inner.conn.is_closed() {
                return Poll::Ready(None);
            }
            inner.acceptor = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Graceful shutdown: GOAWAY, let open streams finish, then CLOSE. Await
    /// [`Tunnel::closed`] (with a timeout of your choosing, then
    /// [`Tunnel::close`]) to bound the wait.
    pub fn shutdown(&self, code: CloseCode, reason: &str) {
        let mut inner = self.shared.lock();
        inner.conn.shutdown(code, reason);
        inner.dispatch();
    }

    /// Closes at once; open streams fail.
    pub fn close(&self, code: CloseCode, reason: &str) {
        let mut inner = self.shared.lock();
        inner.conn.close(code, reason);
        inner.dispatch();
        inner.wake_driver();
    }

    /// Waits until the tunnel is closed and says why.
    pub async fn closed(&self) -> ConnectionError {
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(error) = inner.conn.close_reason() {
                return Poll::Ready(error.clone());
            }
            inner.watch(cx.waker());
            Poll::Pending
        })
        .await
    }

    /// True once the tunnel is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().conn.is_closed()
    }

    /// Smoothed round-trip time, once measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.lock().conn.rtt()
    }

    /// Frame and byte counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().conn.stats()
    }

    /// Streams currently open.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().conn.stream_count()
    }
}
