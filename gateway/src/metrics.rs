//! Prometheus metrics, registered on a registry passed in (no globals). Label values come
//! from closed enums only; device ids never become labels. The catalog is `docs/metrics.md`.

use std::sync::{Arc, OnceLock};

use policy::route::RouteClass;
use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::proxy::ctx::Protocol;

/// Latency buckets in seconds: 100 µs .. 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Cheap to clone: every field is a handle to shared counters.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `fleetgate_requests_total{route,protocol,status_class}`
    pub requests: IntCounterVec,
    /// `fleetgate_denials_total{reason}`
    pub denials: IntCounterVec,
    /// `fleetgate_request_duration_seconds{route,protocol}`: whole request, device's view.
    pub duration: HistogramVec,
    /// `fleetgate_upstream_first_byte_seconds{route,protocol}`
    pub first_byte: HistogramVec,
    /// `fleetgate_gateway_overhead_seconds{route}`: admission to the upstream request
    /// (auth, limits, quota hold, credential), REST and SSE.
    pub overhead: HistogramVec,
    /// `fleetgate_websocket_frames_total{direction}`
    pub ws_frames: IntCounterVec,
    /// `fleetgate_websocket_sessions` (gauge)
    pub ws_sessions: IntGauge,
    /// `fleetgate_sse_streams` (gauge)
    pub sse_streams: IntGauge,
    /// `fleetgate_relayed_bytes_total{direction}`
    pub relayed_bytes: IntCounterVec,
    /// `fleetgate_device_tls_handshakes_total{result}` (`[device_listener.tls]`)
    pub device_tls_handshakes: IntCounterVec,
    /// `fleetgate_tokens_issued_total{grant}`
    pub tokens_issued: IntCounterVec,
    /// `fleetgate_upstream_token_exchanges_total{result}` (jwt mode)
    pub upstream_token_exchanges: IntCounterVec,
    /// `fleetgate_upstream_token_cache_requests_total{result}` (jwt mode: hit, miss)
    pub upstream_token_cache: IntCounterVec,
    /// `fleetgate_quota_sync_runs_total{result}`
    pub quota_sync_runs: IntCounterVec,
    /// `fleetgate_quota_sync_last_success_timestamp_seconds`
    pub quota_sync_last_success: IntGauge,
    /// `fleetgate_quota_rules{source}`
    pub quota_rules: prometheus::IntGaugeVec,
    /// `fleetgate_quota_ledger_entries{kind}`
    pub quota_ledger_entries: prometheus::IntGaugeVec,
    /// `fleetgate_store_errors_total{table}`
    pub store_errors: IntCounterVec,
    /// `fleetgate_cluster_errors_total{op}`
    pub cluster_errors: IntCounterVec,
    /// `fleetgate_cluster_redis_up`
    pub cluster_redis_up: IntGauge,
    /// `fleetgate_cluster_nodes`
    pub cluster_nodes: IntGauge,
    /// `fleetgate_metered_units_total{meter}`
    pub metered: IntCounterVec,
    /// `fleetgate_usage_missing_total{protocol}`: answers (WebSocket: chat turns) that should
    /// have reported usage but did not (settled with an estimate, never silently free).
    pub usage_missing: IntCounterVec,
    /// `fleetgate_metering_errors_total{protocol}`
    pub metering_errors: IntCounterVec,
    /// `fleetgate_token_endpoint_errors_total{error_code}`
    pub token_errors: IntCounterVec,
    /// `fleetgate_upstream_errors_total{kind}`
    pub upstream_errors: IntCounterVec,
    /// `fleetgate_websocket_sessions_closed_total{by}`
    pub ws_closed: IntCounterVec,
    /// `fleetgate_admin_requests_total{status_class}`
    pub admin_requests: IntCounterVec,
    /// `fleetgate_devices` (gauge): registered devices.
    pub devices: IntGauge,
    /// `fleetgate_config_reloads_total`
    pub reloads: IntCounter,
    /// The children of the vectors above that every proxied request updates.
    pub per_request: Arc<PerRequest>,
    /// `process_*` (standard names), refreshed from `/proc/self` at every scrape.
    process: ProcessMetrics,
}

