//! When a writer edits next: fixed or Poisson arrivals, from a small seeded generator.
//!
//! Owns the randomness of the workload so a run is repeatable from its `--seed`; never reads a clock.

use std::time::Duration;

use super::config::ArrivalKind;

/// SplitMix64: tiny, fast and good enough to pick edit positions and gaps (not for secrets).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The gap before a writer's next edit.
#[derive(Clone, Debug)]
pub struct Arrivals {
    kind: ArrivalKind,
    mean: Duration,
}

impl Arrivals {
    /// Arrivals of `kind` with mean gap `mean`.
    pub fn new(kind: ArrivalKind, mean: Duration) -> Arrivals {
        Arrivals { kind, mean }
    }

    /// The next gap: `mean` when fixed, an exponential draw when Poisson.
    pub fn next_gap(&self, rng: &mut Rng) -> Duration {
        match self.kind {
            ArrivalKind::Fixed => self.mean,
            ArrivalKind::Poisson => {
                // 1 - unit() is in (0, 1], so the logarithm is finite.
                let draw = -(1.0 - rng.unit()).ln();
                self.mean.mul_f64(draw.min(50.0))
            }
        }
    }

    /// A random first offset in `[0, mean)` so writers do not edit in lockstep.
    pub fn first_offset(&self, rng: &mut Rng) -> Duration {
        self.mean.mul_f64(rng.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_gaps_average_to_the_mean() {
        let arrivals = Arrivals::new(ArrivalKind::Poisson, Duration::from_millis(10));
        let mut rng = Rng::new(7);
        let n = 20_000;
        let total: Duration = (0..n).map(|_| arrivals.next_gap(&mut rng)).sum();
        let mean_ms = total.as_secs_f64() * 1e3 / f64::from(n);
        assert!((9.5..10.5).contains(&mean_ms), "mean gap {mean_ms} ms");
    }

    #[test]
    fn fixed_gaps_are_exact_and_below_stays_in_range() {
        let arrivals = Arrivals::new(ArrivalKind::Fixed, Duration::from_millis(20));
        let mut rng = Rng::new(1);
        assert_eq!(arrivals.next_gap(&mut rng), Duration::from_millis(20));
        assert!(arrivals.first_offset(&mut rng) < Duration::from_millis(20));
        for n in 1..50 {
            assert!(rng.below(n) < n);
        }
    }
}
