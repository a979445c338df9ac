//! The processes under test: the sandbox upstream, `fleetgate serve`, nginx and the bare
//! pingora proxy (`pingora-bare`), each a child process on loopback (killed on drop), plus
//! `/proc` readers for their CPU time and RSS.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
pub const PAT: &str = "pat_sandbox";
const SIGNING_KEY: [u8; 32] = [42; 32];
const KID: &str = "b1";

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "fleetgate-load-{tag}-{}-{nanos:x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads the first stdout line of a child (its readiness JSON), bounded in time.
async fn ready_line(child: &mut Child, what: &str, log: &Path) -> Result<serde_json::Value> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{what}: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .map_err(|_| anyhow!("{what} not ready in 60 s; log {}", log.display()))??
        .ok_or_else(|| {
            anyhow!(
                "{what} exited before it was ready: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    serde_json::from_str(&line).with_context(|| format!("{what} readiness line {line:?}"))
}

pub struct Sandbox {
    pub child: Child,
    pub pid: u32,
    pub base_url: String,
    pub addr: String,
    _dir: TempDir,
}

impl Sandbox {
    pub async fn start(bin_dir: &Path, sse_delay_ms: u64, chat_deltas: usize) -> Result<Sandbox> {
        let dir = TempDir::new("sandbox")?;
        let log = dir.0.join("sandbox.log");
        let mut child = Command::new(bin_dir.join("sandbox"))
            .args(["--bind", "127.0.0.1:0", "--sse-delay-ms"])
            .arg(sse_delay_ms.to_string())
            .arg("--chat-deltas")
            .arg(chat_deltas.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}/sandbox", bin_dir.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("sandbox has no pid"))?;
        let ready = ready_line(&mut child, "sandbox", &log).await?;
        let base_url = ready["base_url"]
            .as_str()
            .ok_or_else(|| anyhow!("sandbox readiness without base_url: {ready}"))?
            .trim_end_matches('/')
            .to_owned();
        let addr = base_url.trim_start_matches("http://").to_owned();
        Ok(Sandbox {
            child,
            pid,
            base_url,
            addr,
            _dir: dir,
        })
    }
}

pub struct Gateway {
    pub child: Child,
    pub pid: u32,
    pub device_addr: String,
    pub admin: String,
    pub http: reqwest::Client,
    bin_dir: PathBuf,
    wrap: Vec<String>,
    _dir: TempDir,
}

/// A started `fleetgate serve`: the child and what its readiness line said.
struct Spawned {
    child: Child,
    pid: u32,
    device_addr: String,
    admin: String,
}

/// `bin` as a command, or `wrap[0] wrap[1..] bin` when a wrapper (e.g. valgrind) is given.
fn command(wrap: &[String], bin: &Path) -> Command {
    match wrap.split_first() {
        None => Command::new(bin),
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
    }
}

/// Spawns `fleetgate serve` on the config in `dir` and waits for its readiness line (written
/// once the store is loaded and the listeners are up).
async fn spawn_gateway(bin_dir: &Path, dir: &Path, wrap: &[String]) -> Result<Spawned> {
    let cfg = dir.join("config.toml");
    let log = dir.join("gateway.log");
    let key = base64::engine::general_purpose::STANDARD.encode(SIGNING_KEY);
    let mut child = command(wrap, &bin_dir.join("fleetgate"))
        .args(["serve", "--ready-json", "-c"])
        .arg(&cfg)
        .env("FG_BENCH_ADMIN", ADMIN_TOKEN)
        .env("FG_BENCH_PAT", PAT)
        .env("FG_BENCH_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?,
        ))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}/fleetgate", bin_dir.display()))?;
    let pid = child.id().ok_or_else(|| anyhow!("fleetgate has no pid"))?;
    let ready = ready_line(&mut child, "fleetgate", &log).await?;
    let device_addr = ready["device_addr"]
        .as_str()
        .ok_or_else(|| anyhow!("no device_addr in {ready}"))?
        .to_owned();
    let admin = format!(
        "http://{}",
        ready["admin_addr"]
            .as_str()
            .ok_or_else(|| anyhow!("no admin_addr in {ready}"))?
    );
    Ok(Spawned {
        child,
        pid,
        device_addr,
        admin,
    })
}

