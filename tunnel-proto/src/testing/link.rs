//! [`Link`]: two connections, a simulated wire and a simulated clock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Failure, MAX_STEPS, Side, start_time};
use crate::config::{Config, ConfigError};
use crate::connection::Connection;
use crate::frame::{Frame, HEADER_LEN, StreamId};

/// One end of a [`Link`]: its connection, the messages on their way to it,
/// and the send credit its peer granted it.
#[derive(Debug)]
pub struct Peer {
    pub conn: Connection,
    /// Messages on their way to this peer, oldest first, with the time they
    /// arrive.
    pub inbound: VecDeque<(Instant, Bytes)>,
    /// When false, the shell no longer reads this peer's output: nothing it
    /// queues reaches the wire (a stuck transport or a dead peer). Its timers
    /// still fire.
    pub transmitting: bool,
    /// Every frame this peer transmitted, with the time it left; kept only
    /// while [`Link::record`] is set.
    pub sent: Vec<(Instant, Frame)>,
    /// Every message handed to this peer (delivered or injected), with the
    /// time it arrived; kept only while [`Link::record`] is set.
    pub received: Vec<(Instant, Bytes)>,
    credit: Credit,
}

/// Send credit as the receiver granted it, kept independently of the
/// connection's own books.
#[derive(Debug, Default)]
struct Credit {
    initial_stream: u64,
    connection: u64,
    streams: HashMap<StreamId, u64>,
}

impl Credit {
    fn stream(&mut self, id: StreamId) -> &mut u64 {
        self.streams.entry(id).or_insert(self.initial_stream)
    }

    /// Books the credit a message handed to the sender grants it.
    fn grant(&mut self, msg: &Bytes) {
        match Frame::decode(msg) {
            Ok(Frame::Hello(hello)) => {
                self.initial_stream = hello.settings.initial_stream_window.into();
                self.connection = hello.settings.connection_window.into();
            }
            Ok(Frame::WindowUpdate { stream, increment }) if stream.is_connection() => {
                self.connection += u64::from(increment);
            }
            Ok(Frame::WindowUpdate { stream, increment }) => {
                *self.stream(stream) += u64::from(increment);
            }
            _ => {}
        }
    }
}

impl Peer {
    fn new(conn: Connection) -> Peer {
        Peer {
            conn,
            inbound: VecDeque::new(),
            transmitting: true,
            sent: Vec::new(),
            received: Vec::new(),
            credit: Credit::default(),
        }
    }

    /// DATA bytes this peer may still send on `stream`, as its peer granted.
    pub fn stream_credit(&self, stream: StreamId) -> u64 {
        let initial = self.credit.initial_stream;
        self.credit.streams.get(&stream).copied().unwrap_or(initial)
    }

    /// DATA bytes this peer may still send on the connection, as its peer
    /// granted.
    pub fn connection_credit(&self) -> u64 {
        self.credit.connection
    }
}

/// A device and a platform [`Connection`] joined by a simulated link, after
/// `quinn-proto`'s `tests::util::Pair`.
///
/// The link is reliable and in order, with a fixed one-way
/// [`latency`](Link::latency). Time only moves when the harness delivers a
/// message or fires a timer: [`Link::drive`] runs until nothing is in
/// flight; [`Link::advance`] lets simulated time pass, timers included;
/// [`Link::transmit`] and [`Link::deliver`] move messages one direction at a
/// time. Every transmitted message is checked as the [module docs](super)
/// describe.
#[derive(Debug)]
pub struct Link {
    /// The simulated time.
    pub now: Instant,
    /// One-way delay of every message, both ways.
    pub latency: Duration,
    /// The device and the platform, in [`Side::index`] order.
    pub peers: [Peer; 2],
    /// Keep [`Peer::sent`] and [`Peer::received`]. Off by default.
    pub record: bool,
}

impl Link {
    /// Two connections created at [`start_time`], nothing sent yet.
    pub fn new(device: Config, platform: Config, latency: Duration) -> Result<Link, ConfigError> {
        Link::starting_at(start_time(), device, platform, latency)
    }

