//! The file shape of `config.toml`: serde structs that mirror the file. Unknown keys are not
//! refused here (serde would stop at the first): [`super::load_str`] collects every one of
//! them and reports them with the other errors. Nothing here is validated beyond types; see
//! [`super::validate`].

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub device_listener: ListenerConfig,
    #[serde(default)]
    pub admin_listener: AdminListenerConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub routes: RoutesConfig,
    #[serde(default)]
    pub websocket: WebSocketConfig,
    #[serde(default)]
    pub tokens: TokensConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub quota: QuotaConfig,
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    /// Absent: every device may use every allowed route (`default = "allow"`, no policies).
    #[serde(default)]
    pub access: AccessConfig,
}

/// Per-device access policies, chosen by device labels (`[access]`).
#[derive(Debug, Default, Deserialize)]
pub struct AccessConfig {
    /// What devices that match no policy may do: `"allow"` or `"deny"`.
    #[serde(default)]
    pub default: AccessDefault,
    /// Checked in order; the first whose labels match decides.
    #[serde(default)]
    pub policies: Vec<AccessPolicyConfig>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessDefault {
    #[default]
    Allow,
    Deny,
}

/// One `[[access.policies]]` entry.
#[derive(Debug, Default, Deserialize)]
pub struct AccessPolicyConfig {
    /// Every listed label must be equal on the device; `{}` matches every device.
    pub match_labels: Option<std::collections::BTreeMap<String, String>>,
    /// Route prefixes this device may call (absent: every allowed route).
    pub allow_paths: Option<Vec<String>>,
    /// Bot ids this device may name (absent: any bot).
    pub allow_bots: Option<Vec<String>>,
}

/// Request rate limits (GCRA). 0 turns a limit off.
#[derive(Debug, Default, Deserialize)]
pub struct RateLimitsConfig {
    /// Requests (and WebSocket sessions) per second per device, all routes.
    #[serde(default)]
    pub device_rps: u32,
    /// Burst per device (default: `device_rps`).
    pub device_burst: Option<u32>,
    /// Fleet-wide requests per second sent upstream on chat routes (Coze plan `api_run_qps`).
    #[serde(default)]
    pub fleet_chat_qps: u32,
    /// Fleet-wide requests per second on workflow routes.
    #[serde(default)]
    pub fleet_workflow_qps: u32,
    /// Devices tracked by each per-device limiter (idle ones are forgotten first), and by
    /// fleet fairness per second.
    pub max_tracked_devices: Option<usize>,
    /// Per device on one route class: `[rate_limits.routes.chat] rps = 1`.
    #[serde(default)]
    pub routes: std::collections::BTreeMap<String, RouteRateConfig>,
}

/// `[rate_limits.routes.<class>]`.
#[derive(Debug, Deserialize)]
pub struct RouteRateConfig {
    /// Requests (and WebSocket sessions) per second per device on this route class.
    pub rps: u32,
    /// Burst (default: `rps`).
    pub burst: Option<u32>,
}

/// Quotas: what admission holds for a request before its real usage is known, how credits
/// (`resource_point`) are priced, and how often usage counters are persisted.
#[derive(Debug, Deserialize)]
pub struct QuotaConfig {
    /// LLM tokens held at admission for a chat / workflow call (released at settlement); also
    /// what a WebSocket chat turn whose usage never came is charged.
    #[serde(default = "d_est_tokens")]
    pub estimate_llm_tokens: u64,
    /// Audio held at admission for a voice session or an audio call, in ms.
    #[serde(default = "d_est_audio")]
    pub estimate_audio_ms: u64,
    /// TTS characters held at admission for `/v1/audio/speech`.
    #[serde(default = "d_est_tts")]
    pub estimate_tts_chars: u64,
    /// Usage counters are written to the store this often (the most settled usage a crash
    /// can lose).
    #[serde(default = "d_persist", with = "humantime_serde")]
    pub persist_interval: Duration,
    /// A hold not heard from for this long (its request's end was lost) is charged what it
    /// holds. Open WebSocket sessions refresh theirs every third of it, idle or not.
    #[serde(default = "d_hold_ttl", with = "humantime_serde")]
    pub hold_ttl: Duration,
    /// `resource_point` prices, in micro-points (1 point = 1 000 000).
    #[serde(default)]
    pub prices: PricesConfig,
    /// Pull rules (and the plan QPS) from the upstream's quota APIs.
    #[serde(default)]
    pub sync: QuotaSyncConfig,
    /// Default rules, in the shape of Coze's create request: they hold where no rule from the
    /// admin API or the upstream covers the same scope.
    #[serde(default)]
    pub rules: Vec<policy::quota::CreateLimitation>,
}

#[derive(Debug, Deserialize)]
pub struct QuotaSyncConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "d_sync_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Environment variable with a token allowed to list limitations (default: the PAT's).
    pub token_env: Option<String>,
    /// Also read the plan's `api_run_qps` (chat, workflow) as fleet caps when the
    /// `[rate_limits]` caps are 0.
    #[serde(default = "d_true")]
    pub plan_qps: bool,
}

