//! `tether-snapshot-bench`: how long a flow stops answering while a
//! snapshot without module changes is switched in, against a plain restart
//! of the same Node-RED in the same run (`docs/benchmarks.md`, "Snapshot
//! downtime").
//!
//! ```sh
//! cargo build --release -p tether-e2e -p tether-agent --bins
//! target/release/tether-snapshot-bench     # --rounds 5 --poll-ms 5
//! ```
//!
//! Needs Node-RED (`bash tests/nodered/install.sh`, or `TETHER_NODE_RED`).
//! As `tests/tests/snapshot_node_red.rs` does: the platform and the agent
//! run in this process on 127.0.0.1, the agent launching a real Node-RED
//! (as `tether-nodered` when run as root) whose flow serves `GET /hello`
//! with the environment variable `GREETING`. A poller asks `GET /hello`
//! every `--poll-ms` (a new TCP connection each time, 200 ms to answer)
//! from before each request until the answer it waits for. Each round:
//! - **snapshot**: a new version of the same flow with another `GREETING`
//!   in its `env.json` is signed, then pushed (`Platform::push_snapshot`,
//!   what `tether-platform snapshot push` calls). *Downtime*: the longest
//!   interval between two 200 answers; *push to answer*: from the push call
//!   to the first 200 carrying the new greeting;
//! - **restart** (the baseline): `Platform::node_red_action(.., "restart",
//!   ..)`, what `tether-platform device node-red ID restart` calls;
//!   *downtime* as above, until the restarted Node-RED answers 200.
//!
//! Each window is split by what the bench sees: when the old Node-RED
//! process is gone and the new one exists (`/proc`, this process's child),
//! when the new one first answers HTTP at all (a 404 before its flows
//! run), and, for a snapshot, when the agent's status names the new
//! version (it has switched and asked for the restart).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use tether_agent::config::{Config, NodeRedConfig, NodeRedMode};
use tether_agent::enroll::{EnrollOptions, enroll};
use tether_agent::{Agent, TunnelState};
use tether_e2e::bench::{clock_ticks, cpu_secs, free_port, verdict};
use tether_e2e::tools;
use tether_platform::{Platform, PlatformConfig, TokenSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

const BUDGET_DOWNTIME: Duration = Duration::from_secs(2);
const BUDGET_PUSH_TO_ANSWER: Duration = Duration::from_secs(5);
/// One request's limit: connecting, asking and reading the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(200);
/// How often the Node-RED process is looked for in `/proc`.
const PID_EVERY: Duration = Duration::from_millis(5);
/// The longest wait for an answer, an outcome or a process.
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(name = "tether-snapshot-bench")]
struct Args {
    /// Rounds, each a snapshot and a restart.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Milliseconds between two requests of the poller.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// The platform, the device and its Node-RED.
#[derive(Debug)]
struct Setup {
    platform: Platform,
    agent: Agent,
    device: String,
    port: u16,
    every: Duration,
    /// The running Node-RED's process id.
    pid: u32,
    /// Clock ticks per second, for CPU times.
    ticks: f64,
}

async fn run(args: Args) -> Result<()> {
    let node_red = tools::node_red().find().map_err(anyhow::Error::msg)?;
    println!(
        "tether-snapshot-bench: Node-RED {}, Node.js {}, {} rounds, GET /hello every {} ms (a new connection each, {} ms to answer)",
        node_red_version(&node_red),
        node_version().await,
        args.rounds,
        args.poll_ms,
        REQUEST_TIMEOUT.as_millis()
    );
    let dir = tempfile::tempdir()?;
    tools::traversable(dir.path());
    let platform = Platform::start(PlatformConfig::new(
        dir.path().join("platform"),
        "127.0.0.1:0".parse()?,
    ))
    .await?;
    let state = dir.path().join("device");
    let token = platform.create_token(TokenSpec::default()).await?;
    enroll(&EnrollOptions::new(platform.url(), token, &state)).await?;
    let port = free_port()?;
    let mut config = Config::for_state_dir(&state);
    config.node_red = NodeRedConfig {
        mode: NodeRedMode::Launch,
        command: node_red.display().to_string(),
        user_dir: None,
        port,
        user: tools::node_red_user(),
        ..NodeRedConfig::default()
    };
    // No snapshot here pins a module; npm would find no registry anyway.
    config.snapshot.registry = Some("http://127.0.0.1:9/".into());
    let agent = Agent::start(config).await?;
    let device = agent.device_id();
    let mut status = agent.status();
    tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| s.state == TunnelState::Connected),
    )
    .await
    .context("the tunnel did not come up")??;
    tether_agent::node_red::wait_ready(([127, 0, 0, 1], port).into(), LIMIT).await?;
    let pid = child_pid(LIMIT).await?;
    let mut setup = Setup {
        platform,
        agent,
        device,
        port,
        every: Duration::from_millis(args.poll_ms),
        pid,
        ticks: clock_ticks().await,
    };

    // Warm-up: the first snapshot moves Node-RED off its user directory's
    // flows, and warms the file cache for both kinds of round.
    let warm = snapshot(&mut setup, "warm-up", false).await?;
    println!(
        "warm-up: snapshot {} applied, push to answer {:.0} ms (nothing served /hello before)",
        warm.version.unwrap_or_default(),
        ms(warm.to_answer)
    );
    settle().await;

    let mut snaps = Vec::new();
    let mut restarts = Vec::new();
    for round in 1..=args.rounds {
        let snap = snapshot(&mut setup, &format!("hello from round {round}"), true).await?;
        println!("round {round} {}", snap.line());
        settle().await;
        let restart = restart(&mut setup).await?;
        println!("round {round} {}", restart.line());
        println!(
            "round {round} snapshot/restart downtime {:.2}",
            ratio(snap.down, restart.down)
        );
        settle().await;
        snaps.push(snap);
        restarts.push(restart);
    }

    println!();
    println!("| | {} | median |", header(args.rounds));
    println!("|---|{}---:|", "---:|".repeat(args.rounds));
    let row = |what: &str, v: Vec<Duration>| {
        let cells: Vec<String> = v.iter().map(|d| format!("{:.0} ms", ms(*d))).collect();
        println!(
            "| {what} | {} | **{:.0} ms** |",
            cells.join(" | "),
            ms(median(v))
        );
    };
    let field = |w: &[Window], f: fn(&Window) -> Duration| w.iter().map(f).collect::<Vec<_>>();
    row("snapshot: downtime", field(&snaps, |w| w.down));
    row("snapshot: push to answer", field(&snaps, |w| w.to_answer));
    row(
        "snapshot: push to switch (agent: pull, verify, stage, switch)",
        field(&snaps, |w| w.to_switch().unwrap_or_default()),
    );
    row("restart: downtime (baseline)", field(&restarts, |w| w.down));
    let per_round: Vec<f64> = snaps
        .iter()
        .zip(&restarts)
        .map(|(s, r)| ratio(s.down, r.down))
        .collect();
    let ratios: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
    let (snap_down, restart_down) = (
        median(field(&snaps, |w| w.down)),
        median(field(&restarts, |w| w.down)),
    );
    println!(
        "| snapshot / restart downtime | {} | **{:.2}** |",
        ratios.join(" | "),
        median_f64(per_round)
    );
    let loads: Vec<String> = snaps
        .iter()
        .zip(&restarts)
        .map(|(s, r)| format!("{:.2} / {:.2}", s.other_load, r.other_load))
        .collect();
    println!(
        "| other load on the machine, cores (snapshot / restart) | {} | |",
        loads.join(" | ")
    );
    println!(
        "ratio of the medians: snapshot downtime {:.0} ms / restart downtime {:.0} ms = {:.2}",
        ms(snap_down),
        ms(restart_down),
        ratio(snap_down, restart_down)
    );
    println!();
    println!(
        "Where a window goes (medians, ms): old stopping = last 200 to the old process gone; respawn = gone to the new process; start = new process to its first HTTP answer; flows = first HTTP answer to the first 200"
    );
    for (what, w) in [("snapshot", &snaps), ("restart", &restarts)] {
        println!(
            "{what:<8}: old stopping {:.0}, respawn {:.0}, Node-RED start {:.0}, flows {:.0} (downtime {:.0})",
            ms(median(field(w, |w| w.stopping()))),
            ms(median(field(w, |w| w.respawn()))),
            ms(median(field(w, |w| w.start()))),
            ms(median(field(w, |w| w.flows()))),
            ms(median(field(w, |w| w.down))),
        );
    }
    println!();
    let to_answer = median(field(&snaps, |w| w.to_answer));
    let worst = |v: Vec<Duration>| v.into_iter().max().unwrap_or_default();
    verdict(
        snap_down < BUDGET_DOWNTIME,
        format!(
            "snapshot downtime median {:.0} ms, worst {:.0} ms (budget under 2 s); plain restart {:.0} ms, ratio {:.2}",
            ms(snap_down),
            ms(worst(field(&snaps, |w| w.down))),
            ms(restart_down),
            ratio(snap_down, restart_down)
        ),
    );
    verdict(
        to_answer < BUDGET_PUSH_TO_ANSWER,
        format!(
            "push to answer median {:.0} ms, worst {:.0} ms (budget under 5 s)",
            ms(to_answer),
            ms(worst(field(&snaps, |w| w.to_answer)))
        ),
    );
    setup.agent.shutdown().await;
    setup.platform.shutdown().await;
    Ok(())
}

