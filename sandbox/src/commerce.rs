//! Commerce: end-user usage limits and plan benefits (coze-api.md §10).
//!
//! | endpoint | answer |
//! |---|---|
//! | `POST /v1/commerce/benefit/limitations` `{entity_type, entity_id?, benefit_info}` | `data: {benefit_info}` |
//! | `GET /v1/commerce/benefit/limitations?entity_type=&entity_id=&benefit_type=&status=&page_token=&page_size=` | `data: {has_more, page_token, benefit_infos}` |
//! | `PUT /v1/commerce/benefit/limitations/{benefit_id}` `{limit?, status?, started_at?, ended_at?, trigger_unit?, trigger_time?, active_mode?}` | `data: {benefit_info}` |
//! | `GET /v1/commerce/benefit/benefits/get?benefit_type_list=api_run_qps&resource_id=chat` | `data: {basic_info, benefit_info}` |
//!
//! Validation: `entity_type` ∈ `single_device`, `enterprise_all_devices`,
//! `single_custom_consumer`, `enterprise_all_custom_consumers` (coze-java's `single_identifier` /
//! `enterprise_all_identifiers` are accepted as aliases and stored under the documented name);
//! `entity_id` required for `single_*`; `benefit_type` ∈ `resource_point`,
//! `voice_unified_duration_system`, `voice_unified_duration_custom`; `limit ≥ 0`;
//! `active_mode` = `absolute_time`; `trigger_unit` ∈ `never` (cumulative, default), `minute`,
//! `hour`, `day`; `status` ∈ `valid` (default), `frozen`, `cancel`. For an `enterprise_all_*`
//! scope at most one cumulative and one periodic non-cancelled rule may exist per benefit type
//! (4000 otherwise). Listing filters are optional (`status` defaults to `valid`); `page_token`
//! is an opaque offset; `page_size` is 1–200 (default 20). `benefit_id` is a string.
//!
//! While [`crate::Switches::limitations_down`] is set, the limitation endpoints answer HTTP 503
//! with code 5000. The QPS in `benefits/get` is [`crate::SandboxConfig::plan_qps`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::conversations::{json_body, prelude, str_field};
use crate::envelope::{self, ApiError, ApiResult};
use crate::state::{SandboxState, lock};

/// "Forever" as Coze spells it (9999-12-31T23:59:59Z).
pub const FOREVER: i64 = 253_402_300_799;

/// A limitation rule.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rule {
    pub benefit_id: String,
    pub entity_type: String,
    pub entity_id: String,
    pub benefit_type: String,
    pub limit: i64,
    pub active_mode: String,
    pub started_at: i64,
    pub ended_at: i64,
    pub status: String,
    pub trigger_unit: String,
    pub trigger_time: i64,
}

/// In-memory state of this module.
#[derive(Debug, Default)]
pub struct Store {
    /// Rules in creation order.
    pub rules: Vec<Rule>,
}

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/v1/commerce/benefit/limitations", post(create).get(list))
        .route("/v1/commerce/benefit/limitations/{benefit_id}", put(update))
        .route("/v1/commerce/benefit/benefits/get", get(benefits))
}

const ENTITY_TYPES: [&str; 4] = [
    "single_device",
    "enterprise_all_devices",
    "single_custom_consumer",
    "enterprise_all_custom_consumers",
];
const BENEFIT_TYPES: [&str; 3] = [
    "resource_point",
    "voice_unified_duration_system",
    "voice_unified_duration_custom",
];
const TRIGGER_UNITS: [&str; 4] = ["never", "minute", "hour", "day"];
const STATUSES: [&str; 3] = ["valid", "frozen", "cancel"];

/// The documented spelling of an entity type (Java aliases mapped).
pub fn canonical_entity_type(t: &str) -> Option<&'static str> {
    match t {
        "single_identifier" => Some("single_custom_consumer"),
        "enterprise_all_identifiers" => Some("enterprise_all_custom_consumers"),
        _ => ENTITY_TYPES.iter().find(|e| **e == t).copied(),
    }
}

fn one_of(v: &str, allowed: &[&str], field: &str) -> Result<String, ApiError> {
    if allowed.contains(&v) {
        Ok(v.to_owned())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid {field} {v:?}; expected one of {}",
            allowed.join(", ")
        )))
    }
}

fn down(st: &SandboxState) -> Result<(), ApiError> {
    if st.switches.limitations_down.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            5000,
            "limitations API unavailable (sandbox switch)",
        ));
    }
    Ok(())
}

fn int(v: &Value, k: &str) -> Result<Option<i64>, ApiError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{k} must be an integer"))),
    }
}

