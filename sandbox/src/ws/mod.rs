//! The WebSocket APIs: `/v1/chat` (duplex voice chat), `/v1/audio/speech` (streaming TTS) and
//! `/v1/audio/transcriptions` (streaming ASR), framed as `coze-api.md` §8 describes.
//!
//! # Handshake
//! Every endpoint authenticates the upgrade request with [`crate::auth::authenticate`]
//! (`Authorization: Bearer` header, or the `authorization=Bearer <tok>` query parameter with a
//! raw space, `%20` or `+`). A failed handshake is answered with the HTTP status and Coze's JSON
//! envelope (401/4100 without a valid token, 400/4000 for a missing `bot_id` or a non-numeric
//! `device_id` on `/v1/chat`) and never upgraded. The `101` carries `X-Tt-Logid`; the same logid
//! is in the `detail` of every downlink frame of the session.
//!
//! # Frames
//! Downlink frames are JSON text frames
//! `{"id","event_type","data","detail":{"logid","respond_at"}}`; `data` is omitted for events
//! without a payload. Binary audio is always base64 inside JSON. Uplink frames that are not JSON,
//! binary frames and unknown `event_type`s are answered with an `error` event
//! `{code:4000,msg}`; the connection stays open. Pings are answered with pongs (tungstenite
//! queues them while reading, and every session keeps reading), and a client close frame is
//! answered with a close frame before the TCP connection ends.
//!
//! # Faults
//! `X-Sandbox-Fault` / `sandbox_fault` (see [`crate::faults`]) act on the handshake
//! (`latency_ms` before the 101, `status`, `rate_limit`) and on downlink frames, counted from 0
//! with the `*.created` frame: `stall_after=N` sends frames `0..N` and then nothing (the session
//! keeps reading, answering pings and honouring a close), `reset_after=N` drops the connection
//! without a close frame instead of sending frame N, and `malformed_after=N` sends one truncated
//! JSON text frame before frame N.
//!
//! # Cost
//! A session is one task: a `select!` over the socket, one reply timer and (for server VAD) one
//! silence timer; nothing polls. Input audio is counted, not stored. Output audio is synthesised
//! per frame when it is sent.

pub mod chat;
pub mod codec;
pub mod speech;
pub mod transcriptions;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::{Caller, authenticate, now_unix, percent_decode};
use crate::envelope::{ApiError, new_logid, with_logid};
use crate::faults::{Fault, StreamAction};
use crate::state::SandboxState;

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/v1/chat", get(chat_handshake))
        .route("/v1/audio/speech", get(speech_handshake))
        .route("/v1/audio/transcriptions", get(transcriptions_handshake))
}

type Upgrade = Result<WebSocketUpgrade, WebSocketUpgradeRejection>;

/// What a session knows about its handshake.
pub struct SessionInfo {
    pub caller: Caller,
    pub logid: String,
    pub fault: Fault,
    /// Raw query string of the upgrade request.
    pub query: String,
}

/// Authenticates, applies handshake faults and checks the upgrade; `Err` is the HTTP answer.
async fn prepare(
    st: &Arc<SandboxState>,
    headers: &HeaderMap,
    query: Option<String>,
    upgrade: Upgrade,
    check: impl FnOnce(&str) -> Result<(), ApiError>,
) -> Result<(WebSocketUpgrade, SessionInfo), Response> {
    let query = query.unwrap_or_default();
    // What this handshake arrived with, for tests that check what a proxy forwarded.
    *crate::state::lock(&st.last_ws_handshake) = Some(crate::state::WsHandshake {
        query: query.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        extensions: headers
            .get("sec-websocket-extensions")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    let caller =
        authenticate(st, headers, Some(&query), now_unix()).map_err(|e| e.into_response())?;
    check(&query).map_err(|e| e.into_response())?;
    let fault = Fault::from_request(headers, Some(&query));
    fault.before_answer().await.map_err(|e| e.into_response())?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!("websocket upgrade required: {e}")).into_response()
    })?;
    Ok((
        upgrade,
        SessionInfo {
            caller,
            logid: new_logid(),
            fault,
            query,
        },
    ))
}

