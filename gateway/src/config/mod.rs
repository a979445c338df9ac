//! Configuration: [`raw`] mirrors the file; [`GatewayConfig`] is what the code needs.
//!
//! [`load_str`] parses and validates in one go and reports *every* problem with its key path
//! (`upstream.base_url: ...`). Secrets are never in the file: it names environment variables
//! (or files) and validation reads them through an injected lookup, so tests need no real
//! environment. `Debug` on [`Secret`] is redacted.

pub mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use policy::route::RouteTable;
use policy::token::Keyring;

pub use raw::{LogFormat, UpstreamAuthMode};

/// A secret value. `Debug` prints `<redacted>`; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One upstream endpoint (REST or WebSocket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl UpstreamTarget {
    /// `host[:port]` as sent in `Host` (port omitted when it is the scheme default).
    pub fn authority(&self) -> String {
        if (self.tls && self.port == 443) || (!self.tls && self.port == 80) {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How fleetgate authenticates to the upstream.
#[derive(Clone, Debug)]
pub enum UpstreamAuth {
    /// One PAT / service token for every call, plus `X-Coze-DeviceInfo`.
    Pat(Secret),
    /// Per-device OAuth tokens minted with the vendor's OAuth app key.
    Jwt(UpstreamJwt),
}

/// Validated `upstream.jwt`.
#[derive(Clone)]
pub struct UpstreamJwt {
    pub app_id: String,
    pub kid: String,
    /// PKCS#8 or PKCS#1 DER of the app's RSA private key.
    pub private_key_der: Vec<u8>,
    pub pkcs8: bool,
    pub token_ttl: Duration,
    pub refresh_before: Duration,
    pub token_path: String,
    pub audience: String,
    pub scope: Option<serde_json::Value>,
    pub max_concurrent_exchanges: usize,
    pub max_cached_devices: usize,
}

impl fmt::Debug for UpstreamJwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamJwt")
            .field("app_id", &self.app_id)
            .field("kid", &self.kid)
            .field("private_key", &"<redacted>")
            .field("token_ttl", &self.token_ttl)
            .field("token_path", &self.token_path)
            .field("audience", &self.audience)
            .finish()
    }
}

/// The DER of the first `label` block in `pem` (`None`: there is none).
pub(crate) fn pem_block(pem: &str, label: &str) -> Option<Result<Vec<u8>, base64::DecodeError>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let b = pem.find(&begin)?;
    let e = pem.find(&end)?;
    let body: String = pem
        .get(b + begin.len()..e)
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    Some(base64::engine::general_purpose::STANDARD.decode(body))
}

/// PEM → (DER, is PKCS#8). Accepts `PRIVATE KEY` and `RSA PRIVATE KEY`.
fn private_key_der(pem: &str) -> Result<(Vec<u8>, bool), String> {
    for (label, pkcs8) in [("PRIVATE KEY", true), ("RSA PRIVATE KEY", false)] {
        if let Some(der) = pem_block(pem, label) {
            let der = der.map_err(|_| "the PEM body is not base64".to_owned())?;
            let ok = if pkcs8 {
                ring::signature::RsaKeyPair::from_pkcs8(&der).is_ok()
            } else {
                ring::signature::RsaKeyPair::from_der(&der).is_ok()
            };
            return if ok {
                Ok((der, pkcs8))
            } else {
                Err("not a usable RSA private key (2048-8192 bits)".into())
            };
        }
    }
    Err("no `PRIVATE KEY` or `RSA PRIVATE KEY` PEM block".into())
}

fn upstream_jwt(
    c: &mut Collector,
    env: EnvLookup<'_>,
    j: Option<&raw::UpstreamJwtConfig>,
    rest: Option<&UpstreamTarget>,
) -> Option<UpstreamJwt> {
    let Some(j) = j else {
        c.err(
            "upstream.jwt",
            "`auth = \"jwt\"` needs an [upstream.jwt] table (app_id, kid, private key)",
        );
        return None;
    };
    let pem = match (&j.private_key_file, &j.private_key_env) {
        (Some(file), None) => std::fs::read_to_string(file)
            .map_err(|e| {
                c.err(
                    "upstream.jwt.private_key_file",
                    format!("cannot read `{file}`: {e}"),
                )
            })
            .ok(),
        (None, Some(var)) => {
            let v = env(var);
            if v.is_none() {
                c.err(
                    "upstream.jwt.private_key_env",
                    format!("environment variable `{var}` is not set"),
                );
            }
            v
        }
        _ => {
            c.err(
                "upstream.jwt",
                "set exactly one of `private_key_file` and `private_key_env`",
            );
            None
        }
    };
    let key_path = if j.private_key_env.is_some() {
        "upstream.jwt.private_key_env"
    } else {
        "upstream.jwt.private_key_file"
    };
    let key = pem.and_then(|p| private_key_der(&p).map_err(|e| c.err(key_path, e)).ok());
    if j.app_id.is_empty() {
        c.err("upstream.jwt.app_id", "must not be empty");
    }
    if j.kid.is_empty() {
        c.err("upstream.jwt.kid", "must not be empty");
    }
    if j.token_ttl < Duration::from_secs(60) || j.token_ttl > Duration::from_secs(86_399) {
        c.err("upstream.jwt.token_ttl", "must be between 60s and 86399s");
    }
    if j.refresh_before >= j.token_ttl {
        c.err(
            "upstream.jwt.refresh_before",
            "must be shorter than `upstream.jwt.token_ttl`",
        );
    }
    if !j.token_path.starts_with("/api/permission/oauth2/") {
        c.err(
            "upstream.jwt.token_path",
            "must be a Coze OAuth token path (/api/permission/oauth2/…)",
        );
    }
    if j.max_concurrent_exchanges == 0 || j.max_cached_devices == 0 {
        c.err(
            "upstream.jwt",
            "`max_concurrent_exchanges` and `max_cached_devices` must be > 0",
        );
    }
    let scope = j.scope.as_ref().and_then(|t| serde_json::to_value(t).ok());
    let (der, pkcs8) = key?;
    Some(UpstreamJwt {
        app_id: j.app_id.clone(),
        kid: j.kid.clone(),
        private_key_der: der,
        pkcs8,
        token_ttl: j.token_ttl,
        refresh_before: j.refresh_before,
        token_path: j.token_path.clone(),
        audience: j
            .audience
            .clone()
            .or_else(|| rest.map(|r| r.host.clone()))
            .unwrap_or_default(),
        scope,
        max_concurrent_exchanges: j.max_concurrent_exchanges,
        max_cached_devices: j.max_cached_devices,
    })
}

#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub rest: UpstreamTarget,
    pub ws: UpstreamTarget,
    pub auth: UpstreamAuth,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub total_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct WsSettings {
    pub ping_interval: Option<Duration>,
    pub buffer_bytes: usize,
    pub handshake_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct TokenSettings {
    pub keyring: Keyring,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub audiences: Vec<String>,
    pub audience_from_host: bool,
    pub max_assertion_lifetime: Duration,
    pub max_assertion_skew: Duration,
    /// Slots of the verified-token memo (`crate::verifier`); 0 turns it off.
    pub verify_cache_entries: usize,
    /// Live device assertions (`jti`s) the token endpoint remembers (`crate::oauth`).
    pub replay_cache_entries: usize,
}

/// Bounds of `tokens.replay_cache_entries` (about 50 bytes per entry).
pub const REPLAY_CACHE_ENTRIES: std::ops::RangeInclusive<usize> = 1024..=(1 << 26);

/// Validated `[rate_limits]` (0 = off).
#[derive(Clone, Debug)]
pub struct RateLimitSettings {
    pub device_rps: u32,
    pub device_burst: u32,
    pub fleet_chat_qps: u32,
    pub fleet_workflow_qps: u32,
    pub max_tracked_devices: usize,
    /// `[rate_limits.routes.<class>]`: per device on one route class.
    pub routes: Vec<(policy::route::RouteClass, RouteRate)>,
}

impl RateLimitSettings {
    /// The per-device rate on routes of `class` (`rps` 0: none).
    pub fn route(&self, class: policy::route::RouteClass) -> RouteRate {
        self.routes
            .iter()
            .find(|(c, _)| *c == class)
            .map(|(_, r)| *r)
            .unwrap_or_default()
    }
}

/// A per-device request rate: `rps` per second (0: off), bursts of `burst`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteRate {
    pub rps: u32,
    pub burst: u32,
}

