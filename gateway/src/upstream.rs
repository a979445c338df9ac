//! The upstream endpoints and their resolved socket addresses.
//!
//! Names are resolved once at start-up and re-resolved every 30 s by a background thread, so
//! no request ever waits on DNS.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::UpstreamTarget;

#[derive(Debug)]
pub struct ResolvedUpstream {
    pub target: UpstreamTarget,
    /// `Host` for proxied requests (`target.authority()`), built once.
    pub host_header: http::HeaderValue,
    addr: RwLock<SocketAddr>,
}

/// Why an upstream name could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve upstream `{host}:{port}`: {reason}")]
pub struct ResolveError {
    pub host: String,
    pub port: u16,
    pub reason: String,
}

fn resolve(t: &UpstreamTarget) -> Result<SocketAddr, ResolveError> {
    let err = |reason: String| ResolveError {
        host: t.host.clone(),
        port: t.port,
        reason,
    };
    (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no addresses".into()))
}

impl ResolvedUpstream {
    pub fn new(target: UpstreamTarget) -> Result<Arc<ResolvedUpstream>, ResolveError> {
        let addr = resolve(&target)?;
        let host_header =
            http::HeaderValue::try_from(target.authority()).map_err(|_| ResolveError {
                host: target.host.clone(),
                port: target.port,
                reason: "not a valid Host header value".into(),
            })?;
        let me = Arc::new(ResolvedUpstream {
            target,
            host_header,
            addr: RwLock::new(addr),
        });
        if me.target.host.parse::<std::net::IpAddr>().is_err() {
            let weak = Arc::downgrade(&me);
            std::thread::Builder::new()
                .name("fleetgate-dns".into())
                .spawn(move || {
                    while let Some(u) = weak.upgrade() {
                        std::thread::sleep(Duration::from_secs(30));
                        match resolve(&u.target) {
                            Ok(a) => *u.addr.write().unwrap_or_else(|p| p.into_inner()) = a,
                            Err(e) => tracing::warn!(error = %e, "Upstream re-resolution failed; keeping the last address."),
                        }
                    }
                })
                .map_err(|e| ResolveError { host: me.target.host.clone(), port: me.target.port, reason: e.to_string() })?;
        }
        Ok(me)
    }

    pub fn addr(&self) -> SocketAddr {
        *self.addr.read().unwrap_or_else(|p| p.into_inner())
    }
}
