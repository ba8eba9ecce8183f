//! Plugin configuration: the JSON in Envoy's `configuration` for the Wasm filter.
//!
//! Parsed with serde and validated once (in `on_configure`); every error names the
//! field it is about, e.g. `models[1].target_models[0].weight: must be at least 1`.
//! The reference for every field is `docs/configuration.md`.

use crate::auth::{Auth, RawAuth};
use crate::policy::{PoolPolicy, RawBackendPolicy};
use crate::safety::config::{RawSafety, Safety};
use crate::scheduling::config::{RawScheduling, Scheduling};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

/// Default cap on a buffered request body: 4 MiB. Envoy's own per-connection buffer
/// limit must be larger, or Envoy answers 413 itself before the filter can.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The gateway listener's buffer limit for a body cap: twice the cap, and at
/// least 1 MiB above it. The rendered Envoy configuration sets it on the gateway
/// listener (`deploy::envoy_config`) and the ext_proc picker bounds the messages
/// it reads by it (`picker::server::max_message_bytes`): one formula, so the two
/// cannot drift apart.
pub fn listener_buffer_limit_bytes(max_request_body_bytes: u64) -> u64 {
    max_request_body_bytes
        .saturating_mul(2)
        .max(max_request_body_bytes.saturating_add(1 << 20))
}

/// What a listener's instance of the filter does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Routes OpenAI requests (the data plane).
    #[default]
    Gateway,
    /// Loopback control listener: serves `/debug/state` (and snapshot ingest later).
    Control,
}

/// What to do with requests to paths that are not OpenAI inference endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OtherPaths {
    /// Let them through untouched (to whatever route Envoy has for them).
    #[default]
    Pass,
    /// Answer 404 in the OpenAI error shape.
    Reject,
}

/// Legacy InferenceModel criticality (`inference.networking.x-k8s.io/v1alpha2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Criticality {
    Critical,
    Standard,
    Sheddable,
}

impl Criticality {
    /// Critical outranks Standard; Sheddable is negative, so it may be shed.
    pub fn priority(self) -> i32 {
        match self {
            Criticality::Critical => 1,
            Criticality::Standard => 0,
            Criticality::Sheddable => -1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub role: Role,
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: usize,
    #[serde(default)]
    pub other_paths: OtherPaths,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default)]
    pub objectives: Vec<RawObjective>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Pool for models not listed in `models`; without it they get 404 `model_not_found`.
    #[serde(default)]
    pub default_pool: Option<String>,
    /// An HTTPRoute rule's InferencePool backends: each request first picks a
    /// pool by weight, then the model's entry applies if it names that pool.
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// Snapshot push endpoint (control role only).
    #[serde(default)]
    pub ingest: Option<RawIngest>,
    /// Control role: `GET /metrics` requires `authorization: Bearer <token>`
    /// (what the GKE metrics-scraping guide's ClusterPodMonitoring sends).
    #[serde(default)]
    pub metrics_token: Option<String>,
    /// A snapshot older than this is stale: routing falls back to in-flight counts only.
    #[serde(default = "default_snapshot_stale_after_ms")]
    pub snapshot_stale_after_ms: u64,
    #[serde(default)]
    pub scheduling: RawScheduling,
    /// Write the chosen endpoint and its fallbacks, comma-separated, to
    /// `x-gateway-destination-endpoint` (for Envoy's override-host load balancer,
    /// which retries on the next one). Off: only the chosen endpoint, as an
    /// ORIGINAL_DST cluster needs.
    #[serde(default)]
    pub destination_list: bool,
    /// Prompt and response screening (Model Armor REST shape); absent: off.
    #[serde(default)]
    pub safety: Option<RawSafety>,
    /// The only networks the gateway routes to (CIDRs). A pushed snapshot names
    /// the members; this keeps a leaked ingest token from pointing Envoy's
    /// ORIGINAL_DST cluster anywhere else.
    #[serde(default = "default_allowed_endpoint_cidrs")]
    pub allowed_endpoint_cidrs: Vec<String>,
    /// API keys, their models, objectives and limits (docs/auth.md); absent:
    /// no key is asked for.
    #[serde(default)]
    pub auth: Option<RawAuth>,
    /// Per-pool backend policies (docs/backend-policy.md).
    #[serde(default)]
    pub backend_policies: Vec<RawBackendPolicy>,
}

