//! Promise 1 through faults: connection cuts, broker-side closes, a broker
//! that is not there at startup, and kill -9. Every message ends processed,
//! dead-lettered with a reason, or still queued.
#![allow(clippy::print_stderr)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::proxy::{Fault, Proxy};
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::{BreakerConfig, BreakerState};
use rabbit_guard::config::Settings;
use tokio::time::Instant;

/// Settings for a worker that reaches the broker through `proxy`, with a
/// short heartbeat and reconnect backoff so faults are noticed quickly.
fn through(proxy: &Proxy, prefix: &str, handler: &str, breaker: BreakerConfig) -> Settings {
    let mut s = settings(prefix, handler, breaker);
    s.broker.url = proxy.url("?heartbeat=2").into();
    s.broker.reconnect.initial_delay = Duration::from_millis(200);
    s.broker.reconnect.max_delay = Duration::from_secs(1);
    s.broker.connect_timeout = Duration::from_secs(3);
    s
}

/// Every id processed with a 2xx or in the dead-letter queue; returns
/// (processed, dead-lettered, duplicates).
async fn account(
    broker: &TestBroker,
    downstream: &Downstream,
    dlq: &str,
    ids: &[String],
) -> (usize, usize, usize) {
    let calls = downstream.calls();
    let ok: Vec<&Call> = calls
        .iter()
        .filter(|c| (200..300).contains(&c.status))
        .collect();
    let succeeded: HashSet<&str> = ok.iter().map(|c| c.id.as_str()).collect();
    let dead: Vec<Got> = broker.drain(dlq).await;
    let dead_ids: HashSet<&str> = dead.iter().map(|g| g.id.as_str()).collect();
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !succeeded.contains(id.as_str()) && !dead_ids.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    for d in &dead {
        assert!(
            d.header_str("rg-reason").is_some(),
            "dead letter {} without a reason",
            d.id
        );
    }
    (succeeded.len(), dead.len(), ok.len() - succeeded.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_connection_with_500_in_flight_loses_nothing() {
    let broker = Arc::new(TestBroker::connect().await);
    let proxy = Proxy::start().await;
    let downstream = Downstream::start().await;
    downstream.set(Mode::Slow(Duration::from_millis(100)));
    let mut settings = with_http(through(&proxy, "cut", "http", fast_breaker()), &downstream);
    settings.consumers[0].prefetch = 500;
    settings.consumers[0].concurrency = 64;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "cut", 3_000).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let s = running.stats.snapshot();
            // Prefetch 500: the broker keeps the buffer full as acks free slots.
            downstream.call_count() >= 300 && s.received - s.succeeded >= 450
        })
        .await,
        "about 500 deliveries should be in flight: {:?}",
        running.stats.snapshot()
    );
    let in_flight = {
        let s = running.stats.snapshot();
        s.received - s.succeeded
    };
    let cut_at = Instant::now();
    proxy.cut_all();
    assert!(
        wait_until(Duration::from_secs(15), || running
            .stats
            .snapshot()
            .subscriptions
            >= 2)
        .await,
        "the worker should reconnect and resubscribe: {:?}",
        running.stats.snapshot()
    );
    let recovered_in = cut_at.elapsed();
    // Reconnect backoff starts at 200ms (max 1s), the consumer's at 100ms:
    // a few attempts at most.
    assert!(
        recovered_in < Duration::from_secs(5),
        "the worker should resubscribe within 5 s of the cut; it took {recovered_in:?}"
    );
    assert!(
        wait_until(Duration::from_secs(90), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "{} of {} processed after the cut",
        downstream.succeeded_ids().len(),
        ids.len()
    );
    let stats = running.stats.snapshot();
    running.stop().await;
    assert_eq!(
        broker.ready(&consumer.queue).await,
        0,
        "work queue empty after the cut: {stats:?}"
    );
    let (ok, dead, duplicates) =
        account(&broker, &downstream, &consumer.dead_letter_queue(), &ids).await;
    assert_eq!(dead, 0, "a connection cut must not dead-letter anything");
    assert!(
        stats.redelivered > 0,
        "unacked deliveries come back redelivered: {stats:?}"
    );
    // Settles for deliveries of the lost channel are dropped and counted,
    // never sent on the new channel (its delivery tags mean other messages).
    // (Deliveries kept arriving between the count above and the cut; the
    // prefetch of 500 bounds them.)
    assert!(
        stats.stale > 0 && stats.stale <= 500,
        "{} stale settles, {in_flight} in flight shortly before the cut, prefetch 500: {stats:?}",
        stats.stale
    );
    assert!(
        duplicates as u64 <= stats.stale,
        "only deliveries unsettled at the cut may be handled twice: {duplicates} duplicates, {} unsettled",
        stats.stale
    );
    eprintln!(
        "cut: {in_flight} in flight at the cut, resubscribed in {recovered_in:?}, {ok} processed, \
         {duplicates} duplicates, {} redelivered, {} stale settles dropped",
        stats.redelivered, stats.stale
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_broker_is_reopened() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Slow(Duration::from_millis(5)));
    let mut settings = with_http(settings("closed", "http", fast_breaker()), &downstream);
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.broker.reconnect.max_delay = Duration::from_secs(1);
    let name = settings.broker.connection_name.clone();
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "closed", 2_000).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(30), || downstream.call_count() >= 300).await,
        "at least 300 calls should be made within 30 s before the close: {} were; {:?}",
        downstream.call_count(),
        running.stats.snapshot()
    );
    let closed = close_connections_named(&format!("{name}/consume"), "closed by the recovery test")
        + close_connections_named(&format!("{name}/publish"), "closed by the recovery test");
    assert_eq!(
        closed, 2,
        "both worker connections should be found by name and closed"
    );
    assert!(
        wait_until(Duration::from_secs(15), || running
            .stats
            .snapshot()
            .subscriptions
            >= 2)
        .await,
        "the worker should reconnect and resubscribe: {:?}",
        running.stats.snapshot()
    );
    assert!(
        wait_until(Duration::from_secs(60), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "{} of {} processed",
        downstream.succeeded_ids().len(),
        ids.len()
    );
    running.stop().await;
    let (ok, dead, duplicates) =
        account(&broker, &downstream, &consumer.dead_letter_queue(), &ids).await;
    assert_eq!(
        dead, 0,
        "a broker-side close must not dead-letter anything ({ok} processed)"
    );
    eprintln!("broker close: {ok} processed, {duplicates} duplicates");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_cut_while_open_there_is_no_consumer_until_the_probe_time() {
    let broker = Arc::new(TestBroker::connect().await);
    let proxy = Proxy::start().await;
    let downstream = Downstream::start().await;
    downstream.set(Mode::Failing);
    let breaker = {
        let mut v = fast_breaker();
        v.open_timeout = Duration::from_secs(4);
        v.max_open_timeout = Duration::from_secs(8);
        v
    };
    let settings = with_http(through(&proxy, "open-cut", "http", breaker), &downstream);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "oc", 200).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            running.state(),
            BreakerState::Open { .. }
        ))
        .await,
        "breaker should open"
    );
    let BreakerState::Open { until } = running.state() else {
        unreachable!()
    };
    let accepted_before = proxy.accepted();
    proxy.cut_all();
    // The worker reconnects (its two connections) well before the probe time...
    assert!(
        wait_until(Duration::from_secs(3), || proxy.accepted()
            >= accepted_before + 2)
        .await,
        "the worker should reconnect within 3 s while the breaker is open: \
         {} connections accepted, {accepted_before} before the cut",
        proxy.accepted()
    );
    let reconnected_at = Instant::now();
    assert!(
        reconnected_at < until,
        "reconnected only after the open time; make open_timeout longer: \
         reconnected at {reconnected_at:?}, open until {until:?}"
    );
    // ...but subscribes to nothing until then.
    let mut samples = 0;
    while Instant::now() + Duration::from_millis(300) < until {
        let consumers = broker.consumers(&consumer.queue).await;
        assert_eq!(
            consumers,
            0,
            "a consumer appeared while the breaker was open, after reconnecting (sample {samples}, \
             {:?} before the probe time)",
            until.saturating_duration_since(Instant::now())
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        samples >= 5,
        "only {samples} samples between reconnect and probe time"
    );
    let calls_while_open = downstream
        .calls()
        .iter()
        .filter(|c| c.at > reconnected_at && c.at < until)
        .count();
    assert_eq!(calls_while_open, 0, "no calls while open");
    downstream.set(Mode::Healthy);
    assert!(
        wait_until(Duration::from_secs(30), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "after the probe succeeds everything is processed: {} of {}",
        downstream.succeeded_ids().len(),
        ids.len()
    );
    running.stop().await;
    let (_, dead, _) = account(&broker, &downstream, &consumer.dead_letter_queue(), &ids).await;
    assert_eq!(
        dead, 0,
        "an outage with a connection cut must not dead-letter anything"
    );
    eprintln!("open-cut: {samples} samples with no consumer between reconnect and probe time");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_connection_is_detected_by_heartbeat_and_replaced() {
    let broker = Arc::new(TestBroker::connect().await);
    let proxy = Proxy::start().await;
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let settings = with_http(
        through(&proxy, "blackhole", "http", fast_breaker()),
        &downstream,
    );
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let running = Running::start(Worker::builder(settings)).await;
    let first = broker.publish_json(&consumer.queue, "before", 50).await;
    assert!(
        wait_until(Duration::from_secs(10), || downstream.succeeded_ids().len()
            == first.len())
        .await,
        "all {} messages before the black hole should succeed within 10 s: {} did",
        first.len(),
        downstream.succeeded_ids().len()
    );
    proxy.set(Fault::BlackHole);
    let holed_at = Instant::now();
    let accepted_before = proxy.accepted();
    // Traffic published meanwhile (directly, not through the proxy) waits in the queue.
    let second = broker.publish_json(&consumer.queue, "during", 50).await;
    // Heartbeat 2s: the silent connection is declared dead after missed
    // beats, and the worker starts reconnecting (through the same hole).
    assert!(
        wait_until(Duration::from_secs(20), || proxy.accepted()
            > accepted_before)
        .await,
        "a silent connection must be noticed by its heartbeat within 20 s: \
         {} connections accepted, {accepted_before} before the black hole; {:?}",
        proxy.accepted(),
        running.stats.snapshot()
    );
    let detected_in = holed_at.elapsed();
    proxy.set(Fault::None);
    assert!(
        wait_until(Duration::from_secs(30), || downstream.succeeded_ids().len()
            == first.len() + second.len())
        .await,
        "messages published during the black hole are processed after recovery: \
         {} of {} succeeded within 30 s; {:?}",
        downstream.succeeded_ids().len(),
        first.len() + second.len(),
        running.stats.snapshot()
    );
    eprintln!(
        "black hole: noticed after {detected_in:?}, everything processed {:?} after it began",
        holed_at.elapsed()
    );
    running.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_the_broker_then_consumes() {
    let broker = Arc::new(TestBroker::connect().await);
    let proxy = Proxy::new(proxy::free_port());
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let mut settings = with_http(
        through(&proxy, "startup", "http", fast_breaker()),
        &downstream,
    );
    settings.broker.startup_timeout = Duration::from_secs(60);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "s", 20).await;
    let mut child = Child::spawn(&settings, &["run"]);
    let port = proxy.port;
    assert!(
        wait_until(Duration::from_secs(15), || {
            child
                .stderr()
                .lines()
                .filter(|l| l.contains("waiting for the broker"))
                .count()
                >= 3
        })
        .await,
        "the worker should log each attempt; log:\n{}",
        child.stderr()
    );
    let log = child.stderr();
    let waiting = log
        .lines()
        .find(|l| l.contains("waiting for the broker"))
        .unwrap();
    assert!(
        waiting.contains(&format!("127.0.0.1:{port}")),
        "names the address: {waiting}"
    );
    assert!(
        waiting.contains("guest:***@"),
        "masks the password: {waiting}"
    );
    assert!(
        !log.contains("guest:guest@"),
        "the password never appears:\n{log}"
    );
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "the worker keeps waiting, but exited: {:?}; log:\n{log}",
        child.child.try_wait()
    );
    proxy.listen().await;
    assert!(
        wait_until(Duration::from_secs(20), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "the worker consumes once the broker answers; log:\n{}",
        child.stderr()
    );
    child.signal("TERM");
    let status = child.wait(Duration::from_secs(20)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "log:\n{}",
        child.stderr()
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_twice_over_5000_messages_loses_nothing() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Slow(Duration::from_millis(10)));
    let mut settings = with_http(settings("crash", "http", fast_breaker()), &downstream);
    settings.consumers[0].concurrency = 16;
    settings.consumers[0].prefetch = 64;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "k", 5_000).await;
    let mut kills = Vec::new();
    for round in 0..2 {
        let mut child = Child::spawn(&settings, &["run"]);
        let start = downstream.call_count();
        // Kill somewhere between 300 and 1,300 calls into this run.
        let kill_after = 300 + random_below(1_000) as usize;
        assert!(
            wait_until(Duration::from_secs(60), || downstream.call_count()
                >= start + kill_after)
            .await,
            "round {round}: the worker made no progress; log:\n{}",
            child.stderr()
        );
        child.signal("KILL");
        let status = child.wait(Duration::from_secs(10)).await;
        assert!(
            status.is_some_and(|s| s.code().is_none()),
            "round {round}: killed by a signal within 10 s, got {status:?}"
        );
        kills.push(downstream.call_count());
    }
    let mut child = Child::spawn(&settings, &["run"]);
    let calls_before_last_run = downstream.call_count();
    assert!(
        wait_until(Duration::from_secs(120), || downstream
            .succeeded_ids()
            .len()
            == ids.len())
        .await,
        "{} of {} processed after two kills; log:\n{}",
        downstream.succeeded_ids().len(),
        ids.len(),
        child.stderr()
    );
    child.signal("TERM");
    assert_eq!(
        child
            .wait(Duration::from_secs(30))
            .await
            .and_then(|s| s.code()),
        Some(0),
        "SIGTERM should exit 0 within 30 s; log:\n{}",
        child.stderr()
    );
    // The default log level (info) has no line per message.
    let log = child.stderr();
    let handled = downstream.call_count() - calls_before_last_run;
    assert!(
        log.lines().count() < 50,
        "{} log lines for {handled} messages handled by the last run; log:\n{log}",
        log.lines().count()
    );
    assert_eq!(
        broker.ready(&consumer.queue).await,
        0,
        "work queue empty after the kills"
    );
    let (ok, dead, duplicates) =
        account(&broker, &downstream, &consumer.dead_letter_queue(), &ids).await;
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for c in downstream.calls().into_iter().filter(|c| c.status == 200) {
        *per_id.entry(c.id).or_default() += 1;
    }
    let most = per_id.values().max().copied().unwrap_or(0);
    eprintln!(
        "kill -9: killed after {kills:?} calls; {ok} processed, {dead} dead-lettered, {duplicates} duplicates \
         (at most {most} for one message), 0 lost"
    );
    // Duplicates come only from deliveries in flight at each kill.
    assert!(
        duplicates <= 2 * 64,
        "{duplicates} duplicates for two kills with prefetch 64"
    );
    broker.cleanup().await;
}
