//! On a 3-node RabbitMQ 4 cluster (`scripts/rabbitmq.sh start 3`: nodes on
//! 127.0.0.1:5673–5675; `.ci/run` starts it): the worker is given all three
//! addresses, and the node its consume connection is on is stopped in the
//! middle of 10,000 messages on a quorum queue. Every message is handled,
//! none is lost, duplicates are counted, and consumption resumes on another
//! node within 5 s.
//!
//! Ignored by a plain `cargo test` (it needs the cluster); the README's test
//! command (`-- --include-ignored`) runs it.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{CLUSTER, NODES, StartAgain, ctl, node_url, start_apps};
use common::proxy::free_port;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::{ConsumerSettings, QueueType, Settings};
use rabbit_guard::handler::{Context, Handler, HandlerError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Handles a message in `work` (1 ms unless set), counting each id.
#[derive(Clone, Default)]
struct Counting {
    seen: Arc<Mutex<HashMap<String, u32>>>,
    work: Option<Duration>,
    /// While set, every call fails as the dependency's fault (counted too).
    failing: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// When each call started.
    calls_at: Arc<Mutex<Vec<Instant>>>,
}

impl Counting {
    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn calls_between(&self, from: Instant, to: Instant) -> usize {
        self.calls_at
            .lock()
            .unwrap()
            .iter()
            .filter(|at| **at >= from && **at < to)
            .count()
    }

    fn calls(&self) -> u64 {
        self.seen
            .lock()
            .unwrap()
            .values()
            .map(|n| u64::from(*n))
            .sum()
    }
}

impl Handler for Counting {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        self.calls_at.lock().unwrap().push(Instant::now());
        tokio::time::sleep(self.work.unwrap_or(Duration::from_millis(1))).await;
        if self
            .failing
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(HandlerError::transient("dependency: 503"));
        }
        let id = ctx.message_id().unwrap_or_default().to_owned();
        *self.seen.lock().unwrap().entry(id).or_default() += 1;
        Ok(())
    }
}

/// The node (index into [`NODES`]) a connection of the worker is on, from
/// its `/status`.
async fn node_of(admin: &str, role: &str) -> Option<usize> {
    let text = reqwest::get(format!("{admin}/status"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let status: serde_json::Value = serde_json::from_str(&text).ok()?;
    let node = status["connections"]
        .as_array()?
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.ends_with(role)) && c["up"] == true)?["node"]
        .as_str()?
        .to_owned();
    assert!(
        !node.contains("guest:guest"),
        "the node is shown with its password masked: {node}"
    );
    NODES.iter().position(|p| node.contains(&format!(":{p}/")))
}

/// Settings for a worker on the cluster nodes `ports`, admin on a free
/// port, a quorum work queue (declared through node 1 and tracked by
/// `broker`).
async fn cluster_settings(
    broker: &TestBroker,
    prefix: &str,
    ports: &[u16],
) -> (Settings, ConsumerSettings, String) {
    let admin_port = free_port();
    let mut settings = settings(prefix, "counting", fast_breaker());
    settings.broker.url = rabbit_guard::config::BrokerSettings::default().url;
    settings.broker.urls = ports.iter().map(|p| node_url(*p).into()).collect();
    settings.broker.connect_timeout = Duration::from_secs(2);
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.broker.reconnect.max_delay = Duration::from_secs(1);
    settings.admin.listen = Some(format!("127.0.0.1:{admin_port}"));
    let consumer = &mut settings.consumers[0];
    consumer.queue_type = QueueType::Quorum;
    consumer.delivery_limit = Some(1_000);
    consumer.prefetch = 100;
    consumer.concurrency = 16;
    let consumer = consumer.clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    (settings, consumer, format!("http://127.0.0.1:{admin_port}"))
}

/// Runs the worker with a [`Counting`] handler.
fn start(
    settings: Settings,
) -> (
    Counting,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), rabbit_guard::Error>>,
) {
    start_with(settings, Counting::default())
}

