//! One dead letter as read from the queue: what rabbit-guard's headers (or
//! the broker's `x-death`) say about it.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

use super::headers;
use super::json::{base64, properties_typed, table_plain};
use crate::amqp::headers::{header_u64, value_str};

/// A message in a dead-letter queue.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// 1-based position in the queue when it was read.
    pub position: u64,
    /// Delivery tag on the channel that read it.
    pub(crate) delivery_tag: u64,
    /// The `message_id` property.
    pub message_id: Option<String>,
    /// rabbit-guard's reason (`rg-reason`).
    pub reason: Option<String>,
    /// The broker's reason from `x-death` when the broker dead-lettered it
    /// (`rejected`, `expired`, `maxlen`, `delivery_limit`).
    pub broker_reason: Option<String>,
    /// The error text (`rg-error`).
    pub error: Option<String>,
    /// Attempts made (`rg-attempt`).
    pub attempts: Option<u64>,
    /// Times it was replayed before (`rg-replays`).
    pub replays: u64,
    /// The work queue it came from, as best known: the broker's `x-death`,
    /// else `rg-original-queue`. For display; replay trusts only
    /// [`broker_queue`](Self::broker_queue) or the configured consumer.
    pub original_queue: Option<String>,
    /// The queue the broker dead-lettered it from: the newest `x-death`
    /// entry (the broker puts its own in front of any a publisher wrote),
    /// else `x-last-death-queue` (read only from RabbitMQ 3.13 on, which
    /// writes it; before, only a publisher could have). `None` when
    /// rabbit-guard dead-lettered it. A publisher can write `x-death`
    /// itself, and the broker delivers it as written to a message published
    /// straight into the dead-letter queue (RabbitMQ 3.x and 4.x alike; 4.x
    /// only stops interpreting it): replay trusts it only where it names
    /// the dead-letter queue's own work queue.
    pub broker_queue: Option<String>,
    /// The broker it was read from, for who set its death headers.
    pub broker: BrokerVersion,
    /// The `rg-original-queue` header: written by the worker on its own dead
    /// letters, but a publisher could have set it on a message the broker
    /// dead-lettered, or on one published straight to this queue.
    pub claimed_queue: Option<String>,
    /// When it was dead-lettered (`rg-dead-lettered-at`, else `x-death`).
    pub dead_lettered_at: Option<SystemTime>,
    /// All properties, headers included.
    pub properties: BasicProperties,
    /// The body.
    pub body: Vec<u8>,
}

fn header<'a>(h: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    h?.inner().get(name)
}

fn text(h: Option<&FieldTable>, name: &str) -> Option<String> {
    header(h, name).and_then(value_str).map(str::to_owned)
}

