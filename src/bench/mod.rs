//! The benchmark harness's host-free parts (statistics, workloads, Envoy
//! configurations for the compared variants, report rendering) and the machine
//! readers. The harness itself is `src/bin/bench.rs` (feature `bench`); see
//! BENCHMARKS.md.

pub mod envoy;
pub mod machine;
pub mod report;
pub mod stats;
pub mod workload;
