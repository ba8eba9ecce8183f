//! The Envoy container image, built locally (no registry is needed or used):
//! `FROM scratch` + the Envoy ELF from the wheel + the glibc libraries `ldd` lists.
//! `envoy/docker/build-image.sh` assembles and builds it; this module finds Envoy,
//! calls the script when the image is missing, and talks to the Docker CLI.
//!
//! It also has [`ApiVersionShim`]: Docker clients that pin a newer Engine API than
//! the daemon speaks (testcontainers 0.28 pins 1.53; Debian's docker.io 20.10
//! speaks 1.41) get "client version is too new". The shim is a unix-socket proxy
//! that lowers the version in request paths.

use super::envoy_binary::{self, ENVOY_VERSION};
use super::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The image's repository name.
pub const IMAGE_NAME: &str = "inference-gateway-envoy";
/// The script that assembles the build context and builds the image.
pub const BUILD_SCRIPT: &str = "envoy/docker/build-image.sh";
/// Where the image's Envoy looks for its configuration by default.
pub const IMAGE_CONFIG_PATH: &str = "/etc/envoy/envoy.yaml";

/// The endpoint picker's image (`deploy/gke/40-picker-deployment.yaml` runs it).
pub const PICKER_IMAGE: &str = "inference-gateway-endpoint-picker:local";
/// Builds every local image; `--only picker` just the picker's.
pub const IMAGES_SCRIPT: &str = "envoy/docker/build-images.sh";

/// `inference-gateway-envoy:1.40.0`.
pub fn image_ref() -> String {
    format!("{IMAGE_NAME}:{ENVOY_VERSION}")
}

/// Runs `cmd` with a deadline; returns (success, stdout, stderr).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<(bool, String, String)> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::new(format!("cannot run {program}: {e}")))?;
    let read = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = child.stdout.take().map(|s| read(Box::new(s)));
    let err = child.stderr.take().map(|s| read(Box::new(s)));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::new(format!("{program}: {e}")))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::new(format!(
                "{program} did not finish within {timeout:?}"
            )));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let join =
        |h: Option<thread::JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok((status.success(), join(out), join(err)))
}

/// The daemon's Engine API version (`docker version`), e.g. `1.41`; an error that
/// says why when there is no reachable daemon.
pub fn daemon_api_version() -> Result<String> {
    let (ok, out, err) = run_with_timeout(
        Command::new("docker").args(["version", "--format", "{{.Server.APIVersion}}"]),
        Duration::from_secs(20),
    )
    .map_err(|e| Error::new(format!("no Docker CLI: {e}")))?;
    let version = out.trim();
    if ok && !version.is_empty() {
        Ok(version.to_string())
    } else {
        let why = err.trim();
        Err(Error::new(format!(
            "no Docker daemon reachable: {}",
            if why.is_empty() {
                "docker version failed"
            } else {
                why
            }
        )))
    }
}

/// Whether the image exists locally.
pub fn image_exists(image: &str) -> Result<bool> {
    let (ok, _, _) = run_with_timeout(
        Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", image]),
        Duration::from_secs(30),
    )?;
    Ok(ok)
}

/// Builds [`image_ref`] unless it exists: finds (or installs) Envoy, takes its ELF
/// and runs [`BUILD_SCRIPT`]. A lock keeps parallel callers from building twice.
pub fn ensure_image(repo: &Path) -> Result<String> {
    let image = image_ref();
    if image_exists(&image)? {
        return Ok(image);
    }
    let envoy = envoy_binary::ensure_envoy(repo)?;
    let elf = envoy_binary::envoy_elf(&envoy)?;
    let lock_dir = std::env::temp_dir();
    let _lock = envoy_binary::FileLock::acquire(
        &lock_dir.join(format!("{IMAGE_NAME}-{ENVOY_VERSION}.build.lock")),
        Duration::from_secs(15 * 60),
        Duration::from_secs(15 * 60),
    )?;
    if image_exists(&image)? {
        return Ok(image);
    }
    build_image(repo, &elf, &image, false)?;
    Ok(image)
}

