//! The safety service simulator: Model Armor's sanitize API on loopback.

use clap::Parser;
use inference_gateway::deploy::process;
use inference_gateway::safety_sim::{router, Behaviour, Mode, Rules, SafetySimConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(about = "Simulated safety service speaking Google Cloud Model Armor's REST API")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8090)]
    port: u16,
    /// Rules file (JSON); default: the embedded rules (templates prompt-guard,
    /// response-guard, strict).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// How to answer at start; change it later with PUT /sim/behaviour.
    #[arg(long, value_enum, default_value = "normal")]
    mode: ModeArg,
    /// Delay for --mode slow, hold time for --mode hang.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Require `authorization: Bearer <token>` (read from this environment variable).
    #[arg(long)]
    token_env: Option<String>,
    /// Refuse (400) texts longer than this, as a real service's size limit does.
    #[arg(long)]
    max_text_bytes: Option<usize>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    Normal,
    Slow,
    Fail,
    Garbage,
    Hang,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Normal => Mode::Normal,
            ModeArg::Slow => Mode::Slow,
            ModeArg::Fail => Mode::Fail,
            ModeArg::Garbage => Mode::Garbage,
            ModeArg::Hang => Mode::Hang,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    inference_gateway::deploy::process::init_logging();
    let args = Args::parse();
    let rules = match &args.rules {
        None => Rules::default_rules(),
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| Rules::from_json(&b))
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: rules file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let require_token = match &args.token_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(t) if !t.is_empty() => Some(t),
            _ => {
                eprintln!("error: --token-env {var}: the variable is not set");
                return ExitCode::from(2);
            }
        },
    };
    let addr = SocketAddr::new(args.host, args.port);
    let config = SafetySimConfig {
        rules,
        behaviour: Behaviour {
            mode: args.mode.into(),
            delay_ms: args.delay_ms,
        },
        require_token,
        record_capacity: 1000,
        max_text_bytes: args.max_text_bytes,
    };
    process::serve_until_signal("safety-sim", addr, router(config)).await
}
