//! Web sessions: the `__Host-tether_session` cookie, the session a request
//! belongs to, and the live editor streams of each session.
//!
//! A session is 256 random bits, sent to the browser once as the cookie's
//! value (HttpOnly, Secure, SameSite=Lax, host-only) and stored by
//! [`crate::store`] only as its SHA-256, with the user, the login time and
//! the expiry. Expiry slides: a session ends `session_idle` (14 days) after
//! its last use, but never later than `session_max` (30 days) after login.
//! To keep writes rare, a use extends the stored expiry only once less than
//! half the idle window is left. Only requests on the platform's origin
//! ([`current`]) extend a session, and the answer to one that did sends the
//! cookie again with a fresh `Max-Age` ([`refresh_cookie`]), so the
//! browser's copy never expires before the stored one. So the
//! store never holds a value that would let anyone act as the user, and
//! logging out (or removing the user) deletes the record: the cookie is
//! worthless from then on, whatever the browser keeps.
//!
//! [`LiveStreams`] knows which editor streams each session has open, bounded
//! per session, so that ending a session closes them at once instead of
//! letting an open editor carry on.
//!
//! `SameSite=Lax`, not `Strict`: a device's editor origin is another site
//! than a platform on `localhost`, and an engineer sent back to the
//! platform from there (an editor cookie that expired) should arrive logged
//! in. Lax keeps the cookie off other sites' form posts and fetches; what
//! protects the platform's forms from device pages, which may be on the same
//! site, is [`crate::csrf`] and [`crate::origin`], not the cookie.
//!
//! This module never logs a cookie, a session value or its hash, and never
//! decides who may log in ([`crate::web`] does) or what a user may reach
//! ([`crate::editor`], [`crate::web`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};
use tether_proto::api::Secret;
use tokio::sync::watch;

use crate::keys::{self, KeyError};
use crate::platform::{State, unix_now};
use crate::store::{SessionRecord, StoreError, UserRecord};

/// The session cookie's name. `__Host-`: the browser takes it only
/// `Secure`, with `Path=/` and without `Domain`, so no device origin (a
/// subdomain) can set or shadow it.
pub const COOKIE_NAME: &str = "__Host-tether_session";
/// Sessions one user holds at once; a new login beyond that ends the oldest.
pub const MAX_SESSIONS_PER_USER: usize = 16;
/// Live editor streams (HTTP connections and WebSockets) one session holds
/// at once.
pub const MAX_LIVE_STREAMS_PER_SESSION: usize = 64;
/// Bytes of randomness in a session value (and in every other cookie the
/// platform sets).
pub const COOKIE_BYTES: usize = 32;

/// A logged-in request's session.
#[derive(Clone, Debug)]
pub struct Session {
    /// SHA-256 of the cookie's value (hex): the session's key everywhere on
    /// the platform side. Never logged.
    pub hash: String,
    pub user: UserRecord,
    /// Unix seconds.
    pub expires_at: u64,
    /// True if this request extended the session: the answer should carry
    /// [`refresh_cookie`].
    pub extended: bool,
}

/// Makes a session value: 256 random bits, hex.
pub fn new_value() -> Result<Secret, KeyError> {
    Ok(Secret::new(keys::random_hex(COOKIE_BYTES)?))
}

/// The session cookie's value in a request's `Cookie` headers, if it has
/// the right syntax (64 lowercase hex digits).
pub fn cookie_value(headers: &HeaderMap) -> Option<Secret> {
    cookie(headers, COOKIE_NAME)
}

/// The value of cookie `name` in a request, if it is 64 lowercase hex
/// digits (every cookie the platform sets is).
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<Secret> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|value| {
            value.len() == COOKIE_BYTES * 2
                && value
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .map(Secret::new)
}

/// The `Set-Cookie` value that starts (or refreshes) a session the browser
/// should keep for `max_age`.
pub fn set_cookie(value: &Secret, max_age: Duration) -> Option<HeaderValue> {
    let cookie = format!(
        "{COOKIE_NAME}={}; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age={}",
        value.expose(),
        max_age.as_secs()
    );
    HeaderValue::from_str(&cookie).ok()
}

/// The `Set-Cookie` value that tells the browser a session was extended
/// (its cookie again, with the `Max-Age` left), if this request extended
/// `session`.
pub fn refresh_cookie(headers: &HeaderMap, session: &Session) -> Option<HeaderValue> {
    if !session.extended {
        return None;
    }
    let value = cookie_value(headers)?;
    let left = session.expires_at.saturating_sub(unix_now());
    set_cookie(&value, Duration::from_secs(left))
}

