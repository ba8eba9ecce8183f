//! End to end with a real DNS server on loopback (hickory, `support::dns`): the
//! collector resolves a pool's name the way it resolves a Kubernetes headless
//! Service (every A record is a replica), and resolves the gateway replicas' name
//! to push every one of them. The filter routes among what DNS says, replicas
//! that join get traffic within the bound, replicas that leave get none after
//! the next snapshot, no client request fails, and a gateway replica restarted
//! mid-test is fed again within one push backoff.

mod support;

use serde_json::json;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use support::api::server_id;
use support::collector::Collector;
use support::deploy::envoy_config::{EnvoySettings, DEMO_POOL};
use support::deploy::process;
use support::dns::DnsServer;
use support::gateway::{Gateway, GatewayOptions};
use support::sim::{Sim, SimOptions};
use support::traffic::{failures, Traffic};

const TOKEN: &str = "membership-dns-token";
const SCRAPE_MS: u64 = 50;
const DNS_REFRESH_MS: u64 = 200;
const PUSH_BACKOFF_MAX_MS: u64 = 500;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A port free on 127.0.0.1 to 127.0.0.`n` alike (replicas share it, as pods do).
fn shared_port(n: u8) -> u16 {
    for _ in 0..50 {
        let port = process::free_port().expect("free port");
        if (1..=n).all(|i| std::net::TcpListener::bind((ip(i), port)).is_ok()) {
            return port;
        }
    }
    panic!("no port free on 127.0.0.1-{n}");
}

/// A gateway (Envoy with the filter) whose plugin configuration lists no
/// endpoint: every member it routes to comes from the collector's snapshots.
async fn gateway(control: Option<(&str, u16)>) -> Gateway {
    let control = control.map(|(a, p)| (a.to_string(), p));
    Gateway::start(GatewayOptions {
        replicas: 0,
        configure: Box::new(move |s: &mut EnvoySettings| {
            s.control_config = json!({"role": "control", "ingest": {"token": TOKEN}});
            s.gateway_config["pools"][0]["endpoints"] = json!([]);
            if let Some((address, port)) = control {
                s.control_address = address;
                s.control_port = port;
            }
        }),
        ..GatewayOptions::default()
    })
    .await
}