/// The standard Prometheus process metrics, read from `/proc/self` (Linux) at scrape time.
#[derive(Clone)]
struct ProcessMetrics {
    cpu_seconds: prometheus::Gauge,
    resident_bytes: IntGauge,
    virtual_bytes: IntGauge,
    open_fds: IntGauge,
    threads: IntGauge,
    start_time: IntGauge,
}

impl ProcessMetrics {
    fn register(r: &Registry) -> prometheus::Result<ProcessMetrics> {
        let cpu = prometheus::Gauge::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        )?;
        r.register(Box::new(cpu.clone()))?;
        Ok(ProcessMetrics {
            cpu_seconds: cpu,
            resident_bytes: gauge(
                r,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            )?,
            virtual_bytes: gauge(
                r,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            )?,
            open_fds: gauge(r, "process_open_fds", "Number of open file descriptors.")?,
            threads: gauge(r, "process_threads", "Number of OS threads.")?,
            start_time: gauge(
                r,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )?,
        })
    }

    /// Best effort: on systems without `/proc` the gauges stay at 0.
    fn refresh(&self) {
        const TICKS_PER_S: f64 = 100.0; // USER_HZ on Linux
        const PAGE: i64 = 4096;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which is in parentheses and may hold spaces).
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            // f[0] = state (field 3); utime = field 14 → f[11], stime → f[12], threads → f[17],
            // starttime → f[19], vsize → f[20], rss pages → f[21].
            self.cpu_seconds
                .set((num(11) + num(12)) as f64 / TICKS_PER_S);
            self.threads.set(num(17));
            self.virtual_bytes.set(num(20));
            self.resident_bytes.set(num(21) * PAGE);
            if let Some(boot) = boot_time() {
                self.start_time.set(boot + num(19) / TICKS_PER_S as i64);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
    }
}

