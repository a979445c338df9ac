//! Per-request state, grouped by concern.

use std::time::Instant;

use policy::decision::DenyReason;

use super::admit::Admission;

/// How the response is being relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Rest,
    Sse,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Rest => "rest",
            Protocol::Sse => "sse",
        }
    }
}

pub struct RequestCtx {
    /// The device the connection's client certificate names (device TLS with
    /// `bind_device`), handed over by the listener (`Gateway::on_connection_reuse`).
    pub cert_device: Option<crate::device_tls::CertDevice>,
    /// The gateway's log id for this request (`X-Tt-Logid` unless upstream sent one).
    pub logid: String,
    pub started: Instant,
    /// Wall clock at `started`, unix milliseconds: the time admission (token lifetime, rate
    /// limit, quota windows) judges the request at, read once with the log id's.
    pub started_unix_ms: u64,
    pub admission: Option<Admission>,
    pub denied: Option<DenyReason>,
    pub protocol: Protocol,
    pub first_byte_at: Option<Instant>,
    /// The upstream's `X-Tt-Logid`, for the access log: a clone of pingora's parsed value (a
    /// reference to the response head's buffer, no copy).
    pub upstream_logid: Option<http::HeaderValue>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// A quota hold was taken under `logid` and must be settled (at the end of the upstream
    /// body, or in `logging` if the body never ended).
    pub quota_held: bool,
    /// The meter chosen from the upstream's answer.
    pub meter: super::meter::RequestMeter,
    /// The meter's result, once the upstream body has ended.
    pub metered: Option<super::meter::Metered>,
    /// Status of the upstream's answer (`response_filter`; 0 before it). The device's copy
    /// of the header may not be written yet when the body ends.
    pub response_status: u16,
    /// Keep a copy of the request body (bounded) for metering (`/v1/audio/speech` input).
    pub capture_request: bool,
    pub request_copy: Vec<u8>,
    /// The body held back until its `bot_id` is checked (bot-restricted devices on chat and
    /// workflow routes, `[access]`).
    pub body_bot: Option<Box<super::access::BodyBotCheck>>,
    /// A route answered by the gateway itself (`"token"`), for metrics and logs.
    pub local_route: Option<&'static str>,
    /// Set once the SSE-stream gauge was incremented (so `logging` decrements it once).
    pub sse_counted: bool,
}

impl RequestCtx {
    /// A request that started at `unix_ms` (wall clock), logged under `logid`.
    pub fn new(logid: String, unix_ms: u64) -> RequestCtx {
        RequestCtx {
            logid,
            started: Instant::now(),
            started_unix_ms: unix_ms,
            admission: None,
            denied: None,
            protocol: Protocol::Rest,
            first_byte_at: None,
            upstream_logid: None,
            request_bytes: 0,
            response_bytes: 0,
            sse_counted: false,
            local_route: None,
            meter: Default::default(),
            metered: None,
            response_status: 0,
            quota_held: false,
            capture_request: false,
            request_copy: Vec::new(),
            body_bot: None,
            cert_device: None,
        }
    }

    /// The route class, once admission resolved one.
    pub fn route_class(&self) -> Option<policy::route::RouteClass> {
        self.admission.as_ref().map(|a| a.route.class)
    }
}
