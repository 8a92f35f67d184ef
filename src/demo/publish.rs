//! A steady publisher: numbered JSON messages at a fixed rate, each confirmed.

use std::time::Duration;

use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::amqp::publish::{PublishError, confirmed};
use crate::error::Error;

/// Publishes to `queue` at `rate` per second until `stop` or `count`
/// messages, with ids `{prefix}-{n}`. Returns how many were confirmed.
///
/// # Errors
///
/// A broker error, or the queue missing (messages came back unroutable).
pub(crate) async fn steady(
    connection: &Connection,
    queue: &str,
    prefix: &str,
    rate: f64,
    count: Option<u64>,
    stop: CancellationToken,
    mut on_confirm: impl FnMut(u64),
) -> Result<u64, Error> {
    let channel = crate::amqp::publish::confirm_channel(connection).await?;
    // Any rate, even 0, NaN or infinite, paces at something from 1 µs to 1,000 s.
    let every = Duration::try_from_secs_f64(1.0 / rate.clamp(0.001, 1e6))
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_micros(1));
    let mut ticks = tokio::time::interval_at(Instant::now(), every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent = 0u64;
    while count.is_none_or(|c| sent < c) {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        publish_one(&channel, queue, &format!("{prefix}-{sent}"), sent).await?;
        sent += 1;
        on_confirm(sent);
    }
    let _ = channel.close(200, "published".into()).await;
    Ok(sent)
}

async fn publish_one(channel: &Channel, queue: &str, id: &str, n: u64) -> Result<(), Error> {
    let body = format!(
        "{{\"id\":\"{id}\",\"n\":{n},\"amount_cents\":{}}}",
        100 + n % 900
    );
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(id))
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    confirmed(channel, "", queue, body.as_bytes(), properties)
        .await
        .map_err(|e| match e {
            PublishError::Unroutable { .. } => Error::QueueNotFound {
                queue: queue.to_owned(),
            },
            source => Error::Publish {
                target: queue.to_owned(),
                source,
            },
        })
}
