//! Audio formats of the WebSocket APIs: parsing `input_audio` / `output_audio` configs, metering
//! uplink audio and producing downlink audio frames.
//!
//! # Input (`input_audio`)
//! Defaults as Coze documents them: `format` wav, `codec` pcm, `sample_rate` 24000, `channel` 1,
//! `bit_depth` 16. Uplink audio is counted, never stored. Its duration:
//! - pcm: `bytes / (sample_rate × channel × bit_depth/8)`; a chunk starting with `RIFF` has its
//!   44-byte WAV header skipped;
//! - g711a / g711u: 8 kHz, one byte per sample and channel, whatever `sample_rate` says;
//! - opus: each `append` is one Opus packet (RFC 6716), its duration read from the TOC byte
//!   (frame size × frame count). With `format: ogg` the page structure is not parsed and the
//!   duration is estimated at 16 kbit/s.
//!
//! # Output (`output_audio`)
//! `codec` pcm (default) | g711a | g711u | opus. The audio is a quiet sine tone
//! ([`crate::audio::synth_pcm16`]), as long as [`crate::audio::speech_duration_ms`] of the reply
//! text at the speed given by `speech_rate` (−50..100 → 0.5×..2×).
//! - pcm: 16-bit LE mono at `pcm_config.sample_rate` (default 24000), frames of
//!   `pcm_config.frame_size_ms` (default 100 ms; clamped to 10..1000);
//! - g711a / g711u: real G.711 A-law / µ-law, 8 kHz mono, one byte per sample, same framing;
//! - opus: **not decodable**. Each frame is one opaque pseudo-packet of `opus_config.frame_size_ms`
//!   (default 10; 2.5/5/10/20/40/60) whose first byte is a valid Opus TOC (CELT fullband; code 0,
//!   or code 3 with 2 or 3 20 ms frames for 40/60 ms) so the duration can be metered like real
//!   Opus, followed by filler bytes for `bitrate` (default 48000) × frame duration, at least 3
//!   bytes in all.
//!
//! `limit_config {period, max_frame_num}` (in `pcm_config` or `opus_config`) spaces frames at
//! least `period / max_frame_num` apart, in realtime mode or not.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::audio::synth_pcm16;

const PCM_RATES: [u32; 7] = [8000, 16000, 22050, 24000, 32000, 44100, 48000];
const OPUS_RATES: [u32; 5] = [8000, 12000, 16000, 24000, 48000];
const OPUS_FRAMES_US: [u64; 6] = [2_500, 5_000, 10_000, 20_000, 40_000, 60_000];

fn get_str<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

fn get_u64(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, String> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{k} must be a positive integer")),
    }
}

fn get_f64(m: &Map<String, Value>, k: &str) -> Result<Option<f64>, String> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("{k} must be a number")),
    }
}

fn obj<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Map<String, Value>> {
    m.get(k).and_then(Value::as_object)
}

/// Uplink audio codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InCodec {
    Pcm,
    Opus,
    G711a,
    G711u,
}

/// The effective `input_audio` of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct InputFormat {
    pub format: String,
    pub codec: InCodec,
    pub sample_rate: u32,
    pub channel: u16,
    pub bit_depth: u16,
}

impl Default for InputFormat {
    fn default() -> Self {
        Self {
            format: "wav".into(),
            codec: InCodec::Pcm,
            sample_rate: 24000,
            channel: 1,
            bit_depth: 16,
        }
    }
}

