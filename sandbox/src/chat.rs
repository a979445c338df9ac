//! Chat v3 (coze-api.md §3).
//!
//! | endpoint | answer |
//! |---|---|
//! | `POST /v3/chat?conversation_id=` `stream:false` | `data`: Chat, `status: in_progress` |
//! | `POST /v3/chat?conversation_id=` `stream:true` | SSE (`event:X\ndata:JSON\n\n`) |
//! | `GET`/`POST /v3/chat/retrieve?conversation_id=&chat_id=` | `data`: Chat |
//! | `GET /v3/chat/message/list?conversation_id=&chat_id=` | `data`: Message[] (assistant side) |
//! | `POST /v3/chat/cancel` `{conversation_id, chat_id}` | `data`: Chat (`canceled`), 4104 if terminal |
//! | `POST /v3/chat/submit_tool_outputs?conversation_id=&chat_id=` `{tool_outputs, stream}` | Chat or SSE |
//!
//! Stream: `conversation.chat.created`, `conversation.chat.in_progress`,
//! [`crate::SandboxConfig::chat_deltas`] × `conversation.message.delta`, (`conversation.audio.delta`
//! × [`AUDIO_DELTAS`] when an `object_string` message holds an `audio` item: base64 PCM 24 kHz
//! s16le mono lasting [`crate::audio::speech_duration_ms`] of the answer), then
//! `conversation.message.completed` for the answer and for a `verbose`
//! `generate_answer_finish` message, `conversation.chat.completed` (with usage) and
//! `done` `"[DONE]"`. [`crate::SandboxConfig::sse_event_delay`] separates events.
//!
//! Sandbox conventions:
//! - Replies are deterministic: a function of the seed and the query text ([`reply_text`]).
//! - Usage: every text counts `max(1, ceil(chars / 4))` tokens ([`count_tokens`]); input =
//!   sum over `additional_messages` contents, output = the answer (plus tool outputs when
//!   answering after `submit_tool_outputs`).
//! - Tools: a `bot_id` ending in `_tools`, or a query containing `#tool`, makes the chat end
//!   in `requires_action` with one `get_weather` function tool call; `submit_tool_outputs`
//!   then produces the answer.
//! - Failure: a `bot_id` ending in `_fail`, or the `fail` fault knob (also on
//!   `submit_tool_outputs`), makes the chat fail (this wins over tools): the stream carries
//!   `conversation.chat.created`, `conversation.chat.in_progress`, the first half of the
//!   `conversation.message.delta`s ([`failed_pieces`]), then `conversation.chat.failed` (Chat with
//!   `status: failed`, `failed_at`, `completed_at`, `last_error {code: 5000, msg}` ([`fail_error`])
//!   and the usage so far: input + the streamed part) and `done`. No `message.completed`; no
//!   assistant message joins the conversation (`message/list` answers `[]`). A non-stream chat
//!   settles to the same failed Chat on `retrieve`.
//! - Non-stream chats become terminal `sse_event_delay × (chat_deltas + 2)` after creation
//!   (immediately with the default zero delay), at the latest when next observed.
//! - Faults ([`crate::faults`]): latency/status/rate_limit before answering; stall/reset/
//!   malformed per SSE event; `no_usage` omits `conversation.chat.completed` (and
//!   `conversation.chat.failed`); `fail` as above.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::auth::now_unix;
use crate::conversations::{Message, enter_message, json_body, meta, prelude, str_field};
use crate::envelope::{self, ApiError, ApiResult, new_logid, with_logid};
use crate::faults::{Fault, StreamAction};
use crate::sse;
use crate::state::{SandboxState, lock};

/// Number of `conversation.audio.delta` events when the input carries audio.
pub const AUDIO_DELTAS: usize = 4;
/// Sample rate of `conversation.audio.delta` PCM.
pub const AUDIO_SAMPLE_RATE: u32 = 24_000;
/// `last_error.code` of a failed chat (Coze's generic internal error).
pub const FAIL_CODE: i64 = 5000;
/// `last_error.msg` of a failed chat.
pub const FAIL_MSG: &str = "sandbox injected failure";

