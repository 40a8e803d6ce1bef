//! Two real Node-REDs, one per device, exchange a call and its reply
//! through stock `mqtt in` / `mqtt out` nodes over the MQTT bridge, with
//! short local topics (`[[mqtt.topic]]`): device A's flow, called at `GET
//! /call?q=...`, publishes on `call/B` with an MQTT 5 response topic
//! (`reply/A`) and correlation data; device B's flow answers on the response
//! topic it received (`mqtt out` with no topic publishes on
//! `msg.responseTopic` and keeps the correlation data); A's flow matches the
//! reply to the waiting HTTP request by its correlation data and answers
//! it. On the wire (the platform's broker) the same messages carry the
//! namespace's topics. Each device's local broker is Debian's mosquitto;
//! each Node-RED is launched by its agent and gets its flows as a signed
//! snapshot.
//!
//! Needs Node-RED (`tests/nodered/install.sh`, which `.ci/run` runs).
//! Missing, the test fails when `CI` is set and otherwise skips, saying so.

mod common;

use std::time::Duration;

use common::mqtt::*;
use common::snapshot::{connected_with_node_red, create_and_push, get, outcome};
use common::*;
use serde_json::{Value, json};
use tether_agent::config::Config;
use tether_agent::mqtt::topics::{Direction, TopicMap};
use tether_e2e::mqtt::Broker;
use tether_e2e::tools;
use tether_platform::Platform;

/// An `mqtt-broker` config node for the local broker on `port`, MQTT 5.
fn broker_node(port: u16, client_id: &str) -> Value {
    json!({"id": "broker", "type": "mqtt-broker", "name": "local", "broker": "127.0.0.1",
           "port": port.to_string(), "clientid": client_id, "autoConnect": true,
           "usetls": false, "protocolVersion": "5", "keepalive": "15", "cleansession": true,
           "autoUnsubscribe": true, "birthTopic": "", "closeTopic": "", "willTopic": "",
           "userProps": "", "sessionExpiry": ""})
}

/// A function node; without a name, since Node-RED takes a property equal
/// to a node's id for a reference to that node.
fn function(id: &str, func: &str, wires: &[&str]) -> Value {
    json!({"id": id, "type": "function", "z": "tab", "name": "", "func": func,
           "outputs": 1, "timeout": 0, "noerr": 0, "initialize": "", "finalize": "",
           "libs": [], "wires": [wires]})
}

fn mqtt_in(id: &str, topic: &str, wires: &[&str]) -> Value {
    json!({"id": id, "type": "mqtt in", "z": "tab", "name": "", "topic": topic, "qos": "1",
           "datatype": "utf8", "broker": "broker", "nl": false, "rap": true, "rh": 0,
           "inputs": 0, "wires": [wires]})
}

fn mqtt_out(id: &str) -> Value {
    json!({"id": id, "type": "mqtt out", "z": "tab", "name": "", "topic": "", "qos": "1",
           "retain": "false", "respTopic": "", "contentType": "", "userProps": "",
           "correl": "", "expiry": "", "broker": "broker", "wires": []})
}

fn flows(nodes: Vec<Value>) -> Vec<(String, Vec<u8>)> {
    let mut all = vec![json!({"id": "tab", "type": "tab", "label": "mqtt"})];
    all.extend(nodes);
    vec![("flows.json".into(), serde_json::to_vec(&all).unwrap())]
}

/// A's flows: `GET /call?q=...` publishes on `call/RESPONDER` with response
/// topic `reply/SELF` and the message id as correlation data, and answers
/// the request when the reply with that correlation data comes.
fn caller(port: u16, me: &str, responder: &str) -> Vec<(String, Vec<u8>)> {
    let call = format!(
        "const pending = flow.get('pending') || {{}};\n\
         pending[msg._msgid] = msg;\n\
         flow.set('pending', pending);\n\
         return {{topic: 'call/{responder}', payload: msg.req.query.q || '',\n\
                  responseTopic: 'reply/{me}', correlationData: Buffer.from(msg._msgid)}};"
    );
    let reply = "const pending = flow.get('pending') || {};\n\
         const id = msg.correlationData ? msg.correlationData.toString() : '';\n\
         const waiting = pending[id];\n\
         if (!waiting) { return null; }\n\
         delete pending[id];\n\
         waiting.payload = msg.payload + ' | ' + msg.topic;\n\
         return waiting;";
    flows(vec![
        broker_node(port, "flows-a"),
        json!({"id": "http", "type": "http in", "z": "tab", "url": "/call", "method": "get",
               "wires": [["call"]]}),
        function("call", &call, &["publish"]),
        mqtt_out("publish"),
        mqtt_in("replies", "reply/#", &["reply"]),
        function("reply", reply, &["answer"]),
        json!({"id": "answer", "type": "http response", "z": "tab", "statusCode": "",
               "headers": {}, "wires": []}),
    ])
}

