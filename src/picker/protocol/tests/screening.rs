//! Prompt and response screening in the exchange (`picker::safety`): the calls it
//! asks for, what it holds, what a verdict releases or replaces.

use super::*;

const PROMPT_T: &str = "projects/p/locations/l/templates/prompt";
const RESPONSE_T: &str = "projects/p/locations/l/templates/response";
const PASS: &[u8] = br#"{"sanitizationResult":{"filterMatchState":"NO_MATCH_FOUND"}}"#;
const BLOCK: &[u8] = br#"{"sanitizationResult":{"filterMatchState":"MATCH_FOUND","filterResults":{"sdp":{"sdpFilterResult":{"inspectResult":{"matchState":"MATCH_FOUND"}}}}}}"#;

fn guarded(extra: &str) -> Arc<Picker> {
    let p = picker(&format!(
        r#", "safety": {{"cluster": "unused", "default":
              {{"user_prompt_template_id": "{PROMPT_T}", "model_response_template_id": "{RESPONSE_T}"}}
              {extra}}}"#
    ));
    feed(&p, [4, 0, 3]);
    p
}

fn json_response_headers() -> ProcessingRequest {
    msg(processing_request::Request::ResponseHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![hv(":status", "200"), hv("content-type", "application/json")],
        }),
        ..Default::default()
    }))
}

/// The call's text (the JSON body's `…Data.text`).
fn call_text(c: &SafetyCall) -> String {
    let v: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
    let data = v
        .get("userPromptData")
        .or_else(|| v.get("modelResponseData"))
        .unwrap();
    data["text"].as_str().unwrap().to_string()
}

/// A routed exchange (the prompt passed), in `mode` both ways.
fn routed(p: &Arc<Picker>, mode: i32) -> Exchange {
    let mut x = exchange(p);
    x.on_message(headers("/v1/completions", &[], mode));
    x.on_message(body(BODY, true));
    let c = x.take_calls();
    assert_eq!(c.len(), 1);
    let out = x.on_verdict(c[0].id, Some(200), PASS);
    assert!(!out.is_empty());
    x
}

#[test]
fn the_request_waits_for_its_prompt_check_and_goes_on_when_it_passed() {
    let p = guarded("");
    let mut x = exchange(&p);
    assert!(x.on_message(headers("/v1/completions", &[], 4)).is_empty());
    assert!(
        x.on_message(body(BODY, true)).is_empty(),
        "held while screened"
    );
    let calls = x.take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].path,
        format!("/v1/{PROMPT_T}:sanitizeUserPrompt"),
        "Model Armor's method on the model's template"
    );
    assert_eq!(call_text(&calls[0]), "hello there");
    assert!(x.take_calls().is_empty(), "taken once");
    assert_eq!(
        in_flight(&p, "127.0.0.1:2"),
        0,
        "no pick before the verdict"
    );

    let out = x.on_verdict(calls[0].id, Some(200), PASS);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        metadata_destination(&out[0]).as_deref(),
        Some("127.0.0.1:2")
    );
    assert_eq!(streamed(&out[1]), (BODY.to_vec(), true));
    assert_eq!(in_flight(&p, "127.0.0.1:2"), 1);
    // A stray answer (an id never asked, or asked twice) changes nothing.
    assert!(x.on_verdict(calls[0].id, Some(200), BLOCK).is_empty());
    assert!(x.on_verdict(99, Some(200), BLOCK).is_empty());
}

