//! The packaged service runs the agent as its own unprivileged user with
//! only `CAP_SETUID`, `CAP_SETGID` and `CAP_KILL`, as ambient capabilities,
//! and Node-RED's group (`packaging/tetherd.service`). Here an "agent" (this
//! test binary again, started through `setpriv` as `daemon` with exactly
//! those, as the unit starts `tetherd`) launches Node-RED as
//! `tether-nodered`:
//!
//! - a stand-in program runs as that user and group, with no capabilities
//!   at all (the agent's ambient ones do not pass on), `no_new_privs` and
//!   umask 0007; the agent stops it with SIGTERM across users, and a
//!   killed agent takes it along (parent-death signal);
//! - without the capabilities, or outside Node-RED's group, the agent
//!   refuses at start with an error that says what is missing;
//! - a real Node-RED starts and answers locked down, deploys to a working
//!   copy the agent shares with its group and reads back, and npm installs
//!   a snapshot's module as Node-RED's user into files that end up the
//!   agent's own.
//!
//! Needs root, to start the agent as another user (CI runs the tests as
//! root); otherwise the tests skip, saying so, and fail when `CI` is set.
//! The real Node-RED comes from `TETHER_NODE_RED` or the cache
//! `tests/nodered/install.sh` fills, npm from `PATH`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether_agent::config::{NodeRedConfig, NodeRedMode};
use tether_agent::node_red::user::{RunAs, effective_uid, lookup_in};
use tether_agent::node_red::{NodeRed, RunFrom, TOKEN_HEADER, for_role};
use tether_agent::snapshot::modules::{Installer, LIB};
use tether_proto::grant::Role;

/// Set in the child: the directory it works in.
const CHILD: &str = "TETHER_TEST_CAPS_AGENT";
/// Set in the child: Node-RED's command.
const COMMAND: &str = "TETHER_TEST_CAPS_COMMAND";
/// Set in the child: Node-RED's port.
const PORT: &str = "TETHER_TEST_CAPS_PORT";
/// Set in the child for a real Node-RED: wait until it answers.
const READY: &str = "TETHER_TEST_CAPS_READY";
/// Set in the child: a staged snapshot whose modules npm installs.
const STAGING: &str = "TETHER_TEST_CAPS_STAGING";
/// Set in the child: a working copy of a snapshot's flows for Node-RED to
/// run and deploy to, which the agent reads back after a deploy.
const WORK: &str = "TETHER_TEST_CAPS_WORK";
/// The user Node-RED runs as.
const NODE_RED_USER: &str = "tether-nodered";
/// The unit's ambient capabilities, for `setpriv`.
const UNIT_CAPS: &str = "+setuid,+setgid,+kill";

/// A real Node-RED takes a few seconds to start on a small machine.
const START: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------- child