impl Default for QuotaSyncConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: d_sync_interval(),
            token_env: None,
            plan_qps: true,
        }
    }
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            estimate_llm_tokens: d_est_tokens(),
            estimate_audio_ms: d_est_audio(),
            estimate_tts_chars: d_est_tts(),
            persist_interval: d_persist(),
            hold_ttl: d_hold_ttl(),
            prices: PricesConfig::default(),
            sync: QuotaSyncConfig::default(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PricesConfig {
    #[serde(default)]
    pub per_request: u64,
    #[serde(default)]
    pub llm_input_per_1k_tokens: u64,
    #[serde(default)]
    pub llm_output_per_1k_tokens: u64,
    #[serde(default)]
    pub audio_in_per_second: u64,
    #[serde(default)]
    pub audio_out_per_second: u64,
    #[serde(default)]
    pub tts_per_1k_chars: u64,
    #[serde(default)]
    pub voice_session_per_second: u64,
}

#[derive(Debug, Deserialize)]
pub struct StoreConfig {
    /// `"embedded"` (one node, the redb file at `path`) or `"redis"` (a cluster sharing the
    /// Redis at `[store.redis]`).
    #[serde(default)]
    pub kind: StoreKind,
    /// The embedded store file (devices survive restarts); `:memory:` keeps nothing.
    #[serde(default = "d_store_path")]
    pub path: String,
    #[serde(default)]
    pub redis: RedisConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            path: d_store_path(),
            redis: RedisConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Embedded,
    Redis,
}

/// Cluster mode: the Redis every node shares.
#[derive(Debug, Deserialize)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host:port[/db]`, or `rediss://` for TLS (system CA store).
    /// Not with `sentinel` or `cluster`.
    pub url: Option<String>,
    /// Redis Sentinel: the master is looked up by name through the sentinels (again after a
    /// failover). Instead of `url`.
    pub sentinel: Option<SentinelConfig>,
    /// Redis Cluster: seed nodes as `redis://host:port` (or all `rediss://`); the rest of the
    /// cluster is discovered from them. Instead of `url`.
    pub cluster: Option<Vec<String>>,
    /// Environment variable holding the password (instead of putting it in the URL).
    pub password_env: Option<String>,
    /// Prefix of every key and channel (several fleets can share one Redis).
    #[serde(default = "d_key_prefix")]
    pub key_prefix: String,
    /// Per-command timeout; a slower Redis counts as unreachable.
    #[serde(default = "d_redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How often a node compares its change counter with Redis's (the safety net behind
    /// pub/sub).
    #[serde(default = "d_full_check", with = "humantime_serde")]
    pub full_check_interval: Duration,
    /// Quota units a node takes per lease, by benefit type (base units: requests, tokens,
    /// ms, chars, micro-points). Unlisted types lease 1 unit (exact, one round trip per hold).
    #[serde(default)]
    pub lease_size: std::collections::BTreeMap<policy::quota::BenefitType, u64>,
    /// An unused lease goes back to Redis after this long without activity.
    #[serde(default = "d_lease_idle", with = "humantime_serde")]
    pub lease_idle: Duration,
    /// A node that has not reported for this long is presumed dead: its unspent leases are
    /// reclaimed (what it spent stays charged).
    #[serde(default = "d_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// While Redis is unreachable, each listed benefit type runs *degraded*: a node may spend
    /// the leases it holds plus this many base units per device; unlisted types fail closed
    /// (503 / 5000).
    #[serde(default)]
    pub degraded_allowance: std::collections::BTreeMap<policy::quota::BenefitType, u64>,
}

