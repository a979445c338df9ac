//! Quota rules in Coze's shape (`coze-api.md` §10), their windows, and the [`RuleSet`] snapshot.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

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

/// Rule indices of one device (most devices have one rule: no extra allocation).
#[derive(Clone, Debug)]
enum Slots {
    One(u32),
    Many(Vec<u32>),
}

impl Slots {
    fn push(&mut self, i: u32) {
        match self {
            Slots::One(a) => *self = Slots::Many(vec![*a, i]),
            Slots::Many(v) => v.push(i),
        }
    }

    fn as_slice(&self) -> &[u32] {
        match self {
            Slots::One(a) => std::slice::from_ref(a),
            Slots::Many(v) => v,
        }
    }
}

/// An immutable, validated snapshot of every rule, indexed for per-device lookup.
///
/// Lookup is one `HashMap` probe by device id plus a scan of the (few) enterprise-wide device
/// rules, so a million `single_device` rules cost nothing per request. Build a new snapshot on
/// every change and swap it in (`ArcSwap<RuleSet>` in the gateway); it is never mutated.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    by_id: HashMap<String, u32>,
    by_device: HashMap<String, Slots>,
    /// `enterprise_all_devices` rules.
    enterprise: Vec<u32>,
}

impl RuleSet {
    /// Validate every rule and the set-level constraints. Field paths are `rules[i].field`; all
    /// problems are reported.
    ///
    /// - `benefit_id` is unique.
    /// - At most one cumulative and one periodic non-cancelled (`valid` or `frozen`) rule per
    ///   enterprise-wide scope and benefit type (Coze's rule), whatever their dates.
    /// - Per device, non-cancelled `single_device` rules of the same benefit type and kind must
    ///   not overlap in time (Coze says nothing; the gateway needs it because they would share
    ///   one counter). Consecutive rules (`ended_at == next.started_at`) are fine.
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, RuleErrors> {
        let mut errs = Vec::new();
        let mut by_id: HashMap<String, u32> = HashMap::with_capacity(rules.len());
        let mut enterprise_seen: HashMap<(EntityType, BenefitType, RuleKind), u32> = HashMap::new();
        if u32::try_from(rules.len()).is_err() {
            errs.push(RuleError::new(
                "rules".to_owned(),
                RuleErrorKind::LimitTooLarge {
                    max: u64::from(u32::MAX),
                },
            ));
            return Err(RuleErrors(errs));
        }
        let mut by_device: HashMap<String, Slots> = HashMap::with_capacity(rules.len());
        let mut enterprise = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            rule.validate_into(Some(i), &mut errs);
            if by_id.insert(rule.benefit_id.clone(), idx).is_some() {
                errs.push(RuleError::new(
                    field_path(Some(i), "benefit_id"),
                    RuleErrorKind::DuplicateBenefitId(rule.benefit_id.clone()),
                ));
            }
            if rule.entity_type.is_enterprise_wide() && rule.status != RuleStatus::Cancel {
                let key = (rule.entity_type, rule.benefit_type, rule.kind());
                if let Some(&prev) = enterprise_seen.get(&key) {
                    errs.push(conflict(Some(i), rule, &rules[prev as usize]));
                } else {
                    enterprise_seen.insert(key, idx);
                }
            }
            match rule.entity_type {
                EntityType::SingleDevice => match by_device.get_mut(rule.entity_id.as_str()) {
                    Some(s) => s.push(idx),
                    None => {
                        by_device.insert(rule.entity_id.clone(), Slots::One(idx));
                    }
                },
                EntityType::EnterpriseAllDevices => enterprise.push(idx),
                _ => {}
            }
        }
        for slots in by_device.values() {
            let Slots::Many(idxs) = slots else {
                continue;
            };
            for (n, &i) in idxs.iter().enumerate() {
                for &j in &idxs[..n] {
                    let (a, b) = (&rules[i as usize], &rules[j as usize]);
                    if overlaps(a, b) {
                        errs.push(overlap(Some(i as usize), a, b));
                    }
                }
            }
        }
        RuleErrors::result(errs)?;
        Ok(RuleSet {
            rules,
            by_id,
            by_device,
            enterprise,
        })
    }

    /// Would adding (or replacing, same `benefit_id`) `rule` keep the set valid? For the admin
    /// API's create/update before rebuilding the snapshot. Field names are the flat rule's.
    pub fn admits(&self, rule: &Rule) -> Result<(), RuleErrors> {
        let mut errs = Vec::new();
        rule.validate_into(None, &mut errs);
        if rule.entity_type.is_enterprise_wide() && rule.status != RuleStatus::Cancel {
            for &i in &self.enterprise_like(rule.entity_type) {
                let other = &self.rules[i as usize];
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
            for other in self
                .by_device
                .get(rule.entity_id.as_str())
                .map(Slots::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|&i| &self.rules[i as usize])
            {
                if other.benefit_id != rule.benefit_id && overlaps(rule, other) {
                    errs.push(overlap(None, rule, other));
                }
            }
        }
        RuleErrors::result(errs)
    }

    fn enterprise_like(&self, t: EntityType) -> Vec<u32> {
        if t == EntityType::EnterpriseAllDevices {
            return self.enterprise.clone();
        }
        (0..self.rules.len())
            .filter_map(|i| u32::try_from(i).ok())
            .filter(|&i| self.rules[i as usize].entity_type == t)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule, in the order given (for the list API and persistence).
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// Take the rules back (to build the next snapshot).
    pub fn into_rules(self) -> Vec<Rule> {
        self.rules
    }

    pub fn get(&self, benefit_id: &str) -> Option<&Rule> {
        self.by_id.get(benefit_id).map(|&i| &self.rules[i as usize])
    }

    /// Every `single_device` rule naming `device`, any status or time.
    pub fn for_device<'a>(&'a self, device: &DeviceId) -> impl Iterator<Item = &'a Rule> + 'a {
        self.device_rules(device)
    }

    /// Every `enterprise_all_devices` rule, any status or time.
    pub fn enterprise_rules(&self) -> impl Iterator<Item = &Rule> {
        self.enterprise.iter().map(|&i| &self.rules[i as usize])
    }

    fn device_rules<'a>(
        &'a self,
        device: &DeviceId,
    ) -> impl Iterator<Item = &'a Rule> + Clone + 'a {
        self.by_device
            .get(device.as_str())
            .map(Slots::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(|&i| &self.rules[i as usize])
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
