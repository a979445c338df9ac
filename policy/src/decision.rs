//! Denials: the typed "no" every check returns, and its stable codes.
//!
//! The gateway maps a [`Denial`] to HTTP in exactly one place (`gateway::proxy::respond`);
//! this module only says *what* was denied and the facts needed to answer.

use std::fmt;

/// Why a request was refused. Codes from [`DenyReason::code`] are API: they appear in JSON
/// error bodies, metric labels and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenyReason {
    /// No bearer token on the request.
    MissingToken,
    /// Token malformed, badly signed, expired, revoked, or its device unknown/disabled.
    InvalidToken,
    /// The path is not on the allow-list.
    RouteNotAllowed,
    /// The device may not use this path or bot.
    Forbidden,
    /// Request body over the route's limit.
    BodyTooLarge,
    /// Malformed request.
    BadRequest,
    /// A quota rule is exhausted.
    QuotaExhausted,
    /// A rate limit (device, route or fleet) refused the request.
    RateLimited,
    /// The shared quota store (cluster mode) is unreachable and this benefit fails closed.
    QuotaUnavailable,
    /// The upstream could not be reached or failed.
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The gateway is draining (shutdown in progress).
    ShuttingDown,
}

impl DenyReason {
    /// Stable snake_case machine code.
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::MissingToken => "missing_token",
            DenyReason::InvalidToken => "invalid_token",
            DenyReason::RouteNotAllowed => "route_not_allowed",
            DenyReason::Forbidden => "forbidden",
            DenyReason::BodyTooLarge => "body_too_large",
            DenyReason::BadRequest => "bad_request",
            DenyReason::QuotaExhausted => "quota_exhausted",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::QuotaUnavailable => "quota_unavailable",
            DenyReason::UpstreamUnavailable => "upstream_unavailable",
            DenyReason::UpstreamTimeout => "upstream_timeout",
            DenyReason::ShuttingDown => "shutting_down",
        }
    }

    /// HTTP status and Coze business code (DESIGN §8).
    pub fn status_and_code(self) -> (u16, u32) {
        match self {
            DenyReason::MissingToken | DenyReason::InvalidToken => (401, 4100),
            DenyReason::Forbidden => (403, 4101),
            DenyReason::RouteNotAllowed => (404, 4200),
            DenyReason::BodyTooLarge => (413, 4000),
            DenyReason::BadRequest => (400, 4000),
            DenyReason::QuotaExhausted => (429, 4028),
            DenyReason::RateLimited => (429, 4013),
            DenyReason::QuotaUnavailable => (503, 5000),
            DenyReason::UpstreamUnavailable => (502, 5000),
            DenyReason::UpstreamTimeout => (504, 5000),
            DenyReason::ShuttingDown => (503, 5000),
        }
    }

    /// All reasons, for pre-registering metric label values.
    pub const ALL: [DenyReason; 12] = [
        DenyReason::MissingToken,
        DenyReason::InvalidToken,
        DenyReason::RouteNotAllowed,
        DenyReason::Forbidden,
        DenyReason::BodyTooLarge,
        DenyReason::BadRequest,
        DenyReason::QuotaExhausted,
        DenyReason::RateLimited,
        DenyReason::QuotaUnavailable,
        DenyReason::UpstreamUnavailable,
        DenyReason::UpstreamTimeout,
        DenyReason::ShuttingDown,
    ];
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refusal with the facts needed to answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    /// A short, secret-free message for the device.
    pub message: &'static str,
    /// Seconds until retrying can succeed (`Retry-After`), when known.
    pub retry_after_s: Option<u64>,
}

impl Denial {
    pub fn new(reason: DenyReason, message: &'static str) -> Denial {
        Denial {
            reason,
            message,
            retry_after_s: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Denial {
        self.retry_after_s = Some(seconds);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_statuses_match_design() {
        let mut codes: Vec<_> = DenyReason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), DenyReason::ALL.len());
        assert_eq!(DenyReason::InvalidToken.status_and_code(), (401, 4100));
        assert_eq!(DenyReason::QuotaExhausted.status_and_code(), (429, 4028));
        assert_eq!(DenyReason::RateLimited.status_and_code(), (429, 4013));
        assert_eq!(DenyReason::BodyTooLarge.status_and_code(), (413, 4000));
    }
}
