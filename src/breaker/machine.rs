//! The pure state machine. It is handed the time and never sleeps, so tests
//! drive it with paused tokio time.

use std::time::Duration;

use tokio::time::Instant;

use super::config::BreakerConfig;
use std::sync::Arc;

use super::window::{Counters, Counts, Window};

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls flow; outcomes are counted in the window.
    Closed,
    /// Calls are refused until `until`, then the breaker goes half-open.
    Open {
        /// When the breaker will admit probes again.
        until: Instant,
    },
    /// Exactly `half_open_probes` calls are admitted for trial number `trial`.
    HalfOpen {
        /// Increases with each half-open trial, so a consumer can tell trials apart.
        trial: u64,
    },
    /// Opened by an operator; stays open until closed or reset by hand.
    ForcedOpen,
    /// Turned off by an operator: every call is admitted and nothing trips.
    Disabled,
}

impl BreakerState {
    /// A short lowercase name, as used in logs, metrics and the admin API.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half-open",
            BreakerState::ForcedOpen => "forced-open",
            BreakerState::Disabled => "disabled",
        }
    }

    /// True when the breaker admits every call (closed or disabled).
    #[must_use]
    pub fn admits_all(&self) -> bool {
        matches!(self, BreakerState::Closed | BreakerState::Disabled)
    }
}

/// Why the breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransitionReason {
    /// The failure rate in the window reached `failure_rate`.
    FailureRate,
    /// The slow-call rate in the window reached `slow_call_rate`.
    SlowCallRate,
    /// `consecutive_failures` calls failed in a row.
    ConsecutiveFailures,
    /// The open time elapsed; probes may run.
    OpenTimeElapsed,
    /// The breaker's health check passed while it was open; probes may run.
    HealthCheckPassed,
    /// A half-open probe failed (or was too slow).
    ProbeFailed,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// An operator forced the breaker open.
    ManualOpen,
    /// An operator closed the breaker.
    ManualClose,
    /// An operator disabled the breaker.
    ManualDisable,
    /// An operator reset the breaker (closed, window and backoff cleared).
    ManualReset,
    /// Another worker of the fleet changed it (`[fleet]`): this worker
    /// took over the fleet's state.
    Fleet,
}

impl TransitionReason {
    /// A short kebab-case name for logs and metrics.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            TransitionReason::FailureRate => "failure-rate",
            TransitionReason::SlowCallRate => "slow-call-rate",
            TransitionReason::ConsecutiveFailures => "consecutive-failures",
            TransitionReason::OpenTimeElapsed => "open-time-elapsed",
            TransitionReason::HealthCheckPassed => "health-check-passed",
            TransitionReason::ProbeFailed => "probe-failed",
            TransitionReason::ProbesSucceeded => "probes-succeeded",
            TransitionReason::ManualOpen => "manual-open",
            TransitionReason::ManualClose => "manual-close",
            TransitionReason::ManualDisable => "manual-disable",
            TransitionReason::ManualReset => "manual-reset",
            TransitionReason::Fleet => "fleet",
        }
    }
}

/// One state change, with the numbers that explain it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Transition {
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
    /// Why.
    pub reason: TransitionReason,
    /// Window counts at the time of the change.
    pub counts: Counts,
    /// Failures in a row at the time of the change.
    pub consecutive_failures: u32,
    /// When it happened.
    pub at: Instant,
    /// In a fleet: this worker's own calls tripped the breaker while the
    /// fleet's combined window was healthy (one worker's path to the
    /// dependency failing), so the change is this worker's alone: the
    /// fleet is not told, and this worker runs its own trials. Also set on
    /// the changes that follow such a trip until the breaker is closed.
    pub local: bool,
}

/// What kind of call a permit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PermitKind {
    /// A normal call while closed (or disabled).
    Normal,
    /// A half-open probe belonging to trial `trial`.
    Probe {
        /// The half-open trial this probe belongs to.
        trial: u64,
    },
}

/// How a call ended, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The dependency answered well.
    Success,
    /// The dependency failed or the call timed out.
    Failure,
    /// The call says nothing about the dependency (bad message, panic, cancelled):
    /// it frees its slot and is not counted.
    Ignored,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// The breaker is open (by itself or by hand).
    #[error("circuit breaker is open")]
    Open,
    /// Half-open and every probe slot of this trial is taken.
    #[error("circuit breaker is half-open and its probes are taken")]
    ProbesTaken,
}

