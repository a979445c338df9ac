//! Quotas end to end: Coze-shaped rules on the admin API, enforcement before anything goes
//! upstream, windows that reset, WebSocket cut-off, charging disconnects, and usage that
//! survives `kill -9`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use gateway_tests::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::ws::{Ws, connect};

const LIMITATIONS: &str = "/v1/commerce/benefit/limitations";
const FOREVER: u64 = 253_402_300_799;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A gateway syncing rules from `up` (hourly: rounds happen only when woken).
fn syncing(up: &SandboxHandle) -> GatewayOptions {
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[quota.sync]\nenabled = true\ninterval = \"1h\"\nplan_qps = false\n".into();
    opts
}

async fn add_rule(
    gw: &GatewayProcess,
    device: Option<&str>,
    benefit: &str,
    limit: u64,
    unit: &str,
    started_at: u64,
) -> Value {
    let mut body = json!({
        "entity_type": if device.is_some() { "single_device" } else { "enterprise_all_devices" },
        "benefit_info": {"benefit_type": benefit, "active_mode": "absolute_time", "started_at": started_at,
                         "ended_at": FOREVER, "limit": limit, "status": "valid", "trigger_unit": unit, "trigger_time": 1}
    });
    if let Some(d) = device {
        body["entity_id"] = json!(d);
    }
    let r = gw.admin(Method::POST, LIMITATIONS, Some(body)).await;
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["code"], 0, "{v}");
    v["data"]["benefit_info"].clone()
}

