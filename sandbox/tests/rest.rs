//! REST and SSE contract tests of the sandbox, over real HTTP.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures_util::StreamExt;
use reqwest::StatusCode;
use sandbox::{AppKey, SandboxConfig, SandboxHandle};
use serde_json::{Value, json};

const PAT: &str = "pat_sandbox";
const KID: &str = "kid_test";
const APP_ID: &str = "1100000001";

fn public_pem() -> String {
    include_str!("keys/test_only_rsa_public.pem").to_owned()
}

fn config() -> SandboxConfig {
    SandboxConfig {
        app_keys: vec![AppKey {
            app_id: APP_ID.into(),
            kid: KID.into(),
            public_key_pem: public_pem(),
        }],
        ..Default::default()
    }
}

async fn start(cfg: SandboxConfig) -> SandboxHandle {
    sandbox::start(cfg).await.expect("sandbox starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn sign(header: &Value, claims: &Value, key_der: &[u8]) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{h}.{c}");
    let kp = ring::signature::RsaKeyPair::from_pkcs8(key_der).expect("pkcs8");
    let mut sig = vec![0u8; kp.public().modulus_len()];
    kp.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

const KEY: &[u8] = include_bytes!("keys/test_only_rsa_private.pk8.der");
const OTHER_KEY: &[u8] = include_bytes!("keys/test_only_other_private.pk8.der");

fn good_header() -> Value {
    json!({"alg": "RS256", "typ": "JWT", "kid": KID})
}

fn good_claims(jti: &str) -> Value {
    let n = now();
    json!({"iss": APP_ID, "aud": "api.coze.cn", "iat": n, "exp": n + 3600, "jti": jti,
           "session_name": "user_42",
           "session_context": {"device_info": {"device_id": "SN123", "custom_consumer": "cc"}}})
}

async fn exchange(h: &SandboxHandle, jwt: &str, body: Value) -> (StatusCode, Value) {
    let r = client()
        .post(format!("{}/api/permission/oauth2/token", h.base_url()))
        .bearer_auth(jwt)
        .json(&body)
        .send()
        .await
        .expect("send");
    let s = r.status();
    (s, r.json().await.expect("json"))
}

fn grant() -> Value {
    json!({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "duration_seconds": 600})
}

#[tokio::test]
async fn oauth_jwt_exchange_success_and_attribution() {
    let h = start(config()).await;
    let jwt = sign(&good_header(), &good_claims("jti-ok-1"), KEY);
    let (s, v) = exchange(&h, &jwt, grant()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["access_token"].as_str().expect("token");
    assert!(token.starts_with("czs_"));
    assert_eq!(v["token_type"], "Bearer");
    let exp = v["expires_in"].as_u64().expect("expires_in");
    assert!(
        exp >= now() + 598 && exp <= now() + 601,
        "absolute expiry {exp}"
    );
    assert_eq!(h.state.token_exchanges(), 1);
    let minted = h.state.token_info(token).expect("recorded");
    assert_eq!(minted.session_name.as_deref(), Some("user_42"));
    assert_eq!(minted.device_id.as_deref(), Some("SN123"));
    assert_eq!(minted.custom_consumer.as_deref(), Some("cc"));

    // The token works on the API.
    let r = client()
        .get(format!("{}/v1/audio/voices", h.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);

    // Clamping and the account variant.
    let jwt = sign(&good_header(), &good_claims("jti-ok-2"), KEY);
    let r = client()
        .post(format!("{}/api/permission/oauth2/account/123/token", h.base_url()))
        .bearer_auth(jwt)
        .json(&json!({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "duration_seconds": 10_000_000}))
        .send()
        .await
        .expect("send");
    let v: Value = r.json().await.expect("json");
    assert!(v["expires_in"].as_u64().expect("exp") <= now() + 86_399);

    // The server's own host:port is an accepted audience (what cozepy sends).
    let mut c = good_claims("jti-ok-3");
    c["aud"] = json!(h.addr.to_string());
    let (s, _) = exchange(
        &h,
        &sign(&good_header(), &c, KEY),
        json!({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    h.shutdown().await;
}

#[tokio::test]
async fn oauth_rejections() {
    let h = start(config()).await;
    let n = now();
    let none_jwt = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": KID}).to_string()),
        URL_SAFE_NO_PAD.encode(good_claims("j-none").to_string())
    );
    let hs_header = json!({"alg": "HS256", "typ": "JWT", "kid": KID});
    let hs_jwt = {
        // Signature content is irrelevant: the alg must be refused before any check.
        let h64 = URL_SAFE_NO_PAD.encode(hs_header.to_string());
        let c64 = URL_SAFE_NO_PAD.encode(good_claims("j-hs").to_string());
        format!("{h64}.{c64}.{}", URL_SAFE_NO_PAD.encode([1u8; 32]))
    };
    let mut cases: Vec<(&str, String)> = vec![
        (
            "unknown kid",
            sign(
                &json!({"alg": "RS256", "typ": "JWT", "kid": "nope"}),
                &good_claims("j1"),
                KEY,
            ),
        ),
        ("alg none", none_jwt),
        ("HS256", hs_jwt),
        (
            "bad signature",
            sign(&good_header(), &good_claims("j2"), OTHER_KEY),
        ),
        ("garbage", "not.a.jwt.at.all".into()),
    ];
    let mut c = good_claims("j3");
    c["iss"] = json!("999");
    cases.push(("wrong iss", sign(&good_header(), &c, KEY)));
    let mut c = good_claims("j4");
    c["aud"] = json!("evil.example.com");
    cases.push(("wrong aud", sign(&good_header(), &c, KEY)));
    let mut c = good_claims("j5");
    c["exp"] = json!(n - 1);
    c["iat"] = json!(n - 100);
    cases.push(("expired", sign(&good_header(), &c, KEY)));
    let mut c = good_claims("j6");
    c["iat"] = json!(n + 3600);
    c["exp"] = json!(n + 7200);
    cases.push(("iat in future", sign(&good_header(), &c, KEY)));
    for (name, jwt) in cases {
        let (s, v) = exchange(&h, &jwt, grant()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{name}: {v}");
        assert_eq!(v["error_code"], "invalid_client", "{name}");
        assert_eq!(v["error"], "invalid_client", "{name}");
        assert!(
            v["error_message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }

    // Replayed jti.
    let jwt = sign(&good_header(), &good_claims("j-replay"), KEY);
    assert_eq!(exchange(&h, &jwt, grant()).await.0, StatusCode::OK);
    let (s, v) = exchange(&h, &jwt, grant()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error_message"].as_str().unwrap_or("").contains("jti"));

    // Grant type problems.
    let jwt = sign(&good_header(), &good_claims("j-grant"), KEY);
    let (s, v) = exchange(&h, &jwt, json!({"grant_type": "password"})).await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unsupported_grant_type"))
    );
    let (s, v) = exchange(&h, &jwt, json!({})).await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );

    // Endpoint down.
    h.switches()
        .token_endpoint_down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (s, v) = exchange(&h, &jwt, grant()).await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("internal_error"))
    );
    assert_eq!(h.state.token_exchanges(), 1);
    h.shutdown().await;
}

async fn post(h: &SandboxHandle, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", h.base_url()))
        .bearer_auth(PAT)
        .json(&body)
        .send()
        .await
        .expect("send")
}

async fn get(h: &SandboxHandle, path: &str) -> Value {
    client()
        .get(format!("{}{path}", h.base_url()))
        .bearer_auth(PAT)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

/// Splits a chat v3 SSE body into (event, data) pairs, asserting the exact framing.
fn chat_frames(body: &str) -> Vec<(String, String)> {
    assert!(body.ends_with("\n\n"), "body ends with a blank line");
    body[..body.len() - 2]
        .split("\n\n")
        .map(|f| {
            let lines: Vec<&str> = f.split('\n').collect();
            assert_eq!(lines.len(), 2, "exactly event+data lines: {f:?}");
            let ev = lines[0].strip_prefix("event:").expect("event: first");
            let data = lines[1].strip_prefix("data:").expect("data: second");
            assert!(
                !ev.starts_with(' ') && !data.starts_with(' '),
                "no space after colon"
            );
            assert!(
                serde_json::from_str::<Value>(data).is_ok(),
                "data is JSON: {data}"
            );
            (ev.to_owned(), data.to_owned())
        })
        .collect()
}

fn chat_body(query: &str, stream: bool) -> Value {
    json!({"bot_id": "bot_1", "user_id": "u1", "stream": stream,
           "additional_messages": [{"role": "user", "content": query, "content_type": "text"}]})
}

#[tokio::test]
async fn chat_stream_frames_and_usage() {
    let h = start(config()).await;
    let r = post(&h, "/v3/chat", chat_body("what is the weather", true)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    assert!(r.headers().contains_key("x-tt-logid"));
    let body = r.text().await.expect("body");
    let frames = chat_frames(&body);
    let names: Vec<&str> = frames.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "conversation.chat.created",
            "conversation.chat.in_progress",
            "conversation.message.delta",
            "conversation.message.delta",
            "conversation.message.delta",
            "conversation.message.delta",
            "conversation.message.completed",
            "conversation.message.completed",
            "conversation.chat.completed",
            "done",
        ]
    );
    assert!(body.ends_with("event:done\ndata:\"[DONE]\"\n\n"));
    let deltas: String = frames
        .iter()
        .filter(|(e, _)| e == "conversation.message.delta")
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).expect("json")["content"]
                .as_str()
                .expect("c")
                .to_owned()
        })
        .collect();
    let answer: Value = serde_json::from_str(&frames[6].1).expect("json");
    assert_eq!(answer["content"].as_str(), Some(deltas.as_str()));
    assert_eq!(answer["type"], "answer");
    let verbose: Value = serde_json::from_str(&frames[7].1).expect("json");
    assert_eq!(verbose["type"], "verbose");
    assert!(
        verbose["content"]
            .as_str()
            .unwrap_or("")
            .contains("generate_answer_finish")
    );
    let done: Value = serde_json::from_str(&frames[8].1).expect("json");
    let out = (deltas.chars().count() as u64).div_ceil(4);
    let inp = ("what is the weather".len() as u64).div_ceil(4);
    assert_eq!(
        done["usage"],
        json!({"token_count": inp + out, "output_count": out, "input_count": inp})
    );
    assert_eq!(done["status"], "completed");
    let chat_id = done["id"].as_str().expect("id");
    assert_eq!(chat_id.len(), 19);

    // Deterministic: the same question gives the same answer.
    let body2 = post(&h, "/v3/chat", chat_body("what is the weather", true))
        .await
        .text()
        .await
        .expect("b");
    let answer2: Value = serde_json::from_str(&chat_frames(&body2)[6].1).expect("json");
    assert_eq!(answer2["content"], answer["content"]);

    // After the stream, the chat is retrievable as completed.
    let conv = done["conversation_id"].as_str().expect("conv");
    let v = get(
        &h,
        &format!("/v3/chat/retrieve?conversation_id={conv}&chat_id={chat_id}"),
    )
    .await;
    assert_eq!(v["data"]["status"], "completed");
    h.shutdown().await;
}

#[tokio::test]
async fn chat_json_lifecycle_and_validation() {
    let h = start(config()).await;
    let v: Value = post(&h, "/v3/chat", chat_body("hello", false))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["code"], 0);
    assert_eq!(v["data"]["status"], "in_progress");
    let (conv, id) = (
        v["data"]["conversation_id"].as_str().expect("c"),
        v["data"]["id"].as_str().expect("i"),
    );
    // cozepy retrieves with POST.
    let r: Value = post(
        &h,
        &format!("/v3/chat/retrieve?conversation_id={conv}&chat_id={id}"),
        json!({}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(r["data"]["status"], "completed");
    assert!(r["data"]["usage"]["token_count"].as_u64().expect("usage") > 0);
    let m = get(
        &h,
        &format!("/v3/chat/message/list?conversation_id={conv}&chat_id={id}"),
    )
    .await;
    let msgs = m["data"].as_array().expect("list");
    assert_eq!(msgs[0]["type"], "answer");
    assert_eq!(msgs[1]["type"], "verbose");
    // Conversation history holds the question and the answer.
    let hist: Value = post(
        &h,
        &format!("/v1/conversation/message/list?conversation_id={conv}"),
        json!({"order": "asc"}),
    )
    .await
    .json()
    .await
    .expect("json");
    let kinds: Vec<&str> = hist["data"]
        .as_array()
        .expect("d")
        .iter()
        .map(|m| m["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["question", "answer", "verbose"]);
    // Cancel a completed chat → 4104.
    let c: Value = post(
        &h,
        "/v3/chat/cancel",
        json!({"conversation_id": conv, "chat_id": id}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(c["code"], 4104);

    // Validation.
    let e: Value = post(&h, "/v3/chat", json!({"user_id": "u"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(e["code"], 4000);
    let e: Value = post(&h, "/v3/chat", json!({"bot_id": "b"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(e["code"], 4000);
    let e: Value = post(
        &h,
        "/v3/chat",
        json!({"bot_id": "b", "user_id": "u", "stream": false, "auto_save_history": false}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(e["code"], 4007);

    // Auth.
    let r = client()
        .post(format!("{}/v3/chat", h.base_url()))
        .json(&chat_body("x", true))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.expect("json")["code"], 4100);
    let r = client()
        .post(format!("{}/v3/chat", h.base_url()))
        .bearer_auth("czs_forged")
        .json(&chat_body("x", true))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    h.shutdown().await;
}

#[tokio::test]
async fn second_running_chat_in_conversation_is_4016() {
    let h = start(SandboxConfig {
        sse_event_delay: Duration::from_millis(150),
        ..config()
    })
    .await;
    let conv: Value = post(&h, "/v1/conversation/create", json!({"bot_id": "bot_1"}))
        .await
        .json()
        .await
        .expect("json");
    let conv = conv["data"]["id"].as_str().expect("id").to_owned();
    let r = post(
        &h,
        &format!("/v3/chat?conversation_id={conv}"),
        chat_body("one", true),
    )
    .await;
    let mut s = r.bytes_stream();
    let _first = s.next().await.expect("first event");
    let e: Value = post(
        &h,
        &format!("/v3/chat?conversation_id={conv}"),
        chat_body("two", true),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(e["code"], 4016);
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The aborted stream released the conversation.
    let r = post(
        &h,
        &format!("/v3/chat?conversation_id={conv}"),
        chat_body("three", false),
    )
    .await;
    assert_eq!(r.json::<Value>().await.expect("json")["code"], 0);
    h.shutdown().await;
}

#[tokio::test]
async fn tools_and_audio_streams() {
    let h = start(config()).await;
    let mut b = chat_body("weather in Paris", true);
    b["bot_id"] = json!("bot_tools");
    let body = post(&h, "/v3/chat", b).await.text().await.expect("body");
    let frames = chat_frames(&body);
    let (last_ev, last) = &frames[frames.len() - 2];
    assert_eq!(last_ev, "conversation.chat.requires_action");
    let chat: Value = serde_json::from_str(last).expect("json");
    let call = &chat["required_action"]["submit_tool_outputs"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    let (conv, id) = (
        chat["conversation_id"].as_str().expect("c"),
        chat["id"].as_str().expect("i"),
    );
    let body = post(
        &h,
        &format!("/v3/chat/submit_tool_outputs?conversation_id={conv}&chat_id={id}"),
        json!({"stream": true, "tool_outputs": [{"tool_call_id": call["id"], "output": "sunny 21C"}]}),
    )
    .await
    .text()
    .await
    .expect("body");
    let frames = chat_frames(&body);
    let done: Value = serde_json::from_str(&frames[frames.len() - 2].1).expect("json");
    assert_eq!(done["status"], "completed");
    assert_eq!(done["id"].as_str(), Some(id));

    // Audio input → audio deltas of 24 kHz PCM.
    let content = json!([{"type": "text", "text": "say hi"}, {"type": "audio", "file_url": "https://x/a.wav"}]).to_string();
    let b = json!({"bot_id": "bot_1", "user_id": "u", "stream": true,
                   "additional_messages": [{"role": "user", "content": content, "content_type": "object_string"}]});
    let body = post(&h, "/v3/chat", b).await.text().await.expect("body");
    let frames = chat_frames(&body);
    let audio: Vec<Vec<u8>> = frames
        .iter()
        .filter(|(e, _)| e == "conversation.audio.delta")
        .map(|(_, d)| {
            let m: Value = serde_json::from_str(d).expect("json");
            assert_eq!(m["content_type"], "audio");
            STANDARD
                .decode(m["content"].as_str().expect("c"))
                .expect("b64")
        })
        .collect();
    assert_eq!(audio.len(), 4);
    let answer: Value = serde_json::from_str(
        &frames
            .iter()
            .find(|(e, _)| e == "conversation.message.completed")
            .expect("completed")
            .1,
    )
    .expect("json");
    let ms = sandbox::audio::speech_duration_ms(answer["content"].as_str().expect("c"), 1.0);
    assert_eq!(audio.iter().map(Vec::len).sum::<usize>() as u64, ms * 48);
    h.shutdown().await;
}

#[tokio::test]
async fn workflows_run_stream_and_chat() {
    let h = start(config()).await;
    let v: Value = post(
        &h,
        "/v1/workflow/run",
        json!({"workflow_id": "wf1", "parameters": {"city": "Paris"}}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["code"], 0);
    let data: Value =
        serde_json::from_str(v["data"].as_str().expect("data is a string")).expect("json");
    assert!(data["output"].is_string());
    assert!(
        v["debug_url"]
            .as_str()
            .expect("debug")
            .contains(v["execute_id"].as_str().expect("exec"))
    );
    assert!(v["usage"]["token_count"].as_u64().expect("usage") > 0);

    let body = post(&h, "/v1/workflow/stream_run", json!({"workflow_id": "wf1"}))
        .await
        .text()
        .await
        .expect("b");
    let frames: Vec<&str> = body.trim_end_matches("\n\n").split("\n\n").collect();
    for (i, f) in frames.iter().enumerate() {
        let lines: Vec<&str> = f.split('\n').collect();
        assert_eq!(lines.len(), 3, "{f:?}");
        assert_eq!(lines[0], format!("id: {i}"));
        assert!(lines[1].starts_with("event: ") && lines[2].starts_with("data: "));
    }
    assert!(frames[frames.len() - 1].starts_with(&format!(
        "id: {}\nevent: Done\ndata: {{\"debug_url\":",
        frames.len() - 1
    )));
    assert!(frames[frames.len() - 2].contains("\"usage\""));

    let body = post(
        &h,
        "/v1/workflow/stream_run",
        json!({"workflow_id": "wf_interrupt"}),
    )
    .await
    .text()
    .await
    .expect("b");
    assert!(body.contains("event: Interrupt\ndata: {\"interrupt_data\":{\"event_id\":"));
    let body = post(
        &h,
        "/v1/workflow/stream_resume",
        json!({"workflow_id": "wf_interrupt", "event_id": "1/interrupt", "interrupt_type": 2, "resume_data": "Paris"}),
    )
    .await
    .text()
    .await
    .expect("b");
    assert!(body.contains("event: Message") && !body.contains("Interrupt"));

    let body = post(
        &h,
        "/v1/workflows/chat",
        json!({"workflow_id": "wf1", "additional_messages": [{"role": "user", "content": "hi", "content_type": "text"}], "parameters": {}}),
    )
    .await
    .text()
    .await
    .expect("b");
    let frames = chat_frames(&body);
    let (ev, data) = frames.last().expect("last");
    assert_eq!(ev, "done");
    assert!(data.starts_with("{\"debug_url\":"));
    h.shutdown().await;
}

#[tokio::test]
async fn slow_workflow_streams_ping() {
    let h = start(SandboxConfig {
        sse_event_delay: Duration::from_millis(200),
        ..config()
    })
    .await;
    let body = post(&h, "/v1/workflow/stream_run", json!({"workflow_id": "wf1"}))
        .await
        .text()
        .await
        .expect("b");
    assert!(body.starts_with("id: 0\nevent: PING\ndata: {}\n\nid: 1\nevent: Message\n"));
    h.shutdown().await;
}

#[tokio::test]
async fn failing_chats_stream_json_and_knob() {
    let h = start(config()).await;
    let query = "please fail";
    let mut b = chat_body(query, true);
    b["bot_id"] = json!("bot_fail");
    let body = post(&h, "/v3/chat", b).await.text().await.expect("body");
    let frames = chat_frames(&body);
    let names: Vec<&str> = frames.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "conversation.chat.created",
            "conversation.chat.in_progress",
            "conversation.message.delta",
            "conversation.message.delta",
            "conversation.chat.failed",
            "done",
        ]
    );
    assert!(body.ends_with("event:done\ndata:\"[DONE]\"\n\n"));
    let partial: String = frames[2..4]
        .iter()
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).expect("json")["content"]
                .as_str()
                .expect("c")
                .to_owned()
        })
        .collect();
    let failed: Value = serde_json::from_str(&frames[4].1).expect("json");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["last_error"]["code"], 5000);
    assert!(
        !failed["last_error"]["msg"]
            .as_str()
            .expect("msg")
            .is_empty()
    );
    assert!(failed["failed_at"].as_u64().expect("failed_at") > 0);
    let inp = (query.len() as u64).div_ceil(4);
    let out = (partial.chars().count() as u64).div_ceil(4);
    assert!(out > 0);
    assert_eq!(
        failed["usage"],
        json!({"token_count": inp + out, "output_count": out, "input_count": inp})
    );
    let (conv, id) = (
        failed["conversation_id"].as_str().expect("c"),
        failed["id"].as_str().expect("i"),
    );
    let v = get(
        &h,
        &format!("/v3/chat/retrieve?conversation_id={conv}&chat_id={id}"),
    )
    .await;
    assert_eq!(v["data"]["status"], "failed");
    assert_eq!(v["data"]["last_error"], failed["last_error"]);
    assert!(v["data"]["failed_at"].as_u64().is_some());
    assert_eq!(v["data"]["usage"], failed["usage"]);
    let v = get(
        &h,
        &format!("/v3/chat/message/list?conversation_id={conv}&chat_id={id}"),
    )
    .await;
    assert_eq!(v["data"], json!([]));
    // A failed chat is terminal: cancel answers 4104.
    let r = post(
        &h,
        "/v3/chat/cancel",
        json!({"conversation_id": conv, "chat_id": id}),
    )
    .await;
    assert_eq!(r.json::<Value>().await.expect("json")["code"], 4104);

    // Non-stream with the `fail` knob: in_progress, then retrieved as failed.
    let r = client()
        .post(format!("{}/v3/chat", h.base_url()))
        .bearer_auth(PAT)
        .header("X-Sandbox-Fault", "fail")
        .json(&chat_body(query, false))
        .send()
        .await
        .expect("send");
    let chat = r.json::<Value>().await.expect("json")["data"].clone();
    assert_eq!(chat["status"], "in_progress");
    let (conv, id) = (
        chat["conversation_id"].as_str().expect("c"),
        chat["id"].as_str().expect("i"),
    );
    let v = get(
        &h,
        &format!("/v3/chat/retrieve?conversation_id={conv}&chat_id={id}"),
    )
    .await;
    assert_eq!(v["data"]["status"], "failed");
    assert_eq!(v["data"]["last_error"]["code"], 5000);
    assert!(v["data"]["failed_at"].as_u64().is_some());
    assert_eq!(v["data"]["usage"], failed["usage"]);

    // fail + no_usage: no usage-bearing event at all.
    let body = client()
        .post(format!("{}/v3/chat", h.base_url()))
        .bearer_auth(PAT)
        .header("X-Sandbox-Fault", "fail,no_usage")
        .json(&chat_body(query, true))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("b");
    assert!(!body.contains("conversation.chat.failed"));
    assert!(!body.contains("conversation.chat.completed"));
    assert!(body.ends_with("event:done\ndata:\"[DONE]\"\n\n"));

    // Tools, then the continuation fails under the knob (query form).
    let mut b = chat_body("weather?", true);
    b["bot_id"] = json!("bot_tools");
    let body = post(&h, "/v3/chat", b).await.text().await.expect("body");
    let frames = chat_frames(&body);
    let chat: Value = serde_json::from_str(&frames[frames.len() - 2].1).expect("json");
    assert_eq!(chat["status"], "requires_action");
    let call = &chat["required_action"]["submit_tool_outputs"]["tool_calls"][0];
    let (conv, id) = (
        chat["conversation_id"].as_str().expect("c"),
        chat["id"].as_str().expect("i"),
    );
    let body = post(
        &h,
        &format!(
            "/v3/chat/submit_tool_outputs?conversation_id={conv}&chat_id={id}&sandbox_fault=fail"
        ),
        json!({"stream": true, "tool_outputs": [{"tool_call_id": call["id"], "output": "sunny"}]}),
    )
    .await
    .text()
    .await
    .expect("body");
    let frames = chat_frames(&body);
    assert_eq!(frames[frames.len() - 2].0, "conversation.chat.failed");
    let failed: Value = serde_json::from_str(&frames[frames.len() - 2].1).expect("json");
    assert_eq!(failed["id"].as_str(), Some(id));
    assert_eq!(failed["status"], "failed");
    h.shutdown().await;
}

#[tokio::test]
async fn fault_knobs() {
    let h = start(config()).await;
    let url = format!("{}/v3/chat", h.base_url());
    let with_fault = |f: &str| {
        client()
            .post(&url)
            .bearer_auth(PAT)
            .header("X-Sandbox-Fault", f)
            .json(&chat_body("hi", true))
    };
    let r = with_fault("rate_limit").send().await.expect("send");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.json::<Value>().await.expect("json")["code"], 4013);

    let r = with_fault("status=503").send().await.expect("send");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.json::<Value>().await.expect("json")["code"], 5000);

    // Query-string form.
    let r = client()
        .post(format!("{url}?sandbox_fault=status%3D502"))
        .bearer_auth(PAT)
        .json(&chat_body("hi", true))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);

    let t0 = std::time::Instant::now();
    let r = with_fault("latency_ms=150").send().await.expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(t0.elapsed() >= Duration::from_millis(150));
    let _ = r.text().await;

    // Reset mid-stream: two events arrive, then the body fails.
    let r = with_fault("reset_after=2").send().await.expect("send");
    let mut s = r.bytes_stream();
    let mut got = Vec::new();
    let mut failed = false;
    while let Some(item) = s.next().await {
        match item {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "reset surfaces as a body error");
    assert_eq!(String::from_utf8_lossy(&got).matches("\n\n").count(), 2);

    // Stall: two events, then silence with the connection open.
    let r = with_fault("stall_after=2").send().await.expect("send");
    let mut s = r.bytes_stream();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), s.next()).await {
            Ok(Some(Ok(b))) => got.extend_from_slice(&b),
            Ok(other) => panic!("stream ended: {:?}", other.map(|r| r.is_ok())),
            Err(_) => break,
        }
    }
    assert_eq!(String::from_utf8_lossy(&got).matches("\n\n").count(), 2);
    drop(s);

    // Malformed event injected, then the stream continues.
    let body = with_fault("malformed_after=1")
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("b");
    assert!(body.contains("data:{\"id\":\n\n"));
    assert!(body.ends_with("event:done\ndata:\"[DONE]\"\n\n"));

    // no_usage: no conversation.chat.completed.
    let body = with_fault("no_usage")
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("b");
    assert!(!body.contains("conversation.chat.completed"));
    assert!(body.ends_with("event:done\ndata:\"[DONE]\"\n\n"));
    h.shutdown().await;
}

#[tokio::test]
async fn limitations_crud_pagination_and_outage() {
    let h = start(SandboxConfig {
        plan_qps: 123,
        ..config()
    })
    .await;
    let path = "/v1/commerce/benefit/limitations";
    for i in 0..45 {
        let v: Value = post(
            &h,
            path,
            json!({"entity_type": "single_device", "entity_id": format!("SN{i}"),
                   "benefit_info": {"benefit_type": "resource_point", "active_mode": "absolute_time",
                                    "started_at": 1, "ended_at": 253402300799_i64, "limit": 100,
                                    "trigger_unit": "day", "trigger_time": 1}}),
        )
        .await
        .json()
        .await
        .expect("json");
        assert_eq!(v["code"], 0, "{v}");
        assert!(v["data"]["benefit_info"]["benefit_id"].is_string());
    }
    let mut token = String::new();
    let mut seen = 0;
    let mut pages = 0;
    loop {
        let v = get(&h, &format!("{path}?entity_type=single_device&benefit_type=resource_point&page_size=20&page_token={token}")).await;
        let d = &v["data"];
        seen += d["benefit_infos"].as_array().expect("infos").len();
        pages += 1;
        if !d["has_more"].as_bool().expect("has_more") {
            assert_eq!(d["page_token"], "");
            break;
        }
        token = d["page_token"].as_str().expect("token").to_owned();
    }
    assert_eq!((seen, pages), (45, 3));
    let v = get(
        &h,
        &format!("{path}?entity_type=single_device&entity_id=SN7"),
    )
    .await;
    let infos = v["data"]["benefit_infos"].as_array().expect("infos");
    assert_eq!(infos.len(), 1);
    let id = infos[0]["benefit_id"].as_str().expect("id").to_owned();

    // Update: freeze it; the default listing (status=valid) no longer shows it.
    let r = client()
        .put(format!("{}{path}/{id}", h.base_url()))
        .bearer_auth(PAT)
        .json(&json!({"status": "frozen", "limit": 5}))
        .send()
        .await
        .expect("send");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["data"]["benefit_info"]["status"], "frozen");
    assert_eq!(v["data"]["benefit_info"]["limit"], 5);
    let v = get(
        &h,
        &format!("{path}?entity_type=single_device&entity_id=SN7"),
    )
    .await;
    assert_eq!(
        v["data"]["benefit_infos"].as_array().expect("infos").len(),
        0
    );
    let v = get(
        &h,
        &format!("{path}?entity_type=single_device&entity_id=SN7&status=frozen"),
    )
    .await;
    assert_eq!(
        v["data"]["benefit_infos"].as_array().expect("infos").len(),
        1
    );

    // Validation.
    let bad = [
        json!({"entity_type": "planet", "benefit_info": {"benefit_type": "resource_point", "limit": 1}}),
        json!({"entity_type": "single_device", "benefit_info": {"benefit_type": "resource_point", "limit": 1}}),
        json!({"entity_type": "enterprise_all_devices", "benefit_info": {"benefit_type": "gold", "limit": 1}}),
        json!({"entity_type": "enterprise_all_devices", "benefit_info": {"benefit_type": "resource_point", "limit": -1}}),
        json!({"entity_type": "enterprise_all_devices", "benefit_info": {"benefit_type": "resource_point", "limit": 1, "active_mode": "relative"}}),
        json!({"entity_type": "enterprise_all_devices", "benefit_info": {"benefit_type": "resource_point", "limit": 1, "trigger_unit": "week"}}),
    ];
    for b in bad {
        let v: Value = post(&h, path, b.clone()).await.json().await.expect("json");
        assert_eq!(v["code"], 4000, "{b}");
    }
    let all = |unit: &str| {
        json!({"entity_type": "enterprise_all_identifiers",
                                   "benefit_info": {"benefit_type": "resource_point", "limit": 1, "trigger_unit": unit}})
    };
    assert_eq!(
        post(&h, path, all("never"))
            .await
            .json::<Value>()
            .await
            .expect("j")["code"],
        0
    );
    assert_eq!(
        post(&h, path, all("day"))
            .await
            .json::<Value>()
            .await
            .expect("j")["code"],
        0
    );
    let v: Value = post(&h, path, all("hour"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["code"], 4000);
    assert!(v["msg"].as_str().unwrap_or("").contains("periodic"));
    let v = get(
        &h,
        &format!("{path}?entity_type=enterprise_all_custom_consumers"),
    )
    .await;
    assert_eq!(
        v["data"]["benefit_infos"].as_array().expect("infos").len(),
        2
    );
    let v = get(&h, &format!("{path}?page_size=201")).await;
    assert_eq!(v["code"], 4000);

    // Plan benefits.
    let v = get(
        &h,
        "/v1/commerce/benefit/benefits/get?benefit_type_list=api_run_qps&resource_id=chat",
    )
    .await;
    assert_eq!(
        v["data"]["benefit_info"][0]["effective"]["item_info"]["total"],
        123
    );
    assert_eq!(v["data"]["benefit_info"][0]["resource_id"], "chat");

    // Outage switch.
    h.switches()
        .limitations_down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let r = client()
        .get(format!("{}{path}", h.base_url()))
        .bearer_auth(PAT)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json::<Value>().await.expect("json")["code"], 5000);
    h.shutdown().await;
}

#[tokio::test]
async fn conversations_messages_and_files() {
    let h = start(config()).await;
    let c: Value = post(
        &h,
        "/v1/conversation/create",
        json!({"bot_id": "b1", "name": "n", "meta_data": {"k": "v"},
        "messages": [{"role": "user", "content": "m0", "content_type": "text"}]}),
    )
    .await
    .json()
    .await
    .expect("json");
    let id = c["data"]["id"].as_str().expect("id").to_owned();
    assert_eq!(c["data"]["meta_data"]["k"], "v");
    for i in 1..4 {
        let m: Value = post(
            &h,
            &format!("/v1/conversation/message/create?conversation_id={id}"),
            json!({"role": "user", "content": format!("m{i}"), "content_type": "text"}),
        )
        .await
        .json()
        .await
        .expect("json");
        assert_eq!(m["data"]["content"], format!("m{i}"));
    }
    // Cursor pagination: desc, 2 per page.
    let p1: Value = post(
        &h,
        &format!("/v1/conversation/message/list?conversation_id={id}"),
        json!({"limit": 2}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(p1["has_more"], true);
    let contents = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .expect("d")
            .iter()
            .map(|m| m["content"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(contents(&p1), ["m3", "m2"]);
    let p2: Value = post(
        &h,
        &format!("/v1/conversation/message/list?conversation_id={id}"),
        json!({"limit": 2, "after_id": p1["last_id"]}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(contents(&p2), ["m1", "m0"]);
    assert_eq!(p2["has_more"], false);

    let mid = p1["first_id"].as_str().expect("first").to_owned();
    let m: Value = post(
        &h,
        &format!("/v1/conversation/message/modify?conversation_id={id}&message_id={mid}"),
        json!({"content": "edited"}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(m["message"]["content"], "edited");
    let m = get(
        &h,
        &format!("/v1/conversation/message/retrieve?conversation_id={id}&message_id={mid}"),
    )
    .await;
    assert_eq!(m["data"]["content"], "edited");
    let m: Value = post(
        &h,
        &format!("/v1/conversation/message/delete?conversation_id={id}&message_id={mid}"),
        json!({}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(m["data"]["id"], mid.as_str());

    let l = get(&h, "/v1/conversations?bot_id=b1&page_num=1&page_size=10").await;
    assert_eq!(l["data"]["conversations"][0]["id"], id.as_str());
    assert_eq!(l["data"]["has_more"], false);
    let u: Value = client()
        .put(format!("{}/v1/conversations/{id}", h.base_url()))
        .bearer_auth(PAT)
        .json(&json!({"name": "renamed"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(u["data"]["name"], "renamed");
    let s: Value = post(&h, &format!("/v1/conversations/{id}/clear"), json!({}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(s["data"]["conversation_id"], id.as_str());
    let d: Value = client()
        .delete(format!("{}/v1/conversations/{id}", h.base_url()))
        .bearer_auth(PAT)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(d["code"], 0);
    let r = get(
        &h,
        &format!("/v1/conversation/retrieve?conversation_id={id}"),
    )
    .await;
    assert_ne!(r["code"], 0);

    // Files.
    let upload = |form: reqwest::multipart::Form| {
        client()
            .post(format!("{}/v1/files/upload", h.base_url()))
            .bearer_auth(PAT)
            .multipart(form)
            .send()
    };
    let part = || reqwest::multipart::Part::bytes(vec![1u8; 10]).file_name("a.bin");
    let v: Value = upload(reqwest::multipart::Form::new().part("file", part()))
        .await
        .expect("s")
        .json()
        .await
        .expect("j");
    assert_eq!(v["data"]["bytes"], 10);
    assert_eq!(v["data"]["file_name"], "a.bin");
    let fid = v["data"]["id"].as_str().expect("id").to_owned();
    assert_eq!(
        get(&h, &format!("/v1/files/retrieve?file_id={fid}")).await["data"]["id"],
        fid.as_str()
    );
    let v: Value = upload(reqwest::multipart::Form::new().text("other", "x"))
        .await
        .expect("s")
        .json()
        .await
        .expect("j");
    assert_eq!(v["code"], 4300);
    let v: Value = upload(
        reqwest::multipart::Form::new()
            .part("file", part())
            .part("file", part()),
    )
    .await
    .expect("s")
    .json()
    .await
    .expect("j");
    assert_eq!(v["code"], 4301);
    h.shutdown().await;
}

#[tokio::test]
async fn audio_rest() {
    let h = start(config()).await;
    let r = post(&h, "/v1/audio/speech", json!({"input": "hello world", "voice_id": "v", "response_format": "wav", "sample_rate": 16000})).await;
    assert_eq!(r.headers()["content-type"], "audio/wav");
    let wav = r.bytes().await.expect("bytes");
    let ms = sandbox::audio::speech_duration_ms("hello world", 1.0);
    assert_eq!(wav.len() as u64, 44 + ms * 32);
    assert_eq!(sandbox::audio::wav_duration_ms(&wav), Some(ms as f64));

    let r = post(
        &h,
        "/v1/audio/speech",
        json!({"input": "hello world", "voice_id": "v", "response_format": "pcm", "speed": 2.0}),
    )
    .await;
    assert_eq!(r.headers()["content-type"], "audio/pcm");
    assert_eq!(
        r.bytes().await.expect("b").len() as u64,
        sandbox::audio::speech_duration_ms("hello world", 2.0) * 48
    );

    let v: Value = post(
        &h,
        "/v1/audio/speech",
        json!({"input": "x", "voice_id": "v"}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["code"], 4000, "mp3 default is unsupported");
    let v: Value = post(
        &h,
        "/v1/audio/speech",
        json!({"input": "x".repeat(1025), "voice_id": "v", "response_format": "wav"}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["code"], 4000);

    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(wav.to_vec()).file_name("a.wav"),
    );
    let v: Value = client()
        .post(format!("{}/v1/audio/transcriptions", h.base_url()))
        .bearer_auth(PAT)
        .multipart(form)
        .send()
        .await
        .expect("s")
        .json()
        .await
        .expect("j");
    assert_eq!(
        v["data"]["text"],
        format!("sandbox transcript of {:.2} s", ms as f64 / 1000.0)
    );

    let v = get(&h, "/v1/audio/voices?page_num=1&page_size=2").await;
    assert_eq!(v["data"]["voice_list"].as_array().expect("l").len(), 2);
    assert_eq!(v["data"]["has_more"], true);
    let v: Value = post(&h, "/v1/audio/rooms", json!({"bot_id": "b", "uid": "u1"}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["data"]["uid"], "u1");
    assert!(v["data"]["room_id"].is_string() && v["data"]["token"].is_string());
    h.shutdown().await;
}
