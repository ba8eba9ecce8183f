//! Choosing the endpoint for a planned request: candidates from the pool, the
//! latest snapshot, the prefix index and the in-flight counts, then the scheduler.
//! The Wasm filter and the ext_proc picker both call [`choose`]; only the store,
//! the clock and the random draw come from the host.

use super::RoutePlan;
use crate::config::Config;
use crate::inflight::{self, SharedStore};
use crate::membership::{Membership, PreparedAt};
use crate::openai::ApiError;
use crate::scheduling::prefix::{self, PrefixIndex};
use crate::scheduling::{self, Candidate, Outcome, Request, ScorerKind};
use crate::snapshot::EndpointMetrics;

/// What one decision reads.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub plan: &'a RoutePlan,
    /// The pools' members under the latest snapshot from the collector (if any
    /// arrived), with its metrics.
    pub members: &'a Membership,
    /// Shared data: the in-flight counters.
    pub store: &'a dyn SharedStore,
    /// Shared data: the prefix index (the same store, or one that serves a
    /// worker's recent reads again: the index is a hint, not a count).
    pub prefix_store: &'a dyn SharedStore,
    pub now_ms: u64,
    /// A uniform random `u32` for the picker's tie-break.
    pub draw: u32,
    /// The Endpoint Picker Protocol's subset hint: when set, only these pool
    /// members (`ip:port`) may be picked; none of them a member is a 503.
    pub subset: Option<&'a [String]>,
    /// How the in-flight counts are read and the chosen endpoint's taken.
    pub counts: Counts<'a>,
}

/// Where a decision reads the in-flight counts and takes its own.
#[derive(Debug, Clone, Copy)]
pub enum Counts<'a> {
    /// From shared data, corrected by the host's changes not written yet; the
    /// take writes them with it (`inflight::read_with`, `take_after`).
    Shared(inflight::Unwritten<'a>),
    /// From the host's own recent view of the table (`inflight::Ledger`): no
    /// shared data is read or written, the host notes the take
    /// (`Choice::take_unwritten`). Never for a pool with a backend policy: its
    /// admission takes the count in shared data itself.
    Recent(&'a [u8]),
}

/// A routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub endpoint: String,
    /// The value for `x-gateway-destination-endpoint`: the endpoint, or with
    /// `destination_list` it and its fallbacks, comma-separated.
    pub destination: String,
    /// The in-flight key whose count was taken for `endpoint`; give it back when
    /// the stream ends.
    pub holding: Option<u64>,
    /// The scored candidates, when `scheduling.explain` is on.
    pub explanation: Option<String>,
    /// A backend policy's PREFERRED endpoints were all full: this went to a
    /// DEFAULT one.
    pub spilled: bool,
    /// The table as this decision wrote it (its take, with `Counts::Shared`'s
    /// unwritten changes, which the host forgets).
    pub written: Option<Vec<u8>>,
    /// `holding`'s count is taken on `Counts::Recent`'s view only: the host
    /// notes it, to be written later.
    pub take_unwritten: bool,
}

/// A request that is not routed, with the error the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Shed by priority (a 429), as opposed to no endpoint at all.
    pub shed: bool,
    pub error: ApiError,
}

