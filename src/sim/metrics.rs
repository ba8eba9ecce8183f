//! `/metrics` in the Prometheus text format, named as the real servers name them:
//! vLLM (V1 names, or the older V0 `gpu_cache_usage_perc`), SGLang or TGI, so a
//! collector's per-server mapping is tested against the real names.

use super::engine::{Engine, FinishReason};
use std::fmt::Write as _;
use std::str::FromStr;

/// vLLM's buckets for `time_to_first_token_seconds`.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's buckets for `inter_token_latency_seconds`.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's buckets for request-level latencies (e2e, queue).
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; observations above the last bound only count.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Which server's metric names `/metrics` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    #[default]
    Vllm,
    /// vLLM before V1: `vllm:gpu_cache_usage_perc` instead of `kv_cache_usage_perc`.
    VllmV0,
    Sglang,
    Tgi,
}

impl FromStr for Flavor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vllm" => Ok(Flavor::Vllm),
            "vllm-v0" => Ok(Flavor::VllmV0),
            "sglang" => Ok(Flavor::Sglang),
            "tgi" => Ok(Flavor::Tgi),
            other => Err(format!(
                "unknown metrics flavor `{other}` (vllm, vllm-v0, sglang, tgi)"
            )),
        }
    }
}

/// Python's float text (`1.0`, `0.25`): what prometheus_client writes.
fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
}

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.text, "{name} {}", num(v));
        } else {
            let _ = writeln!(self.text, "{name}{{{labels}}} {}", num(v));
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, labels: &str, v: f64) {
        self.head(name, kind, help);
        self.sample(name, labels, v);
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            cum += c;
            let le = format!("{labels}{sep}le=\"{}\"", num(*b));
            self.sample(&format!("{name}_bucket"), &le, cum as f64);
        }
        let inf = format!("{labels}{sep}le=\"+Inf\"");
        self.sample(&format!("{name}_bucket"), &inf, h.count as f64);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum);
    }
}

