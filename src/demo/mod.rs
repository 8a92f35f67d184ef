//! `rabbit-guard demo`: the whole idea in under a minute, against a real
//! broker. It declares throwaway queues, runs a worker with the `http`
//! handler against a built-in flaky dependency, publishes a steady stream,
//! makes the dependency fail for a while and recover, shows what happens
//! live, and ends with a summary. Its queues are removed on exit, Ctrl-C
//! included.

mod flaky;
mod publish;

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::Connection;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::ShortString;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use flaky::FlakyServer;
pub(crate) use publish::steady;

use crate::Worker;
use crate::breaker::{BreakerConfig, BreakerState, Transition, TransitionReason};
use crate::config::{BrokerSettings, ConsumerSettings, HttpSettings, RetrySettings, Settings};
use crate::error::Error;

/// The demo's timeline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeline {
    /// Healthy at first, for this long.
    pub healthy: Duration,
    /// Then failing (503) for this long.
    pub failing: Duration,
    /// Publishing stops this long after the dependency recovers.
    pub publish_after: Duration,
    /// Messages per second.
    pub rate: f64,
    /// Workers on the queue (1 to 8). With more than one they form a fleet
    /// (`[fleet]`): one trip pauses them all, one of them probes.
    pub workers: usize,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            healthy: Duration::from_secs(6),
            failing: Duration::from_secs(12),
            publish_after: Duration::from_secs(6),
            rate: 40.0,
            workers: 1,
        }
    }
}

/// The most workers the demo runs.
pub(crate) const MAX_DEMO_WORKERS: usize = 8;

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// Messages published (and confirmed).
    pub published: u64,
    /// Distinct messages the dependency accepted.
    pub processed: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Calls that failed before consumption paused.
    pub failing_before_pause: u64,
    /// The breaker's trip rule (`minimum_calls` or `consecutive_failures`).
    pub trip_after: u64,
    /// How long consumption was paused or probing.
    pub paused_for: Duration,
    /// Half-open trials.
    pub probes: u64,
    /// Most messages waiting in the queue at once.
    pub peak_depth: u32,
    /// Calls to the dependency while the breaker was open (must be 0).
    pub calls_while_open: u64,
    /// Cut short by Ctrl-C.
    pub interrupted: bool,
    /// How long it ran.
    pub ran_for: Duration,
}

impl Report {
    /// Published messages neither processed nor dead-lettered.
    #[must_use]
    pub(crate) fn lost(&self) -> u64 {
        self.published
            .saturating_sub(self.processed + self.dead_lettered)
    }

    /// The closing paragraph.
    #[must_use]
    pub(crate) fn summary(&self, timeline: &Timeline) -> String {
        let mut s = String::new();
        if self.interrupted {
            let _ = write!(
                s,
                "Interrupted after {:.1}s. Of {} messages published, {} were processed and {} \
                 dead-lettered; {} were still queued when the demo removed its queues.",
                self.ran_for.as_secs_f64(),
                self.published,
                self.processed,
                self.dead_lettered,
                self.lost()
            );
            return s;
        }
        if timeline.workers > 1 {
            let _ = write!(
                s,
                "{} workers formed a fleet: the first trip opened every worker's breaker, \
                 and one worker at a time probed. ",
                timeline.workers
            );
        }
        let _ = write!(
            s,
            "The dependency failed for {}. The breaker opened after {} failing calls \
             ({} to trip it{}), and consumption stopped at the broker: \
             no consumer on the queue and {} calls to the dependency while open, while up to {} \
             messages waited in the queue. It stayed paused or probing for {} ({} half-open \
             trial{}), then resumed at full speed. Of {} messages published, {} were processed, \
             {} dead-lettered and {} lost.",
            humantime::format_duration(timeline.failing),
            self.failing_before_pause,
            self.trip_after,
            match self.failing_before_pause.saturating_sub(self.trip_after) {
                0 => String::new(),
                n => format!(", {n} more already in flight"),
            },
            self.calls_while_open,
            self.peak_depth,
            humantime::format_duration(Duration::from_millis(
                u64::try_from(self.paused_for.as_millis()).unwrap_or(0) / 100 * 100
            )),
            self.probes,
            if self.probes == 1 { "" } else { "s" },
            self.published,
            self.processed,
            self.dead_lettered,
            self.lost()
        );
        s
    }
}

