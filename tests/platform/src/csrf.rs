//! CSRF tokens for the platform's forms.
//!
//! Device origins may be on the same site as the platform (and always are
//! on one another's), so `SameSite` cookies do not tell a form posted by a
//! device's page from one of the platform's own. Every form carries a
//! `csrf` field that only the platform's own pages know:
//!
//! - a logged-in form: HMAC-SHA-256 of the session (its hash) under a key
//!   made at each start of the platform;
//! - the login form, before any session: a random value in a
//!   `__Host-tether_login` cookie (host-only, so no device origin can set or
//!   replace it) and its HMAC in the form.
//!
//! A page left open across a platform restart gets "the form expired:
//! reload the page". The `Origin` and fetch-metadata checks of
//! [`crate::origin`] come first; this is the second lock on the door.
//!
//! This module never logs a token, a cookie or the key.

use http::HeaderValue;
use ring::hmac;
use tether_proto::api::Secret;

use crate::keys::{self, KeyError};

/// The form field every platform form carries.
pub const FIELD: &str = "csrf";
/// The login form's cookie.
pub const LOGIN_COOKIE: &str = "__Host-tether_login";
/// How long a login form may stay open.
const LOGIN_TTL_SECS: u64 = 3600;

/// The key tokens are made with; a new one at every start.
pub struct CsrfKey(hmac::Key);

impl std::fmt::Debug for CsrfKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsrfKey([redacted])")
    }
}

impl CsrfKey {
    pub fn generate() -> Result<CsrfKey, KeyError> {
        let bytes = keys::random_bytes::<32>()?;
        Ok(CsrfKey(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
    }

    fn token(&self, purpose: &str, binding: &str) -> String {
        let message = format!("tether-csrf-v1\n{purpose}\n{binding}");
        keys::hex(hmac::sign(&self.0, message.as_bytes()).as_ref())
    }

    fn check(&self, purpose: &str, binding: &str, token: &str) -> bool {
        let message = format!("tether-csrf-v1\n{purpose}\n{binding}");
        let Some(tag) = unhex(token) else {
            return false;
        };
        hmac::verify(&self.0, message.as_bytes(), &tag).is_ok()
    }

    /// The token of the forms of the session whose hash is `session`.
    pub fn for_session(&self, session: &str) -> String {
        self.token("session", session)
    }

    /// True if `token` is the session's.
    pub fn check_session(&self, session: &str, token: Option<&str>) -> bool {
        token.is_some_and(|t| self.check("session", session, t))
    }

    /// A login form's cookie value and token.
    pub fn login_pair(&self) -> Result<(Secret, String), KeyError> {
        let value = keys::random_hex(32)?;
        let token = self.token("login", &value);
        Ok((Secret::new(value), token))
    }

    /// True if the login form's `token` matches the request's login cookie.
    pub fn check_login(&self, headers: &http::HeaderMap, token: Option<&str>) -> bool {
        let Some(cookie) = crate::sessions::cookie(headers, LOGIN_COOKIE) else {
            return false;
        };
        token.is_some_and(|t| self.check("login", cookie.expose(), t))
    }
}

/// The `Set-Cookie` value of a login form's cookie.
pub fn set_login_cookie(value: &Secret) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={LOGIN_TTL_SECS}",
        value.expose()
    ))
    .ok()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, header};

    #[test]
    fn session_tokens_bind_to_their_session_and_key() {
        let key = CsrfKey::generate().unwrap();
        let token = key.for_session("aa");
        assert!(key.check_session("aa", Some(&token)));
        assert!(!key.check_session("ab", Some(&token)));
        assert!(!key.check_session("aa", None));
        assert!(!key.check_session("aa", Some("zz")));
        let other = CsrfKey::generate().unwrap();
        assert!(!other.check_session("aa", Some(&token)), "after a restart");
    }

    #[test]
    fn a_login_token_needs_its_cookie() {
        let key = CsrfKey::generate().unwrap();
        let (value, token) = key.login_pair().unwrap();
        let mut headers = HeaderMap::new();
        assert!(!key.check_login(&headers, Some(&token)));
        let pair = format!("{LOGIN_COOKIE}={}", value.expose());
        headers.insert(header::COOKIE, HeaderValue::from_str(&pair).unwrap());
        assert!(key.check_login(&headers, Some(&token)));
        let (_, other) = key.login_pair().unwrap();
        assert!(!key.check_login(&headers, Some(&other)));
    }
}
