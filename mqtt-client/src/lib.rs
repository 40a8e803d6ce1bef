//! An MQTT 5 client: rumqttc's protocol state (`MqttState`) and packet
//! codec, driven by an event loop of Tether's own. The agent's connection
//! to the device's local broker and the reference platform's client of its
//! broker (one per device) are both this loop.
//!
//! This crate owns the socket to one broker: connecting (TCP, TLS when
//! configured), the session, subscribing on every ConnAck to the filters
//! it was made with and to what it is asked to later, keep-alive, packet
//! ids of what it publishes and their retransmission after a reconnect.
//! Each turn of the loop writes everything the turn produced with one
//! system call: the acknowledgements of a whole batch, every publish
//! ready, the replies to every packet read. rumqttc's own event loop
//! writes each request with its own call (bytebeamio/rumqtt#810).
//!
//! It never decides what a message means (its user does, through
//! [`Deliveries`]); with manual acknowledgements it never acknowledges a
//! message by itself (only what [`Handle::ack`] is given, and only on the
//! connection that delivered it); it never logs the broker password.
//! It also converts between the tunnel's [`Message`] and rumqttc's
//! [`Publish`], so that both ends carry MQTT 5 properties the same way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::Error as CodecError;
pub use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, Packet, PubAck, PubAckReason, PubRec, PubRecReason,
    Subscribe, SubscribeReasonCode, UnsubAckReason, Unsubscribe,
};
pub use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Login, Publish, PublishProperties, RetainForwardRule,
};
use rumqttc::v5::{Event, MqttState, Request, StateError};
use tether_proto::mqtt::{Message, Properties};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Who waits for the broker's acknowledgement of a message the client
/// publishes: the user's own numbers (the agent: the stream's epoch and
/// seq; the platform: its order of the device's messages).
pub type Tag = (u64, u64);

/// Requests taken from a channel in one turn, at most: reading the socket
/// comes round again after them.
const TURN: usize = 1024;
/// Bytes read from the socket at once, at least.
const READ_CHUNK: usize = 64 * 1024;

/// Why a connection to the broker ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the broker did not answer the connection in time")]
    Timeout,
    #[error("the broker's certificate cannot be checked against the host name '{0}'")]
    ServerName(String),
    #[error(
        "the broker refused the connection ({0:?}); check the username, password and client id"
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

/// The session the client asks the broker for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Session {
    /// Kept by the broker for this many seconds after a connection ends
    /// (and what it queued for the subscriptions delivered on the next).
    Kept { expiry_secs: u32 },
    /// A new session on every connection: the broker forgets the client's
    /// subscriptions, so the user subscribes again on every
    /// [`Deliveries::connected`]. What the client had in flight is still
    /// sent again, as new messages.
    Clean,
}

/// What the connection is made with: fixed when the client starts.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub keep_alive: Duration,
    pub session: Session,
    /// Messages either side may hold unacknowledged from the other.
    pub inflight: u16,
    /// The largest packet the client accepts from the broker.
    pub max_packet: u32,
    pub login: Option<Login>,
    /// Subscribed on every ConnAck (no-local: the client never gets back
    /// what it publishes).
    pub filters: Vec<(String, QoS)>,
    /// QoS 1 and 2 messages from the broker are acknowledged only through
    /// [`Handle::ack`]; else the client acknowledges each as it reads it.
    pub manual_acks: bool,
    /// How long connecting, TLS and the ConnAck may take together.
    pub connect_timeout: Duration,
    /// The first pause between attempts to reach the broker, doubled after
    /// each failure, and the longest.
    pub retry: (Duration, Duration),
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("client_id", &self.client_id)
            .field("session", &self.session)
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

/// A message for the broker.
#[derive(Debug)]
pub struct Outbound {
    pub tag: Tag,
    pub publish: Publish,
}

