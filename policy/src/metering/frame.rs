//! [`WsFrameParser`]: an incremental RFC 6455 frame parser for one direction of a WebSocket.
//!
//! It tracks frame and message boundaries, validates the framing rules a proxy must rely on, and
//! hands unmasked text-message payload to a sink only when the sink asks for it. Memory is fixed:
//! a 14-byte header buffer and a 125-byte close-payload buffer.
//!
//! # `permessage-deflate`
//!
//! The gateway strips `Sec-WebSocket-Extensions` from the upgrade request, so no extension is
//! ever negotiated and every frame must be uncompressed. A frame with RSV1 set is therefore
//! reported as [`WsError::CompressedFrame`] ("compressed frame on a session that did not
//! negotiate it") rather than metered on wire bytes: compressed payload cannot be read for
//! `event_type` or base64 lengths, and accepting it would let a client hide usage.

use super::ws::Direction;

/// WebSocket frame opcodes (RFC 6455 §5.2). Reserved opcodes are an error, not a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// `0x0`: continues a fragmented text or binary message.
    Continuation,
    /// `0x1`: UTF-8 text (the Coze JSON envelope).
    Text,
    /// `0x2`: binary (Coze never sends it; counted as frames, never parsed).
    Binary,
    /// `0x8`: close.
    Close,
    /// `0x9`: ping.
    Ping,
    /// `0xA`: pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Close, ping or pong.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of its message.
    pub fin: bool,
    /// Frame opcode.
    pub opcode: Opcode,
    /// Masking key (client→server frames only).
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
}

/// Framing violations. Once returned, the parser stays failed and returns the same error; the
/// gateway should close the session (1002 protocol error) at the last frame boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// RSV1 set: `permessage-deflate` data on a session that did not negotiate it.
    #[error("compressed frame on a session that did not negotiate permessage-deflate")]
    CompressedFrame,
    /// RSV2 or RSV3 set.
    #[error("reserved frame bits set: {bits:#05b}")]
    ReservedBits {
        /// The three RSV bits.
        bits: u8,
    },
    /// Opcode 0x3–0x7 or 0xB–0xF.
    #[error("reserved opcode {opcode:#x}")]
    ReservedOpcode {
        /// The 4-bit opcode.
        opcode: u8,
    },
    /// A control frame with more than 125 bytes of payload.
    #[error("control frame payload of {len} bytes exceeds 125")]
    ControlFrameTooLong {
        /// Declared payload length.
        len: u64,
    },
    /// A control frame without FIN.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A continuation frame with no fragmented message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text/binary frame while a fragmented message is in progress.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// Client frames must be masked and server frames must not be.
    #[error("mask bit is {masked} on a {direction:?} frame")]
    MaskMismatch {
        /// Direction of the offending frame.
        direction: Direction,
        /// Whether the frame was masked.
        masked: bool,
    },
    /// 64-bit payload length with the most significant bit set.
    #[error("payload length has its most significant bit set")]
    PayloadLengthOverflow,
    /// A frame after a close frame in the same direction.
    #[error("frame after close")]
    FrameAfterClose,
    /// A close payload of 1 byte or with a non-UTF-8 reason.
    #[error("malformed close frame payload")]
    BadClosePayload,
}

impl WsError {
    /// Stable low-cardinality code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::CompressedFrame => "ws_compressed_frame",
            Self::ReservedBits { .. } => "ws_reserved_bits",
            Self::ReservedOpcode { .. } => "ws_reserved_opcode",
            Self::ControlFrameTooLong { .. } => "ws_control_frame_too_long",
            Self::FragmentedControlFrame => "ws_fragmented_control_frame",
            Self::UnexpectedContinuation => "ws_unexpected_continuation",
            Self::ExpectedContinuation => "ws_expected_continuation",
            Self::MaskMismatch { .. } => "ws_mask_mismatch",
            Self::PayloadLengthOverflow => "ws_payload_length_overflow",
            Self::FrameAfterClose => "ws_frame_after_close",
            Self::BadClosePayload => "ws_bad_close_payload",
        }
    }
}

/// A received close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame {
    code: Option<u16>,
    reason: [u8; 123],
    reason_len: u8,
}

