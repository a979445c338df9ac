//! Per-device quotas: Coze-shaped rules ([`rule`]), exact consumption amounts ([`amount`]) and
//! the ledger that meters devices against them ([`ledger`]).
//!
//! Pure like the rest of the crate: every function takes `now_s` (unix seconds); nothing reads
//! a clock, locks, or does I/O. The gateway owns `ArcSwap<RuleSet>` and `Mutex<QuotaLedger>`
//! (or shards the ledger by device hash) and persists what [`QuotaLedger::drain_dirty`] returns.
//!
//! # Rules (`coze-api.md` §10)
//!
//! [`Rule`] is the flat shape of Coze's list response and (de)serializes as Coze's JSON;
//! [`CreateLimitation`] and [`UpdateLimitation`] are the create/update request bodies, so the
//! admin API can serve Coze's paths unchanged:
//!
//! | Coze endpoint | gateway code |
//! |---|---|
//! | `POST /v1/commerce/benefit/limitations` | `CreateLimitation` → [`CreateLimitation::into_rule`] (gateway assigns `benefit_id`) → [`RuleSet::with`] (checks [`RuleSet::admits`]) → swap in the new set |
//! | `GET /v1/commerce/benefit/limitations` | filter [`RuleSet::iter`] (or [`RuleSet::for_device`] / [`RuleSet::enterprise_rules`]), page it |
//! | `PUT /v1/commerce/benefit/limitations/{benefit_id}` | [`RuleSet::get`] → [`Rule::updated`] → [`RuleSet::with`] → swap in |
//! | `GET /v1/commerce/benefit/limitations/usage` (gateway's own) and `GET /v1/gateway/quota` | [`QuotaLedger::usage`] |
//!
//! Validation reports every problem at once as [`RuleErrors`], each a [`RuleError`] with a
//! field path (`benefit_info.limit`, `rules[3].ended_at`) and a Coze-like message.
//!
//! A [`RuleSet`] is an immutable snapshot. [`RuleSet::with`] derives the next one from it for
//! a single change, sharing all but one of the 256 shards of each index with it, so changing
//! one of a million rules costs about 0.2 ms; [`RuleSet::new`] builds one from a list
//! (start-up, sync, reload: about a second for a million rules).
//!
//! Semantics, as on Coze:
//!
//! - Only `valid` rules inside `[started_at, ended_at)` apply; `frozen` and `cancel` rules are
//!   stored and ignored. `ended_at = 253402300799` ([`FOREVER`]) means no end.
//! - Only `single_device` and `enterprise_all_devices` rules apply to devices. Other entity
//!   types (custom consumers, incl. the Java SDK's `single_identifier` /
//!   `enterprise_all_identifiers` aliases, and Coze members/roles/workspaces/orgs) are accepted
//!   and stored but never enforced.
//! - An `enterprise_all_devices` rule is a **per-device default limit**, not a pool the fleet
//!   shares: every device gets its own counter against it.
//! - For each (benefit type, kind ∈ {cumulative, periodic}) a device's active `single_device`
//!   rule overrides the active enterprise rule (device 2000 vs all-devices 5000 → 2000). The
//!   other kind is unaffected: a device can be under a single-device daily cap and the
//!   enterprise lifetime cap at once. A frozen, cancelled, not-yet-started or ended single rule
//!   does not override: the enterprise default applies again.
//! - A device is blocked when **any** applicable rule is exhausted (`used + reserved ≥ limit`;
//!   `limit = 0` blocks). Devices with no applicable rule are unlimited.
//! - At most one cumulative and one periodic non-cancelled rule per enterprise-wide scope and
//!   benefit type; per device, non-cancelled single rules of one benefit type and kind must
//!   not overlap in time. So at most one rule applies per (device, benefit type, kind).
//!
//! # Windows
//!
//! Cumulative (`trigger_unit = never`): one window, `[started_at, ended_at)`. Periodic:
//! consecutive windows of `trigger_time × {60, 3600, 86400}` s **aligned to `started_at`**, the
//! last one cut at `ended_at`. There is no time-zone logic: a daily rule that starts at a UTC
//! midnight resets at UTC midnight; one that starts at 00:00 Beijing time (16:00 UTC) resets
//! then. Coze's console default `started_at = 0` gives UTC-midnight days.
//!
//! # Units and amounts
//!
//! Each benefit has a limit unit (the rule's `limit`) and an integer base unit the ledger
//! counts in (see [`BenefitType`]): `resource_point` limits are points, counted in micro-points
//! (× 1 000 000) priced by the [`PriceTable`]; `voice_unified_duration_*` limits are seconds,
//! counted in ms. No floats anywhere; all arithmetic saturates. [`Consumption`] is what one
//! request consumed: the meters' `Usage` plus the request count and voice-session wall time
//! that only the gateway can measure. **Approximation:** both `voice_unified_duration_system`
//! and `_custom` count the same measured `/v1/chat` session wall time; the gateway cannot tell
//! system from cloned voices and has no RTC rooms.
//!
//! # Ledger
//!
//! One counter per (device, benefit type, kind), tagged with the start of the window its
//! `used` belongs to. A charge into a different window starts the counter from 0, and a read
//! with another window start reads 0: windows roll over lazily, with no deletes that could race
//! with debits. The counter is shared by whichever rule is in effect for that key, so replacing
//! the enterprise rule by a single-device rule with the same window alignment keeps the usage;
//! a rule change that moves the window start starts the counter over.
//!
//! Lifecycle of a request (`request_id` is the gateway's unique id):
//!
//! 1. Admission: [`QuotaLedger::reserve`] (streaming calls, WebSocket sessions) checks and holds
//!    an estimate against every applicable rule, or [`QuotaLedger::check`] alone (short REST
//!    calls).
//! 2. Long sessions call [`QuotaLedger::progress`] with the consumption so far: the hold grows
//!    with it, the expiry moves on, and [`Progress::Exhausted`] says when the session itself
//!    has run the device out (send the `error` event, close, then settle).
//! 3. End: [`QuotaLedger::settle`] replaces the hold with the actual consumption (reserved
//!    requests), [`QuotaLedger::charge`] charges a non-reserved request, [`QuotaLedger::refund`]
//!    drops the hold when upstream refused the request. All three are **idempotent per request
//!    id**: a second call changes nothing and answers [`SettleOutcome::AlreadySettled`] /
//!    [`RefundOutcome::AlreadySettled`]. `settle` of an id it never saw charges nothing and
//!    answers [`SettleOutcome::Unknown`]: a settlement without device and rules cannot be
//!    attributed, so non-reserved requests use `charge`.
//! 4. [`QuotaLedger::sweep`] (call every few seconds) charges every reservation not finished
//!    or progressed within `reservation_ttl_s` its held amount (the estimate, or the larger
//!    reported progress). A device that disconnects is therefore always charged: the gateway
//!    drains to the final usage event within its bound and settles, otherwise the estimate is
//!    charged. A late `settle` of a swept id is `AlreadySettled(Swept)`; set the TTL above the
//!    drain bound and the progress interval.
//!
//! Charges land in the window containing the settlement time (clamped into the rule's life),
//! not the admission time: a turn that straddles midnight counts for the new day.
//!
//! Idempotency memory is bounded: finished ids are remembered for `remember_finished_s`
//! seconds and at most `remember_finished_max` ids (oldest forgotten first). A settle repeated
//! after that is `Unknown` (charges nothing), and a `charge` repeated after that charges again.
//!
//! # Approximation
//!
//! Admission is `used + reserved < limit`, so a request is admitted while anything remains, and
//! its actual use may exceed its estimate. Overshoot past a limit is therefore bounded by one
//! in-flight reservation per concurrent request of that device: each admitted request may add
//! its (actual − estimate) plus the last admitted request's full use; once holds reach the limit
//! every further request is denied. With `progress` at ~1 s intervals a voice session
//! overshoots by at most one interval of audio.
//!
//! # Leased mode (cluster)
//!
//! Several gateway nodes can share one fleet-wide counter per (device, benefit type, kind and
//! window) in a shared store (Redis). Each node keeps its own [`QuotaLedger`], switched on
//! with [`QuotaLedger::set_leased`], and admits only against the slice of the rule's limit
//! the store granted to it for the counter's current window, its **lease**: admission is
//! `used + reserved < lease` instead of `< limit` (no lease for the current window = 0, so a
//! node starts out denying). Denials are still built from the rule. The store guarantees the
//! leases of all nodes never add up to more than the limit, so the ledger does not need it.
//!
//! 1. On a denial ([`QuotaLedger::check`] / [`QuotaLedger::reserve`] fail, or
//!    [`Progress::Exhausted`]) the gateway calls [`QuotaLedger::wants`]: one [`LeaseWant`] per
//!    rule whose demand (`used + reserved`, which includes long sessions' holds grown to
//!    their progress) has reached the lease, asking for the shortfall plus `lease_size` of
//!    headroom.
//! 2. It asks the shared store for each want (outside any ledger lock) and records what the
//!    store gave with [`QuotaLedger::grant`] (possibly less, or nothing: then the denial
//!    stands), then retries the admission or the `progress` call. A grant for a newer window
//!    moves the counter there (`used`, `granted` from 0); a stale grant for an older window
//!    is ignored.
//! 3. [`QuotaLedger::release_idle`] (periodically) gives back the unused part of leases that
//!    saw no activity for a while and have no open hold: `granted = used`, marked dirty.
//! 4. [`QuotaLedger::drain_dirty`] reports charges, window moves and releases as
//!    [`CounterRecord`]s carrying the node's **absolute** `used`, `granted` and `acked` (the
//!    running total the store granted) for the window; the store derives the node's share
//!    from them (grants still in flight are `store's total − acked`), so re-sending a record
//!    (retry, [`QuotaLedger::requeue`], heartbeat of [`QuotaLedger::outstanding`]) is
//!    idempotent. Grants themselves are not dirty: the store made them.
//! 5. Store unreachable: [`QuotaLedger::allow`] adds a bounded *degraded allowance* to the
//!    lease on the node's own authority (`acked` unchanged, marked dirty so the store learns
//!    of it once it is back).
//!
//! A window rolls over per counter as before: a lease is only ever for one window, and the
//! next window starts with no lease. [`QuotaLedger::usage`] still shows this node's local
//! values against the rule's limit.
//!
//! # Persistence and failure modes
//!
//! The gateway stores `(device, benefit_type, kind) → {window_start, used, granted}`
//! ([`CounterRecord`]; `granted` is 0 outside leased mode and loads as 0 from older records):
//! [`QuotaLedger::export`] for a full snapshot, [`QuotaLedger::drain_dirty`] for the counters
//! charged since the last drain (records are absolute values: rewriting one is harmless),
//! [`QuotaLedger::import`] at start. Open reservations and the idempotency memory are **not**
//! persisted: a crash loses the charges of in-flight requests (undercharge bounded by what was
//! in flight) and a restart forgets which ids were settled (only matters for retries spanning
//! the restart).
//!
//! # What this module does not do
//!
//! No clock, no locking, no persistence, no HTTP: the gateway supplies `now_s`, serialises
//! access, writes records, and maps [`Denial`](crate::decision::Denial)s
//! (`quota_exhausted`, 429 / 4028, `Retry-After` for periodic rules) to responses. It does not
//! sync rules from Coze or reconcile with Coze bills.

pub mod amount;
pub mod ledger;
pub mod rule;

pub use amount::{Consumption, PriceTable};
pub use ledger::{
    CounterRecord, CounterView, Exhausted, Finish, HELD_RETRY_AFTER_S, LeaseWant, LedgerPolicy,
    Progress, QuotaLedger, RefundOutcome, Reservation, ReserveError, SettleOutcome, Swept,
    UsageItem,
};
pub use rule::{
    ActiveMode, BaseUnit, BenefitInfo, BenefitType, CreateLimitation, EntityType, FOREVER, Rule,
    RuleError, RuleErrorKind, RuleErrors, RuleKind, RuleSet, RuleStatus, TriggerUnit,
    UpdateLimitation, Window,
};

#[cfg(test)]
mod tests;
