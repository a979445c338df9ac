//! Assembles the pingora [`Server`]: the device listener, the admin listener, and the
//! shutdown sequence; runs it until a signal.
//!
//! Port `0` in a listener address picks a free port without a race: the port is reserved by
//! binding (not listening) a socket with `SO_REUSEPORT`, and pingora's listener joins it with
//! the same option. The actual addresses are reported through [`Ready`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::TcpSocketOptions;
use pingora::proxy::http_proxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::accept::DeviceAcceptor;
use crate::admin::AdminApp;
use crate::config::GatewayConfig;
use crate::listener::DeviceApp;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::state::{GatewayState, Phase, SharedState};
use crate::upstream::ResolvedUpstream;
use crate::ws::WsRelay;

/// The addresses a started gateway listens on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ready {
    pub device_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// A socket holding a port for pingora's listener to join.
fn reserve(addr: SocketAddr) -> std::io::Result<(SocketAddr, socket2::Socket)> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    let bound = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("reserved socket has no IP address"))?;
    Ok((bound, s))
}

/// Accept backlog of the device listener: fleets reconnect in bursts (after an outage or a
/// deploy), and the kernel caps it at `net.core.somaxconn` anyway.
const DEVICE_BACKLOG: i32 = 4096;

/// Binds and listens on the device address (SO_REUSEADDR, large backlog).
fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(DEVICE_BACKLOG)?;
    Ok(s.into())
}

fn tcp_options() -> TcpSocketOptions {
    let mut o = TcpSocketOptions::default();
    o.so_reuseport = Some(true);
    o
}

/// Waits for SIGTERM (drain, then graceful stop), SIGINT/SIGQUIT (fast stop).
struct DrainOnSignal {
    state: SharedState,
}

impl DrainOnSignal {
    /// SIGTERM: readiness fails, new upgrades are refused, WebSockets get `close 1001`, SSE
    /// streams get up to the grace period to finish.
    async fn drain(&self) {
        let grace = self.state.config.grace_period;
        tracing::info!(grace_s = grace.as_secs_f64(), "SIGTERM: draining.");
        self.state.set_phase(Phase::Draining);
        let start = Instant::now();
        let m = &self.state.metrics;
        // Keep serving for `drain_delay` with readiness failed (load balancers notice), and
        // until streams end, within the grace period.
        let delay = self.state.config.drain_delay;
        while start.elapsed() < grace
            && (start.elapsed() < delay || m.ws_sessions.get() > 0 || m.sse_streams.get() > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            open_websockets = m.ws_sessions.get(),
            open_sse = m.sse_streams.get(),
            "Drain finished; stopping listeners."
        );
        // Now, not when the services stop: pingora drops their tasks at once after this
        // returns (grace period 0), which could cut the leave short.
        if let Some(cluster) = &self.state.cluster {
            cluster.leave().await;
        }
    }
}

impl DrainOnSignal {
    /// SIGHUP: re-reads the config file and applies what can change live (the token signing
    /// keys: add a new key, make it active, drop the old one after `tokens.max_ttl`). Every
    /// other change is reported as needing a restart. A bad file changes nothing.
    fn reload(&self) {
        if let Err(e) = crate::reload::reload(&self.state) {
            tracing::error!(errors = %e, "Reload refused; keeping the running configuration.");
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut quit), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("Cannot install signal handlers; stopping.");
            return ShutdownSignal::FastShutdown;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {
                    self.drain().await;
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = quit.recv() => return ShutdownSignal::FastShutdown,
                _ = hup.recv() => self.reload(),
            }
        }
    }
}

