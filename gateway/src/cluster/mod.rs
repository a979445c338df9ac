//! Cluster mode (`store.kind = "redis"`): several nodes share one Redis.
//!
//! Redis is the source of truth for devices (with their credentials and revocations), quota
//! rules, usage counters and the `jti` replay set. Each node keeps what the hot path reads in
//! memory (the device registry, the rule set, its quota leases), so a request pays no Redis
//! round trip it does not need:
//!
//! - **Changes** (admin writes on any node) are Lua scripts that change the data, bump the
//!   change counter `{prefix}:ver` and publish `"<ver> <what>"` on `{prefix}:changes`, all
//!   atomically; every node applies the message by re-reading what changed ([`feed`]). A gap
//!   in the versions, a reconnect, or the periodic check (`full_check_interval`) finding the
//!   counter ahead of what the node applied triggers a full reload: pub/sub is the fast path,
//!   the check the safety net.
//! - **Quota** ([`leases`]): nodes admit against leases of quota granted atomically by Redis.
//! - **`jti`s** ([`Cluster::claim_jti`]): `SET NX` with the assertion's expiry.
//! - **Membership** ([`members`]): live nodes, so each takes its share of the fleet QPS caps.
//!
//! - **Connection**: one `ConnectionManager` to the master. With Sentinel
//!   (`[store.redis] sentinel`), a connection error, timeout or `READONLY` marks the master
//!   stale and the next command looks it up again through the sentinels (one lookup at a
//!   time), so a node follows a failover within a few commands. With Redis Cluster
//!   (`[store.redis] cluster`), one `ClusterConnection` routes each command by its key's slot
//!   and follows `MOVED`/`ASK` and failovers itself; pub/sub uses a plain connection to one
//!   of the seed nodes (a `PUBLISH` reaches every node of a Redis Cluster).
//!
//! Data layout. The registry (devices, rules, the change counter and channel) is written by
//! scripts that touch several of its keys at once, so its keys share one hash slot: they
//! start with `{key_prefix}` (braces included, a Redis Cluster hash tag). The per-device
//! hot-path keys (usage and `jti`s) are touched one key per command and start with
//! `key_prefix` without braces, so on Redis Cluster they spread over every shard.
//!
//! | key (`p` = `key_prefix`) | type | content |
//! |---|---|---|
//! | `{p}:dev:<id>` | hash | `created_at`, `enabled` (0/1), `gen`, `labels` (JSON), `c:<kid>` (credential JSON, secrets only as hashes) |
//! | `{p}:devs` | set | every device id |
//! | `{p}:rules` | hash | benefit id → rule JSON (admin-created rules) |
//! | `{p}:ver` | integer | change counter |
//! | `{p}:nodes` | sorted set | node id → when it was last heard from (Redis time, ms) |
//! | `{p}:changes` | channel | `"<ver> dev <id>"`, `"<ver> devs <id>\n<id>…"`, `"<ver> rule <benefit id>"` (`"<ver> rules"`, reload all, is still understood) |
//! | `p:use:<id>` | hash | quota counters and leases per node (see [`leases`]) |
//! | `p:jti:<id>:<jti>` | string | a used assertion id, expiring with the assertion |
//!
//! Redis must persist (AOF, `appendfsync everysec` or `always`): it holds the usage.

pub mod devices;
pub mod feed;
pub mod leases;
pub mod members;
pub mod rules;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use crate::config::RedisSettings;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis did not answer in time or the connection is down.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered something this node cannot read (a bug or foreign data).
    #[error("unexpected data in redis: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> ClusterError {
        // RedisError's Display never includes the connection URL or the password.
        ClusterError::Unavailable(e.to_string())
    }
}

