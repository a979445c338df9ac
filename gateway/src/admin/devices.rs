//! `/admin/v1/devices…`: register (one or many), list, get, update (labels, enabled),
//! delete, revoke, mint tokens.

use std::collections::BTreeMap;

use http::StatusCode;
use policy::ids::DeviceId;
use serde::Deserialize;
use serde_json::json;

use super::{AdminError, AdminRequest, AdminResult, method_not_allowed};
use crate::cluster::devices::{Change, Outcome};
use crate::state::{GatewayState, now_s};
use crate::store::CredentialRecord;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDevice {
    device_id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RegisterBody {
    Many { devices: Vec<NewDevice> },
    One(NewDevice),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    labels: Option<BTreeMap<String, String>>,
    enabled: Option<bool>,
}

/// Default and largest page of `GET /admin/v1/devices`.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 1000;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    duration_seconds: Option<u64>,
}

/// Longest accepted label key/value and most labels per device.
const MAX_LABEL_LEN: usize = 256;
const MAX_LABELS: usize = 32;
/// Most devices in one bulk registration.
const MAX_BULK: usize = 10_000;

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels per device"));
    }
    if labels
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN)
    {
        return Err(format!(
            "label keys must be 1-{MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN}"
        ));
    }
    Ok(())
}

/// Persists records; a failure is a 503 and nothing is applied in memory.
///
/// Admin handlers share the admin listener's single thread, and the embedded path does not
/// await between the check, the write and the in-memory change, so "persist, then apply"
/// cannot interleave with another admin call. (In cluster mode each change is one atomic
/// Redis script instead.)
fn persist(state: &GatewayState, records: &[crate::store::DeviceRecord]) -> Result<(), AdminError> {
    state
        .store
        .put_devices(records)
        .map_err(|e| store_error(state, e))
}

fn store_error(state: &GatewayState, e: crate::store::StoreError) -> AdminError {
    state
        .metrics
        .store_errors
        .with_label_values(&["devices"])
        .inc();
    AdminError::write_failed("device", "embedded", &e)
}

/// Creates the devices in the store (embedded or Redis), then in the registry. Returns how
/// many were new.
async fn create(
    state: &GatewayState,
    fresh: Vec<(DeviceId, BTreeMap<String, String>)>,
    now: u64,
) -> Result<u64, AdminError> {
    let records: Vec<_> = fresh.iter().map(|(id, l)| new_record(id, l, now)).collect();
    let created = match &state.cluster {
        None => {
            persist(state, &records)?;
            records
        }
        Some(c) => {
            let ids: std::collections::HashSet<String> = c
                .create_devices(&records)
                .await
                .map_err(|e| cluster_error(state, e))?
                .into_iter()
                .collect();
            records
                .into_iter()
                .filter(|r| ids.contains(&r.device_id))
                .collect()
        }
    };
    let n = created.len() as u64;
    for r in created {
        state.devices.upsert(r);
    }
    state.metrics.devices.set(state.devices.len() as i64);
    Ok(n)
}

fn cluster_error(state: &GatewayState, e: crate::cluster::ClusterError) -> AdminError {
    if let Some(c) = &state.cluster {
        c.count_error("admin");
    }
    AdminError::write_failed("device", "redis", &e)
}

/// Applies one change to one device: in the embedded store (persist, then apply) or in Redis
/// (one atomic script; the node then applies the result, other nodes via the change feed).
async fn change(state: &GatewayState, id: &DeviceId, change: Change<'_>) -> Result<(), AdminError> {
    let not_found = || AdminError::not_found("device not found");
    let outcome = match &state.cluster {
        Some(c) => c
            .change_device(id.as_str(), change)
            .await
            .map_err(|e| cluster_error(state, e))?,
        None => {
            let d = state.devices.get(id).ok_or_else(not_found)?;
            if let Change::Delete = change {
                state
                    .store
                    .delete_device(id.as_str())
                    .map_err(|e| store_error(state, e))?;
                Outcome::Done(None)
            } else {
                let mut rec = d.record();
                match change {
                    Change::SetLabels(l) => rec.labels = l.clone(),
                    Change::SetEnabled(e) => {
                        if rec.enabled && !e {
                            // Disabling revokes, so re-enabling does not bring old tokens back.
                            rec.generation += 1;
                        }
                        rec.enabled = e;
                    }
                    Change::Revoke => rec.generation += 1,
                    Change::AddCredential { record, max } => {
                        if rec.credentials.iter().any(|c| c.kid() == record.kid()) {
                            return Err(conflict(record.kid()));
                        }
                        if rec.credentials.len() >= max {
                            return Err(too_many());
                        }
                        rec.credentials.push(record.clone());
                    }
                    Change::RemoveCredential(kid) => {
                        if !rec.credentials.iter().any(|c| c.kid() == kid) {
                            return Err(AdminError::not_found("credential not found"));
                        }
                        rec.credentials.retain(|c| c.kid() != kid);
                    }
                    Change::Delete => {}
                }
                persist(state, std::slice::from_ref(&rec))?;
                Outcome::Done(Some(rec))
            }
        }
    };
    match outcome {
        Outcome::Done(Some(rec)) => state.devices.upsert(rec),
        Outcome::Done(None) => {
            state.devices.remove(id);
            state.quotas.forget_device(id);
            state.metrics.devices.set(state.devices.len() as i64);
        }
        Outcome::NotFound => {
            // Gone in the shared store: forget it here too.
            state.devices.remove(id);
            state.quotas.forget_device(id);
            return Err(not_found());
        }
        Outcome::CredentialExists => return Err(AdminError::conflict("credential already exists")),
        Outcome::TooManyCredentials => return Err(too_many()),
        Outcome::CredentialNotFound => return Err(AdminError::not_found("credential not found")),
    }
    Ok(())
}

