//! Server type → the common metrics model, in one table ([`MAPPINGS`]).
//!
//! | server | KV cache (0..1) | waiting | running | LoRA |
//! |---|---|---|---|---|
//! | vllm | `vllm:kv_cache_usage_perc`, else `vllm:gpu_cache_usage_perc` | `vllm:num_requests_waiting` | `vllm:num_requests_running` | `vllm:lora_requests_info` |
//! | sglang | `sglang:token_usage` | `sglang:num_queue_reqs` | `sglang:num_running_reqs` | – |
//! | tgi | – (reported as 0) | `tgi_queue_size` | `tgi_batch_current_size` | – |
//! | triton-trtllm | `nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}`, else used/max | `nv_trt_llm_request_metrics{request_type="waiting"}` | `…{request_type="scheduled"}` | – |
//! | llamacpp | `llamacpp:kv_cache_usage_ratio` | `llamacpp:requests_deferred` | `llamacpp:requests_processing` | – |
//!
//! Several series of one metric (extra labels such as `model_name`, or one per
//! data-parallel engine) are summed for request counts and averaged for
//! utilization (each series is a fraction of its own cache).

use super::config::ServerType;
use super::exposition::{self, Sample};

/// A metric name, optionally restricted to series with one label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub label: Option<(&'static str, &'static str)>,
}

const fn series(name: &'static str) -> Series {
    Series { name, label: None }
}

const fn series_where(name: &'static str, label: &'static str, value: &'static str) -> Series {
    Series {
        name,
        label: Some((label, value)),
    }
}

/// Where the KV-cache utilization comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSource {
    /// A 0..1 gauge; averaged over series.
    Fraction(Series),
    /// used / total, each summed over series.
    Ratio { used: Series, total: Series },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub server: ServerType,
    /// Tried in order; the first one present wins. Empty: the server has none (0).
    pub kv: &'static [KvSource],
    /// Summed over series; the first present name wins (fallbacks for renames).
    pub waiting: &'static [Series],
    pub running: &'static [Series],
    /// vLLM's `lora_requests_info` shape: labels `running_lora_adapters`,
    /// `waiting_lora_adapters`, `max_lora`, value a timestamp.
    pub lora_info: Option<&'static str>,
}

/// The one table. Unit tests below feed each entry real-looking exposition text.
pub const MAPPINGS: [Mapping; 5] = [
    Mapping {
        server: ServerType::Vllm,
        kv: &[
            KvSource::Fraction(series("vllm:kv_cache_usage_perc")),
            KvSource::Fraction(series("vllm:gpu_cache_usage_perc")),
        ],
        waiting: &[series("vllm:num_requests_waiting")],
        running: &[series("vllm:num_requests_running")],
        lora_info: Some("vllm:lora_requests_info"),
    },
    Mapping {
        server: ServerType::Sglang,
        kv: &[KvSource::Fraction(series("sglang:token_usage"))],
        waiting: &[series("sglang:num_queue_reqs")],
        running: &[series("sglang:num_running_reqs")],
        lora_info: None,
    },
    Mapping {
        server: ServerType::Tgi,
        // TGI exports no KV-cache gauge; 0 keeps the KV scorer neutral for it.
        kv: &[],
        waiting: &[series("tgi_queue_size")],
        running: &[series("tgi_batch_current_size")],
        lora_info: None,
    },
    Mapping {
        server: ServerType::TritonTrtllm,
        kv: &[
            KvSource::Fraction(series_where(
                "nv_trt_llm_kv_cache_block_metrics",
                "kv_cache_block_type",
                "fraction",
            )),
            KvSource::Ratio {
                used: series_where(
                    "nv_trt_llm_kv_cache_block_metrics",
                    "kv_cache_block_type",
                    "used",
                ),
                total: series_where(
                    "nv_trt_llm_kv_cache_block_metrics",
                    "kv_cache_block_type",
                    "max",
                ),
            },
        ],
        waiting: &[series_where(
            "nv_trt_llm_request_metrics",
            "request_type",
            "waiting",
        )],
        running: &[series_where(
            "nv_trt_llm_request_metrics",
            "request_type",
            "scheduled",
        )],
        lora_info: None,
    },
    Mapping {
        server: ServerType::Llamacpp,
        kv: &[KvSource::Fraction(series("llamacpp:kv_cache_usage_ratio"))],
        waiting: &[series("llamacpp:requests_deferred")],
        running: &[series("llamacpp:requests_processing")],
        lora_info: None,
    },
];

