//! Workflows (coze-api.md §6).
//!
//! | endpoint | answer |
//! |---|---|
//! | `POST /v1/workflow/run` | flat: `data` (a JSON *string* `{"output":…}`), `execute_id`, `debug_url`, `usage` (+ `interrupt_data`) |
//! | `POST /v1/workflows/resume` | same flat shape |
//! | `POST /v1/workflow/stream_run` | SSE `id: N\nevent: X\ndata: JSON\n\n`: `Message`… (last one with `usage`), `Done` `{"debug_url"}` |
//! | `POST /v1/workflow/stream_resume` | same SSE, resumed run (never interrupts again) |
//! | `POST /v1/workflows/chat` | chat v3 SSE (see [`crate::chat`]), `done` data `{"debug_url":…}` |
//!
//! Sandbox conventions:
//! - Output is deterministic: [`crate::chat::reply_text`] of the serialised `parameters`,
//!   streamed as [`MESSAGE_CHUNKS`] `Message` events of the `End` node.
//! - A `workflow_id` ending in `_interrupt` stops at a question node: stream runs send an
//!   `Interrupt` event (`type` 2, `event_id` `<execute_id>/interrupt`) then `Done`; the sync
//!   run answers with `interrupt_data`. Resuming completes the run.
//! - When [`crate::SandboxConfig::sse_event_delay`] is at least [`PING_THRESHOLD`], a `PING`
//!   heartbeat event (data `{}`) precedes every `Message`/`Done` event.
//! - Usage: input = [`crate::chat::count_tokens`] of the parameters JSON (or resume data),
//!   output = that of the output; `no_usage` drops it from the last `Message`.
//! - The `fail` fault knob makes `/v1/workflows/chat` end in `conversation.chat.failed`
//!   (see [`crate::chat`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Map, Value, json};

use crate::chat::{
    TurnInput, Usage, answer_turn, build_turn, count_tokens, prepare, reply_text, split_text,
    sse_response,
};
use crate::conversations::{json_body, meta, prelude, str_field};
use crate::envelope::{self, ApiError, ApiResult};
use crate::faults::Fault;
use crate::sse;
use crate::state::SandboxState;

/// `Message` events per stream run.
pub const MESSAGE_CHUNKS: usize = 4;
/// SSE delay from which workflow streams carry `PING` heartbeats.
pub const PING_THRESHOLD: Duration = Duration::from_millis(200);

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/v1/workflow/run", post(run))
        .route("/v1/workflows/resume", post(resume))
        .route("/v1/workflow/stream_run", post(stream_run))
        .route("/v1/workflow/stream_resume", post(stream_resume))
        .route("/v1/workflows/chat", post(chat))
}

fn debug_url(workflow_id: &str, execute_id: &str) -> String {
    format!(
        "https://www.coze.cn/work_flow?execute_id={execute_id}&space_id=7000000000000000001&workflow_id={workflow_id}&execute_mode=2"
    )
}

/// One workflow run's computed result.
struct Outcome {
    workflow_id: String,
    execute_id: String,
    output: String,
    usage: Usage,
    interrupt: bool,
}

fn outcome(
    st: &SandboxState,
    b: &Value,
    input: &str,
    may_interrupt: bool,
) -> Result<Outcome, ApiError> {
    let workflow_id = str_field(b, "workflow_id")
        .ok_or_else(|| ApiError::bad_request("workflow_id is required"))?
        .to_owned();
    if str_field(b, "bot_id").is_some() && str_field(b, "app_id").is_some() {
        return Err(ApiError::bad_request(
            "bot_id and app_id cannot both be set",
        ));
    }
    let output = reply_text(st.config.seed, input);
    Ok(Outcome {
        interrupt: may_interrupt && workflow_id.ends_with("_interrupt"),
        execute_id: st.next_id(),
        usage: Usage::new(count_tokens(input), count_tokens(&output)),
        workflow_id,
        output,
    })
}

fn params_text(b: &Value) -> String {
    b.get("parameters")
        .map(Value::to_string)
        .unwrap_or_else(|| "{}".into())
}

fn resume_input(b: &Value) -> Result<String, ApiError> {
    str_field(b, "event_id").ok_or_else(|| ApiError::bad_request("event_id is required"))?;
    b.get("interrupt_type")
        .and_then(Value::as_i64)
        .ok_or_else(|| ApiError::bad_request("interrupt_type is required"))?;
    Ok(b.get("resume_data")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned())
}

fn flat(o: &Outcome, is_async: bool) -> axum::response::Response {
    let mut f = Map::new();
    let data = if o.interrupt || is_async {
        String::new()
    } else {
        json!({"output": o.output}).to_string()
    };
    f.insert("data".into(), json!(data));
    f.insert("execute_id".into(), json!(o.execute_id));
    f.insert(
        "debug_url".into(),
        json!(debug_url(&o.workflow_id, &o.execute_id)),
    );
    if !is_async {
        f.insert(
            "usage".into(),
            serde_json::to_value(o.usage).unwrap_or(Value::Null),
        );
    }
    if o.interrupt {
        f.insert(
            "interrupt_data".into(),
            json!({"event_id": format!("{}/interrupt", o.execute_id), "type": 2,
                   "data": "{\"question\":\"Which city?\"}", "required_parameters": {}}),
        );
    }
    envelope::ok_flat(f)
}

async fn run(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    let o = outcome(&st, &b, &params_text(&b), true)?;
    let is_async = b.get("is_async").and_then(Value::as_bool).unwrap_or(false);
    Ok(flat(&o, is_async))
}

async fn resume(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    let input = resume_input(&b)?;
    let o = outcome(&st, &b, &input, false)?;
    Ok(flat(&o, false))
}

