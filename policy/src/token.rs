//! Gateway access tokens: compact JWTs signed HS256 with a gateway key chosen by `kid`.
//!
//! Only the gateway mints and verifies these tokens, so a symmetric MAC is enough and keeps
//! verification to one HMAC-SHA256 (about a microsecond) with no I/O. The algorithm is pinned:
//! a header whose `alg` is not `HS256` is rejected before any key is touched, so `none` and
//! RS/HS confusion cannot apply.
//!
//! Claims: `iss` (`"fleetgate"`), `sub` (device id), `iat`/`exp` (unix seconds), `gen` (the
//! device's token generation when minted: revoking a device bumps it, which invalidates every
//! older token without a list of revoked tokens), `cred` and `cs` (the `kid` and serial of the
//! credential the token was obtained with, if any: deleting it invalidates its tokens, and a
//! new credential under the same `kid` has another serial, so it does not revive them) and
//! `jti`.
//!
//! # Key rotation
//! A [`Keyring`] holds several keys; the *active* one signs, all verify. Rotate by adding the
//! new key as active and keeping the old one until its tokens have expired (the longest
//! token lifetime).

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;

/// The issuer written into and required from every gateway token.
pub const ISSUER: &str = "fleetgate";

/// Minimum key length in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// Claims of a gateway access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: DeviceId,
    pub iat: u64,
    pub exp: u64,
    #[serde(default)]
    #[serde(rename = "gen")]
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cred: Option<String>,
    /// The serial of credential `cred` (0: none, or a credential stored before serials).
    #[serde(default, rename = "cs", skip_serializing_if = "is_zero")]
    pub cred_serial: u64,
    pub jti: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
struct Header<'a> {
    alg: &'a str,
    #[serde(default)]
    typ: Option<&'a str>,
    kid: &'a str,
}

/// Why a token was refused. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is not a compact JWT")]
    Malformed,
    #[error("token algorithm is not allowed")]
    Algorithm,
    #[error("token key id is unknown")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token issuer is wrong")]
    Issuer,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token's device is unknown")]
    UnknownDevice,
    #[error("token's device is disabled")]
    DeviceDisabled,
    #[error("token was revoked")]
    Revoked,
}

/// What the registry knows about a token's device at admission time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    pub enabled: bool,
    /// Current token generation; tokens minted under an older one are revoked.
    pub generation: u64,
    /// False when the credential the token was obtained through has been removed.
    pub credential_present: bool,
}

/// Checks a verified token's device `generation` claim against the device's current status.
pub fn check_device(generation: u64, device: Option<DeviceStatus>) -> Result<(), TokenError> {
    let d = device.ok_or(TokenError::UnknownDevice)?;
    if !d.enabled {
        return Err(TokenError::DeviceDisabled);
    }
    if generation != d.generation || !d.credential_present {
        return Err(TokenError::Revoked);
    }
    Ok(())
}

/// Why a key could not be added to a keyring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key `{kid}` is {len} bytes; at least {MIN_KEY_LEN} are required")]
    TooShort { kid: String, len: usize },
    #[error("key id `{0}` must be 1-64 characters of [A-Za-z0-9._-]")]
    BadKid(String),
    #[error("key id `{0}` appears twice")]
    Duplicate(String),
    #[error("the keyring has no keys")]
    Empty,
}

