//! Two peers talking over a real tunnel: a platform and a device on
//! 127.0.0.1, TLS (rustls, ring) and a WebSocket, speaking tether-proto.
//!
//! `cargo run --release -p tether-proto --features tokio --example demo`
//!
//! The platform serves one service, `tcp:echo`, and refuses every other. The
//! device checks the handshake and the round trip, echoes a greeting, is
//! refused a service it is not allowed, moves 8 streams of 8 MiB at once and
//! verifies every byte, then shuts the tunnel down gracefully.
// Measuring wall time is the point here; the clock ban is for the library.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use tether_proto::{CloseCode, Config, Role, Service, ServiceHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const STREAMS: u32 = 8;
const STREAM_BYTES: usize = 8 * 1024 * 1024;

#[tokio::main]
async fn main() {
    let tls = common::tls();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local address");
    println!(
        "platform  listening on wss://{addr}/v1/tunnel (self-signed certificate for 'localhost')"
    );

    let acceptor = tls.acceptor.clone();
    let platform = tokio::spawn(async move {
        let (tunnel, driver) =
            common::accept_platform(&listener, &acceptor, Config::new(Role::Platform)).await;
        let served = common::serve_echo(tunnel).await;
        (served, driver.await.expect("platform driver task"))
    });

    let (device, device_driver) =
        common::connect_device(addr, &tls.connector, Config::new(Role::Device)).await;
    let peer = device.connected().await.expect("handshake");
    println!(
        "device    connected: protocol {}.{}, peer role {:?}, peer window {} KiB per stream",
        peer.major,
        peer.minor,
        peer.role,
        peer.settings.initial_stream_window / 1024
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Some(rtt) = device.rtt() {
        println!("device    round trip measured by PING: {rtt:?}");
    }

    let mut echo = device
        .open(ServiceHeader::new(Service::Tcp("echo".into())))
        .expect("open echo");
    echo.write_all(b"hello from the device")
        .await
        .expect("write");
    echo.shutdown().await.expect("half-close");
    let mut back = String::new();
    echo.read_to_string(&mut back).await.expect("read echo");
    println!("device    tcp:echo answered {back:?}");

    let ssh = device
        .open(ServiceHeader::new(Service::Tcp("ssh".into())))
        .expect("open ssh");
    match ssh.accepted().await {
        Err(error) => println!("device    tcp:ssh was refused as it should be: {error}"),
        Ok(()) => println!("device    tcp:ssh was unexpectedly accepted"),
    }

    let start = Instant::now();
    let mut transfers = JoinSet::new();
    for n in 0..STREAMS {
        let stream = device
            .open(ServiceHeader::new(Service::Tcp("echo".into())).with("transfer", n.to_string()))
            .expect("open transfer");
        transfers.spawn(async move {
            let data = common::pattern(n, STREAM_BYTES);
            let (mut rd, mut wr) = tokio::io::split(stream);
            let writer = tokio::spawn(async move {
                wr.write_all(&data).await.expect("write");
                wr.shutdown().await.expect("half-close");
                data
            });
            let mut echoed = Vec::with_capacity(STREAM_BYTES);
            rd.read_to_end(&mut echoed).await.expect("read");
            writer.await.expect("writer") == echoed
        });
    }
    let mut intact = 0;
    while let Some(ok) = transfers.join_next().await {
        intact += usize::from(ok.expect("transfer task"));
    }
    let secs = start.elapsed().as_secs_f64();
    let moved = 2.0 * f64::from(STREAMS) * STREAM_BYTES as f64;
    println!(
        "device    {STREAMS} streams of {} MiB echoed at once: {intact}/{STREAMS} intact, {:.0} MiB/s both ways",
        STREAM_BYTES >> 20,
        moved / secs / (1 << 20) as f64
    );

    let stats = device.stats();
    println!(
        "device    sent {} frames ({} MiB), received {} frames",
        stats.frames_sent,
        stats.bytes_sent >> 20,
        stats.frames_received
    );
    device.shutdown(CloseCode::NO_ERROR, "demo finished");
    let reason = device.closed().await;
    println!("device    tunnel closed: {reason}");
    let device_end = device_driver.await.expect("device driver task");
    let (served, platform_end) = platform.await.expect("platform task");
    println!(
        "platform  served {served} echo streams; drivers ended cleanly: {}",
        device_end.is_ok() && platform_end.is_ok()
    );
    if intact != STREAMS as usize || device_end.is_err() || platform_end.is_err() {
        std::process::exit(1);
    }
}
