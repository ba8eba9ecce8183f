//! Prompt and response screening in the endpoint picker, with the filter's
//! semantics (`crate::safety`, docs/safety.md) over ext_proc instead of Envoy's
//! buffers. Still no I/O: the [`Exchange`] queues [`SafetyCall`]s, the server
//! sends them and hands each answer back through [`Exchange::on_verdict`].
//!
//! - The prompt: the request stays held (its headers unanswered) until every call
//!   on its text passed; a block or an unavailable service (unless `fail_open`)
//!   is an `ImmediateResponse` and no model server sees the request.
//! - A non-streamed response, `FULL_DUPLEX_STREAMED`: its headers stay
//!   unanswered and its chunks held until the whole text passed; a block replaces
//!   it with the error (an `ImmediateResponse`). `BUFFERED`: the same on the one
//!   body message.
//! - A streamed (SSE) response, `FULL_DUPLEX_STREAMED`: the headers go on at once,
//!   chunks are held and released as [`StreamScreen`] allows (hold or detect
//!   mode); a block sends what passed, then the error event, and drops the rest.
//!   `BUFFERED`: screened whole like a non-streamed one.

use super::protocol::{self, BodyMode, Exchange, Phase};
use crate::gateway::RoutePlan;
use crate::observe::request as obs;
use crate::openai::ApiError;
use crate::safety::stream::{CheckText, StreamScreen};
use crate::safety::{self, text, Check, Safety, Verdict};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_response, ProcessingResponse, TrailersResponse,
};

/// One callout to the safety service: `POST {safety_url}{path}` with `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyCall {
    pub id: u32,
    pub path: String,
    pub body: Vec<u8>,
}

/// The screening state of one exchange.
#[derive(Default)]
pub(super) struct Screening {
    /// Calls to send (drained by [`Exchange::take_calls`]).
    queued: Vec<SafetyCall>,
    next_id: u32,
    prompt: Option<PendingPrompt>,
    /// The response template of the routed model, until the response headers.
    pub(super) response_template: Option<String>,
    response: Option<ResponseCheck>,
}

/// A planned request waiting for its pick (and, under a prompt check, for the
/// check's calls to pass).
pub(super) struct PendingPrompt {
    calls: Vec<u32>,
    pub(super) plan: RoutePlan,
    pub(super) body: Vec<u8>,
    pub(super) ends_stream: bool,
    pub(super) trailers: bool,
}

impl PendingPrompt {
    pub(super) fn new(plan: RoutePlan, body: Vec<u8>, ends_stream: bool, trailers: bool) -> Self {
        PendingPrompt {
            calls: Vec::new(),
            plan,
            body,
            ends_stream,
            trailers,
        }
    }
}

struct ResponseCheck {
    template: String,
    mode: Mode,
}

enum Mode {
    /// A whole body screened at its end: `held` (FULL_DUPLEX: the headers are
    /// unanswered too), `calls` in flight once the text is known.
    Whole {
        held: Vec<u8>,
        sse: bool,
        calls: Vec<u32>,
        /// The body ended: the calls (if any) went out.
        ended: bool,
        /// Trailers ended the body: answer them after the body.
        trailers: bool,
    },
    Stream(Box<StreamState>),
}

struct StreamState {
    screen: StreamScreen,
    /// Calls in flight: (call id, screener id).
    calls: Vec<(u32, u32)>,
    /// Received, not yet sent on; `held[0]` is at stream offset `sent`.
    held: Vec<u8>,
    sent: u64,
    eos: bool,
    /// Trailers arrived: answer them once the body is out.
    trailers: bool,
    /// Nothing more goes out from here: the error event went out (the rest is
    /// dropped), or the whole stream did.
    finished: bool,
    error: Option<ApiError>,
}

impl Exchange {
    fn safety(&self) -> Option<&Safety> {
        self.picker.config.safety.as_ref()
    }

