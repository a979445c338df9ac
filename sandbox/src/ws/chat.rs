//! `GET /v1/chat?bot_id=&workflow_id=&device_id=`: duplex voice chat (`coze-api.md` §8.3, §8.4).
//!
//! # Session
//! `chat.created` on connect. `chat.update` merges the given fields into the session config
//! ("update" semantics: objects merge key by key, `null` keeps the old value) and answers
//! `chat.updated` with the whole effective config: `input_audio` with all five fields,
//! `output_audio` with `codec`, `pcm_config.sample_rate`/`frame_size_ms` (or `opus_config`),
//! `turn_detection` with its `type` (and VAD timings for `server_vad`), plus everything else the
//! client sent (`chat_config`, `asr_config`, ...). An invalid value is answered with
//! `error {4000}` and the update is not applied. `event_subscriptions` (non-empty) filters the
//! downlink to the listed events (`error` always passes). `need_play_prologue: true` speaks
//! `prologue_content` (or a default) once, like `input_text.generate_audio`.
//!
//! # Turns
//! `input_audio_buffer.append {delta}` counts the audio (see [`super::codec`]).
//! - `client_interrupt` (default): `input_audio_buffer.complete` answers
//!   `input_audio_buffer.completed` and starts the reply (with an empty buffer: `error {4000}`).
//! - `server_vad` / `semantic_vad`: any append is speech. The first append of an utterance sends
//!   `input_audio_buffer.speech_started` (and cancels a running reply with
//!   `conversation.chat.canceled {code:1}`, barge-in); once no append arrived for
//!   `silence_duration_ms` (default 500; real time, whatever `realtime_audio` says) the server
//!   sends `input_audio_buffer.speech_stopped` and starts the reply. `complete` is ignored.
//! - `conversation.message.create {role:user}` starts a reply to the text (a running one is
//!   canceled with code 3); `role: assistant` only joins the context.
//!
//! A reply is: `conversation.chat.created`, `conversation.chat.in_progress`, for audio turns
//! `conversation.audio_transcript.update` + `.completed` ("sandbox heard 1.20 s of audio") and
//! `conversation.message.completed` (the user's question), `chat_deltas`
//! `conversation.message.delta`s of the answer, `conversation.audio.sentence_start {text}`,
//! `conversation.audio.delta`s (one frame each, see [`super::codec`]; paced at the audio's own
//! duration when `realtime_audio` is on), `conversation.audio.completed`,
//! `conversation.message.completed` (answer) and `conversation.chat.completed` with
//! `usage {token_count, output_count, input_count}` (omitted under the `no_usage` fault).
//! With pacing, `audio.completed` goes out when the last frame has "played".
//!
//! `conversation.chat.cancel` stops a running reply at once and answers
//! `conversation.chat.canceled {code:2}`. `input_audio_buffer.clear` → `input_audio_buffer.cleared`;
//! `conversation.clear` → new section, `conversation.cleared`. `input_text.generate_audio` speaks
//! the text (`sentence_start`, audio deltas, `audio.completed`) without a bot turn.
//!
//! # Tools and failures
//! - Tools: with a `bot_id` ending in `_tools` (or a text message containing `#tool`) the reply
//!   stops after `conversation.chat.created`, `conversation.chat.in_progress` (and the audio
//!   transcript events), `conversation.message.completed` (a `function_call` message) and
//!   `conversation.chat.requires_action` (Chat with `required_action.submit_tool_outputs.tool_calls`:
//!   one `get_weather` function call, and usage with the input only). The uplink
//!   `conversation.chat.submit_tool_outputs {chat_id, tool_outputs:[{tool_call_id, output}]}`
//!   continues the same chat: `conversation.chat.in_progress`, then the rest of a normal reply
//!   (deltas, audio, `conversation.message.completed`, `conversation.chat.completed` whose usage
//!   input also counts the tool outputs). A submit without a pending action, with another
//!   `chat_id`, without `tool_outputs` or with an unknown `tool_call_id` is answered with
//!   `error {4000}` (the action stays pending, the connection open). A new turn or
//!   `conversation.chat.cancel` drops the pending action.
//! - Failures: with a `bot_id` ending in `_fail` or the `fail` fault knob, every reply stops after
//!   the first half of its `conversation.message.delta`s with `conversation.chat.failed` (Chat with
//!   `status: failed`, `failed_at`, `last_error {code: 5000, msg}` and usage: input + the streamed
//!   part; omitted under `no_usage`); no audio is sent. Failing wins over tools.

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::{Instant, sleep_until};

