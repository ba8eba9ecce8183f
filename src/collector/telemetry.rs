//! The collector's own metrics, kept as plain counters and rendered in the
//! Prometheus text format: GIE's pool gauges (so GKE's alert rules work on the
//! collector's `/metrics`), per-endpoint gauges, scrape latency and errors, push
//! results and the snapshot size.

use super::aggregate::aggregate;
use crate::snapshot::Snapshot;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::time::Duration;

/// Scrape latency buckets (seconds): scrapes are expected in the low milliseconds.
pub const SCRAPE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Non-cumulative counts per bucket of [`SCRAPE_BUCKETS`]; +Inf is `count`.
    buckets: [u64; SCRAPE_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = SCRAPE_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// How a push ended, as the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PushResult {
    /// 2xx: stored.
    Ok,
    /// 409: the filter has a newer snapshot (another collector, or a reordering).
    Stale,
    /// Another 4xx: token, size or format rejected; retrying the same will not help.
    Rejected,
    /// 5xx, refused connection, timeout: the target is down or restarting.
    Error,
}

impl PushResult {
    pub fn from_status(status: u16) -> PushResult {
        match status {
            200..=299 => PushResult::Ok,
            409 => PushResult::Stale,
            400..=499 => PushResult::Rejected,
            _ => PushResult::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PushResult::Ok => "ok",
            PushResult::Stale => "stale",
            PushResult::Rejected => "rejected",
            PushResult::Error => "error",
        }
    }

