//! One session: a channel's worth of consuming. It receives deliveries,
//! starts handlers under the concurrency limit and the breaker's permits,
//! settles in tag order, and stops cleanly on shutdown. The subscription
//! itself is kept in step with the breaker in `subscription.rs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicQosOptions};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::in_flight::{InFlight, TaskOutput};
use super::probes::Probes;
use super::run::ConsumerRuntime;
use super::settle::{AckTracker, Op, Settle};
use super::stats::{add, inc};
use super::subscription::{Mode, Subscription, next_delivery, ready_delivery};
use super::task::{self, ConsumerShared};
use crate::amqp::publish::Publisher;
use crate::breaker::{BreakerState, Rejected, ReleaseWatch};
use crate::config::OnPause;
use crate::error::describe;
use crate::handler::Outlet;

/// How long a finished delivery may wait behind an unfinished one before it
/// is acked on its own (instead of with the run it belongs to).
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(5);

/// Most deliveries taken from the buffer in one go.
const MAX_BATCH: usize = 256;

/// Why a session ended (and the consumer starts a new one).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// A broker operation failed; the channel or connection is gone.
    #[error("{context}: {}", describe(.source))]
    Broker {
        /// What was being done.
        context: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// Declaring the topology failed.
    #[error(transparent)]
    Topology(#[from] crate::Error),
    /// The breaker's state channel closed (the worker is going away).
    #[error("breaker dropped")]
    BreakerDropped,
    /// The publishing connection was lost: copies cannot be stored.
    #[error("the publishing connection was lost")]
    PublisherLost,
    /// The broker ended the subscription itself.
    #[error("the broker cancelled the consumer (queue deleted, or a node went down)")]
    CancelledByBroker,
}

impl SessionError {
    /// `map_err` for a lapin result: the error, with what was being done.
    pub(crate) fn broker(context: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Broker { context, source }
    }
}

pub(super) type SessionResult = Result<(), SessionError>;

/// One channel's worth of consuming: from subscribing to the channel's end.
pub(super) struct Session<'a> {
    pub(super) runtime: &'a ConsumerRuntime,
    pub(super) channel: Channel,
    pub(super) publisher: Publisher,
    /// For handlers' own publishes (`ctx.publish`), opened on first use.
    pub(super) handler_publisher: Publisher,
    /// Cancelled when the session ends: tasks must not publish copies for
    /// deliveries whose channel is gone.
    pub(super) token: CancellationToken,
    pub(super) sub: Option<Subscription>,
    /// Received, not started.
    pub(super) pending: VecDeque<Delivery>,
    pub(super) running: InFlight,
    pub(super) slots: Arc<Semaphore>,
    pub(super) tracker: AckTracker,
    pub(super) ops: Vec<Op>,
    /// When finished deliveries stuck behind a slow one get acked on their own.
    pub(super) flush_at: Option<Instant>,
    /// Half-open probe permits reserved before subscribing, and whether
    /// this consumer is done with the current trial.
    pub(super) probes: Probes,
    /// Probe slots given back by the breakers (a probe told nothing).
    pub(super) released_rx: ReleaseWatch,
}

