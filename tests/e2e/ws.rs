//! WebSocket sessions through the gateway's own relay (not pingora's tunnel).

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use gateway_tests::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn connect(
    gw: &GatewayProcess,
    token: &str,
    path_and_query: &str,
) -> Result<Ws, WsError> {
    let mut req = format!("{}{path_and_query}", gw.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

async fn wait_for(ws: &mut Ws, event_type: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = next_event(ws).await;
        let done = e["event_type"] == event_type;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

fn fast_upstream() -> SandboxConfig {
    SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    }
}

/// A voice turn: config, audio up in 20 ms frames, audio and text down, usage, clean close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_session_passes_text_and_audio_both_ways() {
    let up = sandbox_upstream(fast_upstream()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("voice-1").await;
    let mut ws = connect(&gw, &token, "/v1/chat?bot_id=b1").await.unwrap();
    assert_eq!(next_event(&mut ws).await["event_type"], "chat.created");
    ws.send(Message::text(json!({"id": "1", "event_type": "chat.update", "data": {
        "input_audio": {"format": "pcm", "codec": "pcm", "sample_rate": 16000, "channel": 1, "bit_depth": 16},
        "output_audio": {"codec": "pcm", "pcm_config": {"sample_rate": 24000}}
    }}).to_string())).await.unwrap();
    wait_for(&mut ws, "chat.updated").await;
    let frame = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 640]); // 20 ms @ 16 kHz
    for i in 0..50 {
        ws.send(Message::text(json!({"id": format!("a{i}"), "event_type": "input_audio_buffer.append", "data": {"delta": frame}}).to_string())).await.unwrap();
    }
    ws.send(Message::text(
        json!({"id": "c", "event_type": "input_audio_buffer.complete"}).to_string(),
    ))
    .await
    .unwrap();
    let events = wait_for(&mut ws, "conversation.chat.completed").await;
    let audio_bytes: usize = events
        .iter()
        .filter(|e| e["event_type"] == "conversation.audio.delta")
        .map(|e| {
            base64::engine::general_purpose::STANDARD
                .decode(e["data"]["content"].as_str().unwrap())
                .unwrap()
                .len()
        })
        .sum();
    assert!(audio_bytes > 0, "audio came down");
    let done = events.last().unwrap();
    assert!(
        done["data"]["usage"]["token_count"].as_u64().unwrap() > 0,
        "{done}"
    );
    ws.send(Message::Close(None)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("unclean close: {e}"),
        }
    }
}

/// Browsers and mini-programs pass the token in the query; it must not reach upstream.
/// Without a token the handshake fails with 401 and the envelope, never upgrading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_token_auth_and_refused_handshakes() {
    let up = sandbox_upstream(fast_upstream()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("voice-2").await;
    let url = format!(
        "{}/v1/chat?bot_id=b1&authorization=Bearer%20{token}",
        gw.ws_url()
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert!(resp.headers().get("x-tt-logid").is_some());
    assert!(resp.headers().get("sec-websocket-extensions").is_none());
    assert_eq!(next_event(&mut ws).await["event_type"], "chat.created");
    ws.close(None).await.unwrap();
    match tokio_tungstenite::connect_async(format!("{}/v1/chat?bot_id=b1", gw.ws_url())).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body: Value = serde_json::from_slice(resp.body().as_ref().unwrap()).unwrap();
            assert_eq!(body["code"], 4100);
        }
        other => panic!("expected 401, got {other:?}"),
    }
    match connect(&gw, "garbage", "/v1/chat?bot_id=b1").await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
}

