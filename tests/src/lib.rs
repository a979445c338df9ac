//! The end-to-end harness: a sandbox upstream in-process, a real `fleetgate` process wired to
//! it, and device clients. Everything binds `127.0.0.1:0`; nothing is shared between tests.
//!
//! ```ignore
//! let up = sandbox_upstream(SandboxConfig::default()).await;
//! let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
//! let token = gw.register_device("dev-1").await;
//! ```
//!
//! The gateway binary is `target/<profile>/fleetgate` next to the test binary (build it with
//! `cargo build --bins`), or `$FLEETGATE_BIN`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use sandbox::{SandboxConfig, SandboxHandle};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const PAT: &str = "pat_sandbox";

/// Starts a sandbox upstream on a free port.
pub async fn sandbox_upstream(config: SandboxConfig) -> SandboxHandle {
    sandbox::start(config).await.expect("sandbox starts")
}

/// The output of a `fleetgate` command that must succeed (else: panics with its stderr).
pub fn succeeded(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Path of the `fleetgate` binary under test.
pub fn fleetgate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FLEETGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/e2e-<hash> → target/<profile>/fleetgate
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("fleetgate");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bins` first or set FLEETGATE_BIN",
        bin.display()
    );
    bin
}

/// Knobs for a gateway under test.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub upstream: String,
    pub extra_toml: String,
    pub grace_period: &'static str,
    /// Serving with readiness failed after SIGTERM (`server.drain_delay`).
    pub drain_delay: &'static str,
    pub ping_interval: &'static str,
    /// Extra lines of the `[websocket]` table (e.g. `handshake_timeout = "500ms"`).
    pub websocket_toml: String,
    /// Extra environment variables for the gateway process (e.g. `SSL_CERT_FILE`).
    pub env: Vec<(String, String)>,
    pub read_timeout: &'static str,
    pub stream_idle_timeout: &'static str,
    /// The embedded store file; `None` = a fresh one in the gateway's temp dir.
    pub store_path: Option<PathBuf>,
    /// `upstream.auth`: `"pat"` or `"jwt"` (then add an `[upstream.jwt]` table in `extra_toml`).
    pub upstream_auth: &'static str,
    /// Cluster mode: the body of the `[store.redis]` table (at least `url = "…"`).
    pub redis: Option<String>,
}

impl GatewayOptions {
    pub fn new(upstream: &str) -> GatewayOptions {
        GatewayOptions {
            upstream: upstream.to_owned(),
            extra_toml: String::new(),
            grace_period: "5s",
            drain_delay: "0s",
            ping_interval: "30s",
            websocket_toml: String::new(),
            env: Vec::new(),
            read_timeout: "10s",
            stream_idle_timeout: "10s",
            store_path: None,
            upstream_auth: "pat",
            redis: None,
        }
    }
}

/// A running `fleetgate serve` process. Killed on drop.
pub struct GatewayProcess {
    pub device: String,
    pub admin: String,
    pub device_addr: std::net::SocketAddr,
    pub child: Child,
    pub log_path: PathBuf,
    _dir: TempDir,
    pub http: reqwest::Client,
}

/// A `redis-server` process for cluster-mode tests, on a free loopback port, persisting with
/// AOF (`appendfsync always`) into its own directory, so a restart keeps the data. Killed on
/// drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: TempDir,
    extra: Vec<String>,
    /// Serves TLS only (the test CA's `localhost` / `127.0.0.1` certificate).
    tls: Option<TlsFiles>,
    /// `--requirepass` from the extra arguments: [`RedisServer::cli`] authenticates with it.
    password: Option<String>,
}

/// Certificate files (names under `tests/fixtures/tls`) a TLS-only Redis serves with.
#[derive(Clone, Copy, Debug)]
pub struct TlsFiles {
    pub cert: &'static str,
    pub key: &'static str,
    /// The CA that signed `cert` (clients trust it through `SSL_CERT_FILE`).
    pub ca: &'static str,
}

impl TlsFiles {
    /// The upstream's server certificate (server use only).
    pub const UPSTREAM: TlsFiles = TlsFiles {
        cert: "upstream.pem",
        key: "upstream.key",
        ca: "ca.pem",
    };
    /// Server and client use: Redis Cluster nodes present it to each other on the bus.
    pub const REDIS_NODE: TlsFiles = TlsFiles {
        cert: "redis-node.pem",
        key: "redis-node.key",
        ca: "redis-ca.pem",
    };
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments (e.g. `["--requirepass", "pw"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_inner(extra, None)
    }

    /// TLS only (`rediss://`), with the test CA's server certificate (`fixtures/tls`):
    /// clients trust it through `SSL_CERT_FILE` = [`fixture_path`]`("ca.pem")`.
    pub fn start_tls(extra: &[&str]) -> RedisServer {
        Self::start_inner(extra, Some(TlsFiles::UPSTREAM))
    }

    /// TLS only with the given certificate files.
    pub fn start_tls_with(extra: &[&str], files: TlsFiles) -> RedisServer {
        Self::start_inner(extra, Some(files))
    }

    fn start_inner(extra: &[&str], tls: Option<TlsFiles>) -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port: 0,
            dir: TempDir::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
            password: extra
                .iter()
                .position(|a| *a == "--requirepass")
                .and_then(|i| extra.get(i + 1))
                .map(|p| p.to_string()),
        };
        for _ in 0..10 {
            // A free port now; redis binds it a moment later (retried if someone took it).
            r.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start (is the Debian package `redis-server` installed?)");
    }

    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.0.join("redis.log")).expect("redis log");
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1"]);
        if let Some(t) = self.tls {
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(fixture_path(t.cert))
                .arg("--tls-key-file")
                .arg(fixture_path(t.key))
                .arg("--tls-ca-cert-file")
                .arg(fixture_path(t.ca))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        let child = cmd
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir.0)
            .args(&self.extra)
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (apt install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false; // e.g. the port was taken
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether the server answers (any reply to PING, including NOAUTH, counts).
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls.is_some() {
            return true; // listening; redis-cli checks the rest
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0 && !buf[..n].starts_with(b"-LOADING"))
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `kill -9` (no shutdown save: what is on disk is the AOF).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// Runs `redis-cli` against this server; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(match self.tls {
                Some(t) => vec!["--tls".into(), "--cacert".into(), fixture_path(t.ca)],
                None => vec![],
            })
            .args(match &self.password {
                Some(p) => vec!["--pass", p, "--no-auth-warning"],
                None => vec![],
            })
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis master, one replica and one Sentinel (quorum 1, fast failover: down after 500 ms),
/// all on free loopback ports; stopped on drop.
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinel: Option<std::process::Child>,
    pub sentinel_port: u16,
    pub master_name: String,
    _dir: TempDir,
}

