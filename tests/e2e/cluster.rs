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

/// Polls `use_token` on `node` until it answers `status`; how long that took (`None`: not
/// within 1 s, the replication bound).
async fn answers_within_1s(node: &GatewayProcess, token: &str, status: u16) -> Option<Duration> {
    within(Duration::from_secs(1), || async {
        use_token(node, token).await == status
    })
    .await
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
        let ok = answers_within_1s(node, &token, 200).await;
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
        let took = answers_within_1s(node, &token, 401).await;
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
    let took = answers_within_1s(&gw[0], &fresh, 401).await;
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
    gw[0]
        .register_devices((0..50).map(|i| format!("cl-bulk-{i}")))
        .await;
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
    assert!(answers_within_1s(&gw[1], &token, 200).await.is_some());

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

/// A node that sends Redis no command of its own (no admin writes, no leases, a periodic check
/// an hour away) still reports Redis down soon after an outage starts: its change feed loses
/// the subscription and cannot get it back, and `/readyz` and `fleetgate_cluster_redis_up`
/// say so; both recover with Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_reports_a_redis_outage() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut redis = RedisServer::start();
    let gw = nodes(
        &up,
        &redis,
        1,
        "timeout = \"200ms\"\nfull_check_interval = \"1h\"",
    )
    .await;
    let up_gauge = |v: u8| format!("fleetgate_cluster_redis_up {v}");
    assert!(gw[0].metrics().await.contains(&up_gauge(1)));
    redis.kill();
    let down = within(Duration::from_secs(5), || async {
        gw[0].metrics().await.contains(&up_gauge(0))
    })
    .await;
    assert!(
        down.is_some(),
        "Redis down, yet the idle node still said up"
    );
    redis.restart();
    let back = within(Duration::from_secs(10), || async {
        gw[0].metrics().await.contains(&up_gauge(1))
    })
    .await;
    assert!(back.is_some(), "Redis back, yet the node still said down");
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
    let bumped = redis.cli(&["HINCRBY", "{fleetgate}:dev:cl-quiet", "gen", "1"]);
    assert!(bumped.parse::<u64>().is_ok(), "HINCRBY answered {bumped}");
    redis.cli(&["INCR", "{fleetgate}:ver"]);
    let took = within(Duration::from_secs(2), || async {
        use_token(&gw[0], &token).await == 401
    })
    .await;
    assert!(
        took.is_some(),
        "the periodic check found the unannounced change"
    );
}

const FOREVER: u64 = 253_402_300_799;

/// Sends `n` requests to every node at once (concurrently); returns (admitted, refused 429,
/// anything else).
async fn hammer(gw: &[GatewayProcess], token: &str, n: usize) -> (usize, usize, usize) {
    let mut tasks = Vec::new();
    for node in gw {
        for _ in 0..n {
            let req = node
                .http
                .post(format!("{}/v1/conversation/create", node.device))
                .bearer_auth(token)
                .json(&json!({"bot_id": "b1"}));
            tasks.push(tokio::spawn(async move {
                req.send().await.map(|r| r.status().as_u16())
            }));
        }
    }
    let (mut ok, mut refused, mut other) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(200) => ok += 1,
            Ok(429) => refused += 1,
            _ => other += 1,
        }
    }
    (ok, refused, other)
}