/// Runs [`BUILD_SCRIPT`] for `elf`, tagging `image` (`force`: rebuild if it exists).
pub fn build_image(repo: &Path, elf: &Path, image: &str, force: bool) -> Result<()> {
    let script = repo.join(BUILD_SCRIPT);
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg("--tag").arg(image);
    if force {
        cmd.arg("--force");
    }
    cmd.arg(elf).current_dir(repo);
    let (ok, out, err) = run_with_timeout(&mut cmd, Duration::from_secs(15 * 60))?;
    if ok {
        Ok(())
    } else {
        Err(Error::new(format!(
            "{} failed:\n{}\n{}",
            script.display(),
            out.trim(),
            err.trim()
        )))
    }
}

/// Builds the endpoint picker's image `tag` from `bin_dir/endpoint-picker` (a
/// debug or release build) with [`IMAGES_SCRIPT`] `--only picker`: FROM scratch,
/// the binary and the libraries it links, user 65532. Always rebuilds (an
/// unchanged binary is a cache hit).
pub fn build_picker_image(repo: &Path, bin_dir: &Path, tag: &str) -> Result<()> {
    let script = repo.join(IMAGES_SCRIPT);
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["--only", "picker", "--picker-tag", tag, "--bin-dir"])
        .arg(bin_dir)
        .current_dir(repo);
    let (ok, out, err) = run_with_timeout(&mut cmd, Duration::from_secs(10 * 60))?;
    if ok {
        Ok(())
    } else {
        Err(Error::new(format!(
            "{} failed:\n{}\n{}",
            script.display(),
            out.trim(),
            err.trim()
        )))
    }
}

/// Parses `1.41` into (1, 41).
pub fn parse_api_version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A unix-socket proxy to the Docker daemon that rewrites `/v1.NN/` in request
/// paths to the daemon's own API version when NN is higher. Everything else is
/// passed through byte for byte. It serves until the process exits.
#[derive(Debug, Clone)]
pub struct ApiVersionShim {
    pub socket: PathBuf,
}

impl ApiVersionShim {
    /// Listens on `socket` (replacing a stale file) and forwards to `daemon`.
    pub fn start(socket: &Path, daemon: &Path, server_minor: u32) -> Result<ApiVersionShim> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)
            .map_err(|e| Error::new(format!("cannot listen on {}: {e}", socket.display())))?;
        let daemon = daemon.to_path_buf();
        thread::Builder::new()
            .name("docker-api-shim".into())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    let daemon = daemon.clone();
                    let _ = thread::Builder::new()
                        .name("docker-api-shim-conn".into())
                        .spawn(move || shim_connection(client, &daemon, server_minor));
                }
            })
            .map_err(|e| Error::new(format!("cannot start the Docker API shim: {e}")))?;
        Ok(ApiVersionShim {
            socket: socket.to_path_buf(),
        })
    }

    /// The value for `DOCKER_HOST`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