/// Validated `[quota.sync]`.
#[derive(Clone, Debug)]
pub struct QuotaSync {
    pub interval: Duration,
    pub token: Secret,
    pub plan_qps: bool,
}

/// Validated `[quota]`.
#[derive(Clone, Debug)]
pub struct QuotaSettings {
    /// `None`: sync off.
    pub sync: Option<QuotaSync>,
    pub estimate_llm_tokens: u64,
    pub estimate_audio_ms: u64,
    pub estimate_tts_chars: u64,
    pub persist_interval: Duration,
    pub hold_ttl: Duration,
    pub prices: policy::quota::PriceTable,
    /// `[[quota.rules]]`: default rules (ids `config-<n>`), see `crate::quota::defaults`.
    pub default_rules: Vec<policy::quota::Rule>,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
    pub access_log: bool,
}

/// Cluster mode (`store.kind = "redis"`).
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// Where to connect (a password from `password_env` already applied; its `Debug`
    /// redacts the password). With `sentinel`, only its credentials, database and TLS mode
    /// count: the address is the master's, looked up through the sentinels.
    pub connection: redis::ConnectionInfo,
    /// Redis Sentinel mode.
    pub sentinel: Option<SentinelSettings>,
    /// Redis Cluster mode: the seed nodes (password from `password_env` applied).
    pub cluster: Option<Vec<redis::ConnectionInfo>>,
    pub key_prefix: String,
    pub timeout: Duration,
    pub full_check_interval: Duration,
    pub lease_size: std::collections::BTreeMap<policy::quota::BenefitType, u64>,
    pub lease_idle: Duration,
    pub lease_ttl: Duration,
    pub degraded_allowance: std::collections::BTreeMap<policy::quota::BenefitType, u64>,
}

/// `[store.redis.sentinel]`, validated.
#[derive(Clone, Debug)]
pub struct SentinelSettings {
    pub master_name: String,
    /// The sentinels (their own passwords, if any, inside; `Debug` redacts them).
    pub addrs: Vec<redis::ConnectionInfo>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub threads: usize,
    pub grace_period: Duration,
    pub drain_delay: Duration,
    pub device_addr: SocketAddr,
    /// TLS for devices, terminated by the gateway (`None`: plain HTTP).
    pub device_tls: Option<crate::device_tls::DeviceTlsSettings>,
    pub admin_addr: SocketAddr,
    pub admin_token: Secret,
    pub upstream: UpstreamSettings,
    pub routes: RouteTable,
    pub ws: WsSettings,
    pub tokens: TokenSettings,
    pub log: LogSettings,
    /// Embedded store file, or `:memory:`.
    pub store_path: String,
    /// `Some` in cluster mode: devices, rules and usage live in this Redis.
    pub redis: Option<RedisSettings>,
    pub quota: QuotaSettings,
    pub rate_limits: RateLimitSettings,
    /// `[access]`: which paths and bots devices may use, by label (applied live on reload).
    pub access: policy::access::AccessPolicies,
    /// The file this configuration was read from (for reloads); `None` when built in code.
    pub source: Option<std::path::PathBuf>,
}

/// One problem, with the key path it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            if e.path.is_empty() {
                writeln!(f, "  - {}", e.message)?;
            } else {
                writeln!(f, "  - `{}`: {}", e.path, e.message)?;
            }
        }
        Ok(())
    }
}

struct Collector(Vec<ConfigError>);

impl Collector {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

/// Reads an environment variable (injected so tests control it).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// Parses and validates a config file's text. Every unknown key is reported, with the
/// validation errors (or the syntax/type error that stopped parsing).
pub fn load_str(text: &str, env: EnvLookup<'_>) -> Result<GatewayConfig, ConfigErrors> {
    let syntax = |e: toml::de::Error| ConfigError {
        path: toml_error_path(text, &e),
        message: e.to_string(),
    };
    let mut errors = Vec::new();
    let parsed = toml::Deserializer::parse(text)
        .and_then(|de| {
            serde_ignored::deserialize(de, |path| {
                errors.push(ConfigError {
                    path: indexed_path(&path.to_string()),
                    message: "unknown key (config.toml lists every key)".to_owned(),
                });
            })
        })
        .map_err(syntax);
    match parsed.map(|file| validate(file, env)) {
        Ok(Ok(config)) if errors.is_empty() => return Ok(config),
        Ok(Ok(_)) => {}
        Ok(Err(ConfigErrors(more))) => errors.extend(more),
        Err(e) => errors.push(e),
    }
    Err(ConfigErrors(errors))
}

/// `tokens.signing_keys.0.extra` → `tokens.signing_keys[0].extra`, as validation names keys.
fn indexed_path(dotted: &str) -> String {
    let mut out = String::new();
    for seg in dotted.split('.') {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// The dotted key path a TOML error points at: the enclosing `[table]` plus the key at the
/// error's span (`upstream.base_ur`), or the key of the line when the span is its value.
fn toml_error_path(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or_default();
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(['[', ']']).trim().to_owned());
    let is_key_char = |c: &char| c.is_ascii_alphanumeric() || *c == '_' || *c == '-';
    let mut key: String = text
        .get(span.clone())
        .unwrap_or_default()
        .chars()
        .take_while(is_key_char)
        .collect();
    if key.is_empty() {
        // A bad value: the key is the one assigned on the same line (`threads = "x"`).
        let line = before.rsplit('\n').next().unwrap_or_default();
        if let Some((k, _)) = line.split_once('=') {
            let k = k.trim();
            if !k.is_empty() && k.chars().all(|c| is_key_char(&c)) {
                key = k.to_owned();
            }
        }
    }
    match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}"),
        (Some(t), true) => t,
        (None, false) => key,
        (None, true) => String::new(),
    }
}

/// Reads, parses and validates a config file.
pub fn load_file(
    path: &std::path::Path,
    env: EnvLookup<'_>,
) -> Result<GatewayConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    let mut cfg = load_str(&text, env)?;
    cfg.source = Some(path.to_path_buf());
    Ok(cfg)
}

fn parse_addr(c: &mut Collector, path: &str, s: &str) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            c.err(path, format!("`{s}` is not an IP:port address"));
            None
        }
    }
}

fn parse_target(c: &mut Collector, path: &str, s: &str, ws: bool) -> Option<UpstreamTarget> {
    let uri = match s.parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => {
            c.err(path, format!("`{s}` is not a URL: {e}"));
            return None;
        }
    };
    let tls = match (uri.scheme_str(), ws) {
        (Some("https"), false) | (Some("wss"), true) => true,
        (Some("http"), false) | (Some("ws"), true) => false,
        _ => {
            let want = if ws {
                "ws:// or wss://"
            } else {
                "http:// or https://"
            };
            c.err(path, format!("`{s}` must start with {want}"));
            return None;
        }
    };
    let Some(host) = uri.host() else {
        c.err(path, format!("`{s}` has no host"));
        return None;
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        c.err(path, format!("`{s}` must not have a path or query"));
        return None;
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Some(UpstreamTarget {
        tls,
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
    })
}

/// `https://api.coze.cn` → `wss://ws.coze.cn`, as the Coze SDKs derive it.
pub fn derive_ws_base(base: &str) -> String {
    let s = base
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    s.replacen("://api.", "://ws.", 1)
        .replacen("://api-", "://ws-", 1)
}

