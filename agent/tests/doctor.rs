//! `tetherd doctor` against a real platform on 127.0.0.1, each failure
//! provoked as it happens in the field: a healthy device passes every
//! check; a clock 10 minutes off, a certificate past its end, a host name
//! that does not resolve, a platform that is down, a platform with another
//! CA in its place, a Node-RED that is not locked down or not running, an
//! unenrolled device and a broken config each fail their own check with
//! what to do. The command line's exit code and JSON are checked too.

mod common;

use std::path::Path;

use common::*;
use tether_agent::Clock;
use tether_agent::config::{Config, NodeRedMode};
use tether_agent::doctor::{self, Check, Options, Verdict};
use tether_agent::identity::StateDir;
use tether_platform::Platform;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn verdict<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
}

fn options(offset_secs: i64) -> Options {
    Options {
        clock: Clock::with_offset(offset_secs),
        min_free: 0,
        warn_free: 0,
    }
}

/// An HTTP server on 127.0.0.1 answering every request with `status`.
async fn answering(status: u16) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tcp.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

fn with_node_red(state: &Path, port: u16) -> Config {
    let mut config = Config::for_state_dir(state);
    config.node_red.mode = NodeRedMode::External;
    config.node_red.port = port;
    config
}

fn set_tunnel_url(state: &Path, url: String) {
    let store = StateDir::new(state);
    let mut identity = store.load().unwrap().unwrap();
    identity.tunnel_url = url;
    std::fs::write(
        store.identity_path(),
        serde_json::to_vec(&identity).unwrap(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    enrolled(&platform, &state).await;

    // Healthy: a locked-down Node-RED (it answers 401 without a token).
    let locked = answering(401).await;
    let config = with_node_red(&state, locked);
    let checks = doctor::run(Ok(&config), &options(0)).await;
    for check in &checks {
        assert!(
            matches!(check.verdict, Verdict::Ok | Verdict::Skip),
            "{}",
            doctor::render(&checks)
        );
    }
    assert_eq!(verdict(&checks, "clock").verdict, Verdict::Ok);
    assert!(verdict(&checks, "platform").detail.contains("mutual TLS"));

    // The device's clock 10 minutes ahead of the platform's.
    let checks = doctor::run(Ok(&config), &options(600)).await;
    let clock = verdict(&checks, "clock");
    assert_eq!(clock.verdict, Verdict::Fail, "{clock:?}");
    assert!(
        clock.detail.contains("ahead of the platform's"),
        "{clock:?}"
    );
    assert!(clock.help.as_deref().unwrap().contains("timedatectl"));

    // A year later: the certificate is past its end.
    let checks = doctor::run(Ok(&config), &options(366 * 86_400)).await;
    let cert = verdict(&checks, "certificate");
    assert_eq!(cert.verdict, Verdict::Fail, "{cert:?}");
    assert!(cert.detail.starts_with("expired at"), "{cert:?}");

    // A Node-RED that answers its admin API without a token, and none.
    let open = answering(200).await;
    let checks = doctor::run(Ok(&with_node_red(&state, open)), &options(0)).await;
    let nr = verdict(&checks, "node-red");
    assert_eq!(nr.verdict, Verdict::Fail);
    assert!(nr.detail.contains("not locked down"), "{nr:?}");
    let nothing = tether_e2e_free_port();
    let checks = doctor::run(Ok(&with_node_red(&state, nothing)), &options(0)).await;
    let nr = verdict(&checks, "node-red");
    assert_eq!(nr.verdict, Verdict::Fail);
    assert!(nr.detail.contains("nothing answers"), "{nr:?}");

    // Another platform, with another CA, in the enrolled one's place.
    let other = Platform::start(tether_platform::PlatformConfig::new(
        dir.path().join("other"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let real = StateDir::new(&state).load().unwrap().unwrap().tunnel_url;
    set_tunnel_url(
        &state,
        format!("wss://localhost:{}/v1/tunnel", other.local_addr().port()),
    );
    let checks = doctor::run(Ok(&config), &options(0)).await;
    let p = verdict(&checks, "platform");
    assert_eq!(p.verdict, Verdict::Fail);
    assert!(p.detail.starts_with("TLS with"), "{p:?}");
    assert_eq!(verdict(&checks, "clock").verdict, Verdict::Skip);
    other.shutdown().await;

    // A host name that does not resolve.
    set_tunnel_url(
        &state,
        "wss://tether-doctor-test.invalid:8443/v1/tunnel".into(),
    );
    let checks = doctor::run(Ok(&config), &options(0)).await;
    let p = verdict(&checks, "platform");
    assert_eq!(p.verdict, Verdict::Fail);
    assert!(p.detail.starts_with("DNS:"), "{p:?}");

    // The platform down.
    set_tunnel_url(&state, real);
    platform.shutdown().await;
    let checks = doctor::run(Ok(&config), &options(0)).await;
    let p = verdict(&checks, "platform");
    assert_eq!(p.verdict, Verdict::Fail);
    assert!(p.detail.starts_with("TCP:"), "{p:?}");
    assert!(p.help.as_deref().unwrap().contains("firewall"));

    // Not enrolled; a config that does not load.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let checks = doctor::run(Ok(&Config::for_state_dir(&empty)), &options(0)).await;
    assert_eq!(verdict(&checks, "identity").verdict, Verdict::Fail);
    assert_eq!(verdict(&checks, "platform").verdict, Verdict::Skip);
    let checks = doctor::run(Err("'colour': unknown key".into()), &options(0)).await;
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].verdict, Verdict::Fail);
}

#[tokio::test]
async fn the_command_exits_1_on_a_failure_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "colour = \"blue\"\n").unwrap();
    let (code, out, _) = tetherd(&["doctor", "--config", bad.to_str().unwrap(), "--json"]).await;
    assert_eq!(code, 1, "{out}");
    let checks: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(checks[0]["name"], "config");
    assert_eq!(checks[0]["verdict"], "fail");
    assert!(checks[0]["detail"].as_str().unwrap().contains("colour"));
    let (code, out, _) = tetherd(&[
        "doctor",
        "--state-dir",
        dir.path().join("none").to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1);
    assert!(out.contains("FAIL identity"), "{out}");
    assert!(out.contains("help: enroll"), "{out}");
}

fn tether_e2e_free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real mosquitto on 127.0.0.1 that accepts only `agent` / `s3cret`.
struct Mosquitto {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn mosquitto_with_login() -> Mosquitto {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["agent", "s3cret"])
        .status()
        .expect("mosquitto_passwd runs (apt-get install mosquitto)");
    assert!(made.success());
    let port = tether_e2e_free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            passwords.display()
        ),
    )
    .unwrap();
    let child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto runs (apt-get install mosquitto)");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Mosquitto {
        child,
        port,
        _dir: dir,
    }
}