/// The `id:/event:/data:` events of a stream run.
fn stream_events(st: &SandboxState, o: &Outcome, fault: &Fault) -> Vec<Bytes> {
    let ping = st.config.sse_event_delay >= PING_THRESHOLD;
    let mut ev = Vec::new();
    let mut id = 0u64;
    let mut push = |ev: &mut Vec<Bytes>, name: &str, data: String| {
        if ping {
            ev.push(sse::workflow_event(id, "PING", "{}"));
            id += 1;
        }
        ev.push(sse::workflow_event(id, name, &data));
        id += 1;
    };
    if o.interrupt {
        push(
            &mut ev,
            "Message",
            json!({"content": "Which city?", "node_title": "Question", "node_seq_id": "0",
                   "node_is_finish": true, "ext": null})
            .to_string(),
        );
        push(
            &mut ev,
            "Interrupt",
            json!({"interrupt_data": {"event_id": format!("{}/interrupt", o.execute_id), "type": 2},
                   "node_title": "Question"})
            .to_string(),
        );
    } else {
        let pieces = split_text(&o.output, MESSAGE_CHUNKS);
        let last = pieces.len().saturating_sub(1);
        for (i, p) in pieces.into_iter().enumerate() {
            let mut m = json!({"content": p, "node_title": "End", "node_seq_id": i.to_string(),
                               "node_is_finish": i == last, "ext": null});
            if i == last && !fault.no_usage {
                m["usage"] = serde_json::to_value(o.usage).unwrap_or(Value::Null);
            }
            push(&mut ev, "Message", m.to_string());
        }
    }
    push(
        &mut ev,
        "Done",
        json!({"debug_url": debug_url(&o.workflow_id, &o.execute_id)}).to_string(),
    );
    ev
}

fn malformed_workflow_event() -> Bytes {
    Bytes::from_static(b"id: 999\nevent: Message\ndata: {\"content\":\n\n")
}

fn respond_stream(st: &SandboxState, o: &Outcome, fault: Fault) -> axum::response::Response {
    let events = stream_events(st, o, &fault);
    sse_response(
        events,
        fault,
        st.config.sse_event_delay,
        malformed_workflow_event(),
        None,
    )
}

async fn stream_run(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let fault = Fault::from_request(&headers, q.as_deref());
    let b = json_body(&body)?;
    let o = outcome(&st, &b, &params_text(&b), true)?;
    Ok(respond_stream(&st, &o, fault))
}

async fn stream_resume(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let fault = Fault::from_request(&headers, q.as_deref());
    let b = json_body(&body)?;
    let input = resume_input(&b)?;
    let o = outcome(&st, &b, &input, false)?;
    Ok(respond_stream(&st, &o, fault))
}

async fn chat(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let fault = Fault::from_request(&headers, q.as_deref());
    let b = json_body(&body)?;
    let workflow_id = str_field(&b, "workflow_id")
        .ok_or_else(|| ApiError::bad_request("workflow_id is required"))?;
    if str_field(&b, "bot_id").is_some() && str_field(&b, "app_id").is_some() {
        return Err(ApiError::bad_request(
            "bot_id and app_id cannot both be set",
        ));
    }
    let additional = b
        .get("additional_messages")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::bad_request("additional_messages is required"))?;
    if additional.len() > 50 {
        return Err(ApiError::new(
            axum::http::StatusCode::OK,
            4004,
            "too many additional_messages",
        ));
    }
    let bot_id = str_field(&b, "bot_id")
        .or(str_field(&b, "app_id"))
        .unwrap_or(workflow_id);
    let p = prepare(
        &st,
        str_field(&b, "conversation_id"),
        bot_id,
        additional,
        true,
    )?;
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
            tools: false,
            audio: false,
            inserted: p.inserted,
            fail: fault.fail,
        },
        answer,
    );
    let done = json!({"debug_url": debug_url(workflow_id, &turn.rec.chat.id)}).to_string();
    Ok(answer_turn(&st, turn, true, fault, &done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SandboxConfig;

    fn state(delay_ms: u64) -> SandboxState {
        let cfg = SandboxConfig {
            sse_event_delay: Duration::from_millis(delay_ms),
            ..Default::default()
        };
        SandboxState::new(cfg, std::net::SocketAddr::from(([127, 0, 0, 1], 1)))
    }

    #[test]
    fn stream_ids_are_sequential_and_end_with_done() {
        let st = state(0);
        let o = outcome(
            &st,
            &json!({"workflow_id": "wf", "parameters": {"a": 1}}),
            "{}",
            true,
        )
        .unwrap();
        let ev = stream_events(&st, &o, &Fault::default());
        assert_eq!(ev.len(), MESSAGE_CHUNKS + 1);
        for (i, e) in ev.iter().enumerate() {
            assert!(e.starts_with(format!("id: {i}\nevent: ").as_bytes()));
        }
        assert!(ev[MESSAGE_CHUNKS].starts_with(b"id: 4\nevent: Done\ndata: {\"debug_url\""));
        assert!(String::from_utf8_lossy(&ev[MESSAGE_CHUNKS - 1]).contains("\"usage\""));
    }

    #[test]
    fn slow_streams_ping_and_interrupts_interrupt() {
        let st = state(250);
        let o = outcome(&st, &json!({"workflow_id": "wf_interrupt"}), "{}", true).unwrap();
        let ev = stream_events(&st, &o, &Fault::default());
        let names: Vec<String> = ev
            .iter()
            .map(|e| {
                String::from_utf8_lossy(e)
                    .lines()
                    .nth(1)
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            ["PING", "Message", "PING", "Interrupt", "PING", "Done"].map(|n| format!("event: {n}"))
        );
    }
}