use super::codec::{FramePlan, FrameSource, InputFormat, InputMeter, OutputFormat};
use super::{
    Downlink, End, SessionInfo, Uplink, audio_delta, data_object, merge, parse_uplink, query_param,
    tokens,
};
use crate::audio::speech_duration_ms;
use crate::auth::now_unix;
use crate::chat::{fail_error, failed_pieces, should_fail};

const OUTPUT_CODECS: [&str; 4] = ["pcm", "g711a", "g711u", "opus"];
const ANSWERS: [&str; 3] = [
    "Hello from the sandbox. This answer is synthetic.",
    "The sandbox heard you and replies with a test tone.",
    "This is a deterministic reply from the Coze sandbox.",
];
const DEFAULT_PROLOGUE: &str = "Hi, I am the sandbox bot.";

/// Runs one `/v1/chat` session until the client leaves or a fault ends it.
pub async fn run(mut dl: Downlink, info: SessionInfo) {
    let mut s = ChatSession::new(&dl, &info);
    if dl.send_empty("chat.created").await.is_err() {
        return;
    }
    // Any end (peer gone, injected reset) just drops the socket: no close frame.
    let _ = s.serve(&mut dl).await;
}

enum Step {
    Event(&'static str, Value),
    Audio(Box<AudioStream>),
}

struct AudioStream {
    plan: FramePlan,
    msg_id: String,
    chat_id: String,
    /// Set when the first frame goes out; pacing is relative to it.
    started: bool,
}

struct Reply {
    queue: VecDeque<Step>,
    next_at: Instant,
}

/// A chat waiting for `conversation.chat.submit_tool_outputs`.
struct PendingAction {
    chat_id: String,
    call_ids: Vec<String>,
    /// Input tokens of the question (the continuation adds the tool outputs).
    input_tokens: u64,
}

impl PendingAction {
    /// Reads the action from the `conversation.chat.requires_action` Chat.
    fn from_chat(chat: &Value) -> Option<Self> {
        let calls = chat
            .pointer("/required_action/submit_tool_outputs/tool_calls")?
            .as_array()?;
        Some(Self {
            chat_id: chat.get("id")?.as_str()?.to_owned(),
            call_ids: calls
                .iter()
                .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_owned))
                .collect(),
            input_tokens: chat
                .pointer("/usage/input_count")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        })
    }
}

#[derive(Serialize)]
struct AudioDelta<'a> {
    id: &'a str,
    conversation_id: &'a str,
    bot_id: &'a str,
    chat_id: &'a str,
    section_id: &'a str,
    role: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    content: String,
    content_type: &'static str,
}

struct ChatSession {
    bot_id: String,
    conversation_id: String,
    section_id: String,
    cfg: Map<String, Value>,
    input: InputFormat,
    output: OutputFormat,
    source: FrameSource,
    /// `Some(silence)` in server/semantic VAD mode.
    vad: Option<Duration>,
    buffer: InputMeter,
    vad_deadline: Option<Instant>,
    reply: Option<Reply>,
    pending: Option<PendingAction>,
    /// `bot_id` ends in `_tools`: replies call a tool.
    tools: bool,
    /// `bot_id` ends in `_fail` or the `fail` knob: replies fail.
    fail: bool,
    prologue_played: bool,
    turn: u64,
    realtime: bool,
    seed: u64,
    deltas: usize,
}

