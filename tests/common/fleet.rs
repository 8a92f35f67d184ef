//! A fleet of worker processes for the fleet tests: each member is the
//! `rabbit-guard` binary with its own admin endpoint.

use std::collections::HashSet;
use std::time::Duration;

use rabbit_guard::breaker::BreakerConfig;
use rabbit_guard::config::Settings;
use serde_json::Value;
use tokio::time::Instant;

use super::proxy::free_port;
use super::*;

/// Failures in a row that trip the breaker (the trip rule of these tests).
pub const TRIP: usize = 5;
pub const CONCURRENCY: usize = 8;
pub const OPEN: Duration = Duration::from_secs(2);

pub fn breaker() -> BreakerConfig {
    {
        let mut v = fast_breaker();
        v.consecutive_failures = Some(u32::try_from(TRIP).unwrap());
        // Only the streak trips: the rate rule would need this many calls.
        v.minimum_calls = 10_000;
        v.open_timeout = OPEN;
        v.max_open_timeout = Duration::from_secs(4);
        v.half_open_probes = 1;
        v
    }
}

/// One worker process of the fleet, with its admin endpoint.
pub struct Member {
    pub child: Child,
    pub base: String,
    pub id: String,
}

impl Member {
    pub fn spawn(settings: &Settings, id: &str) -> Self {
        let mut s = settings.clone();
        let port = free_port();
        s.admin.listen = Some(format!("127.0.0.1:{port}"));
        s.fleet.worker_id = Some(id.to_owned());
        s.broker.connection_name = format!("{}-{id}", settings.broker.connection_name);
        Self {
            child: Child::spawn(&s, &["run"]),
            base: format!("http://127.0.0.1:{port}"),
            id: id.to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> Option<Value> {
        let r = reqwest::get(format!("{}{path}", self.base)).await.ok()?;
        serde_json::from_str(&r.text().await.ok()?).ok()
    }

    /// `joining`, `joined` or `local-only`, from `/readyz`.
    pub async fn fleet_state(&self) -> Option<String> {
        let v = self.get("/readyz").await?;
        v["fleet"]["state"].as_str().map(str::to_owned)
    }

    pub async fn breaker(&self) -> Option<Value> {
        let v = self.get("/breakers").await?;
        v["breakers"].as_array()?.first().cloned()
    }

    pub async fn lease_held(&self) -> bool {
        self.breaker()
            .await
            .is_some_and(|b| b["fleet"]["lease_held"].as_bool() == Some(true))
    }

    /// Half-open trials this worker started (its own transitions).
    pub async fn trials(&self) -> f64 {
        let Ok(r) = reqwest::get(format!("{}/metrics", self.base)).await else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        prom::parse(&text)
            .unwrap_or_default()
            .iter()
            .filter(|s| {
                s.name == "rabbit_guard_breaker_transitions_total"
                    && s.labels.get("to").map(String::as_str) == Some("half-open")
            })
            .map(|s| s.value)
            .sum()
    }

    pub async fn wait_joined(&self) {
        assert!(
            wait_until_async(Duration::from_secs(20), || async {
                self.fleet_state().await.as_deref() == Some("joined")
            })
            .await,
            "worker {} did not join the fleet within 20s; its log:\n{}",
            self.id,
            self.child.stderr()
        );
    }
}

pub fn fleet_settings(prefix: &str, downstream: &Downstream) -> Settings {
    let mut s = with_http(settings(prefix, "http", breaker()), downstream);
    s.consumers[0].concurrency = u16::try_from(CONCURRENCY).unwrap();
    // Prefetch = concurrency: a worker refills from the broker, not from a
    // buffer of its own (see the README's Fleet section on bursts).
    s.consumers[0].prefetch = u16::try_from(CONCURRENCY).unwrap();
    s.fleet.exchange = Some(unique(&format!("{prefix}.x")));
    s.fleet.join_wait = Duration::from_secs(1);
    s
}

pub async fn setup(prefix: &str) -> (TestBroker, Downstream, Settings) {
    let broker = TestBroker::connect().await;
    let downstream = Downstream::start().await;
    let s = fleet_settings(prefix, &downstream);
    broker.track(&s.consumers[0]);
    broker.track_exchange(s.fleet.exchange.as_deref().unwrap());
    broker.declare(&s.consumers[0]).await;
    (broker, downstream, s)
}

/// The members, joined to their fleet, each with a consumer on `queue`.
pub async fn start_fleet(broker: &TestBroker, queue: &str, members: Vec<Member>) -> Vec<Member> {
    for m in &members {
        m.wait_joined().await;
    }
    wait_consumers(broker, queue, u32::try_from(members.len()).unwrap()).await;
    members
}

/// Waits for the whole fleet to stop consuming (the breaker open everywhere).
pub async fn wait_paused(broker: &TestBroker, queue: &str) {
    assert!(
        wait_until_async(Duration::from_secs(15), || async {
            broker.consumers(queue).await == 0
        })
        .await,
        "the fleet did not pause within 15s: {} consumer(s) at the broker",
        broker.consumers(queue).await
    );
}

/// Every member's log, for a failure message.
pub fn logs(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("\n--- {} ---\n{}", m.id, m.child.stderr()))
        .collect()
}

pub async fn wait_consumers(broker: &TestBroker, queue: &str, n: u32) {
    assert!(
        wait_until_async(Duration::from_secs(15), || async {
            broker.consumers(queue).await == n
        })
        .await,
        "{n} consumers on the queue within 15s (saw {})",
        broker.consumers(queue).await
    );
}

/// Failing calls so far.
pub fn failures(downstream: &Downstream) -> usize {
    downstream
        .calls()
        .iter()
        .filter(|c| c.status != 200)
        .count()
}

pub async fn wait_all_succeeded(downstream: &Downstream, ids: &[String], within: Duration) {
    let want: HashSet<String> = ids.iter().cloned().collect();
    let ok = wait_until(within, || downstream.succeeded_ids().is_superset(&want)).await;
    let got = downstream.succeeded_ids();
    assert!(
        ok,
        "{} of {} messages succeeded within {within:?}",
        want.intersection(&got).count(),
        want.len()
    );
}

/// The rule most users configure: at least 10 calls, half of them failed
/// (no streak rule). A 2 s window, so a run starts from an empty one.
pub fn rate_breaker() -> BreakerConfig {
    let mut v = breaker();
    v.consecutive_failures = None;
    v.minimum_calls = 10;
    v.failure_rate = 0.5;
    v.window = Duration::from_secs(2);
    v
}

/// Waits until every member's window, and what it counts of the others',
/// is empty.
pub async fn windows_empty(members: &[Member]) {
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            let mut empty = true;
            for m in members {
                empty &= m.breaker().await.is_some_and(|b| {
                    b["window"]["calls"] == 0
                        && b["fleet"]["others"]["calls"] == 0
                        && b["state"] == "closed"
                });
            }
            empty
        })
        .await,
        "every window empties once its calls are older than the window{}",
        logs(members)
    );
}
