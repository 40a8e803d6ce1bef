//! MQTT between a device's local broker and the platform's, carried on the
//! tunnel's `mqtt` stream (`docs/protocol.md` §19, `docs/mqtt.md`).
//!
//! This module owns the stream's frames (messages with their MQTT 5
//! properties, acknowledgements, refusals, the device's figures), the
//! limits every message is held to, and the topic namespace a device may
//! not leave ([`Namespace`]): which topics it may publish, which filters
//! it may subscribe to, and which messages the platform routes to it. Both
//! ends apply the same rules. It performs no I/O and never decides what to
//! do with a refused message (the agent audits it, the platform counts it).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The first topic level of every namespace.
pub const ROOT: &str = "tether";
/// The team segment of a device enrolled without a team.
pub const NO_TEAM: &str = "_";
/// Longest topic or filter, in bytes.
pub const MAX_TOPIC: usize = 1024;
/// Longest string property (content type, response topic, a user
/// property's name or value) and correlation data, in bytes.
pub const MAX_PROPERTY: usize = 4096;
/// Most user properties on one message.
pub const MAX_USER_PROPERTIES: usize = 32;
/// Largest payload either end accepts (a configuration may lower it).
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Largest frame: a message with every property at its limit.
pub const MAX_FRAME: usize = MAX_PAYLOAD + 256 * 1024;
/// Largest JSON frame (hello, subscriptions, refusals, figures).
pub const MAX_JSON: usize = 64 * 1024;
/// Most filters a device subscribes to.
pub const MAX_FILTERS: usize = 64;
/// Longest team or device segment.
pub const MAX_SEGMENT: usize = 64;

/// Why a message, a topic or a frame was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt frame of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("mqtt frame of unknown type 0x{0:02x}")]
    UnknownFrame(u8),
    #[error("mqtt frame is truncated")]
    Truncated,
    #[error("mqtt frame is malformed: {0}")]
    Malformed(String),
    #[error("'{topic}' is outside this device's namespace: {why}")]
    Namespace { topic: String, why: String },
    #[error("'{topic}' is not a valid MQTT {what}: {why}")]
    Invalid {
        topic: String,
        what: &'static str,
        why: &'static str,
    },
    #[error("a message of {len} bytes is larger than the limit of {max} bytes")]
    Oversize { len: usize, max: usize },
}

/// MQTT 5 publish properties the bridge carries unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user: Vec<(String, String)>,
}

/// One MQTT message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
    pub payload: Bytes,
}

impl Message {
    /// Checks the message against the limits and the topic rules, with
    /// payloads up to `max_payload`.
    pub fn check(&self, max_payload: usize) -> Result<(), MqttError> {
        check_topic(&self.topic)?;
        if self.qos > 2 {
            return Err(MqttError::Malformed(format!("QoS {}", self.qos)));
        }
        if self.payload.len() > max_payload.min(MAX_PAYLOAD) {
            return Err(MqttError::Oversize {
                len: self.payload.len(),
                max: max_payload.min(MAX_PAYLOAD),
            });
        }
        let p = &self.properties;
        let strings = [&p.content_type, &p.response_topic];
        let long = strings
            .iter()
            .any(|s| s.as_ref().is_some_and(|s| s.len() > MAX_PROPERTY))
            || p.correlation_data
                .as_ref()
                .is_some_and(|c| c.len() > MAX_PROPERTY)
            || p.user.len() > MAX_USER_PROPERTIES
            || p.user
                .iter()
                .any(|(k, v)| k.len() > MAX_PROPERTY || v.len() > MAX_PROPERTY);
        if long {
            return Err(MqttError::Malformed(format!(
                "a property is longer than {MAX_PROPERTY} bytes or there are more than {MAX_USER_PROPERTIES} user properties"
            )));
        }
        if let Some(response) = &p.response_topic {
            check_topic(response)?;
        }
        Ok(())
    }

    /// Bytes this message counts for in an outbox: payload, topic and
    /// properties.
    pub fn size(&self) -> usize {
        let p = &self.properties;
        self.topic.len()
            + self.payload.len()
            + p.content_type.as_ref().map_or(0, String::len)
            + p.response_topic.as_ref().map_or(0, String::len)
            + p.correlation_data.as_ref().map_or(0, Bytes::len)
            + p.user.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }

