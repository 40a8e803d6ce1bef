//! Durable state in one redb file, `DIR/platform.redb`: provisioning tokens
//! (by hash), devices, certificate fingerprints and the admin token's hash.
//!
//! This module owns every read and write of that file and the atomicity of
//! each operation: one operation is one redb transaction, so a crash leaves
//! either all of it or none. Enrollment is the one that matters most:
//! checking a token, spending one use, creating the device and recording its
//! certificate commit together, and redb runs one write transaction at a
//! time, so two devices racing with a single-use token cannot both win.
//!
//! It never sees a token or a certificate in clear, only their SHA-256, and
//! never decides policy beyond the token's own rules (uses and expiry). Its
//! methods block on disk I/O: async code calls them through
//! [`Store::blocking`], which runs them on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tether_proto::api::Facts;

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

/// A provisioning token as stored: never the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub team: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: u64,
    pub uses_left: u32,
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
}

/// A certificate the platform issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub device_id: String,
    pub not_after: u64,
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
    #[error("device '{0}' is revoked")]
    Revoked(String),
}

macro_rules! db_err {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Db(e.into()))
    };
}

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
        for table in [TOKENS, DEVICES, CERTS, META] {
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
            if token.uses_left == 0 {
                return Err(TokenRefusal::Used.into());
            }
            if now >= token.expires_at {
                return Err(TokenRefusal::Expired.into());
            }
            token.uses_left -= 1;
            put(&mut tokens, token_hash, &token)?;
            device.team = token.team;
            let cert = CertRecord {
                device_id: device.id.clone(),
                not_after: device.cert_not_after,
            };
            put(&mut db_err!(txn.open_table(DEVICES))?, &device.id, &device)?;
            put(&mut db_err!(txn.open_table(CERTS))?, fingerprint, &cert)?;
        }
        // Dropping `txn` without commit (the early returns above) aborts it:
        // the token keeps its use.
        db_err!(txn.commit())?;
        Ok(device)
    }

    /// Records a renewed certificate for a device that exists and is not
    /// revoked. Older certificates stay valid until their own expiry.
    pub fn add_certificate(
        &self,
        device_id: &str,
        fingerprint: &str,
        not_after: u64,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        {
            let mut devices = db_err!(txn.open_table(DEVICES))?;
            let mut device: DeviceRecord = get(&devices, device_id)?
                .ok_or_else(|| StoreError::NoDevice(device_id.to_string()))?;
            if device.revoked {
                return Err(StoreError::Revoked(device_id.to_string()));
            }
            device.cert_not_after = device.cert_not_after.max(not_after);
            put(&mut devices, device_id, &device)?;
            let cert = CertRecord {
                device_id: device_id.to_string(),
                not_after,
            };
            put(&mut db_err!(txn.open_table(CERTS))?, fingerprint, &cert)?;
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
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        let table = db_err!(txn.open_table(DEVICES))?;
        let mut out = Vec::new();
        for entry in db_err!(table.iter())? {
            let (_, value) = db_err!(entry)?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    /// Marks a device revoked. Revoking twice is not an error.
    pub fn revoke(&self, id: &str) -> Result<DeviceRecord, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let device = {
            let mut devices = db_err!(txn.open_table(DEVICES))?;
            let mut device: DeviceRecord =
                get(&devices, id)?.ok_or_else(|| StoreError::NoDevice(id.to_string()))?;
            device.revoked = true;
            put(&mut devices, id, &device)?;
            device
        };
        db_err!(txn.commit())?;
        Ok(device)
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
        };
        store.insert_token("h", &record).unwrap();
        let expired = store.enroll("h", 50, device("dev_a"), "fp").unwrap_err();
        assert!(matches!(expired, StoreError::Token(TokenRefusal::Expired)));
        let unknown = store.enroll("x", 1, device("dev_a"), "fp").unwrap_err();
        assert!(matches!(unknown, StoreError::Token(TokenRefusal::Unknown)));
        assert_eq!(store.token("h").unwrap().unwrap().uses_left, 3);
    }
}
