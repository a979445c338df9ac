//! Cluster membership: how many nodes are live, so that each enforces its share of the fleet
//! request caps ([`crate::ratelimit`]).
//!
//! Every [`BEAT`] a node records itself in the sorted set `{p}:nodes` (score: Redis's own
//! clock, so the nodes' clocks need not agree), drops members silent for longer than
//! [`STALE`], and counts the rest, in one script. A node that stops cleanly removes itself
//! at the end of its drain (`server::DrainOnSignal`), while it can still reach Redis;
//! one that dies drops out after [`STALE`], and until then the others enforce a smaller share
//! than they could (the cap errs on the safe side). While Redis is unreachable a node keeps
//! the last count it saw.

use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::Cluster;
use crate::state::SharedState;

/// How often a node says it is alive.
pub const BEAT: Duration = Duration::from_secs(1);
/// A member not heard from for this long is gone.
pub const STALE: Duration = Duration::from_secs(3);

/// KEYS[1] = `{p}:nodes`; ARGV = node id, stale ms. Returns the live members.
const BEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZCARD', KEYS[1])
";

impl Cluster {
    /// Says this node is alive and returns how many are (`None`: Redis did not answer, or
    /// this node has left).
    pub async fn beat(&self) -> Option<u32> {
        static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(BEAT_SCRIPT));
        let left = self.membership.lock().await;
        if *left {
            return None;
        }
        let mut inv = SCRIPT.key(self.registry_key("nodes"));
        inv.arg(&self.node_id)
            .arg(u64::try_from(STALE.as_millis()).unwrap_or(u64::MAX));
        match self.script::<u32>(&inv).await {
            Ok(n) => Some(n),
            Err(e) => {
                self.count_error("members");
                tracing::debug!(error = %e, "Cluster membership beat failed.");
                None
            }
        }
    }

    /// Leaves the membership for good (a stopping node, at the end of its drain), so the
    /// other nodes take over its share of the fleet caps at their next beat.
    pub async fn leave(&self) {
        let mut left = self.membership.lock().await;
        if *left {
            return;
        }
        *left = true;
        let cmd = redis::cmd("ZREM")
            .arg(self.registry_key("nodes"))
            .arg(&self.node_id)
            .to_owned();
        if let Err(e) = self.run::<i64>(cmd).await {
            tracing::debug!(error = %e, "Could not leave the cluster membership set.");
        }
    }
}

/// The background service that keeps this node's membership and the node count current.
pub struct Members {
    pub state: SharedState,
    pub cluster: Arc<Cluster>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Members {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(n) = self.cluster.beat().await {
                        self.state.rate_limits().set_nodes(n);
                        self.state.metrics.cluster_nodes.set(i64::from(n));
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        // Usually done already by the drain (SIGTERM); the runtime may stop
                        // before this completes.
                        self.cluster.leave().await;
                        return;
                    }
                }
            }
        }
    }
}
