//! Per-consumer counters, updated without locks.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// Live counters of one consumer.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Dead letters by reason, in [`DeadLetterReason::ALL`](crate::dead_letter::DeadLetterReason::ALL) order.
    pub(crate) dead_lettered_by_reason: [AtomicU64; 5],
    /// Copies to each delay level (counted retries and deferrals).
    pub(crate) delayed_by_level: Vec<AtomicU64>,
    /// True while a session (channel and publisher) is established.
    pub(crate) session_active: AtomicBool,
    /// Handler durations, one histogram per [`HANDLER_OUTCOMES`] entry.
    pub(crate) handler_seconds: Option<Vec<metrics::Histogram>>,
    pub(crate) received: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) immediate_retries: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) requeued: AtomicU64,
    pub(crate) rejected_by_breaker: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) publish_failures: AtomicU64,
    /// Messages whose copy is being retried now (their originals unacked).
    pub(crate) copies_waiting: AtomicI64,
    /// Why copies cannot be stored, while they cannot (for `/readyz`).
    pub(crate) copy_trouble: std::sync::Mutex<Option<String>>,
    /// True while `copy_trouble` is set (read without the lock).
    pub(crate) copy_trouble_set: AtomicBool,
    pub(crate) in_flight: AtomicI64,
    /// The work queue's ready messages as last counted, plus one (0: not
    /// counted yet, or the last count failed).
    pub(crate) ready_plus_one: AtomicU64,
    pub(crate) subscribed: AtomicBool,
    pub(crate) subscriptions: AtomicU64,
}

/// A copy of a consumer's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Deliveries received from the broker.
    pub received: u64,
    /// Of those, marked redelivered by the broker.
    pub redelivered: u64,
    /// Handled successfully and acked.
    pub succeeded: u64,
    /// Transient handler failures (timeouts included).
    pub failed: u64,
    /// Of those, calls that outlived `call_timeout`.
    pub timed_out: u64,
    /// Calls made again at once after a failure (`retry.immediate`).
    pub immediate_retries: u64,
    /// Moved to a delay queue as a counted attempt.
    pub retried: u64,
    /// Moved back without counting an attempt (the dependency's fault).
    pub deferred: u64,
    /// Copied to the dead-letter queue.
    pub dead_lettered: u64,
    /// Returned to the queue unstarted (`basic.nack` requeue).
    pub requeued: u64,
    /// Deliveries that found the breaker open or its probes taken.
    pub rejected_by_breaker: u64,
    /// Results dropped because their channel was gone (the broker requeued the message).
    pub stale: u64,
    /// Copy attempts the broker did not confirm (each is retried with backoff).
    pub publish_failures: u64,
    /// Messages whose copy is being retried now, their originals unacked.
    pub copies_waiting: i64,
    /// Handlers running now.
    pub in_flight: i64,
    /// Whether a consumer is registered at the broker now.
    pub subscribed: bool,
    /// `basic.consume` calls so far.
    pub subscriptions: u64,
}

/// How a handler call ended, as the duration histogram's `outcome` label.
pub const HANDLER_OUTCOMES: [&str; 7] = [
    "success",
    "transient",
    "retry",
    "timeout",
    "permanent",
    "decode",
    "panic",
];

impl ConsumerStats {
    /// Counters for a consumer with `delay_levels` retry delays, recording
    /// handler durations into `handler_seconds` (one histogram per entry of
    /// [`HANDLER_OUTCOMES`], in its order).
    #[must_use]
    pub fn new(delay_levels: usize, handler_seconds: Option<Vec<metrics::Histogram>>) -> Self {
        Self {
            delayed_by_level: (0..delay_levels).map(|_| AtomicU64::new(0)).collect(),
            handler_seconds,
            ..Self::default()
        }
    }

    /// Dead letters by reason name.
    #[must_use]
    pub fn dead_lettered_by_reason(&self) -> Vec<(&'static str, u64)> {
        crate::dead_letter::DeadLetterReason::ALL
            .iter()
            .zip(&self.dead_lettered_by_reason)
            .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Copies per delay level (0-based).
    #[must_use]
    pub fn delayed_by_level(&self) -> Vec<u64> {
        self.delayed_by_level
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// The work queue's ready messages as the broker last counted them
    /// (every 5 s while the admin endpoint is on), if it could.
    #[must_use]
    pub fn queue_ready(&self) -> Option<u64> {
        self.ready_plus_one.load(Ordering::Relaxed).checked_sub(1)
    }

    pub(crate) fn set_queue_ready(&self, ready: Option<u32>) {
        self.ready_plus_one
            .store(ready.map_or(0, |n| u64::from(n) + 1), Ordering::Relaxed);
    }

    /// Why copies cannot be stored now, when they cannot.
    #[must_use]
    pub fn copy_trouble(&self) -> Option<String> {
        if !self.copy_trouble_set.load(Ordering::Relaxed) {
            return None;
        }
        self.copy_trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// True while the consumer has a working channel (paused or not).
    #[must_use]
    pub fn session_active(&self) -> bool {
        self.session_active.load(Ordering::Relaxed)
    }

    /// Reads every counter.
    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            received: r(&self.received),
            redelivered: r(&self.redelivered),
            succeeded: r(&self.succeeded),
            failed: r(&self.failed),
            timed_out: r(&self.timed_out),
            immediate_retries: r(&self.immediate_retries),
            retried: r(&self.retried),
            deferred: r(&self.deferred),
            dead_lettered: r(&self.dead_lettered),
            requeued: r(&self.requeued),
            rejected_by_breaker: r(&self.rejected_by_breaker),
            stale: r(&self.stale),
            publish_failures: r(&self.publish_failures),
            copies_waiting: self.copies_waiting.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            subscribed: self.subscribed.load(Ordering::Relaxed),
            subscriptions: r(&self.subscriptions),
        }
    }
}

pub(crate) fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}