/// The store's usage flush interval when the gateway runs under a wrapper (`load instr`:
/// valgrind, ~50× slower than native). The default is 100 ms of wall time; 50× that keeps the
/// flushes per request what they are at full speed, instead of charging requests 50× the
/// flush work.
pub const WRAPPED_PERSIST_INTERVAL: &str = "5s";

impl Gateway {
    /// `fleetgate serve` on the full policy path: token verification, rate limit (enabled,
    /// high), quota check and charge (one generous fleet-wide rule), PAT injection, metering.
    /// `wrap`: a command the binary runs under (empty: none), e.g. valgrind; the usage flush
    /// then runs every [`WRAPPED_PERSIST_INTERVAL`].
    /// `tls`: serve devices over TLS with these files (`[device_listener.tls]`).
    pub async fn start(
        bin_dir: &Path,
        upstream: &str,
        threads: usize,
        wrap: &[String],
        tls: Option<&TlsFiles>,
    ) -> Result<Gateway> {
        let dir = TempDir::new("gateway")?;
        let config = format!(
            r#"
[server]
threads = {threads}
grace_period = "1s"
drain_delay = "0s"
[device_listener]
addr = "127.0.0.1:0"
{tls}
[admin_listener]
addr = "127.0.0.1:0"
token_env = "FG_BENCH_ADMIN"
[upstream]
base_url = "{upstream}"
auth = "pat"
pat_env = "FG_BENCH_PAT"
connect_timeout = "2s"
read_timeout = "30s"
stream_idle_timeout = "120s"
[tokens]
signing_keys = [{{ kid = "{KID}", secret_env = "FG_BENCH_KEY" }}]
[rate_limits]
device_rps = 1000000
[log]
format = "json"
level = "warn"
access_log = false
[store]
path = "{store}"
{timers}"#,
            store = dir.0.join("store.redb").display(),
            tls = tls.map_or(String::new(), |t| format!(
                "[device_listener.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"",
                t.cert.display(),
                t.key.display()
            )),
            timers = if wrap.is_empty() {
                String::new()
            } else {
                format!("[quota]\npersist_interval = \"{WRAPPED_PERSIST_INTERVAL}\"\n")
            },
        );
        std::fs::write(dir.0.join("config.toml"), config)?;
        let sp = spawn_gateway(bin_dir, &dir.0, wrap).await?;
        let gw = Gateway {
            child: sp.child,
            pid: sp.pid,
            device_addr: sp.device_addr,
            admin: sp.admin,
            http: reqwest::Client::builder().no_proxy().build()?,
            bin_dir: bin_dir.to_owned(),
            wrap: wrap.to_vec(),
            _dir: dir,
        };
        gw.fleet_rule().await?;
        Ok(gw)
    }

    /// Stops the gateway (SIGTERM: a graceful shutdown that flushes the store) and starts it
    /// again on the same config and store; returns the seconds from spawn to ready (the
    /// start-up load of every stored device and rule).
    pub async fn restart(&mut self) -> Result<f64> {
        terminate(&mut self.child, self.pid, "fleetgate").await?;
        let t = Instant::now();
        let sp = spawn_gateway(&self.bin_dir, &self._dir.0, &self.wrap).await?;
        let secs = t.elapsed().as_secs_f64();
        self.child = sp.child;
        self.pid = sp.pid;
        self.device_addr = sp.device_addr;
        self.admin = sp.admin;
        Ok(secs)
    }

    /// One `enterprise_all_devices` request quota, far above what a run can use, so every
    /// request goes through the ledger's check and charge.
    async fn fleet_rule(&self) -> Result<()> {
        let body = serde_json::json!({
            "entity_type": "enterprise_all_devices",
            "benefit_info": {
                "benefit_type": "requests", "started_at": 0, "ended_at": policy::quota::FOREVER,
                "limit": 1_000_000_000_000u64, "trigger_unit": "never"
            }
        });
        self.admin_post("/v1/commerce/benefit/limitations", &body)
            .await
            .context("creating the fleet quota rule")
    }

