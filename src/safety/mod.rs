//! AI safety checks through Model Armor's REST shape: which template screens a
//! model's prompts and responses, the callout request, and the verdict. Pure: the
//! filter sends the request with `dispatch_http_call` and hands back the answer.
//!
//! `POST {base}/v1/{template}:sanitizeUserPrompt`   `{"userPromptData":{"text":…}}`
//! `POST {base}/v1/{template}:sanitizeModelResponse` `{"modelResponseData":{"text":…}}`
//! where `template` is `projects/{p}/locations/{l}/templates/{t}`; the verdict is
//! `sanitizationResult.filterMatchState` = `MATCH_FOUND` | `NO_MATCH_FOUND`.

pub mod config;
pub mod sse;
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

/// The text of a non-streamed OpenAI response: choices' message content or text.
pub fn response_text(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let mut parts = Vec::new();
    if let Some(Value::Array(choices)) = v.get("choices") {
        for c in choices {
            if let Some(t) = c.get("text").and_then(Value::as_str) {
                parts.push(t.to_string());
            }
            if let Some(t) = c.pointer("/message/content").and_then(Value::as_str) {
                parts.push(t.to_string());
            }
        }
    }
    // Responses API: output[].content[].text
    if let Some(Value::Array(output)) = v.get("output") {
        for o in output {
            if let Some(Value::Array(content)) = o.get("content") {
                for c in content {
                    if let Some(t) = c.get("text").and_then(Value::as_str) {
                        parts.push(t.to_string());
                    }
                }
            }
        }
    }
    Some(parts.join("\n"))
}

#[cfg(test)]
mod tests;
