//! The benchmark harness (BENCHMARKS.md): starts everything on loopback, runs the
//! load, writes results as JSON/CSV under benches/results/, plots, and renders
//! BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release --features bench --bin bench -- overhead [--quick]
//! cargo run --release --features bench --bin bench -- routing [--quick]
//! cargo run --release --features bench --bin bench -- soak [--quick]
//! cargo run --release --features bench --bin bench -- report
//! ```

use clap::{Parser, Subcommand};
use futures_util::future::join_all;
use inference_gateway::bench::callgrind::{self, InstructionResults, InstructionRow};
use inference_gateway::bench::machine;
use inference_gateway::bench::report::{
    self, OverheadRep, OverheadResults, OverheadRow, RoutingPoint, RoutingResults, RunMeta,
};
use inference_gateway::bench::stats::Quantiles;
use inference_gateway::bench::workload::{self, Costs, Kind, Planned, Spec};
use inference_gateway::deploy::envoy_binary;
use inference_gateway::deploy::envoy_config::{
    self, EnvoySettings, FailureMode, LbPolicy, PickerLb, Routing,
};
use inference_gateway::deploy::process::{self, Check, ChildGuard};
use inference_gateway::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(about = "inference-gateway benchmarks: filter overhead and routing quality")]
struct Args {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand, Debug)]
enum Suite {
    /// Added latency, saturation throughput and Envoy CPU: plain Envoy vs the
    /// floor (a minimal body-based router in Wasm) vs the filter vs an ext_proc
    /// picker.
    Overhead(Common),
    /// Machine instructions per request in Envoy (and the picker), counted
    /// under valgrind's callgrind: plain vs floor vs filter vs ext_proc without
    /// the overhead suite's timing noise.
    Instructions(Common),
    /// TTFT, latency, throughput and goodput of routing policies over 8 replicas.
    Routing(Common),
    /// The scheduler alone, natively, in process: `scheduling::schedule` and the
    /// ext_proc picker's whole `route` over N endpoints (no Envoy, no Wasm).
    Scheduler(Common),
    /// What screening streamed responses costs a client: no response check vs
    /// detect vs hold, against a safety service with a realistic latency.
    SafetyStream(Common),
    /// Soak with faults: >= 10^6 requests through Envoy and the filter while the
    /// safety service, replicas and collector fail; then invariants
    /// (`src/bench/soak.rs`, results in benches/results/soak.md).
    Soak(inference_gateway::bench::soak::SoakArgs),
    /// Re-render BENCHMARKS.md and the plots from the saved results.
    Report,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// A short run (under 3 minutes with both suites) that checks the harness works.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each measured point (default: 3, quick: 1).
    #[arg(long)]
    reps: Option<u32>,
    /// Do not wait for the machine to be idle (1-minute load < 0.7) before starting.
    #[arg(long)]
    no_wait_idle: bool,
    /// Where results go (default: benches/results, quick: a temporary directory
    /// so CI never overwrites committed numbers).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Overhead suite: only these variants (plain, floor, filter, ext_proc,
    /// ext_proc_fd), comma-separated; results go to a temporary directory unless
    /// `--out` says otherwise. For profiling one point (`perf record -p` on Envoy).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Overhead suite: only these pool sizes, comma-separated.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<usize>,
    /// Overhead suite: only these body sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',')]
    bodies: Vec<usize>,
    /// Overhead suite: seconds of the closed-loop saturation run (default 3).
    #[arg(long)]
    saturation_s: Option<u64>,
}

