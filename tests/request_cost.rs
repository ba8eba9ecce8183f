//! The cost of a request in the compiled filter, counted, not timed: the real
//! `.wasm` runs in the wasmtime host with fuel metering, and each scenario
//! reports the Wasm instructions executed per request, the host calls by function
//! and the bytes copied across the host boundary. These figures are deterministic
//! for a given module, so they are asserted: a figure that grows past its committed
//! budget (`benches/results/request-cost.json`) by more than the margin fails.
//!
//! After a change that moves the figures on purpose, rewrite the budget and the
//! table (`benches/results/request-cost.md`) with
//!
//! ```sh
//! REQUEST_COST_UPDATE=1 cargo test --test request_cost
//! ```
//!
//! and commit both: the diff is the change's cost.

mod wasm_host;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use wasm_host::{Action, Cost, Host, Vm};

/// Growth over the budget that fails the test: instructions and bytes move a
/// little with the toolchain; host calls do not move at all without a code change.
const INSTRUCTION_MARGIN: f64 = 0.10;
const BYTES_MARGIN: f64 = 0.10;

const TOKEN: &str = "cost-token";
const NO_MATCH: &str =
    r#"{"sanitizationResult":{"filterMatchState":"NO_MATCH_FOUND","filterResults":{}}}"#;

#[derive(Clone, Copy)]
enum Response {
    /// A non-streamed chat completion with usage (about 300 bytes).
    Json,
    /// A streamed one: this many SSE chunks of one delta each, usage, `[DONE]`.
    Sse(usize),
}

struct Scenario {
    name: &'static str,
    endpoints: usize,
    body_bytes: usize,
    response: Response,
    /// The prompt and the response screened (every check answered "no match").
    safety: bool,
    /// The default profile (with the prefix-cache scorer) or the same scorers
    /// without it.
    prefix: bool,
    /// Every endpoint of the pool has been picked before (the request metrics
    /// hold a pick counter per endpoint, as on a gateway that has run a while).
    busy: bool,
    /// Another request stays open on the worker meanwhile, as under load: the
    /// request metrics wait in the worker's batch (merged at most 100 ms later),
    /// the in-flight counts in its view (written every 10 ms), the snapshot and
    /// prefix slots are checked every 10 ms. So the figures are the mean of
    /// [`UNDER_LOAD_REQUESTS`] requests, one every [`UNDER_LOAD_SPACING_US`]:
    /// the work done once per interval shared by its requests.
    under_load: bool,
}

/// Requests averaged in an `under_load` scenario (16 ms of traffic).
const UNDER_LOAD_REQUESTS: u64 = 32;
/// One request every 0.5 ms on the worker: 2,000 a second, about the rate of
/// one Envoy worker in the overhead suite's 1 KB runs.
const UNDER_LOAD_SPACING_US: u64 = 500;

fn scenarios() -> Vec<Scenario> {
    let s = |name, endpoints, body_bytes, response, safety, prefix| Scenario {
        name,
        endpoints,
        body_bytes,
        response,
        safety,
        prefix,
        busy: false,
        under_load: false,
    };
    use Response::{Json, Sse};
    vec![
        s("chat 1 KB, 10 endpoints", 10, 1024, Json, false, true),
        s("chat 1 KB, 100 endpoints", 100, 1024, Json, false, true),
        s("chat 1 KB, 1000 endpoints", 1000, 1024, Json, false, true),
        s(
            "chat 1 KB, 100 endpoints, no prefix scorer",
            100,
            1024,
            Json,
            false,
            false,
        ),
        s(
            "chat 16 KB, 100 endpoints",
            100,
            16 * 1024,
            Json,
            false,
            true,
        ),
        s(
            "chat 16 KB, 100 endpoints, no prefix scorer",
            100,
            16 * 1024,
            Json,
            false,
            false,
        ),
        s(
            "chat 256 KB, 100 endpoints",
            100,
            256 * 1024,
            Json,
            false,
            true,
        ),
        s(
            "chat 1 KB, 100 endpoints, safety",
            100,
            1024,
            Json,
            true,
            true,
        ),
        Scenario {
            busy: true,
            ..s(
                "chat 1 KB, 100 endpoints, each picked before",
                100,
                1024,
                Json,
                false,
                true,
            )
        },
        Scenario {
            under_load: true,
            ..s(
                "chat 1 KB, 100 endpoints, under load (mean of 32)",
                100,
                1024,
                Json,
                false,
                true,
            )
        },
        s(
            "stream of 200 chunks, 100 endpoints",
            100,
            1024,
            Sse(200),
            false,
            true,
        ),
        s(
            "stream of 200 chunks, 100 endpoints, safety (hold)",
            100,
            1024,
            Sse(200),
            true,
            true,
        ),
    ]
}

