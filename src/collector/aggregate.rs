//! Pure round logic: which endpoints exist (config + DNS answers), what each
//! scrape left behind, the health rule, the snapshot a round pushes, and the
//! pool aggregates the collector's `/metrics` serves.

use super::config::{PoolSpec, ServerType, Source};
use super::mapping::Mapped;
use crate::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// One endpoint of one pool, after discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: SocketAddr,
    pub server_type: ServerType,
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolTargets {
    pub name: String,
    pub targets: Vec<Target>,
}

/// Resolves the configured pools against DNS answers (host name → addresses)
/// and adds the endpoints each pool's endpoints file lists (`files[i]` for
/// `pools[i]`, after the configured ones). A DNS source without an answer
/// contributes nothing; an address listed twice in a pool is kept once (first
/// entry wins), and an address is scraped as the server type it was first given.
pub fn resolve_targets(
    pools: &[PoolSpec],
    dns: &HashMap<String, Vec<IpAddr>>,
    files: &[Vec<Target>],
) -> Vec<PoolTargets> {
    let mut types: HashMap<SocketAddr, ServerType> = HashMap::new();
    pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut targets: Vec<Target> = Vec::new();
            let configured = p.endpoints.iter().flat_map(|e| {
                let addrs: Vec<SocketAddr> = match &e.source {
                    Source::Static(a) => vec![*a],
                    Source::Dns { host, port } => dns
                        .get(host)
                        .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, *port)).collect())
                        .unwrap_or_default(),
                };
                addrs
                    .into_iter()
                    .map(move |address| (address, e.server_type, &e.labels))
            });
            let listed = files
                .get(i)
                .into_iter()
                .flatten()
                .map(|t| (t.address, t.server_type, &t.labels));
            for (address, server_type, labels) in configured.chain(listed) {
                let server_type = *types.entry(address).or_insert(server_type);
                if targets.iter().all(|t| t.address != address) {
                    targets.push(Target {
                        address,
                        server_type,
                        labels: labels.clone(),
                    });
                }
            }
            PoolTargets {
                name: p.name.clone(),
                targets,
            }
        })
        .collect()
}

/// Every distinct address with its server type (what to scrape).
pub fn scrape_set(pools: &[PoolTargets]) -> Vec<(SocketAddr, ServerType)> {
    let mut seen = std::collections::HashSet::new();
    pools
        .iter()
        .flat_map(|p| &p.targets)
        .filter(|t| seen.insert(t.address))
        .map(|t| (t.address, t.server_type))
        .collect()
}

/// What the scrapes of one endpoint have left behind.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScrapeState {
    /// The most recent completed scrape succeeded.
    pub last_ok: bool,
    /// Unix ms of the last successful scrape; 0 if never.
    pub last_success_ms: u64,
    /// From the last successful scrape.
    pub metrics: Mapped,
    pub last_error: Option<String>,
}

/// Healthy: the last completed scrape succeeded, and it is recent. The age check
/// catches an endpoint that hangs: its scrape has not completed (so `last_ok`
/// still says true) but a scrape should have finished within a timeout plus an
/// interval of the last success.
pub fn is_healthy(state: &ScrapeState, now_ms: u64, max_age_ms: u64) -> bool {
    state.last_ok
        && state.last_success_ms != 0
        && now_ms.saturating_sub(state.last_success_ms) <= max_age_ms
}

