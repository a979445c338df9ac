//! Quota leases: nodes admit against slices of quota that Redis grants atomically.
//!
//! # Layout
//! One hash per device, `use:{device}`. Per counter `bk` (`{benefit type}:{c|p}`, cumulative
//! or periodic) it holds the window start `bk:w` and, per node `N`:
//!
//! | field | meaning |
//! |---|---|
//! | `bk:u:N` | what `N` charged in the window (absolute; merged with `max`, so it never goes back) |
//! | `bk:g:N` | the lease `N` holds: what it may admit in total in the window |
//! | `bk:s:N` | everything Redis granted `N` in the window (a running total, never decreased) |
//! | `bk:t:N` | when `N` last spoke about the counter (unix ms): its liveness |
//!
//! # Protocol
//! A node sends its *absolute* `used`, `granted` and `acked` (what it received of `s`) with
//! every grant request, report and heartbeat; Redis sets
//!
//! ```text
//! g:N = granted + (s:N − acked)        (grants made but not yet received are still N's)
//! ```
//!
//! so reports need no ordering with grants: a release (`granted` down), a degraded allowance
//! (`granted` up without `s`), a retried or late report, or a Redis restart that lost writes
//! all converge on the node's own figures, and a grant in flight is never forgotten (the bug
//! of overwriting `g` with a stale absolute figure admitted 161 of 100 in the 3-node test).
//! Then the grant is
//!
//! ```text
//! grant = min(want, limit − Σ_all u − Σ_live (g − u)⁺)
//! ```
//!
//! so what was charged plus what live nodes still hold never exceeds the limit. A node that
//! has not spoken for `lease_ttl` is presumed dead: its unspent lease stops counting, what it
//! charged keeps counting. Live nodes heartbeat every counter with an unspent lease at least
//! every `lease_ttl / 3`. A newer window (`bk:w` older than the request's) clears the
//! counter's fields first: resets are versioned by the window start, never a `DEL` racing a
//! debit; a request for an older window is refused. The hash expires a day after the latest
//! window end it has seen.
//!
//! A grant whose answer was lost (timeout after Redis ran it) stays in `s − acked` for good:
//! that lease is stranded until the window ends (conservative: never an overshoot).

use std::collections::HashMap;
use std::sync::LazyLock;

use policy::ids::DeviceId;
use policy::quota::{BenefitType, CounterRecord, LeaseWant, RuleKind};
use redis::Script;

use super::{Cluster, ClusterError};

/// Shared by both scripts: the window check and the node's own figures. Leaves `ok` false when
/// the request is for a window older than the stored one.
const SYNC: &str = r#"
local k, bk = KEYS[1], ARGV[1]
local f = bk .. ':'
local w, node = tonumber(ARGV[2]), ARGV[3]
local used, granted, acked, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ok = true
local cur = tonumber(redis.call('HGET', k, f .. 'w') or '-1')
if cur > w then
  ok = false
