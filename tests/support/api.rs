//! Client-side helpers for the end-to-end tests: OpenAI request bodies, error
//! shapes and SSE streams as a client sees them through the gateway.

use super::sim::SERVER_ID_HEADER;
use serde_json::{json, Value};

pub fn chat(model: &str, content: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8
    })
}

/// A streamed completion of `max_tokens` tokens: what keeps a replica busy.
pub fn streamed_completion(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": true})
}

/// Posts `body` to `url` and reads the stream to its end in the background, so the
/// request stays running on the server until it finishes or the task is aborted.
pub fn hold_stream(url: String, body: Value) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = super::http_client();
        if let Ok(mut resp) = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
        {
            while let Ok(Some(_)) = resp.chunk().await {}
        }
    })
}

pub fn server_id(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(SERVER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {SERVER_ID_HEADER} in {:?}", resp.headers()))
        .to_string()
}

/// Status, content type and parsed body of a response the gateway should have
/// answered with an OpenAI error.
pub async fn openai_error(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "status {status}: content-type '{content_type}', body: {text}"
    );
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty())
            && err["type"].is_string()
            && err["code"].is_string()
            && err.get("param").is_some(),
        "not an OpenAI error: {body}"
    );
    (status, body)
}

/// Every `data:` payload of an SSE body.
pub fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

/// The concatenated `choices[0].delta.content` of chat completion chunks.
pub fn streamed_content(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// A Python with the official `openai` client (CI installs it into `.venv`), or
/// `None` after announcing that `test` is skipped.
pub fn openai_python(test: &str) -> Option<std::path::PathBuf> {
    let venv = super::repo_root().join(".venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        "python3".into()
    };
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if has_openai {
        Some(python)
    } else {
        super::announce(&format!("SKIPPED {test}: no python with `openai`"));
        None
    }
}

/// Runs a Python script; panics with its output unless it exits 0.
pub fn run_python(python: &std::path::Path, script: &str) {
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .env("NO_PROXY", "*")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
