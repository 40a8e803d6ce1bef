//! Revoking a live device, end to end: the running agent is told at once,
//! says why, and retries only at the slow pace meant for problems an
//! operator has to fix, while the platform lists it offline and revoked.

mod common;

use std::time::Duration;

use common::*;
use tether_agent::{Agent, TunnelState};
use tether_platform::PlatformEvent;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_live_device_leaves_connected_at_once_and_does_not_retry_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let mut config = agent_config(&state);
    // A transient failure would be retried every 100 ms or sooner; the slow
    // pace is 2 s. Five seconds tell them apart: about 50 attempts against
    // at most 3.
    config.reconnect.min_delay = Duration::from_millis(100);
    config.reconnect.max_delay = Duration::from_millis(100);
    config.reconnect.slow_delay = Duration::from_secs(2);
    let mut events = platform.events();
    let agent = Agent::start(config).await.unwrap();
    connected(&agent).await;
    tunnel_up(&mut events, &id).await;
    online(&platform, &id).await;

    let revoked_at = Instant::now();
    assert!(
        platform.revoke(&id).await.unwrap(),
        "revoke closed no live tunnel"
    );
    let mut status = agent.status();
    let left = tokio::time::timeout(
        Duration::from_secs(2),
        status.wait_for(|s| s.state != TunnelState::Connected),
    )
    .await
    .expect("the agent leaves Connected within 2 s of the revocation")
    .unwrap()
    .clone();
    let after_revocation = wait_status(&agent, "backoff with the reason", |s| {
        s.state == TunnelState::Backoff
    })
    .await;
    let error = after_revocation.last_error.clone().unwrap_or_default();
    assert!(error.contains("revoked"), "{error}");
    assert!(error.contains("re-enroll"), "{error}");
    let reason = next_event(&mut events, "TunnelDown", |e| match e {
        PlatformEvent::TunnelDown { device_id, reason } if *device_id == id => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(!reason.is_empty());

    // Watch it for five seconds.
    let attempts = left.attempts;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = agent.status().borrow().clone();
    let retries = later.attempts - attempts;
    assert!(
        retries <= 4,
        "{retries} attempts within {:?} of the revocation: a hot loop",
        revoked_at.elapsed()
    );
    assert!(retries >= 1, "no slow retry in 5 s: {later:?}");
    // Each retry was refused as revoked: none got through.
    assert_eq!(later.connects, 1, "{later:?}");
    let error = later.last_error.unwrap_or_default();
    assert!(error.contains("revoked"), "{error}");
    let device = platform
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == id)
        .expect("the device is still listed");
    assert!(device.revoked, "{device:?}");
    assert!(!device.online, "{device:?}");
    assert!(platform.tunnel(&id).is_none());
    // No new tunnel came up for it.
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(&event, PlatformEvent::TunnelUp { device_id, .. } if *device_id == id),
            "{event:?}"
        );
    }
    agent.shutdown().await;
    platform.shutdown().await;
}