    /// Two connections created at `now`, nothing sent yet.
    pub fn starting_at(
        now: Instant,
        device: Config,
        platform: Config,
        latency: Duration,
    ) -> Result<Link, ConfigError> {
        Ok(Link {
            now,
            latency,
            peers: [
                Peer::new(Connection::new(device, now)?),
                Peer::new(Connection::new(platform, now)?),
            ],
            record: false,
        })
    }

    pub fn peer(&self, side: Side) -> &Peer {
        &self.peers[side.index()]
    }

    pub fn peer_mut(&mut self, side: Side) -> &mut Peer {
        &mut self.peers[side.index()]
    }

    pub fn conn(&self, side: Side) -> &Connection {
        &self.peer(side).conn
    }

    pub fn conn_mut(&mut self, side: Side) -> &mut Connection {
        &mut self.peer_mut(side).conn
    }

    /// The sending and the receiving end of one direction.
    fn ends(&mut self, from: Side) -> (&mut Peer, &mut Peer) {
        let [device, platform] = &mut self.peers;
        match from {
            Side::Device => (device, platform),
            Side::Platform => (platform, device),
        }
    }

    /// Fires `side`'s timer if it is due; returns whether it was.
    pub fn fire_timer(&mut self, side: Side) -> bool {
        let now = self.now;
        let conn = self.conn_mut(side);
        let due = conn.poll_timeout().is_some_and(|t| t <= now);
        if due {
            conn.handle_timeout(now);
        }
        due
    }

    /// Fires `from`'s timer if due and, unless it stopped
    /// [`transmitting`](Peer::transmitting), checks and puts on the link
    /// everything it has to send. Returns whether anything happened (a timer
    /// fired or a message left).
    pub fn transmit(&mut self, from: Side) -> Result<bool, Failure> {
        let now = self.now;
        let arrival = now + self.latency;
        let record = self.record;
        let mut busy = self.fire_timer(from);
        let (sender, receiver) = self.ends(from);
        if sender.transmitting {
            while let Some(msg) = sender.conn.poll_transmit(now) {
                let frame = check_outgoing(from, sender, receiver, &msg)?;
                if record {
                    sender.sent.push((now, frame));
                }
                receiver.inbound.push_back((arrival, msg));
                busy = true;
            }
        }
        Ok(busy)
    }

    /// Hands `msg` to `to` now, as if it had just arrived, bypassing the
    /// link (and, for injected bytes, the peer's state machine). Credit the
    /// message grants is booked as usual.
    pub fn receive(&mut self, to: Side, msg: Bytes) {
        let now = self.now;
        let record = self.record;
        let peer = self.peer_mut(to);
        peer.credit.grant(&msg);
        if record {
            peer.received.push((now, msg.clone()));
        }
        peer.conn.handle_message(now, msg);
    }

    /// Delivers the next message in flight to `to`, whenever it is due
    /// (moving the clock to its arrival if later), and returns it. Nothing is
    /// transmitted in answer.
    pub fn deliver_one(&mut self, to: Side) -> Option<Bytes> {
        let (at, msg) = self.peer_mut(to).inbound.pop_front()?;
        self.now = self.now.max(at);
        self.receive(to, msg.clone());
        Some(msg)
    }

    /// Delivers up to `count` messages in flight to `to`, as
    /// [`Link::deliver_one`] does; returns how many there were.
    pub fn deliver(&mut self, to: Side, count: usize) -> usize {
        (0..count)
            .take_while(|_| self.deliver_one(to).is_some())
            .count()
    }

    /// Delivers every message due at the current time, to the device first;
    /// returns how many.
    pub fn deliver_due(&mut self) -> usize {
        let now = self.now;
        let mut delivered = 0;
        for to in Side::ALL {
            while self
                .peer(to)
                .inbound
                .front()
                .is_some_and(|(at, _)| *at <= now)
            {
                let Some((_, msg)) = self.peer_mut(to).inbound.pop_front() else {
                    break;
                };
                self.receive(to, msg);
                delivered += 1;
            }
        }
        delivered
    }

