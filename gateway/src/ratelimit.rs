//! Request rate limits (GCRA, `policy::credential::RateLimiter`), each answered 429 / 4013 with
//! `Retry-After` before the quota hold and before anything goes upstream:
//! - per device, across all routes (`device_rps`);
//! - per device on one route class (`[rate_limits.routes.<class>]`);
//! - fleet-wide per route class, shared fairly between devices (`policy::fleet`): the Coze
//!   plan's `api_run_qps` for chat (voice sessions count as chat) and workflow, or the
//!   config's caps. In a cluster each node enforces `⌈cap / live nodes⌉`
//!   ([`crate::cluster::members`]), so the nodes together send at most the cap plus one per
//!   node, if the load balancer spreads devices evenly.
//!
//! # Approximation
//! The per-device limiters track at most `max_tracked_devices` devices each; beyond that the
//! devices idle longest are forgotten and get a fresh burst (fails open; see the limiter's
//! docs). Fleet fairness tracks as many devices per second and fails open beyond them too;
//! the fleet cap itself always holds.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use policy::credential::RateLimiter;
use policy::decision::{Denial, DenyReason};
use policy::fleet::{FleetLimiter, FleetRefusal};
use policy::ids::DeviceId;
use policy::route::RouteClass;

use crate::config::{RateLimitSettings, RouteRate};

type Shared<K> = Arc<Mutex<RateLimiter<K>>>;

/// A per-device limiter with the settings it was built from, so a reload that leaves them
/// unchanged keeps its state (a reload must not hand every device a fresh burst).
#[derive(Clone)]
struct PerDevice {
    limiter: Option<Shared<DeviceId>>,
    settings: (RouteRate, usize),
}

impl PerDevice {
    fn new(rate: RouteRate, keys: usize) -> PerDevice {
        let limiter = NonZeroU32::new(rate.rps).map(|rps| {
            let burst = NonZeroU32::new(rate.burst).unwrap_or(rps);
            let keys = NonZeroUsize::new(keys).unwrap_or(NonZeroUsize::MIN);
            Arc::new(Mutex::new(RateLimiter::new(rps, burst, keys)))
        });
        PerDevice {
            limiter,
            settings: (rate, keys),
        }
    }

    /// This limiter if `next` has the same settings, else `next`.
    fn kept_for(&self, next: PerDevice) -> PerDevice {
        if next.settings == self.settings {
            self.clone()
        } else {
            next
        }
    }

    fn check(&self, device: &DeviceId, now_ms: u64) -> Result<(), Denial> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
        l.check(device, now_ms)
            .map_err(|r| rate_limited("rate limited", r.secs_ceil()))
    }
}

fn rate_limited(msg: &'static str, retry_after_s: u64) -> Denial {
    Denial::new(DenyReason::RateLimited, msg).retry_after(retry_after_s.max(1))
}

/// One fleet-wide cap (a route class's), and what it is made of.
struct Fleet {
    limiter: Mutex<Option<FleetLimiter<DeviceId>>>,
    /// The config's cap (0: none; it wins over the plan's).
    configured: u32,
    /// The plan's QPS as last synced (0: not known), kept across reloads.
    plan: AtomicU32,
}

impl Fleet {
    fn new(configured: u32) -> Fleet {
        Fleet {
            limiter: Mutex::new(None),
            configured,
            plan: AtomicU32::new(0),
        }
    }

    /// Rebuilds the limiter if this node's share of the cap changed (a rebuild starts a fresh
    /// bucket, so it happens only on a change).
    fn refresh(&self, nodes: u32, keys: usize) {
        let cap = match self.configured {
            0 => self.plan.load(Ordering::Relaxed),
            c => c,
        };
        let share = NonZeroU32::new(cap.div_ceil(nodes.max(1)));
        let mut slot = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().map(FleetLimiter::rate) != share.map(NonZeroU32::get) {
            let keys = NonZeroUsize::new(keys).unwrap_or(NonZeroUsize::MIN);
            *slot = share.map(|rate| FleetLimiter::new(rate, keys));
        }
    }

