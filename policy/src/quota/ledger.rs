//! The per-device quota ledger: counters, reservations, settlement, idempotency, persistence.
//!
//! See the [module docs](super) for the model; this file holds the mechanics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde::{Deserialize, Serialize};

use super::amount::{Consumption, PriceTable};
use super::rule::{
    BaseUnit, BenefitType, EntityType, Rule, RuleKind, RuleSet, TriggerUnit, Window, WindowSpec,
};
use crate::decision::{Denial, DenyReason};
use crate::ids::DeviceId;

/// Validated ledger settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerPolicy {
    /// How `resource_point` is computed from the other meters.
    pub prices: PriceTable,
    /// A reservation not settled, refunded or progressed within this many seconds is charged
    /// its held amount by [`QuotaLedger::sweep`]. Must exceed the gateway's drain bound and the
    /// interval between [`QuotaLedger::progress`] calls of long sessions.
    pub reservation_ttl_s: u64,
    /// How long a finished request id is remembered for idempotency (seconds)...
    pub remember_finished_s: u64,
    /// ...and at most how many ids (oldest forgotten first; at least 1).
    pub remember_finished_max: usize,
}

impl Default for LedgerPolicy {
    fn default() -> LedgerPolicy {
        LedgerPolicy {
            prices: PriceTable::default(),
            reservation_ttl_s: 900,
            remember_finished_s: 3_600,
            remember_finished_max: 100_000,
        }
    }
}

/// How a request id was finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// [`QuotaLedger::settle`] replaced a reservation by the actual consumption.
    Settled,
    /// [`QuotaLedger::charge`] charged a request that had no reservation.
    Charged,
    /// [`QuotaLedger::refund`] dropped the reservation without charge.
    Refunded,
    /// [`QuotaLedger::sweep`] charged an expired reservation its held amount.
    Swept,
}

/// Proof that a reservation is held. Finish it with `settle` or `refund` (by the request id it
/// was reserved under); otherwise `sweep` charges it after `expires_at_s`. It holds no copy of
/// the id or the device: admission makes one per request, and the caller has both.
#[must_use = "a reservation must be settled or refunded"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    expires_at_s: u64,
}

impl Reservation {
    /// When `sweep` would charge it if nothing else happens (`progress` pushes this out).
    pub fn expires_at_s(&self) -> u64 {
        self.expires_at_s
    }
}

/// Why `reserve` did not reserve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// A rule is exhausted: answer the device with this.
    #[error("{}", .0.message)]
    Denied(Denial),
    /// The request id is already finished, or reserved for another device: a gateway bug.
    #[error("request id already used")]
    RequestIdReused,
}

/// The result of `settle` / `charge`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    /// The actual consumption was charged (replacing the reservation, if any).
    Settled,
    /// This request id was already finished; nothing changed.
    AlreadySettled(Finish),
    /// `settle` of an id with no reservation and no memory of it: nothing charged (use
    /// `charge` for requests that were never reserved).
    Unknown,
}

/// The result of `refund`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundOutcome {
    Refunded,
    AlreadySettled(Finish),
    Unknown,
}

/// The result of `progress`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Keep going.
    Continue,
    /// The session itself has used up a rule: end it (WS `error` event 4028, then close), then
    /// `settle` it.
    Exhausted(Denial),
    /// No open reservation under this id.
    Unknown,
}

/// An exhausted rule, with what the gateway needs to log and answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub benefit_id: String,
    pub benefit_type: BenefitType,
    pub kind: RuleKind,
    /// Seconds until the window resets (periodic), `None` for cumulative (blocked until the
    /// rule changes); [`HELD_RETRY_AFTER_S`] when only holds fill the rule.
    pub retry_after_s: Option<u64>,
    /// What is settled leaves room under the rule: the holds of the device's requests still
    /// in progress fill it. They settle (usually for less than their estimate) within the
    /// requests' lifetime, so the device is told to retry shortly, not at the window reset.
    pub held: bool,
}

/// `Retry-After` when a rule is full only of in-progress holds.
pub const HELD_RETRY_AFTER_S: u64 = 1;

impl Exhausted {
    /// `QuotaExhausted`, a message naming the benefit, and `Retry-After` for periodic rules.
    pub fn to_denial(&self) -> Denial {
        let message = if self.held {
            "quota reserved by requests in progress; retry shortly"
        } else {
            self.benefit_type.exhausted_message()
        };
        let d = Denial::new(DenyReason::QuotaExhausted, message);
        match self.retry_after_s {
            Some(s) => d.retry_after(s),
            None => d,
        }
    }
}

/// One expired reservation charged by `sweep`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Swept {
    pub request_id: String,
    pub device: DeviceId,
    /// What was charged: the estimate, or more if `progress` reported more.
    pub charged: Consumption,
}

/// One applicable rule and where the device stands against it (the usage API's item).
///
/// `limit`, `used`, `reserved`, `remaining` are in the benefit's **base unit** (`unit`:
/// micro-points, milliseconds, ...); `rule_limit` is the rule's own `limit` in its limit unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageItem {
    pub benefit_id: String,
    pub entity_type: EntityType,
    pub benefit_type: BenefitType,
    pub kind: RuleKind,
    pub trigger_unit: TriggerUnit,
    pub trigger_time: u32,
    pub unit: BaseUnit,
    pub rule_limit: u64,
    pub limit: u64,
    pub used: u64,
    pub reserved: u64,
    /// `limit − used − reserved`, floored at 0.
    pub remaining: u64,
    pub window_start: u64,
    /// End of the current window (cumulative: the rule's `ended_at`).
    pub window_end: u64,
    /// When the window resets: `Some(window_end)` for periodic rules, `None` for cumulative.
    pub resets_at: Option<u64>,
}