/// The metrics text. `engine_now` and `wall_now` (Unix seconds) map engine time
/// to the timestamps `vllm:lora_requests_info` carries as its value.
pub fn render(
    e: &Engine,
    flavor: Flavor,
    model_name: &str,
    engine_now: f64,
    wall_now: f64,
) -> String {
    let mut o = Out {
        text: String::new(),
    };
    let m = format!("model_name=\"{}\"", escape(model_name));
    let s = e.stats();
    match flavor {
        Flavor::Vllm | Flavor::VllmV0 => {
            o.one(
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                &m,
                e.num_running() as f64,
            );
            o.one(
                "vllm:num_requests_waiting",
                "gauge",
                "Number of requests waiting to be processed.",
                &m,
                e.num_waiting() as f64,
            );
            let kv_name = if flavor == Flavor::VllmV0 {
                "vllm:gpu_cache_usage_perc"
            } else {
                "vllm:kv_cache_usage_perc"
            };
            o.one(
                kv_name,
                "gauge",
                "KV-cache usage. 1 means 100 percent usage.",
                &m,
                e.kv_usage(),
            );
            let c = e.config();
            o.one(
                "vllm:cache_config_info",
                "gauge",
                "Information of the LLMEngine CacheConfig",
                &format!(
                    "block_size=\"{}\",enable_prefix_caching=\"{}\",num_gpu_blocks=\"{}\"",
                    c.block_size,
                    if c.enable_prefix_caching {
                        "True"
                    } else {
                        "False"
                    },
                    c.num_gpu_blocks
                ),
                1.0,
            );
            if e.lora_enabled() {
                o.head(
                    "vllm:lora_requests_info",
                    "gauge",
                    "Running stats on lora requests.",
                );
                let infos = e.lora_info();
                for (i, info) in infos.iter().enumerate() {
                    let at = if i + 1 == infos.len() {
                        wall_now
                    } else {
                        wall_now - (engine_now - info.at).max(0.0)
                    };
                    let labels = format!(
                        "running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\",max_lora=\"{}\"",
                        escape(&info.running),
                        escape(&info.waiting),
                        e.config().max_loras
                    );
                    o.sample("vllm:lora_requests_info", &labels, at);
                }
            }
            let counters: [(&str, &str, u64); 5] = [
                (
                    "vllm:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens.",
                    s.prefix_queries,
                ),
                (
                    "vllm:prefix_cache_hits_total",
                    "Prefix cache hits, in terms of number of cached tokens.",
                    s.prefix_hits,
                ),
                (
                    "vllm:num_preemptions_total",
                    "Cumulative number of preemption from the engine.",
                    s.preemptions,
                ),
                (
                    "vllm:prompt_tokens_total",
                    "Number of prefill tokens processed.",
                    s.prompt_tokens,
                ),
                (
                    "vllm:generation_tokens_total",
                    "Number of generation tokens processed.",
                    s.generation_tokens,
                ),
            ];
            for (name, help, v) in counters {
                o.one(name, "counter", help, &m, v as f64);
            }
            o.head(
                "vllm:request_success_total",
                "counter",
                "Count of successfully processed requests.",
            );
            for r in FinishReason::ALL {
                let n = s.finished.get(&r).copied().unwrap_or(0);
                let labels = format!("finished_reason=\"{}\",{m}", r.as_str());
                o.sample("vllm:request_success_total", &labels, n as f64);
            }
            o.histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &m,
                &s.ttft,
            );
            o.histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &m,
                &s.itl,
            );
            o.histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                &m,
                &s.itl,
            );
            o.histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &m,
                &s.e2e,
            );
            o.histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &m,
                &s.queue_time,
            );
        }
        Flavor::Sglang => {
            let hit_rate = if s.prefix_queries == 0 {
                0.0
            } else {
                s.prefix_hits as f64 / s.prefix_queries as f64
            };
            let kv = e.kv();
            let used_tokens = (kv.num_blocks() - kv.num_free()) * kv.block_size();
            let gauges: [(&str, &str, f64); 5] = [
                (
                    "sglang:num_running_reqs",
                    "The number of running requests.",
                    e.num_running() as f64,
                ),
                (
                    "sglang:num_queue_reqs",
                    "The number of requests in the waiting queue.",
                    e.num_waiting() as f64,
                ),
                ("sglang:token_usage", "The token usage.", e.kv_usage()),
                (
                    "sglang:num_used_tokens",
                    "The number of used tokens.",
                    used_tokens as f64,
                ),
                (
                    "sglang:cache_hit_rate",
                    "The prefix cache hit rate.",
                    hit_rate,
                ),
            ];
            for (name, help, v) in gauges {
                o.one(name, "gauge", help, &m, v);
            }
            let finished: u64 = s.finished.values().sum();
            let counters: [(&str, &str, u64); 3] = [
                (
                    "sglang:prompt_tokens_total",
                    "Number of prefill tokens processed.",
                    s.prompt_tokens,
                ),
                (
                    "sglang:generation_tokens_total",
                    "Number of generation tokens processed.",
                    s.generation_tokens,
                ),
                (
                    "sglang:num_requests_total",
                    "Number of requests processed.",
                    finished,
                ),
            ];
            for (name, help, v) in counters {
                o.one(name, "counter", help, &m, v as f64);
            }
            o.histogram(
                "sglang:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &m,
                &s.ttft,
            );
            o.histogram(
                "sglang:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &m,
                &s.itl,
            );
            o.histogram(
                "sglang:e2e_request_latency_seconds",
                "Histogram of End-to-end request latency in seconds",
                &m,
                &s.e2e,
            );
        }
        Flavor::Tgi => {
            // TGI's metrics carry no model label.
            let kv = e.kv();
            let used_tokens = (kv.num_blocks() - kv.num_free()) * kv.block_size();
            let finished: u64 = s.finished.values().sum();
            let ok: u64 = s
                .finished
                .iter()
                .filter(|(r, _)| **r != FinishReason::Abort)
                .map(|(_, n)| n)
                .sum();
            o.one(
                "tgi_queue_size",
                "gauge",
                "Requests waiting in the queue.",
                "",
                e.num_waiting() as f64,
            );
            o.one(
                "tgi_batch_current_size",
                "gauge",
                "Current batch size.",
                "",
                e.num_running() as f64,
            );
            o.one(
                "tgi_batch_current_max_tokens",
                "gauge",
                "Tokens the current batch holds in the KV cache.",
                "",
                used_tokens as f64,
            );
            o.one(
                "tgi_request_count",
                "counter",
                "Requests received.",
                "",
                finished as f64 + (e.num_running() + e.num_waiting()) as f64,
            );
            o.one(
                "tgi_request_success",
                "counter",
                "Requests that succeeded.",
                "",
                ok as f64,
            );
            o.histogram(
                "tgi_request_queue_duration",
                "Time spent in the queue.",
                "",
                &s.queue_time,
            );
            o.histogram(
                "tgi_request_mean_time_per_token_duration",
                "Time per generated token.",
                "",
                &s.itl,
            );
            o.histogram(
                "tgi_request_duration",
                "End-to-end request duration.",
                "",
                &s.e2e,
            );
        }
    }
    o.text
}
