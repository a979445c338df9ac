//! The REST/SSE proxy: pingora's [`ProxyHttp`] as a phase map. Each phase reads what it needs
//! from the session, calls a named module, and acts on the typed answer.
//!
//! | phase | module | what happens |
//! |---|---|---|
//! | `on_connection_reuse` | here | the client certificate's device (device TLS), from the listener |
//! | `request_filter` | here | draining: `Connection: close` on every answer |
//! | `request_filter` | [`crate::oauth`] | the device token endpoint, answered locally |
//! | `request_filter` | [`admit`] / [`respond`] | route, token, [`access`] policy (path), body limit; denials answered here |
//! | `request_filter` | [`crate::quota`] | quota hold (429 / 4028 when a rule is exhausted); `GET /v1/gateway/quota` |
//! | `request_body_filter` | here, [`access`] | streamed body size enforced for chunked uploads; bodies of bot-restricted devices held back until their `bot_id` is checked |
//! | `upstream_peer` | [`upstream::peer`] | upstream address and per-route timeouts |
//! | `upstream_request_filter` | [`upstream::rewrite`] | upstream credentials, `X-Coze-DeviceInfo`, `Host` |
//! | `response_filter` | here | `X-Tt-Logid`, SSE detection from the upstream's content type |
//! | `response_body_filter` | here, [`settle::end_of_body`] | total-time limit, byte counts (chunks pass unchanged); quota settled when the upstream body ends |
//! | `fail_to_proxy` | [`respond`] | upstream failures → 502/504, a refused body's bot → 403, in Coze's envelope |
//! | `logging` | [`settle::finish`] | metrics, the access log, and settling what did not end |
//!
//! WebSocket upgrades never reach this impl: `crate::listener` hands them to `crate::ws`.

pub mod access;
pub mod admit;
pub mod ctx;
pub mod meter;
pub mod respond;
pub mod settle;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use policy::decision::{Denial, DenyReason};

use ctx::{Protocol, RequestCtx};

use crate::state::{SharedState, now_ms};
use crate::upstream::ResolvedUpstream;

pub struct Gateway {
    pub state: SharedState,
    pub rest: Arc<ResolvedUpstream>,
}

impl Gateway {
    async fn deny(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        denial: Denial,
    ) -> Result<bool> {
        ctx.denied = Some(denial.reason);
        respond::deny(session, &denial, &ctx.logid).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules. pingora's default adds its response compression module at
    /// level 0 (off), which still builds a context and runs its filters on every request (5
    /// of the gateway's allocations per request, `load instr`); fleetgate passes the
    /// upstream's encoding through and never compresses.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// The listener hands each request its connection's certificate device (device TLS)
    /// as pingora's per-connection user context, which arrives here.
    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        connection: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Ok(cert) = connection.downcast::<crate::device_tls::CertDevice>() {
            ctx.cert_device = Some(*cert);
        }
    }

