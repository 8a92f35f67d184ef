//! Breaker tests. Time is tokio's paused clock or handed in explicitly, so
//! they are instant and deterministic.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn config() -> BreakerConfig {
    BreakerConfig {
        failure_rate: 0.5,
        minimum_calls: 10,
        window: Duration::from_secs(10),
        window_buckets: 10,
        slow_call_duration: Duration::from_secs(2),
        slow_call_rate: 1.0,
        call_timeout: Duration::from_secs(3),
        open_timeout: Duration::from_secs(1),
        max_open_timeout: Duration::from_secs(5),
        half_open_probes: 1,
        consecutive_failures: None,
        health_check: None,
    }
}

const FAST: Duration = Duration::from_millis(10);

/// Acquires and records one call on the machine at `now`.
fn call(m: &mut StateMachine, now: Instant, outcome: CallOutcome) -> Option<Transition> {
    let (kind, t) = m.try_acquire(now);
    assert!(t.is_none(), "unexpected transition on acquire: {t:?}");
    let kind = kind.expect("call should be admitted");
    m.record(kind, outcome, FAST, now)
}

fn trip(m: &mut StateMachine, now: Instant) -> Transition {
    for _ in 0..m.config().minimum_calls {
        if let Some(t) = call(m, now, CallOutcome::Failure) {
            return t;
        }
    }
    panic!("breaker did not trip after minimum_calls failures");
}

#[test]
fn does_not_trip_before_minimum_calls_then_trips_at_threshold() {
    let now = Instant::now();
    let mut m = StateMachine::new(config(), now);
    for i in 1..10 {
        assert_eq!(
            call(&mut m, now, CallOutcome::Failure),
            None,
            "tripped after {i} calls"
        );
    }
    assert_eq!(m.state(), BreakerState::Closed);
    let t = call(&mut m, now, CallOutcome::Failure).expect("10th failure should trip");
    assert_eq!(t.reason, TransitionReason::FailureRate);
    assert_eq!(t.counts.calls, 10);
    assert_eq!(t.counts.failures, 10);
    assert_eq!(
        t.to,
        BreakerState::Open {
            until: now + Duration::from_secs(1)
        }
    );
}

#[test]
fn trips_at_exactly_the_failure_rate_not_below() {
    let now = Instant::now();
    // 6 successes, 4 failures: 40% < 50%.
    let mut m = StateMachine::new(config(), now);
    for _ in 0..6 {
        call(&mut m, now, CallOutcome::Success);
    }
    for _ in 0..4 {
        assert_eq!(call(&mut m, now, CallOutcome::Failure), None);
    }
    assert_eq!(
        m.state(),
        BreakerState::Closed,
        "40% must not trip a 50% breaker"
    );
    // One more failure: 5 of 11 = 45%, still closed; then 6 of 12 = 50% trips.
    assert_eq!(call(&mut m, now, CallOutcome::Failure), None);
    let t = call(&mut m, now, CallOutcome::Failure).expect("50% should trip");
    assert_eq!((t.counts.calls, t.counts.failures), (12, 6));
}

#[test]
fn failures_roll_out_of_the_window() {
    let start = Instant::now();
    let mut m = StateMachine::new(config(), start);
    for _ in 0..9 {
        call(&mut m, start, CallOutcome::Failure);
    }
    // 10.5s later the first nine have left the 10s window.
    let later = start + Duration::from_millis(10_500);
    assert_eq!(call(&mut m, later, CallOutcome::Failure), None);
    let counts = m.counts(later);
    assert_eq!(
        counts.calls, 1,
        "old calls should have rolled out: {counts:?}"
    );
    assert_eq!(m.state(), BreakerState::Closed);
    // Half-way through the window, the old ones still count.
    let mut m = StateMachine::new(config(), start);
    for _ in 0..9 {
        call(&mut m, start, CallOutcome::Failure);
    }
    let mid = start + Duration::from_secs(5);
    assert!(
        call(&mut m, mid, CallOutcome::Failure).is_some(),
        "9 + 1 within the window trips"
    );
}

