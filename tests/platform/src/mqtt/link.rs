//! One device's link to the broker: its MQTT 5 client (`tether-<device>`),
//! which outlives the device's streams, and everything kept for the device
//! between them.
//!
//! This module owns, per device: the messages the device sent that the
//! broker has not acknowledged yet (republished in order after a broker
//! reconnect, acknowledged to the device as a contiguous watermark once
//! the broker has them), the device's subscriptions (made again on every
//! broker ConnAck: the client asks for a clean session), the messages the broker routes
//! to the device until the device acknowledges them (bounded: oldest
//! dropped and counted), the refusals a stream must send, and the counts.
//! It never routes a message outside the device's namespace
//! ([`Namespace::delivers`] and one of the device's own filters), never
//! publishes one the namespace refuses, and never drops a device's QoS 1
//! or 2 message to make room: the stream stops reading instead
//! ([`Link::has_room`]). It does no I/O on the device's stream; the
//! connection to the broker is `tether_mqtt_client`'s loop (one write per
//! turn, what was in flight sent again after a reconnect, in order).

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_mqtt_client::{
    self as client, Deliveries, Filter, LinkError, Login, Outbound, Publish, RetainForwardRule,
    Session, Tag,
};
use tether_proto::mqtt::{
    Figures, MAX_FRAME, MAX_PAYLOAD, Message, Namespace, Refusal, Subscription, matches,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::broker::Endpoint;
use super::stream::Bucket;
use super::{MqttConfig, MqttStats};

/// A device's messages received and not yet acknowledged by the broker, at
/// most; past that its stream is not read.
pub const MAX_PENDING: usize = 1024;
/// ... and their bytes (one message more may be over it).
pub const MAX_PENDING_BYTES: usize = 2 * 1024 * 1024;
/// Publishes the client has in flight with the broker at once (a slot for
/// each is allocated up front).
const BROKER_INFLIGHT: u16 = 256;
/// While the device's messages are still on their way to the broker, its
/// acknowledgement waits for this many handled messages or bytes (a
/// quarter of the device's window): one ack frame per broker reply was
/// one wake-up of the device for every few messages. Once nothing is
/// pending, the ack goes at once.
pub(crate) const ACK_EVERY: u64 = 256;
const ACK_EVERY_BYTES: usize = 256 * 1024;
/// Messages queued to the client's loop beyond those in flight: every
/// pending message fits, so handing one over never waits.
const CLIENT_QUEUE: usize = MAX_PENDING + 1;
/// Refusals waiting for the device's stream, at most (oldest dropped;
/// they are counted either way).
const MAX_REFUSALS: usize = 1024;
/// How long a message the device published is remembered, to drop its
/// echo from a broker that ignores "no local" (rumqttd).
const ECHO_WINDOW: Duration = Duration::from_secs(10);
/// Echoes remembered at most.
const MAX_ECHOES: usize = 1024;
/// Broker reconnection: first and longest wait.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// The client's MQTT keep-alive.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a message from the device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not handed to the client yet (its queue was full).
    Unsent,
    /// Handed to the client; waiting for the broker's acknowledgement
    /// (the client sends it again after a broker reconnect).
    Sent,
    /// Acknowledged by the broker, or refused.
    Done,
}

/// A message from the device.
#[derive(Debug)]
struct Pending {
    /// Local order (the device's `seq` is 0 for every QoS 0 message).
    pid: u64,
    seq: u64,
    /// What the client publishes, until it is handed over.
    publish: Option<Publish>,
    size: usize,
    phase: Phase,
}

/// A message for the device.
#[derive(Debug)]
pub(crate) struct Out {
    /// Local order, also of QoS 0 messages.
    pub(crate) oid: u64,
    /// 0 for QoS 0.
    pub(crate) seq: u64,
    pub(crate) message: Message,
    size: usize,
    /// Written on a stream at least once.
    written: bool,
}

/// What one write on the device's stream carries, in this order.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) refusals: Vec<Refusal>,
    pub(crate) ack: Option<u64>,
    pub(crate) publishes: Vec<(u64, Message)>,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.refusals.is_empty() && self.ack.is_none() && self.publishes.is_empty()
    }
}

/// Where a stream is in the link's queues.
#[derive(Debug)]
pub(crate) struct Cursor {
    pub(crate) stream: u64,
    /// The lowest `oid` not yet written on this stream.
    next_oid: u64,
    /// The last acknowledgement sent on this stream.
    acked: u64,
}