/// Lets the Node-RED that just started finish its start-up work.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Signs a new version of the flow with `greeting`, pushes it, and
/// measures until the new greeting answers; then waits for the agent to
/// commit it.
/// Before the first snapshot nothing serves `/hello` (`answering` false).
async fn snapshot(setup: &mut Setup, greeting: &str, answering: bool) -> Result<Window> {
    let info = setup
        .platform
        .create_snapshot(&setup.device, files(greeting)?, None)
        .await?;
    let version = info.version;
    let poller = Poller::start(setup.port, setup.every);
    if answering {
        poller
            .wait(LIMIT, |s| matches!(s.answer, Answer::Ok(_)))
            .await?;
    }
    let pids = PidWatch::start(setup.pid);
    let mut status = setup.agent.status();
    let switch = tokio::spawn(async move {
        let switched =
            status.wait_for(|s| s.snapshot.as_ref().and_then(|h| h.current) == Some(version));
        tokio::time::timeout(LIMIT, switched).await.ok()?.ok()?;
        Some(Instant::now())
    });
    let cpu = Cpu::now(setup.ticks);
    let asked = Instant::now();
    setup.platform.push_snapshot(&setup.device, version).await?;
    let answered = poller
        .wait(LIMIT, |s| {
            s.sent >= asked && matches!(&s.answer, Answer::Ok(b) if b == greeting)
        })
        .await
        .with_context(|| {
            format!(
                "snapshot {version}: {:?}",
                setup.agent.status().borrow().snapshot
            )
        })?;
    let samples = poller.stop();
    let processes = pids.stop();
    let cpu = cpu.other_load(&processes, setup.ticks);
    let switched = switch.await?;
    applied(&setup.agent, version).await?;
    let mut window = Window::measure(asked, answered, &samples, &processes);
    window.version = Some(version);
    window.switched = switched;
    window.other_load = cpu;
    setup.pid = window.new_pid.context("no new Node-RED process was seen")?;
    Ok(window)
}