/// Picks the endpoint, records the prompt's prefix against it and takes its
/// in-flight count.
pub fn choose(inputs: &Inputs<'_>) -> Result<Choice, Refused> {
    let Inputs {
        config,
        plan,
        members,
        store,
        prefix_store,
        now_ms,
        draw,
        subset,
        counts,
    } = *inputs;
    let (Some(pool), Some(profile)) = (
        config.pools.get(plan.pool),
        config.scheduling.profiles.get(plan.profile),
    ) else {
        return Err(Refused {
            shed: false,
            error: ApiError::internal("route names an unknown pool or profile"),
        });
    };
    let sched = &config.scheduling;

    // Prefix matches cost shared-data reads: only when the profile scores them.
    let pc = &sched.prefix_cache;
    let hashes = if profile
        .scorers
        .iter()
        .any(|&(k, w)| k == ScorerKind::PrefixCache && w > 0.0)
    {
        prefix::block_hashes(
            &plan.target_model,
            &plan.prompt,
            pc.block_bytes,
            pc.max_blocks,
        )
    } else {
        Vec::new()
    };
    let index = PrefixIndex::new(prefix_store, pc.index_slots, pc.ttl_ms);
    let matches = if hashes.is_empty() {
        Default::default()
    } else {
        index.matches(&hashes, now_ms)
    };

    // Every candidate's in-flight count from one read; everything else by
    // position in the membership built once per snapshot.
    let pool_members = members.members(plan.pool);
    let read = match counts {
        Counts::Shared(unwritten) => Some(inflight::read_with(store, unwritten)),
        Counts::Recent(_) => None,
    };
    let view: &[u8] = match counts {
        Counts::Recent(view) => view,
        Counts::Shared(_) => &[],
    };
    let table = read.as_ref().map_or(view, |r| r.table.as_slice());
    let crate::membership::InFlight {
        counts: in_flight,
        held: mut touched,
    } = members.in_flight(plan.pool, table);
    // `Snapshot::endpoint_is_fresh`, with the snapshot's own age checked once.
    let stale_after = config.snapshot_stale_after_ms;
    let snapshot_fresh = members
        .snapshot
        .as_ref()
        .is_some_and(|s| !s.is_stale(now_ms, stale_after));
    // Leading prompt blocks per member position: the few endpoints the index
    // matched, found by key (comparing every candidate's address with each of
    // them was a string comparison per candidate per match).
    let mut prefix_at = Vec::new();
    if !matches.is_empty() {
        prefix_at.resize(pool_members.len(), 0);
        for (endpoint, blocks) in matches.runs() {
            if let Some(i) = members.position(plan.pool, inflight::key(endpoint)) {
                prefix_at[i] = blocks;
                touched.push(i);
            }
        }
    }
    let is_fresh = |metrics: Option<&EndpointMetrics>| {
        snapshot_fresh
            && metrics.is_some_and(|m| {
                m.scraped_at_ms != 0 && now_ms.saturating_sub(m.scraped_at_ms) <= stale_after
            })
    };
    let candidate = |position: usize, in_flight: u64| {
        let member = &pool_members[position];
        let (endpoint, metrics) = members.address_and_metrics(member);
        Candidate {
            endpoint,
            in_flight,
            metrics,
            fresh: is_fresh(metrics),
            prefix_blocks: prefix_at.get(position).copied().unwrap_or(0),
        }
    };
    let policy = config.policy(plan.pool);

    // The common request (no backend policy, no subset hint, no adapter, no
    // explanation) is scored on the decision prepared once per snapshot: the
    // filters and the metric scorers are the same for every such request until a
    // member's metrics turn stale, so per request only the in-flight counts and
    // the prefix matches are added (`scheduling::finish`).
    let plain = policy.is_none()
        && subset.is_none()
        && !sched.explain
        && !plan
            .adapter
            .unwrap_or_else(|| members.reports_adapters(plan.pool));
    let request = |adapter: bool| Request {
        model: &plan.target_model,
        priority: plan.priority,
        adapter,
        prompt_blocks: hashes.len(),
    };
    let prepared = plain
        .then(|| {
            members.prepared(plan.pool, plan.profile, plan.priority < 0, now_ms, || {
                let candidates: Vec<Candidate<'_>> =
                    (0..pool_members.len()).map(|i| candidate(i, 0)).collect();
                PreparedAt {
                    prepared: scheduling::prepare(sched, profile, &request(false), &candidates),
                    from_ms: now_ms,
                    until_ms: fresh_until(
                        members,
                        pool_members,
                        snapshot_fresh,
                        now_ms,
                        stale_after,
                    ),
                }
            })
        })
        .flatten();

    // Member positions the request may go to: all, unless a subset hint narrows
    // them (a list of positions only then: it costs per candidate).
    let allowed: Option<Vec<usize>> = subset.map(|s| subset_positions(s, members, pool_members));
    let position = |i: usize| allowed.as_ref().map_or(i, |p| p[i]);
    let (mut taken, mut spilled, mut explanation) = (None, false, None);
    let outcome = if let Some(p) = prepared {
        scheduling::finish(
            sched,
            profile,
            &request(false),
            &p.prepared,
            |i| (in_flight[i], prefix_at.get(i).copied().unwrap_or(0)),
            Some(&touched),
            draw,
        )
    } else {
        let candidates: Vec<Candidate<'_>> = match &allowed {
            None => (0..pool_members.len())
                .zip(&in_flight)
                .map(|(i, &n)| candidate(i, n))
                .collect(),
            Some(positions) => positions
                .iter()
                .map(|&i| candidate(i, in_flight.get(i).copied().unwrap_or(0)))
                .collect(),
        };
        // A model the config does not mark is an adapter when a fresh replica
        // says so (no candidate is looked at when no member reports any adapter).
        let adapter = plan.adapter.unwrap_or_else(|| {
            members.reports_adapters(plan.pool)
                && candidates
                    .iter()
                    .filter(|c| c.fresh)
                    .filter_map(|c| c.metrics)
                    .any(|m| {
                        m.running_adapters.contains(&plan.target_model)
                            || m.waiting_adapters.contains(&plan.target_model)
                    })
        });
        let request = request(adapter);
        // A pool with a backend policy: caps, preference and an admission that is
        // atomic with the pick (gateway::capped).
        let outcome = match policy {
            None => scheduling::schedule(sched, profile, &request, &candidates, draw),
            Some(policy) => {
                let key = |i: usize| pool_members[position(i)].key;
                let admitted = super::capped::schedule(
                    config,
                    &pool.name,
                    policy,
                    profile,
                    &request,
                    &candidates,
                    &key,
                    store,
                    now_ms,
                    draw,
                )?;
                taken = Some(admitted.holding);
                spilled = admitted.spilled;
                Outcome::Route(admitted.decision)
            }
        };
        if let (true, Outcome::Route(decision)) = (sched.explain, &outcome) {
            explanation = Some(scheduling::explain(decision, &candidates));
        }
        outcome
    };
    let decision = match outcome {
        Outcome::Route(d) => d,
        Outcome::Shed => {
            return Err(Refused {
                shed: true,
                error: ApiError::shed(&pool.name, sched.retry_after_seconds),
            })
        }
        Outcome::NoEndpoint => {
            return Err(Refused {
                shed: false,
                error: ApiError::no_endpoint(&pool.name),
            })
        }
    };
    // A candidate index is a member position, or a subset's entry.
    let address = |i: usize| members.address(&pool_members[position(i)]);
    let chosen = decision.chosen();
    let endpoint = address(chosen).to_string();
    if !hashes.is_empty() {
        index.record_after(&hashes, &endpoint, now_ms, matches);
    }
    // Route anyway when the count cannot be taken: a missed count skews balancing
    // a little, a refusal fails the user.
    let key = pool_members[position(chosen)].key;
    // A backend policy's admission took the count itself, from a fresh read:
    // the releases wait for the next take.
    let (mut written, mut take_unwritten) = (None, false);
    let holding = match (taken, read) {
        (Some(held), _) => held,
        (None, None) => {
            take_unwritten = true;
            Some(key)
        }
        (None, Some(read)) => match inflight::take_after(store, read, key) {
            Ok(table) => {
                written = Some(table);
                Some(key)
            }
            Err(err) => {
                log::warn!("inference-gateway: in-flight count for {endpoint} not taken: {err:?}");
                None
            }
        },
    };
    let destination = if config.destination_list {
        decision
            .order
            .iter()
            .map(|&i| address(i))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        endpoint.clone()
    };
    Ok(Choice {
        explanation,
        endpoint,
        destination,
        holding,
        spilled,
        written,
        take_unwritten,
    })
}

