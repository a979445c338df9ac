//! `jti` replay protection: "a JWT is single-use" (coze-api.md §2.2).
//!
//! Entries are keyed by **(device, jti)**: one device cannot burn another device's `jti`s,
//! and two devices whose RNGs happen to agree don't collide. The pair is stored as a 128-bit
//! SHA-256 fingerprint, so every entry has the same small size whatever the `jti` length
//! (collisions need ~2^64 work; a collision would only cause a false "reused").
//!
//! An entry is kept until its assertion's `exp`: after that the assertion fails
//! [`super::verify_assertion`] anyway, so remembering it buys nothing. The size of the cache is
//! therefore bounded by (assertions accepted per second) × (longest `exp - now`), which
//! [`super::AssertionPolicy`] bounds by `max_skew_s + max_lifetime_s`.
//!
//! # When full
//! A full cache (of live entries) **refuses** new assertions with [`Replay::CacheFull`] rather
//! than forgetting a live entry: forgetting one would let that exact assertion be replayed, and
//! an attacker able to fill the cache could pick which. Refusing fails closed and is visible
//! (a 5xx the operator can alert on); size the cache above peak rate × horizon, and rate-limit
//! the token endpoint per device before this check so one device cannot fill it.
//!
//! # Cost
//! Expired entries are dropped from per-second buckets as time advances: each entry is
//! inserted once and removed once, and each elapsed second is visited at most once (or, after a
//! long gap, the buckets are swept once), so `check_and_insert` is O(1) amortised.
//!
//! Time is taken as `now_s` and treated as monotonic: a `now_s` earlier than one already seen
//! is raised to it.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use ring::digest;

use crate::ids::DeviceId;

type Fingerprint = [u8; 16];

/// Why [`ReplayCache::check_and_insert`] refused an assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Replay {
    /// This device already used this `jti`, and the assertion has not expired yet.
    #[error("JWT jti has already been used")]
    Reused,
    /// The assertion's `exp` is not after `now` (verify before inserting).
    #[error("JWT has expired")]
    Expired,
    /// The cache is full of live entries; see the module docs.
    #[error("too many token requests in flight; retry later")]
    CacheFull,
}

impl Replay {
    /// Coze OAuth `error_code`: a replay is a bad client assertion; a full cache is ours.
    pub fn oauth_code(&self) -> &'static str {
        match self {
            Replay::Reused | Replay::Expired => "invalid_client",
            Replay::CacheFull => "internal_error",
        }
    }
}

/// Remembers `(device, jti)` pairs until their assertion expires. Not thread-safe by itself:
/// the gateway keeps one behind a `Mutex` (or one per shard of devices).
#[derive(Debug)]
pub struct ReplayCache {
    /// Fingerprint → exp (unix seconds). Every entry here has `exp > swept_to`.
    seen: HashMap<Fingerprint, u64>,
    /// exp second → fingerprints expiring then.
    by_exp: HashMap<u64, Vec<Fingerprint>>,
    /// Every bucket with `exp <= swept_to` has been dropped; also the monotonic "now".
    swept_to: u64,
    max_entries: usize,
}

impl ReplayCache {
    pub fn new(max_entries: NonZeroUsize) -> ReplayCache {
        ReplayCache {
            seen: HashMap::new(),
            by_exp: HashMap::new(),
            swept_to: 0,
            max_entries: max_entries.get(),
        }
    }

    /// Records `(device, jti)` with expiry `exp_s`, or refuses if it was seen before and has
    /// not expired, or if the cache is full. Call after [`super::verify_assertion`] succeeded,
    /// with its `device_id`, `jti` and `exp`.
    pub fn check_and_insert(
        &mut self,
        device: &DeviceId,
        jti: &str,
        exp_s: u64,
        now_s: u64,
    ) -> Result<(), Replay> {
        self.sweep(now_s);
        if exp_s <= self.swept_to {
            return Err(Replay::Expired);
        }
        let fp = fingerprint(device, jti);
        if self.seen.contains_key(&fp) {
            return Err(Replay::Reused);
        }
        if self.seen.len() >= self.max_entries {
            return Err(Replay::CacheFull);
        }
        self.seen.insert(fp, exp_s);
        self.by_exp.entry(exp_s).or_default().push(fp);
        Ok(())
    }

    /// Live entries (after the last sweep).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Drops every entry with `exp <= now`.
    fn sweep(&mut self, now: u64) {
        if now <= self.swept_to {
            return;
        }
        let ReplayCache { seen, by_exp, .. } = self;
        let elapsed = now - self.swept_to;
        if elapsed > by_exp.len() as u64 {
            // Long gap (or first call): one pass over the buckets is cheaper than per second.
            by_exp.retain(|&exp, fps| {
                if exp <= now {
                    for fp in fps.iter() {
                        seen.remove(fp);
                    }
                    false
                } else {
                    true
                }
            });
        } else {
            for second in self.swept_to + 1..=now {
                if let Some(fps) = by_exp.remove(&second) {
                    for fp in &fps {
                        seen.remove(fp);
                    }
                }
            }
        }
        self.swept_to = now;
    }
}

