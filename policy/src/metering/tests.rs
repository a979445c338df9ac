//! Meter tests: byte-exact samples, chunk-split invariance, and garbage resistance.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;

use super::*;

/// Chat v3 SSE as captured (coze-api §3.4): no space after the colon, `\n` line endings.
const CHAT_SSE: &str = concat!(
    "event:conversation.chat.created\n",
    r#"data:{"id":"7382159487131697202","conversation_id":"7381473525342978089","bot_id":"7379462189365198898","status":"created","usage":{"token_count":0,"output_count":0,"input_count":0}}"#,
    "\n\n",
    "event:conversation.message.delta\n",
    r#"data:{"id":"7382159494123470858","role":"assistant","type":"answer","content":"星期三","content_type":"text","chat_id":"7382159487131697202"}"#,
    "\n\n",
    "event:conversation.message.completed\n",
    r#"data:{"id":"7382159494123470858","role":"assistant","type":"answer","content":"今天是星期三","content_type":"text","chat_id":"7382159487131697202"}"#,
    "\n\n",
    "event:conversation.chat.completed\n",
    r#"data:{"id":"7382159487131697202","conversation_id":"7381473525342978089","bot_id":"7379462189365198898","completed_at":1718792949,"last_error":{"code":0,"msg":""},"status":"completed","usage":{"token_count":633,"output_count":19,"input_count":614}}"#,
    "\n\n",
    "event:done\n",
    "data:\"[DONE]\"\n\n",
);

/// Workflow stream_run SSE (coze-api §6.2), `id:`/`event:`/`data:` with spaces, two nodes.
const WORKFLOW_SSE: &str = concat!(
    "id: 0\nevent: Message\n",
    r#"data: {"content":"为","node_is_finish":false,"node_seq_id":"0","node_title":"LLM","node_execute_uuid":"u1","usage":{"input_count":10,"output_count":5,"token_count":15}}"#,
    "\n\n",
    "id: 1\nevent: Message\n",
    r#"data: {"content":"你","node_is_finish":true,"node_seq_id":"1","node_title":"LLM","node_execute_uuid":"u1","usage":{"input_count":10,"output_count":8,"token_count":18}}"#,
    "\n\n",
    "id: 2\nevent: PING\ndata: {}\n\n",
    "id: 3\nevent: Message\n",
    r#"data: {"content":"好","node_is_finish":true,"node_seq_id":"0","node_title":"End","node_execute_uuid":"u2","usage":{"input_count":20,"output_count":3,"token_count":23}}"#,
    "\n\n",
    "id: 4\nevent: Message\n",
    r#"data: {"content":"为","node_is_finish":false,"node_seq_id":"0","node_title":"Message"}"#,
    "\n\n",
    "id: 6\nevent: Done\ndata: {}\n\n",
);

fn sse_usage(chunks: &[&[u8]]) -> Usage {
    let mut m = SseMeter::new();
    for c in chunks {
        m.feed(c);
    }
    m.finish()
}

fn b64_of(n: usize) -> String {
    STANDARD.encode(vec![0x5Au8; n])
}

#[test]
fn sse_chat_v3_sample() {
    let u = sse_usage(&[CHAT_SSE.as_bytes()]);
    assert_eq!(u.llm_input_tokens, 614);
    assert_eq!(u.llm_output_tokens, 19);
    assert_eq!(u.usage_events, 1);
    assert!(u.completed);
    assert_eq!(u.audio_out_ms, 0);
}

#[test]
fn sse_chat_v3_crlf_and_spaces() {
    let s = CHAT_SSE
        .replace("event:", "event: ")
        .replace("data:", "data: ")
        .replace('\n', "\r\n");
    let u = sse_usage(&[s.as_bytes()]);
    assert_eq!((u.llm_input_tokens, u.llm_output_tokens), (614, 19));
    assert!(u.completed);
    // Bare CR line endings too.
    let s = CHAT_SSE.replace('\n', "\r");
    let u = sse_usage(&[s.as_bytes()]);
    assert_eq!((u.llm_input_tokens, u.llm_output_tokens), (614, 19));
}

#[test]
fn sse_workflow_sample_per_node_max_then_sum() {
    let u = sse_usage(&[WORKFLOW_SSE.as_bytes()]);
    assert_eq!(u.llm_input_tokens, 30);
    assert_eq!(u.llm_output_tokens, 11);
    assert_eq!(u.usage_events, 3);
    assert!(u.completed);
}

