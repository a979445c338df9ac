//! Quota rules in Coze's shape (`coze-api.md` §10), their windows, and the [`RuleSet`] snapshot.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU64;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::amount::PriceTable;
use crate::ids::{DeviceId, DeviceIdError};

/// `ended_at` meaning "forever" on Coze (9999-12-31T23:59:59Z).
pub const FOREVER: u64 = 253_402_300_799;

/// Who a rule is about (`entity_type`).
///
/// Only [`EntityType::SingleDevice`] and [`EntityType::EnterpriseAllDevices`] ever apply to a
/// device. The other Coze entity types (custom consumers and the 2026 member/role/workspace/org
/// types) are accepted and stored, so the admin API can round-trip them and sync keeps them, but
/// the gateway never enforces them. `single_identifier` / `enterprise_all_identifiers` (the Java
/// SDK's spelling) are accepted as aliases of the custom-consumer types and written back in the
/// documented spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntityType {
    SingleDevice,
    EnterpriseAllDevices,
    #[serde(alias = "single_identifier")]
    SingleCustomConsumer,
    #[serde(alias = "enterprise_all_identifiers")]
    EnterpriseAllCustomConsumers,
    CozeUserId,
    CozeRole,
    CozeWorkspace,
    CozeOrganization,
}

impl EntityType {
    /// Scopes that name one entity and therefore need an `entity_id`.
    pub fn needs_entity_id(self) -> bool {
        !self.is_enterprise_wide()
    }

    /// `enterprise_all_*` scopes (per-entity default limits).
    pub fn is_enterprise_wide(self) -> bool {
        matches!(
            self,
            EntityType::EnterpriseAllDevices | EntityType::EnterpriseAllCustomConsumers
        )
    }
}

/// What a rule limits (`benefit_type`): Coze's three types plus the gateway's own meters.
///
/// The *base unit* is what the ledger counts; a rule's `limit` is in the *limit unit* and is
/// multiplied by [`BenefitType::scale`] internally, so charges are exact integers:
///
/// | benefit_type | limit unit | base unit | scale |
/// |---|---|---|---|
/// | `resource_point` | point | micro-point | 1 000 000 |
/// | `voice_unified_duration_system` / `_custom` | second | millisecond | 1 000 |
/// | `requests` | request | request | 1 |
/// | `llm_tokens` | token (input + output) | token | 1 |
/// | `audio_in_ms` / `audio_out_ms` / `voice_session_ms` | millisecond | millisecond | 1 |
/// | `tts_chars` | character | character | 1 |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenefitType {
    ResourcePoint,
    VoiceUnifiedDurationSystem,
    VoiceUnifiedDurationCustom,
    Requests,
    LlmTokens,
    AudioInMs,
    AudioOutMs,
    TtsChars,
    VoiceSessionMs,
}

/// The unit the ledger counts a benefit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseUnit {
    MicroPoints,
    Milliseconds,
    Requests,
    Tokens,
    Chars,
}

impl BenefitType {
    pub const ALL: [BenefitType; 9] = [
        BenefitType::ResourcePoint,
        BenefitType::VoiceUnifiedDurationSystem,
        BenefitType::VoiceUnifiedDurationCustom,
        BenefitType::Requests,
        BenefitType::LlmTokens,
        BenefitType::AudioInMs,
        BenefitType::AudioOutMs,
        BenefitType::TtsChars,
        BenefitType::VoiceSessionMs,
    ];

    /// The serde / wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            BenefitType::ResourcePoint => "resource_point",
            BenefitType::VoiceUnifiedDurationSystem => "voice_unified_duration_system",
            BenefitType::VoiceUnifiedDurationCustom => "voice_unified_duration_custom",
            BenefitType::Requests => "requests",
            BenefitType::LlmTokens => "llm_tokens",
            BenefitType::AudioInMs => "audio_in_ms",
            BenefitType::AudioOutMs => "audio_out_ms",
            BenefitType::TtsChars => "tts_chars",
            BenefitType::VoiceSessionMs => "voice_session_ms",
        }
    }

    /// Whether Coze's own quota API knows this type (the rest are the gateway's meters, which
    /// exist only in the gateway: rule sync never brings them, and writes of them stay local).
    pub fn is_coze(self) -> bool {
        matches!(
            self,
            BenefitType::ResourcePoint
                | BenefitType::VoiceUnifiedDurationSystem
                | BenefitType::VoiceUnifiedDurationCustom
        )
    }

    /// Base units per limit unit (see the type docs).
    pub fn scale(self) -> u64 {
        match self {
            BenefitType::ResourcePoint => 1_000_000,
            BenefitType::VoiceUnifiedDurationSystem | BenefitType::VoiceUnifiedDurationCustom => {
                1_000
            }
            _ => 1,
        }
    }

    pub fn base_unit(self) -> BaseUnit {
        match self {
            BenefitType::ResourcePoint => BaseUnit::MicroPoints,
            BenefitType::VoiceUnifiedDurationSystem
            | BenefitType::VoiceUnifiedDurationCustom
            | BenefitType::AudioInMs
            | BenefitType::AudioOutMs
            | BenefitType::VoiceSessionMs => BaseUnit::Milliseconds,
            BenefitType::Requests => BaseUnit::Requests,
            BenefitType::LlmTokens => BaseUnit::Tokens,
            BenefitType::TtsChars => BaseUnit::Chars,
        }
    }

    /// The device-facing denial message naming this benefit.
    pub fn exhausted_message(self) -> &'static str {
        match self {
            BenefitType::ResourcePoint => "quota exhausted: resource_point",
            BenefitType::VoiceUnifiedDurationSystem => {
                "quota exhausted: voice_unified_duration_system"
            }
            BenefitType::VoiceUnifiedDurationCustom => {
                "quota exhausted: voice_unified_duration_custom"
            }
            BenefitType::Requests => "quota exhausted: requests",
            BenefitType::LlmTokens => "quota exhausted: llm_tokens",
            BenefitType::AudioInMs => "quota exhausted: audio_in_ms",
            BenefitType::AudioOutMs => "quota exhausted: audio_out_ms",
            BenefitType::TtsChars => "quota exhausted: tts_chars",
            BenefitType::VoiceSessionMs => "quota exhausted: voice_session_ms",
        }
    }

    pub(crate) fn index(self) -> u32 {
        match self {
            BenefitType::ResourcePoint => 0,
            BenefitType::VoiceUnifiedDurationSystem => 1,
            BenefitType::VoiceUnifiedDurationCustom => 2,
            BenefitType::Requests => 3,
            BenefitType::LlmTokens => 4,
            BenefitType::AudioInMs => 5,
            BenefitType::AudioOutMs => 6,
            BenefitType::TtsChars => 7,
            BenefitType::VoiceSessionMs => 8,
        }
    }
}

