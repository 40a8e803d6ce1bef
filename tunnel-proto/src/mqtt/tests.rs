use super::*;

fn message(topic: &str, qos: u8) -> Message {
    Message {
        topic: topic.into(),
        qos,
        retain: true,
        properties: Properties {
            payload_format: Some(1),
            message_expiry: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some("tether/line-3/dev-b/out/reply/dev-a".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            user: vec![("k".into(), "v".into()), ("k".into(), "second".into())],
        },
        payload: Bytes::from_static(b"{\"t\":21.5}"),
    }
}

#[test]
fn frames_round_trip_in_any_pieces() {
    let frames = vec![
        Frame::Hello(Hello {
            team: "line-3".into(),
            epoch: 9,
            delivered: 41,
            max_payload: 1 << 20,
        }),
        Frame::Subscribe(vec![Subscription {
            filter: "tether/line-3/+/out/#".into(),
            qos: 1,
        }]),
        Frame::Publish {
            seq: 7,
            message: message("tether/line-3/dev-a/out/t", 1),
        },
        Frame::Publish {
            seq: 0,
            message: Message {
                properties: Properties::default(),
                retain: false,
                ..message("tether/line-3/dev-a/out/t", 0)
            },
        },
        Frame::Ack { seq: u64::MAX },
        Frame::Refused(Refusal {
            seq: 3,
            topic: "elsewhere".into(),
            reason: "outside".into(),
        }),
        Frame::Figures(Figures {
            outbox_messages: 5,
            ..Figures::default()
        }),
    ];
    let mut wire = BytesMut::new();
    for f in &frames {
        f.encode(&mut wire).unwrap();
    }
    for piece in [1, 3, 7, 64, wire.len()] {
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(piece) {
            decoder.push(chunk);
            while let Some(f) = decoder.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames, "pieces of {piece}");
        assert_eq!(decoder.buffered(), 0);
    }
}

#[test]
fn bad_frames_are_refused_with_their_reason() {
    let decode = |bytes: &[u8]| {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        d.next_frame()
    };
    assert!(matches!(
        decode(&(MAX_FRAME as u32 + 1).to_be_bytes()),
        Err(MqttError::TooLarge { .. })
    ));
    assert_eq!(
        decode(&[0, 0, 0, 1, 0x7f]),
        Err(MqttError::UnknownFrame(0x7f))
    );
    assert_eq!(decode(&[0, 0, 0, 3, ACK, 0, 0]), Err(MqttError::Truncated));
    // A QoS 1 message without a sequence number.
    let mut wire = BytesMut::new();
    Frame::Publish {
        seq: 5,
        message: message("tether/t/d/out/x", 1),
    }
    .encode(&mut wire)
    .unwrap();
    wire[5..13].copy_from_slice(&0u64.to_be_bytes());
    assert!(matches!(decode(&wire), Err(MqttError::Malformed(_))));
    // A topic with a wildcard inside a message.
    let mut body = BytesMut::new();
    message("tether/t/d/out/#", 1).encode(&mut body);
    assert!(matches!(
        Message::decode(body.freeze()),
        Err(MqttError::Invalid { what: "topic", .. })
    ));
    // Every truncation of a message is an error, never a panic.
    let mut body = BytesMut::new();
    message("tether/t/d/out/x", 2).encode(&mut body);
    let header = body.len() - message("x", 1).payload.len();
    for cut in 0..header {
        assert!(
            Message::decode(body.clone().freeze().slice(..cut)).is_err(),
            "cut {cut}"
        );
    }
    // Oversize payloads and too many properties.
    let big = Message {
        payload: Bytes::from(vec![0; 2048]),
        ..message("tether/t/d/out/x", 1)
    };
    assert_eq!(
        big.check(1024),
        Err(MqttError::Oversize {
            len: 2048,
            max: 1024
        })
    );
    let mut many = message("tether/t/d/out/x", 1);
    many.properties.user = vec![("a".into(), "b".into()); MAX_USER_PROPERTIES + 1];
    assert!(matches!(
        many.check(MAX_PAYLOAD),
        Err(MqttError::Malformed(_))
    ));
    let too_big = Frame::Publish {
        seq: 1,
        message: Message {
            payload: Bytes::from(vec![0; MAX_FRAME]),
            ..message("tether/t/d/out/x", 1)
        },
    };
    assert!(too_big.encode(&mut BytesMut::new()).is_err());
}

#[test]
fn a_device_publishes_only_under_its_own_prefix() {
    let ns = Namespace::new("line-3", "dev-a").unwrap();
    assert_eq!(ns.prefix(), "tether/line-3/dev-a/");
    for ok in [
        "tether/line-3/dev-a/out/t",
        "tether/line-3/dev-a/in/x",
        "tether/line-3/dev-a/a/b/c",
    ] {
        ns.check_publish(ok).unwrap();
    }
    for bad in [
        "tether/line-3/dev-b/out/t",
        "tether/line-4/dev-a/out/t",
        "tether/line-3/dev-a/",
        "tether/line-3/dev-a",
        "tether/line-3/dev-ab/out",
        "other/topic",
        "$SYS/broker",
        "tether/line-3/dev-a/out/+",
        "",
    ] {
        assert!(ns.check_publish(bad).is_err(), "{bad}");
    }
    let no_team = Namespace::new("", "dev-a").unwrap();
    assert_eq!(no_team.prefix(), "tether/_/dev-a/");
    for bad in [
        ("a/b", "d"),
        ("t", "d+"),
        ("t", ""),
        ("$t", "d"),
        ("t", "#"),
    ] {
        assert!(Namespace::new(bad.0, bad.1).is_err(), "{bad:?}");
    }
}

#[test]
fn a_device_subscribes_only_to_its_inbound_and_its_teams_broadcast() {
    let ns = Namespace::new("line-3", "dev-a").unwrap();
    for ok in [
        "tether/line-3/dev-a/in/#",
        "tether/line-3/dev-a/in/cmd",
        "tether/line-3/dev-a/in/+/x",
        "tether/line-3/dev-a/in",
        "tether/line-3/+/out/#",
        "tether/line-3/dev-b/out/call/dev-a",
        "tether/line-3/+/out/reply/+",
    ] {
        ns.check_subscribe(ok)
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "#",
        "tether/#",
        "tether/line-3/#",
        "tether/line-3/+/#",
        "tether/line-3/dev-b/in/#",
        "tether/+/dev-a/in/#",
        "tether/line-4/+/out/#",
        "tether/line-3/+/+/#",
        "tether/line-3/dev-a/#",
        "tether/line-3/dev-a/in/#/x",
        "tether/line-3/dev-a/in/a#",
    ] {
        assert!(ns.check_subscribe(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_platform_routes_inbound_and_broadcast_but_never_a_devices_own() {
    let ns = Namespace::new("line-3", "dev-a").unwrap();
    assert!(ns.delivers("tether/line-3/dev-a/in/cmd"));
    assert!(ns.delivers("tether/line-3/dev-b/out/t"));
    assert!(!ns.delivers("tether/line-3/dev-a/out/t"));
    assert!(!ns.delivers("tether/line-3/dev-b/in/cmd"));
    assert!(!ns.delivers("tether/line-4/dev-b/out/t"));
    assert!(!ns.delivers("other"));
    // Exactly the default filters' matches, less the device's own
    // broadcasts.
    let [inbound, broadcast] = [&ns.default_inbound()[0], &ns.default_inbound()[1]];
    for topic in [
        "tether/line-3/dev-a/in",
        "tether/line-3/dev-a/in/",
        "tether/line-3/dev-a/inx",
        "tether/line-3/dev-a/in/a/b",
        "tether/line-3/dev-a",
        "tether/line-3/dev-a/",
        "tether/line-3//out/x",
        "tether/line-3//in/x",
        "tether/line-3/dev-b/out",
        "tether/line-3/dev-b/outx",
        "tether/line-3/dev-b/out/",
        "tether/line-3/dev-ab/in/x",
        "tether/line-3/dev-ab/out/x",
        "tether/line-3/dev-a/out",
        "tether/line-33/dev-b/out/x",
        "tether/line-3",
        "tether/line-3/",
        "tether",
        "tetherx/line-3/dev-b/out/x",
        "",
    ] {
        let by_filters = matches(inbound, topic)
            || (matches(broadcast, topic) && topic.split('/').nth(2) != Some("dev-a"));
        assert_eq!(ns.delivers(topic), by_filters, "{topic}");
    }
}

#[test]
fn filters_match_as_mqtt_says() {
    for (f, t, m) in [
        ("a/+/c", "a/b/c", true),
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("a/+", "a/b/c", false),
        ("a/b", "a/b", true),
        ("a/b", "a/b/c", false),
        ("+/+", "a/b", true),
        ("+", "a/b", false),
        ("#", "a/b", true),
        ("a/+/", "a/b/", true),
    ] {
        assert_eq!(matches(f, t), m, "{f} {t}");
    }
    for bad in ["a/#/b", "a+", "", "a/b#"] {
        assert!(check_filter(bad).is_err(), "{bad}");
    }
}
