use super::*;
use crate::sim::metrics::{render, Flavor};

fn cfg() -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_gpu_blocks: 64,
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        ..EngineConfig::default()
    }
}

fn costs() -> Costs {
    Costs {
        step: 0.010,
        per_seq: 0.001,
        prefill_token: 0.0001,
        prefill_overhead: 0.0,
        lora_load: 0.05,
    }
}

/// A prompt of `n` tokens; prompts with the same `seed` share their prefix.
fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| seed * 100_000 + i).collect()
}

fn req(model: &str, prompt: Vec<u32>, max_tokens: u32) -> NewRequest {
    NewRequest {
        model: model.into(),
        prompt,
        max_tokens,
        priority: 0,
    }
}

/// Every token with its time, until the engine is idle.
fn run(e: &mut Engine, clock: &mut f64) -> Vec<(f64, TokenEvent)> {
    let mut out = Vec::new();
    while let Some((_, evs)) = e.step(clock) {
        out.extend(evs.into_iter().map(|ev| (*clock, ev)));
        assert!(out.len() < 1_000_000, "runaway");
    }
    out
}

fn first_token(log: &[(f64, TokenEvent)], id: RequestId) -> f64 {
    log.iter()
        .find(|(_, ev)| ev.id == id)
        .map(|(t, _)| *t)
        .expect("a token")
}

fn tokens_of(log: &[(f64, TokenEvent)], id: RequestId) -> Vec<u32> {
    log.iter()
        .filter(|(_, ev)| ev.id == id)
        .map(|(_, ev)| ev.index)
        .collect()
}

#[test]
fn batch_is_capped_and_the_rest_wait_in_order() {
    let mut e = Engine::new(
        EngineConfig {
            max_num_seqs: 2,
            ..cfg()
        },
        costs(),
    );
    let ids: Vec<_> = (0..4)
        .map(|i| e.submit(req("m", prompt(i, 8), 5), 0.0).unwrap())
        .collect();
    assert_eq!((e.num_running(), e.num_waiting()), (0, 4));
    let mut clock = 0.0;
    let (info, evs) = e.step(&mut clock).unwrap();
    assert_eq!(info.admitted, 2);
    assert_eq!((e.num_running(), e.num_waiting()), (2, 2));
    let mut log: Vec<_> = evs.into_iter().map(|ev| (clock, ev)).collect();
    log.extend(run(&mut e, &mut clock));
    // FIFO: the first two finish before the last two start.
    let last_of_first = log
        .iter()
        .filter(|(_, ev)| ev.id == ids[1])
        .map(|(t, _)| *t)
        .fold(0.0, f64::max);
    assert!(first_token(&log, ids[2]) > last_of_first - 1e-12);
    assert!(first_token(&log, ids[2]) <= first_token(&log, ids[3]));
    for id in &ids[1..] {
        assert_eq!(
            tokens_of(&log, *id).len(),
            if *id == ids[0] { 4 } else { 5 }
        );
    }
    assert_eq!((e.num_running(), e.num_waiting()), (0, 0));
    assert_eq!(e.stats().finished[&FinishReason::Length], 4);
    assert_eq!(e.stats().generation_tokens, 20);
    assert_eq!(e.stats().prompt_tokens, 32);
}

