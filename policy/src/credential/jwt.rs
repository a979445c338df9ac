//! Device JWT assertions (Coze's OAuth JWT flow, coze-api.md §2.2 and §2.7).
//!
//! A device signs a short-lived JWT with its own key and sends it as
//! `Authorization: Bearer <JWT>` to `POST /api/permission/oauth2/token`.
//! [`verify_assertion`] checks it completely except for `jti` reuse (see
//! [`super::ReplayCache`]) and the device's registry status.
//!
//! # Checks, in order
//! 1. Shape: three base64url (unpadded) segments, bounded sizes, JSON header and payload, no
//!    `crit` header, `typ` absent or `JWT`. Required claims present: `iss`, `aud`, `iat`,
//!    `exp`, `jti` (1–128 characters, no control characters).
//! 2. `alg` is `RS256` or `ES256` (so `none`, `HS*`, `PS*` never reach a key) and `kid` is set.
//! 3. The key is looked up by **(`iss`, `kid`)**: `kid`s need only be unique per device, and a
//!    signature that verifies under the key registered for `iss` proves `iss`. The caller's
//!    lookup must only return keys that belong to the given device.
//! 4. `alg` equals the key's pinned algorithm (RS/ES confusion and HS256-with-public-key fail).
//! 5. Signature (ES256: the 64-byte JWS `r || s` form).
//! 6. `aud` (string or array) contains one of `policy.audiences`; `exp > now`;
//!    `iat <= now + max_skew_s` (and `nbf`, if present, likewise); `iat < exp`;
//!    `exp - iat <= max_lifetime_s`.
//!
//! Header fields such as `jku`, `x5u` and `jwk` are ignored: keys only ever come from the
//! registry.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::key::{DevicePublicKey, KeyAlgorithm};
use crate::ids::DeviceId;

/// Longest accepted assertion (an RS256 JWT with an 8192-bit key is about 1.8 KiB).
pub const MAX_ASSERTION_LEN: usize = 8 * 1024;
/// Longest `jti` accepted.
pub const MAX_JTI_LEN: usize = 128;
/// Longest `session_name` accepted.
pub const MAX_SESSION_NAME_LEN: usize = 256;
/// Default tolerated clock skew on `iat` (coze-api.md §2.7).
pub const DEFAULT_MAX_SKEW_S: u64 = 60;
/// Default longest assertion lifetime `exp - iat` (cozepy and coze-js sign for 3600 s).
pub const DEFAULT_MAX_LIFETIME_S: u64 = 3600;

const MAX_HEADER_B64: usize = 1024;
const MAX_PAYLOAD_B64: usize = 4096;
const MAX_SIGNATURE_B64: usize = 1366; // 1024 bytes: an 8192-bit RSA signature

/// What the token endpoint accepts. Validated config builds one; fields are plain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssertionPolicy {
    /// Accepted `aud` values (the gateway's own API host names, e.g. `api.coze.cn`).
    pub audiences: Vec<String>,
    /// Seconds `iat` (and `nbf`) may lie in the future.
    pub max_skew_s: u64,
    /// Longest `exp - iat` accepted. Go SDK clients sign with `exp = iat + duration_seconds`;
    /// raise to 86_399 if long-TTL Go clients must work.
    pub max_lifetime_s: u64,
    /// Assertions issued (`iat`) before this unix second are refused (0: none). A gateway
    /// whose `jti` replay cache lives in memory sets its start time here: a `jti` used before
    /// a restart is not remembered after it, but every assertion accepted after it was
    /// issued after it, so none can have been used before.
    pub issued_after_s: u64,
}

impl AssertionPolicy {
    /// A policy with the default skew (60 s) and lifetime (3600 s).
    pub fn new(audiences: Vec<String>) -> AssertionPolicy {
        AssertionPolicy {
            audiences,
            max_skew_s: DEFAULT_MAX_SKEW_S,
            max_lifetime_s: DEFAULT_MAX_LIFETIME_S,
            issued_after_s: 0,
        }
    }
}

/// A verified assertion: the device proved possession of key `kid`. Still to do by the
/// caller: device status (enabled?) and `jti` replay ([`super::ReplayCache`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedAssertion {
    /// The `iss` claim, proven by the signature of a key registered for it.
    pub device_id: DeviceId,
    pub kid: String,
    pub jti: String,
    /// Assertion expiry, unix seconds: how long the `jti` must be remembered.
    pub exp: u64,
    /// Coze's optional `session_name` (session isolation, coze-api.md §2.4).
    pub session_name: Option<String>,
}

