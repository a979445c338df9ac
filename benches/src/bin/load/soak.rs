//! Soak: a bounded run of steady mixed load against the gateway alone (sandbox upstream),
//! sampling the gateway's RSS and open fds every 10 s, then asserting that RSS stays flat after
//! warm-up, that the fds return to the pre-load baseline once the clients are gone, and that no
//! request, stream or session failed.
//!
//! Load, all at once for the whole run:
//! - REST: `GET /v1/audio/voices` at a fixed rate (open loop, keep-alive pool);
//! - SSE: `streams` clients running chat v3 streams back to back;
//! - WebSocket churn: `ws` clients each running voice-like `/v1/chat` sessions back to back
//!   (connect, `chat.update`, a few 20 ms PCM appends, `input_audio_buffer.complete`, read until
//!   `conversation.chat.completed`, close);
//! - WebSocket idle: `idle` sessions opened before the run and held until its end (a client
//!   ping every 60 s), then closed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::procs::{Gateway, Sandbox};
use crate::report::{median, pct};
use crate::rest::PATH;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const MIB: f64 = 1_048_576.0;
/// RSS criterion: the last third's median may exceed the reference median by at most this
/// fraction of the reference ...
pub const RSS_MAX_GROWTH_FRACTION: f64 = 0.10;
/// ... and by at most this many bytes (both must hold).
pub const RSS_MAX_GROWTH_BYTES: f64 = 8.0 * MIB;
/// fd criterion without a drain wait (`--soak-drain-secs 0`): fds at the end may exceed the
/// baseline by at most this many, all of them sockets to the upstream (the gateway's
/// keep-alive pool, which expires after 60 s idle). With a drain wait the pool is not guessed
/// at: after its idle timeout every upstream socket must be gone.
pub const FD_POOL_ALLOWANCE: i64 = 16;
/// fd criterion: fds other than upstream sockets may differ from the baseline by at most this.
pub const FD_OTHER_ALLOWANCE: i64 = 2;

#[derive(Clone, Debug)]
pub struct SoakConfig {
    pub secs: f64,
    pub rest_rps: f64,
    pub sse_streams: usize,
    pub ws_churn: usize,
    pub ws_idle: usize,
    pub sample_every: Duration,
    /// After the end check, wait this long (upstream pool idle timeout) and sample once more.
    pub drain_wait: Duration,
}

/// Per-kind counters (cumulative).
#[derive(Default)]
struct Counters {
    rest_ok: AtomicU64,
    rest_err: AtomicU64,
    sse_ok: AtomicU64,
    sse_err: AtomicU64,
    ws_ok: AtomicU64,
    ws_err: AtomicU64,
    ws_unclean_close: AtomicU64,
    idle_open: AtomicU64,
    idle_err: AtomicU64,
    idle_unclean_close: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BTreeMap::from([
            ("rest_ok", g(&self.rest_ok)),
            ("rest_err", g(&self.rest_err)),
            ("sse_ok", g(&self.sse_ok)),
            ("sse_err", g(&self.sse_err)),
            ("ws_ok", g(&self.ws_ok)),
            ("ws_err", g(&self.ws_err)),
            ("ws_unclean_close", g(&self.ws_unclean_close)),
            ("idle_open", g(&self.idle_open)),
            ("idle_err", g(&self.idle_err)),
            ("idle_unclean_close", g(&self.idle_unclean_close)),
        ])
    }
}

