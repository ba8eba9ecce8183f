//! endpoint-picker: an InferencePool's endpoint picker (Envoy ext_proc, the
//! Endpoint Picker Protocol) with discovery and scraping built in. See docs/gke.md.

use clap::Parser;
use inference_gateway::deploy::process::shutdown_signal;
use inference_gateway::picker::config::PickerConfig;
use inference_gateway::picker::server::{self, Options, Tls};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "endpoint-picker",
    version,
    about = "The inference-gateway scheduler as an InferencePool endpoint picker (Envoy ext_proc)"
)]
struct Args {
    /// The picker configuration: `plugin` (the filter's plugin configuration) and
    /// `discovery` (the collector's pools, DNS, scraping). YAML, or JSON for .json.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// ext_proc gRPC listener (also serves grpc.health.v1.Health).
    #[arg(long, default_value = "0.0.0.0:9002")]
    grpc: SocketAddr,
    /// Plain-text gRPC health listener for kubelet probes ("" to disable).
    #[arg(long, default_value = "0.0.0.0:9003")]
    grpc_health: String,
    /// Prometheus metrics listener ("" to disable).
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics: String,
    /// Environment variable holding the bearer token /metrics requires.
    #[arg(long, value_name = "VAR")]
    metrics_token_env: Option<String>,
    /// Optional snapshot ingest listener (POST /v1/snapshot) for a separate collector.
    #[arg(long, value_name = "IP:PORT")]
    ingest: Option<SocketAddr>,
    /// Environment variable holding the ingest bearer token.
    #[arg(long, value_name = "VAR", default_value = "IGW_INGEST_TOKEN")]
    ingest_token_env: String,
    /// TLS certificate (PEM); without --cert/--key a self-signed one is made at start.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Serve gRPC in plain text.
    #[arg(long, conflicts_with_all = ["cert", "key"])]
    insecure: bool,
    /// Replicas of this picker (a Deployment's `replicas`): each enforces its share
    /// of the backend policies' per-endpoint caps, `max(1, floor(cap / N))`. A
    /// collector pushing snapshots to `--ingest` overrides it with its count.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    gateway_replicas: u32,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn addr(flag: &str, v: &str) -> Result<Option<SocketAddr>, String> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| format!("--{flag}: not ip:port: '{v}'"))
}

/// A secret from the environment: never logged, at least 8 characters.
fn token(var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(t) if t.trim().len() >= 8 => Ok(t.trim().to_string()),
        Ok(_) => Err(format!("${var} must hold a token of at least 8 characters")),
        Err(_) => Err(format!("${var} is not set")),
    }
}

fn options(args: &Args) -> Result<Options, String> {
    let ingest_token = match args.ingest {
        Some(_) => Some(token(&args.ingest_token_env)?),
        None => None,
    };
    Ok(Options {
        grpc: args.grpc,
        health: addr("grpc-health", &args.grpc_health)?,
        metrics: addr("metrics", &args.metrics)?,
        metrics_token: args.metrics_token_env.as_deref().map(token).transpose()?,
        ingest: args.ingest,
        ingest_token,
        replicas: args.gateway_replicas,
        tls: match (&args.cert, &args.key, args.insecure) {
            (_, _, true) => Tls::Insecure,
            (Some(cert), Some(key), _) => Tls::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => Tls::SelfSigned,
        },
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    inference_gateway::deploy::process::init_logging();
    let cfg = match PickerConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("endpoint-picker: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let opts = match options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("endpoint-picker: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: ok ({} pools, discovery {})",
            args.config.display(),
            cfg.plugin.pools.len(),
            if cfg.discovery.is_some() { "on" } else { "off" }
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("endpoint-picker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(server::run(cfg, opts, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
