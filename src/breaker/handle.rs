//! The shared breaker: the state machine behind a lock, with its state
//! published on a `watch` channel and every transition on a `broadcast`.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::BreakerConfig;
use super::health::{ErasedHealthCheck, HealthCheck, HealthEffect, HealthResult, HealthStatus};
use super::machine::{
    BreakerState, CallOutcome, PermitKind, Rejected, StateMachine, Transition, TransitionReason,
};
use super::window::{Counters, Counts};
use crate::handler::BoxError;

/// The state's kind, mirrored in an atomic so the closed path reads it
/// without the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mirror {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
    ForcedOpen = 3,
    Disabled = 4,
}

impl Mirror {
    fn of(state: BreakerState) -> Self {
        match state {
            BreakerState::Closed => Self::Closed,
            BreakerState::Open { .. } => Self::Open,
            BreakerState::HalfOpen { .. } => Self::HalfOpen,
            BreakerState::ForcedOpen => Self::ForcedOpen,
            BreakerState::Disabled => Self::Disabled,
        }
    }

    fn load(cell: &AtomicU8) -> Self {
        match cell.load(Ordering::Acquire) {
            0 => Self::Closed,
            1 => Self::Open,
            2 => Self::HalfOpen,
            3 => Self::ForcedOpen,
            _ => Self::Disabled,
        }
    }

    /// Closed or disabled: every call is admitted.
    fn admits_all(self) -> bool {
        matches!(self, Self::Closed | Self::Disabled)
    }
}

/// Calls a breaker recorded since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallCounts {
    /// Successful calls.
    pub successes: u64,
    /// Failed calls (timeouts included).
    pub failures: u64,
    /// Slow calls.
    pub slow: u64,
    /// Calls refused while open or with every probe taken.
    pub rejected: u64,
}

/// A circuit breaker guarding one named dependency. Cheap to clone; every
/// consumer that names the same breaker shares one.
#[derive(Debug, Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    config: BreakerConfig,
    machine: Mutex<Guarded>,
    state_tx: watch::Sender<BreakerState>,
    transitions_tx: broadcast::Sender<Transition>,
    /// Bumped when a half-open probe slot is given back without an outcome.
    released_tx: watch::Sender<u64>,
    /// True while another worker of the fleet holds the probe lease.
    fleet_gate_tx: watch::Sender<bool>,
    /// This worker's failures in a row, for the fleet: changed on every
    /// failure, and when a success ends a streak.
    streak_tx: watch::Sender<u32>,
    /// The state's kind, mirrored for lock-free reads on the message path.
    kind: AtomicU8,
    /// The machine's window and streak, shared for lock-free successes.
    counters: Arc<Counters>,
    successes: AtomicU64,
    failures: AtomicU64,
    slow_calls: AtomicU64,
    rejected: AtomicU64,
    /// Failures that were timeouts (counted in `failures` too).
    timeouts: AtomicU64,
    verdict_waiters: AtomicUsize,
    success_notify: Notify,
}

#[derive(Debug)]
struct Guarded {
    machine: StateMachine,
    since: Instant,
    last: Option<Transition>,
    health: HealthStatus,
}

/// A point-in-time view of a breaker, for logs, status pages and tests.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The breaker's name.
    pub name: String,
    /// Its state.
    pub state: BreakerState,
    /// When it entered that state.
    pub since: Instant,
    /// The last transition, if any.
    pub last_transition: Option<Transition>,
    /// Calls, failures and slow calls in the window now.
    pub counts: Counts,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// How long the current (or next) open period lasts.
    pub open_time: Duration,
    /// The health checks so far, for a breaker that has one (which then
    /// leaves the open state only when a check passes).
    pub health: Option<HealthStatus>,
}

/// What a failed call's neighbours say about the dependency; see
/// [`Breaker::health_verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthVerdict {
    /// Another call succeeded after this one started: the dependency works.
    Healthy,
    /// The breaker is open or probing: the dependency is failing.
    Outage,
    /// Nothing happened within the wait that tells either way.
    Unknown,
}