/// The snapshot one round pushes. Endpoints not scraped yet are unhealthy with
/// zero metrics; unhealthy endpoints keep their last known metrics.
pub fn build_snapshot(
    pools: &[PoolTargets],
    states: &HashMap<SocketAddr, ScrapeState>,
    now_ms: u64,
    max_age_ms: u64,
    sequence: u64,
    collector: &str,
) -> Snapshot {
    let empty = ScrapeState::default();
    Snapshot {
        generated_at_ms: now_ms,
        sequence,
        collector: collector.to_string(),
        pools: pools
            .iter()
            .map(|p| PoolSnapshot {
                name: p.name.clone(),
                endpoints: p
                    .targets
                    .iter()
                    .map(|t| {
                        let s = states.get(&t.address).unwrap_or(&empty);
                        EndpointMetrics {
                            address: t.address.to_string(),
                            healthy: is_healthy(s, now_ms, max_age_ms),
                            scraped_at_ms: s.last_success_ms,
                            kv_cache_utilization: s.metrics.kv_cache_utilization,
                            waiting: s.metrics.waiting,
                            running: s.metrics.running,
                            running_adapters: s.metrics.running_adapters.clone(),
                            waiting_adapters: s.metrics.waiting_adapters.clone(),
                            max_lora: s.metrics.max_lora,
                            server_type: t.server_type.as_str().to_string(),
                            labels: t.labels.clone(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// GIE's pool gauges: averages over the healthy endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolAggregate {
    pub name: String,
    pub average_kv_cache_utilization: f64,
    pub average_queue_size: f64,
    pub ready_pods: usize,
    pub endpoints: usize,
}

/// One aggregate per pool; with no healthy endpoint the averages are 0 (as GIE's
/// endpoint picker reports them).
pub fn aggregate(snapshot: &Snapshot) -> Vec<PoolAggregate> {
    snapshot
        .pools
        .iter()
        .map(|p| {
            let healthy: Vec<&EndpointMetrics> = p.endpoints.iter().filter(|e| e.healthy).collect();
            let n = healthy.len();
            let avg = |f: &dyn Fn(&EndpointMetrics) -> f64| {
                if n == 0 {
                    0.0
                } else {
                    healthy.iter().map(|e| f(e)).sum::<f64>() / n as f64
                }
            };
            PoolAggregate {
                name: p.name.clone(),
                average_kv_cache_utilization: avg(&|e| f64::from(e.kv_cache_utilization)),
                average_queue_size: avg(&|e| f64::from(e.waiting)),
                ready_pods: n,
                endpoints: p.endpoints.len(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::config::EndpointSpec;

    fn spec(name: &str, sources: &[(&str, ServerType)]) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            endpoints_file: None,
            target_ports: vec![],
            server_type: ServerType::Vllm,
            labels: Default::default(),
            endpoints: sources
                .iter()
                .map(|(s, t)| EndpointSpec {
                    source: crate::collector::config::parse_source(s).unwrap(),
                    server_type: *t,
                    labels: vec![("zone".into(), s.to_string())],
                })
                .collect(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn discovery_merges_static_and_dns() {
        let pools = vec![
            spec(
                "a",
                &[
                    ("10.0.0.1:8000", ServerType::Vllm),
                    ("svc.local:8000", ServerType::Vllm),
                ],
            ),
            spec("b", &[("10.0.0.2:8000", ServerType::Sglang)]),
        ];
        let mut dns = HashMap::new();
        let t = resolve_targets(&pools, &dns, &[]);
        assert_eq!(t[0].targets.len(), 1, "unresolved DNS contributes nothing");
        dns.insert(
            "svc.local".into(),
            vec![
                "10.0.0.1".parse().unwrap(),
                "10.0.0.3".parse().unwrap(),
                "10.0.0.3".parse().unwrap(),
            ],
        );
        let t = resolve_targets(&pools, &dns, &[]);
        let a: Vec<String> = t[0].targets.iter().map(|t| t.address.to_string()).collect();
        assert_eq!(a, ["10.0.0.1:8000", "10.0.0.3:8000"], "deduplicated");
        assert_eq!(
            t[0].targets[1].labels,
            vec![("zone".into(), "svc.local:8000".into())]
        );
        assert_eq!(
            scrape_set(&t),
            vec![
                (addr("10.0.0.1:8000"), ServerType::Vllm),
                (addr("10.0.0.3:8000"), ServerType::Vllm),
                (addr("10.0.0.2:8000"), ServerType::Sglang)
            ]
        );

        // Endpoints files add members after the configured ones; an address the
        // configuration already has is kept once, with its configured labels.
        let file = |a: &str, t: ServerType| Target {
            address: addr(a),
            server_type: t,
            labels: vec![("from".into(), "file".into())],
        };
        let files = vec![
            vec![
                file("10.0.0.1:8000", ServerType::Vllm),
                file("10.0.0.9:8000", ServerType::Vllm),
            ],
            vec![file("10.0.0.3:8000", ServerType::Sglang)],
        ];
        let t = resolve_targets(&pools, &dns, &files);
        let a: Vec<String> = t[0].targets.iter().map(|t| t.address.to_string()).collect();
        assert_eq!(a, ["10.0.0.1:8000", "10.0.0.3:8000", "10.0.0.9:8000"]);
        assert_eq!(t[0].targets[2].labels, vec![("from".into(), "file".into())]);
        assert_eq!(t[0].targets[0].labels[0].0, "zone");
        let b: Vec<String> = t[1].targets.iter().map(|t| t.address.to_string()).collect();
        assert_eq!(b, ["10.0.0.2:8000", "10.0.0.3:8000"]);
        assert_eq!(
            t[1].targets[1].server_type,
            ServerType::Vllm,
            "one address, one scrape type: the first pool's"
        );
    }

    #[test]
    fn health_rule() {
        let ok = ScrapeState {
            last_ok: true,
            last_success_ms: 1_000,
            ..Default::default()
        };
        assert!(is_healthy(&ok, 1_500, 550));
        assert!(!is_healthy(&ok, 1_551, 550), "a hung endpoint ages out");
        let failed = ScrapeState {
            last_ok: false,
            ..ok.clone()
        };
        assert!(!is_healthy(&failed, 1_000, 550));
        assert!(!is_healthy(&ScrapeState::default(), 0, 550));
    }

    #[test]
    fn snapshot_and_aggregates() {
        let pools = vec![PoolTargets {
            name: "main".into(),
            targets: ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
                .iter()
                .map(|a| Target {
                    address: addr(a),
                    server_type: ServerType::Vllm,
                    labels: vec![],
                })
                .collect(),
        }];
        let mut states = HashMap::new();
        let m = |kv: f32, waiting: u32| Mapped {
            kv_cache_utilization: kv,
            waiting,
            running: 1,
            ..Default::default()
        };
        states.insert(
            addr("127.0.0.1:1"),
            ScrapeState {
                last_ok: true,
                last_success_ms: 990,
                metrics: m(0.2, 2),
                last_error: None,
            },
        );
        states.insert(
            addr("127.0.0.1:2"),
            ScrapeState {
                last_ok: true,
                last_success_ms: 995,
                metrics: m(0.6, 6),
                last_error: None,
            },
        );
        // Down since its last success: excluded from the averages, metrics kept.
        states.insert(
            addr("127.0.0.1:3"),
            ScrapeState {
                last_ok: false,
                last_success_ms: 500,
                metrics: m(1.0, 100),
                last_error: Some("connection refused".into()),
            },
        );
        let s = build_snapshot(&pools, &states, 1_000, 550, 7, "c-x");
        assert_eq!(
            (s.generated_at_ms, s.sequence, s.collector.as_str()),
            (1_000, 7, "c-x")
        );
        let eps = &s.pools[0].endpoints;
        assert_eq!(
            eps.iter().map(|e| e.healthy).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert_eq!(eps[2].waiting, 100);
        assert_eq!(eps[2].scraped_at_ms, 500);
        assert_eq!(eps[0].server_type, "vllm");
        assert!(Snapshot::decode(&s.encode()).is_ok());
        let a = &aggregate(&s)[0];
        assert_eq!(a.ready_pods, 2);
        assert_eq!(a.endpoints, 3);
        assert!((a.average_kv_cache_utilization - 0.4).abs() < 1e-6);
        assert!((a.average_queue_size - 4.0).abs() < 1e-9);

        let none = build_snapshot(&pools, &HashMap::new(), 1_000, 550, 8, "c-x");
        assert!(none.pools[0]
            .endpoints
            .iter()
            .all(|e| !e.healthy && e.scraped_at_ms == 0));
        let a = &aggregate(&none)[0];
        assert_eq!((a.ready_pods, a.average_queue_size), (0, 0.0));
    }
}
