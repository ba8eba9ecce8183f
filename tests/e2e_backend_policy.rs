//! End to end: backend policies (docs/backend-policy.md) with the real Envoy and
//! filter, the metrics-collector and four simulator replicas labelled in two
//! zones (`gke.io/zone`; sim-0, sim-1: zone a; sim-2, sim-3: zone b). The replicas report how
//! many generation requests they ever ran at once (`/sim/state`), so the caps
//! are checked from the servers' side.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::api::streamed_completion;
use support::collector::Collector;
use support::deploy::envoy_config::DEMO_POOL;
use support::gateway::{Gateway, GatewayOptions};
use support::sim::{Sim, SimOptions};
use support::traffic::{failures, Traffic};

const TOKEN: &str = "backend-policy-test-token";

struct Stack {
    gw: Gateway,
    _collector: Collector,
    _dir: tempfile::TempDir,
}

fn zone(i: usize) -> &'static str {
    if i < 2 {
        "a"
    } else {
        "b"
    }
}

/// Four replicas (10 ms a token), Envoy with `policy` as the pool's backend
/// policy (through ECDS, so it can be replaced), and a collector pushing the
/// replicas with their `zone` label every 50 ms. Returns once the filter holds a
/// fresh snapshot of every replica.
async fn start(policy: Value) -> Stack {
    let gw = policy_gateway(policy, 4).await;
    let dir = temp_dir();
    let collector = start_collector(&dir, &gw.sims, &[&gw]);
    wait_fresh(&gw, &gw.sims).await;
    Stack {
        gw,
        _collector: collector,
        _dir: dir,
    }
}

/// Envoy and `replicas` simulators (10 ms a token), `policy` as the pool's
/// backend policy through ECDS, ingest on the control listener.
async fn policy_gateway(policy: Value, replicas: usize) -> Gateway {
    Gateway::start_ecds(GatewayOptions {
        replicas,
        sim: SimOptions {
            per_token_ms: 10,
            ..SimOptions::default()
        },
        configure: Box::new(move |s| {
            s.control_config = json!({"role": "control", "ingest": {"token": TOKEN}});
            s.gateway_config["backend_policies"] = json!([policy]);
        }),
    })
    .await
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("e2e-backend-policy-")
        .tempdir()
        .expect("temp dir")
}

/// A collector scraping `sims` every 50 ms (labelled by [`zone`]) and pushing
/// them to every gateway of `push_to` (which it counts as the gateway's replicas).
fn start_collector(dir: &tempfile::TempDir, sims: &[Sim], push_to: &[&Gateway]) -> Collector {
    let targets: Vec<String> = push_to
        .iter()
        .map(|gw| format!("\"127.0.0.1:{}\"", gw.settings.control_port))
        .collect();
    let mut config = format!(
        "scrape_interval_ms: 50\nscrape_timeout_ms: 500\npush_targets: [{}]\npools:\n  - name: {DEMO_POOL}\n    endpoints:\n",
        targets.join(", ")
    );
    for (i, s) in sims.iter().enumerate() {
        config.push_str(&format!(
            "      - {{address: \"{}\", labels: {{gke.io/zone: {}, gke.io/cluster-name: local}}}}\n",
            s.endpoint(),
            zone(i)
        ));
    }
    tokio::task::block_in_place(|| Collector::start(dir.path(), "collector", &config, TOKEN))
}