/// Streams a chat; returns (HTTP status, tokens in its usage event, the answer).
async fn chat(gw: &GatewayProcess, token: &str) -> (u16, u64, reqwest::header::HeaderMap, String) {
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(token)
        .json(&json!({"bot_id": "b1", "user_id": "u1", "stream": true,
            "additional_messages": [{"role": "user", "content": "what is the weather like today in Hangzhou", "content_type": "text"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await.unwrap();
    let tokens = body
        .split("\n\n")
        .find(|e| e.starts_with("event:conversation.chat.completed"))
        .and_then(|e| e.lines().nth(1)?.strip_prefix("data:").map(str::to_owned))
        .map(|d| {
            serde_json::from_str::<Value>(&d).unwrap()["usage"]["token_count"]
                .as_u64()
                .unwrap()
        })
        .unwrap_or(0);
    (status, tokens, headers, body)
}

async fn usage_of(gw: &GatewayProcess, device: &str) -> Vec<Value> {
    let v: Value = gw
        .admin(
            Method::GET,
            &format!("{LIMITATIONS}/usage?entity_type=single_device&entity_id={device}"),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    v["data"]["items"].as_array().unwrap().clone()
}

/// A device with a 1,000-token-per-minute rule streams chats until it is blocked: the total
/// never exceeds the limit by more than one in-flight turn, the refusal is 429 / 4028 with
/// `Retry-After` before anything reaches the upstream, and the device is unblocked when the
/// window resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_quota_blocks_then_the_window_resets() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("q-tokens").await;
    // A one-minute window that started 50 s ago: it resets in about 10 s.
    add_rule(
        &gw,
        Some("q-tokens"),
        "llm_tokens",
        1000,
        "minute",
        now() - 50,
    )
    .await;
    let mut total = 0;
    let mut biggest_turn = 0;
    let refusal = loop {
        let (status, tokens, headers, body) = chat(&gw, &token).await;
        if status != 200 {
            break (status, headers, body);
        }
        total += tokens;
        biggest_turn = biggest_turn.max(tokens);
        assert!(total < 100_000, "never blocked");
    };
    let (status, headers, body) = refusal;
    assert_eq!(status, 429);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], 4028, "{v}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(total >= 1000 - biggest_turn, "blocked too early: {total}");
    assert!(
        total <= 1000 + biggest_turn,
        "overshoot beyond one turn: {total} (turn {biggest_turn})"
    );
    let before = up
        .state
        .counters
        .api_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(chat(&gw, &token).await.0, 429);
    assert_eq!(
        up.state
            .counters
            .api_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        before,
        "refused before the upstream"
    );
    let items = usage_of(&gw, "q-tokens").await;
    assert_eq!(
        items[0]["used"].as_u64().unwrap(),
        total,
        "usage API agrees with what the device received"
    );
    // The window resets.
    tokio::time::sleep(Duration::from_secs(retry + 1)).await;
    assert_eq!(chat(&gw, &token).await.0, 200, "unblocked after the reset");
}

/// The Coze-shaped rule API: create (validated, all errors with field paths), list with
/// filters and pagination, update, usage; the device sees its own quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_api_has_coze_shapes_and_devices_see_their_quota() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("q-api").await;
    let rule = add_rule(&gw, None, "requests", 100, "day", 0).await;
    let id = rule["benefit_id"].as_str().unwrap().to_owned();
    assert_eq!(rule["entity_type"], "enterprise_all_devices");
    for i in 0..25 {
        add_rule(
            &gw,
            Some(&format!("other-{i}")),
            "llm_tokens",
            10,
            "never",
            0,
        )
        .await;
    }
    let bad = gw
        .admin(Method::POST, LIMITATIONS, Some(json!({"entity_type": "single_device", "benefit_info": {"benefit_type": "llm_tokens", "started_at": 10, "ended_at": 5, "limit": 1, "trigger_unit": "week", "trigger_time": 0}})))
        .await;
    assert_eq!(bad.status(), 400);
    let dup = gw
        .admin(Method::POST, LIMITATIONS, Some(json!({"entity_type": "enterprise_all_devices", "benefit_info": {"benefit_type": "requests", "started_at": 0, "ended_at": FOREVER, "limit": 5, "trigger_unit": "hour", "trigger_time": 1}})))
        .await;
    assert_eq!(
        dup.status(),
        400,
        "one periodic enterprise rule per benefit type"
    );

    let mut seen = 0;
    let mut page_token = String::new();
    loop {
        let v: Value = gw
            .admin(
                Method::GET,
                &format!(
                    "{LIMITATIONS}?entity_type=single_device&page_size=10&page_token={page_token}"
                ),
                None,
            )
            .await
            .json()
            .await
            .unwrap();
        seen += v["data"]["benefit_infos"].as_array().unwrap().len();
        if !v["data"]["has_more"].as_bool().unwrap() {
            break;
        }
        page_token = v["data"]["page_token"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen, 25);
    assert!(
        gw.metrics()
            .await
            .contains("fleetgate_quota_rules{source=\"local\"} 26"),
        "the rule gauge follows admin changes (1 fleet + 25 device rules; 2 refused)"
    );

    for _ in 0..3 {
        assert_eq!(
            gw.http
                .post(format!("{}/v1/conversation/create", gw.device))
                .bearer_auth(&token)
                .json(&json!({"bot_id": "b"}))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let put = gw
        .admin(
            Method::PUT,
            &format!("{LIMITATIONS}/{id}"),
            Some(json!({"limit": 3})),
        )
        .await;
    assert_eq!(put.status(), 200);
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(&token)
        .json(&json!({"bot_id": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "limit lowered to what was used");
    let mine: Value = gw
        .http
        .get(format!("{}/v1/gateway/quota", gw.device))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let item = &mine["data"]["items"][0];
    assert_eq!(
        (
            item["used"].as_u64(),
            item["remaining"].as_u64(),
            item["limit"].as_u64()
        ),
        (Some(3), Some(0), Some(3)),
        "{mine}"
    );
    assert!(item["resets_at"].as_u64().unwrap() > now());
    let r = gw
        .admin(
            Method::PUT,
            &format!("{LIMITATIONS}/nope"),
            Some(json!({"limit": 3})),
        )
        .await;
    assert_eq!(r.status(), 404);
    let r = gw
        .http
        .get(format!("{}/v1/gateway/quota", gw.device))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// A `/v1/chat` voice session of `token`'s device, configured for 16 kHz PCM input.
async fn voice_session(
    gw: &GatewayProcess,
    token: &str,
) -> (
    futures_util::stream::SplitSink<Ws, Message>,
    futures_util::stream::SplitStream<Ws>,
) {
    let ws = connect(gw, token, "/v1/chat?bot_id=b1").await.unwrap();
    let (mut tx, rx) = ws.split();
    tx.send(Message::text(json!({"id": "1", "event_type": "chat.update", "data": {
        "input_audio": {"format": "pcm", "codec": "pcm", "sample_rate": 16000, "channel": 1, "bit_depth": 16}}}).to_string())).await.unwrap();
    (tx, rx)
}

/// A voice session with 10 s of input-audio quota is cut within a second of audio of its
/// limit: an `error` event 4028, then a close frame; nothing more is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_session_is_cut_when_its_audio_quota_runs_out() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("q-voice").await;
    add_rule(&gw, Some("q-voice"), "audio_in_ms", 10_000, "never", 0).await;
    let (mut tx, mut rx) = voice_session(&gw, &token).await;
    // 200 ms frames as fast as possible: 20 s of audio offered.
    let frame = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 6400]);
    let sender = tokio::spawn(async move {
        for i in 0..100 {
            let msg = Message::text(json!({"id": format!("a{i}"), "event_type": "input_audio_buffer.append", "data": {"delta": frame}}).to_string());
            if tx.send(msg).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx
    });
    let mut got_error = false;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("cut in time")
        {
            Some(Ok(Message::Text(t))) => {
                let e: Value = serde_json::from_str(&t).unwrap();
                if e["event_type"] == "error" && e["data"]["code"] == 4028 {
                    got_error = true;
                }
            }
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            other => panic!("expected error + close, got {other:?}"),
        }
    };
    let _ = sender.await;
    assert!(got_error, "error event 4028 before the close");
    assert_eq!(close.expect("close frame").code, CloseCode::Policy);
    let used = eventually(Duration::from_secs(3), || async {
        usage_of(&gw, "q-voice").await[0]["used"]
            .as_u64()
            .unwrap_or(0)
            >= 10_000
    })
    .await;
    assert!(used);
    let used = usage_of(&gw, "q-voice").await[0]["used"].as_u64().unwrap();
    assert!(
        used <= 11_000,
        "charged {used} ms: more than 1 s past the 10 s limit"
    );
}

/// A masked client text frame (mask key 0: the payload goes as is).
fn client_text(payload: &str) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![0x81];
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n <= 0xFFFF {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload.as_bytes());
    f
}

/// Splits a server byte stream into (opcode, payload) frames; a trailing partial frame is
/// returned as opcode 0xFF.
fn server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let opcode = b[0] & 0x0F;
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if masked {
            at += 4;
        }
        if b.len() < at + len {
            break;
        }
        out.push((opcode, b[at..at + len].to_vec()));
        b = &b[at + len..];
    }
    if !b.is_empty() {
        out.push((0xFF, b.to_vec()));
    }
    out
}

/// After the gateway's own close (quota cut: `error` 4028, then close 1008) the device gets
/// nothing more: RFC 6455 §5.5.1 allows no frame after a close. Before, the upstream's answer
/// to the gateway's close was relayed as a second close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_cut_sends_one_close_frame_and_nothing_after_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("q-close").await;
    add_rule(&gw, Some("q-close"), "audio_in_ms", 1_000, "never", 0).await;
    let mut s = tokio::net::TcpStream::connect(gw.device_addr)
        .await
        .unwrap();
    let head = format!(
        "GET /v1/chat?bot_id=b1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let body_at = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "closed before the 101");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(got.starts_with(b"HTTP/1.1 101"), "upgraded");
    // 2.7 s of audio (default input: 24 kHz 16-bit PCM) against a 1 s rule.
    let frame = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 6400]);
    for i in 0..20 {
        let msg = json!({"id": format!("a{i}"), "event_type": "input_audio_buffer.append", "data": {"delta": frame}});
        if s.write_all(&client_text(&msg.to_string())).await.is_err() {
            break;
        }
    }
    // Read to the end without answering the close: the gateway ends the connection.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the gateway ended the session");
    let frames = server_frames(&got[body_at..]);
    let shown: Vec<(u8, String)> = frames
        .iter()
        .map(|(op, p)| (*op, String::from_utf8_lossy(p).into_owned()))
        .collect();
    let closes: Vec<usize> = (0..frames.len()).filter(|&i| frames[i].0 == 0x8).collect();
    assert_eq!(closes.len(), 1, "exactly one close frame: {shown:?}");
    let (_, close) = frames.last().unwrap();
    assert_eq!(
        closes[0],
        frames.len() - 1,
        "nothing after the close: {shown:?}"
    );
    assert_eq!(
        u16::from_be_bytes([close[0], close[1]]),
        1008,
        "policy close"
    );
    let cut = frames.iter().any(|(op, p)| {
        *op == 0x1
            && serde_json::from_slice::<Value>(p)
                .is_ok_and(|e| e["event_type"] == "error" && e["data"]["code"] == 4028)
    });
    assert!(cut, "error 4028 before the close: {shown:?}");
}

/// A voice session idle for longer than `quota.hold_ttl` keeps its hold (refreshed every
/// third of it): nothing is swept, and the audio sent afterwards is charged in full. Before
/// the refresh, the sweep charged the 1 s estimate and forgot the session, so the 3 s sent
/// after the idle period went unmetered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_voice_session_keeps_its_hold_past_hold_ttl() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[quota]\nhold_ttl = \"3s\"\nestimate_audio_ms = 1000".into();
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("q-idle").await;
    add_rule(&gw, Some("q-idle"), "audio_in_ms", 100_000, "never", 0).await;
    let (mut tx, mut rx) = voice_session(&gw, &token).await;
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    // Idle past hold_ttl (the sweep runs every second).
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Then 3 s of audio in 200 ms frames, and a normal close.
    let frame = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 6400]);
    for i in 0..15 {
        let msg = Message::text(json!({"id": format!("a{i}"), "event_type": "input_audio_buffer.append", "data": {"delta": frame}}).to_string());
        tx.send(msg).await.unwrap();
    }
    tx.send(Message::Close(None)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("session closed")
        .unwrap();
    let charged = eventually(Duration::from_secs(3), || async {
        usage_of(&gw, "q-idle").await[0]["used"]
            .as_u64()
            .unwrap_or(0)
            >= 3_000
    })
    .await;
    let used = usage_of(&gw, "q-idle").await[0]["used"].as_u64().unwrap();
    assert!(
        charged,
        "charged {used} ms of the 3,000 ms sent after the idle period"
    );
    assert!(
        !gw.log().contains("never settled"),
        "an open session's hold was swept"
    );
}

