//! Which endpoints each pool has right now: the members the newest snapshot lists
//! for it (the collector follows DNS, endpoint files and static lists), or, until a
//! snapshot names the pool, the bootstrap `pools[].endpoints` of the configuration.
//!
//! Built once per snapshot per worker (the filter) or per push (the ext_proc
//! picker), so a request reads every candidate's address, metrics and in-flight key
//! by position. A pushed member is accepted only as a canonical `ip:port` inside
//! `allowed_endpoint_cidrs`: whoever holds the ingest token can name members, and
//! the member becomes Envoy's upstream, so anything else is refused here, once.

use crate::config::Config;
use crate::inflight;
use crate::scheduling;
use crate::snapshot::{EndpointMetrics, Snapshot};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

/// One endpoint a request of its pool may go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its key in the in-flight table ([`inflight::key`] of the address).
    pub key: u64,
    /// Where its address is: a snapshot endpoint or a configured one.
    source: Source,
    /// Its metrics in the snapshot: `(pool, endpoint)` positions.
    metrics: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Snapshot { pool: u32, endpoint: u32 },
    Config { pool: u32, endpoint: u32 },
}

/// A pool's members, and their in-flight keys sorted for lookup.
#[derive(Debug, Clone, Default)]
struct PoolMembers {
    members: Vec<Member>,
    /// `(key, member index)`, sorted by key.
    by_key: Vec<(u64, u32)>,
    from_snapshot: bool,
    /// Some member's metrics list a running or waiting LoRA adapter.
    reports_adapters: bool,
}

/// Every configured pool's members under one snapshot (or none).
#[derive(Debug, Default)]
pub struct Membership {
    pub snapshot: Option<Snapshot>,
    /// By configured pool index.
    pools: Vec<PoolMembers>,
    bootstrap: Vec<Vec<String>>,
    /// Snapshot members refused: not a canonical `ip:port`, port 0, or outside
    /// `allowed_endpoint_cidrs`. Reported, never routed to.
    pub refused: Vec<String>,
    /// Decisions prepared over these members (`gateway::choose`): one per pool,
    /// profile and request kind (sheddable or not), made by the first request
    /// that needs it, made again when a member's metrics turn stale. Behind a
    /// lock: the picker's threads share a membership.
    prepared: Vec<RwLock<Option<Arc<PreparedAt>>>>,
    profiles: usize,
}

/// A [`scheduling::Prepared`] and the host times between which it holds: no
/// member's metrics turn fresh or stale in between.
#[derive(Debug, Clone)]
pub struct PreparedAt {
    pub prepared: scheduling::Prepared,
    pub from_ms: u64,
    pub until_ms: u64,
}

impl PreparedAt {
    pub fn holds_at(&self, now_ms: u64) -> bool {
        (self.from_ms..=self.until_ms).contains(&now_ms)
    }
}

