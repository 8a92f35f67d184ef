//! A test kit for handler authors: run a handler on a message built in the
//! test and see what the worker would do with it, without a broker.
//!
//! [`Harness::run`] calls the handler as a consumer does (the decoding, the
//! unreadable-header check, the breaker's `call_timeout`, panics caught,
//! immediate retries, the permits [`Context::guard`] uses) and reports:
//!
//! - [`Report::action`]: ack, retry through delay level *n*, put back without
//!   counting an attempt, or dead-letter with its reason (the same ack policy
//!   the worker applies, the README's outcome table);
//! - [`Report::published`]: what the handler sent with
//!   [`Context::publish`] and [`Context::reply`], in order;
//! - [`Report::breakers`]: what each breaker recorded, and which calls went
//!   through [`Context::guard`].
//!
//! The breakers live as long as the harness, so several runs can trip one
//! (a message the breaker refuses is [`Action::NotStarted`], as at the
//! worker).
//!
//! ```
//! use rabbit_guard::handler::{Context, HandlerError, Json, handler_fn};
//! use rabbit_guard::testing::{Action, Harness, TestMessage};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64, amount_cents: i64 }
//!
//! async fn charge(Json(order): Json<Order>, _ctx: Context) -> Result<(), HandlerError> {
//!     if order.amount_cents < 0 {
//!         return Err(HandlerError::permanent(format!("order {}: negative amount", order.id)));
//!     }
//!     Ok(())
//! }
//!
//! # tokio_test_block_on(async {
//! let harness = Harness::new();
//! let report = harness
//!     .run(handler_fn(charge), TestMessage::json(&serde_json::json!({"id": 1, "amount_cents": -5})))
//!     .await;
//! assert!(matches!(report.action, Action::DeadLetter { .. }), "{report:?}");
//!
//! let report = harness.run(handler_fn(charge), TestMessage::new("not json")).await;
//! assert_eq!(report.action.dead_letter_reason().map(|r| r.as_str()), Some("decode"));
//! # });
//! # fn tokio_test_block_on(f: impl std::future::Future<Output = ()>) {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};
use tokio::time::Instant;

use crate::amqp::copy;
use crate::amqp::headers;
use crate::amqp::publish::PublishError;
use crate::breaker::{Breaker, BreakerConfig, BreakerSet, BreakerState, CallOutcome, Permits};
use crate::config::{ConsumerSettings, RetrySettings, Settings};
use crate::consumer::task::{self, Call, Counted};
use crate::consumer::{Decision, Disposition, Outcome as PolicyOutcome, policy};
use crate::dead_letter::DeadLetterReason;
use crate::handler::{Context, ErasedHandler, Handler, Outlet, erase};

/// A message as a test builds it: body, properties, headers, and where it
/// came from.
#[derive(Debug, Clone)]
#[must_use]
pub struct TestMessage {
    body: Vec<u8>,
    properties: BasicProperties,
    exchange: String,
    routing_key: Option<String>,
    redelivered: bool,
}

