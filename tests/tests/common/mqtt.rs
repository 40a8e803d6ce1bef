//! Shared setup for the MQTT bridge's end-to-end tests: brokers, a
//! platform with its broker, devices of one team with their bridge, MQTT 5
//! clients as flows would be, and the audit entries of a device.

use std::process::{Command, Stdio};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use tether_agent::Agent;
use tether_agent::config::MqttConfig as AgentMqtt;
use tether_e2e::mqtt::{Broker, Client};
use tether_platform::audit::AuditQuery;
use tether_platform::mqtt::{MqttBroker, MqttConfig};
use tether_platform::{Platform, TokenSpec};

use super::*;

pub const TEAM: &str = "line-3";

/// rumqttd, as the platform embeds it, in a process of its own on
/// 127.0.0.1 (on `port`, or a free one).
pub async fn rumqttd(port: Option<u16>) -> Broker {
    let port = port.unwrap_or_else(|| tether_e2e::bench::free_port().unwrap());
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether-test-broker"));
    command
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Broker::spawn(command, port).await.unwrap()
}

/// A client of the broker at `addr` (`127.0.0.1:PORT`).
pub async fn client(addr: &str, id: &str, filters: &[String]) -> Client {
    let port = addr.rsplit_once(':').unwrap().1.parse().unwrap();
    tether_e2e::mqtt::client(port, id, filters).await.unwrap()
}

/// What the tests do with a client.
pub trait Flows {
    /// Publishes at QoS 1 with `props`.
    async fn publish(&self, topic: &str, payload: impl Into<Bytes>, props: PublishProperties);
    /// Publishes at QoS 1 without properties.
    async fn send(&self, topic: &str, payload: impl Into<Bytes>) {
        self.publish(topic, payload, PublishProperties::default())
            .await
    }
    async fn next(&mut self) -> Publish;
    async fn next_on(&mut self, topic: &str) -> Publish;
}

impl Flows for Client {
    async fn publish(&self, topic: &str, payload: impl Into<Bytes>, props: PublishProperties) {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), props)
            .await
            .unwrap();
    }

    /// The next message, within the tests' patience.
    async fn next(&mut self) -> Publish {
        tokio::time::timeout(patience(), self.rx.recv())
            .await
            .expect("a message arrives in time")
            .expect("the client runs")
    }

    /// The next message on `topic`, skipping others.
    async fn next_on(&mut self, topic: &str) -> Publish {
        loop {
            let p = self.next().await;
            if p.topic == topic.as_bytes() {
                return p;
            }
        }
    }
}

/// A platform whose broker is `broker` (embedded rumqttd without one).
pub fn platform_with(
    dir: &std::path::Path,
    broker: Option<&Broker>,
) -> tether_platform::PlatformConfig {
    let mut config = platform_config(&dir.join("platform"), "127.0.0.1:0".parse().unwrap());
    config.mqtt = match broker {
        None => MqttConfig::embedded(),
        Some(b) => MqttConfig {
            broker: MqttBroker::External(
                tether_platform::mqtt::BrokerUrl::parse(&format!("mqtt://{}", b.addr())).unwrap(),
            ),
            ..MqttConfig::embedded()
        },
    };
    config
}

/// A device of the team, enrolled in `dir/NAME`, with its bridge to `local`.
pub async fn device(
    platform: &Platform,
    dir: &std::path::Path,
    name: &str,
    local: &Broker,
    tune: impl FnOnce(&mut AgentMqtt, &str),
) -> Agent {
    device_with(platform, dir, name, local, |config, id| {
        if let Some(mqtt) = config.mqtt.as_mut() {
            tune(mqtt, id);
        }
    })
    .await
}

/// [`device`], with the whole agent config to `tune` (given the device id).
pub async fn device_with(
    platform: &Platform,
    dir: &std::path::Path,
    name: &str,
    local: &Broker,
    tune: impl FnOnce(&mut tether_agent::config::Config, &str),
) -> Agent {
    let state = dir.join(name);
    let token = platform
        .create_token(TokenSpec {
            team: TEAM.into(),
            ..TokenSpec::default()
        })
        .await
        .unwrap();
    let enrolled = tether_agent::enroll::enroll(&enroll_options(platform, token, &state))
        .await
        .expect("enrollment");
    let mut config = agent_config(&state);
    config.mqtt = Some(AgentMqtt {
        broker: local.addr(),
        ..AgentMqtt::default()
    });
    tune(&mut config, &enrolled.identity.device_id);
    Agent::start(config).await.expect("agent starts")
}

/// Waits until the platform routes to `device` (its stream is up and its
/// filters subscribed on the platform's broker).
pub async fn bridged(platform: &Platform, device: &str) {
    eventually(&format!("{device}'s MQTT bridge is up"), || async move {
        platform
            .mqtt_stats(device)
            .filter(|s| s.stream && s.subscribed)
            .map(|_| ())
    })
    .await;
}

pub fn topic(device: &str, rest: &str) -> String {
    format!("tether/{TEAM}/{device}/{rest}")
}

pub async fn audit_kinds(platform: &Platform, device: &str, kind: &str) -> Vec<serde_json::Value> {
    let report = platform
        .audit(AuditQuery {
            device: Some(device.into()),
            kind: Some(kind.into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    report
        .entries
        .into_iter()
        .map(|e| serde_json::json!({"subject": e.subject, "details": e.details}))
        .collect()
}
