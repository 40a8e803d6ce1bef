//! `tether-bench`: the tunnel through the real agent and the reference
//! platform, measured against a baseline taken in the same run
//! (`docs/benchmarks.md`, "Tunnel through the agent and platform").
//!
//! ```sh
//! cargo build --release -p tether-agent -p tether-platform
//! cargo run --release -p tether-e2e --bin tether-bench -- latency
//! cargo run --release -p tether-e2e --bin tether-bench -- idle
//! cargo run --release -p tether-e2e --bin tether-bench -- fleet
//! ```
//!
//! - `latency`: an in-process platform, a `tetherd` process and in-process
//!   echo and sink services. 64-byte round trips on an open stream, stream
//!   open plus first round trip, and round trips beside a bulk stream, each
//!   against the same on a direct TCP connection, alternating in blocks.
//! - `idle`: `tetherd`'s resident memory after an idle pause, and again
//!   after bulk traffic and another pause.
//! - `fleet`: a `tether-platform serve` process and N in-process agents:
//!   the platform's memory per idle tunnel, then a kill and restart of the
//!   platform and how fast the fleet comes back.
//!
//! `tetherd` and `tether-platform` are taken from the directory of this
//! executable (target/release). Everything listens on 127.0.0.1 and lives
//! in temporary directories removed at the end. Each subcommand prints
//! markdown tables and one `PASS` or `MISS` line per budget.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tether_agent::config::{Config as AgentConfig, ReconnectConfig};
use tether_agent::enroll::{EnrollOptions, enroll};
use tether_agent::{Agent, Clock, TunnelState};
use tether_e2e::bench::{
    Memory, Tetherd, clock_ticks, cpu_secs, free_port, memory, mib, sibling, signal, verdict,
};
use tether_platform::admin::CreateTokenRequest;
use tether_platform::client::AdminClient;
use tether_platform::{Platform, PlatformConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// (a): the tunnel's added p50 on an established stream, µs.
const BUDGET_ADDED_P50_US: f64 = 50.0;
/// (b): p50 of stream open plus first round trip through the tunnel, µs.
const BUDGET_OPEN_P50_US: f64 = 300.0;
/// (c): p99 of round trips beside a bulk stream, µs.
const BUDGET_BULK_P99_US: f64 = 5_000.0;
/// `idle`: `tetherd`'s VmRSS, KiB.
const BUDGET_IDLE_RSS_KIB: u64 = 8 * 1024;
/// `fleet`: the platform's memory per idle tunnel, KiB.
const BUDGET_TUNNEL_KIB: f64 = 64.0;

/// Size of the round-trip message.
const MESSAGE: usize = 64;
/// Bulk writes.
const CHUNK: usize = 64 * 1024;
/// Round trips before measuring, per contender.
const WARMUP: usize = 500;

#[derive(Debug, Parser)]
#[command(
    name = "tether-bench",
    about = "Latency, idle memory and fleet reconnect through tetherd and the reference platform (127.0.0.1 only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Round-trip latency through the tunnel against direct TCP.
    Latency(LatencyArgs),
    /// tetherd's resident memory with an idle tunnel.
    Idle(IdleArgs),
    /// Platform memory per idle tunnel and reconnect after a platform restart.
    Fleet(FleetArgs),
}

#[derive(Debug, Args)]
struct LatencyArgs {
    /// Round trips per contender in (a) and (c).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    round_trips: u32,
    /// Stream opens per contender in (b).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    opens: u32,
    /// Blocks each count is split into, alternating baseline and tunnel.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    blocks: u32,
}

#[derive(Debug, Args)]
struct IdleArgs {
    /// Seconds the tunnel sits idle after it comes up.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=600))]
    idle_secs: u64,
    /// MiB sent each way through the echo service after the first pause.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1024))]
    bulk_mib: u64,
    /// Seconds of idle after the bulk transfer.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=600))]
    pause_secs: u64,
}