/// The expiry a use at `now` gives a session stored as `record`, if it
/// should be written: only once less than half of `idle` is left, and never
/// beyond `max` after login.
pub fn extended_expiry(
    record: &SessionRecord,
    now: u64,
    idle: Duration,
    max: Duration,
) -> Option<u64> {
    let idle = idle.as_secs();
    let left = record.expires_at.saturating_sub(now);
    if left >= idle / 2 {
        return None;
    }
    let cap = record.created_at.saturating_add(max.as_secs());
    let wanted = now.saturating_add(idle).min(cap);
    (wanted > record.expires_at).then_some(wanted)
}

/// The `Set-Cookie` value that makes the browser forget the session.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static(
        "__Host-tether_session=; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age=0",
    )
}

/// The session of a request on the platform's origin, if its cookie names
/// one that is stored, not expired, and whose user still exists. This use
/// extends it (see the module's doc); the answer should then carry
/// [`refresh_cookie`].
pub async fn current(state: &State, headers: &HeaderMap) -> Result<Option<Session>, StoreError> {
    match cookie_hash(headers) {
        Some(hash) => lookup(state, hash, true).await,
        None => Ok(None),
    }
}

/// SHA-256 (hex) of the request's session cookie, if it has one.
pub fn cookie_hash(headers: &HeaderMap) -> Option<String> {
    cookie_value(headers).map(|value| keys::sha256_hex(value.expose().as_bytes()))
}

/// The session stored under `hash`, if it is not expired and its user
/// still exists. Not extended: a request that cannot send the platform's
/// cookie again (one on a device's editor origin) must not move the
/// session's expiry past the browser's copy of the cookie.
pub async fn by_hash(state: &State, hash: String) -> Result<Option<Session>, StoreError> {
    lookup(state, hash, false).await
}

async fn lookup(state: &State, hash: String, extend: bool) -> Result<Option<Session>, StoreError> {
    let key = hash.clone();
    let now = unix_now();
    let found = state.store.blocking(move |s| s.session(&key, now)).await?;
    let Some((record, user)) = found else {
        return Ok(None);
    };
    let config = &state.config;
    let mut session = Session {
        hash,
        user,
        expires_at: record.expires_at,
        extended: false,
    };
    let extension = extend
        .then(|| extended_expiry(&record, now, config.session_idle, config.session_max))
        .flatten();
    if let Some(expires_at) = extension {
        let key = session.hash.clone();
        let stored = state
            .store
            .blocking(move |s| s.extend_session(&key, expires_at, now))
            .await?;
        match stored {
            Some(expires_at) => {
                session.expires_at = expires_at;
                session.extended = true;
            }
            // Ended between the read and the write (logout, user removed).
            None => return Ok(None),
        }
    }
    Ok(Some(session))
}

/// Stores a new session for `user` and returns the cookie to send.
pub async fn start(state: &State, user: &str) -> Result<HeaderValue, SessionError> {
    let value = new_value()?;
    let hash = keys::sha256_hex(value.expose().as_bytes());
    let now = unix_now();
    let idle = state.config.session_idle.min(state.config.session_max);
    let record = SessionRecord {
        user: user.to_string(),
        created_at: now,
        expires_at: now.saturating_add(idle.as_secs()),
    };
    let cookie = set_cookie(&value, idle).ok_or(SessionError::Cookie)?;
    let evicted = state
        .store
        .blocking(move |s| s.insert_session(&hash, &record, now, MAX_SESSIONS_PER_USER))
        .await?;
    for hash in evicted {
        state.editor_sessions.end_session(&hash);
        state.live.close_session(&hash);
    }
    Ok(cookie)
}

/// Ends a session: deletes it from the store, then closes its live editor
/// streams.
pub async fn end(state: &State, hash: &str) -> Result<(), StoreError> {
    let key = hash.to_string();
    state
        .store
        .blocking(move |s| s.remove_session(&key))
        .await?;
    state.editor_sessions.end_session(hash);
    state.live.close_session(hash);
    Ok(())
}

/// Why a session could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Random(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the session cookie is not a valid header value")]
    Cookie,
}

/// Live editor streams by session.
#[derive(Debug, Default)]
pub struct LiveStreams {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    /// Tells this entry from a later one under the same key.
    id: u64,
    live: usize,
    /// Turns true when the session ends.
    ended: watch::Sender<bool>,
}

/// One live editor stream of a session. Dropping it ends the count.
#[derive(Debug)]
pub struct LiveGuard {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    session: String,
    entry: u64,
    ended: Ended,
}

/// Resolves once a session has ended; clones watch the same session.
#[derive(Clone, Debug)]
pub struct Ended(watch::Receiver<bool>);

impl Ended {
    /// Resolves once the session has ended (logout, user removed, evicted).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|ended| *ended).await;
    }
}

