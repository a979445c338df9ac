//! Quota HTTP surfaces: the device's own `GET /v1/gateway/quota` (device listener) and the
//! admin API at Coze's paths (`/v1/commerce/benefit/limitations…`, admin listener). Answers
//! use Coze's envelope `{"code","msg","data","detail":{"logid"}}`.

use http::StatusCode;
use pingora::prelude::*;
use policy::quota::{
    BenefitType, CreateLimitation, EntityType, Rule, RuleStatus, UpdateLimitation, UsageItem,
};
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::admin::{AdminError, AdminRequest, AdminResult};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::{admit, respond};
use crate::quota::RuleChangeError;
use crate::state::{GatewayState, now_s};

fn items_json(items: &[UsageItem]) -> Value {
    json!({ "items": items })
}

/// `GET /v1/gateway/quota` on the device listener: the calling device's rules, used,
/// remaining and reset times.
pub async fn device_quota(
    state: &GatewayState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    token: Option<&str>,
    cert: Option<&crate::device_tls::CertDevice>,
) -> Result<bool> {
    ctx.local_route = Some("quota");
    let device = match token
        .ok_or(policy::decision::Denial::new(
            policy::decision::DenyReason::MissingToken,
            "missing access token",
        ))
        .and_then(|t| admit::verify_token(state, t, now_s(), cert))
    {
        Ok((d, _)) => d,
        Err(denial) => {
            ctx.denied = Some(denial.reason);
            respond::deny(session, &denial, &ctx.logid).await?;
            return Ok(true);
        }
    };
    let items = state.quotas.usage_shared(&device, now_s()).await;
    let body =
        json!({"code": 0, "msg": "", "data": items_json(&items), "detail": {"logid": ctx.logid}});
    respond::json(session, 200, &body, &ctx.logid, None).await?;
    Ok(true)
}

fn envelope(data: Value) -> Value {
    json!({"code": 0, "msg": "", "data": data})
}

fn change_error(state: &GatewayState, e: RuleChangeError) -> AdminError {
    match e {
        RuleChangeError::Invalid(errors) => AdminError::bad_request(errors.to_string()),
        RuleChangeError::NotFound(id) => AdminError::not_found(format!("benefit {id} not found")),
        e @ RuleChangeError::Default(_) => AdminError::bad_request(e.to_string()),
        RuleChangeError::Cluster(e) => {
            if let Some(c) = &state.cluster {
                c.count_error("admin");
            }
            AdminError::write_failed("rule", "redis", &e)
        }
        RuleChangeError::Store(e) => {
            state
                .metrics
                .store_errors
                .with_label_values(&["rules"])
                .inc();
            AdminError::write_failed("rule", "embedded", &e)
        }
    }
}

const MAX_PAGE: usize = 200;

/// Routes under `/v1/commerce/benefit/limitations` on the admin listener.
/// Installs a rule: in the embedded store, or (cluster mode) in Redis, which tells every node.
async fn commit(state: &GatewayState, rule: Rule) -> Result<Rule, RuleChangeError> {
    let Some(cluster) = &state.cluster else {
        return state.quotas.install(&state.store, rule);
    };
    state.quotas.validate_with(&rule)?;
    cluster.put_rule(&rule).await?;
    // Visible here at once; the change feed brings it to the other nodes (and here again).
    state.quotas.apply_rule(&rule)?;
    Ok(rule)
}

/// With rule sync on, whether a rule write belongs to the upstream (forwarded there, then
/// synced back) rather than to the gateway: creating a rule of one of Coze's benefit types, or
/// updating a rule that came from the upstream. Rules of the gateway's own meters (Coze does
/// not know them) and rules created here are written here.
pub fn write_goes_upstream(state: &GatewayState, req: &AdminRequest) -> bool {
    let Some(rest) = req.path.strip_prefix("/v1/commerce/benefit/limitations") else {
        return false;
    };
    match (&req.method, rest) {
        (&http::Method::POST, "") => {
            let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let benefit = BenefitType::deserialize(&v["benefit_info"]["benefit_type"]);
            !benefit.is_ok_and(|b| !b.is_coze())
        }
        (&http::Method::PUT, id) => {
            let id = id.trim_start_matches('/');
            !state.quotas.is_local_rule(id)
        }
        _ => false,
    }
}

