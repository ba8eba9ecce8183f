//! The OpenAI shapes the simulator reads and writes.

use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

#[derive(Debug, Deserialize)]
pub struct Request {
    pub model: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<Value>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub prompt: Option<Value>,
    #[serde(default)]
    pub messages: Option<Value>,
    #[serde(default)]
    pub input: Option<Value>,
    /// vLLM's extension: with `--scheduling-policy priority`, lower runs first.
    #[serde(default)]
    pub priority: Option<Value>,
    /// Completions only: the response text starts with the prompt (OpenAI's and
    /// vLLM's `echo`).
    #[serde(default)]
    pub echo: Option<bool>,
    /// Simulator only: generate exactly this text (split into word tokens)
    /// instead of words drawn from its vocabulary, so a test can make the model
    /// "say" something in the middle of a stream.
    #[serde(default)]
    pub sim_output: Option<String>,
}

impl Request {
    pub fn model(&self) -> Option<&str> {
        self.model
            .as_ref()
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
    }

    /// The `priority` field as an integer (0 when absent or not a number).
    pub fn priority(&self) -> i64 {
        match &self.priority {
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().map(|f| f as i64))
                .unwrap_or(0),
            _ => 0,
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// All prompt text: prompt strings, message contents (string or text parts), input.
    pub fn prompt_text(&self) -> String {
        let mut parts = Vec::new();
        for v in [&self.prompt, &self.input].into_iter().flatten() {
            collect_text(v, &mut parts);
        }
        if let Some(Value::Array(ms)) = &self.messages {
            for m in ms {
                if let Some(c) = m.get("content") {
                    collect_text(c, &mut parts);
                }
            }
        }
        parts.join("\n")
    }
}

fn collect_text(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_text(i, out)),
        Value::Object(o) => {
            if let Some(Value::String(t)) = o.get("text") {
                out.push(t.clone());
            }
        }
        _ => {}
    }
}

pub fn error(message: &str, kind: &str, code: &str, param: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

pub fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The whole (non-streamed) answer.
pub fn response(
    ep: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: &str,
    usage: Value,
) -> Value {
    let choice = match ep {
        Endpoint::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
        }
        Endpoint::Completions => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        }
    };
    json!({"id": id, "object": object(ep, false), "created": created, "model": model, "choices": [choice], "usage": usage})
}

/// One streamed chunk: a token (`finish` None) or the closing chunk (`finish` set).
pub fn chunk(
    ep: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    token: Option<&str>,
    first: bool,
    finish: Option<&str>,
) -> Value {
    let choice = match ep {
        Endpoint::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = token {
                delta["content"] = json!(t);
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
        Endpoint::Completions => {
            json!({"index": 0, "text": token.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        }
    };
    json!({"id": id, "object": object(ep, true), "created": created, "model": model, "choices": [choice]})
}

/// The final usage chunk (`stream_options.include_usage`): no choices.
pub fn usage_chunk(ep: Endpoint, id: &str, created: u64, model: &str, usage: Value) -> Value {
    json!({"id": id, "object": object(ep, true), "created": created, "model": model, "choices": [], "usage": usage})
}

fn object(ep: Endpoint, streamed: bool) -> &'static str {
    match (ep, streamed) {
        (Endpoint::Chat, false) => "chat.completion",
        (Endpoint::Chat, true) => "chat.completion.chunk",
        (Endpoint::Completions, _) => "text_completion",
    }
}

pub fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

pub const SSE_DONE: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let r = response(Endpoint::Chat, "id1", 1, "m", "hi", "length", usage(2, 1));
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"]["content"], "hi");
        assert_eq!(r["usage"]["total_tokens"], 3);
        let c = chunk(Endpoint::Chat, "id1", 1, "m", Some("x"), true, None);
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(c["choices"][0]["delta"]["content"], "x");
        let c = chunk(Endpoint::Completions, "id1", 1, "m", Some("x"), false, None);
        assert_eq!(c["choices"][0]["text"], "x");
        let u = usage_chunk(Endpoint::Chat, "id1", 1, "m", usage(1, 1));
        assert_eq!(u["choices"].as_array().unwrap().len(), 0);
        assert_eq!(sse(&json!({"a":1})), "data: {\"a\":1}\n\n");
    }

    #[test]
    fn reads_prompt_text() {
        let r: Request = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]},{"role":"user","content":"b"}],
                "stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_text(), "a\nb");
        assert!(r.include_usage());
        assert_eq!(r.model(), Some("m"));
        assert_eq!(r.priority(), 0);
        let r: Request = serde_json::from_str(r#"{"model":"m","priority":-3}"#).unwrap();
        assert_eq!(r.priority(), -3);
    }
}
