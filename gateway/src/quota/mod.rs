//! Quota glue: the rule set and ledger of `policy::quota`, their persistence, and the
//! request lifecycle around them.
//!
//! - **Admission** ([`Quotas::reserve`]): every admitted request or WebSocket session holds an
//!   estimate (`[quota] estimate_*`, by route class) against the device's applicable rules; an
//!   exhausted rule is a 429 / 4028 with `Retry-After` (seconds to the window reset for
//!   periodic rules) before anything goes upstream.
//! - **Settlement** ([`Quotas::settle`]): the real consumption replaces the hold; idempotent
//!   per request id (the gateway's log id). Upstream refusals (non-2xx, no answer) are
//!   refunded; a stream that ended without a usage report, or a device that disconnected
//!   mid-stream, is charged the estimate (never silently free). A WebSocket session is
//!   charged what it metered plus the chat estimate (`estimate_llm_tokens`) for every chat
//!   turn that ended, or was cut, without a usage event ([`Outcome::UnreportedTurns`]).
//! - **Long sessions** ([`Quotas::progress`]): WebSocket sessions report what they consumed
//!   so far: when it changed, at least every third of `hold_ttl`, and every second while the
//!   device has a rule that charges session time ([`Quotas::meters_session_time`]; an idle
//!   `/v1/chat` session uses those up); when the session itself exhausts a rule, the relay
//!   sends an `error` event (4028) and closes both sides.
//! - **Persistence**: [`Quotas::persist`] writes changed usage counters to the embedded store
//!   every `quota.persist_interval` (100 ms by default): that is the most settled usage a
//!   crash can lose. Open holds are not persisted (a crash forgets in-flight requests).
//!   Unsettled holds expire after 15 min and are charged ([`Quotas::sweep`]).
//!
//! # Cost
//! One `Mutex<QuotaLedger>` for the node, taken for a few microseconds per request (and per
//! WebSocket chunk that changed the session's usage). Changing one rule derives the next
//! `RuleSet` from the current one ([`RuleSet::with`]: it copies one of 256 shards, about
//! 0.2 ms with a million rules) and swaps it; upstream sync and cluster reloads rebuild it
//! (O(rules), about a second for a million).

mod leased;

use std::sync::{Arc, Mutex, RwLock};

use policy::decision::Denial;
use policy::ids::DeviceId;
use policy::metering::Usage;
use policy::quota::{
    Consumption, CounterRecord, CreateLimitation, LedgerPolicy, Progress, QuotaLedger,
    ReserveError, Rule, RuleErrors, RuleSet, UpdateLimitation, UsageItem,
};
use policy::route::RouteClass;

use crate::config::QuotaSettings;

use crate::locks::lock;
use crate::store::{RULES, SYNCED_RULES, Store, StoreError, USAGE};

/// Benefit ids of the `[[quota.rules]]` defaults: `config-0`, `config-1`, … in file order.
pub const DEFAULT_RULE_PREFIX: &str = "config-";

fn is_default(r: &Rule) -> bool {
    r.benefit_id.starts_with(DEFAULT_RULE_PREFIX)
}

/// Whether `a` and `b` limit the same thing for the same devices (kind aside).
fn same_scope(a: &Rule, b: &Rule) -> bool {
    a.entity_type == b.entity_type && a.entity_id == b.entity_id && a.benefit_type == b.benefit_type
}

/// `rules` (without any defaults they hold) plus each default that no rule in effect from the
/// admin API or the upstream replaces: one of the same scope and kind that is not cancelled.
/// Defaults are never stored; a change of the file applies at the next start.
fn with_defaults(rules: impl IntoIterator<Item = Rule>, defaults: &[Rule]) -> Vec<Rule> {
    let mut out: Vec<Rule> = rules.into_iter().filter(|r| !is_default(r)).collect();
    let mut keep = Vec::new();
    for d in defaults {
        let replaced = out.iter().any(|r| {
            same_scope(r, d)
                && r.kind() == d.kind()
                && r.status != policy::quota::RuleStatus::Cancel
        });
        if !replaced {
            keep.push(d.clone());
        }
    }
    out.extend(keep);
    out
}

/// How a request ended, for settlement.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// The upstream answered and the meters read this.
    Consumed(Consumption),
    /// The upstream answered but the real usage is unknown (no usage event, device gone
    /// mid-stream): charge the hold (or what was measured, if more).
    Estimate(Consumption),
    /// The upstream refused or never answered: no charge.
    Refund,
    /// A WebSocket session in which `turns` chat turns ended, or were cut, without a usage
    /// event: what was metered plus, for each such turn, the estimate a chat stream without
    /// usage is charged (`estimate_llm_tokens` output tokens).
    UnreportedTurns { measured: Consumption, turns: u64 },
}

