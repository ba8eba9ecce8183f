//! Child processes that never outlive their owner, bounded readiness waits, and
//! free loopback ports.

use super::{Error, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// How long a child gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// A child process that is stopped when dropped: SIGTERM, then SIGKILL if it has
/// not exited within [`TERM_GRACE`]. Its stdout and stderr go to a log file.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: Option<PathBuf>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log` (when
    /// given; otherwise inherited).
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> Result<Self> {
        cmd.stdin(Stdio::null());
        if let Some(path) = log {
            let out = File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::new(format!("cannot open log {}: {e}", path.display())))?;
            let err = out
                .try_clone()
                .map_err(|e| Error::new(format!("cannot open log {}: {e}", path.display())))?;
            cmd.stdout(out).stderr(err);
        }
        let child = cmd.spawn().map_err(|e| {
            Error::new(format!(
                "cannot start {name} ({}): {e}",
                cmd.get_program().to_string_lossy()
            ))
        })?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
            log: log.map(Path::to_path_buf),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The last `max_bytes` of the log file, for error messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        self.log
            .as_deref()
            .map(|p| file_tail(p, max_bytes))
            .unwrap_or_default()
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Fails with the log tail if the child has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => Err(Error::new(format!(
                "{} exited ({status}); last output:\n{}",
                self.name,
                self.log_tail(4000)
            ))),
        }
    }

    /// SIGKILL now (a crash, as far as peers can tell) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own child's pid; the child is not reaped yet,
            // so the pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(TERM_GRACE);
    }
}

/// The last `max_bytes` of a file (lossy UTF-8), or an empty string.
pub fn file_tail(path: &Path, max_bytes: usize) -> String {
    let mut bytes = Vec::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .is_err()
    {
        return String::new();
    }
    let start = bytes.len().saturating_sub(max_bytes);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that was free a moment ago, never the same twice in
/// this process (parallel tests each get their own).
pub fn free_port() -> Result<u16> {
    for _ in 0..64 {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| Error::new(format!("cannot bind 127.0.0.1:0: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::new(format!("no local address: {e}")))?
            .port();
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    Err(Error::new("no free port on 127.0.0.1 after 64 tries"))
}

/// What a readiness check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check<T> {
    /// Ready, with a value.
    Ready(T),
    /// Not yet, and why (reported if the wait times out).
    NotYet(String),
    /// Never going to be ready (e.g. the process died): stop waiting.
    Failed(String),
}

/// Polls `check` every 50 ms until it is [`Check::Ready`] or [`Check::Failed`], or
/// `timeout` passes (an error that names `what` and the last reason given).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Check<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Check::Ready(v) => return Ok(v),
            Check::NotYet(why) => why,
            Check::Failed(why) => {
                return Err(Error::new(format!("gave up waiting for {what}: {why}")))
            }
        };
        if Instant::now() >= deadline {
            return Err(Error::new(format!(
                "timed out after {timeout:?} waiting for {what} (last: {last})"
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_until(
        &format!("tcp {addr}"),
        timeout,
        || match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => Check::Ready(()),
            Err(e) => Check::NotYet(e.to_string()),
        },
    )
}

/// Waits until `GET url` answers with a 2xx status; returns the body.
pub fn wait_for_http(url: &str, timeout: Duration) -> Result<String> {
    wait_until(&format!("GET {url}"), timeout, || match http_get(url) {
        Ok((status, body)) if (200..300).contains(&status) => Check::Ready(body),
        Ok((status, body)) => Check::NotYet(format!("{status}: {}", body.trim())),
        Err(e) => Check::NotYet(e.to_string()),
    })
}

/// A minimal blocking HTTP/1.1 `GET` for `http://host:port/path` URLs (readiness
/// checks need no HTTP client). Returns the status and the body.
pub fn http_get(url: &str) -> Result<(u16, String)> {
    http_request("GET", url, None, &[])
}

/// A minimal blocking HTTP/1.1 request with an optional body; the connection is
/// closed after one exchange. Chunked responses are decoded.
pub fn http_request(
    method: &str,
    url: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::new(format!("not an http:// URL: {url}")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| Error::new(format!("{url}: the host must be ip:port")))?;
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| Error::new(format!("connect {addr}: {e}")))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("content-length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let io = |e: std::io::Error| Error::new(format!("{method} {url}: {e}"));
    stream.write_all(head.as_bytes()).map_err(io)?;
    if let Some(b) = body {
        stream.write_all(b).map_err(io)?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw).ok_or_else(|| Error::new(format!("{method} {url}: malformed response")))
}

fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let status: u16 = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// Completes on SIGTERM or Ctrl-C: the graceful-shutdown trigger of the native
/// servers. Where no SIGTERM handler can be installed, Ctrl-C alone.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

/// The main loop of a native HTTP server binary: binds `addr`, serves `app` until
/// SIGTERM or Ctrl-C (letting requests in flight finish), and says how it went as
/// the exit code. `name` is for the log lines.
pub async fn serve_until_signal(
    name: &str,
    addr: SocketAddr,
    app: axum::Router,
) -> std::process::ExitCode {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{name}: cannot listen on {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(%addr, "{name} listening");
    match axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{name}: server error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logging for the native binaries: `tracing` to stderr, level from `RUST_LOG`
/// (default `info`), colours only on a terminal (not in log files).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        TcpListener::bind(("127.0.0.1", a)).unwrap();
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse_response(plain), Some((200, "ok".into())));
        let chunked =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((404, "abcde".into())));
        assert_eq!(parse_response(b"garbage"), None);
    }

    #[test]
    fn http_get_against_a_tiny_server() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"GET /ready HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nLIVE")
                .unwrap();
        });
        let body = wait_for_http(&format!("http://{addr}/ready"), Duration::from_secs(5)).unwrap();
        assert_eq!(body, "LIVE");
        server.join().unwrap();
    }

    #[test]
    fn wait_until_times_out_with_the_last_reason() {
        let e = wait_until::<()>("nothing", Duration::from_millis(120), || {
            Check::NotYet("still no".into())
        })
        .unwrap_err();
        assert!(e.0.contains("nothing") && e.0.contains("still no"), "{e}");
        let started = Instant::now();
        let e = wait_until::<()>("x", Duration::from_secs(10), || {
            Check::Failed("dead".into())
        })
        .unwrap_err();
        assert!(e.0.contains("dead") && started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn child_guard_stops_a_sleeping_child() {
        let dir = tempfile_dir();
        let log = dir.join("sleep.log");
        let mut guard =
            ChildGuard::spawn("sleep", Command::new("sleep").arg("30"), Some(&log)).unwrap();
        assert!(guard.check_running().is_ok());
        let started = Instant::now();
        let status = guard.stop(Duration::from_secs(5)).unwrap();
        assert!(!status.success());
        assert!(started.elapsed() < Duration::from_secs(4));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn check_running_reports_the_log_of_a_dead_child() {
        let dir = tempfile_dir();
        let log = dir.join("sh.log");
        let mut guard = ChildGuard::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            Some(&log),
        )
        .unwrap();
        let e = wait_until("exit", Duration::from_secs(5), || {
            match guard.check_running() {
                Ok(()) => Check::NotYet("running".into()),
                Err(e) => Check::Ready(e),
            }
        })
        .unwrap();
        assert!(e.0.contains("boom"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "deploy-process-test-{}-{}",
            std::process::id(),
            free_port().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
