//! One dead letter as read from the queue: what rabbit-guard's headers (or
//! the broker's `x-death`) say about it.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

use super::headers;
use super::json::{base64, properties_typed, table_plain};
use crate::handler::{header_u64, value_str};

/// A message in a dead-letter queue.
#[derive(Debug, Clone)]
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
    /// The work queue it came from (`rg-original-queue`, else `x-death`).
    pub original_queue: Option<String>,
    /// When it was dead-lettered (`rg-dead-lettered-at`, else `x-death`).
    pub dead_lettered_at: Option<jiff::Timestamp>,
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

/// The first (oldest) `x-death` entry.
fn first_death(h: Option<&FieldTable>) -> Option<&FieldTable> {
    match header(h, "x-death")? {
        AMQPValue::FieldArray(a) => a.as_slice().iter().rev().find_map(|v| match v {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

impl DeadLetter {
    /// Reads the delivery at `position`.
    #[must_use]
    pub fn from_delivery(position: u64, d: Delivery) -> Self {
        let h = d.properties.headers().as_ref();
        let death = first_death(h);
        let broker_reason = text(h, "x-first-death-reason").or_else(|| text(death, "reason"));
        let broker_queue = text(h, "x-first-death-queue").or_else(|| text(death, "queue"));
        let broker_time = match header(death, "time") {
            Some(AMQPValue::Timestamp(t)) => i64::try_from(*t)
                .ok()
                .and_then(|s| jiff::Timestamp::from_second(s).ok()),
            _ => None,
        };
        let dead_lettered_at = text(h, headers::DEAD_LETTERED_AT)
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
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
            original_queue: text(h, headers::ORIGINAL_QUEUE).or(broker_queue),
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
    pub fn age(&self, now: jiff::Timestamp) -> Option<Duration> {
        let at = self.dead_lettered_at?;
        Duration::try_from(now.duration_since(at)).ok()
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
    pub fn to_json(&self, now: jiff::Timestamp) -> Value {
        let mut m = Map::new();
        m.insert("position".into(), json!(self.position));
        m.insert("message_id".into(), json!(self.message_id));
        m.insert("reason".into(), json!(self.reason));
        m.insert("broker_reason".into(), json!(self.broker_reason));
        m.insert("error".into(), json!(self.error));
        m.insert("attempts".into(), json!(self.attempts));
        m.insert("replays".into(), json!(self.replays));
        m.insert("original_queue".into(), json!(self.original_queue));
        m.insert(
            "dead_lettered_at".into(),
            json!(self.dead_lettered_at.map(|t| t.to_string())),
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
