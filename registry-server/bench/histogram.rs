//! A latency histogram that many tasks record into at once.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Shards spread the lock traffic of thousands of agent tasks.
const SHARDS: usize = 32;
/// Highest latency recorded, in microseconds; larger values are clamped.
const MAX_MICROS: u64 = 60_000_000;

/// Latencies in microseconds, split over [`SHARDS`] locked HDR histograms.
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

/// Percentiles of a [`Latencies`] snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// Largest sample, in milliseconds.
    pub max_ms: f64,
}

impl Latencies {
    /// Creates an empty histogram with two significant digits.
    pub fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(Histogram::new_with_bounds(1, MAX_MICROS, 2).expect("valid histogram bounds")))
            .collect();
        Latencies { shards }
    }

    /// Records one latency; `key` picks the shard, so callers pass their agent index.
    pub fn record(&self, key: usize, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        let mut shard = self.shards[key % SHARDS].lock().expect("histogram lock poisoned");
        shard.saturating_record(micros);
    }

    /// Merges all shards and then empties them, so the next window starts at zero.
    pub fn take(&self) -> Summary {
        let mut merged = Histogram::<u64>::new_with_bounds(1, MAX_MICROS, 2).expect("valid histogram bounds");
        for shard in &self.shards {
            let mut shard = shard.lock().expect("histogram lock poisoned");
            merged.add(&*shard).expect("histograms with equal bounds merge");
            shard.reset();
        }

        let millis = |micros: u64| micros as f64 / 1000.0;
        Summary {
            count: merged.len(),
            p50_ms: millis(merged.value_at_quantile(0.50)),
            p99_ms: millis(merged.value_at_quantile(0.99)),
            max_ms: millis(merged.max()),
        }
    }
}
