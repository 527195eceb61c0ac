//! Exponential backoff with full jitter: the n-th retry waits a random
//! time between zero and `min(cap, base * 2^n)`, so that agents restarted
//! together do not retry in step.

use std::time::Duration;

use rand::Rng;

/// Retry delays for one kind of operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Failures since the last success.
    attempt: u32,
}

impl Backoff {
    /// Creates a backoff whose first ceiling is `base` and whose ceiling
    /// never exceeds `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    /// Counts one failure and returns how long to wait before the retry.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=ceiling_nanos))
    }

    /// Returns the largest delay the next call to `next_delay` can return.
    pub fn ceiling(&self) -> Duration {
        // 2^20 times any sane base is far above any cap, so larger
        // exponents cannot change the result and are not computed.
        let factor = 1u32 << self.attempt.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Returns the number of failures since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Forgets earlier failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_growing_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let expected_ceilings = [100, 200, 400, 800, 1000, 1000];

        for ceiling_ms in expected_ceilings {
            assert_eq!(backoff.ceiling(), Duration::from_millis(ceiling_ms));
            let delay = backoff.next_delay();
            assert!(
                delay <= Duration::from_millis(ceiling_ms),
                "{delay:?} above {ceiling_ms} ms"
            );
        }
        assert_eq!(backoff.attempt(), 6);
    }

    #[test]
    fn delays_are_jittered() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));

        let delays: std::collections::HashSet<Duration> = (0..20).map(|_| backoff.next_delay()).collect();

        assert!(delays.len() > 1, "20 delays were all {delays:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for _ in 0..10 {
            backoff.next_delay();
        }

        backoff.reset();

        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
        assert_eq!(backoff.attempt(), 0);
    }

    #[test]
    fn huge_attempt_counts_saturate() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        backoff.attempt = u32::MAX;

        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
        assert!(backoff.next_delay() <= Duration::from_secs(30));
    }
}
