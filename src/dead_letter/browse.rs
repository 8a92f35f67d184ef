//! Reading a queue without changing it: consume without acking, then close
//! the channel, which puts every message back where it was.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
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
#[non_exhaustive]
pub struct Browse {
    /// Messages in the queue when the browse began.
    pub in_queue: u32,
    /// Messages read.
    pub read: u64,
}

pub(crate) async fn message_count(connection: &Connection, queue: &str) -> Result<u32, Error> {
    match crate::amqp::queue_counts(connection, queue).await {
        Ok((messages, _)) => Ok(messages),
        Err(e) if matches!(amqp_error(&e), Some((404, _))) => Err(Error::QueueNotFound {
            queue: queue.to_owned(),
        }),
        Err(e) => Err(Error::broker(format!("looking up queue {queue}"), e)),
    }
}

/// Deliveries one consumer may hold unacked. A browse acks nothing, so
/// once a consumer holds this many the reader cancels it (its messages stay
/// unacked on the channel, in order) and consumes again: the next consumer
/// gets the next messages (RabbitMQ applies `basic.qos` with
/// `global = false` to each consumer). The broker never sends more than
/// this ahead of the reader, so memory stays bounded however slowly the
/// output is read.
const WINDOW: u16 = 500;

/// Reads a queue in order without removing anything: every delivery stays
/// unacked (unless acked through [`Reader::ack`]) until the channel closes,
/// which puts the rest back where they were.
pub(crate) struct Reader {
    channel: Channel,
    queue: String,
    consumer: Consumer,
    /// Deliveries a cancelled consumer still held (none, when the broker
    /// kept to the prefetch), handed out before the next consumer's.
    leftovers: VecDeque<lapin::message::Delivery>,
    /// Deliveries of the current consumer taken and not acked.
    outstanding: u16,
    /// The current consumer's first delivery tag (tags grow on a channel).
    first_tag: Option<u64>,
    /// Messages read so far: the position of the last one.
    read: u64,
    /// The broker's version: which death headers it writes.
    broker: super::BrokerVersion,
}

impl Reader {
    pub(crate) async fn open(connection: &Connection, queue: &str) -> Result<Self, Error> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::broker("opening a channel", e))?;
        channel
            .basic_qos(WINDOW, BasicQosOptions { global: false })
            .await
            .map_err(|e| Error::broker("setting prefetch", e))?;
        let consumer = consume(&channel, queue).await?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
            consumer,
            leftovers: VecDeque::new(),
            outstanding: 0,
            first_tag: None,
            read: 0,
            broker: super::BrokerVersion::of_server(connection.configuration().server_properties()),
        })
    }

    /// The next message with its position in the queue (1 for the head),
    /// or `None` at the end of the stream or after [`IDLE`].
    pub(crate) async fn next_letter(&mut self) -> Result<Option<DeadLetter>, Error> {
        let Some(delivery) = self.next().await? else {
            return Ok(None);
        };
        self.read += 1;
        Ok(Some(DeadLetter::from_delivery_on(
            self.read,
            delivery,
            self.broker,
        )))
    }

    /// The next message `selector` picks among the first `in_queue` (those
    /// in the queue when the operation began: copies it made itself come
    /// later and are never read), telling `progress` of each one looked at;
    /// `None` at the end.
    pub(crate) async fn next_selected(
        &mut self,
        selector: &super::Selector,
        now: std::time::SystemTime,
        report: &mut super::MoveReport,
        progress: &mut impl FnMut(&super::MoveReport),
    ) -> Result<Option<DeadLetter>, Error> {
        while self.read < u64::from(report.in_queue) {
            let Some(dl) = self.next_letter().await? else {
                return Ok(None);
            };
            report.scanned = dl.position;
            if selector.matches(&dl, now) {
                return Ok(Some(dl));
            }
            progress(report);
        }
        Ok(None)
    }

    /// Messages read so far.
    pub(crate) fn read(&self) -> u64 {
        self.read
    }

    async fn next(&mut self) -> Result<Option<lapin::message::Delivery>, Error> {
        if let Some(d) = self.leftovers.pop_front() {
            return Ok(Some(d));
        }
        if self.outstanding >= WINDOW {
            // The broker sends this consumer nothing more, and everything it
            // sent has been taken: hand over to a fresh consumer.
            self.channel
                .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(|e| Error::broker(format!("reading queue {}", self.queue), e))?;
            // lapin still yields what it buffered before the cancel: keep
            // it, in order, so the scan skips nothing.
            while let Some(Some(item)) = self.consumer.next().now_or_never() {
                self.leftovers
                    .push_back(item.map_err(|e| Error::broker("reading messages", e))?);
            }
            self.consumer = consume(&self.channel, &self.queue).await?;
            self.outstanding = 0;
            self.first_tag = None;
            if let Some(d) = self.leftovers.pop_front() {
                return Ok(Some(d));
            }
        }
        match tokio::time::timeout(IDLE, self.consumer.next()).await {
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(Ok(d))) => {
                self.first_tag.get_or_insert(d.delivery_tag);
                self.outstanding += 1;
                Ok(Some(d))
            }
            Ok(Some(Err(e))) => Err(Error::broker("reading messages", e)),
        }
    }

    /// Acks (removes) one delivery taken from this reader.
    pub(crate) async fn ack(&mut self, delivery_tag: u64) -> Result<(), lapin::Error> {
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions::default())
            .await?;
        if self.first_tag.is_some_and(|first| delivery_tag >= first) {
            self.outstanding = self.outstanding.saturating_sub(1);
        }
        Ok(())
    }

    /// Closes the channel, which returns every unacked message to its
    /// place, then waits (up to [`SETTLE`]) until the queue holds at least
    /// `expect` messages again, so the next command sees them all.
    pub(crate) async fn close(self, connection: &Connection, expect: u32) -> Result<(), Error> {
        let Self {
            channel,
            queue,
            consumer,
            ..
        } = self;
        drop(consumer);
        close_reader(connection, channel, &queue, expect).await
    }
}

async fn consume(channel: &Channel, queue: &str) -> Result<Consumer, Error> {
    channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::broker(format!("reading queue {queue}"), e))
}

async fn close_reader(
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
/// channel closes). Memory stays bounded: the broker sends at most 500
/// messages ahead of `visit`, however slow it is. Stops early when `visit`
/// breaks.
///
/// # Errors
///
/// [`Error::QueueNotFound`], or a broker error.
///
/// # Cancel safety
///
/// Safe to drop at any await: browsing never acks, and everything it read
/// goes back to its place when the channel closes.
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
    let mut reader = Reader::open(connection, queue).await?;
    while reader.read() < u64::from(in_queue) {
        let Some(dl) = reader.next_letter().await? else {
            break;
        };
        if visit(dl).is_break() {
            break;
        }
    }
    seen.read = reader.read();
    reader.close(connection, in_queue).await?;
    Ok(seen)
}