#[derive(Debug, Default)]
struct LinkState {
    connected: bool,
    /// The client's connection number while connected.
    connection: u64,
    /// The broker was unreachable and that was logged (once until it is
    /// back).
    down_logged: bool,
    // Device → broker.
    /// The highest `seq` received from the device.
    received: u64,
    /// Every message up to it is handled (acknowledged by the broker or
    /// refused): the hello's `delivered`, and the acks.
    acked_through: u64,
    /// The device sent something again: acknowledge even if the watermark
    /// did not move.
    ack_due: bool,
    /// `acked_through` when the stream was last woken for it, and the
    /// bytes handled since ([`ACK_EVERY`]).
    ack_woken: u64,
    acked_bytes: usize,
    next_pid: u64,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Index in `pending` from which entries may be unsent.
    unsent_from: usize,
    echoes: VecDeque<(Instant, u64)>,
    // Broker → device.
    desired: Vec<Subscription>,
    on_broker: Vec<Subscription>,
    /// `desired` and `on_broker` may differ.
    subs_dirty: bool,
    /// Subscribe and unsubscribe requests the broker has not answered.
    subacks_due: u32,
    next_seq: u64,
    next_oid: u64,
    outbox: VecDeque<Out>,
    outbox_bytes: usize,
    /// The live stream's number, 0 without one.
    stream: u64,
    refusals: VecDeque<Refusal>,
    stats: MqttStats,
}

