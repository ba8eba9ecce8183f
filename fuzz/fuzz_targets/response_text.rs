//! The text of a non-streamed response that the response check screens, and of
//! one streamed event (`safety::text::{response_text, event_text}`), read
//! deny-by-default. Invariants: every JSON string the body holds outside the
//! known non-text members is in the text; a body that is not JSON is screened as
//! it is.
#![no_main]

use fuzz_support::plant;
use inference_gateway::safety::text::{event_text, response_text, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = response_text(data);
    let is_json = serde_json::from_slice::<serde_json::Value>(data).is_ok();
    if !is_json {
        assert_eq!(
            text,
            String::from_utf8_lossy(data),
            "not JSON: screened as it is"
        );
    }
    let mut streamed = String::new();
    event_text(data, &mut streamed);
    // Cutting for several calls never loses a byte.
    let pieces = split(&text, 32, 8);
    assert!(pieces.iter().all(|p| p.len() <= 32));
    assert!(text.is_empty() || text.ends_with(pieces[pieces.len() - 1]));
    assert!(text.starts_with(pieces[0]));
    // Three text parts: with no escapes in the body, every newline is a join
    // (the seeds have at most two).
    plant("response_text", || {
        is_json && !data.contains(&b'\\') && text.split('\n').count() >= 3
    });
});
