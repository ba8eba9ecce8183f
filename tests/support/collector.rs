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

/// A fake ingest listener (what the filter's control listener does for
/// `POST /v1/snapshot`): checks the bearer token, decodes the snapshot, answers
/// 204 and keeps what it received with the time it arrived. Stops gracefully,
/// closing idle keep-alive connections, so a stop looks like a replica going
/// away.
pub struct IngestSink {
    pub addr: std::net::SocketAddr,
    received: std::sync::Arc<
        std::sync::Mutex<Vec<(std::time::Instant, inference_gateway::snapshot::Snapshot)>>,
    >,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl IngestSink {
    /// Listens on `addr` (e.g. `127.0.0.2:<port>`; retried for a few seconds,
    /// for a restart on the same address). Must run inside a Tokio runtime.
    pub async fn start(addr: std::net::SocketAddr, token: &str) -> IngestSink {
        use axum::http::{HeaderMap, StatusCode};
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("ingest sink: cannot bind {addr}: {e}"),
            }
        };
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = received.clone();
        let expected = format!("Bearer {token}");
        let app = axum::Router::new().route(
            inference_gateway::ingest::INGEST_PATH,
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let store = store.clone();
                let expected = expected.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    if auth != expected {
                        return StatusCode::UNAUTHORIZED;
                    }
                    match inference_gateway::snapshot::Snapshot::decode(&body) {
                        Ok(s) => {
                            store
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((std::time::Instant::now(), s));
                            StatusCode::NO_CONTENT
                        }
                        Err(_) => StatusCode::BAD_REQUEST,
                    }
                }
            }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        IngestSink {
            addr,
            received,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Snapshots received so far.
    pub fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The last snapshot received.
    pub fn latest(&self) -> Option<inference_gateway::snapshot::Snapshot> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .map(|(_, s)| s.clone())
    }

    /// Snapshots that arrived at or after `t`, oldest first.
    pub fn since(&self, t: std::time::Instant) -> Vec<inference_gateway::snapshot::Snapshot> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _)| *at >= t)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// When the first snapshot at or after `t` arrived.
    pub fn first_since(&self, t: std::time::Instant) -> Option<std::time::Instant> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(at, _)| *at)
            .find(|at| *at >= t)
    }

    /// Stops listening and closes idle connections (bounded: 5 s).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                panic!("ingest sink on {} did not stop within 5 s", self.addr);
            }
        }
    }
}

impl Drop for IngestSink {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
