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

use common::*;
use tether_agent::config::Config;
use tether_agent::config::{NodeRedConfig, NodeRedMode};
use tether_agent::{Agent, TunnelState};
use tether_e2e::bench::free_port;
use tether_e2e::{npm, tools};
use tether_platform::Platform;

/// A flow answering `GET /hello` with the environment variable GREETING,
/// plus, for a broken snapshot, a node of a type nobody installed.
fn flows(broken: bool) -> Vec<u8> {
    let mut nodes = serde_json::json!([
        {"id": "t1", "type": "tab", "label": "hello"},
        {"id": "in1", "type": "http in", "z": "t1", "url": "/hello", "method": "get",
         "wires": [["set1"]]},
        {"id": "set1", "type": "change", "z": "t1",
         "rules": [{"t": "set", "p": "payload", "pt": "msg", "to": "GREETING", "tot": "env"}],
         "wires": [["out1"]]},
        {"id": "out1", "type": "http response", "z": "t1", "statusCode": "", "headers": {},
         "wires": []}
    ]);
    if broken {
        nodes.as_array_mut().unwrap().push(
            serde_json::json!({"id": "x1", "type": "tether-not-installed", "z": "t1", "wires": []}),
        );
    }
    serde_json::to_vec(&nodes).unwrap()
}

fn files(greeting: &str, broken: bool) -> Vec<(String, Vec<u8>)> {
    vec![
        ("flows.json".into(), flows(broken)),
        (
            "env.json".into(),
            serde_json::to_vec(&serde_json::json!({ "GREETING": greeting })).unwrap(),
        ),
    ]
}

/// `GET /hello` on Node-RED's port: the body, if it answered 200.
async fn hello(port: u16) -> Option<String> {
    get(port, "/hello").await
}

/// `GET path` on Node-RED's port: the body, if it answered 200.
async fn get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Waits (up to `limit`) until the agent's snapshot outcome says `outcome`.
async fn outcome(agent: &Agent, outcome: &str, limit: Duration) -> String {
    let mut status = agent.status();
    let reached = tokio::time::timeout(
        limit,
        status.wait_for(|s| {
            s.snapshot
                .as_ref()
                .and_then(|h| h.outcome.as_deref())
                .is_some_and(|o| o.starts_with(outcome))
        }),
    )
    .await;
    assert!(
        reached.is_ok(),
        "no outcome '{outcome}' within {limit:?}: {:?}",
        agent.status().borrow().snapshot
    );
    let status = agent.status().borrow().clone();
    status.snapshot.and_then(|h| h.outcome).unwrap_or_default()
}

/// The types of the device's audit events the platform stored.
async fn audit_types(platform: &Platform, device: &str) -> Vec<(String, String)> {
    let query = tether_platform::audit::AuditQuery {
        device: Some(device.to_string()),
        ..Default::default()
    };
    let report = platform.audit(query).await.expect("audit report");
    report
        .entries
        .into_iter()
        .map(|e| (e.kind, e.subject))
        .collect()
}

fn config(state: &std::path::Path, node_red: &std::path::Path, port: u16) -> Config {
    let mut config = agent_config(state);
    config.node_red = NodeRedConfig {
        mode: NodeRedMode::Launch,
        command: node_red.display().to_string(),
        user_dir: None,
        port,
        user: tools::node_red_user(),
        ..NodeRedConfig::default()
    };
    config.snapshot.health_timeout = Duration::from_secs(20);
    // An air-gapped factory: no registry answers.
    config.snapshot.registry = Some("http://127.0.0.1:9/".into());
    config
}

/// Version `greeting`'s files plus a flow at `GET /module` that answers
/// through the node type of a module the snapshot carries as tarballs.
fn files_with_module(greeting: &str, work: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let npm = tools::required(npm::npm()).expect("npm (it comes with Node.js)");
    let mut files = files(greeting, false);
    let mut nodes: Vec<serde_json::Value> = serde_json::from_slice(&files[0].1).unwrap();
    nodes.extend(
        serde_json::from_value::<Vec<serde_json::Value>>(serde_json::json!([
            {"id": "in2", "type": "http in", "z": "t1", "url": "/module", "method": "get",
             "wires": [["mod2"]]},
            {"id": "mod2", "type": npm::NODE_TYPE, "z": "t1", "wires": [["out2"]]},
            {"id": "out2", "type": "http response", "z": "t1", "statusCode": "", "headers": {},
             "wires": []}
        ]))
        .unwrap(),
    );
    files[0].1 = serde_json::to_vec(&nodes).unwrap();
    files.extend(npm::packed_modules(&npm, work, "1.0.0", "from a tarball"));
    files.push(npm::modules_json("1.0.0"));
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_apply_roll_back_and_refuse_with_a_real_node_red() {
    let Some(node_red) = tools::required(tools::node_red().find()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    tools::traversable(dir.path());
    let platform = platform(dir.path()).await;
    let state = dir.path().join("device");
    enrolled(&platform, &state).await;
    let other = enrolled(&platform, &dir.path().join("other-device")).await;
    let port = free_port().expect("a free port");
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
    agent.shutdown().await;
    platform.shutdown().await;
}
