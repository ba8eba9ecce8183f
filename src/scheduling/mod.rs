//! Endpoint choice, as small composable steps (after GIE's scheduler): filters drop
//! candidates, scorers rate the rest 0..1, a profile weights the scorers, a picker
//! chooses. Everything here is pure: candidates come in with their in-flight count,
//! metrics and prefix matches already looked up.
//!
//! Steps, in order:
//! 1. health: drop endpoints that fresh metrics report down; stale or missing
//!    metrics are used only when nothing fresh and healthy is left;
//! 2. LoRA: for an adapter request, drop endpoints that would have to evict an
//!    adapter to load it (unless nothing else is left);
//! 3. saturation: keep unsaturated endpoints when there are any; when every one is
//!    saturated, shed a sheddable request (priority < 0), route others to the best;
//! 4. score with the profile's weighted scorers; 5. pick; the next best are fallbacks.

pub mod config;
pub mod prefix;
pub mod recent_slots;

pub use config::{Picker, Profile, Saturation, Scheduling, ScorerKind};

use crate::snapshot::EndpointMetrics;
use std::fmt::Write as _;

/// One endpoint the request could go to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate<'a> {
    pub endpoint: &'a str,
    /// Requests this gateway (all workers) has in flight to the endpoint.
    pub in_flight: u64,
    /// The endpoint's metrics from the last snapshot, if it has any.
    pub metrics: Option<&'a EndpointMetrics>,
    /// The metrics are recent enough to be trusted.
    pub fresh: bool,
    /// Leading prompt blocks this endpoint recently served (prefix index).
    pub prefix_blocks: usize,
}

impl<'a> Candidate<'a> {
    pub fn new(endpoint: &'a str, in_flight: u64) -> Self {
        Candidate {
            endpoint,
            in_flight,
            metrics: None,
            fresh: false,
            prefix_blocks: 0,
        }
    }

    /// Metrics only when they can be trusted.
    fn fresh_metrics(&self) -> Option<&'a EndpointMetrics> {
        self.metrics.filter(|_| self.fresh)
    }

    fn known_down(&self) -> bool {
        self.fresh_metrics().is_some_and(|m| !m.healthy)
    }

    fn known_up(&self) -> bool {
        self.fresh_metrics().is_some_and(|m| m.healthy)
    }

    /// Saturated by the thresholds, scaled by `headroom` (1.0, or less for
    /// sheddable requests). Unknown metrics are never saturated.
    fn saturated(&self, s: &Saturation, headroom: f64) -> bool {
        self.fresh_metrics().is_some_and(|m| {
            f64::from(m.waiting) >= f64::from(s.queue_depth) * headroom
                || f64::from(m.kv_cache_utilization) >= s.kv_cache_utilization * headroom
        })
    }

    /// Would serving `adapter` here force an eviction? Only fresh metrics say so.
    fn would_evict(&self, adapter: &str) -> bool {
        self.fresh_metrics().is_some_and(|m| {
            !has(&m.running_adapters, adapter)
                && !has(&m.waiting_adapters, adapter)
                && m.running_adapters.len() >= m.max_lora as usize
        })
    }
}

fn has(list: &[String], name: &str) -> bool {
    list.iter().any(|a| a == name)
}

/// What the scheduler needs to know about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The model the server will see (after any rewrite).
    pub model: &'a str,
    pub priority: i32,
    /// `model` names a LoRA adapter.
    pub adapter: bool,
    /// Full blocks in the prompt (the prefix scorer's denominator).
    pub prompt_blocks: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Route(Decision),
    /// Every candidate is saturated and the request is sheddable: answer 429.
    Shed,
    /// No candidates at all.
    NoEndpoint,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Candidate indexes: the chosen one first, then fallbacks.
    pub order: Vec<usize>,
    /// The scored candidates, best first: every one with `explain` on, otherwise
    /// the best few the picker and the fallbacks need.
    pub scored: Vec<Scored>,
}

