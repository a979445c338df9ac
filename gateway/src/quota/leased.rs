//! Cluster mode: admission against quota leases from Redis (the Redis side and its formulas
//! are in `cluster::leases`).
//!
//! The node's `QuotaLedger` runs in leased mode: a request is admitted while the device's
//! holds fit the lease this node holds for each applicable rule. When they do not, the node
//! asks Redis for what the new hold needs plus `lease_size − 1` units of headroom
//! ([`Quotas::admit`]), and retries; the device is refused only when Redis has nothing left.
//! Every `quota.persist_interval` the node reports the counters that changed (absolute
//! figures), gives back leases idle for `lease_idle`, and every `lease_ttl / 3` heartbeats the
//! leases it still holds ([`Quotas::report`]).
//!
//! # Redis unreachable
//! Per benefit type, `[store.redis] degraded_allowance`:
//! - **listed** (degraded): the node spends the leases it holds, then up to the allowance per
//!   device and counter on its own authority. The allowance is marked in the ledger (`allow`)
//!   and reported when Redis is back, so Redis counts it as granted: nothing is lost or counted
//!   twice, and the overshoot is at most `allowance × nodes` per device for the outage.
//! - **unlisted** (fail closed, the default): admission answers 503 / 5000 with `Retry-After:
//!   1` while Redis is unreachable, even when a held lease would cover it (a node cut off for
//!   longer than `lease_ttl` is presumed dead and its lease re-granted elsewhere).
//!
//! While Redis is marked down no request waits on it: admissions decide from the ledger alone,
//! and the report tick probes Redis (one `PING` per tick) until it answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use policy::decision::{Denial, DenyReason};
use policy::ids::DeviceId;
use policy::quota::{BenefitType, Consumption, LeaseWant, RuleKind, RuleSet, UsageItem};
use policy::route::RouteClass;

use super::Quotas;
use crate::cluster::{Cluster, ClusterError};
use crate::locks::lock;

/// Most counters given a degraded allowance per outage; beyond, those benefits fail closed.
const MAX_DEGRADED: usize = 100_000;

/// Lease requests per admission: concurrent requests of one device on this node can spend
/// each other's fresh grant, so a refused retry asks again (bounded).
const TOP_UP_ROUNDS: usize = 3;

/// Top-up locks (devices hash onto them; a collision only serializes two devices' top-ups).
const STRIPES: usize = 256;

/// Idle leases are given back at most this often (the scan is O(counters)).
const RELEASE_EVERY_MS: u64 = 1_000;

type CounterKey = (DeviceId, BenefitType, RuleKind, u64);

/// The node's lease bookkeeping besides the ledger.
pub struct Leasing {
    cluster: Arc<Cluster>,
    /// Degraded allowances handed out in the current outage (cleared once Redis has them).
    degraded: Mutex<HashMap<CounterKey, u64>>,
    next_release_ms: AtomicU64,
    next_heartbeat_ms: AtomicU64,
    /// A report failed: Redis may have lost writes, so heartbeat every lease on the next success.
    resync: AtomicBool,
    /// Top-up locks, by device hash.
    stripes: Box<[tokio::sync::Mutex<()>]>,
    hasher: std::hash::RandomState,
}

impl Leasing {
    fn stripe(&self, device: &DeviceId) -> &tokio::sync::Mutex<()> {
        use std::hash::BuildHasher;
        let i = self.hasher.hash_one(device) as usize % self.stripes.len();
        &self.stripes[i]
    }

    fn lease_size(&self, b: BenefitType) -> u64 {
        self.cluster
            .settings
            .lease_size
            .get(&b)
            .copied()
            .unwrap_or(1)
            .max(1)
    }

    fn unavailable() -> Denial {
        Denial::new(
            DenyReason::QuotaUnavailable,
            "quota service temporarily unavailable; retry",
        )
        .retry_after(1)
    }

    /// Redis down: refuses the device when one of its applicable rules fails closed.
    fn fail_closed(&self, rules: &RuleSet, device: &DeviceId, now_s: u64) -> Result<(), Denial> {
        let allowances = &self.cluster.settings.degraded_allowance;
        if rules
            .applicable(device, now_s)
            .any(|r| !allowances.contains_key(&r.benefit_type))
        {
            return Err(Self::unavailable());
        }
        Ok(())
    }

    /// Redis down: up to `amount` units of the benefit's degraded allowance.
    fn allowance(&self, device: &DeviceId, w: &LeaseWant, amount: u64) -> Result<u64, Denial> {
        let Some(&cap) = self
            .cluster
            .settings
            .degraded_allowance
            .get(&w.benefit_type)
        else {
            return Err(Self::unavailable());
        };
        let mut given = lock(&self.degraded);
        let key = (device.clone(), w.benefit_type, w.kind, w.window_start);
        if !given.contains_key(&key) && given.len() >= MAX_DEGRADED {
            return Err(Self::unavailable());
        }
        let so_far = given.entry(key).or_insert(0);
        let g = amount.min(cap.saturating_sub(*so_far));
        *so_far += g;
        Ok(g)
    }
}

