//! Exponential backoff with full jitter: the n-th wait is uniform in
//! `[0, min(max, initial · 2ⁿ)]`, so many shards (or many collectors) that
//! lost the same upstream do not reconnect in step.

use crate::config::RetryPlan;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(plan: RetryPlan) -> Backoff {
        Backoff {
            initial_ms: plan.initial_backoff_ms,
            max_ms: plan.max_backoff_ms,
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// The ceiling of the next wait.
    pub fn ceiling_ms(&self) -> u64 {
        self.initial_ms
            .saturating_mul(1u64 << self.attempt.min(32))
            .min(self.max_ms)
    }

    /// The next wait; each call doubles the ceiling up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling_ms();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(self.rng.u64(0..=ceiling))
    }

    /// After a success: start again from the initial wait.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(RetryPlan {
            initial_backoff_ms: 10,
            max_backoff_ms: 100,
        });
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling_ms());
            assert!(b.next_delay() <= Duration::from_millis(100));
        }
        assert_eq!(ceilings, vec![10, 20, 40, 80, 100, 100]);
        b.reset();
        assert_eq!(b.ceiling_ms(), 10);
    }
}
