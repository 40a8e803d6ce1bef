//! Durable state in one redb file, `DIR/platform.redb`: provisioning tokens
//! (by hash), devices, certificate fingerprints, the admin token's hash,
//! platform users (with Argon2 password hashes) and their web sessions (by
//! the hash of the session cookie).
//!
//! This module owns every read and write of that file and the atomicity of
//! each operation: one operation is one redb transaction, so a crash leaves
//! either all of it or none. Enrollment is the one that matters most:
//! checking a token, spending one use, creating the device and recording its
//! certificate commit together, and redb runs one write transaction at a
//! time, so two devices racing with a single-use token cannot both win.
//!
//! It never sees a token, a session cookie, a password or a certificate in
//! clear, only their hashes, and never decides policy beyond the rules of
//! the records themselves (a token's uses and expiry, a session's expiry,
//! the number of sessions a user keeps). Its
//! methods block on disk I/O: async code calls them through
//! [`Store::blocking`], which runs them on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tether_proto::api::Facts;
use tether_proto::grant::Role;

use crate::certs::{self, Admission, CertPolicy, CertState, RenewRefusal};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "platform.redb";

/// SHA-256 of the token (hex) -> [`TokenRecord`] (JSON).
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Device id -> [`DeviceRecord`] (JSON).
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// SHA-256 of a certificate's DER (hex) -> [`CertRecord`] (JSON).
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
/// Small named values: the admin token's hash.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ADMIN_TOKEN_HASH: &str = "admin_token_sha256";
/// User name -> [`UserRecord`] (JSON).
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// SHA-256 of the session cookie's value (hex) -> [`SessionRecord`] (JSON).
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// A provisioning token as stored: never the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub team: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: u64,
    pub uses_left: u32,
    /// Uses the token was created with. Records written before the field
    /// existed load as 0 (unknown).
    #[serde(default)]
    pub uses: u32,
    /// A fleet manager revoked it. Records written before the flag existed
    /// load as `false`.
    #[serde(default)]
    pub revoked: bool,
}

impl TokenRecord {
    /// Whether the token may enroll one more device at `now`.
    pub fn check(&self, now: u64) -> Result<(), TokenRefusal> {
        if self.revoked {
            return Err(TokenRefusal::Revoked);
        }
        if self.uses_left == 0 {
            return Err(TokenRefusal::Used);
        }
        if now >= self.expires_at {
            return Err(TokenRefusal::Expired);
        }
        Ok(())
    }
}

/// Hex digits of a token's hash that name it in `token list` / `revoke`.
pub const TOKEN_ID_LEN: usize = 16;

/// A provisioning token as `token list` shows it: never the secret, never
/// the whole hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSummary {
    /// The first [`TOKEN_ID_LEN`] hex digits of the secret's SHA-256.
    pub id: String,
    pub team: String,
    pub created: u64,
    pub expires_at: u64,
    pub uses: u32,
    pub uses_left: u32,
    pub revoked: bool,
}

/// A device as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub name: String,
    pub team: String,
    /// Unix seconds.
    pub enrolled_at: u64,
    pub revoked: bool,
    /// `not_after` of the newest certificate issued to the device.
    pub cert_not_after: u64,
    pub facts: Facts,
    /// Instance protection mode: flows read-only in the editor for every
    /// role. Records written before the flag existed load as `false`.
    #[serde(default)]
    pub protected: bool,
    /// Its certificates: current, previous, renewals (`crate::certs`).
    #[serde(default)]
    pub certs: CertState,
}

/// A platform user as stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub team: String,
    pub role: Role,
    /// Argon2id, PHC string format.
    pub password_hash: String,
    /// Unix seconds.
    pub created_at: u64,
}

impl std::fmt::Debug for UserRecord {
    /// Without the password hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("name", &self.name)
            .field("team", &self.team)
            .field("role", &self.role)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// A web session as stored, under the hash of its cookie's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub user: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the session is refused from this second on.
    pub expires_at: u64,
}

