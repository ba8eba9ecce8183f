//! Backend policies (docs/backend-policy.md): per pool, a default level and ordered
//! label-selected scopes that set an endpoint's preference, capacity scaler and
//! caps. Pure: parsed and validated once at configuration load, then asked per
//! endpoint what applies to it and what its capacity is.

pub mod rate;

use crate::snapshot::EndpointMetrics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `balancing_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BalancingMode {
    #[serde(rename = "IN_FLIGHT")]
    InFlight,
    #[serde(rename = "RATE")]
    Rate,
    #[serde(rename = "UTILIZATION")]
    Utilization,
    #[serde(rename = "CUSTOM_METRICS")]
    CustomMetrics,
}

/// `backend_preference`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Preference {
    #[default]
    #[serde(rename = "DEFAULT")]
    Default,
    #[serde(rename = "PREFERRED")]
    Preferred,
}

/// The backend-level fields, as set at one level (default or a scope).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    #[serde(default)]
    pub balancing_mode: Option<BalancingMode>,
    #[serde(default)]
    pub max_in_flight_per_endpoint: Option<u32>,
    #[serde(default)]
    pub max_rate_per_endpoint: Option<u32>,
    #[serde(default)]
    pub capacity_scaler_percent: Option<u32>,
    #[serde(default)]
    pub backend_preference: Option<Preference>,
    /// Accepted by the parser only to be rejected with a clear message.
    #[serde(default)]
    pub custom_metrics: Option<serde_json::Value>,
    /// Scopes only: the labels an endpoint must carry (all of them).
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Millionths of the requests logged (1_000_000: all).
    #[serde(default = "all")]
    pub sample_rate: u32,
}

fn yes() -> bool {
    true
}
fn all() -> u32 {
    1_000_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendPolicy {
    pub pool: String,
    #[serde(default)]
    pub default: Level,
    #[serde(default)]
    pub scopes: Vec<Level>,
    #[serde(default)]
    pub logging: Option<Logging>,
}

/// A scope: its selector (sorted label pairs) and its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    pub selector: Vec<(String, String)>,
    pub level: Level,
}

/// A validated policy of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolPolicy {
    pub default: Level,
    pub scopes: Vec<Scope>,
    pub logging: Option<Logging>,
}

/// What applies to one endpoint: the default level merged with its first matching
/// scope (they never set the same field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Index of the scope that matched, `None`: the default level alone.
    pub scope: Option<usize>,
    pub preferred: bool,
    pub scaler_percent: u32,
    pub max_in_flight: Option<u32>,
    pub max_rate: Option<u32>,
    pub mode: Option<BalancingMode>,
}

/// A policy error: the field (relative to the policy) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

fn perr(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

/// Backend-level field names as written, with what the level sets for each
/// (`balancing_mode` implies the field its mode needs).
fn fields_set(l: &Level) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(m) = l.balancing_mode {
        let mode = match m {
            BalancingMode::InFlight => "IN_FLIGHT",
            BalancingMode::Rate => "RATE",
            BalancingMode::Utilization => "UTILIZATION",
            BalancingMode::CustomMetrics => "CUSTOM_METRICS",
        };
        out.push(("balancing_mode", "balancing_mode".to_string()));
        let implied = match m {
            BalancingMode::InFlight => Some("max_in_flight_per_endpoint"),
            BalancingMode::Rate => Some("max_rate_per_endpoint"),
            BalancingMode::CustomMetrics => Some("custom_metrics"),
            BalancingMode::Utilization => None,
        };
        if let Some(f) = implied {
            out.push((f, format!("balancing_mode {mode}")));
        }
    }
    for (set, name) in [
        (
            l.max_in_flight_per_endpoint.is_some(),
            "max_in_flight_per_endpoint",
        ),
        (l.max_rate_per_endpoint.is_some(), "max_rate_per_endpoint"),
        (
            l.capacity_scaler_percent.is_some(),
            "capacity_scaler_percent",
        ),
        (l.backend_preference.is_some(), "backend_preference"),
        (l.custom_metrics.is_some(), "custom_metrics"),
    ] {
        if set {
            out.push((name, name.to_string()));
        }
    }
    out
}

fn check_level(l: &Level, at: &str) -> Result<(), PolicyError> {
    let at = |f: &str| {
        if at.is_empty() {
            f.to_string()
        } else {
            format!("{at}.{f}")
        }
    };
    if l.custom_metrics.is_some() || l.balancing_mode == Some(BalancingMode::CustomMetrics) {
        let f = if l.custom_metrics.is_some() {
            "custom_metrics"
        } else {
            "balancing_mode"
        };
        return Err(perr(
            at(f),
            "CUSTOM_METRICS balancing is not supported by this gateway (docs/backend-policy.md)",
        ));
    }
    if let Some(p) = l.capacity_scaler_percent {
        if p > 100 {
            return Err(perr(
                at("capacity_scaler_percent"),
                "must be between 0 and 100",
            ));
        }
    }
    Ok(())
}

impl RawBackendPolicy {
    /// Validates the policy; error fields are relative to the policy entry.
    pub fn validate(&self) -> Result<PoolPolicy, PolicyError> {
        check_level(&self.default, "default")?;
        if self.default.selector.is_some() {
            return Err(perr(
                "default.selector",
                "only a scope has a selector (put it in scopes[])",
            ));
        }
        let at_default = fields_set(&self.default);
        let mut scopes = Vec::with_capacity(self.scopes.len());
        for (i, s) in self.scopes.iter().enumerate() {
            let at = format!("scopes[{i}]");
            check_level(s, &at)?;
            let Some(selector) = &s.selector else {
                return Err(perr(format!("{at}.selector"), "is required"));
            };
            for (field, _) in fields_set(s) {
                if let Some((_, why)) = at_default.iter().find(|(d, _)| *d == field) {
                    let why = if why == field {
                        "set at the default level".to_string()
                    } else {
                        format!("set at the default level ({why})")
                    };
                    return Err(perr(
                        format!("{at}.{field}"),
                        format!(
                            "{why}: a field set at the default level may not also appear in a scope"
                        ),
                    ));
                }
            }
            for k in selector.keys() {
                if k.trim().is_empty() {
                    return Err(perr(format!("{at}.selector"), "a label key is empty"));
                }
            }
            scopes.push(Scope {
                selector: selector
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                level: Level {
                    selector: None,
                    ..s.clone()
                },
            });
        }
        if let Some(l) = self.logging {
            if l.sample_rate > 1_000_000 {
                return Err(perr(
                    "logging.sample_rate",
                    "must be between 0 and 1000000 (millionths)",
                ));
            }
        }
        Ok(PoolPolicy {
            default: self.default.clone(),
            scopes,
            logging: self.logging,
        })
    }
}

/// `labels` (sorted or not) has `key` = `value`.
fn has_label(labels: &[(String, String)], key: &str, value: &str) -> bool {
    labels.iter().any(|(k, v)| k == key && v == value)
}

impl PoolPolicy {
    /// What applies to an endpoint with `labels`.
    pub fn applied(&self, labels: &[(String, String)]) -> Applied {
        let scope = self
            .scopes
            .iter()
            .position(|s| s.selector.iter().all(|(k, v)| has_label(labels, k, v)));
        let d = &self.default;
        let s = scope.map(|i| &self.scopes[i].level);
        let pick = |f: fn(&Level) -> Option<u32>| f(d).or_else(|| s.and_then(f));
        Applied {
            scope,
            preferred: d
                .backend_preference
                .or(s.and_then(|s| s.backend_preference))
                == Some(Preference::Preferred),
            scaler_percent: pick(|l| l.capacity_scaler_percent).unwrap_or(100),
            max_in_flight: pick(|l| l.max_in_flight_per_endpoint),
            max_rate: pick(|l| l.max_rate_per_endpoint),
            mode: d.balancing_mode.or(s.and_then(|s| s.balancing_mode)),
        }
    }

    /// What applies to the endpoint with `metrics` (none: no labels).
    pub fn applied_to(&self, metrics: Option<&EndpointMetrics>) -> Applied {
        self.applied(metrics.map_or(&[][..], |m| m.labels.as_slice()))
    }
}

/// The request header a host sets on a routed request the access log should
/// skip (a sampled-out success); Envoy's access-log filter logs a request when
/// the header is absent or the status is 400 or above (docs/backend-policy.md).
pub const ACCESS_LOG_SKIP_HEADER: &str = "x-gateway-access-log";
/// Its value.
pub const ACCESS_LOG_SKIP: &str = "skip";

/// Whether a routed request of a pool with `logging` is logged, from a uniform
/// random `draw`: always without a `logging` block, never when disabled (errors
/// are logged anyway, by Envoy's filter), else with probability
/// `sample_rate / 1_000_000`.
pub fn log_sampled(logging: Option<&Logging>, draw: u32) -> bool {
    match logging {
        None => true,
        Some(l) if !l.enabled => false,
        Some(l) => (u64::from(draw) * 1_000_000) >> 32 < u64::from(l.sample_rate),
    }
}

/// Shared-data key where the gateway listener publishes its pools' policies
/// (`[[pool name, policy], …]` as JSON) for the control listener's report.
pub const POLICIES_KEY: &str = "igw.backend_policies";

/// One endpoint of a pool with a policy, as this replica applies it: what
/// `GET /debug/state` reports and the per-endpoint gauges render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointCapacity {
    pub pool: String,
    pub endpoint: String,
    pub applied: Applied,
    /// This replica's caps, after the scaler and the replica share.
    pub in_flight_cap: Option<u64>,
    pub rate_cap: Option<u64>,
    /// The gateway's own in-flight count.
    pub in_flight: u64,
}

/// Every endpoint the snapshot lists for a pool of `policies`, with what applies
/// to it; `in_flight(address)` is the gateway's count.
pub fn endpoint_capacities<'a>(
    policies: impl IntoIterator<Item = (&'a str, &'a PoolPolicy)>,
    snapshot: &crate::snapshot::Snapshot,
    replicas: u32,
    in_flight: &dyn Fn(&str) -> u64,
) -> Vec<EndpointCapacity> {
    let mut out = Vec::new();
    for (pool, policy) in policies {
        let Some(p) = snapshot.pool(pool) else {
            continue;
        };
        for e in &p.endpoints {
            let a = policy.applied(&e.labels);
            out.push(EndpointCapacity {
                pool: pool.to_string(),
                endpoint: e.address.clone(),
                in_flight_cap: a.in_flight_cap(replicas),
                rate_cap: a.rate_cap(replicas),
                in_flight: in_flight(&e.address),
                applied: a,
            });
        }
    }
    out
}

/// What `GET /debug/state` shows per endpoint of a pool with a policy: the
/// applied scope (`"default"` or `"scopes[i]"`), preference, this replica's
/// caps and the gateway's in-flight count.
pub fn endpoint_report(
    policies: &[(String, PoolPolicy)],
    snapshot: &crate::snapshot::Snapshot,
    replicas: u32,
    in_flight: &BTreeMap<String, u64>,
) -> BTreeMap<String, serde_json::Value> {
    let count = |a: &str| in_flight.get(a).copied().unwrap_or(0);
    endpoint_capacities(
        policies.iter().map(|(n, p)| (n.as_str(), p)),
        snapshot,
        replicas,
        &count,
    )
    .into_iter()
    .map(|c| {
        let a = c.applied;
        let report = serde_json::json!({
            "pool": c.pool,
            "scope": a.scope.map_or_else(|| "default".to_string(), |i| format!("scopes[{i}]")),
            "preference": if a.preferred { "PREFERRED" } else { "DEFAULT" },
            "capacity_scaler_percent": a.scaler_percent,
            "drained": a.drained(),
            "in_flight_cap": c.in_flight_cap,
            "rate_cap_per_second": c.rate_cap,
            "in_flight": c.in_flight,
        });
        (c.endpoint, report)
    })
    .collect()
}

/// The per-endpoint gauges of capacity and use in Prometheus' text format
/// (docs/backend-policy.md, Observability). Rendered when scraped, from the
/// shared counts: nothing on the request path. A cap that is not set has no
/// sample.
pub fn render_gauges(capacities: &[EndpointCapacity]) -> String {
    use std::fmt::Write;
    type Value = fn(&EndpointCapacity) -> Option<u64>;
    let gauges: [(&str, &str, Value); 5] = [
        (
            "inference_pool_endpoint_in_flight_cap",
            "This gateway replica's in-flight cap per endpoint (after the capacity scaler and the replica share; 0: drained).",
            |c| c.in_flight_cap,
        ),
        (
            "inference_pool_endpoint_rate_cap_per_second",
            "This gateway replica's rate cap per endpoint in requests a second (after the capacity scaler and the replica share; 0: drained).",
            |c| c.rate_cap,
        ),
        (
            "inference_pool_endpoint_capacity_scaler_percent",
            "The capacity scaler the backend policy applies to the endpoint (0: drained).",
            |c| Some(u64::from(c.applied.scaler_percent)),
        ),
        (
            "inference_pool_endpoint_preferred",
            "1 when the backend policy makes the endpoint PREFERRED.",
            |c| Some(u64::from(c.applied.preferred)),
        ),
        (
            "inference_pool_endpoint_in_flight",
            "Requests this gateway replica has in flight to the endpoint (all workers).",
            |c| Some(c.in_flight),
        ),
    ];
    let mut out = String::new();
    if capacities.is_empty() {
        return out;
    }
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for c in capacities {
            if let Some(v) = value(c) {
                let _ = writeln!(
                    out,
                    "{name}{{pool_name=\"{}\",endpoint=\"{}\"}} {v}",
                    crate::observe::render::esc(&c.pool),
                    crate::observe::render::esc(&c.endpoint)
                );
            }
        }
    }
    out
}

/// `value × percent / 100`, rounded down, but at least 1 unless the result is
/// exactly a drain (`percent` 0 or `value` 0).
pub fn scaled(value: u32, percent: u32) -> u64 {
    if value == 0 || percent == 0 {
        return 0;
    }
    (u64::from(value) * u64::from(percent.min(100)) / 100).max(1)
}

/// One gateway replica's share of a capacity: `max(1, floor(c / replicas))` when
/// `c > 0`, else 0.
pub fn share(capacity: u64, replicas: u32) -> u64 {
    if capacity == 0 {
        return 0;
    }
    (capacity / u64::from(replicas.max(1))).max(1)
}

impl Applied {
    /// No new requests at all.
    pub fn drained(&self) -> bool {
        self.scaler_percent == 0
    }

    /// Whether the capacity that decides spill-over is the scheduler's
    /// saturation (docs/backend-policy.md, "Capacity, per balancing mode"):
    /// `UTILIZATION`, or no mode and no cap. Caps that are set hold either way.
    pub fn capacity_by_metrics(&self) -> bool {
        match self.mode {
            Some(BalancingMode::Utilization) => true,
            Some(_) => false,
            None => self.max_in_flight.is_none() && self.max_rate.is_none(),
        }
    }

    /// This replica's rate cap in requests a second (`None`: no rate cap).
    pub fn rate_cap(&self, replicas: u32) -> Option<u64> {
        if self.drained() {
            return Some(0);
        }
        self.max_rate
            .map(|r| share(scaled(r, self.scaler_percent), replicas))
    }

    /// This replica's in-flight cap (`None`: uncapped; `Some(0)`: drained).
    pub fn in_flight_cap(&self, replicas: u32) -> Option<u64> {
        if self.drained() {
            return Some(0);
        }
        self.max_in_flight
            .map(|m| share(scaled(m, self.scaler_percent), replicas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<PoolPolicy, PolicyError> {
        serde_json::from_str::<RawBackendPolicy>(json)
            .map_err(|e| perr("", e.to_string()))?
            .validate()
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_first_matching_scope_applies_with_the_default_level() {
        let p = parse(
            r#"{"pool": "p", "default": {"max_in_flight_per_endpoint": 4},
                "scopes": [
                  {"selector": {"region": "us-west2"}, "capacity_scaler_percent": 50},
                  {"selector": {"env": "prod"}, "max_rate_per_endpoint": 40},
                  {"selector": {"cluster": "c", "zone": "a"}, "backend_preference": "PREFERRED"}
                ]}"#,
        )
        .unwrap();
        let a = p.applied(&labels(&[("region", "us-west2"), ("env", "prod")]));
        assert_eq!(a.scope, Some(0), "first match wins");
        assert_eq!((a.scaler_percent, a.max_rate), (50, None));
        assert_eq!(a.max_in_flight, Some(4), "the default level applies too");
        assert_eq!(a.in_flight_cap(1), Some(2));
        // Every label of a selector must match.
        let b = p.applied(&labels(&[("cluster", "c"), ("zone", "b")]));
        assert_eq!(b.scope, None);
        assert!(!b.preferred);
        assert_eq!(b.scaler_percent, 100);
        let c = p.applied(&labels(&[("zone", "a"), ("cluster", "c"), ("x", "y")]));
        assert_eq!(c.scope, Some(2));
        assert!(c.preferred);
        assert_eq!(p.applied(&[]).scope, None, "no labels: the default level");
    }

    #[test]
    fn a_field_at_both_levels_is_rejected_naming_it() {
        let e = parse(
            r#"{"pool": "p", "default": {"balancing_mode": "IN_FLIGHT"},
                "scopes": [{"selector": {"zone": "a"}, "max_in_flight_per_endpoint": 100}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "scopes[0].max_in_flight_per_endpoint");
        assert!(
            e.message
                .starts_with("set at the default level (balancing_mode IN_FLIGHT)"),
            "{}",
            e.message
        );
        let e = parse(
            r#"{"pool": "p", "default": {"max_rate_per_endpoint": 5},
                "scopes": [{"selector": {}, "max_rate_per_endpoint": 10}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "scopes[0].max_rate_per_endpoint");
        let e =
            parse(r#"{"pool": "p", "scopes": [{"selector": {}, "capacity_scaler_percent": 101}]}"#)
                .unwrap_err();
        assert_eq!(e.field, "scopes[0].capacity_scaler_percent");
        let e =
            parse(r#"{"pool": "p", "default": {"balancing_mode": "CUSTOM_METRICS"}}"#).unwrap_err();
        assert_eq!(e.field, "default.balancing_mode");
        let e = parse(r#"{"pool": "p", "logging": {"sample_rate": 1000001}}"#).unwrap_err();
        assert_eq!(e.field, "logging.sample_rate");
        let e =
            parse(r#"{"pool": "p", "scopes": [{"backend_preference": "PREFERRED"}]}"#).unwrap_err();
        assert_eq!(e.field, "scopes[0].selector");
        let e = parse(r#"{"pool": "p", "default": {"selector": {}}}"#).unwrap_err();
        assert_eq!(e.field, "default.selector");
        let e = parse(r#"{"pool": "p", "logging": {"sample_rate": 1000001}}"#).unwrap_err();
        assert_eq!(e.field, "logging.sample_rate");
        assert!(parse(r#"{"pool": "p", "default": {"max_inflight": 1}}"#).is_err());
    }

    #[test]
    fn access_log_sampling_follows_the_rate() {
        assert!(log_sampled(None, 0));
        let off = Logging {
            enabled: false,
            sample_rate: 1_000_000,
        };
        assert!(!log_sampled(Some(&off), 0));
        let half = Logging {
            enabled: true,
            sample_rate: 500_000,
        };
        let all = Logging {
            enabled: true,
            sample_rate: 1_000_000,
        };
        let none = Logging {
            enabled: true,
            sample_rate: 0,
        };
        let mut x = 0x1234_5678u32;
        let mut logged = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            logged += usize::from(log_sampled(Some(&half), x));
            assert!(log_sampled(Some(&all), x));
            assert!(!log_sampled(Some(&none), x));
        }
        assert!((4_700..5_300).contains(&logged), "{logged}");
        assert!(log_sampled(Some(&all), u32::MAX));
    }

    #[test]
    fn the_report_names_each_endpoints_scope_and_caps() {
        let p = parse(
            r#"{"pool": "p", "default": {"max_in_flight_per_endpoint": 4},
                "scopes": [{"selector": {"zone": "b"}, "capacity_scaler_percent": 0},
                           {"selector": {"zone": "a"}, "backend_preference": "PREFERRED"}]}"#,
        )
        .unwrap();
        // Round trip through the shared-data encoding.
        let stored = serde_json::to_vec(&vec![("p".to_string(), p)]).unwrap();
        let policies: Vec<(String, PoolPolicy)> = serde_json::from_slice(&stored).unwrap();
        let ep = |a: &str, z: &str| crate::snapshot::EndpointMetrics {
            address: a.into(),
            labels: labels(&[("zone", z)]),
            ..Default::default()
        };
        let snap = crate::snapshot::Snapshot {
            pools: vec![crate::snapshot::PoolSnapshot {
                name: "p".into(),
                endpoints: vec![
                    ep("10.0.0.1:80", "a"),
                    ep("10.0.0.2:80", "b"),
                    ep("10.0.0.3:80", "c"),
                ],
            }],
            ..Default::default()
        };
        let in_flight = BTreeMap::from([("10.0.0.1:80".to_string(), 2)]);
        let r = endpoint_report(&policies, &snap, 2, &in_flight);
        assert_eq!(r["10.0.0.1:80"]["scope"], "scopes[1]");
        assert_eq!(r["10.0.0.1:80"]["preference"], "PREFERRED");
        assert_eq!(
            r["10.0.0.1:80"]["in_flight_cap"], 2,
            "4 shared by 2 replicas"
        );
        assert_eq!(r["10.0.0.1:80"]["in_flight"], 2);
        assert_eq!(r["10.0.0.2:80"]["drained"], true);
        assert_eq!(r["10.0.0.2:80"]["in_flight_cap"], 0);
        assert_eq!(r["10.0.0.3:80"]["scope"], "default");
    }

    #[test]
    fn the_gauges_give_each_endpoints_caps_after_scaler_and_share_and_its_use() {
        let p = parse(
            r#"{"pool": "p\"q", "default": {"max_in_flight_per_endpoint": 10},
                "scopes": [{"selector": {"zone": "a"}, "backend_preference": "PREFERRED",
                            "capacity_scaler_percent": 50, "max_rate_per_endpoint": 30},
                           {"selector": {"zone": "b"}, "capacity_scaler_percent": 0}]}"#,
        )
        .unwrap();
        let ep = |a: &str, z: &str| crate::snapshot::EndpointMetrics {
            address: a.into(),
            labels: labels(&[("zone", z)]),
            ..Default::default()
        };
        let snap = crate::snapshot::Snapshot {
            pools: vec![
                crate::snapshot::PoolSnapshot {
                    name: "p\"q".into(),
                    endpoints: vec![ep("10.0.0.1:80", "a"), ep("10.0.0.2:80", "b")],
                },
                crate::snapshot::PoolSnapshot {
                    name: "other".into(),
                    endpoints: vec![ep("10.0.0.9:80", "a")],
                },
            ],
            ..Default::default()
        };
        let in_flight = |a: &str| u64::from(a == "10.0.0.1:80") * 3;
        let caps = endpoint_capacities([("p\"q", &p)], &snap, 2, &in_flight);
        let text = render_gauges(&caps);
        let value = |series: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        };
        let a = r#"{pool_name="p\"q",endpoint="10.0.0.1:80"}"#;
        let b = r#"{pool_name="p\"q",endpoint="10.0.0.2:80"}"#;
        for (gauge, at_a, at_b) in [
            // 10 × 50 % shared by two replicas; drained: 0.
            ("inference_pool_endpoint_in_flight_cap", 2, 0),
            // 30 × 50 % / 2, rounded down; drained: 0 although the scope sets none.
            ("inference_pool_endpoint_rate_cap_per_second", 7, 0),
            ("inference_pool_endpoint_capacity_scaler_percent", 50, 0),
            ("inference_pool_endpoint_preferred", 1, 0),
            ("inference_pool_endpoint_in_flight", 3, 0),
        ] {
            assert_eq!(value(&format!("{gauge}{a}")), Some(at_a), "{gauge}\n{text}");
            assert_eq!(value(&format!("{gauge}{b}")), Some(at_b), "{gauge}\n{text}");
        }
        assert!(
            !text.contains("10.0.0.9"),
            "a pool without a policy: {text}"
        );
        assert!(text.contains("# TYPE inference_pool_endpoint_in_flight_cap gauge"));
        // Without a rate cap there is no rate sample.
        let uncapped =
            parse(r#"{"pool": "p\"q", "default": {"max_in_flight_per_endpoint": 1}}"#).unwrap();
        let text = render_gauges(&endpoint_capacities(
            [("p\"q", &uncapped)],
            &snap,
            1,
            &in_flight,
        ));
        assert!(
            !text.contains("inference_pool_endpoint_rate_cap_per_second{"),
            "{text}"
        );
        assert!(render_gauges(&[]).is_empty(), "no policy: no gauge at all");
    }

    #[test]
    fn caps_scale_round_down_keep_one_and_share_across_replicas() {
        assert_eq!(scaled(10, 1), 1, "a 1% scaler does not drain");
        assert_eq!(scaled(10, 0), 0);
        assert_eq!(scaled(3, 50), 1);
        assert_eq!(scaled(8, 100), 8);
        assert_eq!(share(8, 3), 2);
        assert_eq!(share(2, 3), 1, "more replicas than the cap: one each");
        assert_eq!(share(0, 3), 0);
        let drained = Applied {
            scope: None,
            preferred: true,
            scaler_percent: 0,
            max_in_flight: None,
            max_rate: None,
            mode: None,
        };
        assert_eq!(drained.in_flight_cap(1), Some(0), "drained without a cap");
        let uncapped = Applied {
            scaler_percent: 100,
            ..drained
        };
        assert_eq!(uncapped.in_flight_cap(1), None);
    }
}
