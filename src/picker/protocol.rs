//! The Endpoint Picker Protocol over one ext_proc stream, as a state machine with
//! no I/O: [`Exchange::on_message`] takes each `ProcessingRequest` Envoy sends and
//! returns the `ProcessingResponse`s to send back, so every step is unit-tested
//! with the envoy-types messages themselves.
//!
//! `FULL_DUPLEX_STREAMED` request bodies: the request headers are held (no answer)
//! and the body chunks buffered until the body ends (end of stream, or trailers);
//! then the pick, then the header mutation (destination header, and the same
//! value in dynamic metadata `envoy.lb`), then the body streamed back as
//! `StreamedBodyResponse` chunks, the last one ending the stream unless trailers
//! follow. `BUFFERED` request bodies: the headers are answered at once, the
//! whole body with a header mutation. Response bodies in `FULL_DUPLEX_STREAMED`
//! are echoed chunk by chunk as they come (tokens stream through), observed for
//! the request metrics on the way.
//!
//! The in-flight count the pick took is released when the response ends, or when
//! the [`Exchange`] is dropped (the stream closed, was reset or failed).

use super::safety::{PendingPrompt, Screening};
use crate::extproc::{Picker, RouteRequest, Unrouted};
use crate::gateway::{HeadAction, RequestHead};
use crate::observe;
use crate::observe::request::{self as obs, RequestObs};
use crate::openai::{ApiError, ApiKind};
use crate::routing::OBJECTIVE_HEADER;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request, processing_response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, HttpBody, HttpHeaders, HttpTrailers,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use std::sync::Arc;

/// The header (and `envoy.lb` metadata key) carrying the picked endpoint(s).
pub use crate::gateway::headers::DESTINATION_HEADER;
/// Dynamic metadata namespace of the pick and of the served endpoint.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Filter metadata namespace of the subset hint, and its key.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// The `envoy.lb` key the data plane reports the endpoint that served with.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// Body chunks sent back are at most this long (gRPC messages stay far below
/// the 4 MiB default limit whatever the body size).
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// Most subset hint entries read (a pool is rarely larger; the rest is ignored).
const MAX_SUBSET_ENTRIES: usize = 4096;

// ProcessingMode.BodySendMode values.
const BODY_NONE: i32 = 0;
const BODY_STREAMED: i32 = 1;
const BODY_BUFFERED: i32 = 2;
const BODY_BUFFERED_PARTIAL: i32 = 3;
const BODY_FULL_DUPLEX: i32 = 4;
/// HeaderValueOption.HeaderAppendAction OVERWRITE_IF_EXISTS_OR_ADD.
const OVERWRITE_OR_ADD: i32 = 2;

/// How the data plane sends the request body: learned from the first message's
/// `protocol_config`, else the protocol's `FULL_DUPLEX_STREAMED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    None,
    Buffered,
    FullDuplex,
    /// STREAMED / BUFFERED_PARTIAL: headers go on before the body is whole, so
    /// nothing can route on it.
    Unsupported,
}

