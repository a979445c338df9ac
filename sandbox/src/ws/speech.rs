//! `GET /v1/audio/speech`: streaming TTS (`coze-api.md` §8.5).
//!
//! `speech.created` on connect. `speech.update {output_audio}` merges the config and answers
//! `speech.updated {output_audio}` with the effective values (codec pcm | g711a | g711u | opus,
//! `pcm_config.sample_rate` default 24000; see [`super::codec`] for what each codec carries).
//! `input_text_buffer.append {delta}` accumulates text; more than 1024 bytes in the buffer is
//! refused with `error {3010}` (the delta is dropped, the buffer kept).
//! `input_text_buffer.complete` answers `input_text_buffer.completed`, then streams
//! [`crate::audio::speech_duration_ms`] of audio for the buffered text (speed from
//! `speech_rate`) as `speech.audio.update {delta: base64}` frames — paced in real time when
//! `realtime_audio` is on — and ends with `speech.audio.completed`. The buffer then starts
//! empty again; several completes queue their audio in order. Completing an empty buffer is
//! answered with `error {4000}`.

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::{Instant, sleep_until};

use super::codec::{FramePlan, FrameSource, OutputFormat};
use super::{Downlink, End, SessionInfo, Uplink, data_object, merge, parse_uplink};
use crate::audio::speech_duration_ms;

const OUTPUT_CODECS: [&str; 4] = ["pcm", "g711a", "g711u", "opus"];
/// Most text one request may carry (bytes of UTF-8).
pub const MAX_TEXT_BYTES: usize = 1024;

#[derive(Serialize)]
struct AudioUpdate {
    delta: String,
}

struct SpeechSession {
    raw: Map<String, Value>,
    output: OutputFormat,
    source: FrameSource,
    text: String,
    queue: VecDeque<FramePlan>,
    started: bool,
    next_at: Instant,
    realtime: bool,
    seed: u64,
}

/// Runs one `/v1/audio/speech` session.
pub async fn run(mut dl: Downlink, _info: SessionInfo) {
    let st = dl.state().clone();
    let mut s = SpeechSession {
        raw: Map::new(),
        output: OutputFormat::default(),
        source: OutputFormat::default().source(st.config.seed),
        text: String::new(),
        queue: VecDeque::new(),
        started: false,
        next_at: Instant::now(),
        realtime: st.config.realtime_audio,
        seed: st.config.seed,
    };
    if dl.send_empty("speech.created").await.is_err() {
        return;
    }
    let _ = s.serve(&mut dl).await;
}

impl SpeechSession {
    async fn serve(&mut self, dl: &mut Downlink) -> Result<(), End> {
        let far = Duration::from_secs(3600);
        loop {
            let audio_at = (!self.queue.is_empty()).then_some(self.next_at);
            tokio::select! {
                biased;
                msg = dl.socket.recv() => match parse_uplink(msg) {
                    Uplink::Gone => return Ok(()),
                    Uplink::Close => {
                        dl.finish_close().await;
                        return Ok(());
                    }
                    Uplink::Ignore => {}
                    Uplink::Invalid(m) => dl.error(4000, m).await?,
                    Uplink::Event(et, data) => self.on_event(dl, &et, &data).await?,
                },
                () = sleep_until(audio_at.unwrap_or_else(|| Instant::now() + far)), if audio_at.is_some() => {
                    self.step(dl).await?;
                }
            }
        }
    }

    async fn on_event(&mut self, dl: &mut Downlink, et: &str, data: &Value) -> Result<(), End> {
        match et {
            "speech.update" => {
                let update = match data_object(data) {
                    Ok(u) => u,
                    Err(m) => return dl.error(4000, m).await,
                };
                let mut raw = self.raw.clone();
                if let Some(Value::Object(o)) = update.get("output_audio") {
                    merge(&mut raw, o);
                }
                match OutputFormat::from_config(&raw, &OUTPUT_CODECS) {
                    Ok(f) => {
                        let echo = json!({"output_audio": f.to_json(&raw)});
                        self.source = f.source(self.seed);
                        self.output = f;
                        self.raw = raw;
                        dl.send("speech.updated", Some(&echo)).await
                    }
                    Err(m) => dl.error(4000, m).await,
                }
            }
            "input_text_buffer.append" => {
                let Some(delta) = data.get("delta").and_then(Value::as_str) else {
                    return dl.error(4000, "missing data.delta").await;
                };
                if self.text.len() + delta.len() > MAX_TEXT_BYTES {
                    return dl.error(3010, "text exceeds 1024 bytes").await;
                }
                self.text.push_str(delta);
                Ok(())
            }
            "input_text_buffer.complete" => {
                dl.send_empty("input_text_buffer.completed").await?;
                if self.text.trim().is_empty() {
                    return dl.error(4000, "input text buffer is empty").await;
                }
                let ms = speech_duration_ms(&self.text, self.output.speed);
                self.text.clear();
                if self.queue.is_empty() {
                    self.started = false;
                    self.next_at = Instant::now();
                }
                self.queue.push_back(self.output.plan(ms));
                Ok(())
            }
            other => dl.error(4000, format!("unknown event type: {other}")).await,
        }
    }

    async fn step(&mut self, dl: &mut Downlink) -> Result<(), End> {
        let Some(plan) = self.queue.front_mut() else {
            return Ok(());
        };
        match plan.next_frame() {
            Some((start_us, dur_us)) => {
                if !self.started {
                    self.started = true;
                    self.next_at = Instant::now();
                }
                self.next_at += self.output.interval(dur_us, self.realtime);
                let delta = base64::engine::general_purpose::STANDARD
                    .encode(self.source.frame(start_us, dur_us));
                dl.send("speech.audio.update", Some(&AudioUpdate { delta }))
                    .await
            }
            None => {
                self.queue.pop_front();
                self.started = !self.queue.is_empty() && self.started;
                dl.send_empty("speech.audio.completed").await
            }
        }
    }
}
