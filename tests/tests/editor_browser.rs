//! The editor, end to end, as a field engineer uses it: a real headless
//! Chromium (Debian's `chromium`, driven by playwright-core) logs in to the
//! reference platform, loads the device's real Node-RED editor through the
//! platform, the mutual-TLS tunnel and `tetherd`, deploys a flow, and meets
//! the viewer role and protection mode (`tests/browser/editor.cjs` has the
//! browser's steps). A second, compromised device answers its editor with
//! a hostile page (`tests/browser/hostile.html`) that tries to act on the
//! platform with the engineer's browser; every attempt must fail. Then,
//! without the browser: Node-RED's admin API on its own port refuses anyone
//! without the agent's token.
//!
//! Needs Node-RED (`tests/nodered/install.sh`), chromium and playwright-core
//! (`tests/browser/install.sh`); `.ci/run` installs all three. Missing, the
//! test fails when `CI` is set and otherwise skips, saying so loudly.
//! Screenshots land in `target/editor-e2e/`.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tether_agent::{Agent, TunnelState};
use tether_e2e::tools;

/// What the browser test needs, or why it cannot run.
struct Tools {
    node_red: PathBuf,
    playwright: PathBuf,
    chromium: PathBuf,
}

fn find_tools() -> Result<Tools, String> {
    let found = [
        tools::node_red(),
        tools::playwright_core(),
        tools::chromium(),
    ]
    .map(|t| t.find());
    let missing: Vec<String> = found.iter().filter_map(|f| f.clone().err()).collect();
    match found {
        [Ok(node_red), Ok(playwright), Ok(chromium)] => Ok(Tools {
            node_red,
            playwright,
            chromium,
        }),
        _ => Err(missing.join("; ")),
    }
}

/// A compromised device's "Node-RED": the hostile page, a service worker
/// script that claims the whole origin, and a redirect off the origin.
async fn hostile_editor() -> std::net::SocketAddr {
    let page = std::fs::read_to_string(tools::workspace().join("tests/browser/hostile.html"))
        .expect("tests/browser/hostile.html");
    http_stand_in(move |path| {
        let cookie = "Set-Cookie: planted=1; Path=/\r\n";
        match path {
            "/" => (
                "200 OK",
                format!("Content-Type: text/html\r\n{cookie}"),
                page.clone(),
            ),
            "/red/sw.js" => (
                "200 OK",
                format!("Content-Type: text/javascript\r\nService-Worker-Allowed: /\r\n{cookie}"),
                "self.addEventListener('fetch', (e) => e.respondWith(new Response('owned')));"
                    .into(),
            ),
            "/red/go-elsewhere" => (
                "302 Found",
                format!(
                    "Location: //evil.example/\r\nRefresh: 0; url=https://evil.example/\r\n{cookie}"
                ),
                "moved".into(),
            ),
            _ => ("404 Not Found", cookie.into(), "no".into()),
        }
    })
    .await
}

/// One HTTP/1.1 GET on 127.0.0.1, without any credentials: the status code.
async fn bare_status(port: u16, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("Node-RED listens");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:.200}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engineer_works_in_the_real_editor_through_the_tunnel() {
    let Some(peers) = tools::required(find_tools()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // As root, Node-RED runs as its own user, which must reach its user
    // directory in here.
    tools::traversable(dir.path());
    let platform = platform(&dir.path().join("platform")).await;
    add_engineers(&platform).await;
    let state = dir.path().join("device");
    enrolled(&platform, &state).await;
    let (agent, node_red_port) = agent_with_node_red(agent_config(&state), &peers.node_red).await;
    let device = agent.device_id();

    // A second device of the team, compromised: its editor is a hostile page.
    let hostile_state = dir.path().join("hostile-device");
    enrolled(&platform, &hostile_state).await;
    let options = tether_agent::AgentOptions {
        editor: Some(tether_agent::editor::EditorTarget {
            addr: hostile_editor().await,
            ..Default::default()
        }),
    };
    let hostile = Agent::start_with(agent_config(&hostile_state), options)
        .await
        .expect("hostile agent starts");
    wait_status(&hostile, "connected", |s| s.state == TunnelState::Connected).await;

    // Direct access to the device's Node-RED, without the agent: refused.
    for path in ["/flows", "/settings", "/nodes"] {
        assert_eq!(bare_status(node_red_port, path).await, 401, "GET {path}");
    }

    let shots = tools::workspace().join("target/editor-e2e");
    std::fs::create_dir_all(&shots).unwrap();
    let browser = tokio::process::Command::new("node")
        .arg(tools::workspace().join("tests/browser/editor.cjs"))
        .env("TETHER_URL", platform.url())
        .env("TETHER_DEVICE", &device)
        .env("HOSTILE_DEVICE", hostile.device_id())
        .env("OWNER", OWNER.0)
        .env("OWNER_PASSWORD", OWNER.1)
        .env("VIEWER", VIEWER.0)
        .env("VIEWER_PASSWORD", VIEWER.1)
        .env(
            "NODE_RED_LOCAL",
            format!("http://127.0.0.1:{node_red_port}"),
        )
        .env("SCREENSHOT_DIR", &shots)
        .env("PLAYWRIGHT_CORE", &peers.playwright)
        .env("CHROMIUM", &peers.chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), browser)
        .await
        .expect("the browser steps end within 3 minutes")
        .expect("node runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = writeln!(std::io::stderr(), "{said}");
    assert!(output.status.success(), "browser steps failed:\n{said}");
    assert!(shots.join("editor-owner.png").is_file());

    // Protection mode reached the device over its control stream; the
    // hostile page changed nothing.
    assert!(agent.protection(), "protection mode reached the device");
    assert!(!hostile.protection(), "the hostile page did not change it");
    hostile.shutdown().await;
    agent.shutdown().await;
    platform.shutdown().await;
}
