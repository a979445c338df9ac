//! Device public keys: PEM → algorithm-pinned [`DevicePublicKey`].
//!
//! Accepted inputs:
//! - `RS256`: an RSA key of 2048–8192 bits, as SPKI (`-----BEGIN PUBLIC KEY-----`) or PKCS#1
//!   (`-----BEGIN RSA PUBLIC KEY-----`) PEM.
//! - `ES256`: a P-256 key as SPKI PEM (uncompressed point).
//!
//! The DER is walked by a minimal, bounds-checked reader that knows exactly these three
//! shapes and nothing else; ring gets the inner bytes it expects (the PKCS#1 `RSAPublicKey` for
//! RSA, the 65-byte uncompressed point for EC).
//!
//! Not checked here: that an EC point is on the curve (ring has no public API for it without a
//! signature; an off-curve point simply never verifies) and RSA key quality beyond size and
//! exponent shape.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Largest PEM text accepted (an 8192-bit SPKI PEM is about 1.4 KiB).
const MAX_PEM_LEN: usize = 16 * 1024;
/// Maximum key id length.
pub const MAX_KID_LEN: usize = 128;
/// RSA modulus bounds enforced by `RSA_PKCS1_2048_8192_SHA256`.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// rsaEncryption, 1.2.840.113549.1.1.1
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// id-ecPublicKey, 1.2.840.10045.2.1
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 / secp256r1, 1.2.840.10045.3.1.7
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_NULL: u8 = 0x05;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;

/// A JWS algorithm a device key is pinned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (what Coze uses).
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256; JWS signatures are the fixed 64-byte `r || s`.
    #[serde(rename = "ES256")]
    Es256,
}

impl KeyAlgorithm {
    /// The JWS `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Rs256 => "RS256",
            KeyAlgorithm::Es256 => "ES256",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = CredentialError;

    /// Exact, case-sensitive JWS names (`RS256`, `ES256`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "RS256" => Ok(KeyAlgorithm::Rs256),
            "ES256" => Ok(KeyAlgorithm::Es256),
            _ => Err(CredentialError::UnsupportedAlgorithm),
        }
    }
}

/// What kind of key a PEM actually contained (for mismatch errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Rsa => "an RSA key",
            KeyKind::EcP256 => "a P-256 EC key",
        })
    }
}

/// Why a device public key was refused (at registration or config load). Messages contain no
/// key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error(
        "key id must be 1-{MAX_KID_LEN} visible ASCII characters other than / ? # % and quotes"
    )]
    BadKid,
    #[error("unsupported key algorithm (supported: RS256, ES256)")]
    UnsupportedAlgorithm,
    #[error("key is not a single PEM block")]
    NotPem,
    #[error("PEM holds a private key; register the public key only")]
    PrivateKey,
    #[error("unsupported PEM type (expected PUBLIC KEY or RSA PUBLIC KEY)")]
    UnsupportedPemType,
    #[error("PEM body is not valid base64")]
    BadBase64,
    #[error("public key DER is malformed")]
    BadDer,
    #[error("public key type is not supported (expected RSA or EC P-256)")]
    UnsupportedKeyType,
    #[error("EC curve is not supported (ES256 needs P-256)")]
    UnsupportedCurve,
    #[error("key is declared {declared} but the PEM holds {found}")]
    AlgorithmMismatch {
        declared: KeyAlgorithm,
        found: KeyKind,
    },
    #[error("RSA key has {bits} bits; {RSA_MIN_BITS}-{RSA_MAX_BITS} are required")]
    RsaKeySize { bits: usize },
    #[error("RSA public exponent is not acceptable")]
    RsaExponent,
    #[error("EC public key must be an uncompressed P-256 point")]
    EcPoint,
}

/// A device's public key, pinned to one algorithm. Build with [`DevicePublicKey::parse`].
#[derive(Clone, PartialEq, Eq)]
pub struct DevicePublicKey {
    kid: String,
    algorithm: KeyAlgorithm,
    /// PKCS#1 `RSAPublicKey` DER (RS256) or the 65-byte uncompressed point (ES256).
    ring_key: Vec<u8>,
    bits: usize,
}

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePublicKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// Same rules as [`crate::ids::DeviceId`]: kids may appear in admin paths.
fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'%' | b'"' | b'\\'))
}

