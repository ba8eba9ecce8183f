//! The collector's async shell, kept thin over the pure modules:
//!
//! - discovery: resolves DNS sources every `dns_refresh_interval` and keeps one
//!   scrape task per distinct endpoint address;
//! - scrape tasks: each scrapes its endpoint every `scrape_interval` with its own
//!   `scrape_timeout` and leaves the result in a shared map, so one slow or dead
//!   endpoint delays nobody;
//! - rounds: every `scrape_interval`, a snapshot from the latest results (never
//!   waiting for a scrape), encoded and handed to the pushers;
//! - pushers: one per target, always sending the newest snapshot, backing off
//!   after failures; a round never waits for them;
//! - the HTTP server: `/metrics` and `/healthz`.

use super::aggregate::{build_snapshot, resolve_targets, scrape_set, PoolTargets, ScrapeState};
use super::backoff::Backoff;
use super::config::{CollectorConfig, PushTarget, ServerType};
use super::mapping::map_exposition;
use super::telemetry::{PushResult, Telemetry};
use crate::snapshot::Snapshot;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

/// A model server's `/metrics` larger than this is an error, not a memory hog.
pub const MAX_METRICS_BYTES: usize = 16 * 1024 * 1024;
/// A DNS lookup that takes longer is treated as failed (previous answer kept).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random per-process collector id (std's hasher keys come from the OS RNG).
pub fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(u128::from(unix_ms()));
    format!("collector-{:016x}", h.finish())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shared {
    id: String,
    /// `None` until discovery has run once (no snapshot before that).
    targets: Mutex<Option<Arc<Vec<PoolTargets>>>>,
    states: Mutex<HashMap<SocketAddr, ScrapeState>>,
    telemetry: Mutex<Telemetry>,
    last: Mutex<Arc<Snapshot>>,
    last_round: Mutex<Option<Instant>>,
    /// `/healthz` fails when no round finished within this long.
    healthz_max_age: Duration,
}

/// Aborts the task when dropped, so dropping a map of these stops every task.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running collector; [`RunningCollector::stop`] ends it.
pub struct RunningCollector {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    tasks: Vec<AbortOnDrop>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningCollector {
    /// Where `/metrics` and `/healthz` are served.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The last snapshot a round built.
    pub fn latest(&self) -> Arc<Snapshot> {
        lock(&self.shared.last).clone()
    }

    /// What `/metrics` would answer now.
    pub fn metrics_text(&self) -> String {
        let last = self.latest();
        lock(&self.shared.telemetry).render(&last)
    }

    pub fn rounds(&self) -> u64 {
        lock(&self.shared.telemetry).rounds()
    }

    /// Completes when the HTTP server fails (it never ends by itself otherwise).
    async fn server_failed(&mut self) -> String {
        match self.server.as_mut() {
            Some(h) => match h.await {
                Ok(Ok(())) => "the HTTP server stopped".into(),
                Ok(Err(e)) => format!("the HTTP server failed: {e}"),
                Err(e) => format!("the HTTP server task failed: {e}"),
            },
            None => std::future::pending().await,
        }
    }

    /// Stops scraping and pushing, then the HTTP server (in-flight requests get
    /// up to 2 s).
    pub async fn stop(mut self) {
        self.tasks.clear();
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            if tokio::time::timeout(Duration::from_secs(2), h)
                .await
                .is_err()
            {
                tracing::warn!("the HTTP server did not stop within 2 s");
            }
        }
    }
}

/// Runs until `shutdown` completes (or the HTTP server fails).
pub async fn run(cfg: CollectorConfig, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let mut c = start(cfg).await?;
    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        e = c.server_failed() => Err(e),
    };
    tracing::info!("stopping");
    c.stop().await;
    outcome
}

