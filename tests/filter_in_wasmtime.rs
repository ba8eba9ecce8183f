//! The compiled filter in a wasmtime proxy-wasm host: request handling, errors,
//! in-flight counting across workers, snapshot ingest, scheduling, shedding and
//! safety callouts, without Envoy.

mod wasm_host;

use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use serde_json::{json, Value};
use wasm_host::{Action, Host, Vm};

const E1: &str = "127.0.0.1:8001";
const E2: &str = "127.0.0.1:8002";
const TOKEN: &str = "test-token-123";

fn config() -> Value {
    json!({
        "max_request_body_bytes": 1024,
        "pools": [{"name": "main", "endpoints": [E1, E2]}],
        "objectives": [{"name": "batch", "priority": -1}],
        "models": [
            {"name": "food-review", "pool": "main"},
            {"name": "split", "pool": "main",
             "target_models": [{"name": "split-v1", "weight": 1}, {"name": "split-v2", "weight": 1}]}
        ]
    })
}

fn gateway(host: &Host, cfg: &Value) -> Vm {
    let mut vm = host.vm();
    vm.configure(&cfg.to_string()).expect("valid config");
    vm
}

fn control(host: &Host) -> Vm {
    let mut vm = host.vm();
    vm.configure(&json!({"role": "control", "ingest": {"token": TOKEN}}).to_string())
        .expect("valid control config");
    vm
}

fn post<'a>(path: &'a str, len: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", "POST"),
        (":path", path),
        ("content-type", "application/json"),
        ("content-length", len),
        ("x-request-id", "req-1"),
    ]
}

/// Sends a chat body; returns the stream id and the body-phase action.
fn chat(vm: &mut Vm, body: &str) -> (u32, Action) {
    let s = vm.stream();
    let len = body.len().to_string();
    let a = vm.request_headers(s, &post("/v1/chat/completions", &len), false);
    assert_eq!(a, Action::Pause, "headers are held for the body");
    let a = vm.request_body(s, body.as_bytes(), true);
    (s, a)
}

fn chat_body(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]}).to_string()
}

#[test]
fn routes_a_chat_request_to_a_pool_endpoint() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let (s, a) = chat(&mut vm, &chat_body("food-review"));
    assert_eq!(a, Action::Continue);
    let dest = vm
        .request_header(s, "x-gateway-destination-endpoint")
        .unwrap();
    assert!(dest == E1 || dest == E2, "{dest}");
    assert!(vm.local_response(s).is_none());
    assert_eq!(host.in_flight(&dest), 1);
    vm.end(s);
    assert_eq!(host.in_flight(&dest), 0);
    vm.assert_alive();
}

/// A body that ends with trailers (no body callback ends the stream) is routed
/// at the trailers, rewritten there if needed, and refused there if unreadable:
/// such a request must not wait for a body end that never comes.
#[test]
fn a_body_ending_with_trailers_is_routed_at_the_trailers() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    for (model, chunks) in [("food-review", 1usize), ("split", 3)] {
        let body =
            json!({"model": model, "messages": [{"role": "user", "content": "hello"}]}).to_string();
        let s = vm.stream();
        let len = body.len().to_string();
        vm.request_headers(s, &post("/v1/chat/completions", &len), false);
        let step = body.len().div_ceil(chunks);
        for part in body.as_bytes().chunks(step) {
            assert_eq!(vm.request_body(s, part, false), Action::Pause, "held");
        }
        assert!(vm
            .request_header(s, "x-gateway-destination-endpoint")
            .is_none());
        assert_eq!(
            vm.request_trailers(s, &[("x-checksum", "abc")]),
            Action::Continue
        );
        let dest = vm
            .request_header(s, "x-gateway-destination-endpoint")
            .expect("routed at the trailers");
        assert_eq!(host.in_flight(&dest), 1);
        let sent: Value = serde_json::from_slice(&vm.state(s).request_body).unwrap();
        if model == "split" {
            assert!(
                sent["model"].as_str().unwrap().starts_with("split-v"),
                "{sent}"
            );
        } else {
            assert_eq!(sent["model"], model);
        }
        vm.end(s);
        assert_eq!(host.in_flight(&dest), 0);
    }
    // Trailers after a body that is not JSON: the usual 400.
    let s = vm.stream();
    vm.request_headers(s, &post("/v1/chat/completions", "5"), false);
    vm.request_body(s, b"{oops", false);
    vm.request_trailers(s, &[("x-checksum", "abc")]);
    let r = vm.local_response(s).expect("refused");
    assert_eq!(r.status, 400, "{:?}", r.json());
    vm.end(s);
    vm.assert_alive();
}

#[test]
fn weighted_targets_rewrite_the_model_and_content_length() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let body = json!({"model": "split", "temperature": 0.5, "messages": [{"role": "user", "content": "x"}]}).to_string();
        let (s, a) = chat(&mut vm, &body);
        assert_eq!(a, Action::Continue);
        let st = vm.state(s);
        let sent: Value = serde_json::from_slice(&st.request_body).unwrap();
        let target = sent["model"].as_str().unwrap().to_string();
        assert!(target == "split-v1" || target == "split-v2", "{target}");
        assert_eq!(sent["temperature"], 0.5);
        assert_eq!(
            vm.request_header(s, "content-length").unwrap(),
            st.request_body.len().to_string()
        );
        seen.insert(target);
        vm.end(s);
    }
    assert_eq!(seen.len(), 2, "both targets drawn over 40 requests");
}

fn expect_error(vm: &mut Vm, s: u32, status: u32, code: &str) {
    let r = vm
        .local_response(s)
        .unwrap_or_else(|| panic!("expected a local {status} reply"));
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["type"].is_string());
    assert!(v["error"].as_object().unwrap().contains_key("param"));
    vm.end(s);
}