impl RedisSentinel {
    pub fn start(master_name: &str) -> RedisSentinel {
        let master = RedisServer::start();
        let mport = master.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &mport]);
        let dir = TempDir::new();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.0.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor {master_name} 127.0.0.1 {mport} 1\n\
                 sentinel down-after-milliseconds {master_name} 500\n\
                 sentinel failover-timeout {master_name} 3000\n",
                dir.0.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.0.join("sentinel.log")).expect("sentinel log");
        let child = std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        let rs = RedisSentinel {
            master,
            replica,
            sentinel: Some(child),
            sentinel_port: port,
            master_name: master_name.to_owned(),
            _dir: dir,
        };
        // Ready when the replica is in sync and the sentinel knows it (failover needs it).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let synced = rs
                .replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up");
            let known = rs
                .sentinel_cli(&["SENTINEL", "replicas", master_name])
                .contains(&rs.replica.port.to_string());
            if synced && known {
                return rs;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sentinel setup not ready (replica synced: {synced}, known to sentinel: {known})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis://127.0.0.1:<sentinel port>`.
    pub fn addr(&self) -> String {
        format!("redis://127.0.0.1:{}", self.sentinel_port)
    }

    pub fn sentinel_cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.sentinel_port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The master's port as the sentinel reports it now.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinel_cli(&["SENTINEL", "get-master-addr-by-name", &self.master_name])
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Redis Cluster on free loopback ports: `masters` masters with one replica each, the
/// slots spread evenly by `redis-cli --cluster create`, failover after 1 s without a master
/// (`cluster-node-timeout 1000`); stopped on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_with(masters, None, false)
    }

    /// With `requirepass` (and `masterauth`, for the replicas) on every node; with `tls`,
    /// clients, replication and the cluster bus speak only TLS ([`TlsFiles::REDIS_NODE`]).
    pub fn start_with(masters: usize, password: Option<&str>, tls: bool) -> RedisCluster {
        let mut extra: Vec<&str> = match password {
            Some(p) => vec!["--requirepass", p, "--masterauth", p],
            None => vec![],
        };
        let files = tls.then_some(TlsFiles::REDIS_NODE);
        if tls {
            extra.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
        }
        let nodes: Vec<RedisServer> = (0..masters * 2)
            .map(|_| {
                // The cluster bus port defaults to port + 10000, which may not exist.
                let bus = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
                    .to_string();
                let args: Vec<&str> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-port",
                    &bus,
                ]
                .into_iter()
                .chain(extra.iter().copied())
                .collect();
                RedisServer::start_inner(&args, files)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .args(match password {
                Some(p) => vec!["--pass", p, "--no-auth-warning"],
                None => vec![],
            })
            .args(match files {
                Some(t) => vec!["--tls".into(), "--cacert".into(), fixture_path(t.ca)],
                None => vec![],
            })
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = RedisCluster { nodes };
        // Ready when every node sees a healthy cluster and every replica is in sync.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = c.nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && (c.is_master(n)
                        || n.cli(&["INFO", "replication"])
                            .contains("master_link_status:up"))
            });
            if ready {
                return c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis cluster did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis://` URLs of every node (the seeds a client is given).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    pub fn is_master(&self, n: &RedisServer) -> bool {
        n.cli(&["ROLE"]).lines().next() == Some("master")
    }

    /// The live master serving `key`'s slot, whether or not the key exists (asked without
    /// following redirects; `None` while the slot has no live master).
    pub fn owner(&self, key: &str) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.ping() && self.is_master(n) && !n.cli(&["TYPE", key]).starts_with("MOVED")
        })
    }
}

