//! Device lifecycle through the admin API: revocation, disable/enable, delete, paging, and
//! revocation reaching open WebSocket sessions.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gateway_tests::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

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

/// Revoking, disabling or deleting a device makes every token issued before that moment fail
/// on the very next request; re-enabling does not resurrect old tokens. Each token is used
/// before the change, so it sits in the gateway's verified-token memo (`verifier`): the memo
/// must never outlive a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_disable_and_delete_invalidate_tokens_at_once() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let t1 = gw.register_device("life-1").await;
    assert_eq!(call(&gw, &t1).await, 200);

    let r = gw
        .admin(Method::POST, "/admin/v1/devices/life-1/revoke", None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(call(&gw, &t1).await, 401, "revoked token");
    let t2 = gw.device_token("life-1").await;
    assert_eq!(
        call(&gw, &t2).await,
        200,
        "tokens minted after the revocation work"
    );

    let r = gw
        .admin(
            Method::PATCH,
            "/admin/v1/devices/life-1",
            Some(json!({"enabled": false, "labels": {"model": "v2"}})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["device"]["enabled"], false);
    assert_eq!(v["device"]["labels"]["model"], "v2");
    assert_eq!(call(&gw, &t2).await, 401, "disabled device");
    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/devices/life-1/tokens",
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status(), 400, "no tokens for a disabled device");
    gw.admin(
        Method::PATCH,
        "/admin/v1/devices/life-1",
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!(
        call(&gw, &t2).await,
        401,
        "re-enabling keeps old tokens dead"
    );
    let t3 = gw.device_token("life-1").await;
    assert_eq!(call(&gw, &t3).await, 200);

    let r = gw
        .admin(Method::DELETE, "/admin/v1/devices/life-1", None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(call(&gw, &t3).await, 401, "deleted device");
    let r = gw
        .admin(Method::GET, "/admin/v1/devices/life-1", None)
        .await;
    assert_eq!(r.status(), 404);
    let r = gw
        .admin(Method::POST, "/admin/v1/devices/life-1/revoke", None)
        .await;
    assert_eq!(r.status(), 404);
    let r = gw
        .admin(
            Method::PATCH,
            "/admin/v1/devices/nobody",
            Some(json!({"bogus": 1})),
        )
        .await;
    assert_eq!(r.status(), 400, "unknown fields are refused");

    // The same id registered again is a new device: none of the old one's tokens work for it.
    let t4 = gw.register_device("life-1").await;
    assert_eq!(call(&gw, &t4).await, 200);
    for (name, t) in [("revoked", &t1), ("disabled", &t2), ("deleted", &t3)] {
        assert_eq!(
            call(&gw, t).await,
            401,
            "{name} token of the earlier life-1"
        );
    }
}

/// `POST /admin/v1/tokens` mints for a batch of devices and lists the ones it could not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_minted_for_a_batch_of_devices() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    gw.register_device("batch-1").await;
    gw.register_device("batch-2").await;
    gw.admin(
        Method::PATCH,
        "/admin/v1/devices/batch-2",
        Some(json!({"enabled": false})),
    )
    .await;
    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/tokens",
            Some(json!({"device_ids": ["batch-1", "batch-2", "nobody", "bad id"], "duration_seconds": 120})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{v}");
    assert_eq!(tokens[0]["device_id"], "batch-1");
    assert_eq!(tokens[0]["token_type"], "Bearer");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = tokens[0]["expires_in"].as_u64().unwrap();
    assert!(
        (now + 100..=now + 121).contains(&exp),
        "expires_in {exp}, now {now}"
    );
    assert_eq!(
        call(&gw, tokens[0]["access_token"].as_str().unwrap()).await,
        200
    );
    let failed: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["batch-2", "nobody", "bad id"]);
    for body in [
        json!({"device_ids": []}),
        json!({"device_ids": ["a"], "bogus": 1}),
    ] {
        let r = gw.admin(Method::POST, "/admin/v1/tokens", Some(body)).await;
        assert_eq!(r.status(), 400);
    }
    let r = gw.admin(Method::GET, "/admin/v1/tokens", None).await;
    assert_eq!(r.status(), 405);
}

/// Paging walks every device exactly once, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_every_device_once() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let devices: Vec<Value> = (0..25)
        .map(|i| json!({"device_id": format!("fleet-{i:03}")}))
        .collect();
    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/devices",
            Some(json!({"devices": devices})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = gw
            .admin(
                Method::GET,
                &format!("/admin/v1/devices?page_size=10&page_token={token}"),
                None,
            )
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        pages += 1;
        for d in v["devices"].as_array().unwrap() {
            seen.push(d["device_id"].as_str().unwrap().to_owned());
        }
        if !v["has_more"].as_bool().unwrap() {
            break;
        }
        token = v["page_token"].as_str().unwrap().to_owned();
    }
    let want: Vec<String> = (0..25).map(|i| format!("fleet-{i:03}")).collect();
    assert_eq!(seen, want);
    assert_eq!(pages, 3);
    let r = gw
        .admin(Method::GET, "/admin/v1/devices?page_size=0", None)
        .await;
    assert_eq!(r.status(), 400);
}