#[derive(Debug, Args)]
struct FleetArgs {
    /// Agents (devices) in the fleet.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=5_000))]
    agents: u32,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    enroll_concurrency: u32,
    /// How the platform is stopped before its restart.
    #[arg(long, value_enum, default_value_t = Stop::Kill)]
    stop: Stop,
    /// Seconds to wait for all the tunnels to come up, each time.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(5..=600))]
    timeout_secs: u64,
    /// Seconds the idle tunnels settle before the platform's memory is read.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=120))]
    settle_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Stop {
    /// SIGKILL: a crash; the kernel closes every connection at once.
    Kill,
    /// SIGTERM: a graceful shutdown; the platform closes every tunnel.
    Term,
}

impl Stop {
    fn signal(self) -> &'static str {
        match self {
            Stop::Kill => "KILL",
            Stop::Term => "TERM",
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Bench::Latency(args) => latency(args).await,
        Bench::Idle(args) => idle(args).await,
        Bench::Fleet(args) => fleet(args).await,
    }
}

// --- shared -----------------------------------------------------------------

/// In-process services on 127.0.0.1 for `tetherd` to bridge to: an echo and
/// a sink that counts what it discards.
#[derive(Debug)]
struct Services {
    echo: SocketAddr,
    sink: SocketAddr,
    sunk: Arc<AtomicU64>,
}

async fn start_services() -> Result<Services> {
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let (echo_addr, sink_addr) = (echo.local_addr()?, sink.local_addr()?);
    let sunk = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    let counter = sunk.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = sink.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    Ok(Services {
        echo: echo_addr,
        sink: sink_addr,
        sunk,
    })
}

/// An in-process platform and an enrolled `tetherd` process connected to it,
/// with `echo` and `sink` in its allow-list.
#[derive(Debug)]
struct Tether {
    dir: tempfile::TempDir,
    platform: Platform,
    services: Services,
    agent: Tetherd,
    pid: u32,
    device: String,
}

async fn start_tether() -> Result<Tether> {
    let tetherd = sibling("tetherd")?;
    let services = start_services().await?;
    let dir = tempfile::tempdir()?;
    let config = PlatformConfig::new(dir.path().join("platform"), "127.0.0.1:0".parse()?);
    let platform = Platform::start(config).await?;
    let extra = format!(
        "[[service]]\nname = \"echo\"\ntarget = \"{}\"\n\n\
         [[service]]\nname = \"sink\"\ntarget = \"{}\"\n",
        services.echo, services.sink,
    );
    let agent = Tetherd::start(&tetherd, &platform, dir.path(), &extra).await?;
    Ok(Tether {
        dir,
        platform,
        services,
        pid: agent.pid,
        device: agent.device.clone(),
        agent,
    })
}

impl Tether {
    async fn stop(self) -> Result<()> {
        self.agent.stop(Duration::from_secs(5)).await?;
        self.platform.shutdown().await;
        drop(self.dir);
        Ok(())
    }
}

// --- latency ------------------------------------------------------------------

/// Percentiles of a sample set, µs.
#[derive(Clone, Copy, Debug)]
struct Summary {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn summarize(mut nanos: Vec<u64>) -> Summary {
    nanos.sort_unstable();
    let at = |q: f64| {
        let i = ((nanos.len() - 1) as f64 * q).round() as usize;
        nanos[i] as f64 / 1_000.0
    };
    Summary {
        n: nanos.len(),
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn latency_table(title: &str, rows: [(&str, Summary); 2]) {
    let [(base_name, base), (tunnel_name, tunnel)] = rows;
    println!("\n### {title}\n");
    println!("| | n | p50 µs | p90 µs | p99 µs | max µs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, s) in [(base_name, base), (tunnel_name, tunnel)] {
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.n, s.p50, s.p90, s.p99, s.max
        );
    }
    println!(
        "| added by the tunnel | | {:.1} | {:.1} | {:.1} | {:.1} |",
        tunnel.p50 - base.p50,
        tunnel.p90 - base.p90,
        tunnel.p99 - base.p99,
        tunnel.max - base.max
    );
    println!(
        "| ratio tunnel / baseline | | {:.2} | {:.2} | {:.2} | {:.2} |\n",
        tunnel.p50 / base.p50,
        tunnel.p90 / base.p90,
        tunnel.p99 / base.p99,
        tunnel.max / base.max
    );
}

/// `n` timed round trips of a 64-byte message, appended to `out` (ns).
async fn round_trips<S>(stream: &mut S, n: usize, out: &mut Vec<u64>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let message = [0xa5u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    for _ in 0..n {
        let start = Instant::now();
        stream.write_all(&message).await?;
        stream.read_exact(&mut back).await?;
        out.push(start.elapsed().as_nanos() as u64);
    }
    ensure!(back == message, "the echo returned other bytes");
    Ok(())
}

/// Half-closes and reads to the end (bounded), so the peer has closed too.
async fn close<S>(mut stream: S) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .context("the peer did not close within 5 s")??;
    Ok(())
}

/// Writes 64 KiB chunks as fast as the stream takes them until `stop`.
fn bulk<S>(
    mut stream: S,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()>
where
    S: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let chunk = vec![0x5au8; CHUNK];
        while !stop.load(Ordering::Relaxed) {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
            written.fetch_add(CHUNK as u64, Ordering::Relaxed);
        }
        let _ = stream.shutdown().await;
    })
}

async fn latency(args: LatencyArgs) -> Result<()> {
    let blocks = args.blocks as usize;
    let per_block = (args.round_trips as usize).div_ceil(blocks);
    let opens_per_block = (args.opens as usize).div_ceil(blocks);
    let tether = start_tether().await?;
    let (platform, device, services) = (&tether.platform, &tether.device, &tether.services);
    eprintln!("tetherd pid {} connected as {device}", tether.pid);

    // (a) an established stream.
    let mut direct = TcpStream::connect(services.echo).await?;
    direct.set_nodelay(true)?;
    let mut tunnel = platform.open_tcp(device, "echo").await?;
    let mut scratch = Vec::new();
    round_trips(&mut direct, WARMUP, &mut scratch).await?;
    round_trips(&mut tunnel, WARMUP, &mut scratch).await?;
    let (mut base_a, mut tunnel_a) = (Vec::new(), Vec::new());
    for block in 0..blocks {
        eprintln!("(a) block {}/{blocks}", block + 1);
        if block % 2 == 0 {
            round_trips(&mut direct, per_block, &mut base_a).await?;
            round_trips(&mut tunnel, per_block, &mut tunnel_a).await?;
        } else {
            round_trips(&mut tunnel, per_block, &mut tunnel_a).await?;
            round_trips(&mut direct, per_block, &mut base_a).await?;
        }
    }
    close(direct).await?;
    close(tunnel).await?;

    // (b) stream open plus the first round trip, closing each.
    let (mut base_b, mut tunnel_b) = (Vec::new(), Vec::new());
    for block in 0..blocks {
        eprintln!("(b) block {}/{blocks}", block + 1);
        for contender in [block % 2, (block + 1) % 2] {
            for _ in 0..opens_per_block {
                if contender == 0 {
                    let start = Instant::now();
                    let mut tcp = TcpStream::connect(services.echo).await?;
                    tcp.set_nodelay(true)?;
                    let mut rtt = Vec::with_capacity(1);
                    round_trips(&mut tcp, 1, &mut rtt).await?;
                    base_b.push(start.elapsed().as_nanos() as u64);
                    close(tcp).await?;
                } else {
                    let start = Instant::now();
                    let mut stream = platform.open_tcp(device, "echo").await?;
                    let mut rtt = Vec::with_capacity(1);
                    round_trips(&mut stream, 1, &mut rtt).await?;
                    tunnel_b.push(start.elapsed().as_nanos() as u64);
                    close(stream).await?;
                }
            }
        }
    }

    // (c) (a) beside a bulk stream on the same path: a direct TCP bulk
    // transfer to the sink for the baseline, a tunnel stream to the sink for
    // the tunnel.
    let mut direct = TcpStream::connect(services.echo).await?;
    direct.set_nodelay(true)?;
    let mut tunnel = platform.open_tcp(device, "echo").await?;
    let (mut base_c, mut tunnel_c) = (Vec::new(), Vec::new());
    let (mut base_bytes, mut tunnel_bytes) = (0u64, 0u64);
    let (mut base_time, mut tunnel_time) = (Duration::ZERO, Duration::ZERO);
    for block in 0..blocks {
        eprintln!("(c) block {}/{blocks}", block + 1);
        for contender in [block % 2, (block + 1) % 2] {
            let stop = Arc::new(AtomicBool::new(false));
            let written = Arc::new(AtomicU64::new(0));
            let writer = if contender == 0 {
                let tcp = TcpStream::connect(services.sink).await?;
                bulk(tcp, stop.clone(), written.clone())
            } else {
                let stream = platform.open_tcp(device, "sink").await?;
                bulk(stream, stop.clone(), written.clone())
            };
            // Let the bulk stream fill its buffers first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (before, start) = (written.load(Ordering::Relaxed), Instant::now());
            if contender == 0 {
                round_trips(&mut direct, per_block, &mut base_c).await?;
            } else {
                round_trips(&mut tunnel, per_block, &mut tunnel_c).await?;
            }
            let (bytes, time) = (written.load(Ordering::Relaxed) - before, start.elapsed());
            stop.store(true, Ordering::Relaxed);
            tokio::time::timeout(Duration::from_secs(10), writer)
                .await
                .context("the bulk writer did not stop within 10 s")??;
            if contender == 0 {
                base_bytes += bytes;
                base_time += time;
            } else {
                tunnel_bytes += bytes;
                tunnel_time += time;
            }
        }
    }
    close(direct).await?;
    close(tunnel).await?;
    let sunk = services.sunk.load(Ordering::Relaxed);

    println!(
        "\n## tether-bench latency: {} round trips per contender, {} opens, {blocks} alternating blocks",
        per_block * blocks,
        opens_per_block * blocks
    );
    println!(
        "\nBaseline: the same on a direct TCP connection to the echo service. Tunnel: \
         in-process platform -> TLS WebSocket -> tetherd (pid {}) -> echo service.",
        tether.pid
    );
    let (a_base, a_tunnel) = (summarize(base_a), summarize(tunnel_a));
    latency_table(
        "(a) 64-byte round trip on an established stream",
        [
            ("direct TCP (baseline)", a_base),
            ("tunnel stream", a_tunnel),
        ],
    );
    let (b_base, b_tunnel) = (summarize(base_b), summarize(tunnel_b));
    latency_table(
        "(b) stream open plus first 64-byte round trip",
        [
            ("TCP connect + round trip (baseline)", b_base),
            ("open_tcp + round trip", b_tunnel),
        ],
    );
    let (c_base, c_tunnel) = (summarize(base_c), summarize(tunnel_c));
    latency_table(
        "(c) 64-byte round trip beside a bulk stream on the same path",
        [
            (
                "direct TCP, bulk on a 2nd TCP connection (baseline)",
                c_base,
            ),
            (
                "tunnel stream, bulk on a 2nd stream of the tunnel",
                c_tunnel,
            ),
        ],
    );
    let rate = |bytes: u64, time: Duration| bytes as f64 * 8.0 / time.as_secs_f64().max(1e-9) / 1e9;
    println!(
        "bulk during (c): direct {:.2} Gbit/s, tunnel {:.2} Gbit/s ({:.0} MiB reached the sink in all)\n",
        rate(base_bytes, base_time),
        rate(tunnel_bytes, tunnel_time),
        sunk as f64 / 1048576.0
    );
    let added = a_tunnel.p50 - a_base.p50;
    verdict(
        added < BUDGET_ADDED_P50_US,
        format!("(a) p50 added by the tunnel {added:.1} µs (budget < {BUDGET_ADDED_P50_US} µs)"),
    );
    verdict(
        b_tunnel.p50 < BUDGET_OPEN_P50_US,
        format!(
            "(b) p50 open + first round trip {:.1} µs (budget < {BUDGET_OPEN_P50_US} µs)",
            b_tunnel.p50
        ),
    );
    verdict(
        c_tunnel.p99 < BUDGET_BULK_P99_US,
        format!(
            "(c) p99 beside a bulk stream {:.1} µs (budget < {BUDGET_BULK_P99_US} µs)",
            c_tunnel.p99
        ),
    );
    tether.stop().await
}

// --- idle -------------------------------------------------------------------

async fn idle(args: IdleArgs) -> Result<()> {
    let ticks = clock_ticks().await;
    let mut sleeper = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run sleep")?;
    let tether = start_tether().await?;
    let sleep_memory = memory(sleeper.id().context("sleep exited")?)?;
    let pid = tether.pid;
    let connected = memory(pid)?;
    let cpu0 = cpu_secs(pid, ticks)?;
    eprintln!("tetherd pid {pid} connected; idle for {} s", args.idle_secs);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle1 = memory(pid)?;
    let cpu1 = cpu_secs(pid, ticks)?;

    // Bulk each way through the echo service.
    let total = args.bulk_mib * 1024 * 1024;
    eprintln!("{} MiB each way through the echo service", args.bulk_mib);
    let stream = tether.platform.open_tcp(&tether.device, "echo").await?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let send = tokio::spawn(async move {
        let chunk = vec![0x3cu8; CHUNK];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(CHUNK as u64) as usize;
            writer.write_all(&chunk[..n]).await?;
            sent += n as u64;
        }
        writer.shutdown().await?;
        anyhow::Ok(writer)
    });
    let start = Instant::now();
    let mut received = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while received < total {
        let n = tokio::time::timeout(Duration::from_secs(30), reader.read(&mut buf))
            .await
            .context("the echo stalled for 30 s")??;
        ensure!(n > 0, "the echo ended after {received} bytes");
        received += n as u64;
    }
    let bulk_time = start.elapsed();
    let writer = send.await??;
    drop(reader.unsplit(writer));
    let after_bulk = memory(pid)?;
    let cpu2 = cpu_secs(pid, ticks)?;
    eprintln!("idle for {} s", args.pause_secs);
    tokio::time::sleep(Duration::from_secs(args.pause_secs)).await;
    let idle2 = memory(pid)?;
    let cpu3 = cpu_secs(pid, ticks)?;

