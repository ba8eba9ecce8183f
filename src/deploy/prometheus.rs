//! A real Prometheus as a child process, for the demo and the tests: finds the
//! binary (Debian's `/usr/bin/prometheus`, `$PROMETHEUS`, or `PATH`), writes a
//! configuration that scrapes the given targets at a short interval and loads the
//! given rule files, starts it on a free loopback port with its storage in the
//! work directory, waits until it is ready, and answers PromQL queries.
//!
//! ```no_run
//! use inference_gateway::deploy::prometheus::{start_prometheus, Target};
//! let dir = std::env::temp_dir().join("igw-prom");
//! let targets = [
//!     Target::new("envoy", "127.0.0.1:9901").path("/stats/prometheus"),
//!     Target::new("gateway", "127.0.0.1:9902"), // the control listener's /metrics
//!     Target::new("collector", "127.0.0.1:9090"),
//! ];
//! let rules = [inference_gateway::deploy::prometheus::alert_rules_path()];
//! let prom = start_prometheus(&dir, &targets, &rules)?;
//! println!("Prometheus at {}", prom.url());
//! let rate = prom.query("sum(rate(inference_model_request_total[1m]))")?;
//! # Ok::<(), inference_gateway::deploy::Error>(())
//! ```

use super::process::{self, Check, ChildGuard};
use super::{Error, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where Debian (and this project's CI, `apt-get install prometheus`) puts it.
pub const DEBIAN_PROMETHEUS: &str = "/usr/bin/prometheus";
/// Overrides the binary's location.
pub const PROMETHEUS_ENV: &str = "PROMETHEUS";
/// The shipped alert rules, relative to the repository root.
pub const ALERT_RULES_PATH: &str = "envoy/observability/alerts.yaml";
/// How long [`start_prometheus`] waits for `/-/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The shipped alert rules file (absolute).
pub fn alert_rules_path() -> PathBuf {
    super::repo_root().join(ALERT_RULES_PATH)
}

/// One scrape job: `job` label, `ip:port`, metrics path (default `/metrics`),
/// and an optional bearer token (`authorization: Bearer`, as the GKE
/// metrics-scraping guide's ClusterPodMonitoring sends it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub job: String,
    pub address: String,
    pub metrics_path: String,
    pub bearer: Option<String>,
}

impl Target {
    pub fn new(job: &str, address: &str) -> Self {
        Target {
            job: job.into(),
            address: address.into(),
            metrics_path: "/metrics".into(),
            bearer: None,
        }
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.into());
        self
    }

    pub fn path(mut self, metrics_path: &str) -> Self {
        self.metrics_path = metrics_path.into();
        self
    }
}

/// Scrape and rule-evaluation interval of [`start_prometheus`]: short, so that
/// tests and demos see data within seconds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// The binary: `$PROMETHEUS`, then [`DEBIAN_PROMETHEUS`], then `prometheus` on `PATH`.
pub fn find_prometheus() -> Option<PathBuf> {
    find_tool(PROMETHEUS_ENV, DEBIAN_PROMETHEUS, "prometheus")
}

/// `promtool` (for `promtool check rules`): `$PROMTOOL`, `/usr/bin/promtool`, `PATH`.
pub fn find_promtool() -> Option<PathBuf> {
    find_tool("PROMTOOL", "/usr/bin/promtool", "promtool")
}

