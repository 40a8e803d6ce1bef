//! The typed events the agent records (`docs/audit-events.md`), and how
//! each becomes the parts of a record: type, actor, subject and details.
//!
//! Events never carry a grant, a token, a cookie, a key or an
//! `Authorization` header: names, roles, methods, paths without their
//! query, fingerprints and reasons only. Free text is cut to a bounded
//! length here, so a record always fits in `tether_proto::audit::MAX_RECORD`.

use std::time::Duration;

use serde_json::{Value, json};
use tether_proto::audit::{Actor, ActorKind};
use tether_proto::grant::Role;

/// Longest free-text field (a path, a reason) kept in a record, in bytes.
pub const MAX_TEXT: usize = 1024;

/// One event to record.
#[derive(Clone, Debug, PartialEq)]
pub enum AuditEvent {
    /// The device enrolled with a platform (the first record of its chain).
    Enrolled { device: String, platform: String },
    /// The tunnel completed its handshake.
    TunnelUp { url: String },
    /// The tunnel closed or failed, or a connection attempt failed after
    /// the tunnel had been up.
    TunnelDown { reason: String },
    /// The device certificate was renewed.
    CertificateRenewed { fingerprint: String, not_after: u64 },
    /// The platform switched instance protection mode.
    ProtectionChanged { enabled: bool },
    /// The platform's grant key moved on (rotation followed).
    GrantKeyRotated { key: String },
    /// The agent started with a configuration different from the last
    /// start's: `sha256` of the new file's contents.
    ConfigChanged { sha256: String },
    /// An editor stream with a valid grant was accepted.
    EditorSessionOpened {
        user: String,
        role: Role,
        stream: u64,
    },
    /// That stream (and its WebSocket, if it carried one) ended.
    EditorSessionClosed {
        user: String,
        role: Role,
        duration: Duration,
    },
    /// Node-RED accepted a deploy; `rev` is the new flow revision when
    /// Node-RED reported one (`POST /flows` does).
    Deploy { user: String, rev: Option<String> },
    /// A stream or a request was refused. `user` is `None` when no grant
    /// verified; `method` and `path` are empty when no request arrived.
    Refused {
        user: Option<String>,
        reason: String,
        method: String,
        path: String,
    },
    /// A snapshot's fate on the device: `received` (verified and staged),
    /// `rejected` (with why), `applied` (healthy and committed) or
    /// `rolled_back` (with why).
    Snapshot {
        version: u64,
        outcome: SnapshotOutcome,
        reason: Option<String>,
    },
    /// The local Node-RED was started, stopped or restarted on a person's
    /// request through the platform.
    NodeRedAction { action: String, by: String },
    /// Someone on site switched in a staged snapshot outside the
    /// maintenance window (`tetherd snapshot apply-now`).
    SnapshotApplyNow { version: u64, by: String },
    /// The platform set (or cleared) the device's maintenance window.
    MaintenanceWindow { window: Option<String>, by: String },
    /// The platform captured the flows Node-RED runs (to make a snapshot
    /// of them), for `by`; `base` is the snapshot they were deployed on.
    FlowsCaptured { by: String, base: Option<u64> },
    /// An MQTT message or filter outside the device's namespace or over a
    /// limit was refused: `by` the agent before it left the device, or by
    /// the platform (`agent` / `platform`).
    MqttRefused {
        topic: String,
        reason: String,
        by: String,
    },
    /// The MQTT outbox was full: its `count` oldest messages were dropped.
    MqttOutboxDropped { count: u64 },
    /// Records that could not be written (the disk was full) and were
    /// lost from memory before it had room again.
    EventsLost { count: u64, reason: String },
    /// An event of a type this version does not name, for embedders and
    /// later features. `kind` should start with `x_`.
    Other {
        kind: String,
        actor: Actor,
        subject: String,
        details: Value,
    },
}

/// What became of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOutcome {
    Received,
    Rejected,
    Applied,
    RolledBack,
}

impl SnapshotOutcome {
    const ALL: [SnapshotOutcome; 4] = [
        SnapshotOutcome::Received,
        SnapshotOutcome::Rejected,
        SnapshotOutcome::Applied,
        SnapshotOutcome::RolledBack,
    ];

    /// The record type: `snapshot_received`...
    pub fn kind(self) -> &'static str {
        match self {
            SnapshotOutcome::Received => "snapshot_received",
            SnapshotOutcome::Rejected => "snapshot_rejected",
            SnapshotOutcome::Applied => "snapshot_applied",
            SnapshotOutcome::RolledBack => "snapshot_rolled_back",
        }
    }
}