/// `n` endpoints with fresh metrics: two idle, the rest loaded but unsaturated,
/// so the scheduler scores all of them (as in `bench overhead`).
fn pool(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}:8000", i / 62500, (i / 250) % 250, 1 + i % 250))
        .collect()
}

fn snapshot(eps: &[String], now_ms: u64) -> Snapshot {
    Snapshot {
        generated_at_ms: now_ms,
        sequence: 1,
        collector: "cost".into(),
        pools: vec![PoolSnapshot {
            name: "main".into(),
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, a)| EndpointMetrics {
                    address: a.clone(),
                    healthy: true,
                    scraped_at_ms: now_ms,
                    kv_cache_utilization: if i < 2 { 0.0 } else { 0.6 },
                    waiting: if i < 2 { 0 } else { 4 },
                    running: if i < 2 { 0 } else { 8 },
                    server_type: "vllm".into(),
                    ..Default::default()
                })
                .collect(),
        }],
    }
}

fn config(sc: &Scenario) -> Value {
    let mut cfg = json!({
        "max_request_body_bytes": 1 << 20,
        "pools": [{"name": "main", "endpoints": pool(sc.endpoints)}],
        "models": [{"name": "cost-model", "pool": "main"}],
    });
    if !sc.prefix {
        cfg["scheduling"] = json!({
            "profiles": [{"name": "no-prefix", "scorers": [
                {"type": "queue", "weight": 2}, {"type": "kv_cache", "weight": 2},
                {"type": "lora_affinity", "weight": 2}, {"type": "in_flight", "weight": 2}]}],
            "default_profile": "no-prefix",
        });
    }
    if sc.safety {
        cfg["safety"] = json!({
            "cluster": "model-armor",
            "timeout_ms": 300,
            "default": {
                "user_prompt_template_id": "projects/p/locations/l/templates/in",
                "model_response_template_id": "projects/p/locations/l/templates/out",
            },
        });
    }
    cfg
}

/// A chat body of about `bytes` bytes: a system prompt and a question.
fn chat_body(bytes: usize) -> String {
    let head = json!({"model": "cost-model", "messages": [
        {"role": "system", "content": ""}, {"role": "user", "content": "What is a good review?"}]})
    .to_string();
    let word = "delicious ";
    let room = bytes.saturating_sub(head.len());
    let mut system = word.repeat(room / word.len() + 1);
    system.truncate(room);
    json!({"model": "cost-model", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "What is a good review?"}]})
    .to_string()
}

/// Answers every callout not answered yet with "no match".
fn answer_checks(vm: &mut Vm, answered: &mut usize) {
    let calls = vm.calls();
    for c in &calls[*answered..] {
        vm.http_call_response(c.token, Some(200), NO_MATCH.as_bytes());
    }
    *answered = calls.len();
}

/// What one request cost, by phase.
struct Measured {
    request: Cost,
    response: Cost,
    host_calls: HashMap<&'static str, u64>,
    /// Instructions by callback (the checks' answers count with the phase they
    /// answer).
    phases: Vec<(String, u64)>,
}

