//! fleetgate's own WebSocket path: admission, the upstream handshake, and a byte relay.
//!
//! Frames pass unchanged in both directions and are flushed as soon as they are read; close
//! frames therefore pass at once. The relay follows frame boundaries ([`frames::FrameCursor`])
//! so that it can inject frames of its own only between frames:
//! - on drain (SIGTERM) the device gets `close 1001` with a reconnect hint, the upstream a
//!   masked `close 1001`;
//! - when the upstream has been silent for `websocket.ping_interval`, it gets a masked ping
//!   (keeps NATs and upstream idle timers from cutting long voice sessions).
//!
//! Once the gateway has sent its own close frame to a side, nothing more is relayed to that
//! side (RFC 6455 §5.5.1), not even the other side's close: the device's later bytes are
//! dropped, the upstream's are metered (the platform bills them) and dropped.
//!
//! Nothing cuts a session for being idle: device reads have no timeout. (A quota rule on
//! session time still runs out while a `/v1/chat` session idles: such sessions report to
//! the ledger every second and are cut with `error` 4028 when it does.)
//!
//! `permessage-deflate`: `Sec-WebSocket-Extensions` is removed from the upstream handshake, so
//! no extension is ever negotiated and frame payloads are the application's bytes (exact
//! metering, no per-session inflate state).
//!
//! Memory per idle session: the two sockets' user-space state and this task. Relay read
//! buffers (`websocket.buffer_bytes`) are lent per read from a per-thread pool ([`lent`]), so
//! an idle session holds none; the handshake buffers are freed before relaying.

pub mod frames;
pub mod lent;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pingora::protocols::Stream;
use policy::decision::{Denial, DenyReason};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proxy::admit;
use crate::proxy::respond;
use crate::state::{Phase, SharedState, now_ms};
use crate::upstream::ResolvedUpstream;
use frames::FrameCursor;
pub use upstream::{UpstreamIo, tls_client_config};

/// How long a closing side may take to answer a close before the connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How often a `/v1/chat` session reports to the ledger, idle or not, while its device has a
/// rule that charges session time (DESIGN §6: overshoot ≤ 1 s for audio and time).
const SESSION_TIME_REPORT: Duration = Duration::from_secs(1);
/// Reason sent with `1001` on drain: clients should reconnect (to another node).
pub const DRAIN_REASON: &str = "gateway shutting down; reconnect";

pub struct WsRelay {
    pub state: SharedState,
    pub upstream: Arc<ResolvedUpstream>,
    tls: Arc<tokio_rustls::TlsConnector>,
}

/// The parts of the device's handshake the relay needs.
struct DeviceRequest {
    path: String,
    query: String,
    headers: Vec<(String, Vec<u8>)>,
    /// Bytes the device sent after its head (frames sent before our 101).
    early: Vec<u8>,
}

fn parse_request(head: &[u8]) -> Option<DeviceRequest> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut hs);
    let httparse::Status::Complete(n) = req.parse(head).ok()? else {
        return None;
    };
    let target = req.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(DeviceRequest {
        path: path.to_owned(),
        query: query.to_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect(),
        early: head.get(n..).unwrap_or_default().to_vec(),
    })
}

impl DeviceRequest {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// What ended a relay, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndedBy {
    Device,
    Upstream,
    Drain,
    Revoked,
    Quota,
}

impl EndedBy {
    fn label(self) -> &'static str {
        match self {
            EndedBy::Device => "device",
            EndedBy::Upstream => "upstream",
            EndedBy::Drain => "drain",
            EndedBy::Revoked => "revoked",
            EndedBy::Quota => "quota",
        }
    }
}

impl WsRelay {
    pub fn new(state: SharedState, upstream: Arc<ResolvedUpstream>) -> WsRelay {
        WsRelay {
            state,
            upstream,
            tls: Arc::new(upstream::tls_connector()),
        }
    }

    /// How often an open session refreshes its quota hold at the latest.
    fn hold_refresh(&self) -> std::time::Duration {
        self.state.config.quota.hold_ttl / 3
    }

