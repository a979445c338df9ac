//! OAuth JWT token exchange (coze-api.md §2.2, §2.7).
//!
//! Endpoints (all `POST`, bare OAuth JSON, no envelope):
//! - `/api/permission/oauth2/token`
//! - `/api/permission/oauth2/account/{account_id}/token`
//! - `/api/permission/oauth2/enterprise_id/{enterprise_id}/token`
//!
//! The `Authorization: Bearer <JWT>` assertion must be RS256-signed by one of
//! [`crate::SandboxConfig::app_keys`] (looked up by header `kid`; `alg` must be `RS256`), with
//! `iss` equal to the key's app id, an `aud` accepted by [`SandboxState::audience_ok`],
//! `exp > now`, `iat <= now + 60` and a never-seen `jti` (single use; a jti is only burnt by a
//! request whose signature and claims were otherwise valid).
//!
//! Body `{"grant_type":"urn:ietf:params:oauth:grant-type:jwt-bearer","duration_seconds":N,
//! "scope":{...}}`: `duration_seconds` defaults to 900 and is clamped to `[1, 86399]`.
//! Success: `{"access_token":"czs_…","expires_in":<absolute unix s>,"token_type":"Bearer"}`; the
//! token is recorded with `session_name`, `session_context.device_info.{device_id,
//! custom_consumer}` and `scope` so later API calls are attributed.
//!
//! Errors: `{"error_code","error_message","error"}` with HTTP 401 `invalid_client` (bad or
//! unknown key, signature, claims, replay), 400 `invalid_request` / `unsupported_grant_type`,
//! and HTTP 503 `internal_error` while [`crate::Switches::token_endpoint_down`] is set.
//! The per-request fault knobs of [`crate::faults`] (latency, status, rate_limit) apply too.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::Rng;
use serde_json::{Value, json};

use crate::auth::now_unix;
use crate::envelope::{new_logid, with_logid};
use crate::faults::Fault;
use crate::state::{MintedToken, SandboxState};

/// The only grant type the sandbox supports.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Default access token lifetime in seconds.
pub const DEFAULT_DURATION: u64 = 900;
/// Maximum access token lifetime in seconds.
pub const MAX_DURATION: u64 = 86_399;
/// Allowed clock skew for `iat`.
pub const IAT_SKEW: u64 = 60;

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/api/permission/oauth2/token", post(token))
        .route(
            "/api/permission/oauth2/account/{account_id}/token",
            post(token),
        )
        .route(
            "/api/permission/oauth2/enterprise_id/{enterprise_id}/token",
            post(token),
        )
}

/// An OAuth-shaped error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl OAuthError {
    fn invalid_client(msg: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_client",
            message: msg.into(),
        }
    }
    fn invalid_request(msg: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: msg.into(),
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let logid = new_logid();
        let body = json!({
            "error_code": self.code,
            "error_message": self.message,
            "error": self.code,
        });
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        with_logid(resp, &logid)
    }
}

async fn token(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = Fault::from_request(&headers, q.as_deref());
    if let Err(e) = fault.before_answer().await {
        return e.into_response();
    }
    if st.switches.token_endpoint_down.load(Ordering::Relaxed) {
        return OAuthError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "internal_error",
            message: "token endpoint unavailable (sandbox switch)".into(),
        }
        .into_response();
    }
    match exchange(&st, &headers, &body, now_unix()) {
        Ok(v) => {
            let logid = new_logid();
            let mut resp = (StatusCode::OK, v.to_string()).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            with_logid(resp, &logid)
        }
        Err(e) => e.into_response(),
    }
}

/// Validates the assertion and body, mints and records a token.
fn exchange(
    st: &SandboxState,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<Value, OAuthError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|_| OAuthError::invalid_request("invalid request: body is not JSON"))?
    };
    match body.get("grant_type").and_then(Value::as_str) {
        None => return Err(OAuthError::invalid_request("invalid request: grant_type")),
        Some(JWT_BEARER_GRANT) => {}
        Some(other) => {
            return Err(OAuthError {
                status: StatusCode::BAD_REQUEST,
                code: "unsupported_grant_type",
                message: format!("unsupported grant type: {other}"),
            });
        }
    }
    let duration = match body.get("duration_seconds") {
        None | Some(Value::Null) => DEFAULT_DURATION,
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .ok_or_else(|| OAuthError::invalid_request("invalid request: duration_seconds"))?
            .clamp(1, MAX_DURATION as i64) as u64,
    };
    let jwt = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("invalid request: missing JWT assertion"))?;
    let claims = verify_jwt(st, jwt, now)?;

    let ctx = claims
        .get("session_context")
        .and_then(|c| c.get("device_info"));
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let minted = MintedToken {
        app_id: s(claims.get("iss")).unwrap_or_default(),
        session_name: s(claims.get("session_name")),
        device_id: s(ctx.and_then(|d| d.get("device_id"))),
        custom_consumer: s(ctx.and_then(|d| d.get("custom_consumer"))),
        scope: body.get("scope").filter(|v| !v.is_null()).cloned(),
        expires_at: now + duration,
    };
    let token = random_token();
    st.record_token(token.clone(), minted);
    st.counters.token_exchanges.fetch_add(1, Ordering::Relaxed);
    Ok(json!({
        "access_token": token,
        "expires_in": now + duration,
        "token_type": "Bearer",
    }))
}

