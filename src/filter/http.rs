//! The gateway's HTTP stream: hold the headers, buffer the body, route, release.

use super::auth::Consumer;
use super::control::reply;
use super::host;
use super::safety::{PendingPrompt, ResponseCheck};
use super::store::{self, HostStore, SnapshotCache};
use crate::config::Config;
use crate::gateway::headers::RequestHeaders;
use crate::gateway::{self, HeadAction, RequestHead, RoutePlan};
use crate::observe::{self, request as obs, request::RequestObs};
use crate::openai::{ApiError, ApiKind};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;

pub use crate::gateway::headers::DESTINATION_HEADER;
/// Response header with the scored candidates, when `scheduling.explain` is on.
pub const EXPLAIN_HEADER: &str = "x-gateway-scheduling";
/// The property (Envoy filter state `wasm.igw`) holding the access-log fields.
pub const ACCESS_LOG_PROPERTY: &str = "igw";

pub struct GatewayStream {
    pub(super) config: Rc<Config>,
    snapshot: Rc<RefCell<SnapshotCache>>,
    rng: fastrand::Rng,
    /// Set once the headers say the body decides the route.
    buffering: Option<ApiKind>,
    /// The request body's size at the last body callback (a body that ends with
    /// trailers is complete at the trailers).
    body_seen: usize,
    /// The in-flight key whose count this stream holds; released exactly once.
    holding: Option<u64>,
    /// The pool has a backend policy: its caps are checked by every worker
    /// against the stored counts, so this release is written at once, never
    /// held back (`store::release_in_flight`).
    capped_pool: bool,
    /// The scheduling decision, for the `x-gateway-scheduling` response header.
    explanation: Option<String>,
    /// Safety: the prompt check in flight (the request waits for it).
    pub(super) prompt_check: Option<PendingPrompt>,
    /// Safety: the response template for this request's model, if responses are screened.
    pub(super) response_template: Option<String>,
    /// Safety: the response check's state once the response started.
    pub(super) response_check: Option<ResponseCheck>,
    request_id: String,
    /// The request headers the gateway reads, from the headers callback.
    pub(super) headers: RequestHeaders,
    /// What the request metrics and the access log record.
    pub(super) obs: RequestObs,
    /// The API key the request presented (`auth`), once identified.
    pub(super) consumer: Option<Consumer>,
    /// The request-metrics series key, formatted once when the request is routed.
    series_key: Option<String>,
}

impl GatewayStream {
    pub fn new(config: Rc<Config>, snapshot: Rc<RefCell<SnapshotCache>>, seed: u64) -> Self {
        GatewayStream {
            config,
            snapshot,
            rng: fastrand::Rng::with_seed(seed),
            buffering: None,
            body_seen: 0,
            holding: None,
            capped_pool: false,
            explanation: None,
            prompt_check: None,
            response_template: None,
            response_check: None,
            request_id: String::from("-"),
            headers: RequestHeaders::default(),
            obs: RequestObs::default(),
            consumer: None,
            series_key: None,
        }
    }

    /// Envoy's `x-request-id`, read with the request headers (it cannot be read
    /// in response-phase callbacks).
    pub(super) fn request_id(&self) -> &str {
        &self.request_id
    }

    pub(super) fn reject(&mut self, e: &ApiError) -> Action {
        self.obs.fail(obs::error_code(e.status, e.code));
        log::info!(
            "inference-gateway: request {} answered {} {}",
            self.request_id(),
            e.status,
            e.code
        );
        reply(self, e);
        Action::Pause
    }

    /// A complete body: plan the route, screen the prompt if configured, forward.
    fn route(&mut self, kind: ApiKind, body: &[u8], body_size: usize) -> Action {
        let mut plan = match gateway::plan_route(
            &self.config,
            kind,
            body,
            self.headers.objective.as_deref(),
            self.rng.u32(..),
        ) {
            Ok(plan) => plan,
            Err(e) => return self.reject(&e),
        };
        // Admission sets priority and profile, never the model: the labels stand.
        self.obs.labels = Some((plan.model.clone(), plan.target_model.clone()));
        if let Err(e) = self.admit(&mut plan) {
            return self.reject(&e);
        }
        self.obs.request_bytes = body_size as u64;
        self.obs.streamed = plan.stream;
        self.obs.priority = Some(plan.priority);
        let config = Rc::clone(&self.config);
        if let Some(safety) = &config.safety {
            self.response_template = safety.response_template(&plan.model).map(str::to_string);
            if let Some(template) = safety.prompt_template(&plan.model) {
                return self.check_prompt(safety, template, plan, body_size);
            }
        }
        match self.forward(&plan, body_size) {
            Ok(()) => Action::Continue,
            Err(e) => self.reject(&e),
        }
    }

