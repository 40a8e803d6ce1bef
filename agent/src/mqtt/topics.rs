//! Local topic mapping (`[[mqtt.topic]]`): short topics for the device's
//! flows, the namespace's topics on the wire.
//!
//! This module owns the rule that turns a local topic into a wire topic and
//! back, as mosquitto's bridge does (`topic PATTERN DIRECTION QOS
//! LOCAL-PREFIX REMOTE-PREFIX`): a topic `LOCAL-PREFIX + rest` matching
//! `LOCAL-PREFIX + PATTERN` is `REMOTE-PREFIX + rest` on the wire. The MQTT 5
//! response topic is mapped the same way, so that a reply finds its way
//! back. A topic no mapping matches crosses unchanged (no mapping at all is
//! the identity). Mapping never decides what may leave the device: the wire
//! topic is checked against the namespace after it, and at load time a
//! mapping that could leave the namespace is refused ([`TopicMap::check`]).

use tether_proto::mqtt::{Message, Namespace, ROOT, check_filter, matches};

/// Which way a mapping carries messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local messages to the platform.
    Out,
    /// Platform messages to the local broker.
    In,
    Both,
}

impl Direction {
    fn out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }

    fn into_local(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
}

/// Stands for the device's team in a remote prefix (known only once the
/// platform says it).
pub const TEAM: &str = "{team}";
/// Stands for the device id in a remote prefix.
pub const DEVICE: &str = "{device}";

/// One `[[mqtt.topic]]` entry, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicMap {
    /// The filter below both prefixes (`#` by default).
    pub pattern: String,
    /// What local topics start with (may be empty).
    pub local: String,
    /// What wire topics start with: `tether/{team}/...`.
    pub remote: String,
    pub direction: Direction,
    /// The QoS of the subscription that brings these messages to the
    /// bridge (the local broker's for `out`, the platform's for `in`).
    pub qos: u8,
}

/// Why a mapping was refused at load time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicMapError {
    #[error("'{0}' has a wildcard; help: a prefix is a plain topic start such as \"sensors/\"")]
    Wildcard(String),
    #[error("'{0}' is not a topic filter: {1}")]
    Filter(String, String),
    #[error(
        "remote '{0}' leaves the device's namespace: {1}; help: write it as \"tether/{{team}}/{{device}}/out/...\" (out) or \"tether/{{team}}/{{device}}/in/...\" or \"tether/{{team}}/DEVICE/out/...\" (in)"
    )]
    Namespace(String, String),
}

impl TopicMap {
    /// `pattern` between `local` and `remote` prefixes, carried
    /// `direction`, subscribed at QoS 2 (what the bridge carries unless
    /// told less).
    pub fn new(pattern: &str, local: &str, remote: &str, direction: Direction) -> TopicMap {
        TopicMap {
            pattern: pattern.into(),
            local: local.into(),
            remote: remote.into(),
            direction,
            qos: 2,
        }
    }

    /// Checks the mapping without knowing the team or the device yet: the
    /// remote side, with `{team}` and `{device}` standing for any, must be
    /// where the device may publish (`out`, `both`) and subscribe (`in`,
    /// `both`).
    pub fn check(&self) -> Result<(), TopicMapError> {
        for prefix in [&self.local, &self.remote] {
            if prefix.contains(['+', '#']) {
                return Err(TopicMapError::Wildcard(prefix.clone()));
            }
        }
        let local = format!("{}{}", self.local, self.pattern);
        check_filter(&local).map_err(|e| TopicMapError::Filter(local, e.to_string()))?;
        let remote = format!("{}{}", self.remote, self.pattern);
        if !self.remote.starts_with(&format!("{ROOT}/{TEAM}/")) {
            return Err(TopicMapError::Namespace(
                self.remote.clone(),
                format!("it does not start with '{ROOT}/{TEAM}/'"),
            ));
        }
        // Placeholders resolved to names no real team or device has: the
        // check holds for every team and device.
        let namespace = Namespace::new("team", "device")
            .map_err(|e| TopicMapError::Filter(remote.clone(), e.to_string()))?;
        let sample = resolve(&remote, &namespace, "device");
        check_filter(&sample).map_err(|e| TopicMapError::Filter(remote.clone(), e.to_string()))?;
        let why = |e: tether_proto::mqtt::MqttError| {
            TopicMapError::Namespace(self.remote.clone(), e.to_string())
        };
        if self.direction.out() {
            if !self.remote.starts_with(&format!("{ROOT}/{TEAM}/{DEVICE}/")) {
                return Err(TopicMapError::Namespace(
                    self.remote.clone(),
                    format!("a device publishes only under '{ROOT}/{TEAM}/{DEVICE}/'"),
                ));
            }
            // `#` and `+` in the pattern stand for any levels below.
            namespace
                .check_publish(&sample.replace(['+', '#'], "x"))
                .map_err(why)?;
        }
        if self.direction.into_local() {
            namespace.check_subscribe(&sample).map_err(why)?;
        }
        Ok(())
    }
}

