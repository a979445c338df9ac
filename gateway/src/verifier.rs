//! Device-token verification with a bounded memo of recent successes.
//!
//! Checking an HS256 device token (base64, two JSON parses, HMAC-SHA256 over ~300 bytes) was
//! the largest single piece of work fleetgate adds to a request: about 21,000 of the ~53,000
//! instructions it adds over a bare pingora proxy (`load instr`, `benches/RESULTS.md`). A
//! device presents the same token on every request for the token's lifetime, and the check is
//! a pure function of the token and the keyring, so its result can be remembered.
//!
//! What keeps that safe (each point has a test below):
//! - **Only successes are remembered.** A token that fails is checked in full every time and
//!   never stored, so an invalid token cannot put anything into the memo.
//! - **Entries are found by a 128-bit tag** of the whole token: SipHash-1-3 with 128-bit
//!   output (the rounds Rust's `HashMap` uses) under a random 128-bit key drawn per process,
//!   never exposed. Matching another token's tag without the key is guessing 128 bits. The
//!   token itself is not stored.
//! - **Lifetime is checked on every hit**, exactly as on a miss (`exp`, and `iat` against the
//!   leeway).
//! - **Device status is not memoised.** Admission checks the registry (disabled, revoked
//!   generation, deleted credential) on every request, hit or miss.
//! - **One memo per keyring.** A reload builds a new [`TokenVerifier`] with an empty memo, so
//!   tokens of a removed key stop being admitted at once.
//! - **Bounded.** A fixed number of direct-mapped slots, allocated once; a token whose slot is
//!   taken replaces the entry. With more active tokens than slots it degrades to misses (the
//!   full check plus one hash), never to growth.

use std::hash::Hasher as _;
use std::sync::Mutex;

use siphasher::sip128::{Hasher128 as _, SipHasher13};

use policy::ids::DeviceId;

use crate::devices::CredentialRef;
use policy::token::{self, Keyring, TokenError};

/// What admission needs from a verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub device: DeviceId,
    /// The device's token generation when the token was minted.
    pub generation: u64,
    /// The credential the token was obtained with, if any (shared: a memo hit clones it).
    pub cred: Option<CredentialRef>,
    iat: u64,
    exp: u64,
}

/// A keyring and the memo of tokens it verified.
pub struct TokenVerifier {
    keyring: Keyring,
    memo: Option<Memo>,
}

struct Memo {
    /// The tag's SipHash key.
    key: (u64, u64),
    slots: Box<[Mutex<Option<Entry>>]>,
}

struct Entry {
    tag: [u64; 2],
    verified: Verified,
}

/// Most slots a memo may have (`tokens.verify_cache_entries`).
pub const MAX_ENTRIES: usize = 1 << 24;

impl TokenVerifier {
    /// `entries` slots (rounded up to a power of two, at most [`MAX_ENTRIES`]); 0 turns the
    /// memo off.
    pub fn new(keyring: Keyring, entries: usize) -> TokenVerifier {
        let memo = (entries > 0).then(|| {
            let n = entries.min(MAX_ENTRIES).next_power_of_two();
            Memo {
                key: rand::random(),
                slots: (0..n).map(|_| Mutex::new(None)).collect(),
            }
        });
        TokenVerifier { keyring, memo }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// [`Keyring::verify`], remembered. `now` is unix seconds; `leeway` as there.
    pub fn verify(&self, token: &str, now: u64, leeway: u64) -> Result<Verified, TokenError> {
        let Some(memo) = &self.memo else {
            return self.verify_fully(token, now, leeway);
        };
        let tag = memo.tag(token);
        let slot = memo.slot(tag);
        let hit = crate::locks::lock(slot)
            .as_ref()
            .filter(|e| e.tag == tag)
            .map(|e| e.verified.clone());
        if let Some(v) = hit {
            token::check_lifetime(v.iat, v.exp, now, leeway)?;
            return Ok(v);
        }
        let v = self.verify_fully(token, now, leeway)?;
        *crate::locks::lock(slot) = Some(Entry {
            tag,
            verified: v.clone(),
        });
        Ok(v)
    }

    fn verify_fully(&self, token: &str, now: u64, leeway: u64) -> Result<Verified, TokenError> {
        let c = self.keyring.verify(token, now, leeway)?;
        Ok(Verified {
            device: c.sub,
            generation: c.generation,
            cred: c.cred.map(|kid| CredentialRef {
                kid: std::sync::Arc::from(kid),
                serial: c.cred_serial,
            }),
            iat: c.iat,
            exp: c.exp,
        })
    }
}

impl Memo {
    fn tag(&self, token: &str) -> [u64; 2] {
        let mut h = SipHasher13::new_with_keys(self.key.0, self.key.1);
        h.write(token.as_bytes());
        let t = h.finish128();
        [t.h1, t.h2]
    }

