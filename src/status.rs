//! What a running worker reports about itself: the contract between the
//! admin endpoint (`GET /status`, `GET /breakers`) and `rabbit-guard status`
//! (and the breaker check before `dlq replay`). One set of serde types used
//! by both sides, so a renamed field cannot silently show as "-".

use serde::{Deserialize, Serialize};

/// `GET /status`: breakers, consumers and connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StatusView {
    /// Every breaker.
    pub breakers: Vec<BreakerView>,
    /// Every consumer.
    pub consumers: Vec<ConsumerView>,
    /// The consume and publish connections.
    pub connections: Vec<ConnectionView>,
    /// The fleet, when `fleet.exchange` is set.
    #[serde(default)]
    pub fleet: Option<FleetView>,
}

/// `GET /breakers`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BreakersView {
    /// Every breaker.
    pub breakers: Vec<BreakerView>,
    /// The fleet, when `fleet.exchange` is set.
    #[serde(default)]
    pub fleet: Option<FleetView>,
}

/// One breaker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BreakerView {
    /// Its name, as in `[breakers.NAME]`.
    pub name: String,
    /// `closed`, `open`, `half-open`, `forced-open`, `disabled`.
    pub state: String,
    /// When it entered that state (RFC 3339).
    pub since: String,
    /// Seconds in that state.
    pub for_seconds: f64,
    /// The last state change, if any.
    pub last_change: Option<ChangeView>,
    /// The window now.
    pub window: WindowView,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// The open time the next trip would use, in seconds.
    pub open_time_seconds: f64,
    /// While open: when it goes half-open (RFC 3339). `null` while a
    /// health check decides that (see `health_check`).
    pub next_half_open: Option<String>,
    /// The queues whose consumers it guards.
    pub consumers: Vec<String>,
    /// Its health check, if it has one.
    #[serde(default)]
    pub health_check: Option<HealthCheckView>,
    /// Its state in the fleet, when `fleet.exchange` is set.
    #[serde(default)]
    pub fleet: Option<BreakerFleetView>,
}

/// A breaker's health check and its last result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HealthCheckView {
    /// What is checked: the URL (credentials masked) or `custom`.
    pub target: String,
    /// Seconds between checks while open.
    pub interval_seconds: f64,
    /// Seconds a check may take.
    pub timeout_seconds: f64,
    /// Checks run so far.
    pub checks: u64,
    /// Of them, passed.
    pub passes: u64,
    /// Failed checks in a row now.
    pub failures_in_a_row: u32,
    /// `pass` or `fail` for the last check; `null` before the first.
    pub last_result: Option<String>,
    /// Why the last check failed.
    pub last_error: Option<String>,
    /// When the last check ended (RFC 3339).
    pub last_at: Option<String>,
    /// Seconds the last check took.
    pub last_took_seconds: Option<f64>,
}

impl BreakerView {
    /// True while it keeps its consumers off the queue (open or forced open).
    #[must_use]
    pub fn is_open(&self) -> bool {
        matches!(self.state.as_str(), "open" | "forced-open")
    }
}

/// A breaker's state change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChangeView {
    /// The state it left.
    pub from: String,
    /// The state it entered.
    pub to: String,
    /// Why (`failure-rate`, `probe-failed`, `manual`, …).
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
    /// The window's failure rate then.
    pub failure_rate: f64,
    /// Calls in the window then.
    pub calls: u64,
    /// Failures in the window then.
    pub failures: u64,
    /// Slow calls in the window then.
    pub slow_calls: u64,
    /// Failures in a row then.
    pub consecutive_failures: u32,
}

/// A breaker's rolling window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WindowView {
    /// Calls.
    pub calls: u64,
    /// Failures (timeouts included).
    pub failures: u64,
    /// Slow calls.
    pub slow_calls: u64,
    /// Failures / calls.
    pub failure_rate: f64,
}

/// One consumer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConsumerView {
    /// Its work queue.
    pub queue: String,
    /// Its (first) breaker.
    pub breaker: String,
    /// All its breakers, in order (`breakers = [...]`; the one above alone
    /// for most consumers).
    #[serde(default)]
    pub breakers: Vec<String>,
    /// Whether it has a consumer at the broker now.
    pub subscribed: bool,
    /// Whether it has a working channel.
    pub channel: bool,
    /// Handlers running now.
    pub in_flight: i64,
    /// Deliveries received.
    pub received: u64,
    /// Acked after a successful handle.
    pub acked: u64,
    /// Handler failures.
    pub failed: u64,
    /// Copied to a delay queue (a counted attempt).
    pub retried: u64,
    /// Put back without counting an attempt.
    pub deferred: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Returned to the queue (nack with requeue).
    pub requeued: u64,
    /// Received with `redelivered = true`.
    pub redelivered: u64,
}

/// One connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConnectionView {
    /// The name the broker shows.
    pub name: String,
    /// Connected now.
    pub up: bool,
    /// Blocked by the broker (resource alarm).
    pub blocked: bool,
    /// Reconnections so far.
    pub reconnects: u64,
    /// The node it is on (or was on last), its URL masked.
    #[serde(default)]
    pub node: Option<String>,
    /// What that broker said it is: product, version, Erlang release and
    /// cluster name (read once after each connect).
    #[serde(default)]
    pub broker: Option<String>,
}

