//! [`WsSessionMeter`]: usage from the Coze WebSocket APIs (`/v1/chat`, `/v1/audio/speech`,
//! `/v1/audio/transcriptions`), both directions of one session.

use core::num::NonZeroU64;

use super::frame::{FeedOutcome, MessageSink, Opcode, WsError, WsFrameParser};
use super::json_scan::{Facts, JsonError, JsonScanner};
use super::{AudioClock, AudioRate, Usage};

/// Direction of a WebSocket byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device → platform (client frames, masked).
    Uplink,
    /// Platform → device (server frames, unmasked).
    Downlink,
}

/// Audio codecs named in `input_audio.codec` / `output_audio.codec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioCodec {
    /// Linear PCM, little-endian.
    Pcm,
    /// G.711 A-law: 8 kHz, 8 bits per sample.
    G711a,
    /// G.711 µ-law: 8 kHz, 8 bits per sample.
    G711u,
    /// Opus packets.
    Opus,
    /// MP3 (output only).
    Mp3,
}

impl AudioCodec {
    fn parse(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"pcm" => Self::Pcm,
            b"g711a" => Self::G711a,
            b"g711u" => Self::G711u,
            b"opus" => Self::Opus,
            b"mp3" => Self::Mp3,
            _ => return None,
        })
    }
}

/// Settings for the parts of WebSocket metering that must be estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsMeterPolicy {
    /// Media time credited per uplink `input_audio_buffer.append` when the input codec is Opus,
    /// in microseconds. Default 20 000 (20 ms, the usual Opus/Ogg packet duration).
    pub input_opus_packet_us: u64,
    /// Bit rate assumed for MP3 output when `mp3_config.bit_rate` is not set. Default 128 000.
    pub mp3_default_bit_rate: u32,
}

impl Default for WsMeterPolicy {
    fn default() -> Self {
        Self {
            input_opus_packet_us: 20_000,
            mp3_default_bit_rate: 128_000,
        }
    }
}

/// The session's input audio format (`chat.update` / `transcriptions.update` `input_audio`).
///
/// Defaults per coze-api §8.4: PCM, 24 000 Hz, 1 channel, 16 bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputAudioFormat {
    /// Codec (`input_audio.codec`; `format: "ogg"` without a codec means Opus).
    pub codec: AudioCodec,
    /// Samples per second.
    pub sample_rate: u32,
    /// Interleaved channels.
    pub channels: u8,
    /// Bits per sample (8, 16, 24).
    pub bit_depth: u8,
}

impl Default for InputAudioFormat {
    fn default() -> Self {
        Self {
            codec: AudioCodec::Pcm,
            sample_rate: 24_000,
            channels: 1,
            bit_depth: 16,
        }
    }
}

fn nz(v: u64) -> AudioRate {
    match NonZeroU64::new(v) {
        Some(n) => AudioRate::BytesPerSecond(n),
        None => AudioRate::PerPacket { micros: 0 },
    }
}

impl InputAudioFormat {
    /// How decoded bytes of this format convert to time.
    ///
    /// # Approximation
    ///
    /// G.711 is always 8 kHz, 8-bit (the configured sample rate is ignored). Opus is counted
    /// per `append` as one packet of [`WsMeterPolicy::input_opus_packet_us`]. A WAV header
    /// sent in the first append counts as audio (44 bytes ≈ 0.9 ms at 24 kHz).
    pub fn rate(&self, policy: &WsMeterPolicy) -> AudioRate {
        let ch = u64::from(self.channels.max(1));
        match self.codec {
            AudioCodec::G711a | AudioCodec::G711u => nz(8_000 * ch),
            AudioCodec::Opus => AudioRate::PerPacket {
                micros: policy.input_opus_packet_us,
            },
            AudioCodec::Pcm | AudioCodec::Mp3 => {
                let bytes = u64::from(self.bit_depth.max(8)).div_ceil(8);
                nz(u64::from(self.sample_rate.max(1)) * ch * bytes)
            }
        }
    }