fn conflict(kid: &str) -> AdminError {
    AdminError::conflict(format!("credential `{kid}` already exists"))
}

fn too_many() -> AdminError {
    AdminError::bad_request(format!(
        "a device holds at most {} credentials",
        crate::devices::MAX_CREDENTIALS
    ))
}

fn new_record(
    id: &DeviceId,
    labels: &BTreeMap<String, String>,
    now: u64,
) -> crate::store::DeviceRecord {
    crate::store::DeviceRecord {
        device_id: id.to_string(),
        labels: labels.clone(),
        enabled: true,
        // Random, not 0: the tokens of an earlier device with this id (deleted since) carry
        // that device's generation and must not work for this one.
        generation: crate::devices::fresh_identity(),
        created_at: now,
        credentials: Vec::new(),
    }
}

async fn register(state: &GatewayState, req: &AdminRequest) -> AdminResult {
    let body: RegisterBody = req.json()?;
    let now = now_s();
    match body {
        RegisterBody::One(d) => {
            let id = DeviceId::parse(&d.device_id)
                .map_err(|e| AdminError::bad_request(format!("device_id: {e}")))?;
            check_labels(&d.labels).map_err(AdminError::bad_request)?;
            if let Some(existing) = state.devices.get(&id) {
                return Ok((
                    StatusCode::OK,
                    json!({"device": existing.view(), "created": false}),
                ));
            }
            let created = create(state, vec![(id.clone(), d.labels)], now).await?;
            let dev = state.devices.get(&id).ok_or_else(|| {
                AdminError::unavailable("the device store changed concurrently; retry")
            })?;
            Ok(if created == 1 {
                (
                    StatusCode::CREATED,
                    json!({"device": dev.view(), "created": true}),
                )
            } else {
                (
                    StatusCode::OK,
                    json!({"device": dev.view(), "created": false}),
                )
            })
        }
        RegisterBody::Many { devices } => {
            if devices.is_empty() || devices.len() > MAX_BULK {
                return Err(AdminError::bad_request(format!(
                    "`devices` must hold 1-{MAX_BULK} entries"
                )));
            }
            // Validate everything first: a bad entry registers nothing.
            let mut parsed = Vec::with_capacity(devices.len());
            let mut errors = Vec::new();
            for (i, d) in devices.into_iter().enumerate() {
                match (DeviceId::parse(&d.device_id), check_labels(&d.labels)) {
                    (Ok(id), Ok(())) => parsed.push((id, d.labels)),
                    (Err(e), _) => errors.push(format!("devices[{i}].device_id: {e}")),
                    (_, Err(e)) => errors.push(format!("devices[{i}].labels: {e}")),
                }
            }
            if !errors.is_empty() {
                errors.truncate(20);
                return Err(AdminError::bad_request(errors.join("; ")));
            }
            let entries = parsed.len() as u64;
            let mut seen = std::collections::HashSet::new();
            let fresh: Vec<_> = parsed
                .into_iter()
                .filter(|(id, _)| state.devices.get(id).is_none() && seen.insert(id.clone()))
                .collect();
            let created = create(state, fresh, now).await?;
            Ok((
                StatusCode::OK,
                json!({"created": created, "already_existed": entries - created}),
            ))
        }
    }
}