fn find_tool(env: &str, fixed: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let fixed = PathBuf::from(fixed);
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The configuration [`start_prometheus`] writes.
pub fn render_config(targets: &[Target], rules: &[PathBuf], interval: Duration) -> String {
    let secs = format!("{}ms", interval.as_millis().max(100));
    let mut out = format!(
        "# Written by inference-gateway's deploy::prometheus.\nglobal:\n  scrape_interval: {secs}\n  scrape_timeout: {secs}\n  evaluation_interval: {secs}\n"
    );
    if !rules.is_empty() {
        out.push_str("rule_files:\n");
        for r in rules {
            let _ = writeln!(out, "  - {}", yaml_str(&r.to_string_lossy()));
        }
    }
    out.push_str("scrape_configs:\n");
    for t in targets {
        let _ = write!(
            out,
            "  - job_name: {}\n    metrics_path: {}\n    static_configs:\n      - targets: [{}]\n",
            yaml_str(&t.job),
            yaml_str(&t.metrics_path),
            yaml_str(&t.address)
        );
        if let Some(token) = &t.bearer {
            let _ = write!(
                out,
                "    authorization:\n      type: Bearer\n      credentials: {}\n",
                yaml_str(token)
            );
        }
    }
    out
}

/// A double-quoted YAML scalar.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A running Prometheus; stopped when dropped.
pub struct Prometheus {
    guard: ChildGuard,
    port: u16,
    config_path: PathBuf,
}

/// Starts Prometheus scraping `targets` every [`DEFAULT_INTERVAL`] and evaluating
/// `rules` (rule files, e.g. [`alert_rules_path`]), with its configuration, log
/// (`prometheus.log`) and storage (`prometheus-data/`) under `work_dir`, on a free
/// 127.0.0.1 port. Returns once `/-/ready` answers (rule files that do not load
/// make it fail, with the log's tail in the error).
pub fn start_prometheus(
    work_dir: &Path,
    targets: &[Target],
    rules: &[PathBuf],
) -> Result<Prometheus> {
    start_with_interval(work_dir, targets, rules, DEFAULT_INTERVAL)
}

/// [`start_prometheus`] with another scrape/evaluation interval.
pub fn start_with_interval(
    work_dir: &Path,
    targets: &[Target],
    rules: &[PathBuf],
    interval: Duration,
) -> Result<Prometheus> {
    let binary = find_prometheus().ok_or_else(|| {
        Error::new(format!(
            "no prometheus binary (looked at ${PROMETHEUS_ENV}, {DEBIAN_PROMETHEUS} and PATH); \
             install it with `apt-get install -y prometheus`"
        ))
    })?;
    std::fs::create_dir_all(work_dir)
        .map_err(|e| Error::new(format!("cannot create {}: {e}", work_dir.display())))?;
    let config_path = work_dir.join("prometheus.yml");
    std::fs::write(&config_path, render_config(targets, rules, interval))
        .map_err(|e| Error::new(format!("cannot write {}: {e}", config_path.display())))?;
    let port = process::free_port()?;
    let mut cmd = Command::new(&binary);
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            work_dir.join("prometheus-data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        // Rules and dashboards look back a few minutes at most.
        .arg("--storage.tsdb.retention.time=1h")
        .current_dir(work_dir);
    let log = work_dir.join("prometheus.log");
    let mut guard = ChildGuard::spawn("prometheus", &mut cmd, Some(&log))?;
    let ready = format!("http://127.0.0.1:{port}/-/ready");
    let waited = process::wait_until("Prometheus /-/ready", READY_TIMEOUT, || {
        if let Err(e) = guard.check_running() {
            return Check::Failed(e.to_string());
        }
        match process::http_get(&ready) {
            Ok((200, _)) => Check::Ready(()),
            Ok((s, b)) => Check::NotYet(format!("{s} {}", b.trim())),
            Err(e) => Check::NotYet(e.to_string()),
        }
    });
    if let Err(e) = waited {
        return Err(Error::new(format!(
            "{e}\n--- prometheus.log ---\n{}",
            guard.log_tail(4000)
        )));
    }
    Ok(Prometheus {
        guard,
        port,
        config_path,
    })
}

/// One sample of an instant vector: labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).and_then(Value::as_str)
    }
}

