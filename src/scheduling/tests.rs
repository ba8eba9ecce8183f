use super::*;

fn m(waiting: u32, kv: f32) -> EndpointMetrics {
    EndpointMetrics {
        healthy: true,
        waiting,
        kv_cache_utilization: kv,
        max_lora: 2,
        ..Default::default()
    }
}

fn cand<'a>(ep: &'a str, in_flight: u64, metrics: &'a EndpointMetrics) -> Candidate<'a> {
    Candidate {
        metrics: Some(metrics),
        fresh: true,
        ..Candidate::new(ep, in_flight)
    }
}

fn req(priority: i32) -> Request<'static> {
    Request {
        model: "base",
        priority,
        adapter: false,
        prompt_blocks: 0,
    }
}

fn cfg() -> Scheduling {
    Scheduling::default()
}

fn profile(cfg: &Scheduling, name: &str) -> Profile {
    cfg.profiles[cfg.profile_index(name).unwrap()].clone()
}

fn chosen(out: Outcome) -> usize {
    match out {
        Outcome::Route(d) => d.chosen(),
        other => panic!("expected a route, got {other:?}"),
    }
}

fn run(cands: &[Candidate<'_>], r: &Request<'_>) -> Outcome {
    let c = cfg();
    schedule(&c, &profile(&c, "default"), r, cands, 0)
}

#[test]
fn empty_pool_has_no_endpoint() {
    assert_eq!(run(&[], &req(0)), Outcome::NoEndpoint);
}

#[test]
fn queue_scorer_prefers_shorter_queues() {
    let (a, b) = (m(4, 0.1), m(0, 0.1));
    assert_eq!(
        chosen(run(&[cand("a", 0, &a), cand("b", 0, &b)], &req(0))),
        1
    );
}

#[test]
fn kv_scorer_prefers_free_cache() {
    let (a, b) = (m(0, 0.7), m(0, 0.1));
    assert_eq!(
        chosen(run(&[cand("a", 0, &a), cand("b", 0, &b)], &req(0))),
        1
    );
}

#[test]
fn in_flight_breaks_a_burst_between_scrapes() {
    // Both looked idle at the last scrape; the gateway already sent 3 to "a".
    let (a, b) = (m(0, 0.0), m(0, 0.0));
    assert_eq!(
        chosen(run(&[cand("a", 3, &a), cand("b", 0, &b)], &req(0))),
        1
    );
}

#[test]
fn prefix_scorer_follows_the_cached_prefix() {
    let (a, b) = (m(1, 0.3), m(0, 0.2));
    let mut r = req(0);
    r.prompt_blocks = 10;
    let mut ca = cand("a", 0, &a);
    ca.prefix_blocks = 10;
    // Slightly busier, but holds the whole prompt prefix: the prefix weight wins.
    assert_eq!(chosen(run(&[ca, cand("b", 0, &b)], &r)), 0);
}

#[test]
fn lora_affinity_prefers_running_then_waiting_then_free_slot() {
    let mut running = m(0, 0.0);
    running.running_adapters = vec!["sql".into()];
    let mut waiting = m(0, 0.0);
    waiting.waiting_adapters = vec!["sql".into()];
    let mut free = m(0, 0.0);
    free.running_adapters = vec!["other".into()];
    let mut full = m(0, 0.0);
    full.running_adapters = vec!["x".into(), "y".into()];
    let r = Request {
        model: "sql",
        adapter: true,
        ..req(0)
    };
    let all = [
        cand("full", 0, &full),
        cand("free", 0, &free),
        cand("wait", 0, &waiting),
        cand("run", 0, &running),
    ];
    assert_eq!(chosen(run(&all, &r)), 3);
    assert_eq!(chosen(run(&all[..3], &r)), 2);
    assert_eq!(chosen(run(&all[..2], &r)), 1);
    // Only endpoints that would evict: still served (least bad), not refused.
    assert_eq!(chosen(run(&all[..1], &r)), 0);
}

#[test]
fn a_request_caught_in_the_queue_does_not_outweigh_lora_affinity() {
    // The replica running the adapter had one arrival waiting for its next engine
    // step at the last scrape; with plain min-max that one request scored its
    // queue 0 and sent the adapter to a replica that had to load it.
    let mut running = m(1, 0.0);
    running.running_adapters = vec!["sql".into()];
    let idle = m(0, 0.0);
    let r = Request {
        model: "sql",
        adapter: true,
        ..req(0)
    };
    let pool = [cand("idle", 0, &idle), cand("run", 0, &running)];
    assert_eq!(chosen(run(&pool, &r)), 1);

    // Differences are judged against the saturation queue depth (5 by default);
    // a wider gap spans the whole range.
    let depth = cfg().saturation.queue_depth;
    let near = waiting_range(
        &[cand("idle", 0, &idle), cand("q4", 0, &m(4, 0.0))],
        &[0, 1],
        depth,
    );
    assert_eq!(queue_score(0.0, near), 1.0);
    assert!((queue_score(4.0, near) - 0.2).abs() < 1e-9);
    let wide = waiting_range(
        &[cand("idle", 0, &idle), cand("q20", 0, &m(20, 0.0))],
        &[0, 1],
        depth,
    );
    assert_eq!(queue_score(20.0, wide), 0.0);
    assert_eq!(queue_score(10.0, wide), 0.5);
}

#[test]
fn lora_never_evicts_when_another_endpoint_can_load() {
    let mut full = m(0, 0.0);
    full.running_adapters = vec!["x".into(), "y".into()];
    let mut free = m(3, 0.6); // busier, but has a free slot
    free.running_adapters = vec![];
    let r = Request {
        model: "new-adapter",
        adapter: true,
        ..req(0)
    };
    let Outcome::Route(d) = run(&[cand("full", 0, &full), cand("free", 9, &free)], &r) else {
        panic!()
    };
    assert_eq!(
        d.order,
        vec![1],
        "the evicting endpoint is not even a fallback"
    );
}

#[test]
fn unknown_adapter_without_metrics_is_neutral() {
    let r = Request {
        model: "never-seen",
        adapter: true,
        ..req(0)
    };
    let cands = [Candidate::new("a", 1), Candidate::new("b", 0)];
    assert_eq!(chosen(run(&cands, &r)), 1);
}

#[test]
fn down_endpoints_are_dropped_and_stale_ones_are_a_last_resort() {
    let up = m(3, 0.5);
    let down = EndpointMetrics {
        healthy: false,
        ..m(0, 0.0)
    };
    let cands = [cand("down", 0, &down), cand("up", 5, &up)];
    assert_eq!(chosen(run(&cands, &req(0))), 1);
    // A stale endpoint loses to a fresh healthy one even when it looks idle.
    let stale = Candidate {
        fresh: false,
        ..cand("stale", 0, &up)
    };
    assert_eq!(chosen(run(&[stale, cand("up", 5, &up)], &req(0))), 1);
}

#[test]
fn all_stale_still_routes_on_in_flight() {
    let x = m(0, 0.0);
    let stale = |ep, n| Candidate {
        fresh: false,
        ..cand(ep, n, &x)
    };
    assert_eq!(
        chosen(run(&[stale("a", 4), stale("b", 1), stale("c", 2)], &req(0))),
        1
    );
    // Even a stale snapshot that claims "down" does not stop routing.
    let down = EndpointMetrics::default();
    let cands = [Candidate {
        fresh: false,
        ..cand("a", 0, &down)
    }];
    assert_eq!(chosen(run(&cands, &req(0))), 0);
}

#[test]
fn all_down_routes_rather_than_fails() {
    let down = EndpointMetrics::default();
    assert_eq!(
        chosen(run(&[cand("a", 2, &down), cand("b", 1, &down)], &req(0))),
        1
    );
}

#[test]
fn saturated_pool_sheds_only_sheddable_requests() {
    let full = m(10, 0.95);
    let busier = m(20, 0.99);
    let cands = [cand("a", 0, &busier), cand("b", 0, &full)];
    assert_eq!(run(&cands, &req(-1)), Outcome::Shed);
    assert_eq!(chosen(run(&cands, &req(0))), 1, "least-bad endpoint");
    assert_eq!(chosen(run(&cands, &req(1))), 1);
}

#[test]
fn last_free_capacity_is_kept_for_higher_priority() {
    // Queue depth 4 with threshold 5: open for priority >= 0, saturated for
    // sheddable requests (headroom 0.8 → 4.0).
    let nearly = m(4, 0.1);
    let full = m(9, 0.9);
    let cands = [cand("nearly", 0, &nearly), cand("full", 0, &full)];
    assert_eq!(run(&cands, &req(-1)), Outcome::Shed);
    assert_eq!(chosen(run(&cands, &req(0))), 0);
}

#[test]
fn unsaturated_endpoints_are_preferred() {
    let open = m(1, 0.2);
    let sat = m(6, 0.1);
    let Outcome::Route(d) = run(&[cand("sat", 0, &sat), cand("open", 7, &open)], &req(0)) else {
        panic!()
    };
    assert_eq!(d.order, vec![1]);
}

#[test]
fn ties_are_broken_by_the_draw() {
    let x = m(0, 0.0);
    let cands = [cand("a", 0, &x), cand("b", 0, &x), cand("c", 0, &x)];
    let c = cfg();
    let p = profile(&c, "default");
    let mut seen = [0usize; 3];
    let mut rng = fastrand::Rng::with_seed(9);
    for _ in 0..3000 {
        seen[chosen(schedule(&c, &p, &req(0), &cands, rng.u32(..)))] += 1;
    }
    assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
}

#[test]
fn fallbacks_follow_score_order() {
    let (a, b, c, d) = (m(0, 0.1), m(1, 0.1), m(2, 0.1), m(3, 0.1));
    let cands = [
        cand("d", 0, &d),
        cand("c", 0, &c),
        cand("a", 0, &a),
        cand("b", 0, &b),
    ];
    let Outcome::Route(quiet) = run(&cands, &req(0)) else {
        panic!()
    };
    assert!(
        quiet.scored.iter().all(|s| s.parts.is_empty()),
        "no parts unless explain"
    );
    let mut c = cfg();
    c.explain = true;
    let Outcome::Route(dec) = schedule(&c, &profile(&c, "default"), &req(0), &cands, 0) else {
        panic!()
    };
    assert_eq!(dec.order, quiet.order);
    assert_eq!(dec.order, vec![2, 3, 1], "chosen + 2 fallbacks");
    assert_eq!(dec.scored.len(), 4);
    let text = explain(&dec, &cands);
    assert!(text.starts_with("a=0.7"), "{text}");
    assert!(text.contains("Queue="), "{text}");
}

#[test]
fn weighted_random_picker_stays_in_the_top_k() {
    let c = cfg();
    let p = Profile {
        picker: Picker::WeightedRandom { top_k: 2 },
        ..profile(&c, "default")
    };
    let (a, b, z) = (m(0, 0.0), m(1, 0.1), m(9, 0.9));
    let cands = [cand("a", 0, &a), cand("b", 0, &b), cand("z", 0, &z)];
    let mut rng = fastrand::Rng::with_seed(4);
    let mut seen = [0usize; 3];
    for _ in 0..2000 {
        seen[chosen(schedule(&c, &p, &req(0), &cands, rng.u32(..)))] += 1;
    }
    assert_eq!(seen[2], 0, "outside the top 2");
    assert!(seen[0] > seen[1] && seen[1] > 0, "{seen:?}");
}

#[test]
fn least_request_profile_ignores_metrics() {
    let c = cfg();
    let p = profile(&c, "least-request");
    let (busy, idle) = (m(4, 0.7), m(0, 0.0));
    let cands = [cand("busy", 0, &busy), cand("idle", 2, &idle)];
    assert_eq!(chosen(schedule(&c, &p, &req(0), &cands, 0)), 0);
}

/// Only the best few candidates are ordered unless `explain` is on: the choice
/// and the fallbacks must be the same as with every candidate sorted, for every
/// picker, with ties, in large pools.
#[test]
fn selecting_the_best_few_decides_as_sorting_all_would() {
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..300 {
        let n = rng.usize(1..60);
        // Few distinct values, so ties are common.
        let metrics: Vec<EndpointMetrics> = (0..n)
            .map(|_| m(rng.u32(0..4), f32::from(rng.u8(0..3)) / 10.0))
            .collect();
        let names: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
        let cands: Vec<Candidate<'_>> = (0..n)
            .map(|i| cand(&names[i], rng.u64(0..3), &metrics[i]))
            .collect();
        let mut c = cfg();
        c.fallback_endpoints = rng.usize(0..4);
        let mut p = profile(&c, "default");
        if round % 2 == 1 {
            p.picker = Picker::WeightedRandom {
                top_k: rng.usize(1..6),
            };
        }
        let draw = rng.u32(..);
        let quiet = schedule(&c, &p, &req(0), &cands, draw);
        c.explain = true;
        let full = schedule(&c, &p, &req(0), &cands, draw);
        match (quiet, full) {
            (Outcome::Route(q), Outcome::Route(f)) => {
                assert_eq!(q.order, f.order, "round {round}: n={n}");
                assert_eq!(f.scored.len(), n);
                assert!(q.scored.len() <= n);
            }
            (q, f) => assert_eq!(q, f, "round {round}"),
        }
    }
}

#[test]
fn keep_best_equals_a_full_sort_cut_to_k() {
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..2_000 {
        let n = rng.usize(1..40);
        let k = rng.usize(1..=SMALL_TOP);
        // Few distinct totals, so ties (broken by index) are common.
        let scored: Vec<Ranked> = (0..n)
            .map(|index| Ranked {
                index,
                total: f64::from(rng.u8(0..6)) / 5.0,
            })
            .collect();
        let mut want = scored.clone();
        want.sort_by(best_first);
        want.truncate(k);
        let mut got = scored;
        keep_best(&mut got, k);
        let ids = |v: &[Ranked]| v.iter().map(|s| s.index).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(&want), "round {round}, n {n}, k {k}");
    }
}

