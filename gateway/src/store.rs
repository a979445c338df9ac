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
        /// Tells this credential apart from an earlier one with the same `kid`, which tokens
        /// obtained through that one must not survive (see [`crate::devices::CredentialRef`]).
        /// 0 for credentials stored before serials existed.
        #[serde(default, skip_serializing_if = "is_zero")]
        serial: u64,
    },
    Secret {
        kid: String,
        hash: policy::credential::SecretHash,
        created_at: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        serial: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CredentialRecord {
    pub fn kid(&self) -> &str {
        match self {
            CredentialRecord::PublicKey { kid, .. } | CredentialRecord::Secret { kid, .. } => kid,
        }
    }

    pub fn serial(&self) -> u64 {
        match self {
            CredentialRecord::PublicKey { serial, .. }
            | CredentialRecord::Secret { serial, .. } => *serial,
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

/// The open database, replaced after an I/O error.
struct Slot {
    db: Option<redb::Database>,
    /// Bumped on every reopen, so concurrent failures reopen once.
    generation: u64,
}

type Opener = Box<dyn Fn() -> Result<redb::Database, String> + Send + Sync>;

/// The embedded store.
///
/// After an I/O error (disk full, a failing or read-only device) redb refuses every later
/// transaction with `PreviousIo` until the database is closed and opened again, which also
/// repairs it back to its last committed state. The store does that itself: the failing call
/// reports its error, the file is reopened, and the next call works once the disk does; if
/// reopening fails too, calls fail with a clear error and each retries the reopen.
pub struct Store {
    /// Opens the database again; `None` for `:memory:` (nothing to reopen, no I/O to fail).
    reopen: Option<Opener>,
    slot: std::sync::RwLock<Slot>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// redb's page cache (its default is 1 GiB). Nothing on the request path reads the store: it
/// is read in full once at start-up and written in small transactions (usage every
/// `quota.persist_interval`, admin changes). With redb's default the cache kept every page
/// written since start-up, a copy of the whole file in RSS: ~540 MB with a million devices
/// and a million rules. Pages it does not hold come from the OS page cache.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(CACHE_BYTES);
    b
}

/// Opens (creating if needed) the store file and its tables.
fn open_file(path: &str) -> Result<redb::Database, String> {
    if let Some(dir) = Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let db = builder().create(path).map_err(|e| e.to_string())?;
    create_tables(&db).map_err(|e| e.to_string())?;
    Ok(db)
}

/// Makes sure the tables exist so reads of a fresh store succeed.
fn create_tables(db: &redb::Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    for table in [DEVICES, RULES, USAGE, SYNCED_RULES] {
        txn.open_table(table)?;
    }
    txn.commit()?;
    Ok(())
}

type Rows = Vec<(String, Vec<u8>)>;

fn decode<T: serde::de::DeserializeOwned>(rows: Rows) -> Result<Vec<T>, StoreError> {
    rows.into_iter()
        .map(|(key, bytes)| {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                key,
                reason: e.to_string(),
            })
        })
        .collect()
}

fn encode<T: Serialize>(rows: &[(String, T)]) -> Result<Rows, StoreError> {
    rows.iter()
        .map(|(k, v)| {
            let bytes = serde_json::to_vec(v).map_err(|e| StoreError::Io {
                op: "encode",
                reason: e.to_string(),
            })?;
            Ok((k.clone(), bytes))
        })
        .collect()
}

fn read_rows(db: &redb::Database, table: Table) -> Result<Rows, redb::Error> {
    let txn = db.begin_read()?;
    let t = txn.open_table(table)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.push((k.value().to_owned(), v.value().to_vec()));
    }
    Ok(out)
}

/// One durable write transaction: optionally empty `table`, then insert `rows` into it.
fn write_rows(
    db: &redb::Database,
    table: Table,
    rows: &Rows,
    replace: bool,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    if replace {
        txn.delete_table(table)?;
    }
    {
        let mut t = txn.open_table(table)?;
        for (k, v) in rows {
            t.insert(k.as_str(), v.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

fn read_lock(l: &std::sync::RwLock<Slot>) -> std::sync::RwLockReadGuard<'_, Slot> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Store {
    /// Opens (creating if needed) the store at `path`, or an in-memory one for `:memory:`.
    pub fn open(path: &str) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        if path == ":memory:" {
            let db = builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| open_err(e.to_string()))?;
            create_tables(&db).map_err(|e| open_err(e.to_string()))?;
            return Ok(Store::with(db, None));
        }
        let db = open_file(path).map_err(open_err)?;
        let owned = path.to_owned();
        Ok(Store::with(db, Some(Box::new(move || open_file(&owned)))))
    }

    fn with(db: redb::Database, reopen: Option<Opener>) -> Store {
        Store {
            reopen,
            slot: std::sync::RwLock::new(Slot {
                db: Some(db),
                generation: 0,
            }),
        }
    }

    /// Runs `f` on the open database; after an I/O error, reopens it for the next call.
    fn run<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&redb::Database) -> Result<R, redb::Error>,
    ) -> Result<R, StoreError> {
        let mut slot = read_lock(&self.slot);
        if slot.db.is_none() {
            let seen = slot.generation;
            drop(slot);
            self.recover(seen);
            slot = read_lock(&self.slot);
        }
        let Some(db) = &slot.db else {
            return Err(StoreError::Io {
                op,
                reason: "the store file could not be reopened after an I/O error".to_owned(),
            });
        };
        match f(db) {
            Ok(r) => Ok(r),
            Err(e) => {
                let seen = slot.generation;
                drop(slot);
                if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
                    self.recover(seen);
                }
                Err(StoreError::Io {
                    op,
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Closes and reopens the database (unless another caller already did since `seen`).
    fn recover(&self, seen: u64) {
        let Some(reopen) = &self.reopen else {
            return;
        };
        let mut slot = self
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.generation != seen {
            return;
        }
        slot.generation += 1;
        // Close first: the file is locked while it is open.
        slot.db = None;
        match reopen() {
            Ok(db) => {
                tracing::warn!("Store reopened after an I/O error.");
                slot.db = Some(db);
            }
            Err(reason) => {
                tracing::error!(%reason, "Reopening the store failed; the next call retries.");
            }
        }
    }

    /// Every stored device.
    pub fn load_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.load_all(DEVICES)
    }

    /// Writes (inserts or replaces) records in one durable transaction.
    pub fn put_devices(&self, records: &[DeviceRecord]) -> Result<(), StoreError> {
        let rows: Vec<(String, &DeviceRecord)> =
            records.iter().map(|r| (r.device_id.clone(), r)).collect();
        self.put_all(DEVICES, &rows)
    }

    /// Every record of a JSON table, decoded.
    pub fn load_all<T: serde::de::DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Vec<T>, StoreError> {
        decode(self.run("read", |db| read_rows(db, table))?)
    }

    /// Writes `(key, value)` pairs of a JSON table in one durable transaction.
    pub fn put_all<T: Serialize>(
        &self,
        table: Table,
        rows: &[(String, T)],
    ) -> Result<(), StoreError> {
        let rows = encode(rows)?;
        self.run("write", |db| write_rows(db, table, &rows, false))
    }

    /// Replaces a JSON table's whole content in one durable transaction.
    pub fn replace_all<T: Serialize>(
        &self,
        table: Table,
        rows: &[(String, T)],
    ) -> Result<(), StoreError> {
        let rows = encode(rows)?;
        self.run("write", |db| write_rows(db, table, &rows, true))
    }

    /// Deletes a device record and its usage counters (absent is fine).
    pub fn delete_device(&self, device_id: &str) -> Result<(), StoreError> {
        // Usage keys are `device/benefit/kind`; device ids never contain `/`.
        let prefix = format!("{device_id}/");
        self.run("write", |db| {
            let txn = db.begin_write()?;
            txn.open_table(DEVICES)?.remove(device_id)?;
            {
                let mut usage = txn.open_table(USAGE)?;
                let keys: Vec<String> = usage
                    .range(prefix.as_str()..)?
                    .map_while(|row| {
                        let (k, _) = row.ok()?;
                        let k = k.value();
                        k.starts_with(&prefix).then(|| k.to_owned())
                    })
                    .collect();
                for k in keys {
                    usage.remove(k.as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
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

    /// Credentials stored before serials existed still load (as serial 0), and a serial
    /// survives a round trip.
    #[test]
    fn credential_serials_are_optional_in_stored_records() {
        let (_, hash) = policy::credential::DeviceSecret::generate([1; 32], [2; 16]);
        let unserialled = CredentialRecord::Secret {
            kid: "s1".into(),
            hash,
            created_at: 5,
            serial: 0,
        };
        let old = serde_json::to_string(&unserialled).unwrap();
        assert!(!old.contains("serial"), "the pre-serial format: {old}");
        let r: CredentialRecord = serde_json::from_str(&old).unwrap();
        assert_eq!((r.kid(), r.serial()), ("s1", 0));
        let json = r#"{"type":"public_key","kid":"k","algorithm":"ES256","public_key_pem":"x","created_at":5,"serial":77}"#;
        let r: CredentialRecord = serde_json::from_str(json).unwrap();
        assert_eq!(r.serial(), 77);
        assert!(
            serde_json::to_string(&r)
                .unwrap()
                .contains(r#""serial":77"#)
        );
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

    /// Deleting a device deletes its usage rows, and only its own (`d1/` is not `d10/`).
    #[test]
    fn deleting_a_device_deletes_its_usage() {
        let s = Store::open(":memory:").unwrap();
        s.put_devices(&[rec("d1", 0), rec("d10", 0)]).unwrap();
        let rows: Vec<(String, serde_json::Value)> = [
            "d1/llm_tokens/periodic",
            "d1/requests/cumulative",
            "d10/llm_tokens/periodic",
            "d0/x/y",
        ]
        .iter()
        .map(|k| ((*k).to_owned(), serde_json::json!({"key": k})))
        .collect();
        s.put_all(USAGE, &rows).unwrap();
        s.delete_device("d1").unwrap();
        let left: Vec<serde_json::Value> = s.load_all(USAGE).unwrap();
        let keys: Vec<&str> = left.iter().filter_map(|v| v["key"].as_str()).collect();
        assert_eq!(keys, ["d0/x/y", "d10/llm_tokens/periodic"]);
        assert_eq!(s.load_devices().unwrap(), vec![rec("d10", 0)]);
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

    /// A backend whose writes fail while `fail` is set, like a full or failing disk.
    #[derive(Debug)]
    struct Flaky {
        inner: std::sync::Arc<redb::backends::InMemoryBackend>,
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    /// redb refuses every transaction after an I/O error until reopened: the store reopens
    /// itself, so writes work again as soon as the disk does, and nothing committed is lost.
    #[test]
    fn writes_recover_after_an_io_error() {
        let mem = std::sync::Arc::new(redb::backends::InMemoryBackend::new());
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener = {
            let (mem, fail) = (mem.clone(), fail.clone());
            move || {
                let backend = Flaky {
                    inner: mem.clone(),
                    fail: fail.clone(),
                };
                let db = redb::Builder::new()
                    .create_with_backend(backend)
                    .map_err(|e| e.to_string())?;
                create_tables(&db).map_err(|e| e.to_string())?;
                Ok(db)
            }
        };
        let s = Store::with(opener().unwrap(), Some(Box::new(opener.clone())));
        s.put_devices(&[rec("a", 0)]).unwrap();

        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = s.put_devices(&[rec("b", 0)]).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        // Still failing: the reopen (or the write after it) fails too, with a clear error.
        assert!(s.put_devices(&[rec("c", 0)]).is_err());
        assert!(s.delete_device("a").is_err());

        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        s.put_devices(&[rec("d", 0)]).unwrap();
        let mut ids: Vec<String> = s
            .load_devices()
            .unwrap()
            .into_iter()
            .map(|r| r.device_id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["a", "d"]);
    }
}
