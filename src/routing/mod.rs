//! From a parsed request to a route: which pool serves the model, at which
//! priority, and which target model the body is rewritten to.

use crate::config::{Config, TargetModel};
use crate::openai::ApiError;

/// The header a client may use to name an InferenceObjective.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// Index into `Config::pools`.
    pub pool: usize,
    /// Negative: sheddable.
    pub priority: i32,
    /// The model the server sees; equal to the requested one when not rewritten.
    pub target_model: String,
    /// Index into `Config::scheduling.profiles`.
    pub profile: usize,
    /// Configured as a LoRA adapter (`None`: not said; infer from metrics).
    pub adapter: Option<bool>,
}

/// Resolves a request's model and priority against the configuration.
///
/// Priority, first that applies: the body's `priority` (vLLM's field), the objective
/// named by the `x-gateway-inference-objective` header, the model's configured
/// objective/priority/criticality, then 0. `draw` is a uniform random `u32`, for
/// the weighted choices: the pool among `backends`, then the target model.
///
/// With `backends` (an HTTPRoute's weighted InferencePools), the pool is chosen
/// first, whatever the model, as Envoy's weighted clusters choose before GIE's
/// picker sees the request; the model's entry applies only if it names that pool,
/// and otherwise the model passes through unchanged (a GA pool serves any model).
pub fn resolve(
    cfg: &Config,
    model: &str,
    body_priority: Option<i32>,
    objective_header: Option<&str>,
    draw: u32,
) -> Result<Resolution, ApiError> {
    let header_objective = match objective_header.map(str::trim).filter(|h| !h.is_empty()) {
        None => None,
        Some(name) => Some(*cfg.objectives.get(name).ok_or_else(|| {
            ApiError::invalid_request(
                "unknown_objective",
                format!("Unknown inference objective '{name}' in {OBJECTIVE_HEADER}."),
            )
        })?),
    };
    let (route, pool) = if cfg.backends.is_empty() {
        let route = cfg.models.get(model);
        match (route, cfg.default_pool) {
            (Some(r), _) => (route, r.pool),
            (None, Some(pool)) => (None, pool),
            (None, None) => return Err(ApiError::model_not_found(model)),
        }
    } else {
        let pool = pick_backend(&cfg.backends, mix(draw));
        (cfg.models.get(model).filter(|r| r.pool == pool), pool)
    };
    let target_model = route
        .and_then(|r| pick_weighted(&r.targets, draw))
        .unwrap_or(model)
        .to_string();
    Ok(Resolution {
        pool,
        priority: body_priority
            .or(header_objective.map(|o| o.priority))
            .or(route.and_then(|r| r.priority))
            .unwrap_or(0),
        target_model,
        profile: header_objective
            .and_then(|o| o.profile)
            .or(route.and_then(|r| r.profile))
            .unwrap_or(cfg.scheduling.default_profile),
        adapter: route.and_then(|r| r.adapter),
    })
}

