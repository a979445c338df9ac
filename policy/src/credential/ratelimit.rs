//! A keyed GCRA rate limiter (generic cell rate algorithm, a.k.a. virtual-scheduling token
//! bucket) with bounded memory.
//!
//! Per key it stores one number, the *theoretical arrival time* (TAT). With emission interval
//! `T = period / count` and tolerance `τ = T × (burst − 1)`, a request at `now` conforms if
//! `max(TAT, now) − τ ≤ now`; it then sets `TAT = max(TAT, now) + T`. A refused request changes
//! nothing and learns how long to wait (`max(TAT, now) − τ − now`). So a fresh key gets `burst`
//! requests at once, then one per `T`.
//!
//! Time is `now_ms` (milliseconds, any monotonic origin); internally microseconds, so rates up
//! to 1 000 000/s are exact enough. Not thread-safe by itself: the gateway wraps it in a
//! `Mutex` or shards it by key hash. Checking an existing key does not allocate.
//!
//! # Approximation
//! A key whose TAT ≤ now carries no state (it behaves exactly like an unknown key), so it can be
//! dropped at no cost in accuracy. At most `max_keys` keys are tracked. When a *new* key
//! arrives and the table is full:
//! 1. every idle key (TAT ≤ now) is dropped;
//! 2. if that freed less than 1/8 of the table, the live keys with the **oldest TAT** are
//!    forgotten until 1/8 is free.
//!
//! A forgotten live key gets a fresh burst the next time it is seen, so under a flood of
//! distinct keys the limiter errs on the side of *allowing* (fail-open for protection, as house
//! style §2.1.4 allows); refusing new keys instead would let anyone who can invent keys lock out
//! every newcomer. Oldest-TAT keys are chosen because they are the closest to idle: the
//! allowance they regain is the smallest. Freeing 1/8 at a time keeps the O(n) sweep to once
//! per n/8 new keys, i.e. O(1) amortised per check.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

/// A refusal: try again after `ms` milliseconds (round up to seconds for `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited; retry after {ms} ms")]
pub struct RetryAfter {
    pub ms: u64,
}

impl RetryAfter {
    /// Whole seconds, rounded up (the `Retry-After` header value; at least 1).
    pub fn secs_ceil(&self) -> u64 {
        self.ms.div_ceil(1000).max(1)
    }
}

/// Keyed GCRA limiter; see the module docs.
#[derive(Debug)]
pub struct RateLimiter<K> {
    /// Emission interval T, µs.
    interval_us: u64,
    /// Burst tolerance τ = T × (burst − 1), µs.
    tolerance_us: u64,
    max_keys: usize,
    /// Key → TAT, µs.
    tats: HashMap<K, u64>,
    /// Reused buffer for choosing eviction victims.
    scratch: Vec<u64>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `rate_per_s` requests per second per key, bursts of up to `burst`.
    pub fn new(rate_per_s: NonZeroU32, burst: NonZeroU32, max_keys: NonZeroUsize) -> Self {
        RateLimiter::per_period(
            rate_per_s,
            NonZeroU64::MIN.saturating_add(999),
            burst,
            max_keys,
        )
    }

    /// `count` requests per `period_ms` per key (e.g. 5 per 60 000 ms), bursts of up to `burst`.
    pub fn per_period(
        count: NonZeroU32,
        period_ms: NonZeroU64,
        burst: NonZeroU32,
        max_keys: NonZeroUsize,
    ) -> Self {
        let interval_us = (period_ms.get().saturating_mul(1000) / u64::from(count.get())).max(1);
        RateLimiter {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst.get() - 1)),
            max_keys: max_keys.get(),
            tats: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Admits or refuses one request for `key` at `now_ms`.
    pub fn check(&mut self, key: &K, now_ms: u64) -> Result<(), RetryAfter> {
        self.check_keeping(key, now_ms, 0)
    }