/// Builds everything and runs until a signal. `on_ready` is called once both listeners accept.
pub fn run(
    config: GatewayConfig,
    on_ready: impl FnOnce(&Ready, &SharedState) + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let device_listener = bind_listener(config.device_addr)
        .with_context(|| format!("binding the device listener to {}", config.device_addr))?;
    let device_addr = device_listener.local_addr()?;
    let (admin_addr, admin_hold) =
        reserve(config.admin_addr).context("reserving the admin listener address")?;
    let rest = ResolvedUpstream::new(config.upstream.rest.clone())?;
    let ws_up = ResolvedUpstream::new(config.upstream.ws.clone())?;
    let metrics = Metrics::register(prometheus::Registry::new())?;
    let threads = config.threads;
    let store = crate::store::Store::open(&config.store_path)?;
    // Cluster mode: the Redis connection lives on its own small runtime (pingora's service
    // runtimes come and go; this one lasts as long as the process, `run` never returns early).
    let redis_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fleetgate-redis")
        .enable_all()
        .build()?;
    let (cluster, records, shared_rules) = match &config.redis {
        None => (None, store.load_devices()?, None),
        Some(settings) => redis_rt.block_on(async {
            let c = crate::cluster::Cluster::connect(settings)
                .await
                .context("connecting to Redis (store.redis.url)")?;
            let devices = c.load_all_devices().await?;
            let rules = c.load_rules().await?;
            tracing::info!(node_id = %c.node_id, "Cluster mode: connected to Redis.");
            anyhow::Ok((Some(c), devices, Some(rules)))
        })?,
    };
    let mut state =
        GatewayState::new(config, metrics, store).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(c) = &cluster {
        c.set_metrics(&state.metrics);
        state.quotas.enable_leases(c.clone());
    }
    state.cluster = cluster;
    if let Some(rules) = shared_rules {
        state
            .quotas
            .replace_local_rules(rules)
            .map_err(|e| anyhow::anyhow!("quota rules in Redis are inconsistent: {e}"))?;
    }
    let state: SharedState = Arc::new(state);
    let loaded = records.len();
    for r in records {
        let id = r.device_id.clone();
        if let Err(e) = state.devices.restore(r) {
            tracing::warn!(device_id = %id, error = %e, "Skipping an invalid stored device.");
        }
    }
    state.metrics.devices.set(state.devices.len() as i64);
    tracing::info!(devices = loaded, "Device registry loaded from the store.");

    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        // Every timeout fleetgate sets is at least a second: tokio's timer wheel serves them,
        // and pingora's 10 ms clock thread (its "fast timeout") never starts.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    let gateway = Gateway {
        state: state.clone(),
        rest,
    };
    let proxy = Arc::new(http_proxy(&conf, gateway));
    let ws = Arc::new(WsRelay::new(state.clone(), ws_up));
    let app = Arc::new(DeviceApp { proxy, ws });
    let mut device = background_service(
        "fleetgate device API",
        DeviceAcceptor::new(app, device_listener, state.device_tls.clone()),
    );
    device.threads = Some(threads);
    server.add_service(device);

    let mut admin = Service::new(
        "fleetgate admin API".to_owned(),
        HttpServer::new_app(AdminApp {
            state: state.clone(),
        }),
    );
    admin.add_tcp_with_settings(&admin_addr.to_string(), tcp_options());
    admin.threads = Some(1);
    server.add_service(admin);

    let mut persister = background_service(
        "fleetgate usage persister",
        crate::quota::Persister {
            state: state.clone(),
        },
    );
    persister.threads = Some(1);
    server.add_service(persister);

    if let Some(cluster) = state.cluster.clone() {
        let mut feed = background_service(
            "fleetgate cluster change feed",
            crate::cluster::feed::Feed {
                state: state.clone(),
                cluster: cluster.clone(),
            },
        );
        feed.threads = Some(1);
        server.add_service(feed);
        let mut members = background_service(
            "fleetgate cluster membership",
            crate::cluster::members::Members {
                state: state.clone(),
                cluster: cluster.clone(),
            },
        );
        members.threads = Some(1);
        server.add_service(members);
    }

    if let Some(sync) = state.config.quota.sync.clone() {
        let svc = crate::quota_sync::RuleSync::new(state.clone(), sync)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut svc = background_service("fleetgate quota sync", svc);
        svc.threads = Some(1);
        server.add_service(svc);
    }

    let ready = Ready {
        device_addr,
        admin_addr,
    };
    let st = state.clone();
    std::thread::Builder::new().name("fleetgate-ready".into()).spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let up = |a: SocketAddr| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok();
        while Instant::now() < deadline && !(up(ready.device_addr) && up(ready.admin_addr)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The admin listener owns its port now.
        drop(admin_hold);
        st.set_phase(Phase::Serving);
        tracing::info!(device = %ready.device_addr, admin = %ready.admin_addr, "fleetgate is serving.");
        on_ready(&ready, &st);
    })?;

    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSignal { state }),
    });
    redis_rt.shutdown_background();
    Ok(())
}
