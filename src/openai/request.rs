//! OpenAI request bodies: the fields the gateway routes on, read without copying
//! the rest, and the `model` rewrite done by splicing bytes so that everything
//! else in the body reaches the model server exactly as the client sent it.

use super::ApiError;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
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

    /// The body field that carries the prompt, for error messages.
    fn prompt_field(self) -> &'static str {
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
    /// The prompt's text: prompt strings, or the text parts of messages / input,
    /// joined with newlines. Token-id prompts contribute nothing.
    pub prompt: String,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
}

/// Parses a request body for `kind`. Every failure is a 400 in the OpenAI shape.
pub fn parse(kind: ApiKind, body: &[u8]) -> Result<ParsedRequest, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::invalid_request("invalid_json", "The request body is not UTF-8."))?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid_request(
            "invalid_json",
            "The request body is empty; send a JSON object.",
        ));
    }
    // serde also accepts a struct written as an array; a body must be an object.
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::invalid_request(
            "invalid_json",
            "The request body must be a JSON object.",
        ));
    }
    let wire: Wire = serde_json::from_str(text).map_err(|e| {
        ApiError::invalid_request(
            "invalid_json",
            format!("The request body is not valid JSON: {e}."),
        )
    })?;

    let missing_model = || {
        ApiError::invalid_request(
            "missing_model",
            "You must provide a model parameter (a non-empty string).",
        )
        .with_param("model")
    };
    let raw_model = wire
        .model
        .filter(|m| m.get() != "null")
        .ok_or_else(missing_model)?;
    let model: String = serde_json::from_str::<String>(raw_model.get())
        .ok()
        .filter(|m| !m.is_empty())
        .ok_or_else(missing_model)?;
    let start = raw_model.get().as_ptr() as usize - text.as_ptr() as usize;
    let model_span = start..start + raw_model.get().len();

    let stream = match wire.stream.map(RawValue::get) {
        None | Some("null") | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(bad_param("stream", "must be a boolean")),
    };
    let include_usage = match wire.stream_options {
        None => false,
        Some(raw) => serde_json::from_str::<Value>(raw.get())
            .ok()
            .and_then(|v| v.get("include_usage").and_then(Value::as_bool))
            .unwrap_or(false),
    };
    let priority = match wire.priority.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => Some(
            raw.parse::<i32>()
                .map_err(|_| bad_param("priority", "must be an integer"))?,
        ),
    };

    let prompt = match kind {
        ApiKind::Completions => {
            required(kind, wire.prompt).and_then(|p| prompt_text(p, "prompt"))?
        }
        ApiKind::ChatCompletions => required(kind, wire.messages).and_then(messages_text)?,
        ApiKind::Embeddings => required(kind, wire.input).and_then(|p| prompt_text(p, "input"))?,
        ApiKind::Responses => {
            let input = required(kind, wire.input).and_then(responses_input_text)?;
            match wire
                .instructions
                .map(|r| serde_json::from_str::<Value>(r.get()))
            {
                Some(Ok(Value::String(s))) if !s.is_empty() => format!("{s}\n{input}"),
                _ => input,
            }
        }
        ApiKind::Models => String::new(),
    };

    Ok(ParsedRequest {
        model,
        model_span,
        stream,
        include_usage,
        priority,
        prompt,
    })
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

fn required(kind: ApiKind, raw: Option<&RawValue>) -> Result<Value, ApiError> {
    let field = kind.prompt_field();
    let missing = || {
        ApiError::invalid_request(
            "missing_required_parameter",
            format!("Missing required parameter: '{field}'."),
        )
        .with_param(field)
    };
    let raw = raw.ok_or_else(missing)?;
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Null) | Err(_) => Err(missing()),
        Ok(v) => Ok(v),
    }
}

/// `prompt` / `input` of completions and embeddings: a string, an array of strings,
/// or token ids (which carry no text).
fn prompt_text(v: Value, param: &'static str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s),
        Value::Array(items) => {
            let mut parts = Vec::new();
            for item in items {
                match item {
                    Value::String(s) => parts.push(s),
                    Value::Number(_) | Value::Array(_) => {}
                    _ => {
                        return Err(bad_param(
                            param,
                            "must be a string, an array of strings or token ids",
                        ))
                    }
                }
            }
            Ok(parts.join("\n"))
        }
        _ => Err(bad_param(
            param,
            "must be a string, an array of strings or token ids",
        )),
    }
}

/// Chat `messages`: an array of objects whose `content` is a string or an array of
/// parts; the text parts are kept.
fn messages_text(v: Value) -> Result<String, ApiError> {
    let Value::Array(messages) = v else {
        return Err(bad_param("messages", "must be an array of message objects"));
    };
    let mut parts = Vec::new();
    for m in &messages {
        let Value::Object(m) = m else {
            return Err(bad_param("messages", "must be an array of message objects"));
        };
        content_text(m.get("content"), &mut parts);
    }
    Ok(parts.join("\n"))
}

/// Responses API `input`: a string, or an array of items with `content`.
fn responses_input_text(v: Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s),
        Value::Array(items) => {
            let mut parts = Vec::new();
            for item in &items {
                match item {
                    Value::String(s) => parts.push(s.clone()),
                    Value::Object(o) => content_text(o.get("content"), &mut parts),
                    _ => {
                        return Err(bad_param(
                            "input",
                            "must be a string or an array of input items",
                        ))
                    }
                }
            }
            Ok(parts.join("\n"))
        }
        _ => Err(bad_param(
            "input",
            "must be a string or an array of input items",
        )),
    }
}

fn content_text(content: Option<&Value>, out: &mut Vec<String>) {
    match content {
        Some(Value::String(s)) => out.push(s.clone()),
        Some(Value::Array(parts)) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push(t.to_string());
                }
            }
        }
        _ => {}
    }
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
            p(r#"{"model":"m","prompt":{"x":1}}"#).unwrap_err().param,
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