fn demo_settings(broker: &BrokerSettings, prefix: &str, url: String, fleet: bool) -> Settings {
    let mut s = Settings {
        broker: broker.clone(),
        ..Settings::default()
    };
    if fleet {
        s.fleet.exchange = Some(format!("{prefix}.fleet"));
    }
    s.broker.connection_name = prefix.to_owned();
    s.broker.startup_timeout = Duration::from_secs(10);
    s.worker.shutdown_grace = Duration::from_secs(5);
    s.breakers.insert(
        "demo-api".into(),
        BreakerConfig {
            failure_rate: 0.5,
            minimum_calls: 10,
            window: Duration::from_secs(10),
            call_timeout: Duration::from_secs(2),
            open_timeout: Duration::from_secs(2),
            max_open_timeout: Duration::from_secs(5),
            half_open_probes: 1,
            consecutive_failures: Some(10),
            ..BreakerConfig::default()
        },
    );
    s.consumers.push(ConsumerSettings {
        queue: format!("{prefix}.orders"),
        breaker: "demo-api".into(),
        handler: "http".into(),
        prefetch: 20,
        concurrency: 4,
        retry: RetrySettings {
            delays: vec![Duration::from_secs(1), Duration::from_secs(3)],
            ..RetrySettings::default()
        },
        http: Some(HttpSettings::to(url)),
        ..ConsumerSettings::default()
    });
    s
}

async fn queue_counts(connection: &Connection, queue: &str) -> Option<(u32, u32)> {
    crate::amqp::queue_counts(connection, queue).await.ok()
}

async fn cleanup(
    connection: &Connection,
    consumer: &ConsumerSettings,
    fleet: Option<&str>,
) -> Result<(), Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::broker("opening a channel to clean up", e))?;
    let mut queues = vec![consumer.queue.clone(), consumer.dead_letter_queue()];
    queues.extend(
        consumer
            .retry
            .delays
            .iter()
            .map(|d| consumer.delay_queue(*d)),
    );
    for q in queues {
        channel
            .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
            .await
            .map_err(|e| Error::broker(format!("deleting demo queue {q}"), e))?;
    }
    channel
        .exchange_delete(
            ShortString::from(consumer.dead_letter_exchange().as_str()),
            ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(|e| Error::broker("deleting the demo exchange", e))?;
    if let Some(fleet) = fleet {
        channel
            .exchange_delete(ShortString::from(fleet), ExchangeDeleteOptions::default())
            .await
            .map_err(|e| Error::broker("deleting the demo's fleet exchange", e))?;
    }
    let _ = channel.close(200, "cleaned up".into()).await;
    Ok(())
}

/// One line (or screen) of the live view.
struct Frame<'a> {
    elapsed: Duration,
    failing: bool,
    /// Each worker's breaker (one unless a fleet).
    states: Vec<BreakerState>,
    since: Duration,
    ok_per_s: u64,
    failed_per_s: u64,
    depth: u32,
    consumers: u32,
    in_flight: i64,
    published: u64,
    processed: u64,
    dead: u64,
    history: &'a [String],
}

