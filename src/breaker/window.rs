//! The rolling time window (a ring of buckets, each covering
//! `window / buckets`) and the failure streak, both on atomics so a success
//! in the closed state is recorded without a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Call counts over a time span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// Exact division by a divisor fixed at construction, without a divide
/// instruction on the hot path: multiply by a rounded-up reciprocal, then
/// correct the at most one-too-large estimate.
#[derive(Debug, Clone, Copy)]
struct Divisor {
    d: u64,
    /// `ceil(2^64 / d)`.
    m: u128,
}

impl Divisor {
    fn new(d: u64) -> Self {
        let d = d.max(1);
        Self {
            d,
            m: (1u128 << 64).div_ceil(u128::from(d)),
        }
    }

    fn div(self, n: u64) -> u64 {
        // n*m/2^64 >= n/d, and exceeds it by less than 1 for any u64 n.
        let q = u64::try_from((u128::from(n) * self.m) >> 64).unwrap_or(u64::MAX);
        if u128::from(q) * u128::from(self.d) > u128::from(n) {
            q - 1
        } else {
            q
        }
    }
}

/// One count in one bucket, stamped with the lap of the ring it counts:
/// the high 32 bits are the lap (wrapping after 2^32 windows: 136 years for
/// a 1 s window), the low 32 bits the count. Recycling a bucket for a newer
/// lap and counting in it are one atomic operation, so no call is ever lost
/// to a rotation, and there is no separate rotation step.
#[derive(Debug, Default)]
struct Counter(AtomicU64);

const COUNT_MASK: u64 = u32::MAX as u64;

impl Counter {
    fn add(&self, stamp: u32) {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let held = (current >> 32) as u32;
            if current != 0 && held.wrapping_sub(stamp) <= 1 {
                // This lap (or the next one, for a call that finished just
                // as the bucket moved on: counted there rather than lost).
                // 2^32 calls in one bucket width would be needed to overflow.
                self.0.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // Any other lap is out of the window: start this one at 1 in
            // the same operation.
            match self.0.compare_exchange_weak(
                current,
                (u64::from(stamp) << 32) | 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now_held) => current = now_held,
            }
        }
    }

    /// The count, if it belongs to lap `stamp`.
    fn get(&self, stamp: u32) -> u64 {
        let v = self.0.load(Ordering::Relaxed);
        if v != 0 && (v >> 32) as u32 == stamp {
            v & COUNT_MASK
        } else {
            0
        }
    }

    fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Bucket {
    calls: Counter,
    failures: Counter,
    slow: Counter,
}

/// A rolling window of call counts. Recording a success is one load and
/// one atomic add (a compare-and-swap instead when the bucket still holds
/// an older lap); there is no lock and no rotation step: each count
/// carries the lap it belongs to, and reads skip counts older than the
/// window.
#[derive(Debug)]
pub(crate) struct Window {
    origin: Instant,
    /// Nanoseconds to bucket-width slots since `origin`.
    width: Divisor,
    /// Slots to laps of the ring.
    laps: Divisor,
    buckets: Vec<Bucket>,
}

impl Window {
    pub(crate) fn new(window: Duration, buckets: u32, origin: Instant) -> Self {
        let buckets = buckets.max(1);
        let bucket_width = (window / buckets).max(Duration::from_millis(1));
        Self {
            origin,
            width: Divisor::new(u64::try_from(bucket_width.as_nanos()).unwrap_or(u64::MAX)),
            laps: Divisor::new(u64::from(buckets)),
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
        }
    }

    /// The bucket-width slot `now` falls in, counted from `origin`.
    fn slot(&self, now: Instant) -> u64 {
        self.width.div(nanos_since(self.origin, now))
    }

    /// The lap of the ring and the bucket index of `now`.
    fn position(&self, now: Instant) -> (u64, usize) {
        let slot = self.slot(now);
        let lap = self.laps.div(slot);
        #[allow(clippy::cast_possible_truncation)] // below the bucket count
        let index = (slot - lap * self.laps.d) as usize;
        (lap, index)
    }

    pub(crate) fn record(&self, now: Instant, failed: bool, slow: bool) {
        let (lap, index) = self.position(now);
        let bucket = &self.buckets[index];
        #[allow(clippy::cast_possible_truncation)] // wrapping on purpose
        let stamp = lap as u32;
        bucket.calls.add(stamp);
        if failed {
            bucket.failures.add(stamp);
        }
        if slow {
            bucket.slow.add(stamp);
        }
    }

