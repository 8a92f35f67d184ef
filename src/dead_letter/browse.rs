//! Reading a queue without changing it: consume without acking, then close
//! the channel, which puts every message back where it was.

use std::ops::ControlFlow;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use tokio::time::Instant;

use super::DeadLetter;
use crate::error::{Error, amqp_error, describe};

/// When no message arrives for this long, the rest is held elsewhere (another
/// consumer has it unacked): stop reading.
const IDLE: Duration = Duration::from_secs(2);

/// How long to wait for the broker to put browsed messages back.
const SETTLE: Duration = Duration::from_secs(10);

/// What a browse saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Browse {
    /// Messages in the queue when the browse began.
    pub in_queue: u32,
    /// Messages read.
    pub read: u64,
}

pub(crate) async fn message_count(connection: &Connection, queue: &str) -> Result<u32, Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::broker("opening a channel", e))?;
    let result = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "counted".into()).await;
    match result {
        Ok(q) => Ok(q.message_count()),
        Err(e) if matches!(amqp_error(&e), Some((404, _))) => Err(Error::QueueNotFound {
            queue: queue.to_owned(),
        }),
        Err(e) => Err(Error::broker(format!("looking up queue {queue}"), e)),
    }
}

/// A channel consuming `queue` without acks and unlimited prefetch, so
/// nothing is removed until it is acked.
pub(crate) async fn open_reader(
    connection: &Connection,
    queue: &str,
) -> Result<(Channel, Consumer), Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::broker("opening a channel", e))?;
    channel
        .basic_qos(0, BasicQosOptions { global: false })
        .await
        .map_err(|e| Error::broker("setting prefetch", e))?;
    let consumer = channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::broker(format!("reading queue {queue}"), e))?;
    Ok((channel, consumer))
}

/// The next delivery, or `None` at the end of the stream or after [`IDLE`].
pub(crate) async fn next(
    consumer: &mut Consumer,
) -> Result<Option<lapin::message::Delivery>, Error> {
    match tokio::time::timeout(IDLE, consumer.next()).await {
        Err(_) | Ok(None) => Ok(None),
        Ok(Some(Ok(d))) => Ok(Some(d)),
        Ok(Some(Err(e))) => Err(Error::broker("reading messages", e)),
    }
}

/// Closes the reader, which returns every unacked message to its place,
/// then waits (up to [`SETTLE`]) until the queue holds at least `expect`
/// messages again, so the next command sees them all.
pub(crate) async fn close_reader(
    connection: &Connection,
    channel: Channel,
    queue: &str,
    expect: u32,
) -> Result<(), Error> {
    if let Err(e) = channel.close(200, "done browsing".into()).await {
        return Err(Error::broker(
            format!("returning messages to {queue}: {}", describe(&e)),
            e,
        ));
    }
    let deadline = Instant::now() + SETTLE;
    while message_count(connection, queue).await? < expect && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Calls `visit` for each message of `queue` in order, without removing,
/// reordering or changing any (they are read unacked and returned when the
/// channel closes). Memory stays bounded: each message is handed to `visit`
/// and dropped. Stops early when `visit` breaks.
///
/// # Errors
///
/// [`Error::QueueNotFound`], or a broker error.
pub async fn browse(
    connection: &Connection,
    queue: &str,
    mut visit: impl FnMut(DeadLetter) -> ControlFlow<()>,
) -> Result<Browse, Error> {
    let in_queue = message_count(connection, queue).await?;
    let mut seen = Browse { in_queue, read: 0 };
    if in_queue == 0 {
        return Ok(seen);
    }
    let (channel, mut consumer) = open_reader(connection, queue).await?;
    while seen.read < u64::from(in_queue) {
        let Some(delivery) = next(&mut consumer).await? else {
            break;
        };
        seen.read += 1;
        if visit(DeadLetter::from_delivery(seen.read, delivery)).is_break() {
            break;
        }
    }
    drop(consumer);
    close_reader(connection, channel, queue, in_queue).await?;
    Ok(seen)
}
