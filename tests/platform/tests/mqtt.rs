//! The `mqtt` stream through a real tunnel: the platform's embedded broker,
//! a device's message reaching a platform-side MQTT 5 client, the counts in
//! the device list, and the refusal when MQTT is off.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{enroll_new, open_tunnel};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tether_platform::Platform;
use tether_platform::mqtt::MqttConfig;
use tether_proto::mqtt::{Frame, FrameDecoder, Message, Properties, Subscription};
use tether_proto::tokio_io::TunnelStream;
use tether_proto::{Service, ServiceHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn send(stream: &mut TunnelStream, frame: Frame) {
    let mut out = BytesMut::new();
    frame.encode(&mut out).unwrap();
    stream.write_all(&out).await.unwrap();
}

async fn next(stream: &mut TunnelStream, decoder: &mut FrameDecoder) -> Frame {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            return frame;
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("a frame in time")
            .expect("the stream reads");
        assert!(n > 0, "the platform ended the mqtt stream");
        decoder.push(&buf[..n]);
    }
}

#[tokio::test]
async fn a_device_message_crosses_the_tunnel_to_the_platforms_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.mqtt = MqttConfig::embedded();
    let platform = Platform::start(config).await.unwrap();
    let broker = platform.mqtt_broker_addr().expect("an embedded broker");
    assert!(broker.ip().is_loopback());
    let file = std::fs::read_to_string(dir.path().join("platform.json")).unwrap();
    assert!(
        file.contains(&format!("\"mqtt\": \"mqtt://{broker}\"")),
        "{file}"
    );

    // A platform-side client, subscribed before the device publishes.
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("node-red-platform", broker.ip().to_string(), broker.port()),
        16,
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(packet) = event {
                let _ = tx.send(packet);
            }
        }
    });
    client
        .subscribe("tether/default/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Packet::SubAck(_) => break,
            _ => continue,
        }
    }

    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
    let mut stream = tunnel
        .tunnel
        .open(ServiceHeader::new(Service::Mqtt))
        .unwrap();
    stream
        .accepted()
        .await
        .expect("the mqtt stream is accepted");
    let mut decoder = FrameDecoder::new();
    let Frame::Hello(hello) = next(&mut stream, &mut decoder).await else {
        panic!("expected the hello first");
    };
    // The team is the platform's record of the device (the token's team).
    assert_eq!((hello.team.as_str(), hello.delivered), ("default", 0));
    send(
        &mut stream,
        Frame::Subscribe(vec![Subscription {
            filter: format!("tether/default/{}/in/#", device.id),
            qos: 1,
        }]),
    )
    .await;
    let topic = format!("tether/default/{}/out/temperature", device.id);
    send(
        &mut stream,
        Frame::Publish {
            seq: 1,
            message: Message {
                topic: topic.clone(),
                qos: 1,
                retain: false,
                properties: Properties {
                    user: vec![("unit".into(), "C".into())],
                    ..Properties::default()
                },
                payload: Bytes::from_static(b"21.5"),
            },
        },
    )
    .await;
    assert_eq!(next(&mut stream, &mut decoder).await, Frame::Ack { seq: 1 });
    let got = loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Packet::Publish(p) => break p,
            _ => continue,
        }
    };
    assert_eq!(got.topic, topic.as_bytes());
    assert_eq!(got.payload, Bytes::from_static(b"21.5"));
    assert_eq!(
        got.properties.unwrap().user_properties,
        [("unit".to_string(), "C".to_string())]
    );

    // The device list carries the counts, as `device show` prints them.
    let listed = platform.devices().await.unwrap();
    let mqtt = listed[0].mqtt.clone().expect("mqtt counts");
    assert_eq!((mqtt.from_device, mqtt.delivered), (1, 1));
    assert!(mqtt.stream);
    assert_eq!(mqtt.filters, [format!("tether/default/{}/in/#", device.id)]);
    assert_eq!(platform.mqtt_stats(&device.id), Some(mqtt));
    platform.shutdown().await;
}

#[tokio::test]
async fn without_a_broker_the_mqtt_stream_is_refused_with_the_reason() {
    let (platform, _dir) = common::start().await;
    assert_eq!(platform.mqtt_broker_addr(), None);
    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
    let stream = tunnel
        .tunnel
        .open(ServiceHeader::new(Service::Mqtt))
        .unwrap();
    let refused = stream.accepted().await.unwrap_err();
    assert!(refused.to_string().contains("no MQTT broker"), "{refused}");
    assert_eq!(platform.mqtt_stats(&device.id), None);
    platform.shutdown().await;
}