/// A state another worker of the fleet announced, for
/// [`StateMachine::adopt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FleetState {
    /// Open until this (local) time.
    Open {
        /// When the fleet's open period ends.
        until: Instant,
    },
    /// Another worker holds the probe lease and is running a trial.
    Probing,
    /// Closed (probes succeeded there, or closed by hand).
    Closed,
    /// Reset by hand: closed, window and backoff cleared.
    Reset,
    /// Forced open by hand.
    ForcedOpen,
    /// Disabled by hand.
    Disabled,
}

/// The breaker's logic, with no I/O, no clock and no locks.
#[derive(Debug)]
pub struct StateMachine {
    config: BreakerConfig,
    state: BreakerState,
    /// Window and failure streak, on atomics: the breaker handle records a
    /// success while closed through them without taking its lock.
    counters: Arc<Counters>,
    /// Open times for failed trials after the first trip; reset on close.
    backoff: backon::ExponentialBackoff,
    /// How long the breaker is staying open this time.
    current_open_time: Duration,
    trial: u64,
    probes_issued: u32,
    probes_succeeded: u32,
    probes_slow: u32,
    /// The current trial began because a health check passed.
    trial_by_health: bool,
    /// A trial that began on a passing check failed, and no check failed
    /// since: the next passing check waits for the open time too.
    distrust_check: bool,
    /// In a fleet, another worker holds the probe lease: the open state
    /// ends only by the fleet's word (or when this worker takes the lease).
    fleet_gated: bool,
    /// In a fleet, the other workers' failures in a row (since each one's
    /// last success), added to this worker's for `consecutive_failures`.
    fleet_streak: u32,
    /// In a fleet, the other workers' windows (those heard lately), added
    /// to this worker's for the rate rules.
    fleet_window: Counts,
    /// The breaker opened on this worker's own window while the fleet's
    /// was healthy: its changes are its own until it closes.
    local_trip: bool,
}

