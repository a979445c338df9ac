//! Byte-exact SSE framing as production Coze sends it (coze-api.md §3.4, §6.2).
//!
//! Chat v3: `event:NAME\ndata:JSON\n\n`, no space after the colon, data on one line, nothing
//! else (cozepy rejects any other field). Workflows: `id: N\nevent: NAME\ndata: JSON\n\n`.

use bytes::Bytes;

/// One chat v3 event. `data` must be single-line JSON (serde_json's compact output is).
pub fn chat_event(event: &str, data: &str) -> Bytes {
    let mut s = String::with_capacity(event.len() + data.len() + 16);
    s.push_str("event:");
    s.push_str(event);
    s.push_str("\ndata:");
    s.push_str(data);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// One workflow stream event.
pub fn workflow_event(id: u64, event: &str, data: &str) -> Bytes {
    Bytes::from(format!("id: {id}\nevent: {event}\ndata: {data}\n\n"))
}

/// The end-of-stream event of chat v3.
pub fn chat_done() -> Bytes {
    chat_event("done", "\"[DONE]\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_framing_is_byte_exact() {
        assert_eq!(
            &chat_event("conversation.chat.created", r#"{"id":"1"}"#)[..],
            b"event:conversation.chat.created\ndata:{\"id\":\"1\"}\n\n"
        );
        assert_eq!(&chat_done()[..], b"event:done\ndata:\"[DONE]\"\n\n");
    }

    #[test]
    fn workflow_framing_is_byte_exact() {
        assert_eq!(
            &workflow_event(6, "Done", "{}")[..],
            b"id: 6\nevent: Done\ndata: {}\n\n"
        );
    }
}