    fn check(&self, device: &DeviceId, now_ms: u64) -> Result<(), Denial> {
        let mut l = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = l.as_mut() else { return Ok(()) };
        l.check(device, now_ms).map_err(|refusal| {
            let msg = match refusal {
                FleetRefusal::Cap(_) => "rate limited: the fleet's request rate is spent",
                FleetRefusal::OverShare(_) => {
                    "rate limited: the fleet is busy and this device had its share"
                }
            };
            rate_limited(msg, refusal.retry_after().secs_ceil())
        })
    }
}

pub struct RateLimits {
    per_device: PerDevice,
    /// `[rate_limits.routes]`, indexed by `RouteClass as usize`.
    per_route: Vec<PerDevice>,
    fleet_chat: Fleet,
    fleet_workflow: Fleet,
    /// Live nodes sharing the fleet caps (cluster mode; 1 on a single node).
    nodes: AtomicU32,
    max_tracked: usize,
}

impl RateLimits {
    pub fn new(s: &RateLimitSettings) -> RateLimits {
        let keys = s.max_tracked_devices;
        let r = RateLimits {
            per_device: PerDevice::new(
                RouteRate {
                    rps: s.device_rps,
                    burst: s.device_burst,
                },
                keys,
            ),
            per_route: RouteClass::ALL
                .iter()
                .map(|class| PerDevice::new(s.route(*class), keys))
                .collect(),
            fleet_chat: Fleet::new(s.fleet_chat_qps),
            fleet_workflow: Fleet::new(s.fleet_workflow_qps),
            nodes: AtomicU32::new(1),
            max_tracked: keys,
        };
        r.refresh_fleet();
        r
    }