/// Loopback and the private ranges: where pods and local model servers live.
pub const DEFAULT_ALLOWED_ENDPOINT_CIDRS: [&str; 6] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
];

fn default_allowed_endpoint_cidrs() -> Vec<String> {
    DEFAULT_ALLOWED_ENDPOINT_CIDRS.map(String::from).to_vec()
}

fn default_snapshot_stale_after_ms() -> u64 {
    DEFAULT_SNAPSHOT_STALE_AFTER_MS
}

/// Default age after which a snapshot (or an endpoint's last scrape) is stale.
pub const DEFAULT_SNAPSHOT_STALE_AFTER_MS: u64 = 2_000;
/// Default cap on a pushed snapshot: 8 MiB (about 100k endpoints).
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    /// Bearer token the collector must present.
    pub token: String,
    #[serde(default = "default_max_snapshot_bytes")]
    pub max_snapshot_bytes: usize,
}

fn default_max_snapshot_bytes() -> usize {
    DEFAULT_MAX_SNAPSHOT_BYTES
}

fn default_max_body() -> usize {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    /// Model-server endpoints as `ip:port` (IPv6 as `[::1]:8000`): the members
    /// until a snapshot lists the pool (or always, without a collector).
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// An InferenceObjective: a named priority a client can select with the
/// `x-gateway-inference-objective` header, or a model can refer to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawObjective {
    pub name: String,
    pub priority: i32,
    /// Scheduling profile for requests with this objective (default: the
    /// scheduling section's `default_profile`).
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// The `model` clients send.
    pub name: String,
    pub pool: String,
    /// Name of an objective in `objectives` whose priority applies.
    #[serde(default)]
    pub objective: Option<String>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub criticality: Option<Criticality>,
    /// Weighted rewrite of `model` (InferenceModel `targetModels`), e.g. LoRA versions.
    #[serde(default)]
    pub target_models: Vec<RawTargetModel>,
    /// The model (and its targets) are LoRA adapters: turns on LoRA affinity. When
    /// unset, a model counts as an adapter if fresh metrics list it as one.
    #[serde(default)]
    pub adapter: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTargetModel {
    pub name: String,
    pub weight: u32,
}

/// One weighted backend of `backends` (an HTTPRoute `backendRef`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub pool: String,
    pub weight: u32,
}