impl fmt::Display for BenefitType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `active_mode`: Coze documents only `absolute_time`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveMode {
    #[default]
    AbsoluteTime,
}

/// `status`. Only `valid` rules are enforced; `frozen` and `cancel` are stored and ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleStatus {
    #[default]
    Valid,
    Frozen,
    Cancel,
}

/// `trigger_unit`: `never` is a cumulative cap, the others reset every `trigger_time` units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerUnit {
    #[default]
    Never,
    Minute,
    Hour,
    Day,
}

impl TriggerUnit {
    /// Seconds per unit; `None` for `never`.
    pub fn seconds(self) -> Option<u64> {
        match self {
            TriggerUnit::Never => None,
            TriggerUnit::Minute => Some(60),
            TriggerUnit::Hour => Some(3_600),
            TriggerUnit::Day => Some(86_400),
        }
    }
}

/// Cumulative (one window for the rule's life) or periodic (resetting windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Cumulative,
    Periodic,
}

impl RuleKind {
    pub(crate) fn index(self) -> u32 {
        match self {
            RuleKind::Cumulative => 0,
            RuleKind::Periodic => 1,
        }
    }
}

/// A quota rule, flat as in Coze's list response (`data.benefit_infos[]`, coze-api.md §10.2).
///
/// Deserialization is lenient where Coze is: `status` defaults to `valid`, `trigger_unit` to
/// `never`, `trigger_time` to 1, `active_mode` to `absolute_time`, `entity_id` to empty;
/// `benefit_id` is accepted as a string or an integer and always written as a string. Call
/// [`Rule::validate`] (or build a [`RuleSet`], which does) before trusting one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default, deserialize_with = "string_or_integer")]
    pub benefit_id: String,
    pub entity_type: EntityType,
    /// Device id for `single_device`; empty (and ignored) for `enterprise_all_*`, where it is
    /// omitted from the JSON as on Coze.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub entity_id: String,
    pub benefit_type: BenefitType,
    /// In the benefit's limit unit (points, seconds, tokens, ...; see [`BenefitType`]).
    pub limit: u64,
    #[serde(default)]
    pub active_mode: ActiveMode,
    /// Unix seconds, inclusive.
    pub started_at: u64,
    /// Unix seconds, exclusive; [`FOREVER`] = no end.
    pub ended_at: u64,
    #[serde(default)]
    pub status: RuleStatus,
    #[serde(default)]
    pub trigger_unit: TriggerUnit,
    /// Period multiplier, ≥ 1 for periodic rules; meaningless (any value) for `never`.
    #[serde(default = "one")]
    pub trigger_time: u32,
}

fn one() -> u32 {
    1
}

fn string_or_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        U(u64),
        I(i64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::U(u) => u.to_string(),
        Id::I(i) => i.to_string(),
    })
}

/// A half-open window `[start, end)` in unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    pub start: u64,
    pub end: u64,
}

/// The time geometry of a rule, copied into reservations so they can be settled without the
/// rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WindowSpec {
    started_at: u64,
    ended_at: u64,
    period_s: Option<NonZeroU64>,
}

impl WindowSpec {
    /// The window containing `t`, for `started_at ≤ t < ended_at`. Periodic windows are
    /// clamped to `ended_at`.
    fn window_at(self, t: u64) -> Window {
        match self.period_s {
            None => Window {
                start: self.started_at,
                end: self.ended_at,
            },
            Some(p) => {
                let p = p.get();
                let k = (t.saturating_sub(self.started_at)) / p;
                let start = self.started_at.saturating_add(k.saturating_mul(p));
                Window {
                    start,
                    end: start.saturating_add(p).min(self.ended_at),
                }
            }
        }
    }

