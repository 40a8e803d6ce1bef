//! The running agent against the real platform: the tunnel comes up and the
//! platform sees the device, services are allow-listed and carry bytes
//! intact, renewal switches the certificate, revocation and a platform with
//! another CA are reported and retried slowly, status reports the daemon,
//! and SIGTERM stops the binary cleanly.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tether_agent::config::{Config, ServiceConfig};
use tether_agent::identity::StateDir;
use tether_agent::{Agent, TunnelState};
use tether_platform::{ConnectError, Platform, PlatformEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(state: &Path) -> Config {
    let mut config = Config::for_state_dir(state);
    config.heartbeat_interval = Duration::from_secs(1);
    config.reconnect.min_delay = Duration::from_millis(50);
    config.reconnect.max_delay = Duration::from_millis(500);
    config
}

async fn connected(agent: &Agent) {
    reaches(agent, TunnelState::Connected).await;
}

/// Waits until the agent's tunnel is in `state`; returns the status then.
async fn reaches(agent: &Agent, state: TunnelState) -> tether_agent::Status {
    let mut status = agent.status();
    tokio::time::timeout(patience(), status.wait_for(|s| s.state == state))
        .await
        .unwrap_or_else(|_| panic!("the agent did not reach {state:?} in time"))
        .expect("status channel open")
        .clone()
}

async fn online(platform: &Platform, id: &str) {
    eventually("the platform to list the device online", || async {
        platform
            .devices()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.id == id && d.online)
    })
    .await;
}

