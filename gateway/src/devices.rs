//! The device registry: every registered device and its token state, in memory.
//!
//! Sharded `RwLock<HashMap>`s keep lookups on the hot path short and uncontended; no lock is
//! ever held across an `.await`. Revocation bumps a device's token generation (an atomic), so
//! every node-local check sees it on the next request with no I/O.
//!
//! Open WebSocket sessions learn about revocations through one registry-wide *epoch*
//! (`watch` channel) bumped by every revoke, disable and delete: each session wakes, re-checks
//! its own device (one map lookup) and closes if its token no longer holds. Revocations are
//! rare, so a wake-up of every session per revocation is cheaper than a channel per device.
//! Quota rule changes bump the same epoch ([`DeviceRegistry::session_checks`] hands the
//! quotas a sender): a `/v1/chat` session then also re-checks whether its device's rules
//! charge session time. One channel for both keeps one waiting future per session.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use policy::credential::DevicePublicKey;
use policy::ids::DeviceId;
use policy::token::DeviceStatus;

use crate::store::CredentialRecord;
use serde::Serialize;

const SHARDS: usize = 64;

/// One registered device.
#[derive(Debug)]
pub struct Device {
    pub id: DeviceId,
    pub labels: RwLock<BTreeMap<String, String>>,
    pub enabled: AtomicBool,
    pub generation: AtomicU64,
    /// Unix seconds.
    pub created_at: u64,
    /// Immutable snapshot, replaced as a whole on change (readers clone the `Arc`).
    pub credentials: RwLock<Arc<CredentialSet>>,
}

/// Most credentials one device may hold.
pub const MAX_CREDENTIALS: usize = 10;

/// The credential a token was obtained through: its `kid`, and the serial that tells it apart
/// from an earlier credential with the same `kid` (deleted, then added again: the new one must
/// not revive the old one's tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRef {
    pub kid: Arc<str>,
    pub serial: u64,
}

impl CredentialRef {
    /// How tokens obtained through `record` name it.
    pub fn of(record: &CredentialRecord) -> CredentialRef {
        CredentialRef {
            kid: Arc::from(record.kid()),
            serial: record.serial(),
        }
    }
}

/// A fresh random identity number below 2^53 (exact as a Lua/JSON number; never 0, the value
/// of records made before these numbers were random).
///
/// Used for a new device's first token generation, so that a device deleted and registered
/// again under the same id does not accept the tokens of its earlier life (they carry that
/// life's generation), and for credential serials ([`CredentialRef`]).
pub fn fresh_identity() -> u64 {
    (rand::random::<u64>() >> 11).max(1)
}

/// A device's credentials: stored records plus parsed public keys.
#[derive(Debug, Default)]
pub struct CredentialSet {
    records: Vec<CredentialRecord>,
    keys: Vec<DevicePublicKey>,
}

impl CredentialSet {
    /// Builds the set, parsing public keys; records whose key no longer parses are reported.
    pub fn new(records: Vec<CredentialRecord>) -> (CredentialSet, Vec<String>) {
        let mut keys = Vec::new();
        let mut bad = Vec::new();
        let mut kept = Vec::new();
        for r in records {
            if let CredentialRecord::PublicKey {
                kid,
                algorithm,
                public_key_pem,
                ..
            } = &r
            {
                match DevicePublicKey::parse(kid, *algorithm, public_key_pem) {
                    Ok(k) => keys.push(k),
                    Err(e) => {
                        bad.push(format!("{kid}: {e}"));
                        continue;
                    }
                }
            }
            kept.push(r);
        }
        (
            CredentialSet {
                records: kept,
                keys,
            },
            bad,
        )
    }

    pub fn records(&self) -> &[CredentialRecord] {
        &self.records
    }

    pub fn key(&self, kid: &str) -> Option<&DevicePublicKey> {
        self.keys.iter().find(|k| k.kid() == kid)
    }

    /// Whether credential `c` (the same `kid` *and* serial) is still here.
    pub fn contains(&self, c: &CredentialRef) -> bool {
        self.records
            .iter()
            .any(|r| r.kid() == &*c.kid && r.serial() == c.serial)
    }

    /// The credential of `kid`, as a token obtained through it names it.
    pub fn reference(&self, kid: &str) -> Option<CredentialRef> {
        self.records
            .iter()
            .find(|r| r.kid() == kid)
            .map(CredentialRef::of)
    }