/// A certificate the platform issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub device_id: String,
    pub not_after: u64,
    /// Revoked on its own (the device may still have others).
    #[serde(default)]
    pub revoked: bool,
}

/// What the tunnel endpoint decided about a client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelAdmission {
    Accepted(DeviceRecord),
    /// No device of this platform has this certificate.
    Unknown,
    DeviceRevoked(DeviceRecord),
    /// This one certificate was revoked.
    CertRevoked(DeviceRecord),
    /// The device has renewed since: an older copy of its identity.
    Superseded(DeviceRecord),
}

/// Why a provisioning token cannot enroll a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("no such provisioning token was issued")]
    Unknown,
    #[error("the provisioning token has already been used")]
    Used,
    #[error("the provisioning token has expired")]
    Expired,
    #[error("the provisioning token was revoked")]
    Revoked,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "another tether-platform already uses '{0}'; help: stop it first, or pass another --data-dir"
    )]
    InUse(String),
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("a stored record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("the store is closed (the platform is shutting down)")]
    Closed,
    #[error("a store task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Token(#[from] TokenRefusal),
    #[error("no device '{0}'")]
    NoDevice(String),
    #[error(
        "no single provisioning token has the id '{0}'; help: copy the id from `tether-platform token list`"
    )]
    NoToken(String),
    #[error("device '{0}' is revoked")]
    Revoked(String),
    #[error("a user named '{0}' already exists; remove it first to change it")]
    UserExists(String),
    #[error("no user '{0}'")]
    NoUser(String),
    #[error(transparent)]
    Renewal(#[from] RenewRefusal),
    #[error("device '{device}' has no certificate with fingerprint {fingerprint}")]
    NoCertificate { device: String, fingerprint: String },
}

macro_rules! db_err {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Db(e.into()))
    };
}

mod audit;
pub use audit::{AuditWrite, StoredCheckpoint, StoredTrail};

/// The redb database. Clones share it; [`Store::close`] releases the file
/// even while clones remain.
#[derive(Clone, Debug)]
pub struct Store {
    db: Arc<RwLock<Option<Arc<Database>>>>,
}