fn fingerprint(device: &DeviceId, jti: &str) -> Fingerprint {
    let mut ctx = digest::Context::new(&digest::SHA256);
    // Length-prefix the device id so ("ab","c") and ("a","bc") differ.
    let d = device.as_str().as_bytes();
    ctx.update(&(d.len() as u64).to_be_bytes());
    ctx.update(d);
    ctx.update(jti.as_bytes());
    let full = ctx.finish();
    let mut fp = [0u8; 16];
    fp.copy_from_slice(full.as_ref().get(..16).unwrap_or(&[0u8; 16]));
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn cache(n: usize) -> ReplayCache {
        ReplayCache::new(NonZeroUsize::new(n).unwrap())
    }

    const T0: u64 = 1_700_000_000;

    #[test]
    fn reuse_is_rejected_until_exp_then_accepted() {
        let mut c = cache(10);
        let d = dev("d1");
        assert_eq!(c.check_and_insert(&d, "j1", T0 + 100, T0), Ok(()));
        assert_eq!(
            c.check_and_insert(&d, "j1", T0 + 100, T0),
            Err(Replay::Reused)
        );
        assert_eq!(
            c.check_and_insert(&d, "j1", T0 + 100, T0 + 99),
            Err(Replay::Reused)
        );
        // At exp the old assertion is dead; the entry is gone.
        assert_eq!(
            c.check_and_insert(&d, "j1", T0 + 100, T0 + 100),
            Err(Replay::Expired)
        );
        assert!(c.is_empty());
        assert_eq!(c.check_and_insert(&d, "j1", T0 + 200, T0 + 100), Ok(()));
        assert_eq!(Replay::Reused.oauth_code(), "invalid_client");
    }

    #[test]
    fn keyed_by_device_and_jti() {
        let mut c = cache(10);
        assert_eq!(c.check_and_insert(&dev("a"), "bc", T0 + 10, T0), Ok(()));
        assert_eq!(c.check_and_insert(&dev("ab"), "c", T0 + 10, T0), Ok(()));
        assert_eq!(c.check_and_insert(&dev("b"), "bc", T0 + 10, T0), Ok(()));
        assert_eq!(
            c.check_and_insert(&dev("a"), "bc", T0 + 10, T0),
            Err(Replay::Reused)
        );
    }

    #[test]
    fn full_cache_refuses_rather_than_forgets() {
        let mut c = cache(3);
        let d = dev("d");
        for (i, exp) in [(0, 10), (1, 20), (2, 30)] {
            assert_eq!(
                c.check_and_insert(&d, &format!("j{i}"), T0 + exp, T0),
                Ok(())
            );
        }
        assert_eq!(
            c.check_and_insert(&d, "new", T0 + 50, T0 + 5),
            Err(Replay::CacheFull)
        );
        assert_eq!(Replay::CacheFull.oauth_code(), "internal_error");
        // Live entries are still remembered while full.
        assert_eq!(
            c.check_and_insert(&d, "j2", T0 + 30, T0 + 5),
            Err(Replay::Reused)
        );
        // Once the first expires there is room again.
        assert_eq!(c.check_and_insert(&d, "new", T0 + 50, T0 + 10), Ok(()));
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.check_and_insert(&d, "j1", T0 + 20, T0 + 11),
            Err(Replay::Reused)
        );
    }

    #[test]
    fn clock_going_backwards_does_not_resurrect_or_forget() {
        let mut c = cache(10);
        let d = dev("d");
        assert_eq!(c.check_and_insert(&d, "j", T0 + 50, T0 + 10), Ok(()));
        // now goes backwards: treated as T0 + 10.
        assert_eq!(
            c.check_and_insert(&d, "j", T0 + 50, T0),
            Err(Replay::Reused)
        );
        assert_eq!(
            c.check_and_insert(&d, "k", T0 + 5, T0),
            Err(Replay::Expired)
        );
    }

    #[test]
    fn sweeping_by_second_and_after_gaps_is_exact() {
        let mut c = cache(1000);
        let d = dev("d");
        for i in 0..300u64 {
            assert_eq!(
                c.check_and_insert(&d, &i.to_string(), T0 + 1 + i, T0),
                Ok(())
            );
        }
        // Small steps: one second at a time.
        for step in 1..=100u64 {
            assert_eq!(
                c.check_and_insert(&d, &format!("x{step}"), T0 + 1000, T0 + step),
                Ok(())
            );
            assert_eq!(c.len(), 300, "{step} expired, {step} added");
        }
        // Entries with exp <= now are gone, later ones live.
        assert_eq!(
            c.check_and_insert(&d, "99", T0 + 100, T0 + 100),
            Err(Replay::Expired)
        );
        assert_eq!(
            c.check_and_insert(&d, "100", T0 + 101, T0 + 100),
            Err(Replay::Reused)
        );
        // A long gap: everything but the x* entries is dropped in one pass.
        assert_eq!(c.check_and_insert(&d, "y", T0 + 2000, T0 + 999), Ok(()));
        assert_eq!(c.len(), 101);
        assert_eq!(c.by_exp.len(), 2);
    }
}
