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

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use policy::ids::DeviceId;
use policy::token::DeviceStatus;
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
}

/// The admin API's view of a device.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
    pub enabled: bool,
    pub created_at: u64,
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
        }
    }

    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            enabled: self.enabled.load(Ordering::Acquire),
            generation: self.generation.load(Ordering::Acquire),
            credential_present: true,
        }
    }

    pub fn view(&self) -> DeviceView {
        DeviceView {
            device_id: self.id.to_string(),
            labels: self.labels.read().map(|l| l.clone()).unwrap_or_default(),
            enabled: self.enabled.load(Ordering::Acquire),
            created_at: self.created_at,
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
            generation: AtomicU64::new(0),
            created_at: now,
        });
        shard.insert(id, d.clone());
        (d, Registered::Created)
    }

    /// Loads a stored device (start-up). Invalid stored ids are reported, not loaded.
    pub fn restore(&self, r: crate::store::DeviceRecord) -> Result<(), policy::ids::DeviceIdError> {
        let id = DeviceId::parse(&r.device_id)?;
        let d = Arc::new(Device {
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

    /// A receiver that changes whenever some device's tokens may have been revoked.
    pub fn watch_revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    fn bump_epoch(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Invalidates every token the device holds now. `None` if unknown.
    pub fn revoke(&self, id: &DeviceId) -> Option<Arc<Device>> {
        let d = self.get(id)?;
        d.generation.fetch_add(1, Ordering::AcqRel);
        self.bump_epoch();
        Some(d)
    }

    /// Enables or disables a device. Disabling also revokes its outstanding tokens, so
    /// re-enabling does not bring old tokens back.
    pub fn set_enabled(&self, id: &DeviceId, enabled: bool) -> Option<Arc<Device>> {
        let d = self.get(id)?;
        let was = d.enabled.swap(enabled, Ordering::AcqRel);
        if was && !enabled {
            d.generation.fetch_add(1, Ordering::AcqRel);
            self.bump_epoch();
        }
        Some(d)
    }

    /// Replaces a device's labels.
    pub fn set_labels(
        &self,
        id: &DeviceId,
        labels: BTreeMap<String, String>,
    ) -> Option<Arc<Device>> {
        let d = self.get(id)?;
        *d.labels.write().unwrap_or_else(|p| p.into_inner()) = labels;
        Some(d)
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
