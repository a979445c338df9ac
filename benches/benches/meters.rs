//! Throughput of the streaming usage meters (`SseMeter`, `WsSessionMeter`) over realistic
//! streams, at tiny (64 B / 1 KiB) and large (16 KiB) chunk sizes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use policy::metering::{SseMeter, WsSessionMeter};

/// Valid base64 of `n` zero-ish bytes (no padding when `n % 3 == 0`).
fn b64(n: usize) -> String {
    "AAAA".repeat(n / 3)
}

/// A chat v3 SSE answer: 400 text deltas, 50 audio deltas of 100 ms, completion, done.
fn sse_stream() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..400 {
        s.push_str("event:conversation.message.delta\n");
        s.push_str(&format!(
            r#"data:{{"id":"7382159494123470858","conversation_id":"7381473525342978089","bot_id":"7379462189365198898","role":"assistant","type":"answer","content":"第{i}个词","content_type":"text","chat_id":"7382159487131697202","section_id":"7381473525342978089"}}"#
        ));
        s.push_str("\n\n");
        if i % 8 == 0 {
            s.push_str("event:conversation.audio.delta\n");
            s.push_str(&format!(
                r#"data:{{"id":"7382159494123470859","role":"assistant","type":"answer","content":"{}","content_type":"audio","chat_id":"7382159487131697202"}}"#,
                b64(4800)
            ));
            s.push_str("\n\n");
        }
    }
    s.push_str("event:conversation.chat.completed\n");
    s.push_str(r#"data:{"id":"7382159487131697202","status":"completed","usage":{"token_count":633,"output_count":19,"input_count":614}}"#);
    s.push_str("\n\nevent:done\ndata:\"[DONE]\"\n\n");
    s.into_bytes()
}

fn ws_frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x81u8];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if n > 0xFFFF {
        f.push(m | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    } else if n > 125 {
        f.push(m | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(m | n as u8);
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// 200 downlink audio deltas of 100 ms (24 kHz PCM = 4800 bytes = 6.4 kB base64).
fn ws_downlink() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..200 {
        let msg = format!(
            r#"{{"id":"evt_{i}","event_type":"conversation.audio.delta","data":{{"id":"7382159494123470859","role":"assistant","type":"answer","content":"{}","content_type":"audio","chat_id":"7382159487131697202"}},"detail":{{"logid":"20250101000000000000000000000000"}}}}"#,
            b64(4800)
        );
        out.extend(ws_frame(msg.as_bytes(), None));
    }
    out
}

/// 200 masked uplink appends of 20 ms (960 bytes = 1280 base64 chars).
fn ws_uplink() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..200 {
        let msg = format!(
            r#"{{"id":"{i}","event_type":"input_audio_buffer.append","data":{{"delta":"{}"}}}}"#,
            b64(960)
        );
        out.extend(ws_frame(msg.as_bytes(), Some([0x37, 0xfa, 0x21, 0x3d])));
    }
    out
}

fn bench_sse(c: &mut Criterion) {
    let data = sse_stream();
    let mut g = c.benchmark_group("sse_meter");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for chunk in [64usize, 16 * 1024] {
        g.bench_with_input(
            BenchmarkId::new("chat_stream", chunk),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut m = SseMeter::new();
                    for c in data.chunks(chunk) {
                        m.feed(black_box(c));
                    }
                    m.finish()
                });
            },
        );
    }
    g.finish();
}

fn bench_ws(c: &mut Criterion) {
    let down = ws_downlink();
    let up = ws_uplink();
    let mut g = c.benchmark_group("ws_meter");
    for chunk in [1024usize, 16 * 1024] {
        g.throughput(Throughput::Bytes(down.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("downlink_audio", chunk),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut m = WsSessionMeter::default();
                    for c in down.chunks(chunk) {
                        m.feed_downlink(black_box(c)).unwrap();
                    }
                    m.finish()
                });
            },
        );
        g.throughput(Throughput::Bytes(up.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("uplink_masked", chunk),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut m = WsSessionMeter::default();
                    for c in up.chunks(chunk) {
                        m.feed_uplink(black_box(c)).unwrap();
                    }
                    m.finish()
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_sse, bench_ws);
criterion_main!(benches);
