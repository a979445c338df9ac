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
enum DeviceCommand {
    /// Generate an ES256 key pair for a device: write the private key to `--out` (mode 0600,
    /// never overwritten) and print the admin API body that registers the public key
    /// (`POST /admin/v1/devices/{id}/credentials`).
    Keygen {
        #[arg(long, default_value = "k1")]
        kid: String,
        /// Where the device's private key goes (PKCS#8 PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a signed JWT assertion for the token endpoint's jwt-bearer grant, as the Coze
    /// SDKs make it (send it as `Authorization: Bearer …`). Single use.
    Assertion {
        /// The device id (`iss`; the SDKs' client_id).
        #[arg(long)]
        device: String,
        /// The `kid` the public key was registered under.
        #[arg(long, default_value = "k1")]
        kid: String,
        /// The device's private key (PKCS#8 PEM: P-256 for ES256, RSA for RS256).
        #[arg(long)]
        key: PathBuf,
        /// The gateway host as the device addresses it (`aud`), e.g. `gw.example.com:8080`.
        #[arg(long)]
        aud: String,
        /// Assertion lifetime, seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
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
    /// Device-side helpers (offline): a device key pair, a signed token-endpoint assertion.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
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
        Command::Device { command } => device(command),
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

fn device(command: DeviceCommand) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use gateway::device_cmd;
    match command {
        DeviceCommand::Keygen { kid, out } => {
            let pair = device_cmd::generate_es256()?;
            write_private(&out, &pair.private_pem)
                .with_context(|| format!("writing the private key to {}", out.display()))?;
            eprintln!(
                "Private key written to {} (keep it on the device). Register the public key:",
                out.display()
            );
            let body = serde_json::json!({
                "type": "public_key", "kid": kid, "algorithm": "ES256",
                "public_key_pem": pair.public_pem,
            });
            println!("{body}");
            Ok(())
        }
        DeviceCommand::Assertion {
            device,
            kid,
            key,
            aud,
            ttl,
        } => {
            let pem = std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?;
            let now_s = gateway::state::now_s();
            let jwt = device_cmd::assertion(
                &pem,
                &device_cmd::AssertionRequest {
                    device: &device,
                    kid: &kid,
                    audience: &aud,
                    now_s,
                    ttl_s: ttl,
                },
            )?;
            println!("{jwt}");
            Ok(())
        }
    }
}

/// Creates `path` (never overwriting) readable by its owner only, and writes `pem`.
fn write_private(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)?.write_all(pem.as_bytes())
}
