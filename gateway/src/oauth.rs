//! The device token endpoint, Coze-compatible: `POST /api/permission/oauth2/token` on the
//! device listener (also the `/account/{id}/token` and `/enterprise_id/{id}/token` variants
//! the SDKs can be pointed at).
//!
//! Grants:
//! - `urn:ietf:params:oauth:grant-type:jwt-bearer`: `Authorization: Bearer <JWT the device
//!   signed>`; `iss` = device id, `kid` = one of the device's public keys (algorithm pinned per
//!   key), `aud` = a configured audience or the `Host` the device connected to, bounded
//!   `iat`/`exp`, `jti` single use (`policy::credential`);
//! - `client_credentials`: `client_id` = device id, `client_secret` = a generated secret
//!   (salted PBKDF2, compared in constant time; unknown devices are checked against a dummy
//!   hash so timing does not reveal which ids exist).
//!
//! Answers `{"access_token","expires_in": absolute unix seconds,"token_type":"Bearer"}`; errors
//! use Coze's OAuth shape `{"error_code","error_message","error"}`. Requests are rate limited
//! per source address (before any crypto) and per claimed device.

use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use pingora::prelude::*;
use policy::credential::{
    AssertionPolicy, DeviceSecret, RateLimiter, ReplayCache, SecretHash, verify_assertion,
};
use policy::ids::DeviceId;
use serde::Deserialize;

use crate::devices::CredentialRef;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::respond;
use crate::state::{GatewayState, now_ms};

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Largest token request body.
const MAX_BODY: usize = 16 * 1024;
/// Per source address: 30 requests per 10 s, burst 30.
const PER_IP: (u32, u64, u32) = (30, 10_000, 30);
/// Per claimed device *and* source address: 10 requests per minute, burst 10. Keyed by both,
/// because the claim is checked only after the limit (it costs crypto): keyed by the device
/// alone, anyone could keep a device locked out of the endpoint by sending requests in its
/// name. The id is parsed first, so every key is bounded in size.
const PER_DEVICE: (u32, u64, u32) = (10, 60_000, 10);
/// Keys tracked by each limiter.
const LIMITER_KEYS: usize = 100_000;

/// Per-process state of the token endpoint.
pub struct TokenEndpoint {
    per_ip: Mutex<RateLimiter<IpAddr>>,
    per_device: Mutex<RateLimiter<(DeviceId, Option<IpAddr>)>>,
    replay: Mutex<ReplayCache>,
    /// When this process started (unix seconds). The replay cache is memory: in embedded
    /// mode assertions issued before the start are refused, since their `jti` may have been
    /// used before a restart (`AssertionPolicy::issued_after_s`). Cluster nodes claim `jti`s
    /// in Redis, which outlives them.
    started_s: u64,
    /// Verified against when the `client_id` is unknown, so timing does not tell.
    dummy: SecretHash,
}

fn limiter<K: std::hash::Hash + Eq + Clone>((n, ms, burst): (u32, u64, u32)) -> RateLimiter<K> {
    RateLimiter::per_period(
        nz32(n),
        NonZeroU64::new(ms).unwrap_or(NonZeroU64::MIN),
        nz32(burst),
        NonZeroUsize::new(LIMITER_KEYS).unwrap_or(NonZeroUsize::MIN),
    )
}

fn nz32(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl TokenEndpoint {
    /// `replay_entries`: live `jti`s remembered (`tokens.replay_cache_entries`; full = refuse
    /// new assertions, never forget a live one).
    pub fn new(replay_entries: usize) -> TokenEndpoint {
        TokenEndpoint {
            per_ip: Mutex::new(limiter(PER_IP)),
            per_device: Mutex::new(limiter(PER_DEVICE)),
            replay: Mutex::new(ReplayCache::new(
                NonZeroUsize::new(replay_entries).unwrap_or(NonZeroUsize::MIN),
            )),
            started_s: now_ms() / 1000,
            dummy: DeviceSecret::generate(rand::random(), rand::random()).1,
        }
    }
}

/// True for the token endpoint's paths.
pub fn is_token_path(path: &str) -> bool {
    if path == "/api/permission/oauth2/token" {
        return true;
    }
    let Some(rest) = path.strip_prefix("/api/permission/oauth2/") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    matches!(parts.as_slice(), ["account" | "enterprise_id", id, "token"] if !id.is_empty())
}

/// An OAuth error answer.
#[derive(Debug)]
struct OAuthError {
    status: u16,
    code: &'static str,
    message: String,
    retry_after_s: Option<u64>,
}

impl OAuthError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> OAuthError {
        OAuthError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }
    fn invalid_request(m: impl Into<String>) -> OAuthError {
        OAuthError::new(400, "invalid_request", m)
    }
    fn invalid_client(m: impl Into<String>) -> OAuthError {
        OAuthError::new(401, "invalid_client", m)
    }
    fn rate_limited(retry_after_s: u64) -> OAuthError {
        OAuthError {
            retry_after_s: Some(retry_after_s.max(1)),
            ..OAuthError::new(429, "rate_limited", "too many token requests")
        }
    }
    fn from_code(code: &'static str, message: String) -> OAuthError {
        match code {
            "invalid_request" => OAuthError::invalid_request(message),
            "invalid_client" => OAuthError::invalid_client(message),
            _ => OAuthError::new(503, "internal_error", message),
        }
    }
}

