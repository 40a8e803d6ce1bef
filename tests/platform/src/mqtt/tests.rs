//! The bridge against a real rumqttd on 127.0.0.1: a device is played by a
//! peer speaking the §19 frames on an in-memory stream, and the platform
//! side by a rumqttc MQTT 5 client on the broker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tether_proto::mqtt::{Frame, FrameDecoder, Hello, Message, Properties, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Bridge, MqttConfig, MqttStats, StreamError};

const WAIT: Duration = Duration::from_secs(10);

async fn bridge_with(config: MqttConfig) -> Arc<Bridge> {
    Arc::new(
        Bridge::start(&config)
            .await
            .expect("the embedded broker starts")
            .expect("MQTT is on"),
    )
}

async fn bridge() -> Arc<Bridge> {
    bridge_with(MqttConfig::embedded()).await
}

/// A device on its `mqtt` stream.
struct Device {
    io: DuplexStream,
    decoder: FrameDecoder,
    served: JoinHandle<Result<(), StreamError>>,
}

impl Device {
    /// Opens a stream of `device` of `team` and reads the hello.
    async fn open(bridge: &Arc<Bridge>, team: &str, device: &str) -> (Device, Hello) {
        let (ours, theirs) = tokio::io::duplex(4 * 1024 * 1024);
        let (bridge, team, id) = (bridge.clone(), team.to_owned(), device.to_owned());
        let served = tokio::spawn(async move { bridge.serve(&id, &team, theirs).await });
        let mut device = Device {
            io: ours,
            decoder: FrameDecoder::new(),
            served,
        };
        match device.next().await {
            Frame::Hello(hello) => (device, hello),
            other => panic!("expected the hello first, got {other:?}"),
        }
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out).expect("encodes");
        self.io.write_all(&out).await.expect("the stream is open");
    }

    async fn subscribe(&mut self, filters: &[(&str, u8)]) {
        let list = filters
            .iter()
            .map(|(filter, qos)| Subscription {
                filter: (*filter).to_owned(),
                qos: *qos,
            })
            .collect();
        self.send(Frame::Subscribe(list)).await;
    }

    async fn publish(&mut self, seq: u64, message: Message) {
        self.send(Frame::Publish { seq, message }).await;
    }

    async fn try_next(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(frame) = self.decoder.next_frame().expect("a well-formed frame") {
                return Some(frame);
            }
            let n = tokio::time::timeout_at(deadline, self.io.read(&mut buf))
                .await
                .ok()?
                .expect("the stream reads");
            assert!(n > 0, "the platform ended the stream");
            self.decoder.push(&buf[..n]);
        }
    }

    async fn next(&mut self) -> Frame {
        self.try_next(WAIT)
            .await
            .expect("a frame from the platform")
    }

    /// Frames until one matches `done`, that one included.
    async fn until(&mut self, mut done: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let last = done(&frame);
            frames.push(frame);
            if last {
                return frames;
            }
        }
    }

    /// Ends the stream and waits until the platform sees the device offline.
    async fn close(self, bridge: &Bridge, device: &str) {
        drop(self.io);
        let _ = tokio::time::timeout(WAIT, self.served).await;
        wait_for(bridge, device, |s| !s.stream).await;
    }
}

