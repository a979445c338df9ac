//! `sandbox` binary: serves the Coze-compatible upstream until Ctrl-C.

use std::net::SocketAddr;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let mut config = sandbox::SandboxConfig {
        bind: args.bind,
        sse_event_delay: std::time::Duration::from_millis(args.sse_delay_ms),
        ..Default::default()
    };
    config.pats.extend(args.pat);
    let handle = sandbox::start(config).await?;
    println!("{}", serde_json::json!({"base_url": handle.base_url(), "ws_url": handle.ws_url()}));
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}