    pub(crate) fn counts(&self, now: Instant) -> Counts {
        let (lap, now_index) = self.position(now);
        #[allow(clippy::cast_possible_truncation)] // wrapping on purpose
        let (this_lap, last_lap) = (lap as u32, lap.wrapping_sub(1) as u32);
        let mut total = Counts::default();
        for (index, bucket) in self.buckets.iter().enumerate() {
            // Buckets up to now's hold this lap; those after it, the last.
            let stamp = if index <= now_index {
                this_lap
            } else {
                last_lap
            };
            total.calls += bucket.calls.get(stamp);
            total.failures += bucket.failures.get(stamp);
            total.slow += bucket.slow.get(stamp);
        }
        total
    }

    pub(crate) fn clear(&self) {
        for bucket in &self.buckets {
            bucket.calls.clear();
            bucket.failures.clear();
            bucket.slow.clear();
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
                // Just below a boundary, far from the origin: where a
                // reciprocal alone rounds up.
                86_400_000_000_000 - 1,
                365 * 86_400_000_000_000 - 1,
                100 * 365 * 86_400_000_000_000 - 1,
            ] {
                let t = start + Duration::from_nanos(offset);
                assert_eq!(
                    w.slot(t),
                    offset / width,
                    "window {window}ms/{buckets}, offset {offset}ns"
                );
                let (lap, index) = w.position(t);
                let slot = offset / width;
                assert_eq!(
                    (lap, index as u64),
                    (slot / u64::from(buckets), slot % u64::from(buckets)),
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
    fn no_call_is_lost_while_buckets_are_recycled_under_contention() {
        // 8 threads record together, slot after slot, over three laps of a
        // 10-bucket ring: every recycle races with other threads' records.
        let start = Instant::now();
        let (threads, per_slot, slots) = (8u64, 2_000u64, 30u64);
        let w = std::sync::Arc::new(Window::new(Duration::from_secs(10), 10, start));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads as usize));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (w, barrier) = (w.clone(), barrier.clone());
                std::thread::spawn(move || {
                    for slot in 0..slots {
                        let at = start + Duration::from_millis(slot * 1_000 + 500);
                        barrier.wait();
                        for i in 0..per_slot {
                            w.record(at, i % 2 == 0, i % 5 == 0);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        // The last 10 slots are in the window, each with every thread's calls.
        let c = w.counts(start + Duration::from_millis((slots - 1) * 1_000 + 500));
        let calls = threads * per_slot * 10;
        assert_eq!(
            (c.calls, c.failures, c.slow),
            (calls, calls / 2, calls / 5),
            "every call of the last 10 slots counted, none from before: {c:?}"
        );
    }

    #[test]
    fn a_bucket_idle_for_weeks_does_not_come_back() {
        let start = Instant::now();
        // The smallest buckets allowed (1 ms): 2^32 of them are 49 days.
        let w = Window::new(Duration::from_millis(10), 10, start);
        w.record(start, true, false);
        let later = start + Duration::from_millis(1 << 32);
        assert_eq!(w.counts(later), Counts::default(), "old counts read as new");
        w.record(later, false, false);
        let c = w.counts(later);
        assert_eq!((c.calls, c.failures), (1, 0), "{c:?}");
    }

    #[test]
    fn a_bucket_half_a_wrap_old_is_recycled_not_stuck() {
        let start = Instant::now();
        let w = Window::new(Duration::from_millis(10), 10, start);
        w.record(start, true, false);
        // 2^31 + 5 laps later the old stamp looks "ahead" on a wrapping
        // compare; it must still be replaced.
        let later = start + Duration::from_millis(10 * ((1 << 31) + 5));
        w.record(later, false, false);
        w.record(later, false, false);
        let c = w.counts(later);
        assert_eq!((c.calls, c.failures), (2, 0), "{c:?}");
    }

    #[test]
    fn divisor_is_exact() {
        for d in [
            1u64,
            3,
            7,
            10,
            1_000_000,
            999_999_937,
            1_000_000_000,
            3_600_000_000_000,
        ] {
            let div = Divisor::new(d);
            for n in [
                0u64,
                1,
                d - 1,
                d,
                d + 1,
                u64::MAX / 3,
                u64::MAX - 1,
                u64::MAX,
            ] {
                assert_eq!(div.div(n), n / d, "{n} / {d}");
            }
            for k in [1u64, 86_400, 31_536_000, 1 << 40] {
                let n = k.saturating_mul(d);
                for n in [n.saturating_sub(1), n, n.saturating_add(1)] {
                    assert_eq!(div.div(n), n / d, "{n} / {d}");
                }
            }
        }
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
