//! `tether-enroll-bench`: what enrollment costs with the token checked
//! before any signing (`docs/benchmarks.md`, "Enrollment").
//!
//! ```sh
//! cargo build --release -p tether-e2e --bins
//! target/release/tether-enroll-bench   # --devices 200 --concurrency 4 --refused 2000 --signs 500
//! ```
//!
//! In one run, against an in-process platform on 127.0.0.1:
//! - `devices` enrollments through the agent library (key pair, CSR, TLS
//!   pinned to the token's CA, the platform's checks, signing, one redb
//!   transaction, the answer's checks), `concurrency` at a time;
//! - `refused` requests with a valid CSR and an unknown token, one after the
//!   other on one kept-alive TLS connection: what an unauthenticated caller
//!   costs the platform now (the CA's issued-certificate counter must not
//!   move);
//! - in process, the work the previous order of checks did for each such
//!   request before looking at the token (parse and verify the CSR, sign a
//!   device certificate), and the read transaction now added to each
//!   enrollment (the early token check).
//!
//! Everything lives in temporary directories; the enrollment rate limit is
//! lifted for the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tether_agent::enroll::{EnrollOptions, csr_pem, enroll};
use tether_platform::ca::{Ca, parse_csr};
use tether_platform::store::{Store, TokenRecord};
use tether_platform::{Platform, PlatformConfig, RateLimit, TokenSpec};
use tether_proto::api::{EnrollRequest, Facts, Secret};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

#[derive(Debug, Parser)]
#[command(name = "tether-enroll-bench")]
struct Args {
    /// Devices to enroll.
    #[arg(long, default_value_t = 200)]
    devices: u32,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Refused (unknown token) requests to send.
    #[arg(long, default_value_t = 2000)]
    refused: u32,
    /// In-process CSR checks and signatures to time.
    #[arg(long, default_value_t = 500)]
    signs: u32,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = PlatformConfig::new(dir.path().join("platform"), "127.0.0.1:0".parse()?);
    config.enroll_rate = RateLimit {
        burst: 1_000_000,
        refill: Duration::from_micros(1),
    };
    let platform = Platform::start(config).await?;

    // Enrollments per second, through the agent library.
    let token = platform
        .create_token(TokenSpec {
            ttl: Some(Duration::from_secs(3600)),
            uses: args.devices,
            team: "bench".into(),
        })
        .await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    let (mut next, mut done) = (0u32, 0u32);
    while done < args.devices {
        while set.len() < args.concurrency && next < args.devices {
            let mut options = EnrollOptions::new(
                platform.url(),
                token.clone(),
                dir.path().join(format!("device-{next}")),
            );
            options.name = Some(format!("bench-{next}"));
            set.spawn(async move { enroll(&options).await });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            joined?.context("an enrollment failed")?;
            done += 1;
        }
    }
    let enroll_secs = started.elapsed().as_secs_f64();
    ensure!(platform.certificates_issued() == u64::from(args.devices));