fn render(f: &Frame<'_>, live: bool) -> String {
    let dependency = if f.failing {
        "FAILING (503)"
    } else {
        "healthy (200)"
    };
    let name = |state: &BreakerState| match state {
        BreakerState::Open { until } if f.states.len() == 1 => format!(
            "OPEN, probe in {:.1}s",
            until
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
        ),
        other => other.name().to_uppercase(),
    };
    let breaker = f.states.iter().map(name).collect::<Vec<_>>().join(" | ");
    if !live {
        return format!(
            "{:>5.1}s dependency {dependency:<13} breaker {breaker:<22} calls/s ok {:>3} failed {:>3}  queue {:>4}  consumers {}  dead letters {}",
            f.elapsed.as_secs_f64(),
            f.ok_per_s,
            f.failed_per_s,
            f.depth,
            f.consumers,
            f.dead
        );
    }
    let mut s = String::from("\x1b[H\x1b[2J");
    let _ = writeln!(
        s,
        "rabbit-guard demo  {:>5.1}s   (Ctrl-C stops it and cleans up)\n",
        f.elapsed.as_secs_f64()
    );
    let _ = writeln!(s, "  dependency        {dependency}");
    let _ = writeln!(
        s,
        "  breaker           {breaker} (for {:.1}s)",
        f.since.as_secs_f64()
    );
    let _ = writeln!(s, "  consumers at the broker  {}", f.consumers);
    let _ = writeln!(
        s,
        "  calls per second  ok {:>4}   failed {:>4}",
        f.ok_per_s, f.failed_per_s
    );
    let _ = writeln!(
        s,
        "  queue depth       {:>4}   in flight {}",
        f.depth, f.in_flight
    );
    let _ = writeln!(
        s,
        "  published         {:>5}   processed {:>5}   dead letters {}",
        f.published, f.processed, f.dead
    );
    for (i, history) in f.history.iter().enumerate() {
        let label = if f.history.len() == 1 {
            "breaker over time:".to_owned()
        } else {
            format!("worker {} breaker:", i + 1)
        };
        let _ = writeln!(
            s,
            "{}  {label:<18} {history}",
            if i == 0 { "\n" } else { "" }
        );
    }
    let _ = writeln!(s, "                     C closed  O open  H half-open");
    s
}

/// Runs the demo against `broker` and returns what happened. `live` draws a
/// refreshing screen (a terminal); otherwise a plain line per second.
///
/// # Errors
///
/// Broker errors (unreachable, refused login), with the queues cleaned up.
pub(crate) async fn run(
    broker: &BrokerSettings,
    timeline: Timeline,
    live: bool,
    stop: CancellationToken,
    mut out: impl Write,
) -> Result<Report, Error> {
    let flaky = FlakyServer::start("127.0.0.1:0", true).await?;
    let prefix = format!("rabbit-guard-demo.{}", std::process::id());
    let workers = timeline.workers.clamp(1, MAX_DEMO_WORKERS);
    let url = format!("http://{}/orders", flaky.addr());
    let settings = demo_settings(broker, &prefix, url, workers > 1);
    let consumer = settings.consumers[0].clone();
    let connection = crate::amqp::connection::connect_once(&settings.broker, "demo").await?;
    let members = start_workers(&settings, workers, &prefix)?;
    let mut transitions_rx: Vec<_> = members.iter().map(|m| m.breaker.transitions()).collect();

    let started = Instant::now();
    let published = Arc::new(AtomicU64::new(0));
    let publish_stop = CancellationToken::new();
    // Wait for the workers to declare the queue before publishing.
    let mut ready = queue_declared(&connection, &consumer.queue, &members).await;
    let publisher = spawn_publisher(
        broker,
        consumer.queue.clone(),
        timeline.rate,
        published.clone(),
        publish_stop.clone(),
    )
    .await?;

    let mut transitions: Vec<Vec<Transition>> = vec![Vec::new(); workers];
    let mut screen = Screen::new(started, live, workers);
    let mut report = Report {
        trip_after: 10,
        ..Report::default()
    };
    let tick = if live {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(1)
    };
    let fail_at = started + timeline.healthy;
    let recover_at = fail_at + timeline.failing;
    let stop_publishing_at = recover_at + timeline.publish_after;
    let deadline = stop_publishing_at + Duration::from_secs(25);
    let any_stopped = |members: &[Member]| members.iter().any(|m| m.task.is_finished());
    while ready {
        let now = Instant::now();
        ready = !any_stopped(&members);
        flaky.set_failing(now >= fail_at && now < recover_at);
        if now >= stop_publishing_at {
            publish_stop.cancel();
        }
        for (rx, seen) in transitions_rx.iter_mut().zip(&mut transitions) {
            while let Ok(t) = rx.try_recv() {
                seen.push(t);
            }
        }
        let s = total(&members);
        let (depth, consumers) = queue_counts(&connection, &consumer.queue)
            .await
            .unwrap_or((0, 0));
        report.peak_depth = report.peak_depth.max(depth);
        let processed = distinct_ok(&flaky);
        let frame = screen.frame(
            now,
            &flaky,
            &members,
            (depth, consumers),
            &s,
            published.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "{frame}");
        let _ = out.flush();
        let done = publish_stop.is_cancelled()
            && publisher.is_finished()
            && processed + s.dead_lettered >= published.load(Ordering::Relaxed);
        if done || now >= deadline || any_stopped(&members) {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => {
                report.interrupted = true;
                break;
            }
            () = tokio::time::sleep(tick) => {}
        }
    }
    publish_stop.cancel();
    let published_result = publisher.await;
    let (worker_result, dead_lettered) =
        stop_workers(members, &mut transitions_rx, &mut transitions).await;
    let cleaned = cleanup(&connection, &consumer, settings.fleet.exchange.as_deref()).await;
    let _ = connection.close(200, "demo done".into()).await;
    worker_result?;
    if let Ok(Err(e)) = published_result {
        return Err(e);
    }
    cleaned?;

    tally(&mut report, &transitions, &flaky.calls());
    report.ran_for = started.elapsed();
    report.published = published.load(Ordering::Relaxed);
    report.processed = distinct_ok(&flaky);
    report.dead_lettered = dead_lettered;
    Ok(report)
}