impl Breaker {
    /// A closed breaker named `name`.
    #[must_use]
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        let now = Instant::now();
        let machine = StateMachine::new(config.clone(), now);
        let counters = machine.counters().clone();
        let (state_tx, _) = watch::channel(BreakerState::Closed);
        let (transitions_tx, _) = broadcast::channel(256);
        let (released_tx, _) = watch::channel(0);
        let (fleet_gate_tx, _) = watch::channel(false);
        let (streak_tx, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                machine: Mutex::new(Guarded {
                    machine,
                    since: now,
                    last: None,
                    health: HealthStatus::default(),
                }),
                kind: AtomicU8::new(Mirror::Closed as u8),
                counters,
                config,
                state_tx,
                transitions_tx,
                released_tx,
                fleet_gate_tx,
                streak_tx,
                successes: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                slow_calls: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                verdict_waiters: AtomicUsize::new(0),
                success_notify: Notify::new(),
            }),
        }
    }

    /// The breaker's name, as in `[breakers.NAME]`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its settings.
    #[must_use]
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> BreakerState {
        *self.inner.state_tx.borrow()
    }

    /// A receiver that sees every new state (intermediate states may be
    /// skipped if they change faster than the receiver looks).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.inner.state_tx.subscribe()
    }

    /// Changes whenever a half-open probe slot is given back without telling
    /// anything (the probe's message was bad, or its permit was dropped): a
    /// consumer that stopped after taking its probes may take another.
    #[must_use]
    pub(crate) fn probe_releases(&self) -> watch::Receiver<u64> {
        self.inner.released_tx.subscribe()
    }

    /// A receiver of every transition, for logs and metrics.
    #[must_use]
    pub fn transitions(&self) -> broadcast::Receiver<Transition> {
        self.inner.transitions_tx.subscribe()
    }

    /// Successful calls recorded since the breaker was made.
    #[must_use]
    pub fn successes(&self) -> u64 {
        self.inner.successes.load(Ordering::SeqCst)
    }

    /// Calls recorded since the breaker was made.
    #[must_use]
    pub fn call_counts(&self) -> CallCounts {
        CallCounts {
            successes: self.inner.successes.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
            slow: self.inner.slow_calls.load(Ordering::Relaxed),
            rejected: self.inner.rejected.load(Ordering::Relaxed),
        }
    }

    /// Notes that a failure recorded on this breaker was a timeout (for
    /// metrics, which count a timeout once, as a timeout).
    pub(crate) fn note_timeout(&self) {
        self.inner.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Failures that were timeouts, as noted with `note_timeout`.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // read by the metrics
    pub(crate) fn timeouts(&self) -> u64 {
        self.inner.timeouts.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Guarded> {
        // The machine has no invariants a panic half-way could break that
        // matter more than keeping the worker alive.
        self.inner
            .machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, guard: &mut Guarded, transition: Option<Transition>) {
        if let Some(t) = transition {
            // A trip of this worker's alone lifts the fleet's gate, its
            // close restores it.
            let gated = guard.machine.fleet_gated();
            self.inner.fleet_gate_tx.send_if_modified(|g| {
                let changed = *g != gated;
                *g = gated;
                changed
            });
            self.inner
                .kind
                .store(Mirror::of(t.to) as u8, Ordering::Release);
            guard.since = t.at;
            guard.last = Some(t);
            self.inner.state_tx.send_replace(t.to);
            // No receivers is fine: nobody is watching transitions.
            let _ = self.inner.transitions_tx.send(t);
        }
    }

    /// Asks to make a call now.
    ///
    /// # Errors
    ///
    /// [`Rejected`] when the breaker is open, or half-open with every probe taken.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        self.try_acquire_at(Instant::now())
    }

    /// [`try_acquire`](Self::try_acquire) with the time given by the caller
    /// (who may read the clock once for a batch of calls).
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](Self::try_acquire).
    pub fn try_acquire_at(&self, now: Instant) -> Result<Permit, Rejected> {
        let successes = self.inner.successes.load(Ordering::Acquire);
        if Mirror::load(&self.inner.kind).admits_all() {
            // Closed (or disabled): every call is admitted, no lock needed.
            return Ok(Permit {
                breaker: Some(self.clone()),
                kind: PermitKind::Normal,
                started: now,
                successes_at_start: successes,
            });
        }
        let mut guard = self.lock();
        let (result, transition) = guard.machine.try_acquire(now);
        self.publish(&mut guard, transition);
        drop(guard);
        if result.is_err() {
            self.inner.rejected.fetch_add(1, Ordering::Relaxed);
        }
        result.map(|kind| Permit {
            breaker: Some(self.clone()),
            kind,
            started: now,
            successes_at_start: successes,
        })
    }

    /// True while the breaker admits every call (closed or disabled), read
    /// without a lock.
    #[must_use]
    pub fn admits_all_now(&self) -> bool {
        Mirror::load(&self.inner.kind).admits_all()
    }

    fn record(
        &self,
        kind: PermitKind,
        outcome: CallOutcome,
        elapsed: Duration,
        now: Instant,
    ) -> BreakerState {
        let config = &self.inner.config;
        if kind == PermitKind::Normal {
            let state = Mirror::load(&self.inner.kind);
            let fast_success = outcome == CallOutcome::Success
                && elapsed <= config.call_timeout
                && elapsed <= config.slow_call_duration;
            if outcome == CallOutcome::Ignored {
                // Says nothing, changes nothing for a normal call.
                return self.state();
            }
            if fast_success && state.admits_all() {
                // The message path's common case: a success can't trip the
                // breaker, so it only needs the atomic counters.
                self.inner.successes.fetch_add(1, Ordering::SeqCst);
                if state == Mirror::Closed {
                    self.inner.counters.window.record(now, false, false);
                    let streak = self.inner.counters.consecutive();
                    self.inner.counters.streak(false, elapsed, now);
                    if streak != 0 && self.inner.counters.consecutive() == 0 {
                        // A success ended a streak: the fleet hears of it.
                        self.inner.streak_tx.send_replace(0);
                    }
                }
                if self.inner.verdict_waiters.load(Ordering::SeqCst) > 0 {
                    self.inner.success_notify.notify_waiters();
                }
                return if state == Mirror::Closed {
                    BreakerState::Closed
                } else {
                    BreakerState::Disabled
                };
            }
        }
        match outcome {
            CallOutcome::Success => {
                self.inner.successes.fetch_add(1, Ordering::SeqCst);
            }
            CallOutcome::Failure => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
            }
            CallOutcome::Ignored => {}
        }
        if outcome != CallOutcome::Ignored && elapsed > self.inner.config.slow_call_duration {
            self.inner.slow_calls.fetch_add(1, Ordering::Relaxed);
        }
        let mut guard = self.lock();
        let transition = guard.machine.record(kind, outcome, elapsed, now);
        self.publish(&mut guard, transition);
        let state = guard.machine.state();
        drop(guard);
        let streak = self.inner.counters.consecutive();
        self.inner.streak_tx.send_if_modified(|s| {
            let changed = *s != streak;
            *s = streak;
            changed
        });
        if let (PermitKind::Probe { trial }, CallOutcome::Ignored) = (kind, outcome)
            && state == (BreakerState::HalfOpen { trial })
        {
            self.inner.released_tx.send_modify(|n| *n += 1);
        }
        if outcome == CallOutcome::Success && self.inner.verdict_waiters.load(Ordering::SeqCst) > 0
        {
            self.inner.success_notify.notify_waiters();
        }
        state
    }

    /// Applies the open timer now: Open becomes HalfOpen when its time is up.
    /// (`run_timer` does this on time; a caller driving time itself may too.)
    pub fn check_open_timer(&self) {
        let now = Instant::now();
        let mut guard = self.lock();
        let transition = guard.machine.check_open_timer(now);
        self.publish(&mut guard, transition);
    }

    /// Drives the open timer until `shutdown`: sleeps until an open period
    /// ends and moves the breaker to half-open. One such task runs per breaker.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it holds no permit and no lock across an await.
    pub async fn run_timer(self, shutdown: CancellationToken) {
        let mut rx = self.subscribe();
        let mut gate = self.inner.fleet_gate_tx.subscribe();
        loop {
            let state = *rx.borrow_and_update();
            let gated = *gate.borrow_and_update();
            match state {
                // With a health check, only a passing check ends the open
                // state; in a fleet, only the lease holder's timer does.
                BreakerState::Open { until }
                    if self.inner.config.health_check.is_none() && !gated =>
                {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep_until(until) => self.check_open_timer(),
                        changed = rx.changed() => if changed.is_err() { return },
                        changed = gate.changed() => if changed.is_err() { return },
                    }
                }
                _ => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        changed = rx.changed() => if changed.is_err() { return },
                        changed = gate.changed() => if changed.is_err() { return },
                    }
                }
            }
        }
    }

    /// True while another worker of the fleet holds this breaker's probe
    /// lease: the open state ends only by the fleet's word.
    #[must_use]
    pub fn fleet_gated(&self) -> bool {
        *self.inner.fleet_gate_tx.borrow()
    }

    /// Sets whether another worker of the fleet holds the probe lease (the
    /// fleet sets it; off when the worker is on its own). Lifting it lets a
    /// due open timer start a trial at once.
    pub(crate) fn set_fleet_gated(&self, gated: bool) {
        let now = Instant::now();
        let mut guard = self.lock();
        let transition = guard.machine.set_fleet_gated(gated, now);
        self.publish(&mut guard, transition);
        let gated = guard.machine.fleet_gated();
        drop(guard);
        self.inner.fleet_gate_tx.send_if_modified(|g| {
            let changed = *g != gated;
            *g = gated;
            changed
        });
    }

    /// This worker's failures in a row as they change (for the fleet).
    pub(crate) fn streaks(&self) -> watch::Receiver<u32> {
        self.inner.streak_tx.subscribe()
    }

    /// Sets the other workers' failures in a row (the fleet sets it); see
    /// [`StateMachine::set_fleet_streak`]. Returns the trip, if it tripped.
    pub(crate) fn set_fleet_streak(&self, failures: u32) -> Option<Transition> {
        self.changed(|m, now| m.set_fleet_streak(failures, now))
    }

    /// Sets the other workers' windows (the fleet sets it); see
    /// [`StateMachine::set_fleet_window`]. Returns the trip, if it tripped.
    pub(crate) fn set_fleet_window(&self, window: Counts) -> Option<Transition> {
        self.changed(|m, now| m.set_fleet_window(window, now))
    }

    /// This worker's own failures in a row now (without the fleet's), read
    /// without the lock: 0 again once the breaker changed state.
    pub(crate) fn own_streak(&self) -> u32 {
        self.inner.counters.consecutive()
    }

    /// This worker's own window now (without the fleet's), read without the
    /// lock.
    pub(crate) fn own_window(&self) -> Counts {
        self.inner.counters.window.counts(Instant::now())
    }

    fn changed(
        &self,
        f: impl FnOnce(&mut StateMachine, Instant) -> Option<Transition>,
    ) -> Option<Transition> {
        let now = Instant::now();
        let mut guard = self.lock();
        let transition = f(&mut guard.machine, now);
        self.publish(&mut guard, transition);
        transition
    }

    /// Takes over a state another worker of the fleet announced; returns
    /// the state now.
    pub(crate) fn adopt(&self, remote: super::FleetState) -> BreakerState {
        self.manual(|m, now| m.adopt(remote, now))
    }

    fn manual(
        &self,
        f: impl FnOnce(&mut StateMachine, Instant) -> Option<Transition>,
    ) -> BreakerState {
        let now = Instant::now();
        let mut guard = self.lock();
        let transition = f(&mut guard.machine, now);
        self.publish(&mut guard, transition);
        guard.machine.state()
    }

    /// Operator: open and stay open until [`close`](Self::close) or [`reset`](Self::reset).
    pub fn force_open(&self) -> BreakerState {
        self.manual(StateMachine::force_open)
    }

    /// Operator: admit every call and never trip.
    pub fn disable(&self) -> BreakerState {
        self.manual(StateMachine::disable)
    }

    /// Operator: close now.
    pub fn close(&self) -> BreakerState {
        self.manual(StateMachine::close_by_hand)
    }

    /// Operator: a fresh closed breaker (window, streak and backoff cleared).
    pub fn reset(&self) -> BreakerState {
        self.manual(|m, now| Some(m.reset(now)))
    }

    /// A view of the breaker now.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let guard = self.lock();
        Snapshot {
            name: self.inner.name.clone(),
            state: guard.machine.state(),
            since: guard.since,
            last_transition: guard.last,
            counts: guard.machine.counts(now),
            consecutive_failures: guard.machine.consecutive_failures(),
            open_time: guard.machine.current_open_time(),
            health: guard.machine.health_gated().then(|| guard.health.clone()),
        }
    }

    /// Records a health check's result (`Err` with why it failed) and
    /// applies it: see [`StateMachine::health_result`].
    pub fn record_health(&self, result: Result<(), BoxError>, took: Duration) -> HealthEffect {
        let state = self.lock().machine.state();
        let result = result.map_err(|e| crate::text::error_chain(e.as_ref()));
        self.record_health_for(state, result, took)
    }

    /// [`record_health`](Self::record_health) for a check run while the
    /// breaker was in `state`: a breaker that has left that state since
    /// (closed by hand, opened anew) only counts it.
    fn record_health_for(
        &self,
        state: BreakerState,
        result: Result<(), String>,
        took: Duration,
    ) -> HealthEffect {
        let now = Instant::now();
        let mut guard = self.lock();
        let (effect, transition) = if guard.machine.state() == state {
            guard.machine.health_result(result.is_ok(), now)
        } else {
            (HealthEffect::NotOpen, None)
        };
        guard.health.note(HealthResult {
            at: now,
            took,
            error: result.err(),
        });
        self.publish(&mut guard, transition);
        effect
    }

    /// Runs `check` every `health_check.interval` while the breaker is open,
    /// until `shutdown`, and records each result. The worker runs this for
    /// every breaker with a health check; a breaker with
    /// `health_check` in its config leaves the open state only through it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a check cut short records nothing.
    pub async fn run_health_check(self, check: impl HealthCheck, shutdown: CancellationToken) {
        self.run_erased_health_check(super::health::erase(check), shutdown)
            .await;
    }

    pub(crate) async fn run_erased_health_check(
        self,
        check: Arc<dyn ErasedHealthCheck>,
        shutdown: CancellationToken,
    ) {
        let Some(config) = self.inner.config.health_check.clone() else {
            return;
        };
        let target = config.target();
        let mut rx = self.subscribe();
        let mut gate = self.inner.fleet_gate_tx.subscribe();
        loop {
            // Idle until the breaker opens: no load on a healthy dependency.
            while !matches!(*rx.borrow_and_update(), BreakerState::Open { .. }) {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
            let mut period = PeriodLog::default();
            // Validation asks for at least 100ms; a breaker built by hand
            // gets the same floor, so a failing check cannot spin.
            let interval = config
                .interval
                .max(super::health::MIN_HEALTH_CHECK_INTERVAL);
            let mut next = Instant::now() + interval;
            loop {
                let opened = *rx.borrow_and_update();
                if !matches!(opened, BreakerState::Open { .. }) {
                    break;
                }
                if *gate.borrow_and_update() {
                    // Another worker of the fleet holds the probe lease and
                    // runs the check; this one checks at once if it gets it.
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        changed = rx.changed() => if changed.is_err() { return },
                        changed = gate.changed() => if changed.is_err() { return },
                    }
                    next = Instant::now();
                    continue;
                }
                tokio::select! {
                    // A state change wins over a due check: no check runs
                    // after the breaker was closed, forced or disabled.
                    biased;
                    () = shutdown.cancelled() => return,
                    changed = rx.changed() => {
                        if changed.is_err() { return }
                        continue;
                    }
                    () = tokio::time::sleep_until(next) => {}
                }
                let started = Instant::now();
                let call = std::panic::AssertUnwindSafe(check.check()).catch_unwind();
                let result = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = tokio::time::timeout(config.timeout, call) => r,
                };
                let result = match result {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(e))) => Err(super::health::error_text(&*e)),
                    Ok(Err(panic)) => Err(format!(
                        "the health check panicked: {}",
                        crate::text::printable(&crate::text::truncate(
                            &crate::text::panic_message(&*panic),
                            300
                        ))
                    )),
                    Err(_) => Err(format!(
                        "no answer within health_check.timeout ({})",
                        humantime::format_duration(config.timeout)
                    )),
                };
                let took = started.elapsed();
                let error = result.as_ref().err().cloned();
                // Applied only to the open period it was run for.
                let effect = self.record_health_for(opened, result, took);
                period.log(self.name(), &target, effect, error.as_deref());
                next = started + interval;
            }
        }
    }

    /// After a call failed, waits (at most `wait`) for evidence of whether the
    /// dependency is otherwise healthy: a success recorded after the call
    /// started (`successes_at_start`, from [`Permit::successes_at_start`]), or
    /// the breaker leaving the closed state.
    ///
    /// The first failure of an outage looks exactly like a bad message; only
    /// what happens next tells them apart. This is what keeps an outage from
    /// exhausting a message's last retry.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn health_verdict(&self, successes_at_start: u64, wait: Duration) -> HealthVerdict {
        struct Waiter<'a>(&'a AtomicUsize);
        impl Drop for Waiter<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.inner.verdict_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiter = Waiter(&self.inner.verdict_waiters);
        let deadline = Instant::now() + wait;
        let mut state_rx = self.subscribe();
        loop {
            let notified = self.inner.success_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.successes() > successes_at_start {
                return HealthVerdict::Healthy;
            }
            if !state_rx.borrow_and_update().admits_all() {
                return HealthVerdict::Outage;
            }
            tokio::select! {
                () = &mut notified => {}
                changed = state_rx.changed() => if changed.is_err() { return HealthVerdict::Unknown },
                () = tokio::time::sleep_until(deadline) => return HealthVerdict::Unknown,
            }
        }
    }
}