fn boot_time() -> Option<i64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn register(registry: Registry) -> prometheus::Result<Metrics> {
        let r = &registry;
        let requests = counter_vec(
            r,
            "fleetgate_requests_total",
            "Device requests and WebSocket sessions by route class, protocol and status class.",
            &["route", "protocol", "status_class"],
        )?;
        let duration = histogram_vec(
            r,
            "fleetgate_request_duration_seconds",
            "Device-observed request duration (REST/SSE; WebSocket: session length).",
            &["route", "protocol"],
        )?;
        let first_byte = histogram_vec(
            r,
            "fleetgate_upstream_first_byte_seconds",
            "Time from admission to the upstream's response header.",
            &["route", "protocol"],
        )?;
        let overhead = histogram_vec(
            r,
            "fleetgate_gateway_overhead_seconds",
            "Time the gateway spends before sending a request upstream (admission, limits, quota hold, upstream credential).",
            &["route"],
        )?;
        let relayed_bytes = counter_vec(
            r,
            "fleetgate_relayed_bytes_total",
            "Bytes relayed, by direction (uplink = device to upstream).",
            &["direction"],
        )?;
        let metered = counter_vec(
            r,
            "fleetgate_metered_units_total",
            "Metered consumption, by meter (llm_input_tokens, llm_output_tokens, audio_in_ms, audio_out_ms, tts_chars, voice_session_ms, requests).",
            &["meter"],
        )?;
        let per_request = Arc::new(PerRequest::new(
            &requests,
            &duration,
            &first_byte,
            &overhead,
            &relayed_bytes,
            &metered,
        ));
        let m = Metrics {
            requests,
            duration,
            first_byte,
            overhead,
            relayed_bytes,
            metered,
            per_request,
            denials: counter_vec(
                r,
                "fleetgate_denials_total",
                "Requests refused by the gateway, by deny reason.",
                &["reason"],
            )?,
            ws_frames: counter_vec(
                r,
                "fleetgate_websocket_frames_total",
                "WebSocket frames relayed, by direction (uplink = device to upstream).",
                &["direction"],
            )?,
            ws_sessions: gauge(
                r,
                "fleetgate_websocket_sessions",
                "Open WebSocket sessions.",
            )?,
            sse_streams: gauge(r, "fleetgate_sse_streams", "Open SSE streams.")?,
            device_tls_handshakes: counter_vec(
                r,
                "fleetgate_device_tls_handshakes_total",
                "TLS handshakes on the device listener: ok, failed (refused certificate, not TLS, protocol error), timeout.",
                &["result"],
            )?,
            tokens_issued: counter_vec(
                r,
                "fleetgate_tokens_issued_total",
                "Gateway access tokens issued, by grant.",
                &["grant"],
            )?,
            upstream_token_exchanges: counter_vec(
                r,
                "fleetgate_upstream_token_exchanges_total",
                "Upstream OAuth token exchanges (jwt mode), by result: ok, refused, error.",
                &["result"],
            )?,
            upstream_token_cache: counter_vec(
                r,
                "fleetgate_upstream_token_cache_requests_total",
                "Upstream token cache lookups (jwt mode), by result: hit, miss.",
                &["result"],
            )?,
            quota_sync_runs: counter_vec(
                r,
                "fleetgate_quota_sync_runs_total",
                "Upstream quota rule syncs, by result (ok, error).",
                &["result"],
            )?,
            quota_sync_last_success: gauge(
                r,
                "fleetgate_quota_sync_last_success_timestamp_seconds",
                "Unix time of the last successful upstream quota rule sync.",
            )?,
            quota_rules: {
                let g = prometheus::IntGaugeVec::new(
                    Opts::new(
                        "fleetgate_quota_rules",
                        "Quota rules in effect, by source (local, upstream).",
                    ),
                    &["source"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            quota_ledger_entries: {
                let g = prometheus::IntGaugeVec::new(
                    Opts::new(
                        "fleetgate_quota_ledger_entries",
                        "Quota ledger memory, by kind: open (holds of requests in flight), settled (finished request ids remembered for idempotent settlement; bounded by count and age).",
                    ),
                    &["kind"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            store_errors: counter_vec(
                r,
                "fleetgate_store_errors_total",
                "Embedded store write failures, by table (devices, rules, usage).",
                &["table"],
            )?,
            cluster_errors: counter_vec(
                r,
                "fleetgate_cluster_errors_total",
                "Cluster mode: failed Redis operations, by operation (admin, feed, jti, lease, report).",
                &["op"],
            )?,
            cluster_redis_up: gauge(
                r,
                "fleetgate_cluster_redis_up",
                "Cluster mode: 1 while the last Redis command succeeded, 0 while Redis is unreachable.",
            )?,
            cluster_nodes: gauge(
                r,
                "fleetgate_cluster_nodes",
                "Cluster mode: live nodes sharing the fleet request caps, as this node last saw them.",
            )?,
            usage_missing: counter_vec(
                r,
                "fleetgate_usage_missing_total",
                "Streams, workflow answers or WebSocket chat turns whose usage was never reported (charged an estimate), by protocol.",
                &["protocol"],
            )?,
            metering_errors: counter_vec(
                r,
                "fleetgate_metering_errors_total",
                "Answers the meters could not read (malformed or over a bound), by protocol.",
                &["protocol"],
            )?,
            token_errors: counter_vec(
                r,
                "fleetgate_token_endpoint_errors_total",
                "Token endpoint refusals, by OAuth error code.",
                &["error_code"],
            )?,
            upstream_errors: counter_vec(
                r,
                "fleetgate_upstream_errors_total",
                "Upstream failures, by kind.",
                &["kind"],
            )?,
            ws_closed: counter_vec(
                r,
                "fleetgate_websocket_sessions_closed_total",
                "WebSocket sessions ended, by who ended them.",
                &["by"],
            )?,
            admin_requests: counter_vec(
                r,
                "fleetgate_admin_requests_total",
                "Admin API requests by status class.",
                &["status_class"],
            )?,
            devices: gauge(r, "fleetgate_devices", "Registered devices.")?,
            reloads: {
                let c =
                    IntCounter::new("fleetgate_config_reloads_total", "Configuration reloads.")?;
                r.register(Box::new(c.clone()))?;
                c
            },
            process: ProcessMetrics::register(r)?,
            registry,
        };
        for reason in policy::decision::DenyReason::ALL {
            m.denials.with_label_values(&[reason.code()]);
        }
        Ok(m)
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        self.process.refresh();
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "Metrics encoding failed.");
        }
        buf
    }
}

/// Adds a request's consumption to `fleetgate_metered_units_total`.
pub fn record_usage(m: &Metrics, u: &policy::metering::Usage, voice_session_ms: u64) {
    let values = [
        u.llm_input_tokens,
        u.llm_output_tokens,
        u.audio_in_ms,
        u.audio_out_ms,
        u.tts_chars,
        voice_session_ms,
        1, // requests
    ];
    for (i, (meter, v)) in METERS.iter().zip(values).enumerate() {
        if v > 0 {
            m.per_request.metered.with(i, &[meter], |c| c.inc_by(v));
        }
    }
}

/// `fleetgate_metered_units_total{meter}` values, in [`record_usage`]'s order.
const METERS: [&str; 7] = [
    "llm_input_tokens",
    "llm_output_tokens",
    "audio_in_ms",
    "audio_out_ms",
    "tts_chars",
    "voice_session_ms",
    "requests",
];

/// `status_class` label values, indexed by [`status_class_index`].
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

fn status_class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 5,
    }
}

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES
        .get(status_class_index(status))
        .copied()
        .unwrap_or("none")
}

