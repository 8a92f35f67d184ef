//! Richer handler outcomes against the real broker: `retry_after` picks the
//! delay level, `retry` is not counted against the breaker, immediate
//! retries happen in the same delivery and stop when the breaker opens.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::BreakerState;
use rabbit_guard::config::{ConsumerSettings, RetrySettings, Settings};
use rabbit_guard::handler::{Context, Handler, HandlerError};
use tokio::time::Instant;

/// One call the handler saw: message id, attempt, when.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    attempt: u32,
    at: Instant,
}

/// Fails as each message id says, recording every call.
///
/// - `wait-<ms>-…`: transient with `retry_after(<ms>)` on attempt 1, then succeeds;
/// - `retry-…`: `HandlerError::retry` on attempt 1, then succeeds;
/// - `fail<n>-…`: transient on its first `n` calls (whatever the attempt), then succeeds;
/// - `first-…`: transient on every call of attempt 1, then succeeds;
/// - `always-…`: always transient.
#[derive(Clone, Default)]
struct Scripted {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    fn seen(&self, id: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.id == id)
            .cloned()
            .collect()
    }

    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Handler for Scripted {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        let id = ctx.message_id().unwrap_or_default().to_owned();
        let calls_before = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.iter().filter(|s| s.id == id).count();
            seen.push(Seen {
                id: id.clone(),
                attempt: ctx.attempt(),
                at: Instant::now(),
            });
            n
        };
        let first = ctx.attempt() == 1;
        if let Some(rest) = id.strip_prefix("wait-") {
            let ms: u64 = rest.split('-').next().unwrap().parse().unwrap();
            if first {
                return Err(HandlerError::transient("429 Too Many Requests")
                    .retry_after(Duration::from_millis(ms)));
            }
        } else if id.starts_with("retry-") {
            if first {
                return Err(HandlerError::retry("row locked by another worker"));
            }
        } else if let Some(rest) = id.strip_prefix("fail") {
            let n: usize = rest.split('-').next().unwrap().parse().unwrap();
            if calls_before < n {
                return Err(HandlerError::transient("503 Service Unavailable"));
            }
        } else if id.starts_with("first-") {
            if first {
                return Err(HandlerError::transient("503 Service Unavailable"));
            }
        } else if id.starts_with("always-") {
            return Err(HandlerError::transient("503 Service Unavailable"));
        }
        Ok(())
    }
}

