//! Shared server state: OAuth apps, issued tokens (with what they were minted with), counters,
//! and per-server fault switches. Domain state (conversations, chats, files, rules) lives in the
//! modules that own it, as fields here.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::SandboxConfig;

/// An OAuth app key: JWT assertions with header `kid` are verified with `public_key_pem`
/// (RS256) and must carry `iss == app_id`.
#[derive(Clone, Debug)]
pub struct AppKey {
    pub app_id: String,
    pub kid: String,
    pub public_key_pem: String,
}

/// What an access token was minted with, so tests can assert attribution.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MintedToken {
    pub app_id: String,
    pub session_name: Option<String>,
    pub device_id: Option<String>,
    pub custom_consumer: Option<String>,
    pub scope: Option<serde_json::Value>,
    /// Absolute unix seconds.
    pub expires_at: u64,
}

/// Per-server fault switches, flipped by tests in-process or over `POST /__sandbox/switches`.
#[derive(Debug, Default)]
pub struct Switches {
    pub token_endpoint_down: AtomicBool,
    pub limitations_down: AtomicBool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SwitchesBody {
    #[serde(default)]
    pub token_endpoint_down: Option<bool>,
    #[serde(default)]
    pub limitations_down: Option<bool>,
}

/// A WebSocket handshake as the sandbox received it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WsHandshake {
    pub query: String,
    pub authorization: Option<String>,
    pub extensions: Option<String>,
}

/// Counters that tests assert on.
#[derive(Debug, Default)]
pub struct Counters {
    /// Successful token exchanges at `/api/permission/oauth2/token`.
    pub token_exchanges: AtomicU64,
    /// Every API request that passed authentication (REST, SSE and WS handshakes).
    pub api_requests: AtomicU64,
    /// WebSocket sessions accepted.
    pub ws_sessions: AtomicU64,
}

/// The sandbox's whole state.
pub struct SandboxState {
    pub config: SandboxConfig,
    pub addr: SocketAddr,
    pub switches: Switches,
    pub counters: Counters,
    /// Issued OAuth access tokens.
    tokens: Mutex<HashMap<String, MintedToken>>,
    /// Used JWT ids (single use).
    used_jti: Mutex<HashSet<String>>,
    /// Last `X-Coze-DeviceInfo` header seen per API path class, for attribution asserts.
    pub last_device_info: Mutex<Option<String>>,
    /// The last WebSocket handshake as it arrived (query, `Authorization`, extensions).
    pub last_ws_handshake: Mutex<Option<WsHandshake>>,
    /// Domain stores, owned by their modules.
    pub conversations: Mutex<crate::conversations::Store>,
    pub chats: Mutex<crate::chat::Store>,
    pub files: Mutex<crate::files::Store>,
    pub commerce: Mutex<crate::commerce::Store>,
    id_seq: AtomicU64,
}

/// Lock a mutex, recovering the data if a panicking thread poisoned it: sandbox state is
/// plain data, always consistent between statements.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SandboxState {
    pub fn new(config: SandboxConfig, addr: SocketAddr) -> Self {
        Self {
            id_seq: AtomicU64::new(7_382_159_487_131_697_202 ^ (config.seed & 0xffff)),
            config,
            addr,
            switches: Switches::default(),
            counters: Counters::default(),
            tokens: Mutex::new(HashMap::new()),
            used_jti: Mutex::new(HashSet::new()),
            last_device_info: Mutex::new(None),
            last_ws_handshake: Mutex::new(None),
            conversations: Mutex::new(Default::default()),
            chats: Mutex::new(Default::default()),
            files: Mutex::new(Default::default()),
            commerce: Mutex::new(Default::default()),
        }
    }

    /// A new Coze-style id: a 19-digit decimal string, unique within this server.
    pub fn next_id(&self) -> String {
        self.id_seq.fetch_add(1, Ordering::Relaxed).to_string()
    }

    pub fn record_token(&self, token: String, minted: MintedToken) {
        lock(&self.tokens).insert(token, minted);
    }

    pub fn token_info(&self, token: &str) -> Option<MintedToken> {
        lock(&self.tokens).get(token).cloned()
    }

    /// All tokens issued so far (tests look for `session_name`/`device_id`).
    pub fn minted_tokens(&self) -> Vec<MintedToken> {
        lock(&self.tokens).values().cloned().collect()
    }

    /// Marks a `jti` used; false if it was used before.
    pub fn use_jti(&self, jti: &str) -> bool {
        lock(&self.used_jti).insert(jti.to_owned())
    }

    pub fn token_exchanges(&self) -> u64 {
        self.counters.token_exchanges.load(Ordering::Relaxed)
    }

    /// Accepted JWT audiences: configured ones plus this server's own `host:port`.
    pub fn audience_ok(&self, aud: &str) -> bool {
        aud == self.addr.to_string()
            || aud == format!("localhost:{}", self.addr.port())
            || self.config.audiences.iter().any(|a| a == aud)
    }
}

/// `/__sandbox/*`: test control endpoints (not part of Coze's API).
pub fn control_routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/__sandbox/stats", get(stats))
        .route("/__sandbox/switches", post(set_switches))
}

async fn stats(State(st): State<Arc<SandboxState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "token_exchanges": st.counters.token_exchanges.load(Ordering::Relaxed),
        "api_requests": st.counters.api_requests.load(Ordering::Relaxed),
        "ws_sessions": st.counters.ws_sessions.load(Ordering::Relaxed),
        "minted_tokens": st.minted_tokens(),
        "last_device_info": lock(&st.last_device_info).clone(),
    }))
}

async fn set_switches(
    State(st): State<Arc<SandboxState>>,
    Json(body): Json<SwitchesBody>,
) -> Json<serde_json::Value> {
    if let Some(v) = body.token_endpoint_down {
        st.switches.token_endpoint_down.store(v, Ordering::Relaxed);
    }
    if let Some(v) = body.limitations_down {
        st.switches.limitations_down.store(v, Ordering::Relaxed);
    }
    Json(serde_json::json!({"code": 0, "msg": ""}))
}