    /// Like [`check`](Self::check), but admits only if `reserve` more requests would still
    /// conform right after this one: the last `reserve` of the burst are kept for others.
    /// `reserve` is at most `burst − 1` (larger values count as that), so a key at rest always
    /// conforms.
    pub fn check_keeping(&mut self, key: &K, now_ms: u64, reserve: u32) -> Result<(), RetryAfter> {
        let now = now_ms.saturating_mul(1000);
        let tolerance = self
            .tolerance_us
            .saturating_sub(self.interval_us.saturating_mul(u64::from(reserve)));
        if let Some(tat) = self.tats.get_mut(key) {
            let base = (*tat).max(now);
            let allow_at = base.saturating_sub(tolerance);
            if now < allow_at {
                return Err(RetryAfter {
                    ms: (allow_at - now).div_ceil(1000),
                });
            }
            *tat = base.saturating_add(self.interval_us);
            return Ok(());
        }
        // Unknown (or forgotten) key: conforms, since burst >= 1.
        if self.tats.len() >= self.max_keys {
            self.make_room(now);
        }
        self.tats
            .insert(key.clone(), now.saturating_add(self.interval_us));
        Ok(())
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.tats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tats.is_empty()
    }

    /// Frees at least max(1, max_keys / 8) slots (see `# Approximation`).
    fn make_room(&mut self, now: u64) {
        let target = self.max_keys - (self.max_keys / 8).max(1);
        self.tats.retain(|_, tat| *tat > now);
        let excess = self.tats.len().saturating_sub(target);
        if excess == 0 {
            return;
        }
        self.scratch.clear();
        self.scratch.extend(self.tats.values().copied());
        let (_, threshold, _) = self.scratch.select_nth_unstable(excess - 1);
        let threshold = *threshold;
        // Drop exactly `excess` keys with TAT <= threshold (ties broken arbitrarily).
        let mut left = excess;
        self.tats.retain(|_, tat| {
            if left > 0 && *tat <= threshold {
                left -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz32(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn limiter(rate: u32, burst: u32, keys: usize) -> RateLimiter<String> {
        RateLimiter::new(nz32(rate), nz32(burst), NonZeroUsize::new(keys).unwrap())
    }

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        // 10/s → T = 100 ms; burst 5.
        let mut l = limiter(10, 5, 100);
        let k = "dev-1".to_owned();
        for _ in 0..5 {
            assert_eq!(l.check(&k, T0), Ok(()));
        }
        assert_eq!(l.check(&k, T0), Err(RetryAfter { ms: 100 }));
        assert_eq!(l.check(&k, T0 + 40), Err(RetryAfter { ms: 60 }));
        assert_eq!(l.check(&k, T0 + 99), Err(RetryAfter { ms: 1 }));
        // Refusals do not push the schedule back.
        assert_eq!(l.check(&k, T0 + 100), Ok(()));
        assert_eq!(l.check(&k, T0 + 100), Err(RetryAfter { ms: 100 }));
        assert_eq!(RetryAfter { ms: 100 }.secs_ceil(), 1);
        assert_eq!(RetryAfter { ms: 1001 }.secs_ceil(), 2);
    }

    #[test]
    fn a_reserve_keeps_the_end_of_the_burst() {
        // 10/s, burst 5, keep 2: three now, then only once the bucket refills above 2.
        let mut l = limiter(10, 5, 100);
        let k = "k".to_owned();
        for _ in 0..3 {
            assert_eq!(l.check_keeping(&k, T0, 2), Ok(()));
        }
        assert_eq!(l.check_keeping(&k, T0, 2), Err(RetryAfter { ms: 100 }));
        // The kept two are there for a check without reserve.
        assert_eq!(l.check(&k, T0), Ok(()));
        assert_eq!(l.check(&k, T0), Ok(()));
        assert!(l.check(&k, T0).is_err());
        // A reserve beyond the burst counts as burst - 1: a key at rest still gets one.
        let fresh = "fresh".to_owned();
        assert_eq!(l.check_keeping(&fresh, T0, 99), Ok(()));
        assert!(l.check_keeping(&fresh, T0, 99).is_err());
        assert_eq!(l.check_keeping(&fresh, T0 + 100, 99), Ok(()));
    }

    #[test]
    fn refills_over_manual_time() {
        let mut l = limiter(10, 5, 100);
        let k = "k".to_owned();
        for _ in 0..5 {
            l.check(&k, T0).unwrap();
        }
        // 250 ms later: 2 tokens back (the 3rd arrives at +300).
        assert_eq!(l.check(&k, T0 + 250), Ok(()));
        assert_eq!(l.check(&k, T0 + 250), Ok(()));
        assert_eq!(l.check(&k, T0 + 250), Err(RetryAfter { ms: 50 }));
        // Idle long enough: full burst again, but never more than burst.
        let later = T0 + 10_000;
        for _ in 0..5 {
            assert_eq!(l.check(&k, later), Ok(()));
        }
        assert!(l.check(&k, later).is_err());
        // Steady rate at exactly T is sustained forever.
        let mut t = later + 100;
        for _ in 0..1000 {
            assert_eq!(l.check(&k, t), Ok(()));
            t += 100;
        }
    }

    #[test]
    fn keys_are_independent() {
        let mut l = limiter(1, 1, 100);
        assert_eq!(l.check(&"a".to_owned(), T0), Ok(()));
        assert_eq!(l.check(&"a".to_owned(), T0), Err(RetryAfter { ms: 1000 }));
        assert_eq!(l.check(&"b".to_owned(), T0), Ok(()));
    }

    #[test]
    fn slow_rates_per_period() {
        // 5 per minute, burst 2: T = 12 s.
        let mut l: RateLimiter<u32> = RateLimiter::per_period(
            nz32(5),
            NonZeroU64::new(60_000).unwrap(),
            nz32(2),
            NonZeroUsize::new(10).unwrap(),
        );
        assert_eq!(l.check(&1, T0), Ok(()));
        assert_eq!(l.check(&1, T0), Ok(()));
        assert_eq!(l.check(&1, T0), Err(RetryAfter { ms: 12_000 }));
        assert_eq!(l.check(&1, T0 + 12_000), Ok(()));
    }

    #[test]
    fn idle_keys_are_evicted_and_bound_holds() {
        let mut l = limiter(10, 1, 16);
        for i in 0..16 {
            l.check(&format!("k{i}"), T0).unwrap();
        }
        assert_eq!(l.len(), 16);
        // 100 ms later all are idle: a new key clears them all.
        l.check(&"new".to_owned(), T0 + 100).unwrap();
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn full_of_live_keys_forgets_oldest_tat_first() {
        // 1/s, burst 1; 16 keys with TATs staggered by 1 ms.
        let mut l = limiter(1, 1, 16);
        for i in 0..16u64 {
            l.check(&format!("k{i}"), T0 + i).unwrap();
        }
        // k15 is the newest; a new key evicts 16/8 = 2 keys: k0 and k1.
        l.check(&"new".to_owned(), T0 + 20).unwrap();
        assert_eq!(l.len(), 15);
        assert_eq!(
            l.check(&"k0".to_owned(), T0 + 21),
            Ok(()),
            "k0 forgotten: fresh burst"
        );
        assert!(l.check(&"k2".to_owned(), T0 + 21).is_err(), "k2 remembered");
        assert!(
            l.check(&"k15".to_owned(), T0 + 21).is_err(),
            "k15 remembered"
        );
    }

    #[test]
    fn bound_holds_under_a_flood_of_distinct_keys() {
        let mut l: RateLimiter<u64> =
            RateLimiter::new(nz32(1), nz32(3), NonZeroUsize::new(1000).unwrap());
        for i in 0..100_000u64 {
            assert_eq!(l.check(&i, T0 + i / 10), Ok(()));
            assert!(l.len() <= 1000);
        }
    }

    proptest::proptest! {
        /// Over any window the limiter never admits more than burst + window / T per key.
        #[test]
        fn never_exceeds_rate_plus_burst(gaps in proptest::collection::vec(0u64..250, 1..300)) {
            let mut l = limiter(10, 3, 4);
            let k = "k".to_owned();
            let mut now = T0;
            let mut admitted = 0u64;
            for g in &gaps {
                now += g;
                if l.check(&k, now).is_ok() {
                    admitted += 1;
                }
            }
            let window = now - T0;
            proptest::prop_assert!(admitted <= 3 + window / 100);
        }
    }
}
