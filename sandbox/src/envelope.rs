//! Coze's response envelope `{code,msg,data,detail:{logid}}` and the `X-Tt-Logid` header.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A Coze-style log id: `YYYYMMDDhhmmss` + 18 hex chars; unique enough for a sandbox.
pub fn new_logid() -> String {
    let r: u128 = rand::random();
    format!("20261121000000{:018X}", r & ((1u128 << 72) - 1))
}

/// Adds `X-Tt-Logid` to a response.
pub fn with_logid(mut resp: Response, logid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(logid) {
        resp.headers_mut().insert("x-tt-logid", v);
    }
    resp
}

fn json_response(status: StatusCode, body: Value, logid: &str) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_logid(resp, logid)
}

/// `{"code":0,"msg":"","data":<data>,"detail":{"logid"}}`
pub fn ok(data: Value) -> Response {
    let logid = new_logid();
    json_response(
        StatusCode::OK,
        json!({"code": 0, "msg": "", "data": data, "detail": {"logid": logid}}),
        &logid,
    )
}

/// Success with extra top-level fields next to `code/msg/detail` (workflow run, message list).
pub fn ok_flat(mut fields: serde_json::Map<String, Value>) -> Response {
    let logid = new_logid();
    fields.insert("code".into(), json!(0));
    fields.insert("msg".into(), json!(""));
    fields.insert("detail".into(), json!({"logid": logid}));
    json_response(StatusCode::OK, Value::Object(fields), &logid)
}

/// A Coze API error. Coze returns business errors with HTTP 200; auth, rate-limit and server
/// errors use the matching HTTP status so every SDK classifies them.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: i64,
    pub msg: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: i64, msg: impl Into<String>) -> Self {
        Self {
            status,
            code,
            msg: msg.into(),
        }
    }
    /// 4000: bad request parameters (HTTP 400).
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 4000, msg)
    }
    /// 4100: authentication invalid (HTTP 401).
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 4100, msg)
    }
    /// 4200: resource not found (HTTP 200, as Coze does for business errors).
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::OK, 4200, msg)
    }
    /// 4013: rate limited (HTTP 429).
    pub fn rate_limited() -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, 4013, "rate limited")
    }
    /// 5000: internal error (HTTP 500).
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, 5000, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let logid = new_logid();
        let mut resp = json_response(
            self.status,
            json!({"code": self.code, "msg": self.msg, "detail": {"logid": logid}}),
            &logid,
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// Fallback for unknown paths: 404 in the envelope.
pub async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, 4200, "resource not found").into_response()
}
