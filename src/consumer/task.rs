//! One message, from permit to settle: run the handler under the call
//! timeout with panics caught, tell the breaker, apply the ack policy, and
//! publish (confirmed) any copy before the original may be acked.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::policy::{self, Decision, Disposition, Outcome};
use super::settle::Settle;
use super::stats::{ConsumerStats, inc};
use crate::amqp::headers::{self, header_u64, number, text};
use crate::amqp::publish::{PublishError, Publisher};
use crate::breaker::{BreakerSet, BreakerState, CallOutcome, HealthVerdict, Permits, blame};
use crate::dead_letter::{DeadLetterReason, MAX_ERROR_LEN};
use crate::handler::{CallResult, Context, ErasedHandler, ErrorKind};
use crate::text::truncate;
use crate::topology::Topology;

/// What every task of one consumer shares.
pub(crate) struct ConsumerShared {
    pub(crate) queue: Arc<str>,
    pub(crate) handler_name: Arc<str>,
    pub(crate) handler: Arc<dyn ErasedHandler>,
    /// The breakers guarding the handler's dependencies (usually one).
    pub(crate) breakers: BreakerSet,
    pub(crate) topology: Topology,
    /// The retry delays, level by level (as in `topology.delay_queues`).
    pub(crate) delays: Vec<Duration>,
    /// `retry.immediate`: calls made again at once before a delay level.
    pub(crate) immediate_retries: u32,
    pub(crate) stats: Arc<ConsumerStats>,
    /// Deliveries that may wait for a health verdict at once: `prefetch -
    /// concurrency`, so waiting never starves the handlers of deliveries
    /// (and of the very successes a verdict waits for).
    pub(crate) verdict_slots: Arc<Semaphore>,
    /// How many consumers share one of this consumer's breakers (the most
    /// of any of them).
    pub(crate) breaker_consumers: usize,
    /// Why its handler fails, logged without flooding.
    pub(crate) failures: super::failures::FailureLog,
    /// Tells the watchdog when one of its handlers is being polled.
    pub(crate) poll_slot: Arc<crate::worker::control::PollSlot>,
}

impl std::fmt::Debug for ConsumerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerShared")
            .field("queue", &self.queue)
            .field("handler", &self.handler_name)
            .finish_non_exhaustive()
    }
}

/// A task's result: how to settle its delivery.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) tag: u64,
    pub(crate) settle: Settle,
}

