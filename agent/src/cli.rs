//! The command line: `tetherd enroll`, `tetherd run`, `tetherd status`.
//!
//! This is the binary's edge: parse arguments, set up logging, run, and map
//! every failure to one line on stderr and a documented exit code
//! (`docs/operations.md`). It holds no agent logic.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tether_proto::api::ProvisioningToken;
use tracing::{error, info, warn};

use crate::agent::Agent;
use crate::clock::Clock;
use crate::config::{Config, DEFAULT_STATE_DIR};
use crate::enroll::{self, EnrollOptions};
use crate::exit;
use crate::identity::StateDir;
use crate::status;

/// The agent's version and the tunnel protocol version it speaks. `concat!`
/// takes only literals, so a test checks the protocol part against
/// `tether_proto::PROTOCOL_VERSION`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (tunnel protocol 1.0)");

/// The environment variable that overrides the log filter (EnvFilter syntax).
pub const LOG_ENV: &str = "TETHERD_LOG";

const ENROLL_EXIT_CODES: &str = "\
Exit codes:
  0   enrolled
  64  usage: bad arguments, platform URL or device name
  65  token rejected: malformed, unknown, revoked, already used or expired
      (also: no token given, or an unreadable --token-file)
  69  platform unreachable: DNS, connection refused, timeout
  70  internal error (key generation)
  73  cannot write the state directory, or already enrolled (use --force)
  75  temporary: rate limited or platform overloaded; retry later
  76  protocol: the platform answered something unexpected
  77  not trusted: the platform's certificate does not chain to the CA the
      token names, or the --ca file is not that CA
  78  config: unreadable --ca or --config file, a --token-file or a config
      holding a token that others can read, or the device clock is far off

The token is never read from the command line: pass it on stdin
(--token-stdin, or --token -), in an owner-only file (--token-file), or in
the TETHER_TOKEN environment variable.";

/// The environment variable `tetherd enroll` reads the token from.
pub const TOKEN_ENV: &str = "TETHER_TOKEN";
/// Longest token input read from stdin or a file, in bytes.
const MAX_TOKEN_INPUT: u64 = 1024;

/// Tether device agent: keeps one outbound mutual-TLS tunnel to the platform
/// and carries editor access, MQTT and control traffic over it.
#[derive(Debug, Parser)]
#[command(name = "tetherd", version = VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this device with a platform using a one-time provisioning token.
    #[command(after_help = ENROLL_EXIT_CODES)]
    Enroll(EnrollArgs),
    /// Run the agent: keep the tunnel to the platform up.
    Run(RunArgs),
    /// Show whether the device is enrolled and what the daemon is doing.
    Status(StatusArgs),
    /// Act on the device's signed snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Check what the agent needs, one line per check with what to do when
    /// it fails: config, state directory, identity and certificate, the
    /// platform (DNS, TCP, TLS), the clock, the local Node-RED, free disk.
    #[command(after_help = "Exit codes: 0 nothing failed (warnings allowed); 1 a check failed")]
    Doctor(DoctorArgs),
}

/// Where the agent's state is: its config file, or the state directory.
#[derive(Debug, Args)]
struct Where {
    /// The agent's config file (the state directory and the rest from it).
    #[arg(long, value_name = "FILE", conflicts_with = "state_dir")]
    config: Option<PathBuf>,
    /// The state directory, without a config file [default: /var/lib/tether].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DoctorArgs {
    #[command(flatten)]
    at: Where,
    /// Print JSON: a list of {name, verdict, detail, help}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Switch in the snapshot staged outside the maintenance window now,
    /// as someone on site who knows the line may restart; waits for the
    /// outcome. Recorded as an audit event with your account.
    #[command(after_help = APPLY_NOW_EXIT_CODES)]
    ApplyNow(ApplyNowArgs),
}

const APPLY_NOW_EXIT_CODES: &str = "Exit codes: 0 applied; 1 rolled back or rejected; \
69 the agent is not running or nothing is staged; 75 no outcome within --wait; 78 bad config";

