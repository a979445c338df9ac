//! The only place device-facing error responses are written: a [`Denial`] becomes an HTTP
//! status, `Retry-After`, `X-Tt-Logid` and Coze's envelope `{"code","msg","detail":{"logid"}}`
//! with `Content-Type: application/json`, so stock SDKs raise typed errors.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use policy::decision::{Denial, DenyReason};

/// The envelope body for a denial.
pub fn envelope(code: u32, msg: &str, logid: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({"code": code, "msg": msg, "detail": {"logid": logid}}).to_string(),
    )
}

/// Status, headers and body for a denial, as plain parts (the WebSocket path writes them to a
/// raw socket; the proxy path through pingora).
pub fn parts(denial: &Denial, logid: &str) -> (u16, Vec<(&'static str, String)>, Bytes) {
    let (status, code) = denial.reason.status_and_code();
    let body = envelope(code, denial.message, logid);
    let mut headers = vec![
        ("content-type", "application/json".to_owned()),
        ("content-length", body.len().to_string()),
        ("X-Tt-Logid", logid.to_owned()),
    ];
    if let Some(s) = denial.retry_after_s {
        headers.push(("retry-after", s.to_string()));
    }
    (status, headers, body)
}

/// Writes a denial through pingora and keeps the connection reusable.
pub async fn deny(session: &mut Session, denial: &Denial, logid: &str) -> Result<()> {
    let (status, headers, body) = parts(denial, logid);
    let mut resp = ResponseHeader::build(status, Some(headers.len()))?;
    for (k, v) in headers {
        resp.insert_header(k, v)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// A JSON answer the gateway writes itself (the token endpoint), with `X-Tt-Logid`,
/// `Cache-Control: no-store` and an optional `Retry-After`.
pub async fn json(
    session: &mut Session,
    status: u16,
    body: &serde_json::Value,
    logid: &str,
    retry_after_s: Option<u64>,
) -> Result<()> {
    let body = Bytes::from(body.to_string());
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    resp.insert_header("X-Tt-Logid", logid)?;
    if let Some(s) = retry_after_s {
        resp.insert_header("retry-after", s.to_string())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// A raw HTTP/1.1 response for a denial, for sockets outside pingora's session.
pub fn raw_http1(denial: &Denial, logid: &str) -> Vec<u8> {
    let (status, headers, body) = parts(denial, logid);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(&v);
        out.push_str("\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Maps a proxying failure to the denial the device sees; `None` when the device's own
/// connection is gone and nothing can be written.
pub fn denial_for_error(e: &Error) -> Option<Denial> {
    use pingora::ErrorType::*;
    match e.etype() {
        HTTPStatus(413) => Some(Denial::new(
            DenyReason::BodyTooLarge,
            "request body too large",
        )),
        HTTPStatus(403) => Some(Denial::new(
            DenyReason::Forbidden,
            "device not allowed to use this bot",
        )),
        HTTPStatus(s) if (400..500).contains(s) => {
            Some(Denial::new(DenyReason::BadRequest, "bad request"))
        }
        ConnectTimedout | ReadTimedout | WriteTimedout => Some(Denial::new(
            DenyReason::UpstreamTimeout,
            "upstream timed out",
        )),
        _ => match e.esource() {
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => None,
                _ => Some(Denial::new(DenyReason::BadRequest, "bad request")),
            },
            _ => Some(Denial::new(
                DenyReason::UpstreamUnavailable,
                "upstream unavailable",
            )),
        },
    }
}
