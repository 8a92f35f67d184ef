//! The circuit breaker that guards one named dependency.
//!
//! [`StateMachine`] is the pure logic: handed the time, no I/O, no locks, no
//! sleeping. [`Breaker`] shares one machine between every consumer that names
//! it, hands out [`Permit`]s, and publishes each state on a `watch` channel
//! (consumers pause and resume from it) and each [`Transition`] on a
//! `broadcast` channel (logs and metrics).
//!
//! ```text
//!            trip rule met                 open time elapsed
//!   Closed ───────────────▶ Open{until} ─────────────────────▶ HalfOpen{trial}
//!     ▲                        ▲                                   │   │
//!     │                        └──── a probe failed (longer open) ─┘   │
//!     └─────────────────────── all `half_open_probes` succeeded ───────┘
//!   ForcedOpen / Disabled: set and released by an operator only.
//! ```
//!
//! With a health check (`[breakers.NAME.health_check]` or a registered
//! [`HealthCheck`]), the open time does not end the open state: a passing
//! check does, at once, and no real message is spent on a trial while the
//! check fails (see the `health` module's notes for a check that lies).
//!
//! Trip rules (checked while closed, after each recorded call):
//! - failure rate in the window `>= failure_rate`, once the window holds `minimum_calls`;
//! - `consecutive_failures` failures in a row (optional), however many successes the window holds;
//! - slow-call rate `>= slow_call_rate` (with `1.0` meaning never), once `minimum_calls` is reached.
//!
//! A success that took longer than `call_timeout` is recorded as a failure.
//!
//! ```
//! use rabbit_guard::breaker::{Breaker, BreakerConfig, CallOutcome};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let breaker = Breaker::new("billing-api", BreakerConfig::default());
//! let permit = breaker.try_acquire().expect("a closed breaker admits calls");
//! // ... call the dependency ...
//! let state_after = permit.record(CallOutcome::Success);
//! assert_eq!(state_after.name(), "closed");
//! # }
//! ```

mod config;
mod handle;
mod health;
mod machine;
mod set;
mod window;

pub use config::{BreakerConfig, MAX_HALF_OPEN_PROBES, MAX_WINDOW_BUCKETS};
pub use handle::{Breaker, CallCounts, CallRecord, HealthVerdict, ManualAction, Permit, Snapshot};
#[cfg(feature = "http-handler")]
pub(crate) use health::HttpHealthCheck;
#[cfg(not(feature = "http-handler"))]
pub(crate) use health::NO_HTTP_CLIENT;
pub(crate) use health::{ErasedHealthCheck, erase as erase_health_check};
pub use health::{
    HealthCheck, HealthCheckConfig, HealthEffect, HealthResult, HealthStatus,
    MIN_HEALTH_CHECK_INTERVAL,
};
pub use machine::{
    BreakerState, CallOutcome, FleetState, PermitKind, Rejected, StateMachine, Transition,
    TransitionReason,
};
pub use set::MAX_BREAKERS_PER_CONSUMER;
pub(crate) use set::{BreakerSet, Permits, ReleaseWatch, blame};
pub use window::Counts;

#[cfg(test)]
mod tests;
