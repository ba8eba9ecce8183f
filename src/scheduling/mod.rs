//! Endpoint choice. This version drops endpoints that fresh metrics report as
//! unhealthy (unless that would drop them all) and picks the one with the fewest
//! requests in flight from this gateway; the metric-aware scheduler replaces the
//! body of [`pick`] behind the same signature.

use crate::snapshot::EndpointMetrics;

/// One endpoint the request could go to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate<'a> {
    pub endpoint: &'a str,
    /// Requests this gateway (all workers) has in flight to the endpoint.
    pub in_flight: u64,
    /// The endpoint's metrics from the last snapshot, if it has any.
    pub metrics: Option<&'a EndpointMetrics>,
    /// The metrics are recent enough to be trusted.
    pub fresh: bool,
}

impl<'a> Candidate<'a> {
    pub fn new(endpoint: &'a str, in_flight: u64) -> Self {
        Candidate {
            endpoint,
            in_flight,
            metrics: None,
            fresh: false,
        }
    }

    /// Fresh metrics say the endpoint is down. Stale or missing metrics never do:
    /// without a collector, the gateway still routes.
    fn known_down(&self) -> bool {
        self.fresh && self.metrics.is_some_and(|m| !m.healthy)
    }
}

/// Returns the index of the chosen candidate, or `None` for an empty list.
/// Ties are broken by `draw` (uniform `u32`) so bursts spread across equals.
pub fn pick(candidates: &[Candidate<'_>], draw: u32) -> Option<usize> {
    let any_up = candidates.iter().any(|c| !c.known_down());
    let eligible = |c: &Candidate<'_>| !any_up || !c.known_down();
    let least = candidates
        .iter()
        .filter(|c| eligible(c))
        .map(|c| c.in_flight)
        .min()?;
    let tied: Vec<usize> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| eligible(c) && c.in_flight == least)
        .map(|(i, _)| i)
        .collect();
    let slot = ((u64::from(draw) * tied.len() as u64) >> 32) as usize;
    tied.get(slot).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(endpoint: &str, in_flight: u64) -> Candidate<'_> {
        Candidate::new(endpoint, in_flight)
    }

    #[test]
    fn picks_the_least_loaded() {
        let cs = [c("a", 3), c("b", 1), c("c", 2)];
        for draw in [0, 1 << 31, u32::MAX] {
            assert_eq!(pick(&cs, draw), Some(1));
        }
    }

    #[test]
    fn empty_is_none() {
        assert_eq!(pick(&[], 0), None);
    }

    #[test]
    fn ties_are_spread_by_the_draw() {
        let cs = [c("a", 0), c("b", 5), c("c", 0)];
        assert_eq!(pick(&cs, 0), Some(0));
        assert_eq!(pick(&cs, u32::MAX), Some(2));
        let mut rng = fastrand::Rng::with_seed(1);
        let to_a = (0..10_000)
            .filter(|_| pick(&cs, rng.u32(..)) == Some(0))
            .count();
        assert!((4_500..5_500).contains(&to_a), "{to_a}");
    }

    #[test]
    fn avoids_endpoints_fresh_metrics_call_down() {
        let down = EndpointMetrics::default();
        let up = EndpointMetrics {
            healthy: true,
            ..Default::default()
        };
        let with = |e, n, m, fresh| Candidate {
            metrics: Some(m),
            fresh,
            ..c(e, n)
        };
        let cs = [with("a", 0, &down, true), with("b", 9, &up, true)];
        assert_eq!(pick(&cs, 0), Some(1));
        // Stale "down" is not trusted.
        let cs = [with("a", 0, &down, false), with("b", 9, &up, true)];
        assert_eq!(pick(&cs, 0), Some(0));
        // All down: still route somewhere rather than fail.
        let cs = [with("a", 4, &down, true), with("b", 2, &down, true)];
        assert_eq!(pick(&cs, 0), Some(1));
    }
}