/// A persisted counter: `(device, benefit_type, kind) → {window_start, used, granted}`.
/// Reservations are not persisted (see the module docs, "Failure modes").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecord {
    pub device: DeviceId,
    pub benefit_type: BenefitType,
    pub kind: RuleKind,
    pub window_start: u64,
    pub used: u64,
    /// Units of the shared quota this node holds for `window_start` (leased mode, see
    /// [`QuotaLedger::grant`]); 0 otherwise. Absolute, like `used`. Records written before this
    /// field existed load with 0.
    #[serde(default)]
    pub granted: u64,
    /// Leased mode: what the shared store granted this node for `window_start` in total, never
    /// decreased by releases (`granted` is this minus releases plus degraded allowances). The
    /// store compares it with its own running total to see grants still in flight.
    #[serde(default)]
    pub acked: u64,
}

/// A read-only view of one counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterView {
    /// Start of the window `used` belongs to.
    pub window_start: u64,
    /// Charged in that window (base units).
    pub used: u64,
    /// Held by open reservations, whatever their window (base units).
    pub reserved: u64,
}

/// What a node in leased mode should ask the shared store for: one applicable rule whose local
/// demand has reached the lease this node holds for the current window (see
/// [`QuotaLedger::wants`]). All amounts are in the benefit's base unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseWant {
    /// The rule's benefit type (with `kind`, the counter key under the device).
    pub benefit_type: BenefitType,
    /// Cumulative or periodic: which of the device's two counters for `benefit_type`.
    pub kind: RuleKind,
    /// Start of the rule's window at `now_s`: the window the grant is for (pass it back to
    /// [`QuotaLedger::grant`]).
    pub window_start: u64,
    /// End of that window (exclusive): the shared store can expire its grant bookkeeping then.
    pub window_end: u64,
    /// The rule's limit in base units: what the shared store may grant in total, across all
    /// nodes, for this device and window.
    pub limit: u64,
    /// What this node charged in the window so far.
    pub used: u64,
    /// The lease this node already holds for the window (0 if none, or only for an older
    /// window).
    pub granted: u64,
    /// What the store granted for the window in total (see [`CounterRecord::acked`]).
    pub acked: u64,
    /// How many more units to ask for: `used + reserved − granted + lease_size` (at least 1),
    /// so that after the grant the lease exceeds the current demand by `lease_size`. The store
    /// may grant less (or nothing) when the fleet is near the limit.
    pub want: u64,
}

#[derive(Clone, Debug)]
struct Slot {
    benefit: BenefitType,
    kind: RuleKind,
    window_start: u64,
    used: u64,
    reserved: u64,
    /// Units granted to this node for `window_start` (leased mode).
    granted: u64,
    /// Units the store granted for `window_start` in total (leased mode; see
    /// [`CounterRecord::acked`]).
    acked: u64,
    /// Last `now_s` a reserve, progress, settle, charge or grant touched the slot (max seen).
    last_active_s: u64,
    dirty: bool,
}

impl Slot {
    fn used_in(&self, window_start: u64) -> u64 {
        if self.window_start == window_start {
            self.used
        } else {
            0
        }
    }

    /// The lease for the window starting at `window_start`: nothing unless it was granted for
    /// that very window.
    fn granted_in(&self, window_start: u64) -> u64 {
        if self.window_start == window_start {
            self.granted
        } else {
            0
        }
    }

    /// Move the counter to another window: its `used` and `granted` start from 0 there.
    fn move_to(&mut self, window_start: u64) {
        if self.window_start != window_start {
            self.window_start = window_start;
            self.used = 0;
            self.granted = 0;
            self.acked = 0;
        }
    }

    fn touch(&mut self, now_s: u64) {
        self.last_active_s = self.last_active_s.max(now_s);
    }

    fn charge(&mut self, window_start: u64, amount: u64) {
        self.move_to(window_start);
        self.used = self.used.saturating_add(amount);
        self.dirty = true;
    }
}

/// The admission bound for `rule` in window `w`: the rule's limit, or in leased mode the lease
/// this node holds for `w`.
fn bound(leased: bool, rule: &Rule, slot: Option<&Slot>, w: Window) -> u64 {
    if leased {
        slot.map_or(0, |s| s.granted_in(w.start))
    } else {
        rule.limit_base()
    }
}

/// One rule's share of a reservation.
#[derive(Clone, Debug)]
struct Hold {
    benefit: BenefitType,
    kind: RuleKind,
    spec: WindowSpec,
    held: u64,
}

/// An open reservation, in `QuotaLedger::open` under its id's [`fingerprint`].
#[derive(Clone, Debug)]
struct Open {
    /// The id itself: for [`Swept`], and to tell two ids apart should their fingerprints ever
    /// collide.
    request_id: Box<str>,
    device: DeviceId,
    estimate: Consumption,
    observed: Consumption,
    holds: Vec<Hold>,
    expires_at: u64,
}