    /// Whether the pusher backs off after this result.
    pub fn backs_off(self) -> bool {
        matches!(self, PushResult::Rejected | PushResult::Error)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    scrape_latency: BTreeMap<String, Histogram>,
    scrape_errors: BTreeMap<(String, &'static str), u64>,
    /// (target as configured, address pushed to, result).
    pushes: BTreeMap<(String, String, PushResult), u64>,
    /// (source `dns`/`file`, name or path, reason).
    discovery_errors: BTreeMap<(&'static str, String, &'static str), u64>,
    rounds: u64,
    snapshot_bytes: usize,
}

impl Telemetry {
    pub fn scrape(&mut self, endpoint: &str, took: Duration, error: Option<&'static str>) {
        self.scrape_latency
            .entry(endpoint.to_string())
            .or_default()
            .observe(took.as_secs_f64());
        if let Some(reason) = error {
            *self
                .scrape_errors
                .entry((endpoint.to_string(), reason))
                .or_default() += 1;
        }
    }

    /// A push to `address`, one of the addresses of the configured `target`.
    pub fn push(&mut self, target: &str, address: &str, result: PushResult) {
        *self
            .pushes
            .entry((target.to_string(), address.to_string(), result))
            .or_default() += 1;
    }

    /// A discovery failure: `source` is `dns` or `file`, `name` the host name or
    /// the file path, `reason` e.g. `lookup`, `timeout`, `read`, `parse`, `entry`.
    pub fn discovery_error(&mut self, source: &'static str, name: &str, reason: &'static str) {
        *self
            .discovery_errors
            .entry((source, name.to_string(), reason))
            .or_default() += 1;
    }

    pub fn discovery_errors(&self, source: &str, name: &str, reason: &str) -> u64 {
        self.discovery_errors
            .iter()
            .filter(|((s, n, r), _)| *s == source && n == name && *r == reason)
            .map(|(_, v)| *v)
            .sum()
    }

    pub fn round(&mut self, snapshot_bytes: usize) {
        self.rounds += 1;
        self.snapshot_bytes = snapshot_bytes;
    }

    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Pushes to every address of `target` that ended with `result`.
    pub fn pushes(&self, target: &str, result: PushResult) -> u64 {
        self.pushes
            .iter()
            .filter(|((t, _, r), _)| t == target && *r == result)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Drops the push series of targets that discovery no longer lists
    /// (`keep`: (target, address)).
    pub fn retain_push_targets(&mut self, keep: &HashSet<(String, String)>) {
        self.pushes
            .retain(|(t, a, _), _| keep.contains(&(t.clone(), a.clone())));
    }

    /// Drops the series of endpoints that discovery no longer lists.
    pub fn retain_endpoints(&mut self, keep: &HashSet<String>) {
        self.scrape_latency.retain(|e, _| keep.contains(e));
        self.scrape_errors.retain(|(e, _), _| keep.contains(e));
    }

    /// The text `/metrics` serves, from these counters and the last snapshot.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::with_capacity(4096 + 600 * snapshot.endpoint_count());
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let aggregates = aggregate(snapshot);
        head(
            &mut out,
            "inference_pool_average_kv_cache_utilization",
            "gauge",
            "Average KV-cache utilization (0..1) of the pool's healthy endpoints.",
        );
        for a in &aggregates {
            let _ = writeln!(
                out,
                "inference_pool_average_kv_cache_utilization{{name=\"{}\"}} {}",
                esc(&a.name),
                a.average_kv_cache_utilization
            );
        }
        head(
            &mut out,
            "inference_pool_average_queue_size",
            "gauge",
            "Average number of waiting requests on the pool's healthy endpoints.",
        );
        for a in &aggregates {
            let _ = writeln!(
                out,
                "inference_pool_average_queue_size{{name=\"{}\"}} {}",
                esc(&a.name),
                a.average_queue_size
            );
        }
        head(
            &mut out,
            "inference_pool_ready_pods",
            "gauge",
            "Endpoints of the pool whose last scrape succeeded.",
        );
        for a in &aggregates {
            let _ = writeln!(
                out,
                "inference_pool_ready_pods{{name=\"{}\"}} {}",
                esc(&a.name),
                a.ready_pods
            );
        }
        head(
            &mut out,
            "inference_pool_endpoints",
            "gauge",
            "Endpoints of the pool after discovery, healthy or not.",
        );
        for a in &aggregates {
            let _ = writeln!(
                out,
                "inference_pool_endpoints{{name=\"{}\"}} {}",
                esc(&a.name),
                a.endpoints
            );
        }

        type Field = fn(&crate::snapshot::EndpointMetrics) -> f64;
        let per_endpoint: [(&str, &str, &str, Field); 5] = [
            (
                "inference_pool_endpoint_kv_cache_utilization",
                "endpoint",
                "KV-cache utilization (0..1) of the endpoint, from its last successful scrape.",
                |e| f64::from(e.kv_cache_utilization),
            ),
            (
                "inference_pool_endpoint_queue_size",
                "endpoint",
                "Waiting requests on the endpoint, from its last successful scrape.",
                |e| f64::from(e.waiting),
            ),
            (
                "inference_pool_endpoint_running_requests",
                "endpoint",
                "Running requests on the endpoint, from its last successful scrape.",
                |e| f64::from(e.running),
            ),
            (
                "inference_pool_endpoint_healthy",
                "endpoint",
                "1 when the endpoint's last scrape succeeded recently, else 0.",
                |e| if e.healthy { 1.0 } else { 0.0 },
            ),
            // GIE's endpoint picker name for the same queue gauge.
            (
                "inference_pool_per_pod_queue_size",
                "model_server_pod",
                "Waiting requests per model-server endpoint (GIE name).",
                |e| f64::from(e.waiting),
            ),
        ];
        for (name, label, help, field) in per_endpoint {
            head(&mut out, name, "gauge", help);
            for p in &snapshot.pools {
                for e in &p.endpoints {
                    let _ = writeln!(
                        out,
                        "{name}{{name=\"{}\",{label}=\"{}\"}} {}",
                        esc(&p.name),
                        esc(&e.address),
                        field(e)
                    );
                }
            }
        }

        head(
            &mut out,
            "inference_collector_scrape_duration_seconds",
            "histogram",
            "Time to fetch, parse and map one endpoint's /metrics (including failures).",
        );
        for (ep, h) in &self.scrape_latency {
            let ep = esc(ep);
            let mut cumulative = 0;
            for (b, n) in SCRAPE_BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "inference_collector_scrape_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"{b}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "inference_collector_scrape_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"+Inf\"}} {}\n\
                 inference_collector_scrape_duration_seconds_sum{{endpoint=\"{ep}\"}} {}\n\
                 inference_collector_scrape_duration_seconds_count{{endpoint=\"{ep}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        head(
            &mut out,
            "inference_collector_scrape_errors_total",
            "counter",
            "Failed scrapes by endpoint and reason (connect, timeout, status, body, parse, no_metrics).",
        );
        for ((ep, reason), n) in &self.scrape_errors {
            let _ = writeln!(
                out,
                "inference_collector_scrape_errors_total{{endpoint=\"{}\",reason=\"{reason}\"}} {n}",
                esc(ep)
            );
        }
        head(
            &mut out,
            "inference_collector_push_total",
            "counter",
            "Snapshot pushes by target (as configured), address (pushed to) and result (ok, stale, rejected, error).",
        );
        for ((target, address, result), n) in &self.pushes {
            let _ = writeln!(
                out,
                "inference_collector_push_total{{target=\"{}\",address=\"{}\",result=\"{}\"}} {n}",
                esc(target),
                esc(address),
                result.as_str()
            );
        }
        head(
            &mut out,
            "inference_collector_discovery_errors_total",
            "counter",
            "Discovery failures by source (dns, file), name (host name or file path) and reason (lookup, timeout, read, parse, entry).",
        );
        for ((source, name, reason), n) in &self.discovery_errors {
            let _ = writeln!(
                out,
                "inference_collector_discovery_errors_total{{source=\"{source}\",name=\"{}\",reason=\"{reason}\"}} {n}",
                esc(name)
            );
        }
        head(
            &mut out,
            "inference_collector_snapshot_bytes",
            "gauge",
            "Size of the last encoded snapshot.",
        );
        let _ = writeln!(
            out,
            "inference_collector_snapshot_bytes {}",
            self.snapshot_bytes
        );
        head(
            &mut out,
            "inference_collector_rounds_total",
            "counter",
            "Snapshots built (one per scrape interval).",
        );
        let _ = writeln!(out, "inference_collector_rounds_total {}", self.rounds);
        head(
            &mut out,
            "inference_collector_snapshot_sequence",
            "gauge",
            "Sequence number of the last snapshot.",
        );
        let _ = writeln!(
            out,
            "inference_collector_snapshot_sequence {}",
            snapshot.sequence
        );
        out
    }
}

/// Label value escaping of the text format.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::exposition;
    use crate::snapshot::{EndpointMetrics, PoolSnapshot};

    fn snapshot() -> Snapshot {
        let ep = |a: &str, healthy: bool, kv: f32, waiting: u32| EndpointMetrics {
            address: a.into(),
            healthy,
            kv_cache_utilization: kv,
            waiting,
            running: 2,
            ..Default::default()
        };
        Snapshot {
            sequence: 9,
            pools: vec![PoolSnapshot {
                name: "we\"ird".into(),
                endpoints: vec![
                    ep("127.0.0.1:1", true, 0.5, 4),
                    ep("127.0.0.1:2", true, 0.25, 2),
                    ep("127.0.0.1:3", false, 1.0, 50),
                ],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn renders_parsable_text_with_gie_names() {
        let mut t = Telemetry::default();
        t.scrape("127.0.0.1:1", Duration::from_millis(3), None);
        t.scrape("127.0.0.1:3", Duration::from_millis(700), Some("timeout"));
        t.push("127.0.0.1:9902", "127.0.0.1:9902", PushResult::Ok);
        t.push("127.0.0.1:9902", "127.0.0.1:9902", PushResult::Ok);
        t.push("127.0.0.1:9902", "127.0.0.1:9902", PushResult::Error);
        t.push("gw.svc:9902", "10.0.0.1:9902", PushResult::Ok);
        t.push("gw.svc:9902", "10.0.0.2:9902", PushResult::Ok);
        t.discovery_error("file", "/etc/eps.yaml", "parse");
        t.discovery_error("file", "/etc/eps.yaml", "parse");
        t.round(321);
        let text = t.render(&snapshot());
        // Our own parser reads it back: the output is valid exposition text.
        let samples = exposition::parse(&text, |_| true).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let get = |name: &str, labels: &[(&str, &str)]| {
            samples
                .iter()
                .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
                .map(|s| s.value)
                .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
        };
        let pool = [("name", "we\"ird")];
        assert_eq!(
            get("inference_pool_average_kv_cache_utilization", &pool),
            0.375
        );
        assert_eq!(get("inference_pool_average_queue_size", &pool), 3.0);
        assert_eq!(get("inference_pool_ready_pods", &pool), 2.0);
        assert_eq!(get("inference_pool_endpoints", &pool), 3.0);
        assert_eq!(
            get(
                "inference_pool_endpoint_queue_size",
                &[("name", "we\"ird"), ("endpoint", "127.0.0.1:3")]
            ),
            50.0
        );
        assert_eq!(
            get(
                "inference_pool_endpoint_healthy",
                &[("endpoint", "127.0.0.1:3")]
            ),
            0.0
        );
        assert_eq!(
            get(
                "inference_collector_scrape_duration_seconds_bucket",
                &[("endpoint", "127.0.0.1:1"), ("le", "0.0025")]
            ),
            0.0
        );
        assert_eq!(
            get(
                "inference_collector_scrape_duration_seconds_bucket",
                &[("endpoint", "127.0.0.1:1"), ("le", "0.005")]
            ),
            1.0
        );
        assert_eq!(
            get(
                "inference_collector_scrape_errors_total",
                &[("endpoint", "127.0.0.1:3"), ("reason", "timeout")]
            ),
            1.0
        );
        assert_eq!(
            get(
                "inference_collector_push_total",
                &[("target", "127.0.0.1:9902"), ("result", "ok")]
            ),
            2.0
        );
        assert_eq!(
            get(
                "inference_collector_push_total",
                &[("target", "gw.svc:9902"), ("address", "10.0.0.2:9902")]
            ),
            1.0
        );
        assert_eq!(t.pushes("gw.svc:9902", PushResult::Ok), 2);
        assert_eq!(
            get(
                "inference_collector_discovery_errors_total",
                &[
                    ("source", "file"),
                    ("name", "/etc/eps.yaml"),
                    ("reason", "parse")
                ]
            ),
            2.0
        );
        assert_eq!(t.discovery_errors("file", "/etc/eps.yaml", "parse"), 2);
        assert_eq!(get("inference_collector_snapshot_bytes", &[]), 321.0);
        assert_eq!(get("inference_collector_snapshot_sequence", &[]), 9.0);

        let keep: HashSet<String> = ["127.0.0.1:1".to_string()].into();
        t.retain_endpoints(&keep);
        assert!(!t.render(&snapshot()).contains("reason=\"timeout\""));
        let keep: HashSet<(String, String)> =
            [("gw.svc:9902".to_string(), "10.0.0.1:9902".to_string())].into();
        t.retain_push_targets(&keep);
        assert_eq!(t.pushes("gw.svc:9902", PushResult::Ok), 1);
        assert_eq!(t.pushes("127.0.0.1:9902", PushResult::Ok), 0);
    }

    #[test]
    fn push_results() {
        assert_eq!(PushResult::from_status(204), PushResult::Ok);
        assert_eq!(PushResult::from_status(409), PushResult::Stale);
        assert_eq!(PushResult::from_status(401), PushResult::Rejected);
        assert_eq!(PushResult::from_status(503), PushResult::Error);
        assert!(!PushResult::Stale.backs_off() && PushResult::Error.backs_off());
    }
}
