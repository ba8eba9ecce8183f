use super::sse::{self, SseText};
use super::*;

#[test]
fn builds_model_armor_requests() {
    let t = "projects/p1/locations/us-central1/templates/t1";
    let (path, body) = request(Check::Prompt, t, "hello \"x\"");
    assert_eq!(
        path,
        "/v1/projects/p1/locations/us-central1/templates/t1:sanitizeUserPrompt"
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["userPromptData"]["text"], "hello \"x\"");
    let (path, body) = request(Check::Response, t, "out");
    assert!(path.ends_with(":sanitizeModelResponse"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["modelResponseData"]["text"], "out");
}

#[test]
fn reads_verdicts() {
    let pass =
        br#"{"sanitizationResult":{"filterMatchState":"NO_MATCH_FOUND","filterResults":{}}}"#;
    assert_eq!(verdict(Some(200), pass), Ok(Verdict::Pass));
    let block = br#"{"sanitizationResult":{"filterMatchState":"MATCH_FOUND","filterResults":{
        "pi_and_jailbreak":{"piAndJailbreakFilterResult":{"executionState":"EXECUTION_SUCCESS","matchState":"MATCH_FOUND","confidenceLevel":"HIGH"}},
        "rai":{"raiFilterResult":{"matchState":"MATCH_FOUND","raiFilterTypeResults":{
            "dangerous":{"matchState":"MATCH_FOUND"},"harassment":{"matchState":"NO_MATCH_FOUND"}}}},
        "sdp":{"sdpFilterResult":{"inspectResult":{"matchState":"NO_MATCH_FOUND"}}},
        "malicious_uris":{"maliciousUriFilterResult":{"matchState":"NO_MATCH_FOUND"}}}}}"#;
    assert_eq!(
        verdict(Some(200), block),
        Ok(Verdict::Block(vec![
            "pi_and_jailbreak".into(),
            "rai/dangerous".into()
        ]))
    );
}

#[test]
fn failures_are_told_apart() {
    assert_eq!(verdict(None, b""), Err(CheckFailure::Timeout));
    assert_eq!(verdict(Some(503), b"{}"), Err(CheckFailure::Status(503)));
    assert!(matches!(
        verdict(Some(200), b"garbage"),
        Err(CheckFailure::Unparsable(_))
    ));
    assert!(matches!(
        verdict(Some(200), b"{}"),
        Err(CheckFailure::Unparsable(_))
    ));
    assert!(matches!(
        verdict(
            Some(200),
            br#"{"sanitizationResult":{"filterMatchState":"MAYBE"}}"#
        ),
        Err(CheckFailure::Unparsable(_))
    ));
}

#[test]
fn errors_never_echo_the_text() {
    let e = blocked_error(Check::Prompt, &["pi_and_jailbreak".into()], 403);
    assert_eq!((e.status, e.code), (403, "content_blocked"));
    assert!(e.message.contains("pi_and_jailbreak"));
    let e = unavailable_error(Check::Response, &CheckFailure::Timeout);
    assert_eq!(e.status, 503);
}

#[test]
fn extracts_response_text() {
    let chat = br#"{"choices":[{"message":{"role":"assistant","content":"card 4111 1111"}}]}"#;
    assert_eq!(response_text(chat).unwrap(), "card 4111 1111");
    let completion = br#"{"choices":[{"text":"a"},{"text":"b"}]}"#;
    assert_eq!(response_text(completion).unwrap(), "a\nb");
    assert!(response_text(b"not json").is_none());
}

#[test]
fn sse_accumulates_text_and_holds_back_done() {
    let mut s = SseText::new(1000);
    let a = s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choi");
    assert_eq!(
        a,
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n"
    );
    let b = s.feed(b"ces\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DO");
    assert_eq!(
        b,
        b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n"
    );
    let c = s.feed(b"NE]\n\n");
    assert!(
        c.is_empty(),
        "the [DONE] event is removed with its blank line"
    );
    assert!(s.done_seen);
    assert_eq!(s.text(), "Hello");
    assert!(s.finish().is_empty());
}

#[test]
fn sse_completions_and_limits() {
    let mut s = SseText::new(3);
    s.feed(
        b"data: {\"choices\":[{\"text\":\"ab\"}]}\n\ndata: {\"choices\":[{\"text\":\"cd\"}]}\n\n",
    );
    assert_eq!(s.text(), "ab");
    assert!(s.truncated);
    let mut s = SseText::new(10);
    assert!(s.feed(b"data: [DONE]").is_empty());
    assert!(s.finish().is_empty());
    assert!(s.done_seen);
    assert_eq!(sse::error_event(b"{}"), b"data: {}\n\n");
}

#[test]
fn config_validation() {
    let parse = |j: &str| {
        serde_json::from_str::<config::RawSafety>(j)
            .unwrap()
            .validate()
    };
    let s = parse(
        r#"{"cluster": "model-armor",
            "model_armor_settings": [{"model": "m",
                "user_prompt_template_id": "projects/p/locations/l/templates/in",
                "model_response_template_id": "projects/p/locations/l/templates/out"}],
            "default": {"user_prompt_template_id": "projects/p/locations/l/templates/d"},
            "headers": {"authorization": "Bearer x"}}"#,
    )
    .unwrap();
    assert_eq!(
        s.prompt_template("m"),
        Some("projects/p/locations/l/templates/in")
    );
    assert_eq!(
        s.response_template("m"),
        Some("projects/p/locations/l/templates/out")
    );
    assert_eq!(
        s.prompt_template("other"),
        Some("projects/p/locations/l/templates/d")
    );
    assert_eq!(s.response_template("other"), None);
    assert_eq!(
        (s.timeout_ms, s.fail_open, s.block_status),
        (1000, false, 403)
    );
    assert_eq!(s.authority, "model-armor");

    let field = |j: &str| parse(j).unwrap_err().field;
    assert_eq!(
        field(
            r#"{"cluster": "c", "model_armor_settings": [{"model": "m", "user_prompt_template_id": "templates/x"}]}"#
        ),
        "safety.model_armor_settings[0].user_prompt_template_id"
    );
    assert_eq!(
        field(r#"{"cluster": "c", "model_armor_settings": [{}]}"#),
        "safety.model_armor_settings[0].model"
    );
    assert_eq!(
        field(r#"{"cluster": "c", "headers": {"Authorization": "x"}}"#),
        "safety.headers.Authorization"
    );
    assert_eq!(
        field(r#"{"cluster": "c", "timeout_ms": 0}"#),
        "safety.timeout_ms"
    );
    let only_prompts = parse(
        r#"{"cluster": "c", "events": ["RequestBody"],
            "default": {"model_response_template_id": "projects/p/locations/l/templates/o"}}"#,
    )
    .unwrap();
    assert_eq!(only_prompts.response_template("m"), None);
}
