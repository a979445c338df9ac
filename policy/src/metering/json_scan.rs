//! A tiny incremental JSON scanner that extracts only the facts the meters need.
//!
//! It is fed arbitrary slices of one JSON value (an SSE `data:` payload or a WebSocket text
//! message) and keeps a fixed amount of state between calls: a container bit-stack (64 levels),
//! the keys of the first [`MAX_KEY_DEPTH`] levels, a 24-byte key buffer, and a [`Facts`] record.
//! It never allocates and never stores a string value it does not need: long base64 audio
//! deltas are *counted* (base64 data characters and Unicode scalar values) as they stream by.
//!
//! The scanner validates structure (brackets, colons, commas, escapes, literals) well enough to
//! refuse garbage, but it is not a full validator: it does not reject raw control characters
//! inside strings or leading zeros in numbers. The platform rejects such input anyway.

use memchr::memchr2;

/// How many levels of object keys are remembered; deeper values are never interesting.
pub(crate) const MAX_KEY_DEPTH: usize = 4;
/// Deepest nesting accepted before the input is declared garbage.
const MAX_DEPTH: u8 = 64;

/// Why a JSON payload could not be scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// A byte that cannot appear at this point of a JSON value.
    #[error("unexpected byte 0x{byte:02x} in JSON payload")]
    UnexpectedByte {
        /// The offending byte.
        byte: u8,
    },
    /// Nesting deeper than the scanner tracks (64 levels).
    #[error("JSON nesting deeper than 64 levels")]
    TooDeep,
    /// A backslash escape that JSON does not define.
    #[error("invalid escape sequence in JSON string")]
    BadEscape,
    /// A bare word that is not `true`, `false` or `null`.
    #[error("invalid JSON literal")]
    BadLiteral,
    /// The payload ended before the value was complete.
    #[error("JSON payload ended early")]
    Truncated,
}

/// Object keys the meters look for. Everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Key {
    #[default]
    Other,
    Data,
    EventType,
    Delta,
    Content,
    Text,
    Usage,
    InputCount,
    OutputCount,
    TokenCount,
    InputTokens,
    OutputTokens,
    InputAudio,
    OutputAudio,
    Format,
    Codec,
    SampleRate,
    Channel,
    BitDepth,
    PcmConfig,
    OpusConfig,
    Mp3Config,
    FrameSizeMs,
    BitRate,
    NodeExecuteUuid,
    NodeId,
    NodeTitle,
    NodeIsFinish,
}

