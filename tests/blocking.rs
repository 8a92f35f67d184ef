//! A handler that blocks its thread (`std::thread::sleep`, as a sync driver
//! would) on the default one-thread worker: the admin endpoint keeps
//! answering, the broker keeps the connection (1 s heartbeat), the watchdog
//! names the queue once, and nothing is lost.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::proxy::free_port;
use common::*;
use rabbit_guard::handler::{Context, Handler, HandlerError};

/// Blocks its thread for 3 s on the message `block`; the rest are quick.
struct Blocking {
    done: Arc<AtomicUsize>,
}

impl Handler for Blocking {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        if ctx.message_id() == Some("block") {
            std::thread::sleep(Duration::from_secs(3));
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_handler_does_not_freeze_the_endpoint_or_the_connection() {
    let broker = Arc::new(TestBroker::connect().await);
    let admin_port = free_port();
    let mut settings = settings("blocking", "blocking", fast_breaker());
    settings.broker.url = format!("{}?heartbeat=1", amqp_addr()).into();
    settings.admin.listen = Some(format!("127.0.0.1:{admin_port}"));
    settings.consumers[0].concurrency = 8;
    settings.consumers[0].prefetch = 16;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    broker
        .publish_raw(&consumer.queue, "block", b"{}", "application/json")
        .await;
    let ids = broker.publish_json(&consumer.queue, "quick", 7).await;
    let total = ids.len() + 1;

    // The worker as the binary runs it: one thread (worker.threads = 1).
    let done = Arc::new(AtomicUsize::new(0));
    let captured = Captured::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker_thread = {
        let (done, captured, stop) = (done.clone(), captured.clone(), stop.clone());
        std::thread::spawn(move || {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("info,lapin=off")
                .with_ansi(false)
                .with_writer(move || captured.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                let rt = rabbit_guard::cli::worker_runtime(1).unwrap();
                rt.block_on(async {
                    rabbit_guard::Worker::builder(settings)
                        .handler("blocking", Blocking { done })
                        .build()
                        .unwrap()
                        .run_until(stop)
                        .await
                })
            })
        })
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{admin_port}");
    // Wait for the endpoint, then probe it through the block.
    assert!(
        wait_until_async(Duration::from_secs(10), || {
            let (client, base) = (client.clone(), base.clone());
            async move { client.get(format!("{base}/healthz")).send().await.is_ok() }
        })
        .await,
        "the admin endpoint should come up"
    );
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    let probe_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < probe_until {
        let t = Instant::now();
        match client.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status() == 200 => slowest = slowest.max(t.elapsed()),
            Ok(r) => failures.push(format!("status {}", r.status())),
            Err(e) => failures.push(format!("{e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failures.is_empty() && slowest < Duration::from_millis(200),
        "/healthz answers within 200 ms while a handler blocks: slowest {slowest:?}, failures {failures:?}"
    );
    assert!(
        wait_until(Duration::from_secs(15), || done.load(Ordering::SeqCst)
            == total)
        .await,
        "all {total} handled: {}",
        done.load(Ordering::SeqCst)
    );
    let status: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!("{base}/status"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    stop.cancel();
    worker_thread.join().unwrap().unwrap();
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let reconnects: u64 = status["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reconnects"].as_u64().unwrap())
        .sum();
    assert_eq!(
        reconnects, 0,
        "the broker kept both connections through the 3 s block (1 s heartbeat): {status}\n{log}"
    );
    assert!(
        !log.contains("lost the connection"),
        "no connection was lost:\n{log}"
    );
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("blocking its thread"))
        .collect::<Vec<_>>();
    assert_eq!(warnings.len(), 1, "the watchdog warns once:\n{log}");
    assert!(
        warnings[0].contains(&consumer.queue) && warnings[0].contains("spawn_blocking"),
        "naming the queue and what to do: {}",
        warnings[0]
    );
    let (ready, _) = broker.counts(&consumer.queue).await;
    assert_eq!(
        ready, 0,
        "nothing is left in the queue (all acked, none lost)"
    );
    eprintln!("blocking handler: slowest /healthz {slowest:?}, 0 reconnects, 1 warning");
    broker.cleanup().await;
}