/// `last_error` of a failed chat: `{"code": 5000, "msg": ...}`.
pub fn fail_error() -> Value {
    json!({"code": FAIL_CODE, "msg": FAIL_MSG})
}

/// Whether a chat for `bot_id` under `fault` fails (`_fail` bot ids or the `fail` knob).
pub fn should_fail(bot_id: &str, fault: &Fault) -> bool {
    fault.fail || bot_id.ends_with("_fail")
}

/// The answer pieces a failing chat streams before it fails: the first half (rounded down)
/// of the `deltas` pieces of `answer`.
pub fn failed_pieces(answer: &str, deltas: usize) -> Vec<String> {
    let mut pieces = split_text(answer, deltas);
    pieces.truncate(pieces.len() / 2);
    pieces
}

/// Token usage.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub token_count: u64,
    pub output_count: u64,
    pub input_count: u64,
}

impl Usage {
    pub fn new(input: u64, output: u64) -> Self {
        Self {
            token_count: input + output,
            output_count: output,
            input_count: input,
        }
    }
}

/// The Chat object.
#[derive(Clone, Debug, Serialize)]
pub struct Chat {
    pub id: String,
    pub conversation_id: String,
    pub bot_id: String,
    pub created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<u64>,
    pub meta_data: Map<String, Value>,
    pub last_error: Value,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required_action: Option<Value>,
    pub usage: Usage,
    pub section_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inserted_additional_messages: Vec<Value>,
}

