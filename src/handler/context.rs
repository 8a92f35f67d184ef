//! What a handler knows about the message besides its decoded body.

use std::sync::{Arc, Mutex};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::amqp::headers::{self, header_u64, value_str};
use crate::amqp::publish::{PublishError, Publisher};

use super::HandlerError;
use super::guard::Lent;
use crate::breaker::BreakerSet;

/// The delivery a handler is working on: properties, headers, attempt
/// number, and a way to publish. Cheap to clone (the delivery is shared), so
/// a [`handler_fn`](super::handler_fn) takes it by value.
#[derive(Clone)]
pub struct Context {
    pub(super) delivery: Arc<Delivery>,
    publisher: Option<Outlet>,
    /// The consumer's breakers, for [`guard`](Self::guard).
    pub(super) breakers: Option<BreakerSet>,
    /// The `reply_to` prefixes [`reply`](Self::reply) may answer (`None`: any).
    reply_prefixes: Option<Arc<[String]>>,
}

/// The delivery, not the publishing connection (its settings are the
/// broker's business, not a log line's).
impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("delivery", &self.delivery)
            .field("can_publish", &self.publisher.is_some())
            .field("breakers", &self.breakers.as_ref().map(BreakerSet::names))
            .finish()
    }
}

/// Where [`Context::publish`] sends: the worker's publishing connection, or
/// the recorder of [`testing::Harness`](crate::testing::Harness).
#[derive(Clone)]
pub(crate) enum Outlet {
    Broker(Publisher),
    Recorded(Arc<crate::testing::Recorder>),
}

#[derive(Debug)]
pub(super) struct Delivery {
    pub(super) queue: Arc<str>,
    delivery_tag: u64,
    exchange: String,
    routing_key: String,
    redelivered: bool,
    properties: BasicProperties,
    body: Vec<u8>,
    attempt: u32,
    /// The breakers' permits while the handler runs (see `guard.rs`).
    pub(super) lent: Mutex<Lent>,
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
            delivery: Arc::new(Delivery {
                queue,
                delivery_tag,
                exchange,
                routing_key,
                redelivered,
                properties,
                body,
                attempt,
                lent: Mutex::new(Lent::default()),
            }),
            publisher: None,
            breakers: None,
            reply_prefixes: None,
        }
    }

    /// Handler publishes go out on the consumer's publishing connection.
    pub(crate) fn set_publisher(&mut self, publisher: Outlet) {
        self.publisher = Some(publisher);
    }

    /// [`guard`](Self::guard) counts calls against these breakers.
    pub(crate) fn set_breakers(&mut self, breakers: BreakerSet) {
        self.breakers = Some(breakers);
    }

    /// A context for unit-testing a handler without a broker: it cannot
    /// publish, and guards nothing. [`testing::Harness`](crate::testing::Harness)
    /// runs a handler as the worker would and says what it decided.
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
        &self.delivery.queue
    }

    /// The message's `message_id` property, if the publisher set one.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The `correlation_id` property.
    #[must_use]
    pub fn correlation_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The `content_type` property, e.g. `application/json`.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// True when the broker has delivered this message before (to this or
    /// another consumer) without it being acknowledged.
    #[must_use]
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// Which attempt this is: 1 the first time, 2 after one transient failure
    /// and a delay, and so on. Kept in the `rg-attempt` header.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.delivery.attempt
    }

    /// The exchange the message was published to (empty for the default exchange).
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.delivery.exchange
    }

    /// The routing key it was published with.
    #[must_use]
    pub fn routing_key(&self) -> &str {
        &self.delivery.routing_key
    }

    /// All message properties.
    #[must_use]
    pub fn properties(&self) -> &BasicProperties {
        &self.delivery.properties
    }

    /// The application headers (empty when there are none).
    #[must_use]
    pub fn headers(&self) -> Option<&FieldTable> {
        self.delivery.properties.headers().as_ref()
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
        &self.delivery.body
    }

    /// The delivery tag (per channel; for logs).
    #[must_use]
    pub fn delivery_tag(&self) -> u64 {
        self.delivery.delivery_tag
    }
}