impl BodyMode {
    fn from_proto(v: i32) -> BodyMode {
        match v {
            BODY_NONE => BodyMode::None,
            BODY_BUFFERED => BodyMode::Buffered,
            BODY_FULL_DUPLEX => BodyMode::FullDuplex,
            BODY_STREAMED | BODY_BUFFERED_PARTIAL => BodyMode::Unsupported,
            _ => BodyMode::Unsupported,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for the request headers.
    Start,
    /// An inference request: body chunks are being held.
    Collecting(ApiKind),
    /// The body is whole and its prompt is being screened.
    Screening,
    /// Routed, or not an inference request: request messages pass through.
    Forwarded,
    /// An ImmediateResponse was sent: Envoy ignores anything more.
    Answered,
}

/// Where the clock and the random numbers come from (the tests fix them).
pub struct Env {
    /// Unix time in nanoseconds.
    pub now_ns: Box<dyn Fn() -> u64 + Send + Sync>,
    pub rng: fastrand::Rng,
}

impl Env {
    pub fn system(seed: u64) -> Env {
        Env {
            now_ns: Box::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            }),
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

/// One ext_proc stream: one HTTP request and its response.
pub struct Exchange {
    pub(super) picker: Arc<Picker>,
    pub(super) env: Env,
    request_mode: BodyMode,
    pub(super) response_mode: BodyMode,
    pub(super) phase: Phase,
    objective: Option<String>,
    subset: Option<Vec<String>>,
    held: Vec<u8>,
    /// The endpoint whose in-flight count this request holds.
    holding: Option<String>,
    pub(super) obs: RequestObs,
    /// Prompt and response checks (`super::safety`).
    pub(super) screening: Screening,
    /// The series key the request's metrics go to, once the model is known.
    series: Option<String>,
    response_ended: bool,
}

impl Exchange {
    pub fn new(picker: Arc<Picker>, env: Env) -> Exchange {
        Exchange {
            picker,
            env,
            request_mode: BodyMode::FullDuplex,
            response_mode: BodyMode::FullDuplex,
            phase: Phase::Start,
            objective: None,
            subset: None,
            held: Vec::new(),
            holding: None,
            obs: RequestObs::default(),
            series: None,
            response_ended: false,
            screening: Screening::default(),
        }
    }

    /// The endpoint whose in-flight count this stream holds, if any.
    pub fn holding(&self) -> Option<&str> {
        self.holding.as_deref()
    }

    /// What to answer `msg` with (possibly nothing yet, possibly several messages).
    pub fn on_message(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if let Some(pc) = &msg.protocol_config {
            self.request_mode = BodyMode::from_proto(pc.request_body_mode);
            self.response_mode = BodyMode::from_proto(pc.response_body_mode);
        }
        if msg.observability_mode {
            // Responses would be ignored; nothing to route.
            return Vec::new();
        }
        let metadata = msg.metadata_context.as_ref();
        let Some(request) = msg.request else {
            return Vec::new();
        };
        if self.phase == Phase::Answered {
            return Vec::new();
        }
        use processing_request::Request as R;
        match request {
            R::RequestHeaders(h) => self.request_headers(&h, metadata),
            R::RequestBody(b) => self.request_body(b),
            R::RequestTrailers(t) => self.request_trailers(&t),
            R::ResponseHeaders(h) => self.response_headers(&h, metadata),
            R::ResponseBody(b) => self.response_body(b),
            R::ResponseTrailers(_) => {
                self.end_response();
                self.screen_response_trailers().unwrap_or_else(|| {
                    vec![respond(processing_response::Response::ResponseTrailers(
                        TrailersResponse::default(),
                    ))]
                })
            }
        }
    }

    fn now_ns(&self) -> u64 {
        (self.env.now_ns)()
    }

    fn request_headers(
        &mut self,
        h: &HttpHeaders,
        metadata: Option<&Metadata>,
    ) -> Vec<ProcessingResponse> {
        if self.phase != Phase::Start {
            return vec![self.fail(ApiError::internal("request headers twice on one stream"))];
        }
        self.subset = subset_hint(metadata);
        let method = header(h, ":method").unwrap_or_default();
        let path = header(h, ":path").unwrap_or_default();
        let content_type = header(h, "content-type");
        let content_length = header(h, "content-length");
        self.objective = header(h, OBJECTIVE_HEADER);
        let head = RequestHead {
            method: &method,
            path: &path,
            content_type: content_type.as_deref(),
            content_length: content_length.as_deref(),
            end_of_stream: h.end_of_stream,
        };
        let action = self.picker.head(&head);
        // A client must never choose the upstream itself.
        let strip = || headers_response(vec![], vec![DESTINATION_HEADER.into()]);
        match action {
            HeadAction::Pass => {
                self.phase = Phase::Forwarded;
                vec![strip()]
            }
            HeadAction::Reject(e) => {
                self.obs.started_ns = Some(self.now_ns());
                vec![self.fail(e)]
            }
            HeadAction::Respond(body) => {
                self.phase = Phase::Answered;
                vec![immediate(200, body, &[], "models_list")]
            }
            HeadAction::Buffer(kind) => {
                self.obs.started_ns = Some(self.now_ns());
                match self.request_mode {
                    BodyMode::FullDuplex => {
                        self.phase = Phase::Collecting(kind);
                        Vec::new() // held until the body is whole
                    }
                    BodyMode::Buffered => {
                        self.phase = Phase::Collecting(kind);
                        vec![strip()]
                    }
                    BodyMode::None | BodyMode::Unsupported => vec![self.fail(ApiError::internal(
                        "the endpoint picker needs request_body_mode FULL_DUPLEX_STREAMED (or BUFFERED)",
                    ))],
                }
            }
        }
    }

    fn request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        match self.phase {
            Phase::Collecting(kind) => {
                let limit = self.picker.config.max_request_body_bytes;
                if self.held.len().saturating_add(b.body.len()) > limit {
                    return vec![self.fail(ApiError::body_too_large(limit))];
                }
                self.held.extend_from_slice(&b.body);
                if self.request_mode == BodyMode::Buffered {
                    // The whole body in one message (trailers may still follow).
                    return self.route(kind, false, false);
                }
                if b.end_of_stream {
                    self.route(kind, true, false)
                } else {
                    Vec::new()
                }
            }
            Phase::Forwarded => match self.request_mode {
                BodyMode::FullDuplex => vec![streamed_body(true, b.body, b.end_of_stream)],
                _ => vec![respond(processing_response::Response::RequestBody(
                    BodyResponse::default(),
                ))],
            },
            Phase::Start => vec![self.fail(ApiError::internal("a request body before headers"))],
            // The body ended already; nothing more can come.
            Phase::Screening | Phase::Answered => Vec::new(),
        }
    }

    fn request_trailers(&mut self, _t: &HttpTrailers) -> Vec<ProcessingResponse> {
        let trailers = respond(processing_response::Response::RequestTrailers(
            TrailersResponse::default(),
        ));
        match self.phase {
            // The body ended with trailers: it is whole now (the trailers are
            // answered after the pick).
            Phase::Collecting(kind) => self.route(kind, false, true),
            Phase::Forwarded => vec![trailers],
            Phase::Start => vec![self.fail(ApiError::internal("request trailers before headers"))],
            Phase::Screening | Phase::Answered => Vec::new(),
        }
    }

    /// The body is whole: plan, screen the prompt if the model asks for it, pick,
    /// then answer as the body mode requires. `ends_stream`: no trailers follow
    /// (the last chunk sent back ends the body); `trailers`: the request's
    /// trailers are answered after the pick.
    fn route(
        &mut self,
        kind: ApiKind,
        ends_stream: bool,
        trailers: bool,
    ) -> Vec<ProcessingResponse> {
        let body = std::mem::take(&mut self.held);
        self.obs.request_bytes = body.len() as u64;
        let request = RouteRequest {
            kind,
            body: &body,
            objective: self.objective.as_deref(),
            subset: None,
            now_ms: 0,
        };
        let plan = match self.picker.plan(&request, self.env.rng.u32(..)) {
            Ok(plan) => plan,
            Err(unrouted) => return self.unrouted(*unrouted),
        };
        // Blocked or failed requests count against the model they named.
        self.series = Some(observe::series_key(&plan.model, &plan.target_model));
        self.obs.labels = Some((plan.model.clone(), plan.target_model.clone()));
        let safety = self.picker.config.safety.as_ref();
        self.screening.response_template = safety
            .and_then(|s| s.response_template(&plan.model))
            .map(str::to_string);
        let prompt_template = safety
            .and_then(|s| s.prompt_template(&plan.model))
            .map(str::to_string);
        let pending = PendingPrompt::new(plan, body, ends_stream, trailers);
        match prompt_template {
            Some(t) => self.check_prompt(&t, pending),
            None => self.forward(pending),
        }
    }

    fn unrouted(&mut self, unrouted: Unrouted) -> Vec<ProcessingResponse> {
        let Unrouted { labels, error } = unrouted;
        if let Some((m, t)) = labels {
            self.series = Some(observe::series_key(&m, &t));
            self.obs.labels = Some((m, t));
        }
        vec![self.fail(error)]
    }

    /// Picks for a planned (and screened) request and lets it go on.
    pub(super) fn forward(&mut self, p: PendingPrompt) -> Vec<ProcessingResponse> {
        let PendingPrompt {
            plan,
            body,
            ends_stream,
            trailers,
            ..
        } = p;
        let now_ms = self.now_ns() / 1_000_000;
        let draw = self.env.rng.u32(..);
        let routed = match self
            .picker
            .pick(&plan, self.subset.as_deref(), now_ms, draw)
        {
            Ok(r) => r,
            Err(unrouted) => return self.unrouted(*unrouted),
        };
        self.phase = Phase::Forwarded;
        self.holding = routed.holding.clone();
        self.obs.priority = Some(routed.priority);
        self.obs.endpoint = Some(routed.destination.clone());
        self.obs.running = true;
        let key = observe::series_key(&routed.model, &routed.target_model);
        let endpoint = routed.holding.clone().unwrap_or_default();
        let _ = observe::update(self.picker.store(), &key, |s| {
            obs::apply_routed(s, &endpoint)
        });
        self.series = Some(key);
        self.obs.labels = Some((routed.model, routed.target_model));

        let rewritten = routed.new_body.is_some();
        let body = routed.new_body.unwrap_or(body);
        let mut set = vec![set_header(DESTINATION_HEADER, &routed.destination)];
        if routed.log_skipped {
            set.push(set_header(
                crate::policy::ACCESS_LOG_SKIP_HEADER,
                crate::policy::ACCESS_LOG_SKIP,
            ));
        }
        let mut remove = Vec::new();
        let metadata = Some(destination_metadata(&routed.destination));
        let mut out = match self.request_mode {
            BodyMode::Buffered => {
                if rewritten {
                    set.push(set_header("content-length", &body.len().to_string()));
                }
                let mut r = respond(processing_response::Response::RequestBody(BodyResponse {
                    response: Some(CommonResponse {
                        header_mutation: Some(HeaderMutation {
                            set_headers: set,
                            remove_headers: remove,
                        }),
                        body_mutation: rewritten.then_some(BodyMutation {
                            mutation: Some(body_mutation::Mutation::Body(body)),
                        }),
                        ..Default::default()
                    }),
                }));
                r.dynamic_metadata = metadata;
                vec![r]
            }
            _ => {
                // Envoy drops content-length for streamed bodies anyway; a
                // rewritten body must never travel under the old length.
                if rewritten {
                    remove.push("content-length".into());
                }
                let mut headers = headers_response(set, remove);
                headers.dynamic_metadata = metadata;
                let mut out = vec![headers];
                out.extend(chunks(body, ends_stream));
                out
            }
        };
        if trailers {
            out.push(respond(processing_response::Response::RequestTrailers(
                TrailersResponse::default(),
            )));
        }
        out
    }

    fn response_headers(
        &mut self,
        h: &HttpHeaders,
        metadata: Option<&Metadata>,
    ) -> Vec<ProcessingResponse> {
        if let Some(served) = served_endpoint(metadata) {
            self.served(&served);
        }
        let status = header(h, ":status").and_then(|s| s.trim().parse::<u16>().ok());
        if let Some(code) = status.and_then(obs::upstream_error_code) {
            self.obs.fail(code);
        }
        self.obs.streamed = header(h, "content-type")
            .is_some_and(|ct| ct.to_ascii_lowercase().contains("text/event-stream"));
        if h.end_of_stream {
            self.end_response();
        }
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        self.screen_response_headers(ok, h.end_of_stream)
            .unwrap_or_else(|| vec![response_headers_response(Vec::new())])
    }

    /// The data plane reports which endpoint served (a fallback, after a retry):
    /// the in-flight count moves there.
    fn served(&mut self, served: &str) {
        let Some(held) = self.holding.as_deref() else {
            return;
        };
        if held == served || self.response_ended {
            return;
        }
        let Ok(addr) = served.parse::<std::net::SocketAddr>() else {
            return;
        };
        let served = addr.to_string();
        // Only members of the pool carry counts the scheduler reads.
        if !self.picker.members().addresses().any(|a| a == served) {
            return;
        }
        if self.picker.take(&served) {
            self.picker.release(held);
            self.holding = Some(served);
        }
    }

    fn response_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        let now = self.now_ns();
        self.obs.response_bytes(&b.body, || now);
        let end = b.end_of_stream;
        let out = if self.screening_response() {
            self.screen_response_body(b.body, end)
        } else {
            vec![match self.response_mode {
                BodyMode::FullDuplex => streamed_body(false, b.body, end),
                _ => respond(processing_response::Response::ResponseBody(
                    BodyResponse::default(),
                )),
            }]
        };
        if end {
            self.end_response();
        }
        out
    }

    /// Answers with the error now (an ImmediateResponse in the OpenAI shape).
    pub(super) fn fail(&mut self, e: ApiError) -> ProcessingResponse {
        self.phase = Phase::Answered;
        self.held = Vec::new();
        self.obs.fail(obs::error_code(e.status, e.code));
        self.end_response();
        let headers: Vec<(&str, String)> = e.headers.iter().map(|(k, v)| (*k, v.clone())).collect();
        immediate(e.status, e.body(), &headers, e.code)
    }

    /// The response is over (or never comes): counts and metrics are final.
    pub(super) fn end_response(&mut self) {
        if self.response_ended {
            return;
        }
        self.response_ended = true;
        if let Some(e) = self.holding.take() {
            self.picker.release(&e);
        }
        if self.obs.started_ns.is_some() && !self.obs.finished {
            self.obs.finished = true;
            let now = self.now_ns();
            let key = self
                .series
                .clone()
                .unwrap_or_else(|| observe::series_key("", ""));
            let obs = &self.obs;
            let _ = observe::update(self.picker.store(), &key, |s| {
                obs::apply_finished(s, obs, now)
            });
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Reset, gRPC error, Envoy closing early: the count goes back all the same.
        self.end_response();
    }
}

pub(super) fn respond(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn headers_response(set: Vec<HeaderValueOption>, remove: Vec<String>) -> ProcessingResponse {
    respond(processing_response::Response::RequestHeaders(
        HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers: set,
                    remove_headers: remove,
                }),
                ..Default::default()
            }),
        },
    ))
}

