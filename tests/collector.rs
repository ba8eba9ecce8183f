//! The `metrics-collector` binary against real processes: simulator replicas
//! (`model-server-sim`, in several metric flavours), the real Envoy with the
//! filter (snapshot ingest on the control listener, read back through
//! `GET /debug/state`), and a real Prometheus scraping the collector.
//!
//! Everything listens on 127.0.0.1; every wait is bounded.

mod support;

use inference_gateway::collector::exposition;
use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::api::{hold_stream, streamed_completion};
use support::collector::{collector_binary, Collector, TOKEN_ENV};
use support::deploy::envoy_config::DEMO_POOL;
use support::deploy::process::{self, Check, ChildGuard};
use support::gateway::{Gateway, GatewayOptions};
use support::sim::{Sim, SimOptions};

const TOKEN: &str = "collector-test-token-0123";
const STALE_AFTER_MS: u64 = 1_500;

/// Envoy-based tests take turns: each starts Envoy and replicas on 2 shared cores,
/// and their timing assertions should not measure each other's start-up.
static ENVOY_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A replica on a chosen port (so it can be restarted on the same one), with the
/// binary's default timings (20 ms a token) and `args` on top.
fn start_sim(dir: &Path, id: &str, port: u16, args: &[&str]) -> Sim {
    let options = SimOptions {
        per_token_ms: 20,
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..SimOptions::default()
    };
    Sim::start_on(id, port, &options, dir).unwrap_or_else(|e| panic!("{e}"))
}

/// The value of the series `name{labels…}` in exposition text (exact label match
/// on the labels given; other labels may exist).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let samples = exposition::parse(text, |n| n == name).unwrap_or_else(|e| panic!("{e}"));
    samples
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
}

