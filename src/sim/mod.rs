//! A model-server simulator speaking the OpenAI API (as vLLM serves it) with vLLM's
//! Prometheus metrics, for demos, tests and benchmarks without GPUs.
//!
//! Layers: [`server`] is the HTTP surface (axum); [`engine`] is a pure, step-based
//! model of vLLM's scheduler (continuous batching, chunked prefill, preemption,
//! LoRA slots) over [`kv`], the KV-cache blocks and the automatic prefix cache;
//! [`driver`] runs the engine in real time and wakes request streams; [`metrics`]
//! renders the load as vLLM, SGLang or TGI name it; [`tokens`] is a cheap,
//! deterministic stand-in for a tokenizer and for generation; [`record`] keeps the
//! requests received, for tests. See docs/simulator.md.

pub mod driver;
pub mod engine;
pub mod kv;
pub mod metrics;
pub mod openai;
pub mod record;
pub mod server;
pub mod tokens;

pub use server::{router, serve};

/// The response header naming the replica that answered.
pub const SERVER_ID_HEADER: &str = "x-model-server-id";

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Replica id, returned in `x-model-server-id`.
    pub id: String,
    /// Served model names; empty: any model.
    pub models: Vec<String>,
    /// Extra time of every engine step that prefills: time to first token on top
    /// of the per-token time and the prompt's prefill cost.
    pub ttft_ms: u64,
    /// One decode step with a batch of one: the inter-token latency of a lone
    /// request. Cost defaults scale with it; 0 (with `ttft_ms` 0) makes the model
    /// free.
    pub per_token_ms: u64,
    /// Output tokens when the request sets no `max_tokens`.
    pub max_tokens_default: u32,
    /// Largest `max_tokens` honoured.
    pub max_tokens_cap: u32,
    /// Seeds generated text (with the prompt), so answers are reproducible.
    pub seed: u64,
    /// Requests kept for `GET /sim/requests`.
    pub record_capacity: usize,
    /// Batching, KV cache, prefix cache, LoRA and cost knobs.
    pub engine: engine::EngineConfig,
    /// Which server's metric names `/metrics` uses.
    pub metrics_flavor: metrics::Flavor,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            id: "sim".into(),
            models: Vec::new(),
            ttft_ms: 0,
            per_token_ms: 20,
            max_tokens_default: 16,
            max_tokens_cap: 4096,
            seed: 0,
            record_capacity: 1000,
            engine: engine::EngineConfig::default(),
            metrics_flavor: metrics::Flavor::default(),
        }
    }
}

impl SimConfig {
    /// Served: a listed model or LoRA adapter; anything when no model is listed.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty()
            || self.models.iter().any(|m| m == model || m == "*")
            || self.engine.lora_adapters.iter().any(|a| a == model)
    }

    /// The `model_name` label of the metrics: the base model, as vLLM labels it.
    pub fn model_name(&self) -> &str {
        self.models
            .iter()
            .find(|m| m.as_str() != "*" && !self.engine.lora_adapters.contains(m))
            .map(String::as_str)
            .unwrap_or("sim")
    }

    /// The engine this configuration describes.
    pub fn build_engine(&self) -> engine::Engine {
        let costs =
            engine::Costs::resolve(&self.engine, self.per_token_ms as f64, self.ttft_ms as f64);
        engine::Engine::new(self.engine.clone(), costs)
    }
}