#[test]
fn every_error_path_answers_in_the_openai_shape_and_the_vm_lives_on() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    for (body, status, code) in [
        ("{not json", 400, "invalid_json"),
        (r#"{"messages": []}"#, 400, "missing_model"),
        (r#"{"model": 7, "messages": []}"#, 400, "missing_model"),
        (&chat_body("nope") as &str, 404, "model_not_found"),
        (
            r#"{"model": "food-review"}"#,
            400,
            "missing_required_parameter",
        ),
    ] {
        let (s, a) = chat(&mut vm, body);
        assert_eq!(a, Action::Pause);
        expect_error(&mut vm, s, status, code);
        let (ok, a) = chat(&mut vm, &chat_body("food-review"));
        assert_eq!(
            a,
            Action::Continue,
            "a valid request still routes after {code}"
        );
        vm.end(ok);
    }

    // 413 from content-length, before the body.
    let s = vm.stream();
    assert_eq!(
        vm.request_headers(s, &post("/v1/chat/completions", "5000"), false),
        Action::Pause
    );
    expect_error(&mut vm, s, 413, "request_too_large");
    // 413 from a chunked body that grows past the limit.
    let s = vm.stream();
    vm.request_headers(
        s,
        &[
            (":method", "POST"),
            (":path", "/v1/completions"),
            ("content-type", "application/json"),
        ],
        false,
    );
    assert_eq!(vm.request_body(s, &[b' '; 600], false), Action::Pause);
    vm.request_body(s, &[b' '; 600], false);
    expect_error(&mut vm, s, 413, "request_too_large");
    // Wrong method, wrong content type.
    let s = vm.stream();
    vm.request_headers(
        s,
        &[(":method", "GET"), (":path", "/v1/chat/completions")],
        true,
    );
    expect_error(&mut vm, s, 405, "method_not_allowed");
    let s = vm.stream();
    vm.request_headers(
        s,
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-type", "text/plain"),
        ],
        false,
    );
    expect_error(&mut vm, s, 400, "unsupported_content_type");
    // Unknown objective header.
    let s = vm.stream();
    let mut h = post("/v1/chat/completions", "60");
    h.push(("x-gateway-inference-objective", "gold"));
    vm.request_headers(s, &h, false);
    vm.request_body(s, chat_body("food-review").as_bytes(), true);
    expect_error(&mut vm, s, 400, "unknown_objective");

    for e in [E1, E2] {
        assert_eq!(host.in_flight(e), 0, "no count leaked by errors");
    }
    vm.assert_alive();
}

/// The module's string scan (Wasm SIMD: 64 bytes a step, then 16, then byte
/// by byte) finds a raw control character wherever it sits in a string, so the
/// body is refused as JSON requires; an escape or a multi-byte character in
/// the same places routes.
#[test]
fn a_raw_control_character_anywhere_in_a_string_is_refused() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let text = "a".repeat(200);
    for at in 0..=text.len() {
        let control = ["\u{0}", "\u{1}", "\t", "\n", "\u{1f}"][at % 5];
        for (insert, routed) in [(control, false), ("\\n", true), ("é", true)] {
            let content = format!("{}{insert}{}", &text[..at], &text[at..]);
            let body = format!(
                r#"{{"model":"food-review","messages":[{{"role":"user","content":"{content}"}}]}}"#
            );
            let (s, a) = chat(&mut vm, &body);
            if routed {
                assert_eq!(a, Action::Continue, "{insert:?} at {at}");
                vm.end(s);
            } else {
                assert_eq!(a, Action::Pause, "{insert:?} at {at}");
                expect_error(&mut vm, s, 400, "invalid_json");
            }
        }
    }
    for e in [E1, E2] {
        assert_eq!(host.in_flight(e), 0);
    }
    vm.assert_alive();
}

#[test]
fn other_paths_pass_and_models_are_listed() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let s = vm.stream();
    let a = vm.request_headers(
        s,
        &[
            (":method", "GET"),
            (":path", "/healthz"),
            ("x-gateway-destination-endpoint", "10.9.9.9:1"),
        ],
        true,
    );
    assert_eq!(a, Action::Continue);
    assert!(vm.local_response(s).is_none());
    assert_eq!(
        vm.request_header(s, "x-gateway-destination-endpoint"),
        None,
        "client destination stripped"
    );
    vm.end(s);

    let s = vm.stream();
    vm.request_headers(s, &[(":method", "GET"), (":path", "/v1/models")], true);
    let r = vm.local_response(s).unwrap();
    assert_eq!(r.status, 200);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["food-review", "split"]);
    vm.end(s);
}

#[test]
fn an_invalid_configuration_is_refused_with_the_field_named() {
    let host = Host::new();
    let mut vm = host.vm();
    let mut cfg = config();
    cfg["pools"][0]["endpoints"][1] = json!("not-an-address");
    let logs = vm.configure(&cfg.to_string()).unwrap_err();
    assert!(logs.contains("pools[0].endpoints[1]"), "{logs}");
}

#[test]
fn in_flight_counts_spread_load_across_workers_and_return_to_zero() {
    let host = Host::new();
    let mut w1 = gateway(&host, &config());
    let mut w2 = gateway(&host, &config());
    let mut open = Vec::new();
    for i in 0..8 {
        let vm = if i % 2 == 0 { &mut w1 } else { &mut w2 };
        // A busy worker sees the other's counts once its view is 10 ms old.
        vm.advance_ms(10);
        let (s, a) = chat(vm, &chat_body("food-review"));
        assert_eq!(a, Action::Continue);
        open.push((i % 2, s));
    }
    assert_eq!(
        (host.in_flight(E1), host.in_flight(E2)),
        (4, 4),
        "least in-flight across both workers"
    );
    // A client abort before the body, and a local reply, hold nothing.
    let s = w1.stream();
    w1.request_headers(s, &post("/v1/chat/completions", "10"), false);
    w1.end(s);
    for (w, s) in open {
        if w == 0 {
            w1.end(s)
        } else {
            w2.end(s)
        }
    }
    assert_eq!((host.in_flight(E1), host.in_flight(E2)), (0, 0));

    let mut c = control(&host);
    let s = c.stream();
    c.request_headers(s, &[(":method", "GET"), (":path", "/debug/state")], true);
    let state = c.local_response(s).unwrap().json();
    assert_eq!(state["in_flight"], json!({E1: 0, E2: 0}));
}