/// `[store.redis.sentinel]`.
#[derive(Debug, Deserialize)]
pub struct SentinelConfig {
    /// The monitored master's name (`sentinel monitor <name> …`).
    pub master_name: String,
    /// Sentinel addresses as `redis://[:password@]host:port` (or `rediss://`: then the master
    /// is reached over TLS too).
    pub addrs: Vec<String>,
    /// The master's database number.
    #[serde(default)]
    pub db: i64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            sentinel: None,
            cluster: None,
            password_env: None,
            key_prefix: d_key_prefix(),
            timeout: d_redis_timeout(),
            full_check_interval: d_full_check(),
            lease_size: Default::default(),
            lease_idle: d_lease_idle(),
            lease_ttl: d_lease_ttl(),
            degraded_allowance: Default::default(),
        }
    }
}

fn d_key_prefix() -> String {
    "fleetgate".into()
}
fn d_redis_timeout() -> Duration {
    Duration::from_millis(500)
}
fn d_full_check() -> Duration {
    Duration::from_secs(5)
}
fn d_lease_idle() -> Duration {
    Duration::from_secs(2)
}
fn d_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
pub struct ServerConfig {
    /// Worker threads of the device listener.
    pub threads: Option<usize>,
    /// How long SIGTERM waits for streams to finish before closing them.
    #[serde(default = "d_grace", with = "humantime_serde")]
    pub grace_period: Duration,
    /// After SIGTERM, keep serving this long with readiness failed so load balancers stop
    /// sending before the listeners close (capped by `grace_period`).
    #[serde(default = "d_drain_delay", with = "humantime_serde")]
    pub drain_delay: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            threads: None,
            grace_period: d_grace(),
            drain_delay: d_drain_delay(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ListenerConfig {
    #[serde(default = "d_device_addr")]
    pub addr: String,
    /// TLS (and mTLS) terminated by the gateway; plain HTTP when absent.
    pub tls: Option<DeviceTlsConfig>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            addr: d_device_addr(),
            tls: None,
        }
    }
}

/// `[device_listener.tls]`.
#[derive(Debug, Deserialize)]
pub struct DeviceTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key_file: String,
    /// PEM CA certificates that device client certificates must chain to.
    pub client_ca_file: Option<String>,
    /// `off`, `optional` or `required` (default: `required` with `client_ca_file`, else `off`).
    pub client_auth: Option<crate::device_tls::ClientAuth>,
    /// Tokens only work on connections whose client certificate names their device.
    #[serde(default)]
    pub bind_device: bool,
    #[serde(default = "d_tls_handshake", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn d_tls_handshake() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
pub struct AdminListenerConfig {
    #[serde(default = "d_admin_addr")]
    pub addr: String,
    /// Environment variable holding the admin bearer token.
    #[serde(default = "d_admin_token_env")]
    pub token_env: String,
}

