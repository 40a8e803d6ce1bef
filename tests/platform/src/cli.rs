//! The `tether-platform` command line: its arguments (clap derive), the
//! duration syntax (`30s`, `10m`, `1h`, `30d`), the device and user tables
//! and reading a password from standard input.
//!
//! This module owns what a person types and reads. It never talks to the
//! network itself: `main.rs` runs the commands with [`crate::Platform`],
//! [`crate::client::AdminClient`] (and its listen sessions) and
//! [`crate::connect::Proxy`].

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use tether_proto::grant::Role;

use tether_proto::api::Secret;

use crate::platform::DeviceInfo;
use crate::store::TokenSummary;
use crate::users::{MAX_PASSWORD_LEN, UserInfo};

/// The reference Tether platform and its admin commands.
#[derive(Debug, Parser)]
#[command(name = "tether-platform", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the platform: enrollment, tunnels and the admin API on one HTTPS listener.
    Serve(Box<ServeArgs>),
    /// Provisioning tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Platform users: who may log in to the web pages and open device editors.
    #[command(subcommand)]
    User(UserCommand),
    /// The platform's signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Signed snapshots: what a device's Node-RED runs (flows, credentials, settings,
    /// environment variables), verified by the device before it runs them.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Show devices' audit trails, newest first, with each device's chain verification:
    /// verified (signed by the device through its last event), unsigned tail, or BROKEN
    /// (an event altered, removed or missing without a drop marker; each place is listed).
    Audit(AuditArgs),
    /// Reach a TCP service on a device through its tunnel.
    ///
    /// By default the running platform listens on --listen itself, on its own host, and
    /// carries each connection over the device's tunnel (one TLS hop); the listener closes
    /// when this command exits. The address must be a loopback address unless the platform
    /// runs with `serve --allow-remote-listen`.
    ///
    /// With --remote, this command listens on this machine instead and sends each
    /// connection to the platform over HTTPS (for engineers not on the platform's host;
    /// one more TLS hop).
    Connect(ConnectArgs),
}

