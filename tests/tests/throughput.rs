//! Bulk bytes through a device's TCP service, both directions at once,
//! checked by SHA-256 at both ends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether_agent::Agent;

/// 256 MiB each way, in every build: an unoptimized one (what `cargo test
/// --workspace` makes) moved both at once in about 7 s on a 2-core machine
/// (about 38 MiB/s per direction), well inside the bound below.
const TOTAL: usize = 256 * 1024 * 1024;

/// What may be spent on the transfer before the test fails.
const TRANSFER_BOUND: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_a_tcp_service_intact_in_both_directions_at_once() {
    const UP_SEED: u64 = 0x7e7e_0001;
    const DOWN_SEED: u64 = 0x7e7e_0002;
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let id = enrolled(&platform, &state).await.identity.device_id;
    let (server, mut served) = hash_server(DOWN_SEED, TOTAL).await;
    let agent = Agent::start(with_service(agent_config(&state), "bulk", server))
        .await
        .unwrap();
    connected(&agent).await;
    online(&platform, &id).await;

    let started = Instant::now();
    let stream = platform
        .open_tcp(&id, "bulk")
        .await
        .expect("the allow-listed service is accepted");
    let (rd, wr) = tokio::io::split(stream);
    let upload = tokio::spawn(send_stream(wr, UP_SEED, TOTAL));
    let download = tokio::spawn(hash_stream(rd));
    let (sent_up, (received_down, received_down_sha256), served) =
        tokio::time::timeout(TRANSFER_BOUND, async {
            let sent_up = upload.await.expect("upload task");
            let received = download.await.expect("download task");
            let served = served.recv().await.expect("the server reports");
            (sent_up, received, served)
        })
        .await
        .unwrap_or_else(|_| panic!("{} MiB each way took over {TRANSFER_BOUND:?}", TOTAL >> 20));
    let took = started.elapsed();
    eprintln!(
        "{} MiB each way, at once, in {took:.2?} ({:.1} MiB/s per direction)",
        TOTAL >> 20,
        (TOTAL >> 20) as f64 / took.as_secs_f64()
    );

    // Platform to service.
    assert_eq!(served.received, TOTAL, "bytes lost or added on the way up");
    assert_eq!(
        served.received_sha256.as_ref(),
        sent_up.as_ref(),
        "bytes changed on the way up"
    );
    // Service to platform.
    assert_eq!(received_down, TOTAL, "bytes lost or added on the way down");
    assert_eq!(
        received_down_sha256.as_ref(),
        served.sent_sha256.as_ref(),
        "bytes changed on the way down"
    );
    // Both ends sent what the generator makes, and the two directions
    // carried different streams.
    assert_eq!(sent_up.as_ref(), expected_sha256(UP_SEED, TOTAL).as_ref());
    assert_eq!(
        served.sent_sha256.as_ref(),
        expected_sha256(DOWN_SEED, TOTAL).as_ref()
    );
    assert_ne!(sent_up.as_ref(), served.sent_sha256.as_ref());

    // The tunnel carried it without reconnecting.
    let status = agent.status().borrow().clone();
    assert_eq!(status.connects, 1, "{status:?}");
    agent.shutdown().await;
    platform.shutdown().await;
}
