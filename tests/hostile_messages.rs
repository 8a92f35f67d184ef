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
use rabbit_guard::lapin;

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
    run_dlq(settings, &["list", "--json"])
}

fn run_dlq(settings: &rabbit_guard::config::Settings, args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
    let out = std::process::Command::new(cli_binary())
        .arg("dlq")
        .args(args)
        .arg("--config")
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
    // The dead letter keeps the header's first 100 levels; `dlq show` says
    // where it was cut.
    let (ok, shown, stderr) = run_dlq(&settings, &["show", "deep"]);
    assert!(
        ok && shown.contains("note: part of the headers could not be read and was cut")
            && shown.contains("x-amqp-unreadable"),
        "dlq show notes the cut: {shown}{stderr}"
    );
    let (_, json, _) = run_dlq(&settings, &["show", "deep", "--json"]);
    assert!(
        json.contains("\"unreadable_headers\":\"")
            && json.contains("nested deeper than 100 levels"),
        "dlq show --json says why: {}",
        &json[..json.len().min(400)]
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

/// Fails by message id: `perm` permanently, `once-*` transiently on the
/// first call, `always-*` transiently every time; the rest succeed.
/// Records every call with the `rg-deferrals` header it carried.
#[derive(Clone, Default)]
struct Scripted {
    calls: Arc<Mutex<Vec<Seen>>>,
}

/// A call: message id, its `rg-deferrals`, and whether it was redelivered.
type Seen = (String, Option<u64>, bool);

impl Scripted {
    fn count(&self, id: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _, _)| i == id)
            .count()
    }
}

impl Handler for Scripted {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        let id = ctx.message_id().unwrap_or("-").to_owned();
        let deferrals = ctx.header("rg-deferrals").and_then(|v| match v {
            lapin::types::AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            _ => None,
        });
        let seen = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((id.clone(), deferrals, ctx.redelivered()));
            calls.iter().filter(|(i, _, _)| *i == id).count()
        };
        if id == "perm" {
            Err(HandlerError::permanent("bad message"))
        } else if id.starts_with("always-") || (id.starts_with("once-") && seen == 1) {
            Err(HandlerError::transient("dependency failed"))
        } else {
            Ok(())
        }
    }
}