/// Upgrades and runs `session` on the socket; the 101 carries `X-Tt-Logid`.
fn accept<F, Fut>(
    st: Arc<SandboxState>,
    upgrade: WebSocketUpgrade,
    info: SessionInfo,
    session: F,
) -> Response
where
    F: FnOnce(Downlink, SessionInfo) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    st.counters.ws_sessions.fetch_add(1, Ordering::Relaxed);
    let logid = info.logid.clone();
    // tungstenite allocates its read buffer up front (128 KiB by default); uplink frames are a
    // few KiB, and a larger frame still grows the buffer. Keeps 1,000+ sessions cheap.
    let upgrade = upgrade.read_buffer_size(8 * 1024);
    let resp = upgrade.on_upgrade(move |socket| {
        let dl = Downlink::new(socket, st, info.logid.clone(), info.fault.clone());
        session(dl, info)
    });
    with_logid(resp, &logid)
}

async fn chat_handshake(
    State(st): State<Arc<SandboxState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Upgrade,
) -> Response {
    let check = |q: &str| {
        if query_param(q, "bot_id").is_none_or(|b| b.is_empty()) {
            return Err(ApiError::bad_request("missing required parameter: bot_id"));
        }
        if let Some(d) = query_param(q, "device_id")
            && d.parse::<i64>().is_err()
        {
            return Err(ApiError::bad_request(
                "device_id must be an int64 decimal string",
            ));
        }
        Ok(())
    };
    match prepare(&st, &headers, query, upgrade, check).await {
        Ok((up, info)) => accept(st.clone(), up, info, chat::run),
        Err(resp) => resp,
    }
}

async fn speech_handshake(
    State(st): State<Arc<SandboxState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Upgrade,
) -> Response {
    match prepare(&st, &headers, query, upgrade, |_| Ok(())).await {
        Ok((up, info)) => accept(st.clone(), up, info, speech::run),
        Err(resp) => resp,
    }
}

async fn transcriptions_handshake(
    State(st): State<Arc<SandboxState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Upgrade,
) -> Response {
    match prepare(&st, &headers, query, upgrade, |_| Ok(())).await {
        Ok((up, info)) => accept(st.clone(), up, info, transcriptions::run),
        Err(resp) => resp,
    }
}

/// The decoded value of query parameter `name` in a raw query string.
pub fn query_param(raw: &str, name: &str) -> Option<String> {
    raw.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Why a session ends early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The peer is gone (send failed).
    Closed,
    /// A `reset_after` fault: drop the socket without a close frame.
    Reset,
}

#[derive(Serialize)]
struct Detail<'a> {
    logid: &'a str,
    respond_at: String,
}

#[derive(Serialize)]
struct Frame<'a, T: Serialize> {
    id: String,
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a T>,
    detail: Detail<'a>,
}

/// The downlink half of a session: owns the socket, numbers frames and applies frame faults.
pub struct Downlink {
    pub socket: WebSocket,
    st: Arc<SandboxState>,
    logid: String,
    fault: Fault,
    sent: usize,
    stalled: bool,
    /// `event_subscriptions` of `/v1/chat`: when set, other events (except `error`) are dropped.
    pub subscriptions: Option<Vec<String>>,
}

impl Downlink {
    fn new(socket: WebSocket, st: Arc<SandboxState>, logid: String, fault: Fault) -> Self {
        Self {
            socket,
            st,
            logid,
            fault,
            sent: 0,
            stalled: false,
            subscriptions: None,
        }
    }

    pub fn state(&self) -> &Arc<SandboxState> {
        &self.st
    }

    pub fn fault(&self) -> &Fault {
        &self.fault
    }

    /// Sends one event (`data: None` omits the field).
    pub async fn send<T: Serialize>(
        &mut self,
        event_type: &str,
        data: Option<&T>,
    ) -> Result<(), End> {
        if let Some(subs) = &self.subscriptions
            && event_type != "error"
            && !subs.iter().any(|s| s == event_type)
        {
            return Ok(());
        }
        if self.stalled {
            return Ok(());
        }
        match self.fault.at_item(self.sent) {
            StreamAction::Send => {}
            StreamAction::Stall => {
                self.stalled = true;
                return Ok(());
            }
            StreamAction::Reset => return Err(End::Reset),
            StreamAction::Malformed => {
                let bad = format!(
                    "{{\"id\":\"{}\",\"event_type\":\"{event_type}\",\"data\":{{",
                    self.st.next_id()
                );
                self.socket
                    .send(Message::text(bad))
                    .await
                    .map_err(|_| End::Closed)?;
            }
        }
        self.sent += 1;
        let frame = Frame {
            id: self.st.next_id(),
            event_type,
            data,
            detail: Detail {
                logid: &self.logid,
                respond_at: now_ms().to_string(),
            },
        };
        let text = serde_json::to_string(&frame).map_err(|_| End::Closed)?;
        self.socket
            .send(Message::text(text))
            .await
            .map_err(|_| End::Closed)
    }

