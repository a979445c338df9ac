//! TLS for devices, terminated by the gateway (`[device_listener.tls]`): REST, SSE, WebSocket
//! and the token endpoint over TLS; client certificates required or optional, verified
//! against the device CA; tokens bound to the device a certificate names; certificates
//! rotated by reload; slow handshakes cut. Fixtures: `tests/fixtures/tls/README.md`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gateway_tests::*;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `[device_listener.tls]` serving `cert` (a fixture pair name: `upstream`, `redis-node`).
fn tls_table(cert: &str, rest: &str) -> String {
    format!(
        "[device_listener.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{rest}\n",
        fixture_path(&format!("{cert}.pem")).display(),
        fixture_path(&format!("{cert}.key")).display(),
    )
}

fn mtls(rest: &str) -> String {
    tls_table(
        "upstream",
        &format!(
            "client_ca_file = \"{}\"\n{rest}",
            fixture_path("device-ca.pem").display()
        ),
    )
}

async fn gateway(tls: String) -> (SandboxHandle, GatewayProcess) {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.extra_toml = tls;
    let gw = GatewayProcess::start(&opts).await;
    (up, gw)
}

/// A device's HTTPS client: trusts `ca` only, presents `identity` (a fixture pair) if given.
/// A fresh client is a fresh connection (no pooled one carried over between cases).
fn device_client(ca: &str, identity: Option<&str>) -> reqwest::Client {
    let ca = std::fs::read(fixture_path(ca)).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some(name) = identity {
        let mut pem = std::fs::read(fixture_path(&format!("{name}.pem"))).unwrap();
        pem.extend(std::fs::read(fixture_path(&format!("{name}.key"))).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

/// `https://localhost:<port>` (the fixture certificate is valid for `localhost`).
fn https(gw: &GatewayProcess) -> String {
    format!("https://localhost:{}", gw.device_addr.port())
}

async fn voices(
    client: &reqwest::Client,
    gw: &GatewayProcess,
    token: &str,
) -> reqwest::Result<reqwest::Response> {
    client
        .get(format!("{}/v1/audio/voices", https(gw)))
        .bearer_auth(token)
        .send()
        .await
}

/// A rustls client config trusting `ca`, with the client certificate `identity` if given.
fn rustls_client(ca: &str, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(fixture_path(ca)).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match identity {
        None => b.with_no_client_auth(),
        Some(name) => {
            let chain = rustls::pki_types::CertificateDer::pem_file_iter(fixture_path(&format!(
                "{name}.pem"
            )))
            .unwrap()
            .map(Result::unwrap)
            .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(fixture_path(&format!(
                "{name}.key"
            )))
            .unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    })
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A `wss://` voice session on the gateway with `token`: the socket, or the refusal's status.
async fn wss_chat(gw: &GatewayProcess, identity: Option<&str>, token: &str) -> Result<Wss, u16> {
    let tcp = tokio::net::TcpStream::connect(gw.device_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(rustls_client("ca.pem", identity))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut req = format!(
        "wss://localhost:{}/v1/chat?bot_id=b1",
        gw.device_addr.port()
    )
    .into_client_request()
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("wss handshake: {e}"),
    }
}

/// A new secret credential for `device`, exchanged at the token endpoint over `client`.
async fn client_credentials(
    client: &reqwest::Client,
    gw: &GatewayProcess,
    device: &str,
) -> reqwest::Response {
    let cred: serde_json::Value = gw
        .admin_post(
            &format!("/admin/v1/devices/{device}/credentials"),
            json!({"type": "secret"}),
        )
        .await
        .json()
        .await
        .unwrap();
    client
        .post(format!("{}/api/permission/oauth2/token", https(gw)))
        .json(
            &json!({"grant_type": "client_credentials", "client_id": device,
            "client_secret": cred["secret"]}),
        )
        .send()
        .await
        .unwrap()
}

/// The relay's first event on a voice session is the sandbox's `chat.created`.
async fn expect_chat_created(ws: &mut Wss) {
    let first = ws.next().await.unwrap().unwrap();
    assert!(
        first.to_text().unwrap().contains("chat.created"),
        "{first:?}"
    );
}

fn handshakes(metrics: &str, result: &str) -> u64 {
    let prefix = format!("fleetgate_device_tls_handshakes_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Server-side TLS only: every device-facing protocol works over it, and a client that
/// speaks plain HTTP to the TLS port gets nothing (and is counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_sse_websocket_and_the_token_endpoint_over_tls() {
    let (_up, gw) = gateway(tls_table("upstream", "")).await;
    let token = gw.register_device("tls-dev-a").await;
    let client = device_client("ca.pem", None);

    let r = voices(&client, &gw, &token).await.unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    let r = client
        .post(format!("{}/v3/chat", https(&gw)))
        .bearer_auth(&token)
        .json(&chat_stream_request())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_complete_chat_stream(&r.text().await.unwrap());

    let mut ws = wss_chat(&gw, None, &token).await.expect("wss session");
    expect_chat_created(&mut ws).await;
    drop(ws);

    // The token endpoint (client credentials) over TLS.
    let r = client_credentials(&client, &gw, "tls-dev-a").await;
    assert_eq!(r.status(), 200);
    let minted: serde_json::Value = r.json().await.unwrap();
    let r = voices(&client, &gw, minted["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Plain HTTP on the TLS port: no answer, a failed handshake.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/v1/audio/voices", gw.device_addr))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    let m = gw.metrics().await;
    // One pooled HTTPS connection for every REST call above, one for the WebSocket.
    assert!(handshakes(&m, "ok") >= 2, "{m}");
    assert!(handshakes(&m, "failed") >= 1, "{m}");
}

/// `client_auth = "required"` with `bind_device`: no certificate or one from another CA
/// cannot connect; a device certificate connects, and only its own device's tokens work on
/// it (REST, WebSocket, device quota and the token endpoint alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_bind_tokens_to_their_device() {
    let (_up, gw) = gateway(mtls("bind_device = true")).await;
    let token_a = gw.register_device("tls-dev-a").await;
    let token_b = gw.register_device("tls-dev-b").await;

    for identity in [None, Some("device-rogue")] {
        let r = voices(&device_client("ca.pem", identity), &gw, &token_a).await;
        assert!(r.is_err(), "{identity:?}: {r:?}");
    }

    let a = device_client("ca.pem", Some("device-a"));
    let r = voices(&a, &gw, &token_a).await.unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    for path in ["/v1/audio/voices", "/v1/gateway/quota"] {
        let r = a
            .get(format!("{}{path}", https(&gw)))
            .bearer_auth(&token_b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["code"], 4100, "{path}: {body}");
    }

    assert_eq!(
        wss_chat(&gw, Some("device-a"), &token_b).await.err(),
        Some(401)
    );
    let mut ws = wss_chat(&gw, Some("device-a"), &token_a)
        .await
        .expect("own device's session");
    expect_chat_created(&mut ws).await;
    drop(ws);

    // The token endpoint: the certificate's device only.
    for (device, status) in [("tls-dev-b", 401), ("tls-dev-a", 200)] {
        let r = client_credentials(&a, &gw, device).await;
        assert_eq!(r.status(), status, "{device}");
        if status == 401 {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error_code"], "invalid_client", "{body}");
        }
    }

    // A verified certificate that names no device: no token works on it.
    let nocn = device_client("ca.pem", Some("device-nocn"));
    assert_eq!(voices(&nocn, &gw, &token_a).await.unwrap().status(), 401);
}

/// `client_auth = "optional"`: devices without a certificate still connect (tokens alone),
/// a certificate from another CA is refused, and a presented certificate still binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_bind_only_when_presented() {
    let (_up, gw) = gateway(mtls("client_auth = \"optional\"\nbind_device = true")).await;
    let token_a = gw.register_device("tls-dev-a").await;
    let token_b = gw.register_device("tls-dev-b").await;
    let none = device_client("ca.pem", None);
    assert_eq!(voices(&none, &gw, &token_b).await.unwrap().status(), 200);
    let rogue = voices(
        &device_client("ca.pem", Some("device-rogue")),
        &gw,
        &token_a,
    )
    .await;
    assert!(rogue.is_err(), "{rogue:?}");
    let a = device_client("ca.pem", Some("device-a"));
    assert_eq!(voices(&a, &gw, &token_a).await.unwrap().status(), 200);
    assert_eq!(voices(&a, &gw, &token_b).await.unwrap().status(), 401);
}

/// Without `bind_device` a device certificate authenticates the connection only: any valid
/// token works on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_binding_a_certificate_does_not_restrict_tokens() {
    let (_up, gw) = gateway(mtls("")).await;
    gw.register_device("tls-dev-a").await;
    let token_b = gw.register_device("tls-dev-b").await;
    let a = device_client("ca.pem", Some("device-a"));
    assert_eq!(voices(&a, &gw, &token_b).await.unwrap().status(), 200);
}

/// A renewed certificate is picked up by reload (SIGHUP) for new connections; a connection
/// that never finishes its handshake is cut after `handshake_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_reload_and_slow_handshakes_are_cut() {
    let (_up, gw) = gateway(tls_table("upstream", "handshake_timeout = \"500ms\"")).await;
    let token = gw.register_device("tls-dev-a").await;
    let old_ca = device_client("ca.pem", None);
    let new_ca = device_client("redis-ca.pem", None);
    assert_eq!(voices(&old_ca, &gw, &token).await.unwrap().status(), 200);
    assert!(voices(&new_ca, &gw, &token).await.is_err());

    let path = gw.config_path();
    let cfg = std::fs::read_to_string(&path).unwrap().replace(
        &tls_table("upstream", "handshake_timeout = \"500ms\""),
        &tls_table("redis-node", "handshake_timeout = \"500ms\""),
    );
    assert!(cfg.contains("redis-node.pem"));
    std::fs::write(&path, cfg).unwrap();
    gw.signal("HUP");
    let renewed = eventually(Duration::from_secs(10), || async {
        let fresh = device_client("redis-ca.pem", None);
        voices(&fresh, &gw, &token)
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(renewed, "{}", gw.log());
    let stale = voices(&device_client("ca.pem", None), &gw, &token).await;
    assert!(stale.is_err(), "{stale:?}");

    // Connect and say nothing: closed after the handshake timeout, and counted.
    let mut idle = tokio::net::TcpStream::connect(gw.device_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("closed within the handshake timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The socket closes as the timed-out handshake is dropped, just before it is counted.
    let counted = eventually(Duration::from_secs(2), || async {
        handshakes(&gw.metrics().await, "timeout") >= 1
    })
    .await;
    assert!(counted, "{}", gw.metrics().await);
}

/// Keep-alive works over TLS: one connection, one handshake, many requests answered in turn
/// (a proxy that closed TLS connections after each answer would make every request pay a
/// full handshake). Raw HTTP/1.1 on one TLS stream, so the client cannot quietly reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_reused_over_tls() {
    use tokio::io::AsyncWriteExt;
    let (_up, gw) = gateway(tls_table("upstream", "")).await;
    let token = gw.register_device("tls-dev-a").await;
    let tcp = tokio::net::TcpStream::connect(gw.device_addr)
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(rustls_client("ca.pem", None))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let request = format!(
        "GET /v1/audio/voices HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let mut buf = Vec::new();
    for i in 0..20 {
        tls.write_all(request.as_bytes()).await.unwrap();
        // One answer: its head, then exactly Content-Length bytes of body.
        let (head_end, length) = loop {
            let mut chunk = [0u8; 4096];
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "request {i}: the gateway closed the connection");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "request {i}: {head}");
                assert!(!head.contains("connection: close"), "request {i}: {head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .expect("content-length")
                    .trim()
                    .parse()
                    .unwrap();
                break (end + 4, length);
            }
        };
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "request {i}: closed mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..head_end + length);
    }
    assert_eq!(handshakes(&gw.metrics().await, "ok"), 1);
}
