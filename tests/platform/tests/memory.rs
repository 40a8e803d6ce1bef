//! Memory per idle tunnel on the platform, measured on a separate
//! `tether-platform serve` process (so the device sides, in this process, do
//! not count). Slow-ish: run with `cargo test -p tether-platform --test
//! memory -- --ignored --nocapture`. `TUNNELS` and `WS_READ_BUFFER` change
//! the count and the platform's WebSocket read buffer.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use http::StatusCode;
use tether_proto::api::EnrollResponse;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tether-platform");

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test]
#[ignore = "measurement; run explicitly"]
async fn an_idle_tunnel_costs_the_platform_less_than_64_kib() {
    let count: usize = std::env::var("TUNNELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let read_buffer = std::env::var("WS_READ_BUFFER").unwrap_or_else(|_| "8192".into());
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_string();
    let mut server = Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            &data_dir,
            "--listen",
            "127.0.0.1:0",
            "--enroll-burst",
            "100000",
            "--no-mqtt",
        ])
        .args(["--ws-read-buffer", &read_buffer])
        .env("TETHER_PLATFORM_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = server.id().unwrap();
    let json = dir.path().join("platform.json");
    for _ in 0..300 {
        if json.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A platform handle on the same directory is not possible while the
    // server runs (redb is locked), so talk HTTP through a client view.
    let client = tether_platform::client::AdminClient::from_data_dir(dir.path()).unwrap();
    let request = tether_platform::admin::CreateTokenRequest {
        ttl_secs: Some(3600),
        uses: u32::try_from(count + 1).unwrap(),
        team: "memory".into(),
    };
    let whole = client.create_token(&request).await.unwrap().token;
    let token = tether_proto::api::ProvisioningToken::parse(whole.expose()).unwrap();
    let remote = Remote::new(dir.path()).await;

    let mut devices = Vec::new();
    for _ in 0..=count {
        let key = new_key();
        let answer = remote
            .enroll(&enroll_request(token.secret().expose(), csr(&key)))
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let response: EnrollResponse = serde_json::from_slice(&answer.body).unwrap();
        devices.push((response.certificate, key));
    }
    let mut tunnels = Vec::new();
    let (warm_cert, warm_key) = &devices[0];
    tunnels.push(remote.tunnel(warm_cert, warm_key).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid);
    for (cert, key) in &devices[1..] {
        tunnels.push(remote.tunnel(cert, key).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes(pid);
    let per_tunnel = after.saturating_sub(before) / count as u64;
    println!(
        "platform RSS {} KiB -> {} KiB for {count} idle tunnels (ws read buffer {read_buffer}): {} bytes per tunnel",
        before / 1024,
        after / 1024,
        per_tunnel
    );
    server.kill().await.unwrap();
    assert!(per_tunnel < 64 * 1024, "{per_tunnel} bytes per idle tunnel");
}

/// Talks to a platform in another process, found through its directory.
struct Remote {
    platform_addr: std::net::SocketAddr,
    ca_pem: String,
}

impl Remote {
    async fn new(dir: &std::path::Path) -> Remote {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("platform.json")).unwrap()).unwrap();
        Remote {
            platform_addr: json["listen"].as_str().unwrap().parse().unwrap(),
            ca_pem: std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
        }
    }

    async fn enroll(&self, request: &tether_proto::api::EnrollRequest) -> Answer {
        let body = serde_json::to_vec(request).unwrap();
        send_to(
            self.platform_addr,
            &self.ca_pem,
            http::Method::POST,
            "/v1/enroll",
            &[],
            body,
            None,
        )
        .await
        .unwrap()
    }

    async fn tunnel(&self, cert: &str, key: &rcgen::KeyPair) -> DeviceTunnel {
        open_tunnel_to(self.platform_addr, &self.ca_pem, Some((cert, key)))
            .await
            .unwrap_or_else(|e| panic!("tunnel: {e:?}"))
    }
}