    /// The message's encoding without a sequence number (the outbox stores
    /// this); [`Message::decode`] reads it back.
    pub fn encode(&self, out: &mut BytesMut) {
        let p = &self.properties;
        let mut flags = 0u8;
        for (bit, set) in [
            self.retain,
            p.payload_format.is_some(),
            p.message_expiry.is_some(),
            p.content_type.is_some(),
            p.response_topic.is_some(),
            p.correlation_data.is_some(),
        ]
        .into_iter()
        .enumerate()
        {
            if set {
                flags |= 1 << bit;
            }
        }
        out.put_u8(self.qos);
        out.put_u8(flags);
        put_str(out, &self.topic);
        if let Some(v) = p.payload_format {
            out.put_u8(v);
        }
        if let Some(v) = p.message_expiry {
            out.put_u32(v);
        }
        if let Some(v) = &p.content_type {
            put_str(out, v);
        }
        if let Some(v) = &p.response_topic {
            put_str(out, v);
        }
        if let Some(v) = &p.correlation_data {
            put_bytes(out, v);
        }
        out.put_u16(p.user.len() as u16);
        for (k, v) in &p.user {
            put_str(out, k);
            put_str(out, v);
        }
        out.put_slice(&self.payload);
    }

    /// Reads a message written by [`Message::encode`]; checks its limits
    /// and topic rules.
    pub fn decode(mut body: Bytes) -> Result<Message, MqttError> {
        let qos = take_u8(&mut body)?;
        let flags = take_u8(&mut body)?;
        if flags >> 6 != 0 {
            return Err(MqttError::Malformed(format!("flags 0x{flags:02x}")));
        }
        let bit = |n: u8| flags & (1 << n) != 0;
        let topic = take_str(&mut body)?;
        let payload_format = bit(1).then(|| take_u8(&mut body)).transpose()?;
        let message_expiry = bit(2).then(|| take_u32(&mut body)).transpose()?;
        let content_type = bit(3).then(|| take_str(&mut body)).transpose()?;
        let response_topic = bit(4).then(|| take_str(&mut body)).transpose()?;
        let correlation_data = bit(5).then(|| take_bytes(&mut body)).transpose()?;
        let count = usize::from(take_u16(&mut body)?);
        if count > MAX_USER_PROPERTIES {
            return Err(MqttError::Malformed(format!("{count} user properties")));
        }
        let mut user = Vec::with_capacity(count);
        for _ in 0..count {
            user.push((take_str(&mut body)?, take_str(&mut body)?));
        }
        let message = Message {
            topic,
            qos,
            retain: bit(0),
            properties: Properties {
                payload_format,
                message_expiry,
                content_type,
                response_topic,
                correlation_data,
                user,
            },
            payload: body,
        };
        message.check(MAX_PAYLOAD)?;
        Ok(message)
    }
}

/// What the platform says first on an `mqtt` stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The device's team segment ([`NO_TEAM`] without a team).
    pub team: String,
    /// Names the platform's sequence of messages to this device: a new
    /// value (the platform restarted) starts its sequence numbers over, and
    /// the device forgets which of the old ones it handled.
    pub epoch: u64,
    /// The highest sequence number of this device's messages the platform
    /// has handed to its broker (0: none since the platform started); the
    /// device resends everything after it.
    pub delivered: u64,
    /// The largest payload the platform accepts.
    pub max_payload: u32,
}

/// A filter the device asks the platform to route to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub filter: String,
    /// The highest QoS the device wants for it (0, 1 or 2).
    pub qos: u8,
}

/// A message or a filter the receiving end refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The refused message's sequence number (0 for QoS 0 or a filter).
    pub seq: u64,
    pub topic: String,
    pub reason: String,
}

