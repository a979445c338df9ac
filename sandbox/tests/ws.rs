//! End-to-end tests of the sandbox's WebSocket APIs over real sockets (tokio-tungstenite client).

// Test helpers outside `#[test]` fns are not covered by clippy.toml's allow-*-in-tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use sandbox::audio::{speech_duration_ms, synth_pcm16};
use sandbox::{SandboxConfig, SandboxHandle};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

async fn sandbox(realtime_audio: bool) -> SandboxHandle {
    sandbox::start(SandboxConfig {
        realtime_audio,
        ..Default::default()
    })
    .await
    .unwrap()
}

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

async fn connect_with(url: &str, header_token: Option<&str>) -> Result<Client, tungstenite::Error> {
    let mut req = url.into_client_request()?;
    if let Some(t) = header_token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    assert!(
        resp.headers().contains_key("x-tt-logid"),
        "101 carries X-Tt-Logid"
    );
    Ok(Client { ws })
}

async fn connect(sb: &SandboxHandle, path_and_query: &str) -> Client {
    connect_with(
        &format!("{}{path_and_query}", sb.ws_url()),
        Some("pat_sandbox"),
    )
    .await
    .unwrap()
}

impl Client {
    async fn send(&mut self, event_type: &str, data: Value) {
        let mut ev = json!({"id": "c1", "event_type": event_type});
        if !data.is_null() {
            ev["data"] = data;
        }
        self.ws.send(Message::text(ev.to_string())).await.unwrap();
    }

    /// Next downlink event (text frames only), or `None` on timeout.
    async fn try_next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg.unwrap() {
                Message::Text(t) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    async fn next(&mut self) -> Value {
        self.try_next(Duration::from_secs(10))
            .await
            .expect("an event within 10 s")
    }

    async fn expect(&mut self, event_type: &str) -> Value {
        let ev = self.next().await;
        assert_eq!(ev["event_type"], event_type, "{ev}");
        ev
    }

    /// All events up to and including the first `event_type`.
    async fn until(&mut self, event_type: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let ev = self.next().await;
            let done = ev["event_type"] == event_type;
            out.push(ev);
            if done {
                return out;
            }
        }
    }
}

fn types(evs: &[Value]) -> Vec<&str> {
    evs.iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect()
}

/// Collapses runs of the same event type ("a a b" → "a b").
fn collapsed(evs: &[Value]) -> Vec<&str> {
    let mut t = types(evs);
    t.dedup();
    t
}