/// State of the upstream rule sync, for `/readyz` and metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncStatus {
    pub enabled: bool,
    /// Unix seconds of the last successful sync.
    pub last_success: Option<u64>,
    /// The last failure since then (secret-free).
    pub last_error: Option<String>,
    pub rules: usize,
}

pub struct Quotas {
    rules: RwLock<Arc<RuleSet>>,
    /// Benefit ids of the rules that came from the upstream (the rest are local).
    synced_ids: RwLock<std::collections::HashSet<String>>,
    pub sync_status: Mutex<SyncStatus>,
    /// Wakes the sync service for an immediate round (after a forwarded admin write).
    pub sync_now: tokio::sync::Notify,
    ledger: Mutex<QuotaLedger>,
    settings: QuotaSettings,
    /// Cluster mode: admission against leases from Redis (see [`leased`]).
    leasing: std::sync::OnceLock<leased::Leasing>,
    /// `fleetgate_quota_rules{source="local"}`, set on every swap of the rule set.
    local_rules_gauge: prometheus::IntGauge,
    /// The registry's session re-check epoch, bumped when the rule set changes: a rule that
    /// charges session time must reach idle sessions at once (`DeviceRegistry::session_checks`).
    session_checks: tokio::sync::watch::Sender<u64>,
}