impl Chat {
    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// A chat plus what it will become.
#[derive(Clone, Debug)]
pub struct ChatRec {
    pub chat: Chat,
    /// `completed`, `requires_action` or `failed`.
    pub final_status: &'static str,
    pub final_usage: Usage,
    pub required_action: Option<Value>,
    /// Assistant-side messages, appended to the conversation once terminal.
    pub messages: Vec<Message>,
    /// A stream is delivering this chat; its end settles the chat.
    pub streaming: bool,
    pub ready_at: Instant,
    /// Input tokens (kept for the answer after tool outputs).
    pub input_tokens: u64,
}

/// Chats kept in memory; the oldest are forgotten beyond this (long load benchmarks).
pub const MAX_CHATS: usize = 50_000;

/// In-memory state of this module.
#[derive(Debug, Default)]
pub struct Store {
    pub chats: HashMap<String, ChatRec>,
    /// Insertion order, for eviction.
    order: VecDeque<String>,
    /// conversation id → the chat that may still be running in it.
    running: HashMap<String, String>,
}

impl Store {
    /// Inserts or replaces a chat record, evicting the oldest beyond [`MAX_CHATS`].
    pub fn insert(&mut self, rec: ChatRec) {
        let id = rec.chat.id.clone();
        if is_running(&rec.chat.status) {
            self.running
                .insert(rec.chat.conversation_id.clone(), id.clone());
        }
        if self.chats.insert(id.clone(), rec).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > MAX_CHATS {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(r) = self.chats.remove(&old)
                && self.running.get(&r.chat.conversation_id) == Some(&old)
            {
                self.running.remove(&r.chat.conversation_id);
            }
        }
    }
}

fn is_running(status: &str) -> bool {
    status == "in_progress" || status == "created"
}

/// Moves a chat to its final status; returns messages to append to the conversation.
fn finish(rec: &mut ChatRec) -> Vec<Message> {
    if !is_running(&rec.chat.status) {
        return Vec::new();
    }
    rec.chat.status = rec.final_status.to_owned();
    rec.chat.usage = rec.final_usage;
    rec.chat.required_action = rec.required_action.clone();
    match rec.final_status {
        "completed" => rec.chat.completed_at = Some(now_unix()),
        "failed" => {
            let now = now_unix();
            rec.chat.completed_at = Some(now);
            rec.chat.failed_at = Some(now);
            rec.chat.last_error = fail_error();
        }
        _ => {}
    }
    rec.streaming = false;
    rec.messages.clone()
}

/// Settles a due non-stream chat; appends its messages to the conversation.
fn settle_chat(st: &SandboxState, chat_id: &str) {
    let now = Instant::now();
    let out = {
        let mut store = lock(&st.chats);
        match store.chats.get_mut(chat_id) {
            Some(rec) if !rec.streaming && now >= rec.ready_at => finish(rec),
            _ => Vec::new(),
        }
    };
    if !out.is_empty() {
        lock(&st.conversations).append(out);
    }
}

/// Whether a chat is still running in `conversation_id` (settling it first if due).
fn conversation_busy(st: &SandboxState, conversation_id: &str) -> bool {
    let Some(id) = lock(&st.chats).running.get(conversation_id).cloned() else {
        return false;
    };
    settle_chat(st, &id);
    let mut store = lock(&st.chats);
    let busy = store
        .chats
        .get(&id)
        .is_some_and(|r| is_running(&r.chat.status));
    if !busy {
        store.running.remove(conversation_id);
    }
    busy
}

/// Settles one chat when its stream ends (or is dropped).
fn settle_stream_end(st: &SandboxState, chat_id: &str) {
    let out = {
        let mut store = lock(&st.chats);
        match store.chats.get_mut(chat_id) {
            Some(rec) if rec.streaming => {
                rec.streaming = false;
                finish(rec)
            }
            _ => Vec::new(),
        }
    };
    if !out.is_empty() {
        lock(&st.conversations).append(out);
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic content.

/// `max(1, ceil(chars / 4))`: the sandbox's token count of a text.
pub fn count_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

fn fnv1a(seed: u64, s: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const WORDS: &[&str] = &[
    "the", "gateway", "device", "answer", "sandbox", "quietly", "streams", "a", "bright", "signal",
    "through", "edge", "fleet", "and", "every", "token", "counts", "today", "with", "care",
    "under", "clear", "skies", "while", "small", "speakers", "listen", "closely", "to", "friendly",
    "words", "again",
];

/// The deterministic reply to `query` under `seed`.
pub fn reply_text(seed: u64, query: &str) -> String {
    let mut h = fnv1a(seed, query);
    let mut words = Vec::with_capacity(12);
    for _ in 0..12 {
        words.push(WORDS[(h % WORDS.len() as u64) as usize]);
        h = h.rotate_left(5).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
    }
    let q: String = query.chars().take(40).collect();
    format!("Sandbox reply to \"{q}\": {}.", words.join(" "))
}

/// Splits `text` into `n` non-empty-ish pieces on char boundaries (fewer if too short).
pub fn split_text(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = n.clamp(1, chars.len().max(1));
    let per = chars.len().div_ceil(n).max(1);
    chars.chunks(per).map(|c| c.iter().collect()).collect()
}

/// Text of a message content: plain text, or the `text` items of an `object_string`.
/// The bool says whether an `audio` item was present.
fn query_of(content: &str, content_type: &str) -> (String, bool) {
    if content_type != "object_string" {
        return (content.to_owned(), false);
    }
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(content) else {
        return (content.to_owned(), false);
    };
    let mut text = Vec::new();
    let mut audio = false;
    for it in &items {
        match it.get("type").and_then(Value::as_str) {
            Some("text") => text.extend(it.get("text").and_then(Value::as_str)),
            Some("audio") => audio = true,
            _ => {}
        }
    }
    (text.join(" "), audio)
}

// ---------------------------------------------------------------------------------------------
// SSE plumbing shared with workflows.

/// Runs a closure when dropped (stream end, client disconnect or reset).
pub(crate) struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl OnDrop {
    pub(crate) fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

struct SseState {
    events: std::vec::IntoIter<Bytes>,
    n: usize,
    fault: Fault,
    delay: Duration,
    malformed: Bytes,
    done: bool,
    _guard: Option<OnDrop>,
}

/// A `text/event-stream` response delivering `events` with `delay` between them and the
/// per-event faults of `fault` applied (`malformed` is the bad frame to inject).
pub(crate) fn sse_response(
    events: Vec<Bytes>,
    fault: Fault,
    delay: Duration,
    malformed: Bytes,
    guard: Option<OnDrop>,
) -> Response {
    let state = SseState {
        events: events.into_iter(),
        n: 0,
        fault,
        delay,
        malformed,
        done: false,
        _guard: guard,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let ev = s.events.next()?;
        let n = s.n;
        s.n += 1;
        if n > 0 && !s.delay.is_zero() {
            tokio::time::sleep(s.delay).await;
        }
        match s.fault.at_item(n) {
            StreamAction::Send => Some((Ok::<Bytes, std::io::Error>(ev), s)),
            StreamAction::Malformed => {
                let mut b = Vec::with_capacity(s.malformed.len() + ev.len());
                b.extend_from_slice(&s.malformed);
                b.extend_from_slice(&ev);
                Some((Ok(Bytes::from(b)), s))
            }
            StreamAction::Reset => {
                // Let hyper flush what was already sent, so the client sees a mid-stream cut.
                tokio::time::sleep(Duration::from_millis(20)).await;
                s.done = true;
                Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected reset",
                    )),
                    s,
                ))
            }
            StreamAction::Stall => {
                std::future::pending::<()>().await;
                None
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_logid(resp, &new_logid())
}

/// The malformed chat event injected by `malformed_after`.
pub(crate) fn malformed_chat_event() -> Bytes {
    Bytes::from_static(b"event:conversation.message.delta\ndata:{\"id\":\n\n")
}

// ---------------------------------------------------------------------------------------------
// Building a chat turn.

/// Everything one chat turn produces.
pub(crate) struct Turn {
    pub rec: ChatRec,
    pub answer: Message,
    pub verbose: Message,
    pub function_call: Option<Message>,
    pub audio: bool,
}

pub(crate) struct TurnInput<'a> {
    pub conversation_id: &'a str,
    pub bot_id: &'a str,
    pub section_id: &'a str,
    pub query: &'a str,
    pub input_tokens: u64,
    pub meta_data: Map<String, Value>,
    pub tools: bool,
    pub audio: bool,
    pub inserted: Vec<Value>,
    /// The chat fails after half of its deltas (wins over `tools`).
    pub fail: bool,
}

fn assistant_msg(
    st: &SandboxState,
    t: &TurnInput<'_>,
    chat_id: &str,
    kind: &str,
    content: String,
) -> Message {
    let now = now_unix();
    Message {
        id: st.next_id(),
        conversation_id: t.conversation_id.to_owned(),
        bot_id: t.bot_id.to_owned(),
        chat_id: chat_id.to_owned(),
        section_id: t.section_id.to_owned(),
        role: "assistant".into(),
        kind: kind.into(),
        content,
        content_type: "text".into(),
        meta_data: Map::new(),
        created_at: now,
        updated_at: now,
        reasoning_content: String::new(),
    }
}

fn verbose_content() -> String {
    json!({"msg_type": "generate_answer_finish", "data": "{\"finish_reason\":0}", "from_module": null, "from_unit": null})
        .to_string()
}

pub(crate) fn build_turn(st: &SandboxState, t: TurnInput<'_>, answer_text: String) -> Turn {
    let chat_id = st.next_id();
    let now = now_unix();
    let output = count_tokens(&answer_text);
    let (final_status, required_action, function_call) = if t.fail {
        ("failed", None, None)
    } else if t.tools {
        let call_id = format!("call_{}", st.next_id());
        let args = json!({"location": t.query.chars().take(40).collect::<String>()}).to_string();
        let fc = assistant_msg(
            st,
            &t,
            &chat_id,
            "function_call",
            json!({"name": "get_weather", "arguments": {"location": t.query.chars().take(40).collect::<String>()}, "plugin_id": "sandbox", "api_name": "get_weather"}).to_string(),
        );
        (
            "requires_action",
            Some(json!({
                "type": "submit_tool_outputs",
                "submit_tool_outputs": {"tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": args}}
                ]}
            })),
            Some(fc),
        )
    } else {
        ("completed", None, None)
    };
    let answer = assistant_msg(st, &t, &chat_id, "answer", answer_text);
    let verbose = assistant_msg(st, &t, &chat_id, "verbose", verbose_content());
    let final_usage = if t.fail {
        let partial: String = failed_pieces(&answer.content, st.config.chat_deltas).concat();
        let out = if partial.is_empty() {
            0
        } else {
            count_tokens(&partial)
        };
        Usage::new(t.input_tokens, out)
    } else if t.tools {
        Usage::new(t.input_tokens, 0)
    } else {
        Usage::new(t.input_tokens, output)
    };
    let messages = match &function_call {
        _ if t.fail => Vec::new(),
        Some(fc) => vec![fc.clone()],
        None => vec![answer.clone(), verbose.clone()],
    };
    let delay = st.config.sse_event_delay * (st.config.chat_deltas as u32 + 2);
    let chat = Chat {
        id: chat_id,
        conversation_id: t.conversation_id.to_owned(),
        bot_id: t.bot_id.to_owned(),
        created_at: now,
        completed_at: None,
        failed_at: None,
        meta_data: t.meta_data,
        last_error: json!({"code": 0, "msg": ""}),
        status: "in_progress".into(),
        required_action: None,
        usage: Usage::default(),
        section_id: t.section_id.to_owned(),
        inserted_additional_messages: t.inserted,
    };
    Turn {
        rec: ChatRec {
            chat,
            final_status,
            final_usage,
            required_action,
            messages,
            streaming: false,
            ready_at: Instant::now() + delay,
            input_tokens: t.input_tokens,
        },
        answer,
        verbose,
        function_call,
        audio: t.audio,
    }
}