#[tokio::test]
async fn the_mqtt_broker_check_names_a_missing_broker_and_a_refused_login() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_state_dir(dir.path());
    let checks = doctor::run(Ok(&config), &options(0)).await;
    assert_eq!(verdict(&checks, "mqtt broker").verdict, Verdict::Skip);

    let broker = mosquitto_with_login().await;
    let mut mqtt = tether_agent::config::MqttConfig {
        broker: format!("127.0.0.1:{}", broker.port),
        username: Some("agent".into()),
        password: Some("s3cret".into()),
        ..Default::default()
    };
    config.mqtt = Some(mqtt.clone());
    let checks = doctor::run(Ok(&config), &options(0)).await;
    let check = verdict(&checks, "mqtt broker");
    assert_eq!(check.verdict, Verdict::Ok, "{check:?}");

    mqtt.password = Some("wrong".into());
    config.mqtt = Some(mqtt.clone());
    let checks = doctor::run(Ok(&config), &options(0)).await;
    let check = verdict(&checks, "mqtt broker");
    assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
    assert!(
        check.detail.contains("refuses the agent's login"),
        "{check:?}"
    );
    assert!(
        !format!("{check:?}").contains("wrong"),
        "the password is never shown"
    );

    drop(broker);
    let checks = doctor::run(Ok(&config), &options(0)).await;
    let check = verdict(&checks, "mqtt broker");
    assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
    assert!(check.detail.contains("nothing answers MQTT"), "{check:?}");
}
