//! The agent's connection to the device's local MQTT 5 broker: rumqttc's
//! protocol state (`MqttState`) and packet codec, driven by an event loop
//! of the bridge's own.
//!
//! This module owns the socket to the local broker: connecting (TCP, TLS
//! when configured), the session (kept by the broker while the agent is
//! away), subscribing on every ConnAck, keep-alive, packet ids of the
//! platform's messages and their retransmission after a reconnect. Each
//! turn of the loop writes everything the turn produced with one system
//! call: the acknowledgements of a whole outbox batch, every publish
//! ready, the replies to every packet read. rumqttc's own event loop
//! writes each request with its own call (bytebeamio/rumqtt#810), which
//! was a fifth of `tetherd`'s time under QoS 1 load.
//!
//! It never decides what a message means (the bridge does: [`super::local`]),
//! never acknowledges a message from the broker by itself (only what
//! [`Handle::ack`] is given, and only on the connection that delivered
//! it), and never logs the broker password.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Filter, Login, Packet, PubAck,
    PubAckReason, PubRec, PubRecReason, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use rumqttc::v5::{Event, MqttState, Request, StateError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Who waits for the local broker's acknowledgement of a platform
/// message: `(epoch, seq)` of the stream that carried it.
pub type Tag = (u64, u64);

/// How long connecting, TLS and the ConnAck may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between attempts to reach the local broker.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Requests taken from a channel in one turn, at most: reading the socket
/// comes round again after them.
const TURN: usize = 1024;
/// Bytes read from the socket at once, at least.
const READ_CHUNK: usize = 64 * 1024;

/// Why a connection to the local broker ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the broker did not answer the connection within {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("the broker's certificate cannot be checked against the host name '{0}'")]
    ServerName(String),
    #[error(
        "the broker refused the connection ({0:?}); check [mqtt] username, password and client_id"
    )]
    Refused(ConnectReturnCode),
    #[error("the broker sent {0} before its ConnAck")]
    NoConnAck(&'static str),
    #[error("the broker closed the connection")]
    Closed,
    #[error("MQTT protocol error: {0}")]
    State(#[from] StateError),
    #[error("malformed MQTT packet from the broker: {0}")]
    Codec(String),
}

impl From<CodecError> for LinkError {
    fn from(e: CodecError) -> Self {
        LinkError::Codec(e.to_string())
    }
}

/// What the connection is made with: fixed when the bridge starts.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub keep_alive: Duration,
    pub session_expiry: u32,
    /// Messages either side may hold unacknowledged from the other.
    pub inflight: u16,
    /// The largest packet the agent accepts from the broker.
    pub max_packet: u32,
    pub login: Option<Login>,
    /// What the agent subscribes to (no-local: it never gets back what it
    /// publishes).
    pub filters: Vec<(String, QoS)>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("client_id", &self.client_id)
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

/// A platform message for the local broker.
#[derive(Debug)]
pub struct Outbound {
    pub tag: Tag,
    pub publish: Publish,
}

/// The acknowledgements of messages the broker delivered on one
/// connection, in the order it delivered them.
#[derive(Debug)]
struct Acks {
    connection: u64,
    packets: Vec<(u16, QoS)>,
}

/// What the loop reports to the bridge.
pub trait Deliveries: Send + Sync + 'static {
    /// A message from the broker on `connection`; QoS 1 and 2 ones are
    /// acknowledged only through [`Handle::ack`]. `false`: the bridge is
    /// gone.
    fn received(
        &self,
        connection: u64,
        publish: Publish,
    ) -> impl std::future::Future<Output = bool> + Send;
    /// The broker has the platform message `tag` (QoS 0: it was written).
    fn delivered(&self, tag: Tag);
    /// The broker would not take the platform message `tag` on `topic`.
    fn rejected(&self, tag: Tag, topic: &str, reason: &str);
}

/// The bridge's side of the connection.
#[derive(Clone, Debug)]
pub struct Handle {
    outbound: mpsc::Sender<Outbound>,
    acks: mpsc::UnboundedSender<Acks>,
}

impl Handle {
    /// Queues a platform message for the broker; waits while `inflight`
    /// are queued (the broker is slow or away). `false`: the loop is gone.
    pub async fn publish(&self, outbound: Outbound) -> bool {
        self.outbound.send(outbound).await.is_ok()
    }

