//! The endpoint picker's I/O: the ext_proc gRPC service (one [`Exchange`] per
//! stream), gRPC health, TLS, the embedded collector feeding snapshots to the
//! [`Picker`], the metrics listener, the optional snapshot ingest, and the
//! safety calls the exchanges ask for.

use super::config::PickerConfig;
use super::protocol::{Env, Exchange};
use super::safety::SafetyCall;
use crate::collector::runtime::{self as collector, RunningCollector};
use crate::config::IngestConfig;
use crate::extproc::Picker;
use crate::ingest;
use crate::observe::{self, render};
use crate::openai::ApiError;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures_util::{Stream, StreamExt};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;

/// The ext_proc service name, also a gRPC health service name.
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// Health service names the Endpoint Picker Protocol defines.
pub const LIVENESS: &str = "liveness";
pub const READINESS: &str = "readiness";

/// How the gRPC listener is secured.
#[derive(Debug, Clone)]
pub enum Tls {
    /// Plain text (`--insecure`).
    Insecure,
    /// A self-signed certificate made at start: conformant gateways connect with
    /// TLS and do not verify it.
    SelfSigned,
    /// `--cert` / `--key` (PEM).
    Files { cert: PathBuf, key: PathBuf },
}

/// Listeners and secrets (from the command line and the environment).
#[derive(Debug, Clone)]
pub struct Options {
    pub grpc: SocketAddr,
    /// A plain-text gRPC health listener for kubelet probes, which cannot do TLS.
    pub health: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// `/metrics` needs `Authorization: Bearer <token>` when set.
    pub metrics_token: Option<String>,
    /// `POST /v1/snapshot`, for a separate collector (optional).
    pub ingest: Option<SocketAddr>,
    pub ingest_token: Option<String>,
    pub tls: Tls,
    /// Replicas of the picker sharing the backend-policy caps, until a collector's
    /// push says otherwise.
    pub replicas: u32,
}

/// Streams so far: seeds each stream's RNG differently.
static STREAMS: AtomicU64 = AtomicU64::new(0);

struct ExtProc {
    picker: Arc<Picker>,
    safety: Option<Arc<SafetyClient>>,
}

/// Sends the exchanges' safety calls to `safety_url`.
struct SafetyClient {
    http: reqwest::Client,
    base: String,
    headers: Vec<(String, String)>,
    timeout: Duration,
}

/// How often a held stream's hold window is looked at.
const TICK: Duration = Duration::from_millis(10);

impl SafetyClient {
    fn new(base: String, safety: &crate::safety::Safety) -> SafetyClient {
        SafetyClient {
            http: reqwest::Client::new(),
            base,
            headers: safety.headers.clone(),
            timeout: Duration::from_millis(safety.timeout_ms),
        }
    }

    /// The call's id, the answer's status and body; no status when the call
    /// failed or timed out (the exchange applies `fail_open`).
    async fn call(self: Arc<Self>, c: SafetyCall) -> (u32, Option<u16>, Vec<u8>) {
        let mut request = self
            .http
            .post(format!("{}{}", self.base, c.path))
            .timeout(self.timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .body(c.body);
        for (k, v) in &self.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let answer = async {
            let r = request.send().await?;
            let status = r.status().as_u16();
            Ok::<_, reqwest::Error>((status, r.bytes().await?))
        };
        match answer.await {
            Ok((status, body)) => (c.id, Some(status), body.to_vec()),
            Err(e) => {
                tracing::debug!("safety call failed: {e}");
                (c.id, None, Vec::new())
            }
        }
    }
}

/// What woke a stream's loop.
enum Event {
    Message(Option<Result<Box<ProcessingRequest>, Status>>),
    Verdict((u32, Option<u16>, Vec<u8>)),
    Tick,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let seed = collector::unix_ms()
            ^ STREAMS
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut exchange = Exchange::new(Arc::clone(&self.picker), Env::system(seed));
        let safety = self.safety.clone();
        let out = async_stream::stream! {
            let mut calls = futures_util::stream::FuturesUnordered::new();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                let event = tokio::select! {
                    m = inbound.next() => Event::Message(m.map(|r| r.map(Box::new))),
                    Some(v) = calls.next(), if !calls.is_empty() => Event::Verdict(v),
                    _ = tick.tick(), if exchange.wants_tick() => Event::Tick,
                };
                let replies = match event {
                    Event::Message(Some(Ok(msg))) => exchange.on_message(*msg),
                    Event::Message(_) => break,
                    Event::Verdict((id, status, body)) => exchange.on_verdict(id, status, &body),
                    Event::Tick => exchange.on_tick(),
                };
                for r in replies {
                    yield Ok(r);
                }
                if let Some(client) = &safety {
                    for c in exchange.take_calls() {
                        calls.push(Arc::clone(client).call(c));
                    }
                }
            }
            // Dropping the exchange (here, or with the stream when Envoy resets
            // it) releases its in-flight count.
            drop(exchange);
        };
        Ok(Response::new(Box::pin(out)))
    }
}

