//! The small launcher for `[node_red] mode = "launch"`: starts Node-RED
//! with the agent's settings, forwards its output to the log, starts it
//! again when it exits, and stops it on shutdown.
//!
//! Node-RED runs as `COMMAND -u USER_DIR -s SETTINGS` in its own process
//! group (a Ctrl-C meant for the agent does not reach it; the agent stops
//! it). Restarts wait 1 s doubling to 30 s, reset after a run of a minute.
//! [`CRASH_LOOP_EXITS`] exits within [`CRASH_LOOP_WINDOW`] are a crash loop:
//! the launcher stops restarting and says so ([`CrashLoop`]), rather than
//! restarting a Node-RED that cannot run forever. A Node-RED whose process
//! lives but whose admin API stops answering is hung ([`HangWatch`]): it is
//! stopped and started again, counted like an exit. Stopping sends SIGTERM
//! and, after [`STOP_GRACE`], SIGKILL; dropping the [`Launcher`] kills the
//! process, and Node-RED gets SIGKILL from the kernel when the agent dies
//! (the parent-death signal), so it never outlives a killed agent. Output
//! lines are forwarded to the log at most [`LINES_PER_SEC`] a second (bursts
//! of [`LINE_BURST`]); the lines dropped are counted in the log. [`Launcher::restart`] starts it again at once running
//! another snapshot ([`RunFrom`]); [`Launcher::pause`] and
//! [`Launcher::resume`] stop and start it on request.
//!
//! [`wait_ready`] tells when Node-RED answers, and refuses a listener on the
//! port that answers without a token (not the agent's locked-down Node-RED).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::NodeRedError;
use crate::duration::Human;

/// How long Node-RED gets to stop after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a hung Node-RED gets after SIGTERM before SIGKILL.
pub const HUNG_GRACE: Duration = Duration::from_secs(2);
/// Longest output line forwarded; the rest of a longer line is cut.
pub const MAX_LINE: usize = 4096;
const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the restart delay.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Exits within [`CRASH_LOOP_WINDOW`] that make a crash loop.
pub const CRASH_LOOP_EXITS: usize = 5;
/// See [`CRASH_LOOP_EXITS`].
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);

/// Counts Node-RED's exits; a crash loop is [`CRASH_LOOP_EXITS`] of them
/// within [`CRASH_LOOP_WINDOW`]. Time comes in with each exit.
#[derive(Debug, Default)]
pub struct CrashLoop {
    exits: std::collections::VecDeque<Instant>,
}

impl CrashLoop {
    /// Notes an exit at `now`; true when it completes a crash loop.
    pub fn exited(&mut self, now: Instant) -> bool {
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > CRASH_LOOP_WINDOW)
        {
            self.exits.pop_front();
        }
        self.exits.len() >= CRASH_LOOP_EXITS
    }
}
/// Lines of Node-RED's output forwarded per second, on average.
pub const LINES_PER_SEC: u32 = 50;
/// Lines forwarded in a burst before [`LINES_PER_SEC`] applies.
pub const LINE_BURST: u32 = 200;
/// A starting Node-RED is hung only after this long or the hang timeout,
/// whichever is longer: a gateway may take a while to load many flows.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// Tells when a running Node-RED is hung: its process lives but its admin
/// API has not answered for the hang timeout (before its first answer: for
/// [`START_LIMIT`] or the hang timeout, whichever is longer). Time comes in
/// with every call.
#[derive(Debug)]
pub struct HangWatch {
    timeout: Duration,
    started: Instant,
    last_answer: Option<Instant>,
}

impl HangWatch {
    /// Watching a Node-RED started at `now`.
    pub fn new(timeout: Duration, now: Instant) -> HangWatch {
        HangWatch {
            timeout,
            started: now,
            last_answer: None,
        }
    }

    /// How often to ask: a third of the timeout, from 200 ms to 10 s.
    pub fn every(&self) -> Duration {
        (self.timeout / 3).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }

    /// Notes an answer at `now`.
    pub fn answered(&mut self, now: Instant) {
        self.last_answer = Some(now);
    }

    /// Why Node-RED is hung at `now`, if it is.
    pub fn hung(&self, now: Instant) -> Option<String> {
        match self.last_answer {
            Some(last) if now.saturating_duration_since(last) > self.timeout => Some(format!(
                "its admin API has not answered for {} while its process runs",
                Human(now.saturating_duration_since(last))
            )),
            Some(_) => None,
            None => {
                let limit = self.timeout.max(START_LIMIT);
                (now.saturating_duration_since(self.started) > limit).then(|| {
                    format!(
                        "its admin API has not answered in the {} since it started",
                        Human(limit)
                    )
                })
            }
        }
    }
}

/// Admits Node-RED's output lines into the log at [`LINES_PER_SEC`] with
/// bursts of [`LINE_BURST`] (a token bucket), counting what it drops. Time
/// comes in with every line.
#[derive(Debug)]
pub struct LineBudget {
    tokens: f64,
    at: Instant,
    dropped: u64,
}

impl LineBudget {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> LineBudget {
        LineBudget {
            tokens: f64::from(LINE_BURST),
            at: now,
            dropped: 0,
        }
    }

    /// Whether a line at `now` goes to the log: `Some(n)` when it does,
    /// `n` being the lines dropped since the last one that did.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let since = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + since * f64::from(LINES_PER_SEC)).min(f64::from(LINE_BURST));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            None
        }
    }
}

const PROBE_EVERY: Duration = Duration::from_millis(200);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What to start.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// A program name looked up in `PATH`, or an absolute path.
    pub command: String,
    pub user_dir: PathBuf,
    pub settings: PathBuf,
    /// Where the settings make Node-RED listen.
    pub addr: SocketAddr,
    /// The user to run Node-RED as (the agent can switch users), or `None` to
    /// run it as the agent's own user (`super::user`).
    pub run_as: Option<super::user::RunAs>,
    /// A running Node-RED whose admin API has not answered for this long is
    /// hung and restarted ([`HangWatch`]).
    pub hang_timeout: Duration,
}

/// What Node-RED runs: a snapshot's folder (its controlled settings, read
/// by the agent's settings file), the flows file to use and the snapshot's
/// environment variables; or, by default, the flows in its user directory.
/// Read at every start, so a change takes effect at the next (re)start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunFrom {
    /// The snapshot version's folder (resolved, not the `current` link).
    pub snapshot: Option<PathBuf>,
    /// The flows file Node-RED loads and deploys to.
    pub flows: Option<PathBuf>,
    /// Environment variables for Node-RED (checked by the caller).
    pub env: Vec<(String, String)>,
}

/// Environment variables the launcher sets for the agent's settings file;
/// the settings file removes them before any flow runs.
pub const ENV_SNAPSHOT: &str = "TETHER_SNAPSHOT";
/// See [`ENV_SNAPSHOT`].
pub const ENV_FLOWS: &str = "TETHER_FLOW_FILE";

/// What the launcher is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Keep Node-RED running (restarted on exit, with backoff).
    Run,
    /// Keep it stopped until asked to start.
    Stopped,
    /// The agent is stopping: stop Node-RED and end.
    Exit,
}

/// Where the launched Node-RED stands, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Starting,
    Running {
        pid: u32,
    },
    /// Waiting to start again after an exit.
    Restarting,
    /// Stopped on request (a remote `stop`).
    Stopped,
    /// Given up on: see the log.
    CrashLoop,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunState::Starting => f.write_str("starting"),
            RunState::Running { pid } => write!(f, "running (pid {pid})"),
            RunState::Restarting => f.write_str("restarting"),
            RunState::Stopped => f.write_str("stopped"),
            RunState::CrashLoop => f.write_str("crash loop"),
        }
    }
}

