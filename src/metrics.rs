//! Prometheus metrics. Counters live in the runtime's own atomics
//! ([`ConsumerStats`], breaker and connection counters) and are copied into
//! the exporter when `/metrics` is scraped, so the message path never counts
//! twice. Handler durations go to a histogram recorded per message.

use std::sync::Arc;

use metrics::{Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::amqp::connection::ManagedConnection;
use crate::breaker::{Breaker, Transition};
use crate::consumer::{ConsumerShared, ConsumerStats, HANDLER_OUTCOMES};

const META: Metadata<'static> = Metadata::new("rabbit_guard", Level::INFO, Some(module_path!()));

/// Handler duration buckets, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const STATES: &[&str] = &["closed", "open", "half-open", "forced-open", "disabled"];

/// One worker's metrics (not the process-global recorder, so several
/// workers in one process keep theirs apart).
#[derive(Clone)]
pub(crate) struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    process: Arc<metrics_process::Collector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The worker's recorder, as the process-wide one.
struct Global(Arc<PrometheusRecorder>);

impl Recorder for Global {
    fn describe_counter(&self, key: metrics::KeyName, unit: Option<Unit>, d: SharedString) {
        self.0.describe_counter(key, unit, d);
    }
    fn describe_gauge(&self, key: metrics::KeyName, unit: Option<Unit>, d: SharedString) {
        self.0.describe_gauge(key, unit, d);
    }
    fn describe_histogram(&self, key: metrics::KeyName, unit: Option<Unit>, d: SharedString) {
        self.0.describe_histogram(key, unit, d);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Counter {
        self.0.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Gauge {
        self.0.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Histogram {
        self.0.register_histogram(key, metadata)
    }
}

/// The exposition text in a stable order: families sorted by name, and
/// the samples of counters and gauges by their labels (the exporter writes
/// them from hash maps). Histogram samples keep their bucket order.
fn stable_order(text: &str) -> String {
    let mut families: Vec<(String, Vec<&str>)> = text
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let lines: Vec<&str> = block.lines().filter(|l| !l.is_empty()).collect();
            let name = lines
                .iter()
                .find_map(|l| l.strip_prefix("# TYPE "))
                .or_else(|| lines.first().copied())
                .unwrap_or("")
                .to_owned();
            (name, lines)
        })
        .collect();
    families.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::with_capacity(text.len());
    for (name, lines) in families {
        let (mut head, mut samples): (Vec<&str>, Vec<&str>) =
            lines.into_iter().partition(|l| l.starts_with('#'));
        head.sort_by_key(|l| !l.starts_with("# HELP"));
        if !name.ends_with(" histogram") && !name.ends_with(" summary") {
            samples.sort_unstable();
        }
        for l in head.into_iter().chain(samples) {
            out.push_str(l);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, (*v).to_owned()))
            .collect::<Vec<_>>(),
    )
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("rabbit_guard_handler_duration_seconds".into()),
                DURATION_BUCKETS,
            )
            .map_or_else(
                |_| PrometheusBuilder::new().build_recorder(),
                PrometheusBuilder::build_recorder,
            );
        let handle = recorder.handle();
        let m = Self {
            recorder: Arc::new(recorder),
            handle,
            process: Arc::new(metrics_process::Collector::default()),
        };
        m.describe();
        metrics::with_local_recorder(&*m.recorder, || m.process.describe());
        m.install_global();
        m
    }

    /// Makes this worker's registry the process's global recorder, so that
    /// `metrics::counter!` in handler code shows on `/metrics` too. Only one
    /// can be: the first worker of a process installs it, and a recorder the
    /// application installed itself is left alone.
    fn install_global(&self) {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            if metrics::set_global_recorder(Global(self.recorder.clone())).is_err() {
                tracing::debug!(
                    "a metrics recorder is installed already: metrics from handler code go there, not to /metrics"
                );
            }
        });
    }

    #[allow(clippy::too_many_lines)] // one description per metric
    fn describe(&self) {
        let r = &self.recorder;
        let c = |name: &'static str, help: &'static str| {
            r.describe_counter(name.into(), None, SharedString::const_str(help));
        };
        let g = |name: &'static str, help: &'static str| {
            r.describe_gauge(name.into(), None, SharedString::const_str(help));
        };
        g(
            "rabbit_guard_breaker_state",
            "1 for the state each breaker is in, 0 for the others",
        );
        g(
            "rabbit_guard_fleet_joined",
            "1 while the worker follows its fleet ([fleet]), 0 while it guards on its own",
        );
        g(
            "rabbit_guard_fleet_problems",
            "Problems with the fleet now (fleet.lease, fleet.epoch, fleet.announce, fleet.untrusted, fleet.deaf, fleet.unheard): see /readyz",
        );
        c(
            "rabbit_guard_fleet_messages_total",
            "Fleet messages sent, received from other workers, ignored (stale, duplicate, malformed) and refused (not from a fleet member)",
        );
        c(
            "rabbit_guard_breaker_transitions_total",
            "Breaker state changes, by from, to and reason",
        );
        c(
            "rabbit_guard_breaker_calls_total",
            "Calls through each breaker by outcome: success, failure, timeout (each call once), rejected (refused while open or probing)",
        );
        c(
            "rabbit_guard_breaker_slow_calls_total",
            "Calls slower than slow_call_duration, whatever their outcome",
        );
        g(
            "rabbit_guard_breaker_failure_ratio",
            "Failures / calls in the breaker's window now",
        );
        c(
            "rabbit_guard_breaker_health_checks_total",
            "Health checks run while each breaker was open, by result: pass, fail",
        );
        g(
            "rabbit_guard_build_info",
            "1, labelled with the version of rabbit-guard running",
        );
        g(
            "rabbit_guard_breaker_window_calls",
            "Calls in the breaker's window now",
        );
        c(
            "rabbit_guard_messages_received_total",
            "Deliveries received from the broker",
        );
        c(
            "rabbit_guard_messages_redelivered_total",
            "Deliveries the broker marked redelivered",
        );
        c(
            "rabbit_guard_messages_acked_total",
            "Messages handled successfully and acked",
        );
        c(
            "rabbit_guard_messages_failed_total",
            "Transient handler failures, timeouts included",
        );
        c(
            "rabbit_guard_messages_requeued_total",
            "Messages returned to the queue unstarted",
        );
        c(
            "rabbit_guard_messages_delayed_total",
            "Copies to a delay queue, by delay level",
        );
        c(
            "rabbit_guard_messages_deferred_total",
            "Messages put back without counting an attempt (the dependency's fault)",
        );
        c(
            "rabbit_guard_messages_dead_lettered_total",
            "Messages copied to the dead-letter queue, by reason",
        );
        c(
            "rabbit_guard_settles_dropped_total",
            "Settles not sent because their channel was gone (the broker requeued the message)",
        );
        c(
            "rabbit_guard_copy_failures_total",
            "Copy attempts the broker did not store (each is retried with backoff)",
        );
        g(
            "rabbit_guard_copies_waiting",
            "Messages whose copy is being retried, their originals unacked",
        );
        g("rabbit_guard_messages_in_flight", "Handlers running now");
        g(
            "rabbit_guard_consumer_subscribed",
            "1 while the queue has this worker's consumer at the broker",
        );
        g(
            "rabbit_guard_queue_ready",
            "Ready messages in the work queue, as the broker last counted them (every 5s)",
        );
        g(
            "rabbit_guard_scalable_backlog",
            "Ready messages while every breaker of the queue's consumer is closed (or disabled), 0 while any is open, half-open or forced open: what an autoscaler should see",
        );
        g(
            "rabbit_guard_concurrency_limit",
            "Handlers the consumer may run now: concurrency while closed, the probes while half-open, 0 while open",
        );
        g(
            "rabbit_guard_ready",
            "1 while the worker is ready (as /readyz says), else 0",
        );
        r.describe_histogram(
            "rabbit_guard_handler_duration_seconds".into(),
            Some(Unit::Seconds),
            SharedString::const_str("Handler call duration, by outcome: success, transient, timeout, permanent, decode, panic"),
        );
        g(
            "rabbit_guard_connection_up",
            "1 while the connection is open",
        );
        g(
            "rabbit_guard_connection_blocked",
            "1 while the broker blocks the connection (resource alarm)",
        );
        c("rabbit_guard_reconnects_total", "Successful reconnections");
    }

    /// The handler-duration histograms of `queue`, one per outcome (in
    /// [`HANDLER_OUTCOMES`] order).
    pub(crate) fn handler_histograms(&self, queue: &str) -> Vec<metrics::Histogram> {
        HANDLER_OUTCOMES
            .iter()
            .map(|outcome| {
                self.recorder.register_histogram(
                    &key(
                        "rabbit_guard_handler_duration_seconds",
                        &[("queue", queue), ("outcome", outcome)],
                    ),
                    &META,
                )
            })
            .collect()
    }

    /// Folds recorded durations into their histograms every `every`, forever.
    pub(crate) async fn run_upkeep_every(&self, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.handle.run_upkeep();
        }
    }

    /// Counts one breaker transition.
    pub(crate) fn transition(&self, breaker: &str, t: &Transition) {
        self.recorder
            .register_counter(
                &key(
                    "rabbit_guard_breaker_transitions_total",
                    &[
                        ("breaker", breaker),
                        ("from", t.from.name()),
                        ("to", t.to.name()),
                        ("reason", t.reason.name()),
                    ],
                ),
                &META,
            )
            .increment(1);
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)], value: u64) {
        self.recorder
            .register_counter(&key(name, labels), &META)
            .absolute(value);
    }

    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        self.recorder
            .register_gauge(&key(name, labels), &META)
            .set(value);
    }

    /// The exposition text, with every counter and gauge brought up to date.
    pub(crate) fn render(
        &self,
        ready: bool,
        breakers: &[(&str, &Breaker)],
        consumers: &[Arc<ConsumerShared>],
        connections: &[Arc<ManagedConnection>],
        fleet: Option<&crate::status::FleetView>,
    ) -> String {
        self.gauge("rabbit_guard_ready", &[], f64::from(u8::from(ready)));
        if let Some(f) = fleet {
            self.gauge(
                "rabbit_guard_fleet_joined",
                &[],
                f64::from(u8::from(f.state == "joined")),
            );
            self.gauge(
                "rabbit_guard_fleet_problems",
                &[],
                f64::from(u32::try_from(f.problems.len()).unwrap_or(u32::MAX)),
            );
            for (direction, n) in [
                ("sent", f.sent),
                ("received", f.received),
                ("ignored", f.ignored),
                ("refused", f.refused),
            ] {
                self.counter(
                    "rabbit_guard_fleet_messages_total",
                    &[("direction", direction)],
                    n,
                );
            }
        }
        for (name, breaker) in breakers {
            self.breaker(name, breaker);
        }
        for shared in consumers {
            self.consumer(&shared.queue, &shared.stats, shared);
        }
        for c in connections {
            let role = c.role();
            self.gauge(
                "rabbit_guard_connection_up",
                &[("connection", role)],
                f64::from(u8::from(c.is_up())),
            );
            self.gauge(
                "rabbit_guard_connection_blocked",
                &[("connection", role)],
                f64::from(u8::from(c.is_blocked())),
            );
            self.counter(
                "rabbit_guard_reconnects_total",
                &[("connection", role)],
                c.reconnects(),
            );
        }
        self.gauge(
            "rabbit_guard_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        // Process metrics (CPU seconds, RSS, open fds, threads), into this
        // worker's registry.
        metrics::with_local_recorder(&*self.recorder, || self.process.collect());
        self.handle.run_upkeep();
        stable_order(&self.handle.render())
    }

    #[allow(clippy::cast_precision_loss)]
    fn breaker(&self, name: &str, breaker: &Breaker) {
        let snapshot = breaker.snapshot();
        let current = snapshot.state.name();
        for state in STATES {
            self.gauge(
                "rabbit_guard_breaker_state",
                &[("breaker", name), ("state", state)],
                f64::from(u8::from(*state == current)),
            );
        }
        let counts = breaker.call_counts();
        let (success, failure, slow, rejected) = (
            counts.successes,
            counts.failures,
            counts.slow,
            counts.rejected,
        );
        let timeout = breaker.timeouts();
        // The breaker counts a timeout as a failure: count it once, as a timeout.
        for (outcome, n) in [
            ("success", success),
            ("failure", failure.saturating_sub(timeout)),
            ("timeout", timeout),
            ("rejected", rejected),
        ] {
            self.counter(
                "rabbit_guard_breaker_calls_total",
                &[("breaker", name), ("outcome", outcome)],
                n,
            );
        }
        self.counter(
            "rabbit_guard_breaker_slow_calls_total",
            &[("breaker", name)],
            slow,
        );
        self.gauge(
            "rabbit_guard_breaker_failure_ratio",
            &[("breaker", name)],
            snapshot.counts.failure_rate(),
        );
        self.gauge(
            "rabbit_guard_breaker_window_calls",
            &[("breaker", name)],
            snapshot.counts.calls as f64,
        );
        if let Some(health) = &snapshot.health {
            for (result, n) in [
                ("pass", health.passes),
                ("fail", health.checks - health.passes),
            ] {
                self.counter(
                    "rabbit_guard_breaker_health_checks_total",
                    &[("breaker", name), ("result", result)],
                    n,
                );
            }
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn consumer(&self, queue: &str, stats: &ConsumerStats, shared: &ConsumerShared) {
        let s = stats.snapshot();
        let q = [("queue", queue)];
        self.counter("rabbit_guard_messages_received_total", &q, s.received);
        self.counter("rabbit_guard_messages_redelivered_total", &q, s.redelivered);
        self.counter("rabbit_guard_messages_acked_total", &q, s.succeeded);
        self.counter("rabbit_guard_messages_failed_total", &q, s.failed);
        self.counter(
            "rabbit_guard_immediate_retries_total",
            &q,
            s.immediate_retries,
        );
        self.counter("rabbit_guard_messages_requeued_total", &q, s.requeued);
        self.counter("rabbit_guard_messages_deferred_total", &q, s.deferred);
        self.counter("rabbit_guard_settles_dropped_total", &q, s.stale);
        self.counter("rabbit_guard_copy_failures_total", &q, s.publish_failures);
        for ((delay, _), n) in shared
            .topology
            .delay_queues
            .iter()
            .zip(stats.delayed_by_level())
        {
            let level = crate::config::compact_duration(*delay);
            self.counter(
                "rabbit_guard_messages_delayed_total",
                &[("queue", queue), ("level", &level)],
                n,
            );
        }
        for (reason, n) in stats.dead_lettered_by_reason() {
            self.counter(
                "rabbit_guard_messages_dead_lettered_total",
                &[("queue", queue), ("reason", reason)],
                n,
            );
        }
        self.gauge("rabbit_guard_messages_in_flight", &q, s.in_flight as f64);
        self.gauge("rabbit_guard_copies_waiting", &q, s.copies_waiting as f64);
        self.gauge(
            "rabbit_guard_consumer_subscribed",
            &q,
            f64::from(u8::from(s.subscribed)),
        );
        // What scaling should see: the backlog this consumer can work off
        // now (none while a breaker holds it), and how much at once.
        let admits_all = shared.breakers.admits_all_now();
        if let Some(ready) = stats.queue_ready() {
            self.gauge("rabbit_guard_queue_ready", &q, ready as f64);
            self.gauge(
                "rabbit_guard_scalable_backlog",
                &q,
                if admits_all { ready as f64 } else { 0.0 },
            );
        }
        let limit = if admits_all {
            usize::from(shared.concurrency)
        } else {
            shared
                .breakers
                .probes_per_trial()
                .min(usize::from(shared.concurrency))
        };
        self.gauge("rabbit_guard_concurrency_limit", &q, limit as f64);
    }
}
