//! Generated device secrets (the `client_credentials` grant) and their stored hashes.
//!
//! A secret is 32 random bytes supplied by the caller (policy reads no randomness), shown
//! once as `fgs_` + 43 base64url characters, and stored only as a [`SecretHash`]:
//! PBKDF2-HMAC-SHA256 with a 16-byte random salt.
//!
//! # Iterations
//! [`DEFAULT_ITERATIONS`] is 10 000. The secrets carry 256 bits of entropy, so the work factor
//! is not what protects them from guessing (no password-style brute force is possible); it is
//! defence in depth should a weak secret ever be imported, and it costs CPU on every
//! `client_credentials` request (a few ms in debug builds, well under 1 ms optimised). Rate-limit
//! the token endpoint *before* calling [`SecretHash::verify`]. The iteration count is stored in
//! each hash, so raising the default later does not invalidate existing hashes.

use std::fmt;
use std::num::NonZeroU32;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use ring::pbkdf2;
use serde::{Deserialize, Serialize};

/// Default PBKDF2 iteration count (see the module docs).
pub const DEFAULT_ITERATIONS: NonZeroU32 = NonZeroU32::MIN.saturating_add(9_999);
/// Largest iteration count a stored hash may claim (bounds CPU if storage is tampered with).
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Prefix of every generated secret (lets secret scanners recognise leaked ones).
pub const SECRET_PREFIX: &str = "fgs_";
/// Candidates longer than this are refused without hashing.
const MAX_CANDIDATE_LEN: usize = 1024;
const ALG: &str = "pbkdf2-sha256";
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

/// A freshly generated plaintext secret. Its `Debug` is redacted; [`DeviceSecret::expose`] it
/// exactly once, in the admin API response that creates it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceSecret(String);

impl fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceSecret(<redacted>)")
    }
}

impl DeviceSecret {
    /// Builds a secret from 32 random bytes and hashes it with a separate random `salt` and
    /// [`DEFAULT_ITERATIONS`]. `random` and `salt` must come from a CSPRNG and be independent
    /// (the salt is stored in clear next to the hash).
    pub fn generate(random: [u8; 32], salt: [u8; SALT_LEN]) -> (DeviceSecret, SecretHash) {
        DeviceSecret::generate_with(random, salt, DEFAULT_ITERATIONS)
    }

    /// [`DeviceSecret::generate`] with an explicit iteration count.
    pub fn generate_with(
        random: [u8; 32],
        salt: [u8; SALT_LEN],
        iterations: NonZeroU32,
    ) -> (DeviceSecret, SecretHash) {
        let mut plaintext = String::with_capacity(SECRET_PREFIX.len() + 43);
        plaintext.push_str(SECRET_PREFIX);
        URL_SAFE_NO_PAD.encode_string(random, &mut plaintext);
        let hash = SecretHash::derive(&plaintext, salt, iterations);
        (DeviceSecret(plaintext), hash)
    }

    /// The plaintext, to show once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_plaintext(self) -> String {
        self.0
    }
}

/// A salted PBKDF2-HMAC-SHA256 hash of a device secret, safe to store. Serializes as
/// `{"alg":"pbkdf2-sha256","iterations":N,"salt":"<b64>","hash":"<b64>"}` (standard base64, no
/// padding); deserializing validates every field.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SecretHashRepr", into = "SecretHashRepr")]
pub struct SecretHash {
    iterations: NonZeroU32,
    salt: [u8; SALT_LEN],
    hash: [u8; HASH_LEN],
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretHash")
            .field("alg", &ALG)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl SecretHash {
    fn derive(secret: &str, salt: [u8; SALT_LEN], iterations: NonZeroU32) -> SecretHash {
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            secret.as_bytes(),
            &mut hash,
        );
        SecretHash {
            iterations,
            salt,
            hash,
        }
    }

    /// True if `candidate` is the secret. The comparison is constant-time (ring's
    /// `pbkdf2::verify`); only over-long candidates are refused early.
    pub fn verify(&self, candidate: &str) -> bool {
        if candidate.len() > MAX_CANDIDATE_LEN {
            return false;
        }
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            candidate.as_bytes(),
            &self.hash,
        )
        .is_ok()
    }

    pub fn iterations(&self) -> NonZeroU32 {
        self.iterations
    }
}

/// Why a stored hash could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretHashError {
    #[error("unsupported secret hash algorithm (expected {ALG})")]
    Algorithm,
    #[error("secret hash iterations must be 1-{MAX_ITERATIONS}")]
    Iterations,
    #[error("secret hash salt must be {SALT_LEN} bytes of base64")]
    Salt,
    #[error("secret hash must be {HASH_LEN} bytes of base64")]
    Hash,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretHashRepr {
    alg: String,
    iterations: u32,
    salt: String,
    hash: String,
}

