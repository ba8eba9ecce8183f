//! The collector's async shell, kept thin over the pure modules:
//!
//! - discovery: resolves DNS names every `dns_refresh_interval` (the system
//!   resolver, or hickory against `dns_servers`), re-reads endpoints files and
//!   push target files every `endpoints_file_poll_interval`, and keeps one
//!   scrape task per distinct endpoint address and one pusher per concrete push
//!   address;
//! - scrape tasks: each scrapes its endpoint every `scrape_interval` with its own
//!   `scrape_timeout` and leaves the result in a shared map, so one slow or dead
//!   endpoint delays nobody;
//! - rounds: every `scrape_interval`, a snapshot from the latest results (never
//!   waiting for a scrape), encoded and handed to the pushers;
//! - pushers: one per push address (a DNS push target has one per address),
//!   always sending the newest snapshot, backing off after failures; a round
//!   never waits for them;
//! - the HTTP server: `/metrics` and `/healthz`.

use super::aggregate::{
    build_snapshot, resolve_targets, scrape_set, PoolTargets, ScrapeState, Target,
};
use super::backoff::Backoff;
use super::config::{CollectorConfig, PushEntry, PushTargetSpec, ServerType};
use super::discovery::{
    combine_dns, expand_push_targets, parse_endpoints_file, parse_push_targets_file, DnsOutcome,
    FileEntries, FileWatch, Observed, PushAddress, MAX_DISCOVERY_FILE_BYTES,
};
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
use std::path::{Path, PathBuf};
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
    /// Push addresses now (gateway replicas fed): sent with every push, each
    /// replica enforces that share of an API key's limits.
    push_targets: std::sync::atomic::AtomicU32,
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
    /// Each round's snapshot, encoded (for an in-process consumer).
    snapshots: watch::Receiver<Option<Bytes>>,
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

    /// Every round's snapshot, encoded as pushes send it (`None` before the first).
    pub fn snapshots(&self) -> watch::Receiver<Option<Bytes>> {
        self.snapshots.clone()
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
    start_with(cfg, Some(listener)).await
}

/// Discovery, scraping and rounds without the HTTP server (`cfg.listen` is not
/// bound): the endpoint picker runs the collector inside its own process and
/// serves the metrics itself ([`RunningCollector::metrics_text`]).
pub async fn start_embedded(cfg: CollectorConfig) -> Result<RunningCollector, String> {
    start_with(cfg, None).await
}