impl Store {
    /// Opens (or creates) `DIR/platform.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(DB_FILE);
        // redb would create the file with the default mode; it holds token
        // hashes and the device list, so create it owner-only first (redb
        // initialises an empty file as a new database).
        create_owner_only(&path)?;
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::InUse(dir.display().to_string())
            }
            other => StoreError::Db(other.into()),
        })?;
        let txn = db_err!(db.begin_write())?;
        for table in [TOKENS, DEVICES, CERTS, META, USERS, SESSIONS] {
            db_err!(txn.open_table(table))?;
        }
        db_err!(txn.commit())?;
        Ok(Store {
            db: Arc::new(RwLock::new(Some(Arc::new(db)))),
        })
    }

    /// Releases the database file. Later operations fail with
    /// [`StoreError::Closed`].
    pub fn close(&self) {
        self.db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Releases the database file and waits (up to 5 s) until operations
    /// still running have dropped it, so the file can be opened again at
    /// once.
    pub async fn close_and_wait(&self) {
        let db = self
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(db) = db else { return };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&db) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Runs `op` on the blocking pool: redb calls block on the disk.
    pub async fn blocking<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Stores the admin token's hash (replacing any older one).
    pub fn set_admin_token_hash(&self, hash: &[u8; 32]) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        db_err!(db_err!(txn.open_table(META))?.insert(ADMIN_TOKEN_HASH, &hash[..]))?;
        db_err!(txn.commit())
    }

    /// The admin token's hash, if one was stored.
    pub fn admin_token_hash(&self) -> Result<Option<[u8; 32]>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        let table = db_err!(txn.open_table(META))?;
        let value = db_err!(table.get(ADMIN_TOKEN_HASH))?;
        Ok(value.and_then(|v| v.value().try_into().ok()))
    }

    /// Stores a new provisioning token under its hash.
    pub fn insert_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        put(&mut db_err!(txn.open_table(TOKENS))?, hash, record)?;
        db_err!(txn.commit())
    }

    /// A provisioning token's record, by hash.
    pub fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read_one(TOKENS, hash)
    }

    /// Checks a token (by hash) at `now` without spending it: the cheap
    /// check the enrollment endpoint makes before any signing work.
    pub fn check_token(&self, hash: &str, now: u64) -> Result<(), StoreError> {
        let token: TokenRecord = self.token(hash)?.ok_or(TokenRefusal::Unknown)?;
        Ok(token.check(now)?)
    }

    /// Every provisioning token, without secrets, in id order.
    pub fn tokens(&self) -> Result<Vec<TokenSummary>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        let table = db_err!(txn.open_table(TOKENS))?;
        let mut out = Vec::new();
        for entry in db_err!(table.iter())? {
            let (key, value) = db_err!(entry)?;
            let record: TokenRecord = serde_json::from_slice(value.value())?;
            out.push(summary(key.value(), record));
        }
        Ok(out)
    }

    /// Revokes the one token whose id (hash prefix, at least
    /// [`TOKEN_ID_LEN`] hex digits) is `id`. Returns it as it now is.
    pub fn revoke_token(&self, id: &str) -> Result<TokenSummary, StoreError> {
        if id.len() < TOKEN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NoToken(id.to_owned()));
        }
        let id = id.to_ascii_lowercase();
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let summary = {
            let mut tokens = db_err!(txn.open_table(TOKENS))?;
            let mut found = None;
            for entry in db_err!(tokens.iter())? {
                let (key, _) = db_err!(entry)?;
                if key.value().starts_with(&id) {
                    if found.is_some() {
                        return Err(StoreError::NoToken(id));
                    }
                    found = Some(key.value().to_owned());
                }
            }
            let hash = found.ok_or_else(|| StoreError::NoToken(id.clone()))?;
            let mut record: TokenRecord =
                get(&tokens, &hash)?.ok_or_else(|| StoreError::NoToken(id.clone()))?;
            record.revoked = true;
            put(&mut tokens, &hash, &record)?;
            summary(&hash, record)
        };
        db_err!(txn.commit())?;
        Ok(summary)
    }

    /// Enrolls a device in one transaction: checks the token (by hash) at
    /// time `now`, spends one use, stores the device and its certificate's
    /// fingerprint. Returns the device as stored: its team is the token's.
    pub fn enroll(
        &self,
        token_hash: &str,
        now: u64,
        mut device: DeviceRecord,
        fingerprint: &str,
    ) -> Result<DeviceRecord, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        {
            let mut tokens = db_err!(txn.open_table(TOKENS))?;
            let mut token: TokenRecord = get(&tokens, token_hash)?.ok_or(TokenRefusal::Unknown)?;
            // Checked again here: a concurrent request may have spent the
            // last use (or a manager revoked it) since `check_token`.
            token.check(now)?;
            token.uses_left -= 1;
            put(&mut tokens, token_hash, &token)?;
            device.team = token.team;
            device.certs = CertState::enrolled(fingerprint);
            let cert = CertRecord {
                device_id: device.id.clone(),
                not_after: device.cert_not_after,
                revoked: false,
            };
            put(&mut db_err!(txn.open_table(DEVICES))?, &device.id, &device)?;
            put(&mut db_err!(txn.open_table(CERTS))?, fingerprint, &cert)?;
        }
        // Dropping `txn` without commit (the early returns above) aborts it:
        // the token keeps its use.
        db_err!(txn.commit())?;
        Ok(device)
    }

    /// Whether `device_id`, over a tunnel with `tunnel_fingerprint`, may
    /// renew now (checked before any signing; [`Store::renew_certificate`]
    /// checks again in its transaction).
    pub fn check_renewal(
        &self,
        device_id: &str,
        tunnel_fingerprint: &str,
        policy: &CertPolicy,
        now: u64,
    ) -> Result<(), StoreError> {
        let device = self
            .device(device_id)?
            .ok_or_else(|| StoreError::NoDevice(device_id.to_string()))?;
        if device.revoked {
            return Err(StoreError::Revoked(device_id.to_string()));
        }
        let not_after = self
            .read_one::<CertRecord>(CERTS, tunnel_fingerprint)?
            .map_or(device.cert_not_after, |c| c.not_after);
        Ok(certs::may_renew(
            &device.certs,
            tunnel_fingerprint,
            not_after,
            policy,
            now,
        )?)
    }

    /// Records a renewed certificate for a device that exists, is not
    /// revoked and may renew now: the new one becomes current, the one
    /// before it previous (for the grace period), and records of the
    /// device's expired certificates are pruned. One transaction.
    pub fn renew_certificate(
        &self,
        device_id: &str,
        tunnel_fingerprint: &str,
        fingerprint: &str,
        not_after: u64,
        policy: &CertPolicy,
        now: u64,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        {
            let mut devices = db_err!(txn.open_table(DEVICES))?;
            let mut certs_table = db_err!(txn.open_table(CERTS))?;
            let mut device: DeviceRecord = get(&devices, device_id)?
                .ok_or_else(|| StoreError::NoDevice(device_id.to_string()))?;
            if device.revoked {
                return Err(StoreError::Revoked(device_id.to_string()));
            }
            let tunnel_not_after = get::<CertRecord>(&certs_table, tunnel_fingerprint)?
                .map_or(device.cert_not_after, |c| c.not_after);
            certs::may_renew(
                &device.certs,
                tunnel_fingerprint,
                tunnel_not_after,
                policy,
                now,
            )?;
            let mut state =
                certs::renewed(&device.certs, tunnel_fingerprint, fingerprint, policy, now);
            // Prune the records of expired certificates that are neither
            // current nor previous.
            let mut kept = Vec::with_capacity(state.issued.len());
            for fp in std::mem::take(&mut state.issued) {
                let live =
                    Some(&fp) == state.current.as_ref() || Some(&fp) == state.previous.as_ref();
                let expired =
                    get::<CertRecord>(&certs_table, &fp)?.is_none_or(|c| c.not_after <= now);
                if live || !expired {
                    kept.push(fp);
                } else {
                    db_err!(certs_table.remove(fp.as_str()))?;
                }
            }
            state.issued = kept;
            device.certs = state;
            device.cert_not_after = device.cert_not_after.max(not_after);
            put(&mut devices, device_id, &device)?;
            let cert = CertRecord {
                device_id: device_id.to_string(),
                not_after,
                revoked: false,
            };
            put(&mut certs_table, fingerprint, &cert)?;
        }
        db_err!(txn.commit())
    }

    /// What the tunnel endpoint does with a client certificate at `now`.
    /// Reads only, unless the device's record must change (a legacy record's
    /// certificate made current, a previous one retired, a superseded one
    /// noted).
    pub fn admit_certificate(
        &self,
        fingerprint: &str,
        now: u64,
    ) -> Result<TunnelAdmission, StoreError> {
        let Some(cert) = self.read_one::<CertRecord>(CERTS, fingerprint)? else {
            return Ok(TunnelAdmission::Unknown);
        };
        let Some(device) = self.device(&cert.device_id)? else {
            return Ok(TunnelAdmission::Unknown);
        };
        if device.revoked {
            return Ok(TunnelAdmission::DeviceRevoked(device));
        }
        match certs::admit(&device.certs, fingerprint, cert.revoked, now) {
            Admission::Accept(None) => Ok(TunnelAdmission::Accepted(device)),
            Admission::Revoked => Ok(TunnelAdmission::CertRevoked(device)),
            Admission::Accept(Some(_)) | Admission::Superseded(_) => {
                // Decide again inside a write transaction: the record may
                // have changed since the read.
                let db = self.db()?;
                let txn = db_err!(db.begin_write())?;
                let admission = {
                    let mut devices = db_err!(txn.open_table(DEVICES))?;
                    let mut device: DeviceRecord = get(&devices, &cert.device_id)?
                        .ok_or_else(|| StoreError::NoDevice(cert.device_id.clone()))?;
                    match certs::admit(&device.certs, fingerprint, cert.revoked, now) {
                        Admission::Accept(Some(state)) => {
                            device.certs = state;
                            put(&mut devices, &cert.device_id, &device)?;
                            TunnelAdmission::Accepted(device)
                        }
                        Admission::Accept(None) => TunnelAdmission::Accepted(device),
                        Admission::Revoked => TunnelAdmission::CertRevoked(device),
                        Admission::Superseded(state) => {
                            device.certs = state;
                            put(&mut devices, &cert.device_id, &device)?;
                            TunnelAdmission::Superseded(device)
                        }
                    }
                };
                db_err!(txn.commit())?;
                Ok(admission)
            }
        }
    }

    /// Asks a device to renew at its next chance, inside the renewal window
    /// or not.
    pub fn request_renewal(&self, id: &str) -> Result<DeviceRecord, StoreError> {
        self.update_device(id, |device| device.certs.renew_requested = true)
    }

    /// Revokes one certificate of a device (by fingerprint), not the device.
    pub fn revoke_certificate(&self, id: &str, fingerprint: &str) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        {
            let mut certs_table = db_err!(txn.open_table(CERTS))?;
            let mut cert: CertRecord = get(&certs_table, fingerprint)?
                .filter(|c: &CertRecord| c.device_id == id)
                .ok_or_else(|| StoreError::NoCertificate {
                    device: id.to_string(),
                    fingerprint: fingerprint.to_string(),
                })?;
            cert.revoked = true;
            put(&mut certs_table, fingerprint, &cert)?;
        }
        db_err!(txn.commit())
    }

    /// The device a certificate (by fingerprint) was issued to.
    pub fn device_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        match self.read_one::<CertRecord>(CERTS, fingerprint)? {
            Some(cert) => self.device(&cert.device_id),
            None => Ok(None),
        }
    }

    /// One device, by id.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.read_one(DEVICES, id)
    }

    /// Every device, ordered by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read_all(DEVICES)
    }

    /// Marks a device revoked. Revoking twice is not an error.
    pub fn revoke(&self, id: &str) -> Result<DeviceRecord, StoreError> {
        self.update_device(id, |device| device.revoked = true)
    }

    /// Sets a device's protection mode; returns the device as stored.
    pub fn set_protected(&self, id: &str, enabled: bool) -> Result<DeviceRecord, StoreError> {
        self.update_device(id, |device| device.protected = enabled)
    }

    /// Changes one device in one transaction; returns it as stored.
    fn update_device(
        &self,
        id: &str,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<DeviceRecord, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let device = {
            let mut devices = db_err!(txn.open_table(DEVICES))?;
            let mut device: DeviceRecord =
                get(&devices, id)?.ok_or_else(|| StoreError::NoDevice(id.to_string()))?;
            change(&mut device);
            put(&mut devices, id, &device)?;
            device
        };
        db_err!(txn.commit())?;
        Ok(device)
    }

    /// Stores a new user; refuses a name already taken.
    pub fn insert_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        {
            let mut users = db_err!(txn.open_table(USERS))?;
            if db_err!(users.get(user.name.as_str()))?.is_some() {
                return Err(StoreError::UserExists(user.name.clone()));
            }
            put(&mut users, &user.name, user)?;
        }
        db_err!(txn.commit())
    }

    /// One user, by name.
    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.read_one(USERS, name)
    }

    /// Every user, ordered by name.
    pub fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.read_all(USERS)
    }

    /// Removes a user and, in the same transaction, every session of theirs.
    /// Returns the hashes of the sessions removed.
    pub fn remove_user(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let removed = {
            let mut users = db_err!(txn.open_table(USERS))?;
            if db_err!(users.remove(name))?.is_none() {
                return Err(StoreError::NoUser(name.to_string()));
            }
            let mut sessions = db_err!(txn.open_table(SESSIONS))?;
            remove_sessions_in(&mut sessions, name)?
        };
        db_err!(txn.commit())?;
        Ok(removed)
    }

    /// Stores a new session under `hash` in one transaction that also drops
    /// every expired session (at `now`) and, if the user would hold more
    /// than `max_per_user`, their oldest ones. Returns the hashes of the
    /// live sessions dropped that way, so their editor streams can be
    /// closed.
    pub fn insert_session(
        &self,
        hash: &str,
        record: &SessionRecord,
        now: u64,
        max_per_user: usize,
    ) -> Result<Vec<String>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let evicted = {
            let mut sessions = db_err!(txn.open_table(SESSIONS))?;
            let mut expired = Vec::new();
            let mut theirs = Vec::new();
            for entry in db_err!(sessions.iter())? {
                let (key, value) = db_err!(entry)?;
                let session: SessionRecord = serde_json::from_slice(value.value())?;
                if session.expires_at <= now {
                    expired.push(key.value().to_string());
                } else if session.user == record.user {
                    theirs.push((session.created_at, key.value().to_string()));
                }
            }
            theirs.sort();
            let excess = (theirs.len() + 1).saturating_sub(max_per_user.max(1));
            let evicted: Vec<String> = theirs.into_iter().take(excess).map(|(_, h)| h).collect();
            for key in expired.iter().chain(&evicted) {
                db_err!(sessions.remove(key.as_str()))?;
            }
            put(&mut sessions, hash, record)?;
            evicted
        };
        db_err!(txn.commit())?;
        Ok(evicted)
    }

    /// The session stored under `hash` and its user, if both exist and the
    /// session has not expired at `now`. One read transaction.
    pub fn session(
        &self,
        hash: &str,
        now: u64,
    ) -> Result<Option<(SessionRecord, UserRecord)>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        let Some(session) = get::<SessionRecord>(&db_err!(txn.open_table(SESSIONS))?, hash)? else {
            return Ok(None);
        };
        if session.expires_at <= now {
            return Ok(None);
        }
        let user = get::<UserRecord>(&db_err!(txn.open_table(USERS))?, &session.user)?;
        Ok(user.map(|user| (session, user)))
    }

    /// Moves the expiry of the session under `hash` to `expires_at` (never
    /// earlier than it was). The stored expiry, or `None` if the session is
    /// gone or expired at `now`.
    pub fn extend_session(
        &self,
        hash: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let stored = {
            let mut sessions = db_err!(txn.open_table(SESSIONS))?;
            match get::<SessionRecord>(&sessions, hash)? {
                Some(mut record) if record.expires_at > now => {
                    record.expires_at = record.expires_at.max(expires_at);
                    put(&mut sessions, hash, &record)?;
                    Some(record.expires_at)
                }
                _ => None,
            }
        };
        db_err!(txn.commit())?;
        Ok(stored)
    }

    /// Removes every session of `user`. Returns their hashes.
    pub fn remove_sessions_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let removed = {
            let mut sessions = db_err!(txn.open_table(SESSIONS))?;
            remove_sessions_in(&mut sessions, user)?
        };
        db_err!(txn.commit())?;
        Ok(removed)
    }

    /// Changes a user's password hash and, in the same transaction, removes
    /// every session of theirs. Returns the hashes of the sessions removed.
    pub fn set_password_hash(
        &self,
        name: &str,
        password_hash: &str,
    ) -> Result<Vec<String>, StoreError> {
        self.update_user(name, |user| user.password_hash = password_hash.to_string())
    }

    /// Changes a user's role and, in the same transaction, removes every
    /// session of theirs. Returns the hashes of the sessions removed.
    pub fn set_role(&self, name: &str, role: Role) -> Result<Vec<String>, StoreError> {
        self.update_user(name, |user| user.role = role)
    }

    fn update_user(
        &self,
        name: &str,
        change: impl FnOnce(&mut UserRecord),
    ) -> Result<Vec<String>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let removed = {
            let mut users = db_err!(txn.open_table(USERS))?;
            let Some(mut user) = get::<UserRecord>(&users, name)? else {
                return Err(StoreError::NoUser(name.to_string()));
            };
            change(&mut user);
            put(&mut users, name, &user)?;
            let mut sessions = db_err!(txn.open_table(SESSIONS))?;
            remove_sessions_in(&mut sessions, name)?
        };
        db_err!(txn.commit())?;
        Ok(removed)
    }

    /// Deletes the session stored under `hash`. True if there was one.
    pub fn remove_session(&self, hash: &str) -> Result<bool, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let removed = db_err!(db_err!(txn.open_table(SESSIONS))?.remove(hash))?.is_some();
        db_err!(txn.commit())?;
        Ok(removed)
    }

    /// Every record of `table`, in key order.
    fn read_all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        let table = db_err!(txn.open_table(table))?;
        let mut out = Vec::new();
        for entry in db_err!(table.iter())? {
            let (_, value) = db_err!(entry)?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    fn read_one<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        get(&db_err!(txn.open_table(table))?, key)
    }
}