fn mint(state: &GatewayState, id: &DeviceId, req: &AdminRequest) -> AdminResult {
    let body: TokenBody = req.json_or_default()?;
    match crate::tokens::mint_for_device(state, id, body.duration_seconds, "admin", None) {
        Ok(m) => Ok((StatusCode::OK, m.to_json())),
        Err(crate::tokens::MintError::UnknownDevice) => {
            Err(AdminError::not_found("device not found"))
        }
        Err(e) => Err(AdminError::bad_request(e.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManyTokensBody {
    device_ids: Vec<String>,
    duration_seconds: Option<u64>,
}

/// `POST /admin/v1/tokens`: a token for each of up to [`MAX_BULK`] devices (provisioning a
/// batch). Devices that get none (unknown, disabled, bad id) are listed under `errors`; the
/// call itself succeeds.
fn mint_many(state: &GatewayState, req: &AdminRequest) -> AdminResult {
    let body: ManyTokensBody = req.json()?;
    if body.device_ids.is_empty() || body.device_ids.len() > MAX_BULK {
        return Err(AdminError::bad_request(format!(
            "`device_ids` must hold 1-{MAX_BULK} entries"
        )));
    }
    let mut tokens = Vec::with_capacity(body.device_ids.len());
    let mut errors = Vec::new();
    for raw in &body.device_ids {
        let minted = DeviceId::parse(raw)
            .map_err(|e| e.to_string())
            .and_then(|id| {
                crate::tokens::mint_for_device(state, &id, body.duration_seconds, "admin", None)
                    .map_err(|e| e.to_string())
            });
        match minted {
            Ok(m) => {
                let mut token = m.to_json();
                token["device_id"] = json!(raw);
                tokens.push(token);
            }
            Err(e) => errors.push(json!({"device_id": raw, "error": e})),
        }
    }
    Ok((StatusCode::OK, json!({"tokens": tokens, "errors": errors})))
}

fn list(state: &GatewayState, req: &AdminRequest) -> AdminResult {
    let page_size = match req.query.get("page_size") {
        None => DEFAULT_PAGE,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| AdminError::bad_request(format!("page_size must be 1-{MAX_PAGE}")))?,
    };
    let after = match req.query.get("page_token").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(
            DeviceId::parse(t).map_err(|_| AdminError::bad_request("page_token is not valid"))?,
        ),
    };
    // One more than asked tells whether another page exists.
    let mut page = state.devices.list(after.as_ref(), page_size + 1);
    let has_more = page.len() > page_size;
    page.truncate(page_size);
    let next = if has_more {
        page.last().map(|d| d.id.to_string())
    } else {
        None
    };
    let devices: Vec<_> = page.iter().map(|d| d.view()).collect();
    Ok((
        StatusCode::OK,
        json!({"devices": devices, "has_more": has_more, "page_token": next.unwrap_or_default()}),
    ))
}

async fn patch(state: &GatewayState, id: &DeviceId, req: &AdminRequest) -> AdminResult {
    let body: PatchBody = req.json()?;
    if let Some(labels) = &body.labels {
        check_labels(labels).map_err(AdminError::bad_request)?;
    }
    if state.devices.get(id).is_none() {
        return Err(AdminError::not_found("device not found"));
    }
    if let Some(labels) = &body.labels {
        change(state, id, Change::SetLabels(labels)).await?;
    }
    if let Some(enabled) = body.enabled {
        change(state, id, Change::SetEnabled(enabled)).await?;
    }
    let d = state
        .devices
        .get(id)
        .ok_or_else(|| AdminError::not_found("device not found"))?;
    Ok((StatusCode::OK, json!({"device": d.view()})))
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum NewCredential {
    PublicKey {
        kid: String,
        algorithm: String,
        public_key_pem: String,
    },
    Secret {
        kid: Option<String>,
    },
}

/// `POST /admin/v1/devices/{id}/credentials`: a public key (algorithm pinned) or a generated
/// secret, shown in the answer exactly once and stored only as a salted hash.
async fn add_credential(state: &GatewayState, id: &DeviceId, req: &AdminRequest) -> AdminResult {
    let body: NewCredential = req.json()?;
    let d = state
        .devices
        .get(id)
        .ok_or_else(|| AdminError::not_found("device not found"))?;
    if d.credentials().records().len() >= crate::devices::MAX_CREDENTIALS {
        return Err(too_many());
    }
    let now = now_s();
    let (record, secret) = match body {
        NewCredential::PublicKey {
            kid,
            algorithm,
            public_key_pem,
        } => {
            let alg: policy::credential::KeyAlgorithm = algorithm
                .parse()
                .map_err(|_| AdminError::bad_request("algorithm must be RS256 or ES256"))?;
            // Parse now: a key that does not parse is refused, not stored.
            policy::credential::DevicePublicKey::parse(&kid, alg, &public_key_pem)
                .map_err(|e| AdminError::bad_request(format!("public_key_pem: {e}")))?;
            let rec = CredentialRecord::PublicKey {
                kid,
                algorithm: alg,
                public_key_pem,
                created_at: now,
                serial: crate::devices::fresh_identity(),
            };
            (rec, None)
        }
        NewCredential::Secret { kid } => {
            let kid = kid.unwrap_or_else(|| format!("sec-{:016x}", rand::random::<u64>()));
            let ok = !kid.is_empty()
                && kid.len() <= policy::credential::MAX_KID_LEN
                && kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(AdminError::bad_request(
                    "kid must be 1-128 characters of A-Z a-z 0-9 . _ -",
                ));
            }
            let (secret, hash) =
                policy::credential::DeviceSecret::generate(rand::random(), rand::random());
            (
                CredentialRecord::Secret {
                    kid,
                    hash,
                    created_at: now,
                    serial: crate::devices::fresh_identity(),
                },
                Some(secret),
            )
        }
    };
    change(
        state,
        id,
        Change::AddCredential {
            record: &record,
            max: crate::devices::MAX_CREDENTIALS,
        },
    )
    .await
    .map_err(|e| {
        if e.status == StatusCode::CONFLICT {
            conflict(record.kid())
        } else {
            e
        }
    })?;
    let mut answer = json!({"credential": crate::devices::CredentialView::from(&record)});
    if let Some(secret) = secret {
        // Shown this once; only the hash is stored.
        answer["kid"] = json!(record.kid());
        answer["secret"] = json!(secret.expose());
    }
    Ok((StatusCode::CREATED, answer))
}

/// `DELETE /admin/v1/devices/{id}/credentials/{kid}`: tokens obtained through it stop working.
async fn delete_credential(state: &GatewayState, id: &DeviceId, kid: &str) -> AdminResult {
    change(state, id, Change::RemoveCredential(kid)).await?;
    Ok((StatusCode::OK, json!({"deleted": true})))
}

async fn revoke(state: &GatewayState, id: &DeviceId) -> AdminResult {
    change(state, id, Change::Revoke).await?;
    Ok((
        StatusCode::OK,
        json!({"revoked": true, "revoked_at": now_s()}),
    ))
}

async fn delete(state: &GatewayState, id: &DeviceId) -> AdminResult {
    change(state, id, Change::Delete).await?;
    Ok((StatusCode::OK, json!({"deleted": true})))
}

pub async fn route(state: &GatewayState, req: &AdminRequest) -> AdminResult {
    let path = req.path.as_str();
    if path == "/admin/v1/tokens" {
        return match req.method.as_str() {
            "POST" => mint_many(state, req),
            _ => Err(method_not_allowed("POST")),
        };
    }
    if path == "/admin/v1/devices" {
        return match req.method.as_str() {
            "POST" => register(state, req).await,
            "GET" => list(state, req),
            _ => Err(method_not_allowed("GET, POST")),
        };
    }
    let Some(rest) = path.strip_prefix("/admin/v1/devices/") else {
        return Err(AdminError::not_found("no such admin route"));
    };
    let mut parts = rest.split('/');
    let raw_id = super::percent_decode(parts.next().unwrap_or_default(), false);
    let id =
        DeviceId::parse(&raw_id).map_err(|e| AdminError::bad_request(format!("device_id: {e}")))?;
    let not_found = || AdminError::not_found("device not found");
    match (req.method.as_str(), parts.next(), parts.next()) {
        ("GET", None, _) => {
            let d = state.devices.get(&id).ok_or_else(not_found)?;
            Ok((StatusCode::OK, json!({"device": d.view()})))
        }
        ("PATCH", None, _) => patch(state, &id, req).await,
        ("DELETE", None, _) => delete(state, &id).await,
        ("POST", Some("revoke"), None) => revoke(state, &id).await,
        ("POST", Some("tokens"), None) => mint(state, &id, req),
        ("POST", Some("credentials"), None) => add_credential(state, &id, req).await,
        ("GET", Some("credentials"), None) => {
            let d = state.devices.get(&id).ok_or_else(not_found)?;
            let list: Vec<_> = d
                .credentials()
                .records()
                .iter()
                .map(crate::devices::CredentialView::from)
                .collect();
            Ok((StatusCode::OK, json!({"credentials": list})))
        }
        ("DELETE", Some("credentials"), Some(kid)) if parts.next().is_none() => {
            let kid = &super::percent_decode(kid, false);
            delete_credential(state, &id, kid).await
        }
        (_, None, _) => Err(method_not_allowed("GET, PATCH, DELETE")),
        (_, Some("tokens" | "revoke"), None) => Err(method_not_allowed("POST")),
        (_, Some("credentials"), None) => Err(method_not_allowed("GET, POST")),
        (_, Some("credentials"), Some(_)) if parts.next().is_none() => {
            Err(method_not_allowed("DELETE"))
        }
        _ => Err(AdminError::not_found("no such admin route")),
    }
}
