//! One `mqtt` stream (`docs/protocol.md` §19): the platform's hello, the
//! device's subscriptions, the outbox sent in order within a window and
//! deleted as the platform acknowledges it, QoS 0 messages while the
//! stream is up, messages from the platform published on the local broker
//! and acknowledged once it has them, and the bridge's figures.
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
use tether_proto::mqtt::{
    Figures, Frame, FrameDecoder, MqttError as WireError, Namespace, Refusal, Subscription,
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
    let max_payload = (hello.max_payload as usize).min(bridge.config.max_payload);
    info!(namespace = %namespace.prefix(), delivered = hello.delivered, "MQTT bridge up");

    let mut out = BytesMut::new();
    let filters = bridge
        .config
        .subscribe
        .clone()
        .unwrap_or_else(|| namespace.default_inbound());
    let topics = Topics::new(&bridge.config.topics, &namespace, &bridge.device);
    let mut subscriptions = Vec::new();
    let filters = filters
        .into_iter()
        .map(|f| (f, 2))
        .chain(topics.remote_filters());
    for (filter, qos) in filters {
        match namespace.check_subscribe(&filter) {
            Ok(()) => subscriptions.push(Subscription { filter, qos }),
            Err(e) => bridge.refused(&filter, &e.to_string(), "agent"),
        }
    }
    Frame::Subscribe(subscriptions).encode(&mut out)?;

    let (live_tx, mut live_rx) = mpsc::channel(super::LIVE_QUEUE);
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    *bridge
        .live
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(live_tx);
    bridge.local.ack_to(Some(acks_tx));
    let _reset = Reset(bridge.clone());

    let mut appended = bridge.appended.subscribe();
    // Sent and not acknowledged: (seq, bytes).
    let mut in_flight: VecDeque<(u64, usize)> = VecDeque::new();
    let mut in_flight_bytes = 0usize;
    let mut sent_up_to = hello.delivered;
    let mut caught_up = false;
    // Platform messages: the highest seq received in this epoch, and those
    // published locally but not yet acknowledged there.
    let epoch = hello.epoch;
    let mut received_up_to = 0u64;
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    let mut acked_to_platform = 0u64;
    // Platform acknowledgements: the highest, and the highest deleted.
    let mut acked_by_platform = hello.delivered;
    let mut deleted = hello.delivered;
    let mut figures_tick = tokio::time::interval(FIGURES_EVERY);
    let mut last_figures = Figures::default();
    if hello.delivered > 0 {
        let next = bridge
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next;
        if hello.delivered >= next {
            tracing::warn!(
                platform = hello.delivered,
                device = next,
                "the platform holds MQTT messages numbered beyond this device's outbox: was the state directory restored from a copy? New messages are numbered after the platform's"
            );
        }
        let delivered = hello.delivered;
        bridge
            .with_outbox(move |o| {
                o.ack(delivered)?;
                o.skip_to(delivered + 1)
            })
            .await?;
    }

    loop {
        if !out.is_empty() {
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
        }
        if !caught_up && in_flight.len() < WINDOW_MESSAGES && in_flight_bytes < WINDOW_BYTES {
            let after = sent_up_to;
            let batch = bridge
                .with_outbox(move |o| o.read_after(after, READ_BATCH, WINDOW_BYTES))
                .await?;
            if batch.is_empty() {
                caught_up = true;
                continue;
            }
            for (seq, message) in batch {
                sent_up_to = seq;
                let checked = match message {
                    None => Err((
                        "(unreadable)".to_owned(),
                        "the stored message cannot be read".to_owned(),
                    )),
                    Some(m) => {
                        let m = topics.to_wire(m);
                        match namespace
                            .check_publish(&m.topic)
                            .and_then(|()| m.check(max_payload))
                        {
                            Ok(()) => Ok(m),
                            Err(e) => Err((m.topic.clone(), e.to_string())),
                        }
                    }
                };
                let message = match checked {
                    Ok(m) => m,
                    Err((topic, reason)) => {
                        // Its number goes to the platform, never the
                        // message: the platform counts it as handled.
                        bridge.refused(&topic, &reason, "agent");
                        let start = out.len();
                        Frame::Refused(Refusal { seq, topic, reason }).encode(&mut out)?;
                        in_flight.push_back((seq, out.len() - start));
                        in_flight_bytes += out.len() - start;
                        continue;
                    }
                };
                let start = out.len();
                Frame::Publish { seq, message }.encode(&mut out)?;
                in_flight.push_back((seq, out.len() - start));
                in_flight_bytes += out.len() - start;
                bridge
                    .counters
                    .sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if in_flight.len() >= WINDOW_MESSAGES || in_flight_bytes >= WINDOW_BYTES {
                    break;
                }
            }
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
                    match frame {
                        Frame::Ack { seq } => {
                            while let Some(&(s, bytes)) = in_flight.front() && s <= seq {
                                in_flight.pop_front();
                                in_flight_bytes -= bytes;
                            }
                            acked_by_platform = acked_by_platform.max(seq);
                            if acked_by_platform.saturating_sub(deleted) >= DELETE_BATCH
                                || (in_flight.is_empty() && acked_by_platform > deleted)
                            {
                                let upto = acked_by_platform;
                                bridge.with_outbox(move |o| o.ack(upto)).await?;
                                deleted = upto;
                            }
                        }
                        Frame::Refused(r) => {
                            bridge.refused(&r.topic, &r.reason, "platform");
                        }
                        Frame::Publish { seq, message } => {
                            bridge.counters.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let routed = namespace.delivers(&message.topic)
                                && message.check(bridge.config.max_payload).is_ok();
                            if seq != 0 && seq <= received_up_to {
                                // Sent again after a reconnect: handled or on its way.
                            } else if !routed {
                                bridge.refused(&message.topic, "the platform routed a message outside this device's namespace or over its limits", "agent");
                                received_up_to = received_up_to.max(seq);
                            } else {
                                received_up_to = received_up_to.max(seq);
                                if seq != 0 {
                                    outstanding.insert(seq);
                                }
                                if !bridge.local.publish(epoch, seq, topics.to_local(message)).await {
                                    return Err(StreamError::Closed);
                                }
                            }
                            ack_platform(&outstanding, received_up_to, &mut acked_to_platform, &mut out)?;
                        }
                        Frame::Hello(_) => return Err(StreamError::Unexpected("a second hello")),
                        Frame::Subscribe(_) | Frame::Figures(_) => {
                            return Err(StreamError::Unexpected("a device's frame"));
                        }
                    }
                    next = decoder.next_frame()?;
                }
            }
            changed = appended.changed(), if caught_up => {
                if changed.is_err() {
                    return Ok(());
                }
                caught_up = false;
            }
            message = live_rx.recv() => {
                let Some(message) = message else { return Ok(()) };
                let message = topics.to_wire(message);
                match namespace.check_publish(&message.topic).and_then(|()| message.check(max_payload)) {
                    Ok(()) => {
                        Frame::Publish { seq: 0, message }.encode(&mut out)?;
                        bridge.counters.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => bridge.refused(&message.topic, &e.to_string(), "agent"),
                }
            }
            ack = acks_rx.recv() => {
                if let Some((e, seq)) = ack && e == epoch {
                    outstanding.remove(&seq);
                    ack_platform(&outstanding, received_up_to, &mut acked_to_platform, &mut out)?;
                }
            }
            _ = figures_tick.tick() => {
                let figures = bridge.figures();
                if figures != last_figures {
                    Frame::Figures(figures.clone()).encode(&mut out)?;
                    last_figures = figures;
                }
            }
        }
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

/// Acknowledges to the platform every message up to the first one the
/// local broker has not acknowledged yet.
fn ack_platform(
    outstanding: &BTreeSet<u64>,
    received_up_to: u64,
    acked: &mut u64,
    out: &mut BytesMut,
) -> Result<(), StreamError> {
    let watermark = outstanding
        .first()
        .map_or(received_up_to, |first| first - 1);
    if watermark > *acked {
        *acked = watermark;
        Frame::Ack { seq: watermark }.encode(out)?;
    }
    Ok(())
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
        debug!("MQTT bridge stream ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditQueue;
    use crate::config::MqttConfig;
    use tether_proto::mqtt::{Hello, Message, Properties};

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
        let (device, platform) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(run(bridge.clone(), device));
        let (mut rd, mut wr) = tokio::io::split(platform);
        let mut decoder = FrameDecoder::new();
        let mut out = BytesMut::new();
        Frame::Hello(Hello {
            team: "t".into(),
            epoch: 1,
            delivered: 0,
            max_payload: 1 << 20,
        })
        .encode(&mut out)
        .unwrap();
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
}
