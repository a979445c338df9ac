//! [`SseMeter`]: usage from Coze chat v3 and workflow `text/event-stream` responses.

use memchr::memchr2;

use super::json_scan::{Facts, JsonError, JsonScanner, SmallStr};
use super::{AudioClock, PCM_24K_MONO_S16, Usage};

/// Why (part of) an SSE stream could not be metered. Recorded by the meter; metering continues
/// with the next event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// The `data:` payload of a usage-bearing event was not valid JSON (or was cut short).
    #[error("malformed data in SSE `{event}` event: {source}")]
    MalformedData {
        /// The event name as we classified it.
        event: &'static str,
        /// What was wrong with the payload.
        source: JsonError,
    },
}

impl SseError {
    /// Stable low-cardinality code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            SseError::MalformedData { .. } => "sse_malformed_data",
        }
    }
}

/// Event names the meter acts on. Everything else is skipped without looking at its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ChatCompleted,
    ChatFailed,
    ChatRequiresAction,
    AudioDelta,
    WorkflowMessage,
    Done,
    Error,
    Interrupt,
    Other,
}

impl Kind {
    fn from_name(name: Option<&[u8]>) -> Self {
        match name {
            Some(b"conversation.chat.completed") => Self::ChatCompleted,
            Some(b"conversation.chat.failed") => Self::ChatFailed,
            Some(b"conversation.chat.requires_action") => Self::ChatRequiresAction,
            Some(b"conversation.audio.delta") => Self::AudioDelta,
            Some(b"Message") => Self::WorkflowMessage,
            Some(b"done" | b"Done" | b"conversation.stream.done") => Self::Done,
            Some(b"error" | b"Error") => Self::Error,
            Some(b"Interrupt") => Self::Interrupt,
            _ => Self::Other,
        }
    }

    fn wants_data(self) -> bool {
        matches!(
            self,
            Self::ChatCompleted
                | Self::ChatFailed
                | Self::ChatRequiresAction
                | Self::AudioDelta
                | Self::WorkflowMessage
        )
    }

    fn name(self) -> &'static str {
        match self {
            Self::ChatCompleted => "conversation.chat.completed",
            Self::ChatFailed => "conversation.chat.failed",
            Self::ChatRequiresAction => "conversation.chat.requires_action",
            Self::AudioDelta => "conversation.audio.delta",
            Self::WorkflowMessage => "Message",
            Self::Done => "done",
            Self::Error => "error",
            Self::Interrupt => "Interrupt",
            Self::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Reading the field name (up to `:` or end of line).
    Field,
    /// Value of an `event:` line.
    EventValue,
    /// Value of a `data:` line.
    DataValue,
    /// Any other line (`id:`, `retry:`, `:` comments, data of uninteresting events).
    Skip,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NodeMax {
    used: bool,
    key: u64,
    input: u64,
    output: u64,
}

/// Workflow token usage, per node. See [`SseMeter`]'s `# Approximation` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WorkflowNodes {
    open: [NodeMax; 8],
    next_evict: usize,
    committed_in: u64,
    committed_out: u64,
}

impl WorkflowNodes {
    fn commit(&mut self, n: NodeMax) {
        self.committed_in = self.committed_in.saturating_add(n.input);
        self.committed_out = self.committed_out.saturating_add(n.output);
    }

    fn observe(&mut self, key: u64, input: u64, output: u64, finished: bool) {
        let idx = self
            .open
            .iter()
            .position(|n| n.used && n.key == key)
            .or_else(|| self.open.iter().position(|n| !n.used));
        let idx = match idx {
            Some(i) => i,
            None => {
                // Too many nodes open at once: commit the oldest-inserted one.
                let i = self.next_evict % self.open.len();
                self.next_evict = self.next_evict.wrapping_add(1);
                if let Some(n) = self.open.get(i).copied() {
                    self.commit(n);
                }
                if let Some(n) = self.open.get_mut(i) {
                    *n = NodeMax::default();
                }
                i
            }
        };
        let Some(n) = self.open.get_mut(idx) else {
            return;
        };
        if !n.used {
            *n = NodeMax {
                used: true,
                key,
                input: 0,
                output: 0,
            };
        }
        n.input = n.input.max(input);
        n.output = n.output.max(output);
        if finished {
            let done = *n;
            *n = NodeMax::default();
            self.commit(done);
        }
    }