impl Decision {
    pub fn chosen(&self) -> usize {
        self.order[0]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub index: usize,
    pub total: f64,
    /// Each scorer's 0..1 score, only with `explain` on (an allocation per
    /// candidate otherwise, 1000 of them per request in a large pool).
    pub parts: Vec<(ScorerKind, f64)>,
}

/// Chooses an endpoint. `draw` is a uniform random `u32` (tie-break / weighted pick).
///
/// [`prepare`] then [`finish`]: a host that routes many requests over the same
/// metrics keeps the prepared part (see `gateway::choose`) and calls only
/// `finish` per request; this is both at once, with the explanation.
pub fn schedule(
    cfg: &Scheduling,
    profile: &Profile,
    req: &Request<'_>,
    candidates: &[Candidate<'_>],
    draw: u32,
) -> Outcome {
    let prepared = prepare(cfg, profile, req, candidates);
    let outcome = finish(
        cfg,
        profile,
        req,
        &prepared,
        |i| (candidates[i].in_flight, candidates[i].prefix_blocks),
        None,
        draw,
    );
    match outcome {
        Outcome::Route(mut d) if cfg.explain => {
            let ranges = Ranges {
                waiting: prepared.waiting,
                in_flight: in_flight_range(&prepared.pool, |i| candidates[i].in_flight),
            };
            for s in &mut d.scored {
                s.parts = parts(profile, req, &candidates[s.index], &ranges);
            }
            Outcome::Route(d)
        }
        other => other,
    }
}

/// The part of a decision that reads only the candidates' metrics and the
/// request's model and priority: the filters and the scorers of metrics alone.
/// The same for every request of a kind until the metrics change, so a host may
/// keep it (valid while no candidate's `fresh` changes).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// What became of the filters: a pool to score, a shed, or no candidates.
    verdict: Verdict,
    /// Candidate indexes left by the filters (health, LoRA, saturation).
    pool: Vec<usize>,
    /// Per `pool` entry: the weighted queue and KV-cache scores, summed (the
    /// first terms of `Weights::total`, in its order).
    base: Vec<f64>,
    /// Per `pool` entry, for an adapter request: the LoRA affinity score (empty
    /// otherwise: every candidate scores 1).
    lora: Vec<f64>,
    /// The waiting-queue range the queue scores were normalised by.
    waiting: (f64, f64),
    /// `pool` slots by `base`, best first, equal bases by candidate index; empty
    /// when the sparse ranking cannot be used (an adapter request, a base that
    /// is not a finite number). See [`rank_sparse`].
    by_base: Vec<u32>,
    /// Per candidate index: its `pool` slot, or `u32::MAX` when filtered out.
    slot_of: Vec<u32>,
    /// Along `by_base`, candidates without in-flight requests or prefix matches
    /// have equal totals only where their bases are equal (rounding never makes
    /// two bases' totals equal), so their order there is already the ranking's.
    ranked_by_base: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Score,
    Shed,
    NoEndpoint,
}

/// Filters the candidates and scores what only their metrics decide (steps 1–3
/// and the metric scorers of step 4).
pub fn prepare(
    cfg: &Scheduling,
    profile: &Profile,
    req: &Request<'_>,
    candidates: &[Candidate<'_>],
) -> Prepared {
    let mut prepared = Prepared {
        verdict: Verdict::NoEndpoint,
        pool: Vec::new(),
        base: Vec::new(),
        lora: Vec::new(),
        waiting: EMPTY_RANGE,
        by_base: Vec::new(),
        slot_of: Vec::new(),
        ranked_by_base: false,
    };
    if candidates.is_empty() {
        return prepared;
    }
    // One list of candidate indexes, narrowed in place by each filter (a filter
    // that would leave nothing leaves it as it was).
    let n = candidates.len();
    let pool = &mut prepared.pool;
    pool.reserve(n);

    // 1. Health: fresh-and-up first, then not-known-down, then anything.
    pool.extend((0..n).filter(|&i| candidates[i].known_up()));
    if pool.is_empty() {
        pool.extend((0..n).filter(|&i| !candidates[i].known_down()));
    }
    if pool.is_empty() {
        pool.extend(0..n);
    }

    // 2. LoRA: never evict when another endpoint can take the adapter.
    if req.adapter {
        narrow(pool, |i| !candidates[i].would_evict(req.model));
    }

    // 3. Saturation and shedding.
    let headroom = if req.priority < 0 {
        cfg.saturation.sheddable_headroom
    } else {
        1.0
    };
    let open = |i: usize| !candidates[i].saturated(&cfg.saturation, headroom);
    if req.priority < 0 && !pool.iter().any(|&i| open(i)) {
        prepared.verdict = Verdict::Shed;
        return prepared;
    }
    narrow(pool, open);

    // 4, the metric scorers. The pool-wide range is computed once: per candidate
    // it would make a decision quadratic in the pool size.
    prepared.waiting = waiting_range(candidates, pool, cfg.saturation.queue_depth);
    let weights = Weights::of(profile);
    prepared.base = pool
        .iter()
        .map(|&i| weights.metric_terms(&candidates[i], prepared.waiting))
        .collect();
    if req.adapter {
        prepared.lora = pool
            .iter()
            .map(|&i| lora_score(req, &candidates[i]))
            .collect();
    } else {
        order_by_base(&mut prepared, &weights, req, n);
    }
    prepared.verdict = Verdict::Score;
    prepared
}

/// Fills `by_base`, `slot_of` and `ranked_by_base` for [`rank_sparse`] (left
/// empty when a base or the weights' sum is not a finite number: the totals
/// would not be ordered).
fn order_by_base(prepared: &mut Prepared, weights: &Weights, req: &Request<'_>, n: usize) {
    if !weights.total.is_finite()
        || !prepared.base.iter().all(|b| b.is_finite())
        || n >= u32::MAX as usize
    {
        return;
    }
    let (pool, base) = (&prepared.pool, &prepared.base);
    prepared.slot_of = vec![u32::MAX; n];
    for (slot, &i) in pool.iter().enumerate() {
        prepared.slot_of[i] = slot as u32;
    }
    prepared.by_base = (0..pool.len() as u32).collect();
    prepared.by_base.sort_unstable_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        base[b].total_cmp(&base[a]).then(pool[a].cmp(&pool[b]))
    });
    // An untouched candidate's total, as `rank_sparse` computes it: the
    // in-flight range's minimum is its own 0, so its in-flight score is 1.
    let untouched = |slot: u32| weights.total(req, base[slot as usize], None, (0, 0), (0.0, 0.0));
    prepared.ranked_by_base = prepared
        .by_base
        .windows(2)
        .all(|w| base[w[0] as usize] == base[w[1] as usize] || untouched(w[0]) != untouched(w[1]));
}