fn msg_json(m: &Message) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

/// The SSE events of a turn (chat v3 framing). `created` controls the leading
/// `conversation.chat.created`; `done` is the data of the final `done` event.
pub(crate) fn turn_events(
    st: &SandboxState,
    turn: &Turn,
    created: bool,
    fault: &Fault,
    done: &str,
) -> Vec<Bytes> {
    let mut ev = Vec::new();
    let mut chat = turn.rec.chat.clone();
    if created {
        chat.status = "created".into();
        ev.push(sse::chat_event("conversation.chat.created", &chat.json()));
    }
    chat.status = "in_progress".into();
    ev.push(sse::chat_event(
        "conversation.chat.in_progress",
        &chat.json(),
    ));
    if let Some(fc) = &turn.function_call {
        ev.push(sse::chat_event(
            "conversation.message.completed",
            &msg_json(fc),
        ));
        chat.status = "requires_action".into();
        chat.required_action = turn.rec.required_action.clone();
        chat.usage = turn.rec.final_usage;
        ev.push(sse::chat_event(
            "conversation.chat.requires_action",
            &chat.json(),
        ));
        ev.push(sse::chat_event("done", done));
        return ev;
    }
    if turn.rec.final_status == "failed" {
        let mut delta = turn.answer.clone();
        for piece in failed_pieces(&turn.answer.content, st.config.chat_deltas) {
            delta.content = piece;
            ev.push(sse::chat_event(
                "conversation.message.delta",
                &msg_json(&delta),
            ));
        }
        if !fault.no_usage {
            let now = now_unix();
            chat.status = "failed".into();
            chat.completed_at = Some(now);
            chat.failed_at = Some(now);
            chat.last_error = fail_error();
            chat.usage = turn.rec.final_usage;
            ev.push(sse::chat_event("conversation.chat.failed", &chat.json()));
        }
        ev.push(sse::chat_event("done", done));
        return ev;
    }
    let mut delta = turn.answer.clone();
    for piece in split_text(&turn.answer.content, st.config.chat_deltas) {
        delta.content = piece;
        ev.push(sse::chat_event(
            "conversation.message.delta",
            &msg_json(&delta),
        ));
    }
    if turn.audio {
        let ms = crate::audio::speech_duration_ms(&turn.answer.content, 1.0);
        let pcm = crate::audio::synth_pcm16(ms, AUDIO_SAMPLE_RATE, st.config.seed);
        let per = pcm.len().div_ceil(AUDIO_DELTAS).next_multiple_of(2).max(2);
        let mut a = turn.answer.clone();
        a.content_type = "audio".into();
        for chunk in pcm.chunks(per) {
            a.content = base64::engine::general_purpose::STANDARD.encode(chunk);
            ev.push(sse::chat_event("conversation.audio.delta", &msg_json(&a)));
        }
    }
    ev.push(sse::chat_event(
        "conversation.message.completed",
        &msg_json(&turn.answer),
    ));
    ev.push(sse::chat_event(
        "conversation.message.completed",
        &msg_json(&turn.verbose),
    ));
    if !fault.no_usage {
        chat.status = "completed".into();
        chat.completed_at = Some(now_unix());
        chat.usage = turn.rec.final_usage;
        ev.push(sse::chat_event("conversation.chat.completed", &chat.json()));
    }
    ev.push(sse::chat_event("done", done));
    ev
}

