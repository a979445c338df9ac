//! Access policies (`[access]`) end to end: devices restricted by label to paths and bots get
//! 403 / 4101 in Coze's envelope, before the upstream runs anything and with no quota
//! charged; devices without the label are unaffected; a reload changes the answers live.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_tests::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::ws::connect;

/// Toys may use chat, the voice chat and workflows, with bot `b1` only.
const TOY_POLICY: &str = r#"
[access]
default = "allow"
[[access.policies]]
match_labels = { product = "toy" }
allow_paths = ["/v3/chat", "/v1/chat", "/v1/workflow/"]
allow_bots = ["b1"]
"#;

async fn start(access: &str) -> (SandboxHandle, GatewayProcess) {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = access.to_owned();
    let gw = GatewayProcess::start(&opts).await;
    (up, gw)
}

/// Registers a device with these labels; returns its token.
async fn device(gw: &GatewayProcess, id: &str, labels: Value) -> String {
    let r = gw
        .admin_post(
            "/admin/v1/devices",
            json!({"device_id": id, "labels": labels}),
        )
        .await;
    assert!(r.status().is_success(), "register: {}", r.status());
    gw.device_token(id).await
}

/// What the sandbox upstream has run: chats created and requests it accepted (whole
/// requests: its handlers read the body before counting).
fn upstream_work(up: &SandboxHandle) -> (usize, u64) {
    (
        up.state.chats.lock().unwrap().chats.len(),
        up.state.counters.api_requests.load(Ordering::Relaxed),
    )
}

async fn post(gw: &GatewayProcess, token: &str, path: &str, body: Vec<u8>) -> reqwest::Response {
    gw.http
        .post(format!("{}{path}", gw.device))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

fn chat_body(bot: &str, stream: bool) -> Vec<u8> {
    let mut b = chat_stream_request();
    b["bot_id"] = json!(bot);
    b["stream"] = json!(stream);
    b.to_string().into_bytes()
}

/// 403 / 4101 in Coze's envelope with a log id; returns the message.
async fn assert_forbidden(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("x-tt-logid").is_some());
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 4101, "{v}");
    assert!(v["detail"]["logid"].is_string(), "{v}");
    v["msg"].as_str().unwrap().to_owned()
}

