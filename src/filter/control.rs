//! The control listener (loopback only): `POST /v1/snapshot` takes the collector's
//! pushes, `GET /debug/state` shows what the gateway's workers share.

use super::host;
use super::store::{self, HostStore};
use crate::config::Config;
use crate::inflight::{self, SharedStore};
use crate::ingest::{self, INGEST_PATH};
use crate::observe;
use crate::openai::ApiError;
use crate::snapshot::Snapshot;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use serde::Serialize;
use std::collections::BTreeMap;
use std::rc::Rc;

pub const STATE_PATH: &str = "/debug/state";
/// Request metrics with GIE's names, in the Prometheus text format.
pub const METRICS_PATH: &str = "/metrics";

pub struct ControlStream {
    config: Rc<Config>,
    /// Set while a snapshot push's body is being buffered.
    ingesting: bool,
    /// The push's `x-gateway-replicas`: stored with the snapshot it came with.
    replicas: Option<u32>,
}

impl ControlStream {
    pub fn new(config: Rc<Config>) -> Self {
        ControlStream {
            config,
            ingesting: false,
            replicas: None,
        }
    }

    fn metrics(&self) -> String {
        let now_ms = super::now_ms(self);
        let snapshot = store::stored_snapshot();
        let names = endpoint_names(&self.config, snapshot.as_ref());
        let state = observe::render::GatewayState {
            snapshot_age_seconds: snapshot
                .as_ref()
                .map(|s| now_ms.saturating_sub(s.generated_at_ms) as f64 / 1000.0),
            snapshot_stale: snapshot
                .as_ref()
                .map(|s| s.is_stale(now_ms, self.config.snapshot_stale_after_ms)),
            in_flight: inflight::by_endpoint(&HostStore, &names)
                .into_iter()
                .collect(),
            endpoint_names: names,
        };
        let mut text = observe::render::render(&observe::read_all(&HostStore), &state);
        // The policies' per-endpoint gauges, computed now from the shared counts:
        // scrapes pay for them, requests do not.
        if let Some(s) = &snapshot {
            let policies = published_policies();
            if !policies.is_empty() {
                let counts: BTreeMap<&str, u64> = state
                    .in_flight
                    .iter()
                    .map(|(a, n)| (a.as_str(), *n))
                    .collect();
                let count = |a: &str| counts.get(a).copied().unwrap_or(0);
                text.push_str(&crate::policy::render_gauges(
                    &crate::policy::endpoint_capacities(
                        policies.iter().map(|(n, p)| (n.as_str(), p)),
                        s,
                        crate::auth::replicas(&HostStore),
                        &count,
                    ),
                ));
            }
        }
        text
    }

    fn state(&self) -> Vec<u8> {
        let now_ms = super::now_ms(self);
        let snapshot = store::stored_snapshot();
        let in_flight =
            inflight::by_endpoint(&HostStore, &endpoint_names(&self.config, snapshot.as_ref()));
        let policies = published_policies();
        let backend_policy = match &snapshot {
            Some(s) if !policies.is_empty() => crate::policy::endpoint_report(
                &policies,
                s,
                crate::auth::replicas(&HostStore),
                &in_flight,
            ),
            _ => BTreeMap::new(),
        };
        let state = State {
            api_keys: api_keys(now_ms),
            in_flight,
            backend_policy,
            snapshot: snapshot.map(|s| SnapshotView {
                age_ms: now_ms.saturating_sub(s.generated_at_ms),
                stale: s.is_stale(now_ms, self.config.snapshot_stale_after_ms),
                endpoints: s
                    .pools
                    .iter()
                    .flat_map(|p| p.endpoints.iter())
                    .map(|e| {
                        let fresh =
                            s.endpoint_is_fresh(e, now_ms, self.config.snapshot_stale_after_ms);
                        (e.address.clone(), fresh)
                    })
                    .collect(),
                snapshot: s,
            }),
        };
        serde_json::to_vec(&state).unwrap_or_default()
    }
}

