//! AI safety checks through Model Armor's REST shape: which template screens a
//! model's prompts and responses, the callout request, and the verdict. Pure: the
//! filter sends the request with `dispatch_http_call` and hands back the answer.
//!
//! `POST {base}/v1/{template}:sanitizeUserPrompt`   `{"userPromptData":{"text":…}}`
//! `POST {base}/v1/{template}:sanitizeModelResponse` `{"modelResponseData":{"text":…}}`
//! where `template` is `projects/{p}/locations/{l}/templates/{t}`; the verdict is
//! `sanitizationResult.filterMatchState` = `MATCH_FOUND` | `NO_MATCH_FOUND`.

pub mod config;
pub mod stream;
pub mod text;

use crate::openai::ApiError;
use serde::Serialize;
use serde_json::Value;

pub use config::{Safety, SafetyTemplates};

/// Which side of the exchange is screened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Prompt,
    Response,
}

impl Check {
    fn method(self) -> &'static str {
        match self {
            Check::Prompt => "sanitizeUserPrompt",
            Check::Response => "sanitizeModelResponse",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Check::Prompt => "prompt",
            Check::Response => "response",
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PromptBody<'a> {
    user_prompt_data: Text<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseBody<'a> {
    model_response_data: Text<'a>,
}

#[derive(Serialize)]
struct Text<'a> {
    text: &'a str,
}

/// The callout's `:path` and JSON body.
pub fn request(check: Check, template: &str, text: &str) -> (String, Vec<u8>) {
    let path = format!("/v1/{}:{}", template.trim_matches('/'), check.method());
    let body = match check {
        Check::Prompt => serde_json::to_vec(&PromptBody {
            user_prompt_data: Text { text },
        }),
        Check::Response => serde_json::to_vec(&ResponseBody {
            model_response_data: Text { text },
        }),
    };
    (path, body.unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Matched; the names of the filters that matched (e.g. `pi_and_jailbreak`,
    /// `rai/dangerous`, `sdp`).
    Block(Vec<String>),
}

/// Why a check produced no verdict (the service is down, slow or talks nonsense).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    Timeout,
    Status(u16),
    Unparsable(String),
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailure::Timeout => write!(f, "timed out or unreachable"),
            CheckFailure::Status(s) => write!(f, "answered HTTP {s}"),
            CheckFailure::Unparsable(e) => write!(f, "answered an unreadable verdict ({e})"),
        }
    }
}

/// Reads the safety service's answer.
pub fn verdict(status: Option<u16>, body: &[u8]) -> Result<Verdict, CheckFailure> {
    let status = status.ok_or(CheckFailure::Timeout)?;
    if !(200..300).contains(&status) {
        return Err(CheckFailure::Status(status));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| CheckFailure::Unparsable(e.to_string()))?;
    let result = v
        .get("sanitizationResult")
        .ok_or_else(|| CheckFailure::Unparsable("no sanitizationResult".into()))?;
    match result.get("filterMatchState").and_then(Value::as_str) {
        Some("NO_MATCH_FOUND") => Ok(Verdict::Pass),
        Some("MATCH_FOUND") => {
            let mut names = Vec::new();
            if let Some(Value::Object(filters)) = result.get("filterResults") {
                for (name, r) in filters {
                    matched_filters(name, r, &mut names);
                }
            }
            names.sort();
            names.dedup();
            Ok(Verdict::Block(names))
        }
        other => Err(CheckFailure::Unparsable(format!(
            "filterMatchState {other:?}"
        ))),
    }
}

/// Collects `name` (or `name/category` for per-category results such as RAI's
/// `raiFilterTypeResults`) when a nested `matchState` is `MATCH_FOUND`.
fn matched_filters(name: &str, v: &Value, out: &mut Vec<String>) {
    let typed: Vec<String> = find_key(v, "raiFilterTypeResults")
        .and_then(Value::as_object)
        .map(|types| {
            types
                .iter()
                .filter(|(_, r)| r.get("matchState").and_then(Value::as_str) == Some("MATCH_FOUND"))
                .map(|(t, _)| format!("{name}/{t}"))
                .collect()
        })
        .unwrap_or_default();
    if !typed.is_empty() {
        out.extend(typed);
    } else if any_match(v, 0) {
        out.push(name.to_string());
    }
}

fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(o) => o
            .get(key)
            .or_else(|| o.values().find_map(|x| find_key(x, key))),
        _ => None,
    }
}

/// Any `matchState: MATCH_FOUND` below `v` (depth-bounded: verdicts are shallow).
fn any_match(v: &Value, depth: usize) -> bool {
    if depth > 8 {
        return false;
    }
    match v {
        Value::Object(o) => {
            o.get("matchState").and_then(Value::as_str) == Some("MATCH_FOUND")
                || o.values().any(|x| any_match(x, depth + 1))
        }
        _ => false,
    }
}

/// The error a blocked request or response gets. Names the filters, never the text.
pub fn blocked_error(check: Check, filters: &[String], status: u16) -> ApiError {
    let which = if filters.is_empty() {
        "a safety filter".to_string()
    } else {
        filters.join(", ")
    };
    ApiError::new(
        status,
        "invalid_request_error",
        "content_blocked",
        format!(
            "The {} was blocked by the safety check ({which}).",
            check.label()
        ),
    )
}

/// The error when the check itself failed and `fail_open` is off.
pub fn unavailable_error(check: Check, failure: &CheckFailure) -> ApiError {
    ApiError::new(
        503,
        "server_error",
        "safety_check_unavailable",
        format!(
            "The {} safety check is unavailable: the safety service {failure}.",
            check.label()
        ),
    )
}

/// The calls that screen a prompt: `text` cut to the call size limit (none when
/// there is no text), or why it cannot be screened. `token_ids`: the prompt carries
/// token ids, which no text check can read; `field` names the prompt's field.
pub fn prompt_calls<'t>(
    safety: &Safety,
    text: &'t str,
    token_ids: bool,
    field: &'static str,
) -> Result<Vec<&'t str>, ApiError> {
    if token_ids {
        return Err(ApiError::invalid_request(
            "invalid_value",
            format!(
                "'{field}' holds token ids, which the safety check cannot read; send the prompt as text."
            ),
        )
        .with_param(field));
    }
    calls(safety, text).ok_or_else(|| {
        ApiError::new(
            413,
            "invalid_request_error",
            "prompt_too_large_to_screen",
            format!(
                "The prompt is longer than the safety check accepts ({} bytes per check, at most {} checks).",
                safety.max_check_text_bytes,
                if safety.oversize_text == config::Oversize::Refuse { 1 } else { safety.max_checks_per_request }
            ),
        )
    })
}

/// The calls that screen a non-streamed response's text, or the error the client
/// gets instead of a response that cannot be screened.
pub fn response_calls<'t>(safety: &Safety, text: &'t str) -> Result<Vec<&'t str>, ApiError> {
    calls(safety, text).ok_or_else(response_too_large)
}

/// A response the gateway cannot screen is never passed on, whatever `fail_open`
/// says (that is about the service being down, not about text past the limits).
pub fn response_too_large() -> ApiError {
    ApiError::new(
        502,
        "server_error",
        "response_too_large_to_screen",
        "The model's response is larger than the safety check can screen.".into(),
    )
}

fn calls<'t>(safety: &Safety, text: &'t str) -> Option<Vec<&'t str>> {
    if text.trim().is_empty() {
        return Some(Vec::new());
    }
    let pieces = text::split(
        text,
        safety.max_check_text_bytes,
        safety.check_overlap_bytes,
    );
    let allowed = match safety.oversize_text {
        config::Oversize::Refuse => 1,
        config::Oversize::Split => safety.max_checks_per_request,
    };
    (pieces.len() <= allowed).then_some(pieces)
}

/// The closing event of a stream cut by the response check: an OpenAI-style error
/// object as the last event (in place of `[DONE]`), which OpenAI clients raise as
/// an API error.
pub fn error_event(error_json: &[u8], event_break: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(error_json.len() + 11);
    if event_break {
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(error_json);
    out.extend_from_slice(b"\n\n");
    out
}

#[cfg(test)]
mod tests;
