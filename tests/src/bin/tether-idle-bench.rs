//! `tether-idle-bench`: what an idle `tetherd` costs a gateway with health
//! collection on (`docs/benchmarks.md`, "Idle agent with health figures").
//!
//! ```sh
//! cargo build --release -p tether-e2e -p tether-agent --bins
//! bash cross/build.sh x86_64-unknown-linux-musl   # the build the package ships
//! target/release/tether-idle-bench --tetherd target/x86_64-unknown-linux-musl/release/tetherd
//! ```
//!
//! Without `--tetherd` it measures the `tetherd` beside it (the glibc
//! build).
//!
//! A release `tetherd`, enrolled with an in-process platform on 127.0.0.1,
//! tunnel up, nothing to carry. Two runs in one: the production heartbeat
//! (every 30 s, each with a health sample) and, as the same run's
//! comparison, a heartbeat every second (a health sample every second, 30
//! times the work), so the cost of one sample shows. For each: `tetherd`'s
//! CPU (utime + stime from `/proc`) over `--secs` as a percent of one core,
//! and its resident memory at the end.

use std::time::Duration;

use anyhow::{Result, ensure};
use clap::Parser;
use tether_e2e::bench::{Tetherd, clock_ticks, cpu_secs, memory, mib, verdict};
use tether_platform::{Platform, PlatformConfig};

const BUDGET_CPU_PERCENT: f64 = 0.5;
const BUDGET_RSS_KIB: u64 = 8 * 1024;

#[derive(Debug, Parser)]
#[command(name = "tether-idle-bench")]
struct Args {
    /// Seconds measured per run.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// The `tetherd` measured (default: the one beside this program).
    #[arg(long)]
    tetherd: Option<std::path::PathBuf>,
}

struct Figures {
    cpu_percent: f64,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    heartbeats: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    let tetherd = tether_e2e::bench::tetherd(args.tetherd.take())?;
    let ticks = clock_ticks().await;
    let mut runs = Vec::new();
    for (label, interval) in [("heartbeat 30s (production)", 30), ("heartbeat 1s", 1)] {
        let figures = run(&tetherd, interval, args.secs, ticks).await?;
        println!(
            "{label:<28} CPU {:.3} % of one core over {} s, {} heartbeats, resident {} (anon {}, file {})",
            figures.cpu_percent,
            args.secs,
            figures.heartbeats,
            mib(figures.rss_kib),
            mib(figures.anon_kib),
            mib(figures.file_kib)
        );
        runs.push(figures);
    }
    let (prod, busy) = (&runs[0], &runs[1]);
    let extra = (busy.cpu_percent - prod.cpu_percent).max(0.0);
    let per_sample_ms = extra / 100.0 * args.secs as f64 * 1000.0
        / (busy.heartbeats.saturating_sub(prod.heartbeats)).max(1) as f64;
    println!(
        "one heartbeat with a health sample: about {per_sample_ms:.2} ms of CPU ({:.1}x the idle CPU at 1 s)",
        busy.cpu_percent / prod.cpu_percent.max(0.001)
    );
    verdict(
        prod.cpu_percent < BUDGET_CPU_PERCENT,
        format!(
            "idle CPU {:.3} % of one core over {} s (budget under {BUDGET_CPU_PERCENT} %)",
            prod.cpu_percent, args.secs
        ),
    );
    verdict(
        prod.rss_kib < BUDGET_RSS_KIB,
        format!(
            "idle resident memory {} with health collection (budget under 8 MiB)",
            mib(prod.rss_kib)
        ),
    );
    Ok(())
}

async fn run(tetherd: &std::path::Path, interval: u64, secs: u64, ticks: f64) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let platform = Platform::start(PlatformConfig::new(
        dir.path().join("platform"),
        "127.0.0.1:0".parse()?,
    ))
    .await?;
    let agent = Tetherd::start(
        tetherd,
        &platform,
        dir.path(),
        &format!("heartbeat_interval = \"{interval}s\"\n"),
    )
    .await?;
    // Settle: enrollment and the first heartbeat are not idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut events = platform.events();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = seen.clone();
    let counter = tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if matches!(event, tether_platform::PlatformEvent::Heartbeat { .. }) {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let before = cpu_secs(agent.pid, ticks)?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = cpu_secs(agent.pid, ticks)?;
    let heartbeats = seen.load(std::sync::atomic::Ordering::Relaxed);
    let m = memory(agent.pid)?;
    let device = agent.device.clone();
    let health = platform
        .devices()
        .await?
        .into_iter()
        .find(|d| d.id == device)
        .and_then(|d| d.health);
    ensure!(health.is_some(), "no health figures reached the platform");
    agent.stop(Duration::from_secs(10)).await?;
    platform.shutdown().await;
    counter.abort();
    Ok(Figures {
        cpu_percent: (after - before) / secs as f64 * 100.0,
        rss_kib: m.rss,
        anon_kib: m.anon,
        file_kib: m.file,
        heartbeats,
    })
}
