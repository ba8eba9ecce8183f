//! The HTTP surface: OpenAI endpoints, `/health`, `/metrics`, and test hooks.

use super::driver::Driver;
use super::engine::{NewRequest, Rejected};
use super::metrics;
use super::openai::{self, Endpoint, Request};
use super::record::{Received, Recorder};
use super::{tokens, SimConfig, SERVER_ID_HEADER};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

struct App {
    config: SimConfig,
    driver: Driver,
    recorder: Recorder,
    /// Generation requests in progress (accepted, response not yet finished or
    /// dropped), and the most ever at once: `/sim/state` reports both, so a
    /// test can check a gateway's per-endpoint concurrency cap from the
    /// server's side.
    concurrent: AtomicU64,
    max_concurrent: AtomicU64,
}

/// One generation request in progress; counted down when dropped (the response
/// finished, or the client went away).
struct InProgress(Arc<App>);

impl InProgress {
    fn new(app: &Arc<App>) -> InProgress {
        let now = app.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        app.max_concurrent.fetch_max(now, Ordering::SeqCst);
        InProgress(Arc::clone(app))
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.concurrent.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves the simulator on `listener` until `shutdown` completes.
pub async fn serve(
    config: SimConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The largest request body the simulator reads.
const MAX_BODY_BYTES: usize = 64 << 20;

/// The simulator's routes. Starts the engine loop: call within a tokio runtime.
pub fn router(config: SimConfig) -> Router {
    let id = HeaderValue::from_str(&config.id).unwrap_or_else(|_| HeaderValue::from_static("sim"));
    let app = Arc::new(App {
        driver: Driver::start(config.build_engine()),
        recorder: Recorder::new(config.record_capacity),
        config,
        concurrent: AtomicU64::new(0),
        max_concurrent: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .route("/sim/requests", get(requests).delete(clear_requests))
        .route("/sim/state", get(state))
        .with_state(app)
        // axum refuses bodies over 2 MB by default; vLLM takes what the model's
        // context holds, and the gateway's own limit defaults to 4 MiB.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let id = id.clone();
            async move {
                res.headers_mut().insert(SERVER_ID_HEADER, id);
                res
            }
        }))
}

fn now() -> (u64, u64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.as_millis() as u64)
}

fn error(status: StatusCode, message: &str, code: &str, param: Option<&str>) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    (status, Json(openai::error(message, kind, code, param))).into_response()
}

fn record(app: &App, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) {
    if app.config.record_capacity == 0 {
        return;
    }
    let headers = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    app.recorder.push(Received {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers,
        body,
        received_at_ms: now().1,
    });
}

/// Parses and checks a request: JSON, model present and served.
#[allow(clippy::result_large_err)] // the error is the response itself, built once
fn accept(app: &App, body: &Bytes) -> Result<(Request, String), Response> {
    let req: Request = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("invalid JSON body: {e}"),
            "invalid_json",
            None,
        )
    })?;
    let model = req
        .model()
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "model is required",
                "missing_model",
                Some("model"),
            )
        })?
        .to_string();
    if !app.config.serves(&model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist."),
            "model_not_found",
            Some("model"),
        ));
    }
    Ok((req, model))
}

async fn completions(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(app, Endpoint::Completions, method, uri, headers, body).await
}

async fn chat(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(app, Endpoint::Chat, method, uri, headers, body).await
}