#[derive(Debug, Args)]
struct ApplyNowArgs {
    #[command(flatten)]
    at: Where,
    /// How long to wait for the outcome [default: the health timeout and a minute].
    #[arg(long, value_name = "DURATION")]
    wait: Option<String>,
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The platform's URL, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    platform: Option<String>,
    /// Only `--token -` (read the token from stdin) is accepted: a token on
    /// the command line would show in the process list and shell history.
    #[arg(long, value_name = "-", hide = true)]
    token: Option<String>,
    /// Read the provisioning token from stdin (one line).
    #[arg(long, conflicts_with_all = ["token", "token_file"])]
    token_stdin: bool,
    /// Read the provisioning token from FILE, which must be owner-only
    /// (chmod 600). Without a token option: $TETHER_TOKEN, then the
    /// config's provisioning_token.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The platform's CA certificate (PEM), optional: the token already
    /// names the CA, and this file must hold that same CA.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Where to keep the identity [default: the config's, or /var/lib/tether].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The device's name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Read platform, token, name and state_dir from this config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Replace an existing enrollment.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The config file (TOML).
    #[arg(long, value_name = "FILE", conflicts_with = "state_dir")]
    config: Option<PathBuf>,
    /// Run without a config file, with the identity in DIR and no services.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Log lines as: `auto` (the journal when systemd started tetherd,
    /// else text), `text` or `json` (one object per line, on stderr).
    #[arg(long, value_name = "FORMAT", default_value = "auto", value_parser = ["auto", "text", "json"])]
    log_format: String,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    at: Where,
    /// Print JSON (a stable format) instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `tetherd` with the process's arguments.
pub fn main() -> ExitCode {
    ExitCode::from(main_with(std::env::args_os()))
}

/// Runs `tetherd` with `args` (the program name first); the exit code.
pub fn main_with<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::Enroll(args) => enroll_command(args),
        Command::Run(args) => run_command(args),
        Command::Status(args) => status_command(args),
        Command::Snapshot(SnapshotCommand::ApplyNow(args)) => apply_now_command(args),
        Command::Doctor(args) => doctor_command(args),
    }
}

fn fail(message: impl std::fmt::Display, code: u8) -> u8 {
    eprintln!("tetherd: {message}");
    code
}

fn load_config(path: Option<&PathBuf>, state_dir: Option<&PathBuf>) -> Result<Config, u8> {
    let mut config = match path {
        Some(path) => Config::load(path).map_err(|e| fail(e, exit::CONFIG))?,
        None => Config::for_state_dir(DEFAULT_STATE_DIR),
    };
    if let Some(dir) = state_dir {
        config.state_dir = dir.clone();
    }
    Ok(config)
}

/// One thread drives everything: the tunnel, its streams and the local
/// connections. A gateway has one to four slow cores, and a wake-up that
/// crosses threads costs more than the work it hands over (measured in
/// `docs/benchmarks.md`: less CPU per byte, shorter round trips and less
/// memory than two workers). File syncs and other blocking work go to the
/// blocking pool.
fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the runtime: {e}"), exit::SOFTWARE))
}