/// The newest `x-death` entry: the broker puts the death it records in
/// front (a new entry, or an old one with the same queue and reason moved
/// there), so it is the broker's own even when a publisher wrote others.
fn newest_death(h: Option<&FieldTable>) -> Option<&FieldTable> {
    match header(h, "x-death")? {
        AMQPValue::FieldArray(a) => a.as_slice().iter().find_map(|v| match v {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

/// The RabbitMQ version a dead letter was read from: which death headers
/// the broker writes, and whether a publisher can write them too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub struct BrokerVersion {
    /// `3` of 3.10.8; 0 when unknown.
    pub major: u32,
    /// `10` of 3.10.8.
    pub minor: u32,
}

impl BrokerVersion {
    /// Unknown: every death header is treated as a publisher could have set it.
    pub const UNKNOWN: Self = Self { major: 0, minor: 0 };

    /// `3.10.8` (or `4.0.5+1`, `4.1.0-rc.1`) as 3.10; `None` for anything else.
    #[must_use]
    pub fn parse(version: &str) -> Option<Self> {
        let mut parts = version.trim().split(['.', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self { major, minor })
    }

    /// From the server properties a broker sends in `connection.start`.
    #[must_use]
    pub fn of_server(properties: &FieldTable) -> Self {
        text(Some(properties), "version")
            .and_then(|v| Self::parse(&v))
            .unwrap_or(Self::UNKNOWN)
    }

    /// RabbitMQ 3.13 added `x-last-death-*`: before, only a publisher
    /// could have set them.
    fn writes_last_death_headers(self) -> bool {
        (self.major, self.minor) >= (3, 13)
    }
}

impl std::fmt::Display for BrokerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Self::UNKNOWN {
            f.write_str("an unknown RabbitMQ version")
        } else {
            write!(f, "RabbitMQ {}.{}", self.major, self.minor)
        }
    }
}

/// Who set a header of a dead letter, as far as can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderOrigin {
    /// The broker (a quorum queue's `x-delivery-count`).
    Broker,
    /// The broker's death headers (`x-death` and kin): the broker writes
    /// them when it dead-letters, but a publisher can write them too, and
    /// they arrive as written on a message published straight into the
    /// dead-letter queue: not verified.
    BrokerOrPublisher,
    /// rabbit-guard's worker, when it dead-lettered the message (it
    /// overwrites these on its copy, whatever the message carried).
    RabbitGuard,
    /// Whoever published the message: not verified.
    Publisher,
}

impl HeaderOrigin {
    /// `broker`, `rabbit-guard`, `publisher`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Broker => "broker",
            Self::BrokerOrPublisher => "broker or publisher",
            Self::RabbitGuard => "rabbit-guard",
            Self::Publisher => "publisher",
        }
    }
}

/// The headers the worker writes itself on every dead letter.
const WRITTEN_BY_THE_WORKER: &[&str] = &[
    headers::REASON,
    headers::ERROR,
    headers::HANDLER,
    headers::ORIGINAL_QUEUE,
    headers::DEAD_LETTERED_AT,
    headers::ATTEMPT,
];

impl DeadLetter {
    /// Who set header `name`. rabbit-guard's headers count as its own only
    /// on a dead letter shaped like one the worker made (no `x-death`;
    /// reason, handler and time present; its original queue, when
    /// `consumer_queue` is known, that consumer's): on one the broker
    /// dead-lettered they came with the message, from its publisher.
    /// Anyone allowed to publish to the dead-letter queue itself could still
    /// forge that shape.
    #[must_use]
    pub fn header_origin(&self, name: &str, consumer_queue: Option<&str>) -> HeaderOrigin {
        if name == "x-delivery-count" {
            return HeaderOrigin::Broker;
        }
        if headers::BROKER_DEATH_HEADERS.contains(&name) {
            if name.starts_with("x-last-death-") && !self.broker.writes_last_death_headers() {
                return HeaderOrigin::Publisher;
            }
            return HeaderOrigin::BrokerOrPublisher;
        }
        let h = self.properties.headers().as_ref();
        let worker_made = self.broker_queue.is_none()
            && [headers::REASON, headers::HANDLER, headers::DEAD_LETTERED_AT]
                .iter()
                .all(|k| header(h, k).is_some())
            && consumer_queue.is_none_or(|q| self.claimed_queue.as_deref() == Some(q));
        if worker_made && WRITTEN_BY_THE_WORKER.contains(&name) {
            HeaderOrigin::RabbitGuard
        } else {
            HeaderOrigin::Publisher
        }
    }

    /// Reads the delivery at `position`, from a broker of an unknown
    /// version (see [`from_delivery_on`](Self::from_delivery_on)).
    #[must_use]
    pub fn from_delivery(position: u64, d: Delivery) -> Self {
        Self::from_delivery_on(position, d, BrokerVersion::UNKNOWN)
    }

