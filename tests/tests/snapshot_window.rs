//! Maintenance windows with a real Node-RED, as a plant runs them: the
//! platform sets a device's window; a snapshot pushed outside it is
//! verified and staged while the old flows keep running, and switched in
//! when the window opens, with real time passing (the agent's clock is set
//! 40 s before a whole minute, the window opens at that minute). Under a
//! window that stays closed, someone on site runs `tetherd snapshot
//! apply-now`: it switches in at once, waits for the outcome, and the
//! request is in the audit trail with the local account.
//!
//! Needs Node-RED (`tests/nodered/install.sh`, which `.ci/run` runs).
//! Missing, the test fails when `CI` is set and otherwise skips, saying so.

mod common;

use std::time::Duration;

use common::snapshot::*;
use common::*;
use tether_agent::Agent;
use tether_agent::clock::Clock;

/// `tetherd snapshot apply-now --state-dir STATE EXTRA...`; its exit code.
async fn apply_now(state: &std::path::Path, extra: &[&str]) -> u8 {
    let mut args = vec![
        "tetherd".to_string(),
        "snapshot".into(),
        "apply-now".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || tether_agent::cli::main_with(args))
        .await
        .unwrap()
}

/// `HH:MM` (UTC) of a Unix time.
fn hm(secs: u64) -> String {
    format!("{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_outside_the_window_waits_for_it_or_for_apply_now() {
    let Some(Bench {
        dir: _dir,
        platform,
        state,
        node_red,
        port,
    }) = bench().await
    else {
        return;
    };

    // The agent's clock reads 40 s before the whole minute `opens`.
    let real = Clock::system().now_unix();
    let opens = (real / 60 + 2) * 60;
    let offset = (opens - 40) as i64 - real as i64;
    let clock = Clock::with_offset(offset);
    let mut config = config(&state, &node_red, port);
    config.clock = clock;
    config.snapshot.timezone = Some("UTC".into());
    let agent = Agent::start(config).await.expect("agent starts");
    let device = agent.device_id();
    let window = format!("{}-{}", hm(opens), hm(opens + 300));
    let (set, _) = platform
        .set_window(&device, Some(&window), "olga")
        .await
        .expect("window set");
    assert_eq!(set.as_deref(), Some(window.as_str()));
    assert!(
        platform
            .set_window(&device, Some("25:00-26:00"), "olga")
            .await
            .unwrap_err()
            .to_string()
            .contains("not a time of day")
    );
    connected_with_node_red(&agent, port).await;
    let ready = Duration::from_secs(60);

    // Outside the window: staged, the old flows (none) keep running.
    let v1 = create_and_push(&platform, &device, files("hello from snapshot 1", false)).await;
    assert_eq!(v1, 1);
    let waits = outcome(&agent, "staged 1", ready).await;
    assert!(
        waits.contains(&format!("waits for the maintenance window {window} (UTC")),
        "{waits}"
    );
    assert!(clock.now_unix() < opens, "staged before the window opened");
    assert_eq!(hello(port).await, None, "nothing switched in yet");
    let staged = agent
        .status()
        .borrow()
        .snapshot
        .clone()
        .and_then(|s| s.staged);
    assert_eq!(staged, Some(1));

    // The window opens: switched in, with no one asking.
    outcome(&agent, "applied 1", Duration::from_secs(120)).await;
    assert!(clock.now_unix() >= opens, "applied inside the window");
    assert_eq!(hello(port).await.as_deref(), Some("hello from snapshot 1"));

    // A window that stays closed; someone on site confirms version 2.
    let later = opens + 6 * 3600;
    let closed = format!("{}-{}", hm(later), hm(later + 3600));
    platform
        .set_window(&device, Some(&closed), "olga")
        .await
        .expect("window set");
    create_and_push(&platform, &device, files("hello from snapshot 2", false)).await;
    let waits = outcome(&agent, "staged 2", ready).await;
    assert!(waits.contains(&closed), "{waits}");
    assert_eq!(hello(port).await.as_deref(), Some("hello from snapshot 1"));
    let code = apply_now(&state, &["--wait", "90s"]).await;
    assert_eq!(code, 0, "apply-now reports the snapshot applied");
    assert_eq!(hello(port).await.as_deref(), Some("hello from snapshot 2"));

    // Nothing is staged now: apply-now says so.
    let code = apply_now(&state, &[]).await;
    assert_eq!(code, tether_agent::exit::UNAVAILABLE);

    // The platform's audit trail has the window changes and the request.
    let seen = eventually("the window events in the audit trail", || async {
        let types = audit_types(&platform, &device).await;
        (types
            .iter()
            .any(|(k, s)| k == "snapshot_apply_now" && s == "snapshot 2")
            && types
                .iter()
                .filter(|(k, _)| k == "maintenance_window")
                .count()
                == 2
            && types
                .iter()
                .any(|(k, s)| k == "snapshot_applied" && s == "snapshot 2"))
        .then_some(types)
    })
    .await;
    assert!(!seen.is_empty());
    let shown = platform
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == device)
        .unwrap();
    assert_eq!(shown.window.as_deref(), Some(closed.as_str()));
    agent.shutdown().await;
    platform.shutdown().await;
}
