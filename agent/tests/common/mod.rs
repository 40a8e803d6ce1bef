//! Shared helpers for the agent's integration tests: a real platform on
//! 127.0.0.1 port 0 in a temporary directory, tokens, enrollment through the
//! library, and waiting for a condition with a deadline.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tether_agent::enroll::{EnrollOptions, Enrolled, enroll};
use tether_platform::{Platform, PlatformConfig, TokenSpec};
use tether_proto::api::ProvisioningToken;

/// Sends the agent's logs to the test output, filtered by `RUST_LOG`
/// (errors only when it is unset).
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// How long `eventually` waits; `TETHER_TEST_PATIENCE` (seconds) overrides.
pub fn patience() -> Duration {
    std::env::var("TETHER_TEST_PATIENCE")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(20))
}

/// Polls `check` until it returns `Some`, or panics after `patience()`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn platform(dir: &Path) -> Platform {
    Platform::start(PlatformConfig::new(
        dir.join("platform"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .expect("platform starts")
}

pub async fn token(platform: &Platform) -> ProvisioningToken {
    platform
        .create_token(TokenSpec::default())
        .await
        .expect("token")
}

/// Enrollment options: the token names the platform's CA, no CA file.
pub fn options(platform: &Platform, token: ProvisioningToken, state_dir: &Path) -> EnrollOptions {
    let mut options = EnrollOptions::new(platform.url(), token, state_dir);
    options.name = Some("press-7".into());
    options
}

/// Enrolls a device with a fresh token through the library.
pub async fn enrolled(platform: &Platform, state_dir: &Path) -> Enrolled {
    let token = token(platform).await;
    enroll(&options(platform, token, state_dir))
        .await
        .expect("enrollment")
}

/// A self-signed CA that no platform uses, written as PEM.
pub fn foreign_ca(path: &Path) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "someone else's CA");
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(path, cert.pem()).unwrap();
}

/// Runs `tetherd` with `args`; returns exit code, stdout, stderr.
pub async fn tetherd(args: &[&str]) -> (i32, String, String) {
    tetherd_with(args, &[], "").await
}

/// Runs `tetherd` with `args`, the environment variables `env` and `stdin`
/// as its input; returns exit code, stdout, stderr.
pub async fn tetherd_with(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tetherd"))
        .args(args)
        .env_remove("TETHER_TOKEN")
        .env_remove("JOURNAL_STREAM")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tetherd runs");
    let mut input = child.stdin.take().unwrap();
    // tetherd may exit without reading: a broken pipe is fine.
    let _ = input.write_all(stdin.as_bytes()).await;
    drop(input);
    let out = child.wait_with_output().await.expect("tetherd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
