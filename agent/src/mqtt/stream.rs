//! One `mqtt` stream (`docs/protocol.md` §19): the platform's hello, the
//! device's subscriptions, the outbox sent in order within a window and
//! deleted as the platform acknowledges it, QoS 0 messages while the
//! stream is up, messages from the platform published on the local broker
//! and acknowledged once it has them, and the bridge's figures. While
//! written messages await the platform, new frames wait a moment to go
//! out together (`HOLD_BYTES`, `HOLD_MAX`).
//!
//! This module owns one stream's exchange and ends with it; the session
//! opens a new one after a reconnect and whatever was in flight is sent
//! again (the platform ignores what it already has). It never sends a
//! message outside the device's namespace: such a message is refused and
//! audited, and only its number goes to the platform.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use std::sync::atomic::Ordering::Relaxed;

use tether_proto::mqtt::{
    Figures, Frame, FrameDecoder, Hello, Message, MqttError as WireError, Namespace, Refusal,
    Subscription,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::Bridge;
use super::outbox::OutboxError;
use super::topics::Topics;

/// Bytes of messages sent and not yet acknowledged, at most.
pub const WINDOW_BYTES: usize = 1024 * 1024;
/// Messages sent and not yet acknowledged, at most.
pub const WINDOW_MESSAGES: usize = 1024;
/// How often the figures go to the platform while they change.
pub const FIGURES_EVERY: Duration = Duration::from_secs(5);
/// How long the platform may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages read from the outbox at once.
const READ_BATCH: usize = 256;
/// Messages the platform has acknowledged are deleted from the outbox
/// together, once this many numbers are acknowledged or nothing is in
/// flight: one store transaction per batch instead of one per
/// acknowledgement. A crash before the delete only resends them, and the
/// platform ignores what it already has.
const DELETE_BATCH: u64 = 512;
/// While messages written to the platform await its acknowledgement,
/// new ones wait for this many bytes of frames before they are written
/// (Nagle's rule at the stream's level): under load the stream writes a
/// few large TLS records instead of one per wake-up, and a message sent
/// when nothing is awaited still leaves at once.
const HOLD_BYTES: usize = 16 * 1024;
/// How long frames wait for [`HOLD_BYTES`] or an acknowledgement, at most.
const HOLD_MAX: Duration = Duration::from_millis(2);

/// Why the stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the mqtt stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the platform sent a malformed mqtt frame: {0}")]
    Frame(#[from] WireError),
    #[error("the platform sent {0} on the mqtt stream, which it never sends")]
    Unexpected(&'static str),
    #[error("the platform did not say hello on the mqtt stream within {HELLO_TIMEOUT:?}")]
    NoHello,
    #[error("the mqtt stream was closed by the platform")]
    Closed,
    #[error("the platform's namespace for this device is not usable: {0}")]
    Namespace(WireError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Runs the bridge on `stream` until it fails or closes.
pub async fn run<S>(bridge: Arc<Bridge>, stream: S) -> Result<(), StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let hello = match tokio::time::timeout(
        HELLO_TIMEOUT,
        next_frame(&mut rd, &mut decoder, &mut buf),
    )
    .await
    {
        Err(_) => return Err(StreamError::NoHello),
        Ok(Ok(Frame::Hello(hello))) => hello,
        Ok(Ok(_)) => return Err(StreamError::Unexpected("a frame before its hello")),
        Ok(Err(e)) => return Err(e),
    };
    let namespace = Namespace::new(&hello.team, &bridge.device).map_err(StreamError::Namespace)?;
    info!(namespace = %namespace.prefix(), delivered = hello.delivered, "MQTT bridge up");
    let mut flow = Flow::new(bridge.clone(), namespace, &hello);
    flow.subscribe()?;

    let (live_tx, mut live_rx) = mpsc::channel(super::LIVE_QUEUE);
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    *bridge
        .live
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(live_tx);
    bridge.local.ack_to(Some(acks_tx));
    let _reset = Reset(bridge.clone());

    let mut appended = bridge.appended.subscribe();
    let mut idle = false;
    let mut figures_tick = tokio::time::interval(FIGURES_EVERY);
    let mut last_figures = Figures::default();
    if hello.delivered > 0 {
        resume(&bridge, hello.delivered).await?;
    }
    bridge.tail().stream_started();
    let hold = tokio::time::sleep(HOLD_MAX);
    tokio::pin!(hold);

    loop {
        if !flow.out.is_empty() {
            let now = tokio::time::Instant::now();
            if flow.write_due(now.into_std()) {
                wr.write_all(&flow.out).await?;
                wr.flush().await?;
                flow.wrote();
            } else if flow.hold(now.into_std()) {
                hold.as_mut().reset(now + HOLD_MAX);
            }
        }
        if !idle && flow.window_open() {
            // Seen before reading: what comes after wakes the stream.
            appended.borrow_and_update();
            let batch = next_batch(&bridge, flow.sent_up_to).await?;
            idle = batch.is_empty();
            flow.send_stored(batch)?;
            continue;
        }
        tokio::select! {
            frame = next_frame(&mut rd, &mut decoder, &mut buf) => {
                // Every frame already decoded is handled before the loop
                // reads the outbox again: the platform acknowledges in
                // batches, and one outbox read per frame cost a trip
                // through the blocking pool each.
                let mut next = Some(frame?);
                while let Some(frame) = next.take() {
                    flow.frame(frame).await?;
                    next = decoder.next_frame()?;
                }
                if let Some(upto) = flow.delete_due() {
                    if bridge.stored_messages() > 0 {
                        bridge.with_outbox(move |o| o.ack(upto)).await?;
                    }
                    flow.deleted = upto;
                }
            }
            changed = appended.changed(), if idle => {
                if changed.is_err() {
                    return Ok(());
                }
                idle = false;
            }
            message = live_rx.recv() => {
                let Some(message) = message else { return Ok(()) };
                flow.send_live(message)?;
            }
            ack = acks_rx.recv() => {
                if let Some((epoch, seq)) = ack {
                    flow.local_acked(epoch, seq)?;
                }
            }
            () = &mut hold, if flow.held_since.is_some() => {
                // Waited long enough: written at the top of the loop.
                flow.urgent = true;
            }
            _ = figures_tick.tick() => {
                let figures = bridge.figures();
                if figures != last_figures {
                    Frame::Figures(figures.clone()).encode(&mut flow.out)?;
                    last_figures = figures;
                }
            }
        }
    }
}

/// The next messages to send after `after`, in order: from the outbox
/// file while it has unsent ones, then those held in memory.
async fn next_batch(
    bridge: &Arc<Bridge>,
    after: u64,
) -> Result<Vec<(u64, Option<Message>)>, StreamError> {
    let held = |disk_empty| {
        bridge
            .tail()
            .read(after, disk_empty, READ_BATCH)
            .map(|held| {
                held.into_iter()
                    .map(|(seq, m)| (seq, Some(m)))
                    .collect::<Vec<_>>()
            })
    };
    if let Some(batch) = held(false) {
        return Ok(batch);
    }
    let stored = bridge
        .with_outbox(move |o| o.read_after(after, READ_BATCH, WINDOW_BYTES))
        .await?;
    if !stored.is_empty() {
        return Ok(stored);
    }
    Ok(held(true).unwrap_or_default())
}

/// The platform holds every message up to `delivered`: they leave the
/// outbox (and the tail), and new ones are numbered after them.
async fn resume(bridge: &Arc<Bridge>, delivered: u64) -> Result<(), StreamError> {
    let next = bridge
        .stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .next;
    if delivered >= next {
        tracing::warn!(
            platform = delivered,
            device = next,
            "the platform holds MQTT messages numbered beyond this device's outbox: was the state directory restored from a copy? New messages are numbered after the platform's"
        );
    }
    bridge.tail_acked(delivered);
    bridge
        .with_outbox(move |o| {
            o.ack(delivered)?;
            o.skip_to(delivered + 1)
        })
        .await?;
    bridge.tail().skip_to(delivered + 1);
    Ok(())
}

/// One stream's progress both ways, and the frames it has to send. One
/// method per thing that happens; the loop in [`run`] does the I/O.
struct Flow {
    bridge: Arc<Bridge>,
    namespace: Namespace,
    topics: Topics,
    max_payload: usize,
    /// The platform's numbering of its messages on this stream.
    epoch: u64,
    /// Frames to write.
    out: BytesMut,
    /// Frames in `out` that must not wait (acknowledgements to the
    /// platform, subscriptions).
    urgent: bool,
    /// Since when `out` has waited ([`HOLD_BYTES`]).
    held_since: Option<std::time::Instant>,
    /// Messages of `in_flight` already written (awaiting the platform).
    written: usize,
    /// Outbox messages sent and not acknowledged: `(seq, bytes)`.
    in_flight: VecDeque<(u64, usize)>,
    in_flight_bytes: usize,
    /// The last outbox message sent.
    sent_up_to: u64,
    /// The highest the platform acknowledged, and the highest deleted.
    acked_by_platform: u64,
    deleted: u64,
    /// Platform messages: the highest received, those published locally
    /// and not yet acknowledged there, and the highest acknowledged to the
    /// platform.
    received_up_to: u64,
    outstanding: BTreeSet<u64>,
    acked_to_platform: u64,
}

impl Flow {
    fn new(bridge: Arc<Bridge>, namespace: Namespace, hello: &Hello) -> Flow {
        let topics = Topics::new(&bridge.config.topics, &namespace, &bridge.device);
        Flow {
            max_payload: (hello.max_payload as usize).min(bridge.config.max_payload),
            bridge,
            namespace,
            topics,
            epoch: hello.epoch,
            out: BytesMut::new(),
            urgent: false,
            held_since: None,
            written: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            sent_up_to: hello.delivered,
            acked_by_platform: hello.delivered,
            deleted: hello.delivered,
            received_up_to: 0,
            outstanding: BTreeSet::new(),
            acked_to_platform: 0,
        }
    }

    /// The device's subscriptions, those outside its namespace refused.
    fn subscribe(&mut self) -> Result<(), StreamError> {
        let config = &self.bridge.config;
        let filters = config
            .subscribe
            .clone()
            .unwrap_or_else(|| self.namespace.default_inbound())
            .into_iter()
            .map(|f| (f, 2))
            .chain(self.topics.remote_filters());
        let mut subscriptions = Vec::new();
        for (filter, qos) in filters {
            match self.namespace.check_subscribe(&filter) {
                Ok(()) => subscriptions.push(Subscription { filter, qos }),
                Err(e) => self.bridge.refused(&filter, &e.to_string(), "agent"),
            }
        }
        Frame::Subscribe(subscriptions).encode(&mut self.out)?;
        self.urgent = true;
        Ok(())
    }

    /// Whether `out` is written now: something in it must not wait,
    /// nothing written awaits the platform, or it waited long enough or
    /// for enough bytes.
    fn write_due(&self, now: std::time::Instant) -> bool {
        self.urgent
            || self.written == 0
            || self.out.len() >= HOLD_BYTES
            || self.held_since.is_some_and(|at| now >= at + HOLD_MAX)
    }

    /// `out` waits from `now`; true if it just started to.
    fn hold(&mut self, now: std::time::Instant) -> bool {
        let started = self.held_since.is_none();
        self.held_since.get_or_insert(now);
        started
    }

    /// `out` was written.
    fn wrote(&mut self) {
        self.out.clear();
        self.urgent = false;
        self.held_since = None;
        self.written = self.in_flight.len();
    }

    fn window_open(&self) -> bool {
        self.in_flight.len() < WINDOW_MESSAGES && self.in_flight_bytes < WINDOW_BYTES
    }

    /// Frames outbox messages, in order, until the window is full;
    /// returns how many it took. One that cannot go (unreadable, outside
    /// the namespace, too large) is refused and audited, and only its
    /// number goes to the platform, which counts it as handled.
    fn send_stored(
        &mut self,
        batch: impl IntoIterator<Item = (u64, Option<Message>)>,
    ) -> Result<usize, StreamError> {
        let mut taken = 0;
        for (seq, message) in batch {
            if !self.window_open() {
                break;
            }
            taken += 1;
            self.sent_up_to = seq;
            let start = self.out.len();
            match self.check(message) {
                Ok(message) => {
                    Frame::Publish { seq, message }.encode(&mut self.out)?;
                    self.bridge.counters.sent.fetch_add(1, Relaxed);
                }
                Err((topic, reason)) => {
                    self.bridge.refused(&topic, &reason, "agent");
                    Frame::Refused(Refusal { seq, topic, reason }).encode(&mut self.out)?;
                }
            }
            let bytes = self.out.len() - start;
            self.in_flight.push_back((seq, bytes));
            self.in_flight_bytes += bytes;
        }
        Ok(taken)
    }

    /// A local message as it goes on the wire, or `(topic, reason)` why it
    /// cannot.
    fn check(&self, message: Option<Message>) -> Result<Message, (String, String)> {
        let Some(message) = message else {
            return Err((
                "(unreadable)".to_owned(),
                "the stored message cannot be read".to_owned(),
            ));
        };
        let m = self.topics.to_wire(message);
        match self
            .namespace
            .check_publish(&m.topic)
            .and_then(|()| m.check(self.max_payload))
        {
            Ok(()) => Ok(m),
            Err(e) => Err((m.topic, e.to_string())),
        }
    }

    /// A QoS 0 message from the local broker: sent now, never stored.
    fn send_live(&mut self, message: Message) -> Result<(), StreamError> {
        match self.check(Some(message)) {
            Ok(message) => {
                Frame::Publish { seq: 0, message }.encode(&mut self.out)?;
                self.bridge.counters.sent.fetch_add(1, Relaxed);
            }
            Err((topic, reason)) => self.bridge.refused(&topic, &reason, "agent"),
        }
        Ok(())
    }

    /// One frame from the platform.
    async fn frame(&mut self, frame: Frame) -> Result<(), StreamError> {
        match frame {
            Frame::Ack { seq } => self.platform_acked(seq),
            Frame::Refused(r) => self.bridge.refused(&r.topic, &r.reason, "platform"),
            Frame::Publish { seq, message } => self.platform_publish(seq, message).await?,
            Frame::Hello(_) => return Err(StreamError::Unexpected("a second hello")),
            Frame::Subscribe(_) | Frame::Figures(_) => {
                return Err(StreamError::Unexpected("a device's frame"));
            }
        }
        Ok(())
    }

    /// The platform has every outbox message up to `seq`.
    fn platform_acked(&mut self, seq: u64) {
        self.bridge.tail_acked(seq);
        while let Some(&(s, bytes)) = self.in_flight.front()
            && s <= seq
        {
            self.in_flight.pop_front();
            self.in_flight_bytes -= bytes;
            self.written = self.written.saturating_sub(1);
        }
        self.acked_by_platform = self.acked_by_platform.max(seq);
    }

    /// Up to where the outbox should delete now: once [`DELETE_BATCH`]
    /// numbers are acknowledged, or everything sent is.
    fn delete_due(&self) -> Option<u64> {
        let pending = self.acked_by_platform.saturating_sub(self.deleted);
        let due = pending >= DELETE_BATCH || (self.in_flight.is_empty() && pending > 0);
        due.then_some(self.acked_by_platform)
    }

    /// A message the platform routed to this device: published on the
    /// local broker unless it was seen already or is not this device's.
    async fn platform_publish(&mut self, seq: u64, message: Message) -> Result<(), StreamError> {
        self.bridge.counters.received.fetch_add(1, Relaxed);
        let routed = self.namespace.delivers(&message.topic)
            && message.check(self.bridge.config.max_payload).is_ok();
        if seq != 0 && seq <= self.received_up_to {
            // Sent again after a reconnect: handled or on its way.
        } else if !routed {
            self.bridge.refused(
                &message.topic,
                "the platform routed a message outside this device's namespace or over its limits",
                "agent",
            );
            self.received_up_to = self.received_up_to.max(seq);
        } else {
            self.received_up_to = self.received_up_to.max(seq);
            if seq != 0 {
                self.outstanding.insert(seq);
            }
            let local = self.topics.to_local(message);
            if !self.bridge.local.publish(self.epoch, seq, local).await {
                return Err(StreamError::Closed);
            }
        }
        self.ack_platform()
    }

    /// The local broker has platform message `seq` of `epoch`.
    fn local_acked(&mut self, epoch: u64, seq: u64) -> Result<(), StreamError> {
        if epoch != self.epoch {
            return Ok(());
        }
        self.outstanding.remove(&seq);
        self.ack_platform()
    }

    /// Acknowledges to the platform every message up to the first one the
    /// local broker has not acknowledged yet.
    fn ack_platform(&mut self) -> Result<(), StreamError> {
        let watermark = self
            .outstanding
            .first()
            .map_or(self.received_up_to, |first| first - 1);
        if watermark > self.acked_to_platform {
            self.acked_to_platform = watermark;
            Frame::Ack { seq: watermark }.encode(&mut self.out)?;
            self.urgent = true;
        }
        Ok(())
    }
}

/// The next frame: one already buffered, else read until one is whole.
/// Cancel-safe (a read's bytes are pushed in the same poll that returns
/// them), so it can race other work in a `select!`; frames that arrived in
/// one read with an earlier one are handed out without waiting for more.
async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Frame, StreamError> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(frame);
        }
        let n = rd.read(buf).await?;
        if n == 0 {
            return Err(StreamError::Closed);
        }
        decoder.push(&buf[..n]);
    }
}

