//! Shared state handed to every service: configuration, device registry, keys, metrics and
//! lifecycle flags. Per-request state lives in `proxy::ctx::RequestCtx` instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::devices::DeviceRegistry;
use crate::metrics::Metrics;

/// Where the gateway is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Serving,
    /// SIGTERM received: readiness fails, new upgrades are refused, streams are closing.
    Draining,
}

pub struct GatewayState {
    pub config: GatewayConfig,
    /// The token signing keys and the memo of tokens they verified, swapped as a whole on
    /// reload (SIGHUP) for key rotation.
    verifier: std::sync::RwLock<Arc<crate::verifier::TokenVerifier>>,
    pub devices: DeviceRegistry,
    /// Durable copy of the registry, written by the admin API before the in-memory change.
    pub store: crate::store::Store,
    /// Cluster mode: the shared Redis (devices, rules, usage and `jti`s live there instead).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Rate limiters and the `jti` replay cache of the device token endpoint.
    pub oauth: crate::oauth::TokenEndpoint,
    /// Per-device and fleet request rate limits (replaced on reload).
    rate_limits: std::sync::RwLock<Arc<crate::ratelimit::RateLimits>>,
    /// The path allow-list (replaced on reload).
    routes: std::sync::RwLock<Arc<policy::route::RouteTable>>,
    /// Access policies by device label (`[access]`, replaced on reload).
    access: std::sync::RwLock<Arc<policy::access::AccessPolicies>>,
    /// Quota rules, the usage ledger and their persistence.
    pub quotas: crate::quota::Quotas,
    /// What goes into `Authorization` upstream, per device (PAT or per-device OAuth token).
    pub upstream_auth: crate::upstream_auth::UpstreamCredentials,
    pub metrics: Metrics,
    /// TLS for devices (`[device_listener.tls]`): the acceptor, replaced on reload.
    pub device_tls: Option<Arc<crate::device_tls::LiveTls>>,
    ready: AtomicBool,
    phase: watch::Sender<Phase>,
}

pub type SharedState = Arc<GatewayState>;

impl GatewayState {
    pub fn new(
        config: GatewayConfig,
        metrics: Metrics,
        store: crate::store::Store,
    ) -> Result<GatewayState, String> {
        let upstream_auth = crate::upstream_auth::UpstreamCredentials::new(
            &config.upstream,
            crate::ws::tls_client_config(),
            metrics.clone(),
        )?;
        let devices = DeviceRegistry::default();
        let quotas = crate::quota::Quotas::load(
            &store,
            &config.quota,
            metrics.quota_rules.with_label_values(&["local"]),
            devices.session_checks(),
        )?;
        let device_tls = config.device_tls.as_ref().map(|t| {
            Arc::new(crate::device_tls::LiveTls::new(
                t,
                metrics.device_tls_handshakes.clone(),
            ))
        });
        Ok(GatewayState {
            device_tls,
            rate_limits: std::sync::RwLock::new(Arc::new(crate::ratelimit::RateLimits::new(
                &config.rate_limits,
            ))),
            routes: std::sync::RwLock::new(Arc::new(config.routes.clone())),
            access: std::sync::RwLock::new(Arc::new(config.access.clone())),
            quotas,
            upstream_auth,
            verifier: std::sync::RwLock::new(Arc::new(crate::verifier::TokenVerifier::new(
                config.tokens.keyring.clone(),
                config.tokens.verify_cache_entries,
            ))),
            oauth: crate::oauth::TokenEndpoint::new(config.tokens.replay_cache_entries),
            config,
            devices,
            store,
            cluster: None,
            metrics,
            ready: AtomicBool::new(false),
            phase: watch::channel(Phase::Starting).0,
        })
    }

    pub fn rate_limits(&self) -> Arc<crate::ratelimit::RateLimits> {
        crate::locks::snapshot(&self.rate_limits)
    }

    pub fn set_rate_limits(&self, r: crate::ratelimit::RateLimits) {
        crate::locks::replace(&self.rate_limits, Arc::new(r));
    }

    pub fn routes(&self) -> Arc<policy::route::RouteTable> {
        crate::locks::snapshot(&self.routes)
    }

    pub fn set_routes(&self, r: policy::route::RouteTable) {
        crate::locks::replace(&self.routes, Arc::new(r));
    }

    pub fn access(&self) -> Arc<policy::access::AccessPolicies> {
        crate::locks::snapshot(&self.access)
    }

    pub fn set_access(&self, a: policy::access::AccessPolicies) {
        crate::locks::replace(&self.access, Arc::new(a));
    }

    /// The current signing keys and their verification memo (cheap: an `Arc` clone under a
    /// read lock).
    pub fn verifier(&self) -> Arc<crate::verifier::TokenVerifier> {
        crate::locks::snapshot(&self.verifier)
    }

    /// Installs new signing keys (reload), with an empty verification memo.
    pub fn set_verifier(&self, v: crate::verifier::TokenVerifier) {
        crate::locks::replace(&self.verifier, Arc::new(v));
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// A receiver that sees phase changes (WebSocket relays watch it to close on drain).
    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
        self.ready.store(p == Phase::Serving, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Wall clock in unix milliseconds (the gateway's only clock read for tokens and log ids).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Wall clock in unix seconds.
pub fn now_s() -> u64 {
    now_ms() / 1000
}
