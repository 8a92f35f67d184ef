//! One message, from permit to settle: run the handler under the call
//! timeout with panics caught, tell the breaker, apply the ack policy, and
//! publish (confirmed) any copy before the original may be acked.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::message::Delivery;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::policy::{self, Decision, Disposition, Outcome};
use super::settle::Settle;
use super::stats::{ConsumerStats, inc};
use crate::amqp::copy::{self, Copy, Place, Purpose};
use crate::amqp::publish::Publisher;
use crate::amqp::topology::Topology;
use crate::breaker::{BreakerSet, BreakerState, CallOutcome, HealthVerdict, Permits, blame};
use crate::dead_letter::DeadLetterReason;
use crate::handler::{CallResult, Context, ErasedHandler, ErrorKind};

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
    /// `concurrency`: handlers at once while every breaker admits all.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // read by the metrics
    pub(crate) concurrency: u16,
    /// `reply_to_prefixes`: the `reply_to` values `ctx.reply` may answer.
    pub(crate) reply_prefixes: Option<Arc<[String]>>,
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
    ctx.set_reply_prefixes(shared.reply_prefixes.clone());
    let span = delivery_span(&shared.queue, &ctx);
    tracing::Instrument::instrument(handle(shared, ctx, permits, slot, publisher, session), span)
        .await
}

/// One handler call's result, timeouts and panics included.
pub(crate) struct Call {
    pub(crate) outcome: Outcome,
    /// What the handler asked for with `retry_after`.
    pub(crate) retry_after: Option<Duration>,
    /// The breaker the handler named with `HandlerError::dependency`.
    pub(crate) dependency: Option<String>,
    pub(crate) ended: Instant,
    pub(crate) elapsed: Duration,
}

/// Calls `handler` once under `call_timeout`, panics caught: how it ended,
/// the wait it asked for (`retry_after`) and the dependency it named.
pub(crate) async fn call_handler(
    handler: &dyn ErasedHandler,
    ctx: &Context,
    call_timeout: Duration,
) -> (Outcome, Option<Duration>, Option<String>) {
    let call = AssertUnwindSafe(handler.call(ctx)).catch_unwind();
    match tokio::time::timeout(call_timeout, call).await {
        Err(_) => (Outcome::TimedOut(call_timeout), None, None),
        Ok(Err(payload)) => (Outcome::Panic(panic_text(payload.as_ref())), None, None),
        Ok(Ok(CallResult::Ok)) => (Outcome::Success, None, None),
        Ok(Ok(CallResult::Decode(e))) => (Outcome::Decode(e.0), None, None),
        Ok(Ok(CallResult::Failed(e))) => {
            let wait = e.retry_after_hint();
            let text = e.to_string();
            let dependency = e.dependency_name().map(str::to_owned);
            match e.kind() {
                ErrorKind::Transient => (Outcome::Transient(text), wait, dependency),
                ErrorKind::Retry => (Outcome::Retry(text), wait, dependency),
                ErrorKind::Permanent => (Outcome::Permanent(text), None, dependency),
            }
        }
    }
}

/// Calls the handler once under the call timeout, panics caught, and
/// records its duration.
async fn call_once(shared: &ConsumerShared, ctx: &Context) -> Call {
    let call_timeout = shared.breakers.call_timeout();
    let running = InFlight::new(&shared.stats);
    let started = tokio::time::Instant::now();
    let (outcome, retry_after, dependency) =
        call_handler(shared.handler.as_ref(), ctx, call_timeout).await;
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
pub(crate) struct Counted {
    /// A half-open probe of any of them.
    pub(crate) is_probe: bool,
    /// The breaker a failure counts against (see [`blame`]).
    pub(crate) blamed: usize,
    /// That breaker's state right after.
    pub(crate) state_after: BreakerState,
    /// Its success count when the call started.
    pub(crate) successes_at_start: u64,
}

/// Records one handler call on each breaker whose permit it did not use in
/// a guarded call: a success on every one, a transient failure or timeout
/// on the breaker it blames (the dependency the error names, else the one
/// a timeout cut a guarded call of, else the first), nothing on the others.
pub(crate) fn count(
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
    let inconclusive = copy::inconclusive_count(ctx);
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
    let error;
    let purpose = match disposition {
        Disposition::Ack => return Settle::Ack,
        Disposition::DeadLetter(reason) => {
            error = outcome.error_text();
            Purpose::DeadLetter {
                reason: *reason,
                error: &error,
            }
        }
        Disposition::Retry {
            level,
            next_attempt,
        } => Purpose::Retry {
            level: *level,
            next_attempt: *next_attempt,
        },
        Disposition::Defer {
            level,
            inconclusive,
        } => Purpose::Defer {
            level: *level,
            inconclusive: *inconclusive,
        },
    };
    let copy = Copy::of(&shared.topology, &shared.handler_name, ctx, &purpose);
    let place = Place {
        queue: &shared.queue,
        topology: &shared.topology,
        stats: &shared.stats,
    };
    if !copy::store(&place, publisher, session, ctx.body(), copy).await {
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
