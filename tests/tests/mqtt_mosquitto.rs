//! The MQTT bridge with Debian's mosquitto on every side and its
//! command-line clients as the flows: each device's local broker is a
//! mosquitto started with a config file of its own, the platform's broker is
//! another, and `mosquitto_pub` / `mosquitto_sub` (MQTT 5, QoS 1) publish
//! and listen. Device A's message reaches device B's local broker and the
//! platform's; a message A's flows publish under B's namespace is refused
//! on A, audited, and never arrives anywhere. With TLS: a device's local
//! broker that requires a client certificate (`mqtts://`, mutual TLS) and a
//! platform broker reached over `mqtts://`, and `tetherd doctor` checking
//! the local broker's certificate.
//!
//! Needs mosquitto and mosquitto-clients (`.ci/run` installs them).

mod common;

use std::time::Duration;

use common::mqtt::*;
use common::*;
use tether_e2e::mqtt::{Broker, Sub, publish};
use tether_platform::Platform;
use tether_platform::mqtt::{BrokerUrl, MqttBroker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_on_every_side_carries_a_device_message_and_refuses_a_foreign_topic() {
    let dir = tempfile::tempdir().unwrap();
    let central = Broker::mosquitto(dir.path(), "central", "").await.unwrap();
    let platform = Platform::start(platform_with(dir.path(), Some(&central)))
        .await
        .unwrap();
    let local_a = Broker::mosquitto(dir.path(), "local-a", "").await.unwrap();
    let local_b = Broker::mosquitto(dir.path(), "local-b", "").await.unwrap();
    // A forwards every team device's out/ topic it sees on its broker: a
    // flow on A posing as B is then the agent's to refuse.
    let a = device(&platform, dir.path(), "a", &local_a, |m, _| {
        m.publish = vec![format!("tether/{TEAM}/+/out/#")];
    })
    .await;
    let b = device(&platform, dir.path(), "b", &local_b, |_, _| {}).await;
    let (ida, idb) = (a.device_id(), b.device_id());
    bridged(&platform, &ida).await;
    bridged(&platform, &idb).await;

    let team_out = format!("tether/{TEAM}/+/out/#");
    let mut on_b = Sub::start(local_b.port, &team_out, &[]).await.unwrap();
    let mut on_platform = Sub::start(central.port, &team_out, &[]).await.unwrap();

    let data = topic(&ida, "out/line/temperature");
    publish(local_a.port, &data, "21.5 C", &[]).await.unwrap();
    let expected = Some((data.clone(), "21.5 C".to_owned()));
    assert_eq!(on_b.next(patience()).await.unwrap(), expected);
    assert_eq!(on_platform.next(patience()).await.unwrap(), expected);

    // A's flows publish under B's namespace, then a marker under A's own:
    // the marker arrives first and alone (the bridge keeps A's order).
    let forged = topic(&idb, "out/line/temperature");
    publish(local_a.port, &forged, "forged", &[]).await.unwrap();
    publish(local_a.port, &data, "marker", &[]).await.unwrap();
    let marker = Some((data.clone(), "marker".to_owned()));
    assert_eq!(on_b.next(patience()).await.unwrap(), marker);
    assert_eq!(on_platform.next(patience()).await.unwrap(), marker);
    let quiet = Duration::from_secs(1);
    assert_eq!(on_b.next(quiet).await.unwrap(), None, "more reached B");
    assert_eq!(
        on_platform.next(quiet).await.unwrap(),
        None,
        "more reached the platform"
    );
    let refused = eventually("the forged topic's refusal is audited", || async {
        let entries = audit_kinds(&platform, &ida, "mqtt_refused").await;
        (!entries.is_empty()).then_some(entries)
    })
    .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["subject"], forged.as_str(), "{refused:?}");
    let reason = refused[0]["details"]["reason"].as_str().unwrap();
    assert!(reason.contains("namespace"), "{reason}");
    assert_eq!(a.mqtt_figures().unwrap().refused, 1);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_behind_tls_are_bridged_on_both_sides_and_doctor_checks_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    tether_e2e::mqtt::tls_files(dir.path()).unwrap();
    let pem = |name: &str| dir.path().join(name);
    // mosquitto's TLS settings for the listener above them.
    let server_tls = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        pem("ca.pem").display(),
        pem("server.pem").display(),
        pem("server.key").display()
    );
    // A broker that speaks only TLS and wants a client certificate.
    let local = Broker::mosquitto(
        dir.path(),
        "local-tls",
        &format!("{server_tls}require_certificate true\n"),
    )
    .await
    .unwrap();
    // The platform's broker: mosquitto, which the platform reaches over TLS
    // (mqtts://, its CA given) and the test's client over plain MQTT.
    let tls_port = tether_e2e::bench::free_port().unwrap();
    let central = Broker::mosquitto(
        dir.path(),
        "central",
        &format!("listener {tls_port} 127.0.0.1\n{server_tls}"),
    )
    .await
    .unwrap();
    let mut config = platform_with(dir.path(), Some(&central));
    let mut url = BrokerUrl::parse(&format!("mqtts://127.0.0.1:{tls_port}")).unwrap();
    url.ca_file = Some(pem("ca.pem"));
    config.mqtt.broker = MqttBroker::External(url);
    let platform = Platform::start(config).await.unwrap();
    let tls_config = |m: &mut tether_agent::config::MqttConfig| {
        m.broker = format!("mqtts://127.0.0.1:{}", local.port);
        m.ca_file = Some(pem("ca.pem"));
        m.cert_file = Some(pem("client.pem"));
        m.key_file = Some(pem("client.key"));
    };
    let agent = device(&platform, dir.path(), "a", &local, |m, _| tls_config(m)).await;
    let id = agent.device_id();
    bridged(&platform, &id).await;
    let cli_tls: Vec<String> = [
        ("--cafile", "ca.pem"),
        ("--cert", "client.pem"),
        ("--key", "client.key"),
    ]
    .into_iter()
    .flat_map(|(flag, file)| [flag.to_owned(), pem(file).display().to_string()])
    .collect();

    // Out: a flow's message over TLS reaches the platform's broker.
    let broker = central.addr();
    let data = topic(&id, "out/line/temperature");
    let mut on_platform = client(&broker, "platform-flows", std::slice::from_ref(&data)).await;
    publish(local.port, &data, "over TLS", &cli_tls)
        .await
        .unwrap();
    assert_eq!(&on_platform.next_on(&data).await.payload[..], b"over TLS");

    // In: a platform message reaches a flow on the TLS broker.
    let command = topic(&id, "in/valve");
    let mut on_device = Sub::start(local.port, &topic(&id, "in/#"), &cli_tls)
        .await
        .unwrap();
    on_platform.send(&command, &b"open"[..]).await;
    assert_eq!(
        on_device.next(patience()).await.unwrap(),
        Some((command, "open".to_owned()))
    );

    // tetherd doctor: the same TLS; a CA that did not sign the broker's
    // certificate fails the check and says what to look at.
    let mut config = agent_config(&dir.path().join("a"));
    let mut mqtt = tether_agent::config::MqttConfig::default();
    tls_config(&mut mqtt);
    config.mqtt = Some(mqtt);
    let check = |checks: Vec<tether_agent::doctor::Check>| {
        checks
            .into_iter()
            .find(|c| c.name == "mqtt broker")
            .unwrap()
    };
    let options = tether_agent::doctor::Options::default();
    let ok = check(tether_agent::doctor::run(Ok(&config), &options).await);
    assert_eq!(ok.verdict, tether_agent::doctor::Verdict::Ok, "{ok:?}");
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    tether_e2e::mqtt::tls_files(&other).unwrap();
    config.mqtt.as_mut().unwrap().ca_file = Some(other.join("ca.pem"));
    let bad = check(tether_agent::doctor::run(Ok(&config), &options).await);
    assert_eq!(bad.verdict, tether_agent::doctor::Verdict::Fail, "{bad:?}");
    assert!(bad.detail.contains("certificate"), "{bad:?}");
    agent.shutdown().await;
}