/// A running launcher. Dropping it kills Node-RED; [`Launcher::stop`] stops
/// it gracefully.
#[derive(Debug)]
pub struct Launcher {
    addr: SocketAddr,
    /// What is wanted, and a generation that grows with each restart asked
    /// for.
    want: watch::Sender<(Want, u64)>,
    task: Mutex<Option<JoinHandle<()>>>,
    run: Arc<Mutex<Run>>,
}

/// What the supervising task tells the handle.
#[derive(Debug, Default)]
struct Run {
    /// The running process, if any.
    pid: Option<u32>,
    /// The last start failure or exit, for error messages.
    last: Option<String>,
    state: Option<RunState>,
    from: RunFrom,
}

impl Launcher {
    /// Starts Node-RED and keeps it running. Needs a tokio runtime.
    pub fn start(spec: LaunchSpec) -> Launcher {
        Launcher::start_from(spec, RunFrom::default())
    }

    /// Starts Node-RED running `from` and keeps it running.
    pub fn start_from(spec: LaunchSpec, from: RunFrom) -> Launcher {
        let (want, want_rx) = watch::channel((Want::Run, 0));
        let run = Arc::new(Mutex::new(Run {
            from,
            ..Run::default()
        }));
        let addr = spec.addr;
        let task = tokio::spawn(supervise(spec, want_rx, run.clone()));
        Launcher {
            addr,
            want,
            task: Mutex::new(Some(task)),
            run,
        }
    }

    /// Stops the running Node-RED (gracefully) and starts it again at once
    /// running `from`, whatever state it was in (a crash loop included:
    /// its exits are counted afresh).
    pub fn restart(&self, from: RunFrom) {
        lock(&self.run).from = from;
        self.want.send_modify(|(want, generation)| {
            *want = Want::Run;
            *generation += 1;
        });
    }

    /// Stops Node-RED and keeps it stopped until [`Launcher::resume`].
    pub fn pause(&self) {
        self.want.send_modify(|(want, _)| *want = Want::Stopped);
    }

    /// Starts Node-RED again after [`Launcher::pause`] or a crash loop.
    pub fn resume(&self) {
        self.want.send_modify(|(want, generation)| {
            if *want != Want::Run || lock(&self.run).state == Some(RunState::CrashLoop) {
                *want = Want::Run;
                *generation += 1;
            }
        });
    }

    /// Where Node-RED stands.
    pub fn state(&self) -> RunState {
        lock(&self.run).state.clone().unwrap_or(RunState::Starting)
    }

    /// What Node-RED runs (or will at its next start).
    pub fn run_from(&self) -> RunFrom {
        lock(&self.run).from.clone()
    }

    /// The process id of the running Node-RED, if one runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.run).pid
    }

    /// Where Node-RED listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until Node-RED answers, at most `timeout` (see [`wait_ready`]).
    pub async fn ready(&self, timeout: Duration) -> Result<(), NodeRedError> {
        wait_ready(self.addr, timeout).await.map_err(|e| match e {
            NodeRedError::NotReady { addr, waited, .. } => NodeRedError::NotReady {
                addr,
                waited,
                last: self.last_event(),
            },
            other => other,
        })
    }

    /// Stops Node-RED (SIGTERM, SIGKILL after [`STOP_GRACE`]) and waits
    /// until it is gone.
    pub async fn stop(&self) {
        self.want.send_modify(|(want, _)| *want = Want::Exit);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn last_event(&self) -> String {
        lock(&self.run)
            .last
            .as_ref()
            .map(|l| format!(" (last: {l})"))
            .unwrap_or_default()
    }
}

fn lock(run: &Mutex<Run>) -> std::sync::MutexGuard<'_, Run> {
    run.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // The task owns the child, spawned with kill_on_drop.
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// Why one run of Node-RED ended.
enum Ended {
    /// Asked to stop, restart or exit: see the wanted state.
    Asked,
    Exited(std::io::Result<ExitStatus>),
    /// Stopped because it was hung: why.
    Hung(String),
}