fn enroll_command(args: EnrollArgs) -> u8 {
    let config = match load_config(args.config.as_ref(), args.state_dir.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(platform) = args.platform.clone().or(config.platform.clone()) else {
        return fail(
            "enroll needs --platform https://HOST:PORT (or platform in the config)",
            exit::USAGE,
        );
    };
    let token = match read_token(&args, &config) {
        Ok(token) => token,
        Err(code) => return code,
    };
    let options = EnrollOptions {
        platform,
        token,
        ca: args.ca.or(config.ca.clone()),
        state_dir: config.state_dir.clone(),
        name: args.name.or(config.name.clone()),
        force: args.force,
        clock: Clock::system(),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(enroll::enroll(&options)) {
        Ok(enrolled) => {
            let id = &enrolled.identity;
            println!(
                "enrolled as {} ('{}') with {}; identity stored in '{}'",
                id.device_id,
                id.name,
                id.platform,
                options.state_dir.display()
            );
            if enrolled.clock_skew_secs.unsigned_abs() > enroll::MAX_CLOCK_SKEW_SECS {
                eprintln!(
                    "tetherd: warning: the device clock is {} s {} the platform's; help: enable NTP, or certificate checks and renewal will misbehave",
                    enrolled.clock_skew_secs.unsigned_abs(),
                    if enrolled.clock_skew_secs > 0 {
                        "behind"
                    } else {
                        "ahead of"
                    }
                );
            }
            if config.provisioning_token.is_some() {
                eprintln!(
                    "tetherd: the provisioning_token in the config is no longer used and may be removed"
                );
            }
            if let Err(e) = hand_to_owner(&options.state_dir) {
                return fail(
                    format!(
                        "enrolled, but {e}; help: chown -R the agent's user {}",
                        options.state_dir.display()
                    ),
                    exit::CANTCREAT,
                );
            }
            0
        }
        Err(e) => fail(format!("enrollment failed: {e}"), e.exit_code()),
    }
}

/// The token from stdin, an owner-only file, `$TETHER_TOKEN` or the config,
/// in that order; never from argv.
fn read_token(args: &EnrollArgs, config: &Config) -> Result<ProvisioningToken, u8> {
    let text = match (&args.token, args.token_stdin, &args.token_file) {
        (Some(value), _, _) if value != "-" => {
            return Err(fail(
                "the token is not accepted on the command line (it would show in the process list and shell history); help: pass it on stdin with --token-stdin (or --token -), in an owner-only file with --token-file FILE, or in the TETHER_TOKEN environment variable",
                exit::USAGE,
            ));
        }
        (Some(_), _, _) | (None, true, _) => {
            let mut text = String::new();
            let read = std::io::stdin()
                .lock()
                .take(MAX_TOKEN_INPUT)
                .read_to_string(&mut text);
            if let Err(e) = read {
                return Err(fail(
                    format!("cannot read the token from stdin: {e}"),
                    exit::DATAERR,
                ));
            }
            text
        }
        (None, false, Some(path)) => read_token_file(path)?,
        (None, false, None) => match std::env::var(TOKEN_ENV) {
            Ok(text) => text,
            Err(_) => match &config.provisioning_token {
                Some(token) => return Ok(token.clone()),
                None => {
                    return Err(fail(
                        "enroll needs a provisioning token; help: pass it with --token-stdin, --token-file FILE or TETHER_TOKEN (or provisioning_token in an owner-only config)",
                        exit::USAGE,
                    ));
                }
            },
        },
    };
    ProvisioningToken::parse(&text)
        .ok_or_else(|| fail(enroll::EnrollError::TokenMalformed, exit::DATAERR))
}

/// Reads a token file, refused unless only its owner may read it.
fn read_token_file(path: &std::path::Path) -> Result<String, u8> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| {
        fail(
            format!("cannot read the token file '{shown}': {e}"),
            exit::CONFIG,
        )
    })?;
    let mode = file
        .metadata()
        .map_err(|e| {
            fail(
                format!("cannot read the token file '{shown}': {e}"),
                exit::CONFIG,
            )
        })?
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(fail(
            format!(
                "the token file '{shown}' is readable by others (mode {mode:04o}); help: chmod 600 '{shown}'"
            ),
            exit::CONFIG,
        ));
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_INPUT)
        .read_to_string(&mut text)
        .map_err(|e| {
            fail(
                format!("cannot read the token file '{shown}': {e}"),
                exit::CONFIG,
            )
        })?;
    Ok(text)
}

fn run_command(args: RunArgs) -> u8 {
    let config = match load_config(args.config.as_ref(), args.state_dir.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let reload = init_logging(config.log_filter(), &args.log_format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let path = args.config.clone();
    rt.block_on(async move {
        let systemd = crate::systemd::Notifier::from_env();
        let running = config.clone();
        let agent = match Agent::start(config).await {
            Ok(agent) => agent,
            Err(e) => {
                error!(cause = %e, "agent cannot start");
                return fail(&e, e.exit_code());
            }
        };
        let mut status = agent.status();
        systemd.ready(&status.borrow().one_line());
        let signal = serve_signals(&systemd, &mut status, path.as_deref(), &running, &reload).await;
        info!(signal, "stopping");
        systemd.stopping();
        agent.shutdown().await;
        info!("stopped");
        0
    })
}

/// Runs the daemon's main loop until SIGTERM or SIGINT (returns its name):
/// feeds systemd's watchdog, tells it the tunnel's state, and on SIGHUP
/// reloads what can be reloaded.
async fn serve_signals(
    systemd: &crate::systemd::Notifier,
    status: &mut tokio::sync::watch::Receiver<crate::Status>,
    path: Option<&std::path::Path>,
    running: &Config,
    reload: &LogReload,
) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot listen for signals; stop with SIGKILL");
        return std::future::pending().await;
    };
    // The watchdog is fed from this loop: if it stops turning, systemd
    // restarts the agent.
    let every = systemd
        .watchdog_every()
        .unwrap_or(std::time::Duration::from_secs(3600));
    let mut watchdog = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => {
                systemd.reloading();
                reload_config(path, running, reload);
                systemd.ready(&status.borrow().one_line());
            }
            changed = status.changed() => {
                if changed.is_err() {
                    return "the agent's end";
                }
                systemd.status(&status.borrow_and_update().one_line());
            }
            _ = watchdog.tick() => systemd.watchdog(),
        }
    }
}

