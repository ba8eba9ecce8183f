//! The simulated inference engine: vLLM V1's scheduler, reduced to what shapes
//! latency and the load metrics. Pure and deterministic: time is an argument
//! (seconds on any clock), nothing here sleeps, and the same calls give the same
//! answers. [`super::driver`] runs it in real time.
//!
//! One engine step ([`Engine::schedule`], then [`Engine::complete`] when its time is
//! up):
//! 1. running requests, in admission order, each get their next tokens: a decode
//!    token, or the next chunk of a prompt, within the token budget
//!    (`max_num_batched_tokens`). A request that needs a KV block when none is free
//!    preempts the newest (or, by priority, least important) running request, which
//!    frees its blocks and goes back to waiting to be recomputed later.
//! 2. if nothing was preempted, waiting requests are admitted in queue order while
//!    `max_num_seqs`, the budget and free KV blocks allow. A request whose prompt
//!    blocks are in the prefix cache starts with those tokens computed. One that
//!    does not fit in KV blocks the queue (head of line, as vLLM does); one whose
//!    LoRA adapter cannot join the batch (`max_loras` distinct adapters running) is
//!    skipped and waits.
//! 3. the step lasts `decode step + per-sequence cost × (batch − 1) + prefill cost ×
//!    prefill tokens (+ overhead if any) + adapter loads`. At its end, every request
//!    whose tokens are all computed emits one token.

use super::kv::{self, BlockId, KvCache};
use super::metrics::Histogram;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub type RequestId = u64;

/// Waiting-queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// First come, first served; preempted requests go back to the front.
    #[default]
    Fcfs,
    /// vLLM's priority scheduling: the *lower* `priority` value runs first (ties by
    /// arrival), and the highest value is preempted first.
    Priority,
}

/// The engine's knobs (vLLM's names where vLLM has one).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks plus decode tokens).
    pub max_num_batched_tokens: usize,
    /// Longest prompt + max_tokens accepted; None: what the KV cache holds.
    pub max_model_len: Option<usize>,
    pub enable_prefix_caching: bool,
    pub policy: Policy,
    /// Distinct LoRA adapters in one batch (and adapter slots on the "GPU").
    pub max_loras: usize,
    /// Model names that are LoRA adapters of the base model.
    pub lora_adapters: Vec<String>,
    /// Loading an adapter that is not resident; None: 5 decode steps.
    pub lora_load_ms: Option<f64>,
    /// Prefill time per uncached prompt token; None: 1% of a decode step.
    pub prefill_ms_per_token: Option<f64>,
    /// Extra decode-step time per sequence in the batch beyond the first; None: 2%
    /// of a decode step.
    pub decode_ms_per_seq: Option<f64>,
}

impl Default for EngineConfig {
    /// A small GPU: ~32k tokens of KV, 64 sequences, 2048-token steps.
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_gpu_blocks: 2048,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            enable_prefix_caching: true,
            policy: Policy::Fcfs,
            max_loras: 1,
            lora_adapters: Vec::new(),
            lora_load_ms: None,
            prefill_ms_per_token: None,
            decode_ms_per_seq: None,
        }
    }
}

/// Step costs in seconds, resolved from the config and the two classic knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// One decode step with a batch of one (`--per-token-ms`).
    pub step: f64,
    pub per_seq: f64,
    pub prefill_token: f64,
    /// Extra time of a step that prefills (`--ttft-ms`).
    pub prefill_overhead: f64,
    pub lora_load: f64,
}

impl Costs {
    /// Defaults scale with `per_token_ms`, so `--per-token-ms 0 --ttft-ms 0` makes
    /// the whole model free (overhead benchmarks) unless a cost is set explicitly.
    pub fn resolve(cfg: &EngineConfig, per_token_ms: f64, ttft_ms: f64) -> Costs {
        let ms = |v: f64| v.max(0.0) / 1000.0;
        Costs {
            step: ms(per_token_ms),
            per_seq: ms(cfg.decode_ms_per_seq.unwrap_or(per_token_ms * 0.02)),
            prefill_token: ms(cfg.prefill_ms_per_token.unwrap_or(per_token_ms * 0.01)),
            prefill_overhead: ms(ttft_ms),
            lora_load: ms(cfg.lora_load_ms.unwrap_or(per_token_ms * 5.0)),
        }
    }
}