/// B's flows: a call on `team/+/out/call/SELF` is answered on its response
/// topic (`mqtt out` without a topic publishes there, correlation data
/// kept).
fn responder(port: u16, me: &str) -> Vec<(String, Vec<u8>)> {
    let answer = "msg.payload = 'pong ' + msg.payload + ' (on ' + msg.topic + ', reply to ' + msg.responseTopic + ')';\n\
         delete msg.topic;\n\
         return msg;";
    flows(vec![
        broker_node(port, "flows-b"),
        mqtt_in("calls", &format!("team/+/out/call/{me}"), &["answer"]),
        function("answer", answer, &["publish"]),
        mqtt_out("publish"),
    ])
}

/// `config` launches Node-RED on `port`; the bridge subscribes on the
/// platform only to the device's inbound topics besides `topics` (the
/// team's `out/` would deliver a mapped message twice).
fn with_node_red(
    config: &mut Config,
    node_red: &std::path::Path,
    port: u16,
    id: &str,
    topics: Vec<TopicMap>,
) {
    let launch = common::snapshot::config(&config.state_dir, node_red, port);
    config.node_red = launch.node_red;
    config.snapshot = launch.snapshot;
    if let Some(mqtt) = config.mqtt.as_mut() {
        mqtt.subscribe = Some(vec![format!("tether/{TEAM}/{id}/in/#")]);
        mqtt.topics = topics;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_reds_call_and_reply_through_mqtt_nodes_with_short_local_topics() {
    let Some(node_red) = tools::required(tools::node_red().find()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    tools::traversable(dir.path());
    let platform = Platform::start(platform_with(dir.path(), None))
        .await
        .unwrap();
    let local_a = Broker::mosquitto(dir.path(), "local-a", "").await.unwrap();
    let local_b = Broker::mosquitto(dir.path(), "local-b", "").await.unwrap();
    let free = || tether_e2e::bench::free_port().unwrap();
    let (port_a, port_b) = (free(), free());

    let b = device_with(&platform, dir.path(), "b", &local_b, |c, id| {
        let topics = vec![
            TopicMap::new("+/out/call/#", "team/", "tether/{team}/", Direction::In),
            TopicMap::new(
                "#",
                "reply/",
                "tether/{team}/{device}/out/reply/",
                Direction::Out,
            ),
        ];
        with_node_red(c, &node_red, port_b, id, topics);
    })
    .await;
    let idb = b.device_id();
    let a = device_with(&platform, dir.path(), "a", &local_a, |c, id| {
        let topics = vec![
            TopicMap::new(
                "#",
                "call/",
                "tether/{team}/{device}/out/call/",
                Direction::Out,
            ),
            TopicMap::new(
                "#",
                "reply/",
                &format!("tether/{{team}}/{idb}/out/reply/"),
                Direction::In,
            ),
        ];
        with_node_red(c, &node_red, port_a, id, topics);
    })
    .await;
    let ida = a.device_id();
    bridged(&platform, &ida).await;
    bridged(&platform, &idb).await;
    let mut wire = client(
        &platform.mqtt_broker_addr().unwrap().to_string(),
        "platform-flows",
        &[format!("tether/{TEAM}/+/out/#")],
    )
    .await;

    let ready = Duration::from_secs(60);
    connected_with_node_red(&b, port_b).await;
    connected_with_node_red(&a, port_a).await;
    create_and_push(&platform, &idb, responder(local_b.port, &idb)).await;
    outcome(&b, "applied", ready).await;
    create_and_push(&platform, &ida, caller(local_a.port, &ida, &idb)).await;
    outcome(&a, "applied", ready).await;

    // The mqtt nodes connect on their own time: call until answered.
    let answer = eventually("A's call to be answered by B", || async {
        get(port_a, "/call?q=ping").await
    })
    .await;
    assert_eq!(
        answer,
        format!("pong ping (on team/{ida}/out/call/{idb}, reply to reply/{ida}) | reply/{ida}")
    );

    // On the wire: the namespace's topics, the response topic mapped too;
    // the reply carries the correlation data of one of the calls (calls
    // made before B's flow subscribed went unanswered).
    let (calls, replies) = (
        topic(&ida, &format!("out/call/{idb}")),
        topic(&idb, &format!("out/reply/{ida}")),
    );
    let mut correlations = Vec::new();
    let reply = loop {
        let p = wire.next().await;
        let props = p.properties.clone().unwrap_or_default();
        if p.topic == calls.as_bytes() {
            assert_eq!(&p.payload[..], b"ping");
            assert_eq!(props.response_topic.as_deref(), Some(replies.as_str()));
            correlations.push(props.correlation_data);
        } else if p.topic == replies.as_bytes() {
            break props;
        }
    };
    assert!(reply.correlation_data.is_some());
    assert!(
        correlations.contains(&reply.correlation_data),
        "{correlations:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}
