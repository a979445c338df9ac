//! Pulls quota rules from the upstream limitations API (`GET /v1/commerce/benefit/limitations`,
//! every `device` entity type × Coze benefit type, `status=valid`, pages of 200) every
//! `quota.sync.interval`, and the plan's `api_run_qps` (`benefits/get`) for chat and
//! workflow when `plan_qps` is on.
//!
//! A sync is all or nothing: the new upstream rules replace the previous ones atomically
//! (validated together with the local rules, persisted, swapped). On any failure the
//! last-known rules keep holding (also across restarts: they are in the store), the error is
//! counted (`fleetgate_quota_sync_runs_total{result="error"}`) and shown on `/readyz`.

use policy::quota::{BenefitType, Rule};
use policy::route::RouteClass;
use serde_json::Value;

use crate::config::QuotaSync;
use crate::state::{SharedState, now_s};

const ENTITY_TYPES: [&str; 2] = ["single_device", "enterprise_all_devices"];
/// Most pages fetched per (entity type, benefit type) in one sync.
const MAX_PAGES: usize = 10_000;

pub struct RuleSync {
    state: SharedState,
    cfg: QuotaSync,
    base: String,
    http: reqwest::Client,
}

/// `scheme://authority` of the upstream REST API and an HTTP client for it (the relay's TLS
/// roots, the configured connect and read timeouts).
fn upstream_client(
    state: &crate::state::GatewayState,
) -> Result<(String, reqwest::Client), String> {
    let up = &state.config.upstream;
    let base = format!(
        "{}://{}",
        if up.rest.tls { "https" } else { "http" },
        up.rest.authority()
    );
    let http = reqwest::Client::builder()
        .use_preconfigured_tls((*crate::ws::tls_client_config()).clone())
        .connect_timeout(up.connect_timeout)
        .timeout(up.connect_timeout + up.read_timeout)
        .build()
        .map_err(|e| format!("upstream quota API client: {e}"))?;
    Ok((base, http))
}

impl RuleSync {
    pub fn new(state: SharedState, cfg: QuotaSync) -> Result<RuleSync, String> {
        let (base, http) = upstream_client(&state)?;
        Ok(RuleSync {
            state,
            cfg,
            base,
            http,
        })
    }

    async fn get(&self, path_and_query: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(self.cfg.token.expose())
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = r.status().as_u16();
        let v: Value = r
            .json()
            .await
            .map_err(|_| format!("HTTP {status}: not JSON"))?;
        if status != 200 || v.get("code").and_then(Value::as_i64) != Some(0) {
            let code = v.get("code").and_then(Value::as_i64).unwrap_or(-1);
            return Err(format!("HTTP {status}, code {code}"));
        }
        Ok(v)
    }

    /// One rule from a list item; items without `benefit_id` get a stable synthetic one.
    fn rule(mut item: Value) -> Option<Rule> {
        if item.get("benefit_id").is_none_or(Value::is_null) {
            let key = |k: &str| {
                item.get(k)
                    .map(|v| v.to_string().trim_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let id = format!(
                "upstream-{}-{}-{}-{}",
                key("entity_type"),
                key("entity_id"),
                key("benefit_type"),
                key("trigger_unit")
            );
            item["benefit_id"] = Value::String(id);
        }
        serde_json::from_value(item).ok()
    }

    async fn fetch_rules(&self) -> Result<Vec<Rule>, String> {
        let mut rules = Vec::new();
        let mut skipped = 0usize;
        for et in ENTITY_TYPES {
            // Coze's own benefit types (the gateway's meters exist only here).
            for bt in BenefitType::ALL.into_iter().filter(|b| b.is_coze()) {
                let bt = bt.as_str();
                let mut token = String::new();
                for _ in 0..MAX_PAGES {
                    let v = self
                        .get(&format!(
                            "/v1/commerce/benefit/limitations?entity_type={et}&benefit_type={bt}&status=valid&page_size=200&page_token={token}"
                        ))
                        .await?;
                    let data = &v["data"];
                    for item in data["benefit_infos"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                    {
                        match Self::rule(item) {
                            Some(r) => rules.push(r),
                            None => skipped += 1,
                        }
                    }
                    let more = data["has_more"].as_bool().unwrap_or(false);
                    token = data["page_token"].as_str().unwrap_or_default().to_owned();
                    if !more || token.is_empty() {
                        break;
                    }
                }
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "Ignored upstream quota rules the gateway cannot read."
            );
        }
        Ok(rules)
    }

    async fn fetch_plan_qps(&self) {
        for (resource, class) in [
            ("chat", RouteClass::Chat),
            ("workflow", RouteClass::Workflow),
        ] {
            let path = format!(
                "/v1/commerce/benefit/benefits/get?benefit_type_list=api_run_qps&resource_id={resource}"
            );
            match self.get(&path).await {
                Ok(v) => {
                    let total = v["data"]["benefit_info"]
                        .as_array()
                        .and_then(|a| {
                            a.iter().find(|b| {
                                b["resource_id"] == resource || b["resource_id"].is_null()
                            })
                        })
                        .and_then(|b| b["effective"]["item_info"]["total"].as_u64());
                    if let Some(qps) = total.and_then(|t| u32::try_from(t).ok()) {
                        self.state.rate_limits().set_plan_qps(class, qps);
                    }
                }
                Err(e) => {
                    tracing::warn!(resource, error = %e, "Plan QPS not readable; keeping the current cap.")
                }
            }
        }
    }

    /// One sync round; records the outcome.
    pub async fn run_once(&self) {
        let result = match self.fetch_rules().await {
            Ok(rules) => self.state.quotas.apply_synced(&self.state.store, rules),
            Err(e) => Err(e),
        };
        self.record(result);
        if self.cfg.plan_qps {
            self.fetch_plan_qps().await;
        }
    }

    fn record(&self, result: Result<usize, String>) {
        let m = &self.state.metrics;
        let mut status = self
            .state
            .quotas
            .sync_status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(n) => {
                m.quota_sync_runs.with_label_values(&["ok"]).inc();
                m.quota_sync_last_success.set(now_s() as i64);
                m.quota_rules.with_label_values(&["upstream"]).set(n as i64);
                status.last_success = Some(now_s());
                status.last_error = None;
                status.rules = n;
            }
            Err(e) => {
                m.quota_sync_runs.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "Quota rule sync failed; the last-known rules keep holding.");
                status.last_error = Some(e);
            }
        }
    }
}

/// With sync on, a rule written through the gateway's admin API goes to the upstream (the
/// single source of truth) unchanged, the upstream's answer is returned as is, and the
/// gateway re-syncs at once.
pub async fn forward(
    state: &crate::state::GatewayState,
    cfg: &QuotaSync,
    method: &http::Method,
    path_and_query: &str,
    body: bytes::Bytes,
) -> Result<(u16, Value), String> {
    let (base, http) = upstream_client(state)?;
    let url = format!("{base}{path_and_query}");
    let method =
        reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| e.to_string())?;
    let r = http
        .request(method, url)
        .bearer_auth(cfg.token.expose())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = r.status().as_u16();
    let v: Value = r
        .json()
        .await
        .map_err(|_| format!("upstream answered HTTP {status} without JSON"))?;
    state.quotas.sync_now.notify_one();
    Ok((status, v))
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for RuleSync {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            self.run_once().await;
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.interval) => {}
                _ = self.state.quotas.sync_now.notified() => {}
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}
