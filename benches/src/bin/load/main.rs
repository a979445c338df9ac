//! `load`: the fleetgate load harness (see `benches/README.md`).
//!
//! Starts the sandbox upstream, `fleetgate serve` (full policy path), nginx (plain reverse
//! proxy) and `pingora-bare` (bare pingora reverse proxy) as child processes on loopback,
//! drives each with the same load, side by side and interleaved per repeat, and writes a JSON
//! and a Markdown report with each figure's median over the repeats and the ratios
//! gateway/direct, gateway/nginx, gateway/pingora and pingora/nginx.

mod instr;
mod procs;
mod report;
mod rest;
mod soak;
mod sse;
mod ws;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use clap::{Parser, ValueEnum};
use futures_util::{StreamExt as _, TryStreamExt as _};

use procs::{Gateway, Nginx, PingoraBare, Sandbox};
use report::Report;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Small JSON GET: fixed concurrency (wrk) and fixed rate (open loop).
    Rest,
    /// Chat v3 streams, events paced 20 ms apart.
    Sse,
    /// Idle `/v1/chat` WebSockets: memory per session.
    WsIdle,
    /// Real-time voice `/v1/chat` sessions.
    WsVoice,
    /// Many distinct devices (tokens, rules), requests spread across them.
    Devices,
    /// Instructions and allocations per REST request, counted under valgrind's callgrind
    /// (gateway and pingora-bare): deterministic where the timed figures are noisy.
    Instr,
    /// Gateway only: steady mixed REST + SSE + WebSocket load for `--minutes`, asserting flat
    /// RSS after warm-up, fds back to baseline and zero errors (exit code 1 otherwise).
    Soak,
}

#[derive(Parser, Debug)]
#[command(
    about = "fleetgate load harness: sandbox direct vs fleetgate vs nginx vs bare pingora, side by side"
)]
struct Args {
    scenario: Scenario,
    /// Tiny durations and sizes (CI smoke runs); figures are not meaningful.
    #[arg(long)]
    quick: bool,
    /// Repeats (each repeat runs every target once, interleaved). Default 3 (1 with --quick).
    #[arg(long)]
    repeats: Option<usize>,
    /// Seconds per measured run. Default 5 (1 with --quick); voice 10.
    #[arg(long)]
    secs: Option<f64>,
    /// Targets to drive, comma-separated, from direct, gateway, nginx, pingora (WebSocket
    /// scenarios skip pingora).
    #[arg(
        long,
        default_value = "direct,gateway,nginx,pingora",
        value_delimiter = ','
    )]
    targets: Vec<String>,
    /// Directory holding the `fleetgate`, `sandbox` and `pingora-bare` release binaries
    /// (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the report goes (`load-<scenario>.json` / `.md`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Gateway `server.threads`; nginx gets as many worker processes, pingora-bare as many
    /// threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// REST: connections of the fixed-concurrency run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// REST: requests per second of the open-loop run.
    #[arg(long, default_value_t = 3000.0)]
    rate: f64,
    /// Instr: requests counted per repeat (default 20000; quick 500).
    #[arg(long)]
    requests: Option<u64>,
    /// REST: devices connect to the gateway and nginx over TLS (the test fixture
    /// certificate, EC P-256); direct stays plain HTTP and pingora is skipped. Reports
    /// `load-rest-tls.*`.
    #[arg(long)]
    tls: bool,
    /// SSE: concurrent streams.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// WebSocket scenarios: sessions (default idle 9000, voice 200; quick 200 / 10).
    #[arg(long)]
    sessions: Option<usize>,
    /// Devices scenario: registered devices (default 100000; quick 2000).
    #[arg(long)]
    devices: Option<usize>,
    /// Devices scenario: devices that also get a `single_device` rule (one admin call each).
    #[arg(long)]
    device_rules: Option<usize>,
    /// Soak: duration in minutes (default 10; 1 with --quick).
    #[arg(long)]
    minutes: Option<f64>,
    /// Soak: REST requests per second (0: no REST; likewise 0 disables the other kinds).
    #[arg(long, default_value_t = 300.0)]
    soak_rps: f64,
    /// Soak: concurrent SSE streams (back to back).
    #[arg(long, default_value_t = 5)]
    soak_streams: usize,
    /// Soak: concurrent voice-like WebSocket sessions (back to back).
    #[arg(long, default_value_t = 10)]
    soak_ws: usize,
    /// Soak: idle WebSocket sessions held for the whole run.
    #[arg(long, default_value_t = 200)]
    soak_idle: usize,
    /// Soak: after the end check, wait this many seconds (upstream pool idle timeout is 60 s)
    /// and report the fds once more (0 skips).
    #[arg(long, default_value_t = 65.0)]
    soak_drain_secs: f64,
}