/// The fleet as `/breakers`, `/readyz` and `/status` show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FleetView {
    /// The fleet exchange.
    pub exchange: String,
    /// This worker in the fleet (`ID#INCARNATION`).
    pub worker: String,
    /// `joining`, `joined` or `local-only`.
    pub state: String,
    /// Since when (RFC 3339).
    pub since: Option<String>,
    /// Why the fleet was lost, while local-only.
    pub error: Option<String>,
    /// Fleet messages sent, read and ignored (stale, duplicate, malformed).
    pub sent: u64,
    /// Messages read from other workers.
    pub received: u64,
    /// Messages or entries not taken over.
    pub ignored: u64,
    /// Messages refused because they did not come from a fleet member
    /// (a `user_id` not in `fleet.users`, a missing or wrong HMAC, a replay).
    #[serde(default)]
    pub refused: u64,
    /// The broker user this worker speaks for the fleet as.
    #[serde(default)]
    pub user: Option<String>,
    /// Other workers heard from lately (their heartbeats).
    #[serde(default)]
    pub members: Vec<String>,
    /// What is wrong with the fleet now, each with what to do. They do not
    /// make `/readyz` fail: the worker goes on guarding (on its own where
    /// it must), and a restart would not fix them.
    #[serde(default)]
    pub problems: Vec<FleetProblem>,
}

/// Something wrong with the fleet, on `/readyz`, `/breakers` and `/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FleetProblem {
    /// `fleet.lease`, `fleet.epoch`, `fleet.announce`, `fleet.untrusted`,
    /// `fleet.deaf`, `fleet.unheard`.
    pub kind: String,
    /// The breaker it concerns, if one.
    pub breaker: Option<String>,
    /// What happened and what to do.
    pub detail: String,
    /// Since when (RFC 3339).
    pub since: String,
}

/// One breaker's fleet state, for `/breakers`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BreakerFleetView {
    /// The epoch of the newest state known.
    pub epoch: u64,
    /// The worker whose change it was.
    pub origin: Option<String>,
    /// What that worker announced.
    pub announced: Option<String>,
    /// True while this worker holds the probe lease.
    pub lease_held: bool,
    /// True while another worker's lease keeps this one from probing.
    pub gated: bool,
    /// The worker announcing that it holds the probe lease, if one was
    /// heard lately.
    #[serde(default)]
    pub lease_holder: Option<String>,
    /// While this worker probes without the lease: why.
    #[serde(default)]
    pub lease_problem: Option<String>,
    /// The other workers' windows and failures in a row, as counted with
    /// this worker's own by the trip rules.
    #[serde(default)]
    pub others: Option<OthersView>,
}

/// The other workers' part of a breaker's trip rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OthersView {
    /// Calls in their windows.
    pub calls: u64,
    /// Failures in their windows.
    pub failures: u64,
    /// Slow calls in their windows.
    pub slow_calls: u64,
    /// Their failures in a row, summed.
    pub consecutive_failures: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_survives_the_trip_through_json() {
        let status = StatusView {
            breakers: vec![BreakerView {
                name: "billing".into(),
                state: "open".into(),
                since: "2026-12-02T10:00:00.000Z".into(),
                for_seconds: 4.5,
                last_change: Some(ChangeView {
                    from: "half-open".into(),
                    to: "open".into(),
                    reason: "probe-failed".into(),
                    failure_rate: 0.126,
                    calls: 159,
                    failures: 20,
                    ..ChangeView::default()
                }),
                window: WindowView {
                    calls: 159,
                    failures: 20,
                    slow_calls: 1,
                    failure_rate: 0.126,
                },
                next_half_open: Some("2026-12-02T10:00:08.000Z".into()),
                consumers: vec!["orders".into()],
                fleet: Some(BreakerFleetView {
                    epoch: 7,
                    origin: Some("host-2#1a".into()),
                    announced: Some("open".into()),
                    lease_held: false,
                    gated: true,
                    lease_holder: Some("host-2#1a".into()),
                    ..BreakerFleetView::default()
                }),
                ..BreakerView::default()
            }],
            consumers: vec![ConsumerView {
                queue: "orders".into(),
                breaker: "billing".into(),
                received: 160,
                acked: 139,
                ..ConsumerView::default()
            }],
            connections: vec![ConnectionView {
                name: "rabbit-guard/consume".into(),
                up: true,
                ..ConnectionView::default()
            }],
            fleet: Some(FleetView {
                exchange: "rabbit-guard.fleet".into(),
                worker: "host-1#2b".into(),
                state: "local-only".into(),
                error: Some("the broker cancelled this worker's fleet queue".into()),
                sent: 3,
                ..FleetView::default()
            }),
        };
        let text = serde_json::to_string(&status).unwrap();
        let back: StatusView = serde_json::from_str(&text).unwrap();
        assert_eq!(back, status);
        assert!(back.breakers[0].is_open());
    }
}