    fn apply(&mut self, f: &Facts) {
        match f.in_codec.get().and_then(AudioCodec::parse) {
            Some(c) => self.codec = c,
            None if !f.in_codec.is_present() && f.in_format.get() == Some(b"ogg") => {
                self.codec = AudioCodec::Opus;
            }
            None => {}
        }
        if let Some(r) = f.in_sample_rate.filter(|&r| r > 0) {
            self.sample_rate = u32::try_from(r).unwrap_or(u32::MAX);
        }
        if let Some(c) = f.in_channel.filter(|&c| c > 0) {
            self.channels = u8::try_from(c).unwrap_or(u8::MAX);
        }
        if let Some(b) = f.in_bit_depth.filter(|&b| b > 0) {
            self.bit_depth = u8::try_from(b).unwrap_or(u8::MAX);
        }
    }
}

/// The session's output audio format (`output_audio` of `chat.update` / `speech.update`, or the
/// effective config echoed in `chat.updated` / `speech.updated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputAudioFormat {
    /// Codec (default PCM).
    pub codec: AudioCodec,
    /// `pcm_config.sample_rate` (default 24 000); PCM output is mono 16-bit.
    pub pcm_sample_rate: u32,
    /// `opus_config.frame_size_ms` in microseconds (default 10 000).
    pub opus_frame_us: u64,
    /// `mp3_config.bit_rate` in bits per second.
    pub mp3_bit_rate: u32,
}

impl OutputAudioFormat {
    fn with_policy(policy: &WsMeterPolicy) -> Self {
        Self {
            codec: AudioCodec::Pcm,
            pcm_sample_rate: 24_000,
            opus_frame_us: 10_000,
            mp3_bit_rate: policy.mp3_default_bit_rate,
        }
    }

    /// How decoded bytes of this format convert to time.
    ///
    /// # Approximation
    ///
    /// Opus output counts one `frame_size_ms` packet per audio delta event. MP3 assumes a
    /// constant bit rate.
    pub fn rate(&self) -> AudioRate {
        match self.codec {
            AudioCodec::Pcm => nz(u64::from(self.pcm_sample_rate.max(1)) * 2),
            AudioCodec::G711a | AudioCodec::G711u => nz(8_000),
            AudioCodec::Opus => AudioRate::PerPacket {
                micros: self.opus_frame_us,
            },
            AudioCodec::Mp3 => nz((u64::from(self.mp3_bit_rate) / 8).max(1)),
        }
    }

    fn apply(&mut self, f: &Facts) {
        if let Some(c) = f.out_codec.get().and_then(AudioCodec::parse) {
            self.codec = c;
        }
        if let Some(r) = f.out_pcm_rate.filter(|&r| r > 0) {
            self.pcm_sample_rate = u32::try_from(r).unwrap_or(u32::MAX);
        }
        if let Some(us) = f.out_opus_frame_us.filter(|&us| us > 0) {
            self.opus_frame_us = us;
        }
        if let Some(b) = f.out_mp3_bit_rate.filter(|&b| b > 0) {
            self.mp3_bit_rate = u32::try_from(b).unwrap_or(u32::MAX);
        }
    }
}

/// Session-wide counters and formats, shared by both directions.
#[derive(Debug, Clone)]
struct Ledger {
    policy: WsMeterPolicy,
    input: InputAudioFormat,
    output: OutputAudioFormat,
    audio_in: AudioClock,
    audio_out: AudioClock,
    tokens_in: u64,
    tokens_out: u64,
    tts_chars: u64,
    usage_events: u64,
    work_open: bool,
    work_done: bool,
    /// A `/v1/chat` turn was announced (`conversation.chat.created` / `in_progress`) and has
    /// not ended yet.
    chat_turn_open: bool,
    /// Chat turns that ended without a usage-bearing event.
    chat_turns_unreported: u64,
    malformed: u64,
    first_json_error: Option<JsonError>,
}