/// Reads a session until its close frame: whether an `error` 4028 came first, the close
/// code, and when the close arrived.
async fn until_close(
    rx: &mut futures_util::stream::SplitStream<Ws>,
    patience: Duration,
) -> (bool, Option<CloseCode>, std::time::Instant) {
    let mut got_error = false;
    loop {
        match tokio::time::timeout(patience, rx.next())
            .await
            .expect("the session was cut in time")
        {
            Some(Ok(Message::Text(t))) => {
                let e: Value = serde_json::from_str(&t).unwrap();
                if e["event_type"] == "error" && e["data"]["code"] == 4028 {
                    got_error = true;
                }
            }
            Some(Ok(Message::Close(f))) => {
                return (got_error, f.map(|f| f.code), std::time::Instant::now());
            }
            Some(Ok(_)) => {}
            other => panic!("expected error + close, got {other:?}"),
        }
    }
}

/// Idle `/v1/chat` sessions of devices with a session-time rule (3 s of `voice_session_ms`,
/// 3 s of `voice_unified_duration_custom`) are cut about 3 s in, with `error` 4028 and close
/// 1008, and charged at most 1 s past the limit; a session-time rule created while a session
/// is open reaches it too. Before, an idle session reported only every third of `hold_ttl`
/// (5 min): the audit's 3 s session ran 12 s and was charged 12,014 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_voice_sessions_are_cut_when_their_time_quota_runs_out() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let rules = [
        ("q-time-ms", "voice_session_ms", 3_000),
        ("q-time-unified", "voice_unified_duration_custom", 3),
    ];
    for (device, benefit, limit) in rules {
        gw.register_device(device).await;
        add_rule(&gw, Some(device), benefit, limit, "never", 0).await;
    }
    let late = gw.register_device("q-time-late").await;
    let session = |device: &'static str| {
        let gw = &gw;
        async move {
            let token = gw.device_token(device).await;
            let started = std::time::Instant::now();
            let (_tx, mut rx) = voice_session(gw, &token).await;
            let (got_error, code, at) = until_close(&mut rx, Duration::from_secs(8)).await;
            (got_error, code, at - started)
        }
    };
    let (a, b) = tokio::join!(session("q-time-ms"), session("q-time-unified"));
    for (device, (got_error, code, took)) in [("q-time-ms", a), ("q-time-unified", b)] {
        assert!(got_error, "{device}: error 4028 before the close");
        assert_eq!(code, Some(CloseCode::Policy), "{device}");
        assert!(
            took >= Duration::from_millis(2_900) && took < Duration::from_millis(4_500),
            "{device}: cut after {took:?}, limit 3 s"
        );
        let used = eventually(Duration::from_secs(3), || async {
            usage_of(&gw, device).await[0]["used"].as_u64().unwrap_or(0) >= 3_000
        })
        .await;
        let charged = usage_of(&gw, device).await[0]["used"].as_u64().unwrap();
        assert!(used, "{device}: charged {charged} ms of a 3 s session");
        assert!(
            charged <= 4_000,
            "{device}: charged {charged} ms, more than 1 s past the limit"
        );
    }
    // No rule when the session opens; one of 2 s arrives half a second in.
    let started = std::time::Instant::now();
    let (_tx, mut rx) = voice_session(&gw, &late).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    add_rule(
        &gw,
        Some("q-time-late"),
        "voice_session_ms",
        2_000,
        "never",
        0,
    )
    .await;
    let (got_error, code, at) = until_close(&mut rx, Duration::from_secs(8)).await;
    let took = at - started;
    assert!(got_error && code == Some(CloseCode::Policy), "{code:?}");
    assert!(
        took < Duration::from_millis(3_500),
        "cut {took:?} after a 2 s rule appeared mid-session"
    );
}