/// An open WebSocket of a revoked device gets an `error` event (4100) and a close frame
/// within 1 s; a session of another device is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_open_websockets_of_that_device_only() {
    let up = sandbox_upstream(SandboxConfig {
        realtime_audio: false,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let victim = gw.register_device("ws-victim").await;
    let bystander = gw.register_device("ws-bystander").await;
    let open = |token: String| {
        let url = format!("{}/v1/chat?bot_id=b1", gw.ws_url());
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
            let first = ws.next().await.unwrap().unwrap();
            assert!(first.to_text().unwrap().contains("chat.created"));
            ws
        }
    };
    let mut v = open(victim).await;
    let mut b = open(bystander).await;
    let revoked_at = Instant::now();
    let r = gw
        .admin(Method::POST, "/admin/v1/devices/ws-victim/revoke", None)
        .await;
    assert_eq!(r.status(), 200);
    let mut got_error = false;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(2), v.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Text(t))) => {
                let e: Value = serde_json::from_str(&t).unwrap();
                if e["event_type"] == "error" {
                    assert_eq!(e["data"]["code"], 4100);
                    got_error = true;
                }
            }
            Some(Ok(Message::Close(Some(f)))) => break f,
            other => panic!("expected an error event then a close frame, got {other:?}"),
        }
    };
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "closed {:?} after revoke",
        revoked_at.elapsed()
    );
    assert!(got_error, "error event before the close frame");
    assert_eq!(close.code, CloseCode::Policy);
    // The other device's session still works.
    b.send(Message::text(
        json!({"id": "1", "event_type": "chat.update", "data": {}}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), b.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if m.to_text().unwrap_or("").contains("chat.updated") {
            break;
        }
    }
}