#[tokio::test]
async fn auth_by_header_and_by_query_in_each_encoding() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=7").await;
    let ev = c.expect("chat.created").await;
    assert!(!ev["id"].as_str().unwrap().is_empty());
    assert!(ev["detail"]["logid"].as_str().is_some());
    assert!(
        ev["detail"]["respond_at"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    // A raw space cannot cross HTTP/1.1 (the request line splits on it; clients encode it), so
    // it is covered by auth.rs's unit test; on the wire: %20 and +.
    for q in [
        "authorization=Bearer%20pat_sandbox",
        "authorization=Bearer+pat_sandbox",
    ] {
        let url = format!("{}/v1/chat?bot_id=7&{q}", sb.ws_url());
        let mut c = connect_with(&url, None).await.unwrap();
        c.expect("chat.created").await;
    }
    let url = format!(
        "{}/v1/audio/speech?authorization=Bearer%20pat_sandbox",
        sb.ws_url()
    );
    connect_with(&url, None)
        .await
        .unwrap()
        .expect("speech.created")
        .await;
    assert!(
        sb.state
            .counters
            .ws_sessions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
    sb.shutdown().await;
}

fn http_error(e: tungstenite::Error) -> (u16, Value, bool) {
    match e {
        tungstenite::Error::Http(resp) => {
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            (
                resp.status().as_u16(),
                body,
                resp.headers().contains_key("x-tt-logid"),
            )
        }
        other => panic!("expected an HTTP error, got {other}"),
    }
}

#[tokio::test]
async fn handshake_failures_are_http_envelopes() {
    let sb = sandbox(false).await;
    let ws = sb.ws_url();
    for (url, token, status, code) in [
        (format!("{ws}/v1/chat?bot_id=7"), None, 401, 4100),
        (format!("{ws}/v1/chat?bot_id=7"), Some("nope"), 401, 4100),
        (format!("{ws}/v1/audio/transcriptions"), None, 401, 4100),
        (format!("{ws}/v1/chat"), Some("pat_sandbox"), 400, 4000),
        (
            format!("{ws}/v1/chat?bot_id=7&device_id=abc"),
            Some("pat_sandbox"),
            400,
            4000,
        ),
        (
            format!("{ws}/v1/chat?bot_id=7&sandbox_fault=rate_limit"),
            Some("pat_sandbox"),
            429,
            4013,
        ),
        (
            format!("{ws}/v1/chat?bot_id=7&sandbox_fault=status%3D503"),
            Some("pat_sandbox"),
            503,
            5000,
        ),
    ] {
        let err = connect_with(&url, token)
            .await
            .err()
            .unwrap_or_else(|| panic!("{url} upgraded"));
        let (s, body, logid) = http_error(err);
        assert_eq!(
            (s, body["code"].as_i64().unwrap()),
            (status, code),
            "{url}: {body}"
        );
        assert!(logid, "{url}: X-Tt-Logid");
        assert!(body["detail"]["logid"].as_str().is_some());
    }
    // Latency before the 101.
    let t = Instant::now();
    let mut c = connect(&sb, "/v1/chat?bot_id=7&sandbox_fault=latency_ms%3D200").await;
    assert!(t.elapsed() >= Duration::from_millis(200));
    c.expect("chat.created").await;
    sb.shutdown().await;
}

/// Appends `ms` of 16 kHz PCM16 in 20 ms frames.
async fn append_pcm16k(c: &mut Client, ms: u64) {
    let pcm = synth_pcm16(ms, 16000, 3);
    for frame in pcm.chunks(640) {
        c.send(
            "input_audio_buffer.append",
            json!({"delta": B64.encode(frame)}),
        )
        .await;
    }
}

fn audio_bytes(evs: &[Value], event_type: &str, field: &str) -> usize {
    evs.iter()
        .filter(|e| e["event_type"] == event_type)
        .map(|e| {
            B64.decode(e["data"][field].as_str().unwrap())
                .unwrap()
                .len()
        })
        .sum()
}

#[tokio::test]
async fn full_voice_turn_pcm_in_g711a_out() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=7&device_id=42").await;
    let created = c.expect("chat.created").await;
    let logid = created["detail"]["logid"].clone();
    c.send(
        "chat.update",
        json!({
            "chat_config": {"user_id": "u1", "auto_save_history": true},
            "input_audio": {"format": "pcm", "codec": "pcm", "sample_rate": 16000, "channel": 1, "bit_depth": 16},
            "output_audio": {"codec": "g711a", "voice_id": "v1"},
        }),
    )
    .await;
    let upd = c.expect("chat.updated").await;
    let d = &upd["data"];
    assert_eq!(
        d["input_audio"],
        json!({"format": "pcm", "codec": "pcm", "sample_rate": 16000, "channel": 1, "bit_depth": 16})
    );
    assert_eq!(d["output_audio"]["codec"], "g711a");
    assert_eq!(d["output_audio"]["pcm_config"]["sample_rate"], 8000);
    assert_eq!(d["output_audio"]["voice_id"], "v1");
    assert_eq!(d["turn_detection"]["type"], "client_interrupt");
    assert_eq!(d["chat_config"]["user_id"], "u1");

    append_pcm16k(&mut c, 1000).await;
    c.send("input_audio_buffer.complete", Value::Null).await;
    let evs = c.until("conversation.chat.completed").await;
    assert_eq!(
        collapsed(&evs),
        vec![
            "input_audio_buffer.completed",
            "conversation.chat.created",
            "conversation.chat.in_progress",
            "conversation.audio_transcript.update",
            "conversation.audio_transcript.completed",
            "conversation.message.completed",
            "conversation.message.delta",
            "conversation.audio.sentence_start",
            "conversation.audio.delta",
            "conversation.audio.completed",
            "conversation.message.completed",
            "conversation.chat.completed",
        ]
    );
    assert!(evs.iter().all(|e| e["detail"]["logid"] == logid));
    let transcript = evs
        .iter()
        .find(|e| e["event_type"] == "conversation.audio_transcript.completed")
        .unwrap();
    assert_eq!(
        transcript["data"]["content"],
        "sandbox heard 1.00 s of audio"
    );
    let question = &evs[5]["data"];
    assert_eq!(
        (question["role"].as_str(), question["type"].as_str()),
        (Some("user"), Some("question"))
    );
    let answer = &evs[evs.len() - 2]["data"];
    assert_eq!(
        (answer["role"].as_str(), answer["type"].as_str()),
        (Some("assistant"), Some("answer"))
    );
    let text = answer["content"].as_str().unwrap();
    let deltas: String = evs
        .iter()
        .filter(|e| e["event_type"] == "conversation.message.delta")
        .map(|e| e["data"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    let first_audio = evs
        .iter()
        .find(|e| e["event_type"] == "conversation.audio.delta")
        .unwrap();
    assert_eq!(first_audio["data"]["content_type"], "audio");
    assert_eq!(first_audio["data"]["chat_id"], evs[1]["data"]["id"]);
    // G.711: 8000 bytes per second.
    let bytes = audio_bytes(&evs, "conversation.audio.delta", "content");
    assert_eq!(bytes as u64, speech_duration_ms(text, 1.0) * 8);
    let frames = evs
        .iter()
        .filter(|e| e["event_type"] == "conversation.audio.delta")
        .count();
    assert_eq!(frames as u64, speech_duration_ms(text, 1.0).div_ceil(100));
    let done = &evs.last().unwrap()["data"];
    assert_eq!(done["status"], "completed");
    let u = &done["usage"];
    assert!(u["input_count"].as_u64().unwrap() > 0 && u["output_count"].as_u64().unwrap() > 0);
    assert_eq!(
        u["token_count"].as_u64(),
        Some(u["input_count"].as_u64().unwrap() + u["output_count"].as_u64().unwrap())
    );

    // A text message triggers another reply; PCM output at the default 24 kHz.
    c.send("chat.update", json!({"output_audio": {"codec": "pcm"}}))
        .await;
    assert_eq!(
        c.expect("chat.updated").await["data"]["output_audio"]["pcm_config"]["sample_rate"],
        24000
    );
    c.send(
        "conversation.message.create",
        json!({"role": "user", "content_type": "text", "content": "hi"}),
    )
    .await;
    let evs = c.until("conversation.chat.completed").await;
    assert_eq!(evs[0]["event_type"], "conversation.chat.created");
    let text = evs[evs.len() - 2]["data"]["content"].as_str().unwrap();
    let bytes = audio_bytes(&evs, "conversation.audio.delta", "content");
    assert_eq!(bytes as u64, speech_duration_ms(text, 1.0) * 48);
    sb.shutdown().await;
}

#[tokio::test]
async fn server_vad_ends_the_turn_after_silence() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=7").await;
    c.expect("chat.created").await;
    c.send(
        "chat.update",
        json!({
            "input_audio": {"format": "pcm", "codec": "pcm", "sample_rate": 16000},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200},
        }),
    )
    .await;
    let upd = c.expect("chat.updated").await;
    assert_eq!(upd["data"]["turn_detection"]["silence_duration_ms"], 200);
    let t = Instant::now();
    append_pcm16k(&mut c, 600).await;
    c.expect("input_audio_buffer.speech_started").await;
    let evs = c.until("conversation.chat.completed").await;
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(evs[0]["event_type"], "input_audio_buffer.speech_stopped");
    assert_eq!(evs[1]["event_type"], "conversation.chat.created");
    assert!(!types(&evs).contains(&"input_audio_buffer.completed"));
    let tr = evs
        .iter()
        .find(|e| e["event_type"] == "conversation.audio_transcript.completed")
        .unwrap();
    assert_eq!(tr["data"]["content"], "sandbox heard 0.60 s of audio");
    sb.shutdown().await;
}

#[tokio::test]
async fn cancel_stops_a_paced_reply() {
    let sb = sandbox(true).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=7").await;
    c.expect("chat.created").await;
    let t = Instant::now();
    c.send(
        "conversation.message.create",
        json!({"role": "user", "content_type": "text", "content": "talk"}),
    )
    .await;
    let before = c.until("conversation.audio.delta").await;
    assert_eq!(before[0]["event_type"], "conversation.chat.created");
    // Paced: frames go out 100 ms apart (the third at 200 ms).
    c.expect("conversation.audio.delta").await;
    c.expect("conversation.audio.delta").await;
    assert!(
        t.elapsed() >= Duration::from_millis(195),
        "{:?}",
        t.elapsed()
    );
    c.send("conversation.chat.cancel", Value::Null).await;
    let evs = c.until("conversation.chat.canceled").await;
    assert!(evs.len() <= 3, "{:?}", types(&evs));
    assert_eq!(evs.last().unwrap()["data"]["code"], 2);
    assert!(
        c.try_next(Duration::from_millis(400)).await.is_none(),
        "nothing after canceled"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn clears_errors_ping_and_clean_close() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=7").await;
    c.expect("chat.created").await;
    c.ws.send(Message::text("{not json")).await.unwrap();
    let e = c.expect("error").await;
    assert_eq!(e["data"]["code"], 4000);
    c.send("no.such.event", json!({})).await;
    assert_eq!(c.expect("error").await["data"]["code"], 4000);
    c.send("chat.update", json!({"output_audio": {"codec": "mp3"}}))
        .await;
    assert_eq!(c.expect("error").await["data"]["code"], 4000);
    append_pcm16k(&mut c, 100).await;
    c.send("input_audio_buffer.clear", Value::Null).await;
    c.expect("input_audio_buffer.cleared").await;
    c.send("conversation.clear", Value::Null).await;
    c.expect("conversation.cleared").await;
    c.ws.send(Message::Ping(b"hi".to_vec().into()))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), c.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        Message::Pong(p) => assert_eq!(&p[..], b"hi"),
        other => panic!("expected pong, got {other:?}"),
    }
    c.ws.close(None).await.unwrap();
    let mut got_close = false;
    while let Some(Ok(m)) = c.ws.next().await {
        got_close |= matches!(m, Message::Close(_));
    }
    assert!(got_close, "server answers the close frame");
    sb.shutdown().await;
}

