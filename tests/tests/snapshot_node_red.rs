//! Signed snapshots with a real Node-RED, as a fleet manager uses them: the
//! platform signs a snapshot whose flow serves an HTTP endpoint and pushes
//! it; the agent pulls, verifies and applies it, and the endpoint answers
//! with the value the snapshot's environment gives it. A snapshot whose
//! flows cannot start (a node type that is not installed) is rolled back:
//! the old endpoint answers again. A signed snapshot of another device,
//! slipped in under this device's name, is rejected and changes nothing.
//! Every outcome reaches the platform's audit trail and `device show`; a
//! restarted agent runs the snapshot it committed; a remote restart starts
//! a new Node-RED process, recorded.
//!
//! Needs Node-RED (`tests/nodered/install.sh`, which `.ci/run` runs).
//! Missing, the test fails when `CI` is set and otherwise skips, saying so.

mod common;

use std::time::Duration;

use common::snapshot::*;
use common::*;
use tether_agent::{Agent, TunnelState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_apply_roll_back_and_refuse_with_a_real_node_red() {
    let Some(Bench {
        dir,
        platform,
        state,
        node_red,
        port,
    }) = bench().await
    else {
        return;
    };
    let other = enrolled(&platform, &dir.path().join("other-device")).await;
    let agent = Agent::start(config(&state, &node_red, port))
        .await
        .expect("agent starts");
    let device = agent.device_id();
    wait_status(&agent, "connected", |s| s.state == TunnelState::Connected).await;
    let ready = Duration::from_secs(60);
    tether_agent::node_red::wait_ready(([127, 0, 0, 1], port).into(), ready)
        .await
        .expect("Node-RED came up");
    assert_eq!(hello(port).await, None, "no flow serves /hello yet");

    // Version 1: applied, and its environment reaches the flow.
    let v1 = platform
        .create_snapshot(&device, files("hello from snapshot 1", false), None)
        .await
        .expect("snapshot 1 created");
    assert_eq!(v1.version, 1);
    platform.push_snapshot(&device, 1).await.expect("pushed");
    outcome(&agent, "applied 1", ready).await;
    assert_eq!(hello(port).await.as_deref(), Some("hello from snapshot 1"));
    let status = agent.status().borrow().clone();
    assert_eq!(status.snapshot.as_ref().and_then(|s| s.current), Some(1));

    // Version 2 cannot start its flows: rolled back, version 1 answers.
    platform
        .create_snapshot(&device, files("hello from snapshot 2", true), None)
        .await
        .expect("snapshot 2 created");
    platform.push_snapshot(&device, 2).await.expect("pushed");
    let reason = outcome(&agent, "rolled back 2", ready).await;
    assert!(reason.contains("tether-not-installed"), "{reason}");
    let answered = eventually("version 1's endpoint to answer again", || async {
        hello(port).await.filter(|b| b == "hello from snapshot 1")
    })
    .await;
    assert_eq!(answered, "hello from snapshot 1");

    // A validly signed snapshot of another device, slipped in under this
    // device's name as version 3: rejected, nothing changes.
    platform
        .create_snapshot(&other.identity.device_id, files("not yours", false), None)
        .await
        .expect("the other device's snapshot");
    let data = dir.path().join("platform/snapshots");
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(data.join(&other.identity.device_id).join("1"))
        .arg(data.join(&device).join("3"))
        .status()
        .unwrap();
    assert!(copied.success());
    platform.push_snapshot(&device, 3).await.expect("pushed");
    let reason = outcome(&agent, "rejected 3", ready).await;
    assert!(reason.contains("for device"), "{reason}");
    assert_eq!(hello(port).await.as_deref(), Some("hello from snapshot 1"));

    // The platform sees the outcomes: in its audit trail and `device show`.
    let seen = eventually(
        "the snapshot events in the platform's audit trail",
        || async {
            let types = audit_types(&platform, &device).await;
            let want = [
                ("snapshot_applied", "snapshot 1"),
                ("snapshot_rolled_back", "snapshot 2"),
                ("snapshot_rejected", "snapshot 3"),
            ];
            want.iter()
                .all(|(k, s)| types.iter().any(|(tk, ts)| tk == k && ts == s))
                .then_some(types)
        },
    )
    .await;
    assert!(
        seen.iter()
            .any(|(k, s)| k == "snapshot_received" && s == "snapshot 1")
    );
    eventually("device show to report the outcome", || async {
        let devices = platform.devices().await.unwrap();
        let shown = devices.into_iter().find(|d| d.id == device)?.snapshot?;
        (shown.current == Some(1)
            && shown
                .outcome
                .as_deref()
                .is_some_and(|o| o.starts_with("rejected 3")))
        .then_some(())
    })
    .await;

    // A remote restart: a new Node-RED process, recorded.
    let before = agent
        .status()
        .borrow()
        .snapshot
        .clone()
        .and_then(|s| s.node_red);
    platform
        .node_red_action(&device, "restart", "olga")
        .await
        .expect("restart sent");
    eventually("the restart to be recorded on the platform", || async {
        audit_types(&platform, &device)
            .await
            .iter()
            .any(|(k, _)| k == "node_red_action")
            .then_some(())
    })
    .await;
    eventually(
        "the endpoint to answer from the restarted Node-RED",
        || async { hello(port).await.filter(|b| b == "hello from snapshot 1") },
    )
    .await;
    let _ = before;

    // A restarted agent runs the snapshot it committed.
    agent.shutdown().await;
    assert_eq!(hello(port).await, None, "Node-RED stopped with the agent");
    let agent = Agent::start(config(&state, &node_red, port))
        .await
        .expect("agent starts again");
    let answered = tokio::time::timeout(ready, async {
        loop {
            if let Some(body) = hello(port).await {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the endpoint answers after the restart");
    assert_eq!(answered, "hello from snapshot 1");

    // Version 4 carries a module and its dependency as tarballs; no
    // registry answers. npm installs them beside version 4 while version 1
    // runs, and the flow's node of the module's type answers.
    let files = files_with_module("hello from snapshot 4", &dir.path().join("npm"));
    platform
        .create_snapshot(&device, files, None)
        .await
        .expect("snapshot 4 created");
    platform.push_snapshot(&device, 4).await.expect("pushed");
    outcome(&agent, "applied 4", Duration::from_secs(180)).await;
    assert_eq!(
        get(port, "/module").await.as_deref(),
        Some("from a tarball")
    );
    assert_eq!(hello(port).await.as_deref(), Some("hello from snapshot 4"));

    // Flows deployed on the device (Node-RED saves them to its working
    // copy of version 4) become a snapshot of their own: captured over the
    // tunnel, with version 4's environment and modules, signed, pushed.
    let user_dir = config(&state, &node_red, port).node_red.user_dir_in(&state);
    let work = user_dir.join("snapshots/work/4/flows.json");
    let deployed = String::from_utf8(std::fs::read(&work).unwrap())
        .unwrap()
        .replace("\"GREETING\"", "\"deployed on the device\"")
        .replace("\"tot\":\"env\"", "\"tot\":\"str\"");
    assert!(deployed.contains("\"tot\":\"str\""), "{deployed}");
    std::fs::write(&work, deployed).unwrap();
    let captured = platform
        .snapshot_from_device(&device, "olga", None)
        .await
        .expect("snapshot from the device");
    assert_eq!(captured.version, 5);
    platform.push_snapshot(&device, 5).await.expect("pushed");
    outcome(&agent, "applied 5", Duration::from_secs(180)).await;
    assert_eq!(hello(port).await.as_deref(), Some("deployed on the device"));
    assert_eq!(
        get(port, "/module").await.as_deref(),
        Some("from a tarball")
    );
    eventually("the capture in the audit trail", || async {
        audit_types(&platform, &device)
            .await
            .iter()
            .any(|(k, _)| k == "flows_captured")
            .then_some(())
    })
    .await;
    agent.shutdown().await;
    let offline = platform
        .snapshot_from_device(&device, "olga", None)
        .await
        .unwrap_err();
    assert!(offline.to_string().contains("offline"), "{offline}");
    platform.shutdown().await;
}
