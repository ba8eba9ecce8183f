//! The endpoint picker as a separate process, the way GIE's EPP runs behind Envoy's
//! `ext_proc` filter: the same decisions as the Wasm filter (`gateway::plan_route`,
//! `scheduling::schedule`, the prefix index, in-flight counts), but held in this
//! process's memory and reached over gRPC for every request. The product is the
//! `endpoint-picker` binary (`crate::picker`: the Endpoint Picker Protocol, in
//! FULL_DUPLEX_STREAMED or BUFFERED body mode).
//!
//! Everything here is host-free: [`Picker::route`] calls the same
//! `gateway::plan_route` and `gateway::choose` as the filter's `GatewayStream`.

use crate::config::Config;
use crate::gateway::{self, HeadAction, RequestHead, RoutePlan};
use crate::inflight::{self, memory::MemoryStore, SharedStore};
use crate::ingest;
use crate::membership::Membership;
use crate::openai::{ApiError, ApiKind};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// Where a routed request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The value for `x-gateway-destination-endpoint`.
    pub destination: String,
    /// The endpoint whose in-flight count was taken (release it when the stream ends).
    pub holding: Option<String>,
    /// A rewritten body (weighted model rewrite), if any.
    pub new_body: Option<Vec<u8>>,
    /// The metrics labels: the model the client named and the one it is served as.
    pub model: String,
    pub target_model: String,
    pub priority: i32,
    /// The pool's backend policy samples this request out of the access log
    /// (set `x-gateway-access-log: skip`; errors are logged anyway).
    pub log_skipped: bool,
}

/// A request that is not routed: the error the client gets, and the metrics
/// labels when the body named a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrouted {
    pub labels: Option<(String, String)>,
    pub error: ApiError,
}

/// One routing decision's inputs.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub kind: ApiKind,
    pub body: &'a [u8],
    /// `x-gateway-inference-objective`.
    pub objective: Option<&'a str>,
    /// The Endpoint Picker Protocol's subset hint.
    pub subset: Option<&'a [String]>,
    pub now_ms: u64,
}

/// Requests a backend policy sent to a DEFAULT endpoint because every PREFERRED
/// one was full (the filter's Envoy counter of the same name).
pub const SPILL_TOTAL: &str = "inference_pool_spill_total";
/// Non-sheddable requests refused with 503 because every endpoint was drained or
/// at its cap.
pub const CAPACITY_REFUSED_TOTAL: &str = "inference_pool_capacity_refused_total";

/// `name{pool_name="pool"}`.
fn pool_series(name: &str, pool: &str) -> String {
    format!(
        "{name}{{pool_name=\"{}\"}}",
        crate::observe::render::esc(pool)
    )
}

/// The picker's state, shared by every gRPC stream.
pub struct Picker {
    pub config: Arc<Config>,
    store: MemoryStore,
    /// The pools' members under the newest snapshot (the bootstrap lists before one).
    members: RwLock<Arc<Membership>>,
    /// The stored snapshot, encoded, for `ingest::accept`'s newer-than check.
    encoded: Mutex<Option<Vec<u8>>>,
    /// Counters the filter keeps as Envoy metrics (the safety checks'), by
    /// Prometheus series (`name{label="value"}`).
    counters: Mutex<BTreeMap<String, u64>>,
}

impl Picker {
    pub fn new(config: Config) -> Picker {
        let store = MemoryStore::default();
        // A fresh in-memory store cannot refuse.
        let _ = inflight::init(&store);
        // The policy counters exist from the start (at 0), as in the filter.
        let counters = (0..config.pools.len())
            .filter(|&i| config.policy(i).is_some())
            .flat_map(|i| {
                let pool = &config.pools[i].name;
                [SPILL_TOTAL, CAPACITY_REFUSED_TOTAL].map(|c| (pool_series(c, pool), 0))
            })
            .collect();
        Picker {
            members: RwLock::new(Arc::new(Membership::new(&config, None))),
            config: Arc::new(config),
            store,
            encoded: Mutex::new(None),
            counters: Mutex::new(counters),
        }
    }

