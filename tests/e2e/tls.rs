//! TLS to the upstream (as to https://api.coze.cn / wss://ws.coze.cn): REST through pingora's
//! rustls connector and WebSocket through the relay's rustls client, both verifying the
//! upstream certificate against the platform store (`SSL_CERT_FILE` here points at a test CA).

use futures_util::StreamExt;
use gateway_tests::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn tls_upstream() -> SandboxHandle {
    sandbox_upstream(SandboxConfig {
        tls: Some(sandbox_tls()),
        realtime_audio: false,
        ..Default::default()
    })
    .await
}

fn ws_request(
    gw: &GatewayProcess,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("{}/v1/chat?bot_id=b1", gw.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// With the upstream's CA trusted, REST, SSE and WebSocket all work over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_sse_and_websocket_over_verified_tls() {
    let up = tls_upstream().await;
    assert!(up.base_url().starts_with("https://"));
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.env.push((
        "SSL_CERT_FILE".into(),
        fixture_path("ca.pem").display().to_string(),
    ));
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("tls-dev").await;
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(&token)
        .json(&json!({"bot_id": "b1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&token)
        .json(&chat_stream_request())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_complete_chat_stream(&r.text().await.unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_request(&gw, &token))
        .await
        .expect("wss upstream via the relay");
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("chat.created"));
}

/// Without the CA the upstream's certificate is refused: 502 in the envelope for REST and for
/// the WebSocket handshake. Verification is on, not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstream_certificate_is_refused() {
    let up = tls_upstream().await;
    let mut opts = GatewayOptions::new(&up.base_url());
    // An empty CA file: nothing is trusted.
    let empty = std::env::temp_dir().join(format!("fleetgate-empty-ca-{}.pem", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    opts.env
        .push(("SSL_CERT_FILE".into(), empty.display().to_string()));
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("tls-dev").await;
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(&token)
        .json(&json!({"bot_id": "b1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    match tokio_tungstenite::connect_async(ws_request(&gw, &token)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 502),
        other => panic!("expected 502, got {other:?}"),
    }
}