/// The child: an agent with `[node_red] user`, as the service starts it.
/// Prints `PID n` once Node-RED runs (or `ERROR ...`), `INSTALLED` after
/// a module install, `STOPPED` after a `stop` line on stdin.
fn act_as_agent(dir: &Path) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = NodeRedConfig {
            mode: NodeRedMode::Launch,
            command: std::env::var(COMMAND).unwrap(),
            user_dir: Some(dir.join("node-red")),
            port: std::env::var(PORT).unwrap().parse().unwrap(),
            user: Some(NODE_RED_USER.into()),
            hang_timeout: Duration::from_secs(3600),
        };
        let work = std::env::var_os(WORK).map(PathBuf::from);
        let from = |_: &Path, run_as: Option<&RunAs>| {
            let Some(work) = &work else {
                return RunFrom::default();
            };
            std::fs::create_dir_all(work).unwrap();
            std::fs::write(work.join("flows.json"), "[]").unwrap();
            tether_agent::snapshot::share_work(work, run_as.expect("a Node-RED user")).unwrap();
            RunFrom {
                flows: Some(work.join("flows.json")),
                ..RunFrom::default()
            }
        };
        let node_red = match NodeRed::start_from(&config, dir, from) {
            Ok(Some(node_red)) => node_red,
            Ok(None) => return say("ERROR [node_red] is off"),
            Err(e) => return say(&format!("ERROR {e}")),
        };
        if std::env::var_os(READY).is_some()
            && let Err(e) = node_red.ready(START).await
        {
            return say(&format!("ERROR {e}"));
        }
        let started = Instant::now();
        let pid = loop {
            if let Some(pid) = node_red.pid() {
                break pid;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "not started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let setpriv set the signal and exec the program.
        tokio::time::sleep(Duration::from_millis(500)).await;
        say(&format!("PID {pid}"));
        if let Some(work) = &work {
            // An owner deploys: Node-RED writes the working copy, and the
            // agent reads what it wrote, as a capture does.
            let token = node_red
                .auth()
                .token("owner-olga", &for_role(Role::Owner, false));
            let flows = r#"[{"id":"t1","type":"tab","label":"deployed under a non-root agent"}]"#;
            let status = post(node_red.addr(), "/flows", &token, flows).await;
            match std::fs::read_to_string(work.join("flows.json")) {
                Ok(text) if status == 204 || status == 200 => {
                    say(&format!("DEPLOYED {}", text.contains("deployed under")))
                }
                Ok(_) => say(&format!("ERROR the deploy answered {status}")),
                Err(e) => say(&format!("ERROR the agent cannot read the deploy: {e}")),
            }
        }
        if let Some(staging) = std::env::var_os(STAGING) {
            let installer = Installer {
                npm: "npm".into(),
                registry: None,
                timeout: Duration::from_secs(120),
                cache: dir.join("node-red/snapshots/npm"),
                run_as: node_red.run_as().cloned(),
            };
            let staging = PathBuf::from(staging);
            match tokio::task::spawn_blocking(move || installer.install(&staging))
                .await
                .unwrap()
            {
                Ok(installed) => say(&format!("INSTALLED {installed:?}")),
                Err(e) => say(&format!("ERROR {e}")),
            }
        }
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await
        .unwrap()
        .unwrap_or_default();
        if line.trim() == "stop" {
            node_red.shutdown().await;
            say("STOPPED");
        }
    });
}

/// `POST path` with a JSON body and the agent's token; the status code.
async fn post(addr: std::net::SocketAddr, path: &str, token: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{TOKEN_HEADER}: {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

// --------------------------------------------------------------- parent

/// Root, or `None` after saying why the test cannot run (a failure in CI).
fn as_root() -> Option<()> {
    if effective_uid() == Some(0) {
        return Some(());
    }
    let why = "these tests start the agent as another user and need root";
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set: this test may not be skipped)");
    }
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
    None
}

/// `tether-nodered`, created if missing (as the package creates it).
fn node_red_user() -> RunAs {
    if lookup_in(Path::new("/etc/passwd"), NODE_RED_USER).is_none() {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                NODE_RED_USER,
            ])
            .status()
            .expect("useradd runs");
        // Another test may have created it at the same moment.
        assert!(
            status.success() || lookup_in(Path::new("/etc/passwd"), NODE_RED_USER).is_some(),
            "useradd {NODE_RED_USER} failed"
        );
    }
    lookup_in(Path::new("/etc/passwd"), NODE_RED_USER).unwrap()
}

/// The agent's user: `daemon`, a system user every Debian has.
fn agent_user() -> RunAs {
    lookup_in(Path::new("/etc/passwd"), "daemon").expect("the daemon user")
}

/// A temporary directory with the agent's own directory inside (`agent/`,
/// the agent's, others may pass through: Node-RED's user directory is in
/// it) and `program`, a stand-in for Node-RED: it notes that it started,
/// and on SIGTERM notes that it was stopped, in its working directory.
struct Place {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    program: PathBuf,
}

fn place(agent: &RunAs) -> Place {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let home = tmp.path().join("agent");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(agent.uid), Some(agent.gid)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o711)).unwrap();
    let program = tmp.path().join("node-red");
    std::fs::write(
        &program,
        "#!/bin/sh\n\
         trap 'echo stopped > terminated; exit 0' TERM\n\
         echo started > started\n\
         while :; do sleep 1 & wait $!; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    Place {
        _tmp: tmp,
        home,
        program,
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A child agent and what it prints.
struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// Starts this test binary as an agent (`test` names the test function to
/// run), through `setpriv` with `privileges`.
fn start_agent(test: &str, place: &Place, privileges: &[String], env: &[(&str, String)]) -> Agent {
    let mut child = Command::new("setpriv")
        .args(privileges)
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, &place.home)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&place.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    Agent {
        child,
        stdin,
        lines,
    }
}