/// Asks the platform to restart the device's Node-RED and measures until
/// the new process answers 200.
async fn restart(setup: &mut Setup) -> Result<Window> {
    let poller = Poller::start(setup.port, setup.every);
    poller
        .wait(LIMIT, |s| matches!(s.answer, Answer::Ok(_)))
        .await?;
    let pids = PidWatch::start(setup.pid);
    let cpu = Cpu::now(setup.ticks);
    let asked = Instant::now();
    let told = setup
        .platform
        .node_red_action(&setup.device, "restart", "bench")
        .await?;
    ensure!(told, "the device was not told at once (offline?)");
    let deadline = asked + LIMIT;
    let answered = loop {
        let spawned = pids.spawned_after(asked);
        if let Some(spawned) = spawned
            && let Some(at) =
                poller.first(|s| s.sent >= spawned && matches!(s.answer, Answer::Ok(_)))
        {
            break at;
        }
        if Instant::now() > deadline {
            bail!("the restarted Node-RED did not answer within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let samples = poller.stop();
    let processes = pids.stop();
    let cpu = cpu.other_load(&processes, setup.ticks);
    let mut window = Window::measure(asked, answered, &samples, &processes);
    window.other_load = cpu;
    setup.pid = window.new_pid.context("no new Node-RED process was seen")?;
    Ok(window)
}

/// Waits until the agent reports `applied VERSION`.
async fn applied(agent: &Agent, version: u64) -> Result<()> {
    let want = format!("applied {version}");
    let mut status = agent.status();
    let reached = tokio::time::timeout(
        LIMIT * 2,
        status.wait_for(|s| {
            s.snapshot
                .as_ref()
                .and_then(|h| h.outcome.as_deref())
                .is_some_and(|o| o.starts_with(&want))
        }),
    )
    .await;
    ensure!(
        matches!(reached, Ok(Ok(_))),
        "no '{want}': {:?}",
        agent.status().borrow().snapshot
    );
    Ok(())
}

/// The flow of `tests/tests/snapshot_node_red.rs`: `GET /hello` answers
/// the environment variable `GREETING`, which `env.json` sets.
fn files(greeting: &str) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(tether_e2e::flows::hello_files(greeting, false))
}

/// What one request got.
#[derive(Clone, Debug)]
enum Answer {
    /// 200, with this body.
    Ok(String),
    /// Another HTTP status.
    Status(u16),
    /// Connection refused: nothing listens.
    Refused,
    /// Reset, closed without an answer, or not HTTP.
    Failed,
    /// No answer within [`REQUEST_TIMEOUT`].
    TimedOut,
}

#[derive(Clone, Debug)]
struct Sample {
    sent: Instant,
    done: Instant,
    answer: Answer,
}

/// Asks `GET /hello` continuously, keeping every answer.
#[derive(Debug)]
struct Poller {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

impl Poller {
    fn start(port: u16, every: Duration) -> Poller {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let keep = samples.clone();
        let task = tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, hello(port))
                    .await
                    .unwrap_or(Answer::TimedOut);
                let done = Instant::now();
                lock(&keep).push(Sample { sent, done, answer });
                tokio::time::sleep(every).await;
            }
        });
        Poller { samples, task }
    }

    /// When the first answer `pick` accepts arrived, if one has.
    fn first(&self, pick: impl Fn(&Sample) -> bool) -> Option<Instant> {
        lock(&self.samples).iter().find(|s| pick(s)).map(|s| s.done)
    }

    /// Waits (at most `limit`) for an answer `pick` accepts; when it
    /// arrived.
    async fn wait(&self, limit: Duration, pick: impl Fn(&Sample) -> bool) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.first(&pick) {
                return Ok(at);
            }
            if Instant::now() > deadline {
                let last = lock(&self.samples).last().map(|s| s.answer.clone());
                bail!("GET /hello did not answer as expected within {limit:?} (last: {last:?})");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stop(self) -> Vec<Sample> {
        self.task.abort();
        std::mem::take(&mut *lock(&self.samples))
    }
}

