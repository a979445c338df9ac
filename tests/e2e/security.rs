//! Hostile devices: request smuggling, oversized and slow headers, path tricks, WebSocket
//! frame bombs, credential confusion, and what must never leave the gateway.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway_tests::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Writes raw bytes on a fresh connection and reads until the server closes it or `wait`.
async fn raw(gw: &GatewayProcess, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(gw.device_addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn api_requests(up: &SandboxHandle) -> u64 {
    up.state.counters.api_requests.load(Ordering::Relaxed)
}

async fn healthy(gw: &GatewayProcess, token: &str) {
    let r = gw
        .http
        .post(format!("{}/v1/conversation/create", gw.device))
        .bearer_auth(token)
        .json(&json!({"bot_id": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "gateway still serves other requests");
}

/// `Content-Length` together with `Transfer-Encoding: chunked` (request smuggling): the
/// request is refused or read as one chunked request, never as two requests upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_length_headers_do_not_smuggle() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("smuggler").await;
    let before = api_requests(&up);
    let attack = format!(
        "POST /v1/conversation/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         POST /v1/conversation/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let answer = raw(&gw, attack.as_bytes(), Duration::from_secs(3)).await;
    let responses = answer.matches("HTTP/1.1 ").count();
    let reached = api_requests(&up) - before;
    assert!(
        reached <= 1,
        "smuggled request reached the upstream ({reached} requests): {answer}"
    );
    assert!(responses <= 2, "{answer}");
    healthy(&gw, &token).await;
}

/// Oversized headers are refused with a 4xx (or the connection is closed), and the gateway
/// keeps serving; a device that sends its head byte by byte forever is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_slow_headers_are_bounded() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("big-headers").await;
    let big = format!(
        "GET /v3/chat/retrieve HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let answer = raw(&gw, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    healthy(&gw, &token).await;

    // Slowloris: part of a head, then nothing. The head must complete within 10 s.
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.device_addr).await.unwrap();
    s.write_all(b"GET /v3/chat/retrieve HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "slow head not cut off");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "cut too early: {:?}",
        started.elapsed()
    );
    healthy(&gw, &token).await;
}

/// Path tricks never reach a route they should not: absolute-form URIs, dot segments, encoded
/// separators and doubled slashes are refused before the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_refused_before_the_upstream() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("paths").await;
    let before = api_requests(&up);
    for target in [
        "http://127.0.0.1:1/admin/v1/devices",
        "/v3/chat/../../admin/v1/devices",
        "/v3/chat/%2e%2e/%2e%2e/admin",
        "/v1/files%2f..%2f..%2fadmin",
        "//v3/chat",
        "/v1/audio/./speech",
        "/admin/v1/devices",
    ] {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        let answer = raw(&gw, req.as_bytes(), Duration::from_secs(3)).await;
        let status: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            (400..500).contains(&status),
            "{target}: {}",
            answer.lines().next().unwrap_or("")
        );
    }
    assert_eq!(
        api_requests(&up),
        before,
        "none of them reached the upstream"
    );
}

/// Credentials stay where they belong: a device token is not an admin token, the
/// `authorization` query parameter and `Sec-WebSocket-Extensions` never reach the upstream,
/// the upstream's credential never reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_cross_boundaries() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("creds").await;
    let r = gw
        .http
        .get(format!("{}/admin/v1/devices/creds", gw.admin))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a device token is not an admin token");

    let url = format!(
        "{}/v1/chat?bot_id=b1&authorization=Bearer%20{token}",
        gw.ws_url()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(
        resp.headers().get("sec-websocket-extensions").is_none(),
        "no extension negotiated"
    );
    let _ = ws.next().await;
    let seen = up
        .state
        .last_ws_handshake
        .lock()
        .unwrap()
        .clone()
        .expect("handshake recorded");
    assert_eq!(
        seen.query, "bot_id=b1",
        "the authorization parameter was stripped"
    );
    assert_eq!(seen.extensions, None, "permessage-deflate stripped");
    assert_eq!(
        seen.authorization.as_deref(),
        Some(format!("Bearer {PAT}").as_str()),
        "upstream got the vendor credential"
    );

    for path in [
        "/v3/chat/retrieve?conversation_id=1&chat_id=2",
        "/v1/conversations?bot_id=b",
    ] {
        let r = gw
            .http
            .get(format!("{}{path}", gw.device))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let headers = format!("{:?}", r.headers());
        let body = r.text().await.unwrap();
        assert!(
            !headers.contains(PAT) && !body.contains(PAT),
            "upstream credential returned to a device"
        );
    }
    let log = gw.log();
    assert!(
        !log.contains(&token) && !log.contains(PAT),
        "credential in logs"
    );
}

/// WebSocket frame bombs (a 2^62-byte declared length, an invalid opcode, an unmasked client
/// frame) end that session and are counted; the gateway keeps serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frame_bombs_end_only_that_session() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("bomber").await;
    let bombs: [&[u8]; 3] = [
        // FIN text, masked, 64-bit length 2^62.
        &[0x81, 0xFF, 0x40, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, b'x'],
        // Reserved opcode 0x3, masked, empty.
        &[0x83, 0x80, 1, 2, 3, 4],
        // Unmasked client text frame.
        &[0x81, 0x02, b'h', b'i'],
    ];
    for bomb in bombs {
        let mut s = TcpStream::connect(gw.device_addr).await.unwrap();
        let head = format!(
            "GET /v1/chat?bot_id=b1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"),
            "upgraded"
        );
        s.write_all(bomb).await.unwrap();
        // The session ends (close frame or closed connection) within a few seconds.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "session with a frame bomb still open");
    }
    healthy(&gw, &token).await;
    let m = gw.metrics().await;
    let errors: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("fleetgate_metering_errors_total{protocol=\"websocket\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(errors >= 2, "frame bombs counted as metering errors: {m}");
    let _ = Value::Null;
}
