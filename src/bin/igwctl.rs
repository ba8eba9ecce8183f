//! igwctl: Kubernetes / GKE inference resources → the gateway's configuration.
//! See docs/kubernetes.md ("From resources"). The logic is `inference_gateway::k8s`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use inference_gateway::k8s::{self, migrate, render, watch, K8sError};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "igwctl",
    version,
    about = "Kubernetes/GKE inference resources → filter, collector and Envoy configuration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Inputs {
    /// A YAML file or a directory (read recursively); repeat for more.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct RenderArgs {
    /// Namespace of the gateway Deployment (the collector pushes to
    /// inference-gateway-ingest.<namespace>.svc.cluster.local).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Project of Model Armor templates given by name (extensionPolicy).
    #[arg(long, value_name = "PROJECT")]
    gcp_project: Option<String>,
    /// The filter's allowed_endpoint_cidrs (repeat); default: the private ranges.
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pod_cidrs: Vec<String>,
    /// Path of the .wasm module inside the Envoy image.
    #[arg(long, default_value = "/etc/envoy/inference_gateway.wasm")]
    wasm_path: String,
    /// Where Envoy reads the rendered gateway-filter.json (ECDS): rewriting it
    /// (watch) reconfigures the running Envoy without a restart.
    #[arg(long, default_value = render::DEFAULT_ECDS_PATH)]
    ecds_path: String,
}