    fn new_ctx(&self) -> RequestCtx {
        let now_ms = now_ms();
        RequestCtx::new(crate::logid::new_logid(now_ms), now_ms)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if !self.state.is_ready() {
            // Draining (SIGTERM): answer, then close, so keep-alive clients reconnect to
            // a node that is staying. Set here, after pingora read the request: its
            // keep-alive choice from the request's own headers would override it earlier.
            session.set_keepalive(None);
        }
        if crate::oauth::is_token_path(session.req_header().uri.path()) {
            return crate::oauth::serve(&self.state, session, ctx).await;
        }
        let req = session.req_header();
        let content_length = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let token = admit::bearer(
            req.headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        let path = req.uri.path();
        if path == "/v1/gateway/quota" {
            let token = token.map(str::to_owned);
            let cert = ctx.cert_device.clone();
            return crate::quota_api::device_quota(
                &self.state,
                session,
                ctx,
                token.as_deref(),
                cert.as_ref(),
            )
            .await;
        }
        let capture_request = path == "/v1/audio/speech";
        let now_s = ctx.started_unix_ms / 1000;
        let cert = ctx.cert_device.as_ref();
        let (admission, bots) =
            match admit::admit(&self.state, path, token, cert, content_length, now_s) {
                Ok(a) => a,
                Err(denial) => return self.deny(session, ctx, denial).await,
            };
        let body_bot = access::BodyBotCheck::for_request(&bots, path);
        if let Err(denial) = self.state.rate_limits().admit(
            &admission.device,
            admission.route.class,
            ctx.started_unix_ms,
        ) {
            ctx.admission = Some(admission);
            return self.deny(session, ctx, denial).await;
        }
        if let Err(denial) = self
            .state
            .quotas
            .admit(&ctx.logid, &admission.device, admission.route.class, now_s)
            .await
        {
            ctx.admission = Some(admission);
            return self.deny(session, ctx, denial).await;
        }
        ctx.quota_held = true;
        ctx.body_bot = body_bot;
        ctx.capture_request = capture_request;
        ctx.admission = Some(admission);
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.request_bytes += b.len() as u64;
            if ctx.capture_request && ctx.request_copy.len() + b.len() <= meter::MAX_SPEECH_REQUEST
            {
                ctx.request_copy.extend_from_slice(b);
            }
        }
        let limit = ctx.admission.as_ref().map_or(0, |a| a.route.body_limit);
        if ctx.request_bytes > limit {
            ctx.denied = Some(DenyReason::BodyTooLarge);
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "request body over the route limit",
            );
        }
        match &mut ctx.body_bot {
            Some(check) => check.filter(body, end_of_stream),
            None => Ok(()),
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(upstream::peer(
            &self.rest,
            &self.state.config.upstream,
            session.req_header().uri.path(),
        ))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let admission = ctx
            .admission
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no admission"))?;
        let auth = self
            .state
            .upstream_auth
            .authorization(&admission.device)
            .await
            .map_err(|e| {
                tracing::warn!(request_id = %ctx.logid, device_id = %admission.device, error = %e, "No upstream credential.");
                Error::explain(ErrorType::Custom("upstream_credentials"), "upstream credentials unavailable")
            })?;
        self.state
            .metrics
            .per_request
            .overhead(admission.route.class, ctx.started.elapsed().as_secs_f64());
        upstream::rewrite(req, &self.rest, &auth, admission)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.first_byte_at = Some(Instant::now());
        ctx.response_status = resp.status.as_u16();
        // The upstream's own log id passes through; one that is missing or not text is
        // replaced by ours.
        match resp.headers.get("x-tt-logid") {
            Some(up) if up.to_str().is_ok() => ctx.upstream_logid = Some(up.clone()),
            _ => resp.insert_header("X-Tt-Logid", &ctx.logid)?,
        }
        let content_type = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let is_sse = content_type.starts_with("text/event-stream");
        ctx.meter = meter::RequestMeter::for_answer(
            session.req_header().uri.path(),
            resp.status.as_u16(),
            content_type,
            &ctx.request_copy,
        );
        if is_sse {
            ctx.protocol = Protocol::Sse;
            ctx.sse_counted = true;
            self.state.metrics.sse_streams.inc();
            resp.insert_header("x-accel-buffering", "no")?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(b) = body {
            ctx.response_bytes += b.len() as u64;
            ctx.meter.feed(b);
        }
        if ctx.started.elapsed() > self.state.config.upstream.total_timeout {
            return Error::e_explain(ErrorType::ReadTimedout, "total request time exceeded");
        }
        if end_of_stream && ctx.metered.is_none() {
            settle::end_of_body(&self.state, ctx);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // Once the answer has started (an SSE stream cut by a timeout or an upstream reset),
        // nothing more may be written into it: the connection is closed without the final
        // chunk, which clients see as a broken stream, never as a JSON body inside the events.
        let started = session.response_written().is_some();
        let refused = ctx.body_bot.as_mut().and_then(|c| c.refused.take());
        let denial = refused
            .filter(|_| e.etype() == &access::FORBIDDEN)
            .or_else(|| respond::denial_for_error(e))
            .filter(|_| !started);
        let code = match denial {
            Some(d) => {
                ctx.denied = Some(d.reason);
                // The connection is not reused (below): say so, so the device does not send
                // its next request into a closing connection.
                session.set_keepalive(None);
                if let Err(we) = respond::deny(session, &d, &ctx.logid).await {
                    tracing::debug!(error = %we, "Could not write the error response.");
                }
                d.reason.status_and_code().0
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A device hanging up mid-request is normal on mobile networks: it is counted and in the
    /// access log, not an ERROR line.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
            )
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        settle::finish(&self.state, session, e, ctx);
    }
}