fn secret_from_env(c: &mut Collector, env: EnvLookup<'_>, path: &str, var: &str) -> Option<Secret> {
    match env(var) {
        Some(v) => Some(Secret::new(v.trim())),
        None => {
            c.err(path, format!("environment variable `{var}` is not set"));
            None
        }
    }
}

/// A `redis://` or `rediss://` URL. Errors name the problem, never the URL (it may hold a
/// password).
fn redis_url(c: &mut Collector, path: &str, url: &str) -> Option<redis::ConnectionInfo> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        c.err(
            path,
            "must start with redis:// or rediss:// (TLS); for Sentinel use `[store.redis.sentinel]`, for Redis Cluster `store.redis.cluster`",
        );
        return None;
    }
    match redis::IntoConnectionInfo::into_connection_info(url) {
        Ok(info) => Some(info),
        Err(_) => {
            c.err(path, "is not a valid redis:// or rediss:// URL");
            None
        }
    }
}

/// The sentinels, and the master's connection template (TLS if the sentinels use it).
fn sentinel_settings(
    c: &mut Collector,
    s: &raw::SentinelConfig,
) -> Option<(redis::ConnectionInfo, Option<SentinelSettings>)> {
    if s.master_name.trim().is_empty() {
        c.err("store.redis.sentinel.master_name", "must not be empty");
    }
    let addrs = redis_url_list(c, "store.redis.sentinel.addrs", "sentinel", &s.addrs)?;
    // The master's address comes from the sentinels; this only carries TLS mode and db.
    let scheme = if addrs.iter().any(is_tls) {
        "rediss"
    } else {
        "redis"
    };
    let template =
        redis::IntoConnectionInfo::into_connection_info(format!("{scheme}://localhost/{}", s.db));
    let Ok(template) = template else {
        c.err("store.redis.sentinel.db", "must be a database number");
        return None;
    };
    Some((
        template,
        Some(SentinelSettings {
            master_name: s.master_name.trim().to_owned(),
            addrs,
        }),
    ))
}

fn with_password(info: redis::ConnectionInfo, password: &str) -> redis::ConnectionInfo {
    let settings = info.redis_settings().clone().set_password(password);
    info.set_redis_settings(settings)
}

fn is_tls(a: &redis::ConnectionInfo) -> bool {
    matches!(a.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// A list of `redis://` / `rediss://` URLs at `path` (entries reported as `path[i]`): at
/// least one, all with the same scheme. `what` names one entry in the messages.
fn redis_url_list(
    c: &mut Collector,
    path: &str,
    what: &str,
    urls: &[String],
) -> Option<Vec<redis::ConnectionInfo>> {
    if urls.is_empty() {
        c.err(path, format!("list at least one {what}"));
        return None;
    }
    let mut out = Vec::with_capacity(urls.len());
    for (i, a) in urls.iter().enumerate() {
        out.push(redis_url(c, &format!("{path}[{i}]"), a.trim())?);
    }
    if out.iter().any(is_tls) && !out.iter().all(is_tls) {
        c.err(
            path,
            format!("use one scheme for all {what}s (redis:// or rediss://)"),
        );
    }
    Some(out)
}

/// The seed nodes of a Redis Cluster.
fn cluster_seeds(c: &mut Collector, seeds: &[String]) -> Option<Vec<redis::ConnectionInfo>> {
    let out = redis_url_list(c, "store.redis.cluster", "seed node", seeds)?;
    if out.iter().any(|a| a.redis_settings().db() != 0) {
        c.err(
            "store.redis.cluster",
            "Redis Cluster has only database 0; remove the /db from the URLs",
        );
    }
    Some(out)
}

/// `[rate_limits.routes]`: one table per route class name.
fn route_rates(
    c: &mut Collector,
    routes: &std::collections::BTreeMap<String, raw::RouteRateConfig>,
) -> Vec<(policy::route::RouteClass, RouteRate)> {
    let mut out = Vec::new();
    for (name, r) in routes {
        let path = format!("rate_limits.routes.{name}");
        let Some(class) = policy::route::RouteClass::ALL
            .into_iter()
            .find(|class| class.as_str() == name)
        else {
            let names: Vec<&str> = policy::route::RouteClass::ALL
                .iter()
                .map(|class| class.as_str())
                .collect();
            c.err(
                &path,
                format!("unknown route class; one of: {}", names.join(", ")),
            );
            continue;
        };
        if r.burst == Some(0) && r.rps > 0 {
            c.err(
                &format!("{path}.burst"),
                "must be at least 1 when `rps` is set",
            );
        }
        out.push((
            class,
            RouteRate {
                rps: r.rps,
                burst: r.burst.unwrap_or(r.rps),
            },
        ));
    }
    out
}

fn redis_settings(
    c: &mut Collector,
    env: EnvLookup<'_>,
    r: &raw::RedisConfig,
) -> Option<RedisSettings> {
    let url = r.url.as_deref().map(str::trim).filter(|u| !u.is_empty());
    let (mut info, sentinel, mut cluster) = match (url, &r.sentinel, &r.cluster) {
        (Some(url), None, None) => (redis_url(c, "store.redis.url", url)?, None, None),
        (None, Some(s), None) => {
            let (info, s) = sentinel_settings(c, s)?;
            (info, s, None)
        }
        (None, None, Some(seeds)) => {
            let seeds = cluster_seeds(c, seeds)?;
            (seeds.first()?.clone(), None, Some(seeds))
        }
        (None, None, None) => {
            c.err(
                "store.redis.url",
                "required when `store.kind = \"redis\"` (or `[store.redis.sentinel]`, or `store.redis.cluster`)",
            );
            return None;
        }
        _ => {
            c.err(
                "store.redis",
                "give one of `url`, `sentinel` and `cluster`, not several",
            );
            return None;
        }
    };
    if let Some(var) = &r.password_env
        && let Some(p) = secret_from_env(c, env, "store.redis.password_env", var)
    {
        info = with_password(info, p.expose());
        if let Some(seeds) = &mut cluster {
            *seeds = seeds
                .drain(..)
                .map(|s| with_password(s, p.expose()))
                .collect();
        }
    }
    if r.key_prefix.is_empty()
        || r.key_prefix
            .contains(|ch: char| ch.is_whitespace() || ch == '{' || ch == '}')
    {
        c.err(
            "store.redis.key_prefix",
            "must be non-empty, without whitespace or braces",
        );
    }
    if r.timeout < Duration::from_millis(10) || r.timeout > Duration::from_secs(30) {
        c.err("store.redis.timeout", "must be between 10ms and 30s");
    }
    if r.full_check_interval < Duration::from_millis(100) {
        c.err("store.redis.full_check_interval", "must be at least 100ms");
    }
    if let Some((b, _)) = r.lease_size.iter().find(|(_, n)| **n == 0) {
        c.err(
            &format!("store.redis.lease_size.{}", b.as_str()),
            "must be at least 1",
        );
    }
    if r.lease_ttl < r.lease_idle + Duration::from_secs(1) {
        c.err(
            "store.redis.lease_ttl",
            "must exceed `lease_idle` by at least 1s (a live node reports before its leases are reclaimed)",
        );
    }
    Some(RedisSettings {
        connection: info,
        sentinel,
        cluster,
        key_prefix: r.key_prefix.clone(),
        timeout: r.timeout,
        full_check_interval: r.full_check_interval,
        lease_size: r.lease_size.clone(),
        lease_idle: r.lease_idle,
        lease_ttl: r.lease_ttl,
        degraded_allowance: r.degraded_allowance.clone(),
    })
}

fn keyring(c: &mut Collector, env: EnvLookup<'_>, t: &raw::TokensConfig) -> Option<Keyring> {
    if t.signing_keys.is_empty() {
        c.err(
            "tokens.signing_keys",
            "at least one signing key is required (see `fleetgate keygen`)",
        );
        return None;
    }
    let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, k) in t.signing_keys.iter().enumerate() {
        let path = format!("tokens.signing_keys[{i}]");
        let text = match (&k.secret_env, &k.secret_file) {
            (Some(var), None) => match env(var) {
                Some(v) => v,
                None => {
                    c.err(
                        &format!("{path}.secret_env"),
                        format!("environment variable `{var}` is not set"),
                    );
                    continue;
                }
            },
            (None, Some(file)) => match std::fs::read_to_string(file) {
                Ok(v) => v,
                Err(e) => {
                    c.err(
                        &format!("{path}.secret_file"),
                        format!("cannot read `{file}`: {e}"),
                    );
                    continue;
                }
            },
            _ => {
                c.err(&path, "set exactly one of `secret_env` and `secret_file`");
                continue;
            }
        };
        match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
            Ok(bytes) => keys.push((k.kid.clone(), bytes)),
            Err(_) => c.err(&path, "the key is not base64 (use `fleetgate keygen`)"),
        }
    }
    if keys.len() != t.signing_keys.len() {
        return None;
    }
    let active = t.active_kid.clone().unwrap_or_else(|| keys[0].0.clone());
    match Keyring::new(
        keys.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        &active,
    ) {
        Ok(k) => Some(k),
        Err(e) => {
            c.err("tokens", e.to_string());
            None
        }
    }
}