/// One thing to drive: where to connect, what Authorization to send, whose CPU/RSS counts.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: &'static str,
    /// `http`, or `https` for the proxies of a `--tls` run.
    pub scheme: &'static str,
    pub addr: String,
    pub auth: String,
    pub pid: u32,
}

/// The processes of a run.
struct Env {
    sandbox: Sandbox,
    gateway: Gateway,
    nginx: Option<Nginx>,
    pingora: Option<PingoraBare>,
    token: String,
    /// The gateway's and nginx's scheme (`https` with `--tls`).
    scheme: &'static str,
}

impl Env {
    async fn start(args: &Args, bin_dir: &Path) -> Result<Env> {
        let sandbox = Sandbox::start(bin_dir, 20, 16).await?;
        let wrap = |name: &str| -> Vec<String> {
            if args.scenario == Scenario::Instr {
                instr::valgrind(&out_dir(args), name)
            } else {
                Vec::new()
            }
        };
        let tls = if args.tls {
            Some(procs::TlsFiles::fixtures()?)
        } else {
            None
        };
        let gateway = Gateway::start(
            bin_dir,
            &sandbox.base_url,
            args.threads,
            &wrap("gateway"),
            tls.as_ref(),
        )
        .await?;
        let token = gateway
            .register(&["bench-0".to_owned()])
            .await?
            .pop()
            .ok_or_else(|| anyhow!("no token minted"))?;
        let nginx = if args.targets.iter().any(|t| t == "nginx") {
            match Nginx::binary() {
                Some(bin) => {
                    Some(Nginx::start(&bin, &sandbox.addr, args.threads, tls.as_ref()).await?)
                }
                None => {
                    eprintln!(
                        "nginx not found: skipping the nginx column (install it: apt-get install -y nginx)"
                    );
                    None
                }
            }
        } else {
            None
        };
        let pingora = if want_pingora(args) {
            Some(PingoraBare::start(bin_dir, &sandbox.addr, args.threads, &wrap("pingora")).await?)
        } else {
            None
        };
        Ok(Env {
            sandbox,
            gateway,
            nginx,
            pingora,
            token,
            scheme: if args.tls { "https" } else { "http" },
        })
    }

    fn targets(&self, wanted: &[String]) -> Vec<Target> {
        let mut v = Vec::new();
        let want = |n: &str| wanted.iter().any(|w| w == n);
        if want("direct") {
            v.push(Target {
                name: "direct",
                scheme: "http",
                addr: self.sandbox.addr.clone(),
                auth: format!("Bearer {}", procs::PAT),
                pid: self.sandbox.pid,
            });
        }
        if want("gateway") {
            v.push(Target {
                name: "gateway",
                scheme: self.scheme,
                addr: self.gateway.device_addr.clone(),
                auth: format!("Bearer {}", self.token),
                pid: self.gateway.pid,
            });
        }
        if let (true, Some(n)) = (want("nginx"), &self.nginx) {
            v.push(Target {
                name: "nginx",
                scheme: self.scheme,
                addr: n.addr.clone(),
                auth: format!("Bearer {}", self.token),
                pid: n.pid,
            });
        }
        if let (true, Some(p)) = (want("pingora"), &self.pingora) {
            v.push(Target {
                name: "pingora",
                scheme: "http",
                addr: p.addr.clone(),
                auth: format!("Bearer {}", self.token),
                pid: p.pid,
            });
        }
        v
    }