impl InputFormat {
    /// From a (merged) `input_audio` object; missing fields take the defaults.
    pub fn from_config(m: &Map<String, Value>) -> Result<Self, String> {
        let d = Self::default();
        let format = get_str(m, "format").unwrap_or(&d.format).to_owned();
        if !["pcm", "wav", "ogg"].contains(&format.as_str()) {
            return Err(format!("unsupported input_audio.format: {format}"));
        }
        let codec = match get_str(m, "codec").unwrap_or("pcm") {
            "pcm" => InCodec::Pcm,
            "opus" => InCodec::Opus,
            "g711a" => InCodec::G711a,
            "g711u" => InCodec::G711u,
            c => return Err(format!("unsupported input_audio.codec: {c}")),
        };
        let sample_rate = get_u64(m, "sample_rate")?.map_or(Ok(d.sample_rate), |r| {
            u32::try_from(r)
                .ok()
                .filter(|r| PCM_RATES.contains(r))
                .ok_or(format!("unsupported input_audio.sample_rate: {r}"))
        })?;
        let channel = match get_u64(m, "channel")? {
            None => 1,
            Some(c @ (1 | 2)) => c as u16,
            Some(c) => return Err(format!("unsupported input_audio.channel: {c}")),
        };
        let bit_depth = match get_u64(m, "bit_depth")? {
            None => 16,
            Some(b @ (8 | 16 | 24)) => b as u16,
            Some(b) => return Err(format!("unsupported input_audio.bit_depth: {b}")),
        };
        Ok(Self {
            format,
            codec,
            sample_rate,
            channel,
            bit_depth,
        })
    }

    /// The effective config as sent back in `*.updated` (every field present).
    pub fn to_json(&self) -> Value {
        let codec = match self.codec {
            InCodec::Pcm => "pcm",
            InCodec::Opus => "opus",
            InCodec::G711a => "g711a",
            InCodec::G711u => "g711u",
        };
        json!({
            "format": self.format,
            "codec": codec,
            "sample_rate": self.sample_rate,
            "channel": self.channel,
            "bit_depth": self.bit_depth,
        })
    }

    /// Microseconds of audio in one appended chunk.
    pub fn duration_us(&self, chunk: &[u8]) -> u64 {
        let channels = u64::from(self.channel);
        match self.codec {
            InCodec::G711a | InCodec::G711u => chunk.len() as u64 * 1_000_000 / (8000 * channels),
            InCodec::Opus if self.format == "ogg" => chunk.len() as u64 * 8 * 1_000_000 / 16_000,
            InCodec::Opus => opus_packet_duration_us(chunk),
            InCodec::Pcm => {
                let body = if chunk.len() >= 44 && chunk.starts_with(b"RIFF") {
                    &chunk[44..]
                } else {
                    chunk
                };
                let bytes_per_s =
                    u64::from(self.sample_rate) * channels * u64::from(self.bit_depth) / 8;
                body.len() as u64 * 1_000_000 / bytes_per_s.max(1)
            }
        }
    }
}

/// Bytes and duration of uplink audio received since the buffer was last emptied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputMeter {
    pub bytes: u64,
    pub micros: u64,
    pub chunks: u64,
}

impl InputMeter {
    pub fn add(&mut self, fmt: &InputFormat, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        self.micros += fmt.duration_us(chunk);
        self.chunks += 1;
    }
    pub fn seconds(&self) -> f64 {
        self.micros as f64 / 1e6
    }
    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }
}

/// Downlink audio codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutCodec {
    Pcm,
    G711a,
    G711u,
    Opus,
}

/// The effective `output_audio` of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputFormat {
    pub codec: OutCodec,
    /// PCM sample rate (8000 for G.711; the Opus config's rate for Opus).
    pub sample_rate: u32,
    /// Audio per frame.
    pub frame_us: u64,
    pub bitrate: u32,
    /// Speech speed factor from `speech_rate`.
    pub speed: f64,
    /// Minimum spacing between frames from `limit_config`.
    pub min_interval: Option<Duration>,
}

impl Default for OutputFormat {
    fn default() -> Self {
        Self {
            codec: OutCodec::Pcm,
            sample_rate: 24000,
            frame_us: 100_000,
            bitrate: 48000,
            speed: 1.0,
            min_interval: None,
        }
    }
}

fn limit_interval(m: Option<&Map<String, Value>>) -> Result<Option<Duration>, String> {
    let Some(l) = m.and_then(|m| obj(m, "limit_config")) else {
        return Ok(None);
    };
    match (get_u64(l, "period")?, get_u64(l, "max_frame_num")?) {
        (Some(p), Some(n)) if p > 0 && n > 0 => Ok(Some(Duration::from_millis(p * 1000 / n))),
        (None, None) => Ok(None),
        _ => Err("limit_config needs positive period and max_frame_num".into()),
    }
}