impl Prometheus {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The last lines of its log.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        self.guard.log_tail(max_bytes)
    }

    /// `GET /api/v1/<path>?<query>` → the `data` of a `success` answer.
    pub fn api(&self, path_and_query: &str) -> Result<Value> {
        let url = format!("{}/api/v1/{path_and_query}", self.url());
        let (status, body) = process::http_get(&url)?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| Error::new(format!("{url}: {status}, not JSON ({e}): {body}")))?;
        if v["status"] != "success" {
            return Err(Error::new(format!(
                "{url}: {status} {}: {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or(&body)
            )));
        }
        Ok(v["data"].clone())
    }

    /// Evaluates `expr` now: the raw `data` (`resultType`, `result`). PromQL
    /// errors (bad syntax, unknown function) are `Err`.
    pub fn query_raw(&self, expr: &str) -> Result<Value> {
        self.api(&format!("query?query={}", url_encode(expr)))
    }

    /// Evaluates `expr` now as an instant vector (a scalar is one unlabelled sample).
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let data = self.query_raw(expr)?;
        let value_of = |v: &Value| -> f64 {
            v.get(1)
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        Ok(match data["resultType"].as_str() {
            Some("scalar") => vec![Sample {
                labels: Default::default(),
                value: value_of(&data["result"]),
            }],
            _ => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Sample {
                    labels: s["metric"].as_object().cloned().unwrap_or_default(),
                    value: value_of(&s["value"]),
                })
                .collect(),
        })
    }

    /// Polls `expr` (every 250 ms) until `pred` holds for its samples; the error
    /// names the expression and the last samples.
    pub fn wait_for(
        &self,
        expr: &str,
        timeout: Duration,
        pred: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let last = match self.query(expr) {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(s) => format!("{s:?}"),
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() >= deadline {
                return Err(Error::new(format!(
                    "timed out after {timeout:?} waiting for `{expr}` (last: {last})"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Scrape targets: `(job, health)` for each active target.
    pub fn target_health(&self) -> Result<Vec<(String, String)>> {
        let data = self.api("targets?state=active")?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or_default().to_string(),
                    t["health"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    /// The loaded alerting rules: `(name, expression, health, state)`.
    pub fn alert_rules(&self) -> Result<Vec<(String, String, String, String)>> {
        let data = self.api("rules?type=alert")?;
        Ok(data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                (s("name"), s("query"), s("health"), s("state"))
            })
            .collect())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) {
        self.guard.stop(grace);
    }
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters kept).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lists_rules_and_targets() {
        let yaml = render_config(
            &[
                Target::new("envoy", "127.0.0.1:9901").path("/stats/prometheus"),
                Target::new("collector", "127.0.0.1:9090").bearer("t0ken"),
            ],
            &[PathBuf::from("/x/alerts.yaml")],
            Duration::from_secs(1),
        );
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).expect("valid YAML");
        assert_eq!(v["global"]["scrape_interval"].as_str(), Some("1000ms"));
        assert_eq!(v["rule_files"][0].as_str(), Some("/x/alerts.yaml"));
        assert_eq!(v["scrape_configs"][0]["job_name"].as_str(), Some("envoy"));
        assert_eq!(
            v["scrape_configs"][0]["metrics_path"].as_str(),
            Some("/stats/prometheus")
        );
        assert_eq!(
            v["scrape_configs"][1]["static_configs"][0]["targets"][0].as_str(),
            Some("127.0.0.1:9090")
        );
        let auth = &v["scrape_configs"][1]["authorization"];
        assert_eq!(
            (auth["type"].as_str(), auth["credentials"].as_str()),
            (Some("Bearer"), Some("t0ken"))
        );
        assert!(v["scrape_configs"][0].get("authorization").is_none());
    }

    #[test]
    fn query_strings_are_encoded() {
        assert_eq!(
            url_encode("rate(x{a=\"b c\"}[1m]) > 0.5"),
            "rate%28x%7Ba%3D%22b%20c%22%7D%5B1m%5D%29%20%3E%200.5"
        );
    }
}