/// A self-signed certificate and its key (PEM), for the gRPC listener.
pub fn self_signed() -> Result<(String, String), String> {
    let names = vec!["endpoint-picker".to_string(), "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

fn tls_config(tls: &Tls) -> Result<Option<ServerTlsConfig>, String> {
    let (cert, key) = match tls {
        Tls::Insecure => return Ok(None),
        Tls::SelfSigned => self_signed()?,
        Tls::Files { cert, key } => (
            std::fs::read_to_string(cert).map_err(|e| format!("{}: {e}", cert.display()))?,
            std::fs::read_to_string(key).map_err(|e| format!("{}: {e}", key.display()))?,
        ),
    };
    Ok(Some(
        ServerTlsConfig::new().identity(Identity::from_pem(cert, key)),
    ))
}

/// A running picker; [`RunningPicker::stop`] ends it.
pub struct RunningPicker {
    pub picker: Arc<Picker>,
    pub grpc: SocketAddr,
    pub health: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub ingest: Option<SocketAddr>,
    collector: Option<Arc<RunningCollector>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    servers: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl RunningPicker {
    /// Completes when a server fails (they never end by themselves otherwise).
    async fn failed(&mut self) -> String {
        if self.servers.is_empty() {
            return std::future::pending().await;
        }
        let (r, _, _) = futures_util::future::select_all(self.servers.iter_mut()).await;
        match r {
            Ok(Ok(())) => "a server stopped".into(),
            Ok(Err(e)) => e,
            Err(e) => format!("a server task failed: {e}"),
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        for s in self.servers {
            let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
        }
        if let Some(c) = self.collector {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.stop().await;
            }
        }
    }
}

/// Runs until `shutdown` completes or a server fails.
pub async fn run(
    cfg: PickerConfig,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let mut p = start(cfg, opts).await?;
    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        e = p.failed() => Err(e),
    };
    tracing::info!("stopping");
    p.stop().await;
    outcome
}

async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), String> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{what}: cannot listen on {addr}: {e}"))?;
    let local = l
        .local_addr()
        .map_err(|e| format!("{what}: no local address: {e}"))?;
    Ok((l, local))
}

