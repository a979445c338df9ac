//! The device registry: every registered device and its token state, in memory.
//!
//! Sharded `RwLock<HashMap>`s keep lookups on the hot path short and uncontended; no lock is
//! ever held across an `.await`. Revocation bumps a device's token generation (an atomic), so
//! every node-local check sees it on the next request with no I/O.

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
}

impl Default for DeviceRegistry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
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
