//! [`World`]: random stream operations on a [`Link`], against a model of
//! every stream.

use std::time::Duration;

use super::{Failure, Link, MAX_STEPS, Side};
use crate::codes::{CloseCode, ResetCode};
use crate::connection::{ConnectionError, Event, ReadError, WriteError};
use crate::frame::StreamId;
use crate::service::{Service, ServiceHeader};

/// Returns a [`Failure::Model`] from the enclosing function unless `$cond`.
macro_rules! ensure {
    ($cond:expr, $($message:tt)+) => {
        if !$cond {
            return Err(Failure::Model(format!($($message)+)));
        }
    };
}

/// One operation on a [`World`]. Streams are picked by `stream`, modulo the
/// number of streams `side`'s application holds; an operation on a side that
/// holds none does nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `side` opens a stream to a TCP service.
    Open(Side),
    /// `side` accepts every stream waiting to be accepted.
    Accept(Side),
    /// `side` writes `len` bytes, as much as the connection takes.
    Write {
        side: Side,
        stream: usize,
        len: usize,
    },
    /// `side` reads at most `max` bytes.
    Read {
        side: Side,
        stream: usize,
        max: usize,
    },
    /// `side` finishes its direction of the stream.
    Finish { side: Side, stream: usize },
    /// `side` resets the stream with `code`.
    Reset {
        side: Side,
        stream: usize,
        code: ResetCode,
    },
    /// `side` releases the stream.
    Release { side: Side, stream: usize },
    /// [`Link::transmit`] from `side`.
    Transmit(Side),
    /// [`Link::deliver`] `count` messages to `to`.
    Deliver { to: Side, count: usize },
    /// [`Link::advance`] by the duration.
    Advance(Duration),
    /// `side` sends a PING.
    Ping(Side),
    /// `side` starts a graceful shutdown with [`CloseCode::NO_ERROR`].
    Shutdown(Side),
}

/// One direction of a stream, named by the side that writes it.
#[derive(Debug, Default)]
struct Direction {
    written: Vec<u8>,
    read: Vec<u8>,
    finished: bool,
    eof: bool,
    /// The reader released the stream: it reads no more.
    reader_gone: bool,
}

/// What the model knows of one stream.
#[derive(Debug)]
struct Tracked {
    id: StreamId,
    opener: Side,
    accepted: bool,
    /// Reset by either side, refused, timed out or going away.
    reset: bool,
    /// Indexed by [`Side::index`].
    released: [bool; 2],
    /// Indexed by the [`Side::index`] of the writing side.
    dirs: [Direction; 2],
}

impl Tracked {
    /// Whether `side`'s application holds this stream.
    fn usable_by(&self, side: Side) -> bool {
        (side == self.opener || self.accepted) && !self.released[side.index()]
    }

    fn dir(&mut self, writer: Side) -> &mut Direction {
        &mut self.dirs[writer.index()]
    }
}

/// Deterministic bytes that reveal loss, duplication and reordering.
fn bytes_for(stream: StreamId, writer: Side, offset: usize, len: usize) -> Vec<u8> {
    let salt = stream.0.wrapping_mul(7).wrapping_add(writer.index() as u32);
    (offset..offset + len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(salt) as u8)
        .collect()
}

/// A [`Link`] between two honest connections and a model of every stream
/// opened on it.
///
/// [`World::apply`] runs one [`Op`] and checks what it saw: a reader only
/// ever gets a prefix of what the writer wrote, a stream is accepted once,
/// ids are not reused, writes and finishes answer consistently, and both
/// connections keep their buffers within the connection window plus
/// `max_send_buffer`. [`World::check_delivery`], after [`World::settle`],
/// checks that every stream neither reset nor cut off by a closed
/// connection carried exactly the bytes written, end of stream included, and
/// that the connections only ever closed in an orderly way.
#[derive(Debug)]
pub struct World {
    pub link: Link,
    streams: Vec<Tracked>,
}

impl World {
    /// Runs the handshake on `link` and checks it completed.
    pub fn connect(link: Link) -> Result<World, Failure> {
        let mut world = World {
            link,
            streams: Vec::new(),
        };
        world.settle()?;
        world.observe();
        for side in Side::ALL {
            ensure!(
                world.link.conn(side).is_connected(),
                "{side:?} did not complete the handshake: {:?}",
                world.link.conn(side).close_reason()
            );
        }
        Ok(world)
    }

    fn stream_index(&self, id: StreamId) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// The `pick`-th stream `side`'s application holds, modulo their number.
    fn pick(&self, side: Side, pick: usize) -> Option<usize> {
        let usable: Vec<usize> = (0..self.streams.len())
            .filter(|&i| self.streams[i].usable_by(side))
            .collect();
        (!usable.is_empty()).then(|| usable[pick % usable.len()])
    }

