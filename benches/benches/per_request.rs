//! The gateway's own bookkeeping on every proxied request, beside the spelling it replaced:
//! metric updates through `metrics::PerRequest` (children resolved once) against
//! `with_label_values` per update; and `logid::new_logid`.

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

criterion_group!(benches, metrics, logid);
criterion_main!(benches);
