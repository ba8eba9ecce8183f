//! The safety simulator's HTTP surface: Model Armor's two sanitize methods, plus
//! test hooks to change its behaviour and to see what it screened.

use super::rules::Rules;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the simulator answers, switchable at run time with `PUT /sim/behaviour`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Verdicts from the rules.
    #[default]
    Normal,
    /// Verdicts from the rules, after `delay_ms`.
    Slow,
    /// `500` in Google's error shape.
    Fail,
    /// `200` with a body that is not a verdict.
    Garbage,
    /// No answer for `delay_ms` (at most [`MAX_HANG`]), then the connection closes.
    Hang,
}

/// The longest a `hang` holds a request, so a forgotten simulator never leaks tasks.
pub const MAX_HANG: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behaviour {
    pub mode: Mode,
    #[serde(default)]
    pub delay_ms: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            mode: Mode::Normal,
            delay_ms: 0,
        }
    }
}

pub struct SafetySimConfig {
    pub rules: Rules,
    pub behaviour: Behaviour,
    /// When set, callers must send `authorization: Bearer <token>`.
    pub require_token: Option<String>,
    /// Screenings kept for `GET /sim/requests`.
    pub record_capacity: usize,
    /// Longest text one call may carry, as a real service has one: longer texts
    /// get 400 `INVALID_ARGUMENT`. `None`: no limit.
    pub max_text_bytes: Option<usize>,
}

/// One screening, as `GET /sim/requests` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Screening {
    /// `sanitizeUserPrompt` or `sanitizeModelResponse`.
    pub method: String,
    /// `projects/{p}/locations/{l}/templates/{t}`.
    pub template: String,
    pub text: String,
    /// Matched filters (`rai/<category>` for RAI).
    pub matched: Vec<String>,
    pub received_at_ms: u64,
}

struct App {
    rules: Rules,
    behaviour: Mutex<Behaviour>,
    require_token: Option<String>,
    record_capacity: usize,
    max_text_bytes: Option<usize>,
    screenings: Mutex<VecDeque<Screening>>,
}

pub async fn serve(
    config: SafetySimConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

pub fn router(config: SafetySimConfig) -> Router {
    let app = Arc::new(App {
        rules: config.rules,
        behaviour: Mutex::new(config.behaviour),
        require_token: config.require_token,
        record_capacity: config.record_capacity,
        max_text_bytes: config.max_text_bytes,
        screenings: Mutex::new(VecDeque::new()),
    });
    Router::new()
        .route(
            "/v1/projects/{project}/locations/{location}/templates/{call}",
            post(sanitize),
        )
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/sim/behaviour", put(set_behaviour).get(get_behaviour))
        .route("/sim/requests", get(list).delete(clear))
        .with_state(app)
}

/// Google APIs' error shape.
fn google_error(status: StatusCode, message: &str) -> Response {
    let reason = match status {
        StatusCode::BAD_REQUEST => "INVALID_ARGUMENT",
        StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        _ => "INTERNAL",
    };
    (
        status,
        Json(json!({"error": {"code": status.as_u16(), "message": message, "status": reason}})),
    )
        .into_response()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn sanitize(
    State(app): State<Arc<App>>,
    Path((project, location, call)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((template_id, method)) = call.split_once(':') else {
        return google_error(StatusCode::NOT_FOUND, "expected {template}:{method}");
    };
    let field = match method {
        "sanitizeUserPrompt" => "userPromptData",
        "sanitizeModelResponse" => "modelResponseData",
        _ => return google_error(StatusCode::NOT_FOUND, &format!("unknown method {method}")),
    };
    if let Some(token) = &app.require_token {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(token.as_str()) {
            return google_error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        }
    }
    let behaviour = *lock(&app.behaviour);
    match behaviour.mode {
        Mode::Slow => tokio::time::sleep(Duration::from_millis(behaviour.delay_ms)).await,
        Mode::Hang => {
            tokio::time::sleep(Duration::from_millis(behaviour.delay_ms).min(MAX_HANG)).await;
            return google_error(StatusCode::INTERNAL_SERVER_ERROR, "hung");
        }
        Mode::Fail => return google_error(StatusCode::INTERNAL_SERVER_ERROR, "simulated failure"),
        Mode::Garbage => {
            return (StatusCode::OK, "{\"sanitizationResult\": <<not json").into_response()
        }
        Mode::Normal => {}
    }
    let text = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => match v.pointer(&format!("/{field}/text")).and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    &format!("{field}.text is required"),
                )
            }
        },
        Err(e) => return google_error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    if let Some(limit) = app.max_text_bytes.filter(|&l| text.len() > l) {
        return google_error(
            StatusCode::BAD_REQUEST,
            &format!("{field}.text is {} bytes; the limit is {limit}", text.len()),
        );
    }
    let Some(filters) = app.rules.template_filters(template_id) else {
        return google_error(
            StatusCode::NOT_FOUND,
            &format!("template projects/{project}/locations/{location}/templates/{template_id} not found"),
        );
    };
    let findings = app.rules.screen(&filters, &text);
    {
        let mut s = lock(&app.screenings);
        if s.len() >= app.record_capacity {
            s.pop_front();
        }
        if app.record_capacity > 0 {
            s.push_back(Screening {
                method: method.to_string(),
                template: format!(
                    "projects/{project}/locations/{location}/templates/{template_id}"
                ),
                text,
                matched: findings.matched.clone(),
                received_at_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            });
        }
    }
    if findings.matched() {
        tracing::info!(%method, template = %template_id, matched = ?findings.matched, "match found");
    }
    Json(json!({"sanitizationResult": findings.sanitization_result()})).into_response()
}

async fn set_behaviour(State(app): State<Arc<App>>, Json(b): Json<Behaviour>) -> StatusCode {
    *lock(&app.behaviour) = b;
    StatusCode::NO_CONTENT
}

async fn get_behaviour(State(app): State<Arc<App>>) -> Json<Behaviour> {
    Json(*lock(&app.behaviour))
}

async fn list(State(app): State<Arc<App>>) -> Json<Vec<Screening>> {
    Json(lock(&app.screenings).iter().cloned().collect())
}

async fn clear(State(app): State<Arc<App>>) -> StatusCode {
    lock(&app.screenings).clear();
    StatusCode::NO_CONTENT
}
