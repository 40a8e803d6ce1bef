//! Timers: handshake deadline, keepalive pings with RTT measurement, the
//! dead-peer deadline and open timeouts.
//!
//! Time only arrives through `handle_timeout` and the `now` of other calls;
//! [`Connection::poll_timeout`] says when the shell must call back.

use std::time::{Duration, Instant};

use super::stream::Opening;
use super::{Connection, ConnectionError, State};
use crate::codes::{CloseCode, ResetCode};
use crate::config::Config;
use crate::frame::Frame;

#[derive(Debug)]
pub(super) struct Keepalive {
    interval: Duration,
    idle_timeout: Duration,
    handshake_deadline: Instant,
    /// When the last frame from the peer arrived.
    last_heard: Instant,
    next_ping: Instant,
    /// The PING awaiting its answer: opaque value and when it was sent.
    in_flight: Option<(u64, Instant)>,
    seq: u64,
    /// Smoothed round-trip time (RFC 6298 weights).
    pub(super) srtt: Option<Duration>,
}

impl Keepalive {
    pub(super) fn new(config: &Config, now: Instant) -> Keepalive {
        Keepalive {
            interval: config.keepalive_interval,
            idle_timeout: config.idle_timeout,
            handshake_deadline: now + config.handshake_timeout,
            last_heard: now,
            next_ping: now + config.keepalive_interval,
            in_flight: None,
            seq: 0,
            srtt: None,
        }
    }

    pub(super) fn heard_from_peer(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// A PING to send, unless one sent less than an interval ago is still
    /// waiting for its answer (an older one is given up as lost).
    pub(super) fn start_ping(&mut self, now: Instant) -> Option<Frame> {
        if self
            .in_flight
            .is_some_and(|(_, sent)| now.saturating_duration_since(sent) < self.interval)
        {
            return None;
        }
        self.seq += 1;
        self.in_flight = Some((self.seq, now));
        Some(Frame::Ping {
            ack: false,
            opaque: self.seq,
        })
    }

    /// Answers to pings this side did not send (or sent long ago) are ignored.
    pub(super) fn on_pong(&mut self, opaque: u64, now: Instant) {
        let Some((seq, sent)) = self.in_flight else {
            return;
        };
        if seq != opaque {
            return;
        }
        self.in_flight = None;
        let sample = now.saturating_duration_since(sent);
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(srtt) => (srtt * 7 + sample) / 8,
        });
    }

    fn idle_deadline(&self) -> Instant {
        self.last_heard + self.idle_timeout
    }
}

impl Connection {
    /// When [`Connection::handle_timeout`] must be called next; `None` once
    /// closed. The value changes after most calls: re-arm the timer each time.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let k = &self.keepalive;
        let deadline = match self.state {
            State::Closed => return None,
            State::Handshaking => k.handshake_deadline,
            State::Open => k.idle_deadline().min(k.next_ping),
        };
        let open_deadline =
            self.pending_opens
                .front()
                .and_then(|id| match self.streams.get(id)?.opening {
                    Opening::AwaitingAccept { deadline } => Some(deadline),
                    _ => None,
                });
        Some(open_deadline.map_or(deadline, |d| d.min(deadline)))
    }

    /// Fires whatever timers are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::Handshaking && now >= self.keepalive.handshake_deadline {
            let wait = self.config.handshake_timeout;
            let reason = format!("no HELLO within {wait:?}");
            let close = Frame::Close {
                code: CloseCode::HANDSHAKE_FAILED,
                reason,
            };
            self.enter_closed(ConnectionError::HandshakeTimeout(wait), Some(close));
            return;
        }
        // While handshaking, the handshake deadline alone applies.
        if self.state == State::Open && now >= self.keepalive.idle_deadline() {
            let idle = self.config.idle_timeout;
            let reason = format!("nothing heard for {idle:?}");
            let close = Frame::Close {
                code: CloseCode::KEEPALIVE_TIMEOUT,
                reason,
            };
            self.enter_closed(ConnectionError::TimedOut(idle), Some(close));
            return;
        }
        if self.state == State::Open && now >= self.keepalive.next_ping {
            self.keepalive.next_ping = now + self.config.keepalive_interval;
            let ping = self.keepalive.start_ping(now);
            self.control.extend(ping);
        }
        self.expire_opens(now);
    }

    /// Starts a PING at `now` (if none is in flight) to refresh the RTT
    /// figure.
    pub fn ping(&mut self, now: Instant) {
        if self.state == State::Open {
            let ping = self.keepalive.start_ping(now);
            self.control.extend(ping);
        }
    }

    fn expire_opens(&mut self, now: Instant) {
        while let Some(&id) = self.pending_opens.front() {
            match self.streams.get(&id).map(|s| s.opening) {
                Some(Opening::AwaitingAccept { deadline }) if deadline > now => break,
                Some(Opening::AwaitingAccept { .. }) => {}
                _ => {
                    self.pending_opens.pop_front();
                    continue;
                }
            }
            self.pending_opens.pop_front();
            let reason = format!("not accepted within {:?}", self.config.open_timeout);
            self.control.push_back(Frame::Reset {
                stream: id,
                code: ResetCode::OPEN_TIMEOUT,
                reason: reason.clone(),
            });
            self.mark_reset(id, ResetCode::OPEN_TIMEOUT, reason);
        }
    }
}
