//! Enrollment against the real platform: through the `tetherd` binary (exit
//! codes, one-line messages, file modes) and through the library (an
//! injected clock far off).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use tether_agent::Clock;
use tether_agent::enroll::{EnrollError, enroll};
use tether_agent::identity::StateDir;
use tether_platform::TokenSpec;
use tether_proto::api::Secret;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn one_line(stderr: &str) -> &str {
    let trimmed = stderr.trim_end();
    assert!(!trimmed.contains('\n'), "more than one line: {stderr:?}");
    trimmed
}

#[tokio::test]
async fn enroll_through_the_binary_stores_a_private_key_and_status_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();

    let (code, out, _) = tetherd(&["status", "--state-dir", state_arg, "--json"]).await;
    assert_eq!(code, 0);
    let before: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(before["enrolled"], false);
    assert_eq!(before["daemon"]["running"], false);

    let token = token(&platform).await;
    let ca = platform.ca_path();
    let (code, out, err) = tetherd(&[
        "enroll",
        "--platform",
        &platform.url(),
        "--token",
        token.expose(),
        "--ca",
        ca.to_str().unwrap(),
        "--state-dir",
        state_arg,
        "--name",
        "press-7",
    ])
    .await;
    assert_eq!(code, 0, "stdout {out} stderr {err}");
    assert!(out.starts_with("enrolled as dev_"), "{out}");
    assert!(!out.contains(token.expose()) && !err.contains(token.expose()));

    let identity = StateDir::new(&state)
        .load()
        .unwrap()
        .expect("identity stored");
    assert_eq!(identity.name, "press-7");
    assert_eq!(mode(&state.join(&identity.key_file)), 0o600);
    assert_eq!(mode(&state), 0o700);
    assert!(state.join("ca.crt").exists());
    assert!(state.join(&identity.cert_file).exists());
    let key = std::fs::read_to_string(state.join(&identity.key_file)).unwrap();
    assert!(key.contains("PRIVATE KEY"));

    let devices = platform.devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id, identity.device_id);

    let (code, out, _) = tetherd(&["status", "--state-dir", state_arg, "--json"]).await;
    assert_eq!(code, 0);
    let after: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(after["enrolled"], true);
    assert_eq!(after["device_id"], identity.device_id.as_str());
    assert_eq!(after["daemon"]["running"], false);
    assert!(after["cert_not_after"].as_u64().unwrap() > 0);

    // A second enrollment is refused without --force, before the token is
    // spent.
    let token2 = common::token(&platform).await;
    let args = [
        "enroll",
        "--platform",
        &platform.url(),
        "--token",
        token2.expose(),
        "--ca",
        ca.to_str().unwrap(),
        "--state-dir",
        state_arg,
    ];
    let (code, _, err) = tetherd(&args).await;
    assert_eq!(code, 73, "{err}");
    assert!(one_line(&err).contains("--force"), "{err}");
    let mut forced = args.to_vec();
    forced.push("--force");
    let (code, _, err) = tetherd(&forced).await;
    assert_eq!(code, 0, "{err}");
    let replaced = StateDir::new(&state).load().unwrap().unwrap();
    assert_ne!(replaced.device_id, identity.device_id);
    assert!(!state.join(&identity.key_file).exists() || identity.key_file != replaced.key_file);
    platform.shutdown().await;
}

async fn enroll_with(
    platform: &tether_platform::Platform,
    token: &str,
    state: &std::path::Path,
) -> (i32, String) {
    let ca = platform.ca_path();
    let (code, _, err) = tetherd(&[
        "enroll",
        "--platform",
        &platform.url(),
        "--token",
        token,
        "--ca",
        ca.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ])
    .await;
    (code, err)
}

#[tokio::test]
async fn rejected_tokens_give_one_line_and_exit_65() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;

    let used = token(&platform).await;
    let (code, err) = enroll_with(&platform, used.expose(), &dir.path().join("a")).await;
    assert_eq!(code, 0, "{err}");
    let (code, err) = enroll_with(&platform, used.expose(), &dir.path().join("b")).await;
    assert_eq!(code, 65);
    assert!(one_line(&err).contains("already used"), "{err}");
    assert!(err.contains("help: "), "{err}");

    let unknown = format!("tpt_{}", "0".repeat(64));
    let (code, err) = enroll_with(&platform, &unknown, &dir.path().join("c")).await;
    assert_eq!(code, 65);
    assert!(
        one_line(&err).contains("does not know this provisioning token"),
        "{err}"
    );

    let (code, err) = enroll_with(&platform, "tpt_not-a-token", &dir.path().join("d")).await;
    assert_eq!(code, 65);
    assert!(one_line(&err).contains("malformed"), "{err}");
    assert!(
        !err.contains("tpt_not-a-token"),
        "the token is echoed: {err}"
    );

    let short = platform
        .create_token(TokenSpec {
            ttl: Duration::from_secs(1),
            ..TokenSpec::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, err) = enroll_with(&platform, short.expose(), &dir.path().join("e")).await;
    assert_eq!(code, 65, "{err}");
    assert!(one_line(&err).contains("expired"), "{err}");
    platform.shutdown().await;
}