/// `[device_listener.tls]`: the modes must fit together, and the files must load (read and
/// parsed here, once: a bad file is reported with the rest, and the server and reload use
/// what was loaded).
fn device_tls(
    c: &mut Collector,
    t: &raw::DeviceTlsConfig,
) -> Option<crate::device_tls::DeviceTlsSettings> {
    use crate::device_tls::ClientAuth;
    let client_auth = t.client_auth.unwrap_or(if t.client_ca_file.is_some() {
        ClientAuth::Required
    } else {
        ClientAuth::Off
    });
    let mut ok = true;
    let mut err = |c: &mut Collector, key: &str, msg: &str| {
        c.err(key, msg);
        ok = false;
    };
    match (client_auth, &t.client_ca_file) {
        (ClientAuth::Off, Some(_)) => err(
            c,
            "device_listener.tls.client_auth",
            "is `off` but `client_ca_file` is set: say `optional` or `required`, or drop the CA",
        ),
        (ClientAuth::Optional | ClientAuth::Required, None) => err(
            c,
            "device_listener.tls.client_ca_file",
            "client certificates need the CA they are checked against",
        ),
        _ => {}
    }
    if t.bind_device && client_auth == ClientAuth::Off {
        err(
            c,
            "device_listener.tls.bind_device",
            "needs client certificates (`client_auth` `optional` or `required`)",
        );
    }
    if t.handshake_timeout < Duration::from_millis(100)
        || t.handshake_timeout > Duration::from_secs(60)
    {
        err(
            c,
            "device_listener.tls.handshake_timeout",
            "must be between 100ms and 60s",
        );
    }
    let files = crate::device_tls::TlsFiles {
        cert_file: t.cert_file.clone().into(),
        key_file: t.key_file.clone().into(),
        client_ca_file: t.client_ca_file.clone().map(Into::into),
        client_auth,
    };
    let server = match crate::device_tls::load(&files) {
        Ok(server) => server,
        Err(errors) => {
            for e in errors {
                c.err(e.key, e.message);
            }
            return None;
        }
    };
    ok.then_some(crate::device_tls::DeviceTlsSettings {
        files,
        bind_device: t.bind_device,
        handshake_timeout: t.handshake_timeout,
        server,
    })
}