/// The ledger. Not thread-safe by itself: the gateway owns it behind a `Mutex` (or shards it by
/// device hash). See the [module docs](super).
#[derive(Debug)]
pub struct QuotaLedger {
    policy: LedgerPolicy,
    counters: HashMap<DeviceId, Vec<Slot>>,
    /// Devices with a dirty slot: a device is here exactly when one of its slots has `dirty`
    /// set (so a charge need not look it up here when the device already had one).
    dirty: HashSet<DeviceId>,
    /// Open reservations by their id's [`fingerprint`]: each finishing call fingerprints the
    /// id once and every table lookup after that is free of string hashing.
    open: FingerprintMap<Open>,
    /// Admit against granted leases instead of rule limits (see [`QuotaLedger::set_leased`]).
    leased: bool,
    /// Finished ids by [`fingerprint`], with the order they finished in (for eviction). An id
    /// is never open and finished at once (`reserve` refuses finished ids; finishing removes
    /// the open entry first), so the finishing calls look in `open` (small, hot) first and
    /// touch this large table only for ids that are not open.
    finished: FingerprintMap<Finish>,
    finished_order: VecDeque<(Fingerprint, u64)>,
}

/// How a request id is known to the tables: a 128-bit fingerprint (SipHash-1-3 with 128-bit
/// output, fixed keys; `[u64; 2]`, not `u128`, to keep 8-byte alignment) instead of its text.
/// At the default bound of 100 000 ids that is ~6.5 MB for the map (262,144 slots, reserved on
/// the first settle; see `remember`) plus ~2.4 MB for the queue, instead of ~18 MB with the id
/// stored twice on the heap. Two distinct ids share
/// a fingerprint with probability ~n²/2¹²⁹: negligible, and the gateway's ids are its own
/// random log ids, never chosen by a client.
fn fingerprint(request_id: &str) -> Fingerprint {
    use siphasher::sip128::{Hasher128 as _, SipHasher13};
    let mut h = SipHasher13::new();
    h.write(request_id.as_bytes());
    let t = h.finish128();
    Fingerprint([t.h1, t.h2])
}

/// A request id's [`fingerprint`]. Its bits are already a SipHash of the id (and the ids are
/// the gateway's own random log ids, so nobody can aim them at one bucket), so the tables keyed
/// by it hash it by taking its first half ([`FingerprintHasher`]) instead of running SipHash
/// over it a third time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint([u64; 2]);

impl Hash for Fingerprint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0[0]);
    }
}

/// A table keyed by request-id [`Fingerprint`]s.
type FingerprintMap<V> = HashMap<Fingerprint, V, BuildHasherDefault<FingerprintHasher>>;

/// The hasher of the [`FingerprintMap`]s: passes a [`Fingerprint`]'s first half through.
#[derive(Default)]
struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    /// Only [`Fingerprint`] is hashed with this; any other input is folded in FNV-1a style
    /// rather than ignored.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

type Counters = HashMap<DeviceId, Vec<Slot>>;

fn find<'a>(c: &'a Counters, d: &DeviceId, b: BenefitType, k: RuleKind) -> Option<&'a Slot> {
    c.get(d)?.iter().find(|s| s.benefit == b && s.kind == k)
}

/// The device's slots, created empty if missing: one hash of the id (the clone for the entry is
/// a reference count). Call it only with something to hold or charge, so that a device with no
/// applicable rule gets no entry.
fn slots_mut<'a>(c: &'a mut Counters, d: &DeviceId) -> &'a mut Vec<Slot> {
    c.entry(d.clone()).or_insert_with(|| Vec::with_capacity(2))
}

/// The slot for `(b, k)` among a device's slots, created empty if missing.
fn slot_mut(slots: &mut Vec<Slot>, b: BenefitType, k: RuleKind) -> &mut Slot {
    let i = match slots.iter().position(|s| s.benefit == b && s.kind == k) {
        Some(i) => i,
        None => {
            slots.push(Slot {
                benefit: b,
                kind: k,
                window_start: 0,
                used: 0,
                reserved: 0,
                granted: 0,
                acked: 0,
                last_active_s: 0,
                dirty: false,
            });
            slots.len() - 1
        }
    };
    &mut slots[i]
}

/// What one call does to one of a device's counters.
#[derive(Clone, Copy)]
struct Change {
    /// Held amount to let go of.
    release: u64,
    /// Held amount to add.
    hold: u64,
    /// `(window_start, amount)` to charge.
    charge: Option<(u64, u64)>,
    /// Activity to record at this `now_s`.
    touch: Option<u64>,
}

/// Applies `change` to the counter `(b, k)` of a device. Returns whether the device has to
/// join the dirty set: it is charged now and had no dirty slot before.
fn apply(slots: &mut Vec<Slot>, b: BenefitType, k: RuleKind, change: Change) -> bool {
    let newly_dirty = change.charge.is_some() && !slots.iter().any(|s| s.dirty);
    let slot = slot_mut(slots, b, k);
    slot.reserved = slot
        .reserved
        .saturating_sub(change.release)
        .saturating_add(change.hold);
    if let Some(now_s) = change.touch {
        slot.touch(now_s);
    }
    if let Some((window_start, amount)) = change.charge {
        slot.charge(window_start, amount);
    }
    newly_dirty
}

/// Applies `change(hold)` to the device's counter of each hold of `open` (looking the device
/// up once), marking the device dirty when that is new. `change` may also update the hold
/// itself (`progress` grows it).
fn apply_holds(
    c: &mut Counters,
    dirty: &mut HashSet<DeviceId>,
    open: &mut Open,
    mut change: impl FnMut(&mut Hold) -> Change,
) {
    if open.holds.is_empty() {
        return;
    }
    let slots = slots_mut(c, &open.device);
    let mut newly_dirty = false;
    for hold in &mut open.holds {
        let (b, k) = (hold.benefit, hold.kind);
        newly_dirty |= apply(slots, b, k, change(hold));
    }
    if newly_dirty {
        dirty.insert(open.device.clone());
    }
}