#[tokio::test]
async fn a_platform_that_does_not_match_the_ca_file_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let foreign = dir.path().join("foreign.pem");
    foreign_ca(&foreign);
    let token = token(&platform).await;
    let (code, _, err) = tetherd(&[
        "enroll",
        "--platform",
        &platform.url(),
        "--token",
        token.expose(),
        "--ca",
        foreign.to_str().unwrap(),
        "--state-dir",
        dir.path().join("s").to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 77, "{err}");
    assert!(one_line(&err).contains("not trusted"), "{err}");
    assert!(err.contains("--ca"), "{err}");
    // The token was not spent: the handshake failed before the request.
    let ok = enroll(&options(&platform, token, &dir.path().join("t"))).await;
    assert!(ok.is_ok(), "{ok:?}");
    platform.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_platform_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let foreign = dir.path().join("ca.pem");
    foreign_ca(&foreign);
    let token = format!("tpt_{}", "1".repeat(64));
    let (code, _, err) = tetherd(&[
        "enroll",
        "--platform",
        &format!("https://127.0.0.1:{port}"),
        "--token",
        &token,
        "--ca",
        foreign.to_str().unwrap(),
        "--state-dir",
        dir.path().join("s").to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 69, "{err}");
    assert!(one_line(&err).contains("unreachable"), "{err}");
    let (code, _, err) = tetherd(&["enroll", "--platform", "http://x", "--token", &token]).await;
    assert_eq!(code, 64, "{err}");
}

#[tokio::test]
async fn a_device_clock_far_off_is_named_with_what_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    for (offset, words) in [(2 * 365 * 86_400i64, "ahead"), (-86_400, "behind")] {
        let token = token(&platform).await;
        let mut options = options(&platform, token, &dir.path().join(format!("s{offset}")));
        options.clock = Clock::with_offset(offset);
        let err = enroll(&options).await.unwrap_err();
        assert!(matches!(err, EnrollError::ClockSkew { .. }), "{err}");
        assert_eq!(err.exit_code(), 78);
        let line = err.to_string();
        let year = tether_agent::clock::rfc3339(options.clock.now_unix())[..4].to_owned();
        assert!(line.contains(&format!("clock reads {year}")), "{line}");
        assert!(line.contains(words), "{line}");
    }
    platform.shutdown().await;
}

#[tokio::test]
async fn an_enrollment_token_in_the_config_enrolls_on_first_run() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let token = token(&platform).await;
    let state = dir.path().join("state");
    let mut config = tether_agent::config::Config::for_state_dir(&state);
    config.platform = Some(platform.url());
    config.ca = Some(platform.ca_path());
    config.provisioning_token = Some(Secret::new(token.expose()));
    let agent = tether_agent::Agent::start(config.clone())
        .await
        .expect("agent enrolls and starts");
    let id = agent.device_id();
    agent.shutdown().await;
    // The second start ignores the (now spent) token.
    let agent = tether_agent::Agent::start(config)
        .await
        .expect("agent starts");
    assert_eq!(agent.device_id(), id);
    agent.shutdown().await;
    platform.shutdown().await;
}

/// A server that answers any request on TLS (certificate for `localhost`,
/// its PEM written to `ca`) with a 200 whose body is `body_len` bytes.
async fn answering_server(ca: &std::path::Path, body_len: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(ca, certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\n\r\n");
        let _ = tls.write_all(head.as_bytes()).await;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(chunk.len());
            if tls.write_all(&chunk[..n]).await.is_err() {
                return; // the client stopped reading: what the test wants
            }
            left -= n;
        }
    });
    port
}

#[tokio::test]
async fn an_enrollment_answer_larger_than_the_limit_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let port = answering_server(&ca, 64 * 1024 * 1024).await;
    let state = dir.path().join("state");
    let mut options = tether_agent::enroll::EnrollOptions::new(
        format!("https://localhost:{port}"),
        Secret::new(format!("tpt_{}", "a".repeat(64))),
        &state,
    );
    options.ca = Some(ca);
    let err = enroll(&options).await.unwrap_err();
    assert!(matches!(err, EnrollError::Protocol(_)), "{err}");
    assert!(
        err.to_string().contains("reading the answer failed"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 76);
    assert!(
        StateDir::new(&state).load().unwrap().is_none(),
        "no identity from a refused answer"
    );
}
