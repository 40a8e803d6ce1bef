//! What the agent is doing, for the library (a `watch` channel of
//! [`Status`]) and for operators (`status.json` in the state directory, read
//! by `tetherd status` whether or not the daemon runs).
//!
//! The daemon writes `status.json` atomically on every change and every
//! [`STATUS_REFRESH`], with its pid and the time; a reader decides "running"
//! from `/proc/<pid>` and the file's freshness. This module owns those shapes
//! and the report; it never changes the agent's state.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{self, Clock};
use crate::duration::Human;
use crate::files::{self, Mode};
use crate::identity::{Identity, StateDir};

/// How often the daemon rewrites `status.json` when nothing changes.
pub const STATUS_REFRESH: Duration = Duration::from_secs(10);
/// A status file older than this is stale: its daemon is hung or gone.
pub const STALE_AFTER: Duration = Duration::from_secs(35);

/// Where the tunnel is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    /// Not connected and not trying (starting up).
    Disconnected,
    /// A connection attempt is under way.
    Connecting,
    /// The tunnel is up.
    Connected,
    /// Waiting before the next attempt.
    Backoff,
    /// The agent has shut down.
    Stopped,
}

impl TunnelState {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelState::Disconnected => "disconnected",
            TunnelState::Connecting => "connecting",
            TunnelState::Connected => "connected",
            TunnelState::Backoff => "backoff",
            TunnelState::Stopped => "stopped",
        }
    }
}

/// The agent's current state, as published on its `watch` channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: TunnelState,
    /// When `state` was entered, seconds since the Unix epoch.
    pub since: u64,
    /// The last failure, one line, cleared by nothing (kept for operators).
    pub last_error: Option<String>,
    /// Sessions that completed the tunnel handshake.
    pub connects: u64,
    /// Connection attempts made.
    pub attempts: u64,
    /// The tunnel's smoothed round-trip time, while connected.
    #[serde(with = "opt_millis", rename = "rtt_ms")]
    pub rtt: Option<Duration>,
    pub device_id: String,
    /// When the current certificate expires, seconds since the Unix epoch.
    pub cert_not_after: u64,
    /// SHA-256 of the current certificate, hex.
    pub cert_fingerprint: String,
    /// Certificates renewed since the agent started.
    pub renewals: u64,
    /// While in backoff: when the next attempt starts (Unix seconds).
    pub next_attempt_at: Option<u64>,
    /// Where the device's snapshots stand; `None` without a local Node-RED.
    #[serde(default)]
    pub snapshot: Option<tether_proto::control::SnapshotHealth>,
}

impl Status {
    /// One line for systemd's `STATUS=`: `tunnel connected (rtt 3.2 ms)`,
    /// `tunnel backoff: WHY`.
    pub fn one_line(&self) -> String {
        let mut line = format!("tunnel {}", self.state.as_str());
        match (self.state, self.rtt, &self.last_error) {
            (TunnelState::Connected, Some(rtt), _) => {
                line.push_str(&format!(" (rtt {:.1} ms)", rtt.as_secs_f64() * 1000.0))
            }
            (TunnelState::Backoff | TunnelState::Connecting, _, Some(why)) => {
                line.push_str(&format!(": {why}"))
            }
            _ => {}
        }
        if let Some(outcome) = self.snapshot.as_ref().and_then(|s| s.outcome.as_ref()) {
            line.push_str(&format!("; snapshot {outcome}"));
        }
        line
    }

    /// The status of an agent that has not tried to connect yet.
    pub fn new(
        device_id: String,
        cert_not_after: u64,
        cert_fingerprint: String,
        now: u64,
    ) -> Status {
        Status {
            state: TunnelState::Disconnected,
            since: now,
            last_error: None,
            connects: 0,
            attempts: 0,
            rtt: None,
            device_id,
            cert_not_after,
            cert_fingerprint,
            renewals: 0,
            next_attempt_at: None,
            snapshot: None,
        }
    }

