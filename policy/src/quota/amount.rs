//! What one request consumed, per benefit type, in exact integer base units.

use serde::{Deserialize, Serialize};

use super::rule::BenefitType;
use crate::metering::Usage;

/// Everything a request consumed: the meters' [`Usage`] plus what only the gateway can count
/// (it has the clock): the request itself and the wall time of a voice session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumption {
    pub usage: Usage,
    /// Admitted requests / WebSocket sessions (normally 1).
    pub requests: u64,
    /// Wall time of a `/v1/chat` WebSocket session, milliseconds.
    pub voice_session_ms: u64,
}

impl Consumption {
    /// One request with this usage and no voice session.
    pub fn request(usage: Usage) -> Consumption {
        Consumption {
            usage,
            requests: 1,
            voice_session_ms: 0,
        }
    }

    /// The amount charged to `benefit`, in its base unit (see [`BenefitType`]):
    ///
    /// - `requests`: `requests`; `llm_tokens`: input + output; `audio_in_ms`, `audio_out_ms`,
    ///   `tts_chars`, `voice_session_ms`: as measured.
    /// - `voice_unified_duration_system` and `_custom`: `voice_session_ms` (the limit is in
    ///   seconds, counted in ms). **Approximation:** Coze bills RTC voice-call time and splits it
    ///   by system vs cloned voice; the gateway cannot see which voice a session used and has no
    ///   RTC rooms, so both types measure the same `/v1/chat` session wall time.
    /// - `resource_point`: micro-points from the [`PriceTable`].
    ///
    /// Saturating; never panics.
    pub fn amount(&self, benefit: BenefitType, prices: &PriceTable) -> u64 {
        let u = &self.usage;
        match benefit {
            BenefitType::Requests => self.requests,
            BenefitType::LlmTokens => u.llm_total_tokens(),
            BenefitType::AudioInMs => u.audio_in_ms,
            BenefitType::AudioOutMs => u.audio_out_ms,
            BenefitType::TtsChars => u.tts_chars,
            BenefitType::VoiceSessionMs
            | BenefitType::VoiceUnifiedDurationSystem
            | BenefitType::VoiceUnifiedDurationCustom => self.voice_session_ms,
            BenefitType::ResourcePoint => prices.micro_points(self),
        }
    }

    /// Component-wise maximum (used when a reservation's observed progress exceeds its
    /// estimate).
    pub(crate) fn max(&self, other: &Consumption) -> Consumption {
        Consumption {
            usage: Usage {
                llm_input_tokens: self
                    .usage
                    .llm_input_tokens
                    .max(other.usage.llm_input_tokens),
                llm_output_tokens: self
                    .usage
                    .llm_output_tokens
                    .max(other.usage.llm_output_tokens),
                audio_in_ms: self.usage.audio_in_ms.max(other.usage.audio_in_ms),
                audio_out_ms: self.usage.audio_out_ms.max(other.usage.audio_out_ms),
                tts_chars: self.usage.tts_chars.max(other.usage.tts_chars),
                usage_events: self.usage.usage_events.max(other.usage.usage_events),
                completed: self.usage.completed || other.usage.completed,
            },
            requests: self.requests.max(other.requests),
            voice_session_ms: self.voice_session_ms.max(other.voice_session_ms),
        }
    }
}

impl BenefitType {
    /// Whether [`Consumption::amount`] for this benefit grows with `voice_session_ms`, i.e.
    /// whether an idle voice session still uses it up: the time benefits, and `resource_point`
    /// when voice-session time has a price. Kept next to `amount` so the two cannot disagree
    /// (a test checks them against each other).
    pub fn grows_with_session_time(self, prices: &PriceTable) -> bool {
        match self {
            BenefitType::VoiceSessionMs
            | BenefitType::VoiceUnifiedDurationSystem
            | BenefitType::VoiceUnifiedDurationCustom => true,
            BenefitType::ResourcePoint => prices.voice_session_per_second > 0,
            BenefitType::Requests
            | BenefitType::LlmTokens
            | BenefitType::AudioInMs
            | BenefitType::AudioOutMs
            | BenefitType::TtsChars => false,
        }
    }
}

/// Credits (`resource_point`) per unit of each meter, in **integer micro-points** (1 point =
/// 1 000 000). Zero (the default) makes a meter free.
///
/// The charge for a [`Consumption`] is `Σ quantity × price / denominator` (denominators 1 000
/// for per-1k and per-second prices, 1 for requests), computed in `u128` over a common
/// denominator and divided **once**, rounding up: so it is exact whenever the true value is a
/// whole number of micro-points, and otherwise over-charges by less than one micro-point per
/// settlement (never under-charges). Example: 1 234 tokens at 2.5 points per 1k tokens
/// (`llm_input_per_1k_tokens = 2_500_000`) is exactly 3 085 000 micro-points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriceTable {
    /// Micro-points per request / session.
    pub per_request: u64,
    /// Micro-points per 1 000 LLM input tokens.
    pub llm_input_per_1k_tokens: u64,
    /// Micro-points per 1 000 LLM output tokens.
    pub llm_output_per_1k_tokens: u64,
    /// Micro-points per second of device→platform audio.
    pub audio_in_per_second: u64,
    /// Micro-points per second of platform→device audio.
    pub audio_out_per_second: u64,
    /// Micro-points per 1 000 TTS characters.
    pub tts_per_1k_chars: u64,
    /// Micro-points per second of voice-session wall time.
    pub voice_session_per_second: u64,
}

impl PriceTable {
    /// The credit cost of `c` in micro-points (see the type docs), saturating at `u64::MAX`.
    pub fn micro_points(&self, c: &Consumption) -> u64 {
        let m = |q: u64, p: u64| u128::from(q) * u128::from(p);
        let u = &c.usage;
        // Everything over the common denominator 1 000.
        let thousandths = [
            m(c.requests, self.per_request).saturating_mul(1_000),
            m(u.llm_input_tokens, self.llm_input_per_1k_tokens),
            m(u.llm_output_tokens, self.llm_output_per_1k_tokens),
            m(u.audio_in_ms, self.audio_in_per_second),
            m(u.audio_out_ms, self.audio_out_per_second),
            m(u.tts_chars, self.tts_per_1k_chars),
            m(c.voice_session_ms, self.voice_session_per_second),
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add);
        u64::try_from(thousandths.div_ceil(1_000)).unwrap_or(u64::MAX)
    }
}