impl CloseFrame {
    /// The status code, if the frame had a payload.
    pub fn code(&self) -> Option<u16> {
        self.code
    }

    /// The UTF-8 reason (validated when parsed; empty if none).
    pub fn reason(&self) -> &str {
        self.reason
            .get(..usize::from(self.reason_len))
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    }
}

/// What one [`WsFrameParser::feed`] call saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedOutcome {
    /// Frames completed in this chunk.
    pub frames: u32,
    /// Offset in the chunk just after the last frame completed in it: the last place in this
    /// chunk where the gateway may cut and inject a frame of its own (a close frame).
    pub last_frame_boundary: Option<usize>,
    /// Offset just after the last completed *message* (not inside a fragmented message): the
    /// last place where a data frame (an injected `error` event) may be inserted.
    pub last_message_boundary: Option<usize>,
    /// A close frame completed in this chunk (see [`WsFrameParser::close_frame`]).
    pub close: bool,
}

/// Receives data-message payload from the parser.
pub(crate) trait MessageSink {
    /// A text or binary message starts. Return `true` to receive its (unmasked) payload.
    fn message_start(&mut self, opcode: Opcode) -> bool;
    /// Payload bytes of the current message, unmasked, in order.
    fn message_payload(&mut self, bytes: &[u8]);
    /// The current message is complete (FIN frame finished).
    fn message_end(&mut self);
}

/// A sink that wants nothing: plain framing.
struct NoSink;

impl MessageSink for NoSink {
    fn message_start(&mut self, _: Opcode) -> bool {
        false
    }
    fn message_payload(&mut self, _: &[u8]) {}
    fn message_end(&mut self) {}
}

/// Incremental RFC 6455 frame parser for one direction. See the module docs.
///
/// Uplink (device→platform) frames must be masked and downlink frames must not be.
#[derive(Debug, Clone)]
pub struct WsFrameParser {
    direction: Direction,
    hdr: [u8; 14],
    hdr_len: u8,
    hdr_need: u8,
    in_payload: bool,
    cur: FrameHeader,
    remaining: u64,
    mask_pos: usize,
    /// Opcode of the fragmented data message in progress.
    message: Option<Opcode>,
    wanted: bool,
    close_buf: [u8; 125],
    close_len: u8,
    close: Option<CloseFrame>,
    error: Option<WsError>,
    frames: u64,
}

impl WsFrameParser {
    /// A parser at the start of the stream in `direction`.
    pub fn new(direction: Direction) -> Self {
        Self {
            direction,
            hdr: [0; 14],
            hdr_len: 0,
            hdr_need: 2,
            in_payload: false,
            cur: FrameHeader {
                fin: true,
                opcode: Opcode::Continuation,
                mask: None,
                payload_len: 0,
            },
            remaining: 0,
            mask_pos: 0,
            message: None,
            wanted: false,
            close_buf: [0; 125],
            close_len: 0,
            close: None,
            error: None,
            frames: 0,
        }
    }

