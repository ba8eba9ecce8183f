//! Endpoint choice. This first version picks the endpoint with the fewest requests
//! in flight from this gateway; the metric-aware scheduler replaces the body of
//! [`pick`] behind the same signature.

/// One endpoint the request could go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub endpoint: &'a str,
    /// Requests this gateway (all workers) has in flight to the endpoint.
    pub in_flight: u64,
}

/// Returns the index of the chosen candidate, or `None` for an empty list.
/// Ties are broken by `draw` (uniform `u32`) so bursts spread across equals.
pub fn pick(candidates: &[Candidate<'_>], draw: u32) -> Option<usize> {
    let least = candidates.iter().map(|c| c.in_flight).min()?;
    let tied: Vec<usize> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.in_flight == least)
        .map(|(i, _)| i)
        .collect();
    let slot = ((u64::from(draw) * tied.len() as u64) >> 32) as usize;
    tied.get(slot).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(endpoint: &str, in_flight: u64) -> Candidate<'_> {
        Candidate {
            endpoint,
            in_flight,
        }
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
}