/// A worker with other requests open routes on its own view of the counts and
/// writes its takes and releases together at most every 10 ms (a shared-data
/// read and a write saved per request); its tick and its last stream to end
/// write them too. A take given back before it was written never is.
#[test]
fn under_load_a_worker_writes_its_counts_at_most_every_10_ms() {
    let host = Host::new();
    let mut w = gateway(&host, &config());
    let to = |w: &Vm, s: u32| {
        w.request_header(s, "x-gateway-destination-endpoint")
            .unwrap()
    };
    let total = || host.in_flight(E1) + host.in_flight(E2);
    let first = chat(&mut w, &chat_body("food-review")).0;
    assert_eq!(total(), 1, "alone: taken in shared data at once");

    // Busy: three more within the window, none read or written.
    w.reset_host_calls();
    let more: Vec<u32> = (0..3)
        .map(|_| chat(&mut w, &chat_body("food-review")).0)
        .collect();
    let counts_read = w
        .shared_reads()
        .iter()
        .filter(|k| *k == "igw.inflight")
        .count();
    assert_eq!(counts_read, 0, "routed on the worker's view");
    assert_eq!(total(), 1, "held back");
    let mut dests: Vec<String> = std::iter::once(first)
        .chain(more.iter().copied())
        .map(|s| to(&w, s))
        .collect();
    dests.sort();
    assert_eq!(dests, [E1, E1, E2, E2], "its own takes spread the load");

    // Another worker takes two counts meanwhile: this one does not know yet.
    let mut other = gateway(&host, &config());
    let others: Vec<u32> = (0..2)
        .map(|_| {
            other.advance_ms(10);
            chat(&mut other, &chat_body("food-review")).0
        })
        .collect();
    assert_eq!(total(), 3);

    // A stream taken and given back inside the window cancels out.
    w.end(more[2]);
    assert_eq!(total(), 3);

    // 10 ms on: the next request reads the others' counts and writes its own
    // with the three held back.
    w.advance_ms(10);
    let late = chat(&mut w, &chat_body("food-review")).0;
    assert_eq!(total(), 6, "first, more[0], more[1], the other's two, late");

    // Within the next window a release waits; the tick writes it.
    w.end(more[0]);
    assert_eq!(total(), 6);
    w.tick();
    assert_eq!(total(), 5, "the tick writes it");

    for s in others {
        other.end(s);
    }
    w.end(more[1]);
    w.end(late);
    assert_ne!(total(), 0, "first is still open: held back");
    w.end(first);
    assert_eq!(total(), 0, "the last one writes all");
}

#[test]
fn under_load_a_worker_reads_a_prefix_slot_once_per_10_ms() {
    let host = Host::new();
    // One endpoint: every request goes where the prompt was recorded, so no
    // request rewrites the slot (a write drops the worker's copy).
    let one = json!({
        "pools": [{"name": "main", "endpoints": [E1]}],
        "models": [{"name": "food-review", "pool": "main"}]
    });
    let mut w = gateway(&host, &one);
    // Two full 256-byte blocks: the prompt has a prefix-index slot.
    let body = json!({"model": "food-review",
        "messages": [{"role": "user", "content": "a long shared system prompt ".repeat(20)}]})
    .to_string();
    let slot_reads = |w: &mut Vm| {
        w.reset_host_calls();
        let (s, _) = chat(w, &body);
        let n = w
            .shared_reads()
            .iter()
            .filter(|k| k.starts_with("igw.prefix"))
            .count();
        (s, n)
    };
    let (alone, n) = slot_reads(&mut w);
    assert_eq!(n, 1, "the first request reads its slot");
    // Under load (`alone` still open): read once, then served from the copy.
    let (s1, n1) = slot_reads(&mut w);
    let (s2, n2) = slot_reads(&mut w);
    assert_eq!((n1, n2), (1, 0), "read, then the worker's copy");
    w.advance_ms(10);
    let (s3, n3) = slot_reads(&mut w);
    assert_eq!(n3, 1, "a copy 10 ms old is read again");
    for s in [s1, s2, s3, alone] {
        w.end(s);
    }
    // Alone again: every request reads the host.
    let (s4, n4) = slot_reads(&mut w);
    assert_eq!(n4, 1);
    w.end(s4);
    assert_eq!(host.in_flight(E1), 0);
}

fn snapshot(generated_at_ms: u64, sequence: u64, endpoints: Vec<EndpointMetrics>) -> Snapshot {
    Snapshot {
        generated_at_ms,
        sequence,
        collector: "test".into(),
        pools: vec![PoolSnapshot {
            name: "main".into(),
            endpoints,
        }],
    }
}

fn metrics(address: &str, now_ms: u64, healthy: bool, waiting: u32, kv: f32) -> EndpointMetrics {
    EndpointMetrics {
        address: address.into(),
        healthy,
        scraped_at_ms: now_ms,
        waiting,
        kv_cache_utilization: kv,
        server_type: "vllm".into(),
        ..Default::default()
    }
}

fn push(c: &mut Vm, token: &str, body: &[u8]) -> (u32, Value) {
    let s = c.stream();
    let auth = format!("Bearer {token}");
    let len = body.len().to_string();
    c.request_headers(
        s,
        &[
            (":method", "POST"),
            (":path", "/v1/snapshot"),
            ("authorization", &auth),
            ("content-length", &len),
        ],
        false,
    );
    if c.local_response(s).is_none() {
        c.request_body(s, body, true);
    }
    let r = c.local_response(s).expect("ingest answers");
    c.end(s);
    (r.status, r.json())
}

#[test]
fn snapshot_ingest_checks_token_shape_and_order_and_routing_uses_it() {
    let host = Host::new();
    let mut c = control(&host);
    let mut vm = gateway(&host, &config());
    let now = vm.now_ms();
    // E1 is down per fresh metrics: everything goes to E2.
    let good = snapshot(
        now,
        1,
        vec![
            metrics(E1, now, false, 0, 0.0),
            metrics(E2, now, true, 0, 0.1),
        ],
    )
    .encode();
    assert_eq!(push(&mut c, "wrong-token", &good).0, 401);
    assert_eq!(push(&mut c, TOKEN, &good[..good.len() - 3]).0, 400);
    assert_eq!(push(&mut c, TOKEN, &vec![7u8; 4096]).0, 400);
    assert!(
        host.shared("igw.snapshot").is_none(),
        "bad pushes store nothing"
    );
    assert_eq!(push(&mut c, TOKEN, &good).0, 204);
    assert_eq!(
        push(&mut c, TOKEN, &good).0,
        409,
        "same version again is stale"
    );
    assert_eq!(push(&mut c, TOKEN, b"junk").0, 400);
    assert_eq!(
        host.shared("igw.snapshot").unwrap(),
        good,
        "a bad push never replaces a good one"
    );

    for _ in 0..6 {
        let (s, _) = chat(&mut vm, &chat_body("food-review"));
        assert_eq!(
            vm.request_header(s, "x-gateway-destination-endpoint")
                .unwrap(),
            E2
        );
    }
    // Once the snapshot is stale, "down" is no longer trusted: both are used again.
    vm.advance_ms(10_000);
    let mut dests = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (s, _) = chat(&mut vm, &chat_body("food-review"));
        dests.insert(
            vm.request_header(s, "x-gateway-destination-endpoint")
                .unwrap(),
        );
    }
    assert!(dests.contains(E1), "{dests:?}");

    let s = c.stream();
    c.request_headers(s, &[(":method", "GET"), (":path", "/debug/state")], true);
    let state = c.local_response(s).unwrap().json();
    assert_eq!(state["snapshot"]["sequence"], 1);
    assert_eq!(state["snapshot"]["endpoints"][E2], true);
    vm.assert_alive();
    c.assert_alive();
}