fn validate(mut f: raw::ConfigFile, env: EnvLookup<'_>) -> Result<GatewayConfig, ConfigErrors> {
    let mut c = Collector(Vec::new());
    let threads = f.server.threads.unwrap_or(2);
    if threads == 0 || threads > 256 {
        c.err("server.threads", "must be between 1 and 256");
    }
    let device_addr = parse_addr(&mut c, "device_listener.addr", &f.device_listener.addr);
    let admin_addr = parse_addr(&mut c, "admin_listener.addr", &f.admin_listener.addr);
    if let (Some(d), Some(a)) = (device_addr, admin_addr)
        && d == a
        && d.port() != 0
    {
        c.err(
            "admin_listener.addr",
            "must differ from `device_listener.addr`",
        );
    }
    let admin_token = secret_from_env(
        &mut c,
        env,
        "admin_listener.token_env",
        &f.admin_listener.token_env,
    );
    if let Some(t) = &admin_token
        && t.expose().len() < 16
    {
        c.err(
            "admin_listener.token_env",
            "the admin token must be at least 16 characters",
        );
    }
    let device_tls = f
        .device_listener
        .tls
        .as_ref()
        .and_then(|t| device_tls(&mut c, t));
    let rest = parse_target(&mut c, "upstream.base_url", &f.upstream.base_url, false);
    let ws_base = f
        .upstream
        .ws_base_url
        .clone()
        .unwrap_or_else(|| derive_ws_base(&f.upstream.base_url));
    let ws = parse_target(&mut c, "upstream.ws_base_url", &ws_base, true);
    let auth = match f.upstream.auth {
        UpstreamAuthMode::Pat => {
            secret_from_env(&mut c, env, "upstream.pat_env", &f.upstream.pat_env)
                .map(UpstreamAuth::Pat)
        }
        UpstreamAuthMode::Jwt => {
            upstream_jwt(&mut c, env, f.upstream.jwt.as_ref(), rest.as_ref()).map(UpstreamAuth::Jwt)
        }
    };
    for (path, d) in [
        ("upstream.connect_timeout", f.upstream.connect_timeout),
        ("upstream.read_timeout", f.upstream.read_timeout),
        (
            "upstream.stream_idle_timeout",
            f.upstream.stream_idle_timeout,
        ),
        ("upstream.total_timeout", f.upstream.total_timeout),
        ("websocket.handshake_timeout", f.websocket.handshake_timeout),
    ] {
        if d.is_zero() {
            c.err(path, "must be greater than 0");
        }
    }
    let prefixes = f
        .routes
        .allow
        .clone()
        .unwrap_or_else(RouteTable::default_prefixes);
    for (i, p) in prefixes.iter().enumerate() {
        if !p.starts_with('/') {
            c.err(
                &format!("routes.allow[{i}]"),
                format!("`{p}` must start with `/`"),
            );
        }
    }
    let access = access_policies(&mut c, std::mem::take(&mut f.access));
    if f.routes.body_limit_bytes == 0 {
        c.err("routes.body_limit_bytes", "must be greater than 0");
    }
    if f.routes.workflow_body_limit_bytes == 0 {
        c.err("routes.workflow_body_limit_bytes", "must be greater than 0");
    }
    if !(512..=1 << 20).contains(&f.websocket.buffer_bytes) {
        c.err("websocket.buffer_bytes", "must be between 512 and 1048576");
    }
    if f.tokens.max_ttl > Duration::from_secs(86399) || f.tokens.max_ttl.is_zero() {
        c.err("tokens.max_ttl", "must be between 1s and 86399s");
    }
    if f.tokens.default_ttl > f.tokens.max_ttl || f.tokens.default_ttl.is_zero() {
        c.err(
            "tokens.default_ttl",
            "must be greater than 0 and at most `tokens.max_ttl`",
        );
    }
    let keyring = keyring(&mut c, env, &f.tokens);
    if f.tokens.max_assertion_lifetime.is_zero()
        || f.tokens.max_assertion_lifetime > Duration::from_secs(86_400)
    {
        c.err(
            "tokens.max_assertion_lifetime",
            "must be between 1s and 24h",
        );
    }
    if f.tokens.max_assertion_skew > Duration::from_secs(600) {
        c.err("tokens.max_assertion_skew", "must be at most 10m");
    }
    if !REPLAY_CACHE_ENTRIES.contains(&f.tokens.replay_cache_entries) {
        c.err(
            "tokens.replay_cache_entries",
            format!(
                "must be between {} and {}",
                REPLAY_CACHE_ENTRIES.start(),
                REPLAY_CACHE_ENTRIES.end()
            ),
        );
    }
    if f.tokens.verify_cache_entries > crate::verifier::MAX_ENTRIES {
        c.err(
            "tokens.verify_cache_entries",
            format!("must be at most {}", crate::verifier::MAX_ENTRIES),
        );
    }
    if !f.tokens.audience_from_host && f.tokens.audiences.is_empty() {
        c.err(
            "tokens.audiences",
            "set at least one audience, or `audience_from_host = true`",
        );
    }
    if tracing_subscriber::EnvFilter::try_new(&f.log.level).is_err() {
        c.err(
            "log.level",
            format!("`{}` is not a valid filter (e.g. `info`)", f.log.level),
        );
    }
    let default_rules = default_rules(&mut c, std::mem::take(&mut f.quota.rules));
    let quota_sync = if f.quota.sync.enabled {
        if f.quota.sync.interval < Duration::from_millis(100) {
            c.err("quota.sync.interval", "must be at least 100ms");
        }
        let var = f
            .quota
            .sync
            .token_env
            .clone()
            .unwrap_or_else(|| f.upstream.pat_env.clone());
        secret_from_env(&mut c, env, "quota.sync.token_env", &var).map(|token| QuotaSync {
            interval: f.quota.sync.interval,
            token,
            plan_qps: f.quota.sync.plan_qps,
        })
    } else {
        None
    };
    if f.quota.persist_interval.is_zero() || f.quota.persist_interval > Duration::from_secs(10) {
        c.err("quota.persist_interval", "must be between 1ms and 10s");
    }
    if f.quota.hold_ttl < Duration::from_secs(3) || f.quota.hold_ttl > Duration::from_secs(86_400) {
        c.err("quota.hold_ttl", "must be between 3s and 24h");
    }
    if f.rate_limits.device_burst == Some(0) && f.rate_limits.device_rps > 0 {
        c.err(
            "rate_limits.device_burst",
            "must be at least 1 when `device_rps` is set",
        );
    }
    if f.rate_limits.max_tracked_devices == Some(0) {
        c.err("rate_limits.max_tracked_devices", "must be at least 1");
    }
    let route_rates = route_rates(&mut c, &f.rate_limits.routes);
    if f.store.path.trim().is_empty() {
        c.err("store.path", "must name a file (or `:memory:`)");
    }
    let redis = match f.store.kind {
        raw::StoreKind::Embedded => None,
        raw::StoreKind::Redis => redis_settings(&mut c, env, &f.store.redis),
    };
    if f.server.grace_period > Duration::from_secs(3600) {
        c.err("server.grace_period", "must be at most 1h");
    }

    let (
        Some(device_addr),
        Some(admin_addr),
        Some(admin_token),
        Some(rest),
        Some(ws),
        Some(auth),
        Some(keyring),
    ) = (
        device_addr,
        admin_addr,
        admin_token,
        rest,
        ws,
        auth,
        keyring,
    )
    else {
        return Err(ConfigErrors(c.0));
    };
    if !c.0.is_empty() {
        return Err(ConfigErrors(c.0));
    }
    Ok(GatewayConfig {
        threads,
        grace_period: f.server.grace_period,
        drain_delay: f.server.drain_delay.min(f.server.grace_period),
        device_addr,
        device_tls,
        admin_addr,
        admin_token,
        upstream: UpstreamSettings {
            rest,
            ws,
            auth,
            connect_timeout: f.upstream.connect_timeout,
            read_timeout: f.upstream.read_timeout,
            stream_idle_timeout: f.upstream.stream_idle_timeout,
            total_timeout: f.upstream.total_timeout,
        },
        routes: RouteTable::new(
            prefixes,
            f.routes.body_limit_bytes,
            f.routes.workflow_body_limit_bytes,
        ),
        ws: WsSettings {
            ping_interval: (!f.websocket.ping_interval.is_zero())
                .then_some(f.websocket.ping_interval),
            buffer_bytes: f.websocket.buffer_bytes,
            handshake_timeout: f.websocket.handshake_timeout,
        },
        tokens: TokenSettings {
            keyring,
            default_ttl: f.tokens.default_ttl,
            max_ttl: f.tokens.max_ttl,
            audiences: f.tokens.audiences.clone(),
            audience_from_host: f.tokens.audience_from_host,
            max_assertion_lifetime: f.tokens.max_assertion_lifetime,
            max_assertion_skew: f.tokens.max_assertion_skew,
            verify_cache_entries: f.tokens.verify_cache_entries,
            replay_cache_entries: f.tokens.replay_cache_entries,
        },
        log: LogSettings {
            format: f.log.format,
            level: f.log.level,
            access_log: f.log.access_log,
        },
        store_path: f.store.path,
        redis,
        source: None,
        access,
        rate_limits: RateLimitSettings {
            device_rps: f.rate_limits.device_rps,
            device_burst: f
                .rate_limits
                .device_burst
                .unwrap_or(f.rate_limits.device_rps),
            fleet_chat_qps: f.rate_limits.fleet_chat_qps,
            fleet_workflow_qps: f.rate_limits.fleet_workflow_qps,
            max_tracked_devices: f.rate_limits.max_tracked_devices.unwrap_or(1_000_000),
            routes: route_rates,
        },
        quota: QuotaSettings {
            sync: quota_sync,
            estimate_llm_tokens: f.quota.estimate_llm_tokens,
            estimate_audio_ms: f.quota.estimate_audio_ms,
            estimate_tts_chars: f.quota.estimate_tts_chars,
            persist_interval: f.quota.persist_interval,
            hold_ttl: f.quota.hold_ttl,
            prices: policy::quota::PriceTable {
                per_request: f.quota.prices.per_request,
                llm_input_per_1k_tokens: f.quota.prices.llm_input_per_1k_tokens,
                llm_output_per_1k_tokens: f.quota.prices.llm_output_per_1k_tokens,
                audio_in_per_second: f.quota.prices.audio_in_per_second,
                audio_out_per_second: f.quota.prices.audio_out_per_second,
                tts_per_1k_chars: f.quota.prices.tts_per_1k_chars,
                voice_session_per_second: f.quota.prices.voice_session_per_second,
            },
            default_rules,
        },
    })
}

/// `[access]` as policies, each key checked.
fn access_policies(c: &mut Collector, a: raw::AccessConfig) -> policy::access::AccessPolicies {
    use policy::access::{AccessPolicies, AccessPolicy, BotSet, DefaultAccess};
    let mut policies = Vec::with_capacity(a.policies.len());
    for (i, p) in a.policies.into_iter().enumerate() {
        let at = |key: &str| format!("access.policies[{i}].{key}");
        let match_labels = p.match_labels.unwrap_or_else(|| {
            c.err(
                &at("match_labels"),
                "missing (write `match_labels = {}` to match every device)",
            );
            Default::default()
        });
        for (k, v) in &match_labels {
            if k.is_empty() || v.is_empty() {
                c.err(
                    &at("match_labels"),
                    format!("`{k}` = `{v}`: label names and values must not be empty"),
                );
            }
        }
        for (j, path) in p.allow_paths.iter().flatten().enumerate() {
            if !path.starts_with('/') {
                c.err(
                    &format!("{}[{j}]", at("allow_paths")),
                    format!("`{path}` must start with `/`"),
                );
            }
        }
        for (j, bot) in p.allow_bots.iter().flatten().enumerate() {
            if bot.is_empty() || bot.len() > 128 || !bot.bytes().all(|b| b.is_ascii_graphic()) {
                c.err(
                    &format!("{}[{j}]", at("allow_bots")),
                    "must be a bot id (1 to 128 printable ASCII characters)",
                );
            }
        }
        policies.push(AccessPolicy {
            match_labels,
            allow_paths: p.allow_paths,
            allow_bots: p.allow_bots.map(|b| std::sync::Arc::new(BotSet::new(b))),
        });
    }
    let default = match a.default {
        raw::AccessDefault::Allow => DefaultAccess::Allow,
        raw::AccessDefault::Deny => DefaultAccess::Deny,
    };
    AccessPolicies::new(default, policies)
}