#[test]
fn decode_slows_as_the_batch_grows_and_prefill_costs_per_token() {
    let c = costs();
    let mut e = Engine::new(cfg(), c);
    e.submit(req("m", prompt(1, 10), 3), 0.0).unwrap();
    let mut clock = 0.0;
    let (first, _) = e.step(&mut clock).unwrap();
    assert_eq!(first.prefill_tokens, 10);
    assert!((first.duration - (c.step + 10.0 * c.prefill_token)).abs() < 1e-12);
    let (lone, _) = e.step(&mut clock).unwrap();
    assert_eq!(
        (lone.batch, lone.decode_seqs, lone.prefill_tokens),
        (1, 1, 0)
    );
    assert!((lone.duration - c.step).abs() < 1e-12);
    run(&mut e, &mut clock);

    for i in 0..4 {
        e.submit(req("m", prompt(10 + i, 10), 3), clock).unwrap();
    }
    e.step(&mut clock).unwrap();
    let (full, _) = e.step(&mut clock).unwrap();
    assert_eq!(full.decode_seqs, 4);
    assert!((full.duration - (c.step + 3.0 * c.per_seq)).abs() < 1e-12);
    assert!(full.duration > lone.duration);

    // A longer prompt: a longer first step, so a later first token.
    let mut e = Engine::new(cfg(), c);
    let short = e.submit(req("m", prompt(1, 8), 1), 0.0).unwrap();
    let mut clock = 0.0;
    let log = run(&mut e, &mut clock);
    let t_short = first_token(&log, short);
    let long = e.submit(req("m", prompt(2, 60), 1), clock).unwrap();
    let start = clock;
    let log = run(&mut e, &mut clock);
    assert!(first_token(&log, long) - start > t_short);
}

#[test]
fn long_prompts_prefill_in_chunks_within_the_token_budget() {
    let mut e = Engine::new(
        EngineConfig {
            max_num_batched_tokens: 16,
            ..cfg()
        },
        costs(),
    );
    let id = e.submit(req("m", prompt(1, 40), 2), 0.0).unwrap();
    let mut clock = 0.0;
    let mut chunks = Vec::new();
    let mut log = Vec::new();
    while let Some((info, evs)) = e.step(&mut clock) {
        chunks.push(info.prefill_tokens);
        log.extend(evs);
    }
    assert_eq!(chunks, vec![16, 16, 8, 0]);
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].id, id);
}

#[test]
fn kv_blocks_follow_prompt_and_output_and_are_freed() {
    let mut e = Engine::new(cfg(), costs());
    // 10 prompt tokens at 4 per block: 3 blocks; each output token grows it.
    e.submit(req("m", prompt(1, 10), 6), 0.0).unwrap();
    let mut clock = 0.0;
    e.step(&mut clock).unwrap();
    assert_eq!(e.kv().num_blocks() - e.kv().num_free(), 3);
    // Tokens 11, 12 fit block 3; token 13 needs a 4th block.
    e.step(&mut clock).unwrap(); // computes token 11
    e.step(&mut clock).unwrap(); // computes token 12
    assert_eq!(e.kv().num_blocks() - e.kv().num_free(), 3);
    e.step(&mut clock).unwrap(); // computes token 13
    assert_eq!(e.kv().num_blocks() - e.kv().num_free(), 4);
    assert!((e.kv_usage() - 4.0 / 64.0).abs() < 1e-12);
    run(&mut e, &mut clock);
    assert_eq!(e.kv_usage(), 0.0);
    assert_eq!(e.kv().num_free(), 64);
}

#[test]
fn abort_frees_running_and_waiting_requests() {
    let mut e = Engine::new(
        EngineConfig {
            max_num_seqs: 1,
            ..cfg()
        },
        costs(),
    );
    let a = e.submit(req("m", prompt(1, 20), 50), 0.0).unwrap();
    let b = e.submit(req("m", prompt(2, 20), 50), 0.0).unwrap();
    let mut clock = 0.0;
    e.step(&mut clock).unwrap();
    e.step(&mut clock).unwrap();
    assert_eq!((e.num_running(), e.num_waiting()), (1, 1));
    assert!(e.kv_usage() > 0.0);
    // Aborted in the middle of a step: its tokens are dropped at completion.
    e.schedule(clock);
    assert!(e.abort(a, clock));
    assert!(e.complete(clock + 0.01).is_empty());
    assert!(e.abort(b, clock));
    assert!(!e.abort(b, clock), "already gone");
    assert_eq!((e.num_running(), e.num_waiting()), (0, 0));
    assert_eq!(e.kv_usage(), 0.0);
    assert_eq!(e.stats().finished[&FinishReason::Abort], 2);
    assert!(e.step(&mut clock).is_none());
}

