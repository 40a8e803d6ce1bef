//! The admin API and the `tether-platform` binary against a platform
//! running in the test: bearer authentication, `token create`,
//! `device list --json`, `device revoke`, and `connect` carrying bytes to a
//! TCP service through a tunnel whose device side the test plays.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use tether_platform::DeviceInfo;
use tether_proto::api::ErrorCode;
use tether_proto::{ResetCode, Service, ServiceHeader};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tether-platform");

async fn run(args: &[&str]) -> std::process::Output {
    let output = Command::new(BIN).args(args).stdin(Stdio::null()).output();
    tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the command finishes")
        .expect("the command runs")
}

#[tokio::test]
async fn the_admin_api_wants_the_admin_token_and_limits_failures() {
    let (platform, _dir) = start().await;
    let good = platform.admin_token();
    let ok = admin(
        &platform,
        Method::GET,
        "/v1/admin/devices",
        good.expose(),
        Vec::new(),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);

    let missing = send(
        &platform,
        Method::GET,
        "/v1/admin/devices",
        &[],
        Vec::new(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.api_error().error, ErrorCode::Unauthorized);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let wrong = admin(
            &platform,
            Method::GET,
            "/v1/admin/devices",
            "tat_wrong",
            Vec::new(),
        )
        .await;
        statuses.push(wrong.status);
    }
    // One failure above, then four more fill the burst of five; the sixth
    // attempt is limited, and so is the right token from that source.
    assert_eq!(&statuses[..4], [StatusCode::UNAUTHORIZED; 4]);
    assert_eq!(statuses[5], StatusCode::TOO_MANY_REQUESTS);
    let limited = admin(
        &platform,
        Method::GET,
        "/v1/admin/devices",
        good.expose(),
        Vec::new(),
    )
    .await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers.contains_key("retry-after"));
    platform.shutdown().await;
}

#[tokio::test]
async fn token_create_prints_one_token_and_device_list_and_revoke_work() {
    let (platform, dir) = start().await;
    let data_dir = dir.path().to_str().unwrap();
    let created = run(&[
        "token",
        "create",
        "--data-dir",
        data_dir,
        "--ttl",
        "10m",
        "--uses",
        "2",
        "--team",
        "line-3",
    ])
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let stdout = String::from_utf8(created.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the token on stdout: {stdout:?}");
    let token = lines[0];
    assert!(tether_proto::api::is_provisioning_token(token));
    assert!(
        !String::from_utf8_lossy(&created.stderr).contains(token),
        "the token is not repeated on stderr"
    );

    let key = new_key();
    let answer = post_enroll(&platform, &enroll_request(token, csr(&key))).await;
    assert_eq!(answer.status, StatusCode::OK);

    let listed = run(&["device", "list", "--data-dir", data_dir, "--json"]).await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let devices: Vec<DeviceInfo> =
        serde_json::from_slice(&listed.stdout).expect("device list --json is JSON");
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].team, "line-3");
    assert!(!devices[0].revoked);

    let table = run(&["device", "list", "--data-dir", data_dir]).await;
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.starts_with("ID") && table.contains(&devices[0].id) && table.contains("offline"),
        "{table}"
    );

    let revoked = run(&["device", "revoke", &devices[0].id, "--data-dir", data_dir]).await;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(platform.devices().await.unwrap()[0].revoked);

    let unknown = run(&[
        "device",
        "revoke",
        "dev_00000000000000000000",
        "--data-dir",
        data_dir,
    ])
    .await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no device"));
    platform.shutdown().await;
}

#[tokio::test]
async fn admin_commands_say_what_to_do_when_the_platform_is_not_running() {
    let (platform, dir) = start().await;
    platform.shutdown().await;
    let data_dir = dir.path().to_str().unwrap();
    let output = run(&["device", "list", "--data-dir", data_dir]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the platform") && stderr.contains("tether-platform serve"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    let empty = tempfile::tempdir().unwrap();
    let output = run(&[
        "device",
        "list",
        "--data-dir",
        empty.path().to_str().unwrap(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("platform.json") && stderr.contains("help:"),
        "{stderr}"
    );
}

/// A TCP echo server on 127.0.0.1 port 0.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn connect_carries_bytes_to_a_tcp_service_through_the_tunnel() {
    let (platform, dir) = start().await;
    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
    // The device side: `echo` bridges to a real TCP echo server, anything
    // else is refused as the agent would.
    let echo = echo_server().await;
    let device_side = tunnel.tunnel.clone();
    tokio::spawn(async move {
        let allow = |header: &ServiceHeader| match &header.service {
            Service::Tcp(name) if name == "echo" => Ok(()),
            other => Err((
                ResetCode::REFUSED,
                format!("service '{other}' is not allow-listed on this device"),
            )),
        };
        while let Some((mut stream, _)) = device_side.accept_filtered(allow).await {
            tokio::spawn(async move {
                let mut tcp = TcpStream::connect(echo).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
            });
        }
    });

    let data_dir = dir.path().to_str().unwrap();
    let mut proxy = Command::new(BIN)
        .args([
            "connect",
            &device.id,
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(proxy.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .expect("the proxy starts")
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("prints 'listening on ADDR'")
        .to_string();

    for round in 0..2 {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + round) as u8).collect();
        let (mut rd, mut wr) = tcp.split();
        let write = async {
            wr.write_all(&payload).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let read = rd.read_to_end(&mut echoed);
        let ((), read) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
                .await
                .expect("the echo completes");
        read.unwrap();
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload, "round {round}: bytes differ");
    }

    // Through the admin API directly: a refused service is a 502 with the
    // device's answer, an offline device a 409.
    let token = platform.admin_token();
    let bearer = format!("Bearer {}", token.expose());
    let headers = [
        ("authorization", bearer.as_str()),
        ("connection", "upgrade"),
        ("upgrade", "tether-tcp"),
    ];
    let path = format!("/v1/admin/devices/{}/services/ssh/connect", device.id);
    let refused = send(&platform, Method::GET, &path, &headers, Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(refused.api_error().error, ErrorCode::ServiceRefused);

    tunnel
        .tunnel
        .close(tether_proto::CloseCode::NO_ERROR, "going offline");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while platform.tunnel(&device.id).is_some() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let path = format!("/v1/admin/devices/{}/services/echo/connect", device.id);
    let offline = send(&platform, Method::GET, &path, &headers, Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(offline.status, StatusCode::CONFLICT);
    assert_eq!(offline.api_error().error, ErrorCode::DeviceOffline);

    proxy.kill().await.unwrap();
    platform.shutdown().await;
}
