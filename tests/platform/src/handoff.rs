//! How a logged-in engineer gets into a device's editor origin without the
//! platform's session ever reaching it.
//!
//! 1. On the platform's origin, `GET /devices/{id}/editor/...` (session,
//!    team and device checked by [`crate::editor`]) makes a **handoff
//!    code**: 256 random bits, single use, valid [`CODE_TTL`], bound to the
//!    session, the user, the device and the path asked for. The browser is
//!    sent to `https://dev-<hex>.EDITOR_DOMAIN/__tether/handoff?code=...`.
//! 2. On the device's origin the code is taken (and so spent) and exchanged
//!    for an **editor cookie**, `__Host-tether_editor`: host-only (no
//!    `Domain`, so no other device and not the platform ever gets it),
//!    `Secure`, `HttpOnly`, `SameSite=Lax`, bound to that device, user and
//!    platform session, and valid at most [`EDITOR_TTL`] and never beyond
//!    the session. The browser then goes to the path it asked for.
//!
//! Both live only here, in memory, each stored under the SHA-256 of its
//! value, bounded in all and per platform session (a new one replaces the
//! session's oldest), so no one user can fill them for the others: a platform restart ends every editor cookie (the next navigation
//! makes a new one through the platform's session, which is in the store).
//! Both tables are bounded; expired entries are dropped as new ones come.
//! Logging out ends the platform session, and with it every editor cookie
//! made from it ([`EditorSessions::resolve`] checks the session each time,
//! and [`EditorSessions::end_session`] forgets them at once).
//!
//! This module never logs a code, a cookie or a hash of either, and never
//! decides who may open which editor ([`crate::editor`] does, before it
//! asks for a code).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use tether_proto::api::Secret;

use crate::keys::{self, KeyError};

/// The path on a device origin that takes a handoff code.
pub const HANDOFF_PATH: &str = "/__tether/handoff";
/// The editor cookie's name. `__Host-`: the browser refuses it unless it
/// is `Secure`, has `Path=/` and no `Domain`.
pub const EDITOR_COOKIE: &str = "__Host-tether_editor";
/// How long a handoff code may wait to be used.
pub const CODE_TTL: Duration = Duration::from_secs(30);
/// How long an editor cookie lasts at most.
pub const EDITOR_TTL: Duration = Duration::from_secs(12 * 3600);
/// Handoff codes waiting at once; beyond it new ones are refused.
pub const MAX_CODES: usize = 4096;
/// Editor cookies known at once; beyond it new ones are refused.
pub const MAX_EDITOR_SESSIONS: usize = 65_536;
/// Handoff codes one platform session holds at once; a new one replaces
/// its oldest. So no one user, however many tabs or scripts, can fill
/// [`MAX_CODES`] for everyone else.
pub const MAX_CODES_PER_SESSION: usize = 16;
/// Editor cookies one platform session holds at once (one per device it
/// has open, and then some); a new one replaces its oldest, so no one user
/// can fill [`MAX_EDITOR_SESSIONS`].
pub const MAX_EDITOR_SESSIONS_PER_SESSION: usize = 64;
/// Bytes of randomness in a code and in an editor cookie.
const VALUE_BYTES: usize = crate::sessions::COOKIE_BYTES;
/// Longest path kept for after the handoff.
pub const MAX_NEXT_LEN: usize = 2048;

/// Who a code or an editor cookie stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// SHA-256 of the platform session's cookie (never logged).
    pub session: String,
    pub user: String,
    pub device: String,
    /// Unix seconds.
    pub expires_at: u64,
}

#[derive(Debug)]
struct Code {
    bound: Bound,
    /// Where to go on the device's origin afterwards (a local path).
    next: String,
}

/// Why a code or a cookie could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("too many editor handoffs are in progress; try again in a few seconds")]
    Full,
    #[error(transparent)]
    Random(#[from] KeyError),
}

/// Handoff codes waiting to be used.
#[derive(Debug, Default)]
pub struct Handoffs(Mutex<HashMap<String, Code>>);

