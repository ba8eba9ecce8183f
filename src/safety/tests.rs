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
fn error_event_starts_an_event_of_its_own() {
    assert_eq!(error_event(b"{}", false), b"data: {}\n\n");
    assert_eq!(error_event(b"{}", true), b"\ndata: {}\n\n");
}

fn safety(extra: &str) -> Safety {
    serde_json::from_str::<config::RawSafety>(&format!(
        r#"{{"cluster": "c", "max_check_text_bytes": 100, "check_overlap_bytes": 10,
            "max_checks_per_request": 3 {extra}}}"#
    ))
    .unwrap()
    .validate()
    .unwrap()
}

#[test]
fn prompts_past_the_call_limit_are_split_or_refused() {
    let s = safety("");
    assert!(prompt_calls(&s, "  \n", false, "messages")
        .unwrap()
        .is_empty());
    assert_eq!(
        prompt_calls(&s, "short", false, "messages").unwrap(),
        vec!["short"]
    );
    let long = "x".repeat(250);
    let calls = prompt_calls(&s, &long, false, "messages").unwrap();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.len() <= 100));
    let too_long = "x".repeat(400);
    let e = prompt_calls(&s, &too_long, false, "messages").unwrap_err();
    assert_eq!((e.status, e.code), (413, "prompt_too_large_to_screen"));
    let refuse = safety(r#", "oversize_text": "refuse""#);
    let e = prompt_calls(&refuse, &long, false, "messages").unwrap_err();
    assert_eq!(e.status, 413);
    let e = prompt_calls(&s, "", true, "prompt").unwrap_err();
    assert_eq!(
        (e.status, e.code, e.param.as_deref()),
        (400, "invalid_value", Some("prompt"))
    );
    let e = response_calls(&s, &too_long).unwrap_err();
    assert_eq!((e.status, e.code), (502, "response_too_large_to_screen"));
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
    assert_eq!(
        field(r#"{"cluster": "c", "max_check_text_bytes": 100, "check_overlap_bytes": 60}"#),
        "safety.check_overlap_bytes"
    );
    assert_eq!(
        field(r#"{"cluster": "c", "max_checks_per_request": 0}"#),
        "safety.max_checks_per_request"
    );
    assert_eq!(
        field(r#"{"cluster": "c", "stream_window_chars": 0}"#),
        "safety.stream_window_chars"
    );
    let d = parse(r#"{"cluster": "c"}"#).unwrap();
    assert_eq!(
        d.stream.mode,
        stream::StreamMode::Hold {
            window_chars: 200,
            window_ms: 250
        },
        "hold is the default"
    );
    let only_prompts = parse(
        r#"{"cluster": "c", "events": ["RequestBody"],
            "default": {"model_response_template_id": "projects/p/locations/l/templates/o"}}"#,
    )
    .unwrap();
    assert_eq!(only_prompts.response_template("m"), None);
}
