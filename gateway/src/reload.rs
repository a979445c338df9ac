//! Live reload (SIGHUP or `POST /admin/v1/reload`): re-reads the config file, applies what can
//! change without a restart — token signing keys, the route allow-list and body limits, rate
//! limits, the device listener's TLS files and client-certificate settings — and reports every
//! other changed setting as needing a restart. A file with errors changes nothing.

use serde::Serialize;

use crate::config::{self, ConfigErrors, GatewayConfig};
use crate::state::GatewayState;

/// What a reload did.
#[derive(Debug, Default, Serialize)]
pub struct ReloadReport {
    /// The file re-read; `None` when the configuration was built in code (`fleetgate
    /// sandbox`): nothing to reload.
    pub source: Option<String>,
    /// Settings applied live.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the file but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Settings that differ between the running and the new configuration and need a restart.
fn restart_only_changes(old: &GatewayConfig, new: &GatewayConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            out.push(key);
        }
    };
    check(old.threads != new.threads, "server.threads");
    check(
        old.grace_period != new.grace_period || old.drain_delay != new.drain_delay,
        "server.grace_period/drain_delay",
    );
    check(old.device_addr != new.device_addr, "device_listener.addr");
    check(
        old.device_tls.is_some() != new.device_tls.is_some(),
        "device_listener.tls (turning TLS on or off)",
    );
    check(old.admin_addr != new.admin_addr, "admin_listener.addr");
    check(
        old.admin_token != new.admin_token,
        "admin_listener.token_env",
    );
    check(
        old.upstream.rest != new.upstream.rest || old.upstream.ws != new.upstream.ws,
        "upstream.base_url/ws_base_url",
    );
    check(
        format!("{:?}", old.upstream.auth) != format!("{:?}", new.upstream.auth),
        "upstream.auth",
    );
    check(
        (
            old.upstream.connect_timeout,
            old.upstream.read_timeout,
            old.upstream.stream_idle_timeout,
            old.upstream.total_timeout,
        ) != (
            new.upstream.connect_timeout,
            new.upstream.read_timeout,
            new.upstream.stream_idle_timeout,
            new.upstream.total_timeout,
        ),
        "upstream timeouts",
    );
    check(
        format!("{:?}", old.ws) != format!("{:?}", new.ws),
        "websocket",
    );
    check(old.store_path != new.store_path, "store.path");
    check(
        format!("{:?}", old.quota) != format!("{:?}", new.quota),
        "quota",
    );
    check(format!("{:?}", old.log) != format!("{:?}", new.log), "log");
    out
}

/// Re-reads `state.config.source` and applies it.
pub fn reload(state: &GatewayState) -> Result<ReloadReport, ConfigErrors> {
    let Some(path) = state.config.source.clone() else {
        return Ok(ReloadReport::default());
    };
    let new = config::load_file(&path, &config::process_env)?;
    state.set_verifier(crate::verifier::TokenVerifier::new(
        new.tokens.keyring.clone(),
        new.tokens.verify_cache_entries,
    ));
    state.set_routes(new.routes.clone());
    state.set_rate_limits(crate::ratelimit::RateLimits::new(&new.rate_limits));
    state.metrics.reloads.inc();
    let mut applied = vec![
        "tokens.signing_keys",
        "tokens.verify_cache_entries",
        "routes",
        "rate_limits",
    ];
    // Validation loaded the files; turning TLS on or off needs a restart (below).
    if let (Some(live), Some(settings)) = (&state.device_tls, &new.device_tls) {
        live.replace(settings);
        applied.push("device_listener.tls");
    }
    let report = ReloadReport {
        source: Some(path.display().to_string()),
        applied,
        needs_restart: restart_only_changes(&state.config, &new),
    };
    tracing::info!(
        path = %path.display(),
        applied = ?report.applied,
        needs_restart = ?report.needs_restart,
        "Configuration reloaded."
    );
    Ok(report)
}
