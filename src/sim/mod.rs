//! A model-server simulator speaking the OpenAI API (as vLLM serves it) with vLLM's
//! Prometheus metrics, for demos, tests and benchmarks without GPUs.
//!
//! Layers: [`server`] is the HTTP surface (axum); [`engine`] decides when each token
//! is produced and keeps the load the metrics report; [`tokens`] is a cheap,
//! deterministic stand-in for a tokenizer and for generation; [`record`] keeps the
//! requests received, for tests. A realistic engine (continuous batching, KV-cache
//! blocks, prefix cache, LoRA slots) replaces `engine` behind the same interface.

pub mod engine;
pub mod openai;
pub mod record;
pub mod server;
pub mod tokens;

pub use server::serve;

/// The response header naming the replica that answered.
pub const SERVER_ID_HEADER: &str = "x-model-server-id";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Replica id, returned in `x-model-server-id`.
    pub id: String,
    /// Served model names; empty: any model.
    pub models: Vec<String>,
    /// Time to first token, on top of the per-token time.
    pub ttft_ms: u64,
    /// Decode time per output token.
    pub per_token_ms: u64,
    /// Output tokens when the request sets no `max_tokens`.
    pub max_tokens_default: u32,
    /// Largest `max_tokens` honoured.
    pub max_tokens_cap: u32,
    /// Seeds generated text (with the prompt), so answers are reproducible.
    pub seed: u64,
    /// Requests kept for `GET /sim/requests`.
    pub record_capacity: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            id: "sim".into(),
            models: Vec::new(),
            ttft_ms: 0,
            per_token_ms: 1,
            max_tokens_default: 16,
            max_tokens_cap: 4096,
            seed: 0,
            record_capacity: 1000,
        }
    }
}

impl SimConfig {
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model || m == "*")
    }
}