#[test]
fn slow_calls_trip_when_enabled_and_never_at_rate_one() {
    let now = Instant::now();
    let slow = Duration::from_millis(2_500);
    let mut m = StateMachine::new(
        BreakerConfig {
            slow_call_rate: 0.8,
            ..config()
        },
        now,
    );
    let mut tripped = None;
    for i in 0..10 {
        let (kind, _) = m.try_acquire(now);
        tripped = m.record(kind.unwrap(), CallOutcome::Success, slow, now);
        if i < 9 {
            assert_eq!(tripped, None, "tripped before minimum calls at {i}");
        }
    }
    let t = tripped.expect("10 slow calls at 80% should trip");
    assert_eq!(t.reason, TransitionReason::SlowCallRate);
    assert_eq!(t.counts.slow, 10);

    let mut m = StateMachine::new(config(), now);
    for _ in 0..50 {
        let (kind, _) = m.try_acquire(now);
        assert_eq!(
            m.record(kind.unwrap(), CallOutcome::Success, slow, now),
            None
        );
    }
    assert_eq!(
        m.state(),
        BreakerState::Closed,
        "slow_call_rate = 1.0 must never trip"
    );
}

#[test]
fn a_success_slower_than_call_timeout_is_a_failure() {
    let now = Instant::now();
    let mut m = StateMachine::new(config(), now);
    for _ in 0..9 {
        let (kind, _) = m.try_acquire(now);
        m.record(
            kind.unwrap(),
            CallOutcome::Success,
            Duration::from_secs(4),
            now,
        );
    }
    assert_eq!(
        m.counts(now).failures,
        9,
        "calls over call_timeout (3s) count as failures"
    );
    let (kind, _) = m.try_acquire(now);
    let t = m.record(
        kind.unwrap(),
        CallOutcome::Success,
        Duration::from_secs(4),
        now,
    );
    assert_eq!(t.map(|t| t.reason), Some(TransitionReason::FailureRate));
}

#[test]
fn consecutive_failures_trip_however_many_successes_the_window_holds() {
    let now = Instant::now();
    let mut m = StateMachine::new(
        BreakerConfig {
            consecutive_failures: Some(20),
            ..config()
        },
        now,
    );
    for _ in 0..1_000 {
        call(&mut m, now, CallOutcome::Success);
    }
    for i in 1..20 {
        assert_eq!(
            call(&mut m, now, CallOutcome::Failure),
            None,
            "tripped after {i}"
        );
    }
    let t = call(&mut m, now, CallOutcome::Failure).expect("20th failure in a row trips");
    assert_eq!(t.reason, TransitionReason::ConsecutiveFailures);
    assert_eq!(t.consecutive_failures, 20);
    assert!(
        t.counts.failure_rate() < 0.05,
        "rate alone would not trip: {:?}",
        t.counts
    );
}

#[test]
fn a_success_resets_the_consecutive_run() {
    let now = Instant::now();
    let mut m = StateMachine::new(
        BreakerConfig {
            consecutive_failures: Some(3),
            minimum_calls: 1_000,
            ..config()
        },
        now,
    );
    // Sequential calls, each started after the previous one was recorded.
    let mut t = now;
    for _ in 0..10 {
        for outcome in [
            CallOutcome::Failure,
            CallOutcome::Failure,
            CallOutcome::Success,
        ] {
            t += FAST;
            call(&mut m, t, outcome);
        }
    }
    assert_eq!(m.state(), BreakerState::Closed);
}

#[test]
fn only_a_call_started_after_the_latest_failure_ends_the_streak() {
    let start = Instant::now();
    let mut m = StateMachine::new(
        BreakerConfig {
            consecutive_failures: Some(3),
            minimum_calls: 1_000,
            ..config()
        },
        start,
    );
    let t0 = start + Duration::from_secs(1);
    // A call starts at t0 and is still in flight when failures are recorded.
    let (in_flight, _) = m.try_acquire(t0);
    let t1 = t0 + Duration::from_millis(100);
    call(&mut m, t1, CallOutcome::Failure);
    call(&mut m, t1, CallOutcome::Failure);
    // It succeeds after them, but it started before we knew: old news.
    let t2 = t1 + Duration::from_millis(50);
    m.record(in_flight.unwrap(), CallOutcome::Success, t2 - t0, t2);
    assert_eq!(
        m.consecutive_failures(),
        2,
        "an in-flight success must not reset the streak"
    );
    // A call started after the last failure was recorded does end it.
    let (fresh, _) = m.try_acquire(t2);
    let t3 = t2 + Duration::from_millis(10);
    m.record(fresh.unwrap(), CallOutcome::Success, t3 - t2, t3);
    assert_eq!(
        m.consecutive_failures(),
        0,
        "a newer success ends the streak"
    );
    for _ in 0..2 {
        call(&mut m, t3, CallOutcome::Failure);
    }
    let t = call(&mut m, t3, CallOutcome::Failure).expect("third failure in a row trips");
    assert_eq!(t.reason, TransitionReason::ConsecutiveFailures);
}

