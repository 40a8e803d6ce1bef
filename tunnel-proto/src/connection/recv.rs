//! Handling of frames from the peer.
//!
//! Every rule a peer can break is checked here, each next to the clause of
//! `docs/protocol.md` it enforces, and every broken rule becomes a CLOSE with a
//! code and a reason. Nothing in this file panics on peer input.

use std::time::Instant;

use bytes::Bytes;

use super::stream::{Opening, RecvState, Stream};
use super::{Connection, ConnectionError, Event, State};
use crate::codes::{CloseCode, ResetCode};
use crate::frame::{Frame, HEADER_LEN, StreamId};
use crate::hello::{Hello, PROTOCOL_MAJOR};
use crate::service::{Service, ServiceHeader};

/// A rule the peer broke: the connection closes with this code and reason.
struct Violation {
    code: CloseCode,
    reason: String,
}

fn violation(code: CloseCode, reason: impl Into<String>) -> Violation {
    Violation {
        code,
        reason: reason.into(),
    }
}

impl Connection {
    /// Handles one message (one frame) from the peer.
    pub fn handle_message(&mut self, now: Instant, msg: Bytes) {
        if self.state == State::Closed {
            return;
        }
        self.keepalive.heard_from_peer(now);
        self.stats.frames_received += 1;
        self.stats.bytes_received += msg.len() as u64;
        if let Err(v) = self
            .dispatch(now, msg)
            .and_then(|()| self.check_control_backlog())
        {
            self.fail(v.code, v.reason);
        }
    }