/// A metric vector's children, resolved once per label combination on first use (so `/metrics`
/// still shows only the series that happened) instead of a label-map lookup per update, which
/// hashes every label value, takes a read lock and clones an `Arc`. Combinations are numbered
/// by the caller from closed enums; the labels passed with an index must always be the same.
pub struct Children<M> {
    resolve: Resolve<M>,
    cells: Box<[OnceLock<M>]>,
}

/// `with_label_values` of the vector a [`Children`] caches.
type Resolve<M> = Box<dyn Fn(&[&str]) -> M + Send + Sync>;

impl<M: Send + Sync + 'static> Children<M> {
    fn new<B>(vec: &MetricVec<B>, combinations: usize) -> Children<M>
    where
        B: MetricVecBuilder<M = M> + 'static,
    {
        let vec = vec.clone();
        Children {
            resolve: Box::new(move |labels| vec.with_label_values(labels)),
            cells: (0..combinations).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Runs `f` on the child for combination `index`, whose label values are `labels`.
    pub fn with(&self, index: usize, labels: &[&str], f: impl FnOnce(&M)) {
        match self.cells.get(index) {
            Some(cell) => f(cell.get_or_init(|| (self.resolve)(labels))),
            // Not a numbered combination: the plain lookup.
            None => f(&(self.resolve)(labels)),
        }
    }
}

type CounterChildren = Children<IntCounter>;
type HistogramChildren = Children<prometheus::Histogram>;

/// Route labels: `none` (refused before a route was known), then every [`RouteClass`].
const ROUTES: usize = 1 + RouteClass::ALL.len();
const PROTOCOLS: usize = 2;

fn route_index(route: Option<RouteClass>) -> usize {
    route.map_or(0, |c| 1 + c as usize)
}

/// The `route` label: the route class, or `none` when admission resolved none.
pub fn route_label(route: Option<RouteClass>) -> &'static str {
    route.map_or("none", RouteClass::as_str)
}

