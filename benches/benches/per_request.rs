//! The gateway's own bookkeeping on every proxied request, beside the spelling it replaced:
//! metric updates through `metrics::PerRequest` (children resolved once) against
//! `with_label_values` per update; `logid::new_logid`; and token verification through the
//! verified-token memo (`gateway::verifier`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use gateway::metrics::{Metrics, record_usage, status_class};
use gateway::proxy::ctx::Protocol;
use policy::metering::Usage;
use policy::route::RouteClass;

/// What `proxy::settle::finish` and `upstream_request_filter` update for one REST request.
fn metrics(c: &mut Criterion) {
    let m = Metrics::register(prometheus::Registry::new()).unwrap();
    let usage = Usage::default();
    c.bench_function("per_request/metrics_labelled", |b| {
        b.iter(|| {
            let (route, proto, status) = (black_box("audio"), black_box("rest"), black_box(200));
            m.overhead.with_label_values(&[route]).observe(0.0001);
            m.requests
                .with_label_values(&[route, proto, status_class(status)])
                .inc();
            m.duration.with_label_values(&[route, proto]).observe(0.001);
            m.first_byte
                .with_label_values(&[route, proto])
                .observe(0.0009);
            m.relayed_bytes.with_label_values(&["uplink"]).inc_by(300);
            m.relayed_bytes
                .with_label_values(&["downlink"])
                .inc_by(1000);
            m.metered.with_label_values(&["requests"]).inc();
        })
    });
    c.bench_function("per_request/metrics_children", |b| {
        b.iter(|| {
            let (route, proto, status) = (
                black_box(Some(RouteClass::Audio)),
                black_box(Protocol::Rest),
                black_box(200),
            );
            let per = &m.per_request;
            per.overhead(RouteClass::Audio, 0.0001);
            per.count(route, proto, status);
            per.duration(route, proto, 0.001);
            per.first_byte(route, proto, 0.0009);
            per.relayed(300, 1000);
            record_usage(&m, &usage, 0);
        })
    });
}

fn logid(c: &mut Criterion) {
    let ms = 1_795_239_134_000u64;
    c.bench_function("per_request/logid", |b| {
        b.iter(|| gateway::logid::new_logid(black_box(ms)))
    });
}

/// Token verification through `gateway::verifier`: a memo hit (the common case: a device sends
/// the same token on every request), the full check with the memo off, and a miss in a memo
/// whose one slot another token keeps taking (the worst case: more active tokens than slots).
fn verifier(c: &mut Criterion) {
    use gateway::verifier::TokenVerifier;
    use policy::ids::DeviceId;
    use policy::token::{Claims, ISSUER, Keyring};
    const NOW: u64 = 1_795_239_134;
    let ring = || Keyring::new([("k1", &[7u8; 32][..])], "k1").unwrap();
    let mint = |device: &str| {
        ring().mint(&Claims {
            iss: ISSUER.to_owned(),
            sub: DeviceId::parse(device).unwrap(),
            iat: NOW - 60,
            exp: NOW + 3600,
            generation: 3,
            cred: Some("cred-1".to_owned()),
            cred_serial: 1,
            jti: format!("{:032x}", 0x1234_5678_9abc_u128),
        })
    };
    let (a, b) = (mint("speaker-0001234"), mint("speaker-0001235"));
    let memo = TokenVerifier::new(ring(), 65_536);
    memo.verify(&a, NOW, 60).unwrap();
    c.bench_function("verifier/memo_hit", |bn| {
        bn.iter(|| memo.verify(black_box(&a), NOW, 60).unwrap())
    });
    let off = TokenVerifier::new(ring(), 0);
    c.bench_function("verifier/memo_off", |bn| {
        bn.iter(|| off.verify(black_box(&a), NOW, 60).unwrap())
    });
    let one_slot = TokenVerifier::new(ring(), 1);
    let mut turn = false;
    c.bench_function("verifier/memo_miss_thrashing", |bn| {
        bn.iter(|| {
            turn = !turn;
            let t = if turn { &a } else { &b };
            one_slot.verify(black_box(t), NOW, 60).unwrap()
        })
    });
}

criterion_group!(benches, metrics, logid, verifier);
criterion_main!(benches);
