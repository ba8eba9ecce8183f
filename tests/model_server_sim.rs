//! The model-server simulator binary over real HTTP: OpenAI shapes (JSON and SSE),
//! its id header, the request recorder, errors, vLLM metrics, shutdown, the
//! official `openai` Python client against it, and the engine model seen from
//! outside: batching limits, the prefix cache, LoRA adapters, disconnects, flavors.
//! Timing checks compare quantities with wide margins (2 shared cores).

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::sim::{sample, Sim, SimOptions, SERVER_ID_HEADER};

fn start(models: &str, per_token_ms: u64) -> (Sim, tempfile::TempDir) {
    start_with(models, per_token_ms, &[])
}

fn start_with(models: &str, per_token_ms: u64, extra: &[&str]) -> (Sim, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SimOptions {
        models: models.into(),
        per_token_ms,
        extra_args: extra.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let sim = Sim::start("t1", &opts, dir.path()).expect("simulator starts");
    (sim, dir)
}

/// Polls `/metrics` until `done` holds (returns that text) or 20 s pass (panics
/// with the last text).
async fn metrics_until(
    sim: &Sim,
    client: &reqwest::Client,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = sim.metrics(client).await;
        if done(&text) {
            return text;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not seen in time; last /metrics:\n{text}\n{}",
                sim.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts a streamed completion and returns once its headers are in (the engine
/// has queued it).
async fn stream(
    client: &reqwest::Client,
    sim: &Sim,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> reqwest::Response {
    let resp = client
        .post(sim.url("/v1/completions"))
        .json(&json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// Seconds from sending a streamed request to its first chunk.
async fn ttft(client: &reqwest::Client, sim: &Sim, prompt: &str) -> f64 {
    let t = Instant::now();
    let mut resp = stream(client, sim, "m1", prompt, 2).await;
    resp.chunk().await.unwrap().expect("a first chunk");
    let secs = t.elapsed().as_secs_f64();
    while resp.chunk().await.unwrap().is_some() {}
    secs
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
    let Some(python) = support::api::openai_python("the_official_openai_client_works_against_it")
    else {
        return;
    };
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
    support::api::run_python(&python, &script);
}

const RUNNING: &str = "vllm:num_requests_running{model_name=\"m1\"}";
const WAITING: &str = "vllm:num_requests_waiting{model_name=\"m1\"}";
const KV: &str = "vllm:kv_cache_usage_perc{model_name=\"m1\"}";

#[tokio::test]
async fn max_num_seqs_caps_the_batch_and_disconnects_free_everything() {
    let (sim, _dir) = start_with("m1", 20, &["--max-num-seqs", "2"]);
    let client = support::http_client();
    let mut streams = Vec::new();
    for i in 0..4 {
        streams.push(stream(&client, &sim, "m1", &format!("story number {i}"), 500).await);
    }
    let text = metrics_until(&sim, &client, "2 running, 2 waiting", |t| {
        sample(t, RUNNING) == Some(2.0) && sample(t, WAITING) == Some(2.0)
    })
    .await;
    assert!(
        sample(&text, KV).unwrap() > 0.0,
        "running requests hold KV blocks"
    );
    // Read a little of one: tokens flow while the others wait.
    let first = streams[0].chunk().await.unwrap().expect("a chunk");
    assert!(first.starts_with(b"data: "));

    // Clients gone: their slots, queue places and blocks are freed.
    drop(streams);
    let text = metrics_until(&sim, &client, "all released", |t| {
        sample(t, RUNNING) == Some(0.0) && sample(t, WAITING) == Some(0.0)
    })
    .await;
    assert_eq!(sample(&text, KV), Some(0.0), "{text}");
    let aborted = r#"vllm:request_success_total{finished_reason="abort",model_name="m1"}"#;
    assert_eq!(sample(&text, aborted), Some(4.0), "{text}");

    // A non-streamed request whose client gives up is dropped as well.
    let slow = client
        .post(sim.url("/v1/completions"))
        .timeout(Duration::from_millis(300))
        .json(&json!({"model": "m1", "prompt": "x", "max_tokens": 500}))
        .send()
        .await;
    assert!(slow.is_err(), "timed out");
    let text = metrics_until(&sim, &client, "released after timeout", |t| {
        sample(t, RUNNING) == Some(0.0)
    })
    .await;
    assert_eq!(sample(&text, KV), Some(0.0));
    assert_eq!(sample(&text, WAITING), Some(0.0));
}

#[tokio::test]
async fn a_repeated_long_prefix_gets_a_faster_first_token() {
    // Prefill dominates: 2 ms per uncached prompt token, 5 ms per decode step.
    let (sim, _dir) = start_with("m1", 5, &["--prefill-ms-per-token", "2"]);
    let client = support::http_client();
    let prompt: String = (0..400).map(|i| format!("w{i} ")).collect();
    let hits = r#"vllm:prefix_cache_hits_total{model_name="m1"}"#;
    let before = sample(&sim.metrics(&client).await, hits).unwrap();
    assert_eq!(before, 0.0);
    let cold = ttft(&client, &sim, &prompt).await;
    let after_cold = sample(&sim.metrics(&client).await, hits).unwrap();
    let warm = ttft(&client, &sim, &prompt).await;
    let after_warm = sample(&sim.metrics(&client).await, hits).unwrap();
    // 400 tokens cold: at least 0.8 s of prefill. Warm: all but the last partial
    // block is cached.
    assert!(cold >= 0.6, "cold TTFT {cold}");
    assert!(warm < cold / 2.0, "warm TTFT {warm} vs cold {cold}");
    assert_eq!(after_cold, 0.0);
    assert!(after_warm >= 300.0, "prefix hits {after_warm}");
    // The same prefix with a different ending still hits.
    let other = format!("{prompt} and then something else");
    let partial = ttft(&client, &sim, &other).await;
    assert!(
        partial < cold / 2.0,
        "shared-prefix TTFT {partial} vs cold {cold}"
    );
    let text = sim.metrics(&client).await;
    assert!(sample(&text, hits).unwrap() >= after_warm + 300.0, "{text}");
    let queries = r#"vllm:prefix_cache_queries_total{model_name="m1"}"#;
    assert!(sample(&text, queries).unwrap() >= 1200.0, "{text}");
}

/// The `vllm:lora_requests_info` series with the newest timestamp, as GIE reads it.
fn newest_lora_info(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| l.starts_with("vllm:lora_requests_info{"))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((v.parse::<f64>().ok()?, series.to_string()))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, s)| s)
}

#[tokio::test]
async fn lora_adapters_show_in_lora_requests_info() {
    let (sim, _dir) = start_with(
        "m1",
        20,
        &["--lora-adapters", "sql-lora,chat-lora", "--max-loras", "1"],
    );
    let client = support::http_client();
    let text = sim.metrics(&client).await;
    assert!(
        text.contains("# TYPE vllm:lora_requests_info gauge"),
        "{text}"
    );
    let a = stream(&client, &sim, "sql-lora", "select", 500).await;
    metrics_until(&sim, &client, "sql-lora running", |t| {
        newest_lora_info(t).is_some_and(|s| {
            s.contains(r#"running_lora_adapters="sql-lora""#) && s.contains(r#"max_lora="1""#)
        })
    })
    .await;
    // A second adapter has no slot while the first runs: it waits.
    let b = stream(&client, &sim, "chat-lora", "hello", 5).await;
    let text = metrics_until(&sim, &client, "chat-lora waiting", |t| {
        newest_lora_info(t).is_some_and(|s| {
            s.contains(r#"running_lora_adapters="sql-lora""#)
                && s.contains(r#"waiting_lora_adapters="chat-lora""#)
        })
    })
    .await;
    assert_eq!(sample(&text, WAITING), Some(1.0), "{text}");
    // The timestamp value is a Unix time.
    let ts: f64 = text
        .lines()
        .filter(|l| l.starts_with("vllm:lora_requests_info{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .fold(0.0, f64::max);
    assert!(ts > 1.6e9, "{text}");
    // The adapter's requests are served under the adapter's name.
    drop(a);
    let body = b.text().await.unwrap();
    assert!(body.contains(r#""model":"chat-lora""#), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
    let state = sim.state(&client).await;
    assert_eq!(state["running"], 0, "{state}");
}

#[tokio::test]
async fn sglang_and_tgi_flavors_use_their_names() {
    let client = support::http_client();
    let (sg, _d1) = start_with(
        "m1",
        20,
        &["--metrics-flavor", "sglang", "--max-num-seqs", "1"],
    );
    let _r1 = stream(&client, &sg, "m1", "a", 500).await;
    let _r2 = stream(&client, &sg, "m1", "b", 500).await;
    let text = metrics_until(&sg, &client, "sglang queue", |t| {
        sample(t, r#"sglang:num_queue_reqs{model_name="m1"}"#) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, r#"sglang:num_running_reqs{model_name="m1"}"#),
        Some(1.0)
    );
    let usage = sample(&text, r#"sglang:token_usage{model_name="m1"}"#).unwrap();
    assert!(usage > 0.0 && usage <= 1.0, "{text}");
    assert!(!text.contains("vllm:"), "{text}");

    let (tgi, _d2) = start_with("m1", 20, &["--metrics-flavor", "tgi"]);
    let _r3 = stream(&client, &tgi, "m1", "a", 500).await;
    let text = metrics_until(&tgi, &client, "tgi batch", |t| {
        sample(t, "tgi_batch_current_size") == Some(1.0)
    })
    .await;
    assert_eq!(sample(&text, "tgi_queue_size"), Some(0.0), "{text}");
}

#[tokio::test]
async fn requests_longer_than_the_kv_cache_are_refused() {
    let (sim, _dir) = start_with("m1", 1, &["--num-gpu-blocks", "4", "--block-size", "16"]);
    let client = support::http_client();
    let resp = client
        .post(sim.url("/v1/completions"))
        .json(&json!({"model": "m1", "prompt": "hi", "max_tokens": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let ok = client
        .post(sim.url("/v1/completions"))
        .json(&json!({"model": "m1", "prompt": "hi", "max_tokens": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn zero_cost_mode_answers_at_once() {
    let (sim, _dir) = start("m1", 0);
    let client = support::http_client();
    let t = Instant::now();
    for _ in 0..20 {
        let v: Value = client
            .post(sim.url("/v1/completions"))
            .json(&json!({"model": "m1", "prompt": "a b c", "max_tokens": 64}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 64);
    }
    // 20 × 64 tokens at the default 20 ms a step would be 25 s.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