#[tokio::test]
async fn generate_audio_and_opus_output() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=7").await;
    c.expect("chat.created").await;
    c.send(
        "chat.update",
        json!({"output_audio": {"codec": "opus", "opus_config": {"frame_size_ms": 20}}}),
    )
    .await;
    let upd = c.expect("chat.updated").await;
    assert_eq!(
        upd["data"]["output_audio"]["opus_config"]["frame_size_ms"],
        20.0
    );
    c.send(
        "input_text.generate_audio",
        json!({"mode": "text", "text": "hello world"}),
    )
    .await;
    let evs = c.until("conversation.audio.completed").await;
    assert_eq!(evs[0]["event_type"], "conversation.audio.sentence_start");
    let packets: Vec<Vec<u8>> = evs
        .iter()
        .filter(|e| e["event_type"] == "conversation.audio.delta")
        .map(|e| B64.decode(e["data"]["content"].as_str().unwrap()).unwrap())
        .collect();
    let total: u64 = packets
        .iter()
        .map(|p| sandbox::ws::codec::opus_packet_duration_us(p))
        .sum();
    assert_eq!(total, speech_duration_ms("hello world", 1.0) * 1000);
    assert!(packets.iter().all(|p| p.len() == 120), "48 kbit/s × 20 ms");
    sb.shutdown().await;
}