/// One request through the filter, from its headers to its log.
fn one_request(vm: &mut Vm, sc: &Scenario, body: &str) -> Measured {
    // Until the response: 5 ms, or the time to the worker's next request.
    let response_after_us = if sc.under_load {
        UNDER_LOAD_SPACING_US
    } else {
        5_000
    };
    let mut answered = vm.calls().len();
    vm.reset_cost();
    let s = vm.stream();
    let len = body.len().to_string();
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gateway"),
        ("content-type", "application/json"),
        ("content-length", len.as_str()),
        ("x-request-id", "cost-1"),
    ];
    assert_eq!(vm.request_headers(s, &headers, false), Action::Pause);
    let headers_instructions = vm.cost().instructions;
    let routed = vm.request_body(s, body.as_bytes(), true);
    if sc.safety {
        assert_eq!(
            routed,
            Action::Pause,
            "{}: held for the prompt check",
            sc.name
        );
        answer_checks(vm, &mut answered);
        assert!(
            vm.state(s).resumed_request,
            "{}: resumed after the check",
            sc.name
        );
    } else {
        assert_eq!(routed, Action::Continue, "{}", sc.name);
    }
    assert!(
        vm.request_header(s, "x-gateway-destination-endpoint")
            .is_some(),
        "{}: routed",
        sc.name
    );
    let request = vm.cost();
    let mut host_calls = vm.host_calls();

    vm.reset_cost();
    vm.advance_us(response_after_us);
    match sc.response {
        Response::Json => {
            vm.response_headers(
                s,
                &[(":status", "200"), ("content-type", "application/json")],
                false,
            );
            let out = json!({"id": "c1", "object": "chat.completion", "model": "cost-model",
                "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "A good review names the dish, the taste and the price."}}],
                "usage": {"prompt_tokens": 250, "completion_tokens": 14, "total_tokens": 264}})
            .to_string();
            vm.response_body(s, out.as_bytes(), true, true);
            if sc.safety {
                answer_checks(vm, &mut answered);
                assert!(
                    vm.state(s).resumed_response,
                    "{}: response released",
                    sc.name
                );
            }
        }
        Response::Sse(chunks) => {
            vm.response_headers(
                s,
                &[(":status", "200"), ("content-type", "text/event-stream")],
                false,
            );
            for i in 0..chunks {
                vm.advance_ms(1);
                let chunk = format!(
                    "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}}}}]}}\n\n"
                );
                vm.response_chunk(s, chunk.as_bytes(), false);
                answer_checks(vm, &mut answered);
            }
            let last = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\"completion_tokens\":200,\"total_tokens\":450}}\n\ndata: [DONE]\n\n";
            vm.response_chunk(s, last.as_bytes(), true);
            answer_checks(vm, &mut answered);
        }
    }
    let before_end = vm.cost().instructions;
    vm.end(s);
    vm.assert_alive();
    assert!(
        vm.local_response(s).is_none(),
        "{}: no local reply",
        sc.name
    );
    let response = vm.cost();
    for (k, v) in vm.host_calls() {
        *host_calls.entry(k).or_default() += v;
    }
    let phases = [
        ("request headers", headers_instructions),
        ("request body", request.instructions - headers_instructions),
        ("response", before_end),
        ("end (done, log)", response.instructions - before_end),
    ];
    Measured {
        request,
        response,
        host_calls,
        phases: phases.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
    }
}

/// One scenario's figures, as committed in the budget.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Figures {
    /// Instructions from the request headers until the request is routed.
    request_instructions: u64,
    /// Instructions from the response headers to the end of the log.
    response_instructions: u64,
    instructions: u64,
    host_calls: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// Host calls per request by function.
    host_calls_by_function: BTreeMap<String, u64>,
    /// Instructions by phase (not budgeted: the totals are).
    instructions_by_phase: Vec<(String, u64)>,
}

fn measure(sc: &Scenario) -> Figures {
    if sc.under_load {
        measure_mean_of(sc, UNDER_LOAD_REQUESTS)
    } else {
        measure_last_of(sc, 1)
    }
}

/// [`measure`], the measured request being the last of `requests` (the
/// profiler runs many on one VM).
fn measure_last_of(sc: &Scenario, requests: usize) -> Figures {
    let mut all = run(sc, requests as u64);
    figures(all.pop().expect("a request"), 1)
}

/// [`measure`], the mean of `requests` (rounded to the nearest whole number).
fn measure_mean_of(sc: &Scenario, requests: u64) -> Figures {
    let mut all = run(sc, requests).into_iter();
    let mut sum = all.next().expect("a request");
    for m in all {
        sum.request = sum_cost(&sum.request, &m.request);
        sum.response = sum_cost(&sum.response, &m.response);
        for (k, v) in m.host_calls {
            *sum.host_calls.entry(k).or_default() += v;
        }
        for (p, (_, v)) in sum.phases.iter_mut().zip(m.phases) {
            p.1 += v;
        }
    }
    figures(sum, requests)
}

fn sum_cost(a: &Cost, b: &Cost) -> Cost {
    Cost {
        instructions: a.instructions + b.instructions,
        host_calls: a.host_calls + b.host_calls,
        bytes_in: a.bytes_in + b.bytes_in,
        bytes_out: a.bytes_out + b.bytes_out,
    }
}

