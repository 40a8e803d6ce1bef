//! The systemd service protocol (`sd_notify(3)`), for `Type=notify` units:
//! `READY=1` once the agent's state is loaded and its tasks run, `STATUS=`
//! lines with the tunnel's state, `WATCHDOG=1` from the main loop at half
//! the unit's `WatchdogSec=` (so a hung agent is restarted), `RELOADING=1`
//! and `STOPPING=1`.
//!
//! Messages are datagrams to `$NOTIFY_SOCKET` (a path, or `@name` in the
//! abstract namespace). Without the variable (not started by systemd)
//! every call does nothing. A send that fails is logged once and never
//! stops the agent. This module never reads the agent's state: callers
//! hand it the text.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{debug, warn};

/// The variables systemd sets for the service's main process; a child
/// (Node-RED) must not see them.
pub const ENV_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Where notifications go.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
    warned: AtomicBool,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From the process's environment.
    pub fn from_env() -> Notifier {
        Notifier::from_vars(|name| std::env::var(name).ok(), std::process::id())
    }

    /// From variables `var` gives, for the process `pid`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, pid: u32) -> Notifier {
        let target = var("NOTIFY_SOCKET").and_then(|s| match s.strip_prefix('@') {
            Some(name) if !name.is_empty() => Some(Target::Abstract(name.as_bytes().to_vec())),
            Some(_) => None,
            None if s.starts_with('/') => Some(Target::Path(PathBuf::from(s))),
            None => None,
        });
        // WATCHDOG_PID, if set, names the process meant to feed it.
        let ours = var("WATCHDOG_PID").is_none_or(|p| p.parse() == Ok(pid));
        let watchdog = var("WATCHDOG_USEC")
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Notifier {
            target,
            watchdog,
            warned: AtomicBool::new(false),
        }
    }

    /// True if systemd listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the unit's timeout, if it has
    /// one.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// `READY=1` and a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A status line (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `RELOADING=1` with the monotonic time systemd asks for, then, when
    /// the reload is done, [`Notifier::ready`].
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|socket| match target {
            Target::Path(path) => socket.send_to(message.as_bytes(), path),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)
            }
        });
        match sent {
            Ok(_) => debug!(message, "told systemd"),
            Err(e) if !self.warned.swap(true, Ordering::Relaxed) => {
                warn!(cause = %e, "cannot notify systemd (NOTIFY_SOCKET); the unit may time out")
            }
            Err(_) => {}
        }
    }
}

/// systemd reads one line per assignment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn notifications_reach_the_socket_systemd_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier::from_vars(
            vars(&[
                ("NOTIFY_SOCKET", path.to_str().unwrap()),
                ("WATCHDOG_USEC", "30000000"),
                ("WATCHDOG_PID", "42"),
            ]),
            42,
        );
        assert!(notifier.enabled());
        assert_eq!(notifier.watchdog_every(), Some(Duration::from_secs(15)));
        let mut buf = [0u8; 256];
        notifier.ready("tunnel connected\nto x");
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=tunnel connected to x");
        notifier.watchdog();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        notifier.reloading();
        let n = listener.recv(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"RELOADING=1\nMONOTONIC_USEC="));
    }

    #[test]
    fn without_systemd_or_for_another_pid_nothing_is_sent() {
        let none = Notifier::from_vars(vars(&[]), 1);
        assert!(!none.enabled());
        assert_eq!(none.watchdog_every(), None);
        none.ready("x"); // does nothing, and does not panic
        let other = Notifier::from_vars(
            vars(&[
                ("NOTIFY_SOCKET", "@tether-test"),
                ("WATCHDOG_USEC", "1000000"),
                ("WATCHDOG_PID", "7"),
            ]),
            8,
        );
        assert!(other.enabled());
        assert_eq!(
            other.watchdog_every(),
            None,
            "the watchdog is another process's"
        );
        let relative = Notifier::from_vars(vars(&[("NOTIFY_SOCKET", "notify")]), 1);
        assert!(!relative.enabled());
    }
}
