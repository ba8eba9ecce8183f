//! The `safety` section of the plugin configuration, mirroring GKE's
//! `model_armor_settings`.

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
    /// Largest non-streamed response buffered for screening; larger ones count as a
    /// failed check (so `fail_open` decides).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Largest amount of streamed text accumulated for the end-of-stream check.
    #[serde(default = "default_max_response_bytes")]
    pub max_stream_text_bytes: usize,
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
    pub max_stream_text_bytes: usize,
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
            max_stream_text_bytes: self.max_stream_text_bytes,
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
