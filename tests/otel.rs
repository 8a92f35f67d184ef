//! OpenTelemetry export (feature `otel`): a consumed message's span reaches
//! an OTLP/HTTP collector as a child of the publisher's trace. The
//! collector is a small receiver on 127.0.0.1 inside the test.
#![cfg(feature = "otel")]

mod common;

use rabbit_guard::lapin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP (JSON) trace receiver: every span it got.
async fn collector() -> (u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    async fn traces(
        State(spans): State<Arc<Mutex<Vec<serde_json::Value>>>>,
        body: Bytes,
    ) -> &'static str {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        let mut span = span.clone();
                        span["resource"] = rs["resource"].clone();
                        spans.lock().unwrap().push(span);
                    }
                }
            }
        }
        "{}"
    }
    let spans = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state(spans.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumed_messages_span_arrives_as_a_child_of_the_publishers_trace() {
    let broker = Arc::new(TestBroker::connect().await);
    let (port, spans) = collector().await;
    let mut settings = settings("otel", "noop", fast_breaker());
    settings.telemetry.otlp_endpoint = Some(format!("http://127.0.0.1:{port}").into());
    settings.telemetry.otlp_protocol = rabbit_guard::config::OtlpProtocol::HttpJson;
    settings.telemetry.service_name = "orders-worker".into();
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let mut h = lapin::types::FieldTable::default();
    h.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(format!("00-{TRACE_ID}-{PARENT_ID}-01").into()),
    );
    broker
        .publish_with_headers(&consumer.queue, "traced-1", h, b"{}")
        .await;
    let mut child = Child::spawn(&settings, &["run"]);
    let handled = wait_until_async(Duration::from_secs(15), || {
        let (broker, queue) = (broker.clone(), consumer.queue.clone());
        async move { broker.counts(&queue).await == (0, 1) }
    })
    .await;
    assert!(
        handled,
        "the message should be consumed: {}",
        child.stderr()
    );
    // SIGTERM: the worker stops and flushes its last spans.
    child.signal("TERM");
    let _ = child.wait(Duration::from_secs(20)).await;
    let arrived = wait_until(Duration::from_secs(10), || {
        spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "delivery")
    })
    .await;
    let spans = spans.lock().unwrap().clone();
    assert!(
        arrived,
        "the delivery span reaches the collector: {spans:?}\n{}",
        child.stderr()
    );
    let delivery = spans.iter().find(|s| s["name"] == "delivery").unwrap();
    assert_eq!(
        delivery["traceId"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some(TRACE_ID),
        "in the publisher's trace: {delivery}"
    );
    assert_eq!(
        delivery["parentSpanId"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some(PARENT_ID),
        "a child of the publisher's span: {delivery}"
    );
    assert!(
        delivery["resource"].to_string().contains("orders-worker"),
        "with the configured service.name: {delivery}"
    );
    assert!(
        delivery.to_string().contains("traced-1"),
        "carrying the message id: {delivery}"
    );
    broker.cleanup().await;
}
