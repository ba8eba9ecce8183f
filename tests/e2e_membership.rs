//! End to end: pools follow discovery. The real Envoy with the filter, the
//! metrics-collector discovering replicas (an endpoints file here, DNS in
//! `e2e_membership_dns`), simulator replicas under steady traffic: a replica that
//! joins gets traffic within the stated bound, one that leaves gets no new
//! request after the next snapshot while its running stream completes, no client
//! request fails, and a member outside `allowed_endpoint_cidrs` is never routed
//! to even when a snapshot with the valid token names it.

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::api::{openai_error, server_id};
use support::collector::Collector;
use support::deploy::envoy_config::DEMO_POOL;
use support::gateway::{Gateway, GatewayOptions};
use support::sim::SimOptions;
use support::traffic::{failures, Traffic};

const TOKEN: &str = "membership-test-token";
const SCRAPE_MS: u64 = 50;
const FILE_POLL_MS: u64 = 100;

fn write_members(path: &std::path::Path, members: &[String]) {
    let yaml: String = members.iter().map(|m| format!("- \"{m}\"\n")).collect();
    // Written whole and renamed, as a ConfigMap update swaps the file.
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        if yaml.is_empty() {
            "[]\n".to_string()
        } else {
            yaml
        },
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_join_and_leave_through_the_endpoints_file_under_traffic() {
    // Three replicas; the plugin configuration knows only the first two.
    let gw = Gateway::start(GatewayOptions {
        replicas: 3,
        sim: SimOptions {
            per_token_ms: 20,
            ..SimOptions::default()
        },
        configure: Box::new(|s| {
            s.control_config = json!({"role": "control", "ingest": {"token": TOKEN}});
            let eps = s.gateway_config["pools"][0]["endpoints"]
                .as_array()
                .unwrap()[..2]
                .to_vec();
            s.gateway_config["pools"][0]["endpoints"] = Value::Array(eps);
        }),
    })
    .await;
    let eps: Vec<String> = gw.sims.iter().map(|s| s.endpoint()).collect();
    let ids = gw.endpoint_ids();
    let dir = tempfile::Builder::new()
        .prefix("e2e-membership-")
        .tempdir()
        .unwrap();
    let members_file = dir.path().join("members.yaml");
    write_members(&members_file, &eps[..2]);
    let control = format!("127.0.0.1:{}", gw.settings.control_port);
    let config = format!(
        "scrape_interval_ms: {SCRAPE_MS}\nscrape_timeout_ms: 500\nendpoints_file_poll_interval_ms: {FILE_POLL_MS}\n\
         push_targets: [\"{control}\"]\npools:\n  - name: {DEMO_POOL}\n    endpoints_file: \"{}\"\n",
        members_file.display()
    );
    let collector =
        tokio::task::block_in_place(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    gw.wait_members(DEMO_POOL, &eps[..2], Duration::from_secs(15))
        .await;

    let traffic = Traffic::start(gw.url("/v1/chat/completions"), 2, "chat", 2);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Join: replica 2 was never in the plugin configuration.
    let joined = Instant::now();
    write_members(&members_file, &eps);
    let newcomer = ids[&eps[2]].clone();
    let first = traffic
        .wait_first_on(&newcomer, joined, Duration::from_secs(10))
        .await;
    let join_ms = first.duration_since(joined).as_millis();
    // The bound: the file is seen within one poll, scraped within one interval
    // (plus its timeout-free first answer), pushed with the next round.
    let bound_ms = u128::from(FILE_POLL_MS + 2 * SCRAPE_MS) + 500;
    eprintln!("joined: first request on {newcomer} {join_ms} ms after the file changed (bound {bound_ms} ms)");
    assert!(join_ms <= bound_ms, "{join_ms} ms > {bound_ms} ms");

    // Leave: a long stream runs on one replica, which then leaves discovery.
    let client = support::http_client();
    let resp = client
        .post(gw.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(
            json!({"model": "chat", "prompt": "a long answer", "max_tokens": 150, "stream": true})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let leaving = server_id(&resp);
    let stream = tokio::spawn(async move {
        let mut resp = resp;
        let mut text = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    });
    let leaving_ep = ids
        .iter()
        .find(|(_, id)| **id == leaving)
        .unwrap()
        .0
        .clone();
    let staying: Vec<String> = eps.iter().filter(|e| **e != leaving_ep).cloned().collect();
    write_members(&members_file, &staying);
    let gone = gw
        .wait_members(DEMO_POOL, &staying, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let counts = gw.in_flight().await;
    assert!(
        counts.get(&leaving_ep).copied().unwrap_or(0) >= 1
            || counts.keys().any(|k| k.starts_with("departed:")),
        "the running stream still holds its count after {leaving_ep} left: {counts:?}"
    );
    let text = stream.await.unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream on {leaving} was cut: {text}"
    );

    let log = traffic.stop().await;
    let failures = failures(&log);
    assert!(failures.is_empty(), "client requests failed: {failures:?}");
    let late: Vec<_> = log
        .iter()
        .filter(|(sent, r)| *sent > gone && r.as_ref().is_ok_and(|id| *id == leaving))
        .collect();
    let after = log.iter().filter(|(sent, _)| *sent > gone).count();
    eprintln!(
        "left: {after} requests after the snapshot without {leaving}, {} on it; {} requests in all",
        late.len(),
        log.len()
    );
    assert!(
        late.is_empty(),
        "{} new requests went to {leaving} after it left",
        late.len()
    );
    assert!(
        after > 20,
        "too little traffic after the leave to tell ({after})"
    );
    gw.wait_all_released(Duration::from_secs(5)).await;
    drop(collector);
}

/// A snapshot with the valid token may name any address; the filter routes only
/// to members inside `allowed_endpoint_cidrs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_outside_the_allowed_networks_are_never_routed_to() {
    let gw = Gateway::start(GatewayOptions {
        replicas: 1,
        configure: Box::new(|s| {
            s.control_config = json!({"role": "control", "ingest": {"token": TOKEN}});
            s.gateway_config["allowed_endpoint_cidrs"] = json!(["127.0.0.0/8"]);
        }),
        ..GatewayOptions::default()
    })
    .await;
    let sim = gw.sims[0].endpoint();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let push = |seq: u64, members: &[(&str, u32)]| {
        use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
        Snapshot {
            generated_at_ms: now + seq,
            sequence: seq,
            collector: "test".into(),
            pools: vec![PoolSnapshot {
                name: DEMO_POOL.into(),
                endpoints: members
                    .iter()
                    .map(|(a, waiting)| EndpointMetrics {
                        address: a.to_string(),
                        healthy: true,
                        scraped_at_ms: now + seq,
                        waiting: *waiting,
                        ..Default::default()
                    })
                    .collect(),
            }],
        }
        .encode()
    };
    let send = |body: Vec<u8>| {
        let url = gw.control_url("/v1/snapshot");
        let client = gw.client.clone();
        async move {
            let resp = client
                .post(url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/octet-stream")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 204);
        }
    };
    // Idle addresses outside the allowed networks (the cloud metadata server, a
    // documentation network, a private range this gateway does not allow) and
    // the busy simulator: every request still goes to the simulator.
    send(push(
        1,
        &[
            ("169.254.169.254:80", 0),
            ("192.0.2.10:80", 0),
            ("10.0.0.7:8000", 0),
            (sim.as_str(), 3),
        ],
    ))
    .await;
    for _ in 0..20 {
        let resp = gw
            .post_json("/v1/chat/completions", &support::api::chat("chat", "hi"))
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(server_id(&resp), gw.sims[0].id);
    }
    // With only outside members left, the filter refuses; Envoy connects nowhere.
    send(push(2, &[("192.0.2.10:80", 0)])).await;
    let resp = gw
        .post_json("/v1/chat/completions", &support::api::chat("chat", "hi"))
        .await;
    let (status, body) = openai_error(resp).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_healthy_upstream", "{body}");
    // Envoy flushes its log every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = gw.envoy_logs();
        if logs.contains("192.0.2.10:80") && logs.contains("never routed to") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refusal is not logged: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
