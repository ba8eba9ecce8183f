//! Retry schedule for pushes: exponential from `initial` to `max`, with jitter so
//! several collectors that lost the same Envoy do not retry in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The ceiling for the next wait: `initial * 2^(failures-1)`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let shift = self.failures.saturating_sub(1).min(30);
        self.initial
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Records a failure and returns how long to wait: a uniform draw from the
    /// upper half of the ceiling ("equal jitter"), so it never collapses to 0.
    pub fn fail(&mut self, rng: &mut fastrand::Rng) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let c = self.ceiling();
        let half = c / 2;
        let jitter_ms = rng.u64(0..=(c - half).as_millis() as u64);
        half + Duration::from_millis(jitter_ms)
    }

    pub fn succeed(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_with_jitter_in_the_upper_half() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1_000));
        let mut rng = fastrand::Rng::with_seed(1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let d = b.fail(&mut rng);
            let c = b.ceiling();
            assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
            ceilings.push(c.as_millis());
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.succeed();
        assert_eq!(b.failures(), 0);
        b.fail(&mut rng);
        assert_eq!(b.ceiling(), ms(100), "a success starts over");
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(3_000), Duration::from_secs(3_600));
        let mut rng = fastrand::Rng::with_seed(2);
        for _ in 0..100 {
            assert!(b.fail(&mut rng) <= Duration::from_secs(3_600));
        }
        let b = Backoff::new(Duration::from_millis(500), Duration::from_millis(100));
        assert_eq!(b.ceiling(), Duration::from_millis(500), "max below initial");
    }
}