/// Scores the prepared pool with what changes per request, `dynamic(i)`:
/// candidate `i`'s in-flight count and leading prefix blocks; then picks (steps 4
/// and 5). `Scored::parts` are left empty.
///
/// `touched`, when the host knows it: every candidate whose `dynamic` may be
/// other than `(0, 0)` (repeats and filtered-out indexes allowed). The others
/// are then ranked by their prepared order instead of one by one
/// ([`rank_sparse`]), with the same outcome.
pub fn finish(
    cfg: &Scheduling,
    profile: &Profile,
    req: &Request<'_>,
    prepared: &Prepared,
    dynamic: impl Fn(usize) -> (u64, usize),
    touched: Option<&[usize]>,
    draw: u32,
) -> Outcome {
    match prepared.verdict {
        Verdict::Score => {}
        Verdict::Shed => return Outcome::Shed,
        Verdict::NoEndpoint => return Outcome::NoEndpoint,
    }
    let pool = &prepared.pool;
    let weights = Weights::of(profile);
    let needed = |ties: usize| {
        match profile.picker {
            Picker::MaxScore => ties,
            Picker::WeightedRandom { top_k } => top_k.max(1),
        }
        .max(cfg.fallback_endpoints + 1)
    };
    let sparse = touched.filter(|_| !cfg.explain).and_then(|t| {
        let ties_matter = profile.picker == Picker::MaxScore;
        rank_sparse(&weights, req, prepared, &dynamic, t, ties_matter, needed)
    });
    if let Some(ranked) = sparse {
        return pick_from(cfg, profile, &ranked, draw);
    }
    let in_flight = if weights.in_flight != 0.0 {
        in_flight_range(pool, |i| dynamic(i).0)
    } else {
        EMPTY_RANGE
    };
    // Each candidate is ranked by its total alone (16 bytes, no explanation
    // slot); a `Scored` is built only for those kept.
    let mut ranked: Vec<Ranked> = pool
        .iter()
        .zip(&prepared.base)
        .enumerate()
        .map(|(k, (&i, &base))| Ranked {
            total: weights.total(
                req,
                base,
                prepared.lora.get(k).copied(),
                dynamic(i),
                in_flight,
            ),
            index: i,
        })
        .collect();
    // Only the best few are ordered (the picker's choice among ties or its top k,
    // then the fallbacks); sorting every candidate is most of a decision's work
    // in a large pool. With `explain`, all of them, for the explanation.
    let needed = needed(count_ties(&ranked));
    if cfg.explain || needed >= ranked.len() {
        ranked.sort_by(best_first);
    } else if needed <= SMALL_TOP {
        keep_best(&mut ranked, needed);
    } else {
        ranked.select_nth_unstable_by(needed - 1, best_first);
        ranked.truncate(needed);
        ranked.sort_by(best_first);
    }
    pick_from(cfg, profile, &ranked, draw)
}