/// Until when (host ms) every member's freshness stays as it is at `now_ms`: a
/// fresh member turns stale `stale_after` past its scrape, the snapshot past its
/// making; a stale one never turns fresh (only a new snapshot, a new membership,
/// brings newer metrics).
fn fresh_until(
    members: &Membership,
    pool_members: &[crate::membership::Member],
    snapshot_fresh: bool,
    now_ms: u64,
    stale_after: u64,
) -> u64 {
    let Some(snapshot) = members.snapshot.as_ref().filter(|_| snapshot_fresh) else {
        return u64::MAX;
    };
    let mut until = snapshot.generated_at_ms.saturating_add(stale_after);
    for m in pool_members {
        if let Some(metrics) = members.metrics(m) {
            let fresh_to = metrics.scraped_at_ms.saturating_add(stale_after);
            if metrics.scraped_at_ms != 0 && now_ms <= fresh_to {
                until = until.min(fresh_to);
            }
        }
    }
    until
}

/// The positions of the pool's members the subset hint lists. Out of line: the
/// filter never has a hint, and its per-request path stays as tight as before.
#[inline(never)]
fn subset_positions(
    subset: &[String],
    members: &Membership,
    pool_members: &[crate::membership::Member],
) -> Vec<usize> {
    (0..pool_members.len())
        .filter(|&i| in_subset(subset, members.address(&pool_members[i])))
        .collect()
}

