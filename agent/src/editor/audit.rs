//! Audit records of remote editor access: sessions opened and closed, every
//! deploy, every refused request (`docs/protocol.md` §16).
//!
//! [`AuditEvent`] is the typed record and [`Audit`] the seam it goes
//! through. Until the durable audit queue exists, [`AuditLog`] logs each
//! event at `info` with the target `audit` and keeps the last few in memory
//! (for tests and, later, a status view). This module never sees a grant, a
//! token, a cookie or an `Authorization` header: events carry names, roles,
//! methods, paths (without query) and revisions only.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tether_proto::grant::Role;
use tracing::info;

/// Events the agent's [`AuditLog`] keeps in memory by default.
pub const AUDIT_MEMORY: usize = 256;

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditEvent {
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
}

/// Where audit events go.
pub trait Audit: Send + Sync + std::fmt::Debug {
    fn record(&self, event: AuditEvent);
}

/// Logs events (target `audit`) and keeps the last `capacity` in memory.
#[derive(Debug)]
pub struct AuditLog {
    capacity: usize,
    recent: Mutex<VecDeque<AuditEvent>>,
}

impl AuditLog {
    pub fn new(capacity: usize) -> AuditLog {
        AuditLog {
            capacity,
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(AUDIT_MEMORY))),
        }
    }

    /// The events kept, oldest first.
    pub fn recent(&self) -> Vec<AuditEvent> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<AuditEvent>> {
        // Nothing panics while holding the lock.
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for AuditLog {
    fn default() -> Self {
        AuditLog::new(AUDIT_MEMORY)
    }
}

impl Audit for AuditLog {
    fn record(&self, event: AuditEvent) {
        log(&event);
        if self.capacity == 0 {
            return;
        }
        let mut recent = self.lock();
        if recent.len() >= self.capacity {
            recent.pop_front();
        }
        recent.push_back(event);
    }
}

fn log(event: &AuditEvent) {
    match event {
        AuditEvent::EditorSessionOpened { user, role, stream } => {
            info!(target: "audit", %user, %role, stream, "editor session opened")
        }
        AuditEvent::EditorSessionClosed {
            user,
            role,
            duration,
        } => {
            info!(target: "audit", %user, %role, duration_ms = duration.as_millis() as u64, "editor session closed")
        }
        AuditEvent::Deploy { user, rev } => {
            info!(target: "audit", %user, rev = rev.as_deref().unwrap_or("-"), "deploy")
        }
        AuditEvent::Refused {
            user,
            reason,
            method,
            path,
        } => info!(
            target: "audit",
            user = user.as_deref().unwrap_or("-"),
            %method,
            %path,
            %reason,
            "editor request refused"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(rev: &str) -> AuditEvent {
        AuditEvent::Deploy {
            user: "alice".into(),
            rev: Some(rev.into()),
        }
    }

    #[test]
    fn the_log_keeps_the_last_events_in_order() {
        let log = AuditLog::new(2);
        for rev in ["a", "b", "c"] {
            log.record(deploy(rev));
        }
        assert_eq!(log.recent(), vec![deploy("b"), deploy("c")]);
        let none = AuditLog::new(0);
        none.record(deploy("a"));
        assert!(none.recent().is_empty());
    }
}
