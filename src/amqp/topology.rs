//! Declaring what a consumer needs at the broker: the work queue, its
//! dead-letter exchange and queue, and one TTL delay queue per retry level.
//!
//! ```text
//! work queue ──(our copy, or the broker's own dead-lettering)──▶ {queue}.dlx ──▶ {queue}.dlq
//!     ▲
//!     └── x-dead-letter-exchange "" ◀── {queue}.delay.{d}  (x-message-ttl = d)
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{Binding, ConsumerSettings, Declare, ExchangeType, QueueType};
use crate::error::{Error, amqp_error};

/// `x-delivery-limit` of a quorum dead-letter queue: reads (`dlq list`,
/// `show`, `export`) count as deliveries, and RabbitMQ 4.0+ would drop a
/// dead letter after 20 of them.
pub(crate) const DEAD_LETTER_DELIVERY_LIMIT: i64 = 1_000_000;

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
    /// How much of it to declare.
    pub declare: Declare,
    /// Exchanges the work queue is bound to.
    pub bindings: Vec<Binding>,
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
            bindings: c.bind.clone(),
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

    /// True when rabbit-guard declares the queues beside the work queue
    /// (and may declare them again after a copy found one missing).
    #[must_use]
    pub fn declares(&self) -> bool {
        self.declare != Declare::Passive
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

    /// Declares queue `name` with `args`, or only checks that it exists.
    async fn queue(
        &self,
        channel: &Channel,
        name: &str,
        args: FieldTable,
        declare: bool,
    ) -> Result<(), Error> {
        let options = QueueDeclareOptions {
            durable: true,
            passive: !declare,
            ..QueueDeclareOptions::default()
        };
        let args = if declare { args } else { FieldTable::default() };
        channel
            .queue_declare(ShortString::from(name), options, args)
            .await
            .map(drop)
            .map_err(|e| self.error("queue", &e))
    }

    async fn exchange(
        &self,
        channel: &Channel,
        name: &str,
        kind: ExchangeKind,
        declare: bool,
    ) -> Result<(), Error> {
        channel
            .exchange_declare(
                ShortString::from(name),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    passive: !declare,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.error("exchange", &e))
    }

    /// [`declare`](Self::declare) on channels of its own: a dead-letter
    /// queue that an older rabbit-guard declared without a delivery limit
    /// is kept as it is (with a warning and the policy that fixes it) rather
    /// than refused.
    ///
    /// # Errors
    ///
    /// As [`declare`](Self::declare).
    pub async fn declare_on(&self, connection: &Connection) -> Result<(), Error> {
        let first = self.declare_with(connection, true).await;
        match first {
            Err(Error::TopologyMismatch { ref detail, .. })
                if self.is_old_dead_letter_queue(detail) =>
            {
                // Once per queue and process: every reconnect declares again,
                // and a policy, once applied, does not change the arguments
                // the broker compares.
                static WARNED: std::sync::Mutex<BTreeSet<String>> =
                    std::sync::Mutex::new(BTreeSet::new());
                let first = WARNED
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(self.dead_letter_queue.clone());
                if first {
                    tracing::warn!(
                        queue = %self.dead_letter_queue,
                        policy = %self.dead_letter_limit_policy(),
                        "the dead-letter queue is a quorum queue without x-delivery-limit (declared by an older rabbit-guard): \
                         on RabbitMQ 4.0+ every dlq list/show/export counts as a delivery and the broker drops a dead letter \
                         after 20; apply this policy (or recreate the queue after a dlq export); once it is applied, this \
                         warning still shows at startup, since a policy does not change the queue's declared arguments"
                    );
                }
                self.declare_with(connection, false).await
            }
            other => other,
        }
    }

    async fn declare_with(&self, connection: &Connection, dlq_limit: bool) -> Result<(), Error> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::broker("opening a channel to declare queues", e))?;
        let result = self.declare_inner(&channel, dlq_limit).await;
        if channel.status().connected() {
            let _ = channel.close(200, "declared".into()).await;
        }
        result
    }

    /// True when the broker refused the dead-letter queue's delivery limit
    /// because the queue exists without one.
    fn is_old_dead_letter_queue(&self, detail: &str) -> bool {
        self.queue_type == QueueType::Quorum
            && detail.contains("x-delivery-limit")
            && detail.contains(&format!("queue '{}'", self.dead_letter_queue))
    }

    /// The `rabbitmqctl set_policy` that gives an existing quorum dead-letter
    /// queue its delivery limit (add `-p VHOST` for another vhost than `/`).
    #[must_use]
    pub fn dead_letter_limit_policy(&self) -> String {
        set_policy(
            "/",
            &format!("rabbit-guard-dlq.{}", self.dead_letter_queue),
            &self.dead_letter_queue,
            &serde_json::json!({ "delivery-limit": DEAD_LETTER_DELIVERY_LIMIT }),
        )
    }

    /// Declares (or checks, as `declare` says) everything. Idempotent.
    /// A broker error closes `channel`; use a channel of its own.
    ///
    /// # Errors
    ///
    /// [`Error::TopologyMismatch`] naming the queue and the differing argument
    /// when something exists with other arguments; [`Error::TopologyMissing`]
    /// when something that must exist does not.
    pub async fn declare(&self, channel: &Channel) -> Result<(), Error> {
        self.declare_inner(channel, true).await
    }

    async fn declare_inner(&self, channel: &Channel, dlq_limit: bool) -> Result<(), Error> {
        let beside = self.declares();
        self.queue(
            channel,
            &self.queue,
            self.work_queue_args(),
            self.declare == Declare::Full,
        )
        .await?;
        let mut dlq_args = FieldTable::default();
        self.type_args(&mut dlq_args);
        if dlq_limit && self.queue_type == QueueType::Quorum {
            // Dead letters are read (browsed, exported), not handled: each
            // read is a delivery, and RabbitMQ 4.0+ drops a quorum queue's
            // message after 20 by default.
            dlq_args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT),
            );
        }
        self.queue(channel, &self.dead_letter_queue, dlq_args, beside)
            .await?;
        self.exchange(
            channel,
            &self.dead_letter_exchange,
            ExchangeKind::Direct,
            beside,
        )
        .await?;
        if beside {
            self.bind(
                channel,
                &self.dead_letter_queue,
                &self.dead_letter_exchange,
                &self.dead_letter_queue,
                FieldTable::default(),
            )
            .await?;
        }
        for (delay, name) in &self.delay_queues {
            self.queue(channel, name, self.delay_queue_args(*delay), beside)
                .await?;
        }
        for b in &self.bindings {
            // amq.* exchanges are the broker's own: they cannot be declared.
            let declare_it = beside && !b.exchange.starts_with("amq.");
            self.exchange(channel, &b.exchange, exchange_kind(b.kind), declare_it)
                .await?;
            self.bind(
                channel,
                &self.queue,
                &b.exchange,
                &b.routing_key,
                binding_arguments(&b.arguments),
            )
            .await?;
        }
        Ok(())
    }

    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        channel
            .queue_bind(
                ShortString::from(queue),
                ShortString::from(exchange),
                ShortString::from(routing_key),
                QueueBindOptions::default(),
                arguments,
            )
            .await
            .map_err(|e| self.error("binding", &e))
    }

    /// With `declare = "policy"`: the `rabbitmqctl set_policy` command that
    /// gives the work queue the broker-side dead-lettering (and delivery
    /// limit) `declare = "full"` would have declared as arguments. `vhost`
    /// is the broker URL's.
    #[must_use]
    pub fn policy_command(&self, vhost: &str) -> Option<String> {
        if self.declare != Declare::Policy {
            return None;
        }
        let mut definition = serde_json::json!({
            "dead-letter-exchange": self.dead_letter_exchange,
            "dead-letter-routing-key": self.dead_letter_queue,
        });
        if let (QueueType::Quorum, Some(limit)) = (self.queue_type, self.delivery_limit) {
            definition["delivery-limit"] = limit.into();
        }
        Some(set_policy(
            vhost,
            &format!("rabbit-guard.{}", self.queue),
            &self.queue,
            &definition,
        ))
    }
}