impl TestMessage {
    /// A message with this body and no properties.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            properties: BasicProperties::default(),
            exchange: String::new(),
            routing_key: None,
            redelivered: false,
        }
    }

    /// `value` as a JSON body, with `content_type = application/json`.
    ///
    /// # Panics
    ///
    /// When `value` cannot be serialized (a map with non-string keys).
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        let body = serde_json::to_vec(value).expect("a test message serializes to JSON");
        Self::new(body).with_properties(
            BasicProperties::default().with_content_type("application/json".into()),
        )
    }

    /// All properties at once (headers included), replacing those set so far.
    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        self.properties = properties;
        self
    }

    /// The `message_id` property.
    pub fn with_message_id(mut self, id: &str) -> Self {
        self.properties = self.properties.with_message_id(id.into());
        self
    }

    /// The `correlation_id` property.
    pub fn with_correlation_id(mut self, id: &str) -> Self {
        self.properties = self.properties.with_correlation_id(id.into());
        self
    }

    /// The `reply_to` property (where [`Context::reply`] sends).
    pub fn with_reply_to(mut self, queue: &str) -> Self {
        self.properties = self.properties.with_reply_to(queue.into());
        self
    }

    /// One header.
    pub fn with_header(mut self, name: &str, value: impl Into<AMQPValue>) -> Self {
        let mut table = self.properties.headers().clone().unwrap_or_default();
        table.insert(name.into(), value.into());
        self.properties = self.properties.with_headers(table);
        self
    }

    /// One header with a text value (a long string, as most publishers send).
    pub fn with_text_header(self, name: &str, value: &str) -> Self {
        self.with_header(name, AMQPValue::LongString(LongString::from(value)))
    }

    /// Which attempt this delivery is (the `rg-attempt` header the worker
    /// writes on a retried copy): 1 is the first.
    pub fn attempt(self, attempt: u32) -> Self {
        self.with_header(headers::ATTEMPT, AMQPValue::LongLongInt(i64::from(attempt)))
    }

    /// The header rabbit-guard's AMQP parser leaves where a header could not
    /// be read (nested over 100 levels deep, an unknown type, a value past
    /// its table): the worker dead-letters such a message as `decode`
    /// without calling its handler.
    pub fn with_unreadable_header(self) -> Self {
        self.with_text_header(crate::amqp::UNREADABLE_KEY, "nested too deep")
    }

    /// The exchange and routing key it was published with (default: the
    /// default exchange, and the queue's name).
    pub fn published_to(mut self, exchange: &str, routing_key: &str) -> Self {
        self.exchange = exchange.to_owned();
        self.routing_key = Some(routing_key.to_owned());
        self
    }

    /// Marks it redelivered (the broker delivered it before, unacked).
    pub fn redelivered(mut self) -> Self {
        self.redelivered = true;
        self
    }
}

/// How the handler's last call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// `Ok(())`.
    Success,
    /// [`HandlerError::transient`](crate::handler::HandlerError::transient): the dependency failed.
    Transient(String),
    /// [`HandlerError::retry`](crate::handler::HandlerError::retry): try again, not the dependency's fault.
    Retry(String),
    /// The call outlived the breaker's `call_timeout`.
    TimedOut(Duration),
    /// [`HandlerError::permanent`](crate::handler::HandlerError::permanent): the message is bad.
    Permanent(String),
    /// The body (or a header) could not be decoded; the handler was not called.
    Decode(String),
    /// The handler panicked (the message says with what).
    Panic(String),
    /// Not called: a breaker refused the call (it is open, or its probes
    /// are taken).
    NotStarted,
}

impl From<&PolicyOutcome> for Outcome {
    fn from(o: &PolicyOutcome) -> Self {
        match o {
            PolicyOutcome::Success => Self::Success,
            PolicyOutcome::Transient(e) => Self::Transient(e.clone()),
            PolicyOutcome::Retry(e) => Self::Retry(e.clone()),
            PolicyOutcome::TimedOut(d) => Self::TimedOut(*d),
            PolicyOutcome::Permanent(e) => Self::Permanent(e.clone()),
            PolicyOutcome::Decode(e) => Self::Decode(e.clone()),
            PolicyOutcome::Panic(e) => Self::Panic(e.clone()),
        }
    }
}

/// What the worker does with the message afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Acknowledged: done.
    Ack,
    /// A copy goes to delay level `level` (it waits `delay`) and comes back
    /// as attempt `next_attempt`; the original is acked.
    Retry {
        /// Index into the consumer's `retry.delays`.
        level: usize,
        /// How long it waits.
        delay: Duration,
        /// The attempt it comes back as.
        next_attempt: u32,
    },
    /// Put back without using up an attempt (the dependency, not the
    /// message, failed): a copy waits `delay` in a delay queue, or goes to
    /// the work queue's tail when there are no delays (`None`).
    PutBack {
        /// How long it waits, if in a delay queue.
        delay: Option<Duration>,
    },
    /// A copy goes to the dead-letter queue with this reason and error text
    /// (`rg-reason`, `rg-error`); the original is acked.
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
        /// The error text, as `rg-error` carries it.
        error: String,
    },
    /// Not started: a breaker refused the call. The worker returns the
    /// message to the queue (or dead-letters it with `on_pause =
    /// "dead-letter"`); it is not an attempt.
    NotStarted,
}