/// First error message per kind, for the report.
#[derive(Default)]
struct FirstErrors(std::sync::Mutex<BTreeMap<&'static str, String>>);

impl FirstErrors {
    fn note(&self, kind: &'static str, msg: impl FnOnce() -> String) {
        if let Ok(mut m) = self.0.lock()
            && !m.contains_key(kind)
        {
            let s = msg();
            eprintln!("[soak] first {kind} error: {s}");
            m.insert(kind, s);
        }
    }
}

/// Open fds of a process, by kind.
#[derive(Serialize, Clone, Debug, Default)]
pub struct FdSnapshot {
    pub total: i64,
    /// kind → count: `tcp upstream`, `tcp device client`, `tcp admin client`, `tcp listen`,
    /// `tcp other`, `socket other`, `anon_inode:[eventpoll]`, `pipe`, `file`, ...
    pub kinds: BTreeMap<String, i64>,
}

impl FdSnapshot {
    fn get(&self, k: &str) -> i64 {
        self.kinds.get(k).copied().unwrap_or(0)
    }
}

struct Ports {
    upstream: u16,
    device: u16,
    admin: u16,
}

fn port_of(addr: &str) -> u16 {
    addr.trim_start_matches("http://")
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(0)
}

/// socket inode → (local port, remote port, state) from `/proc/<pid>/net/tcp{,6}`.
fn tcp_table(pid: u32) -> BTreeMap<u64, (u16, u16, u8)> {
    let mut m = BTreeMap::new();
    for f in ["tcp", "tcp6"] {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")) else {
            continue;
        };
        for l in s.lines().skip(1) {
            let c: Vec<&str> = l.split_whitespace().collect();
            if c.len() < 10 {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            let st = u8::from_str_radix(c[3], 16).unwrap_or(0);
            if let Ok(inode) = c[9].parse::<u64>() {
                m.insert(inode, (port(c[1]), port(c[2]), st));
            }
        }
    }
    m
}

fn fd_snapshot(pid: u32, ports: &Ports) -> FdSnapshot {
    let mut snap = FdSnapshot::default();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return snap;
    };
    let tcp = tcp_table(pid);
    for e in rd.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        let kind = if let Some(inode) = t
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
        {
            match tcp.get(&inode) {
                Some(&(_, _, 0x0A)) => "tcp listen".to_owned(),
                Some(&(_, r, _)) if r == ports.upstream => "tcp upstream".to_owned(),
                Some(&(l, _, _)) if l == ports.device => "tcp device client".to_owned(),
                Some(&(l, _, _)) if l == ports.admin => "tcp admin client".to_owned(),
                Some(_) => "tcp other".to_owned(),
                None => "socket other".to_owned(),
            }
        } else if t.starts_with("anon_inode:") {
            t.into_owned()
        } else if t.starts_with("pipe:") {
            "pipe".to_owned()
        } else if t.starts_with('/') {
            // Basename only: the paths hold per-run temp directory names.
            format!("file {}", t.rsplit('/').next().unwrap_or_default())
        } else {
            "other".to_owned()
        };
        *snap.kinds.entry(kind).or_default() += 1;
        snap.total += 1;
    }
    snap
}

/// `VmRSS` of one process (not its children), bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[derive(Serialize, Clone, Debug)]
pub struct Sample {
    pub t_s: f64,
    pub rss_bytes: u64,
    pub fds: i64,
    pub fd_kinds: BTreeMap<String, i64>,
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Serialize, Debug)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Serialize, Debug)]
pub struct SoakOutcome {
    pub command: String,
    pub machine: String,
    pub started_unix_s: u64,
    pub config: serde_json::Value,
    pub baseline_rss_bytes: u64,
    pub baseline_fds: FdSnapshot,
    pub samples: Vec<Sample>,
    pub end_fds: FdSnapshot,
    pub drained_fds: Option<FdSnapshot>,
    pub end_rss_bytes: u64,
    pub totals: BTreeMap<&'static str, u64>,
    pub first_errors: BTreeMap<&'static str, String>,
    pub rest_latency_us: BTreeMap<&'static str, u64>,
    pub rss: serde_json::Value,
    pub checks: Vec<Check>,
    pub pass: bool,
}

async fn ws_connect(addr: &str, auth: &str, device: u64) -> Result<Ws> {
    let mut req = format!("ws://{addr}/v1/chat?bot_id=7000000000000000001&device_id={device}")
        .into_client_request()?;
    req.headers_mut().insert("Authorization", auth.parse()?);
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| anyhow!("handshake timed out"))??;
    if resp.status().as_u16() != 101 {
        return Err(anyhow!("handshake status {}", resp.status()));
    }
    Ok(ws)
}

/// Sends a Close and reads until the peer's Close (or the end of the stream); true if the
/// close handshake completed.
async fn close_ws(ws: &mut Ws) -> bool {
    if ws.close(None).await.is_err() {
        return false;
    }
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
            }
        }
    })
    .await;
    matches!(r, Ok(true))
}