fn message(topic: &str, qos: u8, payload: &[u8]) -> Message {
    Message {
        topic: topic.to_owned(),
        qos,
        retain: false,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Waits until the device's counts satisfy `ok`; returns them.
async fn wait_for(bridge: &Bridge, device: &str, ok: impl Fn(&MqttStats) -> bool) -> MqttStats {
    let start = Instant::now();
    loop {
        if let Some(stats) = bridge.stats(device)
            && ok(&stats)
        {
            return stats;
        }
        assert!(
            start.elapsed() < WAIT,
            "counts never got there: {:?}",
            bridge.stats(device)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A platform-side MQTT 5 client (a Node-RED on the platform, say).
struct Peer {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    acks: mpsc::UnboundedReceiver<Packet>,
}

impl Peer {
    async fn connect(addr: SocketAddr, id: &str) -> Peer {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_max_packet_size(Some(2 * 1024 * 1024));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (pub_tx, publishes) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = pub_tx.send(p);
                    }
                    Ok(Event::Incoming(
                        packet @ (Packet::ConnAck(_)
                        | Packet::SubAck(_)
                        | Packet::PubAck(_)
                        | Packet::PubComp(_)),
                    )) => {
                        let _ = ack_tx.send(packet);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("the peer's connection failed: {e}"),
                }
            }
        });
        let mut peer = Peer {
            client,
            publishes,
            acks,
        };
        assert!(matches!(peer.ack().await, Packet::ConnAck(_)));
        peer
    }

    async fn ack(&mut self) -> Packet {
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .expect("an answer from the broker")
            .expect("the peer runs")
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        assert!(matches!(self.ack().await, Packet::SubAck(_)));
    }

    async fn publish(&mut self, topic: &str, qos: QoS, payload: &str) {
        self.client
            .publish(topic, qos, false, payload.to_owned())
            .await
            .unwrap();
        if qos != QoS::AtMostOnce {
            assert!(matches!(
                self.ack().await,
                Packet::PubAck(_) | Packet::PubComp(_)
            ));
        }
    }

    async fn try_received(&mut self, within: Duration) -> Option<Publish> {
        tokio::time::timeout(within, self.publishes.recv())
            .await
            .ok()
            .flatten()
    }

    async fn received(&mut self) -> Publish {
        self.try_received(WAIT)
            .await
            .expect("a message from the broker")
    }
}

fn topic(p: &Publish) -> &str {
    std::str::from_utf8(&p.topic).unwrap()
}

#[tokio::test]
async fn a_device_publish_reaches_the_broker_with_its_properties_and_is_acknowledged() {
    let bridge = bridge().await;
    let mut peer = Peer::connect(bridge.broker_addr().unwrap(), "node-red").await;
    peer.subscribe("tether/line-3/#").await;
    let (mut device, hello) = Device::open(&bridge, "line-3", "dev_a").await;
    assert_eq!(hello.team, "line-3");
    assert_eq!(hello.delivered, 0);
    assert_eq!(hello.epoch, bridge.epoch());
    assert_eq!(hello.max_payload as usize, tether_proto::mqtt::MAX_PAYLOAD);

    let properties = Properties {
        payload_format: Some(1),
        message_expiry: Some(3600),
        content_type: Some("application/json".into()),
        response_topic: Some("tether/line-3/dev_a/in/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00call-7\xff")),
        user: vec![
            ("node".into(), "link call".into()),
            ("node".into(), "twice".into()),
        ],
    };
    let mut request = message("tether/line-3/dev_a/out/request", 1, b"{\"n\":1}");
    request.properties = properties.clone();
    device.publish(1, request).await;
    // QoS 2 goes through the broker's PUBREC / PUBREL / PUBCOMP.
    device
        .publish(2, message("tether/line-3/dev_a/out/exactly", 2, b"once"))
        .await;
    let acked = device.until(|f| *f == Frame::Ack { seq: 2 }).await;
    assert!(
        acked.iter().all(|f| matches!(f, Frame::Ack { .. })),
        "{acked:?}"
    );

    let got = peer.received().await;
    assert_eq!(topic(&got), "tether/line-3/dev_a/out/request");
    assert_eq!(got.payload, Bytes::from_static(b"{\"n\":1}"));
    assert_eq!(got.qos, QoS::AtLeastOnce);
    let p: PublishProperties = got.properties.expect("properties");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type, properties.content_type);
    assert_eq!(p.response_topic, properties.response_topic);
    assert_eq!(p.correlation_data, properties.correlation_data);
    assert_eq!(p.user_properties, properties.user);
    // The broker counts the expiry down while it holds the message.
    let expiry = p.message_expiry_interval.expect("the expiry");
    assert!((3590..=3600).contains(&expiry), "{expiry}");
    // Delivered at the peer's subscription's QoS 1.
    let exactly = peer.received().await;
    assert_eq!(
        (topic(&exactly), exactly.qos),
        ("tether/line-3/dev_a/out/exactly", QoS::AtLeastOnce)
    );

    let stats = wait_for(&bridge, "dev_a", |s| s.from_device == 2).await;
    assert_eq!(
        (stats.delivered, stats.refused, stats.duplicates),
        (2, 0, 0)
    );
    assert!(stats.stream && stats.broker_connected);
}