/// One device's client on the broker and its queues.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) device_id: String,
    pub(crate) ns: Namespace,
    client: client::Handle,
    state: Mutex<LinkState>,
    /// Bumped when a stream has something new to write.
    wake: watch::Sender<()>,
    /// Bumped when pending messages were handled (room to read more).
    room: watch::Sender<()>,
    /// rumqttd: drop echoes of the device's own messages.
    drop_echoes: bool,
    queue_messages: usize,
    queue_bytes: usize,
    /// The device's publish rate, across its streams.
    pub(crate) bucket: Mutex<Bucket>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Link {
    /// Creates the device's client and starts its event loop.
    pub(crate) fn start(
        endpoint: &Endpoint,
        device_id: &str,
        ns: Namespace,
        config: &MqttConfig,
    ) -> Arc<Link> {
        let url = &endpoint.url;
        let settings = client::Settings {
            host: url.host.clone(),
            port: url.port,
            tls: endpoint.tls.clone(),
            client_id: format!("tether-{device_id}"),
            keep_alive: KEEP_ALIVE,
            session: Session::Clean,
            inflight: BROKER_INFLIGHT,
            max_packet: (MAX_FRAME + 64 * 1024) as u32,
            login: url.username.as_ref().map(|user| {
                Login::new(
                    user.clone(),
                    url.password.as_ref().map_or("", |p| p.expose()),
                )
            }),
            filters: Vec::new(),
            manual_acks: false,
            connect_timeout: CONNECT_TIMEOUT,
            retry: (RETRY_FIRST, RETRY_MAX),
        };
        let (client, run) = client::new(settings, CLIENT_QUEUE);
        let link = Arc::new(Link {
            device_id: device_id.to_owned(),
            ns,
            client,
            state: Mutex::default(),
            wake: watch::channel(()).0,
            room: watch::channel(()).0,
            drop_echoes: endpoint.embedded,
            queue_messages: config.queue_messages,
            queue_bytes: config.queue_bytes,
            bucket: Mutex::new(Bucket::new(
                config.rate_per_sec,
                config.rate_burst,
                Instant::now(),
            )),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(client::run(run, link.clone()));
        *link.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
        link
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the event loop, which closes the connection to the broker.
    /// No MQTT DISCONNECT first: rumqttd then sees the connection end twice,
    /// and the second time may drop whichever client was given its id in
    /// between.
    pub(crate) fn stop(&self) {
        if let Some(task) = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }

    /// Makes `stream` the device's live stream (an older one stops at its
    /// next step). Returns the stream's cursor and the hello's `delivered`.
    pub(crate) fn attach(&self, stream: u64) -> (Cursor, u64) {
        let mut st = self.lock();
        st.stream = stream;
        st.ack_due = false;
        // What an older stream was to send goes with it; the counts stay.
        st.refusals.clear();
        self.wake.send_replace(());
        self.room.send_replace(());
        (
            Cursor {
                stream,
                next_oid: 0,
                acked: st.acked_through,
            },
            st.acked_through,
        )
    }

    /// The stream ended; the device is offline unless a newer one is live.
    pub(crate) fn detach(&self, stream: u64) {
        let mut st = self.lock();
        if st.stream == stream {
            st.stream = 0;
        }
    }

    pub(crate) fn is_current(&self, stream: u64) -> bool {
        self.lock().stream == stream
    }

    pub(crate) fn wake_receiver(&self) -> watch::Receiver<()> {
        self.wake.subscribe()
    }

    pub(crate) fn room_receiver(&self) -> watch::Receiver<()> {
        self.room.subscribe()
    }

    /// May the stream read another message from the device?
    pub(crate) fn has_room(&self) -> bool {
        let st = self.lock();
        st.pending.len() < MAX_PENDING && st.pending_bytes < MAX_PENDING_BYTES
    }

    /// The device's counts now.
    pub(crate) fn stats(&self) -> MqttStats {
        let st = self.lock();
        let mut stats = st.stats.clone();
        stats.stream = st.stream != 0;
        stats.broker_connected = st.connected;
        stats.subscribed = st.connected && !st.subs_dirty && st.subacks_due == 0;
        stats.filters = st.desired.iter().map(|s| s.filter.clone()).collect();
        stats.waiting = st.outbox.iter().filter(|o| !o.done()).count() as u64;
        stats.waiting_bytes = st
            .outbox
            .iter()
            .filter(|o| !o.done())
            .map(|o| o.size as u64)
            .sum();
        stats.delivered = st.acked_through;
        stats
    }

    /// The device's subscription list (it replaces the previous one).
    pub(crate) fn subscribe(&self, list: Vec<Subscription>) {
        let mut st = self.lock();
        let mut accepted: Vec<Subscription> = Vec::with_capacity(list.len());
        for s in list {
            let check = if s.qos > 2 {
                Err(format!("QoS {} is not 0, 1 or 2", s.qos))
            } else {
                self.ns
                    .check_subscribe(&s.filter)
                    .map_err(|e| e.to_string())
            };
            match check {
                Err(reason) => {
                    debug!(device_id = %self.device_id, filter = %s.filter, %reason, "MQTT: subscription refused");
                    refuse(&mut st, 0, &s.filter, reason);
                }
                Ok(()) => match accepted.iter_mut().find(|a| a.filter == s.filter) {
                    Some(same) => same.qos = same.qos.max(s.qos),
                    None => accepted.push(s),
                },
            }
        }
        st.desired = accepted;
        st.subs_dirty = true;
        self.sync_subscriptions(&mut st);
        drop(st);
        self.wake.send_replace(());
    }

    /// A message the device published (`seq` 0: QoS 0).
    pub(crate) fn device_published(&self, seq: u64, message: Message, max_payload: usize) {
        let mut st = self.lock();
        if seq != 0 && seq <= st.received {
            st.stats.duplicates += 1;
            st.ack_due = true;
            drop(st);
            self.wake.send_replace(());
            return;
        }
        if seq != 0 {
            st.received = seq;
        }
        let checked = self
            .ns
            .check_publish(&message.topic)
            .and_then(|()| message.check(max_payload));
        let pid = st.next_pid;
        st.next_pid += 1;
        if let Err(e) = checked {
            debug!(device_id = %self.device_id, seq, topic = %message.topic, cause = %e, "MQTT: message refused");
            refuse(&mut st, seq, &message.topic, e.to_string());
            if seq != 0 {
                st.pending.push_back(Pending {
                    pid,
                    seq,
                    publish: None,
                    size: 0,
                    phase: Phase::Done,
                });
                self.advance(&mut st);
            }
            drop(st);
            self.wake.send_replace(());
            return;
        }
        if self.drop_echoes && self.ns.delivers(&message.topic) {
            let now = Instant::now();
            if st.echoes.len() >= MAX_ECHOES {
                st.echoes.pop_front();
            }
            st.echoes
                .push_back((now, echo_key(&message.topic, &message.payload)));
        }
        let size = message.size();
        st.pending_bytes += size;
        st.pending.push_back(Pending {
            pid,
            seq,
            publish: Some(client::publish_of(message)),
            size,
            phase: Phase::Unsent,
        });
        self.flush(&mut st);
    }

    /// The device acknowledged every message up to `seq`.
    pub(crate) fn device_ack(&self, seq: u64) {
        let mut st = self.lock();
        let mut acked = 0;
        while let Some(front) = st.outbox.front() {
            let gone = if front.seq == 0 {
                front.written
            } else {
                front.seq <= seq
            };
            if !gone {
                break;
            }
            if front.seq != 0 {
                acked += 1;
            }
            let out = st.outbox.pop_front().expect("front exists");
            st.outbox_bytes -= out.size;
        }
        st.stats.acked_by_device += acked;
    }

    /// The device refused a message the platform sent it.
    pub(crate) fn device_refused(&self, refusal: Refusal) {
        let mut st = self.lock();
        st.stats.refused += 1;
        st.stats.last_refusal = Some(truncate(format!(
            "the device refused '{}': {}",
            refusal.topic, refusal.reason
        )));
    }

    pub(crate) fn figures(&self, figures: Figures) {
        self.lock().stats.figures = Some(figures);
    }

    /// What the stream at `cursor` should write next, at most about
    /// `max_bytes` of messages; `None` once a newer stream took over.
    pub(crate) fn next_batch(&self, cursor: &mut Cursor, max_bytes: usize) -> Option<Batch> {
        let mut st = self.lock();
        if st.stream != cursor.stream {
            return None;
        }
        let mut batch = Batch {
            refusals: st.refusals.drain(..).collect(),
            ..Batch::default()
        };
        if st.acked_through > cursor.acked || st.ack_due {
            batch.ack = Some(st.acked_through);
            cursor.acked = st.acked_through;
            st.ack_due = false;
        }
        let mut bytes = 0;
        let mut first_sends = 0;
        let start = st.outbox.partition_point(|o| o.oid < cursor.next_oid);
        for out in st.outbox.range_mut(start..) {
            if bytes >= max_bytes {
                break;
            }
            cursor.next_oid = out.oid + 1;
            if out.done() {
                continue;
            }
            if !out.written {
                out.written = true;
                first_sends += 1;
            }
            bytes += out.size;
            batch.publishes.push((out.seq, out.message.clone()));
        }
        st.stats.to_device += first_sends;
        // QoS 0 messages are gone once written.
        while st.outbox.front().is_some_and(|o| o.seq == 0 && o.written) {
            let out = st.outbox.pop_front().expect("front exists");
            st.outbox_bytes -= out.size;
        }
        Some(batch)
    }

    /// Makes the broker's subscriptions the device's.
    fn sync_subscriptions(&self, st: &mut LinkState) {
        if !st.connected || !st.subs_dirty {
            return;
        }
        st.subs_dirty = false;
        let removed: Vec<String> = st
            .on_broker
            .iter()
            .filter(|b| !st.desired.iter().any(|d| d.filter == b.filter))
            .map(|b| b.filter.clone())
            .collect();
        if !removed.is_empty() {
            st.on_broker.retain(|b| !removed.contains(&b.filter));
            self.client.unsubscribe(st.connection, removed);
            st.subacks_due += 1;
        }
        let added: Vec<Subscription> = st
            .desired
            .iter()
            .filter(|d| !st.on_broker.contains(d))
            .cloned()
            .collect();
        if added.is_empty() {
            return;
        }
        let filters = added
            .iter()
            .map(|s| Filter {
                path: s.filter.clone(),
                qos: client::qos(s.qos),
                // The device's own messages never come back to it (rumqttd
                // ignores this: see `drop_echoes`).
                nolocal: true,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        self.client.subscribe(st.connection, filters);
        st.subacks_due += 1;
        for s in added {
            st.on_broker.retain(|b| b.filter != s.filter);
            st.on_broker.push(s);
        }
    }

    /// Hands unsent messages to the client, in order, while its queue has
    /// room (the client holds them while the broker is away).
    fn flush(&self, st: &mut LinkState) {
        while st.unsent_from < st.pending.len() {
            let i = st.unsent_from;
            let entry = &mut st.pending[i];
            let publish = match entry.phase {
                Phase::Unsent => entry.publish.take(),
                _ => None,
            };
            let Some(publish) = publish else {
                st.unsent_from += 1;
                continue;
            };
            let outbound = Outbound {
                tag: (0, entry.pid),
                publish,
            };
            if let Err(back) = self.client.try_publish(outbound) {
                // The queue is full: again when the client reports next.
                entry.publish = Some(back.publish);
                return;
            }
            entry.phase = Phase::Sent;
            st.unsent_from += 1;
        }
    }

    /// Pops handled messages off the front; moves the watermark.
    fn advance(&self, st: &mut LinkState) {
        let before = st.acked_through;
        let mut popped = false;
        while st.pending.front().is_some_and(|p| p.phase == Phase::Done) {
            let p = st.pending.pop_front().expect("front exists");
            if p.seq != 0 {
                st.acked_through = st.acked_through.max(p.seq);
            }
            st.acked_bytes += p.size;
            st.unsent_from = st.unsent_from.saturating_sub(1);
            popped = true;
        }
        if popped {
            self.room.send_replace(());
        }
        let due = st.pending.is_empty()
            || st.acked_through.saturating_sub(st.ack_woken) >= ACK_EVERY
            || st.acked_bytes >= ACK_EVERY_BYTES;
        if st.acked_through != before && due {
            st.ack_woken = st.acked_through;
            st.acked_bytes = 0;
            self.wake.send_replace(());
        }
    }

    fn find(st: &mut LinkState, pid: u64) -> Option<&mut Pending> {
        let i = st.pending.binary_search_by_key(&pid, |p| p.pid).ok()?;
        st.pending.get_mut(i)
    }

    /// The broker has the message `pid`.
    fn complete(&self, st: &mut LinkState, pid: u64) {
        let Some(p) = Self::find(st, pid) else { return };
        if p.phase == Phase::Done {
            return;
        }
        p.phase = Phase::Done;
        let size = p.size;
        st.pending_bytes -= size;
        st.stats.from_device += 1;
        self.advance(st);
    }

    /// The broker refused the message `pid` on `topic`.
    fn broker_refused(&self, st: &mut LinkState, pid: u64, topic: &str, why: &str) {
        let Some(p) = Self::find(st, pid) else { return };
        if p.phase == Phase::Done {
            return;
        }
        p.phase = Phase::Done;
        let (seq, size) = (p.seq, p.size);
        st.pending_bytes -= size;
        warn!(device_id = %self.device_id, seq, %topic, reason = %why, "MQTT: the broker refused a device's message");
        refuse(st, seq, topic, format!("on the platform's side: {why}"));
        self.advance(st);
        self.wake.send_replace(());
    }

    /// A message the broker routed to the device's client.
    fn route_to_device(&self, st: &mut LinkState, publish: Publish) {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        if self.drop_echoes {
            let now = Instant::now();
            while st
                .echoes
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > ECHO_WINDOW)
            {
                st.echoes.pop_front();
            }
            let key = echo_key(topic, &publish.payload);
            if let Some(i) = st.echoes.iter().position(|(_, k)| *k == key) {
                st.echoes.remove(i);
                return;
            }
        }
        if !self.ns.delivers(topic) {
            return;
        }
        let Some(max_qos) = st
            .desired
            .iter()
            .filter(|s| matches(&s.filter, topic))
            .map(|s| s.qos)
            .max()
        else {
            return;
        };
        let Some(mut message) = client::message_of(&publish) else {
            return;
        };
        message.qos = message.qos.min(max_qos);
        if let Err(e) = message.check(MAX_PAYLOAD) {
            st.stats.refused += 1;
            st.stats.last_refusal = Some(truncate(format!(
                "a message for the device on '{topic}' cannot cross the tunnel: {e}"
            )));
            return;
        }
        if st.stream == 0 {
            if message.qos == 0 {
                st.stats.qos0_dropped += 1;
                return;
            }
            st.stats.queued_offline += 1;
        }
        let seq = if message.qos == 0 {
            0
        } else {
            st.next_seq += 1;
            st.next_seq
        };
        let oid = st.next_oid;
        st.next_oid += 1;
        let size = message.size();
        st.outbox_bytes += size;
        st.outbox.push_back(Out {
            oid,
            seq,
            message,
            size,
            written: false,
        });
        while st.outbox.len() > self.queue_messages || st.outbox_bytes > self.queue_bytes {
            let Some(old) = st.outbox.pop_front() else {
                break;
            };
            st.outbox_bytes -= old.size;
            if !old.done() {
                st.stats.dropped += 1;
            }
        }
        self.wake.send_replace(());
    }
}

/// What the device's client on the broker reports.
impl Deliveries for Link {
    async fn received(&self, _: u64, publish: Publish) -> bool {
        let mut st = self.lock();
        self.route_to_device(&mut st, publish);
        true
    }

    fn delivered(&self, (_, pid): Tag) {
        let mut st = self.lock();
        self.complete(&mut st, pid);
        self.flush(&mut st);
    }

    fn rejected(&self, (_, pid): Tag, topic: &str, reason: &str) {
        let mut st = self.lock();
        self.broker_refused(&mut st, pid, topic, reason);
        self.flush(&mut st);
    }

    fn connected(&self, connection: u64) {
        let mut st = self.lock();
        if st.down_logged {
            info!(device_id = %self.device_id, "MQTT: the device's broker client is connected again");
        }
        st.connected = true;
        st.connection = connection;
        st.down_logged = false;
        // A new session (clean start): subscribe to everything again.
        st.on_broker.clear();
        st.subs_dirty = true;
        st.subacks_due = 0;
        self.sync_subscriptions(&mut st);
        self.flush(&mut st);
    }

    /// What was in flight is sent again by the client after the next
    /// ConnAck (as new messages: a clean session forgets them).
    fn disconnected(&self, error: &LinkError, _: Duration, _: bool) {
        let mut st = self.lock();
        if !st.down_logged {
            st.down_logged = true;
            warn!(device_id = %self.device_id, cause = %error, "MQTT: the device's broker client is disconnected; retrying");
        }
        st.connected = false;
    }

    fn subscribed(&self, refused: Vec<(String, String)>) {
        let mut st = self.lock();
        st.subacks_due = st.subacks_due.saturating_sub(1);
        for (filter, code) in refused {
            warn!(device_id = %self.device_id, %filter, reason = %code, "MQTT: the broker refused a subscription change of the device");
            st.stats.refused += 1;
            st.stats.last_refusal = Some(truncate(format!(
                "the platform's broker refused a subscription change for '{filter}': {code}"
            )));
        }
    }
}

impl Out {
    /// A QoS 0 message already written needs nothing more.
    fn done(&self) -> bool {
        self.seq == 0 && self.written
    }
}

/// Counts a refusal and queues it for the live stream.
fn refuse(st: &mut LinkState, seq: u64, topic: &str, reason: String) {
    st.stats.refused += 1;
    st.stats.last_refusal = Some(truncate(format!("'{topic}': {reason}")));
    if st.stream != 0 {
        if st.refusals.len() >= MAX_REFUSALS {
            st.refusals.pop_front();
        }
        st.refusals.push_back(Refusal {
            seq,
            topic: topic.chars().take(256).collect(),
            reason,
        });
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > 512 {
        let mut end = 512;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn echo_key(topic: &str, payload: &Bytes) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::broker::BrokerUrl;

    /// While a device's messages are on their way to the broker, its
    /// stream is woken for an acknowledgement once per [`ACK_EVERY`]
    /// handled messages, and at once when nothing is left pending.
    #[tokio::test]
    async fn acknowledgements_wake_the_stream_per_batch_and_when_nothing_is_pending() {
        // Nothing listens there: the client holds what it is given, and
        // the test plays the broker's replies.
        let endpoint = Endpoint {
            url: BrokerUrl::parse("mqtt://127.0.0.1:9").unwrap(),
            v4: None,
            embedded: false,
            tls: None,
        };
        let ns = Namespace::new("t", "dev").unwrap();
        let link = Link::start(&endpoint, "dev", ns, &MqttConfig::default());
        let mut wake = link.wake_receiver();
        let burst = 2 * ACK_EVERY + 10;
        for seq in 1..=burst {
            let message = Message {
                topic: format!("tether/t/dev/out/{seq}"),
                qos: 1,
                retain: false,
                properties: Default::default(),
                payload: Bytes::from_static(b"x"),
            };
            link.device_published(seq, message, 1024);
        }
        wake.borrow_and_update();
        let mut woken = Vec::new();
        // The broker's replies, one at a time (pids are numbered from 0).
        for pid in 0..burst {
            link.delivered((0, pid));
            if wake.has_changed().unwrap() {
                wake.borrow_and_update();
                woken.push(pid + 1);
            }
        }
        assert_eq!(woken, [ACK_EVERY, 2 * ACK_EVERY, burst]);
        link.stop();
    }
}