/// Detaches the stream's channels from the bridge when it ends.
struct Reset(Arc<Bridge>);

impl Drop for Reset {
    fn drop(&mut self) {
        *self
            .0
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.0.local.ack_to(None);
        // What is held goes to disk and is acknowledged to the local
        // broker: the platform may be away for long.
        self.0.tail().stream_ended();
        self.0.flush_now.notify_one();
        debug!("MQTT bridge stream ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditQueue;
    use crate::config::MqttConfig;
    use tether_proto::mqtt::{Hello, Message, Properties};
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    async fn frame<R: AsyncRead + Unpin>(rd: &mut R, decoder: &mut FrameDecoder) -> Frame {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = decoder.next_frame().unwrap() {
                return f;
            }
            let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf))
                .await
                .expect("a frame in time")
                .unwrap();
            assert!(n > 0, "the device closed the stream");
            decoder.push(&buf[..n]);
        }
    }

    /// `bridge`'s stream running, and the platform's side of it, which the
    /// test plays.
    struct Platform {
        task: tokio::task::JoinHandle<Result<(), StreamError>>,
        rd: ReadHalf<DuplexStream>,
        wr: WriteHalf<DuplexStream>,
        /// The platform's hello (team `t`, epoch 1, nothing delivered),
        /// encoded for the test to send.
        hello: BytesMut,
    }

    fn started(bridge: &Arc<Bridge>) -> Platform {
        let (device, platform) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(run(bridge.clone(), device));
        let (rd, wr) = tokio::io::split(platform);
        let mut hello = BytesMut::new();
        Frame::Hello(Hello {
            team: "t".into(),
            epoch: 1,
            delivered: 0,
            max_payload: 1 << 20,
        })
        .encode(&mut hello)
        .unwrap();
        Platform {
            task,
            rd,
            wr,
            hello,
        }
    }

    /// The platform's side played by the test: a message routed outside the
    /// device's namespace is refused and audited, never published locally,
    /// and acknowledged so it is not sent again; a resend is ignored.
    #[tokio::test]
    async fn a_message_the_platform_routes_outside_the_namespace_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let audit =
            Arc::new(AuditQueue::open(dir.path(), 4 << 20, crate::clock::Clock::system()).unwrap());
        // Nothing listens there: the local client keeps retrying, and a
        // message handed to it would be counted as received and never acked.
        let config = MqttConfig {
            broker: "127.0.0.1:9".into(),
            ..MqttConfig::default()
        };
        let bridge = Bridge::start(&config, dir.path(), "dev-a", audit, 0).unwrap();
        let Platform {
            task,
            mut rd,
            mut wr,
            hello: mut out,
        } = started(&bridge);
        let mut decoder = FrameDecoder::new();
        let foreign = Message {
            topic: "tether/t/dev-b/in/cmd".into(),
            qos: 1,
            retain: false,
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(b"x"),
        };
        for _ in 0..2 {
            Frame::Publish {
                seq: 1,
                message: foreign.clone(),
            }
            .encode(&mut out)
            .unwrap();
        }
        wr.write_all(&out).await.unwrap();
        let Frame::Subscribe(filters) = frame(&mut rd, &mut decoder).await else {
            panic!("subscriptions first");
        };
        assert_eq!(filters.len(), 2);
        // The publishes came in the same read as the hello: they are
        // handled without waiting for more bytes.
        assert_eq!(frame(&mut rd, &mut decoder).await, Frame::Ack { seq: 1 });
        let figures = bridge.figures();
        assert_eq!((figures.refused, figures.received), (1, 2), "{figures:?}");
        task.abort();
    }

    /// A stream's progress for device `dev-a` of team `t`, its bridge's
    /// local broker unreachable (nothing is published anywhere).
    fn flow(dir: &std::path::Path) -> Flow {
        let audit =
            Arc::new(AuditQueue::open(dir, 4 << 20, crate::clock::Clock::system()).unwrap());
        let config = MqttConfig {
            broker: "127.0.0.1:9".into(),
            ..MqttConfig::default()
        };
        let bridge = Bridge::start(&config, dir, "dev-a", audit, 0).unwrap();
        let namespace = Namespace::new("t", "dev-a").unwrap();
        let hello = Hello {
            team: "t".into(),
            epoch: 7,
            delivered: 0,
            max_payload: 1 << 20,
        };
        Flow::new(bridge, namespace, &hello)
    }

    fn message(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            qos: 1,
            retain: false,
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(b"x"),
        }
    }

    fn frames(out: &mut BytesMut) -> Vec<Frame> {
        let mut decoder = FrameDecoder::new();
        decoder.push(out);
        out.clear();
        std::iter::from_fn(|| decoder.next_frame().unwrap()).collect()
    }

    #[tokio::test]
    async fn stored_messages_fill_the_window_and_one_outside_the_namespace_goes_as_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut flow = flow(dir.path());
        let batch = (1..=WINDOW_MESSAGES as u64 + 5).map(|seq| {
            let topic = match seq {
                3 => "tether/t/dev-b/out/x".to_owned(),
                _ => format!("tether/t/dev-a/out/{seq}"),
            };
            (seq, Some(message(&topic)))
        });
        assert_eq!(flow.send_stored(batch).unwrap(), WINDOW_MESSAGES);
        assert!(!flow.window_open());
        assert_eq!(flow.sent_up_to, WINDOW_MESSAGES as u64);
        let sent = frames(&mut flow.out);
        assert_eq!(sent.len(), WINDOW_MESSAGES);
        assert!(
            matches!(&sent[2], Frame::Refused(r) if r.seq == 3),
            "{:?}",
            sent[2]
        );
        assert!(matches!(&sent[3], Frame::Publish { seq: 4, .. }));
        assert_eq!(flow.bridge.figures().refused, 1);

        // Acknowledgements open the window; deletes wait for a batch of
        // them or for everything sent.
        flow.platform_acked(10);
        assert!(flow.window_open());
        assert_eq!(flow.delete_due(), None);
        flow.platform_acked(DELETE_BATCH);
        assert_eq!(flow.delete_due(), Some(DELETE_BATCH));
        flow.deleted = DELETE_BATCH;
        flow.platform_acked(WINDOW_MESSAGES as u64 - 1);
        assert_eq!(flow.delete_due(), None);
        flow.platform_acked(WINDOW_MESSAGES as u64);
        assert_eq!(flow.delete_due(), Some(WINDOW_MESSAGES as u64));
    }

    #[tokio::test]
    async fn while_messages_await_the_platform_new_ones_wait_for_bytes_time_or_an_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut flow = flow(dir.path());
        let t0 = std::time::Instant::now();
        let one = |seq: u64| [(seq, Some(message(&format!("tether/t/dev-a/out/{seq}"))))];
        // Nothing awaits the platform: a message leaves at once.
        flow.send_stored(one(1)).unwrap();
        assert!(flow.write_due(t0));
        flow.wrote();
        // 1 awaits the platform: 2 waits, up to HOLD_MAX.
        flow.send_stored(one(2)).unwrap();
        assert!(!flow.write_due(t0));
        assert!(flow.hold(t0), "the wait starts");
        assert!(!flow.hold(t0 + Duration::from_millis(1)), "and goes on");
        assert!(!flow.write_due(t0 + HOLD_MAX - Duration::from_micros(1)));
        assert!(flow.write_due(t0 + HOLD_MAX));
        // The platform acknowledges everything written: 2 leaves at once.
        flow.platform_acked(1);
        assert!(flow.write_due(t0));
        flow.wrote();
        assert_eq!(flow.held_since, None);
        // 2 awaits: more messages wait until they are HOLD_BYTES.
        let mut seq = 3;
        while flow.out.len() < HOLD_BYTES {
            assert!(!flow.write_due(t0), "{} bytes wait", flow.out.len());
            flow.send_stored(one(seq)).unwrap();
            seq += 1;
        }
        assert!(flow.write_due(t0));
        flow.wrote();
        // An acknowledgement to the platform never waits.
        flow.send_stored(one(seq)).unwrap();
        assert!(!flow.write_due(t0));
        flow.platform_publish(1, message("tether/t/dev-a/in/cmd"))
            .await
            .unwrap();
        flow.local_acked(7, 1).unwrap();
        assert!(flow.write_due(t0));
        assert!(frames(&mut flow.out).contains(&Frame::Ack { seq: 1 }));
    }

    /// In real time, through the stream's loop: a message held behind one
    /// the platform has not acknowledged leaves once `HOLD_MAX` has
    /// passed, with no acknowledgement and far from `HOLD_BYTES`.
    #[tokio::test]
    async fn a_held_message_leaves_after_the_hold_without_an_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        let bridge = flow(dir.path()).bridge;
        let store = |topic: &str| {
            let bridge = bridge.clone();
            let plan = Arc::new(bridge.tail().plan(vec![message(topic)]));
            async move {
                let records = plan.clone();
                bridge
                    .with_outbox(move |o| o.append(&records.records))
                    .await
                    .unwrap();
                bridge.tail().stored(&plan);
                bridge.appended.send_replace(());
                plan.records[0].0
            }
        };
        let first = store("tether/t/dev-a/out/1").await;
        let Platform {
            task,
            mut rd,
            mut wr,
            hello,
        } = started(&bridge);
        wr.write_all(&hello).await.unwrap();
        let mut decoder = FrameDecoder::new();
        let mut next_publish = async || loop {
            // Figures go out too (the first at once): not what is awaited.
            if let Frame::Publish { seq, .. } = frame(&mut rd, &mut decoder).await {
                return seq;
            }
        };
        assert_eq!(next_publish().await, first, "nothing awaited: at once");
        // Not acknowledged: the second waits for HOLD_MAX, not for the
        // next figures (FIGURES_EVERY) or an acknowledgement.
        let second = store("tether/t/dev-a/out/2").await;
        let seq = tokio::time::timeout(Duration::from_secs(1), next_publish())
            .await
            .expect("the held message left without an acknowledgement");
        assert_eq!(seq, second);
        task.abort();
    }

    #[tokio::test]
    async fn the_stream_reads_the_outbox_file_first_then_what_is_held() {
        use super::super::tail::Receipt;
        use tether_mqtt_client::QoS;
        let dir = tempfile::tempdir().unwrap();
        let bridge = flow(dir.path()).bridge;
        let seqs = |batch: &[(u64, Option<Message>)]| batch.iter().map(|b| b.0).collect::<Vec<_>>();
        // Two messages in the file (the platform was away), then one held
        // (a stream is up).
        let plan = Arc::new(bridge.tail().plan(vec![
            message("tether/t/dev-a/out/1"),
            message("tether/t/dev-a/out/2"),
        ]));
        let records = plan.clone();
        bridge
            .with_outbox(move |o| o.append(&records.records))
            .await
            .unwrap();
        assert!(bridge.tail().stored(&plan).receipts.is_empty());
        let first = plan.records[0].0;
        bridge.tail().stream_started();
        bridge.tail().reserved(u64::MAX);
        let receipt = Receipt {
            connection: 1,
            pkid: 9,
            qos: QoS::AtLeastOnce,
        };
        let held = message("tether/t/dev-a/out/3");
        let now = std::time::Instant::now();
        assert_eq!(bridge.tail().hold(vec![(held, receipt)], now), first + 2);
        assert_eq!(bridge.figures().outbox_messages, 3, "held ones count");

        let batch = next_batch(&bridge, first - 1).await.unwrap();
        assert_eq!(seqs(&batch), [first, first + 1], "the file first");
        let batch = next_batch(&bridge, first + 1).await.unwrap();
        assert_eq!(seqs(&batch), [first + 2], "then memory");
        assert_eq!(batch[0].1.as_ref().unwrap().topic, "tether/t/dev-a/out/3");
        // The file's messages acknowledged and deleted: the held one is
        // next, also for a stream that started before them.
        bridge.with_outbox(move |o| o.ack(first + 1)).await.unwrap();
        let batch = next_batch(&bridge, first - 1).await.unwrap();
        assert_eq!(seqs(&batch), [first + 2]);
        // Acknowledged by the platform: released.
        bridge.tail_acked(first + 2);
        assert!(next_batch(&bridge, first + 2).await.unwrap().is_empty());
        assert_eq!(bridge.figures().outbox_messages, 0);
    }

    #[tokio::test]
    async fn the_platform_is_acknowledged_up_to_the_first_message_the_local_broker_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let mut flow = flow(dir.path());
        for seq in 1..=3 {
            flow.platform_publish(seq, message("tether/t/dev-a/in/cmd"))
                .await
                .unwrap();
        }
        // Sent again after a reconnect: not published twice.
        flow.platform_publish(2, message("tether/t/dev-a/in/cmd"))
            .await
            .unwrap();
        assert_eq!(flow.outstanding.len(), 3);
        assert!(
            frames(&mut flow.out).is_empty(),
            "nothing is acknowledged yet"
        );
        flow.local_acked(7, 2).unwrap();
        flow.local_acked(6, 1).unwrap();
        assert!(
            frames(&mut flow.out).is_empty(),
            "1 is missing; epoch 6 is gone"
        );
        flow.local_acked(7, 1).unwrap();
        assert_eq!(frames(&mut flow.out), [Frame::Ack { seq: 2 }]);
        flow.local_acked(7, 3).unwrap();
        assert_eq!(frames(&mut flow.out), [Frame::Ack { seq: 3 }]);
        assert_eq!(flow.bridge.figures().received, 4);
    }
}