/// `GET /hello` on a new connection.
async fn hello(port: u16) -> Answer {
    let mut tcp = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(tcp) => tcp,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Answer::Refused,
        Err(_) => return Answer::Failed,
    };
    let asked = tcp
        .write_all(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    if asked.is_err() || tcp.read_to_end(&mut answer).await.is_err() {
        return Answer::Failed;
    }
    let answer = String::from_utf8_lossy(&answer);
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        return Answer::Failed;
    };
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match code {
        Some(200) => Answer::Ok(body.to_string()),
        Some(code) => Answer::Status(code),
        None => Answer::Failed,
    }
}

/// When a Node-RED process went (`None`) or appeared (`Some(pid)`).
type ProcessEvent = (Instant, Option<u32>);

/// Watches this process's child (the launched Node-RED): when the one
/// running goes, and when the next one appears.
#[derive(Debug)]
struct PidWatch {
    /// When a process went (`None`) or appeared (`Some(pid)`).
    events: Arc<Mutex<Vec<ProcessEvent>>>,
    task: JoinHandle<()>,
}

impl PidWatch {
    fn start(running: u32) -> PidWatch {
        let events: Arc<Mutex<Vec<ProcessEvent>>> = Arc::default();
        let keep = events.clone();
        let task = tokio::spawn(async move {
            let mut current = Some(running);
            loop {
                match current {
                    Some(pid) if !alive(pid) => {
                        current = None;
                        lock(&keep).push((Instant::now(), None));
                    }
                    Some(_) => {}
                    None => {
                        current = children().first().copied();
                        if current.is_some() {
                            lock(&keep).push((Instant::now(), current));
                        }
                    }
                }
                tokio::time::sleep(PID_EVERY).await;
            }
        });
        PidWatch { events, task }
    }

    /// When a new process appeared after the old one went, after `since`.
    fn spawned_after(&self, since: Instant) -> Option<Instant> {
        spawned(&lock(&self.events), since).map(|(at, _)| at)
    }