/// What the user asks of a connection: dropped if that connection has
/// ended (what it meant is for the next one to ask again, or the broker's
/// to deliver again).
#[derive(Debug)]
enum Control {
    /// Acknowledgements of messages the broker delivered, in the order it
    /// delivered them.
    Acks(Vec<(u16, QoS)>),
    Subscribe(Vec<Filter>),
    Unsubscribe(Vec<String>),
}

/// What the loop reports to its user.
pub trait Deliveries: Send + Sync + 'static {
    /// A message from the broker on `connection`; with manual
    /// acknowledgements, QoS 1 and 2 ones are acknowledged only through
    /// [`Handle::ack`]. `false`: the user is gone.
    fn received(
        &self,
        connection: u64,
        publish: Publish,
    ) -> impl std::future::Future<Output = bool> + Send;
    /// The broker has the message `tag` (QoS 0: it was written).
    fn delivered(&self, tag: Tag);
    /// The broker would not take the message `tag` on `topic`.
    fn rejected(&self, tag: Tag, topic: &str, reason: &str);
    /// Connection number `connection` is up (the settings' filters are
    /// being subscribed to).
    fn connected(&self, connection: u64) {
        let _ = connection;
    }
    /// The connection ended or could not be made; the next attempt is in
    /// `retry_in`. `repeated`: the attempt before failed too.
    fn disconnected(&self, error: &LinkError, retry_in: Duration, repeated: bool) {
        let _ = (error, retry_in, repeated);
    }
    /// The broker answered a subscribe or unsubscribe request; `refused`:
    /// the filters it did not take, with its reason.
    fn subscribed(&self, refused: Vec<(String, String)>) {
        let _ = refused;
    }
}

/// The user's side of the connection.
#[derive(Clone, Debug)]
pub struct Handle {
    outbound: mpsc::Sender<Outbound>,
    control: mpsc::UnboundedSender<(u64, Control)>,
}

impl Handle {
    /// Queues a message for the broker; waits while the queue is full (the
    /// broker is slow or away). `false`: the loop is gone.
    pub async fn publish(&self, outbound: Outbound) -> bool {
        self.outbound.send(outbound).await.is_ok()
    }

    /// Queues a message for the broker, or gives it back if the queue is
    /// full or the loop is gone.
    pub fn try_publish(&self, outbound: Outbound) -> Result<(), Box<Outbound>> {
        self.outbound.try_send(outbound).map_err(|e| {
            Box::new(match e {
                mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => o,
            })
        })
    }

    /// Acknowledges messages the broker delivered on `connection`, in the
    /// order given (the order it delivered them); dropped if that
    /// connection has ended (the broker delivers them again).
    pub fn ack(&self, connection: u64, packets: Vec<(u16, QoS)>) {
        if !packets.is_empty() {
            let _ = self.control.send((connection, Control::Acks(packets)));
        }
    }

    /// Subscribes to `filters` on `connection` (answered through
    /// [`Deliveries::subscribed`]); dropped if that connection has ended.
    pub fn subscribe(&self, connection: u64, filters: Vec<Filter>) {
        if !filters.is_empty() {
            let _ = self.control.send((connection, Control::Subscribe(filters)));
        }
    }

    /// Unsubscribes from `filters` on `connection`; dropped if that
    /// connection has ended.
    pub fn unsubscribe(&self, connection: u64, filters: Vec<String>) {
        if !filters.is_empty() {
            let _ = self
                .control
                .send((connection, Control::Unsubscribe(filters)));
        }
    }
}

/// The loop's half, until it runs.
#[derive(Debug)]
pub struct Client {
    settings: Settings,
    outbound: mpsc::Receiver<Outbound>,
    control: mpsc::UnboundedReceiver<(u64, Control)>,
}

/// A client for `settings` and the handle to it; `queue`: messages the
/// handle may queue beyond what is in flight.
pub fn new(settings: Settings, queue: usize) -> (Handle, Client) {
    let (outbound_tx, outbound) = mpsc::channel(queue.max(1));
    let (control_tx, control) = mpsc::unbounded_channel();
    (
        Handle {
            outbound: outbound_tx,
            control: control_tx,
        },
        Client {
            settings,
            outbound,
            control,
        },
    )
}