#[derive(Deserialize, Default)]
struct TokenRequest {
    grant_type: Option<String>,
    duration_seconds: Option<u64>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// The unverified `iss` of a compact JWT (only used to find the device whose keys then
/// verify it; the signature check proves it).
fn peek_issuer(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    if payload.len() > 8192 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

async fn read_body(session: &mut Session) -> Result<Bytes, OAuthError> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(OAuthError::new(
                        413,
                        "invalid_request",
                        "request body too large",
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Bytes::from(body)),
            Err(_) => {
                return Err(OAuthError::invalid_request(
                    "could not read the request body",
                ));
            }
        }
    }
}

fn check_limit<K: std::hash::Hash + Eq + Clone>(
    l: &Mutex<RateLimiter<K>>,
    key: &K,
    now: u64,
) -> Result<(), OAuthError> {
    let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
    l.check(key, now)
        .map_err(|r| OAuthError::rate_limited(r.secs_ceil()))
}

fn mint(
    state: &GatewayState,
    device: &DeviceId,
    ttl: Option<u64>,
    grant: &'static str,
    cred: CredentialRef,
) -> Result<crate::tokens::Minted, OAuthError> {
    crate::tokens::mint_for_device(state, device, ttl, grant, Some(cred)).map_err(|e| match e {
        crate::tokens::MintError::Disabled => {
            OAuthError::new(403, "access_deny", "device is disabled")
        }
        _ => OAuthError::invalid_client("invalid client"),
    })
}

/// With tokens bound to client certificates (`device_listener.tls.bind_device`), a
/// connection whose certificate names one device cannot obtain tokens for another.
fn check_cert_device(
    cert: Option<&crate::device_tls::CertDevice>,
    device: &str,
) -> Result<(), OAuthError> {
    match cert {
        Some(cert) if !cert.allows(device) => Err(OAuthError::invalid_client(
            "the client certificate names another device",
        )),
        _ => Ok(()),
    }
}

async fn jwt_bearer(
    state: &GatewayState,
    session: &Session,
    cert: Option<&crate::device_tls::CertDevice>,
    req: &TokenRequest,
    ip: Option<IpAddr>,
) -> Result<crate::tokens::Minted, OAuthError> {
    let headers = &session.req_header().headers;
    let jwt = crate::proxy::admit::bearer(
        headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    )
    .ok_or_else(|| {
        OAuthError::invalid_request("invalid request: Authorization (the signed JWT) is missing")
    })?;
    let iss = peek_issuer(jwt).ok_or_else(|| {
        OAuthError::invalid_request("invalid request: the JWT is malformed or has no iss")
    })?;
    check_cert_device(cert, &iss)?;
    let ep = &state.oauth;
    let device_id =
        DeviceId::parse(&iss).map_err(|_| OAuthError::invalid_client("invalid client"))?;
    check_limit(&ep.per_device, &(device_id.clone(), ip), now_ms())?;
    let device = state
        .devices
        .get(&device_id)
        .ok_or_else(|| OAuthError::invalid_client("invalid client"))?;
    let creds = device.credentials();
    let t = &state.config.tokens;
    let mut audiences = t.audiences.clone();
    if t.audience_from_host
        && let Some(host) = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    {
        audiences.push(host.to_owned());
    }
    let mut policy = AssertionPolicy::new(audiences);
    policy.max_lifetime_s = t.max_assertion_lifetime.as_secs();
    policy.max_skew_s = t.max_assertion_skew.as_secs();
    if state.cluster.is_none() {
        policy.issued_after_s = ep.started_s;
    }
    let now_s = now_ms() / 1000;
    let a = verify_assertion(
        jwt,
        |dev, kid| {
            if *dev == device.id {
                creds.key(kid)
            } else {
                None
            }
        },
        &policy,
        now_s,
    )
    .map_err(|e| OAuthError::from_code(e.oauth_code(), e.to_string()))?;
    // The credential the assertion was verified with, from the same snapshot: if it is
    // replaced meanwhile, minting refuses rather than naming its successor.
    let cred = creds
        .reference(&a.kid)
        .ok_or_else(|| OAuthError::invalid_client("invalid client"))?;
    if !device.enabled.load(std::sync::atomic::Ordering::Acquire) {
        return Err(OAuthError::new(403, "access_deny", "device is disabled"));
    }
    ep.replay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check_and_insert(&a.device_id, &a.jti, a.exp, now_s)
        .map_err(|r| OAuthError::from_code(r.oauth_code(), r.to_string()))?;
    if let Some(cluster) = &state.cluster {
        // Single use across the cluster. Fail closed: without Redis a replay on another node
        // could not be seen (devices with valid access tokens are unaffected).
        match cluster.claim_jti(a.device_id.as_str(), &a.jti, a.exp).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(OAuthError::invalid_client(
                    "invalid client: the assertion's jti was already used",
                ));
            }
            Err(e) => {
                cluster.count_error("jti");
                tracing::error!(error = %e, "Cannot record the assertion id in Redis.");
                return Err(OAuthError::new(
                    503,
                    "internal_error",
                    "token service temporarily unavailable; retry",
                ));
            }
        }
    }
    mint(
        state,
        &a.device_id,
        req.duration_seconds,
        "jwt_bearer",
        cred,
    )
}

