//! Frame boundaries and the few frames the relay writes itself.
//!
//! The relay forwards bytes unchanged; [`FrameCursor`] only follows RFC 6455 frame headers so
//! the relay knows when a direction sits between frames, the one moment it may inject a frame
//! of its own (a close on drain, a ping when the upstream is quiet) without corrupting the
//! stream.

/// Follows frame boundaries in one direction of a WebSocket byte stream.
#[derive(Debug, Default)]
pub struct FrameCursor {
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    remaining: u64,
    /// A close frame passed in this direction.
    pub saw_close: bool,
    /// Inside a fragmented data message (a data frame without FIN passed, its final
    /// continuation not yet): only control frames may be injected here.
    in_message: bool,
}

fn header_len(b0_b1: [u8; 2]) -> usize {
    let ext = match b0_b1[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b0_b1[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

fn payload_len(h: &[u8]) -> u64 {
    match h.get(1).map(|b| b & 0x7f) {
        Some(126) => h
            .get(2..4)
            .map_or(0, |b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
        Some(127) => h
            .get(2..10)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_be_bytes),
        Some(n) => u64::from(n),
        None => 0,
    }
}

impl FrameCursor {
    /// Advances over `data`, which is forwarded unchanged by the caller.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() as u64) as usize;
                self.remaining -= take as u64;
                data = data.get(take..).unwrap_or_default();
                continue;
            }
            // Collect header bytes.
            let want = if self.header_len < 2 {
                2
            } else {
                header_len([self.header[0], self.header[1]])
            };
            let take = (want - self.header_len).min(data.len());
            if let (Some(dst), Some(src)) = (
                self.header.get_mut(self.header_len..self.header_len + take),
                data.get(..take),
            ) {
                dst.copy_from_slice(src);
            }
            self.header_len += take;
            data = data.get(take..).unwrap_or_default();
            if self.header_len >= 2
                && self.header_len == header_len([self.header[0], self.header[1]])
            {
                let opcode = self.header[0] & 0x0f;
                let fin = self.header[0] & 0x80 != 0;
                if opcode == 0x8 {
                    self.saw_close = true;
                }
                if opcode < 0x8 {
                    // Data or continuation frame: the message ends with its FIN frame.
                    self.in_message = !fin;
                }
                self.remaining = payload_len(&self.header[..self.header_len]);
                self.header_len = 0;
            }
        }
    }

    /// True between frames (a control frame may be injected).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// True between messages (a data frame, e.g. an `error` event, may be injected).
    pub fn at_message_boundary(&self) -> bool {
        self.at_boundary() && !self.in_message
    }
}

/// An unmasked close frame (server → device). `reason` is truncated to fit 125 bytes.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = reason.as_bytes();
    let reason = reason.get(..reason.len().min(123)).unwrap_or_default();
    let mut f = Vec::with_capacity(4 + reason.len());
    f.push(0x88);
    f.push((2 + reason.len()) as u8);
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

/// A masked frame (gateway acting as client → upstream), random mask.
pub fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut f = Vec::with_capacity(14 + payload.len());
    f.push(0x80 | (opcode & 0x0f));
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A masked close frame for the upstream.
pub fn masked_close(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(
        reason
            .as_bytes()
            .get(..reason.len().min(123))
            .unwrap_or_default(),
    );
    masked_frame(0x8, &p)
}

/// An unmasked text frame (server → device), e.g. an `error` event.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(10 + payload.len());
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_boundaries_across_every_split() {
        let mut stream = masked_frame(0x1, &[b'a'; 300]);
        stream.extend(text_frame(&[b'b'; 70_000]));
        stream.extend(close_frame(1000, "bye"));
        for split in 0..stream.len() {
            let mut c = FrameCursor::default();
            c.feed(&stream[..split]);
            c.feed(&stream[split..]);
            assert!(c.at_boundary(), "split {split}");
            assert!(c.saw_close);
        }
        let mut c = FrameCursor::default();
        c.feed(&stream[..5]);
        assert!(!c.at_boundary());
    }

    #[test]
    fn message_boundaries_skip_fragments_and_interleaved_control_frames() {
        let mut c = FrameCursor::default();
        c.feed(&[0x01, 0x02, b'h', b'e']); // text, no FIN
        assert!(c.at_boundary() && !c.at_message_boundary());
        c.feed(&[0x89, 0x00]); // ping in between
        assert!(!c.at_message_boundary());
        c.feed(&[0x80, 0x01, b'y']); // final continuation
        assert!(c.at_message_boundary());
    }
}
