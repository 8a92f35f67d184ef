//! Declaring what a consumer needs at the broker: the work queue, its
//! dead-letter exchange and queue, and one TTL delay queue per retry level.
//!
//! ```text
//! work queue ──(our copy, or the broker's own dead-lettering)──▶ {queue}.dlx ──▶ {queue}.dlq
//!     ▲
//!     └── x-dead-letter-exchange "" ◀── {queue}.delay.{d}  (x-message-ttl = d)
//! ```

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{ConsumerSettings, QueueType};
use crate::error::{Error, amqp_error};

/// The names and arguments one consumer uses.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Index of the consumer in `[[consumers]]`, for error messages.
    pub index: usize,
    /// The work queue.
    pub queue: String,
    /// Queue type of every queue declared here.
    pub queue_type: QueueType,
    /// Dead-letter exchange (direct).
    pub dead_letter_exchange: String,
    /// Dead-letter queue, bound to the exchange with its own name as key.
    pub dead_letter_queue: String,
    /// `(delay, queue name)` per retry level, in order.
    pub delay_queues: Vec<(Duration, String)>,
    /// Whether to declare (true) or only check that everything exists (false).
    pub declare: bool,
    /// Quorum delivery limit to declare on the work queue.
    pub delivery_limit: Option<u32>,
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl Topology {
    /// The topology of consumer `index`.
    #[must_use]
    pub fn of(index: usize, c: &ConsumerSettings) -> Self {
        Self {
            index,
            queue: c.queue.clone(),
            queue_type: c.queue_type,
            dead_letter_exchange: c.dead_letter_exchange(),
            dead_letter_queue: c.dead_letter_queue(),
            delay_queues: c
                .retry
                .delays
                .iter()
                .map(|d| (*d, c.delay_queue(*d)))
                .collect(),
            declare: c.declare,
            delivery_limit: c.delivery_limit,
        }
    }

    fn type_args(&self, args: &mut FieldTable) {
        // Classic is the broker's default: leave the argument out so queues
        // declared without it elsewhere still match.
        if self.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), long("quorum"));
        }
    }

    /// Arguments of the work queue.
    #[must_use]
    pub fn work_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        self.type_args(&mut args);
        args.insert(
            "x-dead-letter-exchange".into(),
            long(&self.dead_letter_exchange),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            long(&self.dead_letter_queue),
        );
        if let (QueueType::Quorum, Some(limit)) = (self.queue_type, self.delivery_limit) {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
        args
    }

    fn delay_queue_args(&self, delay: Duration) -> FieldTable {
        let mut args = FieldTable::default();
        self.type_args(&mut args);
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&self.queue));
        if self.queue_type == QueueType::Quorum {
            // Quorum queues dead-letter at most once unless told otherwise;
            // an expired retry must not be dropped on the way back.
            args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
            args.insert("x-overflow".into(), long("reject-publish"));
        }
        args
    }

    fn queue_options(&self) -> QueueDeclareOptions {
        QueueDeclareOptions {
            durable: true,
            passive: !self.declare,
            ..QueueDeclareOptions::default()
        }
    }

    fn error(&self, kind: &'static str, e: &lapin::Error) -> Error {
        match amqp_error(e) {
            Some((406, detail)) => Error::TopologyMismatch {
                index: self.index,
                kind,
                detail,
            },
            Some((404, detail)) => Error::TopologyMissing {
                index: self.index,
                detail,
            },
            _ => Error::broker(
                format!("declaring the {kind}s of consumers[{}]", self.index),
                e.clone(),
            ),
        }
    }

    async fn queue(&self, channel: &Channel, name: &str, args: FieldTable) -> Result<(), Error> {
        let args = if self.declare {
            args
        } else {
            FieldTable::default()
        };
        channel
            .queue_declare(ShortString::from(name), self.queue_options(), args)
            .await
            .map(drop)
            .map_err(|e| self.error("queue", &e))
    }

    /// Declares (or, with `declare = false`, checks) everything. Idempotent.
    /// A broker error closes `channel`; use a channel of its own.
    ///
    /// # Errors
    ///
    /// [`Error::TopologyMismatch`] naming the queue and the differing argument
    /// when something exists with other arguments; [`Error::TopologyMissing`]
    /// when `declare = false` and something is absent.
    pub async fn declare(&self, channel: &Channel) -> Result<(), Error> {
        self.queue(channel, &self.queue, self.work_queue_args())
            .await?;
        let mut dlq_args = FieldTable::default();
        self.type_args(&mut dlq_args);
        self.queue(channel, &self.dead_letter_queue, dlq_args)
            .await?;
        channel
            .exchange_declare(
                ShortString::from(self.dead_letter_exchange.as_str()),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    passive: !self.declare,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.error("exchange", &e))?;
        if self.declare {
            channel
                .queue_bind(
                    ShortString::from(self.dead_letter_queue.as_str()),
                    ShortString::from(self.dead_letter_exchange.as_str()),
                    ShortString::from(self.dead_letter_queue.as_str()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.error("binding", &e))?;
        }
        for (delay, name) in &self.delay_queues {
            self.queue(channel, name, self.delay_queue_args(*delay))
                .await?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue {} → dead letters {} → {}",
            self.queue, self.dead_letter_exchange, self.dead_letter_queue
        )?;
        for (_, q) in &self.delay_queues {
            write!(f, ", delay {q}")?;
        }
        Ok(())
    }
}