/// The open reservation under `request_id`, if any.
fn open_mut<'a>(open: &'a mut FingerprintMap<Open>, request_id: &str) -> Option<&'a mut Open> {
    open.get_mut(&fingerprint(request_id))
        .filter(|o| &*o.request_id == request_id)
}

/// Takes the open reservation under `request_id` (fingerprinted as `fp`) out of `open`, if any.
fn take_open(open: &mut FingerprintMap<Open>, fp: Fingerprint, request_id: &str) -> Option<Open> {
    match open.get(&fp) {
        Some(o) if &*o.request_id == request_id => open.remove(&fp),
        _ => None,
    }
}

impl QuotaLedger {
    pub fn new(policy: LedgerPolicy) -> QuotaLedger {
        QuotaLedger {
            policy,
            counters: HashMap::new(),
            dirty: HashSet::new(),
            open: HashMap::default(),
            leased: false,
            finished: HashMap::default(),
            finished_order: VecDeque::new(),
        }
    }

    pub fn policy(&self) -> &LedgerPolicy {
        &self.policy
    }

    /// Replace the settings (prices, TTLs) for future calls.
    pub fn set_policy(&mut self, policy: LedgerPolicy) {
        self.policy = policy;
    }

    /// Switch leased mode (cluster deployments; default off). When on, admission
    /// ([`check`](Self::check), [`check_detailed`](Self::check_detailed),
    /// [`reserve`](Self::reserve), [`progress`](Self::progress)) compares `used + reserved`
    /// against the lease this node was [granted](Self::grant) for the slot's current window
    /// instead of the rule's limit: with no lease for that window, every request of a limited
    /// benefit is denied until the gateway has asked the shared store (see
    /// [`wants`](Self::wants)). Denials are still built from the rule (`benefit_id`,
    /// `Retry-After`). Switching changes only future admissions; counters, leases and holds are
    /// kept. See the module docs, "Leased mode (cluster)".
    pub fn set_leased(&mut self, leased: bool) {
        self.leased = leased;
    }

    /// Whether leased mode is on (see [`QuotaLedger::set_leased`]).
    pub fn leased(&self) -> bool {
        self.leased
    }

    /// Admission without side effects: `Ok` unless an applicable rule has `used + reserved ≥
    /// limit` (in leased mode: `≥` this node's lease for the current window). See
    /// [`QuotaLedger::check_detailed`] for which denial wins.
    pub fn check(&self, rules: &RuleSet, device: &DeviceId, now_s: u64) -> Result<(), Denial> {
        self.check_detailed(rules, device, now_s)
            .map_err(|e| e.to_denial())
    }

    /// Like [`QuotaLedger::check`] with the exhausted rule's id. When several are exhausted a
    /// cumulative one wins (no retry helps), otherwise the periodic one resetting last.
    pub fn check_detailed(
        &self,
        rules: &RuleSet,
        device: &DeviceId,
        now_s: u64,
    ) -> Result<(), Exhausted> {
        let mut worst: Option<Exhausted> = None;
        for rule in rules.applicable(device, now_s) {
            let Some(w) = rule.window(now_s) else {
                continue;
            };
            let slot = find(&self.counters, device, rule.benefit_type, rule.kind());
            let (used, reserved) = slot.map_or((0, 0), |s| (s.used_in(w.start), s.reserved));
            let bound = bound(self.leased, rule, slot, w);
            if used.saturating_add(reserved) < bound {
                continue;
            }
            let mut e = exhausted(rule, now_s, w.end);
            if used < bound {
                e.held = true;
                e.retry_after_s = Some(HELD_RETRY_AFTER_S);
            }
            worst = Some(match worst {
                None => e,
                Some(prev) => worse(prev, e),
            });
        }
        worst.map_or(Ok(()), Err)
    }

    /// Admission for a request: `check`, then hold `estimate` against every applicable rule
    /// until `settle`, `refund` or `sweep`. Idempotent: reserving an id that is already open for
    /// the same device returns the same reservation and holds nothing more.
    pub fn reserve(
        &mut self,
        request_id: &str,
        device: &DeviceId,
        estimate: &Consumption,
        rules: &RuleSet,
        now_s: u64,
    ) -> Result<Reservation, ReserveError> {
        let fp = fingerprint(request_id);
        if let Some(open) = self.open.get(&fp) {
            // A different id under the same 128-bit fingerprint (odds ~2⁻¹²⁸) is refused like
            // a reuse rather than mistaken for this one.
            if &open.device != device || &*open.request_id != request_id {
                return Err(ReserveError::RequestIdReused);
            }
            return Ok(Reservation {
                expires_at_s: open.expires_at,
            });
        }
        if self.finished.contains_key(&fp) {
            return Err(ReserveError::RequestIdReused);
        }
        self.check(rules, device, now_s)
            .map_err(ReserveError::Denied)?;
        let prices = self.policy.prices;
        let holds: Vec<Hold> = rules
            .applicable(device, now_s)
            .map(|rule| Hold {
                benefit: rule.benefit_type,
                kind: rule.kind(),
                spec: rule.spec(),
                held: estimate.amount(rule.benefit_type, &prices),
            })
            .collect();
        let expires_at = now_s.saturating_add(self.policy.reservation_ttl_s);
        let mut open = Open {
            request_id: request_id.into(),
            device: device.clone(),
            estimate: *estimate,
            observed: Consumption::default(),
            holds,
            expires_at,
        };
        apply_holds(&mut self.counters, &mut self.dirty, &mut open, |h| Change {
            release: 0,
            hold: h.held,
            charge: None,
            touch: Some(now_s),
        });
        self.open.insert(fp, open);
        Ok(Reservation {
            expires_at_s: expires_at,
        })
    }