/// The snapshot sequence a gateway holds (0: none yet).
async fn sequence(gw: &Gateway) -> u64 {
    let state = gw.debug_state().await;
    state["snapshot"]["sequence"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_follows_its_dns_name_under_traffic() {
    let dns = DnsServer::start("igw.test").await;
    let dir = tempfile::Builder::new()
        .prefix("e2e-membership-dns-")
        .tempdir()
        .unwrap();
    let port = shared_port(3);
    let options = SimOptions::default();
    let mut sims: Vec<Sim> = (1..=3u8)
        .map(|i| {
            Sim::start_on_host(
                &format!("pod-{i}"),
                IpAddr::V4(ip(i)),
                port,
                &options,
                dir.path(),
            )
            .unwrap()
        })
        .collect();
    dns.set_a("vllm.igw.test", vec![ip(1), ip(2)]).await;

    let gw = gateway(None).await;
    let control = format!("127.0.0.1:{}", gw.settings.control_port);
    let config = format!(
        "scrape_interval_ms: {SCRAPE_MS}\nscrape_timeout_ms: 500\ndns_refresh_interval_ms: {DNS_REFRESH_MS}\n\
         dns_servers: [\"{}\"]\npush_targets: [\"{control}\"]\npools:\n  - name: {DEMO_POOL}\n    endpoints: [\"vllm.igw.test:{port}\"]\n",
        dns.addr()
    );
    let collector =
        tokio::task::block_in_place(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    let ep = |i: u8| format!("127.0.0.{i}:{port}");
    gw.wait_members(DEMO_POOL, &[ep(1), ep(2)], Duration::from_secs(15))
        .await;

    let traffic = Traffic::start(gw.url("/v1/chat/completions"), 2, "chat", 2);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Scale up: a third pod becomes ready and its record appears.
    let joined = Instant::now();
    dns.set_a("vllm.igw.test", vec![ip(1), ip(2), ip(3)]).await;
    let first = traffic
        .wait_first_on("pod-3", joined, Duration::from_secs(10))
        .await;
    let join_ms = first.duration_since(joined).as_millis();
    let bound_ms = u128::from(DNS_REFRESH_MS + 2 * SCRAPE_MS) + 500;
    eprintln!(
        "DNS join: first request on pod-3 {join_ms} ms after its record (bound {bound_ms} ms)"
    );
    assert!(join_ms <= bound_ms, "{join_ms} ms > {bound_ms} ms");

    // Scale down: pod-1's record goes (the pod is no longer ready).
    dns.set_a("vllm.igw.test", vec![ip(2), ip(3)]).await;
    let gone = gw
        .wait_members(DEMO_POOL, &[ep(2), ep(3)], Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let log = traffic.stop().await;
    let failures = failures(&log);
    assert!(failures.is_empty(), "client requests failed: {failures:?}");
    let after = log.iter().filter(|(sent, _)| *sent > gone).count();
    let late = log
        .iter()
        .filter(|(sent, r)| *sent > gone && r.as_ref().is_ok_and(|id| id == "pod-1"))
        .count();
    eprintln!(
        "DNS leave: {after} requests after the snapshot without pod-1, {late} on it; {} in all",
        log.len()
    );
    assert_eq!(late, 0, "requests went to pod-1 after it left");
    assert!(
        after > 20,
        "too little traffic after the leave to tell ({after})"
    );
    // Pod-1 is still up: it left discovery, it did not fail.
    assert!(!sims[0].requests(&support::http_client()).await.is_empty());
    gw.wait_all_released(Duration::from_secs(5)).await;
    drop(collector);
    sims.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_replica_is_fed_through_one_discovered_name() {
    let dns = DnsServer::start("igw.test").await;
    let dir = tempfile::Builder::new()
        .prefix("e2e-feed-")
        .tempdir()
        .unwrap();
    let sim = Sim::start("pod-1", &SimOptions::default(), dir.path()).unwrap();
    // Two Envoy replicas, their control listeners on 127.0.0.1 and 127.0.0.2 at
    // the same port, as two pods behind one headless Service.
    let control_port = shared_port(2);
    let a = gateway(Some(("127.0.0.1", control_port))).await;
    let b = gateway(Some(("127.0.0.2", control_port))).await;
    dns.set_a("envoy.igw.test", vec![ip(1), ip(2)]).await;
    let config = format!(
        "scrape_interval_ms: {SCRAPE_MS}\nscrape_timeout_ms: 500\ndns_refresh_interval_ms: {DNS_REFRESH_MS}\n\
         push_backoff_initial_ms: 50\npush_backoff_max_ms: {PUSH_BACKOFF_MAX_MS}\n\
         dns_servers: [\"{}\"]\npush_targets: [\"envoy.igw.test:{control_port}\"]\n\
         pools:\n  - name: {DEMO_POOL}\n    endpoints: [\"{}\"]\n",
        dns.addr(),
        sim.endpoint()
    );
    let collector =
        tokio::task::block_in_place(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    for gw in [&a, &b] {
        gw.wait_members(DEMO_POOL, &[sim.endpoint()], Duration::from_secs(15))
            .await;
        // Neither plugin configuration lists the replica: the snapshot does.
        let resp = gw
            .post_json("/v1/chat/completions", &support::api::chat("chat", "hi"))
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(server_id(&resp), "pod-1");
    }

    // Replica b restarts (same address and ports, as a pod that kept its IP).
    let settings: EnvoySettings = b.settings.clone();
    drop(b);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let b = Gateway::start(GatewayOptions {
        replicas: 0,
        configure: Box::new(move |s| *s = settings),
        ..GatewayOptions::default()
    })
    .await;
    let up = Instant::now();
    let deadline = up + Duration::from_secs(10);
    while sequence(&b).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the restarted replica was not fed within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fed_ms = up.elapsed().as_millis();
    let bound_ms = u128::from(PUSH_BACKOFF_MAX_MS + SCRAPE_MS) + 500;
    eprintln!("restarted replica fed {fed_ms} ms after it was up (bound {bound_ms} ms)");
    assert!(fed_ms <= bound_ms, "{fed_ms} ms > {bound_ms} ms");
    // And the other replica was fed all along.
    let before = sequence(&a).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sequence(&a).await > before,
        "replica a stopped getting snapshots"
    );
    let metrics = collector.metrics();
    eprintln!(
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("push"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
