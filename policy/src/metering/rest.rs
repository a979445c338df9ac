//! Meters for plain REST exchanges.
//!
//! REST bodies are bounded by the gateway's body limits (Coze: TTS input ≤ 1024 bytes, ASR
//! upload ≤ 10 MB, workflow request ≤ 20 MB), so the JSON functions here take whole bodies and
//! parse them with `serde_json`. The only large *response* body, TTS audio, is metered
//! incrementally by [`SpeechResponseMeter`], which keeps at most the first 512 bytes (for a WAV
//! header) and a byte count.
//!
//! Non-streaming `POST /v3/chat` responses carry no usage (the chat is still `in_progress`);
//! usage is read from the `GET /v3/chat/retrieve` response ([`chat_retrieve_usage`]).

use serde::Deserialize;

use super::{AudioClock, AudioRate, Usage};

/// A REST body that could not be metered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestMeterError {
    /// The body was not the JSON shape the endpoint documents.
    #[error("invalid JSON body at line {line}, column {column}")]
    InvalidJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// A multipart body without the expected `file` part.
    #[error("multipart body has no `file` part")]
    MissingFilePart,
}

impl RestMeterError {
    /// Stable low-cardinality code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson { .. } => "rest_invalid_json",
            Self::MissingFilePart => "rest_missing_file_part",
        }
    }
}