async fn start_with(
    cfg: CollectorConfig,
    listener: Option<tokio::net::TcpListener>,
) -> Result<RunningCollector, String> {
    let local_addr = match &listener {
        Some(l) => l
            .local_addr()
            .map_err(|e| format!("no local address: {e}"))?,
        None => cfg.listen,
    };
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        id: random_id(),
        targets: Mutex::new(None),
        states: Mutex::new(HashMap::new()),
        telemetry: Mutex::new(Telemetry::default()),
        last: Mutex::new(Arc::new(Snapshot::default())),
        last_round: Mutex::new(None),
        push_targets: std::sync::atomic::AtomicU32::new(0),
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

    let dns = Dns::new(&cfg.dns_servers)?;
    let (tx, rx) = watch::channel::<Option<Bytes>>(None);
    let snapshots = rx.clone();
    let tasks = vec![
        AbortOnDrop(tokio::spawn(
            Discovery {
                shared: shared.clone(),
                cfg: cfg.clone(),
                scrape_client,
                push_client,
                snapshots: rx,
                dns,
                answers: HashMap::new(),
                dns_failing: HashMap::new(),
                pool_files: vec![PolledFile::default(); cfg.pools.len()],
                push_files: HashMap::new(),
                scrapers: HashMap::new(),
                pushers: HashMap::new(),
            }
            .run(),
        )),
        AbortOnDrop(tokio::spawn(rounds(shared.clone(), cfg.clone(), tx))),
    ];

    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(shared.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = listener.map(|listener| {
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await
        })
    });
    tracing::info!(
        collector = %shared.id,
        listen = %local_addr,
        pools = cfg.pools.len(),
        push_targets = cfg.push_targets.len(),
        dns = if cfg.dns_servers.is_empty() { "system resolver".to_string() } else { format!("{:?}", cfg.dns_servers) },
        "metrics-collector started"
    );
    Ok(RunningCollector {
        shared,
        local_addr,
        snapshots,
        tasks,
        server,
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

/// How DNS names are resolved: the system resolver (getaddrinfo: resolv.conf,
/// its search domains, /etc/hosts) or hickory against the configured servers.
enum Dns {
    System,
    Servers(Box<hickory_resolver::TokioResolver>),
}

impl Dns {
    fn new(servers: &[SocketAddr]) -> Result<Dns, String> {
        use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
        if servers.is_empty() {
            return Ok(Dns::System);
        }
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                for c in &mut ns.connections {
                    c.port = s.port();
                }
                ns
            })
            .collect();
        let mut builder = hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        );
        let opts = builder.options_mut();
        // Every refresh asks the servers: a changed record is seen on the next one.
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        opts.use_hosts_file = ResolveHosts::Never;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        builder
            .build()
            .map(|r| Dns::Servers(Box::new(r)))
            .map_err(|e| format!("DNS resolver for dns_servers: {e}"))
    }

    /// The addresses of `host` (possibly none), or why nothing is known
    /// (`reason` for the error counter, message).
    async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, (&'static str, String)> {
        match self {
            Dns::System => {
                match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host, 0))).await {
                    Ok(Ok(addrs)) => {
                        let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                        ips.sort();
                        ips.dedup();
                        Ok(ips)
                    }
                    // getaddrinfo does not tell NXDOMAIN from a failure reliably:
                    // both keep the previous answer.
                    Ok(Err(e)) => Err(("lookup", e.to_string())),
                    Err(_) => Err(("timeout", format!("no answer within {DNS_TIMEOUT:?}"))),
                }
            }
            Dns::Servers(resolver) => {
                use hickory_resolver::proto::rr::RecordType;
                // Absolute: no search domains with explicit servers.
                let fqdn = if host.ends_with('.') {
                    host.to_string()
                } else {
                    format!("{host}.")
                };
                resolver.clear_cache();
                let both = async {
                    tokio::join!(
                        resolver.lookup(fqdn.as_str(), RecordType::A),
                        resolver.lookup(fqdn.as_str(), RecordType::AAAA)
                    )
                };
                match tokio::time::timeout(DNS_TIMEOUT, both).await {
                    Err(_) => Err(("timeout", format!("no answer within {DNS_TIMEOUT:?}"))),
                    Ok((a, aaaa)) => {
                        let outcomes = [dns_outcome(a), dns_outcome(aaaa)];
                        combine_dns(&outcomes).ok_or_else(|| {
                            let why: Vec<&str> = outcomes
                                .iter()
                                .filter_map(|o| match o {
                                    DnsOutcome::Failed(m) => Some(m.as_str()),
                                    _ => None,
                                })
                                .collect();
                            ("lookup", why.join("; "))
                        })
                    }
                }
            }
        }
    }
}

/// One hickory answer as a [`DnsOutcome`]: NXDOMAIN or NOERROR without records
/// is empty; anything else that is not an answer failed.
fn dns_outcome(
    r: Result<hickory_resolver::lookup::Lookup, hickory_resolver::net::NetError>,
) -> DnsOutcome {
    use hickory_resolver::net::{DnsError, NetError};
    use hickory_resolver::proto::op::ResponseCode;
    use hickory_resolver::proto::rr::RData;
    match r {
        Ok(lookup) => DnsOutcome::Addresses(
            lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect(),
        ),
        Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
            if matches!(
                nr.response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            ) =>
        {
            DnsOutcome::Empty
        }
        Err(e) => DnsOutcome::Failed(e.to_string()),
    }
}