/// Why a rule change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleChangeError {
    #[error("{0}")]
    Invalid(RuleErrors),
    #[error("benefit {0} not found")]
    NotFound(String),
    #[error(
        "benefit {0} is a default from config.toml ([[quota.rules]]): change it there, or create a rule of the same scope to replace it"
    )]
    Default(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl Quotas {
    /// Loads rules and usage counters from the store. `local_rules_gauge` follows the number
    /// of rules in effect that did not come from the upstream; `session_checks` is bumped
    /// whenever the rules change (open sessions re-check themselves).
    pub fn load(
        store: &Store,
        settings: &QuotaSettings,
        local_rules_gauge: prometheus::IntGauge,
        session_checks: tokio::sync::watch::Sender<u64>,
    ) -> Result<Quotas, String> {
        let mut rules: Vec<Rule> = store.load_all(RULES).map_err(|e| e.to_string())?;
        let synced: Vec<Rule> = store.load_all(SYNCED_RULES).map_err(|e| e.to_string())?;
        let synced_ids: std::collections::HashSet<String> =
            synced.iter().map(|r| r.benefit_id.clone()).collect();
        rules.extend(synced);
        let set = RuleSet::new(with_defaults(rules, &settings.default_rules))
            .map_err(|e| format!("stored quota rules are inconsistent: {e}"))?;
        let policy = LedgerPolicy {
            prices: settings.prices,
            reservation_ttl_s: settings.hold_ttl.as_secs().max(1),
            ..LedgerPolicy::default()
        };
        let mut ledger = QuotaLedger::new(policy);
        let counters: Vec<CounterRecord> = store.load_all(USAGE).map_err(|e| e.to_string())?;
        ledger.import(counters);
        // What was just loaded is already on disk.
        let _ = ledger.drain_dirty();
        let status = SyncStatus {
            enabled: settings.sync.is_some(),
            ..SyncStatus::default()
        };
        let quotas = Quotas {
            rules: RwLock::new(Arc::new(set)),
            synced_ids: RwLock::new(synced_ids),
            sync_status: Mutex::new(status),
            sync_now: tokio::sync::Notify::new(),
            ledger: Mutex::new(ledger),
            settings: settings.clone(),
            leasing: std::sync::OnceLock::new(),
            local_rules_gauge,
            session_checks,
        };
        quotas.publish_local_count();
        Ok(quotas)
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        crate::locks::snapshot(&self.rules)
    }

    /// Sets the gauge of rules in effect that did not come from the upstream (admin API, or
    /// Redis in cluster mode).
    fn publish_local_count(&self) {
        let synced = self
            .synced_ids
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        let local = self.rules().len().saturating_sub(synced);
        self.local_rules_gauge.set(local as i64);
    }

    /// Swaps in `next` (only local rules changed) and updates the gauge.
    fn swap_rules(&self, next: RuleSet) {
        crate::locks::replace(&self.rules, Arc::new(next));
        self.publish_local_count();
        self.rules_changed();
    }

    /// Tells open sessions that the rule set changed.
    fn rules_changed(&self) {
        self.session_checks.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// Whether `device` has a rule, in effect now or later, that charges voice-session wall
    /// time (`voice_session_ms`, `voice_unified_duration_*`, or `resource_point` with a
    /// session-time price): its `/v1/chat` sessions use quota up while idle.
    pub fn meters_session_time(&self, device: &DeviceId, now_s: u64) -> bool {
        self.rules()
            .meters_session_time(device, now_s, &self.settings.prices)
    }

    /// What admission holds for a request of this route class.
    pub fn estimate(&self, class: RouteClass) -> Consumption {
        let s = &self.settings;
        let usage = match class {
            RouteClass::Chat | RouteClass::Workflow => Usage {
                llm_output_tokens: s.estimate_llm_tokens,
                ..Usage::default()
            },
            RouteClass::Audio => Usage {
                tts_chars: s.estimate_tts_chars,
                audio_out_ms: s.estimate_audio_ms,
                ..Usage::default()
            },
            RouteClass::Voice => Usage {
                llm_output_tokens: s.estimate_llm_tokens,
                audio_in_ms: s.estimate_audio_ms,
                audio_out_ms: s.estimate_audio_ms,
                ..Usage::default()
            },
            _ => Usage::default(),
        };
        let voice_session_ms = if class == RouteClass::Voice {
            s.estimate_audio_ms
        } else {
            0
        };
        Consumption {
            usage,
            requests: 1,
            voice_session_ms,
        }
    }

    /// `measured` plus the chat estimate (`estimate_llm_tokens` output tokens) for each of
    /// `turns` chat turns whose usage was never reported.
    pub fn with_turn_estimates(&self, measured: Consumption, turns: u64) -> Consumption {
        let mut c = measured;
        let estimated = turns.saturating_mul(self.settings.estimate_llm_tokens);
        c.usage.llm_output_tokens = c.usage.llm_output_tokens.saturating_add(estimated);
        c
    }

    /// Admission: holds the estimate, or says why not.
    pub fn reserve(
        &self,
        request_id: &str,
        device: &DeviceId,
        class: RouteClass,
        now_s: u64,
    ) -> Result<(), Denial> {
        let rules = self.rules();
        let estimate = self.estimate(class);
        match lock(&self.ledger).reserve(request_id, device, &estimate, &rules, now_s) {
            Ok(_reservation) => Ok(()),
            Err(ReserveError::Denied(d)) => Err(d),
            Err(e) => {
                // A reused request id is a gateway bug; admit rather than block a device for it.
                tracing::error!(request_id, error = %e, "Quota reservation failed; admitting unreserved.");
                Ok(())
            }
        }
    }

    /// A long session's consumption so far; `Err` when it has exhausted a rule.
    pub fn progress(
        &self,
        request_id: &str,
        so_far: &Consumption,
        now_s: u64,
    ) -> Result<(), Denial> {
        let rules = self.rules();
        match lock(&self.ledger).progress(request_id, so_far, &rules, now_s) {
            Progress::Exhausted(d) => Err(d),
            _ => Ok(()),
        }
    }

    /// Ends a request (idempotent per request id).
    pub fn settle(
        &self,
        request_id: &str,
        device: &DeviceId,
        class: RouteClass,
        outcome: Outcome,
        now_s: u64,
    ) {
        let mut ledger = lock(&self.ledger);
        match outcome {
            Outcome::Refund => {
                ledger.refund(request_id, now_s);
            }
            Outcome::Consumed(c) => {
                let rules = self.rules();
                ledger.charge(request_id, device, &c, &rules, now_s);
            }
            Outcome::Estimate(measured) => {
                let rules = self.rules();
                let est = self.estimate(class);
                let charge = max_consumption(&est, &measured);
                ledger.charge(request_id, device, &charge, &rules, now_s);
            }
            Outcome::UnreportedTurns { measured, turns } => {
                let rules = self.rules();
                let charge = self.with_turn_estimates(measured, turns);
                ledger.charge(request_id, device, &charge, &rules, now_s);
            }
        }
    }

    /// The device's rules with used / remaining / reset times.
    pub fn usage(&self, device: &DeviceId, now_s: u64) -> Vec<UsageItem> {
        let rules = self.rules();
        lock(&self.ledger).usage(&rules, device, now_s)
    }

    /// Writes changed counters; returns how many.
    pub fn persist(&self, store: &Store) -> Result<usize, StoreError> {
        let dirty = lock(&self.ledger).drain_dirty();
        if dirty.is_empty() {
            return Ok(0);
        }
        let rows: Vec<(String, CounterRecord)> = dirty
            .into_iter()
            .map(|r| {
                (
                    format!("{}/{}/{:?}", r.device, r.benefit_type.as_str(), r.kind),
                    r,
                )
            })
            .collect();
        if let Err(e) = store.put_all(USAGE, &rows) {
            // Mark them dirty again so the next round retries with the current values
            // (charges made since the drain are kept, not overwritten).
            let records: Vec<CounterRecord> = rows.into_iter().map(|(_, r)| r).collect();
            lock(&self.ledger).requeue(&records);
            return Err(e);
        }
        Ok(rows.len())
    }

    /// Charges holds that were never settled (the request's end was lost).
    pub fn sweep(&self, now_s: u64) -> usize {
        lock(&self.ledger).sweep(now_s).len()
    }

    /// Open holds and remembered settled request ids (both bounded; see `LedgerPolicy`).
    pub fn ledger_entries(&self) -> (usize, usize) {
        let l = lock(&self.ledger);
        (l.open_reservations(), l.remembered_ids())
    }

    /// `POST /v1/commerce/benefit/limitations`: the rule to install (with a fresh id).
    pub fn new_rule(&self, req: CreateLimitation) -> Result<Rule, RuleChangeError> {
        let id = format!(
            "{}",
            7_400_000_000_000_000_000u64 + rand::random::<u64>() % 1_000_000_000_000_000_000
        );
        req.into_rule(id).map_err(RuleChangeError::Invalid)
    }

    /// `PUT /v1/commerce/benefit/limitations/{benefit_id}`: the rule to install.
    pub fn updated_rule(
        &self,
        benefit_id: &str,
        req: &UpdateLimitation,
    ) -> Result<Rule, RuleChangeError> {
        let current = self.rules();
        let old = current
            .get(benefit_id)
            .ok_or_else(|| RuleChangeError::NotFound(benefit_id.to_owned()))?;
        if is_default(old) {
            return Err(RuleChangeError::Default(benefit_id.to_owned()));
        }
        old.updated(req).map_err(RuleChangeError::Invalid)
    }

    /// A device was deleted: its counters and open holds go (the store's usage rows go with
    /// the device record, `Store::delete_device`).
    pub fn forget_device(&self, device: &DeviceId) {
        lock(&self.ledger).forget_device(device);
    }

    /// Benefit ids of the rules that came from the upstream.
    fn synced_ids(&self) -> std::collections::HashSet<String> {
        crate::locks::snapshot(&self.synced_ids)
    }

    /// Whether `benefit_id` is a rule created here (not synced from the upstream).
    pub fn is_local_rule(&self, benefit_id: &str) -> bool {
        self.rules().get(benefit_id).is_some() && !self.synced_ids().contains(benefit_id)
    }

    /// Replaces the rules that came from the upstream by `synced`, atomically: validated with
    /// the local rules, persisted, then swapped in. On any error nothing changes (the
    /// last-known rules keep holding).
    pub fn apply_synced(&self, store: &Store, synced: Vec<Rule>) -> Result<usize, String> {
        let current = self.rules();
        let previous = self.synced_ids();
        let mut all: Vec<Rule> = current
            .iter()
            .filter(|r| !previous.contains(&r.benefit_id))
            .cloned()
            .collect();
        let ids: std::collections::HashSet<String> =
            synced.iter().map(|r| r.benefit_id.clone()).collect();
        // Most rounds bring the same rules: open sessions need no wake-up then.
        let unchanged =
            ids == previous && synced.iter().all(|r| current.get(&r.benefit_id) == Some(r));
        let n = synced.len();
        let rows: Vec<(String, Rule)> = synced
            .iter()
            .map(|r| (r.benefit_id.clone(), r.clone()))
            .collect();
        all.extend(synced);
        let next = RuleSet::new(with_defaults(all, &self.settings.default_rules))
            .map_err(|e| format!("synced rules conflict with local rules: {e}"))?;
        store
            .replace_all(SYNCED_RULES, &rows)
            .map_err(|e| e.to_string())?;
        crate::locks::replace(&self.rules, Arc::new(next));
        crate::locks::replace(&self.synced_ids, ids);
        self.publish_local_count();
        if !unchanged {
            self.rules_changed();
        }
        Ok(n)
    }

    /// Cluster mode: the local (non-synced) rules become `local`, as Redis has them.
    pub fn replace_local_rules(&self, local: Vec<Rule>) -> Result<(), String> {
        let current = self.rules();
        let synced = self.synced_ids();
        let mut all: Vec<Rule> = current
            .iter()
            .filter(|r| synced.contains(&r.benefit_id))
            .cloned()
            .collect();
        all.extend(local);
        let next = RuleSet::new(with_defaults(all, &self.settings.default_rules))
            .map_err(|e| e.to_string())?;
        self.swap_rules(next);
        Ok(())
    }

    /// The current set with `rule` added (or replacing the rule with its id), validated
    /// ([`RuleSet::with`]: copies a shard of the set, not every rule). A rule of the same
    /// scope as a `[[quota.rules]]` default rebuilds the set instead: it may replace the
    /// default, or (cancelled, or of another kind now) bring it back.
    fn set_with(&self, rule: &Rule) -> Result<RuleSet, RuleChangeError> {
        let defaults = &self.settings.default_rules;
        let current = self.rules();
        if !defaults.iter().any(|d| same_scope(d, rule)) {
            return current.with(rule.clone()).map_err(RuleChangeError::Invalid);
        }
        let others = current
            .iter()
            .filter(|r| r.benefit_id != rule.benefit_id)
            .cloned();
        RuleSet::new(with_defaults(others.chain([rule.clone()]), defaults))
            .map_err(RuleChangeError::Invalid)
    }

    /// Checks that `rule` fits the current set (cluster mode validates before writing Redis).
    pub fn validate_with(&self, rule: &Rule) -> Result<(), RuleChangeError> {
        self.set_with(rule).map(|_| ())
    }

    /// Cluster mode: swaps in the current set with `rule`, once Redis holds it. Derived from
    /// the set as it is now, so a change the feed applied meanwhile is kept.
    pub fn apply_rule(&self, rule: &Rule) -> Result<(), RuleChangeError> {
        let next = self.set_with(rule)?;
        self.swap_rules(next);
        Ok(())
    }

    /// Validates against the current set, persists, then swaps in the new set.
    pub fn install(&self, store: &Store, rule: Rule) -> Result<Rule, RuleChangeError> {
        let next = self.set_with(&rule)?;
        store.put_all(RULES, &[(rule.benefit_id.clone(), rule.clone())])?;
        self.swap_rules(next);
        Ok(rule)
    }
}

fn max_consumption(a: &Consumption, b: &Consumption) -> Consumption {
    let (x, y) = (&a.usage, &b.usage);
    Consumption {
        usage: Usage {
            llm_input_tokens: x.llm_input_tokens.max(y.llm_input_tokens),
            llm_output_tokens: x.llm_output_tokens.max(y.llm_output_tokens),
            audio_in_ms: x.audio_in_ms.max(y.audio_in_ms),
            audio_out_ms: x.audio_out_ms.max(y.audio_out_ms),
            tts_chars: x.tts_chars.max(y.tts_chars),
            usage_events: y.usage_events,
            completed: y.completed,
        },
        requests: a.requests.max(b.requests),
        voice_session_ms: a.voice_session_ms.max(b.voice_session_ms),
    }
}

/// Background service: persists usage counters every `quota.persist_interval`, sweeps
/// expired holds every second, and flushes once more on shutdown.
pub struct Persister {
    pub state: crate::state::SharedState,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Persister {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let q = &self.state.quotas;
        let every = self.state.config.quota.persist_interval;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = std::time::Instant::now();
        // Cluster mode: a failing report is logged once per outage, not every tick.
        let mut reports_failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
            if last_sweep.elapsed() >= std::time::Duration::from_secs(1) {
                last_sweep = std::time::Instant::now();
                let swept = q.sweep(crate::state::now_s());
                if swept > 0 {
                    tracing::warn!(swept, "Charged quota holds whose requests never settled.");
                }
                let (open, remembered) = q.ledger_entries();
                let entries = &self.state.metrics.quota_ledger_entries;
                entries.with_label_values(&["open"]).set(open as i64);
                entries
                    .with_label_values(&["settled"])
                    .set(remembered as i64);
            }
            if q.leased() {
                match q.report(false).await {
                    Err(e) if !reports_failing => {
                        reports_failing = true;
                        tracing::warn!(error = %e, "Reporting usage to Redis failed; retrying every tick.");
                    }
                    Err(_) => {}
                    Ok(_) if reports_failing => {
                        reports_failing = false;
                        tracing::info!("Usage reports to Redis work again.");
                    }
                    Ok(_) => {}
                }
                continue;
            }
            if let Err(e) = q.persist(&self.state.store) {
                self.state
                    .metrics
                    .store_errors
                    .with_label_values(&["usage"])
                    .inc();
                tracing::error!(error = %e, "Persisting usage counters failed; will retry.");
            }
        }
        if q.leased() {
            if let Err(e) = q.report(true).await {
                tracing::error!(error = %e, "Final usage report to Redis failed.");
            }
        } else if let Err(e) = q.persist(&self.state.store) {
            tracing::error!(error = %e, "Final usage flush failed.");
        }
    }
}
