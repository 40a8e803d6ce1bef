//! `tether-audit-bench`: what the durable audit trail costs
//! (`docs/benchmarks.md`, "Audit trail").
//!
//! ```sh
//! cargo build --release -p tether-e2e -p tether-agent --bins
//! target/release/tether-audit-bench   # --events 100000 --per-event 2000 --producers 64
//! ```
//!
//! In one run, on this machine's disk (temporary directories):
//! - the baseline: bare redb commits of 200-byte values, one per commit and
//!   1,000 per commit;
//! - the agent's queue, 200-byte records: one producer waiting for each
//!   durable recording (a commit each), and `producers` producers at once
//!   (group commit);
//! - the store's disk bytes per queued record against the record's size;
//! - the drain after an outage: `events` queued while the tunnel is down,
//!   then the time from the tunnel coming back until the platform stored
//!   and acknowledged the last, with the editor's round trip through the
//!   same tunnel measured throughout (the platform's HTTPS, the device's
//!   editor origin, the tunnel, the agent's proxy, a local HTTP stand-in),
//!   against the same round trip on the idle tunnel before;
//! - `tetherd`'s resident memory after 5 s idle with its store open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use clap::Parser;
use http::{Method, StatusCode};
use redb::{Database, TableDefinition};
use tether_agent::audit::{AuditEvent, AuditQueue};
use tether_agent::config::Config;
use tether_agent::editor::EditorTarget;
use tether_agent::enroll::{EnrollOptions, enroll};
use tether_agent::{Agent, AgentOptions, Clock};
use tether_e2e::bench::{Tetherd, memory, mib, verdict};
use tether_e2e::web::{Client, editor_host};
use tether_platform::{Platform, PlatformConfig, PlatformEvent, RateLimit, TokenSpec};
use tether_proto::api::Secret;
use tether_proto::audit::{Actor, ActorKind};
use tether_proto::grant::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUDGET_GROUP_PER_SEC: f64 = 100_000.0;
const BUDGET_DRAIN: Duration = Duration::from_secs(5);
const BUDGET_RTT_P99: Duration = Duration::from_millis(10);
const BUDGET_DISK_RATIO: f64 = 2.0;
const BUDGET_IDLE_RSS_KIB: u64 = 8 * 1024;
/// The records' size the budgets are stated for.
const RECORD_BYTES: usize = 200;

#[derive(Debug, Parser)]
#[command(name = "tether-audit-bench")]
struct Args {
    /// Records queued for the group commit and the drain.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Records recorded one commit each.
    #[arg(long, default_value_t = 2000)]
    per_event: u64,
    /// Producers recording at once for the group commit (the budget's
    /// figure); the run also shows 16, 64 and 1024.
    #[arg(long, default_value_t = 256)]
    producers: u64,
}