    /// A `single_device` request quota for `device` (the many-devices scenario).
    pub async fn device_rule(&self, device: &str) -> Result<()> {
        let body = serde_json::json!({
            "entity_type": "single_device", "entity_id": device,
            "benefit_info": {
                "benefit_type": "requests", "started_at": 0, "ended_at": policy::quota::FOREVER,
                "limit": 1_000_000_000u64, "trigger_unit": "never"
            }
        });
        self.admin_post("/v1/commerce/benefit/limitations", &body)
            .await
    }

    pub async fn admin_post(&self, path: &str, body: &serde_json::Value) -> Result<()> {
        let r = self
            .http
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await?;
        let status = r.status();
        if !status.is_success() {
            bail!("{path}: {status}: {}", r.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// Registers `ids` and gets a 24 h token for each, through the admin API's bulk routes
    /// (10,000 devices per call).
    pub async fn register(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut tokens = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(10_000) {
            let devices: Vec<_> = chunk
                .iter()
                .map(|id| serde_json::json!({ "device_id": id }))
                .collect();
            self.admin_post(
                "/admin/v1/devices",
                &serde_json::json!({ "devices": devices }),
            )
            .await?;
            let r: serde_json::Value = self
                .http
                .post(format!("{}/admin/v1/tokens", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&serde_json::json!({ "device_ids": chunk, "duration_seconds": 86_400 }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let minted = r["tokens"].as_array().map_or(&[][..], |t| t.as_slice());
            if minted.len() != chunk.len() {
                bail!(
                    "/admin/v1/tokens: {} of {} minted: {}",
                    minted.len(),
                    chunk.len(),
                    r["errors"]
                );
            }
            for t in minted {
                let token = t["access_token"]
                    .as_str()
                    .ok_or_else(|| anyhow!("/admin/v1/tokens: an entry without access_token"))?;
                tokens.push(token.to_owned());
            }
        }
        Ok(tokens)
    }
}

/// Sends SIGTERM to `pid` and waits (60 s at most) for `child` to exit: a graceful stop
/// (fleetgate flushes its store; nginx's master stops its workers, which SIGKILL would orphan).
async fn terminate(child: &mut Child, pid: u32, what: &str) -> Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    if !status.success() {
        bail!("kill -TERM {pid} ({what}) failed");
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .map_err(|_| anyhow!("{what} did not stop within 60 s of SIGTERM"))??;
    Ok(())
}

pub struct Nginx {
    pub child: Child,
    pub pid: u32,
    pub addr: String,
    _dir: TempDir,
}

impl Nginx {
    /// Stops the master and its workers (killing only the master would orphan the workers).
    pub async fn stop(&mut self) {
        if terminate(&mut self.child, self.pid, "nginx").await.is_err() {
            let _ = self.child.kill().await;
        }
    }

    /// `nginx` on PATH (or /usr/sbin/nginx), if installed.
    pub fn binary() -> Option<PathBuf> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/sbin")])
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    }

    /// A plain reverse proxy in the foreground: `worker_processes` workers, keepalive pool to
    /// the sandbox, the PAT set on every request, WebSocket upgrades passed, no buffering.
    /// `tls`: `listen … ssl` with these files.
    pub async fn start(
        bin: &Path,
        upstream_addr: &str,
        workers: usize,
        tls: Option<&TlsFiles>,
    ) -> Result<Nginx> {
        let dir = TempDir::new("nginx")?;
        let port = free_port()?;
        let d = dir.0.display();
        let conf = format!(
            r#"
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 19000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 19000; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream sandbox {{ server {upstream_addr}; keepalive 256; keepalive_requests 1000000; }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096{ssl};
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://sandbox;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Authorization "Bearer {PAT}";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }}
  }}
}}
"#,
            ssl = tls.map_or(String::new(), |t| format!(
                " ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3",
                t.cert.display(),
                t.key.display()
            )),
        );
        let cfg = dir.0.join("nginx.conf");
        std::fs::write(&cfg, conf)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&cfg)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.0.join("stderr.log"),
            )?))
            .kill_on_drop(true)
            .spawn()
            .context("spawning nginx")?;
        let pid = child.id().ok_or_else(|| anyhow!("nginx has no pid"))?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nginx did not listen on {addr}: {}",
                    std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Nginx {
            child,
            pid,
            addr,
            _dir: dir,
        })
    }
}

