//! The Coze-compatible device token endpoint: JWT-bearer and client_credentials grants,
//! every rejection, replay, rate limits, credential removal.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use gateway_tests::*;
use reqwest::Method;
use serde_json::{Value, json};

pub(crate) const TOKEN_PATH: &str = "/api/permission/oauth2/token";
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

pub(crate) fn key(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policy/tests/keys")
            .join(name),
    )
    .unwrap()
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A compact JWT signed RS256 with the test key `rsa2048_private.pk8.der`.
pub(crate) fn rs256(header: Value, claims: Value, private: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let kp = ring::signature::RsaKeyPair::from_pkcs8(&key(private)).unwrap();
    let mut sig = vec![0u8; kp.public().modulus_len()];
    kp.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{signing_input}.{}", B64.encode(sig))
}

pub(crate) fn es256(header: Value, claims: Value) -> String {
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key("p256_private.pk8.der"),
        &rng,
    )
    .unwrap();
    let sig = kp.sign(&rng, signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", B64.encode(sig.as_ref()))
}

pub(crate) fn claims(device: &str, aud: &str) -> Value {
    let t = now();
    json!({"iss": device, "aud": aud, "iat": t, "exp": t + 3600, "jti": format!("{:x}", rand_u128())})
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    (u128::from(h.finish()) << 64) | u128::from(h.finish().rotate_left(17))
}