    /// Drops the session's quota hold: the upstream refused or never answered, nothing was
    /// served.
    fn refund(&self, logid: &str, admission: &admit::Admission) {
        self.state.quotas.settle(
            logid,
            &admission.device,
            admission.route.class,
            crate::quota::Outcome::Refund,
            now_ms() / 1000,
        );
    }

    async fn refuse(&self, device: &mut Stream, denial: &Denial, logid: &str) {
        self.state
            .metrics
            .denials
            .with_label_values(&[denial.reason.code()])
            .inc();
        let route = policy::route::RouteClass::Voice.as_str();
        let (status, _, _) = respond::parts(denial, logid);
        self.state
            .metrics
            .requests
            .with_label_values(&[route, "websocket", crate::metrics::status_class(status)])
            .inc();
        let bytes = respond::raw_http1(denial, logid);
        if device.write_all(&bytes).await.is_ok() {
            let _ = device.flush().await;
        }
        close(device).await;
    }

    /// Admission for an upgrade request: the token from the header or the query, the
    /// device the connection's client certificate names (device TLS), and the access policy's
    /// bot rule against the query's `bot_id` (`/v1/chat`). Not async, so none of
    /// its temporaries live in the session's future (`session_future_stays_small`).
    fn admit(&self, device: &Stream, req: &DeviceRequest) -> Result<admit::Admission, Denial> {
        let token = admit::bearer(req.header("authorization"))
            .map(str::to_owned)
            .or_else(|| admit::bearer_from_query(&req.query));
        let (admission, bots) = admit::admit(
            &self.state,
            &req.path,
            token.as_deref(),
            crate::device_tls::connection_cert_device(device).as_ref(),
            None,
            now_ms() / 1000,
        )?;
        crate::proxy::access::check_ws_query(&bots, &req.path, &req.query)?;
        Ok(admission)
    }

