//! The chaos test: 20,000 messages through a worker binary behind a TCP
//! proxy, a dependency that fails and stalls at random, three connection
//! cuts and two `kill -9`s; and the same on the 3-node RabbitMQ 4 cluster
//! (a proxy per node, a quorum queue) with a node stopped among the faults.
//! Ignored by default (about a minute each); run with
//! `cargo test --test chaos -- --ignored` (CI runs them: see README).
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use rabbit_guard::config::RetrySettings;
use tokio::time::Instant;

const MESSAGES: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes about a minute; run with --ignored"]
async fn chaos_loses_nothing() {
    chaos(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node RabbitMQ 4 cluster (scripts/rabbitmq.sh start 3); about a minute"]
async fn chaos_on_the_cluster_with_a_node_stop_loses_nothing() {
    chaos(true).await;
}

/// On the cluster: one proxy per node, a quorum queue, and node 2 stopped
/// (then started again) among the faults.
async fn chaos(cluster: bool) {
    use common::cluster::{NODES, StartAgain, ctl, node_url};
    let started = Instant::now();
    let broker = Arc::new(if cluster {
        TestBroker::connect_to(&node_url(NODES[0])).await
    } else {
        TestBroker::connect().await
    });
    let proxies = if cluster {
        let mut all = Vec::new();
        for port in NODES {
            all.push(Proxy::start_to(([127, 0, 0, 1], port).into()).await);
        }
        all
    } else {
        vec![Proxy::start().await]
    };
    let downstream = Downstream::start().await;
    downstream.set(Mode::Chaos {
        fail_percent: 5,
        max_latency: Duration::from_millis(20),
    });
    let breaker = {
        let mut v = fast_breaker();
        v.minimum_calls = 50;
        v
    };
    let mut settings = with_http(settings("chaos", "http", breaker), &downstream);
    if cluster {
        settings.broker.url = rabbit_guard::config::BrokerSettings::default().url;
        settings.broker.urls = proxies
            .iter()
            .map(|p| p.url("?heartbeat=2").into())
            .collect();
        settings.consumers[0].queue_type = rabbit_guard::config::QueueType::Quorum;
        settings.consumers[0].delivery_limit = Some(1_000);
    } else {
        settings.broker.url = proxies[0].url("?heartbeat=2").into();
    }
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.broker.reconnect.max_delay = Duration::from_secs(1);
    settings.consumers[0].prefetch = 256;
    settings.consumers[0].concurrency = 64;
    settings.consumers[0].retry = RetrySettings::new(vec![
        Duration::from_millis(200),
        Duration::from_millis(500),
        Duration::from_secs(1),
    ]);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "x", MESSAGES).await;
    let dlq = consumer.dead_letter_queue();

    let mut child = Child::spawn(&settings, &["run"]);
    let mut cuts = 0;
    let mut kills = 0;
    let mut node_stops = 0;
    let mut _start_node_2_again = None;
    // Faults at these fractions of the messages processed.
    let plan: &[(f64, &str)] = if cluster {
        &[
            (0.10, "cut"),
            (0.20, "kill"),
            (0.30, "stop node 2"),
            (0.40, "cut"),
            (0.50, "kill"),
            (0.60, "start node 2"),
            (0.70, "cut"),
        ]
    } else {
        &[
            (0.10, "cut"),
            (0.20, "kill"),
            (0.35, "cut"),
            (0.50, "kill"),
            (0.65, "cut"),
        ]
    };
    for &(fraction, fault) in plan {
        let target = (MESSAGES as f64 * fraction) as usize;
        assert!(
            wait_until(Duration::from_secs(90), || downstream.succeeded_ids().len()
                >= target)
            .await,
            "no progress to {target} before the next fault; log:\n{}",
            child.stderr()
        );
        match fault {
            "cut" => {
                for proxy in &proxies {
                    proxy.cut_all();
                }
                cuts += 1;
            }
            "stop node 2" | "start node 2" => {
                let action = if fault.starts_with("stop") {
                    "stop_app"
                } else {
                    "start_app"
                };
                let out = ctl(2, &[action]);
                assert!(
                    out.status.success(),
                    "{action} on node 2: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                if action == "stop_app" {
                    node_stops += 1;
                    _start_node_2_again = Some(StartAgain(vec![2]));
                } else {
                    _start_node_2_again = None;
                }
            }
            _ => {
                child.signal("KILL");
                assert!(
                    child.wait(Duration::from_secs(10)).await.is_some(),
                    "kill -9 should end worker {} within 10 s",
                    child.pid()
                );
                child = Child::spawn(&settings, &["run"]);
                kills += 1;
            }
        }
    }
    let done = {
        let broker = broker.clone();
        let dlq = dlq.clone();
        let downstream = downstream.clone();
        move || {
            let broker = broker.clone();
            let dlq = dlq.clone();
            let succeeded = downstream.succeeded_ids().len();
            async move { succeeded + broker.ready(&dlq).await as usize >= MESSAGES }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "not finished in time; log:\n{}",
            child.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

    let calls = downstream.calls();
    let ok_calls = calls.iter().filter(|c| c.status == 200).count();
    let succeeded: HashSet<String> = calls
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| c.id.clone())
        .collect();
    let dead: Vec<Got> = broker.drain(&dlq).await;
    let dead_ids: HashSet<String> = dead.iter().map(|g| g.id.clone()).collect();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for d in &dead {
        *reasons
            .entry(d.header_str("rg-reason").unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !succeeded.contains(*id) && !dead_ids.contains(*id))
        .collect();
    let duplicates = ok_calls - succeeded.len();
    eprintln!(
        "chaos{}: published {MESSAGES} / acked-after-success {} / dead-lettered {} {reasons:?} / duplicates {duplicates} / lost {} \
         ({cuts} cuts, {kills} kills, {node_stops} node stops, {} calls, {:?})",
        if cluster { " on the cluster" } else { "" },
        succeeded.len(),
        dead.len(),
        lost.len(),
        calls.len(),
        started.elapsed()
    );
    assert!(
        lost.is_empty(),
        "lost {} messages, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        !reasons.contains_key("(none)"),
        "every dead letter carries its reason: {} dead letters by reason {reasons:?}",
        dead.len()
    );
    broker.cleanup().await;
}