/// The demo's workers: one, or a fleet of `workers`.
fn start_workers(settings: &Settings, workers: usize, prefix: &str) -> Result<Vec<Member>, Error> {
    let queue = &settings.consumers[0].queue;
    let mut members = Vec::new();
    for i in 1..=workers {
        let mut s = settings.clone();
        if workers > 1 {
            s.fleet.worker_id = Some(format!("demo-{i}"));
            s.broker.connection_name = format!("{prefix}.w{i}");
        }
        members.push(start_worker(s, queue)?);
    }
    Ok(members)
}

/// Stops the workers; collects their last transitions, the first error
/// and the messages they dead-lettered.
async fn stop_workers(
    members: Vec<Member>,
    transitions_rx: &mut [tokio::sync::broadcast::Receiver<Transition>],
    transitions: &mut [Vec<Transition>],
) -> (Result<(), Error>, u64) {
    for m in &members {
        m.stop.cancel();
    }
    let mut result = Ok(());
    let mut dead_lettered = 0;
    for (i, m) in members.into_iter().enumerate() {
        dead_lettered += m.stats.snapshot().dead_lettered;
        if let Ok(Err(e)) = m.task.await {
            result = result.and(Err(e));
        }
        while let Ok(t) = transitions_rx[i].try_recv() {
            transitions[i].push(t);
        }
    }
    (result, dead_lettered)
}

/// One of the demo's workers, running.
struct Member {
    breaker: crate::breaker::Breaker,
    stats: Arc<crate::consumer::ConsumerStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// The workers' counts added up.
fn total(members: &[Member]) -> crate::consumer::StatsSnapshot {
    let mut all = crate::consumer::StatsSnapshot::default();
    for m in members {
        let s = m.stats.snapshot();
        all.in_flight += s.in_flight;
        all.dead_lettered += s.dead_lettered;
    }
    all
}

/// What the screen remembers between frames: the state history and the
/// counts the rates are taken from.
struct Screen {
    started: Instant,
    live: bool,
    /// Each worker's breaker, one letter a second.
    history: Vec<String>,
    next_history: Instant,
    last_counts: (u64, u64),
    last_tick: Instant,
}

impl Screen {
    fn new(started: Instant, live: bool, workers: usize) -> Self {
        Self {
            started,
            live,
            history: vec![String::new(); workers],
            next_history: started,
            last_counts: (0, 0),
            last_tick: started,
        }
    }