impl From<serde_json::Error> for RestMeterError {
    fn from(e: serde_json::Error) -> Self {
        Self::InvalidJson {
            line: e.line(),
            column: e.column(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct RawUsage {
    input_count: Option<u64>,
    output_count: Option<u64>,
    token_count: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl RawUsage {
    fn to_usage(&self) -> Usage {
        let facts = super::json_scan::UsageFacts {
            input_count: self.input_count,
            output_count: self.output_count,
            token_count: self.token_count,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
        };
        match facts.tokens() {
            Some((i, o)) => Usage {
                llm_input_tokens: i,
                llm_output_tokens: o,
                usage_events: 1,
                ..Usage::default()
            },
            None => Usage::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct WorkflowRunBody {
    usage: Option<RawUsage>,
}

/// Tokens from a `/v1/workflow/run` or `/v1/workflows/resume` response (top-level `usage`).
///
/// `completed` is set: a whole response is the end of the exchange. A body without `usage`
/// (errors, async runs) gives zero usage with `usage_events == 0`.
///
/// # Errors
/// [`RestMeterError::InvalidJson`] if the body is not a JSON object.
pub fn workflow_run_usage(body: &[u8]) -> Result<Usage, RestMeterError> {
    let b: WorkflowRunBody = serde_json::from_slice(body)?;
    let mut u = b.usage.map(|u| u.to_usage()).unwrap_or_default();
    u.completed = true;
    Ok(u)
}

#[derive(Debug, Deserialize)]
struct ChatRetrieveData {
    status: Option<String>,
    usage: Option<RawUsage>,
}

#[derive(Debug, Deserialize)]
struct ChatRetrieveBody {
    data: Option<ChatRetrieveData>,
}

/// Tokens from a `/v3/chat/retrieve` response (`data.usage`), the only place a non-streaming
/// chat reports usage. `completed` is set when `data.status` is terminal (`completed`,
/// `failed`, `requires_action`, `canceled`); poll responses while `in_progress` carry partial
/// or zero usage and should not be settled.
///
/// # Errors
/// [`RestMeterError::InvalidJson`] if the body is not a JSON object.
pub fn chat_retrieve_usage(body: &[u8]) -> Result<Usage, RestMeterError> {
    let b: ChatRetrieveBody = serde_json::from_slice(body)?;
    let Some(d) = b.data else {
        return Ok(Usage::default());
    };
    let mut u = d.usage.map(|u| u.to_usage()).unwrap_or_default();
    u.completed = matches!(
        d.status.as_deref(),
        Some("completed" | "failed" | "requires_action" | "canceled")
    );
    Ok(u)
}

/// `response_format` of `POST /v1/audio/speech`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeechFormat {
    /// RIFF/WAVE.
    Wav,
    /// Raw PCM, 16-bit mono at the request's `sample_rate`.
    Pcm,
    /// Opus in Ogg.
    OggOpus,
    /// MP3 (the platform default).
    #[default]
    Mp3,
}

#[derive(Debug, Deserialize)]
struct RawSpeechRequest {
    input: String,
    #[serde(default)]
    response_format: SpeechFormat,
    sample_rate: Option<u32>,
    speed: Option<f64>,
}

/// What the meter needs from a `POST /v1/audio/speech` request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeechRequest {
    /// Unicode scalar values in `input` (the TTS characters billed).
    pub tts_chars: u64,
    /// Requested audio container/codec.
    pub format: SpeechFormat,
    /// Requested sample rate (default 24 000).
    pub sample_rate: u32,
    /// `speed` in thousandths (default 1000).
    pub speed_milli: u32,
}

impl SpeechRequest {
    /// Parse the JSON request body.
    ///
    /// # Errors
    /// [`RestMeterError::InvalidJson`] if the body is not JSON or lacks a string `input`.
    pub fn parse(body: &[u8]) -> Result<Self, RestMeterError> {
        let r: RawSpeechRequest = serde_json::from_slice(body)?;
        let speed = r.speed.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(1.0);
        Ok(Self {
            tts_chars: u64::try_from(r.input.chars().count()).unwrap_or(u64::MAX),
            format: r.response_format,
            sample_rate: r.sample_rate.filter(|&s| s > 0).unwrap_or(24_000),
            // Bounded: speeds are 0.2..=3 per the API; the cast saturates anyway.
            speed_milli: ((speed * 1000.0).round() as u32).max(1),
        })
    }

    /// The usage of the request alone (TTS characters), for reservation or when the response
    /// is never seen.
    pub fn usage(&self) -> Usage {
        Usage {
            tts_chars: self.tts_chars,
            ..Usage::default()
        }
    }
}

const WAV_HEADER_CAP: usize = 512;

/// Incremental meter for a `POST /v1/audio/speech` response body (raw audio bytes).
///
/// - `wav`: the RIFF header (first 512 bytes) gives the byte rate; duration = data bytes
///   actually received ÷ byte rate (the declared data size caps it when plausible, since
///   streamed WAV often declares `0` or `0xFFFFFFFF`).
/// - `pcm`: bytes ÷ (`sample_rate` × 2), 16-bit mono.
///
/// # Approximation
///
/// `mp3` and `ogg_opus` are not decoded: their duration is estimated from the request as
/// `tts_chars × ms_per_char ÷ speed` (default 250 ms per character, about 4 Mandarin characters
/// per second at speed 1.0; English text reads faster, so this over-estimates it). A WAV whose
/// header cannot be parsed falls back to the same estimate.
#[derive(Debug, Clone)]
pub struct SpeechResponseMeter {
    request: SpeechRequest,
    ms_per_char: u64,
    head: [u8; WAV_HEADER_CAP],
    head_len: usize,
    total: u64,
}

impl SpeechResponseMeter {
    /// A meter for the response to `request`, with the default 250 ms/char estimate.
    pub fn new(request: SpeechRequest) -> Self {
        Self::with_ms_per_char(request, 250)
    }

    /// A meter with a custom per-character estimate for formats that are not decoded.
    pub fn with_ms_per_char(request: SpeechRequest, ms_per_char: u64) -> Self {
        Self {
            request,
            ms_per_char,
            head: [0; WAV_HEADER_CAP],
            head_len: 0,
            total: 0,
        }
    }

    /// Feed the next chunk of the response body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.total = self
            .total
            .saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
        let room = WAV_HEADER_CAP - self.head_len;
        let take = room.min(chunk.len());
        if let (Some(dst), Some(src)) = (
            self.head.get_mut(self.head_len..self.head_len + take),
            chunk.get(..take),
        ) {
            dst.copy_from_slice(src);
            self.head_len += take;
        }
    }

    fn estimate_ms(&self) -> u64 {
        let ms = u128::from(self.request.tts_chars) * u128::from(self.ms_per_char) * 1000
            / u128::from(self.request.speed_milli.max(1));
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// Usage so far: request characters plus audio duration.
    pub fn usage(&self) -> Usage {
        let audio_out_ms = match self.request.format {
            SpeechFormat::Pcm => pcm_ms(self.total, u64::from(self.request.sample_rate) * 2),
            SpeechFormat::Wav => self
                .head
                .get(..self.head_len)
                .and_then(WavInfo::parse)
                .map_or_else(|| self.estimate_ms(), |w| w.duration_ms(self.total)),
            SpeechFormat::Mp3 | SpeechFormat::OggOpus => self.estimate_ms(),
        };
        Usage {
            tts_chars: self.request.tts_chars,
            audio_out_ms,
            completed: true,
            ..Usage::default()
        }
    }

    /// End of body: the total.
    pub fn finish(self) -> Usage {
        self.usage()
    }
}

fn pcm_ms(bytes: u64, bytes_per_sec: u64) -> u64 {
    let mut c = AudioClock::default();
    if let Some(n) = core::num::NonZeroU64::new(bytes_per_sec) {
        c.add(AudioRate::BytesPerSecond(n), bytes);
    }
    c.millis()
}

/// The parts of a RIFF/WAVE header needed for duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WavInfo {
    byte_rate: u64,
    data_offset: u64,
    declared_len: u32,
}

impl WavInfo {
    fn parse(h: &[u8]) -> Option<Self> {
        if h.get(0..4)? != b"RIFF" || h.get(8..12)? != b"WAVE" {
            return None;
        }
        let le32 = |at: usize| -> Option<u32> {
            let b = h.get(at..at + 4)?;
            Some(u32::from_le_bytes([
                *b.first()?,
                *b.get(1)?,
                *b.get(2)?,
                *b.get(3)?,
            ]))
        };
        let le16 = |at: usize| -> Option<u16> {
            let b = h.get(at..at + 2)?;
            Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
        };
        let mut pos = 12usize;
        let mut byte_rate: Option<u64> = None;
        loop {
            let id = h.get(pos..pos + 4)?;
            let size = le32(pos + 4)?;
            if id == b"fmt " {
                let channels = u64::from(le16(pos + 10)?);
                let rate = u64::from(le32(pos + 12)?);
                let declared = u64::from(le32(pos + 16)?);
                let bits = u64::from(le16(pos + 22)?);
                let computed = rate * channels * bits.div_ceil(8);
                byte_rate = Some(if declared > 0 { declared } else { computed });
            } else if id == b"data" {
                let byte_rate = byte_rate.filter(|&r| r > 0)?;
                return Some(Self {
                    byte_rate,
                    data_offset: u64::try_from(pos + 8).ok()?,
                    declared_len: size,
                });
            }
            let step = usize::try_from(size)
                .ok()?
                .checked_add(8 + (size as usize & 1))?;
            pos = pos.checked_add(step)?;
        }
    }

    fn duration_ms(&self, total_bytes: u64) -> u64 {
        let mut data = total_bytes.saturating_sub(self.data_offset);
        if self.declared_len != 0 && self.declared_len != u32::MAX {
            data = data.min(u64::from(self.declared_len));
        }
        pcm_ms(data, self.byte_rate)
    }
}

/// Input audio duration of a `POST /v1/audio/transcriptions` multipart body, from the WAV header
/// of its `file` part. `boundary` is the `boundary` parameter of the request's `Content-Type`.
///
/// Returns `Ok(None)` when the file is not WAV (opus, mp3, m4a, …): the gateway must then charge
/// an estimate (for example from the file size) and say so.
///
/// # Errors
/// [`RestMeterError::MissingFilePart`] when no part is named `file`.
pub fn transcription_audio_ms(body: &[u8], boundary: &[u8]) -> Result<Option<u64>, RestMeterError> {
    let mut delim = Vec::with_capacity(boundary.len() + 2);
    delim.extend_from_slice(b"--");
    delim.extend_from_slice(boundary);
    let finder = memchr::memmem::Finder::new(&delim);
    let starts: Vec<usize> = finder.find_iter(body).collect();
    for pair in starts.windows(2) {
        let (Some(&a), Some(&b)) = (pair.first(), pair.get(1)) else {
            continue;
        };
        let Some(part) = body.get(a + delim.len()..b) else {
            continue;
        };
        let Some(hdr_end) = memchr::memmem::find(part, b"\r\n\r\n") else {
            continue;
        };
        let (headers, rest) = part.split_at(hdr_end);
        if memchr::memmem::find(headers, b"name=\"file\"").is_none() {
            continue;
        }
        let content = rest.get(4..).unwrap_or_default();
        let content = content.strip_suffix(b"\r\n").unwrap_or(content);
        let len = u64::try_from(content.len()).unwrap_or(u64::MAX);
        let head = content
            .get(..WAV_HEADER_CAP.min(content.len()))
            .unwrap_or_default();
        return Ok(WavInfo::parse(head).map(|w| w.duration_ms(len)));
    }
    Err(RestMeterError::MissingFilePart)
}
