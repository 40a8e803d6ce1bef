//! Platform users: names, teams, roles and Argon2id password hashes.
//!
//! This module owns what a user name and a password may be, how a password
//! is hashed (Argon2id, PHC string format, a fresh 128-bit salt from the
//! operating system) and how one is checked. Checking costs the same work
//! whether the user exists or not: an unknown name is checked against a
//! dummy hash with the same cost (made once, at the first login that needs
//! it, so starting the platform costs no hash). Hashing runs on tokio's
//! blocking pool, at most [`MAX_CONCURRENT_HASHES`] at a time, so a burst
//! of logins neither stalls the runtime nor takes the machine's memory
//! (each hash holds `memory_kib`).
//!
//! It never logs, stores or returns a password, and never tells a caller
//! why a login failed beyond "wrong user name or password". Users and
//! sessions are stored by [`crate::store`]; sessions are
//! [`crate::sessions`]'s business.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};
use tether_proto::api::Secret;
use tether_proto::grant::Role;
use tokio::sync::{OnceCell, Semaphore};

use crate::keys::{self, KeyError};
use crate::store::UserRecord;

/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest user name, in characters.
pub const MAX_USER_NAME: usize = 64;
/// Password hashes computed at once; more wait their turn.
pub const MAX_CONCURRENT_HASHES: usize = 4;

/// Why a user could not be created, or a password hashed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error(
        "'{0}' is not a valid user name: 1 to {MAX_USER_NAME} characters of A-Z a-z 0-9 . _ - @"
    )]
    BadName(String),
    #[error("team must be 1 to 64 characters without control characters")]
    BadTeam,
    #[error("the password is empty")]
    EmptyPassword,
    #[error("the password is longer than {MAX_PASSWORD_LEN} bytes")]
    PasswordTooLong,
    #[error("invalid Argon2 cost: {0}")]
    Cost(String),
    #[error("hashing the password failed: {0}")]
    Hash(String),
    #[error(transparent)]
    Random(#[from] KeyError),
    #[error("a hashing task failed: {0}")]
    Task(String),
}

/// The Argon2id cost of new password hashes. A stored hash keeps the cost
/// it was made with, so a change applies to passwords set from then on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordCost {
    /// Memory per hash, KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl PasswordCost {
    /// OWASP's recommendation for Argon2id: 19 MiB, 2 passes, 1 lane.
    pub const DEFAULT: PasswordCost = PasswordCost {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };

    fn argon2(self) -> Result<Argon2<'static>, UserError> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| UserError::Cost(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Checks the cost is one Argon2 accepts.
    pub fn validate(self) -> Result<(), String> {
        self.argon2().map(drop).map_err(|e| e.to_string())
    }
}

impl Default for PasswordCost {
    fn default() -> PasswordCost {
        PasswordCost::DEFAULT
    }
}

/// A user as the admin API lists it: no password hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub team: String,
    pub role: Role,
    /// Unix seconds.
    pub created_at: u64,
}

impl From<&UserRecord> for UserInfo {
    fn from(user: &UserRecord) -> UserInfo {
        UserInfo {
            name: user.name.clone(),
            team: user.team.clone(),
            role: user.role,
            created_at: user.created_at,
        }
    }
}