/// Applies optional mutable fields of `bi` onto `r`, validating each.
fn apply(r: &mut Rule, bi: &Value) -> Result<(), ApiError> {
    if let Some(m) = str_field(bi, "active_mode") {
        r.active_mode = one_of(m, &["absolute_time"], "active_mode")?;
    }
    if let Some(l) = int(bi, "limit")? {
        if l < 0 {
            return Err(ApiError::bad_request("limit must be >= 0"));
        }
        r.limit = l;
    }
    if let Some(s) = int(bi, "started_at")? {
        r.started_at = s;
    }
    if let Some(e) = int(bi, "ended_at")? {
        r.ended_at = e;
    }
    if r.ended_at <= r.started_at {
        return Err(ApiError::bad_request("ended_at must be after started_at"));
    }
    if let Some(s) = str_field(bi, "status") {
        r.status = one_of(s, &STATUSES, "status")?;
    }
    if let Some(u) = str_field(bi, "trigger_unit") {
        r.trigger_unit = one_of(u, &TRIGGER_UNITS, "trigger_unit")?;
    }
    if let Some(t) = int(bi, "trigger_time")? {
        if t < 1 {
            return Err(ApiError::bad_request("trigger_time must be >= 1"));
        }
        r.trigger_time = t;
    }
    Ok(())
}

/// At most one cumulative and one periodic live rule per enterprise-wide scope and type.
fn check_scope(rules: &[Rule], r: &Rule) -> Result<(), ApiError> {
    if !r.entity_type.starts_with("enterprise_all_") || r.status == "cancel" {
        return Ok(());
    }
    let cumulative = r.trigger_unit == "never";
    let clash = rules.iter().any(|o| {
        o.benefit_id != r.benefit_id
            && o.entity_type == r.entity_type
            && o.benefit_type == r.benefit_type
            && o.status != "cancel"
            && (o.trigger_unit == "never") == cumulative
    });
    if clash {
        return Err(ApiError::bad_request(format!(
            "{} already has a {} rule for {}; at most one cumulative and one periodic rule are allowed",
            r.entity_type,
            if cumulative { "cumulative" } else { "periodic" },
            r.benefit_type
        )));
    }
    Ok(())
}

fn rule_data(r: &Rule) -> Value {
    json!({"benefit_info": r})
}

async fn create(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    down(&st)?;
    let b = json_body(&body)?;
    let et = str_field(&b, "entity_type")
        .ok_or_else(|| ApiError::bad_request("entity_type is required"))?;
    let entity_type = canonical_entity_type(et).ok_or_else(|| {
        ApiError::bad_request(format!(
            "invalid entity_type {et:?}; expected one of {}",
            ENTITY_TYPES.join(", ")
        ))
    })?;
    let entity_id = if entity_type.starts_with("single_") {
        str_field(&b, "entity_id")
            .ok_or_else(|| {
                ApiError::bad_request(format!("entity_id is required for {entity_type}"))
            })?
            .to_owned()
    } else {
        String::new()
    };
    let bi = b
        .get("benefit_info")
        .filter(|v| v.is_object())
        .ok_or_else(|| ApiError::bad_request("benefit_info is required"))?;
    let bt = str_field(bi, "benefit_type")
        .ok_or_else(|| ApiError::bad_request("benefit_info.benefit_type is required"))?;
    let benefit_type = one_of(bt, &BENEFIT_TYPES, "benefit_type")?;
    if int(bi, "limit")?.is_none() {
        return Err(ApiError::bad_request("benefit_info.limit is required"));
    }
    let mut r = Rule {
        benefit_id: st.next_id(),
        entity_type: entity_type.to_owned(),
        entity_id,
        benefit_type,
        limit: 0,
        active_mode: "absolute_time".into(),
        started_at: 0,
        ended_at: FOREVER,
        status: "valid".into(),
        trigger_unit: "never".into(),
        trigger_time: 1,
    };
    apply(&mut r, bi)?;
    let mut store = lock(&st.commerce);
    check_scope(&store.rules, &r)?;
    store.rules.push(r.clone());
    Ok(envelope::ok(rule_data(&r)))
}

#[derive(Deserialize)]
struct ListQuery {
    entity_type: Option<String>,
    entity_id: Option<String>,
    benefit_type: Option<String>,
    status: Option<String>,
    page_token: Option<String>,
    page_size: Option<String>,
}

