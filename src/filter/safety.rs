//! Safety callouts from the gateway stream: the prompt check holds the request
//! until the verdict is in; the response check holds a non-streamed response, or
//! the end of a streamed one, until its verdict is in.

use super::host;
use super::http::GatewayStream;
use super::metrics::{self, label};
use crate::gateway::RoutePlan;
use crate::openai::ApiError;
use crate::safety::sse::{self, SseText};
use crate::safety::{self, Check, CheckFailure, Safety, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::time::Duration;

/// A prompt check in flight: the route to take once it passes.
pub struct PendingPrompt {
    token: u32,
    plan: RoutePlan,
    body_size: usize,
}

pub struct ResponseCheck {
    template: String,
    mode: Mode,
    /// The verdict call in flight, if any.
    token: Option<u32>,
}

enum Mode {
    /// Non-streamed: headers and body held until the verdict.
    Buffered,
    /// SSE: chunks pass through; the ending waits for the verdict.
    Streaming(SseText),
}

impl ResponseCheck {
    /// Streamed responses are screened chunk by chunk: the whole chunk is read.
    pub(super) fn reads_every_chunk(&self) -> bool {
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

    /// Sends the prompt to the safety service; the request waits for the verdict.
    pub(super) fn check_prompt(
        &mut self,
        safety: &Safety,
        template: &str,
        prompt: &str,
        plan: RoutePlan,
        body_size: usize,
    ) -> Action {
        match self.dispatch(safety, Check::Prompt, template, prompt) {
            Ok(token) => {
                self.prompt_check = Some(PendingPrompt {
                    token,
                    plan,
                    body_size,
                });
                Action::Pause
            }
            Err(failure) => match self.on_failure(safety, Check::Prompt, &failure) {
                Ok(()) => match self.forward(&plan, body_size) {
                    Ok(()) => Action::Continue,
                    Err(e) => self.reject(&e),
                },
                Err(e) => self.reject(&e),
            },
        }
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

    /// Reads the verdict of a finished callout.
    fn read_verdict(&self, body_size: usize) -> Result<Verdict, CheckFailure> {
        let status = host::call_response_header(":status").and_then(|s| s.parse().ok());
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        safety::verdict(status, &body)
    }

    pub(super) fn safety_call_response(&mut self, token: u32, body_size: usize) {
        let Some(safety) = self.config.safety.clone() else {
            return;
        };
        if self.prompt_check.as_ref().is_some_and(|p| p.token == token) {
            if let Some(p) = self.prompt_check.take() {
                self.prompt_verdict(&safety, p, body_size);
            }
        } else if self
            .response_check
            .as_ref()
            .is_some_and(|r| r.token == Some(token))
        {
            self.response_verdict(&safety, body_size);
        }
    }

    fn prompt_verdict(&mut self, safety: &Safety, p: PendingPrompt, body_size: usize) {
        let outcome = match self.read_verdict(body_size) {
            Ok(Verdict::Pass) => {
                self.verdict(Check::Prompt, "pass");
                Ok(())
            }
            Ok(Verdict::Block(filters)) => {
                self.on_block(Check::Prompt, &filters);
                Err(safety::blocked_error(
                    Check::Prompt,
                    &filters,
                    safety.block_status,
                ))
            }
            Err(failure) => self.on_failure(safety, Check::Prompt, &failure),
        };
        match outcome.and_then(|()| self.forward(&p.plan, p.body_size)) {
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
        let mode = if streaming {
            // Chunks are edited (the ending is ours), so the length is not known.
            self.set_http_response_header("content-length", None);
            Mode::Streaming(SseText::new(safety.max_stream_text_bytes))
        } else {
            Mode::Buffered
        };
        let hold = matches!(mode, Mode::Buffered);
        self.response_check = Some(ResponseCheck {
            template,
            mode,
            token: None,
        });
        if hold {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// `chunk`: the whole buffered body when the caller already read it (a streamed
    /// response, see [`ResponseCheck::reads_every_chunk`]), so it is copied out once.
    pub(super) fn response_body_safety(
        &mut self,
        body_size: usize,
        end_of_stream: bool,
        chunk: Option<Vec<u8>>,
    ) -> Action {
        let Some(safety) = self.config.safety.clone() else {
            return Action::Continue;
        };
        let Some(mut check) = self.response_check.take() else {
            return Action::Continue;
        };
        let action = match &mut check.mode {
            Mode::Buffered => {
                if body_size > safety.max_response_bytes {
                    let failure =
                        CheckFailure::Unparsable("response larger than max_response_bytes".into());
                    return match self.on_failure(&safety, Check::Response, &failure) {
                        Ok(()) => Action::Continue, // unscreened, as fail_open allows
                        Err(e) => self.reject(&e),
                    };
                }
                if !end_of_stream {
                    self.response_check = Some(check);
                    return Action::Pause;
                }
                let body = self
                    .get_http_response_body(0, body_size)
                    .unwrap_or_default();
                let text = safety::response_text(&body).unwrap_or_default();
                self.start_response_check(&safety, &mut check, &text)
            }
            Mode::Streaming(acc) => {
                let chunk = chunk.unwrap_or_else(|| {
                    self.get_http_response_body(0, body_size)
                        .unwrap_or_default()
                });
                let mut out = acc.feed(&chunk);
                if end_of_stream {
                    out.extend(acc.finish());
                }
                if out != chunk.as_slice() {
                    self.set_http_response_body(0, body_size, &out);
                }
                if !end_of_stream {
                    self.response_check = Some(check);
                    return Action::Continue;
                }
                let text = acc.text().to_string();
                self.start_response_check(&safety, &mut check, &text)
            }
        };
        self.response_check = Some(check);
        action
    }

    /// At the end of a response: send its text for screening and hold the end.
    fn start_response_check(
        &mut self,
        safety: &Safety,
        check: &mut ResponseCheck,
        text: &str,
    ) -> Action {
        if text.trim().is_empty() {
            self.finish_response(safety, check, Ok(()));
            return Action::Continue;
        }
        match self.dispatch(safety, Check::Response, &check.template, text) {
            Ok(token) => {
                check.token = Some(token);
                Action::Pause
            }
            Err(failure) => {
                let outcome = self.on_failure(safety, Check::Response, &failure);
                self.finish_response(safety, check, outcome);
                Action::Continue
            }
        }
    }

    fn response_verdict(&mut self, safety: &Safety, body_size: usize) {
        let Some(mut check) = self.response_check.take() else {
            return;
        };
        let outcome = match self.read_verdict(body_size) {
            Ok(Verdict::Pass) => {
                self.verdict(Check::Response, "pass");
                Ok(())
            }
            Ok(Verdict::Block(filters)) => {
                self.on_block(Check::Response, &filters);
                Err(safety::blocked_error(
                    Check::Response,
                    &filters,
                    safety.block_status,
                ))
            }
            Err(failure) => self.on_failure(safety, Check::Response, &failure),
        };
        let replaced = self.finish_response(safety, &mut check, outcome);
        if !replaced {
            self.resume_http_response();
        }
    }

    /// Ends a checked response. Buffered: a block replaces the whole response (a
    /// local reply; returns true). Streaming: the held ending becomes `[DONE]` on a
    /// pass, or an error event on a block.
    fn finish_response(
        &mut self,
        _safety: &Safety,
        check: &mut ResponseCheck,
        outcome: Result<(), ApiError>,
    ) -> bool {
        match (&check.mode, outcome) {
            (Mode::Buffered, Ok(())) => false,
            (Mode::Buffered, Err(e)) => {
                self.reject(&e);
                true
            }
            (Mode::Streaming(acc), outcome) => {
                let ending = match outcome {
                    Ok(()) if acc.done_seen => sse::done_event().to_vec(),
                    Ok(()) => Vec::new(),
                    Err(e) => sse::error_event(&e.body()),
                };
                if !ending.is_empty() {
                    let held = self
                        .get_http_response_body(0, i32::MAX as usize)
                        .map_or(0, |b| b.len());
                    self.set_http_response_body(held, 0, &ending);
                }
                false
            }
        }
    }
}