/// `prefix` with `{team}` and `{device}` resolved.
fn resolve(prefix: &str, namespace: &Namespace, device: &str) -> String {
    prefix
        .replace(TEAM, namespace.team())
        .replace(DEVICE, device)
}

/// A mapping resolved for the device's namespace.
#[derive(Clone, Debug)]
struct Resolved {
    local: String,
    remote: String,
    local_filter: String,
    remote_filter: String,
    direction: Direction,
    qos: u8,
}

/// The device's mappings, resolved once the platform said its team.
#[derive(Clone, Debug, Default)]
pub struct Topics {
    maps: Vec<Resolved>,
}

impl Topics {
    /// `maps` (checked at load time) for `device` in `namespace`.
    pub fn new(maps: &[TopicMap], namespace: &Namespace, device: &str) -> Topics {
        let maps = maps
            .iter()
            .map(|m| {
                let remote = resolve(&m.remote, namespace, device);
                Resolved {
                    local_filter: format!("{}{}", m.local, m.pattern),
                    remote_filter: format!("{remote}{}", m.pattern),
                    local: m.local.clone(),
                    remote,
                    direction: m.direction,
                    qos: m.qos,
                }
            })
            .collect();
        Topics { maps }
    }

    /// The platform filters the `in` and `both` mappings add, with their QoS.
    pub fn remote_filters(&self) -> impl Iterator<Item = (String, u8)> + '_ {
        self.maps
            .iter()
            .filter(|m| m.direction.into_local())
            .map(|m| (m.remote_filter.clone(), m.qos))
    }

    /// A local message as it goes on the wire: its topic through the first
    /// `out` or `both` mapping that matches it, its response topic through
    /// the first mapping of any direction that matches it (the reply comes
    /// back through an `in` one).
    pub fn to_wire(&self, message: Message) -> Message {
        self.translate(message, Direction::out, |m| {
            (&m.local_filter, &m.local, &m.remote)
        })
    }

    /// A platform message as the local broker gets it: its topic through
    /// the first `in` or `both` mapping that matches it, its response topic
    /// through the first mapping of any direction that matches it (the
    /// reply goes out through an `out` one).
    pub fn to_local(&self, message: Message) -> Message {
        self.translate(message, Direction::into_local, |m| {
            (&m.remote_filter, &m.remote, &m.local)
        })
    }

    /// `message` with its topic mapped by the mappings that `carry` it and
    /// its response topic by any; `side` gives a mapping's filter, the
    /// prefix it strips and the one it adds.
    fn translate(
        &self,
        mut message: Message,
        carry: fn(Direction) -> bool,
        side: fn(&Resolved) -> (&String, &String, &String),
    ) -> Message {
        let carrying = self.maps.iter().filter(|m| carry(m.direction));
        if let Some(topic) = map(carrying, &message.topic, side) {
            message.topic = topic;
        }
        if let Some(response) = &message.properties.response_topic
            && let Some(mapped) = map(self.maps.iter(), response, side)
        {
            message.properties.response_topic = Some(mapped);
        }
        message
    }
}

/// The local filters the `out` and `both` mappings add, with their QoS
/// (known without the namespace: local prefixes have no placeholders).
pub fn local_filters(maps: &[TopicMap]) -> impl Iterator<Item = (String, u8)> + '_ {
    maps.iter()
        .filter(|m| m.direction.out())
        .map(|m| (format!("{}{}", m.local, m.pattern), m.qos))
}