    println!(
        "\n## tether-bench idle: tetherd (pid {pid}) with one tunnel to an in-process platform\n"
    );
    println!(
        "| moment | VmRSS | VmHWM | RssAnon | RssFile | tetherd CPU-s in the interval | VmRSS / `sleep`'s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let row = |name: &str, m: Memory, cpu: Option<f64>| {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.1} |",
            mib(m.rss),
            mib(m.hwm),
            mib(m.anon),
            mib(m.file),
            cpu.map_or("-".to_string(), |c| format!("{c:.2}")),
            m.rss as f64 / sleep_memory.rss.max(1) as f64
        );
    };
    row("`sleep 600` (reference process)", sleep_memory, None);
    row("tetherd, tunnel just up", connected, None);
    row(
        &format!("tetherd, after {} s idle", args.idle_secs),
        idle1,
        Some(cpu1 - cpu0),
    );
    row(
        &format!(
            "tetherd, just after {} MiB each way ({:.0} MiB/s)",
            args.bulk_mib,
            args.bulk_mib as f64 / bulk_time.as_secs_f64()
        ),
        after_bulk,
        Some(cpu2 - cpu1),
    );
    row(
        &format!("tetherd, after another {} s idle", args.pause_secs),
        idle2,
        Some(cpu3 - cpu2),
    );
    println!();
    verdict(
        idle1.rss < BUDGET_IDLE_RSS_KIB,
        format!(
            "idle VmRSS {} (budget < {})",
            mib(idle1.rss),
            mib(BUDGET_IDLE_RSS_KIB)
        ),
    );
    verdict(
        idle2.rss < BUDGET_IDLE_RSS_KIB,
        format!(
            "VmRSS idle after bulk {} (budget < {}; peak VmHWM {})",
            mib(idle2.rss),
            mib(BUDGET_IDLE_RSS_KIB),
            mib(idle2.hwm)
        ),
    );
    let _ = sleeper.kill().await;
    tether.stop().await
}

