//! A fleet-wide request rate (the Coze plan's `api_run_qps`), shared fairly between devices.
//!
//! One GCRA bucket of `rate` requests per second, with a burst of one second's worth, caps what
//! the fleet (or, in a cluster, this node's share of it) sends upstream. On top of it, a
//! device's *fair share* is ⌈rate / active⌉ requests per second, where `active` is the number
//! of distinct devices that asked in the current one-second window or in the one before (the
//! larger). What a device had is a sliding estimate over the last second: its count in the
//! current window plus its count in the previous one, weighted by how much of that window is
//! still within the last second. A device within its share, or alone, may use the whole
//! bucket; a device over its share while others are asking may use only the upper half, and
//! is refused once half of the burst is spent. So:
//! - when one device is alone, it may use all of it (nothing is left unused);
//! - when the fleet is contended, the devices over their share are refused first, and the half
//!   kept back serves the devices under theirs (max-min fairness, to the precision of the
//!   sliding estimate).
//!
//! A device refused for its share is told to retry in a second at most (when its estimate
//! has dropped, or the bucket refilled); a refusal of the cap itself carries the bucket's
//! wait.
//!
//! # Memory
//! One counter per device that asked in the current window and in the previous one, at most
//! `max_keys` per window; a window's table is dropped when the window after it ends. A device
//! that finds the table full counts as within its share: fairness fails open under a flood of
//! distinct devices, the cap itself always holds.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::{NonZeroU32, NonZeroUsize};

use crate::credential::{RateLimiter, RetryAfter};

const WINDOW_MS: u64 = 1000;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FleetRefusal {
    /// The fleet's rate is spent.
    #[error("fleet rate limit reached")]
    Cap(RetryAfter),
    /// The fleet is busy and this device has had its share of the current window.
    #[error("fleet busy; this device had its share")]
    OverShare(RetryAfter),
}

