//! Upstream `jwt` mode: per-device Coze OAuth tokens minted with the vendor's app key,
//! exchanged at the (sandbox) upstream token endpoint, which verifies the signature.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gateway_tests::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn keys(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sandbox/tests/keys")
        .join(name)
}

async fn upstream_with_app() -> SandboxHandle {
    let mut cfg = SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    };
    cfg.app_keys.push(sandbox::AppKey {
        app_id: "vendor-app".into(),
        kid: "vendor-kid".into(),
        public_key_pem: std::fs::read_to_string(keys("test_only_rsa_public.pem")).unwrap(),
    });
    // The gateway's default `aud` is the upstream host, as Coze expects ("api.coze.cn").
    cfg.audiences.push("127.0.0.1".into());
    // Only OAuth tokens may be used upstream in this test: no PAT.
    cfg.pats.clear();
    sandbox_upstream(cfg).await
}

fn jwt_gateway(up: &SandboxHandle, ttl: &str, refresh_before: &str) -> GatewayOptions {
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.upstream_auth = "jwt";
    opts.extra_toml = format!(
        "[upstream.jwt]\napp_id = \"vendor-app\"\nkid = \"vendor-kid\"\nprivate_key_file = \"{}\"\ntoken_ttl = \"{ttl}\"\nrefresh_before = \"{refresh_before}\"\n",
        keys("test_only_rsa_private.pem").display()
    );
    opts
}

async fn call(gw: &GatewayProcess, token: &str) -> u16 {
    gw.http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(token)
        .json(&json!({"bot_id": "b1"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// 200 concurrent first requests of one device cause exactly one upstream exchange; the
/// upstream sees `session_name` and `device_info.device_id` = the device id; WebSockets use
/// the same per-device token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_exchange_for_200_concurrent_first_requests() {
    let up = upstream_with_app().await;
    let gw = Arc::new(GatewayProcess::start(&jwt_gateway(&up, "1h", "5m")).await);
    let token = Arc::new(gw.register_device("jwt-dev-1").await);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (gw, token) = (gw.clone(), token.clone());
            tokio::spawn(async move { call(&gw, &token).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up.state.token_exchanges(), 1, "single flight per device");
    let minted = up.state.minted_tokens();
    assert_eq!(minted.len(), 1);
    assert_eq!(minted[0].session_name.as_deref(), Some("jwt-dev-1"));
    assert_eq!(minted[0].device_id.as_deref(), Some("jwt-dev-1"));
    assert_eq!(minted[0].app_id, "vendor-app");

    let mut req = format!("{}/v1/chat?bot_id=b1", gw.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("WS with the device's upstream token");
    assert!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .to_text()
            .unwrap()
            .contains("chat.created")
    );
    assert_eq!(up.state.token_exchanges(), 1);

    // A second device gets its own token.
    let t2 = gw.register_device("jwt-dev-2").await;
    assert_eq!(call(&gw, &t2).await, 200);
    assert_eq!(up.state.token_exchanges(), 2);
    // Nothing secret in the logs: upstream OAuth tokens (`czs_…`), the app key, device tokens.
    let log = gw.log();
    for secret in ["czs_", "PRIVATE KEY", token.as_str(), t2.as_str()] {
        assert!(!log.contains(secret), "`{secret}` found in the gateway log");
    }
}

/// A token near expiry is refreshed in the background while requests keep using the old
/// one: no request fails or waits for the exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_of_expiry_without_failed_requests() {
    let up = upstream_with_app().await;
    // 60 s tokens, refreshed when 57 s remain: the first refresh is due 3 s after minting.
    let gw = GatewayProcess::start(&jwt_gateway(&up, "60s", "57s")).await;
    let token = gw.register_device("jwt-refresh").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut n = 0;
    while tokio::time::Instant::now() < deadline {
        let started = tokio::time::Instant::now();
        assert_eq!(call(&gw, &token).await, 200, "request {n}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "request {n} waited for an exchange"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        up.state.token_exchanges() >= 2,
        "refreshed: {}",
        up.state.token_exchanges()
    );
}

/// The upstream refuses the exchange: the device gets a clear 502 in the envelope at once,
/// and the gateway backs off instead of exchanging on every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_exchange_is_a_502_with_backoff() {
    let up = upstream_with_app().await;
    up.switches()
        .token_endpoint_down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let gw = GatewayProcess::start(&jwt_gateway(&up, "1h", "5m")).await;
    let token = gw.register_device("jwt-refused").await;
    for _ in 0..3 {
        let r = gw
            .http
            .post(format!("{}/v1/conversation/create", gw.device))
            .bearer_auth(&token)
            .json(&json!({"bot_id": "b1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["code"], 5000);
    }
    let m = gw.metrics().await;
    assert!(
        m.contains("fleetgate_upstream_token_exchanges_total{result=\"refused\"} 1"),
        "backed off after one refusal:\n{m}"
    );
    // Once the upstream is back and the back-off has passed, it works.
    up.switches()
        .token_endpoint_down
        .store(false, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&gw, &token).await, 200);
    assert!(!gw.log().contains(&token), "device token in logs");
}