else
  if cur < w then
    for _, name in ipairs(redis.call('HKEYS', k)) do
      if string.sub(name, 1, #f) == f then redis.call('HDEL', k, name) end
    end
    redis.call('HSET', k, f .. 'w', w)
  end
  local u = math.max(tonumber(redis.call('HGET', k, f .. 'u:' .. node) or '0'), used)
  local s = math.max(tonumber(redis.call('HGET', k, f .. 's:' .. node) or '0'), acked)
  redis.call('HSET', k, f .. 'u:' .. node, u, f .. 'g:' .. node, granted + s - acked,
    f .. 's:' .. node, s, f .. 't:' .. node, now)
end
"#;

/// ARGV: bk, window start, node, used, granted, acked, now ms, limit, want, lease ttl ms,
/// expire at (unix s). Returns `{granted now, Σ used}`.
const GRANT: &str = r#"
if not ok then return {0, 0} end
local limit, want, ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local u, g, t = {}, {}, {}
local all = redis.call('HGETALL', k)
for i = 1, #all, 2 do
  local name = all[i]
  if string.sub(name, 1, #f) == f and string.sub(name, #f + 2, #f + 2) == ':' then
    local what, n, v = string.sub(name, #f + 1, #f + 1), string.sub(name, #f + 3), tonumber(all[i + 1])
    if what == 'u' then u[n] = v elseif what == 'g' then g[n] = v elseif what == 't' then t[n] = v end
  end
end
local spent, held = 0, 0
for _, v in pairs(u) do spent = spent + v end
for n, v in pairs(g) do
  local un = u[n] or 0
  if now - (t[n] or 0) <= ttl and v > un then held = held + (v - un) end
end
local grant = math.min(want, math.max(limit - spent - held, 0))
if grant > 0 then
  redis.call('HINCRBY', k, f .. 'g:' .. node, grant)
  redis.call('HINCRBY', k, f .. 's:' .. node, grant)
end
local at = tonumber(ARGV[11])
if redis.call('TTL', k) == -1 then
  redis.call('EXPIREAT', k, at)
else
  redis.call('EXPIREAT', k, at, 'GT')
end
return {grant, spent}
"#;

/// ARGV: bk, window start, node, used, granted, acked, now ms. Returns 1, or 0 for a stale
/// window.
const REPORT: &str = r#"
if ok then return 1 end
return 0
"#;

/// Largest expiry we set (year ~2100): cumulative rules without an end keep their counters.
const MAX_EXPIRE_AT: u64 = 4_102_444_800;

/// The counter's field prefix in `use:{device}`.
fn bk(benefit: BenefitType, kind: RuleKind) -> String {
    let k = match kind {
        RuleKind::Cumulative => "c",
        RuleKind::Periodic => "p",
    };
    format!("{}:{k}", benefit.as_str())
}

/// The common ARGV prefix of both scripts.
#[allow(clippy::too_many_arguments)]
fn sync_args(
    cmd: &mut redis::Cmd,
    benefit: BenefitType,
    kind: RuleKind,
    window_start: u64,
    node: &str,
    used: u64,
    granted: u64,
    acked: u64,
    now_ms: u64,
) {
    cmd.arg(bk(benefit, kind))
        .arg(window_start)
        .arg(node)
        .arg(used)
        .arg(granted)
        .arg(acked)
        .arg(now_ms);
}

impl Cluster {
    fn use_key(&self, device: &DeviceId) -> String {
        self.device_scoped_key(&format!("use:{device}"))
    }

    /// `EVAL` of the report script for `device` (the script text is built once).
    fn report_cmd(&self, device: &DeviceId) -> redis::Cmd {
        static TEXT: LazyLock<String> = LazyLock::new(|| format!("{SYNC}{REPORT}"));
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TEXT.as_str()).arg(1).arg(self.use_key(device));
        cmd
    }

    /// Asks for `amount` more units of `w`'s counter; returns what Redis granted (0: the
    /// fleet has none left for this window).
    pub async fn grant(
        &self,
        device: &DeviceId,
        w: &LeaseWant,
        amount: u64,
        now_ms: u64,
    ) -> Result<u64, ClusterError> {
        static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{SYNC}{GRANT}")));
        let mut inv = SCRIPT.prepare_invoke();
        inv.key(self.use_key(device))
            .arg(bk(w.benefit_type, w.kind))
            .arg(w.window_start)
            .arg(&self.node_id)
            .arg(w.used)
            .arg(w.granted)
            .arg(w.acked)
            .arg(now_ms)
            .arg(w.limit)
            .arg(amount)
            .arg(self.settings.lease_ttl.as_millis() as u64)
            .arg(w.window_end.saturating_add(86_400).min(MAX_EXPIRE_AT));
        let (granted, _spent): (u64, u64) = self.script(&inv).await?;
        Ok(granted)
    }

    /// Sends this node's absolute figures for some counters (idempotent; also the heartbeat
    /// that keeps the node's leases alive).
    pub async fn report(&self, records: &[CounterRecord], now_ms: u64) -> Result<(), ClusterError> {
        for chunk in records.chunks(512) {
            // EVAL (not EVALSHA): no NOSCRIPT round trip after a Redis restart.
            let mut cmds = Vec::with_capacity(chunk.len());
            for r in chunk {
                let mut cmd = self.report_cmd(&r.device);
                sync_args(
                    &mut cmd,
                    r.benefit_type,
                    r.kind,
                    r.window_start,
                    &self.node_id,
                    r.used,
                    r.granted,
                    r.acked,
                    now_ms,
                );
                cmds.push(cmd);
            }
            let _: Vec<i64> = self.batch(cmds, self.settings.timeout * 2).await?;
        }
        Ok(())
    }

    /// What the *other* nodes charged to `device`, per counter: `(benefit, kind) →
    /// (window start, Σ used)`.
    pub async fn used_elsewhere(
        &self,
        device: &DeviceId,
    ) -> Result<HashMap<(BenefitType, RuleKind), (u64, u64)>, ClusterError> {
        let all: HashMap<String, String> = self
            .run(redis::cmd("HGETALL").arg(self.use_key(device)))
            .await?;
        let mut out = HashMap::new();
        for benefit in BenefitType::ALL {
            for kind in [RuleKind::Cumulative, RuleKind::Periodic] {
                let f = bk(benefit, kind);
                let Some(w) = all.get(&format!("{f}:w")).and_then(|v| v.parse().ok()) else {
                    continue;
                };
                let prefix = format!("{f}:u:");
                let sum: u64 = all
                    .iter()
                    .filter(|(name, _)| {
                        name.strip_prefix(&prefix)
                            .is_some_and(|node| node != self.node_id)
                    })
                    .filter_map(|(_, v)| v.parse::<u64>().ok())
                    .sum();
                out.insert((benefit, kind), (w, sum));
            }
        }
        Ok(out)
    }
}