#[tokio::test]
async fn streaming_tts() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/audio/speech").await;
    c.expect("speech.created").await;
    c.send(
        "speech.update",
        json!({"output_audio": {"codec": "pcm", "pcm_config": {"sample_rate": 16000}}}),
    )
    .await;
    let upd = c.expect("speech.updated").await;
    assert_eq!(upd["data"]["output_audio"]["codec"], "pcm");
    assert_eq!(
        upd["data"]["output_audio"]["pcm_config"]["sample_rate"],
        16000
    );
    c.send("input_text_buffer.append", json!({"delta": "hello "}))
        .await;
    c.send("input_text_buffer.append", json!({"delta": "world"}))
        .await;
    c.send("input_text_buffer.complete", Value::Null).await;
    let evs = c.until("speech.audio.completed").await;
    assert_eq!(
        collapsed(&evs),
        vec![
            "input_text_buffer.completed",
            "speech.audio.update",
            "speech.audio.completed"
        ]
    );
    let bytes = audio_bytes(&evs, "speech.audio.update", "delta");
    assert_eq!(bytes as u64, speech_duration_ms("hello world", 1.0) * 32);
    // Over 1024 bytes: 3010, and the session goes on.
    c.send(
        "input_text_buffer.append",
        json!({"delta": "x".repeat(1025)}),
    )
    .await;
    assert_eq!(c.expect("error").await["data"]["code"], 3010);
    c.send("input_text_buffer.append", json!({"delta": "ok"}))
        .await;
    c.send("input_text_buffer.complete", Value::Null).await;
    c.until("speech.audio.completed").await;
    sb.shutdown().await;
}