/// Opens a `/v1/chat` session (extra query: `query`), speaks 0.2 s and commits the turn.
async fn ask(gw: &GatewayProcess, token: &str, query: &str) -> Ws {
    let mut ws = connect(gw, token, &format!("/v1/chat?bot_id=b1{query}"))
        .await
        .unwrap();
    let frame = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 960]); // 20 ms
    for i in 0..10 {
        let msg = json!({"id": format!("a{i}"), "event_type": "input_audio_buffer.append", "data": {"delta": frame}});
        ws.send(Message::text(msg.to_string())).await.unwrap();
    }
    let done = json!({"id": "c", "event_type": "input_audio_buffer.complete"});
    ws.send(Message::text(done.to_string())).await.unwrap();
    ws
}

/// Reads events until one named `event_type` (the one returned), skipping `skip` of them.
async fn wait_event(ws: &mut Ws, event_type: &str, mut skip: usize) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("event in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            let e: Value = serde_json::from_str(&t).unwrap();
            if e["event_type"] == event_type {
                if skip == 0 {
                    return e;
                }
                skip -= 1;
            }
        }
    }
}

/// `fleetgate_usage_missing_total{protocol="websocket"}`, or 0.
async fn ws_usage_missing(gw: &GatewayProcess) -> u64 {
    gw.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("fleetgate_usage_missing_total{protocol=\"websocket\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// WebSocket chat turns whose usage never comes are charged the chat estimate
/// (`estimate_llm_tokens`), as an SSE stream without usage is, and counted in
/// `fleetgate_usage_missing_total{protocol="websocket"}`: a turn that ends without its usage
/// event (`no_usage`), and a turn the device walks away from mid-reply. A turn with its usage
/// event is charged exactly that. Before, both were charged 0 tokens and counted nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_turns_without_usage_are_charged_the_estimate() {
    // Real-time audio: a reply takes long enough to walk away from.
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[quota]\nestimate_llm_tokens = 777".into();
    let gw = GatewayProcess::start(&opts).await;
    for device in ["q-turn-ok", "q-turn-no-usage", "q-turn-gone"] {
        gw.register_device(device).await;
        add_rule(&gw, Some(device), "llm_tokens", 1_000_000, "never", 0).await;
    }
    let used = |device: &'static str| {
        let gw = &gw;
        async move { usage_of(gw, device).await[0]["used"].as_u64().unwrap() }
    };
    let settled = |device: &'static str, want: u64| async move {
        eventually(Duration::from_secs(5), || async {
            used(device).await == want
        })
        .await
    };

    // A complete turn: exactly its usage, nothing counted missing.
    let mut ws = ask(&gw, &gw.device_token("q-turn-ok").await, "").await;
    let done = wait_event(&mut ws, "conversation.chat.completed", 0).await;
    let tokens = done["data"]["usage"]["token_count"].as_u64().unwrap();
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    assert!(
        settled("q-turn-ok", tokens).await,
        "charged {} for a {tokens}-token turn",
        used("q-turn-ok").await
    );
    assert_eq!(ws_usage_missing(&gw).await, 0);

    // The turn ends (its answer completed) without `conversation.chat.completed`.
    let token = gw.device_token("q-turn-no-usage").await;
    let mut ws = ask(&gw, &token, "&sandbox_fault=no_usage").await;
    wait_event(&mut ws, "conversation.audio.completed", 0).await;
    // The answer's `message.completed` is the last event of the turn under `no_usage`.
    wait_event(&mut ws, "conversation.message.completed", 0).await;
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    assert!(
        settled("q-turn-no-usage", 777).await,
        "a turn without usage charged {} tokens, not the 777 estimate",
        used("q-turn-no-usage").await
    );
    assert_eq!(ws_usage_missing(&gw).await, 1);

    // The device goes away (no close frame) while the reply is still playing.
    let mut ws = ask(&gw, &gw.device_token("q-turn-gone").await, "").await;
    wait_event(&mut ws, "conversation.audio.delta", 0).await;
    drop(ws);
    assert!(
        settled("q-turn-gone", 777).await,
        "a turn cut by a disconnect charged {} tokens, not the 777 estimate",
        used("q-turn-gone").await
    );
    assert_eq!(ws_usage_missing(&gw).await, 2);
}

