//! A quorum dead-letter queue keeps its dead letters however often they
//! are read: RabbitMQ 4.0+ counts every return of a browsed message as a
//! delivery and drops a quorum queue's message after 20 by default, so the
//! dead-letter queue is declared with a delivery limit of its own; one that
//! an older version declared without it is kept, with a warning.
#![allow(clippy::print_stderr)]

mod common;

use std::time::Duration;

use common::dlq_cli::Cli;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::QueueType;
use rabbit_guard::lapin::types::{AMQPValue, FieldTable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_being_listed_more_times_than_the_brokers_default_limit() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("qdlq-reads", "noop", fast_breaker());
    settings.consumers[0].queue_type = QueueType::Quorum;
    settings.consumers[0].delivery_limit = Some(1_000);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let dlq = consumer.dead_letter_queue();
    let ids = broker.publish_json(&dlq, "dead", 3).await;
    let cli = Cli::new(&settings);
    let reads = 25;
    for i in 0..reads {
        let listed = cli.json(&[]);
        assert_eq!(
            listed.len(),
            ids.len(),
            "read {} of {reads}: every dead letter is still listed",
            i + 1
        );
    }
    assert_eq!(
        broker.ready(&dlq).await,
        3,
        "after {reads} reads (the broker's default limit is 20 on RabbitMQ 4) none was dropped"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_declared_without_a_limit_is_kept_with_a_warning() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("qdlq-old", "noop", fast_breaker());
    settings.consumers[0].queue_type = QueueType::Quorum;
    settings.consumers[0].delivery_limit = Some(1_000);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    // As an older rabbit-guard declared it: quorum, no delivery limit.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    broker
        .declare_queue(&consumer.dead_letter_queue(), args)
        .await;
    let running = Running::start(Worker::builder(settings)).await;
    let ids = broker.publish_json(&consumer.queue, "m", 5).await;
    let done = wait_until(Duration::from_secs(10), || {
        running.stats.snapshot().succeeded == ids.len() as u64
    })
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert!(
        done,
        "the worker starts on the old dead-letter queue and consumes: {stats:?}"
    );
    let policy = rabbit_guard::Topology::of(0, &consumer).dead_letter_limit_policy();
    assert!(
        policy.contains("set_policy")
            && policy.contains("delivery-limit")
            && policy.contains(&consumer.dead_letter_queue()),
        "the warning's fix names the queue and the limit: {policy}"
    );
    broker.cleanup().await;
}