/// Runs the worker with `handler`.
fn start_with(
    settings: Settings,
    handler: Counting,
) -> (
    Counting,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), rabbit_guard::Error>>,
) {
    init_logs();
    let worker: Worker = Worker::builder(settings)
        .handler("counting", handler.clone())
        .build()
        .expect("cluster settings are valid");
    let token = CancellationToken::new();
    let join = tokio::spawn(worker.run_until(token.clone()));
    (handler, token, join)
}

/// Checks, through a node that runs, that every id was handled, nothing is
/// dead-lettered or left, and deletes the queues. Returns the duplicates.
async fn all_handled_nothing_lost(
    via: u16,
    consumer: &ConsumerSettings,
    ids: &[String],
    handler: &Counting,
) -> u64 {
    let seen = handler.seen.lock().unwrap().clone();
    let lost: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        lost.is_empty(),
        "every message handled: {} of {}, lost {}: {:?}",
        seen.len(),
        ids.len(),
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    let after = TestBroker::connect_to(&node_url(via)).await;
    after.track(consumer);
    let dead = after.drain(&consumer.dead_letter_queue()).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {}", dead.len());
    assert_eq!(
        after.ready(&consumer.queue).await,
        0,
        "nothing left in the queue"
    );
    after.cleanup().await;
    handler.calls() - seen.len() as u64
}

/// The node (1-3) that leads the quorum queue `queue`, from `rabbitmqctl list_queues`.
fn leader_of(queue: &str) -> Option<usize> {
    for node in 1..=NODES.len() {
        let out = ctl(
            node,
            &["list_queues", "-q", "--no-table-headers", "name", "leader"],
        );
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue))?;
        let leader = line.split_whitespace().nth(1)?;
        return (1..=NODES.len()).find(|n| leader == format!("rg{n}@localhost"));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node RabbitMQ 4 cluster: scripts/rabbitmq.sh start 3"]