/// One voice-like session; Err on handshake failure, an `error` event, an early end or a
/// timeout. Ok(clean close) otherwise.
async fn voice_turn(addr: &str, auth: &str, device: u64, frames: usize) -> Result<bool> {
    let mut ws = ws_connect(addr, auth, device).await?;
    let pcm = base64::engine::general_purpose::STANDARD.encode([0u8; 640]);
    let append = format!(
        r#"{{"id":"a","event_type":"input_audio_buffer.append","data":{{"delta":"{pcm}"}}}}"#
    );
    let update = r#"{"id":"u","event_type":"chat.update","data":{"input_audio":{"format":"pcm","codec":"pcm","sample_rate":16000,"channel":1,"bit_depth":16}}}"#;
    let complete = r#"{"id":"c","event_type":"input_audio_buffer.complete"}"#;
    ws.send(Message::text(update)).await?;
    for _ in 0..frames {
        tokio::time::sleep(Duration::from_millis(20)).await;
        ws.send(Message::text(append.clone())).await?;
    }
    ws.send(Message::text(complete)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen_completed_buffer = false;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("no conversation.chat.completed within 30 s"))?;
        let t = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => return Err(anyhow!("closed by the gateway: {c:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(anyhow!("read error: {e}")),
            None => return Err(anyhow!("stream ended without a close frame")),
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str())?;
        match v["event_type"].as_str().unwrap_or_default() {
            "error" | "conversation.chat.failed" => {
                return Err(anyhow!(
                    "{}",
                    t.as_str().chars().take(300).collect::<String>()
                ));
            }
            "input_audio_buffer.completed" => seen_completed_buffer = true,
            "conversation.chat.completed" => break,
            _ => {}
        }
    }
    if !seen_completed_buffer {
        return Err(anyhow!(
            "conversation.chat.completed before input_audio_buffer.completed"
        ));
    }
    Ok(close_ws(&mut ws).await)
}

