//! Kubernetes / GKE resources → the gateway's configuration (`igwctl`).
//!
//! Host-free: reading YAML ([`load`]), checking resources ([`resources`]),
//! rendering the filter, collector and Envoy configurations ([`render`]),
//! migrating v1alpha2 resources to v1 ([`migrate`]) and re-rendering on change
//! ([`watch`]). The binary `igwctl` is a thin command line around these.

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
