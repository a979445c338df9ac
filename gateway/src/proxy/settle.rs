//! End of a proxied request: quota settlement, metrics and the access-log line.
//!
//! The quota is settled as soon as the upstream body ends ([`end_of_body`], before pingora
//! writes the last bytes to the device), so a device that sends its next request the moment
//! it has read this answer never meets this request's hold. Everything else runs in
//! pingora's `logging` phase ([`finish`]), which is called for every request, including
//! failed ones, and settles whatever was not settled yet.

use pingora::prelude::*;

use super::ctx::RequestCtx;
use crate::state::GatewayState;

/// The upstream body is complete: finish the meter and settle the quota now.
pub fn end_of_body(state: &GatewayState, ctx: &mut RequestCtx) {
    let metered = std::mem::take(&mut ctx.meter).finish();
    settle_quota(state, ctx.response_status, None, ctx, &metered);
    ctx.metered = Some(metered);
}

/// Settles the request's hold, once: refunded when the upstream refused, the hold (or more,
/// if measured) when the answer was cut short or carried no usage, else what was metered.
fn settle_quota(
    state: &GatewayState,
    status: u16,
    e: Option<&Error>,
    ctx: &mut RequestCtx,
    metered: &super::meter::Metered,
) {
    if ctx.quota_held
        && let Some(a) = &ctx.admission
    {
        let measured = policy::quota::Consumption {
            usage: metered.usage,
            requests: 1,
            voice_session_ms: 0,
        };
        let outcome = if !(200..300).contains(&status) {
            // The upstream refused (or nothing was answered): no charge.
            crate::quota::Outcome::Refund
        } else if e.is_some() || metered.missing_usage || metered.estimated {
            // Cut short (device gone mid-stream), no usage report, or an answer that never
            // carries one (non-streaming chat): charge the hold.
            crate::quota::Outcome::Estimate(measured)
        } else {
            crate::quota::Outcome::Consumed(measured)
        };
        state.quotas.settle(
            &ctx.logid,
            &a.device,
            a.route.class,
            outcome,
            crate::state::now_s(),
        );
        ctx.quota_held = false;
    }
}

pub fn finish(
    state: &GatewayState,
    session: &mut Session,
    e: Option<&Error>,
    ctx: &mut RequestCtx,
) {
    let m = &state.metrics;
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let class = ctx.route_class();
    let route = crate::metrics::route_label(class);
    let proto = ctx.protocol.as_str();
    let per = &m.per_request;
    per.count(class, ctx.protocol, status);
    if let Some(reason) = ctx.denied {
        m.denials.with_label_values(&[reason.code()]).inc();
    }
    let elapsed = ctx.started.elapsed();
    per.duration(class, ctx.protocol, elapsed.as_secs_f64());
    if let Some(fb) = ctx.first_byte_at {
        per.first_byte(class, ctx.protocol, (fb - ctx.started).as_secs_f64());
    }
    per.relayed(ctx.request_bytes, ctx.response_bytes);
    let metered = match ctx.metered.take() {
        Some(done) => done,
        None => std::mem::take(&mut ctx.meter).finish(),
    };
    if ctx.admission.is_some() && status > 0 && status < 300 {
        crate::metrics::record_usage(m, &metered.usage, 0);
    }
    settle_quota(state, status, e, ctx, &metered);
    if metered.missing_usage {
        m.usage_missing.with_label_values(&[proto]).inc();
    }
    if metered.error {
        m.metering_errors.with_label_values(&[proto]).inc();
    }
    if ctx.sse_counted {
        m.sse_streams.dec();
        ctx.sse_counted = false;
    }
    if let Some(err) = e
        && ctx.denied.is_none()
    {
        m.upstream_errors
            .with_label_values(&[crate::metrics::error_kind(err)])
            .inc();
    }
    if state.config.log.access_log {
        let req = session.req_header();
        tracing::info!(
            target: "access",
            request_id = %ctx.logid,
            device_id = ctx.admission.as_ref().map(|a| a.device.as_str()).unwrap_or("-"),
            method = %req.method,
            path = req.uri.path(),
            route,
            protocol = proto,
            status,
            deny_reason = ctx.denied.map(|d| d.code()).unwrap_or("-"),
            upstream_logid = ctx
                .upstream_logid
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            request_bytes = ctx.request_bytes,
            response_bytes = ctx.response_bytes,
            llm_input_tokens = metered.usage.llm_input_tokens,
            llm_output_tokens = metered.usage.llm_output_tokens,
            audio_in_ms = metered.usage.audio_in_ms,
            audio_out_ms = metered.usage.audio_out_ms,
            tts_chars = metered.usage.tts_chars,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            error = e.map(|e| e.etype().as_str()).unwrap_or("-"),
        );
    }
}
