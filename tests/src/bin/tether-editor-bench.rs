//! `tether-editor-bench`: the remote editor through the platform, the
//! tunnel and the agent, with a real Node-RED (`docs/benchmarks.md`,
//! "Editor").
//!
//! ```sh
//! cargo build --release -p tether-e2e -p tether-agent --bins
//! target/release/tether-editor-bench load       # --loads 10
//! target/release/tether-editor-bench sessions   # --sessions 50 --users 5 --hold-secs 20
//! target/release/tether-editor-bench shaped     # --rounds 3 --latency-ms 75 --mbit 4
//! ```
//!
//! - `load`: cold loads of the editor in headless Chromium
//!   (`tests/bench/editor-load.cjs`, playwright-core), through an
//!   in-process platform and an in-process agent, against the same
//!   Node-RED opened directly with the agent's token as an extra header.
//!   The two alternate, one load each per round.
//! - `shaped`: the same loads over a shaped link (`tether_e2e::shaper`:
//!   latency each way, one bandwidth shared by both directions): direct
//!   (Chromium, the link, Node-RED) against the tunnel with the link between
//!   the agent and the platform, first with the platform's asset cache
//!   empty (a first engineer), then a second engineer in a new browser
//!   context with it warm; time and the bytes that crossed the link.
//! - `sessions`: N scripted editor sessions at once (login, the editor's
//!   main requests, the `comms` WebSocket held open) through an in-process
//!   platform to a `tetherd` process that launched Node-RED itself; its
//!   resident memory and CPU from `/proc`.
//!
//! Needs Node-RED (`tests/nodered/install.sh`) and, for `load`, chromium and
//! playwright-core (`tests/browser/install.sh`); the same environment
//! variables as `tests/tests/editor_browser.rs` override where they are.
//! Everything listens on 127.0.0.1 and lives in temporary directories.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode, header};
use tether_agent::config::{Config as AgentConfig, NodeRedConfig, NodeRedMode};
use tether_agent::editor::EditorTarget;
use tether_agent::enroll::{EnrollOptions, enroll};
use tether_agent::node_red::{NodeRed, Permissions};
use tether_agent::{Agent, AgentOptions, TunnelState};
use tether_e2e::bench::{
    Memory, Tetherd, clock_ticks, cpu_secs, free_port, memory, mib, sibling, verdict,
};
use tether_e2e::shaper::{Shape, Shaper, route_tunnel};
use tether_e2e::tools;
use tether_e2e::web::{Client, editor_host};
use tether_platform::{Platform, PlatformConfig, RateLimit, TokenSpec};
use tether_proto::api::Secret;
use tether_proto::grant::Role;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Barrier, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `load`: the tunnel's median total time, as a multiple of direct.
const BUDGET_LOAD_RATIO: f64 = 1.5;
/// `shaped`: a cold load through the tunnel, as a multiple of direct.
const BUDGET_SHAPED_COLD: f64 = 0.6;
/// `shaped`: a second engineer's load (cache warm), as a multiple of direct.
const BUDGET_SHAPED_WARM: f64 = 0.25;
/// `shaped`: bytes over the device link on a warm load, as a share of the
/// direct load's.
const BUDGET_SHAPED_WARM_BYTES: f64 = 0.10;
/// `sessions`: `tetherd`'s resident memory, KiB.
const BUDGET_SESSIONS_RSS_KIB: u64 = 32 * 1024;