/// Why an assertion was refused. Messages are safe to return to the client: they never
/// contain the token, claims values or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssertionError {
    #[error("invalid request: assertion is not a well-formed JWT")]
    Malformed,
    #[error("invalid request: JWT header has no kid")]
    MissingKid,
    #[error("invalid request: JWT claim `{0}` is missing")]
    MissingClaim(&'static str),
    #[error("invalid request: JWT claim `{0}` is invalid")]
    InvalidClaim(&'static str),
    #[error("JWT algorithm is not allowed")]
    Algorithm,
    #[error("no key with this kid is registered for this issuer")]
    UnknownKey,
    #[error("JWT algorithm does not match the registered key")]
    AlgorithmMismatch,
    #[error("JWT signature is invalid")]
    Signature,
    #[error("JWT audience is not accepted")]
    Audience,
    #[error("JWT has expired")]
    Expired,
    #[error("JWT is not valid yet (iat or nbf is in the future)")]
    NotYetValid,
    #[error("JWT lifetime (exp - iat) is not accepted")]
    Lifetime,
    #[error("JWT was issued before the gateway started; sign a new one")]
    IssuedBeforeStart,
}

impl AssertionError {
    /// Coze OAuth `error_code`: `invalid_request` for malformed input, `invalid_client` for a
    /// bad key, signature or claim value.
    pub fn oauth_code(&self) -> &'static str {
        match self {
            AssertionError::Malformed
            | AssertionError::MissingKid
            | AssertionError::MissingClaim(_)
            | AssertionError::InvalidClaim(_) => "invalid_request",
            AssertionError::Algorithm
            | AssertionError::UnknownKey
            | AssertionError::AlgorithmMismatch
            | AssertionError::Signature
            | AssertionError::Audience
            | AssertionError::Expired
            | AssertionError::NotYetValid
            | AssertionError::Lifetime
            | AssertionError::IssuedBeforeStart => "invalid_client",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    session_name: Option<String>,
}

fn decode_segment(seg: &str, max_b64: usize) -> Result<Vec<u8>, AssertionError> {
    if seg.is_empty() || seg.len() > max_b64 {
        return Err(AssertionError::Malformed);
    }
    B64.decode(seg).map_err(|_| AssertionError::Malformed)
}

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// Verifies a device's JWT assertion. `lookup(device, kid)` returns the key registered under
/// `kid` **for that device** (or `None`); `now_s` is unix seconds. See the module docs for the
/// exact checks.
pub fn verify_assertion<'k>(
    token: &str,
    lookup: impl Fn(&DeviceId, &str) -> Option<&'k DevicePublicKey>,
    policy: &AssertionPolicy,
    now_s: u64,
) -> Result<VerifiedAssertion, AssertionError> {
    use AssertionError as E;

    if token.len() > MAX_ASSERTION_LEN {
        return Err(E::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(E::Malformed);
    };

    // 1. Shape.
    let header: Header =
        serde_json::from_slice(&decode_segment(h64, MAX_HEADER_B64)?).map_err(|_| E::Malformed)?;
    if header.crit.is_some() {
        return Err(E::Malformed);
    }
    if header
        .typ
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("JWT"))
    {
        return Err(E::Malformed);
    }
    let claims: RawClaims =
        serde_json::from_slice(&decode_segment(c64, MAX_PAYLOAD_B64)?).map_err(|_| E::Malformed)?;
    let iss = claims.iss.ok_or(E::MissingClaim("iss"))?;
    let aud = claims.aud.ok_or(E::MissingClaim("aud"))?;
    let iat = claims.iat.ok_or(E::MissingClaim("iat"))?;
    let exp = claims.exp.ok_or(E::MissingClaim("exp"))?;
    let jti = claims.jti.ok_or(E::MissingClaim("jti"))?;
    if !printable(&jti, MAX_JTI_LEN) {
        return Err(E::InvalidClaim("jti"));
    }
    if let Some(s) = &claims.session_name
        && !printable(s, MAX_SESSION_NAME_LEN)
    {
        return Err(E::InvalidClaim("session_name"));
    }
    let signature = decode_segment(s64, MAX_SIGNATURE_B64)?;

    // 2. Algorithm allow-list and kid.
    let alg: KeyAlgorithm = header.alg.parse().map_err(|_| E::Algorithm)?;
    let kid = header.kid.ok_or(E::MissingKid)?;

    // 3. Key for (iss, kid). An iss that is not a device id cannot own a key.
    let device_id = DeviceId::parse(&iss).map_err(|_| E::UnknownKey)?;
    let key = lookup(&device_id, &kid).ok_or(E::UnknownKey)?;

    // 4. Pinned algorithm.
    if key.algorithm() != alg {
        return Err(E::AlgorithmMismatch);
    }

    // 5. Signature over "header.payload".
    let signed = token.get(..h64.len() + 1 + c64.len()).ok_or(E::Malformed)?;
    if !key.verify(signed.as_bytes(), &signature) {
        return Err(E::Signature);
    }

    // 6. Claim values.
    let aud_ok = match &aud {
        Audience::One(a) => policy.audiences.iter().any(|p| p == a),
        Audience::Many(list) => list.iter().any(|a| policy.audiences.iter().any(|p| p == a)),
    };
    if !aud_ok {
        return Err(E::Audience);
    }
    if exp <= now_s {
        return Err(E::Expired);
    }
    let latest_start = now_s.saturating_add(policy.max_skew_s);
    if iat > latest_start || claims.nbf.is_some_and(|nbf| nbf > latest_start) {
        return Err(E::NotYetValid);
    }
    if exp <= iat || exp - iat > policy.max_lifetime_s {
        return Err(E::Lifetime);
    }
    if iat < policy.issued_after_s {
        return Err(E::IssuedBeforeStart);
    }

    Ok(VerifiedAssertion {
        device_id,
        kid,
        jti,
        exp,
        session_name: claims.session_name,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair,
    };
    use serde_json::json;

    use super::super::key::tests::{P256_SPKI, RSA_PKCS1, RSA_SPKI, p256_spki_pem};
    use super::*;

    const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/keys/rsa2048_private.pk8.der");
    const RSA_OTHER: &[u8] = include_bytes!("../../tests/keys/rsa2048_other_private.pk8.der");
    const P256_PRIVATE: &[u8] = include_bytes!("../../tests/keys/p256_private.pk8.der");
    const NOW: u64 = 1_700_000_000;
    const DEV: &str = "dev-1";

    enum Signer {
        Rsa(RsaKeyPair),
        Ec(EcdsaKeyPair),
    }

    impl Signer {
        fn sign(&self, msg: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match self {
                Signer::Rsa(k) => {
                    let mut sig = vec![0; k.public().modulus_len()];
                    k.sign(&RSA_PKCS1_SHA256, &rng, msg, &mut sig).unwrap();
                    sig
                }
                Signer::Ec(k) => k.sign(&rng, msg).unwrap().as_ref().to_vec(),
            }
        }
    }

    fn rsa(der: &[u8]) -> Signer {
        Signer::Rsa(RsaKeyPair::from_pkcs8(der).unwrap())
    }

    fn fresh_ec() -> (Signer, String) {
        let rng = SystemRandom::new();
        let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng).unwrap();
        let pem = p256_spki_pem(kp.public_key().as_ref());
        (Signer::Ec(kp), pem)
    }

    fn b64(v: &serde_json::Value) -> String {
        B64.encode(serde_json::to_vec(v).unwrap())
    }

    fn jwt(header: &serde_json::Value, claims: &serde_json::Value, signer: &Signer) -> String {
        let input = format!("{}.{}", b64(header), b64(claims));
        let sig = signer.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig))
    }

    fn header(alg: &str, kid: &str) -> serde_json::Value {
        json!({"alg": alg, "typ": "JWT", "kid": kid})
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": DEV, "aud": "api.coze.cn", "iat": NOW, "exp": NOW + 3600,
            "jti": "1700000000:0a1b2c3d:00112233445566778899aabbccddeeff",
            "session_name": "user_2222",
        })
    }

    fn policy() -> AssertionPolicy {
        AssertionPolicy::new(vec!["api.coze.cn".into(), "gw.example".into()])
    }

    /// A registry: dev-1 owns rsa (RS256) and ec (ES256); dev-2 owns "shared" kid.
    struct Registry {
        keys: HashMap<(String, String), DevicePublicKey>,
        ec_signer: Signer,
    }

    fn registry() -> Registry {
        let (ec_signer, ec_pem) = fresh_ec();
        let mut keys = HashMap::new();
        let mut add = |dev: &str, kid: &str, alg, pem: &str| {
            keys.insert(
                (dev.to_owned(), kid.to_owned()),
                DevicePublicKey::parse(kid, alg, pem).unwrap(),
            );
        };
        add(DEV, "rsa", KeyAlgorithm::Rs256, RSA_SPKI);
        add(DEV, "rsa1", KeyAlgorithm::Rs256, RSA_PKCS1);
        add(DEV, "ec", KeyAlgorithm::Es256, &ec_pem);
        add(DEV, "ossl-ec", KeyAlgorithm::Es256, P256_SPKI);
        add("dev-2", "shared", KeyAlgorithm::Rs256, RSA_SPKI);
        Registry { keys, ec_signer }
    }

    impl Registry {
        fn verify(&self, token: &str, now: u64) -> Result<VerifiedAssertion, AssertionError> {
            verify_assertion(
                token,
                |dev, kid| self.keys.get(&(dev.as_str().to_owned(), kid.to_owned())),
                &policy(),
                now,
            )
        }
    }

    #[test]
    fn valid_rs256_assertion() {
        let r = registry();
        let t = jwt(&header("RS256", "rsa"), &claims(), &rsa(RSA_PRIVATE));
        let v = r.verify(&t, NOW).unwrap();
        assert_eq!(
            v,
            VerifiedAssertion {
                device_id: DeviceId::parse(DEV).unwrap(),
                kid: "rsa".into(),
                jti: "1700000000:0a1b2c3d:00112233445566778899aabbccddeeff".into(),
                exp: NOW + 3600,
                session_name: Some("user_2222".into()),
            }
        );
        // Same key registered from PKCS#1 PEM.
        let t = jwt(&header("RS256", "rsa1"), &claims(), &rsa(RSA_PRIVATE));
        assert!(r.verify(&t, NOW).is_ok());
        // aud as an array, no typ, no session_name.
        let mut c = claims();
        c["aud"] = json!(["other", "gw.example"]);
        c.as_object_mut().unwrap().remove("session_name");
        let t = jwt(
            &json!({"alg": "RS256", "kid": "rsa"}),
            &c,
            &rsa(RSA_PRIVATE),
        );
        assert_eq!(r.verify(&t, NOW).unwrap().session_name, None);
    }

    #[test]
    fn valid_es256_assertions() {
        let r = registry();
        let t = jwt(&header("ES256", "ec"), &claims(), &r.ec_signer);
        assert_eq!(r.verify(&t, NOW).unwrap().kid, "ec");
        // openssl-generated key, PEM from openssl.
        let rng = SystemRandom::new();
        let kp =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, P256_PRIVATE, &rng).unwrap();
        let t = jwt(&header("ES256", "ossl-ec"), &claims(), &Signer::Ec(kp));
        assert!(r.verify(&t, NOW).is_ok());
    }

    #[test]
    fn alg_none_is_refused() {
        let r = registry();
        for alg in ["none", "None", "HS256", "RS512", "PS256", "ES384"] {
            let t = format!(
                "{}.{}.{}",
                b64(&header(alg, "rsa")),
                b64(&claims()),
                B64.encode(b"x")
            );
            assert_eq!(r.verify(&t, NOW), Err(AssertionError::Algorithm), "{alg}");
        }
        // Empty signature segment ("alg":"none" style) is malformed before anything else.
        let t = format!("{}.{}.", b64(&header("none", "rsa")), b64(&claims()));
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::Malformed));
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let r = registry();
        for secret in [
            RSA_SPKI.as_bytes().to_vec(),
            RSA_SPKI.trim().as_bytes().to_vec(),
        ] {
            let input = format!("{}.{}", b64(&header("HS256", "rsa")), b64(&claims()));
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
            let tag = ring::hmac::sign(&key, input.as_bytes());
            let t = format!("{input}.{}", B64.encode(tag.as_ref()));
            assert_eq!(r.verify(&t, NOW), Err(AssertionError::Algorithm));
        }
    }

    #[test]
    fn rs_es_confusion_is_refused() {
        let r = registry();
        // RS256 header on the ES256 key (signed with the RSA key).
        let t = jwt(&header("RS256", "ec"), &claims(), &rsa(RSA_PRIVATE));
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::AlgorithmMismatch));
        // ES256 header on the RS256 key (signed with an EC key).
        let t = jwt(&header("ES256", "rsa"), &claims(), &r.ec_signer);
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::AlgorithmMismatch));
    }

    #[test]
    fn unknown_kid_and_foreign_device_are_refused() {
        let r = registry();
        let t = jwt(&header("RS256", "nope"), &claims(), &rsa(RSA_PRIVATE));
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::UnknownKey));
        // dev-1 uses a kid that only dev-2 owns: the lookup is per device.
        let t = jwt(&header("RS256", "shared"), &claims(), &rsa(RSA_PRIVATE));
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::UnknownKey));
        // Claiming to be dev-2 with dev-1's kid.
        let mut c = claims();
        c["iss"] = json!("dev-2");
        let t = jwt(&header("RS256", "rsa"), &c, &rsa(RSA_PRIVATE));
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::UnknownKey));
        // An iss that is not a device id.
        c["iss"] = json!("a/b");
        let t = jwt(&header("RS256", "rsa"), &c, &rsa(RSA_PRIVATE));
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::UnknownKey));
        assert_eq!(AssertionError::UnknownKey.oauth_code(), "invalid_client");
    }

    #[test]
    fn bad_signature_is_refused() {
        let r = registry();
        let t = jwt(&header("RS256", "rsa"), &claims(), &rsa(RSA_OTHER));
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::Signature));
        // Valid signature, tampered payload.
        let good = jwt(&header("RS256", "rsa"), &claims(), &rsa(RSA_PRIVATE));
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut c = claims();
        c["exp"] = json!(NOW + 3599);
        parts[1] = b64(&c);
        assert_eq!(
            r.verify(&parts.join("."), NOW),
            Err(AssertionError::Signature)
        );
        // EC: another fresh key.
        let (other, _) = fresh_ec();
        let t = jwt(&header("ES256", "ec"), &claims(), &other);
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::Signature));
        assert_eq!(AssertionError::Signature.oauth_code(), "invalid_client");
    }

    #[test]
    fn claim_values_are_enforced() {
        let r = registry();
        let signer = rsa(RSA_PRIVATE);
        let check = |edit: &dyn Fn(&mut serde_json::Value), now: u64| {
            let mut c = claims();
            edit(&mut c);
            r.verify(&jwt(&header("RS256", "rsa"), &c, &signer), now)
        };
        assert_eq!(
            check(&|c| c["aud"] = json!("api.coze.com"), NOW),
            Err(AssertionError::Audience)
        );
        assert_eq!(
            check(&|c| c["aud"] = json!(["a", "b"]), NOW),
            Err(AssertionError::Audience)
        );
        // Expired: exp == now is already expired.
        assert_eq!(check(&|_| {}, NOW + 3600), Err(AssertionError::Expired));
        assert!(check(&|_| {}, NOW + 3599).is_ok());
        // iat in the future: 60 s skew allowed, 61 not.
        assert!(check(&|c| c["iat"] = json!(NOW + 60), NOW).is_ok());
        assert_eq!(
            check(&|c| c["iat"] = json!(NOW + 61), NOW),
            Err(AssertionError::NotYetValid)
        );
        assert_eq!(
            check(&|c| c["nbf"] = json!(NOW + 61), NOW),
            Err(AssertionError::NotYetValid)
        );
        // Lifetime: 3600 allowed, 3601 not, exp <= iat not.
        assert_eq!(
            check(&|c| c["exp"] = json!(NOW + 3601), NOW),
            Err(AssertionError::Lifetime)
        );
        assert_eq!(
            check(
                &|c| {
                    c["iat"] = json!(NOW + 10);
                    c["exp"] = json!(NOW + 5);
                },
                NOW
            ),
            Err(AssertionError::Lifetime)
        );
        for e in [
            AssertionError::Audience,
            AssertionError::Expired,
            AssertionError::NotYetValid,
            AssertionError::Lifetime,
            AssertionError::IssuedBeforeStart,
        ] {
            assert_eq!(e.oauth_code(), "invalid_client");
        }
    }

    /// `issued_after_s` (a restarted gateway's start time) refuses assertions issued before
    /// it, even valid ones: their `jti` may have been used before the restart.
    #[test]
    fn assertions_issued_before_the_start_are_refused() {
        let r = registry();
        let t = jwt(&header("RS256", "rsa"), &claims(), &rsa(RSA_PRIVATE));
        let mut p = policy();
        let verify = |p: &AssertionPolicy| {
            verify_assertion(
                &t,
                |dev, kid| r.keys.get(&(dev.as_str().to_owned(), kid.to_owned())),
                p,
                NOW + 10,
            )
        };
        p.issued_after_s = NOW;
        assert!(verify(&p).is_ok(), "issued in the start second");
        p.issued_after_s = NOW + 1;
        assert_eq!(verify(&p), Err(AssertionError::IssuedBeforeStart));
        assert!(
            AssertionError::IssuedBeforeStart
                .to_string()
                .contains("sign a new one")
        );
    }

    #[test]
    fn missing_and_invalid_claims_are_invalid_request() {
        let r = registry();
        let signer = rsa(RSA_PRIVATE);
        for claim in ["iss", "aud", "iat", "exp", "jti"] {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(claim);
            let err = r
                .verify(&jwt(&header("RS256", "rsa"), &c, &signer), NOW)
                .unwrap_err();
            assert_eq!(err, AssertionError::MissingClaim(claim));
            assert_eq!(err.oauth_code(), "invalid_request");
        }
        for jti in [json!(""), json!("x".repeat(129)), json!("a\nb")] {
            let mut c = claims();
            c["jti"] = jti;
            assert_eq!(
                r.verify(&jwt(&header("RS256", "rsa"), &c, &signer), NOW),
                Err(AssertionError::InvalidClaim("jti"))
            );
        }
        let mut c = claims();
        c["jti"] = json!("x".repeat(128));
        assert!(
            r.verify(&jwt(&header("RS256", "rsa"), &c, &signer), NOW)
                .is_ok()
        );
        // Wrong types are malformed.
        c["iat"] = json!("soon");
        assert_eq!(
            r.verify(&jwt(&header("RS256", "rsa"), &c, &signer), NOW),
            Err(AssertionError::Malformed)
        );
        // Header without kid; crit header; wrong typ.
        let t = jwt(&json!({"alg": "RS256"}), &claims(), &signer);
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::MissingKid));
        assert_eq!(AssertionError::MissingKid.oauth_code(), "invalid_request");
        let t = jwt(
            &json!({"alg": "RS256", "kid": "rsa", "crit": ["exp"], "exp": 1}),
            &claims(),
            &signer,
        );
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::Malformed));
        let t = jwt(
            &json!({"alg": "RS256", "kid": "rsa", "typ": "at+jwt"}),
            &claims(),
            &signer,
        );
        assert_eq!(r.verify(&t, NOW), Err(AssertionError::Malformed));
    }

    #[test]
    fn errors_never_contain_the_token() {
        let r = registry();
        let t = jwt(&header("RS256", "rsa"), &claims(), &rsa(RSA_OTHER));
        let err = r.verify(&t, NOW).unwrap_err();
        let shown = format!("{err} {err:?}");
        for part in t.split('.') {
            assert!(!shown.contains(part));
        }
        assert!(!shown.contains(DEV));
    }

    #[test]
    fn structural_garbage_is_malformed() {
        let r = registry();
        let good = jwt(&header("RS256", "rsa"), &claims(), &rsa(RSA_PRIVATE));
        for bad in [
            String::new(),
            ".".into(),
            "..".into(),
            "a.b.c".into(),
            format!("{good}."),
            format!("{good}.x"),
            good.replacen('.', "=.", 1),
            format!("{good}=="),
            "x".repeat(MAX_ASSERTION_LEN + 1),
        ] {
            assert_eq!(r.verify(&bad, NOW), Err(AssertionError::Malformed), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn random_strings_never_panic(s in "\\PC{0,400}") {
            let r = registry();
            proptest::prop_assert!(r.verify(&s, NOW).is_err());
        }

        #[test]
        fn random_segments_never_panic(
            h in "[A-Za-z0-9_-]{0,120}",
            c in "[A-Za-z0-9_-]{0,200}",
            s in "[A-Za-z0-9_-]{0,400}",
        ) {
            let r = registry();
            let t = format!("{h}.{c}.{s}");
            proptest::prop_assert!(r.verify(&t, NOW).is_err());
        }

        #[test]
        fn random_json_claims_never_panic(
            iss in proptest::option::of("\\PC{0,20}"),
            iat in proptest::num::u64::ANY,
            exp in proptest::num::u64::ANY,
            jti in "\\PC{0,140}",
        ) {
            let r = registry();
            let c = json!({"iss": iss, "aud": "api.coze.cn", "iat": iat, "exp": exp, "jti": jti});
            let t = format!("{}.{}.{}", b64(&header("RS256", "rsa")), b64(&c), B64.encode([0u8; 256]));
            proptest::prop_assert!(r.verify(&t, NOW).is_err());
        }
    }
}