/// Picks among `ranked` (the best candidates, best first), then the fallbacks
/// in score order (step 5).
fn pick_from(cfg: &Scheduling, profile: &Profile, ranked: &[Ranked], draw: u32) -> Outcome {
    let scored: Vec<Scored> = ranked
        .iter()
        .map(|r| Scored {
            index: r.index,
            total: r.total,
            parts: Vec::new(),
        })
        .collect();

    // 5. Pick, then fallbacks in score order.
    let chosen = pick(profile.picker, &scored, draw);
    let mut order = vec![chosen];
    order.extend(
        scored
            .iter()
            .map(|s| s.index)
            .filter(|&i| i != chosen)
            .take(cfg.fallback_endpoints),
    );
    Outcome::Route(Decision { order, scored })
}

/// A candidate's place in the ranking: its total and its index.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked {
    total: f64,
    index: usize,
}

/// The best candidates of a prepared pool, best first, as the dense ranking in
/// [`finish`] would keep them, when only `touched` have in-flight requests or
/// prefix matches: those are scored one by one, the rest (most of a large pool)
/// all score their prepared base plus the same constant terms, so they are
/// taken in `by_base` order and only as far as the best few need. `None` when
/// it does not apply (no order prepared, nothing untouched) or gains nothing.
///
/// Why it decides the same: an untouched candidate's in-flight count is 0, the
/// pool's minimum, so its in-flight score is 1 whatever the maximum, and its
/// prefix score 0; its total is `base` plus constants over the weights, and
/// float addition and division are monotonic, so totals never increase along
/// `by_base`. Where rounding makes two different bases' totals equal (not
/// `ranked_by_base`), the walk goes on through equal totals; the kept ones are
/// sorted as the dense path sorts them.
fn rank_sparse(
    weights: &Weights,
    req: &Request<'_>,
    prepared: &Prepared,
    dynamic: &impl Fn(usize) -> (u64, usize),
    touched: &[usize],
    ties_matter: bool,
    needed: impl Fn(usize) -> usize,
) -> Option<Vec<Ranked>> {
    let pool = &prepared.pool;
    if prepared.by_base.len() != pool.len() || touched.len() >= pool.len() {
        return None;
    }
    let mut slots: Vec<u32> = touched
        .iter()
        .filter_map(|&i| prepared.slot_of.get(i).copied())
        .filter(|&slot| slot != u32::MAX)
        .collect();
    slots.sort_unstable();
    slots.dedup();
    if slots.len() == pool.len() {
        return None;
    }
    let in_flight = if weights.in_flight != 0.0 {
        slots.iter().fold(widen(EMPTY_RANGE, 0.0), |r, &slot| {
            widen(r, dynamic(pool[slot as usize]).0 as f64)
        })
    } else {
        EMPTY_RANGE
    };
    let total = |slot: u32, dynamic: (u64, usize)| Ranked {
        total: weights.total(req, prepared.base[slot as usize], None, dynamic, in_flight),
        index: pool[slot as usize],
    };
    let mut ranked: Vec<Ranked> = slots
        .iter()
        .map(|&slot| total(slot, dynamic(pool[slot as usize])))
        .collect();
    let mut rest = prepared
        .by_base
        .iter()
        .filter(|slot| slots.binary_search(slot).is_err())
        .map(|&slot| total(slot, (0, 0)));

    // The untouched ones tied with the best (when the picker breaks ties),
    // then as many as `needed` asks.
    let mut next = rest.next();
    let from = ranked.len();
    let mut ties = 0;
    if ties_matter {
        let first = next.map_or(f64::NEG_INFINITY, |r| r.total);
        let best = ranked.iter().map(|r| r.total).fold(first, greater);
        ties = ranked.iter().filter(|r| best - r.total <= TIE).count();
        while let Some(r) = next.filter(|r| best - r.total <= TIE) {
            ranked.push(r);
            ties += 1;
            next = rest.next();
        }
    }
    let needed = needed(ties);
    if needed >= pool.len() {
        return None;
    }
    let mut last = ranked
        .last()
        .filter(|_| ranked.len() > from)
        .map(|r| r.total);
    while let Some(r) = next {
        if ranked.len() - from >= needed && (prepared.ranked_by_base || last != Some(r.total)) {
            break;
        }
        last = Some(r.total);
        ranked.push(r);
        next = rest.next();
    }
    ranked.sort_by(best_first);
    ranked.truncate(needed);
    Some(ranked)
}