/// Signing and verification keys by `kid`. The first key added (or the one marked active)
/// signs.
#[derive(Clone)]
pub struct Keyring {
    keys: HashMap<String, hmac::Key>,
    active: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("Keyring")
            .field("kids", &kids)
            .field("active", &self.active)
            .finish()
    }
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 64
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Keyring {
    /// Builds a keyring from `(kid, secret)` pairs; `active` names the signing key.
    pub fn new<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        active: &str,
    ) -> Result<Keyring, KeyError> {
        let mut map = HashMap::new();
        for (kid, secret) in keys {
            if !valid_kid(kid) {
                return Err(KeyError::BadKid(kid.to_owned()));
            }
            if secret.len() < MIN_KEY_LEN {
                return Err(KeyError::TooShort {
                    kid: kid.to_owned(),
                    len: secret.len(),
                });
            }
            if map
                .insert(kid.to_owned(), hmac::Key::new(hmac::HMAC_SHA256, secret))
                .is_some()
            {
                return Err(KeyError::Duplicate(kid.to_owned()));
            }
        }
        if map.is_empty() {
            return Err(KeyError::Empty);
        }
        if !map.contains_key(active) {
            return Err(KeyError::BadKid(active.to_owned()));
        }
        Ok(Keyring {
            keys: map,
            active: active.to_owned(),
        })
    }

    pub fn active_kid(&self) -> &str {
        &self.active
    }

    /// Signs `claims` with the active key.
    pub fn mint(&self, claims: &Claims) -> String {
        let header = Header {
            alg: "HS256",
            typ: Some("JWT"),
            kid: &self.active,
        };
        // Serialising these plain structs cannot fail.
        let h = serde_json::to_vec(&header).unwrap_or_default();
        let c = serde_json::to_vec(claims).unwrap_or_default();
        let mut out = String::with_capacity(h.len() * 2 + c.len() * 2 + 48);
        B64.encode_string(&h, &mut out);
        out.push('.');
        B64.encode_string(&c, &mut out);
        let key = &self.keys[&self.active];
        let tag = hmac::sign(key, out.as_bytes());
        out.push('.');
        B64.encode_string(tag.as_ref(), &mut out);
        out
    }

    /// Verifies signature, issuer and lifetime. `now` is unix seconds; `leeway` seconds of
    /// clock skew are tolerated on `iat` only (expiry is exact).
    pub fn verify(&self, token: &str, now: u64, leeway: u64) -> Result<Claims, TokenError> {
        let mut parts = token.splitn(3, '.');
        let (Some(h64), Some(c64), Some(s64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        if h64.len() > 256 || c64.len() > 2048 || s64.len() != 43 {
            return Err(TokenError::Malformed);
        }
        let mut hbuf = [0u8; 192];
        let hlen = B64
            .decode_slice(h64, &mut hbuf)
            .map_err(|_| TokenError::Malformed)?;
        let header: Header<'_> =
            serde_json::from_slice(hbuf.get(..hlen).ok_or(TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if header.alg != "HS256" {
            return Err(TokenError::Algorithm);
        }
        let key = self.keys.get(header.kid).ok_or(TokenError::UnknownKey)?;
        let mut sig = [0u8; 32];
        let slen = B64
            .decode_slice(s64, &mut sig)
            .map_err(|_| TokenError::Malformed)?;
        let signed_len = h64.len() + 1 + c64.len();
        let signed = token.get(..signed_len).ok_or(TokenError::Malformed)?;
        // ring's verify compares in constant time.
        hmac::verify(
            key,
            signed.as_bytes(),
            sig.get(..slen).ok_or(TokenError::Malformed)?,
        )
        .map_err(|_| TokenError::Signature)?;
        let claims_json = B64.decode(c64).map_err(|_| TokenError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&claims_json).map_err(|_| TokenError::Malformed)?;
        if claims.iss != ISSUER {
            return Err(TokenError::Issuer);
        }
        check_lifetime(claims.iat, claims.exp, now, leeway)?;
        Ok(claims)
    }
}

/// The lifetime part of [`Keyring::verify`]: expired at `exp` exactly, `iat` in the future by
/// more than `leeway` seconds refused. Also used by callers that remember verified claims and
/// must re-check them against the clock on every use.
pub fn check_lifetime(iat: u64, exp: u64, now: u64, leeway: u64) -> Result<(), TokenError> {
    if now >= exp {
        return Err(TokenError::Expired);
    }
    if iat > now.saturating_add(leeway) {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring2() -> Keyring {
        Keyring::new([("k1", &[1u8; 32][..]), ("k2", &[2u8; 32][..])], "k2").unwrap()
    }

    fn claims(now: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: DeviceId::parse("dev-1").unwrap(),
            iat: now,
            exp: now + 600,
            generation: 3,
            cred: Some("c1".into()),
            cred_serial: 7,
            jti: "j".into(),
        }
    }

    #[test]
    fn mint_then_verify_round_trips() {
        let k = ring2();
        let t = k.mint(&claims(1000));
        assert_eq!(k.verify(&t, 1000, 0).unwrap(), claims(1000));
    }

    #[test]
    fn old_key_still_verifies_after_rotation() {
        let old = Keyring::new([("k1", &[1u8; 32][..])], "k1").unwrap();
        let t = old.mint(&claims(1000));
        assert!(ring2().verify(&t, 1001, 0).is_ok());
    }

    #[test]
    fn expiry_and_future_iat_are_enforced() {
        let k = ring2();
        let t = k.mint(&claims(1000));
        assert_eq!(k.verify(&t, 1600, 0), Err(TokenError::Expired));
        assert_eq!(k.verify(&t, 990, 5), Err(TokenError::NotYetValid));
        assert!(k.verify(&t, 990, 10).is_ok());
    }

    #[test]
    fn tampering_and_foreign_keys_fail() {
        let k = ring2();
        let t = k.mint(&claims(1000));
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = claims(1000);
        let forged_claims = B64.encode(
            serde_json::to_vec(&Claims {
                sub: DeviceId::parse("dev-2").unwrap(),
                ..other
            })
            .unwrap(),
        );
        parts[1] = &forged_claims;
        assert_eq!(
            k.verify(&parts.join("."), 1000, 0),
            Err(TokenError::Signature)
        );
        let stranger = Keyring::new([("k2", &[9u8; 32][..])], "k2").unwrap();
        assert_eq!(
            k.verify(&stranger.mint(&claims(1000)), 1000, 0),
            Err(TokenError::Signature)
        );
        let unknown = Keyring::new([("k9", &[2u8; 32][..])], "k9").unwrap();
        assert_eq!(
            k.verify(&unknown.mint(&claims(1000)), 1000, 0),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let k = ring2();
        let t = k.mint(&claims(1000));
        let rest = t.split_once('.').unwrap().1;
        for alg in ["none", "RS256", "HS512"] {
            let h = B64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"k2"}}"#));
            assert_eq!(
                k.verify(&format!("{h}.{rest}"), 1000, 0),
                Err(TokenError::Algorithm)
            );
        }
    }

    #[test]
    fn device_status_gates_tokens() {
        let c = claims(1000);
        let ok = DeviceStatus {
            enabled: true,
            generation: 3,
            credential_present: true,
        };
        assert_eq!(check_device(c.generation, Some(ok)), Ok(()));
        assert_eq!(
            check_device(c.generation, None),
            Err(TokenError::UnknownDevice)
        );
        assert_eq!(
            check_device(
                c.generation,
                Some(DeviceStatus {
                    enabled: false,
                    ..ok
                })
            ),
            Err(TokenError::DeviceDisabled)
        );
        assert_eq!(
            check_device(
                c.generation,
                Some(DeviceStatus {
                    generation: 4,
                    ..ok
                })
            ),
            Err(TokenError::Revoked)
        );
        assert_eq!(
            check_device(
                c.generation,
                Some(DeviceStatus {
                    credential_present: false,
                    ..ok
                })
            ),
            Err(TokenError::Revoked)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let k = ring2();
        for s in [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.cccccccccccccccccccccccccccccccccccccccccc",
            "é.é.é",
        ] {
            assert!(k.verify(s, 0, 0).is_err());
        }
    }

    #[test]
    fn keyring_rejects_weak_or_bad_keys() {
        assert!(matches!(
            Keyring::new([("k", &[1u8; 8][..])], "k"),
            Err(KeyError::TooShort { .. })
        ));
        assert!(matches!(
            Keyring::new([("bad kid", &[1u8; 32][..])], "bad kid"),
            Err(KeyError::BadKid(_))
        ));
        assert!(matches!(
            Keyring::new([("k", &[1u8; 32][..])], "other"),
            Err(KeyError::BadKid(_))
        ));
    }
}