/// Registers a turn and answers it as a stream or as the in-progress Chat.
pub(crate) fn answer_turn(
    st: &Arc<SandboxState>,
    mut turn: Turn,
    stream: bool,
    fault: Fault,
    done: &str,
) -> Response {
    let chat_id = turn.rec.chat.id.clone();
    if !stream {
        let chat = turn.rec.chat.clone();
        lock(&st.chats).insert(turn.rec);
        return envelope::ok(serde_json::to_value(&chat).unwrap_or(Value::Null));
    }
    let events = turn_events(st, &turn, true, &fault, done);
    turn.rec.streaming = true;
    lock(&st.chats).insert(turn.rec);
    let st2 = st.clone();
    let guard = OnDrop::new(move || settle_stream_end(&st2, &chat_id));
    sse_response(
        events,
        fault,
        st.config.sse_event_delay,
        malformed_chat_event(),
        Some(guard),
    )
}

/// Validated chat-like request content (shared with `/v1/workflows/chat`).
pub(crate) struct Prepared {
    pub conversation_id: String,
    pub section_id: String,
    pub query: String,
    pub audio: bool,
    pub input_tokens: u64,
    pub inserted: Vec<Value>,
}

/// Resolves the conversation (creating it if needed), rejects a second running chat (4016),
/// stores the additional messages when `save` and derives the query.
pub(crate) fn prepare(
    st: &SandboxState,
    conversation_id: Option<&str>,
    bot_id: &str,
    additional: &[Value],
    save: bool,
) -> Result<Prepared, ApiError> {
    if additional.len() > 100 {
        return Err(ApiError::new(
            StatusCode::OK,
            4004,
            "too many additional_messages",
        ));
    }
    let conversation_id = match conversation_id.filter(|c| !c.is_empty()) {
        Some(c) => c.to_owned(),
        None => st.next_id(),
    };
    if conversation_busy(st, &conversation_id) {
        return Err(ApiError::new(
            StatusCode::OK,
            4016,
            "a chat is already running in this conversation",
        ));
    }
    let mut store = lock(&st.conversations);
    let conv = store.ensure(st, &conversation_id, bot_id);
    let mut msgs = Vec::new();
    let mut input_tokens = 0;
    let (mut query, mut audio) = (String::new(), false);
    for m in additional {
        let msg = enter_message(st, m, &conversation_id, bot_id, "", &conv.last_section_id)?;
        input_tokens += count_tokens(&msg.content);
        let (q, a) = query_of(&msg.content, &msg.content_type);
        audio |= a;
        query = q;
        msgs.push(msg);
    }
    let inserted = msgs.iter().map(|m| json!({"id": m.id})).collect();
    if save {
        store.append(msgs);
    }
    Ok(Prepared {
        conversation_id,
        section_id: conv.last_section_id,
        query,
        audio,
        input_tokens,
        inserted,
    })
}

