//! The subscription at the broker, kept in step with the breaker: none
//! while open, as many deliveries as the consumer holds probe permits while
//! half-open, the configured prefetch while closed; and the quorum queue's
//! settle barrier on the way out.

use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use tokio::time::Instant;
use tracing::{debug, info};

use super::session::{Session, SessionError, SessionResult};
use super::stats::inc;
use crate::breaker::BreakerState;
use crate::config::QueueType;

/// With several consumers on one breaker, how long one may hold half-open
/// probe permits on an empty queue before handing them to the others.
const PROBE_RESERVATION_WAIT: Duration = Duration::from_secs(1);

/// What a subscription is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Closed breaker: prefetch as configured.
    Full,
    /// Half-open: prefetch = probes, for this trial only.
    Probe(u64),
}

/// The consumer at the broker, while there is one.
pub(super) struct Subscription {
    pub(super) consumer: Consumer,
    pub(super) mode: Mode,
    pub(super) received: u32,
    /// Probe mode: deliveries to take before cancelling (the prefetch set).
    pub(super) quota: u32,
}

impl Session<'_> {
    fn desired(&self, state: BreakerState) -> Option<Mode> {
        match state {
            BreakerState::Closed | BreakerState::Disabled => Some(Mode::Full),
            BreakerState::HalfOpen { trial } if !self.probes.is_done(trial) => {
                Some(Mode::Probe(trial))
            }
            _ => None,
        }
    }

    /// Makes the subscription match the breaker: none while open, as many
    /// deliveries as it holds probe permits while half-open, full prefetch
    /// while closed.
    pub(super) async fn reconcile(&mut self, state: BreakerState) -> SessionResult {
        // A trial that is over: its unused permits are worthless.
        self.probes.release_if_over(state);
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
                    breaker = %self.shared().breakers.closed_to_calls(),
                    state = state.name(),
                    "consumer paused: no consumer at the broker, messages wait in the queue"
                );
            }
            return Ok(());
        };
        let prefetch = match mode {
            Mode::Full => self.runtime.settings.prefetch,
            Mode::Probe(trial) => {
                let reserved = self.probes.reserve(&self.runtime.shared.breakers, trial);
                // Deliveries already here (prefetched before the breaker
                // opened, if this consumer saw it late) are probes too.
                let need = reserved.saturating_sub(self.pending.len());
                if need == 0 {
                    self.probes.mark_done(trial);
                    if reserved == 0 {
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
                    self.probes
                        .hand_over_at(Instant::now() + PROBE_RESERVATION_WAIT);
                }
                info!(
                    queue = %self.queue(),
                    breaker = %self.shared().breakers.names(),
                    trial,
                    probes = prefetch,
                    "consumer subscribed for half-open probes"
                );
            }
        }
        Ok(())
    }

    /// `basic.cancel`, then take every delivery the broker sent before the
    /// cancel-ok (lapin still yields them) as pending.
    pub(super) async fn unsubscribe(&mut self) -> SessionResult {
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
            .map_err(SessionError::broker("cancelling the consumer"))?;
        while let Some(item) = sub.consumer.next().await {
            match item {
                Ok(delivery) => self.received(delivery),
                Err(e) => return Err(SessionError::broker("consumer stream failed")(e)),
            }
        }
        Ok(())
    }

    /// A synchronous queue command after the last settle (see [`stop`](Self::stop)):
    /// for a quorum queue, subscribe for a moment with prefetch 1 and cancel.
    /// A delivery that arrives meanwhile is left unsettled, returned when the
    /// channel closes. Classic queues apply acks in order and need none.
    pub(super) async fn settle_barrier(&mut self) -> SessionResult {
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
            .map_err(SessionError::broker("setting prefetch"))?;
        let consumer = self
            .channel
            .basic_consume(
                ShortString::from(self.queue()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(SessionError::broker("subscribing"))?;
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
pub(super) async fn ready_delivery(
    sub: &mut Option<Subscription>,
) -> Option<Option<Result<Delivery, lapin::Error>>> {
    let s = sub.as_mut()?;
    std::future::poll_fn(|cx| match s.consumer.poll_next_unpin(cx) {
        Poll::Ready(item) => Poll::Ready(Some(item)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

pub(super) async fn next_delivery(
    sub: &mut Option<Subscription>,
) -> Option<Result<Delivery, lapin::Error>> {
    match sub {
        Some(s) => s.consumer.next().await,
        None => std::future::pending().await,
    }
}