    /// The limits of new settings (a reload), keeping what the running ones learned: the
    /// plan's QPS (until the next sync), the number of live nodes, and the per-device
    /// limiters' state where their settings did not change.
    pub fn reconfigured(&self, s: &RateLimitSettings) -> RateLimits {
        let mut next = RateLimits::new(s);
        next.per_device = self.per_device.kept_for(next.per_device);
        next.per_route = self
            .per_route
            .iter()
            .zip(next.per_route)
            .map(|(old, new)| old.kept_for(new))
            .collect();
        for (old, new) in [
            (&self.fleet_chat, &next.fleet_chat),
            (&self.fleet_workflow, &next.fleet_workflow),
        ] {
            new.plan
                .store(old.plan.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        next.nodes
            .store(self.nodes.load(Ordering::Relaxed), Ordering::Relaxed);
        next.refresh_fleet();
        next
    }

    fn refresh_fleet(&self) {
        let nodes = self.nodes.load(Ordering::Relaxed);
        self.fleet_chat.refresh(nodes, self.max_tracked);
        self.fleet_workflow.refresh(nodes, self.max_tracked);
    }

    /// Applies the plan's QPS (from the upstream's `benefits/get`) where the config sets no cap.
    pub fn set_plan_qps(&self, class: RouteClass, qps: u32) {
        let fleet = match class {
            RouteClass::Chat => &self.fleet_chat,
            RouteClass::Workflow => &self.fleet_workflow,
            _ => return,
        };
        fleet.plan.store(qps, Ordering::Relaxed);
        fleet.refresh(self.nodes.load(Ordering::Relaxed), self.max_tracked);
    }

    /// How many nodes share the fleet caps (cluster membership; at least 1).
    pub fn set_nodes(&self, nodes: u32) {
        let nodes = nodes.max(1);
        if self.nodes.swap(nodes, Ordering::Relaxed) != nodes {
            self.refresh_fleet();
        }
    }

    /// Checks (and spends) one request of `device` on a route of `class`.
    pub fn admit(&self, device: &DeviceId, class: RouteClass, now_ms: u64) -> Result<(), Denial> {
        self.per_device.check(device, now_ms)?;
        if let Some(route) = self.per_route.get(class as usize) {
            route.check(device, now_ms)?;
        }
        match class {
            RouteClass::Chat | RouteClass::Voice => self.fleet_chat.check(device, now_ms),
            RouteClass::Workflow => self.fleet_workflow.check(device, now_ms),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(device_rps: u32, fleet_chat_qps: u32) -> RateLimitSettings {
        RateLimitSettings {
            device_rps,
            device_burst: device_rps,
            fleet_chat_qps,
            fleet_workflow_qps: 0,
            max_tracked_devices: 100,
            routes: Vec::new(),
        }
    }

    /// How many of `n` chat requests at one instant `r` admits, each from another device.
    fn admitted(r: &RateLimits, n: usize, now_ms: u64) -> usize {
        (0..n)
            .filter(|i| {
                let d = DeviceId::parse(&format!("d{i}")).unwrap();
                r.admit(&d, RouteClass::Chat, now_ms).is_ok()
            })
            .count()
    }

    /// A reload keeps the synced plan QPS (it used to drop it until the next sync) unless the
    /// config now sets its own cap, and keeps each device's spent burst when the per-device
    /// settings are unchanged.
    #[test]
    fn a_reload_keeps_what_sync_and_traffic_taught() {
        let r = RateLimits::new(&settings(2, 0));
        r.set_plan_qps(RouteClass::Chat, 2);
        assert_eq!(admitted(&r, 6, 0), 2);
        let next = r.reconfigured(&settings(2, 0));
        assert_eq!(admitted(&next, 6, 10_000), 2, "the plan cap survives");
        let capped = r.reconfigured(&settings(2, 4));
        assert_eq!(admitted(&capped, 6, 20_000), 4, "the config's cap wins");

        let d = DeviceId::parse("busy").unwrap();
        let r = RateLimits::new(&settings(2, 0));
        assert!(r.admit(&d, RouteClass::Other, 0).is_ok());
        assert!(r.admit(&d, RouteClass::Other, 0).is_ok());
        let same = r.reconfigured(&settings(2, 0));
        assert!(same.admit(&d, RouteClass::Other, 0).is_err(), "burst spent");
        let changed = r.reconfigured(&settings(3, 0));
        assert!(
            changed.admit(&d, RouteClass::Other, 0).is_ok(),
            "new settings, new limiter"
        );
    }

    /// `[rate_limits.routes]` limits one route class per device, apart from the others, and a
    /// reload keeps an unchanged route's state.
    #[test]
    fn route_rates_limit_one_class_per_device() {
        for (i, class) in RouteClass::ALL.iter().enumerate() {
            assert_eq!(*class as usize, i, "per_route is indexed by `as usize`");
        }
        let mut s = settings(0, 0);
        s.routes = vec![(RouteClass::Chat, RouteRate { rps: 1, burst: 2 })];
        let r = RateLimits::new(&s);
        let (a, b) = (DeviceId::parse("a").unwrap(), DeviceId::parse("b").unwrap());
        assert!(r.admit(&a, RouteClass::Chat, 0).is_ok());
        assert!(r.admit(&a, RouteClass::Chat, 0).is_ok());
        let refused = r.admit(&a, RouteClass::Chat, 0).unwrap_err();
        assert_eq!(refused.retry_after_s, Some(1));
        assert!(
            r.admit(&a, RouteClass::Other, 0).is_ok(),
            "other classes are free"
        );
        assert!(
            r.admit(&b, RouteClass::Chat, 0).is_ok(),
            "other devices are free"
        );
        assert!(
            r.admit(&a, RouteClass::Chat, 1000).is_ok(),
            "refills at 1/s"
        );

        let same = r.reconfigured(&s);
        assert!(
            same.admit(&a, RouteClass::Chat, 1000).is_err(),
            "state kept"
        );
        s.routes[0].1.burst = 3;
        let changed = r.reconfigured(&s);
        assert!(changed.admit(&a, RouteClass::Chat, 1000).is_ok());
    }

    /// In a cluster each node takes its share of the fleet cap, rounded up; a node count that
    /// does not change keeps the bucket.
    #[test]
    fn nodes_split_the_fleet_cap() {
        let r = RateLimits::new(&settings(0, 10));
        assert_eq!(admitted(&r, 30, 0), 10);
        r.set_nodes(3);
        assert_eq!(admitted(&r, 30, 10_000), 4, "ceil(10 / 3)");
        r.set_nodes(3);
        assert_eq!(admitted(&r, 30, 10_000), 0, "same share, same bucket");
        let next = r.reconfigured(&settings(0, 10));
        assert_eq!(
            admitted(&next, 30, 20_000),
            4,
            "a reload keeps the node count"
        );
        r.set_nodes(0);
        assert_eq!(admitted(&r, 30, 30_000), 10, "never fewer than one node");
        r.set_plan_qps(RouteClass::Chat, 100);
        assert_eq!(
            admitted(&r, 30, 40_000),
            10,
            "the config's cap wins over the plan's"
        );
    }
}
