//! API keys: who is calling, which models they may use, which objective their
//! requests carry, and their limits (`quota`). Pure; the filter reads the headers
//! and keeps the counters in shared data.
//!
//! Keys are configured only as SHA-256 digests (hex). A request presents its key
//! as `x-api-key` (Apigee's convention) or `Authorization: Bearer` (what the
//! official OpenAI clients send); the digest of what it presents is compared with
//! every configured digest in constant time, so neither the answer's timing nor
//! the configuration reveals a key.

pub mod quota;

use crate::config::{Config, ConfigError, Objective};
use crate::gateway::RoutePlan;
use crate::inflight::SharedStore;
use crate::openai::ApiError;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use subtle::{ConditionallySelectable, ConstantTimeEq};

pub use quota::Limits;

/// The header Apigee's convention presents the key in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// One key as configured (`auth.keys[]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// The consumer's name: in metrics, logs and `/debug/state` (never the key).
    pub id: String,
    /// SHA-256 of the key, 64 hex digits (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    /// Models (as clients name them) the key may use; absent or `["*"]`: all.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// An objective (`objectives[].name`) every request of this key carries: its
    /// priority and profile, whatever the request says (a batch consumer's key
    /// makes its requests sheddable).
    #[serde(default)]
    pub objective: Option<String>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Requests in flight at once.
    #[serde(default)]
    pub concurrent_requests: Option<u32>,
    /// Input plus output tokens per minute / per UTC day.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
}

/// The `auth` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub keys: Vec<RawKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    digest: [u8; 32],
    /// `None`: every model.
    pub models: Option<HashSet<String>>,
    pub objective: Option<String>,
    pub limits: Limits,
}

/// The validated section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub keys: Vec<ApiKey>,
}

fn err(field: String, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl RawAuth {
    pub fn validate(&self, objectives: &HashMap<String, Objective>) -> Result<Auth, ConfigError> {
        if self.keys.is_empty() {
            return Err(err(
                "auth.keys".into(),
                "at least one key (without keys every request would be refused)",
            ));
        }
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, k) in self.keys.iter().enumerate() {
            let at = |f: &str| format!("auth.keys[{i}].{f}");
            // Ids become shared-data keys and metric labels.
            let id_ok = !k.id.is_empty()
                && k.id.len() <= 64
                && k.id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !id_ok {
                return Err(err(
                    at("id"),
                    format!("'{}': 1-64 of A-Z a-z 0-9 - _", k.id),
                ));
            }
            if !ids.insert(k.id.clone()) {
                return Err(err(at("id"), format!("'{}' is listed twice", k.id)));
            }
            let digest = parse_digest(&k.sha256).ok_or_else(|| {
                err(
                    at("sha256"),
                    "not a SHA-256 digest (64 hex digits); store the key's digest, never the key",
                )
            })?;
            if !digests.insert(digest) {
                return Err(err(at("sha256"), "the same key is listed twice"));
            }
            let models = match &k.models {
                None => None,
                Some(m) if m.iter().any(|x| x == "*") => None,
                Some(m) if m.is_empty() => {
                    return Err(err(at("models"), "empty: the key could use no model"))
                }
                Some(m) => Some(m.iter().cloned().collect()),
            };
            if let Some(o) = &k.objective {
                if !objectives.contains_key(o) {
                    return Err(err(at("objective"), format!("no objective named '{o}'")));
                }
            }
            let positive = |v: Option<u64>, f: &str| match v {
                Some(0) => Err(err(at(f), "must be at least 1 (remove it for no limit)")),
                _ => Ok(v),
            };
            let limits = Limits {
                requests_per_minute: positive(
                    k.requests_per_minute.map(u64::from),
                    "requests_per_minute",
                )?
                .map(|v| v as u32),
                concurrent_requests: positive(
                    k.concurrent_requests.map(u64::from),
                    "concurrent_requests",
                )?
                .map(|v| v as u32),
                tokens_per_minute: positive(k.tokens_per_minute, "tokens_per_minute")?,
                tokens_per_day: positive(k.tokens_per_day, "tokens_per_day")?,
            };
            keys.push(ApiKey {
                id: k.id.clone(),
                digest,
                models,
                objective: k.objective.clone(),
                limits,
            });
        }
        Ok(Auth { keys })
    }
}

fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut out).ok()?;
    Some(out)
}

/// SHA-256 of a key, as hex (what `auth.keys[].sha256` holds).
pub fn digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The key a request presents: `x-api-key`, else `Authorization: Bearer …`.
pub fn presented<'a>(
    x_api_key: Option<&'a str>,
    authorization: Option<&'a str>,
) -> Option<&'a str> {
    if let Some(k) = x_api_key.map(str::trim).filter(|k| !k.is_empty()) {
        return Some(k);
    }
    bearer_token(authorization)
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case,
/// RFC 7235); the one parser of it for API keys, snapshot pushes and `/metrics`.
pub fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    let (scheme, rest) = authorization?.trim().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Auth {
    /// The index of the key `presented` is, or 401 `invalid_api_key`. Every
    /// configured digest is compared, in constant time, whatever matches.
    pub fn identify(&self, presented: Option<&str>) -> Result<usize, ApiError> {
        let Some(key) = presented else {
            return Err(invalid_key(
                "You didn't provide an API key. Send it as 'x-api-key: KEY' or 'Authorization: Bearer KEY'.",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // 1-based index of the match, 0 for none, selected without branching.
        let mut found = 0u32;
        for (i, k) in self.keys.iter().enumerate() {
            let eq = digest.ct_eq(&k.digest);
            found.conditional_assign(&(i as u32 + 1), eq);
        }
        match found {
            0 => Err(invalid_key("Incorrect API key provided.")),
            n => Ok(n as usize - 1),
        }
    }
}

fn invalid_key(message: &str) -> ApiError {
    ApiError::new(
        401,
        "invalid_request_error",
        "invalid_api_key",
        message.to_string(),
    )
}

impl ApiKey {
    /// 403 unless the key may use `model` (as the client named it).
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match &self.models {
            Some(m) if !m.contains(model) => Err(ApiError::new(
                403,
                "invalid_request_error",
                "model_not_allowed",
                format!("The API key '{}' may not use the model '{model}'.", self.id),
            )
            .with_param("model")),
            _ => Ok(()),
        }
    }
}

/// Shared-data key of the gateway replica count the collector pushes with its
/// snapshots (`x-gateway-replicas`); each replica enforces its share of a limit.
pub const REPLICAS_KEY: &str = "igw.replicas";

/// The replica count stored in shared data (1 when none was pushed).
pub fn replicas(store: &dyn SharedStore) -> u32 {
    store
        .get(REPLICAS_KEY)
        .0
        .and_then(|b| {
            b.get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        })
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// A request's key once its body is planned: the model must be one the key may
/// use, the key's objective replaces whatever priority the request asked for,
/// and its limits admit it (or answer 429). `None`: the key has no limits.
pub fn admit_planned(
    cfg: &Config,
    key: &ApiKey,
    plan: &mut RoutePlan,
    store: &dyn SharedStore,
    now_ms: u64,
) -> Result<Option<quota::Admitted>, ApiError> {
    key.check_model(&plan.model)?;
    if let Some(o) = key.objective.as_deref().and_then(|o| cfg.objectives.get(o)) {
        plan.priority = o.priority;
        if let Some(p) = o.profile {
            plan.profile = p;
        }
    }
    if !key.limits.is_limited() {
        return Ok(None);
    }
    let limits = key.limits.share(replicas(store));
    let estimate = quota::estimate_tokens(&plan.prompt);
    quota::admit(store, &key.id, &limits, now_ms, estimate).map(Some)
}

/// The tokens a finished request is charged: its `usage` when the response had
/// one; a streamed response without it (the client did not ask for
/// `include_usage`): the input estimate plus one token per event; a request
/// that failed before a model answered: nothing.
pub fn charged_tokens(
    usage: Option<(u64, u64)>,
    reserved: u64,
    streamed_events: u64,
    answered: bool,
) -> u64 {
    match usage {
        Some((input, output)) => input.saturating_add(output),
        None if !answered => 0,
        None => reserved.saturating_add(streamed_events),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(extra: &str) -> Result<Auth, ConfigError> {
        let json = format!(
            r#"{{"keys": [
                {{"id": "team-a", "sha256": "{}", "models": ["m1"], "requests_per_minute": 10}},
                {{"id": "batch", "sha256": "{}", "objective": "bulk"}}{extra}]}}"#,
            digest_hex("sk-alpha"),
            digest_hex("sk-batch"),
        );
        let raw: RawAuth = serde_json::from_str(&json).unwrap();
        let objectives: HashMap<String, Objective> = [(
            "bulk".to_string(),
            Objective {
                priority: -1,
                profile: None,
            },
        )]
        .into();
        raw.validate(&objectives)
    }

    #[test]
    fn keys_are_found_by_digest_from_either_header() {
        let a = auth("").unwrap();
        assert_eq!(a.identify(presented(Some("sk-alpha"), None)), Ok(0));
        assert_eq!(a.identify(presented(None, Some("Bearer sk-batch"))), Ok(1));
        assert_eq!(
            a.identify(presented(None, Some("bearer  sk-batch "))),
            Ok(1)
        );
        // x-api-key wins over Authorization.
        assert_eq!(
            a.identify(presented(Some("sk-alpha"), Some("Bearer sk-batch"))),
            Ok(0)
        );
        for (x, auth_header) in [
            (None, None),
            (Some(""), None),
            (None, Some("Basic c2stYWxwaGE=")),
            (None, Some("Bearer")),
            (Some("sk-alph"), None),
            (Some("SK-ALPHA"), None),
        ] {
            let e = a.identify(presented(x, auth_header)).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (401, "invalid_api_key"),
                "{x:?} {auth_header:?}"
            );
            assert!(!e.message.contains("sk-"), "never echo the key");
        }
    }

    #[test]
    fn models_and_configuration_errors() {
        let a = auth("").unwrap();
        assert!(a.keys[0].check_model("m1").is_ok());
        let e = a.keys[0].check_model("m2").unwrap_err();
        assert_eq!((e.status, e.code), (403, "model_not_allowed"));
        assert!(a.keys[1].check_model("anything").is_ok());
        assert_eq!(a.keys[1].objective.as_deref(), Some("bulk"));
        for (extra, field) in [
            (r#", {"id": "team-a", "sha256": "00"}"#, "auth.keys[2].id"),
            (r#", {"id": "bad id", "sha256": "00"}"#, "auth.keys[2].id"),
            (
                r#", {"id": "c", "sha256": "sk-plaintext"}"#,
                "auth.keys[2].sha256",
            ),
            (
                r#", {"id": "c", "sha256": "0000", "models": []}"#,
                "auth.keys[2].sha256",
            ),
            (
                r#", {"id": "c", "sha256": "ab3c2f6b7c5e5e0f2b3cb1e4b6c4b9e4d5f3b1a2c3d4e5f60718293a4b5c6d7e", "models": []}"#,
                "auth.keys[2].models",
            ),
            (
                r#", {"id": "c", "sha256": "ab3c2f6b7c5e5e0f2b3cb1e4b6c4b9e4d5f3b1a2c3d4e5f60718293a4b5c6d7e", "objective": "nope"}"#,
                "auth.keys[2].objective",
            ),
            (
                r#", {"id": "c", "sha256": "ab3c2f6b7c5e5e0f2b3cb1e4b6c4b9e4d5f3b1a2c3d4e5f60718293a4b5c6d7e", "tokens_per_minute": 0}"#,
                "auth.keys[2].tokens_per_minute",
            ),
        ] {
            let e = auth(extra).unwrap_err();
            assert_eq!(e.field, field, "{extra}: {}", e.message);
        }
        let dup = format!(r#", {{"id": "c", "sha256": "{}"}}"#, digest_hex("sk-alpha"));
        assert_eq!(auth(&dup).unwrap_err().field, "auth.keys[2].sha256");
    }
}