// --- fleet ------------------------------------------------------------------

/// An agent observed connected: its index, when, and its connect count.
#[derive(Clone, Copy, Debug)]
struct Up {
    agent: usize,
    at: Instant,
    connects: u64,
}

/// The platform's soft open-file limit is this process's (it is a child).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn spawn_platform(bin: &Path, data: &Path, port: u16, agents: u32, log: &Path) -> Result<Child> {
    let log = File::options().create(true).append(true).open(log)?;
    Command::new(bin)
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--enroll-burst")
        .arg((agents + 10).to_string())
        .args(["--enroll-refill", "1s", "--no-mqtt"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start tether-platform")
}

/// Waits until the platform has written `platform.json` (after binding).
async fn wait_listening(child: &mut Child, data: &Path) -> Result<Instant> {
    let file = data.join(tether_platform::platform::PLATFORM_JSON);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if file.exists() {
            return Ok(Instant::now());
        }
        if let Some(status) = child.try_wait()? {
            bail!("tether-platform exited ({status}); see its log");
        }
        ensure!(
            Instant::now() < deadline,
            "tether-platform did not listen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until every agent has reported Connected with more connects than
/// `floor[i]`; returns when each did.
async fn wait_all_up(
    ups: &mut tokio::sync::mpsc::UnboundedReceiver<Up>,
    floor: &[u64],
    since: Instant,
    timeout: Duration,
    what: &str,
) -> Result<Vec<Option<(Instant, u64)>>> {
    let mut seen: Vec<Option<(Instant, u64)>> = vec![None; floor.len()];
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    while count < floor.len() {
        tokio::select! {
            up = ups.recv() => {
                let up = up.context("the agents' watchers ended")?;
                if up.at >= since && up.connects > floor[up.agent] && seen[up.agent].is_none() {
                    seen[up.agent] = Some((up.at, up.connects));
                    count += 1;
                }
            }
            _ = progress.tick() => eprintln!("{what}: {count}/{} connected after {:.1} s", floor.len(), since.elapsed().as_secs_f64()),
            () = tokio::time::sleep_until(deadline) => {
                bail!("{what}: only {count} of {} agents connected within {timeout:?}", floor.len());
            }
        }
    }
    Ok(seen)
}

/// Timing of one wave of connections.
#[derive(Clone, Copy, Debug)]
struct Wave {
    all: f64,
    peak_100ms: f64,
    peak_1s: f64,
    median: f64,
    max: f64,
}

fn wave(times: &[Option<(Instant, u64)>], from: Instant) -> Wave {
    let mut secs: Vec<f64> = times
        .iter()
        .flatten()
        .map(|(at, _)| at.saturating_duration_since(from).as_secs_f64())
        .collect();
    secs.sort_by(f64::total_cmp);
    let peak = |width: f64| {
        let mut buckets = std::collections::HashMap::<u64, u32>::new();
        for s in &secs {
            *buckets.entry((s / width) as u64).or_default() += 1;
        }
        buckets.values().copied().max().unwrap_or(0) as f64 / width
    };
    let last = secs.last().copied().unwrap_or(0.0);
    Wave {
        all: last,
        peak_100ms: peak(0.1),
        peak_1s: peak(1.0),
        median: secs.get(secs.len() / 2).copied().unwrap_or(0.0),
        max: last,
    }
}

async fn fleet(args: FleetArgs) -> Result<()> {
    let n = args.agents as usize;
    let timeout = Duration::from_secs(args.timeout_secs);
    let needed = 2 * n as u64 + 256;
    match open_file_limit() {
        Some(limit) if limit < needed => bail!(
            "the open file limit is {limit}, {n} agents need about {needed}; help: run under `ulimit -n 8192`"
        ),
        Some(limit) => eprintln!("open file limit {limit}"),
        None => eprintln!("cannot read the open file limit; carrying on"),
    }
    let bin = sibling("tether-platform")?;
    let ticks = clock_ticks().await;
    let dir = tempfile::tempdir()?;
    // The agents' state (and status.json, rewritten with an fsync on every
    // change) stays in memory: each device has a disk of its own, the
    // machine running the benchmark does not.
    let agents_dir = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")?
    } else {
        tempfile::tempdir()?
    };
    let data = dir.path().join("platform");
    let log = dir.path().join("platform.log");
    let port = free_port()?;
    let mut platform = spawn_platform(&bin, &data, port, args.agents, &log)?;
    wait_listening(&mut platform, &data).await?;
    let mut pid = platform.id().context("tether-platform exited")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = memory(pid)?;
    let client = AdminClient::from_data_dir(&data)?;
    let token = client
        .create_token(&CreateTokenRequest {
            ttl_secs: Some(3600),
            uses: args.agents,
            team: "bench".to_string(),
        })
        .await?
        .token;
    let token = tether_proto::api::ProvisioningToken::parse(token.expose())
        .context("token create answered something that is not a provisioning token")?;
    let url = client.url().to_string();
    let ca = data.join(tether_platform::ca::CA_CERT_FILE);

    eprintln!(
        "enrolling {n} agents, {} at a time",
        args.enroll_concurrency
    );
    let enroll_start = Instant::now();
    let mut set = JoinSet::new();
    let (mut next, mut done) = (0usize, 0usize);
    while done < n {
        while set.len() < args.enroll_concurrency as usize && next < n {
            let mut options = EnrollOptions::new(
                url.clone(),
                token.clone(),
                agents_dir.path().join(format!("agent-{next}")),
            );
            options.ca = Some(ca.clone());
            options.name = Some(format!("bench-{next}"));
            let i = next;
            set.spawn(async move {
                enroll(&options)
                    .await
                    .with_context(|| format!("agent {i} could not enroll"))
            });
            next += 1;
        }
        match set.join_next().await {
            Some(result) => {
                result??;
                done += 1;
            }
            None => break,
        }
    }
    let enroll_time = enroll_start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let enrolled = memory(pid)?;

    eprintln!("starting {n} agents");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Up>();
    let mut agents = Vec::with_capacity(n);
    let first_start = Instant::now();
    for i in 0..n {
        let mut config = AgentConfig::for_state_dir(agents_dir.path().join(format!("agent-{i}")));
        config.reconnect = ReconnectConfig {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            ..ReconnectConfig::default()
        };
        config.clock = Clock::system();
        let agent = Agent::start(config).await?;
        let mut status = agent.status();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut reported = 0;
            loop {
                let (state, connects) = {
                    let s = status.borrow_and_update();
                    (s.state, s.connects)
                };
                if state == TunnelState::Connected && connects > reported {
                    reported = connects;
                    let up = Up {
                        agent: i,
                        at: Instant::now(),
                        connects,
                    };
                    if tx.send(up).is_err() {
                        return;
                    }
                }
                if status.changed().await.is_err() {
                    return;
                }
            }
        });
        agents.push(agent);
    }
    drop(tx);
    let zero = vec![0u64; n];
    let first = wait_all_up(&mut rx, &zero, first_start, timeout, "first start").await?;
    let first_wave = wave(&first, first_start);
    let floor: Vec<u64> = first.iter().map(|s| s.map_or(0, |(_, c)| c)).collect();
    let online = wait_online(&client, n, timeout).await?;
    eprintln!(
        "the platform lists {online} devices online; settling {} s",
        args.settle_secs
    );
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let loaded = memory(pid)?;
    let cpu_before_stop = cpu_secs(pid, ticks)?;

    eprintln!("stopping the platform with SIG{}", args.stop.signal());
    let stopped_at = Instant::now();
    signal(pid, args.stop.signal()).await?;
    tokio::time::timeout(Duration::from_secs(30), platform.wait())
        .await
        .context("the platform did not exit within 30 s")??;
    let exited = stopped_at.elapsed();
    std::fs::remove_file(data.join(tether_platform::platform::PLATFORM_JSON))?;
    platform = spawn_platform(&bin, &data, port, args.agents, &log)?;
    let listening = wait_listening(&mut platform, &data).await?;
    pid = platform.id().context("tether-platform exited")?;
    let again = wait_all_up(&mut rx, &floor, stopped_at, timeout, "after the restart").await?;
    let cpu_restart = cpu_secs(pid, ticks)?;
    let back_wave = wave(&again, stopped_at);
    let from_listening = wave(&again, listening);
    let online_again = wait_online(&client, n, timeout).await?;
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let reloaded = memory(pid)?;

    println!(
        "\n## tether-bench fleet: {n} in-process agents, one tether-platform process (stopped with SIG{})\n",
        args.stop.signal()
    );
    println!(
        "Enrollment: {n} devices in {:.1} s, {} at a time ({:.0} per second).\n",
        enroll_time.as_secs_f64(),
        args.enroll_concurrency,
        n as f64 / enroll_time.as_secs_f64()
    );
    println!("| platform process | VmRSS | VmHWM | RssAnon |");
    println!("| --- | --- | --- | --- |");
    for (name, m) in [
        ("started, nothing enrolled", started),
        ("devices enrolled, no tunnel (baseline)", enrolled),
        ("with the idle tunnels", loaded),
        ("restarted, the tunnels back", reloaded),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            mib(m.rss),
            mib(m.hwm),
            mib(m.anon)
        );
    }
    let per_tunnel = (loaded.rss as f64 - enrolled.rss as f64) / n as f64;
    println!(
        "\nper idle tunnel: {per_tunnel:.1} KiB of VmRSS ({online} listed online; platform CPU {cpu_before_stop:.1} s so far)\n"
    );
    println!(
        "| wave | all connected after | peak tunnels/s (100 ms buckets) | peak tunnels/s (1 s buckets) | median per-agent delay | max per-agent delay |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let wave_row = |name: &str, w: Wave| {
        println!(
            "| {name} | {:.2} s | {:.0} | {:.0} | {:.2} s | {:.2} s |",
            w.all, w.peak_100ms, w.peak_1s, w.median, w.max
        );
    };
    wave_row(
        "first start, from Agent::start of the first (baseline)",
        first_wave,
    );
    wave_row(
        &format!(
            "after SIG{} and restart, from the signal",
            args.stop.signal()
        ),
        back_wave,
    );
    wave_row(
        "after the restart, from the new platform listening",
        from_listening,
    );
    println!(
        "| ratio restart (from the signal) / first start | {:.2} | {:.2} | {:.2} | | |",
        back_wave.all / first_wave.all.max(1e-9),
        back_wave.peak_100ms / first_wave.peak_100ms.max(1e-9),
        back_wave.peak_1s / first_wave.peak_1s.max(1e-9),
    );
    println!(
        "\nThe old platform exited {:.0} ms after the signal; the new one listened {:.0} ms after the signal \
         and used {cpu_restart:.1} CPU-s until all {n} were back ({online_again} listed online).\n",
        exited.as_secs_f64() * 1e3,
        listening
            .saturating_duration_since(stopped_at)
            .as_secs_f64()
            * 1e3,
    );
    verdict(
        per_tunnel < BUDGET_TUNNEL_KIB,
        format!(
            "platform memory per idle tunnel {per_tunnel:.1} KiB (budget < {BUDGET_TUNNEL_KIB} KiB)"
        ),
    );

    eprintln!("stopping the agents");
    let mut stops = JoinSet::new();
    for agent in agents {
        stops.spawn(agent.shutdown());
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while stops.join_next().await.is_some() {}
    })
    .await;
    let _ = signal(pid, "TERM").await;
    if tokio::time::timeout(Duration::from_secs(10), platform.wait())
        .await
        .is_err()
    {
        platform.kill().await?;
    }
    Ok(())
}

/// Polls the admin API until `n` devices are online; returns the count.
async fn wait_online(client: &AdminClient, n: usize, timeout: Duration) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let online = client.devices().await?.iter().filter(|d| d.online).count();
        if online >= n {
            return Ok(online);
        }
        ensure!(
            Instant::now() < deadline,
            "the platform lists only {online} of {n} devices online"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