/// The requests of one scripted editor session, as the editor makes them
/// on a cold load (Node-RED 4, `EDITOR_BENCH_DEBUG=1` of the browser script
/// lists them; the icons and type definitions left out), relative to the editor's root, with their `Accept`.
const SESSION_REQUESTS: &[(&str, &str)] = &[
    ("", "text/html"),
    ("vendor/jquery/css/base/jquery-ui.min.css", "text/css"),
    ("vendor/font-awesome/css/font-awesome.min.css", "text/css"),
    ("red/style.min.css", "text/css"),
    ("vendor/monaco/style.css", "text/css"),
    ("vendor/monaco/monaco-bootstrap.js", "*/*"),
    ("red/main.min.js", "*/*"),
    ("vendor/vendor.js", "*/*"),
    ("red/red.min.js", "*/*"),
    ("vendor/monaco/dist/editor.js", "*/*"),
    ("theme", "application/json"),
    ("locales/editor?lng=en-US", "application/json"),
    ("locales/node-red?lng=en-US", "application/json"),
    ("locales/jsonata?lng=en-US", "application/json"),
    ("locales/infotips?lng=en-US", "application/json"),
    ("settings", "application/json"),
    ("settings/user", "application/json"),
    ("red/keymap.json", "application/json"),
    ("plugins", "application/json"),
    ("plugins/messages?lng=en-US", "application/json"),
    ("nodes", "application/json"),
    ("nodes/messages?lng=en-US", "application/json"),
    ("icons", "application/json"),
    ("nodes", "text/html"),
    ("flows", "application/json"),
    (
        "vendor/font-awesome/fonts/fontawesome-webfont.woff2?v=4.7.0",
        "*/*",
    ),
];

#[derive(Debug, Parser)]
#[command(
    name = "tether-editor-bench",
    about = "The remote Node-RED editor through the platform, the tunnel and tetherd (127.0.0.1 only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Cold editor loads in Chromium: through the tunnel against direct.
    Load(LoadArgs),
    /// Concurrent scripted editor sessions: tetherd's memory and CPU.
    Sessions(SessionsArgs),
    /// Editor loads over a shaped link (latency, shared bandwidth): direct,
    /// through the tunnel with the platform's asset cache empty, and by a
    /// second engineer with it warm.
    Shaped(ShapedArgs),
}

#[derive(Debug, Args)]
struct ShapedArgs {
    /// Rounds of one load per contender (after one warm-up load each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// One-way latency of the link, milliseconds.
    #[arg(long, default_value_t = 75)]
    latency_ms: u64,
    /// The link's bandwidth, shared by both directions, Mbit/s.
    #[arg(long, default_value_t = 4.0)]
    mbit: f64,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Measured loads per contender (after one warm-up load each).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    loads: u32,
}

#[derive(Debug, Args)]
struct SessionsArgs {
    /// Editor sessions at once, each with its own login.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    sessions: u32,
    /// Platform users the sessions log in as, round robin.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    users: u32,
    /// Seconds all the comms WebSockets stay open after the loads.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=600))]
    hold_secs: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Bench::Load(args) => load(args).await,
        Bench::Sessions(args) => sessions(args).await,
        Bench::Shaped(args) => shaped(args).await,
    }
}

// --- shared -----------------------------------------------------------------

/// An in-process platform whose login rate limit does not get in the way,
/// with `users` owners of team `default` (password: their name twice).
async fn start_platform(dir: &Path, users: u32) -> Result<Platform> {
    let mut config = PlatformConfig::new(dir.join("platform"), "127.0.0.1:0".parse()?);
    config.login_rate = RateLimit {
        burst: 10_000,
        refill: Duration::from_millis(1),
    };
    let platform = Platform::start(config).await?;
    for i in 0..users {
        let name = user_name(i);
        platform
            .add_user(&name, "default", Role::Owner, &Secret::new(password(&name)))
            .await?;
    }
    Ok(platform)
}

fn user_name(i: u32) -> String {
    format!("bench{i}")
}

fn password(name: &str) -> String {
    format!("{name}-{name}-password")
}

/// The value at quantile `q` of `values` (sorted here), nearest rank.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

// --- load -------------------------------------------------------------------

/// One cold load, as the browser script reports it.
#[derive(Clone, Copy, Debug, serde::Deserialize)]
struct Loaded {
    palette_ms: f64,
    idle_ms: f64,
    requests: u32,
    failed: u32,
    errors: u32,
    body_bytes: u64,
    header_bytes: u64,
    websockets: u32,
}