/// The combination number and label values of a (`route`, `protocol`) pair.
fn route_protocol(route: Option<RouteClass>, proto: Protocol) -> (usize, [&'static str; 2]) {
    (
        route_index(route) * PROTOCOLS + proto as usize,
        [route_label(route), proto.as_str()],
    )
}

/// What the REST/SSE proxy path updates on every request, as [`Children`].
pub struct PerRequest {
    requests: CounterChildren,
    duration: HistogramChildren,
    first_byte: HistogramChildren,
    overhead: HistogramChildren,
    relayed_bytes: CounterChildren,
    metered: CounterChildren,
}

impl PerRequest {
    fn new(
        requests: &IntCounterVec,
        duration: &HistogramVec,
        first_byte: &HistogramVec,
        overhead: &HistogramVec,
        relayed_bytes: &IntCounterVec,
        metered: &IntCounterVec,
    ) -> PerRequest {
        PerRequest {
            requests: Children::new(requests, ROUTES * PROTOCOLS * STATUS_CLASSES.len()),
            duration: Children::new(duration, ROUTES * PROTOCOLS),
            first_byte: Children::new(first_byte, ROUTES * PROTOCOLS),
            overhead: Children::new(overhead, ROUTES),
            relayed_bytes: Children::new(relayed_bytes, 2),
            metered: Children::new(metered, METERS.len()),
        }
    }

    /// `fleetgate_requests_total{route,protocol,status_class}` += 1.
    pub fn count(&self, route: Option<RouteClass>, proto: Protocol, status: u16) {
        let (pair, [route, proto]) = route_protocol(route, proto);
        let index = pair * STATUS_CLASSES.len() + status_class_index(status);
        let labels = [route, proto, status_class(status)];
        self.requests.with(index, &labels, IntCounter::inc);
    }

    /// `fleetgate_request_duration_seconds{route,protocol}`.
    pub fn duration(&self, route: Option<RouteClass>, proto: Protocol, seconds: f64) {
        let (index, labels) = route_protocol(route, proto);
        self.duration.with(index, &labels, |h| h.observe(seconds));
    }

    /// `fleetgate_upstream_first_byte_seconds{route,protocol}`.
    pub fn first_byte(&self, route: Option<RouteClass>, proto: Protocol, seconds: f64) {
        let (index, labels) = route_protocol(route, proto);
        self.first_byte.with(index, &labels, |h| h.observe(seconds));
    }

    /// `fleetgate_gateway_overhead_seconds{route}`.
    pub fn overhead(&self, route: RouteClass, seconds: f64) {
        let index = route_index(Some(route));
        self.overhead
            .with(index, &[route.as_str()], |h| h.observe(seconds));
    }

    /// `fleetgate_relayed_bytes_total{direction}`.
    pub fn relayed(&self, uplink: u64, downlink: u64) {
        self.relayed_bytes
            .with(0, &["uplink"], |c| c.inc_by(uplink));
        self.relayed_bytes
            .with(1, &["downlink"], |c| c.inc_by(downlink));
    }
}

/// A bounded label for a pingora error.
pub fn error_kind(e: &pingora::Error) -> &'static str {
    use pingora::ErrorType::*;
    match e.etype() {
        ConnectTimedout | ConnectRefused | ConnectError | ConnectNoRoute | TLSHandshakeFailure => {
            "connect"
        }
        ReadTimedout | WriteTimedout => "timeout",
        ConnectionClosed | ReadError | WriteError => "connection",
        HTTPStatus(_) => "status",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the gateway registers is documented in `docs/metrics.md` (the catalog
    /// operators, alerts and dashboards rely on), and every documented name is registered.
    /// (Names are read from this file's string literals: `gather()` omits vectors that have
    /// no children yet.)
    #[test]
    fn catalog_matches_the_registry() {
        let m = Metrics::register(Registry::new()).unwrap();
        drop(m); // registration itself must succeed (no duplicate names)
        let source = include_str!("metrics.rs");
        let catalog = include_str!("../../docs/metrics.md");
        let registered: Vec<&str> = source
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| {
                s.starts_with("fleetgate_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
            .collect();
        assert!(registered.len() >= 15, "{registered:?}");
        for name in &registered {
            assert!(
                catalog.contains(&format!("`{name}`")),
                "{name} is not in docs/metrics.md"
            );
        }
        for line in catalog.lines().filter(|l| l.starts_with("| `fleetgate_")) {
            let documented = line.split('`').nth(1).unwrap();
            assert!(
                registered.contains(&documented),
                "{documented} is documented but not registered"
            );
        }
    }

    #[test]
    fn status_classes() {
        for (status, class) in [
            (0, "none"),
            (99, "none"),
            (101, "1xx"),
            (200, "2xx"),
            (299, "2xx"),
            (304, "3xx"),
            (429, "4xx"),
            (502, "5xx"),
            (599, "5xx"),
            (600, "none"),
        ] {
            assert_eq!(status_class(status), class, "{status}");
        }
    }

    /// The cached children land on the same series `with_label_values` names, every
    /// combination a distinct one, and only combinations that happened are exported.
    #[test]
    fn per_request_children_are_the_labelled_series() {
        let m = Metrics::register(Registry::new()).unwrap();
        let per = &m.per_request;
        let routes = std::iter::once(None).chain(RouteClass::ALL.map(Some));
        let mut n = 0;
        for route in routes {
            for proto in [Protocol::Rest, Protocol::Sse] {
                for status in [101, 200, 302, 404, 503, 0] {
                    n += 1;
                    for _ in 0..n {
                        per.count(route, proto, status);
                    }
                    let labels = [route_label(route), proto.as_str(), status_class(status)];
                    assert_eq!(m.requests.with_label_values(&labels).get(), n, "{labels:?}");
                }
                per.duration(route, proto, 0.5);
                per.first_byte(route, proto, 0.25);
                let labels = [route_label(route), proto.as_str()];
                assert_eq!(m.duration.with_label_values(&labels).get_sample_count(), 1);
                assert_eq!(
                    m.first_byte.with_label_values(&labels).get_sample_sum(),
                    0.25
                );
            }
        }
        per.overhead(RouteClass::Voice, 0.001);
        assert_eq!(
            m.overhead.with_label_values(&["voice"]).get_sample_count(),
            1
        );
        per.relayed(3, 5);
        per.relayed(1, 1);
        assert_eq!(m.relayed_bytes.with_label_values(&["uplink"]).get(), 4);
        assert_eq!(m.relayed_bytes.with_label_values(&["downlink"]).get(), 6);
    }

    #[test]
    fn usage_is_recorded_per_meter_and_unused_meters_are_not_exported() {
        let m = Metrics::register(Registry::new()).unwrap();
        let usage = policy::metering::Usage {
            llm_output_tokens: 7,
            tts_chars: 3,
            ..Default::default()
        };
        record_usage(&m, &usage, 0);
        record_usage(&m, &usage, 40);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains("fleetgate_metered_units_total{meter=\"llm_output_tokens\"} 14"));
        assert!(text.contains("fleetgate_metered_units_total{meter=\"tts_chars\"} 6"));
        assert!(text.contains("fleetgate_metered_units_total{meter=\"voice_session_ms\"} 40"));
        assert!(text.contains("fleetgate_metered_units_total{meter=\"requests\"} 2"));
        assert!(!text.contains("meter=\"audio_in_ms\""), "{text}");
        assert!(
            !text.contains("fleetgate_gateway_overhead_seconds"),
            "untouched vectors stay empty"
        );
    }
}
