//! Promise 2 and 4: an open breaker means no consumer at the broker and no
//! calls to the dependency; the blast radius before the pause is bounded;
//! after recovery every message is processed and none is dead-lettered.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::{BreakerState, Transition, TransitionReason};
use tokio::time::Instant;

/// Calls that arrive this long after a trip were started after it (the
/// failing downstream answers in microseconds, so in-flight calls land sooner).
const IN_FLIGHT_SLACK: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    consumers: u32,
    open_since: Option<Instant>,
}

/// Samples the queue's consumer count at the broker while the breaker is open.
fn sample_consumers(
    broker: Arc<TestBroker>,
    queue: String,
    running: &Running,
) -> (Arc<Mutex<Vec<Sample>>>, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sink = samples.clone();
    let breaker = running.breaker.clone();
    let handle = tokio::spawn(async move {
        loop {
            let before = breaker.snapshot();
            let consumers = broker.consumers(&queue).await;
            let after = breaker.snapshot();
            let open_since = match (before.state, after.state) {
                (BreakerState::Open { until: a }, BreakerState::Open { until: b }) if a == b => {
                    Some(before.since)
                }
                _ => None,
            };
            sink.lock().unwrap().push(Sample {
                at: Instant::now(),
                consumers,
                open_since,
            });
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    (samples, handle)
}

fn is_open(t: &Transition) -> bool {
    matches!(t.to, BreakerState::Open { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_pauses_consumption_and_recovers_with_nothing_lost() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Failing);
    let breaker = fast_breaker();
    let (minimum_calls, probes) = (breaker.minimum_calls, breaker.half_open_probes);
    let settings = with_http(settings("outage", "http", breaker), &downstream);
    let consumer = settings.consumers[0].clone();
    let concurrency = u32::from(consumer.concurrency);
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "o", 2_000).await;

    let running = Running::start(Worker::builder(settings)).await;
    let (samples, sampler) = sample_consumers(broker.clone(), consumer.queue.clone(), &running);

    // Fail long enough for the first trip and at least two failed trials.
    let tripped = wait_until(Duration::from_secs(10), || {
        running
            .transitions()
            .iter()
            .filter(|t| t.reason == TransitionReason::ProbeFailed)
            .count()
            >= 2
    })
    .await;
    assert!(
        tripped,
        "breaker should trip and fail two probes: {:?}",
        running.transitions()
    );
    downstream.set(Mode::Healthy);
    let recovered_at = Instant::now();

    let all_done = wait_until(Duration::from_secs(60), || {
        downstream.succeeded_ids().len() == ids.len()
    })
    .await;
    sampler.abort();
    let succeeded = downstream.succeeded_ids();
    let missing: Vec<_> = ids
        .iter()
        .filter(|id| !succeeded.contains(*id))
        .take(5)
        .collect();
    assert!(
        all_done,
        "every message must reach the downstream with a 2xx after recovery: {} of {} did, e.g. missing {missing:?}",
        succeeded.len(),
        ids.len()
    );

    let calls = downstream.calls();
    let transitions = running.transitions();
    let first_half_open = transitions
        .iter()
        .find(|t| matches!(t.to, BreakerState::HalfOpen { .. }))
        .expect("went half-open")
        .at;

    // Promise 4: failing calls before the pause are bounded.
    let failing_before_pause = calls
        .iter()
        .filter(|c| c.status == 503 && c.at < first_half_open)
        .count();
    let bound = (minimum_calls + concurrency) as usize;
    assert!(
        failing_before_pause <= bound,
        "{failing_before_pause} failing calls before the pause; bound is minimum_calls + concurrency = {bound}"
    );

    // Promise 2: no calls while open (beyond calls already in flight at the trip).
    let mut trials = 0;
    for (i, t) in transitions.iter().enumerate() {
        let Some(next) = transitions.get(i + 1) else {
            break;
        };
        if is_open(t) {
            let during: Vec<_> = calls
                .iter()
                .filter(|c| c.at >= t.at + IN_FLIGHT_SLACK && c.at < next.at)
                .collect();
            assert!(
                during.is_empty(),
                "{} calls reached the downstream while the breaker was open ({:?} .. {:?}): {during:?}",
                during.len(),
                t.at,
                next.at
            );
            let in_flight = calls
                .iter()
                .filter(|c| c.at >= t.at && c.at < t.at + IN_FLIGHT_SLACK)
                .count();
            assert!(
                in_flight <= concurrency as usize,
                "{in_flight} calls right after the trip; at most {concurrency} can have been in flight"
            );
        }
        if matches!(t.to, BreakerState::HalfOpen { .. }) {
            trials += 1;
            let probes_seen = calls
                .iter()
                .filter(|c| c.at >= t.at && c.at < next.at)
                .count();
            assert!(
                probes_seen <= probes as usize,
                "half-open trial {trials} let {probes_seen} calls through; half_open_probes = {probes}"
            );
        }
    }

    // While open, the broker shows no consumer on the queue.
    let samples = samples.lock().unwrap().clone();
    let open_samples: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.open_since
                .is_some_and(|since| s.at >= since + IN_FLIGHT_SLACK)
        })
        .collect();
    assert!(
        !open_samples.is_empty(),
        "no consumer-count sample was taken while the breaker was open ({} samples)",
        samples.len()
    );
    let with_consumer: Vec<_> = open_samples.iter().filter(|s| s.consumers > 0).collect();
    assert!(
        with_consumer.is_empty(),
        "{} of {} samples taken while open saw a consumer at the broker",
        with_consumer.len(),
        open_samples.len()
    );

    // Promise 3: nothing dead-lettered; everything settled.
    let stats = running.stats.snapshot();
    assert_eq!(
        stats.dead_lettered, 0,
        "no dead letters from an outage: {stats:?}"
    );
    running.stop().await;
    assert_eq!(
        broker.ready(&consumer.queue).await,
        0,
        "work queue should be empty: nothing left unacked"
    );
    assert_eq!(
        broker.ready(&consumer.dead_letter_queue()).await,
        0,
        "dead-letter queue should be empty"
    );
    for d in &consumer.retry.delays {
        assert_eq!(
            broker.ready(&consumer.delay_queue(*d)).await,
            0,
            "delay queue {d:?} should be empty"
        );
    }
    eprintln!(
        "outage: {failing_before_pause} failing calls before the pause (bound {bound}), {trials} half-open trials, \
         {} open samples with 0 consumers, {} total calls for {} messages, recovered in {:?}, stats {stats:?}",
        open_samples.len(),
        calls.len(),
        ids.len(),
        recovered_at.elapsed()
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_after_healthy_traffic_trips_on_consecutive_failures() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let breaker = {
        let mut v = fast_breaker();
        v.window = Duration::from_secs(60);
        v.consecutive_failures = Some(20);
        v.open_timeout = Duration::from_secs(2);
        v
    };
    let settings = with_http(settings("consecutive", "http", breaker), &downstream);
    let consumer = settings.consumers[0].clone();
    let concurrency = usize::from(consumer.concurrency);
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "c", 3_000).await;

    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(30), || downstream.succeeded_ids().len()
            >= 1_000)
        .await,
        "healthy traffic should flow first: {} of 1000 succeeded within 30 s",
        downstream.succeeded_ids().len()
    );
    downstream.set(Mode::Failing);
    assert!(
        wait_until(Duration::from_secs(10), || running
            .transitions()
            .iter()
            .any(is_open))
        .await,
        "breaker should open on consecutive failures within 10 s: {:?}, {:?}",
        running.state(),
        running.transitions()
    );
    let trip = running
        .transitions()
        .into_iter()
        .find(is_open)
        .expect("a trip");
    assert_eq!(
        trip.reason,
        TransitionReason::ConsecutiveFailures,
        "{trip:?}"
    );
    assert!(
        trip.counts.calls >= 1_000,
        "the window should hold the healthy calls: {:?}",
        trip.counts
    );
    // Failing calls before the pause: every 503 before the first probe.
    let half_open = |t: &Transition| matches!(t.to, BreakerState::HalfOpen { .. });
    assert!(
        wait_until(Duration::from_secs(10), || running
            .transitions()
            .iter()
            .any(half_open))
        .await,
        "breaker should go half-open within 10 s: {:?}, {:?}",
        running.state(),
        running.transitions()
    );
    let probing_from = running
        .transitions()
        .into_iter()
        .find(half_open)
        .unwrap()
        .at;
    let failing_before_pause = downstream
        .calls()
        .iter()
        .filter(|c| c.status == 503 && c.at < probing_from)
        .count();
    assert!(
        failing_before_pause <= 20 + concurrency,
        "{failing_before_pause} failing calls before the pause; bound is consecutive_failures + concurrency = {}, \
         with {} successes in the window",
        20 + concurrency,
        trip.counts.calls - trip.counts.failures
    );

    downstream.set(Mode::Healthy);
    let all_done = wait_until(Duration::from_secs(60), || {
        downstream.succeeded_ids().len() == ids.len()
    })
    .await;
    assert!(
        all_done,
        "{} of {} processed",
        downstream.succeeded_ids().len(),
        ids.len()
    );
    let stats = running.stats.snapshot();
    assert_eq!(
        stats.dead_lettered, 0,
        "no dead letters from an outage: {stats:?}"
    );
    running.stop().await;
    assert_eq!(
        broker.ready(&consumer.dead_letter_queue()).await,
        0,
        "dead-letter queue should be empty"
    );
    eprintln!(
        "consecutive: {failing_before_pause} failing calls before the pause (bound {}), window at trip {:?}",
        20 + concurrency,
        trip.counts
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_pause_dead_letter_sends_unstarted_prefetched_messages_to_the_dlq() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Failing);
    let mut settings = with_http(settings("onpause", "http", fast_breaker()), &downstream);
    settings.consumers[0].on_pause = rabbit_guard::config::OnPause::DeadLetter;
    settings.consumers[0].prefetch = 100;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "p", 300).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(10), || running
            .transitions()
            .iter()
            .any(is_open))
        .await,
        "breaker should trip within 10 s: {:?} after {} calls",
        running.state(),
        downstream.call_count()
    );
    assert!(
        wait_until(Duration::from_secs(10), || running
            .stats
            .snapshot()
            .dead_lettered
            > 0)
        .await,
        "prefetched messages should be dead-lettered: {:?}",
        running.stats.snapshot()
    );
    downstream.set(Mode::Healthy);
    let dead_count = || running.stats.snapshot().dead_lettered as usize;
    assert!(
        wait_until(Duration::from_secs(60), || downstream.succeeded_ids().len()
            + dead_count()
            == ids.len())
        .await,
        "every message processed or dead-lettered: {} + {} of {}",
        downstream.succeeded_ids().len(),
        dead_count(),
        ids.len()
    );
    running.stop().await;
    let dead = broker.drain(&consumer.dead_letter_queue()).await;
    let called: std::collections::HashSet<String> =
        downstream.calls().into_iter().map(|c| c.id).collect();
    assert!(
        !dead.is_empty(),
        "prefetched messages should be dead-lettered as paused: got {} dead letters, {} of {} processed",
        dead.len(),
        downstream.succeeded_ids().len(),
        ids.len()
    );
    for d in &dead {
        assert_eq!(
            d.header_str("rg-reason").as_deref(),
            Some("paused"),
            "rg-reason of {}",
            d.id
        );
        assert!(
            !called.contains(&d.id),
            "{} was dead-lettered as unstarted but reached the downstream",
            d.id
        );
    }
    let succeeded = downstream.succeeded_ids();
    let lost: Vec<_> = ids
        .iter()
        .filter(|id| !succeeded.contains(*id) && !dead.iter().any(|d| &d.id == *id))
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    eprintln!(
        "on_pause: {} prefetched messages dead-lettered as paused, {} processed",
        dead.len(),
        succeeded.len()
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_shared_by_two_consumers_pauses_both() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Failing);
    let mut settings = with_http(settings("shared", "http", fast_breaker()), &downstream);
    let mut second = settings.consumers[0].clone();
    second.queue = unique("shared-b");
    settings.consumers.push(second);
    let queues: Vec<_> = settings.consumers.iter().map(|c| c.queue.clone()).collect();
    let mut ids = Vec::new();
    for c in &settings.consumers {
        broker.track(c);
        broker.declare(c).await;
        ids.extend(broker.publish_json(&c.queue, &c.queue, 200).await);
    }
    init_logs();
    let worker = Worker::builder(settings).build().unwrap();
    let breaker = worker.breaker("dep").unwrap();
    let stats: Vec<_> = queues.iter().map(|q| worker.stats(q).unwrap()).collect();
    let token = tokio_util::sync::CancellationToken::new();
    let join = tokio::spawn(worker.run_until(token.clone()));
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            breaker.state(),
            BreakerState::Open { .. }
        ))
        .await,
        "breaker should open within 10 s: {:?} after {} calls",
        breaker.state(),
        downstream.call_count()
    );
    let mut both_paused = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let a = broker.consumers(&queues[0]).await;
        let b = broker.consumers(&queues[1]).await;
        if a == 0 && b == 0 && matches!(breaker.state(), BreakerState::Open { .. }) {
            both_paused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        both_paused,
        "both queues should have no consumer within 5 s while the shared breaker is open: \
         now {} and {} consumers, breaker {:?}",
        broker.consumers(&queues[0]).await,
        broker.consumers(&queues[1]).await,
        breaker.state()
    );
    // Let two probe trials fail: each probe is taken by one consumer only.
    let trials = |n| {
        let breaker = breaker.clone();
        move || {
            matches!(breaker.state(), BreakerState::Open { .. })
                && breaker.snapshot().consecutive_failures >= n
        }
    };
    let rejected = || -> u64 { stats.iter().map(|s| s.snapshot().rejected_by_breaker).sum() };
    let first_trip = breaker.snapshot().consecutive_failures;
    assert!(
        wait_until(Duration::from_secs(10), trials(first_trip + 1)).await,
        "a first probe should fail within 10 s ({first_trip} consecutive failures at the trip): {:?}",
        breaker.snapshot()
    );
    let rejected_after_first_probe = rejected();
    assert!(
        wait_until(Duration::from_secs(10), trials(first_trip + 2)).await,
        "a second probe should fail within 10 s ({first_trip} consecutive failures at the trip): {:?}",
        breaker.snapshot()
    );
    downstream.set(Mode::Healthy);
    assert!(
        wait_until(Duration::from_secs(60), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "{} of {} processed",
        downstream.succeeded_ids().len(),
        ids.len()
    );
    assert_eq!(
        rejected(),
        rejected_after_first_probe,
        "half-open trials must not take messages beyond the probes (they would be requeued)"
    );
    token.cancel();
    join.await.unwrap().unwrap();
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_on_a_bad_message_frees_its_slot_for_another_probe() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let mut settings = with_http(settings("badprobe", "http", fast_breaker()), &downstream);
    // One at a time, so the queue order decides which message is the probe.
    settings.consumers[0].prefetch = 1;
    settings.consumers[0].concurrency = 1;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    // Ten failures trip the breaker; then a message the dependency rejects
    // as bad (400: permanent, tells nothing about its health); then good ones.
    let warm = broker.publish_json(&consumer.queue, "warm", 10).await;
    for id in &warm {
        downstream.rule(id, Rule::FailTimes(1));
    }
    downstream.rule("rejected", Rule::Status(400));
    broker
        .publish_raw(&consumer.queue, "rejected", b"{}", "application/json")
        .await;
    let good = broker.publish_json(&consumer.queue, "good", 10).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let ok = downstream.succeeded_ids();
            good.iter().all(|id| ok.contains(id))
        })
        .await,
        "the bad probe must free its slot so a good one can close the breaker: {:?}, {:?}",
        running
            .transitions()
            .iter()
            .map(|t| t.reason)
            .collect::<Vec<_>>(),
        running.stats.snapshot()
    );
    let reasons: Vec<_> = running.transitions().iter().map(|t| t.reason).collect();
    assert_eq!(
        reasons,
        [
            TransitionReason::FailureRate,
            TransitionReason::OpenTimeElapsed,
            TransitionReason::ProbesSucceeded
        ],
        "one trial: the bad message's probe is not a failure, the next probe closes it"
    );
    let first_probe = downstream
        .calls()
        .into_iter()
        .find(|c| c.id == "rejected")
        .unwrap();
    let half_open = running.transitions()[1].at;
    assert!(
        first_probe.at >= half_open,
        "the bad message was a probe: called {first_probe:?}, half-open from {half_open:?}"
    );
    running.stop().await;
    let dead = broker.drain(&consumer.dead_letter_queue()).await;
    assert_eq!(
        dead.len(),
        1,
        "only the bad message is dead-lettered: {:?}",
        dead.iter().map(|d| &d.id).collect::<Vec<_>>()
    );
    assert_eq!(
        dead[0].header_str("rg-reason").as_deref(),
        Some("permanent"),
        "a 400 is dead-lettered as permanent: {:?}",
        dead[0]
    );
    broker.cleanup().await;
}
