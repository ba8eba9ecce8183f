//! A whole gateway on loopback: N simulator replicas, the demo Envoy bootstrap
//! rendered for free ports and the current `.wasm`, and the real Envoy.

use super::deploy::envoy_config::{self, EnvoySettings};
use super::deploy::process::{self, Check};
use super::envoy::Envoy;
use super::sim::{Sim, SimOptions};
use super::{http_client, wasm_path};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct GatewayOptions {
    pub replicas: usize,
    pub sim: SimOptions,
    /// Adjusts the settings after the demo defaults, ports and endpoints are set.
    pub configure: Box<dyn FnOnce(&mut EnvoySettings) + Send>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            replicas: 3,
            sim: SimOptions::default(),
            configure: Box::new(|_| {}),
        }
    }
}

pub struct Gateway {
    // Fields drop in order: Envoy stops before the simulators, the directory goes last.
    envoy: Envoy,
    pub sims: Vec<Sim>,
    pub settings: EnvoySettings,
    pub client: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts everything (blocking; from async tests use [`Gateway::start`]).
    pub fn start_blocking(options: GatewayOptions) -> Gateway {
        Gateway::start_inner(options, false)
    }

    /// Like [`Gateway::start`], with the gateway filter's configuration served
    /// through ECDS from a file ([`Gateway::apply_gateway_config`] changes it live).
    pub async fn start_ecds(options: GatewayOptions) -> Gateway {
        tokio::task::spawn_blocking(move || Gateway::start_inner(options, true))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    fn start_inner(options: GatewayOptions, ecds: bool) -> Gateway {
        // Choose (and announce) Envoy's runtime first: its errors come before any other.
        super::envoy::runtime();
        let dir = tempfile::Builder::new()
            .prefix("e2e-envoy-")
            .tempdir()
            .expect("temp dir");
        let mut sims = Vec::with_capacity(options.replicas);
        for i in 0..options.replicas {
            let sim = Sim::start(&format!("sim-{i}"), &options.sim, dir.path())
                .unwrap_or_else(|e| panic!("{e}"));
            sims.push(sim);
        }
        let endpoints: Vec<String> = sims.iter().map(Sim::endpoint).collect();
        let port = || process::free_port().expect("free port");
        let mut settings = EnvoySettings {
            gateway_port: port(),
            control_port: port(),
            admin_port: port(),
            wasm_path: wasm_path().to_string_lossy().into_owned(),
            gateway_config: envoy_config::demo_gateway_config(&endpoints),
            concurrency: Some(2),
            // The filter's own log lines and the access log, without the startup banner.
            log_level: "warning".into(),
            component_log_level: "wasm:info".into(),
            log_flush_interval_ms: 100,
            // Tests that screen prompts start a safety simulator and set both.
            safety_address: None,
            ..EnvoySettings::demo()
        };
        (options.configure)(&mut settings);
        if ecds {
            let ecds_dir = dir.path().join("ecds");
            std::fs::create_dir_all(&ecds_dir).expect("ecds dir");
            let path = ecds_dir.join("gateway-filter.json");
            settings.gateway_ecds_path = Some(path.to_string_lossy().into_owned());
            std::fs::write(&path, envoy_config::gateway_ecds(&settings)).expect("write ECDS");
        }
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, envoy_config::render(&settings)).expect("write envoy.yaml");
        let envoy = match Envoy::start(&settings, &config, dir.path()) {
            Ok(e) => e,
            Err(e) => panic!("Envoy did not start: {e}"),
        };
        Gateway {
            envoy,
            sims,
            settings,
            client: http_client(),
            dir,
        }
    }

