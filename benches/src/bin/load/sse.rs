//! SSE load: `streams` concurrent clients each running chat v3 streams back to back (the
//! sandbox paces events `delay` apart). Per stream: time to first event (from sending the
//! request) and, per later event, its gap excess `arrival_i − arrival_{i−1} − delay` (the
//! sandbox sleeps `delay` between events; its timer slack is the same for every target, so
//! the difference to `direct` is the jitter the proxy adds to each event).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use futures_util::StreamExt as _;

use crate::Target;
use crate::procs::cpu_seconds;
use crate::report::pct;

pub struct SseResult {
    pub streams: u64,
    pub events_per_stream: f64,
    pub ttfe_p50_us: u64,
    pub ttfe_p99_us: u64,
    pub late_p50_us: u64,
    pub late_p99_us: u64,
    pub cpu_us_per_stream: f64,
}

const BODY: &str = r#"{"bot_id":"bench","user_id":"u1","stream":true,"additional_messages":[{"role":"user","content":"hello","content_type":"text"}]}"#;

pub async fn run(target: &Target, streams: usize, secs: f64, delay: Duration) -> Result<SseResult> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(streams)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("http://{}/v3/chat", target.addr);
    let ttfe = Arc::new(Mutex::new(Vec::new()));
    let late = Arc::new(Mutex::new(Vec::new()));
    let counts = Arc::new(Mutex::new((0u64, 0u64)));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let cpu0 = cpu_seconds(target.pid);
    let mut workers = Vec::new();
    for _ in 0..streams {
        let (client, url, auth) = (client.clone(), url.clone(), target.auth.clone());
        let (ttfe, late, counts) = (ttfe.clone(), late.clone(), counts.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < end {
                let t0 = Instant::now();
                let Ok(resp) = client
                    .post(&url)
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .body(BODY)
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut body = resp.bytes_stream();
                let mut first: Option<Instant> = None;
                let mut n = 0u64;
                let mut tail = Vec::<u8>::new();
                let (mut my_ttfe, mut my_late) = (None, Vec::new());
                let mut failed = false;
                while let Some(chunk) = body.next().await {
                    let Ok(chunk) = chunk else {
                        failed = true;
                        break;
                    };
                    let now = Instant::now();
                    tail.extend_from_slice(&chunk);
                    // Count complete events ("\n\n"-terminated) in this chunk.
                    while let Some(i) = tail.windows(2).position(|w| w == b"\n\n") {
                        tail.drain(..i + 2);
                        match first {
                            None => my_ttfe = Some((now - t0).as_micros() as u64),
                            Some(prev) => {
                                my_late
                                    .push(now.saturating_duration_since(prev + delay).as_micros()
                                        as u64)
                            }
                        }
                        first = Some(now);
                        n += 1;
                    }
                }
                if failed || n == 0 {
                    continue;
                }
                if let (Some(t), Ok(mut v)) = (my_ttfe, ttfe.lock()) {
                    v.push(t);
                }
                if let Ok(mut v) = late.lock() {
                    v.extend(my_late);
                }
                if let Ok(mut c) = counts.lock() {
                    c.0 += 1;
                    c.1 += n;
                }
            }
        }));
    }
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs_f64(secs + 30.0), w).await;
    }
    let cpu = cpu_seconds(target.pid) - cpu0;
    let mut t = ttfe.lock().map_err(|_| anyhow!("poisoned"))?.clone();
    let mut l = late.lock().map_err(|_| anyhow!("poisoned"))?.clone();
    let (n, ev) = *counts.lock().map_err(|_| anyhow!("poisoned"))?;
    Ok(SseResult {
        streams: n,
        events_per_stream: ev as f64 / (n.max(1) as f64),
        ttfe_p50_us: pct(&mut t, 50.0),
        ttfe_p99_us: pct(&mut t, 99.0),
        late_p50_us: pct(&mut l, 50.0),
        late_p99_us: pct(&mut l, 99.0),
        cpu_us_per_stream: cpu * 1e6 / (n.max(1) as f64),
    })
}
