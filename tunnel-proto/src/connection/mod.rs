//! The tunnel state machine: one [`Connection`] per WebSocket.
//!
//! A `Connection` owns every stream of a tunnel, their windows and buffers,
//! the handshake, keepalive and shutdown. It never performs I/O and never reads
//! the clock: the shell feeds it messages ([`Connection::handle_message`]) and
//! time ([`Connection::handle_timeout`]), and drains what it produces:
//!
//! - [`Connection::poll_transmit`]: the next message to send, control frames
//!   first, then DATA round-robin across streams;
//! - [`Connection::poll_event`]: what the application should react to;
//! - [`Connection::poll_timeout`]: when to call `handle_timeout` next.
//!
//! After any `handle_*` call or application call (`open`, `write`, `read`,
//! ...), the shell drains all three again. The application side of a stream
//! is reached through [`Connection::write`], [`Connection::read`] and friends,
//! which never block: they answer [`WriteError::Blocked`] or
//! [`ReadError::Blocked`] and raise [`Event::Writable`] or
//! [`Event::Readable`] once it is worth trying again.

mod keepalive;
mod recv;
mod send_buffer;
mod stream;
mod transmit;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codes::{CloseCode, ResetCode};
use crate::config::{Config, ConfigError};
use crate::frame::{Frame, StreamId};
use crate::hello::{Hello, Role};
use crate::service::{ServiceError, ServiceHeader};
use stream::{Opening, RecvState, SendState, Stream};

/// One end of a tunnel.
#[derive(Debug)]
pub struct Connection {
    config: Config,
    state: State,
    /// The peer's HELLO, once received.
    peer: Option<Hello>,
    /// Every stream not yet both finished and released. A `BTreeMap` keeps
    /// iteration order deterministic.
    streams: BTreeMap<StreamId, Stream>,
    /// The id the next local OPEN gets, or `None` once ids are used up.
    next_local: Option<u32>,
    /// Highest id the peer has opened; ids at or below it that are not in
    /// `streams` are closed.
    highest_peer: u32,
    /// Local opens awaiting ACCEPT, oldest (earliest deadline) first.
    pending_opens: VecDeque<StreamId>,
    /// Peer opens awaiting the application's `accept`.
    incoming: VecDeque<StreamId>,
    /// Control frames, sent before any DATA.
    control: VecDeque<Frame>,
    /// Streams owing the peer a WINDOW_UPDATE.
    window_updates: VecDeque<StreamId>,
    /// Interactive streams with DATA or FIN to send, served round-robin.
    send_queue: VecDeque<StreamId>,
    /// Bulk streams ([`crate::Service::is_bulk`]) with DATA or FIN to send,
    /// served round-robin when no interactive stream can send, and once
    /// after every `INTERACTIVE_BURST` interactive frames.
    bulk_queue: VecDeque<StreamId>,
    /// Interactive DATA frames sent in a row while a bulk stream waited.
    interactive_run: u32,
    /// Bytes buffered on all streams' send sides.
    send_buffered: usize,
    /// Where DATA frames are built.
    send_arena: send_buffer::SendArena,
    /// Streams whose writes hit `max_send_buffer` (not their own limit).
    blocked_writers: VecDeque<StreamId>,
    /// Connection-level credit the peer granted and this side has not used.
    send_conn_credit: u64,
    /// Connection-level bytes the peer may still send.
    recv_conn_credit: u64,
    /// Connection-level bytes consumed and not yet granted back.
    recv_conn_unacked: u64,
    events: VecDeque<Event>,
    /// This side sent GOAWAY: no new streams, close once drained.
    draining: Option<(CloseCode, String)>,
    /// The peer sent GOAWAY: this side opens no new streams.
    peer_goaway: bool,
    keepalive: keepalive::Keepalive,
    /// Set once a drained connection queued its CLOSE behind the other
    /// control frames; it is closed when that CLOSE is transmitted.
    closing: Option<ConnectionError>,
    /// The CLOSE frame to send after the connection entered `Closed`.
    final_frame: Option<Vec<u8>>,
    error: Option<ConnectionError>,
    stats: Stats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// HELLO sent; the peer's not received yet.
    Handshaking,
    Open,
    Closed,
}