    /// Serves one upgrade request whose head (and any bytes after it) is in `head`.
    pub async fn serve(&self, mut device: Stream, head: BytesMut) {
        let logid = crate::logid::new_logid(now_ms());
        let Some(req) = parse_request(&head) else {
            return self
                .refuse(
                    &mut device,
                    &Denial::new(DenyReason::BadRequest, "malformed request"),
                    &logid,
                )
                .await;
        };
        drop(head);
        if self.state.phase() == Phase::Draining {
            let d = Denial::new(DenyReason::ShuttingDown, "gateway shutting down; reconnect")
                .retry_after(1);
            return self.refuse(&mut device, &d, &logid).await;
        }
        let admission = match self.admit(&device, &req) {
            Ok(a) => a,
            Err(d) => return self.refuse(&mut device, &d, &logid).await,
        };
        let started = Instant::now();
        let cfg = &self.state.config;
        let class = admission.route.class;
        if let Err(d) = self
            .state
            .rate_limits()
            .admit(&admission.device, class, now_ms())
        {
            return self.refuse(&mut device, &d, &logid).await;
        }
        if let Err(d) = self
            .state
            .quotas
            .admit(&logid, &admission.device, class, now_ms() / 1000)
            .await
        {
            return self.refuse(&mut device, &d, &logid).await;
        }
        let auth = match self
            .state
            .upstream_auth
            .authorization(&admission.device)
            .await
        {
            // Boxed: it lives across the handshake's await, and the session future's size is
            // part of the per-session memory budget (`session_future_stays_small`).
            Ok(a) => Box::new(a),
            Err(e) => {
                self.refund(&logid, &admission);
                tracing::warn!(request_id = %logid, device_id = %admission.device, error = %e, "No upstream credential.");
                let d = Denial::new(DenyReason::UpstreamUnavailable, "upstream unavailable");
                return self.refuse(&mut device, &d, &logid).await;
            }
        };
        let conn = tokio::time::timeout(
            cfg.ws.handshake_timeout,
            upstream::connect_and_handshake(
                &self.upstream,
                &self.tls,
                &cfg.upstream,
                upstream::UpgradeRequest {
                    path: &req.path,
                    query: &admit::strip_authorization_param(&req.query),
                    headers: &req.headers,
                    auth: &auth,
                    device: admission.device.as_str(),
                },
            ),
        )
        .await;
        let mut up = match conn {
            Ok(Ok(up)) => up,
            Ok(Err(e)) => {
                self.refund(&logid, &admission);
                tracing::warn!(request_id = %logid, error = %e, "Upstream WebSocket handshake failed.");
                self.state
                    .metrics
                    .upstream_errors
                    .with_label_values(&["connect"])
                    .inc();
                let d = Denial::new(DenyReason::UpstreamUnavailable, "upstream unavailable");
                return self.refuse(&mut device, &d, &logid).await;
            }
            Err(_) => {
                // Nothing was served: no charge, like every other upstream failure.
                self.refund(&logid, &admission);
                tracing::warn!(request_id = %logid, timeout = ?cfg.ws.handshake_timeout, "Upstream WebSocket handshake timed out.");
                self.state
                    .metrics
                    .upstream_errors
                    .with_label_values(&["timeout"])
                    .inc();
                let d = Denial::new(DenyReason::UpstreamTimeout, "upstream timed out");
                return self.refuse(&mut device, &d, &logid).await;
            }
        };
        // Forward the upstream's answer head (101 or an error) to the device.
        let head_out = upstream::response_head_for_device(&up.head, &logid);
        if device.write_all(&head_out).await.is_err() || device.flush().await.is_err() {
            return;
        }
        let status = up.status;
        let route = admission.route.class.as_str();
        if status != 101 {
            self.refund(&logid, &admission);
            // Relay the error body (bounded) and finish.
            if let Err(e) =
                relay_error_body(&mut up.io, &mut device, up.rest, up.content_length).await
            {
                tracing::debug!(request_id = %logid, error = %e, "Could not relay the upstream's refusal.");
            }
            close(&mut device).await;
            self.state
                .metrics
                .requests
                .with_label_values(&[route, "websocket", crate::metrics::status_class(status)])
                .inc();
            return;
        }
        // Free everything the handshake needed before the (possibly hours-long) relay.
        let upstream::Handshaken {
            io: mut up_io,
            rest: early_down,
            ..
        } = up;
        let DeviceRequest {
            path,
            early: early_up,
            ..
        } = req;
        let m = &self.state.metrics;
        m.ws_sessions.inc();
        let mut counters = Counters::default();
        let ended = self
            .relay(
                &mut device,
                &mut up_io,
                Session {
                    admission: &admission,
                    logid: &logid,
                    started,
                    early_up,
                    early_down,
                },
                &mut counters,
            )
            .await;
        m.ws_sessions.dec();
        m.ws_closed.with_label_values(&[ended.label()]).inc();
        m.requests
            .with_label_values(&[route, "websocket", "1xx"])
            .inc();
        m.relayed_bytes
            .with_label_values(&["uplink"])
            .inc_by(counters.up);
        m.relayed_bytes
            .with_label_values(&["downlink"])
            .inc_by(counters.down);
        m.duration
            .with_label_values(&[route, "websocket"])
            .observe(started.elapsed().as_secs_f64());
        // Session time ends when the gateway starts closing the session itself (quota cut,
        // drain, revocation): the close handshake after that (≤ CLOSE_WAIT) is not service.
        let session_end = counters.closing_since.unwrap_or_else(Instant::now);
        let session_ms = session_end.saturating_duration_since(started).as_millis() as u64;
        let voice_session_ms = if path == "/v1/chat" { session_ms } else { 0 };
        let usage = counters.meter.usage();
        crate::metrics::record_usage(m, &usage, voice_session_ms);
        for (dir, label) in [
            (policy::metering::Direction::Uplink, "uplink"),
            (policy::metering::Direction::Downlink, "downlink"),
        ] {
            m.ws_frames
                .with_label_values(&[label])
                .inc_by(counters.meter.parser(dir).frames());
        }
        let consumed = policy::quota::Consumption {
            usage,
            requests: 1,
            voice_session_ms,
        };
        // Chat turns whose usage never came (no usage event, or cut: device gone, quota,
        // drain, upstream lost) are charged the chat estimate each, never nothing, and
        // counted like SSE streams without usage.
        let unreported_turns = counters.meter.unreported_turns();
        let outcome = if unreported_turns > 0 {
            m.usage_missing
                .with_label_values(&["websocket"])
                .inc_by(unreported_turns);
            crate::quota::Outcome::UnreportedTurns {
                measured: consumed,
                turns: unreported_turns,
            }
        } else {
            crate::quota::Outcome::Consumed(consumed)
        };
        self.state
            .quotas
            .settle(&logid, &admission.device, class, outcome, now_ms() / 1000);
        if counters.meter_failed {
            m.metering_errors.with_label_values(&["websocket"]).inc();
        }
        if cfg.log.access_log {
            tracing::info!(
                target: "access",
                request_id = %logid,
                device_id = admission.device.as_str(),
                method = "GET",
                path = %path,
                route,
                protocol = "websocket",
                status = 101,
                ended_by = ended.label(),
                request_bytes = counters.up,
                response_bytes = counters.down,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                llm_input_tokens = usage.llm_input_tokens,
                llm_output_tokens = usage.llm_output_tokens,
                audio_in_ms = usage.audio_in_ms,
                audio_out_ms = usage.audio_out_ms,
                tts_chars = usage.tts_chars,
                voice_session_ms,
                unreported_turns,
            );
        }
    }

