//! The streaming `usage` scanner (`observe::usage::UsageScanner`), over JSON bodies
//! and SSE streams split anywhere.
//!
//! Input: byte 0 says how many cut points follow, then the cut points, then the
//! response. Invariant: the usage found does not depend on the chunking.
#![no_main]

use fuzz_support::{chunks, plant};
use inference_gateway::observe::usage::UsageScanner;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((n, rest)) = fuzz_support::split_first(data) else {
        return;
    };
    let ncuts = (n as usize % 8).min(rest.len());
    let (cuts, body) = rest.split_at(ncuts);

    let mut whole = UsageScanner::new();
    whole.feed(body);
    let mut split = UsageScanner::new();
    for c in chunks(body, cuts) {
        split.feed(c);
    }
    assert_eq!(whole.usage(), split.usage(), "chunking changed the usage");

    let usage = whole.usage();
    plant("usage", || {
        usage.is_some_and(|u| u.prompt_tokens >= 40 && u.completion_tokens % 2 == 1)
    });
});
