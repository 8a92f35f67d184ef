//! The handlers a session is running, polled by the consumer task itself:
//! no task is spawned per message, so nothing crosses threads on the
//! message path. (`worker.threads` > 1 still spreads consumers and I/O over
//! threads; a handler that burns CPU should move that work to
//! `spawn_blocking`.)

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::Poll;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};

use std::sync::Arc;

use super::task::Finished;
use crate::worker::control::{PollSlot, Watched};

/// What a message's future yields: its tag, and how to settle it (or the
/// panic that escaped it, which settles it as a requeue).
pub(super) type TaskOutput = (u64, std::thread::Result<Finished>);

/// The deliveries being handled now, by tag.
pub(super) struct InFlight {
    futures: FuturesUnordered<BoxFuture<'static, TaskOutput>>,
    tags: HashSet<u64>,
    /// Every poll of a handler is seen by the watchdog through this.
    slot: Arc<PollSlot>,
}

impl InFlight {
    pub(super) fn new(slot: Arc<PollSlot>) -> Self {
        Self {
            futures: FuturesUnordered::new(),
            tags: HashSet::new(),
            slot,
        }
    }

    pub(super) fn push(&mut self, tag: u64, task: impl Future<Output = Finished> + Send + 'static) {
        self.tags.insert(tag);
        let task = Watched::new(task, self.slot.clone());
        self.futures.push(Box::pin(async move {
            (tag, AssertUnwindSafe(task).catch_unwind().await)
        }));
    }

    /// `tag` is settled: it no longer counts as in flight.
    pub(super) fn forget(&mut self, tag: u64) {
        self.tags.remove(&tag);
    }

    pub(super) fn len(&self) -> usize {
        self.futures.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    /// The next task to finish.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a task that finishes is yielded by the next call.
    pub(super) async fn next(&mut self) -> Option<TaskOutput> {
        self.futures.next().await
    }

    /// A finished task, if one is ready without waiting. Polls with the
    /// caller's own waker: polling with a dummy one (`now_or_never`) would
    /// leave the set waking nobody when its next task finishes.
    pub(super) async fn try_next(&mut self) -> Option<TaskOutput> {
        std::future::poll_fn(|cx| match self.futures.poll_next_unpin(cx) {
            Poll::Ready(done) => Poll::Ready(done),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }

    /// Cancels every task; returns their tags.
    pub(super) fn abort_all(&mut self) -> Vec<u64> {
        self.futures = FuturesUnordered::new();
        self.tags.drain().collect()
    }
}