/// One device hammers three nodes at once with a quota of 100 requests: with leases of 1
/// exactly 100 are admitted, and Redis has charged exactly 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_exactly_across_three_nodes_with_lease_1() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let gw = nodes(&up, &redis, 3, "").await;
    let token = gw[0].register_device("cl-q1").await;
    add_rule(&gw[0], "cl-q1", "requests", 100).await;
    // Every node has the rule (the change feed), before the load starts.
    for node in &gw[1..] {
        let has = within(Duration::from_secs(1), || async {
            let v: serde_json::Value = node
                .admin(
                    Method::GET,
                    "/v1/commerce/benefit/limitations?entity_type=single_device&entity_id=cl-q1",
                    None,
                )
                .await
                .json()
                .await
                .unwrap();
            v["data"]["benefit_infos"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
        .await;
        assert!(has.is_some(), "rule replicated");
    }
    let (ok, refused, other) = hammer(&gw, &token, 60).await;
    assert_eq!(other, 0, "only 200 and 429 answers");
    assert_eq!(
        ok, 100,
        "exactly the quota admitted across 3 nodes ({refused} refused)"
    );
    assert_charged(&redis, "cl-q1", "requests", 100).await;
}

/// With leases of 10 the quota is never exceeded (a request holds 1, grants never pass the
/// limit); unused leases go back after `lease_idle`, so the device still gets exactly 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larger_leases_never_overshoot_and_unused_ones_come_back() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let gw = nodes(
        &up,
        &redis,
        3,
        "lease_size = { requests = 10 }\nlease_idle = \"1s\"\nlease_ttl = \"3s\"",
    )
    .await;
    let token = gw[0].register_device("cl-q10").await;
    add_rule(&gw[0], "cl-q10", "requests", 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the rule reaches every node
    let (ok, _, other) = hammer(&gw, &token, 30).await;
    assert_eq!(other, 0);
    assert!(ok <= 100, "admitted {ok} > 100");
    // After the idle leases are returned, node 0 alone can use what is left.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (more, refused, other) = hammer(&gw[..1], &token, 120).await;
    assert_eq!(other, 0);
    assert!(refused > 0);
    assert_eq!(ok + more, 100, "burst {ok} + later {more}");
    assert_charged(&redis, "cl-q10", "requests", 100).await;
}

/// What a device saw from a stream of requests: status → count, and the 503s' body codes.
#[derive(Debug, Default)]
struct Seen {
    statuses: std::collections::BTreeMap<u16, usize>,
    unavailable_codes: Vec<i64>,
}

/// Keeps `workers` tasks sending `POST /v1/conversation/create` round-robin to every node
/// until `stop`; returns what each device saw.
async fn load(
    gw: &[GatewayProcess],
    token: &str,
    workers: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Seen> {
    let targets: Vec<(reqwest::Client, String)> = gw
        .iter()
        .map(|n| {
            (
                n.http.clone(),
                format!("{}/v1/conversation/create", n.device),
            )
        })
        .collect();
    let token = token.to_owned();
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (targets, token, stop) = (targets.clone(), token.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut i = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (http, url) = &targets[i % targets.len()];
                    i += 1;
                    let r = http
                        .post(url)
                        .bearer_auth(&token)
                        .json(&json!({"bot_id": "b1"}))
                        .send()
                        .await;
                    let status = r.as_ref().map_or(0, |r| r.status().as_u16());
                    *seen.statuses.entry(status).or_default() += 1;
                    if status == 503 {
                        let v: serde_json::Value = r.unwrap().json().await.unwrap_or_default();
                        seen.unavailable_codes
                            .push(v["code"].as_i64().unwrap_or(-1));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                seen
            }));
        }
        let mut all = Seen::default();
        for t in tasks {
            let s = t.await.unwrap();
            for (k, v) in s.statuses {
                *all.statuses.entry(k).or_default() += v;
            }
            all.unavailable_codes.extend(s.unavailable_codes);
        }
        all
    })
}

