//! Issue 14, part A: a health check ends an outage within one interval of
//! the dependency's recovery, whatever the open time has grown to, and no
//! real message is spent on a trial while the check fails.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::proxy::free_port;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::{
    BreakerConfig, BreakerState, HealthCheck, HealthCheckConfig, TransitionReason,
};
use rabbit_guard::handler::{BoxError, Context, Handler, HandlerError};
use rabbit_guard::secret::SecretUrl;
use rabbit_guard::status::BreakersView;
use tokio::time::Instant;

/// Calls that arrive this long after a trip were started after it (the
/// failing downstream answers in microseconds, so in-flight calls land sooner).
const IN_FLIGHT_SLACK: Duration = Duration::from_millis(200);

const OUTAGE: Duration = Duration::from_secs(8);

/// A breaker whose open time is already at its 10 s maximum, with a health
/// check of the downstream's `/health` every second.
fn breaker(health_url: String) -> BreakerConfig {
    {
        let mut v = fast_breaker();
        v.open_timeout = Duration::from_secs(10);
        v.max_open_timeout = Duration::from_secs(10);
        v.health_check = Some(HealthCheckConfig::new(
            Some(SecretUrl::new(health_url)),
            Duration::from_secs(1),
            Duration::from_millis(500),
        ));
        v
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_ends_the_outage_within_one_interval_and_spends_no_trial_message() {
    let broker = TestBroker::connect().await;
    let downstream = Downstream::start().await;
    let mut settings = with_http(
        settings("health", "http", breaker(downstream.health_url())),
        &downstream,
    );
    let port = free_port();
    settings.admin.listen = Some(format!("127.0.0.1:{port}"));
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let n = 300;
    let ids = broker.publish_json(&consumer.queue, "h", n).await;

    // The outage starts before the worker takes its first message.
    downstream.set(Mode::Failing);
    let outage_start = Instant::now();
    let running = Running::start(Worker::builder(settings)).await;
    // The transition, not the state: the recorder hears of it a moment later.
    let open_seen = || {
        running
            .transitions()
            .into_iter()
            .find(|t| matches!(t.to, BreakerState::Open { .. }))
    };
    assert!(
        wait_until(Duration::from_secs(10), || open_seen().is_some()).await,
        "the breaker did not open within 10s: {:?}",
        running.breaker.snapshot()
    );
    let opened = open_seen().expect("an open transition");
    let BreakerState::Open { until } = opened.to else {
        unreachable!()
    };
    assert_eq!(
        until - opened.at,
        Duration::from_secs(10),
        "the open time this test is about"
    );

    // The dependency comes back 8 s into the outage: 2 s before the open
    // time would let a trial through.
    tokio::time::sleep_until(outage_start + OUTAGE).await;
    let during: Vec<_> = downstream.health_checks();
    let recovered_at = Instant::now();
    downstream.set(Mode::Healthy);
    assert!(
        matches!(running.breaker.state(), BreakerState::Open { .. }),
        "the breaker left the open state while every check failed: {:?}",
        running.transitions()
    );

    assert!(
        wait_until(Duration::from_secs(20), || downstream.succeeded_ids().len()
            == n)
        .await,
        "{} of {n} messages succeeded within 20s of recovery",
        downstream.succeeded_ids().len()
    );
    let calls = downstream.calls();
    let trial_calls: Vec<_> = calls
        .iter()
        .filter(|c| c.at > opened.at + IN_FLIGHT_SLACK && c.at < recovered_at)
        .collect();
    let first_ok = calls
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| c.at)
        .min()
        .expect("a successful call");
    let first_ok_after = first_ok.saturating_duration_since(recovered_at);
    let half_open = running
        .transitions()
        .into_iter()
        .find(|t| matches!(t.to, BreakerState::HalfOpen { .. }))
        .expect("a half-open transition");
    eprintln!(
        "opened {:?} into the outage; {} checks failed during it; recovered at 8s; half-open {:?} and first success {:?} after recovery ({:?} before the open time would have ended); {} calls while open",
        opened.at - outage_start,
        during.len(),
        half_open.at.saturating_duration_since(recovered_at),
        first_ok_after,
        until.saturating_duration_since(first_ok),
        trial_calls.len()
    );
    assert_eq!(
        trial_calls.len(),
        0,
        "real messages spent while the health check failed: {trial_calls:?}"
    );
    assert!(
        first_ok_after <= Duration::from_millis(1_500),
        "first successful call {first_ok_after:?} after the dependency recovered (goal: at most 1.5s with a 1s interval)"
    );
    assert_eq!(half_open.reason, TransitionReason::HealthCheckPassed);
    assert!(
        half_open.at < until,
        "half-open at the open time's end, not at the passing check"
    );
    assert!(
        during.len() >= 6 && during.iter().all(|&(_, status)| status == 503),
        "checks during the outage: {during:?}"
    );
    // The checks stopped once the breaker closed.
    assert!(
        wait_until(Duration::from_secs(5), || running.breaker.state()
            == BreakerState::Closed)
        .await
    );
    let after_close = downstream.health_checks().len();

    // /breakers shows the check, its target and its last result.
    let body = reqwest::get(format!("http://127.0.0.1:{port}/breakers"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let view: BreakersView = serde_json::from_str(&body).unwrap();
    let check = view.breakers[0]
        .health_check
        .clone()
        .expect("/breakers shows the health check");
    assert_eq!(check.target, downstream.health_url());
    assert_eq!(check.last_result.as_deref(), Some("pass"), "{check:?}");
    assert_eq!(check.passes, 1, "{check:?}");
    assert_eq!(check.checks as usize, during.len() + 1, "{check:?}");

    // Nothing lost, nothing dead-lettered.
    let succeeded = downstream.succeeded_ids();
    let missing: Vec<_> = ids.iter().filter(|id| !succeeded.contains(*id)).collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        downstream.health_checks().len(),
        after_close,
        "health checks ran while the breaker was closed"
    );
    running.stop().await;
    let dead = broker.drain(&consumer.dead_letter_queue()).await;
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    let (ready, _) = broker.counts(&consumer.queue).await;
    assert_eq!(ready, 0, "messages left in the queue");
    broker.cleanup().await;
}

/// A custom check and handler sharing one switch: the dependency.
#[derive(Clone, Default)]
struct Dependency {
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The check says "healthy" whatever the dependency does.
    lies: std::sync::Arc<std::sync::atomic::AtomicBool>,
    calls: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String, bool)>>>,
    checks: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Dependency {
    /// Ids whose call succeeded at least once.
    fn succeeded(&self) -> HashSet<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.2)
            .map(|c| c.1.clone())
            .collect()
    }

    /// When the first successful call was made.
    fn first_success(&self) -> Option<Instant> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.2)
            .map(|c| c.0)
            .min()
    }
}