#[test]
fn a_repeated_prefix_hits_the_cache_and_skips_prefill() {
    let c = costs();
    let mut e = Engine::new(cfg(), c);
    let mut clock = 0.0;
    let first = e.submit(req("m", prompt(7, 41), 1), clock).unwrap();
    let (cold, _) = e.step(&mut clock).unwrap();
    assert_eq!((cold.prefill_tokens, cold.cached_tokens), (41, 0));
    let log = run(&mut e, &mut clock);
    assert!(log.is_empty() || log.iter().all(|(_, ev)| ev.id == first));
    assert_eq!(e.kv().num_cached(), 10, "10 full blocks of 4");

    let start = clock;
    e.submit(req("m", prompt(7, 41), 1), clock).unwrap();
    let (warm, _) = e.step(&mut clock).unwrap();
    assert_eq!((warm.prefill_tokens, warm.cached_tokens), (1, 40));
    assert!(warm.duration < cold.duration);
    assert!(clock - start < cold.duration);
    let s = e.stats();
    assert_eq!((s.prefix_queries, s.prefix_hits), (82, 40));

    // Sharing only the first 9 tokens: two blocks hit.
    let mut other = prompt(7, 9);
    other.extend(prompt(8, 20));
    e.submit(req("m", other, 1), clock).unwrap();
    let (partial, _) = e.step(&mut clock).unwrap();
    assert_eq!(partial.cached_tokens, 8);

    // A whole-prompt hit still computes the last token (to sample from).
    e.submit(req("m", prompt(7, 40), 1), clock).unwrap();
    let (all, _) = e.step(&mut clock).unwrap();
    assert_eq!((all.cached_tokens, all.prefill_tokens), (36, 4));

    // Without prefix caching: no hits.
    let mut off = Engine::new(
        EngineConfig {
            enable_prefix_caching: false,
            ..cfg()
        },
        c,
    );
    let mut clock = 0.0;
    for _ in 0..2 {
        off.submit(req("m", prompt(7, 41), 1), clock).unwrap();
        let (info, _) = off.step(&mut clock).unwrap();
        assert_eq!(info.cached_tokens, 0);
        run(&mut off, &mut clock);
    }
}

#[test]
fn lru_eviction_drops_the_oldest_unused_prefix() {
    // 6 blocks of 4: room for three cached 8-token prompts at most, minus space
    // for the one running.
    let mut e = Engine::new(
        EngineConfig {
            num_gpu_blocks: 6,
            ..cfg()
        },
        costs(),
    );
    let mut clock = 0.0;
    let cached = |e: &mut Engine, seed: u32, clock: &mut f64| {
        e.submit(req("m", prompt(seed, 9), 1), *clock).unwrap();
        let (info, _) = e.step(clock).unwrap();
        run(e, clock);
        info.cached_tokens
    };
    assert_eq!(cached(&mut e, 1, &mut clock), 0);
    assert_eq!(cached(&mut e, 2, &mut clock), 0);
    // Prompt 1 is used again: now more recent than prompt 2.
    assert_eq!(cached(&mut e, 1, &mut clock), 8);
    // Prompt 3 needs 3 blocks: of the 6, 2 hold prompt 2 (LRU), 2 prompt 1, and 2
    // nothing; it takes the 2 empty ones and evicts one block of prompt 2: its
    // last one (a request's tail goes first, its shared head lives longer).
    assert_eq!(cached(&mut e, 3, &mut clock), 0);
    assert_eq!(e.kv().evictions(), 1);
    assert_eq!(cached(&mut e, 1, &mut clock), 8, "recently used: kept");
    assert_eq!(
        cached(&mut e, 2, &mut clock),
        4,
        "LRU: its tail block evicted"
    );
}