/// The device's bridge figures, sent every few seconds while they change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figures {
    /// Messages in the outbox, not yet acknowledged by the platform.
    pub outbox_messages: u64,
    pub outbox_bytes: u64,
    /// Oldest messages dropped because the outbox was full, ever.
    pub outbox_dropped: u64,
    /// QoS 0 messages dropped while the tunnel was down, ever.
    pub qos0_dropped: u64,
    /// Messages the device refused to send (namespace, size), ever.
    pub refused: u64,
    /// Messages sent to the platform and received from it, this run.
    pub sent: u64,
    pub received: u64,
}

/// One frame on the `mqtt` stream: a 4-byte big-endian length (of the
/// type byte and the body), a type byte, the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Platform → device, first.
    Hello(Hello),
    /// Device → platform: the filters to route to the device (replaces
    /// the previous list).
    Subscribe(Vec<Subscription>),
    /// Either way. `seq` 0: QoS 0, never acknowledged; otherwise the
    /// sender's outbox sequence number, growing by one per message.
    Publish { seq: u64, message: Message },
    /// Either way: every message up to and including `seq` is handled
    /// (delivered, or refused with a [`Frame::Refused`] first).
    Ack { seq: u64 },
    /// Either way: a message or a filter the receiver will not carry.
    Refused(Refusal),
    /// Device → platform.
    Figures(Figures),
}

const HELLO: u8 = 1;
const SUBSCRIBE: u8 = 2;
const PUBLISH: u8 = 3;
const ACK: u8 = 4;
const REFUSED: u8 = 5;
const FIGURES: u8 = 6;

impl Frame {
    /// Appends the frame's wire form to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), MqttError> {
        let start = out.len();
        out.put_u32(0);
        let json = |out: &mut BytesMut, kind: u8, value: &dyn erased::Json| {
            out.put_u8(kind);
            value.write(out)
        };
        match self {
            Frame::Hello(h) => json(out, HELLO, h)?,
            Frame::Subscribe(s) => json(out, SUBSCRIBE, s)?,
            Frame::Refused(r) => json(out, REFUSED, r)?,
            Frame::Figures(f) => json(out, FIGURES, f)?,
            Frame::Ack { seq } => {
                out.put_u8(ACK);
                out.put_u64(*seq);
            }
            Frame::Publish { seq, message } => {
                out.put_u8(PUBLISH);
                out.put_u64(*seq);
                message.encode(out);
            }
        }
        let len = out.len() - start - 4;
        if len > MAX_FRAME {
            out.truncate(start);
            return Err(MqttError::TooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

mod erased {
    use bytes::{BufMut, BytesMut};

    use super::MqttError;

    /// A JSON body written straight into the frame buffer.
    pub(super) trait Json {
        fn write(&self, out: &mut BytesMut) -> Result<(), MqttError>;
    }

    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut BytesMut) -> Result<(), MqttError> {
            serde_json::to_writer(out.writer(), self)
                .map_err(|e| MqttError::Malformed(e.to_string()))
        }
    }
}

/// Reassembles frames from a byte stream, holding at most one frame's
/// bytes.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Room to read into, for readers that fill the buffer themselves.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next whole frame, if one has arrived. After an error the stream
    /// is unusable.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, MqttError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(MqttError::TooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        if len == 0 {
            return Err(MqttError::Truncated);
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        let mut body = self.buf.split_to(len).freeze();
        let kind = body.get_u8();
        let json_len = body.len();
        let json = |body: &Bytes| {
            if json_len > MAX_JSON {
                return Err(MqttError::TooLarge {
                    len: json_len,
                    max: MAX_JSON,
                });
            }
            Ok(body.clone())
        };
        let parse = |e: serde_json::Error| MqttError::Malformed(e.to_string());
        Ok(Some(match kind {
            HELLO => Frame::Hello(serde_json::from_slice(&json(&body)?).map_err(parse)?),
            SUBSCRIBE => {
                let list: Vec<Subscription> =
                    serde_json::from_slice(&json(&body)?).map_err(parse)?;
                if list.len() > MAX_FILTERS {
                    return Err(MqttError::Malformed(format!(
                        "{} filters (at most {MAX_FILTERS})",
                        list.len()
                    )));
                }
                Frame::Subscribe(list)
            }
            REFUSED => Frame::Refused(serde_json::from_slice(&json(&body)?).map_err(parse)?),
            FIGURES => Frame::Figures(serde_json::from_slice(&json(&body)?).map_err(parse)?),
            ACK => {
                let seq = take_u64(&mut body)?;
                if !body.is_empty() {
                    return Err(MqttError::Malformed("bytes after an ack".into()));
                }
                Frame::Ack { seq }
            }
            PUBLISH => {
                let seq = take_u64(&mut body)?;
                let message = Message::decode(body)?;
                if (seq == 0) != (message.qos == 0) {
                    return Err(MqttError::Malformed(format!(
                        "QoS {} message with sequence number {seq}",
                        message.qos
                    )));
                }
                Frame::Publish { seq, message }
            }
            other => return Err(MqttError::UnknownFrame(other)),
        }))
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// The topic namespace of one device: `tether/<team>/<device>/`.
///
/// - It publishes only topics under `tether/<team>/<device>/`.
/// - It subscribes only inside `tether/<team>/<device>/in/#` (its inbound
///   topics, which platform clients publish to) and
///   `tether/<team>/+/out/#` (the team's broadcast topics, which every
///   device of the team publishes under its own `out/`).
/// - The platform routes a message to it only if it is on one of those and
///   is not the device's own `out/` (a device never receives its own
///   publications back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    team: String,
    device: String,
}