/// A request as the engine needs it: token ids, not text.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub model: String,
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    /// Used only with [`Policy::Priority`]; lower runs first.
    pub priority: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Prompt plus max_tokens exceed the model length (or the whole KV cache).
    TooLong { tokens: usize, limit: usize },
}

/// A token came out for request `id`: the `index`-th output token, `last` when
/// the request is complete (and gone from the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent {
    pub id: RequestId,
    pub index: u32,
    pub last: bool,
}

/// What one scheduled step does.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    pub duration: f64,
    pub batch: usize,
    pub decode_seqs: usize,
    pub prefill_tokens: usize,
    /// Prompt tokens newly admitted requests found in the prefix cache.
    pub cached_tokens: usize,
    pub admitted: usize,
    pub preempted: usize,
    pub lora_loads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub const ALL: [FinishReason; 3] = [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::Abort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Counters and histograms behind `/metrics`, in engine time.
#[derive(Debug, Clone)]
pub struct Stats {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub finished: BTreeMap<FinishReason, u64>,
    /// Prompt tokens looked up in / found in the prefix cache (vLLM counts tokens).
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            prompt_tokens: 0,
            generation_tokens: 0,
            finished: BTreeMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
            preemptions: 0,
            ttft: Histogram::new(super::metrics::TTFT_BUCKETS),
            itl: Histogram::new(super::metrics::ITL_BUCKETS),
            e2e: Histogram::new(super::metrics::E2E_BUCKETS),
            queue_time: Histogram::new(super::metrics::E2E_BUCKETS),
        }
    }
}

/// One value of `vllm:lora_requests_info`'s labels and when it was last current.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    pub running: String,
    pub waiting: String,
    pub at: f64,
}

#[derive(Debug)]
struct Req {
    lora: Option<String>,
    prompt_len: usize,
    /// Chained hashes of the prompt's full blocks.
    hashes: Vec<u64>,
    max_tokens: u32,
    priority: i64,
    arrival: f64,
    output: u32,
    /// Tokens whose KV is computed.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Leading blocks already offered to the prefix cache.
    committed: usize,
    first_scheduled: bool,
    first_token_at: Option<f64>,
    last_token_at: f64,
}

impl Req {
    fn num_tokens(&self) -> usize {
        self.prompt_len + self.output as usize
    }
}

#[derive(Debug)]
struct Plan {
    items: Vec<(RequestId, usize)>,
}

/// How many label sets of `vllm:lora_requests_info` stay exposed (vLLM's
/// Prometheus client keeps every one it ever set; readers take the newest).
const LORA_INFO_HISTORY: usize = 16;

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    costs: Costs,
    kv: KvCache,
    reqs: BTreeMap<RequestId, Req>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    next_id: RequestId,
    /// Adapters in GPU slots, least recently used first.
    resident_loras: VecDeque<String>,
    plan: Option<Plan>,
    stats: Stats,
    lora_info: Vec<LoraInfo>,
}

