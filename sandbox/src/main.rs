//! `sandbox` binary: serves the Coze-compatible upstream until SIGTERM or Ctrl-C.
//!
//! Prints one JSON line `{"base_url": "http://…", "ws_url": "ws://…"}` on stdout once listening.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "A Coze-compatible upstream for fleetgate tests and firmware development")]
struct Args {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Delay between SSE events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    sse_delay_ms: u64,
    /// Extra PAT accepted besides `pat_sandbox`.
    #[arg(long)]
    pat: Vec<String>,
    /// OAuth app key `KID:APP_ID:PATH_TO_PUBLIC_PEM` (repeatable).
    #[arg(long = "app-key", value_name = "KID:APP_ID:PEM_PATH")]
    app_key: Vec<String>,
    /// Extra accepted JWT audience (repeatable).
    #[arg(long)]
    audience: Vec<String>,
    /// Seed for deterministic replies.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Number of `conversation.message.delta` events per chat stream.
    #[arg(long, default_value_t = 4)]
    chat_deltas: usize,
    /// QPS reported for `api_run_qps` by the benefits API.
    #[arg(long, default_value_t = 500)]
    plan_qps: u32,
    /// Pace WebSocket audio frames in real time (default).
    #[arg(long, conflicts_with = "fast_audio")]
    realtime_audio: bool,
    /// Send WebSocket audio frames as fast as possible.
    #[arg(long)]
    fast_audio: bool,
}

fn parse_app_key(spec: &str) -> anyhow::Result<sandbox::AppKey> {
    let mut it = spec.splitn(3, ':');
    let (Some(kid), Some(app_id), Some(path)) = (it.next(), it.next(), it.next()) else {
        anyhow::bail!("--app-key expects KID:APP_ID:PATH_TO_PUBLIC_PEM, got {spec:?}");
    };
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    sandbox::oauth::rsa_public_key_der(&pem)
        .map_err(|e| anyhow::anyhow!("{path}: not a usable RSA public key: {e}"))?;
    Ok(sandbox::AppKey {
        kid: kid.to_owned(),
        app_id: app_id.to_owned(),
        public_key_pem: pem,
    })
}

async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let mut config = sandbox::SandboxConfig {
        bind: args.bind,
        sse_event_delay: std::time::Duration::from_millis(args.sse_delay_ms),
        seed: args.seed,
        chat_deltas: args.chat_deltas.max(1),
        plan_qps: args.plan_qps,
        realtime_audio: !args.fast_audio,
        ..Default::default()
    };
    config.pats.extend(args.pat);
    config.audiences.extend(args.audience);
    for spec in &args.app_key {
        config.app_keys.push(parse_app_key(spec)?);
    }
    let handle = sandbox::start(config).await?;
    println!(
        "{}",
        serde_json::json!({"base_url": handle.base_url(), "ws_url": handle.ws_url()})
    );
    terminated().await;
    // Stalled fault-injection streams never end on their own: bound the graceful shutdown.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), handle.shutdown()).await;
    Ok(())
}
