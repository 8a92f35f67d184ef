//! Broker back-pressure: during a memory alarm the broker blocks publishing
//! connections. Copies to delay queues wait (their originals stay unacked),
//! consuming goes on, and everything moves once the alarm clears.
//!
//! This test raises a real alarm on the shared broker (for a few seconds), so
//! it lives alone in its own test binary.
#![allow(clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;

/// Sets the memory watermark to 0 (alarm: publishers blocked) and restores
/// the previous value when dropped, even if the test fails.
struct MemoryAlarm {
    previous: String,
}

fn ctl(args: &[&str]) -> String {
    let out = common::rabbitmqctl()
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed for the back-pressure test");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl MemoryAlarm {
    fn raise() -> Self {
        let previous = ctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        ctl(&["set_vm_memory_high_watermark", "0"]);
        Self { previous }
    }

    fn clear(&self) {
        // `0.4` or `{absolute,1073741824}`.
        let previous = self.previous.trim();
        if let Some(bytes) = previous
            .strip_prefix("{absolute,")
            .and_then(|r| r.strip_suffix('}'))
        {
            ctl(&["set_vm_memory_high_watermark", "absolute", bytes]);
        } else {
            ctl(&["set_vm_memory_high_watermark", previous]);
        }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        self.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_wait_while_the_broker_blocks_publishers_then_move() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let mut settings = with_http(settings("blocked", "http", fast_breaker()), &downstream);
    settings.consumers[0].prefetch = 100;
    settings.consumers[0].concurrency = 8;
    // Failures must not trip the breaker here: this is about publishing.
    settings.breakers.get_mut("dep").unwrap().minimum_calls = 1_000;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "b", 60).await;
    for id in &ids {
        // First attempt fails: each message needs a copy in the delay queue.
        downstream.rule(id, Rule::FailTimes(1));
    }

    let alarm = MemoryAlarm::raise();
    let running = Running::start(Worker::builder(settings)).await;
    assert!(
        wait_until(Duration::from_secs(15), || downstream.call_count()
            >= ids.len())
        .await,
        "consuming goes on during the alarm: {} first attempts, {:?}",
        downstream.call_count(),
        running.stats.snapshot()
    );
    // Give the copies every chance to (wrongly) go out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = running.stats.snapshot();
    assert_eq!(
        during.retried, 0,
        "no copy can be confirmed while publishers are blocked: {during:?}"
    );
    assert_eq!(
        during.received,
        ids.len() as u64,
        "nothing is redelivered or lost meanwhile: {during:?}"
    );
    assert_eq!(
        downstream.call_count(),
        ids.len(),
        "a message waiting for its copy is not retried meanwhile"
    );

    alarm.clear();
    assert!(
        wait_until(Duration::from_secs(30), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "after the alarm, copies go out and the retries succeed: {:?}",
        running.stats.snapshot()
    );
    let after = running.stats.snapshot();
    running.stop().await;
    drop(alarm);
    assert_eq!(
        after.retried,
        ids.len() as u64,
        "every held copy goes out after the alarm: {after:?}"
    );
    assert_eq!(
        after.publish_failures, 0,
        "a blocked publish is not a failure: {after:?}"
    );
    assert_eq!(
        broker.ready(&consumer.queue).await,
        0,
        "work queue empty after the alarm"
    );
    assert_eq!(
        broker.ready(&consumer.dead_letter_queue()).await,
        0,
        "the alarm dead-letters nothing"
    );
    eprintln!(
        "blocked: {} copies held during the alarm, all moved after it; {after:?}",
        ids.len()
    );
    broker.cleanup().await;
}
