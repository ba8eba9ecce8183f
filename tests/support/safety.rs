//! The project's safety simulator (`src/bin/safety-sim.rs`, Model Armor's REST
//! shape) as a child process on a free loopback port. `GET /sim/requests` lists
//! what it screened; `PUT /sim/behaviour` makes it slow, failing, hanging or
//! answering garbage.

use super::deploy::process::{self, ChildGuard};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub struct SafetySim {
    pub port: u16,
    guard: ChildGuard,
}

impl SafetySim {
    /// Starts the simulator with its default rules and waits for `/health`.
    pub fn start(log_dir: &Path, extra_args: &[&str]) -> Result<SafetySim, String> {
        let mut last = String::new();
        // Another process may take the free port before the simulator binds it.
        for _ in 0..3 {
            let port = process::free_port().map_err(|e| e.to_string())?;
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_safety-sim"));
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(extra_args);
            let log = log_dir.join(format!("safety-sim-{port}.log"));
            let mut guard =
                ChildGuard::spawn("safety-sim", &mut cmd, Some(&log)).map_err(|e| e.to_string())?;
            let health = format!("http://127.0.0.1:{port}/health");
            let ready = process::wait_until("safety-sim", Duration::from_secs(30), || {
                if let Err(e) = guard.check_running() {
                    return process::Check::Failed(e.to_string());
                }
                match process::http_get(&health) {
                    Ok((200, _)) => process::Check::Ready(()),
                    Ok((s, b)) => process::Check::NotYet(format!("{s} {b}")),
                    Err(e) => process::Check::NotYet(e.to_string()),
                }
            });
            match ready {
                Ok(()) => return Ok(SafetySim { port, guard }),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("safety simulator did not start: {last}"))
    }

    /// `127.0.0.1:port`, for `EnvoySettings::safety_address`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What it screened: `[{method, template, text, matched, received_at_ms}]`.
    pub async fn screenings(&self, client: &reqwest::Client) -> Vec<Value> {
        let v: Value = client
            .get(self.url("/sim/requests"))
            .send()
            .await
            .expect("GET /sim/requests")
            .json()
            .await
            .expect("/sim/requests is JSON");
        v.as_array().cloned().unwrap_or_default()
    }

    pub async fn clear(&self, client: &reqwest::Client) {
        client
            .delete(self.url("/sim/requests"))
            .send()
            .await
            .expect("DELETE /sim/requests");
    }

    /// `mode`: normal, slow, fail, garbage or hang; `delay_ms` for slow and hang.
    pub async fn set_behaviour(&self, client: &reqwest::Client, mode: &str, delay_ms: u64) {
        let resp = client
            .put(self.url("/sim/behaviour"))
            .json(&json!({"mode": mode, "delay_ms": delay_ms}))
            .send()
            .await
            .expect("PUT /sim/behaviour");
        assert_eq!(resp.status().as_u16(), 204, "PUT /sim/behaviour");
    }

    /// SIGKILL: the service is gone (connections are refused from now on).
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    pub fn log(&self) -> String {
        self.guard.log_tail(16 * 1024)
    }
}
