//! Graceful shutdown: stop consuming, finish running handlers, requeue the
//! rest, and make sure every ack reached the broker before closing.
#![allow(clippy::print_stderr)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::QueueType;
use rabbit_guard::handler::{Context, Handler, HandlerError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_50_in_flight_exits_0_and_loses_nothing() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Slow(Duration::from_millis(1_500)));
    let mut settings = with_http(settings("sigterm", "http", fast_breaker()), &downstream);
    settings.consumers[0].concurrency = 50;
    settings.consumers[0].prefetch = 100;
    settings.worker.shutdown_grace = Duration::from_secs(10);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "t", 200).await;

    let mut child = Child::spawn(&settings, &["run"]);
    assert!(
        wait_until(Duration::from_secs(20), || downstream.in_progress() >= 50).await,
        "50 handlers should be in flight, {} are; log:\n{}",
        downstream.in_progress(),
        child.stderr()
    );
    let done_before = downstream.call_count();
    let in_flight = downstream.in_progress();
    child.signal("TERM");
    let status = child.wait(Duration::from_secs(30)).await;
    let log = child.stderr();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "SIGTERM should exit 0; log:\n{log}"
    );

    let succeeded = downstream.succeeded_ids();
    let remaining: HashSet<String> = broker
        .drain(&consumer.queue)
        .await
        .into_iter()
        .map(|g| g.id)
        .collect();
    let lost: Vec<_> = ids
        .iter()
        .filter(|id| !succeeded.contains(*id) && !remaining.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} messages neither processed nor back in the queue: {lost:?}",
        lost.len()
    );
    let duplicates = succeeded.intersection(&remaining).count();
    assert_eq!(
        duplicates, 0,
        "a message acked after success must not come back after a clean exit"
    );
    assert!(
        succeeded.len() >= done_before + in_flight,
        "the running handlers finish within the grace period: {} succeeded, {done_before} had before SIGTERM and {in_flight} were in flight",
        succeeded.len()
    );
    assert_eq!(
        downstream.arrived_count(),
        downstream.call_count(),
        "no running handler may be cut off: {} calls arrived at the dependency, {} were answered",
        downstream.arrived_count(),
        downstream.call_count()
    );
    assert_eq!(
        broker.ready(&consumer.dead_letter_queue()).await,
        0,
        "a clean shutdown dead-letters nothing"
    );
    assert!(
        log.contains("consumer stopped"),
        "the log says the consumer stopped; log:\n{log}"
    );
    eprintln!(
        "sigterm: {in_flight} in flight at SIGTERM, {} processed, {} requeued, 0 lost, 0 duplicates",
        succeeded.len(),
        remaining.len()
    );
    broker.cleanup().await;
}

/// Records every message id it handled.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<HashSet<String>>>,
}

impl Handler for Recorder {
    type Message = ();

    async fn handle(&self, (): (), ctx: &Context) -> Result<(), HandlerError> {
        self.seen
            .lock()
            .unwrap()
            .insert(ctx.message_id().unwrap_or_default().to_owned());
        Ok(())
    }
}

async fn no_acked_message_reappears(queue_type: QueueType) {
    let broker = Arc::new(TestBroker::connect().await);
    for round in 0..3 {
        let mut settings = settings("settle", "recorder", fast_breaker());
        settings.consumers[0].queue_type = queue_type;
        settings.consumers[0].prefetch = 500;
        settings.consumers[0].concurrency = 32;
        let consumer = settings.consumers[0].clone();
        broker.track(&consumer);
        broker.declare(&consumer).await;
        let ids = broker.publish_json(&consumer.queue, "s", 3_000).await;
        let recorder = Recorder::default();
        let running =
            Running::start(Worker::builder(settings).handler("recorder", recorder.clone())).await;
        assert!(
            wait_until(Duration::from_secs(30), || recorder
                .seen
                .lock()
                .unwrap()
                .len()
                >= 1_000)
            .await,
            "round {round}: handled {} of 3000",
            recorder.seen.lock().unwrap().len()
        );
        let stats_arc = running.stats.clone();
        running.stop().await;
        let stats = stats_arc.snapshot();
        let handled = recorder.seen.lock().unwrap().clone();
        let remaining: HashSet<String> = broker
            .drain(&consumer.queue)
            .await
            .into_iter()
            .map(|g| g.id)
            .collect();
        let reappeared = handled.intersection(&remaining).count();
        let lost = ids
            .iter()
            .filter(|id| !handled.contains(*id) && !remaining.contains(*id))
            .count();
        assert_eq!(
            (reappeared, lost),
            (0, 0),
            "{queue_type:?} round {round}: {} handled and acked, {} back in the queue; {reappeared} acked messages reappeared, {lost} lost; {stats:?}",
            handled.len(),
            remaining.len()
        );
        eprintln!(
            "{queue_type:?} round {round}: {} acked before stop, {} left, none reappeared",
            handled.len(),
            remaining.len()
        );
        broker.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acked_message_reappears_after_a_clean_exit_classic() {
    no_acked_message_reappears(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acked_message_reappears_after_a_clean_exit_quorum() {
    no_acked_message_reappears(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_prefetch_of_instant_handlers_leaves_nothing_behind() {
    // Prefetch far above the batch a consumer takes from its buffer at once,
    // handlers that finish instantly: every delivery must be handled and
    // acked while the worker runs, none left waiting for a channel close.
    let broker = Arc::new(TestBroker::connect().await);
    let mut settings = settings("bigprefetch", "recorder", fast_breaker());
    settings.consumers[0].prefetch = 2_000;
    settings.consumers[0].concurrency = 64;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "p", 20_000).await;
    let recorder = Recorder::default();
    let running =
        Running::start(Worker::builder(settings).handler("recorder", recorder.clone())).await;
    let all = wait_until(Duration::from_secs(60), || {
        recorder.seen.lock().unwrap().len() == ids.len()
    })
    .await;
    let stats = running.stats.snapshot();
    assert!(
        all,
        "handled {} of {}: {stats:?}",
        recorder.seen.lock().unwrap().len(),
        ids.len()
    );
    assert_eq!(
        stats.received,
        ids.len() as u64,
        "no delivery left unread in the buffer: {stats:?}"
    );
    running.stop().await;
    assert_eq!(
        broker.ready(&consumer.queue).await,
        0,
        "nothing left in the work queue: {stats:?}"
    );
    broker.cleanup().await;
}
