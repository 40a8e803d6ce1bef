//! Choosing the next frame to send.
//!
//! Order: control frames (HELLO, PING, OPEN, ACCEPT, RESET, GOAWAY) first,
//! then WINDOW_UPDATEs, then DATA from the streams that have both bytes and
//! credit, one frame each in turn. So a ping or a window update waits behind
//! at most one DATA frame already handed to the transport, and one busy stream
//! cannot starve the others.

use std::time::Instant;

use bytes::{Buf, BufMut};

use super::stream::{RecvState, SendState};
use super::{Connection, Event, State};
use crate::frame::{Frame, HEADER_LEN, StreamId, flags, kind};

impl Connection {
    /// The next message to send, or `None` when there is nothing to send
    /// now. Call again after every `handle_*` call and application call until
    /// it returns `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.now = now;
        let bytes = if self.state == State::Closed {
            self.final_frame.take()?
        } else if let Some(frame) = self.control.pop_front() {
            frame.to_bytes()
        } else if let Some(frame) = self.next_window_update(now) {
            frame.to_bytes()
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
            || !self.send_queue.is_empty()
    }

    fn conn_update_due(&self) -> bool {
        self.recv_conn_unacked >= u64::from(self.config.settings.connection_window / 2)
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
            return Some(Frame::WindowUpdate { stream: StreamId::CONNECTION, increment });
        }
        let srtt = self.keepalive.srtt;
        let max_window = self.config.max_stream_window;
        while let Some(id) = self.window_updates.pop_front() {
            let Some(stream) = self.streams.get_mut(&id) else { continue };
            stream.update_queued = false;
            if stream.recv != RecvState::Open || stream.reset.is_some() || stream.recv_unacked == 0 {
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
            return Some(Frame::WindowUpdate { stream: id, increment });
        }
        None
    }

    /// One DATA frame from the next stream in the round-robin that can send.
    fn next_data(&mut self) -> Option<Vec<u8>> {
        let max_payload = self.config.data_split.min(self.peer_settings().max_frame_payload as usize);
        for _ in 0..self.send_queue.len() {
            let id = self.send_queue.pop_front()?;
            let Some(stream) = self.streams.get_mut(&id) else { continue };
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
                self.send_queue.push_back(id);
                continue;
            }
            let mut out = Vec::with_capacity(HEADER_LEN + len);
            out.put_u8(kind::DATA);
            out.put_u8(if fin { flags::FIN } else { 0 });
            out.put_u32(id.0);
            out.extend_from_slice(&stream.send_buf[..len]);
            stream.send_buf.advance(len);
            stream.send_credit -= len as u64;
            if fin {
                stream.send = SendState::FinSent;
            }
            let globally_full = self.send_buffered >= self.config.max_send_buffer;
            self.send_conn_credit -= len as u64;
            self.send_buffered -= len;
            if stream.write_blocked && len > 0 {
                stream.write_blocked = false;
                self.events.push_back(Event::Writable(id));
            }
            if globally_full && len > 0 {
                self.wake_blocked_writers();
            }
            self.schedule(id);
            self.remove_if_done(id);
            return Some(out);
        }
        None
    }

    fn wake_blocked_writers(&mut self) {
        while let Some(id) = self.blocked_writers.pop_front() {
            if let Some(stream) = self.streams.get_mut(&id) {
                if stream.write_blocked {
                    stream.write_blocked = false;
                    self.events.push_back(Event::Writable(id));
                }
            }
        }
    }
}
