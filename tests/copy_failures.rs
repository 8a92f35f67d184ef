//! A copy the broker will not store (its dead-letter queue deleted) must
//! not turn one bad message into a hot loop: the original waits, unacked,
//! while the copy is retried with backoff; the worker says so once, on
//! `/readyz` and in its metrics; and when the queue is back, the copy lands.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::time::Duration;

use common::proxy::free_port;
use common::*;
use rabbit_guard::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use rabbit_guard::lapin::types::FieldTable;

fn warn_lines(log: &str, needle: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains(needle))
        .count()
}

async fn readyz(base: &str) -> (u16, String) {
    match reqwest::get(format!("{base}/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = common::prom::parse(&text).unwrap();
    common::prom::value(&samples, name, &[]).unwrap_or(0.0)
}

async fn delete_queue(broker: &TestBroker, name: &str) {
    broker
        .channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_queue_is_retried_with_backoff_not_in_a_hot_loop() {
    let broker = TestBroker::connect().await;
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    downstream.rule("bad", Rule::Status(422));
    let mut settings = with_http(settings("nodlq", "http", fast_breaker()), &downstream);
    let port = free_port();
    settings.admin.listen = Some(format!("127.0.0.1:{port}"));
    let base = format!("http://127.0.0.1:{port}");
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    // The worker only checks the topology, so it cannot re-create the
    // dead-letter queue once it is gone.
    settings.consumers[0].declare = rabbit_guard::config::Declare::Passive;
    let mut worker = Child::spawn(&settings, &["run"]);
    let q = consumer.queue.clone();
    assert!(
        wait_until_async(Duration::from_secs(15), || async {
            broker.consumers(&q).await == 1
        })
        .await,
        "worker subscribed: {}",
        worker.stderr()
    );
    let dlq = consumer.dead_letter_queue();
    delete_queue(&broker, &dlq).await;

    broker
        .publish_raw(&q, "bad", b"{}", "application/json")
        .await;
    let good = broker.publish_json(&q, "good", 20).await;
    // Six seconds of a copy that cannot be stored.
    let watched = tokio::time::Instant::now();
    let unready = wait_until_async(Duration::from_secs(6), || async {
        readyz(&base).await.0 == 503
    })
    .await;
    let (code, body) = readyz(&base).await;
    let waiting = metric(&base, "rabbit_guard_copies_waiting").await;
    let failures = metric(&base, "rabbit_guard_copy_failures_total").await;
    tokio::time::sleep_until(watched + Duration::from_secs(6)).await;
    let calls = downstream.calls();
    let bad_calls = calls.iter().filter(|c| c.id == "bad").count();
    let log = worker.stderr();
    let warns = warn_lines(&log, "cannot store copies");
    assert_eq!(
        bad_calls, 1,
        "the bad message is handled once while its copy waits (was ~5,000 calls in 6 s)"
    );
    assert!(
        good.iter().all(|id| calls.iter().any(|c| &c.id == id)),
        "the good messages behind it are handled meanwhile"
    );
    assert!(
        unready && code == 503 && body.contains("fail") && body.contains(&dlq),
        "/readyz says why ({code}): {body}"
    );
    assert!(
        waiting == 1.0 && failures >= 1.0,
        "metrics show it: copies_waiting {waiting}, copy_failures_total {failures}"
    );
    assert_eq!(
        warns, 1,
        "one warning for the episode, not one per attempt:\n{log}"
    );

    // The queue is back: the copy lands, the original is acked.
    broker
        .channel
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker
        .channel
        .queue_bind(
            dlq.as_str().into(),
            consumer.dead_letter_exchange().as_str().into(),
            dlq.as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let landed = wait_until_async(Duration::from_secs(20), || async {
        broker.ready(&dlq).await == 1 && readyz(&base).await.0 == 200
    })
    .await;
    assert!(
        landed,
        "the copy lands within the backoff and /readyz recovers: {:?}\n{}",
        readyz(&base).await,
        worker.stderr()
    );
    worker.signal("TERM");
    assert!(worker.wait(Duration::from_secs(20)).await.is_some());
    assert_eq!(broker.ready(&q).await, 0, "nothing left in the work queue");
    let letters = broker.drain(&dlq).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, "bad");
    assert!(
        worker.stderr().contains("copies are stored again"),
        "the recovery is logged"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dead_letter_queue_is_declared_again_when_the_worker_declares_it() {
    let broker = TestBroker::connect().await;
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    downstream.rule("bad", Rule::Status(422));
    let settings = with_http(settings("redeclare", "http", fast_breaker()), &downstream);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let running = Running::start(rabbit_guard::Worker::builder(settings.clone())).await;
    let dlq = consumer.dead_letter_queue();
    delete_queue(&broker, &dlq).await;
    broker
        .channel
        .exchange_delete(
            consumer.dead_letter_exchange().as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    broker
        .publish_raw(&consumer.queue, "bad", b"{}", "application/json")
        .await;
    let landed = wait_until_async(Duration::from_secs(10), || async {
        broker.ready_if_exists(&dlq).await == Some(1)
    })
    .await;
    // The copy can show in the queue a moment before its confirm is counted.
    wait_until(Duration::from_secs(5), || {
        running.stats.snapshot().dead_lettered == 1
    })
    .await;
    let bad_calls = downstream.calls().iter().filter(|c| c.id == "bad").count();
    let stats = running.stats.snapshot();
    running.stop().await;
    assert!(
        landed,
        "the exchange and queue are declared again and the dead letter lands: {stats:?}"
    );
    assert_eq!(bad_calls, 1, "handled once");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    broker.cleanup().await;
}
