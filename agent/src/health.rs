//! Health figures for heartbeats: the device's CPU, memory, load, uptime
//! and free disk where the agent keeps its state, and the CPU and memory
//! of the agent and of the Node-RED it launched.
//!
//! One long-lived `sysinfo::System`, refreshed selectively at each sample
//! (the CPU totals, memory, and only the two processes: never a scan of
//! every process), so that CPU use is measured over the time between two
//! heartbeats. Disk figures come from one `statvfs` of the state
//! directory. This module only reads `/proc` and the file system; it never
//! decides anything from what it reads.

use std::path::{Path, PathBuf};

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
use tether_proto::control::{DeviceHealth, ProcessHealth};

/// The sampler: keep one and call [`Health::sample`] at each heartbeat.
pub struct Health {
    system: System,
    state_dir: PathBuf,
    agent: Pid,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// A sampler for this process, with the disk figures of `state_dir`'s
    /// file system. The first sample's CPU figures cover the time since
    /// this call.
    pub fn new(state_dir: &Path) -> Health {
        let mut system = System::new();
        let agent = Pid::from_u32(std::process::id());
        // Refreshing processes' CPU refreshes the CPU totals too (once: a
        // second refresh in between would leave no time to measure over).
        system.refresh_processes_specifics(ProcessesToUpdate::Some(&[agent]), true, kind());
        Health {
            system,
            state_dir: state_dir.to_owned(),
            agent,
        }
    }

    /// The figures now; `node_red` is the launched Node-RED's pid, if it
    /// runs.
    pub fn sample(&mut self, node_red: Option<u32>) -> DeviceHealth {
        let node_red = node_red.map(Pid::from_u32);
        self.system.refresh_memory();
        let pids: Vec<Pid> = std::iter::once(self.agent).chain(node_red).collect();
        self.system
            .refresh_processes_specifics(ProcessesToUpdate::Some(&pids), true, kind());
        let process = |pid: Pid| {
            self.system.process(pid).map(|p| ProcessHealth {
                cpu_percent: p.cpu_usage(),
                rss_bytes: p.memory(),
            })
        };
        let cpus = self.system.cpus().len().max(1) as u32;
        let load = System::load_average();
        let (disk_total, disk_free) = disk(&self.state_dir);
        DeviceHealth {
            // sysinfo gives the average over cores; a percent of one core
            // reads like the processes' figures.
            cpu_percent: self.system.global_cpu_usage() * cpus as f32,
            cpus,
            load: [load.one, load.five, load.fifteen],
            memory_total: self.system.total_memory(),
            memory_used: self.system.used_memory(),
            disk_total,
            disk_free,
            uptime_secs: System::uptime(),
            agent: process(self.agent).unwrap_or_default(),
            node_red: node_red.and_then(process),
        }
    }
}

fn kind() -> ProcessRefreshKind {
    ProcessRefreshKind::nothing().with_cpu().with_memory()
}

/// Total and free bytes of the file system holding `dir`.
fn disk(dir: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(s) => (
            s.f_blocks.saturating_mul(s.f_frsize),
            s.f_bavail.saturating_mul(s.f_frsize),
        ),
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_sees_this_process_a_busy_child_and_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut health = Health::new(dir.path());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        // The first sample sees the child (once it has run a little:
        // sysinfo measures from a process's first nonzero CPU time); the
        // second measures it over the time between them, as two
        // heartbeats do.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let first = health.sample(Some(child.id()));
        assert!(first.node_red.is_some());
        std::thread::sleep(std::time::Duration::from_millis(500));
        let sample = health.sample(Some(child.id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(sample.cpus >= 1);
        assert!(sample.memory_total > 0 && sample.memory_used <= sample.memory_total);
        assert!(sample.disk_total > 0 && sample.disk_free <= sample.disk_total);
        assert!(sample.uptime_secs > 0);
        assert!(sample.agent.rss_bytes > 0, "{sample:?}");
        let busy = sample.node_red.expect("the child is seen");
        assert!(busy.rss_bytes > 0, "{sample:?}");
        assert!(
            busy.cpu_percent > 20.0,
            "a busy loop uses a core: {sample:?}"
        );
        assert!(sample.cpu_percent >= busy.cpu_percent * 0.5, "{sample:?}");
        // A pid that does not exist is absent, not an error.
        assert_eq!(health.sample(Some(u32::MAX - 7)).node_red, None);
    }
}