/// pingora's tunnel loses ~0.8% of sessions when the upstream speaks right after the 101
/// (pingora #946). The sandbox sends `chat.created` immediately, so every one of 2,000
/// churned sessions must see it and close cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_churned_sessions_lose_none() {
    let up = sandbox_upstream(fast_upstream()).await;
    let gw = std::sync::Arc::new(GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await);
    let token = std::sync::Arc::new(gw.register_device("churn").await);
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..40 {
        let (gw, token, failures) = (gw.clone(), token.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let ok = async {
                    let mut ws = connect(&gw, &token, "/v1/chat?bot_id=b1").await.ok()?;
                    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
                        .await
                        .ok()??
                        .ok()?;
                    let v: Value = serde_json::from_str(first.to_text().ok()?).ok()?;
                    (v["event_type"] == "chat.created").then_some(())?;
                    ws.close(None).await.ok()?;
                    Some(())
                }
                .await;
                if ok.is_none() {
                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!("session {worker}/{i} lost");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "sessions lost out of 2000"
    );
}

/// A device that says nothing for 90 s keeps its session (pingora's tunnel cuts at 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_session_survives_90_seconds() {
    let up = sandbox_upstream(fast_upstream()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("quiet").await;
    let mut ws = connect(&gw, &token, "/v1/chat?bot_id=b1").await.unwrap();
    assert_eq!(next_event(&mut ws).await["event_type"], "chat.created");
    tokio::time::sleep(Duration::from_secs(90)).await;
    ws.send(Message::text(
        json!({"id": "1", "event_type": "chat.update", "data": {}}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(
        wait_for(&mut ws, "chat.updated").await.last().unwrap()["event_type"],
        "chat.updated"
    );
}

/// SIGTERM: open sessions get a close frame 1001 with a reconnect hint (not a reset), new
/// upgrades are refused, and the process exits within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_with_1001() {
    let up = sandbox_upstream(fast_upstream()).await;
    let mut gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("drain").await;
    let mut ws = connect(&gw, &token, "/v1/chat?bot_id=b1").await.unwrap();
    assert_eq!(next_event(&mut ws).await["event_type"], "chat.created");
    gw.signal("TERM");
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => break f,
            Some(Ok(Message::Close(None))) | None => panic!("closed without 1001"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("reset instead of a close frame: {e}"),
        }
    };
    assert_eq!(close.code, CloseCode::Away);
    assert!(close.reason.contains("reconnect"), "{}", close.reason);
    let status = tokio::time::timeout(Duration::from_secs(8), gw.child.wait())
        .await
        .expect("exits within grace + 1 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// When the upstream is silent for `websocket.ping_interval`, the relay pings it (between
/// frames) so NATs and upstream idle timers do not cut long voice sessions. The upstream's
/// pong is relayed to the device like any frame (RFC 6455 lets clients ignore unsolicited
/// pongs), which is how this test observes the ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_is_pinged() {
    let up = sandbox_upstream(fast_upstream()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.ping_interval = "1s";
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("pinged").await;
    let mut ws = connect(&gw, &token, "/v1/chat?bot_id=b1").await.unwrap();
    assert_eq!(next_event(&mut ws).await["event_type"], "chat.created");
    let started = std::time::Instant::now();
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("pong in time")
        {
            Some(Ok(Message::Pong(p))) => break p,
            Some(Ok(_)) => continue,
            other => panic!("session ended: {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"fleetgate");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "pinged only after the interval"
    );
}

/// During a drain, keep-alive connections are answered and then closed (`Connection:
/// close`), so clients reconnect to a node that is staying instead of holding on to this one
/// until it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_closed_after_their_answer_during_a_drain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = sandbox_upstream(fast_upstream()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.drain_delay = "3s";
    let gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("drain-keepalive").await;
    let request = format!(
        "GET /v1/audio/voices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let mut conn = tokio::net::TcpStream::connect(gw.device_addr)
        .await
        .unwrap();
    // Reads one answer's head (the body is small and comes with it or right after).
    async fn head(conn: &mut tokio::net::TcpStream) -> String {
        let mut buf = Vec::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 8192];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before an answer");
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf).to_ascii_lowercase()
    }
    conn.write_all(request.as_bytes()).await.unwrap();
    let first = head(&mut conn).await;
    assert!(first.starts_with("http/1.1 200"), "{first}");
    assert!(!first.contains("connection: close"), "{first}");
    // Let the body arrive, then drain.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rest = [0u8; 65536];
    let _ = tokio::time::timeout(Duration::from_millis(50), conn.read(&mut rest)).await;
    gw.signal("TERM");
    let not_ready = eventually(Duration::from_secs(2), || async {
        gw.http
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    assert!(not_ready);
    conn.write_all(request.as_bytes()).await.unwrap();
    let during = head(&mut conn).await;
    assert!(during.starts_with("http/1.1 200"), "{during}");
    assert!(during.contains("connection: close"), "{during}");
    // And the gateway closes the connection after that answer.
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match conn.read(&mut rest).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open during the drain");
}

/// Zero failed REST requests during a drain: on SIGTERM `/readyz` fails at once while REST is
/// still served for `server.drain_delay`; a client that stops sending when readiness fails
/// (as a load balancer does) sees no error at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rest_request_fails_during_a_drain() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let up = sandbox_upstream(fast_upstream()).await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.drain_delay = "2s";
    let mut gw = GatewayProcess::start(&opts).await;
    let token = gw.register_device("drain-rest").await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (http, url, token) = (
            gw.http.clone(),
            format!("{}/v1/conversation/create", gw.device),
            token.clone(),
        );
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                match http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"bot_id": "b"}))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed during drain: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let watcher = {
        let (http, url, stop) = (
            gw.http.clone(),
            format!("{}/readyz", gw.admin),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                if let Ok(r) = http.get(&url).send().await
                    && r.status() == 503
                {
                    stop.store(true, Ordering::Release);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    watcher.await.unwrap();
    for t in load {
        t.await.unwrap();
    }
    let status = tokio::time::timeout(Duration::from_secs(10), gw.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success());
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests during the drain"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "load ran: {}",
        ok.load(Ordering::Relaxed)
    );
}