impl Key {
    fn from_bytes(b: &[u8]) -> Self {
        match b {
            b"data" => Self::Data,
            b"event_type" => Self::EventType,
            b"delta" => Self::Delta,
            b"content" => Self::Content,
            b"text" => Self::Text,
            b"usage" => Self::Usage,
            b"input_count" => Self::InputCount,
            b"output_count" => Self::OutputCount,
            b"token_count" => Self::TokenCount,
            b"input_tokens" => Self::InputTokens,
            b"output_tokens" => Self::OutputTokens,
            b"input_audio" => Self::InputAudio,
            b"output_audio" => Self::OutputAudio,
            b"format" => Self::Format,
            b"codec" => Self::Codec,
            b"sample_rate" => Self::SampleRate,
            b"channel" => Self::Channel,
            b"bit_depth" => Self::BitDepth,
            b"pcm_config" => Self::PcmConfig,
            b"opus_config" => Self::OpusConfig,
            b"mp3_config" => Self::Mp3Config,
            b"frame_size_ms" => Self::FrameSizeMs,
            b"bit_rate" => Self::BitRate,
            b"node_execute_uuid" => Self::NodeExecuteUuid,
            b"node_id" => Self::NodeId,
            b"node_title" => Self::NodeTitle,
            b"node_is_finish" => Self::NodeIsFinish,
            _ => Self::Other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CountSlot {
    Delta,
    Content,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CapSlot {
    EventType,
    InFormat,
    InCodec,
    OutCodec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumSlot {
    InputCount,
    OutputCount,
    TokenCount,
    InputTokens,
    OutputTokens,
    InSampleRate,
    InChannel,
    InBitDepth,
    OutPcmRate,
    OutOpusFrame,
    OutMp3BitRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HashSlot {
    ExecuteUuid,
    NodeId,
    NodeTitle,
}

/// What to do with the value at the current path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Count(CountSlot),
    Capture(CapSlot),
    Num(NumSlot),
    Hash(HashSlot),
    NodeIsFinish,
}

/// Map a key path (keys of the enclosing objects, outermost first) to a field of interest.
///
/// Paths are written for the WebSocket envelope `{"event_type", "data": {...}}`; the SSE meter
/// scans its `data:` payload with a virtual `data` prefix so the same table applies.
fn classify(path: &[Key]) -> Option<Field> {
    use Key as K;
    let f = match path {
        [K::EventType] => Field::Capture(CapSlot::EventType),
        [K::Data, K::Delta] => Field::Count(CountSlot::Delta),
        [K::Data, K::Content] => Field::Count(CountSlot::Content),
        [K::Data, K::Text] => Field::Count(CountSlot::Text),
        [K::Data, K::Usage, k] => Field::Num(match k {
            K::InputCount => NumSlot::InputCount,
            K::OutputCount => NumSlot::OutputCount,
            K::TokenCount => NumSlot::TokenCount,
            K::InputTokens => NumSlot::InputTokens,
            K::OutputTokens => NumSlot::OutputTokens,
            _ => return None,
        }),
        [K::Data, K::InputAudio, k] => match k {
            K::Format => Field::Capture(CapSlot::InFormat),
            K::Codec => Field::Capture(CapSlot::InCodec),
            K::SampleRate => Field::Num(NumSlot::InSampleRate),
            K::Channel => Field::Num(NumSlot::InChannel),
            K::BitDepth => Field::Num(NumSlot::InBitDepth),
            _ => return None,
        },
        [K::Data, K::OutputAudio, K::Codec] => Field::Capture(CapSlot::OutCodec),
        [K::Data, K::OutputAudio, K::PcmConfig, K::SampleRate] => Field::Num(NumSlot::OutPcmRate),
        [K::Data, K::OutputAudio, K::OpusConfig, K::FrameSizeMs] => {
            Field::Num(NumSlot::OutOpusFrame)
        }
        [K::Data, K::OutputAudio, K::Mp3Config, K::BitRate] => Field::Num(NumSlot::OutMp3BitRate),
        [K::Data, K::NodeExecuteUuid] => Field::Hash(HashSlot::ExecuteUuid),
        [K::Data, K::NodeId] => Field::Hash(HashSlot::NodeId),
        [K::Data, K::NodeTitle] => Field::Hash(HashSlot::NodeTitle),
        [K::Data, K::NodeIsFinish] => Field::NodeIsFinish,
        _ => return None,
    };
    Some(f)
}

/// A short captured string (event names, codec names). Longer values are marked overflowed and
/// never match anything.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SmallStr<const N: usize> {
    buf: [u8; N],
    len: usize,
    overflow: bool,
    present: bool,
}

impl<const N: usize> Default for SmallStr<N> {
    fn default() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            overflow: false,
            present: false,
        }
    }
}

impl<const N: usize> SmallStr<N> {
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
        self.present = true;
    }

    pub(crate) fn reset(&mut self) {
        self.len = 0;
        self.overflow = false;
        self.present = false;
    }

    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflow = true,
        }
    }

    fn push(&mut self, b: u8) {
        self.extend(&[b]);
    }

    /// The captured bytes, or `None` if absent or too long to be a name we know.
    pub(crate) fn get(&self) -> Option<&[u8]> {
        if !self.present || self.overflow {
            return None;
        }
        self.buf.get(..self.len)
    }

    /// Whether a value was seen at all (even an overlong one).
    pub(crate) fn is_present(&self) -> bool {
        self.present
    }
}

/// Counts over one string value, in decoded (unescaped) characters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StrCount {
    /// The field appeared (possibly empty).
    pub(crate) present: bool,
    /// Characters from the base64 alphabet (standard or URL-safe), padding excluded.
    pub(crate) b64_chars: u64,
    /// Unicode scalar values.
    pub(crate) scalars: u64,
}