/// The gateway listener's pools' policies (none when unreadable).
fn published_policies() -> Vec<(String, crate::policy::PoolPolicy)> {
    HostStore
        .get(crate::policy::POLICIES_KEY)
        .0
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The endpoints the gateway knows, by in-flight key: the snapshot's and the
/// configurations'.
fn endpoint_names(
    config: &Config,
    snapshot: Option<&Snapshot>,
) -> std::collections::HashMap<u64, String> {
    let listed = snapshot
        .into_iter()
        .flat_map(|s| s.pools.iter())
        .flat_map(|p| p.endpoints.iter())
        .map(|e| e.address.as_str());
    let configured = config
        .pools
        .iter()
        .flat_map(|p| p.endpoints.iter())
        .map(String::as_str);
    inflight::names(&HostStore, listed.chain(configured))
}

/// Each configured API key's limits and use now (the gateway listener lists
/// the keys in shared data; ids only, never digests).
fn api_keys(now_ms: u64) -> Vec<serde_json::Value> {
    let Some(bytes) = HostStore.get(super::auth::KEYS_KEY).0 else {
        return Vec::new();
    };
    let keys: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap_or_default();
    let replicas = crate::auth::replicas(&HostStore);
    keys.into_iter()
        .map(|mut k| {
            let id = k["id"].as_str().unwrap_or_default().to_string();
            let u = crate::auth::quota::read(&HostStore, &id, now_ms);
            k["replicas"] = replicas.into();
            k["used"] = serde_json::json!({
                "requests_this_minute": u.requests,
                "concurrent": u.concurrent,
                "tokens_this_minute": u.tokens_minute,
                "tokens_today": u.tokens_day,
            });
            k
        })
        .collect()
}

#[derive(Serialize)]
struct State {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    api_keys: Vec<serde_json::Value>,
    in_flight: BTreeMap<String, u64>,
    /// Per endpoint of a pool with a backend policy: the applied scope, this
    /// replica's caps and use (docs/backend-policy.md).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    backend_policy: BTreeMap<String, serde_json::Value>,
    snapshot: Option<SnapshotView>,
}

#[derive(Serialize)]
struct SnapshotView {
    age_ms: u64,
    stale: bool,
    /// Endpoint → fresh (scraped recently enough to be trusted).
    endpoints: BTreeMap<String, bool>,
    #[serde(flatten)]
    snapshot: Snapshot,
}

impl Context for ControlStream {}

impl HttpContext for ControlStream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let method = host::request_header(":method").unwrap_or_default();
        let path = host::request_header(":path").unwrap_or_default();
        let route = path.split('?').next().unwrap_or_default();
        match (method.as_str(), route) {
            ("GET", STATE_PATH) => {
                let body = self.state();
                self.send_http_response(
                    200,
                    vec![("content-type", "application/json")],
                    Some(&body),
                );
            }
            (_, STATE_PATH) => reply(self, &ApiError::method_not_allowed(&method, "GET")),
            ("GET", METRICS_PATH)
                if self.config.metrics_token.as_deref().is_some_and(|t| {
                    !ingest::bearer_ok(host::request_header("authorization").as_deref(), t)
                }) =>
            {
                reply(self, &ingest::unauthorized("read the metrics"))
            }
            ("GET", METRICS_PATH) => {
                let body = self.metrics();
                self.send_http_response(
                    200,
                    vec![("content-type", observe::render::CONTENT_TYPE)],
                    Some(body.as_bytes()),
                );
            }
            (_, METRICS_PATH) => reply(self, &ApiError::method_not_allowed(&method, "GET")),
            (_, INGEST_PATH) => {
                let Some(cfg) = &self.config.ingest else {
                    reply(self, &ApiError::not_found(route));
                    return Action::Pause;
                };
                let auth = host::request_header("authorization");
                let length = host::request_header("content-length");
                if let Err(e) = ingest::check_head(cfg, &method, auth.as_deref(), length.as_deref())
                {
                    reply(self, &e);
                } else if end_of_stream {
                    reply(
                        self,
                        &ApiError::invalid_request("invalid_snapshot", "The push has no body."),
                    );
                } else {
                    self.ingesting = true;
                    self.replicas = ingest::parse_replicas(
                        host::request_header(ingest::REPLICAS_HEADER).as_deref(),
                    );
                }
            }
            _ => reply(self, &ApiError::not_found(route)),
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.ingesting {
            return Action::Pause;
        }
        let Some(cfg) = &self.config.ingest else {
            return Action::Pause;
        };
        if body_size > cfg.max_snapshot_bytes {
            self.ingesting = false;
            reply(self, &ApiError::body_too_large(cfg.max_snapshot_bytes));
            return Action::Pause;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.ingesting = false;
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        match store::publish_snapshot(&body) {
            Ok(s) => {
                log::debug!(
                    "inference-gateway: snapshot {}#{} stored ({} endpoints, {} bytes)",
                    s.generated_at_ms,
                    s.sequence,
                    s.endpoint_count(),
                    body.len()
                );
                if let Some(n) = self.replicas {
                    let _ = HostStore.set(crate::auth::REPLICAS_KEY, &n.to_le_bytes(), None);
                }
                self.send_http_response(204, vec![], None);
            }
            Err(e) => {
                log::warn!("inference-gateway: snapshot push rejected: {}", e.message);
                reply(self, &e);
            }
        }
        Action::Pause
    }
}

pub fn reply(ctx: &dyn HttpContext, e: &ApiError) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(e.headers.iter().map(|(k, v)| (*k, v.as_str())));
    ctx.send_http_response(u32::from(e.status), headers, Some(&e.body()));
}