/// A rule updated on one node reaches the other as that one rule (the feed names it; the node
/// re-reads it alone instead of every rule) and is enforced there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_update_reaches_the_other_node_as_one_rule_and_is_enforced() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let gw = nodes(&up, &redis, 2, "").await;
    let token = gw[0].register_device("cl-upd").await;
    add_rule(&gw[0], "cl-upd", "requests", 100).await;
    async fn limit_on(node: &GatewayProcess) -> serde_json::Value {
        let list = "/v1/commerce/benefit/limitations?entity_type=single_device&entity_id=cl-upd";
        let v: serde_json::Value = node
            .admin(Method::GET, list, None)
            .await
            .json()
            .await
            .unwrap();
        v["data"]["benefit_infos"][0].clone()
    }
    let rule = limit_on(&gw[0]).await;
    let id = rule["benefit_id"].as_str().unwrap().to_owned();
    let put = gw[0]
        .admin(
            Method::PUT,
            &format!("/v1/commerce/benefit/limitations/{id}"),
            Some(json!({"limit": 3})),
        )
        .await;
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    let seen = within(Duration::from_secs(1), || async {
        limit_on(&gw[1]).await["limit"] == 3
    })
    .await;
    assert!(seen.is_some(), "the update reached node 1 within 1 s");
    let answers: Vec<u16> =
        futures_util::future::join_all((0..5).map(|_| use_token(&gw[1], &token))).await;
    assert_eq!(
        answers.iter().filter(|&&s| s == 200).count(),
        3,
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|&&s| s == 429).count(),
        2,
        "{answers:?}"
    );
    let log = std::fs::read_to_string(&gw[1].log_path).unwrap();
    assert!(
        !log.contains("reloading every rule"),
        "node 1 fell back to a full reload:\n{log}"
    );
}

