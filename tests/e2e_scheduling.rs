//! End to end: inference-aware endpoint picking with the real Envoy and filter,
//! the metrics-collector pushing live snapshots, and vLLM-like simulator
//! replicas (continuous batching, KV and prefix cache, LoRA slots). Checks that
//! LoRA requests land where their adapter is loaded, that repeated long prefixes
//! stick to one replica and get faster first tokens there, and that a saturated
//! pool sheds sheddable requests while still serving important ones.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::api::{hold_stream, openai_error, server_id, streamed_completion};
use support::collector::{pool_config, Collector};
use support::deploy::envoy_config::DEMO_POOL;
use support::gateway::{Gateway, GatewayOptions};
use support::sim::SimOptions;

const TOKEN: &str = "scheduling-test-token";

struct Stack {
    gw: Gateway,
    _collector: Collector,
    _dir: tempfile::TempDir,
}

/// Replicas with `sim_args`, Envoy with the filter (plus `configure` on its plugin
/// configuration), and a collector scraping every 50 ms into the control listener.
/// Returns once the filter holds a fresh snapshot of every replica.
async fn start(
    replicas: usize,
    per_token_ms: u64,
    sim_args: &[&str],
    configure: impl FnOnce(&mut Value) + Send + 'static,
) -> Stack {
    let gw = Gateway::start(GatewayOptions {
        replicas,
        sim: SimOptions {
            per_token_ms,
            extra_args: sim_args.iter().map(|s| s.to_string()).collect(),
            ..SimOptions::default()
        },
        configure: Box::new(move |s| {
            s.control_config = json!({"role": "control", "ingest": {"token": TOKEN}});
            s.gateway_config["scheduling"] = json!({"explain": true});
            configure(&mut s.gateway_config);
        }),
    })
    .await;
    let dir = tempfile::Builder::new()
        .prefix("e2e-scheduling-")
        .tempdir()
        .expect("temp dir");
    let endpoints: Vec<String> = gw.sims.iter().map(|s| s.endpoint()).collect();
    let control = format!("127.0.0.1:{}", gw.settings.control_port);
    let config = pool_config(DEMO_POOL, &endpoints, &control, 50);
    let collector =
        tokio::task::block_in_place(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    let stack = Stack {
        gw,
        _collector: collector,
        _dir: dir,
    };
    wait_snapshot(&stack.gw, "every replica fresh", |eps| {
        endpoints
            .iter()
            .all(|e| eps.get(e).is_some_and(|m| m["healthy"] == true))
    })
    .await;
    stack
}

/// Polls the filter's snapshot (`/debug/state`) until `pred` holds for its
/// endpoints (address → metrics, fresh ones only).
async fn wait_snapshot(
    gw: &Gateway,
    what: &str,
    pred: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let state = gw.debug_state().await;
        let fresh = &state["snapshot"]["endpoints"];
        let eps: BTreeMap<String, Value> = state["snapshot"]["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| {
                let addr = e["address"].as_str()?.to_string();
                (fresh[&addr] == true).then_some((addr, e))
            })
            .collect();
        if pred(&eps) {
            return eps;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; filter state: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Streams a chat completion through the gateway: (replica, time to first token).
async fn stream_ttft(gw: &Gateway, body: &Value) -> (String, Duration) {
    let started = Instant::now();
    let resp = gw.post_json("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let id = server_id(&resp);
    let mut s = resp.bytes_stream();
    let mut ttft = None;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.expect("stream chunk");
        if ttft.is_none() && String::from_utf8_lossy(&chunk).contains("\"content\"") {
            ttft = Some(started.elapsed());
        }
    }
    (id, ttft.expect("a content chunk"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_requests_land_on_the_replica_that_has_the_adapter_loaded() {
    let stack = start(
        3,
        10,
        &["--lora-adapters", "sql-lora,food-lora", "--max-loras", "1"],
        |cfg| {
            let models = cfg["models"].as_array_mut().expect("models");
            for name in ["sql-lora", "food-lora"] {
                models.push(json!({"name": name, "pool": DEMO_POOL, "adapter": true}));
            }
        },
    )
    .await;
    let gw = &stack.gw;
    // sim-1 runs sql-lora: its only LoRA slot is taken by it.
    let loaded = gw.sims[1].endpoint();
    let holder = hold_stream(
        gw.sims[1].url("/v1/completions"),
        streamed_completion("sql-lora", "a long running query", 2_000),
    );
    wait_snapshot(gw, "sql-lora running on sim-1", |eps| {
        eps.get(&loaded)
            .is_some_and(|m| m["running_adapters"].to_string().contains("sql-lora"))
    })
    .await;

    // Although sim-1 is the busiest replica, sql-lora requests go there.
    for i in 0..6 {
        let body = json!({"model": "sql-lora", "messages": [{"role": "user", "content": format!("SELECT {i}")}], "max_tokens": 4});
        let resp = gw.post_json("/v1/chat/completions", &body).await;
        let explained = resp
            .headers()
            .get("x-gateway-scheduling")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert_eq!(resp.status(), 200);
        assert_eq!(server_id(&resp), "sim-1", "sql-lora #{i}: {explained}");
    }
    // food-lora would have to evict sql-lora on sim-1: it goes elsewhere.
    for i in 0..4 {
        let body = json!({"model": "food-lora", "messages": [{"role": "user", "content": format!("pizza {i}")}], "max_tokens": 4});
        let resp = gw.post_json("/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 200);
        assert_ne!(server_id(&resp), "sim-1", "food-lora #{i}");
    }
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_long_prefix_sticks_to_one_replica_and_gets_faster_first_tokens() {
    // 20 ms a token, so a 3000-token cold prefill costs about 0.6 s.
    let stack = start(3, 20, &[], |_| {}).await;
    let gw = &stack.gw;
    let system: String = (0..3_000)
        .map(|i| format!("rule{} ", i % 97))
        .collect::<String>();
    let mut runs = Vec::new();
    for q in 0..5 {
        let body = json!({
            "model": "chat",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": format!("question {q}?")}
            ],
            "max_tokens": 2,
            "stream": true
        });
        runs.push(stream_ttft(gw, &body).await);
    }
    let first = &runs[0];
    for (id, _) in &runs[1..] {
        assert_eq!(id, &first.0, "the shared prefix must stick: {runs:?}");
    }
    let mut warm: Vec<Duration> = runs[1..].iter().map(|r| r.1).collect();
    warm.sort();
    let median = warm[warm.len() / 2];
    assert!(
        median * 2 < first.1,
        "cached prefix: first token {:?} cold, {median:?} warm (median): {runs:?}",
        first.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_sheds_sheddable_requests_and_still_serves_priority_ones() {
    let stack = start(2, 10, &["--max-num-seqs", "1"], |cfg| {
        cfg["scheduling"]["saturation"] = json!({"queue_depth": 2});
    })
    .await;
    let gw = &stack.gw;
    // One running and three waiting on every replica (each stream 80 tokens,
    // about 0.8 s of decode).
    let mut holders = Vec::new();
    for sim in &gw.sims {
        for i in 0..4 {
            holders.push(hold_stream(
                sim.url("/v1/completions"),
                streamed_completion("chat", &format!("busy {i}"), 80),
            ));
        }
    }
    let endpoints: Vec<String> = gw.sims.iter().map(|s| s.endpoint()).collect();
    wait_snapshot(gw, "every replica queueing", |eps| {
        endpoints
            .iter()
            .all(|e| eps.get(e).is_some_and(|m| m["waiting"].as_u64() >= Some(2)))
    })
    .await;

    let sheddable = json!({"model": "chat", "priority": -1, "messages": [{"role": "user", "content": "can wait"}], "max_tokens": 2});
    let resp = gw.post_json("/v1/chat/completions", &sheddable).await;
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (status, body) = openai_error(resp).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        retry_after.is_some_and(|s| s.parse::<u32>().is_ok()),
        "retry-after"
    );

    let important = json!({"model": "chat", "priority": 1, "messages": [{"role": "user", "content": "cannot wait"}], "max_tokens": 2});
    let resp = gw.post_json("/v1/chat/completions", &important).await;
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );

    // Once the queues drain, sheddable requests are served again.
    for h in holders {
        h.abort();
    }
    wait_snapshot(gw, "queues drained", |eps| {
        endpoints
            .iter()
            .all(|e| eps.get(e).is_some_and(|m| m["waiting"].as_u64() == Some(0)))
    })
    .await;
    let resp = gw.post_json("/v1/chat/completions", &sheddable).await;
    assert_eq!(resp.status(), 200);
}
