//! Metering through the gateway: what the device consumed is read from the traffic itself
//! (SSE usage events, WebSocket audio frames, TTS requests) and counted per meter.

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use gateway_tests::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `fleetgate_metered_units_total{meter="…"}`, or 0.
fn metered(metrics: &str, meter: &str) -> u64 {
    let prefix = format!("fleetgate_metered_units_total{{meter=\"{meter}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn wait_metered(gw: &GatewayProcess, meter: &str, at_least: u64) -> String {
    let ok = eventually(Duration::from_secs(5), || async {
        metered(&gw.metrics().await, meter) >= at_least
    })
    .await;
    let m = gw.metrics().await;
    assert!(ok, "{meter} never reached {at_least}:\n{m}");
    m
}

/// SSE chat: the tokens counted equal the usage in the stream's `conversation.chat.completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_chat_tokens_are_metered() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("meter-sse").await;
    let body = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&token)
        .json(&json!({"bot_id": "b1", "user_id": "u1", "stream": true,
            "additional_messages": [{"role": "user", "content": "tell me something", "content_type": "text"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let completed = body
        .split("\n\n")
        .find(|e| e.starts_with("event:conversation.chat.completed"))
        .and_then(|e| e.lines().nth(1))
        .and_then(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .expect("completed event");
    let input = completed["usage"]["input_count"].as_u64().unwrap();
    let output = completed["usage"]["output_count"].as_u64().unwrap();
    let m = wait_metered(&gw, "llm_output_tokens", output).await;
    assert_eq!(metered(&m, "llm_input_tokens"), input);
    assert_eq!(metered(&m, "llm_output_tokens"), output);
    assert_eq!(metered(&m, "requests"), 1);
    assert!(
        m.contains("fleetgate_gateway_overhead_seconds_count{route=\"chat\"} 1"),
        "{m}"
    );
    // The settled request id is remembered (idempotency) and its hold released.
    let settled = "fleetgate_quota_ledger_entries{kind=\"settled\"} 1";
    let open = "fleetgate_quota_ledger_entries{kind=\"open\"} 0";
    let ok = eventually(Duration::from_secs(5), || async {
        let m = gw.metrics().await;
        m.contains(settled) && m.contains(open)
    })
    .await;
    assert!(ok, "ledger gauges never settled:\n{}", gw.metrics().await);
}

/// A voice session: 1 s of 16 kHz PCM up is exactly 1,000 ms of input audio; output audio,
/// tokens and the session's wall time are counted when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_session_audio_and_time_are_metered() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("meter-ws").await;
    let mut req = format!("{}/v1/chat?bot_id=b1", gw.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(json!({"id": "1", "event_type": "chat.update", "data": {
        "input_audio": {"format": "pcm", "codec": "pcm", "sample_rate": 16000, "channel": 1, "bit_depth": 16},
        "output_audio": {"codec": "pcm", "pcm_config": {"sample_rate": 24000}}}}).to_string())).await.unwrap();
    let frame = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 640]);
    for i in 0..50 {
        ws.send(Message::text(json!({"id": format!("a{i}"), "event_type": "input_audio_buffer.append", "data": {"delta": frame}}).to_string())).await.unwrap();
    }
    ws.send(Message::text(
        json!({"id": "c", "event_type": "input_audio_buffer.complete"}).to_string(),
    ))
    .await
    .unwrap();
    let mut audio_out_bytes = 0usize;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(t) = msg else { continue };
        let e: Value = serde_json::from_str(&t).unwrap();
        if e["event_type"] == "conversation.audio.delta" {
            audio_out_bytes += base64::engine::general_purpose::STANDARD
                .decode(e["data"]["content"].as_str().unwrap())
                .unwrap()
                .len();
        }
        if e["event_type"] == "conversation.chat.completed" {
            break;
        }
    }
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let m = wait_metered(&gw, "voice_session_ms", 1).await;
    assert_eq!(metered(&m, "audio_in_ms"), 1000, "50 × 20 ms of 16 kHz PCM");
    assert_eq!(
        metered(&m, "audio_out_ms"),
        (audio_out_bytes / 48) as u64,
        "24 kHz 16-bit mono down"
    );
    assert!(metered(&m, "llm_output_tokens") > 0);
    let frames = |dir: &str| {
        let p = format!("fleetgate_websocket_frames_total{{direction=\"{dir}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&p))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        frames("uplink"),
        1 + 50 + 1 + 1,
        "chat.update, 50 appends, complete, close"
    );
    assert!(frames("downlink") > 5);
}

/// REST TTS: the request's characters and the returned audio's duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_characters_and_audio_are_metered() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("meter-tts").await;
    let input = "hello from a speaker";
    let r = gw
        .http
        .post(format!("{}/v1/audio/speech", gw.device))
        .bearer_auth(&token)
        .json(&json!({"input": input, "voice_id": "v1", "response_format": "pcm", "sample_rate": 16000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let audio = r.bytes().await.unwrap();
    let m = wait_metered(&gw, "tts_chars", input.chars().count() as u64).await;
    assert_eq!(metered(&m, "tts_chars"), input.chars().count() as u64);
    assert_eq!(
        metered(&m, "audio_out_ms"),
        (audio.len() / 32) as u64,
        "16 kHz 16-bit mono"
    );
}

/// Metrics stay bounded: 10,000 different devices making requests add no series (no device
/// id is ever a label); process metrics are exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_series_stay_bounded_with_10k_devices() {
    use std::sync::Arc;
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = Arc::new(GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await);
    const N: usize = 10_000;
    let devices: Vec<Value> = (0..N)
        .map(|i| json!({"device_id": format!("fleet-{i:05}")}))
        .collect();
    let r = gw
        .admin(
            reqwest::Method::POST,
            "/admin/v1/devices",
            Some(json!({"devices": devices})),
        )
        .await;
    assert_eq!(r.status(), 200);
    // One admin call mints a token for every device.
    let ids: Vec<String> = (0..N).map(|i| format!("fleet-{i:05}")).collect();
    let r = gw
        .admin(
            reqwest::Method::POST,
            "/admin/v1/tokens",
            Some(json!({"device_ids": ids})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let minted: Value = r.json().await.unwrap();
    assert_eq!(minted["errors"], json!([]));
    let all: Vec<String> = minted["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["access_token"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), N);
    let token = |i: usize| all[i].clone();
    let series = |m: &str| {
        m.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count()
    };
    let call = |t: String| {
        let (http, url) = (
            gw.http.clone(),
            format!("{}/v1/conversation/create", gw.device),
        );
        async move {
            http.post(url)
                .bearer_auth(t)
                .json(&json!({"bot_id": "b"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for i in 0..10 {
        assert_eq!(call(token(i)).await, 200);
    }
    let before = series(&gw.metrics().await);
    let tokens: Vec<String> = (10..N).map(token).collect();
    let mut it = tokens.into_iter();
    loop {
        let batch: Vec<_> = it
            .by_ref()
            .take(64)
            .map(|t| tokio::spawn(call(t)))
            .collect();
        if batch.is_empty() {
            break;
        }
        for t in batch {
            assert_eq!(t.await.unwrap(), 200);
        }
    }
    let m = gw.metrics().await;
    let after = series(&m);
    assert!(
        after <= before + 2,
        "series grew with devices: {before} → {after}"
    );
    assert!(!m.contains("fleet-0"), "a device id leaked into metrics");
    let rss = m
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .unwrap();
    assert!(
        rss.parse::<f64>().unwrap() > 1e6,
        "process metrics exported"
    );
}

/// `serve` turns transparent huge pages off for its process, so khugepaged cannot grow RSS in
/// 2 MiB steps long after warm-up (the soak's late steps; see `disable_transparent_huge_pages`).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_runs_with_transparent_huge_pages_off() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let pid = gw.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled line (kernel < 6.0?):\n{status}"));
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}
