//! End to end: the GKE migration from a v1alpha2 pool to a v1 pool, played under
//! steady load on a running Envoy. Each phase's configuration is what `igwctl`
//! renders from the shared examples (the two InferencePools, the InferenceModels,
//! the InferenceObjectives, then the 50/50 HTTPRoute, then the 100 % v1 one); the
//! gateway filter reads it through an ECDS file (Envoy's extension config
//! discovery), which the test rewrites between phases. Checks: no client request
//! fails, the 50/50 split holds within ±5 % over 2,000 requests, and after the
//! cut-over the old pool gets nothing.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::gateway::{Gateway, GatewayOptions};
use support::traffic::{failures, Traffic};

const PREVIEW: &str = "vllm-llama3-8b-instruct-preview";
const GA: &str = "vllm-llama3-8b-instruct-ga";

/// The plugin configuration `igwctl render` makes of the shared examples plus
/// `route` (none: phase 1), with the replicas as the pools' bootstrap members
/// (no collector here: in a cluster they come from the pools' headless Services).
fn rendered(route: Option<&str>, preview: &[String], ga: &[String]) -> Value {
    use inference_gateway::k8s::render::{render, RenderOptions};
    let dir = support::repo_root().join("tests/fixtures/k8s-examples");
    let mut files: Vec<std::path::PathBuf> = [
        "inferencepool-v1alpha2.yaml",
        "inferencepool-v1.yaml",
        "inferencemodel-v1alpha2.yaml",
        "inferenceobjectives.yaml",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    files.extend(route.map(|r| dir.join(r)));
    let (inventory, errors) = inference_gateway::k8s::load(&files);
    assert!(errors.is_empty(), "{errors:?}");
    let mut config = render(&inventory, &RenderOptions::default())
        .unwrap_or_else(|e| panic!("{e:?}"))
        .plugin_config;
    for pool in config["pools"].as_array_mut().unwrap() {
        let members = if pool["name"] == PREVIEW { preview } else { ga };
        pool["endpoints"] = json!(members);
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_from_the_preview_pool_to_the_ga_pool_under_load() {
    let mut gw = Gateway::start_ecds(GatewayOptions {
        replicas: 4,
        configure: Box::new(|s| {
            let eps: Vec<String> = s.gateway_config["pools"][0]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_string())
                .collect();
            s.gateway_config = rendered(None, &eps[..2], &eps[2..]);
        }),
        ..GatewayOptions::default()
    })
    .await;
    let eps: Vec<String> = gw.sims.iter().map(|s| s.endpoint()).collect();
    let ids = gw.endpoint_ids();
    let preview: Vec<String> = eps[..2].iter().map(|e| ids[e].clone()).collect();
    let ga: Vec<String> = eps[2..].iter().map(|e| ids[e].clone()).collect();

    // Steady load: four clients, back to back, until stopped.
    let traffic = Traffic::start(gw.url("/v1/chat/completions"), 4, "food-review", 1);
    // Per pool, of the successful requests sent in [from, to).
    let shares = |from: Instant, to: Instant| {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for id in traffic.since(from, to).into_iter().flatten() {
            let pool = if preview.contains(&id) {
                "preview"
            } else if ga.contains(&id) {
                "ga"
            } else {
                "?"
            };
            *per.entry(pool).or_default() += 1;
        }
        per
    };
    let wait_for = |from: Instant, n: usize| traffic.wait_count(from, n, Duration::from_secs(60));

    // Phase 1: everything on the preview pool.
    let start = Instant::now();
    let end1 = wait_for(start, 300).await;
    let phase1 = shares(start, end1);
    eprintln!("100/0: {phase1:?}");
    assert_eq!(phase1.get("ga"), None, "{phase1:?}");

    // Phase 2: 50/50, applied to the running gateway.
    let split = rendered(Some("httproute-split-50-50.yaml"), &eps[..2], &eps[2..]);
    assert_eq!(
        split["backends"],
        json!([{"pool": PREVIEW, "weight": 50}, {"pool": GA, "weight": 50}])
    );
    let applied = gw.apply_gateway_config_and_wait(split).await;
    let end2 = wait_for(applied, 2_000).await;
    let phase2 = shares(applied, end2);
    let total: usize = phase2.values().sum();
    let ga_share = *phase2.get("ga").unwrap_or(&0) as f64 / total as f64;
    eprintln!(
        "50/50: {phase2:?} over {total} requests: {:.1} % on ga",
        ga_share * 100.0
    );
    assert!(total >= 2_000);
    assert!((0.45..=0.55).contains(&ga_share), "{phase2:?}");

    // Phase 3: 0/100, the preview pool drained.
    let ga_only = rendered(Some("httproute-ga-100.yaml"), &eps[..2], &eps[2..]);
    let applied = gw.apply_gateway_config_and_wait(ga_only).await;
    let end3 = wait_for(applied, 500).await;
    let phase3 = shares(applied, end3);
    eprintln!("0/100: {phase3:?}");
    assert_eq!(phase3.get("preview"), None, "{phase3:?}");

    let log = traffic.stop().await;
    let failures = failures(&log);
    eprintln!("{} requests in all, {} failed", log.len(), failures.len());
    assert!(
        failures.is_empty(),
        "client requests failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    gw.wait_all_released(Duration::from_secs(5)).await;
}