async fn list(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(lq): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    down(&st)?;
    let nonempty = |o: &Option<String>| o.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
    let entity_type = match nonempty(&lq.entity_type) {
        Some(t) => Some(
            canonical_entity_type(&t)
                .ok_or_else(|| ApiError::bad_request(format!("invalid entity_type {t:?}")))?,
        ),
        None => None,
    };
    let status = nonempty(&lq.status).unwrap_or_else(|| "valid".into());
    one_of(&status, &STATUSES, "status")?;
    let page_size = match nonempty(&lq.page_size) {
        None => 20,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| ApiError::bad_request("page_size must be within 1-200"))?,
    };
    let offset = match nonempty(&lq.page_token) {
        None => 0,
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("invalid page_token"))?,
    };
    let (entity_id, benefit_type) = (nonempty(&lq.entity_id), nonempty(&lq.benefit_type));
    let store = lock(&st.commerce);
    let matching: Vec<&Rule> = store
        .rules
        .iter()
        .filter(|r| entity_type.is_none_or(|t| r.entity_type == t))
        .filter(|r| entity_id.as_deref().is_none_or(|e| r.entity_id == e))
        .filter(|r| benefit_type.as_deref().is_none_or(|b| r.benefit_type == b))
        .filter(|r| r.status == status)
        .collect();
    let page: Vec<&Rule> = matching
        .iter()
        .skip(offset)
        .take(page_size)
        .copied()
        .collect();
    let next = offset + page.len();
    let has_more = next < matching.len();
    Ok(envelope::ok(json!({
        "has_more": has_more,
        "page_token": if has_more { next.to_string() } else { String::new() },
        "benefit_infos": page,
    })))
}

async fn update(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Path(benefit_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    down(&st)?;
    let b = json_body(&body)?;
    // Accept the fields flat (documented) or under `benefit_info`.
    let fields = b
        .get("benefit_info")
        .filter(|v| v.is_object())
        .unwrap_or(&b);
    let mut store = lock(&st.commerce);
    let idx = store
        .rules
        .iter()
        .position(|r| r.benefit_id == benefit_id)
        .ok_or_else(|| ApiError::not_found(format!("benefit {benefit_id} not found")))?;
    let mut r = store.rules[idx].clone();
    apply(&mut r, fields)?;
    check_scope(&store.rules, &r)?;
    store.rules[idx] = r.clone();
    Ok(envelope::ok(rule_data(&r)))
}

#[derive(Deserialize)]
struct BenefitQuery {
    benefit_type_list: Option<String>,
    resource_id: Option<String>,
}

async fn benefits(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(bq): Query<BenefitQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let resource = bq.resource_id.unwrap_or_default();
    let mut infos = Vec::new();
    for t in bq
        .benefit_type_list
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
    {
        let item = match t {
            "" => continue,
            "api_run_qps" => json!({"used": 0, "total": st.config.plan_qps, "start_at": 0,
                                    "end_at": 0, "strategy": "by_quota"}),
            "call_tool_limit" => json!({"used": 0, "total": 0, "start_at": 0, "end_at": 0,
                                        "strategy": "unlimit"}),
            other => {
                return Err(ApiError::bad_request(format!(
                    "invalid benefit_type {other:?}"
                )));
            }
        };
        let counter = json!({"status": "valid", "item_info": item});
        infos.push(json!({
            "benefit_type": t,
            "resource_id": resource,
            "basic": counter,
            "extra": [],
            "effective": counter,
        }));
    }
    Ok(envelope::ok(json!({
        "basic_info": {"user_level": "enterprise"},
        "benefit_info": infos,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, et: &str, unit: &str) -> Rule {
        Rule {
            benefit_id: id.into(),
            entity_type: et.into(),
            entity_id: String::new(),
            benefit_type: "resource_point".into(),
            limit: 1,
            active_mode: "absolute_time".into(),
            started_at: 0,
            ended_at: FOREVER,
            status: "valid".into(),
            trigger_unit: unit.into(),
            trigger_time: 1,
        }
    }

    #[test]
    fn aliases_map_to_documented_names() {
        assert_eq!(
            canonical_entity_type("single_identifier"),
            Some("single_custom_consumer")
        );
        assert_eq!(
            canonical_entity_type("enterprise_all_identifiers"),
            Some("enterprise_all_custom_consumers")
        );
        assert_eq!(canonical_entity_type("bogus"), None);
    }

    #[test]
    fn one_cumulative_and_one_periodic_per_enterprise_scope() {
        let rules = vec![rule("1", "enterprise_all_devices", "never")];
        assert!(check_scope(&rules, &rule("2", "enterprise_all_devices", "never")).is_err());
        assert!(check_scope(&rules, &rule("2", "enterprise_all_devices", "day")).is_ok());
        assert!(check_scope(&rules, &rule("2", "single_device", "never")).is_ok());
        // Updating the rule itself is not a clash.
        assert!(check_scope(&rules, &rule("1", "enterprise_all_devices", "never")).is_ok());
    }
}
