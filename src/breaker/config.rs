//! Breaker settings, as written under `[breakers.NAME]` in the config file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::health::HealthCheckConfig;

/// The most buckets a window may have (each is a few atomics).
pub const MAX_WINDOW_BUCKETS: u32 = 1_000;

/// The most half-open probes a breaker may take at once.
pub const MAX_HALF_OPEN_PROBES: u32 = 1_000;

/// How a breaker decides to trip, how long it stays open, and how it probes.
///
/// Every field has a default, so `[breakers.billing-api]` with no keys is a
/// working breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Trip when failures / calls in the window reach this fraction (0 < rate <= 1).
    pub failure_rate: f64,
    /// The window must hold at least this many calls before rates can trip it.
    pub minimum_calls: u32,
    /// Length of the rolling window that rates are computed over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Number of buckets the window is divided into (resolution of the roll-over).
    pub window_buckets: u32,
    /// A call taking longer than this is a slow call (whether it succeeded or not).
    #[serde(with = "humantime_serde")]
    pub slow_call_duration: Duration,
    /// Trip when slow calls / calls reach this fraction. `1.0` means slow calls
    /// never trip the breaker on their own.
    pub slow_call_rate: f64,
    /// A call that runs longer than this is cancelled and counted as a failure.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How long the breaker stays open after it trips.
    #[serde(with = "humantime_serde")]
    pub open_timeout: Duration,
    /// Upper bound for the open time, which doubles (with jitter) after each failed probe.
    #[serde(with = "humantime_serde")]
    pub max_open_timeout: Duration,
    /// Calls admitted in half-open; the breaker closes only when all of them succeed.
    pub half_open_probes: u32,
    /// Trip after this many failures in a row, whatever the window holds. Unset: off.
    pub consecutive_failures: Option<u32>,
    /// `[breakers.NAME.health_check]`: while open, ask the dependency
    /// whether it is back, and go half-open as soon as it is. Unset: the
    /// open time alone decides.
    pub health_check: Option<HealthCheckConfig>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            minimum_calls: 10,
            window: Duration::from_secs(10),
            window_buckets: 10,
            slow_call_duration: Duration::from_secs(5),
            slow_call_rate: 1.0,
            call_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(5),
            max_open_timeout: Duration::from_secs(60),
            half_open_probes: 1,
            consecutive_failures: None,
            health_check: None,
        }
    }
}

impl BreakerConfig {
    /// Trips after `n` failures in a row (`consecutive_failures`).
    #[must_use]
    pub fn with_consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// Trips when `rate` of at least `minimum_calls` calls in the window
    /// failed (`failure_rate`, `minimum_calls`).
    #[must_use]
    pub fn with_failure_rate(mut self, rate: f64, minimum_calls: u32) -> Self {
        self.failure_rate = rate;
        self.minimum_calls = minimum_calls;
        self
    }

    /// Stays open `open` at first, at most `max` after failed trials
    /// (`open_timeout`, `max_open_timeout`).
    #[must_use]
    pub fn with_open_timeout(mut self, open: Duration, max: Duration) -> Self {
        self.open_timeout = open;
        self.max_open_timeout = max;
        self
    }

    /// Cancels a call after `timeout` and counts it as a failure (`call_timeout`).
    #[must_use]
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Admits `probes` calls in half-open (`half_open_probes`).
    #[must_use]
    pub fn with_half_open_probes(mut self, probes: u32) -> Self {
        self.half_open_probes = probes;
        self
    }

    /// Asks the dependency while open (`[breakers.NAME.health_check]`).
    #[must_use]
    pub fn with_health_check(mut self, check: HealthCheckConfig) -> Self {
        self.health_check = Some(check);
        self
    }
}

/// For a rate written as a percentage (`50`): how to write it.
fn ratio_hint(rate: f64) -> String {
    if rate > 1.0 && rate <= 100.0 {
        format!(" (a ratio: {} means {rate}%)", rate / 100.0)
    } else {
        String::new()
    }
}

impl BreakerConfig {
    /// Every problem with these settings, as `(key, message)` pairs; keys are
    /// relative to the breaker's own table.
    #[must_use]
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = self.call_and_open_problems();
        if let Some(check) = &self.health_check {
            out.extend(check.problems());
        }
        out
    }

    fn call_and_open_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            out.push((
                "failure_rate",
                format!(
                    "must be in (0, 1], got {}{}",
                    self.failure_rate,
                    ratio_hint(self.failure_rate)
                ),
            ));
        }
        if !(self.slow_call_rate > 0.0 && self.slow_call_rate <= 1.0) {
            out.push((
                "slow_call_rate",
                format!(
                    "must be in (0, 1] (1.0 = never trip on slow calls), got {}{}",
                    self.slow_call_rate,
                    ratio_hint(self.slow_call_rate)
                ),
            ));
        }
        if self.minimum_calls == 0 {
            out.push(("minimum_calls", "must be at least 1, got 0".to_owned()));
        }
        if self.window_buckets == 0 {
            out.push(("window_buckets", "must be at least 1, got 0".to_owned()));
        } else if self.window_buckets > MAX_WINDOW_BUCKETS {
            out.push((
                "window_buckets",
                format!(
                    "must be at most {MAX_WINDOW_BUCKETS}, got {}",
                    self.window_buckets
                ),
            ));
        }
        if self.half_open_probes == 0 {
            out.push((
                "half_open_probes",
                "must be at least 1, got 0 (a breaker that never probes never closes)".to_owned(),
            ));
        } else if self.half_open_probes > MAX_HALF_OPEN_PROBES {
            out.push((
                "half_open_probes",
                format!(
                    "must be at most {MAX_HALF_OPEN_PROBES}, got {} (each probe is one message taken while the dependency may still be down)",
                    self.half_open_probes
                ),
            ));
        }
        if self.consecutive_failures == Some(0) {
            out.push((
                "consecutive_failures",
                "must be at least 1, got 0 (leave it out to turn it off)".to_owned(),
            ));
        }
        for (key, value) in [
            ("window", self.window),
            ("slow_call_duration", self.slow_call_duration),
            ("call_timeout", self.call_timeout),
            ("open_timeout", self.open_timeout),
            ("max_open_timeout", self.max_open_timeout),
        ] {
            if value.is_zero() {
                out.push((key, "must be greater than zero, got \"0s\"".to_owned()));
            } else if value > crate::limits::MAX_DURATION {
                out.push((
                    key,
                    format!(
                        "must be at most 100 years (\"100y\"), got {}",
                        humantime::format_duration(value)
                    ),
                ));
            }
        }
        if self.max_open_timeout < self.open_timeout {
            out.push((
                "max_open_timeout",
                format!(
                    "must be at least open_timeout ({}), got {}",
                    humantime::format_duration(self.open_timeout),
                    humantime::format_duration(self.max_open_timeout)
                ),
            ));
        }
        if !self.window.is_zero()
            && self.window_buckets > 0
            && self.window_buckets <= MAX_WINDOW_BUCKETS
            && self.window / self.window_buckets < Duration::from_millis(1)
        {
            out.push((
                "window_buckets",
                format!(
                    "buckets must be at least 1ms wide: {} buckets over {} is too many",
                    self.window_buckets,
                    humantime::format_duration(self.window)
                ),
            ));
        }
        out
    }
}