/// The filter's view of one endpoint in the stored snapshot.
fn filter_endpoint(state: &Value, address: &str) -> Option<Value> {
    state["snapshot"]["pools"]
        .as_array()?
        .iter()
        .flat_map(|p| p["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == address)
}

/// Identity of the stored snapshot: (generated_at_ms, sequence, collector).
fn stored_identity(state: &Value) -> (u64, u64, String) {
    let s = &state["snapshot"];
    (
        s["generated_at_ms"].as_u64().unwrap_or(0),
        s["sequence"].as_u64().unwrap_or(0),
        s["collector"].as_str().unwrap_or("").to_string(),
    )
}

async fn wait_state(
    gw: &Gateway,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let state = gw.debug_state().await;
        if pred(&state) {
            return state;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; filter state: {}",
                state["snapshot"]
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ingest_control_config() -> Value {
    json!({
        "role": "control",
        "ingest": {"token": TOKEN},
        "snapshot_stale_after_ms": STALE_AFTER_MS
    })
}

/// Scenario on one gateway: a loaded replica shows up in the filter within a
/// second; a killed replica is unhealthy within 3 scrape intervals and healthy
/// again after a restart on its port; with the collector gone the last snapshot
/// stays in use until it is stale; bad pushes never replace it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_feeds_the_filter_through_envoy() {
    let _turn = ENVOY_TURN.lock().await;
    let interval_ms = 100u64;
    let mut gw = Gateway::start(GatewayOptions {
        replicas: 3,
        sim: SimOptions {
            per_token_ms: 20,
            // Two in the batch at once: a third request waits.
            extra_args: vec!["--max-num-seqs".into(), "2".into()],
            ..SimOptions::default()
        },
        configure: Box::new(|s| {
            s.control_config = ingest_control_config();
            s.gateway_config["snapshot_stale_after_ms"] = json!(STALE_AFTER_MS);
        }),
    })
    .await;
    let endpoints: Vec<String> = gw.sims.iter().map(|s| s.endpoint()).collect();
    let control = format!("127.0.0.1:{}", gw.settings.control_port);
    let config = format!(
        "scrape_interval_ms: {interval_ms}\n\
         scrape_timeout_ms: 300\n\
         push_targets: [\"{control}\"]\n\
         push_backoff_max_ms: 500\n\
         pools:\n  - name: {DEMO_POOL}\n    labels: {{zone: test-a}}\n    endpoints: [{}]\n",
        endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let collector = blocking(|| Collector::start(gw.temp_dir(), "collector", &config, TOKEN));

    // Every replica healthy in the filter's snapshot, with our labels and type.
    let state = wait_state(
        &gw,
        "all replicas healthy in the filter",
        Duration::from_secs(10),
        |s| {
            endpoints
                .iter()
                .all(|e| filter_endpoint(s, e).is_some_and(|v| v["healthy"] == true))
        },
    )
    .await;
    let ep0 = filter_endpoint(&state, &endpoints[0]).unwrap_or_default();
    assert_eq!(ep0["server_type"], "vllm");
    assert_eq!(ep0["labels"], json!([["zone", "test-a"]]));
    assert_eq!(state["snapshot"]["stale"], false);
    let collector_id = stored_identity(&state).2;
    assert!(collector_id.starts_with("collector-"), "{collector_id}");

    // Load one replica directly: its running + waiting rise in the filter within 1 s.
    let loaded = endpoints[0].clone();
    let held: Vec<_> = (0..5)
        .map(|i| {
            let body = streamed_completion("chat", &format!("hold the line {i}"), 150);
            hold_stream(gw.sims[0].url("/v1/completions"), body)
        })
        .collect();
    let started = Instant::now();
    let state = wait_state(
        &gw,
        "the loaded replica's load in the filter",
        Duration::from_secs(1),
        |s| {
            filter_endpoint(s, &loaded).is_some_and(|e| {
                let running = e["running"].as_u64().unwrap_or(0);
                let waiting = e["waiting"].as_u64().unwrap_or(0);
                running >= 1 && running + waiting >= 5
            })
        },
    )
    .await;
    let seen_after = started.elapsed();
    for other in &endpoints[1..] {
        let e = filter_endpoint(&state, other).unwrap_or_default();
        assert_eq!(e["running"], 0, "an idle replica shows no load: {e}");
    }
    // The collector's own /metrics says the same, with GIE's pool gauge names.
    let text = blocking(|| collector.metrics());
    assert!(
        metric(
            &text,
            "inference_pool_average_kv_cache_utilization",
            &[("name", DEMO_POOL)]
        )
        .is_some(),
        "{text}"
    );
    assert_eq!(
        metric(&text, "inference_pool_ready_pods", &[("name", DEMO_POOL)]),
        Some(3.0)
    );
    let running = metric(
        &text,
        "inference_pool_endpoint_running_requests",
        &[("name", DEMO_POOL), ("endpoint", &loaded)],
    )
    .unwrap_or(0.0);
    assert!(running >= 1.0, "{text}");
    // The streams end (or are dropped): the load goes back to 0, the snapshot is live.
    for h in &held {
        h.abort();
    }
    wait_state(&gw, "the load to drain", Duration::from_secs(15), |s| {
        filter_endpoint(s, &loaded).is_some_and(|e| e["running"] == 0 && e["waiting"] == 0)
    })
    .await;
    eprintln!("load visible in the filter after {seen_after:?}");

    // Kill a replica: unhealthy in the first snapshot generated within 3 intervals.
    let victim = endpoints[1].clone();
    let victim_port = gw.sims[1].port;
    gw.sim_mut("sim-1").kill();
    let killed_at = unix_ms();
    let state = wait_state(
        &gw,
        "the killed replica to be unhealthy",
        Duration::from_secs(5),
        |s| filter_endpoint(s, &victim).is_some_and(|e| e["healthy"] == false),
    )
    .await;
    let generated = stored_identity(&state).0;
    eprintln!(
        "killed replica unhealthy in a snapshot generated {} ms after the kill",
        generated.saturating_sub(killed_at)
    );
    assert!(
        generated <= killed_at + 3 * interval_ms,
        "unhealthy first in a snapshot generated {} ms after the kill (3 intervals: {} ms)",
        generated.saturating_sub(killed_at),
        3 * interval_ms
    );
    for other in [&endpoints[0], &endpoints[2]] {
        assert_eq!(
            filter_endpoint(&state, other).unwrap_or_default()["healthy"],
            true
        );
    }
    // Restart it on the same port: healthy again.
    let _restarted = blocking(|| start_sim(gw.temp_dir(), "sim-1-again", victim_port, &[]));
    wait_state(
        &gw,
        "the restarted replica to be healthy",
        Duration::from_secs(5),
        |s| filter_endpoint(s, &victim).is_some_and(|e| e["healthy"] == true),
    )
    .await;
    let text = blocking(|| collector.metrics());
    assert!(
        metric(
            &text,
            "inference_collector_scrape_errors_total",
            &[("endpoint", &victim), ("reason", "connect")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    // Envoy was up before the collector: every push so far was stored.
    let rounds = metric(&text, "inference_collector_rounds_total", &[]).unwrap_or(0.0);
    let ok = metric(&text, "inference_collector_push_total", &[("result", "ok")]).unwrap_or(0.0);
    assert!(
        ok >= 3.0 && ok >= rounds - 2.0,
        "{ok} pushes stored of {rounds} rounds:\n{text}"
    );
    for bad in ["error", "rejected", "stale"] {
        assert_eq!(
            metric(&text, "inference_collector_push_total", &[("result", bad)]),
            None,
            "{text}"
        );
    }

    // Kill the collector: the last snapshot stays in use, then turns stale.
    let mut collector = collector;
    let log = collector.log();
    collector.guard.kill();
    let killed_at = Instant::now();
    let state = gw.debug_state().await;
    let (last_generated, last_sequence, _) = stored_identity(&state);
    assert_eq!(state["snapshot"]["stale"], false, "{}", state["snapshot"]);
    assert_eq!(
        state["snapshot"]["endpoints"][&endpoints[0]], true,
        "the last snapshot's endpoints are still trusted right after the collector died"
    );
    let state = wait_state(
        &gw,
        "the snapshot to turn stale",
        Duration::from_secs(5),
        |s| s["snapshot"]["stale"] == true,
    )
    .await;
    let stale_seen = unix_ms();
    assert!(
        stale_seen >= last_generated + STALE_AFTER_MS,
        "stale {} ms after generation, before snapshot_stale_after_ms={STALE_AFTER_MS}",
        stale_seen - last_generated
    );
    assert!(killed_at.elapsed() < Duration::from_millis(STALE_AFTER_MS + 1_500));
    assert_eq!(
        stored_identity(&state).0,
        last_generated,
        "nothing pushed since"
    );
    assert_eq!(stored_identity(&state).1, last_sequence);

    // Bad pushes leave the stored snapshot alone.
    let url = gw.control_url("/v1/snapshot");
    let newer = Snapshot {
        generated_at_ms: unix_ms() + 60_000,
        sequence: 1,
        collector: "intruder".into(),
        pools: vec![PoolSnapshot {
            name: DEMO_POOL.into(),
            endpoints: vec![EndpointMetrics {
                address: endpoints[0].clone(),
                healthy: false,
                ..Default::default()
            }],
        }],
    }
    .encode();
    let older = Snapshot {
        generated_at_ms: 1,
        ..Default::default()
    }
    .encode();
    let mut junk = vec![0u8; 10 * 1024 * 1024];
    fastrand::Rng::with_seed(5).fill(&mut junk);
    let small_junk = junk[..1024 * 1024].to_vec();
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("wrong token", "Bearer not-the-token", newer.clone(), 401),
        ("no token", "", newer.clone(), 401),
        ("truncated body", "", newer[..newer.len() - 1].to_vec(), 400),
        ("1 MB of junk", "", small_junk, 400),
        ("10 MB of junk", "", junk, 413),
        ("an older snapshot", "", older, 409),
    ];
    for (what, auth, body, want) in cases {
        let auth = if auth.is_empty() && what != "no token" {
            format!("Bearer {TOKEN}")
        } else {
            auth.to_string()
        };
        let mut req = gw
            .client
            .post(&url)
            .header("content-type", "application/octet-stream")
            .body(body);
        if !auth.is_empty() {
            req = req.header("authorization", auth);
        }
        let status = match req.send().await {
            Ok(r) => r.status().as_u16(),
            Err(e) => panic!("{what}: {e}"),
        };
        assert_eq!(status, want, "{what}");
        let state = gw.debug_state().await;
        assert_eq!(
            stored_identity(&state),
            (last_generated, last_sequence, collector_id.clone()),
            "{what} changed the stored snapshot"
        );
    }
    // The same newer snapshot with the right token is taken: the rejections above
    // were about the token and the bytes, not about the snapshot.
    let resp = gw
        .client
        .post(&url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/octet-stream")
        .body(newer)
        .send()
        .await
        .expect("good push");
    assert_eq!(resp.status(), 204);
    assert_eq!(stored_identity(&gw.debug_state().await).2, "intruder");
    assert!(!log.contains("panicked"), "{log}");
}

/// Each server flavour the simulator speaks maps to ready endpoints; a hung
/// endpoint, a garbage one, a wrong server type and a dead port are unhealthy,
/// counted by reason, and delay neither the other scrapes nor the rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_maps_each_flavour_and_isolates_bad_endpoints() {
    let dir = tempfile::Builder::new()
        .prefix("collector-")
        .tempdir()
        .expect("temp dir");
    let port = || process::free_port().expect("free port");
    let (p_vllm, p_sglang, p_tgi, p_wrong) = (port(), port(), port(), port());
    let _sims = blocking(|| {
        [
            start_sim(dir.path(), "vllm", p_vllm, &[]),
            start_sim(
                dir.path(),
                "sglang",
                p_sglang,
                &["--metrics-flavor", "sglang"],
            ),
            start_sim(dir.path(), "tgi", p_tgi, &["--metrics-flavor", "tgi"]),
            start_sim(dir.path(), "wrong", p_wrong, &[]),
        ]
    });
    // Accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hung_addr = hung.local_addr().expect("addr").to_string();
    let hung_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    // Answers 200 with an HTML page.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let garbage_addr = garbage.local_addr().expect("addr").to_string();
    let garbage_task = tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async { "<html><body>not metrics</body></html>" }),
        );
        let _ = axum::serve(garbage, app).await;
    });
    let dead = format!("127.0.0.1:{}", port());

    let config = [
        "scrape_timeout_ms: 200".to_string(),
        "pools:".into(),
        format!("- {{name: v, endpoints: [\"127.0.0.1:{p_vllm}\"]}}"),
        format!("- {{name: s, server_type: sglang, endpoints: [\"127.0.0.1:{p_sglang}\"]}}"),
        format!("- {{name: t, endpoints: [{{address: \"127.0.0.1:{p_tgi}\", server_type: tgi}}]}}"),
        "- name: dns".into(),
        format!("  endpoints: [\"localhost:{p_vllm}\"]"),
        "- name: broken".into(),
        "  endpoints:".into(),
        format!("  - \"{hung_addr}\""),
        format!("  - \"{garbage_addr}\""),
        format!("  - {{address: \"127.0.0.1:{p_wrong}\", server_type: llamacpp}}"),
        format!("  - \"{dead}\""),
    ]
    .join("\n");
    let collector = blocking(|| Collector::start(dir.path(), "collector", &config, TOKEN));

    // Wait for every bad endpoint to have failed at least once (the hung one after
    // its 200 ms timeout).
    let reason = |text: &str, ep: &str, r: &str| {
        metric(
            text,
            "inference_collector_scrape_errors_total",
            &[("endpoint", ep), ("reason", r)],
        )
        .unwrap_or(0.0)
    };
    let wrong = format!("127.0.0.1:{p_wrong}");
    let text = blocking(|| {
        process::wait_until(
            "every failure to be counted",
            Duration::from_secs(10),
            || {
                let t = collector.metrics();
                let all = reason(&t, &hung_addr, "timeout") >= 1.0
                    && reason(&t, &garbage_addr, "parse") >= 1.0
                    && reason(&t, &wrong, "no_metrics") >= 1.0
                    && reason(&t, &dead, "connect") >= 1.0;
                if all {
                    Check::Ready(t)
                } else {
                    Check::NotYet("not all counted yet".into())
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", collector.log()))
    });
    let ready = |name: &str| metric(&text, "inference_pool_ready_pods", &[("name", name)]);
    assert_eq!(ready("v"), Some(1.0), "{text}");
    assert_eq!(ready("s"), Some(1.0), "sglang flavour maps: {text}");
    assert_eq!(ready("t"), Some(1.0), "tgi flavour maps: {text}");
    assert_eq!(ready("dns"), Some(1.0), "localhost resolves: {text}");
    assert_eq!(ready("broken"), Some(0.0), "{text}");
    assert_eq!(
        metric(
            &text,
            "inference_pool_endpoint_healthy",
            &[
                ("name", "dns"),
                ("endpoint", &format!("127.0.0.1:{p_vllm}"))
            ]
        ),
        Some(1.0)
    );

    // The hung endpoint holds up nobody: over one second, the healthy endpoint is
    // scraped and rounds are built at (most of) the 50 ms rate.
    let count = |text: &str| {
        metric(
            text,
            "inference_collector_scrape_duration_seconds_count",
            &[("endpoint", &format!("127.0.0.1:{p_vllm}"))],
        )
        .unwrap_or(0.0)
    };
    let rounds = |text: &str| metric(text, "inference_collector_rounds_total", &[]).unwrap_or(0.0);
    let before = blocking(|| collector.metrics());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = blocking(|| collector.metrics());
    let scrapes = count(&after) - count(&before);
    let built = rounds(&after) - rounds(&before);
    assert!(
        scrapes >= 10.0,
        "{scrapes} scrapes of a healthy endpoint in 1 s"
    );
    assert!(built >= 10.0, "{built} rounds in 1 s");
    assert_eq!(
        metric(
            &after,
            "inference_pool_endpoint_healthy",
            &[("endpoint", &hung_addr)]
        ),
        Some(0.0)
    );
    // SIGTERM: a clean, prompt exit even with a scrape hanging.
    let mut collector = collector;
    let asked = Instant::now();
    let status = collector.guard.stop(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}\n{}",
        collector.log()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    hung_task.abort();
    garbage_task.abort();
    let log = collector.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("stopping"), "{log}");
}

/// A push target that is down is retried with backoff and picked up when it
/// comes up, and again after the Envoy behind it is replaced (a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_finds_its_target_after_envoy_starts_and_restarts() {
    let _turn = ENVOY_TURN.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("collector-")
        .tempdir()
        .expect("temp dir");
    let sim_port = process::free_port().expect("free port");
    let _sim = blocking(|| start_sim(dir.path(), "solo", sim_port, &[]));
    let control_port = process::free_port().expect("free port");
    let config = format!(
        "push_targets: [\"127.0.0.1:{control_port}\"]\n\
         push_backoff_initial_ms: 50\n\
         push_backoff_max_ms: 400\n\
         pools: [{{name: solo, endpoints: [\"127.0.0.1:{sim_port}\"]}}]\n"
    );
    let collector = blocking(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    let target = format!("127.0.0.1:{control_port}");
    blocking(|| {
        process::wait_until(
            "failed pushes to be counted",
            Duration::from_secs(10),
            || {
                let t = collector.metrics();
                match metric(
                    &t,
                    "inference_collector_push_total",
                    &[("target", &target), ("result", "error")],
                ) {
                    Some(n) if n >= 2.0 => Check::Ready(()),
                    other => Check::NotYet(format!("{other:?}")),
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
    });
    let solo = format!("127.0.0.1:{sim_port}");
    for attempt in ["first start", "restart"] {
        let gw = Gateway::start(GatewayOptions {
            replicas: 1,
            configure: Box::new(move |s| {
                s.control_port = control_port;
                s.control_config = ingest_control_config();
            }),
            ..GatewayOptions::default()
        })
        .await;
        let started = Instant::now();
        wait_state(
            &gw,
            &format!("a snapshot after the {attempt}"),
            Duration::from_secs(5),
            |s| filter_endpoint(s, &solo).is_some_and(|e| e["healthy"] == true),
        )
        .await;
        eprintln!(
            "snapshot stored {:?} after Envoy's {attempt}",
            started.elapsed()
        );
        drop(gw);
    }
    let t = blocking(|| collector.metrics());
    assert!(
        metric(
            &t,
            "inference_collector_push_total",
            &[("target", &target), ("result", "ok")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{t}"
    );
}

/// A real Prometheus scrapes the collector and answers a query for GIE's pool
/// gauge through its HTTP API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_collector() {
    let Some(prometheus) = find_prometheus() else {
        support::announce(
            "\n*** SKIPPED prometheus_scrapes_the_collector: no `prometheus` binary on PATH \
             (install it: apt-get install -y prometheus) ***\n",
        );
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("collector-prom-")
        .tempdir()
        .expect("temp dir");
    let sim_port = process::free_port().expect("free port");
    let _sim = blocking(|| start_sim(dir.path(), "prom", sim_port, &[]));
    let collector = blocking(|| {
        Collector::start(
            dir.path(),
            "collector",
            &format!("pools: [{{name: prom-pool, endpoints: [\"127.0.0.1:{sim_port}\"]}}]\n"),
            TOKEN,
        )
    });
    let prom_port = process::free_port().expect("free port");
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: collector\n    static_configs:\n\
             \x20     - targets: [\"127.0.0.1:{}\"]\n",
            collector.port
        ),
    )
    .expect("write prometheus.yml");
    let mut cmd = Command::new(&prometheus);
    cmd.arg(format!("--config.file={}", prom_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .current_dir(dir.path());
    let log = dir.path().join("prometheus.log");
    let mut prom =
        ChildGuard::spawn("prometheus", &mut cmd, Some(&log)).unwrap_or_else(|e| panic!("{e}"));
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=inference_pool_average_kv_cache_utilization"
    );
    let result = blocking(|| {
        process::wait_until(
            "Prometheus to have the pool gauge",
            Duration::from_secs(40),
            || {
                if let Err(e) = prom.check_running() {
                    return Check::Failed(e.to_string());
                }
                let body = match process::http_get(&query) {
                    Ok((200, b)) => b,
                    Ok((s, b)) => return Check::NotYet(format!("{s} {b}")),
                    Err(e) => return Check::NotYet(e.to_string()),
                };
                let v: Value = match serde_json::from_str(&body) {
                    Ok(v) => v,
                    Err(e) => return Check::NotYet(format!("{e}: {body}")),
                };
                let series = v["data"]["result"].as_array().cloned().unwrap_or_default();
                match series.iter().find(|s| s["metric"]["name"] == "prom-pool") {
                    Some(s) => Check::Ready(s.clone()),
                    None => Check::NotYet(body),
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n--- prometheus ---\n{}", prom.log_tail(4000)))
    });
    assert_eq!(result["metric"]["job"], "collector");
    let value: f64 = result["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&value), "{result}");
    // The ready-pods gauge too: the one replica is up.
    let ready = blocking(|| {
        process::http_get(&format!(
            "http://127.0.0.1:{prom_port}/api/v1/query?query=inference_pool_ready_pods%7Bname%3D%22prom-pool%22%7D"
        ))
    })
    .expect("query");
    let v: Value = serde_json::from_str(&ready.1).expect("JSON");
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "{v}");
    prom.stop(Duration::from_secs(5));
}

fn find_prometheus() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("prometheus"))
            .find(|p| p.is_file())
    })
}

/// Bad flags print usage; a bad configuration names the field; `--check` passes
/// a good one. All exit without scraping anything.
#[test]
fn cli_and_configuration_errors() {
    let out = Command::new(collector_binary())
        .arg("--no-such-flag")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Usage:"), "{err}");

    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "pools:\n  - {name: a, endpoints: [\"127.0.0.1:1\"]}\n  - {name: b, endpoints: [\"not an address\"]}\n",
    )
    .expect("write");
    let out = Command::new(collector_binary())
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pools[1].endpoints[0]: not ip:port"), "{err}");

    let json = dir.path().join("good.json");
    std::fs::write(
        &json,
        r#"{"push_targets": ["127.0.0.1:9902"], "pools": [{"name": "a", "endpoints": ["127.0.0.1:1"]}]}"#,
    )
    .expect("write");
    let out = Command::new(collector_binary())
        .arg("--config")
        .arg(&json)
        .arg("--check")
        .env_remove(TOKEN_ENV)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "push targets need a token");
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
    let out = Command::new(collector_binary())
        .arg("--config")
        .arg(&json)
        .args(["--check", "--token-env", TOKEN_ENV])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let example = support::repo_root().join("docs/collector.example.yaml");
    let out = Command::new(collector_binary())
        .arg("--config")
        .arg(&example)
        .args(["--check", "--token-env", TOKEN_ENV])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "the committed example config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- Discovery: DNS (dns_servers), endpoints files, push targets by DNS ----

/// Polls `probe` every 20 ms until it gives a value; panics with `what` and the
/// collector's log after `timeout`.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    collector: &Collector,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n--- collector log ---\n{}",
                collector.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pool's members in a snapshot: (address, healthy), sorted.
fn members(s: &Snapshot, pool: &str) -> Vec<(String, bool)> {
    let mut m: Vec<(String, bool)> = s
        .pool(pool)
        .map(|p| {
            p.endpoints
                .iter()
                .map(|e| (e.address.clone(), e.healthy))
                .collect()
        })
        .unwrap_or_default();
    m.sort();
    m
}

fn all_healthy(addrs: &[&str]) -> Vec<(String, bool)> {
    let mut m: Vec<(String, bool)> = addrs.iter().map(|a| (a.to_string(), true)).collect();
    m.sort();
    m
}

/// A headless Service's answer changes: a replica added to DNS is scraped and
/// healthy in the pushed snapshot within one refresh plus a few intervals; a
/// removed one leaves the next snapshot (and the collector's series); an
/// NXDOMAIN answer empties the pool. The collector resolves through
/// `dns_servers` (a hickory DNS server on loopback), and the pool's entry has no
/// port (`target_ports`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_follows_dns_membership() {
    use support::collector::IngestSink;
    use support::dns::DnsServer;
    let dir = tempfile::Builder::new()
        .prefix("collector-dns-")
        .tempdir()
        .expect("temp dir");
    let dns = DnsServer::start("test.local").await;
    let ip = |last: u8| std::net::Ipv4Addr::new(127, 0, 0, last);
    dns.set_a("vllm.test.local", vec![ip(1), ip(2)]).await;
    let port = process::free_port().expect("free port");
    let _sims: Vec<Sim> = blocking(|| {
        (1..=3)
            .map(|i| {
                Sim::start_on_host(
                    &format!("r{i}"),
                    ip(i).into(),
                    port,
                    &SimOptions::default(),
                    dir.path(),
                )
                .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    });
    let sink_addr: std::net::SocketAddr = format!("127.0.0.1:{}", process::free_port().unwrap())
        .parse()
        .unwrap();
    let sink = IngestSink::start(sink_addr, TOKEN).await;
    const REFRESH_MS: u64 = 200;
    const INTERVAL_MS: u64 = 50;
    const TIMEOUT_MS: u64 = 300;
    let config = format!(
        "scrape_interval_ms: {INTERVAL_MS}\nscrape_timeout_ms: {TIMEOUT_MS}\ndns_refresh_interval_ms: {REFRESH_MS}\n\
         dns_servers: [\"{}\"]\npush_targets: [\"{sink_addr}\"]\n\
         pools:\n  - name: dns-pool\n    target_ports: [{port}]\n    endpoints: [\"vllm.test.local\"]\n",
        dns.addr()
    );
    let collector = blocking(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    let (a1, a2, a3) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.2:{port}"),
        format!("127.0.0.3:{port}"),
    );
    wait_for(
        "both DNS members healthy",
        Duration::from_secs(10),
        &collector,
        || {
            let s = sink.latest()?;
            (members(&s, "dns-pool") == all_healthy(&[&a1, &a2])).then_some(())
        },
    )
    .await;

    // A third replica appears in DNS.
    let added = Instant::now();
    dns.set_a("vllm.test.local", vec![ip(1), ip(2), ip(3)])
        .await;
    wait_for(
        "the added member listed",
        Duration::from_secs(5),
        &collector,
        || {
            let s = sink.latest()?;
            members(&s, "dns-pool")
                .iter()
                .any(|(a, _)| *a == a3)
                .then_some(())
        },
    )
    .await;
    let listed = added.elapsed();
    wait_for(
        "the added member healthy",
        Duration::from_secs(5),
        &collector,
        || {
            let s = sink.latest()?;
            (members(&s, "dns-pool") == all_healthy(&[&a1, &a2, &a3])).then_some(())
        },
    )
    .await;
    let healthy = added.elapsed();
    // Bound: one refresh, then the first scrape (spread over one interval, up to
    // the scrape timeout), one round and one push; 500 ms of slack for 2 busy cores.
    let bound = Duration::from_millis(REFRESH_MS + TIMEOUT_MS + 2 * INTERVAL_MS + 500);
    support::announce(&format!(
        "collector_follows_dns_membership: added member listed after {listed:?}, healthy after {healthy:?} (bound {bound:?})"
    ));
    assert!(healthy <= bound, "healthy after {healthy:?} > {bound:?}");

    // One replica leaves DNS: gone from the next snapshots, and from /metrics.
    let removed = Instant::now();
    dns.set_a("vllm.test.local", vec![ip(1), ip(3)]).await;
    wait_for(
        "the removed member gone",
        Duration::from_secs(5),
        &collector,
        || {
            let s = sink.latest()?;
            (!members(&s, "dns-pool").iter().any(|(a, _)| *a == a2)).then_some(())
        },
    )
    .await;
    let gone = removed.elapsed();
    let bound = Duration::from_millis(REFRESH_MS + 2 * INTERVAL_MS + 500);
    assert!(gone <= bound, "gone after {gone:?} > {bound:?}");
    let after = Instant::now();
    tokio::time::sleep(Duration::from_millis(4 * INTERVAL_MS)).await;
    let later = sink.since(after);
    assert!(later.len() >= 2, "pushes go on: {}", later.len());
    for s in &later {
        assert_eq!(members(s, "dns-pool"), all_healthy(&[&a1, &a3]));
    }
    let text = collector.metrics();
    assert!(
        !text.contains(&format!("\"{a2}\"")),
        "series of the departed member are dropped:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            "inference_pool_endpoint_healthy",
            &[("name", "dns-pool"), ("endpoint", &a3)]
        ),
        Some(1.0)
    );

    // NXDOMAIN (no records left for the name): zero members, not the old ones.
    dns.set_a("vllm.test.local", vec![]).await;
    wait_for(
        "an empty pool after NXDOMAIN",
        Duration::from_secs(5),
        &collector,
        || {
            let s = sink.latest()?;
            (s.pool("dns-pool").is_some() && members(&s, "dns-pool").is_empty()).then_some(())
        },
    )
    .await;
    // And back.
    dns.set_a("vllm.test.local", vec![ip(2)]).await;
    wait_for("a member again", Duration::from_secs(5), &collector, || {
        let s = sink.latest()?;
        (members(&s, "dns-pool") == all_healthy(&[&a2])).then_some(())
    })
    .await;
    let log = collector.log();
    assert!(!log.contains(TOKEN), "the token is never logged");
}

/// Writes `text` as the new content of a ConfigMap-style mount: `name` is a
/// symlink to `..data/name`, `..data` a symlink to a fresh directory, swapped
/// atomically (what the kubelet does).
fn configmap_write(dir: &Path, name: &str, text: &str, version: u32) {
    let data = dir.join(format!("..data_{version}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join(name), text).expect("write");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..data_{version}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    let link = dir.join(name);
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("symlink");
    }
}

/// A pool fed by an endpoints file (a ConfigMap mount, updated by symlink swap):
/// lines added and removed show in the snapshot; a malformed rewrite keeps the
/// previous members and is counted; a DNS name in the file is refused and
/// counted; an empty list is a pool without members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_follows_an_endpoints_file() {
    use support::collector::IngestSink;
    let dir = tempfile::Builder::new()
        .prefix("collector-file-")
        .tempdir()
        .expect("temp dir");
    let mount = dir.path().join("mount");
    std::fs::create_dir_all(&mount).expect("mkdir");
    let sims: Vec<Sim> = blocking(|| {
        (1..=2)
            .map(|i| {
                Sim::start(&format!("f{i}"), &SimOptions::default(), dir.path())
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    });
    let (e1, e2) = (sims[0].endpoint(), sims[1].endpoint());
    let file = mount.join("endpoints.yaml");
    let mut version = 1;
    configmap_write(&mount, "endpoints.yaml", &format!("- \"{e1}\"\n"), version);
    let sink_addr: std::net::SocketAddr = format!("127.0.0.1:{}", process::free_port().unwrap())
        .parse()
        .unwrap();
    let sink = IngestSink::start(sink_addr, TOKEN).await;
    let config = format!(
        "scrape_interval_ms: 50\nscrape_timeout_ms: 300\nendpoints_file_poll_interval_ms: 100\n\
         push_targets: [\"{sink_addr}\"]\n\
         pools:\n  - name: file-pool\n    endpoints_file: \"{}\"\n",
        file.display()
    );
    let collector = blocking(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    let members_now = || sink.latest().map(|s| members(&s, "file-pool"));
    wait_for(
        "the file's member",
        Duration::from_secs(10),
        &collector,
        || (members_now()? == all_healthy(&[&e1])).then_some(()),
    )
    .await;

    // Add a line.
    version += 1;
    configmap_write(
        &mount,
        "endpoints.yaml",
        &format!("- \"{e1}\"\n- {{address: \"{e2}\", labels: {{zone: b}}}}\n"),
        version,
    );
    wait_for("the added line", Duration::from_secs(5), &collector, || {
        (members_now()? == all_healthy(&[&e1, &e2])).then_some(())
    })
    .await;
    let s = sink.latest().expect("snapshot");
    let ep = s
        .pool("file-pool")
        .and_then(|p| p.endpoints.iter().find(|e| e.address == e2))
        .expect("member");
    assert!(
        ep.labels.iter().any(|(k, v)| k == "zone" && v == "b"),
        "{ep:?}"
    );

    // Remove a line.
    version += 1;
    configmap_write(&mount, "endpoints.yaml", &format!("- \"{e2}\"\n"), version);
    wait_for(
        "the removed line gone",
        Duration::from_secs(5),
        &collector,
        || (members_now()? == all_healthy(&[&e2])).then_some(()),
    )
    .await;

    // A malformed rewrite: previous members kept, the error counted once.
    let errors = |text: &str, reason: &str| {
        metric(
            text,
            "inference_collector_discovery_errors_total",
            &[("source", "file"), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    version += 1;
    configmap_write(
        &mount,
        "endpoints.yaml",
        &format!("- \"{e1}\"\n- [unterminated\n"),
        version,
    );
    wait_for(
        "the parse error counted",
        Duration::from_secs(5),
        &collector,
        || (errors(&collector.metrics(), "parse") >= 1.0).then_some(()),
    )
    .await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = sink.since(t);
    assert!(later.len() >= 3, "pushes go on: {}", later.len());
    for s in &later {
        assert_eq!(members(s, "file-pool"), all_healthy(&[&e2]), "kept");
    }
    assert_eq!(
        errors(&collector.metrics(), "parse"),
        1.0,
        "counted once per change, not per poll"
    );

    // A DNS name in the file is refused (and counted); the rest is used.
    version += 1;
    configmap_write(
        &mount,
        "endpoints.yaml",
        &format!("- \"{e1}\"\n- \"localhost:{}\"\n", sims[1].port),
        version,
    );
    wait_for(
        "the IP entry used",
        Duration::from_secs(5),
        &collector,
        || (members_now()? == all_healthy(&[&e1])).then_some(()),
    )
    .await;
    assert_eq!(errors(&collector.metrics(), "entry"), 1.0);
    assert!(
        collector.log().contains("a DNS name"),
        "the refusal names the entry"
    );

    // An empty list: no members (not the previous ones).
    version += 1;
    configmap_write(&mount, "endpoints.yaml", "[]\n", version);
    wait_for("an empty pool", Duration::from_secs(5), &collector, || {
        let s = sink.latest()?;
        (s.pool("file-pool").is_some() && members(&s, "file-pool").is_empty()).then_some(())
    })
    .await;
}

/// One DNS name for two ingest replicas (127.0.0.1 and 127.0.0.2, same port):
/// both are fed; one stops and comes back, and is fed again within
/// push_backoff_max_ms + one interval; one leaves DNS and its pusher stops (and
/// its series goes); a push target file adds a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_pushes_to_every_address_of_a_dns_target() {
    use support::collector::IngestSink;
    use support::dns::DnsServer;
    let dir = tempfile::Builder::new()
        .prefix("collector-push-")
        .tempdir()
        .expect("temp dir");
    let dns = DnsServer::start("test.local").await;
    let ip = |last: u8| std::net::Ipv4Addr::new(127, 0, 0, last);
    dns.set_a("envoy.test.local", vec![ip(1), ip(2)]).await;
    let port = process::free_port().expect("free port");
    let at = |last: u8| std::net::SocketAddr::new(ip(last).into(), port);
    let sink1 = IngestSink::start(at(1), TOKEN).await;
    let mut sink2 = Some(IngestSink::start(at(2), TOKEN).await);
    let sink3 = IngestSink::start(at(3), TOKEN).await;
    let targets_file = dir.path().join("push-targets.json");
    std::fs::write(&targets_file, "[]").expect("write");
    const INTERVAL_MS: u64 = 50;
    const BACKOFF_MAX_MS: u64 = 400;
    const REFRESH_MS: u64 = 200;
    let dead = format!("127.0.0.1:{}", process::free_port().expect("free port"));
    let name = format!("envoy.test.local:{port}");
    let config = format!(
        "scrape_interval_ms: {INTERVAL_MS}\ndns_refresh_interval_ms: {REFRESH_MS}\ndns_servers: [\"{}\"]\n\
         endpoints_file_poll_interval_ms: 100\n\
         push_backoff_initial_ms: 50\npush_backoff_max_ms: {BACKOFF_MAX_MS}\npush_timeout_ms: 500\n\
         push_targets: [\"{name}\", {{file: \"{}\"}}]\n\
         pools:\n  - name: p\n    endpoints: [\"{dead}\"]\n",
        dns.addr(),
        targets_file.display()
    );
    let collector = blocking(|| Collector::start(dir.path(), "collector", &config, TOKEN));
    let sink2_count = |s: &Option<IngestSink>| s.as_ref().map_or(0, |s| s.count());
    wait_for(
        "both replicas fed",
        Duration::from_secs(10),
        &collector,
        || (sink1.count() > 0 && sink2_count(&sink2) > 0).then_some(()),
    )
    .await;
    let pushes = |address: &str, result: &str| {
        metric(
            &collector.metrics(),
            "inference_collector_push_total",
            &[
                ("target", name.as_str()),
                ("address", address),
                ("result", result),
            ],
        )
    };
    assert!(pushes(&at(2).to_string(), "ok").unwrap_or(0.0) >= 1.0);
    assert_eq!(sink3.count(), 0, "not a target (yet)");

    // Replica 2 goes away, long enough for its backoff to reach the maximum.
    sink2.take().expect("sink 2").stop().await;
    wait_for(
        "failed pushes to replica 2",
        Duration::from_secs(5),
        &collector,
        || (pushes(&at(2).to_string(), "error").unwrap_or(0.0) >= 3.0).then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2 * BACKOFF_MAX_MS)).await;
    let before = sink1.count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink1.count() > before, "replica 1 is fed meanwhile");

    // It comes back on the same address.
    let back = Instant::now();
    let sink2b = IngestSink::start(at(2), TOKEN).await;
    let fed = wait_for(
        "replica 2 fed again",
        Duration::from_secs(5),
        &collector,
        || sink2b.first_since(back),
    )
    .await;
    let took = fed.duration_since(back);
    let bound = Duration::from_millis(BACKOFF_MAX_MS + INTERVAL_MS + 300);
    support::announce(&format!(
        "collector_pushes_to_every_address_of_a_dns_target: restarted replica fed after {took:?} (bound {bound:?} = push_backoff_max_ms + interval + 300 ms slack)"
    ));
    assert!(took <= bound, "fed again after {took:?} > {bound:?}");

    // Replica 2 leaves DNS: its pusher stops, its series goes.
    dns.set_a("envoy.test.local", vec![ip(1)]).await;
    wait_for(
        "replica 2's series dropped",
        Duration::from_secs(5),
        &collector,
        || pushes(&at(2).to_string(), "ok").is_none().then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let settled = sink2b.count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink2b.count(), settled, "no pushes after it left DNS");

    // A push target file lists a third replica: fed; removed from the file: stops.
    std::fs::write(&targets_file, format!("[\"{}\"]", at(3))).expect("write");
    wait_for("replica 3 fed", Duration::from_secs(5), &collector, || {
        (sink3.count() > 0).then_some(())
    })
    .await;
    std::fs::write(&targets_file, "[]").expect("write");
    wait_for(
        "replica 3's pusher stopped",
        Duration::from_secs(5),
        &collector,
        || {
            metric(
                &collector.metrics(),
                "inference_collector_push_total",
                &[("address", &at(3).to_string())],
            )
            .is_none()
            .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let settled = sink3.count();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sink3.count(), settled, "no pushes after it left the file");
    assert!(sink1.count() > 0);
    assert!(
        !collector.log().contains(TOKEN),
        "the token is never logged"
    );
}