    /// Whether this `/v1/chat` session's wall time counts against a rule of its device now
    /// or later (then it is reported every second, idle or not).
    fn session_time_limited(&self, device: &policy::ids::DeviceId) -> bool {
        self.state
            .quotas
            .meters_session_time(device, now_ms() / 1000)
    }

    /// Reports the session's consumption to the ledger when it changed, at least every third
    /// of `quota.hold_ttl` (so the hold of an idle session is never swept), and every second
    /// while a rule charges the session's wall time; true once the session itself has
    /// exhausted a rule (the relay then sends `error` 4028 and closes both sides).
    async fn quota_exhausted(
        &self,
        logid: &str,
        device: &policy::ids::DeviceId,
        counters: &Counters,
        last: &mut Reported,
    ) -> bool {
        let usage = counters.meter.usage();
        let now = tokio::time::Instant::now();
        if usage == last.usage && now < last.at + last.every(self.hold_refresh()) {
            return false;
        }
        last.usage = usage;
        last.at = now;
        let voice_session_ms = if last.voice {
            last.started.elapsed().as_millis() as u64
        } else {
            0
        };
        let so_far = policy::quota::Consumption {
            usage,
            requests: 1,
            voice_session_ms,
        };
        self.state
            .quotas
            .progress_leased(logid, &so_far, device, now_ms() / 1000)
            .await
            .is_err()
    }

