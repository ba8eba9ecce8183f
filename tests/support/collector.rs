//! The `metrics-collector` binary as a child process: its configuration written
//! as YAML, its ingest token passed through the environment (`--token-env`),
//! never on the command line.

use super::deploy::process::{self, Check, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The environment variable the token travels in.
pub const TOKEN_ENV: &str = "IGW_TEST_COLLECTOR_TOKEN";

pub fn collector_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metrics-collector"))
}

pub struct Collector {
    pub guard: ChildGuard,
    pub port: u16,
}

impl Collector {
    /// `config` is the YAML configuration without `listen` (added here, on a free
    /// port) and without the token.
    pub fn start(dir: &Path, name: &str, config: &str, token: &str) -> Collector {
        let port = process::free_port().expect("free port");
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, format!("listen: \"127.0.0.1:{port}\"\n{config}"))
            .expect("write config");
        let mut cmd = Command::new(collector_binary());
        cmd.arg("--config")
            .arg(&path)
            .args(["--token-env", TOKEN_ENV])
            .env(TOKEN_ENV, token)
            .env("RUST_LOG", "info");
        let log = dir.join(format!("{name}.log"));
        let mut guard =
            ChildGuard::spawn(name, &mut cmd, Some(&log)).unwrap_or_else(|e| panic!("{e}"));
        let healthz = format!("http://127.0.0.1:{port}/healthz");
        process::wait_until(name, Duration::from_secs(20), || {
            if let Err(e) = guard.check_running() {
                return Check::Failed(e.to_string());
            }
            match process::http_get(&healthz) {
                Ok((200, _)) => Check::Ready(()),
                Ok((s, b)) => Check::NotYet(format!("{s} {b}")),
                Err(e) => Check::NotYet(e.to_string()),
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        Collector { guard, port }
    }

    /// Its own `/metrics` (GIE pool gauges, scrape and push counters).
    pub fn metrics(&self) -> String {
        match process::http_get(&format!("http://127.0.0.1:{}/metrics", self.port)) {
            Ok((200, body)) => body,
            other => panic!(
                "collector /metrics: {other:?}\n--- log ---\n{}",
                self.guard.log_tail(8000)
            ),
        }
    }

    pub fn log(&self) -> String {
        self.guard.log_tail(16 * 1024)
    }
}

/// A collector configuration: one pool, scraped every `interval_ms`, pushed to
/// the control listener at `push_target` (`ip:port`).
pub fn pool_config(
    pool: &str,
    endpoints: &[String],
    push_target: &str,
    interval_ms: u64,
) -> String {
    let mut yaml = format!(
        "scrape_interval_ms: {interval_ms}\nscrape_timeout_ms: 500\npush_targets: [\"{push_target}\"]\npools:\n  - name: {pool}\n    endpoints:\n"
    );
    for e in endpoints {
        yaml.push_str(&format!("      - \"{e}\"\n"));
    }
    yaml
}