/// Whether `address` is listed in the subset hint (entries compared as socket
/// addresses when they parse, so `[::1]:80` and `[0:0::1]:80` match).
fn in_subset(subset: &[String], address: &str) -> bool {
    let parsed = address.parse::<std::net::SocketAddr>().ok();
    subset.iter().any(|s| {
        let s = s.trim();
        s == address || (parsed.is_some() && s.parse::<std::net::SocketAddr>().ok() == parsed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::plan_route;
    use crate::inflight::memory::MemoryStore;
    use crate::openai::ApiKind;
    use crate::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};

    const EPS: [&str; 3] = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];

    fn config() -> Config {
        Config::from_json(
            br#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}],
                 "models": [{"name": "m", "pool": "p"}],
                 "destination_list": true,
                 "scheduling": {"explain": true, "fallback_endpoints": 1}}"#,
        )
        .unwrap()
    }

    /// Endpoint i has `waiting[i]` requests queued, scraped at `now`.
    fn snapshot(now: u64, waiting: [u32; 3]) -> Snapshot {
        let endpoints = EPS
            .iter()
            .zip(waiting)
            .map(|(a, w)| EndpointMetrics {
                address: a.to_string(),
                healthy: true,
                scraped_at_ms: now,
                waiting: w,
                ..Default::default()
            })
            .collect();
        Snapshot {
            generated_at_ms: now,
            sequence: 1,
            collector: "t".into(),
            pools: vec![PoolSnapshot {
                name: "p".into(),
                endpoints,
            }],
        }
    }

    fn run(
        cfg: &Config,
        body: &[u8],
        snap: &Snapshot,
        store: &MemoryStore,
    ) -> Result<Choice, Refused> {
        run_with(
            cfg,
            body,
            snap,
            store,
            None,
            Counts::Shared(Default::default()),
        )
    }

    /// [`run`] with a subset hint and a way to the counts.
    fn run_with(
        cfg: &Config,
        body: &[u8],
        snap: &Snapshot,
        store: &MemoryStore,
        subset: Option<&[String]>,
        counts: Counts<'_>,
    ) -> Result<Choice, Refused> {
        let plan = plan_route(cfg, ApiKind::Completions, body, None, 0).unwrap();
        choose(&Inputs {
            config: cfg,
            plan: &plan,
            members: &Membership::new(cfg, Some(snap.clone())),
            store,
            prefix_store: store,
            now_ms: 1_050,
            draw: 0,
            subset,
            counts,
        })
    }

    const HI: &[u8] = br#"{"model":"m","prompt":"hi"}"#;

    #[test]
    fn the_destination_lists_the_choice_then_its_fallbacks_and_the_count_is_taken() {
        let (cfg, store) = (config(), MemoryStore::default());
        let snap = snapshot(1_000, [9, 0, 3]);
        let c = run(&cfg, br#"{"model":"m","prompt":"hi"}"#, &snap, &store).unwrap();
        assert_eq!(c.endpoint, "127.0.0.1:2");
        assert_eq!(c.destination, "127.0.0.1:2,127.0.0.1:3");
        let key = inflight::key("127.0.0.1:2");
        assert_eq!(c.holding, Some(key));
        assert_eq!(inflight::count(&inflight::table(&store), key), 1);
        let text = c.explanation.unwrap();
        assert!(text.starts_with("127.0.0.1:2="), "{text}");
    }

    /// Changes the host has not written: the decision sees them, and the take
    /// writes them with its own count.
    #[test]
    fn unwritten_takes_and_releases_count_and_are_written_by_the_take() {
        let (cfg, store) = (config(), MemoryStore::default());
        let snap = snapshot(1_000, [0, 0, 0]);
        let k = |i: usize| inflight::key(EPS[i]);
        for (i, n) in [(0, 2), (1, 1), (2, 1)] {
            for _ in 0..n {
                inflight::add(&store, k(i), 1).unwrap();
            }
        }
        let pick = |taken: &[u64], released: &[u64]| {
            let unwritten = inflight::Unwritten { taken, released };
            run_with(&cfg, HI, &snap, &store, None, Counts::Shared(unwritten)).unwrap()
        };
        let counts = |t: &[u8]| [0, 1, 2].map(|i| inflight::count(t, k(i)));
        // Both of endpoint 0's streams ended and one more went to endpoint 1:
        // endpoint 0 is the idle one now.
        let c = pick(&[k(1)], &[k(0), k(0)]);
        assert_eq!(c.endpoint, EPS[0]);
        assert!(!c.take_unwritten);
        assert_eq!(
            counts(&inflight::table(&store)),
            [1, 2, 1],
            "all written with the take"
        );
        assert_eq!(
            c.written.as_deref(),
            Some(inflight::table(&store).as_slice())
        );
        let c = pick(&[], &[]);
        assert!(c.written.is_some(), "nothing held back: the take alone");
        assert_eq!(counts(&inflight::table(&store)).iter().sum::<u64>(), 5);
    }

    /// On a host's recent view the decision reads and writes no shared data: it
    /// picks by the view and leaves the take to the host.
    #[test]
    fn a_decision_on_a_recent_view_touches_no_shared_data() {
        let (cfg, store) = (config(), MemoryStore::default());
        let snap = snapshot(1_000, [0, 0, 0]);
        let k = |i: usize| inflight::key(EPS[i]);
        inflight::add(&store, k(2), 1).unwrap();
        // The view: endpoints 0 and 2 busy, 1 idle; shared data says 2 only.
        let mut view = Vec::new();
        inflight::apply(&mut view, k(0), 1);
        inflight::apply(&mut view, k(2), 1);
        let reads = store.reads();
        let c = run_with(&cfg, HI, &snap, &store, None, Counts::Recent(&view)).unwrap();
        assert_eq!(c.endpoint, EPS[1], "by the view, not by shared data");
        assert_eq!((c.holding, c.take_unwritten), (Some(k(1)), true));
        assert!(c.written.is_none());
        assert_eq!(store.reads(), reads, "no read");
        assert_eq!(
            inflight::count(&inflight::table(&store), k(1)),
            0,
            "no write"
        );
    }

    #[test]
    fn a_routed_prompt_is_remembered_for_the_next_one() {
        let (cfg, store) = (config(), MemoryStore::default());
        let snap = snapshot(1_000, [0, 0, 0]);
        let prompt = format!(
            r#"{{"model":"m","prompt":"{}"}}"#,
            "shared system prompt ".repeat(40)
        );
        let first = run(&cfg, prompt.as_bytes(), &snap, &store).unwrap();
        // Release the count so only the prefix index tells the endpoints apart.
        inflight::add(&store, first.holding.unwrap(), -1).unwrap();
        let second = run(&cfg, prompt.as_bytes(), &snap, &store).unwrap();
        assert_eq!(second.endpoint, first.endpoint);
        assert!(second.explanation.unwrap().contains("PrefixCache=1.00"));
    }

    #[test]
    fn a_sheddable_request_to_a_saturated_pool_is_refused_as_shed() {
        let (cfg, store) = (config(), MemoryStore::default());
        let snap = snapshot(1_000, [50, 50, 50]);
        let body = br#"{"model":"m","prompt":"hi","priority":-1}"#;
        let refused = run(&cfg, body, &snap, &store).unwrap_err();
        assert!(refused.shed);
        assert_eq!(refused.error.status, 429);
        assert!(inflight::table(&store).is_empty(), "no count taken");
        // Priority 0 is still served by the least-bad endpoint.
        assert!(run(&cfg, br#"{"model":"m","prompt":"hi"}"#, &snap, &store).is_ok());
    }

    #[test]
    fn members_come_from_the_snapshot_and_only_allowed_ones_are_routed_to() {
        let (cfg, store) = (config(), MemoryStore::default());
        let now = 1_000;
        let ep = |a: &str, waiting| EndpointMetrics {
            address: a.into(),
            healthy: true,
            scraped_at_ms: now,
            waiting,
            ..Default::default()
        };
        // 1 and 2 left the pool; 10.0.0.9 was never configured; 8.8.8.8 (idle,
        // so the best by metrics) is outside the allowed networks.
        let snap = Snapshot {
            generated_at_ms: now,
            sequence: 1,
            collector: "t".into(),
            pools: vec![PoolSnapshot {
                name: "p".into(),
                endpoints: vec![
                    ep("8.8.8.8:80", 0),
                    ep("10.0.0.9:8000", 0),
                    ep("127.0.0.1:3", 3),
                ],
            }],
        };
        for _ in 0..20 {
            let c = run(&cfg, br#"{"model":"m","prompt":"hi"}"#, &snap, &store).unwrap();
            assert_eq!(c.endpoint, "10.0.0.9:8000");
            assert_eq!(c.destination, "10.0.0.9:8000,127.0.0.1:3");
            inflight::add(&store, c.holding.unwrap(), -1).unwrap();
        }
        // A snapshot that lists the pool empty leaves no endpoint: 503, not the
        // bootstrap list.
        let mut empty = snap.clone();
        empty.pools[0].endpoints.clear();
        let refused = run(&cfg, br#"{"model":"m","prompt":"hi"}"#, &empty, &store).unwrap_err();
        assert_eq!(refused.error.status, 503);
    }

    /// The prepared decision (kept per snapshot, only in-flight counts and prefix
    /// matches added per request) routes exactly as the full one (`explain` on
    /// takes the full path): 12 rounds of three pools (two with queues, KV caches,
    /// health and scrape times drawn at random, one the snapshot does not list:
    /// ten members tied on every metric), 90 requests across them, under three
    /// profiles (both pickers, with and without metric scorers), members turning
    /// stale as the clock runs past their scrapes or is set back, sheddable and
    /// normal requests, prompts that share prefixes, counts taken as they are
    /// routed and given back.
    #[test]
    fn the_prepared_decision_routes_as_the_full_one() {
        // The default profile, one without metric scorers, and a weighted
        // random pick among the top 3.
        let profiles = ["default", "least-request", "wr"];
        // Pools p (6 members) and r (4) are in the snapshot, q (10) only in
        // the configuration.
        let eps = |host: u8, n: u16| -> Vec<String> {
            (1..=n).map(|p| format!("127.0.0.{host}:{p}")).collect()
        };
        let config = |explain: bool, profile: &str| {
            let quoted = |host, n| {
                eps(host, n)
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            Config::from_json(
                format!(
                    r#"{{"pools": [{{"name": "p", "endpoints": [{}]}},
                                   {{"name": "q", "endpoints": [{}]}},
                                   {{"name": "r", "endpoints": [{}]}}],
                         "models": [{{"name": "m", "pool": "p"}}, {{"name": "n", "pool": "q"}},
                                    {{"name": "o", "pool": "r"}}],
                         "destination_list": true,
                         "snapshot_stale_after_ms": 2000,
                         "scheduling": {{"explain": {explain}, "fallback_endpoints": 2,
                                         "default_profile": "{profile}",
                                         "profiles": [{{"name": "wr",
                                             "scorers": [{{"type": "queue", "weight": 1}},
                                                         {{"type": "in_flight", "weight": 1}}],
                                             "picker": {{"type": "weighted_random", "top_k": 3}}}}],
                                         "prefix_cache": {{"block_bytes": 4}}}}}}"#,
                    quoted(1, 6),
                    quoted(2, 10),
                    quoted(3, 4)
                )
                .as_bytes(),
            )
            .unwrap()
        };
        // A small linear congruential generator: the same draws every run.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let mut kinds = std::collections::BTreeSet::new();
        for round in 0..12 {
            let name = profiles[round % profiles.len()];
            let (fast_cfg, full_cfg) = (config(false, name), config(true, name));
            let profile = fast_cfg.scheduling.profile_index(name).unwrap();
            let mut pool = |name: &str, host: u8, n: u16| PoolSnapshot {
                name: name.into(),
                endpoints: eps(host, n)
                    .into_iter()
                    .map(|address| EndpointMetrics {
                        address,
                        healthy: next(8) != 0,
                        // Some scraped long before the snapshot: they turn stale
                        // mid-round.
                        scraped_at_ms: [0, 200, 600, 1_000][next(4) as usize],
                        waiting: next(10) as u32,
                        kv_cache_utilization: next(100) as f32 / 100.0,
                        ..Default::default()
                    })
                    .collect(),
            };
            let snap = Snapshot {
                generated_at_ms: 1_000,
                sequence: 1,
                collector: "t".into(),
                pools: vec![pool("p", 1, 6), pool("r", 3, 4)],
            };
            let fast_members = Membership::new(&fast_cfg, Some(snap.clone()));
            let full_members = Membership::new(&full_cfg, Some(snap));
            let (fast_store, full_store) = (MemoryStore::default(), MemoryStore::default());
            for n in 0..90u64 {
                // The clock crosses each scrape's staleness (2200, 2600, 3000),
                // and every seventh request it is set back half a second (a
                // member stale at the kept decision's time may be fresh again).
                let now_ms = 1_000 + n * 40 - if n % 7 == 6 { 500 } else { 0 };
                let priority = if next(3) == 0 { -1 } else { 0 };
                let prompt = ["abcdefgh", "abcdwxyz", "qrstuvwx"][next(3) as usize];
                let (model, pool) = [("m", "p"), ("n", "q"), ("o", "r")][next(3) as usize];
                let body = format!(
                    r#"{{"model":"{model}","prompt":"{prompt}{n}","priority":{priority}}}"#
                );
                let draw = next(u64::from(u32::MAX)) as u32;
                let choose_on = |cfg: &Config, members: &Membership, store: &MemoryStore| {
                    let plan =
                        plan_route(cfg, ApiKind::Completions, body.as_bytes(), None, 0).unwrap();
                    choose(&Inputs {
                        config: cfg,
                        plan: &plan,
                        members,
                        store,
                        prefix_store: store,
                        now_ms,
                        draw,
                        subset: None,
                        counts: Counts::Shared(Default::default()),
                    })
                    .map(|c| (c.destination, c.holding))
                    .map_err(|r| r.shed)
                };
                let fast = choose_on(&fast_cfg, &fast_members, &fast_store);
                let full = choose_on(&full_cfg, &full_members, &full_store);
                assert_eq!(
                    fast, full,
                    "round {round} ({name}), request {n} at {now_ms} ms"
                );
                // The fast one went through a kept decision: one holds now.
                let pool = fast_cfg.pools.iter().position(|p| p.name == pool).unwrap();
                assert!(fast_members
                    .prepared(pool, profile, priority < 0, now_ms, || {
                        panic!("no prepared decision kept at {now_ms} ms")
                    })
                    .is_some());
                kinds.insert(match &fast {
                    Ok((d, _)) => d.split(',').next().unwrap_or("").to_string(),
                    Err(shed) => format!("refused, shed: {shed}"),
                });
                // Some requests end: their counts are given back.
                if next(2) == 0 {
                    if let Ok((_, Some(key))) = fast {
                        inflight::release(&fast_store, &[key]).unwrap();
                        inflight::release(&full_store, &[key]).unwrap();
                    }
                }
            }
        }
        // The run went through several choices and through shedding.
        assert!(kinds.len() >= 4, "{kinds:?}");
        for host in ["127.0.0.1:", "127.0.0.2:", "127.0.0.3:"] {
            assert!(
                kinds.iter().any(|k| k.starts_with(host)),
                "{host} {kinds:?}"
            );
        }
        assert!(kinds.contains("refused, shed: true"), "{kinds:?}");
    }

    #[test]
    fn a_subset_hint_narrows_the_pick_and_an_empty_one_is_503() {
        let (cfg, store) = (config(), MemoryStore::default());
        // 127.0.0.1:2 is idle and would win; the hint allows 1 and 3 only.
        let snap = snapshot(1_000, [2, 0, 1]);
        let pick = |subset: &[String]| {
            run_with(
                &cfg,
                HI,
                &snap,
                &store,
                Some(subset),
                Counts::Shared(Default::default()),
            )
        };
        let hint = vec!["127.0.0.1:1".to_string(), " 127.0.0.1:3".to_string()];
        let c = pick(&hint).unwrap();
        assert_eq!(c.endpoint, "127.0.0.1:3");
        assert_eq!(
            c.destination, "127.0.0.1:3,127.0.0.1:1",
            "fallbacks from the subset too"
        );
        assert_eq!(c.holding, Some(inflight::key("127.0.0.1:3")));
        for hint in [vec![], vec!["10.9.9.9:1".to_string()]] {
            let refused = pick(&hint).unwrap_err();
            assert_eq!((refused.shed, refused.error.status), (false, 503));
        }
    }
}
