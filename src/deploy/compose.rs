//! The demo's whole layout in docker-compose (`envoy/docker-compose.yaml`), from
//! locally built images, host networking, nothing pulled from a registry:
//!
//! | service | image | listens on |
//! |---|---|---|
//! | `envoy-a`, `envoy-b` | [`docker::image_ref`] (Envoy + the filter, mounted) | gateway `:8080`, control `:9902`, admin `:9901` on 127.0.0.1 and 127.0.0.2 |
//! | `metrics-collector` | [`BINS_IMAGE`] | 127.0.0.1:9464, pushes to both control listeners |
//! | `sim-8001` … `sim-8003` | [`BINS_IMAGE`] | 127.0.0.1:8001–8003 |
//! | `safety-sim` | [`BINS_IMAGE`] | 127.0.0.1:8090 |
//! | `prometheus` | [`PROMETHEUS_IMAGE`] | 127.0.0.1:9090, the shipped alert rules |
//!
//! The two Envoy bootstraps (`envoy/compose/envoy-a.yaml`, `envoy-b.yaml`) are
//! [`replica_yaml`]; a unit test keeps the committed files equal to it.
//! `tests/compose_stack.rs` drives the stack when a Docker engine answers.

use super::docker::run_with_timeout;
use super::envoy_config::{render, EnvoySettings};
use super::{Error, Result};
use std::process::Command;
use std::time::Duration;

/// The compose file, relative to the repository root.
pub const COMPOSE_FILE: &str = "envoy/docker-compose.yaml";
/// Where the compose layout's configurations live, relative to the repository root.
pub const COMPOSE_DIR: &str = "envoy/compose";
/// Builds every image the compose file names.
pub const BUILD_IMAGES_SCRIPT: &str = "envoy/docker/build-images.sh";
/// The image with `metrics-collector`, `model-server-sim` and `safety-sim`.
pub const BINS_IMAGE: &str = "inference-gateway-bins:local";
/// Prometheus (the host's binary) on an empty base.
pub const PROMETHEUS_IMAGE: &str = "inference-gateway-prometheus:local";
/// Where the collector serves `/metrics` in the compose layout.
pub const COLLECTOR_LISTEN: &str = "127.0.0.1:9464";
/// Where Prometheus listens in the compose layout.
pub const PROMETHEUS_LISTEN: &str = "127.0.0.1:9090";

/// One Envoy replica of the compose layout: every listener of it on `address`,
/// with the same ports as the demo (gateway 8080, control 9902, admin 9901).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica {
    /// The compose service, and the file name of its bootstrap under [`COMPOSE_DIR`].
    pub name: &'static str,
    /// A loopback address (Linux answers on all of 127.0.0.0/8).
    pub address: &'static str,
}

/// The two replicas: same ports, different loopback addresses.
pub const REPLICAS: [Replica; 2] = [
    Replica {
        name: "envoy-a",
        address: "127.0.0.1",
    },
    Replica {
        name: "envoy-b",
        address: "127.0.0.2",
    },
];

impl Replica {
    /// The committed bootstrap, relative to the repository root.
    pub fn config_path(&self) -> String {
        format!("{COMPOSE_DIR}/{}.yaml", self.name)
    }

    /// The demo settings with every listener on this replica's address.
    pub fn settings(&self) -> EnvoySettings {
        EnvoySettings {
            gateway_address: self.address.into(),
            control_address: self.address.into(),
            admin_address: self.address.into(),
            ..EnvoySettings::demo()
        }
    }

    pub fn gateway_url(&self) -> String {
        self.settings().gateway_url()
    }

    pub fn control_url(&self) -> String {
        self.settings().control_url()
    }

    pub fn admin_url(&self) -> String {
        self.settings().admin_url()
    }
}

/// How to regenerate the committed replica bootstraps.
pub const REGENERATE_REPLICAS: &str = "INFERENCE_GATEWAY_BLESS=1 cargo test --lib compose";

