//! An application built on rabbit-guard from its own crate: a handler as a
//! trait impl, another as an async function with shared state, typed
//! `[app]` settings, and rabbit-guard's whole command line (`run`,
//! `check-config`, `dlq`, `status`, …) under this binary's name.
//!
//! Run with `cargo run -- run --config app.toml` (the README's "Use it in
//! your own crate" shows `app.toml`); CI builds it from outside the
//! rabbit-guard checkout and runs `tests/smoke.rs` against a real broker.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rabbit_guard::handler::{Context, Handler, HandlerError, Json, with_state};
use rabbit_guard::lapin::options::QueueDeclareOptions;
use rabbit_guard::lapin::types::FieldTable;
use rabbit_guard::lapin::{BasicProperties, Connection, ConnectionProperties};
use rabbit_guard::{App, BoxError};
use serde::Deserialize;

/// An order, as JSON.
#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
    amount_cents: i64,
}

/// Checks orders and announces each checked one on `{queue}.checked`.
/// A negative amount is a bad message.
struct CheckOrders;

impl Handler for CheckOrders {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
        if order.amount_cents < 0 {
            // The message is bad: dead-lettered at once, the breaker not charged.
            return Err(HandlerError::permanent(format!(
                "order {} has a negative amount",
                order.id
            )));
        }
        let checked = output_queue(ctx.queue(), "check-orders").unwrap_or_default();
        ctx.publish(
            "",
            &checked,
            order.id.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
    }
}

/// The `[app]` table of the config file.
#[derive(Debug, Deserialize)]
struct Settings {
    /// Prefixed to every counted message.
    label: String,
}

/// What the `count` handler shares between its calls.
#[derive(Debug, Clone)]
struct Counter {
    label: Arc<str>,
    seen: Arc<AtomicU64>,
}

/// Counts messages and announces each as `LABEL N: BODY` on `{queue}.counted`.
async fn count(counter: Counter, body: String, ctx: Context) -> Result<(), HandlerError> {
    let n = counter.seen.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::debug!(n, "counted");
    let counted = output_queue(ctx.queue(), "count").unwrap_or_default();
    let text = format!("{} {n}: {body}", counter.label);
    ctx.publish("", &counted, text.as_bytes(), BasicProperties::default())
        .await
}

/// Where a consumer's handler announces its work, by handler name.
fn output_queue(queue: &str, handler: &str) -> Option<String> {
    match handler {
        "check-orders" => Some(format!("{queue}.checked")),
        "count" => Some(format!("{queue}.counted")),
        _ => None,
    }
}

/// Declares the queues the handlers publish to (rabbit-guard declares the
/// work, delay and dead-letter queues; an application's own are its
/// business), with the AMQP client rabbit-guard re-exports.
async fn declare_outputs(settings: &rabbit_guard::config::Settings) -> Result<(), BoxError> {
    let connection = Connection::connect(
        settings.broker.url.expose(),
        ConnectionProperties::default(),
    )
    .await?;
    let channel = connection.create_channel().await?;
    for consumer in &settings.consumers {
        if let Some(queue) = output_queue(&consumer.queue, &consumer.handler) {
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.as_str().into(), durable, FieldTable::default())
                .await?;
        }
    }
    connection.close(200, "declared".into()).await?;
    Ok(())
}

fn main() -> ExitCode {
    App::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
        .about("Checks and counts orders (an application built on rabbit-guard)")
        .handlers(["check-orders", "count"])
        .setup(|worker, settings: Settings| async move {
            declare_outputs(worker.settings()).await?;
            let counter = Counter {
                label: settings.label.into(),
                seen: Arc::new(AtomicU64::new(0)),
            };
            Ok(worker
                .handler("check-orders", CheckOrders)
                .handler("count", with_state(counter, count)))
        })
        .main()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rabbit_guard::testing::{Action, Harness, TestMessage};

    #[tokio::test]
    async fn a_good_order_is_announced_and_a_bad_one_dead_lettered() {
        let harness = Harness::new().queue("orders");
        let good = harness
            .run(
                CheckOrders,
                TestMessage::new(r#"{"id": 7, "amount_cents": 100}"#),
            )
            .await;
        assert_eq!(good.action, Action::Ack, "{good:?}");
        assert_eq!(good.published.len(), 1);
        assert_eq!(
            (
                good.published[0].routing_key.as_str(),
                &good.published[0].body[..]
            ),
            ("orders.checked", &b"7"[..])
        );

        let bad = harness
            .run(
                CheckOrders,
                TestMessage::new(r#"{"id": 8, "amount_cents": -1}"#),
            )
            .await;
        assert_eq!(
            bad.action.dead_letter_reason().map(|r| r.as_str()),
            Some("permanent"),
            "{bad:?}"
        );
        assert!(bad.published.is_empty());

        let refused = Harness::new()
            .refuse_publishes()
            .run(
                CheckOrders,
                TestMessage::new(r#"{"id": 9, "amount_cents": 1}"#),
            )
            .await;
        assert!(
            matches!(
                refused.action,
                Action::Retry {
                    next_attempt: 2,
                    ..
                }
            ),
            "an announcement the broker refuses retries the order: {refused:?}"
        );
    }

    #[tokio::test]
    async fn the_counter_keeps_its_state_between_calls() {
        let counter = Counter {
            label: "seen".into(),
            seen: Arc::new(AtomicU64::new(0)),
        };
        let harness = Harness::new().queue("q");
        for _ in 0..2 {
            harness
                .run(with_state(counter.clone(), count), TestMessage::new("x"))
                .await;
        }
        let third = harness
            .run(with_state(counter, count), TestMessage::new("y"))
            .await;
        assert_eq!(third.published[0].body, b"seen 3: y");
    }
}
