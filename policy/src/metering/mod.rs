//! Incremental usage meters: what a device consumed, read from the bytes that pass through.
//!
//! Every meter here is pure: it is fed byte slices exactly as they arrive from the network (any
//! chunking), keeps a small fixed amount of state between calls, and answers with a [`Usage`].
//! No meter reads a clock, touches a socket or allocates on the per-chunk path. Splitting the same
//! byte stream at any offsets gives the same [`Usage`], and garbage input gives an error value,
//! never a panic.
//!
//! | protocol | meter | counts |
//! |---|---|---|
//! | SSE (`/v3/chat`, `/v1/workflow/stream_run`, `/v1/workflows/chat`) | [`SseMeter`] | tokens from `conversation.chat.completed`/`failed` and workflow `Message.usage`, `audio_out_ms` from `conversation.audio.delta` |
//! | WebSocket (`/v1/chat`, `/v1/audio/speech`, `/v1/audio/transcriptions`) | [`WsSessionMeter`] over two [`WsFrameParser`]s | `audio_in_ms`, `audio_out_ms`, `tts_chars`, tokens |
//! | REST | [`rest`] functions and [`SpeechResponseMeter`] | workflow `usage`, TTS `input` chars and returned audio, ASR upload duration |
//!
//! # Units
//!
//! Tokens are the platform's LLM tokens. Audio is whole milliseconds of *media time*, computed
//! from the decoded size of base64 audio (never by decoding it) and the session's audio format.
//! Sub-millisecond remainders are carried (bytes are accumulated per format and converted when
//! read), so ten thousand 1.5 ms frames are 15 000 ms, not 10 000. TTS characters are Unicode
//! scalar values of the submitted text.
//!
//! # WebSocket: boundaries and `permessage-deflate`
//!
//! [`WsFrameParser`] reports frame and message boundaries ([`FeedOutcome`],
//! [`WsFrameParser::at_frame_boundary`], [`WsFrameParser::at_message_boundary`]) so the gateway
//! injects a close frame only between frames and an `error` event only between messages, and it
//! reports received close frames (code and reason).
//!
//! The gateway strips `Sec-WebSocket-Extensions` from the upgrade request, so
//! `permessage-deflate` is never negotiated and payloads are always plain JSON. A frame with
//! RSV1 set is reported as [`WsError::CompressedFrame`] ("compressed frame on a session that
//! did not negotiate it") instead of being metered on wire bytes: compressed payload cannot be
//! read, and accepting it would let a client hide usage.
//!
//! # Approximation
//!
//! Token counts are the platform's own. Audio durations are exact for PCM and G.711 (up to a
//! WAV header counted as audio) and estimated for Opus (per packet) and MP3 (constant bit
//! rate); see [`WsSessionMeter`], [`SseMeter`] and [`SpeechResponseMeter`] for the rules.
//!
//! # What is not metered here
//!
//! Request counts and wall-clock session time (`voice_session_ms`) need a clock and belong to the
//! gateway. Non-streaming `POST /v3/chat` carries no usage (it returns `status: in_progress`
//! immediately; usage appears only in a later `/v3/chat/retrieve`), so the gateway charges the
//! admission estimate for it ([`rest::chat_retrieve_usage`] reads a retrieve answer's usage).

mod frame;
mod json_scan;
pub mod rest;
mod sse;
mod ws;

pub use frame::{CloseFrame, FeedOutcome, FrameHeader, Opcode, WsError, WsFrameParser};
pub use json_scan::JsonError;
pub use rest::{RestMeterError, SpeechFormat, SpeechRequest, SpeechResponseMeter};
pub use sse::{SseError, SseMeter};
pub use ws::{
    AudioCodec, Direction, InputAudioFormat, OutputAudioFormat, WsMeterPolicy, WsSessionMeter,
};

use serde::{Deserialize, Serialize};