#[test]
fn a_blocked_prompt_or_an_unavailable_service_never_reaches_a_model_server() {
    let p = guarded("");
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    x.on_message(body(BODY, true));
    let c = x.take_calls();
    let out = x.on_verdict(c[0].id, Some(200), BLOCK);
    let (status, err, _) = immediate_of(&out[0]);
    assert_eq!(status, 403);
    assert_eq!(err["error"]["code"], "content_blocked");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("sdp"),
        "{err}"
    );
    assert!(!err.to_string().contains("hello there"), "never the text");
    drop(x);
    assert_eq!(EPS.iter().map(|e| in_flight(&p, e)).sum::<u64>(), 0);

    // Down, 5xx, garbage: 503 unless fail_open.
    for (status, answer) in [(None, &b""[..]), (Some(500), b"oops"), (Some(200), b"{}")] {
        let mut x = exchange(&p);
        x.on_message(headers("/v1/completions", &[], 4));
        x.on_message(body(BODY, true));
        let c = x.take_calls();
        let (code, err, _) = immediate_of(&x.on_verdict(c[0].id, status, answer)[0]);
        assert_eq!(
            (code, err["error"]["code"].as_str()),
            (503, Some("safety_check_unavailable"))
        );
    }
    let counters = p.counters_text();
    for line in [
        "# TYPE inference_gateway_safety_blocks_total counter",
        r#"inference_gateway_safety_blocks_total{check="prompt",filter="sdp"} 1"#,
        r#"inference_gateway_safety_checks_total{check="prompt"} 4"#,
        r#"inference_gateway_safety_failures_total{check="prompt"} 3"#,
    ] {
        assert!(counters.lines().any(|l| l == line), "{line}\n{counters}");
    }
    let open = guarded(r#", "fail_open": true"#);
    let mut x = exchange(&open);
    x.on_message(headers("/v1/completions", &[], 4));
    x.on_message(body(BODY, true));
    let c = x.take_calls();
    let out = x.on_verdict(c[0].id, None, b"");
    assert_eq!(
        metadata_destination(&out[0]).as_deref(),
        Some("127.0.0.1:2")
    );
    assert!(open
        .counters_text()
        .contains(r#"inference_gateway_safety_fail_open_total{check="prompt"} 1"#));
}

#[test]
fn a_long_prompt_takes_several_calls_that_must_all_pass() {
    let p = guarded(r#", "max_check_text_bytes": 64, "check_overlap_bytes": 8"#);
    let long = "word ".repeat(40);
    let req = format!(r#"{{"model":"m","prompt":"{long}"}}"#);
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    x.on_message(body(req.as_bytes(), true));
    let calls = x.take_calls();
    assert!(calls.len() >= 3, "{}", calls.len());
    for c in &calls[..calls.len() - 1] {
        assert!(x.on_verdict(c.id, Some(200), PASS).is_empty(), "not yet");
    }
    let out = x.on_verdict(calls.last().unwrap().id, Some(200), PASS);
    assert!(metadata_destination(&out[0]).is_some());

    // Token ids cannot be read by a text check: refused, not passed.
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    let out = x.on_message(body(br#"{"model":"m","prompt":[1,2,3]}"#, true));
    assert_eq!(immediate_of(&out[0]).0, 400);
    assert!(x.take_calls().is_empty());
}

#[test]
fn a_non_streamed_response_is_held_whole_until_its_text_passed() {
    let p = guarded("");
    let answer = br#"{"choices":[{"text":"a fine pizza"}],"usage":{"completion_tokens":3}}"#;
    for verdict in [PASS, BLOCK] {
        let mut x = routed(&p, 4);
        assert!(
            x.on_message(json_response_headers()).is_empty(),
            "headers held"
        );
        assert!(x.on_message(response_body(&answer[..20], false)).is_empty());
        assert!(x.on_message(response_body(&answer[20..], true)).is_empty());
        let calls = x.take_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].path,
            format!("/v1/{RESPONSE_T}:sanitizeModelResponse")
        );
        assert_eq!(call_text(&calls[0]), "a fine pizza");
        let out = x.on_verdict(calls[0].id, Some(200), verdict);
        if verdict == PASS {
            assert!(matches!(out[0].response, Some(Out::ResponseHeaders(_))));
            let bytes: Vec<u8> = out[1..].iter().flat_map(|r| streamed(r).0).collect();
            assert_eq!(bytes, answer.to_vec(), "as it came");
            assert!(streamed(out.last().unwrap()).1, "and ended");
        } else {
            let (status, err, _) = immediate_of(&out[0]);
            assert_eq!(
                (status, err["error"]["code"].as_str()),
                (403, Some("content_blocked"))
            );
            assert!(!err.to_string().contains("pizza"));
        }
    }
    // Larger than max_response_bytes: refused at once, never passed on.
    let small = guarded(r#", "max_response_bytes": 16"#);
    let mut x = routed(&small, 4);
    x.on_message(json_response_headers());
    let out = x.on_message(response_body(answer, false));
    assert_eq!(immediate_of(&out[0]).0, 502);
}

#[test]
fn buffered_responses_are_screened_in_their_one_body_message() {
    let p = guarded("");
    let mut x = routed(&p, 2);
    let out = x.on_message(json_response_headers());
    assert!(
        matches!(out[0].response, Some(Out::ResponseHeaders(_))),
        "answered"
    );
    let answer = br#"{"choices":[{"text":"secret stuff"}]}"#;
    assert!(x.on_message(response_body(answer, true)).is_empty());
    let c = x.take_calls();
    assert_eq!(call_text(&c[0]), "secret stuff");
    let out = x.on_verdict(c[0].id, Some(200), BLOCK);
    assert_eq!(immediate_of(&out[0]).0, 403);
}

fn sse(text: &str) -> Vec<u8> {
    format!("data: {{\"choices\":[{{\"text\":\"{text}\"}}]}}\n\n").into_bytes()
}

#[test]
fn a_streamed_response_is_released_as_its_windows_pass_and_cut_on_a_block() {
    // Hold mode, windows of 10 characters, no holdback (StreamScreen's own tests
    // cover it).
    let p = guarded(
        r#", "stream_mode": "hold", "stream_window_chars": 10, "stream_holdback_bytes": 0"#,
    );
    let mut x = routed(&p, 4);
    let out = x.on_message(response_headers("200", None));
    let Some(Out::ResponseHeaders(h)) = &out[0].response else {
        panic!("{out:?}")
    };
    assert_eq!(
        mutation(h.response.as_ref().unwrap()).1,
        vec!["content-length".to_string()],
        "the ending may be ours"
    );
    assert!(x.wants_tick(), "a hold window may close on time");
    let first = sse("hello world, ");
    assert!(
        x.on_message(response_body(&first, false)).is_empty(),
        "nothing before its check passed"
    );
    let calls = x.take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(call_text(&calls[0]), "hello world, ");
    let out = x.on_verdict(calls[0].id, Some(200), PASS);
    let released: Vec<u8> = out.iter().flat_map(|r| streamed(r).0).collect();
    assert!(
        !released.is_empty() && first.starts_with(&released),
        "what passed goes out: {:?}",
        String::from_utf8_lossy(&released)
    );

    // The next window is blocked: what passed, then the error event, then nothing.
    let second = sse("the secret code is 1234");
    x.on_message(response_body(&second, false));
    let calls = x.take_calls();
    assert!(!calls.is_empty());
    let out = x.on_verdict(calls[0].id, Some(200), BLOCK);
    let (bytes, end) = streamed(&out[0]);
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("1234"),
        "no byte of the blocked window: {text}"
    );
    assert!(text.contains(r#""code":"content_blocked""#), "{text}");
    assert!(!end, "the stream ends with upstream's");
    for r in out.iter().skip(1) {
        assert!(streamed(r).0.is_empty());
    }
    assert!(!x.wants_tick());
    let out = x.on_message(response_body(&sse("more"), false));
    assert_eq!(streamed(&out[0]), (Vec::new(), false), "dropped");
    let out = x.on_message(response_body(b"data: [DONE]\n\n", true));
    assert_eq!(streamed(&out[0]), (Vec::new(), true), "ended");
    drop(x);
    assert_eq!(EPS.iter().map(|e| in_flight(&p, e)).sum::<u64>(), 0);
}

#[test]
fn a_stream_that_passed_ends_whole_after_its_last_check() {
    let p = guarded(r#", "stream_mode": "detect""#);
    let mut x = routed(&p, 4);
    x.on_message(response_headers("200", None));
    let mut sent = Vec::new();
    let mut upstream = Vec::new();
    for t in ["one ", "two ", "three"] {
        let c = sse(t);
        upstream.extend_from_slice(&c);
        for r in x.on_message(response_body(&c, false)) {
            sent.extend(streamed(&r).0);
        }
        assert_eq!(sent, upstream, "detect mode: lines go out at once");
    }
    upstream.extend_from_slice(b"data: [DONE]\n\n");
    let mut ended = false;
    for r in x.on_message(response_body(b"data: [DONE]\n\n", true)) {
        let (b, e) = streamed(&r);
        sent.extend(b);
        ended |= e;
    }
    assert!(!ended, "[DONE] waits for every check in detect mode");
    let calls = x.take_calls();
    assert!(!calls.is_empty());
    let n = calls.len();
    for (i, c) in calls.iter().enumerate() {
        for r in x.on_verdict(c.id, Some(200), PASS) {
            let (b, e) = streamed(&r);
            sent.extend(b);
            ended |= e;
        }
        assert_eq!(ended, i + 1 == n, "ends after the last verdict only");
    }
    assert_eq!(sent, upstream, "every byte, in order, once");
}