/// Waits (15 s at most) until `gw`'s filter holds a fresh snapshot of every one
/// of `sims`.
async fn wait_fresh(gw: &Gateway, sims: &[Sim]) {
    let endpoints: Vec<String> = sims.iter().map(Sim::endpoint).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let state = gw.debug_state().await;
        if endpoints
            .iter()
            .all(|e| state["snapshot"]["endpoints"][e] == true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no fresh snapshot of every replica: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each replica's `/sim/state`, by id.
async fn sim_states(gw: &Gateway) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for s in &gw.sims {
        let v: Value = gw
            .client
            .get(s.url("/sim/state"))
            .send()
            .await
            .expect("sim state")
            .json()
            .await
            .expect("sim state json");
        out.insert(s.id.clone(), v);
    }
    out
}

/// The filter's counter `name` for the demo pool, from Envoy's Prometheus stats.
async fn pool_counter(gw: &Gateway, name: &str) -> u64 {
    let text = gw.admin_text("/stats/prometheus").await;
    let label = format!("pool_name=\"{DEMO_POOL}\"");
    let found: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .collect();
    assert!(
        !found.is_empty(),
        "no {name} for {DEMO_POOL}: {}",
        text.lines()
            .filter(|l| l.contains("inference_pool"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    found.iter().sum()
}

/// The control listener's per-endpoint policy gauge `name` for `endpoint`
/// (`None`: no sample).
async fn endpoint_gauge(gw: &Gateway, name: &str, endpoint: &str) -> Option<f64> {
    let text = support::get_text(&gw.client, &gw.control_url("/metrics")).await;
    support::sim::sample(
        &text,
        &format!("{name}{{pool_name=\"{DEMO_POOL}\",endpoint=\"{endpoint}\"}}"),
    )
}

/// POSTs `body` and reads the response to its end: the status and whether it
/// carries `retry-after`.
async fn post_to_the_end(client: &reqwest::Client, url: &str, body: &Value) -> (u16, bool) {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("a response");
    let status = resp.status().as_u16();
    let retry_after = resp.headers().contains_key("retry-after");
    let _ = resp.bytes().await;
    (status, retry_after)
}

fn zone_of(gw: &Gateway, id: &str) -> &'static str {
    zone(gw.sims.iter().position(|s| s.id == id).expect("a replica"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_per_endpoint_is_never_exceeded_under_64_concurrent_streams() {
    let stack =
        start(json!({"pool": DEMO_POOL, "default": {"max_in_flight_per_endpoint": 2}})).await;
    let gw = &stack.gw;
    let url = gw.url("/v1/completions");
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (client, url) = (gw.client.clone(), url.clone());
        let body = streamed_completion("chat", &format!("stream {i}"), 30);
        tasks.push(tokio::spawn(async move {
            post_to_the_end(&client, &url, &body).await
        }));
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        let (status, retry_after) = t.await.expect("a request task");
        if status != 200 {
            assert!(retry_after, "a {status} refusal without retry-after");
        }
        *statuses.entry(status).or_default() += 1;
    }
    let states = sim_states(gw).await;
    let peaks: BTreeMap<&String, u64> = states
        .iter()
        .map(|(id, s)| (id, s["max_concurrent_requests"].as_u64().unwrap_or(99)))
        .collect();
    assert!(
        peaks.values().all(|&p| p <= 2),
        "a replica ran more than 2 at once: {peaks:?}"
    );
    assert!(
        peaks.values().any(|&p| p == 2),
        "the load never reached the cap: {peaks:?}"
    );
    // 8 slots for 64 simultaneous streams: the rest are refused (503, not sheddable).
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 8,
        "{statuses:?}"
    );
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    let refused = statuses.get(&503).copied().unwrap_or(0);
    assert!(refused > 0, "{statuses:?}");
    assert_eq!(
        pool_counter(gw, "inference_pool_capacity_refused_total").await,
        refused as u64
    );
    // /debug/state: the applied scope and this replica's cap per endpoint.
    let state = gw.debug_state().await;
    for s in &gw.sims {
        let e = &state["backend_policy"][s.endpoint()];
        assert_eq!(e["scope"], "default", "{state}");
        assert_eq!(e["in_flight_cap"], 2, "{state}");
    }
    let left = gw.wait_all_released(Duration::from_secs(5)).await;
    assert!(left.values().all(|&n| n == 0), "{left:?}");
    // The same figures as gauges on the control listener's /metrics.
    for s in &gw.sims {
        let e = s.endpoint();
        let g = |name| endpoint_gauge(gw, name, &e);
        assert_eq!(g("inference_pool_endpoint_in_flight_cap").await, Some(2.0));
        assert_eq!(g("inference_pool_endpoint_in_flight").await, Some(0.0));
        assert_eq!(
            g("inference_pool_endpoint_capacity_scaler_percent").await,
            Some(100.0)
        );
        assert_eq!(g("inference_pool_endpoint_rate_cap_per_second").await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_replicas_each_enforce_their_share_of_the_in_flight_cap() {
    let policy = json!({"pool": DEMO_POOL, "default": {"max_in_flight_per_endpoint": 4}});
    let a = policy_gateway(policy.clone(), 2).await;
    // b's own simulator is never used: the collector gives both a's replicas.
    let b = policy_gateway(policy, 1).await;
    let dir = temp_dir();
    let _collector = start_collector(&dir, &a.sims, &[&a, &b]);
    let endpoints: Vec<String> = a.sims.iter().map(Sim::endpoint).collect();
    for gw in [&a, &b] {
        wait_fresh(gw, &a.sims).await;
        // The collector's pushes say two replicas: 4 / 2 each.
        let deadline = Instant::now() + Duration::from_secs(15);
        while endpoint_gauge(gw, "inference_pool_endpoint_in_flight_cap", &endpoints[0]).await
            != Some(2.0)
        {
            assert!(
                Instant::now() < deadline,
                "{}",
                gw.debug_state().await["backend_policy"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // 16 simultaneous 600 ms streams through each gateway for 2 × 2 slots each.
    let mut tasks = Vec::new();
    for (g, gw) in [&a, &b].into_iter().enumerate() {
        for i in 0..16 {
            let (client, url) = (gw.client.clone(), gw.url("/v1/completions"));
            let body = streamed_completion("chat", &format!("gw{g} stream {i}"), 60);
            tasks.push(tokio::spawn(async move {
                (g, post_to_the_end(&client, &url, &body).await.0)
            }));
        }
    }
    // Each gateway's own count per endpoint, from its gauges while the load runs.
    let mut peaks = [[0.0f64; 2]; 2];
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        for (g, gw) in [&a, &b].into_iter().enumerate() {
            for (i, e) in endpoints.iter().enumerate() {
                let n = endpoint_gauge(gw, "inference_pool_endpoint_in_flight", e)
                    .await
                    .unwrap_or(0.0);
                peaks[g][i] = peaks[g][i].max(n);
            }
        }
    }
    let mut ok = [0usize; 2];
    for t in tasks {
        let (g, status) = t.await.expect("a request task");
        assert!(status == 200 || status == 503, "gateway {g}: {status}");
        ok[g] += usize::from(status == 200);
    }
    assert!(
        peaks.iter().flatten().all(|&n| n <= 2.0),
        "a gateway over its share: {peaks:?}"
    );
    assert!(
        peaks.iter().all(|p| p.contains(&2.0)),
        "a gateway never reached its share: {peaks:?}"
    );
    assert!(ok.iter().all(|&n| n >= 4), "admitted per gateway: {ok:?}");
    let states = sim_states(&a).await;
    let max: Vec<u64> = states
        .values()
        .map(|s| s["max_concurrent_requests"].as_u64().unwrap_or(99))
        .collect();
    assert!(max.iter().all(|&m| m <= 4), "a replica over 4: {max:?}");
    assert!(
        max.contains(&4),
        "the two shares never met at a replica: {max:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_zone_takes_load_below_capacity_spills_the_excess_and_gets_it_back() {
    let stack = start(json!({
        "pool": DEMO_POOL,
        "default": {"max_in_flight_per_endpoint": 2},
        "scopes": [{"selector": {"gke.io/zone": "a", "gke.io/cluster-name": "local"}, "backend_preference": "PREFERRED"}]
    }))
    .await;
    let gw = &stack.gw;
    let url = gw.url("/v1/chat/completions");
    let zones_of = |log: &[(Instant, Result<String, String>)]| {
        let mut by: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (_, r) in log {
            if let Ok(id) = r {
                *by.entry(zone_of(gw, id)).or_default() += 1;
            }
        }
        by
    };

    // Below capacity (3 clients, zone a holds 4): zone a only.
    let below = Traffic::start(url.clone(), 3, "chat", 10);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let log = below.stop().await;
    assert!(failures(&log).is_empty(), "{:?}", failures(&log));
    let z = zones_of(&log);
    assert_eq!(z.get("b"), None, "below capacity: {z:?}");
    assert!(z.get("a").copied().unwrap_or(0) >= 10, "{z:?}");

    // Above capacity (6 clients): zone a full, the excess (2) to zone b.
    let above = Traffic::start(url.clone(), 6, "chat", 10);
    let until = Instant::now() + Duration::from_millis(2_000);
    let (mut max_a, mut max_b) = (0, 0);
    while Instant::now() < until {
        let states = sim_states(gw).await;
        let sum = |z: &str| -> u64 {
            states
                .iter()
                .filter(|(id, _)| zone_of(gw, id) == z)
                .map(|(_, s)| s["concurrent_requests"].as_u64().unwrap_or(0))
                .sum()
        };
        max_a = max_a.max(sum("a"));
        max_b = max_b.max(sum("b"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = above.stop().await;
    assert!(failures(&log).is_empty(), "{:?}", failures(&log));
    let z = zones_of(&log);
    assert!(
        z.get("b").copied().unwrap_or(0) > 0,
        "above capacity: {z:?}"
    );
    assert_eq!(
        pool_counter(gw, "inference_pool_spill_total").await,
        z["b"] as u64,
        "every zone-b request counted as a spill-over"
    );
    let state = gw.debug_state().await;
    let report = |i: usize, f: &str| state["backend_policy"][gw.sims[i].endpoint()][f].clone();
    assert_eq!(report(0, "preference"), "PREFERRED", "{state}");
    assert_eq!(report(0, "scope"), "scopes[0]");
    assert_eq!(report(2, "preference"), "DEFAULT");
    assert_eq!(report(2, "scope"), "default");
    assert!(max_a <= 4, "zone a over its capacity: {max_a}");
    assert!(max_b <= 2, "zone b got more than the excess: {max_b}");
    let states = sim_states(gw).await;
    for (id, s) in &states {
        assert!(
            s["max_concurrent_requests"].as_u64() <= Some(2),
            "{id}: {s}"
        );
    }

    // Load falls back below capacity: zone a only again.
    let again = Traffic::start(url, 3, "chat", 10);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let log = again.stop().await;
    assert!(failures(&log).is_empty(), "{:?}", failures(&log));
    let z = zones_of(&log);
    assert_eq!(z.get("b"), None, "back below capacity: {z:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_capacity_scaler_drains_a_zone_under_load_with_no_failed_request() {
    let policy = |b_scaler: u32| {
        json!([{
            "pool": DEMO_POOL,
            "scopes": [{"selector": {"gke.io/zone": "b"}, "capacity_scaler_percent": b_scaler}]
        }])
    };
    let mut stack = start(policy(100)[0].clone()).await;
    let url = stack.gw.url("/v1/chat/completions");
    let traffic = Traffic::start(url, 4, "chat", 10);
    let t0 = Instant::now();
    for id in ["sim-2", "sim-3"] {
        traffic.wait_first_on(id, t0, Duration::from_secs(10)).await;
    }
    let mut config = stack.gw.settings.gateway_config.clone();
    config["backend_policies"] = policy(0);
    let applied = stack.gw.apply_gateway_config_and_wait(config).await;
    // Requests sent a little after the reload (every worker has it) go to zone a.
    let settled = applied + Duration::from_millis(300);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = traffic.since(settled, Instant::now());
    let log = traffic.stop().await;
    assert!(
        failures(&log).is_empty(),
        "failed while draining: {:?}",
        failures(&log)
    );
    assert!(after.len() >= 10, "{after:?}");
    for r in &after {
        let id = r.as_ref().expect("no failure");
        assert_eq!(zone_of(&stack.gw, id), "a", "drained zone b served {id}");
    }
}

/// Access-log lines Envoy wrote for `POST /v1/completions` with `status`.
fn logged(gw: &Gateway, status: u16) -> usize {
    let needle = format!("\"POST /v1/completions HTTP/1.1\" {status} ");
    gw.envoy_all_logs()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

/// Sends `n` completions of `model` through the gateway, 16 at a time; returns
/// the statuses.
async fn send_many(gw: &Gateway, n: usize, model: &str) -> BTreeMap<u16, usize> {
    let url = gw.url("/v1/completions");
    let body = json!({"model": model, "prompt": "hi", "max_tokens": 1});
    let mut statuses = BTreeMap::new();
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(16);
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                let (client, url, body) = (gw.client.clone(), url.clone(), body.clone());
                tokio::spawn(async move {
                    let r = client
                        .post(&url)
                        .json(&body)
                        .send()
                        .await
                        .expect("response");
                    let status = r.status().as_u16();
                    let _ = r.bytes().await;
                    status
                })
            })
            .collect();
        for t in tasks {
            *statuses.entry(t.await.expect("task")).or_default() += 1;
        }
        sent += batch;
    }
    statuses
}

/// Polls (10 s at most) until the access log holds `want` lines of `status`,
/// then waits a little longer for stragglers and returns the count.
async fn settled_count(gw: &Gateway, status: u16, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while logged(gw, status) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    logged(gw, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_sampling_per_pool_logs_about_half_and_always_the_errors() {
    let mut stack = start(json!({
        "pool": DEMO_POOL,
        "logging": {"enabled": true, "sample_rate": 500000}
    }))
    .await;
    let gw = &stack.gw;
    let ok = send_many(gw, 2_000, "chat").await;
    assert_eq!(ok.get(&200), Some(&2_000), "{ok:?}");
    let errors = send_many(gw, 20, "no-such-model").await;
    assert_eq!(errors.get(&404), Some(&20), "{errors:?}");
    // Every error is logged; successes with probability 1/2: mean 1000, sd 22.4,
    // so [888, 1112] is ±5 sd.
    assert_eq!(settled_count(gw, 404, 20).await, 20);
    let half = logged(gw, 200);
    assert!((888..=1_112).contains(&half), "{half} of 2000 logged");

    // Disabled: no success line, the errors still.
    let mut config = stack.gw.settings.gateway_config.clone();
    config["backend_policies"][0]["logging"] = json!({"enabled": false});
    stack.gw.apply_gateway_config_and_wait(config).await;
    let gw = &stack.gw;
    let ok = send_many(gw, 200, "chat").await;
    assert_eq!(ok.get(&200), Some(&200), "{ok:?}");
    send_many(gw, 20, "no-such-model").await;
    assert_eq!(settled_count(gw, 404, 40).await, 40);
    assert_eq!(
        logged(gw, 200),
        half,
        "a success was logged with logging disabled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_per_endpoint_holds_over_every_one_second_window_at_each_replica() {
    let rate = 20u64;
    let stack = start(json!({"pool": DEMO_POOL, "default": {"max_rate_per_endpoint": rate}})).await;
    let gw = &stack.gw;
    for s in &gw.sims {
        gw.client
            .delete(s.url("/sim/requests"))
            .send()
            .await
            .expect("clear");
    }
    // Eight clients, a request every 10 ms each: several times 4 × 20 a second.
    let until = Instant::now() + Duration::from_millis(2_500);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (client, url) = (gw.client.clone(), gw.url("/v1/completions"));
            let body = json!({"model": "chat", "prompt": format!("c{i}"), "max_tokens": 1});
            tokio::spawn(async move {
                let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
                while Instant::now() < until {
                    let r = client
                        .post(&url)
                        .json(&body)
                        .send()
                        .await
                        .expect("response");
                    *statuses.entry(r.status().as_u16()).or_default() += 1;
                    let _ = r.bytes().await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                statuses
            })
        })
        .collect();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        for (s, n) in t.await.expect("client") {
            *statuses.entry(s).or_default() += n;
        }
    }
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.get(&503).copied().unwrap_or(0) > 0, "{statuses:?}");
    // Each replica's own log: at most rate + burst (2) in any one-second window,
    // plus one for the delay between the gateway's admission and the arrival.
    let limit = rate + inference_gateway::policy::rate::burst(rate) + 1;
    let mut busiest = 0;
    for s in &gw.sims {
        let recs: Vec<Value> = gw
            .client
            .get(s.url("/sim/requests"))
            .send()
            .await
            .expect("requests")
            .json()
            .await
            .expect("json");
        let mut at: Vec<u64> = recs
            .iter()
            .filter(|r| r["path"] == "/v1/completions")
            .filter_map(|r| r["received_at_ms"].as_u64())
            .collect();
        at.sort_unstable();
        for (i, &t) in at.iter().enumerate() {
            let n = at[i..].iter().take_while(|&&u| u < t + 1_000).count() as u64;
            assert!(n <= limit, "{}: {n} requests in the second from {t}", s.id);
            busiest = busiest.max(n);
        }
    }
    assert!(
        busiest >= rate - 2,
        "the load never reached the rate: {busiest}"
    );
}
