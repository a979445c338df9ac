//! Audio: REST TTS/ASR/voices/rooms, and the synthesis primitives the WebSocket APIs share.
//!
//! Synthesised speech is a deterministic tone whose duration follows from the text:
//! [`speech_duration_ms`] = 60 ms per character (CJK or not) ÷ speed, at least 200 ms.
//! TODO(sandbox): REST routes filled in by the module owner.

use std::sync::Arc;

use axum::Router;

use crate::state::SandboxState;

/// Milliseconds of speech for `text` at `speed` (1.0 = normal).
pub fn speech_duration_ms(text: &str, speed: f64) -> u64 {
    let chars = text.chars().filter(|c| !c.is_whitespace()).count() as f64;
    let speed = if speed.is_finite() && speed > 0.0 { speed } else { 1.0 };
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

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
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
    fn duration_scales_with_text_and_speed() {
        assert_eq!(speech_duration_ms("hello world", 1.0), 600);
        assert_eq!(speech_duration_ms("hello world", 2.0), 300);
        assert_eq!(speech_duration_ms("", 1.0), 200);
    }
}
