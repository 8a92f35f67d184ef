//! Several dependencies per consumer (`breakers = ["billing", "inventory"]`),
//! against the real broker: a failure counts against the breaker of the
//! dependency that failed (named with `HandlerError::dependency`, or by
//! `Context::guard`), the consumer pauses at the broker while any of its
//! breakers is open, the dependency is not called while its breaker is open,
//! a breaker shared with another consumer pauses that one too, and every
//! message is handled once the dependency is back: nothing lost, nothing
//! dead-lettered.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::BreakerState;
use rabbit_guard::handler::{Context, Handler, HandlerError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Two dependencies in one handler: billing always answers, inventory only
/// while `inventory_up`. Records every call it makes to each, with the time.
#[derive(Clone)]
struct TwoDeps {
    /// Guard the calls with `ctx.guard` (else name the dependency in the error).
    guarded: bool,
    inventory_up: Arc<AtomicBool>,
    billing_calls: Arc<Mutex<Vec<Instant>>>,
    inventory_calls: Arc<Mutex<Vec<Instant>>>,
    done: Arc<Mutex<HashSet<String>>>,
}

impl TwoDeps {
    fn new(guarded: bool) -> Self {
        Self {
            guarded,
            inventory_up: Arc::new(AtomicBool::new(false)),
            billing_calls: Arc::default(),
            inventory_calls: Arc::default(),
            done: Arc::default(),
        }
    }

    async fn billing(&self) -> Result<(), HandlerError> {
        self.billing_calls.lock().unwrap().push(Instant::now());
        Ok(())
    }

    async fn inventory(&self) -> Result<(), HandlerError> {
        self.inventory_calls.lock().unwrap().push(Instant::now());
        tokio::time::sleep(Duration::from_millis(2)).await;
        if self.inventory_up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(HandlerError::transient(
                "inventory: 503 Service Unavailable",
            ))
        }
    }

    fn inventory_calls_between(&self, from: Instant, to: Instant) -> usize {
        self.inventory_calls
            .lock()
            .unwrap()
            .iter()
            .filter(|at| **at > from && **at < to)
            .count()
    }
}

impl Handler for TwoDeps {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        if self.guarded {
            ctx.guard("billing", self.billing()).await?;
            ctx.guard("inventory", self.inventory()).await?;
        } else {
            self.billing().await?;
            self.inventory()
                .await
                .map_err(|e| e.dependency("inventory"))?;
        }
        let id = ctx.message_id().unwrap_or_default().to_owned();
        self.done.lock().unwrap().insert(id);
        Ok(())
    }
}