impl Membership {
    /// The members of `config`'s pools under `snapshot`: a pool the snapshot lists
    /// has exactly the snapshot's members (none, if it lists none), any other pool
    /// its configured endpoints.
    pub fn new(config: &Config, snapshot: Option<Snapshot>) -> Membership {
        let mut refused = Vec::new();
        // Metrics of configured endpoints of pools the snapshot does not list:
        // found by address, wherever the collector reports them.
        let mut by_address: Option<HashMap<&str, (u32, u32)>> = None;
        let mut pools = Vec::with_capacity(config.pools.len());
        for (ci, pool) in config.pools.iter().enumerate() {
            let listed = snapshot
                .as_ref()
                .and_then(|s| s.pools.iter().position(|p| p.name == pool.name));
            let mut members = Vec::new();
            match (snapshot.as_ref(), listed) {
                (Some(s), Some(p)) => {
                    // Keys seen in this pool: a linear check per member would make
                    // every snapshot quadratic in the pool size, in every worker.
                    let mut seen =
                        std::collections::HashSet::with_capacity(s.pools[p].endpoints.len());
                    for (e, ep) in s.pools[p].endpoints.iter().enumerate() {
                        if !acceptable(config, &ep.address) {
                            refused.push(ep.address.clone());
                            continue;
                        }
                        let key = inflight::key(&ep.address);
                        // A member listed twice is one member.
                        if !seen.insert(key) {
                            continue;
                        }
                        let at = (p as u32, e as u32);
                        members.push(Member {
                            key,
                            source: Source::Snapshot {
                                pool: at.0,
                                endpoint: at.1,
                            },
                            metrics: Some(at),
                        });
                    }
                }
                (s, _) => {
                    let index = s.map(|s| {
                        &*by_address.get_or_insert_with(|| {
                            let mut m = HashMap::new();
                            for (p, pool) in s.pools.iter().enumerate() {
                                for (e, ep) in pool.endpoints.iter().enumerate() {
                                    m.entry(ep.address.as_str()).or_insert((p as u32, e as u32));
                                }
                            }
                            m
                        })
                    });
                    for (e, address) in pool.endpoints.iter().enumerate() {
                        members.push(Member {
                            key: inflight::key(address),
                            source: Source::Config {
                                pool: ci as u32,
                                endpoint: e as u32,
                            },
                            metrics: index.and_then(|m| m.get(address.as_str()).copied()),
                        });
                    }
                }
            }
            let mut by_key: Vec<(u64, u32)> = members
                .iter()
                .enumerate()
                .map(|(i, m)| (m.key, i as u32))
                .collect();
            by_key.sort_unstable();
            let reports_adapters = snapshot.as_ref().is_some_and(|s| {
                members.iter().any(|m| {
                    metrics_at(s, m).is_some_and(|x| {
                        !x.running_adapters.is_empty() || !x.waiting_adapters.is_empty()
                    })
                })
            });
            pools.push(PoolMembers {
                members,
                by_key,
                from_snapshot: listed.is_some(),
                reports_adapters,
            });
        }
        refused.sort();
        refused.dedup();
        Membership {
            snapshot,
            pools,
            bootstrap: config.pools.iter().map(|p| p.endpoints.clone()).collect(),
            refused,
            prepared: (0..config.pools.len() * config.scheduling.profiles.len() * 2)
                .map(|_| RwLock::new(None))
                .collect(),
            profiles: config.scheduling.profiles.len(),
        }
    }

    /// The decision prepared for `pool`, `profile` and the request kind
    /// (`sheddable`) that holds at `now_ms`: the kept one, or a new one from
    /// `make` (`None` for an index out of range). Racing threads may both make
    /// one; either is right.
    pub fn prepared(
        &self,
        pool: usize,
        profile: usize,
        sheddable: bool,
        now_ms: u64,
        make: impl FnOnce() -> PreparedAt,
    ) -> Option<Arc<PreparedAt>> {
        if profile >= self.profiles {
            return None;
        }
        let slot = self
            .prepared
            .get((pool * self.profiles + profile) * 2 + usize::from(sheddable))?;
        // A poisoned lock still holds a whole value (it is only ever replaced).
        let kept = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(p) = kept.filter(|p| p.holds_at(now_ms)) {
            return Some(p);
        }
        let made = Arc::new(make());
        *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&made));
        Some(made)
    }

    /// The members of configured pool `pool` (none for an unknown index).
    pub fn members(&self, pool: usize) -> &[Member] {
        self.pools.get(pool).map_or(&[], |p| p.members.as_slice())
    }

    /// Whether the snapshot decides `pool`'s members (else the configuration does).
    pub fn from_snapshot(&self, pool: usize) -> bool {
        self.pools.get(pool).is_some_and(|p| p.from_snapshot)
    }

    /// The member's `ip:port`, as routed.
    pub fn address(&self, m: &Member) -> &str {
        match m.source {
            Source::Snapshot { pool, endpoint } => self
                .snapshot
                .as_ref()
                .and_then(|s| s.pools.get(pool as usize))
                .and_then(|p| p.endpoints.get(endpoint as usize))
                .map_or("", |e| e.address.as_str()),
            Source::Config { pool, endpoint } => self
                .bootstrap
                .get(pool as usize)
                .and_then(|p| p.get(endpoint as usize))
                .map_or("", String::as_str),
        }
    }

    /// [`Membership::address`] and [`Membership::metrics`] at once: a member listed
    /// by the snapshot is one lookup for both (a request reads every candidate's).
    pub fn address_and_metrics(&self, m: &Member) -> (&str, Option<&EndpointMetrics>) {
        if let (Source::Snapshot { pool, endpoint }, Some(s)) = (m.source, &self.snapshot) {
            if m.metrics == Some((pool, endpoint)) {
                let ep = s
                    .pools
                    .get(pool as usize)
                    .and_then(|p| p.endpoints.get(endpoint as usize));
                return (ep.map_or("", |e| e.address.as_str()), ep);
            }
        }
        (self.address(m), self.metrics(m))
    }

    /// The member's metrics in the snapshot, if it reports them.
    pub fn metrics(&self, m: &Member) -> Option<&EndpointMetrics> {
        metrics_at(self.snapshot.as_ref()?, m)
    }

    /// Whether any member of `pool` reports a LoRA adapter (running or waiting),
    /// fresh or not: when none does, a request's model is no adapter without a
    /// look at every candidate.
    pub fn reports_adapters(&self, pool: usize) -> bool {
        self.pools.get(pool).is_some_and(|p| p.reports_adapters)
    }

    /// The position in `members(pool)` of the member with this in-flight key
    /// (`inflight::key` of its address), if it is one.
    pub fn position(&self, pool: usize, key: u64) -> Option<usize> {
        let p = self.pools.get(pool)?;
        let at = p.by_key.binary_search_by(|&(k, _)| k.cmp(&key)).ok()?;
        Some(p.by_key[at].1 as usize)
    }

    /// Each member's in-flight count, read from the in-flight table (`table`, as
    /// [`inflight::table`] returns it), in member order, and which hold any.
    pub fn in_flight(&self, pool: usize, table: &[u8]) -> InFlight {
        let mut out = InFlight::default();
        let Some(p) = self.pools.get(pool) else {
            return out;
        };
        out.counts = vec![0u64; p.members.len()];
        // The table holds only endpoints with requests in flight: a few entries.
        for (k, n) in inflight::decode(table).filter(|&(_, n)| n > 0) {
            if let Ok(at) = p.by_key.binary_search_by(|&(key, _)| key.cmp(&k)) {
                let position = p.by_key[at].1 as usize;
                out.counts[position] = u64::from(n);
                out.held.push(position);
            }
        }
        out
    }

    /// Every member's address, in every pool (an address may repeat).
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.pools
            .iter()
            .flat_map(|p| p.members.iter())
            .map(|m| self.address(m))
    }
}