/// SIGHUP: reads the config again and applies what is safe to change
/// while running (`log_level`); says what else changed and needs a
/// restart. A config that no longer loads changes nothing.
fn reload_config(path: Option<&std::path::Path>, running: &Config, reload: &LogReload) {
    let Some(path) = path else {
        info!("SIGHUP: no config file to reload (started with --state-dir)");
        return;
    };
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(e) => {
            error!(cause = %e, "SIGHUP: the config does not load; nothing changed");
            return;
        }
    };
    if new.log_filter() != running.log_filter() {
        match reload(new.log_filter()) {
            Ok(()) => info!(log_level = new.log_filter(), "SIGHUP: log level changed"),
            Err(e) => warn!(cause = %e, "SIGHUP: the new log level is not valid; kept the old one"),
        }
    }
    let needs_restart = config_changes(running, &new);
    if needs_restart.is_empty() {
        info!("SIGHUP: config reloaded");
    } else {
        warn!(
            changed = %needs_restart.join(", "),
            "SIGHUP: these settings changed and take effect only after a restart (systemctl restart tetherd)"
        );
    }
}

/// The parts of the config that differ, besides the log level.
fn config_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("state_dir", old.state_dir == new.state_dir);
    check("platform", old.platform == new.platform);
    check("name", old.name == new.name);
    check(
        "heartbeat_interval",
        old.heartbeat_interval == new.heartbeat_interval,
    );
    check("[[service]]", old.services == new.services);
    check("[tunnel]", old.tunnel == new.tunnel);
    check("[reconnect]", old.reconnect == new.reconnect);
    check("[renewal]", old.renewal == new.renewal);
    check("[node_red]", old.node_red == new.node_red);
    check("[audit]", old.audit == new.audit);
    check("[snapshot]", old.snapshot == new.snapshot);
    out
}

fn status_command(args: StatusArgs) -> u8 {
    let config = match load_config(args.at.config.as_ref(), args.at.state_dir.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let report = status::report(&StateDir::new(&config.state_dir), Clock::system());
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => return fail(e, exit::SOFTWARE),
        }
    } else {
        print!("{}", status::render(&report, Clock::system()));
    }
    0
}

fn doctor_command(args: DoctorArgs) -> u8 {
    let loaded = match &args.at.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => Ok(Config::for_state_dir(
            args.at
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        )),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let options = crate::doctor::Options::default();
    let checks = rt.block_on(crate::doctor::run(
        loaded.as_ref().map_err(Clone::clone),
        &options,
    ));
    if args.json {
        match serde_json::to_string_pretty(&checks) {
            Ok(json) => println!("{json}"),
            Err(e) => return fail(e, exit::SOFTWARE),
        }
    } else {
        print!("{}", crate::doctor::render(&checks));
    }
    let failed = checks
        .iter()
        .any(|c| c.verdict == crate::doctor::Verdict::Fail);
    u8::from(failed)
}

fn apply_now_command(args: ApplyNowArgs) -> u8 {
    let config = match load_config(args.at.config.as_ref(), args.at.state_dir.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let wait = match args.wait.as_deref().map(crate::duration::parse) {
        None => config.snapshot.health_timeout + std::time::Duration::from_secs(60),
        Some(Ok(d)) => d,
        Some(Err(e)) => return fail(format!("--wait: {e}"), exit::USAGE),
    };
    let state = StateDir::new(&config.state_dir);
    let daemon = status::report(&state, Clock::system()).daemon;
    if !daemon.running {
        return fail(
            "the agent is not running (tetherd status says why); start it first",
            exit::UNAVAILABLE,
        );
    }
    let Some(version) = daemon.snapshot.as_ref().and_then(|s| s.staged) else {
        let last = daemon
            .snapshot
            .as_ref()
            .map(status::snapshot_line)
            .unwrap_or_else(|| "no snapshots".into());
        return fail(
            format!("no snapshot is staged and waiting ({last})"),
            exit::UNAVAILABLE,
        );
    };
    let Some(root) = daemon.snapshot_root.as_deref().map(PathBuf::from) else {
        return fail(
            "the agent runs without a local Node-RED, so it has no snapshots",
            exit::UNAVAILABLE,
        );
    };
    use std::os::unix::fs::MetadataExt;
    // Root or the agent's own user (the state directory's owner) may ask;
    // root's request is handed to the agent's user, which must read it.
    let me = rustix::process::geteuid().as_raw();
    let owner = match std::fs::metadata(&config.state_dir) {
        Ok(meta) => (meta.uid(), meta.gid()),
        Err(e) => {
            return fail(
                format!("cannot read {}: {e}", config.state_dir.display()),
                exit::NOPERM,
            );
        }
    };
    if me != 0 && me != owner.0 {
        return fail(
            format!(
                "only root or the agent's user (uid {}, the owner of {}) may ask the agent; help: sudo tetherd snapshot apply-now",
                owner.0,
                config.state_dir.display()
            ),
            exit::NOPERM,
        );
    }
    let request = crate::snapshot::ApplyNow {
        version,
        by: local_account(),
    };
    let hand_to = (me != owner.0).then_some(owner);
    if let Err(e) = crate::snapshot::request_apply_now(&root, &request, hand_to) {
        return fail(
            format!("{e}; help: run it as root (sudo) or as the agent's user"),
            exit::NOPERM,
        );
    }
    println!(
        "asked the agent to switch in snapshot {version} now; waiting up to {}",
        crate::duration::Human(wait)
    );
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let report = status::report(&state, Clock::system()).daemon;
        let outcome = report.snapshot.and_then(|s| s.outcome).unwrap_or_default();
        if outcome.starts_with(&format!("applied {version}")) {
            println!("{outcome}");
            return 0;
        }
        for failed in ["rolled back", "rejected"] {
            if outcome.starts_with(&format!("{failed} {version}")) {
                println!("{outcome}");
                return 1;
            }
        }
    }
    fail(
        format!("no outcome for snapshot {version} yet; tetherd status shows it when there is one"),
        exit::TEMPFAIL,
    )
}