    /// Acknowledges messages the broker delivered on `connection`, in the
    /// order given (the order it delivered them); dropped if that
    /// connection has ended (the broker delivers them again).
    pub fn ack(&self, connection: u64, packets: Vec<(u16, QoS)>) {
        if !packets.is_empty() {
            let _ = self.acks.send(Acks {
                connection,
                packets,
            });
        }
    }
}

/// The loop's half, until it runs.
#[derive(Debug)]
pub struct Client {
    settings: Settings,
    outbound: mpsc::Receiver<Outbound>,
    acks: mpsc::UnboundedReceiver<Acks>,
}

/// A client for `settings` and the handle to it.
pub fn new(settings: Settings) -> (Handle, Client) {
    let (outbound_tx, outbound) = mpsc::channel(usize::from(settings.inflight.max(1)));
    let (acks_tx, acks) = mpsc::unbounded_channel();
    (
        Handle {
            outbound: outbound_tx,
            acks: acks_tx,
        },
        Client {
            settings,
            outbound,
            acks,
        },
    )
}

/// A platform message in flight with the broker.
#[derive(Debug)]
struct Slot {
    tag: Tag,
    topic: Bytes,
    /// When it was first handed to the broker, to resend in that order.
    order: u64,
}

/// Packet ids of platform messages in flight. The agent picks them itself
/// (from `1..=window`, the next free one after the last), so a publish
/// never takes an id the broker has not acknowledged yet.
#[derive(Debug)]
struct Slots {
    by_pkid: Vec<Option<Slot>>,
    last: u16,
    used: u16,
    window: u16,
    order: u64,
}

impl Slots {
    fn new(inflight: u16) -> Slots {
        Slots {
            by_pkid: (0..=inflight).map(|_| None).collect(),
            last: 0,
            used: 0,
            window: inflight,
            order: 0,
        }
    }

    fn free(&self) -> bool {
        self.used < self.window
    }

    fn take(&mut self, tag: Tag, topic: Bytes) -> Option<u16> {
        if !self.free() {
            return None;
        }
        let window = u32::from(self.window);
        let last = u32::from(self.last);
        let pkid = (1..=window)
            .map(|i| ((last + i - 1) % window + 1) as u16)
            .find(|&p| self.by_pkid[usize::from(p)].is_none())?;
        self.order += 1;
        self.by_pkid[usize::from(pkid)] = Some(Slot {
            tag,
            topic,
            order: self.order,
        });
        self.last = pkid;
        self.used += 1;
        Some(pkid)
    }

    fn release(&mut self, pkid: u16) -> Option<Slot> {
        let slot = self.by_pkid.get_mut(usize::from(pkid))?.take()?;
        self.used -= 1;
        Some(slot)
    }

    fn order(&self, pkid: u16) -> u64 {
        self.by_pkid
            .get(usize::from(pkid))
            .and_then(|s| s.as_ref())
            .map_or(u64::MAX, |s| s.order)
    }
}

