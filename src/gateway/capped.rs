//! The pick for a pool with a backend policy (docs/backend-policy.md): drained and
//! capped endpoints are dropped, PREFERRED endpoints with room are scheduled
//! first and the rest spill to DEFAULT ones, and the in-flight count is taken
//! with a compare-and-swap that refuses at the cap, so admission is atomic with
//! the pick. A pool without a policy never comes here.

use super::choose::Refused;
use crate::config::Config;
use crate::inflight::{self, SharedStore};
use crate::openai::ApiError;
use crate::policy::{Applied, PoolPolicy};
use crate::scheduling::{self, Candidate, Decision, Outcome, Profile, Request, Saturation};

/// A routed request under a policy: the decision (indexes into the caller's
/// candidates, only the chosen one in `order`) and the key whose count it holds.
pub(super) struct Admitted {
    pub decision: Decision,
    pub holding: Option<u64>,
    /// Routed to a DEFAULT endpoint while the policy has PREFERRED ones (all
    /// of them full): a spill-over.
    pub spilled: bool,
}

/// Whether a PREFERRED endpoint without an in-flight cap counts as full: fresh
/// metrics at the saturation thresholds scaled by its capacity scaler.
fn full_by_metrics(c: &Candidate<'_>, a: &Applied, s: &Saturation) -> bool {
    let scale = f64::from(a.scaler_percent.min(100)) / 100.0;
    c.metrics.filter(|_| c.fresh).is_some_and(|m| {
        f64::from(m.waiting) >= f64::from(s.queue_depth) * scale
            || f64::from(m.kv_cache_utilization) >= s.kv_cache_utilization * scale
    })
}

/// Fresh metrics say the endpoint is down: a PREFERRED one then counts as full
/// (requests spill rather than fall back to it).
fn known_down(c: &Candidate<'_>) -> bool {
    c.metrics.filter(|_| c.fresh).is_some_and(|m| !m.healthy)
}