/// Where the platform keeps its state; admin commands read it to find the
/// running platform.
#[derive(Debug, Args)]
pub struct DataDir {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataDir,
    /// Address of the HTTPS listener.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// A name for the server certificate (repeat for several); the first is the public host.
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Validity of device certificates.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub cert_validity: Duration,
    /// Enrollment attempts per source address at once.
    #[arg(long, default_value_t = 10)]
    pub enroll_burst: u32,
    /// Time to regain one enrollment attempt.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub enroll_refill: Duration,
    /// Connections (tunnels included) held at once.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// WebSocket read buffer per tunnel, bytes (allocated for every tunnel).
    #[arg(long, default_value_t = 8 * 1024)]
    pub ws_read_buffer: usize,
    /// WebSocket write buffer target per tunnel, bytes (grown only when a
    /// tunnel carries traffic).
    #[arg(long, default_value_t = 128 * 1024)]
    pub ws_write_buffer: usize,
    /// Let `connect` ask the platform to listen on addresses other than loopback.
    #[arg(long)]
    pub allow_remote_listen: bool,
    /// `connect` listeners held at once.
    #[arg(long, default_value_t = 64)]
    pub max_listeners: usize,
    /// Connections one `connect` listener carries at once.
    #[arg(long, default_value_t = 256)]
    pub max_listener_connections: usize,
    /// How long the editor proxy waits for a device's answer to a request (then 504).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub editor_timeout: Duration,
    /// The DNS domain of the device editor origins: each device's editor is
    /// served on the host `dev-ID.DOMAIN` (ID: the device id without `dev_`). Default:
    /// `devices.NAME`, NAME the first --name. It needs a wildcard DNS record to this platform
    /// (browsers resolve `*.localhost` on their own).
    #[arg(long, value_name = "DOMAIN")]
    pub editor_domain: Option<String>,
    /// MiB of Node-RED editor files the editor asset cache holds in memory (least recently used
    /// out first); 0 caches nothing.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub editor_cache_mib: usize,
    /// Port of the embedded MQTT broker (MQTT 5) on 127.0.0.1; 0 picks a free one
    /// (`platform.json` names it).
    #[arg(long, default_value_t = 1883, value_name = "PORT")]
    pub mqtt_port: u16,
    /// Also an MQTT 3.1.1 listener of the embedded broker on this port of 127.0.0.1, for
    /// clients that do not speak MQTT 5 (0 picks a free one).
    #[arg(long, value_name = "PORT", conflicts_with_all = ["mqtt_broker", "no_mqtt"])]
    pub mqtt_v311_port: Option<u16>,
    /// Bridge devices to this running broker instead of an embedded one:
    /// `mqtt://[USER[:PASSWORD]@]HOST[:PORT]`, or `mqtts://...` (TLS, with --mqtt-ca).
    #[arg(long, value_name = "URL", conflicts_with = "no_mqtt")]
    pub mqtt_broker: Option<crate::mqtt::BrokerUrl>,
    /// The CA (PEM file) that signed the certificate of an mqtts:// --mqtt-broker.
    #[arg(long, value_name = "FILE", requires = "mqtt_broker")]
    pub mqtt_ca: Option<std::path::PathBuf>,
    /// No MQTT broker: devices' mqtt streams are refused.
    #[arg(long)]
    pub no_mqtt: bool,
    /// Messages a second one device may publish (past it, it is slowed down, never dropped).
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    pub mqtt_rate: u32,
    /// Messages kept for one device until it acknowledges them, also while it is offline
    /// (oldest dropped and counted when full).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub mqtt_queue: usize,
    /// Bytes of those messages, at most.
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_name = "BYTES")]
    pub mqtt_queue_bytes: usize,
    /// Largest payload a device may publish, bytes (at most 1 MiB).
    #[arg(long, default_value_t = tether_proto::mqtt::MAX_PAYLOAD, value_name = "BYTES")]
    pub mqtt_max_payload: usize,
}

impl ServeArgs {
    /// The MQTT configuration these arguments ask for.
    pub fn mqtt_config(&self) -> crate::mqtt::MqttConfig {
        use crate::mqtt::MqttBroker;
        let broker = match (&self.mqtt_broker, self.no_mqtt) {
            (_, true) => MqttBroker::Off,
            (Some(url), false) => MqttBroker::External(crate::mqtt::BrokerUrl {
                ca_file: self.mqtt_ca.clone(),
                ..url.clone()
            }),
            (None, false) => MqttBroker::Embedded {
                port: self.mqtt_port,
                v4_port: self.mqtt_v311_port,
            },
        };
        crate::mqtt::MqttConfig {
            broker,
            max_payload: self.mqtt_max_payload,
            rate_per_sec: self.mqtt_rate,
            rate_burst: self.mqtt_rate.saturating_mul(2),
            queue_messages: self.mqtt_queue,
            queue_bytes: self.mqtt_queue_bytes,
        }
    }
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// One device (`dev_...`).
    #[arg(long, conflicts_with = "team")]
    pub device: Option<String>,
    /// Every device of one team (every device without --device or --team).
    #[arg(long)]
    pub team: Option<String>,
    /// Events from this sequence number on.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Only events of this type (`deploy`, `refused`, `tunnel_down`...).
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Only this user's events.
    #[arg(long)]
    pub user: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
    /// Print JSON (verification and events) instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataDir,
}