    /// Relays until either side closes. `early_up`: device bytes already read; `early_down`:
    /// upstream bytes read after its 101 (these are the frames pingora #946 loses).
    async fn relay(
        &self,
        device: &mut Stream,
        up: &mut UpstreamIo,
        session: Session<'_>,
        counters: &mut Counters,
    ) -> EndedBy {
        let Session {
            admission,
            logid,
            started,
            early_up,
            early_down,
        } = session;
        let voice = admission.route.class == policy::route::RouteClass::Voice;
        let mut last_checked = Reported {
            usage: policy::metering::Usage::default(),
            at: tokio::time::Instant::now(),
            voice,
            started,
            timed: voice && self.session_time_limited(&admission.device),
        };
        let cfg = &self.state.config.ws;
        let mut upc = FrameCursor::default();
        let mut downc = FrameCursor::default();
        if !early_down.is_empty() {
            downc.feed(&early_down);
            counters.downlink(&early_down);
            if device.write_all(&early_down).await.is_err() || device.flush().await.is_err() {
                return EndedBy::Device;
            }
        }
        if !early_up.is_empty() {
            upc.feed(&early_up);
            counters.uplink(&early_up);
            if up.write_all(&early_up).await.is_err() || up.flush().await.is_err() {
                return EndedBy::Upstream;
            }
        }
        drop((early_up, early_down));
        let mut phase = self.state.watch_phase();
        let mut checks = self.state.devices.watch_session_checks();
        let mut closing = (*phase.borrow() == Phase::Draining).then_some(Closing::Drain);
        if !admit::still_valid(&self.state, admission) {
            closing = Some(Closing::Revoked);
        }
        let mut sent_error = false;
        let mut sent_close_down = false;
        let mut sent_close_up = false;
        let mut close_deadline: Option<tokio::time::Instant> = None;
        let ping_every = cfg.ping_interval;
        let mut last_up_rx = tokio::time::Instant::now();
        // Boxed: the session future stays small (see `session_future_stays_small`).
        let mut refresh = Box::pin(tokio::time::sleep_until(
            last_checked.at + last_checked.every(self.hold_refresh()),
        ));
        loop {
            let refresh_at = last_checked.at + last_checked.every(self.hold_refresh());
            if refresh.deadline() != refresh_at {
                refresh.as_mut().reset(refresh_at);
            }
            // Inject closing frames, only where the protocol allows: an `error` event between
            // messages, close frames between frames.
            if let Some(c) = closing {
                counters.closing_since.get_or_insert_with(Instant::now);
                if let Some((code, msg)) = c.error_event()
                    && !sent_error
                    && !downc.saw_close
                    && downc.at_message_boundary()
                {
                    let f = frames::text_frame(&error_event(logid, code, msg));
                    if device.write_all(&f).await.is_err() || device.flush().await.is_err() {
                        return c.ended_by();
                    }
                    sent_error = true;
                }
                let error_done = c.error_event().is_none() || sent_error;
                if error_done && !sent_close_down && !downc.saw_close && downc.at_boundary() {
                    let f = frames::close_frame(c.device_code(), c.device_reason());
                    if device.write_all(&f).await.is_err() || device.flush().await.is_err() {
                        return c.ended_by();
                    }
                    sent_close_down = true;
                }
                if !sent_close_up && !upc.saw_close && upc.at_boundary() {
                    let f = frames::masked_close(c.upstream_code(), c.upstream_reason());
                    if up.write_all(&f).await.is_err() || up.flush().await.is_err() {
                        return c.ended_by();
                    }
                    sent_close_up = true;
                }
                close_deadline.get_or_insert_with(|| tokio::time::Instant::now() + CLOSE_WAIT);
            }
            let ping_at = ping_every.map(|p| last_up_rx + p);
            let deadline = close_deadline;
            tokio::select! {
                r = lent::read_lent(device, cfg.buffer_bytes) => {
                    let chunk = match r { Ok(c) if !c.is_empty() => c, _ => {
                        close(up).await;
                        return closing.map_or(EndedBy::Device, Closing::ended_by);
                    } };
                    if sent_close_up {
                        // The gateway closed the upstream side (drain, revocation, quota):
                        // nothing more may follow its close frame; the device's bytes are
                        // dropped while its own close is awaited.
                        continue;
                    }
                    upc.feed(&chunk);
                    counters.uplink(&chunk);
                    if closing.is_none() && self.quota_exhausted(logid, &admission.device, counters, &mut last_checked).await {
                        closing = Some(Closing::QuotaExhausted);
                    }
                    if up.write_all(&chunk).await.is_err() || up.flush().await.is_err() {
                        close(device).await;
                        return EndedBy::Upstream;
                    }
                }
                r = lent::read_lent(up, cfg.buffer_bytes) => {
                    let chunk = match r { Ok(c) if !c.is_empty() => c, _ => {
                        // The upstream went away without a close frame: tell the device
                        // properly (1011) when the stream is between frames.
                        if !downc.saw_close && !sent_close_down && downc.at_boundary() {
                            let f = frames::close_frame(1011, "upstream connection lost");
                            if device.write_all(&f).await.is_ok() {
                                let _flushed = device.flush().await;
                            }
                        }
                        close(device).await;
                        return closing.map_or(EndedBy::Upstream, Closing::ended_by);
                    } };
                    last_up_rx = tokio::time::Instant::now();
                    if sent_close_down {
                        // The gateway closed the device's side (drain, revocation, quota):
                        // nothing more may follow its close frame (RFC 6455 §5.5.1), not even
                        // the upstream's close. What the upstream still sends is metered (it
                        // was produced and is billed) but dropped.
                        counters.meter_downlink(&chunk);
                        continue;
                    }
                    downc.feed(&chunk);
                    counters.downlink(&chunk);
                    if closing.is_none() && self.quota_exhausted(logid, &admission.device, counters, &mut last_checked).await {
                        closing = Some(Closing::QuotaExhausted);
                    }
                    if device.write_all(&chunk).await.is_err() || device.flush().await.is_err() {
                        close(up).await;
                        return EndedBy::Device;
                    }
                }
                _ = phase.changed(), if closing.is_none() => {
                    if *phase.borrow() == Phase::Draining {
                        closing = Some(Closing::Drain);
                    }
                }
                _ = checks.changed(), if closing.is_none() => {
                    // A revocation, or a quota rule change (a rule that charges session time
                    // must reach idle sessions at once).
                    if !admit::still_valid(&self.state, admission) {
                        closing = Some(Closing::Revoked);
                    } else if voice {
                        last_checked.timed = self.session_time_limited(&admission.device);
                    }
                }
                _ = sleep_until_opt(ping_at), if ping_at.is_some() && closing.is_none() => {
                    last_up_rx = tokio::time::Instant::now();
                    if upc.at_boundary() && !upc.saw_close {
                        let f = frames::masked_frame(0x9, b"fleetgate");
                        if up.write_all(&f).await.is_err() || up.flush().await.is_err() {
                            close(device).await;
                            return EndedBy::Upstream;
                        }
                    }
                }
                _ = refresh.as_mut(), if closing.is_none() => {
                    if voice {
                        last_checked.timed = self.session_time_limited(&admission.device);
                    }
                    if self.quota_exhausted(logid, &admission.device, counters, &mut last_checked).await {
                        closing = Some(Closing::QuotaExhausted);
                    }
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    close(device).await;
                    close(up).await;
                    return closing.map_or(EndedBy::Drain, Closing::ended_by);
                }
            }
        }
    }
}

