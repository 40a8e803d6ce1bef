//! Certificate renewal across a platform restart: a platform issuing short
//! certificates, an agent that renews at once, and the platform, restarted
//! on the same directory and port, sees the renewed certificate on the next
//! tunnel.

mod common;

use std::time::Duration;

use common::*;
use tether_agent::identity::StateDir;
use tether_agent::{Agent, TunnelState};
use tether_platform::PlatformEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_the_one_the_restarted_platform_sees() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let mut config = platform_config(&data, "127.0.0.1:0".parse().unwrap());
    // Device certificates last two minutes: less than the agent's renewal
    // threshold below, so it renews on the first heartbeat.
    config.cert_validity = Duration::from_secs(120);
    let platform = start_retrying_bind(config.clone()).await;
    config.listen = platform.local_addr();
    let state = dir.path().join("state");
    let enrolled = enrolled(&platform, &state).await.identity;
    let first = current_fingerprint(&state);
    let first_not_after = StateDir::new(&state)
        .credentials(&enrolled)
        .unwrap()
        .cert
        .not_after;
    let now = tether_agent::Clock::system().now_unix();
    assert!(
        first_not_after <= now + 121,
        "the platform ignored cert_validity: {first_not_after} vs now {now}"
    );
    let id = enrolled.device_id.clone();

    let mut events = platform.events();
    let mut agent_config = agent_config(&state);
    agent_config.renewal.before = Duration::from_secs(3600);
    agent_config.reconnect.max_delay = Duration::from_secs(1);
    let agent = Agent::start(agent_config).await.unwrap();
    assert_eq!(tunnel_up(&mut events, &id).await, first);
    let renewed_not_after = next_event(&mut events, "Renewed", |e| match e {
        PlatformEvent::Renewed {
            device_id,
            not_after,
        } if *device_id == id => Some(*not_after),
        _ => None,
    })
    .await;
    let status = wait_status(&agent, "one renewal", |s| s.renewals >= 1).await;

    // The state directory switched to the new pair, and the agent uses it.
    let store = StateDir::new(&state);
    let second = store.load().unwrap().expect("an identity");
    assert_eq!(second.device_id, id);
    assert_eq!(second.generation, enrolled.generation + 1);
    assert_ne!(second.key_file, enrolled.key_file);
    let creds = store.credentials(&second).unwrap();
    let renewed = creds.cert.fingerprint.clone();
    assert_ne!(renewed, first);
    assert_eq!(creds.cert.not_after, renewed_not_after);
    assert_eq!(status.cert_fingerprint, renewed);
    assert_eq!(status.cert_not_after, renewed_not_after);
    assert!(renewed_not_after >= first_not_after);
    // The tunnel in use carries on with the old certificate.
    assert_eq!(status.state, TunnelState::Connected);
    assert_eq!(status.connects, 1);

    // A restart of the platform drops the tunnel; the agent comes back with
    // the renewed certificate.
    let platform = restart(platform, config).await;
    let mut events = platform.events();
    assert_eq!(
        tunnel_up(&mut events, &id).await,
        renewed,
        "the agent reconnected with its old certificate"
    );
    wait_status(&agent, "reconnected", |s| {
        s.state == TunnelState::Connected && s.connects == 2
    })
    .await;
    online(&platform, &id).await;
    let device = platform
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == id)
        .unwrap();
    assert!(
        device.cert_not_after >= renewed_not_after,
        "the restarted platform lost the renewal: {device:?}"
    );
    agent.shutdown().await;
    platform.shutdown().await;
}