    pub(crate) fn window(self, now_s: u64) -> Option<Window> {
        (self.started_at <= now_s && now_s < self.ended_at).then(|| self.window_at(now_s))
    }

    /// Like [`WindowSpec::window`] but `now_s` is clamped into the rule's life: a settlement
    /// after `ended_at` lands in the last window, one before `started_at` in the first.
    pub(crate) fn window_clamped(self, now_s: u64) -> Window {
        let last = self.ended_at.saturating_sub(1).max(self.started_at);
        self.window_at(now_s.clamp(self.started_at, last))
    }
}

impl Rule {
    pub fn kind(&self) -> RuleKind {
        match self.trigger_unit {
            TriggerUnit::Never => RuleKind::Cumulative,
            _ => RuleKind::Periodic,
        }
    }

    /// Period length in seconds (`trigger_time × unit`); `None` for cumulative rules.
    pub fn period_s(&self) -> Option<u64> {
        self.trigger_unit
            .seconds()
            .map(|u| u.saturating_mul(u64::from(self.trigger_time.max(1))))
    }

    pub(crate) fn spec(&self) -> WindowSpec {
        WindowSpec {
            started_at: self.started_at,
            ended_at: self.ended_at,
            period_s: self.period_s().and_then(NonZeroU64::new),
        }
    }

    /// The window containing `now_s`, or `None` when `now_s` is outside
    /// `[started_at, ended_at)`. Cumulative: the rule's whole life. Periodic: `trigger_time ×
    /// unit` seconds aligned to `started_at` (no time zones: a rule starting at a UTC midnight
    /// resets at UTC midnight), the last one cut short at `ended_at`.
    pub fn window(&self, now_s: u64) -> Option<Window> {
        self.spec().window(now_s)
    }

    /// When the current window resets: its end for periodic rules, `None` for cumulative.
    pub fn resets_at(&self, now_s: u64) -> Option<u64> {
        match self.kind() {
            RuleKind::Cumulative => None,
            RuleKind::Periodic => self.window(now_s).map(|w| w.end),
        }
    }

    /// Enforced at `now_s`: `valid` and `started_at ≤ now_s < ended_at`.
    pub fn is_active(&self, now_s: u64) -> bool {
        self.status == RuleStatus::Valid && self.started_at <= now_s && now_s < self.ended_at
    }

    /// The limit in base units (`limit × scale`, saturating; validation keeps it exact).
    pub fn limit_base(&self) -> u64 {
        self.limit.saturating_mul(self.benefit_type.scale())
    }

    /// The device this rule names, for valid `single_device` rules.
    pub fn device(&self) -> Option<DeviceId> {
        match self.entity_type {
            EntityType::SingleDevice => DeviceId::parse(&self.entity_id).ok(),
            _ => None,
        }
    }

    /// Check one rule on its own. Every problem is reported, with field names as in the flat
    /// rule (`limit`, `trigger_time`, ...).
    pub fn validate(&self) -> Result<(), RuleErrors> {
        let mut errs = Vec::new();
        self.validate_into(None, &mut errs);
        RuleErrors::result(errs)
    }

    /// With `index`, field names are `rules[index].name`.
    fn validate_into(&self, index: Option<usize>, errs: &mut Vec<RuleError>) {
        let field = |name: &str| field_path(index, name);
        if self.benefit_id.is_empty() {
            errs.push(RuleError::new(field("benefit_id"), RuleErrorKind::Missing));
        } else if self.benefit_id.len() > 128 {
            errs.push(RuleError::new(
                field("benefit_id"),
                RuleErrorKind::TooLong { max: 128 },
            ));
        }
        match self.entity_type {
            EntityType::SingleDevice => {
                if let Err(e) = DeviceId::validate(&self.entity_id) {
                    errs.push(RuleError::new(
                        field("entity_id"),
                        RuleErrorKind::InvalidDeviceId(e),
                    ));
                }
            }
            t if t.needs_entity_id() && self.entity_id.is_empty() => {
                errs.push(RuleError::new(field("entity_id"), RuleErrorKind::Missing));
            }
            _ => {}
        }
        let max_limit = u64::MAX / self.benefit_type.scale();
        if self.limit > max_limit {
            errs.push(RuleError::new(
                field("limit"),
                RuleErrorKind::LimitTooLarge { max: max_limit },
            ));
        }
        if self.ended_at > FOREVER {
            errs.push(RuleError::new(
                field("ended_at"),
                RuleErrorKind::EndAfterForever,
            ));
        }
        if self.ended_at <= self.started_at {
            errs.push(RuleError::new(
                field("ended_at"),
                RuleErrorKind::EndNotAfterStart {
                    started_at: self.started_at,
                    ended_at: self.ended_at,
                },
            ));
        }
        if self.kind() == RuleKind::Periodic && self.trigger_time == 0 {
            errs.push(RuleError::new(
                field("trigger_time"),
                RuleErrorKind::TriggerTimeZero,
            ));
        }
    }

