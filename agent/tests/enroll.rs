//! Enrollment against the real platform: through the `tetherd` binary (exit
//! codes, one-line messages, file modes) and through the library (an
//! injected clock far off). The token carries the platform CA's hash, so no
//! test here passes the platform's CA file unless it says why.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use tether_agent::Clock;
use tether_agent::enroll::{EnrollError, enroll};
use tether_agent::identity::StateDir;
use tether_platform::TokenSpec;
use tether_proto::api::ProvisioningToken;

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

    // The token on stdin, no CA file: the token names the CA.
    let token = token(&platform).await;
    let whole = token.expose();
    let (code, out, err) = tetherd_with(
        &[
            "enroll",
            "--platform",
            &platform.url(),
            "--token-stdin",
            "--state-dir",
            state_arg,
            "--name",
            "press-7",
        ],
        &[],
        &format!("{whole}\n"),
    )
    .await;
    assert_eq!(code, 0, "stdout {out} stderr {err}");
    assert!(out.starts_with("enrolled as dev_"), "{out}");
    let secret = token.secret().expose();
    assert!(!out.contains(secret) && !err.contains(secret));

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
    // spent; this time the token comes from TETHER_TOKEN.
    let token2 = common::token(&platform).await;
    let whole2 = token2.expose();
    let env = [("TETHER_TOKEN", whole2.as_str())];
    let args = [
        "enroll",
        "--platform",
        &platform.url(),
        "--state-dir",
        state_arg,
    ];
    let (code, _, err) = tetherd_with(&args, &env, "").await;
    assert_eq!(code, 73, "{err}");
    assert!(one_line(&err).contains("--force"), "{err}");
    let mut forced = args.to_vec();
    forced.push("--force");
    let (code, _, err) = tetherd_with(&forced, &env, "").await;
    assert_eq!(code, 0, "{err}");
    let replaced = StateDir::new(&state).load().unwrap().unwrap();
    assert_ne!(replaced.device_id, identity.device_id);
    assert!(!state.join(&identity.key_file).exists() || identity.key_file != replaced.key_file);
    platform.shutdown().await;
}

/// Enrolls through the binary with `token` in an owner-only token file.
async fn enroll_with(
    platform: &tether_platform::Platform,
    token: &str,
    state: &std::path::Path,
) -> (i32, String) {
    let file = state.with_extension("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = tetherd(&[
        "enroll",
        "--platform",
        &platform.url(),
        "--token-file",
        file.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ])
    .await;
    (code, err)
}

/// A token's id in `token list`: the first 16 hex digits of its secret's
/// SHA-256.
fn token_id(token: &ProvisioningToken) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.secret().expose().as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A whole token for `platform` whose secret it never issued.
fn unknown_token(platform: &tether_platform::Platform) -> ProvisioningToken {
    ProvisioningToken::new(
        &format!("tpt_{}", "0".repeat(64)),
        platform.ca_spki_sha256(),
    )
    .unwrap()
}

#[tokio::test]
async fn rejected_tokens_give_one_line_and_exit_65() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;

    let used = token(&platform).await;
    let (code, err) = enroll_with(&platform, &used.expose(), &dir.path().join("a")).await;
    assert_eq!(code, 0, "{err}");
    let (code, err) = enroll_with(&platform, &used.expose(), &dir.path().join("b")).await;
    assert_eq!(code, 65);
    assert!(one_line(&err).contains("already used"), "{err}");
    assert!(err.contains("help: "), "{err}");

    let unknown = unknown_token(&platform).expose();
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

    // The secret alone, without the CA hash, is not a token.
    let secret_only = token(&platform).await.secret().expose().to_owned();
    let (code, err) = enroll_with(&platform, &secret_only, &dir.path().join("d2")).await;
    assert_eq!(code, 65);
    assert!(one_line(&err).contains("malformed"), "{err}");

    let short = platform
        .create_token(TokenSpec {
            ttl: Some(Duration::from_secs(1)),
            ..TokenSpec::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, err) = enroll_with(&platform, &short.expose(), &dir.path().join("e")).await;
    assert_eq!(code, 65, "{err}");
    assert!(one_line(&err).contains("expired"), "{err}");

    let revoked = token(&platform).await;
    platform.revoke_token(&token_id(&revoked)).await.unwrap();
    let (code, err) = enroll_with(&platform, &revoked.expose(), &dir.path().join("f")).await;
    assert_eq!(code, 65, "{err}");
    assert!(one_line(&err).contains("revoked"), "{err}");
    platform.shutdown().await;
}

/// A token whose CA hash names platform `a` but whose secret platform `b`
/// issued: what a device holds when something other than its platform
/// (trusted by some root the device has) answers at the platform's name.
async fn token_naming_a_for_b(
    a: &tether_platform::Platform,
    b: &tether_platform::Platform,
) -> ProvisioningToken {
    let issued_by_b = token(b).await;
    ProvisioningToken::new(issued_by_b.secret().expose(), a.ca_spki_sha256()).unwrap()
}