    /// A long session reports what it consumed **so far** (cumulative, not a delta). The hold
    /// grows to `max(estimate, so_far)` per benefit, the expiry moves to `now_s + ttl`, and the
    /// session is told to stop once, for some rule applicable now, `used + others' holds +
    /// so_far ≥ limit` (its own estimate does not count against it).
    ///
    /// In leased mode the bound is this node's lease for the current window instead of the
    /// limit. On [`Progress::Exhausted`] the gateway may top up: [`wants`](Self::wants) →
    /// shared store → [`grant`](Self::grant), then call `progress` again with the same
    /// `so_far`. No extra argument is needed for that: the session's hold is already grown to
    /// at least `so_far` here, so `used + others' holds + so_far ≤ used + reserved`, the
    /// demand `wants` reports, and a grant of its `want` makes the next call `Continue` (unless
    /// a rule became applicable after the reservation: the session holds nothing against it, so
    /// `so_far` is not part of the demand `wants` sees for it).
    pub fn progress(
        &mut self,
        request_id: &str,
        so_far: &Consumption,
        rules: &RuleSet,
        now_s: u64,
    ) -> Progress {
        let Some(open) = open_mut(&mut self.open, request_id) else {
            return Progress::Unknown;
        };
        let prices = self.policy.prices;
        open.observed = open.observed.max(so_far);
        open.expires_at = now_s.saturating_add(self.policy.reservation_ttl_s);
        let basis = open.estimate.max(&open.observed);
        apply_holds(&mut self.counters, &mut self.dirty, open, |h| {
            let grow = basis.amount(h.benefit, &prices).saturating_sub(h.held);
            h.held = h.held.saturating_add(grow);
            Change {
                release: 0,
                hold: grow,
                charge: None,
                touch: Some(now_s),
            }
        });
        let mut worst: Option<Exhausted> = None;
        for rule in rules.applicable(&open.device, now_s) {
            let Some(w) = rule.window(now_s) else {
                continue;
            };
            let (b, k) = (rule.benefit_type, rule.kind());
            let own_hold = open
                .holds
                .iter()
                .find(|h| h.benefit == b && h.kind == k)
                .map_or(0, |h| h.held);
            let slot = find(&self.counters, &open.device, b, k);
            let (used, reserved) = slot.map_or((0, 0), |s| (s.used_in(w.start), s.reserved));
            let total = used
                .saturating_add(reserved.saturating_sub(own_hold))
                .saturating_add(open.observed.amount(b, &prices));
            if total >= bound(self.leased, rule, slot, w) {
                let e = exhausted(rule, now_s, w.end);
                worst = Some(match worst {
                    None => e,
                    Some(prev) => worse(prev, e),
                });
            }
        }
        match worst {
            Some(e) => Progress::Exhausted(e.to_denial()),
            None => Progress::Continue,
        }
    }

    /// Replace the reservation by the `actual` consumption, charged to each held rule's window
    /// at `now_s`. Idempotent per request id while it is remembered. An id with no reservation
    /// is [`SettleOutcome::Unknown`] and charges nothing: use [`QuotaLedger::charge`].
    pub fn settle(&mut self, request_id: &str, actual: &Consumption, now_s: u64) -> SettleOutcome {
        let fp = fingerprint(request_id);
        let Some(mut open) = take_open(&mut self.open, fp, request_id) else {
            return match self.finished.get(&fp) {
                Some(&how) => SettleOutcome::AlreadySettled(how),
                None => SettleOutcome::Unknown,
            };
        };
        self.settle_open(fp, &mut open, actual, now_s);
        SettleOutcome::Settled
    }

    /// Charges `actual` for an open reservation just taken out of `open`, releasing its holds.
    fn settle_open(&mut self, fp: Fingerprint, open: &mut Open, actual: &Consumption, now_s: u64) {
        let prices = self.policy.prices;
        apply_holds(&mut self.counters, &mut self.dirty, open, |h| Change {
            release: h.held,
            hold: 0,
            charge: Some((
                h.spec.window_clamped(now_s).start,
                actual.amount(h.benefit, &prices),
            )),
            touch: Some(now_s),
        });
        self.remember(fp, Finish::Settled, now_s);
    }

    /// Charge a request that was never reserved (short REST calls admitted with `check`) against
    /// the rules applicable at `now_s`. Idempotent per request id like `settle`; an id with an
    /// open reservation is settled instead (`device` and `rules` are then ignored).
    pub fn charge(
        &mut self,
        request_id: &str,
        device: &DeviceId,
        actual: &Consumption,
        rules: &RuleSet,
        now_s: u64,
    ) -> SettleOutcome {
        let fp = fingerprint(request_id);
        if let Some(mut open) = take_open(&mut self.open, fp, request_id) {
            self.settle_open(fp, &mut open, actual, now_s);
            return SettleOutcome::Settled;
        }
        if let Some(&how) = self.finished.get(&fp) {
            return SettleOutcome::AlreadySettled(how);
        }
        let prices = self.policy.prices;
        for rule in rules.applicable(device, now_s) {
            let Some(w) = rule.window(now_s) else {
                continue;
            };
            let change = Change {
                release: 0,
                hold: 0,
                charge: Some((w.start, actual.amount(rule.benefit_type, &prices))),
                touch: Some(now_s),
            };
            let slots = slots_mut(&mut self.counters, device);
            if apply(slots, rule.benefit_type, rule.kind(), change) {
                self.dirty.insert(device.clone());
            }
        }
        self.remember(fp, Finish::Charged, now_s);
        SettleOutcome::Settled
    }

