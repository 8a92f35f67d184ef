//! Issue 14, part B: worker processes on one queue act as one guard. A trip
//! anywhere pauses the whole fleet, one worker probes per trial, a killed
//! prober is replaced, a worker that loses the fleet guards on its own and
//! rejoins, and a late joiner starts paused.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::fleet::*;
use common::*;
use serde_json::Value;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_trips_together_probes_once_per_trial_and_resumes() {
    let (broker, downstream, settings) = setup("fleet3").await;
    let queue = settings.consumers[0].queue.clone();
    downstream.set(Mode::Failing);
    let spawned = ["w1", "w2", "w3"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;

    let ids = broker.publish_json(&queue, "f", 300).await;
    let paused = wait_until_async(Duration::from_secs(15), || async {
        broker.consumers(&queue).await == 0
    })
    .await;
    let failed_before_pause = failures(&downstream);
    assert!(paused, "the fleet never showed 0 consumers");
    let bound = TRIP + 3 * CONCURRENCY;
    eprintln!("failing calls before the whole fleet paused: {failed_before_pause} (bound {bound})");
    assert!(
        failed_before_pause <= bound,
        "{failed_before_pause} failing calls before the fleet paused: more than one trip rule ({TRIP}) plus what 3 workers had in flight (3 x {CONCURRENCY}){}",
        logs(&members)
    );

    // The outage goes on for three or so trials: at most the prober
    // consumes, and each trial spends one message, on one worker.
    let watch_from = Instant::now();
    let calls_before = downstream.call_count();
    let trials_before: f64 = {
        let mut t = 0.0;
        for m in &members {
            t += m.trials().await;
        }
        t
    };
    let mut most_consumers = 0;
    while watch_from.elapsed() < Duration::from_secs(9) {
        most_consumers = most_consumers.max(broker.consumers(&queue).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probe_calls = downstream.call_count() - calls_before;
    let mut trials = -trials_before;
    let mut holders = Vec::new();
    for m in &members {
        trials += m.trials().await;
        if m.lease_held().await {
            holders.push(m.id.clone());
        }
    }
    eprintln!(
        "during the outage: {probe_calls} probe calls, {trials} trials across the fleet, at most {most_consumers} consumer(s), lease holder(s) {holders:?}"
    );
    // A worker whose trial failed lets the lease go for the next trial (its
    // own path may be what is broken), so between trials no one may hold it.
    assert!(
        holders.len() <= 1,
        "at most one worker holds the probe lease: {holders:?}"
    );
    assert!(
        most_consumers <= 1,
        "while open, only the prober may consume; saw {most_consumers} consumers"
    );
    assert!(
        trials >= 2.0,
        "the outage should have seen trials: {trials}"
    );
    #[allow(clippy::cast_precision_loss)]
    let calls = probe_calls as f64;
    assert!(
        calls <= trials + 1.0,
        "{probe_calls} calls for {trials} trials: more than one probe per trial across the fleet{}",
        logs(&members)
    );
    // (Calls in flight at the pause have landed by then.)
    let probe_times: Vec<Instant> = downstream
        .calls()
        .iter()
        .map(|c| c.at)
        .filter(|at| *at >= watch_from + Duration::from_millis(200))
        .collect();
    for pair in probe_times.windows(2) {
        assert!(
            pair[1] - pair[0] >= OPEN / 2,
            "two probes {:?} apart: two workers probed one trial",
            pair[1] - pair[0]
        );
    }

    downstream.set(Mode::Healthy);
    wait_all_succeeded(&downstream, &ids, Duration::from_secs(40)).await;
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            broker.consumers(&queue).await == 3
        })
        .await,
        "all three workers resume consuming"
    );
    let dead = broker
        .drain(&settings.consumers[0].dead_letter_queue())
        .await;
    assert_eq!(dead.len(), 0, "no message dead-lettered by the outage");
    assert_eq!(broker.ready(&queue).await, 0, "nothing left behind");
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_prober_is_replaced_within_one_open_period() {
    let (broker, downstream, settings) = setup("fleetkill").await;
    let queue = settings.consumers[0].queue.clone();
    // Probes hang well past the open time, so the kill lands mid-trial.
    downstream.set(Mode::Failing);
    let spawned = ["k1", "k2", "k3"].map(|id| Member::spawn(&settings, id));
    let mut members = start_fleet(&broker, &queue, spawned.into()).await;
    let ids = broker.publish_json(&queue, "k", 100).await;
    wait_paused(&broker, &queue).await;
    // Calls admitted before the trip end first (no worker has a handler
    // running); then the next call to arrive is a trial's probe, and it hangs.
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            let mut idle = downstream.in_progress() == 0;
            for m in &members {
                idle &= m
                    .get("/status")
                    .await
                    .and_then(|s| s["consumers"][0]["in_flight"].as_i64())
                    == Some(0);
            }
            idle
        })
        .await,
        "calls in flight at the trip ended"
    );
    let before_probe = downstream.arrived_count();
    downstream.set(Mode::Slow(Duration::from_secs(20)));
    assert!(
        wait_until(Duration::from_secs(10), || downstream.arrived_count()
            > before_probe
            && downstream.in_progress() >= 1)
        .await,
        "a probe reached the dependency"
    );
    let mut prober = None;
    for (i, m) in members.iter().enumerate() {
        if m.lease_held().await {
            prober = Some(i);
        }
    }
    let Some(prober) = prober else {
        let mut seen = String::new();
        for m in &members {
            seen.push_str(&format!(
                "\n{}: {:?}\n{}",
                m.id,
                m.get("/breakers").await,
                m.child.stderr()
            ));
        }
        panic!("no worker holds the lease during the trial:{seen}");
    };
    let victim = members.remove(prober);
    eprintln!(
        "killing the prober {} (pid {})",
        victim.id,
        victim.child.pid()
    );
    victim.child.signal("KILL");
    let killed_at = Instant::now();
    let arrived = downstream.arrived_count();
    // The dependency is healthy again: the next prober's probe succeeds.
    downstream.set(Mode::Healthy);
    let replaced = wait_until(OPEN * 3, || downstream.arrived_count() > arrived).await;
    let took = killed_at.elapsed();
    eprintln!("after the kill, the next probe came in {took:?}");
    assert!(
        replaced,
        "no other worker probed within {:?} of the kill",
        OPEN * 3
    );
    // Within one open period (the 4 s maximum), plus a lease attempt.
    assert!(
        took <= Duration::from_secs(4) + Duration::from_millis(500),
        "the next probe came {took:?} after the kill"
    );
    wait_all_succeeded(&downstream, &ids, Duration::from_secs(40)).await;
    let mut holders = 0;
    for m in &members {
        holders += usize::from(m.lease_held().await);
    }
    assert_eq!(holders, 1, "one of the two survivors took the lease");
    drop(members);
    drop(victim);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_loses_the_fleet_guards_alone_and_rejoins() {
    let (broker, downstream, settings) = setup("fleetcut").await;
    let queue = settings.consumers[0].queue.clone();
    downstream.set(Mode::Healthy);
    // c1 waits long before reconnecting a lost connection: time enough to
    // watch it guard on its own.
    let mut slow_rejoin = settings.clone();
    slow_rejoin.broker.reconnect.initial_delay = Duration::from_secs(6);
    let spawned = vec![
        Member::spawn(&slow_rejoin, "c1"),
        Member::spawn(&settings, "c2"),
    ];
    let members = start_fleet(&broker, &queue, spawned).await;
    // Cut c1's fleet connection at the broker.
    let name = format!("{}-c1/fleet", settings.broker.connection_name);
    assert_eq!(
        close_connections_named(&name, "test cuts the fleet"),
        1,
        "closed {name}"
    );
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            members[0].fleet_state().await.as_deref() == Some("local-only")
        })
        .await,
        "c1 shows local-only on /readyz after losing the fleet"
    );
    // On its own, it still trips by itself (and nothing is lost).
    downstream.set(Mode::Failing);
    let ids = broker.publish_json(&queue, "c", 60).await;
    let tripped = wait_until_async(Duration::from_secs(5), || async {
        members[0]
            .breaker()
            .await
            .is_some_and(|b| b["state"] != "closed")
    })
    .await;
    let b = members[0].breaker().await.unwrap_or_default();
    assert!(tripped, "c1 trips on its own calls: {b}");
    assert_eq!(
        b["last_change"]["reason"], "consecutive-failures",
        "c1 tripped by its own calls, not by the fleet: {b}"
    );
    assert_eq!(
        members[0].fleet_state().await.as_deref(),
        Some("local-only"),
        "c1 tripped while still without the fleet"
    );
    members[0].wait_joined().await;
    let log = members[0].child.stderr();
    assert!(log.contains("lost the fleet"), "the loss is logged:\n{log}");
    assert!(
        log.contains("rejoined the fleet"),
        "the rejoin is logged:\n{log}"
    );
    downstream.set(Mode::Healthy);
    wait_all_succeeded(&downstream, &ids, Duration::from_secs(40)).await;
    let dead = broker
        .drain(&settings.consumers[0].dead_letter_queue())
        .await;
    assert_eq!(dead.len(), 0, "nothing dead-lettered");
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_starts_paused_and_takes_nothing_until_the_fleet_closes() {
    let (broker, downstream, settings) = setup("fleetlate").await;
    let queue = settings.consumers[0].queue.clone();
    downstream.set(Mode::Failing);
    let mut started = start_fleet(&broker, &queue, vec![Member::spawn(&settings, "l1")]).await;
    let first = started.remove(0);
    let ids = broker.publish_json(&queue, "l", 40).await;
    wait_paused(&broker, &queue).await;
    // l1 has run a trial, so it holds the probe lease: the joiner, coming
    // during the outage, must take nothing at all.
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            first.lease_held().await
        })
        .await,
        "l1 took the probe lease at its first trial"
    );
    let late = Member::spawn(&settings, "l2");
    late.wait_joined().await;
    // The fleet's answers come within its join wait (1 s), before the
    // joiner's consumers start.
    let open = wait_until_async(settings.fleet.join_wait, || async {
        late.breaker().await.is_some_and(|b| b["state"] != "closed")
    })
    .await;
    let b = late.breaker().await.expect("/breakers of the joiner");
    assert!(open, "the joiner starts with the fleet's open breaker: {b}");
    let calls = downstream.call_count();
    let mut most = 0;
    let from = Instant::now();
    while from.elapsed() < Duration::from_secs(3) {
        most = most.max(broker.consumers(&queue).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(most <= 1, "{most} consumers while the fleet is open");
    let received = late
        .get("/status")
        .await
        .and_then(|s| s["consumers"][0]["received"].as_u64());
    eprintln!(
        "the joiner received {received:?} message(s) while open; {} probe call(s) in all (by l1)",
        downstream.call_count() - calls
    );
    assert_eq!(
        received,
        Some(0),
        "the joiner took a message while the fleet was open"
    );
    downstream.set(Mode::Healthy);
    wait_all_succeeded(&downstream, &ids, Duration::from_secs(40)).await;
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            broker.consumers(&queue).await == 2
        })
        .await,
        "both resume once the fleet closes"
    );
    drop((first, late));
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_open_applies_fleet_wide_and_says_so() {
    let (broker, downstream, mut settings) = setup("fleetman").await;
    settings.admin.token = Some("t0ken-for-the-test".into());
    downstream.set(Mode::Healthy);
    let queue = settings.consumers[0].queue.clone();
    let spawned = ["m1", "m2"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let text = reqwest::get(format!("{}/metrics", members[0].base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = prom::parse(&text).unwrap();
    assert_eq!(
        prom::value(&samples, "rabbit_guard_fleet_joined", &[]),
        Some(1.0),
        "joined, on /metrics"
    );
    assert!(
        prom::value(
            &samples,
            "rabbit_guard_fleet_messages_total",
            &[("direction", "sent")]
        )
        .is_some_and(|n| n >= 1.0),
        "the join's sync request is counted as sent"
    );
    assert_eq!(
        prom::value(
            &samples,
            "rabbit_guard_connection_up",
            &[("connection", "fleet")]
        ),
        Some(1.0),
        "the fleet connection is on /metrics"
    );
    let client = reqwest::Client::new();
    let r: Value = client
        .post(format!("{}/breakers/dep/open", members[0].base))
        .bearer_auth("t0ken-for-the-test")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    assert_eq!(
        r["fleet"], "applied fleet-wide",
        "the response says so: {r}"
    );
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            members[1]
                .breaker()
                .await
                .is_some_and(|b| b["state"] == "forced-open")
        })
        .await,
        "the other worker is forced open too"
    );
    let r: Value = client
        .post(format!("{}/breakers/dep/close", members[1].base))
        .bearer_auth("t0ken-for-the-test")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    assert_eq!(r["state"], "closed");
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            members[0]
                .breaker()
                .await
                .is_some_and(|b| b["state"] == "closed")
        })
        .await,
        "a close through the other worker closes the first"
    );
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_runs_the_health_check() {
    let (broker, downstream, mut settings) = setup("fleethc").await;
    let queue = settings.consumers[0].queue.clone();
    settings.breakers.get_mut("dep").unwrap().health_check =
        Some(rabbit_guard::breaker::HealthCheckConfig::new(
            Some(downstream.health_url().into()),
            Duration::from_millis(200),
            Duration::from_secs(1),
        ));
    downstream.set(Mode::Failing);
    let spawned = ["h1", "h2"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let ids = broker.publish_json(&queue, "h", 40).await;
    wait_paused(&broker, &queue).await;
    // A few check intervals while the dependency stays down.
    assert!(
        wait_until(Duration::from_secs(10), || downstream.health_checks().len()
            >= 5)
        .await,
        "the health check runs while open"
    );
    let mut checks = Vec::new();
    for m in &members {
        let b = m.breaker().await.unwrap_or_default();
        checks.push(b["health_check"]["checks"].as_u64().unwrap_or(0));
    }
    eprintln!("health checks per worker while open: {checks:?}");
    assert_eq!(
        checks.iter().filter(|n| **n > 0).count(),
        1,
        "exactly one worker runs the health check: {checks:?}{}",
        logs(&members)
    );
    downstream.set(Mode::Healthy);
    wait_all_succeeded(&downstream, &ids, Duration::from_secs(30)).await;
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workers_failing_path_pauses_that_worker_and_not_the_fleet() {
    let (broker, downstream, mut settings) = setup("fleetpath").await;
    let mut b = rate_breaker();
    b.window = Duration::from_secs(10);
    settings.breakers.insert("dep".into(), b);
    let queue = settings.consumers[0].queue.clone();
    downstream.set(Mode::Healthy);
    // p1 reaches the dependency through a path of its own.
    let path = Downstream::start().await;
    path.set(Mode::Healthy);
    let p1 = with_http(settings.clone(), &path);
    let spawned = vec![
        Member::spawn(&p1, "p1"),
        Member::spawn(&settings, "p2"),
        Member::spawn(&settings, "p3"),
    ];
    let members = start_fleet(&broker, &queue, spawned).await;
    // Steady traffic: 50 messages a second for 5 s; p1's path breaks once it
    // has handled some.
    let publisher = TestBroker::connect().await;
    let q = queue.clone();
    let traffic = tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..250 {
            ids.extend(publisher.publish_json(&q, &format!("s{i}"), 1).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids
    });
    // p1 takes its share before its path breaks.
    assert!(
        wait_until(Duration::from_secs(10), || path.succeeded_ids().len() >= 10).await,
        "p1 handled {} messages through its own path in 10s{}",
        path.succeeded_ids().len(),
        logs(&members)
    );
    path.set(Mode::Failing);
    let tripped = wait_until_async(Duration::from_secs(10), || async {
        members[0]
            .breaker()
            .await
            .is_some_and(|b| b["state"] != "closed")
    })
    .await;
    let b = members[0].breaker().await.unwrap_or_default();
    assert!(tripped, "p1 pauses itself on its own failing calls: {b}");
    let ids = traffic.await.unwrap();
    // The others carried the traffic: every message handled (p1's failures
    // retried on them), or, having failed on p1 at every attempt, in the
    // dead-letter queue: nothing lost.
    let mut dead = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for d in broker
            .drain(&settings.consumers[0].dead_letter_queue())
            .await
        {
            dead.insert(d.id);
        }
        let mut ok = downstream.succeeded_ids();
        ok.extend(path.succeeded_ids());
        let missing = ids
            .iter()
            .filter(|id| !ok.contains(*id) && !dead.contains(*id))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} messages neither succeeded nor dead-lettered after 30s{}",
            ids.len(),
            logs(&members)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut opened = Vec::new();
    for m in &members {
        let text = reqwest::get(format!("{}/metrics", m.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let opens: f64 = prom::parse(&text)
            .unwrap_or_default()
            .iter()
            .filter(|s| {
                s.name == "rabbit_guard_breaker_transitions_total"
                    && s.labels.get("to").map(String::as_str) == Some("open")
            })
            .map(|s| s.value)
            .sum();
        opened.push((m.id.clone(), opens));
    }
    eprintln!(
        "p1's path failing alone: opens per worker {opened:?}; {} dead-lettered (messages that failed on p1 three times)",
        dead.len()
    );
    assert!(
        opened[1..].iter().all(|(_, n)| *n == 0.0),
        "the healthy workers never opened: {opened:?}{}",
        logs(&members)
    );
    let log = members[0].child.stderr();
    assert!(
        log.contains("breaker opened on this worker only"),
        "p1 says its trip is its own:\n{log}"
    );
    assert!(dead.len() <= 2, "{} dead-lettered", dead.len());
    drop(members);
    broker.cleanup().await;
}