    fn slot(&self, tag: [u64; 2]) -> &Mutex<Option<Entry>> {
        // The length is a power of two; the first half of the tag picks the slot.
        let i = (tag[0] as usize) & (self.slots.len() - 1);
        &self.slots[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::token::{Claims, ISSUER};

    fn ring(kid: &str, byte: u8) -> Keyring {
        Keyring::new([(kid, &[byte; 32][..])], kid).unwrap()
    }

    fn claims(device: &str, iat: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: DeviceId::parse(device).unwrap(),
            iat,
            exp: iat + 600,
            generation: 2,
            cred: Some("c1".into()),
            cred_serial: 9,
            jti: "j".into(),
        }
    }

    /// A verifier with `entries` memo slots and a token of `dev-1` minted at 1000 (valid
    /// until 1600) by its keyring.
    fn with_token(entries: usize) -> (TokenVerifier, String) {
        let k = ring("k1", 1);
        let t = k.mint(&claims("dev-1", 1000));
        (TokenVerifier::new(k, entries), t)
    }

    fn filled(v: &TokenVerifier) -> usize {
        let memo = v.memo.as_ref().unwrap();
        memo.slots
            .iter()
            .filter(|s| crate::locks::lock(s).is_some())
            .count()
    }

    #[test]
    fn a_hit_gives_what_the_full_check_gives() {
        let (v, t) = with_token(64);
        let first = v.verify(&t, 1000, 0).unwrap();
        assert_eq!(filled(&v), 1);
        let again = v.verify(&t, 1001, 0).unwrap();
        assert_eq!(first, again);
        assert_eq!(again.device.as_str(), "dev-1");
        let cred = again.cred.as_ref().map(|c| (&*c.kid, c.serial));
        assert_eq!((again.generation, cred), (2, Some(("c1", 9))));
    }

    #[test]
    fn failures_are_not_remembered() {
        let (v, t) = with_token(64);
        // One signature character changed (not the last: its low bits are padding).
        let i = t.len() - 10;
        let c = if &t[i..i + 1] == "A" { "B" } else { "A" };
        let forged = format!("{}{c}{}", &t[..i], &t[i + 1..]);
        for _ in 0..3 {
            assert_eq!(v.verify(&forged, 1000, 0), Err(TokenError::Signature));
        }
        assert_eq!(v.verify("a.b.c", 1000, 0), Err(TokenError::Malformed));
        assert_eq!(filled(&v), 0);
        // An expired token is refused and not stored either.
        assert_eq!(v.verify(&t, 1600, 0), Err(TokenError::Expired));
        assert_eq!(filled(&v), 0);
    }

    #[test]
    fn lifetime_is_checked_on_every_hit() {
        let (v, t) = with_token(64);
        assert!(v.verify(&t, 1599, 0).is_ok());
        assert_eq!(v.verify(&t, 1600, 0), Err(TokenError::Expired));
        // A clock stepped back before `iat` (beyond the leeway) is refused on a hit too.
        assert_eq!(v.verify(&t, 990, 5), Err(TokenError::NotYetValid));
        assert!(v.verify(&t, 990, 10).is_ok());
    }

    #[test]
    fn a_new_keyring_starts_with_an_empty_memo() {
        let old = ring("k1", 1);
        let t = old.mint(&claims("dev-1", 1000));
        let v = TokenVerifier::new(old, 64);
        assert!(v.verify(&t, 1000, 0).is_ok());
        // Reload: k1 removed. The same token is refused at once.
        let v = TokenVerifier::new(ring("k2", 2), 64);
        assert_eq!(v.verify(&t, 1000, 0), Err(TokenError::UnknownKey));
    }

    #[test]
    fn bounded_and_still_correct_when_tokens_outnumber_slots() {
        let k = ring("k1", 1);
        let tokens: Vec<String> = (0..200)
            .map(|i| k.mint(&claims(&format!("dev-{i}"), 1000)))
            .collect();
        let v = TokenVerifier::new(k, 16);
        for round in 0..2 {
            for (i, t) in tokens.iter().enumerate() {
                let got = v.verify(t, 1000 + round, 0).unwrap();
                assert_eq!(got.device.as_str(), format!("dev-{i}"));
            }
        }
        assert!(filled(&v) <= 16);
        assert_eq!(v.memo.as_ref().unwrap().slots.len(), 16);
    }

    #[test]
    fn zero_entries_turns_the_memo_off() {
        let (v, t) = with_token(0);
        assert!(v.memo.is_none());
        assert_eq!(v.verify(&t, 1000, 0).unwrap().device.as_str(), "dev-1");
    }

    #[test]
    fn sizes_round_up_to_a_power_of_two_and_are_capped() {
        let v = TokenVerifier::new(ring("k1", 1), 1000);
        assert_eq!(v.memo.as_ref().unwrap().slots.len(), 1024);
        assert_eq!(MAX_ENTRIES.next_power_of_two(), MAX_ENTRIES);
    }

    #[test]
    fn the_tag_covers_the_whole_token_and_the_keys_are_per_memo() {
        let k = ring("k1", 1);
        let v = TokenVerifier::new(k.clone(), 64);
        let w = TokenVerifier::new(k, 64);
        let (a, b) = ("x.y.zzzz", "x.y.zzzy");
        let m = v.memo.as_ref().unwrap();
        assert_ne!(m.tag(a), m.tag(b));
        assert_eq!(m.tag(a), m.tag(a));
        assert_ne!(m.tag(a), w.memo.as_ref().unwrap().tag(a));
    }
}