/// What a relay needs besides the two sockets.
struct Session<'a> {
    admission: &'a admit::Admission,
    logid: &'a str,
    /// When the session started (voice session time counts against quotas live).
    started: Instant,
    early_up: Vec<u8>,
    early_down: Vec<u8>,
}

/// Why the gateway is closing a session itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    /// SIGTERM: `1001` with a reconnect hint.
    Drain,
    /// The device's token was revoked (revoke, disable, delete): an `error` event with code
    /// 4100, then `1008`.
    Revoked,
    /// The session exhausted a quota rule: an `error` event with code 4028, then `1008`.
    QuotaExhausted,
}

impl Closing {
    fn device_code(self) -> u16 {
        match self {
            Closing::Drain => 1001,
            Closing::Revoked | Closing::QuotaExhausted => 1008,
        }
    }
    fn device_reason(self) -> &'static str {
        match self {
            Closing::Drain => DRAIN_REASON,
            Closing::Revoked => "access token revoked",
            Closing::QuotaExhausted => "quota exhausted",
        }
    }
    fn upstream_code(self) -> u16 {
        match self {
            Closing::Drain => 1001,
            Closing::Revoked | Closing::QuotaExhausted => 1000,
        }
    }
    fn upstream_reason(self) -> &'static str {
        match self {
            Closing::Drain => "gateway shutting down",
            Closing::Revoked => "device access revoked",
            Closing::QuotaExhausted => "device quota exhausted",
        }
    }
    /// The `error` event (code, message) the device gets before the close frame, if any.
    fn error_event(self) -> Option<(u32, &'static str)> {
        match self {
            Closing::Drain => None,
            Closing::Revoked => Some((4100, "access token revoked")),
            Closing::QuotaExhausted => Some((4028, "end-user quota exhausted")),
        }
    }

    fn ended_by(self) -> EndedBy {
        match self {
            Closing::Drain => EndedBy::Drain,
            Closing::Revoked => EndedBy::Revoked,
            Closing::QuotaExhausted => EndedBy::Quota,
        }
    }
}

/// A downlink `error` event (coze-api.md §8.2 shape) sent before the gateway closes a session.
fn error_event(logid: &str, code: u32, msg: &str) -> Vec<u8> {
    serde_json::json!({
        "id": logid,
        "event_type": "error",
        "data": {"code": code, "msg": msg},
        "detail": {"logid": logid},
    })
    .to_string()
    .into_bytes()
}

