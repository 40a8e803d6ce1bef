//! The driver task: moves messages between the WebSocket and the state
//! machine, and fires its timers.
//!
//! Each turn reads what the socket has (a bounded batch), locks the shared
//! state once to hand it in and take out a bounded batch of frames, unlocks,
//! then writes. It flushes only when the state machine has nothing more to
//! send: flushing every message would cut each 16 KiB frame into a full and a
//! tiny TLS record and cost a system call each.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{Shared, now};
use crate::arena::Arena;
use crate::{CloseCode, ConnectionError};

/// Most messages read from the socket before they are handed in.
const READ_BATCH: usize = 32;
/// Most bytes of frames taken out of the state machine per turn. This is all
/// the driver ever holds outside the state machine's own bounded buffers.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Turns per poll before the driver yields to other tasks.
const TURNS_PER_POLL: usize = 16;
/// How long a closing tunnel waits for the final frames to leave.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why a tunnel ended, as the driver reports it.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("websocket failed: {0}")]
    WebSocket(#[from] tungstenite::Error),
}

/// Owns the WebSocket of one tunnel. Spawn it; it resolves when the tunnel
/// closes, with `Ok(())` for an orderly close by either side.
#[must_use = "the driver moves all traffic: spawn it"]
#[derive(Debug)]
pub struct Driver<S> {
    ws: WebSocketStream<S>,
    shared: Arc<Shared>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    /// Frames taken from the state machine and not yet given to the socket.
    outbox: VecDeque<Bytes>,
    outbox_bytes: usize,
    /// Where received messages are kept until the application reads them:
    /// tungstenite hands out slices of its own read buffer, and holding one
    /// would make it allocate a fresh, zeroed buffer for every read
    /// (`docs/decisions.md`, 5).
    arena: Arena,
    unflushed: bool,
    read_closed: bool,
    /// A message the WebSocket layer refused, to report to the peer.
    violation: Option<(CloseCode, String)>,
    transport_error: Option<tungstenite::Error>,
    close_deadline: Option<Instant>,
}

