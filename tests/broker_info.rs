//! Issue 13, part 3: the worker says which broker each connection reached
//! (product, version, Erlang release, cluster name), read from the server
//! properties its own connection received (issue 23: no second connection).
#![allow(clippy::print_stderr)]

mod common;

use std::time::Duration;

use common::proxy::free_port;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::status::StatusView;

async fn status(port: u16) -> Option<StatusView> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/status"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str(&body).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_names_the_broker_version_and_cluster_it_reached() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("brokerinfo", "noop", fast_breaker());
    let port = free_port();
    settings.admin.listen = Some(format!("127.0.0.1:{port}"));
    let name = settings.broker.connection_name.clone();
    broker.track(&settings.consumers[0]);
    let running = Running::start(Worker::builder(settings)).await;

    let version = String::from_utf8_lossy(
        &rabbitmqctl()
            .arg("version")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("rabbitmqctl runs")
            .stdout,
    )
    .trim()
    .to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut shown: Vec<String> = Vec::new();
    while shown.len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        shown = status(port)
            .await
            .map(|s| s.connections.into_iter().filter_map(|c| c.broker).collect())
            .unwrap_or_default();
    }
    let read = shown.len() == 2;
    eprintln!("broker {version:?}; connections say {shown:?}");
    assert!(
        read,
        "both connections should name their broker within 10s: {shown:?}"
    );
    for b in &shown {
        assert!(
            b.starts_with(&format!("RabbitMQ {version} on Erlang")) && b.contains(", cluster "),
            "{b:?} should name RabbitMQ {version}, its Erlang release and its cluster"
        );
    }
    // The properties come with the worker's own connections: the broker
    // sees exactly those two, and no short-lived probe beside them.
    let ours: Vec<String> = list_connections(&["client_properties"])
        .lines()
        .filter(|l| l.contains(&format!("{name}/")))
        .map(|l| {
            if l.contains("(broker info)") {
                "a broker-info probe".to_owned()
            } else if l.contains(&format!("{name}/consume")) {
                "consume".to_owned()
            } else if l.contains(&format!("{name}/publish")) {
                "publish".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    let mut sorted = ours.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["consume", "publish"],
        "the worker's connections at the broker: {ours:?}"
    );
    running.stop().await;
    broker.cleanup().await;
}
