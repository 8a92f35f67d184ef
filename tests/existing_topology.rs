//! Attaching to queues someone else declared (`declare = "full"`,
//! `"policy"`, `"passive"`) and binding the work queue to exchanges, against
//! the real broker, with messages counted end to end.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rabbit_guard::Topology;
use rabbit_guard::Worker;
use rabbit_guard::config::{
    Binding, ConsumerSettings, Declare, ExchangeType, RetrySettings, Settings,
};
use rabbit_guard::handler::{Context, HandlerError, handler_fn};
use rabbit_guard::lapin::BasicProperties;
use rabbit_guard::lapin::options::BasicPublishOptions;
use rabbit_guard::lapin::types::{AMQPValue, FieldTable, ShortString};

/// "bad-…" is permanent, "flaky-…" fails its first attempt, the rest succeed.
fn handler() -> impl rabbit_guard::handler::Handler {
    handler_fn(|_body: Vec<u8>, ctx: Context| async move {
        let id = ctx.message_id().unwrap_or_default();
        if id.starts_with("bad-") {
            Err(HandlerError::permanent("bad order"))
        } else if id.starts_with("flaky-") && ctx.attempt() == 1 {
            Err(HandlerError::transient("503"))
        } else {
            Ok(())
        }
    })
}

fn settings_for(prefix: &str, declare: Declare) -> Settings {
    let mut s = settings(prefix, "script", fast_breaker());
    s.consumers[0].declare = declare;
    s.consumers[0].retry = RetrySettings::new(vec![Duration::from_millis(300)]);
    s
}

/// Declares the work queue as "another team" would: other arguments, no
/// dead-lettering.
async fn declare_foreign_queue(broker: &TestBroker, queue: &str) {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(100_000));
    broker.declare_queue(queue, args).await;
}

async fn publish_mix(broker: &TestBroker, queue: &str) {
    for i in 0..8 {
        broker
            .publish_raw(queue, &format!("ok-{i}"), b"{}", "application/json")
            .await;
    }
    broker
        .publish_raw(queue, "bad-1", b"{}", "application/json")
        .await;
    broker
        .publish_raw(queue, "flaky-1", b"{}", "application/json")
        .await;
}

/// The queue's arguments as `rabbitmqctl list_queues` shows them.
fn queue_arguments(queue: &str) -> String {
    let out = rabbitmqctl()
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "arguments",
        ])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_default()
        .to_owned()
}