impl Handoffs {
    /// A new code for `bound` (its `expires_at` is capped at `now` plus
    /// [`CODE_TTL`]), to come back to `next`.
    pub fn issue(&self, mut bound: Bound, next: &str, now: u64) -> Result<Secret, HandoffError> {
        bound.expires_at = bound.expires_at.min(now + CODE_TTL.as_secs());
        let value = keys::random_hex(VALUE_BYTES)?;
        let mut codes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        make_room(&mut codes, &bound.session, MAX_CODES_PER_SESSION, |c| {
            &c.bound
        });
        if codes.len() >= MAX_CODES {
            codes.retain(|_, code| code.bound.expires_at > now);
        }
        if codes.len() >= MAX_CODES {
            return Err(HandoffError::Full);
        }
        let next = local_path(next).unwrap_or_else(|| "/".to_string());
        codes.insert(keys::sha256_hex(value.as_bytes()), Code { bound, next });
        Ok(Secret::new(value))
    }

    /// Spends `code` if it is known, unexpired and for `device`: whatever
    /// the answer, it cannot be used again.
    pub fn redeem(&self, code: &str, device: &str, now: u64) -> Option<(Bound, String)> {
        let key = keys::sha256_hex(code.as_bytes());
        let taken = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key)?;
        (taken.bound.device == device && taken.bound.expires_at > now)
            .then_some((taken.bound, taken.next))
    }
}

/// Editor cookies by the SHA-256 of their value.
#[derive(Debug, Default)]
pub struct EditorSessions(Mutex<HashMap<String, Bound>>);

impl EditorSessions {
    /// A new editor cookie value for `bound`, valid at most
    /// [`EDITOR_TTL`] from `now`.
    pub fn start(&self, mut bound: Bound, now: u64) -> Result<Secret, HandoffError> {
        bound.expires_at = bound.expires_at.min(now + EDITOR_TTL.as_secs());
        let value = keys::random_hex(VALUE_BYTES)?;
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        make_room(
            &mut sessions,
            &bound.session,
            MAX_EDITOR_SESSIONS_PER_SESSION,
            |b| b,
        );
        if sessions.len() >= MAX_EDITOR_SESSIONS {
            sessions.retain(|_, bound| bound.expires_at > now);
        }
        if sessions.len() >= MAX_EDITOR_SESSIONS {
            return Err(HandoffError::Full);
        }
        sessions.insert(keys::sha256_hex(value.as_bytes()), bound);
        Ok(Secret::new(value))
    }

    /// What the editor cookie of a request to `device`'s origin stands for,
    /// if it is known, unexpired and for that device. The caller still
    /// checks that the platform session is alive.
    pub fn resolve(&self, headers: &HeaderMap, device: &str, now: u64) -> Option<Bound> {
        let value = crate::sessions::cookie(headers, EDITOR_COOKIE)?;
        let key = keys::sha256_hex(value.expose().as_bytes());
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let bound = sessions.get(&key)?;
        if bound.expires_at <= now {
            sessions.remove(&key);
            return None;
        }
        (bound.device == device).then(|| bound.clone())
    }

    /// Forgets every editor cookie made from platform session `session`.
    pub fn end_session(&self, session: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, bound| bound.session != session);
    }
}

/// Drops the entries of platform session `session` that expire first until
/// it holds fewer than `limit`.
fn make_room<T>(
    entries: &mut HashMap<String, T>,
    session: &str,
    limit: usize,
    bound: impl Fn(&T) -> &Bound,
) {
    let mut theirs: Vec<(u64, String)> = entries
        .iter()
        .filter(|(_, entry)| bound(entry).session == session)
        .map(|(key, entry)| (bound(entry).expires_at, key.clone()))
        .collect();
    if theirs.len() < limit {
        return;
    }
    theirs.sort_unstable();
    for (_, key) in theirs.iter().take(theirs.len() + 1 - limit) {
        entries.remove(key);
    }
}

/// The `Set-Cookie` value of a new editor cookie.
pub fn set_editor_cookie(value: &Secret) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{EDITOR_COOKIE}={}; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age={}",
        value.expose(),
        EDITOR_TTL.as_secs()
    ))
    .ok()
}