    /// Drop a reservation without charging (upstream refused the request). Idempotent. Do not
    /// refund a request that consumed anything: settle it.
    pub fn refund(&mut self, request_id: &str, now_s: u64) -> RefundOutcome {
        let fp = fingerprint(request_id);
        let Some(mut open) = take_open(&mut self.open, fp, request_id) else {
            return match self.finished.get(&fp) {
                Some(&how) => RefundOutcome::AlreadySettled(how),
                None => RefundOutcome::Unknown,
            };
        };
        apply_holds(&mut self.counters, &mut self.dirty, &mut open, |h| Change {
            release: h.held,
            hold: 0,
            charge: None,
            touch: None,
        });
        self.remember(fp, Finish::Refunded, now_s);
        RefundOutcome::Refunded
    }

    /// Charge every reservation whose expiry is `≤ now_s` its held amount (estimate, or what
    /// `progress` reported if more) and forget finished ids past their memory bound. Call it
    /// periodically (e.g. every few seconds); cost is O(open reservations).
    pub fn sweep(&mut self, now_s: u64) -> Vec<Swept> {
        let expired: Vec<Fingerprint> = self
            .open
            .iter()
            .filter(|(_, o)| o.expires_at <= now_s)
            .map(|(&fp, _)| fp)
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for fp in expired {
            let Some(mut open) = self.open.remove(&fp) else {
                continue;
            };
            apply_holds(&mut self.counters, &mut self.dirty, &mut open, |h| Change {
                release: h.held,
                hold: 0,
                charge: Some((h.spec.window_clamped(now_s).start, h.held)),
                touch: None,
            });
            self.remember(fp, Finish::Swept, now_s);
            out.push(Swept {
                request_id: open.request_id.into(),
                device: open.device,
                charged: open.estimate.max(&open.observed),
            });
        }
        self.evict(now_s, 0);
        out
    }

    fn remember(&mut self, key: Fingerprint, how: Finish, now_s: u64) {
        self.evict(now_s, 1);
        if self.finished.capacity() == 0 {
            // Sized once for the bound, at twice the entries: at the bound every insert follows
            // a removal, and a hash table at ~87% load runs out of empty slots (removals leave
            // tombstones) and doubles, holding both tables during the move. Below half load it
            // rehashes in place instead, so memory steps up once, not at some later insert.
            // Untouched slots cost no RSS until ids fill them.
            let max = self.policy.remember_finished_max.max(1);
            self.finished.reserve(max.saturating_mul(2));
            self.finished_order.reserve(max);
        }
        self.finished.insert(key, how);
        self.finished_order.push_back((key, now_s));
    }

    /// Forget finished ids older than the memory window, and oldest ones until `room` more fit.
    fn evict(&mut self, now_s: u64, room: usize) {
        let max = self.policy.remember_finished_max.max(1);
        while let Some((id, at)) = self.finished_order.front() {
            let too_old = at.saturating_add(self.policy.remember_finished_s) <= now_s;
            let too_many = self.finished_order.len() + room > max;
            if !(too_old || too_many) {
                break;
            }
            self.finished.remove(id);
            self.finished_order.pop_front();
        }
    }

    /// Where `device` stands against every rule applicable at `now_s` (the usage API).
    pub fn usage(&self, rules: &RuleSet, device: &DeviceId, now_s: u64) -> Vec<UsageItem> {
        rules
            .applicable(device, now_s)
            .filter_map(|rule| {
                let w = rule.window(now_s)?;
                let (used, reserved) = find(&self.counters, device, rule.benefit_type, rule.kind())
                    .map_or((0, 0), |s| (s.used_in(w.start), s.reserved));
                let limit = rule.limit_base();
                Some(UsageItem {
                    benefit_id: rule.benefit_id.clone(),
                    entity_type: rule.entity_type,
                    benefit_type: rule.benefit_type,
                    kind: rule.kind(),
                    trigger_unit: rule.trigger_unit,
                    trigger_time: rule.trigger_time,
                    unit: rule.benefit_type.base_unit(),
                    rule_limit: rule.limit,
                    limit,
                    used,
                    reserved,
                    remaining: limit.saturating_sub(used.saturating_add(reserved)),
                    window_start: w.start,
                    window_end: w.end,
                    resets_at: match rule.kind() {
                        RuleKind::Periodic => Some(w.end),
                        RuleKind::Cumulative => None,
                    },
                })
            })
            .collect()
    }

    /// The raw counter for one key, if it exists.
    pub fn counter(
        &self,
        device: &DeviceId,
        benefit_type: BenefitType,
        kind: RuleKind,
    ) -> Option<CounterView> {
        find(&self.counters, device, benefit_type, kind).map(|s| CounterView {
            window_start: s.window_start,
            used: s.used,
            reserved: s.reserved,
        })
    }

    /// Forgets a deleted device: its counters (dirty or not) and its open reservations, whose
    /// later settlement then finds nothing to charge. Returns how many reservations went.
    /// Without this, a fleet that replaces devices would keep every deleted device's counters.
    pub fn forget_device(&mut self, device: &DeviceId) -> usize {
        self.counters.remove(device);
        self.dirty.remove(device);
        let before = self.open.len();
        self.open.retain(|_, o| o.device != *device);
        before - self.open.len()
    }