/// A configuration error, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() || self.field == "." {
            write!(f, "invalid configuration: {}", self.message)
        } else {
            write!(f, "invalid configuration: {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// The validated configuration the filter runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub max_request_body_bytes: usize,
    pub other_paths: OtherPaths,
    pub pools: Vec<Pool>,
    pub objectives: HashMap<String, Objective>,
    pub models: HashMap<String, ModelRoute>,
    /// Model names in configuration order, for `GET /v1/models`.
    pub model_names: Vec<String>,
    /// Index into `pools`.
    pub default_pool: Option<usize>,
    /// Weighted pools every request is split across (empty: by model).
    pub backends: Vec<Backend>,
    pub ingest: Option<IngestConfig>,
    /// Bearer token `GET /metrics` on the control listener requires, if set.
    pub metrics_token: Option<String>,
    pub snapshot_stale_after_ms: u64,
    pub scheduling: Scheduling,
    pub destination_list: bool,
    pub safety: Option<Safety>,
    pub allowed_endpoints: AllowedNetworks,
    pub auth: Option<Auth>,
    /// Backend policy by pool index (`None`: the pool has none and pays nothing).
    pub policies: Vec<Option<PoolPolicy>>,
}

/// The networks members may be in (`allowed_endpoint_cidrs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedNetworks(Vec<ipnet::IpNet>);

impl AllowedNetworks {
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    fn parse(cidrs: &[String]) -> Result<AllowedNetworks, ConfigError> {
        if cidrs.is_empty() {
            return Err(err(
                "allowed_endpoint_cidrs",
                "at least one network is required (the gateway would route nowhere)",
            ));
        }
        cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.trim().parse::<ipnet::IpNet>().map_err(|_| {
                    err(
                        format!("allowed_endpoint_cidrs[{i}]"),
                        format!("'{c}' is not a CIDR such as 10.0.0.0/8 or fd00::/8"),
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(AllowedNetworks)
    }
}

/// A pool a share of the requests goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Index into `pools`.
    pub pool: usize,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Objective {
    pub priority: i32,
    /// Index into `scheduling.profiles`; `None`: the default profile.
    pub profile: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestConfig {
    pub token: String,
    pub max_snapshot_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// Normalised `ip:port` strings, as written to `x-gateway-destination-endpoint`.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    /// Index into `Config::pools`.
    pub pool: usize,
    /// `None`: no priority configured for the model (the default, 0, applies).
    pub priority: Option<i32>,
    /// Profile of the model's objective, if it names one with a profile.
    pub profile: Option<usize>,
    pub targets: Vec<TargetModel>,
    pub adapter: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetModel {
    pub name: String,
    pub weight: u32,
}

impl Config {
    /// Parses and validates the plugin configuration. An empty configuration is an
    /// error for the gateway role (it would route nothing).
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            err(field, e.into_inner().to_string())
        })?;
        raw.validate()
    }

    /// The backend policy of pool `pool`, if it has one.
    pub fn policy(&self, pool: usize) -> Option<&PoolPolicy> {
        self.policies.get(pool).and_then(Option::as_ref)
    }

    /// Whether any pool has a backend policy (its caps are checked against the
    /// stored in-flight counts, so no worker routes on its own view of them).
    pub fn any_policy(&self) -> bool {
        self.policies.iter().any(Option::is_some)
    }

    pub fn pool_by_name(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// Each pool's endpoints, in configuration order (what per-position lookups
    /// such as `inflight::Slots` and `IndexedSnapshot::with_pools` are built from).
    pub fn pool_endpoints(&self) -> impl Iterator<Item = &[String]> {
        self.pools.iter().map(|p| p.endpoints.as_slice())
    }

    /// Every endpoint of every pool, deduplicated, in configuration order.
    pub fn all_endpoints(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.pools
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| seen.insert(e.as_str()))
            .cloned()
            .collect()
    }
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.max_request_body_bytes == 0 {
            return Err(err("max_request_body_bytes", "must be greater than 0"));
        }
        if self.role == Role::Gateway && self.pools.is_empty() {
            return Err(err("pools", "at least one pool is required"));
        }

        let allowed = AllowedNetworks::parse(&self.allowed_endpoint_cidrs)?;
        let mut pools = Vec::with_capacity(self.pools.len());
        for (i, p) in self.pools.iter().enumerate() {
            let at = format!("pools[{i}]");
            check_name(&p.name, &format!("{at}.name"))?;
            if pools.iter().any(|q: &Pool| q.name == p.name) {
                return Err(err(
                    format!("{at}.name"),
                    format!("duplicate pool '{}'", p.name),
                ));
            }
            let mut endpoints = Vec::with_capacity(p.endpoints.len());
            for (j, e) in p.endpoints.iter().enumerate() {
                let addr: SocketAddr = e.trim().parse().map_err(|_| {
                    err(
                        format!("{at}.endpoints[{j}]"),
                        format!("'{e}' is not an ip:port address (IPv6 as [::1]:8000)"),
                    )
                })?;
                if !allowed.contains(&addr.ip()) || addr.port() == 0 {
                    return Err(err(
                        format!("{at}.endpoints[{j}]"),
                        format!("'{e}' is outside allowed_endpoint_cidrs (or port 0)"),
                    ));
                }
                let norm = addr.to_string();
                if endpoints.contains(&norm) {
                    return Err(err(
                        format!("{at}.endpoints[{j}]"),
                        format!("duplicate endpoint '{norm}'"),
                    ));
                }
                endpoints.push(norm);
            }
            pools.push(Pool {
                name: p.name.clone(),
                endpoints,
            });
        }
        let pool_index = |name: &str, field: String| {
            pools
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| err(field, format!("no pool named '{name}' in pools")))
        };

        let scheduling = self.scheduling.validate()?;
        let mut objectives = HashMap::new();
        for (i, o) in self.objectives.iter().enumerate() {
            check_name(&o.name, &format!("objectives[{i}].name"))?;
            let profile = match &o.profile {
                None => None,
                Some(p) => Some(scheduling.profile_index(p).ok_or_else(|| {
                    err(
                        format!("objectives[{i}].profile"),
                        format!("no scheduling profile named '{p}'"),
                    )
                })?),
            };
            let objective = Objective {
                priority: o.priority,
                profile,
            };
            if objectives.insert(o.name.clone(), objective).is_some() {
                return Err(err(
                    format!("objectives[{i}].name"),
                    format!("duplicate objective '{}'", o.name),
                ));
            }
        }

        let mut models = HashMap::new();
        let mut model_names = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}]");
            check_name(&m.name, &format!("{at}.name"))?;
            let pool = pool_index(&m.pool, format!("{at}.pool"))?;
            let set = [
                m.objective.is_some(),
                m.priority.is_some(),
                m.criticality.is_some(),
            ];
            if set.iter().filter(|s| **s).count() > 1 {
                return Err(err(
                    at,
                    "set at most one of objective, priority and criticality",
                ));
            }
            let objective = match &m.objective {
                None => None,
                Some(o) => Some(*objectives.get(o).ok_or_else(|| {
                    err(
                        format!("{at}.objective"),
                        format!("no objective named '{o}' in objectives"),
                    )
                })?),
            };
            let priority = match (objective, m.priority, m.criticality) {
                (Some(o), _, _) => Some(o.priority),
                (None, Some(p), _) => Some(p),
                (None, None, Some(c)) => Some(c.priority()),
                (None, None, None) => None,
            };
            let mut targets = Vec::with_capacity(m.target_models.len());
            for (j, t) in m.target_models.iter().enumerate() {
                check_name(&t.name, &format!("{at}.target_models[{j}].name"))?;
                if t.weight == 0 {
                    return Err(err(
                        format!("{at}.target_models[{j}].weight"),
                        "must be at least 1",
                    ));
                }
                targets.push(TargetModel {
                    name: t.name.clone(),
                    weight: t.weight,
                });
            }
            if targets.iter().map(|t| u64::from(t.weight)).sum::<u64>() > u64::from(u32::MAX) {
                return Err(err(
                    format!("{at}.target_models"),
                    "weights add up to more than 4294967295",
                ));
            }
            let route = ModelRoute {
                pool,
                priority,
                profile: objective.and_then(|o| o.profile),
                targets,
                adapter: m.adapter,
            };
            if models.insert(m.name.clone(), route).is_some() {
                return Err(err(
                    format!("{at}.name"),
                    format!("duplicate model '{}'", m.name),
                ));
            }
            model_names.push(m.name.clone());
        }

        let ingest = match &self.ingest {
            None => None,
            Some(_) if self.role != Role::Control => {
                return Err(err(
                    "ingest",
                    "only a control listener accepts snapshots; set role to \"control\"",
                ))
            }
            Some(i) => {
                if i.token.len() < 8 {
                    return Err(err("ingest.token", "must be at least 8 characters"));
                }
                if i.max_snapshot_bytes == 0 {
                    return Err(err("ingest.max_snapshot_bytes", "must be greater than 0"));
                }
                Some(IngestConfig {
                    token: i.token.clone(),
                    max_snapshot_bytes: i.max_snapshot_bytes,
                })
            }
        };
        if let Some(t) = &self.metrics_token {
            if self.role != Role::Control {
                return Err(err(
                    "metrics_token",
                    "only the control listener serves /metrics; set role to \"control\"",
                ));
            }
            if t.len() < 8 || !t.chars().all(|c| c.is_ascii_graphic()) {
                return Err(err(
                    "metrics_token",
                    "must be at least 8 visible ASCII characters, without spaces",
                ));
            }
        }
        if self.snapshot_stale_after_ms == 0 {
            return Err(err("snapshot_stale_after_ms", "must be greater than 0"));
        }

        let default_pool = match &self.default_pool {
            Some(name) => Some(pool_index(name, "default_pool".into())?),
            None => None,
        };
        let mut backends: Vec<Backend> = Vec::with_capacity(self.backends.len());
        for (i, b) in self.backends.iter().enumerate() {
            let pool = pool_index(&b.pool, format!("backends[{i}].pool"))?;
            if backends.iter().any(|x| x.pool == pool) {
                return Err(err(
                    format!("backends[{i}].pool"),
                    format!("'{}' is listed twice", b.pool),
                ));
            }
            backends.push(Backend {
                pool,
                weight: b.weight,
            });
        }
        if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
            return Err(err(
                "backends",
                "every weight is 0: at least one pool must take requests",
            ));
        }

        let auth = match &self.auth {
            Some(a) => Some(a.validate(&objectives)?),
            None => None,
        };
        let mut policies: Vec<Option<PoolPolicy>> = vec![None; pools.len()];
        for (i, bp) in self.backend_policies.iter().enumerate() {
            let at = format!("backend_policies[{i}]");
            let pool = pool_index(&bp.pool, format!("{at}.pool"))?;
            if policies[pool].is_some() {
                return Err(err(
                    format!("{at}.pool"),
                    format!("pool '{}' already has a backend policy", bp.pool),
                ));
            }
            let policy = bp
                .validate()
                .map_err(|e| err(format!("{at}.{}", e.field), e.message))?;
            policies[pool] = Some(policy);
        }
        Ok(Config {
            role: self.role,
            max_request_body_bytes: self.max_request_body_bytes,
            other_paths: self.other_paths,
            pools,
            objectives,
            models,
            model_names,
            default_pool,
            backends,
            ingest,
            metrics_token: self.metrics_token.clone(),
            snapshot_stale_after_ms: self.snapshot_stale_after_ms,
            scheduling,
            destination_list: self.destination_list,
            safety: match &self.safety {
                Some(s) => Some(s.validate()?),
                None => None,
            },
            allowed_endpoints: allowed,
            auth,
            policies,
        })
    }
}