impl FleetRefusal {
    pub fn retry_after(&self) -> RetryAfter {
        match self {
            FleetRefusal::Cap(r) | FleetRefusal::OverShare(r) => *r,
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct FleetLimiter<K> {
    bucket: RateLimiter<()>,
    rate: u32,
    /// What devices over their share may not touch: half the burst.
    reserve: u32,
    /// Index of the current window (`now_ms / 1000`).
    window: u64,
    /// Requests admitted in the current window, per device that asked in it.
    current: HashMap<K, u32>,
    /// The same for the previous window.
    previous: HashMap<K, u32>,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> FleetLimiter<K> {
    /// `rate` requests per second for the whole fleet; fairness tracks at most `max_keys`
    /// devices per window.
    pub fn new(rate: NonZeroU32, max_keys: NonZeroUsize) -> Self {
        FleetLimiter {
            bucket: RateLimiter::new(rate, rate, NonZeroUsize::MIN),
            rate: rate.get(),
            reserve: rate.get() / 2,
            window: 0,
            current: HashMap::new(),
            previous: HashMap::new(),
            max_keys: max_keys.get(),
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Admits or refuses one request of `device` at `now_ms`.
    pub fn check(&mut self, device: &K, now_ms: u64) -> Result<(), FleetRefusal> {
        let window = now_ms / WINDOW_MS;
        if window != self.window {
            if window == self.window + 1 {
                self.previous = std::mem::take(&mut self.current);
            } else {
                self.previous.clear();
            }
            self.current.clear();
            self.window = window;
        }
        let current = match self.current.get(device) {
            Some(n) => Some(*n),
            None if self.current.len() < self.max_keys => {
                self.current.insert(device.clone(), 0);
                Some(0)
            }
            None => None,
        };
        let active = self.current.len().max(self.previous.len()).max(1);
        // In thousandths of a request: the current window's count, plus the previous one's
        // for the part of it still within the last second.
        let into_window = now_ms % WINDOW_MS;
        let previous = u64::from(self.previous.get(device).copied().unwrap_or(0));
        let had = current.map(|n| u64::from(n) * WINDOW_MS + previous * (WINDOW_MS - into_window));
        let share = u64::from(self.rate).div_ceil(active as u64) * WINDOW_MS;
        let over = active > 1 && had.is_some_and(|had| had >= share);
        let reserve = if over { self.reserve } else { 0 };
        match self.bucket.check_keeping(&(), now_ms, reserve) {
            Ok(()) => {
                if let Some(n) = self.current.get_mut(device) {
                    *n += 1;
                }
                Ok(())
            }
            Err(wait) if over => Err(FleetRefusal::OverShare(RetryAfter {
                ms: wait.ms.min(WINDOW_MS),
            })),
            Err(wait) => Err(FleetRefusal::Cap(wait)),
        }
    }

    /// Devices tracked (current and previous window).
    pub fn tracked(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn limiter(rate: u32, keys: usize) -> FleetLimiter<u32> {
        FleetLimiter::new(
            NonZeroU32::new(rate).unwrap(),
            NonZeroUsize::new(keys).unwrap(),
        )
    }

    /// A quiet fleet leaves nothing unused: one device gets the whole burst, then the rate.
    #[test]
    fn one_device_alone_gets_everything() {
        let mut l = limiter(10, 100);
        let burst = (0..30).filter(|_| l.check(&1, T0).is_ok()).count();
        assert_eq!(burst, 10);
        let mut got = 0;
        for step in 1..=100 {
            got += usize::from(l.check(&1, T0 + step * 100).is_ok());
        }
        assert_eq!(got, 100, "10/s for 10 s");
    }

    /// One device asking for everything, every 10 ms, ahead of two devices asking once every
    /// 500 ms each (within their share): without fairness the greedy device takes every token
    /// the moment it refills and the others get almost nothing. With it, they get every
    /// request they make, the greedy one the rest, and the cap holds.
    #[test]
    fn a_greedy_device_cannot_starve_the_others() {
        let mut l = limiter(10, 100);
        let (mut greedy, mut light, mut light_asked) = (0u64, 0u64, 0u64);
        let mut over_share = 0;
        for tick in 0..1000u64 {
            let now = T0 + tick * 10;
            for _ in 0..5 {
                match l.check(&0, now) {
                    Ok(()) => greedy += 1,
                    Err(FleetRefusal::OverShare(r)) => {
                        over_share += 1;
                        assert!(r.ms <= 1000);
                    }
                    Err(FleetRefusal::Cap(_)) => {}
                }
            }
            if tick % 50 == 0 {
                for d in [1, 2] {
                    light_asked += 1;
                    light += u64::from(l.check(&d, now).is_ok());
                }
            }
        }
        // 10 s at 10/s plus the first burst.
        assert!(greedy + light <= 10 * 10 + 10, "cap: {greedy} + {light}");
        assert_eq!(light, light_asked, "every light request served");
        assert!(
            greedy >= 50,
            "the greedy device gets what is left: {greedy}"
        );
        assert!(over_share > 0);
    }

    /// Two equally greedy devices split the rate evenly.
    #[test]
    fn equal_demand_splits_evenly() {
        let mut l = limiter(20, 100);
        let mut got = [0u64; 2];
        for tick in 0..2000u64 {
            let now = T0 + tick * 5;
            // Alternate who asks first, as a scheduler would.
            let order = if tick % 2 == 0 { [0, 1] } else { [1, 0] };
            for d in order {
                got[d] += u64::from(l.check(&(d as u32), now).is_ok());
            }
        }
        let (a, b) = (got[0] as f64, got[1] as f64);
        assert!((a - b).abs() / (a + b) < 0.1, "{got:?}");
        assert!(got[0] + got[1] <= 20 * 10 + 20);
    }

    /// The cap is never exceeded, whatever the mix of devices.
    #[test]
    fn the_cap_holds_in_every_second() {
        let mut l = limiter(7, 1000);
        let mut per_window = HashMap::new();
        for tick in 0..5000u64 {
            let now = T0 + tick * 3;
            let device = (tick * 7919 % 13) as u32;
            if l.check(&device, now).is_ok() {
                *per_window.entry(now / 1000).or_insert(0u32) += 1;
            }
        }
        // A window may see the burst plus one second's rate at most.
        assert!(per_window.values().all(|n| *n <= 14), "{per_window:?}");
    }

    /// Fairness memory is bounded; devices beyond it are still capped.
    #[test]
    fn memory_is_bounded_and_the_tables_empty_as_windows_pass() {
        let mut l = limiter(1000, 4);
        for d in 0..100 {
            let _ = l.check(&d, T0);
        }
        assert_eq!(l.tracked(), 4);
        let _ = l.check(&5, T0 + 1000);
        assert_eq!(l.tracked(), 5, "this window's one and the last one's four");
        let _ = l.check(&5, T0 + 2000);
        assert_eq!(l.tracked(), 2);
        let _ = l.check(&5, T0 + 9000);
        assert_eq!(l.tracked(), 1, "a gap forgets the past");
        let mut capped = limiter(3, 1);
        let ok = (0..10).filter(|d| capped.check(d, T0).is_ok()).count();
        assert_eq!(ok, 3);
    }
}