/// Binds the HTTP listener and starts every task.
pub async fn start(cfg: CollectorConfig) -> Result<RunningCollector, String> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        id: random_id(),
        targets: Mutex::new(None),
        states: Mutex::new(HashMap::new()),
        telemetry: Mutex::new(Telemetry::default()),
        last: Mutex::new(Arc::new(Snapshot::default())),
        last_round: Mutex::new(None),
        healthz_max_age: (cfg.scrape_interval * 10).max(Duration::from_secs(1)),
    });
    // Loopback and cluster addresses only: never through a proxy from the environment.
    let scrape_client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(cfg.scrape_timeout)
        .pool_max_idle_per_host(1)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let push_client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(cfg.push_timeout)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;

    let (tx, rx) = watch::channel::<Option<Bytes>>(None);
    let mut tasks = vec![
        AbortOnDrop(tokio::spawn(discovery(
            shared.clone(),
            cfg.clone(),
            scrape_client,
        ))),
        AbortOnDrop(tokio::spawn(rounds(shared.clone(), cfg.clone(), tx))),
    ];
    for target in &cfg.push_targets {
        tasks.push(AbortOnDrop(tokio::spawn(pusher(
            shared.clone(),
            cfg.clone(),
            push_client.clone(),
            target.clone(),
            rx.clone(),
        ))));
    }

    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(shared.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    tracing::info!(
        collector = %shared.id,
        listen = %local_addr,
        pools = cfg.pools.len(),
        push_targets = cfg.push_targets.len(),
        "metrics-collector started"
    );
    Ok(RunningCollector {
        shared,
        local_addr,
        tasks,
        server: Some(server),
        stop_server: Some(stop_tx),
    })
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let last = lock(&shared.last).clone();
    let body = lock(&shared.telemetry).render(&last);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let last = *lock(&shared.last_round);
    match last {
        Some(t) if t.elapsed() <= shared.healthz_max_age => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "no recent round\n"),
    }
}

/// Resolves DNS sources and keeps exactly one scrape task per endpoint address.
async fn discovery(shared: Arc<Shared>, cfg: Arc<CollectorConfig>, client: reqwest::Client) {
    let sources = cfg.dns_sources();
    let mut answers: HashMap<(String, u16), Vec<IpAddr>> = HashMap::new();
    let mut scrapers: HashMap<SocketAddr, (ServerType, AbortOnDrop)> = HashMap::new();
    loop {
        for (host, port) in &sources {
            let key = (host.clone(), *port);
            match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host.as_str(), *port)))
                .await
            {
                Ok(Ok(addrs)) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    ips.sort();
                    ips.dedup();
                    if answers.get(&key) != Some(&ips) {
                        tracing::info!(host = %host, port, addresses = ?ips, "DNS answer changed");
                    }
                    answers.insert(key, ips);
                }
                // Keep the previous answer: a DNS hiccup must not drop live endpoints.
                Ok(Err(e)) => {
                    tracing::warn!(host = %host, "DNS lookup failed, keeping the previous addresses: {e}")
                }
                Err(_) => {
                    tracing::warn!(host = %host, "DNS lookup timed out, keeping the previous addresses")
                }
            }
        }
        let pools = resolve_targets(&cfg.pools, &answers);
        let want = scrape_set(&pools);
        let wanted: HashSet<(SocketAddr, ServerType)> = want.iter().copied().collect();
        let before = scrapers.len();
        scrapers.retain(|addr, (t, _)| wanted.contains(&(*addr, *t)));
        if scrapers.len() != before {
            let keep: HashSet<SocketAddr> = scrapers.keys().copied().collect();
            lock(&shared.states).retain(|a, _| keep.contains(a));
            let keep: HashSet<String> = want.iter().map(|(a, _)| a.to_string()).collect();
            lock(&shared.telemetry).retain_endpoints(&keep);
        }
        for (addr, server_type) in want {
            scrapers.entry(addr).or_insert_with(|| {
                let task = tokio::spawn(scrape_loop(
                    shared.clone(),
                    client.clone(),
                    addr,
                    server_type,
                    cfg.scrape_interval,
                    cfg.scrape_timeout,
                ));
                (server_type, AbortOnDrop(task))
            });
        }
        *lock(&shared.targets) = Some(Arc::new(pools));
        if sources.is_empty() {
            // Static endpoints only: nothing to refresh; keep the tasks alive.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(cfg.dns_refresh_interval).await;
    }
}