pub fn mapping(server: ServerType) -> &'static Mapping {
    // MAPPINGS has one entry per ServerType (checked by a test), in enum order.
    MAPPINGS
        .iter()
        .find(|m| m.server == server)
        .unwrap_or(&MAPPINGS[0])
}

impl Mapping {
    /// Whether the mapping reads metric `name` (the parser keeps only those).
    pub fn wants(&self, name: &str) -> bool {
        let kv = self.kv.iter().any(|k| match k {
            KvSource::Fraction(s) => s.name == name,
            KvSource::Ratio { used, total } => used.name == name || total.name == name,
        });
        kv || self.waiting.iter().any(|s| s.name == name)
            || self.running.iter().any(|s| s.name == name)
            || self.lora_info == Some(name)
    }

    /// The metric names this mapping reads, for error messages.
    fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = Vec::new();
        for s in self.running.iter().chain(self.waiting) {
            v.push(s.name);
        }
        for k in self.kv {
            match k {
                KvSource::Fraction(s) => v.push(s.name),
                KvSource::Ratio { used, .. } => v.push(used.name),
            }
        }
        v.dedup();
        v
    }
}

/// What one scrape says about one endpoint.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mapped {
    pub kv_cache_utilization: f32,
    pub waiting: u32,
    pub running: u32,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    pub max_lora: u32,
}

/// Why a scrape body did not give metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapError {
    Parse(exposition::ParseError),
    /// Parsed, but none of the server type's metrics are there (wrong
    /// `server_type`, or not a model server).
    NoMetrics {
        server: ServerType,
        expected: Vec<&'static str>,
    },
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapError::Parse(e) => write!(f, "malformed exposition: {e}"),
            MapError::NoMetrics { server, expected } => write!(
                f,
                "none of the {server} metrics are exposed (expected one of {})",
                expected.join(", ")
            ),
        }
    }
}

impl MapError {
    /// Short reason for the scrape error counter.
    pub fn reason(&self) -> &'static str {
        match self {
            MapError::Parse(_) => "parse",
            MapError::NoMetrics { .. } => "no_metrics",
        }
    }
}

/// Parses `text` and maps it for `server`.
pub fn map_exposition(server: ServerType, text: &str) -> Result<Mapped, MapError> {
    let m = mapping(server);
    let samples = exposition::parse(text, |n| m.wants(n)).map_err(MapError::Parse)?;
    map_samples(m, &samples)
}

fn matching<'s, 'a>(samples: &'s [Sample<'a>], s: Series) -> impl Iterator<Item = &'s Sample<'a>> {
    samples
        .iter()
        .filter(move |x| x.name == s.name && s.label.is_none_or(|(k, v)| x.label(k) == Some(v)))
}