fn forbidden_count(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("fleetgate_denials_total{reason=\"forbidden\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A path outside the toy policy is refused at admission, before anything goes upstream;
/// allowed paths pass; a device without the label is unaffected; refusals are counted as
/// `forbidden`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_paths_are_refused_with_403_before_the_upstream() {
    let (up, gw) = start(TOY_POLICY).await;
    let toy = device(&gw, "toy-1", json!({"product": "toy", "color": "red"})).await;
    let lamp = device(&gw, "lamp-1", json!({"product": "lamp"})).await;
    let before = upstream_work(&up);
    let conv = "/v1/conversation/create";
    let msg = assert_forbidden(post(&gw, &toy, conv, b"{}".to_vec()).await).await;
    assert_eq!(msg, "device not allowed on this path");
    let r = gw
        .http
        .get(format!("{}/v1/files/retrieve?file_id=1", gw.device))
        .bearer_auth(&toy)
        .send()
        .await
        .unwrap();
    assert_forbidden(r).await;
    assert_eq!(upstream_work(&up), before, "refused before the upstream");
    // An allowed path reaches the upstream (whatever it answers).
    let r = gw
        .http
        .get(format!(
            "{}/v3/chat/retrieve?conversation_id=1&chat_id=2",
            gw.device
        ))
        .bearer_auth(&toy)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 403);
    assert_eq!(upstream_work(&up).1, before.1 + 1);
    // No label, no restriction.
    let r = post(&gw, &lamp, conv, b"{}".to_vec()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(forbidden_count(&gw.metrics().await), 2);
    assert!(gw.log().contains("\"deny_reason\":\"forbidden\""));
}

/// `/v3/chat` bodies of a bot-restricted device are checked before the upstream gets them:
/// a disallowed, missing or unreadable `bot_id` (streaming or not, sent at once or chunked)
/// gets 403 / 4101 and the upstream runs no chat; the allowed bot streams a whole chat; a
/// device without the label may use any bot. Workflow bodies may omit `bot_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_chat_bodies_naming_other_bots_never_reach_the_upstream() {
    let (up, gw) = start(TOY_POLICY).await;
    let toy = device(&gw, "toy-2", json!({"product": "toy"})).await;
    let lamp = device(&gw, "lamp-2", json!({"product": "lamp"})).await;
    let before = upstream_work(&up);
    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("stream, other bot", chat_body("b2", true)),
        ("non-stream, other bot", chat_body("b2", false)),
        (
            "no bot_id",
            json!({"user_id": "u", "stream": true})
                .to_string()
                .into_bytes(),
        ),
        ("not JSON", b"bot_id=b1".to_vec()),
        (
            "two bot_ids",
            br#"{"bot_id":"b2","bot_id":"b1","user_id":"u","stream":true}"#.to_vec(),
        ),
        (
            "too large to check",
            json!({"bot_id": "b1", "user_id": "u", "pad": "x".repeat(70 * 1024)})
                .to_string()
                .into_bytes(),
        ),
    ];
    for (what, body) in refused {
        let msg = assert_forbidden(post(&gw, &toy, "/v3/chat", body).await).await;
        assert!(msg.contains("bot"), "{what}: {msg}");
    }
    // Chunked, the other bot's id split across chunks.
    let chunks = [
        "{\"bot_id\":\"",
        "b",
        "2\",\"user_id\":\"u\",\"stream\":true}",
    ];
    let stream = futures_util::stream::iter(
        chunks.map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from_static(c.as_bytes()))),
    );
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&toy)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_forbidden(r).await;
    assert_eq!(
        upstream_work(&up),
        before,
        "the upstream ran no chat and accepted no request"
    );
    // The allowed bot, streaming, also chunked: the held-back body is released whole.
    let r = post(&gw, &toy, "/v3/chat", chat_body("b1", true)).await;
    assert_eq!(r.status(), 200);
    assert_complete_chat_stream(&r.text().await.unwrap());
    let chunks = [
        "{\"bot_id\":\"",
        "b",
        "1\",\"user_id\":\"u\",\"stream\":true,",
        "\"additional_messages\":[{\"role\":\"user\",\"content\":\"hi\",\"content_type\":\"text\"}]}",
    ];
    let stream = futures_util::stream::iter(
        chunks.map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from_static(c.as_bytes()))),
    );
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&toy)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_complete_chat_stream(&r.text().await.unwrap());
    let r = post(&gw, &toy, "/v3/chat", chat_body("b1", false)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(upstream_work(&up).0, before.0 + 3, "three chats ran");
    // No label: any bot.
    let r = post(&gw, &lamp, "/v3/chat", chat_body("b2", true)).await;
    assert_eq!(r.status(), 200);
    assert_complete_chat_stream(&r.text().await.unwrap());
    // Workflows: bot_id optional, checked when given.
    let wf = "/v1/workflow/run";
    let r = post(
        &gw,
        &toy,
        wf,
        json!({"workflow_id": "w1"}).to_string().into_bytes(),
    )
    .await;
    assert_ne!(r.status(), 403);
    let body = json!({"workflow_id": "w1", "bot_id": "b2"})
        .to_string()
        .into_bytes();
    assert_forbidden(post(&gw, &toy, wf, body).await).await;
    assert_eq!(forbidden_count(&gw.metrics().await), 8);
}

/// The voice chat names its bot in the query: checked at admission, before the upstream
/// handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_websocket_chat_bot_is_checked_at_admission() {
    let (up, gw) = start(TOY_POLICY).await;
    let toy = device(&gw, "toy-3", json!({"product": "toy"})).await;
    let lamp = device(&gw, "lamp-3", json!({"product": "lamp"})).await;
    for q in [
        "/v1/chat?bot_id=b2",
        "/v1/chat",
        "/v1/chat?bot_id=b1&bot_id=b2",
        "/v1/audio/transcriptions",
    ] {
        match connect(&gw, &toy, q).await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status(), 403, "{q}");
                let body: Value = serde_json::from_slice(resp.body().as_ref().unwrap()).unwrap();
                assert_eq!(body["code"], 4101, "{q}: {body}");
            }
            other => panic!("{q}: expected 403, got {other:?}"),
        }
    }
    assert_eq!(up.state.counters.ws_sessions.load(Ordering::Relaxed), 0);
    for (token, q) in [
        (&toy, "/v1/chat?bot_id=b1"),
        (&toy, "/v1/chat?bot_id=%62%31"),
        (&lamp, "/v1/chat?bot_id=b2"),
    ] {
        let mut ws = connect(&gw, token, q)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        ws.close(None).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            up.state.counters.ws_sessions.load(Ordering::Relaxed) == 3
        })
        .await
    );
}