impl Common {
    /// A run narrowed to some points: never the committed results by default.
    fn partial(&self) -> bool {
        !(self.variants.is_empty() && self.endpoints.is_empty() && self.bodies.is_empty())
    }
}

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.suite {
        Suite::Overhead(c) => overhead(&c),
        Suite::Instructions(c) => instructions(&c),
        Suite::Routing(c) => routing(&c),
        Suite::Scheduler(c) => scheduler(&c),
        Suite::SafetyStream(c) => safety_stream(&c),
        Suite::Soak(a) => inference_gateway::bench::soak::run(&a),
        Suite::Report => render_all(&results_dir(), &repo().join("BENCHMARKS.md")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn repo() -> PathBuf {
    inference_gateway::deploy::repo_root()
}

fn results_dir() -> PathBuf {
    repo().join("benches/results")
}

fn out_dir(c: &Common) -> Res<PathBuf> {
    let dir = match (&c.out, c.quick || c.partial()) {
        (Some(d), _) => d.clone(),
        (None, false) => results_dir(),
        (None, true) => {
            std::env::temp_dir().join(format!("igw-bench-quick-{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// A sibling binary of this one (same cargo profile directory).
fn sibling(name: &str) -> Res<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: build it first, e.g. `cargo build --release --features bench --bins`",
            p.display()
        ))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Waits (at most 10 minutes, polling every 30 s) for the 1-minute load average
/// to drop below 0.7: numbers taken while others compile are noise.
fn wait_idle(c: &Common) -> Vec<String> {
    if c.no_wait_idle || c.quick {
        return vec![];
    }
    let start = Instant::now();
    for _ in 0..21 {
        let la = machine::loadavg().unwrap_or([0.0; 3]);
        if la[0] < 0.7 {
            return vec![];
        }
        if start.elapsed() >= Duration::from_secs(600) {
            break;
        }
        println!(
            "waiting for an idle machine: load average {:.2} (want < 0.7)",
            la[0]
        );
        std::thread::sleep(Duration::from_secs(30));
    }
    let la = machine::loadavg().unwrap_or([0.0; 3]);
    vec![format!(
        "the machine did not become idle within 10 minutes (1-min load {:.2}): other work shared the cores during this run",
        la[0]
    )]
}

fn start_meta(suite: &str, c: &Common) -> (RunMeta, Instant) {
    let mut notes = wait_idle(c);
    let command =
        std::iter::once("cargo run --release --features bench --bin bench --".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
    let m = machine::describe();
    println!(
        "machine: {} cores, {}, {} GiB; command: {command}",
        m.cores, m.cpu_model, m.memory_gib
    );
    if c.quick {
        notes.push("quick mode: one short repetition, numbers are not meaningful".into());
    }
    (
        RunMeta {
            suite: suite.into(),
            command,
            machine: m,
            git_commit: git_commit(),
            started_utc: utc_now(),
            loadavg_start: machine::loadavg().unwrap_or_default(),
            notes,
            quick: c.quick,
            ..Default::default()
        },
        Instant::now(),
    )
}

fn finish_meta(meta: &mut RunMeta, started: Instant) {
    meta.loadavg_end = machine::loadavg().unwrap_or_default();
    meta.duration_s = started.elapsed().as_secs_f64();
    println!(
        "load average: {:?} at start, {:?} at end; {:.0} s",
        meta.loadavg_start, meta.loadavg_end, meta.duration_s
    );
}

// ---------------------------------------------------------------- processes

struct Sim {
    port: u16,
    _guard: ChildGuard,
}

fn start_sim(id: &str, args: &[String], dir: &Path) -> Res<Sim> {
    let mut all = vec!["--id".to_string(), id.to_string()];
    all.extend_from_slice(args);
    let (port, guard) = start_server(id, "model-server-sim", &all, dir)?;
    Ok(Sim {
        port,
        _guard: guard,
    })
}

/// Starts the sibling binary `bin` on a free loopback port with `args` and waits
/// for its `/health`.
fn start_server(id: &str, bin: &str, args: &[String], dir: &Path) -> Res<(u16, ChildGuard)> {
    let bin = sibling(bin)?;
    let port = process::free_port().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .env("RUST_LOG", "warn");
    let mut guard = ChildGuard::spawn(id, &mut cmd, Some(&dir.join(format!("{id}.log"))))
        .map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{port}/health");
    process::wait_until(id, Duration::from_secs(20), || {
        if let Err(e) = guard.check_running() {
            return Check::Failed(e.to_string());
        }
        match process::http_get(&url) {
            Ok((200, _)) => Check::Ready(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .map_err(|e| e.to_string())?;
    Ok((port, guard))
}

impl Sim {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

struct Envoy {
    guard: ChildGuard,
    url: String,
}

fn envoy_elf() -> Res<PathBuf> {
    let launcher = envoy_binary::ensure_envoy(&repo()).map_err(|e| e.to_string())?;
    envoy_binary::envoy_elf(&launcher).map_err(|e| e.to_string())
}

/// Starts Envoy on `yaml` and waits for its admin `/ready` and the gateway port.
/// `counted`: under callgrind (the `instructions` suite), its dumps in `dir`.
fn start_envoy(
    yaml: &str,
    admin_port: u16,
    gateway_port: u16,
    dir: &Path,
    counted: bool,
) -> Res<Envoy> {
    let config = dir.join(format!("envoy-{gateway_port}.yaml"));
    std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
    let settings = EnvoySettings {
        log_level: "warning".into(),
        concurrency: Some(2),
        ..EnvoySettings::demo()
    };
    let args = envoy_config::envoy_args(&settings, &config.to_string_lossy());
    let mut cmd = if counted {
        callgrind::wrap(&envoy_elf()?, &args, dir)
    } else {
        let mut cmd = Command::new(envoy_elf()?);
        cmd.args(&args);
        cmd
    };
    cmd.current_dir(dir);
    let mut guard = ChildGuard::spawn(
        "envoy",
        &mut cmd,
        Some(&dir.join(format!("envoy-{gateway_port}.log"))),
    )
    .map_err(|e| e.to_string())?;
    let ready = format!("http://127.0.0.1:{admin_port}/ready");
    // Under valgrind start-up takes tens of seconds even uninstrumented.
    let patience = Duration::from_secs(if counted { 300 } else { 30 });
    process::wait_until("envoy", patience, || {
        if let Err(e) = guard.check_running() {
            return Check::Failed(e.to_string());
        }
        match process::http_get(&ready) {
            Ok((200, _)) => Check::Ready(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .map_err(|e| e.to_string())?;
    process::wait_for_tcp(
        format!("127.0.0.1:{gateway_port}")
            .parse()
            .map_err(|_| "addr")?,
        Duration::from_secs(if counted { 60 } else { 10 }),
    )
    .map_err(|e| e.to_string())?;
    Ok(Envoy {
        guard,
        url: format!("http://127.0.0.1:{gateway_port}"),
    })
}

fn ports() -> Res<(u16, u16, u16)> {
    let p = || process::free_port().map_err(|e| e.to_string());
    Ok((p()?, p()?, p()?))
}

const TOKEN: &str = "bench-ingest-token";
const POOL: &str = "bench-pool";

/// The product bootstrap (`deploy::envoy_config::render`) with `routing` on the
/// gateway listener: the filter over the plugin configuration's pool, or what it
/// is compared with. Everything else (buffer limit, timeouts, circuit breakers)
/// is the same for every variant, so only the routing step differs.
fn envoy_yaml(
    routing: Routing,
    gateway_config: Value,
    gw: u16,
    control: u16,
    admin: u16,
) -> String {
    envoy_config::render(&bench_settings(routing, gateway_config, gw, control, admin))
}

/// The overhead suite's floor: the filter's bootstrap (`Routing::WasmFilter`: the
/// same listeners, `ORIGINAL_DST` cluster, VM and plugin settings) with
/// `bench-floor-filter`'s module in the filter's place, routing round robin over
/// `live`. Its control listener gets an empty list (nothing is pushed to it).
fn floor_envoy_yaml(live: &[String], gw: u16, control: u16, admin: u16) -> String {
    let settings = EnvoySettings {
        wasm_path: env!("BENCH_FLOOR_WASM").into(),
        control_config: json!([]),
        ..bench_settings(Routing::WasmFilter, json!(live), gw, control, admin)
    };
    envoy_config::render(&settings)
}

fn bench_settings(
    routing: Routing,
    gateway_config: Value,
    gw: u16,
    control: u16,
    admin: u16,
) -> EnvoySettings {
    EnvoySettings {
        gateway_port: gw,
        control_port: control,
        admin_port: admin,
        wasm_path: env!("GATEWAY_WASM").into(),
        gateway_config,
        control_config: json!({"role": "control", "ingest": {"token": TOKEN}}),
        access_log: false,
        safety_address: None,
        log_level: "warning".into(),
        concurrency: Some(2),
        buffer_limit_bytes: Some(8 << 20),
        routing,
        // The picker runs with --insecure: the hop is compared, not TLS.
        picker_tls: false,
        ..EnvoySettings::demo()
    }
}

/// Pushes `make()`'s snapshot to `url` every 300 ms until dropped.
struct Pusher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pusher {
    fn start(url: String, make: impl Fn(u64, u64) -> Snapshot + Send + 'static) -> Res<Pusher> {
        let auth = format!("Bearer {TOKEN}");
        let push = {
            let url = url.clone();
            move |seq: u64| {
                let body = make(now_ms(), seq).encode();
                process::http_request("POST", &url, Some(&body), &[("authorization", &auth)])
            }
        };
        // The first push must land before traffic starts.
        match push(1) {
            Ok((s, _)) if s < 300 => {}
            other => return Err(format!("snapshot push to {url}: {other:?}")),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seq = 2;
            // Bounded by the stop flag; at most a day of pushes.
            while !flag.load(Ordering::Relaxed) && seq < 300_000 {
                std::thread::sleep(Duration::from_millis(300));
                let _ = push(seq);
                seq += 1;
            }
        });
        Ok(Pusher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Pusher {
    /// One push of `snapshot`, now.
    fn once(url: &str, snapshot: Snapshot) -> Res<()> {
        let auth = format!("Bearer {TOKEN}");
        match process::http_request(
            "POST",
            url,
            Some(&snapshot.encode()),
            &[("authorization", &auth)],
        ) {
            Ok((s, _)) if s < 300 => Ok(()),
            other => Err(format!("snapshot push to {url}: {other:?}")),
        }
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- overhead

/// A request body of about `bytes` bytes: a completion whose prompt is long words
/// (fewer simulated tokens per byte, so the simulator's cost stays small).
fn body_of(bytes: usize) -> String {
    let head = r#"{"model":"bench","max_tokens":4,"prompt":""#;
    let tail = r#""}"#;
    let room = bytes.saturating_sub(head.len() + tail.len());
    let word = "abcdefghijklmn ";
    let mut prompt = word.repeat(room / word.len() + 1);
    prompt.truncate(room);
    format!("{head}{prompt}{tail}")
}

/// `n` pool endpoints: the live simulators first, then addresses nothing listens on.
fn pool_endpoints(live: &[String], n: usize) -> Vec<String> {
    let mut eps: Vec<String> = live.to_vec();
    let mut i = 0usize;
    while eps.len() < n {
        eps.push(format!("127.0.{}.{}:9", 1 + i / 250, 1 + i % 250));
        i += 1;
    }
    eps
}

/// Every endpoint healthy and fresh; the live ones idle, the others loaded but
/// under the saturation thresholds, so the scheduler scores all N and picks a
/// live one (queue and KV scorers favour them by a wide margin).
fn overhead_snapshot(eps: &[String], live: usize, now: u64, seq: u64) -> Snapshot {
    Snapshot {
        generated_at_ms: now,
        sequence: seq,
        collector: "bench".into(),
        pools: vec![PoolSnapshot {
            name: POOL.into(),
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, a)| EndpointMetrics {
                    address: a.clone(),
                    healthy: true,
                    scraped_at_ms: now,
                    kv_cache_utilization: if i < live { 0.0 } else { 0.6 },
                    waiting: if i < live { 0 } else { 4 },
                    running: if i < live { 0 } else { 8 },
                    server_type: "vllm".into(),
                    ..Default::default()
                })
                .collect(),
        }],
    }
}

fn oha_bin() -> Res<PathBuf> {
    if let Some(p) = std::env::var_os("OHA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let home_bin = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin/oha"))
        .filter(|p| p.is_file());
    if let Some(p) = home_bin {
        return Ok(p);
    }
    if Command::new("oha").arg("--version").output().is_ok() {
        return Ok(PathBuf::from("oha"));
    }
    Err("the load generator `oha` is not installed: cargo install oha --locked".into())
}

struct OhaRun {
    p50_ms: f64,
    p99_ms: f64,
    ok: u64,
    failed: u64,
    rps: f64,
}

/// One oha run: constant `rate` (with latency correction, so a stall counts from
/// the request's scheduled time) or, with `rate == None`, closed loop at
/// `connections` for throughput.
fn oha(url: &str, body_file: &Path, secs: u64, rate: Option<f64>, connections: u32) -> Res<OhaRun> {
    oha_run(
        url,
        body_file,
        ["-z".into(), format!("{secs}s")],
        rate,
        connections,
    )
}

/// Exactly `n` requests, closed loop at `connections`.
fn oha_n(url: &str, body_file: &Path, n: u64, connections: u32) -> Res<OhaRun> {
    oha_run(
        url,
        body_file,
        ["-n".into(), n.to_string()],
        None,
        connections,
    )
}

fn oha_run(
    url: &str,
    body_file: &Path,
    length: [String; 2],
    rate: Option<f64>,
    connections: u32,
) -> Res<OhaRun> {
    let mut cmd = Command::new(oha_bin()?);
    cmd.args(length)
        .args(["-c", &connections.to_string()])
        .args(["--no-tui", "--output-format", "json", "-m", "POST"])
        .args(["-H", "content-type: application/json", "-D"])
        .arg(body_file);
    if let Some(r) = rate {
        cmd.args(["-q", &format!("{r}"), "--latency-correction"]);
    }
    cmd.arg(url);
    let out = cmd.output().map_err(|e| format!("oha: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "oha failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "oha output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let codes = v["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok: u64 = codes
        .iter()
        .filter(|(k, _)| k.starts_with('2'))
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    let non2xx: u64 = codes
        .iter()
        .filter(|(k, _)| !k.starts_with('2'))
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    // Requests cut off by `-z` at the end of the run are not failures.
    let errors: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("aborted due to deadline"))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    let secs_f = |x: &Value| x.as_f64().unwrap_or(f64::NAN) * 1000.0;
    Ok(OhaRun {
        p50_ms: secs_f(&v["latencyPercentiles"]["p50"]),
        p99_ms: secs_f(&v["latencyPercentiles"]["p99"]),
        ok,
        failed: non2xx + errors,
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
    })
}

struct OverheadPlan {
    bodies: Vec<usize>,
    endpoints: Vec<usize>,
    reps: u32,
    warm_s: u64,
    latency_s: u64,
    saturation_s: u64,
}

/// The overhead and instructions suites' two upstreams: zero-cost simulators.
fn overhead_sims(tmp: &Path) -> Res<([Sim; 2], Vec<String>)> {
    let sim_args: Vec<String> = [
        "--per-token-ms",
        "0",
        "--ttft-ms",
        "0",
        "--max-num-seqs",
        "512",
        "--num-gpu-blocks",
        "65536",
        "--max-num-batched-tokens",
        "1000000",
        // 4 MiB bodies: keeping a thousand of them would take gigabytes.
        "--record-capacity",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sims = [
        start_sim("sim-0", &sim_args, tmp)?,
        start_sim("sim-1", &sim_args, tmp)?,
    ];
    let live = sims.iter().map(Sim::endpoint).collect();
    Ok((sims, live))
}

/// A request body file per size, in `tmp`.
fn body_files(sizes: &[usize], tmp: &Path) -> Res<Vec<(usize, PathBuf)>> {
    sizes
        .iter()
        .map(|&b| {
            let p = tmp.join(format!("body-{b}.json"));
            std::fs::write(&p, body_of(b)).map(|()| (b, p))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())
}

/// (variant, endpoints) in report::OVERHEAD_VARIANTS order: plain and the
/// floor need no pool (both route over the live simulators only).
fn overhead_configs(endpoints: &[usize]) -> Vec<(&'static str, usize)> {
    let mut configs: Vec<(&str, usize)> = vec![("plain", 0), ("floor", 0)];
    for variant in ["filter", "ext_proc", "ext_proc_fd"] {
        configs.extend(endpoints.iter().map(|&n| (variant, n)));
    }
    configs
}

/// The latency runs' constant rate for a body size: 200 requests per second up to
/// 256 KB; at 4 MiB 5 (every variant saturates at 35 to 45 per second there on
/// two cores, the simulators parsing the bodies included, and a
/// rate near saturation measures the queue, not the added latency).
fn overhead_rate(body_bytes: usize) -> f64 {
    if body_bytes > 1 << 20 {
        5.0
    } else {
        200.0
    }
}

fn overhead(c: &Common) -> Res<()> {
    let mut plan = if c.quick {
        OverheadPlan {
            bodies: vec![1024],
            endpoints: vec![10],
            reps: c.reps.unwrap_or(1),
            warm_s: 1,
            latency_s: 3,
            saturation_s: 2,
        }
    } else {
        OverheadPlan {
            // 4 MiB: the filter's default max_request_body_bytes.
            bodies: vec![1024, 16 * 1024, 256 * 1024, 4 << 20],
            endpoints: vec![10, 100, 1000],
            reps: c.reps.unwrap_or(3),
            warm_s: 1,
            latency_s: 5,
            saturation_s: 3,
        }
    };
    if !c.bodies.is_empty() {
        plan.bodies = c.bodies.clone();
    }
    if !c.endpoints.is_empty() {
        plan.endpoints = c.endpoints.clone();
    }
    if let Some(s) = c.saturation_s {
        plan.saturation_s = s;
    }
    let wanted = |v: &str| c.variants.is_empty() || c.variants.iter().any(|w| w == v);
    let out = out_dir(c)?;
    let (mut meta, started) = start_meta("overhead", c);
    let tmp = tempdir("overhead")?;
    let oha_version = Command::new(oha_bin()?)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let (_sims, live) = overhead_sims(&tmp)?;
    let bodies = body_files(&plan.bodies, &tmp)?;
    let mut configs = overhead_configs(&plan.endpoints);
    configs.retain(|(v, _)| wanted(v));
    let mut rows = Vec::new();
    for (variant, n) in configs {
        let Variant {
            envoy,
            picker,
            pusher: _pusher,
        } = start_variant(variant, n, &live, &tmp, false)?;
        let url = format!("{}/v1/completions", envoy.url);
        for (size, file) in &bodies {
            let rate = overhead_rate(*size);
            let mut row = OverheadRow {
                variant: variant.into(),
                endpoints: n,
                body_bytes: *size,
                rate_rps: rate,
                reps: vec![],
            };
            for rep in 0..plan.reps {
                oha(&url, file, plan.warm_s, Some(rate), 16)?;
                let lat = oha(&url, file, plan.latency_s, Some(rate), 16)?;
                let pid_cpu = |g: &ChildGuard| g.id().and_then(machine::cpu_seconds).unwrap_or(0.0);
                let (e0, p0) = (
                    pid_cpu(&envoy.guard),
                    picker.as_ref().map(pid_cpu).unwrap_or(0.0),
                );
                let sat = oha(&url, file, plan.saturation_s, None, 32)?;
                let (e1, p1) = (
                    pid_cpu(&envoy.guard),
                    picker.as_ref().map(pid_cpu).unwrap_or(0.0),
                );
                let done = (sat.ok + sat.failed).max(1) as f64;
                let r = OverheadRep {
                    p50_ms: lat.p50_ms,
                    p99_ms: lat.p99_ms,
                    ok: lat.ok + sat.ok,
                    failed: lat.failed + sat.failed,
                    saturation_rps: sat.rps,
                    envoy_cpu_us: (e1 - e0) / done * 1e6,
                    picker_cpu_us: (p1 - p0) / done * 1e6,
                };
                println!(
                    "{variant:11} n={n:4} body={size:6} rep={rep}: p50 {:.3} ms p99 {:.3} ms, {:.0} req/s, envoy {:.0} µs/req, picker {:.0} µs/req, failed {}",
                    r.p50_ms, r.p99_ms, r.saturation_rps, r.envoy_cpu_us, r.picker_cpu_us, r.failed
                );
                if r.failed > 0 {
                    println!(
                        "  warning: {} failed requests (see {})",
                        r.failed,
                        tmp.display()
                    );
                }
                row.reps.push(r);
            }
            rows.push(row);
        }
        drop(envoy);
        drop(picker);
    }
    finish_meta(&mut meta, started);
    let results = OverheadResults {
        meta,
        load_generator: format!(
            "{oha_version}: constant rate `-q {rate} --latency-correction -c 16` (5 at 4 MiB) for {l} s per repetition (after {w} s of warm-up) for latency; closed loop `-c 32` for {s} s for saturation throughput and CPU",
            rate = overhead_rate(1024),
            l = plan.latency_s,
            w = plan.warm_s,
            s = plan.saturation_s
        ),
        rows,
    };
    write_json(&out.join("overhead.json"), &results)?;
    write(&out.join("overhead.csv"), &report::overhead_csv(&results))?;
    println!("{}", report::overhead_section(&results));
    finish(c, &out)
}

/// One compared variant running: its Envoy, the picker (ext_proc variants) and
/// the snapshot pusher (variants with a pool).
struct Variant {
    envoy: Envoy,
    picker: Option<ChildGuard>,
    pusher: Option<Pusher>,
}

/// Starts `variant` over a pool of `n` endpoints (`live` first; plain and the
/// floor route over `live` alone). `counted`: Envoy and the picker run under
/// callgrind and one snapshot is pushed, fresh for the whole count (see
/// `instructions`), instead of one every 300 ms.
fn start_variant(
    variant: &str,
    n: usize,
    live: &[String],
    tmp: &Path,
    counted: bool,
) -> Res<Variant> {
    let (gw, control, admin) = ports()?;
    let eps = pool_endpoints(live, n.max(live.len()));
    let mut gateway_config = json!({
        "pools": [{"name": POOL, "endpoints": eps}],
        "default_pool": POOL,
    });
    if counted {
        gateway_config["snapshot_stale_after_ms"] = json!(COUNTED_STALE_AFTER_MS);
    }
    let mut picker: Option<ChildGuard> = None;
    let (yaml, push_url) = match variant {
        "plain" => {
            let live_pool = json!({"pools": [{"name": POOL, "endpoints": live}]});
            let rr = Routing::EnvoyLb(LbPolicy::RoundRobin);
            (envoy_yaml(rr, live_pool, gw, control, admin), None)
        }
        "floor" => (floor_envoy_yaml(live, gw, control, admin), None),
        "filter" => (
            envoy_yaml(
                Routing::WasmFilter,
                gateway_config.clone(),
                gw,
                control,
                admin,
            ),
            Some(format!("http://127.0.0.1:{control}/v1/snapshot")),
        ),
        _ => {
            // The endpoint-picker either way; Envoy's ext_proc settings pick the
            // body mode: BUFFERED (headers and the whole body, the destination
            // header back; responses skipped) or the Endpoint Picker Protocol's
            // FULL_DUPLEX_STREAMED (bodies streamed both ways, responses too).
            let grpc = process::free_port().map_err(|e| e.to_string())?;
            picker = Some(start_picker(&gateway_config, grpc, control, tmp, counted)?);
            let grpc = format!("127.0.0.1:{grpc}");
            let routing = if variant == "ext_proc_fd" {
                Routing::EndpointPicker {
                    grpc,
                    lb: PickerLb::OriginalDst,
                    failure_mode: FailureMode::FailClose,
                }
            } else {
                Routing::ExtProc { grpc }
            };
            (
                envoy_yaml(routing, gateway_config.clone(), gw, control, admin),
                Some(format!("http://127.0.0.1:{control}/v1/snapshot")),
            )
        }
    };
    let envoy = start_envoy(&yaml, admin, gw, tmp, counted)?;
    let nlive = live.len();
    let pusher = match push_url {
        Some(u) if counted => {
            Pusher::once(&u, overhead_snapshot(&eps, nlive, now_ms(), 1))?;
            None
        }
        Some(u) => Some(Pusher::start(u, move |now, seq| {
            overhead_snapshot(&eps, nlive, now, seq)
        })?),
        None => None,
    };
    Ok(Variant {
        envoy,
        picker,
        pusher,
    })
}

/// The counted runs' `snapshot_stale_after_ms`: one snapshot pushed before the
/// count stays fresh through it (pushes during the count would be counted, and
/// how many fall in it depends on valgrind's speed).
const COUNTED_STALE_AFTER_MS: u64 = 600_000;

/// The `endpoint-picker` with the plugin configuration only (static members, no
/// discovery), plain-text gRPC, snapshots pushed to its ingest listener as to the
/// filter's control listener; no health or metrics listeners.
/// `counted`: under callgrind, its dumps in `dir`.
fn start_picker(
    gateway_config: &Value,
    grpc: u16,
    ingest: u16,
    dir: &Path,
    counted: bool,
) -> Res<ChildGuard> {
    let cfg = dir.join(format!("picker-{grpc}.json"));
    std::fs::write(&cfg, json!({"plugin": gateway_config}).to_string())
        .map_err(|e| e.to_string())?;
    let args: Vec<String> = [
        "--grpc",
        &format!("127.0.0.1:{grpc}"),
        "--ingest",
        &format!("127.0.0.1:{ingest}"),
        "--grpc-health",
        "",
        "--metrics",
        "",
        "--insecure",
        "--config",
        &cfg.to_string_lossy(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let program = sibling("endpoint-picker")?;
    let mut cmd = if counted {
        callgrind::wrap(&program, &args, dir)
    } else {
        let mut cmd = Command::new(program);
        cmd.args(&args);
        cmd
    };
    cmd.env("IGW_INGEST_TOKEN", TOKEN).env("RUST_LOG", "warn");
    let mut g = ChildGuard::spawn(
        "endpoint-picker",
        &mut cmd,
        Some(&dir.join(format!("picker-{grpc}.log"))),
    )
    .map_err(|e| e.to_string())?;
    for port in [grpc, ingest] {
        let addr = format!("127.0.0.1:{port}").parse().map_err(|_| "addr")?;
        process::wait_for_tcp(addr, Duration::from_secs(if counted { 120 } else { 10 }))
            .map_err(|e| format!("{e}; picker log: {}", g.log_tail(2000)))?;
    }
    g.check_running().map_err(|e| e.to_string())?;
    Ok(g)
}

// ---------------------------------------------------------------- instructions

/// Connections of the counted runs' closed loop (as in the overhead suite's
/// saturation runs: every worker has other requests open, the regime the
/// filter's batching is made for).
const COUNTED_CONNECTIONS: u32 = 32;

/// Requests counted per point, after warm-up: at 1 KB counts of the same
/// binaries agree within about 0.3 %; larger bodies are slow under valgrind.
fn counted_requests(body_bytes: usize) -> u64 {
    match body_bytes {
        b if b >= 1 << 20 => 20,
        b if b >= 64 << 10 => 100,
        _ => 300,
    }
}

/// The instructions suite: each overhead variant's Envoy (and picker) under
/// callgrind, instructions per request counted over a fixed number of requests
/// ([`COUNTED_CONNECTIONS`], closed loop) after a warm-up.
fn instructions(c: &Common) -> Res<()> {
    if !callgrind::available() {
        return Err("valgrind and callgrind_control are needed (apt install valgrind)".into());
    }
    let (bodies, endpoints) = if c.quick {
        (vec![1024], vec![10])
    } else {
        (vec![1024, 16 * 1024, 256 * 1024], vec![10, 100, 1000])
    };
    let bodies = if c.bodies.is_empty() {
        bodies
    } else {
        c.bodies.clone()
    };
    let endpoints = if c.endpoints.is_empty() {
        endpoints
    } else {
        c.endpoints.clone()
    };
    let wanted = |v: &str| c.variants.is_empty() || c.variants.iter().any(|w| w == v);
    let out = out_dir(c)?;
    let (mut meta, started) = start_meta("instructions", c);
    let tmp = tempdir("instructions")?;
    let (_sims, live) = overhead_sims(&tmp)?;
    let bodies = body_files(&bodies, &tmp)?;
    let mut configs = overhead_configs(&endpoints);
    configs.retain(|(v, _)| wanted(v));
    let mut rows = Vec::new();
    for (variant, n) in configs {
        let v = start_variant(variant, n, &live, &tmp, true)?;
        let url = format!("{}/v1/completions", v.envoy.url);
        let counter = |g: &ChildGuard| {
            g.id()
                .map(|pid| callgrind::Counter::new(pid, &tmp))
                .ok_or_else(|| format!("{} is not running", g.name()))
        };
        let envoy = counter(&v.envoy.guard)?;
        let picker = v.picker.as_ref().map(counter).transpose()?;
        let counters: Vec<&callgrind::Counter> =
            std::iter::once(&envoy).chain(picker.as_ref()).collect();
        for (size, file) in &bodies {
            let requests = counted_requests(*size);
            oha_n(&url, file, requests / 2, COUNTED_CONNECTIONS)?;
            for k in &counters {
                k.instrument(true)?;
            }
            // Valgrind translates the code again once instrumented.
            oha_n(&url, file, 20, COUNTED_CONNECTIONS)?;
            for k in &counters {
                k.zero()?;
            }
            let run = oha_n(&url, file, requests, COUNTED_CONNECTIONS)?;
            let envoy_ir = envoy.dump()?;
            let picker_ir = picker.as_ref().map(|p| p.dump()).transpose()?;
            for k in &counters {
                k.instrument(false)?;
            }
            if run.ok != requests {
                return Err(format!(
                    "{variant} n={n} body={size}: {} of {requests} requests answered 2xx (see {})",
                    run.ok,
                    tmp.display()
                ));
            }
            let row = InstructionRow {
                variant: variant.into(),
                endpoints: n,
                body_bytes: *size,
                requests,
                envoy: envoy_ir / requests,
                picker: picker_ir.unwrap_or(0) / requests,
            };
            println!(
                "{variant:11} n={n:4} body={size:6}: envoy {} picker {} instructions per request",
                report::thousands(row.envoy),
                report::thousands(row.picker)
            );
            rows.push(row);
        }
    }
    finish_meta(&mut meta, started);
    let results = InstructionResults {
        meta,
        method: format!(
            "Machine instructions executed per request ({}, callgrind `Ir`), counted over a fixed number of requests after a warm-up (300 per point below 64 KB, 100 up to 1 MiB; `oha -n N -c 32`, closed loop: every worker has other requests open), Envoy with `--concurrency 2`, the picker for the ext_proc variants. One snapshot of the pool is pushed before the count and stays fresh through it (`snapshot_stale_after_ms` {COUNTED_STALE_AFTER_MS}), so no push is counted. Work bound to the clock (the filter's 100 ms tick, its 10 ms snapshot-version check and prefix-slot reuse) falls on fewer requests than at full speed, valgrind being about 50 times slower: it is counted high. A count is not a time (a cache miss costs no instruction): this table complements the overhead suite's CPU per request, it does not replace it.",
            valgrind_version()
        ),
        rows,
    };
    write_json(&out.join("instructions.json"), &results)?;
    println!("{}", callgrind::section(&results));
    finish(c, &out)
}

fn valgrind_version() -> String {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------- scheduler

/// Calls `f` repeatedly for about `budget` (at most 200 000 times); µs per call.
fn time_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u32;
    while n < 200_000 && (n < 10 || start.elapsed() < budget) {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn scheduler(c: &Common) -> Res<()> {
    use inference_gateway::bench::report::SchedulerRow;
    use inference_gateway::config::Config;
    use inference_gateway::extproc::Picker;
    use inference_gateway::openai::ApiKind;
    use inference_gateway::scheduling::{self, Candidate, Request, Scheduling};
    let out = out_dir(c)?;
    let (mut meta, started) = start_meta("scheduler", c);
    let budget = Duration::from_millis(if c.quick { 100 } else { 1000 });
    let live = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
    let body = body_of(1024);
    let mut rows = Vec::new();
    for n in [10usize, 100, 1000] {
        let eps = pool_endpoints(&live, n);
        let now = now_ms();
        let snap = overhead_snapshot(&eps, live.len(), now, 1);
        let by_address: std::collections::HashMap<&str, _> = snap
            .pools
            .iter()
            .flat_map(|p| &p.endpoints)
            .map(|m| (m.address.as_str(), m))
            .collect();
        let sched = Scheduling::default();
        let profile = &sched.profiles[sched.default_profile];
        let cands: Vec<Candidate<'_>> = eps
            .iter()
            .map(|e| Candidate {
                endpoint: e,
                in_flight: 0,
                metrics: by_address.get(e.as_str()).copied(),
                fresh: true,
                prefix_blocks: 0,
            })
            .collect();
        let req = Request {
            model: "bench",
            priority: 0,
            adapter: false,
            prompt_blocks: 4,
        };
        let schedule_us = time_per_call(budget, || {
            std::hint::black_box(scheduling::schedule(&sched, profile, &req, &cands, 7));
        });
        let cfg = Config::from_json(
            json!({"pools": [{"name": POOL, "endpoints": eps}], "default_pool": POOL})
                .to_string()
                .as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        let picker = Picker::new(cfg);
        picker
            .ingest(&overhead_snapshot(&eps, live.len(), now, 1).encode())
            .map_err(|e| e.message)?;
        let route_us = time_per_call(budget, || {
            if let Ok(r) = picker.route(ApiKind::Completions, body.as_bytes(), None, now, || 7) {
                if let Some(h) = r.holding {
                    picker.release(&h);
                }
            }
        });
        println!(
            "n={n:5}: schedule {schedule_us:8.1} µs, picker route (1 KB body) {route_us:8.1} µs"
        );
        rows.push(SchedulerRow {
            endpoints: n,
            schedule_us,
            picker_route_us: route_us,
        });
    }
    finish_meta(&mut meta, started);
    let results = inference_gateway::bench::report::SchedulerResults { meta, rows };
    write_json(&out.join("scheduler.json"), &results)?;
    finish(c, &out)
}

// ---------------------------------------------------------------- routing

const SLO_TTFT_MS: f64 = 1000.0;
const REPLICAS: usize = 8;
/// The simulator's time scale for this suite: 40 ms per decode step (prefill
/// 0.4 ms/token, +0.8 ms per extra sequence, LoRA load 200 ms: the defaults'
/// ratios), 8 seats and 16k tokens of KV per replica.
const PER_TOKEN_MS: f64 = 40.0;
const MAX_NUM_SEQS: u32 = 8;
const GPU_BLOCKS: u32 = 1024;
const MAX_LORAS: u32 = 2;

fn costs() -> Costs {
    Costs {
        per_token_ms: PER_TOKEN_MS,
        prefill_ms_per_token: PER_TOKEN_MS * 0.01,
        decode_ms_per_seq: PER_TOKEN_MS * 0.02,
        max_num_seqs: f64::from(MAX_NUM_SEQS),
        replicas: REPLICAS as f64,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    RoundRobin,
    LeastRequest,
    Default,
    NoPrefix,
    NoLora,
    NoInFlight,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "envoy-round-robin",
            Policy::LeastRequest => "envoy-least-request",
            Policy::Default => "gateway-default",
            Policy::NoPrefix => "gateway-no-prefix",
            Policy::NoLora => "gateway-no-lora",
            Policy::NoInFlight => "gateway-no-in-flight",
        }
    }

    /// The filter's `scheduling` section: the default profile, or the default
    /// with one scorer removed (configured as a replacement `default` profile).
    fn scheduling(self) -> Option<Value> {
        let all = [
            ("queue", 2),
            ("kv_cache", 2),
            ("prefix_cache", 3),
            ("lora_affinity", 2),
            ("in_flight", 2),
        ];
        let without = match self {
            Policy::RoundRobin | Policy::LeastRequest => return None,
            Policy::Default => return Some(json!({})),
            Policy::NoPrefix => "prefix_cache",
            Policy::NoLora => "lora_affinity",
            Policy::NoInFlight => "in_flight",
        };
        let scorers: Vec<Value> = all
            .iter()
            .filter(|(k, _)| *k != without)
            .map(|(k, w)| json!({"type": k, "weight": w}))
            .collect();
        Some(json!({"profiles": [{"name": "default", "scorers": scorers}]}))
    }
}

struct Point {
    kind: Kind,
    policy: Policy,
    load: f64,
    rep: u32,
}

fn routing_plan(quick: bool, reps: Option<u32>) -> (Vec<Point>, f64, f64) {
    use Policy::*;
    let mut pts = Vec::new();
    if quick {
        for policy in [RoundRobin, Default] {
            pts.push(Point {
                kind: Kind::SharedPrefix,
                policy,
                load: 0.8,
                rep: 0,
            });
        }
        return (pts, 6.0, 1.0);
    }
    let reps = reps.unwrap_or(3);
    for kind in Kind::ALL {
        for load in [0.4, 0.8, 1.2] {
            let target = load == 0.8 && matches!(kind, Kind::SharedPrefix | Kind::LoraMix);
            let n = if target { reps } else { 1 };
            for rep in 0..n {
                for policy in [RoundRobin, LeastRequest, Default] {
                    pts.push(Point {
                        kind,
                        policy,
                        load,
                        rep,
                    });
                }
            }
        }
        let ablation = match kind {
            Kind::SharedPrefix => NoPrefix,
            Kind::LoraMix => NoLora,
            Kind::Sharegpt | Kind::Bursty => NoInFlight,
        };
        pts.push(Point {
            kind,
            policy: ablation,
            load: 0.8,
            rep: 0,
        });
    }
    // 10 s of warm-up: at load 0.8 on shared-prefix that is ~75 requests over 16
    // system prompts, so the measured window sees the steady state (each prompt
    // already prefilled somewhere), not the one-off cold prefills. With 3 s, those
    // were ~18% of a 12 s window and set the p90.
    (pts, 25.0, 10.0)
}

fn sim_args(spec: &Spec, seed: u64) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--per-token-ms".into(),
        format!("{PER_TOKEN_MS}"),
        "--max-num-seqs".into(),
        MAX_NUM_SEQS.to_string(),
        "--num-gpu-blocks".into(),
        GPU_BLOCKS.to_string(),
        "--models".into(),
        spec.base_model.clone(),
        "--seed".into(),
        seed.to_string(),
    ];
    if spec.kind == Kind::LoraMix {
        a.push("--lora-adapters".into());
        a.push(spec.adapter_names().join(","));
        a.push("--max-loras".into());
        a.push(MAX_LORAS.to_string());
    }
    a
}

fn routing(c: &Common) -> Res<()> {
    let (points, duration_s, warm_s) = routing_plan(c.quick, c.reps);
    let out = out_dir(c)?;
    let (mut meta, started) = start_meta("routing", c);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let spec = Spec::new(p.kind);
        let capacity = workload::estimated_capacity(&spec, &costs());
        let rate = (capacity * p.load * 10.0).round() / 10.0;
        let seed = 1000 + u64::from(p.rep);
        let plan = workload::generate(&spec, rate, duration_s, seed);
        let tmp = tempdir("routing")?;
        let stack = RoutingStack::start(&spec, p.policy, &tmp)?;
        let rec = rt.block_on(run_load(&stack.url, plan, duration_s));
        drop(stack);
        let point = summarize(p, rate, &rec, duration_s, warm_s);
        println!(
            "[{}/{}] {:14} {:21} load {:.1} ({:.1} req/s) rep {}: TTFT p50 {:.0} p90 {:.0} p99 {:.0} ms, {:.0} tok/s, goodput {:.2}/s, 429 {}, failed {}",
            i + 1,
            points.len(),
            p.kind.name(),
            p.policy.name(),
            p.load,
            rate,
            p.rep,
            point.ttft_ms.p50,
            point.ttft_ms.p90,
            point.ttft_ms.p99,
            point.output_tokens_per_s,
            point.goodput_rps,
            point.shed_429,
            point.failed
        );
        results.push(point);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    finish_meta(&mut meta, started);
    let c0 = costs();
    let caps: Vec<String> = Kind::ALL
        .iter()
        .map(|k| {
            format!(
                "{} {:.1} req/s",
                k.name(),
                workload::estimated_capacity(&Spec::new(*k), &c0)
            )
        })
        .collect();
    let results = RoutingResults {
        meta,
        slo_ttft_ms: SLO_TTFT_MS,
        setup: vec![
            format!(
                "{REPLICAS} simulator replicas: `--per-token-ms {PER_TOKEN_MS} --max-num-seqs {MAX_NUM_SEQS} --num-gpu-blocks {GPU_BLOCKS}` (16-token blocks: 16k tokens of KV each); LoRA mix adds `--lora-adapters lora-00..lora-15 --max-loras {MAX_LORAS}` (load 200 ms)"
            ),
            format!("arrivals for {duration_s} s per point; requests sent in the first {warm_s} s are warm-up and not counted; requests still running 60 s after the last arrival count as failed"),
            format!("load = offered rate as a fraction of the estimated round-robin capacity (every prompt token prefilled, full batches): {}", caps.join(", ")),
            "the gateway policies run Envoy + the filter + the metrics-collector (50 ms scrapes); Envoy's round robin and least request are plain STATIC clusters over the 8 replicas".into(),
        ],
        points: results,
    };
    write_json(&out.join("routing.json"), &results)?;
    write(&out.join("routing.csv"), &report::routing_csv(&results))?;
    println!("{}", report::routing_section(&results));
    finish(c, &out)
}

struct RoutingStack {
    _collector: Option<ChildGuard>,
    _envoy: Envoy,
    _sims: Vec<Sim>,
    url: String,
}

impl RoutingStack {
    fn start(spec: &Spec, policy: Policy, dir: &Path) -> Res<RoutingStack> {
        let mut sims = Vec::new();
        for i in 0..REPLICAS {
            sims.push(start_sim(
                &format!("sim-{i}"),
                &sim_args(spec, i as u64),
                dir,
            )?);
        }
        let eps: Vec<String> = sims.iter().map(Sim::endpoint).collect();
        let (gw, control, admin) = ports()?;
        let (yaml, collector) = match policy.scheduling() {
            None => {
                let lb = if policy == Policy::RoundRobin {
                    LbPolicy::RoundRobin
                } else {
                    LbPolicy::LeastRequest
                };
                let pool = json!({"pools": [{"name": POOL, "endpoints": eps}]});
                (
                    envoy_yaml(Routing::EnvoyLb(lb), pool, gw, control, admin),
                    false,
                )
            }
            Some(sched) => {
                let mut models = vec![json!({"name": spec.base_model, "pool": POOL})];
                if spec.kind == Kind::LoraMix {
                    for a in spec.adapter_names() {
                        models.push(json!({"name": a, "pool": POOL, "adapter": true}));
                    }
                }
                let cfg = json!({
                    "pools": [{"name": POOL, "endpoints": eps}],
                    "models": models,
                    "scheduling": sched,
                });
                (
                    envoy_yaml(Routing::WasmFilter, cfg, gw, control, admin),
                    true,
                )
            }
        };
        let envoy = start_envoy(&yaml, admin, gw, dir, false)?;
        let collector = if collector {
            Some(start_collector(&eps, control, dir)?)
        } else {
            None
        };
        Ok(RoutingStack {
            url: format!("{}/v1/completions", envoy.url),
            _collector: collector,
            _envoy: envoy,
            _sims: sims,
        })
    }
}

fn start_collector(eps: &[String], control: u16, dir: &Path) -> Res<ChildGuard> {
    let port = process::free_port().map_err(|e| e.to_string())?;
    let mut yaml = format!(
        "listen: \"127.0.0.1:{port}\"\nscrape_interval_ms: 50\nscrape_timeout_ms: 500\npush_targets: [\"127.0.0.1:{control}\"]\npools:\n  - name: {POOL}\n    endpoints:\n"
    );
    for e in eps {
        yaml.push_str(&format!("      - \"{e}\"\n"));
    }
    let path = dir.join("collector.yaml");
    std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(sibling("metrics-collector")?);
    cmd.arg("--config")
        .arg(&path)
        .args(["--token-env", "IGW_BENCH_TOKEN"])
        .env("IGW_BENCH_TOKEN", TOKEN)
        .env("RUST_LOG", "warn");
    let mut g = ChildGuard::spawn("collector", &mut cmd, Some(&dir.join("collector.log")))
        .map_err(|e| e.to_string())?;
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    process::wait_until("collector", Duration::from_secs(20), || {
        if let Err(e) = g.check_running() {
            return Check::Failed(e.to_string());
        }
        match process::http_get(&healthz) {
            Ok((200, _)) => Check::Ready(()),
            other => Check::NotYet(format!("{other:?}")),
        }
    })
    .map_err(|e| e.to_string())?;
    // A few scrape rounds, so the filter starts with fresh metrics.
    std::thread::sleep(Duration::from_millis(500));
    Ok(g)
}

/// What happened to one request.
#[derive(Debug, Clone, Default)]
struct Outcome {
    at_ms: f64,
    status: u16,
    ttft_ms: Option<f64>,
    e2e_ms: Option<f64>,
    tokens: u64,
}

/// Open loop: each request is sent at its planned time whatever the others are
/// doing (Poisson arrivals, no coordinated omission), streamed to time the first
/// token. Bounded: the plan is finite and each request has a deadline.
async fn run_load(url: &str, plan: Vec<Planned>, duration_s: f64) -> Vec<Outcome> {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
    {
        Ok(c) => c,
        Err(_) => return vec![],
    };
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs_f64(duration_s + 60.0);
    let tasks = plan.into_iter().map(|p| {
        let client = client.clone();
        let url = url.to_string();
        tokio::spawn(async move {
            let send_at = start + Duration::from_secs_f64(p.at_ms / 1000.0);
            tokio::time::sleep_until(send_at).await;
            let body = json!({
                "model": p.model, "prompt": p.prompt, "max_tokens": p.max_tokens, "stream": true,
            })
            .to_string();
            let mut o = Outcome {
                at_ms: p.at_ms,
                ..Default::default()
            };
            let fut = async {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                o.status = resp.status().as_u16();
                let mut resp = resp;
                let mut carry = String::new();
                while let Some(chunk) = resp.chunk().await? {
                    let now = send_at.elapsed().as_secs_f64() * 1000.0;
                    carry.push_str(&String::from_utf8_lossy(&chunk));
                    // Count SSE events that carry generated text.
                    while let Some(i) = carry.find("\n\n") {
                        let event: String = carry.drain(..i + 2).collect();
                        if event.contains("\"text\"") && !event.contains("[DONE]") {
                            o.tokens += 1;
                            o.ttft_ms.get_or_insert(now);
                        }
                    }
                }
                o.e2e_ms = Some(send_at.elapsed().as_secs_f64() * 1000.0);
                Ok::<(), reqwest::Error>(())
            };
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(Ok(())) => {}
                _ => o.e2e_ms = None,
            }
            o
        })
    });
    join_all(tasks)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect()
}

fn summarize(p: &Point, rate: f64, rec: &[Outcome], duration_s: f64, warm_s: f64) -> RoutingPoint {
    let measured: Vec<&Outcome> = rec.iter().filter(|o| o.at_ms >= warm_s * 1000.0).collect();
    let ok: Vec<&&Outcome> = measured
        .iter()
        .filter(|o| o.status == 200 && o.e2e_ms.is_some() && o.ttft_ms.is_some())
        .collect();
    let window = duration_s - warm_s;
    let good = ok
        .iter()
        .filter(|o| o.ttft_ms.unwrap_or(f64::INFINITY) < SLO_TTFT_MS)
        .count();
    let shed = measured.iter().filter(|o| o.status == 429).count() as u64;
    RoutingPoint {
        workload: p.kind.name().into(),
        policy: p.policy.name().into(),
        load: p.load,
        rate_rps: rate,
        rep: p.rep,
        measured: measured.len() as u64,
        ok: ok.len() as u64,
        shed_429: shed,
        failed: measured.len() as u64 - ok.len() as u64 - shed,
        ttft_ms: Quantiles::of(ok.iter().filter_map(|o| o.ttft_ms).collect()),
        e2e_ms: Quantiles::of(ok.iter().filter_map(|o| o.e2e_ms).collect()),
        // Tokens of measured requests over the time from the first measured send
        // to the last measured finish.
        output_tokens_per_s: {
            let tokens: u64 = ok.iter().map(|o| o.tokens).sum();
            let end = ok
                .iter()
                .map(|o| o.at_ms + o.e2e_ms.unwrap_or(0.0))
                .fold(0.0, f64::max);
            let span = (end / 1000.0 - warm_s).max(window);
            tokens as f64 / span
        },
        goodput_rps: good as f64 / window,
    }
}

// ---------------------------------------------------------------- output

// ------------------------------------------------------- safety-stream suite

/// Model pace and safety latency of the safety-stream suite.
const SAFETY_PER_TOKEN_MS: u64 = 20;
const SAFETY_TTFT_MS: u64 = 50;
const SAFETY_DELAY_MS: u64 = 40;

/// A counter from Envoy's admin `/stats` (0 when absent). The filter's own
/// counters are listed there as `wasmcustom.<name>`.
fn envoy_counter(admin: u16, name: &str) -> u64 {
    let url = format!("http://127.0.0.1:{admin}/stats?filter={name}");
    process::http_get(&url)
        .ok()
        .and_then(|(_, body)| {
            body.lines().find_map(|l| {
                let (stat, value) = l.split_once(": ")?;
                (stat == name || stat.strip_prefix("wasmcustom.") == Some(name))
                    .then(|| value.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

fn safety_stream(c: &Common) -> Res<()> {
    use inference_gateway::bench::safety_stream::{self as ss, SafetyStreamResults};
    let (mut meta, started) = start_meta("safety-stream", c);
    let out = out_dir(c)?;
    let dir = tempdir("igw-bench-safety-stream")?;
    let requests = if c.quick { 4 } else { 60 };
    let max_tokens = 150;
    let sim = start_sim(
        "sim-0",
        &[
            "--per-token-ms".into(),
            SAFETY_PER_TOKEN_MS.to_string(),
            "--ttft-ms".into(),
            SAFETY_TTFT_MS.to_string(),
        ],
        &dir,
    )?;
    let (safety_port, _safety) = start_server(
        "safety-sim",
        "safety-sim",
        &[
            "--mode".into(),
            "slow".into(),
            "--delay-ms".into(),
            SAFETY_DELAY_MS.to_string(),
        ],
        &dir,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = reqwest::Client::new();
    let mut variants = Vec::new();
    for variant in ["none", "detect", "hold"] {
        let (gw, control, admin) = ports()?;
        let mut gateway_config = envoy_config::with_demo_safety(json!({
            "pools": [{"name": POOL, "endpoints": [sim.endpoint()]}],
            "models": [{"name": "chat", "pool": POOL}],
        }));
        let safety = &mut gateway_config["safety"];
        safety["timeout_ms"] = json!(2000);
        match variant {
            "none" => {
                if let Some(d) = safety["default"].as_object_mut() {
                    d.remove("model_response_template_id");
                }
            }
            mode => safety["stream_mode"] = json!(mode),
        }
        let settings = EnvoySettings {
            gateway_port: gw,
            control_port: control,
            admin_port: admin,
            wasm_path: env!("GATEWAY_WASM").into(),
            gateway_config,
            control_config: json!({"role": "control", "ingest": {"token": TOKEN}}),
            access_log: false,
            safety_address: Some(format!("127.0.0.1:{safety_port}")),
            log_level: "warning".into(),
            concurrency: Some(2),
            routing: Routing::WasmFilter,
            ..EnvoySettings::demo()
        };
        let envoy = start_envoy(&envoy_config::render(&settings), admin, gw, &dir, false)?;
        let url = format!("{}/v1/chat/completions", envoy.url);
        let body = json!({"model": "chat", "stream": true, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}]});
        let timeout = Duration::from_secs(30);
        // Warm-up: the VM, the connections.
        for _ in 0..2 {
            let _ = rt.block_on(ss::measure_stream(&client, &url, &body, timeout));
        }
        let checks_before = envoy_counter(
            admin,
            "inference_gateway_safety_checks_total.check.response",
        );
        let mut timings = Vec::new();
        let mut failed = 0;
        for _ in 0..requests {
            match rt.block_on(ss::measure_stream(&client, &url, &body, timeout)) {
                Ok(t) if t.completed => timings.push(t),
                Ok(_) | Err(_) => failed += 1,
            }
        }
        let checks = envoy_counter(
            admin,
            "inference_gateway_safety_checks_total.check.response",
        ) - checks_before;
        let r = ss::summarize(variant, &timings, failed, checks);
        println!(
            "{variant}: TTFT p50 {:.0} ms, gap p99 {:.0} ms, {:.1} checks/request, {failed} failed",
            r.ttft_p50_ms, r.gap_p99_ms, r.response_checks_per_request
        );
        variants.push(r);
        drop(envoy);
    }
    finish_meta(&mut meta, started);
    let results = SafetyStreamResults {
        meta,
        setup: format!(
            "One simulated replica streaming {max_tokens} tokens at {SAFETY_PER_TOKEN_MS} ms per token \
             ({SAFETY_TTFT_MS} ms to the first), the safety simulator answering every call after \
             {SAFETY_DELAY_MS} ms, the prompt screened in every variant; {requests} sequential \
             streamed chat completions per variant after 2 of warm-up, timed at the client. Defaults: \
             windows of 200 characters or 250 ms, 64 bytes of holdback, 256 of overlap."
        ),
        variants,
    };
    let failed: usize = results.variants.iter().map(|v| v.failed).sum();
    write_json(&out.join("safety-stream.json"), &results)?;
    finish(c, &out)?;
    if failed > 0 {
        return Err(format!("{failed} streamed requests failed"));
    }
    Ok(())
}

fn tempdir(prefix: &str) -> Res<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "igw-bench-{prefix}-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    Ok(d)
}

fn write(path: &Path, text: &str) -> Res<()> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Res<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    write(path, &(text + "\n"))
}

/// Plots and BENCHMARKS.md: into the repository for full runs, into the output
/// directory for quick ones.
fn finish(c: &Common, out: &Path) -> Res<()> {
    let md = if c.quick || c.partial() {
        out.join("BENCHMARKS.md")
    } else {
        repo().join("BENCHMARKS.md")
    };
    render_all(out, &md)
}

fn render_all(dir: &Path, md: &Path) -> Res<()> {
    let read = |name: &str| std::fs::read(dir.join(name)).ok();
    let overhead: Option<OverheadResults> =
        read("overhead.json").and_then(|b| serde_json::from_slice(&b).ok());
    let routing: Option<RoutingResults> =
        read("routing.json").and_then(|b| serde_json::from_slice(&b).ok());
    let scheduler: Option<inference_gateway::bench::report::SchedulerResults> =
        read("scheduler.json").and_then(|b| serde_json::from_slice(&b).ok());
    let plots = plot(dir);
    let text = inference_gateway::bench::report::document(
        overhead.as_ref(),
        scheduler.as_ref(),
        routing.as_ref(),
        &plots,
        dir,
        md,
    );
    // The safety-stream suite's section, at the end.
    let text = match read("safety-stream.json")
        .and_then(|b| serde_json::from_slice::<inference_gateway::bench::safety_stream::SafetyStreamResults>(&b).ok())
    {
        Some(r) => format!(
            "{text}\n## Safety: hold and release\n\nWhat screening streamed responses costs a client \
             (`bench safety-stream`; the modes are explained in [docs/safety.md](docs/safety.md#streamed-responses-hold-or-detect)).\n\n{}",
            inference_gateway::bench::safety_stream::section(&r)
        ),
        None => text,
    };
    // The instructions suite's counts, after the overhead suite's times.
    let text = match read("instructions.json")
        .and_then(|b| serde_json::from_slice::<InstructionResults>(&b).ok())
    {
        Some(r) => text.replacen(
            "### The scheduler alone",
            &format!(
                "### Instructions per request (callgrind)\n\nThe same variants counted instead of timed \
                 (`bench instructions`, [src/bench/callgrind.rs](src/bench/callgrind.rs)).\n\n{}### The scheduler alone",
                callgrind::section(&r)
            ),
            1,
        ),
        None => text,
    };
    // Hand-written findings (benches/results/findings.md), placed after the targets.
    let text = match std::fs::read_to_string(dir.join("findings.md")) {
        Ok(notes) => text.replacen(
            "## Overhead:",
            &format!("## Findings\n\n{}\n## Overhead:", notes.trim_end()),
            1,
        ),
        Err(_) => text,
    };
    write(md, &text)?;
    println!("wrote {}", md.display());
    Ok(())
}

/// Runs benches/plot.py (matplotlib) over the results; returns the PNGs made.
/// Plots are optional: without matplotlib the tables are still written.
fn plot(dir: &Path) -> Vec<String> {
    let python = repo().join(".venv/bin/python");
    let python = if python.is_file() {
        python
    } else {
        PathBuf::from("python3")
    };
    let out = Command::new(&python)
        .arg(repo().join("benches/plot.py"))
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.ends_with(".png"))
            .map(str::to_string)
            .collect(),
        Ok(o) => {
            eprintln!(
                "plots skipped: {} (install matplotlib: .venv/bin/pip install matplotlib)",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            vec![]
        }
        Err(e) => {
            eprintln!("plots skipped: {e}");
            vec![]
        }
    }
}
