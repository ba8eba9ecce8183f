//! Shared by the end-to-end test files (`mod support;`): the real Envoy (in Docker
//! through testcontainers, or as a native process), the model-server simulator,
//! and a [`gateway::Gateway`] fixture that wires them together on free loopback
//! ports.
#![allow(dead_code)]

pub mod api;
pub mod collector;
pub mod dns;
pub mod envoy;
pub mod gateway;
pub mod picker;
pub mod safety;
pub mod sim;
pub mod traffic;

use std::io::Write;
use std::path::PathBuf;

pub use inference_gateway::deploy;

/// The repository root.
pub fn repo_root() -> PathBuf {
    deploy::repo_root()
}

/// The filter built from the current source by build.rs.
pub fn wasm_path() -> PathBuf {
    PathBuf::from(env!("GATEWAY_WASM"))
}

/// Writes a line to the real stderr, past the test harness's output capture, for
/// facts everyone running the tests should see (which runtime runs Envoy).
pub fn announce(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// An HTTP client for loopback traffic: never through a proxy from the environment.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// `GET url`'s body (panics when the request fails: tests fetch their own
/// loopback services).
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_default()
}
