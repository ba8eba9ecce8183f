//! inference-gateway: an Envoy proxy-wasm filter that routes OpenAI-style LLM
//! requests to the best model-server endpoint, and its native companions.
//!
//! Host-free logic lives in the public modules (unit-tested natively); the
//! proxy-wasm glue is `filter`, compiled only for `wasm32`.

pub mod auth;
#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
#[cfg(not(target_arch = "wasm32"))]
pub mod collector;
pub mod config;
#[cfg(not(target_arch = "wasm32"))]
pub mod deploy;
#[cfg(not(target_arch = "wasm32"))]
pub mod extproc;
pub mod gateway;
pub mod inflight;
pub mod ingest;
#[cfg(not(target_arch = "wasm32"))]
pub mod k8s;
pub mod membership;
pub mod observe;
pub mod openai;
#[cfg(not(target_arch = "wasm32"))]
pub mod picker;
pub mod policy;
pub mod routing;
pub mod safety;
#[cfg(not(target_arch = "wasm32"))]
pub mod safety_sim;
pub mod scheduling;
pub mod snapshot;

#[cfg(not(target_arch = "wasm32"))]
pub mod sim;

#[cfg(target_arch = "wasm32")]
mod filter;
