//! The state of one stream: its two directions, their buffers and credit.
//!
//! A stream is two independent directions. The send side holds bytes the
//! application wrote that have not been framed yet, and the credit the peer
//! granted. The receive side holds bytes that arrived and were not read yet,
//! and the credit this side owes back. Nothing here touches the connection's
//! queues; `Connection` moves frames, this module keeps the books.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::send_buffer::SendBuffer;

use crate::codes::ResetCode;
use crate::service::ServiceHeader;

/// Payloads smaller than this are copied together instead of kept as they
/// came: a buffered chunk then always carries at least this many bytes per
/// bookkeeping entry, or is the single growing tail.
const COALESCE_BELOW: usize = 1024;

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
    pub(crate) send_buf: SendBuffer,
    /// Bytes this side may still send before the peer grants more.
    pub(crate) send_credit: u64,
    /// A write found the buffer full; tell the application when it drains.
    pub(crate) write_blocked: bool,
    /// The stream waits in the connection's `blocked_writers` queue.
    pub(crate) awaits_tunnel_room: bool,
    /// The stream is in the connection's round-robin send queue.
    pub(crate) queued: bool,
    /// A bulk service's stream ([`crate::Service::is_bulk`]): it waits in
    /// the bulk send queue, behind the interactive one.
    pub(crate) bulk: bool,

    /// Bytes received and not read yet, in arrival order: large payloads as
    /// they came, small ones gathered in `recv_tail` (which logically follows
    /// `recv_buf`), so that a peer sending one-byte frames cannot make this
    /// side keep one allocation per byte.
    pub(crate) recv_buf: VecDeque<Bytes>,
    recv_tail: BytesMut,
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
    pub(crate) fn new(
        opening: Opening,
        send_credit: u32,
        recv_window: u32,
        now: Instant,
    ) -> Stream {
        Stream {
            opening,
            header: None,
            send: SendState::Open,
            recv: RecvState::Open,
            reset: None,
            released: false,
            send_buf: SendBuffer::default(),
            send_credit: send_credit.into(),
            write_blocked: false,
            awaits_tunnel_room: false,
            queued: false,
            bulk: false,
            recv_buf: VecDeque::new(),
            recv_tail: BytesMut::new(),
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

    /// Both directions finished and every received byte read, or reset.
    pub(crate) fn is_finished(&self) -> bool {
        self.reset.is_some()
            || (self.send == SendState::FinSent
                && self.recv == RecvState::FinReceived
                && self.recv_buffered == 0)
    }

    /// Appends received bytes.
    pub(crate) fn push_recv(&mut self, payload: Bytes) {
        self.recv_buffered += payload.len();
        if payload.len() < COALESCE_BELOW {
            self.recv_tail.extend_from_slice(&payload);
            return;
        }
        if !self.recv_tail.is_empty() {
            let tail = self.recv_tail.split().freeze();
            self.recv_buf.push_back(tail);
        }
        self.recv_buf.push_back(payload);
    }

    /// Takes up to `max` bytes from the receive buffer.
    pub(crate) fn take_recv(&mut self, max: usize) -> Option<Bytes> {
        let chunk = match self.recv_buf.front_mut() {
            Some(front) if front.len() <= max => self.recv_buf.pop_front()?,
            Some(front) => front.split_to(max),
            None if self.recv_tail.is_empty() => return None,
            None => {
                let n = self.recv_tail.len().min(max);
                self.recv_tail.split_to(n).freeze()
            }
        };
        self.recv_buffered -= chunk.len();
        Some(chunk)
    }

    /// Drops all received bytes, returning how many there were.
    pub(crate) fn clear_recv(&mut self) -> usize {
        let dropped = self.recv_buffered;
        self.recv_buf.clear();
        self.recv_tail.clear();
        self.recv_buffered = 0;
        dropped
    }

    /// Drops everything buffered in both directions, returning how many
    /// received bytes were dropped (they still count as consumed for the
    /// connection window) and how many send bytes were freed.
    pub(crate) fn discard_buffers(&mut self) -> (usize, usize) {
        let received = self.clear_recv();
        let sent = self.send_buf.clear();
        (received, sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)]
    fn stream() -> Stream {
        // The clock value is irrelevant to buffering.
        Stream::new(Opening::Established, 1 << 20, 1 << 20, Instant::now())
    }

    #[test]
    fn tiny_payloads_share_one_buffer_instead_of_one_entry_each() {
        let mut s = stream();
        for i in 0..10_000u32 {
            s.push_recv(Bytes::from(vec![i as u8]));
        }
        assert_eq!(s.recv_buffered, 10_000);
        assert!(
            s.recv_buf.is_empty(),
            "small payloads must not be kept one by one"
        );
        let mut out = Vec::new();
        while let Some(chunk) = s.take_recv(777) {
            out.extend_from_slice(&chunk);
        }
        assert_eq!(out, (0..10_000u32).map(|i| i as u8).collect::<Vec<_>>());
        assert_eq!(s.recv_buffered, 0);
    }

    #[test]
    fn small_and_large_payloads_keep_their_order() {
        let mut s = stream();
        let mut expected = Vec::new();
        for i in 0..50usize {
            let len = if i % 3 == 0 { 5000 } else { 7 };
            let payload: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            expected.extend_from_slice(&payload);
            s.push_recv(Bytes::from(payload));
        }
        // Every kept entry is a large payload or a run of small ones.
        assert!(s.recv_buf.len() <= 34, "{} entries", s.recv_buf.len());
        let mut out = Vec::new();
        while let Some(chunk) = s.take_recv(4096) {
            out.extend_from_slice(&chunk);
        }
        assert_eq!(out, expected);
    }
}
