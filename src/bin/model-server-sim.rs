//! The model-server simulator: the OpenAI API with vLLM's metrics, on loopback.
//! Every flag is described in docs/simulator.md.

use clap::{Parser, ValueEnum};
use inference_gateway::deploy::process;
use inference_gateway::sim::engine::{EngineConfig, Policy};
use inference_gateway::sim::metrics::Flavor;
use inference_gateway::sim::{router, SimConfig};
use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(about = "Simulated OpenAI-compatible model server (vLLM metrics)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Replica id for the x-model-server-id header (default: sim-<port>).
    #[arg(long)]
    id: Option<String>,
    /// Served models, comma-separated; '*' accepts any model.
    #[arg(long, default_value = "*", value_delimiter = ',')]
    models: Vec<String>,
    /// Extra time of an engine step that prefills (adds to time to first token).
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// One decode step with a batch of one (a lone request's inter-token latency).
    /// The other costs default to fractions of it; 0 with --ttft-ms 0: no model cost.
    #[arg(long, default_value_t = 20)]
    per_token_ms: u64,
    /// Prefill time per uncached prompt token [default: 1% of --per-token-ms].
    #[arg(long)]
    prefill_ms_per_token: Option<f64>,
    /// Decode-step time per running sequence beyond the first [default: 2% of --per-token-ms].
    #[arg(long)]
    decode_ms_per_seq: Option<f64>,
    /// Output tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    max_tokens_default: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    block_size: u32,
    /// KV-cache blocks (the GPU memory for KV).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    num_gpu_blocks: u32,
    /// Most requests running (in the batch) at once; the rest wait.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_num_seqs: u32,
    /// Token budget of one engine step (prefill chunks plus decode tokens).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    max_num_batched_tokens: u32,
    /// Longest prompt + max_tokens accepted [default: what the KV cache holds].
    #[arg(long)]
    max_model_len: Option<u32>,
    /// Turn the automatic prefix cache off.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Waiting-queue order: fcfs, or priority (vLLM's: lower `priority` first).
    #[arg(long, value_enum, default_value_t = PolicyArg::Fcfs)]
    scheduling_policy: PolicyArg,
    /// Model names that are LoRA adapters of the base model, comma-separated
    /// (served in addition to --models).
    #[arg(long, value_delimiter = ',')]
    lora_adapters: Vec<String>,
    /// Distinct LoRA adapters in one batch (adapter slots).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    max_loras: u32,
    /// Loading an adapter that is not resident [default: 5 × --per-token-ms].
    #[arg(long)]
    lora_load_ms: Option<f64>,
    /// Requests kept for `GET /sim/requests` (0: none; benchmarks with large
    /// bodies keep none).
    #[arg(long, default_value_t = 1000)]
    record_capacity: usize,
    /// Metric names of /metrics: vllm, vllm-v0, sglang or tgi.
    #[arg(long, default_value = "vllm")]
    metrics_flavor: Flavor,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyArg {
    Fcfs,
    Priority,
}

#[tokio::main]
async fn main() -> ExitCode {
    inference_gateway::deploy::process::init_logging();
    let args = Args::parse();
    let addr = SocketAddr::new(args.host, args.port);
    let models: Vec<String> = args
        .models
        .into_iter()
        .filter(|m| !m.is_empty() && m != "*")
        .collect();
    let config = SimConfig {
        id: args.id.unwrap_or_else(|| format!("sim-{}", args.port)),
        models,
        ttft_ms: args.ttft_ms,
        per_token_ms: args.per_token_ms,
        max_tokens_default: args.max_tokens_default,
        seed: args.seed,
        record_capacity: args.record_capacity,
        engine: EngineConfig {
            block_size: args.block_size as usize,
            num_gpu_blocks: args.num_gpu_blocks as usize,
            max_num_seqs: args.max_num_seqs as usize,
            max_num_batched_tokens: args.max_num_batched_tokens as usize,
            max_model_len: args.max_model_len.map(|m| m as usize),
            enable_prefix_caching: !args.no_enable_prefix_caching,
            policy: match args.scheduling_policy {
                PolicyArg::Fcfs => Policy::Fcfs,
                PolicyArg::Priority => Policy::Priority,
            },
            max_loras: args.max_loras as usize,
            lora_adapters: args
                .lora_adapters
                .into_iter()
                .filter(|a| !a.is_empty())
                .collect(),
            lora_load_ms: args.lora_load_ms,
            prefill_ms_per_token: args.prefill_ms_per_token,
            decode_ms_per_seq: args.decode_ms_per_seq,
        },
        metrics_flavor: args.metrics_flavor,
        ..SimConfig::default()
    };
    tracing::info!(id = %config.id, "model-server-sim starting");
    process::serve_until_signal("model-server-sim", addr, router(config)).await
}
