//! The state of one stream: its two directions, their buffers and credit.
//!
//! A stream is two independent directions. The send side holds bytes the
//! application wrote that have not been framed yet, and the credit the peer
//! granted. The receive side holds bytes that arrived and were not read yet,
//! and the credit this side owes back. Nothing here touches the connection's
//! queues; `Connection` moves frames, this module keeps the books.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};

use crate::codes::ResetCode;
use crate::service::ServiceHeader;

/// Where a stream is in its opening handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// This side sent OPEN; the peer has not accepted yet.
    AwaitingAccept { deadline: Instant },
    /// The peer sent OPEN; this side's application has not accepted yet.
    Incoming,
    /// Both sides know the stream.
    Established,
}

/// The direction this side writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SendState {
    Open,
    /// The application finished; FIN goes out with the last buffered byte.
    FinQueued,
    FinSent,
}

/// The direction this side reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecvState {
    Open,
    /// The peer sent FIN; reads end once the buffer is drained.
    FinReceived,
}

/// A reset, from whichever side, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reset {
    pub(crate) code: ResetCode,
    pub(crate) reason: String,
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) opening: Opening,
    /// The OPEN header of an incoming stream, until the application takes it.
    pub(crate) header: Option<ServiceHeader>,
    pub(crate) send: SendState,
    pub(crate) recv: RecvState,
    /// Set when the peer reset the stream or the open failed; the entry stays
    /// until the application releases it, so that it can learn the code.
    pub(crate) reset: Option<Reset>,
    /// The application dropped its handle: incoming bytes are discarded and
    /// the entry goes once both directions are done.
    pub(crate) released: bool,

    /// Bytes written by the application and not framed yet.
    pub(crate) send_buf: BytesMut,
    /// Bytes this side may still send before the peer grants more.
    pub(crate) send_credit: u64,
    /// A write found the buffer full; tell the application when it drains.
    pub(crate) write_blocked: bool,
    /// The stream is in the connection's round-robin send queue.
    pub(crate) queued: bool,

    /// Bytes received and not read yet, in arrival order.
    pub(crate) recv_buf: VecDeque<Bytes>,
    pub(crate) recv_buffered: usize,
    /// Current size of the receive window, grown by auto-tuning.
    pub(crate) recv_window: u32,
    /// Bytes the peer may still send on this stream.
    pub(crate) recv_credit: u64,
    /// Bytes consumed (read or discarded) and not yet granted back.
    pub(crate) recv_unacked: u32,
    /// When this side last granted credit, to detect a window that limits
    /// throughput.
    pub(crate) last_grant: Instant,
    /// A WINDOW_UPDATE for this stream is waiting to be sent.
    pub(crate) update_queued: bool,
    /// A read found nothing; tell the application when that changes.
    pub(crate) read_blocked: bool,
}

impl Stream {
    pub(crate) fn new(opening: Opening, send_credit: u32, recv_window: u32, now: Instant) -> Stream {
        Stream {
            opening,
            header: None,
            send: SendState::Open,
            recv: RecvState::Open,
            reset: None,
            released: false,
            send_buf: BytesMut::new(),
            send_credit: send_credit.into(),
            write_blocked: false,
            queued: false,
            recv_buf: VecDeque::new(),
            recv_buffered: 0,
            recv_window,
            recv_credit: recv_window.into(),
            recv_unacked: 0,
            last_grant: now,
            update_queued: false,
            read_blocked: false,
        }
    }

    /// True when this side has something to frame: data within credit, or a
    /// FIN (which costs no credit).
    pub(crate) fn has_sendable(&self) -> bool {
        if self.reset.is_some() {
            return false;
        }
        let data = !self.send_buf.is_empty() && self.send_credit > 0;
        let fin = self.send == SendState::FinQueued && self.send_buf.is_empty();
        data || fin
    }

    /// Takes up to `max` bytes from the receive buffer.
    pub(crate) fn take_recv(&mut self, max: usize) -> Option<Bytes> {
        let front = self.recv_buf.front_mut()?;
        let chunk = if front.len() <= max {
            self.recv_buf.pop_front()?
        } else {
            front.split_to(max)
        };
        self.recv_buffered -= chunk.len();
        Some(chunk)
    }

    /// Drops everything buffered in both directions, returning how many
    /// received bytes were dropped (they still count as consumed for the
    /// connection window) and how many send bytes were freed.
    pub(crate) fn discard_buffers(&mut self) -> (usize, usize) {
        let received = self.recv_buffered;
        let sent = self.send_buf.len();
        self.recv_buf.clear();
        self.recv_buffered = 0;
        self.send_buf.advance(sent);
        (received, sent)
    }
}