/// An upgrade whose upstream handshake times out is a 504 and costs the device nothing: its
/// hold is refunded, as when the upstream refuses or cannot be reached. Before, the hold stayed
/// open until the sweep charged it, so a device with one session left was locked out by an
/// upstream that was merely slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshake_timeout_is_refunded() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.websocket_toml = "handshake_timeout = \"500ms\"".into();
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("q-slow-ws").await;
    add_rule(&gw, Some("q-slow-ws"), "requests", 1, "never", 0).await;
    let slow = connect(
        &gw,
        &token,
        "/v1/chat?bot_id=b1&sandbox_fault=latency_ms%3D3000",
    )
    .await;
    match slow {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 504, "handshake timeout")
        }
        other => panic!("expected a 504, got {other:?}"),
    }
    let item = &usage_of(&gw, "q-slow-ws").await[0];
    assert_eq!(
        (item["used"].as_u64(), item["reserved"].as_u64()),
        (Some(0), Some(0)),
        "nothing charged or held after a timeout: {item}"
    );
    // The device's only session is still there to use.
    let mut ws = connect(&gw, &token, "/v1/chat?bot_id=b1")
        .await
        .expect("admitted: the timed-out attempt cost nothing");
    ws.close(None).await.unwrap();
}

/// A device that disconnects mid-stream is still charged (the hold), and usage written
/// before `kill -9` is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_are_charged_and_usage_survives_kill_9() {
    let up = sandbox_upstream(SandboxConfig {
        sse_event_delay: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let dir = TempDir::new();
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.store_path = Some(dir.0.join("q.redb"));
    let mut gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("q-gone").await;
    add_rule(&gw, Some("q-gone"), "llm_tokens", 1_000_000, "never", 0).await;
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&token)
        .json(&chat_stream_request())
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let _first = body.next().await.unwrap().unwrap();
    drop(body); // the device goes away mid-stream
    let charged = eventually(Duration::from_secs(5), || async {
        usage_of(&gw, "q-gone").await[0]["used"]
            .as_u64()
            .unwrap_or(0)
            >= 1000
    })
    .await;
    assert!(
        charged,
        "disconnect charged the hold: {:?}",
        usage_of(&gw, "q-gone").await
    );
    let used_before = usage_of(&gw, "q-gone").await[0]["used"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // > persist interval
    gw.signal("KILL");
    gw.child.wait().await.unwrap();
    let gw = GatewayProcess::start(&opts).await;
    assert_eq!(
        usage_of(&gw, "q-gone").await[0]["used"].as_u64().unwrap(),
        used_before,
        "usage survived kill -9"
    );
}

/// Per-device request rates and the fleet-wide chat QPS cap answer 429 / 4013 with
/// `Retry-After`, before anything goes upstream; other devices (per-device limit) are
/// unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_device_and_fleet() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml =
        "[rate_limits]\ndevice_rps = 1\ndevice_burst = 2\nfleet_workflow_qps = 1\n".into();
    let gw = GatewayProcess::start(&opts).await;
    let a = gw.register_device("rl-a").await;
    let b = gw.register_device("rl-b").await;
    let call = |token: String, path: &'static str| {
        let http = gw.http.clone();
        let url = format!("{}{path}", gw.device);
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"bot_id": "b", "workflow_id": "w"}))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (s, v["code"].as_i64(), retry)
        }
    };
    assert_eq!(call(a.clone(), "/v1/conversation/create").await.0, 200);
    assert_eq!(call(a.clone(), "/v1/conversation/create").await.0, 200);
    let (status, code, retry) = call(a.clone(), "/v1/conversation/create").await;
    assert_eq!((status, code), (429, Some(4013)), "burst of 2 spent");
    assert!(retry.is_some());
    assert_eq!(
        call(b.clone(), "/v1/conversation/create").await.0,
        200,
        "another device is unaffected"
    );
    // Fleet-wide: one workflow request per second for everyone.
    assert_eq!(call(b.clone(), "/v1/workflow/run").await.0, 200);
    let c = gw.register_device("rl-c").await;
    assert_eq!(
        call(c, "/v1/workflow/run").await.1,
        Some(4013),
        "fleet workflow QPS spent"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("fleetgate_denials_total{reason=\"rate_limited\"}"),
        "{m}"
    );
}