impl DevicePublicKey {
    /// Parses and validates a PEM public key for `algorithm`. The key can then only verify
    /// signatures made with that algorithm.
    pub fn parse(
        kid: &str,
        algorithm: KeyAlgorithm,
        pem: &str,
    ) -> Result<DevicePublicKey, CredentialError> {
        if !valid_kid(kid) {
            return Err(CredentialError::BadKid);
        }
        let (label, der) = decode_pem(pem)?;
        let parsed = match label {
            PemLabel::Spki => parse_spki(&der)?,
            PemLabel::Pkcs1Rsa => {
                let bits = check_rsa_public_key(&der)?;
                Parsed::Rsa { key: der, bits }
            }
        };
        let (kind, ring_key, bits) = match parsed {
            Parsed::Rsa { key, bits } => (KeyKind::Rsa, key, bits),
            Parsed::EcP256 { point } => (KeyKind::EcP256, point, 256),
        };
        match (algorithm, kind) {
            (KeyAlgorithm::Rs256, KeyKind::Rsa) => {
                if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                    return Err(CredentialError::RsaKeySize { bits });
                }
            }
            (KeyAlgorithm::Es256, KeyKind::EcP256) => {}
            (declared, found) => {
                return Err(CredentialError::AlgorithmMismatch { declared, found });
            }
        }
        Ok(DevicePublicKey {
            kid: kid.to_owned(),
            algorithm,
            ring_key,
            bits,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm this key is pinned to.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// Key size in bits (RSA modulus size, or 256 for P-256).
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Verifies a JWS signature over `message` with the pinned algorithm.
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let alg: &'static dyn ring::signature::VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::Rs256 => &RSA_PKCS1_2048_8192_SHA256,
            KeyAlgorithm::Es256 => &ECDSA_P256_SHA256_FIXED,
        };
        UnparsedPublicKey::new(alg, &self.ring_key)
            .verify(message, signature)
            .is_ok()
    }
}

enum PemLabel {
    Spki,
    Pkcs1Rsa,
}

enum Parsed {
    Rsa { key: Vec<u8>, bits: usize },
    EcP256 { point: Vec<u8> },
}

/// SPKI header for a P-256 key: SEQUENCE { SEQUENCE { ecPublicKey, prime256v1 }, BIT STRING
/// (66 bytes: 0 unused bits + 65-byte point) }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Wraps a DER blob as PEM with 64-column lines.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The SPKI PEM (`-----BEGIN PUBLIC KEY-----`, what [`DevicePublicKey::parse`] takes for
/// `ES256`) of an uncompressed P-256 point, as ring's `EcdsaKeyPair::public_key` gives it.
pub fn p256_spki_pem(point: &[u8; 65]) -> String {
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(point);
    pem_encode("PUBLIC KEY", &der)
}

/// Decodes exactly one PEM block (surrounding whitespace allowed).
fn decode_pem(pem: &str) -> Result<(PemLabel, Vec<u8>), CredentialError> {
    if pem.len() > MAX_PEM_LEN {
        return Err(CredentialError::NotPem);
    }
    let pem = pem.trim();
    let rest = pem
        .strip_prefix("-----BEGIN ")
        .ok_or(CredentialError::NotPem)?;
    let (label, rest) = rest.split_once("-----").ok_or(CredentialError::NotPem)?;
    let end = format!("-----END {label}-----");
    let body = rest
        .strip_suffix(end.as_str())
        .ok_or(CredentialError::NotPem)?;
    if body.contains("-----") {
        return Err(CredentialError::NotPem);
    }
    let label = match label {
        "PUBLIC KEY" => PemLabel::Spki,
        "RSA PUBLIC KEY" => PemLabel::Pkcs1Rsa,
        l if l.contains("PRIVATE KEY") => return Err(CredentialError::PrivateKey),
        _ => return Err(CredentialError::UnsupportedPemType),
    };
    let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let der = STANDARD
        .decode(b64.as_bytes())
        .map_err(|_| CredentialError::BadBase64)?;
    Ok((label, der))
}

/// SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
fn parse_spki(der: &[u8]) -> Result<Parsed, CredentialError> {
    let mut outer = Der::new(der);
    let spki = outer.read(TAG_SEQUENCE)?;
    outer.finish()?;
    let mut spki = Der::new(spki);
    let mut alg_id = Der::new(spki.read(TAG_SEQUENCE)?);
    let key_bits = spki.read(TAG_BIT_STRING)?;
    spki.finish()?;
    // BIT STRING content: one "unused bits" byte (must be 0 for keys), then the key.
    let key = match key_bits.split_first() {
        Some((0, key)) => key,
        _ => return Err(CredentialError::BadDer),
    };
    let oid = alg_id.read(TAG_OID)?;
    if oid == OID_RSA {
        // parameters: NULL (required by RFC 3279; tolerate absence as some encoders do).
        if !alg_id.is_empty() {
            let params = alg_id.read(TAG_NULL)?;
            if !params.is_empty() {
                return Err(CredentialError::BadDer);
            }
        }
        alg_id.finish()?;
        let bits = check_rsa_public_key(key)?;
        Ok(Parsed::Rsa {
            key: key.to_vec(),
            bits,
        })
    } else if oid == OID_EC {
        let curve = alg_id.read(TAG_OID)?;
        alg_id.finish()?;
        if curve != OID_P256 {
            return Err(CredentialError::UnsupportedCurve);
        }
        if key.len() != 65 || key.first() != Some(&0x04) {
            return Err(CredentialError::EcPoint);
        }
        Ok(Parsed::EcP256 {
            point: key.to_vec(),
        })
    } else {
        Err(CredentialError::UnsupportedKeyType)
    }
}

/// RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }. Returns the modulus
/// size in bits. Enforces the DER rules ring will enforce, so a key that parses here verifies.
fn check_rsa_public_key(der: &[u8]) -> Result<usize, CredentialError> {
    let mut outer = Der::new(der);
    let mut seq = Der::new(outer.read(TAG_SEQUENCE)?);
    outer.finish()?;
    let n = positive_integer(seq.read(TAG_INTEGER)?)?;
    let e = positive_integer(seq.read(TAG_INTEGER)?)?;
    seq.finish()?;
    let Some(&first) = n.first() else {
        return Err(CredentialError::BadDer);
    };
    let bits = (n.len() - 1) * 8 + (8 - first.leading_zeros() as usize);
    // ring: 3 <= e <= 2^33 - 1, e odd.
    let e_value = e.iter().try_fold(0u64, |acc, &b| {
        if acc >> 56 != 0 {
            None
        } else {
            Some((acc << 8) | u64::from(b))
        }
    });
    match e_value {
        Some(v) if (3..(1 << 33)).contains(&v) && v % 2 == 1 => Ok(bits),
        _ => Err(CredentialError::RsaExponent),
    }
}

/// The magnitude bytes of a non-negative, minimally encoded DER INTEGER (leading zero
/// stripped).
fn positive_integer(bytes: &[u8]) -> Result<&[u8], CredentialError> {
    match bytes {
        [] => Err(CredentialError::BadDer),
        [b, ..] if b & 0x80 != 0 => Err(CredentialError::BadDer), // negative
        [0, rest @ ..] if rest.is_empty() => Ok(rest),
        [0, b, ..] if b & 0x80 == 0 => Err(CredentialError::BadDer), // not minimal
        [0, rest @ ..] => Ok(rest),
        all => Ok(all),
    }
}

