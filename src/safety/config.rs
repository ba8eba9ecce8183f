//! The `safety` section of the plugin configuration, mirroring GKE's
//! `model_armor_settings`.

use super::stream::{StreamLimits, StreamMode};
use crate::config::ConfigError;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Event {
    /// Screen prompts (after the body is read, before an endpoint is chosen).
    RequestBody,
    /// Screen responses (for models with a response template).
    ResponseBody,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTemplates {
    /// Model name, as clients send it (only in `model_armor_settings`).
    #[serde(default)]
    pub model: Option<String>,
    /// `projects/{p}/locations/{l}/templates/{t}` for prompts.
    #[serde(default)]
    pub user_prompt_template_id: Option<String>,
    /// Same, for responses; absent: responses are not screened.
    #[serde(default)]
    pub model_response_template_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSafety {
    /// Envoy cluster the callouts go to (a STATIC/STRICT_DNS cluster in the bootstrap).
    pub cluster: String,
    /// `:authority` of the callouts; default: the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// On a timeout, 5xx or unreadable verdict: false blocks with 503, true lets the
    /// request through (and counts it).
    #[serde(default)]
    pub fail_open: bool,
    /// Extra callout headers, e.g. `authorization`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Status for blocked prompts.
    #[serde(default = "default_block_status")]
    pub block_status: u16,
    #[serde(default = "default_events")]
    pub events: Vec<Event>,
    #[serde(default)]
    pub model_armor_settings: Vec<RawTemplates>,
    /// Templates for models not listed in `model_armor_settings`.
    #[serde(default)]
    pub default: Option<RawTemplates>,
    /// Largest non-streamed response held for screening; a larger one is refused
    /// (502), whatever `fail_open` says: it cannot be screened.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Largest text one check call carries (set it to what the safety service accepts).
    #[serde(default = "default_max_check_text_bytes")]
    pub max_check_text_bytes: usize,
    /// A text longer than `max_check_text_bytes`: screened in several calls that
    /// must all pass (`split`), or refused (`refuse`).
    #[serde(default)]
    pub oversize_text: Oversize,
    /// Bytes of text repeated at the start of the next call when a text is cut, so
    /// a phrase cut at the boundary is whole in one call.
    #[serde(default = "default_check_overlap_bytes")]
    pub check_overlap_bytes: usize,
    /// Most calls one prompt or non-streamed response may take; a longer text is refused.
    #[serde(default = "default_max_checks_per_request")]
    pub max_checks_per_request: usize,
    /// Streamed responses: `hold` releases text only after it passed; `detect` lets it
    /// through and cuts the stream when a check blocks.
    #[serde(default)]
    pub stream_mode: RawStreamMode,
    /// Hold mode: a window is screened after this many characters of generated text…
    #[serde(default = "default_stream_window_chars")]
    pub stream_window_chars: usize,
    /// …or this long after its first text, whichever comes first.
    #[serde(default = "default_stream_window_ms")]
    pub stream_window_ms: u64,
    /// Stream windows in flight at once; more text joins the next window.
    #[serde(default = "default_max_pending_stream_checks")]
    pub max_pending_stream_checks: usize,
    /// Hold mode: bytes at the end of a passed window kept until the next window
    /// passes, so a phrase cut by the window edge is not half-released
    /// (at most `check_overlap_bytes`).
    /// Default: 64, or `check_overlap_bytes` if that is smaller.
    #[serde(default)]
    pub stream_holdback_bytes: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Oversize {
    #[default]
    Split,
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RawStreamMode {
    #[default]
    Hold,
    Detect,
}

fn default_timeout_ms() -> u64 {
    1_000
}
fn default_block_status() -> u16 {
    403
}
fn default_events() -> Vec<Event> {
    vec![Event::RequestBody, Event::ResponseBody]
}
fn default_max_response_bytes() -> usize {
    1024 * 1024
}
fn default_max_check_text_bytes() -> usize {
    64 * 1024
}
fn default_check_overlap_bytes() -> usize {
    256
}
fn default_max_checks_per_request() -> usize {
    32
}
fn default_stream_window_chars() -> usize {
    200
}
fn default_stream_window_ms() -> u64 {
    250
}
fn default_max_pending_stream_checks() -> usize {
    4
}
const DEFAULT_STREAM_HOLDBACK_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SafetyTemplates {
    pub prompt: Option<String>,
    pub response: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Safety {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    pub fail_open: bool,
    pub headers: Vec<(String, String)>,
    pub block_status: u16,
    pub check_prompts: bool,
    pub check_responses: bool,
    pub per_model: HashMap<String, SafetyTemplates>,
    pub default: Option<SafetyTemplates>,
    pub max_response_bytes: usize,
    pub max_check_text_bytes: usize,
    pub oversize_text: Oversize,
    pub check_overlap_bytes: usize,
    pub max_checks_per_request: usize,
    pub stream: StreamLimits,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// `projects/{p}/locations/{l}/templates/{t}` with non-empty segments.
fn check_template(t: &str, field: String) -> Result<String, ConfigError> {
    let parts: Vec<&str> = t.trim_matches('/').split('/').collect();
    let ok = parts.len() == 6
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "templates"
        && parts
            .iter()
            .all(|p| !p.is_empty() && !p.contains([':', '?', '#', ' ']));
    if ok {
        Ok(parts.join("/"))
    } else {
        Err(err(
            field,
            format!("'{t}' is not a template resource name (projects/P/locations/L/templates/T)"),
        ))
    }
}

fn templates(raw: &RawTemplates, at: &str) -> Result<SafetyTemplates, ConfigError> {
    Ok(SafetyTemplates {
        prompt: match &raw.user_prompt_template_id {
            Some(t) => Some(check_template(t, format!("{at}.user_prompt_template_id"))?),
            None => None,
        },
        response: match &raw.model_response_template_id {
            Some(t) => Some(check_template(
                t,
                format!("{at}.model_response_template_id"),
            )?),
            None => None,
        },
    })
}

impl RawSafety {
    pub fn validate(&self) -> Result<Safety, ConfigError> {
        if self.cluster.trim().is_empty() {
            return Err(err("safety.cluster", "must not be empty"));
        }
        if self.timeout_ms == 0 {
            return Err(err("safety.timeout_ms", "must be greater than 0"));
        }
        if !(400..600).contains(&self.block_status) {
            return Err(err(
                "safety.block_status",
                "must be an HTTP error status (400-599)",
            ));
        }
        for name in self.headers.keys() {
            if name.starts_with(':')
                || name.is_empty()
                || name.chars().any(|c| c.is_ascii_uppercase())
            {
                return Err(err(
                    format!("safety.headers.{name}"),
                    "must be a lowercase regular header name",
                ));
            }
        }
        if self.max_check_text_bytes < 64 {
            return Err(err("safety.max_check_text_bytes", "must be at least 64"));
        }
        if self.check_overlap_bytes * 2 + 4 > self.max_check_text_bytes {
            return Err(err(
                "safety.check_overlap_bytes",
                "must be less than half of max_check_text_bytes",
            ));
        }
        if !(1..=256).contains(&self.max_checks_per_request) {
            return Err(err("safety.max_checks_per_request", "must be 1-256"));
        }
        if self.stream_window_chars == 0 {
            return Err(err("safety.stream_window_chars", "must be greater than 0"));
        }
        if self.stream_window_ms == 0 {
            return Err(err("safety.stream_window_ms", "must be greater than 0"));
        }
        if !(1..=64).contains(&self.max_pending_stream_checks) {
            return Err(err("safety.max_pending_stream_checks", "must be 1-64"));
        }
        if self
            .stream_holdback_bytes
            .is_some_and(|h| h > self.check_overlap_bytes)
        {
            return Err(err(
                "safety.stream_holdback_bytes",
                "must not exceed check_overlap_bytes (the next call must repeat what is held back)",
            ));
        }
        let mut per_model = HashMap::new();
        for (i, m) in self.model_armor_settings.iter().enumerate() {
            let at = format!("safety.model_armor_settings[{i}]");
            let Some(model) = m.model.as_ref().filter(|m| !m.trim().is_empty()) else {
                return Err(err(format!("{at}.model"), "is required"));
            };
            if per_model
                .insert(model.clone(), templates(m, &at)?)
                .is_some()
            {
                return Err(err(
                    format!("{at}.model"),
                    format!("duplicate model '{model}'"),
                ));
            }
        }
        let default = match &self.default {
            None => None,
            Some(d) if d.model.is_some() => {
                return Err(err(
                    "safety.default.model",
                    "the default applies to every model; remove it",
                ))
            }
            Some(d) => Some(templates(d, "safety.default")?),
        };
        Ok(Safety {
            cluster: self.cluster.clone(),
            authority: self
                .authority
                .clone()
                .unwrap_or_else(|| self.cluster.clone()),
            timeout_ms: self.timeout_ms,
            fail_open: self.fail_open,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            block_status: self.block_status,
            check_prompts: self.events.contains(&Event::RequestBody),
            check_responses: self.events.contains(&Event::ResponseBody),
            per_model,
            default,
            max_response_bytes: self.max_response_bytes,
            max_check_text_bytes: self.max_check_text_bytes,
            oversize_text: self.oversize_text,
            check_overlap_bytes: self.check_overlap_bytes,
            max_checks_per_request: self.max_checks_per_request,
            stream: StreamLimits {
                mode: match self.stream_mode {
                    RawStreamMode::Hold => StreamMode::Hold {
                        window_chars: self.stream_window_chars,
                        window_ms: self.stream_window_ms,
                    },
                    RawStreamMode::Detect => StreamMode::Detect,
                },
                max_call_bytes: self.max_check_text_bytes,
                overlap: self.check_overlap_bytes,
                max_pending: self.max_pending_stream_checks,
                holdback: self
                    .stream_holdback_bytes
                    .unwrap_or(DEFAULT_STREAM_HOLDBACK_BYTES.min(self.check_overlap_bytes)),
            },
        })
    }
}

impl Safety {
    /// Templates for `model` (as the client named it), or the default.
    pub fn templates_for(&self, model: &str) -> Option<&SafetyTemplates> {
        self.per_model.get(model).or(self.default.as_ref())
    }

    pub fn prompt_template(&self, model: &str) -> Option<&str> {
        self.templates_for(model)
            .filter(|_| self.check_prompts)
            .and_then(|t| t.prompt.as_deref())
    }

    pub fn response_template(&self, model: &str) -> Option<&str> {
        self.templates_for(model)
            .filter(|_| self.check_responses)
            .and_then(|t| t.response.as_deref())
    }
}
