//! Cluster mode: three `fleetgate` processes sharing a real `redis-server` (started here).

use std::time::{Duration, Instant};

use gateway_tests::*;
use reqwest::Method;
use serde_json::json;

use crate::oauth::{JWT_BEARER, TOKEN_PATH, add_key, claims, es256, use_token};

async fn nodes(
    up: &SandboxHandle,
    redis: &RedisServer,
    n: usize,
    table: &str,
) -> Vec<GatewayProcess> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut opts = GatewayOptions::new(&up.base_url());
        opts.redis = Some(format!("url = \"{}\"\n{table}", redis.url()));
        out.push(GatewayProcess::start(&opts).await);
    }
    out
}

/// Polls `f` every 10 ms until true; returns how long it took (`None`: not within `limit`).
async fn within<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A device registered on one node works on every node; revoking, disabling or deleting it on
/// one node makes its tokens fail on the others within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_revocations_reach_every_node_within_a_second() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let gw = nodes(&up, &redis, 3, "").await;

    let token = gw[0].register_device("cl-1").await;
    for (i, node) in gw.iter().enumerate() {
        let ok = within(Duration::from_secs(1), || async {
            use_token(node, &token).await == 200
        })
        .await;
        assert!(
            ok.is_some(),
            "node {i} accepts the token of a device registered on node 0"
        );
    }
    // Labels set on node 1 are seen on node 2.
    let r = gw[1]
        .admin(
            Method::PATCH,
            "/admin/v1/devices/cl-1",
            Some(json!({"labels": {"room": "lab"}})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let seen = within(Duration::from_secs(1), || async {
        let v: serde_json::Value = gw[2]
            .admin(Method::GET, "/admin/v1/devices/cl-1", None)
            .await
            .json()
            .await
            .unwrap();
        v["device"]["labels"]["room"] == "lab"
    })
    .await;
    assert!(seen.is_some(), "labels replicated");

    // Revoke on node 0: nodes 1 and 2 refuse the token within 1 s.
    let r = gw[0]
        .admin(Method::POST, "/admin/v1/devices/cl-1/revoke", None)
        .await;
    assert_eq!(r.status(), 200);
    for (i, node) in gw.iter().enumerate().skip(1) {
        let took = within(Duration::from_secs(1), || async {
            use_token(node, &token).await == 401
        })
        .await;
        assert!(
            took.is_some(),
            "node {i} still accepts a token revoked on node 0 after 1 s"
        );
    }
    // A fresh token (minted on node 2) works everywhere; disabling on node 2 stops it on 0.
    let fresh = gw[2].device_token("cl-1").await;
    assert_eq!(use_token(&gw[0], &fresh).await, 200);
    gw[2]
        .admin(
            Method::PATCH,
            "/admin/v1/devices/cl-1",
            Some(json!({"enabled": false})),
        )
        .await;
    let took = within(Duration::from_secs(1), || async {
        use_token(&gw[0], &fresh).await == 401
    })
    .await;
    assert!(took.is_some(), "disable replicated within 1 s");

    // Delete on node 1: gone on node 0 too; bulk registration on node 0 appears on node 2.
    let r = gw[1]
        .admin(Method::DELETE, "/admin/v1/devices/cl-1", None)
        .await;
    assert_eq!(r.status(), 200);
    let gone = within(Duration::from_secs(1), || async {
        gw[0]
            .admin(Method::GET, "/admin/v1/devices/cl-1", None)
            .await
            .status()
            == 404
    })
    .await;
    assert!(gone.is_some(), "delete replicated");
    let bulk: Vec<_> = (0..50)
        .map(|i| json!({"device_id": format!("cl-bulk-{i}")}))
        .collect();
    let r = gw[0]
        .admin(
            Method::POST,
            "/admin/v1/devices",
            Some(json!({"devices": bulk})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let all = within(Duration::from_secs(1), || async {
        gw[2]
            .admin(Method::GET, "/admin/v1/devices/cl-bulk-49", None)
            .await
            .status()
            == 200
    })
    .await;
    assert!(all.is_some(), "bulk registration replicated");
    // Registering again on another node reports it as existing (Redis is the one truth).
    let r = gw[2]
        .admin(
            Method::POST,
            "/admin/v1/devices",
            Some(json!({"device_id": "cl-bulk-7"})),
        )
        .await;
    assert_eq!(r.status(), 200);
}

/// A device's credential added on one node works on another, and an assertion's `jti` is
/// single use across the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_shared_and_jti_is_single_use_across_nodes() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let gw = nodes(&up, &redis, 2, "").await;
    gw[0].register_device("cl-ec").await;
    add_key(&gw[0], "cl-ec", "e1", "ES256", "p256_public_spki.pem").await;
    // Both nodes accept the audience of node 0's address (the Host we send).
    let aud = gw[0].device_addr.to_string();
    let jwt = es256(
        json!({"alg": "ES256", "typ": "JWT", "kid": "e1"}),
        claims("cl-ec", &aud),
    );
    let exchange = |node: &GatewayProcess, jwt: String| {
        let req = node
            .http
            .post(format!("{}{TOKEN_PATH}", node.device))
            .header("host", aud.clone())
            .bearer_auth(jwt)
            .json(&json!({"grant_type": JWT_BEARER, "duration_seconds": 600}));
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    // The key reached node 1 (poll with fresh assertions, each used once).
    let ready = within(Duration::from_secs(1), || async {
        let probe = es256(
            json!({"alg": "ES256", "typ": "JWT", "kid": "e1"}),
            claims("cl-ec", &aud),
        );
        exchange(&gw[1], probe).await.0 == 200
    })
    .await;
    assert!(ready.is_some(), "credential replicated to node 1");
    let (s, v) = exchange(&gw[1], jwt.clone()).await;
    assert_eq!(s, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        use_token(&gw[0], &token).await,
        200,
        "a token minted on node 1 works on node 0"
    );
    // The same assertion again, on the other node: refused as a replay.
    let (s, v) = exchange(&gw[0], jwt).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error_code"], "invalid_client", "{v}");
}

/// Redis killed: tokens keep working (the registry is local), admin writes answer 503 with
/// nothing changed, the token endpoint fails closed, the metric and `/readyz` say so. Redis
/// restarted: writes work again and reach every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_serving_and_recovers() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut redis = RedisServer::start();
    let gw = nodes(
        &up,
        &redis,
        2,
        "timeout = \"200ms\"\nfull_check_interval = \"500ms\"",
    )
    .await;
    let token = gw[0].register_device("cl-out").await;
    assert!(
        within(Duration::from_secs(1), || async {
            use_token(&gw[1], &token).await == 200
        })
        .await
        .is_some()
    );

    redis.kill();
    for node in &gw {
        for _ in 0..20 {
            assert_eq!(
                use_token(node, &token).await,
                200,
                "served while Redis is down"
            );
        }
    }
    let r = gw[0]
        .admin(
            Method::POST,
            "/admin/v1/devices",
            Some(json!({"device_id": "cl-new"})),
        )
        .await;
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    let r = gw[1]
        .admin(Method::POST, "/admin/v1/devices/cl-out/revoke", None)
        .await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        use_token(&gw[0], &token).await,
        200,
        "a refused revoke changed nothing"
    );
    assert!(
        gw[0]
            .metrics()
            .await
            .contains("fleetgate_cluster_redis_up 0")
    );
    let ready: serde_json::Value = gw[0]
        .admin(Method::GET, "/readyz", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ready["cluster"]["redis"], "down", "{ready}");

    redis.restart();
    let back = within(Duration::from_secs(5), || async {
        gw[1]
            .admin(Method::POST, "/admin/v1/devices/cl-out/revoke", None)
            .await
            .status()
            == 200
    })
    .await;
    assert!(
        back.is_some(),
        "admin writes work again after Redis restarts"
    );
    // Node 0's feed resubscribed: the revocation made on node 1 reaches it.
    let took = within(Duration::from_secs(3), || async {
        use_token(&gw[0], &token).await == 401
    })
    .await;
    assert!(took.is_some(), "revocation after the outage reached node 0");
    assert!(gw[0].log().contains("Cluster state reloaded from Redis."));
}

/// The periodic check is the safety net behind pub/sub: a change that bumps the counter but
/// whose message never came is applied within two check intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_messages_are_caught_by_the_periodic_check() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let gw = nodes(&up, &redis, 1, "full_check_interval = \"200ms\"").await;
    let token = gw[0].register_device("cl-quiet").await;
    assert_eq!(use_token(&gw[0], &token).await, 200);
    // Revoke behind the gateway's back: data and counter change, no message is published.
    assert_eq!(
        redis.cli(&["HINCRBY", "fleetgate:dev:cl-quiet", "gen", "1"]),
        "1"
    );
    redis.cli(&["INCR", "fleetgate:ver"]);
    let took = within(Duration::from_secs(2), || async {
        use_token(&gw[0], &token).await == 401
    })
    .await;
    assert!(
        took.is_some(),
        "the periodic check found the unannounced change"
    );
}