struct Browser {
    child: Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Browser {
    async fn start() -> Result<Browser> {
        let playwright = tools::playwright_core()
            .find()
            .map_err(anyhow::Error::msg)?;
        let chromium = tools::chromium().find().map_err(anyhow::Error::msg)?;
        let mut child = Command::new("node")
            .arg(tools::workspace().join("tests/bench/editor-load.cjs"))
            .env("PLAYWRIGHT_CORE", playwright)
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run node")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut browser = Browser {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        let ready = browser.line().await?;
        ensure!(ready.contains("ready"), "the browser script said {ready}");
        Ok(browser)
    }

    async fn close(self) {
        let mut child = self.child;
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }

    async fn line(&mut self) -> Result<String> {
        let line = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .context("the browser script did not answer within 120 s")??;
        line.context("the browser script ended")
    }

    async fn load(&mut self, command: &serde_json::Value) -> Result<Loaded> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        let line = self.line().await?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(error) = value.get("error") {
            bail!("a load failed: {error}");
        }
        let loaded: Loaded = serde_json::from_value(value)?;
        ensure!(
            loaded.failed == 0 && loaded.errors == 0,
            "a load had {} failed requests and {} error answers: {line}",
            loaded.failed,
            loaded.errors
        );
        Ok(loaded)
    }
}

/// Node-RED, the platform and the agent of the `load` and `shaped`
/// benchmarks, in-process, and the browser's commands for each contender.
struct Setup {
    _dir: tempfile::TempDir,
    platform: Platform,
    node_red: NodeRed,
    agent: Agent,
    auth: Arc<tether_agent::node_red::LocalAuth>,
    /// Node-RED's port.
    port: u16,
    device: String,
    /// With a shaped link: the shaper between the agent and the platform's
    /// tunnel port, and the one in front of Node-RED for the direct loads.
    shaped: Option<(Shaper, Shaper)>,
}

impl Setup {
    /// Starts everything; with `shape`, the agent's tunnel goes through a
    /// shaper of that shape (its identity's tunnel URL points there), and a
    /// second shaper of the same shape stands in front of Node-RED.
    async fn start(users: u32, shape: Option<Shape>) -> Result<Setup> {
        let node_red_bin = tools::node_red().find().map_err(anyhow::Error::msg)?;
        let dir = tempfile::tempdir()?;
        tools::traversable(dir.path());
        let platform = start_platform(dir.path(), users).await?;
        let state = dir.path().join("agent");
        let token = platform.create_token(TokenSpec::default()).await?;
        let mut options = EnrollOptions::new(platform.url(), token, &state);
        options.ca = Some(platform.ca_path());
        options.name = Some("bench".into());
        enroll(&options).await?;

        // Node-RED, started and locked down as the agent does it; its token
        // signer is shared by the agent under test and the direct contender.
        let port = free_port()?;
        let node_red = NodeRed::start(
            &NodeRedConfig {
                mode: NodeRedMode::Launch,
                command: node_red_bin.display().to_string(),
                user_dir: Some(dir.path().join("node-red")),
                port,
                user: tools::node_red_user(),
                ..NodeRedConfig::default()
            },
            &state,
        )?
        .context("Node-RED is configured")?;
        node_red
            .ready(Duration::from_secs(60))
            .await
            .context("Node-RED did not come up")?;
        let shaped = match shape {
            Some(shape) => {
                let tunnel = Shaper::start(platform.local_addr(), shape).await?;
                route_tunnel(&state, platform.local_addr().port(), tunnel.addr().port())?;
                let direct = Shaper::start(node_red.addr(), shape).await?;
                Some((tunnel, direct))
            }
            None => None,
        };
        let auth = node_red.auth();
        let signer = auth.clone();
        let target = EditorTarget {
            addr: node_red.addr(),
            admin_root: "/".into(),
            auth: Some(Arc::new(move |user: &str, permissions: &[&str]| {
                signer.token(user, &Permissions::from_list(permissions))
            })),
            assets: tether_agent::editor::assets::public_dir_of(
                &node_red_bin.display().to_string(),
            ),
            ..EditorTarget::default()
        };
        let agent = Agent::start_with(
            AgentConfig::for_state_dir(&state),
            AgentOptions {
                editor: Some(target),
            },
        )
        .await?;
        let mut status = agent.status();
        tokio::time::timeout(
            Duration::from_secs(20),
            status.wait_for(|s| s.state == TunnelState::Connected),
        )
        .await
        .context("the tunnel did not come up within 20 s")??;
        let device = agent.device_id();
        Ok(Setup {
            _dir: dir,
            platform,
            node_red,
            agent,
            auth,
            port,
            device,
            shaped,
        })
    }