/// Something the application should react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The handshake completed; streams may be opened.
    Connected,
    /// The peer opened a stream: call [`Connection::accept`].
    Incoming,
    /// The peer accepted a stream this side opened.
    Accepted(StreamId),
    /// A read that was blocked may now succeed (data, end of stream or reset).
    Readable(StreamId),
    /// A write that was blocked may now succeed.
    Writable(StreamId),
    /// A stream was reset by the peer, or its open failed.
    Reset {
        stream: StreamId,
        code: ResetCode,
        reason: String,
    },
    /// The peer will accept no new streams.
    GoAway { code: CloseCode, reason: String },
    /// The connection is closed; see [`Connection::close_reason`].
    Closed,
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("the peer closed the tunnel: {code}{}", fmt_reason(reason))]
    PeerClosed { code: CloseCode, reason: String },
    #[error("the tunnel was closed by this side: {code}{}", fmt_reason(reason))]
    LocallyClosed { code: CloseCode, reason: String },
    #[error("the peer broke the protocol: {code}{}", fmt_reason(reason))]
    ProtocolViolation { code: CloseCode, reason: String },
    #[error(
        "the peer speaks protocol {major}.{minor}, this side speaks {}.{}; \
         help: upgrade the older side",
        crate::PROTOCOL_MAJOR,
        crate::PROTOCOL_MINOR
    )]
    VersionMismatch { major: u8, minor: u8 },
    #[error("no HELLO from the peer within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("nothing heard from the peer for {0:?}: it is presumed dead")]
    TimedOut(Duration),
    #[error("the transport closed without a CLOSE frame")]
    TransportClosed,
}

fn fmt_reason(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": '{reason}'")
    }
}

/// Why [`Connection::open`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the handshake has not completed yet")]
    Handshaking,
    #[error("the tunnel is closed")]
    Closed,
    #[error("this side is shutting down and opens no new streams")]
    ShuttingDown,
    #[error("the peer is shutting down and accepts no new streams")]
    PeerGoingAway,
    #[error("the peer allows {limit} concurrent streams and all are in use")]
    StreamLimit { limit: u32 },
    #[error("{limit} opens are already waiting to be accepted")]
    TooManyPending { limit: usize },
    #[error("stream ids are used up on this tunnel; help: reconnect")]
    IdsExhausted,
    #[error("the OPEN payload is {size} bytes, the peer accepts at most {limit}")]
    HeaderTooLarge { size: usize, limit: u32 },
    #[error("invalid service header: {0}")]
    InvalidHeader(#[from] ServiceError),
}

/// Why [`Connection::write`] or [`Connection::finish`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("the send buffer is full; wait for Event::Writable")]
    Blocked,
    #[error("stream {0} is not open")]
    UnknownStream(StreamId),
    #[error("the stream was already finished")]
    Finished,
    #[error("stream {0} was opened by the peer and is not accepted yet")]
    NotAccepted(StreamId),
    #[error("the stream was reset: {code}{}", reason_suffix(reason))]
    Reset { code: ResetCode, reason: String },
    #[error("the tunnel is closed: {0}")]
    ConnectionLost(ConnectionError),
}

/// Why [`Connection::read`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("no data yet; wait for Event::Readable")]
    Blocked,
    #[error("stream {0} is not open")]
    UnknownStream(StreamId),
    #[error("the stream was reset: {code}{}", reason_suffix(reason))]
    Reset { code: ResetCode, reason: String },
    #[error("the tunnel is closed: {0}")]
    ConnectionLost(ConnectionError),
}

/// ": reason" when the peer gave one.
fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// Counters for logs and heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_sent: u64,
    pub frames_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub streams_opened: u64,
    pub streams_accepted: u64,
}