/// A minimal DER reader: definite lengths only, at most 2 length bytes (keys are < 64 KiB),
/// minimal length encoding, every access bounds-checked.
struct Der<'a> {
    buf: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(buf: &'a [u8]) -> Der<'a> {
        Der { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Reads one TLV with tag `tag` and returns its contents.
    fn read(&mut self, tag: u8) -> Result<&'a [u8], CredentialError> {
        let bad = CredentialError::BadDer;
        let (&t, rest) = self.buf.split_first().ok_or(bad.clone())?;
        if t != tag {
            return Err(bad);
        }
        let (&l0, rest) = rest.split_first().ok_or(bad.clone())?;
        let (len, rest) = match l0 {
            0..=0x7f => (usize::from(l0), rest),
            0x81 => match rest {
                [l, rest @ ..] if *l >= 0x80 => (usize::from(*l), rest),
                _ => return Err(bad),
            },
            0x82 => match rest {
                [hi, lo, rest @ ..] if *hi != 0 => {
                    ((usize::from(*hi) << 8) | usize::from(*lo), rest)
                }
                _ => return Err(bad),
            },
            _ => return Err(bad),
        };
        if rest.len() < len {
            return Err(bad);
        }
        let (value, rest) = rest.split_at(len);
        self.buf = rest;
        Ok(value)
    }

    /// Fails if bytes are left over.
    fn finish(&self) -> Result<(), CredentialError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CredentialError::BadDer)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const RSA_SPKI: &str = include_str!("../../tests/keys/rsa2048_public_spki.pem");
    pub(crate) const RSA_PKCS1: &str = include_str!("../../tests/keys/rsa2048_public_pkcs1.pem");
    const RSA_1024: &str = include_str!("../../tests/keys/rsa1024_public_spki.pem");
    pub(crate) const P256_SPKI: &str = include_str!("../../tests/keys/p256_public_spki.pem");
    const P384_SPKI: &str = include_str!("../../tests/keys/p384_public_spki.pem");

    /// [`super::p256_spki_pem`] of a raw point (panics unless it is 65 bytes).
    pub(crate) fn p256_spki_pem(point: &[u8]) -> String {
        super::p256_spki_pem(point.try_into().unwrap())
    }

    #[test]
    fn parses_rsa_spki_and_pkcs1_to_the_same_key() {
        let a = DevicePublicKey::parse("k1", KeyAlgorithm::Rs256, RSA_SPKI).unwrap();
        let b = DevicePublicKey::parse("k1", KeyAlgorithm::Rs256, RSA_PKCS1).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.bits(), 2048);
        assert_eq!(a.algorithm(), KeyAlgorithm::Rs256);
        // CRLF line endings and surrounding whitespace are fine.
        let crlf = format!("\n  {}  \n", RSA_SPKI.replace('\n', "\r\n"));
        assert_eq!(
            DevicePublicKey::parse("k1", KeyAlgorithm::Rs256, &crlf).unwrap(),
            a
        );
    }

    #[test]
    fn parses_openssl_p256_and_matches_fixed_prefix() {
        let k = DevicePublicKey::parse("e1", KeyAlgorithm::Es256, P256_SPKI).unwrap();
        assert_eq!(k.bits(), 256);
        let rebuilt = p256_spki_pem(&k.ring_key);
        assert_eq!(rebuilt.trim(), P256_SPKI.trim());
    }

    #[test]
    fn rejects_algorithm_mismatch_both_ways() {
        assert_eq!(
            DevicePublicKey::parse("k", KeyAlgorithm::Rs256, P256_SPKI),
            Err(CredentialError::AlgorithmMismatch {
                declared: KeyAlgorithm::Rs256,
                found: KeyKind::EcP256
            })
        );
        for pem in [RSA_SPKI, RSA_PKCS1] {
            assert_eq!(
                DevicePublicKey::parse("k", KeyAlgorithm::Es256, pem),
                Err(CredentialError::AlgorithmMismatch {
                    declared: KeyAlgorithm::Es256,
                    found: KeyKind::Rsa
                })
            );
        }
        let msg = DevicePublicKey::parse("k", KeyAlgorithm::Rs256, P256_SPKI)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "key is declared RS256 but the PEM holds a P-256 EC key"
        );
    }

    #[test]
    fn rejects_small_rsa_other_curves_and_private_keys() {
        assert_eq!(
            DevicePublicKey::parse("k", KeyAlgorithm::Rs256, RSA_1024),
            Err(CredentialError::RsaKeySize { bits: 1024 })
        );
        assert_eq!(
            DevicePublicKey::parse("k", KeyAlgorithm::Es256, P384_SPKI),
            Err(CredentialError::UnsupportedCurve)
        );
        let private = pem_encode("PRIVATE KEY", b"whatever");
        assert_eq!(
            DevicePublicKey::parse("k", KeyAlgorithm::Rs256, &private),
            Err(CredentialError::PrivateKey)
        );
        assert_eq!(
            DevicePublicKey::parse("k", KeyAlgorithm::Rs256, &pem_encode("CERTIFICATE", b"x")),
            Err(CredentialError::UnsupportedPemType)
        );
    }

    #[test]
    fn rejects_bad_kids_and_algorithms() {
        for kid in ["", "a/b", "a b", &"x".repeat(129)] {
            assert_eq!(
                DevicePublicKey::parse(kid, KeyAlgorithm::Rs256, RSA_SPKI),
                Err(CredentialError::BadKid)
            );
        }
        assert_eq!("RS256".parse::<KeyAlgorithm>(), Ok(KeyAlgorithm::Rs256));
        assert_eq!("ES256".parse::<KeyAlgorithm>(), Ok(KeyAlgorithm::Es256));
        for bad in ["none", "HS256", "rs256", "PS256", "ES384"] {
            assert_eq!(
                bad.parse::<KeyAlgorithm>(),
                Err(CredentialError::UnsupportedAlgorithm)
            );
        }
    }

    #[test]
    fn rejects_malformed_pem_and_der() {
        let two = format!("{RSA_SPKI}{RSA_SPKI}");
        for bad in [
            "",
            "hello",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n",
            two.as_str(),
        ] {
            assert!(DevicePublicKey::parse("k", KeyAlgorithm::Rs256, bad).is_err());
        }
        assert_eq!(
            DevicePublicKey::parse(
                "k",
                KeyAlgorithm::Rs256,
                "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----"
            ),
            Err(CredentialError::BadBase64)
        );
        // Every truncation of a valid SPKI fails cleanly.
        let (_, der) = decode_pem(RSA_SPKI).unwrap();
        for cut in 0..der.len() {
            assert!(
                DevicePublicKey::parse(
                    "k",
                    KeyAlgorithm::Rs256,
                    &pem_encode("PUBLIC KEY", &der[..cut])
                )
                .is_err()
            );
        }
        // Trailing garbage after the SPKI.
        let mut long = der.clone();
        long.push(0);
        assert_eq!(
            DevicePublicKey::parse("k", KeyAlgorithm::Rs256, &pem_encode("PUBLIC KEY", &long)),
            Err(CredentialError::BadDer)
        );
        // Compressed EC point.
        let (_, ec) = decode_pem(P256_SPKI).unwrap();
        let mut compressed = ec.clone();
        compressed[26] = 0x02;
        assert_eq!(
            DevicePublicKey::parse(
                "k",
                KeyAlgorithm::Es256,
                &pem_encode("PUBLIC KEY", &compressed)
            ),
            Err(CredentialError::EcPoint)
        );
    }

    proptest::proptest! {
        #[test]
        fn random_der_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = DevicePublicKey::parse("k", KeyAlgorithm::Rs256, &pem_encode("PUBLIC KEY", &bytes));
            let _ = DevicePublicKey::parse("k", KeyAlgorithm::Es256, &pem_encode("PUBLIC KEY", &bytes));
            let _ = DevicePublicKey::parse("k", KeyAlgorithm::Rs256, &pem_encode("RSA PUBLIC KEY", &bytes));
        }

        #[test]
        fn mutated_spki_never_panics(pos in 0usize..294, val in proptest::num::u8::ANY) {
            let (_, mut der) = decode_pem(RSA_SPKI).unwrap();
            let i = pos % der.len();
            der[i] = val;
            let _ = DevicePublicKey::parse("k", KeyAlgorithm::Rs256, &pem_encode("PUBLIC KEY", &der));
        }
    }
}