/// What has been logged of one open period's health checks, so a check
/// that keeps failing logs once, not every interval.
#[derive(Debug, Default)]
struct PeriodLog {
    failures: u32,
    last_failed: bool,
    told_waiting: bool,
}

impl PeriodLog {
    fn log(&mut self, breaker: &str, target: &str, effect: HealthEffect, error: Option<&str>) {
        match (effect, error) {
            (HealthEffect::StaysOpen, Some(error)) => {
                self.failures += 1;
                if !self.last_failed {
                    tracing::warn!(
                        breaker,
                        check = target,
                        error,
                        "health check failed: the breaker stays open and takes no message until a check passes"
                    );
                } else {
                    tracing::debug!(
                        breaker,
                        check = target,
                        error,
                        failures = self.failures,
                        "health check failed again"
                    );
                }
                self.last_failed = true;
            }
            (HealthEffect::HalfOpen, _) => {
                tracing::info!(
                    breaker,
                    check = target,
                    failed_checks = self.failures,
                    "health check passed: the breaker goes half-open now"
                );
                self.last_failed = false;
            }
            (HealthEffect::WaitsForOpenTime, _) => {
                if !self.told_waiting {
                    tracing::info!(
                        breaker,
                        check = target,
                        "health check passed, but the last trial after a passing check failed: the next trial waits for the open time"
                    );
                    self.told_waiting = true;
                }
                self.last_failed = false;
            }
            _ => {}
        }
    }
}

