//! The server's clock.
//!
//! Wall time is read once at start-up and then advanced by a monotonic
//! clock, so that a step of the system clock (an operator or NTP setting
//! the time) cannot stretch or shorten a lease inside one process. The
//! monotonic source is tokio's, so tests can pause and advance it.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use tokio::time::Instant;

/// A wall clock anchored to a monotonic one.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    anchor_wall: DateTime<Utc>,
    anchor_instant: Instant,
}

impl Clock {
    /// Starts a clock at the current system time.
    pub fn new() -> Self {
        Clock {
            anchor_wall: Utc::now(),
            anchor_instant: Instant::now(),
        }
    }

    /// Returns the current time, truncated to milliseconds because both
    /// stores keep millisecond precision and must compare equal values.
    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = Instant::now().saturating_duration_since(self.anchor_instant);
        let now = self.anchor_wall + TimeDelta::from_std(elapsed).unwrap_or(TimeDelta::MAX);
        now.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(now)
    }

    /// Converts a monotonic instant to wall time on this clock.
    pub fn at(&self, instant: Instant) -> DateTime<Utc> {
        let elapsed = instant.saturating_duration_since(self.anchor_instant);
        let time = self.anchor_wall + TimeDelta::from_std(elapsed).unwrap_or(TimeDelta::MAX);
        time.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(time)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn clock_follows_monotonic_time() {
        let clock = Clock::new();
        let start = clock.now();

        tokio::time::advance(Duration::from_secs(90)).await;

        assert_eq!(clock.now() - start, TimeDelta::seconds(90));
    }
}
