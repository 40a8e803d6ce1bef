//! The locked-down local Node-RED with a REAL Node-RED 4 (`docs/protocol.md`
//! §16.4): started through the agent's launcher on a free 127.0.0.1 port, or
//! by hand with only the settings file (external mode), then spoken to with
//! a plain HTTP/1.1 client. Without a valid agent token the admin API
//! answers 401; a viewer token reads but cannot deploy; an owner deploys,
//! and the deployed flow's HTTP endpoint answers without any token; tokens
//! from a rotated key work and a retired key's do not; an exited Node-RED
//! is started again and a stopped one is gone.
//!
//! Node-RED comes from `TETHER_NODE_RED` or the cache that
//! `tests/nodered/install.sh` fills. Missing, the tests fail when `CI` is
//! set and otherwise skip, saying so loudly.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tether_agent::config::{NodeRedConfig, NodeRedMode};
use tether_agent::node_red::user::{effective_uid, lookup_in};
use tether_agent::node_red::{
    Claims, KEYS_FILE, LocalAuth, NodeRed, Permissions, SETTINGS_FILE, TOKEN_HEADER, for_role,
};
use tether_proto::grant::Role;

/// Node-RED takes a few seconds to start on a small machine.
const START: Duration = Duration::from_secs(90);

/// The `node-red` binary, or `None` (after saying so) outside CI.
fn node_red_binary() -> Option<PathBuf> {
    let path = std::env::var_os("TETHER_NODE_RED")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("TETHER_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    if tether_agent::node_red::user::effective_uid() == Some(0) {
                        PathBuf::from("/var/cache/tether")
                    } else {
                        Path::new(&std::env::var_os("HOME").unwrap_or_default())
                            .join(".cache/tether")
                    }
                });
            cache.join("node-red/node_modules/.bin/node-red")
        });
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "Node-RED not found at '{}'; run `bash tests/nodered/install.sh` or set TETHER_NODE_RED",
        path.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set: this test may not be skipped)");
    }
    // Straight to stderr: libtest would hide an eprintln! of a passing test.
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
    None
}

/// Node-RED's output, forwarded by the launcher, in the test's output.
fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn config(mode: NodeRedMode, command: &Path, user_dir: &Path) -> NodeRedConfig {
    NodeRedConfig {
        mode,
        command: command.to_str().unwrap().to_owned(),
        user_dir: Some(user_dir.to_owned()),
        port: free_port(),
        user: (mode == NodeRedMode::Launch).then(test_user).flatten(),
        hang_timeout: Duration::from_secs(30),
    }
}

/// As root (CI), the user a launched Node-RED runs as: `tether-nodered`,
/// created if missing, and the test's temporary directory made
/// traversable. `None` when not root.
fn test_user() -> Option<String> {
    if effective_uid() != Some(0) {
        return None;
    }
    let name = "tether-nodered";
    if lookup_in(Path::new("/etc/passwd"), name).is_none() {
        let status = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status()
            .expect("useradd runs");
        assert!(
            status.success() || lookup_in(Path::new("/etc/passwd"), name).is_some(),
            "useradd {name} failed"
        );
    }
    Some(name.to_string())
}

/// A temporary directory others may pass through (0711), so that a
/// Node-RED running as its own user reaches its user directory inside.
fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One HTTP/1.1 request on a fresh connection.
async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (StatusCode, Bytes) {
    let token = token.map(|t| (TOKEN_HEADER, t));
    request_with(addr, method, path, token.as_slice(), body).await
}

/// One HTTP/1.1 request on a fresh connection, with `headers`.
async fn request_with(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> (StatusCode, Bytes) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let body = match body {
        Some(json) => {
            req = req.header("content-type", "application/json");
            Bytes::from(json.to_string())
        }
        None => Bytes::new(),
    };
    let response = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .expect("response");
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, bytes)
}

async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (StatusCode, Bytes) {
    request(addr, Method::GET, path, token, None).await
}

