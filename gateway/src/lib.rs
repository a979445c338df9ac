//! fleetgate: a Pingora edge gateway between device fleets and the Coze Open API.
//!
//! Where things live (see ARCHITECTURE.md for the full picture):
//! - [`listener`]: the device listener; splits WebSocket upgrades ([`ws`]) from REST/SSE
//!   ([`proxy`], pingora's `ProxyHttp` as a phase map).
//! - [`proxy::admit`]: admission (route allow-list, device token, body limit), shared by both.
//! - [`proxy::respond`]: the only writer of device-facing error responses.
//! - [`admin`]: the admin API on its own listener; [`metrics`]: Prometheus, no globals.
//! - [`config`]: file shape → validated config, all errors at once.
//! - [`server`]: pingora `Server` assembly, port reservation, SIGTERM drain.
//! - [`cluster`]: cluster mode: devices, rules and `jti`s shared in Redis.
//! - [`sandbox_cmd`]: `fleetgate sandbox`, the gateway wired to the built-in upstream.

pub mod accept;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod device_cmd;
pub mod device_tls;
pub mod devices;
pub mod listener;
pub mod locks;
pub mod logid;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod quota;
pub mod quota_api;
pub mod quota_sync;
pub mod ratelimit;
pub mod reload;
pub mod sandbox_cmd;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod upstream;
pub mod upstream_auth;
pub mod verifier;
pub mod ws;