impl Connection {
    /// Creates a connection and queues its HELLO. Send what
    /// [`Connection::poll_transmit`] returns as soon as the transport is up.
    pub fn new(config: Config, now: Instant) -> Result<Connection, ConfigError> {
        config.validate()?;
        let hello = Hello::new(config.role, config.settings);
        let mut connection = Connection {
            next_local: Some(match config.role {
                Role::Device => 1,
                Role::Platform => 2,
            }),
            recv_conn_credit: config.settings.connection_window.into(),
            keepalive: keepalive::Keepalive::new(&config, now),
            config,
            state: State::Handshaking,
            peer: None,
            streams: BTreeMap::new(),
            highest_peer: 0,
            pending_opens: VecDeque::new(),
            incoming: VecDeque::new(),
            control: VecDeque::new(),
            window_updates: VecDeque::new(),
            send_queue: VecDeque::new(),
            bulk_queue: VecDeque::new(),
            interactive_run: 0,
            send_buffered: 0,
            send_arena: Default::default(),
            blocked_writers: VecDeque::new(),
            send_conn_credit: 0,
            recv_conn_unacked: 0,
            events: VecDeque::new(),
            draining: None,
            peer_goaway: false,
            closing: None,
            final_frame: None,
            error: None,
            stats: Stats::default(),
        };
        connection.control.push_back(Frame::Hello(hello));
        // An early PING measures the round trip before data flows, so that
        // window auto-tuning has an RTT to work with.
        let ping = connection.keepalive.start_ping(now);
        connection.control.extend(ping);
        Ok(connection)
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.config.role
    }

    /// The configuration this connection runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// True once the handshake completed, until the connection closes.
    pub fn is_connected(&self) -> bool {
        self.state == State::Open
    }

    /// True once the connection is closed; only a final CLOSE frame may still
    /// come out of [`Connection::poll_transmit`].
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<&ConnectionError> {
        self.error.as_ref()
    }

