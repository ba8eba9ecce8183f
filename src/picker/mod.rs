//! The `endpoint-picker`: the gateway's scheduler as an InferencePool's endpoint
//! picker, the way GKE and every conformant Gateway API inference gateway route a
//! pool: an Envoy `ext_proc` gRPC service speaking the Endpoint Picker Protocol
//! (GIE `docs/proposals/004-endpoint-picker-protocol`).
//!
//! - [`protocol`]: one ext_proc stream as a host-free state machine (body modes,
//!   destination header and metadata, subset hint, served endpoint, errors).
//! - [`config`]: the picker's file: the filter's plugin configuration plus the
//!   collector's discovery section.
//! - [`safety`]: prompt and response screening inside the exchange (the filter's
//!   semantics; the server sends the calls).
//! - [`server`]: gRPC (TLS), health, the embedded collector, metrics, ingest,
//!   the safety calls.
//!
//! The decisions are `crate::extproc::Picker`'s, the same `gateway::plan_route`
//! and `gateway::choose` as the Wasm filter. Documented in `docs/gke.md`.

pub mod config;
pub mod protocol;
pub mod safety;
pub mod server;