async fn generate(
    app: Arc<App>,
    ep: Endpoint,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&app, &method, &uri, &headers, &body);
    let (req, model) = match accept(&app, &body) {
        Ok(r) => r,
        Err(res) => return res,
    };
    let in_progress = InProgress::new(&app);
    let prompt = req.prompt_text();
    let prompt_tokens = tokens::count(&prompt);
    let scripted: Option<Vec<String>> = req
        .sim_output
        .as_ref()
        .map(|t| t.split_inclusive(' ').map(str::to_string).collect());
    let max_tokens = match &scripted {
        Some(words) => (words.len() as u32).clamp(1, app.config.max_tokens_cap),
        None => req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(app.config.max_tokens_default)
            .clamp(1, app.config.max_tokens_cap),
    };
    let output = scripted.unwrap_or_else(|| tokens::generate(app.config.seed, &prompt, max_tokens));
    // Completions' `echo`: the text starts with the prompt (not a generated token).
    let echo = (ep == Endpoint::Completions && req.echo == Some(true)).then(|| prompt.clone());
    let (created, millis) = now();
    let id = format!(
        "{}-{}-{millis}",
        if ep == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        app.config.id
    );
    let usage = openai::usage(prompt_tokens, max_tokens);
    let submitted = app.driver.submit(NewRequest {
        model: model.clone(),
        prompt: tokens::ids(&prompt),
        max_tokens,
        priority: req.priority(),
    });
    // The stream lives in the response: a client that goes away drops it, which
    // aborts the request and frees its KV blocks.
    let mut stream = match submitted {
        Ok(s) => s,
        Err(Rejected::TooLong { tokens, limit }) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "This model's maximum context length is {limit} tokens. However, you requested {tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion."
                ),
                "context_length_exceeded",
                Some("max_tokens"),
            )
        }
    };

    if req.stream != Some(true) {
        let mut n = 0;
        while let Some(ev) = stream.next().await {
            n += 1;
            if ev.last {
                break;
            }
        }
        if n < output.len() {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the engine stopped before the request finished",
                "engine_error",
                None,
            );
        }
        let text = format!("{}{}", echo.unwrap_or_default(), output.concat());
        return Json(openai::response(
            ep, &id, created, &model, &text, "length", usage,
        ))
        .into_response();
    }

    let include_usage = req.include_usage();
    let body = async_stream::stream! {
        let _in_progress = in_progress;
        let mut stream = stream;
        if let Some(prompt) = &echo {
            let c = openai::chunk(ep, &id, created, &model, Some(prompt), true, None);
            yield Ok::<_, Infallible>(Bytes::from(openai::sse(&c)));
        }
        while let Some(ev) = stream.next().await {
            let i = ev.index as usize;
            let t = output.get(i).map(String::as_str).unwrap_or("");
            let c = openai::chunk(ep, &id, created, &model, Some(t), i == 0, None);
            yield Ok::<_, Infallible>(Bytes::from(openai::sse(&c)));
            if ev.last {
                break;
            }
        }
        let c = openai::chunk(ep, &id, created, &model, None, false, Some("length"));
        yield Ok(Bytes::from(openai::sse(&c)));
        if include_usage {
            yield Ok(Bytes::from(openai::sse(&openai::usage_chunk(ep, &id, created, &model, usage))));
        }
        yield Ok(Bytes::from_static(openai::SSE_DONE.as_bytes()));
    };
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

async fn embeddings(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&app, &method, &uri, &headers, &body);
    let (req, model) = match accept(&app, &body) {
        Ok(r) => r,
        Err(res) => return res,
    };
    let text = req.prompt_text();
    let mut rng = fastrand::Rng::with_seed(app.config.seed ^ text.len() as u64);
    let vector: Vec<f32> = (0..8).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let n = tokens::count(&text);
    Json(json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": model,
        "usage": {"prompt_tokens": n, "total_tokens": n}
    }))
    .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let (created, _) = now();
    let data: Vec<Value> = app
        .config
        .models
        .iter()
        .filter(|m| m.as_str() != "*")
        .map(|m| json!({"id": m, "object": "model", "created": created, "owned_by": "sim"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let flavor = app.config.metrics_flavor;
    let model_name = app.config.model_name();
    let text = app
        .driver
        .inspect(|e, now, wall| metrics::render(e, flavor, model_name, now, wall));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn requests(State(app): State<Arc<App>>) -> Response {
    Json(app.recorder.list()).into_response()
}

async fn clear_requests(State(app): State<Arc<App>>) -> Response {
    app.recorder.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// The engine's state as JSON, for tests and for eyeballing a benchmark.
async fn state(State(app): State<Arc<App>>) -> Response {
    let v = app.driver.inspect(|e, _, _| {
        let s = e.stats();
        json!({
            "id": app.config.id,
            "running": e.num_running(),
            "waiting": e.num_waiting(),
            "kv_cache_usage": e.kv_usage(),
            "free_blocks": e.kv().num_free(),
            "cached_blocks": e.kv().num_cached(),
            "num_gpu_blocks": e.kv().num_blocks(),
            "running_lora_adapters": e.running_loras(),
            "waiting_lora_adapters": e.waiting_loras(),
            "prefix_cache_queries": s.prefix_queries,
            "prefix_cache_hits": s.prefix_hits,
            "preemptions": s.preemptions,
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "concurrent_requests": app.concurrent.load(Ordering::SeqCst),
            "max_concurrent_requests": app.max_concurrent.load(Ordering::SeqCst),
        })
    });
    Json(v).into_response()
}
