//! Pure building blocks of the device token endpoint (DESIGN §2; coze-api.md §2.2, §2.7).
//!
//! Devices obtain gateway access tokens the way Coze OAuth apps do: `POST
//! /api/permission/oauth2/token` with either a JWT they signed (`jwt-bearer` grant) or a
//! generated secret (`client_credentials` grant). This module decides; the gateway reads the
//! request, the clock, the registry and randomness, and answers.
//!
//! | piece | what it does |
//! |---|---|
//! | [`DevicePublicKey`] | PEM → RS256 / ES256 key, algorithm pinned per key |
//! | [`verify_assertion`] | checks a device JWT (everything but replay and device status) |
//! | [`DeviceSecret`], [`SecretHash`] | generate a secret from caller randomness; salted PBKDF2 hash |
//! | [`ReplayCache`] | `(device, jti)` single use, bounded, fails closed when full |
//! | [`RateLimiter`] | keyed GCRA, bounded, approximate when full |
//!
//! # Wiring (intended use by the gateway)
//! ```text
//! // startup / admin API: keys and secrets
//! let key = DevicePublicKey::parse(kid, alg.parse()?, pem)?;          // CredentialError → 400
//! let (secret, hash) = DeviceSecret::generate(rand32, rand16);         // show secret.expose() once,
//!                                                                       // store hash (serde)
//! // token endpoint, jwt-bearer grant
//! limiter.lock().check(&(claimed_id, addr), now_ms)?; // RetryAfter → 429 + Retry-After, before any RSA
//! let a = verify_assertion(bearer, |dev, kid| registry.key(dev, kid), &policy, now_s)
//!     .map_err(|e| oauth_error(e.oauth_code(), e.to_string()))?;       // 401
//! registry.status(&a.device_id) enabled?  (credential `a.kid` still present?)
//! replay.lock().check_and_insert(&a.device_id, &a.jti, a.exp, now_s)
//!     .map_err(|r| oauth_error(r.oauth_code(), r.to_string()))?;     // Reused 401, CacheFull 503
//! mint token::Claims { sub: a.device_id, cred: Some(a.kid), .. }; persist a.session_name
//!
//! // token endpoint, client_credentials grant
//! limiter.lock().check(&(client_id, addr), now_ms)?;
//! let ok = registry.secret_hash(&client_id).is_some_and(|h| h.verify(client_secret));
//! ```
//! Notes for the glue:
//! - The rate-limit key for the token endpoint is not authenticated yet (the claimed `iss`
//!   or `client_id`, or the peer address). Keying by claimed device alone lets anyone spend a
//!   device's token budget (and keep it locked out); keying by address alone punishes NATed
//!   fleets. The gateway keys by both (the parsed device id and the address), beside a looser
//!   per-address limit. The limiter also keeps the replay cache from being filled by one
//!   device.
//! - For an unknown `client_id`, verify against a fixed dummy [`SecretHash`] so response time
//!   does not reveal which device ids exist.
//! - Error messages ([`AssertionError`], [`Replay`]) are safe to send to devices: they never
//!   contain the token, claim values or key material.
//!
//! What this module does not do: read keys from disk, talk to the registry, pick randomness,
//! read the clock, or lock. None of its types are `Sync`-shared by design; the gateway
//! decides how to share the mutable ones ([`ReplayCache`], [`RateLimiter`]).

mod jwt;
mod key;
mod ratelimit;
mod replay;
mod secret;

pub use jwt::{
    AssertionError, AssertionPolicy, DEFAULT_MAX_LIFETIME_S, DEFAULT_MAX_SKEW_S, MAX_ASSERTION_LEN,
    MAX_JTI_LEN, MAX_SESSION_NAME_LEN, VerifiedAssertion, verify_assertion,
};
pub use key::{
    CredentialError, DevicePublicKey, KeyAlgorithm, KeyKind, MAX_KID_LEN, p256_spki_pem, pem_encode,
};
pub use ratelimit::{RateLimiter, RetryAfter};
pub use replay::{Replay, ReplayCache};
pub use secret::{
    DEFAULT_ITERATIONS, DeviceSecret, MAX_ITERATIONS, SECRET_PREFIX, SecretHash, SecretHashError,
};