/// `[[quota.rules]]` as rules (`config-<n>`), each checked, then checked together.
fn default_rules(
    c: &mut Collector,
    reqs: Vec<policy::quota::CreateLimitation>,
) -> Vec<policy::quota::Rule> {
    let mut rules = Vec::new();
    for (i, req) in reqs.into_iter().enumerate() {
        match req.into_rule(format!("{}{i}", crate::quota::DEFAULT_RULE_PREFIX)) {
            Ok(r) => rules.push(r),
            Err(errs) => {
                for e in errs.0 {
                    c.err(&format!("quota.rules[{i}].{}", e.field), e.kind.to_string());
                }
            }
        }
    }
    if let Err(errs) = policy::quota::RuleSet::new(rules.clone()) {
        for e in errs.0 {
            c.err("quota.rules", e.to_string());
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "FLEETGATE_ADMIN_TOKEN" => Some("admin-token-0123456789".into()),
            "COZE_API_TOKEN" => Some("pat_x".into()),
            "KEY" => Some(base64::engine::general_purpose::STANDARD.encode([7u8; 32])),
            _ => None,
        }
    }

    const MINIMAL: &str = r#"
        [tokens]
        signing_keys = [{ kid = "k1", secret_env = "KEY" }]
    "#;

    /// A bad app key is reported under the key that supplied it.
    #[test]
    fn a_bad_upstream_app_key_names_its_source() {
        let with_key = |source: &str| {
            format!(
                "{MINIMAL}\n[upstream]\nauth = \"jwt\"\n[upstream.jwt]\napp_id = \"a\"\nkid = \"k\"\n{source}"
            )
        };
        let env = |k: &str| match k {
            "BADKEY" => Some("not a pem".to_owned()),
            other => env(other),
        };
        let e = load_str(&with_key("private_key_env = \"BADKEY\""), &env).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["upstream.jwt.private_key_env"], "{e}");
        assert!(
            !e.to_string().contains("not a pem"),
            "key material in the error: {e}"
        );
        let e = load_str(&with_key("private_key_file = \"/nonexistent.pem\""), &env).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["upstream.jwt.private_key_file"], "{e}");
    }

    #[test]
    fn redis_store_is_validated_with_key_paths() {
        let with = |store: &str| format!("{MINIMAL}\n[store]\n{store}");
        let e = load_str(&with("kind = \"redis\""), &env).unwrap_err();
        assert_eq!(e.0[0].path, "store.redis.url", "{e}");
        let e = load_str(
            &with("kind = \"redis\"\n[store.redis]\nurl = \"redis+sentinel://h/m\""),
            &env,
        )
        .unwrap_err();
        assert!(e.0[0].message.contains("Sentinel"), "{e}");
        let e = load_str(
            &with(
                "kind = \"redis\"\n[store.redis]\nurl = \"redis://h:1\"\npassword_env = \"NOPE\"\nlease_size = { requests = 0 }\nlease_idle = \"10s\"",
            ),
            &env,
        )
        .unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "store.redis.password_env",
                "store.redis.lease_size.requests",
                "store.redis.lease_ttl"
            ],
            "{e}"
        );
        let c = load_str(
            &with("kind = \"redis\"\n[store.redis]\nurl = \"redis://u:secret-pw@h:6380/2\""),
            &env,
        )
        .unwrap();
        let r = c.redis.as_ref().unwrap();
        assert_eq!(r.connection.redis_settings().db(), 2);
        assert_eq!(r.connection.redis_settings().password(), Some("secret-pw"));
        assert!(
            !format!("{c:?}").contains("secret-pw"),
            "the password is redacted"
        );
        assert!(load_str(MINIMAL, &env).unwrap().redis.is_none());
    }

    /// `[rate_limits.routes.<class>]` names a route class and a rate; both are checked, with
    /// their key paths.
    #[test]
    fn route_rates_are_validated_with_key_paths() {
        let text = format!(
            "{MINIMAL}\n[rate_limits.routes.chat]\nrps = 2\n[rate_limits.routes.workflow]\nrps = 1\nburst = 4\n"
        );
        let c = load_str(&text, &env).unwrap();
        let chat = c.rate_limits.route(policy::route::RouteClass::Chat);
        assert_eq!((chat.rps, chat.burst), (2, 2), "burst defaults to rps");
        let wf = c.rate_limits.route(policy::route::RouteClass::Workflow);
        assert_eq!((wf.rps, wf.burst), (1, 4));
        assert_eq!(c.rate_limits.route(policy::route::RouteClass::File).rps, 0);

        let e = load_str(
            &format!(
                "{MINIMAL}\n[rate_limits.routes.chats]\nrps = 2\n[rate_limits.routes.voice]\nrps = 1\nburst = 0\n"
            ),
            &env,
        )
        .unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(
            paths,
            ["rate_limits.routes.chats", "rate_limits.routes.voice.burst"],
            "{e}"
        );
        assert!(e.0[0].message.contains("chat, workflow"), "{e}");
    }

    /// `MINIMAL` in cluster mode with this `[store.redis]` table body.
    fn with_redis(table: &str) -> String {
        format!("{MINIMAL}\n[store]\nkind = \"redis\"\n[store.redis]\n{table}")
    }

    /// The key paths of the errors `text` is refused with.
    fn error_paths(text: &str) -> Vec<String> {
        load_str(text, &env)
            .unwrap_err()
            .0
            .iter()
            .map(|x| x.path.clone())
            .collect()
    }

    #[test]
    fn verify_cache_entries_has_a_default_an_off_switch_and_a_bound() {
        assert_eq!(
            load_str(MINIMAL, &env).unwrap().tokens.verify_cache_entries,
            65_536
        );
        let with = |n: usize| format!("{MINIMAL}\nverify_cache_entries = {n}");
        assert_eq!(
            load_str(&with(0), &env)
                .unwrap()
                .tokens
                .verify_cache_entries,
            0
        );
        assert_eq!(
            error_paths(&with(crate::verifier::MAX_ENTRIES + 1)),
            ["tokens.verify_cache_entries"]
        );
    }

    #[test]
    fn replay_cache_entries_has_a_default_and_bounds() {
        assert_eq!(
            load_str(MINIMAL, &env).unwrap().tokens.replay_cache_entries,
            1 << 20
        );
        let with = |n: usize| format!("{MINIMAL}\nreplay_cache_entries = {n}");
        assert_eq!(
            load_str(&with(5000), &env)
                .unwrap()
                .tokens
                .replay_cache_entries,
            5000
        );
        for bad in [0, 1023, (1 << 26) + 1] {
            assert_eq!(error_paths(&with(bad)), ["tokens.replay_cache_entries"]);
        }
    }

    /// `[[quota.rules]]` are checked one by one (with their index) and together.
    #[test]
    fn default_rules_are_validated_with_key_paths() {
        let rule = |benefit: &str, unit: &str| {
            format!(
                "[[quota.rules]]\nentity_type = \"enterprise_all_devices\"\nbenefit_info = {{ benefit_type = \"{benefit}\", started_at = 0, ended_at = 253402300799, limit = 5, trigger_unit = \"{unit}\" }}\n"
            )
        };
        let ok = load_str(&format!("{MINIMAL}\n{}", rule("llm_tokens", "day")), &env).unwrap();
        assert_eq!(ok.quota.default_rules.len(), 1);
        assert_eq!(ok.quota.default_rules[0].benefit_id, "config-0");
        let bad = format!(
            "{MINIMAL}\n{}{}[[quota.rules]]\nentity_type = \"single_device\"\nbenefit_info = {{ benefit_type = \"requests\", started_at = 0, ended_at = 1, limit = 5 }}\n",
            rule("llm_tokens", "day"),
            rule("llm_tokens", "hour")
        );
        let paths = error_paths(&bad);
        assert!(
            paths.iter().any(|p| p.starts_with("quota.rules[2].")),
            "{paths:?}"
        );
        assert!(
            paths.iter().any(|p| p == "quota.rules"),
            "two periodic defaults: {paths:?}"
        );
    }

    #[test]
    fn redis_cluster_is_validated_with_key_paths() {
        let (with, paths) = (with_redis, error_paths);
        assert_eq!(
            paths(&with("url = \"redis://h:1\"\ncluster = [\"redis://a:1\"]")),
            ["store.redis"]
        );
        assert_eq!(paths(&with("cluster = []")), ["store.redis.cluster"]);
        assert_eq!(
            paths(&with(
                "cluster = [\"redis://a:1\", \"redis+cluster://b:2\"]"
            )),
            ["store.redis.cluster[1]"]
        );
        assert_eq!(
            paths(&with("cluster = [\"redis://a:1\", \"rediss://b:2\"]")),
            ["store.redis.cluster"]
        );
        assert_eq!(
            paths(&with(
                "cluster = [\"redis://a:1/3\"]\nkey_prefix = \"{fg}\""
            )),
            ["store.redis.cluster", "store.redis.key_prefix"]
        );
        let c = load_str(
            &with("cluster = [\"redis://a:7000\", \" redis://b:7001 \"]\npassword_env = \"FG_PW\""),
            &|k: &str| match k {
                "FG_PW" => Some("from-env".to_owned()),
                other => env(other),
            },
        )
        .unwrap();
        let r = c.redis.as_ref().unwrap();
        let seeds = r.cluster.as_ref().unwrap();
        assert_eq!(seeds.len(), 2);
        assert!(
            seeds
                .iter()
                .all(|s| s.redis_settings().password() == Some("from-env")),
            "the password applies to every seed"
        );
        assert!(!format!("{c:?}").contains("from-env"), "redacted");
    }

    #[test]
    fn sentinel_is_validated_with_key_paths() {
        let (with, paths) = (with_redis, error_paths);
        assert_eq!(
            paths(&with(
                "url = \"redis://h:1\"\nsentinel = { master_name = \"m\", addrs = [\"redis://s:26379\"] }"
            )),
            ["store.redis"]
        );
        assert_eq!(
            paths(&with("sentinel = { master_name = \" \", addrs = [] }")),
            [
                "store.redis.sentinel.master_name",
                "store.redis.sentinel.addrs"
            ]
        );
        assert_eq!(
            paths(&with(
                "sentinel = { master_name = \"m\", addrs = [\"redis://a:1\", \"http://b:2\"] }"
            )),
            ["store.redis.sentinel.addrs[1]"]
        );
        assert_eq!(
            paths(&with(
                "sentinel = { master_name = \"m\", addrs = [\"redis://a:1\", \"rediss://b:2\"] }"
            )),
            ["store.redis.sentinel.addrs"]
        );
        let c = load_str(
            &with(
                "sentinel = { master_name = \"m\", addrs = [\"rediss://:sent-pw@a:26379\"], db = 3 }\npassword_env = \"FG_PW\"",
            ),
            &|k: &str| match k {
                "FG_PW" => Some("master-pw".to_owned()),
                other => env(other),
            },
        )
        .unwrap();
        let r = c.redis.as_ref().unwrap();
        let s = r.sentinel.as_ref().unwrap();
        assert_eq!((s.master_name.as_str(), s.addrs.len()), ("m", 1));
        assert_eq!(r.connection.redis_settings().db(), 3);
        assert_eq!(r.connection.redis_settings().password(), Some("master-pw"));
        assert!(matches!(
            r.connection.addr(),
            redis::ConnectionAddr::TcpTls { .. }
        ));
        let debug = format!("{c:?}");
        assert!(!debug.contains("sent-pw") && !debug.contains("master-pw"));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load_str(MINIMAL, &env).unwrap();
        assert_eq!(
            c.upstream.rest,
            UpstreamTarget {
                tls: true,
                host: "api.coze.cn".into(),
                port: 443
            }
        );
        assert_eq!(
            c.upstream.ws,
            UpstreamTarget {
                tls: true,
                host: "ws.coze.cn".into(),
                port: 443
            }
        );
        assert_eq!(c.tokens.keyring.active_kid(), "k1");
        assert!(
            !format!("{c:?}").contains("admin-token-0123456789"),
            "secrets are redacted"
        );
    }

    #[test]
    fn misspelled_key_fails_with_its_path() {
        let e = load_str("[upstream]\nbase_ur = \"x\"\n", &env).unwrap_err();
        assert_eq!(e.0[0].path, "upstream.base_ur", "{e}");
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let text = r#"
            [server]
            threads = 0
            [device_listener]
            addr = "nope"
            [upstream]
            base_url = "ftp://x"
            pat_env = "MISSING_VAR"
        "#;
        let e = load_str(text, &env).unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "server.threads",
            "device_listener.addr",
            "upstream.base_url",
            "upstream.pat_env",
            "tokens.signing_keys",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
    }

    /// Unknown keys do not stop the check at the first one: each is reported, with the bad
    /// values, and a value of the wrong type names its key.
    #[test]
    fn every_unknown_key_is_reported_with_the_bad_values() {
        let text = format!(
            "{MINIMAL}\nextra = 2\n[server]\nbogus = 1\nthreads = 0\n[upstream]\nbase_ur = \"x\"\n[quota.prices]\nllm_per_token = 1\n"
        );
        let e = load_str(&text, &env).unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                // Unknown keys in the order serde meets them, then the bad values.
                "quota.prices.llm_per_token",
                "server.bogus",
                "tokens.extra",
                "upstream.base_ur",
                "server.threads"
            ],
            "{e}"
        );
        let with_key = r#"signing_keys = [{ kid = "k1", secret_env = "KEY", extra = 2 }]"#;
        assert_eq!(
            error_paths(&format!("[tokens]\n{with_key}\n")),
            ["tokens.signing_keys[0].extra"]
        );
        let e = load_str(
            &format!("{MINIMAL}\n[server]\nbogus = 1\nthreads = \"x\"\n"),
            &env,
        )
        .unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["server.bogus", "server.threads"], "{e}");
    }

    #[test]
    fn device_tls_modes_are_checked_together_with_key_paths() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tls");
        let with = |tls: &str| {
            format!(
                "{MINIMAL}\n[device_listener.tls]\ncert_file = \"{fixtures}/upstream.pem\"\nkey_file = \"{fixtures}/upstream.key\"\n{tls}"
            )
        };
        let c = load_str(&with(""), &env).unwrap();
        let t = c.device_tls.unwrap();
        assert_eq!(t.files.client_auth, crate::device_tls::ClientAuth::Off);
        assert_eq!(t.handshake_timeout, Duration::from_secs(10));
        // A client CA alone means certificates are required.
        let c = load_str(
            &with(&format!(
                "client_ca_file = \"{fixtures}/device-ca.pem\"\nbind_device = true"
            )),
            &env,
        )
        .unwrap();
        let t = c.device_tls.unwrap();
        assert_eq!(t.files.client_auth, crate::device_tls::ClientAuth::Required);
        assert!(t.bind_device);
        let e = load_str(
            &with("client_auth = \"optional\"\nbind_device = true\nhandshake_timeout = \"0s\""),
            &env,
        )
        .unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "device_listener.tls.client_ca_file",
                "device_listener.tls.handshake_timeout"
            ],
            "{e}"
        );
        let e = load_str(
            &with(&format!(
                "client_auth = \"off\"\nclient_ca_file = \"{fixtures}/device-ca.pem\"\nbind_device = true"
            )),
            &env,
        )
        .unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "device_listener.tls.client_auth",
                "device_listener.tls.bind_device"
            ],
            "{e}"
        );
        let e = load_str(
            &format!("{MINIMAL}\n[device_listener.tls]\ncert_file = \"/nonexistent.pem\"\nkey_file = \"{fixtures}/upstream.key\"\nclient_auth = \"sometimes\""),
            &env,
        )
        .unwrap_err();
        assert!(e.0[0].path.starts_with("device_listener.tls"), "{e}");
    }

    #[test]
    fn derives_ws_host_like_the_sdks() {
        assert_eq!(derive_ws_base("https://api.coze.cn"), "wss://ws.coze.cn");
        assert_eq!(derive_ws_base("http://127.0.0.1:9"), "ws://127.0.0.1:9");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn env(_: &str) -> Option<String> {
        Some("0123456789abcdef0123456789abcdef".to_owned())
    }

    proptest! {
        /// The config loader never panics: arbitrary text, and arbitrary edits of the
        /// shipped example, end in a config or in errors with key paths.
        #[test]
        fn loader_never_panics(text in ".{0,400}") {
            let _ = load_str(&text, &env);
        }

        #[test]
        fn edited_example_never_panics(pos in 0usize..6000, junk in "[ -~\n]{0,40}") {
            let base = include_str!("../../../config.toml");
            let cut = base.char_indices().map(|(i, _)| i).take_while(|i| *i <= pos).last().unwrap_or(0);
            let text = format!("{}{}{}", &base[..cut], junk, &base[cut..]);
            if let Err(errors) = load_str(&text, &env) {
                prop_assert!(!errors.0.is_empty());
            }
        }
    }
}