/// The audit report as text: one line per device (its chain's state and
/// problems), then the events, newest first.
pub fn audit_text(report: &crate::audit::AuditReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for v in &report.devices {
        let _ = writeln!(
            out,
            "{}  chain {}  events {}  signed through {}  dropped {}",
            v.device_id, v.state, v.records, v.verified_through, v.dropped
        );
        for p in &v.problems {
            let _ = writeln!(out, "  ! event {}: {}", p.seq, p.what);
        }
    }
    if !report.entries.is_empty() {
        out.push('\n');
    }
    for e in &report.entries {
        let who = e
            .user
            .clone()
            .unwrap_or_else(|| format!("{:?}", e.actor).to_lowercase());
        let _ = writeln!(
            out,
            "{}  {}  {:>6}  {:<22} {:<12} {}  {}",
            rfc3339(e.time / 1000),
            e.device_id,
            e.seq,
            e.kind,
            who,
            e.subject,
            e.details
        );
    }
    out
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a provisioning token; prints the token alone on stdout:
    /// `tpt_<secret>.<sha256 of the CA's public key>`.
    Create(TokenCreateArgs),
    /// List provisioning tokens: id, team, uses left, expiry; never a secret.
    List(TokenListArgs),
    /// Revoke a provisioning token by its id (from `token list`).
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args)]
pub struct TokenListArgs {
    #[command(flatten)]
    pub data: DataDir,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's id (16 hex digits, from `token list` or `token create`).
    pub id: String,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub data: DataDir,
    /// How long the token stays valid (1h when left out; required with
    /// --uses above 1).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// How many devices may enroll with it (more than 1 needs --ttl).
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// The team its devices belong to.
    #[arg(long, default_value = "default")]
    pub team: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Replace the editor grant key: devices learn the new one over their control stream,
    /// signed by the old one, without enrolling again; grants signed by the old key are
    /// refused once the grants signed before the rotation have expired.
    RotateGrant(DataDir),
    /// Rotate the snapshot keys: a new root key and a new snapshot key, announced as the next
    /// root version signed by the old root key and the new one. Every snapshot is signed with
    /// the new key from now on; devices walk the new root at their next snapshot pull.
    RotateSnapshot(RotateSnapshotArgs),
}

#[derive(Debug, Args)]
pub struct RotateSnapshotArgs {
    /// Revoke the old root key and snapshot key (after a leak): devices refuse anything they
    /// sign once they have walked the new root.
    #[arg(long)]
    pub revoke_old: bool,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List enrolled devices.
    List(DeviceListArgs),
    /// Revoke a device: its tunnel is closed and its certificates refused.
    Revoke(DeviceRevokeArgs),
    /// Turn instance protection mode on or off: flows become read-only in the editor for
    /// every role, and changes arrive only as signed snapshots.
    Protect(DeviceProtectArgs),
    /// Ask a device to renew its certificate now (its previous one is then refused once the
    /// device uses the new one): after a copy of its identity was found, say.
    Renew(DeviceRevokeArgs),
    /// Revoke one certificate of a device (by its SHA-256 fingerprint), not the device.
    RevokeCert(DeviceRevokeCertArgs),
    /// Show one device: its tunnel, certificate, audit queue and snapshots.
    Show(DeviceShowArgs),
    /// Start, stop or restart the device's Node-RED (recorded in its audit trail).
    NodeRed(DeviceNodeRedArgs),
    /// Set the device's maintenance window ("22:00-06:00", the device's local time; several
    /// ranges separated by commas): snapshots are switched in only inside it, or when someone
    /// on site runs `tetherd snapshot apply-now`. A window in the device's config wins.
    Window(DeviceWindowArgs),
}