#[test]
fn a_request_that_does_not_fit_waits_even_with_free_seats() {
    // 8 blocks of 4 = 32 tokens: one 20-token prompt leaves 3 blocks.
    let mut e = Engine::new(
        EngineConfig {
            num_gpu_blocks: 8,
            ..cfg()
        },
        costs(),
    );
    let a = e.submit(req("m", prompt(1, 20), 4), 0.0).unwrap();
    let b = e.submit(req("m", prompt(2, 20), 4), 0.0).unwrap();
    let mut clock = 0.0;
    e.step(&mut clock).unwrap();
    assert_eq!((e.num_running(), e.num_waiting()), (1, 1));
    let log = run(&mut e, &mut clock);
    let last_a = log
        .iter()
        .filter(|(_, ev)| ev.id == a)
        .map(|(t, _)| *t)
        .fold(0.0, f64::max);
    assert!(first_token(&log, b) > last_a);
    assert_eq!(e.stats().preemptions, 0);
    assert_eq!(e.kv_usage(), 0.0);
}

#[test]
fn growing_requests_preempt_the_newest_which_recomputes() {
    // 6 blocks of 4 = 24 tokens; two 8-token prompts fit (4 blocks) but not their
    // growth to 8 + 10 tokens each.
    let mut e = Engine::new(
        EngineConfig {
            num_gpu_blocks: 6,
            ..cfg()
        },
        costs(),
    );
    let a = e.submit(req("m", prompt(1, 8), 10), 0.0).unwrap();
    let b = e.submit(req("m", prompt(2, 8), 10), 0.0).unwrap();
    let mut clock = 0.0;
    let (first, _) = e.step(&mut clock).unwrap();
    assert_eq!(first.admitted, 2);
    let mut preempted_at = None;
    let mut log = Vec::new();
    while let Some((info, evs)) = e.step(&mut clock) {
        if info.preempted > 0 && preempted_at.is_none() {
            preempted_at = Some(clock);
            assert_eq!((e.num_running(), e.num_waiting()), (1, 1));
        }
        log.extend(evs.into_iter().map(|ev| (clock, ev)));
    }
    assert!(preempted_at.is_some(), "memory ran out");
    assert!(e.stats().preemptions >= 1);
    // Every token of both, each once, in order: recomputation emits nothing twice.
    let expected: Vec<u32> = (1..10).collect();
    assert_eq!(tokens_of(&log, a), expected);
    assert_eq!(tokens_of(&log, b), expected);
    assert_eq!(e.kv_usage(), 0.0);
    assert_eq!(e.stats().finished[&FinishReason::Length], 2);
}

#[test]
fn lora_adapters_take_slots_and_wait_for_one() {
    let c = costs();
    let mut e = Engine::new(
        EngineConfig {
            max_loras: 1,
            lora_adapters: vec!["a".into(), "b".into()],
            ..cfg()
        },
        c,
    );
    assert!(e.lora_enabled() && e.is_lora("a") && !e.is_lora("base"));
    let ra = e.submit(req("a", prompt(1, 4), 3), 0.0).unwrap();
    let rb = e.submit(req("b", prompt(2, 4), 3), 0.0).unwrap();
    let base = e.submit(req("base", prompt(3, 4), 3), 0.0).unwrap();
    let mut clock = 0.0;
    let (info, _) = e.step(&mut clock).unwrap();
    // "b" cannot join a batch that already has one adapter; the base model can.
    assert_eq!(info.admitted, 2);
    assert_eq!(info.lora_loads, 1);
    assert!(info.duration >= c.lora_load);
    assert_eq!(e.running_loras(), vec!["a".to_string()]);
    assert_eq!(e.waiting_loras(), vec!["b".to_string()]);
    let now = e.lora_info().last().unwrap().clone();
    assert_eq!((now.running.as_str(), now.waiting.as_str()), ("a", "b"));
    let log = run(&mut e, &mut clock);
    assert!(first_token(&log, rb) > first_token(&log, ra));
    assert!(first_token(&log, base) < first_token(&log, rb));
    assert_eq!(e.running_loras(), Vec::<String>::new());
    // The history keeps older label sets, newest last.
    let infos = e.lora_info();
    assert!(infos.len() >= 3, "{infos:?}");
    assert_eq!(infos.last().unwrap().running, "");
    assert!(infos.iter().any(|i| i.running == "b"));

    // A resident adapter costs nothing to use again; another one reloads.
    e.submit(req("b", prompt(4, 4), 1), clock).unwrap();
    let (again, _) = e.step(&mut clock).unwrap();
    assert_eq!(again.lora_loads, 0);
    run(&mut e, &mut clock);
    e.submit(req("a", prompt(5, 4), 1), clock).unwrap();
    let (reload, _) = e.step(&mut clock).unwrap();
    assert_eq!(reload.lora_loads, 1);
}