fn headers(entries: Vec<(&str, lapin::types::AMQPValue)>) -> lapin::types::FieldTable {
    let mut t = lapin::types::FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

fn queues(names: &[&str]) -> lapin::types::AMQPValue {
    let mut a = lapin::types::FieldArray::default();
    for n in names {
        a.push(lapin::types::AMQPValue::LongString((*n).into()));
    }
    lapin::types::AMQPValue::FieldArray(a)
}

async fn publish_with(broker: &TestBroker, queue: &str, id: &str, table: lapin::types::FieldTable) {
    broker.publish_with_headers(queue, id, table, b"{}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_and_bcc_headers_are_not_carried_into_copies() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("cc", "scripted", fast_breaker());
    settings.consumers[0].retry.delays = vec![Duration::from_millis(300)];
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let q = consumer.queue.clone();
    let side = unique("cc-side");
    broker.track_queue(&side);
    broker
        .channel
        .queue_declare(
            side.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    // Both messages name the work queue itself and a side queue. Copies
    // that kept the headers were routed again to each: a permanent failure
    // came back forever, and each retry was handled once more at once.
    for id in ["perm", "once-1"] {
        publish_with(
            &broker,
            &q,
            id,
            headers(vec![
                ("CC", queues(&[&q, &side])),
                ("BCC", queues(&[&side])),
            ]),
        )
        .await;
    }
    let handler = Scripted::default();
    let running =
        Running::start(Worker::builder(settings.clone()).handler("scripted", handler.clone()))
            .await;
    let dlq = consumer.dead_letter_queue();
    let settled = wait_until_async(Duration::from_secs(10), || async {
        handler.count("once-1") >= 2 && broker.ready(&dlq).await >= 1
    })
    .await;
    assert!(
        settled,
        "perm dead-lettered and once-1 retried: calls {:?}",
        handler.calls.lock().unwrap()
    );
    // Nothing more may arrive: watch for three delay periods.
    let more = wait_until(Duration::from_millis(900), || {
        handler.count("perm") > 1 || handler.count("once-1") > 2
    })
    .await;
    let (perm, once) = (handler.count("perm"), handler.count("once-1"));
    assert!(
        !more && perm == 1 && once == 2,
        "each copy must reach one queue: perm handled {perm} times (want 1), once-1 {once} times (want 2)"
    );
    running.stop().await;
    assert_eq!(broker.ready(&dlq).await, 1, "one dead letter");
    // The side queue got what the publisher sent it (two originals, via CC
    // and BCC), and no copy.
    let side_got = broker.drain(&side).await.len();
    assert_eq!(side_got, 2, "the side queue holds only the originals");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_attempt_beyond_the_last_level_starts_over_instead_of_skipping_retries() {
    let broker = Arc::new(TestBroker::connect().await);
    let mut settings = settings("forged", "scripted", fast_breaker());
    settings.consumers[0].retry.delays =
        vec![Duration::from_millis(200), Duration::from_millis(300)];
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let q = consumer.queue.clone();
    publish_with(
        &broker,
        &q,
        "always-forged",
        headers(vec![(
            "rg-attempt",
            lapin::types::AMQPValue::LongLongInt(99),
        )]),
    )
    .await;
    let handler = Scripted::default();
    let running =
        Running::start(Worker::builder(settings.clone()).handler("scripted", handler.clone()))
            .await;
    // Healthy neighbours, so the last attempt's failure is the message's.
    let trickle = {
        let broker = broker.clone();
        let q = q.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                broker.publish_json(&q, &format!("ok{i}"), 1).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let dlq = consumer.dead_letter_queue();
    let dead = wait_until_async(Duration::from_secs(10), || async {
        broker.ready(&dlq).await >= 1
    })
    .await;
    trickle.abort();
    running.stop().await;
    let calls = handler.count("always-forged");
    assert!(dead, "the message ends in the dead-letter queue");
    assert_eq!(
        calls, 3,
        "rg-attempt = 99 with 2 delay levels: the message gets its 3 attempts, not 1 (got {calls})"
    );
    let letters = broker.drain(&dlq).await;
    assert_eq!(letters[0].header_u64("rg-attempt"), Some(3));
    assert_eq!(
        letters[0].header_str("rg-reason").as_deref(),
        Some("retries-exhausted")
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_deferral_count_saturates_instead_of_panicking() {
    let broker = TestBroker::connect().await;
    let mut breaker = fast_breaker();
    breaker.consecutive_failures = Some(1);
    let settings = settings("deferrals", "scripted", breaker);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let q = consumer.queue.clone();
    // The failure trips the breaker, so the message is deferred: its
    // rg-deferrals + 1 overflowed a u32 and the task panicked.
    publish_with(
        &broker,
        &q,
        "once-deferred",
        headers(vec![(
            "rg-deferrals",
            lapin::types::AMQPValue::LongLongInt(i64::from(u32::MAX)),
        )]),
    )
    .await;
    let handler = Scripted::default();
    let running =
        Running::start(Worker::builder(settings.clone()).handler("scripted", handler.clone()))
            .await;
    let done = wait_until(Duration::from_secs(10), || {
        handler.count("once-deferred") >= 2
    })
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    let calls = handler.calls.lock().unwrap().clone();
    assert!(done, "the message comes back after its deferral: {calls:?}");
    assert_eq!(
        (stats.deferred, stats.requeued),
        (1, 0),
        "deferred once through the delay queue, never requeued by a panic: {stats:?}"
    );
    assert_eq!(
        calls[1].1,
        Some(u64::from(u32::MAX)),
        "the count stays at its ceiling: {calls:?}"
    );
    assert_eq!(broker.ready(&q).await, 0);
    broker.cleanup().await;
}