/// Up to this many best candidates are kept by one insertion pass; more by
/// `select_nth_unstable` (a partition costs tens of instructions per candidate,
/// the pass about one comparison with the current last kept).
const SMALL_TOP: usize = 8;

/// Leaves the `k` best of `ranked` in it, best first, in one pass.
fn keep_best(ranked: &mut Vec<Ranked>, k: usize) {
    let mut kept = 0;
    for i in 0..ranked.len() {
        if kept == k && best_first(&ranked[i], &ranked[k - 1]).is_ge() {
            continue;
        }
        // Insert candidate i into the sorted prefix (dropping its last when full).
        let mut at = kept.min(k - 1);
        ranked.swap(at, i);
        while at > 0 && best_first(&ranked[at], &ranked[at - 1]).is_lt() {
            ranked.swap(at, at - 1);
            at -= 1;
        }
        kept = (kept + 1).min(k);
    }
    ranked.truncate(kept);
}

/// Higher total first; equal totals by candidate index, so the order is total
/// and the same whether all candidates are sorted or only the best selected.
fn best_first(a: &Ranked, b: &Ranked) -> std::cmp::Ordering {
    b.total.total_cmp(&a.total).then(a.index.cmp(&b.index))
}

/// How many candidates tie with the best score (`pick`'s tolerance).
fn count_ties(ranked: &[Ranked]) -> usize {
    let best = ranked
        .iter()
        .map(|r| r.total)
        .fold(f64::NEG_INFINITY, greater);
    ranked.iter().filter(|r| best - r.total <= TIE).count()
}

/// Scores this close to the best one are a tie, broken at random.
const TIE: f64 = 1e-9;

/// Keeps the indexes `f` accepts, unless it accepts none.
fn narrow(pool: &mut Vec<usize>, f: impl Fn(usize) -> bool) {
    if pool.iter().any(|&i| f(i)) {
        pool.retain(|&i| f(i));
    }
}

/// In-flight counts are min-max normalised across the pool, as GIE does: the best
/// gets 1, the worst 0, all equal → 1. They are exact between scrapes, so even a
/// difference of one request is real and spreads a burst.
fn lower_is_better(value: f64, min: f64, max: f64) -> f64 {
    if max - min <= f64::EPSILON {
        1.0
    } else {
        (max - value) / (max - min)
    }
}

/// Waiting-queue differences are judged against the saturation queue depth: a
/// request or two caught in a replica's queue at the last scrape (vLLM queues
/// every arrival until its next engine step) must not outweigh LoRA or prefix
/// affinity, yet a gap of `queue_depth` requests spans the whole range.
fn queue_score(waiting: f64, (min, spread): (f64, f64)) -> f64 {
    if spread <= f64::EPSILON {
        1.0
    } else {
        (1.0 - (waiting - min) / spread).clamp(0.0, 1.0)
    }
}

/// Neutral score when the scorer has nothing to go on (no fresh metrics).
const UNKNOWN: f64 = 0.5;

/// The pool-wide minimum and maximum the "lower is better" scores normalise by.
struct Ranges {
    /// Waiting requests over candidates with fresh metrics: the minimum and the
    /// spread to normalise by (see `queue_score`).
    waiting: (f64, f64),
    in_flight: (f64, f64),
}