/// Permission to make one call. Record how it ended with [`record`](Self::record);
/// a permit dropped without a record frees its slot and counts as nothing.
#[derive(Debug)]
pub struct Permit {
    breaker: Option<Breaker>,
    kind: PermitKind,
    started: Instant,
    successes_at_start: u64,
}

impl Permit {
    /// Whether this is a normal call or a half-open probe.
    #[must_use]
    pub fn kind(&self) -> PermitKind {
        self.kind
    }

    /// True for a half-open probe.
    #[must_use]
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, PermitKind::Probe { .. })
    }

    /// When the permit was granted (the call's start).
    #[must_use]
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The breaker's success count when the call started; see [`Breaker::health_verdict`].
    #[must_use]
    pub fn successes_at_start(&self) -> u64 {
        self.successes_at_start
    }

    /// Records how the call went and returns the breaker's state right
    /// after: `permit.record(CallOutcome::Success)`, or with the caller's
    /// own timing, `permit.record(CallOutcome::Failure.took(elapsed).ended(now))`.
    pub fn record(mut self, call: impl Into<CallRecord>) -> BreakerState {
        let call = call.into();
        let now = call.ended.unwrap_or_else(Instant::now);
        let elapsed = call
            .elapsed
            .unwrap_or_else(|| now.saturating_duration_since(self.started));
        match self.breaker.take() {
            Some(breaker) => breaker.record(self.kind, call.outcome, elapsed, now),
            None => BreakerState::Closed,
        }
    }
}

