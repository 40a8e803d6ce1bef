//! The platform goes away and comes back on the same data directory and
//! port: the running agent retries with spaced, capped, jittered delays and
//! reconnects; after a stable session its backoff starts again from the
//! smallest delay.

mod common;

use std::time::Duration;

use common::*;
use tether_agent::{Agent, Status, TunnelState};
use tokio::time::Instant;

const MIN_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(2);
/// How long the platform stays down.
const DOWN: Duration = Duration::from_secs(5);
/// Scheduling slack allowed on top of a delay on a loaded machine.
const SLACK: Duration = Duration::from_millis(1500);

/// The times at which `attempts` went up, one entry per attempt (an
/// increase by several, from a missed status, repeats the time).
fn attempt_times(seen: &[(Instant, Status)], after: u64) -> Vec<Instant> {
    let mut times = Vec::new();
    let mut last = after;
    for (at, s) in seen {
        while s.attempts > last {
            times.push(*at);
            last += 1;
        }
    }
    times
}

/// The delays the agent announced on entering backoff, in whole seconds
/// (`next_attempt_at - since`: both are taken at the same instant), each
/// with the number of attempts made before it.
fn announced_delays(seen: &[(Instant, Status)]) -> Vec<(u64, u64)> {
    let mut delays: Vec<(u64, u64)> = seen
        .iter()
        .filter(|(_, s)| s.state == TunnelState::Backoff)
        .filter_map(|(_, s)| {
            s.next_attempt_at
                .map(|n| (s.attempts, n.saturating_sub(s.since)))
        })
        .collect();
    delays.dedup();
    delays
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_restarted_on_its_port_gets_the_agent_back_after_spaced_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let platform =
        start_retrying_bind(platform_config(&data, "127.0.0.1:0".parse().unwrap())).await;
    // The same address on restart: the device knows the platform by it.
    let config = platform_config(&data, platform.local_addr());
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let mut agent_config = agent_config(&state);
    agent_config.reconnect.min_delay = MIN_DELAY;
    agent_config.reconnect.max_delay = MAX_DELAY;
    agent_config.reconnect.stable_after = Duration::from_secs(3600);
    let agent = Agent::start(agent_config).await.unwrap();
    connected(&agent).await;
    online(&platform, &id).await;

    platform.shutdown().await;
    drop(platform);
    let lost = wait_status(&agent, "the tunnel lost", |s| {
        s.state != TunnelState::Connected
    })
    .await;
    assert_eq!(lost.connects, 1);
    let before = agent.status().borrow().attempts;
    let recorder = Recorder::start(agent.status());
    let down_since = Instant::now();
    tokio::time::sleep(DOWN).await;
    let during = agent.status().borrow().attempts - before;
    let down_for = down_since.elapsed();

    let platform = start_retrying_bind(config).await;
    let mut events = platform.events();
    let fingerprint = tunnel_up(&mut events, &id).await;
    assert_eq!(fingerprint, current_fingerprint(&state));
    let back = wait_status(&agent, "reconnected", |s| {
        s.state == TunnelState::Connected && s.connects == 2
    })
    .await;
    online(&platform, &id).await;
    let seen = recorder.finish().await;

    // Several attempts while the platform was down, but no hot loop: with
    // delays of at least 200 ms capped at 2 s (drawn from [0, cap]), 5 s
    // hold about 5 to 8 attempts.
    assert!(during >= 3, "only {during} attempts in {down_for:?}");
    assert!(during < 30, "{during} attempts in {down_for:?}: a hot loop");
    // Every attempt while down failed and was followed by backoff, and the
    // delays announced stayed within the cap.
    let delays = announced_delays(&seen);
    assert!(!delays.is_empty(), "no backoff seen: {seen:?}");
    assert!(
        delays.iter().all(|&(_, d)| d <= MAX_DELAY.as_secs()),
        "a delay over the 2 s cap: {delays:?}"
    );
    assert!(
        seen.iter()
            .filter(|(at, _)| *at < down_since + down_for)
            .all(|(_, s)| s.state != TunnelState::Connected && s.connects == 1),
        "connected while the platform was down"
    );
    let last_error = seen
        .iter()
        .rev()
        .find_map(|(_, s)| s.last_error.clone())
        .unwrap_or_default();
    assert!(
        last_error.contains("unreachable") || last_error.contains("refused"),
        "{last_error}"
    );
    // The gaps between attempts (the last one ends at the restart) stayed
    // under the cap, and no attempt came before the previous one ended.
    let times = attempt_times(&seen, before);
    eprintln!(
        "down {down_for:.2?}: {during} attempts, announced delays {delays:?} (attempts, whole seconds), gaps {:?}",
        times.windows(2).map(|p| p[1] - p[0]).collect::<Vec<_>>()
    );
    assert!(times.len() as u64 > during, "{times:?}");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap <= MAX_DELAY + SLACK, "{gap:?} between attempts");
    }
    assert_eq!(back.connects, 2);
    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backoff_starts_again_from_the_smallest_delay_after_a_stable_session() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("platform");
    let platform =
        start_retrying_bind(platform_config(&data, "127.0.0.1:0".parse().unwrap())).await;
    let config = platform_config(&data, platform.local_addr());
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let mut agent_config = agent_config(&state);
    agent_config.reconnect.min_delay = MIN_DELAY;
    // A larger cap than above, so that a backoff not reset would show in
    // whole seconds: three delays drawn from [0, 4 s] all stay under a
    // second one time in 64.
    agent_config.reconnect.max_delay = Duration::from_secs(4);
    agent_config.reconnect.stable_after = Duration::from_secs(1);
    let agent = Agent::start(agent_config).await.unwrap();
    connected(&agent).await;

    // A first outage long enough for the cap to reach 4 s: the loss and
    // six failed attempts draw from caps of 0.2, 0.4, 0.8, 1.6, 3.2 and 4 s.
    platform.shutdown().await;
    drop(platform);
    let before = agent.status().borrow().attempts;
    wait_status(&agent, "six failed attempts", |s| s.attempts >= before + 6).await;
    let platform = start_retrying_bind(config).await;
    wait_status(&agent, "reconnected", |s| {
        s.state == TunnelState::Connected && s.connects == 2
    })
    .await;
    online(&platform, &id).await;
    // A stable session: longer than stable_after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.status().borrow().connects, 2, "the session dropped");

    // The second outage: had the backoff not been reset, each delay would
    // be drawn from [0, 4 s] (a whole second or more three times in four);
    // reset, the first three caps are 0.2, 0.4 and 0.8 s.
    let recorder = Recorder::start(agent.status());
    let before = agent.status().borrow().attempts;
    platform.shutdown().await;
    drop(platform);
    wait_status(&agent, "three attempts after the loss", |s| {
        s.attempts >= before + 3
    })
    .await;
    let seen = recorder.finish().await;
    let lost_at = seen
        .iter()
        .find(|(_, s)| s.state != TunnelState::Connected)
        .expect("the loss was seen")
        .0;
    let third = attempt_times(&seen, before)[2];
    let three_in = third - lost_at;
    let delays = announced_delays(&seen);
    eprintln!(
        "after a stable session: three attempts {three_in:.2?} after the loss, announced delays {delays:?} (attempts, whole seconds)"
    );
    // The delays after the loss and after the first two failed attempts.
    let first: Vec<_> = delays.iter().filter(|(n, _)| *n < before + 3).collect();
    assert!(!first.is_empty(), "no backoff seen: {seen:?}");
    assert!(
        first.iter().all(|(_, d)| *d == 0),
        "the first delays after a stable session were not the smallest: {delays:?} (attempts, whole seconds)"
    );
    // 0.2 + 0.4 + 0.8 s at most, plus slack.
    assert!(
        three_in <= Duration::from_millis(1400) + SLACK,
        "three attempts took {three_in:?} after the loss"
    );
    agent.shutdown().await;
}