    fn totals(&self) -> (u64, u64) {
        self.open
            .iter()
            .filter(|n| n.used)
            .fold((self.committed_in, self.committed_out), |(i, o), n| {
                (i.saturating_add(n.input), o.saturating_add(n.output))
            })
    }
}

/// Counters, kept apart from the parser so they can be updated while the scanner is borrowed.
#[derive(Debug, Clone, Default)]
struct Tally {
    tokens_in: u64,
    tokens_out: u64,
    audio: AudioClock,
    nodes: WorkflowNodes,
    usage_events: u64,
    completed: bool,
    errors: u64,
    first_error: Option<SseError>,
}

impl Tally {
    fn apply(&mut self, kind: Kind, facts: Option<&Facts>) {
        match kind {
            Kind::ChatCompleted | Kind::ChatFailed | Kind::ChatRequiresAction => {
                if let Some((i, o)) = facts.and_then(|f| f.usage.tokens()) {
                    self.tokens_in = self.tokens_in.saturating_add(i);
                    self.tokens_out = self.tokens_out.saturating_add(o);
                    self.usage_events = self.usage_events.saturating_add(1);
                }
                self.completed = true;
            }
            Kind::AudioDelta => {
                if let Some(f) = facts.filter(|f| f.content.present) {
                    self.audio
                        .add(PCM_24K_MONO_S16, f.content.b64_decoded_bytes());
                }
            }
            Kind::WorkflowMessage => {
                if let Some(f) = facts
                    && let Some((i, o)) = f.usage.tokens()
                {
                    let key = f
                        .node_execute_uuid
                        .or(f.node_id)
                        .or(f.node_title)
                        .unwrap_or(0);
                    self.nodes
                        .observe(key, i, o, f.node_is_finish == Some(true));
                    self.usage_events = self.usage_events.saturating_add(1);
                }
            }
            Kind::Done | Kind::Error | Kind::Interrupt => self.completed = true,
            Kind::Other => {}
        }
    }

    fn record(&mut self, e: SseError) {
        self.errors = self.errors.saturating_add(1);
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn usage(&self) -> Usage {
        let (wi, wo) = self.nodes.totals();
        Usage {
            llm_input_tokens: self.tokens_in.saturating_add(wi),
            llm_output_tokens: self.tokens_out.saturating_add(wo),
            audio_in_ms: 0,
            audio_out_ms: self.audio.millis(),
            tts_chars: 0,
            usage_events: self.usage_events,
            completed: self.completed,
        }
    }
}

/// Incremental usage meter for one Coze SSE response body.
///
/// Feed it the response body exactly as it passes through ([`SseMeter::feed`]), in any
/// chunking, and read [`SseMeter::usage`] at any time or [`SseMeter::finish`] at the end.
///
/// Framing: both the chat v3 shape (`event:`/`data:`) and the workflow shape
/// (`id:`/`event:`/`data:`), with or without a space after the colon, `\n`, `\r\n` or `\r` line
/// endings, `:` comment lines, and multi-line `data` (joined with `\n` as the SSE spec says).
///
/// What is counted:
/// - `conversation.chat.completed`, `conversation.chat.failed` and
///   `conversation.chat.requires_action` (each ends its stream): `usage` tokens. `input_count` /
///   `output_count`, falling back to `input_tokens` / `output_tokens`; with no output figure,
///   `token_count - input` counts as output. Each such event with `usage` is one usage event.
/// - `conversation.audio.delta`: `content` is base64 PCM 24 kHz s16le mono, so
///   `ms = decoded_bytes / 48`. The decoded size comes from the base64 length (padding
///   excluded); nothing is decoded.
/// - workflow `Message` with `usage`: tokens, per node (below).
/// - `done`, `Done`, `conversation.stream.done`, `error`, `Error`, `Interrupt`, and the three
///   chat terminal events set [`Usage::completed`].
///
/// # Memory and speed
///
/// State is fixed (a few hundred bytes): the data of an interesting event is run through a
/// streaming JSON scanner rather than buffered, so an event of any size costs no memory, and
/// an uninteresting event's `data:` line is skipped with `memchr`. There is no per-event size
/// cap because there is nothing to grow.
///
/// # Approximation
///
/// Coze reports workflow `Message.usage` per node, and a streaming node may repeat a growing
/// figure on several of its `Message` chunks. The meter therefore keeps, per node (identified by
/// `node_execute_uuid`, else `node_id`, else `node_title`), the **maximum** input and output
/// seen, and **sums across nodes**. A node is closed when a message with
/// `node_is_finish: true` arrives. At most 8 nodes are tracked open at once; a ninth commits the
/// oldest. If a node reports usage again after it finished (never observed), it is counted
/// again: over-counting is preferred to under-counting.
///
/// If the stream ends without the blank line after the last event, that event is still
/// counted when its `data` is complete JSON.
#[derive(Debug, Clone)]
pub struct SseMeter {
    line: Line,
    field: SmallStr<8>,
    skip_space: bool,
    cr_pending: bool,
    line_has_bytes: bool,
    event_name: SmallStr<48>,
    kind: Option<Kind>,
    event_has_fields: bool,
    data_lines: u32,
    scanning: bool,
    scanner: JsonScanner,
    tally: Tally,
}

impl Default for SseMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl SseMeter {
    /// A meter at the start of a stream.
    pub fn new() -> Self {
        let mut field = SmallStr::default();
        field.clear();
        Self {
            line: Line::Field,
            field,
            skip_space: false,
            cr_pending: false,
            line_has_bytes: false,
            event_name: SmallStr::default(),
            kind: None,
            event_has_fields: false,
            data_lines: 0,
            scanning: false,
            scanner: JsonScanner::data_payload(),
            tally: Tally::default(),
        }
    }

