//! OpenAI request bodies: the fields the gateway routes on, read without copying
//! the rest, and the `model` rewrite done by splicing bytes so that everything
//! else in the body reaches the model server exactly as the client sent it.

use super::json::Node;
use super::{prompt, ApiError};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::ops::Range;

/// The inference endpoints the gateway understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    ChatCompletions,
    Embeddings,
    Responses,
    /// `GET /v1/models`, answered by the gateway from its configuration.
    Models,
}

impl ApiKind {
    /// Classifies a `:path` (query string ignored). `None`: not an OpenAI endpoint.
    pub fn from_path(path: &str) -> Option<ApiKind> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/completions" => Some(ApiKind::Completions),
            "/v1/chat/completions" => Some(ApiKind::ChatCompletions),
            "/v1/embeddings" => Some(ApiKind::Embeddings),
            "/v1/responses" => Some(ApiKind::Responses),
            "/v1/models" => Some(ApiKind::Models),
            _ => None,
        }
    }

    pub fn method(self) -> &'static str {
        match self {
            ApiKind::Models => "GET",
            _ => "POST",
        }
    }

    /// The body field that carries the prompt.
    pub fn prompt_field(self) -> &'static str {
        match self {
            ApiKind::Completions => "prompt",
            ApiKind::ChatCompletions => "messages",
            ApiKind::Embeddings | ApiKind::Responses | ApiKind::Models => "input",
        }
    }
}

/// What the gateway needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub model: String,
    /// Byte range of the `model` value (with its quotes) in the body.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// `stream_options.include_usage`: the server sends a final usage chunk.
    pub include_usage: bool,
    /// vLLM's `priority` field, when the body carries one.
    pub priority: Option<i32>,
    /// Everything the model may read, in body order, joined with newlines: what the
    /// prompt check screens and the prefix scorer hashes (see [`prompt`]).
    pub prompt: String,
    /// Image, audio, video and file parts, which the text check does not see.
    pub media_parts: u32,
    /// The prompt carries token ids, which a text check cannot read.
    pub token_ids: bool,
}

/// Only the `model` value, as written, for its byte range when it has escapes.
#[derive(Deserialize)]
struct ModelOnly<'a> {
    #[serde(borrow)]
    model: &'a RawValue,
}

/// Parses a request body for `kind`. Every failure is a 400 in the OpenAI shape.
pub fn parse(kind: ApiKind, body: &[u8]) -> Result<ParsedRequest, ApiError> {
    let text = simdutf8::basic::from_utf8(body)
        .map_err(|_| ApiError::invalid_request("invalid_json", "The request body is not UTF-8."))?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid_request(
            "invalid_json",
            "The request body is empty; send a JSON object.",
        ));
    }
    let root = Node::parse(text).map_err(|e| {
        ApiError::invalid_request(
            "invalid_json",
            format!("The request body is not valid JSON: {e}."),
        )
    })?;
    let Node::Object(members) = &root else {
        return Err(ApiError::invalid_request(
            "invalid_json",
            "The request body must be a JSON object.",
        ));
    };

    let missing_model = || {
        ApiError::invalid_request(
            "missing_model",
            "You must provide a model parameter (a non-empty string).",
        )
        .with_param("model")
    };
    let model = match root.get("model") {
        Some(Node::Str(m)) if !m.is_empty() => m,
        _ => return Err(missing_model()),
    };
    let model_span = model_span(text, model).ok_or_else(missing_model)?;

    let stream = match root.get("stream") {
        None | Some(Node::Null) | Some(Node::Bool(false)) => false,
        Some(Node::Bool(true)) => true,
        Some(_) => return Err(bad_param("stream", "must be a boolean")),
    };
    let include_usage = matches!(
        root.get("stream_options")
            .and_then(|o| o.get("include_usage")),
        Some(Node::Bool(true))
    );
    let priority = match root.get("priority") {
        None | Some(Node::Null) => None,
        Some(Node::Number(n)) => Some(
            n.parse::<i32>()
                .map_err(|_| bad_param("priority", "must be an integer"))?,
        ),
        Some(_) => return Err(bad_param("priority", "must be an integer")),
    };

    let field = kind.prompt_field();
    if kind != ApiKind::Models && matches!(root.get(field), None | Some(Node::Null)) {
        return Err(ApiError::invalid_request(
            "missing_required_parameter",
            format!("Missing required parameter: '{field}'."),
        )
        .with_param(field));
    }
    let read = prompt::read(kind, members)?;

    Ok(ParsedRequest {
        model: model.to_string(),
        model_span,
        stream,
        include_usage,
        priority,
        prompt: read.text,
        media_parts: read.media_parts,
        token_ids: read.token_ids,
    })
}