impl OutputFormat {
    /// From a (merged) `output_audio` object; `codecs` lists what the endpoint supports.
    pub fn from_config(m: &Map<String, Value>, codecs: &[&str]) -> Result<Self, String> {
        let codec_s = get_str(m, "codec").unwrap_or("pcm");
        if !codecs.contains(&codec_s) {
            return Err(format!("unsupported output_audio.codec: {codec_s}"));
        }
        let codec = match codec_s {
            "g711a" => OutCodec::G711a,
            "g711u" => OutCodec::G711u,
            "opus" => OutCodec::Opus,
            _ => OutCodec::Pcm,
        };
        let speed = match get_f64(m, "speech_rate")? {
            None => 1.0,
            Some(r) if (-50.0..=100.0).contains(&r) => 1.0 + r / 100.0,
            Some(r) => return Err(format!("speech_rate out of range -50..100: {r}")),
        };
        let pcm = obj(m, "pcm_config");
        let opus = obj(m, "opus_config");
        let mut f = Self {
            codec,
            speed,
            ..Self::default()
        };
        match codec {
            OutCodec::Pcm | OutCodec::G711a | OutCodec::G711u => {
                let rate = match pcm
                    .map(|p| get_u64(p, "sample_rate"))
                    .transpose()?
                    .flatten()
                {
                    None => 24000,
                    Some(r) => u32::try_from(r)
                        .ok()
                        .filter(|r| PCM_RATES.contains(r))
                        .ok_or(format!("unsupported pcm_config.sample_rate: {r}"))?,
                };
                f.sample_rate = if codec == OutCodec::Pcm { rate } else { 8000 };
                if let Some(ms) = pcm
                    .map(|p| get_f64(p, "frame_size_ms"))
                    .transpose()?
                    .flatten()
                    && ms > 0.0
                {
                    f.frame_us = (ms.round().clamp(10.0, 1000.0) as u64) * 1000;
                }
                f.min_interval = limit_interval(pcm)?;
            }
            OutCodec::Opus => {
                if let Some(r) = opus
                    .map(|p| get_u64(p, "sample_rate"))
                    .transpose()?
                    .flatten()
                {
                    f.sample_rate = u32::try_from(r)
                        .ok()
                        .filter(|r| OPUS_RATES.contains(r))
                        .ok_or(format!("unsupported opus_config.sample_rate: {r}"))?;
                }
                f.frame_us = 10_000;
                if let Some(ms) = opus
                    .map(|p| get_f64(p, "frame_size_ms"))
                    .transpose()?
                    .flatten()
                {
                    let us = (ms * 1000.0).round() as u64;
                    if !OPUS_FRAMES_US.contains(&us) {
                        return Err(format!("unsupported opus_config.frame_size_ms: {ms}"));
                    }
                    f.frame_us = us;
                }
                if let Some(b) = opus.map(|p| get_u64(p, "bitrate")).transpose()?.flatten() {
                    f.bitrate = u32::try_from(b.clamp(6000, 510_000)).unwrap_or(48000);
                }
                f.min_interval = limit_interval(opus)?;
            }
        }
        Ok(f)
    }

    /// The effective config as echoed in `*.updated`: the client's fields plus the effective
    /// codec, rates and frame sizes.
    pub fn to_json(&self, raw: &Map<String, Value>) -> Value {
        let mut m = raw.clone();
        let codec = match self.codec {
            OutCodec::Pcm => "pcm",
            OutCodec::G711a => "g711a",
            OutCodec::G711u => "g711u",
            OutCodec::Opus => "opus",
        };
        m.insert("codec".into(), json!(codec));
        let frame_ms = self.frame_us as f64 / 1000.0;
        match self.codec {
            OutCodec::Opus => {
                let mut o = obj(&m, "opus_config").cloned().unwrap_or_default();
                o.insert("sample_rate".into(), json!(self.sample_rate));
                o.insert("bitrate".into(), json!(self.bitrate));
                o.insert("frame_size_ms".into(), json!(frame_ms));
                o.entry("use_cbr").or_insert(json!(false));
                m.insert("opus_config".into(), Value::Object(o));
            }
            _ => {
                let mut p = obj(&m, "pcm_config").cloned().unwrap_or_default();
                p.insert("sample_rate".into(), json!(self.sample_rate));
                p.insert("frame_size_ms".into(), json!(frame_ms));
                m.insert("pcm_config".into(), Value::Object(p));
            }
        }
        m.entry("speech_rate").or_insert(json!(0));
        Value::Object(m)
    }