#[test]
fn sse_usage_before_finish_excludes_unterminated_event() {
    let mut m = SseMeter::new();
    let cut = CHAT_SSE.find("event:done").unwrap() - 1;
    m.feed(&CHAT_SSE.as_bytes()[..cut]);
    // The blank line after chat.completed has not arrived yet.
    assert_eq!(m.usage().usage_events, 0);
    // But finish() still counts a complete final event.
    let u = m.finish();
    assert_eq!(u.llm_input_tokens, 614);
}

#[test]
fn sse_audio_delta_and_token_fallbacks() {
    let s = format!(
        concat!(
            "event:conversation.audio.delta\ndata:{{\"content\":\"{a}\",\"content_type\":\"audio\"}}\n\n",
            "event:conversation.audio.delta\ndata:{{\"content_type\":\"audio\",\"content\":\"{b}\"}}\n\n",
            "event:conversation.chat.failed\ndata:{{\"usage\":{{\"input_tokens\":7,\"output_tokens\":2}}}}\n\n",
            "event:conversation.chat.completed\ndata:{{\"usage\":{{\"token_count\":9}}}}\n\n",
            "event:conversation.chat.completed\ndata:{{\"usage\":{{\"token_count\":9,\"input_count\":4}}}}\n\n",
        ),
        a = b64_of(4800),
        b = b64_of(49),
    );
    let u = sse_usage(&[s.as_bytes()]);
    // 4800 + 49 bytes at 48 bytes/ms = 101.02 ms.
    assert_eq!(u.audio_out_ms, 101);
    assert_eq!(u.llm_input_tokens, 7 + 4);
    assert_eq!(u.llm_output_tokens, 2 + 9 + 5);
    assert_eq!(u.usage_events, 3);
}

#[test]
fn sse_data_before_event_multiline_and_comments() {
    let s = concat!(
        ": keep-alive\n",
        "data:{\"usage\":\n",
        "data:{\"input_count\":3,\"output_count\":4}}\n",
        "event:conversation.chat.completed\n",
        "retry: 10\n\n",
    );
    let u = sse_usage(&[s.as_bytes()]);
    assert_eq!((u.llm_input_tokens, u.llm_output_tokens), (3, 4));
}

#[test]
fn sse_malformed_usage_event_is_an_error_value() {
    let s = concat!(
        "event:conversation.chat.completed\ndata:{\"usage\":{\"input_count\":3,]}\n\n",
        "event:conversation.chat.completed\ndata:{\"usage\":{\"input_count\":1,\"output_count\":1}}\n\n",
    );
    let mut m = SseMeter::new();
    m.feed(s.as_bytes());
    assert_eq!(m.error_count(), 1);
    assert!(matches!(
        m.first_error(),
        Some(SseError::MalformedData {
            event: "conversation.chat.completed",
            ..
        })
    ));
    let u = m.finish();
    assert_eq!((u.llm_input_tokens, u.llm_output_tokens), (1, 1));
}

#[test]
fn sse_every_split_offset_is_identical() {
    for sample in [CHAT_SSE, WORKFLOW_SSE] {
        let bytes = sample.as_bytes();
        let whole = sse_usage(&[bytes]);
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(sse_usage(&[a, b]), whole, "split at {i}");
        }
        // Byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(sse_usage(&singles), whole);
    }
}

