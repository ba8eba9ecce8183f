//! One request's observations, gathered by the filter as the request goes, and
//! turned into series updates: one when it is routed (running, pick), one when it
//! ends (everything else).

use super::usage::{Usage, UsageScanner};
use super::{Hist, Record};

/// GIE's `error_code` values (its `pkg/epp/util/error`), plus two for safety.
pub const BAD_REQUEST: &str = "BadRequest";
pub const INTERNAL: &str = "Internal";
pub const SERVICE_UNAVAILABLE: &str = "ServiceUnavailable";
pub const MODEL_SERVER_ERROR: &str = "ModelServerError";
pub const RESOURCE_EXHAUSTED: &str = "InferencePoolResourceExhausted";
pub const SAFETY_BLOCKED: &str = "SafetyBlocked";
pub const SAFETY_UNAVAILABLE: &str = "SafetyUnavailable";
pub const UNKNOWN: &str = "Unknown";

/// The `error_code` of an error the filter answers, from its status and OpenAI code.
pub fn error_code(status: u16, code: &str) -> &'static str {
    match (status, code) {
        (_, "content_blocked") => SAFETY_BLOCKED,
        (_, "safety_check_unavailable") => SAFETY_UNAVAILABLE,
        (429, _) => RESOURCE_EXHAUSTED,
        (503, _) => SERVICE_UNAVAILABLE,
        (400..=499, _) => BAD_REQUEST,
        (500..=599, _) => INTERNAL,
        _ => UNKNOWN,
    }
}

/// The `error_code` of a model server's (or Envoy's upstream) error status.
pub fn upstream_error_code(status: u16) -> Option<&'static str> {
    match status {
        400..=499 => Some(BAD_REQUEST),
        500..=599 => Some(MODEL_SERVER_ERROR),
        _ => None,
    }
}

/// What the filter learned about one inference request.
#[derive(Debug, Default)]
pub struct RequestObs {
    /// Host time (ns) when the request headers arrived; `None`: not an inference
    /// request, nothing is recorded.
    pub started_ns: Option<u64>,
    /// `(model_name, target_model_name)` once the body named them.
    pub labels: Option<(String, String)>,
    pub request_bytes: u64,
    /// The routed update took a running slot, released by the final update.
    pub running: bool,
    pub error: Option<&'static str>,
    pub streamed: bool,
    /// When a streamed response's first bytes arrived (TTFT); not read otherwise.
    pub first_byte_ns: Option<u64>,
    pub response_bytes: u64,
    pub usage: UsageScanner,
    /// Response bytes already seen in the host's buffer (a paused callback keeps
    /// them there and the next callback sees them again).
    pub held: usize,
    pub finished: bool,
    // Access-log only:
    pub priority: Option<i32>,
    pub endpoint: Option<String>,
    /// Safety verdicts: `pass`, `blocked`, `fail_open`, `unavailable`.
    pub safety_prompt: Option<&'static str>,
    pub safety_response: Option<&'static str>,
    /// Media parts passed without a text check.
    pub media_parts: u32,
    /// The API key's id (`auth`), for the access log.
    pub consumer: Option<String>,
    /// Count SSE `data:` events (a consumer's streamed response without `usage`
    /// is charged by them); off unless a key's tokens are counted.
    pub count_events: bool,
    pub events: u64,
    /// The start of the current line (enough to tell `data: [DONE]`), and
    /// whether it was classified already.
    pub line_head: LineHead,
}

/// The first bytes of an SSE line, which may arrive split across chunks.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineHead {
    bytes: [u8; 12],
    len: u8,
    done: bool,
}

impl LineHead {
    /// Classifies the line once: an event carrying data (not `[DONE]`).
    fn is_event(&mut self) -> bool {
        if self.done {
            return false;
        }
        self.done = true;
        let head = &self.bytes[..usize::from(self.len)];
        head.strip_prefix(b"data:")
            .is_some_and(|rest| !rest.trim_ascii_start().starts_with(b"[DONE"))
    }
}

impl RequestObs {
    /// Records an error once: the first one is the cause.
    pub fn fail(&mut self, code: &'static str) {
        if self.error.is_none() {
            self.error = Some(code);
        }
    }