    /// Adds `by` to the counter `series` (`name{label="value",…}`).
    pub fn count(&self, series: &str, by: u64) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        match c.get_mut(series) {
            Some(v) => *v += by,
            None => {
                c.insert(series.to_string(), by);
            }
        }
    }

    /// The counters in Prometheus' text format.
    pub fn counters_text(&self) -> String {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut last = "";
        for (series, v) in c.iter() {
            let name = series.split('{').next().unwrap_or(series);
            if name != last {
                out.push_str(&format!("# TYPE {name} counter\n"));
                last = name;
            }
            out.push_str(&format!("{series} {v}\n"));
        }
        out
    }

    /// Whether a snapshot was stored (the endpoint picker is ready after its first
    /// discovery round).
    pub fn has_snapshot(&self) -> bool {
        self.encoded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The store holding in-flight counts, the prefix index and request metrics.
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// How many replicas share the backend-policy caps (each enforces its share,
    /// docs/backend-policy.md): from a collector's push, or `--gateway-replicas`.
    pub fn set_replicas(&self, n: u32) {
        // An in-memory store cannot refuse.
        let _ = self
            .store
            .set(crate::auth::REPLICAS_KEY, &n.max(1).to_le_bytes(), None);
    }

    /// The current members (for metrics and readiness).
    pub fn members(&self) -> Arc<Membership> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A pushed snapshot (`POST /v1/snapshot` body): kept if valid and newer.
    pub fn ingest(&self, body: &[u8]) -> Result<(), ApiError> {
        let mut encoded = self.encoded.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = ingest::accept(encoded.as_deref(), body)?;
        *encoded = Some(body.to_vec());
        let members = Membership::new(&self.config, Some(snapshot));
        if !members.refused.is_empty() {
            tracing::warn!(
                refused = ?members.refused,
                "snapshot members outside allowed_endpoint_cidrs (or not ip:port) are never routed to"
            );
        }
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(members);
        Ok(())
    }

    /// The request head: the same decision the filter makes in
    /// `on_http_request_headers`.
    pub fn head(&self, head: &RequestHead<'_>) -> HeadAction {
        gateway::on_request_head(&self.config, head)
    }

    /// The whole body: plan, pick, take the in-flight count. `draws` supplies the
    /// uniform random numbers (rewrite, tie-break), as the filter's RNG does.
    pub fn route(
        &self,
        kind: ApiKind,
        body: &[u8],
        objective: Option<&str>,
        now_ms: u64,
        draw: impl FnMut() -> u32,
    ) -> Result<Routed, ApiError> {
        self.route_request(
            &RouteRequest {
                kind,
                body,
                objective,
                subset: None,
                now_ms,
            },
            draw,
        )
        .map_err(|u| u.error)
    }

    /// [`Picker::route`] with the subset hint, keeping the metrics labels.
    pub fn route_request(
        &self,
        r: &RouteRequest<'_>,
        mut draw: impl FnMut() -> u32,
    ) -> Result<Routed, Box<Unrouted>> {
        let plan = self.plan(r, draw())?;
        self.pick(&plan, r.subset, r.now_ms, draw())
    }

    /// The first half of [`Picker::route_request`]: what the body asks for (model,
    /// pool, priority, prompt text). A prompt check runs between the halves.
    pub fn plan(&self, r: &RouteRequest<'_>, draw: u32) -> Result<RoutePlan, Box<Unrouted>> {
        gateway::plan_route(&self.config, r.kind, r.body, r.objective, draw).map_err(|error| {
            Box::new(Unrouted {
                labels: None,
                error,
            })
        })
    }

    /// The second half: the pick for a planned request.
    pub fn pick(
        &self,
        plan: &RoutePlan,
        subset: Option<&[String]>,
        now_ms: u64,
        draw: u32,
    ) -> Result<Routed, Box<Unrouted>> {
        self.forward(plan, subset, now_ms, draw).map_err(|error| {
            Box::new(Unrouted {
                labels: Some((plan.model.clone(), plan.target_model.clone())),
                error,
            })
        })
    }

    fn forward(
        &self,
        plan: &RoutePlan,
        subset: Option<&[String]>,
        now_ms: u64,
        draw: u32,
    ) -> Result<Routed, ApiError> {
        let members = self
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pool = self.config.pools.get(plan.pool).map(|p| p.name.as_str());
        let choice = gateway::choose(&gateway::Inputs {
            config: &self.config,
            plan,
            members: &members,
            store: &self.store,
            // One process: every read is a lock and a clone, not a host call.
            prefix_store: &self.store,
            now_ms,
            draw,
            subset,
            // One process: a release is a store update without a host call.
            counts: gateway::Counts::Shared(Default::default()),
        })
        .map_err(|refused| {
            if let (false, "capacity_exhausted", Some(pool)) =
                (refused.shed, refused.error.code, pool)
            {
                self.count(&pool_series(CAPACITY_REFUSED_TOTAL, pool), 1);
            }
            refused.error
        })?;
        if let (true, Some(pool)) = (choice.spilled, pool) {
            self.count(&pool_series(SPILL_TOTAL, pool), 1);
        }
        let log_skipped = self
            .config
            .policy(plan.pool)
            .and_then(|p| p.logging.as_ref())
            // The pick's draw, mixed: the sampling must not follow the tie-break.
            .is_some_and(|l| {
                let mixed = (xxhash_rust::xxh3::xxh3_64(&draw.to_le_bytes()) >> 32) as u32;
                !crate::policy::log_sampled(Some(l), mixed)
            });
        Ok(Routed {
            log_skipped,
            holding: choice.holding.map(|_| choice.endpoint),
            destination: choice.destination,
            new_body: plan.new_body.clone(),
            model: plan.model.clone(),
            target_model: plan.target_model.clone(),
            priority: plan.priority,
        })
    }

    /// Takes an in-flight count for `endpoint` (the data plane reported that a
    /// fallback, not the pick, served the request).
    pub fn take(&self, endpoint: &str) -> bool {
        inflight::add(&self.store, inflight::key(endpoint), 1).is_ok()
    }

    /// Gives back the in-flight count a [`Routed`] took.
    pub fn release(&self, endpoint: &str) {
        let _ = inflight::add(&self.store, inflight::key(endpoint), -1);
    }

    /// The backend policies' per-endpoint gauges of capacity and use.
    pub fn policy_gauges(&self) -> String {
        let members = self.members();
        let Some(snapshot) = &members.snapshot else {
            return String::new();
        };
        let policies = (0..self.config.pools.len())
            .filter_map(|i| Some((self.config.pools[i].name.as_str(), self.config.policy(i)?)));
        crate::policy::render_gauges(&crate::policy::endpoint_capacities(
            policies,
            snapshot,
            crate::auth::replicas(&self.store),
            &|a: &str| self.in_flight(a),
        ))
    }

    pub fn in_flight(&self, endpoint: &str) -> u64 {
        inflight::count(&inflight::table(&self.store), inflight::key(endpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};

    fn picker() -> Picker {
        let cfg = Config::from_json(
            br#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}],
                 "models": [{"name": "m", "pool": "p"}]}"#,
        )
        .unwrap();
        Picker::new(cfg)
    }

    fn snapshot(now: u64, waiting: [u32; 2], seq: u64) -> Vec<u8> {
        let ep = |a: &str, w| EndpointMetrics {
            waiting: w,
            ..endpoint(a, now)
        };
        encoded(
            now,
            seq,
            vec![ep("127.0.0.1:1", waiting[0]), ep("127.0.0.1:2", waiting[1])],
        )
    }

    /// A healthy endpoint of pool "p" scraped at `now`.
    fn endpoint(address: &str, now: u64) -> EndpointMetrics {
        EndpointMetrics {
            address: address.into(),
            healthy: true,
            scraped_at_ms: now,
            ..Default::default()
        }
    }

    /// A snapshot of pool "p" with `endpoints`, encoded for `Picker::ingest`.
    fn encoded(now: u64, seq: u64, endpoints: Vec<EndpointMetrics>) -> Vec<u8> {
        Snapshot {
            generated_at_ms: now,
            sequence: seq,
            collector: "t".into(),
            pools: vec![PoolSnapshot {
                name: "p".into(),
                endpoints,
            }],
        }
        .encode()
    }

    const BODY: &[u8] = br#"{"model":"m","prompt":"hello"}"#;

    #[test]
    fn the_pools_backend_policy_caps_and_samples_the_access_log() {
        let with = |policy: &str| {
            Picker::new(
                Config::from_json(
                    format!(
                        r#"{{"pools": [{{"name": "p", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}],
                             "models": [{{"name": "m", "pool": "p"}}],
                             "backend_policies": [{policy}]}}"#
                    )
                    .as_bytes(),
                )
                .unwrap(),
            )
        };
        let route =
            |p: &Picker, draw: u32| p.route(ApiKind::Completions, BODY, None, 1_100, || draw);
        assert!(
            !route(&picker(), 0).unwrap().log_skipped,
            "no policy: logged"
        );
        let off = with(r#"{"pool": "p", "logging": {"enabled": false}}"#);
        assert!(route(&off, 0).unwrap().log_skipped);
        let half = with(r#"{"pool": "p", "logging": {"sample_rate": 500000}}"#);
        let skipped = (0..1_000u32)
            .filter(|i| {
                route(&half, i.wrapping_mul(0x9e37_79b9))
                    .unwrap()
                    .log_skipped
            })
            .count();
        assert!((400..600).contains(&skipped), "{skipped}");
        // One in flight per endpoint: the third request is refused (503).
        let capped = with(r#"{"pool": "p", "default": {"max_in_flight_per_endpoint": 1}}"#);
        assert!(route(&capped, 0).is_ok());
        assert!(route(&capped, 0).is_ok());
        assert_eq!(route(&capped, 0).unwrap_err().status, 503);
        capped.release("127.0.0.1:1");
        assert_eq!(route(&capped, 0).unwrap().destination, "127.0.0.1:1");
    }

    #[test]
    fn spills_and_capacity_refusals_are_counted_per_pool() {
        let p = Picker::new(
            Config::from_json(
                br#"{"pools": [{"name": "p", "endpoints": []}, {"name": "q", "endpoints": []}],
                     "models": [{"name": "m", "pool": "p"}],
                     "backend_policies": [{"pool": "p",
                        "default": {"max_in_flight_per_endpoint": 1},
                        "scopes": [{"selector": {"zone": "a"}, "backend_preference": "PREFERRED"}]}]}"#,
            )
            .unwrap(),
        );
        let counter = |name: &str| -> Option<u64> {
            p.counters_text().lines().find_map(|l| {
                l.strip_prefix(&format!("{name}{{pool_name=\"p\"}} "))?
                    .parse()
                    .ok()
            })
        };
        // Defined at 0 before any request; none for the pool without a policy.
        assert_eq!(counter(SPILL_TOTAL), Some(0));
        assert_eq!(counter(CAPACITY_REFUSED_TOTAL), Some(0));
        assert!(!p.counters_text().contains("pool_name=\"q\""));
        let ep = |a: &str, zone: &str| EndpointMetrics {
            labels: vec![("zone".into(), zone.into())],
            ..endpoint(a, 1_000)
        };
        let snap = encoded(
            1_000,
            1,
            vec![ep("127.0.0.1:1", "a"), ep("127.0.0.1:2", "b")],
        );
        p.ingest(&snap).unwrap();
        let route = || p.route(ApiKind::Completions, BODY, None, 1_100, || 0);
        assert_eq!(route().unwrap().destination, "127.0.0.1:1");
        assert_eq!(counter(SPILL_TOTAL), Some(0), "the preferred one had room");
        assert_eq!(route().unwrap().destination, "127.0.0.1:2");
        assert_eq!(counter(SPILL_TOTAL), Some(1));
        assert_eq!(route().unwrap_err().status, 503);
        assert_eq!(counter(CAPACITY_REFUSED_TOTAL), Some(1));
        let gauges = p.policy_gauges();
        for (endpoint, preferred) in [("127.0.0.1:1", 1), ("127.0.0.1:2", 0)] {
            let l = format!("{{pool_name=\"p\",endpoint=\"{endpoint}\"}}");
            for line in [
                format!("inference_pool_endpoint_in_flight_cap{l} 1"),
                format!("inference_pool_endpoint_in_flight{l} 1"),
                format!("inference_pool_endpoint_preferred{l} {preferred}"),
            ] {
                assert!(gauges.lines().any(|g| g == line), "{line}\n{gauges}");
            }
        }
        // A sheddable request refused at the caps is a shed, not this counter.
        let sheddable = br#"{"model":"m","prompt":"hello","priority":-1}"#;
        let e = p
            .route(ApiKind::Completions, sheddable, None, 1_100, || 0)
            .unwrap_err();
        assert_eq!(e.status, 429);
        assert_eq!(counter(CAPACITY_REFUSED_TOTAL), Some(1));
    }

    /// Two picker replicas: each admits its share of a cap of 4, then refuses.
    #[test]
    fn each_picker_replica_enforces_its_share_of_a_cap() {
        let p = Picker::new(
            Config::from_json(
                br#"{"pools": [{"name": "p", "endpoints": []}],
                     "models": [{"name": "m", "pool": "p"}],
                     "backend_policies": [{"pool": "p", "default": {"max_in_flight_per_endpoint": 4}}]}"#,
            )
            .unwrap(),
        );
        p.ingest(&encoded(1_000, 1, vec![endpoint("127.0.0.1:1", 1_000)]))
            .unwrap();
        p.set_replicas(2);
        let route = || p.route(ApiKind::Completions, BODY, None, 1_100, || 0);
        assert!(route().is_ok() && route().is_ok());
        assert_eq!(route().unwrap_err().status, 503, "2 of 4 for this replica");
        assert!(p.policy_gauges().contains(
            "inference_pool_endpoint_in_flight_cap{pool_name=\"p\",endpoint=\"127.0.0.1:1\"} 2"
        ));
    }

    #[test]
    fn replica_counts_outside_the_range_are_not_believed() {
        use crate::ingest::parse_replicas;
        assert_eq!(parse_replicas(Some(" 3 ")), Some(3));
        for v in [None, Some("0"), Some("1025"), Some("-1"), Some("two")] {
            assert_eq!(parse_replicas(v), None, "{v:?}");
        }
    }

    #[test]
    fn routes_by_the_snapshot_and_counts_in_flight() {
        let p = picker();
        p.ingest(&snapshot(1_000, [4, 0], 1)).unwrap();
        let r = p
            .route(ApiKind::Completions, BODY, None, 1_100, || 0)
            .unwrap();
        assert_eq!(r.destination, "127.0.0.1:2");
        assert_eq!(p.in_flight("127.0.0.1:2"), 1);
        p.release("127.0.0.1:2");
        assert_eq!(p.in_flight("127.0.0.1:2"), 0);
        // An older snapshot is refused; a newer one flips the choice.
        assert_eq!(p.ingest(&snapshot(900, [0, 4], 1)).unwrap_err().status, 409);
        p.ingest(&snapshot(1_200, [0, 4], 2)).unwrap();
        let r = p
            .route(ApiKind::Completions, BODY, None, 1_300, || 0)
            .unwrap();
        assert_eq!(r.destination, "127.0.0.1:1");
    }

    #[test]
    fn members_come_from_the_snapshot_as_in_the_filter() {
        let p = picker();
        let snap = |seq: u64, eps: &[&str]| {
            Snapshot {
                generated_at_ms: 1_000 + seq,
                sequence: seq,
                collector: "t".into(),
                pools: vec![PoolSnapshot {
                    name: "p".into(),
                    endpoints: eps
                        .iter()
                        .map(|a| EndpointMetrics {
                            address: a.to_string(),
                            healthy: true,
                            scraped_at_ms: 1_000 + seq,
                            ..Default::default()
                        })
                        .collect(),
                }],
            }
            .encode()
        };
        // Neither configured endpoint is left; one never configured joined; an
        // address outside the allowed networks is never picked.
        p.ingest(&snap(1, &["8.8.8.8:80", "10.0.0.5:8000"]))
            .unwrap();
        for _ in 0..10 {
            let r = p
                .route(ApiKind::Completions, BODY, None, 1_100, || 0)
                .unwrap();
            assert_eq!(r.destination, "10.0.0.5:8000");
            p.release(r.holding.as_deref().unwrap());
        }
        assert_eq!(p.in_flight("10.0.0.5:8000"), 0);
    }

    #[test]
    fn bad_bodies_get_the_filter_errors() {
        let p = picker();
        let e = p
            .route(ApiKind::Completions, b"{", None, 0, || 0)
            .unwrap_err();
        assert_eq!((e.status, e.code), (400, "invalid_json"));
        let e = p
            .route(
                ApiKind::Completions,
                br#"{"model":"x","prompt":"a"}"#,
                None,
                0,
                || 0,
            )
            .unwrap_err();
        assert_eq!(e.status, 404);
    }
}