/// `finish` told which candidates have in-flight requests or prefix matches
/// (the rest ranked by the prepared order) decides exactly as scoring each one:
/// sparse and dense counts, ties, both pickers, fallbacks, weights switched off,
/// candidates filtered out, repeats in the list.
#[test]
fn sparse_ranking_decides_as_scoring_every_candidate() {
    let mut rng = fastrand::Rng::with_seed(23);
    let mut sparse_used = 0;
    for round in 0..4_000 {
        let n = rng.usize(1..80);
        // Few distinct metrics, so equal bases are common; some saturated or
        // down, so the filters drop candidates.
        let metrics: Vec<EndpointMetrics> = (0..n)
            .map(|_| EndpointMetrics {
                healthy: rng.u8(..20) != 0,
                ..m(rng.u32(0..7), f32::from(rng.u8(0..10)) / 10.0)
            })
            .collect();
        let names: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
        let touched: Vec<usize> = (0..rng.usize(0..=n.min(6)))
            .map(|_| rng.usize(..n))
            .collect();
        let dynamic: Vec<(u64, usize)> = (0..n)
            .map(|i| match touched.contains(&i) {
                true => (rng.u64(0..4), rng.usize(0..3)),
                false => (0, 0),
            })
            .collect();
        let cands: Vec<Candidate<'_>> = (0..n)
            .map(|i| Candidate {
                fresh: rng.u8(..10) != 0,
                ..cand(&names[i], dynamic[i].0, &metrics[i])
            })
            .collect();
        let mut c = cfg();
        c.fallback_endpoints = rng.usize(0..4);
        let mut p = profile(&c, "default");
        for (_, w) in &mut p.scorers {
            *w = [0.0, 0.5, 1.0, 2.0, 3.0][rng.usize(..5)];
        }
        if round % 2 == 1 {
            p.picker = Picker::WeightedRandom {
                top_k: rng.usize(1..6),
            };
        }
        let r = Request {
            prompt_blocks: rng.usize(0..3),
            ..req(if rng.u8(..4) == 0 { -1 } else { 0 })
        };
        let prepared = prepare(&c, &p, &r, &cands);
        let draw = rng.u32(..);
        let dense = finish(&c, &p, &r, &prepared, |i| dynamic[i], None, draw);
        let sparse = finish(&c, &p, &r, &prepared, |i| dynamic[i], Some(&touched), draw);
        assert_eq!(sparse, dense, "round {round}: n {n}, touched {touched:?}");
        // The walk that does not trust the prepared order (rounding made two
        // bases' totals equal) decides the same.
        let cautious = Prepared {
            ranked_by_base: false,
            ..prepared.clone()
        };
        let sparse = finish(&c, &p, &r, &cautious, |i| dynamic[i], Some(&touched), draw);
        assert_eq!(
            sparse, dense,
            "round {round}, cautious: n {n}, touched {touched:?}"
        );
        let weights = Weights::of(&p);
        if rank_sparse(
            &weights,
            &r,
            &prepared,
            &|i| dynamic[i],
            &touched,
            true,
            |t| t.max(c.fallback_endpoints + 1),
        )
        .is_some()
        {
            sparse_used += 1;
        }
    }
    assert!(
        sparse_used > 2_000,
        "the sparse ranking ran {sparse_used} times"
    );
}