    /// The frame durations (µs) of `total_ms` of audio: full frames and a shorter last one
    /// (Opus rounds up to whole packets).
    pub fn plan(&self, total_ms: u64) -> FramePlan {
        let total = total_ms * 1000;
        let total = if self.codec == OutCodec::Opus {
            total.div_ceil(self.frame_us) * self.frame_us
        } else {
            total
        };
        FramePlan {
            total_us: total,
            frame_us: self.frame_us,
            sent_us: 0,
        }
    }

    /// The frame encoder of this format for a session with `seed`.
    pub fn source(&self, seed: u64) -> FrameSource {
        // The tone's frequency is a multiple of 10 Hz, so 100 ms hold whole cycles: one encoded
        // period, sliced cyclically, gives continuous audio at any frame size without
        // re-synthesising per frame.
        let period = match self.codec {
            OutCodec::Pcm => synth_pcm16(100, self.sample_rate, seed),
            OutCodec::G711a => pcm16_to(&synth_pcm16(100, 8000, seed), linear_to_alaw),
            OutCodec::G711u => pcm16_to(&synth_pcm16(100, 8000, seed), linear_to_ulaw),
            OutCodec::Opus => Vec::new(),
        };
        FrameSource {
            format: self.clone(),
            period,
        }
    }

    /// How long to wait after sending a frame of `dur_us` in realtime mode (or `limit_config`).
    pub fn interval(&self, dur_us: u64, realtime: bool) -> Duration {
        let base = if realtime {
            Duration::from_micros(dur_us)
        } else {
            Duration::ZERO
        };
        self.min_interval.map_or(base, |m| m.max(base))
    }

    /// Microseconds of audio in an encoded frame (what a client decoding it would play).
    pub fn duration_of(&self, bytes: &[u8]) -> u64 {
        match self.codec {
            OutCodec::Pcm => bytes.len() as u64 / 2 * 1_000_000 / u64::from(self.sample_rate),
            OutCodec::G711a | OutCodec::G711u => bytes.len() as u64 * 1_000_000 / 8000,
            OutCodec::Opus => opus_packet_duration_us(bytes),
        }
    }
}

/// Progress through the frames of one audio reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramePlan {
    pub total_us: u64,
    pub frame_us: u64,
    pub sent_us: u64,
}

impl FramePlan {
    /// Start and duration (µs) of the next frame, `None` when done.
    pub fn next_frame(&mut self) -> Option<(u64, u64)> {
        let left = self.total_us.saturating_sub(self.sent_us);
        if left == 0 {
            return None;
        }
        let start = self.sent_us;
        let d = left.min(self.frame_us);
        self.sent_us += d;
        Some((start, d))
    }
}

/// Encodes the frames of one session's output (see [`OutputFormat::source`]).
#[derive(Clone, Debug)]
pub struct FrameSource {
    format: OutputFormat,
    /// 100 ms of encoded tone (empty for Opus).
    period: Vec<u8>,
}

