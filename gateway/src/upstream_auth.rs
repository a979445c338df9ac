//! Upstream credentials: what goes into `Authorization` (and whether `X-Coze-DeviceInfo` is
//! added) for each device's calls.
//!
//! - `pat`: one PAT / service token for everyone, attribution via `X-Coze-DeviceInfo`.
//! - `jwt`: a Coze OAuth access token *per device*, minted with the vendor's OAuth app key
//!   (RS256 JWT with `iss` = app id, `kid`, `aud` = upstream host, `session_name` = device
//!   id, `session_context.device_info.device_id` = device id, optional channel `scope`) and
//!   exchanged at the upstream token endpoint.
//!
//! # The jwt-mode cache
//! - One entry per device: the current token, an async mutex that makes exchanges
//!   single-flight (200 concurrent first requests of a device cause one exchange), and a
//!   "refreshing" flag.
//! - A token within `refresh_before` of expiry is still returned at once while one
//!   background task exchanges a new one: a refresh never blocks a request while the old
//!   token is valid.
//! - At most `max_concurrent_exchanges` exchanges are in flight towards the upstream.
//! - A failed exchange backs the device off (1 s, doubling to 30 s): requests in that window
//!   fail fast with a clear 502 instead of hammering the upstream.
//! - At most `max_cached_devices` entries; when full, the least recently used eighth is
//!   evicted (idle devices go first). Memory per cached device is a few hundred bytes.
//!
//! Neither the app key, the JWT nor the tokens are ever logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::HeaderValue;
use policy::ids::DeviceId;

use crate::config::{UpstreamAuth, UpstreamJwt, UpstreamSettings};
use crate::metrics::Metrics;
use crate::state::now_ms;

/// What to send upstream for one device.
#[derive(Clone, Debug)]
pub struct Authorization {
    /// The full `Authorization` header value (`Bearer …`), marked sensitive. Built once per
    /// credential: a clone is a reference count, not a copy.
    pub header: HeaderValue,
    /// Add `X-Coze-DeviceInfo` (PAT mode: the token itself carries no device).
    pub device_info_header: bool,
}

/// Why no upstream credential is available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamAuthError {
    #[error("upstream token exchange refused (HTTP {status}, {code})")]
    Refused { status: u16, code: String },
    #[error("upstream token exchange failed: {0}")]
    Failed(String),
    #[error("upstream token exchange backing off after a failure")]
    BackingOff,
}

pub struct UpstreamCredentials {
    mode: Mode,
}

enum Mode {
    Pat(Authorization),
    Jwt(Arc<Minter>),
}

impl UpstreamCredentials {
    pub fn new(
        settings: &UpstreamSettings,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
        metrics: Metrics,
    ) -> Result<UpstreamCredentials, String> {
        let mode = match &settings.auth {
            UpstreamAuth::Pat(pat) => Mode::Pat(Authorization {
                header: bearer_value(pat.expose()).ok_or_else(|| {
                    "upstream.pat: not a valid HTTP header value (control characters?)".to_owned()
                })?,
                device_info_header: true,
            }),
            UpstreamAuth::Jwt(j) => Mode::Jwt(Arc::new(Minter::new(settings, j, tls, metrics)?)),
        };
        Ok(UpstreamCredentials { mode })
    }

    /// The credential for `device`'s next upstream call.
    pub async fn authorization(
        &self,
        device: &DeviceId,
    ) -> Result<Authorization, UpstreamAuthError> {
        match &self.mode {
            Mode::Pat(a) => Ok(a.clone()),
            Mode::Jwt(m) => m.get(device).await.map(|header| Authorization {
                header,
                device_info_header: false,
            }),
        }
    }
}

struct Cached {
    header: HeaderValue,
    /// Unix milliseconds.
    expires_at_ms: u64,
}

#[derive(Default)]
struct Entry {
    cached: RwLock<Option<Cached>>,
    exchange: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
    last_used_ms: AtomicU64,
    failed_until_ms: AtomicU64,
    failures: AtomicU32,
}