/// `path` if it is a local path (`/...`, never `//host` or `/\host`) of
/// printable ASCII within [`MAX_NEXT_LEN`].
pub fn local_path(path: &str) -> Option<String> {
    let ok = path.starts_with('/')
        && !path.starts_with("//")
        && !path.contains('\\')
        && path.len() <= MAX_NEXT_LEN
        && path.bytes().all(|b| (0x21..0x7f).contains(&b));
    ok.then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn bound(device: &str) -> Bound {
        Bound {
            session: "s".repeat(64),
            user: "olga".into(),
            device: device.into(),
            expires_at: u64::MAX,
        }
    }

    #[test]
    fn a_code_is_spent_once_only_for_its_device_and_before_it_expires() {
        let codes = Handoffs::default();
        let code = codes.issue(bound("dev_a"), "/flows?x=1", 1000).unwrap();
        assert_eq!(codes.redeem(code.expose(), "dev_b", 1000), None);
        // Tried against the wrong device, it is gone.
        assert_eq!(codes.redeem(code.expose(), "dev_a", 1000), None);

        let code = codes.issue(bound("dev_a"), "/flows?x=1", 1000).unwrap();
        let (got, next) = codes.redeem(code.expose(), "dev_a", 1001).unwrap();
        assert_eq!(
            (got.device.as_str(), next.as_str()),
            ("dev_a", "/flows?x=1")
        );
        assert_eq!(got.expires_at, 1000 + CODE_TTL.as_secs());
        assert_eq!(codes.redeem(code.expose(), "dev_a", 1001), None, "spent");

        let code = codes
            .issue(bound("dev_a"), "//evil.example/", 1000)
            .unwrap();
        let late = 1000 + CODE_TTL.as_secs();
        assert_eq!(codes.redeem(code.expose(), "dev_a", late), None, "expired");
        let code = codes
            .issue(bound("dev_a"), "//evil.example/", 1000)
            .unwrap();
        assert_eq!(codes.redeem(code.expose(), "dev_a", 1000).unwrap().1, "/");
    }

    #[test]
    fn an_editor_cookie_resolves_only_for_its_device_until_it_expires_or_logout() {
        let sessions = EditorSessions::default();
        let value = sessions.start(bound("dev_a"), 1000).unwrap();
        let mut headers = HeaderMap::new();
        let pair = format!("other=1; {EDITOR_COOKIE}={}", value.expose());
        headers.insert(header::COOKIE, HeaderValue::from_str(&pair).unwrap());
        assert!(sessions.resolve(&headers, "dev_a", 1000).is_some());
        assert!(sessions.resolve(&headers, "dev_b", 1000).is_none());
        let expiry = 1000 + EDITOR_TTL.as_secs();
        assert!(sessions.resolve(&headers, "dev_a", expiry).is_none());
        let value = sessions.start(bound("dev_a"), 1000).unwrap();
        let pair = format!("{EDITOR_COOKIE}={}", value.expose());
        headers.insert(header::COOKIE, HeaderValue::from_str(&pair).unwrap());
        sessions.end_session(&"s".repeat(64));
        assert!(sessions.resolve(&headers, "dev_a", 1000).is_none());
    }

    #[test]
    fn one_session_cannot_fill_the_tables_for_everyone() {
        let codes = Handoffs::default();
        let cookies = EditorSessions::default();
        let greedy = bound("dev_a");
        let mut last_code = None;
        for i in 0..(MAX_CODES + 10) as u64 {
            // The newest entry is added after room is made: it survives.
            let b = Bound {
                expires_at: 10_000 + i,
                ..greedy.clone()
            };
            last_code = Some(codes.issue(b.clone(), "/", 1000).unwrap());
            cookies.start(b, 1000).unwrap();
        }
        assert_eq!(codes.0.lock().unwrap().len(), MAX_CODES_PER_SESSION);
        assert_eq!(
            cookies.0.lock().unwrap().len(),
            MAX_EDITOR_SESSIONS_PER_SESSION
        );
        // Another user still gets in, and the greedy session's newest code
        // still works.
        let other = Bound {
            session: "t".repeat(64),
            ..bound("dev_a")
        };
        assert!(codes.issue(other.clone(), "/", 1000).is_ok());
        assert!(cookies.start(other, 1000).is_ok());
        assert!(
            codes
                .redeem(last_code.unwrap().expose(), "dev_a", 1000)
                .is_some()
        );
    }

    #[test]
    fn only_local_paths_are_kept() {
        for good in ["/", "/flows", "/red/main.js?v=4.1"] {
            assert_eq!(local_path(good).as_deref(), Some(good));
        }
        for bad in [
            "//evil",
            "/\\evil",
            "https://evil",
            "flows",
            "/a b",
            "/\r\n",
        ] {
            assert_eq!(local_path(bad), None, "{bad:?}");
        }
    }
}