    /// Moves to `state` (keeping `since` if it is the same state).
    pub fn enter(&mut self, state: TunnelState, now: u64) {
        if self.state != state {
            self.state = state;
            self.since = now;
        }
        if state != TunnelState::Backoff {
            self.next_attempt_at = None;
        }
        if state != TunnelState::Connected {
            self.rtt = None;
        }
    }
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let ms = Option::<f64>::deserialize(d)?;
        Ok(ms
            .filter(|ms| ms.is_finite() && *ms >= 0.0 && *ms < 1e12)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0)))
    }
}

/// The content of `status.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusFile {
    pub pid: u32,
    /// When this file was written, Unix seconds.
    pub updated_at: u64,
    pub agent_version: String,
    /// When the daemon started, Unix seconds.
    pub started_at: u64,
    #[serde(flatten)]
    pub status: Status,
    /// The audit queue's figures when the file was written.
    #[serde(default)]
    pub audit: Option<crate::audit::QueueStats>,
    /// The MQTT bridge's figures, with `[mqtt]`.
    #[serde(default)]
    pub mqtt: Option<tether_proto::mqtt::Figures>,
    /// The snapshot folder, where `tetherd snapshot apply-now` leaves its
    /// request.
    #[serde(default)]
    pub snapshot_root: Option<String>,
}

/// Writes `status.json` atomically.
pub fn write_file(state: &StateDir, file: &StatusFile) -> Result<(), files::FileError> {
    let mut json = serde_json::to_vec_pretty(file).unwrap_or_default();
    json.push(b'\n');
    files::write_atomic(&state.status_path(), &json, Mode::Public)
}

/// What `tetherd status` shows. The JSON form is stable: fields are only
/// ever added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub state_dir: String,
    pub enrolled: bool,
    pub device_id: Option<String>,
    pub name: Option<String>,
    pub platform: Option<String>,
    pub tunnel_url: Option<String>,
    pub enrolled_at: Option<u64>,
    pub cert_not_after: Option<u64>,
    pub cert_fingerprint: Option<String>,
    /// Instance protection mode as last stored (`None`: never set, off).
    #[serde(default)]
    pub protection: Option<bool>,
    /// Set when the state directory could not be read.
    pub error: Option<String>,
    pub daemon: DaemonReport,
}

/// The daemon part of a [`Report`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DaemonReport {
    /// A daemon process with the pid in `status.json` exists and the file
    /// is fresh.
    pub running: bool,
    pub pid: Option<u32>,
    pub updated_at: Option<u64>,
    /// The tunnel state the daemon last wrote (`stopped` if none runs).
    pub state: Option<TunnelState>,
    pub since: Option<u64>,
    pub last_error: Option<String>,
    pub rtt_ms: Option<f64>,
    pub connects: Option<u64>,
    pub attempts: Option<u64>,
    /// The audit queue, as the daemon last wrote it.
    #[serde(default)]
    pub audit: Option<crate::audit::QueueStats>,
    /// The snapshots, as the daemon last wrote them.
    #[serde(default)]
    pub snapshot: Option<tether_proto::control::SnapshotHealth>,
    /// The MQTT bridge, as the daemon last wrote it.
    #[serde(default)]
    pub mqtt: Option<tether_proto::mqtt::Figures>,
    /// The daemon's snapshot folder.
    #[serde(default)]
    pub snapshot_root: Option<String>,
}

/// `running 7, last: applied 7; 8 staged; node-red running (pid 12)`.
pub fn snapshot_line(s: &tether_proto::control::SnapshotHealth) -> String {
    let mut line = match s.current {
        Some(v) => format!("running {v}"),
        None => "none yet (Node-RED runs the flows in its user directory)".into(),
    };
    if let Some(outcome) = &s.outcome {
        line.push_str(&format!(", last: {outcome}"));
    }
    if let Some(v) = s.staged {
        line.push_str(&format!("; {v} staged, waiting to be switched in"));
    }
    if let Some(n) = &s.node_red {
        line.push_str(&format!("; node-red {n}"));
    }
    line
}