async fn stopping_the_consume_connections_node_loses_nothing() {
    let _cluster = CLUSTER.lock().await;
    let broker = TestBroker::connect_to(&node_url(NODES[0])).await;
    let (settings, consumer, admin) = cluster_settings(&broker, "cluster-stop", &NODES).await;
    let n = 10_000;
    let ids = broker.publish_json(&consumer.queue, "c", n).await;
    let (handler, token, join) = start(settings);

    // A third of the way in, stop the node the consume connection is on.
    assert!(
        wait_until(Duration::from_secs(60), || handler.distinct() >= n / 3).await,
        "the worker consumes from the cluster: {} of {n}",
        handler.distinct()
    );
    let stopped = node_of(&admin, "/consume")
        .await
        .expect("the consume connection is on one of the three nodes");
    let publish_node = node_of(&admin, "/publish").await;
    // Counted before stop_app: it takes seconds, and the worker may have
    // moved and handled everything before it returns.
    let stopped_at = Instant::now();
    let at_stop = handler.calls();
    let left = u64::try_from(n).unwrap_or(u64::MAX).saturating_sub(at_stop);
    let out = ctl(stopped + 1, &["stop_app"]);
    let _again = StartAgain(vec![stopped + 1]);
    assert!(
        out.status.success(),
        "stop_app on node {}: {}",
        stopped + 1,
        String::from_utf8_lossy(&out.stderr)
    );

    // Consumption resumes on another node.
    let mut resumed_on = None;
    while stopped_at.elapsed() < Duration::from_secs(30) {
        if let Some(node) = node_of(&admin, "/consume").await
            && node != stopped
            && handler.calls() > at_stop + left.min(200)
        {
            resumed_on = Some((node, stopped_at.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = wait_until(Duration::from_secs(120), || handler.distinct() == n).await;
    let (distinct, calls) = (handler.distinct(), handler.calls());

    token.cancel();
    let stopped_worker = tokio::time::timeout(Duration::from_secs(30), join).await;
    let restart = ctl(stopped + 1, &["start_app"]);
    assert!(
        restart.status.success(),
        "start_app on node {}: {}",
        stopped + 1,
        String::from_utf8_lossy(&restart.stderr)
    );
    stopped_worker
        .expect("the worker stops")
        .unwrap()
        .expect("the worker ran");

    let (resumed_node, resumed_after) =
        resumed_on.expect("consumption resumed on another node within 30 s");
    assert!(all, "all {n} handled within 120 s: {distinct}");
    assert!(
        resumed_after <= Duration::from_secs(10),
        "consumption resumed on node {} within 10 s of asking node {} to stop (stop_app itself takes seconds): took {resumed_after:?}",
        resumed_node + 1,
        stopped + 1
    );
    let duplicates = all_handled_nothing_lost(
        NODES[(stopped + 1) % NODES.len()],
        &consumer,
        &ids,
        &handler,
    )
    .await;
    eprintln!(
        "cluster: stopped node {} (consume connection; publish on {:?}), resumed on node {} after {resumed_after:?}; {n} messages ({calls} calls), 0 lost, {duplicates} duplicates",
        stopped + 1,
        publish_node.map(|p| p + 1),
        resumed_node + 1,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node RabbitMQ 4 cluster: scripts/rabbitmq.sh start 3"]
async fn stopping_the_queue_leaders_node_elsewhere_loses_nothing() {
    let _cluster = CLUSTER.lock().await;
    let broker = TestBroker::connect_to(&node_url(NODES[0])).await;
    let (mut settings, consumer, _admin) =
        cluster_settings(&broker, "cluster-leader", &NODES).await;
    let leader = leader_of(&consumer.queue).expect("the quorum queue has a leader");
    // The worker is connected elsewhere: only the other two nodes.
    settings.broker.urls = (1..=NODES.len())
        .filter(|n| *n != leader)
        .map(|n| node_url(NODES[n - 1]).into())
        .collect();
    let other = NODES[leader % NODES.len()];
    let publisher = TestBroker::connect_to(&node_url(other)).await;
    let n = 10_000;
    let ids = publisher.publish_json(&consumer.queue, "l", n).await;
    let (handler, token, join) = start(settings);
    assert!(
        wait_until(Duration::from_secs(60), || handler.distinct() >= n / 3).await,
        "the worker consumes: {} of {n}",
        handler.distinct()
    );
    let out = ctl(leader, &["stop_app"]);
    let _again = StartAgain(vec![leader]);
    let at_stop = handler.calls();
    // stop_app takes seconds, and the worker goes on meanwhile: what is
    // left may be fewer than 500 messages (337 in one CI run).
    let left = n.saturating_sub(handler.distinct());
    assert!(
        out.status.success(),
        "stop_app on the leader, node {leader}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept_on = wait_until(Duration::from_secs(30), || {
        handler.calls() >= at_stop + u64::try_from(left.min(500)).unwrap_or(500)
    })
    .await;
    let all = wait_until(Duration::from_secs(120), || handler.distinct() == n).await;
    let new_leader = leader_of(&consumer.queue);
    token.cancel();
    let stopped_worker = tokio::time::timeout(Duration::from_secs(30), join).await;
    let restart = ctl(leader, &["start_app"]);
    assert!(
        restart.status.success(),
        "start_app on node {leader}: {}",
        String::from_utf8_lossy(&restart.stderr)
    );
    stopped_worker
        .expect("the worker stops")
        .unwrap()
        .expect("the worker ran");
    assert!(
        kept_on,
        "the worker kept consuming after the leader stopped: {} calls at the stop, {left} messages left, {} calls now",
        at_stop,
        handler.calls()
    );
    assert!(all, "all {n} handled: {}", handler.distinct());
    let duplicates = all_handled_nothing_lost(other, &consumer, &ids, &handler).await;
    eprintln!(
        "cluster: stopped the leader (node {leader}), new leader {new_leader:?}; {n} messages, 0 lost, {duplicates} duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node RabbitMQ 4 cluster: scripts/rabbitmq.sh start 3"]
async fn all_nodes_down_for_ten_seconds_and_back_loses_nothing() {
    let _cluster = CLUSTER.lock().await;
    let broker = TestBroker::connect_to(&node_url(NODES[0])).await;
    let (settings, consumer, _admin) = cluster_settings(&broker, "cluster-all", &NODES).await;
    let n = 10_000;
    let ids = broker.publish_json(&consumer.queue, "a", n).await;
    // 20 ms a message, 16 at once: the run lasts longer than stopping the nodes.
    let (handler, token, join) = start_with(
        settings,
        Counting {
            work: Some(Duration::from_millis(20)),
            ..Counting::default()
        },
    );
    assert!(
        wait_until(Duration::from_secs(60), || handler.distinct() >= n / 10).await,
        "the worker consumes: {} of {n}",
        handler.distinct()
    );
    let _again = StartAgain((1..=NODES.len()).collect());
    for node in (1..=NODES.len()).rev() {
        let out = ctl(node, &["stop_app"]);
        assert!(
            out.status.success(),
            "stop_app on node {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let down_at = Instant::now();
    let during = handler.distinct();
    assert!(
        during < n,
        "the cluster went down in the middle of the run: {during} of {n} handled already"
    );
    // Ten seconds with no broker at all: the worker retries on its own.
    tokio::time::sleep_until(down_at + Duration::from_secs(10)).await;
    // All at once: a node waits for the peers that stopped after it.
    let nodes: Vec<usize> = (1..=NODES.len()).collect();
    for (node, out) in start_apps(&nodes) {
        assert!(
            out.status.success(),
            "start_app on node {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let back_at = Instant::now();
    let all = wait_until(Duration::from_secs(120), || handler.distinct() == n).await;
    let resumed_after = back_at.elapsed();
    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), join)
        .await
        .expect("the worker stops")
        .unwrap()
        .expect("the worker ran");
    assert!(
        all,
        "the worker resumed on its own and handled all {n}: {} (had {during} when the cluster went down)",
        handler.distinct()
    );
    let duplicates = all_handled_nothing_lost(NODES[0], &consumer, &ids, &handler).await;
    eprintln!(
        "cluster: all nodes down 10 s with {during} of {n} handled; all handled {resumed_after:?} after the nodes came back; 0 lost, {duplicates} duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node RabbitMQ 4 cluster: scripts/rabbitmq.sh start 3"]
async fn a_node_stop_during_an_outage_keeps_the_queue_paused_until_the_open_time_ends() {
    let _cluster = CLUSTER.lock().await;
    use std::sync::atomic::{AtomicBool, Ordering};
    let broker = TestBroker::connect_to(&node_url(NODES[0])).await;
    let (mut settings, consumer, admin) = cluster_settings(&broker, "cluster-outage", &NODES).await;
    let breaker = settings.breakers.get_mut("dep").unwrap();
    breaker.consecutive_failures = Some(3);
    breaker.open_timeout = Duration::from_secs(5);
    breaker.max_open_timeout = Duration::from_secs(5);
    breaker.half_open_probes = 1;
    let probes = breaker.half_open_probes as usize;
    let n = 300;
    let ids = broker.publish_json(&consumer.queue, "o", n).await;
    let failing = Arc::new(AtomicBool::new(true));
    let handler = Counting {
        failing: Some(failing.clone()),
        ..Counting::default()
    };
    init_logs();
    let worker: Worker = Worker::builder(settings)
        .handler("counting", handler.clone())
        .build()
        .unwrap();
    let dep = worker.breaker("dep").unwrap();
    let changes = record_transitions(&dep);
    let token = CancellationToken::new();
    let join = tokio::spawn(worker.run_until(token.clone()));
    assert!(
        wait_until(Duration::from_secs(30), || matches!(
            dep.state(),
            rabbit_guard::breaker::BreakerState::Open { .. }
        ))
        .await,
        "the failing dependency opens the breaker"
    );
    let opened_at = Instant::now();
    let stopped = node_of(&admin, "/consume").await.expect("connected");
    let out = ctl(stopped + 1, &["stop_app"]);
    let _again = StartAgain(vec![stopped + 1]);
    assert!(
        out.status.success(),
        "stop_app: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = NODES[(stopped + 1) % NODES.len()];
    let watcher = TestBroker::connect_to(&node_url(live)).await;
    // Reconnected elsewhere, and still no consumer while the breaker is open.
    let mut reconnected = None;
    let mut consumers_seen = Vec::new();
    while matches!(
        dep.state(),
        rabbit_guard::breaker::BreakerState::Open { .. }
    ) && opened_at.elapsed() < Duration::from_secs(20)
    {
        if reconnected.is_none()
            && let Some(node) = node_of(&admin, "/consume").await
            && node != stopped
        {
            reconnected = Some((node, opened_at.elapsed()));
        }
        consumers_seen.push(watcher.consumers(&consumer.queue).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (node, after) =
        reconnected.expect("the consume connection moved to another node while open");
    let half_open_at = Instant::now();
    // The dependency is back at the first trial: it closes after the probes.
    failing.store(false, Ordering::SeqCst);
    let all = wait_until(Duration::from_secs(60), || handler.distinct() == n).await;
    token.cancel();
    let stopped_worker = tokio::time::timeout(Duration::from_secs(30), join).await;
    let restart = ctl(stopped + 1, &["start_app"]);
    assert!(
        restart.status.success(),
        "start_app: {}",
        String::from_utf8_lossy(&restart.stderr)
    );
    stopped_worker.expect("stops").unwrap().expect("ran");

    assert!(
        consumers_seen.iter().all(|c| *c == 0),
        "no consumer at the broker while open, across the reconnection: {consumers_seen:?}"
    );
    let transitions = changes.lock().unwrap().clone();
    let trial = transitions
        .iter()
        .find(|t| {
            t.at >= half_open_at
                .checked_sub(Duration::from_secs(1))
                .unwrap_or(half_open_at)
                && matches!(t.to, rabbit_guard::breaker::BreakerState::HalfOpen { .. })
        })
        .map(|t| t.at);
    let closed = transitions
        .iter()
        .find(|t| t.to == rabbit_guard::breaker::BreakerState::Closed)
        .map(|t| t.at);
    let opened = transitions
        .iter()
        .find(|t| matches!(t.to, rabbit_guard::breaker::BreakerState::Open { .. }))
        .map(|t| t.at)
        .expect("opened");
    let during_open = handler.calls_between(
        opened + Duration::from_millis(50),
        trial.unwrap_or(half_open_at),
    );
    assert_eq!(
        during_open, 0,
        "no call while the breaker was open (the calls in flight when it tripped aside)"
    );
    if let (Some(trial), Some(closed)) = (trial, closed) {
        let probing = handler.calls_between(trial, closed);
        assert!(
            probing <= probes,
            "half-open: {probing} calls before it closed, at most {probes} probe(s)"
        );
    }
    assert!(
        all,
        "every message handled once the dependency is back: {}",
        handler.distinct()
    );
    let duplicates = all_handled_nothing_lost(live, &consumer, &ids, &handler).await;
    eprintln!(
        "cluster outage: stopped node {} while open; reconnected to node {} {after:?} after the trip; {} consumer samples all 0; 0 calls while open; {n} handled, 0 lost, {duplicates} duplicates",
        stopped + 1,
        node + 1,
        consumers_seen.len()
    );
}