async fn supervise(spec: LaunchSpec, mut want: watch::Receiver<(Want, u64)>, run: Arc<Mutex<Run>>) {
    let builder = ExponentialBuilder::new()
        .with_min_delay(RESTART_MIN)
        .with_max_delay(RESTART_MAX)
        .with_factor(2.0)
        .without_max_times();
    let mut delays: ExponentialBackoff = builder.build();
    let mut crashes = CrashLoop::default();
    let note = |pid: Option<u32>, last: Option<String>, state: RunState| {
        let mut run = lock(&run);
        run.pid = pid;
        run.state = Some(state);
        if last.is_some() {
            run.last = last;
        }
    };
    let mut generation = want.borrow().1;
    loop {
        let (wanted, asked) = *want.borrow_and_update();
        match wanted {
            Want::Exit => return,
            Want::Stopped => {
                note(None, None, RunState::Stopped);
                if want.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Want::Run => {}
        }
        if asked != generation {
            // A restart or start was asked for: a fresh start, no waiting,
            // exits counted afresh.
            generation = asked;
            delays = builder.build();
            crashes = CrashLoop::default();
        }
        let started = Instant::now();
        let from = lock(&run).from.clone();
        match spawn(&spec, &from) {
            Ok(child) => {
                info!(pid = child.id(), addr = %spec.addr, snapshot = ?from.snapshot, "node-red started");
                note(
                    child.id(),
                    None,
                    child
                        .id()
                        .map_or(RunState::Starting, |pid| RunState::Running { pid }),
                );
                match run_once(child, &spec, &mut want, generation).await {
                    Ended::Asked => {
                        note(None, None, RunState::Restarting);
                        continue;
                    }
                    ended => {
                        let what = match ended {
                            Ended::Hung(why) => format!("was hung ({why}) and was stopped"),
                            Ended::Exited(status) => describe(&status),
                            Ended::Asked => unreachable!("handled above"),
                        };
                        if crashes.exited(Instant::now()) {
                            let report = format!(
                                "node-red {what}, its {CRASH_LOOP_EXITS}th exit within {}: a crash loop; it is not started again. help: see its output above in the log, fix its flows, settings or modules, then restart it (tether-platform device node-red ID restart, or restart tetherd)",
                                Human(CRASH_LOOP_WINDOW)
                            );
                            error!("{report}");
                            note(None, Some(report), RunState::CrashLoop);
                            // Wait until asked to start again, or to exit.
                            loop {
                                if want.changed().await.is_err() {
                                    return;
                                }
                                let (wanted, asked) = *want.borrow();
                                if wanted != Want::Run || asked != generation {
                                    break;
                                }
                            }
                            continue;
                        }
                        warn!("node-red {what}; starting it again");
                        note(None, Some(what), RunState::Restarting);
                    }
                }
                if started.elapsed() >= STABLE_AFTER {
                    delays = builder.build();
                }
            }
            Err(e) => {
                error!("{e}");
                note(None, Some(e.to_string()), RunState::Restarting);
            }
        }
        let delay = delays.next().unwrap_or(RESTART_MAX);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = asked_for(&mut want, generation) => {}
        }
    }
}

/// Resolves once something other than "keep running this generation" is
/// wanted (or the launcher is gone).
async fn asked_for(want: &mut watch::Receiver<(Want, u64)>, generation: u64) {
    let _ = want
        .wait_for(|(wanted, asked)| *wanted != Want::Run || *asked != generation)
        .await;
}