/// A server certificate and key (PEM) for the TLS runs (`--tls`).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The test fixtures' EC P-256 server certificate (`tests/fixtures/tls/redis-node.{pem,key}`,
    /// for 127.0.0.1). ECDSA, as a fleet's gateway would use: an RSA-2048 key makes each full
    /// handshake ~3× dearer for the server (RESULTS, "device TLS").
    pub fn fixtures() -> Result<TlsFiles> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls");
        let t = TlsFiles {
            cert: dir.join("redis-node.pem"),
            key: dir.join("redis-node.key"),
        };
        if !t.cert.is_file() || !t.key.is_file() {
            bail!("TLS fixtures not found under {}", dir.display());
        }
        Ok(t)
    }
}

/// `pingora-bare` (this package's bare pingora 0.9.1 reverse proxy): pingora's own HTTP/1
/// proxy path, keep-alive pool to the sandbox, the PAT set on every request, nothing else.
pub struct PingoraBare {
    pub child: Child,
    pub pid: u32,
    pub addr: String,
    _dir: TempDir,
}

impl PingoraBare {
    /// pingora's listener cannot bind port 0, so a free port is picked (bind :0, read, drop)
    /// and passed on; if the proxy does not come up on it (lost the port to someone else, or
    /// exited), it is killed and started again on another port, three attempts in all.
    /// `wrap` as for [`Gateway::start`].
    pub async fn start(
        bin_dir: &Path,
        upstream_addr: &str,
        threads: usize,
        wrap: &[String],
    ) -> Result<PingoraBare> {
        let dir = TempDir::new("pingora")?;
        let bin = bin_dir.join("pingora-bare");
        let mut last = String::new();
        for attempt in 1..=3 {
            let port = free_port()?;
            let addr = format!("127.0.0.1:{port}");
            let log = dir.0.join(format!("pingora-{attempt}.log"));
            let mut child = command(wrap, &bin)
                .arg("--listen")
                .arg(&addr)
                .arg("--upstream")
                .arg(upstream_addr)
                .arg("--threads")
                .arg(threads.to_string())
                .env("PINGORA_BARE_PAT", PAT)
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log)?))
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawning {}", bin.display()))?;
            let pid = child
                .id()
                .ok_or_else(|| anyhow!("pingora-bare has no pid"))?;
            // Under a wrapper such as valgrind start-up is many times slower.
            let wait = if wrap.is_empty() { 10 } else { 60 };
            let deadline = Instant::now() + Duration::from_secs(wait);
            let up = loop {
                if answers(&addr).await {
                    break true;
                }
                if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if up {
                return Ok(PingoraBare {
                    child,
                    pid,
                    addr,
                    _dir: dir,
                });
            }
            let _ = child.kill().await;
            last = format!(
                "attempt {attempt} on {addr}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            eprintln!("pingora-bare did not come up ({last}); retrying on another port");
        }
        bail!("pingora-bare did not come up after 3 attempts; last {last}")
    }
}

/// Whether `addr` answers an HTTP/1 request with a status line (any status): the listener is
/// up and it is the proxy, not some other process that took the port.
async fn answers(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await?;
        std::io::Result::Ok(buf.starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `pid` and its direct children (nginx workers).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if stat_fields(p).and_then(|f| f.get(1).and_then(|s| s.parse::<u32>().ok()))
                == Some(pid)
            {
                out.push(p);
            }
        }
    }
    out
}

/// Fields of `/proc/<pid>/stat` after the command name: index 0 = state, 1 = ppid, 11 =
/// utime, 12 = stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds (user + system) of a process tree, assuming the usual 100 ticks per second.
pub fn cpu_seconds(pid: u32) -> f64 {
    tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let t = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) as f64 / 100.0
        })
        .sum()
}

/// Resident set size of a process tree in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .sum()
}

/// Raises this process's soft fd limit to its hard limit (children inherit it); returns the
/// new soft limit. Uses `prlimit(1)` because the workspace forbids `unsafe`.
pub fn raise_fd_limit() -> u64 {
    let read = || -> Option<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/self/limits").ok()?;
        let l = s.lines().find(|l| l.starts_with("Max open files"))?;
        let mut it = l.split_whitespace().skip(3);
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    let Some((soft, hard)) = read() else {
        return 1024;
    };
    if soft < hard {
        let _ = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={hard}:{hard}"))
            .status();
    }
    read().map_or(soft, |(s, _)| s)
}