impl FrameSource {
    /// The encoded bytes of the frame covering `start_us .. start_us + dur_us` of the reply.
    pub fn frame(&self, start_us: u64, dur_us: u64) -> Vec<u8> {
        let f = &self.format;
        let (rate, width) = match f.codec {
            OutCodec::Opus => return opus_pseudo_packet(dur_us, f.bitrate),
            OutCodec::Pcm => (u64::from(f.sample_rate), 2),
            OutCodec::G711a | OutCodec::G711u => (8000, 1),
        };
        let first = start_us * rate / 1_000_000;
        let end = (start_us + dur_us) * rate / 1_000_000;
        let period_len = self.period.len() / width;
        let mut out = Vec::with_capacity((end - first) as usize * width);
        if period_len == 0 {
            return out;
        }
        let mut at = (first as usize % period_len) * width;
        let mut need = (end - first) as usize * width;
        while need > 0 {
            let take = need.min(self.period.len() - at);
            out.extend_from_slice(&self.period[at..at + take]);
            need -= take;
            at = 0;
        }
        out
    }
}

fn pcm16_to(pcm: &[u8], enc: fn(i16) -> u8) -> Vec<u8> {
    pcm.chunks_exact(2)
        .map(|s| enc(i16::from_le_bytes([s[0], s[1]])))
        .collect()
}

const SEG_AEND: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];
const SEG_UEND: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];

/// G.711 A-law encoding of one 16-bit sample (ITU-T G.711, Sun reference implementation).
pub fn linear_to_alaw(sample: i16) -> u8 {
    let mut v = i32::from(sample) >> 3;
    let mask = if v >= 0 {
        0xD5
    } else {
        v = -v - 1;
        0x55
    };
    let Some(seg) = SEG_AEND.iter().position(|&end| v <= end) else {
        return (0x7F ^ mask) as u8;
    };
    let quant = if seg < 2 {
        (v >> 1) & 0xF
    } else {
        (v >> seg) & 0xF
    };
    (((seg as i32) << 4 | quant) ^ mask) as u8
}

/// G.711 A-law decoding.
pub fn alaw_to_linear(a: u8) -> i16 {
    let a = a ^ 0x55;
    let mut t = i32::from(a & 0x0F) << 4;
    let seg = (a & 0x70) >> 4;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => t = (t + 0x108) << (seg - 1),
    }
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

/// G.711 µ-law encoding of one 16-bit sample (Sun reference implementation, 14-bit input).
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut v = i32::from(sample) >> 2;
    let mask = if v < 0 {
        v = -v;
        0x7F
    } else {
        0xFF
    };
    v = v.min(8159) + (0x84 >> 2);
    let Some(seg) = SEG_UEND.iter().position(|&end| v <= end) else {
        return (0x7F ^ mask) as u8;
    };
    ((((seg as i32) << 4) | ((v >> (seg + 1)) & 0xF)) ^ mask) as u8
}