#[tokio::test]
async fn a_platform_trusted_by_a_root_but_not_the_tokens_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = platform(&dir.path().join("ours")).await;
    let other = platform(&dir.path().join("other")).await;
    let token = token_naming_a_for_b(&ours, &other).await;
    let whole = token.expose();
    // The other platform's CA is trusted (as the system's roots would trust
    // a publicly trusted certificate), but the token names ours: refused
    // before the request, whether the trusted CA comes as --ca or not.
    let other_ca = other.ca_path();
    let other_url = other.url();
    for with_ca in [true, false] {
        let state = dir.path().join(format!("s-{with_ca}"));
        let mut args = vec!["enroll", "--platform", &other_url, "--token-stdin"];
        args.extend(["--state-dir", state.to_str().unwrap()]);
        if with_ca {
            args.extend(["--ca", other_ca.to_str().unwrap()]);
        }
        let (code, _, err) = tetherd_with(&args, &[], &whole).await;
        assert_eq!(code, 77, "{err}");
        let line = one_line(&err);
        assert!(
            line.contains("not trusted")
                || line.contains("does not hold the CA named by the provisioning token"),
            "{err}"
        );
        assert!(StateDir::new(&state).load().unwrap().is_none());
    }
    // Through the library, without a CA file: the handshake is refused.
    let err = enroll(&options(&other, token.clone(), &dir.path().join("lib")))
        .await
        .unwrap_err();
    assert!(matches!(err, EnrollError::Untrusted { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("CA named by the provisioning token"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 77);
    // Nothing reached the other platform: its token was not spent.
    assert!(other.devices().await.unwrap().is_empty());
    assert_eq!(other.certificates_issued(), 0);
    let genuine = ProvisioningToken::new(token.secret().expose(), other.ca_spki_sha256()).unwrap();
    let ok = enroll(&options(&other, genuine, &dir.path().join("t"))).await;
    assert!(ok.is_ok(), "{ok:?}");
    ours.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn the_token_is_never_read_from_argv_and_a_shared_token_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let token = token(&platform).await;
    let whole = token.expose();
    let url = platform.url();
    let state = dir.path().join("s");
    let state_arg = state.to_str().unwrap();
    let (code, _, err) = tetherd(&[
        "enroll",
        "--platform",
        &url,
        "--token",
        &whole,
        "--state-dir",
        state_arg,
    ])
    .await;
    assert_eq!(code, 64, "{err}");
    let line = one_line(&err);
    assert!(
        line.contains("--token-stdin") && line.contains("--token-file"),
        "{err}"
    );
    assert!(!err.contains(token.secret().expose()), "{err}");

    let file = dir.path().join("token");
    std::fs::write(&file, &whole).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file_arg = file.to_str().unwrap();
    let args = [
        "enroll",
        "--platform",
        &url,
        "--token-file",
        file_arg,
        "--state-dir",
        state_arg,
    ];
    let (code, _, err) = tetherd(&args).await;
    assert_eq!(code, 78, "{err}");
    assert!(one_line(&err).contains("chmod 600"), "{err}");

    // A config holding the token, readable by others, is refused as well.
    let config = dir.path().join("tetherd.toml");
    std::fs::write(
        &config,
        format!("provisioning_token = \"{whole}\"\nplatform = \"{url}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config_arg = config.to_str().unwrap();
    let (code, _, err) =
        tetherd(&["enroll", "--config", config_arg, "--state-dir", state_arg]).await;
    assert_eq!(code, 78, "{err}");
    assert!(one_line(&err).contains("chmod 600"), "{err}");
    assert!(!err.contains(token.secret().expose()), "{err}");
    assert!(
        platform.devices().await.unwrap().is_empty(),
        "no token was spent"
    );

    // Owner-only, the same file is accepted.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = tetherd(&args).await;
    assert_eq!(code, 0, "{err}");
    platform.shutdown().await;
}

#[tokio::test]
async fn a_running_enroll_shows_no_token_in_its_command_line() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let token = token(&platform).await;
    // A listener that accepts and never answers: tetherd blocks in the TLS
    // handshake, so its /proc entry can be read while it runs.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let url = format!("https://127.0.0.1:{port}");
    let state = dir.path().join("s");
    for how in ["--token-stdin", "-", "env"] {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tetherd"));
        command.args(["enroll", "--platform", &url, "--state-dir"]);
        command.arg(&state);
        command
            .env_remove("TETHER_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        match how {
            "env" => {
                command.env("TETHER_TOKEN", token.expose());
            }
            "-" => {
                command.args(["--token", "-"]);
            }
            flag => {
                command.arg(flag);
            }
        }
        let mut child = command.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if how != "env" {
            stdin
                .write_all(format!("{}\n", token.expose()).as_bytes())
                .await
                .unwrap();
        }
        drop(stdin);
        let pid = child.id().unwrap();
        // Connected to the silent listener: the token has been read.
        let wanted = format!(":{port:04X} ");
        eventually("tetherd connects", || {
            let wanted = wanted.clone();
            async move {
                let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
                (tcp.contains(&wanted) && fds > 3).then_some(())
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "tetherd still runs ({how})"
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(text.contains("enroll"), "{text}");
        assert!(
            !text.contains(token.secret().expose()) && !text.contains("tpt_"),
            "{how}: {text}"
        );
        child.kill().await.unwrap();
    }
    held.abort();
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
    let token = format!("tpt_{}.{}", "1".repeat(64), "2".repeat(64));
    let (code, _, err) = tetherd_with(
        &[
            "enroll",
            "--platform",
            &format!("https://127.0.0.1:{port}"),
            "--token-stdin",
            "--state-dir",
            dir.path().join("s").to_str().unwrap(),
        ],
        &[],
        &token,
    )
    .await;
    assert_eq!(code, 69, "{err}");
    assert!(one_line(&err).contains("unreachable"), "{err}");
    let env = [("TETHER_TOKEN", token.as_str())];
    let (code, _, err) = tetherd_with(&["enroll", "--platform", "http://x"], &env, "").await;
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
    config.provisioning_token = Some(token);
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
    let pem = std::fs::read(&ca).unwrap();
    let der: rustls::pki_types::CertificateDer =
        rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
    let pin = tether_agent::tls::spki_sha256(&der).unwrap();
    let mut options = tether_agent::enroll::EnrollOptions::new(
        format!("https://localhost:{port}"),
        ProvisioningToken::new(&format!("tpt_{}", "a".repeat(64)), pin).unwrap(),
        &state,
    );
    // The server sends no CA in its chain: the CA file holds the token's CA.
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

/// A fake platform whose TLS chain ends at `tls_ca` (the token's CA), and
/// that answers an enrollment with a device certificate signed by
/// `signing_ca` and `answer_ca` as the CA to pin.
async fn lying_platform(
    dir: &std::path::Path,
    tls_ca: tether_platform::ca::Ca,
    signing_ca: tether_platform::ca::Ca,
    answer_ca: String,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let identity = tls_ca
        .issue_server(&["localhost".to_string()], dir)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(identity.chain, identity.key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let body_at = loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended early");
            seen.extend_from_slice(&buf[..n]);
            if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&seen[..body_at]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        while seen.len() < body_at + length {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        let request: tether_proto::api::EnrollRequest =
            serde_json::from_slice(&seen[body_at..body_at + length]).unwrap();
        let key = tether_platform::ca::parse_csr(&request.csr).unwrap();
        let device_id = "dev_0123456789abcdef0123";
        let issued = signing_ca
            .issue_device(device_id, &key, Duration::from_secs(86_400))
            .unwrap();
        let answer = tether_proto::api::EnrollResponse {
            device_id: device_id.into(),
            certificate: issued.pem,
            ca: answer_ca,
            tunnel_url: format!("wss://localhost:{port}/v1/tunnel"),
            platform_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            keys: tether_proto::api::PinnedKeys {
                snapshot: "1".repeat(64),
                grant: "2".repeat(64),
            },
        };
        let body = serde_json::to_vec(&answer).unwrap();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = tls.write_all(head.as_bytes()).await;
        let _ = tls.write_all(&body).await;
        let _ = tls.flush().await;
    });
    port
}

#[tokio::test]
async fn an_answer_whose_ca_is_not_the_tokens_or_did_not_issue_the_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        tether_platform::ca::Ca::load_or_create(&path).unwrap()
    };
    let (tokens_ca, other_ca) = (load("tokens-ca"), load("other-ca"));
    let cases = [
        // Signed by the token's CA, but asks the device to pin another CA.
        (
            tokens_ca.clone(),
            other_ca.cert_pem().to_string(),
            "not the CA named by the token",
        ),
        // The token's CA to pin, but the certificate was signed by another.
        (
            other_ca.clone(),
            tokens_ca.cert_pem().to_string(),
            "not issued by the token's CA",
        ),
    ];
    for (i, (signing, answer_ca, says)) in cases.into_iter().enumerate() {
        let served = dir.path().join(format!("served-{i}"));
        std::fs::create_dir_all(&served).unwrap();
        let port = lying_platform(&served, tokens_ca.clone(), signing, answer_ca).await;
        let token =
            ProvisioningToken::new(&format!("tpt_{}", "c".repeat(64)), tokens_ca.spki_sha256())
                .unwrap();
        let state = dir.path().join(format!("state-{i}"));
        let options = tether_agent::enroll::EnrollOptions::new(
            format!("https://localhost:{port}"),
            token,
            &state,
        );
        let err = enroll(&options).await.unwrap_err();
        assert!(matches!(err, EnrollError::Protocol(_)), "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert!(
            StateDir::new(&state).load().unwrap().is_none(),
            "nothing stored from a refused answer"
        );
    }
}
