//! The model-server simulator binary over real HTTP: OpenAI shapes (JSON and SSE),
//! its id header, the request recorder, errors, vLLM metrics, shutdown, and the
//! official `openai` Python client against it.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};
use support::sim::{Sim, SimOptions, SERVER_ID_HEADER};

fn start(models: &str, per_token_ms: u64) -> (Sim, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SimOptions {
        models: models.into(),
        per_token_ms,
        ..Default::default()
    };
    let sim = Sim::start("t1", &opts, dir.path()).expect("simulator starts");
    (sim, dir)
}

#[tokio::test]
async fn answers_chat_and_completions_as_json() {
    let (sim, _dir) = start("m1,m2", 1);
    let client = support::http_client();
    let resp = client
        .post(sim.url("/v1/chat/completions"))
        .json(&json!({"model": "m1", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[SERVER_ID_HEADER], "t1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "m1");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());

    let v: Value = client
        .post(sim.url("/v1/completions"))
        .json(&json!({"model": "m2", "prompt": "once upon", "max_tokens": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["total_tokens"], 5);

    let recorded = sim.requests(&client).await;
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0]["path"], "/v1/chat/completions");
    assert_eq!(recorded[0]["body"]["model"], "m1");
    sim.clear(&client).await;
    assert!(sim.requests(&client).await.is_empty());
}

#[tokio::test]
async fn streams_tokens_over_time_with_usage_and_done() {
    let (sim, _dir) = start("*", 20);
    let client = support::http_client();
    let started = Instant::now();
    let resp = client
        .post(sim.url("/v1/chat/completions"))
        .json(
            &json!({"model": "any", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    // 10 tokens at 20 ms each: the stream cannot be faster than the token clock.
    assert!(
        started.elapsed() >= Duration::from_millis(180),
        "{:?}",
        started.elapsed()
    );
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    let content: usize = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    assert_eq!(content, 10);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 10);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
}

#[tokio::test]
async fn errors_in_the_openai_shape() {
    let (sim, _dir) = start("m1", 1);
    let client = support::http_client();
    let resp = client
        .post(sim.url("/v1/chat/completions"))
        .json(&json!({"model": "other", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    let resp = client
        .post(sim.url("/v1/completions"))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn metrics_use_vllm_names_and_running_counts() {
    let (sim, _dir) = start("m1", 50);
    let client = support::http_client();
    let slow = {
        let c = client.clone();
        let url = sim.url("/v1/completions");
        tokio::spawn(async move {
            c.post(url)
                .json(&json!({"model": "m1", "prompt": "x", "max_tokens": 20}))
                .send()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen_running = false;
    while Instant::now() < deadline && !seen_running {
        let text = client
            .get(sim.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seen_running = text.contains("vllm:num_requests_running{model_name=\"m1\"} 1");
        assert!(text.contains("# TYPE vllm:kv_cache_usage_perc gauge"));
        assert!(text.contains("vllm:num_requests_waiting{model_name=\"m1\"}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen_running,
        "the running request shows in vllm:num_requests_running"
    );
    slow.await.unwrap().unwrap();
    let text = client
        .get(sim.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("vllm:num_requests_running{model_name=\"m1\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("vllm:generation_tokens_total{model_name=\"m1\"} 20"),
        "{text}"
    );
}

#[test]
fn sigterm_stops_it_promptly() {
    let (mut sim, _dir) = start("*", 1);
    let t = Instant::now();
    // Not exiting within the grace means SIGKILL, which is not a success.
    let exited = sim.terminate(Duration::from_secs(5)).expect("was running");
    assert!(
        exited.success(),
        "did not exit cleanly on SIGTERM: {exited:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// The official `openai` client (CI installs it into .venv). Skipped, with a line
/// that says so, where no Python with `openai` is found.
#[test]
fn the_official_openai_client_works_against_it() {
    let python = support::repo_root().join(".venv/bin/python");
    let python = if python.exists() {
        python
    } else {
        "python3".into()
    };
    let has_openai = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_openai {
        support::announce(
            "SKIPPED the_official_openai_client_works_against_it: no python with `openai`",
        );
        return;
    }
    let (sim, _dir) = start("m1", 1);
    let base = format!("http://127.0.0.1:{}", sim.port);
    let script = format!(
        r#"
import openai
c = openai.OpenAI(base_url="{base}/v1", api_key="none", max_retries=0)
r = c.chat.completions.create(model="m1", messages=[{{"role": "user", "content": "hi"}}], max_tokens=4)
assert r.usage.completion_tokens == 4, r
assert r.choices[0].message.content
s = c.chat.completions.create(model="m1", messages=[{{"role": "user", "content": "hi"}}], max_tokens=3,
                              stream=True, stream_options={{"include_usage": True}})
parts = [ch for ch in s]
assert parts[-1].usage.completion_tokens == 3, parts[-1]
assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
t = c.completions.create(model="m1", prompt="x", max_tokens=2)
assert t.choices[0].text
try:
    c.chat.completions.create(model="nope", messages=[{{"role": "user", "content": "x"}}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404
print("ok")
"#,
    );
    let out = Command::new(&python)
        .args(["-c", &script])
        .env("NO_PROXY", "*")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
