//! One tunnel stream as `AsyncRead + AsyncWrite`.
//!
//! A `TunnelStream` only copies bytes in and out of the state machine and
//! registers wakers; framing and flow control happen in the driver. Dropping
//! it releases the stream: bytes already written are still delivered and
//! FIN follows, as when a TCP socket is closed.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Shared;
use crate::{ConnectionError, ReadError, ResetCode, StreamId, WriteError};

/// A bidirectional stream inside a tunnel.
#[derive(Debug)]
pub struct TunnelStream {
    id: StreamId,
    shared: Arc<Shared>,
}

impl TunnelStream {
    pub(crate) fn new(id: StreamId, shared: Arc<Shared>) -> TunnelStream {
        TunnelStream { id, shared }
    }

    /// The stream's id within its tunnel.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Waits until the peer accepted this stream (for streams this side
    /// opened; incoming streams are accepted already).
    pub async fn accepted(&self) -> io::Result<()> {
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            // A write of nothing reports a reset or a lost tunnel without
            // changing anything.
            match inner.conn.write(self.id, &[]) {
                Ok(_) | Err(WriteError::Finished) => {}
                Err(e) => return Poll::Ready(Err(write_error(e))),
            }
            if !inner.conn.is_awaiting_accept(self.id) {
                return Poll::Ready(Ok(()));
            }
            inner.openers.insert(self.id, cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Abandons the stream in both directions with `code`.
    pub fn reset(&mut self, code: ResetCode, reason: &str) {
        let mut inner = self.shared.lock();
        inner.conn.reset(self.id, code, reason);
        inner.dispatch();
    }
}

impl TunnelStream {
    /// Takes received bytes without copying them: appends the chunks the
    /// tunnel holds for this stream to `out`, at most `max` bytes, and
    /// returns how many bytes it appended. `Ready(Ok(0))` with `max > 0` is
    /// the end of the stream. Reading returns the bytes' credit to the peer,
    /// as [`AsyncRead::poll_read`] does.
    pub fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        self.poll_take(cx, max, |chunk| out.push(chunk))
    }

    /// Reads chunks of at most `max` bytes in all, handing each to `put`.
    fn poll_take(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        mut put: impl FnMut(Bytes),
    ) -> Poll<io::Result<usize>> {
        let mut inner = self.shared.lock();
        let mut taken = 0;
        let result = loop {
            if taken == max {
                break Poll::Ready(Ok(taken));
            }
            match inner.conn.read(self.id, max - taken) {
                Ok(Some(chunk)) => {
                    taken += chunk.len();
                    put(chunk);
                }
                Ok(None) => break Poll::Ready(Ok(taken)),
                Err(_) if taken > 0 => break Poll::Ready(Ok(taken)),
                Err(ReadError::Blocked) => {
                    inner.readers.insert(self.id, cx.waker().clone());
                    break Poll::Pending;
                }
                Err(e) => break Poll::Ready(Err(read_error(e))),
            }
        };
        if taken > 0 {
            inner.dispatch();
        }
        result
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let max = buf.remaining();
        self.poll_take(cx, max, |chunk| buf.put_slice(&chunk))
            .map_ok(|_| ())
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = self.shared.lock();
        match inner.conn.write(self.id, data) {
            Ok(n) => {
                inner.dispatch();
                Poll::Ready(Ok(n))
            }
            Err(WriteError::Blocked) => {
                inner.writers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(write_error(e))),
        }
    }

    /// Bytes are handed to the tunnel on write; there is nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-closes: FIN follows the bytes already written.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.shared.lock();
        let result = match inner.conn.finish(self.id) {
            Ok(()) | Err(WriteError::Finished) => Ok(()),
            Err(e) => Err(write_error(e)),
        };
        inner.dispatch();
        Poll::Ready(result)
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.conn.release(self.id);
        inner.readers.remove(&self.id);
        inner.writers.remove(&self.id);
        inner.openers.remove(&self.id);
        inner.dispatch();
    }
}

fn read_error(error: ReadError) -> io::Error {
    match error {
        ReadError::Blocked => io::ErrorKind::WouldBlock.into(),
        ReadError::UnknownStream(_) => io::Error::new(io::ErrorKind::NotConnected, error),
        ReadError::Reset { code, reason } => reset_error(code, &reason),
        ReadError::ConnectionLost(e) => lost_error(e),
    }
}

fn write_error(error: WriteError) -> io::Error {
    match error {
        WriteError::Blocked => io::ErrorKind::WouldBlock.into(),
        WriteError::UnknownStream(_) | WriteError::Finished | WriteError::NotAccepted(_) => {
            io::Error::new(io::ErrorKind::BrokenPipe, error)
        }
        WriteError::Reset { code, reason } => reset_error(code, &reason),
        WriteError::ConnectionLost(e) => lost_error(e),
    }
}

/// The peer's code and reason, so that whoever reads the error learns why
/// (for example "service 'x' is not allow-listed on this device").
fn reset_error(code: ResetCode, reason: &str) -> io::Error {
    let message = if reason.is_empty() {
        format!("stream reset: {code}")
    } else {
        format!("stream reset: {code}: {reason}")
    };
    io::Error::new(io::ErrorKind::ConnectionReset, message)
}

fn lost_error(error: ConnectionError) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, error)
}
