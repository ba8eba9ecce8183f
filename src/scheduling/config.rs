//! The `scheduling` section of the plugin configuration: profiles of weighted
//! scorers, saturation thresholds, the prefix index, fallbacks.

use crate::config::ConfigError;
use serde::Deserialize;

/// Most alternates a decision lists after its choice (`fallback_endpoints`):
/// Envoy retries a handful at most; the bound keeps the count arithmetic safe.
pub const MAX_FALLBACKS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorerKind {
    /// Fewer waiting requests on the server.
    Queue,
    /// More free KV cache.
    KvCache,
    /// The requested LoRA adapter is running, or waiting, or has a free slot.
    LoraAffinity,
    /// Longer prompt prefix recently routed there.
    PrefixCache,
    /// Fewer requests in flight from this gateway (fresh between scrapes).
    InFlight,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Picker {
    /// Highest weighted score; ties broken at random.
    #[default]
    MaxScore,
    /// Random among the `top_k` best, with probability proportional to score.
    WeightedRandom { top_k: usize },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScorer {
    #[serde(rename = "type")]
    pub kind: ScorerKind,
    pub weight: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub name: String,
    pub scorers: Vec<RawScorer>,
    #[serde(default)]
    pub picker: Picker,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Saturation {
    /// An endpoint with this many waiting requests is saturated.
    pub queue_depth: u32,
    /// An endpoint at this KV-cache utilization (0..1) is saturated.
    pub kv_cache_utilization: f64,
    /// Sheddable requests see the thresholds scaled by this (0..1], so the last
    /// free capacity is kept for requests of priority 0 and above.
    pub sheddable_headroom: f64,
}

impl Default for Saturation {
    fn default() -> Self {
        Saturation {
            queue_depth: 5,
            kv_cache_utilization: 0.8,
            sheddable_headroom: 0.8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixCache {
    /// Prompt bytes per hashed block (about 4 bytes a token: 256 ≈ 64 tokens).
    pub block_bytes: usize,
    /// Blocks hashed per prompt at most (bounds the work per request).
    pub max_blocks: usize,
    /// Shared-data slots in the index (about 150 bytes each).
    pub index_slots: u32,
    /// How long an endpoint is assumed to keep a prefix it served.
    pub ttl_ms: u64,
}

impl Default for PrefixCache {
    fn default() -> Self {
        PrefixCache {
            block_bytes: 256,
            max_blocks: 128,
            index_slots: 16_384,
            ttl_ms: 600_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScheduling {
    #[serde(default)]
    pub profiles: Vec<RawProfile>,
    #[serde(default = "default_profile_name")]
    pub default_profile: String,
    #[serde(default)]
    pub saturation: Saturation,
    #[serde(default)]
    pub prefix_cache: PrefixCache,
    /// Alternates written after the chosen endpoint, for Envoy retries.
    #[serde(default = "default_fallbacks")]
    pub fallback_endpoints: usize,
    /// `retry-after` on 429 for shed requests, in seconds.
    #[serde(default = "default_retry_after")]
    pub retry_after_seconds: u32,
    /// Add `x-gateway-scheduling` to upstream requests and log each decision.
    #[serde(default)]
    pub explain: bool,
}

impl Default for RawScheduling {
    fn default() -> Self {
        RawScheduling {
            profiles: Vec::new(),
            default_profile: default_profile_name(),
            saturation: Saturation::default(),
            prefix_cache: PrefixCache::default(),
            fallback_endpoints: default_fallbacks(),
            retry_after_seconds: default_retry_after(),
            explain: false,
        }
    }
}

fn default_profile_name() -> String {
    "default".into()
}
fn default_fallbacks() -> usize {
    2
}
fn default_retry_after() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub scorers: Vec<(ScorerKind, f64)>,
    pub picker: Picker,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scheduling {
    pub profiles: Vec<Profile>,
    /// Index into `profiles`.
    pub default_profile: usize,
    pub saturation: Saturation,
    pub prefix_cache: PrefixCache,
    pub fallback_endpoints: usize,
    pub retry_after_seconds: u32,
    pub explain: bool,
}

impl Default for Scheduling {
    fn default() -> Self {
        Scheduling {
            profiles: builtin_profiles(),
            default_profile: 0,
            saturation: Saturation::default(),
            prefix_cache: PrefixCache::default(),
            fallback_endpoints: default_fallbacks(),
            retry_after_seconds: default_retry_after(),
            explain: false,
        }
    }
}

/// Profiles every gateway has; a configured profile with the same name replaces one.
pub fn builtin_profiles() -> Vec<Profile> {
    use ScorerKind::*;
    let p = |name: &str, scorers: &[(ScorerKind, f64)]| Profile {
        name: name.into(),
        scorers: scorers.to_vec(),
        picker: Picker::MaxScore,
    };
    vec![
        p(
            "default",
            &[
                (Queue, 2.0),
                (KvCache, 2.0),
                (PrefixCache, 3.0),
                (LoraAffinity, 2.0),
                (InFlight, 2.0),
            ],
        ),
        p(
            "prefix-heavy",
            &[
                (Queue, 1.0),
                (KvCache, 1.0),
                (PrefixCache, 6.0),
                (LoraAffinity, 1.0),
                (InFlight, 1.0),
            ],
        ),
        p(
            "lora",
            &[
                (Queue, 1.0),
                (KvCache, 1.0),
                (PrefixCache, 1.0),
                (LoraAffinity, 6.0),
                (InFlight, 1.0),
            ],
        ),
        p("least-request", &[(InFlight, 1.0)]),
    ]
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

impl RawScheduling {
    pub fn validate(&self) -> Result<Scheduling, ConfigError> {
        let mut profiles = builtin_profiles();
        for (i, p) in self.profiles.iter().enumerate() {
            let at = format!("scheduling.profiles[{i}]");
            if p.name.trim().is_empty() {
                return Err(err(format!("{at}.name"), "must not be empty"));
            }
            if self.profiles[..i].iter().any(|q| q.name == p.name) {
                return Err(err(
                    format!("{at}.name"),
                    format!("duplicate profile '{}'", p.name),
                ));
            }
            if p.scorers.is_empty() {
                return Err(err(
                    format!("{at}.scorers"),
                    "at least one scorer is required",
                ));
            }
            for (j, s) in p.scorers.iter().enumerate() {
                if !(s.weight.is_finite() && s.weight >= 0.0) {
                    return Err(err(
                        format!("{at}.scorers[{j}].weight"),
                        "must be a finite number >= 0",
                    ));
                }
            }
            // Each weight finite is not enough: a sum that overflows makes every
            // total `x / inf`, and a NaN score has no rank.
            if !p.scorers.iter().map(|s| s.weight).sum::<f64>().is_finite() {
                return Err(err(
                    format!("{at}.scorers"),
                    "the weights must add up to a finite number",
                ));
            }
            if let Picker::WeightedRandom { top_k: 0 } = p.picker {
                return Err(err(format!("{at}.picker.top_k"), "must be at least 1"));
            }
            let profile = Profile {
                name: p.name.clone(),
                scorers: p.scorers.iter().map(|s| (s.kind, s.weight)).collect(),
                picker: p.picker,
            };
            match profiles.iter_mut().find(|q| q.name == p.name) {
                Some(existing) => *existing = profile,
                None => profiles.push(profile),
            }
        }
        let default_profile = profiles
            .iter()
            .position(|p| p.name == self.default_profile)
            .ok_or_else(|| {
                err(
                    "scheduling.default_profile",
                    format!("no profile named '{}'", self.default_profile),
                )
            })?;
        let s = &self.saturation;
        if !(s.kv_cache_utilization > 0.0 && s.kv_cache_utilization <= 1.0) {
            return Err(err(
                "scheduling.saturation.kv_cache_utilization",
                "must be in (0, 1]",
            ));
        }
        if !(s.sheddable_headroom > 0.0 && s.sheddable_headroom <= 1.0) {
            return Err(err(
                "scheduling.saturation.sheddable_headroom",
                "must be in (0, 1]",
            ));
        }
        if self.fallback_endpoints > MAX_FALLBACKS {
            return Err(err(
                "scheduling.fallback_endpoints",
                format!("must be at most {MAX_FALLBACKS}"),
            ));
        }
        let pc = &self.prefix_cache;
        if pc.block_bytes == 0 {
            return Err(err(
                "scheduling.prefix_cache.block_bytes",
                "must be at least 1",
            ));
        }
        if pc.index_slots == 0 {
            return Err(err(
                "scheduling.prefix_cache.index_slots",
                "must be at least 1",
            ));
        }
        Ok(Scheduling {
            profiles,
            default_profile,
            saturation: self.saturation,
            prefix_cache: self.prefix_cache,
            fallback_endpoints: self.fallback_endpoints,
            retry_after_seconds: self.retry_after_seconds,
            explain: self.explain,
        })
    }
}

impl Scheduling {
    pub fn profile_index(&self, name: &str) -> Option<usize> {
        self.profiles.iter().position(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Scheduling, ConfigError> {
        serde_json::from_str::<RawScheduling>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn builtins_and_overrides() {
        let s = parse("{}").unwrap();
        assert_eq!(s.profiles[s.default_profile].name, "default");
        assert!(s.profile_index("prefix-heavy").is_some());
        let s = parse(
            r#"{"profiles": [{"name": "default", "scorers": [{"type": "queue", "weight": 1}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            s.profiles[s.default_profile].scorers,
            vec![(ScorerKind::Queue, 1.0)]
        );
        assert_eq!(
            Scheduling::default().profiles.len(),
            builtin_profiles().len()
        );
    }

    #[test]
    fn errors_name_fields() {
        let f = |j: &str| parse(j).unwrap_err().field;
        assert_eq!(
            f(r#"{"default_profile": "x"}"#),
            "scheduling.default_profile"
        );
        assert_eq!(
            f(r#"{"profiles": [{"name": "p", "scorers": [{"type": "queue", "weight": -1}]}]}"#),
            "scheduling.profiles[0].scorers[0].weight"
        );
        assert_eq!(
            f(r#"{"profiles": [{"name": "p", "scorers": []}]}"#),
            "scheduling.profiles[0].scorers"
        );
        assert_eq!(
            f(r#"{"saturation": {"kv_cache_utilization": 1.5}}"#),
            "scheduling.saturation.kv_cache_utilization"
        );
        assert_eq!(
            f(
                r#"{"profiles": [{"name": "p", "scorers": [{"type": "queue", "weight": 1}], "picker": {"type": "weighted_random", "top_k": 0}}]}"#
            ),
            "scheduling.profiles[0].picker.top_k"
        );
        assert_eq!(
            f(
                r#"{"profiles": [{"name": "p", "scorers": [{"type": "queue", "weight": 1e308}, {"type": "kv_cache", "weight": 1e308}]}]}"#
            ),
            "scheduling.profiles[0].scorers"
        );
        assert_eq!(
            f(r#"{"fallback_endpoints": 65}"#),
            "scheduling.fallback_endpoints"
        );
    }
}
