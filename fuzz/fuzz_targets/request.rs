//! OpenAI request bodies of all four APIs, as raw bytes: `openai::request::parse`
//! and the whole body step `gateway::plan_route` (parse, resolve, `model` rewrite).
//!
//! Input: byte 0 picks the API (and the routing draw), the rest is the body.
//! Any UTF-8 body: `json::Node::parse` (its fast reader, serde_json where that
//! gives up) accepts exactly what serde_json alone accepts, as the same tree.
//! Invariants on an accepted body: it is a JSON object; `model_span` covers the
//! `model` value, a JSON string that decodes to `model`; splicing another model in
//! there (what the gateway sends upstream) parses to the same request with only
//! the model changed; a planned route's rewritten body names the target model.
#![no_main]

use fuzz_support::plant;
use inference_gateway::config::Config;
use inference_gateway::gateway::plan_route;
use inference_gateway::openai::json::Node;
use inference_gateway::openai::request::{parse, rewrite_model};
use inference_gateway::openai::ApiKind;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const KINDS: [ApiKind; 4] = [
    ApiKind::ChatCompletions,
    ApiKind::Completions,
    ApiKind::Embeddings,
    ApiKind::Responses,
];

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        Config::from_json(
            br#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:8001", "127.0.0.1:8002"]},
                          {"name": "q", "endpoints": ["[::1]:9000"]}],
                 "objectives": [{"name": "interactive", "priority": 10}, {"name": "batch", "priority": -1}],
                 "models": [{"name": "m", "pool": "p"},
                            {"name": "food-review", "pool": "p", "criticality": "Standard",
                             "target_models": [{"name": "food-review-v1", "weight": 90},
                                               {"name": "food-review-v2", "weight": 10}]},
                            {"name": "chat", "pool": "q", "objective": "batch"}],
                 "default_pool": "q"}"#,
        )
        .expect("the fuzz config is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((sel, body)) = fuzz_support::split_first(data) else {
        return;
    };
    let kind = KINDS[(sel & 3) as usize];
    if let Ok(text) = std::str::from_utf8(body) {
        match (Node::parse(text), Node::parse_with_serde_json(text)) {
            (Ok(a), Ok(b)) => assert!(
                a.same_reading(&b),
                "the two readers disagree: {a:?} vs {b:?}"
            ),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("the fast reader says {a:?}, serde_json {b:?}"),
        }
    }
    let Ok(p) = parse(kind, body) else {
        // A rejected body must also be rejected by the route planner.
        assert!(plan_route(config(), kind, body, None, 0).is_err());
        return;
    };

    let text = std::str::from_utf8(body).expect("accepted bodies are UTF-8");
    assert!(text.trim_start().starts_with('{'), "accepted a non-object");
    assert!(!p.model.is_empty());
    let literal = &text[p.model_span.clone()];
    assert_eq!(
        serde_json::from_str::<String>(literal).ok().as_deref(),
        Some(p.model.as_str()),
        "model_span {:?} does not hold the model",
        p.model_span
    );

    let rewritten = rewrite_model(body, &p.model_span, "fuzz/\"rewritten\"\u{e9}");
    let q = parse(kind, &rewritten).expect("a rewritten accepted body parses");
    assert_eq!(q.model, "fuzz/\"rewritten\"\u{e9}");
    assert_eq!(
        (q.stream, q.include_usage, q.priority, &q.prompt),
        (p.stream, p.include_usage, p.priority, &p.prompt)
    );

    let header = match sel >> 2 & 3 {
        0 => None,
        1 => Some("interactive"),
        2 => Some("batch"),
        _ => Some("nope"),
    };
    let draw = u32::from(sel).wrapping_mul(0x9E37_79B9);
    if let Ok(plan) = plan_route(config(), kind, body, header, draw) {
        assert_eq!(plan.model, p.model);
        assert_eq!(plan.prompt, p.prompt);
        match &plan.new_body {
            Some(b) => {
                let r = parse(kind, b).expect("the rewritten body parses");
                assert_eq!(r.model, plan.target_model);
            }
            None => assert_eq!(plan.target_model, p.model),
        }
    }

    plant("request", || {
        kind == ApiKind::Responses
            && p.stream
            && p.priority.is_some_and(|x| x >= 10)
            && p.prompt.split('\n').count() >= 3
    });
});