impl Action {
    /// The dead-letter reason, when the message is dead-lettered.
    #[must_use]
    pub fn dead_letter_reason(&self) -> Option<DeadLetterReason> {
        match self {
            Action::DeadLetter { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// A message the handler published through [`Context::publish`] or
/// [`Context::reply`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Published {
    /// The exchange (`""`: the default exchange, as a reply uses).
    pub exchange: String,
    /// The routing key (a reply's: the request's `reply_to`).
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// The properties (a reply's carry the request's `correlation_id`).
    pub properties: BasicProperties,
}

/// What one breaker of the consumer saw of the run.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerUse {
    /// The breaker's name.
    pub name: String,
    /// What each [`Context::guard`] call on it recorded, in order.
    pub guarded: Vec<CallOutcome>,
    /// What the handler's own result recorded on it (when no guarded call
    /// used its permit): a success on every breaker, a failure on the one
    /// it blames, nothing on the others. `None`: nothing recorded this way.
    pub recorded: Option<CallOutcome>,
    /// Its state after the run.
    pub state: BreakerState,
}

/// What [`Harness::run`] saw.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// How the last call ended.
    pub outcome: Outcome,
    /// What the worker does with the message.
    pub action: Action,
    /// Handler calls made (more than 1 with `retry.immediate`).
    pub calls: u32,
    /// What the handler published, in order.
    pub published: Vec<Published>,
    /// Per breaker of the consumer, in order.
    pub breakers: Vec<BreakerUse>,
}

/// Runs handlers as a consumer of one queue would, without a broker. See
/// the [module docs](self).
#[derive(Debug)]
pub struct Harness {
    queue: String,
    retry: RetrySettings,
    breakers: BreakerSet,
    healthy: bool,
    refuse_publishes: bool,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A consumer of queue `test` with the default retry delays (5 s, 30 s,
    /// 2 min) and one breaker, `default`, with the default settings.
    #[must_use]
    pub fn new() -> Self {
        Self {
            queue: "test".to_owned(),
            retry: RetrySettings::default(),
            breakers: BreakerSet::new(vec![Breaker::new("default", BreakerConfig::default())]),
            healthy: true,
            refuse_publishes: false,
        }
    }

    /// The consumer of `queue` as `settings` configure it: its retry delays
    /// and immediate retries, and its breakers with their settings.
    ///
    /// # Errors
    ///
    /// When `settings` has no consumer of `queue`, or names a breaker it
    /// does not define.
    pub fn for_queue(settings: &Settings, queue: &str) -> Result<Self, HarnessError> {
        let consumer: &ConsumerSettings = settings
            .consumers
            .iter()
            .find(|c| c.queue == queue)
            .ok_or_else(|| HarnessError(format!("no [[consumers]] entry has queue = {queue:?}")))?;
        let mut breakers = Vec::new();
        for name in consumer.breaker_names() {
            let config = settings.breakers.get(name).ok_or_else(|| {
                HarnessError(format!(
                    "consumer {queue:?} names breaker {name:?}, which [breakers] does not define"
                ))
            })?;
            breakers.push(Breaker::new(name, config.clone()));
        }
        if breakers.is_empty() {
            breakers.push(Breaker::new("default", BreakerConfig::default()));
        }
        Ok(Self {
            queue: queue.to_owned(),
            retry: consumer.retry.clone(),
            breakers: BreakerSet::new(breakers),
            healthy: true,
            refuse_publishes: false,
        })
    }

    /// The queue's name ([`Context::queue`]).
    #[must_use]
    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = queue.to_owned();
        self
    }

    /// The consumer's `retry` settings.
    #[must_use]
    pub fn retry(mut self, retry: RetrySettings) -> Self {
        self.retry = retry;
        self
    }

    /// The consumer's breakers (for a handler that guards several
    /// dependencies), replacing the default one.
    ///
    /// # Panics
    ///
    /// When `breakers` is empty: a consumer has at least one.
    #[must_use]
    pub fn breakers<I, S>(mut self, breakers: I) -> Self
    where
        I: IntoIterator<Item = (S, BreakerConfig)>,
        S: Into<String>,
    {
        let list: Vec<Breaker> = breakers
            .into_iter()
            .map(|(name, config)| Breaker::new(name, config))
            .collect();
        assert!(!list.is_empty(), "a consumer has at least one breaker");
        self.breakers = BreakerSet::new(list);
        self
    }

