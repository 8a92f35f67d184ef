//! Metrics recorded by handler code with the `metrics` macros appear on the
//! worker's `/metrics`. Alone in its binary: the worker installs the
//! process-wide recorder, which only the first worker of a process can.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::proxy::free_port;
use common::*;
use rabbit_guard::handler::{Context, Handler, HandlerError};

struct Counting;

impl Handler for Counting {
    type Message = Vec<u8>;

    async fn handle(&self, _body: Vec<u8>, _ctx: &Context) -> Result<(), HandlerError> {
        metrics::counter!("orders_charged_total", "currency" => "eur").increment(1);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_own_counter_shows_on_metrics() {
    let broker = Arc::new(TestBroker::connect().await);
    let port = free_port();
    let mut settings = settings("usermetrics", "counting", fast_breaker());
    settings.admin.listen = Some(format!("127.0.0.1:{port}"));
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    broker.publish_json(&consumer.queue, "m", 5).await;
    let running =
        Running::start(rabbit_guard::Worker::builder(settings).handler("counting", Counting)).await;
    let base = format!("http://127.0.0.1:{port}");
    let seen = wait_until_async(Duration::from_secs(15), || {
        let base = base.clone();
        async move {
            let Ok(response) = reqwest::get(format!("{base}/metrics")).await else {
                return false;
            };
            let text = response.text().await.unwrap_or_default();
            let samples = common::prom::parse(&text).unwrap_or_default();
            common::prom::value(&samples, "orders_charged_total", &[("currency", "eur")])
                == Some(5.0)
        }
    })
    .await;
    running.stop().await;
    assert!(
        seen,
        "orders_charged_total{{currency=\"eur\"}} reaches 5 on /metrics"
    );
    broker.cleanup().await;
}