    /// The safety calls to send now.
    pub fn take_calls(&mut self) -> Vec<SafetyCall> {
        std::mem::take(&mut self.screening.queued)
    }

    /// Whether a streamed response is being screened (its hold window needs
    /// [`Exchange::on_tick`] now and then).
    pub fn wants_tick(&self) -> bool {
        matches!(&self.screening.response, Some(ResponseCheck { mode: Mode::Stream(st), .. }) if !st.finished && !st.eos)
    }

    fn count(&self, name: &str, check: Check, by: u64) {
        self.picker
            .count(&format!("{name}{{check=\"{}\"}}", check.label()), by);
    }

    fn queue(&mut self, check: Check, template: &str, text: &str) -> u32 {
        self.count("inference_gateway_safety_checks_total", check, 1);
        let id = self.screening.next_id;
        self.screening.next_id = id.wrapping_add(1);
        let (path, body) = safety::request(check, template, text);
        self.screening.queued.push(SafetyCall { id, path, body });
        id
    }

    /// Screens the prompt of a planned request; routes it once it passed.
    pub(super) fn check_prompt(
        &mut self,
        template: &str,
        pending: PendingPrompt,
    ) -> Vec<ProcessingResponse> {
        let Some(safety) = self.picker.config.safety.clone() else {
            return self.forward(pending);
        };
        let plan = &pending.plan;
        self.obs.media_parts = plan.media_parts;
        if plan.media_parts > 0 {
            // Passed, not screened: counted.
            self.count(
                "inference_gateway_safety_unscreened_media_total",
                Check::Prompt,
                u64::from(plan.media_parts),
            );
        }
        let pieces = match safety::prompt_calls(
            &safety,
            &plan.prompt,
            plan.token_ids,
            plan.kind.prompt_field(),
        ) {
            Ok(p) => p,
            Err(e) => return vec![self.fail(e)],
        };
        let calls: Vec<u32> = pieces
            .into_iter()
            .map(|p| self.queue(Check::Prompt, template, p))
            .collect();
        if calls.is_empty() {
            self.obs.safety_prompt = Some("pass");
            return self.forward(pending);
        }
        self.phase = Phase::Screening;
        self.screening.prompt = Some(PendingPrompt { calls, ..pending });
        Vec::new()
    }

    /// A safety call's answer (`status` `None`: it failed or timed out).
    pub fn on_verdict(
        &mut self,
        id: u32,
        status: Option<u16>,
        body: &[u8],
    ) -> Vec<ProcessingResponse> {
        if self.phase == Phase::Answered {
            return Vec::new();
        }
        if let Some(p) = &mut self.screening.prompt {
            if let Some(i) = p.calls.iter().position(|&c| c == id) {
                p.calls.swap_remove(i);
                let done = p.calls.is_empty();
                if let Err(e) = self.outcome(Check::Prompt, status, body) {
                    self.screening.prompt = None;
                    return vec![self.fail(e)];
                }
                if !done {
                    return Vec::new();
                }
                let Some(p) = self.screening.prompt.take() else {
                    return Vec::new();
                };
                if self.obs.safety_prompt.is_none() {
                    self.obs.safety_prompt = Some("pass");
                }
                return self.forward(p);
            }
        }
        let Some(mut check) = self.screening.response.take() else {
            return Vec::new();
        };
        let out = match &mut check.mode {
            Mode::Whole { calls, .. } => match calls.iter().position(|&c| c == id) {
                None => Vec::new(),
                Some(i) => {
                    calls.swap_remove(i);
                    let done = calls.is_empty();
                    match self.outcome(Check::Response, status, body) {
                        Err(e) => return vec![self.fail(e)],
                        Ok(()) if done => return self.release_whole(check),
                        Ok(()) => Vec::new(),
                    }
                }
            },
            Mode::Stream(st) => match st.calls.iter().position(|&(c, _)| c == id) {
                None => Vec::new(),
                Some(i) => {
                    let (_, screen_id) = st.calls.swap_remove(i);
                    match self.outcome(Check::Response, status, body) {
                        Ok(()) => st.screen.pass(screen_id),
                        Err(e) => {
                            st.error.get_or_insert(e);
                            st.screen.block();
                        }
                    }
                    let more = st.screen.poll(self.now_ms());
                    self.stream_calls(&check.template, st, more);
                    self.settle(st)
                }
            },
        };
        self.screening.response = Some(check);
        out
    }

