//! WebSocket `/v1/chat` load: idle sessions (memory per connection) and voice sessions
//! (16 kHz PCM up in 20 ms frames, the sandbox's 24 kHz PCM reply down, both in real time).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Target;
use crate::procs::{cpu_seconds, rss_bytes};
use crate::report::pct;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(target: &Target, n: usize) -> Result<Ws> {
    let mut req = format!(
        "ws://{}/v1/chat?bot_id=7000000000000000001&device_id={}",
        target.addr,
        1_000_000 + n
    )
    .into_client_request()?;
    req.headers_mut()
        .insert("Authorization", target.auth.parse()?);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| anyhow!("WebSocket handshake timed out"))??;
    Ok(ws)
}

/// Opens `n` sessions, at most `parallel` handshakes at a time, with a global deadline.
async fn open_many(target: &Target, n: usize, parallel: usize) -> (Vec<Ws>, usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let results: Vec<Result<Ws>> = futures_util::stream::iter(0..n)
        .map(|i| async move {
            if Instant::now() > deadline {
                return Err(anyhow!("deadline"));
            }
            connect(target, i).await
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut ok = Vec::with_capacity(n);
    let mut failed = 0;
    for r in results {
        match r {
            Ok(ws) => ok.push(ws),
            Err(e) => {
                if failed == 0 {
                    eprintln!("{}: WebSocket session failed: {e:#}", target.name);
                }
                failed += 1
            }
        }
    }
    (ok, failed)
}

pub struct IdleResult {
    pub sessions: usize,
    pub failed: usize,
    pub bytes_per_session: f64,
}

/// RSS of the target's process (tree) before and after `n` idle sessions are open.
pub async fn idle(target: &Target, n: usize) -> Result<IdleResult> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(target.pid);
    let (open, failed) = open_many(target, n, 64).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes(target.pid);
    let sessions = open.len();
    drop(open);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(IdleResult {
        sessions,
        failed,
        bytes_per_session: after.saturating_sub(before) as f64 / (sessions.max(1) as f64),
    })
}

pub struct VoiceResult {
    pub sessions: usize,
    pub failed: usize,
    pub frames_down: u64,
    pub frame_late_p50_us: u64,
    pub frame_late_p99_us: u64,
    pub rtt_p50_us: u64,
    pub rtt_p99_us: u64,
    pub cpu_percent: f64,
    pub rss_per_session: f64,
}

#[derive(Default)]
struct Samples {
    late: Vec<u64>,
    rtt: Vec<u64>,
}

/// Duration in µs of a base64 chunk of 24 kHz 16-bit mono PCM.
fn pcm24_us(b64: &str) -> u64 {
    let pad = b64.bytes().rev().take_while(|&b| b == b'=').count();
    let bytes = (b64.len() / 4 * 3).saturating_sub(pad) as u64;
    bytes * 1_000_000 / 48_000
}

async fn voice_session(ws: Ws, end: Instant, samples: Arc<Mutex<Samples>>) {
    let (mut tx, mut rx) = ws.split();
    let frame = base64::engine::general_purpose::STANDARD.encode([0u8; 640]);
    let append = format!(
        r#"{{"id":"a","event_type":"input_audio_buffer.append","data":{{"delta":"{frame}"}}}}"#
    );
    let complete = r#"{"id":"c","event_type":"input_audio_buffer.complete"}"#;
    let update = r#"{"id":"u","event_type":"chat.update","data":{"input_audio":{"format":"pcm","codec":"pcm","sample_rate":16000,"channel":1,"bit_depth":16}}}"#;
    let sent_complete: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let sc = sent_complete.clone();
    let reader = tokio::spawn(async move {
        let mut local = Samples::default();
        let mut anchor: Option<(Instant, u64)> = None;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end.into(), rx.next()).await {
            let Message::Text(t) = msg else { continue };
            let now = Instant::now();
            let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else {
                continue;
            };
            match v["event_type"].as_str().unwrap_or_default() {
                "input_audio_buffer.completed" => {
                    if let Some(t0) = sc.lock().ok().and_then(|mut g| g.take()) {
                        local.rtt.push((now - t0).as_micros() as u64);
                    }
                }
                "conversation.chat.created" | "conversation.audio.completed" => anchor = None,
                "conversation.audio.delta" => {
                    let dur = pcm24_us(v["data"]["content"].as_str().unwrap_or_default());
                    let (first, played) = *anchor.get_or_insert((now, 0));
                    let due = first + Duration::from_micros(played);
                    local
                        .late
                        .push(now.saturating_duration_since(due).as_micros() as u64);
                    anchor = Some((first, played + dur));
                }
                _ => {}
            }
        }
        if let Ok(mut s) = samples.lock() {
            s.late.extend(local.late);
            s.rtt.extend(local.rtt);
        }
    });
    let _ = tx.send(Message::text(update)).await;
    let start = tokio::time::Instant::now();
    let mut i: u32 = 0;
    loop {
        let due = start + Duration::from_millis(20) * i;
        if Instant::now() >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        if tx.send(Message::text(append.clone())).await.is_err() {
            break;
        }
        i += 1;
        // A turn every 3 s of speech (150 frames): the reply streams while we keep talking.
        if i.is_multiple_of(150) {
            if let Ok(mut g) = sent_complete.lock() {
                *g = Some(Instant::now());
            }
            if tx.send(Message::text(complete)).await.is_err() {
                break;
            }
        }
    }
    let _ = tx.close().await;
    let _ = reader.await;
}

/// `n` voice sessions for `secs` seconds.
pub async fn voice(target: &Target, n: usize, secs: f64) -> Result<VoiceResult> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rss_bytes(target.pid);
    let (open, failed) = open_many(target, n, 64).await;
    let sessions = open.len();
    let cpu0 = cpu_seconds(target.pid);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let samples = Arc::new(Mutex::new(Samples::default()));
    let tasks: Vec<_> = open
        .into_iter()
        .map(|ws| tokio::spawn(voice_session(ws, end, samples.clone())))
        .collect();
    tokio::time::sleep_until((t0 + Duration::from_secs_f64(secs * 0.8)).into()).await;
    let rss1 = rss_bytes(target.pid);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let cpu = cpu_seconds(target.pid) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    let mut s = std::mem::take(&mut *samples.lock().map_err(|_| anyhow!("poisoned"))?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(VoiceResult {
        sessions,
        failed,
        frames_down: s.late.len() as u64,
        frame_late_p50_us: pct(&mut s.late, 50.0),
        frame_late_p99_us: pct(&mut s.late, 99.0),
        rtt_p50_us: pct(&mut s.rtt, 50.0),
        rtt_p99_us: pct(&mut s.rtt, 99.0),
        cpu_percent: cpu * 100.0 / wall.max(1e-9),
        rss_per_session: rss1.saturating_sub(rss0) as f64 / (sessions.max(1) as f64),
    })
}