    fn stop(self) -> Vec<ProcessEvent> {
        self.task.abort();
        std::mem::take(&mut *lock(&self.events))
    }
}

/// When the old process went after `since`, and then when which new one
/// appeared.
fn exited(events: &[ProcessEvent], since: Instant) -> Option<Instant> {
    events
        .iter()
        .find(|(at, pid)| *at >= since && pid.is_none())
        .map(|(at, _)| *at)
}

fn spawned(events: &[ProcessEvent], since: Instant) -> Option<(Instant, u32)> {
    let gone = exited(events, since)?;
    events
        .iter()
        .find_map(|(at, pid)| pid.filter(|_| *at >= gone).map(|pid| (*at, pid)))
}

/// `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| state_and_parent(&stat))
        .is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

/// The state letter and parent pid of a `/proc/PID/stat` line.
fn state_and_parent(stat: &str) -> Option<(char, u32)> {
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// The running children of this process: the agent runs in it, so the
/// Node-RED it launches is one (setpriv, the umask shell and `env node`
/// exec, keeping the pid).
fn children() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| state_and_parent(&stat))
                .is_some_and(|(state, parent)| parent == me && !matches!(state, 'Z' | 'X'))
        })
        .collect()
}

/// Waits until this process has exactly one running child; its pid.
async fn child_pid(limit: Duration) -> Result<u32> {
    let deadline = Instant::now() + limit;
    loop {
        if let [pid] = children()[..] {
            return Ok(pid);
        }
        ensure!(
            Instant::now() < deadline,
            "Node-RED's process was not found (children: {:?})",
            children()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One measured window: a snapshot's or a restart's.
#[derive(Debug, Default)]
struct Window {
    version: Option<u64>,
    /// The longest interval with no 200 answer.
    down: Duration,
    /// The request (push or restart) to the first 200 of the new process.
    to_answer: Duration,
    asked: Option<Instant>,
    /// The last 200 before the longest gap, and the first after it.
    last_ok: Option<Instant>,
    first_ok: Option<Instant>,
    /// When the agent's status named the new version (snapshots).
    switched: Option<Instant>,
    /// When the old process was gone, and the new one appeared.
    exited: Option<Instant>,
    spawned: Option<Instant>,
    new_pid: Option<u32>,
    /// The new process's first HTTP answer of any status.
    listening: Option<Instant>,
    /// Requests in the gap: refused, other HTTP statuses, failed, timed out.
    refused: usize,
    statuses: Vec<u16>,
    failed: usize,
    timed_out: usize,
    /// Separate intervals without 200 from the request to the answer.
    outages: usize,
    /// The machine's CPU use by everything but this process and the new
    /// Node-RED, from the request to the answer, in cores.
    other_load: f64,
}

impl Window {
    fn measure(
        asked: Instant,
        answered: Instant,
        samples: &[Sample],
        processes: &[ProcessEvent],
    ) -> Window {
        let ok = |s: &&Sample| matches!(s.answer, Answer::Ok(_));
        let mut last = samples
            .iter()
            .filter(|s| s.done <= asked)
            .filter(ok)
            .map(|s| s.done)
            .next_back()
            .unwrap_or(asked);
        let mut gap = (last, last);
        for s in samples
            .iter()
            .filter(|s| s.done > asked && s.done <= answered)
            .filter(ok)
        {
            if s.done - last > gap.1 - gap.0 {
                gap = (last, s.done);
            }
            last = s.done;
        }
        let mut w = Window {
            down: gap.1 - gap.0,
            to_answer: answered - asked,
            asked: Some(asked),
            last_ok: Some(gap.0),
            first_ok: Some(gap.1),
            exited: exited(processes, asked),
            ..Window::default()
        };
        if let Some((at, pid)) = spawned(processes, asked) {
            w.spawned = Some(at);
            w.new_pid = Some(pid);
            w.listening = samples
                .iter()
                .find(|s| s.sent >= at && matches!(s.answer, Answer::Ok(_) | Answer::Status(_)))
                .map(|s| s.done);
        }
        for s in samples.iter().filter(|s| s.done > gap.0 && s.done < gap.1) {
            match s.answer {
                Answer::Ok(_) => {}
                Answer::Status(code) => w.statuses.push(code),
                Answer::Refused => w.refused += 1,
                Answer::Failed => w.failed += 1,
                Answer::TimedOut => w.timed_out += 1,
            }
        }
        let mut up = true;
        for s in samples
            .iter()
            .filter(|s| s.done > asked && s.done <= answered)
        {
            let now_up = matches!(s.answer, Answer::Ok(_));
            if up && !now_up {
                w.outages += 1;
            }
            up = now_up;
        }
        w.statuses.dedup();
        w
    }

    fn to_switch(&self) -> Option<Duration> {
        Some(self.switched? - self.asked?)
    }

    /// The last 200 to the old process gone.
    fn stopping(&self) -> Duration {
        since(self.last_ok, self.exited)
    }

    /// The old process gone to the new one there: the agent's part.
    fn respawn(&self) -> Duration {
        since(self.exited, self.spawned)
    }

    /// The new process to its first HTTP answer: Node.js and Node-RED
    /// loading, settings, the HTTP listener.
    fn start(&self) -> Duration {
        since(self.spawned, self.listening)
    }

    /// The first HTTP answer to the first 200: the flows starting.
    fn flows(&self) -> Duration {
        since(self.listening, self.first_ok)
    }

    fn line(&self) -> String {
        let what = match self.version {
            Some(v) => format!(
                "snapshot {v}: downtime {:.0} ms, push to answer {:.0} ms; push to switch {:.0} ms,",
                ms(self.down),
                ms(self.to_answer),
                ms(self.to_switch().unwrap_or_default())
            ),
            None => format!(
                "restart:    downtime {:.0} ms, request to answer {:.0} ms;",
                ms(self.down),
                ms(self.to_answer)
            ),
        };
        format!(
            "{what} old stopping {:.0} ms, respawn {:.0} ms, Node-RED start {:.0} ms, flows {:.0} ms; in the gap: {} refused, {} failed, {} timed out, statuses {:?}; {} outage(s); other load {:.2} cores",
            ms(self.stopping()),
            ms(self.respawn()),
            ms(self.start()),
            ms(self.flows()),
            self.refused,
            self.failed,
            self.timed_out,
            self.statuses,
            self.outages,
            self.other_load
        )
    }
}

/// CPU times at the start of a window: the machine's busy time and this
/// process's (the platform, the agent and the poller run in it).
#[derive(Debug)]
struct Cpu {
    at: Instant,
    machine: f64,
    this: f64,
}

impl Cpu {
    fn now(ticks: f64) -> Cpu {
        Cpu {
            at: Instant::now(),
            machine: machine_busy(ticks),
            this: cpu_secs(std::process::id(), ticks).unwrap_or(0.0),
        }
    }

    /// The cores busy since with something other than this process and
    /// the Node-RED started in the window (all of its time falls in it;
    /// the old one's last moments are not subtracted).
    fn other_load(&self, processes: &[ProcessEvent], ticks: f64) -> f64 {
        let elapsed = self.at.elapsed().as_secs_f64();
        let machine = machine_busy(ticks) - self.machine;
        let this = cpu_secs(std::process::id(), ticks).unwrap_or(0.0) - self.this;
        let node_red = processes
            .iter()
            .filter_map(|(_, pid)| *pid)
            .next_back()
            .and_then(|pid| cpu_secs(pid, ticks).ok())
            .unwrap_or(0.0);
        ((machine - this - node_red) / elapsed.max(1e-3)).max(0.0)
    }
}

/// Seconds of CPU time all cores spent busy since boot (`/proc/stat`: all
/// but idle and iowait).
fn machine_busy(ticks: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let (total, idle) = (
        fields.iter().sum::<f64>(),
        fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0),
    );
    (total - idle) / ticks
}

/// `to - from`, zero when either is unknown or `to` is earlier.
fn since(from: Option<Instant>, to: Option<Instant>) -> Duration {
    match (from, to) {
        (Some(from), Some(to)) => to.saturating_duration_since(from),
        _ => Duration::ZERO,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn header(rounds: usize) -> String {
    (1..=rounds)
        .map(|r| format!("round {r}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

/// Node-RED's version, from the package next to its launcher.
fn node_red_version(launcher: &std::path::Path) -> String {
    let package = launcher
        .parent()
        .and_then(|bin| bin.parent())
        .map(|modules| modules.join("node-red/package.json"));
    package
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "(version unknown)".into())
}

async fn node_version() -> String {
    let out = tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await;
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "(version unknown)".into())
}
