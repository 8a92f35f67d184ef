//! What an operator sees: why handlers fail (without a flood), a span per
//! delivery that a handler's own logs are tied to, trace context in and out.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use rabbit_guard::lapin;
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Lines of `log` at `level` (text format) that contain every one of `words`.
fn lines_with(log: &str, level: &str, words: &[&str]) -> usize {
    log.lines()
        .filter(|l| l.contains(level) && words.iter().all(|w| l.contains(w)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_422s_is_a_handful_of_warn_lines_naming_422_and_every_failure_at_debug() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Status(422));
    for (level, per_failure) in [("info", false), ("info,rabbit_guard=debug", true)] {
        let mut settings = with_http(settings("flood422", "http", fast_breaker()), &downstream);
        settings.log.level = level.into();
        settings.consumers[0].prefetch = 100;
        settings.consumers[0].concurrency = 32;
        let consumer = settings.consumers[0].clone();
        broker.track(&consumer);
        broker.declare(&consumer).await;
        let ids = broker.publish_json(&consumer.queue, "flood", 500).await;
        let mut child = Child::spawn(&settings, &["run"]);
        let dlq = consumer.dead_letter_queue();
        let all_dead = wait_until_async(Duration::from_secs(30), || {
            let broker = broker.clone();
            let dlq = dlq.clone();
            async move { broker.ready(&dlq).await as usize >= 500 }
        })
        .await;
        assert!(
            all_dead,
            "all {} should be dead-lettered as permanent (422) within 30 s: {} are; log:\n{}",
            ids.len(),
            broker.ready(&dlq).await,
            child.stderr()
        );
        child.signal("TERM");
        let _ = child.wait(Duration::from_secs(20)).await;
        let log = child.stderr();
        let warns = lines_with(&log, "WARN", &["handler fail"]);
        let naming_422 = lines_with(&log, "WARN", &["handler fail", "422"]);
        eprintln!(
            "log.level {level}: {warns} warn lines about handler failures, {naming_422} naming 422"
        );
        assert!(
            (1..=10).contains(&warns) && naming_422 == warns,
            "500 failures in a burst give a handful of warn lines, each naming 422 ({warns} lines, {naming_422} with 422):\n{log}"
        );
        let summed: u64 = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("handler failures"))
            .filter_map(|l| {
                l.split("failures=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert_eq!(
            summed + 1,
            500,
            "the first line plus the summaries' counts account for every failure:\n{log}"
        );
        let debug_lines = lines_with(&log, "DEBUG", &["handler failed", "action=\"dead-letter\""]);
        if per_failure {
            assert_eq!(
                debug_lines, 500,
                "at debug, one line per failure with what happens to the message"
            );
            assert!(
                log.lines().any(|l| l.contains("DEBUG")
                    && l.contains("handler failed")
                    && l.contains("message_id=flood-")
                    && l.contains("attempt=1")
                    && l.contains("422")),
                "a debug line names the queue's message, the attempt and the error:\n{log}"
            );
        } else {
            assert_eq!(debug_lines, 0, "no per-failure lines at info");
        }
    }
    broker.cleanup().await;
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A handler that logs, as application code does.
struct Chatty;

impl rabbit_guard::handler::Handler for Chatty {
    type Message = Vec<u8>;

    async fn handle(
        &self,
        _body: Vec<u8>,
        _ctx: &rabbit_guard::handler::Context,
    ) -> Result<(), rabbit_guard::handler::HandlerError> {
        tracing::info!(charged_cents = 1200, "charged the order");
        Ok(())
    }
}

/// A `Write` that keeps what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_handlers_own_log_line_carries_its_deliverys_span_and_trace_id() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter("info,lapin=off")
        .with_writer(move || writer.clone())
        .finish();
    // A runtime of its own on this thread, so every task sees the subscriber.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let queue = tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let broker = Arc::new(TestBroker::connect().await);
            let settings = settings("span", "chatty", fast_breaker());
            let consumer = settings.consumers[0].clone();
            broker.track(&consumer);
            broker.declare(&consumer).await;
            let mut h = lapin::types::FieldTable::default();
            h.insert(
                "traceparent".into(),
                lapin::types::AMQPValue::LongString(TRACEPARENT.into()),
            );
            broker
                .publish_with_headers(&consumer.queue, "traced-1", h, b"{}")
                .await;
            let worker = rabbit_guard::Worker::builder(settings)
                .handler("chatty", Chatty)
                .build()
                .unwrap();
            let stats = worker.stats(&consumer.queue).unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(worker.run_until(stop.clone()));
            let done =
                wait_until(Duration::from_secs(15), || stats.snapshot().succeeded == 1).await;
            stop.cancel();
            let _ = task.await;
            broker.cleanup().await;
            assert!(done, "the message should be handled within 15 s");
            consumer.queue
        })
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "charged the order")
        .unwrap_or_else(|| panic!("the handler's line is in the JSON log:\n{text}"));
    let span = &line["span"];
    assert_eq!(span["name"], "delivery", "{line}");
    assert_eq!(span["queue"], queue.as_str(), "{line}");
    assert_eq!(span["message_id"], "traced-1", "{line}");
    assert_eq!(span["attempt"], 1, "{line}");
    assert_eq!(span["redelivered"], false, "{line}");
    assert_eq!(
        span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{line}");
    assert_eq!(
        line["charged_cents"], 1200,
        "the handler's own fields stay: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_handler_forwards_trace_context_and_drops_a_forged_one() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let settings = with_http(settings("traceout", "http", fast_breaker()), &downstream);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let with = |pairs: &[(&str, &str)]| {
        let mut h = lapin::types::FieldTable::default();
        for (k, v) in pairs {
            h.insert(
                (*k).into(),
                lapin::types::AMQPValue::LongString((*v).into()),
            );
        }
        h
    };
    broker
        .publish_with_headers(
            &consumer.queue,
            "traced",
            with(&[
                ("traceparent", TRACEPARENT),
                ("tracestate", "rojo=00f067aa0ba902b7"),
            ]),
            b"{}",
        )
        .await;
    broker
        .publish_with_headers(
            &consumer.queue,
            "forged",
            with(&[("traceparent", "00-zz-not-a-trace"), ("tracestate", "a=b")]),
            b"{}",
        )
        .await;
    let running = Running::start(rabbit_guard::Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(15), || downstream.succeeded_ids().len()
            == 2)
        .await,
        "both handled within 15 s: {:?}",
        downstream.succeeded_ids()
    );
    running.stop().await;
    let calls = downstream.calls();
    let call = |id: &str| calls.iter().find(|c| c.id == id).unwrap().clone();
    let traced = call("traced");
    assert_eq!(traced.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(traced.tracestate.as_deref(), Some("rojo=00f067aa0ba902b7"));
    let forged = call("forged");
    assert_eq!(
        (forged.traceparent, forged.tracestate),
        (None, None),
        "a malformed traceparent is not forwarded, and its tracestate neither"
    );
    broker.cleanup().await;
}

