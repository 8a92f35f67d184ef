//! One queue's consumer for the worker's lifetime: a session per channel,
//! started again with backoff whenever the channel or connection is lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::in_flight::InFlight;
use super::probes::Probes;
use super::session::{Session, SessionError};
use super::settle::AckTracker;
use super::stats::add;
use super::task::ConsumerShared;
use crate::amqp::connection::ManagedConnection;
use crate::amqp::publish::Publisher;
use crate::config::ConsumerSettings;

/// A session that lasted this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// One consumer, alive for the worker's lifetime; each connection or channel
/// it uses is a session.
pub(crate) struct ConsumerRuntime {
    pub(crate) settings: ConsumerSettings,
    pub(crate) shared: Arc<ConsumerShared>,
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
        crate::backoff::exponential(Duration::from_millis(100), Duration::from_secs(5))
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), SessionError> {
        let Some((_, connection)) = self.consume.connection(shutdown).await else {
            return Ok(());
        };
        self.shared.topology.declare_on(&connection).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(SessionError::broker("opening a channel"))?;
        let Some((_, publish_connection)) = self.publish.connection(shutdown).await else {
            return Ok(());
        };
        let publisher = Publisher::open(publish_connection.clone(), self.publish_timeout)
            .await
            .map_err(SessionError::broker("opening the publishing channel"))?;
        // Handlers publish on a channel of their own: a publish the broker
        // refuses (an exchange that does not exist) closes that channel, not
        // the one the worker's retry and dead-letter copies wait on.
        let handler_publisher = Publisher::lazy(publish_connection, self.publish_timeout);
        let token = CancellationToken::new();
        let _cancel_tasks_on_exit = token.clone().drop_guard();
        let mut session = Session {
            runtime: self,
            channel,
            publisher,
            handler_publisher,
            token,
            sub: None,
            pending: VecDeque::new(),
            running: InFlight::new(self.shared.poll_slot.clone()),
            slots: Arc::new(Semaphore::new(usize::from(self.settings.concurrency))),
            tracker: AckTracker::default(),
            ops: Vec::new(),
            flush_at: None,
            probes: Probes::default(),
            released_rx: self.shared.breakers.probe_releases(),
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
