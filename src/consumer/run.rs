//! One queue's loop: subscribe in the state the breaker is in, dispatch under
//! the concurrency limit, settle in order, and stop cleanly.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use std::task::Poll;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::settle::{AckTracker, Op, Settle};
use super::stats::{add, inc};
use super::task::{self, Finished, Shared};
use crate::breaker::{BreakerState, Permit, PermitKind, Rejected};
use crate::config::{ConsumerSettings, OnPause, QueueType};
use crate::connection::ManagedConnection;
use crate::error::describe;
use crate::publish::Publisher;

/// How long a finished delivery may wait behind an unfinished one before it
/// is acked on its own (instead of with the run it belongs to).
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(5);

/// Most deliveries taken from the buffer in one go.
const MAX_BATCH: usize = 256;

/// With several consumers on one breaker, how long one may hold half-open
/// probe permits on an empty queue before handing them to the others.
const PROBE_RESERVATION_WAIT: Duration = Duration::from_secs(1);

/// A session that lasted this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// What a subscription is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Closed breaker: prefetch as configured.
    Full,
    /// Half-open: prefetch = probes, for this trial only.
    Probe(u64),
}

/// What a message's future yields: its tag, and how to settle it (or the
/// panic that escaped it, which settles it as a requeue).
type TaskOutput = (u64, std::thread::Result<Finished>);

/// The handlers running now, polled by the consumer task itself: no task is
/// spawned per message, so nothing crosses threads on the message path.
/// (`worker.threads` > 1 still spreads consumers and I/O over threads; a
/// handler that burns CPU should move that work to `spawn_blocking`.)
#[derive(Default)]
struct Running {
    futures: FuturesUnordered<BoxFuture<'static, TaskOutput>>,
    tags: HashSet<u64>,
}

impl Running {
    fn push(&mut self, tag: u64, task: impl Future<Output = Finished> + Send + 'static) {
        self.tags.insert(tag);
        self.futures.push(Box::pin(async move {
            (tag, AssertUnwindSafe(task).catch_unwind().await)
        }));
    }

    fn len(&self) -> usize {
        self.futures.len()
    }

    fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    async fn next(&mut self) -> Option<TaskOutput> {
        self.futures.next().await
    }

    /// A finished task, if one is ready without waiting. Polls with the
    /// caller's own waker: polling with a dummy one (`now_or_never`) would
    /// leave the set waking nobody when its next task finishes.
    async fn try_next(&mut self) -> Option<TaskOutput> {
        std::future::poll_fn(|cx| match self.futures.poll_next_unpin(cx) {
            Poll::Ready(done) => Poll::Ready(done),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }

    /// Cancels every task; returns their tags.
    fn abort_all(&mut self) -> Vec<u64> {
        self.futures = FuturesUnordered::new();
        self.tags.drain().collect()
    }
}

struct Subscription {
    consumer: Consumer,
    mode: Mode,
    received: u32,
    /// Probe mode: deliveries to take before cancelling (the prefetch set).
    quota: u32,
}

/// One consumer, alive for the worker's lifetime; each connection or channel
/// it uses is a session.
pub(crate) struct ConsumerRuntime {
    pub(crate) settings: ConsumerSettings,
    pub(crate) shared: Arc<Shared>,
    pub(crate) consume: Arc<ManagedConnection>,
    pub(crate) publish: Arc<ManagedConnection>,
    pub(crate) grace: Duration,
    /// Longest wait for a copy's confirm (half the broker's consumer timeout).
    pub(crate) publish_timeout: Duration,
}

impl std::fmt::Debug for ConsumerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerRuntime")
            .field("queue", &self.settings.queue)
            .finish_non_exhaustive()
    }
}

