//! What must keep running while a handler blocks the worker's threads: the
//! connections' supervision (connect, watch, reconnect) and the admin
//! endpoint run on a small runtime of their own (one thread, `rg-control`);
//! each connection's I/O, heartbeats and lapin's internal tasks run on its
//! own `lapin-io-loop` thread (`crate::amqp::connection`); a watchdog thread
//! notices a handler that holds its thread and says which queue's, once.
//!
//! Handlers are polled by their consumer's task on the worker runtime
//! (`worker.threads`, one by default). A handler that blocks (a sync driver,
//! a CPU loop) stops every consumer on that thread, but no longer the
//! heartbeats or `/healthz`: the broker keeps the connection, and the
//! watchdog tells the operator to move the work to `spawn_blocking`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tracing::instrument::WithSubscriber;
use tracing::warn;

/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(100);

/// A handler poll that lasts this many ticks (500 ms) is blocking its thread.
const BLOCKED_TICKS: u64 = 5;

/// At most one warning per queue this often.
const WARN_EVERY_TICKS: u64 = 600;

/// The control runtime: a current-thread runtime driven by a thread of its
/// own, so waking it costs one thread, not a scheduler's worker and its
/// driver.
#[derive(Debug)]
pub(crate) struct Control {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Control {
    /// A one-thread runtime on a thread named `rg-control`.
    pub(crate) fn new() -> std::io::Result<Self> {
        let runtime: Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rg-control".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Whatever is still running (an admin request, a reconnect)
                // is dropped with the runtime, on its own thread.
                runtime.shutdown_background();
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where to spawn control tasks.
    pub(crate) fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs `task` on the control runtime (with the caller's log
    /// subscriber) and waits for it.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> T {
        match self.handle().spawn(task.with_current_subscriber()).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where a consumer tells the watchdog that one of its handlers is being
/// polled, and since which tick (0: none is).
#[derive(Debug, Default)]
pub(crate) struct PollSlot {
    since: AtomicU64,
}

/// The watchdog's clock, in ticks since it started (never 0 once running).
static TICKS: AtomicU64 = AtomicU64::new(1);

/// A future whose every poll is seen by the watchdog through `slot`.
pub(crate) struct Watched<F> {
    inner: Pin<Box<F>>,
    slot: Arc<PollSlot>,
}

impl<F> Watched<F> {
    pub(crate) fn new(inner: F, slot: Arc<PollSlot>) -> Self {
        Self {
            inner: Box::pin(inner),
            slot,
        }
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.slot
            .since
            .store(TICKS.load(Ordering::Relaxed), Ordering::Relaxed);
        let out = self.inner.as_mut().poll(cx);
        self.slot.since.store(0, Ordering::Relaxed);
        out
    }
}

/// The watchdog thread; stops when dropped.
#[derive(Debug)]
pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watches `slots` (one per queue).
    pub(crate) fn start(slots: Vec<(Arc<str>, Arc<PollSlot>)>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let thread = std::thread::Builder::new()
            .name("rg-watchdog".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || watch(&slots, &flag));
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn watch(slots: &[(Arc<str>, Arc<PollSlot>)], stop: &AtomicBool) {
    let mut warned_at = vec![0u64; slots.len()];
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(TICK);
        let now = TICKS.fetch_add(1, Ordering::Relaxed) + 1;
        for (i, (queue, slot)) in slots.iter().enumerate() {
            let since = slot.since.load(Ordering::Relaxed);
            if since == 0 || now.saturating_sub(since) < BLOCKED_TICKS {
                continue;
            }
            if warned_at[i] != 0 && now.saturating_sub(warned_at[i]) < WARN_EVERY_TICKS {
                continue;
            }
            warned_at[i] = now;
            warn!(
                queue = %queue,
                blocked_for_ms = (now - since) * 100,
                "a handler of this queue is blocking its thread: every consumer on that thread waits; \
                 move blocking or CPU-heavy work into tokio::task::spawn_blocking (or raise worker.threads)"
            );
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_is_seen_while_it_runs_and_cleared_after() {
        let slot = Arc::new(PollSlot::default());
        let seen = Arc::new(AtomicU64::new(0));
        let (s, inner_slot) = (seen.clone(), slot.clone());
        let fut = Watched::new(
            async move {
                s.store(inner_slot.since.load(Ordering::Relaxed), Ordering::Relaxed);
            },
            slot.clone(),
        );
        futures_util::FutureExt::now_or_never(fut).unwrap();
        assert_ne!(seen.load(Ordering::Relaxed), 0, "set during the poll");
        assert_eq!(slot.since.load(Ordering::Relaxed), 0, "cleared after it");
    }
}
