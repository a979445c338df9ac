//! The admin API on its own listener (never reachable from the device listener).
//!
//! Unauthenticated: `GET /healthz`, `GET /readyz`, `GET /metrics` (bind the admin listener to a
//! private address). Everything else needs `Authorization: Bearer <admin token>`, compared in
//! constant time. Answers are JSON; errors use Coze's envelope `{"code","msg","detail"}` with
//! a 4xx status, never a 5xx for bad input.

mod devices;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};

use crate::state::{SharedState, now_ms};

/// Largest admin request body (bulk registration of thousands of devices fits).
const MAX_BODY: usize = 8 << 20;

pub struct AdminApp {
    pub state: SharedState,
}

/// An admin API error: HTTP status, Coze-style code, message.
#[derive(Debug)]
pub struct AdminError {
    pub status: StatusCode,
    pub code: u32,
    pub msg: String,
    /// The `Allow` header of a 405 answer.
    pub allow: Option<&'static str>,
}

impl AdminError {
    pub fn bad_request(msg: impl Into<String>) -> AdminError {
        AdminError {
            status: StatusCode::BAD_REQUEST,
            code: 4000,
            msg: msg.into(),
            allow: None,
        }
    }
    pub fn not_found(msg: impl Into<String>) -> AdminError {
        AdminError {
            status: StatusCode::NOT_FOUND,
            code: 4200,
            msg: msg.into(),
            allow: None,
        }
    }
    /// 409 / 4000: the resource already exists.
    pub fn conflict(msg: impl Into<String>) -> AdminError {
        AdminError {
            status: StatusCode::CONFLICT,
            code: 4000,
            msg: msg.into(),
            allow: None,
        }
    }
    /// 503 / 5000: a dependency (the store) failed; nothing was changed.
    pub fn unavailable(msg: impl Into<String>) -> AdminError {
        AdminError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: 5000,
            msg: msg.into(),
            allow: None,
        }
    }

    /// A store or Redis write failed (already counted by the caller): logged, and answered
    /// 503 saying nothing changed. `what` names the store: "device", "rule".
    pub fn write_failed(what: &str, target: &str, e: &dyn std::fmt::Display) -> AdminError {
        tracing::error!(error = %e, store = target, "Admin write of a {what} failed; nothing was changed.");
        AdminError::unavailable(format!("{what} store unavailable; nothing was changed"))
    }
    fn unauthorized() -> AdminError {
        AdminError {
            status: StatusCode::UNAUTHORIZED,
            code: 4100,
            msg: "admin token missing or invalid".into(),
            allow: None,
        }
    }
    fn method_not_allowed(allow: &'static str) -> AdminError {
        AdminError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: 4000,
            msg: format!("method not allowed; use {allow}"),
            allow: Some(allow),
        }
    }
    fn too_large() -> AdminError {
        AdminError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: 4000,
            msg: "request body too large".into(),
            allow: None,
        }
    }
}

pub type AdminResult = Result<(StatusCode, Value), AdminError>;

/// A parsed admin request.
pub struct AdminRequest {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Bytes,
}

impl AdminRequest {
    /// The body as JSON of type `T`, with a 400 naming the problem otherwise.
    /// (An array is refused even where serde would read it as a struct's fields in order.)
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, AdminError> {
        if self.body.is_empty() {
            return Err(AdminError::bad_request("a JSON body is required"));
        }
        let v: Value = serde_json::from_slice(&self.body)
            .map_err(|e| AdminError::bad_request(format!("invalid JSON body: {e}")))?;
        if !v.is_object() {
            return Err(AdminError::bad_request("the body must be a JSON object"));
        }
        serde_json::from_value(v)
            .map_err(|e| AdminError::bad_request(format!("invalid JSON body: {e}")))
    }
    /// The body as JSON, or `T::default()` when empty.
    pub fn json_or_default<T: serde::de::DeserializeOwned + Default>(
        &self,
    ) -> Result<T, AdminError> {
        if self.body.is_empty() {
            return Ok(T::default());
        }
        self.json()
    }
}