    /// When the next message in flight arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.peers
            .iter()
            .filter_map(|peer| peer.inbound.front().map(|(at, _)| *at))
            .min()
    }

    /// The earliest moment something is due: a message arrives or a timer
    /// fires.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let timers = self
            .peers
            .iter()
            .filter_map(|peer| peer.conn.poll_timeout());
        self.next_arrival().into_iter().chain(timers).min()
    }

    /// One round: both sides transmit, then, while messages are in flight,
    /// time moves to the next arrival (or to an earlier timer) and what is
    /// due is delivered. Returns false once nothing happened and nothing is
    /// in flight.
    pub fn step(&mut self) -> Result<bool, Failure> {
        let mut busy = self.transmit(Side::Device)?;
        busy |= self.transmit(Side::Platform)?;
        if self.next_arrival().is_some() {
            if let Some(next) = self.next_wakeup() {
                self.now = self.now.max(next);
            }
            self.deliver_due();
            busy = true;
        }
        Ok(busy)
    }

    /// Moves messages until both sides are idle: nothing to send, nothing in
    /// flight. Timers fire only while messages are in flight, so keepalive
    /// does not keep this running forever.
    pub fn drive(&mut self) -> Result<(), Failure> {
        for _ in 0..MAX_STEPS {
            if !self.step()? {
                return Ok(());
            }
        }
        Err(self.livelock("drive()"))
    }

    /// Lets `duration` of simulated time pass; see [`Link::advance_to`].
    pub fn advance(&mut self, duration: Duration) -> Result<(), Failure> {
        self.advance_to(self.now + duration)
    }

    /// Lets simulated time pass until `target`, transmitting, delivering
    /// messages and firing timers in time order. What is queued at `target`
    /// itself is not transmitted yet.
    pub fn advance_to(&mut self, target: Instant) -> Result<(), Failure> {
        for _ in 0..MAX_STEPS {
            self.transmit(Side::Device)?;
            self.transmit(Side::Platform)?;
            match self.next_wakeup() {
                Some(next) if next <= target => {
                    self.now = self.now.max(next);
                    self.deliver_due();
                }
                _ => {
                    self.now = self.now.max(target);
                    return Ok(());
                }
            }
        }
        Err(self.livelock("advance()"))
    }

    /// A [`Failure::Livelock`] in `what`, with both sides' counters.
    pub fn livelock(&self, what: &'static str) -> Failure {
        Failure::Livelock {
            what,
            device: self.peers[0].conn.stats(),
            platform: self.peers[1].conn.stats(),
        }
    }
}

/// Decodes and checks one message `from` sent; returns the frame and books
/// the credit a DATA frame uses.
fn check_outgoing(
    from: Side,
    sender: &mut Peer,
    receiver: &Peer,
    msg: &Bytes,
) -> Result<Frame, Failure> {
    let frame = Frame::decode(msg).map_err(|error| Failure::Undecodable {
        from,
        error,
        message: msg.to_vec(),
    })?;
    let payload = msg.len().saturating_sub(HEADER_LEN);
    let limit = receiver.conn.config().settings.max_frame_payload as usize;
    if payload > limit {
        return Err(Failure::FrameTooLarge {
            from,
            payload,
            limit,
        });
    }
    if let Frame::Data {
        stream, payload, ..
    } = &frame
    {
        let split = sender.conn.config().data_split;
        if payload.len() > split {
            return Err(Failure::DataAboveSplit {
                from,
                len: payload.len(),
                split,
            });
        }
        let len = payload.len() as u64;
        let credit = sender.credit.stream(*stream);
        if len > *credit {
            return Err(Failure::StreamCredit {
                from,
                stream: *stream,
                len,
                credit: *credit,
            });
        }
        *credit -= len;
        let credit = &mut sender.credit.connection;
        if len > *credit {
            return Err(Failure::ConnectionCredit {
                from,
                len,
                credit: *credit,
            });
        }
        *credit -= len;
    }
    Ok(frame)
}