/// A local TCP echo server on 127.0.0.1.
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_sees_the_device_and_services_are_allow_listed() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let mut events = platform.events();
    let echo = echo_server().await;
    let mut config = config(&state);
    config.services = vec![ServiceConfig {
        name: "echo".into(),
        target: echo,
    }];
    let agent = Agent::start(config).await.unwrap();
    connected(&agent).await;
    online(&platform, &id).await;
    let mut saw_up = false;
    let mut saw_heartbeat = false;
    tokio::time::timeout(patience(), async {
        while !(saw_up && saw_heartbeat) {
            match events.recv().await.unwrap() {
                PlatformEvent::TunnelUp { device_id, .. } if device_id == id => saw_up = true,
                PlatformEvent::Heartbeat { device_id, .. } if device_id == id => {
                    saw_heartbeat = true
                }
                _ => {}
            }
        }
    })
    .await
    .expect("TunnelUp and a heartbeat");

    // A service that is not in the allow-list is refused, and the agent's
    // reason reaches the platform in the RESET.
    let err = platform.open_tcp(&id, "db").await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused(_)), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(
        err.to_string()
            .contains("service 'db' is not allow-listed on this device"),
        "{err}"
    );
    let err = platform.open_tcp(&id, "ssh").await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused(_)), "{err}");

    // 64 MiB through the allow-listed echo service, checked by SHA-256.
    let stream = platform.open_tcp(&id, "echo").await.expect("echo accepted");
    let (mut rd, mut wr) = tokio::io::split(stream);
    const TOTAL: usize = 64 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..TOTAL / chunk.len() {
            for b in chunk.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            ctx.update(&chunk);
            wr.write_all(&chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
        ctx.finish()
    });
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    loop {
        let n = rd.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        received += n;
    }
    let sent = writer.await.unwrap();
    assert_eq!(received, TOTAL);
    assert_eq!(
        ctx.finish().as_ref(),
        sent.as_ref(),
        "bytes changed in transit"
    );

    let status = agent.status().borrow().clone();
    assert_eq!(status.connects, 1);
    assert_eq!(status.device_id, id);

    // The status file of this (running) process says running.
    let (code, out, _) =
        tetherd(&["status", "--state-dir", state.to_str().unwrap(), "--json"]).await;
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["daemon"]["running"], true, "{out}");
    assert_eq!(report["daemon"]["state"], "connected", "{out}");
    assert_eq!(report["daemon"]["pid"], std::process::id());

    // A graceful close does not wait out the grace period for the control
    // stream.
    let stopping = std::time::Instant::now();
    agent.shutdown().await;
    assert!(
        stopping.elapsed() < Duration::from_millis(1500),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    eventually("the platform to see the device offline", || async {
        platform
            .devices()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.id == id && !d.online)
    })
    .await;
    let (_, out, _) = tetherd(&["status", "--state-dir", state.to_str().unwrap(), "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["daemon"]["running"], false, "{out}");
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_the_platform_asks_for_switches_the_certificate_and_the_next_connection_uses_it()
{
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let first = enrolled(&platform, &state).await.identity;
    let mut events = platform.events();
    let config = config(&state);
    let agent = Agent::start(config.clone()).await.unwrap();
    connected(&agent).await;
    online(&platform, &first.device_id).await;
    // Thirty days left: outside the renewal window, so the device renews
    // only because the platform asks it to. The request is pushed once the
    // device's control stream is up (a moment after the tunnel is listed);
    // asking again is harmless.
    eventually("the renewal request pushed to the device", || async {
        platform
            .request_renewal(&first.device_id)
            .await
            .unwrap()
            .then_some(())
    })
    .await;
    let mut status = agent.status();
    tokio::time::timeout(patience(), status.wait_for(|s| s.renewals == 1))
        .await
        .expect("renewed in time")
        .unwrap();
    let second = StateDir::new(&state).load().unwrap().unwrap();
    assert_eq!(second.generation, first.generation + 1);
    assert_eq!(second.device_id, first.device_id);
    assert!(
        !state.join(&first.key_file).exists(),
        "the old key was not removed"
    );
    let creds = StateDir::new(&state).credentials(&second).unwrap();
    assert_eq!(
        agent.status().borrow().cert_fingerprint,
        creds.cert.fingerprint
    );
    // The current tunnel carries on.
    assert_eq!(agent.status().borrow().state, TunnelState::Connected);
    agent.shutdown().await;

    let agent = Agent::start(config).await.unwrap();
    let fingerprint = tokio::time::timeout(patience(), async {
        loop {
            if let PlatformEvent::TunnelUp { fingerprint, .. } = events.recv().await.unwrap()
                && fingerprint == creds.cert.fingerprint
            {
                return fingerprint;
            }
        }
    })
    .await
    .expect("a tunnel with the renewed certificate");
    assert_eq!(fingerprint, creds.cert.fingerprint);
    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_state_directory_is_reported_and_refused_once_the_real_device_renews() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let real = dir.path().join("real");
    let id = enrolled(&platform, &real).await.identity.device_id;
    let copy = dir.path().join("copy");
    copy_dir(&real, &copy);
    let mut events = platform.events();

    // Two machines with one identity keep taking the tunnel from each
    // other; the platform says so.
    let a = Agent::start(config(&real)).await.unwrap();
    let b = Agent::start(config(&copy)).await.unwrap();
    let reported = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let PlatformEvent::IdentityConflict {
                device_id, reason, ..
            } = events.recv().await.unwrap()
            {
                return (device_id, reason);
            }
        }
    })
    .await
    .expect("the platform reports two holders of one identity");
    assert_eq!(reported.0, id);
    b.shutdown().await;

    // The operator has the real device renew; once it connects with the
    // new certificate, the copy's certificate is superseded.
    connected(&a).await;
    online(&platform, &id).await;
    platform.request_renewal(&id).await.unwrap();
    let mut status = a.status();
    tokio::time::timeout(patience(), status.wait_for(|s| s.renewals == 1))
        .await
        .expect("renewed in time")
        .unwrap();
    a.shutdown().await;
    let a = Agent::start(config(&real)).await.unwrap();
    connected(&a).await;

    let mut config_b = config(&copy);
    config_b.reconnect.slow_delay = Duration::from_secs(3600);
    let b = Agent::start(config_b).await.unwrap();
    let s = reaches(&b, TunnelState::Backoff).await;
    let error = s.last_error.unwrap_or_default();
    assert!(error.contains("superseded"), "{error}");
    assert!(error.contains("state directory was copied"), "{error}");
    // The real device was not disturbed.
    assert_eq!(a.status().borrow().state, TunnelState::Connected);
    let listed = platform.devices().await.unwrap();
    assert!(listed[0].superseded_seen_at.is_some());
    b.shutdown().await;
    a.shutdown().await;
    platform.shutdown().await;
}