/// Builds the report for a state directory.
pub fn report(state: &StateDir, clock: Clock) -> Report {
    let mut report = Report {
        state_dir: state.root().display().to_string(),
        enrolled: false,
        device_id: None,
        name: None,
        platform: None,
        tunnel_url: None,
        enrolled_at: None,
        cert_not_after: None,
        cert_fingerprint: None,
        protection: None,
        error: None,
        daemon: DaemonReport {
            running: false,
            pid: None,
            updated_at: None,
            state: None,
            since: None,
            last_error: None,
            rtt_ms: None,
            connects: None,
            attempts: None,
            audit: None,
            snapshot: None,
            mqtt: None,
            snapshot_root: None,
        },
    };
    match state.load() {
        Ok(Some(identity)) => fill_identity(&mut report, state, &identity),
        Ok(None) => {}
        Err(e) => report.error = Some(e.to_string()),
    }
    if let Some(file) = read_status_file(&state.status_path()) {
        let age = clock.now_unix().saturating_sub(file.updated_at);
        let alive = Path::new(&format!("/proc/{}", file.pid)).exists();
        let running =
            alive && age <= STALE_AFTER.as_secs() && file.status.state != TunnelState::Stopped;
        let d = &mut report.daemon;
        d.running = running;
        d.pid = Some(file.pid);
        d.updated_at = Some(file.updated_at);
        d.state = Some(if running {
            file.status.state
        } else {
            TunnelState::Stopped
        });
        d.since = Some(file.status.since);
        d.last_error = file.status.last_error.clone();
        d.rtt_ms = file
            .status
            .rtt
            .filter(|_| running)
            .map(|r| r.as_secs_f64() * 1000.0);
        d.connects = Some(file.status.connects);
        d.attempts = Some(file.status.attempts);
        d.audit = file.audit.clone();
        d.snapshot = file.status.snapshot.clone();
        d.mqtt = file.mqtt.clone();
        d.snapshot_root = file.snapshot_root.clone();
        // The daemon's view of the certificate is the newest.
        if running && report.enrolled {
            report.cert_not_after = Some(file.status.cert_not_after);
            report.cert_fingerprint = Some(file.status.cert_fingerprint);
        }
    }
    report
}

fn fill_identity(report: &mut Report, state: &StateDir, identity: &Identity) {
    report.enrolled = true;
    report.device_id = Some(identity.device_id.clone());
    report.name = Some(identity.name.clone());
    report.platform = Some(identity.platform.clone());
    report.tunnel_url = Some(identity.tunnel_url.clone());
    report.enrolled_at = Some(identity.enrolled_at);
    // Unreadable counts as on, as the daemon treats it.
    report.protection = crate::editor::protection::stored(state).unwrap_or(Some(true));
    match state.credentials(identity) {
        Ok(creds) => {
            report.cert_not_after = Some(creds.cert.not_after);
            report.cert_fingerprint = Some(creds.cert.fingerprint);
        }
        Err(e) => report.error = Some(e.to_string()),
    }
}

