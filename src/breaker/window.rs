//! The rolling time window: a ring of buckets, each covering `window / buckets`.

use std::time::Duration;

use tokio::time::Instant;

/// Call counts over a time span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Calls that finished with a success or a failure (ignored calls are not counted).
    pub calls: u64,
    /// Calls that failed (including timeouts).
    pub failures: u64,
    /// Calls slower than `slow_call_duration`, failed or not.
    pub slow: u64,
}

impl Counts {
    /// Failures divided by calls; 0 when there were no calls.
    #[must_use]
    pub fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }

    /// Slow calls divided by calls; 0 when there were no calls.
    #[must_use]
    pub fn slow_rate(&self) -> f64 {
        ratio(self.slow, self.calls)
    }

    fn add(&mut self, other: &Counts) {
        self.calls += other.calls;
        self.failures += other.failures;
        self.slow += other.slow;
    }
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-width slot since `origin` this bucket currently holds.
    slot: u64,
    counts: Counts,
}

/// A rolling window of call counts. Old buckets are recycled lazily when a
/// call lands in their ring position, so recording is O(1) and reading is
/// O(buckets).
#[derive(Debug, Clone)]
pub(crate) struct Window {
    origin: Instant,
    bucket_width: Duration,
    buckets: Vec<Bucket>,
}

impl Window {
    pub(crate) fn new(window: Duration, buckets: u32, origin: Instant) -> Self {
        let buckets = buckets.max(1);
        let bucket_width = (window / buckets).max(Duration::from_millis(1));
        Self {
            origin,
            bucket_width,
            buckets: vec![Bucket::default(); buckets as usize],
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin);
        // Slot 0 is reserved for "never used", so live slots start at 1.
        u64::try_from(elapsed.as_nanos() / self.bucket_width.as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    pub(crate) fn record(&mut self, now: Instant, failed: bool, slow: bool) {
        let slot = self.slot(now);
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(slot % len) as usize];
        if bucket.slot != slot {
            *bucket = Bucket {
                slot,
                counts: Counts::default(),
            };
        }
        bucket.counts.calls += 1;
        bucket.counts.failures += u64::from(failed);
        bucket.counts.slow += u64::from(slow);
    }

    pub(crate) fn counts(&self, now: Instant) -> Counts {
        let slot = self.slot(now);
        let len = self.buckets.len() as u64;
        let mut total = Counts::default();
        for bucket in &self.buckets {
            if bucket.slot != 0 && bucket.slot <= slot && slot - bucket.slot < len {
                total.add(&bucket.counts);
            }
        }
        total
    }

    pub(crate) fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_roll_out_of_the_window_bucket_by_bucket() {
        let start = Instant::now();
        let mut w = Window::new(Duration::from_secs(10), 10, start);
        w.record(start, true, false);
        w.record(start + Duration::from_millis(5_500), false, true);
        let c = w.counts(start + Duration::from_secs(6));
        assert_eq!(
            c,
            Counts {
                calls: 2,
                failures: 1,
                slow: 1
            }
        );
        // The first bucket [0s, 1s) leaves the window once 10s have passed.
        let c = w.counts(start + Duration::from_millis(10_100));
        assert_eq!(c.calls, 1, "first call should have rolled out: {c:?}");
        assert_eq!(c.failures, 0);
        let c = w.counts(start + Duration::from_millis(15_600));
        assert_eq!(c.calls, 0, "everything should have rolled out: {c:?}");
    }

    #[test]
    fn recycled_bucket_starts_from_zero() {
        let start = Instant::now();
        let mut w = Window::new(Duration::from_secs(2), 2, start);
        w.record(start, true, false);
        // Same ring position two laps later.
        w.record(start + Duration::from_secs(4), false, false);
        let c = w.counts(start + Duration::from_secs(4));
        assert_eq!(c.calls, 1, "{c:?}");
        assert_eq!(c.failures, 0, "{c:?}");
    }
}