/// Copies a state directory, as someone cloning a gateway's disk would.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "tetherd.lock" || !entry.file_type().unwrap().is_file() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(name)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_does_not_run_without_its_control_stream() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let mut events = platform.events();
    let agent = Agent::start(config(&state)).await.unwrap();
    connected(&agent).await;
    online(&platform, &id).await;
    let first = agent.status().borrow().connects;
    assert!(platform.reset_control_stream(&id));
    // The device closes the tunnel and connects again, with a new control
    // stream (heartbeats flow on the new tunnel).
    let mut status = agent.status();
    tokio::time::timeout(
        patience(),
        status.wait_for(|s| s.connects > first && s.state == TunnelState::Connected),
    )
    .await
    .expect("reconnected after the control stream ended")
    .unwrap();
    tokio::time::timeout(patience(), async {
        loop {
            if let PlatformEvent::Heartbeat { device_id, .. } = events.recv().await.unwrap()
                && device_id == id
                && platform.devices().await.unwrap()[0].online
            {
                return;
            }
        }
    })
    .await
    .expect("heartbeats on the new tunnel");
    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_told_so_and_retries_slowly() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let mut config = config(&state);
    config.reconnect.slow_delay = Duration::from_secs(3600);
    let agent = Agent::start(config).await.unwrap();
    connected(&agent).await;
    online(&platform, &id).await;
    assert!(platform.revoke(&id).await.unwrap());
    let s = reaches(&agent, TunnelState::Backoff).await;
    let error = s.last_error.unwrap_or_default();
    assert!(error.contains("revoked"), "{error}");
    assert!(error.contains("re-enroll"), "{error}");
    let next = s.next_attempt_at.unwrap();
    assert!(
        next >= tether_agent::Clock::system().now_unix() + 3000,
        "not a slow retry"
    );
    let attempts = agent.status().borrow().attempts;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        agent.status().borrow().attempts,
        attempts,
        "retrying in a loop"
    );
    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_with_another_ca_is_refused_by_a_running_agent() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    enrolled(&platform, &state).await;
    // A second platform with its own CA takes the enrolled address's place.
    let other = Platform::start(tether_platform::PlatformConfig::new(
        dir.path().join("other"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let store = StateDir::new(&state);
    let mut identity = store.load().unwrap().unwrap();
    identity.tunnel_url = format!("wss://localhost:{}/v1/tunnel", other.local_addr().port());
    std::fs::write(
        store.identity_path(),
        serde_json::to_vec(&identity).unwrap(),
    )
    .unwrap();

    let mut config = config(&state);
    config.reconnect.slow_delay = Duration::from_secs(3600);
    let agent = Agent::start(config).await.unwrap();
    let s = reaches(&agent, TunnelState::Backoff).await;
    let error = s.last_error.unwrap_or_default();
    assert!(
        error.contains("not the one this device enrolled with"),
        "{error}"
    );
    assert_eq!(s.connects, 0);
    assert!(s.next_attempt_at.unwrap() >= tether_agent::Clock::system().now_unix() + 3000);
    agent.shutdown().await;
    other.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherd_run_speaks_systemds_notify_protocol_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    enrolled(&platform, &state).await;
    let config_path = dir.path().join("tetherd.toml");
    let write_config = |level: &str, heartbeat: &str| {
        std::fs::write(
            &config_path,
            format!(
                "state_dir = {:?}\nheartbeat_interval = {heartbeat:?}\nlog_level = {level:?}\n",
                state.to_str().unwrap()
            ),
        )
        .unwrap();
    };
    write_config("info", "1s");
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tetherd"))
        .args(["run", "--config", config_path.to_str().unwrap()])
        .env_remove("JOURNAL_STREAM")
        .env_remove("TETHERD_LOG")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let socket = std::sync::Arc::new(socket);
    let next = |socket: std::sync::Arc<std::os::unix::net::UnixDatagram>| async move {
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 4096];
            let n = socket.recv(&mut buf).expect("a notification within 20 s");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .await
        .unwrap()
    };
    // READY once started, the tunnel's state as it changes, the watchdog
    // fed every half second.
    let mut seen = Vec::new();
    let mut watchdogs = 0;
    while !(seen
        .iter()
        .any(|m: &String| m.starts_with("READY=1\nSTATUS=tunnel"))
        && seen.iter().any(|m| m.contains("STATUS=tunnel connected"))
        && watchdogs >= 3)
    {
        let message = next(socket.clone()).await;
        if message == "WATCHDOG=1" {
            watchdogs += 1;
        }
        seen.push(message);
        assert!(seen.len() < 200, "{seen:?}");
    }
    // SIGHUP: the log level changes at once, the heartbeat needs a restart.
    write_config("debug", "2s");
    signal(&child, "HUP").await;
    let mut reloading = false;
    loop {
        let message = next(socket.clone()).await;
        if message.starts_with("RELOADING=1\nMONOTONIC_USEC=") {
            reloading = true;
        } else if reloading && message.starts_with("READY=1") {
            break;
        }
    }
    signal(&child, "TERM").await;
    loop {
        if next(socket.clone()).await == "STOPPING=1" {
            break;
        }
    }
    let (code, stderr) = stopped(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("log level changed"), "{stderr}");
    assert!(
        stderr.contains("take effect only after a restart")
            && stderr.contains("heartbeat_interval"),
        "{stderr}"
    );
    assert!(
        stderr.contains("DEBUG"),
        "debug lines after the reload: {stderr}"
    );
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherd_run_connects_and_stops_on_sigterm_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let config_path = dir.path().join("tetherd.toml");
    std::fs::write(
        &config_path,
        format!(
            "state_dir = {:?}\nheartbeat_interval = \"1s\"\nlog_level = \"debug\"\n\n[[service]]\nname = \"ssh\"\ntarget = \"127.0.0.1:9\"\n",
            state.to_str().unwrap()
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tetherd"))
        .args(["run", "--config", config_path.to_str().unwrap()])
        .env_remove("JOURNAL_STREAM")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    online(&platform, &id).await;
    let (code, out, _) =
        tetherd(&["status", "--state-dir", state.to_str().unwrap(), "--json"]).await;
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["daemon"]["running"], true, "{out}");
    assert_eq!(report["daemon"]["pid"], child.id().unwrap());

    signal(&child, "TERM").await;
    let (code, stderr) = stopped(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(
        !stderr.contains("BEGIN"),
        "key or certificate material in the log"
    );
    platform.shutdown().await;
}

#[tokio::test]
async fn tetherd_run_reports_every_config_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "colour = \"blue\"\nheartbeat_interval = \"soon\"\n[[service]]\nname = \"a b\"\ntarget = \"x\"\n").unwrap();
    let (code, _, err) = tetherd(&["run", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 78, "{err}");
    for key in [
        "'colour'",
        "'heartbeat_interval'",
        "'service[0].name'",
        "'service[0].target'",
    ] {
        assert!(err.contains(key), "{key} missing: {err}");
    }
    let (code, _, err) = tetherd(&[
        "run",
        "--state-dir",
        dir.path().join("empty").to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("not enrolled"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_device_certificate_is_reported_and_retried_slowly() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    enrolled(&platform, &state).await;
    let mut config = config(&state);
    config.reconnect.slow_delay = Duration::from_secs(3600);
    // Certificates last 30 days; this device's clock reads 40 days on.
    config.clock = tether_agent::Clock::with_offset(40 * 86_400);
    let agent = Agent::start(config).await.unwrap();
    let s = reaches(&agent, TunnelState::Backoff).await;
    let error = s.last_error.unwrap_or_default();
    assert!(error.contains("device certificate expired"), "{error}");
    assert!(error.contains("re-enroll"), "{error}");
    assert_eq!(s.connects, 0);
    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    enrolled(&platform, &state).await;
    let config = config(&state);
    let first = Agent::start(config.clone()).await.unwrap();
    connected(&first).await;

    let err = Agent::start(config.clone()).await.unwrap_err();
    assert!(
        matches!(err, tether_agent::AgentError::AlreadyRunning(_)),
        "{err}"
    );
    assert!(
        err.to_string().contains("another tetherd already runs"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 75);
    // The refused start did not disturb the running agent.
    assert_eq!(first.status().borrow().state, TunnelState::Connected);

    first.shutdown().await;
    let again = Agent::start(config)
        .await
        .expect("the lock is free once the first stops");
    connected(&again).await;
    again.shutdown().await;
    platform.shutdown().await;
}

/// Sends `signal` (`TERM`, `HUP`, ...) to the child.
async fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
}

/// Waits (up to 10 s) for the child to stop; its exit code and stderr.
async fn stopped(mut child: tokio::process::Child) -> (Option<i32>, String) {
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("tetherd stops within 10 s")
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    (status.code(), stderr)
}

#[tokio::test]
async fn tetherd_run_logs_one_json_object_per_line_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("never-enrolled");
    let (code, _, err) = tetherd(&[
        "run",
        "--state-dir",
        state.to_str().unwrap(),
        "--log-format",
        "json",
    ])
    .await;
    assert_ne!(code, 0, "an unenrolled agent does not start: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!lines.is_empty(), "{err}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    let (code, _, err) = tetherd(&["run", "--log-format", "xml"]).await;
    assert_eq!(code, 64, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_the_devices_health_and_the_platform_keeps_the_last_hour() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let agent = Agent::start(config(&state)).await.unwrap();
    connected(&agent).await;
    let device = eventually("three heartbeats with health figures", || async {
        let device = platform
            .devices()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.id == id)?;
        (device.history.len() >= 3).then_some(device)
    })
    .await;
    let health = device.health.expect("the last heartbeat's figures");
    assert!(health.cpus >= 1);
    assert!(health.memory_total > 0 && health.memory_used > 0);
    assert!(health.disk_total > 0);
    assert!(health.uptime_secs > 0);
    // The agent runs in this test process: its memory is ours.
    assert!(health.agent.rss_bytes > 1 << 20, "{health:?}");
    assert_eq!(health.node_red, None, "no Node-RED launched");
    let points = &device.history;
    assert!(points.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(points.iter().all(|p| p.agent_rss > 0 && p.memory > 0.0));
    let text = tether_platform::cli::device_text(
        &platform
            .devices()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.id == id)
            .unwrap(),
        tether_agent::Clock::system().now_unix(),
    );
    assert!(text.contains("cores, load"), "{text}");
    assert!(text.contains("last hour"), "{text}");
    agent.shutdown().await;
    platform.shutdown().await;
}