    /// Picks the endpoint, takes its in-flight count, rewrites the body if needed
    /// and sets the destination header. The caller continues the request.
    pub(super) fn forward(&mut self, plan: &RoutePlan, body_size: usize) -> Result<(), ApiError> {
        let config = Rc::clone(&self.config);
        let now_ms = super::now_ms(self);
        let members = self.snapshot.borrow_mut().current(&config, now_ms);
        self.capped_pool = config.policy(plan.pool).is_some();
        let exact = config.any_policy();
        if self.capped_pool {
            // Caps are checked against the stored counts: no change held back
            // may make an endpoint look fuller (or emptier) than it is.
            store::flush_counts();
        }
        let draw = self.rng.u32(..);
        let choice = store::with_counts(now_ms, exact, |counts| {
            store::with_prefix_store(now_ms, |prefix_store| {
                gateway::choose(&gateway::Inputs {
                    config: &config,
                    plan,
                    members: &members,
                    store: &HostStore,
                    prefix_store,
                    now_ms,
                    draw,
                    subset: None,
                    counts,
                })
            })
        });
        let choice = match choice {
            Ok(choice) => choice,
            Err(refused) => {
                if refused.shed {
                    super::metrics::inc(&format!(
                        "inference_gateway_shed_total.model_name.{}",
                        super::metrics::label(&plan.model)
                    ));
                } else if refused.error.code == "capacity_exhausted" {
                    if let Some(pool) = config.pools.get(plan.pool) {
                        super::metrics::inc(&format!(
                            "inference_pool_capacity_refused_total.pool_name.{}",
                            super::metrics::label(&pool.name)
                        ));
                    }
                }
                return Err(refused.error);
            }
        };
        if let Some(text) = &choice.explanation {
            log::info!(
                "inference-gateway: request {} model={} priority={} profile={} -> {}: {text}",
                self.request_id(),
                plan.target_model,
                plan.priority,
                config
                    .scheduling
                    .profiles
                    .get(plan.profile)
                    .map_or("", |p| p.name.as_str()),
                choice.endpoint,
            );
        }
        if choice.spilled {
            if let Some(pool) = config.pools.get(plan.pool) {
                super::metrics::inc(&format!(
                    "inference_pool_spill_total.pool_name.{}",
                    super::metrics::label(&pool.name)
                ));
            }
        }
        self.explanation = choice.explanation;
        self.holding = choice.holding;
        self.record_routed(&plan.model, &plan.target_model, &choice.endpoint, now_ms);

        if let Some(new_body) = &plan.new_body {
            self.set_http_request_body(0, body_size, new_body);
            if self.headers.content_length.is_some() {
                self.set_http_request_header("content-length", Some(&new_body.len().to_string()));
            }
        }
        self.set_http_request_header(DESTINATION_HEADER, Some(&choice.destination));
        if let Some(logging) = config.policy(plan.pool).and_then(|p| p.logging.as_ref()) {
            if !crate::policy::log_sampled(Some(logging), self.rng.u32(..)) {
                self.set_http_request_header(
                    crate::policy::ACCESS_LOG_SKIP_HEADER,
                    Some(crate::policy::ACCESS_LOG_SKIP),
                );
            }
        }
        Ok(())
    }

    /// Running gauge and pick count (batched per worker: `store::record_metrics`).
    fn record_routed(&mut self, model: &str, target: &str, endpoint: &str, now_ms: u64) {
        let key = observe::series_key(model, target);
        store::record_metrics(&key, now_ms, 1, |d| obs::apply_routed(d, endpoint));
        self.series_key = Some(key);
        self.obs.running = true;
        self.obs.endpoint = Some(endpoint.to_string());
    }

    /// Among the worker's open requests (`store::metrics_request`): from the
    /// headers of an inference request until its metrics are finished.
    fn metrics_open(&self) -> bool {
        self.obs.started_ns.is_some() && !self.obs.finished
    }

    /// Everything else, once, when the stream ends; then the access-log fields.
    fn record_finished(&mut self) {
        if !self.metrics_open() {
            return;
        }
        self.obs.finished = true;
        store::metrics_request(false);
        let now = super::now_ns();
        // Routed requests formatted their key then; others (refused) do it here.
        let key = self
            .series_key
            .take()
            .unwrap_or_else(|| match &self.obs.labels {
                Some((m, t)) => observe::series_key(m, t),
                None => observe::series_key("", ""),
            });
        let o = &self.obs;
        store::record_metrics(&key, now / 1_000_000, 0, |d| obs::apply_finished(d, o, now));
        let line = obs::access_log_fields(&self.obs, now);
        if let Err(err) =
            proxy_wasm::hostcalls::set_property(vec![ACCESS_LOG_PROPERTY], Some(line.as_bytes()))
        {
            log::debug!("inference-gateway: access-log fields not set: {err:?}");
        }
    }