    /// A load through the platform as user `i`.
    fn tunnel_cmd(&self, i: u32) -> serde_json::Value {
        let user = user_name(i);
        let base = self.platform.url();
        serde_json::json!({
            "kind": "tunnel",
            "url": format!("{base}/devices/{}/editor/", self.device),
            "base": base,
            "editor_origin": format!("https://{}", editor_host(&self.device, self.platform.local_addr().port())),
            "user": user,
            "password": password(&user),
        })
    }

    /// A direct load of Node-RED at `port` with the agent's token for user
    /// 0 as an owner.
    fn direct_cmd(&self, port: u16) -> serde_json::Value {
        let owner = Permissions::for_role(Role::Owner, false);
        serde_json::json!({
            "kind": "direct",
            "url": format!("http://127.0.0.1:{port}/"),
            // The agent's own token for this user and role: the same
            // header value the agent puts on the requests it proxies.
            "token": self.auth.token(&user_name(0), &owner),
        })
    }

    async fn shutdown(self) {
        self.agent.shutdown().await;
        self.node_red.shutdown().await;
        self.platform.shutdown().await;
    }
}

async fn load(args: LoadArgs) -> Result<()> {
    let mut browser = Browser::start().await?;
    let setup = Setup::start(1, None).await?;
    let tunnel_cmd = setup.tunnel_cmd(0);
    let direct_cmd = || setup.direct_cmd(setup.port);
    // Every tunnel load is cold: the platform's asset cache is emptied
    // first (the `shaped` benchmark measures warm loads).
    let platform = &setup.platform;

    eprintln!("warming up: one load each");
    browser.load(&direct_cmd()).await?;
    platform.clear_editor_cache();
    browser.load(&tunnel_cmd).await?;
    let mut direct = Vec::new();
    let mut tunnel = Vec::new();
    for round in 0..args.loads {
        for first in [round % 2 == 0, round % 2 == 1] {
            if first {
                direct.push(browser.load(&direct_cmd()).await?);
            } else {
                platform.clear_editor_cache();
                tunnel.push(browser.load(&tunnel_cmd).await?);
            }
        }
        eprintln!(
            "round {}/{}: direct {:.0} ms, tunnel {:.0} ms (last response)",
            round + 1,
            args.loads,
            direct.last().map_or(0.0, |l| l.idle_ms),
            tunnel.last().map_or(0.0, |l| l.idle_ms),
        );
    }

    println!(
        "\n## tether-editor-bench load: {} cold loads per contender, alternating\n",
        args.loads
    );
    println!(
        "| contender | palette rendered p50 | p90 | last response (all requests) p50 | p90 | requests | response bodies | response headers | comms WebSockets |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let summary = |loads: &[Loaded]| {
        let palette: Vec<f64> = loads.iter().map(|l| l.palette_ms).collect();
        let idle: Vec<f64> = loads.iter().map(|l| l.idle_ms).collect();
        (
            quantile(&palette, 0.5),
            quantile(&palette, 0.9),
            quantile(&idle, 0.5),
            quantile(&idle, 0.9),
        )
    };
    let row = |name: &str, loads: &[Loaded]| {
        let (p50, p90, i50, i90) = summary(loads);
        let requests: Vec<f64> = loads.iter().map(|l| f64::from(l.requests)).collect();
        let body: Vec<f64> = loads.iter().map(|l| l.body_bytes as f64).collect();
        let headers: Vec<f64> = loads.iter().map(|l| l.header_bytes as f64).collect();
        let ws: Vec<f64> = loads.iter().map(|l| f64::from(l.websockets)).collect();
        println!(
            "| {name} | {p50:.0} ms | {p90:.0} ms | {i50:.0} ms | {i90:.0} ms | {:.0} | {:.1} KiB | {:.1} KiB | {:.0} |",
            quantile(&requests, 0.5),
            quantile(&body, 0.5) / 1024.0,
            quantile(&headers, 0.5) / 1024.0,
            quantile(&ws, 0.5),
        );
    };
    row("direct (Node-RED on 127.0.0.1, token header)", &direct);
    row("through platform, tunnel and agent", &tunnel);
    let (d50, d90, di50, di90) = summary(&direct);
    let (t50, t90, ti50, ti90) = summary(&tunnel);
    println!(
        "| ratio tunnel / direct | {:.2} | {:.2} | {:.2} | {:.2} | | | | |",
        t50 / d50,
        t90 / d90,
        ti50 / di50,
        ti90 / di90
    );
    println!();
    verdict(
        ti50 / di50 < BUDGET_LOAD_RATIO,
        format!(
            "cold load to the last response: tunnel {ti50:.0} ms, direct {di50:.0} ms (p50), {:.2}x (budget < {BUDGET_LOAD_RATIO}x)",
            ti50 / di50
        ),
    );
    verdict(
        t50 / d50 < BUDGET_LOAD_RATIO,
        format!(
            "cold load to the palette rendered: tunnel {t50:.0} ms, direct {d50:.0} ms (p50), {:.2}x (budget < {BUDGET_LOAD_RATIO}x)",
            t50 / d50
        ),
    );

    browser.close().await;
    setup.shutdown().await;
    Ok(())
}