impl Engine {
    pub fn new(cfg: EngineConfig, costs: Costs) -> Self {
        let kv = KvCache::new(
            cfg.num_gpu_blocks,
            cfg.block_size,
            cfg.enable_prefix_caching,
        );
        Engine {
            kv,
            costs,
            reqs: BTreeMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            resident_loras: VecDeque::new(),
            plan: None,
            stats: Stats::default(),
            lora_info: Vec::new(),
            cfg,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn costs(&self) -> Costs {
        self.costs
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn kv_usage(&self) -> f64 {
        self.kv.usage()
    }

    /// Longest prompt + max_tokens a request may ask for.
    pub fn max_model_len(&self) -> usize {
        let kv = self.cfg.num_gpu_blocks.saturating_mul(self.cfg.block_size);
        self.cfg.max_model_len.map_or(kv, |m| m.min(kv))
    }

    pub fn lora_enabled(&self) -> bool {
        !self.cfg.lora_adapters.is_empty()
    }

    pub fn is_lora(&self, model: &str) -> bool {
        self.cfg.lora_adapters.iter().any(|a| a == model)
    }

    /// Distinct adapters of running requests, sorted.
    pub fn running_loras(&self) -> Vec<String> {
        self.loras_of(self.running.iter())
    }

    /// Distinct adapters of waiting requests, sorted.
    pub fn waiting_loras(&self) -> Vec<String> {
        self.loras_of(self.waiting.iter())
    }

    fn loras_of<'a>(&self, ids: impl Iterator<Item = &'a RequestId>) -> Vec<String> {
        let set: BTreeSet<&str> = ids
            .filter_map(|id| self.reqs.get(id)?.lora.as_deref())
            .collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// Label sets of `vllm:lora_requests_info`, oldest first; the last is current.
    pub fn lora_info(&self) -> &[LoraInfo] {
        &self.lora_info
    }

    /// Queues a request.
    pub fn submit(&mut self, req: NewRequest, now: f64) -> Result<RequestId, Rejected> {
        // A prompt is at least one token (the BOS a real tokenizer adds).
        let prompt = if req.prompt.is_empty() {
            vec![0]
        } else {
            req.prompt
        };
        let max_tokens = req.max_tokens.max(1);
        let tokens = prompt.len() + max_tokens as usize;
        let limit = self.max_model_len();
        if tokens > limit {
            return Err(Rejected::TooLong { tokens, limit });
        }
        let lora = self.is_lora(&req.model).then_some(req.model);
        let salt = lora.as_deref().map_or(0, kv::name_hash);
        let id = self.next_id;
        self.next_id += 1;
        self.reqs.insert(
            id,
            Req {
                hashes: kv::block_hashes(&prompt, self.cfg.block_size, salt),
                prompt_len: prompt.len(),
                lora,
                max_tokens,
                priority: req.priority,
                arrival: now,
                output: 0,
                computed: 0,
                blocks: Vec::new(),
                committed: 0,
                first_scheduled: false,
                first_token_at: None,
                last_token_at: now,
            },
        );
        self.enqueue(id, false);
        self.note_lora(now);
        Ok(id)
    }

    /// Drops a request wherever it is (client gone); its blocks are freed at once.
    pub fn abort(&mut self, id: RequestId, now: f64) -> bool {
        if !self.reqs.contains_key(&id) {
            return false;
        }
        self.finish(id, FinishReason::Abort, now);
        self.note_lora(now);
        true
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Plans the next step at `now`: which requests get how many tokens, and how
    /// long it takes. None when there is nothing to do. Call [`Engine::complete`]
    /// when `duration` has passed (another `schedule` first completes nothing).
    pub fn schedule(&mut self, now: f64) -> Option<StepInfo> {
        debug_assert!(self.plan.is_none(), "schedule before complete");
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        let mut items: Vec<(RequestId, usize)> = Vec::new();
        let mut preempted = 0;

        // 1. Running requests.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let n = {
                let r = &self.reqs[&id];
                (r.num_tokens() - r.computed).min(budget)
            };
            let mut scheduled = false;
            loop {
                let r = &self.reqs[&id];
                let need = self
                    .kv
                    .blocks_for(r.computed + n)
                    .saturating_sub(r.blocks.len());
                if let Some(new) = self.kv.allocate(need) {
                    if let Some(r) = self.reqs.get_mut(&id) {
                        r.blocks.extend(new);
                    }
                    scheduled = true;
                    break;
                }
                let v = self.victim_index();
                let victim = self.running.remove(v);
                if let Some(pos) = items.iter().position(|(x, _)| *x == victim) {
                    budget += items.remove(pos).1;
                }
                self.preempt(victim);
                preempted += 1;
                if victim == id {
                    break;
                }
                if v < i {
                    i -= 1;
                }
            }
            if scheduled {
                items.push((id, n));
                budget -= n;
                i += 1;
            }
        }

        // 2. Waiting requests (not in a step that had to preempt: memory is short).
        let mut admitted = 0;
        let mut cached_tokens = 0;
        let mut lora_loads = 0;
        if preempted == 0 {
            let mut loras: BTreeSet<String> = self.running_loras().into_iter().collect();
            let mut w = 0;
            while w < self.waiting.len()
                && self.running.len() < self.cfg.max_num_seqs.max(1)
                && budget > 0
            {
                let id = self.waiting[w];
                let r = &self.reqs[&id];
                if let Some(l) = &r.lora {
                    if !loras.contains(l) && loras.len() >= self.cfg.max_loras {
                        w += 1;
                        continue;
                    }
                }
                // At least one token must be computed to sample from.
                let max_hit = (r.num_tokens() - 1) / bs;
                let hits = self.kv.lookup(&r.hashes[..r.hashes.len().min(max_hit)]);
                let hit_tokens = hits.len() * bs;
                let n = (r.num_tokens() - hit_tokens).min(budget);
                let need = self.kv.blocks_for(hit_tokens + n) - hits.len();
                if self.kv.num_free() - self.kv.unreferenced_among(&hits) < need {
                    break;
                }
                self.kv.touch(&hits);
                let new = self.kv.allocate(need).unwrap_or_default();
                let Some(r) = self.reqs.get_mut(&id) else {
                    break;
                };
                self.stats.prefix_queries += r.num_tokens() as u64;
                self.stats.prefix_hits += hit_tokens as u64;
                if !r.first_scheduled {
                    r.first_scheduled = true;
                    self.stats.queue_time.observe((now - r.arrival).max(0.0));
                }
                r.committed = hits.len();
                r.blocks = hits;
                r.blocks.extend(new);
                r.computed = hit_tokens;
                cached_tokens += hit_tokens;
                if let Some(l) = r.lora.clone() {
                    if self.load_lora(&l) {
                        lora_loads += 1;
                    }
                    loras.insert(l);
                }
                self.waiting.remove(w);
                self.running.push(id);
                items.push((id, n));
                budget -= n;
                admitted += 1;
            }
        }
        self.note_lora(now);
        if items.is_empty() {
            return None;
        }

        let mut decode_seqs = 0;
        let mut prefill_tokens = 0;
        for (id, n) in &items {
            let r = &self.reqs[id];
            if *n == 1 && r.output > 0 && r.computed + 1 == r.num_tokens() {
                decode_seqs += 1;
            } else {
                prefill_tokens += n;
            }
        }
        let c = self.costs;
        let batch = items.len();
        let duration = c.step
            + c.per_seq * (batch - 1) as f64
            + c.prefill_token * prefill_tokens as f64
            + if prefill_tokens > 0 {
                c.prefill_overhead
            } else {
                0.0
            }
            + c.lora_load * lora_loads as f64;
        self.plan = Some(Plan { items });
        Some(StepInfo {
            duration,
            batch,
            decode_seqs,
            prefill_tokens,
            cached_tokens,
            admitted,
            preempted,
            lora_loads,
        })
    }

    /// Ends the planned step at `now`: computed tokens land in the KV cache (full
    /// prompt blocks join the prefix cache) and each request that is fully
    /// computed emits a token; finished requests leave and free their blocks.
    pub fn complete(&mut self, now: f64) -> Vec<TokenEvent> {
        let Some(plan) = self.plan.take() else {
            return Vec::new();
        };
        let bs = self.cfg.block_size;
        let mut events = Vec::new();
        for (id, n) in plan.items {
            // Gone (aborted) while the step ran.
            let Some(r) = self.reqs.get_mut(&id) else {
                continue;
            };
            r.computed = (r.computed + n).min(r.num_tokens());
            let full = (r.computed / bs).min(r.hashes.len()).min(r.blocks.len());
            for b in r.committed..full {
                self.kv.commit(r.blocks[b], r.hashes[b]);
            }
            r.committed = r.committed.max(full);
            if r.computed < r.num_tokens() {
                continue;
            }
            r.output += 1;
            let index = r.output - 1;
            match r.first_token_at {
                None => {
                    r.first_token_at = Some(now);
                    self.stats.ttft.observe((now - r.arrival).max(0.0));
                    self.stats.prompt_tokens += r.prompt_len as u64;
                }
                Some(_) => self.stats.itl.observe((now - r.last_token_at).max(0.0)),
            }
            r.last_token_at = now;
            self.stats.generation_tokens += 1;
            let last = r.output >= r.max_tokens;
            events.push(TokenEvent { id, index, last });
            if last {
                self.finish(id, FinishReason::Length, now);
            }
        }
        self.note_lora(now);
        events
    }

    /// Virtual-clock convenience for tests and offline runs: schedules and
    /// completes one step starting at `*clock`, advancing it.
    pub fn step(&mut self, clock: &mut f64) -> Option<(StepInfo, Vec<TokenEvent>)> {
        let info = self.schedule(*clock)?;
        *clock += info.duration;
        let events = self.complete(*clock);
        Some((info, events))
    }

    fn enqueue(&mut self, id: RequestId, preempted: bool) {
        match self.cfg.policy {
            Policy::Fcfs if preempted => self.waiting.push_front(id),
            Policy::Fcfs => self.waiting.push_back(id),
            Policy::Priority => {
                let key = |id: &RequestId| (self.reqs[id].priority, *id);
                let k = key(&id);
                let pos = self.waiting.partition_point(|w| key(w) < k);
                self.waiting.insert(pos, id);
            }
        }
    }

    /// The running request to preempt: the newest, or by priority the least
    /// important (highest value, then newest).
    fn victim_index(&self) -> usize {
        match self.cfg.policy {
            Policy::Fcfs => self.running.len() - 1,
            Policy::Priority => self
                .running
                .iter()
                .enumerate()
                .max_by_key(|(_, id)| (self.reqs[id].priority, **id))
                .map_or(0, |(i, _)| i),
        }
    }

    /// Frees a running request's blocks and requeues it for recomputation (its
    /// prompt blocks likely stay in the prefix cache for a while).
    fn preempt(&mut self, id: RequestId) {
        if let Some(r) = self.reqs.get_mut(&id) {
            self.kv.release(&r.blocks);
            r.blocks.clear();
            r.computed = 0;
            r.committed = 0;
        }
        self.stats.preemptions += 1;
        self.enqueue(id, true);
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason, now: f64) {
        let Some(r) = self.reqs.remove(&id) else {
            return;
        };
        self.kv.release(&r.blocks);
        self.running.retain(|x| *x != id);
        self.waiting.retain(|x| *x != id);
        *self.stats.finished.entry(reason).or_default() += 1;
        if reason != FinishReason::Abort {
            self.stats.e2e.observe((now - r.arrival).max(0.0));
        }
    }

    /// Makes `name` resident; true if that meant loading it.
    fn load_lora(&mut self, name: &str) -> bool {
        if let Some(p) = self.resident_loras.iter().position(|l| l == name) {
            if let Some(l) = self.resident_loras.remove(p) {
                self.resident_loras.push_back(l);
            }
            return false;
        }
        if self.resident_loras.len() >= self.cfg.max_loras.max(1) {
            let busy: BTreeSet<String> = self.running_loras().into_iter().collect();
            if let Some(p) = self.resident_loras.iter().position(|l| !busy.contains(l)) {
                self.resident_loras.remove(p);
            }
        }
        self.resident_loras.push_back(name.to_string());
        true
    }

    fn note_lora(&mut self, now: f64) {
        if !self.lora_enabled() {
            return;
        }
        let running = self.running_loras().join(",");
        let waiting = self.waiting_loras().join(",");
        match self.lora_info.last_mut() {
            Some(last) if last.running == running && last.waiting == waiting => last.at = now,
            _ => {
                if let Some(last) = self.lora_info.last_mut() {
                    last.at = now;
                }
                self.lora_info
                    .retain(|i| !(i.running == running && i.waiting == waiting));
                self.lora_info.push(LoraInfo {
                    running,
                    waiting,
                    at: now,
                });
                if self.lora_info.len() > LORA_INFO_HISTORY {
                    self.lora_info.remove(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