impl ChatSession {
    fn new(dl: &Downlink, info: &SessionInfo) -> Self {
        let st = dl.state();
        let bot_id = query_param(&info.query, "bot_id").unwrap_or_default();
        Self {
            tools: bot_id.ends_with("_tools"),
            fail: should_fail(&bot_id, dl.fault()),
            pending: None,
            bot_id,
            conversation_id: st.next_id(),
            section_id: st.next_id(),
            cfg: Map::new(),
            input: InputFormat::default(),
            output: OutputFormat::default(),
            source: OutputFormat::default().source(st.config.seed),
            vad: None,
            buffer: InputMeter::default(),
            vad_deadline: None,
            reply: None,
            prologue_played: false,
            turn: 0,
            realtime: st.config.realtime_audio,
            seed: st.config.seed,
            deltas: st.config.chat_deltas.max(1),
        }
    }

    async fn serve(&mut self, dl: &mut Downlink) -> Result<(), End> {
        let far = Duration::from_secs(3600);
        loop {
            let now = Instant::now();
            let reply_at = self.reply.as_ref().map(|r| r.next_at);
            let vad_at = self.vad_deadline;
            tokio::select! {
                biased;
                msg = dl.socket.recv() => match parse_uplink(msg) {
                    Uplink::Gone => return Ok(()),
                    Uplink::Close => {
                        dl.finish_close().await;
                        return Ok(());
                    }
                    Uplink::Ignore => {}
                    Uplink::Invalid(m) => dl.error(4000, m).await?,
                    Uplink::Event(et, data) => self.on_event(dl, &et, &data).await?,
                },
                () = sleep_until(vad_at.unwrap_or(now + far)), if vad_at.is_some() => {
                    self.on_silence(dl).await?;
                }
                () = sleep_until(reply_at.unwrap_or(now + far)), if reply_at.is_some() => {
                    self.step_reply(dl).await?;
                }
            }
        }
    }

    async fn on_event(&mut self, dl: &mut Downlink, et: &str, data: &Value) -> Result<(), End> {
        match et {
            "chat.update" => self.on_update(dl, data).await,
            "input_audio_buffer.append" => match audio_delta(data) {
                Ok(bytes) => self.on_append(dl, &bytes).await,
                Err(m) => dl.error(4000, m).await,
            },
            "input_audio_buffer.complete" => {
                if self.vad.is_some() {
                    return Ok(()); // ignored in server_vad
                }
                dl.send_empty("input_audio_buffer.completed").await?;
                if self.buffer.is_empty() {
                    return dl.error(4000, "input audio buffer is empty").await;
                }
                self.start_audio_turn(dl).await
            }
            "input_audio_buffer.clear" => {
                self.buffer = InputMeter::default();
                self.vad_deadline = None;
                dl.send_empty("input_audio_buffer.cleared").await
            }
            "conversation.message.create" => {
                let role = data.get("role").and_then(Value::as_str).unwrap_or_default();
                let content = data
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match role {
                    "user" if !content.is_empty() => {
                        self.cancel(dl, 3, "interrupted by a new message").await?;
                        self.start_turn(dl, content.to_owned(), false);
                        Ok(())
                    }
                    "assistant" => Ok(()),
                    _ => {
                        dl.error(4000, "message.create needs role user|assistant and content")
                            .await
                    }
                }
            }
            "conversation.clear" => {
                self.section_id = dl.state().next_id();
                dl.send_empty("conversation.cleared").await
            }
            "conversation.chat.cancel" => {
                self.pending = None;
                if self.reply.is_none() {
                    let data = json!({"code": 2, "msg": "no chat in progress"});
                    return dl.send("conversation.chat.canceled", Some(&data)).await;
                }
                self.cancel(dl, 2, "canceled by client").await
            }
            "input_text.generate_audio" => {
                let text = data.get("text").and_then(Value::as_str).unwrap_or_default();
                if text.is_empty() || text.len() >= 1024 {
                    return dl.error(4000, "text must be 1..1023 bytes").await;
                }
                self.cancel(dl, 3, "interrupted by generate_audio").await?;
                self.speak(dl, text.to_owned());
                Ok(())
            }
            "conversation.chat.submit_tool_outputs" => self.on_submit_tool_outputs(dl, data).await,
            other => dl.error(4000, format!("unknown event type: {other}")).await,
        }
    }