    /// Apply a Coze update (`PUT /v1/commerce/benefit/limitations/{benefit_id}`): every field
    /// present replaces the rule's; entity and benefit type are immutable. The result is
    /// validated; field names in errors are the request's.
    pub fn updated(&self, update: &UpdateLimitation) -> Result<Rule, RuleErrors> {
        let mut r = self.clone();
        if let Some(v) = update.active_mode {
            r.active_mode = v;
        }
        if let Some(v) = update.started_at {
            r.started_at = v;
        }
        if let Some(v) = update.ended_at {
            r.ended_at = v;
        }
        if let Some(v) = update.limit {
            r.limit = v;
        }
        if let Some(v) = update.status {
            r.status = v;
        }
        if let Some(v) = update.trigger_unit {
            r.trigger_unit = v;
        }
        if let Some(v) = update.trigger_time {
            r.trigger_time = v;
        }
        r.validate()?;
        Ok(r)
    }
}

/// Coze's create request body (`POST /v1/commerce/benefit/limitations`, §10.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateLimitation {
    pub entity_type: EntityType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_id: Option<String>,
    pub benefit_info: BenefitInfo,
}

/// `benefit_info` of a create request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenefitInfo {
    pub benefit_type: BenefitType,
    #[serde(default)]
    pub active_mode: ActiveMode,
    pub started_at: u64,
    pub ended_at: u64,
    pub limit: u64,
    #[serde(default)]
    pub status: RuleStatus,
    #[serde(default)]
    pub trigger_unit: TriggerUnit,
    #[serde(default = "one")]
    pub trigger_time: u32,
}

impl CreateLimitation {
    /// Build the rule under a gateway-assigned `benefit_id`. Errors name request fields
    /// (`entity_id`, `benefit_info.limit`, ...). Rule-set conflicts are checked by
    /// [`RuleSet::admits`].
    pub fn into_rule(self, benefit_id: String) -> Result<Rule, RuleErrors> {
        let b = self.benefit_info;
        let rule = Rule {
            benefit_id,
            entity_type: self.entity_type,
            entity_id: if self.entity_type.is_enterprise_wide() {
                String::new()
            } else {
                self.entity_id.unwrap_or_default()
            },
            benefit_type: b.benefit_type,
            limit: b.limit,
            active_mode: b.active_mode,
            started_at: b.started_at,
            ended_at: b.ended_at,
            status: b.status,
            trigger_unit: b.trigger_unit,
            trigger_time: b.trigger_time,
        };
        let mut errs = Vec::new();
        rule.validate_into(None, &mut errs);
        for e in &mut errs {
            if !matches!(e.field.as_str(), "entity_id" | "entity_type" | "benefit_id") {
                e.field = format!("benefit_info.{}", e.field);
            }
        }
        RuleErrors::result(errs)?;
        Ok(rule)
    }
}

/// Coze's update request body (`PUT .../limitations/{benefit_id}`, §10.3): all optional.
/// Unknown fields (including `entity_type`, `benefit_type`) are rejected: they are immutable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateLimitation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_mode: Option<ActiveMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RuleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_unit: Option<TriggerUnit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_time: Option<u32>,
}

/// What is wrong with a rule field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleErrorKind {
    #[error("is required")]
    Missing,
    #[error("must be at most {max} characters")]
    TooLong { max: usize },
    #[error("is not a valid device id: {0}")]
    InvalidDeviceId(DeviceIdError),
    #[error("must be at most {max}")]
    LimitTooLarge { max: u64 },
    #[error("must be at most {FOREVER} (9999-12-31T23:59:59Z)")]
    EndAfterForever,
    #[error("must be greater than started_at ({started_at}), got {ended_at}")]
    EndNotAfterStart { started_at: u64, ended_at: u64 },
    #[error("must be >= 1 when trigger_unit is not never")]
    TriggerTimeZero,
    #[error(
        "overlaps benefit_id {existing}: a device may have only one non-cancelled {kind} rule per benefit type at a time"
    )]
    DeviceRuleOverlap {
        kind: &'static str,
        existing: String,
    },
    #[error("duplicate benefit_id {0}")]
    DuplicateBenefitId(String),
    #[error(
        "at most one {kind} rule per enterprise-wide scope and benefit type: {benefit_type} already has benefit_id {existing}"
    )]
    EnterpriseRuleConflict {
        benefit_type: BenefitType,
        kind: &'static str,
        existing: String,
    },
}

/// One invalid field, named by its path (`benefit_info.limit`, `rules[3].ended_at`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid parameter {field}: {kind}")]
pub struct RuleError {
    pub field: String,
    pub kind: RuleErrorKind,
}

impl RuleError {
    fn new(field: String, kind: RuleErrorKind) -> RuleError {
        RuleError { field, kind }
    }
}

/// Every problem found at once (house style: report all validation errors together).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RuleErrors(pub Vec<RuleError>);

impl RuleErrors {
    fn result(errs: Vec<RuleError>) -> Result<(), RuleErrors> {
        if errs.is_empty() {
            Ok(())
        } else {
            Err(RuleErrors(errs))
        }
    }
}

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            fmt::Display::fmt(e, f)?;
        }
        Ok(())
    }
}