#[test]
fn the_same_prompt_under_another_adapter_is_other_kv() {
    let mut e = Engine::new(
        EngineConfig {
            max_loras: 2,
            lora_adapters: vec!["a".into()],
            ..cfg()
        },
        costs(),
    );
    let mut clock = 0.0;
    e.submit(req("base", prompt(1, 17), 1), clock).unwrap();
    run(&mut e, &mut clock);
    e.submit(req("a", prompt(1, 17), 1), clock).unwrap();
    let (info, _) = e.step(&mut clock).unwrap();
    assert_eq!(info.cached_tokens, 0);
}

#[test]
fn priority_policy_runs_lower_values_first() {
    let mut e = Engine::new(
        EngineConfig {
            max_num_seqs: 1,
            policy: Policy::Priority,
            ..cfg()
        },
        costs(),
    );
    let mut ids = Vec::new();
    for p in [5, 1, 3] {
        ids.push(
            e.submit(
                NewRequest {
                    priority: p,
                    ..req("m", prompt(p as u32, 4), 2)
                },
                0.0,
            )
            .unwrap(),
        );
    }
    let mut clock = 0.0;
    let log = run(&mut e, &mut clock);
    let order: Vec<f64> = ids.iter().map(|id| first_token(&log, *id)).collect();
    assert!(order[1] < order[2] && order[2] < order[0], "{order:?}");

    // FCFS ignores priority.
    let mut f = Engine::new(
        EngineConfig {
            max_num_seqs: 1,
            ..cfg()
        },
        costs(),
    );
    let a = f
        .submit(
            NewRequest {
                priority: 9,
                ..req("m", prompt(1, 4), 2)
            },
            0.0,
        )
        .unwrap();
    let b = f.submit(req("m", prompt(2, 4), 2), 0.0).unwrap();
    let log = run(&mut f, &mut clock);
    assert!(first_token(&log, a) < first_token(&log, b));
}

#[test]
fn too_long_requests_are_rejected() {
    let mut e = Engine::new(
        EngineConfig {
            num_gpu_blocks: 4,
            ..cfg()
        },
        costs(),
    );
    assert_eq!(e.max_model_len(), 16);
    assert_eq!(
        e.submit(req("m", prompt(1, 10), 7), 0.0),
        Err(Rejected::TooLong {
            tokens: 17,
            limit: 16
        })
    );
    assert!(e.submit(req("m", prompt(1, 10), 6), 0.0).is_ok());
    assert!(
        e.submit(req("m", Vec::new(), 1), 0.0).is_ok(),
        "empty prompt"
    );
}