/// Two different bases whose totals round to the same number (0.1 + 0.2 and
/// 0.3, plus the constant terms) rank by index, as in the dense ranking, though
/// the prepared order has the larger base first.
#[test]
fn sparse_ranking_sorts_totals_that_rounding_made_equal() {
    let metrics = m(0, 0.0);
    let names: Vec<String> = (0..4).map(|i| format!("e{i}")).collect();
    let cands: Vec<Candidate<'_>> = names.iter().map(|n| cand(n, 0, &metrics)).collect();
    let mut c = cfg();
    c.fallback_endpoints = 0;
    let mut p = profile(&c, "default");
    for (_, w) in &mut p.scorers {
        *w = 1.0;
    }
    p.picker = Picker::WeightedRandom { top_k: 1 };
    let r = req(0);
    let mut prepared = prepare(&c, &p, &r, &cands);
    prepared.base = vec![0.1, 0.3, 0.1, 0.1 + 0.2];
    order_by_base(&mut prepared, &Weights::of(&p), &r, 4);
    assert!(
        !prepared.ranked_by_base,
        "the totals of 0.3 and 0.1 + 0.2 collapse"
    );
    assert_eq!(prepared.by_base[0], 3, "the larger base first");
    let dense = finish(&c, &p, &r, &prepared, |_| (0, 0), None, 0);
    let sparse = finish(&c, &p, &r, &prepared, |_| (0, 0), Some(&[]), 0);
    assert_eq!(chosen(dense.clone()), 1);
    assert_eq!(sparse, dense);
}
