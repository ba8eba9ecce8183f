//! The SSE text accumulator of the response check (`safety::sse::SseText`).
//! Kept small on purpose: the module is being replaced by a stream screener, and
//! this target should move with it.
//!
//! Input: byte 0 sets `max_text`, byte 1 how many cut points follow, then the cut
//! points, then the stream. Invariants: the result does not depend on where the
//! stream is split into chunks; the text stays within `max_text`; what is passed on
//! is the input with `data: [DONE]` events removed (never longer than the input).
#![no_main]

use fuzz_support::{chunks, plant};
use inference_gateway::safety::sse::SseText;
use libfuzzer_sys::fuzz_target;

fn run(max_text: usize, parts: &[&[u8]]) -> (Vec<u8>, String, bool, bool) {
    let mut s = SseText::new(max_text);
    let mut out = Vec::new();
    for p in parts {
        out.extend(s.feed(p));
    }
    out.extend(s.finish());
    (out, s.text().to_string(), s.truncated, s.done_seen)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max_text = data[0] as usize * 4;
    let ncuts = (data[1] as usize % 8).min(data.len() - 2);
    let (cuts, stream) = data[2..].split_at(ncuts);

    let whole = run(max_text, &[stream]);
    let split = run(max_text, &chunks(stream, cuts));
    assert_eq!(whole, split, "chunking changed the result");
    assert!(whole.1.len() <= max_text);
    assert!(whole.0.len() <= stream.len());

    let (_, text, truncated, done) = whole;
    plant("sse", || done && truncated && text.len() >= 6);
});