    /// The frame for `now`.
    fn frame(
        &mut self,
        now: Instant,
        flaky: &FlakyServer,
        members: &[Member],
        (depth, consumers): (u32, u32),
        stats: &crate::consumer::StatsSnapshot,
        published: u64,
    ) -> String {
        let counts = flaky.counts();
        let secs = now.duration_since(self.last_tick).as_secs_f64().max(0.001);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs).round() as u64;
        let snapshots: Vec<_> = members.iter().map(|m| m.breaker.snapshot()).collect();
        if now >= self.next_history {
            for (history, snapshot) in self.history.iter_mut().zip(&snapshots) {
                history.push(match snapshot.state {
                    BreakerState::Closed | BreakerState::Disabled => 'C',
                    BreakerState::Open { .. } | BreakerState::ForcedOpen => 'O',
                    BreakerState::HalfOpen { .. } => 'H',
                });
            }
            self.next_history += Duration::from_secs(1);
        }
        let since = snapshots.iter().map(|s| s.since).max().unwrap_or(now);
        let frame = Frame {
            elapsed: now - self.started,
            failing: flaky.failing(),
            states: snapshots.iter().map(|s| s.state).collect(),
            since: now.saturating_duration_since(since),
            ok_per_s: rate(counts.0, self.last_counts.0),
            failed_per_s: rate(counts.1, self.last_counts.1),
            depth,
            consumers,
            in_flight: stats.in_flight,
            published,
            processed: distinct_ok(flaky),
            dead: stats.dead_lettered,
            history: &self.history,
        };
        let text = render(&frame, self.live);
        self.last_counts = counts;
        self.last_tick = now;
        text
    }
}

/// One demo worker, started.
fn start_worker(settings: Settings, queue: &str) -> Result<Member, Error> {
    let worker = Worker::builder(settings).build()?;
    let breaker = worker.breaker("demo-api").ok_or_else(|| Error::Io {
        context: "the demo's breaker is missing".into(),
        source: std::io::Error::other("internal"),
    })?;
    let stats = worker.stats(queue).unwrap_or_default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run_until(stop.clone()));
    Ok(Member {
        breaker,
        stats,
        stop,
        task,
    })
}

/// True once the worker has declared `queue` (or has stopped trying).
async fn queue_declared(connection: &lapin::Connection, queue: &str, members: &[Member]) -> bool {
    for _ in 0..200 {
        if queue_counts(connection, queue).await.is_some()
            || members.iter().any(|m| m.task.is_finished())
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The steady publisher on a connection of its own, counting confirms.
async fn spawn_publisher(
    broker: &BrokerSettings,
    queue: String,
    rate: f64,
    published: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<u64, Error>>, Error> {
    let connection = crate::amqp::connection::connect_once(broker, "demo").await?;
    Ok(tokio::spawn(async move {
        let r = steady(&connection, &queue, "demo", rate, None, stop, |n| {
            published.store(n, Ordering::Relaxed);
        })
        .await;
        let _ = connection.close(200, "done".into()).await;
        r
    }))
}

/// What the breakers' transitions (one list per worker) and the
/// dependency's calls say: failing calls before the pause, trials, how long
/// it paused, calls while every worker was open.
fn tally(report: &mut Report, transitions: &[Vec<Transition>], calls: &[flaky::Call]) {
    let all = || transitions.iter().flatten();
    let first_probe = all()
        .filter(|t| matches!(t.to, BreakerState::HalfOpen { .. }))
        .map(|t| t.at)
        .min();
    report.failing_before_pause = calls
        .iter()
        .filter(|c| c.status == 503 && first_probe.is_none_or(|p| c.at < p))
        .count() as u64;
    report.probes = all()
        .filter(|t| {
            matches!(
                t.reason,
                TransitionReason::OpenTimeElapsed | TransitionReason::HealthCheckPassed
            )
        })
        .count() as u64;
    let opened = all()
        .filter(|t| matches!(t.to, BreakerState::Open { .. }))
        .map(|t| t.at)
        .min();
    let closed = all()
        .filter(|t| t.reason == TransitionReason::ProbesSucceeded)
        .map(|t| t.at)
        .max();
    if let (Some(o), Some(c)) = (opened, closed) {
        report.paused_for = c.saturating_duration_since(o);
    }
    // Calls that arrived while every worker was open (after the in-flight
    // ones landed): there must be none.
    let slack = Duration::from_millis(200);
    report.calls_while_open = calls
        .iter()
        .filter(|c| {
            transitions.iter().all(|list| {
                let open_at = |at: Instant| {
                    list.iter()
                        .rev()
                        .find(|t| t.at <= at)
                        .is_some_and(|t| matches!(t.to, BreakerState::Open { .. }))
                };
                c.at.checked_sub(slack).is_some_and(open_at) && open_at(c.at)
            })
        })
        .count() as u64;
}

fn distinct_ok(flaky: &FlakyServer) -> u64 {
    flaky.distinct_accepted()
}