/// Sum over series (non-finite and negative values count as 0); `None` when no
/// series exists.
fn sum(samples: &[Sample<'_>], s: Series) -> Option<f64> {
    let mut found = false;
    let total = matching(samples, s).fold(0.0, |acc, x| {
        found = true;
        acc + finite_non_negative(x.value)
    });
    found.then_some(total)
}

fn finite_non_negative(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

fn count(v: f64) -> u32 {
    // Saturating: `as` clamps floats to the integer range.
    v.round() as u32
}

pub fn map_samples(m: &Mapping, samples: &[Sample<'_>]) -> Result<Mapped, MapError> {
    let mut any = false;
    let mut first_sum = |list: &[Series]| {
        let v = list.iter().find_map(|s| sum(samples, *s));
        any |= v.is_some();
        v.unwrap_or(0.0)
    };
    let waiting = count(first_sum(m.waiting));
    let running = count(first_sum(m.running));
    let kv = m.kv.iter().find_map(|k| match *k {
        KvSource::Fraction(s) => {
            let (n, total) = matching(samples, s).fold((0u32, 0.0), |(n, t), x| {
                (n + 1, t + finite_non_negative(x.value))
            });
            (n > 0).then(|| total / f64::from(n))
        }
        KvSource::Ratio { used, total } => {
            let (u, t) = (sum(samples, used)?, sum(samples, total)?);
            Some(if t > 0.0 { u / t } else { 0.0 })
        }
    });
    any |= kv.is_some();
    let mut out = Mapped {
        // NaN survives `clamp`: a server exposing it reads as 0.
        kv_cache_utilization: kv.filter(|v| v.is_finite()).unwrap_or(0.0).clamp(0.0, 1.0) as f32,
        waiting,
        running,
        ..Default::default()
    };
    if let Some(name) = m.lora_info {
        // Several series appear as the adapter set changes; the newest (largest
        // timestamp value) is current.
        let newest = samples
            .iter()
            .filter(|x| x.name == name && !x.value.is_nan())
            .max_by(|a, b| a.value.total_cmp(&b.value));
        if let Some(s) = newest {
            any = true;
            out.running_adapters = adapters(s.label("running_lora_adapters"));
            out.waiting_adapters = adapters(s.label("waiting_lora_adapters"));
            out.max_lora = s
                .label("max_lora")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(0, |v| count(finite_non_negative(v)));
        }
    }
    if !any {
        return Err(MapError::NoMetrics {
            server: m.server,
            expected: m.names(),
        });
    }
    Ok(out)
}

fn adapters(list: Option<&str>) -> Vec<String> {
    list.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mapping_per_server_type() {
        for t in ServerType::ALL {
            assert_eq!(mapping(t).server, t);
            assert_eq!(MAPPINGS.iter().filter(|m| m.server == t).count(), 1);
        }
    }

    /// Shaped like vLLM 0.10's /metrics (V1 engine), with the histograms the
    /// collector skips, two LoRA info series, and an engine label.
    const VLLM: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4215
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7234e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,tweet-summary",waiting_lora_adapters="chat-lora"} 1.7235e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 42.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 42.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.5
"#;

    #[test]
    fn vllm() {
        let m = map_exposition(ServerType::Vllm, VLLM).unwrap();
        assert_eq!(m.running, 7);
        assert_eq!(m.waiting, 3);
        assert!((m.kv_cache_utilization - 0.4215).abs() < 1e-6);
        assert_eq!(m.running_adapters, ["sql-lora", "tweet-summary"]);
        assert_eq!(m.waiting_adapters, ["chat-lora"]);
        assert_eq!(m.max_lora, 4);
    }

    #[test]
    fn vllm_older_cache_name_and_data_parallel_engines() {
        let text = "vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.2\n\
                    vllm:gpu_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.6\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2\n\
                    vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 5\n";
        let m = map_exposition(ServerType::Vllm, text).unwrap();
        assert!((m.kv_cache_utilization - 0.4).abs() < 1e-6, "averaged");
        assert_eq!(m.running, 7, "summed");
        assert_eq!(m.waiting, 0, "absent counts as 0");
        assert!(m.running_adapters.is_empty() && m.max_lora == 0);
        // The new name wins over the old one when both are there.
        let both = format!("{text}vllm:kv_cache_usage_perc 0.9\n");
        let m = map_exposition(ServerType::Vllm, &both).unwrap();
        assert!((m.kv_cache_utilization - 0.9).abs() < 1e-6);
    }

    #[test]
    fn sglang() {
        let text = r#"# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-7B-Instruct"} 12.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-7B-Instruct"} 4.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen2.5-7B-Instruct"} 0.68
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="Qwen/Qwen2.5-7B-Instruct"} 913.2
"#;
        let m = map_exposition(ServerType::Sglang, text).unwrap();
        assert_eq!((m.running, m.waiting), (12, 4));
        assert!((m.kv_cache_utilization - 0.68).abs() < 1e-6);
    }

    #[test]
    fn tgi_has_no_kv_metric() {
        let text = r#"# TYPE tgi_queue_size gauge
tgi_queue_size 5
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 9
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 4096
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 3
tgi_request_duration_bucket{le="+Inf"} 10
tgi_request_duration_sum 12.5
tgi_request_duration_count 10
"#;
        let m = map_exposition(ServerType::Tgi, text).unwrap();
        assert_eq!((m.running, m.waiting), (9, 5));
        assert_eq!(m.kv_cache_utilization, 0.0);
    }

    #[test]
    fn triton_trtllm() {
        let text = r#"# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 2
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1560
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 4679
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6239
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.25
"#;
        let m = map_exposition(ServerType::TritonTrtllm, text).unwrap();
        assert_eq!((m.running, m.waiting), (6, 2));
        assert!((m.kv_cache_utilization - 0.25).abs() < 1e-6);
        // Without the fraction series: used / max.
        let no_fraction: String = text
            .lines()
            .filter(|l| !l.contains("\"fraction\""))
            .map(|l| format!("{l}\n"))
            .collect();
        let m = map_exposition(ServerType::TritonTrtllm, &no_fraction).unwrap();
        assert!((m.kv_cache_utilization - 1560.0 / 6239.0).abs() < 1e-6);
    }

    #[test]
    fn llamacpp() {
        let text = r#"# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1024
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.125
# HELP llamacpp:requests_processing Number of request processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of request deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"#;
        let m = map_exposition(ServerType::Llamacpp, text).unwrap();
        assert_eq!((m.running, m.waiting), (2, 1));
        assert!((m.kv_cache_utilization - 0.125).abs() < 1e-6);
    }

    #[test]
    fn wrong_server_type_or_garbage_is_an_error() {
        let e = map_exposition(ServerType::Sglang, VLLM).unwrap_err();
        assert_eq!(e.reason(), "no_metrics");
        assert!(e.to_string().contains("sglang:num_running_reqs"), "{e}");
        let e = map_exposition(ServerType::Vllm, "").unwrap_err();
        assert_eq!(e.reason(), "no_metrics");
        let e = map_exposition(ServerType::Vllm, "<!doctype html>\n<p>hi</p>").unwrap_err();
        assert_eq!(e.reason(), "parse");
        let broken = VLLM.replace("vllm:num_requests_waiting{", "vllm:num_requests_waiting{{");
        assert_eq!(
            map_exposition(ServerType::Vllm, &broken)
                .unwrap_err()
                .reason(),
            "parse"
        );
    }

    #[test]
    fn hostile_values_are_clamped() {
        let text = "vllm:num_requests_running -3\nvllm:num_requests_waiting 1e30\n\
                    vllm:kv_cache_usage_perc NaN\nvllm:kv_cache_usage_perc{engine=\"1\"} 7\n\
                    vllm:lora_requests_info{max_lora=\"lots\",running_lora_adapters=\" a , ,b\"} NaN\n\
                    vllm:lora_requests_info{max_lora=\"-2\",running_lora_adapters=\"c\"} 5\n";
        let m = map_exposition(ServerType::Vllm, text).unwrap();
        assert_eq!(m.running, 0);
        assert_eq!(m.waiting, u32::MAX);
        assert_eq!(m.kv_cache_utilization, 1.0);
        assert_eq!(
            m.running_adapters,
            ["c"],
            "the NaN series is not the newest"
        );
        assert_eq!(m.max_lora, 0);
    }
}
