//! Request rate limits (GCRA, `policy::credential::RateLimiter`): per device across all
//! routes, and fleet-wide per route class (the Coze plan's `api_run_qps` for chat and
//! workflow). A refusal is 429 / 4013 with `Retry-After`, before the quota hold and before
//! anything goes upstream.
//!
//! # Approximation
//! The per-device limiter tracks at most `max_tracked_devices`; beyond that the devices idle
//! longest are forgotten and get a fresh burst (fails open; see the limiter's docs).

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Mutex;

use policy::credential::RateLimiter;
use policy::decision::{Denial, DenyReason};
use policy::ids::DeviceId;
use policy::route::RouteClass;

use crate::config::RateLimitSettings;

pub struct RateLimits {
    per_device: Option<Mutex<RateLimiter<DeviceId>>>,
    fleet_chat: Mutex<Option<RateLimiter<()>>>,
    fleet_workflow: Mutex<Option<RateLimiter<()>>>,
    /// Fleet caps from the config (they win over the plan's).
    configured_chat: u32,
    configured_workflow: u32,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(
    rate: u32,
    burst: u32,
    keys: usize,
) -> Option<Mutex<RateLimiter<K>>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    let keys = NonZeroUsize::new(keys).unwrap_or(NonZeroUsize::MIN);
    Some(Mutex::new(RateLimiter::new(rate, burst, keys)))
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
    l: &Option<Mutex<RateLimiter<K>>>,
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
            fleet_chat: Mutex::new(fleet(s.fleet_chat_qps)),
            fleet_workflow: Mutex::new(fleet(s.fleet_workflow_qps)),
            configured_chat: s.fleet_chat_qps,
            configured_workflow: s.fleet_workflow_qps,
        }
    }

    /// Applies the plan's QPS (from the upstream's `benefits/get`) where the config sets no cap.
    pub fn set_plan_qps(&self, class: RouteClass, qps: u32) {
        let (slot, configured) = match class {
            RouteClass::Chat => (&self.fleet_chat, self.configured_chat),
            RouteClass::Workflow => (&self.fleet_workflow, self.configured_workflow),
            _ => return,
        };
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