    async fn on_update(&mut self, dl: &mut Downlink, data: &Value) -> Result<(), End> {
        let update = match data_object(data) {
            Ok(u) => u,
            Err(m) => return dl.error(4000, m).await,
        };
        let mut cfg = self.cfg.clone();
        merge(&mut cfg, &update);
        let obj = |k: &str| {
            cfg.get(k)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        };
        let out_raw = obj("output_audio");
        let input = InputFormat::from_config(&obj("input_audio"));
        let output = OutputFormat::from_config(&out_raw, &OUTPUT_CODECS);
        let turn = parse_turn_detection(&obj("turn_detection"));
        let (input, output, (vad, td)) = match (input, output, turn) {
            (Ok(i), Ok(o), Ok(t)) => (i, o, t),
            (Err(m), _, _) | (_, Err(m), _) | (_, _, Err(m)) => return dl.error(4000, m).await,
        };
        // `cfg` keeps what clients sent (later updates merge into it); the echo adds the
        // effective values.
        let mut echo = cfg.clone();
        echo.insert("input_audio".into(), input.to_json());
        echo.insert("output_audio".into(), output.to_json(&out_raw));
        echo.insert("turn_detection".into(), td);
        if let Some(c) = cfg.get("chat_config").and_then(Value::as_object)
            && let Some(id) = c.get("conversation_id").and_then(Value::as_str)
            && !id.is_empty()
        {
            self.conversation_id = id.to_owned();
        }
        dl.subscriptions = cfg
            .get("event_subscriptions")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            });
        let prologue = (cfg.get("need_play_prologue") == Some(&Value::Bool(true))
            && !self.prologue_played)
            .then(|| {
                cfg.get("prologue_content")
                    .and_then(Value::as_str)
                    .unwrap_or(DEFAULT_PROLOGUE)
                    .to_owned()
            });
        self.input = input;
        self.source = output.source(self.seed);
        self.output = output;
        if vad.is_none() {
            self.vad_deadline = None;
        }
        self.vad = vad;
        let echo = Value::Object(echo);
        self.cfg = cfg;
        dl.send("chat.updated", Some(&echo)).await?;
        if let Some(text) = prologue {
            self.prologue_played = true;
            self.speak(dl, text);
        }
        Ok(())
    }

    async fn on_append(&mut self, dl: &mut Downlink, bytes: &[u8]) -> Result<(), End> {
        self.buffer.add(&self.input, bytes);
        if let Some(silence) = self.vad {
            if self.vad_deadline.is_none() {
                dl.send_empty("input_audio_buffer.speech_started").await?;
                self.cancel(dl, 1, "interrupted by user speech").await?;
            }
            self.vad_deadline = Some(Instant::now() + silence);
        }
        Ok(())
    }

    async fn on_silence(&mut self, dl: &mut Downlink) -> Result<(), End> {
        self.vad_deadline = None;
        dl.send_empty("input_audio_buffer.speech_stopped").await?;
        if !self.buffer.is_empty() {
            self.start_audio_turn(dl).await?;
        }
        Ok(())
    }

    async fn start_audio_turn(&mut self, dl: &mut Downlink) -> Result<(), End> {
        let heard = format!("sandbox heard {:.2} s of audio", self.buffer.seconds());
        self.buffer = InputMeter::default();
        self.cancel(dl, 1, "interrupted by user speech").await?;
        self.start_turn(dl, heard, true);
        Ok(())
    }

    /// Stops a running reply with `conversation.chat.canceled {code}`; no-op without one.
    async fn cancel(&mut self, dl: &mut Downlink, code: i64, msg: &str) -> Result<(), End> {
        if self.reply.take().is_some() {
            let data = json!({"code": code, "msg": msg});
            dl.send("conversation.chat.canceled", Some(&data)).await?;
        }
        Ok(())
    }

    fn message(
        &self,
        chat_id: &str,
        id: &str,
        role: &str,
        kind: &str,
        content: &str,
        ct: &str,
    ) -> Value {
        let now = now_unix();
        json!({
            "id": id, "conversation_id": self.conversation_id, "bot_id": self.bot_id,
            "chat_id": chat_id, "section_id": self.section_id, "role": role, "type": kind,
            "content": content, "content_type": ct, "created_at": now, "updated_at": now,
        })
    }

    fn chat(&self, chat_id: &str, status: &str) -> Value {
        json!({
            "id": chat_id, "conversation_id": self.conversation_id, "bot_id": self.bot_id,
            "section_id": self.section_id, "created_at": now_unix(), "status": status,
        })
    }

    fn audio_stream(&self, text: &str, chat_id: &str, msg_id: &str) -> Step {
        let ms = speech_duration_ms(text, self.output.speed);
        Step::Audio(Box::new(AudioStream {
            plan: self.output.plan(ms),
            msg_id: msg_id.to_owned(),
            chat_id: chat_id.to_owned(),
            started: false,
        }))
    }

    /// Queues a full bot reply to `question` (or, for tool/failing bots, the start of one).
    fn start_turn(&mut self, dl: &Downlink, question: String, from_audio: bool) {
        self.turn += 1;
        self.pending = None;
        let st = dl.state();
        let chat_id = st.next_id();
        let answer_id = st.next_id();
        let answer = ANSWERS[((self.seed + self.turn) % ANSWERS.len() as u64) as usize];
        let input = tokens(&question);
        let mut q = VecDeque::new();
        q.push_back(Step::Event(
            "conversation.chat.created",
            self.chat(&chat_id, "created"),
        ));
        q.push_back(Step::Event(
            "conversation.chat.in_progress",
            self.chat(&chat_id, "in_progress"),
        ));
        if from_audio {
            let t = json!({"content": question});
            q.push_back(Step::Event(
                "conversation.audio_transcript.update",
                t.clone(),
            ));
            q.push_back(Step::Event("conversation.audio_transcript.completed", t));
            let m = self.message(
                &chat_id,
                &st.next_id(),
                "user",
                "question",
                &question,
                "text",
            );
            q.push_back(Step::Event("conversation.message.completed", m));
        }
        if self.fail {
            let pieces = failed_pieces(answer, self.deltas);
            for piece in &pieces {
                let m = self.message(&chat_id, &answer_id, "assistant", "answer", piece, "text");
                q.push_back(Step::Event("conversation.message.delta", m));
            }
            if !dl.fault().no_usage {
                let partial = pieces.concat();
                let output = if partial.is_empty() {
                    0
                } else {
                    tokens(&partial)
                };
                let mut c = self.chat(&chat_id, "failed");
                c["last_error"] = fail_error();
                c["usage"] = usage(input, output);
                q.push_back(Step::Event("conversation.chat.failed", c));
            }
        } else if self.tools || (!from_audio && question.contains("#tool")) {
            let call_id = format!("call_{}", st.next_id());
            let location: String = question.chars().take(40).collect();
            let content = json!({"name": "get_weather", "arguments": {"location": location},
                                 "plugin_id": "sandbox", "api_name": "get_weather"})
            .to_string();
            let m = self.message(
                &chat_id,
                &st.next_id(),
                "assistant",
                "function_call",
                &content,
                "text",
            );
            q.push_back(Step::Event("conversation.message.completed", m));
            let mut c = self.chat(&chat_id, "requires_action");
            c["required_action"] = json!({
                "type": "submit_tool_outputs",
                "submit_tool_outputs": {"tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": "get_weather", "arguments": json!({"location": location}).to_string()}
                }]}
            });
            c["usage"] = usage(input, 0);
            q.push_back(Step::Event("conversation.chat.requires_action", c));
        } else {
            self.push_answer(&mut q, dl, &chat_id, &answer_id, answer, input);
        }
        self.reply = Some(Reply {
            queue: q,
            next_at: Instant::now(),
        });
    }

    /// Queues the answer part of a reply: deltas, audio, `message.completed` and
    /// `chat.completed` (usage: `input` + the answer).
    fn push_answer(
        &self,
        q: &mut VecDeque<Step>,
        dl: &Downlink,
        chat_id: &str,
        answer_id: &str,
        answer: &str,
        input: u64,
    ) {
        for piece in split_text(answer, self.deltas) {
            let m = self.message(chat_id, answer_id, "assistant", "answer", &piece, "text");
            q.push_back(Step::Event("conversation.message.delta", m));
        }
        q.push_back(Step::Event(
            "conversation.audio.sentence_start",
            json!({"text": answer}),
        ));
        q.push_back(self.audio_stream(answer, chat_id, answer_id));
        let done = self.message(chat_id, answer_id, "assistant", "answer", "", "audio");
        q.push_back(Step::Event("conversation.audio.completed", done));
        let m = self.message(chat_id, answer_id, "assistant", "answer", answer, "text");
        q.push_back(Step::Event("conversation.message.completed", m));
        if !dl.fault().no_usage {
            let mut c = self.chat(chat_id, "completed");
            c["usage"] = usage(input, tokens(answer));
            q.push_back(Step::Event("conversation.chat.completed", c));
        }
    }

    /// `conversation.chat.submit_tool_outputs`: continues the chat waiting for them.
    async fn on_submit_tool_outputs(&mut self, dl: &mut Downlink, data: &Value) -> Result<(), End> {
        let Some(pending) = &self.pending else {
            return dl.error(4000, "no chat is waiting for tool outputs").await;
        };
        let chat_id = data
            .get("chat_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if chat_id != pending.chat_id {
            let msg = format!("chat {chat_id:?} is not waiting for tool outputs");
            return dl.error(4000, msg).await;
        }
        let Some(outputs) = data
            .get("tool_outputs")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
        else {
            return dl.error(4000, "tool_outputs is required").await;
        };
        let mut texts = Vec::with_capacity(outputs.len());
        for o in outputs {
            let id = o
                .get("tool_call_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !pending.call_ids.iter().any(|c| c == id) {
                let msg = format!("unknown tool_call_id {id:?}");
                return dl.error(4000, msg).await;
            }
            texts.push(o.get("output").and_then(Value::as_str).unwrap_or_default());
        }
        let joined = texts.join(" ");
        let input = pending.input_tokens + tokens(&joined);
        let chat_id = pending.chat_id.clone();
        self.pending = None;
        self.cancel(dl, 3, "interrupted by tool outputs").await?;
        self.turn += 1;
        let answer_id = dl.state().next_id();
        let base = ANSWERS[((self.seed + self.turn) % ANSWERS.len() as u64) as usize];
        let answer = format!(
            "Tool output received ({}). {base}",
            joined.chars().take(40).collect::<String>()
        );
        let mut q = VecDeque::new();
        q.push_back(Step::Event(
            "conversation.chat.in_progress",
            self.chat(&chat_id, "in_progress"),
        ));
        self.push_answer(&mut q, dl, &chat_id, &answer_id, &answer, input);
        self.reply = Some(Reply {
            queue: q,
            next_at: Instant::now(),
        });
        Ok(())
    }

    /// Queues `text` as speech only (prologue, `input_text.generate_audio`).
    fn speak(&mut self, dl: &Downlink, text: String) {
        let st = dl.state();
        let (chat_id, msg_id) = (st.next_id(), st.next_id());
        let mut q = VecDeque::new();
        q.push_back(Step::Event(
            "conversation.audio.sentence_start",
            json!({"text": text}),
        ));
        q.push_back(self.audio_stream(&text, &chat_id, &msg_id));
        let done = self.message(&chat_id, &msg_id, "assistant", "answer", "", "audio");
        q.push_back(Step::Event("conversation.audio.completed", done));
        self.reply = Some(Reply {
            queue: q,
            next_at: Instant::now(),
        });
    }

    /// Sends the next event or audio frame of the running reply.
    async fn step_reply(&mut self, dl: &mut Downlink) -> Result<(), End> {
        let Some(reply) = self.reply.as_mut() else {
            return Ok(());
        };
        match reply.queue.front_mut() {
            None => {}
            Some(Step::Event(..)) => {
                if let Some(Step::Event(name, mut data)) = reply.queue.pop_front() {
                    match name {
                        "conversation.chat.completed" => {
                            data["completed_at"] = json!(now_unix());
                        }
                        "conversation.chat.failed" => {
                            let now = json!(now_unix());
                            data["completed_at"] = now.clone();
                            data["failed_at"] = now;
                        }
                        "conversation.chat.requires_action" => {
                            self.pending = PendingAction::from_chat(&data);
                        }
                        _ => {}
                    }
                    dl.send(name, Some(&data)).await?;
                }
            }
            Some(Step::Audio(a)) => match a.plan.next_frame() {
                Some((start_us, dur_us)) => {
                    if !a.started {
                        a.started = true;
                        reply.next_at = Instant::now();
                    }
                    let content = base64::engine::general_purpose::STANDARD
                        .encode(self.source.frame(start_us, dur_us));
                    let delta = AudioDelta {
                        id: &a.msg_id,
                        conversation_id: &self.conversation_id,
                        bot_id: &self.bot_id,
                        chat_id: &a.chat_id,
                        section_id: &self.section_id,
                        role: "assistant",
                        kind: "answer",
                        content,
                        content_type: "audio",
                    };
                    reply.next_at += self.output.interval(dur_us, self.realtime);
                    dl.send("conversation.audio.delta", Some(&delta)).await?;
                }
                None => {
                    reply.queue.pop_front();
                }
            },
        }
        if self.reply.as_ref().is_some_and(|r| r.queue.is_empty()) {
            self.reply = None;
        }
        Ok(())
    }
}