impl LiveStreams {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more live stream for the session `hash`; `None` if it
    /// holds [`MAX_LIVE_STREAMS_PER_SESSION`] already.
    pub fn register(&self, hash: &str) -> Option<LiveGuard> {
        let mut map = self.lock();
        let entry = map.entry(hash.to_string()).or_insert_with(|| Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            live: 0,
            ended: watch::channel(false).0,
        });
        if entry.live >= MAX_LIVE_STREAMS_PER_SESSION {
            return None;
        }
        entry.live += 1;
        Some(LiveGuard {
            inner: self.inner.clone(),
            session: hash.to_string(),
            entry: entry.id,
            ended: Ended(entry.ended.subscribe()),
        })
    }

    /// Ends every live stream of the session `hash`. Returns how many there
    /// were.
    pub fn close_session(&self, hash: &str) -> usize {
        let removed = self.lock().remove(hash);
        removed.map_or(0, |entry| {
            entry.ended.send_replace(true);
            entry.live
        })
    }

    /// Live streams of the session `hash`.
    pub fn count(&self, hash: &str) -> usize {
        self.lock().get(hash).map_or(0, |entry| entry.live)
    }

    /// Live streams of all sessions.
    pub fn total(&self) -> usize {
        self.lock().values().map(|entry| entry.live).sum()
    }
}

impl LiveGuard {
    /// Resolves once the session has ended (logout, user removed, evicted).
    pub async fn ended(&mut self) {
        self.ended.wait().await;
    }

    /// A handle that resolves when this guard's session ends, for a task
    /// that does not hold the guard itself.
    pub fn signal(&self) -> Ended {
        self.ended.clone()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.session)
            && entry.id == self.entry
        {
            entry.live = entry.live.saturating_sub(1);
            if entry.live == 0 {
                map.remove(&self.session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others_and_checked() {
        let value = "ab".repeat(32);
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        let both = format!("x=y; {COOKIE_NAME}={value}");
        headers.append(header::COOKIE, HeaderValue::from_str(&both).unwrap());
        assert_eq!(cookie_value(&headers).unwrap().expose(), value);
        let old = format!("tether_session={value}");
        for bad in [
            "__Host-tether_session=abc",
            "__Host-tether_session=",
            "other=1",
            &old,
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, HeaderValue::from_str(bad).unwrap());
            assert!(cookie_value(&headers).is_none(), "{bad}");
        }
        let upper = format!("{COOKIE_NAME}={}", "AB".repeat(32));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&upper).unwrap());
        assert!(cookie_value(&headers).is_none());
    }

    #[test]
    fn the_cookie_has_every_attribute() {
        let value = new_value().unwrap();
        let cookie = set_cookie(&value, Duration::from_secs(14 * 24 * 3600)).unwrap();
        let cookie = cookie.to_str().unwrap();
        assert!(cookie.starts_with(&format!("__Host-tether_session={}", value.expose())));
        assert!(!cookie.contains("Domain"), "host-only");
        for attribute in [
            "HttpOnly",
            "Secure",
            "SameSite=Lax",
            "Path=/",
            "Max-Age=1209600",
        ] {
            assert!(cookie.contains(attribute), "{attribute}");
        }
    }

    #[test]
    fn expiry_slides_rarely_and_never_past_the_maximum() {
        let day = 24 * 3600;
        let idle = Duration::from_secs(14 * day);
        let max = Duration::from_secs(30 * day);
        let record = SessionRecord {
            user: "alice".into(),
            created_at: 0,
            expires_at: 14 * day,
        };
        assert_eq!(
            extended_expiry(&record, day, idle, max),
            None,
            "no write yet"
        );
        assert_eq!(extended_expiry(&record, 8 * day, idle, max), Some(22 * day));
        let late = SessionRecord {
            expires_at: 29 * day,
            ..record.clone()
        };
        assert_eq!(extended_expiry(&late, 25 * day, idle, max), Some(30 * day));
        let capped = SessionRecord {
            expires_at: 30 * day,
            ..record
        };
        assert_eq!(
            extended_expiry(&capped, 29 * day, idle, max),
            None,
            "capped"
        );
    }

    #[tokio::test]
    async fn ending_a_session_wakes_its_streams_and_counts_are_bounded() {
        let live = LiveStreams::default();
        let mut first = live.register("s1").unwrap();
        let _other = live.register("s2").unwrap();
        let guards: Vec<_> = (1..MAX_LIVE_STREAMS_PER_SESSION)
            .map(|_| live.register("s1").unwrap())
            .collect();
        assert!(live.register("s1").is_none(), "bounded per session");
        drop(guards);
        assert_eq!(live.count("s1"), 1);
        assert_eq!(live.close_session("s1"), 1);
        tokio::time::timeout(Duration::from_secs(1), first.ended())
            .await
            .expect("woken");
        assert_eq!(live.count("s2"), 1);
        drop(first);
        assert_eq!(live.count("s2"), 1, "an old guard does not touch others");
    }
}
