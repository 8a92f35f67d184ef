//! Run with `cargo run --example custom_handler` (RabbitMQ at `AMQP_ADDR`,
//! default `amqp://127.0.0.1:5672/%2f`; the billing service at `BILLING_URL`,
//! default `http://127.0.0.1:8080/charge`).
//!
//! A complete custom handler: it decodes JSON orders, rejects bad ones as
//! permanent errors (dead-lettered at once), and charges them through an
//! HTTP dependency whose failures are transient (retried, counted against
//! the breaker). It publishes a few sample orders, then consumes until Ctrl-C.
//!
//! With nothing listening at `BILLING_URL`, watch the breaker open after ten
//! failures and the consumer pause at the broker; start a server there (even
//! `python3 -m http.server 8080` answers POST with 501, which is permanent,
//! so try a real one) and watch it probe and resume.

use std::time::Duration;

use rabbit_guard::Topology;
use rabbit_guard::Worker;
use rabbit_guard::breaker::BreakerConfig;
use rabbit_guard::config::{ConsumerSettings, RetrySettings, Settings};
use rabbit_guard::handler::{Context, Handler, HandlerError, Json, ResultExt};
use rabbit_guard::lapin::options::BasicPublishOptions;
use rabbit_guard::lapin::types::ShortString;
use rabbit_guard::lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Deserialize;

/// The message body.
#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
    amount_cents: i64,
}

/// Charges each order through the billing service.
struct ChargeOrders {
    client: reqwest::Client,
    billing_url: String,
}

impl Handler for ChargeOrders {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
        // The message's own fault: no retry will fix it.
        if order.amount_cents <= 0 {
            return Err(HandlerError::permanent(format!(
                "order {} has a non-positive amount ({})",
                order.id, order.amount_cents
            )));
        }
        let response = self
            .client
            .post(&self.billing_url)
            .header("Idempotency-Key", ctx.message_id().unwrap_or_default())
            .body(format!(
                "{{\"order\":{},\"amount\":{}}}",
                order.id, order.amount_cents
            ))
            .send()
            .await
            .transient()?; // connection refused, timeout: the dependency's fault
        match response.status() {
            s if s.is_success() => Ok(()),
            s if s.is_server_error() || s.as_u16() == 429 => {
                Err(HandlerError::transient(format!("billing answered {s}")))
            }
            s => Err(HandlerError::permanent(format!(
                "billing rejected order {}: {s}",
                order.id
            ))),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info,lapin=off".into()))
        .init();
    let addr = std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://127.0.0.1:5672/%2f".into());
    let billing_url =
        std::env::var("BILLING_URL").unwrap_or_else(|_| "http://127.0.0.1:8080/charge".into());

    // Settings can come from files (`rabbit_guard::config::load`) or be built in code.
    let mut settings = Settings::default();
    settings.broker.url = addr.clone().into();
    settings.breakers.insert(
        "billing".into(),
        BreakerConfig::default()
            .with_call_timeout(Duration::from_secs(3))
            .with_open_timeout(Duration::from_secs(5), Duration::from_secs(60)),
    );
    settings.consumers.push(
        ConsumerSettings::new("example.orders", "charge-orders")
            .with_breaker("billing")
            .with_retry(RetrySettings::new([
                Duration::from_secs(2),
                Duration::from_secs(10),
            ])),
    );

    publish_samples(&addr, &settings.consumers[0]).await?;

    let handler = ChargeOrders {
        client: reqwest::Client::new(),
        billing_url,
    };
    Worker::builder(settings)
        .handler("charge-orders", handler)
        .run()
        .await?;
    Ok(())
}

/// Declares the queues and publishes a few orders, one of them bad.
async fn publish_samples(
    addr: &str,
    consumer: &ConsumerSettings,
) -> Result<(), Box<dyn std::error::Error>> {
    let connection = Connection::connect(addr, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    Topology::of(0, consumer).declare(&channel).await?;
    let orders = [(1, 1999), (2, 500), (3, -5), (4, 1250)];
    for (id, amount) in orders {
        let body = format!("{{\"id\":{id},\"amount_cents\":{amount}}}");
        channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(consumer.queue.as_str()),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_message_id(ShortString::from(format!("order-{id}")))
                    .with_content_type(ShortString::from("application/json"))
                    .with_delivery_mode(2),
            )
            .await?
            .await?;
    }
    tracing::info!(queue = %consumer.queue, count = orders.len(), "published sample orders");
    connection.close(200, "published".into()).await?;
    Ok(())
}