/// One `POST` of a device on the device listener: (status, Coze code, message).
async fn post_as(gw: &GatewayProcess, token: &str, path: &str) -> (u16, Option<i64>, String) {
    let r = gw
        .http
        .post(format!("{}{path}", gw.device))
        .bearer_auth(token)
        .json(&json!({"bot_id": "b", "workflow_id": "w"}))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (
        s,
        v["code"].as_i64(),
        v["msg"].as_str().unwrap_or_default().to_owned(),
    )
}

/// `[rate_limits.routes.<class>]` limits one route class per device: the workflow route is
/// refused once its burst is spent while the device's other routes, and other devices on the
/// same route, still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_rate_limits_one_route_class_per_device() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[rate_limits.routes.workflow]\nrps = 1\nburst = 2\n".into();
    let gw = GatewayProcess::start(&opts).await;
    let a = gw.register_device("rr-a").await;
    let b = gw.register_device("rr-b").await;
    assert_eq!(post_as(&gw, &a, "/v1/workflow/run").await.0, 200);
    assert_eq!(post_as(&gw, &a, "/v1/workflow/run").await.0, 200);
    let (status, code, _) = post_as(&gw, &a, "/v1/workflow/run").await;
    assert_eq!(
        (status, code),
        (429, Some(4013)),
        "the route's burst is spent"
    );
    assert_eq!(
        post_as(&gw, &a, "/v1/conversation/create").await.0,
        200,
        "other routes of the device pass"
    );
    assert_eq!(
        post_as(&gw, &b, "/v1/workflow/run").await.0,
        200,
        "other devices pass"
    );
}

