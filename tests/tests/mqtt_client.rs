//! The MQTT client loop (`tether_mqtt_client`: the agent's connection to
//! its local broker, the platform's to its broker) against Debian's mosquitto, without a tunnel: the broker holds back
//! messages past the agent's receive maximum until the agent acknowledges
//! them, one acknowledgement call for a whole batch releases the rest in
//! order, and the platform's messages reach a subscriber in order and are
//! reported delivered, through more of them than the agent's packet ids
//! (so ids are reused as the broker acknowledges them); an idle gap longer
//! than several keep-alive periods keeps the same connection.
//!
//! Needs mosquitto (`.ci/run` installs it).

use std::sync::Arc;
use std::time::Duration;

use tether_e2e::mqtt::{Broker, client as mqtt_client};
use tether_mqtt_client::{
    self as client, Deliveries, Outbound, Publish, QoS, Session, Settings, Tag,
};
use tokio::sync::mpsc;

/// What the loop reports, as channels the test reads.
struct Seen {
    received: mpsc::UnboundedSender<(u64, Publish)>,
    delivered: mpsc::UnboundedSender<Tag>,
}

impl Deliveries for Seen {
    async fn received(&self, connection: u64, publish: Publish) -> bool {
        self.received.send((connection, publish)).is_ok()
    }

    fn delivered(&self, tag: Tag) {
        let _ = self.delivered.send(tag);
    }

    fn rejected(&self, tag: Tag, topic: &str, reason: &str) {
        panic!("{tag:?} on {topic} rejected: {reason}");
    }
}

const INFLIGHT: u16 = 16;

/// Everything that arrives within `wait` of the last one.
async fn drain<T>(rx: &mut mpsc::UnboundedReceiver<T>, wait: Duration) -> Vec<T> {
    let mut out = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(wait, rx.recv()).await {
        out.push(item);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_waits_for_batched_acknowledgements_and_platform_messages_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::mosquitto(dir.path(), "local", "").await.unwrap();
    let (handle, loop_half) = client::new(
        Settings {
            host: "127.0.0.1".into(),
            port: broker.port,
            tls: None,
            client_id: "tetherd-test".into(),
            // Short, so the idle gap below outlasts several of them.
            keep_alive: Duration::from_secs(1),
            session: Session::Kept { expiry_secs: 60 },
            inflight: INFLIGHT,
            max_packet: 1 << 20,
            login: None,
            filters: vec![("dev/out/#".into(), QoS::AtLeastOnce)],
            manual_acks: true,
            connect_timeout: Duration::from_secs(5),
            retry: (Duration::from_millis(200), Duration::from_secs(1)),
        },
        usize::from(INFLIGHT),
    );
    let (received_tx, mut received) = mpsc::unbounded_channel();
    let (delivered_tx, mut delivered) = mpsc::unbounded_channel();
    let task = tokio::spawn(client::run(
        loop_half,
        Arc::new(Seen {
            received: received_tx,
            delivered: delivered_tx,
        }),
    ));

    // A flow on the local broker, and a subscriber to what the platform
    // sends.
    let flow = mqtt_client(broker.port, "flow", &["dev/in/#".into()])
        .await
        .unwrap();
    // The agent subscribes once connected: publish until the first
    // message comes through.
    let first = loop {
        flow.client
            .publish("dev/out/0", QoS::AtLeastOnce, false, b"0".to_vec())
            .await
            .unwrap();
        if let Ok(Some(first)) =
            tokio::time::timeout(Duration::from_millis(500), received.recv()).await
        {
            break first;
        }
    };
    // Messages published before the subscription are not the agent's;
    // those after it are acknowledged, so none holds the window.
    let connection = first.0;
    handle.ack(connection, vec![(first.1.pkid, first.1.qos)]);
    let late = drain(&mut received, Duration::from_millis(300)).await;
    handle.ack(
        connection,
        late.iter().map(|(_, p)| (p.pkid, p.qos)).collect(),
    );

    for n in 1..=40u32 {
        flow.client
            .publish(
                "dev/out/n",
                QoS::AtLeastOnce,
                false,
                n.to_string().into_bytes(),
            )
            .await
            .unwrap();
    }
    let held = drain(&mut received, Duration::from_millis(700)).await;
    assert_eq!(
        held.len(),
        usize::from(INFLIGHT),
        "the broker sends no more than the agent's receive maximum unacknowledged"
    );
    let mut got: Vec<u32> = Vec::new();
    let mut batch = held;
    while !batch.is_empty() {
        got.extend(batch.iter().map(|(_, p)| {
            std::str::from_utf8(&p.payload)
                .unwrap()
                .parse::<u32>()
                .unwrap()
        }));
        assert!(batch.iter().all(|(c, _)| *c == connection));
        // One call for the whole batch.
        handle.ack(
            connection,
            batch.iter().map(|(_, p)| (p.pkid, p.qos)).collect(),
        );
        batch = drain(&mut received, Duration::from_millis(700)).await;
    }
    assert_eq!(got, (1..=40).collect::<Vec<_>>(), "all of them, in order");

    // The platform's messages: more than the agent's packet ids.
    let mut flow = flow;
    for n in 0..50u64 {
        let publish = Publish::new("dev/in/x", QoS::AtLeastOnce, n.to_string(), None);
        assert!(
            handle
                .publish(Outbound {
                    tag: (9, n),
                    publish,
                })
                .await
        );
    }
    let arrived = drain(&mut flow.rx, Duration::from_millis(700)).await;
    let arrived: Vec<u64> = arrived
        .iter()
        .map(|p| std::str::from_utf8(&p.payload).unwrap().parse().unwrap())
        .collect();
    assert_eq!(arrived, (0..50).collect::<Vec<_>>());
    let tags = drain(&mut delivered, Duration::from_millis(300)).await;
    assert_eq!(tags, (0..50).map(|n| (9, n)).collect::<Vec<_>>());

    // Idle for more than three keep-alive periods (mosquitto drops a client
    // silent for one and a half): the pings keep the same connection up.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    flow.client
        .publish("dev/out/n", QoS::AtLeastOnce, false, b"41".to_vec())
        .await
        .unwrap();
    let (after_idle, publish) = tokio::time::timeout(Duration::from_secs(5), received.recv())
        .await
        .expect("a message after the idle gap")
        .unwrap();
    assert_eq!(&publish.payload[..], b"41");
    assert_eq!(after_idle, connection, "no reconnect over the idle gap");
    task.abort();
}