#[cfg(test)]
mod access_section {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "FLEETGATE_ADMIN_TOKEN" => Some("admin-token-0123456789".into()),
            "COZE_API_TOKEN" => Some("pat_x".into()),
            "KEY" => Some(base64::engine::general_purpose::STANDARD.encode([7u8; 32])),
            _ => None,
        }
    }

    const MINIMAL: &str = "[tokens]\nsigning_keys = [{ kid = \"k1\", secret_env = \"KEY\" }]\n";

    /// Every bad key of `[access]` is reported at once with its path, unknown keys too.
    #[test]
    fn bad_access_keys_are_reported_with_their_paths() {
        let text = format!(
            "{MINIMAL}[access]\ndefault = \"deny\"\n\
             [[access.policies]]\nallow_paths = [\"v3/chat\"]\nallow_bots = [\"\"]\nallow_bot = []\n\
             [[access.policies]]\nmatch_labels = {{ product = \"\" }}\n"
        );
        let e = load_str(&text, &env).unwrap_err();
        let mut paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "access.policies[0].allow_bot",
                "access.policies[0].allow_bots[0]",
                "access.policies[0].allow_paths[0]",
                "access.policies[0].match_labels",
                "access.policies[1].match_labels",
            ],
            "{e}"
        );
        let e = load_str(&format!("{MINIMAL}[access]\ndefault = \"maybe\"\n"), &env).unwrap_err();
        assert_eq!(e.0[0].path, "access.default", "{e}");
    }

    #[test]
    fn a_valid_access_section_is_loaded_in_order() {
        let text = format!(
            "{MINIMAL}[access]\ndefault = \"deny\"\n\
             [[access.policies]]\nmatch_labels = {{ product = \"toy\" }}\nallow_bots = [\"b1\"]\n\
             [[access.policies]]\nmatch_labels = {{}}\nallow_paths = [\"/v1/audio/\"]\n"
        );
        let c = load_str(&text, &env).unwrap();
        let toy = [("product".to_owned(), "toy".to_owned())]
            .into_iter()
            .collect();
        assert!(
            c.access
                .check_path(&toy, "/v3/chat")
                .unwrap()
                .is_restricted()
        );
        let other = Default::default();
        assert!(c.access.check_path(&other, "/v3/chat").is_err());
        assert!(
            !c.access
                .check_path(&other, "/v1/audio/speech")
                .unwrap()
                .is_restricted()
        );
        // No [access] section: unrestricted.
        assert!(load_str(MINIMAL, &env).unwrap().access.is_unrestricted());
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The variables the shipped file names.
    fn env(k: &str) -> Option<String> {
        match k {
            "FLEETGATE_ADMIN_TOKEN" => Some("admin-token-0123456789".to_owned()),
            "COZE_API_TOKEN" => Some("pat_example".to_owned()),
            "FLEETGATE_REDIS_PASSWORD" => Some("pw".to_owned()),
            "FLEETGATE_SIGNING_KEY_K1" => {
                Some(base64::engine::general_purpose::STANDARD.encode([3u8; 32]))
            }
            _ => None,
        }
    }

    /// The shipped file with the commented section that starts at the line `header`
    /// uncommented, up to the next empty line (`# # …` lines stay comments).
    fn uncomment(text: &str, header: &str) -> String {
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == header {
                inside = true;
            } else if line.is_empty() {
                inside = false;
            }
            match line.strip_prefix("# ") {
                Some(l) if inside && !l.starts_with('#') => out.push_str(l),
                _ => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// The shipped `config.toml` must always parse and validate.
    #[test]
    fn shipped_config_toml_is_valid() {
        let text = include_str!("../../../config.toml");
        let c = load_str(text, &env).unwrap_or_else(|e| panic!("config.toml: {e}"));
        assert_eq!(c.device_addr.port(), 8080);
        assert_eq!(c.upstream.ws.host, "ws.coze.cn");
        // A misspelled key in the same file fails with its path.
        let broken = text.replace("stream_idle_timeout", "stream_idle_timout");
        let e = load_str(&broken, &env).unwrap_err();
        assert_eq!(e.0[0].path, "upstream.stream_idle_timout", "{e}");
    }

    /// The commented device TLS section is valid once uncommented (with the test fixtures as
    /// its files).
    #[test]
    fn shipped_device_tls_section_is_valid() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tls");
        let text = include_str!("../../../config.toml");
        let out = uncomment(text, "# [device_listener.tls]")
            .replace(
                "/etc/fleetgate/tls/device-listener.",
                &format!("{fixtures}/upstream."),
            )
            .replace(
                "/etc/fleetgate/tls/device-ca.pem",
                &format!("{fixtures}/device-ca.pem"),
            );
        let c = load_str(&out, &env).unwrap_or_else(|e| panic!("config.toml (device TLS): {e}"));
        let t = c.device_tls.expect("device_listener.tls");
        assert_eq!(t.files.client_auth, crate::device_tls::ClientAuth::Required);
        assert!(t.bind_device);
        assert_eq!(t.handshake_timeout, Duration::from_secs(10));
    }

    /// The commented access section is valid once uncommented, and a file without it
    /// restricts nothing.
    #[test]
    fn shipped_access_section_is_valid() {
        let text = include_str!("../../../config.toml");
        assert!(load_str(text, &env).unwrap().access.is_unrestricted());
        let out = uncomment(text, "# [access]");
        let c = load_str(&out, &env).unwrap_or_else(|e| panic!("config.toml (access): {e}"));
        let toy = [("product".to_owned(), "toy".to_owned())]
            .into_iter()
            .collect();
        let p = c.access.policy_for(&toy).expect("the toy policy");
        assert_eq!(p.allow_paths.as_ref().map(Vec::len), Some(3));
        assert!(c.access.check_path(&toy, "/v1/workflow/run").is_err());
        assert!(
            c.access
                .check_path(&Default::default(), "/v1/workflow/run")
                .is_ok()
        );
    }

    /// The commented cluster section is valid once uncommented (its keys are real).
    #[test]
    fn shipped_cluster_section_is_valid() {
        let text = include_str!("../../../config.toml");
        let out = uncomment(text, "# [store.redis]").replacen(
            "# kind = \"embedded\"",
            "kind = \"redis\"    #",
            1,
        );
        let c = load_str(&out, &env).unwrap_or_else(|e| panic!("config.toml (cluster): {e}"));
        let r = c.redis.expect("store.redis");
        assert_eq!(
            r.lease_size.get(&policy::quota::BenefitType::LlmTokens),
            Some(&2000)
        );
        assert_eq!(
            r.degraded_allowance
                .get(&policy::quota::BenefitType::LlmTokens),
            Some(&500)
        );
        assert_eq!(r.lease_ttl, Duration::from_secs(10));
    }
}