    /// The peer's HELLO, once the handshake completed.
    pub fn peer_hello(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Smoothed round-trip time measured with PINGs.
    pub fn rtt(&self) -> Option<Duration> {
        self.keepalive.srtt
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// True while a stream this side opened waits for the peer's ACCEPT.
    pub fn is_awaiting_accept(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_some_and(|s| {
            matches!(s.opening, Opening::AwaitingAccept { .. }) && s.reset.is_none()
        })
    }

    /// Number of streams not yet finished and released.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Bytes held in buffers for the application, both directions. Bounded by
    /// the connection window plus `max_send_buffer`.
    pub fn buffered_bytes(&self) -> usize {
        let received: usize = self.streams.values().map(|s| s.recv_buffered).sum();
        received + self.send_buffered
    }

    /// The next thing the application should know about.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Opens a stream to `header`'s service on the peer at time `now` (its
    /// open timeout runs from `now`). Data may be written at once; the
    /// peer's ACCEPT raises [`Event::Accepted`].
    pub fn open(&mut self, now: Instant, header: ServiceHeader) -> Result<StreamId, OpenError> {
        match self.state {
            State::Handshaking => return Err(OpenError::Handshaking),
            State::Closed => return Err(OpenError::Closed),
            State::Open => {}
        }
        if self.draining.is_some() {
            return Err(OpenError::ShuttingDown);
        }
        if self.peer_goaway {
            return Err(OpenError::PeerGoingAway);
        }
        header.validate()?;
        let peer = self.peer_settings();
        let size = header.encoded_len();
        let limit = peer.max_open_payload.min(peer.max_frame_payload);
        if size > limit as usize {
            return Err(OpenError::HeaderTooLarge { size, limit });
        }
        let parity = self.config.role.stream_parity();
        let open_locally = self.streams.keys().filter(|id| id.0 % 2 == parity).count();
        if open_locally >= peer.max_concurrent_streams as usize {
            return Err(OpenError::StreamLimit {
                limit: peer.max_concurrent_streams,
            });
        }
        if self.pending_opens.len() >= self.config.max_pending_opens {
            return Err(OpenError::TooManyPending {
                limit: self.config.max_pending_opens,
            });
        }
        let id = StreamId(self.next_local.ok_or(OpenError::IdsExhausted)?);
        self.next_local = id.0.checked_add(2);
        let deadline = now + self.config.open_timeout;
        let mut stream = Stream::new(
            Opening::AwaitingAccept { deadline },
            peer.initial_stream_window,
            self.config.settings.initial_stream_window,
            now,
        );
        stream.bulk = header.service.is_bulk();
        self.streams.insert(id, stream);
        self.pending_opens.push_back(id);
        self.control.push_back(Frame::Open { stream: id, header });
        self.stats.streams_opened += 1;
        Ok(id)
    }

    /// The oldest stream the peer opened and the application has not taken,
    /// so it can decide before answering: [`Connection::accept`] it, or
    /// [`Connection::reset`] it (for example with [`ResetCode::REFUSED`]).
    pub fn peek_incoming(&self) -> Option<(StreamId, &ServiceHeader)> {
        self.incoming
            .iter()
            .find_map(|id| Some((*id, self.streams.get(id)?.header.as_ref()?)))
    }

    /// Takes the oldest stream the peer opened, with its service header, and
    /// tells the peer it was accepted.
    pub fn accept(&mut self) -> Option<(StreamId, ServiceHeader)> {
        while let Some(id) = self.incoming.pop_front() {
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            let Some(header) = stream.header.take() else {
                continue;
            };
            stream.opening = Opening::Established;
            self.control.push_back(Frame::Accept { stream: id });
            self.stats.streams_accepted += 1;
            return Some((id, header));
        }
        None
    }

    /// Queues bytes on a stream; returns how many were taken (possibly fewer
    /// than given, never zero for non-empty `data`).
    pub fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, WriteError> {
        let split = self.data_split();
        let stream_cap = self.config.max_stream_send_buffer;
        let tunnel_room = self
            .config
            .max_send_buffer
            .saturating_sub(self.send_buffered);
        let lost = self.lost();
        let stream = writable(&mut self.streams, lost, id)?;
        let stream_room = stream_cap.saturating_sub(stream.send_buf.len());
        let n = data.len().min(stream_room).min(tunnel_room);
        if n == 0 && !data.is_empty() {
            // Blocked by the tunnel-wide limit, any stream's progress may
            // unblock it; by its own, only its own progress.
            let tunnel_blocked = !stream.write_blocked && stream_room > 0;
            stream.write_blocked = true;
            if tunnel_blocked && !stream.awaits_tunnel_room {
                stream.awaits_tunnel_room = true;
                self.blocked_writers.push_back(id);
            }
            return Err(WriteError::Blocked);
        }
        stream
            .send_buf
            .extend(&data[..n], split, &mut self.send_arena);
        self.send_buffered += n;
        self.schedule(id);
        Ok(n)
    }

    /// Half-closes the stream: FIN follows the bytes already written.
    pub fn finish(&mut self, id: StreamId) -> Result<(), WriteError> {
        let lost = self.lost();
        writable(&mut self.streams, lost, id)?.send = SendState::FinQueued;
        self.schedule(id);
        Ok(())
    }

    /// Reads up to `max` bytes. `Ok(None)` is the end of the stream.
    pub fn read(&mut self, id: StreamId, max: usize) -> Result<Option<Bytes>, ReadError> {
        let lost = self.lost();
        let stream = self
            .streams
            .get_mut(&id)
            .ok_or(ReadError::UnknownStream(id))?;
        if let Some(reset) = &stream.reset {
            return Err(ReadError::Reset {
                code: reset.code,
                reason: reset.reason.clone(),
            });
        }
        if let Some(chunk) = stream.take_recv(max) {
            let drained = stream.recv == RecvState::FinReceived && stream.recv_buffered == 0;
            self.consume(id, chunk.len());
            if drained {
                self.remove_if_done(id);
            }
            return Ok(Some(chunk));
        }
        if stream.recv == RecvState::FinReceived {
            self.remove_if_done(id);
            return Ok(None);
        }
        if let Some(error) = lost {
            return Err(ReadError::ConnectionLost(error));
        }
        stream.read_blocked = true;
        Err(ReadError::Blocked)
    }

    /// Abandons a stream in both directions and tells the peer why. Unknown
    /// or already reset streams are ignored.
    pub fn reset(&mut self, id: StreamId, code: ResetCode, reason: &str) {
        let Some(mut stream) = self.streams.remove(&id) else {
            return;
        };
        let (received, sent) = stream.discard_buffers();
        self.send_buffered -= sent;
        if sent > 0 {
            // Writers blocked by the tunnel-wide limit may have room now.
            self.wake_blocked_writers();
        }
        self.return_conn_credit(received as u64);
        let already_done = stream.reset.is_some()
            || (stream.send == SendState::FinSent && stream.recv == RecvState::FinReceived);
        if !already_done && self.state != State::Closed {
            let reason = crate::frame::truncate_reason(reason).to_string();
            self.control.push_back(Frame::Reset {
                stream: id,
                code,
                reason,
            });
        }
        self.pending_opens.retain(|&p| p != id);
        self.incoming.retain(|&p| p != id);
        self.check_drained();
    }

    /// The application is done with a stream: a send side still open is
    /// finished (FIN after buffered bytes), bytes still arriving are
    /// discarded, and the stream is forgotten once both directions are done.
    pub fn release(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.released = true;
        if stream.reset.is_none() && stream.send == SendState::Open {
            stream.send = SendState::FinQueued;
        }
        let discarded = stream.clear_recv();
        if discarded > 0 {
            self.consume(id, discarded);
        }
        self.schedule(id);
        self.remove_if_done(id);
    }

    /// Starts a graceful shutdown: GOAWAY now, no new streams either way,
    /// CLOSE with `code` once every stream is finished. Call
    /// [`Connection::close`] to cut the wait short.
    pub fn shutdown(&mut self, code: CloseCode, reason: &str) {
        if self.state == State::Closed || self.draining.is_some() {
            return;
        }
        let reason = crate::frame::truncate_reason(reason).to_string();
        self.control.push_back(Frame::GoAway {
            last_stream: StreamId(self.highest_peer),
            code,
            reason: reason.clone(),
        });
        self.draining = Some((code, reason));
        self.check_drained();
    }

    /// Closes the connection now. Buffered data is dropped; the final CLOSE
    /// frame is still returned by [`Connection::poll_transmit`].
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        let reason = crate::frame::truncate_reason(reason).to_string();
        let error = ConnectionError::LocallyClosed {
            code,
            reason: reason.clone(),
        };
        self.enter_closed(error, Some(Frame::Close { code, reason }));
    }

    /// The transport under the connection is gone.
    pub fn handle_transport_closed(&mut self) {
        self.enter_closed(ConnectionError::TransportClosed, None);
    }

    /// The transport refused a message from the peer before it reached
    /// [`Connection::handle_message`] (for example a WebSocket message over
    /// the size limit). Closes as if the frame had been decoded and refused.
    pub fn handle_transport_violation(&mut self, code: CloseCode, reason: &str) {
        self.fail(code, reason.to_string());
    }

    /// True when no stream is open and nothing waits to be sent.
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty()
            && self.control.is_empty()
            && self.send_queue.is_empty()
            && self.bulk_queue.is_empty()
    }

