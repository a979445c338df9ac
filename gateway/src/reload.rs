//! Live reload (SIGHUP or `POST /admin/v1/reload`): re-reads the config file, applies what can
//! change without a restart — token signing keys, the route allow-list and body limits, access
//! policies, rate limits, the device listener's TLS files and client-certificate settings — and reports every
//! other changed setting as needing a restart (secrets compared by value, though their `Debug`
//! hides them). A file with errors changes nothing.

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
        !same_upstream_auth(&old.upstream.auth, &new.upstream.auth),
        "upstream.auth (mode, PAT, or [upstream.jwt])",
    );
    let t = (&old.tokens, &new.tokens);
    check(
        (t.0.default_ttl, t.0.max_ttl) != (t.1.default_ttl, t.1.max_ttl),
        "tokens.default_ttl/max_ttl",
    );
    check(
        (&t.0.audiences, t.0.audience_from_host) != (&t.1.audiences, t.1.audience_from_host),
        "tokens.audiences/audience_from_host",
    );
    check(
        (t.0.max_assertion_lifetime, t.0.max_assertion_skew)
            != (t.1.max_assertion_lifetime, t.1.max_assertion_skew),
        "tokens.max_assertion_lifetime/max_assertion_skew",
    );
    check(
        t.0.replay_cache_entries != t.1.replay_cache_entries,
        "tokens.replay_cache_entries",
    );
    check(old.redis.is_some() != new.redis.is_some(), "store.kind");
    check(
        matches!((&old.redis, &new.redis), (Some(a), Some(b)) if !same_redis(a, b)),
        "store.redis",
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

/// Whether two upstream credential settings are the same, secrets included (their `Debug`
/// hides the secrets, so it cannot tell a changed PAT or app key).
fn same_upstream_auth(a: &config::UpstreamAuth, b: &config::UpstreamAuth) -> bool {
    use config::UpstreamAuth::{Jwt, Pat};
    match (a, b) {
        (Pat(a), Pat(b)) => a.expose() == b.expose(),
        (Jwt(a), Jwt(b)) => {
            format!("{a:?}") == format!("{b:?}")
                && a.private_key_der == b.private_key_der
                && (
                    a.refresh_before,
                    &a.scope,
                    a.max_concurrent_exchanges,
                    a.max_cached_devices,
                ) == (
                    b.refresh_before,
                    &b.scope,
                    b.max_concurrent_exchanges,
                    b.max_cached_devices,
                )
        }
        _ => false,
    }
}

/// Whether two Redis settings are the same, passwords included (their `Debug` hides them).
fn same_redis(a: &config::RedisSettings, b: &config::RedisSettings) -> bool {
    let password = |c: &redis::ConnectionInfo| c.redis_settings().password().map(str::to_owned);
    let passwords = |s: &config::RedisSettings| {
        let mut p = vec![password(&s.connection)];
        p.extend(s.cluster.iter().flatten().map(password));
        p.extend(s.sentinel.iter().flat_map(|m| m.addrs.iter()).map(password));
        p
    };
    format!("{a:?}") == format!("{b:?}") && passwords(a) == passwords(b)
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
    state.set_access(new.access.clone());
    state.set_rate_limits(state.rate_limits().reconfigured(&new.rate_limits));
    state.metrics.reloads.inc();
    let mut applied = vec![
        "tokens.signing_keys",
        "tokens.verify_cache_entries",
        "routes",
        "access",
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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [tokens]
        signing_keys = [{ kid = "k1", secret_env = "KEY" }]
    "#;

    fn load(extra: &str, pat: &'static str, redis_pw: &'static str) -> GatewayConfig {
        let env = move |k: &str| match k {
            "FLEETGATE_ADMIN_TOKEN" => Some("admin-token-0123456789".to_owned()),
            "COZE_API_TOKEN" => Some(pat.to_owned()),
            "REDIS_PW" => Some(redis_pw.to_owned()),
            "KEY" => Some("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=".to_owned()),
            _ => None,
        };
        config::load_str(&format!("{BASE}\n{extra}"), &env).unwrap()
    }

    /// Secrets are compared by value: a changed PAT or Redis password is reported even though
    /// both configurations print the same (redacted) `Debug`.
    #[test]
    fn changed_secrets_are_reported_as_needing_a_restart() {
        let redis = "[store]\nkind = \"redis\"\n[store.redis]\nurl = \"redis://127.0.0.1:6379\"\npassword_env = \"REDIS_PW\"";
        let a = load(redis, "pat_a", "pw1");
        assert_eq!(
            restart_only_changes(&a, &load(redis, "pat_a", "pw1")),
            Vec::<&str>::new()
        );
        let b = load(redis, "pat_b", "pw1");
        assert_eq!(
            format!("{:?}", a.upstream.auth),
            format!("{:?}", b.upstream.auth)
        );
        assert_eq!(
            restart_only_changes(&a, &b),
            ["upstream.auth (mode, PAT, or [upstream.jwt])"]
        );
        assert_eq!(
            restart_only_changes(&a, &load(redis, "pat_a", "pw2")),
            ["store.redis"]
        );
        assert_eq!(
            restart_only_changes(&load("", "pat_a", "pw1"), &a),
            ["store.kind"]
        );
    }
}