pub(super) fn streamed_body(
    request: bool,
    body: Vec<u8>,
    end_of_stream: bool,
) -> ProcessingResponse {
    let b = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    };
    respond(if request {
        processing_response::Response::RequestBody(b)
    } else {
        processing_response::Response::ResponseBody(b)
    })
}

/// The held request body sent back in chunks; the last ends the stream when
/// `ends_stream`.
fn chunks(body: Vec<u8>, ends_stream: bool) -> Vec<ProcessingResponse> {
    body_chunks(true, body, ends_stream)
}

/// The same for a held response body.
pub(super) fn response_chunks(body: Vec<u8>, ends_stream: bool) -> Vec<ProcessingResponse> {
    body_chunks(false, body, ends_stream)
}

fn body_chunks(request: bool, body: Vec<u8>, ends_stream: bool) -> Vec<ProcessingResponse> {
    if body.is_empty() {
        return vec![streamed_body(request, Vec::new(), ends_stream)];
    }
    let n = body.len().div_ceil(MAX_CHUNK_BYTES);
    body.chunks(MAX_CHUNK_BYTES)
        .enumerate()
        .map(|(i, c)| streamed_body(request, c.to_vec(), ends_stream && i + 1 == n))
        .collect()
}

/// The answer to the response headers, removing `remove`.
pub(super) fn response_headers_response(remove: Vec<String>) -> ProcessingResponse {
    respond(processing_response::Response::ResponseHeaders(
        HeadersResponse {
            response: (!remove.is_empty()).then(|| CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers: Vec::new(),
                    remove_headers: remove,
                }),
                ..Default::default()
            }),
        },
    ))
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: OVERWRITE_OR_ADD,
        ..Default::default()
    }
}