#[test]
fn open_refuses_then_half_open_after_open_time() {
    let now = Instant::now();
    let mut m = StateMachine::new(config(), now);
    trip(&mut m, now);
    let (r, t) = m.try_acquire(now + Duration::from_millis(999));
    assert_eq!(r, Err(Rejected::Open));
    assert_eq!(t, None);
    let (r, t) = m.try_acquire(now + Duration::from_secs(1));
    assert_eq!(r, Ok(PermitKind::Probe { trial: 1 }));
    assert_eq!(t.map(|t| t.reason), Some(TransitionReason::OpenTimeElapsed));
}

#[test]
fn half_open_admits_exactly_the_probes_and_closes_only_when_all_succeed() {
    let now = Instant::now();
    let mut m = StateMachine::new(
        BreakerConfig {
            half_open_probes: 3,
            ..config()
        },
        now,
    );
    trip(&mut m, now);
    let t1 = now + Duration::from_secs(1);
    m.check_open_timer(t1);
    let permits: Vec<_> = (0..5).map(|_| m.try_acquire(t1).0).collect();
    let admitted = permits.iter().filter(|p| p.is_ok()).count();
    assert_eq!(
        admitted, 3,
        "half-open must admit exactly 3 probes: {permits:?}"
    );
    assert_eq!(permits[3], Err(Rejected::ProbesTaken));
    let kind = permits[0].unwrap();
    assert_eq!(m.record(kind, CallOutcome::Success, FAST, t1), None);
    assert_eq!(m.record(kind, CallOutcome::Success, FAST, t1), None);
    assert!(
        matches!(m.state(), BreakerState::HalfOpen { .. }),
        "2 of 3 is not enough"
    );
    let t = m
        .record(kind, CallOutcome::Success, FAST, t1)
        .expect("3 of 3 closes");
    assert_eq!(t.reason, TransitionReason::ProbesSucceeded);
    assert_eq!(m.state(), BreakerState::Closed);
    assert_eq!(m.counts(t1).calls, 0, "closing clears the window");
}

#[test]
fn one_failed_probe_reopens_even_after_other_successes() {
    let now = Instant::now();
    let mut m = StateMachine::new(
        BreakerConfig {
            half_open_probes: 3,
            ..config()
        },
        now,
    );
    trip(&mut m, now);
    let t1 = now + Duration::from_secs(1);
    let (kind, _) = m.try_acquire(t1);
    let kind = kind.unwrap();
    m.record(kind, CallOutcome::Success, FAST, t1);
    m.record(kind, CallOutcome::Success, FAST, t1);
    let t = m
        .record(kind, CallOutcome::Failure, FAST, t1)
        .expect("failure reopens");
    assert_eq!(t.reason, TransitionReason::ProbeFailed);
    assert!(matches!(t.to, BreakerState::Open { .. }));
}

#[test]
fn ignored_probe_frees_its_slot() {
    let now = Instant::now();
    let mut m = StateMachine::new(config(), now);
    trip(&mut m, now);
    let t1 = now + Duration::from_secs(1);
    let (first, _) = m.try_acquire(t1);
    assert_eq!(m.try_acquire(t1).0, Err(Rejected::ProbesTaken));
    m.record(first.unwrap(), CallOutcome::Ignored, FAST, t1);
    assert!(
        m.try_acquire(t1).0.is_ok(),
        "the ignored probe's slot is free again"
    );
}