impl Ledger {
    fn apply(&mut self, dir: Direction, f: &Facts) {
        let Some(ev) = f.event_type.get() else {
            return;
        };
        match (dir, ev) {
            (Direction::Uplink, b"chat.update") => {
                self.input.apply(f);
                self.output.apply(f);
            }
            (Direction::Uplink, b"transcriptions.update") => self.input.apply(f),
            (Direction::Uplink, b"speech.update") => self.output.apply(f),
            (
                Direction::Downlink,
                b"chat.updated" | b"transcriptions.updated" | b"speech.updated",
            ) => {
                self.input.apply(f);
                self.output.apply(f);
            }
            (Direction::Uplink, b"input_audio_buffer.append") if f.delta.b64_chars > 0 => {
                let rate = self.input.rate(&self.policy);
                self.audio_in.add(rate, f.delta.b64_decoded_bytes());
            }
            (Direction::Uplink, b"input_audio_buffer.complete") => self.work_open = true,
            (Direction::Uplink, b"input_text_buffer.append") => {
                self.tts_chars = self.tts_chars.saturating_add(f.delta.scalars);
                self.work_open = true;
            }
            (Direction::Uplink, b"input_text.generate_audio") => {
                self.tts_chars = self.tts_chars.saturating_add(f.text.scalars);
                self.work_open = true;
            }
            (Direction::Downlink, b"conversation.audio.delta") if f.content.b64_chars > 0 => {
                self.audio_out
                    .add(self.output.rate(), f.content.b64_decoded_bytes());
            }
            (Direction::Downlink, b"speech.audio.update") if f.delta.b64_chars > 0 => {
                self.audio_out
                    .add(self.output.rate(), f.delta.b64_decoded_bytes());
            }
            (
                Direction::Downlink,
                b"conversation.chat.completed"
                | b"conversation.chat.failed"
                | b"conversation.chat.requires_action",
            ) => {
                if let Some((i, o)) = f.usage.tokens() {
                    self.tokens_in = self.tokens_in.saturating_add(i);
                    self.tokens_out = self.tokens_out.saturating_add(o);
                    self.usage_events = self.usage_events.saturating_add(1);
                } else {
                    self.unreported_turn();
                }
                self.chat_turn_open = false;
                self.close_work();
            }
            (Direction::Downlink, b"conversation.chat.created") => {
                // A new turn while one is still open: that one ended without its terminal
                // event (no usage will come for it).
                if self.chat_turn_open {
                    self.unreported_turn();
                }
                self.chat_turn_open = true;
                self.work_open = true;
            }
            (Direction::Downlink, b"conversation.chat.in_progress") => {
                // The turn announced by `created`, or a turn continued after
                // `requires_action` (tool outputs submitted).
                self.chat_turn_open = true;
                self.work_open = true;
            }
            (Direction::Downlink, b"conversation.chat.canceled") => {
                // Coze bills a cancelled reply without reporting its usage.
                if self.chat_turn_open {
                    self.unreported_turn();
                }
                self.chat_turn_open = false;
                self.close_work();
            }
            (
                Direction::Downlink,
                b"conversation.audio.completed"
                | b"speech.audio.completed"
                | b"transcriptions.message.completed",
            ) => self.close_work(),
            _ => {}
        }
    }

    fn unreported_turn(&mut self) {
        self.chat_turns_unreported = self.chat_turns_unreported.saturating_add(1);
    }

    fn close_work(&mut self) {
        self.work_open = false;
        self.work_done = true;
    }

    fn usage(&self) -> Usage {
        Usage {
            llm_input_tokens: self.tokens_in,
            llm_output_tokens: self.tokens_out,
            audio_in_ms: self.audio_in.millis(),
            audio_out_ms: self.audio_out.millis(),
            tts_chars: self.tts_chars,
            usage_events: self.usage_events,
            completed: self.work_done && !self.work_open,
        }
    }
}

