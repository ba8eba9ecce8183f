//! Collector benchmark (a plain binary, not a timed test):
//!
//! 1. parse + map of one vLLM `/metrics` body (the simulator's, captured in
//!    `benches/fixtures/vllm-metrics.txt`), in process, per call;
//! 2. the real collector (`collector::runtime`) scraping 10, 100 and 1000
//!    endpoints over loopback HTTP at the default 50 ms interval and pushing every
//!    round to an ingest sink: achieved scrape rate, scrape latency, and the
//!    collector's own CPU time per scrape. The endpoints and the sink are served by
//!    a child process (this binary with `serve N`), so their CPU is not counted;
//! 3. the encoded snapshot size for 10, 100 and 1000 endpoints.
//!
//! Run: `cargo bench --bench collector` (optionally `-- --seconds 5`). Results:
//! `benches/results/collector.md`.

use inference_gateway::collector::config::{RawCollectorConfig, ServerType};
use inference_gateway::collector::exposition;
use inference_gateway::collector::mapping::map_exposition;
use inference_gateway::collector::runtime;
use inference_gateway::collector::telemetry::SCRAPE_BUCKETS;
use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FIXTURE: &str = include_str!("fixtures/vllm-metrics.txt");
const SIZES: [usize; 3] = [10, 100, 1000];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
        serve(n);
        return;
    }
    // `cargo bench` passes `--bench`; only `--seconds N` is ours.
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);

    println!("## parse + map of one vLLM /metrics body\n");
    parse_bench();
    println!("\n## encoded snapshot size\n");
    snapshot_sizes();
    println!("\n## collector scraping real loopback endpoints ({seconds} s measured)\n");
    println!("| endpoints | interval | scrapes/s (target) | rounds/s (target) | scrape p50 | scrape p99 | collector CPU per scrape | collector CPU (cores) | pushed snapshot |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in SIZES {
        scrape_bench(n, 50, Duration::from_secs(seconds));
    }
    // The default interval is too short for 1000 endpoints on 2 cores; a longer one.
    scrape_bench(1000, 200, Duration::from_secs(seconds));
}

fn parse_bench() {
    let m = map_exposition(ServerType::Vllm, FIXTURE).expect("the fixture maps");
    assert!(m.max_lora > 0, "fixture has LoRA info");
    let lines = FIXTURE.lines().count();
    // Warm up, then time enough calls for a stable per-call figure.
    for _ in 0..200 {
        std::hint::black_box(map_exposition(ServerType::Vllm, std::hint::black_box(FIXTURE)).ok());
    }
    let iters = 5_000;
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(map_exposition(ServerType::Vllm, std::hint::black_box(FIXTURE)).ok());
    }
    let per = t.elapsed() / iters;
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(exposition::parse(std::hint::black_box(FIXTURE), |_| true).ok());
    }
    let per_all = t.elapsed() / iters;
    println!(
        "- body: {} bytes, {lines} lines (simulator, vLLM names, histograms included)",
        FIXTURE.len()
    );
    println!("- parse + map (keeps only the mapped metrics): {per:?} per body");
    println!("- parse keeping every sample (for comparison): {per_all:?} per body");
}

fn snapshot_sizes() {
    println!("| endpoints | encoded bytes | bytes/endpoint | encode time |");
    println!("|---:|---:|---:|---:|");
    for n in SIZES {
        let s = Snapshot {
            generated_at_ms: 1_795_000_000_000,
            sequence: 123_456,
            collector: "collector-0123456789abcdef".into(),
            pools: vec![PoolSnapshot {
                name: "demo-pool".into(),
                endpoints: (0..n)
                    .map(|i| EndpointMetrics {
                        address: format!("10.{}.{}.{}:8000", i / 65536, (i / 256) % 256, i % 256),
                        healthy: true,
                        scraped_at_ms: 1_795_000_000_000 - (i as u64 % 50),
                        kv_cache_utilization: 0.42,
                        waiting: (i % 7) as u32,
                        running: (i % 31) as u32,
                        running_adapters: vec!["sql-lora".into()],
                        waiting_adapters: vec![],
                        max_lora: 4,
                        server_type: "vllm".into(),
                        labels: vec![
                            ("cluster".into(), "c1".into()),
                            (
                                "zone".into(),
                                format!("us-central1-{}", ["a", "b", "c"][i % 3]),
                            ),
                        ],
                    })
                    .collect(),
            }],
        };
        let iters = 200;
        let t = Instant::now();
        let mut len = 0;
        for _ in 0..iters {
            len = std::hint::black_box(s.encode()).len();
        }
        let per = t.elapsed() / iters;
        println!("| {n} | {len} | {} | {per:?} |", len / n);
    }
    println!("\n(each endpoint: address, LoRA adapter, server type, two labels)");
}