// ---------------------------------------------------------------------------------------------
// Handlers.

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/v3/chat", post(create))
        .route("/v3/chat/retrieve", get(retrieve).post(retrieve))
        .route(
            "/v3/chat/message/list",
            get(message_list).post(message_list),
        )
        .route("/v3/chat/cancel", post(cancel))
        .route("/v3/chat/submit_tool_outputs", post(submit_tool_outputs))
}

#[derive(Deserialize, Default)]
struct ChatQuery {
    conversation_id: Option<String>,
    chat_id: Option<String>,
}

async fn create(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ChatQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let fault = Fault::from_request(&headers, q.as_deref());
    let b = json_body(&body)?;
    let bot_id =
        str_field(&b, "bot_id").ok_or_else(|| ApiError::bad_request("bot_id is required"))?;
    str_field(&b, "user_id").ok_or_else(|| ApiError::bad_request("user_id is required"))?;
    let stream = b.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let save = b
        .get("auto_save_history")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if !stream && !save {
        return Err(ApiError::new(
            StatusCode::OK,
            4007,
            "stream=false requires auto_save_history=true",
        ));
    }
    let additional = match b.get("additional_messages") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "additional_messages must be an array",
            ));
        }
    };
    let p = prepare(
        &st,
        cq.conversation_id.as_deref(),
        bot_id,
        &additional,
        save,
    )?;
    let tools = bot_id.ends_with("_tools") || p.query.contains("#tool");
    let fail = should_fail(bot_id, &fault);
    let answer = reply_text(st.config.seed, &p.query);
    let turn = build_turn(
        &st,
        TurnInput {
            conversation_id: &p.conversation_id,
            bot_id,
            section_id: &p.section_id,
            query: &p.query,
            input_tokens: p.input_tokens,
            meta_data: meta(&b),
            tools,
            audio: p.audio,
            inserted: p.inserted,
            fail,
        },
        answer,
    );
    Ok(answer_turn(&st, turn, stream, fault, "\"[DONE]\""))
}