impl Handler for Dependency {
    type Message = ();

    async fn handle(&self, (): (), ctx: &Context) -> Result<(), HandlerError> {
        let down = self.down.load(std::sync::atomic::Ordering::SeqCst);
        let id = ctx.message_id().unwrap_or_default().to_owned();
        self.calls.lock().unwrap().push((Instant::now(), id, !down));
        if down {
            Err(HandlerError::transient("dependency down"))
        } else {
            Ok(())
        }
    }
}

impl HealthCheck for Dependency {
    async fn check(&self) -> Result<(), BoxError> {
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.down.load(std::sync::atomic::Ordering::SeqCst)
            && !self.lies.load(std::sync::atomic::Ordering::SeqCst)
        {
            Err("pool ping failed".into())
        } else {
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_health_check_gates_the_breaker_like_a_url() {
    let broker = TestBroker::connect().await;
    let mut breaker_cfg = fast_breaker();
    breaker_cfg.open_timeout = Duration::from_secs(10);
    breaker_cfg.max_open_timeout = Duration::from_secs(10);
    let settings = settings("health-custom", "dep", breaker_cfg);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let n = 100;
    let ids = broker.publish_json(&consumer.queue, "c", n).await;
    let dep = Dependency::default();
    dep.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let running = Running::start(
        Worker::builder(settings)
            .handler("dep", dep.clone())
            .health_check("dep", dep.clone()),
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            running.breaker.state(),
            BreakerState::Open { .. }
        ))
        .await
    );
    let opened_at = Instant::now();
    // Calls admitted before the trip may still start just after it (in one
    // CI run, 4 did): count from when none is running.
    assert!(
        wait_until(Duration::from_secs(5), || running
            .stats
            .snapshot()
            .in_flight
            == 0)
        .await,
        "the calls admitted before the trip end: {:?}",
        running.stats.snapshot()
    );
    let calls_at_open = dep.calls.lock().unwrap().len();
    // Half-way between two checks (they run at 1 s, 2 s, 3 s after the trip).
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let recovered_at = Instant::now();
    dep.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let calls_while_open = dep.calls.lock().unwrap().len() - calls_at_open;
    assert!(
        wait_until(Duration::from_secs(20), || dep.succeeded().len() == n).await,
        "not every message succeeded after recovery"
    );
    let first_ok = dep.first_success().expect("a successful call");
    let checks = dep.checks.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "custom check: {checks} checks, {calls_while_open} calls in the 3.5s open, first success {:?} after recovery",
        first_ok.saturating_duration_since(recovered_at)
    );
    assert_eq!(
        calls_while_open, 0,
        "calls while open (opened at {opened_at:?})"
    );
    assert!(
        first_ok.saturating_duration_since(recovered_at) <= Duration::from_millis(1_500),
        "first success {:?} after recovery",
        first_ok.saturating_duration_since(recovered_at)
    );
    assert!(checks >= 3, "{checks} checks in a 3.5s open period");
    let succeeded = dep.succeeded();
    assert!(ids.iter().all(|id| succeeded.contains(id)), "lost messages");
    running.stop().await;
    let dead = broker.drain(&consumer.dead_letter_queue()).await;
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_open_time_has_backed_off_a_passing_check_still_ends_the_outage_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let broker = TestBroker::connect().await;
    let mut breaker_cfg = fast_breaker();
    breaker_cfg.open_timeout = Duration::from_millis(500);
    breaker_cfg.max_open_timeout = Duration::from_secs(4);
    let settings = settings("health-backoff", "dep", breaker_cfg);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let n = 60;
    let ids = broker.publish_json(&consumer.queue, "b", n).await;
    let dep = Dependency::default();
    dep.down.store(true, SeqCst);
    // First the check lies: it passes while the dependency fails, so each
    // trial fails and the open time doubles up to its 4 s maximum.
    dep.lies.store(true, SeqCst);
    let running = Running::start(
        Worker::builder(settings)
            .handler("dep", dep.clone())
            .health_check("dep", dep.clone()),
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(30), || running
            .breaker
            .snapshot()
            .open_time
            == Duration::from_secs(4))
        .await,
        "the open time did not back off to 4s within 30s: {:?}",
        running.breaker.snapshot()
    );
    let trials_while_lying = running
        .transitions()
        .iter()
        .filter(|t| t.reason == TransitionReason::HealthCheckPassed)
        .count();
    // Then it tells the truth: it fails, and no trial runs.
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            running.breaker.state(),
            BreakerState::Open { .. }
        ))
        .await
    );
    dep.lies.store(false, SeqCst);
    let truthful_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let BreakerState::Open { until } = running.breaker.state() else {
        panic!(
            "not open while the check fails: {:?}",
            running.breaker.state()
        );
    };
    let recovered_at = Instant::now();
    dep.down.store(false, SeqCst);
    assert!(
        wait_until(Duration::from_secs(20), || dep.succeeded().len() == n).await,
        "not every message succeeded after recovery"
    );
    let calls = dep.calls.lock().unwrap().clone();
    // A probe taken just before the switch may land just after it.
    let while_truthful = calls
        .iter()
        .filter(|c| c.0 > truthful_at + Duration::from_millis(200) && c.0 < recovered_at)
        .count();
    let first_ok = dep.first_success().expect("a successful call");
    let after = first_ok.saturating_duration_since(recovered_at);
    eprintln!(
        "{trials_while_lying} trials on a lying check backed the open time off to 4s; \
         then {while_truthful} calls while the check failed; first success {after:?} after recovery, \
         {:?} before the open time would have ended",
        until.saturating_duration_since(first_ok)
    );
    assert!(
        trials_while_lying >= 3,
        "{trials_while_lying} trials to back off 0.5s -> 4s"
    );
    assert_eq!(
        while_truthful, 0,
        "real messages spent while the check failed"
    );
    assert!(
        after <= Duration::from_millis(1_500),
        "first success {after:?} after recovery with the open time at 4s"
    );
    let succeeded = dep.succeeded();
    assert!(ids.iter().all(|id| succeeded.contains(id)), "lost messages");
    running.stop().await;
    let dead = broker.drain(&consumer.dead_letter_queue()).await;
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    broker.cleanup().await;
}