/// Number of shards of each [`RuleSet`] index (a power of two). A change copies one shard of
/// each index it touches: with a million rules ~4 000 pointers each, about 0.2 ms (bench
/// `rules/with_1M_rules_*`). More shards make changes cheaper but lookups slower, as the
/// shard headers a lookup reads stop fitting in the cache (1024 shards: ~9% slower lookups
/// with a million rules, ~75 µs per change).
const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;

/// The shard of `key` (a device or benefit id): an Fx-style rotate-xor-multiply over 8-byte
/// words, top bits. A few ns for a device id and well spread for sequential ids. Not keyed:
/// ids come from the admin API or the upstream, and ids crafted to land in one shard only make
/// changes slower, never lookups (each shard is a `HashSet` with std's keyed SipHash).
fn shard_of(key: &str) -> usize {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mix = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let word = |w: &[u8]| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        u64::from_le_bytes(b)
    };
    let bytes = key.as_bytes();
    let n = bytes.len();
    let mut h = n as u64;
    if n < 8 {
        let w = bytes
            .iter()
            .rev()
            .fold(0u64, |w, &b| (w << 8) | u64::from(b));
        h = mix(h, w);
    } else {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            h = mix(h, word(w));
        }
        // The last (partial) word: the last 8 bytes, overlapping the previous word.
        if !words.remainder().is_empty() {
            h = mix(h, word(&bytes[n - 8..]));
        }
    }
    (h >> (64 - SHARD_BITS)) as usize
}

/// A set split into [`SHARDS`] shards behind `Arc`s. Cloning it copies one pointer; changing
/// a clone copies the array of shard pointers and the shards it touches (`Arc::make_mut`),
/// which stay shared with the other snapshots until then.
#[derive(Clone, Debug)]
struct Shards<T>(Arc<[Arc<HashSet<T>>; SHARDS]>);

impl<T: Clone + Eq + Hash + Borrow<str>> Shards<T> {
    /// Every shard is the same empty set until it is first changed.
    fn new() -> Shards<T> {
        let empty = Arc::new(HashSet::new());
        Shards(Arc::new(std::array::from_fn(|_| Arc::clone(&empty))))
    }

    /// Sized for about `n` entries (a bulk build).
    fn with_capacity(n: usize) -> Shards<T> {
        if n < SHARDS {
            return Shards::new();
        }
        // Headroom for uneven shards, so the build rarely rehashes.
        let per = n / SHARDS + n / SHARDS / 4 + 1;
        // Tables first, then the shard headers in one run, so the headers a lookup reads
        // sit together in a few pages instead of one page (and TLB entry) each.
        let mut tables: [HashSet<T>; SHARDS] = std::array::from_fn(|_| HashSet::with_capacity(per));
        Shards(Arc::new(std::array::from_fn(|i| {
            Arc::new(std::mem::take(&mut tables[i]))
        })))
    }

    fn get(&self, key: &str) -> Option<&T> {
        self.0[shard_of(key)].get(key)
    }

    /// The shard `key` belongs in, copied first if another snapshot shares it.
    fn shard_mut(&mut self, key: &str) -> &mut HashSet<T> {
        Arc::make_mut(&mut Arc::make_mut(&mut self.0)[shard_of(key)])
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|s| s.iter())
    }

    fn into_items(self) -> impl Iterator<Item = T> {
        Arc::unwrap_or_clone(self.0)
            .into_iter()
            .flat_map(Arc::unwrap_or_clone)
    }
}

/// A rule in a set keyed by its `benefit_id`.
#[derive(Clone, Debug)]
struct ById(Arc<Rule>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.benefit_id
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &ById) -> bool {
        self.0.benefit_id == other.0.benefit_id
    }
}

impl Eq for ById {}

impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.benefit_id.as_str().hash(state);
    }
}

/// The `single_device` rules of one device, in a set keyed by the device id, in the order
/// they were added. Never empty; most devices have one rule: no extra allocation.
#[derive(Clone, Debug)]
enum DeviceRules {
    One(Arc<Rule>),
    Many(Vec<Arc<Rule>>),
}

impl DeviceRules {
    fn as_slice(&self) -> &[Arc<Rule>] {
        match self {
            DeviceRules::One(r) => std::slice::from_ref(r),
            DeviceRules::Many(v) => v,
        }
    }

    fn device(&self) -> &str {
        self.as_slice().first().map_or("", |r| r.entity_id.as_str())
    }

    fn push(self, rule: Arc<Rule>) -> DeviceRules {
        match self {
            DeviceRules::One(a) => DeviceRules::Many(vec![a, rule]),
            DeviceRules::Many(mut v) => {
                v.push(rule);
                DeviceRules::Many(v)
            }
        }
    }

    /// Without the rule `benefit_id`; `None` when no rule is left.
    fn without(self, benefit_id: &str) -> Option<DeviceRules> {
        let mut v = match self {
            DeviceRules::One(r) if r.benefit_id == benefit_id => return None,
            DeviceRules::One(r) => return Some(DeviceRules::One(r)),
            DeviceRules::Many(v) => v,
        };
        v.retain(|r| r.benefit_id != benefit_id);
        match v.len() {
            0 => None,
            1 => v.pop().map(DeviceRules::One),
            _ => Some(DeviceRules::Many(v)),
        }
    }
}

