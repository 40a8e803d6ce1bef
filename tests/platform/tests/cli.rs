//! The admin API and the `tether-platform` binary against a platform
//! running in the test: bearer authentication, `token create`,
//! `device list --json`, `device revoke`, `device protect`, `user add`,
//! `user list` and `user remove`, and `connect` carrying bytes to a TCP
//! service through a tunnel whose device side the test plays.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use tether_platform::{DeviceInfo, Platform};
use tether_proto::api::ErrorCode;
use tether_proto::grant::Role;
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
    let parsed = tether_proto::api::ProvisioningToken::parse(token).expect("a whole token");
    assert_eq!(
        parsed.ca_spki_sha256(),
        &platform.ca_spki_sha256(),
        "the token names this platform's CA"
    );
    assert!(
        !String::from_utf8_lossy(&created.stderr).contains(token),
        "the token is not repeated on stderr"
    );

    let key = new_key();
    let answer = post_enroll(
        &platform,
        &enroll_request(parsed.secret().expose(), csr(&key)),
    )
    .await;
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
async fn token_list_shows_no_secret_and_token_revoke_stops_a_token() {
    let (platform, dir) = start().await;
    let data_dir = dir.path().to_str().unwrap();
    // A multi-use token without an expiry is refused, and says what to add.
    let open_ended = run(&["token", "create", "--uses", "5", "--data-dir", data_dir]).await;
    assert!(!open_ended.status.success());
    let stderr = String::from_utf8_lossy(&open_ended.stderr);
    assert!(
        stderr.contains("explicit expiry") && stderr.contains("--ttl"),
        "{stderr}"
    );
    assert!(open_ended.stdout.is_empty());

    let created = run(&[
        "token",
        "create",
        "--uses",
        "5",
        "--ttl",
        "1d",
        "--team",
        "line-9",
        "--data-dir",
        data_dir,
    ])
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let whole = String::from_utf8(created.stdout).unwrap();
    let token = tether_proto::api::ProvisioningToken::parse(&whole).unwrap();
    let single = platform
        .create_token(tether_platform::TokenSpec::default())
        .await
        .unwrap();

    let listed = run(&["token", "list", "--data-dir", data_dir, "--json"]).await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let text = String::from_utf8(listed.stdout).unwrap();
    for secret in [token.secret().expose(), single.secret().expose()] {
        assert!(
            !text.contains(&secret[4..20]),
            "no part of a secret is listed: {text}"
        );
    }
    let tokens: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(tokens.len(), 2);
    let ours = tokens.iter().find(|t| t["team"] == "line-9").unwrap();
    assert_eq!(ours["uses_left"], 5);
    assert_eq!(ours["revoked"], false);
    let id = ours["id"].as_str().unwrap().to_owned();

    let table =
        String::from_utf8(run(&["token", "list", "--data-dir", data_dir]).await.stdout).unwrap();
    assert!(
        table.starts_with("ID") && table.contains(&id) && table.contains("5/5"),
        "{table}"
    );

    let revoked = run(&["token", "revoke", &id, "--data-dir", data_dir]).await;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let answer = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.api_error().error, ErrorCode::TokenRevoked);
    assert!(platform.devices().await.unwrap().is_empty());
    let table =
        String::from_utf8(run(&["token", "list", "--data-dir", data_dir]).await.stdout).unwrap();
    assert!(table.contains("revoked"), "{table}");
    // The other token still works.
    let answer = post_enroll(
        &platform,
        &enroll_request(single.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    let unknown = run(&[
        "token",
        "revoke",
        "0000000000000000",
        "--data-dir",
        data_dir,
    ])
    .await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("token list"));
    platform.shutdown().await;
}

/// Runs the binary with `stdin` as its standard input.
async fn run_with_input(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command runs");
    let mut input = child.stdin.take().unwrap();
    match input.write_all(stdin).await {
        Ok(()) => {}
        // A command that refuses its arguments exits before it reads its
        // input; what it said and its exit code are what the caller checks.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => panic!("cannot write the command's input: {e}"),
    }
    drop(input);
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the command finishes")
        .expect("the command's output")
}