/// An event whose record is about [`RECORD_BYTES`] long.
fn event(n: u64) -> AuditEvent {
    AuditEvent::Other {
        kind: "x_bench".into(),
        actor: Actor {
            kind: ActorKind::Agent,
            name: None,
        },
        subject: format!("{n:08}"),
        details: serde_json::json!({}),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    println!(
        "# tether-audit-bench: {} events, {} producers\n",
        args.events, args.producers
    );
    let (bare_single, bare_batch, bare_grown) = bare_redb()?;
    println!("## Recording (durable when the call returns)\n");
    println!(
        "| what | events | time | events/s | / bare redb (one per commit; 64 per commit for the group rows) |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| bare redb, one commit per 200-byte value | 1000 | {:.1} ms | {:.0} | 1.00 |",
        bare_single * 1e3,
        1000.0 / bare_single
    );
    println!(
        "| bare redb, 64 values per commit into 100,000 | 100000 | {:.1} ms | {:.0} | 1.00 |",
        bare_grown.0 * 1e3,
        100_000.0 / bare_grown.0
    );
    println!(
        "| bare redb, 1,000 values in one commit | 1000 | {:.2} ms | {:.0} | - |",
        bare_batch * 1e3,
        1000.0 / bare_batch
    );
    let dir = tempfile::tempdir()?;
    let queue = Arc::new(AuditQueue::open(
        dir.path(),
        4096 * 1024 * 1024,
        Clock::system(),
    )?);
    let started = Instant::now();
    for n in 0..args.per_event {
        queue.record_durable(event(n)).await?;
    }
    let single = started.elapsed().as_secs_f64();
    let single_rate = args.per_event as f64 / single;
    println!(
        "| queue, one producer waiting for each | {} | {:.1} ms | {single_rate:.0} | {:.2} |",
        args.per_event,
        single * 1e3,
        single_rate / (1000.0 / bare_single)
    );
    let mut group_rate = 0.0;
    let mut curve = vec![16, 64, args.producers, 1024];
    curve.dedup();
    for producers in curve {
        let (secs, rate, per_commit) = group_commit(&queue, args.events, producers).await?;
        if producers == args.producers {
            group_rate = rate;
        }
        println!(
            "| queue, {producers} producers at once (group commit, {per_commit:.0} events per commit) | {} | {:.1} ms | {rate:.0} | {:.2} |",
            args.events,
            secs * 1e3,
            rate / (100_000.0 / bare_grown.0)
        );
    }
    let reader = queue.reader().context("the store is open")?;
    let records = reader.read_from(0, usize::MAX, usize::MAX)?;
    let encoded: usize = records.iter().map(|(_, b)| b.len()).sum();
    let average = encoded as f64 / records.len() as f64;
    let file = queue.stats().file_bytes;
    let ratio = file as f64 / encoded as f64;
    queue.close();
    println!("\nRecords average {average:.0} bytes (budget stated for {RECORD_BYTES}).\n");
    verdict(
        group_rate >= BUDGET_GROUP_PER_SEC,
        format!(
            "group commit with {} producers {group_rate:.0} events/s (budget >= {BUDGET_GROUP_PER_SEC:.0})",
            args.producers
        ),
    );
    println!("\n## Disk\n");
    println!(
        "{} records queued, {encoded} bytes encoded, store file {file} bytes: {:.0} bytes on disk per record.",
        records.len(),
        file as f64 / records.len() as f64
    );
    verdict(
        ratio < BUDGET_DISK_RATIO,
        format!(
            "disk bytes per queued record {ratio:.2}x its encoded size (budget < {BUDGET_DISK_RATIO}x)"
        ),
    );
    drop(dir);
    drain(&args).await?;
    idle_memory().await?;
    Ok(())
}

/// Seconds for 1,000 single-value commits, for one commit of 1,000, and
/// for 100,000 values 64 to a commit (the table growing as the queue's
/// does).
fn bare_redb() -> Result<(f64, f64, (f64,))> {
    const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    let dir = tempfile::tempdir()?;
    let db = Database::create(dir.path().join("bare.redb"))?;
    let value = vec![b'x'; RECORD_BYTES];
    let started = Instant::now();
    for i in 0..1000u64 {
        let txn = db.begin_write()?;
        txn.open_table(TABLE)?.insert(i, value.as_slice())?;
        txn.commit()?;
    }
    let single = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(TABLE)?;
        for i in 1000..2000u64 {
            table.insert(i, value.as_slice())?;
        }
    }
    txn.commit()?;
    let batch = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for chunk in 0..100_000u64 / 64 {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            for i in 0..64 {
                table.insert(10_000 + chunk * 64 + i, value.as_slice())?;
            }
        }
        txn.commit()?;
    }
    Ok((single, batch, (started.elapsed().as_secs_f64(),)))
}