#[test]
fn health_check_settings_that_cannot_work_are_refused_before_connecting() {
    // A table without a url and no registered check.
    let mut s = settings("health-bad", "noop", {
        let mut b = fast_breaker();
        b.health_check = Some(HealthCheckConfig::default());
        b
    });
    let e = Worker::builder(s.clone()).build().unwrap_err().to_string();
    assert!(
        e.contains("breakers.dep.health_check.url") && e.contains("register a HealthCheck"),
        "{e}"
    );
    // Both a url and a registered check.
    s.breakers.get_mut("dep").unwrap().health_check = Some({
        let mut v = HealthCheckConfig::default();
        v.url = Some(SecretUrl::new("http://user:hunter2@127.0.0.1:1/health"));
        v
    });
    let e = Worker::builder(s.clone())
        .health_check("dep", Dependency::default())
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("use one of them"), "{e}");
    assert!(!e.contains("hunter2"), "the password is printed: {e}");
    // Two checks for one breaker.
    s.breakers.get_mut("dep").unwrap().health_check = None;
    let e = Worker::builder(s.clone())
        .health_check("dep", Dependency::default())
        .health_check("dep", Dependency::default())
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("two HealthChecks"), "{e}");
    // A check for a breaker that does not exist.
    s.breakers.get_mut("dep").unwrap().health_check = None;
    let e = Worker::builder(s)
        .health_check("billing", Dependency::default())
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("breakers.billing") && e.contains("not defined"),
        "{e}"
    );
}