#[test]
fn stale_probe_of_an_earlier_trial_is_ignored() {
    let now = Instant::now();
    let mut m = StateMachine::new(
        BreakerConfig {
            half_open_probes: 2,
            ..config()
        },
        now,
    );
    trip(&mut m, now);
    let t1 = now + Duration::from_secs(1);
    let (a, _) = m.try_acquire(t1);
    let (b, _) = m.try_acquire(t1);
    m.record(a.unwrap(), CallOutcome::Failure, FAST, t1);
    // Trial 1 failed; its other probe finishing late must not close trial 2.
    let later = t1 + Duration::from_secs(10);
    m.check_open_timer(later);
    assert_eq!(m.state(), BreakerState::HalfOpen { trial: 2 });
    assert_eq!(
        m.record(b.unwrap(), CallOutcome::Success, FAST, later),
        None
    );
    assert_eq!(m.state(), BreakerState::HalfOpen { trial: 2 });
}

fn open_time(t: &Transition) -> Duration {
    match t.to {
        BreakerState::Open { until } => until - t.at,
        other => panic!("expected open, got {other:?}"),
    }
}

#[test]
fn each_failed_trial_opens_longer_up_to_the_cap_and_closing_resets_it() {
    let mut now = Instant::now();
    let mut m = StateMachine::new(config(), now);
    let first = trip(&mut m, now);
    assert_eq!(
        open_time(&first),
        Duration::from_secs(1),
        "first open time is open_timeout"
    );
    let mut previous = open_time(&first);
    let mut times = vec![previous];
    for _ in 0..6 {
        now += previous;
        let (kind, _) = m.try_acquire(now);
        let t = m
            .record(kind.unwrap(), CallOutcome::Failure, FAST, now)
            .expect("failed probe reopens");
        let open = open_time(&t);
        times.push(open);
        assert!(open >= previous, "open time must not shrink: {times:?}");
        assert!(
            open <= Duration::from_secs(5),
            "open time must be capped at 5s: {times:?}"
        );
        previous = open;
    }
    assert!(
        times[1] >= Duration::from_secs(2),
        "second open time doubles: {times:?}"
    );
    assert_eq!(
        *times.last().unwrap(),
        Duration::from_secs(5),
        "reaches the cap: {times:?}"
    );
    // Probes succeed: closed, and the next trip starts over at open_timeout.
    now += previous;
    let (kind, _) = m.try_acquire(now);
    m.record(kind.unwrap(), CallOutcome::Success, FAST, now);
    assert_eq!(m.state(), BreakerState::Closed);
    let again = trip(&mut m, now);
    assert_eq!(
        open_time(&again),
        Duration::from_secs(1),
        "closing resets the backoff"
    );
}

#[test]
fn forced_open_ignores_the_timer_until_closed_by_hand() {
    let now = Instant::now();
    let mut m = StateMachine::new(config(), now);
    assert!(m.force_open(now).is_some());
    let much_later = now + Duration::from_secs(3_600);
    assert_eq!(m.check_open_timer(much_later), None);
    assert_eq!(m.try_acquire(much_later).0, Err(Rejected::Open));
    let t = m.close_by_hand(much_later).expect("close releases it");
    assert_eq!(t.reason, TransitionReason::ManualClose);
    assert_eq!(m.try_acquire(much_later).0, Ok(PermitKind::Normal));
}