/// What a device consumed, as counted by one meter (or the sum of several).
///
/// All counters saturate instead of overflowing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// LLM input (prompt) tokens reported by the platform.
    pub llm_input_tokens: u64,
    /// LLM output (completion) tokens reported by the platform.
    pub llm_output_tokens: u64,
    /// Milliseconds of audio sent by the device (ASR / voice input).
    pub audio_in_ms: u64,
    /// Milliseconds of audio sent to the device (TTS / voice output).
    pub audio_out_ms: u64,
    /// Characters (Unicode scalar values) submitted for speech synthesis.
    pub tts_chars: u64,
    /// How many usage-bearing events were seen (`conversation.chat.completed` with `usage`,
    /// workflow `Message` with `usage`, a REST body with `usage`). Zero after a stream that
    /// should have reported usage means "settle with an estimate and raise the metric".
    pub usage_events: u64,
    /// A terminal event was seen: `conversation.chat.completed`/`failed`/`requires_action`,
    /// `done`, workflow `Done`/`Error`/`Interrupt`, a stream-level `error`; on WebSocket, the
    /// last unit of work (chat turn, TTS request, ASR utterance) reached its terminal event.
    pub completed: bool,
}

impl Usage {
    /// Add `other` into `self` (saturating). `completed` is or-ed.
    pub fn add(&mut self, other: &Usage) {
        self.llm_input_tokens = self.llm_input_tokens.saturating_add(other.llm_input_tokens);
        self.llm_output_tokens = self
            .llm_output_tokens
            .saturating_add(other.llm_output_tokens);
        self.audio_in_ms = self.audio_in_ms.saturating_add(other.audio_in_ms);
        self.audio_out_ms = self.audio_out_ms.saturating_add(other.audio_out_ms);
        self.tts_chars = self.tts_chars.saturating_add(other.tts_chars);
        self.usage_events = self.usage_events.saturating_add(other.usage_events);
        self.completed |= other.completed;
    }

    /// Input plus output tokens.
    pub fn llm_total_tokens(&self) -> u64 {
        self.llm_input_tokens.saturating_add(self.llm_output_tokens)
    }

    /// Nothing billable was counted (flags ignored).
    pub fn is_zero(&self) -> bool {
        self.llm_input_tokens == 0
            && self.llm_output_tokens == 0
            && self.audio_in_ms == 0
            && self.audio_out_ms == 0
            && self.tts_chars == 0
    }
}

impl core::ops::AddAssign for Usage {
    fn add_assign(&mut self, rhs: Usage) {
        self.add(&rhs);
    }
}

impl core::ops::Add for Usage {
    type Output = Usage;
    fn add(mut self, rhs: Usage) -> Usage {
        Usage::add(&mut self, &rhs);
        self
    }
}

/// How a chunk of encoded audio converts to media time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioRate {
    /// Constant byte rate (PCM, G.711, CBR MP3): `ms = bytes * 1000 / bytes_per_second`.
    BytesPerSecond(core::num::NonZeroU64),
    /// Packetised audio (Opus): every chunk is one packet of this many microseconds.
    PerPacket {
        /// Duration of one packet in microseconds.
        micros: u64,
    },
}

/// PCM 24 kHz, 16-bit, mono: the fixed format of SSE `conversation.audio.delta`.
pub(crate) const PCM_24K_MONO_S16: AudioRate = match core::num::NonZeroU64::new(48_000) {
    Some(n) => AudioRate::BytesPerSecond(n),
    None => AudioRate::PerPacket { micros: 0 },
};

/// Accumulates audio duration without losing sub-millisecond remainders.
///
/// Bytes of the current constant-rate format are summed and converted only when read; when the
/// rate changes the pending bytes are folded into microseconds (losing < 1 µs per change).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AudioClock {
    micros: u64,
    pending_bytes: u64,
    bytes_per_sec: u64,
}

impl AudioClock {
    pub(crate) fn add(&mut self, rate: AudioRate, decoded_bytes: u64) {
        match rate {
            AudioRate::BytesPerSecond(bps) => {
                if bps.get() != self.bytes_per_sec {
                    self.flush();
                    self.bytes_per_sec = bps.get();
                }
                self.pending_bytes = self.pending_bytes.saturating_add(decoded_bytes);
            }
            AudioRate::PerPacket { micros } => {
                self.micros = self.micros.saturating_add(micros);
            }
        }
    }

    fn pending_micros(&self) -> u64 {
        if self.bytes_per_sec == 0 {
            return 0;
        }
        let us = u128::from(self.pending_bytes) * 1_000_000 / u128::from(self.bytes_per_sec);
        u64::try_from(us).unwrap_or(u64::MAX)
    }

    fn flush(&mut self) {
        self.micros = self.micros.saturating_add(self.pending_micros());
        self.pending_bytes = 0;
    }

    pub(crate) fn millis(&self) -> u64 {
        self.micros.saturating_add(self.pending_micros()) / 1000
    }
}

#[cfg(test)]
mod tests;
