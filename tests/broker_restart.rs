//! A real broker restart (`rabbitmqctl stop_app` / `start_app`) in the middle
//! of a stream: the worker reconnects by itself and loses nothing. It stops
//! the shared broker for a few seconds, so it lives alone in its own test
//! binary, and a guard restarts the broker even when the test fails.
#![allow(clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use tokio::time::Instant;

struct Stopped;

impl Stopped {
    fn broker() -> Self {
        let ok = rabbitmqctl().arg("stop_app").status().expect("rabbitmqctl");
        assert!(ok.success(), "rabbitmqctl stop_app failed: {ok}");
        Self
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = rabbitmqctl().arg("start_app").status();
        let _ = rabbitmqctl()
            .args(["await_startup", "--timeout", "60"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Slow(Duration::from_millis(10)));
    let mut settings = with_http(settings("restart", "http", fast_breaker()), &downstream);
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.broker.reconnect.max_delay = Duration::from_secs(1);
    settings.consumers[0].concurrency = 16;
    settings.consumers[0].prefetch = 64;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "r", 3_000).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(30), || downstream.call_count() >= 500).await,
        "at least 500 calls should be made within 30 s before the restart: {} were; {:?}",
        downstream.call_count(),
        running.stats.snapshot()
    );

    let stopped_at = Instant::now();
    let stopped = Stopped::broker();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(stopped); // start_app, await_startup
    let back_after = stopped_at.elapsed();
    assert!(
        wait_until(Duration::from_secs(30), || running
            .stats
            .snapshot()
            .subscriptions
            >= 2)
        .await,
        "the worker should reconnect and resubscribe after the restart: {:?}",
        running.stats.snapshot()
    );
    let resubscribed_after = stopped_at.elapsed();
    assert!(
        wait_until(Duration::from_secs(60), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "{} of {} processed after the restart",
        downstream.succeeded_ids().len(),
        ids.len()
    );
    let stats = running.stats.snapshot();
    running.stop().await;
    // The test's own connection died with the broker: use a new one.
    let after = TestBroker::connect().await;
    assert_eq!(
        after.ready(&consumer.queue).await,
        0,
        "work queue empty after the restart"
    );
    assert_eq!(
        after.ready(&consumer.dead_letter_queue()).await,
        0,
        "a restart must not dead-letter anything"
    );
    let calls = downstream
        .calls()
        .into_iter()
        .filter(|c| c.status == 200)
        .count();
    eprintln!(
        "restart: broker back after {back_after:?}, worker resubscribed after {resubscribed_after:?}, \
         {} processed, {} duplicates, {stats:?}",
        ids.len(),
        calls - ids.len()
    );
    after.track(&consumer);
    after.cleanup().await;
}
