//! Choosing the next frame to send.
//!
//! Order: control frames (HELLO, PING, OPEN, ACCEPT, RESET, GOAWAY) first,
//! then WINDOW_UPDATEs, then DATA from the streams that have both bytes and
//! credit, one frame each in turn. So a ping or a window update waits behind
//! at most one DATA frame already handed to the transport, and one busy stream
//! cannot starve the others.
//!
//! DATA of interactive streams (editor, control, MQTT, audit) goes before
//! DATA of bulk streams (`tcp:NAME`, snapshots): a bulk stream sends when no
//! interactive stream can, and once after every [`INTERACTIVE_BURST`]
//! interactive frames, so an editor load is not queued behind a bulk
//! transfer and a bulk transfer still moves (at least one frame in
//! `INTERACTIVE_BURST + 1`) under a steady interactive load.

use std::time::Instant;

use bytes::Bytes;

use super::stream::{RecvState, SendState};
use super::{Connection, Event, State};

/// Interactive DATA frames sent in a row, while a bulk stream waits, before
/// the bulk stream gets one.
pub(crate) const INTERACTIVE_BURST: u32 = 8;
use crate::frame::{Frame, StreamId};

impl Connection {
    /// The next message to send, or `None` when there is nothing to send
    /// now. Call again after every `handle_*` call and application call until
    /// it returns `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        let bytes = if self.state == State::Closed {
            Bytes::from(self.final_frame.take()?)
        } else if let Some(frame) = self.control.pop_front() {
            let bytes = Bytes::from(frame.to_bytes());
            if let Frame::Close { .. } = frame {
                // The drained connection's CLOSE left after every frame
                // queued before it.
                let error = self
                    .closing
                    .take()
                    .unwrap_or(super::ConnectionError::TransportClosed);
                self.enter_closed(error, None);
            }
            bytes
        } else if let Some(frame) = self.next_window_update(now) {
            Bytes::from(frame.to_bytes())
        } else {
            self.next_data()?
        };
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        Some(bytes)
    }

    /// True when [`Connection::poll_transmit`] would return something.
    pub fn wants_transmit(&self) -> bool {
        if self.state == State::Closed {
            return self.final_frame.is_some();
        }
        !self.control.is_empty()
            || !self.window_updates.is_empty()
            || self.conn_update_due()
            || self.data_sendable()
    }

    /// True when some queued stream can frame something now. Without
    /// connection credit only a bare FIN can go.
    fn data_sendable(&self) -> bool {
        if self.send_conn_credit > 0 {
            return !self.send_queue.is_empty() || !self.bulk_queue.is_empty();
        }
        self.send_queue
            .iter()
            .chain(&self.bulk_queue)
            .filter_map(|id| self.streams.get(id))
            .any(|s| s.reset.is_none() && s.send == SendState::FinQueued && s.send_buf.is_empty())
    }

    /// Connection credit goes back once the bytes consumed reach half of the
    /// window that unread bytes do not hold (half the whole window when
    /// nothing is buffered). A fixed half-window threshold would stall every
    /// stream for good once unread streams hold more than half the window:
    /// the others could never consume enough to reach it.
    fn conn_update_due(&self) -> bool {
        let unheld = self.recv_conn_credit + self.recv_conn_unacked;
        self.recv_conn_unacked > 0 && self.recv_conn_unacked >= unheld / 2
    }

    /// Credit goes back only for bytes the application consumed, half a
    /// window at a time; a window that was used up within two round trips
    /// is doubled, up to `max_stream_window`, so it tracks the
    /// bandwidth-delay product.
    fn next_window_update(&mut self, now: Instant) -> Option<Frame> {
        if self.conn_update_due() {
            // At most one connection window is ever outstanding, so the
            // increment fits the frame's 31 bits.
            let increment = self.recv_conn_unacked as u32;
            self.recv_conn_credit += self.recv_conn_unacked;
            self.recv_conn_unacked = 0;
            return Some(Frame::WindowUpdate {
                stream: StreamId::CONNECTION,
                increment,
            });
        }
        let srtt = self.keepalive.srtt;
        let max_window = self.config.max_stream_window;
        while let Some(id) = self.window_updates.pop_front() {
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            stream.update_queued = false;
            if stream.recv != RecvState::Open || stream.reset.is_some() || stream.recv_unacked == 0
            {
                continue;
            }
            let mut growth = 0;
            if let Some(srtt) = srtt {
                let fast = now.saturating_duration_since(stream.last_grant) < srtt * 2;
                if fast && stream.recv_window < max_window {
                    let grown = stream.recv_window.saturating_mul(2).min(max_window);
                    growth = grown - stream.recv_window;
                    stream.recv_window = grown;
                }
            }
            let increment = stream.recv_unacked + growth;
            stream.recv_credit += u64::from(increment);
            stream.recv_unacked = 0;
            stream.last_grant = now;
            return Some(Frame::WindowUpdate {
                stream: id,
                increment,
            });
        }
        None
    }

    /// One DATA frame: from the interactive queue first, unless a bulk
    /// stream has waited for [`INTERACTIVE_BURST`] interactive frames.
    fn next_data(&mut self) -> Option<Bytes> {
        let bulk_turn = self.interactive_run >= INTERACTIVE_BURST && !self.bulk_queue.is_empty();
        for bulk in [bulk_turn, !bulk_turn] {
            if let Some(out) = self.next_data_from(bulk) {
                self.interactive_run = if bulk || self.bulk_queue.is_empty() {
                    0
                } else {
                    self.interactive_run + 1
                };
                return Some(out);
            }
        }
        None
    }

    fn queue(&mut self, bulk: bool) -> &mut std::collections::VecDeque<StreamId> {
        if bulk {
            &mut self.bulk_queue
        } else {
            &mut self.send_queue
        }
    }

    /// One DATA frame from the next stream in one queue's round-robin that
    /// can send.
    fn next_data_from(&mut self, bulk: bool) -> Option<Bytes> {
        let max_payload = self.data_split();
        for _ in 0..self.queue(bulk).len() {
            let id = self.queue(bulk).pop_front()?;
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            stream.queued = false;
            if !stream.has_sendable() {
                continue;
            }
            let credit = stream.send_credit.min(self.send_conn_credit);
            let len = stream.send_buf.len().min(max_payload).min(credit as usize);
            let fin = stream.send == SendState::FinQueued && len == stream.send_buf.len();
            if len == 0 && !fin {
                // Out of connection credit: keep the stream's turn for later.
                stream.queued = true;
                self.queue(bulk).push_back(id);
                continue;
            }
            let fin_queued = stream.send == SendState::FinQueued;
            // The frame may carry less than `len` (one buffered chunk); FIN
            // goes only with the very last byte.
            let (out, len) = stream
                .send_buf
                .take_frame(id, len, fin_queued, &mut self.send_arena);
            stream.send_credit -= len as u64;
            if fin_queued && stream.send_buf.is_empty() {
                stream.send = SendState::FinSent;
            }
            self.send_conn_credit -= len as u64;
            self.send_buffered -= len;
            // Writers wake once half their buffer is free, not for every
            // frame: one wake-up per 16 KiB would cost more than the copy.
            if stream.write_blocked
                && stream.send_buf.len() <= self.config.max_stream_send_buffer / 2
            {
                stream.write_blocked = false;
                self.events.push_back(Event::Writable(id));
            }
            if !self.blocked_writers.is_empty()
                && self.send_buffered <= self.config.max_send_buffer / 2
            {
                self.wake_blocked_writers();
            }
            self.schedule(id);
            self.remove_if_done(id);
            return Some(out);
        }
        None
    }

    pub(super) fn wake_blocked_writers(&mut self) {
        while let Some(id) = self.blocked_writers.pop_front() {
            if let Some(stream) = self.streams.get_mut(&id) {
                stream.awaits_tunnel_room = false;
                if stream.write_blocked {
                    stream.write_blocked = false;
                    self.events.push_back(Event::Writable(id));
                }
            }
        }
    }
}