/// A burst is acknowledged in a few frames, not one per broker reply:
/// each acknowledgement is a wake-up of the device. (On two threads, as
/// the platform runs: on one, the stream would run only after the client
/// handled every reply.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_acknowledged_in_a_few_frames_the_last_covering_it_all() {
    const BURST: u64 = 1000;
    let bridge = bridge().await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_c").await;
    let mut out = BytesMut::new();
    for seq in 1..=BURST {
        let m = message(&format!("tether/t/dev_c/out/{seq}"), 1, b"burst");
        Frame::Publish { seq, message: m }.encode(&mut out).unwrap();
    }
    device.io.write_all(&out).await.unwrap();
    let acks = device.until(|f| *f == Frame::Ack { seq: BURST }).await;
    assert!(
        acks.iter().all(|f| matches!(f, Frame::Ack { .. })),
        "{acks:?}"
    );
    let most = 2 * (BURST / super::link::ACK_EVERY + 1) as usize;
    assert!(
        acks.len() <= most,
        "{} acknowledgements: {acks:?}",
        acks.len()
    );
    wait_for(&bridge, "dev_c", |s| s.from_device == BURST).await;
}

#[tokio::test]
async fn a_message_sent_again_is_acknowledged_but_published_once() {
    let bridge = bridge().await;
    let mut peer = Peer::connect(bridge.broker_addr().unwrap(), "peer").await;
    peer.subscribe("tether/t/#").await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_b").await;
    let m = message("tether/t/dev_b/out/x", 1, b"one");
    device.publish(1, m.clone()).await;
    assert_eq!(device.next().await, Frame::Ack { seq: 1 });
    // Sent again on the same stream: acknowledged again, not published.
    device.publish(1, m.clone()).await;
    assert_eq!(device.next().await, Frame::Ack { seq: 1 });
    // ... and after a reconnect: the hello says it is delivered.
    device.close(&bridge, "dev_b").await;
    let (mut device, hello) = Device::open(&bridge, "t", "dev_b").await;
    assert_eq!(hello.delivered, 1);
    device.publish(1, m).await;
    assert_eq!(device.next().await, Frame::Ack { seq: 1 });

    assert_eq!(topic(&peer.received().await), "tether/t/dev_b/out/x");
    assert!(
        peer.try_received(Duration::from_millis(500))
            .await
            .is_none(),
        "published twice"
    );
    let stats = wait_for(&bridge, "dev_b", |s| s.duplicates == 2).await;
    assert_eq!(stats.from_device, 1);
}

