//! API keys in the gateway stream: who is calling (request headers), whether
//! they may and can (after the body is planned), the `x-ratelimit-*` headers on
//! the response, and what the request is charged when it ends.

use super::http::GatewayStream;
use super::metrics::{self, label};
use super::store::HostStore;
use crate::auth::{self, quota, API_KEY_HEADER};
use crate::config::Config;
use crate::gateway::RoutePlan;
use crate::openai::ApiError;
use proxy_wasm::traits::HttpContext;
use serde::Serialize;

/// The request's key and what its admission reserved.
pub struct Consumer {
    key: usize,
    admitted: Option<quota::Admitted>,
}

/// Shared-data key listing the configured keys and limits (ids, never digests),
/// for the control listener's `GET /debug/state`.
pub const KEYS_KEY: &str = "igw.auth.keys";

#[derive(Serialize)]
pub struct KeyView<'a> {
    pub id: &'a str,
    pub requests_per_minute: Option<u32>,
    pub concurrent_requests: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

/// At configuration: every key's usage entry exists (so updates compare and
/// swap) and the control listener can list the keys.
pub fn configure(config: &Config) {
    let Some(a) = &config.auth else {
        return;
    };
    let views: Vec<KeyView> = a
        .keys
        .iter()
        .map(|k| {
            if let Err(e) = quota::init(&HostStore, &k.id) {
                log::warn!(
                    "inference-gateway: usage of key '{}' not created: {e:?}",
                    k.id
                );
            }
            metrics::define(&format!(
                "inference_gateway_consumer_rate_limited_total.consumer.{}",
                label(&k.id)
            ));
            KeyView {
                id: &k.id,
                requests_per_minute: k.limits.requests_per_minute,
                concurrent_requests: k.limits.concurrent_requests,
                tokens_per_minute: k.limits.tokens_per_minute,
                tokens_per_day: k.limits.tokens_per_day,
            }
        })
        .collect();
    let json = serde_json::to_vec(&views).unwrap_or_default();
    if let Err(e) = proxy_wasm::hostcalls::set_shared_data(KEYS_KEY, Some(&json), None) {
        log::warn!("inference-gateway: key list not stored: {e:?}");
    }
}

impl GatewayStream {
    /// Request headers: the key must be one of the configured ones; it never
    /// travels upstream. `Err`: the 401 to answer.
    pub(super) fn identify(&mut self) -> Result<(), ApiError> {
        let Some(a) = &self.config.auth else {
            return Ok(());
        };
        let (x_api_key, authorization) = (
            self.headers.api_key.take(),
            self.headers.authorization.take(),
        );
        let found = a.identify(auth::presented(
            x_api_key.as_deref(),
            authorization.as_deref(),
        ));
        // Removed whatever the outcome: a model server never sees a key.
        if x_api_key.is_some() {
            self.set_http_request_header(API_KEY_HEADER, None);
        }
        if authorization.is_some() {
            self.set_http_request_header("authorization", None);
        }
        let key = found?;
        self.obs.consumer = Some(a.keys[key].id.clone());
        self.consumer = Some(Consumer {
            key,
            admitted: None,
        });
        Ok(())
    }

    /// The planned request: the key's model list, objective and limits.
    pub(super) fn admit(&mut self, plan: &mut RoutePlan) -> Result<(), ApiError> {
        if self.consumer.is_none() {
            return Ok(()); // no auth section, so no key to admit (and no host call)
        }
        let now_ms = super::now_ms(self);
        let config = std::rc::Rc::clone(&self.config);
        let (Some(a), Some(c)) = (&config.auth, &mut self.consumer) else {
            return Ok(());
        };
        let key = &a.keys[c.key];
        match auth::admit_planned(&config, key, plan, &HostStore, now_ms) {
            Ok(admitted) => {
                c.admitted = admitted;
                self.obs.count_events = admitted.is_some();
                Ok(())
            }
            Err(e) => {
                if e.status == 429 {
                    metrics::inc(&format!(
                        "inference_gateway_consumer_rate_limited_total.consumer.{}",
                        label(&key.id)
                    ));
                }
                Err(e)
            }
        }
    }

    /// OpenAI's `x-ratelimit-*` headers on every response of a limited key.
    pub(super) fn rate_limit_headers(&mut self) {
        let Some(admitted) = self.consumer.as_ref().and_then(|c| c.admitted) else {
            return;
        };
        let now_ms = super::now_ms(self);
        for (name, value) in quota::headers(&admitted.limits, &admitted.after, now_ms) {
            self.set_http_response_header(name, Some(&value));
        }
    }

    /// The stream ended: the slot is free, the tokens charged, the use counted.
    pub(super) fn settle_consumer(&mut self) {
        let Some(c) = self.consumer.take() else {
            return;
        };
        let Some(a) = &self.config.auth else {
            return;
        };
        let key = &a.keys[c.key];
        let usage = self
            .obs
            .final_usage()
            .map(|u| (u.prompt_tokens, u.completion_tokens));
        let model = self
            .obs
            .labels
            .as_ref()
            .map_or_else(|| "-".to_string(), |(m, _)| label(m));
        let id = label(&key.id);
        metrics::inc(&format!(
            "inference_gateway_consumer_requests_total.consumer.{id}.model_name.{model}"
        ));
        if let Some((input, output)) = usage {
            for (kind, n) in [("input", input), ("output", output)] {
                metrics::add(
                    &format!("inference_gateway_consumer_tokens_total.consumer.{id}.model_name.{model}.token_type.{kind}"),
                    n,
                );
            }
        }
        if let Some(admitted) = c.admitted {
            let answered = self.obs.response_bytes > 0 && self.obs.error.is_none();
            let tokens =
                auth::charged_tokens(usage, admitted.reserved_tokens, self.obs.events, answered);
            let now_ms = super::now_ms(self);
            quota::finish(&HostStore, &key.id, &admitted, now_ms, tokens);
        }
    }
}
