//! The audit trails devices ship, in the platform's store: records by
//! (device, sequence number), exactly as the device wrote them; the
//! checkpoints it signed; and records that arrived again with other bytes
//! than the ones stored (conflicts, kept beside, never over them).
//!
//! Storing a batch is one transaction: when it returns, every record in it
//! is durable, which is what the platform's acknowledgement promises. A
//! record already stored with the same bytes is a resend and is skipped.

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// (device id, sequence number) -> the record's bytes.
pub(super) const AUDIT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("audit_records");
/// (device id, sequence number) -> [`StoredCheckpoint`] (JSON).
pub(super) const AUDIT_CHECKPOINTS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("audit_checkpoints");
/// (device id, sequence number) -> bytes that arrived for a stored record
/// and differ from it (the last such arrival).
pub(super) const AUDIT_CONFLICTS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("audit_conflicts");

/// A checkpoint as the platform keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    /// What the device signed: the hash of its record at this sequence
    /// number (hex), and when (Unix seconds).
    pub hash: String,
    pub time: u64,
    /// The signature (base64url), the certificate's fingerprint and its
    /// raw public key (hex), so it can be checked again at any time.
    pub signature: String,
    pub cert_fingerprint: String,
    pub public_key: String,
}

/// A device's stored trail: records, checkpoints and conflicting resends,
/// each by sequence number, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredTrail {
    pub records: Vec<(u64, Vec<u8>)>,
    pub checkpoints: Vec<(u64, StoredCheckpoint)>,
    pub conflicts: Vec<(u64, Vec<u8>)>,
}

fn audit_range(
    txn: &redb::ReadTransaction,
    definition: TableDefinition<(&str, u64), &[u8]>,
    device: &str,
    since: u64,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let table = match txn.open_table(definition) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::Db(e.into())),
    };
    let mut out = Vec::new();
    for entry in db_err!(table.range((device, since)..=(device, u64::MAX)))? {
        let (key, value) = db_err!(entry)?;
        out.push((key.value().1, value.value().to_vec()));
    }
    Ok(out)
}

/// What storing one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditWrite {
    /// Records stored for the first time.
    pub stored: u64,
    /// Records that were already stored with the same bytes.
    pub duplicates: u64,
    /// Records that were already stored with other bytes.
    pub conflicts: u64,
    /// The highest sequence number in the batch (0 for none).
    pub highest: u64,
}

impl Store {
    /// The highest sequence number stored for `device` (0 for none).
    pub fn audit_last_seq(&self, device: &str) -> Result<u64, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        let table = match txn.open_table(AUDIT) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(StoreError::Db(e.into())),
        };
        let last = db_err!(table.range((device, 0)..=(device, u64::MAX)))?.next_back();
        match last {
            Some(entry) => Ok(db_err!(entry)?.0.value().1),
            None => Ok(0),
        }
    }

    /// Stores a batch of `device`'s records and checkpoints in one
    /// transaction.
    pub fn store_audit(
        &self,
        device: &str,
        records: &[(u64, Bytes)],
        checkpoints: &[(u64, StoredCheckpoint)],
    ) -> Result<AuditWrite, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        let mut write = AuditWrite::default();
        {
            let mut table = db_err!(txn.open_table(AUDIT))?;
            let mut conflicts = db_err!(txn.open_table(AUDIT_CONFLICTS))?;
            for (seq, body) in records {
                write.highest = write.highest.max(*seq);
                let existing = db_err!(table.get((device, *seq)))?.map(|v| v.value() == &body[..]);
                match existing {
                    Some(true) => write.duplicates += 1,
                    Some(false) => {
                        write.conflicts += 1;
                        db_err!(conflicts.insert((device, *seq), &body[..]))?;
                    }
                    None => {
                        write.stored += 1;
                        db_err!(table.insert((device, *seq), &body[..]))?;
                    }
                }
            }
            let mut table = db_err!(txn.open_table(AUDIT_CHECKPOINTS))?;
            for (seq, checkpoint) in checkpoints {
                let json = serde_json::to_vec(checkpoint)?;
                db_err!(table.insert((device, *seq), json.as_slice()))?;
            }
        }
        db_err!(txn.commit())?;
        Ok(write)
    }

    /// `device`'s records from `since` on, in order.
    pub fn audit_records(
        &self,
        device: &str,
        since: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        audit_range(&txn, AUDIT, device, since)
    }

    /// Everything stored of `device`'s trail, read in one transaction (so
    /// that a batch stored meanwhile is either wholly in it or not at all).
    pub fn audit_trail(&self, device: &str) -> Result<StoredTrail, StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_read())?;
        let checkpoints = audit_range(&txn, AUDIT_CHECKPOINTS, device, 0)?
            .into_iter()
            .map(|(seq, json)| Ok((seq, serde_json::from_slice(&json)?)))
            .collect::<Result<_, StoreError>>()?;
        Ok(StoredTrail {
            records: audit_range(&txn, AUDIT, device, 0)?,
            checkpoints,
            conflicts: audit_range(&txn, AUDIT_CONFLICTS, device, 0)?,
        })
    }

    /// Replaces (or with `None` removes) one stored record, as someone
    /// with write access to the platform's disk could: for tests that
    /// check that the chain shows it.
    #[doc(hidden)]
    pub fn tamper_audit_record(
        &self,
        device: &str,
        seq: u64,
        body: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db_err!(db.begin_write())?;
        {
            let mut table = db_err!(txn.open_table(AUDIT))?;
            match body {
                Some(body) => db_err!(table.insert((device, seq), body))?,
                None => db_err!(table.remove((device, seq)))?,
            };
        }
        db_err!(txn.commit())
    }
}