impl Quotas {
    /// Cluster mode: from now on this node admits against leases from Redis. The ledger starts
    /// empty (this process is a new node; what earlier nodes charged is in Redis).
    pub fn enable_leases(&self, cluster: Arc<Cluster>) {
        let mut l = lock(&self.ledger);
        let mut fresh = policy::quota::QuotaLedger::new(*l.policy());
        fresh.set_leased(true);
        *l = fresh;
        let _ = self.leasing.set(Leasing {
            cluster,
            degraded: Mutex::new(HashMap::new()),
            next_release_ms: AtomicU64::new(0),
            next_heartbeat_ms: AtomicU64::new(0),
            resync: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: std::hash::RandomState::new(),
        });
    }

    /// Whether usage is kept in Redis (cluster mode) rather than the embedded store.
    pub fn leased(&self) -> bool {
        self.leasing.get().is_some()
    }

    /// Admission (REST and WebSocket): [`Quotas::reserve`]; in cluster mode, with more lease
    /// from Redis when the node's leases do not cover the hold.
    pub async fn admit(
        &self,
        request_id: &str,
        device: &DeviceId,
        class: RouteClass,
        now_s: u64,
    ) -> Result<(), Denial> {
        let Some(l) = self.leasing.get() else {
            return self.reserve(request_id, device, class, now_s);
        };
        if !l.cluster.is_up() {
            l.fail_closed(&self.rules(), device, now_s)?;
        }
        match self.reserve(request_id, device, class, now_s) {
            Err(d) if d.reason == DenyReason::QuotaExhausted => {}
            r => return r, // the lease covered it: no Redis, no allocation
        }
        let hold = self.estimate(class);
        // Boxed: keeps the Redis path out of every caller's future (WebSocket sessions are
        // sized per connection).
        Box::pin(self.with_leases(l, device, Some(&hold), now_s, || {
            self.reserve(request_id, device, class, now_s)
        }))
        .await
    }

    /// [`Quotas::progress`]; in cluster mode, topping up the leases when they run out.
    pub async fn progress_leased(
        &self,
        request_id: &str,
        so_far: &Consumption,
        device: &DeviceId,
        now_s: u64,
    ) -> Result<(), Denial> {
        let r = self.progress(request_id, so_far, now_s);
        let Some(l) = self.leasing.get() else {
            return r;
        };
        match r {
            Err(d) if d.reason == DenyReason::QuotaExhausted => {}
            r => return r,
        }
        Box::pin(self.with_leases(l, device, None, now_s, || {
            self.progress(request_id, so_far, now_s)
        }))
        .await
    }

    /// Runs `attempt`; when it is refused for quota, asks Redis for more and runs it again.
    /// Top-ups of one device are single-flight on this node (a striped async lock): requests
    /// that waited retry first, and usually find the lease their predecessor fetched.
    async fn with_leases(
        &self,
        l: &Leasing,
        device: &DeviceId,
        hold: Option<&Consumption>,
        now_s: u64,
        attempt: impl Fn() -> Result<(), Denial>,
    ) -> Result<(), Denial> {
        match attempt() {
            Err(d) if d.reason == DenyReason::QuotaExhausted => {}
            r => return r,
        }
        let _one_at_a_time = l.stripe(device).lock().await;
        for _ in 0..TOP_UP_ROUNDS {
            match attempt() {
                Err(d) if d.reason == DenyReason::QuotaExhausted => {
                    if !self.top_up(l, device, hold, now_s).await? {
                        return Err(d);
                    }
                }
                r => return r,
            }
        }
        attempt()
    }