/// A message in flight with the broker.
#[derive(Debug)]
struct Slot {
    tag: Tag,
    topic: Bytes,
    /// When it was first handed to the broker, to resend in that order.
    order: u64,
}

/// Packet ids of messages in flight. The client picks them itself (from
/// `1..=window`, the next free one after the last), so a publish never
/// takes an id the broker has not acknowledged yet.
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

/// Runs the client until its user is gone: connects, runs each connection
/// until it fails, and connects again with a growing pause.
pub async fn run<D: Deliveries>(client: Client, deliveries: Arc<D>) {
    let Client {
        settings,
        mut outbound,
        mut control,
    } = client;
    let mut state = MqttState::new(settings.inflight, settings.manual_acks);
    let mut slots = Slots::new(settings.inflight);
    let mut pending: Vec<Request> = Vec::new();
    let (first, longest) = settings.retry;
    let mut retry = first;
    let mut repeated = false;
    let mut connection = 0u64;
    loop {
        let failure = match connect(&settings).await {
            Ok((io, connack, read)) => {
                connection += 1;
                retry = first;
                repeated = false;
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
                    subscribing: HashMap::new(),
                    next_request: 0,
                };
                let ended = link
                    .run(
                        &mut outbound,
                        &mut control,
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
        deliveries.disconnected(&failure, retry, repeated);
        repeated = true;
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(longest);
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
        let clean_start = match settings.session {
            Session::Kept { expiry_secs } => {
                properties.session_expiry_interval = Some(expiry_secs);
                false
            }
            Session::Clean => true,
        };
        properties.receive_maximum = Some(settings.inflight);
        properties.max_packet_size = Some(settings.max_packet);
        let connect = Packet::Connect(
            Connect {
                keep_alive: u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX),
                client_id: settings.client_id.clone(),
                clean_start,
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
    tokio::time::timeout(settings.connect_timeout, work)
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
    /// The filters of each subscribe and unsubscribe request not answered
    /// yet, by packet id.
    subscribing: HashMap<u16, Vec<String>>,
    /// The packet id of the last subscribe or unsubscribe request.
    next_request: u16,
}

impl<D: Deliveries> Link<'_, D> {
    /// Runs the connection until it fails (`Err`) or the user is gone
    /// (`Ok`).
    async fn run(
        &mut self,
        outbound: &mut mpsc::Receiver<Outbound>,
        control: &mut mpsc::UnboundedReceiver<(u64, Control)>,
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
        let filters: Vec<Filter> = settings
            .filters
            .iter()
            .map(|(f, qos)| Filter {
                nolocal: true,
                ..Filter::new(f.clone(), *qos)
            })
            .collect();
        if !filters.is_empty() {
            self.control(Control::Subscribe(filters))?;
        }
        self.deliveries.connected(self.connection);
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
                asked = control.recv() => {
                    let Some((connection, asked)) = asked else { return Ok(()) };
                    self.asked(connection, asked)?;
                    for _ in 1..TURN {
                        match control.try_recv() {
                            Ok((connection, asked)) => self.asked(connection, asked)?,
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
        // The state's reports of what it sent: the loop knows.
        self.state.events.clear();
        Ok(())
    }

    /// Writes a subscribe or unsubscribe request for `filters` with a
    /// packet id of its own, above every publish's (the state would pick
    /// one a publish in flight may hold), and remembers the filters for
    /// the answer.
    fn request(
        &mut self,
        filters: Vec<String>,
        packet: impl FnOnce(u16) -> Packet,
    ) -> Result<(), LinkError> {
        let first = self.settings.inflight.saturating_add(1);
        self.next_request = match self.next_request {
            n if n < first || n == u16::MAX => first,
            n => n + 1,
        };
        let pkid = self.next_request;
        packet(pkid).write(&mut self.write, None)?;
        self.subscribing.insert(pkid, filters);
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
                // The broker took the message at its PubRec; a PubComp
                // of any reason ends the exchange (after a clean start
                // the new session does not know the packet id).
                Packet::PubComp(comp) => self.done(comp.pkid, None),
                Packet::SubAck(ack) => {
                    let refused = ack.return_codes.iter().map(|code| {
                        (!matches!(code, SubscribeReasonCode::Success(_)))
                            .then(|| format!("{code:?}"))
                    });
                    self.answered(ack.pkid, refused);
                }
                Packet::UnsubAck(ack) => {
                    let refused = ack.reasons.iter().map(|code| {
                        (!matches!(code, UnsubAckReason::Success)).then(|| format!("{code:?}"))
                    });
                    self.answered(ack.pkid, refused);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The broker answered request `pkid`: a refusal or not per filter,
    /// in the order the filters were asked for.
    fn answered(&mut self, pkid: u16, codes: impl Iterator<Item = Option<String>>) {
        let filters = self.subscribing.remove(&pkid).unwrap_or_default();
        let refused = codes
            .zip(filters)
            .filter_map(|(code, filter)| Some((filter, code?)))
            .collect();
        self.deliveries.subscribed(refused);
    }

    async fn received(&mut self, publish: Publish) -> Result<(), LinkError> {
        match self.deliveries.received(self.connection, publish).await {
            true => Ok(()),
            false => Err(LinkError::Closed),
        }
    }

    /// The broker finished with message `pkid`.
    fn done(&mut self, pkid: u16, refused: Option<String>) {
        let Some(slot) = self.slots.release(pkid) else {
            return;
        };
        match refused {
            None => self.deliveries.delivered(slot.tag),
            Some(reason) => self.deliveries.rejected(
                slot.tag,
                &String::from_utf8_lossy(&slot.topic),
                &format!("the broker refused it: {reason}"),
            ),
        }
    }

    /// What the user asked of connection `connection`.
    fn asked(&mut self, connection: u64, asked: Control) -> Result<(), LinkError> {
        if connection != self.connection {
            // Acknowledgements: that connection's messages come again, with
            // this one's ids. Subscriptions: asked again for this one.
            return Ok(());
        }
        self.control(asked)
    }

    fn control(&mut self, asked: Control) -> Result<(), LinkError> {
        match asked {
            Control::Acks(packets) => {
                for (pkid, qos) in packets {
                    let request = match qos {
                        QoS::AtMostOnce => continue,
                        QoS::AtLeastOnce => Request::PubAck(PubAck::new(pkid, None)),
                        QoS::ExactlyOnce => Request::PubRec(PubRec::new(pkid, None)),
                    };
                    self.send(request)?;
                }
            }
            Control::Subscribe(filters) => {
                let paths = filters.iter().map(|f| f.path.clone()).collect();
                self.request(paths, |pkid| {
                    let mut s = Subscribe::new_many(filters, None);
                    s.pkid = pkid;
                    Packet::Subscribe(s)
                })?;
            }
            Control::Unsubscribe(filters) => {
                self.request(filters.clone(), |pkid| {
                    Packet::Unsubscribe(Unsubscribe {
                        pkid,
                        filters,
                        properties: None,
                    })
                })?;
            }
        }
        Ok(())
    }

    /// Sends a message: a packet id of its own for QoS 1 and 2; one larger
    /// than the broker takes is rejected, not sent.
    fn publish(&mut self, outbound: Outbound) -> Result<(), LinkError> {
        let Outbound { tag, mut publish } = outbound;
        let size = publish.size() + 2;
        if let Some(max) = self.max_out
            && size > max as usize
        {
            self.deliveries.rejected(
                tag,
                &String::from_utf8_lossy(&publish.topic),
                &format!("{size} bytes is more than the broker takes ({max})"),
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

/// The QoS of a tunnel message (0, 1, anything else 2).
pub fn qos(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A tunnel message as a publish (packet id 0: the loop gives it one),
/// its MQTT 5 properties unchanged.
pub fn publish_of(message: Message) -> Publish {
    let Message {
        topic,
        qos: level,
        retain,
        properties: p,
        payload,
    } = message;
    Publish {
        dup: false,
        qos: qos(level),
        retain,
        topic: Bytes::from(topic),
        pkid: 0,
        payload,
        properties: Some(PublishProperties {
            payload_format_indicator: p.payload_format,
            message_expiry_interval: p.message_expiry,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        }),
    }
}

/// A publish as the tunnel carries it, its MQTT 5 properties unchanged;
/// `None` if its topic is not UTF-8 (MQTT requires it; the codec does not
/// check).
pub fn message_of(publish: &Publish) -> Option<Message> {
    let topic = std::str::from_utf8(&publish.topic).ok()?.to_owned();
    Some(Message {
        topic,
        qos: publish.qos as u8,
        retain: publish.retain,
        properties: properties_of(publish.properties.clone()),
        payload: publish.payload.clone(),
    })
}

/// The MQTT 5 properties of a publish as the tunnel carries them.
fn properties_of(p: Option<PublishProperties>) -> Properties {
    let Some(p) = p else {
        return Properties::default();
    };
    Properties {
        payload_format: p.payload_format_indicator,
        message_expiry: p.message_expiry_interval,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user: p.user_properties,
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
        subscribed: std::sync::Mutex<Vec<Vec<(String, String)>>>,
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
        fn subscribed(&self, refused: Vec<(String, String)>) {
            self.subscribed.lock().unwrap().push(refused);
        }
    }

    fn settings() -> Settings {
        Settings {
            host: "127.0.0.1".into(),
            port: 1,
            tls: None,
            client_id: "t".into(),
            keep_alive: Duration::from_secs(30),
            session: Session::Kept { expiry_secs: 60 },
            inflight: 4,
            max_packet: 1 << 20,
            login: None,
            filters: vec![("dev/out/#".into(), QoS::AtLeastOnce)],
            manual_acks: true,
            connect_timeout: Duration::from_secs(1),
            retry: (Duration::from_secs(1), Duration::from_secs(2)),
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
            subscribing: HashMap::new(),
            next_request: 0,
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
        let acks = || {
            Control::Acks(vec![
                (5, QoS::AtLeastOnce),
                (6, QoS::ExactlyOnce),
                (7, QoS::AtMostOnce),
            ])
        };
        link.asked(1, acks()).unwrap();
        assert!(
            link.write.is_empty(),
            "connection 1 has ended: its ids mean nothing now"
        );
        link.asked(2, acks()).unwrap();
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
            rejected[0].1.contains("more than the broker takes"),
            "{rejected:?}"
        );
        assert_eq!(rejected[1].0, (1, 2));
        assert!(rejected[1].1.contains("QuotaExceeded"), "{rejected:?}");
    }

    #[tokio::test]
    async fn subscriptions_take_packet_ids_no_publish_can_hold_and_answers_name_their_filters() {
        let (settings, record) = (settings(), Record::default());
        let (mut state, mut slots) = (MqttState::new(4, true), Slots::new(4));
        let mut link = link(&settings, &mut state, &mut slots, &record, 1, None);
        // Every publish id of the window is in flight.
        for n in 0..4 {
            link.publish(Outbound {
                tag: (1, n),
                publish: Publish::new("dev/in/x", QoS::AtLeastOnce, vec![1], None),
            })
            .unwrap();
        }
        link.write.clear();
        let filter = |path: &str| Filter::new(path, QoS::AtLeastOnce);
        link.asked(1, Control::Subscribe(vec![filter("a/#"), filter("b/#")]))
            .unwrap();
        link.asked(1, Control::Unsubscribe(vec!["c/#".into()]))
            .unwrap();
        link.asked(0, Control::Subscribe(vec![filter("old/#")]))
            .unwrap();
        let sent = packets(link.write.split());
        let [Packet::Subscribe(sub), Packet::Unsubscribe(unsub)] = &sent[..] else {
            panic!("{sent:?}");
        };
        assert!(sub.pkid > 4 && unsub.pkid > 4, "{sub:?} {unsub:?}");
        assert_ne!(sub.pkid, unsub.pkid);
        // The broker refuses the second filter, then the unsubscription.
        let mut suback = rumqttc::v5::mqttbytes::v5::SubAck {
            pkid: sub.pkid,
            return_codes: vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::NotAuthorized,
            ],
            properties: None,
        };
        link.incoming(Packet::SubAck(suback.clone())).await.unwrap();
        let unsuback = rumqttc::v5::mqttbytes::v5::UnsubAck {
            pkid: unsub.pkid,
            reasons: vec![UnsubAckReason::NoSubscriptionExisted],
            properties: None,
        };
        link.incoming(Packet::UnsubAck(unsuback)).await.unwrap();
        // An answer to nothing asked names no filter.
        suback.pkid = 999;
        link.incoming(Packet::SubAck(suback)).await.unwrap();
        let answers = record.subscribed.lock().unwrap();
        assert_eq!(answers.len(), 3);
        assert_eq!(answers[0], [("b/#".to_owned(), "NotAuthorized".to_owned())]);
        assert_eq!(
            answers[1],
            [("c/#".to_owned(), "NoSubscriptionExisted".to_owned())]
        );
        assert!(answers[2].is_empty());
    }

    /// Answers one CONNECT on a loopback listener with a ConnAck; returns
    /// the CONNECT.
    async fn broker_once() -> (u16, tokio::task::JoinHandle<Connect>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut read = BytesMut::new();
            let connect = loop {
                match Packet::read(&mut read, None) {
                    Ok(Packet::Connect(connect, _, _)) => break connect,
                    Ok(other) => panic!("{other:?}"),
                    Err(_) => assert!(socket.read_buf(&mut read).await.unwrap() > 0),
                }
            };
            let ack = ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
                properties: None,
            };
            let mut out = BytesMut::new();
            Packet::ConnAck(ack).write(&mut out, None).unwrap();
            socket.write_all(&out).await.unwrap();
            connect
        });
        (port, task)
    }

    #[tokio::test]
    async fn a_clean_session_is_asked_for_without_an_expiry_and_a_kept_one_with_it() {
        for (session, clean_start, expiry) in [
            (Session::Clean, true, None),
            (Session::Kept { expiry_secs: 60 }, false, Some(60)),
        ] {
            let (port, broker) = broker_once().await;
            let settings = Settings {
                port,
                session,
                ..settings()
            };
            let (_, connack, _) = connect(&settings).await.unwrap();
            assert_eq!(connack.code, ConnectReturnCode::Success);
            let asked = broker.await.unwrap();
            assert_eq!(asked.clean_start, clean_start, "{session:?}");
            let properties = asked.properties.unwrap();
            assert_eq!(properties.session_expiry_interval, expiry, "{session:?}");
            assert_eq!(properties.receive_maximum, Some(4));
        }
    }

    #[test]
    fn a_message_the_queue_cannot_take_is_given_back() {
        let (handle, client) = new(settings(), 1);
        let outbound = |n| Outbound {
            tag: (0, n),
            publish: Publish::new("dev/in/x", QoS::AtLeastOnce, vec![1], None),
        };
        assert!(handle.try_publish(outbound(1)).is_ok());
        let back = handle.try_publish(outbound(2)).unwrap_err();
        assert_eq!(back.tag, (0, 2), "the queue is full");
        drop(client);
        let back = handle.try_publish(outbound(3)).unwrap_err();
        assert_eq!(back.tag, (0, 3), "the loop is gone");
    }
}