impl StateMachine {
    /// A closed breaker whose window starts at `now`.
    #[must_use]
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        let window = Window::new(config.window, config.window_buckets, now);
        let counters = Arc::new(Counters::new(window));
        let backoff = Self::backoff(&config);
        Self {
            current_open_time: config.open_timeout,
            config,
            state: BreakerState::Closed,
            counters,
            backoff,
            trial_by_health: false,
            distrust_check: false,
            fleet_gated: false,
            fleet_streak: 0,
            fleet_window: Counts::default(),
            local_trip: false,
            trial: 0,
            probes_issued: 0,
            probes_succeeded: 0,
            probes_slow: 0,
        }
    }

    fn backoff(config: &BreakerConfig) -> backon::ExponentialBackoff {
        // The first trip opens for exactly `open_timeout`; each failed trial
        // after it doubles that, with jitter so replicas don't probe in step.
        crate::backoff::exponential(
            config.open_timeout.saturating_mul(2),
            config.max_open_timeout,
        )
    }

    /// The settings this machine runs with.
    #[must_use]
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The current state (without applying any due timer; see [`check_open_timer`](Self::check_open_timer)).
    #[must_use]
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Counts in the window at `now`.
    #[must_use]
    pub fn counts(&self, now: Instant) -> Counts {
        self.counters.window.counts(now)
    }

    /// Failures in a row so far.
    #[must_use]
    pub fn consecutive_failures(&self) -> u32 {
        self.counters.consecutive()
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The open time used for the current (or last) open period.
    #[must_use]
    pub fn current_open_time(&self) -> Duration {
        self.current_open_time
    }

    /// True when a health check, not the open time, ends the open state.
    #[must_use]
    pub fn health_gated(&self) -> bool {
        self.config.health_check.is_some()
    }

    /// True while another worker of the fleet holds the probe lease: no
    /// trial starts here.
    #[must_use]
    pub fn fleet_gated(&self) -> bool {
        self.fleet_gated && !self.local_trip
    }

    /// Sets whether another worker of the fleet holds the probe lease.
    /// Lifting the gate applies a due open timer at once.
    pub fn set_fleet_gated(&mut self, gated: bool, now: Instant) -> Option<Transition> {
        self.fleet_gated = gated;
        if gated {
            None
        } else {
            self.check_open_timer(now)
        }
    }

    /// Sets the other workers' failures in a row (in a fleet). The streak
    /// rule counts them with this worker's own, so a fleet trips on one
    /// trip rule's failures, not one per worker; a closed breaker whose
    /// fleet-wide streak reaches it opens now.
    pub fn set_fleet_streak(&mut self, failures: u32, now: Instant) -> Option<Transition> {
        self.fleet_streak = failures;
        let trips = self.state == BreakerState::Closed
            && self
                .config
                .consecutive_failures
                .is_some_and(|n| self.streak() >= n && self.streak() > 0);
        trips.then(|| {
            self.current_open_time = self.config.open_timeout;
            self.open(TransitionReason::ConsecutiveFailures, now)
        })
    }

    /// Sets the other workers' windows (in a fleet). The rate rules judge
    /// the fleet's combined window, so a fleet trips on one
    /// `minimum_calls`, not one per worker (and one worker's failing calls
    /// trip it only when they are that share of the fleet's); a closed
    /// breaker whose combined window meets a rate rule opens now.
    pub fn set_fleet_window(&mut self, window: Counts, now: Instant) -> Option<Transition> {
        self.fleet_window = window;
        if self.state != BreakerState::Closed || window.calls == 0 {
            return None;
        }
        let reason = self.rate_rule(self.combined(now), window.failures > 0, window.slow > 0)?;
        self.current_open_time = self.config.open_timeout;
        Some(self.open(reason, now))
    }

    /// This worker's window and the fleet's.
    fn combined(&self, now: Instant) -> Counts {
        let own = self.counters.window.counts(now);
        Counts {
            calls: own.calls.saturating_add(self.fleet_window.calls),
            failures: own.failures.saturating_add(self.fleet_window.failures),
            slow: own.slow.saturating_add(self.fleet_window.slow),
        }
    }

    /// The rate rule `counts` meet, if any; `failed` and `slow` say what the
    /// news was (a success cannot trip the failure rule, nor a fast call
    /// the slow one).
    fn rate_rule(&self, counts: Counts, failed: bool, slow: bool) -> Option<TransitionReason> {
        if counts.calls < u64::from(self.config.minimum_calls) {
            None
        } else if failed && counts.failure_rate() >= self.config.failure_rate {
            Some(TransitionReason::FailureRate)
        } else if slow
            && self.config.slow_call_rate < 1.0
            && counts.slow_rate() >= self.config.slow_call_rate
        {
            Some(TransitionReason::SlowCallRate)
        } else {
            None
        }
    }

    /// Failures in a row, the fleet's included.
    fn streak(&self) -> u32 {
        self.counters
            .consecutive()
            .saturating_add(self.fleet_streak)
    }

    /// Takes over a state another worker of the fleet announced (already
    /// known to be newer than this breaker's). Returns the transition, if
    /// the state changed.
    pub fn adopt(&mut self, remote: FleetState, now: Instant) -> Option<Transition> {
        let reason = TransitionReason::Fleet;
        match remote {
            FleetState::Open { until } => (self.state != BreakerState::Open { until }).then(|| {
                self.current_open_time = until.saturating_duration_since(now);
                self.go(BreakerState::Open { until }, reason, now)
            }),
            // Another worker's trial: stay (or become) open, past the open
            // time, until its verdict comes.
            FleetState::Probing => (!matches!(self.state, BreakerState::Open { .. }))
                .then(|| self.go(BreakerState::Open { until: now }, reason, now)),
            FleetState::Closed => {
                (self.state != BreakerState::Closed).then(|| self.close(reason, now))
            }
            FleetState::Reset => {
                if self.state == BreakerState::Closed {
                    self.counters.reset();
                    self.backoff = Self::backoff(&self.config);
                    None
                } else {
                    Some(self.close(reason, now))
                }
            }
            FleetState::ForcedOpen => (self.state != BreakerState::ForcedOpen)
                .then(|| self.go(BreakerState::ForcedOpen, reason, now)),
            FleetState::Disabled => (self.state != BreakerState::Disabled)
                .then(|| self.go(BreakerState::Disabled, reason, now)),
        }
    }

    /// Applies the open timer: Open becomes HalfOpen once `until` has passed.
    /// With a health check, only a passing check ends the open state (see
    /// [`health_result`](Self::health_result)); in a fleet, only the worker
    /// holding the probe lease starts a trial.
    pub fn check_open_timer(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            BreakerState::Open { until }
                if now >= until && !self.health_gated() && !self.fleet_gated() =>
            {
                self.trial_by_health = false;
                Some(self.start_trial(TransitionReason::OpenTimeElapsed, now))
            }
            _ => None,
        }
    }

    /// Applies a health check's result. While open, a passing check starts
    /// a trial at once, unless the last trial that began on a passing check
    /// failed and no check has failed since: then it waits for the open
    /// time too. A failing check keeps the breaker open however long the
    /// open time was.
    pub fn health_result(
        &mut self,
        passed: bool,
        now: Instant,
    ) -> (super::health::HealthEffect, Option<Transition>) {
        use super::health::HealthEffect;
        let BreakerState::Open { until } = self.state else {
            return (HealthEffect::NotOpen, None);
        };
        if self.fleet_gated() {
            // Another worker holds the probe lease and runs the check.
            return (HealthEffect::NotOpen, None);
        }
        if !passed {
            // A check that can fail is telling the truth again.
            self.distrust_check = false;
            return (HealthEffect::StaysOpen, None);
        }
        if self.distrust_check && now < until {
            return (HealthEffect::WaitsForOpenTime, None);
        }
        self.trial_by_health = true;
        (
            HealthEffect::HalfOpen,
            Some(self.start_trial(TransitionReason::HealthCheckPassed, now)),
        )
    }

    fn start_trial(&mut self, reason: TransitionReason, now: Instant) -> Transition {
        self.trial += 1;
        self.probes_issued = 0;
        self.probes_succeeded = 0;
        self.probes_slow = 0;
        self.go(BreakerState::HalfOpen { trial: self.trial }, reason, now)
    }

    /// Asks to make a call. A due open timer is applied first, so the returned
    /// transition (if any) must be published by the caller.
    ///
    /// # Errors
    ///
    /// [`Rejected::Open`] while open, [`Rejected::ProbesTaken`] when half-open
    /// and every probe of the trial has been handed out.
    pub fn try_acquire(
        &mut self,
        now: Instant,
    ) -> (Result<PermitKind, Rejected>, Option<Transition>) {
        let transition = self.check_open_timer(now);
        let result = match self.state {
            BreakerState::Closed | BreakerState::Disabled => Ok(PermitKind::Normal),
            BreakerState::Open { .. } | BreakerState::ForcedOpen => Err(Rejected::Open),
            BreakerState::HalfOpen { trial } => {
                if self.probes_issued < self.config.half_open_probes {
                    self.probes_issued += 1;
                    Ok(PermitKind::Probe { trial })
                } else {
                    Err(Rejected::ProbesTaken)
                }
            }
        };
        (result, transition)
    }

    /// Records how a permitted call ended. `elapsed` is the call's duration:
    /// a success slower than `call_timeout` counts as a failure.
    pub fn record(
        &mut self,
        kind: PermitKind,
        outcome: CallOutcome,
        elapsed: Duration,
        now: Instant,
    ) -> Option<Transition> {
        let outcome = if outcome == CallOutcome::Success && elapsed > self.config.call_timeout {
            CallOutcome::Failure
        } else {
            outcome
        };
        let slow = elapsed > self.config.slow_call_duration;
        if outcome != CallOutcome::Ignored {
            self.counters
                .streak(outcome == CallOutcome::Failure, elapsed, now);
        }
        match kind {
            PermitKind::Normal => self.record_normal(outcome, slow, now),
            PermitKind::Probe { trial } => self.record_probe(trial, outcome, slow, now),
        }
    }

    fn record_normal(
        &mut self,
        outcome: CallOutcome,
        slow: bool,
        now: Instant,
    ) -> Option<Transition> {
        let failed = match outcome {
            CallOutcome::Ignored => return None,
            CallOutcome::Success => false,
            CallOutcome::Failure => true,
        };
        if self.state == BreakerState::Disabled {
            return None;
        }
        // Calls admitted while closed may finish after the breaker opened; they
        // still count in the window, but only a closed breaker can trip.
        self.counters.window.record(now, failed, slow);
        if self.state != BreakerState::Closed {
            return None;
        }
        let reason = if failed
            && self
                .config
                .consecutive_failures
                .is_some_and(|n| self.streak() >= n)
        {
            Some(TransitionReason::ConsecutiveFailures)
        } else if let Some(reason) = self.rate_rule(self.combined(now), failed, slow) {
            Some(reason)
        } else if self.fleet_window.calls > 0 {
            // The fleet's calls are healthy, this worker's are not: its own
            // path to the dependency fails. It pauses itself, alone.
            let own = self.rate_rule(self.counters.window.counts(now), failed, slow);
            self.local_trip = own.is_some();
            own
        } else {
            None
        };
        reason.map(|reason| {
            self.current_open_time = self.config.open_timeout;
            self.open(reason, now)
        })
    }

    fn record_probe(
        &mut self,
        trial: u64,
        outcome: CallOutcome,
        slow: bool,
        now: Instant,
    ) -> Option<Transition> {
        if self.state != (BreakerState::HalfOpen { trial }) {
            // A probe of an earlier trial, or the state was changed by hand.
            return None;
        }
        match outcome {
            CallOutcome::Ignored => {
                // It told us nothing: give the slot to another probe.
                self.probes_issued = self.probes_issued.saturating_sub(1);
                None
            }
            CallOutcome::Failure => {
                self.current_open_time = self.next_open_time();
                Some(self.open(TransitionReason::ProbeFailed, now))
            }
            CallOutcome::Success => {
                self.probes_succeeded += 1;
                self.probes_slow += u32::from(slow);
                if self.probes_succeeded < self.config.half_open_probes {
                    return None;
                }
                let slow_rate = f64::from(self.probes_slow) / f64::from(self.probes_succeeded);
                if self.config.slow_call_rate < 1.0 && slow_rate >= self.config.slow_call_rate {
                    self.current_open_time = self.next_open_time();
                    Some(self.open(TransitionReason::ProbeFailed, now))
                } else {
                    Some(self.close(TransitionReason::ProbesSucceeded, now))
                }
            }
        }
    }

    fn next_open_time(&mut self) -> Duration {
        self.backoff
            .next()
            .unwrap_or(self.config.max_open_timeout)
            .min(self.config.max_open_timeout)
    }

    fn open(&mut self, reason: TransitionReason, now: Instant) -> Transition {
        self.distrust_check = reason == TransitionReason::ProbeFailed && self.trial_by_health;
        let until = now + self.current_open_time;
        // The transition shows the counts that tripped it, the fleet's too.
        let t = self.go(BreakerState::Open { until }, reason, now);
        self.fleet_streak = 0;
        self.fleet_window = Counts::default();
        t
    }

    fn close(&mut self, reason: TransitionReason, now: Instant) -> Transition {
        self.counters.reset();
        self.fleet_streak = 0;
        self.fleet_window = Counts::default();
        self.distrust_check = false;
        self.trial_by_health = false;
        self.backoff = Self::backoff(&self.config);
        self.current_open_time = self.config.open_timeout;
        self.go(BreakerState::Closed, reason, now)
    }

    fn go(&mut self, to: BreakerState, reason: TransitionReason, now: Instant) -> Transition {
        if matches!(
            reason,
            TransitionReason::Fleet
                | TransitionReason::ManualOpen
                | TransitionReason::ManualClose
                | TransitionReason::ManualDisable
                | TransitionReason::ManualReset
        ) {
            // The fleet's word, or an operator's: fleet-wide again.
            self.local_trip = false;
        }
        let transition = Transition {
            from: self.state,
            to,
            reason,
            counts: self.combined(now),
            consecutive_failures: self.streak(),
            at: now,
            local: self.local_trip,
        };
        self.state = to;
        if to == BreakerState::Closed {
            self.local_trip = false;
        }
        transition
    }

    /// Operator: open and stay open until [`close`](Self::close_by_hand) or [`reset`](Self::reset).
    pub fn force_open(&mut self, now: Instant) -> Option<Transition> {
        (self.state != BreakerState::ForcedOpen)
            .then(|| self.go(BreakerState::ForcedOpen, TransitionReason::ManualOpen, now))
    }

    /// Operator: admit everything and never trip, until closed or reset.
    pub fn disable(&mut self, now: Instant) -> Option<Transition> {
        (self.state != BreakerState::Disabled)
            .then(|| self.go(BreakerState::Disabled, TransitionReason::ManualDisable, now))
    }

    /// Operator: close now (from any state), clearing the window.
    pub fn close_by_hand(&mut self, now: Instant) -> Option<Transition> {
        (self.state != BreakerState::Closed).then(|| self.close(TransitionReason::ManualClose, now))
    }

    /// Operator: back to a fresh closed breaker (window, streak and backoff cleared).
    /// Always reports a transition, even from closed, so the reset is visible.
    pub fn reset(&mut self, now: Instant) -> Transition {
        self.close(TransitionReason::ManualReset, now)
    }
}