/// Run as root in a state directory that belongs to another user (the
/// packaged service's `tether`), gives that user what root wrote there: the
/// agent must read its key and identity.
fn hand_to_owner(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(dir)?;
    if rustix::process::geteuid().as_raw() != 0 || owner.uid() == 0 {
        return Ok(());
    }
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.uid() == 0 {
            std::os::unix::fs::lchown(&path, Some(owner.uid()), Some(owner.gid()))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Who runs this command, for the audit trail: `alice (sudo)` or
/// `operator (uid 1000)`.
fn local_account() -> String {
    if let Some(sudo) = std::env::var("SUDO_USER")
        .ok()
        .filter(|u| crate::node_red::user::is_user_name(u))
    {
        return format!("{sudo} (sudo)");
    }
    let uid = rustix::process::getuid().as_raw();
    match crate::node_red::user::name_of(std::path::Path::new("/etc/passwd"), uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// Changes the log filter of a running daemon.
type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Logs to the journal when started by systemd with its journal on stderr
/// (`JOURNAL_STREAM`), to stderr otherwise. `TETHERD_LOG` overrides the
/// config's `log_level` (and a reload's).
fn init_logging(default_filter: &str, format: &str) -> LogReload {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let pinned = std::env::var(LOG_ENV)
        .ok()
        .and_then(|f| EnvFilter::builder().parse(f).ok());
    let from_env = pinned.is_some();
    let filter = pinned.unwrap_or_else(|| EnvFilter::builder().parse_lossy(default_filter));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let reload: LogReload = Box::new(move |text: &str| {
        if from_env {
            return Err(format!("{LOG_ENV} is set and wins over the config"));
        }
        let filter = EnvFilter::builder()
            .parse(text)
            .map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        let json = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr);
        let _ = registry.with(json).try_init();
        return reload;
    }
    if format == "auto"
        && std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry
            .with(journald.with_syslog_identifier("tetherd".into()))
            .try_init();
        return reload;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = registry.with(fmt).try_init();
    reload
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_the_protocol_this_build_speaks() {
        let expected = format!("(tunnel protocol {})", tether_proto::PROTOCOL_VERSION);
        assert!(VERSION.ends_with(&expected), "{VERSION}");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn root_hands_what_it_wrote_in_the_agent_users_state_directory_to_that_user() {
        use std::os::unix::fs::MetadataExt;
        if rustix::process::geteuid().as_raw() != 0 {
            return; // Only root writes files for another user.
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        // Root's own state directory: nothing changes.
        std::fs::write(state.join("identity.json"), "{}").unwrap();
        hand_to_owner(&state).unwrap();
        assert_eq!(
            std::fs::metadata(state.join("identity.json"))
                .unwrap()
                .uid(),
            0
        );
        // The agent user's (uid 1 here): what root wrote becomes its own.
        std::os::unix::fs::chown(&state, Some(1), Some(1)).unwrap();
        std::fs::create_dir(state.join("sub")).unwrap();
        std::fs::write(state.join("sub/device-1.key"), "k").unwrap();
        hand_to_owner(&state).unwrap();
        for path in ["identity.json", "sub", "sub/device-1.key"] {
            let meta = std::fs::metadata(state.join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1, 1), "{path}");
        }
    }
}