    async fn stop(mut self) {
        if let Some(mut n) = self.nginx.take() {
            n.stop().await;
        }
        if let Some(mut p) = self.pingora.take() {
            let _ = p.child.kill().await;
        }
        let _ = self.gateway.child.kill().await;
        let _ = self.sandbox.child.kill().await;
    }
}

/// The pingora target is driven in the REST, SSE and devices scenarios only: pingora's
/// WebSocket tunnel is not the path fleetgate uses for WebSockets (`gateway::ws`), so a
/// pingora column there would not explain fleetgate's cost.
fn want_pingora(args: &Args) -> bool {
    !args.tls
        && args.targets.iter().any(|t| t == "pingora")
        && matches!(
            args.scenario,
            Scenario::Rest | Scenario::Sse | Scenario::Devices | Scenario::Instr
        )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let fds = procs::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args, fds))
}

async fn run(args: Args, fds: u64) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no parent of the current exe"))?
            .to_path_buf(),
    };
    let mut needed = vec!["fleetgate", "sandbox"];
    if want_pingora(&args) {
        needed.push("pingora-bare");
    }
    for b in needed {
        if !bin_dir.join(b).is_file() {
            return Err(anyhow!(
                "{}/{b} not found: build it (cargo build --release -p gateway --bin fleetgate -p sandbox --bin sandbox -p gateway-benches --bin pingora-bare) or pass --bin-dir",
                bin_dir.display()
            ));
        }
    }
    if args.tls && args.scenario != Scenario::Rest {
        return Err(anyhow!("--tls is supported by the rest scenario only"));
    }
    if args.scenario == Scenario::Soak {
        return run_soak(&args, &bin_dir).await;
    }
    let q = args.quick;
    let repeats = args.repeats.unwrap_or(if q { 1 } else { 3 }).max(1);
    let secs = args.secs.unwrap_or(if q { 1.0 } else { 5.0 });
    let mut rep = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: report::machine(),
        started_unix_s: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        ..Report::default()
    };
    rep.notes.push(format!(
        "{repeats} repeat(s); each repeat drives every target in turn; {secs} s per measured run; gateway threads = nginx workers = pingora-bare threads = {}; fd limit {fds}",
        args.threads
    ));
    if args.tls {
        rep.notes.push(
            "TLS (`--tls`): devices reach the gateway and nginx over TLS 1.3 (the test fixture certificate, EC P-256; the client does not verify it), each proxy talks plain HTTP to the sandbox; direct is plain HTTP, so gateway − direct and nginx − direct include TLS; no pingora column.".to_owned(),
        );
    }
    let tmp = procs::TempDir::new("harness")?;
    match args.scenario {
        Scenario::Rest => scenario_rest(&args, &bin_dir, &tmp.0, repeats, secs, &mut rep).await?,
        Scenario::Sse => scenario_sse(&args, &bin_dir, repeats, secs, &mut rep).await?,
        Scenario::WsIdle => {
            let n = args.sessions.unwrap_or(if q { 200 } else { 9_000 });
            scenario_ws(&args, &bin_dir, repeats, secs, n, false, &mut rep).await?
        }
        Scenario::WsVoice => {
            let n = args.sessions.unwrap_or(if q { 10 } else { 200 });
            let vs = args.secs.unwrap_or(if q { 3.5 } else { 10.0 });
            scenario_ws(&args, &bin_dir, repeats, vs, n, true, &mut rep).await?
        }
        Scenario::Devices => {
            scenario_devices(&args, &bin_dir, &tmp.0, repeats, secs, &mut rep).await?
        }
        Scenario::Instr => {
            let n = args.requests.unwrap_or(if q { 500 } else { 20_000 });
            scenario_instr(&args, &bin_dir, repeats, n, &mut rep).await?
        }
        Scenario::Soak => unreachable!("handled above"),
    }
    let out_dir = out_dir(&args);
    std::fs::create_dir_all(&out_dir)?;
    let name = format!(
        "{}{}",
        format!("{:?}", args.scenario).to_lowercase(),
        if args.tls { "-tls" } else { "" }
    );
    let md = rep.markdown();
    std::fs::write(
        out_dir.join(format!("load-{name}.json")),
        serde_json::to_string_pretty(&rep.json())?,
    )?;
    std::fs::write(out_dir.join(format!("load-{name}.md")), &md)?;
    println!("{md}");
    println!("report: {}/load-{name}.{{json,md}}", out_dir.display());
    Ok(())
}

