//! Bearer authentication for API routes: `Authorization: Bearer <token>` or, on WebSocket
//! handshakes, the `authorization=Bearer <token>` query parameter (raw space, `%20` or `+`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::HeaderMap;

use crate::envelope::ApiError;
use crate::state::{MintedToken, SandboxState, lock};

/// Who called: the token's mint record (`None` for a PAT) and any `X-Coze-DeviceInfo`.
#[derive(Clone, Debug)]
pub struct Caller {
    pub minted: Option<MintedToken>,
    pub device_info: Option<String>,
}

impl Caller {
    /// The device this call is attributed to: the token's `device_info`, else the header's.
    pub fn device_id(&self) -> Option<String> {
        if let Some(d) = self.minted.as_ref().and_then(|m| m.device_id.clone()) {
            return Some(d);
        }
        let raw = self.device_info.as_deref()?;
        let v: serde_json::Value = serde_json::from_str(raw).ok()?;
        v.get("device_id")
            .and_then(|d| d.as_str())
            .map(str::to_owned)
    }
}

fn strip_bearer(v: &str) -> Option<&str> {
    let v = v.trim();
    for prefix in ["Bearer ", "Bearer%20", "Bearer+", "bearer "] {
        if let Some(rest) = v.strip_prefix(prefix) {
            let rest = rest.trim();
            return (!rest.is_empty()).then_some(rest);
        }
    }
    None
}

/// The bearer token from the header, else from a raw query string's `authorization` parameter.
pub fn bearer<'a>(headers: &'a HeaderMap, raw_query: Option<&'a str>) -> Option<String> {
    if let Some(h) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        return strip_bearer(h).map(str::to_owned);
    }
    let q = raw_query?;
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("authorization=") {
            let decoded = percent_decode(v);
            return strip_bearer(&decoded).map(str::to_owned);
        }
    }
    None
}

/// Minimal `%XX` and `+` decoding for query values.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Authenticates an API call. PATs from the config and unexpired OAuth tokens are accepted.
pub fn authenticate(
    st: &Arc<SandboxState>,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    now_unix: u64,
) -> Result<Caller, ApiError> {
    let token = bearer(headers, raw_query)
        .ok_or_else(|| ApiError::unauthorized("authentication is invalid: missing token"))?;
    let device_info = headers
        .get("x-coze-deviceinfo")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let minted = if st.config.pats.iter().any(|p| p == &token) {
        None
    } else {
        match st.token_info(&token) {
            Some(m) if m.expires_at > now_unix => Some(m),
            Some(_) => return Err(ApiError::unauthorized("access token expired")),
            None => return Err(ApiError::unauthorized("authentication is invalid")),
        }
    };
    if device_info.is_some() {
        *lock(&st.last_device_info) = device_info.clone();
    }
    st.counters.api_requests.fetch_add(1, Ordering::Relaxed);
    Ok(Caller {
        minted,
        device_info,
    })
}

/// Current unix time in seconds.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_from_query_tolerates_encodings() {
        let h = HeaderMap::new();
        for q in [
            "bot_id=1&authorization=Bearer%20tok",
            "authorization=Bearer+tok&bot_id=1",
            "authorization=Bearer tok",
        ] {
            assert_eq!(bearer(&h, Some(q)).as_deref(), Some("tok"), "{q}");
        }
        assert_eq!(bearer(&h, Some("bot_id=1")), None);
    }
}
