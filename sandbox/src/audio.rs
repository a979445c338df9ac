//! Audio: REST TTS/ASR/voices/rooms (coze-api.md §7), and the synthesis primitives the
//! WebSocket APIs share.
//!
//! Synthesised speech is a deterministic tone whose duration follows from the text:
//! [`speech_duration_ms`] = 60 ms per character (CJK or not) ÷ speed, at least 200 ms.
//!
//! | endpoint | answer |
//! |---|---|
//! | `POST /v1/audio/speech` `{input, voice_id, response_format, speed, sample_rate}` | raw audio bytes |
//! | `POST /v1/audio/transcriptions` multipart `file` | `data: {text}` |
//! | `GET /v1/audio/voices?filter_system_voice=&model_type=&voice_state=&page_num=&page_size=` | `data: {has_more, voice_list}` |
//! | `POST /v1/audio/rooms` `{bot_id, …}` | `data: {room_id, app_id, token, uid}` |
//!
//! Sandbox conventions:
//! - TTS supports `response_format` `wav` (`audio/wav`, 44-byte header + PCM16 mono) and
//!   `pcm` (`audio/pcm`, raw s16le mono) at any `sample_rate` in 8000–48000 (default 24000),
//!   `speed` 0.2–3. `mp3` (Coze's default) and `ogg_opus` are **rejected** with code 4000
//!   "unsupported in sandbox": the sandbox has no encoder and a placeholder would break
//!   duration-based metering. `input` over 1024 bytes → 4000.
//! - ASR never recognises speech: for a WAV file the text is
//!   `sandbox transcript of N.NN s` (duration from the header); other files give
//!   `sandbox transcript of N bytes`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::conversations::{json_body, prelude, str_field};
use crate::envelope::{self, ApiError, ApiResult, new_logid, with_logid};
use crate::files::{UPLOAD_LIMIT, exactly_one, file_parts};
use crate::state::SandboxState;

/// Milliseconds of speech for `text` at `speed` (1.0 = normal).
pub fn speech_duration_ms(text: &str, speed: f64) -> u64 {
    let chars = text.chars().filter(|c| !c.is_whitespace()).count() as f64;
    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        1.0
    };
    ((chars * 60.0 / speed).round() as u64).max(200)
}

/// `duration_ms` of mono signed 16-bit little-endian PCM at `sample_rate`: a quiet tone.
pub fn synth_pcm16(duration_ms: u64, sample_rate: u32, seed: u64) -> Vec<u8> {
    let samples = (u64::from(sample_rate) * duration_ms / 1000) as usize;
    let freq = 220.0 + (seed % 7) as f64 * 30.0;
    let mut out = Vec::with_capacity(samples * 2);
    for i in 0..samples {
        let t = i as f64 / f64::from(sample_rate);
        let v = (t * freq * std::f64::consts::TAU).sin() * 3000.0;
        out.extend_from_slice(&(v as i16).to_le_bytes());
    }
    out
}

/// Wraps PCM16 in a canonical 44-byte RIFF/WAVE header.
pub fn wav_from_pcm16(pcm: &[u8], sample_rate: u32, channels: u16) -> Vec<u8> {
    let data_len = pcm.len() as u32;
    let byte_rate = sample_rate * u32::from(channels) * 2;
    let mut w = Vec::with_capacity(44 + pcm.len());
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&channels.to_le_bytes());
    w.extend_from_slice(&sample_rate.to_le_bytes());
    w.extend_from_slice(&byte_rate.to_le_bytes());
    w.extend_from_slice(&(channels * 2).to_le_bytes()); // block align
    w.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    w.extend_from_slice(pcm);
    w
}

/// Sample rates TTS accepts.
pub const SAMPLE_RATES: [u32; 7] = [8000, 16000, 22050, 24000, 32000, 44100, 48000];
/// Maximum TTS input in UTF-8 bytes.
pub const MAX_TTS_INPUT: usize = 1024;

/// Duration in milliseconds of a PCM WAV file, from its `fmt ` and `data` chunks.
pub fn wav_duration_ms(wav: &[u8]) -> Option<f64> {
    if wav.len() < 12 || &wav[0..4] != b"RIFF" || &wav[8..12] != b"WAVE" {
        return None;
    }
    let mut pos = 12;
    let mut byte_rate = None;
    while pos + 8 <= wav.len() {
        let id = &wav[pos..pos + 4];
        let len =
            u32::from_le_bytes([wav[pos + 4], wav[pos + 5], wav[pos + 6], wav[pos + 7]]) as usize;
        let body = pos + 8;
        if id == b"fmt " && body + 12 <= wav.len() {
            let br =
                u32::from_le_bytes([wav[body + 8], wav[body + 9], wav[body + 10], wav[body + 11]]);
            byte_rate = Some(br);
        } else if id == b"data" {
            let br = f64::from(byte_rate.filter(|b| *b > 0)?);
            // Streaming writers put 0 or 0xFFFFFFFF: fall back to what is actually there.
            let avail = wav.len() - body;
            let len = if len == 0 || len > avail { avail } else { len };
            return Some(len as f64 * 1000.0 / br);
        }
        pos = body + len + (len & 1);
    }
    None
}

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/v1/audio/speech", post(speech))
        .route(
            "/v1/audio/transcriptions",
            post(transcriptions).layer(axum::extract::DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route("/v1/audio/voices", get(voices))
        .route("/v1/audio/rooms", post(rooms))
}

async fn speech(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    let input = b
        .get("input")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("input is required"))?;
    if input.len() > MAX_TTS_INPUT {
        return Err(ApiError::bad_request(format!(
            "input is {} bytes, at most {MAX_TTS_INPUT} allowed",
            input.len()
        )));
    }
    str_field(&b, "voice_id").ok_or_else(|| ApiError::bad_request("voice_id is required"))?;
    let speed = b.get("speed").and_then(Value::as_f64).unwrap_or(1.0);
    if !(0.2..=3.0).contains(&speed) {
        return Err(ApiError::bad_request("speed must be within [0.2, 3]"));
    }
    let rate = match b.get("sample_rate").and_then(Value::as_u64) {
        None => 24_000,
        Some(r) => u32::try_from(r)
            .ok()
            .filter(|r| SAMPLE_RATES.contains(r))
            .ok_or_else(|| ApiError::bad_request(format!("unsupported sample_rate {r}")))?,
    };
    let format = str_field(&b, "response_format").unwrap_or("mp3");
    let ms = speech_duration_ms(input, speed);
    let (bytes, ctype) = match format {
        "wav" => (
            wav_from_pcm16(&synth_pcm16(ms, rate, st.config.seed), rate, 1),
            "audio/wav",
        ),
        "pcm" => (synth_pcm16(ms, rate, st.config.seed), "audio/pcm"),
        "mp3" | "ogg_opus" => {
            return Err(ApiError::bad_request(format!(
                "response_format {format} is unsupported in sandbox; use wav or pcm"
            )));
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid response_format {other}"
            )));
        }
    };
    let mut resp = (StatusCode::OK, bytes).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    Ok(with_logid(resp, &new_logid()))
}