/// `key=value` of a log line (text format), unquoted.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split(&format!(" {key}=")).nth(1)?;
    let value = rest.strip_prefix('"').map_or_else(
        || rest.split_whitespace().next(),
        |quoted| quoted.split('"').next(),
    )?;
    Some(value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_summaries_say_what_happened_and_come_before_the_breakers_change() {
    use common::proxy::free_port;
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Failing);
    let mut breaker = fast_breaker();
    breaker.consecutive_failures = Some(6);
    breaker.minimum_calls = 1_000;
    breaker.open_timeout = Duration::from_millis(700);
    breaker.max_open_timeout = Duration::from_millis(700);
    let mut settings = with_http(settings("summaries", "http", breaker), &downstream);
    // Only a breaker's change (and the stop) may write a summary here.
    settings.log.failure_summary_every = Duration::from_secs(600);
    settings.consumers[0].concurrency = 1;
    settings.consumers[0].prefetch = 1;
    let port = free_port();
    settings.admin.listen = Some(format!("127.0.0.1:{port}"));
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    broker.publish_json(&consumer.queue, "sum", 30).await;
    let mut child = Child::spawn(&settings, &["run"]);
    // The trip, then failed half-open trials (their messages are put back).
    let trials = wait_until(Duration::from_secs(20), || {
        child.stderr().matches("breaker opened").count() >= 3
    })
    .await;
    assert!(
        trials,
        "the breaker should trip and fail two trials within 20 s:\n{}",
        child.stderr()
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    child.signal("TERM");
    let _ = child.wait(Duration::from_secs(20)).await;
    let log = child.stderr();

    let samples = common::prom::parse(&metrics).expect("/metrics parses");
    let q = consumer.queue.as_str();
    let delayed: f64 = samples
        .iter()
        .filter(|s| {
            s.name == "rabbit_guard_messages_delayed_total"
                && s.labels.get("queue").map(String::as_str) == Some(q)
        })
        .map(|s| s.value)
        .sum();
    let deferred = common::prom::value(
        &samples,
        "rabbit_guard_messages_deferred_total",
        &[("queue", q)],
    )
    .unwrap_or(0.0);
    // Per action: the first of its kind, plus what the summaries counted.
    let told = |action: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains("WARN") && field(l, "action") == Some(action))
            .map(|l| {
                if l.contains("first of its kind") {
                    1
                } else {
                    field(l, "failures")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0)
                }
            })
            .sum()
    };
    // Retries happen before the trip only. The metrics were read before the
    // stop, and trials may fail after that: the log may tell a few more
    // put backs, never fewer.
    let (retries, put_back) = (told("retry"), told("put back"));
    assert!(
        deferred > 0.0 && retries as f64 == delayed - deferred && put_back as f64 >= deferred,
        "the summaries tell each action as the metrics count it: retry {retries} (metrics {}), put back {put_back} (metrics {deferred}):\n{log}",
        delayed - deferred
    );
    // The failures that tripped the breaker are summed up before the line
    // saying it opened, not one summary period (here 10 min) later.
    let lines: Vec<&str> = log.lines().collect();
    let opened = lines
        .iter()
        .position(|l| l.contains("breaker opened"))
        .expect("an opened line");
    let summary_before = lines[..opened]
        .iter()
        .any(|l| l.contains("handler failures") && field(l, "action") == Some("retry"));
    assert!(
        summary_before,
        "the summary of the failures before the trip precedes 'breaker opened':\n{log}"
    );
    broker.cleanup().await;
}