/// `usage {token_count, output_count, input_count}`.
fn usage(input: u64, output: u64) -> Value {
    json!({"token_count": input + output, "output_count": output, "input_count": input})
}

/// `turn_detection` → VAD silence (`None` for client_interrupt) and the effective echo.
fn parse_turn_detection(m: &Map<String, Value>) -> Result<(Option<Duration>, Value), String> {
    let kind = m
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("client_interrupt");
    let mut echo = m.clone();
    echo.insert("type".into(), json!(kind));
    match kind {
        "client_interrupt" => Ok((None, Value::Object(echo))),
        "server_vad" | "semantic_vad" => {
            let num = |k: &str, d: u64| match m.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v
                    .as_u64()
                    .ok_or(format!("turn_detection.{k} must be a positive integer")),
            };
            let silence = num("silence_duration_ms", 500)?;
            let padding = num("prefix_padding_ms", 600)?;
            echo.insert("silence_duration_ms".into(), json!(silence));
            echo.insert("prefix_padding_ms".into(), json!(padding));
            Ok((Some(Duration::from_millis(silence)), Value::Object(echo)))
        }
        other => Err(format!("unsupported turn_detection.type: {other}")),
    }
}

/// Splits `text` into `n` pieces of about equal character count (fewer if it is short).
fn split_text(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_all_text() {
        let parts = split_text("hello world", 4);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.concat(), "hello world");
        assert_eq!(split_text("ab", 4).concat(), "ab");
    }

    #[test]
    fn turn_detection_defaults() {
        let (vad, echo) = parse_turn_detection(&Map::new()).unwrap_or((None, Value::Null));
        assert_eq!(vad, None);
        assert_eq!(echo["type"], "client_interrupt");
        let m = json!({"type": "server_vad"});
        let (vad, echo) = parse_turn_detection(m.as_object().unwrap_or(&Map::new()))
            .unwrap_or((None, Value::Null));
        assert_eq!(vad, Some(Duration::from_millis(500)));
        assert_eq!(echo["silence_duration_ms"], 500);
    }
}