/// The shared Redis, as one node sees it.
pub struct Cluster {
    /// The current master (replaced after a Sentinel failover).
    link: std::sync::RwLock<Arc<Link>>,
    /// Sentinel mode: looks the master up by name.
    sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    /// Sentinel mode: the master may have moved; look it up before the next command.
    stale: AtomicBool,
    prefix: String,
    /// This process's identity in lease bookkeeping (random per start: a restarted node is a
    /// new node; what the old one spent stays charged).
    pub node_id: String,
    pub settings: RedisSettings,
    up: AtomicBool,
    /// Commands and subscriptions that reached Redis so far: a slow failure that started
    /// before one of them must not mark Redis down again (see [`Cluster::pubsub`]).
    answers: AtomicU64,
    /// Redis Cluster: which seed node the next pub/sub connection tries first.
    pubsub_turn: std::sync::atomic::AtomicUsize,
    /// Told whenever Redis answers again after failing (reporters flush, the feed reloads).
    pub recovered: tokio::sync::Notify,
    /// `fleetgate_cluster_redis_up`, once the metrics exist.
    up_gauge: std::sync::OnceLock<prometheus::IntGauge>,
    /// Membership ([`members`]): `true` once this node has left; beats and the leave take
    /// turns, so a beat in flight cannot add the node back after it left.
    membership: tokio::sync::Mutex<bool>,
    /// `fleetgate_cluster_errors_total`, once the metrics exist.
    errors: std::sync::OnceLock<prometheus::IntCounterVec>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A connection that reconnects by itself: to one Redis (the master), or to a Redis
/// Cluster (routing each command by its key's slot).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where commands go, and where pub/sub connects.
struct Link {
    /// Single Redis or Sentinel: the master's client. Redis Cluster: `None` (pub/sub uses
    /// the seed nodes).
    client: Option<redis::Client>,
    conn: Conn,
}

impl Link {
    async fn open(client: redis::Client, settings: &RedisSettings) -> Result<Link, ClusterError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = tokio::time::timeout(
            settings.timeout * 4,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| ClusterError::Unavailable("connect timed out".into()))??;
        Ok(Link {
            client: Some(client),
            conn: Conn::Single(conn),
        })
    }

    /// Redis Cluster: discovers the slot map through the seed nodes.
    async fn open_cluster(
        seeds: &[redis::ConnectionInfo],
        settings: &RedisSettings,
    ) -> Result<Link, ClusterError> {
        let client = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(settings.timeout)
            .response_timeout(settings.timeout)
            // A failover takes the cluster a few seconds; the caller's timeout bounds each
            // command, and the next command tries again.
            .retries(2)
            .max_retry_wait(200)
            .build()?;
        let conn = tokio::time::timeout(settings.timeout * 4, client.get_async_connection())
            .await
            .map_err(|_| ClusterError::Unavailable("cluster connect timed out".into()))??;
        Ok(Link {
            client: None,
            conn: Conn::Cluster(conn),
        })
    }
}

/// Asks the sentinels where the master is.
async fn master_client(
    s: &mut redis::sentinel::SentinelClient,
    settings: &RedisSettings,
) -> Result<redis::Client, ClusterError> {
    tokio::time::timeout(settings.timeout * 4, s.async_get_client())
        .await
        .map_err(|_| ClusterError::Unavailable("sentinel lookup timed out".into()))?
        .map_err(ClusterError::from)
}