fn random_token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..48)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("czs_{tail}")
}

fn b64url(part: &str) -> Result<Vec<u8>, OAuthError> {
    URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| OAuthError::invalid_client("invalid JWT: bad base64url"))
}

/// Verifies an RS256 JWT against the configured app keys; returns its claims.
pub fn verify_jwt(st: &SandboxState, jwt: &str, now: u64) -> Result<Value, OAuthError> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OAuthError::invalid_client(
            "invalid JWT: expected three parts",
        ));
    };
    let header: Value = serde_json::from_slice(&b64url(h)?)
        .map_err(|_| OAuthError::invalid_client("invalid JWT: header is not JSON"))?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg != "RS256" {
        return Err(OAuthError::invalid_client(format!(
            "invalid JWT: alg {alg:?} not allowed, RS256 required"
        )));
    }
    let kid = header.get("kid").and_then(Value::as_str).unwrap_or("");
    let key = st
        .config
        .app_keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| OAuthError::invalid_client(format!("invalid JWT: unknown kid {kid:?}")))?;
    let der = rsa_public_key_der(&key.public_key_pem)
        .map_err(|e| OAuthError::invalid_client(format!("app key {kid:?} is unusable: {e}")))?;
    let signature = b64url(sig)?;
    let signed = &jwt.as_bytes()[..h.len() + 1 + p.len()];
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, der)
        .verify(signed, &signature)
        .map_err(|_| OAuthError::invalid_client("invalid JWT: bad signature"))?;

    let claims: Value = serde_json::from_slice(&b64url(p)?)
        .map_err(|_| OAuthError::invalid_client("invalid JWT: payload is not JSON"))?;
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if iss != key.app_id {
        return Err(OAuthError::invalid_client(format!(
            "invalid JWT: iss {iss:?} does not own kid {kid:?}"
        )));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => st.audience_ok(a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| st.audience_ok(a)),
        _ => false,
    };
    if !aud_ok {
        return Err(OAuthError::invalid_client("invalid JWT: aud not accepted"));
    }
    let num = |k: &str| claims.get(k).and_then(Value::as_u64);
    let exp = num("exp").ok_or_else(|| OAuthError::invalid_client("invalid JWT: exp missing"))?;
    if exp <= now {
        return Err(OAuthError::invalid_client("invalid JWT: expired"));
    }
    let iat = num("iat").ok_or_else(|| OAuthError::invalid_client("invalid JWT: iat missing"))?;
    if iat > now + IAT_SKEW {
        return Err(OAuthError::invalid_client("invalid JWT: iat in the future"));
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("invalid request: jti"))?;
    if !st.use_jti(jti) {
        return Err(OAuthError::invalid_client("invalid JWT: jti already used"));
    }
    Ok(claims)
}

/// PKCS#1 `RSAPublicKey` DER from a PEM: `PUBLIC KEY` (SubjectPublicKeyInfo) or
/// `RSA PUBLIC KEY` (PKCS#1).
pub fn rsa_public_key_der(pem: &str) -> Result<Vec<u8>, &'static str> {
    let pkcs1 = pem.contains("BEGIN RSA PUBLIC KEY");
    let b64: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(b64).map_err(|_| "PEM is not base64")?;
    if pkcs1 {
        return Ok(der);
    }
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
    let (tag, spki, _) = der_tlv(&der).ok_or("bad DER")?;
    if tag != 0x30 {
        return Err("SPKI is not a SEQUENCE");
    }
    let (tag, _alg, rest) = der_tlv(spki).ok_or("bad DER")?;
    if tag != 0x30 {
        return Err("SPKI algorithm is not a SEQUENCE");
    }
    let (tag, bits, _) = der_tlv(rest).ok_or("bad DER")?;
    match (tag, bits.split_first()) {
        (0x03, Some((0, key))) => Ok(key.to_vec()),
        _ => Err("SPKI key is not a BIT STRING"),
    }
}

/// One DER TLV: (tag, contents, rest).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_walker_handles_long_lengths() {
        let mut v = vec![0x30, 0x82, 0x01, 0x00];
        v.extend(std::iter::repeat_n(7u8, 256));
        let (tag, body, rest) = der_tlv(&v).unwrap_or((0, &[], &[]));
        assert_eq!((tag, body.len(), rest.len()), (0x30, 256, 0));
        assert!(der_tlv(&[0x30, 0x05, 1]).is_none());
    }

    #[test]
    fn spki_pem_unwraps_to_pkcs1() {
        let pem = include_str!("../tests/keys/test_only_rsa_public.pem");
        let der = rsa_public_key_der(pem).unwrap_or_default();
        // RSAPublicKey is itself a SEQUENCE.
        assert_eq!(der.first(), Some(&0x30));
        assert!(der.len() > 256);
    }
}