fn out_dir(args: &Args) -> PathBuf {
    args.out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"))
}

/// The soak scenario: its own report (`load-soak.{json,md}`) and a non-zero exit on failure.
async fn run_soak(args: &Args, bin_dir: &Path) -> Result<()> {
    let minutes = args.minutes.unwrap_or(if args.quick { 1.0 } else { 10.0 });
    if !(minutes > 0.0 && minutes <= 120.0) {
        return Err(anyhow!("--minutes must be in (0, 120]"));
    }
    let cfg = soak::SoakConfig {
        secs: minutes * 60.0,
        rest_rps: args.soak_rps,
        sse_streams: args.soak_streams,
        ws_churn: args.soak_ws,
        ws_idle: args.soak_idle,
        sample_every: Duration::from_secs(10),
        drain_wait: Duration::from_secs_f64(args.soak_drain_secs.max(0.0)),
    };
    let out = soak::run(
        bin_dir,
        args.threads,
        &cfg,
        std::env::args().collect::<Vec<_>>().join(" "),
        report::machine(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
    )
    .await?;
    let dir = out_dir(args);
    std::fs::create_dir_all(&dir)?;
    let md = out.markdown();
    std::fs::write(
        dir.join("load-soak.json"),
        serde_json::to_string_pretty(&out)?,
    )?;
    std::fs::write(dir.join("load-soak.md"), &md)?;
    println!("{md}");
    println!("report: {}/load-soak.{{json,md}}", dir.display());
    if !out.pass {
        let failed: Vec<String> = out
            .checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        return Err(anyhow!("soak FAILED:\n  {}", failed.join("\n  ")));
    }
    eprintln!("soak passed");
    Ok(())
}

/// What the `pingora` column is (report note).
const PINGORA_NOTE: &str = "pingora: pingora-bare, a bare pingora 0.9.1 reverse proxy (same version, features, allocator (mimalloc) and thread count as fleetgate; pingora's own listener and HTTP/1 proxy path, default upstream keep-alive pool of 128, Authorization set to the PAT, nothing else). gateway/pingora = what fleetgate adds on top of pingora; pingora/nginx = what pingora's proxy machinery costs against nginx.";

async fn scenario_rest(
    args: &Args,
    bin_dir: &Path,
    tmp: &Path,
    repeats: usize,
    secs: f64,
    rep: &mut Report,
) -> Result<()> {
    let env = Env::start(args, bin_dir).await?;
    let targets = env.targets(&args.targets);
    let have_wrk = rest::wrk_available();
    if !have_wrk {
        eprintln!("wrk not found: skipping the fixed-concurrency runs (apt-get install -y wrk)");
    }
    let c = args.concurrency;
    for r in 0..repeats {
        for t in &targets {
            eprintln!("[rest] repeat {}/{repeats}: {}", r + 1, t.name);
            if have_wrk {
                let script = rest::wrk_script(tmp, &t.auth, None)?;
                // Warm-up (connections, upstream pool), not recorded.
                rest::wrk(t, &script, 2, c, 1.0).await?;
                let w = rest::wrk(t, &script, 2, c, secs).await?;
                let n = t.name;
                rep.record(&format!("c{c} throughput"), "req/s", "higher", n, w.rps);
                rep.record(&format!("c{c} p50"), "µs", "lower", n, w.p50_us);
                rep.record(&format!("c{c} p99"), "µs", "lower", n, w.p99_us);
                rep.record(&format!("c{c} p99.9"), "µs", "lower", n, w.p999_us);
                rep.record(
                    &format!("c{c} serving-process CPU per request"),
                    "µs",
                    "lower",
                    n,
                    w.cpu_us_per_req,
                );
                rep.record(
                    &format!("c{c} errors"),
                    "count",
                    "lower",
                    n,
                    w.errors as f64,
                );
                let w1 = rest::wrk(t, &script, 1, 1, secs).await?;
                rep.record("c1 throughput", "req/s", "higher", n, w1.rps);
                rep.record("c1 p50", "µs", "lower", n, w1.p50_us);
                rep.record("c1 p99", "µs", "lower", n, w1.p99_us);
            }
            let o = rest::open_loop(t, args.rate, secs).await?;
            let n = t.name;
            let rate = args.rate;
            rep.record(
                &format!("{rate} rps p50"),
                "µs",
                "lower",
                n,
                o.p50_us as f64,
            );
            rep.record(
                &format!("{rate} rps p99"),
                "µs",
                "lower",
                n,
                o.p99_us as f64,
            );
            rep.record(
                &format!("{rate} rps p99.9"),
                "µs",
                "lower",
                n,
                o.p999_us as f64,
            );
            rep.record(
                &format!("{rate} rps failed or late (>5 s)"),
                "count",
                "lower",
                n,
                (o.sent - o.ok) as f64,
            );
            rep.record(
                &format!("{rate} rps serving-process CPU per request"),
                "µs",
                "lower",
                n,
                o.cpu_us_per_req,
            );
        }
    }
    rep.notes.push(format!(
        "REST: GET {} (~1 KB JSON). Fixed concurrency: wrk -t2 -c{c} (and -t1 -c1) after a 1 s warm-up, latency from wrk. Fixed rate: own open-loop client, latency measured from each request's scheduled time (includes client scheduling slack, same for every target).",
        rest::PATH
    ));
    rep.notes.push("Gateway path: HS256 device token verified, per-device GCRA rate limit (1e6 rps), fleet quota rule checked and charged, PAT injected, access log off, level warn. nginx: proxy_pass with upstream keepalive, Authorization set to the PAT. direct: the sandbox itself (its CPU is in the direct column of CPU figures).".to_owned());
    if want_pingora(args) {
        rep.notes.push(PINGORA_NOTE.to_owned());
    }
    env.stop().await;
    Ok(())
}

async fn scenario_instr(
    args: &Args,
    bin_dir: &Path,
    repeats: usize,
    requests: u64,
    rep: &mut Report,
) -> Result<()> {
    instr::check_tools()?;
    std::fs::create_dir_all(out_dir(args).join("callgrind"))?;
    let env = Env::start(args, bin_dir).await?;
    let targets: Vec<Target> = env
        .targets(&args.targets)
        .into_iter()
        .filter(|t| matches!(t.name, "gateway" | "pingora"))
        .collect();
    if targets.is_empty() {
        return Err(anyhow!("instr measures --targets gateway and/or pingora"));
    }
    let c = args.concurrency;
    for r in 0..repeats {
        for t in &targets {
            eprintln!("[instr] repeat {}/{repeats}: {}", r + 1, t.name);
            let m = instr::run(t, &out_dir(args), requests, c).await?;
            let n = t.name;
            rep.record(
                "instructions per request",
                "Ir",
                "lower",
                n,
                m.ir_per_request,
            );
            rep.record(
                "allocations per request",
                "count",
                "lower",
                n,
                m.allocs_per_request,
            );
        }
    }
    // The fewest of the runs just recorded, per target.
    let fewest: Vec<(String, f64)> = rep
        .figures
        .iter()
        .filter(|f| f.name == "instructions per request")
        .flat_map(|f| &f.runs)
        .filter_map(|(n, runs)| Some((n.clone(), runs.iter().copied().reduce(f64::min)?)))
        .collect();
    for (n, ir) in fewest {
        rep.record(
            "instructions per request, fewest of the repeats",
            "Ir",
            "lower",
            &n,
            ir,
        );
    }
    rep.notes.push(
        "Fewest of the repeats: most of the spread between repeats under valgrind is work that only adds (the allocator refilling pages while pingora's timers, armed per 10 ms tick, live 30-60 s of a ~50x slower clock; the occasional store flush), so for an A/B of a small change the fewest is the steadier figure. The median is reported as well.".to_owned(),
    );
    rep.notes.push(format!(
        "Instr: GET {} through each proxy running under `{}`; {requests} requests at concurrency {c} (keep-alive) between a `callgrind_control --zero` and a `--dump`, after a warm-up of {} requests. Instructions (callgrind Ir) and allocator calls (mi_malloc/zalloc/realloc_aligned) of the proxy process, divided by the requests; the dumps are in {}/callgrind/ (read them with callgrind_annotate). Under valgrind (~50× slower) the gateway flushes usage to its store every {} instead of 100 ms, so the flush weighs per request what it does at full speed.",
        rest::PATH,
        instr::valgrind(Path::new("<out>"), "<target>").join(" "),
        instr::WARMUP,
        out_dir(args).display(),
        procs::WRAPPED_PERSIST_INTERVAL,
    ));
    env.stop().await;
    Ok(())
}

async fn scenario_sse(
    args: &Args,
    bin_dir: &Path,
    repeats: usize,
    secs: f64,
    rep: &mut Report,
) -> Result<()> {
    let env = Env::start(args, bin_dir).await?;
    let targets = env.targets(&args.targets);
    let k = args.streams;
    for r in 0..repeats {
        for t in &targets {
            eprintln!("[sse] repeat {}/{repeats}: {}", r + 1, t.name);
            // Warm-up (connections, upstream pool), not recorded.
            sse::run(t, k, 0.5, Duration::from_millis(20)).await?;
            let s = sse::run(t, k, secs, Duration::from_millis(20)).await?;
            let n = t.name;
            rep.record("streams completed", "count", "higher", n, s.streams as f64);
            rep.record(
                "events per stream",
                "count",
                "higher",
                n,
                s.events_per_stream,
            );
            rep.record(
                "time to first event p50",
                "µs",
                "lower",
                n,
                s.ttfe_p50_us as f64,
            );
            rep.record(
                "time to first event p99",
                "µs",
                "lower",
                n,
                s.ttfe_p99_us as f64,
            );
            rep.record(
                "event gap excess p50",
                "µs",
                "lower",
                n,
                s.late_p50_us as f64,
            );
            rep.record(
                "event gap excess p99",
                "µs",
                "lower",
                n,
                s.late_p99_us as f64,
            );
            rep.record(
                "serving-process CPU per stream",
                "µs",
                "lower",
                n,
                s.cpu_us_per_stream,
            );
        }
    }
    if want_pingora(args) {
        rep.notes.push(PINGORA_NOTE.to_owned());
    }
    rep.notes.push(format!("SSE: {k} concurrent clients running POST /v3/chat stream=true back to back; sandbox --sse-delay-ms 20 --chat-deltas 16. Event gap excess = arrival − previous event's arrival − 20 ms (pooled over events 2..22; the sandbox sleeps 20 ms between events); its excess over direct is the per-event jitter the proxy adds. Time to first event is from sending the request. 0.5 s warm-up per target."));
    env.stop().await;
    Ok(())
}

async fn scenario_ws(
    args: &Args,
    bin_dir: &Path,
    repeats: usize,
    secs: f64,
    n: usize,
    voice: bool,
    rep: &mut Report,
) -> Result<()> {
    for r in 0..repeats {
        // Fresh processes per repeat: freed memory is kept by allocators.
        let env = Env::start(args, bin_dir).await?;
        let targets = env.targets(&args.targets);
        for t in &targets {
            eprintln!(
                "[ws-{}] repeat {}/{repeats}: {} ({n} sessions)",
                if voice { "voice" } else { "idle" },
                r + 1,
                t.name
            );
            let name = t.name;
            if voice {
                let v = ws::voice(t, n, secs).await?;
                rep.record("sessions open", "count", "higher", name, v.sessions as f64);
                rep.record("sessions failed", "count", "lower", name, v.failed as f64);
                rep.record(
                    "downlink audio frames received",
                    "count",
                    "higher",
                    name,
                    v.frames_down as f64,
                );
                rep.record(
                    "downlink frame lateness p50",
                    "µs",
                    "lower",
                    name,
                    v.frame_late_p50_us as f64,
                );
                rep.record(
                    "downlink frame lateness p99",
                    "µs",
                    "lower",
                    name,
                    v.frame_late_p99_us as f64,
                );
                rep.record(
                    "complete→completed round trip p50",
                    "µs",
                    "lower",
                    name,
                    v.rtt_p50_us as f64,
                );
                rep.record(
                    "complete→completed round trip p99",
                    "µs",
                    "lower",
                    name,
                    v.rtt_p99_us as f64,
                );
                rep.record(
                    "serving-process CPU",
                    "% of one core",
                    "lower",
                    name,
                    v.cpu_percent,
                );
                rep.record("RSS per session", "bytes", "lower", name, v.rss_per_session);
            } else {
                let i = ws::idle(t, n).await?;
                rep.record("sessions open", "count", "higher", name, i.sessions as f64);
                rep.record("sessions failed", "count", "lower", name, i.failed as f64);
                rep.record(
                    "RSS per idle session",
                    "bytes",
                    "lower",
                    name,
                    i.bytes_per_session,
                );
            }
        }
        env.stop().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if args.targets.iter().any(|t| t == "pingora") {
        rep.notes.push("pingora (bare pingora proxy) is not driven in WebSocket scenarios: fleetgate relays WebSockets with its own relay (gateway::ws), not pingora's upgrade tunnel, so a pingora column would not explain fleetgate's cost.".to_owned());
    }
    if voice {
        rep.notes.push(format!("WS voice: {n} concurrent /v1/chat sessions for {secs} s; each sends 16 kHz 16-bit PCM in 20 ms frames (640 B, base64 in input_audio_buffer.append) and input_audio_buffer.complete every 3 s; the sandbox answers with 24 kHz PCM audio deltas paced in real time. Frame lateness = arrival − (first frame of the reply + audio already played); round trip = complete sent → completed received. CPU and RSS are the serving process's (direct: the sandbox)."));
    } else {
        rep.notes.push(format!("WS idle: {n} /v1/chat sessions opened (64 handshakes in flight), RSS of the serving process tree before and 2 s after; direct = the sandbox's own per-session memory (reference only). Fresh processes per repeat."));
    }
    Ok(())
}

async fn scenario_devices(
    args: &Args,
    bin_dir: &Path,
    tmp: &Path,
    repeats: usize,
    secs: f64,
    rep: &mut Report,
) -> Result<()> {
    let q = args.quick;
    let n = args.devices.unwrap_or(if q { 2_000 } else { 100_000 });
    let nrules = args
        .device_rules
        .unwrap_or(if q { 100 } else { 2_000 })
        .min(n);
    let mut env = Env::start(args, bin_dir).await?;
    let rss0 = procs::rss_bytes(env.gateway.pid);
    let ids: Vec<String> = (0..n).map(|i| format!("fleet-{i:07}")).collect();
    let t0 = Instant::now();
    let tokens = env.gateway.register(&ids).await?;
    let reg_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    // A few admin calls in flight: rule writes are serialised in the gateway anyway.
    futures_util::stream::iter(ids.iter().take(nrules))
        .map(|id| env.gateway.device_rule(id))
        .buffer_unordered(8)
        .try_collect::<()>()
        .await?;
    let rules_s = t1.elapsed().as_secs_f64();
    let rss1 = procs::rss_bytes(env.gateway.pid);
    let startup_s = env.gateway.restart().await?;
    let rss_restarted = procs::rss_bytes(env.gateway.pid);
    let tokens_file = tmp.join("tokens.txt");
    std::fs::write(&tokens_file, tokens.join("\n") + "\n").context("writing tokens")?;
    rep.record("devices registered", "count", "higher", "gateway", n as f64);
    rep.record(
        "registration time (bulk admin API, devices and tokens)",
        "s",
        "lower",
        "gateway",
        reg_s,
    );
    rep.record(
        "single_device rules created",
        "count",
        "higher",
        "gateway",
        nrules as f64,
    );
    rep.record(
        "rule creation rate (one admin call each, 8 in flight)",
        "rules/s",
        "higher",
        "gateway",
        nrules as f64 / rules_s.max(1e-9),
    );
    rep.record(
        "gateway RSS growth after registration and rules",
        "MiB",
        "lower",
        "gateway",
        rss1.saturating_sub(rss0) as f64 / 1048576.0,
    );
    rep.record(
        "restart: spawn to ready (loads every device and rule from the store)",
        "s",
        "lower",
        "gateway",
        startup_s,
    );
    rep.record(
        "gateway RSS right after restart (no traffic yet)",
        "MiB",
        "lower",
        "gateway",
        rss_restarted as f64 / 1048576.0,
    );
    if !rest::wrk_available() {
        eprintln!("wrk not found: skipping the load part (apt-get install -y wrk)");
        env.stop().await;
        return Ok(());
    }
    let targets = env.targets(&args.targets);
    let c = args.concurrency;
    for r in 0..repeats {
        for t in &targets {
            eprintln!("[devices] repeat {}/{repeats}: {}", r + 1, t.name);
            let script = if t.name == "gateway" {
                rest::wrk_script(tmp, &t.auth, Some(&tokens_file))?
            } else {
                rest::wrk_script(tmp, &t.auth, None)?
            };
            rest::wrk(t, &script, 2, c, 1.0).await?;
            let w = rest::wrk(t, &script, 2, c, secs).await?;
            rep.record(
                &format!("c{c} throughput"),
                "req/s",
                "higher",
                t.name,
                w.rps,
            );
            rep.record(&format!("c{c} p99"), "µs", "lower", t.name, w.p99_us);
            rep.record(
                &format!("c{c} errors"),
                "count",
                "lower",
                t.name,
                w.errors as f64,
            );
            rep.record(
                "serving-process RSS after run",
                "MiB",
                "lower",
                t.name,
                procs::rss_bytes(t.pid) as f64 / 1048576.0,
            );
        }
    }
    rep.notes.push(format!("Devices: {n} devices registered and given tokens through the bulk admin API (`POST /admin/v1/devices` and `POST /admin/v1/tokens`, 10,000 per call), {nrules} single_device request rules (one admin call each, 8 in flight) on top of the fleet rule; then the gateway is restarted (SIGTERM, same store) and timed from spawn to ready, and the load runs against the restarted process; the gateway's wrk script rotates over all {n} tokens (a different device per request); direct, nginx and pingora get one token (they do not look at it)."));
    if want_pingora(args) {
        rep.notes.push(PINGORA_NOTE.to_owned());
    }
    env.stop().await;
    Ok(())
}
