//! Per-request metering glue: picks a meter from what the *upstream answered* (status and
//! content type, never the request alone), feeds it the response bytes as they pass (the same
//! `Bytes` go on to the device unchanged), and yields the request's [`Usage`] at the end.
//!
//! | answer | meter |
//! |---|---|
//! | `text/event-stream` | [`SseMeter`]: chat v3 / workflow usage, audio deltas |
//! | JSON from `/v1/workflow/run`, `/v1/workflows/resume` | top-level `usage` (body copy capped at [`MAX_JSON`]) |
//! | `audio/*` from `/v1/audio/speech` | [`SpeechResponseMeter`]: request `input` chars + returned audio duration |
//! | JSON from `/v3/chat` (non-streaming) | none: the chat runs on after the answer (`status: in_progress`) and its usage appears only in later polls, so the hold's estimate is charged ([`Metered::estimated`]) |
//!
//! Non-2xx answers are not metered (the upstream rejected the request: no charge).

use bytes::Bytes;
use policy::metering::rest::workflow_run_usage;
use policy::metering::{SpeechRequest, SpeechResponseMeter, SseMeter, Usage};

/// Largest workflow JSON answer kept for metering; larger ones are relayed but not metered
/// (counted as `metering_errors`).
pub const MAX_JSON: usize = 1 << 20;
/// Largest `/v1/audio/speech` request body kept to read `input` (≤ 1024 bytes by contract).
pub const MAX_SPEECH_REQUEST: usize = 16 * 1024;

#[derive(Default)]
pub enum RequestMeter {
    #[default]
    None,
    Sse(Box<SseMeter>),
    WorkflowJson(Vec<u8>),
    Speech(Box<SpeechResponseMeter>),
    /// A non-streaming chat v3 answer: nothing to read, the estimate is charged.
    AsyncChat,
}

/// What a finished request consumed, and whether metering could be trusted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Metered {
    pub usage: Usage,
    /// The answer should have carried usage (a stream or a workflow run) but none was seen.
    pub missing_usage: bool,
    /// The meter could not read the answer (malformed or over a bound).
    pub error: bool,
    /// The answer carries no usage by design (non-streaming chat v3): the hold's estimate is
    /// the charge. Not counted as missing usage.
    pub estimated: bool,
}

impl RequestMeter {
    /// Chooses a meter for an upstream answer.
    pub fn for_answer(
        path: &str,
        status: u16,
        content_type: &str,
        speech_request: &[u8],
    ) -> RequestMeter {
        if !(200..300).contains(&status) {
            return RequestMeter::None;
        }
        if content_type.starts_with("text/event-stream") {
            return RequestMeter::Sse(Box::default());
        }
        if content_type.starts_with("application/json")
            && (path == "/v1/workflow/run" || path == "/v1/workflows/resume")
        {
            return RequestMeter::WorkflowJson(Vec::new());
        }
        if path == "/v3/chat" && content_type.starts_with("application/json") {
            return RequestMeter::AsyncChat;
        }
        if path == "/v1/audio/speech" && content_type.starts_with("audio/") {
            return match SpeechRequest::parse(speech_request) {
                Ok(req) => RequestMeter::Speech(Box::new(SpeechResponseMeter::new(req))),
                Err(e) => {
                    tracing::debug!(error = %e, "Speech request not meterable.");
                    RequestMeter::None
                }
            };
        }
        RequestMeter::None
    }

    /// Reads a response chunk (which is forwarded unchanged by the caller).
    pub fn feed(&mut self, chunk: &Bytes) {
        match self {
            RequestMeter::None => {}
            RequestMeter::Sse(m) => m.feed(chunk),
            RequestMeter::WorkflowJson(buf) => {
                if buf.len() + chunk.len() <= MAX_JSON {
                    buf.extend_from_slice(chunk);
                } else {
                    buf.clear();
                    buf.shrink_to_fit();
                    *self = RequestMeter::None;
                }
            }
            RequestMeter::Speech(m) => m.feed(chunk),
            RequestMeter::AsyncChat => {}
        }
    }

    pub fn finish(self) -> Metered {
        match self {
            RequestMeter::None => Metered::default(),
            RequestMeter::Sse(m) => {
                let error = m.error_count() > 0;
                let usage = m.finish();
                Metered {
                    usage,
                    missing_usage: usage.usage_events == 0,
                    error,
                    estimated: false,
                }
            }
            RequestMeter::WorkflowJson(buf) => match workflow_run_usage(&buf) {
                Ok(usage) => Metered {
                    usage,
                    missing_usage: usage.usage_events == 0,
                    ..Metered::default()
                },
                Err(_) => Metered {
                    error: true,
                    missing_usage: true,
                    ..Metered::default()
                },
            },
            RequestMeter::Speech(m) => Metered {
                usage: m.finish(),
                ..Metered::default()
            },
            RequestMeter::AsyncChat => Metered {
                estimated: true,
                ..Metered::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_answer_is_metered_from_chunks() {
        let mut m = RequestMeter::for_answer("/v3/chat", 200, "text/event-stream", b"");
        let stream = b"event:conversation.chat.completed\ndata:{\"usage\":{\"token_count\":30,\"output_count\":10,\"input_count\":20}}\n\nevent:done\ndata:\"[DONE]\"\n\n";
        for chunk in stream.chunks(7) {
            m.feed(&Bytes::copy_from_slice(chunk));
        }
        let out = m.finish();
        assert_eq!(
            (out.usage.llm_input_tokens, out.usage.llm_output_tokens),
            (20, 10)
        );
        assert!(!out.missing_usage);
    }

    #[test]
    fn rejected_answers_are_not_metered() {
        assert!(matches!(
            RequestMeter::for_answer("/v3/chat", 429, "text/event-stream", b""),
            RequestMeter::None
        ));
        assert!(matches!(
            RequestMeter::for_answer("/v3/chat", 400, "application/json", b""),
            RequestMeter::None
        ));
    }

    /// A non-streaming chat's answer has no usage (the chat has not run yet): the estimate is
    /// charged, and it is not reported as missing usage.
    #[test]
    fn non_streaming_chat_is_charged_the_estimate() {
        let m = RequestMeter::for_answer("/v3/chat", 200, "application/json", b"");
        let out = m.finish();
        assert!(out.estimated && !out.missing_usage && !out.error);
        let other =
            RequestMeter::for_answer("/v1/conversation/create", 200, "application/json", b"");
        assert!(!other.finish().estimated);
    }

    #[test]
    fn stream_without_usage_is_flagged() {
        let mut m = RequestMeter::for_answer("/v3/chat", 200, "text/event-stream", b"");
        m.feed(&Bytes::from_static(b"event:done\ndata:\"[DONE]\"\n\n"));
        assert!(m.finish().missing_usage);
    }
}