/// Binds every listener and starts every task.
pub async fn start(cfg: PickerConfig, opts: Options) -> Result<RunningPicker, String> {
    let tls = tls_config(&opts.tls)?;
    let picker = Arc::new(Picker::new(cfg.plugin));
    picker.set_replicas(opts.replicas);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let mut servers = Vec::new();

    // Discovery and scraping in this process; every round's snapshot goes
    // straight to the picker.
    let collector = match cfg.discovery {
        Some(d) => {
            let c = Arc::new(collector::start_embedded(d).await?);
            let mut rx = c.snapshots();
            let p = Arc::clone(&picker);
            tasks.push(tokio::spawn(async move {
                let mut first = true;
                while rx.changed().await.is_ok() {
                    let Some(bytes) = rx.borrow_and_update().clone() else {
                        continue;
                    };
                    match p.ingest(&bytes) {
                        Ok(()) if first => {
                            first = false;
                            tracing::info!("first snapshot stored: ready");
                        }
                        Ok(()) => {}
                        Err(e) => tracing::debug!("snapshot not stored: {}", e.message),
                    }
                }
            }));
            Some(c)
        }
        None => None,
    };

    // gRPC health: liveness at once; readiness (and the ext_proc service) once
    // the pool's endpoints are known: after the first snapshot with discovery,
    // at once with the plugin's static endpoints.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let needs_snapshot = collector.is_some();
    let set_ready = |r: tonic_health::server::HealthReporter, status: ServingStatus| async move {
        r.set_service_status(READINESS, status).await;
        r.set_service_status(EXT_PROC_SERVICE, status).await;
    };
    if needs_snapshot {
        set_ready(reporter.clone(), ServingStatus::NotServing).await;
        let (r, p) = (reporter.clone(), Arc::clone(&picker));
        tasks.push(tokio::spawn(async move {
            while !p.has_snapshot() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            set_ready(r, ServingStatus::Serving).await;
        }));
    } else {
        set_ready(reporter.clone(), ServingStatus::Serving).await;
    }

    let (grpc_listener, grpc) = bind(opts.grpc, "gRPC").await?;
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    let safety = match (&picker.config.safety, cfg.safety_url) {
        (Some(s), Some(url)) => Some(Arc::new(SafetyClient::new(url, s))),
        _ => None,
    };
    let max_message = max_message_bytes(picker.config.max_request_body_bytes);
    let router = builder.add_service(health_service.clone()).add_service(
        ExternalProcessorServer::new(ExtProc {
            picker: Arc::clone(&picker),
            safety,
        })
        .max_decoding_message_size(max_message),
    );
    let rx = stop_rx.clone();
    servers.push(tokio::spawn(async move {
        router
            // serve_with_incoming ignores the builder's tcp_nodelay: without it
            // Nagle holds the small streamed-body frames for the peer's delayed
            // ACK (40 ms stalls measured in the overhead benchmark).
            .serve_with_incoming_shutdown(
                TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                stopped(rx),
            )
            .await
            .map_err(|e| format!("gRPC server: {e}"))
    }));

    let health = match opts.health {
        Some(addr) => {
            let (l, local) = bind(addr, "gRPC health").await?;
            let rx = stop_rx.clone();
            let svc = health_service;
            servers.push(tokio::spawn(async move {
                Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(l).with_nodelay(Some(true)),
                        stopped(rx),
                    )
                    .await
                    .map_err(|e| format!("gRPC health server: {e}"))
            }));
            Some(local)
        }
        None => None,
    };

    let metrics = match opts.metrics {
        Some(addr) => {
            let (l, local) = bind(addr, "metrics").await?;
            let state = MetricsState {
                picker: Arc::clone(&picker),
                collector: collector.clone(),
                token: opts.metrics_token.clone().map(Arc::from),
            };
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(metrics_handler))
                .with_state(state);
            let rx = stop_rx.clone();
            servers.push(tokio::spawn(async move {
                axum::serve(l, app)
                    .with_graceful_shutdown(stopped(rx))
                    .await
                    .map_err(|e| format!("metrics server: {e}"))
            }));
            Some(local)
        }
        None => None,
    };

    let ingest = match (opts.ingest, opts.ingest_token) {
        (Some(addr), Some(token)) => {
            let (l, local) = bind(addr, "ingest").await?;
            let app = ingest_router(Arc::clone(&picker), token);
            let rx = stop_rx.clone();
            servers.push(tokio::spawn(async move {
                axum::serve(l, app)
                    .with_graceful_shutdown(stopped(rx))
                    .await
                    .map_err(|e| format!("ingest server: {e}"))
            }));
            Some(local)
        }
        (Some(_), None) => return Err("the ingest listener needs a token".into()),
        _ => None,
    };

    tracing::info!(
        grpc = %grpc,
        tls = match &opts.tls { Tls::Insecure => "off", Tls::SelfSigned => "self-signed", Tls::Files { .. } => "from files" },
        health = ?health,
        metrics = ?metrics,
        ingest = ?ingest,
        discovery = needs_snapshot,
        "endpoint-picker listening"
    );
    Ok(RunningPicker {
        picker,
        grpc,
        health,
        metrics,
        ingest,
        collector,
        tasks,
        servers,
        stop,
    })
}

#[derive(Clone)]
struct MetricsState {
    picker: Arc<Picker>,
    collector: Option<Arc<RunningCollector>>,
    token: Option<Arc<str>>,
}

