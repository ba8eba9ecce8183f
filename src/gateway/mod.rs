//! The gateway's request flow as pure functions: the filter asks what to do with a
//! request head, then with the whole body, and carries out the answer. Nothing here
//! touches the host, so every decision is unit-tested natively.

mod capped;
mod choose;
pub mod headers;

pub use choose::{choose, Choice, Counts, Inputs, Refused};

use crate::config::{Config, OtherPaths};
use crate::openai::{request, ApiError, ApiKind};
use crate::routing;
use serde::Serialize;

/// What to do once the request headers are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadAction {
    /// Not an inference request: let it through untouched.
    Pass,
    /// Answer with this error now.
    Reject(ApiError),
    /// Answer `200` with this JSON body now (`GET /v1/models`).
    Respond(Vec<u8>),
    /// Hold the headers and buffer the body: it decides the route.
    Buffer(ApiKind),
}

/// The request head as the filter reads it from the host.
#[derive(Debug, Clone, Default)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    pub content_length: Option<&'a str>,
    /// True when the headers end the stream (no body follows).
    pub end_of_stream: bool,
}

pub fn on_request_head(cfg: &Config, head: &RequestHead<'_>) -> HeadAction {
    let Some(kind) = ApiKind::from_path(head.path) else {
        return match cfg.other_paths {
            OtherPaths::Pass => HeadAction::Pass,
            OtherPaths::Reject => HeadAction::Reject(ApiError::not_found(head.path)),
        };
    };
    if !head.method.eq_ignore_ascii_case(kind.method()) {
        return HeadAction::Reject(ApiError::method_not_allowed(head.method, kind.method()));
    }
    if kind == ApiKind::Models {
        return HeadAction::Respond(models_list(cfg));
    }
    if !is_json(head.content_type) {
        return HeadAction::Reject(ApiError::invalid_request(
            "unsupported_content_type",
            format!(
                "Content-Type must be application/json, not '{}'.",
                head.content_type.unwrap_or("")
            ),
        ));
    }
    if let Some(len) = head
        .content_length
        .and_then(|l| l.trim().parse::<usize>().ok())
    {
        if len > cfg.max_request_body_bytes {
            return HeadAction::Reject(ApiError::body_too_large(cfg.max_request_body_bytes));
        }
    }
    if head.end_of_stream {
        return HeadAction::Reject(ApiError::invalid_request(
            "invalid_json",
            "The request body is empty; send a JSON object.",
        ));
    }
    HeadAction::Buffer(kind)
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .map(|media| media.trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false)
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

/// `GET /v1/models`: the models this gateway routes, in OpenAI's list shape.
pub fn models_list(cfg: &Config) -> Vec<u8> {
    let list = ModelList {
        object: "list",
        data: cfg
            .model_names
            .iter()
            .map(|id| ModelEntry {
                id,
                object: "model",
                created: 0,
                owned_by: "inference-gateway",
            })
            .collect(),
    };
    serde_json::to_vec(&list).unwrap_or_else(|_| br#"{"object":"list","data":[]}"#.to_vec())
}

/// Where a request goes, before an endpoint is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub kind: ApiKind,
    /// Index into `Config::pools`.
    pub pool: usize,
    pub model: String,
    pub target_model: String,
    pub priority: i32,
    /// Index into `Config::scheduling.profiles`.
    pub profile: usize,
    pub adapter: Option<bool>,
    pub stream: bool,
    pub include_usage: bool,
    /// Everything the model may read (see `openai::prompt`).
    pub prompt: String,
    /// Media parts the text check does not see.
    pub media_parts: u32,
    /// The prompt carries token ids (no text check can read them).
    pub token_ids: bool,
    /// The body to send upstream when it differs from the client's (model rewrite).
    pub new_body: Option<Vec<u8>>,
}

/// Decides the route from the whole body. `draw` is a uniform random `u32`.
pub fn plan_route(
    cfg: &Config,
    kind: ApiKind,
    body: &[u8],
    objective_header: Option<&str>,
    draw: u32,
) -> Result<RoutePlan, ApiError> {
    if body.len() > cfg.max_request_body_bytes {
        return Err(ApiError::body_too_large(cfg.max_request_body_bytes));
    }
    let parsed = request::parse(kind, body)?;
    let res = routing::resolve(cfg, &parsed.model, parsed.priority, objective_header, draw)?;
    let new_body = (res.target_model != parsed.model)
        .then(|| request::rewrite_model(body, &parsed.model_span, &res.target_model));
    Ok(RoutePlan {
        kind,
        pool: res.pool,
        model: parsed.model,
        target_model: res.target_model,
        priority: res.priority,
        profile: res.profile,
        adapter: res.adapter,
        stream: parsed.stream,
        include_usage: parsed.include_usage,
        prompt: parsed.prompt,
        media_parts: parsed.media_parts,
        token_ids: parsed.token_ids,
        new_body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_json(
            br#"{"max_request_body_bytes": 64,
                 "pools": [{"name": "p", "endpoints": ["127.0.0.1:1"]}],
                 "models": [{"name": "m", "pool": "p"},
                            {"name": "r", "pool": "p", "target_models": [{"name": "r-lora", "weight": 1}]}]}"#,
        )
        .unwrap()
    }

    fn head<'a>(method: &'a str, path: &'a str, ct: Option<&'a str>) -> RequestHead<'a> {
        RequestHead {
            method,
            path,
            content_type: ct,
            ..Default::default()
        }
    }

    const JSON: Option<&str> = Some("application/json; charset=utf-8");

    #[test]
    fn head_actions() {
        let c = cfg();
        assert_eq!(
            on_request_head(&c, &head("POST", "/v1/chat/completions", JSON)),
            HeadAction::Buffer(ApiKind::ChatCompletions)
        );
        assert_eq!(
            on_request_head(&c, &head("GET", "/healthz", None)),
            HeadAction::Pass
        );
        let HeadAction::Reject(e) = on_request_head(&c, &head("GET", "/v1/completions", JSON))
        else {
            panic!("GET on completions must be rejected")
        };
        assert_eq!(e.status, 405);
        let HeadAction::Reject(e) = on_request_head(
            &c,
            &head(
                "POST",
                "/v1/completions",
                Some("application/x-www-form-urlencoded"),
            ),
        ) else {
            panic!("form bodies must be rejected")
        };
        assert_eq!((e.status, e.code), (400, "unsupported_content_type"));
    }

    #[test]
    fn other_paths_can_be_rejected() {
        let mut c = cfg();
        c.other_paths = OtherPaths::Reject;
        let HeadAction::Reject(e) = on_request_head(&c, &head("GET", "/admin", None)) else {
            panic!("expected reject")
        };
        assert_eq!(e.status, 404);
    }

    #[test]
    fn oversized_content_length_is_413_before_the_body() {
        let c = cfg();
        let mut h = head("POST", "/v1/completions", JSON);
        h.content_length = Some("65");
        let HeadAction::Reject(e) = on_request_head(&c, &h) else {
            panic!("expected 413")
        };
        assert_eq!(e.status, 413);
        h.content_length = Some("64");
        assert_eq!(
            on_request_head(&c, &h),
            HeadAction::Buffer(ApiKind::Completions)
        );
    }

    #[test]
    fn headers_only_request_is_400() {
        let mut h = head("POST", "/v1/completions", JSON);
        h.end_of_stream = true;
        assert!(matches!(on_request_head(&cfg(), &h), HeadAction::Reject(e) if e.status == 400));
    }

    #[test]
    fn models_list_names_configured_models() {
        let HeadAction::Respond(body) = on_request_head(&cfg(), &head("GET", "/v1/models", None))
        else {
            panic!("expected a local answer")
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "m");
        assert_eq!(v["data"][1]["id"], "r");
    }

    #[test]
    fn plans_with_and_without_rewrite() {
        let c = cfg();
        let p = plan_route(
            &c,
            ApiKind::Completions,
            br#"{"model":"m","prompt":"x"}"#,
            None,
            0,
        )
        .unwrap();
        assert_eq!(
            (p.model.as_str(), p.target_model.as_str(), p.new_body),
            ("m", "m", None)
        );
        let p = plan_route(
            &c,
            ApiKind::Completions,
            br#"{"model":"r","prompt":"x"}"#,
            None,
            0,
        )
        .unwrap();
        assert_eq!(p.new_body.unwrap(), br#"{"model":"r-lora","prompt":"x"}"#);
        let e = plan_route(&c, ApiKind::Completions, &[b' '; 65], None, 0).unwrap_err();
        assert_eq!(e.status, 413);
    }
}