/// A small tmpfs mounted for the test (disk-full faults); unmounted on drop.
///
/// Needs `mount` rights (root or CAP_SYS_ADMIN). Elsewhere [`SmallDisk::mount`] returns
/// `None` and the caller skips loudly, except under `CI`, where a missing fault is an error.
pub struct SmallDisk {
    pub dir: TempDir,
}

impl SmallDisk {
    pub fn mount(size_kib: u64) -> Option<SmallDisk> {
        let dir = TempDir::new();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_kib}k"),
                "fleetgate-test",
            ])
            .arg(&dir.0)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "cannot mount a tmpfs for the disk-full test under CI: {why}"
                );
                eprintln!("SKIPPED (not in CI): cannot mount a tmpfs: {why}");
                None
            }
        }
    }

    /// Fills the disk with a file; returns its path (remove it to free the space).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.dir.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0xA5u8; 16 * 1024];
        loop {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.flush()) {
                assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                break;
            }
        }
        // The last partial chunk may have taken the final pages; top up byte by byte.
        while f.write_all(&[0]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir.0)
            .status();
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("fleetgate-test-{:x}", rand_u64()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

impl GatewayProcess {
    pub async fn start(opts: &GatewayOptions) -> GatewayProcess {
        let dir = TempDir::new();
        let config = format!(
            r#"
[server]
threads = 2
grace_period = "{grace}"
drain_delay = "{drain_delay}"
[device_listener]
addr = "127.0.0.1:0"
[admin_listener]
addr = "127.0.0.1:0"
token_env = "FG_TEST_ADMIN"
[upstream]
base_url = "{up}"
auth = "{auth}"
pat_env = "FG_TEST_PAT"
connect_timeout = "2s"
read_timeout = "{read}"
stream_idle_timeout = "{idle}"
[websocket]
ping_interval = "{ping}"
{websocket}
[tokens]
signing_keys = [{{ kid = "t1", secret_env = "FG_TEST_KEY" }}]
[log]
format = "json"
level = "info"
[store]
path = "{store}"
{redis}
{extra}
"#,
            redis = match &opts.redis {
                Some(table) => format!("kind = \"redis\"\n[store.redis]\n{table}"),
                None => String::new(),
            },
            grace = opts.grace_period,
            drain_delay = opts.drain_delay,
            up = opts.upstream,
            ping = opts.ping_interval,
            websocket = opts.websocket_toml,
            extra = opts.extra_toml,
            read = opts.read_timeout,
            auth = opts.upstream_auth,
            idle = opts.stream_idle_timeout,
            store = opts
                .store_path
                .clone()
                .unwrap_or_else(|| dir.0.join("store.redb"))
                .display(),
        );
        let cfg_path = dir.0.join("config.toml");
        std::fs::write(&cfg_path, config).expect("write config");
        let log_path = dir.0.join("gateway.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let key = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
        let mut child = Command::new(fleetgate_bin())
            .args(["serve", "--ready-json", "-c"])
            .arg(&cfg_path)
            .env("FG_TEST_ADMIN", ADMIN_TOKEN)
            .env("FG_TEST_PAT", PAT)
            .env("FG_TEST_KEY", key)
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn fleetgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "gateway not ready in 60 s; log: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            })
            .expect("read stdout")
            .unwrap_or_else(|| {
                panic!(
                    "gateway exited; log: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            });
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready json");
        let device_addr: std::net::SocketAddr =
            ready["device_addr"].as_str().unwrap().parse().unwrap();
        GatewayProcess {
            device: format!("http://{device_addr}"),
            admin: format!("http://{}", ready["admin_addr"].as_str().unwrap()),
            device_addr,
            child,
            log_path,
            _dir: dir,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(32)
                .build()
                .unwrap(),
        }
    }

    /// The config file the gateway was started with (tests rewrite it before SIGHUP).
    pub fn config_path(&self) -> PathBuf {
        self._dir.0.join("config.toml")
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.device_addr)
    }

    /// POST to the admin API with the admin token.
    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin request")
    }

    /// Any admin API call with the admin token.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("admin request")
    }

    /// Registers a device and returns a fresh gateway access token for it.
    pub async fn register_device(&self, id: &str) -> String {
        let r = self
            .admin_post("/admin/v1/devices", serde_json::json!({"device_id": id}))
            .await;
        assert!(r.status().is_success(), "register: {}", r.status());
        self.device_token(id).await
    }

    /// Registers these devices in one bulk call (`POST /admin/v1/devices`), asserting 200.
    pub async fn register_devices(&self, ids: impl IntoIterator<Item = String>) {
        let devices: Vec<serde_json::Value> = ids
            .into_iter()
            .map(|id| serde_json::json!({"device_id": id}))
            .collect();
        let r = self
            .admin_post("/admin/v1/devices", serde_json::json!({"devices": devices}))
            .await;
        assert_eq!(r.status(), 200, "bulk register");
    }

    pub async fn device_token(&self, id: &str) -> String {
        let r = self
            .admin_post(
                &format!("/admin/v1/devices/{id}/tokens"),
                serde_json::json!({}),
            )
            .await;
        assert!(r.status().is_success(), "mint: {}", r.status());
        let v: serde_json::Value = r.json().await.unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends a signal to the gateway process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running");
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// The test-only TLS fixtures (`tests/fixtures/tls`): a CA and a server cert for 127.0.0.1.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tls")
        .join(name)
}

/// Sandbox TLS settings from the fixtures.
pub fn sandbox_tls() -> sandbox::SandboxTls {
    sandbox::SandboxTls {
        cert_chain_pem: std::fs::read_to_string(fixture_path("upstream.pem")).unwrap(),
        key_pem: std::fs::read_to_string(fixture_path("upstream.key")).unwrap(),
    }
}

/// `GET path_and_query` straight on the sandbox upstream with the vendor's PAT, as JSON: what
/// Coze itself would answer, to compare the gateway's answers with.
pub async fn upstream_get_json(
    http: &reqwest::Client,
    up: &SandboxHandle,
    path_and_query: &str,
) -> serde_json::Value {
    http.get(format!("{}{path_and_query}", up.base_url()))
        .bearer_auth(PAT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The body of a streamed chat v3 call (one user message, "hi").
pub fn chat_stream_request() -> serde_json::Value {
    serde_json::json!({"bot_id": "b1", "user_id": "u1", "stream": true,
        "additional_messages": [{"role": "user", "content": "hi", "content_type": "text"}]})
}

/// A whole chat v3 SSE stream as the sandbox sends it: completed, then `[DONE]` last.
pub fn assert_complete_chat_stream(body: &str) {
    assert!(
        body.contains("event:conversation.chat.completed")
            && body.ends_with("event:done\ndata:\"[DONE]\"\n\n"),
        "{body}"
    );
}

/// Polls `f` until it returns true or `patience` runs out.
pub async fn eventually<F, Fut>(patience: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