#[tokio::test]
async fn streaming_asr() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/audio/transcriptions").await;
    c.expect("transcriptions.created").await;
    c.send(
        "transcriptions.update",
        json!({"input_audio": {"format": "pcm", "codec": "pcm", "sample_rate": 16000}}),
    )
    .await;
    let upd = c.expect("transcriptions.updated").await;
    assert_eq!(upd["data"]["input_audio"]["channel"], 1);
    assert_eq!(upd["data"]["input_audio"]["bit_depth"], 16);
    append_pcm16k(&mut c, 2500).await;
    c.send("input_audio_buffer.complete", Value::Null).await;
    let evs = c.until("transcriptions.message.completed").await;
    let contents: Vec<&str> = evs
        .iter()
        .filter(|e| e["event_type"] == "transcriptions.message.update")
        .map(|e| e["data"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        vec![
            "sandbox heard 1.00 s of audio",
            "sandbox heard 2.00 s of audio",
            "sandbox heard 2.50 s of audio"
        ]
    );
    assert_eq!(
        collapsed(&evs)[1..],
        [
            "input_audio_buffer.completed",
            "transcriptions.message.update",
            "transcriptions.message.completed"
        ]
    );
    c.send("input_audio_buffer.clear", Value::Null).await;
    c.expect("input_audio_buffer.cleared").await;
    sb.shutdown().await;
}

#[tokio::test]
async fn reset_after_drops_the_connection_without_close() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=7&sandbox_fault=reset_after%3D3").await;
    c.expect("chat.created").await;
    c.send(
        "conversation.message.create",
        json!({"role": "user", "content_type": "text", "content": "hi"}),
    )
    .await;
    c.expect("conversation.chat.created").await;
    c.expect("conversation.chat.in_progress").await;
    match tokio::time::timeout(Duration::from_secs(5), c.ws.next())
        .await
        .unwrap()
    {
        None | Some(Err(tungstenite::Error::Protocol(_) | tungstenite::Error::Io(_))) => {}
        Some(other) => panic!("expected a reset, got {other:?}"),
    }
    sb.shutdown().await;
}