#[tokio::test]
async fn a_publish_outside_the_namespace_is_refused_counted_and_acknowledged() {
    let bridge = bridge().await;
    let mut peer = Peer::connect(bridge.broker_addr().unwrap(), "peer").await;
    peer.subscribe("#").await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_c").await;
    device
        .publish(1, message("tether/t/dev_other/out/x", 1, b"not mine"))
        .await;
    match device.next().await {
        Frame::Refused(r) => {
            assert_eq!((r.seq, r.topic.as_str()), (1, "tether/t/dev_other/out/x"));
            assert!(r.reason.contains("outside"), "{}", r.reason);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The refused message is handled: the watermark moves past it.
    assert_eq!(device.next().await, Frame::Ack { seq: 1 });
    device
        .publish(2, message("tether/t/dev_c/out/x", 1, b"mine"))
        .await;
    assert_eq!(device.next().await, Frame::Ack { seq: 2 });
    // A QoS 0 message outside: refused with seq 0, nothing to acknowledge.
    device.publish(0, message("elsewhere", 0, b"no")).await;
    match device.next().await {
        Frame::Refused(r) => assert_eq!((r.seq, r.topic.as_str()), (0, "elsewhere")),
        other => panic!("expected a refusal, got {other:?}"),
    }

    let got = peer.received().await;
    assert_eq!(topic(&got), "tether/t/dev_c/out/x");
    assert!(
        peer.try_received(Duration::from_millis(300))
            .await
            .is_none()
    );
    let stats = wait_for(&bridge, "dev_c", |s| s.refused == 2).await;
    assert_eq!((stats.from_device, stats.delivered), (1, 2));
    assert!(
        stats
            .last_refusal
            .as_deref()
            .unwrap()
            .contains("'elsewhere'"),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_subscription_outside_the_namespace_is_refused() {
    let bridge = bridge().await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_d").await;
    device
        .subscribe(&[
            ("tether/t/dev_d/in/#", 1),
            ("tether/t/dev_other/in/#", 1),
            ("#", 0),
            ("tether/t/+/out/#", 3),
            ("tether/t/+/out/#", 0),
        ])
        .await;
    let mut refused = Vec::new();
    for _ in 0..3 {
        match device.next().await {
            Frame::Refused(r) => {
                assert_eq!(r.seq, 0);
                refused.push(r.topic);
            }
            other => panic!("expected refusals, got {other:?}"),
        }
    }
    assert_eq!(
        refused,
        ["tether/t/dev_other/in/#", "#", "tether/t/+/out/#"]
    );
    let stats = wait_for(&bridge, "dev_d", |s| s.subscribed).await;
    assert_eq!(stats.filters, ["tether/t/dev_d/in/#", "tether/t/+/out/#"]);
    assert_eq!(stats.refused, 3);
    assert!(device.try_next(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn the_broker_routes_to_a_device_only_its_namespace_and_its_filters() {
    let bridge = bridge().await;
    let mut peer = Peer::connect(bridge.broker_addr().unwrap(), "peer").await;
    let (mut a, _) = Device::open(&bridge, "t", "dev_a").await;
    let (mut b, _) = Device::open(&bridge, "t", "dev_b").await;
    a.subscribe(&[("tether/t/dev_a/in/#", 1), ("tether/t/+/out/#", 1)])
        .await;
    b.subscribe(&[("tether/t/dev_b/in/#", 1), ("tether/t/+/out/news", 0)])
        .await;
    wait_for(&bridge, "dev_a", |s| s.subscribed).await;
    wait_for(&bridge, "dev_b", |s| s.subscribed).await;

    peer.publish("tether/t/dev_a/in/cmd", QoS::AtLeastOnce, "for a")
        .await;
    peer.publish("tether/t/dev_b/in/cmd", QoS::AtLeastOnce, "for b")
        .await;
    peer.publish(
        "tether/other/dev_x/out/news",
        QoS::AtLeastOnce,
        "other team",
    )
    .await;
    peer.publish("tether/t/platform/out/news", QoS::AtMostOnce, "broadcast")
        .await;
    // Each device's own broadcast: the other device gets it, never itself.
    a.publish(1, message("tether/t/dev_a/out/news", 1, b"from a"))
        .await;
    b.publish(1, message("tether/t/dev_b/out/news", 1, b"from b"))
        .await;
    // A device publishing on its own inbound topic does not hear it back,
    // though rumqttd ignores "no local".
    a.publish(2, message("tether/t/dev_a/in/self", 1, b"echo?"))
        .await;

    let received = |frames: Vec<Frame>| -> Vec<(String, u64, u8)> {
        let mut got: Vec<_> = frames
            .into_iter()
            .filter_map(|f| match f {
                Frame::Publish { seq, message } => Some((message.topic, seq, message.qos)),
                _ => None,
            })
            .collect();
        got.sort();
        got
    };
    let mut frames_a = Vec::new();
    while let Some(frame) = a.try_next(Duration::from_millis(700)).await {
        frames_a.push(frame);
    }
    let mut frames_b = Vec::new();
    while let Some(frame) = b.try_next(Duration::from_millis(200)).await {
        frames_b.push(frame);
    }
    let got_a = received(frames_a);
    let topics_a: Vec<&str> = got_a.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        topics_a,
        [
            "tether/t/dev_a/in/cmd",
            "tether/t/dev_b/out/news",
            "tether/t/platform/out/news"
        ],
        "{got_a:?}"
    );
    // QoS 1 and 2 messages are numbered from 1, QoS 0 ones are 0. (The
    // QoS 0 broadcast arrives as QoS 1: rumqttd delivers at the
    // subscription's QoS, mosquitto at the lower of the two.)
    assert!(got_a.iter().all(|(_, seq, qos)| (*seq == 0) == (*qos == 0)));
    let mut seqs: Vec<u64> = got_a
        .iter()
        .map(|(_, s, _)| *s)
        .filter(|s| *s > 0)
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(seqs.len() >= 2, "{got_a:?}");
    let got_b = received(frames_b);
    let topics_b: Vec<&str> = got_b.iter().map(|(t, _, _)| t.as_str()).collect();
    // B's broadcast filter is QoS 0: A's QoS 1 message arrives as QoS 0.
    assert_eq!(
        topics_b,
        [
            "tether/t/dev_a/out/news",
            "tether/t/dev_b/in/cmd",
            "tether/t/platform/out/news"
        ],
        "{got_b:?}"
    );
    assert!(got_b.contains(&("tether/t/dev_a/out/news".into(), 0, 0)));
}

#[tokio::test]
async fn messages_for_an_offline_device_are_kept_bounded_and_delivered_in_order() {
    let bridge = bridge_with(MqttConfig {
        queue_messages: 3,
        ..MqttConfig::embedded()
    })
    .await;
    let mut peer = Peer::connect(bridge.broker_addr().unwrap(), "peer").await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_f").await;
    device
        .subscribe(&[("tether/t/dev_f/in/m", 2), ("tether/t/dev_f/in/q0", 0)])
        .await;
    wait_for(&bridge, "dev_f", |s| s.subscribed).await;
    device.close(&bridge, "dev_f").await;

    for n in 1..=5 {
        peer.publish("tether/t/dev_f/in/m", QoS::AtLeastOnce, &format!("m{n}"))
            .await;
    }
    // Through a QoS 0 filter: QoS 0, dropped while the device is offline.
    peer.publish("tether/t/dev_f/in/q0", QoS::AtLeastOnce, "lost")
        .await;
    let stats = wait_for(&bridge, "dev_f", |s| {
        s.queued_offline == 5 && s.qos0_dropped == 1
    })
    .await;
    assert_eq!((stats.dropped, stats.waiting), (2, 3));

    let payloads = |frames: &[Frame]| -> Vec<(u64, String)> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Publish { seq, message } => {
                    Some((*seq, String::from_utf8_lossy(&message.payload).into_owned()))
                }
                _ => None,
            })
            .collect()
    };
    let expected = [(3, "m3".to_owned()), (4, "m4".into()), (5, "m5".into())];
    // Delivered on the next stream, oldest first; not acknowledged...
    let (mut device, _) = Device::open(&bridge, "t", "dev_f").await;
    let frames = device
        .until(|f| matches!(f, Frame::Publish { seq: 5, .. }))
        .await;
    assert_eq!(payloads(&frames), expected);
    device.close(&bridge, "dev_f").await;
    // ... so sent again on the one after; this time two are acknowledged...
    let (mut device, _) = Device::open(&bridge, "t", "dev_f").await;
    let frames = device
        .until(|f| matches!(f, Frame::Publish { seq: 5, .. }))
        .await;
    assert_eq!(payloads(&frames), expected);
    device.send(Frame::Ack { seq: 4 }).await;
    let stats = wait_for(&bridge, "dev_f", |s| s.acked_by_device == 2).await;
    assert_eq!(stats.waiting, 1);
    device.close(&bridge, "dev_f").await;
    // ... and only the third is sent again.
    let (mut device, _) = Device::open(&bridge, "t", "dev_f").await;
    let frames = device
        .until(|f| matches!(f, Frame::Publish { seq: 5, .. }))
        .await;
    assert_eq!(payloads(&frames), [(5, "m5".to_owned())]);
    device.send(Frame::Ack { seq: 5 }).await;
    let stats = wait_for(&bridge, "dev_f", |s| s.acked_by_device == 3).await;
    assert_eq!((stats.waiting, stats.to_device, stats.dropped), (0, 3, 2));
    // The subscription lived on without the device: a new message flows.
    peer.publish("tether/t/dev_f/in/m", QoS::AtLeastOnce, "m6")
        .await;
    let frames = device.until(|f| matches!(f, Frame::Publish { .. })).await;
    assert_eq!(payloads(&frames), [(6, "m6".to_owned())]);
}

#[tokio::test]
async fn an_oversize_payload_is_refused() {
    let bridge = bridge_with(MqttConfig {
        max_payload: 1024,
        ..MqttConfig::embedded()
    })
    .await;
    let (mut device, hello) = Device::open(&bridge, "t", "dev_g").await;
    assert_eq!(hello.max_payload, 1024);
    device
        .publish(1, message("tether/t/dev_g/out/big", 1, &[7u8; 1025]))
        .await;
    match device.next().await {
        Frame::Refused(r) => {
            assert_eq!(r.seq, 1);
            assert!(
                r.reason.contains("larger than the limit of 1024"),
                "{}",
                r.reason
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(device.next().await, Frame::Ack { seq: 1 });
    device
        .publish(2, message("tether/t/dev_g/out/big", 1, &[7u8; 1024]))
        .await;
    assert_eq!(device.next().await, Frame::Ack { seq: 2 });
    let stats = wait_for(&bridge, "dev_g", |s| s.from_device == 1).await;
    assert_eq!(stats.refused, 1);
}

#[tokio::test]
async fn a_device_without_a_namespace_or_speaking_out_of_turn_is_refused() {
    let bridge = bridge().await;
    let (_ours, theirs) = tokio::io::duplex(1024);
    let refused = bridge.serve("dev/slash", "t", theirs).await.unwrap_err();
    assert!(matches!(refused, StreamError::Namespace(_)), "{refused}");

    let (mut device, hello) = Device::open(&bridge, "", "dev_h").await;
    assert_eq!(hello.team, tether_proto::mqtt::NO_TEAM);
    device.send(Frame::Hello(hello)).await;
    let ended = tokio::time::timeout(WAIT, device.served).await.unwrap();
    assert!(
        matches!(ended, Ok(Err(StreamError::Unexpected("hello")))),
        "{ended:?}"
    );
}

#[tokio::test]
async fn a_new_stream_replaces_the_old_one_and_the_figures_are_kept() {
    let bridge = bridge().await;
    let (mut first, _) = Device::open(&bridge, "t", "dev_i").await;
    let figures = tether_proto::mqtt::Figures {
        outbox_messages: 12,
        outbox_bytes: 3456,
        ..Default::default()
    };
    first.send(Frame::Figures(figures.clone())).await;
    wait_for(&bridge, "dev_i", |s| s.figures.as_ref() == Some(&figures)).await;
    let (_second, _) = Device::open(&bridge, "t", "dev_i").await;
    let ended = tokio::time::timeout(WAIT, first.served).await.unwrap();
    assert!(matches!(ended, Ok(Err(StreamError::Replaced))), "{ended:?}");
    let stats = bridge.stats("dev_i").unwrap();
    assert!(stats.stream, "the newer stream is live");
}

#[tokio::test]
async fn a_device_past_its_rate_is_slowed_not_dropped() {
    let bridge = bridge_with(MqttConfig {
        rate_per_sec: 100,
        rate_burst: 10,
        ..MqttConfig::embedded()
    })
    .await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_r").await;
    let start = Instant::now();
    for seq in 1..=30 {
        device
            .publish(seq, message("tether/t/dev_r/out/x", 1, b"."))
            .await;
    }
    device.until(|f| *f == Frame::Ack { seq: 30 }).await;
    // 10 at once, then 20 at 100 a second: at least 0.2 s.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(190), "{took:?}");
    let stats = wait_for(&bridge, "dev_r", |s| s.from_device == 30).await;
    assert_eq!(stats.refused, 0);
}

/// A TCP relay to the broker that can be cut, to play a broker outage,
/// or lose what the client sends.
struct Relay {
    addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    /// Client → broker bytes are forwarded (else dropped).
    forward: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let forward = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (up2, conns, fwd) = (up.clone(), connections.clone(), forward.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let fwd = fwd.clone();
                let task = tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let (mut in_rd, mut in_wr) = inbound.into_split();
                    let (mut out_rd, mut out_wr) = outbound.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = in_rd.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            if fwd.load(std::sync::atomic::Ordering::SeqCst)
                                && out_wr.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut out_rd, &mut in_wr);
                    tokio::select! {
                        () = up => {}
                        _ = down => {}
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        Relay {
            addr,
            up,
            forward,
            connections,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
        self.forward
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops what clients send from now on (the connection stays up).
    fn lose(&self) {
        self.forward
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn after_a_broker_outage_the_client_subscribes_again_and_publishes_what_waited() {
    let broker = bridge().await;
    let relay = Relay::start(broker.broker_addr().unwrap()).await;
    let url = super::BrokerUrl::parse(&format!("mqtt://{}", relay.addr)).unwrap();
    let bridge = bridge_with(MqttConfig {
        broker: super::MqttBroker::External(url),
        ..MqttConfig::default()
    })
    .await;
    let mut peer = Peer::connect(broker.broker_addr().unwrap(), "peer").await;
    peer.subscribe("tether/t/dev_o/out/#").await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_o").await;
    device.subscribe(&[("tether/t/dev_o/in/#", 1)]).await;
    wait_for(&bridge, "dev_o", |s| s.subscribed).await;

    relay.cut();
    wait_for(&bridge, "dev_o", |s| !s.broker_connected).await;
    device
        .publish(1, message("tether/t/dev_o/out/x", 1, b"waited"))
        .await;
    assert!(
        device.try_next(Duration::from_millis(300)).await.is_none(),
        "acknowledged before the broker had it"
    );
    relay.restore();
    assert_eq!(device.next().await, Frame::Ack { seq: 1 });
    let got = peer.received().await;
    assert_eq!(got.payload, Bytes::from_static(b"waited"));
    // Subscribed again on the new connection: messages reach the device.
    wait_for(&bridge, "dev_o", |s| s.subscribed).await;
    peer.publish("tether/t/dev_o/in/cmd", QoS::AtLeastOnce, "after")
        .await;
    match device.next().await {
        Frame::Publish { seq, message } => {
            assert_eq!((seq, &message.payload[..]), (1, &b"after"[..]));
        }
        other => panic!("expected the message, got {other:?}"),
    }
    // A message lost on its way to the broker is published again after
    // the reconnect.
    relay.lose();
    device
        .publish(2, message("tether/t/dev_o/out/x", 1, b"lost once"))
        .await;
    assert!(device.try_next(Duration::from_millis(300)).await.is_none());
    relay.cut();
    relay.restore();
    assert_eq!(device.next().await, Frame::Ack { seq: 2 });
    assert_eq!(
        peer.received().await.payload,
        Bytes::from_static(b"lost once")
    );
    assert!(
        peer.try_received(Duration::from_millis(300))
            .await
            .is_none()
    );
    let stats = wait_for(&bridge, "dev_o", |s| s.from_device == 2).await;
    assert_eq!(stats.delivered, 2);
}

/// mosquitto (Debian's package) on a free loopback port, for as long as
/// the returned child lives.
async fn mosquitto() -> (tokio::process::Child, SocketAddr, tempfile::TempDir) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = tokio::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto runs (apt-get install mosquitto; .ci/run installs it)");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < WAIT,
            "mosquitto does not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (child, addr, dir)
}

#[tokio::test]
async fn with_mosquitto_qos_no_local_and_properties_hold() {
    let (_mosquitto, addr, _dir) = mosquitto().await;
    let url = super::BrokerUrl::parse(&format!("mqtt://{addr}")).unwrap();
    let bridge = bridge_with(MqttConfig {
        broker: super::MqttBroker::External(url),
        ..MqttConfig::default()
    })
    .await;
    assert_eq!(bridge.broker_addr(), Some(addr));
    let mut peer = Peer::connect(addr, "peer").await;
    peer.subscribe("tether/t/dev_m/out/#").await;
    let (mut device, _) = Device::open(&bridge, "t", "dev_m").await;
    device.subscribe(&[("tether/t/dev_m/in/#", 1)]).await;
    wait_for(&bridge, "dev_m", |s| s.subscribed).await;

    let mut request = message("tether/t/dev_m/out/call", 1, b"ping");
    request.properties = Properties {
        response_topic: Some("tether/t/dev_m/in/reply".into()),
        correlation_data: Some(Bytes::from_static(b"c-1")),
        user: vec![("a".into(), "b".into())],
        ..Properties::default()
    };
    device.publish(1, request).await;
    assert_eq!(device.next().await, Frame::Ack { seq: 1 });
    let got = peer.received().await;
    let p = got.properties.unwrap();
    assert_eq!(p.response_topic.as_deref(), Some("tether/t/dev_m/in/reply"));
    assert_eq!(p.correlation_data, Some(Bytes::from_static(b"c-1")));
    assert_eq!(p.user_properties, [("a".to_string(), "b".to_string())]);

    // No local: the broker itself keeps the device's own message from it.
    device
        .publish(2, message("tether/t/dev_m/in/self", 1, b"echo?"))
        .await;
    assert_eq!(device.next().await, Frame::Ack { seq: 2 });
    // QoS 0 stays QoS 0 (the lower of message and subscription).
    peer.publish("tether/t/dev_m/in/q0", QoS::AtMostOnce, "zero")
        .await;
    peer.publish("tether/t/dev_m/in/q1", QoS::AtLeastOnce, "one")
        .await;
    let mut got = Vec::new();
    while let Some(frame) = device.try_next(Duration::from_millis(500)).await {
        if let Frame::Publish { seq, message } = frame {
            got.push((message.topic, seq, message.qos));
        }
    }
    assert_eq!(
        got,
        [
            ("tether/t/dev_m/in/q0".to_string(), 0, 0),
            ("tether/t/dev_m/in/q1".to_string(), 1, 1)
        ]
    );
}