    /// The slice of a response buffer of `body_size` bytes not seen before.
    pub fn unseen(&self, body_size: usize) -> (usize, usize) {
        let start = self.held.min(body_size);
        (start, body_size - start)
    }

    /// Feeds new response bytes; `now_ns` (the host clock) is read only for the
    /// first bytes of a streamed response (its TTFT): a clock read per streamed
    /// chunk was a host call per chunk, and a non-streamed response reports no TTFT.
    pub fn response_bytes(&mut self, bytes: &[u8], now_ns: impl FnOnce() -> u64) {
        if bytes.is_empty() {
            return;
        }
        if self.streamed && self.first_byte_ns.is_none() {
            self.first_byte_ns = Some(now_ns());
        }
        self.response_bytes = self.response_bytes.saturating_add(bytes.len() as u64);
        self.usage.feed(bytes);
        if self.count_events {
            self.count_event_lines(bytes);
        }
    }

    fn count_event_lines(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        loop {
            let end = memchr::memchr(b'\n', rest);
            let line = &rest[..end.unwrap_or(rest.len())];
            let h = &mut self.line_head;
            let take = line.len().min(h.bytes.len() - usize::from(h.len));
            let at = usize::from(h.len);
            h.bytes[at..at + take].copy_from_slice(&line[..take]);
            h.len += take as u8;
            if (usize::from(h.len) == h.bytes.len() || end.is_some()) && h.is_event() {
                self.events += 1;
            }
            match end {
                Some(i) => {
                    self.line_head = LineHead::default();
                    rest = &rest[i + 1..];
                }
                None => return,
            }
        }
    }

    pub fn final_usage(&self) -> Option<Usage> {
        self.usage.usage()
    }
}

/// Appends a value for a space-separated `key=value` line: no spaces, quotes or
/// controls (each becomes `_`); `-` when empty.
fn push_field(out: &mut String, v: &str) {
    let v = super::clip(v);
    if v.is_empty() {
        out.push('-');
    } else if v
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        // Model names and addresses: copied as they are.
        out.push_str(v);
    } else {
        out.extend(v.chars().map(|c| {
            if c.is_whitespace() || c.is_control() || c == '"' || c == '\\' {
                '_'
            } else {
                c
            }
        }));
    }
}

/// The access-log fields (logfmt), as the filter sets them in the `igw` property
/// for `%FILTER_STATE(wasm.igw:PLAIN)%`. `-` marks what is unknown. Written into
/// one string with integer arithmetic (float formatting cost thousands of
/// instructions per request).
pub fn access_log_fields(o: &RequestObs, now_ns: u64) -> String {
    // Integers by itoa, not `write!`: core::fmt's machinery is most of this
    // function's instructions in Wasm, and it runs once per request.
    fn opt(out: &mut String, v: Option<impl itoa::Integer>) {
        match v {
            Some(v) => out.push_str(itoa::Buffer::new().format(v)),
            None => out.push('-'),
        }
    }
    /// Milliseconds with one decimal, rounded half up.
    fn ms(out: &mut String, from: Option<u64>, to: Option<u64>) {
        match (from, to) {
            (Some(a), Some(b)) => {
                let tenths = b.saturating_sub(a).saturating_add(50_000) / 100_000;
                out.push_str(itoa::Buffer::new().format(tenths / 10));
                out.push('.');
                out.push(char::from(b'0' + (tenths % 10) as u8));
            }
            _ => out.push('-'),
        }
    }
    let mut out = String::with_capacity(256);
    let (model, target) = o
        .labels
        .as_ref()
        .map_or(("", ""), |(m, t)| (m.as_str(), t.as_str()));
    out.push_str("model=");
    push_field(&mut out, model);
    out.push_str(" target_model=");
    push_field(&mut out, target);
    out.push_str(" endpoint=");
    push_field(&mut out, o.endpoint.as_deref().unwrap_or(""));
    out.push_str(" priority=");
    opt(&mut out, o.priority);
    out.push_str(" safety_prompt=");
    out.push_str(o.safety_prompt.unwrap_or("-"));
    out.push_str(" safety_response=");
    out.push_str(o.safety_response.unwrap_or("-"));
    out.push_str(" media_parts=");
    opt(&mut out, Some(o.media_parts));
    let usage = o.final_usage();
    out.push_str(" input_tokens=");
    opt(&mut out, usage.map(|u| u.prompt_tokens));
    out.push_str(" output_tokens=");
    opt(&mut out, usage.map(|u| u.completion_tokens));
    out.push_str(" ttft_ms=");
    if o.streamed {
        ms(&mut out, o.started_ns, o.first_byte_ns);
    } else {
        out.push('-');
    }
    out.push_str(" duration_ms=");
    ms(&mut out, o.started_ns, Some(now_ns));
    out.push_str(" error=");
    out.push_str(o.error.unwrap_or("-"));
    out.push_str(" consumer=");
    push_field(&mut out, o.consumer.as_deref().unwrap_or(""));
    out
}