/// How a call went, for [`Permit::record`]: its outcome, and optionally how
/// long it took (default: since the permit was granted) and when it ended
/// (default: now, read once; pass a time the caller read anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallRecord {
    /// The outcome.
    pub outcome: CallOutcome,
    /// How long the call took, when the caller measured it.
    pub elapsed: Option<Duration>,
    /// When it ended, when the caller read the clock already.
    pub ended: Option<Instant>,
}

impl From<CallOutcome> for CallRecord {
    fn from(outcome: CallOutcome) -> Self {
        Self {
            outcome,
            elapsed: None,
            ended: None,
        }
    }
}

impl CallRecord {
    /// The call took `elapsed` (measured by the caller, without the time the
    /// permit waited to run).
    #[must_use]
    pub fn took(mut self, elapsed: Duration) -> Self {
        self.elapsed = Some(elapsed);
        self
    }

    /// The call ended at `at`.
    #[must_use]
    pub fn ended(mut self, at: Instant) -> Self {
        self.ended = Some(at);
        self
    }
}

impl CallOutcome {
    /// This outcome, for a call that took `elapsed`.
    #[must_use]
    pub fn took(self, elapsed: Duration) -> CallRecord {
        CallRecord::from(self).took(elapsed)
    }

    /// This outcome, for a call that ended at `at`.
    #[must_use]
    pub fn ended(self, at: Instant) -> CallRecord {
        CallRecord::from(self).ended(at)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker.take() {
            let now = Instant::now();
            breaker.record(
                self.kind,
                CallOutcome::Ignored,
                now.saturating_duration_since(self.started),
                now,
            );
        }
    }
}

/// The manual operations an operator can apply to a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManualAction {
    /// Force open.
    Open,
    /// Close.
    Close,
    /// Disable.
    Disable,
    /// Reset.
    Reset,
}

impl Breaker {
    /// Applies a manual action; returns the new state.
    pub fn apply(&self, action: ManualAction) -> BreakerState {
        match action {
            ManualAction::Open => self.force_open(),
            ManualAction::Close => self.close(),
            ManualAction::Disable => self.disable(),
            ManualAction::Reset => self.reset(),
        }
    }
}

impl TransitionReason {
    /// True for reasons that open the breaker.
    #[must_use]
    pub fn opens(&self) -> bool {
        matches!(
            self,
            TransitionReason::FailureRate
                | TransitionReason::SlowCallRate
                | TransitionReason::ConsecutiveFailures
                | TransitionReason::ProbeFailed
                | TransitionReason::ManualOpen
        )
    }
}