/// An ImmediateResponse with a JSON body (`code` goes to Envoy's response details).
fn immediate(
    status: u16,
    body: Vec<u8>,
    headers: &[(&str, String)],
    code: &str,
) -> ProcessingResponse {
    let mut set_headers = vec![set_header("content-type", "application/json")];
    set_headers.extend(headers.iter().map(|(k, v)| set_header(k, v)));
    respond(processing_response::Response::ImmediateResponse(
        ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(HeaderMutation {
                set_headers,
                ..Default::default()
            }),
            body,
            // Details must be a single token for Envoy's %RESPONSE_CODE_DETAILS%.
            details: format!(
                "endpoint_picker_{}",
                code.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_")
            ),
            ..Default::default()
        },
    ))
}

/// `envoy.lb: {x-gateway-destination-endpoint: <value>}`.
fn destination_metadata(value: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_HEADER.to_string(), string_value(value))].into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// A header's value (raw_value preferred, as Envoy sends it), by lower-case name.
pub fn header(h: &HttpHeaders, name: &str) -> Option<String> {
    h.headers.as_ref().and_then(|m| map_header(m, name))
}

fn map_header(m: &HeaderMap, name: &str) -> Option<String> {
    m.headers.iter().find_map(|v| {
        v.key.eq_ignore_ascii_case(name).then(|| {
            if v.raw_value.is_empty() {
                v.value.clone()
            } else {
                String::from_utf8_lossy(&v.raw_value).into_owned()
            }
        })
    })
}