struct Sink<'a> {
    scanner: &'a mut JsonScanner,
    ledger: &'a mut Ledger,
    dir: Direction,
}

impl MessageSink for Sink<'_> {
    fn message_start(&mut self, opcode: Opcode) -> bool {
        if opcode == Opcode::Text {
            self.scanner.reset();
            true
        } else {
            false
        }
    }

    fn message_payload(&mut self, bytes: &[u8]) {
        self.scanner.feed(bytes);
    }

    fn message_end(&mut self) {
        self.scanner.finish();
        match self.scanner.outcome() {
            Ok(f) => self.ledger.apply(self.dir, f),
            Err(e) => {
                self.ledger.malformed = self.ledger.malformed.saturating_add(1);
                if self.ledger.first_json_error.is_none() {
                    self.ledger.first_json_error = Some(e);
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Side {
    parser: WsFrameParser,
    scanner: JsonScanner,
}

/// Incremental usage meter for one WebSocket session (both directions).
///
/// The gateway feeds each direction's bytes, after the `101` upgrade, as they pass through:
/// [`feed_uplink`](Self::feed_uplink) for device→platform and
/// [`feed_downlink`](Self::feed_downlink) for platform→device. Formats flow between the two:
/// the uplink `chat.update` / `transcriptions.update` / `speech.update` set the input and output
/// audio formats, and the downlink `chat.updated` / `speech.updated` / `transcriptions.updated`
/// echo (the *effective* config) overrides them. Only fields present in an update change the
/// format; absent fields keep their previous value.
///
/// What is counted (direction-checked, so a device cannot forge downlink events):
///
/// | direction | event_type | field | counter |
/// |---|---|---|---|
/// | up | `input_audio_buffer.append` | `data.delta` (base64) | `audio_in_ms` via the input format |
/// | up | `input_text_buffer.append` | `data.delta` (text) | `tts_chars` |
/// | up | `input_text.generate_audio` | `data.text` | `tts_chars` |
/// | down | `conversation.audio.delta` | `data.content` (base64) | `audio_out_ms` via the output format |
/// | down | `speech.audio.update` | `data.delta` (base64) | `audio_out_ms` |
/// | down | `conversation.chat.completed` / `failed` / `requires_action` | `data.usage` | tokens, `usage_events` |
///
/// Text messages are scanned as they stream, including fragmented messages and messages split
/// across chunks; `event_type` may come before or after `data`. Base64 deltas are counted,
/// never buffered or decoded. State is fixed: two frame parsers and two scanners (under 1 KiB
/// in total), plus a 2 KiB stack buffer while unmasking.
///
/// # Approximation
///
/// - Opus: one packet per append/delta event (see [`WsMeterPolicy`], `opus_config`).
/// - Format changes take effect at the message that carries them; audio already in flight in
///   the other direction when the update is seen is counted with the format current when it
///   is parsed.
/// - [`Usage::completed`] means: some unit of work (chat turn, TTS request, ASR utterance)
///   reached its terminal event and none was seen opening after it. The two directions are fed
///   independently, so this is a best-effort signal, not an ordering proof.
/// - Chat turns are told apart by their events, not by chat id: a turn opens at the downlink
///   `conversation.chat.created` (or `in_progress`) and ends at the next terminal event
///   (`completed` / `failed` / `requires_action` / `canceled`) or the next `created`. A turn
///   that ends without `usage`, or is still open when the session ends, is *unreported*
///   ([`unreported_turns`](Self::unreported_turns)): its tokens are unknown, never zero.
///   `conversation.chat.canceled` is one of those: Coze bills the tokens of a cancelled reply
///   but reports none.
/// - A text message that is not valid JSON is not counted; it is tallied in
///   [`malformed_messages`](Self::malformed_messages).
/// - Binary messages are framed but never counted (Coze sends audio as base64 in JSON).
#[derive(Debug, Clone)]
pub struct WsSessionMeter {
    up: Side,
    down: Side,
    ledger: Ledger,
}

impl Default for WsSessionMeter {
    fn default() -> Self {
        Self::new(WsMeterPolicy::default())
    }
}

impl WsSessionMeter {
    /// A meter for a freshly upgraded session.
    pub fn new(policy: WsMeterPolicy) -> Self {
        Self {
            up: Side {
                parser: WsFrameParser::new(Direction::Uplink),
                scanner: JsonScanner::envelope(),
            },
            down: Side {
                parser: WsFrameParser::new(Direction::Downlink),
                scanner: JsonScanner::envelope(),
            },
            ledger: Ledger {
                policy,
                input: InputAudioFormat::default(),
                output: OutputAudioFormat::with_policy(&policy),
                audio_in: AudioClock::default(),
                audio_out: AudioClock::default(),
                tokens_in: 0,
                tokens_out: 0,
                tts_chars: 0,
                usage_events: 0,
                work_open: false,
                work_done: false,
                chat_turn_open: false,
                chat_turns_unreported: 0,
                malformed: 0,
                first_json_error: None,
            },
        }
    }

    /// Feed the next chunk of device→platform bytes.
    ///
    /// # Errors
    /// A framing violation in this direction; the direction stays failed.
    pub fn feed_uplink(&mut self, chunk: &[u8]) -> Result<FeedOutcome, WsError> {
        self.feed(Direction::Uplink, chunk)
    }

    /// Feed the next chunk of platform→device bytes.
    ///
    /// # Errors
    /// A framing violation in this direction; the direction stays failed.
    pub fn feed_downlink(&mut self, chunk: &[u8]) -> Result<FeedOutcome, WsError> {
        self.feed(Direction::Downlink, chunk)
    }

    /// Feed `chunk` in `dir`.
    ///
    /// # Errors
    /// A framing violation in this direction; the direction stays failed.
    pub fn feed(&mut self, dir: Direction, chunk: &[u8]) -> Result<FeedOutcome, WsError> {
        let side = match dir {
            Direction::Uplink => &mut self.up,
            Direction::Downlink => &mut self.down,
        };
        let mut sink = Sink {
            scanner: &mut side.scanner,
            ledger: &mut self.ledger,
            dir,
        };
        side.parser.feed_with(chunk, &mut sink)
    }

    /// The frame parser of one direction (boundaries, close frame, error).
    pub fn parser(&self, dir: Direction) -> &WsFrameParser {
        match dir {
            Direction::Uplink => &self.up.parser,
            Direction::Downlink => &self.down.parser,
        }
    }

    /// The current input audio format.
    pub fn input_format(&self) -> InputAudioFormat {
        self.ledger.input
    }

    /// The current output audio format.
    pub fn output_format(&self) -> OutputAudioFormat {
        self.ledger.output
    }

    /// Text messages that were not valid JSON (not counted).
    pub fn malformed_messages(&self) -> u64 {
        self.ledger.malformed
    }

    /// The first JSON error among malformed messages.
    pub fn first_json_error(&self) -> Option<JsonError> {
        self.ledger.first_json_error
    }

    /// `/v1/chat` turns whose LLM usage was never reported: turns that ended without a
    /// usage-bearing event (`conversation.chat.completed` / `failed` / `requires_action`
    /// without `usage`, `conversation.chat.canceled`, a `conversation.chat.created` that
    /// replaced a turn still open), plus the turn still open now, if any (at the end of a
    /// session: cut by a disconnect, a close or a reset). The gateway charges an estimate for
    /// each (see [`WsSessionMeter`], *Approximation*).
    pub fn unreported_turns(&self) -> u64 {
        self.ledger
            .chat_turns_unreported
            .saturating_add(u64::from(self.ledger.chat_turn_open))
    }

    /// Usage so far (completed messages only).
    pub fn usage(&self) -> Usage {
        self.ledger.usage()
    }

    /// End of session: the total.
    pub fn finish(self) -> Usage {
        self.ledger.usage()
    }
}