/// The whole chain of an error's sources (reqwest's own message alone says little).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// GET `/metrics`; errors carry a short reason for the error counter.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, (&'static str, String)> {
    let mut resp = client
        .get(url)
        .header(header::ACCEPT, "text/plain;version=0.0.4;q=1,*/*;q=0.1")
        .send()
        .await
        .map_err(|e| ("connect", chain(&e)))?;
    if !resp.status().is_success() {
        return Err(("status", format!("HTTP {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| ("body", chain(&e)))? {
        if body.len() + chunk.len() > MAX_METRICS_BYTES {
            return Err(("body", format!("larger than {MAX_METRICS_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| ("parse", "the body is not UTF-8".to_string()))
}

async fn scrape_loop(
    shared: Arc<Shared>,
    client: reqwest::Client,
    addr: SocketAddr,
    server_type: ServerType,
    interval: Duration,
    timeout: Duration,
) {
    let url = format!("http://{addr}/metrics");
    let endpoint = addr.to_string();
    // Spread the first scrapes over one interval, so a thousand endpoints do not
    // all fire in the same millisecond every time.
    let offset = interval.mul_f64(fastrand::Rng::with_seed(addr_seed(&addr)).f64());
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let outcome = match tokio::time::timeout(timeout, fetch(&client, &url)).await {
            Err(_) => Err(("timeout", format!("no answer within {timeout:?}"))),
            Ok(Err(e)) => Err(e),
            Ok(Ok(body)) => {
                map_exposition(server_type, &body).map_err(|e| (e.reason(), e.to_string()))
            }
        };
        let took = started.elapsed();
        let reason = outcome.as_ref().err().map(|(r, _)| *r);
        {
            let mut states = lock(&shared.states);
            let s = states.entry(addr).or_default();
            match outcome {
                Ok(m) => {
                    if !s.last_ok && s.last_error.is_some() {
                        tracing::info!(endpoint = %endpoint, "scrapes succeed again");
                    }
                    s.last_ok = true;
                    s.last_success_ms = unix_ms();
                    s.metrics = m;
                    s.last_error = None;
                }
                Err((_, message)) => {
                    // Log transitions, not every failed scrape at 20 per second.
                    if s.last_error.is_none() {
                        tracing::warn!(endpoint = %endpoint, server_type = %server_type, "scrape failed: {message}");
                    }
                    s.last_ok = false;
                    s.last_error = Some(message);
                }
            }
        }
        lock(&shared.telemetry).scrape(&endpoint, took, reason);
    }
}

fn addr_seed(addr: &SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut h);
    h.finish()
}

/// One snapshot per interval from whatever the scrapes have left so far.
async fn rounds(shared: Arc<Shared>, cfg: Arc<CollectorConfig>, tx: watch::Sender<Option<Bytes>>) {
    // A scrape should complete within a timeout plus an interval of the last one.
    let max_age_ms = (cfg.scrape_timeout + cfg.scrape_interval).as_millis() as u64;
    let mut tick = tokio::time::interval(cfg.scrape_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    loop {
        tick.tick().await;
        let Some(targets) = lock(&shared.targets).clone() else {
            continue;
        };
        sequence += 1;
        let snapshot = {
            let states = lock(&shared.states);
            build_snapshot(
                &targets,
                &states,
                unix_ms(),
                max_age_ms,
                sequence,
                &shared.id,
            )
        };
        let bytes = Bytes::from(snapshot.encode());
        lock(&shared.telemetry).round(bytes.len());
        *lock(&shared.last) = Arc::new(snapshot);
        *lock(&shared.last_round) = Some(Instant::now());
        tx.send_replace(Some(bytes));
    }
}

/// Pushes the newest snapshot to one target; after a failure waits out the
/// backoff, then pushes whatever is newest by then (older rounds are skipped).
async fn pusher(
    shared: Arc<Shared>,
    cfg: Arc<CollectorConfig>,
    client: reqwest::Client,
    target: PushTarget,
    mut rx: watch::Receiver<Option<Bytes>>,
) {
    let auth = format!("Bearer {}", cfg.token.as_deref().unwrap_or_default());
    let mut backoff = Backoff::new(cfg.push_backoff_initial, cfg.push_backoff_max);
    let mut rng = fastrand::Rng::with_seed(addr_seed(&cfg.listen) ^ unix_ms());
    let mut last_result: Option<PushResult> = None;
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let Some(body) = rx.borrow_and_update().clone() else {
            continue;
        };
        let sent = client
            .post(&target.url)
            .header(header::AUTHORIZATION, &auth)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .timeout(cfg.push_timeout)
            .body(body)
            .send()
            .await;
        let (result, detail) = match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let result = PushResult::from_status(status);
                let detail = if result == PushResult::Ok {
                    String::new()
                } else {
                    let text = resp.text().await.unwrap_or_default();
                    format!(
                        "HTTP {status} {}",
                        text.chars().take(300).collect::<String>()
                    )
                };
                (result, detail)
            }
            Err(e) => (PushResult::Error, chain(&e)),
        };
        lock(&shared.telemetry).push(&target.name, result);
        if last_result != Some(result) {
            match result {
                PushResult::Ok if last_result.is_some() => {
                    tracing::info!(target = %target.name, "pushes succeed again")
                }
                PushResult::Ok => tracing::info!(target = %target.name, "first push stored"),
                PushResult::Stale => {
                    tracing::info!(target = %target.name, "the target has a newer snapshot: {detail}")
                }
                PushResult::Rejected | PushResult::Error => tracing::warn!(
                    target = %target.name,
                    "push failed ({}), retrying with backoff: {detail}",
                    result.as_str()
                ),
            }
            last_result = Some(result);
        }
        if result.backs_off() {
            tokio::time::sleep(backoff.fail(&mut rng)).await;
        } else {
            backoff.succeed();
        }
    }
}