/// `topic` through the first of `maps` whose filter (as `side` gives it,
/// with the prefix it strips and the one it adds) matches it.
fn map<'a>(
    mut maps: impl Iterator<Item = &'a Resolved>,
    topic: &str,
    side: fn(&Resolved) -> (&String, &String, &String),
) -> Option<String> {
    maps.find_map(|m| {
        let (filter, from, to) = side(m);
        let rest = topic.strip_prefix(from.as_str())?;
        matches(filter, topic).then(|| format!("{to}{rest}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use TopicMap as T;

    fn message(topic: &str, response: Option<&str>) -> Message {
        let mut m = Message {
            topic: topic.into(),
            qos: 1,
            retain: false,
            properties: Default::default(),
            payload: bytes::Bytes::from_static(b"x"),
        };
        m.properties.response_topic = response.map(Into::into);
        m
    }

    /// A caller (A) and a responder (B) of team `t`, as `docs/mqtt.md`
    /// shows them.
    fn caller_and_responder() -> (Topics, Topics) {
        let a = [
            T::new(
                "#",
                "call/",
                "tether/{team}/{device}/out/call/",
                Direction::Out,
            ),
            T::new("#", "reply/", "tether/{team}/B/out/reply/", Direction::In),
        ];
        let b = [T::new(
            "#",
            "reply/",
            "tether/{team}/{device}/out/reply/",
            Direction::Out,
        )];
        for m in a.iter().chain(&b) {
            m.check().unwrap();
        }
        let ns = |d: &str| Namespace::new("t", d).unwrap();
        (
            Topics::new(&a, &ns("A"), "A"),
            Topics::new(&b, &ns("B"), "B"),
        )
    }

    #[test]
    fn a_request_and_its_reply_map_both_ways_with_their_response_topic() {
        let (a, b) = caller_and_responder();
        let request = a.to_wire(message("call/B", Some("reply/A")));
        assert_eq!(request.topic, "tether/t/A/out/call/B");
        assert_eq!(
            request.properties.response_topic.as_deref(),
            Some("tether/t/B/out/reply/A")
        );
        // B sees the response topic under its own out/ mapping's local side.
        let seen = b.to_local(request);
        assert_eq!(seen.topic, "tether/t/A/out/call/B", "no in mapping on B");
        assert_eq!(seen.properties.response_topic.as_deref(), Some("reply/A"));
        let reply = b.to_wire(message("reply/A", None));
        assert_eq!(reply.topic, "tether/t/B/out/reply/A");
        assert_eq!(a.to_local(reply).topic, "reply/A");
    }

    #[test]
    fn topics_no_mapping_matches_cross_unchanged() {
        let (a, _) = caller_and_responder();
        let m = a.to_wire(message("tether/t/A/out/x", Some("elsewhere/r")));
        assert_eq!(m.topic, "tether/t/A/out/x");
        assert_eq!(m.properties.response_topic.as_deref(), Some("elsewhere/r"));
        assert_eq!(
            a.to_local(message("tether/t/A/in/y", None)).topic,
            "tether/t/A/in/y"
        );
        let none = Topics::default();
        assert_eq!(none.to_wire(message("call/B", None)).topic, "call/B");
    }

    #[test]
    fn the_pattern_limits_what_a_mapping_takes_and_the_first_match_wins() {
        let maps = [
            T::new(
                "temp/+",
                "s/",
                "tether/{team}/{device}/out/t/",
                Direction::Both,
            ),
            T::new(
                "#",
                "s/",
                "tether/{team}/{device}/out/other/",
                Direction::Out,
            ),
        ];
        let t = Topics::new(&maps, &Namespace::new("t", "d").unwrap(), "d");
        assert_eq!(
            t.to_wire(message("s/temp/1", None)).topic,
            "tether/t/d/out/t/temp/1"
        );
        assert_eq!(
            t.to_wire(message("s/temp/1/deep", None)).topic,
            "tether/t/d/out/other/temp/1/deep"
        );
        assert_eq!(
            local_filters(&maps).collect::<Vec<_>>(),
            [("s/temp/+".to_owned(), 2), ("s/#".to_owned(), 2)]
        );
        assert_eq!(
            t.remote_filters().collect::<Vec<_>>(),
            [("tether/t/d/out/t/temp/+".to_owned(), 2)]
        );
    }

    #[test]
    fn a_mapping_that_could_leave_the_namespace_is_refused_at_load_time() {
        let refused = [
            // Another device's namespace, or a literal team, on the way out.
            T::new("#", "x/", "tether/{team}/other/out/", Direction::Out),
            T::new("#", "x/", "tether/line-3/{device}/out/", Direction::Out),
            T::new("#", "x/", "tether/{team}/{device}/", Direction::Both),
            T::new("#", "x/", "elsewhere/", Direction::In),
            // Another device's inbound topics, or everything of the team.
            T::new("#", "x/", "tether/{team}/other/in/", Direction::In),
            T::new("#", "x/", "tether/{team}/", Direction::In),
            // Wildcards in prefixes, a broken pattern.
            T::new("#", "x/+/", "tether/{team}/{device}/out/", Direction::Out),
            T::new("#", "x/", "tether/{team}/+/out/", Direction::Out),
            T::new("a/#/b", "x/", "tether/{team}/{device}/out/", Direction::Out),
        ];
        for m in refused {
            assert!(m.check().is_err(), "{m:?} was accepted");
        }
        let err = T::new("#", "x/", "tether/{team}/other/out/", Direction::Out)
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the device's namespace"), "{err}");
        let accepted = [
            T::new("#", "", "tether/{team}/{device}/out/", Direction::Out),
            T::new("#", "cmd/", "tether/{team}/{device}/in/", Direction::In),
            T::new("+/out/#", "team/", "tether/{team}/", Direction::In),
            T::new("+/state", "peer/", "tether/{team}/B/out/", Direction::In),
            T::new(
                "#",
                "data/",
                "tether/{team}/{device}/out/data/",
                Direction::Both,
            ),
        ];
        for m in accepted {
            m.check().unwrap_or_else(|e| panic!("{m:?}: {e}"));
        }
    }
}