    /// Number of open reservations.
    pub fn open_reservations(&self) -> usize {
        self.open.len()
    }

    /// Number of remembered finished request ids.
    pub fn remembered_ids(&self) -> usize {
        self.finished.len()
    }

    /// Every counter, for a full snapshot.
    pub fn export(&self) -> Vec<CounterRecord> {
        self.counters
            .iter()
            .flat_map(|(d, slots)| slots.iter().map(move |s| record(d, s)))
            .collect()
    }

    /// Counters changed since the last drain (charges and window resets, and leases given back
    /// by [`release_idle`](Self::release_idle); reservations and [grants](Self::grant) alone
    /// do not persist). If writing them fails, keep them and retry: records are absolute
    /// values (`used` and `granted`), so writing a record twice or late-but-in-order is
    /// harmless.
    pub fn drain_dirty(&mut self) -> Vec<CounterRecord> {
        let mut out = Vec::new();
        for d in self.dirty.drain() {
            if let Some(slots) = self.counters.get_mut(&d) {
                for s in slots.iter_mut().filter(|s| s.dirty) {
                    s.dirty = false;
                    out.push(record(&d, s));
                }
            }
        }
        out
    }

    /// Marks counters dirty again after their write failed, so the next [`drain_dirty`]
    /// returns them with their *current* values (which include anything charged since the
    /// failed drain: nothing is overwritten with the older snapshot).
    ///
    /// [`drain_dirty`]: Self::drain_dirty
    pub fn requeue(&mut self, records: &[CounterRecord]) {
        for r in records {
            if let Some(slots) = self.counters.get_mut(&r.device) {
                for s in slots
                    .iter_mut()
                    .filter(|s| s.benefit == r.benefit_type && s.kind == r.kind)
                {
                    s.dirty = true;
                    if !self.dirty.contains(&r.device) {
                        self.dirty.insert(r.device.clone());
                    }
                }
            }
        }
    }

    /// Load persisted counters (at start, before admitting). Each record overwrites the
    /// counter's `window_start`, `used` and `granted`; reservations are untouched. Imported
    /// counters are not dirty, and their last activity is not changed (0 for new counters, so
    /// an imported unused lease is given back by the first [`release_idle`](Self::release_idle)
    /// unless the device is active first).
    pub fn import(&mut self, records: impl IntoIterator<Item = CounterRecord>) {
        for r in records {
            let slot = slot_mut(
                slots_mut(&mut self.counters, &r.device),
                r.benefit_type,
                r.kind,
            );
            slot.window_start = r.window_start;
            slot.used = r.used;
            slot.granted = r.granted;
            slot.acked = r.acked;
        }
    }

    /// Leased mode: what to ask the shared store for before admitting `device` at `now_s`.
    /// For each rule applicable at `now_s` (skipping rules with no window then), with `demand =
    /// used + reserved` and `lease` = what this node was granted for the rule's current window
    /// (0 if none): when `demand ≥ lease` (admission would be denied), one [`LeaseWant`] asking
    /// for `demand − lease + lease_size` (`lease_size` at least 1), i.e. enough to cover what
    /// is held now plus `lease_size` of headroom. Empty when every lease still has room.
    ///
    /// Typical use: after a denial ([`check`](Self::check), [`reserve`](Self::reserve)) or
    /// [`Progress::Exhausted`], ask the store for each want, [`grant`](Self::grant) what it
    /// gives, and retry; deny the device only if it is still exhausted. `reserved` already
    /// contains every open session's hold grown to its reported `so_far`, so a session stopped
    /// by [`progress`](Self::progress) needs no extra argument here (see there). Pure: works
    /// in either mode, changes nothing.
    pub fn wants(
        &self,
        rules: &RuleSet,
        device: &DeviceId,
        now_s: u64,
        lease_size: u64,
    ) -> Vec<LeaseWant> {
        let mut out = Vec::new();
        for rule in rules.applicable(device, now_s) {
            let Some(w) = rule.window(now_s) else {
                continue;
            };
            let slot = find(&self.counters, device, rule.benefit_type, rule.kind());
            let (used, reserved, lease, acked) = slot.map_or((0, 0, 0, 0), |s| {
                let same = s.window_start == w.start;
                (
                    s.used_in(w.start),
                    s.reserved,
                    s.granted_in(w.start),
                    if same { s.acked } else { 0 },
                )
            });
            let demand = used.saturating_add(reserved);
            if demand < lease {
                continue;
            }
            out.push(LeaseWant {
                benefit_type: rule.benefit_type,
                kind: rule.kind(),
                window_start: w.start,
                window_end: w.end,
                limit: rule.limit_base(),
                used,
                granted: lease,
                acked,
                want: (demand - lease).saturating_add(lease_size.max(1)),
            });
        }
        out
    }

    /// Leased mode: the shared store granted this node `units` more of the counter `(device,
    /// benefit, kind)` for the window starting at `window_start` (from a [`LeaseWant`]). They
    /// add to the node's lease for that window. If the counter is still in an older window it
    /// first moves to `window_start` (`used` and `granted` start from 0 there; holds are kept);
    /// a grant for a window older than the counter's is stale and ignored. Records activity at
    /// `now_s` (see [`release_idle`](Self::release_idle)). Does not mark the counter dirty: the
    /// store already knows its own grant.
    pub fn grant(
        &mut self,
        device: &DeviceId,
        benefit: BenefitType,
        kind: RuleKind,
        window_start: u64,
        units: u64,
        now_s: u64,
    ) {
        self.add_lease(device, (benefit, kind), window_start, units, true, now_s);
    }

