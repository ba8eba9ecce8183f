//! The benchmark harness's host-free parts (statistics, workloads, report
//! rendering) and the machine readers. The compared Envoy variants are
//! `deploy::envoy_config::Routing`. The harness itself is `src/bin/bench.rs` (feature `bench`); see
//! BENCHMARKS.md.

pub mod callgrind;
pub mod machine;
pub mod report;
pub mod safety_stream;
pub mod soak;
pub mod stats;
pub mod workload;
