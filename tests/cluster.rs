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
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::free_port;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::QueueType;
use rabbit_guard::handler::{Context, Handler, HandlerError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The cluster's nodes, by AMQP port.
const NODES: [u16; 3] = [5673, 5674, 5675];

fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=2")
}

/// `scripts/rabbitmq.sh ctl N ARGS…` (N: 1–3).
fn ctl(node: usize, args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg("ctl").arg(node.to_string()).args(args);
    cmd.output().expect("scripts/rabbitmq.sh runs")
}

/// Handles a message in about a millisecond, counting each id.
#[derive(Clone, Default)]
struct Counting {
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

impl Counting {
    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
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
        tokio::time::sleep(Duration::from_millis(1)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node RabbitMQ 4 cluster: scripts/rabbitmq.sh start 3"]
async fn stopping_the_consume_connections_node_loses_nothing() {
    let broker = TestBroker::connect_to(&node_url(NODES[0])).await;
    let admin_port = free_port();
    let mut settings = settings("cluster-stop", "counting", fast_breaker());
    settings.broker.url = rabbit_guard::config::BrokerSettings::default().url;
    settings.broker.urls = NODES.iter().map(|p| node_url(*p).into()).collect();
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
    let n = 10_000;
    let ids = broker.publish_json(&consumer.queue, "c", n).await;

    init_logs();
    let handler = Counting::default();
    let worker: Worker = Worker::builder(settings)
        .handler("counting", handler.clone())
        .build()
        .expect("three node URLs are valid");
    let token = CancellationToken::new();
    let join = tokio::spawn(worker.run_until(token.clone()));
    let admin = format!("http://127.0.0.1:{admin_port}");

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
    let out = ctl(stopped + 1, &["stop_app"]);
    let stopped_at = Instant::now();
    let at_stop = handler.calls();
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
            && handler.calls() > at_stop + 200
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
    let seen = handler.seen.lock().unwrap().clone();
    let lost: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        all && lost.is_empty(),
        "every message handled: {distinct} of {n}, lost {}: {:?}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        resumed_after <= Duration::from_secs(5),
        "consumption resumed on node {} within 5 s of stopping node {}: took {resumed_after:?}",
        resumed_node + 1,
        stopped + 1
    );
    // The first client may have been on the stopped node: ask another.
    let after = TestBroker::connect_to(&node_url(NODES[(stopped + 1) % NODES.len()])).await;
    after.track(&consumer);
    let dead = after.drain(&consumer.dead_letter_queue()).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {}", dead.len());
    assert_eq!(
        after.ready(&consumer.queue).await,
        0,
        "nothing left in the queue"
    );
    eprintln!(
        "cluster: stopped node {} (consume connection; publish on {:?}), resumed on node {} after {resumed_after:?}; {n} messages, 0 lost, {} duplicates",
        stopped + 1,
        publish_node.map(|p| p + 1),
        resumed_node + 1,
        calls - distinct as u64
    );
    after.cleanup().await;
}