/// What a session relayed and consumed.
#[derive(Default)]
struct Counters {
    up: u64,
    down: u64,
    /// Usage read from the frames as they pass (policy::metering::WsSessionMeter).
    meter: policy::metering::WsSessionMeter,
    /// The meter hit a protocol error; usage after that point is not counted.
    meter_failed: bool,
    /// When the gateway started closing the session itself, if it did.
    closing_since: Option<Instant>,
}

impl Counters {
    fn uplink(&mut self, chunk: &[u8]) {
        self.up += chunk.len() as u64;
        if !self.meter_failed && self.meter.feed_uplink(chunk).is_err() {
            self.meter_failed = true;
        }
    }

    fn downlink(&mut self, chunk: &[u8]) {
        self.down += chunk.len() as u64;
        self.meter_downlink(chunk);
    }

    /// Meters upstream bytes that are not relayed (they arrived after the gateway's close).
    fn meter_downlink(&mut self, chunk: &[u8]) {
        if !self.meter_failed && self.meter.feed_downlink(chunk).is_err() {
            self.meter_failed = true;
        }
    }
}

/// Half-closes a socket; a failure only means the peer is already gone.
async fn close<W: AsyncWrite + Unpin + ?Sized>(w: &mut W) {
    if let Err(e) = w.shutdown().await {
        tracing::trace!(error = %e, "Shutdown of an already broken socket.");
    }
}

/// The last consumption a session reported to the ledger, and when; what the next report
/// needs.
struct Reported {
    usage: policy::metering::Usage,
    at: tokio::time::Instant,
    /// A `/v1/chat` session: its wall time since `started` is `voice_session_ms`.
    voice: bool,
    started: Instant,
    /// The device has a rule that charges session time: report every second, idle or not.
    timed: bool,
}

impl Reported {
    /// The longest time between two reports.
    fn every(&self, hold_refresh: Duration) -> Duration {
        if self.timed {
            SESSION_TIME_REPORT.min(hold_refresh)
        } else {
            hold_refresh
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Copies an upstream error body to the device: `content_length` bytes, or until close, at
/// most 64 KiB and 5 s.
async fn relay_error_body<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    up: &mut R,
    device: &mut W,
    already: Vec<u8>,
    content_length: Option<usize>,
) -> std::io::Result<()> {
    let limit = content_length.unwrap_or(64 * 1024).min(64 * 1024);
    let mut body = already;
    body.truncate(limit);
    let fill = async {
        let mut buf = vec![0u8; 4096]; // heap, see upstream::connect_and_handshake
        while body.len() < limit {
            let n = up.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(buf.get(..n.min(limit - body.len())).unwrap_or_default());
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), fill).await;
    device.write_all(&body).await?;
    device.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> WsRelay {
        let env = |k: &str| match k {
            "FLEETGATE_ADMIN_TOKEN" => Some("admin-token-0123456789".to_owned()),
            "COZE_API_TOKEN" => Some("pat".to_owned()),
            "K" => Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned()),
            _ => None,
        };
        let cfg = crate::config::load_str(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[tokens]\nsigning_keys = [{ kid = \"k\", secret_env = \"K\" }]\n",
            &env,
        )
        .unwrap();
        let up = ResolvedUpstream::new(cfg.upstream.ws.clone()).unwrap();
        let metrics = crate::metrics::Metrics::register(prometheus::Registry::new()).unwrap();
        WsRelay::new(
            Arc::new(
                crate::state::GatewayState::new(
                    cfg,
                    metrics,
                    crate::store::Store::open(":memory:").unwrap(),
                )
                .unwrap(),
            ),
            up,
        )
    }

    /// The session future lives as long as the WebSocket; it is part of the per-session
    /// memory budget (≤ 16 KiB per idle session in total).
    #[test]
    fn session_future_stays_small() {
        let r = relay();
        let stream: Stream = Box::new(tokio_test::io::Builder::new().build());
        let fut = r.serve(stream, BytesMut::new());
        let size = std::mem::size_of_val(&fut);
        eprintln!("serve future: {size} bytes");
        assert!(size <= 4096, "serve future is {size} bytes");
    }
}
