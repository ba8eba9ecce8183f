//! Kubernetes / GKE resources → the gateway's configuration (`igwctl`).
//!
//! Host-free: reading YAML ([`load`]), checking resources ([`resources`]),
//! rendering the filter, collector and Envoy configurations ([`render`]),
//! migrating v1alpha2 resources to v1 ([`migrate`]) and re-rendering on change
//! ([`watch`]). The binary `igwctl` is a thin command line around these.

pub mod apikeys;
pub mod load;
pub mod migrate;
pub mod node;
pub mod render;
pub mod resources;
pub mod watch;

pub use node::{K8sError, Location};
pub use resources::Inventory;

/// Reads and checks every resource under `paths`.
pub fn load(paths: &[std::path::PathBuf]) -> (Inventory, Vec<K8sError>) {
    let (docs, mut errors) = load::load_paths(paths);
    let (inv, more) = Inventory::parse(docs);
    errors.extend(more);
    errors.sort();
    errors.dedup();
    (inv, errors)
}

/// Fixtures for the unit tests: a copy of the shared examples
/// (`tests/fixtures/k8s-examples`, checked against the shared directory in
/// `tests/igwctl.rs` when that exists).
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use std::path::{Path, PathBuf};

    pub fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s-examples")
    }

    pub fn example(name: &str) -> PathBuf {
        examples().join(name)
    }

    /// The inventory of these examples; panics on any error.
    pub fn load_examples(names: &[&str]) -> Inventory {
        let paths: Vec<PathBuf> = names.iter().map(|n| example(n)).collect();
        let (inv, errors) = load(&paths);
        assert!(errors.is_empty(), "{names:?}: {errors:#?}");
        inv
    }

    /// The inventory of one YAML stream named `t.yaml`, with its errors.
    pub fn parse(yaml: &str) -> (Inventory, Vec<K8sError>) {
        let (docs, mut errors) = load::parse_stream("t.yaml", yaml);
        let (inv, more) = Inventory::parse(docs);
        errors.extend(more);
        (inv, errors)
    }

    /// The one error of `yaml`, as text.
    pub fn error_of(yaml: &str) -> String {
        let (_, errors) = parse(yaml);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors[0].to_string()
    }

    pub const POOL_V1: &str = "apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: ga}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}]
";
    pub const POOL_X: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata: {name: preview}
spec:
  selector: {app: vllm}
  targetPortNumber: 8000
";
}