/// A scenario's VM after two requests of warm-up, then `requests` measured.
fn run(sc: &Scenario, requests: u64) -> Vec<Measured> {
    let host = Host::new();
    let mut control = host.vm();
    control
        .configure(&json!({"role": "control", "ingest": {"token": TOKEN}}).to_string())
        .expect("control config");
    let mut vm = host.vm();
    vm.configure(&config(sc).to_string())
        .unwrap_or_else(|e| panic!("{}: config refused: {e}", sc.name));

    let eps = pool(sc.endpoints);
    let snap = snapshot(&eps, vm.now_ms()).encode();
    let s = control.stream();
    let len = snap.len().to_string();
    let auth = format!("Bearer {TOKEN}");
    control.request_headers(
        s,
        &[
            (":method", "POST"),
            (":path", "/v1/snapshot"),
            ("authorization", &auth),
            ("content-length", &len),
        ],
        false,
    );
    control.request_body(s, &snap, true);
    let r = control.local_response(s).expect("ingest answers");
    assert_eq!(
        r.status,
        204,
        "{}: snapshot accepted: {:?}",
        sc.name,
        r.json()
    );
    control.end(s);

    if sc.busy {
        // The request metrics as after traffic to every endpoint.
        let mut series = inference_gateway::observe::Series::default();
        for e in &eps {
            inference_gateway::observe::request::apply_routed(&mut series, e);
        }
        host.set_shared(
            &inference_gateway::observe::series_key("cost-model", "cost-model"),
            &series.encode(),
        );
    }
    let open = sc.under_load.then(|| {
        let s = vm.stream();
        let headers = [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-type", "application/json"),
        ];
        assert_eq!(vm.request_headers(s, &headers, false), Action::Pause);
        s
    });
    let body = chat_body(sc.body_bytes);
    // Two requests first: per-VM caches (the decoded snapshot, metric ids, the
    // shared-data layout) are built once, not per request.
    for _ in 0..2 {
        one_request(&mut vm, sc, &body);
    }
    let measured = (0..requests)
        .map(|_| one_request(&mut vm, sc, &body))
        .collect();
    if let Some(s) = open {
        vm.end(s);
        vm.assert_alive();
    }
    measured
}

/// The figures of `m`, the sum of `n` requests: each divided by `n`, rounded.
fn figures(m: Measured, n: u64) -> Figures {
    let per = |v: u64| (v + n / 2) / n;
    Figures {
        request_instructions: per(m.request.instructions),
        response_instructions: per(m.response.instructions),
        instructions: per(m.request.instructions + m.response.instructions),
        host_calls: per(m.request.host_calls + m.response.host_calls),
        bytes_in: per(m.request.bytes_in + m.response.bytes_in),
        bytes_out: per(m.request.bytes_out + m.response.bytes_out),
        host_calls_by_function: m
            .host_calls
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("proxy_").to_string(), per(v)))
            .filter(|&(_, v)| v > 0)
            .collect(),
        instructions_by_phase: m.phases.into_iter().map(|(k, v)| (k, per(v))).collect(),
    }
}

fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results")
}