/// Reads a discovery file (symlinks followed, as a mounted ConfigMap needs),
/// refusing one over [`MAX_DISCOVERY_FILE_BYTES`].
async fn read_discovery_file(path: &Path) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    file.take(MAX_DISCOVERY_FILE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    if buf.len() > MAX_DISCOVERY_FILE_BYTES {
        return Err(format!("larger than {MAX_DISCOVERY_FILE_BYTES} bytes"));
    }
    String::from_utf8(buf).map_err(|_| "not UTF-8".to_string())
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "json")
}

/// A polled file and the entries its last good content gave.
#[derive(Clone)]
struct PolledFile<T> {
    watch: FileWatch,
    entries: Vec<T>,
}

impl<T> Default for PolledFile<T> {
    fn default() -> Self {
        PolledFile {
            watch: FileWatch::default(),
            entries: Vec::new(),
        }
    }
}

impl<T> PolledFile<T> {
    /// Reads the file; on new content parses it with `parse`. A missing,
    /// unreadable or malformed file keeps the previous entries; each change of
    /// state is logged and counted once. Returns whether the entries changed.
    async fn poll(
        &mut self,
        shared: &Shared,
        what: &str,
        path: &Path,
        parse: impl FnOnce(&str) -> Result<FileEntries<T>, String>,
    ) -> bool
    where
        T: PartialEq,
    {
        let shown = path.display().to_string();
        match self.watch.observe(read_discovery_file(path).await) {
            Observed::Same => false,
            Observed::Failed { message, first } => {
                if first {
                    tracing::warn!(file = %shown, "{what}: cannot read it, keeping the {} previous entries: {message}", self.entries.len());
                    lock(&shared.telemetry).discovery_error("file", &shown, "read");
                }
                false
            }
            Observed::Changed(text) => match parse(&text) {
                Err(message) => {
                    tracing::warn!(file = %shown, "{what}: malformed, keeping the {} previous entries: {message}", self.entries.len());
                    lock(&shared.telemetry).discovery_error("file", &shown, "parse");
                    false
                }
                Ok(f) => {
                    for r in &f.refused {
                        tracing::warn!(file = %shown, "{what}: entry refused: {r}");
                        lock(&shared.telemetry).discovery_error("file", &shown, "entry");
                    }
                    if f.entries == self.entries {
                        return false;
                    }
                    tracing::info!(file = %shown, entries = f.entries.len(), "{what}: read");
                    self.entries = f.entries;
                    true
                }
            },
        }
    }
}

/// Discovery's state: DNS answers, polled files, and the tasks they imply.
struct Discovery {
    shared: Arc<Shared>,
    cfg: Arc<CollectorConfig>,
    scrape_client: reqwest::Client,
    push_client: reqwest::Client,
    /// Never read here: cloned for each new pusher, which then sees the newest
    /// snapshot at once.
    snapshots: watch::Receiver<Option<Bytes>>,
    dns: Dns,
    /// Host name → its addresses, from the last lookup that succeeded.
    answers: HashMap<String, Vec<IpAddr>>,
    /// Host names whose last lookup failed, with the message (logged once).
    dns_failing: HashMap<String, String>,
    /// `pools[i]`'s endpoints file.
    pool_files: Vec<PolledFile<Target>>,
    push_files: HashMap<PathBuf, PolledFile<PushEntry>>,
    scrapers: HashMap<SocketAddr, (ServerType, AbortOnDrop)>,
    /// URL → its pusher.
    pushers: HashMap<String, (PushAddress, AbortOnDrop)>,
}