impl StrCount {
    /// Decoded length of the base64 text counted so far: `floor(data_chars * 3 / 4)`. Exact for
    /// padded and unpadded base64 alike, since padding carries no data.
    pub(crate) fn b64_decoded_bytes(&self) -> u64 {
        self.b64_chars.saturating_mul(3) / 4
    }
}

/// Token counts found under `usage` (values as found; `None` if absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UsageFacts {
    pub(crate) input_count: Option<u64>,
    pub(crate) output_count: Option<u64>,
    pub(crate) token_count: Option<u64>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
}

impl UsageFacts {
    /// `(input, output)` tokens, or `None` if no usage counter was present.
    ///
    /// `input_count`/`output_count` win over the `*_tokens` spellings. Without an output count,
    /// `token_count - input` is output (so a lone `token_count` counts entirely as output).
    pub(crate) fn tokens(&self) -> Option<(u64, u64)> {
        let input = self.input_count.or(self.input_tokens);
        let output = self.output_count.or(self.output_tokens);
        if input.is_none() && output.is_none() && self.token_count.is_none() {
            return None;
        }
        let i = input.unwrap_or(0);
        let o = match output {
            Some(o) => o,
            None => self.token_count.map_or(0, |t| t.saturating_sub(i)),
        };
        Some((i, o))
    }
}

/// Everything the meters may want from one JSON value. Numbers are kept in thousandths
/// (fixed point) so `frame_size_ms: 2.5` survives.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Facts {
    pub(crate) event_type: SmallStr<48>,
    pub(crate) delta: StrCount,
    pub(crate) content: StrCount,
    pub(crate) text: StrCount,
    pub(crate) usage: UsageFacts,
    pub(crate) in_format: SmallStr<8>,
    pub(crate) in_codec: SmallStr<8>,
    pub(crate) in_sample_rate: Option<u64>,
    pub(crate) in_channel: Option<u64>,
    pub(crate) in_bit_depth: Option<u64>,
    pub(crate) out_codec: SmallStr<8>,
    pub(crate) out_pcm_rate: Option<u64>,
    /// Thousandths of a millisecond (i.e. microseconds).
    pub(crate) out_opus_frame_us: Option<u64>,
    pub(crate) out_mp3_bit_rate: Option<u64>,
    pub(crate) node_execute_uuid: Option<u64>,
    pub(crate) node_id: Option<u64>,
    pub(crate) node_title: Option<u64>,
    pub(crate) node_is_finish: Option<bool>,
}

impl Facts {
    fn count_mut(&mut self, slot: CountSlot) -> &mut StrCount {
        match slot {
            CountSlot::Delta => &mut self.delta,
            CountSlot::Content => &mut self.content,
            CountSlot::Text => &mut self.text,
        }
    }

    fn cap_mut(&mut self, slot: CapSlot) -> Cap<'_> {
        match slot {
            CapSlot::EventType => Cap::Long(&mut self.event_type),
            CapSlot::InFormat => Cap::Short(&mut self.in_format),
            CapSlot::InCodec => Cap::Short(&mut self.in_codec),
            CapSlot::OutCodec => Cap::Short(&mut self.out_codec),
        }
    }

    fn set_num(&mut self, slot: NumSlot, milli: u64) {
        let whole = milli / 1000;
        match slot {
            NumSlot::InputCount => self.usage.input_count = Some(whole),
            NumSlot::OutputCount => self.usage.output_count = Some(whole),
            NumSlot::TokenCount => self.usage.token_count = Some(whole),
            NumSlot::InputTokens => self.usage.input_tokens = Some(whole),
            NumSlot::OutputTokens => self.usage.output_tokens = Some(whole),
            NumSlot::InSampleRate => self.in_sample_rate = Some(whole),
            NumSlot::InChannel => self.in_channel = Some(whole),
            NumSlot::InBitDepth => self.in_bit_depth = Some(whole),
            NumSlot::OutPcmRate => self.out_pcm_rate = Some(whole),
            NumSlot::OutOpusFrame => self.out_opus_frame_us = Some(milli),
            NumSlot::OutMp3BitRate => self.out_mp3_bit_rate = Some(whole),
        }
    }

    fn set_hash(&mut self, slot: HashSlot, h: u64) {
        match slot {
            HashSlot::ExecuteUuid => self.node_execute_uuid = Some(h),
            HashSlot::NodeId => self.node_id = Some(h),
            HashSlot::NodeTitle => self.node_title = Some(h),
        }
    }
}