fn shim_connection(client: UnixStream, daemon: &Path, server_minor: u32) {
    let Ok(upstream) = UnixStream::connect(daemon) else {
        return;
    };
    let (Ok(client_read), Ok(upstream_write)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    // Daemon -> client: untouched.
    let back = thread::spawn(move || {
        let mut upstream = upstream;
        let mut client = client;
        let _ = std::io::copy(&mut upstream, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
    });
    // Client -> daemon: rewrite versions. A short read timeout flushes a held-back
    // tail (a possible partial match) when the client pauses.
    let mut client_read = client_read;
    let mut upstream_write = upstream_write;
    let _ = client_read.set_read_timeout(Some(Duration::from_millis(50)));
    let mut rewriter = VersionRewriter::new(server_minor);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match client_read.read(&mut buf) {
            Ok(0) => {
                let _ = upstream_write.write_all(&rewriter.flush());
                let _ = upstream_write.shutdown(std::net::Shutdown::Write);
                break;
            }
            Ok(n) => {
                if upstream_write.write_all(&rewriter.feed(&buf[..n])).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let tail = rewriter.flush();
                if !tail.is_empty() && upstream_write.write_all(&tail).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = back.join();
}

/// Streams bytes, replacing ` /v1.NN/` with ` /v1.<server>/` when NN > server.
#[derive(Debug)]
pub struct VersionRewriter {
    server_minor: u32,
    carry: Vec<u8>,
}

const PREFIX: &[u8] = b" /v1.";

impl VersionRewriter {
    pub fn new(server_minor: u32) -> Self {
        VersionRewriter {
            server_minor,
            carry: Vec::new(),
        }
    }

    /// Rewritten bytes ready to send; a tail that may be the start of a version is
    /// held back until more input (or [`VersionRewriter::flush`]).
    pub fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(input);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            if buf[i] == b' ' {
                let rest = &buf[i..];
                if rest.len() <= PREFIX.len() {
                    if PREFIX.starts_with(rest) {
                        break; // maybe a partial prefix: hold it
                    }
                } else if rest.starts_with(PREFIX) {
                    let digits = rest[PREFIX.len()..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .count();
                    let end = PREFIX.len() + digits;
                    if end == rest.len() && digits <= 3 {
                        break; // the version may go on: hold it
                    }
                    if (1..=3).contains(&digits) && rest[end] == b'/' {
                        let client: u32 = std::str::from_utf8(&rest[PREFIX.len()..end])
                            .ok()
                            .and_then(|d| d.parse().ok())
                            .unwrap_or(0);
                        if client > self.server_minor {
                            out.extend_from_slice(PREFIX);
                            out.extend_from_slice(self.server_minor.to_string().as_bytes());
                            out.push(b'/');
                            i += end + 1;
                            continue;
                        }
                    }
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        self.carry = buf[i..].to_vec();
        out
    }

    /// Whatever is held back.
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite_in_pieces(input: &[u8], piece: usize) -> Vec<u8> {
        let mut r = VersionRewriter::new(41);
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            out.extend(r.feed(chunk));
        }
        out.extend(r.flush());
        out
    }

    #[test]
    fn rewrites_too_new_versions_across_chunk_boundaries() {
        let input = b"POST /v1.53/containers/create?name=x HTTP/1.1\r\nhost: d\r\n\r\n{\"a\":\" /v1.9/\"}GET /v1.40/version HTTP/1.1\r\n\r\n";
        let want = b"POST /v1.41/containers/create?name=x HTTP/1.1\r\nhost: d\r\n\r\n{\"a\":\" /v1.9/\"}GET /v1.40/version HTTP/1.1\r\n\r\n";
        for piece in 1..input.len() {
            assert_eq!(
                rewrite_in_pieces(input, piece),
                want.to_vec(),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn holds_only_a_possible_prefix() {
        let mut r = VersionRewriter::new(41);
        assert_eq!(r.feed(b"GET /v1.5"), b"GET".to_vec());
        assert_eq!(r.feed(b"3/x "), b" /v1.41/x".to_vec());
        assert_eq!(r.flush(), b" ".to_vec());
        assert_eq!(r.feed(b"abc\r\n"), b"abc\r\n".to_vec());
    }

    #[test]
    fn parses_api_versions() {
        assert_eq!(parse_api_version("1.41"), Some((1, 41)));
        assert_eq!(parse_api_version(" 1.53\n"), Some((1, 53)));
        assert_eq!(parse_api_version("x"), None);
    }

    #[test]
    fn image_ref_is_pinned_to_the_envoy_version() {
        assert_eq!(image_ref(), "inference-gateway-envoy:1.40.0");
    }
}