/// A second uniform `u32` from `draw` for an independent-looking second choice (a
/// bijection, so still uniform): the pool split and the target rewrite of one
/// request must not always land on the same side together.
fn mix(draw: u32) -> u32 {
    // The finalizer of MurmurHash3.
    let mut h = draw ^ 0x9E37_79B9;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// The pool of the backend `draw` (uniform over `u32`) falls on, by weight.
/// Validation guarantees a backend with weight > 0.
fn pick_backend(backends: &[crate::config::Backend], draw: u32) -> usize {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    let mut point = (u64::from(draw) * total) >> 32;
    for b in backends {
        let w = u64::from(b.weight);
        if point < w {
            return b.pool;
        }
        point -= w;
    }
    backends
        .iter()
        .rev()
        .find(|b| b.weight > 0)
        .map_or(0, |b| b.pool)
}

/// Picks a target with probability proportional to its weight; `draw` is uniform
/// over `u32`. `None` when there are no targets.
pub fn pick_weighted(targets: &[TargetModel], draw: u32) -> Option<&str> {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return None;
    }
    // Scale the draw into [0, total) without modulo bias worth caring about.
    let mut point = (u64::from(draw) * total) >> 32;
    for t in targets {
        let w = u64::from(t.weight);
        if point < w {
            return Some(&t.name);
        }
        point -= w;
    }
    targets.last().map(|t| t.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_json(
            br#"{
            "pools": [{"name": "main", "endpoints": ["127.0.0.1:1"]},
                      {"name": "other", "endpoints": ["127.0.0.1:2"]}],
            "objectives": [{"name": "batch", "priority": -1, "profile": "least-request"},
                           {"name": "premium", "priority": 10, "profile": "prefix-heavy"}],
            "models": [
                {"name": "chat", "pool": "main", "objective": "premium"},
                {"name": "plain", "pool": "other"},
                {"name": "split", "pool": "main",
                 "target_models": [{"name": "v1", "weight": 3}, {"name": "v2", "weight": 1}]}
            ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn priority_precedence() {
        let c = cfg();
        assert_eq!(resolve(&c, "chat", None, None, 0).unwrap().priority, 10);
        assert_eq!(
            resolve(&c, "chat", None, Some("batch"), 0)
                .unwrap()
                .priority,
            -1
        );
        assert_eq!(
            resolve(&c, "chat", Some(3), Some("batch"), 0)
                .unwrap()
                .priority,
            3
        );
        assert_eq!(resolve(&c, "plain", None, None, 0).unwrap().priority, 0);
        assert_eq!(
            resolve(&c, "plain", None, Some(" "), 0).unwrap().priority,
            0
        );
    }

    #[test]
    fn profile_precedence() {
        let c = cfg();
        let idx = |n| c.scheduling.profile_index(n).unwrap();
        assert_eq!(
            resolve(&c, "chat", None, None, 0).unwrap().profile,
            idx("prefix-heavy")
        );
        assert_eq!(
            resolve(&c, "chat", None, Some("batch"), 0).unwrap().profile,
            idx("least-request")
        );
        assert_eq!(
            resolve(&c, "plain", None, None, 0).unwrap().profile,
            c.scheduling.default_profile
        );
    }

    #[test]
    fn unknown_objective_is_400() {
        let e = resolve(&cfg(), "chat", None, Some("gold"), 0).unwrap_err();
        assert_eq!((e.status, e.code), (400, "unknown_objective"));
    }

    #[test]
    fn unknown_model_is_404_unless_default_pool() {
        let mut c = cfg();
        let e = resolve(&c, "nope", None, None, 0).unwrap_err();
        assert_eq!((e.status, e.code), (404, "model_not_found"));
        c.default_pool = Some(1);
        let r = resolve(&c, "nope", None, None, 0).unwrap();
        assert_eq!((r.pool, r.target_model.as_str()), (1, "nope"));
    }

    #[test]
    fn pool_and_rewrite() {
        let c = cfg();
        let r = resolve(&c, "plain", None, None, 7).unwrap();
        assert_eq!((r.pool, r.target_model.as_str()), (1, "plain"));
        assert_eq!(
            resolve(&c, "split", None, None, 0).unwrap().target_model,
            "v1"
        );
        assert_eq!(
            resolve(&c, "split", None, None, u32::MAX)
                .unwrap()
                .target_model,
            "v2"
        );
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let targets = vec![
            TargetModel {
                name: "a".into(),
                weight: 90,
            },
            TargetModel {
                name: "b".into(),
                weight: 10,
            },
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 100_000;
        let a = (0..n)
            .filter(|_| pick_weighted(&targets, rng.u32(..)) == Some("a"))
            .count();
        let share = a as f64 / n as f64;
        assert!((0.88..0.92).contains(&share), "share of a: {share}");
        assert_eq!(pick_weighted(&[], 5), None);
        // Boundaries: the draw is scaled, never out of range.
        assert_eq!(pick_weighted(&targets, 0), Some("a"));
        assert_eq!(pick_weighted(&targets, u32::MAX), Some("b"));
    }

    #[test]
    fn backends_split_requests_by_weight_and_models_apply_in_their_pool() {
        let split = |weights: [u32; 2]| {
            Config::from_json(
                format!(
                    r#"{{"pools": [{{"name": "preview"}}, {{"name": "ga"}}],
                         "backends": [{{"pool": "preview", "weight": {}}}, {{"pool": "ga", "weight": {}}}],
                         "models": [{{"name": "food-review", "pool": "preview", "criticality": "Critical",
                                     "target_models": [{{"name": "food-review-1", "weight": 1}}]}}]}}"#,
                    weights[0], weights[1]
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let c = split([30, 70]);
        let mut per_pool = [0u32; 2];
        // Evenly spread draws: the shares must match the weights closely.
        for i in 0..10_000u32 {
            let r = resolve(&c, "food-review", None, None, i.wrapping_mul(429_497)).unwrap();
            per_pool[r.pool] += 1;
            if r.pool == 0 {
                assert_eq!(
                    r.target_model, "food-review-1",
                    "the entry applies in its pool"
                );
                assert!(r.priority > 0);
            } else {
                assert_eq!(
                    r.target_model, "food-review",
                    "passes through in the other pool"
                );
                assert_eq!(r.priority, 0);
            }
        }
        assert!((2_800..=3_200).contains(&per_pool[0]), "{per_pool:?}");
        // A model no entry names is served by whichever pool is drawn.
        assert!(resolve(&c, "anything", None, None, 5).is_ok());
        // Weight 0 drains a pool.
        let drained = split([0, 1]);
        assert!((0..1_000u32).all(
            |i| resolve(&drained, "food-review", None, None, i * 4_294_967)
                .unwrap()
                .pool
                == 1
        ));
    }

    #[test]
    fn backends_are_validated() {
        let field = |json: &str| Config::from_json(json.as_bytes()).unwrap_err().field;
        assert_eq!(
            field(r#"{"pools": [{"name": "a"}], "backends": [{"pool": "b", "weight": 1}]}"#),
            "backends[0].pool"
        );
        assert_eq!(
            field(r#"{"pools": [{"name": "a"}], "backends": [{"pool": "a", "weight": 0}]}"#),
            "backends"
        );
        assert_eq!(
            field(
                r#"{"pools": [{"name": "a"}], "backends": [{"pool": "a", "weight": 1}, {"pool": "a", "weight": 1}]}"#
            ),
            "backends[1].pool"
        );
        assert_eq!(
            field(r#"{"pools": [{"name": "a"}], "backends": [{"pool": "a", "weight": -1}]}"#),
            "backends[0].weight"
        );
    }
}
