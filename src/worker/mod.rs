//! Building everything from settings and running it: connections, topology,
//! breakers and their timers, one task per consumer, and a clean shutdown.
//!
//! ```no_run
//! use rabbit_guard::config::{Sources, load};
//! use rabbit_guard::handler::{Context, Handler, HandlerError, Json};
//! use rabbit_guard::Worker;
//!
//! struct Orders;
//! impl Handler for Orders {
//!     type Message = Json<serde_json::Value>;
//!     async fn handle(&self, Json(order): Json<serde_json::Value>, _ctx: &Context) -> Result<(), HandlerError> {
//!         println!("{order}");
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = load(&Sources::from_env(None), &["orders"])?;
//! Worker::builder(settings).handler("orders", Orders).run().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::instrument::WithSubscriber;
use tracing::{debug, info, warn};

#[cfg(feature = "admin")]
use crate::admin::WorkerView;
use crate::amqp::connection::ManagedConnection;
use crate::amqp::oauth2::TokenSource;
use crate::breaker::{
    Breaker, BreakerSet, BreakerState, ErasedHealthCheck, HealthCheck, HealthCheckConfig,
    Transition, TransitionReason,
};
use crate::config::{ConfigError, Problem, SafetyChecks, Settings};
use crate::consumer::{ConsumerRuntime, ConsumerShared};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::handler::{ErasedHandler, Handler, erase};

use crate::amqp::topology::Topology;
use crate::metrics::Metrics;

pub(crate) mod control;
pub mod safety;

pub use crate::consumer::{ConsumerStats, HANDLER_OUTCOMES, StatsSnapshot};

/// Extra time, beyond the grace period, that closing channels may take.
const CLOSE_MARGIN: Duration = Duration::from_secs(10);