/// Removes every session of `user` from an open sessions table. Returns
/// their hashes.
fn remove_sessions_in(
    sessions: &mut redb::Table<'_, &'static str, &'static [u8]>,
    user: &str,
) -> Result<Vec<String>, StoreError> {
    let mut theirs = Vec::new();
    for entry in db_err!(sessions.iter())? {
        let (key, value) = db_err!(entry)?;
        let session: SessionRecord = serde_json::from_slice(value.value())?;
        if session.user == user {
            theirs.push(key.value().to_string());
        }
    }
    for hash in &theirs {
        db_err!(sessions.remove(hash.as_str()))?;
    }
    Ok(theirs)
}

fn summary(hash: &str, record: TokenRecord) -> TokenSummary {
    TokenSummary {
        id: hash.chars().take(TOKEN_ID_LEN).collect(),
        team: record.team,
        created: record.created,
        expires_at: record.expires_at,
        uses: record.uses,
        uses_left: record.uses_left,
        revoked: record.revoked,
    }
}

fn create_owner_only(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::files::SECRET_MODE)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Db(e.into())),
    }
}

fn get<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match db_err!(table.get(key))? {
        Some(value) => Ok(Some(serde_json::from_slice(value.value())?)),
        None => Ok(None),
    }
}

fn put<T: Serialize>(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec(value)?;
    db_err!(table.insert(key, json.as_slice()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            name: "press-7".into(),
            team: String::new(),
            enrolled_at: 1,
            revoked: false,
            cert_not_after: 100,
            facts: Facts::default(),
            protected: false,
            certs: CertState::default(),
        }
    }

    #[test]
    fn a_token_is_spent_once_and_the_device_stays_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = TokenRecord {
            team: "line-3".into(),
            created: 0,
            expires_at: 50,
            uses_left: 1,
            uses: 1,
            revoked: false,
        };
        store.insert_token("h", &record).unwrap();
        let enrolled = store.enroll("h", 10, device("dev_a"), "fp1").unwrap();
        assert_eq!(enrolled.team, "line-3");
        let again = store.enroll("h", 10, device("dev_b"), "fp2").unwrap_err();
        assert!(matches!(again, StoreError::Token(TokenRefusal::Used)));
        assert!(
            store.device("dev_b").unwrap().is_none(),
            "a refused enrollment leaves nothing"
        );
        store.close();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.device_by_fingerprint("fp1").unwrap().unwrap().id,
            "dev_a"
        );
        assert_eq!(store.token("h").unwrap().unwrap().uses_left, 0);
    }

    #[test]
    fn tokens_expire_and_unknown_ones_are_named_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = TokenRecord {
            team: "t".into(),
            created: 0,
            expires_at: 50,
            uses_left: 3,
            uses: 3,
            revoked: false,
        };
        store.insert_token("h", &record).unwrap();
        let expired = store.enroll("h", 50, device("dev_a"), "fp").unwrap_err();
        assert!(matches!(expired, StoreError::Token(TokenRefusal::Expired)));
        let unknown = store.enroll("x", 1, device("dev_a"), "fp").unwrap_err();
        assert!(matches!(unknown, StoreError::Token(TokenRefusal::Unknown)));
        assert_eq!(store.token("h").unwrap().unwrap().uses_left, 3);
    }

    #[test]
    fn a_revoked_token_is_listed_without_its_hash_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = TokenRecord {
            team: "t".into(),
            created: 0,
            expires_at: 50,
            uses_left: 2,
            uses: 2,
            revoked: false,
        };
        let hash = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        store.insert_token(hash, &record).unwrap();
        store.check_token(hash, 1).unwrap();
        let listed = store.tokens().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, &hash[..TOKEN_ID_LEN]);
        assert!(matches!(
            store.revoke_token("0123"),
            Err(StoreError::NoToken(_))
        ));
        let revoked = store.revoke_token(&listed[0].id).unwrap();
        assert!(revoked.revoked);
        let checked = store.check_token(hash, 1).unwrap_err();
        assert!(matches!(checked, StoreError::Token(TokenRefusal::Revoked)));
        let spent = store.enroll(hash, 1, device("dev_a"), "fp").unwrap_err();
        assert!(matches!(spent, StoreError::Token(TokenRefusal::Revoked)));
    }

    #[test]
    fn a_device_record_without_the_protection_flag_loads_unprotected() {
        let old = r#"{"id":"dev_a","name":"n","team":"t","enrolled_at":1,"revoked":false,
            "cert_not_after":2,"facts":{"agent_version":"0.1.0","protocol_version":"1.0",
            "os":"linux","arch":"x86_64"}}"#;
        let record: DeviceRecord = serde_json::from_str(old).unwrap();
        assert!(!record.protected);
    }

    fn user(name: &str) -> UserRecord {
        UserRecord {
            name: name.into(),
            team: "line-3".into(),
            role: Role::Owner,
            password_hash: "$argon2id$...".into(),
            created_at: 1,
        }
    }

    fn session(user: &str, created_at: u64, expires_at: u64) -> SessionRecord {
        SessionRecord {
            user: user.into(),
            created_at,
            expires_at,
        }
    }

    #[test]
    fn users_and_sessions_live_and_die_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_user(&user("alice")).unwrap();
        assert!(matches!(
            store.insert_user(&user("alice")),
            Err(StoreError::UserExists(_))
        ));
        store.insert_user(&user("bob")).unwrap();
        assert!(!format!("{:?}", user("x")).contains("argon2"));

        // Expired sessions go at the next login; a user keeps at most two.
        store
            .insert_session("old", &session("bob", 1, 5), 1, 2)
            .unwrap();
        assert!(
            store
                .insert_session("a1", &session("alice", 10, 100), 10, 2)
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .insert_session("a2", &session("alice", 11, 100), 11, 2)
                .unwrap()
                .is_empty()
        );
        let evicted = store
            .insert_session("a3", &session("alice", 12, 100), 12, 2)
            .unwrap();
        assert_eq!(evicted, vec!["a1".to_string()]);
        assert!(store.session("old", 12).unwrap().is_none());
        assert!(store.session("a1", 12).unwrap().is_none());
        let (s, u) = store.session("a2", 12).unwrap().unwrap();
        assert_eq!((s.user.as_str(), u.role), ("alice", Role::Owner));
        assert!(store.session("a2", 100).unwrap().is_none(), "expired");

        assert!(store.remove_session("a2").unwrap());
        assert!(!store.remove_session("a2").unwrap());
        let removed = store.remove_user("alice").unwrap();
        assert_eq!(removed, vec!["a3".to_string()]);
        assert!(store.session("a3", 12).unwrap().is_none());
        assert!(matches!(
            store.remove_user("alice"),
            Err(StoreError::NoUser(_))
        ));
        assert_eq!(store.users().unwrap().len(), 1);
    }
}
