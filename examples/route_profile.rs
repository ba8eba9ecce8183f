//! The routing decision in a loop, for an instruction profiler: the same
//! `plan_route` + `choose` the filter runs per request, natively, through the
//! ext_proc picker (which holds its store in memory). Used to find what to cut
//! (issue 16); the counted figures of the real `.wasm` are `tests/request_cost.rs`.
//!
//! ```sh
//! cargo build --release --example route_profile
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!   target/release/examples/route_profile 100 2000
//! callgrind_annotate --inclusive=yes /tmp/cg.out | head -60
//! ```

use inference_gateway::config::Config;
use inference_gateway::extproc::Picker;
use inference_gateway::openai::ApiKind;
use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use serde_json::json;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let eps: Vec<String> = (0..n)
        .map(|i| format!("10.0.{}.{}:8000", i / 250, 1 + i % 250))
        .collect();
    let now = 1_700_000_000_000u64;
    let snapshot = Snapshot {
        generated_at_ms: now,
        sequence: 1,
        collector: "profile".into(),
        pools: vec![PoolSnapshot {
            name: "main".into(),
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, a)| EndpointMetrics {
                    address: a.clone(),
                    healthy: true,
                    scraped_at_ms: now,
                    kv_cache_utilization: if i < 2 { 0.0 } else { 0.6 },
                    waiting: if i < 2 { 0 } else { 4 },
                    running: if i < 2 { 0 } else { 8 },
                    server_type: "vllm".into(),
                    ..Default::default()
                })
                .collect(),
        }],
    };
    let config = json!({"pools": [{"name": "main", "endpoints": eps}],
        "models": [{"name": "m", "pool": "main"}]});
    let picker = Picker::new(Config::from_json(config.to_string().as_bytes()).expect("config"));
    picker.ingest(&snapshot.encode()).expect("snapshot");
    let system = "delicious ".repeat(95);
    let body = json!({"model": "m", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "What is a good review?"}]})
    .to_string();
    let mut draw = 7u32;
    for _ in 0..requests {
        let routed = picker
            .route(ApiKind::ChatCompletions, body.as_bytes(), None, now, || {
                draw = draw.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                draw
            })
            .expect("routed");
        if let Some(h) = routed.holding {
            picker.release(&h);
        }
    }
}