/// `user` from `GET /settings`, which must answer 200.
async fn settings_user(addr: SocketAddr, token: &str) -> serde_json::Value {
    let (status, body) = get(addr, "/settings", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    json["user"].clone()
}

/// A tab with `GET /hello` answering "hello from flows", `GET /headers`
/// answering the request headers the flow sees, and a `websocket in` on
/// `/ws/flow`.
fn hello_flow() -> serde_json::Value {
    serde_json::json!([
        {"id": "t1", "type": "tab", "label": "tether test"},
        {"id": "in2", "type": "http in", "z": "t1", "url": "/headers", "method": "get",
         "wires": [["chg2"]]},
        {"id": "chg2", "type": "change", "z": "t1",
         "rules": [{"t": "set", "p": "payload", "pt": "msg", "to": "req.headers", "tot": "msg"}],
         "wires": [["out2"]]},
        {"id": "out2", "type": "http response", "z": "t1", "statusCode": "200", "wires": []},
        {"id": "wsl", "type": "websocket-listener", "path": "/ws/flow", "wholemsg": "false"},
        {"id": "wsin", "type": "websocket in", "z": "t1", "server": "wsl", "client": "",
         "wires": [[]]},
        {"id": "in1", "type": "http in", "z": "t1", "url": "/hello", "method": "get",
         "wires": [["tpl1"]]},
        {"id": "tpl1", "type": "template", "z": "t1", "field": "payload", "fieldType": "msg",
         "format": "text", "syntax": "plain", "template": "hello from flows", "output": "str",
         "wires": [["out1"]]},
        {"id": "out1", "type": "http response", "z": "t1", "statusCode": "200", "wires": []}
    ])
}

/// The headers the `/headers` flow saw for a request with `headers`.
async fn headers_seen_by_flow(addr: SocketAddr, headers: &[(&str, &str)]) -> serde_json::Value {
    let (status, body) = request_with(addr, Method::GET, "/headers", headers, None).await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).unwrap()
}