fn ids(cq: &ChatQuery) -> Result<(&str, &str), ApiError> {
    let c = cq
        .conversation_id
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("conversation_id is required"))?;
    let id = cq
        .chat_id
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("chat_id is required"))?;
    Ok((c, id))
}

fn get_chat(st: &SandboxState, conv: &str, chat_id: &str) -> Result<ChatRec, ApiError> {
    settle_chat(st, chat_id);
    lock(&st.chats)
        .chats
        .get(chat_id)
        .filter(|r| r.chat.conversation_id == conv)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::OK, 4001, format!("invalid chat id {chat_id}")))
}

async fn retrieve(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ChatQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let (conv, id) = ids(&cq)?;
    let rec = get_chat(&st, conv, id)?;
    Ok(envelope::ok(
        serde_json::to_value(&rec.chat).unwrap_or(Value::Null),
    ))
}

async fn message_list(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ChatQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let (conv, id) = ids(&cq)?;
    let rec = get_chat(&st, conv, id)?;
    let msgs: Vec<Value> = if is_running(&rec.chat.status) {
        Vec::new()
    } else {
        rec.messages
            .iter()
            .filter_map(|m| serde_json::to_value(m).ok())
            .collect()
    };
    Ok(envelope::ok(Value::Array(msgs)))
}

async fn cancel(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    let cq = ChatQuery {
        conversation_id: str_field(&b, "conversation_id").map(str::to_owned),
        chat_id: str_field(&b, "chat_id").map(str::to_owned),
    };
    let (conv, id) = ids(&cq)?;
    get_chat(&st, conv, id)?;
    let mut store = lock(&st.chats);
    let rec = store
        .chats
        .get_mut(id)
        .ok_or_else(|| ApiError::new(StatusCode::OK, 4001, format!("invalid chat id {id}")))?;
    if !is_running(&rec.chat.status) {
        return Err(ApiError::new(
            StatusCode::OK,
            4104,
            format!("chat in status {} cannot be canceled", rec.chat.status),
        ));
    }
    rec.chat.status = "canceled".into();
    rec.streaming = false;
    Ok(envelope::ok(
        serde_json::to_value(&rec.chat).unwrap_or(Value::Null),
    ))
}