/// GIE's request metrics (as the filter serves them) and the pool gauges (as the
/// collector serves them), behind the optional bearer token.
async fn metrics_handler(State(st): State<MetricsState>, headers: HeaderMap) -> HttpResponse {
    if let Some(token) = &st.token {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !ingest::bearer_ok(authorization, token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a valid bearer token is required\n",
            )
                .into_response();
        }
    }
    (
        [(header::CONTENT_TYPE, render::CONTENT_TYPE)],
        metrics_text(&st.picker, st.collector.as_deref()),
    )
        .into_response()
}

/// The metrics text (what `/metrics` serves).
pub fn metrics_text(picker: &Picker, collector: Option<&RunningCollector>) -> String {
    let members = picker.members();
    let now = collector::unix_ms();
    let mut in_flight: Vec<(String, u64)> = members
        .addresses()
        .map(|a| (a.to_string(), picker.in_flight(a)))
        .collect();
    in_flight.sort();
    in_flight.dedup();
    let state = render::GatewayState {
        snapshot_age_seconds: members
            .snapshot
            .as_ref()
            .map(|s| now.saturating_sub(s.generated_at_ms) as f64 / 1e3),
        snapshot_stale: members
            .snapshot
            .as_ref()
            .map(|s| now.saturating_sub(s.generated_at_ms) > picker.config.snapshot_stale_after_ms),
        in_flight,
        endpoint_names: crate::inflight::names(picker.store(), members.addresses()),
    };
    let mut text = render::render(&observe::read_all(picker.store()), &state);
    text.push_str(&picker.counters_text());
    text.push_str(&picker.policy_gauges());
    if let Some(c) = collector {
        text.push_str(&c.metrics_text());
    }
    text
}

/// `POST /v1/snapshot` into `picker`, with the filter's ingest checks (bearer
/// `token`, 8 MiB at most): the endpoint picker's optional push path (the
/// overhead benchmark feeds its pickers through it).
pub fn ingest_router(picker: Arc<Picker>, token: String) -> axum::Router {
    let state = IngestState {
        picker,
        cfg: Arc::new(IngestConfig {
            token,
            max_snapshot_bytes: 8 << 20,
        }),
    };
    axum::Router::new()
        .route(ingest::INGEST_PATH, axum::routing::post(ingest_snapshot))
        .with_state(state)
}

#[derive(Clone)]
struct IngestState {
    picker: Arc<Picker>,
    cfg: Arc<IngestConfig>,
}

async fn ingest_snapshot(
    State(st): State<IngestState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let result = ingest::check_head(&st.cfg, "POST", auth, None)
        .and_then(|()| {
            if body.len() > st.cfg.max_snapshot_bytes {
                Err(ApiError::body_too_large(st.cfg.max_snapshot_bytes))
            } else {
                Ok(())
            }
        })
        .and_then(|()| st.picker.ingest(&body));
    match result {
        Ok(()) => {
            let replicas = headers
                .get(ingest::REPLICAS_HEADER)
                .and_then(|v| v.to_str().ok());
            if let Some(n) = ingest::parse_replicas(replicas) {
                st.picker.set_replicas(n);
            }
            (StatusCode::NO_CONTENT, String::new())
        }
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            String::from_utf8_lossy(&e.body()).into_owned(),
        ),
    }
}

/// The largest ext_proc message the picker reads. tonic's default (4 MiB) refused
/// a BUFFERED body at the default `max_request_body_bytes` (4 MiB, plus the
/// message's framing), so the request failed instead of being routed. Envoy
/// buffers at most its listener limit (`config::listener_buffer_limit_bytes`, as
/// the rendered configuration sets it): the same bound here, plus room for the
/// headers around the body.
pub fn max_message_bytes(max_request_body_bytes: usize) -> usize {
    let limit = crate::config::listener_buffer_limit_bytes(max_request_body_bytes as u64);
    usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_add(64 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_makes_a_tls_configuration() {
        let (cert, key) = self_signed().unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
        assert!(tls_config(&Tls::SelfSigned).unwrap().is_some());
        assert!(tls_config(&Tls::Insecure).unwrap().is_none());
        let e = tls_config(&Tls::Files {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    }
}
