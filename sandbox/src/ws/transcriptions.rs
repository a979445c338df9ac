//! `GET /v1/audio/transcriptions`: streaming ASR (`coze-api.md` §8.6).
//!
//! `transcriptions.created` on connect. `transcriptions.update {input_audio, asr_config}` merges
//! the config and answers `transcriptions.updated` with the effective `input_audio` (all five
//! fields) and the `asr_config` as sent. `input_audio_buffer.append {delta}` counts the audio
//! (see [`super::codec`]); each time the buffered audio passes another whole second an interim
//! `transcriptions.message.update {content}` carries the full text so far ("sandbox heard
//! 2.00 s of audio"). `input_audio_buffer.complete` answers `input_audio_buffer.completed`, a
//! final `transcriptions.message.update` (if any audio arrived) and
//! `transcriptions.message.completed`, then starts a new utterance.
//! `input_audio_buffer.clear` empties the buffer and answers `input_audio_buffer.cleared`.

use serde_json::{Map, Value, json};

use super::codec::{InputFormat, InputMeter};
use super::{Downlink, End, SessionInfo, Uplink, audio_delta, data_object, merge, parse_uplink};

/// Runs one `/v1/audio/transcriptions` session.
pub async fn run(mut dl: Downlink, _info: SessionInfo) {
    if dl.send_empty("transcriptions.created").await.is_err() {
        return;
    }
    let mut s = AsrSession {
        cfg: Map::new(),
        input: InputFormat::default(),
        buffer: InputMeter::default(),
    };
    let _ = s.serve(&mut dl).await;
}

struct AsrSession {
    cfg: Map<String, Value>,
    input: InputFormat,
    buffer: InputMeter,
}

fn transcript(m: &InputMeter) -> String {
    format!("sandbox heard {:.2} s of audio", m.seconds())
}

impl AsrSession {
    async fn serve(&mut self, dl: &mut Downlink) -> Result<(), End> {
        loop {
            match parse_uplink(dl.socket.recv().await) {
                Uplink::Gone => return Ok(()),
                Uplink::Close => {
                    dl.finish_close().await;
                    return Ok(());
                }
                Uplink::Ignore => {}
                Uplink::Invalid(m) => dl.error(4000, m).await?,
                Uplink::Event(et, data) => self.on_event(dl, &et, &data).await?,
            }
        }
    }

    async fn on_event(&mut self, dl: &mut Downlink, et: &str, data: &Value) -> Result<(), End> {
        match et {
            "transcriptions.update" => {
                let update = match data_object(data) {
                    Ok(u) => u,
                    Err(m) => return dl.error(4000, m).await,
                };
                let mut cfg = self.cfg.clone();
                merge(&mut cfg, &update);
                let empty = Map::new();
                let ia = cfg
                    .get("input_audio")
                    .and_then(Value::as_object)
                    .unwrap_or(&empty);
                match InputFormat::from_config(ia) {
                    Ok(f) => {
                        let mut echo = cfg.clone();
                        echo.insert("input_audio".into(), f.to_json());
                        let echo = Value::Object(echo);
                        self.input = f;
                        self.cfg = cfg;
                        dl.send("transcriptions.updated", Some(&echo)).await
                    }
                    Err(m) => dl.error(4000, m).await,
                }
            }
            "input_audio_buffer.append" => {
                let bytes = match audio_delta(data) {
                    Ok(b) => b,
                    Err(m) => return dl.error(4000, m).await,
                };
                let before = self.buffer.micros / 1_000_000;
                self.buffer.add(&self.input, &bytes);
                if self.buffer.micros / 1_000_000 > before {
                    let data = json!({"content": transcript(&self.buffer)});
                    dl.send("transcriptions.message.update", Some(&data))
                        .await?;
                }
                Ok(())
            }
            "input_audio_buffer.complete" => {
                dl.send_empty("input_audio_buffer.completed").await?;
                if !self.buffer.is_empty() {
                    let data = json!({"content": transcript(&self.buffer)});
                    dl.send("transcriptions.message.update", Some(&data))
                        .await?;
                }
                self.buffer = InputMeter::default();
                dl.send_empty("transcriptions.message.completed").await
            }
            "input_audio_buffer.clear" => {
                self.buffer = InputMeter::default();
                dl.send_empty("input_audio_buffer.cleared").await
            }
            other => dl.error(4000, format!("unknown event type: {other}")).await,
        }
    }
}
