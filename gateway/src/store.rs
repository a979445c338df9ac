//! The embedded store: devices survive restarts and `kill -9`.
//!
//! A single [redb](https://docs.rs/redb) file (ACID, copy-on-write B-trees, fsync on every
//! commit with the default `Durability::Immediate`). The in-memory registry stays the source
//! for the hot path; the store is written by the admin API *before* the in-memory change is
//! applied, so an acknowledged admin call is on disk, and a failed write changes nothing.
//! At start-up every record is loaded into the registry.
//!
//! `path = ":memory:"` keeps the store in memory (for `fleetgate sandbox` and tests that do
//! not restart).

use std::collections::BTreeMap;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// device id → JSON [`DeviceRecord`]. The `_v1` suffix versions the value format.
const DEVICES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("devices_v1");

/// Quota rules: benefit id → JSON rule (Coze's shape).
pub const RULES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("rules_v1");
/// Rules pulled from the upstream (kept across restarts: the last-known rules hold while the
/// upstream is unreachable): benefit id → JSON rule.
pub const SYNCED_RULES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("synced_rules_v1");
/// Usage counters: `device/benefit_type/kind` → JSON counter (window start + used).
pub const USAGE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("usage_v1");

/// A device as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub enabled: bool,
    pub generation: u64,
    pub created_at: u64,
    /// Public keys and secret hashes (never plaintext secrets).
    #[serde(default)]
    pub credentials: Vec<CredentialRecord>,
}

/// A device credential as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CredentialRecord {
    PublicKey {
        kid: String,
        algorithm: policy::credential::KeyAlgorithm,
        public_key_pem: String,
        created_at: u64,
    },
    Secret {
        kid: String,
        hash: policy::credential::SecretHash,
        created_at: u64,
    },
}

impl CredentialRecord {
    pub fn kid(&self) -> &str {
        match self {
            CredentialRecord::PublicKey { kid, .. } | CredentialRecord::Secret { kid, .. } => kid,
        }
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store {op} failed: {reason}")]
    Io { op: &'static str, reason: String },
    #[error("stored record for `{key}` is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

fn io(op: &'static str) -> impl Fn(&dyn std::fmt::Display) -> StoreError {
    move |e| StoreError::Io {
        op,
        reason: e.to_string(),
    }
}

pub struct Store {
    db: redb::Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (creating if needed) the store at `path`, or an in-memory one for `:memory:`.
    pub fn open(path: &str) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        let db = if path == ":memory:" {
            redb::Builder::new()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| open_err(e.to_string()))?
        } else {
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
            }
            redb::Database::create(path).map_err(|e| open_err(e.to_string()))?
        };
        // Make sure the tables exist so reads of a fresh store succeed.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        for table in [DEVICES, RULES, USAGE, SYNCED_RULES] {
            txn.open_table(table).map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        Ok(Store { db })
    }

    /// Every stored device.
    pub fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| io("read")(&e))?;
        let table = txn.open_table(DEVICES).map_err(|e| io("read")(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| io("read")(&e))? {
            let (k, v) = row.map_err(|e| io("read")(&e))?;
            let rec: DeviceRecord =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    key: k.value().to_owned(),
                    reason: e.to_string(),
                })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Writes (inserts or replaces) records in one durable transaction.
    pub fn put_devices(&self, records: &[DeviceRecord]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| io("write")(&e))?;
        {
            let mut table = txn.open_table(DEVICES).map_err(|e| io("write")(&e))?;
            for r in records {
                let bytes = serde_json::to_vec(r).map_err(|e| io("encode")(&e))?;
                table
                    .insert(r.device_id.as_str(), bytes.as_slice())
                    .map_err(|e| io("write")(&e))?;
            }
        }
        txn.commit().map_err(|e| io("commit")(&e))
    }

    /// Every record of a JSON table, decoded.
    pub fn load_all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| io("read")(&e))?;
        let t = txn.open_table(table).map_err(|e| io("read")(&e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| io("read")(&e))? {
            let (k, v) = row.map_err(|e| io("read")(&e))?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    key: k.value().to_owned(),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }

    /// Writes `(key, value)` pairs of a JSON table in one durable transaction.
    pub fn put_all<T: Serialize>(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        rows: &[(String, T)],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| io("write")(&e))?;
        {
            let mut t = txn.open_table(table).map_err(|e| io("write")(&e))?;
            for (k, v) in rows {
                let bytes = serde_json::to_vec(v).map_err(|e| io("encode")(&e))?;
                t.insert(k.as_str(), bytes.as_slice())
                    .map_err(|e| io("write")(&e))?;
            }
        }
        txn.commit().map_err(|e| io("commit")(&e))
    }

    /// Replaces a JSON table's whole content in one durable transaction.
    pub fn replace_all<T: Serialize>(
        &self,
        table: TableDefinition<'_, &str, &[u8]>,
        rows: &[(String, T)],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| io("write")(&e))?;
        txn.delete_table(table).map_err(|e| io("write")(&e))?;
        {
            let mut t = txn.open_table(table).map_err(|e| io("write")(&e))?;
            for (k, v) in rows {
                let bytes = serde_json::to_vec(v).map_err(|e| io("encode")(&e))?;
                t.insert(k.as_str(), bytes.as_slice())
                    .map_err(|e| io("write")(&e))?;
            }
        }
        txn.commit().map_err(|e| io("commit")(&e))
    }

    /// Deletes a device record (absent is fine).
    pub fn delete_device(&self, device_id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| io("write")(&e))?;
        {
            let mut table = txn.open_table(DEVICES).map_err(|e| io("write")(&e))?;
            table.remove(device_id).map_err(|e| io("write")(&e))?;
        }
        txn.commit().map_err(|e| io("commit")(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, generation: u64) -> DeviceRecord {
        DeviceRecord {
            device_id: id.into(),
            labels: BTreeMap::new(),
            enabled: true,
            generation,
            created_at: 1,
            credentials: Vec::new(),
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("fleetgate-store-{}", std::process::id()));
        let path = dir.join("t.redb").display().to_string();
        {
            let s = Store::open(&path).unwrap();
            s.put_devices(&[rec("a", 0), rec("b", 3)]).unwrap();
            s.put_devices(&[rec("a", 1)]).unwrap();
            s.delete_device("b").unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_devices().unwrap(), vec![rec("a", 1)]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn json_tables_round_trip() {
        let s = Store::open(":memory:").unwrap();
        s.put_all(RULES, &[("b1".to_owned(), serde_json::json!({"limit": 5}))])
            .unwrap();
        let rows: Vec<serde_json::Value> = s.load_all(RULES).unwrap();
        assert_eq!(rows, vec![serde_json::json!({"limit": 5})]);
        assert!(s.load_all::<serde_json::Value>(USAGE).unwrap().is_empty());
    }

    #[test]
    fn memory_store_works() {
        let s = Store::open(":memory:").unwrap();
        s.put_devices(&[rec("x", 0)]).unwrap();
        assert_eq!(s.load_devices().unwrap().len(), 1);
    }
}