impl Entry {
    fn current(&self, now: u64) -> Option<(HeaderValue, u64)> {
        let c = self.cached.read().unwrap_or_else(|p| p.into_inner());
        c.as_ref()
            .filter(|c| c.expires_at_ms > now + SAFETY_MS)
            .map(|c| (c.header.clone(), c.expires_at_ms))
    }
}

/// `Bearer <token>` as a header value marked sensitive (kept out of `Debug` output and
/// HPACK tables); `None` if the token has bytes a header cannot carry.
fn bearer_value(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::try_from(format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// A token is not used in its last seconds (requests take time to reach the upstream).
const SAFETY_MS: u64 = 5_000;
const BACKOFF_MIN_MS: u64 = 1_000;
const BACKOFF_MAX_MS: u64 = 30_000;

struct Minter {
    cfg: UpstreamJwt,
    key: ring::signature::RsaKeyPair,
    url: String,
    http: reqwest::Client,
    entries: Mutex<HashMap<DeviceId, Arc<Entry>>>,
    permits: tokio::sync::Semaphore,
    metrics: Metrics,
}

impl Minter {
    fn new(
        settings: &UpstreamSettings,
        cfg: &UpstreamJwt,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
        metrics: Metrics,
    ) -> Result<Minter, String> {
        let key = if cfg.pkcs8 {
            ring::signature::RsaKeyPair::from_pkcs8(&cfg.private_key_der)
        } else {
            ring::signature::RsaKeyPair::from_der(&cfg.private_key_der)
        }
        .map_err(|e| format!("upstream.jwt private key: {e}"))?;
        let scheme = if settings.rest.tls { "https" } else { "http" };
        let url = format!("{scheme}://{}{}", settings.rest.authority(), cfg.token_path);
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.connect_timeout + settings.read_timeout)
            .pool_max_idle_per_host(cfg.max_concurrent_exchanges)
            .build()
            .map_err(|e| format!("upstream token client: {e}"))?;
        Ok(Minter {
            cfg: cfg.clone(),
            key,
            url,
            http,
            entries: Mutex::new(HashMap::new()),
            permits: tokio::sync::Semaphore::new(cfg.max_concurrent_exchanges),
            metrics,
        })
    }

    fn entry(&self, device: &DeviceId, now: u64) -> Arc<Entry> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(device) {
            e.last_used_ms.store(now, Ordering::Relaxed);
            return e.clone();
        }
        if map.len() >= self.cfg.max_cached_devices {
            // Evict the least recently used eighth (amortised O(1) per insert).
            let mut by_age: Vec<(u64, DeviceId)> = map
                .iter()
                .map(|(k, e)| (e.last_used_ms.load(Ordering::Relaxed), k.clone()))
                .collect();
            by_age.sort_unstable_by_key(|(t, _)| *t);
            for (_, k) in by_age
                .into_iter()
                .take((self.cfg.max_cached_devices / 8).max(1))
            {
                map.remove(&k);
            }
        }
        let e = Arc::new(Entry::default());
        e.last_used_ms.store(now, Ordering::Relaxed);
        map.insert(device.clone(), e.clone());
        e
    }

    async fn get(self: &Arc<Self>, device: &DeviceId) -> Result<HeaderValue, UpstreamAuthError> {
        let now = now_ms();
        let entry = self.entry(device, now);
        if let Some((header, expires)) = entry.current(now) {
            let refresh_at = expires.saturating_sub(self.cfg.refresh_before.as_millis() as u64);
            if now >= refresh_at && !entry.refreshing.swap(true, Ordering::AcqRel) {
                let (me, entry, device) = (self.clone(), entry.clone(), device.clone());
                tokio::spawn(async move {
                    let _single = entry.exchange.lock().await;
                    if let Err(e) = me.exchange_into(&entry, &device).await {
                        tracing::warn!(device_id = %device, error = %e, "Background upstream token refresh failed; the current token stays in use.");
                    }
                    entry.refreshing.store(false, Ordering::Release);
                });
            }
            self.metrics
                .upstream_token_cache
                .with_label_values(&["hit"])
                .inc();
            return Ok(header);
        }
        self.metrics
            .upstream_token_cache
            .with_label_values(&["miss"])
            .inc();
        let _single = entry.exchange.lock().await;
        let now = now_ms();
        if let Some((header, _)) = entry.current(now) {
            return Ok(header); // another request of this device just exchanged
        }
        if now < entry.failed_until_ms.load(Ordering::Acquire) {
            return Err(UpstreamAuthError::BackingOff);
        }
        self.exchange_into(&entry, device).await
    }

    /// Exchanges a new token and stores it; records failures for back-off.
    async fn exchange_into(
        &self,
        entry: &Entry,
        device: &DeviceId,
    ) -> Result<HeaderValue, UpstreamAuthError> {
        match self.exchange(device).await {
            Ok(c) => {
                let header = c.header.clone();
                *entry.cached.write().unwrap_or_else(|p| p.into_inner()) = Some(c);
                entry.failures.store(0, Ordering::Release);
                entry.failed_until_ms.store(0, Ordering::Release);
                self.metrics
                    .upstream_token_exchanges
                    .with_label_values(&["ok"])
                    .inc();
                Ok(header)
            }
            Err(e) => {
                let n = entry.failures.fetch_add(1, Ordering::AcqRel).min(5);
                let backoff = (BACKOFF_MIN_MS << n).min(BACKOFF_MAX_MS);
                entry
                    .failed_until_ms
                    .store(now_ms() + backoff, Ordering::Release);
                let label = if matches!(e, UpstreamAuthError::Refused { .. }) {
                    "refused"
                } else {
                    "error"
                };
                self.metrics
                    .upstream_token_exchanges
                    .with_label_values(&[label])
                    .inc();
                Err(e)
            }
        }
    }

    /// The signed assertion for `device` (RS256 with the app key).
    fn assertion(&self, device: &DeviceId, now_s: u64) -> Result<String, UpstreamAuthError> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.cfg.kid});
        let claims = serde_json::json!({
            "iss": self.cfg.app_id,
            "aud": self.cfg.audience,
            "iat": now_s,
            "exp": now_s + 600,
            "jti": format!("{:032x}", rand::random::<u128>()),
            "session_name": device.as_str(),
            "session_context": {"device_info": {"device_id": device.as_str()}},
        });
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| UpstreamAuthError::Failed("signing failed".into()))?;
        Ok(format!("{input}.{}", B64.encode(sig)))
    }

    async fn exchange(&self, device: &DeviceId) -> Result<Cached, UpstreamAuthError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| UpstreamAuthError::Failed("shutting down".into()))?;
        let jwt = self.assertion(device, now_ms() / 1000)?;
        let mut body = serde_json::json!({
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "duration_seconds": self.cfg.token_ttl.as_secs(),
        });
        if let Some(scope) = &self.cfg.scope {
            body["scope"] = scope.clone();
        }
        let resp = self
            .http
            .post(&self.url)
            .bearer_auth(jwt)
            .json(&body)
            .send()
            .await
            .map_err(|e| UpstreamAuthError::Failed(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.map_err(|_| UpstreamAuthError::Refused {
            status,
            code: "non-JSON answer".into(),
        })?;
        let (Some(token), Some(expires_in), 200) = (
            v.get("access_token").and_then(|t| t.as_str()),
            v.get("expires_in").and_then(|e| e.as_u64()),
            status,
        ) else {
            let code = v
                .get("error_code")
                .and_then(|c| c.as_str())
                .unwrap_or("unknown")
                .chars()
                .take(64)
                .collect();
            return Err(UpstreamAuthError::Refused { status, code });
        };
        // `expires_in` is an absolute unix time in seconds (Coze's contract).
        let header = bearer_value(token).ok_or(UpstreamAuthError::Refused {
            status,
            code: "token_not_a_header_value".to_owned(),
        })?;
        Ok(Cached {
            header,
            expires_at_ms: expires_in.saturating_mul(1000),
        })
    }
}
