//! The rolling time window (a ring of buckets, each covering
//! `window / buckets`) and the failure streak, both on atomics so a success
//! in the closed state is recorded without a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Nanoseconds from `origin` to `t` (0 before it), without u128 math.
fn nanos_since(origin: Instant, t: Instant) -> u64 {
    let d = t.saturating_duration_since(origin);
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

#[derive(Debug, Default)]
struct Bucket {
    /// Which bucket-width slot since `origin` this bucket holds (0: never used).
    slot: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

/// A rolling window of call counts. Recording is a few relaxed atomic adds;
/// a bucket is recycled (with one compare-and-swap) the first time a call
/// lands in it after it fell out of the window, at most once per bucket
/// width. A call racing that recycle may be counted in the old period: the
/// window is a statistic, not a ledger.
#[derive(Debug)]
pub(crate) struct Window {
    origin: Instant,
    /// `2^64 / bucket width in ns`, rounded up: a slot is one multiply
    /// instead of a division on the hot path.
    per_bucket: u128,
    buckets: Vec<Bucket>,
}

impl Window {
    pub(crate) fn new(window: Duration, buckets: u32, origin: Instant) -> Self {
        let buckets = buckets.max(1);
        let bucket_width = (window / buckets).max(Duration::from_millis(1));
        let nanos = u128::from(u64::try_from(bucket_width.as_nanos()).unwrap_or(u64::MAX));
        Self {
            origin,
            per_bucket: (1u128 << 64).div_ceil(nanos),
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        // floor(nanos / width), exact for any span a process lives through.
        let quotient = (u128::from(nanos_since(self.origin, now)) * self.per_bucket) >> 64;
        u64::try_from(quotient).unwrap_or(u64::MAX - 1) + 1
    }

    pub(crate) fn record(&self, now: Instant, failed: bool, slow: bool) {
        let slot = self.slot(now);
        let len = self.buckets.len() as u64;
        let bucket = &self.buckets[(slot % len) as usize];
        let held = bucket.slot.load(Ordering::Acquire);
        if held != slot
            && held < slot
            && bucket
                .slot
                .compare_exchange(held, slot, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.calls.store(0, Ordering::Relaxed);
            bucket.failures.store(0, Ordering::Relaxed);
            bucket.slow.store(0, Ordering::Relaxed);
        }
        bucket.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            bucket.failures.fetch_add(1, Ordering::Relaxed);
        }
        if slow {
            bucket.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn counts(&self, now: Instant) -> Counts {
        let slot = self.slot(now);
        let len = self.buckets.len() as u64;
        let mut total = Counts::default();
        for bucket in &self.buckets {
            let held = bucket.slot.load(Ordering::Acquire);
            if held != 0 && held <= slot && slot - held < len {
                total.calls += bucket.calls.load(Ordering::Relaxed);
                total.failures += bucket.failures.load(Ordering::Relaxed);
                total.slow += bucket.slow.load(Ordering::Relaxed);
            }
        }
        total
    }

    pub(crate) fn clear(&self) {
        for bucket in &self.buckets {
            bucket.slot.store(0, Ordering::Release);
            bucket.calls.store(0, Ordering::Relaxed);
            bucket.failures.store(0, Ordering::Relaxed);
            bucket.slow.store(0, Ordering::Relaxed);
        }
    }
}

/// Everything about recent calls that a success in the closed state needs
/// to update: the window and the failure streak.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) window: Window,
    consecutive: AtomicU32,
    /// Nanoseconds after the window's origin, plus one, when the latest
    /// failure was recorded; 0: none since the last reset.
    last_failure_at: AtomicU64,
}

impl Counters {
    pub(crate) fn new(window: Window) -> Self {
        Self {
            window,
            consecutive: AtomicU32::new(0),
            last_failure_at: AtomicU64::new(0),
        }
    }

    fn stamp(&self, t: Instant) -> u64 {
        nanos_since(self.window.origin, t).saturating_add(1)
    }

    /// Updates the failure streak. Only a call that started after the
    /// latest failure was recorded ends it: calls already in flight by then
    /// carry older news about the dependency, whatever order they finish in.
    /// `elapsed` is how long the call took, ending at `now`.
    pub(crate) fn streak(&self, failed: bool, elapsed: Duration, now: Instant) {
        if failed {
            self.consecutive.fetch_add(1, Ordering::AcqRel);
            self.last_failure_at
                .fetch_max(self.stamp(now), Ordering::AcqRel);
        } else if self.consecutive.load(Ordering::Acquire) != 0 {
            // Only now is the call's start worth computing.
            let started = now.checked_sub(elapsed).unwrap_or(now);
            if self.stamp(started) >= self.last_failure_at.load(Ordering::Acquire) {
                self.consecutive.store(0, Ordering::Release);
            }
        }
    }

    pub(crate) fn consecutive(&self) -> u32 {
        self.consecutive.load(Ordering::Acquire)
    }

    pub(crate) fn reset(&self) {
        self.window.clear();
        self.consecutive.store(0, Ordering::Release);
        self.last_failure_at.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_roll_out_of_the_window_bucket_by_bucket() {
        let start = Instant::now();
        let w = Window::new(Duration::from_secs(10), 10, start);
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
    fn slots_match_plain_division() {
        let start = Instant::now();
        for (window, buckets) in [(10_000u64, 10u32), (1_000, 7), (60_000, 60), (3, 3)] {
            let w = Window::new(Duration::from_millis(window), buckets, start);
            let width = (Duration::from_millis(window) / buckets).max(Duration::from_millis(1));
            let width = u64::try_from(width.as_nanos()).unwrap();
            for offset in [
                0u64,
                1,
                width - 1,
                width,
                width + 1,
                7 * width - 1,
                123_456_789_013,
                86_400_000_000_000,
            ] {
                let t = start + Duration::from_nanos(offset);
                assert_eq!(
                    w.slot(t),
                    offset / width + 1,
                    "window {window}ms/{buckets}, offset {offset}ns"
                );
            }
        }
    }

    #[test]
    fn recycled_bucket_starts_from_zero() {
        let start = Instant::now();
        let w = Window::new(Duration::from_secs(2), 2, start);
        w.record(start, true, false);
        // Same ring position two laps later.
        w.record(start + Duration::from_secs(4), false, false);
        let c = w.counts(start + Duration::from_secs(4));
        assert_eq!(c.calls, 1, "{c:?}");
        assert_eq!(c.failures, 0, "{c:?}");
    }

    #[test]
    fn concurrent_records_in_one_bucket_are_all_counted() {
        let start = Instant::now();
        let w = std::sync::Arc::new(Window::new(Duration::from_secs(10), 10, start));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        w.record(start, i % 4 == 0, false);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let c = w.counts(start);
        assert_eq!((c.calls, c.failures), (80_000, 20_000), "{c:?}");
    }
}