    /// Reads the delivery at `position`, read from `broker`.
    #[must_use]
    pub fn from_delivery_on(position: u64, d: Delivery, broker: BrokerVersion) -> Self {
        let h = d.properties.headers().as_ref();
        let death = newest_death(h);
        let last = |name: &str| {
            broker
                .writes_last_death_headers()
                .then(|| text(h, name))
                .flatten()
        };
        let broker_reason = text(death, "reason").or_else(|| last("x-last-death-reason"));
        let broker_queue = text(death, "queue").or_else(|| last("x-last-death-queue"));
        let claimed_queue = text(h, headers::ORIGINAL_QUEUE);
        let broker_time = match header(death, "time") {
            Some(AMQPValue::Timestamp(t)) => {
                SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(*t))
            }
            _ => None,
        };
        let dead_lettered_at = text(h, headers::DEAD_LETTERED_AT)
            .and_then(|s| humantime::parse_rfc3339_weak(&s).ok())
            .or(broker_time);
        Self {
            position,
            delivery_tag: d.delivery_tag,
            message_id: d.properties.message_id().as_ref().map(ToString::to_string),
            reason: text(h, headers::REASON),
            broker_reason,
            error: text(h, headers::ERROR),
            attempts: h.and_then(|h| header_u64(h, headers::ATTEMPT)),
            replays: h.and_then(|h| header_u64(h, headers::REPLAYS)).unwrap_or(0),
            original_queue: broker_queue.clone().or_else(|| claimed_queue.clone()),
            broker_queue,
            broker,
            claimed_queue,
            dead_lettered_at,
            properties: d.properties,
            body: d.data,
        }
    }

    /// Why it is here: rabbit-guard's reason, else the broker's, else `unknown`.
    #[must_use]
    pub fn reason_label(&self) -> &str {
        self.reason
            .as_deref()
            .or(self.broker_reason.as_deref())
            .unwrap_or("unknown")
    }

    /// True when `reason` is this message's reason (ours or the broker's).
    #[must_use]
    pub fn has_reason(&self, reason: &str) -> bool {
        self.reason.as_deref() == Some(reason) || self.broker_reason.as_deref() == Some(reason)
    }

    /// How long ago it was dead-lettered, when known.
    #[must_use]
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        now.duration_since(self.dead_lettered_at?).ok()
    }

    /// The body as text, when it is UTF-8.
    #[must_use]
    pub fn body_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// The id shown to people: the message id, else `#position`.
    #[must_use]
    pub fn display_id(&self) -> String {
        self.message_id
            .clone()
            .unwrap_or_else(|| format!("#{}", self.position))
    }

    /// One JSON object with every header and the body (text, or base64 when
    /// it is not UTF-8): the `dlq list --json` line.
    #[must_use]
    pub fn to_json(&self, now: SystemTime) -> Value {
        let mut m = Map::new();
        m.insert("position".into(), json!(self.position));
        m.insert("message_id".into(), json!(self.message_id));
        m.insert("reason".into(), json!(self.reason));
        m.insert("broker_reason".into(), json!(self.broker_reason));
        m.insert("error".into(), json!(self.error));
        m.insert("attempts".into(), json!(self.attempts));
        m.insert("replays".into(), json!(self.replays));
        m.insert("original_queue".into(), json!(self.original_queue));
        m.insert("broker_queue".into(), json!(self.broker_queue));
        m.insert(
            "dead_lettered_at".into(),
            json!(
                self.dead_lettered_at
                    .map(|t| humantime::format_rfc3339_millis(t).to_string())
            ),
        );
        m.insert(
            "age_seconds".into(),
            json!(self.age(now).map(|d| d.as_secs())),
        );
        m.insert("size".into(), json!(self.body.len()));
        m.insert(
            "content_type".into(),
            json!(self.properties.content_type().as_ref().map(|s| s.as_str())),
        );
        m.insert(
            "headers".into(),
            Value::Object(
                self.properties
                    .headers()
                    .as_ref()
                    .map(table_plain)
                    .unwrap_or_default(),
            ),
        );
        match self.body_text() {
            Some(t) => m.insert("body".into(), json!(t)),
            None => m.insert("body_base64".into(), json!(base64(&self.body))),
        };
        Value::Object(m)
    }

    /// The lossless export line: typed properties (headers included) and
    /// the body in base64.
    #[must_use]
    pub fn to_export(&self) -> Value {
        json!({
            "properties": Value::Object(properties_typed(&self.properties)),
            "body_base64": base64(&self.body),
        })
    }
}