/// Schedules among `candidates` under `policy` and takes the chosen endpoint's
/// count. `key(i)` is candidate `i`'s in-flight key. Tries each candidate at most
/// once: one refused by the cap (another worker took the last slot) is dropped
/// and the choice is made again.
#[allow(clippy::too_many_arguments)]
pub(super) fn schedule(
    config: &Config,
    pool_name: &str,
    policy: &PoolPolicy,
    profile: &Profile,
    request: &Request<'_>,
    candidates: &[Candidate<'_>],
    key: &dyn Fn(usize) -> u64,
    store: &dyn SharedStore,
    now_ms: u64,
    draw: u32,
) -> Result<Admitted, Refused> {
    let sched = &config.scheduling;
    // An empty pool is not a capped one: the 503 says no endpoint, as without a policy.
    if candidates.is_empty() {
        return Err(Refused {
            shed: false,
            error: ApiError::no_endpoint(pool_name),
        });
    }
    let replicas = crate::auth::replicas(store);
    let applied: Vec<Applied> = candidates
        .iter()
        .map(|c| policy.applied_to(c.metrics))
        .collect();
    let caps: Vec<Option<u64>> = applied.iter().map(|a| a.in_flight_cap(replicas)).collect();
    let any_preferred = applied.iter().any(|a| a.preferred);
    let mut dropped = vec![false; candidates.len()];
    for _ in 0..=candidates.len() {
        let room =
            |i: usize| !dropped[i] && caps[i].is_none_or(|cap| candidates[i].in_flight < cap);
        let preferred: Vec<usize> = (0..candidates.len())
            .filter(|&i| {
                applied[i].preferred
                    && room(i)
                    && !known_down(&candidates[i])
                    && (!applied[i].capacity_by_metrics()
                        || !full_by_metrics(&candidates[i], &applied[i], &sched.saturation))
            })
            .collect();
        let spilled = preferred.is_empty() && any_preferred;
        let mut tier: Vec<usize> = if preferred.is_empty() {
            (0..candidates.len())
                .filter(|&i| !applied[i].preferred && room(i))
                .collect()
        } else {
            preferred
        };
        if tier.is_empty() {
            // No DEFAULT endpoint either: PREFERRED ones under their caps that
            // were full only by metrics or health, as the scheduler's own
            // fallbacks would take them without a policy.
            tier = (0..candidates.len()).filter(|&i| room(i)).collect();
        }
        if tier.is_empty() {
            return Err(all_capped(config, pool_name, request.priority));
        }
        let sub: Vec<Candidate<'_>> = tier.iter().map(|&i| candidates[i]).collect();
        let mut decision = match scheduling::schedule(sched, profile, request, &sub, draw) {
            Outcome::Route(d) => d,
            Outcome::Shed => {
                return Err(Refused {
                    shed: true,
                    error: ApiError::shed(pool_name, sched.retry_after_seconds),
                })
            }
            Outcome::NoEndpoint => return Err(all_capped(config, pool_name, request.priority)),
        };
        let chosen = tier[decision.chosen()];
        let k = key(chosen);
        let holding = match caps[chosen] {
            None => match inflight::add(store, k, 1) {
                Ok(_) => Some(k),
                Err(err) => {
                    log::warn!("inference-gateway: in-flight count for an uncapped endpoint not taken: {err:?}");
                    None
                }
            },
            Some(cap) => match inflight::add_capped(store, k, cap) {
                Ok(Some(_)) => Some(k),
                // Another worker took the last slot, or the count cannot be taken
                // (routing uncounted could exceed the cap): the next candidate.
                Ok(None) | Err(_) => {
                    dropped[chosen] = true;
                    continue;
                }
            },
        };
        // The rate cap after the in-flight one: a request refused here gives its
        // count back (a token taken for a request the in-flight cap refused
        // would be lost).
        if let Some(rate) = applied[chosen].rate_cap(replicas) {
            if !matches!(
                crate::policy::rate::take_shared(store, k, now_ms, rate),
                Ok(true)
            ) {
                if holding.is_some() {
                    let _ = inflight::add(store, k, -1);
                }
                dropped[chosen] = true;
                continue;
            }
        }
        // Only the chosen endpoint: a fallback Envoy retries on would bypass
        // the admission.
        decision.order = vec![chosen];
        for s in &mut decision.scored {
            s.index = tier[s.index];
        }
        return Ok(Admitted {
            decision,
            holding,
            spilled,
        });
    }
    Err(all_capped(config, pool_name, request.priority))
}

/// Every endpoint drained or at its cap: sheddable 429, others 503, both with
/// `retry-after` (docs/backend-policy.md, "When every endpoint is capped").
fn all_capped(config: &Config, pool_name: &str, priority: i32) -> Refused {
    let retry = config.scheduling.retry_after_seconds;
    if priority < 0 {
        Refused {
            shed: true,
            error: ApiError::shed(pool_name, retry),
        }
    } else {
        Refused {
            shed: false,
            error: ApiError::capacity_exhausted(pool_name, retry),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::gateway::{choose, plan_route, Choice, Inputs, Refused};
    use crate::inflight::{self, memory::MemoryStore, SharedStore};
    use crate::membership::Membership;
    use crate::openai::ApiKind;
    use crate::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};

    /// Zone a: .1 and .2; zone b: .3 and .4.
    const EPS: [(&str, &str); 4] = [
        ("127.0.0.1:1", "a"),
        ("127.0.0.1:2", "a"),
        ("127.0.0.1:3", "b"),
        ("127.0.0.1:4", "b"),
    ];

    fn config(policy: &str) -> Config {
        Config::from_json(
            format!(
                r#"{{"pools": [{{"name": "p"}}],
                     "models": [{{"name": "m", "pool": "p"}}],
                     "destination_list": true,
                     "scheduling": {{"fallback_endpoints": 2}},
                     "backend_policies": [{policy}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            generated_at_ms: 1_000,
            sequence: 1,
            collector: "t".into(),
            pools: vec![PoolSnapshot {
                name: "p".into(),
                endpoints: EPS
                    .iter()
                    .map(|(a, z)| EndpointMetrics {
                        address: a.to_string(),
                        healthy: true,
                        scraped_at_ms: 1_000,
                        labels: vec![("gke.io/zone".into(), z.to_string())],
                        ..Default::default()
                    })
                    .collect(),
            }],
        }
    }

    fn pick(
        cfg: &Config,
        members: &Membership,
        store: &MemoryStore,
        body: &str,
    ) -> Result<Choice, Refused> {
        let plan = plan_route(cfg, ApiKind::Completions, body.as_bytes(), None, 0).unwrap();
        choose(&Inputs {
            config: cfg,
            plan: &plan,
            members,
            store,
            prefix_store: store,
            now_ms: 1_050,
            draw: 7,
            subset: None,
            counts: crate::gateway::Counts::Shared(Default::default()),
        })
    }

    const REQ: &str = r#"{"model":"m","prompt":"hi"}"#;
    const SHEDDABLE: &str = r#"{"model":"m","prompt":"hi","priority":-1}"#;

    fn zone(c: &Choice) -> &'static str {
        EPS.iter().find(|(a, _)| *a == c.endpoint).unwrap().1
    }

    const PREFER_A: &str = r#"{"pool": "p", "default": {"max_in_flight_per_endpoint": 2},
        "scopes": [{"selector": {"gke.io/zone": "a"}, "backend_preference": "PREFERRED"}]}"#;

    #[test]
    fn preferred_take_everything_up_to_the_cap_then_spill_and_return() {
        let cfg = config(PREFER_A);
        let members = Membership::new(&cfg, Some(snapshot()));
        let store = MemoryStore::default();
        inflight::init(&store).unwrap();
        let mut held = Vec::new();
        // Capacity of zone a: 2 endpoints × 2.
        for _ in 0..4 {
            let c = pick(&cfg, &members, &store, REQ).unwrap();
            assert_eq!(zone(&c), "a");
            assert_eq!(c.destination, c.endpoint, "no fallbacks under a policy");
            held.push(c);
        }
        // The excess spills to zone b, up to its cap too.
        for _ in 0..4 {
            let c = pick(&cfg, &members, &store, REQ).unwrap();
            assert_eq!(zone(&c), "b");
            assert!(c.spilled);
            held.push(c);
        }
        assert!(held.iter().take(4).all(|c| !c.spilled));
        // Everything capped: 503 with retry-after, or 429 when sheddable.
        let r = pick(&cfg, &members, &store, REQ).unwrap_err();
        assert_eq!((r.shed, r.error.status), (false, 503));
        assert_eq!(r.error.code, "capacity_exhausted");
        assert!(r.error.headers.iter().any(|(k, _)| *k == "retry-after"));
        let r = pick(&cfg, &members, &store, SHEDDABLE).unwrap_err();
        assert_eq!((r.shed, r.error.status), (true, 429));
        for (a, _) in EPS {
            assert_eq!(
                inflight::count(&inflight::table(&store), inflight::key(a)),
                2
            );
        }
        // A zone-a slot frees: the next request returns to zone a.
        let first_a = held.iter().position(|c| zone(c) == "a").unwrap();
        inflight::add(&store, held[first_a].holding.unwrap(), -1).unwrap();
        let c = pick(&cfg, &members, &store, REQ).unwrap();
        assert_eq!(c.endpoint, held[first_a].endpoint);
    }

    #[test]
    fn an_empty_pool_is_no_endpoint_not_capacity_exhausted() {
        let cfg = config(PREFER_A);
        let mut snap = snapshot();
        snap.pools[0].endpoints.clear();
        let members = Membership::new(&cfg, Some(snap));
        let r = pick(&cfg, &members, &MemoryStore::default(), REQ).unwrap_err();
        assert_eq!((r.shed, r.error.status), (false, 503));
        assert_ne!(r.error.code, "capacity_exhausted");
    }

    #[test]
    fn a_zero_scaler_drains_and_the_replica_count_shares_the_cap() {
        let cfg = config(
            r#"{"pool": "p", "default": {"max_in_flight_per_endpoint": 4},
                "scopes": [{"selector": {"gke.io/zone": "b"}, "capacity_scaler_percent": 0}]}"#,
        );
        let members = Membership::new(&cfg, Some(snapshot()));
        let store = MemoryStore::default();
        inflight::init(&store).unwrap();
        // Two gateway replicas: each takes 4 / 2 = 2 per endpoint.
        store
            .set(crate::auth::REPLICAS_KEY, &2u32.to_le_bytes(), None)
            .unwrap();
        for _ in 0..4 {
            let c = pick(&cfg, &members, &store, REQ).unwrap();
            assert_eq!(zone(&c), "a", "zone b is drained");
        }
        let r = pick(&cfg, &members, &store, REQ).unwrap_err();
        assert_eq!(r.error.status, 503);
        for a in ["127.0.0.1:1", "127.0.0.1:2"] {
            assert_eq!(
                inflight::count(&inflight::table(&store), inflight::key(a)),
                2
            );
        }
    }

    #[test]
    fn a_preferred_endpoint_without_a_cap_spills_when_saturated() {
        let cfg = config(
            r#"{"pool": "p", "scopes": [{"selector": {"gke.io/zone": "a"}, "backend_preference": "PREFERRED"}]}"#,
        );
        let mut snap = snapshot();
        let members = Membership::new(&cfg, Some(snap.clone()));
        let store = MemoryStore::default();
        let c = pick(&cfg, &members, &store, REQ).unwrap();
        assert_eq!(zone(&c), "a");
        for e in &mut snap.pools[0].endpoints[..2] {
            e.waiting = 50;
        }
        let members = Membership::new(&cfg, Some(snap));
        let c = pick(&cfg, &members, &store, REQ).unwrap();
        assert_eq!(zone(&c), "b");
    }

    #[test]
    fn the_balancing_mode_decides_whether_saturation_makes_a_preferred_endpoint_full() {
        let mut snap = snapshot();
        for e in &mut snap.pools[0].endpoints[..2] {
            e.waiting = 50;
        }
        let zone_of_pick = |policy: &str| {
            let cfg = config(policy);
            let members = Membership::new(&cfg, Some(snap.clone()));
            zone(&pick(&cfg, &members, &MemoryStore::default(), REQ).unwrap())
        };
        // UTILIZATION: saturated zone a is full although under its in-flight cap.
        assert_eq!(
            zone_of_pick(
                r#"{"pool": "p", "default": {"balancing_mode": "UTILIZATION", "max_in_flight_per_endpoint": 8},
                    "scopes": [{"selector": {"gke.io/zone": "a"}, "backend_preference": "PREFERRED"}]}"#
            ),
            "b"
        );
        // RATE (or a rate cap without a mode): the bucket is the capacity, not the queue.
        for default in [
            r#"{"balancing_mode": "RATE", "max_rate_per_endpoint": 100}"#,
            r#"{"max_rate_per_endpoint": 100}"#,
        ] {
            let policy = format!(
                r#"{{"pool": "p", "default": {default},
                    "scopes": [{{"selector": {{"gke.io/zone": "a"}}, "backend_preference": "PREFERRED"}}]}}"#
            );
            assert_eq!(zone_of_pick(&policy), "a", "{default}");
        }
    }

    #[test]
    fn a_rate_cap_spills_when_the_preferred_buckets_are_empty() {
        let cfg = config(
            r#"{"pool": "p", "default": {"max_rate_per_endpoint": 10},
                "scopes": [{"selector": {"gke.io/zone": "a"}, "backend_preference": "PREFERRED"}]}"#,
        );
        let members = Membership::new(&cfg, Some(snapshot()));
        let store = MemoryStore::default();
        inflight::init(&store).unwrap();
        // A burst of 1 per endpoint at one instant: a, a, then b, b, then none.
        let mut zones = Vec::new();
        for _ in 0..4 {
            let c = pick(&cfg, &members, &store, REQ).unwrap();
            zones.push(zone(&c));
            inflight::add(&store, c.holding.unwrap(), -1).unwrap();
        }
        assert_eq!(zones, ["a", "a", "b", "b"]);
        let r = pick(&cfg, &members, &store, REQ).unwrap_err();
        assert_eq!(r.error.status, 503);
        assert!(inflight::table(&store).is_empty(), "refusals hold nothing");
    }

    #[test]
    fn unhealthy_preferred_endpoints_count_as_full() {
        let cfg = config(PREFER_A);
        let mut snap = snapshot();
        for e in &mut snap.pools[0].endpoints[..2] {
            e.healthy = false;
        }
        let members = Membership::new(&cfg, Some(snap));
        let store = MemoryStore::default();
        let c = pick(&cfg, &members, &store, REQ).unwrap();
        assert_eq!(zone(&c), "b");
        assert!(c.spilled);
        // Every endpoint PREFERRED and down: still routed (within the caps), as
        // without a policy.
        let cfg = config(
            r#"{"pool": "p", "default": {"backend_preference": "PREFERRED", "max_in_flight_per_endpoint": 1}}"#,
        );
        let mut snap = snapshot();
        for e in &mut snap.pools[0].endpoints {
            e.healthy = false;
        }
        let members = Membership::new(&cfg, Some(snap));
        let store = MemoryStore::default();
        for _ in 0..4 {
            pick(&cfg, &members, &store, REQ).unwrap();
        }
        assert_eq!(
            pick(&cfg, &members, &store, REQ).unwrap_err().error.status,
            503
        );
    }

    #[test]
    fn workers_racing_for_the_last_slots_never_exceed_the_cap() {
        let cfg = config(PREFER_A);
        let members = Membership::new(&cfg, Some(snapshot()));
        let store = MemoryStore::default();
        inflight::init(&store).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..300 {
                        if let Ok(c) = pick(&cfg, &members, &store, REQ) {
                            let t = inflight::table(&store);
                            for (a, _) in EPS {
                                assert!(inflight::count(&t, inflight::key(a)) <= 2);
                            }
                            inflight::add(&store, c.holding.unwrap(), -1).unwrap();
                        }
                    }
                });
            }
        });
        assert!(inflight::table(&store).is_empty());
    }
}
