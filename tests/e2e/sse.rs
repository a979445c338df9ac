//! SSE through the gateway: chunks are forwarded as they arrive, never buffered.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway_tests::*;
use serde_json::json;

/// The upstream sends an event, pauses 300 ms, sends the next: the device must see the first
/// event before the second exists. A buffering proxy would deliver them together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_as_they_are_sent() {
    let up = sandbox_upstream(SandboxConfig {
        sse_event_delay: Duration::from_millis(300),
        chat_deltas: 2,
        ..Default::default()
    })
    .await;
    let gw = GatewayProcess::start(&GatewayOptions::new(&up.base_url())).await;
    let token = gw.register_device("dev-sse").await;
    let r = gw
        .http
        .post(format!("{}/v3/chat", gw.device))
        .bearer_auth(&token)
        .json(&json!({
            "bot_id": "b1", "user_id": "u1", "stream": true,
            "additional_messages": [{"role": "user", "content": "hi", "content_type": "text"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(r.headers().get("x-tt-logid").is_some());
    let mut body = r.bytes_stream();
    let mut buf = Vec::new();
    let mut arrivals: Vec<(Instant, String)> = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap()
    {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8(event).unwrap();
            let name = text
                .lines()
                .next()
                .unwrap()
                .trim_start_matches("event:")
                .trim()
                .to_owned();
            arrivals.push((Instant::now(), name));
        }
    }
    let names: Vec<&str> = arrivals.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names.first(),
        Some(&"conversation.chat.created"),
        "{names:?}"
    );
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert!(names.contains(&"conversation.chat.completed"), "{names:?}");
    // Every event is sent 300 ms after the previous one. A buffering proxy collapses the gaps;
    // an unbuffered one keeps them. One gap may shrink when this test process itself is starved
    // of CPU on a loaded 2-core machine (two events then sit in the socket together).
    let gaps: Vec<Duration> = arrivals.windows(2).map(|p| p[1].0 - p[0].0).collect();
    let kept = gaps
        .iter()
        .filter(|g| **g >= Duration::from_millis(200))
        .count();
    assert!(
        kept + 1 >= gaps.len(),
        "events arrived bunched (gaps {gaps:?}): buffered"
    );
    let spread = arrivals.last().unwrap().0 - arrivals[0].0;
    assert!(
        spread >= Duration::from_millis(300) * (gaps.len() as u32 - 1),
        "spread {spread:?}"
    );
    // Recorded in the `logging` phase, after the last byte reached the device.
    let counted = eventually(Duration::from_secs(2), || async {
        gw.metrics().await.contains("protocol=\"sse\"")
    })
    .await;
    assert!(counted, "{}", gw.metrics().await);
}