/// Constant-time equality of two secrets (compares SHA-256 digests, so lengths leak nothing).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as a space in query strings). Invalid escapes are kept as
/// they are; invalid UTF-8 is replaced, so ids with it never match anything.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let hex = |x: u8| (x as char).to_digit(16);
        match c {
            b'%' => {
                match (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(c),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            _ => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(
    status: StatusCode,
    body: &Value,
    logid: &str,
    allow: Option<&str>,
) -> Response<Vec<u8>> {
    let bytes = body.to_string().into_bytes();
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", bytes.len())
        .header("x-tt-logid", logid);
    if let Some(allow) = allow {
        b = b.header("allow", allow);
    }
    b.body(bytes).unwrap_or_else(|_| Response::new(Vec::new()))
}

impl AdminApp {
    async fn read_body(session: &mut ServerSession) -> Result<Bytes, AdminError> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return Err(AdminError::too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(Bytes::from(body)),
                Err(_) => return Err(AdminError::bad_request("could not read the request body")),
            }
        }
    }

    async fn route(&self, session: &mut ServerSession) -> AdminResult {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_owned();
        let query = parse_query(req.uri.query());
        let authorized = crate::proxy::admit::bearer(
            req.headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
        .is_some_and(|t| {
            secrets_equal(
                t.as_bytes(),
                self.state.config.admin_token.expose().as_bytes(),
            )
        });
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => return Ok((StatusCode::OK, json!({"status": "ok"}))),
            ("GET", "/readyz") => {
                let ready = self.state.is_ready();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let phase = format!("{:?}", self.state.phase()).to_lowercase();
                let sync = self
                    .state
                    .quotas
                    .sync_status
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default();
                let mut body = json!({"ready": ready, "phase": phase, "quota_sync": sync});
                if let Some(c) = &self.state.cluster {
                    // Still ready while Redis is down: the node serves what it can (see
                    // docs/design/001); the detail tells operators.
                    body["cluster"] = json!({
                        "redis": if c.is_up() { "up" } else { "down" },
                        "node_id": c.node_id,
                    });
                }
                return Ok((status, body));
            }
            (_, "/healthz" | "/readyz" | "/metrics") => return Err(method_not_allowed("GET")),
            _ => {}
        }
        if !authorized {
            return Err(AdminError::unauthorized());
        }
        let body = Self::read_body(session).await?;
        let req = AdminRequest {
            method,
            path,
            query,
            body,
        };
        if let Some(sync) = &self.state.config.quota.sync
            && crate::quota_api::write_goes_upstream(&self.state, &req)
        {
            let target = match session.req_header().uri.path_and_query() {
                Some(pq) => pq.as_str().to_owned(),
                None => req.path.clone(),
            };
            return crate::quota_sync::forward(
                &self.state,
                sync,
                &req.method,
                &target,
                req.body.clone(),
            )
            .await
            .map(|(status, v)| {
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    v,
                )
            })
            .map_err(|e| {
                tracing::warn!(error = %e, "Forwarding a rule write upstream failed.");
                AdminError::unavailable("upstream quota API unavailable; nothing was changed")
            });
        }
        if req.path == "/admin/v1/reload" && req.method != Method::POST {
            return Err(method_not_allowed("POST"));
        }
        if let ("POST", "/admin/v1/reload") = (req.method.as_str(), req.path.as_str()) {
            return crate::reload::reload(&self.state)
                .map(|report| {
                    (
                        StatusCode::OK,
                        serde_json::to_value(report).unwrap_or_default(),
                    )
                })
                .map_err(|e| AdminError::bad_request(e.to_string()));
        }
        if let Some(r) = crate::quota_api::route(&self.state, &req).await {
            return r;
        }
        devices::route(&self.state, &req).await
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let logid = crate::logid::new_logid(now_ms());
        let is_metrics = session.req_header().uri.path() == "/metrics"
            && session.req_header().method == Method::GET;
        if is_metrics {
            let body = self.state.metrics.encode();
            self.state
                .metrics
                .admin_requests
                .with_label_values(&["2xx"])
                .inc();
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/plain; version=0.0.4")
                .header("content-length", body.len())
                .body(body)
                .unwrap_or_else(|_| Response::new(Vec::new()));
        }
        let (status, body, allow) = match self.route(session).await {
            Ok((status, v)) => (status, v, None),
            Err(e) => (
                e.status,
                json!({"code": e.code, "msg": e.msg, "detail": {"logid": logid}}),
                e.allow,
            ),
        };
        self.state
            .metrics
            .admin_requests
            .with_label_values(&[crate::metrics::status_class(status.as_u16())])
            .inc();
        respond(status, &body, &logid, allow)
    }
}

/// Used by routes for unsupported methods on known paths.
/// 405 with the `Allow` header for a known path used with another method.
pub fn method_not_allowed(allow: &'static str) -> AdminError {
    AdminError::method_not_allowed(allow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("AA%3ABB%3acc", true), "AA:BB:cc");
        assert_eq!(percent_decode("a+b%20c", true), "a b c");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("100%", true), "100%");
        assert_eq!(percent_decode("%zz%4", true), "%zz%4");
    }

    #[test]
    fn constant_time_compare_is_correct() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
    }
}