// --- shaped -----------------------------------------------------------------

/// One load and the bytes that crossed the shaped link meanwhile.
#[derive(Clone, Copy, Debug)]
struct Shaped {
    loaded: Loaded,
    crossed: u64,
}

async fn shaped_load(
    browser: &mut Browser,
    shaper: &Shaper,
    command: &serde_json::Value,
) -> Result<Shaped> {
    shaper.reset_bytes();
    let loaded = browser.load(command).await?;
    Ok(Shaped {
        loaded,
        crossed: shaper.bytes().total(),
    })
}

async fn shaped(args: ShapedArgs) -> Result<()> {
    let shape = Shape::new(args.latency_ms, args.mbit);
    let mut browser = Browser::start().await?;
    let setup = Setup::start(2, Some(shape)).await?;
    let (tunnel_link, direct_link) = setup.shaped.as_ref().context("no shaped link")?;
    // A fresh local token for each direct load: the agent's expire.
    let direct_cmd = || setup.direct_cmd(direct_link.addr().port());
    let (first_cmd, second_cmd) = (setup.tunnel_cmd(0), setup.tunnel_cmd(1));
    let platform = &setup.platform;

    eprintln!(
        "link: {} ms each way, {} Mbit/s shared; warming up: one load each",
        args.latency_ms, args.mbit
    );
    shaped_load(&mut browser, direct_link, &direct_cmd()).await?;
    platform.clear_editor_cache();
    shaped_load(&mut browser, tunnel_link, &first_cmd).await?;
    let (mut direct, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let direct_first = round % 2 == 0;
        if direct_first {
            direct.push(shaped_load(&mut browser, direct_link, &direct_cmd()).await?);
        }
        platform.clear_editor_cache();
        cold.push(shaped_load(&mut browser, tunnel_link, &first_cmd).await?);
        let (bytes, files) = platform.editor_cache_usage();
        warm.push(shaped_load(&mut browser, tunnel_link, &second_cmd).await?);
        if !direct_first {
            direct.push(shaped_load(&mut browser, direct_link, &direct_cmd()).await?);
        }
        let last = |v: &[Shaped]| {
            v.last()
                .map_or((0.0, 0), |s| (s.loaded.palette_ms, s.crossed))
        };
        let ((d, db), (c, cb), (w, wb)) = (last(&direct), last(&cold), last(&warm));
        eprintln!(
            "round {}/{}: palette rendered: direct {d:.0} ms ({:.0} KiB), first engineer {c:.0} ms ({:.0} KiB), second {w:.0} ms ({:.0} KiB); cache {files} files, {:.0} KiB",
            round + 1,
            args.rounds,
            db as f64 / 1024.0,
            cb as f64 / 1024.0,
            wb as f64 / 1024.0,
            bytes as f64 / 1024.0,
        );
    }

    let median =
        |v: &[Shaped], f: fn(&Shaped) -> f64| quantile(&v.iter().map(f).collect::<Vec<_>>(), 0.5);
    let palette = |s: &Shaped| s.loaded.palette_ms;
    let idle = |s: &Shaped| s.loaded.idle_ms;
    let crossed = |s: &Shaped| s.crossed as f64;
    let body = |s: &Shaped| s.loaded.body_bytes as f64;
    println!(
        "\n## tether-editor-bench shaped: {} ms each way, {} Mbit/s shared, {} rounds\n",
        args.latency_ms, args.mbit, args.rounds
    );
    println!(
        "| contender | palette rendered p50 | x direct | last response p50 | x direct | bytes over the link p50 | x direct | response bodies (browser) p50 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let (dp, di, dc) = (
        median(&direct, palette),
        median(&direct, idle),
        median(&direct, crossed),
    );
    for (name, loads) in [
        ("direct (browser - link - Node-RED)", &direct),
        ("tunnel, first engineer (platform cache empty)", &cold),
        ("tunnel, second engineer (platform cache warm)", &warm),
    ] {
        let (p, i, c) = (
            median(loads, palette),
            median(loads, idle),
            median(loads, crossed),
        );
        println!(
            "| {name} | {p:.0} ms | {:.2} | {i:.0} ms | {:.2} | {:.0} KiB | {:.3} | {:.0} KiB |",
            p / dp,
            i / di,
            c / 1024.0,
            c / dc,
            median(loads, body) / 1024.0
        );
    }
    println!();
    let (cp, ci) = (median(&cold, palette), median(&cold, idle));
    let (wp, wi, wc) = (
        median(&warm, palette),
        median(&warm, idle),
        median(&warm, crossed),
    );
    for (what, t, d, budget) in [
        ("first load, palette rendered", cp, dp, BUDGET_SHAPED_COLD),
        ("first load, last response", ci, di, BUDGET_SHAPED_COLD),
        (
            "second engineer, palette rendered",
            wp,
            dp,
            BUDGET_SHAPED_WARM,
        ),
        ("second engineer, last response", wi, di, BUDGET_SHAPED_WARM),
    ] {
        verdict(
            t / d <= budget,
            format!(
                "{what}: {t:.0} ms against direct {d:.0} ms (p50), {:.2}x (budget <= {budget}x)",
                t / d
            ),
        );
    }
    verdict(
        wc / dc < BUDGET_SHAPED_WARM_BYTES,
        format!(
            "second engineer, bytes over the device link: {:.0} KiB against direct {:.0} KiB, {:.1} % (budget < {:.0} %)",
            wc / 1024.0,
            dc / 1024.0,
            wc / dc * 100.0,
            BUDGET_SHAPED_WARM_BYTES * 100.0
        ),
    );
    browser.close().await;
    setup.shutdown().await;
    Ok(())
}

