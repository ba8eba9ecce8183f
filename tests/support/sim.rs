//! The project's model-server simulator (`src/bin/model-server-sim.rs`) as a child
//! process on a free loopback port. Every response carries `x-model-server-id`;
//! `GET /sim/requests` lists what it received, `DELETE /sim/requests` clears.

use super::deploy::process::{self, ChildGuard};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The response header naming the replica that answered.
pub const SERVER_ID_HEADER: &str = "x-model-server-id";

/// How a simulator behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// `--models`: a comma-separated list, or `*` for any model.
    pub models: String,
    pub per_token_ms: u64,
    pub ttft_ms: u64,
    pub extra_args: Vec<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            models: "*".into(),
            per_token_ms: 0,
            ttft_ms: 0,
            extra_args: Vec::new(),
        }
    }
}

/// The simulator binary cargo built for this test.
pub fn sim_binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_model-server-sim") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "the model-server-sim binary is not part of this build (src/bin/model-server-sim.rs)"
        ),
    }
}

pub struct Sim {
    pub id: String,
    /// The loopback address it listens on (127.0.0.1 unless started with
    /// [`Sim::start_on_host`]).
    pub host: std::net::IpAddr,
    pub port: u16,
    guard: ChildGuard,
}

impl Sim {
    /// Starts replica `id` and waits for its `/health`. Retries on another port if
    /// the chosen one was taken in the meantime.
    pub fn start(id: &str, options: &SimOptions, log_dir: &Path) -> Result<Sim, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let port = process::free_port().map_err(|e| e.to_string())?;
            match Sim::start_on(id, port, options, log_dir) {
                Ok(sim) => return Ok(sim),
                Err(e) => last = e,
            }
        }
        Err(format!("simulator {id} did not start: {last}"))
    }

    /// Starts replica `id` on `port` (e.g. to restart one where it was) and waits
    /// for its `/health`.
    pub fn start_on(
        id: &str,
        port: u16,
        options: &SimOptions,
        log_dir: &Path,
    ) -> Result<Sim, String> {
        Sim::start_on_host(id, [127, 0, 0, 1].into(), port, options, log_dir)
    }

    /// Starts replica `id` on `host:port` (any 127/8 address works on Linux, so
    /// several replicas can share a port, as pods behind one headless Service).
    pub fn start_on_host(
        id: &str,
        host: std::net::IpAddr,
        port: u16,
        options: &SimOptions,
        log_dir: &Path,
    ) -> Result<Sim, String> {
        let mut cmd = Command::new(sim_binary());
        cmd.args([
            "--host",
            &host.to_string(),
            "--port",
            &port.to_string(),
            "--id",
            id,
        ])
        .args(["--models", &options.models])
        .args(["--per-token-ms", &options.per_token_ms.to_string()])
        .args(["--ttft-ms", &options.ttft_ms.to_string()])
        .args(&options.extra_args);
        let log = log_dir.join(format!("sim-{id}.log"));
        let mut guard = ChildGuard::spawn(&format!("sim {id}"), &mut cmd, Some(&log))
            .map_err(|e| e.to_string())?;
        let health = format!("http://{}/health", std::net::SocketAddr::new(host, port));
        process::wait_until(&format!("sim {id}"), Duration::from_secs(30), || {
            if let Err(e) = guard.check_running() {
                return process::Check::Failed(e.to_string());
            }
            match process::http_get(&health) {
                Ok((200, _)) => process::Check::Ready(()),
                Ok((s, b)) => process::Check::NotYet(format!("{s} {b}")),
                Err(e) => process::Check::NotYet(e.to_string()),
            }
        })
        .map_err(|e| e.to_string())?;
        Ok(Sim {
            id: id.to_string(),
            host,
            port,
            guard,
        })
    }

    /// `host:port`, as in the pool's endpoints.
    pub fn endpoint(&self) -> String {
        std::net::SocketAddr::new(self.host, self.port).to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.endpoint())
    }

    /// What the simulator received: `[{method, path, headers, body}]`.
    pub async fn requests(&self, client: &reqwest::Client) -> Vec<Value> {
        let resp = client
            .get(self.url("/sim/requests"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /sim/requests on {}: {e}", self.id));
        let v: Value = resp.json().await.expect("/sim/requests is JSON");
        v.as_array()
            .cloned()
            .unwrap_or_else(|| panic!("/sim/requests is not an array: {v}"))
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /metrics on {}: {e}", self.id))
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET /metrics body on {}: {e}", self.id))
    }

    /// `GET /sim/state`: running, waiting, KV blocks, LoRA adapters, counters.
    pub async fn state(&self, client: &reqwest::Client) -> Value {
        client
            .get(self.url("/sim/state"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /sim/state on {}: {e}", self.id))
            .json()
            .await
            .expect("/sim/state is JSON")
    }

    pub async fn clear(&self, client: &reqwest::Client) {
        client
            .delete(self.url("/sim/requests"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE /sim/requests on {}: {e}", self.id));
    }

    /// SIGTERM, then SIGKILL after `grace`; the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.guard.stop(grace)
    }

    /// SIGKILL: the replica dies mid-whatever it was doing.
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    pub fn log(&self) -> String {
        self.guard.log_tail(16 * 1024)
    }
}

/// `n` simulators `sim-0`… with the same options, logging into `log_dir`.
pub fn start_n(n: usize, options: &SimOptions, log_dir: &Path) -> Vec<Sim> {
    (0..n)
        .map(|i| {
            Sim::start(&format!("sim-{i}"), options, log_dir).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// The value of one series in Prometheus text, e.g.
/// `sample(text, r#"vllm:num_requests_running{model_name="m"}"#)`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A received request's header, case-insensitively, whether the simulator lists
/// headers as an object or as `[name, value]` pairs.
pub fn header<'a>(request: &'a Value, name: &str) -> Option<&'a str> {
    match request.get("headers")? {
        Value::Object(map) => map
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str()),
        Value::Array(pairs) => pairs.iter().find_map(|p| {
            let p = p.as_array()?;
            (p.first()?.as_str()?.eq_ignore_ascii_case(name)).then(|| p.get(1)?.as_str())?
        }),
        _ => None,
    }
}

/// A received request's body parsed as JSON (the simulator may record it as a
/// string or as JSON already).
pub fn body_json(request: &Value) -> Option<Value> {
    match request.get("body")? {
        Value::String(s) => serde_json::from_str(s).ok(),
        other => Some(other.clone()),
    }
}