#[derive(Debug, Args)]
pub struct DeviceWindowArgs {
    /// The device id (`dev_...`).
    pub id: String,
    /// The window, e.g. "22:00-06:00".
    #[arg(required_unless_present = "clear", conflicts_with = "clear")]
    pub window: Option<String>,
    /// Remove the window: snapshots are switched in as soon as they are staged.
    #[arg(long)]
    pub clear: bool,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct DeviceShowArgs {
    /// The device id (`dev_...`).
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct DeviceNodeRedArgs {
    /// The device id (`dev_...`).
    pub id: String,
    /// start, stop or restart.
    #[arg(value_parser = ["start", "stop", "restart"])]
    pub action: String,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Make and sign a snapshot for a device from a folder: flows.json (required),
    /// flows_cred.json, settings.json (the settings a snapshot may set; the platform adds
    /// the device's credentialSecret), env.json, and any other files. Not pushed yet.
    Create(SnapshotCreateArgs),
    /// List snapshots, oldest first; `*` marks the one each device should run.
    List(SnapshotListArgs),
    /// Tell a device to run a snapshot: it pulls, verifies and applies it, and rolls it
    /// back if Node-RED does not come up healthy.
    Push(SnapshotPushArgs),
    /// Push the snapshot pushed before the last again, signed as a new version (a device
    /// never goes back a version number).
    Rollback(SnapshotDeviceArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotCreateArgs {
    /// The device id (`dev_...`).
    #[arg(long)]
    pub device: String,
    /// The folder of files.
    #[arg(
        required_unless_present = "from_device",
        conflicts_with = "from_device"
    )]
    pub dir: Option<PathBuf>,
    /// Instead of a folder: the flows the device's Node-RED runs now (with their encrypted
    /// credentials), captured over its tunnel, and the settings, environment and modules of
    /// the snapshot they were deployed on. The device must be online.
    #[arg(long)]
    pub from_device: bool,
    /// How long the snapshot may be applied.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub expires_in: Duration,
    /// Push it at once.
    #[arg(long)]
    pub push: bool,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct SnapshotListArgs {
    /// Only this device's.
    #[arg(long)]
    pub device: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct SnapshotPushArgs {
    /// The device id (`dev_...`).
    #[arg(long)]
    pub device: String,
    /// The version to run.
    pub version: u64,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct SnapshotDeviceArgs {
    /// The device id (`dev_...`).
    #[arg(long)]
    pub device: String,
    #[command(flatten)]
    pub data: DataDir,
}

/// Reads every regular file under `dir` (relative paths with `/`), for a
/// snapshot, at most `max_total` bytes in all.
pub fn read_snapshot_dir(
    dir: &std::path::Path,
    max_total: u64,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let entries =
            std::fs::read_dir(&path).map_err(|e| format!("cannot list {}: {e}", path.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", path.display()))?;
            let file = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| format!("cannot inspect {}: {e}", file.display()))?;
            if kind.is_dir() {
                pending.push(file);
            } else if kind.is_file() {
                let relative = file
                    .strip_prefix(dir)
                    .ok()
                    .and_then(|p| p.to_str())
                    .ok_or_else(|| format!("{} has a name that is not UTF-8", file.display()))?
                    .to_string();
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                if total > max_total {
                    return Err(format!(
                        "{} holds more than {max_total} bytes",
                        dir.display()
                    ));
                }
                let bytes = std::fs::read(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                out.push((relative, bytes));
            } else {
                return Err(format!(
                    "{} is neither a file nor a folder (links are not followed)",
                    file.display()
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The snapshots as a table.
pub fn snapshot_table(snapshots: &[crate::snapshots::SnapshotInfo]) -> String {
    let mut rows = vec![[
        "DEVICE".to_string(),
        "VERSION".to_string(),
        "CREATED".to_string(),
        "EXPIRES".to_string(),
        "FILES".to_string(),
        "BYTES".to_string(),
    ]];
    for s in snapshots {
        rows.push([
            s.device.clone(),
            format!("{}{}", s.version, if s.target { " *" } else { "" }),
            rfc3339(s.created_at),
            rfc3339(s.expires_at),
            s.components.to_string(),
            s.bytes.to_string(),
        ]);
    }
    table(&rows)
}

/// One device, a line per fact.
pub fn device_text(d: &DeviceInfo, now: u64) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    line("device", d.id.clone());
    line("name", d.name.clone());
    line("team", d.team.clone());
    line(
        "status",
        match (d.revoked, d.online) {
            (true, _) => "revoked".into(),
            (false, true) => format!(
                "online{}",
                d.last_heartbeat.map_or(String::new(), |t| format!(
                    ", last heartbeat {} ago",
                    span(now.saturating_sub(t))
                ))
            ),
            (false, false) => "offline".into(),
        },
    );
    line(
        "certificate",
        format!("expires in {}", span(d.cert_not_after.saturating_sub(now))),
    );
    line("protected", if d.protected { "yes" } else { "no" }.into());
    if let Some(a) = &d.audit {
        line(
            "audit",
            format!(
                "{} queued on the device, last #{}{}",
                a.queued,
                a.last_seq,
                a.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("; ERROR: {e}"))
            ),
        );
    }
    match &d.snapshot {
        Some(s) => {
            line(
                "snapshot",
                match s.current {
                    Some(v) => format!("running {v}"),
                    None => "none applied".into(),
                },
            );
            if let Some(o) = &s.outcome {
                line("last", o.clone());
            }
            if let Some(v) = s.staged {
                line("staged", format!("{v}, waiting to be switched in"));
            }
            if let Some(n) = &s.node_red {
                line("node-red", n.clone());
            }
        }
        None if d.online => line("snapshot", "no local Node-RED reported".into()),
        None => {}
    }
    if let Some(w) = &d.window {
        line("window", format!("{w} (device's local time)"));
    }
    if let Some(h) = &d.health {
        let mib = |b: u64| b / (1024 * 1024);
        line(
            "device",
            format!(
                "CPU {:.0} % of {} cores, load {:.2} {:.2} {:.2}, memory {} of {} MiB, disk {} of {} MiB free, up {}",
                h.cpu_percent / h.cpus.max(1) as f32,
                h.cpus,
                h.load[0],
                h.load[1],
                h.load[2],
                mib(h.memory_used),
                mib(h.memory_total),
                mib(h.disk_free),
                mib(h.disk_total),
                span(h.uptime_secs)
            ),
        );
        line(
            "agent",
            format!(
                "CPU {:.1} %, {:.1} MiB",
                h.agent.cpu_percent,
                h.agent.rss_bytes as f64 / 1048576.0
            ),
        );
        if let Some(n) = &h.node_red {
            line(
                "node-red",
                format!(
                    "CPU {:.1} %, {:.1} MiB",
                    n.cpu_percent,
                    n.rss_bytes as f64 / 1048576.0
                ),
            );
        }
    }
    if d.history.len() > 1 {
        let peak = d.history.iter().map(|p| p.cpu).fold(0.0f32, f32::max);
        line(
            "last hour",
            format!(
                "{} heartbeats, device CPU peak {peak:.0} %",
                d.history.len()
            ),
        );
    }
    if let Some(m) = &d.mqtt {
        mqtt_lines(m, &mut line);
    }
    out
}

/// The MQTT bridge's lines of `device show`.
fn mqtt_lines(m: &crate::mqtt::MqttStats, line: &mut impl FnMut(&str, String)) {
    line(
        "mqtt",
        format!(
            "stream {}, broker {}; filters: {}",
            if m.stream { "up" } else { "down" },
            match (m.broker_connected, m.subscribed) {
                (true, true) => "connected",
                (true, false) => "connected (subscribing)",
                (false, _) => "NOT CONNECTED",
            },
            if m.filters.is_empty() {
                "none".to_string()
            } else {
                m.filters.join(", ")
            }
        ),
    );
    line(
        "mqtt in",
        format!(
            "{} from the device (handled through #{}), {} sent again and ignored",
            m.from_device, m.delivered, m.duplicates
        ),
    );
    line(
        "mqtt out",
        format!(
            "{} to the device, {} acknowledged, {} waiting ({} B); {} queued while offline, {} dropped (queue full), {} QoS 0 dropped while offline",
            m.to_device,
            m.acked_by_device,
            m.waiting,
            m.waiting_bytes,
            m.queued_offline,
            m.dropped,
            m.qos0_dropped
        ),
    );
    if m.refused > 0 {
        line(
            "mqtt refused",
            format!(
                "{}, last: {}",
                m.refused,
                m.last_refusal.as_deref().unwrap_or("-")
            ),
        );
    }
    if let Some(f) = &m.figures {
        line(
            "outbox",
            format!(
                "{} messages ({} B) on the device, {} dropped (full), {} QoS 0 dropped while offline, {} refused by the device",
                f.outbox_messages, f.outbox_bytes, f.outbox_dropped, f.qos0_dropped, f.refused
            ),
        );
    }
}

#[derive(Debug, Args)]
pub struct DeviceRevokeCertArgs {
    /// The device id (`dev_...`).
    pub id: String,
    /// The certificate's SHA-256 fingerprint, hex.
    pub fingerprint: String,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["on", "off"])))]
pub struct DeviceProtectArgs {
    /// The device id (`dev_...`).
    pub id: String,
    /// Turn protection mode on.
    #[arg(long)]
    pub on: bool,
    /// Turn protection mode off.
    #[arg(long)]
    pub off: bool,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user. The password is read from standard input (one line; from a
    /// terminal, without echo).
    Add(UserAddArgs),
    /// List users.
    List(UserListArgs),
    /// Remove a user: their sessions end and their open editors are closed.
    Remove(UserRemoveArgs),
    /// Set a user's password, read from standard input like `user add`:
    /// every session of theirs ends and their open editors are closed.
    Passwd(UserRemoveArgs),
    /// Change a user's role: every session of theirs ends and their open
    /// editors are closed; the new role applies from their next login.
    Role(UserRoleArgs),
}

#[derive(Debug, Args)]
pub struct UserRoleArgs {
    /// The user name.
    pub name: String,
    /// The new role: owner, member or viewer.
    pub role: Role,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct UserAddArgs {
    /// The user name: 1 to 64 characters of A-Z a-z 0-9 . _ - @
    pub name: String,
    /// The team whose devices the user may reach.
    #[arg(long)]
    pub team: String,
    /// The user's role in the team: owner, member or viewer.
    #[arg(long)]
    pub role: Role,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct UserListArgs {
    #[command(flatten)]
    pub data: DataDir,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UserRemoveArgs {
    /// The user name.
    pub name: String,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct DeviceListArgs {
    #[command(flatten)]
    pub data: DataDir,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeviceRevokeArgs {
    /// The device id (`dev_...`).
    pub id: String,
    #[command(flatten)]
    pub data: DataDir,
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The device id (`dev_...`).
    pub device: String,
    /// The service name in the device's allow-list.
    pub service: String,
    /// Address to accept connections on: on the platform's host, or on this machine with --remote.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Listen on this machine and proxy each connection through the platform's HTTPS API.
    #[arg(long)]
    pub remote: bool,
    #[command(flatten)]
    pub data: DataDir,
}

/// Parses `30s`, `10m`, `1h`, `30d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| {
        format!("'{text}' is not a duration; use a number and s, m, h or d (e.g. 30s, 1h, 30d)")
    })?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{text}'; use s, m, h or d"
            ));
        }
    };
    value
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{text}' is too long"))
}

/// Reads one line, a password, from `input`: at most
/// [`MAX_PASSWORD_LEN`] bytes of UTF-8, not empty, the line end removed.
/// Reads no more than that (and the line end) whatever `input` holds.
pub fn read_password(input: impl BufRead) -> Result<Secret, String> {
    let limit = u64::try_from(MAX_PASSWORD_LEN + 2).unwrap_or(u64::MAX);
    let mut line = Vec::new();
    input
        .take(limit)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    check_password_line(line)
}

/// Checks a password line read from a terminal or a pipe.
pub fn check_password_line(mut line: Vec<u8>) -> Result<Secret, String> {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    if line.is_empty() {
        return Err("the password is empty; write it on standard input, one line".into());
    }
    if line.len() > MAX_PASSWORD_LEN {
        return Err(format!(
            "the password is longer than {MAX_PASSWORD_LEN} bytes"
        ));
    }
    String::from_utf8(line)
        .map(Secret::new)
        .map_err(|_| "the password is not valid UTF-8".into())
}

/// A human table of devices, one line each.
pub fn device_table(devices: &[DeviceInfo], now: u64) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "NAME".to_string(),
        "TEAM".to_string(),
        "STATUS".to_string(),
        "LAST HEARTBEAT".to_string(),
        "CERT EXPIRES".to_string(),
        "RTT".to_string(),
        "PROTECTED".to_string(),
    ]];
    for d in devices {
        let status = match (d.revoked, d.online) {
            (true, _) => "revoked",
            (false, true) => "online",
            (false, false) => "offline",
        };
        rows.push([
            d.id.clone(),
            d.name.clone(),
            d.team.clone(),
            status.to_string(),
            d.last_heartbeat.map_or("-".into(), |t| {
                format!("{} ago", span(now.saturating_sub(t)))
            }),
            format!("in {}", span(d.cert_not_after.saturating_sub(now))),
            d.rtt_micros
                .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
            if d.protected { "yes" } else { "no" }.to_string(),
        ]);
    }
    table(&rows)
}

/// A human table of provisioning tokens, one line each; never a secret.
pub fn token_table(tokens: &[TokenSummary], now: u64) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "TEAM".to_string(),
        "USES LEFT".to_string(),
        "EXPIRES".to_string(),
        "STATUS".to_string(),
    ]];
    for t in tokens {
        let status = if t.revoked {
            "revoked"
        } else if t.uses_left == 0 {
            "used"
        } else if now >= t.expires_at {
            "expired"
        } else {
            "usable"
        };
        let expires = if now >= t.expires_at {
            format!("{} ago", span(now - t.expires_at))
        } else {
            format!("in {}", span(t.expires_at - now))
        };
        rows.push([
            t.id.clone(),
            t.team.clone(),
            format!("{}/{}", t.uses_left, t.uses),
            expires,
            status.to_string(),
        ]);
    }
    table(&rows)
}