// --- sessions ---------------------------------------------------------------

/// What one session did.
#[derive(Clone, Copy, Debug, Default)]
struct Session {
    load: Duration,
    ws_open: Duration,
    bytes: u64,
    ws_messages: u64,
}

async fn session(
    client: Client,
    host: String,
    cookie: String,
    start: Arc<Barrier>,
    mut hold: watch::Receiver<bool>,
    loaded: tokio::sync::mpsc::UnboundedSender<Session>,
) -> Result<Session> {
    start.wait().await;
    let began = Instant::now();
    let mut conn = client.connect().await?;
    let mut result = Session::default();
    for (path, accept) in SESSION_REQUESTS {
        let answer = client
            .send(
                &mut conn,
                &host,
                Method::GET,
                &format!("/{path}"),
                &[("cookie", &cookie), ("accept", accept)],
                Bytes::new(),
            )
            .await?;
        ensure!(
            answer.status == StatusCode::OK,
            "GET /{path} answered {}",
            answer.status
        );
        result.bytes += answer.size;
    }
    result.load = began.elapsed();
    let mut request = format!("wss://{host}/comms").into_client_request()?;
    request
        .headers_mut()
        .insert(header::COOKIE, cookie.parse()?);
    request
        .headers_mut()
        .insert(header::ORIGIN, format!("https://{host}").parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(request, client.tls().await?).await?;
    // What the editor sends once comms is up.
    for topic in [
        "notification/#",
        "status/#",
        "debug",
        "event-log/#",
        "notification/runtime-deploy",
    ] {
        ws.send(Message::text(format!(r#"{{"subscribe":"{topic}"}}"#)))
            .await?;
    }
    result.ws_open = began.elapsed();
    let _ = loaded.send(result);
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(_)) => result.ws_messages += 1,
                Some(Err(e)) => bail!("comms failed: {e}"),
                None => bail!("comms closed early"),
            },
            _ = hold.changed() => break,
        }
    }
    let _ = ws.close(None).await;
    Ok(result)
}