/// `total` events from `producers` tasks at once; seconds, events/s and
/// events per commit.
async fn group_commit(
    queue: &Arc<AuditQueue>,
    total: u64,
    producers: u64,
) -> Result<(f64, f64, f64)> {
    let before = queue.stats();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..producers {
        let queue = queue.clone();
        tasks.spawn(async move {
            let mut n = p;
            while n < total {
                queue.record_durable(event(n)).await?;
                n += producers;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let secs = started.elapsed().as_secs_f64();
    let after = queue.stats();
    let commits = (after.commits - before.commits).max(1);
    Ok((secs, total as f64 / secs, total as f64 / commits as f64))
}

/// A TCP forwarder from a fixed port to the platform, which can be taken
/// down (every connection cut, the port closed) and brought back.
struct Link {
    port: u16,
    target: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Link {
    async fn up(&mut self) -> Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
        Ok(())
    }

    fn down(&mut self) {
        // Dropping the join set with the task aborts every connection.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A local HTTP/1.1 server that answers every request with `ok`.
async fn stand_in() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut held = Vec::new();
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    held.extend_from_slice(&buf[..n]);
                    while let Some(end) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                        held.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Editor round trips until `done` is set; their durations, sorted.
async fn round_trips(
    client: Client,
    host: String,
    cookie: String,
    done: Arc<std::sync::atomic::AtomicBool>,
    at_most: usize,
) -> Result<Vec<Duration>> {
    let mut conn = client.connect().await?;
    let mut rtts = Vec::new();
    while !done.load(std::sync::atomic::Ordering::Relaxed) && rtts.len() < at_most {
        let started = Instant::now();
        let answer = client
            .send(
                &mut conn,
                &host,
                Method::GET,
                "/",
                &[("cookie", &cookie)],
                Bytes::new(),
            )
            .await?;
        ensure!(
            answer.status == StatusCode::OK,
            "editor answered {}",
            answer.status
        );
        rtts.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rtts.sort();
    Ok(rtts)
}

async fn drain(args: &Args) -> Result<()> {
    println!("\n## Drain after an outage\n");
    let dir = tempfile::tempdir()?;
    let platform = start_platform(dir.path()).await?;
    platform
        .add_user("olga", "default", Role::Owner, &Secret::new("pw of olga"))
        .await?;
    let state = dir.path().join("state");
    let token = platform.create_token(TokenSpec::default()).await?;
    let mut options = EnrollOptions::new(platform.url(), token, &state);
    options.name = Some("bench".into());
    let device = enroll(&options).await?.identity.device_id;
    // The tunnel goes through a link the bench can take down.
    let port = tether_e2e::bench::free_port()?;
    let mut link = Link {
        port,
        target: platform.local_addr(),
        task: None,
    };
    let identity_path = state.join("identity.json");
    let mut identity: serde_json::Value = serde_json::from_slice(&std::fs::read(&identity_path)?)?;
    let url = identity["tunnel_url"]
        .as_str()
        .context("tunnel_url")?
        .to_owned();
    let (host, rest) = url.rsplit_once(':').context("tunnel_url has a port")?;
    let path = &rest[rest.find('/').context("tunnel_url has a path")?..];
    identity["tunnel_url"] = format!("{host}:{port}{path}").into();
    std::fs::write(&identity_path, serde_json::to_vec(&identity)?)?;
    link.up().await?;
    let mut agent_config = Config::for_state_dir(&state);
    agent_config.reconnect.min_delay = Duration::from_millis(50);
    agent_config.reconnect.max_delay = Duration::from_millis(200);
    let target = EditorTarget {
        addr: stand_in().await?,
        ..EditorTarget::default()
    };
    let agent = Agent::start_with(
        agent_config,
        AgentOptions {
            editor: Some(target),
        },
    )
    .await?;
    let mut events = platform.events();
    wait_for(&mut events, |e| matches!(e, PlatformEvent::TunnelUp { .. })).await?;
    let client = Client::new(&platform)?;
    let session = client.login("olga", "pw of olga").await?;
    let cookie = client.editor_cookie(&session, &device).await?;
    let editor = editor_host(&device, platform.local_addr().port());
    let idle_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let idle = round_trips(
        client.clone(),
        editor.clone(),
        cookie.clone(),
        idle_done,
        300,
    )
    .await?;
    // The outage: events queue on the device.
    link.down();
    let queue = agent.audit();
    let (_, rate, _) = group_commit(&queue, args.events, args.producers).await?;
    let last = queue.stats().last_seq;
    println!(
        "{} events queued while the tunnel was down ({rate:.0} events/s); {} on the device.",
        args.events,
        queue.stats().queued
    );
    // The link comes back: time the drain, with the editor in use.
    let mut events = platform.events();
    link.up().await?;
    wait_for(&mut events, |e| matches!(e, PlatformEvent::TunnelUp { .. })).await?;
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cookie_again = client
        .editor_cookie(&session, &device)
        .await
        .unwrap_or(cookie);
    let during = tokio::spawn(round_trips(
        client.clone(),
        editor.clone(),
        cookie_again,
        done.clone(),
        usize::MAX,
    ));
    wait_for(
        &mut events,
        |e| matches!(e, PlatformEvent::AuditStored { through, .. } if *through >= last),
    )
    .await?;
    let drained = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let during = during.await??;
    // The device deletes what was acknowledged.
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.stats().acked < last && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "Drained {} events in {:.2} s ({:.0} events/s); the device holds {} after the acknowledgements.\n",
        args.events,
        drained.as_secs_f64(),
        args.events as f64 / drained.as_secs_f64(),
        queue.stats().queued
    );
    println!("| editor round trip | requests | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    for (name, rtts) in [
        ("idle tunnel (baseline)", &idle),
        ("during the drain", &during),
    ] {
        println!(
            "| {name} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            rtts.len(),
            percentile(rtts, 0.5).as_secs_f64() * 1e3,
            percentile(rtts, 0.99).as_secs_f64() * 1e3,
            rtts.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    }
    let p99 = percentile(&during, 0.99);
    println!(
        "\np99 during the drain / idle p99: {:.2}\n",
        p99.as_secs_f64() / percentile(&idle, 0.99).as_secs_f64().max(1e-9)
    );
    verdict(
        drained < BUDGET_DRAIN,
        format!(
            "drain of {} events {:.2} s (budget < {:?})",
            args.events,
            drained.as_secs_f64(),
            BUDGET_DRAIN
        ),
    );
    verdict(
        p99 < BUDGET_RTT_P99 && !during.is_empty(),
        format!(
            "editor p99 during the drain {:.2} ms over {} requests (budget < {:?})",
            p99.as_secs_f64() * 1e3,
            during.len(),
            BUDGET_RTT_P99
        ),
    );
    // The last checkpoint follows within a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let report = loop {
        let report = platform
            .audit(tether_platform::audit::AuditQuery {
                device: Some(device.clone()),
                limit: Some(1),
                ..Default::default()
            })
            .await?;
        if report.devices[0].state != tether_platform::audit::ChainState::Unsigned
            || Instant::now() > deadline
        {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "Platform's verification: {} ({} records, signed through {}).",
        report.devices[0].state, report.devices[0].records, report.devices[0].verified_through
    );
    agent.shutdown().await;
    link.down();
    platform.shutdown().await;
    Ok(())
}

/// A platform in `dir/platform` on 127.0.0.1, enrollment not rate limited.
async fn start_platform(dir: &std::path::Path) -> Result<Platform> {
    let mut config = PlatformConfig::new(dir.join("platform"), "127.0.0.1:0".parse()?);
    config.enroll_rate = RateLimit {
        burst: 100,
        refill: Duration::from_millis(1),
    };
    Ok(Platform::start(config).await?)
}

async fn wait_for(
    events: &mut tokio::sync::broadcast::Receiver<PlatformEvent>,
    pred: impl Fn(&PlatformEvent) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if pred(&e) => return Ok(()),
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => anyhow::bail!("platform events ended: {e}"),
            Err(_) => anyhow::bail!("timed out waiting for a platform event"),
        }
    }
}

async fn idle_memory() -> Result<()> {
    println!("\n## Idle memory\n");
    let tetherd = tether_e2e::bench::sibling("tetherd")?;
    let dir = tempfile::tempdir()?;
    let platform = start_platform(dir.path()).await?;
    let agent = Tetherd::start(&tetherd, &platform, dir.path(), "").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let m = memory(agent.pid)?;
    let store = std::fs::metadata(dir.path().join("agent").join("audit.redb"))?.len();
    println!(
        "tetherd after 5 s idle, audit store open ({store} bytes): VmRSS {}, VmHWM {}, RssAnon {}.",
        mib(m.rss),
        mib(m.hwm),
        mib(m.anon)
    );
    verdict(
        m.rss < BUDGET_IDLE_RSS_KIB,
        format!("idle tetherd VmRSS {} (budget < 8 MiB)", mib(m.rss)),
    );
    agent.stop(Duration::from_secs(5)).await?;
    platform.shutdown().await;
    Ok(())
}
