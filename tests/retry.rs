//! Transient failures walk the delay queues in order and end in the
//! dead-letter queue only when the dependency is otherwise healthy.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::{BreakerState, TransitionReason};
use rabbit_guard::config::RetrySettings;
use tokio_util::sync::CancellationToken;

/// Publishes a healthy message every 50 ms until cancelled: the "otherwise
/// healthy" traffic a real queue has.
fn neighbours(
    broker: Arc<TestBroker>,
    queue: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.is_cancelled() {
            broker
                .publish_raw(&queue, &format!("neighbour-{n}"), b"{}", "application/json")
                .await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_walks_each_delay_level_in_order_then_is_dead_lettered() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    downstream.rule("doomed", Rule::Status(503));
    let delays = [Duration::from_secs(1), Duration::from_secs(2)];
    let mut settings = with_http(settings("retry", "http", fast_breaker()), &downstream);
    settings.consumers[0].retry = RetrySettings::new(delays.to_vec());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let running = Running::start(Worker::builder(settings)).await;
    let stop = CancellationToken::new();
    let traffic = neighbours(broker.clone(), consumer.queue.clone(), stop.clone());
    broker
        .publish_raw(&consumer.queue, "doomed", b"{}", "application/json")
        .await;

    let dead = wait_until(Duration::from_secs(20), || {
        running.stats.snapshot().dead_lettered == 1
    })
    .await;
    stop.cancel();
    let neighbours_sent = traffic.await.unwrap();
    assert!(
        dead,
        "the message should end in the dead-letter queue: {:?}",
        running.stats.snapshot()
    );
    assert_eq!(
        running.state(),
        BreakerState::Closed,
        "one failing message among healthy neighbours leaves the breaker closed: {:?}",
        running.transitions()
    );
    running.stop().await;

    let attempts: Vec<_> = downstream
        .calls()
        .into_iter()
        .filter(|c| c.id == "doomed")
        .collect();
    assert_eq!(
        attempts.len(),
        3,
        "1 + one attempt per delay level: {attempts:?}"
    );
    let numbers: Vec<u32> = attempts.iter().map(|c| c.attempt).collect();
    assert_eq!(numbers, [1, 2, 3], "attempts in order");
    for (i, delay) in delays.iter().enumerate() {
        let gap = attempts[i + 1].at - attempts[i].at;
        assert!(
            gap >= *delay - Duration::from_millis(50)
                && gap <= *delay + Duration::from_millis(1_500),
            "attempt {} came {gap:?} after attempt {}; the delay level is {delay:?}",
            i + 2,
            i + 1
        );
    }
    let dlq = broker.drain(&consumer.dead_letter_queue()).await;
    assert_eq!(
        dlq.len(),
        1,
        "only the doomed message is dead-lettered: {dlq:?}"
    );
    let d = &dlq[0];
    assert_eq!(
        d.id, "doomed",
        "the dead letter is the doomed message: {d:?}"
    );
    assert_eq!(
        d.header_str("rg-reason").as_deref(),
        Some("retries-exhausted"),
        "reason of the dead letter: {d:?}"
    );
    assert_eq!(
        d.header_u64("rg-attempt"),
        Some(3),
        "attempt count on the dead letter"
    );
    assert!(
        d.header_str("rg-error").unwrap_or_default().contains("503"),
        "the error names the 503: {:?}",
        d.header_str("rg-error")
    );
    assert!(
        !d.headers.contains_key("x-death"),
        "broker death headers are not copied: {:?}",
        d.headers.get("x-death")
    );
    for delay in delays {
        assert_eq!(
            broker.ready(&consumer.delay_queue(delay)).await,
            0,
            "delay queue {delay:?} should be empty"
        );
    }
    eprintln!(
        "retry: gaps {:?} for delays {delays:?}; {neighbours_sent} neighbour messages",
        attempts
            .windows(2)
            .map(|w| w[1].at - w[0].at)
            .collect::<Vec<_>>()
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_fails_once_then_succeeds_is_acked_once() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    downstream.rule("flaky", Rule::FailTimes(1));
    let settings = with_http(settings("once", "http", fast_breaker()), &downstream);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let running = Running::start(Worker::builder(settings)).await;
    broker
        .publish_raw(&consumer.queue, "flaky", b"{}", "application/json")
        .await;
    let ids = broker.publish_json(&consumer.queue, "steady", 20).await;
    assert!(
        wait_until(Duration::from_secs(15), || downstream.succeeded_ids().len()
            == ids.len() + 1)
        .await,
        "all processed: {:?}",
        running.stats.snapshot()
    );
    running.stop().await;
    let flaky: Vec<_> = downstream
        .calls()
        .into_iter()
        .filter(|c| c.id == "flaky")
        .collect();
    let statuses: Vec<u16> = flaky.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [503, 200],
        "one failure, one success, no duplicate"
    );
    assert_eq!(
        broker.ready(&consumer.queue).await,
        0,
        "work queue should be empty"
    );
    assert_eq!(
        broker.ready(&consumer.dead_letter_queue()).await,
        0,
        "a message that succeeds on retry is not dead-lettered"
    );
    for d in &consumer.retry.delays {
        assert_eq!(
            broker.ready(&consumer.delay_queue(*d)).await,
            0,
            "delay queue {d:?} should be empty"
        );
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_failing_message_in_an_idle_queue_still_ends_dead_lettered() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Failing);
    let breaker = {
        let mut v = fast_breaker();
        v.window = Duration::from_millis(500);
        v
    };
    let mut settings = with_http(settings("lone", "http", breaker), &downstream);
    settings.consumers[0].retry =
        RetrySettings::new(vec![Duration::from_millis(200), Duration::from_millis(300)]);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let running = Running::start(Worker::builder(settings)).await;
    broker
        .publish_raw(&consumer.queue, "lonely", b"{}", "application/json")
        .await;
    assert!(
        wait_until(Duration::from_secs(20), || running
            .stats
            .snapshot()
            .dead_lettered
            == 1)
        .await,
        "with nothing to tell an outage from a bad message, it is put back a few times, then dead-lettered: {:?}",
        running.stats.snapshot()
    );
    assert!(
        running.transitions().is_empty(),
        "one message never trips minimum_calls = 10: {:?}",
        running.transitions()
    );
    running.stop().await;
    let dlq = broker.drain(&consumer.dead_letter_queue()).await;
    assert_eq!(dlq.len(), 1, "the lonely message is dead-lettered: {dlq:?}");
    assert_eq!(
        dlq[0].header_str("rg-reason").as_deref(),
        Some("retries-exhausted"),
        "reason of the dead letter: {:?}",
        dlq[0]
    );
    assert_eq!(
        dlq[0].header_u64("rg-attempt"),
        Some(3),
        "1 + one attempt per delay level: {:?}",
        dlq[0]
    );
    assert_eq!(
        dlq[0].header_u64("rg-deferrals"),
        Some(3),
        "deferred the maximum number of times first"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_message_picked_as_probe_does_not_keep_the_breaker_open() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let breaker = {
        let mut v = fast_breaker();
        v.open_timeout = Duration::from_millis(800);
        v.max_open_timeout = Duration::from_secs(2);
        v
    };
    let mut settings = with_http(settings("probe", "http", breaker), &downstream);
    // One at a time, so the queue order decides which message is the probe.
    settings.consumers[0].prefetch = 1;
    settings.consumers[0].concurrency = 1;
    // Deferred messages wait long enough to be out of the way of the probes.
    settings.consumers[0].retry = RetrySettings::new(vec![Duration::from_secs(4)]);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    // Ten failing messages trip the breaker; the bad one is next in line, so
    // it becomes the first probe; the good ones behind it are fine.
    let warm = broker.publish_json(&consumer.queue, "warm", 10).await;
    for id in &warm {
        downstream.rule(id, Rule::Status(503));
    }
    downstream.rule("bad", Rule::Status(503));
    broker
        .publish_raw(&consumer.queue, "bad", b"{}", "application/json")
        .await;
    let good = broker.publish_json(&consumer.queue, "good", 20).await;

    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let ok = downstream.succeeded_ids();
            good.iter().all(|id| ok.contains(id))
        })
        .await,
        "after the bad probe, another probe succeeds and every good message is processed: {:?}",
        running.transitions()
    );
    let transitions = running.transitions();
    let reasons: Vec<_> = transitions.iter().map(|t| t.reason).collect();
    let failed_probe = reasons
        .iter()
        .position(|r| *r == TransitionReason::ProbeFailed);
    let closed = reasons
        .iter()
        .position(|r| *r == TransitionReason::ProbesSucceeded);
    assert!(
        reasons.first() == Some(&TransitionReason::FailureRate)
            && failed_probe.is_some()
            && closed > failed_probe,
        "tripped, the bad message failed a probe, then the breaker closed: {reasons:?}"
    );
    let bad_calls = || -> Vec<Call> {
        downstream
            .calls()
            .into_iter()
            .filter(|c| c.id == "bad")
            .collect()
    };
    let half_open = transitions
        .iter()
        .find(|t| matches!(t.to, BreakerState::HalfOpen { .. }))
        .unwrap()
        .at;
    let first_bad = bad_calls()[0].clone();
    assert!(
        first_bad.at >= half_open,
        "the bad message was the first probe: {first_bad:?}, half-open from {half_open:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || bad_calls().len() >= 2).await,
        "the bad message comes back from its delay queue within 10 s: {:?}",
        bad_calls()
    );
    let attempts: Vec<u32> = bad_calls().iter().map(|c| c.attempt).collect();
    assert_eq!(
        &attempts[..2],
        [1, 1],
        "a failed probe is the dependency's fault: it does not count as an attempt; transitions {reasons:?}, bad calls {:?}",
        bad_calls()
    );
    running.stop().await;
    // Nothing is lost, and no good message was dead-lettered.
    let mut seen = std::collections::HashMap::new();
    // Delay queue first: messages only move from there to the work queue.
    for q in [
        consumer.delay_queue(Duration::from_secs(4)),
        consumer.queue.clone(),
        consumer.dead_letter_queue(),
    ] {
        for g in broker.drain(&q).await {
            assert!(
                !(q == consumer.dead_letter_queue() && g.id.starts_with("good")),
                "good message {} dead-lettered",
                g.id
            );
            *seen.entry(g.id).or_insert(0) += 1;
        }
    }
    assert_eq!(
        seen.get("bad"),
        Some(&1),
        "the bad message is still in exactly one queue: {seen:?}"
    );
    broker.cleanup().await;
}