impl From<SecretHash> for SecretHashRepr {
    fn from(h: SecretHash) -> Self {
        SecretHashRepr {
            alg: ALG.to_owned(),
            iterations: h.iterations.get(),
            salt: STANDARD_NO_PAD.encode(h.salt),
            hash: STANDARD_NO_PAD.encode(h.hash),
        }
    }
}

impl TryFrom<SecretHashRepr> for SecretHash {
    type Error = SecretHashError;

    fn try_from(r: SecretHashRepr) -> Result<Self, Self::Error> {
        if r.alg != ALG {
            return Err(SecretHashError::Algorithm);
        }
        let iterations = NonZeroU32::new(r.iterations)
            .filter(|n| n.get() <= MAX_ITERATIONS)
            .ok_or(SecretHashError::Iterations)?;
        let mut salt = [0u8; SALT_LEN];
        match STANDARD_NO_PAD.decode_slice(r.salt.as_bytes(), &mut salt) {
            Ok(SALT_LEN) => {}
            _ => return Err(SecretHashError::Salt),
        }
        let mut hash = [0u8; HASH_LEN];
        match STANDARD_NO_PAD.decode_slice(r.hash.as_bytes(), &mut hash) {
            Ok(HASH_LEN) => {}
            _ => return Err(SecretHashError::Hash),
        }
        Ok(SecretHash {
            iterations,
            salt,
            hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> NonZeroU32 {
        NonZeroU32::new(100).unwrap()
    }

    #[test]
    fn generated_secret_verifies_and_others_do_not() {
        let (secret, hash) = DeviceSecret::generate([7u8; 32], [9u8; 16]);
        let s = secret.expose();
        assert!(s.starts_with(SECRET_PREFIX));
        assert_eq!(s.len(), SECRET_PREFIX.len() + 43);
        assert_eq!(hash.iterations(), DEFAULT_ITERATIONS);
        assert_eq!(DEFAULT_ITERATIONS.get(), 10_000);
        assert!(hash.verify(s));
        assert!(!hash.verify(""));
        assert!(!hash.verify(&s[..s.len() - 1]));
        assert!(!hash.verify(&format!("{s}x")));
        let (other, _) = DeviceSecret::generate([8u8; 32], [9u8; 16]);
        assert!(!hash.verify(other.expose()));
        assert!(!hash.verify(&"x".repeat(MAX_CANDIDATE_LEN + 1)));
    }

    #[test]
    fn generation_is_deterministic_and_salted() {
        let a = DeviceSecret::generate_with([1u8; 32], [2u8; 16], fast());
        let b = DeviceSecret::generate_with([1u8; 32], [2u8; 16], fast());
        assert_eq!(a, b);
        let c = DeviceSecret::generate_with([1u8; 32], [3u8; 16], fast());
        assert_eq!(a.0, c.0);
        assert_ne!(a.1, c.1, "different salt, different hash");
        assert!(c.1.verify(a.0.expose()));
    }

    #[test]
    fn hash_round_trips_through_serde() {
        let (secret, hash) = DeviceSecret::generate_with([5u8; 32], [6u8; 16], fast());
        let json = serde_json::to_string(&hash).unwrap();
        assert!(json.starts_with(r#"{"alg":"pbkdf2-sha256","iterations":100,"salt":""#));
        assert!(!json.contains(secret.expose()));
        let back: SecretHash = serde_json::from_str(&json).unwrap();
        assert_eq!(back, hash);
        assert!(back.verify(secret.expose()));
    }

    #[test]
    fn tampered_stored_hashes_are_refused() {
        let (_, hash) = DeviceSecret::generate_with([5u8; 32], [6u8; 16], fast());
        let v: serde_json::Value = serde_json::to_value(&hash).unwrap();
        let edits: [(&str, serde_json::Value); 6] = [
            ("alg", "md5".into()),
            ("iterations", 0.into()),
            ("iterations", (MAX_ITERATIONS + 1).into()),
            ("salt", "AAAA".into()),
            ("hash", "!!".into()),
            ("extra", 1.into()),
        ];
        for (field, value) in edits {
            let mut bad = v.clone();
            bad[field] = value;
            assert!(
                serde_json::from_value::<SecretHash>(bad).is_err(),
                "{field}"
            );
        }
    }

    #[test]
    fn debug_output_is_redacted() {
        let (secret, hash) = DeviceSecret::generate_with([5u8; 32], [6u8; 16], fast());
        let shown = format!("{secret:?} {hash:?}");
        assert!(!shown.contains(secret.expose()));
        assert!(!shown.contains(&STANDARD_NO_PAD.encode(hash.hash)));
    }
}