    /// Largest DATA payload this side sends.
    fn data_split(&self) -> usize {
        self.config
            .data_split
            .min(self.peer_settings().max_frame_payload as usize)
    }

    /// Settings the peer announced; the protocol defaults until HELLO arrives.
    fn peer_settings(&self) -> crate::Settings {
        self.peer.map(|hello| hello.settings).unwrap_or_default()
    }

    fn lost(&self) -> Option<ConnectionError> {
        if self.state == State::Closed {
            Some(
                self.error
                    .clone()
                    .unwrap_or(ConnectionError::TransportClosed),
            )
        } else {
            None
        }
    }

    /// Puts a stream in the send queue if it has something to frame.
    fn schedule(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id)
            && !stream.queued
            && stream.has_sendable()
        {
            stream.queued = true;
            if stream.bulk {
                self.bulk_queue.push_back(id);
            } else {
                self.send_queue.push_back(id);
            }
        }
    }

    /// Records `n` bytes read (or discarded) from a stream and queues window
    /// updates once half a window is owed (never on mere receipt).
    fn consume(&mut self, id: StreamId, n: usize) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        // `n` is at most the bytes buffered, which never exceed the window.
        stream.recv_unacked += n as u32;
        let owed_enough = stream.recv_unacked >= stream.recv_window / 2;
        if owed_enough && stream.recv == RecvState::Open && !stream.update_queued {
            stream.update_queued = true;
            self.window_updates.push_back(id);
        }
        self.return_conn_credit(n as u64);
    }

    fn return_conn_credit(&mut self, n: u64) {
        self.recv_conn_unacked += n;
    }

    /// Forgets a stream once both directions are done and the application
    /// released it (or never saw it).
    fn remove_if_done(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get(&id) else {
            return;
        };
        let done = stream.is_finished();
        if (stream.released && done)
            || (stream.reset.is_some() && stream.opening == Opening::Incoming)
        {
            self.streams.remove(&id);
        }
        self.check_drained();
    }

    /// During a graceful shutdown, closes once every stream is finished
    /// (a handle the application still holds does not keep it open). The
    /// CLOSE queues behind the control frames already waiting (GOAWAY, the
    /// last RESETs), so none of them is lost.
    pub(crate) fn check_drained(&mut self) {
        let Some((code, reason)) = &self.draining else {
            return;
        };
        let finished = self.streams.values().all(Stream::is_finished);
        if self.state == State::Open && finished && self.closing.is_none() {
            self.closing = Some(ConnectionError::LocallyClosed {
                code: *code,
                reason: reason.clone(),
            });
            self.control.push_back(Frame::Close {
                code: *code,
                reason: reason.clone(),
            });
        }
    }

    /// Marks a stream reset (by the peer, or because its open failed) and
    /// tells the application.
    fn mark_reset(&mut self, id: StreamId, code: ResetCode, reason: String) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.reset.is_some() {
            return;
        }
        let (received, sent) = stream.discard_buffers();
        stream.reset = Some(stream::Reset {
            code,
            reason: reason.clone(),
        });
        let incoming = stream.opening == Opening::Incoming;
        self.send_buffered -= sent;
        if sent > 0 {
            self.wake_blocked_writers();
        }
        self.return_conn_credit(received as u64);
        self.pending_opens.retain(|&p| p != id);
        if incoming {
            // The application never saw it: forget it silently.
            self.incoming.retain(|&p| p != id);
        } else {
            self.events.push_back(Event::Reset {
                stream: id,
                code,
                reason,
            });
        }
        self.remove_if_done(id);
    }

    /// Ends the connection: every later call sees `error`, and `frame` (a
    /// CLOSE) is the only thing left to transmit.
    fn enter_closed(&mut self, error: ConnectionError, frame: Option<Frame>) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.error = Some(error);
        self.final_frame = frame.map(|f| f.to_bytes());
        self.control.clear();
        self.window_updates.clear();
        self.send_queue.clear();
        self.bulk_queue.clear();
        for stream in self.streams.values_mut() {
            stream.send_buf.clear();
            stream.queued = false;
        }
        self.send_buffered = 0;
        self.pending_opens.clear();
        self.events.push_back(Event::Closed);
    }

    /// Closes because the peer broke a rule.
    fn fail(&mut self, code: CloseCode, reason: String) {
        let reason = crate::frame::truncate_reason(&reason).to_string();
        let error = ConnectionError::ProtocolViolation {
            code,
            reason: reason.clone(),
        };
        self.enter_closed(error, Some(Frame::Close { code, reason }));
    }
}

/// The stream, if the application may still write to it. A free function, so
/// that the caller keeps the other fields of the connection at hand.
fn writable(
    streams: &mut BTreeMap<StreamId, Stream>,
    lost: Option<ConnectionError>,
    id: StreamId,
) -> Result<&mut Stream, WriteError> {
    let stream = streams.get_mut(&id).ok_or(WriteError::UnknownStream(id))?;
    if let Some(reset) = &stream.reset {
        return Err(WriteError::Reset {
            code: reset.code,
            reason: reset.reason.clone(),
        });
    }
    if let Some(error) = lost {
        return Err(WriteError::ConnectionLost(error));
    }
    if stream.send != SendState::Open {
        return Err(WriteError::Finished);
    }
    if stream.opening == Opening::Incoming {
        // Nothing may precede the ACCEPT on an incoming stream.
        return Err(WriteError::NotAccepted(id));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests;