impl Borrow<str> for DeviceRules {
    fn borrow(&self) -> &str {
        self.device()
    }
}

impl PartialEq for DeviceRules {
    fn eq(&self, other: &DeviceRules) -> bool {
        self.device() == other.device()
    }
}

impl Eq for DeviceRules {}

impl Hash for DeviceRules {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.device().hash(state);
    }
}

/// An immutable, validated snapshot of every rule, indexed for per-device lookup.
///
/// Lookup is a cheap hash of the device id to pick a shard, one `HashSet` probe there, and a
/// scan of the (few) enterprise-wide rules, so a million `single_device` rules cost nothing
/// per request. A snapshot is never mutated: [`RuleSet::with`] returns the next one, which
/// shares everything it did not change with this one; the gateway swaps it in (`Arc<RuleSet>`
/// behind a lock). The indexes (by `benefit_id`, by device) are split into 256 shards behind
/// `Arc`s, so a change copies one shard of each (O(rules / 256) pointers) and the few
/// enterprise-wide rules, never the whole set. Bulk changes (sync, reload) build a new set
/// with [`RuleSet::new`].
#[derive(Clone, Debug)]
pub struct RuleSet {
    len: usize,
    /// Every rule, by `benefit_id`.
    by_id: Shards<ById>,
    /// `single_device` rules, by device id.
    by_device: Shards<DeviceRules>,
    /// `enterprise_all_*` rules, in the order added. Few: one cumulative and one periodic
    /// non-cancelled rule per scope and benefit type.
    enterprise: Arc<Vec<Arc<Rule>>>,
    /// Every other rule (a custom consumer, a Coze member, role, ...: stored, never enforced),
    /// by `benefit_id`.
    others: Shards<ById>,
}

impl Default for RuleSet {
    fn default() -> RuleSet {
        RuleSet {
            len: 0,
            by_id: Shards::new(),
            by_device: Shards::new(),
            enterprise: Arc::default(),
            others: Shards::new(),
        }
    }
}

impl RuleSet {
    /// Validate every rule and the set-level constraints. Field paths are `rules[i].field`; all
    /// problems are reported (per-rule problems in rule order, then device overlaps).
    ///
    /// - `benefit_id` is unique.
    /// - At most one cumulative and one periodic non-cancelled (`valid` or `frozen`) rule per
    ///   enterprise-wide scope and benefit type (Coze's rule), whatever their dates.
    /// - Per device, non-cancelled `single_device` rules of the same benefit type and kind must
    ///   not overlap in time (Coze says nothing; the gateway needs it because they would share
    ///   one counter). Consecutive rules (`ended_at == next.started_at`) are fine.
    ///
    /// A device's rules and the enterprise-wide rules keep the order of `rules`.
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, RuleErrors> {
        if u32::try_from(rules.len()).is_err() {
            return Err(too_many_rules());
        }
        let mut errs = Vec::new();
        let mut overlap_errs = Vec::new();
        let mut enterprise_seen: HashMap<(EntityType, BenefitType, RuleKind), Arc<Rule>> =
            HashMap::new();
        let mut set = RuleSet {
            len: rules.len(),
            by_id: Shards::with_capacity(rules.len()),
            by_device: Shards::with_capacity(rules.len()),
            ..RuleSet::default()
        };
        for (i, rule) in rules.into_iter().enumerate() {
            rule.validate_into(Some(i), &mut errs);
            let rule = Arc::new(rule);
            if !set
                .by_id
                .shard_mut(&rule.benefit_id)
                .insert(ById(Arc::clone(&rule)))
            {
                errs.push(RuleError::new(
                    field_path(Some(i), "benefit_id"),
                    RuleErrorKind::DuplicateBenefitId(rule.benefit_id.clone()),
                ));
            }
            if rule.entity_type.is_enterprise_wide() && rule.status != RuleStatus::Cancel {
                let key = (rule.entity_type, rule.benefit_type, rule.kind());
                if let Some(prev) = enterprise_seen.get(&key) {
                    errs.push(conflict(Some(i), &rule, prev));
                } else {
                    enterprise_seen.insert(key, Arc::clone(&rule));
                }
            }
            set.place(rule, |rule, earlier| {
                if overlaps(rule, earlier) {
                    overlap_errs.push(overlap(Some(i), rule, earlier));
                }
            });
        }
        errs.append(&mut overlap_errs);
        RuleErrors::result(errs)?;
        Ok(set)
    }

    /// Would adding (or replacing, same `benefit_id`) `rule` keep the set valid? Field names
    /// are the flat rule's. [`RuleSet::with`] checks this and makes the change.
    pub fn admits(&self, rule: &Rule) -> Result<(), RuleErrors> {
        let mut errs = Vec::new();
        rule.validate_into(None, &mut errs);
        if rule.entity_type.is_enterprise_wide() && rule.status != RuleStatus::Cancel {
            for other in self
                .enterprise
                .iter()
                .filter(|o| o.entity_type == rule.entity_type)
            {
                if other.benefit_id != rule.benefit_id
                    && other.status != RuleStatus::Cancel
                    && other.benefit_type == rule.benefit_type
                    && other.kind() == rule.kind()
                {
                    errs.push(conflict(None, rule, other));
                }
            }
        }
        if rule.entity_type == EntityType::SingleDevice {
            for other in self.rules_of_device(&rule.entity_id) {
                if other.benefit_id != rule.benefit_id && overlaps(rule, other) {
                    errs.push(overlap(None, rule, other));
                }
            }
        }
        RuleErrors::result(errs)
    }

