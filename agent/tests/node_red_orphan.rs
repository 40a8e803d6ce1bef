//! A launched Node-RED never outlives a killed agent: an "agent" (this
//! test binary again, in a child process) starts a long-running program
//! through the launcher and is killed with SIGKILL, which no code of its
//! own sees; the kernel's parent-death signal must end the program.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_agent::node_red::{LaunchSpec, Launcher};

const CHILD: &str = "TETHER_TEST_ORPHAN_AGENT";
const TEST: &str = "a_launched_program_dies_with_a_killed_agent";

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

/// The child: starts `sleep` as its "Node-RED", prints its pid, waits.
fn act_as_agent(dir: &Path) {
    let script = dir.join("node-red");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 300\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let launcher = Launcher::start(LaunchSpec {
            command: script.to_str().unwrap().to_owned(),
            user_dir: dir.to_owned(),
            settings: dir.join("settings.js"),
            addr: "127.0.0.1:9".parse().unwrap(),
            run_as: None,
            hang_timeout: Duration::from_secs(3600),
        });
        let started = Instant::now();
        let pid = loop {
            if let Some(pid) = launcher.pid() {
                break pid;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "not started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let setpriv set the signal and exec the program.
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("PID {pid}");
        tokio::time::sleep(Duration::from_secs(300)).await;
    });
}

#[test]
fn a_launched_program_dies_with_a_killed_agent() {
    if let Some(dir) = std::env::var_os(CHILD) {
        act_as_agent(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let pid: u32 = loop {
        let line = lines
            .next()
            .expect("the agent printed the program's pid")
            .unwrap();
        // libtest's own "test NAME ... " may begin the line.
        if let Some((_, pid)) = line.split_once("PID ") {
            break pid.trim().parse().unwrap();
        }
    };
    assert!(!is_gone(pid), "the program {pid} is not running");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).starts_with("sleep"),
        "pid {pid} is not the program: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    let killed = Instant::now();
    while !is_gone(pid) {
        if killed.elapsed() > Duration::from_secs(5) {
            // Do not leave it behind for the next test.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the program {pid} outlived its killed agent by 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