/// Runs the mix through a worker and checks every message's fate.
async fn consume_the_mix(broker: &TestBroker, settings: Settings, consumer: &ConsumerSettings) {
    let running = Running::start(Worker::builder(settings).handler("script", handler())).await;
    publish_mix(broker, &consumer.queue).await;
    let settled = wait_until(Duration::from_secs(15), || {
        let s = running.stats.snapshot();
        s.succeeded == 9 && s.dead_lettered == 1
    })
    .await;
    let stats = running.stats.snapshot();
    let by_level = running.stats.delayed_by_level();
    running.stop().await;
    assert!(settled, "9 acked, 1 dead-lettered: {stats:?}");
    assert_eq!(by_level, [1], "flaky-1 went through the delay queue once");
    assert_eq!(
        broker.ready(&consumer.queue).await,
        0,
        "nothing left behind"
    );
    let dlq = broker.drain(&consumer.dead_letter_queue()).await;
    assert_eq!(
        dlq.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["bad-1"]
    );
    assert_eq!(
        broker
            .ready(&consumer.delay_queue(Duration::from_millis(300)))
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_refuses_a_foreign_queue_says_what_to_do_and_touches_nothing() {
    let broker = TestBroker::connect().await;
    let settings = settings_for("topo-full", Declare::Full);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    declare_foreign_queue(&broker, &consumer.queue).await;
    publish_mix(&broker, &consumer.queue).await;

    init_logs();
    let worker = Worker::builder(settings)
        .handler("script", handler())
        .build()
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), worker.run()).await;
    let err = result.expect("the worker stops at once").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("x-dead-letter-exchange") || text.contains("inequivalent arg"),
        "names the differing argument: {text}"
    );
    assert!(
        text.contains("declare = \"policy\""),
        "says what to do: {text}"
    );
    assert_eq!(
        broker.ready(&consumer.queue).await,
        10,
        "the queue and its messages are untouched"
    );
    assert!(queue_arguments(&consumer.queue).contains("x-max-length"));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_keeps_a_foreign_queues_arguments_and_its_printed_policy_dead_letters() {
    let broker = TestBroker::connect().await;
    let settings = settings_for("topo-policy", Declare::Policy);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    declare_foreign_queue(&broker, &consumer.queue).await;

    consume_the_mix(&broker, settings.clone(), &consumer).await;
    let arguments = queue_arguments(&consumer.queue);
    assert!(
        arguments.contains("x-max-length") && !arguments.contains("x-dead-letter-exchange"),
        "the work queue keeps its own arguments: {arguments}"
    );

    // The policy check-config prints gives it the broker-side dead-lettering.
    let advice = rabbit_guard::worker::safety::advisories(&settings)
        .into_iter()
        .find(|a| a.contains("rabbitmqctl set_policy"))
        .expect("the policy is printed");
    let printed = &advice[advice.find("rabbitmqctl set_policy").unwrap()..];
    // Run as printed, through the rabbitmqctl of the broker under test.
    let ctl = std::env::var("RABBITMQCTL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "rabbitmqctl".to_owned());
    let command = &printed.replacen("rabbitmqctl", &ctl, 1);
    let name = format!("rabbit-guard.{}", consumer.queue);
    let status = std::process::Command::new("sh")
        .args(["-c", command])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{command}");
    // A message that expires in the queue (no consumer now) is dead-lettered
    // by the broker through the policy.
    broker
        .channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(consumer.queue.as_str()),
            BasicPublishOptions::default(),
            b"late",
            BasicProperties::default()
                .with_message_id("expired-1".into())
                .with_expiration("1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq = consumer.dead_letter_queue();
    let arrived = wait_until_async(Duration::from_secs(10), || async {
        broker.ready(&dlq).await == 1
    })
    .await;
    let _ = rabbitmqctl().args(["clear_policy", &name]).output();
    assert!(arrived, "the expired message reached the DLQ by the policy");
    let dead = broker.drain(&dlq).await;
    assert_eq!(dead[0].id, "expired-1");
    assert!(dead[0].headers.contains_key("x-death"), "{dead:?}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_consumes_an_existing_topology_and_refuses_a_missing_part() {
    let broker = TestBroker::connect().await;
    let settings = settings_for("topo-passive", Declare::Passive);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    declare_foreign_queue(&broker, &consumer.queue).await;

    // Nothing but the work queue exists: refused at startup, nothing consumed.
    broker
        .publish_raw(&consumer.queue, "early", b"{}", "application/json")
        .await;
    let worker = Worker::builder(settings.clone())
        .handler("script", handler())
        .build()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), worker.run())
        .await
        .expect("stops at once")
        .unwrap_err();
    assert!(err.to_string().contains("declare = \"full\""), "{err}");
    assert_eq!(broker.ready(&consumer.queue).await, 1, "untouched");
    broker.drain(&consumer.queue).await;

    // Someone declares the rest (here: the policy mode's declarations).
    let mut rest = consumer.clone();
    rest.declare = Declare::Policy;
    let ch = broker.connection.create_channel().await.unwrap();
    Topology::of(0, &rest).declare(&ch).await.unwrap();
    consume_the_mix(&broker, settings, &consumer).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_route_what_matches_a_topic_and_a_headers_exchange() {
    let broker = TestBroker::connect().await;
    let mut settings = settings_for("topo-bind", Declare::Full);
    let topic = unique("orders-topic");
    let headers = unique("orders-headers");
    broker.track_exchange(&topic);
    broker.track_exchange(&headers);
    settings.consumers[0].bind = vec![
        Binding::new(topic.clone(), ExchangeType::Topic, "order.created.*"),
        Binding::new(headers.clone(), ExchangeType::Headers, "").with_arguments(BTreeMap::from([
            ("x-match".to_owned(), "all".into()),
            ("region".to_owned(), "eu".into()),
        ])),
    ];
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let running = Running::start(Worker::builder(settings).handler("script", handler())).await;
    let publish = |exchange: String, key: &'static str, id: String, region: &'static str| {
        let channel = broker.channel.clone();
        async move {
            let mut h = FieldTable::default();
            h.insert("region".into(), AMQPValue::LongString(region.into()));
            let confirm = channel
                .basic_publish(
                    ShortString::from(exchange.as_str()),
                    ShortString::from(key),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default()
                        .with_message_id(id.as_str().into())
                        .with_headers(h),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
    };
    // What must not be routed first, then what must, then a last match: the
    // queue keeps one channel's order, so once the last is handled anything
    // routed before it has arrived too.
    for i in 0..3 {
        publish(
            topic.clone(),
            "order.deleted.eu",
            format!("t-deleted-{i}"),
            "eu",
        )
        .await;
        publish(headers.clone(), "", format!("h-us-{i}"), "us").await;
    }
    for i in 0..3 {
        publish(
            topic.clone(),
            "order.created.eu",
            format!("t-created-{i}"),
            "eu",
        )
        .await;
        publish(headers.clone(), "", format!("h-eu-{i}"), "eu").await;
    }
    publish(
        topic.clone(),
        "order.created.us",
        "t-created-last".into(),
        "us",
    )
    .await;
    let got = wait_until(Duration::from_secs(10), || {
        running.stats.snapshot().succeeded == 7
    })
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert!(got, "4 topic and 3 header matches: {stats:?}");
    assert_eq!(
        stats.received, 7,
        "deleted orders and the us region are not routed: {stats:?}"
    );
    assert_eq!(broker.ready(&consumer.queue).await, 0);
    broker.cleanup().await;
}