impl Discovery {
    async fn run(mut self) {
        self.poll_files().await;
        self.refresh_dns(false).await;
        self.apply();
        let has_files = self.cfg.pools.iter().any(|p| p.endpoints_file.is_some())
            || self
                .cfg
                .push_targets
                .iter()
                .any(|t| matches!(t, PushTargetSpec::File(_)));
        if !has_files && self.dns_names().is_empty() {
            // Static only: nothing to refresh; keep the tasks alive.
            std::future::pending::<()>().await;
        }
        let start = tokio::time::Instant::now();
        let mut dns_tick = tokio::time::interval_at(
            start + self.cfg.dns_refresh_interval,
            self.cfg.dns_refresh_interval,
        );
        dns_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut file_tick = tokio::time::interval_at(
            start + self.cfg.endpoints_file_poll_interval,
            self.cfg.endpoints_file_poll_interval,
        );
        file_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = dns_tick.tick() => self.refresh_dns(false).await,
                _ = file_tick.tick(), if has_files => {
                    if self.poll_files().await {
                        // Names a push target file just added: resolve them now,
                        // not at the next refresh.
                        self.refresh_dns(true).await;
                    }
                }
            }
            self.apply();
        }
    }

    /// The push target entries: the configured ones and those files list.
    fn push_entries(&self) -> Vec<PushEntry> {
        let mut out = Vec::new();
        for t in &self.cfg.push_targets {
            match t {
                PushTargetSpec::Entry(e) => out.push(e.clone()),
                PushTargetSpec::File(path) => {
                    if let Some(f) = self.push_files.get(path) {
                        out.extend(f.entries.iter().cloned());
                    }
                }
            }
        }
        out
    }

    /// Every DNS name to resolve (configured, and from push target files).
    fn dns_names(&self) -> Vec<String> {
        let mut names = self.cfg.dns_sources();
        for e in self.push_entries() {
            if let super::config::Host::Name(n) = e.host {
                names.push(n);
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// Resolves every name (or, `only_new`, those never resolved), all at once.
    /// A failed lookup keeps the previous answer; an empty answer is zero
    /// addresses.
    async fn refresh_dns(&mut self, only_new: bool) {
        let names: Vec<String> = self
            .dns_names()
            .into_iter()
            .filter(|n| !only_new || !self.answers.contains_key(n))
            .collect();
        if names.is_empty() {
            return;
        }
        let dns = &self.dns;
        let results =
            futures_util::future::join_all(names.iter().map(|n| dns.resolve(n.as_str()))).await;
        for (host, result) in names.into_iter().zip(results) {
            match result {
                Ok(ips) => {
                    if self.dns_failing.remove(&host).is_some() {
                        tracing::info!(host = %host, "DNS lookups succeed again");
                    }
                    if self.answers.get(&host) != Some(&ips) {
                        tracing::info!(host = %host, addresses = ?ips, "DNS answer changed");
                    }
                    self.answers.insert(host, ips);
                }
                Err((reason, message)) => {
                    lock(&self.shared.telemetry).discovery_error("dns", &host, reason);
                    // Keep the previous answer: a DNS hiccup must not drop live members.
                    if self.dns_failing.get(&host) != Some(&message) {
                        tracing::warn!(host = %host, kept = ?self.answers.get(&host), "DNS lookup failed, keeping the previous addresses: {message}");
                        self.dns_failing.insert(host, message);
                    }
                }
            }
        }
    }

    /// Polls every endpoints file and push target file; whether any changed.
    async fn poll_files(&mut self) -> bool {
        let mut changed = false;
        for (i, pool) in self.cfg.pools.iter().enumerate() {
            let Some(path) = &pool.endpoints_file else {
                continue;
            };
            let what = format!("endpoints file of pool {}", pool.name);
            changed |= self.pool_files[i]
                .poll(&self.shared, &what, path, |text| {
                    parse_endpoints_file(text, is_json(path), pool)
                })
                .await;
        }
        for t in &self.cfg.push_targets {
            let PushTargetSpec::File(path) = t else {
                continue;
            };
            let f = self.push_files.entry(path.clone()).or_default();
            changed |= f
                .poll(&self.shared, "push target file", path, |text| {
                    parse_push_targets_file(text, is_json(path))
                })
                .await;
        }
        changed
    }

    /// Makes the tasks match what is known: one scrape task per endpoint
    /// address, one pusher per push address; the round's targets.
    fn apply(&mut self) {
        let shared = &self.shared;
        let cfg = &self.cfg;
        let files: Vec<Vec<Target>> = self.pool_files.iter().map(|f| f.entries.clone()).collect();
        let pools = resolve_targets(&cfg.pools, &self.answers, &files);
        let want = scrape_set(&pools);
        let wanted: HashSet<(SocketAddr, ServerType)> = want.iter().copied().collect();
        let before = self.scrapers.len();
        self.scrapers
            .retain(|addr, (t, _)| wanted.contains(&(*addr, *t)));
        if self.scrapers.len() != before {
            let keep: HashSet<SocketAddr> = self.scrapers.keys().copied().collect();
            lock(&shared.states).retain(|a, _| keep.contains(a));
            let keep: HashSet<String> = want.iter().map(|(a, _)| a.to_string()).collect();
            lock(&shared.telemetry).retain_endpoints(&keep);
        }
        for (addr, server_type) in want {
            self.scrapers.entry(addr).or_insert_with(|| {
                let task = tokio::spawn(scrape_loop(
                    shared.clone(),
                    self.scrape_client.clone(),
                    addr,
                    server_type,
                    cfg.scrape_interval,
                    cfg.scrape_timeout,
                ));
                (server_type, AbortOnDrop(task))
            });
        }
        *lock(&shared.targets) = Some(Arc::new(pools));

        let targets = expand_push_targets(&self.push_entries(), &self.answers);
        let urls: HashSet<&str> = targets.iter().map(|t| t.url.as_str()).collect();
        let before = self.pushers.len();
        self.pushers.retain(|url, (t, _)| {
            let keep = urls.contains(url.as_str());
            if !keep {
                tracing::info!(target = %t.name, address = %t.address, "push target gone, its pusher stops");
            }
            keep
        });
        let removed = self.pushers.len() != before;
        for t in targets {
            if self.pushers.contains_key(&t.url) {
                continue;
            }
            tracing::info!(target = %t.name, address = %t.address, "push target found");
            let mut rx = self.snapshots.clone();
            // Push the newest snapshot at once (if there is one yet).
            rx.mark_changed();
            let task = tokio::spawn(pusher(
                shared.clone(),
                cfg.clone(),
                self.push_client.clone(),
                t.clone(),
                rx,
            ));
            self.pushers.insert(t.url.clone(), (t, AbortOnDrop(task)));
        }
        shared.push_targets.store(
            u32::try_from(self.pushers.len()).unwrap_or(u32::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        if removed {
            let keep: HashSet<(String, String)> = self
                .pushers
                .values()
                .map(|(t, _)| (t.name.clone(), t.address.to_string()))
                .collect();
            lock(&shared.telemetry).retain_push_targets(&keep);
        }
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
    target: PushAddress,
    mut rx: watch::Receiver<Option<Bytes>>,
) {
    let address = target.address.to_string();
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
        let replicas = shared
            .push_targets
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        let sent = client
            .post(&target.url)
            .header(header::AUTHORIZATION, &auth)
            .header(crate::ingest::REPLICAS_HEADER, replicas.to_string())
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
        lock(&shared.telemetry).push(&target.name, &address, result);
        if last_result != Some(result) {
            match result {
                PushResult::Ok if last_result.is_some() => {
                    tracing::info!(target = %target.name, address = %address, "pushes succeed again")
                }
                PushResult::Ok => {
                    tracing::info!(target = %target.name, address = %address, "first push stored")
                }
                PushResult::Stale => {
                    tracing::info!(target = %target.name, address = %address, "the target has a newer snapshot: {detail}")
                }
                PushResult::Rejected | PushResult::Error => tracing::warn!(
                    target = %target.name,
                    address = %address,
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
