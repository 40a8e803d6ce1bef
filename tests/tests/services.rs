//! The device's allow-list, end to end: a stream to a service the device
//! does not list is refused, the tunnel is not disturbed, and a listed
//! service still carries bytes on the same tunnel afterwards.

mod common;

use std::time::Duration;

use common::*;
use tether_agent::{Agent, TunnelState};
use tether_platform::{ConnectError, PlatformEvent};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_service_is_refused_and_the_tunnel_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let (server, mut served) = hash_server(0x5eed, 1024 * 1024).await;
    let mut events = platform.events();
    let agent = Agent::start(with_service(agent_config(&state), "plc-gateway", server))
        .await
        .unwrap();
    connected(&agent).await;
    tunnel_up(&mut events, &id).await;
    online(&platform, &id).await;

    // Names the device does not list, including the built-in services'
    // names used as TCP service names, and a near miss of the listed one.
    for name in [
        "postgres",
        "ssh",
        "editor",
        "mqtt",
        "control",
        "plc-gateway2",
        "PLC-GATEWAY",
    ] {
        let err = platform
            .open_tcp(&id, name)
            .await
            .expect_err("an unlisted service is refused");
        assert!(matches!(err, ConnectError::Refused(_)), "{name}: {err}");
        // The device's reason reaches the platform.
        let message = err.to_string();
        assert!(
            message.contains(&format!("service '{name}' is not allow-listed")),
            "{message}"
        );
    }
    // A name that is not a service name at all never reaches the device.
    let err = platform.open_tcp(&id, "no spaces").await.unwrap_err();
    assert!(matches!(err, ConnectError::BadService(_)), "{err}");

    // The tunnel is the same one: no reconnect, no TunnelDown, still online.
    let status = agent.status().borrow().clone();
    assert_eq!(status.state, TunnelState::Connected, "{status:?}");
    assert_eq!(status.connects, 1, "{status:?}");
    assert_eq!(status.attempts, 1, "{status:?}");
    let tunnel = platform
        .tunnel(&id)
        .expect("the tunnel is still registered");
    assert!(!tunnel.is_closed());
    online(&platform, &id).await;

    // The listed service works on it: 1 MiB each way, checked by SHA-256.
    let stream = platform
        .open_tcp(&id, "plc-gateway")
        .await
        .expect("the listed service is accepted");
    let (mut rd, wr) = tokio::io::split(stream);
    let up = tokio::spawn(send_stream(wr, 0xfeed, 1024 * 1024));
    let (down, down_sha256) = hash_stream(&mut rd).await;
    let up = up.await.unwrap();
    let served = tokio::time::timeout(patience(), served.recv())
        .await
        .expect("the service reports in time")
        .expect("the service reports");
    assert_eq!(served.received, 1024 * 1024);
    assert_eq!(served.received_sha256.as_ref(), up.as_ref());
    assert_eq!(down, 1024 * 1024);
    assert_eq!(down_sha256.as_ref(), served.sent_sha256.as_ref());
    let mut rest = Vec::new();
    assert_eq!(rd.read_to_end(&mut rest).await.unwrap(), 0);

    // Refusals and streams did not cost the tunnel anything either.
    let refused_again = platform.open_tcp(&id, "postgres").await.unwrap_err();
    assert!(matches!(refused_again, ConnectError::Refused(_)));
    assert_eq!(agent.status().borrow().connects, 1);
    assert!(!tunnel.is_closed());
    // No tunnel went down in all that time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(
                event,
                PlatformEvent::TunnelDown { .. } | PlatformEvent::TunnelUp { .. }
            ),
            "{event:?}"
        );
    }
    agent.shutdown().await;
    platform.shutdown().await;
}
