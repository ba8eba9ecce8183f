//! OpenAI request bodies built from structure (`arbitrary`, see
//! `fuzz_support::request_body`), so most inputs are well-formed JSON objects with
//! the fields the parser looks at: chat messages with string or part-array
//! content, tool calls, Responses input items, `stream_options`, priorities,
//! token-id prompts, odd whitespace and `\u` escapes. Checks the same invariants as
//! `request`, plus a small oracle: an accepted body's `model` is the string that
//! was generated.
#![no_main]

use fuzz_support::plant;
use fuzz_support::request_body::Body;
use inference_gateway::openai::request::{parse, rewrite_model};
use inference_gateway::openai::ApiKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|b: Body| {
    let body = b.render();
    let kind = b.api();
    let Ok(p) = parse(kind, &body) else {
        return;
    };
    if let Some(m) = &b.model {
        // Duplicate `model` keys are rejected, so the generated one is the one.
        assert_eq!(&p.model, m);
    }
    let text = std::str::from_utf8(&body).unwrap();
    assert_eq!(
        serde_json::from_str::<String>(&text[p.model_span.clone()]).ok(),
        Some(p.model.clone())
    );
    let rewritten = rewrite_model(&body, &p.model_span, "m2");
    let q = parse(kind, &rewritten).expect("a rewritten accepted body parses");
    assert_eq!(q.model, "m2");
    assert_eq!(
        (q.stream, q.include_usage, q.priority, &q.prompt),
        (p.stream, p.include_usage, p.priority, &p.prompt)
    );

    plant("request_structured", || {
        kind == ApiKind::Responses && p.stream && p.prompt.split('\n').count() >= 2
    });
});