/// The byte range of the `model` value, quotes included. A model name without
/// escapes is borrowed from the body, so its place is known; one with escapes is
/// found by a second, shallow parse.
#[allow(clippy::ptr_arg)] // whether the Cow borrows is what this function looks at
fn model_span(text: &str, model: &Cow<'_, str>) -> Option<Range<usize>> {
    if let Cow::Borrowed(m) = model {
        let start = (m.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
        let span = start.checked_sub(1)?..start + m.len() + 1;
        let quoted = text.get(span.clone())?;
        if quoted.starts_with('"') && quoted.ends_with('"') && quoted.len() == m.len() + 2 {
            return Some(span);
        }
    }
    let raw = serde_json::from_str::<ModelOnly>(text).ok()?.model.get();
    let start = (raw.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    Some(start..start + raw.len())
}

/// Returns `body` with the `model` value at `span` replaced by `new_model`.
pub fn rewrite_model(body: &[u8], span: &Range<usize>, new_model: &str) -> Vec<u8> {
    // A `String` always serialises; the quoted fallback is never used.
    let quoted = serde_json::to_string(new_model).unwrap_or_else(|_| format!("\"{new_model}\""));
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out
}

fn bad_param(param: &'static str, what: &str) -> ApiError {
    ApiError::invalid_request("invalid_value", format!("'{param}' {what}.")).with_param(param)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(ApiKind::ChatCompletions, body.as_bytes())
    }

    #[test]
    fn classifies_paths() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            Some(ApiKind::ChatCompletions)
        );
        assert_eq!(
            ApiKind::from_path("/v1/completions?x=1"),
            Some(ApiKind::Completions)
        );
        assert_eq!(
            ApiKind::from_path("/v1/embeddings/"),
            Some(ApiKind::Embeddings)
        );
        assert_eq!(
            ApiKind::from_path("/v1/responses"),
            Some(ApiKind::Responses)
        );
        assert_eq!(ApiKind::from_path("/v1/models"), Some(ApiKind::Models));
        assert_eq!(ApiKind::from_path("/v1/chat"), None);
        assert_eq!(ApiKind::from_path("/health"), None);
    }

    #[test]
    fn parses_chat() {
        let r = chat(
            r#"{"model":"m1","stream":true,"stream_options":{"include_usage":true},"priority":-2,
                "messages":[{"role":"system","content":"be brief"},
                            {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m1");
        assert!(r.stream);
        assert!(r.include_usage);
        assert_eq!(r.priority, Some(-2));
        assert_eq!(r.prompt, "be brief\nhi");
    }

    #[test]
    fn parses_completions_prompts() {
        let p = |b: &str| parse(ApiKind::Completions, b.as_bytes()).map(|r| r.prompt);
        assert_eq!(p(r#"{"model":"m","prompt":"once"}"#).unwrap(), "once");
        assert_eq!(p(r#"{"model":"m","prompt":["a","b"]}"#).unwrap(), "a\nb");
        assert_eq!(p(r#"{"model":"m","prompt":[1,2,3]}"#).unwrap(), "");
        assert_eq!(
            p(r#"{"model":"m","prompt":{"x":1}}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("prompt")
        );
        assert_eq!(
            p(r#"{"model":"m"}"#).unwrap_err().code,
            "missing_required_parameter"
        );
    }

    #[test]
    fn parses_responses_and_embeddings() {
        let r = parse(
            ApiKind::Responses,
            br#"{"model":"m","instructions":"sys","input":[{"role":"user","content":[{"type":"input_text","text":"q"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, "sys\nq");
        let r = parse(ApiKind::Embeddings, br#"{"model":"e","input":["x","y"]}"#).unwrap();
        assert_eq!(r.prompt, "x\ny");
    }

    #[test]
    fn rejects_bad_bodies_with_400() {
        for (body, code) in [
            ("", "invalid_json"),
            ("{", "invalid_json"),
            ("[1,2]", "invalid_json"),
            ("\"str\"", "invalid_json"),
            (r#"{"messages":[]}"#, "missing_model"),
            (r#"{"model":null,"messages":[]}"#, "missing_model"),
            (r#"{"model":42,"messages":[]}"#, "missing_model"),
            (r#"{"model":"","messages":[]}"#, "missing_model"),
            (r#"{"model":"a","model":"b","messages":[]}"#, "invalid_json"),
            (
                r#"{"model":"a","stream":"yes","messages":[]}"#,
                "invalid_value",
            ),
            (
                r#"{"model":"a","priority":1.5,"messages":[]}"#,
                "invalid_value",
            ),
            (
                r#"{"model":"a","priority":99999999999,"messages":[]}"#,
                "invalid_value",
            ),
            (r#"{"model":"a","messages":"hi"}"#, "invalid_value"),
            (r#"{"model":"a","messages":[1]}"#, "invalid_value"),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!((e.status, e.code), (400, code), "body {body:?}");
        }
        let e = parse(ApiKind::ChatCompletions, b"{\"model\":\"\xff\"}").unwrap_err();
        assert_eq!(e.code, "invalid_json");
    }

    #[test]
    fn rewrite_preserves_everything_else() {
        let body = br#"{ "messages" : [{"role":"user","content":"x"}],  "model":"base", "temperature": 0.70}"#;
        let r = parse(ApiKind::ChatCompletions, body).unwrap();
        assert_eq!(&body[r.model_span.clone()], br#""base""#);
        let out = rewrite_model(body, &r.model_span, "lora-\"v2\"");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "messages" : [{"role":"user","content":"x"}],  "model":"lora-\"v2\"", "temperature": 0.70}"#
        );
        let again = parse(ApiKind::ChatCompletions, &out).unwrap();
        assert_eq!(again.model, "lora-\"v2\"");
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let r = chat(r#"{"model":"a\u002fb","messages":[]}"#).unwrap();
        assert_eq!(r.model, "a/b");
    }
}