pub async fn route(state: &GatewayState, req: &AdminRequest) -> Option<AdminResult> {
    let rest = req.path.strip_prefix("/v1/commerce/benefit/limitations")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None; // `/v1/commerce/benefit/limitationsXYZ`: not ours (404)
    }
    if rest.matches('/').count() > 1 {
        return Some(Err(AdminError::not_found("no such admin route")));
    }
    Some(match (req.method.as_str(), rest) {
        ("POST", "") => {
            let body: CreateLimitation = match req.json() {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            let rule = match state.quotas.new_rule(body) {
                Ok(r) => r,
                Err(e) => return Some(Err(change_error(state, e))),
            };
            commit(state, rule)
                .await
                .map(|rule| (StatusCode::OK, envelope(json!({ "benefit_info": rule }))))
                .map_err(|e| change_error(state, e))
        }
        ("GET", "") => list(state, req),
        ("GET", "/usage") => usage(state, req).await,
        ("PUT", id) if id.starts_with('/') && id.len() > 1 && !id[1..].contains('/') => {
            let body: UpdateLimitation = match req.json() {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            let rule = match state.quotas.updated_rule(&id[1..], &body) {
                Ok(r) => r,
                Err(e) => return Some(Err(change_error(state, e))),
            };
            commit(state, rule)
                .await
                .map(|rule| (StatusCode::OK, envelope(json!({ "benefit_info": rule }))))
                .map_err(|e| change_error(state, e))
        }
        (_, "") => Err(crate::admin::method_not_allowed("GET, POST")),
        (_, "/usage") => Err(crate::admin::method_not_allowed("GET")),
        _ => Err(crate::admin::method_not_allowed("PUT")),
    })
}

fn parse<T: serde::de::DeserializeOwned>(name: &str, v: &str) -> Result<T, AdminError> {
    serde_json::from_value(Value::String(v.to_owned()))
        .map_err(|_| AdminError::bad_request(format!("invalid parameter {name}: `{v}`")))
}

/// `GET …/limitations?entity_type=&entity_id=&benefit_type=&status=&page_token=&page_size=`
fn list(state: &GatewayState, req: &AdminRequest) -> AdminResult {
    let q = &req.query;
    let entity_type: EntityType = parse(
        "entity_type",
        q.get("entity_type")
            .ok_or_else(|| AdminError::bad_request("invalid parameter entity_type: required"))?,
    )?;
    let status: RuleStatus = parse("status", q.get("status").map_or("valid", String::as_str))?;
    let benefit_type = q.get("benefit_type").filter(|b| !b.is_empty()).cloned();
    let entity_id = q.get("entity_id").filter(|e| !e.is_empty()).cloned();
    let page_size = match q.get("page_size") {
        None => 20,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| AdminError::bad_request("invalid parameter page_size: must be 1-200"))?,
    };
    let offset = match q.get("page_token").filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| AdminError::bad_request("invalid parameter page_token"))?,
    };
    let rules = state.quotas.rules();
    let mut matching: Vec<_> = rules
        .iter()
        .filter(|r| r.entity_type == entity_type && r.status == status)
        .filter(|r| entity_id.as_ref().is_none_or(|e| r.entity_id == *e))
        .filter(|r| {
            benefit_type
                .as_ref()
                .is_none_or(|b| r.benefit_type.as_str() == b)
        })
        .collect();
    matching.sort_by(|a, b| a.benefit_id.cmp(&b.benefit_id));
    let page: Vec<_> = matching.iter().skip(offset).take(page_size).collect();
    let has_more = offset + page.len() < matching.len();
    let next = if has_more {
        (offset + page.len()).to_string()
    } else {
        String::new()
    };
    Ok((
        StatusCode::OK,
        envelope(json!({"has_more": has_more, "page_token": next, "benefit_infos": page})),
    ))
}

/// `GET …/limitations/usage?entity_type=single_device&entity_id=<device>`
async fn usage(state: &GatewayState, req: &AdminRequest) -> AdminResult {
    let q = &req.query;
    if q.get("entity_type")
        .map(String::as_str)
        .unwrap_or("single_device")
        != "single_device"
    {
        return Err(AdminError::bad_request(
            "invalid parameter entity_type: usage is per device (single_device)",
        ));
    }
    let id = q.get("entity_id").ok_or_else(|| {
        AdminError::bad_request("invalid parameter entity_id: a device id is required")
    })?;
    let device = policy::ids::DeviceId::parse(id)
        .map_err(|e| AdminError::bad_request(format!("entity_id: {e}")))?;
    let items = state.quotas.usage_shared(&device, now_s()).await;
    Ok((StatusCode::OK, envelope(items_json(&items))))
}