/// The subset hint: `filter_metadata["envoy.lb.subset_hint"]["x-gateway-destination-endpoint-subset"]`,
/// a list of `ip:port` strings (one comma-separated string is accepted too).
/// `None` when absent: pick from the whole pool.
pub fn subset_hint(metadata: Option<&Metadata>) -> Option<Vec<String>> {
    let value = metadata?
        .filter_metadata
        .get(SUBSET_NAMESPACE)?
        .fields
        .get(SUBSET_KEY)?;
    let mut out = Vec::new();
    let mut push = |s: &str| {
        for part in s.split(',') {
            let part = part.trim();
            if !part.is_empty() && out.len() < MAX_SUBSET_ENTRIES {
                out.push(part.to_string());
            }
        }
    };
    match &value.kind {
        Some(Kind::ListValue(ListValue { values })) => {
            for v in values {
                if let Some(Kind::StringValue(s)) = &v.kind {
                    push(s);
                }
            }
        }
        Some(Kind::StringValue(s)) => push(s),
        // Present but unreadable: an empty subset (nothing is eligible, a 503),
        // never the whole pool the data plane asked us not to use.
        _ => {}
    }
    Some(out)
}

/// `filter_metadata["envoy.lb"]["x-gateway-destination-endpoint-served"]`.
pub fn served_endpoint(metadata: Option<&Metadata>) -> Option<String> {
    let v = metadata?
        .filter_metadata
        .get(LB_NAMESPACE)?
        .fields
        .get(SERVED_KEY)?;
    match &v.kind {
        Some(Kind::StringValue(s)) => Some(s.split(',').next()?.trim().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