impl Agent {
    /// The rest of the first line with one of `prefixes` in it (libtest's
    /// own "test NAME ... " may begin the line), and which prefix.
    fn said(&self, prefixes: &[&str], within: Duration) -> (String, String) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the agent said none of {prefixes:?} in {within:?}"));
            for prefix in prefixes {
                if let Some((_, rest)) = line.split_once(&format!("{prefix} ")) {
                    return (prefix.to_string(), rest.trim().to_owned());
                }
                if line.trim_end().ends_with(prefix) {
                    return (prefix.to_string(), String::new());
                }
            }
        }
    }

    fn pid(&self, within: Duration) -> u32 {
        match self.said(&["PID", "ERROR"], within) {
            (p, pid) if p == "PID" => pid.parse().unwrap(),
            (_, error) => panic!("the agent failed: {error}"),
        }
    }

    fn stop(mut self) {
        writeln!(self.stdin, "stop").unwrap();
        self.said(&["STOPPED"], Duration::from_secs(30));
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the agent exited with {status}");
    }
}

/// `setpriv` options for an agent running as `agent`, in `groups`, with
/// the unit's capabilities when `caps`.
fn privileges(agent: &RunAs, groups: &[u32], caps: bool) -> Vec<String> {
    let mut out = vec![
        format!("--reuid={}", agent.uid),
        format!("--regid={}", agent.gid),
    ];
    if groups.is_empty() {
        out.push("--clear-groups".into());
    } else {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        out.push(format!("--groups={}", groups.join(",")));
    }
    if caps {
        out.push(format!("--inh-caps={UNIT_CAPS}"));
        out.push(format!("--ambient-caps={UNIT_CAPS}"));
    }
    out
}

