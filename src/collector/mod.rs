//! The `metrics-collector`: scrapes model servers' Prometheus `/metrics`, maps
//! each server type's names to the common [`crate::snapshot::EndpointMetrics`],
//! and pushes one [`crate::snapshot::Snapshot`] per round to the filter's ingest
//! listener(s). It also serves GIE's pool gauges on its own `/metrics`.
//!
//! Pure logic, unit-tested beside it: [`config`] (file + validation),
//! [`discovery`] (endpoints / push target files, DNS answers, push expansion),
//! [`exposition`] (text-format parser), [`mapping`] (server type → metrics),
//! [`aggregate`] (discovery merge, health, snapshot, pool averages),
//! [`telemetry`] (own metrics), [`backoff`]. The async I/O is [`runtime`].
//! Native only; documented in `docs/collector.md`.

pub mod aggregate;
pub mod backoff;
pub mod config;
pub mod discovery;
pub mod exposition;
pub mod mapping;
pub mod runtime;
pub mod telemetry;
