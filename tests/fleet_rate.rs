//! Issue 25, part 2: the failure-rate rule trips the fleet on its combined
//! window, so a fleet of N spends one `minimum_calls` plus what was in
//! flight. A test binary of its own: the bound counts the calls made while
//! reports travel between the workers, and the other fleet tests' worker
//! processes (several per test, all at once on 2 cores) would stretch that
//! time; cargo runs test binaries one after another.
#![allow(clippy::print_stderr)]

mod common;

use std::time::Duration;

use common::fleet::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_rate_rule_trips_the_fleet_on_its_combined_window() {
    let (broker, downstream, mut settings) = setup("fleetrate").await;
    settings.breakers.insert("dep".into(), rate_breaker());
    let queue = settings.consumers[0].queue.clone();
    downstream.set(Mode::Healthy);
    let spawned = ["r1", "r2", "r3"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let bound = 10 + 3 * CONCURRENCY;
    let mut runs = Vec::new();
    for run in 0..8 {
        windows_empty(&members).await;
        let before = failures(&downstream);
        downstream.set(Mode::Failing);
        let ids = broker.publish_json(&queue, &format!("r{run}"), 100).await;
        wait_paused(&broker, &queue).await;
        runs.push(failures(&downstream) - before);
        downstream.set(Mode::Healthy);
        wait_all_succeeded(&downstream, &ids, Duration::from_secs(40)).await;
        wait_consumers(&broker, &queue, 3).await;
    }
    eprintln!(
        "failure_rate = 0.5, minimum_calls = 10, 3 workers x concurrency {CONCURRENCY}: failing calls before the whole fleet paused, 8 runs: {runs:?} (bound {bound}; 3 x (10 + 7) = 51 without the fleet)"
    );
    assert!(
        runs.iter().all(|n| *n <= bound),
        "failing calls before the fleet paused {runs:?}: some run spent more than one minimum_calls (10) plus what 3 workers had in flight (3 x {CONCURRENCY}){}",
        logs(&members)
    );
    let dead = broker
        .drain(&settings.consumers[0].dead_letter_queue())
        .await;
    assert_eq!(dead.len(), 0, "nothing dead-lettered by the outages");
    drop(members);
    broker.cleanup().await;
}
