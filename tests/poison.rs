//! Bad messages go to the dead-letter queue with their reason, without
//! tripping the breaker, while the good ones are processed.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::BreakerState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_bad_bodies_and_panics_are_dead_lettered_with_their_reason() {
    let broker = Arc::new(TestBroker::connect().await);
    let mut settings = settings("poison", "picky", fast_breaker());
    // Bad messages must not trip a breaker, even a touchy one.
    settings.breakers.get_mut("dep").unwrap().minimum_calls = 2;
    settings
        .breakers
        .get_mut("dep")
        .unwrap()
        .consecutive_failures = Some(2);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let q = &consumer.queue;
    let mut expected = BTreeMap::new();
    for i in 0..100 {
        broker
            .publish_raw(
                q,
                &format!("ok-{i}"),
                br#"{"kind":"ok"}"#,
                "application/json",
            )
            .await;
        if i % 20 == 0 {
            let n = i / 20;
            broker
                .publish_raw(
                    q,
                    &format!("bad-{n}"),
                    br#"{"kind":"bad"}"#,
                    "application/json",
                )
                .await;
            broker
                .publish_raw(
                    q,
                    &format!("garbled-{n}"),
                    b"\xff not json",
                    "application/json",
                )
                .await;
            broker
                .publish_raw(
                    q,
                    &format!("panic-{n}"),
                    br#"{"kind":"panic"}"#,
                    "application/json",
                )
                .await;
            expected.insert(format!("bad-{n}"), "permanent");
            expected.insert(format!("garbled-{n}"), "decode");
            expected.insert(format!("panic-{n}"), "panic");
        }
    }

    let running = Running::start(Worker::builder(settings).handler("picky", Picky)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = running.stats.snapshot();
            s.succeeded == 100 && s.dead_lettered == 15
        })
        .await,
        "100 good messages processed and 15 dead-lettered: {:?}",
        running.stats.snapshot()
    );
    assert_eq!(
        running.state(),
        BreakerState::Closed,
        "bad messages must not open the breaker"
    );
    assert!(
        running.transitions().is_empty(),
        "no transitions: {:?}",
        running.transitions()
    );
    running.stop().await;

    let dead = broker.drain(&consumer.dead_letter_queue()).await;
    assert_eq!(
        dead.len(),
        15,
        "dead letters: {:?}",
        dead.iter().map(|d| &d.id).collect::<Vec<_>>()
    );
    for d in &dead {
        let want = expected
            .get(&d.id)
            .unwrap_or_else(|| panic!("unexpected dead letter {}", d.id));
        assert_eq!(
            d.header_str("rg-reason").as_deref(),
            Some(*want),
            "reason of {}",
            d.id
        );
        assert_eq!(
            d.header_str("rg-handler").as_deref(),
            Some("picky"),
            "handler of {}",
            d.id
        );
        assert_eq!(
            d.header_str("rg-original-queue").as_deref(),
            Some(q.as_str()),
            "original queue of {}",
            d.id
        );
        assert_eq!(d.header_u64("rg-attempt"), Some(1), "attempt of {}", d.id);
        assert!(
            d.header_str("rg-dead-lettered-at")
                .is_some_and(|t| t.ends_with('Z')),
            "rg-dead-lettered-at of {} should be a UTC time: {:?}",
            d.id,
            d.header_str("rg-dead-lettered-at")
        );
        let error = d.header_str("rg-error").unwrap_or_default();
        let id = &d.id;
        match *want {
            "permanent" => assert!(
                error.contains("negative"),
                "the handler's error is kept for {id}: {error}"
            ),
            "decode" => assert!(
                error.contains("JSON"),
                "the decode error names JSON for {id}: {error}"
            ),
            "panic" => assert!(
                error.contains("blew up on purpose"),
                "the panic message is kept for {id}: {error}"
            ),
            _ => unreachable!(),
        }
    }
    let garbled = dead.iter().find(|d| d.id == "garbled-0").unwrap();
    assert_eq!(
        garbled.body, b"\xff not json",
        "the body is kept byte for byte"
    );
    assert_eq!(broker.ready(q).await, 0, "work queue empty");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_dead_letters_4xx_and_retries_5xx() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    downstream.rule("rejected", Rule::Status(422));
    downstream.rule("missing", Rule::Status(404));
    downstream.rule("throttled", Rule::FailTimes(1));
    let settings = with_http(settings("httpcodes", "http", fast_breaker()), &downstream);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let q = &consumer.queue;
    for id in ["rejected", "missing", "throttled"] {
        broker.publish_raw(q, id, b"{}", "application/json").await;
    }
    let ids = broker.publish_json(q, "fine", 30).await;

    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = running.stats.snapshot();
            s.dead_lettered == 2 && downstream.succeeded_ids().len() == ids.len() + 1
        })
        .await,
        "2 dead-lettered and all {} + 1 succeeded within 20 s: {} succeeded, {:?}",
        ids.len(),
        downstream.succeeded_ids().len(),
        running.stats.snapshot()
    );
    running.stop().await;
    let dead = broker.drain(&consumer.dead_letter_queue()).await;
    let mut reasons: Vec<_> = dead
        .iter()
        .map(|d| {
            (
                d.id.clone(),
                d.header_str("rg-reason").unwrap_or_default(),
                d.header_str("rg-error").unwrap_or_default(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons.len(),
        2,
        "the two 4xx are dead-lettered: {reasons:?}"
    );
    assert_eq!(
        (reasons[0].0.as_str(), reasons[0].1.as_str()),
        ("missing", "permanent"),
        "a 404 is permanent: {reasons:?}"
    );
    assert!(
        reasons[0].2.contains("404"),
        "the error names the 404: {reasons:?}"
    );
    assert_eq!(
        (reasons[1].0.as_str(), reasons[1].1.as_str()),
        ("rejected", "permanent"),
        "a 422 is permanent: {reasons:?}"
    );
    assert!(
        reasons[1].2.contains("422"),
        "the error names the 422: {reasons:?}"
    );
    let throttled: Vec<_> = downstream
        .calls()
        .into_iter()
        .filter(|c| c.id == "throttled")
        .collect();
    assert_eq!(
        throttled.len(),
        2,
        "503 once, then retried and accepted: {throttled:?}"
    );
    assert_eq!(
        (throttled[0].attempt, throttled[1].attempt),
        (1, 2),
        "X-Attempt header counts attempts"
    );
    broker.cleanup().await;
}