/// Devices, their labels and revocations survive `kill -9`: a new gateway on the same store
/// accepts tokens minted before the crash and still refuses revoked ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_revocations_survive_kill_9() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let dir = TempDir::new();
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.store_path = Some(dir.0.join("fleet.redb"));
    let mut gw = GatewayProcess::start(&opts).await;
    let kept = gw.register_device("kept").await;
    let revoked = gw.register_device("revoked").await;
    let devices: Vec<Value> = (0..100)
        .map(|i| json!({"device_id": format!("bulk-{i}"), "labels": {"batch": "7"}}))
        .collect();
    assert_eq!(
        gw.admin(
            Method::POST,
            "/admin/v1/devices",
            Some(json!({"devices": devices}))
        )
        .await
        .status(),
        200
    );
    gw.admin(
        Method::PATCH,
        "/admin/v1/devices/kept",
        Some(json!({"labels": {"room": "kitchen"}})),
    )
    .await;
    gw.admin(Method::POST, "/admin/v1/devices/revoked/revoke", None)
        .await;
    gw.admin(Method::DELETE, "/admin/v1/devices/bulk-0", None)
        .await;
    let cred: Value = gw
        .admin(
            Method::POST,
            "/admin/v1/devices/kept/credentials",
            Some(json!({"type": "secret"})),
        )
        .await
        .json()
        .await
        .unwrap();
    let secret = cred["secret"].as_str().unwrap().to_owned();
    gw.signal("KILL");
    gw.child.wait().await.unwrap();

    let gw = GatewayProcess::start(&opts).await;
    assert_eq!(
        call(&gw, &kept).await,
        200,
        "token minted before the crash still works"
    );
    assert_eq!(
        call(&gw, &revoked).await,
        401,
        "revocation survived the crash"
    );
    let v: Value = gw
        .admin(Method::GET, "/admin/v1/devices/kept", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["device"]["labels"]["room"], "kitchen");
    let r = gw
        .admin(Method::GET, "/admin/v1/devices?page_size=1000", None)
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["devices"].as_array().unwrap().len(),
        2 + 99,
        "bulk-0 stays deleted"
    );
    let m = gw.metrics().await;
    assert!(m.contains("fleetgate_devices 101"), "{m}");
    // The secret credential (stored as a hash) survived too.
    let r = gw
        .http
        .post(format!("{}/api/permission/oauth2/token", gw.device))
        .json(&json!({"grant_type": "client_credentials", "client_id": "kept", "client_secret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn token_kid(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let v: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

/// Signing-key rotation without downtime: add a key and make it active (SIGHUP), old tokens
/// keep working; drop the old key (SIGHUP), tokens signed with it stop working. A broken file
/// on SIGHUP changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_on_sighup() {
    use base64::Engine as _;
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let old = gw.register_device("rot").await;
    assert_eq!(token_kid(&old), "t1");
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let key2 = gw.config_path().with_file_name("k2.key");
    std::fs::write(
        &key2,
        base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
    )
    .unwrap();
    let reloads = |n: u32| {
        let gw = &gw;
        async move {
            eventually(Duration::from_secs(5), || async {
                gw.metrics()
                    .await
                    .contains(&format!("fleetgate_config_reloads_total {n}"))
            })
            .await
        }
    };

    // Step 1: both keys, the new one active.
    let both = original.replace(
        r#"signing_keys = [{ kid = "t1", secret_env = "FG_TEST_KEY" }]"#,
        &format!("active_kid = \"t2\"\nsigning_keys = [{{ kid = \"t1\", secret_env = \"FG_TEST_KEY\" }}, {{ kid = \"t2\", secret_file = \"{}\" }}]", key2.display()),
    );
    assert_ne!(both, original);
    std::fs::write(gw.config_path(), &both).unwrap();
    gw.signal("HUP");
    assert!(reloads(1).await, "reload applied");
    let new = gw.device_token("rot").await;
    assert_eq!(token_kid(&new), "t2");
    assert_eq!(call(&gw, &old).await, 200, "old key still verifies");
    assert_eq!(call(&gw, &new).await, 200);

    // A broken file is refused and changes nothing.
    std::fs::write(gw.config_path(), "[tokens]\nsigning_keys = []\n").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call(&gw, &new).await, 200);
    assert_eq!(call(&gw, &old).await, 200);

    // Step 2: only the new key.
    let only_new = original.replace(
        r#"signing_keys = [{ kid = "t1", secret_env = "FG_TEST_KEY" }]"#,
        &format!(
            "signing_keys = [{{ kid = \"t2\", secret_file = \"{}\" }}]",
            key2.display()
        ),
    );
    std::fs::write(gw.config_path(), &only_new).unwrap();
    gw.signal("HUP");
    assert!(reloads(2).await, "second reload applied");
    assert_eq!(
        call(&gw, &old).await,
        401,
        "tokens of the dropped key stop working, although the memo had verified this one"
    );
    assert_eq!(call(&gw, &new).await, 200);
}

/// `POST /admin/v1/reload` (like SIGHUP) applies routes and rate limits live and reports
/// settings that only a restart applies; a broken file is refused with every error listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_routes_and_limits_and_reports_restart_only_changes() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("reload-dev").await;
    assert_eq!(call(&gw, &token).await, 200);
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let edited = original
        .replace("read_timeout = \"10s\"", "read_timeout = \"11s\"")
        .replace(
            "[tokens]\n",
            "[tokens]\ndefault_ttl = \"2h\"\naudiences = [\"api.example.com\"]\n",
        )
        + "\n[routes]\nallow = [\"/v3/chat\"]\n[rate_limits]\ndevice_rps = 1\ndevice_burst = 1\n";
    std::fs::write(gw.config_path(), edited).unwrap();
    let r = gw.admin(Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert!(
        report["applied"]
            .as_array()
            .unwrap()
            .contains(&json!("routes")),
        "{report}"
    );
    for key in [
        "upstream timeouts",
        "tokens.default_ttl/max_ttl",
        "tokens.audiences/audience_from_host",
    ] {
        assert!(
            report["needs_restart"]
                .as_array()
                .unwrap()
                .contains(&json!(key)),
            "{key} not reported: {report}"
        );
    }
    assert_eq!(
        call(&gw, &token).await,
        404,
        "route removed from the allow-list, live"
    );
    std::fs::write(gw.config_path(), "[server]\nthreads = 0\n").unwrap();
    let r = gw.admin(Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert!(
        err["msg"].as_str().unwrap().contains("server.threads"),
        "{err}"
    );
    assert_eq!(
        call(&gw, &token).await,
        404,
        "a broken file changes nothing"
    );
}