    /// The set with `rule` added, or replacing the rule with the same `benefit_id` (which then
    /// leaves its device, if `entity_id` changed). Validated by [`RuleSet::admits`], so it fails
    /// exactly when [`RuleSet::new`] would fail on this set's rules with the change, with the
    /// flat rule's field names. `self` is unchanged; the result shares every shard the change
    /// does not touch with it, so this costs O(rules / 256), not O(rules). The rule goes last
    /// among its device's (or the enterprise-wide) rules, as if appended to the list.
    pub fn with(&self, rule: Rule) -> Result<RuleSet, RuleErrors> {
        self.admits(&rule)?;
        if self.len >= u32::MAX as usize && self.get(&rule.benefit_id).is_none() {
            return Err(too_many_rules());
        }
        let mut next = self.clone();
        let rule = Arc::new(rule);
        match next
            .by_id
            .shard_mut(&rule.benefit_id)
            .replace(ById(Arc::clone(&rule)))
        {
            Some(ById(old)) => next.unplace(&old),
            None => next.len += 1,
        }
        next.place(rule, |_, _| {});
        Ok(next)
    }

    /// Puts `rule` in its device's, the enterprise-wide or the other rules (not `by_id`).
    /// `earlier` sees each rule the device already has.
    fn place(&mut self, rule: Arc<Rule>, mut earlier: impl FnMut(&Rule, &Rule)) {
        match rule.entity_type {
            EntityType::SingleDevice => {
                let shard = self.by_device.shard_mut(&rule.entity_id);
                let rules = match shard.take(rule.entity_id.as_str()) {
                    Some(rules) => {
                        for other in rules.as_slice() {
                            earlier(&rule, other);
                        }
                        rules.push(rule)
                    }
                    None => DeviceRules::One(rule),
                };
                shard.insert(rules);
            }
            t if t.is_enterprise_wide() => Arc::make_mut(&mut self.enterprise).push(rule),
            _ => {
                self.others.shard_mut(&rule.benefit_id).insert(ById(rule));
            }
        }
    }

    /// Takes `old` out of where [`RuleSet::place`] put it.
    fn unplace(&mut self, old: &Rule) {
        match old.entity_type {
            EntityType::SingleDevice => {
                let shard = self.by_device.shard_mut(&old.entity_id);
                if let Some(rest) = shard
                    .take(old.entity_id.as_str())
                    .and_then(|rules| rules.without(&old.benefit_id))
                {
                    shard.insert(rest);
                }
            }
            t if t.is_enterprise_wide() => {
                Arc::make_mut(&mut self.enterprise).retain(|r| r.benefit_id != old.benefit_id);
            }
            _ => {
                self.others
                    .shard_mut(&old.benefit_id)
                    .remove(old.benefit_id.as_str());
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every rule (for the list API and persistence): the enterprise-wide ones, the other
    /// non-device ones, then device by device. The order between devices and among the
    /// non-device rules is unspecified (sort if it matters); each device's rules and the
    /// enterprise-wide ones come in their set order, so `RuleSet::new(set.iter().cloned()
    /// .collect())` rebuilds the same set.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.enterprise
            .iter()
            .chain(self.others.iter().map(|r| &r.0))
            .chain(self.by_device.iter().flat_map(DeviceRules::as_slice))
            .map(|r| &**r)
    }

    /// Take the rules back (to build the next snapshot), in [`RuleSet::iter`]'s order. Copies
    /// only what another snapshot still shares.
    pub fn into_rules(self) -> Vec<Rule> {
        let RuleSet {
            len,
            by_id,
            by_device,
            enterprise,
            others,
        } = self;
        // Drop the second reference to each rule, so most are moved out, not copied.
        drop(by_id);
        let mut out = Vec::with_capacity(len);
        out.extend(
            Arc::unwrap_or_clone(enterprise)
                .into_iter()
                .map(Arc::unwrap_or_clone),
        );
        out.extend(others.into_items().map(|r| Arc::unwrap_or_clone(r.0)));
        for rules in by_device.into_items() {
            match rules {
                DeviceRules::One(r) => out.push(Arc::unwrap_or_clone(r)),
                DeviceRules::Many(v) => out.extend(v.into_iter().map(Arc::unwrap_or_clone)),
            }
        }
        out
    }

    pub fn get(&self, benefit_id: &str) -> Option<&Rule> {
        self.by_id.get(benefit_id).map(|r| &*r.0)
    }

    /// Every `single_device` rule naming `device`, any status or time.
    pub fn for_device<'a>(&'a self, device: &DeviceId) -> impl Iterator<Item = &'a Rule> + 'a {
        self.device_rules(device)
    }

    /// Every `enterprise_all_devices` rule, any status or time.
    pub fn enterprise_rules(&self) -> impl Iterator<Item = &Rule> {
        self.enterprise
            .iter()
            .filter(|r| r.entity_type == EntityType::EnterpriseAllDevices)
            .map(|r| &**r)
    }

    fn rules_of_device(&self, device: &str) -> &[Arc<Rule>] {
        self.by_device
            .get(device)
            .map(DeviceRules::as_slice)
            .unwrap_or(&[])
    }

    fn device_rules<'a>(
        &'a self,
        device: &DeviceId,
    ) -> impl Iterator<Item = &'a Rule> + Clone + 'a {
        self.rules_of_device(device.as_str()).iter().map(|r| &**r)
    }