/// The status code of a WebSocket upgrade to `path`, with or without the
/// agent's token header.
async fn upgrade_status(addr: SocketAddr, path: &str, token: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let token = token.map_or(String::new(), |t| format!("{TOKEN_HEADER}: {t}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{token}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("an answer to the upgrade")
        .unwrap();
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {line}"))
}

async fn flows_json(addr: SocketAddr, token: &str) -> serde_json::Value {
    let (status, body) = get(addr, "/flows", Some(token)).await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_node_red_answers_only_the_agents_tokens() {
    let Some(bin) = node_red_binary() else { return };
    log_to_test_output();
    let dir = tempdir();
    let user_dir = dir.path().join("node-red");
    // A login session from an earlier configuration must not survive.
    std::fs::create_dir_all(&user_dir).unwrap();
    std::fs::write(user_dir.join(".sessions.json"), "{}").unwrap();
    let config = config(NodeRedMode::Launch, &bin, &user_dir);
    let nr = NodeRed::start(&config, dir.path())
        .unwrap()
        .expect("launch mode");
    assert!(!user_dir.join(".sessions.json").exists());
    nr.ready(START).await.expect("node-red ready");
    let addr = nr.addr();
    assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], config.port)));
    let auth = nr.auth();

    // No token, a token from another key, expired, too long-lived, garbage.
    assert_eq!(
        get(addr, "/settings", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(addr, "/flows", None).await.0, StatusCode::UNAUTHORIZED);
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = LocalAuth::new(stranger_dir.path()).unwrap();
    let foreign = stranger.token("mallory", &Permissions::All);
    assert_eq!(
        get(addr, "/settings", Some(&foreign)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let claims = |exp| Claims {
        user: "owner-olga".into(),
        permissions: Permissions::All,
        exp,
    };
    let expired = auth.sign(&claims(unix_now() - 5));
    assert_eq!(
        get(addr, "/settings", Some(&expired)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let forever = auth.sign(&claims(unix_now() + 3600));
    assert_eq!(
        get(addr, "/settings", Some(&forever)).await.0,
        StatusCode::UNAUTHORIZED
    );
    for junk in ["v1.e30.AAAA", "Bearer x", "v1..", &"v".repeat(5000)] {
        assert_eq!(
            get(addr, "/settings", Some(junk)).await.0,
            StatusCode::UNAUTHORIZED
        );
    }

    // A viewer reads, as "read", and cannot deploy (Node-RED answers a
    // missing permission with 401 too).
    let viewer = auth.token("viewer-vera", &for_role(Role::Viewer, false));
    let user = settings_user(addr, &viewer).await;
    assert_eq!(user["username"], "viewer-vera");
    assert_eq!(user["permissions"], "read");
    let before = flows_json(addr, &viewer).await;
    let (status, _) = request(
        addr,
        Method::POST,
        "/flows",
        Some(&viewer),
        Some(hello_flow()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // So is an owner in protection mode: no flows.write is presented.
    let protected = auth.token("owner-olga", &for_role(Role::Owner, true));
    let (status, _) = request(
        addr,
        Method::POST,
        "/flows",
        Some(&protected),
        Some(hello_flow()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        flows_json(addr, &viewer).await,
        before,
        "nothing was deployed"
    );

    // An owner deploys; the flow's endpoint answers without any token.
    let owner = auth.token("owner-olga", &for_role(Role::Owner, false));
    assert_eq!(settings_user(addr, &owner).await["permissions"], "*");
    let (status, body) = request(
        addr,
        Method::POST,
        "/flows",
        Some(&owner),
        Some(hello_flow()),
    )
    .await;
    assert!(
        status == StatusCode::OK || status == StatusCode::NO_CONTENT,
        "deploy: {status} {}",
        String::from_utf8_lossy(&body)
    );
    // Node-RED answers the deploy before the new flows have started.
    let body = eventually("GET /hello to answer", || async {
        let (status, body) = get(addr, "/hello", None).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(&body[..], b"hello from flows");

    // No flow sees the agent's token: a request to a flow's endpoint that
    // carries it (as everything the agent proxies does) is answered before
    // the flow runs; any other x-tether-* header is removed.
    let (status, body) = get(addr, "/headers", Some(&owner)).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(!String::from_utf8_lossy(&body).contains(&owner));
    assert!(String::from_utf8_lossy(&body).contains("not reachable through remote editor access"));
    let seen = headers_seen_by_flow(addr, &[("x-tether-user", "root"), ("x-other", "kept")]).await;
    assert_eq!(seen["x-other"], "kept", "{seen}");
    assert!(seen.get("x-tether-user").is_none(), "{seen}");
    // The same for a flow's WebSocket.
    assert_eq!(upgrade_status(addr, "/ws/flow", Some(&owner)).await, 401);
    assert_eq!(upgrade_status(addr, "/ws/flow", None).await, 101);

    // Rotation: the file changes, new tokens work, the previous key's work
    // until it is retired.
    let keys_before = std::fs::read(user_dir.join(KEYS_FILE)).unwrap();
    auth.rotate().unwrap();
    let keys_after = std::fs::read(user_dir.join(KEYS_FILE)).unwrap();
    assert_ne!(keys_before, keys_after);
    let fresh = auth.token("viewer-vera", &Permissions::Read);
    assert_ne!(fresh, viewer);
    assert_eq!(settings_user(addr, &fresh).await["username"], "viewer-vera");
    assert_eq!(
        get(addr, "/settings", Some(&viewer)).await.0,
        StatusCode::OK
    );
    auth.retire_previous().unwrap();
    assert_eq!(
        get(addr, "/settings", Some(&viewer)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(addr, "/settings", Some(&fresh)).await.0, StatusCode::OK);

    // An exited Node-RED is started again; a stopped one is gone.
    let first = nr.pid().expect("running");
    kill(first, rustix::process::Signal::KILL);
    let second = wait_for_new_pid(&nr, first).await;
    nr.ready(START).await.expect("ready again");
    assert_eq!(get(addr, "/settings", Some(&fresh)).await.0, StatusCode::OK);
    eventually("the flows to run again", || async {
        (get(addr, "/hello", None).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    nr.shutdown().await;
    assert!(
        !Path::new(&format!("/proc/{second}")).exists(),
        "pid {second} still there"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
    assert_no_private_key(&user_dir);
}

/// A Node-RED whose process lives but does not answer (stopped with
/// SIGSTOP, as a flow stuck in a loop would leave it) is hung: the launcher
/// kills it and starts a new one, which answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_red_is_killed_and_started_again() {
    let Some(bin) = node_red_binary() else { return };
    log_to_test_output();
    let dir = tempdir();
    let user_dir = dir.path().join("node-red");
    let mut config = config(NodeRedMode::Launch, &bin, &user_dir);
    config.hang_timeout = Duration::from_secs(3);
    let nr = NodeRed::start(&config, dir.path())
        .unwrap()
        .expect("launch mode");
    nr.ready(START).await.expect("node-red ready");
    let first = nr.pid().expect("running");
    // The launcher's own probe (every second here) must have seen an answer
    // too: before its first answer a Node-RED counts as still starting, and
    // hangs only after `START_LIMIT`.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    kill(first, rustix::process::Signal::STOP);
    let stopped = std::time::Instant::now();
    let second = wait_for_new_pid(&nr, first).await;
    let took = stopped.elapsed();
    assert!(
        !Path::new(&format!("/proc/{first}")).exists() || is_zombie(first),
        "the hung pid {first} is still there"
    );
    // Hung after 3 s of silence, then 2 s of grace before SIGKILL.
    assert!(took >= Duration::from_secs(3), "restarted after {took:?}");
    nr.ready(START).await.expect("the new node-red answers");
    assert_ne!(second, first);
    let state = nr.launcher().unwrap().state().to_string();
    assert!(state.contains("running"), "{state}");
    nr.shutdown().await;
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_started_node_red_with_the_written_settings_is_locked_down() {
    let Some(bin) = node_red_binary() else { return };
    log_to_test_output();
    let dir = tempdir();
    let user_dir = dir.path().join("nr");
    let mut config = config(NodeRedMode::External, &bin, &user_dir);
    config.command = "node-red".into();
    let nr = NodeRed::start(&config, dir.path())
        .unwrap()
        .expect("external mode");
    assert_eq!(nr.pid(), None, "external mode starts nothing");
    // As an operator would: only --settings, the user directory follows.
    let mut operator = tokio::process::Command::new(&bin)
        .arg("--settings")
        .arg(user_dir.join(SETTINGS_FILE))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    nr.ready(START).await.expect("node-red ready");
    let addr = nr.addr();
    assert_eq!(get(addr, "/flows", None).await.0, StatusCode::UNAUTHORIZED);
    let member = nr
        .auth()
        .token("member-mia", &for_role(Role::Member, false));
    let user = settings_user(addr, &member).await;
    assert_eq!(user["username"], "member-mia");
    assert_eq!(user["permissions"][1], "flows.write");
    let (status, _) = request(
        addr,
        Method::POST,
        "/flows",
        Some(&member),
        Some(hello_flow()),
    )
    .await;
    assert!(status.is_success(), "member deploys: {status}");
    assert!(
        user_dir.join("flows.json").exists(),
        "Node-RED's user dir is ours"
    );
    operator.kill().await.unwrap();
    nr.shutdown().await;
}

fn kill(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

async fn wait_for_new_pid(nr: &NodeRed, old: u32) -> u32 {
    eventually("node-red to be started again", || async {
        nr.pid().filter(|pid| *pid != old)
    })
    .await
}

/// Polls `check` every 100 ms until it gives `Some`; panics after [`START`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + START;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nothing the agent wrote holds more than public keys.
fn assert_no_private_key(user_dir: &Path) {
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(user_dir.join(KEYS_FILE)).unwrap()).unwrap();
    assert_eq!(keys.as_object().unwrap().len(), 1, "{keys}");
    for key in keys["keys"].as_array().unwrap() {
        assert_eq!(
            key.as_str().unwrap().len(),
            43,
            "a raw 32-byte public key: {key}"
        );
    }
    let settings = std::fs::read_to_string(user_dir.join(SETTINGS_FILE)).unwrap();
    assert!(!settings.contains("PRIVATE"), "{settings}");
}

/// A flow whose `exec` node, at `GET /attack`, tries what a member with a
/// grudge would: read the device's key, append to `identity.json`, write and
/// replace the editor key file. It answers one line per attempt, then its
/// uid.
fn attack_flow(
    key: &Path,
    identity: &Path,
    keys_file: &Path,
    user_dir: &Path,
) -> serde_json::Value {
    let (key, identity, keys_file, user_dir) = (
        key.display(),
        identity.display(),
        keys_file.display(),
        user_dir.display(),
    );
    let script = format!(
        "cat {key} >/dev/null 2>&1 && echo read-key:ok || echo read-key:refused; \
         echo x >> {identity} 2>/dev/null && echo write-identity:ok || echo write-identity:refused; \
         echo x > {keys_file} 2>/dev/null && echo write-keys:ok || echo write-keys:refused; \
         echo x > {user_dir}/evil.json && mv -f {user_dir}/evil.json {keys_file} 2>/dev/null && echo replace-keys:ok || echo replace-keys:refused; \
         id -u"
    );
    serde_json::json!([
        {"id": "t1", "type": "tab", "label": "attack"},
        {"id": "in1", "type": "http in", "z": "t1", "url": "/attack", "method": "get",
         "wires": [["ex1"]]},
        {"id": "ex1", "type": "exec", "z": "t1", "command": script, "addpay": "",
         "append": "", "useSpawn": "false", "timer": "", "winHide": false, "oldrc": false,
         "wires": [["out1"], [], []]},
        {"id": "out1", "type": "http response", "z": "t1", "statusCode": "200", "wires": []}
    ])
}

/// Run as root (CI runs as root; with CI set, a non-root run fails instead
/// of skipping): Node-RED runs as its own user, and a flow cannot read the
/// agent's key nor change its identity or the editor key file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_cannot_read_the_agents_key_or_rewrite_its_files() {
    if effective_uid() != Some(0) {
        let why = "this test starts Node-RED as another user and needs root";
        if std::env::var_os("CI").is_some() {
            panic!("{why} (CI is set: this test may not be skipped)");
        }
        let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
        return;
    }
    let Some(bin) = node_red_binary() else { return };
    log_to_test_output();
    let dir = tempdir();
    // The agent's state directory, as enrollment leaves it.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let key = state.join("device-1.key");
    let identity = state.join("identity.json");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nsecret\n").unwrap();
    std::fs::write(&identity, "{}").unwrap();
    let mut config = config(NodeRedMode::Launch, &bin, &state);
    config.user_dir = None;
    let user = config.user.clone().expect("a Node-RED user as root");
    let run_as = lookup_in(Path::new("/etc/passwd"), &user).unwrap();
    let nr = NodeRed::start(&config, &state)
        .unwrap()
        .expect("launch mode");
    let user_dir = nr.user_dir().to_owned();
    assert!(
        !user_dir.starts_with(&state),
        "the user directory is outside the state directory"
    );
    nr.ready(START).await.expect("node-red ready");
    let pid = nr.pid().expect("running");
    let uid_line = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(
        uids.iter().all(|u| *u == run_as.uid),
        "Node-RED runs as {uid_line}"
    );

    let keys_file = user_dir.join(KEYS_FILE);
    let keys_before = std::fs::read(&keys_file).unwrap();
    let owner = nr.auth().token("owner-olga", &for_role(Role::Owner, false));
    let flow = attack_flow(&key, &identity, &keys_file, &user_dir);
    let (status, body) = request(nr.addr(), Method::POST, "/flows", Some(&owner), Some(flow)).await;
    assert!(
        status.is_success(),
        "deploy: {status} {}",
        String::from_utf8_lossy(&body)
    );
    let answer = eventually("GET /attack to answer", || async {
        let (status, body) = get(nr.addr(), "/attack", None).await;
        (status == StatusCode::OK).then(|| String::from_utf8_lossy(&body).into_owned())
    })
    .await;
    for attempt in ["read-key", "write-identity", "write-keys", "replace-keys"] {
        assert!(
            answer.contains(&format!("{attempt}:refused")),
            "{attempt}: {answer}"
        );
    }
    assert!(
        answer.trim_end().ends_with(&run_as.uid.to_string()),
        "{answer}"
    );
    assert_eq!(std::fs::read(&keys_file).unwrap(), keys_before);
    assert_eq!(std::fs::read_to_string(&identity).unwrap(), "{}");
    nr.shutdown().await;
}
