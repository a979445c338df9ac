//! The SSE meter never panics and does not depend on how the stream is chunked.
#![no_main]
use libfuzzer_sys::fuzz_target;
use policy::metering::SseMeter;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else { return };
    let mut whole = SseMeter::new();
    whole.feed(body);
    let mut chunked = SseMeter::new();
    let step = usize::from(split).max(1);
    for chunk in body.chunks(step) {
        chunked.feed(chunk);
    }
    assert_eq!(whole.usage(), chunked.usage(), "chunking changed the usage");
});
