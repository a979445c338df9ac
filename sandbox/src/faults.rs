//! Per-request fault injection.
//!
//! A request asks for faults with the `X-Sandbox-Fault` header or the `sandbox_fault` query
//! parameter (WebSocket clients that cannot set headers). The value is a comma-separated list:
//!
//! | knob | effect |
//! |---|---|
//! | `latency_ms=N` | wait N ms before answering (before the first byte / the 101) |
//! | `status=N` | answer HTTP N (5xx) with code 5000 in the envelope instead of the real answer |
//! | `rate_limit` | answer HTTP 429 with code 4013 and `Retry-After: 1` |
//! | `stall_after=N` | after N SSE events / WS frames, stop sending but keep the connection open |
//! | `reset_after=N` | after N SSE events / WS frames, drop the connection without a clean end |
//! | `malformed_after=N` | after N SSE events / WS frames, send one malformed event, then continue |
//! | `no_usage` | streams end without a usage-bearing event (`chat.completed` / `chat.failed` omitted) |
//! | `fail` | chats fail: `conversation.chat.failed` (Chat with `last_error {code: 5000, msg}`, `failed_at` and the usage so far) instead of completing; on REST chat v3 (also `submit_tool_outputs`), `/v1/workflows/chat` and the `/v1/chat` WebSocket. A `bot_id` ending in `_fail` does the same on chat v3 and `/v1/chat` |
//!
//! Example: `X-Sandbox-Fault: latency_ms=200,reset_after=3`.
//! Per-server switches (token endpoint down, limitations API down) are in [`crate::Switches`].

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};

use crate::envelope::ApiError;

/// Faults requested for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    pub latency: Option<Duration>,
    pub status: Option<u16>,
    pub rate_limit: bool,
    pub stall_after: Option<usize>,
    pub reset_after: Option<usize>,
    pub malformed_after: Option<usize>,
    pub no_usage: bool,
    /// Chats fail (`conversation.chat.failed`) instead of completing.
    pub fail: bool,
}

impl Fault {
    /// Parses the knob list; unknown knobs are ignored so old tests keep working.
    pub fn parse(spec: &str) -> Fault {
        let mut f = Fault::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            let n = v.trim().parse::<u64>().ok();
            match k.trim() {
                "latency_ms" => f.latency = n.map(Duration::from_millis),
                "status" => f.status = n.and_then(|n| u16::try_from(n).ok()),
                "rate_limit" => f.rate_limit = true,
                "stall_after" => f.stall_after = n.map(|n| n as usize),
                "reset_after" => f.reset_after = n.map(|n| n as usize),
                "malformed_after" => f.malformed_after = n.map(|n| n as usize),
                "no_usage" => f.no_usage = true,
                "fail" => f.fail = true,
                _ => {}
            }
        }
        f
    }

    /// Faults from the header, else from the raw query string.
    pub fn from_request(headers: &HeaderMap, raw_query: Option<&str>) -> Fault {
        if let Some(v) = headers.get("x-sandbox-fault").and_then(|v| v.to_str().ok()) {
            return Fault::parse(v);
        }
        if let Some(q) = raw_query {
            for pair in q.split('&') {
                if let Some(v) = pair.strip_prefix("sandbox_fault=") {
                    return Fault::parse(&crate::auth::percent_decode(v));
                }
            }
        }
        Fault::default()
    }

    /// Applies the faults that act before any answer: latency, then a forced status.
    /// `Err` is the error answer to send instead of the real one.
    pub async fn before_answer(&self) -> Result<(), ApiError> {
        if let Some(d) = self.latency {
            tokio::time::sleep(d).await;
        }
        if self.rate_limit {
            return Err(ApiError::rate_limited());
        }
        if let Some(s) = self.status {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Err(ApiError::new(status, 5000, "injected fault"));
        }
        Ok(())
    }

    /// What to do before sending stream item number `n` (0-based).
    pub fn at_item(&self, n: usize) -> StreamAction {
        if self.reset_after == Some(n) {
            StreamAction::Reset
        } else if self.stall_after == Some(n) {
            StreamAction::Stall
        } else if self.malformed_after == Some(n) {
            StreamAction::Malformed
        } else {
            StreamAction::Send
        }
    }
}

/// The fault decision for one stream item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamAction {
    Send,
    Stall,
    Reset,
    Malformed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_knobs() {
        let f = Fault::parse("latency_ms=200, reset_after=3,rate_limit,bogus=1,no_usage");
        assert_eq!(f.latency, Some(Duration::from_millis(200)));
        assert_eq!(f.reset_after, Some(3));
        assert!(f.rate_limit && f.no_usage && !f.fail);
        assert!(Fault::parse("fail").fail);
        assert_eq!(f.at_item(3), StreamAction::Reset);
        assert_eq!(f.at_item(2), StreamAction::Send);
    }

    #[test]
    fn query_knob_is_read_when_header_absent() {
        let f = Fault::from_request(
            &HeaderMap::new(),
            Some("bot_id=1&sandbox_fault=stall_after%3D2"),
        );
        assert_eq!(f.stall_after, Some(2));
    }
}
