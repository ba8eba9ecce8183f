//! End to end: the GKE migration from a v1alpha2 pool to a v1 pool, played under
//! steady load on a running Envoy. The gateway filter's configuration comes from
//! an ECDS file (Envoy's extension config discovery); the test rewrites the
//! HTTPRoute weights there (`backends`), 100/0 → 50/50 → 0/100, and checks that no
//! client request fails, that the 50/50 split holds within ±5 % over 2,000
//! requests, and that after the cut-over the old pool gets nothing.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::api::server_id;
use support::gateway::{Gateway, GatewayOptions};

/// The plugin configuration: two pools (two replicas each) and the route's weights.
fn config(preview: &[String], ga: &[String], weights: (u32, u32)) -> Value {
    json!({
        "pools": [
            {"name": "vllm-llama3-8b-instruct-preview", "endpoints": preview},
            {"name": "vllm-llama3-8b-instruct-ga", "endpoints": ga}
        ],
        "backends": [
            {"pool": "vllm-llama3-8b-instruct-preview", "weight": weights.0},
            {"pool": "vllm-llama3-8b-instruct-ga", "weight": weights.1}
        ],
        "models": [{"name": "food-review", "pool": "vllm-llama3-8b-instruct-preview",
                    "criticality": "Standard"}]
    })
}

/// ECDS reloads the admin interface has counted so far.
async fn reloads(gw: &Gateway) -> u64 {
    let text = gw
        .client
        .get(gw.admin_url("/stats?filter=extension_config_discovery"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.contains("envoy.filters.http.wasm.config_reload:"))
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// Applies `config` and waits until Envoy has loaded it.
async fn apply(gw: &mut Gateway, config: Value) -> Instant {
    let before = reloads(gw).await;
    gw.apply_gateway_config(config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(gw).await <= before {
        assert!(
            Instant::now() < deadline,
            "Envoy did not reload the ECDS file within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Instant::now()
}

type Log = Arc<Mutex<Vec<(Instant, Result<String, String>)>>>;

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
            s.gateway_config = config(&eps[..2], &eps[2..], (100, 0));
        }),
        ..GatewayOptions::default()
    })
    .await;
    let eps: Vec<String> = gw.sims.iter().map(|s| s.endpoint()).collect();
    let ids = gw.endpoint_ids();
    let preview: Vec<String> = eps[..2].iter().map(|e| ids[e].clone()).collect();
    let ga: Vec<String> = eps[2..].iter().map(|e| ids[e].clone()).collect();

    // Steady load: four clients, back to back, until stopped.
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (log, stop, url) = (log.clone(), stop.clone(), gw.url("/v1/chat/completions"));
            tokio::spawn(async move {
                let client = support::http_client();
                let body = json!({"model": "food-review", "max_tokens": 1,
                                  "messages": [{"role": "user", "content": format!("review {i}")}]});
                for _ in 0..50_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let sent = Instant::now();
                    let outcome = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => {
                            let id = server_id(&r);
                            r.bytes().await.map(|_| id).map_err(|e| e.to_string())
                        }
                        Ok(r) => Err(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                        Err(e) => Err(e.to_string()),
                    };
                    log.lock().unwrap().push((sent, outcome));
                }
            })
        })
        .collect();
    // Per pool, of the successful requests sent in [from, to).
    let shares = |from: Instant, to: Instant| {
        let log = log.lock().unwrap();
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, r) in log.iter().filter(|(t, _)| *t >= from && *t < to) {
            if let Ok(id) = r {
                let pool = if preview.contains(id) {
                    "preview"
                } else if ga.contains(id) {
                    "ga"
                } else {
                    "?"
                };
                *per.entry(pool).or_default() += 1;
            }
        }
        per
    };
    let wait_for = |from: Instant, n: usize| {
        let log = log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let count = log
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(t, _)| *t >= from)
                    .count();
                if count >= n {
                    return Instant::now();
                }
                assert!(
                    Instant::now() < deadline,
                    "only {count} of {n} requests within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Phase 1: everything on the preview pool.
    let start = Instant::now();
    let end1 = wait_for(start, 300).await;
    let phase1 = shares(start, end1);
    eprintln!("100/0: {phase1:?}");
    assert_eq!(phase1.get("ga"), None, "{phase1:?}");

    // Phase 2: 50/50, applied to the running gateway.
    let applied = apply(&mut gw, config(&eps[..2], &eps[2..], (50, 50))).await;
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
    let applied = apply(&mut gw, config(&eps[..2], &eps[2..], (0, 100))).await;
    let end3 = wait_for(applied, 500).await;
    let phase3 = shares(applied, end3);
    eprintln!("0/100: {phase3:?}");
    assert_eq!(phase3.get("preview"), None, "{phase3:?}");

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    let failures: Vec<_> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    eprintln!("{} requests in all, {} failed", log.len(), failures.len());
    assert!(
        failures.is_empty(),
        "client requests failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    gw.wait_all_released(Duration::from_secs(5)).await;
}