    // Refused requests: a valid CSR, an unknown token, one connection.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = csr_pem(&key).map_err(anyhow::Error::msg)?;
    let body = serde_json::to_vec(&EnrollRequest {
        token: Secret::new(format!("tpt_{}", "5".repeat(64))),
        csr: csr.clone(),
        name: "bench".into(),
        facts: Facts::default(),
    })?;
    let mut sender = connect(&platform).await?;
    let issued_before = platform.certificates_issued();
    let started = Instant::now();
    let mut connections = 1u32;
    for _ in 0..args.refused {
        if sender.ready().await.is_err() {
            // The platform closes a connection after an error answer.
            sender = connect(&platform).await?;
            connections += 1;
        }
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/enroll")
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone())))?;
        let response = sender.send_request(request).await?;
        ensure!(
            response.status() == StatusCode::FORBIDDEN,
            "{}",
            response.status()
        );
        response.into_body().collect().await?;
    }
    let refused_secs = started.elapsed().as_secs_f64();
    ensure!(
        platform.certificates_issued() == issued_before,
        "a refused request was signed for"
    );
    platform.shutdown().await;

    // In process: what the old order did for a refused request, and what
    // the new order adds to an accepted one.
    let ca_dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(ca_dir.path())?;
    let started = Instant::now();
    for i in 0..args.signs {
        let key = parse_csr(&csr)?;
        ca.issue_device(&format!("dev_{i:020}"), &key, Duration::from_secs(86_400))?;
    }
    let sign_secs = started.elapsed().as_secs_f64() / f64::from(args.signs);
    let store_dir = tempfile::tempdir()?;
    let store = Store::open(store_dir.path())?;
    let hash = "ab".repeat(32);
    store.insert_token(
        &hash,
        &TokenRecord {
            team: "bench".into(),
            created: 0,
            expires_at: u64::MAX,
            uses_left: 1,
            uses: 1,
            revoked: false,
        },
    )?;
    let reads = 10_000u32;
    let started = Instant::now();
    for _ in 0..reads {
        store.check_token(&hash, 1)?;
    }
    let read_secs = started.elapsed().as_secs_f64() / f64::from(reads);

    // Renewal, as the platform's control stream does it: the renewal rules
    // checked (a read), the CSR checked and a certificate signed (timed
    // above), then one write transaction (new certificate current, the
    // previous kept, expired records pruned).
    let device = tether_platform::store::DeviceRecord {
        id: "dev_00000000000000000001".into(),
        name: "bench".into(),
        team: String::new(),
        enrolled_at: 0,
        revoked: false,
        cert_not_after: u64::MAX / 2,
        facts: Facts::default(),
        protected: false,
        certs: Default::default(),
    };
    store.enroll(&hash, 1, device, &"00".repeat(32))?;
    let policy = tether_platform::certs::CertPolicy {
        window: u64::MAX,
        max_per_hour: usize::MAX,
        grace: 3600,
    };
    let renewals = 200u32;
    let mut tunnel_fp = "00".repeat(32);
    let started = Instant::now();
    for i in 0..renewals {
        let next = format!("{:064x}", u64::from(i) + 1);
        store.check_renewal("dev_00000000000000000001", &tunnel_fp, &policy, 10)?;
        store.renew_certificate(
            "dev_00000000000000000001",
            &tunnel_fp,
            &next,
            u64::MAX / 2,
            &policy,
            10,
        )?;
        tunnel_fp = next;
    }
    let renew_store_secs = started.elapsed().as_secs_f64() / f64::from(renewals);

    println!(
        "enrollments: {} in {:.2} s, {:.1}/s ({} at a time; agent and platform in one process)",
        args.devices,
        enroll_secs,
        f64::from(args.devices) / enroll_secs,
        args.concurrency
    );
    println!(
        "refused (unknown token, valid CSR): {} in {:.2} s over {} TLS connections, {:.0}/s, {:.0} us each; certificates signed for them: 0",
        args.refused,
        refused_secs,
        connections,
        f64::from(args.refused) / refused_secs,
        refused_secs / f64::from(args.refused) * 1e6
    );
    println!(
        "work the previous order did first for every request (CSR parse + verify, device certificate signed): {:.0} us",
        sign_secs * 1e6
    );
    println!(
        "added to each enrollment (token read before signing): {:.1} us",
        read_secs * 1e6
    );
    println!(
        "renewal on the platform: rules checked and recorded (one read, one synced write transaction) {:.0} us, plus CSR check and signature {:.0} us = {:.0} us",
        renew_store_secs * 1e6,
        sign_secs * 1e6,
        (renew_store_secs + sign_secs) * 1e6
    );
    Ok(())
}

/// One kept-alive HTTP/1.1 connection to the platform, trusting its CA.
async fn connect(
    platform: &Platform,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let ca = CertificateDer::from_pem_slice(platform.ca_pem().as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(platform.local_addr()).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