/// Runs the client until the bridge is gone: connects, runs each
/// connection until it fails, and connects again with a growing pause.
pub async fn run<D: Deliveries>(client: Client, deliveries: Arc<D>) {
    let Client {
        settings,
        mut outbound,
        mut acks,
    } = client;
    let mut state = MqttState::new(settings.inflight, true);
    let mut slots = Slots::new(settings.inflight);
    let mut pending: Vec<Request> = Vec::new();
    let mut retry = Duration::from_secs(1);
    let mut reported = false;
    let mut connection = 0u64;
    let broker = format!("{}:{}", settings.host, settings.port);
    loop {
        let failure = match connect(&settings).await {
            Ok((io, connack, read)) => {
                connection += 1;
                info!(broker, "connected to the local MQTT broker");
                retry = Duration::from_secs(1);
                reported = false;
                let mut link = Link {
                    settings: &settings,
                    io,
                    read,
                    write: BytesMut::new(),
                    state: &mut state,
                    slots: &mut slots,
                    deliveries: deliveries.as_ref(),
                    connection,
                    max_out: None,
                };
                let ended = link
                    .run(
                        &mut outbound,
                        &mut acks,
                        connack,
                        std::mem::take(&mut pending),
                    )
                    .await;
                pending = resend(&mut state, &slots);
                match ended {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        if reported {
            debug!(cause = %failure, "local MQTT broker still unreachable");
        } else {
            warn!(broker, cause = %failure, retry_in = ?retry, "cannot reach the local MQTT broker; retrying");
            reported = true;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// What was in flight when a connection ended, to send first on the next
/// one: publishes in the order they were first sent, marked as
/// duplicates, then the releases of QoS 2 ones the broker has.
fn resend(state: &mut MqttState, slots: &Slots) -> Vec<Request> {
    let mut pending = state.clean();
    for request in &mut pending {
        if let Request::Publish(p) = request {
            p.dup = true;
        }
    }
    pending.sort_by_key(|r| match r {
        Request::Publish(p) => (0, slots.order(p.pkid)),
        _ => (1, 0),
    });
    pending
}

/// Something to read and write.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects, says CONNECT and waits for the ConnAck; returns the
/// connection, the ConnAck and whatever the broker sent after it.
async fn connect(settings: &Settings) -> Result<(Box<dyn Io>, ConnAck, BytesMut), LinkError> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect((settings.host.as_str(), settings.port)).await?;
        // Every turn is one small write: without this, Nagle's algorithm
        // holds it for the broker's delayed acknowledgement.
        tcp.set_nodelay(true)?;
        let mut io: Box<dyn Io> = match &settings.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(settings.host.clone())
                    .map_err(|_| LinkError::ServerName(settings.host.clone()))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                Box::new(connector.connect(name, tcp).await?)
            }
        };
        let mut properties = ConnectProperties::new();
        properties.session_expiry_interval = Some(settings.session_expiry);
        properties.receive_maximum = Some(settings.inflight);
        properties.max_packet_size = Some(settings.max_packet);
        let connect = Packet::Connect(
            Connect {
                keep_alive: u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX),
                client_id: settings.client_id.clone(),
                clean_start: false,
                properties: Some(properties),
            },
            None,
            settings.login.clone(),
        );
        let mut out = BytesMut::new();
        connect.write(&mut out, None)?;
        io.write_all(&out).await?;
        let mut read = BytesMut::with_capacity(READ_CHUNK);
        loop {
            match Packet::read(&mut read, Some(settings.max_packet)) {
                Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                    return Ok((io, ack, read));
                }
                Ok(Packet::ConnAck(ack)) => return Err(LinkError::Refused(ack.code)),
                Ok(_) => return Err(LinkError::NoConnAck("another packet")),
                Err(CodecError::InsufficientBytes(_)) => {
                    if io.read_buf(&mut read).await? == 0 {
                        return Err(LinkError::Closed);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, work)
        .await
        .map_err(|_| LinkError::Timeout)?
}

/// One connection, up.
struct Link<'a, D> {
    settings: &'a Settings,
    io: Box<dyn Io>,
    read: BytesMut,
    write: BytesMut,
    state: &'a mut MqttState,
    slots: &'a mut Slots,
    deliveries: &'a D,
    connection: u64,
    /// The largest packet the broker takes.
    max_out: Option<u32>,
}

impl<D: Deliveries> Link<'_, D> {
    /// Runs the connection until it fails (`Err`) or the bridge is gone
    /// (`Ok`).
    async fn run(
        &mut self,
        outbound: &mut mpsc::Receiver<Outbound>,
        acks: &mut mpsc::UnboundedReceiver<Acks>,
        connack: ConnAck,
        pending: Vec<Request>,
    ) -> Result<(), LinkError> {
        let settings = self.settings;
        let mut keep_alive = settings.keep_alive.max(Duration::from_secs(1));
        // This broker's limits, not the last one's.
        self.slots.window = settings.inflight;
        if let Some(p) = &connack.properties {
            self.max_out = p.max_packet_size;
            if let Some(window) = p.receive_max {
                self.slots.window = window.clamp(1, settings.inflight);
            }
            if let Some(secs) = p.server_keep_alive.filter(|s| *s > 0) {
                keep_alive = Duration::from_secs(secs.into());
            }
        }
        self.incoming(Packet::ConnAck(connack)).await?;
        let filters = settings.filters.iter().map(|(f, qos)| Filter {
            nolocal: true,
            ..Filter::new(f.clone(), *qos)
        });
        self.send(Request::Subscribe(Subscribe::new_many(filters, None)))?;
        for request in pending {
            self.send(request)?;
        }
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        // A loop held up past a tick pings once, not once per missed tick
        // (a second ping before the first's answer ends the connection).
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_in = settings.max_packet;
        loop {
            if !self.write.is_empty() {
                self.io.write_all(&self.write).await?;
                self.write.clear();
            }
            if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
                self.read.reserve(READ_CHUNK);
            }
            let free = self.slots.free();
            tokio::select! {
                n = self.io.read_buf(&mut self.read) => {
                    if n? == 0 {
                        return Err(LinkError::Closed);
                    }
                    loop {
                        match Packet::read(&mut self.read, Some(max_in)) {
                            Ok(packet) => self.incoming(packet).await?,
                            Err(CodecError::InsufficientBytes(_)) => break,
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                batch = acks.recv() => {
                    let Some(batch) = batch else { return Ok(()) };
                    self.acks(batch)?;
                    for _ in 1..TURN {
                        match acks.try_recv() {
                            Ok(batch) => self.acks(batch)?,
                            Err(_) => break,
                        }
                    }
                }
                next = outbound.recv(), if free => {
                    let Some(next) = next else { return Ok(()) };
                    self.publish(next)?;
                    for _ in 1..TURN {
                        if !self.slots.free() {
                            break;
                        }
                        match outbound.try_recv() {
                            Ok(next) => self.publish(next)?,
                            Err(_) => break,
                        }
                    }
                }
                _ = ping.tick() => self.send(Request::PingReq)?,
            }
        }
    }

    /// Puts what `request` makes the state send into the write buffer.
    fn send(&mut self, request: Request) -> Result<(), LinkError> {
        if let Some(packet) = self.state.handle_outgoing_packet(request)? {
            packet.write(&mut self.write, None)?;
        }
        self.events();
        Ok(())
    }

    /// Hands a packet from the broker to the state, queues its reply, and
    /// reports what it means.
    async fn incoming(&mut self, packet: Packet) -> Result<(), LinkError> {
        if let Some(reply) = self.state.handle_incoming_packet(packet)? {
            reply.write(&mut self.write, None)?;
        }
        while let Some(event) = self.state.events.pop_front() {
            let Event::Incoming(packet) = event else {
                continue;
            };
            match packet {
                Packet::Publish(publish) => self.received(publish).await?,
                Packet::PubAck(ack) => {
                    let refused = !matches!(
                        ack.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    );
                    self.done(ack.pkid, refused.then(|| format!("{:?}", ack.reason)));
                }
                Packet::PubRec(rec)
                    if !matches!(
                        rec.reason,
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                    ) =>
                {
                    // The exchange ends here: no release follows.
                    self.done(rec.pkid, Some(format!("{:?}", rec.reason)));
                }
                Packet::PubComp(comp) => self.done(comp.pkid, None),
                Packet::SubAck(ack) => {
                    // Codes come in the order of the filters asked for.
                    let refused: Vec<String> = ack
                        .return_codes
                        .iter()
                        .zip(&self.settings.filters)
                        .filter(|(code, _)| !matches!(code, SubscribeReasonCode::Success(_)))
                        .map(|(code, (filter, _))| format!("{filter} ({code:?})"))
                        .collect();
                    if !refused.is_empty() {
                        warn!(
                            ?refused,
                            "the local MQTT broker refused some of the agent's subscriptions"
                        );
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn received(&mut self, publish: Publish) -> Result<(), LinkError> {
        match self.deliveries.received(self.connection, publish).await {
            true => Ok(()),
            false => Err(LinkError::Closed),
        }
    }

    /// Drops the state's reports of what it sent: the loop knows.
    fn events(&mut self) {
        self.state.events.clear();
    }

    /// The broker finished with platform message `pkid`.
    fn done(&mut self, pkid: u16, refused: Option<String>) {
        let Some(slot) = self.slots.release(pkid) else {
            return;
        };
        match refused {
            None => self.deliveries.delivered(slot.tag),
            Some(reason) => self.deliveries.rejected(
                slot.tag,
                &String::from_utf8_lossy(&slot.topic),
                &format!("the local broker refused it: {reason}"),
            ),
        }
    }

    fn acks(&mut self, acks: Acks) -> Result<(), LinkError> {
        if acks.connection != self.connection {
            // That connection's messages come again, with this one's ids.
            return Ok(());
        }
        for (pkid, qos) in acks.packets {
            let request = match qos {
                QoS::AtMostOnce => continue,
                QoS::AtLeastOnce => Request::PubAck(PubAck::new(pkid, None)),
                QoS::ExactlyOnce => Request::PubRec(PubRec::new(pkid, None)),
            };
            self.send(request)?;
        }
        Ok(())
    }

    /// Sends a platform message: a packet id of its own for QoS 1 and 2;
    /// one larger than the broker takes is rejected, not sent.
    fn publish(&mut self, outbound: Outbound) -> Result<(), LinkError> {
        let Outbound { tag, mut publish } = outbound;
        let size = publish.size() + 2;
        if let Some(max) = self.max_out
            && size > max as usize
        {
            self.deliveries.rejected(
                tag,
                &String::from_utf8_lossy(&publish.topic),
                &format!("{size} bytes is more than the local broker takes ({max})"),
            );
            return Ok(());
        }
        if publish.qos == QoS::AtMostOnce {
            self.send(Request::Publish(publish))?;
            self.deliveries.delivered(tag);
            return Ok(());
        }
        let Some(pkid) = self.slots.take(tag, publish.topic.clone()) else {
            // Not reached: the loop takes a message only with a slot free.
            return Err(LinkError::State(StateError::InvalidState));
        };
        publish.pkid = pkid;
        self.send(Request::Publish(publish))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_are_never_reused_while_in_flight_and_wrap_in_the_window() {
        let mut slots = Slots::new(4);
        let topic = Bytes::from_static(b"t");
        let ids: Vec<u16> = (0..4)
            .map(|n| slots.take((1, n), topic.clone()).unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(
            slots.take((1, 9), topic.clone()),
            None,
            "the window is full"
        );
        // Acknowledged out of order: the free id after the last is taken.
        assert_eq!(slots.release(3).unwrap().tag, (1, 2));
        assert!(slots.release(3).is_none(), "an id is released once");
        assert_eq!(slots.take((1, 4), topic.clone()), Some(3));
        slots.release(1);
        slots.release(2);
        assert_eq!(slots.take((1, 5), topic.clone()), Some(1));
        assert_eq!(slots.take((1, 6), topic.clone()), Some(2));
        // A broker's smaller window after a reconnect holds new ones back.
        slots.release(4);
        slots.window = 2;
        assert!(!slots.free());
        slots.release(3);
        slots.release(2);
        assert_eq!(slots.take((1, 7), topic), Some(2));
    }

    #[test]
    fn what_was_in_flight_is_resent_in_first_sent_order_as_duplicates() {
        let mut state = MqttState::new(8, true);
        let mut slots = Slots::new(8);
        let topic = Bytes::from_static(b"t");
        // Ids wrap: the message sent first has the higher id.
        slots.last = 6;
        for n in 0..4 {
            let pkid = slots.take((1, n), topic.clone()).unwrap();
            let mut p = Publish::new("t", QoS::AtLeastOnce, vec![n as u8], None);
            p.pkid = pkid;
            state.handle_outgoing_packet(Request::Publish(p)).unwrap();
        }
        let pending = resend(&mut state, &slots);
        let sent: Vec<(u16, u8, bool)> = pending
            .iter()
            .map(|r| match r {
                Request::Publish(p) => (p.pkid, p.payload[0], p.dup),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sent,
            [(7, 0, true), (8, 1, true), (1, 2, true), (2, 3, true)]
        );
    }

    /// What a connection reported.
    #[derive(Default)]
    struct Record {
        delivered: std::sync::Mutex<Vec<Tag>>,
        rejected: std::sync::Mutex<Vec<(Tag, String)>>,
    }

    impl Deliveries for Record {
        async fn received(&self, _: u64, _: Publish) -> bool {
            true
        }
        fn delivered(&self, tag: Tag) {
            self.delivered.lock().unwrap().push(tag);
        }
        fn rejected(&self, tag: Tag, _: &str, reason: &str) {
            self.rejected.lock().unwrap().push((tag, reason.to_owned()));
        }
    }

    fn settings() -> Settings {
        Settings {
            host: "127.0.0.1".into(),
            port: 1,
            tls: None,
            client_id: "t".into(),
            keep_alive: Duration::from_secs(30),
            session_expiry: 60,
            inflight: 4,
            max_packet: 1 << 20,
            login: None,
            filters: vec![("dev/out/#".into(), QoS::AtLeastOnce)],
        }
    }

    /// A connection up, over a socket nobody reads: what it would send is
    /// in `write`.
    fn link<'a>(
        settings: &'a Settings,
        state: &'a mut MqttState,
        slots: &'a mut Slots,
        record: &'a Record,
        connection: u64,
        max_out: Option<u32>,
    ) -> Link<'a, Record> {
        Link {
            settings,
            io: Box::new(tokio::io::duplex(64).0),
            read: BytesMut::new(),
            write: BytesMut::new(),
            state,
            slots,
            deliveries: record,
            connection,
            max_out,
        }
    }

    fn packets(mut bytes: BytesMut) -> Vec<Packet> {
        std::iter::from_fn(|| Packet::read(&mut bytes, None).ok()).collect()
    }

    #[tokio::test]
    async fn acknowledgements_go_only_on_the_connection_that_delivered() {
        let (settings, record) = (settings(), Record::default());
        let (mut state, mut slots) = (MqttState::new(4, true), Slots::new(4));
        let mut link = link(&settings, &mut state, &mut slots, &record, 2, None);
        let acks = |connection| Acks {
            connection,
            packets: vec![
                (5, QoS::AtLeastOnce),
                (6, QoS::ExactlyOnce),
                (7, QoS::AtMostOnce),
            ],
        };
        link.acks(acks(1)).unwrap();
        assert!(
            link.write.is_empty(),
            "connection 1 has ended: its ids mean nothing now"
        );
        link.acks(acks(2)).unwrap();
        let sent = packets(link.write.split());
        assert!(
            matches!(&sent[..], [Packet::PubAck(a), Packet::PubRec(r)] if a.pkid == 5 && r.pkid == 6),
            "{sent:?}"
        );
    }

    #[tokio::test]
    async fn a_platform_message_the_broker_cannot_take_is_rejected_and_frees_its_id() {
        let (settings, record) = (settings(), Record::default());
        let (mut state, mut slots) = (MqttState::new(4, true), Slots::new(4));
        let mut link = link(&settings, &mut state, &mut slots, &record, 1, Some(64));
        let publish = |n: u64, qos, len| Outbound {
            tag: (1, n),
            publish: Publish::new("dev/in/x", qos, vec![b'x'; len], None),
        };
        // Larger than the broker's maximum packet size: never sent.
        link.publish(publish(1, QoS::AtLeastOnce, 100)).unwrap();
        assert!(link.write.is_empty());
        assert_eq!(link.slots.used, 0);
        // QoS 2, refused at PUBREC: the exchange ends there.
        link.publish(publish(2, QoS::ExactlyOnce, 4)).unwrap();
        let Packet::Publish(sent) = &packets(link.write.split())[0] else {
            panic!("a publish");
        };
        let mut rec = PubRec::new(sent.pkid, None);
        rec.reason = PubRecReason::QuotaExceeded;
        link.incoming(Packet::PubRec(rec)).await.unwrap();
        assert_eq!(link.slots.used, 0, "its id is free again");
        assert!(link.write.is_empty(), "no release follows a refusal");
        // QoS 0: delivered once written.
        link.publish(publish(3, QoS::AtMostOnce, 4)).unwrap();
        assert_eq!(*record.delivered.lock().unwrap(), [(1, 3)]);
        let rejected = record.rejected.lock().unwrap();
        assert_eq!(rejected.len(), 2);
        assert_eq!(rejected[0].0, (1, 1));
        assert!(
            rejected[0].1.contains("more than the local broker takes"),
            "{rejected:?}"
        );
        assert_eq!(rejected[1].0, (1, 2));
        assert!(rejected[1].1.contains("QuotaExceeded"), "{rejected:?}");
    }
}