impl Context {
    /// Publishes a message with publisher confirms on the worker's
    /// publishing connection (the one retries and dead letters use, so it
    /// shares the blocked-connection handling), `mandatory`, and waits for
    /// the broker to confirm it.
    ///
    /// # Errors
    ///
    /// A transient [`HandlerError`] when the broker did not store it
    /// (refused, unroutable, connection lost, no confirm within the publish
    /// timeout): the delivery is then retried like any transient failure, so
    /// a handler that publishes must tolerate publishing twice.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), HandlerError> {
        self.store(exchange, routing_key, body, properties)
            .await
            .map_err(|e| {
                HandlerError::transient(format!(
                    "publishing to exchange {exchange:?} with routing key {routing_key:?}: {e}"
                ))
            })
    }

    /// A confirmed publish through this context's outlet.
    async fn store(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), StoreError> {
        match &self.publisher {
            None => Err(StoreError::NoOutlet),
            Some(Outlet::Broker(publisher)) => publisher
                .publish_confirmed(exchange, routing_key, body, properties)
                .await
                .map_err(StoreError::Publish),
            Some(Outlet::Recorded(recorder)) => recorder
                .publish(exchange, routing_key, body, properties)
                .map_err(StoreError::Publish),
        }
    }

    /// Answers an RPC request: publishes `body` to the default exchange with
    /// the request's `reply_to` as routing key and its `correlation_id`
    /// (when it has one) set on `properties`, confirmed as [`publish`](Self::publish).
    ///
    /// # Errors
    ///
    /// A permanent [`HandlerError`] (the request is dead-lettered, not
    /// retried, and the breaker is not charged) when no retry would help:
    /// the request has no `reply_to`; its `reply_to` is not one the
    /// consumer's `reply_to_prefixes` allow; or the broker could not route
    /// the reply or refused it (the requester's queue is gone or full). A
    /// transient one when it is unknown whether the reply was stored (the
    /// connection was lost, no confirm came in time): then the request is
    /// retried, so the work before the reply must be safe to do twice.
    ///
    /// The work before a reply is usually done by then (a payment charged):
    /// a handler that must not repeat it on any account ignores the
    /// error (`if let Err(e) = ctx.reply(..).await { warn!(..) }`) and the
    /// request is acked.
    pub async fn reply(
        &self,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), HandlerError> {
        let Some(reply_to) = self.delivery.properties.reply_to().as_ref() else {
            return Err(HandlerError::permanent(
                "the request has no reply_to property: there is nowhere to send the reply",
            ));
        };
        let reply_to = reply_to.as_str();
        if let Some(allowed) = &self.reply_prefixes
            && !allowed.iter().any(|p| reply_to.starts_with(p.as_str()))
        {
            return Err(HandlerError::permanent(format!(
                "the request's reply_to {:?} is not allowed: reply_to_prefixes are {:?}",
                crate::text::printable(&crate::text::truncate(reply_to, 80)),
                allowed
            )));
        }
        let properties = match self.correlation_id() {
            Some(id) => properties.with_correlation_id(id.into()),
            None => properties,
        };
        match self.store("", reply_to, body, properties).await {
            Ok(()) => Ok(()),
            Err(StoreError::Publish(
                e @ (PublishError::Unroutable { .. } | PublishError::Nacked),
            )) => Err(HandlerError::permanent(format!(
                "the reply to {:?} was not delivered: {e} (the requester's queue is gone or refuses it; retrying would only repeat the work)",
                crate::text::printable(&crate::text::truncate(reply_to, 80))
            ))),
            Err(e) => Err(HandlerError::transient(format!(
                "replying to {:?}: {e}",
                crate::text::printable(&crate::text::truncate(reply_to, 80))
            ))),
        }
    }
}

/// Why a handler's publish was not stored.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("this context has no publishing connection (Context::for_test)")]
    NoOutlet,
    #[error("{0}")]
    Publish(PublishError),
}

impl Context {
    /// [`reply`](Self::reply) answers only a `reply_to` starting with one of
    /// these (the consumer's `reply_to_prefixes`; `None`: any).
    pub(crate) fn set_reply_prefixes(&mut self, prefixes: Option<Arc<[String]>>) {
        self.reply_prefixes = prefixes;
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