    /// Parse the next chunk of this direction's byte stream.
    ///
    /// # Errors
    /// A framing violation ([`WsError`]); the parser then stays failed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<FeedOutcome, WsError> {
        self.feed_with(chunk, &mut NoSink)
    }

    /// No partial frame is buffered: a frame may be injected before the next byte.
    pub fn at_frame_boundary(&self) -> bool {
        self.error.is_none() && !self.in_payload && self.hdr_len == 0
    }

    /// At a frame boundary and not inside a fragmented message.
    pub fn at_message_boundary(&self) -> bool {
        self.at_frame_boundary() && self.message.is_none()
    }

    /// The close frame received in this direction, if any.
    pub fn close_frame(&self) -> Option<&CloseFrame> {
        self.close.as_ref()
    }

    /// Total frames completed.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The sticky error, if the stream is broken.
    pub fn error(&self) -> Option<WsError> {
        self.error
    }

    fn fail(&mut self, e: WsError) -> Result<FeedOutcome, WsError> {
        self.error = Some(e);
        Err(e)
    }

    pub(crate) fn feed_with<S: MessageSink>(
        &mut self,
        chunk: &[u8],
        sink: &mut S,
    ) -> Result<FeedOutcome, WsError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut out = FeedOutcome::default();
        let mut pos = 0usize;
        while let Some(rest) = chunk.get(pos..).filter(|r| !r.is_empty()) {
            if !self.in_payload {
                let have = usize::from(self.hdr_len);
                let need = usize::from(self.hdr_need);
                let take = (need - have).min(rest.len());
                if let (Some(dst), Some(src)) =
                    (self.hdr.get_mut(have..have + take), rest.get(..take))
                {
                    dst.copy_from_slice(src);
                }
                self.hdr_len += take as u8;
                pos += take;
                if self.hdr_len < self.hdr_need {
                    break;
                }
                if self.hdr_len == 2 {
                    if let Err(e) = self.check_first_two() {
                        return self.fail(e);
                    }
                    if self.hdr_need > 2 {
                        continue;
                    }
                }
                if let Err(e) = self.start_frame(sink) {
                    return self.fail(e);
                }
                if self.remaining == 0 {
                    self.end_frame(pos, &mut out, sink)?;
                }
            } else {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(rest.len());
                let data = rest.get(..take).unwrap_or_default();
                self.payload(data, sink);
                self.remaining -= take as u64;
                pos += take;
                if self.remaining == 0 {
                    self.end_frame(pos, &mut out, sink)?;
                }
            }
        }
        Ok(out)
    }

    fn check_first_two(&mut self) -> Result<(), WsError> {
        let [b0, b1, ..] = self.hdr;
        if self.close.is_some() {
            return Err(WsError::FrameAfterClose);
        }
        let rsv = (b0 >> 4) & 0b111;
        if rsv & 0b100 != 0 {
            return Err(WsError::CompressedFrame);
        }
        if rsv != 0 {
            return Err(WsError::ReservedBits { bits: rsv });
        }
        let Some(opcode) = Opcode::from_bits(b0 & 0x0F) else {
            return Err(WsError::ReservedOpcode { opcode: b0 & 0x0F });
        };
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(WsError::FragmentedControlFrame);
            }
            if len7 > 125 {
                return Err(WsError::ControlFrameTooLong {
                    len: u64::from(len7),
                });
            }
        } else if opcode == Opcode::Continuation {
            if self.message.is_none() {
                return Err(WsError::UnexpectedContinuation);
            }
        } else if self.message.is_some() {
            return Err(WsError::ExpectedContinuation);
        }
        if masked != (self.direction == Direction::Uplink) {
            return Err(WsError::MaskMismatch {
                direction: self.direction,
                masked,
            });
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        self.hdr_need = 2 + ext + if masked { 4 } else { 0 };
        Ok(())
    }

    fn start_frame<S: MessageSink>(&mut self, sink: &mut S) -> Result<(), WsError> {
        let h = &self.hdr;
        let [b0, b1, ..] = *h;
        let len7 = b1 & 0x7F;
        let (len, mask_at) = match len7 {
            126 => {
                let [_, _, a, b, ..] = *h;
                (u64::from(u16::from_be_bytes([a, b])), 4)
            }
            127 => {
                let [_, _, a, b, c, d, e, f, g, i, ..] = *h;
                (u64::from_be_bytes([a, b, c, d, e, f, g, i]), 10)
            }
            n => (u64::from(n), 2),
        };
        if len >> 63 != 0 {
            return Err(WsError::PayloadLengthOverflow);
        }
        let mask = if b1 & 0x80 != 0 {
            let mut k = [0u8; 4];
            if let Some(src) = h.get(mask_at..mask_at + 4) {
                k.copy_from_slice(src);
            }
            Some(k)
        } else {
            None
        };
        let opcode = Opcode::from_bits(b0 & 0x0F).unwrap_or(Opcode::Binary);
        self.cur = FrameHeader {
            fin: b0 & 0x80 != 0,
            opcode,
            mask,
            payload_len: len,
        };
        self.remaining = len;
        self.mask_pos = 0;
        self.in_payload = true;
        match opcode {
            Opcode::Text | Opcode::Binary => {
                self.message = Some(opcode);
                self.wanted = sink.message_start(opcode);
            }
            Opcode::Close => self.close_len = 0,
            _ => {}
        }
        Ok(())
    }

    fn payload<S: MessageSink>(&mut self, data: &[u8], sink: &mut S) {
        if self.cur.opcode == Opcode::Close {
            let at = usize::from(self.close_len);
            if let Some(dst) = self.close_buf.get_mut(at..at + data.len()) {
                dst.copy_from_slice(data);
                self.close_len += data.len() as u8;
            }
        } else if self.cur.opcode.is_control() || !self.wanted {
            self.mask_pos = (self.mask_pos + data.len()) & 3;
            return;
        } else if let Some(key) = self.cur.mask {
            unmask_to(key, self.mask_pos, data, |b| sink.message_payload(b));
        } else {
            sink.message_payload(data);
        }
        self.mask_pos = (self.mask_pos + data.len()) & 3;
    }

    fn end_frame<S: MessageSink>(
        &mut self,
        pos: usize,
        out: &mut FeedOutcome,
        sink: &mut S,
    ) -> Result<(), WsError> {
        self.in_payload = false;
        self.hdr_len = 0;
        self.hdr_need = 2;
        self.frames = self.frames.saturating_add(1);
        out.frames = out.frames.saturating_add(1);
        out.last_frame_boundary = Some(pos);
        match self.cur.opcode {
            Opcode::Close => {
                let n = usize::from(self.close_len);
                let mut raw = [0u8; 125];
                if let (Some(dst), Some(src)) = (raw.get_mut(..n), self.close_buf.get(..n)) {
                    dst.copy_from_slice(src);
                }
                if let Some(key) = self.cur.mask {
                    let src = raw;
                    unmask_to(key, 0, src.get(..n).unwrap_or_default(), |b| {
                        if let Some(dst) = raw.get_mut(..b.len()) {
                            dst.copy_from_slice(b);
                        }
                    });
                }
                let frame = parse_close(raw.get(..n).unwrap_or_default());
                match frame {
                    Some(f) => self.close = Some(f),
                    None => {
                        self.error = Some(WsError::BadClosePayload);
                        return Err(WsError::BadClosePayload);
                    }
                }
                out.close = true;
            }
            Opcode::Ping | Opcode::Pong => {}
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                if self.cur.fin {
                    if self.wanted {
                        sink.message_end();
                    }
                    self.message = None;
                    self.wanted = false;
                }
            }
        }
        if self.message.is_none() {
            out.last_message_boundary = Some(pos);
        }
        Ok(())
    }
}

