//! `fleetgate device …`: offline helpers for firmware developers and provisioning scripts (no
//! gateway needed). `keygen` makes a device key pair in the shapes the admin API wants;
//! `assertion` signs the JWT a device sends to the token endpoint, as the Coze SDKs do (what
//! `curl` needs to try the endpoint, or a device without an SDK must reproduce).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use policy::credential::{p256_spki_pem, pem_encode};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};

/// Why a helper failed. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCmdError {
    #[error("key generation failed")]
    Generate,
    #[error("the key file holds no `PRIVATE KEY` (PKCS#8) PEM block")]
    NotPem,
    #[error("the key is neither a P-256 (ES256) nor an RSA (RS256) PKCS#8 private key")]
    UnsupportedKey,
    #[error("signing failed")]
    Sign,
    #[error("--ttl must be 1-86399 seconds")]
    Ttl,
}

/// A device key pair: the private key stays on the device, the public one goes to the gateway.
pub struct DeviceKeyPair {
    /// PKCS#8 PEM.
    pub private_pem: String,
    /// `SubjectPublicKeyInfo` PEM, as `public_key_pem` in the admin API.
    pub public_pem: String,
}

/// A new ES256 (P-256) key pair.
pub fn generate_es256() -> Result<DeviceKeyPair, DeviceCmdError> {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| DeviceCmdError::Generate)?;
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
        .map_err(|_| DeviceCmdError::Generate)?;
    let point: &[u8; 65] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| DeviceCmdError::Generate)?;
    Ok(DeviceKeyPair {
        private_pem: pem_encode("PRIVATE KEY", pkcs8.as_ref()),
        public_pem: p256_spki_pem(point),
    })
}

enum Signer {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

fn signer(private_pem: &str) -> Result<Signer, DeviceCmdError> {
    let der = crate::config::pem_block(private_pem, "PRIVATE KEY")
        .and_then(Result::ok)
        .ok_or(DeviceCmdError::NotPem)?;
    let rng = SystemRandom::new();
    if let Ok(k) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
    {
        return Ok(Signer::Es256(k));
    }
    RsaKeyPair::from_pkcs8(&der)
        .map(Signer::Rs256)
        .map_err(|_| DeviceCmdError::UnsupportedKey)
}

/// What [`assertion`] signs.
pub struct AssertionRequest<'a> {
    /// The device id (`iss`, the SDKs' `client_id`).
    pub device: &'a str,
    /// The credential's `kid` as registered.
    pub kid: &'a str,
    /// The gateway's host as the device addresses it (`aud`), e.g. `gw.example.com`.
    pub audience: &'a str,
    pub now_s: u64,
    pub ttl_s: u64,
}

/// A signed JWT assertion (ES256 or RS256, from the key) for
/// `POST /api/permission/oauth2/token` with the jwt-bearer grant. Single use: the endpoint
/// remembers its `jti`.
pub fn assertion(private_pem: &str, req: &AssertionRequest<'_>) -> Result<String, DeviceCmdError> {
    if !(1..=86_399).contains(&req.ttl_s) {
        return Err(DeviceCmdError::Ttl);
    }
    let signer = signer(private_pem)?;
    let alg = match signer {
        Signer::Es256(_) => "ES256",
        Signer::Rs256(_) => "RS256",
    };
    let header = serde_json::json!({"alg": alg, "typ": "JWT", "kid": req.kid});
    let claims = serde_json::json!({
        "iss": req.device,
        "aud": req.audience,
        "iat": req.now_s,
        "exp": req.now_s + req.ttl_s,
        "jti": format!("{:032x}", rand::random::<u128>()),
    });
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let rng = SystemRandom::new();
    let sig = match signer {
        Signer::Es256(k) => k
            .sign(&rng, input.as_bytes())
            .map_err(|_| DeviceCmdError::Sign)?
            .as_ref()
            .to_vec(),
        Signer::Rs256(k) => {
            let mut sig = vec![0; k.public().modulus_len()];
            k.sign(
                &signature::RSA_PKCS1_SHA256,
                &rng,
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| DeviceCmdError::Sign)?;
            sig
        }
    };
    Ok(format!("{input}.{}", B64.encode(sig)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::credential::{AssertionPolicy, DevicePublicKey, KeyAlgorithm, verify_assertion};
    use policy::ids::DeviceId;

    fn request(now_s: u64) -> AssertionRequest<'static> {
        AssertionRequest {
            device: "dev-1",
            kid: "k1",
            audience: "gw.example.com",
            now_s,
            ttl_s: 600,
        }
    }

    /// What `keygen` makes, the gateway accepts (the admin API parses the public key the same
    /// way), and what `assertion` signs with it verifies at the token endpoint's check.
    #[test]
    fn generated_keys_sign_assertions_the_gateway_accepts() {
        let pair = generate_es256().unwrap();
        let public = DevicePublicKey::parse("k1", KeyAlgorithm::Es256, &pair.public_pem).unwrap();
        let jwt = assertion(&pair.private_pem, &request(1_000_000)).unwrap();
        let dev = DeviceId::parse("dev-1").unwrap();
        let policy = AssertionPolicy::new(vec!["gw.example.com".into()]);
        let lookup = |d: &DeviceId, kid: &str| (*d == dev && kid == "k1").then_some(&public);
        let v = verify_assertion(&jwt, lookup, &policy, 1_000_001).unwrap();
        assert_eq!(v.device_id, dev);
        let wrong_aud = AssertionPolicy::new(vec!["other".into()]);
        assert!(verify_assertion(&jwt, lookup, &wrong_aud, 1_000_001).is_err());
        let other = generate_es256().unwrap();
        assert_ne!(other.public_pem, pair.public_pem, "every key pair is new");
    }

    /// An RSA device key (PKCS#8) signs RS256 assertions.
    #[test]
    fn rsa_keys_sign_rs256() {
        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../sandbox/tests/keys");
        let private = std::fs::read_to_string(format!("{keys}/test_only_rsa_private.pem")).unwrap();
        let public_pem =
            std::fs::read_to_string(format!("{keys}/test_only_rsa_public.pem")).unwrap();
        let public = DevicePublicKey::parse("k1", KeyAlgorithm::Rs256, &public_pem).unwrap();
        let jwt = assertion(&private, &request(1_000_000)).unwrap();
        let dev = DeviceId::parse("dev-1").unwrap();
        let policy = AssertionPolicy::new(vec!["gw.example.com".into()]);
        let v = verify_assertion(&jwt, |_, _| Some(&public), &policy, 1_000_001).unwrap();
        assert_eq!(v.device_id, dev);
    }

    #[test]
    fn bad_keys_and_lifetimes_are_refused_without_echoing_the_key() {
        let e = assertion("not a key", &request(1)).unwrap_err();
        assert!(matches!(e, DeviceCmdError::NotPem));
        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let e = assertion(garbage, &request(1)).unwrap_err();
        assert!(matches!(e, DeviceCmdError::UnsupportedKey));
        assert!(!e.to_string().contains("AAAA"));
        let pair = generate_es256().unwrap();
        let mut long = request(1);
        long.ttl_s = 86_400;
        assert!(matches!(
            assertion(&pair.private_pem, &long),
            Err(DeviceCmdError::Ttl)
        ));
    }
}