async fn submit_tool_outputs(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ChatQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let fault = Fault::from_request(&headers, q.as_deref());
    let (conv, id) = ids(&cq)?;
    let b = json_body(&body)?;
    let outputs = b
        .get("tool_outputs")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::bad_request("tool_outputs is required"))?;
    let mut out_text = Vec::new();
    for o in outputs {
        str_field(o, "tool_call_id")
            .ok_or_else(|| ApiError::bad_request("tool_outputs[].tool_call_id is required"))?;
        out_text.push(
            o.get("output")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        );
    }
    let stream = b.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let rec = get_chat(&st, conv, id)?;
    if rec.chat.status != "requires_action" {
        return Err(ApiError::bad_request(format!(
            "chat in status {} is not waiting for tool outputs",
            rec.chat.status
        )));
    }
    let joined = out_text.join(" ");
    let answer_text = format!(
        "Tool output received ({}). {}",
        joined.chars().take(40).collect::<String>(),
        reply_text(st.config.seed, &joined)
    );
    let input_tokens = rec.input_tokens + count_tokens(&joined);
    let t = TurnInput {
        conversation_id: conv,
        bot_id: &rec.chat.bot_id,
        section_id: &rec.chat.section_id,
        query: &joined,
        input_tokens,
        meta_data: rec.chat.meta_data.clone(),
        tools: false,
        audio: false,
        inserted: Vec::new(),
        fail: should_fail(&rec.chat.bot_id, &fault),
    };
    let mut turn = build_turn(&st, t, answer_text);
    // Same chat continues: keep its id and creation time.
    turn.rec.chat.id = rec.chat.id.clone();
    turn.rec.chat.created_at = rec.chat.created_at;
    for m in [&mut turn.answer, &mut turn.verbose] {
        m.chat_id = rec.chat.id.clone();
    }
    if turn.rec.final_status != "failed" {
        turn.rec.messages = vec![turn.answer.clone(), turn.verbose.clone()];
    }
    if !stream {
        let chat = turn.rec.chat.clone();
        lock(&st.chats).insert(turn.rec);
        return Ok(envelope::ok(
            serde_json::to_value(&chat).unwrap_or(Value::Null),
        ));
    }
    let chat_id = turn.rec.chat.id.clone();
    let events = turn_events(&st, &turn, false, &fault, "\"[DONE]\"");
    turn.rec.streaming = true;
    lock(&st.chats).insert(turn.rec);
    let st2 = st.clone();
    let guard = OnDrop::new(move || {
        settle_stream_end(&st2, &chat_id);
    });
    Ok(sse_response(
        events,
        fault,
        st.config.sse_event_delay,
        malformed_chat_event(),
        Some(guard),
    )
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_deterministic() {
        assert_eq!(reply_text(7, "hi"), reply_text(7, "hi"));
        assert_ne!(reply_text(7, "hi"), reply_text(8, "hi"));
        assert!(reply_text(7, "hi").starts_with("Sandbox reply to \"hi\": "));
    }

    #[test]
    fn split_covers_text() {
        let parts = split_text("héllo wörld", 4);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.concat(), "héllo wörld");
        assert_eq!(split_text("ab", 5).len(), 2);
        assert_eq!(split_text("", 3), Vec::<String>::new());
    }

    #[test]
    fn tokens_count_chars() {
        assert_eq!(count_tokens(""), 1);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
    }

    #[test]
    fn object_string_query_and_audio() {
        let c = r#"[{"type":"text","text":"hello"},{"type":"audio","file_id":"1"}]"#;
        assert_eq!(query_of(c, "object_string"), ("hello".into(), true));
        assert_eq!(query_of("x", "text"), ("x".into(), false));
    }
}