fn spawn(spec: &LaunchSpec, from: &RunFrom) -> Result<Child, NodeRedError> {
    // Node-RED starts through setpriv, which execs it (the child's pid is
    // Node-RED's). `--pdeathsig KILL` has the kernel kill Node-RED when the
    // agent dies, however it dies: it never outlives its agent (a second
    // Node-RED on the port, flows running unsupervised). setpriv sets the
    // signal after any change of user, which would clear it. The signal
    // follows the thread that spawned the child: the launcher spawns from a
    // task on the runtime's worker threads, which live as long as the agent.
    let mut command = Command::from(super::user::command_as(
        spec.run_as.as_ref(),
        spec.command.as_ref(),
    ));
    if spec.run_as.is_some() {
        command.env("HOME", &spec.user_dir);
    }
    // systemd's variables are the agent's: Node-RED must not notify as it.
    for var in crate::systemd::ENV_VARS {
        command.env_remove(var);
    }
    if let Some(snapshot) = &from.snapshot {
        command.env(ENV_SNAPSHOT, snapshot);
    }
    if let Some(flows) = &from.flows {
        command.env(ENV_FLOWS, flows);
    }
    command.envs(from.env.iter().map(|(k, v)| (k, v)));
    let mut child = command
        .arg("-u")
        .arg(&spec.user_dir)
        .arg("-s")
        .arg(&spec.settings)
        .current_dir(&spec.user_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NodeRedError::Spawn {
            command: match &spec.run_as {
                Some(run_as) => format!("setpriv ... {} (as {})", spec.command, run_as.name),
                None => format!("setpriv --pdeathsig KILL -- {}", spec.command),
            },
            source,
        })?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, false));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(err, true));
    }
    Ok(child)
}

async fn run_once(
    mut child: Child,
    spec: &LaunchSpec,
    want: &mut watch::Receiver<(Want, u64)>,
    generation: u64,
) -> Ended {
    tokio::select! {
        status = child.wait() => Ended::Exited(status),
        _ = asked_for(want, generation) => {
            terminate(&mut child, STOP_GRACE).await;
            Ended::Asked
        }
        why = watch_hang(spec.addr, spec.hang_timeout) => {
            warn!("node-red is hung: {why}; stopping it");
            // Its event loop is stuck, so it cannot act on SIGTERM: a
            // short grace, then SIGKILL.
            terminate(&mut child, HUNG_GRACE).await;
            Ended::Hung(why)
        }
    }
}

/// Asks Node-RED's admin API for an answer (any HTTP status) every
/// [`HangWatch::every`]; resolves with the reason once it is hung.
async fn watch_hang(addr: SocketAddr, timeout: Duration) -> String {
    let mut watch = HangWatch::new(timeout, Instant::now());
    let every = watch.every();
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(every, probe(addr)).await {
            watch.answered(Instant::now());
        }
        if let Some(why) = watch.hung(Instant::now()) {
            return why;
        }
        tokio::time::sleep(every).await;
    }
}

/// Checks, before the first start, that `setpriv` (util-linux) and
/// Node-RED's command can be found: a missing one is an error now, not a
/// crash loop later.
pub fn check_programs(spec: &LaunchSpec) -> Result<(), NodeRedError> {
    for program in ["setpriv", spec.command.as_str()] {
        if find_program(program).is_none() {
            return Err(NodeRedError::Spawn {
                command: program.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such executable file (looked in PATH for a bare name)",
                ),
            });
        }
    }
    Ok(())
}

/// `name` if it contains `/`, else the first executable `PATH/name`.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return executable(&path).then_some(path);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(child: &mut Child, grace: Duration) {
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    if let Some(pid) = pid {
        // An error means the process is already gone; wait() reaps it.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => info!("node-red stopped ({})", describe(&status)),
        Err(_) => {
            warn!(
                "node-red did not stop within {} of SIGTERM; killing it",
                Human(grace)
            );
            let _ = child.kill().await;
        }
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => format!("exited with {s}"),
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// Forwards a pipe to the log one line at a time, within a [`LineBudget`].
/// Node-RED's `[warn]` and `[error]` lines keep their level; other stderr
/// lines are warnings.
async fn forward_lines(pipe: impl AsyncRead + Unpin, stderr: bool) {
    let mut budget = LineBudget::new(Instant::now());
    read_lines(pipe, |line, cut| {
        if let Some(dropped) = budget.admit(Instant::now()) {
            if dropped > 0 {
                warn!(
                    "node-red: {dropped} lines of its output were not logged (more than {LINES_PER_SEC} a second)"
                );
            }
            emit(line, cut, stderr);
        }
    })
    .await;
}

/// Calls `each(line, cut)` for every line of `pipe`, without its newline;
/// lines longer than [`MAX_LINE`] bytes are cut (`cut` is true), so memory
/// stays bounded whatever the process prints.
async fn read_lines(pipe: impl AsyncRead + Unpin, mut each: impl FnMut(&[u8], bool)) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::with_capacity(256);
    let mut cut = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut |= chunk.len() > room;
        let used = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            each(&line, cut);
            line.clear();
            cut = false;
        }
    }
    if !line.is_empty() {
        each(&line, cut);
    }
}