impl Default for AdminListenerConfig {
    fn default() -> Self {
        Self {
            addr: d_admin_addr(),
            token_env: d_admin_token_env(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamAuthMode {
    #[default]
    Pat,
    Jwt,
}

#[derive(Debug, Deserialize)]
pub struct UpstreamConfig {
    #[serde(default = "d_base_url")]
    pub base_url: String,
    /// WebSocket base; derived from `base_url` (`https://api.` → `wss://ws.`) when absent.
    pub ws_base_url: Option<String>,
    #[serde(default)]
    pub auth: UpstreamAuthMode,
    /// Environment variable holding the PAT / service token for `auth = "pat"`.
    #[serde(default = "d_pat_env")]
    pub pat_env: String,
    #[serde(default = "d_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// REST: time to the first response byte, and the longest gap between body chunks.
    #[serde(default = "d_read", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Streaming routes (SSE): time to first byte and longest gap between events.
    #[serde(default = "d_stream_idle", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Whole request/stream, WebSockets excepted.
    #[serde(default = "d_total", with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Settings of `auth = "jwt"`.
    pub jwt: Option<UpstreamJwtConfig>,
}

/// `auth = "jwt"`: per-device OAuth tokens minted with the vendor's Coze OAuth app key.
#[derive(Debug, Deserialize)]
pub struct UpstreamJwtConfig {
    /// The OAuth app id (JWT `iss`).
    pub app_id: String,
    /// The app's public key fingerprint (JWT header `kid`).
    pub kid: String,
    /// PEM file with the app's RSA private key (PKCS#8 `PRIVATE KEY` or PKCS#1).
    pub private_key_file: Option<String>,
    /// Environment variable with the PEM instead.
    pub private_key_env: Option<String>,
    /// Token lifetime asked for (`duration_seconds`, at most 86399 s).
    #[serde(default = "d_up_ttl", with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Refresh a device's token this long before it expires (in the background).
    #[serde(default = "d_up_refresh", with = "humantime_serde")]
    pub refresh_before: Duration,
    /// Token endpoint path: `/api/permission/oauth2/token`, or the
    /// `/account/{id}/token` / `/enterprise_id/{id}/token` variants.
    #[serde(default = "d_up_path")]
    pub token_path: String,
    /// JWT `aud`; default: the upstream host.
    pub audience: Option<String>,
    /// Optional channel `scope` object, sent as is.
    pub scope: Option<toml::Table>,
    /// Most token exchanges in flight at once (towards the upstream token endpoint).
    #[serde(default = "d_up_concurrency")]
    pub max_concurrent_exchanges: usize,
    /// Most devices with a cached upstream token; idle ones are evicted first.
    #[serde(default = "d_up_cache")]
    pub max_cached_devices: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: d_base_url(),
            ws_base_url: None,
            auth: UpstreamAuthMode::Pat,
            pat_env: d_pat_env(),
            connect_timeout: d_connect(),
            read_timeout: d_read(),
            stream_idle_timeout: d_stream_idle(),
            total_timeout: d_total(),
            jwt: None,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RoutesConfig {
    /// Allowed path prefixes (a trailing `/` matches everything below).
    pub allow: Option<Vec<String>>,
    #[serde(default = "d_body_limit")]
    pub body_limit_bytes: u64,
    #[serde(default = "d_wf_body_limit")]
    pub workflow_body_limit_bytes: u64,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            allow: None,
            body_limit_bytes: d_body_limit(),
            workflow_body_limit_bytes: d_wf_body_limit(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct WebSocketConfig {
    /// Ping the upstream after this long without upstream traffic (0 disables).
    #[serde(default = "d_ping", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Largest relay read, bytes (buffers are lent per read, not held per session).
    #[serde(default = "d_ws_buf")]
    pub buffer_bytes: usize,
    /// Longest time for the upstream WebSocket handshake.
    #[serde(default = "d_connect", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            ping_interval: d_ping(),
            buffer_bytes: d_ws_buf(),
            handshake_timeout: d_connect(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct SigningKeyConfig {
    pub kid: String,
    /// Environment variable with the base64 key (as printed by `fleetgate keygen`).
    pub secret_env: Option<String>,
    /// File with the base64 key.
    pub secret_file: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct TokensConfig {
    /// Lifetime of gateway access tokens when the caller asks for none.
    #[serde(default = "d_ttl", with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Longest lifetime a caller may ask for (at most 86399 s).
    #[serde(default = "d_max_ttl", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Gateway signing keys; `active_kid` signs, all verify.
    #[serde(default)]
    pub signing_keys: Vec<SigningKeyConfig>,
    pub active_kid: Option<String>,
    /// Accepted `aud` values of device-signed JWT assertions at the token endpoint.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Also accept the request's `Host` as `aud` (what Coze SDKs derive from `base_url`).
    #[serde(default = "d_true")]
    pub audience_from_host: bool,
    /// Longest `exp - iat` of a device assertion (Coze SDKs sign for 3600 s).
    #[serde(default = "d_assertion_lifetime", with = "humantime_serde")]
    pub max_assertion_lifetime: Duration,
    /// Clock skew tolerated on assertion `iat`.
    #[serde(default = "d_skew", with = "humantime_serde")]
    pub max_assertion_skew: Duration,
    /// Slots of the memo of verified access tokens (0: off).
    #[serde(default = "d_verify_cache_entries")]
    pub verify_cache_entries: usize,
    /// Device assertions (`jti`s) remembered until they expire (single use).
    #[serde(default = "d_replay_cache_entries")]
    pub replay_cache_entries: usize,
}

fn d_verify_cache_entries() -> usize {
    65_536
}

fn d_replay_cache_entries() -> usize {
    1 << 20
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            default_ttl: d_ttl(),
            max_ttl: d_max_ttl(),
            signing_keys: Vec::new(),
            active_kid: None,
            audiences: Vec::new(),
            audience_from_host: true,
            max_assertion_lifetime: d_assertion_lifetime(),
            verify_cache_entries: d_verify_cache_entries(),
            replay_cache_entries: d_replay_cache_entries(),
            max_assertion_skew: d_skew(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Deserialize)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `info,pingora=warn`.
    #[serde(default = "d_level")]
    pub level: String,
    /// Emit one access-log line per request/session.
    #[serde(default = "d_true")]
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: d_level(),
            access_log: true,
        }
    }
}

fn d_store_path() -> String {
    "fleetgate.redb".into()
}
fn d_assertion_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn d_skew() -> Duration {
    Duration::from_secs(60)
}
fn d_up_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn d_up_refresh() -> Duration {
    Duration::from_secs(300)
}
fn d_up_path() -> String {
    "/api/permission/oauth2/token".into()
}
fn d_up_concurrency() -> usize {
    16
}
fn d_up_cache() -> usize {
    100_000
}
fn d_est_tokens() -> u64 {
    1000
}
fn d_est_audio() -> u64 {
    10_000
}
fn d_est_tts() -> u64 {
    300
}
fn d_persist() -> Duration {
    Duration::from_millis(100)
}
fn d_hold_ttl() -> Duration {
    Duration::from_secs(900)
}
fn d_sync_interval() -> Duration {
    Duration::from_secs(30)
}
fn d_drain_delay() -> Duration {
    Duration::from_secs(5)
}
fn d_grace() -> Duration {
    Duration::from_secs(30)
}
fn d_device_addr() -> String {
    "0.0.0.0:8080".into()
}
fn d_admin_addr() -> String {
    "127.0.0.1:9090".into()
}
fn d_admin_token_env() -> String {
    "FLEETGATE_ADMIN_TOKEN".into()
}
fn d_base_url() -> String {
    "https://api.coze.cn".into()
}
fn d_pat_env() -> String {
    "COZE_API_TOKEN".into()
}
fn d_connect() -> Duration {
    Duration::from_secs(5)
}
fn d_read() -> Duration {
    Duration::from_secs(60)
}
fn d_stream_idle() -> Duration {
    Duration::from_secs(120)
}
fn d_total() -> Duration {
    Duration::from_secs(1800)
}
fn d_body_limit() -> u64 {
    15 << 20
}
fn d_wf_body_limit() -> u64 {
    20 << 20
}
fn d_ping() -> Duration {
    Duration::from_secs(30)
}
fn d_ws_buf() -> usize {
    4096
}
fn d_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn d_max_ttl() -> Duration {
    Duration::from_secs(86399)
}
fn d_level() -> String {
    "info".into()
}
fn d_true() -> bool {
    true
}