pub(crate) fn context(shared: &ConsumerShared, delivery: Delivery) -> Context {
    // The last attempt is one past the last delay level: an `rg-attempt`
    // beyond it was not written by us (or by a config with more levels).
    let last_attempt = u32::try_from(shared.topology.delay_queues.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    Context::new(
        last_attempt,
        shared.queue.clone(),
        delivery.delivery_tag,
        delivery.exchange.to_string(),
        delivery.routing_key.to_string(),
        delivery.redelivered,
        delivery.properties,
        delivery.data,
    )
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    format!("handler panicked: {}", crate::text::panic_message(payload))
}

/// The span a delivery is handled in: the handler's own logs and spans are
/// tied to its message, and a `traceparent` header links it to the
/// publisher's trace.
pub(crate) fn delivery_span(queue: &str, ctx: &Context) -> tracing::Span {
    let span = tracing::info_span!(
        "delivery",
        queue = %queue,
        message_id = ctx.message_id().unwrap_or("-"),
        delivery_tag = ctx.delivery_tag(),
        attempt = ctx.attempt(),
        redelivered = ctx.redelivered(),
        trace_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    if !span.is_disabled()
        && let Some(tp) = crate::trace_context::TraceParent::from_header(
            ctx.header(crate::trace_context::TRACEPARENT),
        )
    {
        span.record("trace_id", tp.trace_id);
        span.record("parent_span_id", tp.parent_id);
        #[cfg(feature = "otel")]
        crate::trace_context::link(&span, ctx.headers());
    }
    span
}

/// Runs the handler for one delivery and decides its fate, inside the
/// delivery's span.
pub(crate) async fn run(
    shared: Arc<ConsumerShared>,
    ctx: Context,
    permits: Permits,
    slot: OwnedSemaphorePermit,
    publisher: Publisher,
    session: CancellationToken,
) -> Finished {
    let mut ctx = ctx;
    ctx.set_breakers(shared.breakers.clone());
    let span = delivery_span(&shared.queue, &ctx);
    tracing::Instrument::instrument(handle(shared, ctx, permits, slot, publisher, session), span)
        .await
}

/// One handler call's result, timeouts and panics included.
struct Call {
    outcome: Outcome,
    /// What the handler asked for with `retry_after`.
    retry_after: Option<Duration>,
    /// The breaker the handler named with `HandlerError::dependency`.
    dependency: Option<String>,
    ended: Instant,
    elapsed: Duration,
}

/// Calls the handler once under the call timeout, panics caught, and
/// records its duration.
async fn call_once(shared: &ConsumerShared, ctx: &Context) -> Call {
    let call_timeout = shared.breakers.call_timeout();
    let running = InFlight::new(&shared.stats);
    let started = tokio::time::Instant::now();
    let call = AssertUnwindSafe(shared.handler.call(ctx)).catch_unwind();
    let mut dependency = None;
    let (outcome, retry_after) = match tokio::time::timeout(call_timeout, call).await {
        Err(_) => (Outcome::TimedOut(call_timeout), None),
        Ok(Err(payload)) => (Outcome::Panic(panic_text(payload.as_ref())), None),
        Ok(Ok(CallResult::Ok)) => (Outcome::Success, None),
        Ok(Ok(CallResult::Decode(e))) => (Outcome::Decode(e.0), None),
        Ok(Ok(CallResult::Failed(e))) => {
            let wait = e.retry_after_hint();
            let text = e.to_string();
            dependency = e.dependency_name().map(str::to_owned);
            match e.kind() {
                ErrorKind::Transient => (Outcome::Transient(text), wait),
                ErrorKind::Retry => (Outcome::Retry(text), wait),
                ErrorKind::Permanent => (Outcome::Permanent(text), None),
            }
        }
    };
    let ended = tokio::time::Instant::now();
    let elapsed = ended.saturating_duration_since(started);
    drop(running);
    if let Some(h) = &shared.stats.handler_seconds
        && let Some(h) = h.get(outcome.index())
    {
        h.record(elapsed.as_secs_f64());
    }
    match outcome {
        Outcome::Success => inc(&shared.stats.succeeded),
        Outcome::TimedOut(_) => {
            inc(&shared.stats.failed);
            inc(&shared.stats.timed_out);
        }
        Outcome::Transient(_) => inc(&shared.stats.failed),
        _ => {}
    }
    Call {
        outcome,
        retry_after,
        dependency,
        ended,
        elapsed,
    }
}

/// What one handler call told the breakers.
struct Counted {
    /// A half-open probe of any of them.
    is_probe: bool,
    /// The breaker a failure counts against (see [`blame`]).
    blamed: usize,
    /// That breaker's state right after.
    state_after: BreakerState,
    /// Its success count when the call started.
    successes_at_start: u64,
}

/// Records one handler call on each breaker whose permit it did not use in
/// a guarded call: a success on every one, a transient failure or timeout
/// on the breaker it blames (the dependency the error names, else the one
/// a timeout cut a guarded call of, else the first), nothing on the others.
fn count(
    breakers: &BreakerSet,
    lent: crate::handler::Lent,
    call: &Call,
    is_probe: bool,
) -> Counted {
    let cut_short = matches!(call.outcome, Outcome::TimedOut(_))
        .then_some(lent.cut_short)
        .filter(|bits| *bits != 0);
    let blamed = match cut_short {
        Some(bits) => bits.trailing_zeros() as usize,
        None => blame(breakers, call.dependency.as_deref()),
    };
    let record = match call.outcome {
        Outcome::Success => CallOutcome::Success,
        Outcome::Transient(_) | Outcome::TimedOut(_) => CallOutcome::Failure,
        Outcome::Retry(_) | Outcome::Permanent(_) | Outcome::Decode(_) | Outcome::Panic(_) => {
            CallOutcome::Ignored
        }
    };
    let mut blamed_after = None;
    if let Some(permits) = lent.permits {
        for (i, permit) in permits.into_held() {
            let was_cut = lent.cut_short & (1 << i) != 0;
            let outcome = match record {
                CallOutcome::Failure if i != blamed => CallOutcome::Ignored,
                // A guarded call dropped by the handler itself says nothing.
                CallOutcome::Success if was_cut => CallOutcome::Ignored,
                r => r,
            };
            let start = permit.successes_at_start();
            if i == blamed
                && matches!(call.outcome, Outcome::TimedOut(_))
                && let Some(b) = breakers.get(i)
            {
                b.note_timeout();
            }
            let state = permit.record(outcome.took(call.elapsed).ended(call.ended));
            if i == blamed {
                blamed_after = Some((state, start));
            }
        }
    }
    // The blamed breaker's permit went to a guarded call, which recorded it.
    let (state_after, successes_at_start) = blamed_after.unwrap_or_else(|| {
        let b = breakers.get(blamed).unwrap_or(breakers.first());
        let start = lent
            .guard_starts
            .get(blamed)
            .copied()
            .flatten()
            .unwrap_or_else(|| b.successes());
        (b.state(), start)
    });
    Counted {
        is_probe,
        blamed,
        state_after,
        successes_at_start,
    }
}

async fn handle(
    shared: Arc<ConsumerShared>,
    ctx: Context,
    permits: Permits,
    slot: OwnedSemaphorePermit,
    publisher: Publisher,
    session: CancellationToken,
) -> Finished {
    let tag = ctx.delivery_tag();
    let mut immediate_left = shared.immediate_retries;
    let mut permits = permits;
    let (call, counted) = loop {
        let is_probe = permits.is_probe();
        ctx.lend(permits);
        let call = call_once(&shared, &ctx).await;
        // Record before freeing the concurrency slot: a failure that trips
        // the breaker must be seen before the loop can start another call.
        let counted = count(&shared.breakers, ctx.take_back(), &call, is_probe);
        // Immediate retries: only for failures worth retrying, never for a
        // probe (one trial decides), and only while the breakers admit
        // every call and give new permits, so they stop the moment one opens.
        if immediate_left > 0
            && call.outcome.is_retryable()
            && !counted.is_probe
            && counted.state_after.admits_all()
            && !session.is_cancelled()
            && let Ok(next) = shared.breakers.try_acquire()
            && !next.is_probe()
        {
            immediate_left -= 1;
            inc(&shared.stats.immediate_retries);
            debug!(
                queue = %shared.queue,
                attempt = ctx.attempt(),
                error = %call.outcome.error_text(),
                "retrying at once"
            );
            permits = next;
            continue;
        }
        break (call, counted);
    };
    // The handler is done: free its slot before any publishing.
    drop(slot);
    let outage_suspected = counted.is_probe || !counted.state_after.admits_all();
    let delays = &shared.delays;
    let outcome = policy::with_wait_note(call.outcome, call.retry_after, delays);
    let disposition = match policy::decide(
        &outcome,
        ctx.attempt(),
        delays,
        call.retry_after,
        outage_suspected,
    ) {
        Decision::Final(d) => d,
        Decision::NeedsVerdict => match verdict(&shared, &ctx, &counted, &session).await {
            Some(d) => d,
            None => {
                return Finished {
                    tag,
                    settle: Settle::Requeue,
                };
            }
        },
    };
    log_failure(&shared, &ctx, &outcome, &disposition, call.ended);
    let settle = apply(&shared, &ctx, &outcome, &disposition, &publisher, &session).await;
    Finished { tag, settle }
}

/// Tells the failure log about a handling that did not succeed.
fn log_failure(
    shared: &ConsumerShared,
    ctx: &Context,
    outcome: &Outcome,
    disposition: &Disposition,
    now: Instant,
) {
    if *outcome == Outcome::Success {
        return;
    }
    let action = match disposition {
        Disposition::Ack => "ack",
        Disposition::DeadLetter(_) => "dead-letter",
        Disposition::Retry { .. } => "retry",
        Disposition::Defer { .. } => "put back",
    };
    shared.failures.record(
        &super::failures::Failure {
            outcome: outcome.name(),
            action,
            error: &outcome.error_text(),
            message_id: ctx.message_id().unwrap_or("-"),
            attempt: ctx.attempt(),
        },
        now,
    );
}

/// The last attempt failed: asks the breaker whether the dependency is
/// otherwise healthy, and decides. `None` when the session ended meanwhile
/// (the broker has requeued the message).
async fn verdict(
    shared: &ConsumerShared,
    ctx: &Context,
    counted: &Counted,
    session: &CancellationToken,
) -> Option<Disposition> {
    let delays = shared.topology.delay_queues.len();
    let inconclusive = inconclusive_count(ctx);
    let breaker = shared
        .breakers
        .get(counted.blamed)
        .unwrap_or(shared.breakers.first());
    let successes_at_start = counted.successes_at_start;
    let verdict = if breaker.successes() > successes_at_start {
        HealthVerdict::Healthy
    } else if inconclusive >= policy::MAX_INCONCLUSIVE {
        HealthVerdict::Unknown
    } else if let Ok(_waiting) = shared.verdict_slots.clone().try_acquire_owned() {
        let wait = breaker.config().window.min(policy::MAX_VERDICT_WAIT);
        tokio::select! {
            v = breaker.health_verdict(successes_at_start, wait) => v,
            () = session.cancelled() => return None,
        }
    } else {
        HealthVerdict::Unknown
    };
    let disposition = policy::after_verdict(verdict, ctx.attempt(), inconclusive, delays);
    debug!(queue = %shared.queue, ?verdict, ?disposition, "last attempt failed");
    Some(disposition)
}

/// Sends a prefetched, unstarted message to the dead-letter queue (on_pause = "dead-letter").
pub(crate) async fn dead_letter_unstarted(
    shared: Arc<ConsumerShared>,
    ctx: Context,
    publisher: Publisher,
    session: CancellationToken,
) -> Finished {
    let tag = ctx.delivery_tag();
    let outcome = Outcome::Permanent(format!(
        "not started: breaker {} opened while the message was prefetched (on_pause = \"dead-letter\")",
        shared.breakers.closed_to_calls()
    ));
    let disposition = Disposition::DeadLetter(DeadLetterReason::Paused);
    let settle = apply(&shared, &ctx, &outcome, &disposition, &publisher, &session).await;
    Finished { tag, settle }
}

/// A count kept in one of our headers; saturates instead of wrapping.
fn header_count(ctx: &Context, name: &str) -> u32 {
    ctx.headers()
        .and_then(|h| header_u64(h, name))
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// `rg-inconclusive`: more than [`policy::MAX_INCONCLUSIVE`] is never
/// written by rabbit-guard (it dead-letters at that count), so a larger
/// value was set by a publisher and counts as none, rather than cutting the
/// message's retries short.
fn inconclusive_count(ctx: &Context) -> u32 {
    match header_count(ctx, headers::INCONCLUSIVE) {
        n if n > policy::MAX_INCONCLUSIVE => 0,
        n => n,
    }
}

/// Counts a running handler in `in_flight` for as long as it lives, even
/// when the task is aborted.
struct InFlight<'a>(&'a ConsumerStats);

impl<'a> InFlight<'a> {
    fn new(stats: &'a ConsumerStats) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy to publish before the original is acked.
#[derive(Debug)]
struct Copy<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    properties: BasicProperties,
}

/// The copy `disposition` asks for (none for an ack): where it goes and its
/// headers. Pure, so every header it writes is unit-tested.
fn build_copy<'a>(
    topology: &'a Topology,
    handler_name: &str,
    ctx: &Context,
    outcome: &Outcome,
    disposition: &Disposition,
) -> Option<Copy<'a>> {
    let copy = match disposition {
        Disposition::Ack => return None,
        Disposition::DeadLetter(reason) => Copy {
            exchange: &topology.dead_letter_exchange,
            routing_key: &topology.dead_letter_queue,
            properties: copy_properties(ctx.properties(), |h| {
                h.insert(headers::REASON.into(), text(reason.as_str()));
                h.insert(
                    headers::ERROR.into(),
                    text(&truncate(&outcome.error_text(), MAX_ERROR_LEN)),
                );
                h.insert(headers::HANDLER.into(), text(handler_name));
                h.insert(headers::ORIGINAL_QUEUE.into(), text(&topology.queue));
                h.insert(
                    headers::DEAD_LETTERED_AT.into(),
                    text(
                        &humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                    ),
                );
                h.insert(headers::ATTEMPT.into(), number(ctx.attempt()));
            }),
        },
        Disposition::Retry {
            level,
            next_attempt,
        } => Copy {
            exchange: "",
            routing_key: &topology.delay_queues[*level].1,
            properties: copy_properties(ctx.properties(), |h| {
                h.insert(headers::ATTEMPT.into(), number(*next_attempt));
            }),
        },
        Disposition::Defer {
            level,
            inconclusive,
        } => {
            let deferrals = header_count(ctx, headers::DEFERRALS).saturating_add(1);
            let inconclusive_count = inconclusive_count(ctx) + u32::from(*inconclusive);
            Copy {
                exchange: "",
                routing_key: match level {
                    Some(l) => &topology.delay_queues[*l].1,
                    None => &topology.queue,
                },
                properties: copy_properties(ctx.properties(), |h| {
                    h.insert(headers::ATTEMPT.into(), number(ctx.attempt()));
                    h.insert(headers::DEFERRALS.into(), number(deferrals));
                    if inconclusive_count > 0 {
                        h.insert(headers::INCONCLUSIVE.into(), number(inconclusive_count));
                    }
                }),
            }
        }
    };
    Some(copy)
}

/// Stores the copy `disposition` asks for (confirmed), counts it, and says
/// how to settle the original.
async fn apply(
    shared: &ConsumerShared,
    ctx: &Context,
    outcome: &Outcome,
    disposition: &Disposition,
    publisher: &Publisher,
    session: &CancellationToken,
) -> Settle {
    let Some(copy) = build_copy(
        &shared.topology,
        &shared.handler_name,
        ctx,
        outcome,
        disposition,
    ) else {
        return Settle::Ack;
    };
    let Copy {
        exchange,
        routing_key,
        properties,
    } = copy;
    if !store_copy(
        shared,
        ctx,
        publisher,
        session,
        exchange,
        routing_key,
        properties,
    )
    .await
    {
        return Settle::Requeue;
    }
    let stats = &shared.stats;
    match disposition {
        Disposition::DeadLetter(reason) => {
            inc(&stats.dead_lettered);
            inc(&stats.dead_lettered_by_reason[reason.index()]);
        }
        Disposition::Retry { level, .. } => {
            inc(&stats.retried);
            if let Some(n) = stats.delayed_by_level.get(*level) {
                inc(n);
            }
        }
        Disposition::Defer { level, .. } => {
            inc(&stats.deferred);
            if let Some(n) = level.and_then(|l| stats.delayed_by_level.get(l)) {
                inc(n);
            }
        }
        Disposition::Ack => {}
    }
    Settle::Ack
}

/// First wait before publishing a copy again.
const COPY_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between attempts to publish a copy.
const COPY_RETRY_MAX: Duration = Duration::from_secs(10);

/// Publishes a copy and waits for its confirm, trying again with backoff
/// (and declaring the topology again, when rabbit-guard declares it) while
/// the broker does not store it: a deleted dead-letter queue, an unroutable
/// or nacked copy. The original stays unacked meanwhile, so nothing is
/// lost and nothing is handled again; the prefetch bounds how many wait.
/// False when the copy was given up: the session ended (the broker has
/// requeued the original), the publishing connection was lost, or the
/// broker's consumer timeout is near.
async fn store_copy(
    shared: &ConsumerShared,
    ctx: &Context,
    publisher: &Publisher,
    session: &CancellationToken,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
) -> bool {
    let deadline = crate::amqp::deadline(Instant::now(), publisher.timeout());
    let mut backoff = crate::backoff::exponential(COPY_RETRY_MIN, COPY_RETRY_MAX);
    let mut waiting = None;
    loop {
        if session.is_cancelled() {
            // The channel this delivery came on is gone; the broker has
            // requeued the original, so a copy now would only be a duplicate.
            return false;
        }
        let error = match publisher
            .publish_confirmed(exchange, routing_key, ctx.body(), properties.clone())
            .await
        {
            Ok(()) => {
                copies_stored(shared);
                return true;
            }
            Err(e) => e,
        };
        if !publisher.is_open() {
            // The publishing connection is gone, and this publisher with
            // it: the session ends and the original goes back to the queue
            // (nacked here if its channel still works, else by the broker).
            // Not the broker refusing the copy: no trouble to report.
            debug!(queue = %shared.queue, target = routing_key, error = %error, "publishing connection lost while storing a copy; returning the original");
            return false;
        }
        inc(&shared.stats.publish_failures);
        waiting.get_or_insert_with(|| CopyWaiting::new(&shared.stats));
        copy_failed(shared, routing_key, &error);
        if shared.topology.declares()
            && matches!(
                error,
                PublishError::Unroutable { .. } | PublishError::Broker(_)
            )
        {
            publisher.redeclare(&shared.topology).await;
        }
        let delay = backoff.next().unwrap_or(COPY_RETRY_MAX);
        if Instant::now() + delay >= deadline {
            warn!(
                queue = %shared.queue,
                target = routing_key,
                error = %error,
                "gave up storing a copy before the broker's consumer timeout; returning the original to the queue"
            );
            return false;
        }
        tokio::select! {
            () = session.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The first failed copy of an episode is logged (with its cause) and
/// marks the consumer not ready; the rest are only counted.
fn copy_failed(shared: &ConsumerShared, target: &str, error: &PublishError) {
    let stats = &shared.stats;
    let mut trouble = stats
        .copy_trouble
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if trouble.is_none() {
        warn!(
            queue = %shared.queue,
            target,
            error = %error,
            "cannot store copies of messages (retries, dead letters); retrying with backoff, their originals stay unacked"
        );
    }
    *trouble = Some(format!("copies to {target} fail: {error}"));
    stats.copy_trouble_set.store(true, Ordering::Relaxed);
}

fn copies_stored(shared: &ConsumerShared) {
    let stats = &shared.stats;
    if !stats.copy_trouble_set.load(Ordering::Relaxed) {
        return;
    }
    let mut trouble = stats
        .copy_trouble
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(why) = trouble.take() {
        stats.copy_trouble_set.store(false, Ordering::Relaxed);
        info!(queue = %shared.queue, was = %why, "copies are stored again");
    }
}

/// Counts a message in `copies_waiting` while its copy is retried.
struct CopyWaiting<'a>(&'a ConsumerStats);

impl<'a> CopyWaiting<'a> {
    fn new(stats: &'a ConsumerStats) -> Self {
        stats.copies_waiting.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for CopyWaiting<'_> {
    fn drop(&mut self) {
        let stats = self.0;
        if stats.copies_waiting.fetch_sub(1, Ordering::Relaxed) == 1
            && stats.copy_trouble_set.load(Ordering::Relaxed)
        {
            // The last waiting copy was given up (its channel is gone, or the
            // consumer timeout neared): nothing waits, so nothing is wrong
            // until the next copy fails, which logs the episode again.
            stats
                .copy_trouble
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            stats.copy_trouble_set.store(false, Ordering::Relaxed);
        }
    }
}

/// The original's properties, persistent, with `edit` applied to the
/// headers. Left out: broker death headers, `CC`/`BCC` (the copy must reach
/// one queue only), the per-message `expiration` (a
/// dead letter must not silently expire) and `user_id` (the broker rejects a
/// user id that is not the publishing connection's).
fn copy_properties(
    original: &BasicProperties,
    edit: impl FnOnce(&mut BTreeMap<ShortString, AMQPValue>),
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_headers(headers::edited(original, headers::NEVER_COPIED, edit))
        .with_delivery_mode(2);
    let o = original;
    if let Some(v) = o.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = o.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = o.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = o.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = o.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = o.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = o.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = o.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = o.app_id() {
        props = props.with_app_id(v.clone());
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsumerSettings, RetrySettings};

    fn topology() -> Topology {
        Topology::of(
            0,
            &ConsumerSettings {
                queue: "orders".into(),
                retry: RetrySettings {
                    delays: vec![Duration::from_secs(1), Duration::from_secs(5)],
                    ..RetrySettings::default()
                },
                ..ConsumerSettings::default()
            },
        )
    }

    fn ctx(headers: &[(&str, AMQPValue)]) -> Context {
        let mut h = lapin::types::FieldTable::default();
        for (k, v) in headers {
            h.insert((*k).into(), v.clone());
        }
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_expiration("60000".into())
            .with_user_id("someone-else".into())
            .with_headers(h);
        Context::new(
            3,
            "orders".into(),
            7,
            String::new(),
            "orders".into(),
            false,
            props,
            b"{}".to_vec(),
        )
    }

    fn header<'a>(copy: &'a Copy<'_>, name: &str) -> Option<&'a AMQPValue> {
        copy.properties.headers().as_ref()?.inner().get(name)
    }

    #[test]
    fn a_dead_letter_says_why_and_carries_nothing_that_routes_or_expires() {
        let t = topology();
        let c = ctx(&[
            ("CC", text("elsewhere")),
            ("x-death", text("forged")),
            (headers::ATTEMPT, number(2)),
            ("keep", text("me")),
        ]);
        let long = "e".repeat(MAX_ERROR_LEN * 2);
        let copy = build_copy(
            &t,
            "http",
            &c,
            &Outcome::Permanent(long),
            &Disposition::DeadLetter(DeadLetterReason::Permanent),
        )
        .expect("a dead letter is a copy");
        assert_eq!(
            (copy.exchange, copy.routing_key),
            ("orders.dlx", "orders.dlq")
        );
        assert_eq!(header(&copy, headers::REASON), Some(&text("permanent")));
        assert_eq!(header(&copy, headers::HANDLER), Some(&text("http")));
        assert_eq!(
            header(&copy, headers::ORIGINAL_QUEUE),
            Some(&text("orders"))
        );
        assert_eq!(header(&copy, headers::ATTEMPT), Some(&number(2)));
        assert_eq!(header(&copy, "keep"), Some(&text("me")));
        let Some(AMQPValue::LongString(error)) = header(&copy, headers::ERROR) else {
            panic!("rg-error missing");
        };
        assert!(
            error.as_bytes().len() <= MAX_ERROR_LEN,
            "{} bytes",
            error.as_bytes().len()
        );
        assert!(header(&copy, "CC").is_none() && header(&copy, "x-death").is_none());
        assert_eq!(
            copy.properties.expiration(),
            &None,
            "a dead letter must not expire"
        );
        assert_eq!(copy.properties.user_id(), &None);
        assert_eq!(copy.properties.delivery_mode(), &Some(2));
        assert_eq!(
            copy.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("m-1")
        );
    }

    #[test]
    fn a_retry_goes_to_its_level_with_the_next_attempt() {
        let t = topology();
        let c = ctx(&[(headers::ATTEMPT, number(2))]);
        let copy = build_copy(
            &t,
            "http",
            &c,
            &Outcome::Transient("503".into()),
            &Disposition::Retry {
                level: 1,
                next_attempt: 3,
            },
        )
        .unwrap();
        assert_eq!((copy.exchange, copy.routing_key), ("", "orders.delay.5s"));
        assert_eq!(header(&copy, headers::ATTEMPT), Some(&number(3)));
        assert!(header(&copy, headers::REASON).is_none());
    }

    #[test]
    fn a_deferral_keeps_the_attempt_and_its_counts_saturate() {
        let t = topology();
        let c = ctx(&[
            (headers::ATTEMPT, number(2)),
            (headers::DEFERRALS, AMQPValue::LongLongInt(i64::MAX)),
            (headers::INCONCLUSIVE, number(1)),
        ]);
        let copy = build_copy(
            &t,
            "http",
            &c,
            &Outcome::Transient("503".into()),
            &Disposition::Defer {
                level: None,
                inconclusive: true,
            },
        )
        .unwrap();
        assert_eq!(
            copy.routing_key, "orders",
            "no delay level: back to the work queue's tail"
        );
        assert_eq!(header(&copy, headers::ATTEMPT), Some(&number(2)));
        assert_eq!(header(&copy, headers::DEFERRALS), Some(&number(u32::MAX)));
        assert_eq!(header(&copy, headers::INCONCLUSIVE), Some(&number(2)));
        assert!(
            build_copy(&t, "http", &c, &Outcome::Success, &Disposition::Ack).is_none(),
            "an ack has no copy"
        );
    }
}
