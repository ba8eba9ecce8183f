//! The model-server simulator: the OpenAI API with vLLM's metrics, on loopback.

use clap::Parser;
use inference_gateway::sim::{serve, SimConfig};
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio::signal::unix::{signal, SignalKind};

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
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    #[arg(long, default_value_t = 1)]
    per_token_ms: u64,
    /// Output tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    max_tokens_default: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let addr = SocketAddr::new(args.host, args.port);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
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
        ..SimConfig::default()
    };
    tracing::info!(id = %config.id, %addr, "model-server-sim listening");
    let shutdown = async {
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    match serve(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("server error: {e}");
            ExitCode::FAILURE
        }
    }
}