    fn dispatch(&mut self, now: Instant, msg: Bytes) -> Result<(), Violation> {
        // "A frame larger than the receiver's max_frame_payload is a
        // FRAME_SIZE_ERROR" (protocol.md, Limits).
        let limit = self.config.settings.max_frame_payload as usize;
        if msg.len() > HEADER_LEN + limit {
            let size = msg.len() - HEADER_LEN;
            return Err(violation(
                CloseCode::FRAME_SIZE_ERROR,
                format!("frame payload of {size} bytes exceeds the limit of {limit}"),
            ));
        }
        let frame = Frame::decode(&msg).map_err(|e| violation(e.close_code(), e.to_string()))?;
        if self.state == State::Handshaking {
            return match frame {
                Frame::Hello(hello) => self.on_hello(hello),
                // A peer may refuse this side before sending its own HELLO
                // (for example over the version in ours): take its reason.
                Frame::Close { code, reason } => {
                    self.enter_closed(ConnectionError::PeerClosed { code, reason }, None);
                    Ok(())
                }
                other => Err(violation(
                    CloseCode::HANDSHAKE_FAILED,
                    format!(
                        "expected HELLO as the first frame, got type 0x{:02x}",
                        other.kind()
                    ),
                )),
            };
        }
        match frame {
            Frame::Hello(_) => Err(violation(CloseCode::PROTOCOL_ERROR, "second HELLO")),
            Frame::Open { stream, header } => {
                self.on_open(now, stream, header, msg.len() - HEADER_LEN)
            }
            Frame::Accept { stream } => self.on_accept(stream),
            Frame::Data {
                stream,
                fin,
                payload,
            } => self.on_data(stream, fin, payload),
            Frame::WindowUpdate { stream, increment } => self.on_window_update(stream, increment),
            Frame::Reset {
                stream,
                code,
                reason,
            } => self.on_reset(stream, code, reason),
            Frame::Ping { ack, opaque } => self.on_ping(now, ack, opaque),
            Frame::GoAway {
                last_stream,
                code,
                reason,
            } => {
                self.on_goaway(last_stream, code, reason);
                Ok(())
            }
            Frame::Close { code, reason } => {
                self.enter_closed(ConnectionError::PeerClosed { code, reason }, None);
                Ok(())
            }
            Frame::Ignored { .. } => Ok(()),
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), Violation> {
        if hello.major != PROTOCOL_MAJOR {
            let error = ConnectionError::VersionMismatch {
                major: hello.major,
                minor: hello.minor,
            };
            let reason = format!(
                "this side speaks protocol {}.{}, the peer {}.{}",
                crate::PROTOCOL_MAJOR,
                crate::PROTOCOL_MINOR,
                hello.major,
                hello.minor
            );
            let close = Frame::Close {
                code: CloseCode::VERSION_MISMATCH,
                reason,
            };
            self.enter_closed(error, Some(close));
            return Ok(());
        }
        if hello.role != self.config.role.peer() {
            return Err(violation(
                CloseCode::HANDSHAKE_FAILED,
                format!("both ends claim the role {:?}", hello.role),
            ));
        }
        self.send_conn_credit = hello.settings.connection_window.into();
        self.peer = Some(hello);
        self.state = State::Open;
        self.events.push_back(Event::Connected);
        // A shutdown requested during the handshake completes now.
        self.check_drained();
        Ok(())
    }

    fn on_open(
        &mut self,
        now: Instant,
        id: StreamId,
        header: ServiceHeader,
        size: usize,
    ) -> Result<(), Violation> {
        let limit = self.config.settings.max_open_payload as usize;
        if size > limit {
            return Err(violation(
                CloseCode::LIMIT_EXCEEDED,
                format!("OPEN payload of {size} bytes exceeds the limit of {limit}"),
            ));
        }
        // "Stream ids opened by a peer have its parity and strictly increase."
        let parity = self.config.role.peer().stream_parity();
        if id.0 % 2 != parity || id.0 <= self.highest_peer {
            return Err(violation(
                CloseCode::PROTOCOL_ERROR,
                format!("OPEN for stream {id}, which the peer may not open now"),
            ));
        }
        self.highest_peer = id.0;
        if let Some(code) = self.refusal(&header) {
            let reason = code.name().unwrap_or_default().to_string();
            self.control.push_back(Frame::Reset {
                stream: id,
                code,
                reason,
            });
            return self.check_control_backlog();
        }
        let mut stream = Stream::new(
            Opening::Incoming,
            self.peer_settings().initial_stream_window,
            self.config.settings.initial_stream_window,
            now,
        );
        stream.bulk = header.service.is_bulk();
        stream.header = Some(header);
        self.streams.insert(id, stream);
        self.incoming.push_back(id);
        self.events.push_back(Event::Incoming);
        Ok(())
    }

    /// Why an incoming OPEN is refused before the application sees it.
    fn refusal(&self, header: &ServiceHeader) -> Option<ResetCode> {
        let parity = self.config.role.peer().stream_parity();
        let peer_streams = self.streams.keys().filter(|id| id.0 % 2 == parity).count();
        if self.draining.is_some() {
            Some(ResetCode::GOING_AWAY)
        } else if matches!(header.service, Service::Other { .. }) {
            Some(ResetCode::UNKNOWN_SERVICE)
        } else if peer_streams >= self.config.settings.max_concurrent_streams as usize
            || self.incoming.len() >= self.config.accept_backlog
        {
            Some(ResetCode::STREAM_LIMIT)
        } else {
            None
        }
    }

    fn on_accept(&mut self, id: StreamId) -> Result<(), Violation> {
        self.check_known_or_closed(id)?;
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if stream.reset.is_some() {
            return Ok(());
        }
        match stream.opening {
            Opening::AwaitingAccept { .. } => {
                stream.opening = Opening::Established;
                self.pending_opens.retain(|&p| p != id);
                self.events.push_back(Event::Accepted(id));
                Ok(())
            }
            _ => Err(violation(
                CloseCode::PROTOCOL_ERROR,
                format!("ACCEPT for stream {id}, which is not awaiting one"),
            )),
        }
    }

    fn on_data(&mut self, id: StreamId, fin: bool, payload: Bytes) -> Result<(), Violation> {
        self.check_known_or_closed(id)?;
        let len = payload.len() as u64;
        // "The connection window counts every DATA byte, whatever the
        // stream's state" (protocol.md, Flow control).
        if len > self.recv_conn_credit {
            return Err(violation(
                CloseCode::FLOW_CONTROL_ERROR,
                format!(
                    "{len} bytes of DATA exceed the connection window ({} left)",
                    self.recv_conn_credit
                ),
            ));
        }
        self.recv_conn_credit -= len;
        let Some(stream) = self.streams.get_mut(&id) else {
            // A stream already closed on this side: the bytes are consumed.
            self.return_conn_credit(len);
            return Ok(());
        };
        if stream.reset.is_some() {
            self.return_conn_credit(len);
            return Ok(());
        }
        if stream.recv == RecvState::FinReceived {
            return Err(violation(
                CloseCode::PROTOCOL_ERROR,
                format!("DATA on stream {id} after FIN"),
            ));
        }
        if len > stream.recv_credit {
            return Err(violation(
                CloseCode::FLOW_CONTROL_ERROR,
                format!(
                    "{len} bytes of DATA on stream {id} exceed its window ({} left)",
                    stream.recv_credit
                ),
            ));
        }
        stream.recv_credit -= len;
        let released = stream.released;
        if !payload.is_empty() && !released {
            stream.push_recv(payload);
        }
        if fin {
            stream.recv = RecvState::FinReceived;
        }
        if stream.read_blocked && (len > 0 || fin) {
            stream.read_blocked = false;
            self.events.push_back(Event::Readable(id));
        }
        if released && len > 0 {
            self.consume(id, len as usize);
        }
        self.remove_if_done(id);
        Ok(())
    }

    fn on_window_update(&mut self, id: StreamId, increment: u32) -> Result<(), Violation> {
        let increment = u64::from(increment);
        if id.is_connection() {
            self.send_conn_credit += increment;
            if self.send_conn_credit > u64::from(crate::MAX_WINDOW) {
                return Err(violation(
                    CloseCode::FLOW_CONTROL_ERROR,
                    "connection window above 2^31-1",
                ));
            }
            return Ok(());
        }
        self.check_known_or_closed(id)?;
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        stream.send_credit += increment;
        if stream.send_credit > u64::from(crate::MAX_WINDOW) {
            return Err(violation(
                CloseCode::FLOW_CONTROL_ERROR,
                format!("window of stream {id} above 2^31-1"),
            ));
        }
        self.schedule(id);
        Ok(())
    }

    fn on_reset(
        &mut self,
        id: StreamId,
        code: crate::ResetCode,
        reason: String,
    ) -> Result<(), Violation> {
        self.check_known_or_closed(id)?;
        self.mark_reset(id, code, reason);
        Ok(())
    }

    fn on_goaway(&mut self, last_stream: StreamId, code: CloseCode, reason: String) {
        // A repeated GOAWAY may only lower `last_stream`; one event is enough
        // (and a flood of them must not grow the event queue).
        let first = !self.peer_goaway;
        self.peer_goaway = true;
        // Streams this side opened above `last_stream` were not processed and
        // never will be: fail them now so the application can retry them.
        let parity = self.config.role.stream_parity();
        let unprocessed: Vec<StreamId> = self
            .streams
            .keys()
            .filter(|id| id.0 % 2 == parity && id.0 > last_stream.0)
            .copied()
            .collect();
        for id in unprocessed {
            self.mark_reset(id, ResetCode::GOING_AWAY, "the peer is going away".into());
        }
        if first {
            self.events.push_back(Event::GoAway { code, reason });
        }
    }

    /// A frame may name a live stream, or one that existed and is closed; a
    /// stream the peer could have opened but never did is an error (RFC 9113
    /// §5.1, "idle" streams).
    fn check_known_or_closed(&self, id: StreamId) -> Result<(), Violation> {
        if self.streams.contains_key(&id) {
            return Ok(());
        }
        let ours = id.0 % 2 == self.config.role.stream_parity();
        let existed = if ours {
            self.next_local.is_none_or(|next| id.0 < next)
        } else {
            id.0 <= self.highest_peer
        };
        if existed {
            Ok(())
        } else {
            Err(violation(
                CloseCode::PROTOCOL_ERROR,
                format!("frame for stream {id}, which was never opened"),
            ))
        }
    }

    /// A peer that keeps sending frames needing an answer (PINGs, OPENs that
    /// get an ACCEPT or a RESET) while not reading the answers is cut off
    /// instead of queuing without bound. Checked after every message, so
    /// answers queued by the application in between are counted too.
    fn check_control_backlog(&self) -> Result<(), Violation> {
        if self.control.len() > self.config.max_pending_control {
            return Err(violation(
                CloseCode::LIMIT_EXCEEDED,
                format!(
                    "more than {} control frames waiting for the peer to read",
                    self.config.max_pending_control
                ),
            ));
        }
        Ok(())
    }

    fn on_ping(&mut self, now: Instant, ack: bool, opaque: u64) -> Result<(), Violation> {
        if ack {
            self.keepalive.on_pong(opaque, now);
            return Ok(());
        }
        self.control.push_back(Frame::Ping { ack: true, opaque });
        Ok(())
    }
}