/// Inventory fails for a while, then recovers: only its breaker trips; the
/// queue (and a second queue that shares the billing breaker) pause as the
/// issue asks: the first while inventory is open, the second never.
async fn inventory_outage(guarded: bool) {
    let broker = TestBroker::connect().await;
    let prefix = if guarded { "deps-guard" } else { "deps-named" };
    let mut settings = settings(prefix, "two-deps", fast_breaker());
    settings.breakers.clear();
    let mut breaker = fast_breaker();
    breaker.consecutive_failures = Some(3);
    settings.breakers.insert("billing".into(), fast_breaker());
    settings.breakers.insert("inventory".into(), breaker);
    settings.consumers[0].breaker = String::new();
    settings.consumers[0].breakers = vec!["billing".into(), "inventory".into()];
    settings.consumers[0].concurrency = 4;
    settings.consumers[0].prefetch = 20;
    // A second queue guarded by billing alone, shared with the first.
    settings.consumers.push({
        let mut v = settings.consumers[0].clone();
        v.queue = unique(&format!("{prefix}-billing-only"));
        v.breaker = "billing".into();
        v.handler = "noop".into();
        v
    });
    settings.consumers[1].breakers.clear();
    let main = settings.consumers[0].clone();
    let other = settings.consumers[1].clone();
    broker.track(&main);
    broker.track(&other);

    init_logs();
    let handler = TwoDeps::new(guarded);
    let worker: Worker = Worker::builder(settings)
        .handler("two-deps", handler.clone())
        .build()
        .expect("two breakers on one consumer are valid");
    let billing = worker.breaker("billing").unwrap();
    let inventory = worker.breaker("inventory").unwrap();
    let stats = worker.stats(&main.queue).unwrap();
    let other_stats = worker.stats(&other.queue).unwrap();
    let billing_changes = record_transitions(&billing);
    let inventory_changes = record_transitions(&inventory);
    let token = CancellationToken::new();
    let join = tokio::spawn(worker.run_until(token.clone()));

    assert!(
        wait_until(Duration::from_secs(10), || stats.snapshot().subscriptions
            >= 1
            && other_stats.snapshot().subscriptions >= 1)
        .await,
        "both consumers subscribe"
    );
    let n = 200;
    let ids = broker.publish_json(&main.queue, "order", n).await;

    // Inventory fails: its breaker opens, the queue has no consumer at the
    // broker, and messages wait in it.
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            inventory.state(),
            BreakerState::Open { .. }
        ))
        .await,
        "inventory's failures open its breaker: {:?}",
        inventory.snapshot()
    );
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            broker.consumers(&main.queue).await == 0
        })
        .await,
        "the consumer pauses at the broker while inventory is open"
    );
    let waiting = broker.ready(&main.queue).await;
    assert!(
        waiting > 0,
        "messages wait in the queue while paused, {waiting} ready"
    );
    assert_eq!(
        billing.state(),
        BreakerState::Closed,
        "billing is fine: its breaker stays closed"
    );
    assert_eq!(
        broker.consumers(&other.queue).await,
        1,
        "billing's other consumer keeps consuming: only inventory is open"
    );

    // Inventory comes back: probes close it, and everything is handled.
    handler.inventory_up.store(true, Ordering::SeqCst);
    let all_done = wait_until(Duration::from_secs(30), || {
        handler.done.lock().unwrap().len() == n
    })
    .await;
    let snapshot = stats.snapshot();
    let done = handler.done.lock().unwrap().clone();
    assert!(
        all_done,
        "every message handled once inventory is back: {} of {n}; {snapshot:?}",
        done.len()
    );
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            broker.ready(&main.queue).await == 0
        })
        .await,
        "the work queue is empty"
    );

    // Zero calls to inventory while its breaker was open.
    let changes = inventory_changes.lock().unwrap().clone();
    let mut opened: Option<Instant> = None;
    let mut open_periods = 0;
    for t in &changes {
        match (t.to, opened) {
            (BreakerState::Open { .. }, _) => opened = Some(t.at),
            (_, Some(from)) => {
                open_periods += 1;
                let calls = handler.inventory_calls_between(from, t.at);
                assert_eq!(
                    calls, 0,
                    "inventory was called {calls} times while its breaker was open ({:?} to {:?})",
                    from, t.at
                );
                opened = None;
            }
            _ => {}
        }
    }
    assert!(
        open_periods >= 1,
        "inventory opened and left open: {changes:?}"
    );
    let billing_counts = billing.call_counts();
    let billing_moves = billing_changes.lock().unwrap().clone();
    assert!(
        billing_moves.is_empty(),
        "billing never left closed: {billing_moves:?}"
    );
    assert_eq!(
        billing_counts.failures, 0,
        "no inventory failure was counted against billing: {billing_counts:?}"
    );
    assert!(
        inventory.call_counts().failures >= 3,
        "inventory's failures were counted against inventory: {:?}",
        inventory.call_counts()
    );

    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), join)
        .await
        .expect("worker stops")
        .unwrap()
        .expect("worker ran");
    let dead = broker.drain(&main.dead_letter_queue()).await;
    assert!(
        dead.is_empty(),
        "no outage-made dead letters: {} in the DLQ",
        dead.len()
    );
    let lost: Vec<&String> = ids.iter().filter(|id| !done.contains(*id)).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    eprintln!(
        "{prefix}: {n} handled, inventory calls {}, billing {billing_counts:?}, inventory {:?}, transitions {}",
        handler.inventory_calls.lock().unwrap().len(),
        inventory.call_counts(),
        changes.len()
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_dependency_trips_only_its_own_breaker_and_pauses_the_queue() {
    inventory_outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_calls_count_against_their_own_breaker_and_pause_the_queue() {
    inventory_outage(true).await;
}

/// A breaker shared by two consumers pauses both, whichever of them made it
/// trip; the consumer with two breakers resumes when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_breaker_pauses_every_consumer_that_names_it() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("deps-shared", "fails-billing", fast_breaker());
    settings.breakers.clear();
    let mut billing = fast_breaker();
    billing.consecutive_failures = Some(3);
    settings.breakers.insert("billing".into(), billing);
    settings.breakers.insert("inventory".into(), fast_breaker());
    settings.consumers[0].breaker = "billing".into();
    let failing = settings.consumers[0].clone();
    settings.consumers.push({
        let mut v = failing.clone();
        v.queue = unique("deps-shared-two");
        v.breaker = String::new();
        v.breakers = vec!["inventory".into(), "billing".into()];
        v.handler = "noop".into();
        v
    });
    let two = settings.consumers[1].clone();
    broker.track(&failing);
    broker.track(&two);

    let billing_up = Arc::new(AtomicBool::new(false));
    let up = billing_up.clone();
    let handler = rabbit_guard::handler::handler_fn(move |_body: Vec<u8>, _ctx: Context| {
        let up = up.clone();
        async move {
            if up.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(HandlerError::transient("billing: 503"))
            }
        }
    });
    init_logs();
    let worker = Worker::builder(settings)
        .handler("fails-billing", handler)
        .build()
        .unwrap();
    let billing = worker.breaker("billing").unwrap();
    let two_stats = worker.stats(&two.queue).unwrap();
    let failing_stats = worker.stats(&failing.queue).unwrap();
    let token = CancellationToken::new();
    let join = tokio::spawn(worker.run_until(token.clone()));
    assert!(
        wait_until(Duration::from_secs(10), || failing_stats
            .snapshot()
            .subscriptions
            >= 1
            && two_stats.snapshot().subscriptions >= 1)
        .await,
        "both subscribe"
    );
    broker.publish_json(&failing.queue, "f", 20).await;
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            billing.state(),
            BreakerState::Open { .. }
        ))
        .await,
        "billing opens"
    );
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            broker.consumers(&two.queue).await == 0
        })
        .await,
        "the consumer guarded by inventory and billing pauses too, though its own handler never failed"
    );
    let ids = broker.publish_json(&two.queue, "t", 30).await;
    billing_up.store(true, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(30), || two_stats.snapshot().succeeded
            == ids.len() as u64)
        .await,
        "it resumes when billing closes: {:?}",
        two_stats.snapshot()
    );
    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), join)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(broker.ready(&two.queue).await, 0);
    assert!(broker.drain(&two.dead_letter_queue()).await.is_empty());
    broker.cleanup().await;
}
