//! What the benchmark binaries (`tether-bench`, `tether-editor-bench`) share:
//! a process's memory and CPU from `/proc`, binaries built beside them, free
//! ports on 127.0.0.1, an enrolled `tetherd` process ([`Tetherd`]), and the
//! PASS/MISS verdict lines `docs/benchmarks.md` quotes. Linux only, as the
//! benchmarks are.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tether_platform::{Platform, TokenSpec};
use tokio::process::{Child, Command};

/// `VmRSS`, `VmHWM`, `RssAnon`, `RssFile` of a process, KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
    pub anon: u64,
    pub file: u64,
}

/// Reads [`Memory`] from `/proc/PID/status`.
pub fn memory(pid: u32) -> Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    })
}

/// User plus system CPU time of a process, seconds; `ticks_per_sec` from
/// [`clock_ticks`].
pub fn cpu_secs(pid: u32, ticks_per_sec: f64) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 3, utime 14 and stime 15.
    Ok((tick(11) + tick(12)) / ticks_per_sec)
}

/// Bytes a process has caused to be written to storage (`write_bytes` of
/// `/proc/PID/io`: its own and its threads' writes, page cache included,
/// as the kernel accounts them when they are dirtied).
pub fn storage_written(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("cannot read /proc/{pid}/io"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no write_bytes in /proc/{pid}/io"))
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, 100 if unknown).
pub async fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().await;
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// KiB as "N.NN MiB".
pub fn mib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

/// One verdict line: `PASS text` or `MISS text`.
pub fn verdict(met: bool, text: String) {
    println!("{} {text}", if met { "PASS" } else { "MISS" });
}

/// A binary built next to the running one (`target/release`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let dir = exe.parent().context("this executable has no directory")?;
    let path = dir.join(name);
    ensure!(
        path.is_file(),
        "{} is missing; help: cargo build --release -p tether-e2e -p tether-agent -p tether-platform --bins",
        path.display()
    );
    Ok(path)
}

/// The `tetherd` a bench measures: `chosen` (its `--tetherd`, the static
/// build the packages ship, say) or the one built next to the bench.
pub fn tetherd(chosen: Option<PathBuf>) -> Result<PathBuf> {
    match chosen {
        Some(path) => {
            ensure!(
                path.is_file(),
                "{} is missing; help: build it first (bash cross/build.sh TARGET for a static build)",
                path.display()
            );
            Ok(path)
        }
        None => sibling("tetherd"),
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Sends signal `name` (`TERM`, `KILL`, ...) to `pid`.
pub async fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await
        .context("cannot run kill")?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// A `tetherd` process, enrolled with a platform of this process and
/// connected to it.
#[derive(Debug)]
pub struct Tetherd {
    pub child: Child,
    pub pid: u32,
    pub device: String,
    /// Its standard output and error.
    pub log: PathBuf,
}

impl Tetherd {
    /// Enrolls `tetherd` (the binary) into `dir/agent` with a fresh token
    /// from `platform`, writes `dir/tetherd.toml` (that state directory,
    /// `log_level = "warn"`, then `extra`), runs it, and waits up to 20 s
    /// for its tunnel to be up.
    pub async fn start(
        tetherd: &Path,
        platform: &Platform,
        dir: &Path,
        extra: &str,
    ) -> Result<Tetherd> {
        let state = dir.join("agent");
        enroll(tetherd, platform, &state).await?;
        let config_path = dir.join("tetherd.toml");
        let config = format!(
            "state_dir = {:?}\nlog_level = \"warn\"\n\n{extra}",
            state.display().to_string()
        );
        std::fs::write(&config_path, config)?;
        Tetherd::run(tetherd, platform, dir).await
    }

    /// Runs `tetherd` again on what [`Tetherd::start`] left in `dir` (its
    /// log appended to), and waits up to 20 s for a tunnel to be up.
    pub async fn run(tetherd: &Path, platform: &Platform, dir: &Path) -> Result<Tetherd> {
        let config_path = dir.join("tetherd.toml");
        let log = dir.join("tetherd.log");
        let log_file = File::options().create(true).append(true).open(&log)?;
        let mut child = Command::new(tetherd)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tetherd")?;
        let pid = child.id().context("tetherd exited at once")?;
        let device = wait_connected(&mut child, platform, &log).await?;
        Ok(Tetherd {
            child,
            pid,
            device,
            log,
        })
    }

    /// SIGTERM, then SIGKILL if it has not ended within `grace`.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        signal(self.pid, "TERM").await?;
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

async fn enroll(tetherd: &Path, platform: &Platform, state: &Path) -> Result<()> {
    let token = platform.create_token(TokenSpec::default()).await?;
    let out = Command::new(tetherd)
        .arg("enroll")
        .arg("--platform")
        .arg(platform.url())
        .arg("--ca")
        .arg(platform.ca_path())
        .arg("--state-dir")
        .arg(state)
        .args(["--name", "bench"])
        .env("TETHER_TOKEN", token.expose())
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run tetherd enroll")?;
    ensure!(
        out.status.success(),
        "tetherd enroll failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Waits until a device's tunnel is up on `platform`; its id.
async fn wait_connected(child: &mut Child, platform: &Platform, log: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "tetherd exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        let online = platform.devices().await?.into_iter().find(|d| d.online);
        if let Some(device) = online
            && let Some(tunnel) = platform.tunnel(&device.id)
            && tunnel.connected().await.is_ok()
        {
            return Ok(device.id);
        }
        ensure!(
            Instant::now() < deadline,
            "the tunnel did not come up within 20 s; tetherd's log: {}",
            std::fs::read_to_string(log).unwrap_or_default().trim()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu() {
        let pid = std::process::id();
        let m = memory(pid).unwrap();
        assert!(m.rss > 0 && m.hwm >= m.rss, "{m:?}");
        assert!(cpu_secs(pid, 100.0).unwrap() >= 0.0);
        assert!(memory(u32::MAX).is_err());
        // A synced file of 64 KiB is counted.
        let before = storage_written(pid).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 64 * 1024]).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        assert!(storage_written(pid).unwrap() >= before + 64 * 1024);
        assert!(storage_written(u32::MAX).is_err());
    }

    #[test]
    fn mib_has_two_decimals() {
        assert_eq!(mib(1536), "1.50 MiB");
    }
}