/// Collects settings and custom handlers; [`build`](Self::build) checks them.
#[must_use]
pub struct WorkerBuilder {
    settings: Settings,
    handlers: BTreeMap<String, Arc<dyn ErasedHandler>>,
    health_checks: BTreeMap<String, Arc<dyn ErasedHealthCheck>>,
    /// Breakers given a second health check (refused by `build`).
    twice_checked: Vec<String>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field(
                "health_checks",
                &self.health_checks.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// Registers `handler` under `name`: consumers with `handler = "name"` use it.
    pub fn handler<H: Handler>(mut self, name: impl Into<String>, handler: H) -> Self {
        self.handlers.insert(name.into(), erase(handler));
        self
    }

    /// Registers `check` as the health check of the breaker `breaker`:
    /// while that breaker is open, the check runs every
    /// `health_check.interval` (default 1s, each bounded by
    /// `health_check.timeout`, default 1s), and the breaker goes half-open
    /// as soon as one passes. `[breakers.NAME.health_check]` may tune the
    /// interval and timeout, but must not also set a `url`.
    pub fn health_check<C: HealthCheck>(mut self, breaker: impl Into<String>, check: C) -> Self {
        let breaker = breaker.into();
        if self.health_checks.contains_key(&breaker) {
            self.twice_checked.push(breaker.clone());
        }
        self.health_checks
            .insert(breaker, crate::breaker::erase_health_check(check));
        self
    }

    /// The settings the worker will run with (its `app` section included).
    #[must_use]
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Runs an async setup with the builder: open pools and clients from
    /// the loaded settings, then register the handlers that own them.
    ///
    /// ```no_run
    /// # use rabbit_guard::builtin_handlers::NoopHandler;
    /// # async fn f(settings: rabbit_guard::config::Settings) -> Result<(), rabbit_guard::Error> {
    /// #[derive(serde::Deserialize, Default)]
    /// #[serde(default)]
    /// struct App { billing_url: String }
    ///
    /// rabbit_guard::Worker::builder(settings)
    ///     .setup(|worker| async move {
    ///         let app: App = worker.settings().app.read()?;
    ///         let client = reqwest::Client::builder().build()?;
    ///         # let _ = (app, client);
    ///         Ok(worker.handler("charge", NoopHandler))
    ///     })
    ///     .await?
    ///     .run()
    ///     .await
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Setup`] with the setup's own error.
    pub async fn setup<F, Fut>(self, setup: F) -> Result<Self, Error>
    where
        F: FnOnce(Self) -> Fut,
        Fut: std::future::Future<Output = Result<Self, crate::handler::BoxError>>,
    {
        setup(self).await.map_err(Error::setup)
    }

    /// The names of the handlers registered so far.
    #[must_use]
    pub fn handler_names(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }

    /// Validates the settings against the registered handlers and builds the
    /// breakers and handlers. Does not touch the network.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] listing every problem; [`Error::Handler`] when a
    /// built-in handler cannot be built from its settings.
    pub fn build(self) -> Result<Worker, Error> {
        let names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        self.settings.validate(&names)?;
        let (breakers, health_checks) = self.breakers()?;
        let metrics = Metrics::new();
        let mut consumers = Vec::new();
        for (index, c) in self.settings.consumers.iter().enumerate() {
            let consumer_breakers = BreakerSet::new(
                c.breaker_names()
                    .into_iter()
                    .map(|name| breakers[name].clone())
                    .collect(),
            );
            let handler: Arc<dyn ErasedHandler> = match self.handlers.get(&c.handler) {
                Some(h) => h.clone(),
                None => {
                    let builtin =
                        crate::builtin_handlers::builtin(&c.handler).ok_or_else(|| {
                            Error::Handler {
                                index,
                                message: format!("no handler named {:?} is registered", c.handler),
                            }
                        })?;
                    (builtin.build)(c, consumer_breakers.call_timeout())
                        .map_err(|message| Error::Handler { index, message })?
                }
            };
            consumers.push(Arc::new(ConsumerShared {
                queue: Arc::from(c.queue.as_str()),
                handler_name: Arc::from(c.handler.as_str()),
                handler,
                breakers: consumer_breakers,
                topology: Topology::of(index, c),
                delays: c.retry.delays.clone(),
                immediate_retries: c.retry.immediate,
                stats: Arc::new(ConsumerStats::new(
                    c.retry.delays.len(),
                    // Durations are only kept for an endpoint that can serve them.
                    self.settings
                        .admin
                        .listen
                        .is_some()
                        .then(|| metrics.handler_histograms(&c.queue)),
                )),
                poll_slot: Arc::default(),
                concurrency: c.concurrency,
                reply_prefixes: (!c.reply_to_prefixes.is_empty())
                    .then(|| Arc::from(c.reply_to_prefixes.clone())),
                failures: crate::consumer::FailureLog::new(
                    Arc::from(c.queue.as_str()),
                    self.settings.log.failure_summary_every,
                ),
                verdict_slots: Arc::new(tokio::sync::Semaphore::new(usize::from(
                    c.prefetch.saturating_sub(c.concurrency),
                ))),
                breaker_consumers: c
                    .breaker_names()
                    .iter()
                    .map(|name| {
                        self.settings
                            .consumers
                            .iter()
                            .filter(|other| other.breaker_names().contains(name))
                            .count()
                    })
                    .max()
                    .unwrap_or(1),
            }));
        }
        Ok(Worker {
            settings: self.settings,
            breakers,
            health_checks,
            consumers,
            metrics,
        })
    }

    /// The breakers, and the health check of each breaker that has one.
    #[allow(clippy::type_complexity)]
    fn breakers(
        &self,
    ) -> Result<
        (
            BTreeMap<String, Breaker>,
            Vec<(Breaker, Arc<dyn ErasedHealthCheck>)>,
        ),
        Error,
    > {
        let mut problems: Vec<Problem> = self
            .twice_checked
            .iter()
            .map(|name| Problem {
                key: format!("breakers.{name}"),
                value: None,
                message: format!(
                    "two HealthChecks are registered for breaker {name:?}: register one (it may call several things)"
                ),
            })
            .collect();
        for name in self.health_checks.keys() {
            if !self.settings.breakers.contains_key(name) {
                let known: Vec<&str> = self.settings.breakers.keys().map(String::as_str).collect();
                problems.push(Problem {
                    key: format!("breakers.{name}"),
                    value: None,
                    message: format!(
                        "a HealthCheck is registered for breaker {name:?}, which is not defined (defined breakers: {})",
                        known.join(", ")
                    ),
                });
            }
        }
        let mut breakers = BTreeMap::new();
        let mut checks = Vec::new();
        for (name, cfg) in &self.settings.breakers {
            let mut cfg = cfg.clone();
            let registered = self.health_checks.get(name).cloned();
            let key = format!("breakers.{name}.health_check.url");
            let check = match (&mut cfg.health_check, registered) {
                (None, None) => None,
                (None, Some(check)) => {
                    cfg.health_check = Some(HealthCheckConfig::default());
                    Some(check)
                }
                (Some(h), Some(check)) => {
                    if let Some(url) = &h.url {
                        problems.push(Problem {
                            key,
                            value: Some(format!("{:?}", url.masked())),
                            message: format!("a HealthCheck is also registered for breaker {name:?}: use one of them"),
                        });
                    }
                    Some(check)
                }
                (Some(h), None) => match &h.url {
                    None => {
                        problems.push(Problem {
                            key,
                            value: None,
                            message: format!("missing: set the URL to check, or register a HealthCheck for breaker {name:?} (WorkerBuilder::health_check)"),
                        });
                        None
                    }
                    Some(url) => match http_health_check(h) {
                        Ok(check) => Some(check),
                        Err(message) => {
                            problems.push(Problem {
                                key,
                                value: Some(format!("{:?}", url.masked())),
                                message,
                            });
                            None
                        }
                    },
                },
            };
            let breaker = Breaker::new(name.clone(), cfg);
            if let Some(check) = check {
                checks.push((breaker.clone(), check));
            }
            breakers.insert(name.clone(), breaker);
        }
        if problems.is_empty() {
            Ok((breakers, checks))
        } else {
            Err(Error::Config(ConfigError::Invalid(problems)))
        }
    }

    /// Builds and runs until SIGINT or SIGTERM. See [`Worker::run`].
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build) and [`Worker::run_until`].
    pub async fn run(self) -> Result<(), Error> {
        self.build()?.run().await
    }
}

/// A configured worker, ready to run.
pub struct Worker {
    settings: Settings,
    breakers: BTreeMap<String, Breaker>,
    health_checks: Vec<(Breaker, Arc<dyn ErasedHealthCheck>)>,
    consumers: Vec<Arc<ConsumerShared>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("breakers", &self.breakers.keys().collect::<Vec<_>>())
            .field(
                "consumers",
                &self.consumers.iter().map(|c| &c.queue).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts building a worker from `settings`.
    pub fn builder(settings: Settings) -> WorkerBuilder {
        WorkerBuilder {
            settings,
            handlers: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            twice_checked: Vec::new(),
        }
    }

    /// The settings it runs with.
    #[must_use]
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The breaker named `name`, shared with the running consumers.
    #[must_use]
    pub fn breaker(&self, name: &str) -> Option<Breaker> {
        self.breakers.get(name).cloned()
    }

    /// Every breaker, by name.
    #[must_use]
    pub fn breakers(&self) -> &BTreeMap<String, Breaker> {
        &self.breakers
    }

    /// Live counters of the consumer of `queue`.
    #[must_use]
    pub fn stats(&self, queue: &str) -> Option<Arc<ConsumerStats>> {
        self.consumers
            .iter()
            .find(|c| &*c.queue == queue)
            .map(|c| c.stats.clone())
    }

    /// Runs until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// As [`run_until`](Self::run_until), or when signal handlers cannot be installed.
    pub async fn run(self) -> Result<(), Error> {
        let shutdown = CancellationToken::new();
        let signals = crate::signal::shutdown_on_signal(shutdown.clone())?;
        let result = self.run_until(shutdown).await;
        signals.abort();
        result
    }

    /// Connects, declares topology, and consumes until `shutdown` is
    /// cancelled; then stops consuming, lets running handlers finish within
    /// `worker.shutdown_grace`, requeues the rest, and closes channels and
    /// connections after the broker has processed the last acks.
    ///
    /// # Errors
    ///
    /// Startup errors (refused credentials, unreachable broker, topology
    /// mismatch), or reconnection giving up after `broker.reconnect.max_attempts`.
    ///
    /// # Cancel safety
    ///
    /// Cancel the token, not the future: dropping the future skips the
    /// graceful stop (handlers are cut off, nothing is acked after that
    /// point, and the broker requeues every unacked delivery when the
    /// connections drop). Nothing is lost either way; only a clean stop
    /// avoids the redeliveries.
    pub async fn run_until(self, shutdown: CancellationToken) -> Result<(), Error> {
        if self.settings.worker.safety_checks != SafetyChecks::Off {
            for advice in safety::advisories(&self.settings) {
                warn!(%advice, "configuration advice");
            }
        }
        match self.settings.worker.safety_checks {
            SafetyChecks::Off => {}
            SafetyChecks::Warn => {
                for risk in safety::risks(&self.settings) {
                    warn!(%risk, "safety check (set worker.safety_checks = \"refuse\" to stop instead)");
                }
            }
            SafetyChecks::Refuse => {
                let risks = safety::risks(&self.settings);
                if !risks.is_empty() {
                    return Err(Error::Unsafe(risks));
                }
            }
        }
        raise_open_file_limit();
        let broker = &self.settings.broker;
        let tokens = match &broker.oauth2 {
            Some(oauth2) => {
                let source = Arc::new(TokenSource::new(oauth2).map_err(Error::oauth2)?);
                let first = source.fetch().await.map_err(Error::oauth2)?;
                info!(token = %first.expiry(), "OAuth 2 token obtained");
                Some(source)
            }
            None => None,
        };
        let managed = |role| -> Result<Arc<ManagedConnection>, Error> {
            let connection = ManagedConnection::new(broker, role)?;
            Ok(Arc::new(match &tokens {
                Some(source) => connection.with_tokens(source.subscribe()),
                None => connection,
            }))
        };
        let consume = managed("consume")?;
        let publish = managed("publish")?;
        let fleet = match Fleet::new(&self.settings.fleet, broker, &self.breakers)
            .map_err(|message| Error::Setup { message })?
        {
            Some(fleet) => Some((fleet, managed("fleet")?)),
            None => None,
        };
        let control = control::Control::new().map_err(|source| Error::Io {
            context: "starting the control thread (connections' I/O, admin endpoint)".into(),
            source,
        })?;
        // The admin endpoint first: a taken port fails fast, before any
        // broker work, and health checks can see the worker waiting for it.
        #[cfg(feature = "admin")]
        let admin = {
            let (admin, view, metrics) = (
                self.settings.admin.clone(),
                WorkerView::new(
                    self.breakers.clone(),
                    self.consumers.clone(),
                    vec![consume.clone(), publish.clone()],
                    self.metrics.clone(),
                    fleet.clone(),
                ),
                self.metrics.clone(),
            );
            control
                .run(async move { crate::admin::start(&admin, view, metrics).await })
                .await?
        };
        let result = self
            .run_connected(
                &control,
                &consume,
                &publish,
                fleet.as_ref(),
                tokens,
                shutdown,
            )
            .await;
        #[cfg(feature = "admin")]
        if let Some(admin) = admin {
            admin.stop().await;
        }
        result
    }

    async fn run_connected(
        &self,
        control: &control::Control,
        consume: &Arc<ManagedConnection>,
        publish: &Arc<ManagedConnection>,
        fleet: Option<&(Fleet, Arc<ManagedConnection>)>,
        tokens: Option<Arc<TokenSource>>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let fleet_conn = fleet.map(|(_, c)| c);
        // Supervised from the control runtime, so reconnecting goes on
        // whatever the handlers do; each connection's I/O, heartbeats and
        // lapin's internal tasks run on its own I/O thread.
        for conn in [consume, publish].into_iter().chain(fleet_conn) {
            let (conn, shutdown) = (conn.clone(), shutdown.clone());
            control
                .run(async move { conn.start(&shutdown).await })
                .await?;
        }
        if let Err(e) = self.declare_all(consume, &shutdown).await {
            if let Some(conn) = fleet_conn {
                conn.close().await;
            }
            publish.close().await;
            consume.close().await;
            return Err(e);
        }

        let infra = CancellationToken::new();
        let stop = CancellationToken::new();
        let infra_tasks = TaskTracker::new();
        self.spawn_breaker_tasks(&infra_tasks, &infra);
        let connections: Vec<&Arc<ManagedConnection>> =
            [consume, publish].into_iter().chain(fleet_conn).collect();
        let mut fatal_rx = supervise(&connections, tokens, control, &infra_tasks, &infra);
        if let Some((fleet, conn)) = fleet {
            infra_tasks.spawn_on(
                fleet
                    .clone()
                    .run(conn.clone(), infra.clone())
                    .with_current_subscriber(),
                &control.handle(),
            );
            // A worker joining during an outage starts paused.
            fleet.joined(&shutdown).await;
        }

        if cfg!(feature = "admin") && self.settings.admin.listen.is_some() {
            infra_tasks.spawn(count_backlogs(
                self.consumers.clone(),
                consume.clone(),
                infra.clone(),
            ));
        }

        let _watchdog = control::Watchdog::start(
            self.consumers
                .iter()
                .map(|c| (c.queue.clone(), c.poll_slot.clone()))
                .collect(),
        )
        .map_err(|e| warn!(error = %e, "cannot start the watchdog thread; a blocking handler will go unnoticed"))
        .ok();
        let consumers = TaskTracker::new();
        let grace = self.settings.worker.shutdown_grace;
        for (shared, settings) in self.consumers.iter().zip(&self.settings.consumers) {
            let runtime = ConsumerRuntime {
                settings: settings.clone(),
                shared: shared.clone(),
                consume: consume.clone(),
                publish: publish.clone(),
                grace,
                publish_timeout: self.settings.broker.consumer_timeout / 2,
            };
            consumers.spawn(runtime.run(stop.clone()));
        }
        consumers.close();
        info!(
            consumers = self.consumers.len(),
            breakers = self.breakers.len(),
            "worker running"
        );

        let fatal = tokio::select! {
            () = shutdown.cancelled() => None,
            Some(e) = fatal_rx.recv() => Some(e),
        };
        info!(grace = %humantime::format_duration(grace), "shutting down");
        stop.cancel();
        if tokio::time::timeout(grace + CLOSE_MARGIN, consumers.wait())
            .await
            .is_err()
        {
            warn!(
                "consumers did not stop in time; closing the connections anyway (the broker requeues unacked messages)"
            );
        }
        infra.cancel();
        infra_tasks.close();
        infra_tasks.wait().await;
        if let Some(conn) = fleet_conn {
            conn.close().await;
        }
        publish.close().await;
        consume.close().await;
        info!("worker stopped");
        fatal.map_or(Ok(()), Err)
    }

    /// Each breaker's open timer, transition log and health check, and
    /// the failure summaries, until `infra` is cancelled.
    fn spawn_breaker_tasks(&self, tasks: &TaskTracker, infra: &CancellationToken) {
        for breaker in self.breakers.values() {
            tasks.spawn(breaker.clone().run_timer(infra.clone()));
            let guarded: Vec<Arc<ConsumerShared>> = self
                .consumers
                .iter()
                .filter(|c| c.breakers.position(breaker.name()).is_some())
                .cloned()
                .collect();
            tasks.spawn(log_transitions(
                breaker.clone(),
                guarded,
                self.metrics.clone(),
                infra.clone(),
            ));
        }
        for (breaker, check) in &self.health_checks {
            tasks.spawn(
                breaker
                    .clone()
                    .run_erased_health_check(check.clone(), infra.clone()),
            );
        }
        tasks.spawn(flush_failures(
            self.consumers.clone(),
            self.settings.log.failure_summary_every,
            infra.clone(),
        ));
    }

    async fn declare_all(
        &self,
        consume: &ManagedConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let Some((_, connection)) = consume.connection(shutdown).await else {
            return Ok(());
        };
        for shared in &self.consumers {
            // A failed declaration closes its channel: channels of its own.
            shared.topology.declare_on(&connection).await?;
            info!(topology = %shared.topology, "topology ready");
        }
        Ok(())
    }
}

/// Keeps `connections` up, and the OAuth 2 tokens they log in with fresh,
/// from the control runtime (whatever the handlers do) until `infra` is
/// cancelled; a connection that gives up for good is reported on the
/// returned channel.
fn supervise(
    connections: &[&Arc<ManagedConnection>],
    tokens: Option<Arc<TokenSource>>,
    control: &control::Control,
    tasks: &TaskTracker,
    infra: &CancellationToken,
) -> mpsc::Receiver<Error> {
    let (fatal_tx, fatal_rx) = mpsc::channel::<Error>(2);
    for conn in connections {
        let conn = (*conn).clone();
        let token = infra.clone();
        let fatal = fatal_tx.clone();
        tasks.spawn_on(
            async move {
                if let Err(e) = conn.supervise(token).await {
                    let _ = fatal.send(e).await;
                }
            }
            .with_current_subscriber(),
            &control.handle(),
        );
    }
    if let Some(source) = tokens {
        tasks.spawn_on(
            source.run(infra.clone()).with_current_subscriber(),
            &control.handle(),
        );
    }
    fatal_rx
}

/// Raises the open-file limit to its hard limit: the broker connections,
/// the admin endpoint's clients and whatever the handlers open share it, and
/// a low soft limit (often 1,024) should not be what stops a reconnect.
/// How often the work queues' ready messages are counted (for
/// `rabbit_guard_queue_ready` and `rabbit_guard_scalable_backlog`).
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Counts each consumer's ready messages every [`BACKLOG_EVERY`] with a
/// passive declare on the consume connection (a channel of its own, closed
/// at once), until `stop`. A failed count (the connection down, the queue
/// gone) leaves the gauge out rather than stale.
async fn count_backlogs(
    consumers: Vec<Arc<ConsumerShared>>,
    connection: Arc<ManagedConnection>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(BACKLOG_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let current = connection.current();
        for shared in &consumers {
            let ready = match &current {
                Some(conn) => crate::amqp::queue_counts(conn, &shared.queue)
                    .await
                    .map(|(ready, _)| ready)
                    .map_err(|e| debug!(queue = %shared.queue, error = %crate::error::describe(&e), "could not count the queue's ready messages"))
                    .ok(),
                None => None,
            };
            shared.stats.set_queue_ready(ready);
        }
    }
}

fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let before = rlimit::Resource::NOFILE.get().map(|(soft, _)| soft).ok();
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(now) if before.is_some_and(|b| b < now) => {
                info!(
                    from = before.unwrap_or_default(),
                    to = now,
                    "raised the open-file limit to its hard limit"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not raise the open-file limit"),
        }
    }
}

/// Writes the failure summaries on time, even when the failures stop, and
/// what is pending at shutdown.
async fn flush_failures(
    consumers: Vec<Arc<ConsumerShared>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let all = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let now = tokio::time::Instant::now();
        for c in &consumers {
            c.failures.flush(now, all);
        }
        if all {
            return;
        }
    }
}

/// The built-in check of `config.url`.
#[cfg(feature = "http-handler")]
fn http_health_check(config: &HealthCheckConfig) -> Result<Arc<dyn ErasedHealthCheck>, String> {
    crate::breaker::HttpHealthCheck::new(config).map(crate::breaker::erase_health_check)
}

#[cfg(not(feature = "http-handler"))]
fn http_health_check(_: &HealthCheckConfig) -> Result<Arc<dyn ErasedHealthCheck>, String> {
    Err(crate::breaker::NO_HTTP_CLIENT.to_owned())
}

/// Logs each of `breaker`'s transitions, after the failure summaries of
/// the consumers it guards (`guarded`): what failed before a change is told
/// before it, not one summary period later.
async fn log_transitions(
    breaker: Breaker,
    guarded: Vec<Arc<ConsumerShared>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut rx = breaker.transitions();
    loop {
        let t = tokio::select! {
            () = stop.cancelled() => return,
            t = rx.recv() => t,
        };
        match t {
            Ok(t) => {
                let now = tokio::time::Instant::now();
                for c in &guarded {
                    c.failures.flush(now, true);
                }
                metrics.transition(breaker.name(), &t);
                log_transition(breaker.name(), &t, breaker.config().health_check.is_some());
            }
            Err(RecvError::Lagged(n)) => {
                warn!(breaker = %breaker.name(), missed = n, "breaker transitions were not logged");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn log_transition(name: &str, t: &Transition, health_gated: bool) {
    if t.reason == TransitionReason::Fleet {
        // The fleet logs what it took over, with the worker it came from.
        return;
    }
    let open_for = match t.to {
        BreakerState::Open { .. } if health_gated => "until a health check passes".to_owned(),
        BreakerState::Open { until } => humantime::format_duration(Duration::from_millis(
            u64::try_from(until.saturating_duration_since(t.at).as_millis()).unwrap_or(0),
        ))
        .to_string(),
        _ => String::new(),
    };
    let fields = (
        (t.counts.failure_rate() * 1000.0).round() / 1000.0,
        t.counts.calls,
        t.counts.failures,
        t.counts.slow,
        t.consecutive_failures,
    );
    macro_rules! transition {
        ($level:ident, $($extra:tt)*) => {
            $level!(
                breaker = %name,
                from = t.from.name(),
                to = t.to.name(),
                reason = t.reason.name(),
                failure_rate = fields.0,
                calls = fields.1,
                failures = fields.2,
                slow_calls = fields.3,
                consecutive_failures = fields.4,
                $($extra)*
            )
        };
    }
    match (t.reason.opens(), t.local) {
        (true, false) => transition!(warn, open_for = %open_for, "breaker opened"),
        (true, true) => transition!(
            warn,
            open_for = %open_for,
            "breaker opened on this worker only: its own calls fail while the fleet's are healthy (its path to the dependency?); the other workers go on"
        ),
        (false, local) => transition!(info, this_worker_only = local, "breaker state changed"),
    }
}