/// The waiting-queue minimum and the spread to normalise by (see `queue_score`),
/// over the pool's candidates with fresh metrics.
fn waiting_range(cands: &[Candidate<'_>], pool: &[usize], queue_depth: u32) -> (f64, f64) {
    let mut waiting = EMPTY_RANGE;
    for &j in pool {
        if let Some(m) = cands[j].fresh_metrics() {
            waiting = widen(waiting, f64::from(m.waiting));
        }
    }
    let (min, max) = waiting;
    (min, greater(max - min, f64::from(queue_depth)))
}

/// The in-flight counts' `(min, max)` over the pool.
fn in_flight_range(pool: &[usize], in_flight: impl Fn(usize) -> u64) -> (f64, f64) {
    pool.iter()
        .fold(EMPTY_RANGE, |r, &i| widen(r, in_flight(i) as f64))
}

/// A profile's weights by scorer, summed once per decision: per candidate, a
/// loop over the profile's list with a dispatch per entry was most of a
/// candidate's cost. A scorer listed twice counts with both weights.
struct Weights {
    queue: f64,
    kv_cache: f64,
    prefix_cache: f64,
    lora_affinity: f64,
    in_flight: f64,
    total: f64,
}

impl Weights {
    fn of(profile: &Profile) -> Weights {
        let mut w = Weights {
            queue: 0.0,
            kv_cache: 0.0,
            prefix_cache: 0.0,
            lora_affinity: 0.0,
            in_flight: 0.0,
            total: 0.0,
        };
        for &(kind, weight) in &profile.scorers {
            *match kind {
                ScorerKind::Queue => &mut w.queue,
                ScorerKind::KvCache => &mut w.kv_cache,
                ScorerKind::PrefixCache => &mut w.prefix_cache,
                ScorerKind::LoraAffinity => &mut w.lora_affinity,
                ScorerKind::InFlight => &mut w.in_flight,
            } += weight;
            w.total += weight;
        }
        w
    }
}

/// One scorer's 0..1 score for a candidate (for `explain`; a decision sums the
/// same functions in `Weights::metric_terms` and `Weights::total`).
fn scorer(
    kind: ScorerKind,
    req: &Request<'_>,
    c: &Candidate<'_>,
    fresh: Option<&EndpointMetrics>,
    ranges: &Ranges,
) -> f64 {
    match kind {
        ScorerKind::Queue => queue_scorer(fresh, ranges.waiting),
        ScorerKind::KvCache => kv_cache_scorer(fresh),
        ScorerKind::InFlight => in_flight_scorer(c.in_flight, ranges.in_flight),
        ScorerKind::PrefixCache => prefix_scorer(req, c.prefix_blocks),
        ScorerKind::LoraAffinity => lora_score(req, c),
    }
}

fn queue_scorer(fresh: Option<&EndpointMetrics>, waiting: (f64, f64)) -> f64 {
    fresh.map_or(UNKNOWN, |m| queue_score(f64::from(m.waiting), waiting))
}

fn kv_cache_scorer(fresh: Option<&EndpointMetrics>) -> f64 {
    fresh.map_or(UNKNOWN, |m| {
        (1.0 - f64::from(m.kv_cache_utilization)).clamp(0.0, 1.0)
    })
}

fn in_flight_scorer(in_flight: u64, (min, max): (f64, f64)) -> f64 {
    lower_is_better(in_flight as f64, min, max)
}

fn prefix_scorer(req: &Request<'_>, blocks: usize) -> f64 {
    if req.prompt_blocks == 0 {
        0.0
    } else {
        lesser(1.0, blocks as f64 / req.prompt_blocks as f64)
    }
}

/// The weighted mean of the scorers, summed in one fixed order (the built-in
/// profiles' order: queue, KV cache, prefix, LoRA, in flight) whatever the
/// profile's list order. A scorer without weight is not computed: it would add 0
/// (every score is finite). The metric scorers come first, so their partial sum
/// is prepared once ([`prepare`]) and the rest added per request, with the same
/// result as one sum.
impl Weights {
    /// The queue and KV-cache terms.
    fn metric_terms(&self, c: &Candidate<'_>, waiting: (f64, f64)) -> f64 {
        let fresh = c.fresh_metrics();
        let mut sum = 0.0;
        if self.queue != 0.0 {
            sum += self.queue * queue_scorer(fresh, waiting);
        }
        if self.kv_cache != 0.0 {
            sum += self.kv_cache * kv_cache_scorer(fresh);
        }
        sum
    }

    /// `base` (the metric terms) plus the prefix, LoRA (`lora`, or 1 for a
    /// request that names no adapter) and in-flight terms, over the weights.
    fn total(
        &self,
        req: &Request<'_>,
        base: f64,
        lora: Option<f64>,
        (in_flight, prefix_blocks): (u64, usize),
        in_flight_range: (f64, f64),
    ) -> f64 {
        let mut sum = base;
        if self.prefix_cache != 0.0 {
            sum += self.prefix_cache * prefix_scorer(req, prefix_blocks);
        }
        if self.lora_affinity != 0.0 {
            sum += self.lora_affinity * lora.unwrap_or(1.0);
        }
        if self.in_flight != 0.0 {
            sum += self.in_flight * in_flight_scorer(in_flight, in_flight_range);
        }
        // No weights at all rank every candidate 0.
        if self.total > 0.0 {
            sum / self.total
        } else {
            0.0
        }
    }
}

/// Each listed scorer's score, for `explain`.
fn parts(
    profile: &Profile,
    req: &Request<'_>,
    c: &Candidate<'_>,
    ranges: &Ranges,
) -> Vec<(ScorerKind, f64)> {
    let fresh = c.fresh_metrics();
    profile
        .scorers
        .iter()
        .map(|&(kind, _)| (kind, scorer(kind, req, c, fresh, ranges)))
        .collect()
}

fn lora_score(req: &Request<'_>, c: &Candidate<'_>) -> f64 {
    if !req.adapter {
        return 1.0;
    }
    match c.fresh_metrics() {
        None => UNKNOWN,
        Some(m) if has(&m.running_adapters, req.model) => 1.0,
        Some(m) if has(&m.waiting_adapters, req.model) => 0.8,
        Some(m) if m.running_adapters.len() < m.max_lora as usize => 0.6,
        Some(_) => 0.0,
    }
}

/// The `(min, max)` of no values.
const EMPTY_RANGE: (f64, f64) = (f64::INFINITY, f64::NEG_INFINITY);

fn widen((lo, hi): (f64, f64), v: f64) -> (f64, f64) {
    (lesser(lo, v), greater(hi, v))
}

/// `a.min(b)` by one comparison: in Wasm `f64::min` is a call to `fmin` (its NaN
/// rule is not `f64.min`'s), tens of instructions, several per candidate. Same
/// result: a NaN `b` is ignored as `fmin` ignores it (`a`, the accumulator or a
/// constant here, is never NaN), and no value here is a signed zero.
fn lesser(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// `a.max(b)` by one comparison (see [`lesser`]).
fn greater(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Scales a uniform `u32` into `0..n`.
fn slot(draw: u32, n: usize) -> usize {
    ((u64::from(draw) * n as u64) >> 32) as usize
}

/// `scored` is sorted best first and non-empty.
fn pick(picker: Picker, scored: &[Scored], draw: u32) -> usize {
    match picker {
        Picker::MaxScore => {
            let best = scored[0].total;
            let tied = scored.iter().take_while(|s| best - s.total <= TIE).count();
            scored[slot(draw, tied)].index
        }
        Picker::WeightedRandom { top_k } => {
            let top = &scored[..top_k.clamp(1, scored.len())];
            let total: f64 = top.iter().map(|s| s.total.max(0.0)).sum();
            if total <= 0.0 {
                return top[slot(draw, top.len())].index;
            }
            let mut point = f64::from(draw) / (f64::from(u32::MAX) + 1.0) * total;
            for s in top {
                point -= s.total.max(0.0);
                if point < 0.0 {
                    return s.index;
                }
            }
            top[top.len() - 1].index
        }
    }
}

/// One line explaining a decision: `ep=total(queue=…,kv_cache=…) …`, best first.
pub fn explain(decision: &Decision, candidates: &[Candidate<'_>]) -> String {
    let mut out = String::new();
    for s in &decision.scored {
        let _ = write!(out, "{}={:.3}(", candidates[s.index].endpoint, s.total);
        for (n, (kind, v)) in s.parts.iter().enumerate() {
            let sep = if n == 0 { "" } else { "," };
            let _ = write!(out, "{sep}{kind:?}={v:.2}");
        }
        out.push_str(") ");
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests;
