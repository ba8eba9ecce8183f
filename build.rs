//! Native builds (tests, binaries, clippy) get a freshly built filter: this script
//! runs a nested `cargo build --target wasm32-wasip1 --release --lib` into its own
//! target directory and exports the path as `GATEWAY_WASM` (`env!("GATEWAY_WASM")`).
//! The nested build is incremental, so an unchanged source costs a second or two.
//! Set `INFERENCE_GATEWAY_WASM=/path/to/filter.wasm` to use a prebuilt module instead.
//!
//! With the `bench` feature it also builds the overhead benchmark's floor
//! (`bench-floor-filter/`, its own workspace) into `target/bench-floor-filter/` and
//! exports `BENCH_FLOOR_WASM`; `INFERENCE_GATEWAY_FLOOR_WASM` overrides it likewise.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip1";

/// Environment the nested cargo may inherit; everything else (RUSTFLAGS for the
/// host, clippy's wrapper, the outer build script's variables) must not leak in.
const PASS_THROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "CARGO_HOME",
    "RUSTUP_HOME",
    "RUSTUP_TOOLCHAIN",
    "CARGO_TERM_COLOR",
    "CARGO_MAKEFLAGS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=Cargo.lock");
    // The filter's rustflags (Wasm SIMD).
    println!("cargo:rerun-if-changed=.cargo/config.toml");
    println!("cargo:rerun-if-env-changed=INFERENCE_GATEWAY_WASM");

    let target = env::var("TARGET").unwrap_or_default();
    if target.starts_with("wasm32") {
        return; // this *is* the filter build
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let target_root = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("target"));

    let gateway = match env::var("INFERENCE_GATEWAY_WASM") {
        Ok(prebuilt) => PathBuf::from(prebuilt),
        Err(_) => build_wasm(
            "the wasm filter",
            &manifest_dir,
            &target_root.join("wasm-filter"),
            "inference_gateway",
        ),
    };
    println!("cargo:rustc-env=GATEWAY_WASM={}", gateway.display());

    if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        println!("cargo:rerun-if-changed=bench-floor-filter/src");
        println!("cargo:rerun-if-changed=bench-floor-filter/Cargo.toml");
        println!("cargo:rerun-if-changed=bench-floor-filter/Cargo.lock");
        println!("cargo:rerun-if-env-changed=INFERENCE_GATEWAY_FLOOR_WASM");
        let floor = match env::var("INFERENCE_GATEWAY_FLOOR_WASM") {
            Ok(prebuilt) => PathBuf::from(prebuilt),
            Err(_) => build_wasm(
                "the benchmark's floor filter",
                &manifest_dir.join("bench-floor-filter"),
                &target_root.join("bench-floor-filter"),
                "bench_floor_filter",
            ),
        };
        println!("cargo:rustc-env=BENCH_FLOOR_WASM={}", floor.display());
    }
}

/// `cargo build --lib --release --target wasm32-wasip1` of the crate in
/// `crate_dir` into `target_dir`, with only [`PASS_THROUGH`] of the environment;
/// returns the path of `<lib_name>.wasm`.
fn build_wasm(what: &str, crate_dir: &Path, target_dir: &Path, lib_name: &str) -> PathBuf {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.env_clear();
    for (k, v) in env::vars_os() {
        let k_str = k.to_string_lossy();
        if PASS_THROUGH.contains(&k_str.as_ref())
            || k_str.starts_with("CARGO_NET_")
            || k_str.starts_with("CARGO_HTTP_")
            || k_str.starts_with("CARGO_REGISTRIES_")
        {
            cmd.env(&k, v);
        }
    }
    cmd.current_dir(crate_dir)
        .args(["build", "--lib", "--release", "--target", WASM_TARGET])
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"));

    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run cargo for {what}: {e}"));
    if !out.status.success() {
        panic!(
            "building {what} failed (is the target installed? `rustup target add {WASM_TARGET}`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    target_dir
        .join(WASM_TARGET)
        .join("release")
        .join(format!("{lib_name}.wasm"))
}