/// The update when a request is routed to `endpoint`.
pub fn apply_routed(series: &mut (impl Record + ?Sized), endpoint: &str) {
    series.add_running(true);
    series.add_pick(endpoint);
}

/// The update when a request ends at host time `now_ns`.
pub fn apply_finished(series: &mut (impl Record + ?Sized), obs: &RequestObs, now_ns: u64) {
    let Some(started) = obs.started_ns else {
        return;
    };
    if obs.running {
        series.add_running(false);
    }
    if let Some(code) = obs.error {
        series.add_error(code);
    }
    // GIE counts requests whose model is known; errors before that have empty labels.
    if obs.labels.is_none() {
        return;
    }
    series.add_request();
    series.observe(Hist::RequestSize, obs.request_bytes as f64);
    if obs.error.is_some() {
        return; // latency, sizes and tokens of served responses only
    }
    let seconds = now_ns.saturating_sub(started) as f64 / 1e9;
    series.observe(Hist::Duration, seconds);
    series.observe(Hist::ResponseSize, obs.response_bytes as f64);
    if obs.streamed {
        if let Some(first) = obs.first_byte_ns {
            series.observe(Hist::Ttft, first.saturating_sub(started) as f64 / 1e9);
        }
    }
    if let Some(u) = obs.final_usage() {
        // As GIE: zero counts are not observed.
        if u.prompt_tokens > 0 {
            series.observe(Hist::InputTokens, u.prompt_tokens as f64);
        }
        if u.completion_tokens > 0 {
            series.observe(Hist::OutputTokens, u.completion_tokens as f64);
            series.observe(Hist::Ntpot, seconds / u.completion_tokens as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Series;

    #[test]
    fn error_codes() {
        assert_eq!(error_code(400, "invalid_json"), BAD_REQUEST);
        assert_eq!(error_code(404, "model_not_found"), BAD_REQUEST);
        assert_eq!(error_code(429, "rate_limit_exceeded"), RESOURCE_EXHAUSTED);
        assert_eq!(error_code(503, "no_healthy_upstream"), SERVICE_UNAVAILABLE);
        assert_eq!(error_code(403, "content_blocked"), SAFETY_BLOCKED);
        assert_eq!(
            error_code(503, "safety_check_unavailable"),
            SAFETY_UNAVAILABLE
        );
        assert_eq!(error_code(500, "internal_error"), INTERNAL);
        assert_eq!(upstream_error_code(502), Some(MODEL_SERVER_ERROR));
        assert_eq!(upstream_error_code(200), None);
    }

    fn obs() -> RequestObs {
        RequestObs {
            started_ns: Some(1_000_000_000),
            labels: Some(("m".into(), "t".into())),
            request_bytes: 300,
            running: true,
            streamed: true,
            ..Default::default()
        }
    }

    #[test]
    fn served_streamed_request() {
        let mut s = Series::default();
        apply_routed(&mut s, "e1");
        assert_eq!(s.running, 1);
        let mut o = obs();
        o.response_bytes(b"data: {\"choices\":[]}\n\n", || 1_050_000_000);
        o.response_bytes(
            b"data: {\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":10}}\n\ndata: [DONE]\n\n",
            || 1_400_000_000,
        );
        apply_finished(&mut s, &o, 1_500_000_000);
        assert_eq!((s.running, s.requests), (0, 1));
        let d = s.hist(Hist::Duration).unwrap();
        assert_eq!(d.count, 1);
        assert!((d.sum - 0.5).abs() < 1e-9);
        let t = s.hist(Hist::Ttft).unwrap();
        assert!((t.sum - 0.05).abs() < 1e-9);
        assert_eq!(s.hist(Hist::InputTokens).unwrap().sum, 20.0);
        assert_eq!(s.hist(Hist::OutputTokens).unwrap().sum, 10.0);
        assert!((s.hist(Hist::Ntpot).unwrap().sum - 0.05).abs() < 1e-9);
        assert_eq!(s.hist(Hist::RequestSize).unwrap().sum, 300.0);
        assert_eq!(
            s.hist(Hist::ResponseSize).unwrap().sum,
            o.response_bytes as f64
        );
        assert_eq!(
            s.picks().collect::<Vec<_>>(),
            vec![(crate::inflight::key("e1"), 1)]
        );
        assert!(s.errors.is_empty());
    }

    #[test]
    fn errors_count_without_latency() {
        let mut s = Series::default();
        let mut o = obs();
        o.fail(RESOURCE_EXHAUSTED);
        o.fail(INTERNAL); // the first cause stays
        o.running = false;
        apply_finished(&mut s, &o, 2_000_000_000);
        assert_eq!(s.errors, vec![(RESOURCE_EXHAUSTED.to_string(), 1)]);
        assert_eq!(s.requests, 1);
        assert_eq!(s.hist(Hist::Duration).unwrap().count, 0);
        // Before the model is known: the error only.
        let mut s = Series::default();
        let o = RequestObs {
            started_ns: Some(0),
            error: Some(BAD_REQUEST),
            ..Default::default()
        };
        apply_finished(&mut s, &o, 1);
        assert_eq!((s.requests, s.errors.len()), (0, 1));
        // Not an inference request: nothing.
        let mut s = Series::default();
        apply_finished(&mut s, &RequestObs::default(), 1);
        assert_eq!(s, Series::default());
    }

    #[test]
    fn access_log_line() {
        let mut o = obs();
        o.labels = Some(("food review".into(), "t\"x".into()));
        o.endpoint = Some("10.0.0.1:8000".into());
        o.priority = Some(-1);
        o.safety_prompt = Some("pass");
        o.response_bytes(
            b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
            || 1_020_000_000,
        );
        assert_eq!(
            access_log_fields(&o, 1_500_000_000),
            "model=food_review target_model=t_x endpoint=10.0.0.1:8000 priority=-1 \
             safety_prompt=pass safety_response=- media_parts=0 input_tokens=3 output_tokens=4 \
             ttft_ms=20.0 duration_ms=500.0 error=- consumer=-"
        );
        // Non-ASCII kept, its whitespace replaced; durations to a tenth of a ms.
        o.labels = Some(("crème\u{a0}brûlée".into(), "t".into()));
        o.streamed = false;
        o.error = Some(BAD_REQUEST);
        let line = access_log_fields(&o, 1_001_250_000);
        assert!(
            line.starts_with("model=crème_brûlée target_model=t "),
            "{line}"
        );
        assert!(
            line.ends_with(" ttft_ms=- duration_ms=1.3 error=BadRequest consumer=-"),
            "{line}"
        );
        let none = RequestObs::default();
        assert!(access_log_fields(&none, 0).starts_with("model=- target_model=- endpoint=-"));
    }

    #[test]
    fn unseen_bytes_after_a_pause() {
        let mut o = obs();
        assert_eq!(o.unseen(10), (0, 10));
        o.held = 10;
        assert_eq!(o.unseen(25), (10, 15));
        assert_eq!(o.unseen(5), (5, 0));
    }

    #[test]
    fn streamed_events_are_counted_across_chunks_when_asked() {
        let mut o = RequestObs {
            count_events: true,
            ..Default::default()
        };
        for chunk in [
            &b"data: {\"a\":1}\n\nda"[..],
            b"ta: {\"b\":2}\n\n",
            b"data: {\"c\":\"data: not an event\"}\n",
            b"\ndata: [DONE]\n\n",
        ] {
            o.response_bytes(chunk, || 1);
        }
        // A line split across chunks is counted once, [DONE] never; "data:"
        // inside a line is not a new event.
        assert_eq!(o.events, 3);
        let mut off = RequestObs::default();
        off.response_bytes(b"data: {}\n\n", || 1);
        assert_eq!(off.events, 0);
    }
}