/// Who a process is, from `/proc/PID/status`, by field.
fn status(pid: u32) -> HashMap<String, String> {
    const FIELDS: &[&str] = &[
        "Name",
        "Uid",
        "Gid",
        "Groups",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapAmb",
        "NoNewPrivs",
        "Umask",
    ];
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid}: {e}"));
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| FIELDS.contains(k))
        .map(|(k, v)| {
            (
                k.to_owned(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie is dead, waiting for whoever adopted it to reap it.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => true,
    }
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Node-RED (`pid`) runs as `user`, its group only, with no capability
/// and no way to gain one, and umask 0007.
fn assert_runs_as(pid: u32, user: &RunAs) {
    let status = status(pid);
    let uid = user.uid.to_string();
    let gid = user.gid.to_string();
    assert_eq!(status["Uid"], [uid.as_str(); 4].join(" "), "{status:?}");
    assert_eq!(status["Gid"], [gid.as_str(); 4].join(" "), "{status:?}");
    assert_eq!(status["Groups"], "", "{status:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status[set], "0000000000000000", "{set}: {status:?}");
    }
    assert_eq!(status["NoNewPrivs"], "1", "{status:?}");
    assert_eq!(status["Umask"], "0007", "{status:?}");
}

const TEST_LAUNCH: &str = "a_non_root_agent_with_the_units_capabilities_runs_node_red_as_its_user";

#[test]
fn a_non_root_agent_with_the_units_capabilities_runs_node_red_as_its_user() {
    if let Some(dir) = std::env::var_os(CHILD) {
        return act_as_agent(Path::new(&dir));
    }
    let Some(()) = as_root() else { return };
    let (agent_user, node_red) = (agent_user(), node_red_user());
    let place = place(&agent_user);
    let user_dir = place.home.join("node-red");
    let env = [
        (COMMAND, place.program.display().to_string()),
        (PORT, free_port().to_string()),
    ];
    let unit = privileges(&agent_user, &[node_red.gid], true);
    let agent = start_agent(TEST_LAUNCH, &place, &unit, &env);
    let pid = agent.pid(Duration::from_secs(30));

    // The agent is what the unit makes it: daemon, in Node-RED's group,
    // with exactly the three capabilities.
    let agent_status = status(agent.child.id());
    let uid = agent_user.uid.to_string();
    assert_eq!(
        agent_status["Uid"],
        [uid.as_str(); 4].join(" "),
        "{agent_status:?}"
    );
    assert_eq!(agent_status["Groups"], node_red.gid.to_string());
    assert_eq!(
        agent_status["CapEff"], "00000000000000e0",
        "{agent_status:?}"
    );
    assert_eq!(
        agent_status["CapAmb"], "00000000000000e0",
        "{agent_status:?}"
    );

    assert_runs_as(pid, &node_red);
    wait_until("the program to start", Duration::from_secs(10), || {
        user_dir.join("started").exists()
    });
    // Its user directory: the agent's, Node-RED's group, 1770; what the
    // program wrote is its own and its group may read and remove it.
    let dir = std::fs::metadata(&user_dir).unwrap();
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o7777),
        (agent_user.uid, node_red.gid, 0o1770)
    );
    let started = std::fs::metadata(user_dir.join("started")).unwrap();
    assert_eq!(
        (started.uid(), started.gid(), started.mode() & 0o777),
        (node_red.uid, node_red.gid, 0o660)
    );
    let settings = std::fs::metadata(user_dir.join("tether-settings.js")).unwrap();
    assert_eq!(
        settings.uid(),
        agent_user.uid,
        "the settings stay the agent's"
    );

    // Stopped on request: SIGTERM reaches it across users (CAP_KILL).
    agent.stop();
    wait_until("the program to end", Duration::from_secs(10), || {
        is_gone(pid)
    });
    assert_eq!(
        std::fs::read_to_string(user_dir.join("terminated"))
            .ok()
            .as_deref(),
        Some("stopped\n"),
        "the program did not get SIGTERM"
    );

    // A killed agent takes it along: the parent-death signal survives the
    // change of user and of capabilities.
    let mut agent = start_agent(TEST_LAUNCH, &place, &unit, &env);
    let pid = agent.pid(Duration::from_secs(30));
    assert_runs_as(pid, &node_red);
    agent.child.kill().unwrap(); // SIGKILL
    agent.child.wait().unwrap();
    let killed = Instant::now();
    while !is_gone(pid) {
        if killed.elapsed() > Duration::from_secs(5) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the program {pid} outlived its killed agent by 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const TEST_REFUSED: &str = "a_non_root_agent_without_them_refuses_and_says_what_it_lacks";

#[test]
fn a_non_root_agent_without_them_refuses_and_says_what_it_lacks() {
    if let Some(dir) = std::env::var_os(CHILD) {
        return act_as_agent(Path::new(&dir));
    }
    let Some(()) = as_root() else { return };
    let (agent_user, node_red) = (agent_user(), node_red_user());
    let place = place(&agent_user);
    let env = [
        (COMMAND, place.program.display().to_string()),
        (PORT, free_port().to_string()),
    ];
    let refused = |privileges: Vec<String>| {
        let mut agent = start_agent(TEST_REFUSED, &place, &privileges, &env);
        let (what, said) = agent.said(&["PID", "ERROR"], Duration::from_secs(30));
        assert_eq!(what, "ERROR", "the agent started Node-RED: {said}");
        assert!(agent.child.wait().unwrap().success());
        said
    };

    // No capabilities (a plain user, or a unit without them).
    let said = refused(privileges(&agent_user, &[node_red.gid], false));
    assert!(
        said.contains(
            "cannot start Node-RED as another user without CAP_SETUID, CAP_SETGID, CAP_KILL"
        ),
        "{said}"
    );
    assert!(
        said.contains("AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL"),
        "{said}"
    );

    // The capabilities, but not Node-RED's group.
    let said = refused(privileges(&agent_user, &[], true));
    assert!(said.contains("is not a member of it"), "{said}");
    assert!(
        said.contains(&format!("SupplementaryGroups={NODE_RED_USER}")),
        "{said}"
    );
    assert!(!place.home.join("node-red/started").exists(), "nothing ran");
}

/// A module with no dependencies, packed as npm packs one, for a staged
/// snapshot at `staging`.
fn stage_module(staging: &Path, work: &Path) {
    let package = work.join("package");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(
        package.join("package.json"),
        r#"{"name": "tether-caps-module", "version": "1.0.0", "main": "index.js"}"#,
    )
    .unwrap();
    std::fs::write(package.join("index.js"), "module.exports = 42;\n").unwrap();
    let modules = staging.join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    let packed = Command::new("tar")
        .arg("-czf")
        .arg(modules.join("tether-caps-module-1.0.0.tgz"))
        .arg("-C")
        .arg(work)
        .arg("package")
        .status()
        .unwrap();
    assert!(packed.success());
    std::fs::write(
        staging.join("modules.json"),
        r#"{"tether-caps-module": "1.0.0"}"#,
    )
    .unwrap();
}

/// The `node-red` binary, or `None` (after saying so) outside CI.
fn node_red_binary() -> Option<PathBuf> {
    let path = std::env::var_os("TETHER_NODE_RED")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("TETHER_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/tether"));
            cache.join("node-red/node_modules/.bin/node-red")
        });
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "Node-RED not found at '{}'; run `bash tests/nodered/install.sh` or set TETHER_NODE_RED",
        path.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set: this test may not be skipped)");
    }
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
    None
}

