//! Safety callouts from the gateway stream. The prompt check holds the request
//! until every call on its text passed; a non-streamed response is held until its
//! text passed; a streamed response goes through [`StreamScreen`], which says which
//! bytes may reach the client (hold: only screened text; detect: all but the end).
//!
//! Envoy's body buffer can only be prepended to, appended to or replaced whole, and
//! only a paused stream keeps bytes in it. So a streamed response is held by
//! pausing; when a verdict releases part of what is held, the rest moves into
//! `tail` here and goes back in front of the next chunk.

use super::host;
use super::http::GatewayStream;
use super::metrics::{self, label};
use crate::gateway::RoutePlan;
use crate::openai::ApiError;
use crate::safety::stream::{CheckText, StreamScreen};
use crate::safety::{self, text, Check, CheckFailure, Safety, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::time::Duration;

/// A prompt check in flight: the route to take once every call passed.
pub struct PendingPrompt {
    tokens: Vec<u32>,
    plan: RoutePlan,
    body_size: usize,
}

pub struct ResponseCheck {
    template: String,
    mode: Mode,
}

enum Mode {
    /// Non-streamed: headers and body held until every call passed.
    Buffered { tokens: Vec<u32> },
    /// SSE: released as the screener allows.
    Streaming(Box<StreamState>),
}

struct StreamState {
    screen: StreamScreen,
    /// Calls in flight: (callout token, screener call id).
    calls: Vec<(u32, u32)>,
    /// Absolute stream offset of the first byte not yet sent on.
    sent: u64,
    /// Bytes in Envoy's buffer, held by a paused callback.
    in_envoy: usize,
    paused: bool,
    /// Held bytes moved out of Envoy's buffer when a verdict released the part
    /// before them; they go back in front of the next chunk.
    tail: Vec<u8>,
    eos: bool,
    /// The error event went out: everything after is dropped.
    cut: bool,
    /// Why the stream is being cut.
    error: Option<ApiError>,
}

impl ResponseCheck {
    pub(super) fn is_streaming(&self) -> bool {
        matches!(self.mode, Mode::Streaming(_))
    }
}

impl GatewayStream {
    fn dispatch(
        &self,
        safety: &Safety,
        check: Check,
        template: &str,
        text: &str,
    ) -> Result<u32, CheckFailure> {
        let (path, body) = safety::request(check, template, text);
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", &path),
            (":authority", &safety.authority),
            ("content-type", "application/json"),
        ];
        headers.extend(safety.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        metrics::inc(&format!(
            "inference_gateway_safety_checks_total.check.{}",
            check.label()
        ));
        self.dispatch_http_call(
            &safety.cluster,
            headers,
            Some(&body),
            vec![],
            Duration::from_millis(safety.timeout_ms),
        )
        .map_err(|status| {
            log::warn!(
                "inference-gateway: safety callout to '{}' not sent: {status:?}",
                safety.cluster
            );
            CheckFailure::Timeout
        })
    }

    /// Sends one call per piece of a whole text (prompt, buffered response) and
    /// returns the tokens of those sent. A call that cannot be sent is a failed
    /// check: skipped with `fail_open`, otherwise the error to answer with.
    fn dispatch_all(
        &mut self,
        safety: &Safety,
        check: Check,
        template: &str,
        pieces: Vec<&str>,
    ) -> Result<Vec<u32>, ApiError> {
        let mut tokens = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match self.dispatch(safety, check, template, piece) {
                Ok(token) => tokens.push(token),
                Err(failure) => self.on_failure(safety, check, &failure)?,
            }
        }
        Ok(tokens)
    }

    /// Screens the prompt: every call on its text must pass before the request
    /// goes on. Text the check cannot take is refused here.
    pub(super) fn check_prompt(
        &mut self,
        safety: &Safety,
        template: &str,
        plan: RoutePlan,
        body_size: usize,
    ) -> Action {
        if plan.media_parts > 0 {
            // Passed, not screened: counted and noted in the access log.
            self.obs.media_parts = plan.media_parts;
            metrics::add(
                "inference_gateway_safety_unscreened_media_total.check.prompt",
                u64::from(plan.media_parts),
            );
        }
        let pieces = match safety::prompt_calls(
            safety,
            &plan.prompt,
            plan.token_ids,
            plan.kind.prompt_field(),
        ) {
            Ok(pieces) => pieces,
            Err(e) => return self.reject(&e),
        };
        let tokens = match self.dispatch_all(safety, Check::Prompt, template, pieces) {
            Ok(tokens) => tokens,
            Err(e) => return self.reject(&e),
        };
        if tokens.is_empty() {
            self.verdict_once(Check::Prompt, "pass");
            return match self.forward(&plan, body_size) {
                Ok(()) => Action::Continue,
                Err(e) => self.reject(&e),
            };
        }
        self.prompt_check = Some(PendingPrompt {
            tokens,
            plan,
            body_size,
        });
        Action::Pause
    }

    /// A failed check: fail open (count it, go on) or closed (503).
    fn on_failure(
        &mut self,
        safety: &Safety,
        check: Check,
        failure: &CheckFailure,
    ) -> Result<(), ApiError> {
        self.verdict(
            check,
            if safety.fail_open {
                "fail_open"
            } else {
                "unavailable"
            },
        );
        metrics::inc(&format!(
            "inference_gateway_safety_failures_total.check.{}",
            check.label()
        ));
        log::warn!(
            "inference-gateway: request {} {} safety check failed: the safety service {failure}{}",
            self.request_id(),
            check.label(),
            if safety.fail_open {
                "; failing open"
            } else {
                ""
            }
        );
        if safety.fail_open {
            metrics::inc(&format!(
                "inference_gateway_safety_fail_open_total.check.{}",
                check.label()
            ));
            Ok(())
        } else {
            Err(safety::unavailable_error(check, failure))
        }
    }

    /// Records a check's outcome for the access log (and a block as an error).
    fn verdict(&mut self, check: Check, verdict: &'static str) {
        match check {
            Check::Prompt => self.obs.safety_prompt = Some(verdict),
            Check::Response => self.obs.safety_response = Some(verdict),
        }
        if verdict == "blocked" {
            self.obs.fail(crate::observe::request::SAFETY_BLOCKED);
        }
    }

    /// Records `pass` unless an earlier call of the same check said more.
    fn verdict_once(&mut self, check: Check, verdict: &'static str) {
        let seen = match check {
            Check::Prompt => self.obs.safety_prompt.is_some(),
            Check::Response => self.obs.safety_response.is_some(),
        };
        if !seen {
            self.verdict(check, verdict);
        }
    }

    fn on_block(&mut self, check: Check, filters: &[String]) {
        self.verdict(check, "blocked");
        for f in filters
            .iter()
            .map(String::as_str)
            .chain(filters.is_empty().then_some("unknown"))
        {
            metrics::inc(&format!(
                "inference_gateway_safety_blocks_total.check.{}.filter.{}",
                check.label(),
                label(f)
            ));
        }
        // The request id, never the text.
        log::info!(
            "inference-gateway: request {} {} blocked by safety filters [{}]",
            self.request_id(),
            check.label(),
            filters.join(", ")
        );
    }

    /// Reads a finished callout: `Ok(())` to go on (passed or failed open), or the
    /// error the client gets.
    fn outcome(&mut self, safety: &Safety, check: Check, body_size: usize) -> Result<(), ApiError> {
        let status = host::call_response_header(":status").and_then(|s| s.parse().ok());
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        match safety::verdict(status, &body) {
            Ok(Verdict::Pass) => Ok(()),
            Ok(Verdict::Block(filters)) => {
                self.on_block(check, &filters);
                Err(safety::blocked_error(check, &filters, safety.block_status))
            }
            Err(failure) => self.on_failure(safety, check, &failure),
        }
    }

    pub(super) fn safety_call_response(&mut self, token: u32, body_size: usize) {
        let Some(safety) = self.config.safety.clone() else {
            return;
        };
        if self
            .prompt_check
            .as_ref()
            .is_some_and(|p| p.tokens.contains(&token))
        {
            self.prompt_verdict(&safety, token, body_size);
            return;
        }
        let Some(mut check) = self.response_check.take() else {
            return;
        };
        match &mut check.mode {
            Mode::Buffered { tokens } => {
                if tokens.contains(&token) {
                    tokens.retain(|&t| t != token);
                    let done = tokens.is_empty();
                    match self.outcome(&safety, Check::Response, body_size) {
                        // The held response is replaced by the error (a local reply).
                        Err(e) => {
                            self.reject(&e);
                            return;
                        }
                        Ok(()) if done => {
                            self.verdict_once(Check::Response, "pass");
                            self.resume_http_response();
                        }
                        Ok(()) => {}
                    }
                }
            }
            Mode::Streaming(st) => {
                if let Some(pos) = st.calls.iter().position(|&(t, _)| t == token) {
                    let (_, id) = st.calls.swap_remove(pos);
                    match self.outcome(&safety, Check::Response, body_size) {
                        Ok(()) => st.screen.pass(id),
                        Err(e) => {
                            st.error.get_or_insert(e);
                            st.screen.block();
                        }
                    }
                    let now = super::now_ms(self);
                    let more = st.screen.poll(now);
                    self.stream_calls(&safety, &check.template, st, more);
                    self.settle_stream(st, false);
                }
            }
        }
        self.response_check = Some(check);
    }

    fn prompt_verdict(&mut self, safety: &Safety, token: u32, body_size: usize) {
        let Some(mut p) = self.prompt_check.take() else {
            return;
        };
        p.tokens.retain(|&t| t != token);
        if let Err(e) = self.outcome(safety, Check::Prompt, body_size) {
            // Later answers find no pending check and are ignored.
            self.reject(&e);
            return;
        }
        if !p.tokens.is_empty() {
            self.prompt_check = Some(p);
            return;
        }
        self.verdict_once(Check::Prompt, "pass");
        match self.forward(&p.plan, p.body_size) {
            Ok(()) => self.resume_http_request(),
            Err(e) => {
                self.reject(&e);
            }
        }
    }

    pub(super) fn response_headers_safety(&mut self, end_of_stream: bool) -> Action {
        let Some(template) = self.response_template.take() else {
            return Action::Continue;
        };
        let ok = host::response_header(":status").is_some_and(|s| s.starts_with('2'));
        if !ok || end_of_stream {
            return Action::Continue; // errors and empty bodies have nothing to screen
        }
        let streaming = host::response_header("content-type")
            .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("text/event-stream"));
        let Some(safety) = &self.config.safety else {
            return Action::Continue;
        };
        if streaming {
            // Chunks are held and edited (the ending may be ours): no known length.
            self.set_http_response_header("content-length", None);
            self.response_check = Some(ResponseCheck {
                template,
                mode: Mode::Streaming(Box::new(StreamState {
                    screen: StreamScreen::new(safety.stream),
                    calls: Vec::new(),
                    sent: 0,
                    in_envoy: 0,
                    paused: false,
                    tail: Vec::new(),
                    eos: false,
                    cut: false,
                    error: None,
                })),
            });
            Action::Continue
        } else {
            self.response_check = Some(ResponseCheck {
                template,
                mode: Mode::Buffered { tokens: Vec::new() },
            });
            Action::Pause
        }
    }

    /// A non-streamed response under a check: held whole, screened at its end.
    pub(super) fn buffered_response_body(
        &mut self,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Some(safety) = self.config.safety.clone() else {
            return Action::Continue;
        };
        let Some(mut check) = self.response_check.take() else {
            return Action::Continue;
        };
        if body_size > safety.max_response_bytes {
            // Never passed on unscreened, whatever fail_open says.
            log::warn!(
                "inference-gateway: request {} response larger than max_response_bytes ({}): refused",
                self.request_id(),
                safety.max_response_bytes
            );
            return self.reject(&safety::response_too_large());
        }
        if !end_of_stream {
            self.response_check = Some(check);
            return Action::Pause;
        }
        let body = self
            .get_http_response_body(0, body_size)
            .unwrap_or_default();
        let text = text::response_text(&body);
        let pieces = match safety::response_calls(&safety, &text) {
            Ok(pieces) => pieces,
            Err(e) => return self.reject(&e),
        };
        let sent = match self.dispatch_all(&safety, Check::Response, &check.template, pieces) {
            Ok(tokens) => tokens,
            Err(e) => return self.reject(&e),
        };
        if sent.is_empty() {
            self.verdict_once(Check::Response, "pass");
            return Action::Continue;
        }
        check.mode = Mode::Buffered { tokens: sent };
        self.response_check = Some(check);
        Action::Pause
    }

    /// A chunk of a streamed response under a check. Returns the callback's action;
    /// the new bytes are fed to the request metrics here (they are known only here).
    pub(super) fn streamed_response_body(
        &mut self,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Some(safety) = self.config.safety.clone() else {
            return Action::Continue;
        };
        let Some(mut check) = self.response_check.take() else {
            return Action::Continue;
        };
        let Mode::Streaming(st) = &mut check.mode else {
            self.response_check = Some(check);
            return Action::Continue;
        };
        if st.cut {
            if body_size > 0 {
                self.set_http_response_body(0, body_size, b"");
            }
            self.response_check = Some(check);
            return Action::Continue;
        }
        let new = if st.tail.is_empty() {
            let fresh = body_size.saturating_sub(st.in_envoy);
            let bytes = if fresh > 0 {
                self.get_http_response_body(st.in_envoy, fresh)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            st.in_envoy = body_size;
            bytes
        } else {
            let bytes = if body_size > 0 {
                self.get_http_response_body(0, body_size)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            let tail = std::mem::take(&mut st.tail);
            self.set_http_response_body(0, 0, &tail);
            st.in_envoy = tail.len() + body_size;
            bytes
        };
        self.obs.response_bytes(&new, super::now_ns);
        let now = super::now_ms(self);
        let mut calls = st.screen.feed(&new, now);
        if end_of_stream {
            st.eos = true;
            calls.extend(st.screen.finish(now));
        }
        self.stream_calls(&safety, &check.template, st, calls);
        let action = self.settle_stream(st, true);
        self.response_check = Some(check);
        action
    }

    /// Sends the screener's calls; a call that cannot be sent is a failed check.
    fn stream_calls(
        &mut self,
        safety: &Safety,
        template: &str,
        st: &mut StreamState,
        calls: Vec<CheckText>,
    ) {
        for call in calls {
            match self.dispatch(safety, Check::Response, template, &call.text) {
                Ok(token) => st.calls.push((token, call.id)),
                Err(failure) => match self.on_failure(safety, Check::Response, &failure) {
                    Ok(()) => st.screen.pass(call.id),
                    Err(e) => {
                        st.error.get_or_insert(e);
                        st.screen.block();
                    }
                },
            }
        }
    }

    /// Moves what the screener allows to the client. `in_callback`: called from the
    /// body callback (returns its action); otherwise from a verdict, where a paused
    /// stream is resumed once something can go.
    fn settle_stream(&mut self, st: &mut StreamState, in_callback: bool) -> Action {
        if st.cut {
            return Action::Continue;
        }
        // Bytes held in Envoy's buffer that may go (the tail, if any, is not there).
        let releasable = (st.screen.releasable().saturating_sub(st.sent) as usize).min(st.in_envoy);
        if st.screen.is_blocked() {
            if !in_callback && !st.paused {
                // Nothing held in Envoy to edit: the next chunk carries the error.
                return Action::Continue;
            }
            let error = st.error.clone().unwrap_or_else(safety::response_too_large);
            let held = self
                .get_http_response_body(0, st.in_envoy)
                .unwrap_or_default();
            let mut out = held[..releasable.min(held.len())].to_vec();
            out.extend(safety::error_event(
                &error.body(),
                st.screen.needs_event_break(),
            ));
            self.set_http_response_body(0, st.in_envoy, &out);
            st.cut = true;
            st.tail.clear();
            // The cause (blocked, or the check unavailable), as a local reply would count it.
            self.obs.fail(crate::observe::request::error_code(
                error.status,
                error.code,
            ));
            return self.release_all(st, in_callback);
        }
        if st.eos {
            if st.screen.complete() {
                self.verdict_once(Check::Response, "pass");
                return self.release_all(st, in_callback);
            }
            return self.hold(st, in_callback);
        }
        if releasable == st.in_envoy {
            return self.release_all(st, in_callback);
        }
        if in_callback || releasable == 0 {
            return self.hold(st, in_callback);
        }
        // A verdict released the front of what is held: send it, keep the rest here.
        let held = self
            .get_http_response_body(0, st.in_envoy)
            .unwrap_or_default();
        let cut = releasable.min(held.len());
        self.set_http_response_body(0, st.in_envoy, &held[..cut]);
        st.tail = held[cut..].to_vec();
        st.sent += cut as u64;
        st.in_envoy = 0;
        st.paused = false;
        self.resume_http_response();
        Action::Continue
    }

    fn release_all(&mut self, st: &mut StreamState, in_callback: bool) -> Action {
        st.sent += st.in_envoy as u64;
        st.in_envoy = 0;
        if !in_callback && st.paused {
            st.paused = false;
            self.resume_http_response();
        }
        st.paused = false;
        Action::Continue
    }

    fn hold(&mut self, st: &mut StreamState, in_callback: bool) -> Action {
        if in_callback {
            st.paused = true;
        }
        Action::Pause
    }
}