impl<S> Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub(crate) fn new(ws: WebSocketStream<S>, shared: Arc<Shared>) -> Driver<S> {
        Driver {
            ws,
            shared,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            arena: Arena::default(),
            unflushed: false,
            read_closed: false,
            violation: None,
            transport_error: None,
            close_deadline: None,
        }
    }

    /// Reads what the socket has now, up to a batch.
    fn read_batch(&mut self, cx: &mut Context<'_>) -> (Vec<Bytes>, bool) {
        let mut batch = Vec::new();
        let mut text = false;
        while !self.read_closed && batch.len() < READ_BATCH {
            match self.ws.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Message::Binary(msg)))) => batch.push(self.arena.keep(&msg)),
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    text = true;
                    break;
                }
                // tungstenite answers WebSocket pings itself.
                Poll::Ready(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Poll::Ready(Some(Ok(Message::Close(_)))) | Poll::Ready(None) => {
                    self.read_closed = true;
                }
                // The socket ended without a WebSocket Close: a transport
                // loss, not something to answer.
                Poll::Ready(Some(Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                )))) => {
                    self.read_closed = true;
                }
                // The peer sent something the WebSocket layer refuses (an
                // oversized or malformed message): tell it why, then close.
                Poll::Ready(Some(Err(
                    error @ (tungstenite::Error::Capacity(_)
                    | tungstenite::Error::Protocol(_)
                    | tungstenite::Error::Utf8(_)),
                ))) => {
                    self.read_closed = true;
                    let code = match error {
                        tungstenite::Error::Capacity(_) => CloseCode::FRAME_SIZE_ERROR,
                        _ => CloseCode::PROTOCOL_ERROR,
                    };
                    self.violation = Some((code, error.to_string()));
                }
                Poll::Ready(Some(Err(error))) => {
                    self.read_closed = true;
                    self.transport_error.get_or_insert(error);
                }
                Poll::Pending => break,
            }
        }
        (batch, text)
    }

    /// Hands the batch in, fires due timers and takes frames out. Returns
    /// whether the state machine has still more to send, and its deadline.
    fn exchange(&mut self, cx: &mut Context<'_>, batch: Vec<Bytes>, text: bool) -> Turn {
        let mut inner = self.shared.lock();
        let now = now();
        let received = !batch.is_empty();
        for msg in batch {
            inner.conn.handle_message(now, msg);
        }
        if text {
            inner
                .conn
                .close(CloseCode::PROTOCOL_ERROR, "text WebSocket message");
        }
        if let Some((code, reason)) = self.violation.take() {
            inner.conn.handle_transport_violation(code, &reason);
        } else if self.read_closed || self.transport_error.is_some() {
            inner.conn.handle_transport_closed();
        }
        if inner
            .conn
            .poll_timeout()
            .is_some_and(|deadline| deadline <= now)
        {
            inner.conn.handle_timeout(now);
        }
        let mut taken = 0;
        while self.outbox_bytes < WRITE_BATCH_BYTES {
            let Some(msg) = inner.conn.poll_transmit(now) else {
                break;
            };
            taken += msg.len();
            self.outbox_bytes += msg.len();
            self.outbox.push_back(msg);
        }
        inner.dispatch();
        inner.driver = Some(cx.waker().clone());
        Turn {
            progress: received || taken > 0,
            more: inner.conn.wants_transmit(),
            deadline: inner.conn.poll_timeout(),
            closed: inner.conn.is_closed(),
        }
    }

    /// Gives queued frames to the socket while it takes them.
    fn write_outbox(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while !self.outbox.is_empty() && self.transport_error.is_none() {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => {
                    self.transport_error = Some(error);
                    break;
                }
                Poll::Pending => break,
            }
            let Some(msg) = self.outbox.pop_front() else {
                break;
            };
            self.outbox_bytes -= msg.len();
            if let Err(error) = self.ws.start_send_unpin(Message::Binary(msg)) {
                self.transport_error = Some(error);
                break;
            }
            self.unflushed = true;
            progress = true;
        }
        progress
    }

    fn flush(&mut self, cx: &mut Context<'_>) {
        if !self.unflushed || self.transport_error.is_some() {
            return;
        }
        match self.ws.poll_flush_unpin(cx) {
            Poll::Ready(Ok(())) => self.unflushed = false,
            Poll::Ready(Err(error)) => self.transport_error = Some(error),
            Poll::Pending => {}
        }
    }

    /// Arms the timer for `deadline`; true if it already fired.
    fn poll_timer(&mut self, cx: &mut Context<'_>, deadline: Option<Instant>) -> bool {
        let deadline = match (deadline, self.close_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(deadline) = deadline else {
            self.armed = None;
            return false;
        };
        if self.armed != Some(deadline) {
            self.armed = Some(deadline);
            self.timer.as_mut().reset(deadline.into());
        }
        self.timer.as_mut().poll(cx).is_ready()
    }

    /// Once the state machine is closed: let its last frames leave, close the
    /// WebSocket, and resolve. [`CLOSE_GRACE`] after the close at the latest,
    /// so a peer that stopped reading cannot hold the driver.
    fn poll_finish(&mut self, cx: &mut Context<'_>, more: bool) -> Poll<Result<(), DriverError>> {
        let deadline = *self
            .close_deadline
            .get_or_insert_with(|| now() + CLOSE_GRACE);
        let sent = self.outbox.is_empty() && !more && !self.unflushed;
        let done = self.transport_error.is_some()
            || now() >= deadline
            || (sent && self.ws.poll_close_unpin(cx).is_ready());
        if !done {
            return Poll::Pending;
        }
        let reason = self.shared.lock().conn.close_reason().cloned();
        Poll::Ready(match (reason, self.transport_error.take()) {
            (Some(ConnectionError::LocallyClosed { code, .. }), _)
            | (Some(ConnectionError::PeerClosed { code, .. }), _)
                if code == CloseCode::NO_ERROR =>
            {
                Ok(())
            }
            (Some(ConnectionError::TransportClosed), Some(error)) | (None, Some(error)) => {
                Err(DriverError::WebSocket(error))
            }
            (Some(reason), _) => Err(DriverError::Connection(reason)),
            (None, None) => Err(DriverError::Connection(ConnectionError::TransportClosed)),
        })
    }
}

impl<S> Drop for Driver<S> {
    /// A driver dropped before it resolved (its task aborted, say) takes the
    /// transport with it: fail the connection so that no stream or
    /// `Tunnel::closed` waits forever.
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.conn.handle_transport_closed();
        inner.dispatch();
    }
}

/// What one turn of the driver found.
struct Turn {
    progress: bool,
    more: bool,
    deadline: Option<Instant>,
    closed: bool,
}

impl<S> Future for Driver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Result<(), DriverError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        for _ in 0..TURNS_PER_POLL {
            let (batch, text) = this.read_batch(cx);
            let turn = this.exchange(cx, batch, text);
            let wrote = this.write_outbox(cx);
            if this.outbox.is_empty() && !turn.more {
                this.flush(cx);
            }
            if turn.closed
                && let Poll::Ready(result) = this.poll_finish(cx, turn.more)
            {
                return Poll::Ready(result);
            }
            let fired = this.poll_timer(cx, turn.deadline);
            let more_to_write = turn.more && this.outbox.is_empty();
            if !(turn.progress || wrote || fired || more_to_write) {
                return Poll::Pending;
            }
        }
        // Plenty done this time: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
