//! When tokens come out, and the load the metrics report. This first engine runs
//! every request at once with fixed time to first token and inter-token latency;
//! the vLLM-like engine (continuous batching, KV-cache blocks, prefix cache, LoRA
//! slots) keeps this interface: `admit` a request, await its tokens, drop it.

use super::SimConfig;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
pub struct Counters {
    running: AtomicU64,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
}

pub struct Engine {
    config: SimConfig,
    counters: Arc<Counters>,
}

/// A request being generated; dropping it (finished or client gone) frees its slot.
pub struct Generation {
    pub ttft: Duration,
    pub inter_token: Duration,
    counters: Arc<Counters>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.counters.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Generation {
    /// Call for each token sent.
    pub fn token(&self) {
        self.counters
            .generation_tokens
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl Engine {
    pub fn new(config: SimConfig) -> Self {
        Engine {
            config,
            counters: Arc::default(),
        }
    }

    pub fn admit(&self, _model: &str, prompt_tokens: u32) -> Generation {
        let c = &self.counters;
        c.running.fetch_add(1, Ordering::Relaxed);
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.prompt_tokens
            .fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        Generation {
            ttft: Duration::from_millis(self.config.ttft_ms + self.config.per_token_ms),
            inter_token: Duration::from_millis(self.config.per_token_ms),
            counters: Arc::clone(c),
        }
    }

    pub fn running(&self) -> u64 {
        self.counters.running.load(Ordering::Relaxed)
    }

    /// `/metrics` in vLLM's Prometheus text format, labelled with `model_name`.
    pub fn metrics(&self) -> String {
        let c = &self.counters;
        let model = self
            .config
            .models
            .first()
            .map(String::as_str)
            .unwrap_or("sim");
        let l = format!("model_name=\"{}\"", escape(model));
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {v}"
            );
        };
        gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            "gauge",
            self.running().to_string(),
        );
        gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            "gauge",
            "0".into(),
        );
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            "gauge",
            "0".into(),
        );
        gauge(
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            "counter",
            c.prompt_tokens.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            "counter",
            c.generation_tokens.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "vllm:request_success_total",
            "Count of successfully processed requests.",
            "counter",
            c.requests.load(Ordering::Relaxed).to_string(),
        );
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_follows_generations() {
        let e = Engine::new(SimConfig::default());
        let g = e.admit("m", 3);
        assert_eq!(e.running(), 1);
        g.token();
        drop(g);
        assert_eq!(e.running(), 0);
        let m = e.metrics();
        assert!(
            m.contains("vllm:num_requests_running{model_name=\"sim\"} 0"),
            "{m}"
        );
        assert!(
            m.contains("vllm:generation_tokens_total{model_name=\"sim\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("vllm:prompt_tokens_total{model_name=\"sim\"} 3"),
            "{m}"
        );
    }
}