const TEST_REAL: &str = "a_real_node_red_and_npm_run_as_their_user_under_a_non_root_agent";

#[test]
fn a_real_node_red_and_npm_run_as_their_user_under_a_non_root_agent() {
    if let Some(dir) = std::env::var_os(CHILD) {
        return act_as_agent(Path::new(&dir));
    }
    let Some(()) = as_root() else { return };
    let Some(binary) = node_red_binary() else {
        return;
    };
    let (agent_user, node_red) = (agent_user(), node_red_user());
    let place = place(&agent_user);
    let user_dir = place.home.join("node-red");
    // A staged snapshot whose module npm installs, as the agent stages one
    // (the agent's files: it made them).
    let snapshots = place.home.join("node-red/snapshots");
    let staging = snapshots.join("staging-1");
    stage_module(&staging, &place._tmp.path().join("module"));
    let chowned = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", agent_user.uid, agent_user.gid))
        .arg(&user_dir)
        .status()
        .unwrap();
    assert!(chowned.success());
    let work = snapshots.join("work/1");
    let port = free_port();
    let env = [
        (COMMAND, binary.display().to_string()),
        (PORT, port.to_string()),
        (READY, "1".to_string()),
        (STAGING, staging.display().to_string()),
        (WORK, work.display().to_string()),
    ];
    let unit = privileges(&agent_user, &[node_red.gid], true);
    let agent = start_agent(TEST_REAL, &place, &unit, &env);

    // Node-RED answered, locked down, as its own user; it wrote its own
    // files in its user directory, which its group (the agent) may read.
    let pid = agent.pid(START + Duration::from_secs(30));
    assert_runs_as(pid, &node_red);
    let runtime = std::fs::metadata(user_dir.join(".config.runtime.json"))
        .expect("Node-RED wrote its runtime settings");
    assert_eq!(
        (runtime.uid(), runtime.mode() & 0o060),
        (node_red.uid, 0o060),
        "Node-RED's file is its own, its group may read and write it"
    );

    // A deploy: Node-RED wrote the working copy the agent shared with its
    // group, and the agent read it back.
    let (what, said) = agent.said(&["DEPLOYED", "ERROR"], Duration::from_secs(30));
    assert_eq!((what.as_str(), said.as_str()), ("DEPLOYED", "true"));
    let deployed = std::fs::metadata(work.join("flows.json")).unwrap();
    assert_eq!(
        (deployed.uid(), deployed.gid(), deployed.mode() & 0o777),
        (node_red.uid, node_red.gid, 0o660),
        "Node-RED's deploy is its own, its group's to read"
    );
    let shared = std::fs::metadata(&work).unwrap();
    assert_eq!(
        (shared.uid(), shared.gid(), shared.mode() & 0o777),
        (agent_user.uid, node_red.gid, 0o770)
    );

    // npm ran as Node-RED's user (its cache is that user's), and the
    // module is in the version's lib/ as the agent's own files.
    let (what, said) = agent.said(&["INSTALLED", "ERROR"], Duration::from_secs(150));
    assert_eq!(what, "INSTALLED", "{said}");
    let cache = std::fs::metadata(snapshots.join("npm/cache")).expect("npm's cache");
    assert_eq!(cache.uid(), node_red.uid, "npm ran as Node-RED's user");
    let module = staging.join(LIB).join("node_modules/tether-caps-module");
    for file in ["package.json", "index.js"] {
        let meta = std::fs::metadata(module.join(file)).unwrap();
        assert_eq!(meta.uid(), agent_user.uid, "{file} is the agent's");
    }
    assert!(
        !snapshots.join("npm/lib").exists(),
        "npm's scratch folder was removed"
    );

    agent.stop();
    wait_until("Node-RED to end", Duration::from_secs(15), || is_gone(pid));
}