/// An event's record fields, before the queue gives it a sequence number,
/// a time and its place in the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Parts {
    pub kind: String,
    pub actor: Actor,
    pub subject: String,
    pub details: Value,
}

fn actor(kind: ActorKind) -> Actor {
    Actor { kind, name: None }
}

fn user(name: &str) -> Actor {
    Actor {
        kind: ActorKind::User,
        name: Some(cut(name)),
    }
}

/// `text`, cut to [`MAX_TEXT`] bytes on a character boundary.
pub fn cut(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl AuditEvent {
    /// The event's type, actor, subject and details.
    pub fn parts(&self) -> Parts {
        let (kind, actor, subject, details) = match self {
            AuditEvent::Enrolled { device, platform } => (
                "enrolled",
                actor(ActorKind::Agent),
                cut(device),
                json!({ "platform": cut(platform) }),
            ),
            AuditEvent::TunnelUp { url } => {
                ("tunnel_up", actor(ActorKind::Agent), cut(url), json!({}))
            }
            AuditEvent::TunnelDown { reason } => (
                "tunnel_down",
                actor(ActorKind::Agent),
                String::new(),
                json!({ "reason": cut(reason) }),
            ),
            AuditEvent::CertificateRenewed {
                fingerprint,
                not_after,
            } => (
                "certificate_renewed",
                actor(ActorKind::Agent),
                cut(fingerprint),
                json!({ "not_after": not_after }),
            ),
            AuditEvent::ProtectionChanged { enabled } => (
                "protection_changed",
                actor(ActorKind::Platform),
                String::new(),
                json!({ "enabled": enabled }),
            ),
            AuditEvent::GrantKeyRotated { key } => (
                "grant_key_rotated",
                actor(ActorKind::Platform),
                cut(key),
                json!({}),
            ),
            AuditEvent::ConfigChanged { sha256 } => (
                "config_changed",
                actor(ActorKind::Agent),
                String::new(),
                json!({ "sha256": cut(sha256) }),
            ),
            AuditEvent::EditorSessionOpened {
                user: u,
                role,
                stream,
            } => (
                "editor_session_opened",
                user(u),
                format!("stream {stream}"),
                json!({ "role": role.to_string() }),
            ),
            AuditEvent::EditorSessionClosed {
                user: u,
                role,
                duration,
            } => (
                "editor_session_closed",
                user(u),
                String::new(),
                json!({ "role": role.to_string(), "duration_ms": duration.as_millis() as u64 }),
            ),
            AuditEvent::Deploy { user: u, rev } => (
                "deploy",
                user(u),
                "flows".to_owned(),
                json!({ "rev": rev.as_deref().map(cut) }),
            ),
            AuditEvent::Refused {
                user: u,
                reason,
                method,
                path,
            } => (
                "refused",
                match u {
                    Some(u) => user(u),
                    None => actor(ActorKind::User),
                },
                cut(path),
                json!({ "method": cut(method), "reason": cut(reason) }),
            ),
            AuditEvent::Snapshot {
                version,
                outcome,
                reason,
            } => (
                outcome.kind(),
                actor(ActorKind::Agent),
                format!("snapshot {version}"),
                match reason {
                    Some(reason) => json!({ "version": version, "reason": cut(reason) }),
                    None => json!({ "version": version }),
                },
            ),
            AuditEvent::NodeRedAction { action, by } => (
                "node_red_action",
                user(by),
                "node-red".to_owned(),
                json!({ "action": cut(action) }),
            ),
            AuditEvent::SnapshotApplyNow { version, by } => (
                "snapshot_apply_now",
                user(by),
                format!("snapshot {version}"),
                json!({ "version": version }),
            ),
            AuditEvent::MaintenanceWindow { window, by } => (
                "maintenance_window",
                user(by),
                "maintenance-window".to_owned(),
                json!({ "window": window.as_deref().map(cut) }),
            ),
            AuditEvent::FlowsCaptured { by, base } => (
                "flows_captured",
                user(by),
                "flows".to_owned(),
                json!({ "base": base }),
            ),
            AuditEvent::MqttRefused { topic, reason, by } => (
                "mqtt_refused",
                actor(ActorKind::Agent),
                cut(topic),
                json!({ "reason": cut(reason), "by": cut(by) }),
            ),
            AuditEvent::MqttOutboxDropped { count } => (
                "mqtt_outbox_dropped",
                actor(ActorKind::Agent),
                "mqtt-outbox".to_owned(),
                json!({ "count": count }),
            ),
            AuditEvent::EventsLost { count, reason } => (
                "events_lost",
                actor(ActorKind::Agent),
                String::new(),
                json!({ "count": count, "reason": cut(reason) }),
            ),
            AuditEvent::Other {
                kind,
                actor,
                subject,
                details,
            } => {
                let details = if details.to_string().len() > 4 * MAX_TEXT {
                    json!({ "truncated": true })
                } else {
                    details.clone()
                };
                return Parts {
                    kind: cut(kind),
                    actor: Actor {
                        kind: actor.kind,
                        name: actor.name.as_deref().map(cut),
                    },
                    subject: cut(subject),
                    details,
                };
            }
        };
        Parts {
            kind: kind.to_owned(),
            actor,
            subject,
            details,
        }
    }

    /// The event a stored record describes, for the types this version
    /// names; any other type (and a record whose fields do not fit its
    /// type) comes back as [`AuditEvent::Other`].
    pub fn from_record(record: &tether_proto::audit::Record) -> AuditEvent {
        Self::named(record).unwrap_or_else(|| AuditEvent::Other {
            kind: record.kind.clone(),
            actor: record.actor.clone(),
            subject: record.subject.clone(),
            details: record.details.clone(),
        })
    }

    fn named(record: &tether_proto::audit::Record) -> Option<AuditEvent> {
        let d = &record.details;
        let text = |key: &str| d.get(key).and_then(Value::as_str).map(str::to_owned);
        let number = |key: &str| d.get(key).and_then(Value::as_u64);
        let user = || record.actor.name.clone();
        let role = || text("role")?.parse::<Role>().ok();
        let subject = record.subject.clone();
        Some(match record.kind.as_str() {
            "enrolled" => AuditEvent::Enrolled {
                device: subject,
                platform: text("platform")?,
            },
            "tunnel_up" => AuditEvent::TunnelUp { url: subject },
            "tunnel_down" => AuditEvent::TunnelDown {
                reason: text("reason")?,
            },
            "certificate_renewed" => AuditEvent::CertificateRenewed {
                fingerprint: subject,
                not_after: number("not_after")?,
            },
            "protection_changed" => AuditEvent::ProtectionChanged {
                enabled: d.get("enabled")?.as_bool()?,
            },
            "grant_key_rotated" => AuditEvent::GrantKeyRotated { key: subject },
            "config_changed" => AuditEvent::ConfigChanged {
                sha256: text("sha256")?,
            },
            "editor_session_opened" => AuditEvent::EditorSessionOpened {
                user: user()?,
                role: role()?,
                stream: subject.strip_prefix("stream ")?.parse().ok()?,
            },
            "editor_session_closed" => AuditEvent::EditorSessionClosed {
                user: user()?,
                role: role()?,
                duration: Duration::from_millis(number("duration_ms")?),
            },
            "deploy" => AuditEvent::Deploy {
                user: user()?,
                rev: text("rev"),
            },
            "refused" => AuditEvent::Refused {
                user: user(),
                reason: text("reason")?,
                method: text("method")?,
                path: subject,
            },
            "snapshot_apply_now" => AuditEvent::SnapshotApplyNow {
                version: number("version")?,
                by: user()?,
            },
            "flows_captured" => AuditEvent::FlowsCaptured {
                by: user()?,
                base: number("base"),
            },
            "maintenance_window" => AuditEvent::MaintenanceWindow {
                window: text("window"),
                by: user()?,
            },
            kind if kind.starts_with("snapshot_") => AuditEvent::Snapshot {
                version: number("version")?,
                outcome: SnapshotOutcome::ALL
                    .into_iter()
                    .find(|o| o.kind() == kind)?,
                reason: text("reason"),
            },
            "node_red_action" => AuditEvent::NodeRedAction {
                action: text("action")?,
                by: user()?,
            },
            "mqtt_refused" => AuditEvent::MqttRefused {
                topic: record.subject.clone(),
                reason: text("reason")?,
                by: text("by")?,
            },
            "mqtt_outbox_dropped" => AuditEvent::MqttOutboxDropped {
                count: number("count")?,
            },
            "events_lost" => AuditEvent::EventsLost {
                count: number("count")?,
                reason: text("reason")?,
            },
            _ => return None,
        })
    }

    /// One line for the diagnostic log (target `audit`).
    pub fn log(&self) {
        self.parts().log();
    }
}

impl Parts {
    /// One line for the diagnostic log (target `audit`).
    pub fn log(&self) {
        let parts = self;
        tracing::info!(
            target: "audit",
            event = %parts.kind,
            actor = ?parts.actor.kind,
            user = parts.actor.name.as_deref().unwrap_or("-"),
            subject = %parts.subject,
            details = %parts.details,
            "audit event"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let cut = cut(&long);
        assert!(cut.len() <= MAX_TEXT + 3, "{}", cut.len());
        assert!(cut.ends_with('…'));
        let event = AuditEvent::Refused {
            user: None,
            reason: "x".repeat(100_000),
            method: "GET".into(),
            path: "/".repeat(100_000),
        };
        let parts = event.parts();
        assert!(parts.subject.len() <= MAX_TEXT + 3);
        assert!(parts.details.to_string().len() < 3 * MAX_TEXT);
    }

    #[test]
    fn every_named_event_comes_back_from_its_record() {
        let events = [
            AuditEvent::Enrolled {
                device: "dev_1".into(),
                platform: "https://p".into(),
            },
            AuditEvent::TunnelUp {
                url: "wss://p/v1/tunnel".into(),
            },
            AuditEvent::TunnelDown {
                reason: "lost".into(),
            },
            AuditEvent::CertificateRenewed {
                fingerprint: "ab".into(),
                not_after: 9,
            },
            AuditEvent::ProtectionChanged { enabled: true },
            AuditEvent::GrantKeyRotated { key: "cd".into() },
            AuditEvent::ConfigChanged {
                sha256: "ef".into(),
            },
            AuditEvent::EditorSessionOpened {
                user: "a".into(),
                role: Role::Owner,
                stream: 3,
            },
            AuditEvent::EditorSessionClosed {
                user: "a".into(),
                role: Role::Viewer,
                duration: Duration::from_millis(1500),
            },
            AuditEvent::Deploy {
                user: "a".into(),
                rev: None,
            },
            AuditEvent::Deploy {
                user: "a".into(),
                rev: Some("r".into()),
            },
            AuditEvent::Refused {
                user: None,
                reason: "r".into(),
                method: "GET".into(),
                path: "/p".into(),
            },
            AuditEvent::EventsLost {
                count: 4,
                reason: "disk".into(),
            },
            AuditEvent::Snapshot {
                version: 7,
                outcome: SnapshotOutcome::Received,
                reason: None,
            },
            AuditEvent::Snapshot {
                version: 8,
                outcome: SnapshotOutcome::Rejected,
                reason: Some("expired".into()),
            },
            AuditEvent::Snapshot {
                version: 9,
                outcome: SnapshotOutcome::Applied,
                reason: None,
            },
            AuditEvent::Snapshot {
                version: 10,
                outcome: SnapshotOutcome::RolledBack,
                reason: Some("not healthy".into()),
            },
            AuditEvent::NodeRedAction {
                action: "restart".into(),
                by: "alice".into(),
            },
            AuditEvent::SnapshotApplyNow {
                version: 5,
                by: "root (uid 0)".into(),
            },
            AuditEvent::MaintenanceWindow {
                window: Some("22:00-06:00".into()),
                by: "olga".into(),
            },
            AuditEvent::MaintenanceWindow {
                window: None,
                by: "olga".into(),
            },
            AuditEvent::FlowsCaptured {
                by: "olga".into(),
                base: Some(4),
            },
            AuditEvent::FlowsCaptured {
                by: "olga".into(),
                base: None,
            },
            AuditEvent::MqttRefused {
                topic: "tether/t/other/out/x".into(),
                reason: "outside".into(),
                by: "agent".into(),
            },
            AuditEvent::MqttOutboxDropped { count: 12 },
            AuditEvent::Other {
                kind: "x_test".into(),
                actor: actor(ActorKind::NodeRed),
                subject: "s".into(),
                details: json!({"k": 1}),
            },
        ];
        for event in events {
            let parts = event.parts();
            let record = tether_proto::audit::Record {
                v: 1,
                seq: 1,
                time: 0,
                prev: "0".repeat(64),
                actor: parts.actor,
                kind: parts.kind,
                subject: parts.subject,
                details: parts.details,
            };
            assert_eq!(AuditEvent::from_record(&record), event);
        }
    }

    #[test]
    fn editor_events_name_the_user_and_never_more_than_the_path() {
        let parts = AuditEvent::EditorSessionOpened {
            user: "alice".into(),
            role: Role::Member,
            stream: 7,
        }
        .parts();
        assert_eq!(parts.kind, "editor_session_opened");
        assert_eq!(parts.actor.name.as_deref(), Some("alice"));
        assert_eq!(parts.details, json!({ "role": "member" }));
    }
}