impl Namespace {
    /// The namespace of `device` in `team` (empty: [`NO_TEAM`]). Both must
    /// be valid topic levels: no `/`, `+`, `#` or NUL, 1 to 64 bytes.
    pub fn new(team: &str, device: &str) -> Result<Namespace, MqttError> {
        let team = if team.is_empty() { NO_TEAM } else { team };
        for (what, s) in [("team", team), ("device id", device)] {
            let bad = s.is_empty()
                || s.len() > MAX_SEGMENT
                || s.contains(['/', '+', '#', '\0'])
                || s.starts_with('$');
            if bad {
                return Err(MqttError::Invalid {
                    topic: s.to_owned(),
                    what,
                    why: "a team or device must be 1 to 64 bytes without '/', '+', '#', '$' or NUL to name an MQTT namespace",
                });
            }
        }
        Ok(Namespace {
            team: team.to_owned(),
            device: device.to_owned(),
        })
    }

    pub fn team(&self) -> &str {
        &self.team
    }

    /// `tether/<team>/<device>/`.
    pub fn prefix(&self) -> String {
        format!("{ROOT}/{}/{}/", self.team, self.device)
    }

    /// The filter of the device's own publications the agent forwards by
    /// default: `tether/<team>/<device>/out/#`.
    pub fn own_out(&self) -> String {
        format!("{}out/#", self.prefix())
    }

    /// The filters a device subscribes to by default: its inbound topics
    /// and the team's broadcast topics.
    pub fn default_inbound(&self) -> Vec<String> {
        vec![
            format!("{}in/#", self.prefix()),
            format!("{ROOT}/{}/+/out/#", self.team),
        ]
    }

    /// May the device publish on `topic`?
    pub fn check_publish(&self, topic: &str) -> Result<(), MqttError> {
        check_topic(topic)?;
        // Checked for every message: no allocation unless it is refused.
        let rest = self
            .in_team(topic)
            .and_then(|r| r.strip_prefix(self.device.as_str()))
            .and_then(|r| r.strip_prefix('/'));
        match rest {
            Some(rest) if !rest.is_empty() => Ok(()),
            _ => Err(MqttError::Namespace {
                topic: topic.to_owned(),
                why: format!("a device publishes only under '{}'", self.prefix()),
            }),
        }
    }

