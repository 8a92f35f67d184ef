//! The one backoff builder: exponential with jitter, without end (breaker
//! open times, reconnects, resubscribing, retried copies).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays from `min`, doubling with jitter, up to `max`, for ever.
pub(crate) fn exponential(min: Duration, max: Duration) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}