#[test]
fn zero_costs_make_steps_free() {
    let c = Costs::resolve(&EngineConfig::default(), 0.0, 0.0);
    assert_eq!(
        c.step + c.per_seq + c.prefill_token + c.prefill_overhead + c.lora_load,
        0.0
    );
    let c = Costs::resolve(&EngineConfig::default(), 20.0, 100.0);
    assert!((c.step - 0.020).abs() < 1e-12);
    assert!((c.prefill_overhead - 0.1).abs() < 1e-12);
    assert!(c.prefill_token > 0.0 && c.per_seq > 0.0);
    let c = Costs::resolve(
        &EngineConfig {
            prefill_ms_per_token: Some(1.0),
            ..EngineConfig::default()
        },
        0.0,
        0.0,
    );
    assert!((c.prefill_token - 0.001).abs() < 1e-12);
}

/// A scripted workload with arrivals between steps.
fn scripted(cfg: EngineConfig) -> (Vec<(f64, TokenEvent)>, String) {
    let mut e = Engine::new(cfg, costs());
    let mut rng = fastrand::Rng::with_seed(42);
    let mut clock = 0.0;
    let mut log = Vec::new();
    let models = ["base", "a", "b", "c"];
    for round in 0..40 {
        for _ in 0..rng.usize(0..3) {
            let seed = rng.u32(0..5);
            let model = models[rng.usize(..models.len())];
            let _ = e.submit(
                NewRequest {
                    priority: rng.i64(0..3),
                    ..req(model, prompt(seed, rng.usize(1..30)), rng.u32(1..8))
                },
                clock,
            );
        }
        if round % 7 == 3 {
            e.abort(round as u64 / 2 + 1, clock);
        }
        if let Some((_, evs)) = e.step(&mut clock) {
            log.extend(evs.into_iter().map(|ev| (clock, ev)));
        }
    }
    log.extend(run(&mut e, &mut clock));
    assert_eq!((e.num_running(), e.num_waiting()), (0, 0));
    assert_eq!(e.kv_usage(), 0.0, "no leaked blocks");
    let text = render(&e, Flavor::Vllm, "m", clock, 1000.0);
    (log, text)
}

#[test]
fn scheduling_is_deterministic() {
    let cfg = EngineConfig {
        num_gpu_blocks: 12,
        max_num_seqs: 3,
        max_loras: 2,
        lora_adapters: vec!["a".into(), "b".into(), "c".into()],
        policy: Policy::Priority,
        ..cfg()
    };
    let (log1, text1) = scripted(cfg.clone());
    let (log2, text2) = scripted(cfg);
    assert!(!log1.is_empty());
    assert_eq!(log1, log2);
    assert_eq!(text1, text2);
}