fn table(figures: &BTreeMap<String, Figures>, order: &[Scenario]) -> String {
    let mut md = String::from(
        "# The cost of a request, counted\n\n\
         Made by `REQUEST_COST_UPDATE=1 cargo test --test request_cost` (tests/request_cost.rs):\n\
         the release `.wasm` in the wasmtime proxy-wasm host with fuel metering. One request\n\
         after two of warm-up on the same VM (*under load*: the mean of 32, one every 0.5 ms\n\
         with another request open, so the work done once per interval is shared as under\n\
         load; rounded); a live snapshot of the pool (two idle\n\
         endpoints, the rest loaded but unsaturated, so every endpoint is scored); every\n\
         safety check answered \"no match\". Instructions are wasmtime fuel (one per Wasm\n\
         instruction, a few structural ones free); *bytes in* are bytes the host copied into\n\
         the module (bodies, headers, shared data), *bytes out* those it read from it.\n\
         Deterministic for a given module; the test fails when a figure grows more than\n\
         10 % (instructions, bytes) or at all (host calls) over this budget.\n\n\
         | scenario | instructions: request | response | total | host calls | bytes in | bytes out |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let n = inference_gateway::bench::report::thousands;
    for sc in order {
        let f = &figures[sc.name];
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            sc.name,
            n(f.request_instructions),
            n(f.response_instructions),
            n(f.instructions),
            f.host_calls,
            n(f.bytes_in),
            n(f.bytes_out)
        ));
    }
    md.push_str("\n## Instructions per request, by callback\n\n| scenario |");
    for (phase, _) in &figures[order[0].name].instructions_by_phase {
        md.push_str(&format!(" {phase} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(figures[order[0].name].instructions_by_phase.len()));
    md.push('\n');
    for sc in order {
        md.push_str(&format!("| {} |", sc.name));
        for (_, v) in &figures[sc.name].instructions_by_phase {
            md.push_str(&format!(" {} |", n(*v)));
        }
        md.push('\n');
    }
    md.push_str("\n## Host calls per request, by function\n\n");
    let mut functions: Vec<&String> = figures
        .values()
        .flat_map(|f| f.host_calls_by_function.keys())
        .collect();
    functions.sort();
    functions.dedup();
    md.push_str("| scenario |");
    for f in &functions {
        md.push_str(&format!(" {f} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(functions.len()));
    md.push('\n');
    for sc in order {
        let f = &figures[sc.name];
        md.push_str(&format!("| {} |", sc.name));
        for func in &functions {
            let v = f.host_calls_by_function.get(*func).copied().unwrap_or(0);
            md.push_str(&format!(" {v} |"));
        }
        md.push('\n');
    }
    md
}

#[test]
fn request_cost_stays_within_the_committed_budget() {
    let order = scenarios();
    let figures: BTreeMap<String, Figures> = order
        .iter()
        .map(|sc| (sc.name.to_string(), measure(sc)))
        .collect();
    let md = table(&figures, &order);
    println!("{md}");
    let budget_file = results_dir().join("request-cost.json");
    if std::env::var("REQUEST_COST_UPDATE").is_ok_and(|v| v == "1") {
        let json = serde_json::to_string_pretty(&figures).unwrap() + "\n";
        std::fs::write(&budget_file, json).expect("write the budget");
        std::fs::write(results_dir().join("request-cost.md"), md).expect("write the table");
        return;
    }
    let budget: BTreeMap<String, Figures> = serde_json::from_slice(
        &std::fs::read(&budget_file)
            .expect("the committed budget (benches/results/request-cost.json)"),
    )
    .expect("the budget parses");
    let mut over = Vec::new();
    for sc in &order {
        let (now, was) = (&figures[sc.name], budget.get(sc.name));
        let Some(was) = was else {
            over.push(format!(
                "{}: not in the budget (re-run with REQUEST_COST_UPDATE=1)",
                sc.name
            ));
            continue;
        };
        let grown = |what: &str, now: u64, was: u64, margin: f64, over: &mut Vec<String>| {
            if now as f64 > was as f64 * (1.0 + margin) {
                over.push(format!(
                    "{}: {what} {now} > budget {was} (+{:.0} % allowed)",
                    sc.name,
                    margin * 100.0
                ));
            }
        };
        grown(
            "instructions",
            now.instructions,
            was.instructions,
            INSTRUCTION_MARGIN,
            &mut over,
        );
        grown("host calls", now.host_calls, was.host_calls, 0.0, &mut over);
        grown(
            "bytes in",
            now.bytes_in,
            was.bytes_in,
            BYTES_MARGIN,
            &mut over,
        );
        grown(
            "bytes out",
            now.bytes_out,
            was.bytes_out,
            BYTES_MARGIN,
            &mut over,
        );
    }
    assert!(
        over.is_empty(),
        "the request cost grew past its budget:\n{}\n(if on purpose: REQUEST_COST_UPDATE=1 cargo test --test request_cost, and commit the new budget)",
        over.join("\n")
    );
}

/// Where a 1 KB chat request at 100 endpoints spends its time in the module: a
/// sampling profile of many requests (`WASM_PROFILE=1 cargo test --release --test
/// request_cost -- --ignored --nocapture profile`). Prints the functions with
/// the most samples; it asserts nothing (a tool, not a check).
#[test]
#[ignore = "a profiling tool: run it by name with WASM_PROFILE=1"]
fn profile_a_chat_request() {
    let name = std::env::var("WASM_PROFILE_SCENARIO")
        .unwrap_or_else(|_| "chat 1 KB, 100 endpoints".to_string());
    let sc = scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name:?}"));
    let requests = 20_000;
    let started = std::time::Instant::now();
    let (_, rows) = wasm_host::profile(std::time::Duration::from_micros(20), || {
        measure_last_of(&sc, requests);
    });
    // Wall time, with fuel metering and the sampler on: for comparing two
    // builds of the module on one quiet machine, not a benchmark.
    let per_request = started.elapsed() / requests as u32;
    let total: u64 = rows.iter().map(|r| r.1).sum();
    println!(
        "{name}: {total} samples over {requests} requests on one VM (after its set-up), {per_request:?} per request in this host"
    );
    println!("{:>6} {:>6}  function", "self%", "total%");
    for (f, own, all) in rows.iter().take(60) {
        let pct = |n: u64| 100.0 * n as f64 / total.max(1) as f64;
        println!("{:>6.1} {:>6.1}  {f}", pct(*own), pct(*all));
    }
}
