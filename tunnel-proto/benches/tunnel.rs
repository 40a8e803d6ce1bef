//! The tunnel over a real loopback WebSocket with TLS, against plain TLS.
//!
//! `cargo bench -p tether-proto --features tokio --bench tunnel`
//!
//! Each end runs on its own single-threaded runtime and OS thread, as the
//! agent and the platform run in their own processes. Prints, for one bulk
//! stream of `TETHER_BENCH_MIB` MiB (default 1024): Gbit/s and CPU-seconds
//! per GiB (both ends together) for a plain rustls TLS TCP copy and for the
//! same bytes through the tunnel, measured alternately in this process, and
//! their ratio (budget: the tunnel reaches at least 0.8 of plain TLS). Then
//! the round trip of 64-byte messages on one stream while another stream
//! pushes bulk data (budget: p99 under 5 ms), with the idle round trip for
//! reference. With `TETHER_BENCH_PROFILE=1` it runs one tunnel transfer
//! only, for a profiler.
// Measuring wall time is the point here; the clock ban is for the library.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tether_proto::{Config, Role, Service, ServiceHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;
const ROUNDS: usize = 5;
const PINGS: usize = 2000;

fn main() {
    let mib: usize = std::env::var("TETHER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes = mib * 1024 * 1024;
    if std::env::var_os("TETHER_BENCH_PROFILE").is_some() {
        // One tunnel transfer and nothing else, for a profiler.
        let f = measure(bytes, || tunnel_copy(bytes));
        println!(
            "tunnel: {:.2} Gbit/s, {:.2} CPU-s per GiB",
            f.gbits, f.cpu_per_gib
        );
        return;
    }
    let (plain, tunnel) = alternate(bytes, || plain_tls_copy(bytes), || tunnel_copy(bytes));
    println!("bulk transfer, one stream, {mib} MiB, median of {ROUNDS} alternating runs");
    println!("each end on its own thread and single-threaded runtime (as two processes)");
    println!("  {:<24} {:>8} {:>14}", "", "Gbit/s", "CPU-s per GiB");
    print_comparison(plain, tunnel, " (budget >= 0.80)");

    shared_runtime_bulk(bytes);

    let idle = ping_pong(false);
    let loaded = ping_pong(true);
    println!("64-byte round trips on one stream, {PINGS} each");
    println!(
        "  idle tunnel:            p50 {:>8.1} us  p99 {:>8.1} us",
        idle.0, idle.1
    );
    println!(
        "  beside a bulk stream:   p50 {:>8.1} us  p99 {:>8.1} us (budget p99 < 5000 us)",
        loaded.0, loaded.1
    );
}

/// The same comparison with both ends on one two-worker runtime (four busy
/// tasks on two threads for the tunnel, two for plain TLS), for reference.
fn shared_runtime_bulk(bytes: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (plain, tunnel) = alternate(
        bytes,
        || {
            runtime
                .block_on(runtime.spawn(shared_plain(bytes)))
                .expect("task")
        },
        || {
            runtime
                .block_on(runtime.spawn(shared_tunnel(bytes)))
                .expect("task")
        },
    );
    println!("same, both ends on one 2-worker runtime");
    print_comparison(plain, tunnel, "");
}

async fn shared_plain(bytes: usize) {
    let tls = common::tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tls.acceptor.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        tcp.set_nodelay(true).expect("nodelay");
        read_all(acceptor.accept(tcp).await.expect("tls accept")).await
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from("localhost").expect("name");
    let mut stream = tls.connector.connect(name, tcp).await.expect("tls connect");
    write_bulk(&mut stream, bytes).await;
    assert_eq!(server.await.expect("server"), bytes);
}

async fn shared_tunnel(bytes: usize) {
    let (device, platform) = common::configs();
    let (device, platform, _drivers) = common::tunnel_pair(device, platform).await;
    let server = tokio::spawn(async move {
        let (stream, _) = platform.accept().await.expect("incoming stream");
        read_all(stream).await
    });
    let mut stream = device
        .open(ServiceHeader::new(Service::Tcp("sink".into())))
        .expect("open");
    write_bulk(&mut stream, bytes).await;
    assert_eq!(server.await.expect("server"), bytes);
}

/// Runs `plain` and `tunnel` alternately, [`ROUNDS`] times each; returns
/// their medians.
fn alternate(bytes: usize, plain: impl Fn(), tunnel: impl Fn()) -> (Figures, Figures) {
    let (mut p, mut t) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        p.push(measure(bytes, &plain));
        t.push(measure(bytes, &tunnel));
    }
    (median(p), median(t))
}

fn print_comparison(plain: Figures, tunnel: Figures, budget: &str) {
    for (name, f) in [("plain TLS over TCP", plain), ("tunnel (WS + TLS)", tunnel)] {
        println!("  {name:<24} {:>8.2} {:>14.2}", f.gbits, f.cpu_per_gib);
    }
    println!(
        "  ratio tunnel / plain TLS: {:.2}{budget}",
        tunnel.gbits / plain.gbits
    );
}

#[derive(Clone, Copy)]
struct Figures {
    gbits: f64,
    cpu_per_gib: f64,
}

fn median(mut runs: Vec<Figures>) -> Figures {
    runs.sort_by(|a, b| a.gbits.total_cmp(&b.gbits));
    runs[runs.len() / 2]
}

fn measure(bytes: usize, run: impl FnOnce()) -> Figures {
    let cpu = cpu_seconds();
    let start = Instant::now();
    run();
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Figures {
        gbits: bytes as f64 * 8.0 / wall / 1e9,
        cpu_per_gib: cpu / gib,
    }
}

