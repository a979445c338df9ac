//! The `fleetgate` binary: CLI → config → services.

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Parser, Subcommand};
use gateway::{config, sandbox_cmd, server, telemetry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "Edge gateway between device fleets and the Coze Open API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short = 'c', default_value = "config.toml")]
        config: PathBuf,
        /// Print `{"device_addr","admin_addr"}` as one JSON line on stdout once listening.
        #[arg(long)]
        ready_json: bool,
    },
    /// Validate a config file (and the secrets it references); print every error.
    CheckConfig {
        #[arg(long, short = 'c', default_value = "config.toml")]
        config: PathBuf,
    },
    /// Print a new gateway signing key.
    Keygen {
        #[arg(long, default_value = "k1")]
        kid: String,
    },
    /// Run the built-in Coze-compatible upstream and a gateway wired to it.
    Sandbox {
        /// Device API port (0 = any free port).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Admin API port (0 = any free port).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
        /// Sandbox upstream port (0 = any free port).
        #[arg(long, default_value_t = 0)]
        upstream_port: u16,
        /// Delay between SSE events of the sandbox upstream, ms.
        #[arg(long, default_value_t = 20)]
        sse_delay_ms: u64,
        /// Print the URLs and tokens as one JSON line (for scripts).
        #[arg(long)]
        json: bool,
        /// Serve devices over TLS with this PEM certificate chain (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<String>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<String>,
        /// mTLS: require device client certificates from this PEM CA, and bind tokens to the
        /// device each certificate names (its common name).
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<String>,
    },
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`).
///
/// mimalloc advises its arenas `MADV_HUGEPAGE`, and on kernels in THP `madvise` mode (Debian's
/// default) khugepaged then collapses partly used 2 MiB ranges of the heap into huge pages
/// minutes after they were touched: RSS rose in 2–10 MiB steps long after warm-up (+9.6 MiB at
/// ~690 s in the 30-minute soak, with no allocation behind it) and idle connections looked
/// dearer than they are. A proxy's heap is small and scattered, so huge pages buy little TLB
/// reach here; predictable memory per connection matters more.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() -> nix::Result<()> {
    nix::sys::prctl::set_thp_disable(true)
}

#[cfg(not(target_os = "linux"))]
fn disable_transparent_huge_pages() -> Result<(), std::convert::Infallible> {
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config: path,
            ready_json,
        } => {
            let thp = disable_transparent_huge_pages();
            let cfg = config::load_file(&path, &config::process_env)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            telemetry::init(&cfg.log);
            if let Err(e) = thp {
                tracing::warn!(error = %e, "Could not turn transparent huge pages off; RSS may grow in 2 MiB steps as the kernel collapses allocator pages.");
            }
            server::run(cfg, move |ready, _| {
                if ready_json {
                    println!("{}", serde_json::to_string(ready).unwrap_or_default());
                    use std::io::Write as _;
                    let _ = std::io::stdout().flush();
                }
            })
        }
        Command::CheckConfig { config: path } => {
            config::load_file(&path, &config::process_env).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}: ok", path.display());
            Ok(())
        }
        Command::Keygen { kid } => {
            let key: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
            let b64 = base64::engine::general_purpose::STANDARD.encode(key);
            println!("# kid = \"{kid}\"; keep the key secret (env var or file), e.g.:");
            println!(
                "FLEETGATE_SIGNING_KEY_{}={b64}",
                kid.to_uppercase().replace(['-', '.'], "_")
            );
            Ok(())
        }
        Command::Sandbox {
            port,
            admin_port,
            upstream_port,
            sse_delay_ms,
            json,
            tls_cert,
            tls_key,
            client_ca,
        } => sandbox_cmd::run(sandbox_cmd::SandboxOptions {
            port,
            admin_port,
            upstream_port,
            json,
            tls: tls_cert
                .zip(tls_key)
                .map(|(cert, key)| sandbox_cmd::SandboxTls {
                    cert,
                    key,
                    client_ca,
                }),
            sse_delay_ms,
        }),
    }
}