impl ConsumerRuntime {
    /// Runs sessions until `shutdown`, starting a new one (after a backoff)
    /// whenever the channel or connection is lost.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Self::backoff();
        loop {
            let started = Instant::now();
            let result = self.session(&shutdown).await;
            self.shared.stats.subscribed.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => return,
                Err(e) if shutdown.is_cancelled() => {
                    debug!(queue = %self.settings.queue, error = %e, "session ended during shutdown");
                    return;
                }
                Err(e) => {
                    if started.elapsed() >= HEALTHY_SESSION {
                        backoff = Self::backoff();
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    warn!(
                        queue = %self.settings.queue,
                        error = %e,
                        retry_in = %humantime::format_duration(Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(0))),
                        "consumer lost its channel; the broker requeues its unacked messages, and it resubscribes"
                    );
                    self.consume.report_trouble();
                    self.publish.report_trouble();
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn backoff() -> backon::ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build()
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), String> {
        let Some((_, connection)) = self.consume.connection(shutdown).await else {
            return Ok(());
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {}", describe(&e)))?;
        self.shared
            .topology
            .declare(&channel)
            .await
            .map_err(|e| e.to_string())?;
        let Some((_, publish_connection)) = self.publish.connection(shutdown).await else {
            return Ok(());
        };
        let publisher = Publisher::open(publish_connection, self.publish_timeout)
            .await
            .map_err(|e| format!("opening the publishing channel: {}", describe(&e)))?;
        let token = CancellationToken::new();
        let _cancel_tasks_on_exit = token.clone().drop_guard();
        let mut session = Session {
            runtime: self,
            channel,
            publisher,
            token,
            sub: None,
            pending: VecDeque::new(),
            running: Running::default(),
            slots: Arc::new(Semaphore::new(usize::from(self.settings.concurrency))),
            tracker: AckTracker::default(),
            ops: Vec::new(),
            probe_done: None,
            flush_at: None,
            reserved: Vec::new(),
            reserved_trial: None,
            reserve_until: None,
            released_rx: self.shared.breaker.probe_releases(),
        };
        self.shared
            .stats
            .session_active
            .store(true, Ordering::Relaxed);
        let result = session.run(shutdown).await;
        self.shared
            .stats
            .session_active
            .store(false, Ordering::Relaxed);
        if result.is_err() {
            // Settle what already finished while the channel still works
            // (the broker cancelled us, or only the publisher was lost).
            while let Some(done) = session.running.try_next().await {
                session.finished(done);
            }
            if session.channel.status().connected() {
                let _ = session.flush(true).await;
            }
            let lost = session.tracker.clear();
            add(&self.shared.stats.stale, lost as u64);
            let _ = session.running.abort_all();
            if lost > 0 {
                warn!(
                    queue = %self.settings.queue,
                    unsettled = lost,
                    "channel lost with unsettled deliveries; the broker requeues them (redelivered = true)"
                );
            }
        }
        result
    }
}

struct Session<'a> {
    runtime: &'a ConsumerRuntime,
    channel: Channel,
    publisher: Publisher,
    /// Cancelled when the session ends: tasks must not publish copies for
    /// deliveries whose channel is gone.
    token: CancellationToken,
    sub: Option<Subscription>,
    /// Received, not started.
    pending: VecDeque<Delivery>,
    running: Running,
    slots: Arc<Semaphore>,
    tracker: AckTracker,
    ops: Vec<Op>,
    /// The half-open trial this consumer has taken its probes for.
    probe_done: Option<u64>,
    /// When finished deliveries stuck behind a slow one get acked on their own.
    flush_at: Option<Instant>,
    /// Half-open probe permits taken before subscribing, so the consumer
    /// takes exactly as many messages as it may probe with.
    reserved: Vec<Permit>,
    /// The trial `reserved` belongs to.
    reserved_trial: Option<u64>,
    /// When an unused reservation is handed to other consumers of the breaker.
    reserve_until: Option<Instant>,
    /// Probe slots given back by the breaker (a probe told nothing).
    released_rx: watch::Receiver<u64>,
}

type SessionResult = Result<(), String>;

impl Session<'_> {
    fn queue(&self) -> &str {
        &self.runtime.settings.queue
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.runtime.shared
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> SessionResult {
        let mut state_rx = self.shared().breaker.subscribe();
        self.released_rx.borrow_and_update();
        loop {
            let state = *state_rx.borrow_and_update();
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
                        return Err("breaker dropped".into());
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
                        return Err("the publishing connection was lost".into());
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
                            Some(Err(e)) => return Err(format!("consumer stream failed: {}", describe(&e))),
                            None => {
                                self.sub = None;
                                return Err("the broker cancelled the consumer (queue deleted, or a node went down)".into());
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
                        self.probe_slot_released();
                    }
                }
                () = sleep_until(self.reserve_until), if self.reserve_until.is_some() => {
                    self.reservation_expired().await?;
                }
                () = sleep_until(self.flush_at), if self.flush_at.is_some() => {
                    self.flush(true).await?;
                }
            }
        }
    }

    fn desired(&self, state: BreakerState) -> Option<Mode> {
        match state {
            BreakerState::Closed | BreakerState::Disabled => Some(Mode::Full),
            BreakerState::HalfOpen { trial } if self.probe_done != Some(trial) => {
                Some(Mode::Probe(trial))
            }
            _ => None,
        }
    }

    /// Makes the subscription match the breaker: none while open, as many
    /// deliveries as it holds probe permits while half-open, full prefetch
    /// while closed.
    async fn reconcile(&mut self, state: BreakerState) -> SessionResult {
        if let Some(trial) = self.reserved_trial
            && state != (BreakerState::HalfOpen { trial })
        {
            // That trial is over: its unused permits are worthless.
            self.drop_reservation(false);
        }
        let want = self.desired(state);
        let have = self.sub.as_ref().map(|s| s.mode);
        if want == have {
            return Ok(());
        }
        if have.is_some() {
            self.unsubscribe().await?;
        }
        let Some(mode) = want else {
            if matches!(state, BreakerState::HalfOpen { .. }) {
                debug!(queue = %self.queue(), "took its probes; no consumer until the trial ends");
            } else {
                info!(
                    queue = %self.queue(),
                    breaker = %self.shared().breaker.name(),
                    state = state.name(),
                    "consumer paused: no consumer at the broker, messages wait in the queue"
                );
            }
            return Ok(());
        };
        let prefetch = match mode {
            Mode::Full => self.runtime.settings.prefetch,
            Mode::Probe(trial) => {
                self.reserve(trial);
                // Deliveries already here (prefetched before the breaker
                // opened, if this consumer saw it late) are probes too.
                let need = self.reserved.len().saturating_sub(self.pending.len());
                if need == 0 {
                    self.probe_done = Some(trial);
                    if self.reserved.is_empty() {
                        debug!(queue = %self.queue(), trial, "another consumer holds the probes");
                    }
                    return Ok(());
                }
                u16::try_from(need).unwrap_or(u16::MAX)
            }
        };
        self.consume(prefetch, mode).await?;
        let stats = &self.shared().stats;
        stats.subscribed.store(true, Ordering::Relaxed);
        inc(&stats.subscriptions);
        match mode {
            Mode::Full => info!(queue = %self.queue(), prefetch, "consumer subscribed"),
            Mode::Probe(trial) => {
                if self.shared().breaker_consumers > 1 {
                    self.reserve_until = Some(Instant::now() + PROBE_RESERVATION_WAIT);
                }
                info!(
                    queue = %self.queue(),
                    breaker = %self.shared().breaker.name(),
                    trial,
                    probes = prefetch,
                    "consumer subscribed for half-open probes"
                );
            }
        }
        Ok(())
    }

    /// Takes as many probe permits of `trial` as the breaker still has.
    fn reserve(&mut self, trial: u64) {
        let probes = self.shared().breaker.config().half_open_probes as usize;
        while self.reserved.len() < probes {
            match self.shared().breaker.try_acquire() {
                Ok(permit) if permit.kind() == (PermitKind::Probe { trial }) => {
                    self.reserved.push(permit);
                }
                // Another trial, or closed meanwhile: the state watch will tell.
                Ok(_) | Err(_) => break,
            }
        }
        if !self.reserved.is_empty() {
            self.reserved_trial = Some(trial);
        }
    }

    /// Gives unused probe permits back to the breaker. With `seen`, the
    /// release this causes is not taken as a cue to reserve again.
    fn drop_reservation(&mut self, seen: bool) {
        self.reserved.clear();
        self.reserved_trial = None;
        self.reserve_until = None;
        if seen {
            self.released_rx.borrow_and_update();
        }
    }

    /// A probe slot came free (a probe said nothing, or another consumer gave
    /// its reservation back): if this consumer stopped after taking its
    /// probes for the current trial, it may try again.
    fn probe_slot_released(&mut self) {
        if let BreakerState::HalfOpen { trial } = self.shared().breaker.state()
            && self.probe_done == Some(trial)
            && self.reserved.is_empty()
        {
            self.probe_done = None;
        }
    }

    /// An unused reservation times out (several consumers share the breaker):
    /// stop waiting on this queue, run anything that arrived, and give the
    /// rest of the permits to the others.
    async fn reservation_expired(&mut self) -> SessionResult {
        let trial = self.reserved_trial;
        if self
            .sub
            .as_ref()
            .is_some_and(|s| matches!(s.mode, Mode::Probe(_)))
        {
            self.unsubscribe().await?;
        }
        self.dispatch();
        self.drop_reservation(true);
        if let Some(trial) = trial {
            self.probe_done = Some(trial);
        }
        Ok(())
    }

    /// `basic.cancel`, then take every delivery the broker sent before the
    /// cancel-ok (lapin still yields them) as pending.
    async fn unsubscribe(&mut self) -> SessionResult {
        let Some(mut sub) = self.sub.take() else {
            return Ok(());
        };
        self.shared()
            .stats
            .subscribed
            .store(false, Ordering::Relaxed);
        self.channel
            .basic_cancel(sub.consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| format!("cancelling the consumer: {}", describe(&e)))?;
        while let Some(item) = sub.consumer.next().await {
            match item {
                Ok(delivery) => self.received(delivery),
                Err(e) => return Err(format!("consumer stream failed: {}", describe(&e))),
            }
        }
        Ok(())
    }

    fn received(&mut self, delivery: Delivery) {
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
                self.probe_done = Some(trial);
            }
        }
        self.pending.push_back(delivery);
    }

    /// Starts pending deliveries while slots and the breaker allow (using
    /// reserved probe permits first); settles the ones the breaker refuses
    /// without starting them.
    fn dispatch(&mut self) {
        // One clock read for the whole batch of permits.
        let now = Instant::now();
        while !self.pending.is_empty() {
            if self.reserved.is_empty() && self.shared().breaker.admits_all_now() {
                // The common case, read without a lock: closed, no probes held.
                if self.slots.available_permits() == 0 {
                    break;
                }
            } else {
                let state = self.shared().breaker.state();
                let can_run =
                    !matches!(state, BreakerState::Open { .. } | BreakerState::ForcedOpen);
                if can_run && self.slots.available_permits() == 0 {
                    break;
                }
                if let Some(trial) = self.reserved_trial
                    && state != (BreakerState::HalfOpen { trial })
                {
                    // Never call the dependency with a permit of a finished trial.
                    self.drop_reservation(false);
                }
            }
            let shared = self.runtime.shared.clone();
            let permit = match self.reserved.pop() {
                Some(permit) => {
                    if self.reserved.is_empty() {
                        self.reserved_trial = None;
                        self.reserve_until = None;
                    }
                    Ok(permit)
                }
                None => shared.breaker.try_acquire_at(now),
            };
            match permit {
                Ok(permit) => {
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        break; // the permit is dropped: counts as nothing
                    };
                    let Some(delivery) = self.pending.pop_front() else {
                        break;
                    };
                    let ctx = task::context(&shared, delivery);
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
                        && let BreakerState::HalfOpen { trial } = shared.breaker.state()
                    {
                        self.probe_done = Some(trial);
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

    fn finished(&mut self, (tag, done): TaskOutput) {
        self.running.tags.remove(&tag);
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
    async fn flush(&mut self, out_of_order: bool) -> SessionResult {
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
            sent.map_err(|e| format!("settling delivery: {}", describe(&e)))?;
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
        self.drop_reservation(true);
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
        let deadline = Instant::now() + self.runtime.grace;
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
            .map_err(|e| format!("confirming the last acks: {}", describe(&e)))?;
        if let Err(e) = self.channel.close(200, "worker shutting down".into()).await {
            debug!(queue = %self.queue(), error = %describe(&e), "closing the channel");
        }
        self.publisher.close().await;
        info!(queue = %self.queue(), returned, "consumer stopped");
        Ok(())
    }

    /// A synchronous queue command after the last settle (see [`stop`](Self::stop)):
    /// for a quorum queue, subscribe for a moment with prefetch 1 and cancel.
    /// A delivery that arrives meanwhile is left unsettled, returned when the
    /// channel closes. Classic queues apply acks in order and need none.
    async fn settle_barrier(&mut self) -> SessionResult {
        if self.sub.is_some() {
            return self.unsubscribe().await;
        }
        if self.runtime.settings.queue_type != QueueType::Quorum {
            return Ok(());
        }
        self.consume(1, Mode::Full).await?;
        self.unsubscribe().await
    }

    /// Subscribes with a per-consumer QoS of `prefetch` (global = false:
    /// quorum queues reject global), set first because it applies to
    /// consumers created after it.
    async fn consume(&mut self, prefetch: u16, mode: Mode) -> SessionResult {
        self.channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| format!("setting prefetch: {}", describe(&e)))?;
        let consumer = self
            .channel
            .basic_consume(
                ShortString::from(self.queue()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("subscribing: {}", describe(&e)))?;
        self.sub = Some(Subscription {
            consumer,
            mode,
            received: 0,
            quota: u32::from(prefetch),
        });
        Ok(())
    }
}

/// The next delivery if one is buffered, without waiting (polled with the
/// task's own waker).
async fn ready_delivery(
    sub: &mut Option<Subscription>,
) -> Option<Option<Result<Delivery, lapin::Error>>> {
    let s = sub.as_mut()?;
    std::future::poll_fn(|cx| match s.consumer.poll_next_unpin(cx) {
        Poll::Ready(item) => Poll::Ready(Some(item)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

async fn next_delivery(sub: &mut Option<Subscription>) -> Option<Result<Delivery, lapin::Error>> {
    match sub {
        Some(s) => s.consumer.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