/// The first child process of `pid` (the Node-RED `tetherd` launched).
fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn sessions(args: SessionsArgs) -> Result<()> {
    let node_red_bin = tools::node_red().find().map_err(anyhow::Error::msg)?;
    let tetherd = sibling("tetherd")?;
    let ticks = clock_ticks().await;
    let dir = tempfile::tempdir()?;
    tools::traversable(dir.path());
    let platform = start_platform(dir.path(), args.users).await?;
    let port = free_port()?;
    let user = tools::node_red_user()
        .map(|u| format!("user = {u:?}\n"))
        .unwrap_or_default();
    let extra = format!(
        "[node_red]\nmode = \"launch\"\ncommand = {:?}\nport = {port}\n{user}",
        node_red_bin.display().to_string(),
    );
    let agent = Tetherd::start(&tetherd, &platform, dir.path(), &extra).await?;
    let (pid, device) = (agent.pid, agent.device.clone());
    tether_agent::node_red::wait_ready(([127, 0, 0, 1], port).into(), Duration::from_secs(60))
        .await
        .context("Node-RED did not come up")?;
    let node_red_pid = first_child(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = memory(pid)?;
    let cpu_idle = cpu_secs(pid, ticks)?;

    let client = Client::new(&platform)?;
    let host = editor_host(&device, platform.local_addr().port());
    eprintln!("logging in {} sessions", args.sessions);
    let mut cookies = Vec::new();
    for i in 0..args.sessions {
        let session = client
            .login(
                &user_name(i % args.users),
                &password(&user_name(i % args.users)),
            )
            .await?;
        cookies.push(client.editor_cookie(&session, &device).await?);
    }

    // A sampler for the peak between two reads of VmHWM.
    let (stop_sampler, mut stopped) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut peak = 0u64;
        loop {
            if let Ok(m) = memory(pid) {
                peak = peak.max(m.rss);
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stopped.changed() => return peak,
            }
        }
    });

    let n = args.sessions as usize;
    let start = Arc::new(Barrier::new(n + 1));
    let (release, hold) = watch::channel(false);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut set = JoinSet::new();
    for cookie in cookies {
        set.spawn(session(
            client.clone(),
            host.clone(),
            cookie,
            start.clone(),
            hold.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let cpu_before = cpu_secs(pid, ticks)?;
    start.wait().await;
    let began = Instant::now();
    let mut ready = Vec::with_capacity(n);
    while ready.len() < n {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => ready.push(s),
                None => break,
            },
            Some(done) = set.join_next() => {
                done??;
                bail!("a session ended before its comms was up");
            }
            () = tokio::time::sleep(Duration::from_secs(120)) => bail!("only {} of {n} sessions loaded within 120 s", ready.len()),
        }
    }
    let all_open = began.elapsed();
    let cpu_loaded = cpu_secs(pid, ticks)?;
    let loaded = memory(pid)?;
    eprintln!(
        "{n} sessions loaded and holding comms in {:.2} s; holding {} s",
        all_open.as_secs_f64(),
        args.hold_secs
    );
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let held = memory(pid)?;
    let cpu_held = cpu_secs(pid, ticks)?;
    let node_red_held = node_red_pid.and_then(|p| memory(p).ok());
    release.send(true)?;
    let mut messages = 0;
    while let Some(done) = set.join_next().await {
        messages += done??.ws_messages;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let closed = memory(pid)?;
    let cpu_closed = cpu_secs(pid, ticks)?;
    stop_sampler.send(true)?;
    let peak = sampler.await?.max(closed.hwm);

    let loads: Vec<f64> = ready.iter().map(|s| s.load.as_secs_f64() * 1e3).collect();
    let opens: Vec<f64> = ready
        .iter()
        .map(|s| s.ws_open.as_secs_f64() * 1e3)
        .collect();
    let bytes: u64 = ready.iter().map(|s| s.bytes).sum();
    println!(
        "\n## tether-editor-bench sessions: {n} editor sessions at once ({} users), a tetherd process with Node-RED\n",
        args.users
    );
    println!(
        "Each session: its own login, {} requests on one keep-alive connection ({:.1} MiB in all, {:.0} KiB each), then the comms WebSocket, held {} s ({messages} messages received in all).\n",
        SESSION_REQUESTS.len(),
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / n as f64 / 1024.0,
        args.hold_secs
    );
    println!(
        "All {n} loaded with comms open after {:.2} s; per session: requests p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms; comms open p50 {:.0} ms, max {:.0} ms.\n",
        all_open.as_secs_f64(),
        quantile(&loads, 0.5),
        quantile(&loads, 0.9),
        quantile(&loads, 1.0),
        quantile(&opens, 0.5),
        quantile(&opens, 1.0),
    );
    println!("| tetherd | VmRSS | VmHWM | RssAnon | RssFile | tetherd CPU-s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let row = |name: &str, m: Memory, cpu: Option<f64>| {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            mib(m.rss),
            mib(m.hwm),
            mib(m.anon),
            mib(m.file),
            cpu.map_or(String::new(), |c| format!("{c:.2}"))
        );
    };
    row("tunnel up, Node-RED up, no session", idle, Some(cpu_idle));
    row(
        &format!("{n} sessions loaded, comms open"),
        loaded,
        Some(cpu_loaded - cpu_before),
    );
    row(
        &format!("after {} s with {n} comms open", args.hold_secs),
        held,
        Some(cpu_held - cpu_loaded),
    );
    row(
        "5 s after all sessions closed",
        closed,
        Some(cpu_closed - cpu_held),
    );
    if let Some(m) = node_red_held {
        println!(
            "\nFor scale, Node-RED (its own process) with {n} comms open: VmRSS {}, VmHWM {}.",
            mib(m.rss),
            mib(m.hwm)
        );
    }
    println!(
        "\ntetherd's peak VmRSS (sampled every 20 ms, and VmHWM): {}\n",
        mib(peak)
    );
    verdict(
        peak < BUDGET_SESSIONS_RSS_KIB,
        format!(
            "tetherd peak resident memory with {n} editor sessions {} (budget < {})",
            mib(peak),
            mib(BUDGET_SESSIONS_RSS_KIB)
        ),
    );

    agent.stop(Duration::from_secs(15)).await?;
    platform.shutdown().await;
    Ok(())
}