impl Cluster {
    /// Connects (failing if Redis does not answer within the timeout: a node does not start
    /// without its source of truth). With Sentinel, the master is looked up first.
    pub async fn connect(settings: &RedisSettings) -> Result<Arc<Cluster>, ClusterError> {
        let (link, sentinel) = match (&settings.sentinel, &settings.cluster) {
            (_, Some(seeds)) => (Link::open_cluster(seeds, settings).await?, None),
            (None, None) => {
                let client = redis::Client::open(settings.connection.clone())?;
                (Link::open(client, settings).await?, None)
            }
            (Some(s), None) => {
                let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(settings.connection.redis_settings().clone());
                if matches!(
                    settings.connection.addr(),
                    redis::ConnectionAddr::TcpTls { .. }
                ) {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                let mut sc = redis::sentinel::SentinelClient::build(
                    s.addrs.clone(),
                    s.master_name.clone(),
                    Some(node),
                    redis::sentinel::SentinelServerType::Master,
                )?;
                let client = master_client(&mut sc, settings).await?;
                (Link::open(client, settings).await?, Some(sc))
            }
        };
        let cluster = Cluster {
            link: std::sync::RwLock::new(Arc::new(link)),
            sentinel: sentinel.map(tokio::sync::Mutex::new),
            stale: AtomicBool::new(false),
            prefix: settings.key_prefix.clone(),
            node_id: format!("{:016x}", rand::random::<u64>()),
            settings: settings.clone(),
            up: AtomicBool::new(true),
            answers: AtomicU64::new(0),
            pubsub_turn: std::sync::atomic::AtomicUsize::new(0),
            recovered: tokio::sync::Notify::new(),
            up_gauge: std::sync::OnceLock::new(),
            errors: std::sync::OnceLock::new(),
            membership: tokio::sync::Mutex::new(false),
        };
        let _: String = cluster.run(redis::cmd("PING")).await?;
        Ok(Arc::new(cluster))
    }

    /// A registry key, `{prefix}:{rest}` with the prefix in braces: every registry key is in
    /// one hash slot, so one script can change several of them on Redis Cluster.
    pub fn registry_key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.registry_prefix())
    }

    /// `{prefix}`, braces included.
    pub fn registry_prefix(&self) -> String {
        format!("{{{}}}", self.prefix)
    }

    /// A per-device key, `prefix:{rest}`: spread over the shards of a Redis Cluster by
    /// `rest`.
    pub fn device_scoped_key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the last command reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Reports reachability and failed operations on these metrics from now on.
    pub fn set_metrics(&self, m: &crate::metrics::Metrics) {
        m.cluster_redis_up.set(i64::from(self.is_up()));
        let _ = self.up_gauge.set(m.cluster_redis_up.clone());
        let _ = self.errors.set(m.cluster_errors.clone());
    }

    /// Counts a failed operation (`op` is one of the documented label values).
    pub fn count_error(&self, op: &str) {
        if let Some(e) = self.errors.get() {
            e.with_label_values(&[op]).inc();
        }
    }

    fn mark(&self, ok: bool) {
        if ok {
            self.answers.fetch_add(1, Ordering::AcqRel);
        }
        let was = self.up.swap(ok, Ordering::AcqRel);
        if let Some(g) = self.up_gauge.get() {
            g.set(i64::from(ok));
        }
        if ok && !was {
            tracing::warn!("Redis is reachable again.");
            self.recovered.notify_waiters();
        } else if !ok && was {
            tracing::error!("Redis is unreachable; running in the configured degraded mode.");
        }
    }

    fn link(&self) -> Arc<Link> {
        crate::locks::snapshot(&self.link)
    }

    /// The connection to use now: in Sentinel mode, after a failure, the master is looked up
    /// again first (one lookup at a time; the others use the current link meanwhile).
    pub(crate) async fn conn(&self) -> Conn {
        if self.stale.load(Ordering::Acquire)
            && let Some(s) = &self.sentinel
            && let Ok(mut s) = s.try_lock()
            && self.stale.load(Ordering::Acquire)
        {
            match master_client(&mut s, &self.settings).await {
                Ok(client) => match Link::open(client, &self.settings).await {
                    Ok(link) => {
                        if let Some(c) = &link.client {
                            tracing::warn!(master = %c.get_connection_info().addr(), "Redis master (from Sentinel) connected.");
                        }
                        self.stale.store(false, Ordering::Release);
                        crate::locks::replace(&self.link, Arc::new(link));
                    }
                    Err(e) => tracing::warn!(error = %e, "Connecting to the Redis master failed."),
                },
                Err(e) => tracing::warn!(error = %e, "Sentinel lookup of the Redis master failed."),
            }
        }
        self.link().conn.clone()
    }

    /// Runs one command with the configured timeout.
    pub async fn run<T: redis::FromRedisValue>(
        &self,
        cmd: impl std::borrow::Borrow<redis::Cmd>,
    ) -> Result<T, ClusterError> {
        let answers = self.answers.load(Ordering::Acquire);
        let mut conn = self.conn().await;
        let r = tokio::time::timeout(
            self.settings.timeout,
            cmd.borrow().query_async::<T>(&mut conn),
        )
        .await;
        self.finish(r, answers)
    }

    /// Runs a script invocation with the configured timeout.
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        let answers = self.answers.load(Ordering::Acquire);
        let mut conn = self.conn().await;
        let r = tokio::time::timeout(self.settings.timeout, inv.invoke_async::<T>(&mut conn)).await;
        self.finish(r, answers)
    }

    /// Records the outcome of a command that started when `answers` was the answer count.
    fn finish<T>(
        &self,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        answers: u64,
    ) -> Result<T, ClusterError> {
        match r {
            Ok(Ok(v)) => {
                self.mark(true);
                Ok(v)
            }
            Ok(Err(e)) if is_connection_error(&e) => {
                self.failed_since(answers);
                Err(e.into())
            }
            // A script or type error: Redis itself is fine.
            Ok(Err(e)) => Err(ClusterError::Corrupt(e.to_string())),
            Err(_) => {
                self.failed_since(answers);
                Err(ClusterError::Unavailable("timed out".into()))
            }
        }
    }

    /// An attempt that started when `answers` was the answer count failed to reach Redis. It
    /// marks Redis down only if nothing else reached Redis since it started: an attempt can
    /// take up to the timeout, and one that began during an outage and failed after Redis
    /// was back (and a report had closed the outage) would otherwise open a second outage,
    /// with a fresh degraded allowance.
    fn failed_since(&self, answers: u64) {
        if self.answers.load(Ordering::Acquire) == answers {
            self.mark(false);
        }
        self.stale.store(true, Ordering::Release);
    }

    /// A dedicated pub/sub connection: to the master, or on Redis Cluster to the first seed
    /// node that answers (each new connection starts at the next seed).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, ClusterError> {
        let _ = self.conn().await; // Sentinel: follow a failover first
        let clients = match (&self.settings.cluster, &self.link().client) {
            (Some(seeds), _) => {
                let start = self.pubsub_turn.fetch_add(1, Ordering::Relaxed);
                let mut v = Vec::with_capacity(seeds.len());
                for i in 0..seeds.len() {
                    v.push(redis::Client::open(
                        seeds[(start + i) % seeds.len()].clone(),
                    )?);
                }
                v
            }
            (None, Some(c)) => vec![c.clone()],
            (None, None) => return Err(ClusterError::Unavailable("no pub/sub node".into())),
        };
        let answers = self.answers.load(Ordering::Acquire);
        let mut last = ClusterError::Unavailable("pub/sub connect timed out".into());
        for client in clients {
            let r =
                tokio::time::timeout(self.settings.timeout * 4, client.get_async_pubsub()).await;
            match r {
                Ok(Ok(ps)) => {
                    self.mark(true);
                    return Ok(ps);
                }
                Ok(Err(e)) => last = e.into(),
                Err(_) => {}
            }
        }
        // A node that sends no command (no admin writes, no leases needed) learns of an
        // outage here too: its change feed lost the subscription and cannot get it back.
        self.failed_since(answers);
        Err(last)
    }

    /// Runs independent commands and returns their replies in order: one pipeline on a
    /// single Redis; on Redis Cluster (where a pipeline must stay in one slot) concurrent
    /// commands over the multiplexed connections, each routed by its key.
    pub async fn batch<T: redis::FromRedisValue>(
        &self,
        cmds: Vec<redis::Cmd>,
        timeout: Duration,
    ) -> Result<Vec<T>, ClusterError> {
        let answers = self.answers.load(Ordering::Acquire);
        let conn = self.conn().await;
        let r = match conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                for c in cmds {
                    pipe.add_command(c);
                }
                let mut conn = conn;
                tokio::time::timeout(timeout, async move {
                    pipe.query_async::<Vec<T>>(&mut conn).await
                })
                .await
            }
            Conn::Cluster(_) => {
                let each = cmds.into_iter().map(|c| {
                    let mut conn = conn.clone();
                    async move { c.query_async::<T>(&mut conn).await }
                });
                tokio::time::timeout(timeout, async move {
                    futures_util::future::join_all(each)
                        .await
                        .into_iter()
                        .collect::<redis::RedisResult<Vec<T>>>()
                })
                .await
            }
        };
        self.finish(r, answers)
    }

    /// Records a device's assertion id as used until `exp` (unix seconds). `Ok(false)`: it was
    /// used before, on some node.
    pub async fn claim_jti(&self, device: &str, jti: &str, exp: u64) -> Result<bool, ClusterError> {
        let key = self.device_scoped_key(&format!("jti:{device}:{jti}"));
        let set: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("EXAT")
                    .arg(exp.max(1)),
            )
            .await?;
        Ok(set.is_some())
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                | redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
                | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
                // A demoted master (Sentinel failover): find the new one.
                | redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        )
}