/// The `rabbitmqctl set_policy` named `name` that applies `definition` to
/// exactly the queue `queue` in `vhost`.
fn set_policy(vhost: &str, name: &str, queue: &str, definition: &serde_json::Value) -> String {
    let vhost = if vhost == "/" || vhost.is_empty() {
        String::new()
    } else {
        format!("-p {} ", shell_quote(vhost))
    };
    format!(
        "rabbitmqctl set_policy {vhost}--apply-to queues {} {} {}",
        shell_quote(name),
        shell_quote(&format!("^{}$", regex_escape(queue))),
        shell_quote(&definition.to_string())
    )
}

fn exchange_kind(kind: ExchangeType) -> ExchangeKind {
    match kind {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

/// Binding arguments as AMQP values: strings, integers, booleans
/// (validation refuses anything else).
fn binding_arguments(
    arguments: &std::collections::BTreeMap<String, serde_json::Value>,
) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in arguments {
        let value = match v {
            serde_json::Value::Bool(b) => AMQPValue::Boolean(*b),
            serde_json::Value::Number(n) if n.is_i64() => {
                AMQPValue::LongLongInt(n.as_i64().unwrap_or_default())
            }
            serde_json::Value::String(s) => long(s),
            _ => continue,
        };
        table.insert(k.as_str().into(), value);
    }
    table
}

/// `s` as one shell word: in single quotes, a `'` written `'\''`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `s` matching itself in a regular expression (a queue name's `.`).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
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
