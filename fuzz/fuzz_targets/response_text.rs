//! The text of a non-streamed response that the response check screens
//! (`safety::response_text`: chat, completions and Responses API shapes).
//! Invariant: a body that is not JSON has no text; a JSON one always has some
//! (possibly empty) text.
#![no_main]

use fuzz_support::plant;
use inference_gateway::safety::response_text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = response_text(data);
    let is_json = serde_json::from_slice::<serde_json::Value>(data).is_ok();
    assert_eq!(text.is_some(), is_json);
    // Three text parts: with no escapes in the body, every newline is a join
    // (the seeds have at most two).
    plant("response_text", || {
        !data.contains(&b'\\') && text.as_deref().is_some_and(|t| t.split('\n').count() >= 3)
    });
});