/// A worker running a fresh [`Scripted`] on `settings`' queue with `retry`;
/// the queues are tracked for cleanup.
async fn start(
    broker: &TestBroker,
    mut settings: Settings,
    retry: RetrySettings,
) -> (ConsumerSettings, Scripted, Running) {
    settings.consumers[0].retry = retry;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let handler = Scripted::default();
    let running =
        Running::start(Worker::builder(settings).handler("scripted", handler.clone())).await;
    (consumer, handler, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_goes_to_the_shortest_delay_level_at_least_that_long() {
    let broker = TestBroker::connect().await;
    // Out of order on purpose: the level is chosen by length, not position.
    let delays = [
        Duration::from_millis(300),
        Duration::from_secs(4),
        Duration::from_millis(1_500),
    ];
    let settings = settings("retry-after", "scripted", fast_breaker());
    let (consumer, handler, running) =
        start(&broker, settings, RetrySettings::new(delays.to_vec())).await;
    for id in ["wait-1000-a", "wait-10-b", "wait-60000-c"] {
        broker
            .publish_raw(&consumer.queue, id, b"x", "text/plain")
            .await;
    }

    let settled = wait_until(Duration::from_secs(15), || {
        let s = running.stats.snapshot();
        s.succeeded == 2 && s.dead_lettered == 1
    })
    .await;
    let stats = running.stats.snapshot();
    let by_level = running.stats.delayed_by_level();
    running.stop().await;
    assert!(
        settled,
        "two messages retried and acked, one dead-lettered: {stats:?}"
    );
    assert_eq!(
        by_level,
        [1, 0, 1],
        "1 s goes to the 1.5 s level (index 2), 10 ms to the 300 ms level (index 0), none to 4 s"
    );
    let a = handler.seen("wait-1000-a");
    assert_eq!(
        a.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 2],
        "{a:?}"
    );
    let gap = a[1].at - a[0].at;
    assert!(
        gap >= Duration::from_millis(1_450),
        "retry_after 1 s waited in the 1.5 s level, not the 300 ms one its attempt would use: came back after {gap:?}"
    );
    let c = handler.seen("wait-60000-c");
    assert_eq!(c.len(), 1, "no level waits a minute: no retry: {c:?}");
    let dlq = broker.drain(&consumer.dead_letter_queue()).await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let error = dlq[0].header_str("rg-error").unwrap_or_default();
    assert_eq!(dlq[0].id, "wait-60000-c");
    assert_eq!(
        dlq[0].header_str("rg-reason").as_deref(),
        Some("retries-exhausted")
    );
    assert!(
        error.contains("429") && error.contains("retry_after 1m is longer than every retry delay"),
        "the dead letter says why: {error}"
    );
    for d in delays {
        assert_eq!(broker.ready(&consumer.delay_queue(d)).await, 0);
    }
    assert_eq!(broker.ready(&consumer.queue).await, 0);
    eprintln!("retry_after: 1 s came back after {gap:?}; levels {by_level:?}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_is_retried_but_not_counted_against_the_breaker() {
    let broker = TestBroker::connect().await;
    let mut breaker = fast_breaker();
    breaker.consecutive_failures = Some(3);
    let settings = settings("retry-kind", "scripted", breaker);
    let (consumer, handler, running) = start(
        &broker,
        settings,
        RetrySettings::new(vec![Duration::from_millis(300)]),
    )
    .await;
    let n = 30;
    for i in 0..n {
        broker
            .publish_raw(&consumer.queue, &format!("retry-{i}"), b"x", "text/plain")
            .await;
    }

    let done = wait_until(Duration::from_secs(15), || {
        running.stats.snapshot().succeeded == n
    })
    .await;
    let stats = running.stats.snapshot();
    let counts = running.breaker.call_counts();
    let transitions = running.transitions();
    let by_level = running.stats.delayed_by_level();
    running.stop().await;
    assert!(
        done,
        "every message succeeds on its second attempt: {stats:?}"
    );
    assert_eq!(
        by_level,
        [n],
        "each went through the delay level once: {stats:?}"
    );
    assert_eq!(stats.failed, 0, "no dependency failure: {stats:?}");
    assert_eq!(
        counts.failures, 0,
        "{n} retry errors, none against the breaker: {counts:?}"
    );
    assert!(
        transitions.is_empty(),
        "{n} retry errors with consecutive_failures = 3 and the breaker never moved: {transitions:?}"
    );
    assert_eq!(handler.calls(), 2 * n as usize);
    assert_eq!(broker.ready(&consumer.queue).await, 0);
    assert_eq!(broker.ready(&consumer.dead_letter_queue()).await, 0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_retries_run_in_the_same_delivery_before_a_delay_level() {
    let broker = TestBroker::connect().await;
    let settings = settings("immediate", "scripted", fast_breaker());
    let (consumer, handler, running) = start(
        &broker,
        settings,
        RetrySettings::new(vec![Duration::from_millis(300)]).with_immediate(2),
    )
    .await;
    broker
        .publish_raw(&consumer.queue, "fail2-a", b"x", "text/plain")
        .await;
    broker
        .publish_raw(&consumer.queue, "first-b", b"x", "text/plain")
        .await;
    // Healthy neighbours keep the breaker's failure rate low.
    for i in 0..20 {
        broker
            .publish_raw(&consumer.queue, &format!("ok-{i}"), b"x", "text/plain")
            .await;
    }

    let done = wait_until(Duration::from_secs(15), || {
        running.stats.snapshot().succeeded == 22
    })
    .await;
    let stats = running.stats.snapshot();
    let by_level = running.stats.delayed_by_level();
    let state = running.state();
    running.stop().await;
    assert!(done, "every message is acked in the end: {stats:?}");
    assert_eq!(state, BreakerState::Closed);
    let a = handler.seen("fail2-a");
    assert_eq!(
        a.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 1, 1],
        "two failures, two immediate retries, the third call succeeds, all attempt 1: {a:?}"
    );
    let b = handler.seen("first-b");
    assert_eq!(
        b.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 1, 1, 2],
        "1 + 2 immediate retries fail, then the delay level, then attempt 2: {b:?}"
    );
    assert!(
        b[3].at - b[2].at >= Duration::from_millis(250),
        "attempt 2 came after the 300 ms delay: {b:?}"
    );
    assert_eq!(stats.immediate_retries, 4, "{stats:?}");
    assert_eq!(by_level, [1], "only first-b waited in a delay level");
    assert_eq!(stats.failed, 5, "each failed call counts: {stats:?}");
    assert_eq!(broker.ready(&consumer.queue).await, 0);
    assert_eq!(broker.ready(&consumer.dead_letter_queue()).await, 0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_retries_stop_when_the_breaker_opens_and_nothing_is_lost() {
    let broker = TestBroker::connect().await;
    let mut breaker = fast_breaker();
    breaker.consecutive_failures = Some(2);
    breaker.open_timeout = Duration::from_secs(30);
    breaker.max_open_timeout = Duration::from_secs(30);
    let mut settings = settings("immediate-open", "scripted", breaker);
    settings.consumers[0].concurrency = 1;
    settings.consumers[0].prefetch = 1;
    let (consumer, handler, running) = start(
        &broker,
        settings,
        RetrySettings::new(vec![Duration::from_secs(60)]).with_immediate(5),
    )
    .await;
    broker
        .publish_raw(&consumer.queue, "always-a", b"x", "text/plain")
        .await;

    let deferred = wait_until(Duration::from_secs(10), || {
        running.stats.snapshot().deferred == 1
    })
    .await;
    let stats = running.stats.snapshot();
    let state = running.state();
    running.stop().await;
    assert!(
        deferred,
        "the message is put back (an outage), not retried on: {stats:?}"
    );
    assert!(
        matches!(state, BreakerState::Open { .. }),
        "two consecutive failures open it: {state:?}"
    );
    let calls = handler.seen("always-a").len();
    assert_eq!(
        calls, 2,
        "immediate = 5, but the breaker opened after 2 calls: retrying stopped"
    );
    assert_eq!(stats.immediate_retries, 1, "{stats:?}");
    let waiting = broker
        .drain(&consumer.delay_queue(Duration::from_secs(60)))
        .await;
    let ready = broker.ready(&consumer.queue).await;
    let dead = broker.ready(&consumer.dead_letter_queue()).await;
    assert_eq!(
        (waiting.len(), ready, dead),
        (1, 0, 0),
        "the message waits in its delay level, once: {waiting:?}"
    );
    assert_eq!(waiting[0].id, "always-a");
    assert_eq!(
        waiting[0].header_u64("rg-attempt"),
        Some(1),
        "an outage does not use up an attempt"
    );
    broker.cleanup().await;
}
