//! What a handler knows about the message besides its decoded body.

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::amqp::headers::{self, header_u64, value_str};

/// The delivery a handler is working on: properties, headers, attempt number.
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) queue: Arc<str>,
    pub(crate) delivery_tag: u64,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Vec<u8>,
    pub(crate) attempt: u32,
}

impl Context {
    /// `last_attempt`: the highest attempt number the consumer's delay levels
    /// can produce. A larger `rg-attempt` was not written by rabbit-guard
    /// (or by a config with more levels): the message starts over at 1
    /// rather than skipping its retries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        last_attempt: u32,
        queue: Arc<str>,
        delivery_tag: u64,
        exchange: String,
        routing_key: String,
        redelivered: bool,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Self {
        let attempt = properties
            .headers()
            .as_ref()
            .and_then(|h| header_u64(h, headers::ATTEMPT))
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| (1..=last_attempt).contains(n))
            .unwrap_or(1);
        Self {
            queue,
            delivery_tag,
            exchange,
            routing_key,
            redelivered,
            properties,
            body,
            attempt,
        }
    }

    /// A context for unit-testing a handler without a broker.
    #[must_use]
    pub fn for_test(queue: &str, properties: BasicProperties, body: Vec<u8>) -> Self {
        Self::new(
            u32::MAX,
            Arc::from(queue),
            1,
            String::new(),
            queue.to_owned(),
            false,
            properties,
            body,
        )
    }

    /// The queue the message was consumed from.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The message's `message_id` property, if the publisher set one.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|s| s.as_str())
    }

    /// The `correlation_id` property.
    #[must_use]
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The `content_type` property, e.g. `application/json`.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(|s| s.as_str())
    }

    /// True when the broker has delivered this message before (to this or
    /// another consumer) without it being acknowledged.
    #[must_use]
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Which attempt this is: 1 the first time, 2 after one transient failure
    /// and a delay, and so on. Kept in the `rg-attempt` header.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The exchange the message was published to (empty for the default exchange).
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key it was published with.
    #[must_use]
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// All message properties.
    #[must_use]
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The application headers (empty when there are none).
    #[must_use]
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// One header's raw value.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers()?.inner().get(name)
    }

    /// One header as text, when it is a string (or UTF-8 bytes).
    #[must_use]
    pub fn header_str(&self, name: &str) -> Option<&str> {
        value_str(self.header(name)?)
    }

    /// The raw body bytes.
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The delivery tag (per channel; for logs).
    #[must_use]
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    fn with_attempt(v: AMQPValue, last: u32) -> Context {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), v);
        Context::new(
            last,
            Arc::from("q"),
            1,
            String::new(),
            "q".into(),
            false,
            BasicProperties::default().with_headers(h),
            Vec::new(),
        )
    }

    #[test]
    fn an_attempt_outside_the_levels_starts_over_at_one() {
        assert_eq!(with_attempt(AMQPValue::LongLongInt(2), 3).attempt(), 2);
        assert_eq!(with_attempt(AMQPValue::LongLongInt(3), 3).attempt(), 3);
        assert_eq!(with_attempt(AMQPValue::LongLongInt(4), 3).attempt(), 1);
        assert_eq!(with_attempt(AMQPValue::LongLongInt(0), 3).attempt(), 1);
        assert_eq!(with_attempt(AMQPValue::LongLongInt(-5), 3).attempt(), 1);
        assert_eq!(
            with_attempt(AMQPValue::LongString("18446744073709551615".into()), 3).attempt(),
            1
        );
    }
}