    /// Feed the next chunk of the response body.
    pub fn feed(&mut self, mut input: &[u8]) {
        loop {
            if self.cr_pending {
                match input.split_first() {
                    None => return,
                    Some((b'\n', rest)) => input = rest,
                    Some(_) => {}
                }
                self.cr_pending = false;
            }
            if input.is_empty() {
                return;
            }
            if self.line == Line::Field {
                let pos = input
                    .iter()
                    .position(|&b| matches!(b, b':' | b'\r' | b'\n'));
                let Some(i) = pos else {
                    self.field.extend(input);
                    self.line_has_bytes = true;
                    return;
                };
                let (name, tail) = input.split_at(i);
                if !name.is_empty() {
                    self.line_has_bytes = true;
                    self.field.extend(name);
                }
                let Some((&c, rest)) = tail.split_first() else {
                    return;
                };
                input = rest;
                if c == b':' {
                    self.line_has_bytes = true;
                    self.begin_value();
                } else {
                    if self.line_has_bytes {
                        // A field name with no colon: the value is empty.
                        self.begin_value();
                        self.end_value_line();
                    }
                    self.end_line(c);
                }
            } else {
                match memchr2(b'\r', b'\n', input) {
                    None => {
                        self.value_bytes(input);
                        return;
                    }
                    Some(i) => {
                        let (v, tail) = input.split_at(i);
                        self.value_bytes(v);
                        let Some((&c, rest)) = tail.split_first() else {
                            return;
                        };
                        input = rest;
                        self.end_value_line();
                        self.end_line(c);
                    }
                }
            }
        }
    }

    fn begin_value(&mut self) {
        self.event_has_fields = true;
        self.skip_space = true;
        self.line = match self.field.get() {
            Some(b"event") => {
                self.event_name.clear();
                Line::EventValue
            }
            Some(b"data") => {
                self.data_lines = self.data_lines.saturating_add(1);
                if self.data_lines == 1 {
                    self.scanning = self.kind.is_none_or(Kind::wants_data);
                    if self.scanning {
                        self.scanner.reset();
                    }
                } else if self.scanning {
                    self.scanner.feed(b"\n");
                }
                Line::DataValue
            }
            _ => Line::Skip,
        };
    }

    fn value_bytes(&mut self, mut v: &[u8]) {
        if v.is_empty() {
            return;
        }
        if self.skip_space {
            self.skip_space = false;
            if let Some((b' ', rest)) = v.split_first() {
                v = rest;
            }
        }
        match self.line {
            Line::EventValue => self.event_name.extend(v),
            Line::DataValue if self.scanning => self.scanner.feed(v),
            _ => {}
        }
    }

    fn end_value_line(&mut self) {
        if self.line == Line::EventValue {
            self.kind = Some(Kind::from_name(self.event_name.get()));
        }
    }

    fn end_line(&mut self, terminator: u8) {
        if terminator == b'\r' {
            self.cr_pending = true;
        }
        if !self.line_has_bytes {
            self.dispatch();
        }
        self.line = Line::Field;
        self.field.clear();
        self.line_has_bytes = false;
    }

    fn dispatch(&mut self) {
        if !self.event_has_fields {
            return;
        }
        let kind = self.kind.unwrap_or(Kind::Other);
        let facts = if self.scanning && self.data_lines > 0 && kind.wants_data() {
            self.scanner.finish();
            match self.scanner.outcome() {
                Ok(f) => Some(f),
                Err(source) => {
                    self.tally.record(SseError::MalformedData {
                        event: kind.name(),
                        source,
                    });
                    None
                }
            }
        } else {
            None
        };
        self.tally.apply(kind, facts);
        self.kind = None;
        self.event_name.reset();
        self.event_has_fields = false;
        self.data_lines = 0;
        self.scanning = false;
    }

    /// Usage so far. Counts only events already terminated by their blank line.
    pub fn usage(&self) -> Usage {
        self.tally.usage()
    }

    /// The first error seen, if any.
    pub fn first_error(&self) -> Option<SseError> {
        self.tally.first_error
    }

    /// How many events could not be metered.
    pub fn error_count(&self) -> u64 {
        self.tally.errors
    }

    /// End of stream: counts a final event that lacked its blank line, then returns the total.
    pub fn finish(mut self) -> Usage {
        self.flush_eof();
        self.tally.usage()
    }

    /// End-of-stream handling shared by [`Self::finish`] and tests.
    fn flush_eof(&mut self) {
        self.cr_pending = false;
        if self.line != Line::Field || self.line_has_bytes {
            if self.line == Line::Field {
                self.begin_value();
            }
            self.end_value_line();
            self.line = Line::Field;
            self.field.clear();
            self.line_has_bytes = false;
        }
        self.dispatch();
    }
}