pub(crate) async fn exchange(gw: &GatewayProcess, jwt: &str) -> (u16, Value) {
    let r = gw
        .http
        .post(format!("{}{TOKEN_PATH}", gw.device))
        .bearer_auth(jwt)
        .json(&json!({"grant_type": JWT_BEARER, "duration_seconds": 600}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

pub(crate) async fn use_token(gw: &GatewayProcess, token: &str) -> u16 {
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

pub(crate) async fn add_key(
    gw: &GatewayProcess,
    device: &str,
    kid: &str,
    alg: &str,
    pem_file: &str,
) {
    let pem = String::from_utf8(key(pem_file)).unwrap();
    let r = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/devices/{device}/credentials"),
            Some(
                json!({"type": "public_key", "kid": kid, "algorithm": alg, "public_key_pem": pem}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// RS256 and ES256 devices exchange their own JWTs for gateway tokens that work; the answer
/// has Coze's shape with an absolute `expires_in`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_grant_issues_working_tokens() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let aud = gw.device_addr.to_string();
    gw.register_device("rsa-dev").await;
    gw.register_device("ec-dev").await;
    add_key(&gw, "rsa-dev", "r1", "RS256", "rsa2048_public_spki.pem").await;
    add_key(&gw, "ec-dev", "e1", "ES256", "p256_public_spki.pem").await;

    let jwt = rs256(
        json!({"alg": "RS256", "typ": "JWT", "kid": "r1"}),
        claims("rsa-dev", &aud),
        "rsa2048_private.pk8.der",
    );
    let (status, v) = exchange(&gw, &jwt).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    let exp = v["expires_in"].as_u64().unwrap();
    assert!(
        exp >= now() + 590 && exp <= now() + 610,
        "absolute expiry, duration honoured: {exp}"
    );
    assert_eq!(
        use_token(&gw, v["access_token"].as_str().unwrap()).await,
        200
    );

    let jwt = es256(
        json!({"alg": "ES256", "typ": "JWT", "kid": "e1"}),
        claims("ec-dev", &aud),
    );
    let (status, v) = exchange(&gw, &jwt).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        use_token(&gw, v["access_token"].as_str().unwrap()).await,
        200
    );

    // The same assertion twice: single use.
    let (status, v) = exchange(&gw, &jwt).await;
    assert_eq!(
        (status, v["error_code"].as_str()),
        (401, Some("invalid_client")),
        "{v}"
    );
    assert!(!v.to_string().contains(&jwt), "assertion echoed");
}

/// `jti` single use survives a restart of an embedded gateway: the replay cache is memory,
/// so an assertion issued before the restart (used or not) is refused after it, and a fresh
/// one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_used_before_a_restart_cannot_be_replayed_after_it() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let dir = TempDir::new();
    let mut opts = GatewayOptions::new(&up.base_url());
    opts.store_path = Some(dir.0.join("restart.redb"));
    let gw = GatewayProcess::start(&opts).await;
    let aud = gw.device_addr.to_string();
    gw.register_device("restart-dev").await;
    add_key(&gw, "restart-dev", "e1", "ES256", "p256_public_spki.pem").await;
    let used = es256(
        json!({"alg": "ES256", "typ": "JWT", "kid": "e1"}),
        claims("restart-dev", &aud),
    );
    assert_eq!(exchange(&gw, &used).await.0, 200);

    // The restarted process starts in a later second than the assertion's `iat`.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    drop(gw);
    let gw = GatewayProcess::start(&opts).await;
    // The audience is the Host the device calls (`audience_from_host`); the new process
    // listens on another port, so the replay names the old one.
    let r = gw
        .http
        .post(format!("{}{TOKEN_PATH}", gw.device))
        .header("host", &aud)
        .bearer_auth(&used)
        .json(&json!({"grant_type": JWT_BEARER, "duration_seconds": 600}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (status, v["error_code"].as_str()),
        (401, Some("invalid_client")),
        "replayed after the restart: {v}"
    );
    assert!(
        v["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("issued before the gateway started")),
        "{v}"
    );
    let fresh = es256(
        json!({"alg": "ES256", "typ": "JWT", "kid": "e1"}),
        claims("restart-dev", &gw.device_addr.to_string()),
    );
    assert_eq!(exchange(&gw, &fresh).await.0, 200, "a new assertion works");
}

/// Every way to forge or misuse an assertion is refused with Coze's OAuth error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misused_assertions_are_refused() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let aud = gw.device_addr.to_string();
    for d in ["victim", "other"] {
        gw.register_device(d).await;
    }
    add_key(&gw, "victim", "r1", "RS256", "rsa2048_public_spki.pem").await;
    let h = json!({"alg": "RS256", "typ": "JWT", "kid": "r1"});
    let t = now();
    let cases: Vec<(&str, String)> = vec![
        (
            "unknown kid",
            rs256(
                json!({"alg": "RS256", "typ": "JWT", "kid": "nope"}),
                claims("victim", &aud),
                "rsa2048_private.pk8.der",
            ),
        ),
        (
            "signed by another key",
            rs256(
                h.clone(),
                claims("victim", &aud),
                "rsa2048_other_private.pk8.der",
            ),
        ),
        (
            "wrong aud",
            rs256(
                h.clone(),
                claims("victim", "api.coze.cn.evil"),
                "rsa2048_private.pk8.der",
            ),
        ),
        (
            "expired",
            rs256(
                h.clone(),
                json!({"iss": "victim", "aud": aud, "iat": t - 7200, "exp": t - 3600, "jti": "j1"}),
                "rsa2048_private.pk8.der",
            ),
        ),
        (
            "too long-lived",
            rs256(
                h.clone(),
                json!({"iss": "victim", "aud": aud, "iat": t, "exp": t + 7200, "jti": "j2"}),
                "rsa2048_private.pk8.der",
            ),
        ),
        (
            "issued in the future",
            rs256(
                h.clone(),
                json!({"iss": "victim", "aud": aud, "iat": t + 600, "exp": t + 900, "jti": "j3"}),
                "rsa2048_private.pk8.der",
            ),
        ),
        (
            "iss of a device without that key",
            rs256(h.clone(), claims("other", &aud), "rsa2048_private.pk8.der"),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                B64.encode(json!({"alg": "none", "kid": "r1"}).to_string()),
                B64.encode(claims("victim", &aud).to_string())
            ),
        ),
        (
            "ES256 header on an RS256 key",
            rs256(
                json!({"alg": "ES256", "typ": "JWT", "kid": "r1"}),
                claims("victim", &aud),
                "rsa2048_private.pk8.der",
            ),
        ),
    ];
    for (name, jwt) in cases {
        let (status, v) = exchange(&gw, &jwt).await;
        assert!(status == 401 || status == 400, "{name}: {status} {v}");
        assert!(
            v["error_code"].is_string() && v["error_message"].is_string(),
            "{name}: {v}"
        );
        assert!(!v.to_string().contains(&jwt), "{name}: assertion echoed");
    }
    // HS256 "signed" with the public key as the HMAC secret (the classic RS/HS confusion).
    let pem = key("rsa2048_public_spki.pem");
    let input = format!(
        "{}.{}",
        B64.encode(json!({"alg": "HS256", "typ": "JWT", "kid": "r1"}).to_string()),
        B64.encode(claims("victim", &aud).to_string())
    );
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &pem),
        input.as_bytes(),
    );
    let (status, _) = exchange(&gw, &format!("{input}.{}", B64.encode(tag.as_ref()))).await;
    assert_eq!(status, 401, "HS256 with the public key");
    // Missing assertion, unknown grant.
    let r = gw
        .http
        .post(format!("{}{TOKEN_PATH}", gw.device))
        .json(&json!({"grant_type": JWT_BEARER}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = gw
        .http
        .post(format!("{}{TOKEN_PATH}", gw.device))
        .json(&json!({"grant_type": "password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_code"],
        "unsupported_grant_type"
    );
}

/// Secrets: generated once, stored hashed, exchanged with client_credentials; a wrong secret
/// or unknown device is `invalid_client`; a disabled device is `access_deny`; deleting the
/// credential kills the tokens obtained through it but not admin-minted ones, and a new
/// credential under the same `kid` does not bring them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_grant_and_credential_removal() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let admin_token = gw.register_device("sec-dev").await;
    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/devices/sec-dev/credentials",
            Some(json!({"type": "secret"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let (kid, secret) = (
        v["kid"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    );
    let listed = gw
        .admin(Method::GET, "/admin/v1/devices/sec-dev", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        listed.contains(&kid) && !listed.contains(&secret),
        "the secret is shown once only"
    );
    assert!(!gw.log().contains(&secret), "secret in logs");

    let grant = |id: &str, s: &str| json!({"grant_type": "client_credentials", "client_id": id, "client_secret": s, "duration_seconds": 300});
    let ask = |body: Value| {
        let http = gw.http.clone();
        let url = format!("{}{TOKEN_PATH}", gw.device);
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = ask(grant("sec-dev", &secret)).await;
    assert_eq!(status, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(use_token(&gw, &token).await, 200);
    assert!(
        !gw.log().contains(&token) && !gw.log().contains(&secret),
        "token or secret in logs"
    );
    assert_eq!(
        ask(grant("sec-dev", "fgs_wrong")).await.1["error_code"],
        "invalid_client"
    );
    assert_eq!(
        ask(grant("no-such-device", &secret)).await.1["error_code"],
        "invalid_client"
    );

    gw.admin(
        Method::PATCH,
        "/admin/v1/devices/sec-dev",
        Some(json!({"enabled": false})),
    )
    .await;
    let (status, v) = ask(grant("sec-dev", &secret)).await;
    assert_eq!(
        (status, v["error_code"].as_str()),
        (403, Some("access_deny"))
    );
    gw.admin(
        Method::PATCH,
        "/admin/v1/devices/sec-dev",
        Some(json!({"enabled": true})),
    )
    .await;
    let token = ask(grant("sec-dev", &secret)).await.1["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin_token = {
        let _ = admin_token; // minted before the disable: revoked by it
        gw.device_token("sec-dev").await
    };
    let r = gw
        .admin(
            Method::DELETE,
            &format!("/admin/v1/devices/sec-dev/credentials/{kid}"),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        use_token(&gw, &token).await,
        401,
        "token obtained through the deleted secret"
    );
    assert_eq!(
        use_token(&gw, &admin_token).await,
        200,
        "admin-minted token unaffected"
    );
    assert_eq!(ask(grant("sec-dev", &secret)).await.0, 401);

    // Key replacement under the same kid: the new secret works, the old one's tokens stay dead.
    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/devices/sec-dev/credentials",
            Some(json!({"type": "secret", "kid": kid})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let new_secret = r.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        use_token(&gw, &token).await,
        401,
        "a new credential with the deleted one's kid revived its token"
    );
    let (status, v) = ask(grant("sec-dev", &new_secret)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        use_token(&gw, v["access_token"].as_str().unwrap()).await,
        200
    );
    assert_eq!(ask(grant("sec-dev", &secret)).await.0, 401, "old secret");
}

/// The endpoint cannot be used to brute-force secrets: per-device attempts are limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_is_rate_limited_per_device() {
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    gw.register_device("brute").await;
    let mut statuses = Vec::new();
    for i in 0..12 {
        let r = gw
            .http
            .post(format!("{}{TOKEN_PATH}", gw.device))
            .json(&json!({"grant_type": "client_credentials", "client_id": "brute", "client_secret": format!("guess-{i}")}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some());
        }
        statuses.push(r.status().as_u16());
    }
    assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "{statuses:?}");
    assert!(
        gw.metrics()
            .await
            .contains("fleetgate_token_endpoint_errors_total{error_code=\"rate_limited\"}")
    );

    // The limit is per device *and* address: requests in the device's name from elsewhere
    // cannot lock the device itself out (127.0.0.2 is another loopback address).
    let secret = gw
        .admin(
            Method::POST,
            "/admin/v1/devices/brute/credentials",
            Some(json!({"type": "secret"})),
        )
        .await
        .json::<Value>()
        .await
        .unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let elsewhere = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = elsewhere
        .post(format!("{}{TOKEN_PATH}", gw.device))
        .json(&json!({"grant_type": "client_credentials", "client_id": "brute", "client_secret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the device was locked out by someone else's guesses"
    );
    // An id that cannot be a device is an unknown client.
    let r = gw
        .http
        .post(format!("{}{TOKEN_PATH}", gw.device))
        .json(&json!({"grant_type": "client_credentials", "client_id": "x".repeat(4000), "client_secret": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// `fleetgate device keygen` and `device assertion` are all a device without an SDK needs:
/// the printed body registers the key, and the assertion buys a working token, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_helpers_make_a_key_and_an_assertion_the_gateway_accepts() {
    use std::process::Command;
    let up = sandbox_upstream(SandboxConfig::default()).await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    gw.register_device("cli-dev").await;
    let dir = TempDir::new();
    let key = dir.0.join("device.pem");
    let out = succeeded(
        Command::new(fleetgate_bin())
            .args(["device", "keygen", "--kid", "hw1", "--out"])
            .arg(&key)
            .output()
            .unwrap(),
    );
    let private = std::fs::read_to_string(&key).unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !out.stdout.windows(11).any(|w| w == b"PRIVATE KEY"),
        "private key printed"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = Command::new(fleetgate_bin())
        .args(["device", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing key file was overwritten"
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), private);

    let r = gw
        .admin(
            Method::POST,
            "/admin/v1/devices/cli-dev/credentials",
            Some(body),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let aud = gw.device.trim_start_matches("http://").to_owned();
    let out = succeeded(
        Command::new(fleetgate_bin())
            .args([
                "device",
                "assertion",
                "--device",
                "cli-dev",
                "--kid",
                "hw1",
                "--aud",
                &aud,
                "--key",
            ])
            .arg(&key)
            .output()
            .unwrap(),
    );
    let jwt = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let exchange = || {
        gw.http
            .post(format!("{}{TOKEN_PATH}", gw.device))
            .bearer_auth(&jwt)
            .json(&json!({"grant_type": JWT_BEARER, "duration_seconds": 600}))
            .send()
    };
    let r = exchange().await.unwrap();
    assert_eq!(r.status(), 200);
    let token: Value = r.json().await.unwrap();
    assert_eq!(
        use_token(&gw, token["access_token"].as_str().unwrap()).await,
        200
    );
    assert_eq!(
        exchange().await.unwrap().status(),
        401,
        "the assertion is single use"
    );
}