    /// Every secret credential, with its hash.
    pub fn secrets(
        &self,
    ) -> impl Iterator<Item = (CredentialRef, &policy::credential::SecretHash)> {
        self.records.iter().filter_map(|r| match r {
            CredentialRecord::Secret { hash, .. } => Some((CredentialRef::of(r), hash)),
            CredentialRecord::PublicKey { .. } => None,
        })
    }
}

/// The admin API's view of a device (credential ids and types, never secrets).
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
    pub enabled: bool,
    pub created_at: u64,
    pub credentials: Vec<CredentialView>,
}

/// A credential as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct CredentialView {
    pub kid: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<&'static str>,
    pub created_at: u64,
}

impl From<&CredentialRecord> for CredentialView {
    fn from(r: &CredentialRecord) -> CredentialView {
        match r {
            CredentialRecord::PublicKey {
                kid,
                algorithm,
                created_at,
                ..
            } => CredentialView {
                kid: kid.clone(),
                kind: "public_key",
                algorithm: Some(algorithm.as_str()),
                created_at: *created_at,
            },
            CredentialRecord::Secret {
                kid, created_at, ..
            } => CredentialView {
                kid: kid.clone(),
                kind: "secret",
                algorithm: None,
                created_at: *created_at,
            },
        }
    }
}

impl Device {
    /// The stored form of this device.
    pub fn record(&self) -> crate::store::DeviceRecord {
        crate::store::DeviceRecord {
            device_id: self.id.to_string(),
            labels: self.labels.read().map(|l| l.clone()).unwrap_or_default(),
            enabled: self.enabled.load(Ordering::Acquire),
            generation: self.generation.load(Ordering::Acquire),
            created_at: self.created_at,
            credentials: self.credentials().records().to_vec(),
        }
    }

    /// The current credential snapshot.
    pub fn credentials(&self) -> Arc<CredentialSet> {
        crate::locks::snapshot(&self.credentials)
    }

    /// Status as seen by a token obtained through credential `cred` (`None`: admin-minted).
    pub fn status_for(&self, cred: Option<&CredentialRef>) -> DeviceStatus {
        DeviceStatus {
            enabled: self.enabled.load(Ordering::Acquire),
            generation: self.generation.load(Ordering::Acquire),
            credential_present: cred.is_none_or(|c| self.credentials().contains(c)),
        }
    }

    pub fn view(&self) -> DeviceView {
        DeviceView {
            device_id: self.id.to_string(),
            labels: self.labels.read().map(|l| l.clone()).unwrap_or_default(),
            enabled: self.enabled.load(Ordering::Acquire),
            created_at: self.created_at,
            credentials: self
                .credentials()
                .records()
                .iter()
                .map(CredentialView::from)
                .collect(),
        }
    }
}

/// Outcome of a registration.
#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    Created,
    AlreadyExists,
}

#[derive(Debug)]
pub struct DeviceRegistry {
    shards: Vec<RwLock<HashMap<DeviceId, Arc<Device>>>>,
    hasher: std::collections::hash_map::RandomState,
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Default for DeviceRegistry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            epoch: tokio::sync::watch::channel(0).0,
        }
    }
}