fn parse_close(p: &[u8]) -> Option<CloseFrame> {
    let mut f = CloseFrame {
        code: None,
        reason: [0; 123],
        reason_len: 0,
    };
    match p {
        [] => Some(f),
        [_] => None,
        [a, b, reason @ ..] => {
            core::str::from_utf8(reason).ok()?;
            f.code = Some(u16::from_be_bytes([*a, *b]));
            f.reason.get_mut(..reason.len())?.copy_from_slice(reason);
            f.reason_len = u8::try_from(reason.len()).ok()?;
            Some(f)
        }
    }
}

/// XOR `src` with the masking key (starting `pos` bytes into the key) into a stack buffer and
/// hand out the unmasked pieces. 8 bytes at a time; no allocation.
fn unmask_to(key: [u8; 4], pos: usize, src: &[u8], mut out: impl FnMut(&[u8])) {
    let mut k = key;
    k.rotate_left(pos & 3);
    let [k0, k1, k2, k3] = k;
    let k8 = u64::from_ne_bytes([k0, k1, k2, k3, k0, k1, k2, k3]);
    let mut buf = [0u8; 2048];
    for piece in src.chunks(buf.len()) {
        let Some(dst) = buf.get_mut(..piece.len()) else {
            return;
        };
        let mut d8 = dst.chunks_exact_mut(8);
        let mut s8 = piece.chunks_exact(8);
        for (d, s) in (&mut d8).zip(&mut s8) {
            if let Ok(w) = <[u8; 8]>::try_from(s) {
                d.copy_from_slice(&(u64::from_ne_bytes(w) ^ k8).to_ne_bytes());
            }
        }
        for ((d, s), m) in d8
            .into_remainder()
            .iter_mut()
            .zip(s8.remainder())
            .zip(k.iter().cycle())
        {
            *d = s ^ m;
        }
        out(dst);
    }
}
