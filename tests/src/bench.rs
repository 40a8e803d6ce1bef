//! What the benchmark binaries (`tether-bench`, `tether-editor-bench`) share:
//! a process's memory and CPU from `/proc`, binaries built beside them, free
//! ports on 127.0.0.1, and the PASS/MISS verdict lines `docs/benchmarks.md`
//! quotes. Linux only, as the benchmarks are.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use tokio::process::Command;

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

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
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
    }

    #[test]
    fn mib_has_two_decimals() {
        assert_eq!(mib(1536), "1.50 MiB");
    }
}
