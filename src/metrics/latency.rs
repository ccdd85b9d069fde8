//! Latency distributions: an hdrhistogram per shard and purpose, merged at
//! scrape time and shown as a Prometheus histogram.
//!
//! Values are recorded in microseconds with two significant digits (1 %
//! resolution) from 1 µs to 100 s, which keeps one histogram near 22 KiB;
//! anything longer is clamped to the top and still counted. The sum is kept
//! exactly beside it, since hdrhistogram only knows bucket midpoints.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Longest recordable value, in microseconds (100 s).
const MAX_US: u64 = 100_000_000;
const SIGNIFICANT_DIGITS: u8 = 2;

/// Prometheus bucket bounds, in seconds: 10 µs to 10 s, about three per
/// decade, so both a 50 µs primary-key lookup and a 2 s report land in a
/// bucket that tells them apart.
pub const BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One latency distribution.
#[derive(Clone)]
pub struct Latency {
    hist: Histogram<u64>,
    sum_us: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency")
            .field("count", &self.count())
            .field("sum_us", &self.sum_us)
            .finish()
    }
}

impl Latency {
    pub fn new() -> Self {
        Latency {
            hist: Histogram::new_with_bounds(1, MAX_US, SIGNIFICANT_DIGITS)
                .expect("constant bounds are valid"),
            sum_us: 0,
        }
    }

    #[inline]
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.record_us(us);
    }

    #[inline]
    pub fn record_us(&mut self, us: u64) {
        // Sub-microsecond values count as 1 µs; beyond the top, as the top.
        self.hist.saturating_record(us.clamp(1, MAX_US));
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }

    /// Adds `other`'s values (a scrape merging shards).
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// Values at or below `le` seconds, for a Prometheus bucket. Counts are
    /// cumulative by construction, since the ranges all start at zero.
    pub fn count_at_or_below(&self, le: f64) -> u64 {
        let us = (le * 1e6).round() as u64;
        if self.hist.is_empty() || us == 0 {
            return 0;
        }
        self.hist.count_between(0, us.min(MAX_US))
    }

    /// The value at `quantile` (0..=1), in microseconds.
    pub fn quantile_us(&self, quantile: f64) -> u64 {
        self.hist.value_at_quantile(quantile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_at_the_count() {
        let mut l = Latency::new();
        for us in [5, 12, 40, 90, 900, 1_500, 30_000, 2_000_000, 20_000_000] {
            l.record(Duration::from_micros(us));
        }
        let counts: Vec<u64> = BUCKETS.iter().map(|&b| l.count_at_or_below(b)).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(l.count_at_or_below(0.000_01), 1);
        assert_eq!(l.count_at_or_below(0.000_05), 3);
        assert_eq!(l.count_at_or_below(0.001), 5);
        assert_eq!(l.count_at_or_below(10.0), 8);
        assert_eq!(l.count(), 9);
        assert!((l.sum_seconds() - 22.032_547).abs() < 1e-9);
    }

    #[test]
    fn merging_adds_counts_and_sums() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        a.record(Duration::from_micros(100));
        b.record(Duration::from_micros(300));
        b.record(Duration::from_secs(1000)); // beyond the top: clamped, counted
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.count_at_or_below(0.000_25), 1);
        assert_eq!(a.count_at_or_below(10.0), 2);
        assert!((a.sum_seconds() - 1000.0004).abs() < 1e-9);
    }
}