    /// Asks Redis for what the device's holds need (plus `hold` and the lease headroom). Redis
    /// down: the benefit's degraded allowance, or a 503 when it fails closed. `Ok(true)` when
    /// every exhausted counter got at least one more unit.
    async fn top_up(
        &self,
        l: &Leasing,
        device: &DeviceId,
        hold: Option<&Consumption>,
        now_s: u64,
    ) -> Result<bool, Denial> {
        let rules = self.rules();
        let (wants, prices) = {
            let ledger = lock(&self.ledger);
            (
                ledger.wants(&rules, device, now_s, 1),
                ledger.policy().prices,
            )
        };
        if wants.is_empty() {
            return Ok(false);
        }
        let now_ms = crate::state::now_ms();
        let mut covered = true;
        for w in wants {
            let new_hold = hold.map_or(1, |c| c.amount(w.benefit_type, &prices).max(1));
            let amount = w
                .want
                .saturating_add(new_hold - 1)
                .saturating_add(l.lease_size(w.benefit_type) - 1);
            let granted = if l.cluster.is_up() {
                match l.cluster.grant(device, &w, amount, now_ms).await {
                    Ok(g) => Some(g),
                    Err(e) => {
                        l.cluster.count_error("lease");
                        tracing::warn!(error = %e, "Asking Redis for a quota lease failed.");
                        None
                    }
                }
            } else {
                None
            };
            let got = match granted {
                Some(g) => {
                    if g > 0 {
                        lock(&self.ledger).grant(
                            device,
                            w.benefit_type,
                            w.kind,
                            w.window_start,
                            g,
                            now_s,
                        );
                    }
                    g
                }
                None => {
                    let a = l.allowance(device, &w, amount)?;
                    if a > 0 {
                        lock(&self.ledger).allow(
                            device,
                            w.benefit_type,
                            w.kind,
                            w.window_start,
                            a,
                            now_s,
                        );
                    }
                    if a < w.want {
                        // The allowance is spent: the quota may well remain (Redis cannot
                        // say), so this is "retry", not "exhausted".
                        return Err(Leasing::unavailable());
                    }
                    a
                }
            };
            covered &= got >= w.want;
        }
        Ok(covered)
    }

    /// Cluster mode, every `quota.persist_interval`: gives back idle leases, reports changed
    /// counters (and heartbeats held leases) to Redis. Absolute figures: a report that failed
    /// is simply sent again with the current values. `last`: the node is stopping, so every
    /// lease without an open hold goes back first.
    pub async fn report(&self, last: bool) -> Result<usize, ClusterError> {
        let Some(l) = self.leasing.get() else {
            return Ok(0);
        };
        let c = &l.cluster;
        if !c.is_up() {
            // Probe; while Redis is down the report would only time out.
            let _: String = c.run(redis::cmd("PING")).await?;
        }
        let now_ms = crate::state::now_ms();
        let now_s = now_ms / 1000;
        let heartbeat_every = (c.settings.lease_ttl.as_millis() as u64 / 3).max(100);
        let (mut records, dirty_len) = {
            let mut ledger = lock(&self.ledger);
            if last {
                ledger.release_idle(u64::MAX, 0);
            } else if now_ms >= l.next_release_ms.load(Ordering::Relaxed) {
                l.next_release_ms
                    .store(now_ms + RELEASE_EVERY_MS, Ordering::Relaxed);
                ledger.release_idle(now_s, c.settings.lease_idle.as_secs().max(1));
            }
            let dirty = ledger.drain_dirty();
            let n = dirty.len();
            let mut records = dirty;
            if l.resync.load(Ordering::Relaxed)
                || now_ms >= l.next_heartbeat_ms.load(Ordering::Relaxed)
            {
                l.next_heartbeat_ms
                    .store(now_ms + heartbeat_every, Ordering::Relaxed);
                records.extend(ledger.outstanding());
            }
            (records, n)
        };
        if records.is_empty() {
            return Ok(0);
        }
        if let Err(e) = c.report(&records, now_ms).await {
            c.count_error("report");
            l.resync.store(true, Ordering::Relaxed);
            records.truncate(dirty_len);
            lock(&self.ledger).requeue(&records);
            return Err(e);
        }
        if l.resync.swap(false, Ordering::Relaxed) {
            tracing::info!(
                counters = records.len(),
                "Usage counters and leases re-sent to Redis."
            );
        }
        // Redis now knows every allowance given so far: the next outage starts a new budget.
        let mut given = lock(&l.degraded);
        if !given.is_empty() && c.is_up() {
            given.clear();
        }
        Ok(records.len())
    }

    /// The device's rules with used / remaining; in cluster mode `used` adds what the other
    /// nodes charged (from Redis; this node's own figure is its live one). Redis down: this
    /// node's figures only.
    pub async fn usage_shared(&self, device: &DeviceId, now_s: u64) -> Vec<UsageItem> {
        let mut items = self.usage(device, now_s);
        let Some(l) = self.leasing.get() else {
            return items;
        };
        let elsewhere = match l.cluster.used_elsewhere(device).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Reading cluster usage from Redis failed; showing this node's.");
                return items;
            }
        };
        for it in &mut items {
            if let Some(&(w, others)) = elsewhere.get(&(it.benefit_type, it.kind))
                && w == it.window_start
            {
                it.used = it.used.saturating_add(others);
                it.remaining = it.limit.saturating_sub(it.used.saturating_add(it.reserved));
            }
        }
        items
    }
}