/// The fleet cap is shared fairly: with 20 workflow requests per second for the fleet, a
/// device that has had its share (10 of 20, two devices asking) is refused while the fleet
/// still has requests left, and those go to the device under its share. First come, first
/// served, the greedy device would have taken them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_cap_is_shared_fairly_between_devices() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[rate_limits]\nfleet_workflow_qps = 20\n".into();
    let gw = GatewayProcess::start(&opts).await;
    let light = gw.register_device("fair-light").await;
    let greedy = gw.register_device("fair-greedy").await;
    assert_eq!(post_as(&gw, &light, "/v1/workflow/run").await.0, 200);
    for i in 0..10 {
        assert_eq!(
            post_as(&gw, &greedy, "/v1/workflow/run").await.0,
            200,
            "request {i}: within its share"
        );
    }
    let (status, code, msg) = post_as(&gw, &greedy, "/v1/workflow/run").await;
    assert_eq!((status, code), (429, Some(4013)), "over its share: {msg}");
    assert!(msg.contains("had its share"), "{msg}");
    assert_eq!(
        post_as(&gw, &light, "/v1/workflow/run").await.0,
        200,
        "what was kept back serves the device under its share"
    );
}

/// Rules created upstream (Coze's limitations API, here the sandbox) are enforced at the edge
/// within one sync interval; while the upstream's quota API is down, the last-known rules keep
/// holding and `/readyz` says why; the plan's `api_run_qps` becomes the fleet chat cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rules_are_synced_and_kept_when_sync_fails() {
    let up = sandbox_upstream(SandboxConfig {
        plan_qps: 1,
        ..Default::default()
    })
    .await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[quota.sync]\nenabled = true\ninterval = \"300ms\"\n".into();
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("sync-dev").await;
    let create = |path: &'static str| {
        let http = gw.http.clone();
        let url = format!("{}{path}", gw.device);
        let token = token.clone();
        async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({"bot_id": "b"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(create("/v1/conversation/create").await, 200);
    // An operator blocks the device on Coze (the sandbox upstream).
    let r = gw
        .http
        .post(format!("{}{LIMITATIONS}", up.base_url()))
        .bearer_auth(PAT)
        .json(&json!({"entity_type": "single_device", "entity_id": "sync-dev",
            "benefit_info": {"benefit_type": "resource_point", "active_mode": "absolute_time", "started_at": 0,
                             "ended_at": FOREVER, "limit": 0, "status": "valid", "trigger_unit": "never", "trigger_time": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let blocked = eventually(Duration::from_secs(3), || async {
        create("/v1/conversation/create").await == 429
    })
    .await;
    assert!(
        blocked,
        "rule from upstream enforced within a sync interval or two"
    );

    // The upstream's quota API goes down: the rule keeps holding.
    up.switches()
        .limitations_down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let failing = eventually(Duration::from_secs(3), || async {
        gw.metrics()
            .await
            .contains("fleetgate_quota_sync_runs_total{result=\"error\"}")
    })
    .await;
    assert!(failing);
    assert_eq!(
        create("/v1/conversation/create").await,
        429,
        "last-known rules keep holding"
    );
    let ready: Value = gw
        .http
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ready["quota_sync"]["last_error"].is_string(), "{ready}");
    assert_eq!(
        ready["ready"], true,
        "still ready: the gateway keeps enforcing known rules"
    );

    // Plan QPS 1 for chat: a second chat in the same second is refused fleet-wide.
    let other = gw.register_device("sync-other").await;
    let chat = |t: String| {
        let http = gw.http.clone();
        let url = format!("{}/v3/chat", gw.device);
        async move {
            let r = http.post(url).bearer_auth(t).json(&json!({"bot_id": "b", "user_id": "u",
                "additional_messages": [{"role": "user", "content": "hi", "content_type": "text"}]})).send().await.unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (s, v["code"].as_i64())
        }
    };
    let first = chat(other.clone()).await;
    let second = chat(other).await;
    assert_eq!(first.0, 200, "{first:?}");
    assert_eq!(
        second,
        (429, Some(4013)),
        "plan QPS of 1 applied as the fleet chat cap"
    );
}

/// With sync on, rules written through the gateway's admin API go to the upstream (one source
/// of truth): the upstream's answer comes back as is, and the rule is enforced right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rule_writes_are_forwarded_upstream_when_syncing() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&syncing(&up)).await;
    let token = gw.register_device("fwd-dev").await;
    let body = json!({"entity_type": "single_device", "entity_id": "fwd-dev",
        "benefit_info": {"benefit_type": "resource_point", "active_mode": "absolute_time", "started_at": 0,
                         "ended_at": FOREVER, "limit": 0, "status": "valid", "trigger_unit": "never", "trigger_time": 1}});
    let r = gw.admin(Method::POST, LIMITATIONS, Some(body)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 0, "the upstream's answer: {v}");
    let listed = upstream_get_json(
        &gw.http,
        &up,
        &format!("{LIMITATIONS}?entity_type=single_device&entity_id=fwd-dev"),
    )
    .await;
    assert_eq!(
        listed["data"]["benefit_infos"].as_array().unwrap().len(),
        1,
        "the rule lives upstream: {listed}"
    );
    let blocked = eventually(Duration::from_secs(3), || async {
        gw.http
            .post(format!("{}/v1/conversation/create", gw.device))
            .bearer_auth(&token)
            .json(&json!({"bot_id": "b"}))
            .send()
            .await
            .unwrap()
            .status()
            == 429
    })
    .await;
    assert!(
        blocked,
        "re-synced right after the write (the interval is an hour)"
    );
}

/// With sync on, rules of the gateway's own meters (Coze's quota API does not know them) are
/// created and updated in the gateway, not sent upstream, and are enforced like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_meter_rules_stay_local_when_syncing() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&syncing(&up)).await;
    let token = gw.register_device("meter-dev").await;
    let rule = add_rule(&gw, Some("meter-dev"), "requests", 5, "never", 0).await;
    let id = rule["benefit_id"].as_str().unwrap();
    let listed = upstream_get_json(
        &gw.http,
        &up,
        &format!("{LIMITATIONS}?entity_type=single_device&entity_id=meter-dev"),
    )
    .await;
    let upstream_rules = listed["data"]["benefit_infos"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(upstream_rules, 0, "nothing went upstream: {listed}");
    let r = gw
        .admin(
            Method::PUT,
            &format!("{LIMITATIONS}/{id}"),
            Some(json!({"limit": 0})),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        crate::oauth::use_token(&gw, &token).await,
        429,
        "the local rule (limit 0 now) is enforced"
    );
}

/// `[[quota.rules]]` defaults hold where no rule from the admin API (or the upstream) covers
/// the same scope and kind: a rule written through the API replaces the default, cancelling
/// that rule brings the default back, and the default itself cannot be changed through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_default_rules_hold_until_a_rule_replaces_them() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[[quota.rules]]\nentity_type = \"enterprise_all_devices\"\nbenefit_info = { benefit_type = \"requests\", started_at = 0, ended_at = 253402300799, limit = 2, trigger_unit = \"never\" }\n".into();
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("dflt-dev").await;
    let call = || crate::oauth::use_token(&gw, &token);
    assert_eq!(
        (call().await, call().await, call().await),
        (200, 200, 429),
        "the default's limit of 2"
    );

    let listed: Value = gw
        .admin(
            Method::GET,
            &format!("{LIMITATIONS}?entity_type=enterprise_all_devices"),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["data"]["benefit_infos"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["benefit_id"].as_str())
        .collect();
    assert_eq!(ids, ["config-0"], "{listed}");
    let r = gw
        .admin(
            Method::PUT,
            &format!("{LIMITATIONS}/config-0"),
            Some(json!({"limit": 100})),
        )
        .await;
    assert_eq!(
        r.status(),
        400,
        "a default is changed in config.toml, not through the API"
    );

    let rule = add_rule(&gw, None, "requests", 100, "never", 0).await;
    let id = rule["benefit_id"].as_str().unwrap();
    assert_eq!(call().await, 200, "the API's rule replaced the default");
    let r = gw
        .admin(
            Method::PUT,
            &format!("{LIMITATIONS}/{id}"),
            Some(json!({"status": "cancel"})),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(call().await, 429, "cancelled: the default holds again");
}

/// Deleting a device deletes its usage: registered again under the same id, it starts from
/// nothing (and the gateway keeps no counters for devices that are gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_device_takes_its_usage_with_it() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("del-dev").await;
    add_rule(&gw, Some("del-dev"), "requests", 1, "never", 0).await;
    use crate::oauth::use_token;
    assert_eq!(
        (use_token(&gw, &token).await, use_token(&gw, &token).await),
        (200, 429)
    );
    let r = gw
        .admin(Method::DELETE, "/admin/v1/devices/del-dev", None)
        .await;
    assert_eq!(r.status(), 200);
    let token = gw.register_device("del-dev").await;
    assert_eq!(
        use_token(&gw, &token).await,
        200,
        "the new device starts with nothing used"
    );
}