#[tokio::test]
async fn user_add_reads_the_password_from_stdin_and_the_user_can_log_in() {
    let (platform, dir) = start().await;
    let data_dir = dir.path().to_str().unwrap();
    let add = |name: &'static str, role: &'static str| {
        [
            "user",
            "add",
            "--data-dir",
            data_dir,
            "--team",
            "line-3",
            "--role",
            role,
            name,
        ]
    };
    let added = run_with_input(&add("alice", "owner"), b"s3cret horse\nignored\n").await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&added.stdout),
        String::from_utf8_lossy(&added.stderr),
    );
    assert!(added.status.success(), "{stderr}");
    assert!(
        stdout.contains("created user alice (owner of team line-3)"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("s3cret") && !stderr.contains("s3cret"),
        "never echoed"
    );

    let login = common::web::post_login(&platform, "alice", "s3cret horse", None).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);

    let listed = run(&["user", "list", "--data-dir", data_dir, "--json"]).await;
    let users: Vec<tether_platform::users::UserInfo> =
        serde_json::from_slice(&listed.stdout).expect("user list --json is JSON");
    assert_eq!(users.len(), 1);
    assert_eq!(
        (
            users[0].name.as_str(),
            users[0].team.as_str(),
            users[0].role
        ),
        ("alice", "line-3", tether_proto::grant::Role::Owner)
    );
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("argon2"));
    let table = run(&["user", "list", "--data-dir", data_dir]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.starts_with("NAME") && table.contains("alice") && table.contains("owner"),
        "{table}"
    );

    for (input, why) in [
        (&b"\n"[..], "empty"),
        (&b""[..], "empty"),
        (&[b'p'; 1025][..], "longer than 1024 bytes"),
    ] {
        let refused = run_with_input(&add("bob", "viewer"), input).await;
        assert_eq!(refused.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(why), "{why}: {stderr}");
    }
    let twice = run_with_input(&add("alice", "viewer"), b"other\n").await;
    assert_eq!(twice.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already exists"));
    let bad_name = run_with_input(&add("not ok", "viewer"), b"pw\n").await;
    assert!(String::from_utf8_lossy(&bad_name.stderr).contains("not a valid user name"));
    let bad_role = run_with_input(&add("bob", "admin"), b"pw\n").await;
    assert_eq!(bad_role.status.code(), Some(2), "a usage error");

    let removed = run(&["user", "remove", "alice", "--data-dir", data_dir]).await;
    assert!(removed.status.success());
    assert!(String::from_utf8_lossy(&removed.stdout).contains("removed user alice"));
    let login = common::web::post_login(&platform, "alice", "s3cret horse", None).await;
    assert_eq!(login.status, StatusCode::UNAUTHORIZED);
    let again = run(&["user", "remove", "alice", "--data-dir", data_dir]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no user"));
    platform.shutdown().await;
}

#[tokio::test]
async fn user_passwd_and_user_role_end_the_users_sessions() {
    let (platform, dir) = start().await;
    let data_dir = dir.path().to_str().unwrap();
    let cookie = common::web::login_as(&platform, "alice", "line-3", Role::Owner).await;
    let valid = |cookie: &str| {
        let cookie = cookie.to_string();
        let platform = &platform;
        async move {
            let mut browser = common::web::Browser::connect(platform, Some(&cookie)).await;
            browser.get("/").await.status == StatusCode::OK
        }
    };
    assert!(valid(&cookie).await);

    let passwd = ["user", "passwd", "alice", "--data-dir", data_dir];
    let changed = run_with_input(&passwd, b"brand new horse\n").await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&changed.stdout),
        String::from_utf8_lossy(&changed.stderr),
    );
    assert!(changed.status.success(), "{stderr}");
    assert!(
        stdout.contains("password of alice changed; 1 session(s) ended"),
        "{stdout}"
    );
    assert!(!stdout.contains("brand new") && !stderr.contains("brand new"));
    assert!(!valid(&cookie).await, "the session ended");
    let old =
        common::web::post_login(&platform, "alice", &common::web::password_of("alice"), None).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let login = common::web::post_login(&platform, "alice", "brand new horse", None).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    let cookie = common::web::session_cookie(&login);
    assert!(valid(&cookie).await);
    let empty = run_with_input(&passwd, b"\n").await;
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("empty"));
    let nobody = run_with_input(&["user", "passwd", "bob", "--data-dir", data_dir], b"pw\n").await;
    assert_eq!(nobody.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no user"));

    let role = run(&["user", "role", "alice", "viewer", "--data-dir", data_dir]).await;
    let stdout = String::from_utf8_lossy(&role.stdout);
    assert!(
        role.status.success(),
        "{}",
        String::from_utf8_lossy(&role.stderr)
    );
    assert!(
        stdout.contains("alice is now viewer; 1 session(s) ended"),
        "{stdout}"
    );
    assert!(!valid(&cookie).await, "the demoted user's session ended");
    let users = platform.users().await.unwrap();
    assert_eq!(users[0].role, Role::Viewer);
    let bad = run(&["user", "role", "alice", "admin", "--data-dir", data_dir]).await;
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    platform.shutdown().await;
}