/// The bootstrap of `replica`: [`render`] of [`Replica::settings`] under its own
/// header (the rendering's header speaks of the single-Envoy demo file).
pub fn replica_yaml(replica: &Replica) -> String {
    let rendered = render(&replica.settings());
    // The rendering starts with three lines naming envoy/envoy.yaml and how to
    // regenerate it; the layout lines after them stay.
    let body = rendered.splitn(4, '\n').nth(3).unwrap_or_default();
    let body = body.replace(
        "# The .wasm path is relative to the working directory: run Envoy from the repository\n\
         # root, e.g. `envoy -c envoy/envoy.yaml`.",
        "# The .wasm path is relative to the working directory: the compose file runs Envoy\n\
         # in /work and mounts the filter at /work/target/wasm-filter/.",
    );
    format!(
        "# Envoy bootstrap for {name}, one of the two gateway replicas of\n\
         # envoy/docker-compose.yaml. GENERATED: do not edit by hand.\n\
         # Source: src/deploy/compose.rs (Replica::settings). Regenerate with\n\
         #   {REGENERATE_REPLICAS}\n{body}",
        name = replica.name,
    )
}

/// The Docker engine's version when `docker info` succeeds; otherwise why not
/// (no CLI, no daemon, no permission), in the CLI's own words.
pub fn docker_engine() -> Result<String> {
    let (ok, out, err) = run_with_timeout(
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        Duration::from_secs(20),
    )
    .map_err(|e| Error::new(format!("no Docker CLI: {e}")))?;
    let version = out.trim();
    if ok && !version.is_empty() && !version.contains("<no value>") {
        return Ok(version.to_string());
    }
    let why: String = err
        .lines()
        .chain(out.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ");
    Err(Error::new(format!(
        "`docker info` failed: {}",
        if why.is_empty() {
            "no engine version"
        } else {
            &why
        }
    )))
}

/// The compose command: `docker compose` (the v2 plugin) when it answers, else
/// `docker-compose` (v1 or the standalone v2 binary); `None` with neither.
pub fn compose_command() -> Option<Vec<String>> {
    let candidates: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    candidates.into_iter().find_map(|argv| {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]).arg("version");
        match run_with_timeout(&mut cmd, Duration::from_secs(20)) {
            Ok((true, _, _)) => Some(argv.iter().map(|s| s.to_string()).collect()),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::deploy::envoy_config::DEMO_ENDPOINTS;

    fn committed(replica: &Replica) -> &'static str {
        match replica.name {
            "envoy-a" => include_str!("../../envoy/compose/envoy-a.yaml"),
            "envoy-b" => include_str!("../../envoy/compose/envoy-b.yaml"),
            other => panic!("no committed bootstrap for {other}"),
        }
    }

    #[test]
    fn committed_compose_bootstraps_are_the_renderings() {
        for replica in &REPLICAS {
            let rendered = replica_yaml(replica);
            let committed = committed(replica);
            if committed == rendered {
                continue;
            }
            if std::env::var_os("INFERENCE_GATEWAY_BLESS").is_some() {
                let path = crate::deploy::repo_root().join(replica.config_path());
                std::fs::write(&path, &rendered).unwrap();
                eprintln!("wrote {}", path.display());
                continue;
            }
            let line = committed
                .lines()
                .zip(rendered.lines())
                .position(|(a, b)| a != b)
                .map(|i| i + 1)
                .unwrap_or_else(|| committed.lines().count().min(rendered.lines().count()) + 1);
            panic!(
                "{} differs from replica_yaml (first at line {line}). Regenerate with:\n    {REGENERATE_REPLICAS}",
                replica.config_path()
            );
        }
    }

    #[test]
    fn replicas_differ_only_in_their_address() {
        let [a, b] = REPLICAS;
        assert_ne!(a.address, b.address);
        let (sa, sb) = (a.settings(), b.settings());
        assert_eq!(sa.gateway_port, sb.gateway_port);
        assert_eq!(sa.gateway_config, sb.gateway_config);
        let yaml = replica_yaml(&b);
        assert!(yaml.contains("socket_address: {address: 127.0.0.2, port_value: 8080}"));
        assert!(yaml.contains("socket_address: {address: 127.0.0.2, port_value: 9902}"));
        assert!(yaml.contains("socket_address: {address: 127.0.0.2, port_value: 9901}"));
        assert!(!yaml.contains("127.0.0.1, port_value: 8080"), "{yaml}");
        assert!(yaml.starts_with("# Envoy bootstrap for envoy-b,"));
        // Both route to the same model servers, through the same filter settings.
        let gateway = Config::from_json(sb.gateway_config.to_string().as_bytes()).unwrap();
        assert_eq!(gateway.pools[0].endpoints, DEMO_ENDPOINTS);
        assert_eq!(b.gateway_url(), "http://127.0.0.2:8080");
        assert_eq!(b.control_url(), "http://127.0.0.2:9902");
    }
}