    /// What follows `tether/<team>/` in `topic`, if it is in the team's
    /// space.
    fn in_team<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(ROOT)?
            .strip_prefix('/')?
            .strip_prefix(self.team.as_str())?
            .strip_prefix('/')
    }

    /// May the device subscribe to `filter`?
    pub fn check_subscribe(&self, filter: &str) -> Result<(), MqttError> {
        check_filter(filter)?;
        let allowed = self.default_inbound();
        if allowed.iter().any(|a| within(filter, a)) {
            Ok(())
        } else {
            Err(MqttError::Namespace {
                topic: filter.to_owned(),
                why: format!(
                    "a device subscribes only within '{}' or '{}'",
                    allowed[0], allowed[1]
                ),
            })
        }
    }

    /// Does the platform route a message on `topic` to this device? (On top
    /// of the device's own filters.)
    pub fn delivers(&self, topic: &str) -> bool {
        // `tether/<team>/<device>/in/#`, or `tether/<team>/+/out/#` from
        // another device (checked for every message: no allocation).
        let Some((device, rest)) = self.in_team(topic).and_then(|r| r.split_once('/')) else {
            return false;
        };
        let level = if device == self.device { "in" } else { "out" };
        rest.strip_prefix(level)
            .is_some_and(|r| r.is_empty() || r.starts_with('/'))
    }
}

/// Is `topic` a valid topic name to publish on? Non-empty, at most
/// [`MAX_TOPIC`] bytes, no wildcards, no NUL, not a `$` system topic.
pub fn check_topic(topic: &str) -> Result<(), MqttError> {
    let why = if topic.is_empty() {
        Some("it is empty")
    } else if topic.len() > MAX_TOPIC {
        Some("it is longer than 1024 bytes")
    } else if topic.contains(['+', '#']) {
        Some("a topic name has no wildcards")
    } else if topic.contains('\0') {
        Some("it contains NUL")
    } else if topic.starts_with('$') {
        Some("'$' topics belong to the broker")
    } else {
        None
    };
    match why {
        Some(why) => Err(MqttError::Invalid {
            topic: topic.chars().take(128).collect(),
            what: "topic",
            why,
        }),
        None => Ok(()),
    }
}

/// Is `filter` a valid topic filter? Wildcards only as whole levels, `#`
/// only last.
pub fn check_filter(filter: &str) -> Result<(), MqttError> {
    let invalid = |why| {
        Err(MqttError::Invalid {
            topic: filter.chars().take(128).collect(),
            what: "filter",
            why,
        })
    };
    if filter.is_empty() || filter.len() > MAX_TOPIC || filter.contains('\0') {
        return invalid("it is empty, longer than 1024 bytes or contains NUL");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains(['+', '#']) && level.len() > 1 {
            return invalid("a wildcard must be a whole level");
        }
        if *level == "#" && i != levels.len() - 1 {
            return invalid("'#' must be the last level");
        }
    }
    Ok(())
}

/// Does `filter` match `topic` (MQTT 3.1.1 §4.7, without `$` topics)?
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Does every topic `filter` matches also match `outer`?
fn within(filter: &str, outer: &str) -> bool {
    let mut f = filter.split('/');
    let mut o = outer.split('/');
    loop {
        match (o.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    // Lengths were checked against the limits, all far below 64 KiB.
    out.put_u16(b.len().min(u16::MAX as usize) as u16);
    out.put_slice(&b[..b.len().min(u16::MAX as usize)]);
}

fn take_u8(body: &mut Bytes) -> Result<u8, MqttError> {
    if body.is_empty() {
        return Err(MqttError::Truncated);
    }
    Ok(body.get_u8())
}

fn take_u16(body: &mut Bytes) -> Result<u16, MqttError> {
    if body.len() < 2 {
        return Err(MqttError::Truncated);
    }
    Ok(body.get_u16())
}

fn take_u32(body: &mut Bytes) -> Result<u32, MqttError> {
    if body.len() < 4 {
        return Err(MqttError::Truncated);
    }
    Ok(body.get_u32())
}

fn take_u64(body: &mut Bytes) -> Result<u64, MqttError> {
    if body.len() < 8 {
        return Err(MqttError::Truncated);
    }
    Ok(body.get_u64())
}

fn take_bytes(body: &mut Bytes) -> Result<Bytes, MqttError> {
    let len = usize::from(take_u16(body)?);
    if body.len() < len {
        return Err(MqttError::Truncated);
    }
    Ok(body.split_to(len))
}

fn take_str(body: &mut Bytes) -> Result<String, MqttError> {
    let bytes = take_bytes(body)?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| MqttError::Malformed("a string is not UTF-8".into()))
}

#[cfg(test)]
mod tests;
