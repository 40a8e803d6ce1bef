//! The MQTT bridge with Debian's mosquitto on every side and its
//! command-line clients as the flows: each device's local broker is a
//! mosquitto started with a config file of its own, the platform's broker is
//! another, and `mosquitto_pub` / `mosquitto_sub` (MQTT 5, QoS 1) publish
//! and listen. Device A's message reaches device B's local broker and the
//! platform's; a message A's flows publish under B's namespace is refused
//! on A, audited, and never arrives anywhere.
//!
//! Needs mosquitto and mosquitto-clients (`.ci/run` installs them).

mod common;

use std::time::Duration;

use common::mqtt::*;
use common::*;
use tether_e2e::mqtt::{Broker, Sub, publish};
use tether_platform::Platform;

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
