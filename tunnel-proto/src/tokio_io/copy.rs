//! Carrying a tunnel stream to a local connection and back: the bytes of
//! both directions copied until both end, half-closes passed on.
//!
//! `tokio::io::copy_bidirectional` would copy each received chunk into its
//! own buffer first and write it with one system call per buffer. Here the
//! stream's received chunks, already in memory, go to the other side as
//! they are, gathered into one vectored write of up to [`GATHER`] bytes: one
//! copy of every byte and fewer system calls on the hottest path of a bulk
//! transfer (`docs/benchmarks.md`). The other direction reads into a buffer
//! of its own and writes it to the stream, as tokio does.
//!
//! This module only moves bytes: it never opens, refuses or resets a stream
//! and never logs; an error ends both directions and is returned.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::TunnelStream;

/// Most received bytes taken from the stream before they are written out.
/// They stay counted against nothing: the stream's credit returns when they
/// are taken, so this also bounds what the copy itself holds.
pub const GATHER: usize = 256 * 1024;
/// Most chunks in one vectored write (a 16 KiB frame each at most, so
/// [`GATHER`] worth; `IOV_MAX` is 1024 on Linux).
const MAX_SLICES: usize = 64;
/// The buffer of the direction towards the tunnel.
pub const BUFFER: usize = 64 * 1024;

/// Copies between `stream` and `other` until both directions have ended.
/// Returns the bytes carried from the stream to `other` and from `other` to
/// the stream. When one direction ends, the other side's write half is shut
/// down, as a TCP half-close; the first error ends both.
pub async fn copy_bidirectional<T>(
    stream: &mut TunnelStream,
    other: &mut T,
) -> io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut out = Outward::default();
    let mut back = Backward::new(BUFFER);
    poll_fn(|cx| {
        let out_done = out.poll(cx, stream, other)?;
        let back_done = back.poll(cx, other, stream)?;
        match (out_done, back_done) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok((out.carried, back.carried))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// From the stream to the other side: chunks as they are.
#[derive(Default)]
struct Outward {
    chunks: Vec<Bytes>,
    pending: usize,
    eof: bool,
    shut: bool,
    carried: u64,
}

impl Outward {
    fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut TunnelStream,
        other: &mut T,
    ) -> Poll<io::Result<()>>
    where
        T: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            // Take what has arrived, up to the gather size.
            if !self.eof && self.pending < GATHER {
                match stream.poll_read_chunks(cx, &mut self.chunks, GATHER - self.pending) {
                    Poll::Ready(Ok(0)) => self.eof = true,
                    Poll::Ready(Ok(n)) => {
                        self.pending += n;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending if self.pending == 0 => return Poll::Pending,
                    Poll::Pending => {}
                }
            }
            if self.pending > 0 {
                // On the stack: this runs for every write of a bulk transfer.
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut used = 0;
                for (slice, chunk) in slices.iter_mut().zip(&self.chunks) {
                    *slice = IoSlice::new(chunk);
                    used += 1;
                }
                let n = ready!(Pin::new(&mut *other).poll_write_vectored(cx, &slices[..used]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.advance(n);
                continue;
            }
            if self.eof && !self.shut {
                ready!(Pin::new(&mut *other).poll_shutdown(cx))?;
                self.shut = true;
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// Drops the first `n` bytes written.
    fn advance(&mut self, mut n: usize) {
        self.pending -= n;
        self.carried += n as u64;
        let mut done = 0;
        for chunk in &mut self.chunks {
            if n < chunk.len() {
                chunk.advance(n);
                break;
            }
            n -= chunk.len();
            done += 1;
        }
        self.chunks.drain(..done);
    }
}

/// From the other side to the stream, through a buffer.
struct Backward {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    shut: bool,
    carried: u64,
}

impl Backward {
    fn new(size: usize) -> Backward {
        Backward {
            buf: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            shut: false,
            carried: 0,
        }
    }

    fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        other: &mut T,
        stream: &mut TunnelStream,
    ) -> Poll<io::Result<()>>
    where
        T: AsyncRead + Unpin + ?Sized,
    {
        loop {
            if self.start == self.end && !self.eof {
                let mut read = ReadBuf::new(&mut self.buf);
                ready!(Pin::new(&mut *other).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    self.start = 0;
                    self.end = n;
                }
            }
            if self.start < self.end {
                let n =
                    ready!(Pin::new(&mut *stream).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.carried += n as u64;
                continue;
            }
            if self.eof && !self.shut {
                ready!(Pin::new(&mut *stream).poll_shutdown(cx))?;
                self.shut = true;
            }
            return Poll::Ready(Ok(()));
        }
    }
}
