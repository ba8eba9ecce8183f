//! The `endpoint-picker` (ext_proc) host applies a pool's backend policy like
//! the filter (docs/backend-policy.md): the same pick (`gateway::choose`) caps
//! each replica's in-flight requests (checked from the replicas' own
//! concurrency figure), and the picker marks sampled-out requests so the same
//! Envoy access-log filter drops them while still logging errors.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::deploy::envoy_config;
use support::envoy::Envoy;
use support::picker::PickerProcess;
use support::sim::{Sim, SimOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picker_caps_in_flight_per_endpoint_and_samples_the_access_log() {
    support::envoy::runtime();
    let dir = tempfile::Builder::new()
        .prefix("e2e-picker-policy-")
        .tempdir()
        .unwrap();
    let options = SimOptions {
        per_token_ms: 10,
        ..SimOptions::default()
    };
    let sims: Vec<Sim> = (0..2)
        .map(|i| {
            Sim::start(&format!("sim-{i}"), &options, dir.path()).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let endpoints: Vec<Value> = sims
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"address": s.endpoint(), "labels": {"gke.io/zone": if i == 0 { "a" } else { "b" }}}))
        .collect();
    let config = json!({
        "plugin": {
            "pools": [{"name": "pool", "endpoints": []}],
            "models": [{"name": "chat", "pool": "pool"}],
            "backend_policies": [{
                "pool": "pool",
                "default": {"max_in_flight_per_endpoint": 2},
                "scopes": [{"selector": {"gke.io/zone": "a"}, "backend_preference": "PREFERRED"}],
                "logging": {"enabled": false}
            }]
        },
        "discovery": {
            "scrape_interval_ms": 50,
            "pools": [{"name": "pool", "endpoints": endpoints}]
        }
    });
    let picker = PickerProcess::start(dir.path(), &config, None, &[], &[]).await;
    let settings = picker.envoy_settings();
    let envoy_yaml = dir.path().join("envoy.yaml");
    std::fs::write(&envoy_yaml, envoy_config::render(&settings)).unwrap();
    let envoy = {
        let (s, c, d) = (
            settings.clone(),
            envoy_yaml.clone(),
            dir.path().to_path_buf(),
        );
        tokio::task::spawn_blocking(move || Envoy::start(&s, &c, &d))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("Envoy did not start: {e}"))
    };
    let client = support::http_client();
    let url = format!("{}/v1/completions", settings.gateway_url());
    let body = |max_tokens: u32| json!({"model": "chat", "prompt": "hi", "max_tokens": max_tokens, "stream": true});
    // Until the picker has the labelled members from its discovery.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut warm_errors = 0;
    loop {
        let r = client.post(&url).json(&body(1)).send().await.unwrap();
        let ok = r.status() == 200;
        let _ = r.bytes().await;
        if ok {
            break;
        }
        warm_errors += 1;
        assert!(
            Instant::now() < deadline,
            "the picker never routed: {}",
            picker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 24 simultaneous streams for 4 slots.
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body(30));
            tokio::spawn(async move {
                let r = client.post(&url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            })
        })
        .collect();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_default() += 1;
    }
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 4,
        "{statuses:?}"
    );
    assert!(statuses.get(&503).copied().unwrap_or(0) > 0, "{statuses:?}");
    for s in &sims {
        let state: Value = client
            .get(s.url("/sim/state"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let peak = state["max_concurrent_requests"].as_u64();
        assert!(peak <= Some(2), "{}: {state}", s.id);
    }

    // The picker's /metrics: the counters and the per-endpoint gauges.
    let metrics_url = format!("http://127.0.0.1:{}/metrics", picker.metrics);
    // Until the picker has seen every stream end.
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let text = support::get_text(&client, &metrics_url).await;
        let busy = text
            .lines()
            .any(|l| l.starts_with("inference_pool_endpoint_in_flight{") && !l.ends_with(" 0"));
        if !busy || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let value = |series: &str| support::sim::sample(&metrics, series);
    // Every zone-b request was a spill-over (zone a is PREFERRED).
    let spilled = sims[1]
        .requests(&client)
        .await
        .iter()
        .filter(|r| r["path"] == "/v1/completions")
        .count();
    assert!(spilled > 0, "nothing spilled to zone b");
    assert_eq!(
        value(r#"inference_pool_spill_total{pool_name="pool"}"#),
        Some(spilled as f64),
        "{metrics}"
    );
    // Warm-up refusals (before the members were known) are no-endpoint 503s.
    assert_eq!(
        value(r#"inference_pool_capacity_refused_total{pool_name="pool"}"#),
        Some(statuses[&503] as f64),
        "{metrics}"
    );
    for (i, s) in sims.iter().enumerate() {
        let l = format!("{{pool_name=\"pool\",endpoint=\"{}\"}}", s.endpoint());
        let g = |name: &str| value(&format!("{name}{l}"));
        assert_eq!(
            g("inference_pool_endpoint_in_flight_cap"),
            Some(2.0),
            "{metrics}"
        );
        assert_eq!(
            g("inference_pool_endpoint_in_flight"),
            Some(0.0),
            "{metrics}"
        );
        assert_eq!(
            g("inference_pool_endpoint_preferred"),
            Some(if i == 0 { 1.0 } else { 0.0 })
        );
    }

    // logging.enabled false: no 200 in the access log, every 503 there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let count = |status: u16| {
        let needle = format!("\"POST /v1/completions HTTP/1.1\" {status} ");
        envoy
            .all_logs()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    };
    let errors = |c: &dyn Fn(u16) -> usize| (500..600).map(c).sum::<usize>();
    let want = statuses[&503] + warm_errors;
    while errors(&count) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(errors(&count), want, "{}", envoy.logs());
    assert_eq!(count(200), 0, "a sampled-out success was logged");
}