#[test]
fn disabled_admits_everything_and_never_trips() {
    let now = Instant::now();
    let mut m = StateMachine::new(config(), now);
    m.disable(now);
    for _ in 0..100 {
        assert_eq!(call(&mut m, now, CallOutcome::Failure), None);
    }
    assert_eq!(m.state(), BreakerState::Disabled);
    assert_eq!(m.reset(now).to, BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn shared_breaker_timer_moves_open_to_half_open_on_time() {
    let breaker = Breaker::new("dep", config());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let timer = tokio::spawn(breaker.clone().run_timer(shutdown.clone()));
    let mut transitions = breaker.transitions();
    for _ in 0..10 {
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
    }
    let opened_at = Instant::now();
    assert!(matches!(breaker.state(), BreakerState::Open { .. }));
    let mut rx = breaker.subscribe();
    rx.wait_for(|s| matches!(s, BreakerState::HalfOpen { .. }))
        .await
        .unwrap();
    let waited = opened_at.elapsed();
    assert_eq!(
        waited,
        Duration::from_secs(1),
        "half-open after exactly open_timeout"
    );
    let opened = transitions.recv().await.unwrap();
    assert_eq!(opened.reason, TransitionReason::FailureRate);
    let half = transitions.recv().await.unwrap();
    assert_eq!(half.reason, TransitionReason::OpenTimeElapsed);
    shutdown.cancel();
    timer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn dropped_permit_counts_as_nothing() {
    let breaker = Breaker::new("dep", config());
    for _ in 0..100 {
        drop(breaker.try_acquire().unwrap());
    }
    assert_eq!(breaker.snapshot().counts.calls, 0);
}

#[test]
fn truly_concurrent_callers_get_exactly_the_probes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let probes = 3;
    let callers = 16;
    for round in 0..20 {
        let (breaker, handle) = rt.block_on(async {
            let b = Breaker::new(
                "dep",
                BreakerConfig {
                    half_open_probes: probes,
                    ..config()
                },
            );
            for _ in 0..10 {
                b.try_acquire().unwrap().record(CallOutcome::Failure);
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            b.check_open_timer();
            assert!(matches!(b.state(), BreakerState::HalfOpen { .. }));
            (b, tokio::runtime::Handle::current())
        });
        let barrier = Arc::new(Barrier::new(callers));
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let b = breaker.clone();
                let barrier = barrier.clone();
                let handle = handle.clone();
                std::thread::spawn(move || {
                    let _clock = handle.enter();
                    barrier.wait();
                    b.try_acquire()
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let admitted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            admitted, probes as usize,
            "round {round}: {callers} concurrent callers, {admitted} admitted, want {probes}"
        );
        let _enter = handle.enter();
        drop(results);
    }
}

#[tokio::test(start_paused = true)]
async fn health_verdict_tells_outage_from_bad_message() {
    let breaker = Breaker::new("dep", config());
    let wait = Duration::from_secs(10);

    // A neighbour succeeds after our call started: the dependency is healthy.
    let ours = breaker.try_acquire().unwrap();
    let at_start = ours.successes_at_start();
    ours.record(CallOutcome::Failure);
    let b = breaker.clone();
    let verdict = tokio::spawn(async move { b.health_verdict(at_start, wait).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    breaker.try_acquire().unwrap().record(CallOutcome::Success);
    assert_eq!(verdict.await.unwrap(), HealthVerdict::Healthy);

    // Everybody fails and the breaker trips: an outage.
    let ours = breaker.try_acquire().unwrap();
    let at_start = ours.successes_at_start();
    ours.record(CallOutcome::Failure);
    let b = breaker.clone();
    let verdict = tokio::spawn(async move { b.health_verdict(at_start, wait).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        if let Ok(p) = breaker.try_acquire() {
            p.record(CallOutcome::Failure);
        }
    }
    assert_eq!(verdict.await.unwrap(), HealthVerdict::Outage);

    // Nothing else happens: unknown after the wait.
    breaker.reset();
    let ours = breaker.try_acquire().unwrap();
    let at_start = ours.successes_at_start();
    ours.record(CallOutcome::Failure);
    let started = Instant::now();
    assert_eq!(
        breaker.health_verdict(at_start, wait).await,
        HealthVerdict::Unknown
    );
    assert_eq!(started.elapsed(), wait);
}

fn gated() -> BreakerConfig {
    BreakerConfig {
        health_check: Some(HealthCheckConfig::default()),
        ..config()
    }
}

/// Takes the one probe of a half-open trial and records `outcome`.
fn probe(m: &mut StateMachine, now: Instant, outcome: CallOutcome) -> Option<Transition> {
    let (kind, _) = m.try_acquire(now);
    let kind = kind.expect("a half-open breaker admits its probe");
    assert!(matches!(kind, PermitKind::Probe { .. }), "got {kind:?}");
    m.record(kind, outcome, FAST, now)
}

#[test]
fn with_a_health_check_only_a_passing_check_ends_the_open_state() {
    let start = Instant::now();
    let mut m = StateMachine::new(gated(), start);
    assert!(m.health_gated());
    trip(&mut m, start);
    // Long past the open time, with failing checks: still open, no probe.
    let late = start + Duration::from_secs(30);
    assert_eq!(m.check_open_timer(late), None);
    assert_eq!(
        m.health_result(false, late),
        (HealthEffect::StaysOpen, None)
    );
    let (admitted, t) = m.try_acquire(late);
    assert_eq!((admitted, t), (Err(Rejected::Open), None));
    // A passing check before the open time ends: half-open at once.
    let mut m = StateMachine::new(gated(), start);
    trip(&mut m, start);
    let early = start + Duration::from_millis(100);
    let (effect, t) = m.health_result(true, early);
    assert_eq!(effect, HealthEffect::HalfOpen);
    let t = t.expect("a transition to half-open");
    assert_eq!(t.reason, TransitionReason::HealthCheckPassed);
    assert_eq!(t.at, early);
    assert_eq!(m.state(), BreakerState::HalfOpen { trial: 1 });
    // Real probes decide, as without a check.
    let closed = probe(&mut m, early, CallOutcome::Success).expect("the probe closes it");
    assert_eq!(closed.to, BreakerState::Closed);
    // Checks say nothing to a closed breaker.
    assert_eq!(m.health_result(false, early), (HealthEffect::NotOpen, None));
}

#[test]
fn a_check_that_passed_before_a_failed_trial_waits_for_the_open_time_until_it_fails_once() {
    let start = Instant::now();
    let mut m = StateMachine::new(gated(), start);
    trip(&mut m, start);
    let t1 = start + Duration::from_millis(100);
    assert_eq!(m.health_result(true, t1).0, HealthEffect::HalfOpen);
    // The check said healthy, the dependency was not.
    let reopened = probe(&mut m, t1, CallOutcome::Failure).expect("the probe reopens it");
    let BreakerState::Open { until } = reopened.to else {
        panic!("expected open, got {:?}", reopened.to);
    };
    // The same lying check again: no trial before the open time ends...
    let t2 = t1 + Duration::from_millis(100);
    assert!(t2 < until);
    assert_eq!(
        m.health_result(true, t2),
        (HealthEffect::WaitsForOpenTime, None)
    );
    // ...and one at the first passing check after it.
    assert_eq!(m.health_result(true, until).0, HealthEffect::HalfOpen);
    // A check that fails once is trusted again: after the next failed
    // trial, fail, then pass -> half-open at once, before the open time.
    let reopened = probe(&mut m, until, CallOutcome::Failure).expect("reopens");
    let BreakerState::Open { until: until2 } = reopened.to else {
        panic!("expected open");
    };
    let t3 = until + Duration::from_millis(10);
    assert_eq!(m.health_result(false, t3).0, HealthEffect::StaysOpen);
    let t4 = t3 + Duration::from_millis(10);
    assert!(t4 < until2);
    assert_eq!(m.health_result(true, t4).0, HealthEffect::HalfOpen);
}

#[test]
fn without_a_health_check_checks_change_nothing_and_the_timer_decides() {
    let start = Instant::now();
    let mut m = StateMachine::new(config(), start);
    assert!(!m.health_gated());
    let opened = trip(&mut m, start);
    let BreakerState::Open { until } = opened.to else {
        panic!("expected open");
    };
    let t = m.check_open_timer(until).expect("half-open on time");
    assert_eq!(t.reason, TransitionReason::OpenTimeElapsed);
}

/// A check whose answer the test sets, counting how often it ran.
#[derive(Clone, Default)]
struct Switch {
    healthy: Arc<std::sync::atomic::AtomicBool>,
    runs: Arc<std::sync::atomic::AtomicU32>,
}

impl HealthCheck for Switch {
    async fn check(&self) -> Result<(), crate::handler::BoxError> {
        use std::sync::atomic::Ordering;
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.healthy.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("HTTP 503: still down".into())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_check_runs_only_while_open_and_opens_the_way_within_one_interval() {
    use std::sync::atomic::Ordering;
    let breaker = Breaker::new(
        "dep",
        BreakerConfig {
            open_timeout: Duration::from_secs(10),
            max_open_timeout: Duration::from_secs(10),
            ..gated()
        },
    );
    let switch = Switch::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let timer = tokio::spawn(breaker.clone().run_timer(shutdown.clone()));
    let checks = tokio::spawn(
        breaker
            .clone()
            .run_health_check(switch.clone(), shutdown.clone()),
    );
    // Closed for a minute: not one check.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(switch.runs.load(Ordering::SeqCst), 0, "checks while closed");
    for _ in 0..10 {
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
    }
    let opened_at = Instant::now();
    // 25 s of failing checks: past the 10 s open time, still open.
    tokio::time::sleep(Duration::from_millis(25_500)).await;
    assert!(
        matches!(breaker.state(), BreakerState::Open { .. }),
        "left open while every check failed: {:?}",
        breaker.state()
    );
    let runs = switch.runs.load(Ordering::SeqCst);
    assert_eq!(runs, 25, "one check a second for 25.5 s, got {runs}");
    let status = breaker.snapshot().health.expect("a health status");
    assert_eq!(
        (status.checks, status.passes, status.failures_in_a_row),
        (25, 0, 25)
    );
    assert_eq!(
        status.last.and_then(|r| r.error).as_deref(),
        Some("HTTP 503: still down")
    );
    // Recovery: half-open at the next check, within one interval.
    switch.healthy.store(true, Ordering::SeqCst);
    let recovered_at = Instant::now();
    let mut rx = breaker.subscribe();
    rx.wait_for(|s| matches!(s, BreakerState::HalfOpen { .. }))
        .await
        .unwrap();
    let after = recovered_at.elapsed();
    assert!(
        after <= Duration::from_secs(1),
        "half-open {after:?} after the dependency recovered (interval 1s); opened {:?} before",
        opened_at.elapsed()
    );
    assert_eq!(
        breaker.snapshot().last_transition.map(|t| t.reason),
        Some(TransitionReason::HealthCheckPassed)
    );
    breaker.try_acquire().unwrap().record(CallOutcome::Success);
    assert_eq!(breaker.state(), BreakerState::Closed);
    // Closed again: the checks stop.
    let runs = switch.runs.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        switch.runs.load(Ordering::SeqCst),
        runs,
        "checks while closed"
    );
    shutdown.cancel();
    timer.await.unwrap();
    checks.await.unwrap();
}

/// A check that never answers.
struct Hangs;

impl HealthCheck for Hangs {
    async fn check(&self) -> Result<(), crate::handler::BoxError> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_that_hangs_fails_after_its_timeout() {
    let breaker = Breaker::new(
        "dep",
        BreakerConfig {
            health_check: Some(HealthCheckConfig {
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(300),
                url: None,
            }),
            ..config()
        },
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let checks = tokio::spawn(breaker.clone().run_health_check(Hangs, shutdown.clone()));
    for _ in 0..10 {
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
    }
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let status = breaker.snapshot().health.expect("a health status");
    // Checks start at 1 s, 2 s, 3 s: 3 of them, each cut at 300 ms.
    assert_eq!(status.checks, 3, "{status:?}");
    let last = status.last.expect("a last result");
    assert_eq!(last.took, Duration::from_millis(300));
    assert_eq!(
        last.error.as_deref(),
        Some("no answer within health_check.timeout (300ms)")
    );
    assert!(matches!(breaker.state(), BreakerState::Open { .. }));
    shutdown.cancel();
    checks.await.unwrap();
}

/// A check that panics, as a custom one with a bug might.
struct Panics;

impl HealthCheck for Panics {
    async fn check(&self) -> Result<(), crate::handler::BoxError> {
        panic!("pool was None")
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_that_panics_fails_and_keeps_running() {
    let breaker = Breaker::new("dep", gated());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let checks = tokio::spawn(breaker.clone().run_health_check(Panics, shutdown.clone()));
    for _ in 0..10 {
        breaker.try_acquire().unwrap().record(CallOutcome::Failure);
    }
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let status = breaker.snapshot().health.expect("a health status");
    assert_eq!(
        status.checks, 3,
        "the loop survives a panicking check: {status:?}"
    );
    assert_eq!(
        status.last.and_then(|r| r.error).as_deref(),
        Some("the health check panicked: pool was None")
    );
    assert!(!checks.is_finished());
    shutdown.cancel();
    checks.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn no_check_runs_after_the_breaker_is_closed_by_hand() {
    let breaker = Breaker::new("dep", gated());
    let switch = Switch::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let checks = tokio::spawn(
        breaker
            .clone()
            .run_health_check(switch.clone(), shutdown.clone()),
    );
    for round in 0..50 {
        for _ in 0..10 {
            breaker.try_acquire().unwrap().record(CallOutcome::Failure);
        }
        // Close by hand exactly when a check falls due: the check task is
        // woken for both, and must see the close first.
        tokio::time::sleep(Duration::from_secs(1)).await;
        breaker.close();
        let before = switch.runs.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = switch.runs.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(after, before, "round {round}: a check ran after the close");
        assert_eq!(breaker.state(), BreakerState::Closed, "round {round}");
    }
    shutdown.cancel();
    checks.await.unwrap();
}
