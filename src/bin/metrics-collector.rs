//! metrics-collector: scrapes model servers and pushes metrics snapshots to the
//! inference-gateway filter. See docs/collector.md.

use clap::Parser;
use inference_gateway::collector::config::RawCollectorConfig;
use inference_gateway::collector::runtime;
use inference_gateway::deploy::process::shutdown_signal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "metrics-collector",
    version,
    about = "Scrapes model servers' /metrics and pushes snapshots to the inference-gateway filter"
)]
struct Args {
    /// Configuration file: YAML, or JSON when the name ends in .json.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Read the ingest token from this environment variable (replaces token and
    /// token_env from the file), so it never appears on a command line.
    #[arg(long, value_name = "VAR")]
    token_env: Option<String>,
    /// Serve /metrics and /healthz here instead of the configured `listen`.
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    inference_gateway::deploy::process::init_logging();
    let mut raw = match RawCollectorConfig::load(&args.config) {
        Ok(r) => r,
        Err(e) => return config_error(&args, &e),
    };
    if let Some(var) = &args.token_env {
        raw.token = None;
        raw.token_env = Some(var.clone());
    }
    if let Some(listen) = &args.listen {
        raw.listen = listen.clone();
    }
    let cfg = match raw.validate(|k| std::env::var(k).ok().filter(|v| !v.is_empty())) {
        Ok(c) => c,
        Err(e) => return config_error(&args, &e),
    };
    if args.check {
        let endpoints: usize = cfg.pools.iter().map(|p| p.endpoints.len()).sum();
        println!(
            "{}: ok ({} pools, {endpoints} endpoint entries, {} push targets)",
            args.config.display(),
            cfg.pools.len(),
            cfg.push_targets.len()
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metrics-collector: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(runtime::run(cfg, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(args: &Args, e: &inference_gateway::config::ConfigError) -> ExitCode {
    eprintln!("metrics-collector: {}: {e}", args.config.display());
    ExitCode::from(2)
}
