//! Errors in the OpenAI shape: `{"error":{"message","type","param","code"}}`.

use serde::Serialize;
use std::borrow::Cow;

/// An error the gateway answers itself, with its HTTP status and extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    pub param: Option<Cow<'static, str>>,
    pub code: &'static str,
    /// Extra response headers, e.g. `allow` on 405 or `retry-after` on 429.
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            message,
            kind,
            param: None,
            code,
            headers: Vec::new(),
        }
    }

    pub fn invalid_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", code, message.into())
    }

    pub fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("The model '{model}' does not exist or is not served by this gateway."),
        )
        .with_param("model")
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("The request body is larger than this gateway accepts ({limit} bytes)."),
        )
    }

    pub fn method_not_allowed(method: &str, allow: &'static str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("Method {method} is not allowed on this path; use {allow}."),
        )
        .with_header("allow", allow)
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "unknown_url",
            format!("Unknown request URL: {path}."),
        )
    }

    pub fn no_endpoint(pool: &str) -> Self {
        Self::new(
            503,
            "server_error",
            "no_healthy_upstream",
            format!("No model server in pool '{pool}' can take the request."),
        )
    }

    /// A sheddable request met a saturated pool. OpenAI clients retry 429s,
    /// honouring `retry-after`.
    pub fn shed(pool: &str, retry_after_seconds: u32) -> Self {
        Self::new(
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
            format!(
                "Pool '{pool}' is saturated and this request is sheddable (priority < 0); retry later."
            ),
        )
        .with_header("retry-after", retry_after_seconds.to_string())
    }

    /// Every endpoint of the pool is drained or at its backend policy's cap and
    /// the request is not sheddable (docs/backend-policy.md).
    pub fn capacity_exhausted(pool: &str, retry_after_seconds: u32) -> Self {
        Self::new(
            503,
            "server_error",
            "capacity_exhausted",
            format!(
                "Every model server in pool '{pool}' is at its configured capacity; retry later."
            ),
        )
        .with_header("retry-after", retry_after_seconds.to_string())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", "internal_error", message.into())
    }

    /// The JSON body. Serialising these plain strings cannot fail; the fallback
    /// keeps even that impossible case a valid error body.
    pub fn body(&self) -> Vec<u8> {
        let env = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        serde_json::to_vec(&env).unwrap_or_else(|_| {
            br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":"internal_error"}}"#.to_vec()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape() {
        let e = ApiError::model_not_found("gpt-\"x\"");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status, 404);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-\"x\""));
    }

    #[test]
    fn null_param_is_present() {
        let v: serde_json::Value =
            serde_json::from_slice(&ApiError::body_too_large(10).body()).unwrap();
        assert!(v["error"].as_object().unwrap().contains_key("param"));
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn method_not_allowed_carries_allow() {
        let e = ApiError::method_not_allowed("GET", "POST");
        assert_eq!(e.status, 405);
        assert_eq!(e.headers, vec![("allow", "POST".to_string())]);
    }
}