const LIMITATIONS: &str = "/v1/commerce/benefit/limitations";

async fn usage(gw: &GatewayProcess, device: &str) -> (u64, u64) {
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
    let item = &v["data"]["items"][0];
    (
        item["used"].as_u64().unwrap(),
        item["reserved"].as_u64().unwrap(),
    )
}

/// Refusals charge nothing and leave no hold: with a one-request quota, refused requests (at
/// admission and at body time, after admission took its hold) leave the request for the
/// allowed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_refusals_charge_no_quota() {
    let (_up, gw) = start(TOY_POLICY).await;
    let toy = device(&gw, "toy-4", json!({"product": "toy"})).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rule = json!({
        "entity_type": "single_device", "entity_id": "toy-4",
        "benefit_info": {"benefit_type": "requests", "active_mode": "absolute_time",
            "started_at": now - 10, "ended_at": 253_402_300_799u64, "limit": 1,
            "status": "valid", "trigger_unit": "day", "trigger_time": 1}
    });
    let r = gw.admin(Method::POST, LIMITATIONS, Some(rule)).await;
    assert_eq!(r.status(), 200);
    for _ in 0..3 {
        assert_forbidden(post(&gw, &toy, "/v1/conversation/create", b"{}".to_vec()).await).await;
        assert_forbidden(post(&gw, &toy, "/v3/chat", chat_body("b2", true)).await).await;
        assert_forbidden(post(&gw, &toy, "/v3/chat", chat_body("b2", false)).await).await;
        assert!(connect(&gw, &toy, "/v1/chat?bot_id=b2").await.is_err());
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            usage(&gw, "toy-4").await == (0, 0)
        })
        .await,
        "nothing used or held: {:?}",
        usage(&gw, "toy-4").await
    );
    let r = post(&gw, &toy, "/v3/chat", chat_body("b1", true)).await;
    assert_eq!(r.status(), 200, "the one request is still there");
    assert_complete_chat_stream(&r.text().await.unwrap());
    assert!(
        eventually(Duration::from_secs(5), || async {
            usage(&gw, "toy-4").await == (1, 0)
        })
        .await
    );
}

/// A reload (`POST /admin/v1/reload`) applies changed policies live; a label change on the
/// admin API applies to the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_reload_changes_the_answer() {
    let (_up, gw) = start(TOY_POLICY).await;
    let toy = device(&gw, "toy-5", json!({"product": "toy"})).await;
    let chat = |bot: &'static str| {
        let gw = &gw;
        let toy = &toy;
        async move {
            post(gw, toy, "/v3/chat", chat_body(bot, false))
                .await
                .status()
        }
    };
    assert_eq!(chat("b1").await, 200);
    assert_eq!(chat("b2").await, 403);
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        original.replace(r#"allow_bots = ["b1"]"#, r#"allow_bots = ["b2"]"#),
    )
    .unwrap();
    let r = gw.admin(Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert!(
        report["applied"]
            .as_array()
            .unwrap()
            .contains(&json!("access")),
        "{report}"
    );
    assert_eq!(chat("b1").await, 403, "b1 no longer allowed");
    assert_eq!(chat("b2").await, 200);
    // Default deny and no matching policy: everything refused, SIGHUP this time.
    std::fs::write(
        gw.config_path(),
        original
            .replace(r#"default = "allow""#, r#"default = "deny""#)
            .replace("product = \"toy\"", "product = \"robot\""),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(
        // b2 was allowed until this reload.
        eventually(Duration::from_secs(5), || async { chat("b2").await == 403 }).await,
        "default deny applied"
    );
    // Relabelled to match the policy again.
    let r = gw
        .admin(
            Method::PATCH,
            "/admin/v1/devices/toy-5",
            Some(json!({"labels": {"product": "robot"}})),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(chat("b1").await, 200, "the robot policy allows b1");
    assert_eq!(chat("b2").await, 403);
    // No [access] section: everything allowed again.
    std::fs::write(gw.config_path(), original.replace(TOY_POLICY, "")).unwrap();
    let r = gw.admin(Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(chat("b2").await, 200);
}
