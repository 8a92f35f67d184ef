//! What the admin endpoint sees of a running worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::amqp::connection::ManagedConnection;
use crate::breaker::{Breaker, BreakerState};
use crate::consumer::ConsumerShared;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::status::{
    BreakerView, ChangeView, ConnectionView, ConsumerView, HealthCheckView, StatusView, WindowView,
};

/// A cheap, cloneable view of the worker's breakers, consumers and connections.
#[derive(Clone, Debug)]
pub(crate) struct WorkerView(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    breakers: BTreeMap<String, Breaker>,
    consumers: Vec<Arc<ConsumerShared>>,
    connections: Vec<Arc<ManagedConnection>>,
    metrics: Metrics,
    /// The fleet and its connection, when `fleet.exchange` is set. Not in
    /// the readiness: without the fleet the worker guards on its own.
    fleet: Option<(Fleet, Arc<ManagedConnection>)>,
}

/// An instant of tokio's clock as wall-clock time, RFC 3339.
fn wall(at: Instant) -> String {
    let now = Instant::now();
    let system = if at <= now {
        SystemTime::now() - (now - at)
    } else {
        SystemTime::now() + (at - now)
    };
    humantime::format_rfc3339_millis(system).to_string()
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl WorkerView {
    pub(crate) fn new(
        breakers: BTreeMap<String, Breaker>,
        consumers: Vec<Arc<ConsumerShared>>,
        connections: Vec<Arc<ManagedConnection>>,
        metrics: Metrics,
        fleet: Option<(Fleet, Arc<ManagedConnection>)>,
    ) -> Self {
        Self(Arc::new(Inner {
            breakers,
            consumers,
            connections,
            metrics,
            fleet,
        }))
    }

    /// The fleet, when `fleet.exchange` is set.
    pub(crate) fn fleet(&self) -> Option<&Fleet> {
        self.0.fleet.as_ref().map(|(f, _)| f)
    }

    pub(crate) fn breaker(&self, name: &str) -> Option<&Breaker> {
        self.0.breakers.get(name)
    }

    pub(crate) fn render_metrics(&self) -> String {
        let breakers: Vec<(&str, &Breaker)> = self
            .0
            .breakers
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let mut connections = self.0.connections.clone();
        connections.extend(self.0.fleet.as_ref().map(|(_, c)| c.clone()));
        let fleet = self.fleet().map(Fleet::view);
        self.0.metrics.render(
            self.problems().is_empty(),
            &breakers,
            &self.0.consumers,
            &connections,
            fleet.as_ref(),
        )
    }

    /// Why the worker is not ready, if it is not: a connection down, a
    /// consumer without a channel, copies the broker will not store. A
    /// consumer paused by its breaker is ready.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &self.0.connections {
            if !c.is_up() {
                problems.push(format!("connection {} is down", c.name()));
            }
        }
        for s in &self.0.consumers {
            if !s.stats.session_active() {
                problems.push(format!("consumer of {} has no channel", s.queue));
            }
            if let Some(why) = s.stats.copy_trouble() {
                problems.push(format!(
                    "consumer of {}: {why}; {} message(s) wait unacked while it retries",
                    s.queue,
                    s.stats.snapshot().copies_waiting
                ));
            }
        }
        problems
    }

    /// Ready when there are no [`problems`](Self::problems); with the nodes
    /// connected to, the consumers paused by their breakers and the fleet.
    pub(crate) fn readiness(&self) -> (bool, Value) {
        let problems = self.problems();
        let nodes: serde_json::Map<String, Value> = self
            .0
            .connections
            .iter()
            .map(|c| (c.role().to_owned(), json!(c.node())))
            .collect();
        let paused: Vec<Value> = self
            .0
            .consumers
            .iter()
            .filter_map(|s| {
                let state = s.breakers.state();
                (!state.admits_all()).then(|| {
                    json!({
                        "queue": &*s.queue,
                        "breaker": s.breakers.closed_to_calls(),
                        "state": state.name(),
                    })
                })
            })
            .collect();
        let ready = problems.is_empty();
        (
            ready,
            json!({
                "ready": ready,
                "problems": problems,
                "paused_by_breaker": paused,
                "nodes": nodes,
                "fleet": self.fleet().map(Fleet::view),
            }),
        )
    }

    pub(crate) fn breakers(&self) -> Vec<BreakerView> {
        self.0
            .breakers
            .iter()
            .map(|(name, b)| {
                let s = b.snapshot();
                let now = Instant::now();
                let next_half_open = match s.state {
                    BreakerState::Open { until } if s.health.is_none() => Some(wall(until)),
                    _ => None,
                };
                let health_check = b.config().health_check.as_ref().map(|c| {
                    let h = s.health.clone().unwrap_or_default();
                    HealthCheckView {
                        target: c.target(),
                        interval_seconds: secs(c.interval),
                        timeout_seconds: secs(c.timeout),
                        checks: h.checks,
                        passes: h.passes,
                        failures_in_a_row: h.failures_in_a_row,
                        last_result: h
                            .last
                            .as_ref()
                            .map(|r| if r.error.is_none() { "pass" } else { "fail" }.to_owned()),
                        last_error: h.last.as_ref().and_then(|r| r.error.clone()),
                        last_at: h.last.as_ref().map(|r| wall(r.at)),
                        last_took_seconds: h.last.as_ref().map(|r| secs(r.took)),
                    }
                });
                let consumers = self
                    .0
                    .consumers
                    .iter()
                    .filter(|c| c.breakers.position(name).is_some())
                    .map(|c| c.queue.to_string())
                    .collect();
                BreakerView {
                    name: name.clone(),
                    state: s.state.name().to_owned(),
                    since: wall(s.since),
                    for_seconds: secs(now.saturating_duration_since(s.since)),
                    last_change: s.last_transition.map(|t| ChangeView {
                        from: t.from.name().to_owned(),
                        to: t.to.name().to_owned(),
                        reason: t.reason.name().to_owned(),
                        at: wall(t.at),
                        failure_rate: t.counts.failure_rate(),
                        calls: t.counts.calls,
                        failures: t.counts.failures,
                        slow_calls: t.counts.slow,
                        consecutive_failures: t.consecutive_failures,
                    }),
                    window: WindowView {
                        calls: s.counts.calls,
                        failures: s.counts.failures,
                        slow_calls: s.counts.slow,
                        failure_rate: s.counts.failure_rate(),
                    },
                    consecutive_failures: s.consecutive_failures,
                    open_time_seconds: secs(s.open_time),
                    next_half_open,
                    consumers,
                    health_check,
                    fleet: self.fleet().and_then(|f| f.breaker_view(name)),
                }
            })
            .collect()
    }

    pub(crate) fn status(&self) -> StatusView {
        let consumers = self
            .0
            .consumers
            .iter()
            .map(|c| {
                let s = c.stats.snapshot();
                ConsumerView {
                    queue: c.queue.to_string(),
                    breaker: c.breakers.first().name().to_owned(),
                    breakers: c.breakers.iter().map(|b| b.name().to_owned()).collect(),
                    subscribed: s.subscribed,
                    channel: c.stats.session_active(),
                    in_flight: s.in_flight,
                    received: s.received,
                    acked: s.succeeded,
                    failed: s.failed,
                    retried: s.retried,
                    deferred: s.deferred,
                    dead_lettered: s.dead_lettered,
                    requeued: s.requeued,
                    redelivered: s.redelivered,
                }
            })
            .collect();
        let connections = self
            .0
            .connections
            .iter()
            .chain(self.0.fleet.as_ref().map(|(_, c)| c))
            .map(|c| ConnectionView {
                name: c.name().to_owned(),
                up: c.is_up(),
                blocked: c.is_blocked(),
                reconnects: c.reconnects(),
                node: c.node(),
                broker: c.server(),
            })
            .collect();
        StatusView {
            breakers: self.breakers(),
            consumers,
            connections,
            fleet: self.fleet().map(Fleet::view),
        }
    }
}