impl RenderArgs {
    fn options(&self) -> render::RenderOptions {
        render::RenderOptions {
            namespace: self.namespace.clone(),
            gcp_project: self.gcp_project.clone(),
            wasm_path: self.wasm_path.clone(),
            allowed_cidrs: self.pod_cidrs.clone(),
            ecds_path: self.ecds_path.clone(),
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum FormatArg {
    Json,
    Yaml,
}

impl From<FormatArg> for watch::Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Json => watch::Format::Json,
            FormatArg::Yaml => watch::Format::Yaml,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Render the filter, collector and Envoy configurations and the headless Services.
    Render {
        #[command(flatten)]
        inputs: Inputs,
        /// Write the outputs here (atomically); without it, print them.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Format of the collector configuration and the Services (and of stdout).
        #[arg(long, value_enum, default_value = "yaml")]
        format: FormatArg,
        #[command(flatten)]
        render: RenderArgs,
    },
    /// Print the endpoint picker's configuration (plugin + discovery, YAML) for
    /// the resources: the ConfigMap of deploy/gke/ (docs/gke.md).
    Picker {
        #[command(flatten)]
        inputs: Inputs,
        #[command(flatten)]
        render: RenderArgs,
    },
    /// Check the resources and print a summary; no output files. Exit 2 on error.
    Check {
        #[command(flatten)]
        inputs: Inputs,
        #[command(flatten)]
        render: RenderArgs,
    },
    /// Rewrite v1alpha2 resources to v1 and print the phased migration plan.
    Migrate {
        #[command(flatten)]
        inputs: Inputs,
        /// Write the phase files and migrated.yaml here; without it, print them.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// The Gateway a new HTTPRoute attaches to.
        #[arg(long, default_value = "inference-gateway")]
        gateway: String,
        /// Name of a new HTTPRoute (when none references the v1alpha2 pool).
        #[arg(long, default_value = "llm-route")]
        route_name: String,
    },
    /// Re-render into --out whenever the inputs change.
    Watch {
        #[command(flatten)]
        inputs: Inputs,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
        interval_ms: u64,
        #[arg(long, value_enum, default_value = "yaml")]
        format: FormatArg,
        /// Stop after this many polls (tests).
        #[arg(long, hide = true)]
        max_ticks: Option<u64>,
        #[command(flatten)]
        render: RenderArgs,
    },
}

fn print_errors(errors: &[K8sError]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    eprintln!("{} error(s)", errors.len());
    ExitCode::from(2)
}

fn load(inputs: &Inputs) -> Result<k8s::Inventory, ExitCode> {
    let (inv, errors) = k8s::load(&inputs.files);
    if errors.is_empty() {
        Ok(inv)
    } else {
        Err(print_errors(&errors))
    }
}

fn io_error(what: &str, e: std::io::Error) -> ExitCode {
    eprintln!("error: {what}: {e}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Render {
            inputs,
            out,
            format,
            render: r,
        } => {
            let inv = match load(&inputs) {
                Ok(i) => i,
                Err(c) => return c,
            };
            let rendered = match render::render(&inv, &r.options()) {
                Ok(x) => x,
                Err(e) => return print_errors(&e),
            };
            match out {
                Some(dir) => match watch::write_outputs(&rendered, &dir, format.into()) {
                    Ok(_) => {
                        print!("{}", rendered.report.text());
                        for (name, _) in watch::output_files(&rendered, format.into()) {
                            println!("wrote {}", dir.join(name).display());
                        }
                    }
                    Err(e) => return io_error(&format!("writing {}", dir.display()), e),
                },
                None => {
                    eprint!("{}", rendered.report.text());
                    let envoy: serde_json::Value =
                        serde_yaml_ng::from_str(&rendered.envoy_yaml).unwrap_or_default();
                    let all = serde_json::json!({
                        "plugin_config": rendered.plugin_config,
                        "control_config": rendered.control_config,
                        "collector_config": rendered.collector_config,
                        "services": rendered.services,
                        "envoy_bootstrap": envoy,
                    });
                    match format {
                        FormatArg::Json => {
                            println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default())
                        }
                        FormatArg::Yaml => {
                            print!("{}", serde_yaml_ng::to_string(&all).unwrap_or_default())
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Picker { inputs, render: r } => {
            let inv = match load(&inputs) {
                Ok(i) => i,
                Err(c) => return c,
            };
            let rendered = match render::render(&inv, &r.options()) {
                Ok(x) => x,
                Err(e) => return print_errors(&e),
            };
            match render::picker_config(&rendered) {
                Ok((cfg, notes)) => {
                    for n in notes {
                        eprintln!("note: {n}");
                    }
                    print!("{}", serde_yaml_ng::to_string(&cfg).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => print_errors(&[e]),
            }
        }
        Command::Check { inputs, render: r } => {
            let inv = match load(&inputs) {
                Ok(i) => i,
                Err(c) => return c,
            };
            match render::render(&inv, &r.options()) {
                Ok(x) => {
                    print!("{}", x.report.text());
                    println!(
                        "ok: {} pools, {} objectives, {} models, {} routes, {} traffic extensions, {} backend policies, {} API keys, {} ignored",
                        inv.pools.len(),
                        inv.objectives.len(),
                        inv.models.len(),
                        inv.routes.len(),
                        inv.extensions.len(),
                        inv.policies.len(),
                        inv.api_keys.iter().map(|s| s.consumers.len()).sum::<usize>(),
                        inv.ignored.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => print_errors(&e),
            }
        }
        Command::Migrate {
            inputs,
            out,
            gateway,
            route_name,
        } => {
            let inv = match load(&inputs) {
                Ok(i) => i,
                Err(c) => return c,
            };
            let m = match migrate::migrate(
                &inv,
                &migrate::MigrateOptions {
                    gateway,
                    route_name,
                },
            ) {
                Ok(m) => m,
                Err(e) => return print_errors(&e),
            };
            let files = [
                ("phase1-v1-resources.yaml", migrate::yaml_stream(&m.phase1)),
                (
                    "phase2-httproute-split.yaml",
                    migrate::yaml_stream(&m.phase2),
                ),
                ("phase3-httproute-v1.yaml", migrate::yaml_stream(&m.phase3)),
                (
                    "phase4-delete.txt",
                    m.phase4.iter().map(|l| format!("{l}\n")).collect(),
                ),
                ("migrated.yaml", migrate::yaml_stream(&m.migrated)),
            ];
            match out {
                Some(dir) => {
                    if let Err(e) = std::fs::create_dir_all(&dir) {
                        return io_error(&format!("creating {}", dir.display()), e);
                    }
                    for (name, text) in &files {
                        if let Err(e) = watch::write_atomic(&dir, name, text) {
                            return io_error(&format!("writing {name}"), e);
                        }
                    }
                    print!("{}", m.plan(Some(&dir.display().to_string())));
                    println!(
                        "migrated.yaml: every resource after phase 4 (igwctl render -f {}/migrated.yaml)",
                        dir.display()
                    );
                }
                None => {
                    eprint!("{}", m.plan(None));
                    for (name, text) in &files {
                        println!("# ===== {name}");
                        print!("{text}");
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Watch {
            inputs,
            out,
            interval_ms,
            format,
            max_ticks,
            render: r,
        } => {
            let mut w = watch::Watcher::new(inputs.files, out, format.into(), r.options());
            let mut ticks = 0u64;
            loop {
                match w.tick() {
                    Ok(watch::Tick::Unchanged) => {}
                    Ok(watch::Tick::Rendered(changed)) => {
                        println!(
                            "rendered into {} ({})",
                            w.out.display(),
                            if changed.is_empty() {
                                "no output changed".into()
                            } else {
                                changed.join(", ")
                            }
                        );
                    }
                    Ok(watch::Tick::Invalid(errors)) => {
                        for e in &errors {
                            eprintln!("error: {e}");
                        }
                        eprintln!("inputs invalid: outputs left as they were");
                    }
                    Err(e) => return io_error(&format!("writing {}", w.out.display()), e),
                }
                ticks += 1;
                if max_ticks.is_some_and(|m| ticks >= m) {
                    return ExitCode::SUCCESS;
                }
                std::thread::sleep(std::time::Duration::from_millis(interval_ms));
            }
        }
    }
}