async fn add_rule(gw: &GatewayProcess, device: &str, benefit: &str, limit: u64) {
    let body = json!({"entity_type": "single_device", "entity_id": device,
        "benefit_info": {"benefit_type": benefit, "active_mode": "absolute_time", "started_at": 0,
                         "ended_at": FOREVER, "limit": limit, "status": "valid", "trigger_unit": "never", "trigger_time": 1}});
    let r = gw
        .admin(Method::POST, "/v1/commerce/benefit/limitations", Some(body))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Redis is killed under load and restarted. `requests` runs degraded (allowance 5 per node),
/// `llm_tokens` fails closed. No node crashes; the only 5xx are the documented 503 / 5000;
/// the degraded device gets at most its quota plus 3 × 5; the fail-closed device is refused
/// during the outage and served after; Redis ends up charging exactly what was admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_respects_each_mode_and_loses_nothing() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut redis = RedisServer::start();
    let mut gw = nodes(
        &up,
        &redis,
        3,
        "degraded_allowance = { requests = 5 }\ntimeout = \"300ms\"",
    )
    .await;
    let open = gw[0].register_device("cl-deg").await;
    let closed = gw[0].register_device("cl-closed").await;
    add_rule(&gw[0], "cl-deg", "requests", 100).await;
    add_rule(&gw[0], "cl-closed", "llm_tokens", 1_000_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // rules reach every node

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deg = load(&gw, &open, 3, stop.clone()).await;
    let cls = load(&gw, &closed, 3, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_outage = redis_used(&redis, "cl-deg", "requests");
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    // Recovery: a fail-closed device is served again within a few seconds.
    let served_again = within(Duration::from_secs(5), || async {
        gw[1]
            .http
            .post(format!("{}/v1/conversation/create", gw[1].device))
            .bearer_auth(&closed)
            .json(&json!({"bot_id": "b1"}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (deg, cls) = (deg.await.unwrap(), cls.await.unwrap());
    eprintln!(
        "degraded: {:?}; fail closed: {:?}",
        deg.statuses, cls.statuses
    );
    assert!(
        served_again.is_some(),
        "fail-closed device served after recovery"
    );

    for n in gw.iter_mut() {
        assert!(n.child.try_wait().unwrap().is_none(), "a node exited");
    }
    // Degraded device: 200 until its quota (and the allowance) is gone, then 429 or 503.
    let admitted = deg.statuses.get(&200).copied().unwrap_or(0);
    assert!(
        deg.statuses.keys().all(|s| [200, 429, 503].contains(s)),
        "degraded device saw {:?}",
        deg.statuses
    );
    assert!(before_outage > 0, "load ran before the outage");
    assert!(
        (100..=115).contains(&admitted),
        "admitted {admitted}: the quota (100) plus at most 3 nodes × 5"
    );
    // Fail-closed device: refused with 503 / 5000 during the outage, nothing else but 200.
    assert!(
        cls.statuses.keys().all(|s| [200, 503].contains(s)),
        "fail-closed device saw {:?}",
        cls.statuses
    );
    assert!(cls.statuses.get(&503).copied().unwrap_or(0) > 0, "{cls:?}");
    assert!(cls.unavailable_codes.iter().all(|c| *c == 5000), "{cls:?}");
    assert!(
        cls.statuses.get(&200).copied().unwrap_or(0) > 0,
        "{:?}",
        cls.statuses
    );
    // Counters consistent: Redis charged exactly what the nodes admitted.
    assert_charged(&redis, "cl-deg", "requests", admitted as u64).await;
    let m = gw[0].metrics().await;
    assert!(
        m.contains("fleetgate_cluster_redis_up 1"),
        "redis_up back to 1"
    );
}

/// Redis shows `want` charged (summed over nodes) within 3 s: reports are asynchronous.
async fn assert_charged(redis: &RedisServer, device: &str, benefit: &str, want: u64) {
    let ok = within(Duration::from_secs(3), || async {
        redis_used(redis, device, benefit) == want
    })
    .await;
    assert!(
        ok.is_some(),
        "Redis charged {} to {device}, want {want}",
        redis_used(redis, device, benefit)
    );
}

/// The sum charged in Redis for a device's cumulative counter of `benefit`.
fn redis_used(redis: &RedisServer, device: &str, benefit: &str) -> u64 {
    let all = redis.cli(&["HGETALL", &format!("fleetgate:use:{device}")]);
    let lines: Vec<&str> = all.lines().collect();
    let prefix = format!("{benefit}:c:u:");
    lines
        .chunks(2)
        .filter(|p| p[0].starts_with(&prefix))
        .map(|p| p[1].parse::<u64>().unwrap())
        .sum()
}

/// `GET …/usage` on `node`: the `used` of the device's first rule.
async fn used_via(node: &GatewayProcess, device: &str) -> u64 {
    let v: serde_json::Value = node
        .admin(
            Method::GET,
            &format!(
                "/v1/commerce/benefit/limitations/usage?entity_type=single_device&entity_id={device}"
            ),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    v["data"]["items"][0]["used"].as_u64().unwrap()
}

fn chat(node: &GatewayProcess, token: &str) -> reqwest::RequestBuilder {
    node.http
        .post(format!("{}/v3/chat", node.device))
        .bearer_auth(token)
        .json(&chat_stream_request())
}

/// A node killed with `kill -9` in the middle of a stream loses none of the usage it had
/// settled: another node shows the same total (from Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_loses_no_settled_usage() {
    use futures_util::StreamExt;
    let up = sandbox_upstream(SandboxConfig {
        sse_event_delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let redis = RedisServer::start();
    let mut gw = nodes(&up, &redis, 2, "lease_size = { llm_tokens = 5000 }").await;
    let token = gw[0].register_device("cl-kill").await;
    add_rule(&gw[0], "cl-kill", "llm_tokens", 1_000_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        let r = chat(&gw[0], &token).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let settled = used_via(&gw[0], "cl-kill").await;
    assert!(settled > 0, "the two chats were charged");
    // A third stream is open when the node dies.
    let r = chat(&gw[0], &token).send().await.unwrap();
    let mut body = r.bytes_stream();
    let _first = body.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // > persist interval
    gw[0].signal("KILL");
    gw[0].child.wait().await.unwrap();
    drop(body);
    assert_eq!(
        used_via(&gw[1], "cl-kill").await,
        settled,
        "the settled usage is in Redis"
    );
}

/// A node that dies keeps its unspent lease only for `lease_ttl`: until then the others are
/// refused (the lease might still be spent), afterwards they get exactly what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_lease_is_reclaimed_after_lease_ttl() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let mut gw = nodes(
        &up,
        &redis,
        2,
        "lease_size = { requests = 10 }\nlease_idle = \"1s\"\nlease_ttl = \"2s\"",
    )
    .await;
    let token = gw[0].register_device("cl-dead").await;
    add_rule(&gw[0], "cl-dead", "requests", 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hammer(&gw[..1], &token, 1).await, (1, 0, 0));
    // Settled usage reaches Redis within `quota.persist_interval` (100 ms): what a node settled
    // in its last interval before dying is the one thing a reclaimed lease can re-admit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw[0].signal("KILL");
    gw[0].child.wait().await.unwrap();
    let killed_at = Instant::now();
    assert_eq!(
        hammer(&gw[1..], &token, 1).await,
        (0, 1, 0),
        "the dead node's lease of 10 still counts"
    );
    tokio::time::sleep(Duration::from_millis(2300).saturating_sub(killed_at.elapsed())).await;
    let (ok, refused, other) = hammer(&gw[1..], &token, 12).await;
    assert_eq!(
        (ok, refused, other),
        (9, 3, 0),
        "what is left after 1 of 10"
    );
}

/// `rediss://` with a password from the environment: two nodes share devices and a quota
/// over TLS (the server's certificate is trusted through `SSL_CERT_FILE`, as an operator
/// would trust a private CA); the password never appears in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_a_password() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start_tls(&["--requirepass", "s3cret-redis-pw"]);
    assert_eq!(
        redis.cli(&["--pass", "s3cret-redis-pw", "--no-auth-warning", "PING"]),
        "PONG"
    );
    let mut gw = Vec::new();
    for _ in 0..2 {
        let mut opts = GatewayOptions::new(&up.base_url());
        opts.redis = Some(format!(
            "url = \"{}\"\npassword_env = \"FG_TEST_REDIS_PW\"",
            redis.url()
        ));
        opts.env = vec![
            (
                "SSL_CERT_FILE".into(),
                fixture_path("ca.pem").display().to_string(),
            ),
            ("FG_TEST_REDIS_PW".into(), "s3cret-redis-pw".into()),
        ];
        gw.push(GatewayProcess::start(&opts).await);
    }
    let token = gw[0].register_device("cl-tls").await;
    add_rule(&gw[0], "cl-tls", "requests", 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, refused, other) = hammer(&gw, &token, 4).await;
    assert_eq!((ok, refused, other), (5, 3, 0), "5 of 8 across two nodes");
    for n in &gw {
        assert!(!n.log().contains("s3cret-redis-pw"), "password in the log");
    }
}

/// After a failover: registering `device` on node 0 works again within 10 s, and node 1
/// accepts its token within 10 s (it follows the change feed from the new master).
async fn writes_resume_after_failover(gw: &[GatewayProcess], device: &str) {
    let written = within(Duration::from_secs(10), || async {
        gw[0]
            .admin_post("/admin/v1/devices", json!({"device_id": device}))
            .await
            .status()
            .is_success()
    })
    .await;
    assert!(written.is_some(), "admin writes after the failover");
    let token = gw[0].device_token(device).await;
    let seen = within(Duration::from_secs(10), || async {
        use_token(&gw[1], &token).await == 200
    })
    .await;
    assert!(seen.is_some(), "node 1 follows the feed after the failover");
}

/// Redis Sentinel: nodes find the master by name; when it dies and Sentinel promotes the
/// replica, they follow (admin writes work again, the change feed resumes, tokens keep
/// working).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut rs = RedisSentinel::start("fgm");
    let mut gw = Vec::new();
    for _ in 0..2 {
        let mut opts = GatewayOptions::new(&up.base_url());
        opts.redis = Some(format!(
            "sentinel = {{ master_name = \"fgm\", addrs = [\"{}\"] }}\ntimeout = \"300ms\"",
            rs.addr()
        ));
        gw.push(GatewayProcess::start(&opts).await);
    }
    let token = gw[0].register_device("sn-1").await;
    let ok = answers_within_1s(&gw[1], &token, 200).await;
    assert!(ok.is_some(), "device replicated through the master");
    // Let the replica catch up (replication is asynchronous), then kill the master.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = rs.master.port;
    rs.master.kill();
    let moved = within(Duration::from_secs(20), || async {
        rs.master_port().is_some_and(|p| p == rs.replica.port)
    })
    .await;
    assert!(
        moved.is_some(),
        "sentinel promoted the replica (old master {old})"
    );
    writes_resume_after_failover(&gw, "sn-2").await;
    assert_eq!(
        use_token(&gw[1], &token).await,
        200,
        "old tokens still work"
    );
    // A revocation on node 1 reaches node 0 within a second.
    let r = gw[1]
        .admin(Method::POST, "/admin/v1/devices/sn-1/revoke", None)
        .await;
    assert_eq!(r.status(), 200);
    let took = answers_within_1s(&gw[0], &token, 401).await;
    assert!(took.is_some(), "revocation after the failover");
}

/// A live node keeps its lease however long a request holds it: heartbeats refresh it past
/// `lease_ttl`, so other nodes cannot be granted it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_nodes_lease_outlives_lease_ttl() {
    use futures_util::StreamExt;
    let up = sandbox_upstream(SandboxConfig {
        sse_event_delay: Duration::from_millis(400),
        ..Default::default()
    })
    .await;
    let redis = RedisServer::start();
    let gw = nodes(
        &up,
        &redis,
        2,
        "lease_size = { requests = 2 }\nlease_idle = \"1s\"\nlease_ttl = \"2s\"",
    )
    .await;
    let token = gw[0].register_device("cl-live").await;
    add_rule(&gw[0], "cl-live", "requests", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Node 0 leases both requests and holds one with a long stream.
    let r = chat(&gw[0], &token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let _first = body.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await; // > lease_ttl, stream still open
    let (ok, refused, other) = hammer(&gw[1..], &token, 2).await;
    assert_eq!(
        (ok, refused, other),
        (0, 2, 0),
        "node 1 was granted node 0's live lease"
    );
    drop(body);
}

/// Nodes on a Redis Cluster (every node of it as a seed), with the cluster's password from
/// `password_env` if it has one.
async fn cluster_nodes(
    up: &SandboxHandle,
    rc: &RedisCluster,
    n: usize,
    password: Option<&str>,
) -> Vec<GatewayProcess> {
    let seeds: Vec<String> = rc.seeds().iter().map(|s| format!("\"{s}\"")).collect();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut opts = GatewayOptions::new(&up.base_url());
        opts.redis = Some(format!(
            "cluster = [{}]\ntimeout = \"300ms\"{}",
            seeds.join(", "),
            if password.is_some() {
                "\npassword_env = \"FG_TEST_REDIS_PW\""
            } else {
                ""
            }
        ));
        // Trusts the nodes' CA if the cluster speaks TLS.
        opts.env = vec![(
            "SSL_CERT_FILE".into(),
            fixture_path(TlsFiles::REDIS_NODE.ca).display().to_string(),
        )];
        if let Some(p) = password {
            opts.env.push(("FG_TEST_REDIS_PW".into(), p.into()));
        }
        out.push(GatewayProcess::start(&opts).await);
    }
    out
}

/// On a Redis Cluster (3 masters, 3 replicas): devices and revocations reach every node within
/// 1 s, a quota of 100 holds exactly across three nodes, and the per-device usage keys spread
/// over the shards while the registry stays in one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_shares_devices_quotas_and_revocations() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let rc = RedisCluster::start(3);
    let gw = cluster_nodes(&up, &rc, 3, None).await;

    let token = gw[0].register_device("rc-1").await;
    for (i, node) in gw.iter().enumerate() {
        let ok = answers_within_1s(node, &token, 200).await;
        assert!(
            ok.is_some(),
            "node {i} accepts a device registered on node 0"
        );
    }
    add_rule(&gw[1], "rc-1", "requests", 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the rule reaches every node
    let (ok, refused, other) = hammer(&gw, &token, 60).await;
    assert_eq!(other, 0, "only 200 and 429 answers");
    assert_eq!(ok, 100, "exactly the quota admitted ({refused} refused)");
    let owner = rc
        .owner("fleetgate:use:rc-1")
        .expect("a master serves every slot");
    assert_charged(&rc.nodes[owner], "rc-1", "requests", 100).await;

    // Revoke on node 1: nodes 0 and 2 refuse the token within 1 s.
    let r = gw[1]
        .admin(Method::POST, "/admin/v1/devices/rc-1/revoke", None)
        .await;
    assert_eq!(r.status(), 200);
    for i in [0, 2] {
        let took = answers_within_1s(&gw[i], &token, 401).await;
        assert!(
            took.is_some(),
            "node {i} still accepts a revoked token after 1 s"
        );
    }

    // Twelve more devices, one request each: their usage keys land on more than one shard.
    gw[0]
        .register_devices((0..12).map(|i| format!("rc-s{i}")))
        .await;
    for i in 0..12 {
        add_rule(&gw[0], &format!("rc-s{i}"), "requests", 5).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // devices and rules reach every node
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..12 {
        let id = format!("rc-s{i}");
        let t = gw[0].device_token(&id).await;
        let node = &gw[i % 3];
        let admitted = answers_within_1s(node, &t, 200).await;
        assert!(admitted.is_some(), "{id} served by node {}", i % 3);
        let key = format!("fleetgate:use:{id}");
        let owner = rc.owner(&key).expect("a master serves every slot");
        let stored = within(Duration::from_secs(3), || async {
            rc.nodes[owner].cli(&["EXISTS", &key]) == "1"
        })
        .await;
        assert!(stored.is_some(), "{key} reported");
        owners.insert(owner);
    }
    assert!(owners.len() > 1, "usage keys all on one shard: {owners:?}");
    let registry = rc.owner("{fleetgate}:devs");
    assert_eq!(
        rc.owner("{fleetgate}:dev:rc-s3"),
        registry,
        "registry in one slot"
    );
}

/// On a password-protected Redis Cluster, the master holding the registry dies: its replica
/// takes over, and the nodes follow (admin writes work again, the change feed reaches the
/// other node, quotas keep counting). The password never appears in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_failover_is_followed() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let mut rc = RedisCluster::start_with(3, Some("cl-s3cret-pw"), false);
    let gw = cluster_nodes(&up, &rc, 2, Some("cl-s3cret-pw")).await;
    let token = gw[0].register_device("rf-1").await;
    add_rule(&gw[0], "rf-1", "requests", 50).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, _, other) = hammer(&gw, &token, 10).await;
    assert_eq!((ok, other), (20, 0));

    let registry = rc.owner("{fleetgate}:devs").expect("registry stored");
    // Let the replica catch up (replication is asynchronous), then kill the master.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rc.nodes[registry].kill();
    let promoted = within(Duration::from_secs(20), || async {
        rc.owner("{fleetgate}:devs").is_some()
    })
    .await;
    assert!(
        promoted.is_some(),
        "a replica took over the registry's slots"
    );
    writes_resume_after_failover(&gw, "rf-2").await;
    // Quotas keep counting: 30 of the 50 are left, across both nodes.
    let (more, refused, other) = hammer(&gw, &token, 25).await;
    assert_eq!(other, 0);
    assert_eq!(
        more, 30,
        "the rest of the quota after the failover ({refused} refused)"
    );
    for n in &gw {
        assert!(!n.log().contains("cl-s3cret-pw"), "password in the log");
    }
}

/// A Redis Cluster that speaks only TLS (clients, replication, cluster bus) and wants a
/// password: nodes connect through `rediss://` seeds and hold a quota exactly across two
/// nodes; the password never appears in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_over_tls_with_a_password() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let rc = RedisCluster::start_with(3, Some("tls-cl-pw"), true);
    assert!(rc.seeds().iter().all(|s| s.starts_with("rediss://")));
    let gw = cluster_nodes(&up, &rc, 2, Some("tls-cl-pw")).await;
    let token = gw[0].register_device("rt-1").await;
    add_rule(&gw[0], "rt-1", "requests", 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, refused, other) = hammer(&gw, &token, 4).await;
    assert_eq!((ok, refused, other), (5, 3, 0), "5 of 8 across two nodes");
    let owner = rc
        .owner("fleetgate:use:rt-1")
        .expect("a master serves every slot");
    assert_charged(&rc.nodes[owner], "rt-1", "requests", 5).await;
    for n in &gw {
        assert!(!n.log().contains("tls-cl-pw"), "password in the log");
    }
}

/// `fleetgate_cluster_nodes` as `node` last saw it.
async fn cluster_nodes_seen(node: &GatewayProcess) -> Option<u64> {
    let m = node.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix("fleetgate_cluster_nodes "))
        .and_then(|v| v.parse().ok())
}

/// `n` workflow requests of one device sent to `node` at once; how many were admitted.
async fn workflow_burst(node: &GatewayProcess, token: &str, n: usize) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let req = node
            .http
            .post(format!("{}/v1/workflow/run", node.device))
            .bearer_auth(token)
            .json(&json!({"workflow_id": "w"}));
        tasks.push(tokio::spawn(async move {
            req.send().await.map(|r| r.status().as_u16())
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(matches!(t.await.unwrap(), Ok(200)));
    }
    ok
}

/// The fleet cap holds for the cluster, not per node: two nodes each enforce half of
/// `fleet_workflow_qps`, so together they admit about the cap (not twice it). A node that
/// stops leaves at once, and the other takes the whole cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_the_fleet_cap() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let redis = RedisServer::start();
    let mut gw = Vec::new();
    for _ in 0..2 {
        let mut opts = GatewayOptions::new(&up.base_url());
        opts.redis = Some(format!("url = \"{}\"\n", redis.url()));
        opts.extra_toml = "[rate_limits]\nfleet_workflow_qps = 10\n".into();
        gw.push(GatewayProcess::start(&opts).await);
    }
    let token = gw[0].register_device("cl-fleet").await;
    for node in &gw {
        let seen = within(Duration::from_secs(3), || async {
            cluster_nodes_seen(node).await == Some(2)
        })
        .await;
        assert!(seen.is_some(), "both nodes see two members");
    }
    // Let both buckets fill (5 each), then hit both nodes at once. The buckets refill at the
    // cap (10/s together) while the burst is answered: that much more may pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = Instant::now();
    let (a, b) = tokio::join!(
        workflow_burst(&gw[0], &token, 20),
        workflow_burst(&gw[1], &token, 20)
    );
    let refill = (start.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        a + b >= 10 && a + b <= 10 + refill + 1,
        "the cluster admits the cap of 10 (+{refill} refilled), not twice it: {a} + {b}"
    );

    gw[1].signal("TERM");
    let alone = within(Duration::from_millis(8000), || async {
        cluster_nodes_seen(&gw[0]).await == Some(1)
    })
    .await;
    // Leaving at once takes up to one beat of the other node (1 s); dropping out as a silent
    // member would take `STALE` (3 s) and more.
    assert!(
        alone.is_some_and(|t| t < Duration::from_millis(2500)),
        "a node that stops leaves at once: {alone:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = Instant::now();
    let whole = workflow_burst(&gw[0], &token, 30).await;
    let refill = (start.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        whole >= 10 && whole <= 10 + refill,
        "the last node takes the whole cap of 10 (+{refill} refilled): {whole}"
    );
}