    /// Takes both sides' events into the model.
    pub fn observe(&mut self) {
        for side in Side::ALL {
            while let Some(event) = self.link.conn_mut(side).poll_event() {
                let Event::Reset { stream, .. } = event else {
                    continue;
                };
                if let Some(i) = self.stream_index(stream) {
                    self.streams[i].reset = true;
                }
            }
        }
    }

    /// Accepts every stream waiting on `side`.
    pub fn accept_all(&mut self, side: Side) -> Result<(), Failure> {
        while let Some((id, _)) = self.link.conn_mut(side).accept() {
            let Some(i) = self.stream_index(id) else {
                return Err(Failure::Model(format!(
                    "accepted stream {id} that nobody opened"
                )));
            };
            let stream = &mut self.streams[i];
            ensure!(
                stream.opener != side && !stream.accepted,
                "stream {id} accepted twice"
            );
            stream.accepted = true;
        }
        Ok(())
    }

    /// One read by `side` on the `i`-th tracked stream; returns whether it
    /// produced bytes.
    fn read(&mut self, side: Side, i: usize, max: usize) -> Result<bool, Failure> {
        let id = self.streams[i].id;
        let result = self.link.conn_mut(side).read(id, max);
        let stream = &mut self.streams[i];
        let dir = stream.dir(side.other());
        match result {
            Ok(Some(chunk)) => {
                ensure!(!dir.eof, "data on stream {id} after its end");
                ensure!(
                    chunk.len() <= max,
                    "a read of at most {max} bytes on stream {id} gave {}",
                    chunk.len()
                );
                dir.read.extend_from_slice(&chunk);
                ensure!(
                    dir.written.starts_with(&dir.read),
                    "stream {id} delivered bytes that were not written, or out of order"
                );
                Ok(!chunk.is_empty())
            }
            Ok(None) => {
                ensure!(dir.finished, "stream {id} ended without a finish");
                ensure!(
                    dir.read.len() == dir.written.len(),
                    "stream {id} ended early: {} of {} bytes read",
                    dir.read.len(),
                    dir.written.len()
                );
                dir.eof = true;
                Ok(false)
            }
            Err(ReadError::Reset { .. }) => {
                stream.reset = true;
                Ok(false)
            }
            Err(
                ReadError::Blocked | ReadError::UnknownStream(_) | ReadError::ConnectionLost(_),
            ) => Ok(false),
        }
    }

    /// Runs one operation, takes the events it raised into the model and
    /// checks that both connections' buffers stay bounded.
    pub fn apply(&mut self, op: Op) -> Result<(), Failure> {
        match op {
            Op::Open(side) => {
                let header = ServiceHeader::new(Service::Tcp("svc".into()));
                let now = self.link.now;
                if let Ok(id) = self.link.conn_mut(side).open(now, header) {
                    ensure!(self.stream_index(id).is_none(), "stream id {id} reused");
                    self.streams.push(Tracked {
                        id,
                        opener: side,
                        accepted: false,
                        reset: false,
                        released: [false; 2],
                        dirs: Default::default(),
                    });
                }
            }
            Op::Accept(side) => self.accept_all(side)?,
            Op::Write { side, stream, len } => {
                let Some(i) = self.pick(side, stream) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                let offset = self.streams[i].dir(side).written.len();
                let data = bytes_for(id, side, offset, len);
                let result = self.link.conn_mut(side).write(id, &data);
                let stream = &mut self.streams[i];
                let dir = stream.dir(side);
                match result {
                    Ok(n) => {
                        ensure!(!dir.finished, "write after finish on {id}");
                        ensure!(
                            n <= len && (n > 0 || len == 0),
                            "a write of {len} bytes on {id} took {n}"
                        );
                        dir.written.extend_from_slice(&data[..n]);
                    }
                    Err(WriteError::Finished) => {
                        ensure!(
                            dir.finished,
                            "{id} is finished, but the model never finished it"
                        );
                    }
                    Err(WriteError::Reset { .. }) => stream.reset = true,
                    Err(WriteError::NotAccepted(_)) => {
                        // The model only writes on streams this side opened
                        // or accepted.
                        return Err(Failure::Model(format!(
                            "{side:?} may not write on {id}, which it opened or accepted"
                        )));
                    }
                    Err(
                        WriteError::Blocked
                        | WriteError::UnknownStream(_)
                        | WriteError::ConnectionLost(_),
                    ) => {}
                }
            }
            Op::Read { side, stream, max } => {
                if let Some(i) = self.pick(side, stream) {
                    self.read(side, i, max)?;
                }
            }
            Op::Finish { side, stream } => {
                let Some(i) = self.pick(side, stream) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                if self.link.conn_mut(side).finish(id).is_ok() {
                    let dir = self.streams[i].dir(side);
                    ensure!(!dir.finished, "finished {id} twice");
                    dir.finished = true;
                }
            }
            Op::Reset { side, stream, code } => {
                let Some(i) = self.pick(side, stream) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                self.link
                    .conn_mut(side)
                    .reset(id, code, "reset by the model");
                self.streams[i].reset = true;
                self.streams[i].released[side.index()] = true;
            }
            Op::Release { side, stream } => {
                let Some(i) = self.pick(side, stream) else {
                    return Ok(());
                };
                let id = self.streams[i].id;
                self.link.conn_mut(side).release(id);
                let stream = &mut self.streams[i];
                stream.released[side.index()] = true;
                stream.dir(side).finished = true;
                stream.dir(side.other()).reader_gone = true;
            }
            Op::Transmit(side) => {
                self.link.transmit(side)?;
            }
            Op::Deliver { to, count } => {
                self.link.deliver(to, count);
            }
            Op::Advance(duration) => self.link.advance(duration)?,
            Op::Ping(side) => {
                let now = self.link.now;
                self.link.conn_mut(side).ping(now)
            }
            Op::Shutdown(side) => self
                .link
                .conn_mut(side)
                .shutdown(CloseCode::NO_ERROR, "shut down by the model"),
        }
        self.observe();
        for peer in &self.link.peers {
            let config = peer.conn.config();
            let bound = config.settings.connection_window as usize + config.max_send_buffer;
            let buffered = peer.conn.buffered_bytes();
            ensure!(
                buffered <= bound,
                "{buffered} bytes buffered, more than the {bound} allowed"
            );
        }
        Ok(())
    }

