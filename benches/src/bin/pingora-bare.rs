//! `pingora-bare`: a bare pingora 0.9.1 HTTP/1 reverse proxy, the load harness's `pingora`
//! target (see `benches/README.md`).
//!
//! Same allocator (mimalloc), same pingora version and features and the same
//! `server.threads` knob as fleetgate, but none of fleetgate's own code: no accept loop of its
//! own, no head pre-read, no policy. `upstream_peer` returns a plain-HTTP peer to `--upstream`
//! (pingora's default keep-alive pool), `upstream_request_filter` sets `Authorization:
//! Bearer $PINGORA_BARE_PAT` (as the nginx target does) and nothing else. Its cost over
//! `direct` is what pingora's HTTP/1 proxy machinery itself costs; fleetgate's cost over it is
//! what fleetgate adds.

use std::net::SocketAddr;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use clap::Parser;
use pingora::http::RequestHeader;
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The environment variable holding the PAT set as `Authorization: Bearer <PAT>` upstream.
const PAT_ENV: &str = "PINGORA_BARE_PAT";

#[derive(Parser, Debug)]
#[command(about = "bare pingora reverse proxy (load harness baseline)")]
struct Args {
    /// Listen address, `host:port` (port 0 is not supported by pingora's listener).
    #[arg(long)]
    listen: SocketAddr,
    /// Upstream address, `host:port` (plain HTTP).
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads (pingora `ServerConf.threads`, like fleetgate's `server.threads`).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Bare {
    upstream: SocketAddr,
    /// The full `Authorization` value, `Bearer <PAT>`.
    auth: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        upstream_request.insert_header("authorization", self.auth.as_str())?;
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.threads == 0 {
        return Err(anyhow!("--threads must be at least 1"));
    }
    let pat = std::env::var(PAT_ENV).with_context(|| format!("{PAT_ENV} is not set"))?;
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: args.upstream,
            auth: format!("Bearer {pat}"),
        },
    );
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    server.run_forever()
}