async fn client_credentials(
    state: &GatewayState,
    req: &TokenRequest,
    ip: Option<IpAddr>,
) -> Result<crate::tokens::Minted, OAuthError> {
    let (Some(client_id), Some(secret)) = (req.client_id.as_deref(), req.client_secret.clone())
    else {
        return Err(OAuthError::invalid_request(
            "invalid request: client_id and client_secret are required",
        ));
    };
    let ep = &state.oauth;
    let client_id =
        DeviceId::parse(client_id).map_err(|_| OAuthError::invalid_client("invalid client"))?;
    check_limit(&ep.per_device, &(client_id.clone(), ip), now_ms())?;
    let device = state.devices.get(&client_id);
    let hashes: Vec<(CredentialRef, SecretHash)> = match &device {
        Some(d) => d
            .credentials()
            .secrets()
            .map(|(c, h)| (c, h.clone()))
            .collect(),
        None => Vec::new(),
    };
    let dummy = ep.dummy.clone();
    // PBKDF2 costs milliseconds: off the proxy's worker threads.
    let matched = tokio::task::spawn_blocking(move || {
        if hashes.is_empty() {
            let _ = dummy.verify(&secret);
            return None;
        }
        hashes
            .into_iter()
            .find(|(_, h)| h.verify(&secret))
            .map(|(c, _)| c)
    })
    .await
    .map_err(|_| OAuthError::new(503, "internal_error", "internal error"))?;
    let (Some(device), Some(cred)) = (device, matched) else {
        return Err(OAuthError::invalid_client("invalid client"));
    };
    mint(
        state,
        &device.id,
        req.duration_seconds,
        "client_credentials",
        cred,
    )
}

/// `cert`: the device the connection's client certificate names (device TLS with
/// `bind_device`).
async fn handle(
    state: &GatewayState,
    session: &mut Session,
    cert: Option<&crate::device_tls::CertDevice>,
) -> Result<crate::tokens::Minted, OAuthError> {
    if session.req_header().method != http::Method::POST {
        return Err(OAuthError::new(405, "invalid_request", "use POST"));
    }
    let ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    if let Some(ip) = ip {
        check_limit(&state.oauth.per_ip, &ip, now_ms())?;
    }
    let body = read_body(session).await?;
    let req: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|_| OAuthError::invalid_request("invalid request: the body is not JSON"))?
    };
    match req.grant_type.as_deref() {
        Some(JWT_BEARER) => jwt_bearer(state, session, cert, &req, ip).await,
        Some("client_credentials") => {
            if let Some(id) = &req.client_id {
                check_cert_device(cert, id)?;
            }
            client_credentials(state, &req, ip).await
        }
        Some(_) => Err(OAuthError::new(
            400,
            "unsupported_grant_type",
            "unsupported grant_type",
        )),
        None => Err(OAuthError::invalid_request("invalid request: grant_type")),
    }
}

/// Serves the token endpoint; always answers (`Ok(true)` to pingora).
pub async fn serve(
    state: &GatewayState,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    ctx.local_route = Some("token");
    let (status, body, retry_after) = match handle(state, session, ctx.cert_device.as_ref()).await {
        Ok(m) => (200, m.to_json(), None),
        Err(e) => {
            state
                .metrics
                .token_errors
                .with_label_values(&[e.code])
                .inc();
            (
                e.status,
                serde_json::json!({"error_code": e.code, "error_message": e.message, "error": e.code}),
                e.retry_after_s,
            )
        }
    };
    respond::json(session, status, &body, &ctx.logid, retry_after).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_paths() {
        assert!(is_token_path("/api/permission/oauth2/token"));
        assert!(is_token_path("/api/permission/oauth2/account/123/token"));
        assert!(is_token_path(
            "/api/permission/oauth2/enterprise_id/e1/token"
        ));
        assert!(!is_token_path("/api/permission/oauth2/account//token"));
        assert!(!is_token_path("/api/permission/oauth2/device/code"));
        assert!(!is_token_path("/api/permission/oauth2/token/x"));
    }

    #[test]
    fn peeks_issuer_without_trusting_it() {
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"iss":"dev-1"}"#);
        assert_eq!(peek_issuer(&format!("h.{p}.s")).as_deref(), Some("dev-1"));
        assert_eq!(peek_issuer("garbage"), None);
    }
}