/// True if `name` is a valid user name.
pub fn is_user_name(name: &str) -> bool {
    let count = name.chars().count();
    (1..=MAX_USER_NAME).contains(&count)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// Checks a new user's name, team and password.
pub fn check_new_user(name: &str, team: &str, password: &str) -> Result<(), UserError> {
    if !is_user_name(name) {
        return Err(UserError::BadName(name.chars().take(80).collect()));
    }
    if !tether_proto::api::is_device_name(team) {
        return Err(UserError::BadTeam);
    }
    check_password(password)
}

/// Checks a password's length: 1 to [`MAX_PASSWORD_LEN`] bytes.
pub fn check_password(password: &str) -> Result<(), UserError> {
    if password.is_empty() {
        return Err(UserError::EmptyPassword);
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(UserError::PasswordTooLong);
    }
    Ok(())
}

/// Hashes and checks passwords with a bounded number of blocking threads.
#[derive(Debug)]
pub struct Passwords {
    cost: PasswordCost,
    /// A hash of a random password nobody knows, with `cost`: what an
    /// unknown user name is checked against.
    dummy: OnceCell<String>,
    permits: Arc<Semaphore>,
}

impl Passwords {
    /// Checks the cost; hashes nothing yet.
    pub fn new(cost: PasswordCost) -> Result<Passwords, UserError> {
        cost.argon2()?;
        Ok(Passwords {
            cost,
            dummy: OnceCell::new(),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_HASHES)),
        })
    }

    /// Hashes `password` (PHC string) on the blocking pool.
    pub async fn hash(&self, password: &Secret) -> Result<String, UserError> {
        check_password(password.expose())?;
        let _permit = self.permit().await?;
        let (cost, password) = (self.cost, password.clone());
        tokio::task::spawn_blocking(move || hash_blocking(cost, password.expose()))
            .await
            .map_err(|e| UserError::Task(e.to_string()))?
    }

    /// True if `password` matches `stored` (a PHC string). With no stored
    /// hash (an unknown user) the dummy is checked instead, so the answer
    /// takes the same time, and is false.
    pub async fn verify(&self, password: &Secret, stored: Option<&str>) -> bool {
        let known = stored.is_some();
        let phc = match stored {
            Some(phc) => phc.to_string(),
            None => match self.dummy().await {
                Ok(dummy) => dummy.to_string(),
                Err(_) => return false,
            },
        };
        let password = password.clone();
        let Ok(_permit) = self.permit().await else {
            return false;
        };
        let checked = tokio::task::spawn_blocking(move || verify_blocking(password.expose(), &phc))
            .await
            .unwrap_or(false);
        checked && known
    }

    /// The dummy hash, made on first use.
    async fn dummy(&self) -> Result<&str, UserError> {
        let cost = self.cost;
        let dummy = self
            .dummy
            .get_or_try_init(|| async move {
                let random = keys::random_hex(32)?;
                tokio::task::spawn_blocking(move || hash_blocking(cost, &random))
                    .await
                    .map_err(|e| UserError::Task(e.to_string()))?
            })
            .await?;
        Ok(dummy)
    }

    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, UserError> {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| UserError::Task(e.to_string()))
    }
}

fn hash_blocking(cost: PasswordCost, password: &str) -> Result<String, UserError> {
    let salt = keys::random_bytes::<16>()?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| UserError::Hash(e.to_string()))?;
    cost.argon2()?
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Checks with the cost recorded in the hash itself.
fn verify_blocking(password: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: PasswordCost = PasswordCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[tokio::test]
    async fn a_hash_verifies_its_password_only_and_unknown_users_never_pass() {
        let passwords = Passwords::new(CHEAP).unwrap();
        let secret = Secret::new("correct horse");
        let hash = passwords.hash(&secret).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        assert!(passwords.verify(&secret, Some(&hash)).await);
        assert!(!passwords.verify(&Secret::new("wrong"), Some(&hash)).await);
        assert!(!passwords.verify(&secret, None).await);
        assert!(!passwords.verify(&secret, Some("not a hash")).await);
        // A fresh salt each time.
        assert_ne!(passwords.hash(&secret).await.unwrap(), hash);
    }

    #[test]
    fn names_and_passwords_are_bounded() {
        for good in ["alice", "a.b-c_d@example.com", &"x".repeat(64)] {
            assert!(is_user_name(good), "{good}");
        }
        for bad in ["", "a b", "ümlaut", "a/b", &"x".repeat(65), "<script>"] {
            assert!(!is_user_name(bad), "{bad}");
        }
        assert!(matches!(check_password(""), Err(UserError::EmptyPassword)));
        assert!(check_password(&"p".repeat(MAX_PASSWORD_LEN)).is_ok());
        assert!(matches!(
            check_password(&"p".repeat(MAX_PASSWORD_LEN + 1)),
            Err(UserError::PasswordTooLong)
        ));
        assert!(matches!(
            check_new_user("alice", "", "pw"),
            Err(UserError::BadTeam)
        ));
    }
}