enum Cap<'a> {
    Long(&'a mut SmallStr<48>),
    Short(&'a mut SmallStr<8>),
}

impl Cap<'_> {
    fn clear(self) {
        match self {
            Cap::Long(s) => s.clear(),
            Cap::Short(s) => s.clear(),
        }
    }
    fn extend(self, b: &[u8]) {
        match self {
            Cap::Long(s) => s.extend(b),
            Cap::Short(s) => s.extend(b),
        }
    }
}

/// Byte classes for counting: bit 0 = base64 data character, bit 1 = starts a scalar value.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0u8;
        if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'-' || b == b'_' {
            c |= 1;
        }
        if b & 0xC0 != 0x80 {
            c |= 2;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Base64 data characters and UTF-8 scalar values in a string span: the meters count audio
/// and text this way, so it runs over every byte of every audio payload. Blocks of 64 bytes
/// are counted with branch-free byte arithmetic into `u8` sums, which the compiler turns into
/// SIMD; the tail uses the [`CLASS`] table. `count_span_table` is the reference it is tested
/// against.
fn count_span(span: &[u8]) -> (u64, u64) {
    const BLOCK: usize = 64;
    let mut b64 = 0u64;
    let mut scalars = 0u64;
    let mut blocks = span.chunks_exact(BLOCK);
    for block in &mut blocks {
        // At most 64 per block: fits a u8.
        let (mut nb, mut ns) = (0u8, 0u8);
        for &b in block {
            nb += u8::from(is_b64(b));
            // Starts a scalar value: not a continuation byte (0b10xx_xxxx).
            ns += u8::from(b & 0xC0 != 0x80);
        }
        b64 += u64::from(nb);
        scalars += u64::from(ns);
    }
    let (tb, ts) = count_span_table(blocks.remainder());
    (b64 + tb, scalars + ts)
}

/// `[A-Za-z0-9+/_-]`, branch-free (`|` on bools, not `||`) so that it vectorises.
#[inline(always)]
fn is_b64(b: u8) -> bool {
    let lower = b | 0x20;
    (lower.wrapping_sub(b'a') < 26)
        | (b.wrapping_sub(b'0') < 10)
        | (b == b'+')
        | (b == b'/')
        | (b == b'-')
        | (b == b'_')
}

fn count_span_table(span: &[u8]) -> (u64, u64) {
    let mut b64 = 0u64;
    let mut scalars = 0u64;
    for &b in span {
        let c = CLASS[usize::from(b)];
        b64 += u64::from(c & 1);
        scalars += u64::from(c >> 1);
    }
    (b64, scalars)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Incremental number accumulator producing a fixed-point value in thousandths.
#[derive(Debug, Clone, Copy, Default)]
struct NumAcc {
    mant: u64,
    frac_digits: i32,
    dropped_int_digits: i32,
    exp: i32,
    exp_neg: bool,
    neg: bool,
    /// 0 integer part, 1 fraction, 2 exponent sign allowed, 3 exponent digits.
    phase: u8,
    digits: bool,
}

impl NumAcc {
    fn is_num_byte(b: u8) -> bool {
        matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
    }

    fn push(&mut self, b: u8) -> bool {
        match b {
            b'0'..=b'9' => {
                let d = u64::from(b - b'0');
                match self.phase {
                    0 | 1 => {
                        self.digits = true;
                        if self.mant <= (u64::MAX - 9) / 10 {
                            self.mant = self.mant * 10 + d;
                            if self.phase == 1 {
                                self.frac_digits += 1;
                            }
                        } else if self.phase == 0 {
                            self.dropped_int_digits += 1;
                        }
                    }
                    _ => {
                        self.phase = 3;
                        self.exp = (self.exp * 10 + i32::from(b - b'0')).min(10_000);
                    }
                }
                true
            }
            b'-' if self.phase == 0 && !self.digits && !self.neg => {
                self.neg = true;
                true
            }
            b'-' | b'+' if self.phase == 2 => {
                self.exp_neg = b == b'-';
                self.phase = 3;
                true
            }
            b'.' if self.phase == 0 && self.digits => {
                self.phase = 1;
                true
            }
            b'e' | b'E' if self.phase <= 1 && self.digits => {
                self.phase = 2;
                true
            }
            _ => false,
        }
    }

    fn milli(&self) -> Option<u64> {
        if !self.digits || self.phase == 2 {
            return None;
        }
        if self.neg {
            return Some(0);
        }
        let exp = if self.exp_neg { -self.exp } else { self.exp };
        let e10 = 3 + self.dropped_int_digits + exp - self.frac_digits;
        if e10 >= 0 {
            let scale = 10u64.checked_pow(e10.unsigned_abs());
            Some(match scale {
                Some(s) => self.mant.saturating_mul(s),
                None if self.mant == 0 => 0,
                None => u64::MAX,
            })
        } else {
            Some(
                10u64
                    .checked_pow(e10.unsigned_abs())
                    .map_or(0, |s| self.mant / s),
            )
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Expecting a value.
    Value,
    /// After `[`: a value or `]`.
    ArrValueOrEnd,
    /// After `{`: a key or `}`.
    ObjKeyOrEnd,
    /// After `,` in an object: a key.
    ObjKey,
    /// Inside a key string.
    Key,
    /// After a key: `:`.
    Colon,
    /// Inside a value string.
    Str,
    /// Inside a number.
    Num,
    /// Inside `true`/`false`/`null`.
    Lit,
    /// After a value inside a container: `,` or the closing bracket.
    AfterValue,
    /// The root value is complete; only whitespace may follow.
    Done,
    /// Garbage was seen; everything else is ignored.
    Failed,
}

/// The scanner. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct JsonScanner {
    st: St,
    depth: u8,
    base: u8,
    base_key: Key,
    /// Bit `d - 1` set: the container at depth `d` is an array.
    arrays: u64,
    keys: [Key; MAX_KEY_DEPTH],
    key_buf: SmallStr<24>,
    key_tracked: bool,
    target: Option<Field>,
    /// 0: none, 1: after `\`, 2..=5: that many hex digits + 2 read after `\u`.
    esc: u8,
    hex: u32,
    hash: u64,
    num: NumAcc,
    lit: SmallStr<5>,
    error: Option<JsonError>,
    facts: Facts,
}

impl JsonScanner {
    /// A scanner for a WebSocket envelope: the root object has `event_type` and `data`.
    pub(crate) fn envelope() -> Self {
        Self::with_base(0, Key::Other)
    }

    /// A scanner for a payload that *is* the `data` object (SSE `data:` lines, REST bodies).
    pub(crate) fn data_payload() -> Self {
        Self::with_base(1, Key::Data)
    }

    fn with_base(base: u8, base_key: Key) -> Self {
        let mut s = Self {
            st: St::Value,
            depth: base,
            base,
            base_key,
            arrays: 0,
            keys: [Key::Other; MAX_KEY_DEPTH],
            key_buf: SmallStr::default(),
            key_tracked: false,
            target: None,
            esc: 0,
            hex: 0,
            hash: FNV_OFFSET,
            num: NumAcc::default(),
            lit: SmallStr::default(),
            error: None,
            facts: Facts::default(),
        };
        s.reset();
        s
    }

    /// Forget everything and expect a new value.
    pub(crate) fn reset(&mut self) {
        self.st = St::Value;
        self.depth = self.base;
        self.arrays = 0;
        self.keys = [Key::Other; MAX_KEY_DEPTH];
        if self.base == 1
            && let Some(k) = self.keys.first_mut()
        {
            *k = self.base_key;
        }
        self.target = None;
        self.esc = 0;
        self.error = None;
        self.facts = Facts::default();
    }

    /// `Ok` if exactly one complete value was seen, the error otherwise.
    pub(crate) fn outcome(&self) -> Result<&Facts, JsonError> {
        match (self.st, self.error) {
            (_, Some(e)) => Err(e),
            (St::Done, None) => Ok(&self.facts),
            (St::Num, None) if self.depth == self.base => {
                // A bare number at the root ends at end of input.
                Ok(&self.facts)
            }
            _ => Err(JsonError::Truncated),
        }
    }

    fn fail(&mut self, e: JsonError) {
        self.st = St::Failed;
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Feed the next slice of the value.
    pub(crate) fn feed(&mut self, mut input: &[u8]) {
        while let Some((&b, rest)) = input.split_first() {
            match self.st {
                St::Str | St::Key => {
                    if self.esc != 0 {
                        self.escape_byte(b);
                        input = rest;
                        continue;
                    }
                    match memchr2(b'"', b'\\', input) {
                        None => {
                            self.string_span(input);
                            return;
                        }
                        Some(i) => {
                            let (span, tail) = input.split_at(i);
                            self.string_span(span);
                            let Some((&c, after)) = tail.split_first() else {
                                return;
                            };
                            if c == b'"' {
                                self.end_string();
                            } else {
                                self.esc = 1;
                            }
                            input = after;
                        }
                    }
                }
                St::Num => {
                    if NumAcc::is_num_byte(b) {
                        if !self.num.push(b) {
                            self.fail(JsonError::UnexpectedByte { byte: b });
                            return;
                        }
                        input = rest;
                    } else {
                        self.end_number();
                    }
                }
                St::Lit => {
                    if b.is_ascii_lowercase() {
                        self.lit.push(b);
                        input = rest;
                    } else {
                        self.end_literal();
                    }
                }
                St::Failed => return,
                _ => {
                    self.structural(b);
                    input = rest;
                }
            }
        }
    }

    /// Signal end of input: completes a trailing root-level number or literal.
    pub(crate) fn finish(&mut self) {
        match self.st {
            St::Num if self.depth == self.base => self.end_number(),
            St::Lit if self.depth == self.base => self.end_literal(),
            _ => {}
        }
    }

    fn structural(&mut self, b: u8) {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return;
        }
        match self.st {
            St::Value | St::ArrValueOrEnd => {
                if self.st == St::ArrValueOrEnd && b == b']' {
                    self.close();
                    return;
                }
                self.begin_value(b);
            }
            St::ObjKeyOrEnd | St::ObjKey => {
                if b == b'"' {
                    self.begin_key();
                } else if b == b'}' && self.st == St::ObjKeyOrEnd {
                    self.close();
                } else {
                    self.fail(JsonError::UnexpectedByte { byte: b });
                }
            }
            St::Colon => {
                if b == b':' {
                    self.st = St::Value;
                } else {
                    self.fail(JsonError::UnexpectedByte { byte: b });
                }
            }
            St::AfterValue => {
                let in_array = self.top_is_array();
                match (b, in_array) {
                    (b',', true) => self.st = St::Value,
                    (b',', false) => self.st = St::ObjKey,
                    (b']', true) | (b'}', false) => self.close(),
                    _ => self.fail(JsonError::UnexpectedByte { byte: b }),
                }
            }
            St::Done => self.fail(JsonError::UnexpectedByte { byte: b }),
            St::Key | St::Str | St::Num | St::Lit | St::Failed => {}
        }
    }

    /// The key slot of the innermost container, if it is tracked.
    fn key_slot_mut(&mut self) -> Option<&mut Key> {
        let i = usize::from(self.depth).checked_sub(1)?;
        self.keys.get_mut(i)
    }

    fn top_is_array(&self) -> bool {
        self.depth > 0 && (self.arrays >> (self.depth - 1)) & 1 == 1
    }

    fn path_field(&self) -> Option<Field> {
        let d = usize::from(self.depth);
        if d == 0 || d > MAX_KEY_DEPTH || self.top_is_array() {
            return None;
        }
        self.keys.get(..d).and_then(classify)
    }

    fn begin_value(&mut self, b: u8) {
        match b {
            b'{' | b'[' => {
                if self.depth >= MAX_DEPTH {
                    self.fail(JsonError::TooDeep);
                    return;
                }
                let is_array = b == b'[';
                if is_array {
                    self.arrays |= 1 << self.depth;
                } else {
                    self.arrays &= !(1 << self.depth);
                }
                self.depth += 1;
                if let Some(k) = self.key_slot_mut() {
                    *k = Key::Other;
                }
                self.st = if is_array {
                    St::ArrValueOrEnd
                } else {
                    St::ObjKeyOrEnd
                };
            }
            b'"' => {
                self.target = self.path_field();
                match self.target {
                    Some(Field::Count(slot)) => self.facts.count_mut(slot).present = true,
                    Some(Field::Capture(slot)) => self.facts.cap_mut(slot).clear(),
                    Some(Field::Hash(_)) => self.hash = FNV_OFFSET,
                    _ => {}
                }
                self.esc = 0;
                self.st = St::Str;
            }
            b'-' | b'0'..=b'9' => {
                self.target = self.path_field();
                self.num = NumAcc::default();
                self.num.push(b);
                self.st = St::Num;
            }
            b't' | b'f' | b'n' => {
                self.target = self.path_field();
                self.lit.clear();
                self.lit.push(b);
                self.st = St::Lit;
            }
            _ => self.fail(JsonError::UnexpectedByte { byte: b }),
        }
    }

    fn begin_key(&mut self) {
        self.key_tracked = usize::from(self.depth) <= MAX_KEY_DEPTH;
        self.key_buf.clear();
        self.esc = 0;
        self.st = St::Key;
    }

    fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        self.value_done();
    }

    fn value_done(&mut self) {
        self.target = None;
        self.st = if self.depth <= self.base {
            St::Done
        } else {
            St::AfterValue
        };
    }

    fn string_span(&mut self, span: &[u8]) {
        if span.is_empty() {
            return;
        }
        if self.st == St::Key {
            if self.key_tracked {
                self.key_buf.extend(span);
            }
            return;
        }
        match self.target {
            None | Some(Field::Num(_)) | Some(Field::NodeIsFinish) => {}
            Some(Field::Count(slot)) => {
                let (b64, sc) = count_span(span);
                let c = self.facts.count_mut(slot);
                c.b64_chars = c.b64_chars.saturating_add(b64);
                c.scalars = c.scalars.saturating_add(sc);
            }
            Some(Field::Capture(slot)) => self.facts.cap_mut(slot).extend(span),
            Some(Field::Hash(_)) => self.hash = fnv(self.hash, span),
        }
    }

    /// One decoded character from an escape sequence.
    fn string_char(&mut self, cp: u32) {
        let ascii = u8::try_from(cp).ok().filter(u8::is_ascii);
        if self.st == St::Key {
            if self.key_tracked {
                self.key_buf.push(ascii.unwrap_or(0xFF));
            }
            return;
        }
        match self.target {
            None | Some(Field::Num(_)) | Some(Field::NodeIsFinish) => {}
            Some(Field::Count(slot)) => {
                let c = self.facts.count_mut(slot);
                let class = ascii.map_or(2, |a| CLASS[usize::from(a)]);
                c.b64_chars = c.b64_chars.saturating_add(u64::from(class & 1));
                // A low surrogate completes a pair whose high half was already counted.
                if !(0xDC00..=0xDFFF).contains(&cp) {
                    c.scalars = c.scalars.saturating_add(1);
                }
            }
            Some(Field::Capture(slot)) => self.facts.cap_mut(slot).extend(&[ascii.unwrap_or(0xFF)]),
            Some(Field::Hash(_)) => self.hash = fnv(self.hash, &cp.to_le_bytes()),
        }
    }

    fn escape_byte(&mut self, b: u8) {
        if self.esc == 1 {
            let cp = match b {
                b'u' => {
                    self.esc = 2;
                    self.hex = 0;
                    return;
                }
                b'"' | b'\\' | b'/' => u32::from(b),
                b'b' => 8,
                b'f' => 12,
                b'n' => 10,
                b'r' => 13,
                b't' => 9,
                _ => {
                    self.fail(JsonError::BadEscape);
                    return;
                }
            };
            self.esc = 0;
            self.string_char(cp);
            return;
        }
        let Some(v) = char::from(b).to_digit(16) else {
            self.fail(JsonError::BadEscape);
            return;
        };
        self.hex = (self.hex << 4) | v;
        self.esc += 1;
        if self.esc == 6 {
            self.esc = 0;
            self.string_char(self.hex);
        }
    }

    fn end_string(&mut self) {
        if self.st == St::Key {
            if self.key_tracked {
                let k = self.key_buf.get().map_or(Key::Other, Key::from_bytes);
                if let Some(slot) = self.key_slot_mut() {
                    *slot = k;
                }
            }
            self.st = St::Colon;
            return;
        }
        if let Some(Field::Hash(slot)) = self.target {
            self.facts.set_hash(slot, self.hash);
        }
        self.value_done();
    }

    fn end_number(&mut self) {
        match self.num.milli() {
            Some(v) => {
                if let Some(Field::Num(slot)) = self.target {
                    self.facts.set_num(slot, v);
                }
                self.value_done();
            }
            None => self.fail(JsonError::BadLiteral),
        }
    }

    fn end_literal(&mut self) {
        let v = match self.lit.get() {
            Some(b"true") => Some(true),
            Some(b"false") => Some(false),
            Some(b"null") => None,
            _ => {
                self.fail(JsonError::BadLiteral);
                return;
            }
        };
        if self.target == Some(Field::NodeIsFinish) {
            self.facts.node_is_finish = v;
        }
        self.value_done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The block-wise count equals the byte table's for any bytes and any length
        /// (blocks plus tail).
        #[test]
        fn count_span_matches_the_table(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(count_span(&bytes), count_span_table(&bytes));
        }
    }

    #[test]
    fn count_span_counts_every_byte_value() {
        let all: Vec<u8> = (0..=255u8).collect();
        // 66 base64 characters (A-Z a-z 0-9 + / - _) and 128 + 64 scalar starts.
        assert_eq!(count_span(&all), (66, 192));
        assert_eq!(count_span(&all), count_span_table(&all));
    }

    fn scan_env(s: &str) -> JsonScanner {
        let mut j = JsonScanner::envelope();
        j.feed(s.as_bytes());
        j.finish();
        j
    }

    #[test]
    fn envelope_facts() {
        let j = scan_env(
            r#"{"data":{"delta":"QUJD","x":[1,{"delta":"zz"}],"usage":{"input_count":12,"token_count":20}},"event_type":"input_audio_buffer.append"}"#,
        );
        let f = j.outcome().unwrap();
        assert_eq!(f.event_type.get(), Some(&b"input_audio_buffer.append"[..]));
        assert_eq!(f.delta.b64_chars, 4);
        assert_eq!(f.delta.b64_decoded_bytes(), 3);
        assert_eq!(f.usage.tokens(), Some((12, 8)));
    }

    #[test]
    fn escapes_and_scalars() {
        let j = scan_env(
            r#"{"event_type":"a\u002eb","data":{"text":"h\u00e9\ud83d\ude00\"x","delta":"QQ\u003d\u003d"}}"#,
        );
        let f = j.outcome().unwrap();
        assert_eq!(f.event_type.get(), Some(&b"a.b"[..]));
        assert_eq!(f.text.scalars, 5);
        assert_eq!(f.delta.b64_chars, 2);
        assert_eq!(f.delta.b64_decoded_bytes(), 1);
    }

    #[test]
    fn numbers_fixed_point() {
        let j = scan_env(
            r#"{"data":{"output_audio":{"opus_config":{"frame_size_ms":2.5},"pcm_config":{"sample_rate":1.6e4}}}}"#,
        );
        let f = j.outcome().unwrap();
        assert_eq!(f.out_opus_frame_us, Some(2500));
        assert_eq!(f.out_pcm_rate, Some(16000));
    }

    #[test]
    fn garbage_is_error() {
        for g in [
            "{]",
            "{\"a\" 1}",
            "[1,,]",
            "tru",
            "{\"a\":\"\\q\"}",
            "{} x",
            "{\"a\":1",
        ] {
            let j = scan_env(g);
            assert!(j.outcome().is_err(), "{g}");
        }
        let deep = "[".repeat(100);
        assert_eq!(scan_env(&deep).outcome().err(), Some(JsonError::TooDeep));
    }
}