fn read_status_file(path: &Path) -> Option<StatusFile> {
    let bytes = files::read_bounded(path, 64 * 1024).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The human form of a report: a short aligned block.
pub fn render(report: &Report, clock: Clock) -> String {
    let now = clock.now_unix();
    let mut rows: Vec<(&str, String)> = Vec::new();
    let ago = |t: u64| {
        format!(
            "{} ({} ago)",
            clock::rfc3339(t),
            Human(Duration::from_secs(now.saturating_sub(t)))
        )
    };
    if report.enrolled {
        rows.push(("enrolled", "yes".into()));
        rows.push(("device", report.device_id.clone().unwrap_or_default()));
        rows.push(("name", report.name.clone().unwrap_or_default()));
        rows.push(("platform", report.platform.clone().unwrap_or_default()));
    } else {
        rows.push(("enrolled", "no (run 'tetherd enroll')".into()));
    }
    let d = &report.daemon;
    rows.push((
        "daemon",
        match (d.running, d.pid) {
            (true, Some(pid)) => format!("running (pid {pid})"),
            _ => "not running".into(),
        },
    ));
    if let Some(state) = d.state {
        let since = d
            .since
            .map(|s| format!(" since {}", ago(s)))
            .unwrap_or_default();
        rows.push(("tunnel", format!("{}{since}", state.as_str())));
    }
    if let Some(rtt) = d.rtt_ms {
        rows.push(("rtt", format!("{rtt:.1} ms")));
    }
    if let (Some(c), Some(a)) = (d.connects, d.attempts) {
        rows.push(("sessions", format!("{c} of {a} attempts")));
    }
    if let Some(e) = &d.last_error {
        rows.push(("last error", e.clone()));
    }
    if let Some(a) = &d.audit {
        let mut line = format!(
            "{} events not yet shipped ({} KiB on disk), last #{}",
            a.queued,
            a.file_bytes / 1024,
            a.last_seq
        );
        if a.dropped + a.lost > 0 {
            line.push_str(&format!(", {} dropped or lost", a.dropped + a.lost));
        }
        if let Some(e) = &a.error {
            line.push_str(&format!("; ERROR: {e}"));
        }
        rows.push(("audit", line));
    }
    if let Some(s) = &d.snapshot {
        rows.push(("snapshot", snapshot_line(s)));
    }
    if let Some(m) = &d.mqtt {
        let mut line = format!(
            "{} messages in the outbox ({} KiB), {} sent, {} received",
            m.outbox_messages,
            m.outbox_bytes / 1024,
            m.sent,
            m.received
        );
        if m.outbox_dropped + m.qos0_dropped > 0 {
            line.push_str(&format!(
                ", dropped: {} from a full outbox, {} QoS 0 while offline",
                m.outbox_dropped, m.qos0_dropped
            ));
        }
        if m.refused > 0 {
            line.push_str(&format!(", {} refused", m.refused));
        }
        rows.push(("mqtt", line));
    }
    if let Some(t) = report.cert_not_after {
        let left = if t > now {
            format!("in {}", Human(Duration::from_secs(t - now)))
        } else {
            "EXPIRED".into()
        };
        rows.push((
            "certificate",
            format!("expires {} ({left})", clock::rfc3339(t)),
        ));
    }
    if let Some(on) = report.protection {
        let mode = if on {
            "on (flows read-only in the editor)"
        } else {
            "off"
        };
        rows.push(("protection", mode.into()));
    }
    if let Some(e) = &report.error {
        rows.push(("error", e.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_without_anything_reports_not_enrolled_and_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let report = report(&StateDir::new(dir.path()), Clock::system());
        assert!(!report.enrolled);
        assert!(!report.daemon.running);
        assert_eq!(report.error, None);
        assert!(render(&report, Clock::system()).contains("enrolled  no"));
    }

    #[test]
    fn a_status_file_of_this_live_process_counts_as_running_until_stale() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let now = Clock::system().now_unix();
        let mut status = Status::new("dev_x".into(), now + 100, "ab".into(), now);
        status.enter(TunnelState::Connected, now);
        status.rtt = Some(Duration::from_micros(1500));
        let file = StatusFile {
            pid: std::process::id(),
            updated_at: now,
            agent_version: "0".into(),
            started_at: now,
            status,
            audit: Some(crate::audit::QueueStats {
                queued: 12,
                error: Some("the disk holding '/x' is full".into()),
                ..Default::default()
            }),
            mqtt: Some(tether_proto::mqtt::Figures {
                outbox_messages: 7,
                outbox_dropped: 3,
                refused: 2,
                ..Default::default()
            }),
            snapshot_root: Some("/var/lib/tether-node-red/snapshots".into()),
        };
        write_file(&state, &file).unwrap();
        let r = report(&state, Clock::system());
        assert!(r.daemon.running);
        let text = render(&r, Clock::system());
        assert!(text.contains("12 events not yet shipped"), "{text}");
        assert!(text.contains("7 messages in the outbox"), "{text}");
        assert!(text.contains("3 from a full outbox"), "{text}");
        assert!(text.contains("2 refused"), "{text}");
        assert!(
            text.contains("ERROR: the disk holding '/x' is full"),
            "{text}"
        );
        assert_eq!(r.daemon.state, Some(TunnelState::Connected));
        assert_eq!(r.daemon.rtt_ms, Some(1.5));
        let later = report(&state, Clock::with_offset(STALE_AFTER.as_secs() as i64 + 5));
        assert!(!later.daemon.running);
        assert_eq!(later.daemon.state, Some(TunnelState::Stopped));
    }
}
