//! Helpers of the snapshot tests with a real Node-RED: a flow at `GET
//! /hello` answering with an environment variable, a module flow, the
//! agent's config in launch mode, waiting for an outcome.

use std::time::Duration;

use super::*;
use tether_agent::config::{NodeRedConfig, NodeRedMode};
use tether_e2e::{npm, tools};

/// See [`tether_e2e::flows::hello`].
pub fn flows(broken: bool) -> Vec<u8> {
    tether_e2e::flows::hello(broken)
}

/// See [`tether_e2e::flows::hello_files`].
pub fn files(greeting: &str, broken: bool) -> Vec<(String, Vec<u8>)> {
    tether_e2e::flows::hello_files(greeting, broken)
}

/// `GET /hello` on Node-RED's port: the body, if it answered 200.
pub async fn hello(port: u16) -> Option<String> {
    get(port, "/hello").await
}

/// `GET path` on Node-RED's port: the body, if it answered 200.
pub async fn get(port: u16, path: &str) -> Option<String> {
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
pub async fn outcome(agent: &Agent, outcome: &str, limit: Duration) -> String {
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
pub async fn audit_types(platform: &Platform, device: &str) -> Vec<(String, String)> {
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

pub fn config(state: &std::path::Path, node_red: &std::path::Path, port: u16) -> Config {
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
pub fn files_with_module(greeting: &str, work: &std::path::Path) -> Vec<(String, Vec<u8>)> {
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

/// A platform and one enrolled device whose agent is to launch Node-RED:
/// what a snapshot test starts from.
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub platform: tether_platform::Platform,
    pub state: std::path::PathBuf,
    pub node_red: std::path::PathBuf,
    pub port: u16,
}

/// [`Bench`], or `None` (skipped, saying so) without Node-RED.
pub async fn bench() -> Option<Bench> {
    let node_red = tools::required(tools::node_red().find())?;
    let dir = tempfile::tempdir().unwrap();
    tools::traversable(dir.path());
    let platform = platform(dir.path()).await;
    let state = dir.path().join("device");
    enrolled(&platform, &state).await;
    let port = tether_e2e::bench::free_port().expect("a free port");
    Some(Bench {
        dir,
        platform,
        state,
        node_red,
        port,
    })
}

/// Creates the device's next snapshot from `files` and pushes it; its
/// version.
pub async fn create_and_push(
    platform: &tether_platform::Platform,
    device: &str,
    files: Vec<(String, Vec<u8>)>,
) -> u64 {
    let info = platform
        .create_snapshot(device, files, None)
        .await
        .expect("snapshot created");
    platform
        .push_snapshot(device, info.version)
        .await
        .expect("pushed");
    info.version
}

/// Waits until the agent is connected and its Node-RED answers.
pub async fn connected_with_node_red(agent: &tether_agent::Agent, port: u16) {
    wait_status(agent, "connected", |s| {
        s.state == tether_agent::TunnelState::Connected
    })
    .await;
    tether_agent::node_red::wait_ready(([127, 0, 0, 1], port).into(), Duration::from_secs(60))
        .await
        .expect("Node-RED came up");
}