// ---------------------------------------------------------------- WebSocket helpers

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn frame(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>, force64: bool) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if force64 || n > 0xFFFF {
        f.push(m | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    } else if n > 125 {
        f.push(m | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(m | n as u8);
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

fn up_text(json: &str) -> Vec<u8> {
    frame(0x1, true, json.as_bytes(), Some(KEY), false)
}

fn down_text(json: &str) -> Vec<u8> {
    frame(0x1, true, json.as_bytes(), None, false)
}

fn session_streams() -> (Vec<u8>, Vec<u8>) {
    let mut up = Vec::new();
    up.extend(up_text(
        r#"{"id":"1","event_type":"chat.update","data":{"input_audio":{"format":"pcm","codec":"g711a","sample_rate":8000},"output_audio":{"codec":"pcm","pcm_config":{"sample_rate":16000}}}}"#,
    ));
    // 800 bytes of G.711 = 100 ms; event_type after data.
    up.extend(up_text(&format!(
        r#"{{"data":{{"delta":"{}"}},"event_type":"input_audio_buffer.append"}}"#,
        b64_of(800)
    )));
    up.extend(frame(0x9, true, b"ping", Some(KEY), false));
    up.extend(up_text(&format!(
        r#"{{"event_type":"input_audio_buffer.append","data":{{"delta":"{}"}}}}"#,
        b64_of(401)
    )));
    up.extend(up_text(r#"{"event_type":"input_audio_buffer.complete"}"#));
    up.extend(up_text(
        r#"{"event_type":"input_text.generate_audio","data":{"mode":"text","text":"你好, world"}}"#,
    ));
    let mut down = Vec::new();
    down.extend(down_text(r#"{"event_type":"chat.created","data":{}}"#));
    down.extend(down_text(
        r#"{"event_type":"conversation.chat.created","data":{"id":"c"}}"#,
    ));
    // 3200 bytes of 16 kHz PCM = 100 ms, 16-bit length.
    down.extend(down_text(&format!(
        r#"{{"id":"e","event_type":"conversation.audio.delta","data":{{"content_type":"audio","content":"{}"}},"detail":{{"logid":"x"}}}}"#,
        b64_of(3200)
    )));
    // A fragmented delta with an interleaved pong (downlink, unmasked).
    let msg = format!(
        r#"{{"event_type":"conversation.audio.delta","data":{{"content":"{}"}}}}"#,
        b64_of(1600)
    );
    let (a, rest) = msg.as_bytes().split_at(40);
    let (b, c) = rest.split_at(1000);
    down.extend(frame(0x1, false, a, None, false));
    down.extend(frame(0xA, true, b"", None, false));
    down.extend(frame(0x0, false, b, None, false));
    down.extend(frame(0x0, true, c, None, true));
    down.extend(down_text(
        r#"{"event_type":"conversation.chat.completed","data":{"status":"completed","usage":{"token_count":633,"output_count":19,"input_count":614}}}"#,
    ));
    (up, down)
}

fn ws_usage(up: &[&[u8]], down: &[&[u8]]) -> Usage {
    let mut m = WsSessionMeter::default();
    for c in up {
        m.feed_uplink(c).unwrap();
    }
    for c in down {
        m.feed_downlink(c).unwrap();
    }
    m.finish()
}

#[test]
fn ws_session_counts_everything() {
    let (up, down) = session_streams();
    let mut m = WsSessionMeter::default();
    m.feed_uplink(&up).unwrap();
    assert_eq!(m.input_format().codec, AudioCodec::G711a);
    assert_eq!(m.output_format().pcm_sample_rate, 16_000);
    m.feed_downlink(&down).unwrap();
    assert_eq!(m.malformed_messages(), 0);
    let u = m.finish();
    // (800 + 401) bytes at 8000 B/s = 150.125 ms.
    assert_eq!(u.audio_in_ms, 150);
    // (3200 + 1600) bytes at 32000 B/s = 150 ms.
    assert_eq!(u.audio_out_ms, 150);
    assert_eq!(u.tts_chars, "你好, world".chars().count() as u64);
    assert_eq!((u.llm_input_tokens, u.llm_output_tokens), (614, 19));
    assert_eq!(u.usage_events, 1);
    assert!(u.completed);
}

#[test]
fn ws_every_split_offset_is_identical() {
    let (up, down) = session_streams();
    let whole = ws_usage(&[&up], &[&down]);
    for i in 0..=up.len() {
        let (a, b) = up.split_at(i);
        assert_eq!(ws_usage(&[a, b], &[&down]), whole, "uplink split at {i}");
    }
    for i in 0..=down.len() {
        let (a, b) = down.split_at(i);
        assert_eq!(ws_usage(&[&up], &[a, b]), whole, "downlink split at {i}");
    }
}

#[test]
fn ws_payload_lengths_7_16_64() {
    for (n, force64) in [(60usize, false), (60, true), (3000, false), (96_000, false)] {
        let json = format!(
            r#"{{"event_type":"speech.audio.update","data":{{"delta":"{}"}}}}"#,
            b64_of(n)
        );
        let f = frame(0x1, true, json.as_bytes(), None, force64);
        let mut m = WsSessionMeter::default();
        let out = m.feed_downlink(&f).unwrap();
        assert_eq!(out.frames, 1);
        assert_eq!(out.last_frame_boundary, Some(f.len()));
        assert_eq!(out.last_message_boundary, Some(f.len()));
        assert!(m.parser(Direction::Downlink).at_frame_boundary());
        assert_eq!(m.usage().audio_out_ms, (n / 48) as u64, "n={n}");
    }
}

#[test]
fn ws_fragmented_masked_with_interleaved_ping_and_boundaries() {
    let msg = r#"{"event_type":"input_text_buffer.append","data":{"delta":"Grüß dich 👋"}}"#;
    let (a, rest) = msg.as_bytes().split_at(10);
    let (b, c) = rest.split_at(30);
    let f1 = frame(0x1, false, a, Some(KEY), false);
    let ping = frame(0x9, true, b"hi", Some([1, 2, 3, 4]), false);
    let f2 = frame(0x0, false, b, Some([9, 8, 7, 6]), false);
    let f3 = frame(0x0, true, c, Some(KEY), false);
    let mut m = WsSessionMeter::default();
    let o = m.feed_uplink(&f1).unwrap();
    assert_eq!(o.last_frame_boundary, Some(f1.len()));
    assert_eq!(o.last_message_boundary, None);
    let o = m.feed_uplink(&ping).unwrap();
    assert_eq!(o.last_frame_boundary, Some(ping.len()));
    assert_eq!(
        o.last_message_boundary, None,
        "ping inside a fragmented message"
    );
    assert!(m.parser(Direction::Uplink).at_frame_boundary());
    assert!(!m.parser(Direction::Uplink).at_message_boundary());
    m.feed_uplink(&f2[..3]).unwrap();
    assert!(!m.parser(Direction::Uplink).at_frame_boundary());
    m.feed_uplink(&f2[3..]).unwrap();
    let o = m.feed_uplink(&f3).unwrap();
    assert_eq!(o.last_message_boundary, Some(f3.len()));
    assert!(m.parser(Direction::Uplink).at_message_boundary());
    assert_eq!(m.usage().tts_chars, "Grüß dich 👋".chars().count() as u64);
}

#[test]
fn ws_close_frame_code_and_reason() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice("bye ✓".as_bytes());
    let mut m = WsSessionMeter::default();
    let o = m
        .feed_uplink(&frame(0x8, true, &payload, Some(KEY), false))
        .unwrap();
    assert!(o.close);
    let c = m.parser(Direction::Uplink).close_frame().unwrap();
    assert_eq!(c.code(), Some(1000));
    assert_eq!(c.reason(), "bye ✓");
    // Anything after close is an error.
    assert_eq!(m.feed_uplink(&up_text("{}")), Err(WsError::FrameAfterClose));
    // Empty close.
    let mut p = WsFrameParser::new(Direction::Downlink);
    assert!(p.feed(&[0x88, 0x00]).unwrap().close);
    assert_eq!(p.close_frame().unwrap().code(), None);
    // One-byte close payload is malformed.
    let mut p = WsFrameParser::new(Direction::Downlink);
    assert_eq!(p.feed(&[0x88, 0x01, 0x03]), Err(WsError::BadClosePayload));
}

#[test]
fn ws_framing_errors() {
    let cases: Vec<(Direction, Vec<u8>, WsError)> = vec![
        (
            Direction::Downlink,
            vec![0xC1, 0x00],
            WsError::CompressedFrame,
        ),
        (
            Direction::Downlink,
            vec![0xA1, 0x00],
            WsError::ReservedBits { bits: 0b010 },
        ),
        (
            Direction::Downlink,
            vec![0x83, 0x00],
            WsError::ReservedOpcode { opcode: 3 },
        ),
        (
            Direction::Downlink,
            vec![0x8B, 0x00],
            WsError::ReservedOpcode { opcode: 0xB },
        ),
        (
            Direction::Downlink,
            vec![0x89, 0x7E, 0x00, 0x7E],
            WsError::ControlFrameTooLong { len: 126 },
        ),
        (
            Direction::Downlink,
            vec![0x09, 0x00],
            WsError::FragmentedControlFrame,
        ),
        (
            Direction::Downlink,
            vec![0x80, 0x00],
            WsError::UnexpectedContinuation,
        ),
        (
            Direction::Downlink,
            vec![0x01, 0x00, 0x81, 0x00],
            WsError::ExpectedContinuation,
        ),
        (
            Direction::Uplink,
            vec![0x81, 0x00],
            WsError::MaskMismatch {
                direction: Direction::Uplink,
                masked: false,
            },
        ),
        (
            Direction::Downlink,
            vec![0x81, 0x80, 1, 2, 3, 4],
            WsError::MaskMismatch {
                direction: Direction::Downlink,
                masked: true,
            },
        ),
        (
            Direction::Downlink,
            vec![0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0],
            WsError::PayloadLengthOverflow,
        ),
    ];
    for (dir, bytes, want) in cases {
        let mut p = WsFrameParser::new(dir);
        assert_eq!(p.feed(&bytes), Err(want), "{bytes:02x?}");
        // Sticky.
        assert_eq!(p.feed(b"x"), Err(want));
        assert!(!p.at_frame_boundary());
        assert_eq!(want.code().split('_').next(), Some("ws"));
    }
}

#[test]
fn ws_malformed_json_is_counted_not_fatal() {
    let mut m = WsSessionMeter::default();
    m.feed_uplink(&up_text(
        r#"{"event_type":"input_text_buffer.append","data":{"delta":"ab"]}"#,
    ))
    .unwrap();
    m.feed_uplink(&up_text(
        r#"{"event_type":"input_text_buffer.append","data":{"delta":"ab"}}"#,
    ))
    .unwrap();
    assert_eq!(m.malformed_messages(), 1);
    assert!(m.first_json_error().is_some());
    assert_eq!(m.usage().tts_chars, 2);
}

#[test]
fn ws_downlink_events_on_uplink_are_not_counted() {
    let mut m = WsSessionMeter::default();
    m.feed_uplink(&up_text(
        r#"{"event_type":"conversation.chat.completed","data":{"usage":{"input_count":1000}}}"#,
    ))
    .unwrap();
    m.feed_uplink(&up_text(&format!(
        r#"{{"event_type":"conversation.audio.delta","data":{{"content":"{}"}}}}"#,
        b64_of(4800)
    )))
    .unwrap();
    assert!(m.usage().is_zero());
}

/// Downlink events of one `/v1/chat` exchange, by name (`usage` = a terminal event with usage).
fn chat_events(events: &[&str]) -> Vec<u8> {
    let mut down = Vec::new();
    for e in events {
        let json = match *e {
            "completed+usage" => r#"{"event_type":"conversation.chat.completed","data":{"usage":{"token_count":30,"output_count":10,"input_count":20}}}"#.to_owned(),
            "requires_action+usage" => r#"{"event_type":"conversation.chat.requires_action","data":{"usage":{"input_count":20}}}"#.to_owned(),
            "failed+usage" => r#"{"event_type":"conversation.chat.failed","data":{"last_error":{"code":5000},"usage":{"input_count":20,"output_count":3}}}"#.to_owned(),
            name => format!(r#"{{"event_type":"conversation.{name}","data":{{"id":"c1"}}}}"#),
        };
        down.extend(down_text(&json));
    }
    down
}

fn unreported(down: &[u8]) -> u64 {
    let mut m = WsSessionMeter::default();
    m.feed_downlink(down).unwrap();
    m.unreported_turns()
}

/// A chat turn whose tokens were never reported (no usage event, a cancel, a cut) is known to
/// the meter, so the gateway can charge an estimate for it instead of nothing.
#[test]
fn ws_chat_turns_without_usage_are_counted() {
    let cases: [(&[&str], u64, &str); 11] = [
        (
            &[
                "chat.created",
                "chat.in_progress",
                "audio.completed",
                "completed+usage",
            ],
            0,
            "normal turn",
        ),
        (
            &[
                "chat.created",
                "chat.in_progress",
                "message.delta",
                "audio.completed",
            ],
            1,
            "no usage event (or cut mid-turn)",
        ),
        (
            &["chat.created", "chat.in_progress", "chat.completed"],
            1,
            "completed without usage",
        ),
        (
            &["chat.created", "chat.in_progress", "chat.failed"],
            1,
            "failed without usage",
        ),
        (
            &[
                "chat.created",
                "failed+usage",
                "chat.created",
                "completed+usage",
            ],
            0,
            "failed with usage",
        ),
        (
            &[
                "chat.created",
                "chat.in_progress",
                "audio.completed",
                "chat.created",
                "chat.in_progress",
                "audio.completed",
            ],
            2,
            "two turns, no usage",
        ),
        (
            &[
                "chat.created",
                "requires_action+usage",
                "chat.in_progress",
                "completed+usage",
            ],
            0,
            "tool call continued",
        ),
        (
            &["chat.created", "requires_action+usage", "chat.in_progress"],
            1,
            "tool continuation cut",
        ),
        (
            &["chat.created", "chat.in_progress", "chat.canceled"],
            1,
            "cancelled reply (billed, not reported)",
        ),
        (
            &["chat.canceled", "chat.created", "completed+usage"],
            0,
            "cancel with nothing running",
        ),
        (&[], 0, "no turn"),
    ];
    for (events, want, what) in cases {
        let down = chat_events(events);
        assert_eq!(unreported(&down), want, "{what}");
        for i in 0..=down.len() {
            let (a, b) = down.split_at(i);
            let mut m = WsSessionMeter::default();
            m.feed_downlink(a).unwrap();
            m.feed_downlink(b).unwrap();
            assert_eq!(m.unreported_turns(), want, "{what}, split at {i}");
        }
    }
    // The normal sample session reports its one turn.
    let (up, down) = session_streams();
    let mut m = WsSessionMeter::default();
    m.feed_uplink(&up).unwrap();
    m.feed_downlink(&down).unwrap();
    assert_eq!(m.unreported_turns(), 0);
}

/// Turn events are platform events: a device sending them uplink opens no turn.
#[test]
fn ws_chat_turn_events_on_uplink_open_no_turn() {
    let mut m = WsSessionMeter::default();
    m.feed_uplink(&up_text(
        r#"{"event_type":"conversation.chat.created","data":{"id":"c1"}}"#,
    ))
    .unwrap();
    assert_eq!(m.unreported_turns(), 0);
}

#[test]
fn ws_opus_and_formats_and_sub_ms_remainders() {
    let mut m = WsSessionMeter::default();
    m.feed_uplink(&up_text(
        r#"{"event_type":"speech.update","data":{"output_audio":{"codec":"opus","opus_config":{"frame_size_ms":2.5}}}}"#,
    ))
    .unwrap();
    for _ in 0..4 {
        m.feed_downlink(&down_text(&format!(
            r#"{{"event_type":"speech.audio.update","data":{{"delta":"{}"}}}}"#,
            b64_of(40)
        )))
        .unwrap();
    }
    assert_eq!(m.usage().audio_out_ms, 10);
    // Default input: PCM 24 kHz 16-bit mono; 1000 deltas of 72 bytes = 1.5 ms each.
    let one = up_text(&format!(
        r#"{{"event_type":"input_audio_buffer.append","data":{{"delta":"{}"}}}}"#,
        b64_of(72)
    ));
    for _ in 0..1000 {
        m.feed_uplink(&one).unwrap();
    }
    assert_eq!(m.usage().audio_in_ms, 1500);
    // Switch input to ogg/opus via transcriptions.update: 20 ms per append.
    m.feed_uplink(&up_text(
        r#"{"event_type":"transcriptions.update","data":{"input_audio":{"format":"ogg"}}}"#,
    ))
    .unwrap();
    m.feed_uplink(&one).unwrap();
    assert_eq!(m.usage().audio_in_ms, 1520);
    // Effective config echoed downlink wins: 48 kHz stereo 16-bit.
    m.feed_downlink(&down_text(
        r#"{"event_type":"transcriptions.updated","data":{"input_audio":{"codec":"pcm","sample_rate":48000,"channel":2}}}"#,
    ))
    .unwrap();
    let f = m.input_format();
    assert_eq!(
        (f.codec, f.sample_rate, f.channels, f.bit_depth),
        (AudioCodec::Pcm, 48_000, 2, 16)
    );
}

#[test]
fn usage_add() {
    let a = Usage {
        llm_input_tokens: 1,
        llm_output_tokens: u64::MAX,
        audio_in_ms: 3,
        audio_out_ms: 4,
        tts_chars: 5,
        usage_events: 1,
        completed: false,
    };
    let b = Usage {
        llm_output_tokens: 1,
        completed: true,
        ..a
    };
    let s = a + b;
    assert_eq!(s.llm_input_tokens, 2);
    assert_eq!(s.llm_output_tokens, u64::MAX);
    assert_eq!(s.audio_in_ms, 6);
    assert!(s.completed);
    assert_eq!(s.llm_total_tokens(), u64::MAX);
}

// ---------------------------------------------------------------- REST

#[test]
fn rest_workflow_and_retrieve() {
    let body = br#"{"code":0,"msg":"","data":"{\"output\":\"x\"}","execute_id":"1","usage":{"input_count":50,"output_count":100,"token_count":150},"detail":{"logid":"l"}}"#;
    let u = rest::workflow_run_usage(body).unwrap();
    assert_eq!(
        (u.llm_input_tokens, u.llm_output_tokens, u.usage_events),
        (50, 100, 1)
    );
    let u = rest::workflow_run_usage(br#"{"code":4200,"msg":"unpublished"}"#).unwrap();
    assert_eq!(u.usage_events, 0);
    assert!(rest::workflow_run_usage(b"not json").is_err());
    let u = rest::chat_retrieve_usage(
        br#"{"code":0,"data":{"status":"completed","usage":{"token_count":633,"output_count":19,"input_count":614}}}"#,
    )
    .unwrap();
    assert_eq!((u.llm_input_tokens, u.llm_output_tokens), (614, 19));
    assert!(u.completed);
}

fn wav(sample_rate: u32, channels: u16, bits: u16, data: &[u8], declared: u32) -> Vec<u8> {
    let mut w = b"RIFF\0\0\0\0WAVE".to_vec();
    w.extend_from_slice(b"LIST");
    w.extend_from_slice(&3u32.to_le_bytes());
    w.extend_from_slice(b"abc\0");
    w.extend_from_slice(b"fmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&channels.to_le_bytes());
    w.extend_from_slice(&sample_rate.to_le_bytes());
    let byte_rate = sample_rate * u32::from(channels) * u32::from(bits) / 8;
    w.extend_from_slice(&byte_rate.to_le_bytes());
    w.extend_from_slice(&(channels * bits / 8).to_le_bytes());
    w.extend_from_slice(&bits.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&declared.to_le_bytes());
    w.extend_from_slice(data);
    w
}

#[test]
fn rest_speech() {
    let req = SpeechRequest::parse(
        r#"{"input":"你好世界","voice_id":"v","response_format":"pcm","sample_rate":16000}"#
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(req.tts_chars, 4);
    let mut m = SpeechResponseMeter::new(req);
    m.feed(&[0u8; 16000]);
    m.feed(&[0u8; 16]);
    let u = m.finish();
    assert_eq!((u.tts_chars, u.audio_out_ms), (4, 500));

    let req = SpeechRequest::parse(br#"{"input":"hi","response_format":"wav"}"#).unwrap();
    let body = wav(24_000, 1, 16, &[0u8; 9600], u32::MAX);
    for split in [0, 10, 40, 60, body.len()] {
        let mut m = SpeechResponseMeter::new(req);
        m.feed(&body[..split]);
        m.feed(&body[split..]);
        assert_eq!(m.finish().audio_out_ms, 200);
    }

    // mp3 (default) is estimated: 4 chars x 250 ms / speed 2.0.
    let req = SpeechRequest::parse(r#"{"input":"你好世界","speed":2}"#.as_bytes()).unwrap();
    assert_eq!(req.format, SpeechFormat::Mp3);
    let mut m = SpeechResponseMeter::new(req);
    m.feed(&[0xFF; 1000]);
    assert_eq!(m.finish().audio_out_ms, 500);
    assert!(SpeechRequest::parse(br#"{"voice_id":"v"}"#).is_err());
}

#[test]
fn rest_transcription_multipart() {
    let audio = wav(16_000, 1, 16, &[1u8; 32_000], 32_000);
    let mut body =
        b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nbig\r\n".to_vec();
    body.extend_from_slice(
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n",
    );
    body.extend_from_slice(&audio);
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    assert_eq!(rest::transcription_audio_ms(&body, b"XyZ"), Ok(Some(1000)));
    let mp3 = b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nID3....\r\n--B--\r\n";
    assert_eq!(rest::transcription_audio_ms(mp3, b"B"), Ok(None));
    assert_eq!(
        rest::transcription_audio_ms(b"--B\r\n\r\n--B--", b"B"),
        Err(RestMeterError::MissingFilePart)
    );
}

// ---------------------------------------------------------------- properties

fn split_points(len: usize, cuts: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    v.sort_unstable();
    v
}

fn chunks_at<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &p in points {
        out.push(&bytes[prev..p]);
        prev = p;
    }
    out.push(&bytes[prev..]);
    out
}

prop_compose! {
    /// A generated downlink stream: audio deltas of random sizes fragmented at random points,
    /// pings interleaved, a final usage event.
    fn downlink_stream()(
        sizes in prop::collection::vec(0usize..3000, 1..6),
        frag in prop::collection::vec(1usize..400, 1..4),
        tokens in (0u64..10_000, 0u64..10_000),
    ) -> (Vec<u8>, u64, (u64, u64)) {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (i, n) in sizes.iter().enumerate() {
            bytes += *n as u64;
            let msg = format!(
                r#"{{"event_type":"conversation.audio.delta","data":{{"id":"{i}","content":"{}"}}}}"#,
                b64_of(*n)
            );
            let f = frag[i % frag.len()];
            let pieces: Vec<&[u8]> = msg.as_bytes().chunks(f).collect();
            for (j, p) in pieces.iter().enumerate() {
                let op = if j == 0 { 0x1 } else { 0x0 };
                out.extend(frame(op, j + 1 == pieces.len(), p, None, false));
                if j == 0 && pieces.len() > 1 {
                    out.extend(frame(0x9, true, b"p", None, false));
                }
            }
        }
        out.extend(down_text(&format!(
            r#"{{"event_type":"conversation.chat.completed","data":{{"usage":{{"input_count":{},"output_count":{}}}}}}}"#,
            tokens.0, tokens.1
        )));
        (out, bytes, tokens)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn prop_sse_random_multisplit(cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        for sample in [CHAT_SSE, WORKFLOW_SSE] {
            let bytes = sample.as_bytes();
            let whole = sse_usage(&[bytes]);
            let pts = split_points(bytes.len(), &cuts);
            prop_assert_eq!(sse_usage(&chunks_at(bytes, &pts)), whole);
        }
    }

    #[test]
    fn prop_ws_generated_stream_split_invariant(
        (stream, bytes, tokens) in downlink_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = ws_usage(&[], &[&stream]);
        prop_assert_eq!(whole.audio_out_ms, bytes / 48);
        prop_assert_eq!((whole.llm_input_tokens, whole.llm_output_tokens), tokens);
        let pts = split_points(stream.len(), &cuts);
        prop_assert_eq!(ws_usage(&[], &chunks_at(&stream, &pts)), whole);
    }

    #[test]
    fn prop_session_random_multisplit(
        up_cuts in prop::collection::vec(any::<usize>(), 0..8),
        down_cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (up, down) = session_streams();
        let whole = ws_usage(&[&up], &[&down]);
        let up_pts = split_points(up.len(), &up_cuts);
        let down_pts = split_points(down.len(), &down_cuts);
        prop_assert_eq!(ws_usage(&chunks_at(&up, &up_pts), &chunks_at(&down, &down_pts)), whole);
    }

    #[test]
    fn prop_garbage_never_panics(
        data in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let pts = split_points(data.len(), &cuts);
        let chunks = chunks_at(&data, &pts);
        let mut sse = SseMeter::new();
        let mut ws = WsSessionMeter::default();
        for c in &chunks {
            sse.feed(c);
            let _up = ws.feed_uplink(c);
            let _down = ws.feed_downlink(c);
        }
        let _ = sse.finish();
        let _ = ws.finish();
        let _ = rest::workflow_run_usage(&data);
        let _ = rest::transcription_audio_ms(&data, b"B");
        if let Ok(req) = SpeechRequest::parse(&data) {
            let mut m = SpeechResponseMeter::new(req);
            m.feed(&data);
            let _ = m.finish();
        }
    }

    #[test]
    fn prop_garbage_json_in_valid_frames_never_panics(
        payload in prop::collection::vec(any::<u8>(), 0..600),
        prefix in prop::sample::select(vec![
            "", "{\"event_type\":\"input_audio_buffer.append\",\"data\":{\"delta\":\"",
            "{\"data\":{\"usage\":{\"input_count\":", "{\"data\":{\"text\":\"\\u",
        ]),
    ) {
        let mut body = prefix.as_bytes().to_vec();
        body.extend_from_slice(&payload);
        let mut ws = WsSessionMeter::default();
        prop_assert!(ws.feed_uplink(&frame(0x1, true, &body, Some(KEY), false)).is_ok());
        prop_assert!(ws.feed_downlink(&frame(0x1, true, &body, None, false)).is_ok());
        let mut sse = SseMeter::new();
        sse.feed(b"event:conversation.chat.completed\ndata:");
        sse.feed(&body);
        sse.feed(b"\n\n");
        let _ = sse.finish();
    }
}
