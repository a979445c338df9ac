//! REST through the gateway: admission, attribution, envelopes, limits, upstream failures.

use gateway_tests::*;
use serde_json::{Value, json};

async fn setup() -> (SandboxHandle, GatewayProcess) {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    (up, gw)
}

async fn assert_envelope(r: reqwest::Response, status: u16, code: i64) -> Value {
    assert_eq!(r.status().as_u16(), status);
    assert!(
        r.headers().get("x-tt-logid").is_some(),
        "X-Tt-Logid on every response"
    );
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], code, "{v}");
    assert!(v["detail"]["logid"].is_string(), "{v}");
    v
}

/// A device's REST call reaches the upstream with the vendor's credentials and the device's
/// attribution (replacing any the device sent), and the answer comes back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_round_trip_is_attributed_to_the_device() {
    let (up, gw) = setup().await;
    let token = gw.register_device("speaker-001").await;
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(&token)
        // A device cannot attribute its call to another device.
        .header("x-coze-deviceinfo", r#"{"device_id":"someone-else"}"#)
        .json(&json!({"bot_id": "b1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tt-logid").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 0, "{v}");
    assert!(v["data"]["id"].is_string());
    let info = up
        .state
        .last_device_info
        .lock()
        .unwrap()
        .clone()
        .expect("X-Coze-DeviceInfo sent");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["device_id"], "speaker-001");
    // The device's token never reaches upstream: the sandbox only accepts its PAT. Neither the
    // device token nor the upstream PAT appears in the logs.
    assert!(!gw.log().contains(&token), "device token leaked into logs");
    assert!(!gw.log().contains(PAT), "upstream PAT leaked into logs");
}

/// No token, a garbage token, a token signed by another key, or a token for an unknown
/// device: 401 with code 4100 in Coze's envelope, before anything goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_tokens_get_401_in_the_envelope() {
    let (up, gw) = setup().await;
    let good = gw.register_device("dev-a").await;
    let before = up
        .state
        .counters
        .api_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let url = format!("{}/v3/chat/retrieve?conversation_id=1&chat_id=2", gw.device);
    assert_envelope(gw.http.get(&url).send().await.unwrap(), 401, 4100).await;
    for bad in ["nope", "a.b.c", &good[..good.len() - 2], "pat_sandbox"] {
        let r = gw.http.get(&url).bearer_auth(bad).send().await.unwrap();
        let v = assert_envelope(r, 401, 4100).await;
        assert!(!v.to_string().contains(bad), "token echoed in error body");
    }
    let other = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    // Same key material in the harness, so use an unregistered device instead.
    let stranger = other.register_device("dev-not-on-gw1").await;
    assert_envelope(
        gw.http
            .get(&url)
            .bearer_auth(&stranger)
            .send()
            .await
            .unwrap(),
        401,
        4100,
    )
    .await;
    let after = up
        .state
        .counters
        .api_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(before, after, "denied requests must not reach upstream");
}

/// Bodies over the route limit get 413 / 4000, whether announced by Content-Length or sent
/// chunked; unknown and ambiguous paths are refused; admin routes do not exist here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_allow_list_and_listener_separation() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = "[routes]\nbody_limit_bytes = 1024\n".into();
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("dev-b").await;
    let big = "x".repeat(4096);
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(&token)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_envelope(r, 413, 4000).await;
    let stream = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 512]))),
    );
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "chunked body over the limit");
    let r = gw
        .http
        .get(format!("{}/v1/not/a/coze/path", gw.device))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_envelope(r, 404, 4200).await;
    let r = gw
        .http
        .get(format!("{}/admin/v1/devices/dev-b", gw.device))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_envelope(r, 404, 4200).await;
    let r = gw
        .http
        .get(format!("{}/v3/chat/../../admin", gw.device))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    // Admin API: token required and compared exactly.
    let r = gw
        .http
        .post(format!("{}/admin/v1/devices", gw.admin))
        .json(&json!({"device_id": "x"}))
        .send()
        .await
        .unwrap();
    assert_envelope(r, 401, 4100).await;
    let r = gw
        .http
        .post(format!("{}/admin/v1/devices", gw.admin))
        .bearer_auth(format!("{ADMIN_TOKEN}x"))
        .json(&json!({"device_id": "x"}))
        .send()
        .await
        .unwrap();
    assert_envelope(r, 401, 4100).await;
    let r = gw
        .admin_post("/admin/v1/devices", json!({"device_id": "bad/id"}))
        .await;
    assert_envelope(r, 400, 4000).await;
    let r = gw
        .admin_post(
            "/admin/v1/devices",
            json!({"devices": [{"device_id": "m1"}, {"device_id": "m2"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["created"], 2);
}

/// An unreachable upstream gives 502 / 5000 promptly, not a hang; health and metrics work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gets_502_and_metrics_count_it() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let gw = GatewayProcess::start(&GatewayOptions::new(&format!("http://{addr}"))).await;
    let token = gw.register_device("dev-c").await;
    let started = std::time::Instant::now();
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_envelope(r, 502, 5000).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let h = gw
        .http
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    // Metrics are recorded in pingora's `logging` phase, after the response is on the wire.
    let counted = eventually(std::time::Duration::from_secs(2), || async {
        let m = gw.metrics().await;
        m.contains("fleetgate_denials_total{reason=\"upstream_unavailable\"} 1")
            && m.contains("fleetgate_requests_total")
    })
    .await;
    assert!(counted, "{}", gw.metrics().await);
}

/// The gateway never re-encodes an answer: a device that accepts gzip or br gets the
/// upstream's bytes as they are (no `Content-Encoding` added), so what the meters count is what
/// the device receives. Guards against pingora's compression module coming back (it is not
/// installed: `Gateway::init_downstream_modules`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_pass_through_without_re_encoding() {
    let (up, gw) = setup().await;
    let token = gw.register_device("encoding-001").await;
    let path = "/v1/audio/voices";
    let direct = upstream_get_json(&gw.http, &up, path).await;
    let r = gw
        .http
        .get(format!("{}{path}", gw.device))
        .bearer_auth(&token)
        .header("accept-encoding", "gzip, deflate, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("content-encoding").is_none(),
        "{:?}",
        r.headers()
    );
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(
        v["data"], direct["data"],
        "the upstream's answer, unchanged"
    );
}

/// The upstream's `X-Tt-Logid` reaches the device unchanged (Coze support looks requests up
/// by it), and the access log records it next to the gateway's own request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_log_id_passes_through_and_is_logged() {
    let (_up, gw) = setup().await;
    let token = gw.register_device("logid-001").await;
    let r = gw
        .http
        .get(format!("{}/v1/audio/voices", gw.device))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = r.headers()["x-tt-logid"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    // The sandbox puts its log id in the envelope too: the header is the upstream's.
    assert_eq!(v["detail"]["logid"], header.as_str(), "{v}");
    let logged = eventually(std::time::Duration::from_secs(5), || async {
        gw.log().lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|j| {
                j["target"] == "access"
                    && j["device_id"] == "logid-001"
                    && j["upstream_logid"] == header.as_str()
                    && j["request_id"].as_str().is_some_and(|id| id != header)
            })
        })
    })
    .await;
    assert!(
        logged,
        "access line with upstream_logid {header}: {}",
        gw.log()
    );
}