impl Session<'_> {
    pub(super) fn queue(&self) -> &str {
        &self.runtime.settings.queue
    }

    pub(super) fn shared(&self) -> &Arc<ConsumerShared> {
        &self.runtime.shared
    }

    pub(super) async fn run(&mut self, shutdown: &CancellationToken) -> SessionResult {
        let mut state_rx = self.shared().breakers.subscribe();
        self.released_rx.borrow_and_update();
        loop {
            let state = state_rx.borrow_and_update();
            self.reconcile(state).await?;
            self.dispatch();
            self.flush(false).await?;
            let waiting_for_slot = !self.pending.is_empty() && self.slots.available_permits() == 0;
            let slots = self.slots.clone();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return self.stop().await,
                changed = state_rx.changed() => {
                    if changed.is_err() {
                        return Err(SessionError::BreakerDropped);
                    }
                }
                Some(done) = self.running.next(), if !self.running.is_empty() => {
                    self.finished(done);
                    while let Some(done) = self.running.try_next().await {
                        self.finished(done);
                    }
                    if !self.publisher.is_open() {
                        // Copies can't be stored: settle what we can, then start
                        // over on a new connection rather than loop on failures.
                        self.flush(true).await?;
                        return Err(SessionError::PublisherLost);
                    }
                }
                item = next_delivery(&mut self.sub), if self.sub.is_some() => {
                    let mut item = item;
                    let mut taken = 0;
                    // Take everything already buffered before dispatching and
                    // settling: a batch of deliveries finishes together and is
                    // acked with one frame.
                    loop {
                        match item {
                            Some(Ok(delivery)) => self.received(delivery),
                            Some(Err(e)) => return Err(SessionError::broker("consumer stream failed")(e)),
                            None => {
                                self.sub = None;
                                return Err(SessionError::CancelledByBroker);
                            }
                        }
                        taken += 1;
                        if taken >= MAX_BATCH {
                            break;
                        }
                        match ready_delivery(&mut self.sub).await {
                            Some(next) => item = next,
                            None => break,
                        }
                    }
                }
                permit = slots.acquire_owned(), if waiting_for_slot => drop(permit),
                changed = self.released_rx.changed() => {
                    if changed.is_ok() {
                        self.probes.slot_released(self.runtime.shared.breakers.state());
                    }
                }
                () = sleep_until(self.probes.hand_over_deadline()), if self.probes.hand_over_deadline().is_some() => {
                    self.reservation_expired().await?;
                }
                () = sleep_until(self.flush_at), if self.flush_at.is_some() => {
                    self.flush(true).await?;
                }
            }
        }
    }

    /// An unused reservation times out (several consumers share the breaker):
    /// stop waiting on this queue, run anything that arrived, and give the
    /// rest of the permits to the others.
    async fn reservation_expired(&mut self) -> SessionResult {
        let trial = self.probes.trial();
        if self
            .sub
            .as_ref()
            .is_some_and(|s| matches!(s.mode, Mode::Probe(_)))
        {
            self.unsubscribe().await?;
        }
        self.dispatch();
        self.probes.expire(trial);
        // The release this causes is no cue to reserve again.
        self.released_rx.borrow_and_update();
        Ok(())
    }

    pub(super) fn received(&mut self, delivery: Delivery) {
        let stats = &self.runtime.shared.stats;
        inc(&stats.received);
        if delivery.redelivered {
            inc(&stats.redelivered);
        }
        self.tracker.received(delivery.delivery_tag);
        if let Some(sub) = self.sub.as_mut()
            && let Mode::Probe(trial) = sub.mode
        {
            sub.received += 1;
            if sub.received >= sub.quota {
                // This consumer has its probes; take no more until the trial ends.
                self.probes.mark_done(trial);
            }
        }
        self.pending.push_back(delivery);
    }

    /// Starts pending deliveries while slots and the breaker allow (using
    /// reserved probe permits first); settles the ones the breaker refuses
    /// without starting them.
    pub(super) fn dispatch(&mut self) {
        // One clock read for the whole batch of permits.
        let now = Instant::now();
        while !self.pending.is_empty() {
            if self.probes.is_empty() && self.shared().breakers.admits_all_now() {
                // The common case, read without a lock: closed, no probes held.
                if self.slots.available_permits() == 0 {
                    break;
                }
            } else {
                let state = self.shared().breakers.state();
                let can_run =
                    !matches!(state, BreakerState::Open { .. } | BreakerState::ForcedOpen);
                if can_run && self.slots.available_permits() == 0 {
                    break;
                }
                // Never call the dependency with a permit of a finished trial.
                self.probes.release_if_over(state);
            }
            let shared = self.runtime.shared.clone();
            let permit = match self.probes.take() {
                Some(permit) => Ok(permit),
                None => shared.breakers.try_acquire_at(now),
            };
            match permit {
                Ok(permit) => {
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        break; // the permit is dropped: counts as nothing
                    };
                    let Some(delivery) = self.pending.pop_front() else {
                        break;
                    };
                    let mut ctx = task::context(&shared, delivery);
                    ctx.set_publisher(Outlet::Broker(self.handler_publisher.clone()));
                    let tag = ctx.delivery_tag();
                    self.running.push(
                        tag,
                        task::run(
                            shared,
                            ctx,
                            permit,
                            slot,
                            self.publisher.clone(),
                            self.token.clone(),
                        ),
                    );
                }
                Err(rejected) => {
                    let Some(delivery) = self.pending.pop_front() else {
                        break;
                    };
                    inc(&shared.stats.rejected_by_breaker);
                    if rejected == Rejected::ProbesTaken
                        && let BreakerState::HalfOpen { trial } = shared.breakers.state()
                    {
                        self.probes.mark_done(trial);
                    }
                    self.settle_unstarted(delivery, rejected);
                }
            }
        }
    }

    fn settle_unstarted(&mut self, delivery: Delivery, rejected: Rejected) {
        let shared = self.runtime.shared.clone();
        if rejected == Rejected::Open && self.runtime.settings.on_pause == OnPause::DeadLetter {
            let ctx = task::context(&shared, delivery);
            let tag = ctx.delivery_tag();
            self.running.push(
                tag,
                task::dead_letter_unstarted(
                    shared,
                    ctx,
                    self.publisher.clone(),
                    self.token.clone(),
                ),
            );
        } else {
            // Not an attempt: back to the queue for a later probe or resume.
            inc(&shared.stats.requeued);
            self.tracker.finish(delivery.delivery_tag, Settle::Requeue);
        }
    }

    pub(super) fn finished(&mut self, (tag, done): TaskOutput) {
        self.running.forget(tag);
        let settle = match done {
            Ok(finished) => {
                debug_assert_eq!(finished.tag, tag, "a task settles its own delivery");
                finished.settle
            }
            Err(_) => {
                error!(queue = %self.queue(), delivery_tag = tag, "message task panicked outside the handler; requeueing its message");
                Settle::Requeue
            }
        };
        if settle == Settle::Requeue {
            inc(&self.runtime.shared.stats.requeued);
        }
        self.tracker.finish(tag, settle);
    }

    /// Sends the settle frames that are due. With `out_of_order`, also those
    /// stuck behind an unfinished delivery.
    pub(super) async fn flush(&mut self, out_of_order: bool) -> SessionResult {
        self.ops.clear();
        if out_of_order {
            self.tracker.take_blocked(&mut self.ops);
        } else {
            self.tracker.take_in_order(&mut self.ops);
        }
        self.flush_at = match (self.tracker.has_blocked(), self.flush_at) {
            (false, _) => None,
            (true, Some(at)) => Some(at),
            (true, None) => Some(Instant::now() + ACK_FLUSH_INTERVAL),
        };
        for op in &self.ops {
            let sent = match *op {
                Op::Ack { tag, multiple } => {
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple })
                        .await
                }
                Op::Requeue { tag, multiple } => {
                    self.channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple,
                                requeue: true,
                            },
                        )
                        .await
                }
            };
            sent.map_err(SessionError::broker("settling deliveries"))?;
        }
        Ok(())
    }

    /// Graceful stop: cancel the subscription, start nothing new, let running
    /// handlers finish within the grace period, ack what succeeded, and make
    /// sure the broker has applied every settle before the channel closes.
    /// Deliveries not started are left unsettled: closing the channel returns
    /// them to the queue.
    ///
    /// Why the barrier: a quorum queue's client in the broker holds settles
    /// back while more than 32 of its commands are in flight, and what it still
    /// holds when the channel closes is lost; those acked messages would come
    /// back (seen in tests, never with classic queues). A `basic.qos` round
    /// trip does not wait for the queue. A synchronous queue command does:
    /// `basic.cancel` goes through the queue's log after our acks, and by the
    /// time it returns the channel has what it needs to send the held settles,
    /// which it does before handling our next frame.
    async fn stop(&mut self) -> SessionResult {
        // No new deliveries from here on, and none while the breaker may open
        // during the grace period.
        self.unsubscribe().await?;
        self.probes.release();
        self.released_rx.borrow_and_update();
        let unstarted = self.pending.len();
        self.pending.clear();
        info!(
            queue = %self.queue(),
            running = self.running.len(),
            unstarted,
            grace = %humantime::format_duration(self.runtime.grace),
            "consumer stopping: waiting for running handlers"
        );
        self.flush(false).await?;
        let deadline = crate::amqp::deadline(Instant::now(), self.runtime.grace);
        while !self.running.is_empty() {
            tokio::select! {
                Some(done) = self.running.next() => {
                    self.finished(done);
                    self.flush(false).await?;
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let cut_short = self.running.len();
        if cut_short > 0 {
            warn!(
                queue = %self.queue(),
                handlers = cut_short,
                "grace period over: cancelling running handlers and requeueing their messages"
            );
            for tag in self.running.abort_all() {
                inc(&self.runtime.shared.stats.requeued);
                self.tracker.finish(tag, Settle::Requeue);
            }
        }
        self.flush(true).await?;
        self.settle_barrier().await?;
        let returned = unstarted + self.pending.len();
        self.pending.clear();
        add(&self.runtime.shared.stats.requeued, returned as u64);
        // Acks carry no reply: a round trip after them (qos-ok) proves the
        // channel has processed them, and the held settles, before we close.
        self.channel
            .basic_qos(
                self.runtime.settings.prefetch,
                BasicQosOptions { global: false },
            )
            .await
            .map_err(SessionError::broker("confirming the last acks"))?;
        if let Err(e) = self.channel.close(200, "worker shutting down".into()).await {
            debug!(queue = %self.queue(), error = %describe(&e), "closing the channel");
        }
        self.publisher.close().await;
        self.handler_publisher.close().await;
        info!(queue = %self.queue(), returned, "consumer stopped");
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
