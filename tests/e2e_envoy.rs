//! End to end: the real Envoy 1.40 running the compiled filter
//! (`env!("GATEWAY_WASM")`) in front of the project's model-server simulators.
//!
//! Envoy runs in Docker (testcontainers, host network) or natively, as
//! `GATEWAY_E2E_RUNTIME=docker|native|auto` says (see `tests/support/envoy.rs`);
//! the choice is printed once per run. Every test has its own Envoy, replicas and
//! ports on 127.0.0.1, and every wait is bounded.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::api::{chat, openai_error, server_id, sse_data, streamed_content};
use support::deploy::envoy_config::{DEMO_WASM_PATH, DESTINATION_HEADER, ENVOY_YAML_PATH};
use support::gateway::{Gateway, GatewayOptions};
use support::sim::{self, SimOptions, SERVER_ID_HEADER};

const SETTLE: Duration = Duration::from_secs(10);

#[test]
fn committed_envoy_yaml_passes_envoy_validate() {
    let elf = support::envoy::native_envoy();
    let repo = support::repo_root();
    // The bootstrap names the .wasm relative to the repository root. When the
    // build put it elsewhere (CARGO_TARGET_DIR, INFERENCE_GATEWAY_WASM), validate
    // from a directory where that relative path leads to the current module.
    let wasm = support::wasm_path();
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let scratch = tempfile::tempdir().unwrap();
    let cwd = if same(&repo.join(DEMO_WASM_PATH), &wasm) {
        repo.clone()
    } else {
        let link = scratch.path().join(DEMO_WASM_PATH);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&wasm, &link).unwrap();
        scratch.path().to_path_buf()
    };
    let out = Command::new(&elf)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(repo.join(ENVOY_YAML_PATH))
        .current_dir(&cwd)
        .output()
        .expect("run envoy --mode validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "envoy --mode validate failed:\n{text}"
    );
    assert!(text.contains("OK"), "{text}");
    // The filter itself accepted both plugin configurations.
    assert!(text.contains("configured as Gateway"), "{text}");
    assert!(text.contains("configured as Control"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_request_is_answered_by_a_replica_that_saw_the_body() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let body = chat("chat", "Is this a good pizza?");
    let resp = gw.post_json("/v1/chat/completions", &body).await;
    let status = resp.status();
    let id = server_id(&resp);
    let answer: Value = resp.json().await.expect("a JSON completion");
    assert_eq!(status, 200, "{answer}");
    assert!(answer["choices"].is_array(), "{answer}");

    let replica = gw.sim(&id);
    let seen = replica.requests(&gw.client).await;
    assert_eq!(seen.len(), 1, "{id} saw {seen:?}");
    assert_eq!(seen[0]["method"], "POST");
    assert_eq!(seen[0]["path"], "/v1/chat/completions");
    assert_eq!(sim::body_json(&seen[0]), Some(body));
    // The replica is the one the filter chose.
    assert_eq!(
        sim::header(&seen[0], DESTINATION_HEADER),
        Some(replica.endpoint().as_str())
    );
    for other in gw.sims.iter().filter(|s| s.id != id) {
        assert!(
            other.requests(&gw.client).await.is_empty(),
            "{} saw a request",
            other.id
        );
    }

    // The legacy completions API takes the same way.
    let resp = gw
        .post_json(
            "/v1/completions",
            &json!({"model": "chat", "prompt": "Once upon a time", "max_tokens": 4}),
        )
        .await;
    let status = resp.status();
    let id = server_id(&resp);
    assert_eq!(status, 200, "{}", resp.text().await.unwrap_or_default());
    let seen = gw.sim(&id).requests(&gw.client).await;
    assert!(
        seen.iter().any(|r| r["path"] == "/v1/completions"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_target_model_is_rewritten_with_a_correct_content_length() {
    let gw = Gateway::start(GatewayOptions {
        configure: Box::new(|s| {
            s.gateway_config["models"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "summarize", "pool": "demo-pool",
                             "target_models": [{"name": "summarize-lora-v3", "weight": 1}]}));
        }),
        ..Default::default()
    })
    .await;

    // Odd spacing and escapes: everything but the model must arrive byte for byte.
    let raw = r#"{"model" :  "summarize", "messages": [{"role": "user", "content": "Sum up: \"caf\u00e9\" \u2014 ok?"}], "max_tokens": 4}"#;
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let id = server_id(&resp);
    assert_eq!(
        status,
        200,
        "the upstream must parse the rewritten body: {}",
        resp.text().await.unwrap_or_default()
    );
    let seen = gw.sim(&id).requests(&gw.client).await;
    assert_eq!(seen.len(), 1);
    let expected = raw.replacen(r#""summarize""#, r#""summarize-lora-v3""#, 1);
    // The replica records the body parsed, or as a string when it could not parse it.
    match &seen[0]["body"] {
        Value::String(got) => assert_eq!(got, &expected, "the replica could not parse the body"),
        other => assert_eq!(other, &serde_json::from_str::<Value>(&expected).unwrap()),
    }
    assert_eq!(
        sim::header(&seen[0], "content-length"),
        Some(expected.len().to_string().as_str()),
        "content-length must match the rewritten body"
    );

    // The demo's 90/10 split: every request goes to one of the two targets, the
    // rest of the body untouched.
    let mut targets = BTreeMap::<String, usize>::new();
    for i in 0..12 {
        let body = chat("food-review", &format!("review #{i}: crust was great"));
        let resp = gw.post_json("/v1/chat/completions", &body).await;
        let status = resp.status();
        let id = server_id(&resp);
        assert_eq!(status, 200, "{}", resp.text().await.unwrap_or_default());
        let seen = gw.sim(&id).requests(&gw.client).await;
        let last = seen.last().expect("the replica recorded the request");
        let got = sim::body_json(last).expect("JSON body");
        let model = got["model"].as_str().unwrap_or_default().to_string();
        assert!(
            model == "food-review-v1" || model == "food-review-v2",
            "model arrived as '{model}'"
        );
        assert_eq!(got["messages"], body["messages"]);
        assert!(
            last["body"].is_object(),
            "the replica could not parse {last}"
        );
        let sent = body.to_string().len() - "food-review".len() + model.len();
        assert_eq!(
            sim::header(last, "content-length"),
            Some(sent.to_string().as_str()),
            "content-length of the rewritten body"
        );
        *targets.entry(model).or_default() += 1;
    }
    assert!(
        targets.get("food-review-v1").copied().unwrap_or(0) >= 1,
        "{targets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sse_passes_through_intact_and_incrementally() {
    let gw = Gateway::start(GatewayOptions {
        replicas: 1,
        sim: SimOptions {
            per_token_ms: 60,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut body = chat("chat", "Tell me a story");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(20);

    let started = Instant::now();
    let resp = gw.post_json("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut first_chunk_at = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("the stream ends cleanly");
        first_chunk_at.get_or_insert_with(|| started.elapsed());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let total = started.elapsed();
    let first = first_chunk_at.expect("some bytes");
    assert!(
        first * 3 < total,
        "the stream was buffered: first bytes after {first:?} of {total:?}"
    );

    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}"));
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
    }

    // Straight from the replica, the same request streams the same content.
    let direct = gw
        .client
        .post(gw.sims[0].url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let direct_events = sse_data(&direct);
    assert_eq!(
        events.len(),
        direct_events.len(),
        "via gateway:\n{text}\ndirect:\n{direct}"
    );
    assert_eq!(streamed_content(&events), streamed_content(&direct_events));
    gw.wait_all_released(SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_vm_keeps_serving() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let chat_url = gw.url("/v1/chat/completions");
    let max = gw.settings.max_request_body_bytes() as usize;
    let valid = chat("chat", "still there?");
    let mut served = 0;

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "invalid JSON",
            gw.client
                .post(&chat_url)
                .header("content-type", "application/json")
                .body(r#"{"model": "chat", "messages": ["#),
            400,
            "invalid_json",
        ),
        (
            "missing model",
            gw.client
                .post(&chat_url)
                .header("content-type", "application/json")
                .body(r#"{"messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "missing_model",
        ),
        (
            "unknown model",
            gw.client
                .post(&chat_url)
                .header("content-type", "application/json")
                .body(chat("no-such-model", "hi").to_string()),
            404,
            "model_not_found",
        ),
        (
            "oversize body with content-length",
            gw.client
                .post(&chat_url)
                .header("content-type", "application/json")
                .body(oversize_body(max)),
            413,
            "request_too_large",
        ),
        (
            "oversize body, chunked",
            gw.client
                .post(&chat_url)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                    oversize_body(max)
                        .into_bytes()
                        .chunks(64 * 1024)
                        .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                        .collect::<Vec<_>>(),
                ))),
            413,
            "request_too_large",
        ),
        (
            "wrong method",
            gw.client.get(&chat_url),
            405,
            "method_not_allowed",
        ),
        (
            "wrong content type",
            gw.client
                .post(&chat_url)
                .header("content-type", "text/plain")
                .body(valid.to_string()),
            400,
            "unsupported_content_type",
        ),
    ];

    for (name, request, status, code) in cases {
        let resp = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: no response: {e}"));
        let allow = resp.headers().get("allow").cloned();
        let (got_status, body) = openai_error(resp).await;
        assert_eq!(
            (got_status, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{name}: {body}"
        );
        if status == 405 {
            assert_eq!(
                allow.as_ref().and_then(|v| v.to_str().ok()),
                Some("POST"),
                "{name}"
            );
        }
        // The VM is alive: the next valid request goes through.
        let resp = gw.post_json("/v1/chat/completions", &valid).await;
        assert_eq!(resp.status(), 200, "valid request after '{name}'");
        served += 1;
    }

    // None of the rejected requests reached a model server.
    let mut seen = 0;
    for s in &gw.sims {
        seen += s.requests(&gw.client).await.len();
    }
    assert_eq!(seen, served);
    gw.wait_all_released(SETTLE).await;
}

/// A valid chat request padded past `max` bytes.
fn oversize_body(max: usize) -> String {
    let pad = "x".repeat(max + 1);
    chat("chat", &pad).to_string()
}

/// Sends a slow streaming request; returns the response once its headers are in.
async fn start_stream(gw: &Gateway, content: &str, tokens: u64) -> reqwest::Response {
    let mut body = chat("chat", content);
    body["stream"] = json!(true);
    body["max_tokens"] = json!(tokens);
    let resp = gw.post_json("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200, "stream '{content}'");
    resp
}

fn total(counts: &BTreeMap<String, u64>) -> u64 {
    counts.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_by_least_in_flight_and_counts_return_to_zero() {
    let gw = Gateway::start(GatewayOptions {
        sim: SimOptions {
            per_token_ms: 100,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    assert_eq!(total(&gw.in_flight().await), 0);

    // Six long streams, each started once the previous one is counted.
    let mut streams = Vec::new();
    for i in 0..6 {
        let resp = start_stream(&gw, &format!("story {i}"), 80).await;
        streams.push(resp);
        gw.wait_in_flight(&format!("{} in flight", i + 1), SETTLE, |c| {
            total(c) == i + 1
        })
        .await;
    }
    let counts = gw.in_flight().await;
    let ids = gw.endpoint_ids();
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (endpoint, n) in &counts {
        assert_eq!(
            *n, 2,
            "{endpoint} ({}) has {n} in flight: {counts:?}",
            ids[endpoint]
        );
    }
    let mut by_replica = BTreeMap::<String, usize>::new();
    for r in &streams {
        *by_replica.entry(server_id(r)).or_default() += 1;
    }
    assert!(by_replica.values().all(|n| *n == 2), "{by_replica:?}");

    // Read them all to the end: every count goes back to zero.
    for r in streams {
        let text = r.text().await.expect("stream completes");
        assert!(text.contains("[DONE]"));
    }
    gw.wait_all_released(SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_is_released_after_client_aborts_and_upstream_death() {
    let mut gw = Gateway::start(GatewayOptions {
        sim: SimOptions {
            per_token_ms: 100,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;

    // Clients that hang up mid-stream: counted while they run, released at once.
    let mut streams = Vec::new();
    for i in 0..3 {
        let mut resp = start_stream(&gw, &format!("abandon {i}"), 200).await;
        resp.chunk()
            .await
            .expect("first chunk")
            .expect("some bytes");
        streams.push(resp);
    }
    let counts = gw
        .wait_in_flight("3 in flight", SETTLE, |c| total(c) == 3)
        .await;
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let aborted = Instant::now();
    drop(streams);
    gw.wait_all_released(SETTLE).await;
    // Long before the 20 s the streams would have taken.
    assert!(aborted.elapsed() < Duration::from_secs(15));

    // A replica that dies mid-stream.
    let mut resp = start_stream(&gw, "doomed", 200).await;
    let victim = server_id(&resp);
    resp.chunk()
        .await
        .expect("first chunk")
        .expect("some bytes");
    gw.wait_in_flight("the doomed stream counted", SETTLE, |c| total(c) == 1)
        .await;
    gw.sim_mut(&victim).kill();
    let ended = tokio::time::timeout(SETTLE, async {
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the client learns that the upstream died");
    // Envoy has already sent 200 and part of the body: the stream is cut short.
    let _ = ended;
    gw.wait_all_released(SETTLE).await;

    // Envoy and the VM carry on: requests get answers (the dead replica's share
    // fails with Envoy's 503 until it is removed from the pool), and nothing leaks.
    let mut ok = 0;
    for i in 0..9 {
        let resp = gw
            .post_json("/v1/chat/completions", &chat("chat", &format!("after {i}")))
            .await;
        match resp.status().as_u16() {
            200 => ok += 1,
            503 => {}
            other => panic!(
                "unexpected {other}: {}",
                resp.text().await.unwrap_or_default()
            ),
        }
    }
    assert!(ok >= 1, "no request succeeded after a replica died");
    gw.check_envoy_alive().expect("Envoy is up");
    gw.wait_all_released(SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_openai_paths_and_client_sent_destinations() {
    let gw = Gateway::start(GatewayOptions::default()).await;

    // /health is Envoy's own, the filter skipped.
    let resp = gw.client.get(gw.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok\n");

    // Other paths: 404 in the OpenAI shape (other_paths: reject), whatever the method.
    for (method, path) in [("GET", "/metrics"), ("POST", "/v2/generate"), ("GET", "/")] {
        let resp = gw
            .client
            .request(method.parse().unwrap(), gw.url(path))
            .send()
            .await
            .unwrap();
        let (status, body) = openai_error(resp).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("unknown_url")),
            "{method} {path}"
        );
    }

    // The model list comes from the filter's configuration.
    let list: Value = gw
        .client
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["food-review", "chat"]);

    // A client cannot choose the upstream: not on other paths...
    let target = gw.sims[0].endpoint();
    let resp = gw
        .client
        .get(gw.url("/sim/requests"))
        .header(DESTINATION_HEADER, &target)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // ...nor on inference paths, where the filter replaces the header with its choice.
    let closed = support::deploy::process::free_port().unwrap();
    for i in 0..3 {
        let resp = gw
            .client
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header(DESTINATION_HEADER, format!("127.0.0.1:{closed}"))
            .body(chat("chat", &format!("steer {i}")).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the client's destination was honoured");
    }
    for s in &gw.sims {
        for r in s.requests(&gw.client).await {
            assert_eq!(
                sim::header(&r, DESTINATION_HEADER),
                Some(s.endpoint().as_str()),
                "{r}"
            );
        }
    }
}

/// With `other_paths: "pass"`, non-inference requests go to the route as they are.
/// Without a destination they get Envoy's 503; a destination the *client* sent
/// must not steer them to an arbitrary ip:port through the ORIGINAL_DST cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_through_paths_cannot_pick_their_upstream() {
    let gw = Gateway::start(GatewayOptions {
        replicas: 1,
        configure: Box::new(|s| s.gateway_config["other_paths"] = json!("pass")),
        ..Default::default()
    })
    .await;
    let resp = gw
        .client
        .get(gw.url("/admin/anything"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "no destination: Envoy answers 503");

    let target = gw.sims[0].endpoint();
    let resp = gw
        .client
        .get(gw.url("/sim/requests"))
        .header(DESTINATION_HEADER, &target)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let from = resp.headers().get(SERVER_ID_HEADER).cloned();
    assert!(
        from.is_none() && status != 200,
        "a client-sent {DESTINATION_HEADER}: {target} reached the replica ({status}, {from:?}): \
         the filter must remove the header on passed-through requests too"
    );
}

/// With `destination_list`, the filter writes the chosen endpoint and its
/// fallbacks; when the first one refuses connections, Envoy's retry goes to the
/// next, so a dead replica costs no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_choice_falls_back_to_the_next_endpoint() {
    let mut gw = Gateway::start(GatewayOptions {
        configure: Box::new(|s| {
            s.gateway_config["destination_list"] = json!(true);
            s.fallback_retries = 2;
        }),
        ..Default::default()
    })
    .await;
    gw.sims[0].kill();
    // Without metrics the endpoints tie and the pick is random: the dead one is
    // first choice for about a third of these (never in all 24: p < 1e-4).
    for i in 0..24 {
        let resp = gw
            .post_json(
                "/v1/chat/completions",
                &chat("chat", &format!("request {i}")),
            )
            .await;
        let status = resp.status();
        let id = server_id(&resp);
        assert_eq!(status, 200, "{}", resp.text().await.unwrap_or_default());
        assert_ne!(id, "sim-0", "the dead replica cannot answer");
    }
    let logs = gw.envoy_logs();
    // Envoy's retry counter: requests that tried the dead endpoint first.
    let stats = gw
        .admin_text("/stats?filter=cluster.model_servers.upstream_rq_retry$")
        .await;
    let retries: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cluster.model_servers.upstream_rq_retry: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(retries >= 1, "no retry happened: {stats}\n{logs}");
    gw.wait_all_released(SETTLE).await;
}