    /// Time passed: a hold window may be due.
    pub fn on_tick(&mut self) -> Vec<ProcessingResponse> {
        let Some(mut check) = self.screening.response.take() else {
            return Vec::new();
        };
        let out = match &mut check.mode {
            Mode::Stream(st) if !st.finished => {
                let calls = st.screen.poll(self.now_ms());
                self.stream_calls(&check.template, st, calls);
                self.settle(st)
            }
            _ => Vec::new(),
        };
        self.screening.response = Some(check);
        out
    }

    fn now_ms(&self) -> u64 {
        (self.env.now_ns)() / 1_000_000
    }

    /// Reads one answer: `Ok` to go on (passed, or failed open), or the error.
    fn outcome(&mut self, check: Check, status: Option<u16>, body: &[u8]) -> Result<(), ApiError> {
        let Some(safety) = self.safety() else {
            return Ok(());
        };
        let (fail_open, block_status) = (safety.fail_open, safety.block_status);
        let verdict = |s: &mut Exchange, v: &'static str| match check {
            Check::Prompt => s.obs.safety_prompt = Some(v),
            Check::Response => s.obs.safety_response = Some(v),
        };
        match safety::verdict(status, body) {
            Ok(Verdict::Pass) => Ok(()),
            Ok(Verdict::Block(filters)) => {
                verdict(self, "blocked");
                for f in filters
                    .iter()
                    .map(String::as_str)
                    .chain(filters.is_empty().then_some("unknown"))
                {
                    self.picker.count(
                        &format!(
                            "inference_gateway_safety_blocks_total{{check=\"{}\",filter=\"{}\"}}",
                            check.label(),
                            crate::observe::render::esc(f)
                        ),
                        1,
                    );
                }
                // The filters' names, never the text.
                tracing::info!(check = check.label(), filters = ?filters, "blocked by safety filters");
                Err(safety::blocked_error(check, &filters, block_status))
            }
            Err(failure) => {
                self.count("inference_gateway_safety_failures_total", check, 1);
                tracing::warn!(
                    check = check.label(),
                    fail_open,
                    "safety check failed: the safety service {failure}"
                );
                if fail_open {
                    verdict(self, "fail_open");
                    self.count("inference_gateway_safety_fail_open_total", check, 1);
                    Ok(())
                } else {
                    verdict(self, "unavailable");
                    Err(safety::unavailable_error(check, &failure))
                }
            }
        }
    }

    /// The response headers of a routed request: starts the response check when
    /// the model has a response template. `None`: nothing to screen here, answer
    /// the headers as usual; `Some(out)`: what to send instead.
    pub(super) fn screen_response_headers(
        &mut self,
        ok_status: bool,
        end_of_stream: bool,
    ) -> Option<Vec<ProcessingResponse>> {
        let template = self.screening.response_template.take()?;
        if !ok_status || end_of_stream {
            return None; // errors and empty bodies have nothing to screen
        }
        let sse = self.obs.streamed;
        let mode = match self.response_mode {
            BodyMode::FullDuplex if sse => {
                let safety = self.safety()?;
                Mode::Stream(Box::new(StreamState {
                    screen: StreamScreen::new(safety.stream),
                    calls: Vec::new(),
                    held: Vec::new(),
                    sent: 0,
                    eos: false,
                    trailers: false,
                    finished: false,
                    error: None,
                }))
            }
            BodyMode::FullDuplex | BodyMode::Buffered => Mode::Whole {
                held: Vec::new(),
                sse,
                calls: Vec::new(),
                ended: false,
                trailers: false,
            },
            BodyMode::None | BodyMode::Unsupported => {
                // The body would pass unseen: refused, never skipped.
                return Some(vec![self.fail(ApiError::internal(
                    "the endpoint picker screens responses only with response_body_mode FULL_DUPLEX_STREAMED or BUFFERED",
                ))]);
            }
        };
        let out = match (&mode, self.response_mode) {
            // Held until the text passed (a block replaces the whole response).
            (Mode::Whole { .. }, BodyMode::FullDuplex) => Vec::new(),
            // Chunks are held and edited (the ending may be ours): no known length.
            (Mode::Stream(_), _) => vec![protocol::response_headers_response(vec![
                "content-length".into(),
            ])],
            _ => vec![protocol::response_headers_response(Vec::new())],
        };
        self.screening.response = Some(ResponseCheck { template, mode });
        Some(out)
    }

    /// Whether the response is under a check.
    pub(super) fn screening_response(&self) -> bool {
        self.screening.response.is_some()
    }

    /// A response body message under a check ([`Exchange::screening_response`]).
    pub(super) fn screen_response_body(
        &mut self,
        body: Vec<u8>,
        end_of_stream: bool,
    ) -> Vec<ProcessingResponse> {
        let Some(mut check) = self.screening.response.take() else {
            return Vec::new();
        };
        let out = match &mut check.mode {
            Mode::Whole { held, ended, .. } => {
                let limit = self.safety().map_or(usize::MAX, |s| s.max_response_bytes);
                if held.len().saturating_add(body.len()) > limit {
                    // Never passed on unscreened, whatever fail_open says.
                    return vec![self.fail(safety::response_too_large())];
                }
                held.extend_from_slice(&body);
                // BUFFERED: the one body message is the whole body.
                if end_of_stream || self.response_mode == BodyMode::Buffered {
                    *ended = true;
                    return self.screen_whole(check);
                }
                Vec::new()
            }
            Mode::Stream(st) => {
                if st.finished {
                    // After the error event: dropped, the stream ends with upstream's.
                    vec![protocol::streamed_body(false, Vec::new(), end_of_stream)]
                } else {
                    let now = self.now_ms();
                    let mut calls = st.screen.feed(&body, now);
                    st.held.extend_from_slice(&body);
                    if end_of_stream {
                        st.eos = true;
                        calls.extend(st.screen.finish(now));
                    }
                    self.stream_calls(&check.template, st, calls);
                    self.settle(st)
                }
            }
        };
        self.screening.response = Some(check);
        out
    }

    /// Response trailers under a check: they end the body. `None`: no check.
    pub(super) fn screen_response_trailers(&mut self) -> Option<Vec<ProcessingResponse>> {
        let mut check = self.screening.response.take()?;
        let out = match &mut check.mode {
            Mode::Whole {
                ended, trailers, ..
            } => {
                *trailers = true;
                if *ended {
                    Vec::new() // the check is running; trailers follow its outcome
                } else {
                    *ended = true;
                    return Some(self.screen_whole(check));
                }
            }
            Mode::Stream(st) => {
                st.trailers = true;
                if st.finished {
                    vec![trailers_response()]
                } else {
                    st.eos = true;
                    let calls = st.screen.finish(self.now_ms());
                    self.stream_calls(&check.template, st, calls);
                    self.settle(st)
                }
            }
        };
        self.screening.response = Some(check);
        Some(out)
    }

    /// A whole response body is in: send its calls, or release it at once.
    fn screen_whole(&mut self, mut check: ResponseCheck) -> Vec<ProcessingResponse> {
        let Some(safety) = self.picker.config.safety.clone() else {
            return self.release_whole(check);
        };
        let Mode::Whole { held, sse, .. } = &check.mode else {
            return Vec::new();
        };
        let text = if *sse {
            event_stream_text(held)
        } else {
            text::response_text(held)
        };
        let pieces = match safety::response_calls(&safety, &text) {
            Ok(p) => p,
            Err(e) => return vec![self.fail(e)],
        };
        let ids: Vec<u32> = pieces
            .into_iter()
            .map(|p| self.queue(Check::Response, &check.template, p))
            .collect();
        if ids.is_empty() {
            return self.release_whole(check);
        }
        if let Mode::Whole { calls, .. } = &mut check.mode {
            *calls = ids;
        }
        self.screening.response = Some(check);
        Vec::new()
    }

    /// A whole response passed: it goes on as it came.
    fn release_whole(&mut self, check: ResponseCheck) -> Vec<ProcessingResponse> {
        if self.obs.safety_response.is_none() {
            self.obs.safety_response = Some("pass");
        }
        let Mode::Whole { held, trailers, .. } = check.mode else {
            return Vec::new();
        };
        self.end_response();
        let mut out = Vec::new();
        if self.response_mode == BodyMode::FullDuplex {
            out.push(protocol::response_headers_response(Vec::new()));
            out.extend(protocol::response_chunks(held, !trailers));
        } else {
            out.push(protocol::respond(
                processing_response::Response::ResponseBody(Default::default()),
            ));
        }
        if trailers {
            out.push(trailers_response());
        }
        out
    }

    /// Sends the screener's calls.
    fn stream_calls(&mut self, template: &str, st: &mut StreamState, calls: Vec<CheckText>) {
        for c in calls {
            let id = self.queue(Check::Response, template, &c.text);
            st.calls.push((id, c.id));
        }
    }

    /// Sends on what the screener allows; on a block, what passed and the error
    /// event.
    fn settle(&mut self, st: &mut StreamState) -> Vec<ProcessingResponse> {
        if st.finished {
            return Vec::new();
        }
        let releasable =
            (st.screen.releasable().saturating_sub(st.sent) as usize).min(st.held.len());
        if st.screen.is_blocked() {
            let error = st.error.clone().unwrap_or_else(safety::response_too_large);
            let mut out: Vec<u8> = st.held.drain(..releasable).collect();
            out.extend(safety::error_event(
                &error.body(),
                st.screen.needs_event_break(),
            ));
            st.held.clear();
            st.finished = true;
            self.obs.fail(obs::error_code(error.status, error.code));
            // The stream ends when upstream's does (or here, if it already did).
            let mut msgs = vec![protocol::streamed_body(false, out, st.eos && !st.trailers)];
            if st.eos && st.trailers {
                msgs.push(trailers_response());
            }
            return msgs;
        }
        if st.eos && st.screen.complete() {
            if self.obs.safety_response.is_none() {
                self.obs.safety_response = Some("pass");
            }
            st.sent += st.held.len() as u64;
            let mut msgs = vec![protocol::streamed_body(
                false,
                std::mem::take(&mut st.held),
                !st.trailers,
            )];
            if st.trailers {
                msgs.push(trailers_response());
            }
            st.finished = true;
            return msgs;
        }
        if releasable == 0 {
            return Vec::new();
        }
        st.sent += releasable as u64;
        vec![protocol::streamed_body(
            false,
            st.held.drain(..releasable).collect(),
            false,
        )]
    }
}

fn trailers_response() -> ProcessingResponse {
    protocol::respond(processing_response::Response::ResponseTrailers(
        TrailersResponse::default(),
    ))
}

/// The generated text of a whole event stream (the `data:` payloads).
fn event_stream_text(body: &[u8]) -> String {
    let mut out = String::new();
    for line in body.split(|&b| b == b'\n') {
        if let Some(data) = line.strip_prefix(b"data:") {
            text::event_text(data, &mut out);
        }
    }
    out
}