fn check_name(name: &str, field: &str) -> Result<(), ConfigError> {
    if name.trim().is_empty() {
        return Err(err(field, "must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::from_json(json.as_bytes())
    }

    const GOOD: &str = r#"{
        "pools": [{"name": "p", "endpoints": ["127.0.0.1:8001", "[::1]:8002"]}],
        "objectives": [{"name": "critical", "priority": 5}],
        "models": [
            {"name": "a", "pool": "p", "objective": "critical"},
            {"name": "b", "pool": "p", "criticality": "Sheddable",
             "target_models": [{"name": "b-v1", "weight": 90}, {"name": "b-v2", "weight": 10}]},
            {"name": "c", "pool": "p"}
        ]
    }"#;

    #[test]
    fn backend_policies_are_validated_per_pool_naming_the_field() {
        let with = |policies: &str| {
            parse(&GOOD.replacen(
                "\"pools\"",
                &format!("\"backend_policies\": {policies}, \"pools\""),
                1,
            ))
        };
        let c = with(
            r#"[{"pool": "p", "scopes": [{"selector": {"zone": "a"}, "backend_preference": "PREFERRED", "max_in_flight_per_endpoint": 2}]}]"#,
        )
        .unwrap();
        let p = c.policy(0).unwrap();
        assert_eq!(p.scopes.len(), 1);
        assert!(parse(GOOD).unwrap().policy(0).is_none());
        let e = with(r#"[{"pool": "p", "default": {"balancing_mode": "IN_FLIGHT"}, "scopes": [{"selector": {"z": "a"}, "max_in_flight_per_endpoint": 1}]}]"#).unwrap_err();
        assert_eq!(
            e.field,
            "backend_policies[0].scopes[0].max_in_flight_per_endpoint"
        );
        let e = with(r#"[{"pool": "nope"}]"#).unwrap_err();
        assert_eq!(e.field, "backend_policies[0].pool");
        let e = with(r#"[{"pool": "p"}, {"pool": "p"}]"#).unwrap_err();
        assert_eq!(e.field, "backend_policies[1].pool");
        let e = with(r#"[{"pool": "p", "default": {"capacity_scaler": 5}}]"#).unwrap_err();
        assert!(e.field.starts_with("backend_policies[0].default"), "{e}");
    }

    #[test]
    fn accepts_a_full_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.role, Role::Gateway);
        assert_eq!(c.max_request_body_bytes, DEFAULT_MAX_REQUEST_BODY_BYTES);
        assert_eq!(c.pools[0].endpoints, vec!["127.0.0.1:8001", "[::1]:8002"]);
        assert_eq!(c.models["a"].priority, Some(5));
        assert_eq!(c.objectives["critical"].profile, None);
        assert_eq!(c.models["b"].priority, Some(-1));
        assert_eq!(c.models["c"].priority, None);
        assert_eq!(c.models["b"].targets.len(), 2);
        assert_eq!(c.model_names, vec!["a", "b", "c"]);
        assert_eq!(c.default_pool, None);
    }

    #[test]
    fn ingest_belongs_to_the_control_role() {
        let c = parse(r#"{"role": "control", "ingest": {"token": "0123456789"}}"#).unwrap();
        assert_eq!(
            c.ingest.unwrap().max_snapshot_bytes,
            DEFAULT_MAX_SNAPSHOT_BYTES
        );
        assert_eq!(
            field_of(
                r#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1"]}], "ingest": {"token": "0123456789"}}"#
            ),
            "ingest"
        );
        assert_eq!(
            field_of(r#"{"role": "control", "ingest": {"token": "short"}}"#),
            "ingest.token"
        );
    }

    #[test]
    fn objectives_select_profiles() {
        let c = parse(
            r#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1"]}],
                "objectives": [{"name": "o", "priority": 1, "profile": "lora"}],
                "models": [{"name": "m", "pool": "p", "objective": "o", "adapter": true}]}"#,
        )
        .unwrap();
        let lora = c.scheduling.profile_index("lora");
        assert_eq!(c.objectives["o"].profile, lora);
        assert_eq!(c.models["m"].profile, lora);
        assert_eq!(c.models["m"].adapter, Some(true));
        assert_eq!(
            field_of(
                r#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1"]}],
                    "objectives": [{"name": "o", "priority": 1, "profile": "nope"}]}"#
            ),
            "objectives[0].profile"
        );
    }

    #[test]
    fn control_role_needs_no_pools() {
        let c = parse(r#"{"role": "control"}"#).unwrap();
        assert_eq!(c.role, Role::Control);
    }

    fn field_of(json: &str) -> String {
        parse(json).unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of("{}"), "pools");
        assert_eq!(
            field_of(r#"{"pools": [{"name": "p", "endpoints": ["nope"]}]}"#),
            "pools[0].endpoints[0]"
        );
        assert_eq!(
            field_of(r#"{"pools": [{"name": "p", "endpoints": ["8.8.8.8:80"]}]}"#),
            "pools[0].endpoints[0]",
            "outside the default allowed networks"
        );
        assert_eq!(
            field_of(
                r#"{"pools": [{"name": "p"}], "allowed_endpoint_cidrs": ["10.0.0.0/8", "10.0.0.0"]}"#
            ),
            "allowed_endpoint_cidrs[1]"
        );
        assert_eq!(
            field_of(r#"{"pools": [{"name": "p"}], "allowed_endpoint_cidrs": []}"#),
            "allowed_endpoint_cidrs"
        );
        assert_eq!(
            field_of(r#"{"role": "control", "metrics_token": "short"}"#),
            "metrics_token"
        );
        assert_eq!(
            field_of(r#"{"pools": [{"name": "p"}], "metrics_token": "long-enough-token"}"#),
            "metrics_token",
            "only the control listener serves /metrics"
        );
        // A pool may start empty: its members come from the snapshots.
        let c = parse(r#"{"pools": [{"name": "p"}], "allowed_endpoint_cidrs": ["8.8.8.0/24"]}"#)
            .unwrap();
        assert!(c.pools[0].endpoints.is_empty());
        assert!(c.allowed_endpoints.contains(&"8.8.8.8".parse().unwrap()));
        assert!(!c.allowed_endpoints.contains(&"127.0.0.1".parse().unwrap()));
        assert_eq!(
            field_of(
                r#"{"pools": [{"name": "p", "endpoints": ["10.2.3.4:1"]}],
                    "models": [{"name": "m", "pool": "q"}]}"#
            ),
            "models[0].pool"
        );
        assert_eq!(
            field_of(
                r#"{"pools": [{"name": "p", "endpoints": ["10.2.3.4:1"]}],
                    "models": [{"name": "m", "pool": "p",
                                "target_models": [{"name": "x", "weight": 0}]}]}"#
            ),
            "models[0].target_models[0].weight"
        );
        assert_eq!(
            field_of(
                r#"{"pools": [{"name": "p", "endpoints": ["10.2.3.4:1"]}],
                    "models": [{"name": "m", "pool": "p", "objective": "nope"}]}"#
            ),
            "models[0].objective"
        );
        assert_eq!(
            field_of(
                r#"{"pools": [{"name": "p", "endpoints": ["10.2.3.4:1"]}], "default_pool": "x"}"#
            ),
            "default_pool"
        );
    }

    #[test]
    fn serde_errors_carry_the_path() {
        let e = parse(r#"{"pools": [{"name": "p", "endpoints": [1]}]}"#).unwrap_err();
        assert_eq!(e.field, "pools[0].endpoints[0]");
        let e = parse(r#"{"pools": [], "max_request_body_bytes": "big"}"#).unwrap_err();
        assert_eq!(e.field, "max_request_body_bytes");
        let e = parse(r#"{"poools": []}"#).unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(parse("not json").is_err());
    }

    #[test]
    fn rejects_duplicates_and_conflicts() {
        let dup_endpoint =
            r#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1", "127.0.0.1:1"]}]}"#;
        assert_eq!(field_of(dup_endpoint), "pools[0].endpoints[1]");
        let dup_model = r#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1"]}],
            "models": [{"name": "m", "pool": "p"}, {"name": "m", "pool": "p"}]}"#;
        assert_eq!(field_of(dup_model), "models[1].name");
        let both = r#"{"pools": [{"name": "p", "endpoints": ["127.0.0.1:1"]}],
            "models": [{"name": "m", "pool": "p", "priority": 1, "criticality": "Critical"}]}"#;
        assert_eq!(field_of(both), "models[0]");
    }

    #[test]
    fn all_endpoints_deduplicates_across_pools() {
        let c = parse(
            r#"{"pools": [{"name": "a", "endpoints": ["127.0.0.1:1", "127.0.0.1:2"]},
                          {"name": "b", "endpoints": ["127.0.0.1:2", "127.0.0.1:3"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.all_endpoints(),
            vec!["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        );
    }
}