/// Holds one idle session until `stop`; pings every 60 s.
async fn idle_session(
    mut ws: Ws,
    mut stop: watch::Receiver<bool>,
    c: Arc<Counters>,
    fe: Arc<FirstErrors>,
) {
    let mut ping = tokio::time::interval(Duration::from_secs(60));
    ping.tick().await;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Close(f))) => {
                    c.idle_err.fetch_add(1, Ordering::Relaxed);
                    fe.note("idle", || format!("idle session closed by the gateway: {f:?}"));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    c.idle_err.fetch_add(1, Ordering::Relaxed);
                    fe.note("idle", || format!("idle session read error: {e}"));
                    return;
                }
                None => {
                    c.idle_err.fetch_add(1, Ordering::Relaxed);
                    fe.note("idle", || "idle session ended without a close frame".to_owned());
                    return;
                }
            },
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(Vec::from(&b"soak"[..]).into())).await {
                    c.idle_err.fetch_add(1, Ordering::Relaxed);
                    fe.note("idle", || format!("idle session ping failed: {e}"));
                    return;
                }
            }
            _ = stop.changed() => {
                if !close_ws(&mut ws).await {
                    c.idle_unclean_close.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

const SSE_BODY: &str = r#"{"bot_id":"bench","user_id":"u1","stream":true,"additional_messages":[{"role":"user","content":"hello","content_type":"text"}]}"#;

async fn sse_stream(client: &reqwest::Client, url: &str, auth: &str) -> Result<()> {
    let resp = client
        .post(url)
        .header("Authorization", auth)
        .header("Content-Type", "application/json")
        .body(SSE_BODY)
        .send()
        .await?;
    if resp.status().as_u16() != 200 {
        let s = resp.status();
        return Err(anyhow!(
            "status {s}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let body = resp.bytes().await?;
    let text = String::from_utf8_lossy(&body);
    if !text.contains("event:conversation.chat.completed\n")
        || !text.ends_with("event:done\ndata:\"[DONE]\"\n\n")
    {
        return Err(anyhow!(
            "stream incomplete ({} bytes, tail {:?})",
            body.len(),
            text.chars()
                .rev()
                .take(120)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        ));
    }
    Ok(())
}

pub async fn run(
    bin_dir: &std::path::Path,
    threads: usize,
    cfg: &SoakConfig,
    command: String,
    machine: String,
    started_unix_s: u64,
) -> Result<SoakOutcome> {
    let sandbox = Sandbox::start(bin_dir, 20, 16).await?;
    let gateway = Gateway::start(bin_dir, &sandbox.base_url, threads, &[], None).await?;
    let token = gateway
        .register(&["bench-0".to_owned()])
        .await?
        .pop()
        .ok_or_else(|| anyhow!("no token minted"))?;
    let auth = format!("Bearer {token}");
    let addr = gateway.device_addr.clone();
    let pid = gateway.pid;
    let ports = Ports {
        upstream: port_of(&sandbox.addr),
        device: port_of(&gateway.device_addr),
        admin: port_of(&gateway.admin),
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline_fds = fd_snapshot(pid, &ports);
    let baseline_rss = rss(pid);
    eprintln!(
        "[soak] gateway pid {pid}: baseline {} fds, RSS {:.1} MiB; {:.0} s of load",
        baseline_fds.total,
        baseline_rss as f64 / MIB,
        cfg.secs
    );

    let c = Arc::new(Counters::default());
    let fe = Arc::new(FirstErrors::default());

    // Idle sessions, opened before the clock starts.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut idle_tasks = Vec::new();
    {
        let opened: Vec<Result<Ws>> = futures_util::stream::iter(0..cfg.ws_idle)
            .map(|i| {
                let (addr, auth) = (addr.clone(), auth.clone());
                async move { ws_connect(&addr, &auth, 2_000_000 + i as u64).await }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for r in opened {
            match r {
                Ok(ws) => {
                    c.idle_open.fetch_add(1, Ordering::Relaxed);
                    idle_tasks.push(tokio::spawn(idle_session(
                        ws,
                        stop_rx.clone(),
                        c.clone(),
                        fe.clone(),
                    )));
                }
                Err(e) => {
                    c.idle_err.fetch_add(1, Ordering::Relaxed);
                    fe.note("idle", || format!("idle handshake: {e:#}"));
                }
            }
        }
    }

    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(cfg.secs);
    let mut workers = Vec::new();

    // REST, open loop at a fixed rate (0 disables it).
    let rest_lat = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    if cfg.rest_rps > 0.0 {
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(10))
            .build()?;
        let url = format!("http://{addr}{PATH}");
        let (auth, c, fe, lat) = (auth.clone(), c.clone(), fe.clone(), rest_lat.clone());
        let rps = cfg.rest_rps;
        workers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = Vec::new();
            while Instant::now() < end {
                tick.tick().await;
                let (client, url, auth, c, fe, lat) = (
                    client.clone(),
                    url.clone(),
                    auth.clone(),
                    c.clone(),
                    fe.clone(),
                    lat.clone(),
                );
                inflight.push(tokio::spawn(async move {
                    let s = Instant::now();
                    let r = client.get(&url).header("Authorization", auth).send().await;
                    let res = match r {
                        Ok(resp) if resp.status().as_u16() == 200 => resp
                            .bytes()
                            .await
                            .map(|_| ())
                            .map_err(|e| format!("body: {e}")),
                        Ok(resp) => Err(format!("status {}", resp.status())),
                        Err(e) => Err(format!("{e}")),
                    };
                    match res {
                        Ok(()) => {
                            c.rest_ok.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut v) = lat.lock() {
                                v.push(s.elapsed().as_micros() as u64);
                            }
                        }
                        Err(e) => {
                            c.rest_err.fetch_add(1, Ordering::Relaxed);
                            fe.note("rest", || e);
                        }
                    }
                }));
                if inflight.len() >= 1024 {
                    inflight.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
                }
            }
            for h in inflight {
                let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
            }
        }));
    }

    // SSE streams, back to back.
    {
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(cfg.sse_streams)
            .timeout(Duration::from_secs(30))
            .build()?;
        let url = format!("http://{addr}/v3/chat");
        for _ in 0..cfg.sse_streams {
            let (client, url, auth, c, fe) = (
                client.clone(),
                url.clone(),
                auth.clone(),
                c.clone(),
                fe.clone(),
            );
            workers.push(tokio::spawn(async move {
                while Instant::now() < end {
                    match sse_stream(&client, &url, &auth).await {
                        Ok(()) => {
                            c.sse_ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            c.sse_err.fetch_add(1, Ordering::Relaxed);
                            fe.note("sse", || format!("{e:#}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
    }

    // WebSocket voice-like sessions, back to back.
    for w in 0..cfg.ws_churn {
        let (addr, auth, c, fe) = (addr.clone(), auth.clone(), c.clone(), fe.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let device = 3_000_000 + (w as u64) * 1_000_000 + n;
                n += 1;
                match voice_turn(&addr, &auth, device, 5).await {
                    Ok(clean) => {
                        c.ws_ok.fetch_add(1, Ordering::Relaxed);
                        if !clean {
                            c.ws_unclean_close.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        c.ws_err.fetch_add(1, Ordering::Relaxed);
                        fe.note("ws", || format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }

    // Sampler.
    let mut samples = Vec::new();
    let mut next = t0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next {
            let s = Sample {
                t_s: t0.elapsed().as_secs_f64(),
                rss_bytes: rss(pid),
                fds: 0,
                fd_kinds: BTreeMap::new(),
                counters: c.snapshot(),
            };
            let f = fd_snapshot(pid, &ports);
            let s = Sample {
                fds: f.total,
                fd_kinds: f.kinds,
                ..s
            };
            let k = &s.counters;
            eprintln!(
                "[soak] t={:>5.0}s RSS {:>6.1} MiB fds {:>4}  rest {}/{} sse {}/{} ws {}/{} idle {}/{}",
                s.t_s,
                s.rss_bytes as f64 / MIB,
                s.fds,
                k["rest_ok"],
                k["rest_err"],
                k["sse_ok"],
                k["sse_err"],
                k["ws_ok"],
                k["ws_err"],
                k["idle_open"],
                k["idle_err"]
            );
            samples.push(s);
            next += cfg.sample_every;
        }
        tokio::time::sleep_until(next.min(end).into()).await;
    }
    // Last sample at the end of the load (still under load, idle sessions open).
    {
        let f = fd_snapshot(pid, &ports);
        samples.push(Sample {
            t_s: t0.elapsed().as_secs_f64(),
            rss_bytes: rss(pid),
            fds: f.total,
            fd_kinds: f.kinds,
            counters: c.snapshot(),
        });
    }
    eprintln!("[soak] load over; waiting for clients, closing idle sessions");
    for w in workers {
        if tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .is_err()
        {
            eprintln!("[soak] a load worker did not finish in 60 s");
        }
    }
    let _ = stop_tx.send(true);
    for t in idle_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    // All client objects (and their keep-alive pools) are dropped with the workers.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let end_fds = fd_snapshot(pid, &ports);
    let end_rss = rss(pid);
    eprintln!(
        "[soak] end: {} fds (baseline {}), RSS {:.1} MiB: {:?}",
        end_fds.total,
        baseline_fds.total,
        end_rss as f64 / MIB,
        end_fds.kinds
    );
    let drained_fds = if cfg.drain_wait > Duration::ZERO {
        eprintln!(
            "[soak] waiting {:.0} s for the upstream pool to expire",
            cfg.drain_wait.as_secs_f64()
        );
        tokio::time::sleep(cfg.drain_wait).await;
        let d = fd_snapshot(pid, &ports);
        eprintln!(
            "[soak] after the pool idle timeout: {} fds: {:?}",
            d.total, d.kinds
        );
        Some(d)
    } else {
        None
    };
    let alive = rss(pid) > 0;

    // Verdict.
    let totals = c.snapshot();
    let first_errors = fe.0.lock().map(|m| m.clone()).unwrap_or_default();
    let mut lat = rest_lat.lock().map(|v| v.clone()).unwrap_or_default();
    let rest_latency_us = BTreeMap::from([
        ("p50", pct(&mut lat, 50.0)),
        ("p99", pct(&mut lat, 99.0)),
        ("p99.9", pct(&mut lat, 99.9)),
        ("max", pct(&mut lat, 100.0)),
    ]);
    let mut checks = Vec::new();
    let mut check = |name: &str, pass: bool, detail: String| {
        checks.push(Check {
            name: name.to_owned(),
            pass,
            detail,
        })
    };
    check(
        "gateway alive",
        alive,
        format!("pid {pid} {}", if alive { "running" } else { "gone" }),
    );
    let enabled = [
        cfg.rest_rps > 0.0,
        cfg.sse_streams > 0,
        cfg.ws_churn > 0,
        cfg.ws_idle > 0,
    ];
    for ((kind, ok, err, what), on) in [
        ("REST", "rest_ok", "rest_err", "non-200 or transport error"),
        (
            "SSE",
            "sse_ok",
            "sse_err",
            "non-200, transport error or stream without chat.completed + done",
        ),
        (
            "WebSocket churn",
            "ws_ok",
            "ws_err",
            "handshake failure, error event, close or end before conversation.chat.completed, 30 s timeout",
        ),
        (
            "WebSocket idle",
            "idle_open",
            "idle_err",
            "handshake failure or closed/ended before the end of the run",
        ),
    ]
    .into_iter()
    .zip(enabled)
    {
        let e = totals[err];
        check(
            &format!("{kind} errors = 0"),
            e == 0 && (totals[ok] > 0 || !on),
            format!(
                "{} ok, {e} errors ({what}){}",
                totals[ok],
                first_errors
                    .get(match kind {
                        "REST" => "rest",
                        "SSE" => "sse",
                        "WebSocket churn" => "ws",
                        _ => "idle",
                    })
                    .map_or(String::new(), |m| format!("; first: {m}"))
            ),
        );
    }
    let expected_rest = (cfg.rest_rps * cfg.secs) as u64;
    check(
        "REST rate sustained",
        totals["rest_ok"] + totals["rest_err"] >= expected_rest * 95 / 100,
        format!(
            "{} requests sent of {expected_rest} scheduled",
            totals["rest_ok"] + totals["rest_err"]
        ),
    );

    // RSS: warm-up = first 20 % of the run; reference = median of the samples in (20 %, 33 %];
    // final = median of the samples in the last third; plus a least-squares slope over all
    // post-warm-up samples.
    let during: Vec<&Sample> = samples.iter().filter(|s| s.t_s <= cfg.secs + 1.0).collect();
    let post: Vec<&Sample> = during
        .iter()
        .copied()
        .filter(|s| s.t_s >= 0.2 * cfg.secs)
        .collect();
    let ref_set: Vec<f64> = post
        .iter()
        .filter(|s| s.t_s <= cfg.secs / 3.0 + 0.5)
        .map(|s| s.rss_bytes as f64)
        .collect();
    let fin_set: Vec<f64> = post
        .iter()
        .filter(|s| s.t_s >= cfg.secs * 2.0 / 3.0)
        .map(|s| s.rss_bytes as f64)
        .collect();
    let post_med = median(&post.iter().map(|s| s.rss_bytes as f64).collect::<Vec<_>>());
    let reference = median(&ref_set).or(post_med).unwrap_or(0.0);
    let fin = median(&fin_set).unwrap_or(0.0);
    let growth = fin - reference;
    let allowed = (reference * RSS_MAX_GROWTH_FRACTION).min(RSS_MAX_GROWTH_BYTES);
    let (slope, _) = fit(&post
        .iter()
        .map(|s| (s.t_s / 60.0, s.rss_bytes as f64))
        .collect::<Vec<_>>());
    let span_min = post
        .last()
        .zip(post.first())
        .map_or(0.0, |(l, f)| (l.t_s - f.t_s) / 60.0);
    let fitted_growth = slope * span_min;
    let max_rss = samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0);
    check(
        "RSS flat after warm-up (last-third median)",
        !ref_set.is_empty() && !fin_set.is_empty() && growth <= allowed,
        format!(
            "reference (20–33 % of the run, {} samples) {:.2} MiB, last third ({} samples) {:.2} MiB: {:+.2} MiB; allowed +{:.2} MiB (min of +{:.0} % and +{:.0} MiB)",
            ref_set.len(),
            reference / MIB,
            fin_set.len(),
            fin / MIB,
            growth / MIB,
            allowed / MIB,
            RSS_MAX_GROWTH_FRACTION * 100.0,
            RSS_MAX_GROWTH_BYTES / MIB
        ),
    );
    check(
        "RSS flat after warm-up (fitted slope)",
        post.len() >= 3 && fitted_growth <= allowed,
        format!(
            "least-squares slope over {} post-warm-up samples {:+.3} MiB/min, × {:.1} min = {:+.2} MiB; allowed +{:.2} MiB",
            post.len(),
            slope / MIB,
            span_min,
            fitted_growth / MIB,
            allowed / MIB
        ),
    );
    // Upstream sockets (the keep-alive pool) get the pool allowance; the harness's own admin
    // API connection (its client's idle timeout closes it) is left out of both sides.
    let up = |f: &FdSnapshot| f.get("tcp upstream");
    let other = |f: &FdSnapshot| f.total - up(f) - f.get("tcp admin client");
    let d_total = end_fds.total - baseline_fds.total;
    let d_other = other(&end_fds) - other(&baseline_fds);
    let end_detail = format!(
        "baseline {} → end {} ({d_total:+}); upstream sockets {} → {}; all other fds except the harness's admin connection {d_other:+} (allowed ±{FD_OTHER_ALLOWANCE}); device-client sockets at the end: {}",
        baseline_fds.total,
        end_fds.total,
        up(&baseline_fds),
        up(&end_fds),
        end_fds.get("tcp device client")
    );
    match &drained_fds {
        // The leak check proper: once the pool's idle timeout has passed, nothing but the
        // baseline is left (the pooled upstream sockets included).
        Some(d) => {
            let d_drained = other(d) - other(&baseline_fds);
            check(
                "fds back to baseline",
                d_other.abs() <= FD_OTHER_ALLOWANCE
                    && up(d) <= up(&baseline_fds)
                    && d_drained.abs() <= FD_OTHER_ALLOWANCE,
                format!(
                    "{end_detail}; after the pool idle timeout: {} fds, upstream sockets {} (allowed ≤ {}), all other fds except the harness's admin connection {d_drained:+} (allowed ±{FD_OTHER_ALLOWANCE})",
                    d.total,
                    up(d),
                    up(&baseline_fds)
                ),
            );
        }
        None => check(
            "fds back to baseline",
            d_total <= FD_POOL_ALLOWANCE && d_other.abs() <= FD_OTHER_ALLOWANCE,
            format!(
                "{end_detail}; upstream sockets allowed ≤ +{FD_POOL_ALLOWANCE} in total (keep-alive pool; no drain wait)"
            ),
        ),
    }
    let pass = checks.iter().all(|c| c.pass);
    let rss_json = serde_json::json!({
        "criterion": format!("warm-up = first 20 % of the run; reference = median RSS of the samples in 20–33 % of the run; final = median of the samples in the last third; pass if final − reference ≤ min({:.0} % of reference, {:.0} MiB) and the least-squares slope over all post-warm-up samples × their span ≤ the same bound", RSS_MAX_GROWTH_FRACTION * 100.0, RSS_MAX_GROWTH_BYTES / MIB),
        "reference_bytes": reference,
        "final_bytes": fin,
        "post_warmup_median_bytes": post_med,
        "growth_bytes": growth,
        "allowed_bytes": allowed,
        "slope_bytes_per_min": slope,
        "fitted_growth_bytes": fitted_growth,
        "max_bytes": max_rss,
    });
    let config = serde_json::json!({
        "duration_s": cfg.secs,
        "rest_rps": cfg.rest_rps,
        "sse_streams": cfg.sse_streams,
        "ws_churn_clients": cfg.ws_churn,
        "ws_idle_sessions": cfg.ws_idle,
        "sample_every_s": cfg.sample_every.as_secs_f64(),
        "drain_wait_s": cfg.drain_wait.as_secs_f64(),
        "gateway_threads": threads,
        "fd_pool_allowance": FD_POOL_ALLOWANCE,
        "fd_other_allowance": FD_OTHER_ALLOWANCE,
    });
    let (mut g, mut s) = (gateway, sandbox);
    let _ = g.child.kill().await;
    let _ = s.child.kill().await;
    Ok(SoakOutcome {
        command,
        machine,
        started_unix_s,
        config,
        baseline_rss_bytes: baseline_rss,
        baseline_fds,
        samples,
        end_fds,
        drained_fds,
        end_rss_bytes: end_rss,
        totals,
        first_errors,
        rest_latency_us,
        rss: rss_json,
        checks,
        pass,
    })
}

/// Least-squares line through (x, y): (slope, intercept).
fn fit(pts: &[(f64, f64)]) -> (f64, f64) {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return (0.0, pts.first().map_or(0.0, |p| p.1));
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (slope, my - slope * mx)
}

impl SoakOutcome {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Command: `{}`  ", self.command);
        let _ = writeln!(s, "Machine: {}  ", self.machine);
        let c = &self.config;
        let _ = writeln!(
            s,
            "Load: {} s; REST GET {PATH} at {} req/s (open loop); {} SSE chat streams back to back; {} WebSocket voice-like sessions back to back; {} idle WebSocket sessions held for the whole run. Gateway threads {}. Samples every {} s.\n",
            c["duration_s"],
            c["rest_rps"],
            c["sse_streams"],
            c["ws_churn_clients"],
            c["ws_idle_sessions"],
            c["gateway_threads"],
            c["sample_every_s"]
        );
        let _ = writeln!(
            s,
            "**Verdict: {}**\n",
            if self.pass { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(s, "| check | result | detail |");
        let _ = writeln!(s, "|---|---|---|");
        for ch in &self.checks {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                ch.name,
                if ch.pass { "pass" } else { "**FAIL**" },
                ch.detail
            );
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "\nTotals: REST {} ok / {} errors (latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs); SSE {} ok / {} errors; WebSocket churn {} ok / {} errors ({} without a completed close handshake); idle {} open / {} errors ({} without a completed close handshake).\n",
            t["rest_ok"],
            t["rest_err"],
            self.rest_latency_us["p50"],
            self.rest_latency_us["p99"],
            self.rest_latency_us["p99.9"],
            self.rest_latency_us["max"],
            t["sse_ok"],
            t["sse_err"],
            t["ws_ok"],
            t["ws_err"],
            t["ws_unclean_close"],
            t["idle_open"],
            t["idle_err"],
            t["idle_unclean_close"]
        );
        let kinds = |f: &FdSnapshot| {
            f.kinds
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "RSS: baseline (before load) {:.2} MiB, max {:.2} MiB, after the clients left {:.2} MiB; slope after warm-up {:+.3} MiB/min.\n",
            self.baseline_rss_bytes as f64 / MIB,
            self.rss["max_bytes"].as_f64().unwrap_or(0.0) / MIB,
            self.end_rss_bytes as f64 / MIB,
            self.rss["slope_bytes_per_min"].as_f64().unwrap_or(0.0) / MIB
        );
        let _ = write!(
            s,
            "fds: baseline {} ({}); end, 5 s after the clients left: {} ({})",
            self.baseline_fds.total,
            kinds(&self.baseline_fds),
            self.end_fds.total,
            kinds(&self.end_fds)
        );
        if let Some(d) = &self.drained_fds {
            let _ = write!(
                s,
                "; after a further {} s (upstream pool idle timeout 60 s): {} ({})",
                c["drain_wait_s"],
                d.total,
                kinds(d)
            );
        }
        let _ = writeln!(s, ".");
        let _ = writeln!(
            s,
            "\nRSS criterion: {}\n",
            self.rss["criterion"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            s,
            "| t (s) | RSS (MiB) | fds | device-client sockets | upstream sockets | REST ok | SSE ok | WS sessions ok | errors (all kinds) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for x in &self.samples {
            let k = &x.counters;
            let g = |n: &str| x.fd_kinds.get(n).copied().unwrap_or(0);
            let _ = writeln!(
                s,
                "| {:.0} | {:.2} | {} | {} | {} | {} | {} | {} | {} |",
                x.t_s,
                x.rss_bytes as f64 / MIB,
                x.fds,
                g("tcp device client"),
                g("tcp upstream"),
                k["rest_ok"],
                k["sse_ok"],
                k["ws_ok"],
                k["rest_err"] + k["sse_err"] + k["ws_err"] + k["idle_err"]
            );
        }
        s
    }
}
