//! The `endpoint-picker` binary as a child process on free loopback ports, ready
//! (gRPC health `readiness` SERVING on its plain-text probe port) before
//! [`PickerProcess::start`] returns.

use super::deploy::envoy_config::{EnvoySettings, FailureMode, PickerLb, Routing};
use super::deploy::process::{self, ChildGuard};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A Lua filter (placed before ext_proc) turning the test header `x-test-subset`
/// (comma-separated `ip:port`) into the protocol's subset hint
/// (`envoy.lb.subset_hint`), as a data plane would set it.
pub const SUBSET_LUA: &str = r#"          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  function envoy_on_request(h)
                    local s = h:headers():get("x-test-subset")
                    if s ~= nil then
                      local list = {}
                      for e in string.gmatch(s, "[^,]+") do table.insert(list, e) end
                      h:streamInfo():dynamicMetadata():set("envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset", list)
                    end
                  end
"#;

pub fn picker_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_endpoint-picker"))
}

pub struct PickerProcess {
    pub guard: ChildGuard,
    pub grpc: u16,
    pub health: u16,
    pub metrics: u16,
}

impl PickerProcess {
    /// Starts the picker on `config` (written to `dir/picker.json`) with TLS
    /// from a certificate made at start (`--cert/--key` from `tls`, if given),
    /// `extra` arguments and environment, and waits until it is ready.
    pub async fn start(
        dir: &Path,
        config: &Value,
        tls: Option<(&Path, &Path)>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> PickerProcess {
        let path = dir.join("picker.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let port = || process::free_port().expect("free port");
        let (grpc, health, metrics) = (port(), port(), port());
        let mut cmd = Command::new(picker_binary());
        cmd.arg("--config")
            .arg(&path)
            .args(["--grpc", &format!("127.0.0.1:{grpc}")])
            .args(["--grpc-health", &format!("127.0.0.1:{health}")])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(extra)
            .env("RUST_LOG", "info");
        if let Some((cert, key)) = tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let guard = ChildGuard::spawn("endpoint-picker", &mut cmd, Some(&dir.join("picker.log")))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut p = PickerProcess {
            guard,
            grpc,
            health,
            metrics,
        };
        p.wait_ready().await;
        p
    }

    /// Waits (15 s at most) for `readiness` SERVING on the probe port.
    pub async fn wait_ready(&mut self) {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", self.health)).unwrap();
        for _ in 0..150 {
            if let Err(e) = self.guard.check_running() {
                panic!("the picker exited: {e}\n{}", self.guard.log_tail(8192));
            }
            if let Ok(ch) = channel.clone().connect().await {
                let status = HealthClient::new(ch)
                    .check(HealthCheckRequest {
                        service: "readiness".into(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.ok() == Some(ServingStatus::Serving as i32) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("readiness never SERVING:\n{}", self.guard.log_tail(8192));
    }

    pub fn log_tail(&self) -> String {
        self.guard.log_tail(8192)
    }

    /// Envoy in front of this picker as a conformant gateway wires it (ext_proc,
    /// an ORIGINAL_DST cluster, fail closed) on free ports, pool `pool`, no Wasm.
    pub fn envoy_settings(&self) -> EnvoySettings {
        let port = || process::free_port().expect("free port");
        EnvoySettings {
            gateway_port: port(),
            control_port: port(),
            admin_port: port(),
            wasm_path: "/nonexistent.wasm".into(),
            gateway_config: serde_json::json!({"pools": [{"name": "pool", "endpoints": []}]}),
            concurrency: Some(2),
            log_level: "warning".into(),
            log_flush_interval_ms: 100,
            routing: Routing::EndpointPicker {
                grpc: format!("127.0.0.1:{}", self.grpc),
                lb: PickerLb::OriginalDst,
                failure_mode: FailureMode::FailClose,
            },
            ..EnvoySettings::demo()
        }
    }
}