    /// Accepts and reads everything and moves every message, until quiet.
    /// Time moves only to deliver messages.
    pub fn settle(&mut self) -> Result<(), Failure> {
        for _ in 0..MAX_STEPS {
            self.accept_all(Side::Device)?;
            self.accept_all(Side::Platform)?;
            let mut progress = false;
            for i in 0..self.streams.len() {
                for side in Side::ALL {
                    while self.streams[i].usable_by(side) && self.read(side, i, usize::MAX)? {
                        progress = true;
                    }
                }
            }
            progress |= self.link.transmit(Side::Device)?;
            progress |= self.link.transmit(Side::Platform)?;
            if let Some(next) = self.link.next_arrival() {
                self.link.now = self.link.now.max(next);
                self.link.deliver_due();
                progress = true;
            }
            self.observe();
            if !progress {
                return Ok(());
            }
        }
        Err(self.link.livelock("settle()"))
    }

    /// Checks the end state, after [`World::settle`]: both connections are
    /// open or closed in an orderly way, and every stream not reset, not cut
    /// off by a closed connection and not abandoned by its reader was
    /// accepted and delivered exactly what was written, end of stream
    /// included.
    pub fn check_delivery(&self) -> Result<(), Failure> {
        let closed = self.link.peers.iter().any(|p| p.conn.is_closed());
        for peer in &self.link.peers {
            let reason = peer.conn.close_reason();
            let orderly = matches!(
                reason,
                None | Some(
                    ConnectionError::LocallyClosed {
                        code: CloseCode::NO_ERROR,
                        ..
                    } | ConnectionError::PeerClosed {
                        code: CloseCode::NO_ERROR,
                        ..
                    }
                )
            );
            ensure!(orderly, "an honest pair closed with {reason:?}");
        }
        for stream in &self.streams {
            for writer in Side::ALL {
                let id = stream.id;
                let dir = &stream.dirs[writer.index()];
                ensure!(
                    dir.written.starts_with(&dir.read),
                    "stream {id} from {writer:?} delivered bytes that were not written"
                );
                if stream.reset || closed || dir.reader_gone {
                    continue;
                }
                ensure!(
                    stream.accepted,
                    "stream {id} was neither accepted nor reset"
                );
                ensure!(
                    dir.read == dir.written,
                    "stream {id} from {writer:?} delivered {} of {} bytes",
                    dir.read.len(),
                    dir.written.len()
                );
                ensure!(
                    dir.eof == dir.finished,
                    "stream {id} from {writer:?}: end of stream read {}, finished {}",
                    dir.eof,
                    dir.finished
                );
            }
        }
        Ok(())
    }
}