#[tokio::test]
async fn stall_after_stops_frames_but_keeps_the_connection() {
    let sb = sandbox(false).await;
    let url = format!("{}/v1/chat?bot_id=7", sb.ws_url());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer pat_sandbox".parse().unwrap());
    req.headers_mut()
        .insert("x-sandbox-fault", "stall_after=2".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = Client { ws };
    c.expect("chat.created").await;
    c.send(
        "conversation.message.create",
        json!({"role": "user", "content_type": "text", "content": "hi"}),
    )
    .await;
    c.expect("conversation.chat.created").await;
    assert!(
        c.try_next(Duration::from_millis(400)).await.is_none(),
        "stalled"
    );
    c.ws.send(Message::Ping(b"p".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), c.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(pong, Message::Pong(_)),
        "still connected: {pong:?}"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn malformed_after_sends_one_bad_frame() {
    let sb = sandbox(false).await;
    let mut c = connect(
        &sb,
        "/v1/audio/transcriptions?sandbox_fault=malformed_after%3D1",
    )
    .await;
    c.expect("transcriptions.created").await;
    c.send("transcriptions.update", json!({})).await;
    let raw = match c.ws.next().await.unwrap().unwrap() {
        Message::Text(t) => t.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(
        serde_json::from_str::<Value>(&raw).is_err(),
        "malformed: {raw}"
    );
    c.expect("transcriptions.updated").await;
    sb.shutdown().await;
}

#[tokio::test]
async fn tools_bot_requires_action_then_submit_completes() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=bot_tools").await;
    c.expect("chat.created").await;
    // Nothing pending yet.
    c.send(
        "conversation.chat.submit_tool_outputs",
        json!({"chat_id": "1", "tool_outputs": [{"tool_call_id": "x", "output": "y"}]}),
    )
    .await;
    assert_eq!(c.expect("error").await["data"]["code"], 4000);

    let question = "weather in Paris?";
    c.send(
        "conversation.message.create",
        json!({"role": "user", "content_type": "text", "content": question}),
    )
    .await;
    let evs = c.until("conversation.chat.requires_action").await;
    assert_eq!(
        types(&evs),
        [
            "conversation.chat.created",
            "conversation.chat.in_progress",
            "conversation.message.completed",
            "conversation.chat.requires_action",
        ]
    );
    assert_eq!(evs[2]["data"]["type"], "function_call");
    let chat = &evs[3]["data"];
    assert_eq!(chat["status"], "requires_action");
    assert_eq!(chat["required_action"]["type"], "submit_tool_outputs");
    let call = &chat["required_action"]["submit_tool_outputs"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["location"], question);
    let input = (question.chars().count() as u64).div_ceil(4);
    assert_eq!(
        chat["usage"],
        json!({"token_count": input, "output_count": 0, "input_count": input})
    );
    let chat_id = chat["id"].as_str().unwrap().to_owned();
    let call_id = call["id"].as_str().unwrap().to_owned();
    assert!(
        c.try_next(Duration::from_millis(300)).await.is_none(),
        "the turn waits for tool outputs"
    );

    // Wrong chat id, unknown call id, no outputs: 4000, the action stays pending.
    for data in [
        json!({"chat_id": "123", "tool_outputs": [{"tool_call_id": call_id, "output": "sunny"}]}),
        json!({"chat_id": chat_id, "tool_outputs": [{"tool_call_id": "nope", "output": "sunny"}]}),
        json!({"chat_id": chat_id, "tool_outputs": []}),
    ] {
        c.send("conversation.chat.submit_tool_outputs", data).await;
        assert_eq!(c.expect("error").await["data"]["code"], 4000);
    }

    let output = "sunny, 21 C";
    c.send(
        "conversation.chat.submit_tool_outputs",
        json!({"chat_id": chat_id, "tool_outputs": [{"tool_call_id": call_id, "output": output}]}),
    )
    .await;
    let evs = c.until("conversation.chat.completed").await;
    assert_eq!(
        collapsed(&evs),
        [
            "conversation.chat.in_progress",
            "conversation.message.delta",
            "conversation.audio.sentence_start",
            "conversation.audio.delta",
            "conversation.audio.completed",
            "conversation.message.completed",
            "conversation.chat.completed",
        ]
    );
    assert!(evs.iter().all(|e| e["data"]["id"] == chat_id.as_str()
        || e["data"]["chat_id"] == chat_id.as_str()
        || e["event_type"] == "conversation.audio.sentence_start"));
    let done = &evs.last().unwrap()["data"];
    assert_eq!(done["status"], "completed");
    let answer = evs[evs.len() - 2]["data"]["content"].as_str().unwrap();
    assert!(
        answer.starts_with("Tool output received (sunny, 21 C)."),
        "{answer}"
    );
    let input = input + (output.chars().count() as u64).div_ceil(4);
    let out = (answer.chars().count() as u64).div_ceil(4);
    assert_eq!(
        done["usage"],
        json!({"token_count": input + out, "output_count": out, "input_count": input})
    );

    // Consumed: a second submit has nothing to continue.
    c.send(
        "conversation.chat.submit_tool_outputs",
        json!({"chat_id": chat_id, "tool_outputs": [{"tool_call_id": call_id, "output": "x"}]}),
    )
    .await;
    assert_eq!(c.expect("error").await["data"]["code"], 4000);
    sb.shutdown().await;
}

#[tokio::test]
async fn fail_bot_and_fail_knob_end_turns_in_chat_failed() {
    let sb = sandbox(false).await;
    let mut c = connect(&sb, "/v1/chat?bot_id=bot_fail").await;
    c.expect("chat.created").await;
    for _ in 0..2 {
        c.send(
            "conversation.message.create",
            json!({"role": "user", "content_type": "text", "content": "hello"}),
        )
        .await;
        let evs = c.until("conversation.chat.failed").await;
        assert_eq!(
            types(&evs),
            [
                "conversation.chat.created",
                "conversation.chat.in_progress",
                "conversation.message.delta",
                "conversation.message.delta",
                "conversation.chat.failed",
            ]
        );
        let failed = &evs[4]["data"];
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["id"], evs[0]["data"]["id"]);
        assert_eq!(failed["last_error"]["code"], 5000);
        assert!(failed["failed_at"].as_u64().unwrap() > 0);
        let partial: String = evs[2..4]
            .iter()
            .map(|e| e["data"]["content"].as_str().unwrap())
            .collect();
        let out = (partial.chars().count() as u64).div_ceil(4);
        assert_eq!(
            failed["usage"],
            json!({"token_count": 2 + out, "output_count": out, "input_count": 2})
        );
        assert!(
            c.try_next(Duration::from_millis(300)).await.is_none(),
            "nothing after failed"
        );
    }

    // The knob on an ordinary bot, with an audio turn; failing wins over `_tools`.
    for bot in ["7", "bot_tools"] {
        let mut c = connect(&sb, &format!("/v1/chat?bot_id={bot}&sandbox_fault=fail")).await;
        c.expect("chat.created").await;
        append_pcm16k(&mut c, 200).await;
        c.send("input_audio_buffer.complete", Value::Null).await;
        let evs = c.until("conversation.chat.failed").await;
        assert_eq!(
            collapsed(&evs),
            [
                "input_audio_buffer.completed",
                "conversation.chat.created",
                "conversation.chat.in_progress",
                "conversation.audio_transcript.update",
                "conversation.audio_transcript.completed",
                "conversation.message.completed",
                "conversation.message.delta",
                "conversation.chat.failed",
            ]
        );
        assert_eq!(evs.last().unwrap()["data"]["last_error"]["code"], 5000);
    }
    sb.shutdown().await;
}