impl DeviceRegistry {
    fn shard(&self, id: &DeviceId) -> &RwLock<HashMap<DeviceId, Arc<Device>>> {
        &self.shards[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    pub fn get(&self, id: &DeviceId) -> Option<Arc<Device>> {
        let shard = self.shard(id).read().unwrap_or_else(|p| p.into_inner());
        shard.get(id).cloned()
    }

    /// Registers a device; an existing device is left untouched.
    pub fn register(
        &self,
        id: DeviceId,
        labels: BTreeMap<String, String>,
        now: u64,
    ) -> (Arc<Device>, Registered) {
        let mut shard = self.shard(&id).write().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = shard.get(&id) {
            return (d.clone(), Registered::AlreadyExists);
        }
        let d = Arc::new(Device {
            id: id.clone(),
            labels: RwLock::new(labels),
            enabled: AtomicBool::new(true),
            generation: AtomicU64::new(fresh_identity()),
            created_at: now,
            credentials: RwLock::new(Arc::new(CredentialSet::default())),
        });
        shard.insert(id, d.clone());
        (d, Registered::Created)
    }

    /// Loads a stored device (start-up). Invalid stored ids are reported, not loaded.
    pub fn restore(&self, r: crate::store::DeviceRecord) -> Result<(), policy::ids::DeviceIdError> {
        let id = DeviceId::parse(&r.device_id)?;
        let (creds, bad) = CredentialSet::new(r.credentials);
        for b in bad {
            tracing::warn!(device_id = %id, credential = %b, "Skipping a stored credential that no longer parses.");
        }
        let d = Arc::new(Device {
            credentials: RwLock::new(Arc::new(creds)),
            id: id.clone(),
            labels: RwLock::new(r.labels),
            enabled: AtomicBool::new(r.enabled),
            generation: AtomicU64::new(r.generation),
            created_at: r.created_at,
        });
        self.shard(&id)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, d);
        Ok(())
    }

    /// Makes the registry hold `r` (cluster mode: a device as Redis has it now). An existing
    /// device is updated in place; open sessions are told to re-check when its tokens may
    /// have lost validity (generation, enabled or credentials changed). Invalid ids are
    /// ignored (with a warning).
    pub fn upsert(&self, r: crate::store::DeviceRecord) {
        let Ok(id) = DeviceId::parse(&r.device_id) else {
            tracing::warn!(device_id = %r.device_id, "Ignoring a shared device with an invalid id.");
            return;
        };
        let Some(d) = self.get(&id) else {
            let _ = self.restore(r);
            return;
        };
        *d.labels.write().unwrap_or_else(|p| p.into_inner()) = r.labels;
        let gen_changed = d.generation.swap(r.generation, Ordering::AcqRel) != r.generation;
        let was_enabled = d.enabled.swap(r.enabled, Ordering::AcqRel);
        let creds_changed = d.credentials().records() != r.credentials.as_slice();
        if creds_changed {
            let (set, bad) = CredentialSet::new(r.credentials);
            for b in bad {
                tracing::warn!(device_id = %id, credential = %b, "Skipping a shared credential that does not parse.");
            }
            *d.credentials.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        }
        if gen_changed || (was_enabled && !r.enabled) || creds_changed {
            self.bump_epoch();
        }
    }

    /// Makes the registry hold exactly `records` (cluster mode full reload): upserts each and
    /// removes devices that are no longer there.
    pub fn replace_all(&self, records: Vec<crate::store::DeviceRecord>) {
        let keep: std::collections::HashSet<String> =
            records.iter().map(|r| r.device_id.clone()).collect();
        for r in records {
            self.upsert(r);
        }
        let mut removed = false;
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            shard.retain(|id, _| keep.contains(id.as_str()));
            removed |= shard.len() != before;
        }
        if removed {
            self.bump_epoch();
        }
    }

    /// A receiver that changes whenever open sessions must re-check themselves: some
    /// device's tokens may have been revoked, or the quota rules changed.
    pub fn watch_session_checks(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// A sender of the same epoch, for the quotas (rule changes).
    pub fn session_checks(&self) -> tokio::sync::watch::Sender<u64> {
        self.epoch.clone()
    }

    fn bump_epoch(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Deletes a device; its tokens stop working at once.
    pub fn remove(&self, id: &DeviceId) -> Option<Arc<Device>> {
        let removed = self
            .shard(id)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if removed.is_some() {
            self.bump_epoch();
        }
        removed
    }

    /// Up to `limit` devices with ids greater than `after`, in id order.
    ///
    /// # Cost
    /// One pass over every shard per page (O(n) with a small constant, no sort of the whole
    /// registry): fine for admin paging; not a hot-path operation.
    pub fn list(&self, after: Option<&DeviceId>, limit: usize) -> Vec<Arc<Device>> {
        let mut page: std::collections::BTreeMap<DeviceId, Arc<Device>> =
            std::collections::BTreeMap::new();
        for shard in &self.shards {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            for (id, d) in shard.iter() {
                if after.is_some_and(|a| id <= a) {
                    continue;
                }
                if page.len() < limit {
                    page.insert(id.clone(), d.clone());
                } else if let Some(last) = page.keys().next_back().cloned()
                    && *id < last
                {
                    page.remove(&last);
                    page.insert(id.clone(), d.clone());
                }
            }
        }
        page.into_values().collect()
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