/// User plus system CPU time of this process (both ends run here).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Runs the server end on its own thread and runtime, and the client end on
/// this thread's, like two processes. The server gets a bound listener; the
/// client its address.
fn two_ends<S, C, SF, CF, T>(server: S, client: C) -> T
where
    S: FnOnce(TcpListener) -> SF + Send + 'static,
    SF: Future<Output = T>,
    C: FnOnce(SocketAddr) -> CF,
    CF: Future<Output = ()>,
    T: Send + 'static,
{
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = std::thread::Builder::new()
        .name("server-end".into())
        .spawn(move || {
            runtime().block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                server(listener).await
            })
        })
        .expect("spawn server thread");
    let addr = addr_rx.recv().expect("server address");
    runtime().block_on(client(addr));
    server.join().expect("server thread")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn write_bulk(writer: &mut (impl AsyncWrite + Unpin), bytes: usize) {
    let chunk = common::pattern(1, CHUNK);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK);
        writer.write_all(&chunk[..n]).await.expect("write");
        left -= n;
    }
    writer.shutdown().await.expect("shutdown");
}

async fn read_all(mut reader: impl AsyncRead + Unpin) -> usize {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).await.expect("read");
        if n == 0 {
            return total;
        }
        total += n;
    }
}

fn plain_tls_copy(bytes: usize) {
    let tls = common::tls();
    let acceptor = tls.acceptor.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let received = two_ends(
        move |listener| async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            tcp.set_nodelay(true).expect("nodelay");
            let received = read_all(acceptor.accept(tcp).await.expect("tls accept")).await;
            done_tx.send(()).expect("done");
            received
        },
        |addr| async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            let name = ServerName::try_from("localhost").expect("name");
            let mut stream = tls.connector.connect(name, tcp).await.expect("tls connect");
            write_bulk(&mut stream, bytes).await;
            // Keep the socket open until the server has read everything:
            // closing it with unread bytes (TLS session tickets) would reset
            // the connection.
            done_rx.await.expect("server done");
        },
    );
    assert_eq!(received, bytes);
}

fn tunnel_copy(bytes: usize) {
    let tls = common::tls();
    let acceptor = tls.acceptor.clone();
    let received = two_ends(
        move |listener| async move {
            let (tunnel, _driver) =
                common::accept_platform(&listener, &acceptor, Config::new(Role::Platform)).await;
            let (stream, _) = tunnel.accept().await.expect("incoming stream");
            read_all(stream).await
        },
        |addr| async move {
            let (tunnel, _driver) =
                common::connect_device(addr, &tls.connector, Config::new(Role::Device)).await;
            let mut stream = tunnel
                .open(ServiceHeader::new(Service::Tcp("sink".into())))
                .expect("open");
            write_bulk(&mut stream, bytes).await;
            drop(stream);
            // Let the last frames leave before this end's runtime stops.
            tunnel.shutdown(tether_proto::CloseCode::NO_ERROR, "done");
            tokio::time::timeout(Duration::from_secs(30), tunnel.closed())
                .await
                .expect("closed");
        },
    );
    assert_eq!(received, bytes);
}

/// p50 and p99 round trip in microseconds of 64-byte messages echoed by the
/// platform, optionally while another stream carries bulk data.
fn ping_pong(with_bulk: bool) -> (f64, f64) {
    let tls = common::tls();
    let acceptor = tls.acceptor.clone();
    let mut samples = Vec::with_capacity(PINGS);
    let samples_out = &mut samples;
    two_ends(
        move |listener| async move {
            let (tunnel, _driver) =
                common::accept_platform(&listener, &acceptor, Config::new(Role::Platform)).await;
            let mut tasks = tokio::task::JoinSet::new();
            while let Some((stream, header)) = tunnel.accept().await {
                tasks.spawn(async move {
                    if header.service == Service::Tcp("echo".into()) {
                        let (mut rd, mut wr) = tokio::io::split(stream);
                        let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    } else {
                        let mut stream = stream;
                        let mut buf = vec![0u8; CHUNK];
                        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                });
            }
        },
        |addr| async move {
            let (tunnel, _driver) =
                common::connect_device(addr, &tls.connector, Config::new(Role::Device)).await;
            let stop = Arc::new(AtomicBool::new(false));
            if with_bulk {
                let mut bulk = tunnel
                    .open(ServiceHeader::new(Service::Tcp("sink".into())))
                    .expect("open bulk");
                let stop = stop.clone();
                tokio::spawn(async move {
                    let chunk = common::pattern(2, CHUNK);
                    while !stop.load(Ordering::Relaxed) {
                        if bulk.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                });
                // Let the bulk stream reach full speed first.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let mut echo = tunnel
                .open(ServiceHeader::new(Service::Tcp("echo".into())))
                .expect("open echo");
            let message = [0x5au8; 64];
            let mut back = [0u8; 64];
            for _ in 0..PINGS {
                let start = Instant::now();
                echo.write_all(&message).await.expect("write");
                echo.read_exact(&mut back).await.expect("read");
                samples_out.push(start.elapsed().as_secs_f64() * 1e6);
            }
            stop.store(true, Ordering::Relaxed);
            tunnel.close(tether_proto::CloseCode::NO_ERROR, "done");
        },
    );
    samples.sort_by(f64::total_cmp);
    (samples[PINGS / 2], samples[PINGS * 99 / 100])
}