fn emit(line: &[u8], cut: bool, stderr: bool) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    if text.is_empty() {
        return;
    }
    let more = if cut { " [line cut]" } else { "" };
    if text.contains("[error]") {
        error!("node-red: {text}{more}");
    } else if stderr || text.contains("[warn]") {
        warn!("node-red: {text}{more}");
    } else {
        info!("node-red: {text}{more}");
    }
}

/// Waits until something answers HTTP on `addr`, at most `timeout`: ready
/// when `GET /settings` without a token is answered 401. Any other answer
/// means the listener is not the agent's locked-down Node-RED, an error at
/// once.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), NodeRedError> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout(PROBE_TIMEOUT, probe(addr)).await {
            Ok(Ok(401)) => return Ok(()),
            Ok(Ok(status)) => return Err(NodeRedError::NotLockedDown { addr, status }),
            Ok(Err(_)) | Err(_) => {}
        }
        if Instant::now() + PROBE_EVERY > deadline {
            return Err(NodeRedError::NotReady {
                addr,
                waited: Human(timeout).to_string(),
                last: String::new(),
            });
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The status code of `GET /settings` without a token.
async fn probe(addr: SocketAddr) -> std::io::Result<u16> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!("GET /settings HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(64);
    (&mut tcp).take(64).read_to_end(&mut head).await?;
    parse_status(&head).ok_or_else(|| std::io::Error::other("not an HTTP/1.1 answer"))
}

/// `HTTP/1.1 401 ...` -> 401.
fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    let code = text.strip_prefix("HTTP/1.1 ")?;
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_exits_within_a_minute_are_a_crash_loop_and_slower_ones_are_not() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut fast = CrashLoop::default();
        let loops: Vec<bool> = [0, 1, 3, 7, 15]
            .iter()
            .map(|s| fast.exited(at(*s)))
            .collect();
        assert_eq!(loops, [false, false, false, false, true]);
        // Exits a little more than a minute apart never add up.
        let mut slow = CrashLoop::default();
        for i in 0..20 {
            assert!(!slow.exited(at(i * 16)), "exit {i}");
        }
        // Four quick ones, a long quiet run, then one more: not a loop.
        let mut quiet = CrashLoop::default();
        for s in [0, 1, 2, 3] {
            quiet.exited(at(s));
        }
        assert!(!quiet.exited(at(200)));
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status(b"HTTP/1.1 401 Unauthorized\r\n"), Some(401));
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 200"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH"), None);
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_every_line_is_read() {
        let mut input = vec![b'a'; MAX_LINE * 3];
        input.extend_from_slice(b"\nshort\r\n\nlast");
        let mut lines = Vec::new();
        read_lines(&input[..], |l, cut| lines.push((l.to_vec(), cut))).await;
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], (vec![b'a'; MAX_LINE], true));
        assert_eq!(lines[1], (b"short\r".to_vec(), false));
        assert_eq!(lines[2], (Vec::new(), false));
        assert_eq!(lines[3], (b"last".to_vec(), false));
    }

    #[tokio::test]
    async fn a_listener_that_answers_without_a_token_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n{}").await;
        });
        let err = wait_ready(addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, NodeRedError::NotLockedDown { status: 200, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_not_ready_within_the_timeout() {
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = wait_ready(addr, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, NodeRedError::NotReady { .. }), "{err}");
    }

    fn spec(command: &str, dir: &std::path::Path) -> LaunchSpec {
        LaunchSpec {
            command: command.into(),
            user_dir: dir.to_owned(),
            settings: dir.join("s.js"),
            addr: "127.0.0.1:9".parse().unwrap(),
            run_as: None,
            hang_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_missing_command_is_found_missing_before_it_is_started() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_programs(&spec("/nonexistent/node-red", dir.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/node-red"), "{text}");
        let err = check_programs(&spec("no-such-node-red-here", dir.path())).unwrap_err();
        assert!(err.to_string().contains("no-such-node-red-here"), "{err}");
        check_programs(&spec("sh", dir.path())).expect("sh and setpriv are in PATH");
    }

    #[tokio::test]
    async fn a_command_that_cannot_run_is_reported_and_stop_returns() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = Launcher::start(spec("/nonexistent/node-red", dir.path()));
        let err = launcher
            .ready(Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(err, NodeRedError::NotReady { .. }), "{err}");
        launcher.stop().await;
    }

    #[test]
    fn a_node_red_is_hung_after_the_timeout_without_an_answer() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = HangWatch::new(Duration::from_secs(30), start);
        assert_eq!(watch.every(), Duration::from_secs(10));
        // Starting: the longer start limit applies.
        assert_eq!(watch.hung(at(100_000)), None);
        let why = watch.hung(at(121_000)).expect("hung while starting");
        assert!(why.contains("since it started"), "{why}");
        // Answering, then silent: hung only after 30 s of silence.
        watch.answered(at(5_000));
        assert_eq!(watch.hung(at(35_000)), None);
        watch.answered(at(40_000));
        assert_eq!(watch.hung(at(70_000)), None);
        let why = watch.hung(at(70_001)).expect("hung");
        assert!(why.contains("has not answered for 30s"), "{why}");
        // Short timeouts ask often, long ones at most every 10 s.
        assert_eq!(
            HangWatch::new(Duration::from_secs(3), start).every(),
            Duration::from_secs(1)
        );
        assert_eq!(
            HangWatch::new(Duration::from_millis(300), start).every(),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn output_lines_beyond_the_rate_are_dropped_and_counted() {
        let start = Instant::now();
        let mut budget = LineBudget::new(start);
        // A burst is let through, then lines are dropped and counted.
        for _ in 0..LINE_BURST {
            assert_eq!(budget.admit(start), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(budget.admit(start), None);
        }
        // 100 ms later: 5 more lines; the first says 1000 were dropped.
        let later = start + Duration::from_millis(100);
        assert_eq!(budget.admit(later), Some(1000));
        for _ in 0..4 {
            assert_eq!(budget.admit(later), Some(0));
        }
        assert_eq!(budget.admit(later), None);
        // A quiet minute refills the burst, no more.
        let quiet = later + Duration::from_secs(60);
        let admitted = (0..1000).filter(|_| budget.admit(quiet).is_some()).count();
        assert_eq!(admitted, LINE_BURST as usize);
    }

    /// A Node-RED that exits at once, started again 1, 2, 4 and 8 s later:
    /// the fifth exit, about 15 s after the first, is a crash loop, and it
    /// is not started again. Real time: the exits are real processes'.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_red_that_keeps_exiting_is_given_up_on_as_a_crash_loop() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = Launcher::start(spec("false", dir.path()));
        let started = std::time::Instant::now();
        while !launcher.last_event().contains("crash loop") {
            assert!(
                started.elapsed() < Duration::from_secs(50),
                "no crash loop: {}",
                launcher.last_event()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            launcher.last_event().contains("5th exit"),
            "{}",
            launcher.last_event()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(launcher.pid(), None, "started again after the crash loop");
        assert!(launcher.last_event().contains("crash loop"));
        launcher.stop().await;
    }
}