/// G.711 µ-law decoding.
pub fn ulaw_to_linear(u: u8) -> i16 {
    let u = !u;
    let t = ((i32::from(u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

/// Duration of an Opus packet from its TOC byte (RFC 6716 §3.1); 0 for an empty packet.
pub fn opus_packet_duration_us(pkt: &[u8]) -> u64 {
    let Some(&toc) = pkt.first() else { return 0 };
    let config = usize::from(toc >> 3);
    let frame_us = match config {
        0..=11 => [10_000, 20_000, 40_000, 60_000][config % 4],
        12..=15 => [10_000, 20_000][config % 2],
        _ => [2_500, 5_000, 10_000, 20_000][config % 4],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => pkt.get(1).map_or(0, |b| u64::from(b & 0x3F)),
    };
    frame_us * frames
}

/// An opaque Opus-shaped packet: a CELT fullband TOC for `dur_us`, then filler for `bitrate`.
fn opus_pseudo_packet(dur_us: u64, bitrate: u32) -> Vec<u8> {
    let len = (u64::from(bitrate) * dur_us / 8_000_000).max(3) as usize;
    let mut p = vec![0xA5u8; len];
    let (toc, count) = match dur_us {
        2_500 => (28 << 3, None),
        5_000 => (29 << 3, None),
        10_000 => (30 << 3, None),
        20_000 => (31 << 3, None),
        d => ((31 << 3) | 3, Some((d / 20_000) as u8)),
    };
    p[0] = toc;
    if let Some(n) = count {
        p[1] = n & 0x3F; // CBR, no padding
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g711_round_trips_within_quantisation() {
        for s in [
            -32768i16, -20000, -1000, -1, 0, 1, 5, 1000, 3000, 20000, 32767,
        ] {
            let a = alaw_to_linear(linear_to_alaw(s));
            let u = ulaw_to_linear(linear_to_ulaw(s));
            let tol = (i32::from(s).abs() / 16).max(16);
            assert!(
                (i32::from(a) - i32::from(s)).abs() <= tol,
                "alaw {s} -> {a}"
            );
            assert!(
                (i32::from(u) - i32::from(s)).abs() <= tol.max(40),
                "ulaw {s} -> {u}"
            );
        }
        // Well-known code points: silence.
        assert_eq!(linear_to_alaw(0), 0xD5);
        assert_eq!(linear_to_ulaw(0), 0xFF);
    }

    #[test]
    fn input_durations_follow_format() {
        let pcm16k = InputFormat {
            sample_rate: 16000,
            format: "pcm".into(),
            ..Default::default()
        };
        assert_eq!(pcm16k.duration_us(&[0; 640]), 20_000);
        let g711 = InputFormat {
            codec: InCodec::G711a,
            sample_rate: 8000,
            ..Default::default()
        };
        assert_eq!(g711.duration_us(&[0; 160]), 20_000);
        let opus = InputFormat {
            codec: InCodec::Opus,
            format: "pcm".into(),
            ..Default::default()
        };
        assert_eq!(opus.duration_us(&[31 << 3, 1, 2]), 20_000);
        assert_eq!(opus.duration_us(&[(31 << 3) | 3, 3, 2]), 60_000);
    }

    #[test]
    fn output_frames_cover_the_duration() {
        let cfg = serde_json::json!({"codec": "opus", "opus_config": {"frame_size_ms": 60}});
        let f = OutputFormat::from_config(cfg.as_object().unwrap_or(&Map::new()), &["pcm", "opus"]);
        let f = f.unwrap_or_default();
        assert_eq!(f.frame_us, 60_000);
        let pkt = f.source(1).frame(0, 60_000);
        assert_eq!(f.duration_of(&pkt), 60_000);
        let mut plan = OutputFormat::default().plan(250);
        let frames: Vec<(u64, u64)> = std::iter::from_fn(|| plan.next_frame()).collect();
        assert_eq!(
            frames,
            vec![(0, 100_000), (100_000, 100_000), (200_000, 50_000)]
        );
    }

    #[test]
    fn sliced_frames_equal_continuous_synthesis() {
        for (codec, rate) in [("pcm", 24000), ("pcm", 22050), ("g711u", 8000)] {
            let cfg = serde_json::json!({"codec": codec, "pcm_config": {"sample_rate": rate, "frame_size_ms": 30}});
            let f = OutputFormat::from_config(
                cfg.as_object().unwrap_or(&Map::new()),
                &["pcm", "g711u"],
            )
            .unwrap_or_default();
            let src = f.source(3);
            let mut plan = f.plan(1234);
            let mut joined = Vec::new();
            while let Some((start, dur)) = plan.next_frame() {
                joined.extend(src.frame(start, dur));
            }
            let rate = if codec == "pcm" { rate } else { 8000 };
            let whole = synth_pcm16(1234, rate, 3);
            let decode: Vec<i32> = if codec == "pcm" {
                joined
                    .chunks_exact(2)
                    .map(|s| i32::from(i16::from_le_bytes([s[0], s[1]])))
                    .collect()
            } else {
                joined
                    .iter()
                    .map(|&u| i32::from(ulaw_to_linear(u)))
                    .collect()
            };
            let want: Vec<i32> = whole
                .chunks_exact(2)
                .map(|s| i32::from(i16::from_le_bytes([s[0], s[1]])))
                .collect();
            assert_eq!(decode.len(), want.len(), "{codec} {rate}");
            // Float rounding (±1) and, for µ-law, quantisation.
            let tol = if codec == "pcm" { 1 } else { 120 };
            let worst = decode
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .max()
                .unwrap_or(0);
            assert!(worst <= tol, "{codec} {rate}: off by {worst}");
        }
    }
}
