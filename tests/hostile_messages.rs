//! Messages no well-behaved publisher sends: each must be handled or
//! dead-lettered, and the queue behind it must keep moving.
#![allow(clippy::print_stderr)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raw::{RawProps, RawPublisher, long_string, nested_headers, table};
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::handler::{Context, Handler, HandlerError};

/// Records the message id of every call and accepts everything.
#[derive(Clone, Default)]
struct Recording {
    ids: Arc<Mutex<Vec<String>>>,
}

impl Recording {
    fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }

    fn distinct(&self) -> BTreeSet<String> {
        self.ids().into_iter().collect()
    }
}

impl Handler for Recording {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        self.ids
            .lock()
            .unwrap()
            .push(ctx.message_id().unwrap_or("-").to_owned());
        Ok(())
    }
}

fn dlq_list_json(settings: &rabbit_guard::config::Settings) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["dlq", "list", "--json", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run rabbit-guard dlq list");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_nested_thousands_deep_is_dead_lettered_as_decode_and_the_queue_moves_on() {
    let broker = TestBroker::connect().await;
    let settings = settings("deep", "rec", fast_breaker());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let q = consumer.queue.clone();

    // 5,000 levels, about 30 KB: one header frame. Before the parser had a
    // depth limit this overflowed the stack of lapin's I/O thread and
    // aborted the process, and every restart aborted again.
    let mut raw = RawPublisher::connect(&amqp_addr()).expect("raw AMQP login");
    let headers = nested_headers(5_000);
    raw.publish(
        &q,
        &RawProps {
            message_id: Some(b"deep".to_vec()),
            headers: Some(headers),
            ..RawProps::default()
        },
        b"{}",
    )
    .expect("the broker takes the deep message");
    raw.close();
    let good = broker.publish_json(&q, "good", 20).await;

    let handler = Recording::default();
    let running =
        Running::start(Worker::builder(settings.clone()).handler("rec", handler.clone())).await;
    let dlq = consumer.dead_letter_queue();
    let done = wait_until_async(Duration::from_secs(15), || async {
        handler.distinct().len() >= good.len() && broker.ready(&dlq).await >= 1
    })
    .await;
    let subscriptions = running.stats.snapshot().subscriptions;
    let calls = handler.ids();
    assert!(
        done,
        "the 20 good messages behind the deep one should be handled ({} were) and the deep one dead-lettered ({} in the DLQ)",
        handler.distinct().len(),
        broker.ready(&dlq).await
    );
    assert!(
        !calls.iter().any(|id| id == "deep"),
        "the handler must not be called with unreadable headers: {calls:?}"
    );
    assert_eq!(
        subscriptions, 1,
        "the consume channel must not be lost over the message (subscriptions: {subscriptions})"
    );

    // The dead letter can be listed, and says why.
    let (ok, stdout, stderr) = dlq_list_json(&settings);
    assert!(
        ok,
        "dlq list must not fail on the deep dead letter: {stderr}"
    );
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("dlq list --json line is JSON ({e}): {stdout}"));
    assert_eq!(line["message_id"], "deep", "{line}");
    assert_eq!(line["reason"], "decode", "{line}");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("nested deeper than 100 levels"),
        "the error says what is wrong: {error}"
    );
    running.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_utf8_are_read_leniently_and_the_queue_moves_on() {
    let broker = TestBroker::connect().await;
    let settings = settings("utf8", "rec", fast_breaker());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let q = consumer.queue.clone();

    // A header name and a message id that are not UTF-8. Before, lapin
    // failed the whole frame, closed the connection, and got the same
    // message again on reconnect: the queue stalled behind it.
    let mut raw = RawPublisher::connect(&amqp_addr()).expect("raw AMQP login");
    raw.publish(
        &q,
        &RawProps {
            message_id: Some(b"bad-\xff\xfe-id".to_vec()),
            headers: Some(table(&[(b"k\xc3", long_string(b"v"))])),
            ..RawProps::default()
        },
        b"{}",
    )
    .expect("the broker takes the message");
    raw.close();
    let good = broker.publish_json(&q, "good", 20).await;

    let handler = Recording::default();
    let running =
        Running::start(Worker::builder(settings.clone()).handler("rec", handler.clone())).await;
    let done = wait_until(Duration::from_secs(15), || {
        handler.distinct().len() > good.len()
    })
    .await;
    let ids = handler.distinct();
    assert!(
        done,
        "all 21 messages should be handled, the odd one included; handled: {ids:?}"
    );
    assert!(
        ids.contains("bad-??-id"),
        "the id is read with one '?' per byte that is not UTF-8: {ids:?}"
    );
    let subscriptions = running.stats.snapshot().subscriptions;
    assert_eq!(
        subscriptions, 1,
        "the consume channel must not be lost over the message (subscriptions: {subscriptions})"
    );
    running.stop().await;
    let (ready, _) = broker.counts(&q).await;
    assert_eq!(ready, 0, "nothing left behind in {q}");
    broker.cleanup().await;
}
