//! The WebSocket frame parser and session meter never panic on any byte stream, in either
//! direction, however it is chunked; chunking does not change the usage.
#![no_main]
use libfuzzer_sys::fuzz_target;
use policy::metering::WsSessionMeter;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else { return };
    let mid = body.len() / 2;
    let (up, down) = body.split_at(mid);
    let mut whole = WsSessionMeter::default();
    let a = (whole.feed_uplink(up).is_ok(), whole.feed_downlink(down).is_ok());
    let mut chunked = WsSessionMeter::default();
    let step = usize::from(split).max(1);
    let mut ok_up = true;
    for c in up.chunks(step) {
        ok_up &= chunked.feed_uplink(c).is_ok();
    }
    let mut ok_down = true;
    for c in down.chunks(step) {
        ok_down &= chunked.feed_downlink(c).is_ok();
    }
    if a == (true, true) && ok_up && ok_down {
        assert_eq!(whole.usage(), chunked.usage(), "chunking changed the usage");
    }
});