    /// Response bytes the metrics have not seen yet: TTFT, size, usage.
    fn observe_response_body(&mut self, body_size: usize) {
        if self.obs.started_ns.is_none() || self.obs.error.is_some() {
            return;
        }
        let (start, len) = self.obs.unseen(body_size);
        if len == 0 {
            return;
        }
        let bytes = self.get_http_response_body(start, len).unwrap_or_default();
        self.obs.response_bytes(&bytes, super::now_ns);
    }

    /// Gives back the in-flight count this stream holds. The last open request
    /// of the worker writes the count changes noted, also when it holds none
    /// itself (it never got past its body).
    fn release(&mut self) {
        if let Some(key) = self.holding.take() {
            store::release_in_flight(key, !self.capped_pool);
        } else if self.metrics_open() && !store::others_open(1) {
            store::flush_counts();
        }
    }
}

impl Drop for GatewayStream {
    /// A stream dropped without its log callback is no longer open.
    fn drop(&mut self) {
        if self.metrics_open() {
            store::metrics_request(false);
        }
    }
}

impl Context for GatewayStream {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        self.safety_call_response(token, body_size);
    }

    fn on_done(&mut self) -> bool {
        self.release();
        self.settle_consumer();
        true
    }
}

impl HttpContext for GatewayStream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let Some(headers) = host::request_headers() else {
            // Nothing the gateway reads can be trusted: refuse rather than pass.
            return self.reject(&ApiError::internal("request headers unreadable"));
        };
        self.headers = headers;
        if let Some(id) = self.headers.request_id.take() {
            self.request_id = id;
        }
        // Only the filter picks upstreams: a destination sent by the client must
        // never steer the ORIGINAL_DST cluster, on any path.
        if self.headers.destination {
            self.set_http_request_header(DESTINATION_HEADER, None);
        }
        if let Err(e) = self.identify() {
            return self.reject(&e);
        }
        if ApiKind::from_path(&self.headers.path).is_some_and(|k| k != ApiKind::Models) {
            self.obs.started_ns = Some(super::now_ns());
            store::metrics_request(true);
        }
        let h = &self.headers;
        let head = RequestHead {
            method: &h.method,
            path: &h.path,
            content_type: h.content_type.as_deref(),
            content_length: h.content_length.as_deref(),
            end_of_stream,
        };
        match gateway::on_request_head(&self.config, &head) {
            HeadAction::Pass => Action::Continue,
            HeadAction::Reject(e) => self.reject(&e),
            HeadAction::Respond(body) => {
                self.send_http_response(
                    200,
                    vec![("content-type", "application/json")],
                    Some(&body),
                );
                Action::Pause
            }
            HeadAction::Buffer(kind) => {
                self.buffering = Some(kind);
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(kind) = self.buffering else {
            return Action::Continue;
        };
        if body_size > self.config.max_request_body_bytes {
            self.buffering = None;
            return self.reject(&ApiError::body_too_large(
                self.config.max_request_body_bytes,
            ));
        }
        if !end_of_stream {
            self.body_seen = body_size;
            return Action::Pause;
        }
        self.buffering = None;
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.route(kind, &body, body_size)
    }

    /// A request body that ends with trailers (HTTP/2, gRPC-style clients, chunked
    /// HTTP/1.1) never has a body callback with `end_of_stream`: the body is
    /// complete here. Without this the request would wait until Envoy timed it out.
    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        let Some(kind) = self.buffering.take() else {
            return Action::Continue;
        };
        let size = self.body_seen;
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        self.route(kind, &body, size)
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.obs.started_ns.is_some() && self.obs.error.is_none() {
            let status = host::response_header(":status").and_then(|s| s.parse().ok());
            if let Some(code) = status.and_then(obs::upstream_error_code) {
                self.obs.fail(code);
            }
        }
        if let Some(text) = self.explanation.take() {
            self.set_http_response_header(EXPLAIN_HEADER, Some(&text));
        }
        self.rate_limit_headers();
        self.response_headers_safety(end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.response_check.as_ref().map(|c| c.is_streaming()) {
            // The screener knows which bytes are new; it feeds the metrics itself.
            Some(true) => self.streamed_response_body(body_size, end_of_stream),
            Some(false) => {
                self.observe_response_body(body_size);
                let action = self.buffered_response_body(body_size, end_of_stream);
                // A paused callback leaves its bytes in the buffer for the next one.
                self.obs.held = match action {
                    Action::Pause => body_size,
                    _ => 0,
                };
                action
            }
            None => {
                self.observe_response_body(body_size);
                self.obs.held = 0;
                Action::Continue
            }
        }
    }

    fn on_log(&mut self) {
        self.release();
        self.settle_consumer();
        self.record_finished();
    }
}