    /// Whether a rule that applies to `device` now **or later** (`valid`, not ended at
    /// `now_s`; its own or an enterprise-wide one) charges voice-session wall time (see
    /// [`BenefitType::grows_with_session_time`]). Such a session uses its quota up while
    /// idle, so the gateway reports it every second. Over-approximates on purpose: a rule
    /// that starts later counts already (the answer stays right until the rule set changes),
    /// and an enterprise rule counts even where a device rule overrides it (the override has
    /// the same benefit type). No allocation.
    pub fn meters_session_time(&self, device: &DeviceId, now_s: u64, prices: &PriceTable) -> bool {
        self.device_rules(device)
            .chain(self.enterprise_rules())
            .any(|r| {
                r.status == RuleStatus::Valid
                    && now_s < r.ended_at
                    && r.benefit_type.grows_with_session_time(prices)
            })
    }

    /// The rules enforced on `device` at `now_s`: only `valid` rules with
    /// `started_at ≤ now_s < ended_at`; for each (benefit type, kind) the device's active
    /// `single_device` rule, or, if it has none, the active `enterprise_all_devices` rule. The
    /// set guarantees at most one of each, so every (benefit type, kind) yields at most one
    /// rule. No allocation.
    pub fn applicable<'a>(
        &'a self,
        device: &DeviceId,
        now_s: u64,
    ) -> impl Iterator<Item = &'a Rule> + 'a {
        let mut covered: u32 = 0;
        let singles = self
            .device_rules(device)
            .filter(move |r| r.is_active(now_s));
        for r in singles.clone() {
            covered |= bit(r.benefit_type, r.kind());
        }
        singles.chain(
            self.enterprise_rules().filter(move |r| {
                r.is_active(now_s) && covered & bit(r.benefit_type, r.kind()) == 0
            }),
        )
    }
}

fn too_many_rules() -> RuleErrors {
    RuleErrors(vec![RuleError::new(
        "rules".to_owned(),
        RuleErrorKind::LimitTooLarge {
            max: u64::from(u32::MAX),
        },
    )])
}

fn bit(b: BenefitType, k: RuleKind) -> u32 {
    1 << (b.index() * 2 + k.index())
}

/// Two rules of one device that would both apply at some instant to the same counter.
fn overlaps(a: &Rule, b: &Rule) -> bool {
    a.status != RuleStatus::Cancel
        && b.status != RuleStatus::Cancel
        && a.benefit_type == b.benefit_type
        && a.kind() == b.kind()
        && a.started_at < b.ended_at
        && b.started_at < a.ended_at
}

fn kind_name(k: RuleKind) -> &'static str {
    match k {
        RuleKind::Cumulative => "cumulative",
        RuleKind::Periodic => "periodic",
    }
}

fn overlap(index: Option<usize>, rule: &Rule, existing: &Rule) -> RuleError {
    RuleError::new(
        field_path(index, "started_at"),
        RuleErrorKind::DeviceRuleOverlap {
            kind: kind_name(rule.kind()),
            existing: existing.benefit_id.clone(),
        },
    )
}

fn field_path(index: Option<usize>, name: &str) -> String {
    match index {
        Some(i) => format!("rules[{i}].{name}"),
        None => name.to_owned(),
    }
}

fn conflict(index: Option<usize>, rule: &Rule, existing: &Rule) -> RuleError {
    RuleError::new(
        field_path(index, "trigger_unit"),
        RuleErrorKind::EnterpriseRuleConflict {
            benefit_type: rule.benefit_type,
            kind: kind_name(rule.kind()),
            existing: existing.benefit_id.clone(),
        },
    )
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    /// Fleets name devices (and the gateway numbers benefits) sequentially; a shard holding
    /// far more than its share would make changes to its rules slower.
    #[test]
    fn sequential_ids_spread_evenly_over_the_shards() {
        let names: [fn(usize) -> String; 4] = [
            |i| format!("dev-{i:08}"),
            |i| format!("SN{i:07}"),
            |i| i.to_string(),
            |i| format!("74000000000{i:08}"),
        ];
        let n = 200_000;
        let mean = n / SHARDS;
        for name in names {
            let mut counts = vec![0usize; SHARDS];
            for i in 0..n {
                counts[shard_of(&name(i))] += 1;
            }
            let (min, max) = (counts.iter().min(), counts.iter().max());
            assert!(
                max.is_some_and(|&m| m < mean * 3 / 2) && min.is_some_and(|&m| m > mean / 2),
                "{}: {min:?}..{max:?}, mean {mean}",
                name(0)
            );
        }
    }
}