/// Child mode: `n` listeners serving the fixture on `/metrics`, one ingest sink.
/// Prints the ports, then serves until stdin closes (the parent is gone).
fn serve(n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(|| async { FIXTURE }))
            .route(
                "/v1/snapshot",
                axum::routing::post(|_: axum::body::Bytes| async {
                    axum::http::StatusCode::NO_CONTENT
                }),
            );
        let mut ports = Vec::with_capacity(n + 1);
        for _ in 0..=n {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            ports.push(l.local_addr().expect("addr").port());
            let app = app.clone();
            tokio::spawn(async move { axum::serve(l, app).await });
        }
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        println!("PORTS {}", list.join(","));
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .ok();
    });
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF covers all threads.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

struct Counters {
    scrapes: f64,
    rounds: f64,
    buckets: Vec<f64>,
    snapshot_bytes: f64,
}

fn counters(text: &str) -> Counters {
    let samples = exposition::parse(text, |n| n.starts_with("inference_collector_")).expect("ours");
    let mut c = Counters {
        scrapes: 0.0,
        rounds: 0.0,
        buckets: vec![0.0; SCRAPE_BUCKETS.len()],
        snapshot_bytes: 0.0,
    };
    for s in samples {
        match s.name {
            "inference_collector_scrape_duration_seconds_count" => c.scrapes += s.value,
            "inference_collector_rounds_total" => c.rounds = s.value,
            "inference_collector_snapshot_bytes" => c.snapshot_bytes = s.value,
            "inference_collector_scrape_duration_seconds_bucket" => {
                if let Some(i) = s
                    .label("le")
                    .and_then(|le| le.parse::<f64>().ok())
                    .and_then(|le| SCRAPE_BUCKETS.iter().position(|b| *b == le))
                {
                    c.buckets[i] += s.value;
                }
            }
            _ => {}
        }
    }
    c
}

/// The upper bound of the bucket holding quantile `q` (cumulative buckets).
fn quantile(buckets: &[f64], total: f64, q: f64) -> String {
    for (b, n) in SCRAPE_BUCKETS.iter().zip(buckets) {
        if *n >= q * total {
            return format!("≤ {} ms", b * 1000.0);
        }
    }
    format!("> {} ms", SCRAPE_BUCKETS[SCRAPE_BUCKETS.len() - 1] * 1000.0)
}

fn scrape_bench(n: usize, interval_ms: u64, measure: Duration) {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args(["serve", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the endpoint server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ports");
    let ports: Vec<u16> = line
        .trim()
        .strip_prefix("PORTS ")
        .expect("PORTS line")
        .split(',')
        .map(|p| p.parse().expect("port"))
        .collect();
    let (sink, endpoints) = ports.split_last().expect("ports");
    let eps: Vec<String> = endpoints
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    let config = format!(
        "{{\"listen\": \"127.0.0.1:0\", \"token\": \"bench-token-123\", \
         \"scrape_interval_ms\": {interval_ms}, \
         \"push_targets\": [\"127.0.0.1:{sink}\"], \
         \"pools\": [{{\"name\": \"bench\", \"endpoints\": [{}]}}]}}",
        eps.join(",")
    );
    let cfg = RawCollectorConfig::parse(&config, true)
        .and_then(|r| r.validate(|_| None))
        .expect("config");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let c = runtime::start(cfg).await.expect("collector");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let a = counters(&c.metrics_text());
        let cpu0 = cpu_time();
        let t0 = Instant::now();
        tokio::time::sleep(measure).await;
        let b = counters(&c.metrics_text());
        let cpu = cpu_time() - cpu0;
        let secs = t0.elapsed().as_secs_f64();
        let scrapes = b.scrapes - a.scrapes;
        let buckets: Vec<f64> = b
            .buckets
            .iter()
            .zip(&a.buckets)
            .map(|(x, y)| x - y)
            .collect();
        let healthy = c.latest().pools[0]
            .endpoints
            .iter()
            .filter(|e| e.healthy)
            .count();
        println!(
            "| {n} | {interval_ms} ms | {:.0} ({}) | {:.1} ({}) | {} | {} | {:.1} µs | {:.2} | {} B |",
            scrapes / secs,
            n as u64 * 1000 / interval_ms,
            (b.rounds - a.rounds) / secs,
            1000 / interval_ms,
            quantile(&buckets, scrapes, 0.5),
            quantile(&buckets, scrapes, 0.99),
            cpu.as_secs_f64() * 1e6 / scrapes.max(1.0),
            cpu.as_secs_f64() / secs,
            b.snapshot_bytes,
        );
        if healthy != n {
            println!("  (only {healthy} of {n} endpoints healthy at the end)");
        }
        c.stop().await;
    });
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}