    /// What the worker learns when a message's last attempt fails while the
    /// breaker stays closed: whether other calls to the dependency
    /// succeeded meanwhile. `true` (the default): they did, the message is
    /// at fault and is dead-lettered (`retries-exhausted`). `false`: no
    /// other call told either way, and the message is put back (at most 3
    /// times, counted in `rg-inconclusive`).
    #[must_use]
    pub fn dependency_otherwise_healthy(mut self, healthy: bool) -> Self {
        self.healthy = healthy;
        self
    }

    /// Makes every [`Context::publish`] and [`Context::reply`] fail as an
    /// unroutable message does at the broker (a transient error).
    #[must_use]
    pub fn refuse_publishes(mut self) -> Self {
        self.refuse_publishes = true;
        self
    }

    /// The breaker named `name`, to look at or to open by hand.
    #[must_use]
    pub fn breaker(&self, name: &str) -> Option<&Breaker> {
        self.breakers
            .position(name)
            .and_then(|i| self.breakers.get(i))
    }

    /// Runs `handler` on `message` as the worker would, and reports what
    /// it did and what the worker would do with the message. Pass a clone
    /// (or an `Arc`) to run the same handler again.
    pub async fn run<H: Handler>(&self, handler: H, message: TestMessage) -> Report {
        let handler = erase(handler);
        let recorder = Arc::new(Recorder {
            published: Mutex::new(Vec::new()),
            refuse: self.refuse_publishes,
        });
        let delays = &self.retry.delays;
        let last_attempt = u32::try_from(delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let mut ctx = Context::new(
            last_attempt,
            Arc::from(self.queue.as_str()),
            1,
            message.exchange,
            message.routing_key.unwrap_or_else(|| self.queue.clone()),
            message.redelivered,
            message.properties,
            message.body,
        );
        ctx.set_publisher(Outlet::Recorded(recorder.clone()));
        ctx.set_breakers(self.breakers.clone());

        let mut uses: Vec<BreakerUse> = self
            .breakers
            .iter()
            .map(|b| BreakerUse {
                name: b.name().to_owned(),
                guarded: Vec::new(),
                recorded: None,
                state: b.state(),
            })
            .collect();
        let Ok(permits) = self.breakers.try_acquire() else {
            self.note_states(&mut uses);
            return Report {
                outcome: Outcome::NotStarted,
                action: Action::NotStarted,
                calls: 0,
                published: Vec::new(),
                breakers: uses,
            };
        };
        let (call, counted, calls) = self.call(handler.as_ref(), &ctx, permits, &mut uses).await;
        let outage_suspected = counted.is_probe || !counted.state_after.admits_all();
        let outcome = policy::with_wait_note(call.outcome, call.retry_after, delays);
        let disposition = match policy::decide(
            &outcome,
            ctx.attempt(),
            delays,
            call.retry_after,
            outage_suspected,
        ) {
            Decision::Final(d) => d,
            Decision::NeedsVerdict => policy::after_verdict(
                if self.healthy {
                    crate::breaker::HealthVerdict::Healthy
                } else {
                    crate::breaker::HealthVerdict::Unknown
                },
                ctx.attempt(),
                copy::inconclusive_count(&ctx),
                delays.len(),
            ),
        };
        self.note_states(&mut uses);
        let action = action_of(&disposition, &outcome, delays);
        let published = std::mem::take(
            &mut *recorder
                .published
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        Report {
            outcome: Outcome::from(&outcome),
            action,
            calls,
            published,
            breakers: uses,
        }
    }

    fn note_states(&self, uses: &mut [BreakerUse]) {
        for (u, b) in uses.iter_mut().zip(self.breakers.iter()) {
            u.state = b.state();
        }
    }

    /// Calls the handler, again at once while `retry.immediate` allows, as
    /// the consumer does; notes what each breaker recorded in `uses`.
    async fn call(
        &self,
        handler: &dyn ErasedHandler,
        ctx: &Context,
        permits: Permits,
        uses: &mut [BreakerUse],
    ) -> (Call, Counted, u32) {
        let mut permits = permits;
        let mut immediate_left = self.retry.immediate;
        let mut calls = 0;
        loop {
            let is_probe = permits.is_probe();
            ctx.lend(permits);
            let started = Instant::now();
            let (outcome, retry_after, dependency) =
                task::call_handler(handler, ctx, self.breakers.call_timeout()).await;
            calls += 1;
            let ended = Instant::now();
            let call = Call {
                outcome,
                retry_after,
                dependency,
                ended,
                elapsed: ended.saturating_duration_since(started),
            };
            let lent = ctx.take_back();
            for (index, recorded) in &lent.guarded {
                if let Some(u) = uses.get_mut(*index) {
                    u.guarded.push(*recorded);
                }
            }
            let unused: Vec<usize> = lent
                .permits
                .as_ref()
                .map(|p| p.held_indexes().collect())
                .unwrap_or_default();
            let counted = task::count(&self.breakers, lent, &call, is_probe);
            for i in unused {
                if let Some(u) = uses.get_mut(i) {
                    u.recorded = Some(recorded_by_handler(&call, i, counted.blamed));
                }
            }
            if immediate_left > 0
                && call.outcome.is_retryable()
                && !counted.is_probe
                && counted.state_after.admits_all()
                && let Ok(next) = self.breakers.try_acquire()
                && !next.is_probe()
            {
                immediate_left -= 1;
                permits = next;
                continue;
            }
            return (call, counted, calls);
        }
    }
}

/// What the worker does with a message for `disposition`.
fn action_of(disposition: &Disposition, outcome: &PolicyOutcome, delays: &[Duration]) -> Action {
    match *disposition {
        Disposition::Ack => Action::Ack,
        Disposition::DeadLetter(reason) => Action::DeadLetter {
            reason,
            error: crate::text::truncate(&outcome.error_text(), crate::dead_letter::MAX_ERROR_LEN),
        },
        Disposition::Retry {
            level,
            next_attempt,
        } => Action::Retry {
            level,
            delay: delays[level],
            next_attempt,
        },
        Disposition::Defer { level, .. } => Action::PutBack {
            delay: level.map(|l| delays[l]),
        },
    }
}

/// What the handler's own result records on breaker `index` (see
/// `consumer/task.rs`, `count`).
fn recorded_by_handler(call: &Call, index: usize, blamed: usize) -> CallOutcome {
    match call.outcome {
        PolicyOutcome::Success => CallOutcome::Success,
        PolicyOutcome::Transient(_) | PolicyOutcome::TimedOut(_) if index == blamed => {
            CallOutcome::Failure
        }
        _ => CallOutcome::Ignored,
    }
}

/// Why a [`Harness`] could not be made from settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(String);

/// Keeps what a handler under test publishes.
#[derive(Debug)]
pub(crate) struct Recorder {
    published: Mutex<Vec<Published>>,
    refuse: bool,
}

impl Recorder {
    /// Records a publish, or refuses it as an unroutable message.
    pub(crate) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        if self.refuse {
            return Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Published {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                body: body.to_vec(),
                properties,
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{HandlerError, Json, handler_fn, with_state};

    async fn ok(_: Vec<u8>, _: Context) -> Result<(), HandlerError> {
        Ok(())
    }

    async fn down(_: Vec<u8>, _: Context) -> Result<(), HandlerError> {
        Err(HandlerError::transient("503 Service Unavailable"))
    }

    #[tokio::test]
    async fn every_row_of_the_outcome_table() {
        let h = Harness::new();
        assert_eq!(
            h.run(handler_fn(ok), TestMessage::new("x")).await.action,
            Action::Ack
        );
        let r = h.run(handler_fn(down), TestMessage::new("x")).await;
        assert_eq!(
            r.action,
            Action::Retry {
                level: 0,
                delay: Duration::from_secs(5),
                next_attempt: 2
            }
        );
        assert_eq!(r.breakers[0].recorded, Some(CallOutcome::Failure));
        let r = h
            .run(handler_fn(down), TestMessage::new("x").attempt(4))
            .await;
        assert_eq!(
            r.action.dead_letter_reason(),
            Some(DeadLetterReason::RetriesExhausted),
            "the last attempt with the dependency otherwise healthy: {r:?}"
        );
        let r = Harness::new()
            .dependency_otherwise_healthy(false)
            .run(handler_fn(down), TestMessage::new("x").attempt(4))
            .await;
        assert_eq!(
            r.action,
            Action::PutBack {
                delay: Some(Duration::from_secs(120))
            }
        );
        let bad = |_: Json<u32>, _: Context| async { Ok(()) };
        let r = h.run(handler_fn(bad), TestMessage::new("{")).await;
        assert_eq!(
            r.action.dead_letter_reason(),
            Some(DeadLetterReason::Decode)
        );
        let r = h
            .run(
                handler_fn(ok),
                TestMessage::new("x").with_unreadable_header(),
            )
            .await;
        assert_eq!(
            r.action.dead_letter_reason(),
            Some(DeadLetterReason::Decode)
        );
        assert_eq!(r.calls, 1, "decoding is part of the call");
        let boom = |_: Vec<u8>, _: Context| async { panic!("boom") };
        let r = h.run(handler_fn(boom), TestMessage::new("x")).await;
        assert_eq!(r.action.dead_letter_reason(), Some(DeadLetterReason::Panic));
        assert!(
            matches!(&r.outcome, Outcome::Panic(e) if e.contains("boom")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_tripped_breaker_refuses_the_next_message() {
        let h = Harness::new().breakers([(
            "billing",
            BreakerConfig {
                consecutive_failures: Some(2),
                ..BreakerConfig::default()
            },
        )]);
        for _ in 0..2 {
            h.run(handler_fn(down), TestMessage::new("x")).await;
        }
        let r = h.run(handler_fn(ok), TestMessage::new("x")).await;
        assert_eq!((r.action, r.calls), (Action::NotStarted, 0));
        assert_eq!(r.breakers[0].state.name(), "open");
    }

    #[tokio::test]
    async fn publishes_replies_and_guarded_calls_are_reported() {
        let h = Harness::new().breakers([
            ("billing", BreakerConfig::default()),
            ("inventory", BreakerConfig::default()),
        ]);
        let handler = with_state(7u32, |n: u32, _: Vec<u8>, ctx: Context| async move {
            ctx.guard("inventory", async {
                Err::<(), _>(HandlerError::transient("409"))
            })
            .await
            .ok();
            ctx.publish(
                "events",
                "charged",
                &n.to_be_bytes(),
                BasicProperties::default(),
            )
            .await?;
            ctx.reply(b"done", BasicProperties::default()).await
        });
        let msg = TestMessage::new("x")
            .with_reply_to("amq.rabbitmq.reply-to.abc")
            .with_correlation_id("c-1");
        let r = h.run(handler, msg).await;
        assert_eq!(r.action, Action::Ack, "{r:?}");
        assert_eq!(r.published.len(), 2);
        assert_eq!(
            (
                r.published[0].exchange.as_str(),
                r.published[0].routing_key.as_str()
            ),
            ("events", "charged")
        );
        assert_eq!(r.published[1].routing_key, "amq.rabbitmq.reply-to.abc");
        assert_eq!(
            r.published[1]
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some("c-1")
        );
        assert_eq!(r.breakers[0].guarded, []);
        assert_eq!(r.breakers[0].recorded, Some(CallOutcome::Success));
        assert_eq!(r.breakers[1].guarded, [CallOutcome::Failure]);
        assert_eq!(r.breakers[1].recorded, None);

        let r = Harness::new()
            .refuse_publishes()
            .run(
                handler_fn(|_: Vec<u8>, ctx: Context| async move {
                    ctx.publish("x", "y", b"", BasicProperties::default()).await
                }),
                TestMessage::new("x"),
            )
            .await;
        assert!(matches!(r.action, Action::Retry { .. }), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_timeout_is_a_transient_failure() {
        let h = Harness::new().breakers([(
            "slow",
            BreakerConfig {
                call_timeout: Duration::from_millis(50),
                ..BreakerConfig::default()
            },
        )]);
        let slow = |_: Vec<u8>, _: Context| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        };
        let r = h.run(handler_fn(slow), TestMessage::new("x")).await;
        assert_eq!(r.outcome, Outcome::TimedOut(Duration::from_millis(50)));
        assert!(matches!(r.action, Action::Retry { level: 0, .. }), "{r:?}");
    }
}
