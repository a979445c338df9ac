//! Request rate limits (GCRA, `policy::credential::RateLimiter`): per device across all
//! routes, and fleet-wide per route class (the Coze plan's `api_run_qps` for chat and
//! workflow). A refusal is 429 / 4013 with `Retry-After`, before the quota hold and before
//! anything goes upstream.
//!
//! # Approximation
//! The per-device limiter tracks at most `max_tracked_devices`; beyond that the devices idle
//! longest are forgotten and get a fresh burst (fails open; see the limiter's docs).

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use policy::credential::RateLimiter;
use policy::decision::{Denial, DenyReason};
use policy::ids::DeviceId;
use policy::route::RouteClass;

use crate::config::RateLimitSettings;

pub struct RateLimits {
    /// Shared with the next configuration when a reload leaves its settings unchanged, so a
    /// reload does not hand every device a fresh burst.
    per_device: Option<Arc<Mutex<RateLimiter<DeviceId>>>>,
    per_device_settings: (u32, u32, usize),
    fleet_chat: Mutex<Option<RateLimiter<()>>>,
    fleet_workflow: Mutex<Option<RateLimiter<()>>>,
    /// Fleet caps from the config (they win over the plan's).
    configured_chat: u32,
    configured_workflow: u32,
    /// The plan's QPS as last synced (0: not known), kept across reloads.
    plan_chat: AtomicU32,
    plan_workflow: AtomicU32,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(
    rate: u32,
    burst: u32,
    keys: usize,
) -> Option<Arc<Mutex<RateLimiter<K>>>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    let keys = NonZeroUsize::new(keys).unwrap_or(NonZeroUsize::MIN);
    Some(Arc::new(Mutex::new(RateLimiter::new(rate, burst, keys))))
}

fn check_fleet(l: &Mutex<Option<RateLimiter<()>>>, now_ms: u64) -> Result<(), Denial> {
    let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
    let Some(l) = l.as_mut() else { return Ok(()) };
    l.check(&(), now_ms).map_err(|r| {
        Denial::new(DenyReason::RateLimited, "rate limited").retry_after(r.secs_ceil().max(1))
    })
}

fn fleet(qps: u32) -> Option<RateLimiter<()>> {
    let rate = NonZeroU32::new(qps)?;
    Some(RateLimiter::new(rate, rate, NonZeroUsize::MIN))
}

fn check<K: std::hash::Hash + Eq + Clone>(
    l: &Option<Arc<Mutex<RateLimiter<K>>>>,
    key: &K,
    now_ms: u64,
) -> Result<(), Denial> {
    let Some(l) = l else { return Ok(()) };
    let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
    l.check(key, now_ms).map_err(|r| {
        Denial::new(DenyReason::RateLimited, "rate limited").retry_after(r.secs_ceil().max(1))
    })
}

impl RateLimits {
    pub fn new(s: &RateLimitSettings) -> RateLimits {
        RateLimits {
            per_device: limiter(s.device_rps, s.device_burst, s.max_tracked_devices),
            per_device_settings: (s.device_rps, s.device_burst, s.max_tracked_devices),
            fleet_chat: Mutex::new(fleet(s.fleet_chat_qps)),
            fleet_workflow: Mutex::new(fleet(s.fleet_workflow_qps)),
            configured_chat: s.fleet_chat_qps,
            configured_workflow: s.fleet_workflow_qps,
            plan_chat: AtomicU32::new(0),
            plan_workflow: AtomicU32::new(0),
        }
    }

    /// The limits of new settings (a reload), keeping what the running ones learned: the
    /// plan's QPS (until the next sync), and the per-device limiter's state when its settings
    /// did not change.
    pub fn reconfigured(&self, s: &RateLimitSettings) -> RateLimits {
        let mut next = RateLimits::new(s);
        if next.per_device_settings == self.per_device_settings {
            next.per_device = self.per_device.clone();
        }
        for (class, plan) in [
            (RouteClass::Chat, &self.plan_chat),
            (RouteClass::Workflow, &self.plan_workflow),
        ] {
            let qps = plan.load(Ordering::Relaxed);
            if qps > 0 {
                next.set_plan_qps(class, qps);
            }
        }
        next
    }

    /// Applies the plan's QPS (from the upstream's `benefits/get`) where the config sets no cap.
    pub fn set_plan_qps(&self, class: RouteClass, qps: u32) {
        let (slot, configured, plan) = match class {
            RouteClass::Chat => (&self.fleet_chat, self.configured_chat, &self.plan_chat),
            RouteClass::Workflow => (
                &self.fleet_workflow,
                self.configured_workflow,
                &self.plan_workflow,
            ),
            _ => return,
        };
        plan.store(qps, Ordering::Relaxed);
        if configured == 0 {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = fleet(qps);
        }
    }

    /// Checks (and spends) one request of `device` on a route of `class`.
    pub fn admit(&self, device: &DeviceId, class: RouteClass, now_ms: u64) -> Result<(), Denial> {
        check(&self.per_device, device, now_ms)?;
        match class {
            RouteClass::Chat | RouteClass::Voice => check_fleet(&self.fleet_chat, now_ms),
            RouteClass::Workflow => check_fleet(&self.fleet_workflow, now_ms),
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
}