async fn transcriptions(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let (_name, data) = exactly_one(file_parts(mp).await?)?;
    let text = match wav_duration_ms(&data) {
        Some(ms) => format!("sandbox transcript of {:.2} s", ms / 1000.0),
        None => format!("sandbox transcript of {} bytes", data.len()),
    };
    Ok(envelope::ok(json!({"text": text})))
}

const VOICES: &[(&str, &str, &str, &str)] = &[
    ("7426720361733046281", "Sandbox Xiaomei", "zh", "Chinese"),
    ("7426720361733046282", "Sandbox Dawei", "zh", "Chinese"),
    ("7426720361733046283", "Sandbox Emma", "en-US", "English"),
    ("7426720361733046284", "Sandbox Oliver", "en-US", "English"),
    ("7426720361733046285", "Sandbox Yui", "ja", "Japanese"),
];

#[derive(Deserialize)]
struct VoiceQuery {
    filter_system_voice: Option<bool>,
    model_type: Option<String>,
    voice_state: Option<String>,
    page_num: Option<usize>,
    page_size: Option<usize>,
}

async fn voices(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(vq): Query<VoiceQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let page_num = vq.page_num.unwrap_or(1).max(1);
    let page_size = vq.page_size.unwrap_or(100).clamp(1, 100);
    // The sandbox has only system voices, all "big" model, state "cloned" (usable).
    let all: Vec<Value> = if vq.filter_system_voice.unwrap_or(false)
        || vq.model_type.as_deref().is_some_and(|m| m != "big")
        || vq
            .voice_state
            .as_deref()
            .is_some_and(|s| s != "all" && s != "cloned")
    {
        Vec::new()
    } else {
        VOICES
            .iter()
            .map(|(id, name, code, lang)| {
                json!({
                    "voice_id": id, "name": name, "state": "cloned", "model_type": "big",
                    "is_system_voice": true, "language_code": code, "language_name": lang,
                    "preview_text": "Hello from the sandbox.",
                    "preview_audio": format!("https://sandbox.invalid/voices/{id}.wav"),
                    "create_time": 1_735_689_600, "update_time": 1_735_689_600,
                    "support_emotions": [], "available_training_times": 0,
                })
            })
            .collect()
    };
    let start = (page_num - 1) * page_size;
    let page: Vec<Value> = all.iter().skip(start).take(page_size).cloned().collect();
    let has_more = all.len() > start + page_size;
    Ok(envelope::ok(
        json!({"has_more": has_more, "voice_list": page}),
    ))
}

async fn rooms(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    str_field(&b, "bot_id").ok_or_else(|| ApiError::bad_request("bot_id is required"))?;
    let uid = str_field(&b, "uid")
        .map(str::to_owned)
        .unwrap_or_else(|| st.next_id());
    let room_id = st.next_id();
    Ok(envelope::ok(json!({
        "room_id": room_id,
        "app_id": "sandbox-rtc-app",
        "token": format!("sandbox-rtc-token-{room_id}"),
        "uid": uid,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_length_follows_duration() {
        assert_eq!(synth_pcm16(1000, 24000, 1).len(), 48000);
        let wav = wav_from_pcm16(&synth_pcm16(500, 16000, 1), 16000, 1);
        assert_eq!(wav.len(), 44 + 16000);
        assert_eq!(&wav[0..4], b"RIFF");
    }

    #[test]
    fn wav_duration_is_read_from_header() {
        let wav = wav_from_pcm16(&synth_pcm16(1500, 16000, 1), 16000, 1);
        assert_eq!(wav_duration_ms(&wav), Some(1500.0));
        assert_eq!(wav_duration_ms(b"not a wav"), None);
    }

    #[test]
    fn duration_scales_with_text_and_speed() {
        assert_eq!(speech_duration_ms("hello world", 1.0), 600);
        assert_eq!(speech_duration_ms("hello world", 2.0), 300);
        assert_eq!(speech_duration_ms("", 1.0), 200);
    }
}