    /// Sends an event without payload.
    pub async fn send_empty(&mut self, event_type: &str) -> Result<(), End> {
        self.send::<Value>(event_type, None).await
    }

    /// Sends `error {code, msg}`.
    pub async fn error(&mut self, code: i64, msg: impl Into<String>) -> Result<(), End> {
        let data = serde_json::json!({"code": code, "msg": msg.into()});
        self.send("error", Some(&data)).await
    }

    /// After a client close frame: keep reading so tungstenite flushes its close reply, until
    /// the stream ends.
    pub async fn finish_close(&mut self) {
        while let Some(Ok(_)) = self.socket.recv().await {}
    }
}

/// What one uplink frame asks for.
pub enum Uplink {
    /// A parsed event: `event_type` and `data` (`Null` when absent).
    Event(String, Value),
    /// Not an event: answer `error {4000, msg}`.
    Invalid(String),
    /// Nothing to do (ping/pong).
    Ignore,
    /// The client sent a close frame.
    Close,
    /// The stream ended or failed.
    Gone,
}

/// Classifies one `recv()` result.
pub fn parse_uplink(msg: Option<Result<Message, axum::Error>>) -> Uplink {
    match msg {
        None | Some(Err(_)) => Uplink::Gone,
        Some(Ok(Message::Close(_))) => Uplink::Close,
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Uplink::Ignore,
        Some(Ok(Message::Binary(_))) => {
            Uplink::Invalid("binary frames are not supported; send JSON text frames".into())
        }
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<Value>(t.as_str()) {
            Ok(Value::Object(mut m)) => match m.remove("event_type") {
                Some(Value::String(et)) => {
                    Uplink::Event(et, m.remove("data").unwrap_or(Value::Null))
                }
                _ => Uplink::Invalid("missing event_type".into()),
            },
            Ok(_) => Uplink::Invalid("event must be a JSON object".into()),
            Err(e) => Uplink::Invalid(format!("invalid JSON: {e}")),
        },
    }
}

/// Deep-merges `src` into `dst` ("update" semantics): objects merge key by key, `null` leaves
/// the old value, anything else replaces it.
pub fn merge(dst: &mut Map<String, Value>, src: &Map<String, Value>) {
    for (k, v) in src {
        match (dst.get_mut(k), v) {
            (_, Value::Null) => {}
            (Some(Value::Object(d)), Value::Object(s)) => merge(d, s),
            _ => {
                dst.insert(k.clone(), v.clone());
            }
        }
    }
}

/// `data` as an object (`Null` → empty), or an error message.
pub fn data_object(data: &Value) -> Result<Map<String, Value>, String> {
    match data {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m.clone()),
        _ => Err("data must be a JSON object".into()),
    }
}

/// Decodes `data.delta` (base64) of an `input_audio_buffer.append`.
pub fn audio_delta(data: &Value) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let delta = data
        .get("delta")
        .and_then(Value::as_str)
        .ok_or("missing data.delta")?;
    base64::engine::general_purpose::STANDARD
        .decode(delta)
        .map_err(|e| format!("data.delta is not valid base64: {e}"))
}

/// Rough token count used for usage: a token per 4 characters, at least 1.
pub fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(query_param("bot_id=7&x=a%20b", "x").as_deref(), Some("a b"));
        assert_eq!(query_param("bot_id=7", "device_id"), None);
    }

    #[test]
    fn merge_updates_nested_fields() {
        let mut dst = serde_json::json!({"a": {"x": 1, "y": 2}, "b": 1});
        let src = serde_json::json!({"a": {"y": 3, "z": null}, "b": null, "c": "n"});
        if let (Value::Object(d), Value::Object(s)) = (&mut dst, &src) {
            merge(d, s);
        }
        assert_eq!(
            dst,
            serde_json::json!({"a": {"x": 1, "y": 3}, "b": 1, "c": "n"})
        );
    }
}