/// A human table of users, one line each.
pub fn user_table(users: &[UserInfo]) -> String {
    let mut rows = vec![["NAME".to_string(), "TEAM".to_string(), "ROLE".to_string()]];
    for u in users {
        rows.push([u.name.clone(), u.team.clone(), u.role.to_string()]);
    }
    table(&rows)
}

/// Columns padded to their widest cell.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `42s`, `5m`, `3h`, `29d`.
fn span(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// `unix` (seconds) as RFC 3339 in UTC, to the second.
pub fn rfc3339(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix.min(i64::MAX as u64) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        let cases = [
            ("30s", 30),
            ("10m", 600),
            ("1h", 3600),
            ("30d", 2_592_000),
            ("45", 45),
        ];
        for (text, secs) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in ["", "h", "1w", "1.5h", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_table_has_a_header_and_a_line_per_device() {
        let device = DeviceInfo {
            id: "dev_0123456789abcdef0123".into(),
            name: "press-7".into(),
            team: "line-3".into(),
            enrolled_at: 0,
            revoked: false,
            online: true,
            connected_since: Some(90),
            last_heartbeat: Some(95),
            cert_not_after: 100 + 86_400 * 29,
            rtt_micros: Some(1500),
            protected: true,
            current_certificate: None,
            superseded_seen_at: None,
            audit: None,
            snapshot: None,
            window: Some("22:00-06:00".into()),
            health: None,
            history: Vec::new(),
            mqtt: None,
        };
        assert!(device_text(&device, 100).contains("window       22:00-06:00"));
        assert!(!device_text(&device, 100).contains("mqtt"));
        let mut with_mqtt = device.clone();
        with_mqtt.mqtt = Some(crate::mqtt::MqttStats {
            stream: true,
            broker_connected: true,
            subscribed: true,
            filters: vec!["tether/line-3/d/in/#".into()],
            from_device: 7,
            refused: 1,
            last_refusal: Some("'elsewhere': outside".into()),
            dropped: 2,
            figures: Some(tether_proto::mqtt::Figures {
                outbox_messages: 12,
                ..Default::default()
            }),
            ..Default::default()
        });
        let text = device_text(&with_mqtt, 100);
        assert!(
            text.contains(
                "mqtt         stream up, broker connected; filters: tether/line-3/d/in/#"
            ),
            "{text}"
        );
        assert!(text.contains("mqtt in      7 from the device"), "{text}");
        assert!(text.contains("2 dropped (queue full)"), "{text}");
        assert!(
            text.contains("mqtt refused 1, last: 'elsewhere': outside"),
            "{text}"
        );
        assert!(text.contains("outbox       12 messages"), "{text}");
        let table = device_table(&[device], 100);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID"));
        assert!(
            lines[1].contains("online")
                && lines[1].contains("5s ago")
                && lines[1].contains("in 29d")
                && lines[1].ends_with("yes")
        );
        assert!(lines[0].ends_with("PROTECTED"));
    }

    #[test]
    fn a_password_is_one_bounded_line() {
        let read = |bytes: &[u8]| read_password(bytes).map(|s| s.expose().to_string());
        assert_eq!(read(b"s3cret\nmore"), Ok("s3cret".into()));
        assert_eq!(read(b"s3cret\r\n"), Ok("s3cret".into()));
        assert_eq!(read(b"no newline"), Ok("no newline".into()));
        assert!(read(b"\n").unwrap_err().contains("empty"));
        assert!(read(b"").unwrap_err().contains("empty"));
        let longest = vec![b'p'; MAX_PASSWORD_LEN];
        assert_eq!(read(&longest).map(|p| p.len()), Ok(MAX_PASSWORD_LEN));
        let long = vec![b'p'; MAX_PASSWORD_LEN + 1];
        assert!(read(&long).unwrap_err().contains("longer"));
        assert!(read(&[0xff, b'\n']).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn user_add_takes_a_role_and_protect_wants_on_or_off() {
        let cli = Cli::try_parse_from([
            "tether-platform",
            "user",
            "add",
            "--data-dir",
            "d",
            "--team",
            "t",
            "--role",
            "viewer",
            "ann",
        ])
        .unwrap();
        match cli.command {
            Command::User(UserCommand::Add(args)) => {
                assert_eq!((args.name.as_str(), args.role), ("ann", Role::Viewer));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &[
                "tether-platform",
                "user",
                "add",
                "--data-dir",
                "d",
                "--team",
                "t",
                "--role",
                "admin",
                "ann",
            ][..],
            &[
                "tether-platform",
                "device",
                "protect",
                "dev_1",
                "--data-dir",
                "d",
            ],
            &[
                "tether-platform",
                "device",
                "protect",
                "dev_1",
                "--on",
                "--off",
                "--data-dir",
                "d",
            ],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_rotate_snapshot_revokes_the_old_keys_only_when_asked() {
        let parse = |args: &[&str]| {
            let mut all = vec!["tether-platform", "keys", "rotate-snapshot"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|cli| cli.command) {
                Ok(Command::Keys(KeysCommand::RotateSnapshot(args))) => {
                    Ok((args.revoke_old, args.data.data_dir))
                }
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.kind()),
            }
        };
        assert_eq!(parse(&["--data-dir", "d"]), Ok((false, "d".into())));
        assert_eq!(
            parse(&["--revoke-old", "--data-dir", "d"]),
            Ok((true, "d".into()))
        );
        assert!(parse(&[]).is_err(), "the data directory is required");
        assert!(parse(&["--revoke", "--data-dir", "d"]).is_err());
    }
}