    /// Starts everything without blocking the test's runtime.
    pub async fn start(options: GatewayOptions) -> Gateway {
        tokio::task::spawn_blocking(move || Gateway::start_blocking(options))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    pub fn runtime(&self) -> &'static str {
        self.envoy.runtime
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.gateway_url())
    }

    pub fn control_url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.control_url())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.admin_url())
    }

    pub fn envoy_logs(&self) -> String {
        self.envoy.logs()
    }

    /// Everything Envoy wrote so far, not only the tail.
    pub fn envoy_all_logs(&self) -> String {
        self.envoy.all_logs()
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// The replica with this id.
    pub fn sim(&self, id: &str) -> &Sim {
        self.sims
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("no replica {id}"))
    }

    pub fn sim_mut(&mut self, id: &str) -> &mut Sim {
        self.sims
            .iter_mut()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("no replica {id}"))
    }

    /// Endpoint (`ip:port`) -> replica id.
    pub fn endpoint_ids(&self) -> BTreeMap<String, String> {
        self.sims
            .iter()
            .map(|s| (s.endpoint(), s.id.clone()))
            .collect()
    }

    /// `GET /debug/state` on the control listener.
    pub async fn debug_state(&self) -> Value {
        let resp = self
            .client
            .get(self.control_url("/debug/state"))
            .send()
            .await
            .expect("GET /debug/state");
        assert_eq!(resp.status(), 200, "GET /debug/state");
        resp.json().await.expect("/debug/state is JSON")
    }

    /// The members (sorted) the stored snapshot lists for `pool`; empty when it
    /// lists no such pool or there is no snapshot.
    pub async fn snapshot_members(&self, pool: &str) -> Vec<String> {
        let state = self.debug_state().await;
        let mut out: Vec<String> = state["snapshot"]["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == pool)
            .flat_map(|p| p["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["address"].as_str().map(str::to_string))
            .collect();
        out.sort();
        out
    }

    /// Polls until the snapshot's members of `pool` are `want`; returns when.
    pub async fn wait_members(
        &self,
        pool: &str,
        want: &[String],
        timeout: Duration,
    ) -> std::time::Instant {
        let mut want = want.to_vec();
        want.sort();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.snapshot_members(pool).await;
            if got == want {
                return std::time::Instant::now();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for members {want:?} of {pool}; the snapshot has {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The in-flight counts by endpoint.
    pub async fn in_flight(&self) -> BTreeMap<String, u64> {
        let state = self.debug_state().await;
        let map = state
            .get("in_flight")
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("no in_flight object in {state}"));
        map.iter()
            .map(|(k, v)| {
                let n = v.as_u64().unwrap_or_else(|| panic!("in_flight[{k}] = {v}"));
                (k.clone(), n)
            })
            .collect()
    }

    /// Polls `/debug/state` until `pred` holds for the in-flight counts; panics with
    /// the last counts after `timeout`.
    pub async fn wait_in_flight(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> BTreeMap<String, u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let counts = self.in_flight().await;
            if pred(&counts) {
                return counts;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; in flight: {counts:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until nothing is in flight on any endpoint.
    pub async fn wait_all_released(&self, timeout: Duration) -> BTreeMap<String, u64> {
        self.wait_in_flight("all in-flight counts back to 0", timeout, |c| {
            c.values().all(|n| *n == 0)
        })
        .await
    }

    /// Is Envoy still up (process or container)?
    pub fn check_envoy_alive(&mut self) -> Result<(), String> {
        self.envoy.check_alive()
    }

    /// Blocking wait for a condition over the gateway's HTTP surface.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> Check<T>,
    ) -> T {
        process::wait_until(what, timeout, check).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Replaces the gateway filter's plugin configuration in the running Envoy
    /// through its ECDS file (written whole, then renamed into place, as Envoy's
    /// file watch expects). Only for a gateway from [`Gateway::start_ecds`].
    pub fn apply_gateway_config(&mut self, config: Value) {
        let path = self
            .settings
            .gateway_ecds_path
            .clone()
            .expect("started with start_ecds");
        self.settings.gateway_config = config;
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, envoy_config::gateway_ecds(&self.settings)).expect("write ECDS");
        std::fs::rename(&tmp, &path).expect("rename ECDS");
    }

    /// The text of Envoy's admin `path` (stats: `/stats/prometheus`, `/stats?…`).
    pub async fn admin_text(&self, path: &str) -> String {
        super::get_text(&self.client, &self.admin_url(path)).await
    }

    /// ECDS reloads of the gateway filter Envoy has done so far.
    pub async fn ecds_reloads(&self) -> u64 {
        let text = self
            .admin_text("/stats?filter=extension_config_discovery")
            .await;
        text.lines()
            .filter(|l| l.contains("envoy.filters.http.wasm.config_reload:"))
            .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
            .sum()
    }

    /// [`Gateway::apply_gateway_config`], then waits (10 s at most) until Envoy
    /// has loaded it; returns when it had.
    pub async fn apply_gateway_config_and_wait(&mut self, config: Value) -> std::time::Instant {
        let before = self.ecds_reloads().await;
        self.apply_gateway_config(config);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.ecds_reloads().await <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "Envoy did not reload the ECDS file within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::time::Instant::now()
    }

    pub fn temp_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}