#[test]
fn a_saturated_pool_sheds_sheddable_requests_only() {
    let host = Host::new();
    let mut c = control(&host);
    let mut vm = gateway(&host, &config());
    let now = vm.now_ms();
    let full = snapshot(
        now,
        1,
        vec![
            metrics(E1, now, true, 20, 0.97),
            metrics(E2, now, true, 12, 0.95),
        ],
    )
    .encode();
    assert_eq!(push(&mut c, TOKEN, &full).0, 204);

    let s = vm.stream();
    let body = chat_body("food-review");
    let len = body.len().to_string();
    let mut h = post("/v1/chat/completions", &len);
    h.push(("x-gateway-inference-objective", "batch"));
    vm.request_headers(s, &h, false);
    vm.request_body(s, body.as_bytes(), true);
    let r = vm.local_response(s).expect("shed");
    assert_eq!(r.status, 429);
    assert!(r.headers.iter().any(|(k, _)| k == "retry-after"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    vm.end(s);

    let (s, a) = chat(&mut vm, &json!({"model": "food-review", "priority": 1, "messages": [{"role": "user", "content": "x"}]}).to_string());
    assert_eq!(a, Action::Continue);
    assert_eq!(
        vm.request_header(s, "x-gateway-destination-endpoint")
            .unwrap(),
        E2,
        "least-bad endpoint"
    );
}

#[test]
fn repeated_prefixes_stick_to_one_endpoint_across_workers() {
    let host = Host::new();
    let mut cfg = config();
    cfg["max_request_body_bytes"] = json!(65536);
    let mut w1 = gateway(&host, &cfg);
    let mut w2 = gateway(&host, &cfg);
    let system = "You are a meticulous food critic. ".repeat(40);
    let mut first = None;
    for i in 0..6 {
        let body = json!({"model": "food-review", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": format!("question {i}")}]}).to_string();
        let vm = if i % 2 == 0 { &mut w1 } else { &mut w2 };
        let (s, a) = chat(vm, &body);
        assert_eq!(a, Action::Continue);
        let dest = vm
            .request_header(s, "x-gateway-destination-endpoint")
            .unwrap();
        vm.end(s); // one at a time: in-flight counts do not pull them apart
        match &first {
            None => first = Some(dest),
            Some(f) => assert_eq!(&dest, f, "request {i} left the endpoint holding its prefix"),
        }
    }
}

fn safety_config(fail_open: bool) -> Value {
    let mut cfg = config();
    cfg["safety"] = json!({
        "cluster": "model-armor",
        "timeout_ms": 300,
        "fail_open": fail_open,
        "headers": {"authorization": "Bearer armor"},
        "default": {"user_prompt_template_id": "projects/p/locations/l/templates/in"}
    });
    cfg
}

const NO_MATCH: &str =
    r#"{"sanitizationResult":{"filterMatchState":"NO_MATCH_FOUND","filterResults":{}}}"#;
const JAILBREAK: &str = r#"{"sanitizationResult":{"filterMatchState":"MATCH_FOUND","filterResults":{"pi_and_jailbreak":{"piAndJailbreakFilterResult":{"matchState":"MATCH_FOUND"}}}}}"#;

#[test]
fn prompts_are_screened_before_routing() {
    let host = Host::new();
    let mut vm = gateway(&host, &safety_config(false));
    let (s, a) = chat(&mut vm, &chat_body("food-review"));
    assert_eq!(a, Action::Pause, "held for the verdict");
    let call = vm.calls().last().cloned().unwrap();
    assert_eq!(call.upstream, "model-armor");
    assert_eq!(call.timeout_ms, 300);
    let path = call
        .headers
        .iter()
        .find(|(k, _)| k == ":path")
        .unwrap()
        .1
        .clone();
    assert_eq!(
        path,
        "/v1/projects/p/locations/l/templates/in:sanitizeUserPrompt"
    );
    assert!(call
        .headers
        .contains(&("authorization".into(), "Bearer armor".into())));
    let sent: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(sent["userPromptData"]["text"], "hello");
    vm.http_call_response(call.token, Some(200), NO_MATCH.as_bytes());
    assert!(vm.state(s).resumed_request);
    assert!(vm
        .request_header(s, "x-gateway-destination-endpoint")
        .is_some());
    vm.end(s);

    let (s, _) = chat(&mut vm, &chat_body("food-review"));
    let token = vm.calls().last().unwrap().token;
    vm.http_call_response(token, Some(200), JAILBREAK.as_bytes());
    let r = vm.local_response(s).unwrap();
    assert_eq!(r.status, 403);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("pi_and_jailbreak") && !msg.contains("hello"),
        "{msg}"
    );
    assert!(vm
        .request_header(s, "x-gateway-destination-endpoint")
        .is_none());
    assert_eq!(
        vm.metric("inference_gateway_safety_blocks_total.check.prompt.filter.pi_and_jailbreak"),
        Some(1)
    );
    vm.end(s);
    assert_eq!((host.in_flight(E1), host.in_flight(E2)), (0, 0));
}

#[test]
fn failed_checks_fail_closed_or_open() {
    for fail_open in [false, true] {
        let host = Host::new();
        let mut vm = gateway(&host, &safety_config(fail_open));
        for (status, body) in [(None, ""), (Some(503), "{}"), (Some(200), "\u{0}garbage")] {
            let (s, _) = chat(&mut vm, &chat_body("food-review"));
            let token = vm.calls().last().unwrap().token;
            vm.http_call_response(token, status, body.as_bytes());
            vm.assert_alive();
            if fail_open {
                assert!(vm.state(s).resumed_request, "fail-open serves the request");
                assert!(vm.local_response(s).is_none());
            } else {
                let r = vm.local_response(s).expect("fail-closed answers");
                assert_eq!(r.status, 503);
                assert_eq!(r.json()["error"]["code"], "safety_check_unavailable");
            }
            vm.end(s);
        }
        if fail_open {
            assert_eq!(
                vm.metric("inference_gateway_safety_fail_open_total.check.prompt"),
                Some(3)
            );
        }
    }
}

#[test]
fn detect_mode_streams_chunks_and_ends_with_an_error_event_when_blocked() {
    let host = Host::new();
    let mut cfg = safety_config(false);
    cfg["safety"]["default"] =
        json!({"model_response_template_id": "projects/p/locations/l/templates/out"});
    cfg["safety"]["stream_mode"] = json!("detect");
    let mut vm = gateway(&host, &cfg);
    let (s, a) = chat(&mut vm, &chat_body("food-review"));
    assert_eq!(a, Action::Continue, "no prompt template: routed at once");
    assert_eq!(
        vm.response_headers(
            s,
            &[(":status", "200"), ("content-type", "text/event-stream")],
            false
        ),
        Action::Continue
    );
    let c1 = b"data: {\"choices\":[{\"delta\":{\"content\":\"card 4111 \"}}]}\n\n";
    assert_eq!(vm.response_body(s, c1, false, false), Action::Continue);
    assert_eq!(
        vm.state(s).response_body,
        c1.to_vec(),
        "chunks pass through unchanged"
    );
    let a = vm.response_body(s, b"data: [DONE]\n\n", true, false);
    assert_eq!(a, Action::Pause, "the ending waits for the verdict");
    let call = vm.calls().last().cloned().unwrap();
    let sent: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(sent["modelResponseData"]["text"], "card 4111 ");
    let sdp = r#"{"sanitizationResult":{"filterMatchState":"MATCH_FOUND","filterResults":{"sdp":{"sdpFilterResult":{"inspectResult":{"matchState":"MATCH_FOUND"}}}}}}"#;
    vm.http_call_response(call.token, Some(200), sdp.as_bytes());
    let end = String::from_utf8(vm.state(s).response_body).unwrap();
    assert!(end.starts_with("data: {\"error\""), "{end}");
    assert!(
        end.contains("content_blocked") && !end.contains("[DONE]"),
        "{end}"
    );
    assert!(vm.state(s).resumed_response);
}

fn sse(content: &str) -> Vec<u8> {
    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n").into_bytes()
}

const SDP: &str = r#"{"sanitizationResult":{"filterMatchState":"MATCH_FOUND","filterResults":{"sdp":{"sdpFilterResult":{"inspectResult":{"matchState":"MATCH_FOUND"}}}}}}"#;

/// Hold mode (the default) with small windows, as Envoy drives it: a paused
/// callback keeps its bytes and the next callback sees them again (`buffered`);
/// after a resume the buffer starts empty.
#[test]
fn hold_mode_releases_only_screened_windows() {
    let host = Host::new();
    let mut cfg = safety_config(false);
    cfg["safety"]["default"] =
        json!({"model_response_template_id": "projects/p/locations/l/templates/out"});
    cfg["safety"]["stream_window_chars"] = json!(10);
    cfg["safety"]["stream_holdback_bytes"] = json!(4);
    let mut vm = gateway(&host, &cfg);
    let (s, _) = chat(&mut vm, &chat_body("food-review"));
    vm.response_headers(
        s,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    );
    let (c1, c2) = (sse("Hello "), sse("world, all good "));
    assert_eq!(
        vm.response_body(s, &c1, false, false),
        Action::Pause,
        "unscreened: held"
    );
    assert!(
        vm.calls().is_empty(),
        "6 characters: the window is still open"
    );
    assert_eq!(vm.response_body(s, &c2, false, true), Action::Pause);
    let call = vm.calls().last().cloned().expect("the window is screened");
    let sent: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(sent["modelResponseData"]["text"], "Hello world, all good ");
    assert!(!vm.state(s).resumed_response);
    vm.http_call_response(call.token, Some(200), NO_MATCH.as_bytes());
    // Passed: all but the last 4 bytes of the window may go, so the first chunk
    // goes out; the second waits in the filter.
    assert!(vm.state(s).resumed_response);
    assert_eq!(vm.state(s).response_body, c1);
    // The next chunk brings the held one back in front of it; the end releases all.
    let done = b"data: [DONE]\n\n";
    assert_eq!(vm.response_body(s, done, true, false), Action::Continue);
    assert_eq!(vm.state(s).response_body, [c2.as_slice(), done].concat());
    assert_eq!(
        vm.calls().len(),
        1,
        "no text after the window: no more calls"
    );
    vm.end(s);

    // A window that blocks: the client gets the error event and no byte of it.
    let (s, _) = chat(&mut vm, &chat_body("food-review"));
    vm.response_headers(
        s,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    );
    let leak = sse("card 4111 1111 1111 1111");
    assert_eq!(vm.response_body(s, &leak, false, false), Action::Pause);
    let call = vm.calls().last().cloned().unwrap();
    vm.http_call_response(call.token, Some(200), SDP.as_bytes());
    let out = String::from_utf8(vm.state(s).response_body).unwrap();
    assert!(out.starts_with("data: {\"error\""), "{out}");
    assert!(
        out.contains("content_blocked") && !out.contains("4111"),
        "{out}"
    );
    assert!(vm.state(s).resumed_response);
    // Whatever the model still sends is dropped.
    assert_eq!(
        vm.response_body(s, &sse("more 4111"), false, false),
        Action::Continue
    );
    assert!(vm.state(s).response_body.is_empty());
    vm.response_body(s, b"data: [DONE]\n\n", true, false);
    assert!(vm.state(s).response_body.is_empty());
    vm.end(s);
    vm.assert_alive();
    assert_eq!((host.in_flight(E1), host.in_flight(E2)), (0, 0));
}

/// A non-streamed response past `max_response_bytes` is refused whatever
/// `fail_open` says, and a long one is screened in several calls.
#[test]
fn long_responses_are_screened_in_parts_or_refused() {
    let host = Host::new();
    let mut cfg = safety_config(true);
    cfg["safety"]["default"] =
        json!({"model_response_template_id": "projects/p/locations/l/templates/out"});
    cfg["safety"]["max_check_text_bytes"] = json!(100);
    cfg["safety"]["check_overlap_bytes"] = json!(10);
    cfg["safety"]["max_response_bytes"] = json!(2000);
    let mut vm = gateway(&host, &cfg);
    let (s, _) = chat(&mut vm, &chat_body("food-review"));
    let json_headers = [(":status", "200"), ("content-type", "application/json")];
    assert_eq!(vm.response_headers(s, &json_headers, false), Action::Pause);
    let text = "word ".repeat(50);
    let body =
        json!({"choices": [{"message": {"role": "assistant", "content": text}}]}).to_string();
    assert_eq!(
        vm.response_body(s, body.as_bytes(), true, false),
        Action::Pause
    );
    let calls = vm.calls();
    assert_eq!(
        calls.len(),
        3,
        "250 bytes in calls of 100 with 10 of overlap"
    );
    for c in &calls {
        vm.http_call_response(c.token, Some(200), NO_MATCH.as_bytes());
    }
    assert!(vm.state(s).resumed_response);
    assert!(vm.local_response(s).is_none());
    vm.end(s);

    let (s, _) = chat(&mut vm, &chat_body("food-review"));
    vm.response_headers(s, &json_headers, false);
    let big = json!({"choices": [{"message": {"content": "x".repeat(3000)}}]}).to_string();
    vm.response_body(s, big.as_bytes(), true, false);
    let r = vm.local_response(s).expect("refused");
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "response_too_large_to_screen");
    vm.end(s);
    vm.assert_alive();
}

#[test]
fn random_and_mutated_bodies_never_crash_the_vm() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let mut rng = fastrand::Rng::with_seed(2024);
    let seeds = [
        chat_body("food-review"),
        json!({"model": "split", "prompt": ["a", "b"], "priority": -3, "stream": true}).to_string(),
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".into(),
    ];
    for i in 0..3000 {
        let mut body = seeds[i % seeds.len()].clone().into_bytes();
        for _ in 0..rng.usize(0..4) {
            if body.is_empty() {
                break;
            }
            let at = rng.usize(..body.len());
            match rng.u8(..3) {
                0 => body[at] = rng.u8(..),
                1 => {
                    body.remove(at);
                }
                _ => body.insert(at, rng.u8(..)),
            }
        }
        body.truncate(1024);
        let s = vm.stream();
        let len = body.len().to_string();
        vm.request_headers(s, &post("/v1/chat/completions", &len), false);
        let a = vm.request_body(s, &body, true);
        vm.assert_alive();
        match (a, vm.local_response(s)) {
            (Action::Continue, None) => assert!(vm
                .request_header(s, "x-gateway-destination-endpoint")
                .is_some()),
            (Action::Pause, Some(r)) => assert!((400..500).contains(&r.status), "{}", r.status),
            other => panic!("neither routed nor answered 4xx: {other:?}"),
        }
        vm.end(s);
    }
    assert_eq!((host.in_flight(E1), host.in_flight(E2)), (0, 0));
}

/// `GET /metrics` on the control VM: Prometheus text → `series{labels}` → value.
fn scrape(c: &mut Vm) -> std::collections::HashMap<String, f64> {
    let s = c.stream();
    c.request_headers(s, &[(":method", "GET"), (":path", "/metrics")], true);
    let r = c.local_response(s).expect("a local answer");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// The response's `usage` is found wherever it falls in the module's 64-byte
/// blocks (the Wasm SIMD masks), never in generated text that quotes one, and
/// escapes are followed across blocks and chunks.
#[test]
fn usage_is_read_at_every_block_position_and_never_from_generated_text() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    for pad in 0..130 {
        let content = format!(
            "{}say \\\"usage\\\":{{\\\"prompt_tokens\\\":999}} \\\\",
            "x".repeat(pad)
        );
        // A block or more of plain text before the key: its block has no
        // backslash, so only the masks find it.
        let filler = "y".repeat(64 + pad % 64);
        let body = format!(
            r#"{{"id":"c","choices":[{{"message":{{"content":"{content}"}}}}],"filler":"{filler}","usage":{{"prompt_tokens":{pad},"completion_tokens":3}}}}"#
        );
        let (s, a) = chat(&mut vm, &chat_body("food-review"));
        assert_eq!(a, Action::Continue);
        vm.response_headers(
            s,
            &[(":status", "200"), ("content-type", "application/json")],
            false,
        );
        // In two chunks cut at a point that moves with `pad`.
        let cut = (pad * 7) % body.len();
        vm.response_body(s, &body.as_bytes()[..cut], false, false);
        vm.response_body(s, &body.as_bytes()[cut..], true, false);
        vm.end(s);
        let fields = vm.property(s, "igw").expect("access-log fields");
        assert!(
            fields.contains(&format!(" input_tokens={pad} output_tokens=3 ")),
            "pad {pad}: {fields}\n{body}"
        );
    }
}

#[test]
fn requests_feed_shared_data_metrics_that_the_control_vm_renders() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let mut other = gateway(&host, &config()); // a second worker
    let mut c = control(&host);

    // A streamed request with include_usage, 250 ms end to end, first byte at 40 ms.
    let body =
        json!({"model": "food-review", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]})
        .to_string();
    vm.reset_host_calls();
    let (s, a) = chat(&mut vm, &body);
    assert_eq!(a, Action::Continue);
    let routed = vm.host_calls();
    vm.advance_ms(40);
    vm.response_headers(
        s,
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    );
    let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    assert_eq!(
        vm.response_body(s, chunk.as_bytes(), false, false),
        Action::Continue
    );
    vm.advance_ms(210);
    let last = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\ndata: [DONE]\n\n";
    vm.response_body(s, last.as_bytes(), true, false);
    vm.end(s);
    let total = vm.host_calls();
    let dest = vm
        .request_header(s, "x-gateway-destination-endpoint")
        .unwrap();
    let fields = vm.property(s, "igw").expect("access-log fields");
    assert!(
        fields.starts_with(&format!(
            "model=food-review target_model=food-review endpoint={dest} priority=0 safety_prompt=- safety_response=- media_parts=0 input_tokens=7 output_tokens=3 ttft_ms=40.0 duration_ms=250.0 error=- consumer=-"
        )),
        "{fields}"
    );

    // A non-streamed request on the other worker, and errors: unknown model
    // (before a model is known), shed-free 503 from the model server.
    let (s2, _) = chat(&mut other, &chat_body("split"));
    other.advance_ms(100);
    other.response_headers(
        s2,
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    );
    other.response_body(
        s2,
        br#"{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
        true,
        false,
    );
    other.end(s2);
    let (s3, _) = chat(&mut other, &chat_body("nope"));
    other.end(s3);
    let (s4, _) = chat(&mut vm, &chat_body("food-review"));
    vm.response_headers(s4, &[(":status", "503")], false);
    vm.end(s4);

    let m = scrape(&mut c);
    let fr = r#"model_name="food-review",target_model_name="food-review""#;
    assert_eq!(m[&format!("inference_model_request_total{{{fr}}}")], 2.0);
    assert_eq!(
        m[&format!("inference_model_request_error_total{{{fr},error_code=\"ModelServerError\"}}")],
        1.0
    );
    assert_eq!(
        m[r#"inference_model_request_error_total{model_name="",target_model_name="",error_code="BadRequest"}"#],
        1.0
    );
    assert_eq!(
        m[&format!("inference_model_request_duration_seconds_count{{{fr}}}")],
        1.0
    );
    assert!(
        (m[&format!("inference_model_request_duration_seconds_sum{{{fr}}}")] - 0.25).abs() < 1e-9
    );
    assert_eq!(
        m[&format!("inference_model_request_duration_seconds_bucket{{{fr},le=\"0.2\"}}")],
        0.0
    );
    assert_eq!(
        m[&format!("inference_model_request_duration_seconds_bucket{{{fr},le=\"0.4\"}}")],
        1.0
    );
    assert!((m[&format!("inference_model_ttft_seconds_sum{{{fr}}}")] - 0.04).abs() < 1e-9);
    assert_eq!(m[&format!("inference_model_input_tokens_sum{{{fr}}}")], 7.0);
    assert_eq!(
        m[&format!("inference_model_output_tokens_sum{{{fr}}}")],
        3.0
    );
    assert_eq!(
        m[r#"inference_model_running_requests{model_name="food-review"}"#],
        0.0
    );
    let split: f64 = ["split-v1", "split-v2"]
        .iter()
        .map(|t| {
            m.get(&format!(
                "inference_model_output_tokens_sum{{model_name=\"split\",target_model_name=\"{t}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(split, 2.0, "the non-streamed usage, from the other worker");
    let picks: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("inference_gateway_endpoint_picks_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(picks, 3.0);
    assert_eq!(
        m[&format!("inference_gateway_endpoint_in_flight{{endpoint=\"{E1}\"}}")],
        0.0
    );

    // The cost: shared-data operations per routed request, and all counted calls.
    let shared = |h: &std::collections::HashMap<&str, u64>| {
        h.get("proxy_get_shared_data").copied().unwrap_or(0)
            + h.get("proxy_set_shared_data").copied().unwrap_or(0)
    };
    let mut report = format!(
        "host calls of a streamed request: routing {routed:?}; whole request {total:?}; shared-data ops {} (metrics: 4)",
        shared(&total)
    );
    report.push('\n');
    eprint!("{report}");
    // After routing: the in-flight release (get + set) and the metrics' final
    // read-modify-write (get + set); routing itself includes one metrics update.
    assert_eq!(
        shared(&total),
        shared(&routed) + 4,
        "after routing: in-flight release + one metrics update: {total:?}"
    );
    assert_eq!(
        total.get("proxy_set_property"),
        Some(&1),
        "one access-log property"
    );
    vm.assert_alive();
    other.assert_alive();
    c.assert_alive();
}

#[test]
fn a_busy_worker_batches_its_request_metrics() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let mut c = control(&host);
    let total = r#"inference_model_request_total{model_name="food-review",target_model_name="food-review"}"#;
    let running = r#"inference_model_running_requests{model_name="food-review"}"#;
    let served = |vm: &mut Vm| {
        let (s, a) = chat(vm, &chat_body("food-review"));
        assert_eq!(a, Action::Continue);
        vm.response_headers(s, &[(":status", "200")], false);
        vm.response_body(s, b"{}", true, false);
        vm.end(s);
    };
    // Alone on its worker, a request is in shared data as soon as it ends.
    served(&mut vm);
    assert_eq!(scrape(&mut c)[total], 1.0);

    // With another request open (waiting for its body), the worker batches.
    let open = vm.stream();
    let len = "100".to_string();
    vm.request_headers(open, &post("/v1/chat/completions", &len), false);
    vm.advance_ms(1);
    served(&mut vm);
    assert_eq!(scrape(&mut c)[total], 1.0, "batched");
    // The root's tick, every 100 ms, merges the batch.
    assert_eq!(vm.tick_period_ms(), Some(100));
    vm.tick();
    let m = scrape(&mut c);
    assert_eq!((m[total], m[running]), (2.0, 0.0), "merged on the tick");

    // Under load, at most 100 ms after the last merge.
    vm.advance_ms(1);
    served(&mut vm);
    assert_eq!(scrape(&mut c)[total], 2.0);
    vm.advance_ms(100);
    let (s, a) = chat(&mut vm, &chat_body("food-review"));
    assert_eq!(a, Action::Continue);
    let m = scrape(&mut c);
    assert_eq!(
        (m[total], m[running]),
        (3.0, 1.0),
        "merged when routed, 100 ms on"
    );

    // The last open request ending merges everything.
    vm.response_headers(s, &[(":status", "200")], false);
    vm.response_body(s, b"{}", true, false);
    vm.end(s);
    assert_eq!(scrape(&mut c)[total], 3.0, "another request is still open");
    vm.end(open);
    let m = scrape(&mut c);
    assert_eq!((m[total], m[running]), (4.0, 0.0));
    assert_eq!(host.in_flight(E1) + host.in_flight(E2), 0);
    vm.assert_alive();
}

#[test]
fn metrics_survive_garbage_in_shared_data() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let mut c = control(&host);
    // Another writer (or an older layout) left garbage in a series and the index.
    let mut junk = host.vm();
    junk.configure(&config().to_string()).unwrap();
    host.set_shared("igw.m2.food-review\u{1f}food-review", b"\xff\xfe garbage");
    let (s, a) = chat(&mut vm, &chat_body("food-review"));
    assert_eq!(a, Action::Continue);
    vm.response_headers(s, &[(":status", "200")], false);
    vm.response_body(s, b"{}", true, false);
    vm.end(s);
    let m = scrape(&mut c);
    assert_eq!(
        m[r#"inference_model_request_total{model_name="food-review",target_model_name="food-review"}"#],
        1.0
    );
    host.set_shared("igw.m2.index", b"\x01\x02\x03");
    let s = c.stream();
    c.request_headers(s, &[(":method", "GET"), (":path", "/metrics")], true);
    assert_eq!(c.local_response(s).unwrap().status, 200);
    vm.assert_alive();
    c.assert_alive();
}

/// The filter's per-request cost with metrics, in wasmtime (compiled, release
/// .wasm): wall time of a whole streamed request and the size of a populated
/// series, which every metrics update reads and writes once. Printed for the
/// record; the assertion is only a generous ceiling.
#[test]
fn per_request_cost_with_metrics() {
    let host = Host::new();
    let mut vm = gateway(&host, &config());
    let body =
        json!({"model": "food-review", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]})
        .to_string();
    let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    let last = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
    let n = 300u32;
    let started = std::time::Instant::now();
    for i in 0..n {
        let (s, _) = chat(&mut vm, &body);
        vm.advance_ms(u64::from(i % 50));
        vm.response_headers(
            s,
            &[(":status", "200"), ("content-type", "text/event-stream")],
            false,
        );
        vm.response_body(s, chunk.as_bytes(), false, false);
        vm.response_body(s, last.as_bytes(), true, false);
        vm.end(s);
    }
    let per_request = started.elapsed() / n;
    let series = host
        .shared("igw.m2.food-review\u{1f}food-review")
        .expect("series");
    eprintln!(
        "per streamed request through the filter in wasmtime: {per_request:?} (all of routing, \
         metrics, access-log fields); populated series: {} bytes",
        series.len()
    );
    assert!(series.len() < 2048, "{} bytes", series.len());
    assert!(
        per_request < std::time::Duration::from_millis(20),
        "{per_request:?}"
    );
    vm.assert_alive();
}

/// Routing reads shared data a fixed number of times, whatever the pool size:
/// the in-flight counts of every candidate come packed in one key.
#[test]
fn shared_data_reads_per_request_do_not_grow_with_the_pool() {
    let reads_for = |n: usize| {
        let host = Host::new();
        let endpoints: Vec<String> = (0..n)
            .map(|i| format!("10.0.{}.{}:8000", i / 250, i % 250 + 1))
            .collect();
        let mut cfg = config();
        cfg["pools"][0]["endpoints"] = json!(endpoints);
        let mut vm = gateway(&host, &cfg);
        let (s, _) = chat(&mut vm, &chat_body("food-review")); // warm: snapshot cache, metric ids
        vm.end(s);
        vm.reset_host_calls();
        let (s, a) = chat(&mut vm, &chat_body("food-review"));
        assert_eq!(a, Action::Continue);
        let dest = vm
            .request_header(s, "x-gateway-destination-endpoint")
            .unwrap();
        assert_eq!(host.in_flight(&dest), 1, "counted in its slot");
        vm.end(s);
        assert_eq!(host.in_flight(&dest), 0);
        vm.host_calls()
            .get("proxy_get_shared_data")
            .copied()
            .unwrap_or(0)
    };
    let (small, large) = (reads_for(2), reads_for(1000));
    assert!(small > 0);
    assert_eq!(
        small, large,
        "2 endpoints: {small} reads, 1000 endpoints: {large}"
    );
}

/// Membership follows the snapshots, and nothing keyed by endpoint grows with
/// churn: 2,500 joins and 2,500 leaves over a pool of ten, two workers routing
/// every round and streams that outlive their endpoint's departure by up to seven
/// snapshots. Every request goes to a member of the newest snapshot; every
/// endpoint's in-flight count equals the streams holding it, every round; the
/// in-flight table never holds more entries than the most endpoints that held
/// streams at once (16 here: two new streams a round, each open for 8 rounds),
/// and shared data as a whole stops growing (the pick counters keep at most 256
/// endpoints per model, the rest count as `other`) and stays under 16 KiB.
#[test]
fn churn_keeps_shared_data_bounded_and_in_flight_counts_exact() {
    let host = Host::new();
    let cfg = json!({
        "pools": [{"name": "main"}],
        "models": [{"name": "food-review", "pool": "main"}],
    });
    let mut workers = [gateway(&host, &cfg), gateway(&host, &cfg)];
    let mut c = control(&host);
    let address = |i: usize| format!("10.{}.{}.{}:8000", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    // (worker, stream, endpoint, round it was opened)
    let mut open: Vec<(usize, u32, String, usize)> = Vec::new();
    let mut held: std::collections::HashMap<String, u64> = Default::default();
    let mut size_at_1000 = 0;
    let rounds = 2_500;
    for round in 0..rounds {
        // A worker with streams open looks for a newer snapshot every 10 ms
        // (`VERSION_CHECK_MS`): a round is that long.
        for vm in workers.iter_mut().chain([&mut c]) {
            vm.advance_ms(10);
        }
        let now = c.now_ms();
        let members: Vec<String> = (round..round + 10).map(address).collect();
        let endpoints = members
            .iter()
            .map(|a| metrics(a, now, true, 0, 0.1))
            .collect();
        let (status, _) = push(
            &mut c,
            TOKEN,
            &snapshot(now, round as u64 + 1, endpoints).encode(),
        );
        assert_eq!(status, 204, "round {round}");
        for (w, vm) in workers.iter_mut().enumerate() {
            let (s, a) = chat(vm, &chat_body("food-review"));
            assert_eq!(
                a,
                Action::Continue,
                "round {round}: {:?}",
                vm.local_response(s)
            );
            let to = vm
                .request_header(s, "x-gateway-destination-endpoint")
                .unwrap();
            assert!(
                members.contains(&to),
                "round {round}: routed to {to}, not a member"
            );
            *held.entry(to.clone()).or_default() += 1;
            open.push((w, s, to, round));
        }
        // Streams end seven rounds after they started: long after their endpoint left.
        open.retain(|(w, s, to, opened)| {
            if round - opened < 7 {
                return true;
            }
            workers[*w].end(*s);
            *held.get_mut(to).unwrap() -= 1;
            false
        });
        held.retain(|_, n| *n > 0);
        // Releases on a worker with other streams open wait for its next take
        // or its tick: counts are exact once each worker has ticked.
        for vm in workers.iter_mut() {
            vm.tick();
        }
        for (endpoint, n) in &held {
            assert_eq!(host.in_flight(endpoint), *n, "round {round}: {endpoint}");
        }
        let entries = host.shared("igw.inflight").unwrap_or_default().len() / 12;
        assert!(
            entries <= 16 && entries >= held.len(),
            "round {round}: {entries} entries for {} endpoints holding streams",
            held.len()
        );
        let size: usize = host.shared_sizes().iter().map(|(_, n)| n).sum();
        assert!(
            size <= 16 * 1024,
            "round {round}: {:?}",
            host.shared_sizes()
        );
        if round == 1000 {
            size_at_1000 = size;
        } else if round > 1000 {
            assert!(
                size <= size_at_1000 + 64,
                "round {round}: shared data grew to {size} bytes (was {size_at_1000}): {:?}",
                host.shared_sizes()
            );
        }
    }
    for (w, s, _, _) in open.drain(..) {
        workers[w].end(s);
    }
    assert_eq!(
        host.shared("igw.inflight").unwrap_or_default(),
        b"",
        "every count is back to 0"
    );
    for w in &workers {
        w.assert_alive();
    }
}

/// With `metrics_token`, the control listener's `/metrics` answers only a scraper
/// that presents it (the GKE metrics-scraping guide's bearer auth); ingest keeps
/// its own token.
#[test]
fn metrics_need_the_bearer_token_when_one_is_configured() {
    let host = Host::new();
    let mut c = host.vm();
    c.configure(
        &json!({"role": "control", "ingest": {"token": TOKEN}, "metrics_token": "scrape-token-1"})
            .to_string(),
    )
    .expect("valid control config");
    let get = |c: &mut Vm, auth: Option<&str>| {
        let s = c.stream();
        let mut headers = vec![(":method", "GET"), (":path", "/metrics")];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        c.request_headers(s, &headers, true);
        let r = c.local_response(s).expect("a local answer");
        c.end(s);
        r
    };
    for auth in [
        None,
        Some("Bearer wrong-token"),
        Some(TOKEN),
        Some("scrape-token-1"),
    ] {
        let r = get(&mut c, auth);
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_token");
    }
    let r = get(&mut c, Some("Bearer scrape-token-1"));
    assert_eq!(r.status, 200);
    assert!(String::from_utf8(r.body)
        .unwrap()
        .contains("inference_model_request_total"));
    // A token on a gateway (not control) configuration is refused, naming the field.
    let err = host
        .vm()
        .configure(
            &json!({"pools": [{"name": "p"}], "metrics_token": "scrape-token-1"}).to_string(),
        )
        .unwrap_err();
    assert!(err.contains("metrics_token"), "{err}");
}