/// A pool's in-flight counts ([`Membership::in_flight`]).
#[derive(Debug, Default)]
pub struct InFlight {
    /// Per member position.
    pub counts: Vec<u64>,
    /// The positions whose count is above 0 (a few: the table holds only
    /// endpoints with requests in flight).
    pub held: Vec<usize>,
}

fn metrics_at<'s>(s: &'s Snapshot, m: &Member) -> Option<&'s EndpointMetrics> {
    let (p, e) = m.metrics?;
    s.pools.get(p as usize)?.endpoints.get(e as usize)
}

/// A pushed member the gateway may route to: the canonical `ip:port` (what
/// `SocketAddr` prints, so the destination header carries exactly what was
/// checked), a port, inside the allowed networks.
fn acceptable(config: &Config, address: &str) -> bool {
    match address.parse::<SocketAddr>() {
        Ok(a) => {
            a.port() != 0 && config.allowed_endpoints.contains(&a.ip()) && a.to_string() == address
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::memory::MemoryStore;
    use crate::snapshot::PoolSnapshot;

    fn config(extra: &str) -> Config {
        Config::from_json(
            format!(
                r#"{{"pools": [{{"name": "a", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}},
                              {{"name": "b"}}],
                     "models": [{{"name": "m", "pool": "a"}}] {extra}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn snapshot(pools: &[(&str, &[&str])]) -> Snapshot {
        Snapshot {
            generated_at_ms: 1,
            sequence: 1,
            collector: "c".into(),
            pools: pools
                .iter()
                .map(|(name, eps)| PoolSnapshot {
                    name: name.to_string(),
                    endpoints: eps
                        .iter()
                        .map(|a| EndpointMetrics {
                            address: a.to_string(),
                            healthy: true,
                            running: a.len() as u32,
                            ..Default::default()
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn addresses(m: &Membership, pool: usize) -> Vec<&str> {
        let listed: Vec<&str> = m.members(pool).iter().map(|x| m.address(x)).collect();
        for x in m.members(pool) {
            assert_eq!(m.address_and_metrics(x), (m.address(x), m.metrics(x)));
        }
        listed
    }

    #[test]
    fn bootstrap_until_a_snapshot_lists_the_pool() {
        let cfg = config("");
        let m = Membership::new(&cfg, None);
        assert_eq!(addresses(&m, 0), ["127.0.0.1:1", "127.0.0.1:2"]);
        assert!(addresses(&m, 1).is_empty(), "pool b has no bootstrap list");
        assert!(!m.from_snapshot(0));

        // The snapshot lists b only: a keeps its configured members, with the
        // metrics the collector reports for them elsewhere.
        let s = snapshot(&[("b", &["10.0.0.7:8000", "127.0.0.1:2"])]);
        let m = Membership::new(&cfg, Some(s));
        assert_eq!(addresses(&m, 0), ["127.0.0.1:1", "127.0.0.1:2"]);
        assert!(m.metrics(&m.members(0)[0]).is_none());
        assert_eq!(m.metrics(&m.members(0)[1]).unwrap().address, "127.0.0.1:2");
        assert_eq!(addresses(&m, 1), ["10.0.0.7:8000", "127.0.0.1:2"]);
        assert!(m.from_snapshot(1));
        assert_eq!(m.metrics(&m.members(1)[0]).unwrap().running, 13);
        assert!(!m.reports_adapters(0) && !m.reports_adapters(1));

        // Adapters reported by a member of b only.
        let mut s = snapshot(&[("b", &["10.0.0.7:8000", "127.0.0.1:2"])]);
        s.pools[0].endpoints[0].waiting_adapters = vec!["lora-1".into()];
        let m = Membership::new(&cfg, Some(s));
        assert!(!m.reports_adapters(0) && m.reports_adapters(1));
        assert!(!m.reports_adapters(7));
    }

    #[test]
    fn the_snapshot_replaces_the_bootstrap_list() {
        let cfg = config("");
        let s = snapshot(&[("a", &["127.0.0.1:3"])]);
        let m = Membership::new(&cfg, Some(s));
        assert_eq!(addresses(&m, 0), ["127.0.0.1:3"], "1 and 2 left");
        let m = Membership::new(&cfg, Some(snapshot(&[("a", &[])])));
        assert!(
            m.members(0).is_empty(),
            "a pool listed empty has no members"
        );
        assert!(m.members(7).is_empty());
    }

    #[test]
    fn members_outside_the_allowed_networks_are_refused() {
        let cfg = config("");
        let s = snapshot(&[(
            "a",
            &[
                "8.8.8.8:80",
                "169.254.169.254:80",
                "[2001:db8::1]:80",
                "127.0.0.1:0",
                "127.0.0.1:08000",
                "localhost:8000",
                "127.0.0.1:8000, 8.8.8.8:80",
                "10.1.2.3:8000",
                "[fd00::1]:8000",
                "10.1.2.3:8000",
            ],
        )]);
        let m = Membership::new(&cfg, Some(s));
        assert_eq!(addresses(&m, 0), ["10.1.2.3:8000", "[fd00::1]:8000"]);
        assert_eq!(m.refused.len(), 7, "{:?}", m.refused);

        let narrow = config(r#", "allowed_endpoint_cidrs": ["10.1.0.0/16", "127.0.0.1/32"]"#);
        let s = snapshot(&[("a", &["10.1.2.3:8000", "10.2.0.1:8000", "127.0.0.2:9"])]);
        let m = Membership::new(&narrow, Some(s));
        assert_eq!(addresses(&m, 0), ["10.1.2.3:8000"]);
    }

    #[test]
    fn in_flight_counts_follow_the_members() {
        let cfg = config("");
        let store = MemoryStore::default();
        inflight::init(&store).unwrap();
        inflight::add(&store, inflight::key("127.0.0.1:3"), 2).unwrap();
        inflight::add(&store, inflight::key("127.0.0.1:1"), 1).unwrap();
        inflight::add(&store, inflight::key("10.9.9.9:1"), 5).unwrap();
        let m = Membership::new(
            &cfg,
            Some(snapshot(&[("a", &["127.0.0.1:2", "127.0.0.1:3"])])),
        );
        assert_eq!(m.in_flight(0, &inflight::table(&store)).counts, [0, 2]);
        assert_eq!(m.in_flight(0, &inflight::table(&store)).held, [1]);
        let m = Membership::new(&cfg, None);
        assert_eq!(m.in_flight(0, &inflight::table(&store)).counts, [1, 0]);
        assert!(m.in_flight(9, &inflight::table(&store)).counts.is_empty());
    }
}
