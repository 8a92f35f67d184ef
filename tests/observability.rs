//! What an operator sees: why handlers fail (without a flood), a span per
//! delivery that a handler's own logs are tied to, trace context in and out.
#![allow(clippy::print_stderr)]

mod common;

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