#[tokio::test]
async fn device_protect_turns_protection_mode_on_and_off() {
    let (platform, dir) = start().await;
    let data_dir = dir.path().to_str().unwrap();
    let device = enroll_new(&platform).await;
    let on = run(&[
        "device",
        "protect",
        &device.id,
        "--on",
        "--data-dir",
        data_dir,
    ])
    .await;
    assert!(
        on.status.success(),
        "{}",
        String::from_utf8_lossy(&on.stderr)
    );
    let stdout = String::from_utf8_lossy(&on.stdout);
    assert!(
        stdout.contains("protection mode on") && stdout.contains("offline"),
        "{stdout}"
    );
    let listed = run(&["device", "list", "--data-dir", data_dir, "--json"]).await;
    let devices: Vec<DeviceInfo> = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(devices[0].protected);
    let table = run(&["device", "list", "--data-dir", data_dir]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().next().unwrap().ends_with("PROTECTED"));
    assert!(table.lines().nth(1).unwrap().ends_with("yes"), "{table}");

    let off = run(&[
        "device",
        "protect",
        &device.id,
        "--off",
        "--data-dir",
        data_dir,
    ])
    .await;
    assert!(off.status.success());
    assert!(!platform.devices().await.unwrap()[0].protected);
    let unknown = run(&[
        "device",
        "protect",
        "dev_00000000000000000000",
        "--on",
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

/// An enrolled device with a live tunnel whose device side the test plays:
/// `echo` bridges to a real TCP echo server, anything else is refused as
/// the agent would.
async fn echo_device(platform: &Platform) -> (Device, DeviceTunnel) {
    let device = enroll_new(platform).await;
    let tunnel = open_tunnel(platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
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
    (device, tunnel)
}

/// Sends 200 kB through `addr` and checks the echo, in both directions at
/// once.
async fn echo_through(addr: &str, round: u32) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
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

/// Starts `tether-platform connect` with `extra` arguments and returns the
/// process and the address from its first line, "listening on ADDR...".
async fn start_connect(
    device_id: &str,
    data_dir: &str,
    extra: &[&str],
) -> (tokio::process::Child, String, String) {
    let mut child = Command::new(BIN)
        .args([
            "connect",
            device_id,
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .expect("connect starts")
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("prints 'listening on ADDR': {line:?}"))
        .to_string();
    (child, addr, line)
}

#[tokio::test]
async fn connect_remote_carries_bytes_to_a_tcp_service_through_the_tunnel() {
    let (platform, dir) = start().await;
    let (device, tunnel) = echo_device(&platform).await;
    let data_dir = dir.path().to_str().unwrap();
    let (mut proxy, addr, line) = start_connect(&device.id, data_dir, &["--remote"]).await;
    assert_eq!(line.trim(), format!("listening on {addr}"));
    // The remote proxy listens in its own process, not in the platform.
    assert_eq!(platform.listener_count(), 0);
    for round in 0..2 {
        echo_through(&addr, round).await;
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

/// Waits until nothing accepts connections on `addr` any more, within
/// `within`.
async fn wait_refused(addr: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{addr} still accepts connections after {within:?}: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn connect_has_the_platform_listen_until_the_command_is_killed() {
    let (platform, dir) = start().await;
    let (device, tunnel) = echo_device(&platform).await;
    let data_dir = dir.path().to_str().unwrap();
    let (mut cli, addr, line) = start_connect(&device.id, data_dir, &[]).await;
    assert_eq!(
        line.trim(),
        format!(
            "listening on {addr} (served by the platform at {}); Ctrl-C to stop",
            platform.url()
        )
    );
    assert_eq!(platform.listener_count(), 1);
    for round in 0..3 {
        echo_through(&addr, round).await;
    }

    // The device goes offline: a connection is accepted, then closed; the
    // listener stays.
    tunnel
        .tunnel
        .close(tether_proto::CloseCode::NO_ERROR, "going offline");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while platform.tunnel(&device.id).is_some() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("the platform closes the connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert_eq!(platform.listener_count(), 1);

    // SIGKILL: no goodbye, yet the platform closes the listener at once.
    cli.kill().await.unwrap();
    wait_refused(&addr, Duration::from_secs(2)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while platform.listener_count() != 0 {
        assert!(std::time::Instant::now() < deadline, "listener slot kept");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    platform.shutdown().await;
}

#[tokio::test]
async fn connect_ends_cleanly_on_sigterm_and_when_the_platform_stops() {
    let (platform, dir) = start().await;
    let (device, _tunnel) = echo_device(&platform).await;
    let data_dir = dir.path().to_str().unwrap();

    let (mut cli, addr, _) = start_connect(&device.id, data_dir, &[]).await;
    echo_through(&addr, 0).await;
    let pid = cli.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(5), cli.wait())
        .await
        .expect("connect exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    wait_refused(&addr, Duration::from_secs(2)).await;

    // The platform stopping ends the session: the listener closes and the
    // command fails.
    let (mut cli, addr, _) = start_connect(&device.id, data_dir, &[]).await;
    platform.shutdown().await;
    let status = tokio::time::timeout(Duration::from_secs(5), cli.wait())
        .await
        .expect("connect exits when the platform stops")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    wait_refused(&addr, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn the_platform_listens_only_on_loopback_without_the_opt_in() {
    let (platform, dir) = start().await;
    let device = enroll_new(&platform).await;
    let data_dir = dir.path().to_str().unwrap();

    // A documentation address (never bound: refused before that).
    let output = run(&[
        "connect",
        &device.id,
        "echo",
        "--listen",
        "192.0.2.1:2222",
        "--data-dir",
        data_dir,
    ])
    .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("192.0.2.1:2222 is not a loopback address")
            && stderr.contains("--allow-remote-listen"),
        "{stderr}"
    );

    // The admin API directly: 0.0.0.0 is refused the same way; an unknown
    // device is a 404 and a non-upgrade a 400.
    let bearer = format!("Bearer {}", platform.admin_token().expose());
    let headers = [
        ("authorization", bearer.as_str()),
        ("connection", "upgrade"),
        ("upgrade", "tether-listen"),
        ("content-type", "application/json"),
    ];
    let path = format!("/v1/admin/devices/{}/services/echo/listen", device.id);
    let body = br#"{"listen": "0.0.0.0:0"}"#.to_vec();
    let refused = send(&platform, Method::POST, &path, &headers, body, None)
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let error = refused.api_error();
    assert_eq!(error.error, ErrorCode::BadRequest);
    assert!(
        error.message.contains("not a loopback address")
            && error.message.contains("--allow-remote-listen"),
        "{}",
        error.message
    );

    let body = br#"{"listen": "127.0.0.1:0"}"#.to_vec();
    let path = "/v1/admin/devices/dev_00000000000000000000/services/echo/listen";
    let unknown = send(&platform, Method::POST, path, &headers, body.clone(), None)
        .await
        .unwrap();
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let path = format!("/v1/admin/devices/{}/services/echo/listen", device.id);
    let plain = send(&platform, Method::POST, &path, &headers[..1], body, None)
        .await
        .unwrap();
    assert_eq!(plain.status, StatusCode::BAD_REQUEST);
    assert_eq!(platform.listener_count(), 0);
    platform.shutdown().await;
}
