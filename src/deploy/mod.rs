//! Everything Envoy-side, for the native binaries, the end-to-end tests and the
//! benchmarks: rendering the Envoy bootstrap ([`envoy_config`]), finding or
//! installing the Envoy binary ([`envoy_binary`]), child processes and readiness
//! ([`process`]), the locally built Envoy container image ([`docker`]), and a
//! real Prometheus with the shipped alert rules ([`prometheus`]), and the whole
//! demo layout in docker-compose ([`compose`]).
//!
//! Native only: none of this is linked into the `.wasm`.

pub mod compose;
pub mod docker;
pub mod envoy_binary;
pub mod envoy_config;
pub mod process;
pub mod prometheus;

use std::fmt;
use std::path::PathBuf;

/// An error from the deploy helpers: a sentence that says what failed and,
/// where there is one, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The repository root (where `Cargo.toml` is). Relative paths in the demo
/// configuration, such as the `.wasm`, are relative to it.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