#[test]
fn metrics_text_has_vllm_names_labels_and_values() {
    let mut e = Engine::new(
        EngineConfig {
            max_num_seqs: 1,
            max_loras: 2,
            lora_adapters: vec!["sql".into()],
            ..cfg()
        },
        costs(),
    );
    let mut clock = 0.0;
    e.submit(req("sql", prompt(1, 8), 2), 0.0).unwrap();
    e.submit(req("base", prompt(2, 8), 2), 0.0).unwrap();
    e.step(&mut clock).unwrap();
    let t = render(&e, Flavor::Vllm, "llama", clock, 1_700_000_000.5);
    for line in [
        "# TYPE vllm:num_requests_running gauge",
        "vllm:num_requests_running{model_name=\"llama\"} 1.0\n",
        "vllm:num_requests_waiting{model_name=\"llama\"} 1.0\n",
        "vllm:kv_cache_usage_perc{model_name=\"llama\"} 0.03125\n",
        "vllm:cache_config_info{block_size=\"4\",enable_prefix_caching=\"True\",num_gpu_blocks=\"64\"} 1.0\n",
        "# TYPE vllm:lora_requests_info gauge",
        "vllm:lora_requests_info{running_lora_adapters=\"sql\",waiting_lora_adapters=\"\",max_lora=\"2\"} 1700000000.5\n",
        "vllm:prefix_cache_queries_total{model_name=\"llama\"} 8.0\n",
        "vllm:prefix_cache_hits_total{model_name=\"llama\"} 0.0\n",
        "# TYPE vllm:request_success_total counter",
        "vllm:request_success_total{finished_reason=\"length\",model_name=\"llama\"} 0.0\n",
        "# TYPE vllm:time_to_first_token_seconds histogram",
        "vllm:time_to_first_token_seconds_count{model_name=\"llama\"} 1.0\n",
        "vllm:time_to_first_token_seconds_bucket{model_name=\"llama\",le=\"+Inf\"} 1.0\n",
        "vllm:inter_token_latency_seconds_count{model_name=\"llama\"} 0.0\n",
        "# TYPE vllm:time_per_output_token_seconds histogram",
        "# TYPE vllm:e2e_request_latency_seconds histogram",
        "vllm:prompt_tokens_total{model_name=\"llama\"} 8.0\n",
        "vllm:generation_tokens_total{model_name=\"llama\"} 1.0\n",
    ] {
        assert!(t.contains(line), "missing {line:?} in\n{t}");
    }
    let ttft = clock;
    assert!(t.contains(&format!(
        "vllm:time_to_first_token_seconds_sum{{model_name=\"llama\"}} {ttft}\n"
    )));
    run(&mut e, &mut clock);
    let t = render(&e, Flavor::Vllm, "llama", clock, 2e9);
    assert!(t.contains(
        "vllm:request_success_total{finished_reason=\"length\",model_name=\"llama\"} 2.0\n"
    ));
    assert!(t.contains("vllm:kv_cache_usage_perc{model_name=\"llama\"} 0.0\n"));
    assert!(t.contains("vllm:e2e_request_latency_seconds_count{model_name=\"llama\"} 2.0\n"));
    // Older label sets stay, with older timestamps; the current one is "now".
    assert!(t.contains(
        "vllm:lora_requests_info{running_lora_adapters=\"\",waiting_lora_adapters=\"\",max_lora=\"2\"} 2000000000.0\n"
    ), "{t}");
    assert!(t.contains("running_lora_adapters=\"sql\""));

    let v0 = render(&e, Flavor::VllmV0, "llama", clock, 2e9);
    assert!(v0.contains("vllm:gpu_cache_usage_perc{model_name=\"llama\"} 0.0\n"));
    assert!(!v0.contains("kv_cache_usage_perc"));
}

#[test]
fn metrics_text_in_sglang_and_tgi_names() {
    let mut e = Engine::new(
        EngineConfig {
            max_num_seqs: 1,
            ..cfg()
        },
        costs(),
    );
    let mut clock = 0.0;
    e.submit(req("m", prompt(1, 8), 2), 0.0).unwrap();
    e.submit(req("m", prompt(2, 8), 2), 0.0).unwrap();
    e.step(&mut clock).unwrap();
    let s = render(&e, Flavor::Sglang, "m", clock, 0.0);
    for line in [
        "# TYPE sglang:num_running_reqs gauge",
        "sglang:num_running_reqs{model_name=\"m\"} 1.0\n",
        "sglang:num_queue_reqs{model_name=\"m\"} 1.0\n",
        "sglang:token_usage{model_name=\"m\"} 0.03125\n",
        "sglang:time_to_first_token_seconds_count{model_name=\"m\"} 1.0\n",
    ] {
        assert!(s.contains(line), "missing {line:?} in\n{s}");
    }
    assert!(!s.contains("vllm:"));
    let t = render(&e, Flavor::Tgi, "m", clock, 0.0);
    for line in [
        "# TYPE tgi_queue_size gauge",
        "tgi_queue_size 1.0\n",
        "tgi_batch_current_size 1.0\n",
    ] {
        assert!(t.contains(line), "missing {line:?} in\n{t}");
    }
    assert!("vllm".parse::<Flavor>().is_ok() && "nope".parse::<Flavor>().is_err());
}