    /// Leased mode, shared store unreachable: lets this node spend `units` more of the counter
    /// for `window_start` on its own authority (a bounded *degraded allowance*). Like
    /// [`grant`](Self::grant), except that `acked` is unchanged (the store never granted it)
    /// and the counter is marked dirty, so the next report tells the store about it.
    pub fn allow(
        &mut self,
        device: &DeviceId,
        benefit: BenefitType,
        kind: RuleKind,
        window_start: u64,
        units: u64,
        now_s: u64,
    ) {
        self.add_lease(device, (benefit, kind), window_start, units, false, now_s);
    }

    fn add_lease(
        &mut self,
        device: &DeviceId,
        (benefit, kind): (BenefitType, RuleKind),
        window_start: u64,
        units: u64,
        from_store: bool,
        now_s: u64,
    ) {
        let slot = slot_mut(slots_mut(&mut self.counters, device), benefit, kind);
        if slot.window_start > window_start {
            return;
        }
        slot.move_to(window_start);
        slot.granted = slot.granted.saturating_add(units);
        slot.touch(now_s);
        if from_store {
            slot.acked = slot.acked.saturating_add(units);
        } else {
            slot.dirty = true;
            if !self.dirty.contains(device) {
                self.dirty.insert(device.clone());
            }
        }
    }

    /// Leased mode: every counter holding more lease than it used (`granted > used`), for the
    /// gateway's periodic heartbeat to the shared store (a lease the store hears nothing about
    /// for its `lease_ttl` is presumed dead). O(counters).
    pub fn outstanding(&self) -> Vec<CounterRecord> {
        self.counters
            .iter()
            .flat_map(|(d, slots)| {
                slots
                    .iter()
                    .filter(|s| s.granted > s.used)
                    .map(move |s| record(d, s))
            })
            .collect()
    }

    /// Leased mode: give back the unused part of idle leases. Every counter with no open hold
    /// (`reserved == 0`), more granted than used, and no activity (reserve, progress, settle,
    /// charge, grant) for `idle_s` seconds (`now_s ≥ last activity + idle_s`) gets `granted =
    /// used` and is marked dirty, so the next [`drain_dirty`](Self::drain_dirty) reports the
    /// smaller lease for the gateway to return to the shared store. Returns how many counters
    /// were released. Call it periodically (e.g. with `sweep`); cost is O(counters).
    pub fn release_idle(&mut self, now_s: u64, idle_s: u64) -> usize {
        let mut released = 0;
        for (d, slots) in &mut self.counters {
            let mut any = false;
            for s in slots.iter_mut() {
                if s.reserved == 0
                    && s.granted > s.used
                    && now_s >= s.last_active_s.saturating_add(idle_s)
                {
                    s.granted = s.used;
                    s.dirty = true;
                    any = true;
                    released += 1;
                }
            }
            if any && !self.dirty.contains(d) {
                self.dirty.insert(d.clone());
            }
        }
        released
    }
}

fn record(d: &DeviceId, s: &Slot) -> CounterRecord {
    CounterRecord {
        device: d.clone(),
        benefit_type: s.benefit,
        kind: s.kind,
        window_start: s.window_start,
        used: s.used,
        granted: s.granted,
        acked: s.acked,
    }
}

fn exhausted(rule: &Rule, now_s: u64, window_end: u64) -> Exhausted {
    Exhausted {
        benefit_id: rule.benefit_id.clone(),
        benefit_type: rule.benefit_type,
        kind: rule.kind(),
        retry_after_s: match rule.kind() {
            RuleKind::Periodic => Some(window_end.saturating_sub(now_s).max(1)),
            RuleKind::Cumulative => None,
        },
        held: false,
    }
}

/// The denial that tells the device the most: a rule really used up beats one only full of
/// holds; cumulative (no retry) beats periodic; among periodic, the later reset.
fn worse(a: Exhausted, b: Exhausted) -> Exhausted {
    match (a.held, b.held) {
        (true, false) => return b,
        (false, true) => return a,
        _ => {}
    }
    match (a.retry_after_s, b.retry_after_s) {
        (None, _) => a,
        (_, None) => b,
        (Some(x), Some(y)) => {
            if y > x {
                b
            } else {
                a
            }
        }
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    /// The settled-id memory never reallocates after its first use, however long it churns at
    /// its bound (the soak saw a 131,072 → 262,144 slot doubling minutes into steady load).
    #[test]
    fn finished_ids_never_reallocate_at_the_bound() {
        let mut l = QuotaLedger::new(LedgerPolicy {
            remember_finished_max: 1_000,
            ..LedgerPolicy::default()
        });
        l.remember(fingerprint("first"), Finish::Refunded, 0);
        let (map, queue) = (l.finished.capacity(), l.finished_order.capacity());
        assert!(map >= 2_000, "map reserved for the bound: {map}");
        for i in 0..50_000u32 {
            l.remember(fingerprint(&format!("req-{i}")), Finish::Refunded, 0);
            assert!(l.finished.len() <= 1_000);
            // `capacity()` is entries + free slots: tombstones lower it for a while, and an
            // in-place rehash restores it; only a reallocation would raise it.
            assert!(
                l.finished.capacity() <= map,
                "map reallocated at insert {i}"
            );
        }
        assert_eq!(l.finished_order.capacity(), queue, "queue reallocated");
        assert_eq!(l.remembered_ids(), 1_000);
    }
}
