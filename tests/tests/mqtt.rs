//! The MQTT bridge end to end: two agents, each with a local broker
//! (rumqttd in a process of its own, so it can be restarted), a platform
//! with its broker (embedded rumqttd, or mosquitto where the platform must
//! restart while its broker stays), and MQTT 5 clients on every broker as
//! the flows would be: a request and its reply between two devices with
//! their properties, a platform client reaching a device's inbound topic,
//! QoS 1 across a platform outage, a restarted local broker, a namespace
//! violation, an oversize message, and a burst larger than the outbox.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::mqtt::*;
use common::*;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tether_agent::Agent;
use tether_e2e::mqtt::{Broker, Client};
use tether_platform::Platform;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_its_reply_cross_between_two_devices_with_their_properties() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(platform_with(dir.path(), None))
        .await
        .unwrap();
    let (local_a, local_b) = (rumqttd(None).await, rumqttd(None).await);
    let a = device(&platform, dir.path(), "a", &local_a, |_, _| {}).await;
    let b = device(&platform, dir.path(), "b", &local_b, |_, _| {}).await;
    let (ida, idb) = (a.device_id(), b.device_id());
    bridged(&platform, &ida).await;
    bridged(&platform, &idb).await;
    let platform_broker = platform.mqtt_broker_addr().unwrap().to_string();

    let call = topic(&ida, &format!("out/call/{idb}"));
    let reply = topic(&idb, &format!("out/reply/{ida}"));
    let mut on_a = client(
        &local_a.addr(),
        "flows-a",
        &[topic(&ida, "in/#"), reply.clone()],
    )
    .await;
    let mut on_b = client(
        &local_b.addr(),
        "flows-b",
        &[format!("tether/{TEAM}/+/out/call/{idb}"), "tether/#".into()],
    )
    .await;
    let mut on_platform = client(
        &platform_broker,
        "platform-flows",
        &[format!("tether/{TEAM}/+/out/#")],
    )
    .await;

    // A calls B: QoS 1, MQTT 5 request/response properties.
    let props = PublishProperties {
        response_topic: Some(reply.clone()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![("trace".into(), "t-42".into())],
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    on_a.publish(&call, &b"{\"q\":1}"[..], props).await;
    let request = on_b.next_on(&call).await;
    assert_eq!(&request.payload[..], b"{\"q\":1}");
    let got = request.properties.clone().unwrap();
    assert_eq!(got.response_topic.as_deref(), Some(reply.as_str()));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(got.user_properties, vec![("trace".into(), "t-42".into())]);
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(on_platform.next_on(&call).await.payload, request.payload);

    // B replies on the response topic (its own out/), correlation kept.
    let answer = PublishProperties {
        correlation_data: got.correlation_data.clone(),
        ..Default::default()
    };
    on_b.publish(&reply, &b"{\"a\":2}"[..], answer).await;
    let response = on_a.next_on(&reply).await;
    assert_eq!(&response.payload[..], b"{\"a\":2}");
    assert_eq!(
        response.properties.unwrap().correlation_data.as_deref(),
        Some(&b"corr-1"[..])
    );

    // A platform client reaches A's inbound topic; B never sees it.
    let command = topic(&ida, "in/cmd");
    on_platform.send(&command, &b"stop"[..]).await;
    assert_eq!(&on_a.next_on(&command).await.payload[..], b"stop");
    let marker = topic(&idb, "in/marker");
    on_platform.send(&marker, &b"m"[..]).await;
    loop {
        let p = on_b.next().await;
        assert_ne!(
            p.topic,
            command.as_bytes(),
            "another device's inbound topic reached B"
        );
        if p.topic == marker.as_bytes() {
            break;
        }
    }
    let stats = platform.mqtt_stats(&ida).unwrap();
    assert!(stats.from_device >= 1 && stats.to_device >= 2, "{stats:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Waits until the agent's bridge figures satisfy `pred`.
async fn outbox(agent: &Agent, what: &str, pred: impl Fn(&tether_proto::mqtt::Figures) -> bool) {
    eventually(what, || {
        let figures = agent.mqtt_figures();
        let met = figures.as_ref().is_some_and(&pred);
        async move { met.then_some(()) }
    })
    .await;
}

/// Payloads `0..n` published by `client` on `topic`, QoS 1.
async fn publish_numbered(client: &Client, topic: &str, range: std::ops::Range<u32>) {
    for i in range {
        client.send(topic, i.to_string()).await;
    }
}

/// The numbers the next `n` messages on `topic` carry.
async fn numbers(client: &mut Client, topic: &str, n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = client.next_on(topic).await;
        out.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_wait_out_a_platform_outage_in_order_and_a_full_outbox_drops_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    // The platform's broker is mosquitto, which stays up while the
    // platform restarts; its client sees what the devices delivered.
    let central = Broker::mosquitto(dir.path(), "central", "").await.unwrap();
    let config = platform_with(dir.path(), Some(&central));
    let platform = Platform::start(config.clone()).await.unwrap();
    let local = rumqttd(None).await;
    let agent = device(&platform, dir.path(), "a", &local, |m, _| {
        m.outbox_max_messages = 100
    })
    .await;
    let id = agent.device_id();
    bridged(&platform, &id).await;
    let data = topic(&id, "out/line/temperature");
    let mut on_platform = client(&central.addr(), "historian", std::slice::from_ref(&data)).await;
    let flows = client(&local.addr(), "flows", &[]).await;

    // Online: in order.
    publish_numbered(&flows, &data, 0..50).await;
    assert_eq!(
        numbers(&mut on_platform, &data, 50).await,
        (0..50).collect::<Vec<_>>()
    );

    // The platform goes away: 80 messages wait in the outbox.
    let listen = platform.local_addr();
    platform.shutdown().await;
    drop(platform);
    publish_numbered(&flows, &data, 50..130).await;
    outbox(&agent, "80 messages wait in the outbox", |f| {
        f.outbox_messages == 80
    })
    .await;
    let mut restarted = config.clone();
    restarted.listen = listen;
    let platform = start_retrying_bind(restarted.clone()).await;
    assert_eq!(
        numbers(&mut on_platform, &data, 80).await,
        (50..130).collect::<Vec<_>>()
    );

    // Offline again, a burst of 250 into an outbox of 100: the oldest 150
    // are dropped, counted and audited; the newest 100 arrive in order.
    platform.shutdown().await;
    drop(platform);
    publish_numbered(&flows, &data, 1000..1250).await;
    outbox(&agent, "the oldest 150 dropped", |f| {
        f.outbox_messages == 100 && f.outbox_dropped == 150
    })
    .await;
    let platform = start_retrying_bind(restarted).await;
    assert_eq!(
        numbers(&mut on_platform, &data, 100).await,
        (1150..1250).collect::<Vec<_>>()
    );
    // Reported as the drops start and the rest once they stop (at most
    // ten seconds later): every dropped message is counted once.
    let dropped = eventually("every drop is audited on the platform", || async {
        let entries = audit_kinds(&platform, &id, "mqtt_outbox_dropped").await;
        let total: u64 = entries
            .iter()
            .map(|e| e["details"]["count"].as_u64().unwrap())
            .sum();
        (total >= 150).then_some(entries)
    })
    .await;
    let total: u64 = dropped
        .iter()
        .map(|e| e["details"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 150, "{dropped:?}");
    assert!(
        dropped.len() <= 3,
        "one burst is reported in a few records, not one per batch: {dropped:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_local_broker_is_subscribed_again_and_refusals_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(platform_with(dir.path(), None))
        .await
        .unwrap();
    let mut local = rumqttd(None).await;
    let agent = device(&platform, dir.path(), "a", &local, |m, id| {
        // A filter outside the namespace (not overlapping the device's own:
        // rumqttd would deliver a message once per matching filter), and a
        // 1 KiB payload limit.
        m.publish = vec![
            format!("tether/+/{id}/out/#"),
            format!("tether/{TEAM}/elsewhere/#"),
        ];
        m.max_payload = 1024;
    })
    .await;
    let id = agent.device_id();
    bridged(&platform, &id).await;
    let broker = platform.mqtt_broker_addr().unwrap().to_string();
    let mut on_platform = client(&broker, "platform-flows", &[format!("tether/{TEAM}/#")]).await;
    let data = topic(&id, "out/x");

    // The local broker restarts (its sessions gone): the agent subscribes
    // again, and what a flow publishes after the restart arrives.
    local.stop();
    let local = rumqttd(Some(local.port)).await;
    let flows = client(&local.addr(), "flows", &[]).await;
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        flows.send(&data, "after").await;
        let got = tokio::time::timeout(Duration::from_millis(500), on_platform.rx.recv()).await;
        if matches!(got, Ok(Some(p)) if p.topic == data.as_bytes()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not subscribe again on its restarted local broker"
        );
    }
    // What the retries left on the way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while on_platform.rx.try_recv().is_ok() {}

    // Another device's namespace (under a filter the agent was given) and
    // a payload over the limit: refused on the device, audited, never sent.
    let foreign = format!("tether/{TEAM}/elsewhere/out/x");
    flows.send(&foreign, "no").await;
    flows.send(&data, vec![b'x'; 2048]).await;
    flows.send(&data, "marker").await;
    loop {
        let p = on_platform.next().await;
        assert_ne!(
            p.topic,
            foreign.as_bytes(),
            "a foreign topic left the device"
        );
        assert!(
            p.payload.len() < 2048,
            "an oversize message left the device"
        );
        if &p.payload[..] == b"marker" {
            break;
        }
    }
    let refused = eventually("both refusals audited", || async {
        let entries = audit_kinds(&platform, &id, "mqtt_refused").await;
        (entries.len() >= 2).then_some(entries)
    })
    .await;
    assert!(
        refused.iter().any(|e| e["subject"] == foreign.as_str()
            && e["details"]["reason"]
                .as_str()
                .unwrap()
                .contains("namespace")),
        "{refused:?}"
    );
    assert!(
        refused.iter().any(|e| e["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("larger than")),
        "{refused:?}"
    );
    assert_eq!(agent.mqtt_figures().unwrap().refused, 2);
    agent.shutdown().await;
}
