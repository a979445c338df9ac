//! Fault injection with the sandbox knobs: the device gets a clear error or a proper close,
//! the gateway keeps serving others, and quota holds are released or charged exactly once.

use std::time::Duration;

use futures_util::StreamExt;
use gateway_tests::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const FOREVER: u64 = 253_402_300_799;

async fn gateway_with_token_rule(up: &SandboxHandle, device: &str) -> (GatewayProcess, String) {
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device(device).await;
    let r = gw
        .admin(
            Method::POST,
            "/v1/commerce/benefit/limitations",
            Some(json!({"entity_type": "single_device", "entity_id": device,
                "benefit_info": {"benefit_type": "llm_tokens", "started_at": 0, "ended_at": FOREVER,
                                 "limit": 1_000_000, "trigger_unit": "never", "trigger_time": 1}})),
        )
        .await;
    assert_eq!(r.status(), 200);
    (gw, token)
}

async fn used(gw: &GatewayProcess, device: &str) -> u64 {
    let v: Value = gw
        .admin(Method::GET, &format!("/v1/commerce/benefit/limitations/usage?entity_type=single_device&entity_id={device}"), None)
        .await
        .json()
        .await
        .unwrap();
    v["data"]["items"][0]["used"].as_u64().unwrap()
}

async fn chat(gw: &GatewayProcess, token: &str, fault: &str) -> (u16, Result<String, String>) {
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(token)
        .header("x-sandbox-fault", fault)
        .json(&chat_stream_request())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.map_err(|e| e.to_string()))
}

/// The upstream resets mid-SSE: the device's stream ends early, the hold is charged once
/// (usage unknown), and the next request is served normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_sse() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let (gw, token) = gateway_with_token_rule(&up, "f-sse").await;
    let (status, body) = chat(&gw, &token, "reset_after=2").await;
    assert_eq!(status, 200);
    assert!(
        body.is_err(),
        "the cut stream must reach the device broken, not complete: {body:?}"
    );
    let charged = eventually(Duration::from_secs(3), || async {
        used(&gw, "f-sse").await == 1000
    })
    .await;
    assert!(
        charged,
        "the hold (1000 tokens) charged once: {}",
        used(&gw, "f-sse").await
    );
    let (status, body) = chat(&gw, &token, "").await;
    assert_eq!(status, 200);
    assert!(body.unwrap().contains("event:done"));
}

/// A non-streaming chat answers before the chat runs, so its usage is never in the answer: the
/// admission estimate (1000 tokens) is charged, not nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_chat_is_charged_the_estimate() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let (gw, token) = gateway_with_token_rule(&up, "f-async").await;
    let mut body = chat_stream_request();
    body["stream"] = json!(false);
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"]["status"], "in_progress", "{v}");
    let charged = eventually(Duration::from_secs(3), || async {
        used(&gw, "f-async").await == 1000
    })
    .await;
    assert!(charged, "charged {}", used(&gw, "f-async").await);
    assert!(
        !gw.metrics()
            .await
            .contains("fleetgate_usage_missing_total{"),
        "an estimate by design is not missing usage"
    );
}

/// 5xx and 429 bursts from the upstream reach the device in the envelope and cost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_passed_on_and_refunded() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let (gw, token) = gateway_with_token_rule(&up, "f-5xx").await;
    for (fault, status, code) in [("status=503", 503, 5000), ("rate_limit", 429, 4013)] {
        for _ in 0..5 {
            let (s, body) = chat(&gw, &token, fault).await;
            assert_eq!(s, status);
            let v: Value = serde_json::from_str(&body.unwrap()).unwrap();
            assert_eq!(v["code"], code);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        used(&gw, "f-5xx").await,
        0,
        "refused requests are not charged"
    );
    assert_eq!(chat(&gw, &token, "").await.0, 200);
}

/// The upstream drops a WebSocket without a close frame: the device gets close 1011 instead
/// of a bare reset; other sessions are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_websocket_is_a_proper_close() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let (gw, token) = gateway_with_token_rule(&up, "f-ws").await;
    let mut req = format!(
        "{}/v1/chat?bot_id=b1&sandbox_fault=reset_after%3D1",
        gw.ws_url()
    )
    .into_client_request()
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send_text().await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("ended in time")
        {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.expect("close frame").code, CloseCode::Error);
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(&token)
        .json(&json!({"bot_id": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

trait SendText {
    async fn send_text(&mut self);
}

impl SendText
    for tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
{
    /// Sends a `chat.update` so the sandbox emits its second downlink frame (reset point).
    async fn send_text(&mut self) {
        use futures_util::SinkExt;
        let _ = self
            .send(Message::text(
                json!({"id": "1", "event_type": "chat.update", "data": {}}).to_string(),
            ))
            .await;
    }
}

/// The embedded store's disk fills up. Admin writes answer 503 and change nothing; devices
/// keep being served and metered; once space is back the store writes again (redb is reopened
/// after its I/O error), and every acknowledged change and all usage is on disk across a
/// `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_store_keeps_serving_and_loses_no_usage() {
    let Some(disk) = SmallDisk::mount(4096) else {
        return;
    };
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.store_path = Some(disk.dir.0.join("store.redb"));
    let mut gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("full-1").await;
    let r = gw
        .admin(
            Method::POST,
            "/v1/commerce/benefit/limitations",
            Some(
                json!({"entity_type": "single_device", "entity_id": "full-1",
                "benefit_info": {"benefit_type": "llm_tokens", "started_at": 0, "ended_at": FOREVER,
                                 "limit": 1_000_000, "trigger_unit": "never", "trigger_time": 1}}),
            ),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(chat(&gw, &token, "").await.0, 200);

    let filler = disk.fill();
    // A bulk registration needs fresh pages: refused with 503, and nothing changes.
    let bulk: Vec<Value> = (0..2000)
        .map(|i| json!({"device_id": format!("full-bulk-{i:04}"), "labels": {"site": "x".repeat(200)}}))
        .collect();
    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/devices",
            Some(json!({"devices": bulk})),
        )
        .await;
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    assert_eq!(
        gw.admin(Method::GET, "/admin/v1/devices/full-bulk-0000", None)
            .await
            .status(),
        404,
        "a refused write changed nothing"
    );
    assert!(
        gw.metrics()
            .await
            .contains("fleetgate_store_errors_total{table=\"devices\"} 1"),
        "the failed write is counted"
    );
    // Devices are still served and metered while the disk is full.
    for _ in 0..3 {
        let (status, body) = chat(&gw, &token, "").await;
        assert_eq!(status, 200);
        assert!(body.unwrap().contains("conversation.chat.completed"));
    }
    let used_while_full = used(&gw, "full-1").await;
    assert!(used_while_full > 0);

    std::fs::remove_file(filler).unwrap();
    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/devices",
            Some(json!({"devices": bulk})),
        )
        .await;
    assert_eq!(r.status(), 200, "writes work again once space is back");
    assert!(gw.log().contains("Store reopened after an I/O error."));
    tokio::time::sleep(Duration::from_millis(500)).await; // > the usage persist interval

    gw.signal("KILL");
    gw.child.wait().await.unwrap();
    let gw = GatewayProcess::start(&opts).await;
    assert_eq!(
        used(&gw, "full-1").await,
        used_while_full,
        "usage metered while the disk was full survived kill -9"
    );
    assert_eq!(
        gw.admin(Method::GET, "/admin/v1/devices/full-bulk-1999", None)
            .await
            .status(),
        200
    );
    let token = gw.device_token("full-1").await;
    assert_eq!(chat(&gw, &token, "").await.0, 200);
}
