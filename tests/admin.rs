//! The admin endpoint: metrics through an outage, readiness, manual breaker
//! control with a token, status, and the breaker check before a replay.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::prom::{self, Sample};
use common::proxy::{Proxy, free_port};
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::BreakerState;
use rabbit_guard::config::Settings;
use rabbit_guard::lapin;

fn with_admin(mut s: Settings, token: Option<&str>) -> (Settings, String) {
    let port = free_port();
    s.admin.listen = Some(format!("127.0.0.1:{port}"));
    s.admin.token = token.map(Into::into);
    (s, format!("http://127.0.0.1:{port}"))
}

async fn scrape(base: &str) -> Vec<Sample> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    prom::parse(&text)
        .unwrap_or_else(|e| panic!("/metrics is not valid exposition format: {e}\n{text}"))
}

fn state_of(samples: &[Sample], breaker: &str) -> Option<String> {
    samples
        .iter()
        .find(|s| {
            s.name == "rabbit_guard_breaker_state"
                && s.labels["breaker"] == breaker
                && s.value == 1.0
        })
        .map(|s| s.labels["state"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_an_outage_and_agree_with_the_downstream() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let breaker = {
        let mut v = fast_breaker();
        v.open_timeout = Duration::from_millis(800);
        v
    };
    let (settings, base) = with_admin(
        with_http(settings("metrics", "http", breaker), &downstream),
        None,
    );
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let running = Running::start(Worker::builder(settings)).await;

    // Scrape all along, noting each state the gauge shows.
    let states = Arc::new(Mutex::new(Vec::<String>::new()));
    let scraper = {
        let (states, base) = (states.clone(), base.clone());
        tokio::spawn(async move {
            loop {
                if let Some(state) = state_of(&scrape(&base).await, "dep") {
                    let mut s = states.lock().unwrap();
                    if s.last() != Some(&state) {
                        s.push(state);
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let first = broker.publish_json(&consumer.queue, "m1", 100).await;
    assert!(
        wait_until(Duration::from_secs(10), || downstream.succeeded_ids().len()
            == first.len())
        .await,
        "all {} first messages should succeed within 10 s: {} did",
        first.len(),
        downstream.succeeded_ids().len()
    );
    downstream.set(Mode::Failing);
    let second = broker.publish_json(&consumer.queue, "m2", 100).await;
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            running.state(),
            BreakerState::Open { .. }
        ))
        .await,
        "the breaker should open within 10 s of the downstream failing: {:?} after {} calls; {:?}",
        running.state(),
        downstream.call_count(),
        running.transitions()
    );
    // Recover slowly, so half-open lasts long enough to be scraped.
    downstream.set(Mode::Slow(Duration::from_millis(600)));
    assert!(
        wait_until(Duration::from_secs(30), || downstream.succeeded_ids().len()
            == first.len() + second.len())
        .await,
        "everything processed after recovery: {} of {} succeeded within 30 s, breaker {:?}",
        downstream.succeeded_ids().len(),
        first.len() + second.len(),
        running.state()
    );
    assert!(
        wait_until(Duration::from_secs(5), || states
            .lock()
            .unwrap()
            .last()
            .map(String::as_str)
            == Some("closed"))
        .await,
        "the state gauge should show closed again within 5 s; scraped {:?}",
        states.lock().unwrap().clone()
    );
    scraper.abort();
    let seen = states.lock().unwrap().clone();
    let want = ["closed", "open", "half-open", "closed"];
    let mut it = seen.iter();
    assert!(
        want.iter().all(|w| it.any(|s| s == w)),
        "the state gauge should move closed -> open -> half-open -> closed; scraped {seen:?}"
    );

    let calls = downstream.calls();
    let ok = calls.iter().filter(|c| c.status == 200).count() as f64;
    let failed = calls.iter().filter(|c| c.status == 503).count() as f64;
    let q = consumer.queue.as_str();
    let duration_count = |samples: &[Sample], outcome: &str| {
        prom::value(
            samples,
            "rabbit_guard_handler_duration_seconds_count",
            &[("queue", q), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    // A handler's duration is recorded just after its message is settled:
    // scrape until the last one is in (at most 5 s), then compare.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let samples = loop {
        let samples = scrape(&base).await;
        let counted = (
            duration_count(&samples, "success"),
            duration_count(&samples, "transient"),
        );
        if counted == (ok, failed) || tokio::time::Instant::now() >= deadline {
            break samples;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let outcome = |o: &str| {
        prom::value(
            &samples,
            "rabbit_guard_breaker_calls_total",
            &[("breaker", "dep"), ("outcome", o)],
        )
    };
    assert_eq!(
        outcome("success"),
        Some(ok),
        "successes agree with the downstream"
    );
    assert_eq!(
        outcome("failure"),
        Some(failed),
        "failures agree with the downstream"
    );
    assert_eq!(
        prom::value(
            &samples,
            "rabbit_guard_messages_acked_total",
            &[("queue", q)]
        ),
        Some(ok),
        "every success is acked: {ok} successes"
    );
    assert_eq!(
        prom::value(
            &samples,
            "rabbit_guard_messages_dead_lettered_total",
            &[("queue", q), ("reason", "retries-exhausted")]
        ),
        Some(0.0),
        "an outage dead-letters nothing as retries-exhausted"
    );
    assert_eq!(
        (
            duration_count(&samples, "success"),
            duration_count(&samples, "transient")
        ),
        (ok, failed),
        "one duration per call, labelled by its outcome"
    );
    let by_outcome: f64 = samples
        .iter()
        .filter(|s| s.name == "rabbit_guard_breaker_calls_total" && s.labels["breaker"] == "dep")
        .filter(|s| s.labels["outcome"] != "rejected")
        .map(|s| s.value)
        .sum();
    assert_eq!(
        by_outcome,
        ok + failed,
        "outcomes do not overlap: their sum is the calls made ({ok} + {failed})"
    );
    assert!(
        samples
            .iter()
            .any(|s| s.name == "rabbit_guard_breaker_slow_calls_total"),
        "slow calls are their own counter"
    );
    assert!(
        samples
            .iter()
            .any(|s| s.name == "rabbit_guard_breaker_failure_ratio"),
        "a ratio is named _ratio"
    );
    assert_eq!(
        prom::value(
            &samples,
            "rabbit_guard_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "build_info names the version"
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(
            samples.iter().any(|s| s.name == name && s.value > 0.0),
            "process metric {name} is exported"
        );
    }
    let families = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (a, b) = (
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let (fa, fb) = (families(&a), families(&b));
    let mut sorted = fa.clone();
    sorted.sort();
    assert!(
        fa == fb && fa == sorted,
        "families come in a stable, sorted order: {fa:?} then {fb:?}"
    );
    let transitions: f64 = samples
        .iter()
        .filter(|s| s.name == "rabbit_guard_breaker_transitions_total" && s.labels["to"] == "open")
        .map(|s| s.value)
        .sum();
    assert!(
        transitions >= 1.0,
        "transitions to open are counted: {transitions} counted, breaker went {:?}",
        running.transitions()
    );
    assert_eq!(
        prom::value(
            &samples,
            "rabbit_guard_connection_up",
            &[("connection", "consume")]
        ),
        Some(1.0),
        "the consume connection is up"
    );
    assert_eq!(
        prom::value(
            &samples,
            "rabbit_guard_consumer_subscribed",
            &[("queue", q)]
        ),
        Some(1.0),
        "the consumer is subscribed again after recovery"
    );
    eprintln!("metrics: states scraped {seen:?}; {ok} successes, {failed} failures");
    running.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_200_while_paused_and_503_while_disconnected() {
    let broker = Arc::new(TestBroker::connect().await);
    let proxy = Proxy::start().await;
    let downstream = Downstream::start().await;
    downstream.set(Mode::Failing);
    let breaker = {
        let mut v = fast_breaker();
        v.open_timeout = Duration::from_secs(30);
        v.max_open_timeout = Duration::from_secs(30);
        v
    };
    let mut settings = with_http(settings("ready", "http", breaker), &downstream);
    settings.broker.url = proxy.url("?heartbeat=2").into();
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.broker.reconnect.max_delay = Duration::from_millis(500);
    let (settings, base) = with_admin(settings, None);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    broker.publish_json(&consumer.queue, "r", 50).await;
    let running = Running::start(Worker::builder(settings)).await;
    let ready = || async {
        let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
        (
            r.status().as_u16(),
            serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap(),
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            running.state(),
            BreakerState::Open { .. }
        ))
        .await,
        "the breaker should open within 10 s of the downstream failing: {:?} after {} calls",
        running.state(),
        downstream.call_count()
    );
    let (code, body) = ready().await;
    assert_eq!(code, 200, "paused by its breaker is ready: {body}");
    assert_eq!(
        body["paused_by_breaker"][0]["state"], "open",
        "readyz lists the consumer paused by its open breaker: {body}"
    );
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200,
        "healthz is 200 while paused by the breaker"
    );

    proxy.shut();
    let mut down = None;
    for _ in 0..100 {
        let (code, body) = ready().await;
        if code == 503 {
            down = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down = down.expect("readyz should turn 503 while the connection is down");
    assert!(
        down["problems"].to_string().contains("down"),
        "readyz names the connection that is down: {down}"
    );
    proxy.listen().await;
    let mut back = false;
    for _ in 0..200 {
        if ready().await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        back,
        "readyz returns to 200 after reconnecting; now {:?}",
        ready().await
    );
    running.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_open_over_the_api_pauses_until_closed_and_needs_the_token() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let (settings, base) = with_admin(
        with_http(settings("forced", "http", fast_breaker()), &downstream),
        Some("t0ken"),
    );
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let running = Running::start(Worker::builder(settings.clone())).await;
    let client = reqwest::Client::new();
    let post = |path: &str, token: Option<&str>| {
        let mut r = client.post(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(
        post("/breakers/dep/open", None).await.unwrap().status(),
        401,
        "no token"
    );
    assert_eq!(
        post("/breakers/dep/open", Some("wrong"))
            .await
            .unwrap()
            .status(),
        401,
        "wrong token"
    );
    assert_eq!(
        running.state(),
        BreakerState::Closed,
        "refused requests leave the breaker closed"
    );
    let r = post("/breakers/dep/open", Some("t0ken")).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the right token may force the breaker open"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap()["state"],
        "forced-open",
        "POST /breakers/dep/open answers the new state"
    );
    assert_eq!(
        post("/breakers/nope/open", Some("t0ken"))
            .await
            .unwrap()
            .status(),
        404,
        "an unknown breaker is 404"
    );
    assert_eq!(
        post("/breakers/dep/explode", Some("t0ken"))
            .await
            .unwrap()
            .status(),
        404,
        "an unknown action is 404"
    );

    assert!(
        wait_until_consumers(&broker, &consumer.queue, 0).await,
        "forced open: no consumer at the broker"
    );
    let ids = broker.publish_json(&consumer.queue, "f", 30).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // long past any open timeout
    assert_eq!(
        downstream.call_count(),
        0,
        "no calls while forced open, however long"
    );
    assert_eq!(
        broker.consumers(&consumer.queue).await,
        0,
        "still no consumer at the broker after 2 s forced open"
    );

    // GET /breakers says what it is, why, and what it guards.
    let breakers = get_breakers(&base).await;
    let dep = &breakers["breakers"][0];
    assert_eq!(dep["name"], "dep", "{breakers}");
    assert_eq!(dep["state"], "forced-open", "{breakers}");
    assert_eq!(dep["consumers"][0], consumer.queue.as_str(), "{breakers}");
    assert_eq!(dep["last_change"]["from"], "closed", "{breakers}");
    assert_eq!(dep["last_change"]["to"], "forced-open", "{breakers}");
    assert!(
        dep["last_change"]["reason"].is_string()
            && dep["since"].is_string()
            && dep["window"]["calls"].is_u64()
            && dep["window"]["failure_rate"].is_number(),
        "state, reason, since and window counts: {breakers}"
    );

    // `rabbit-guard status` shows it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        toml::to_string(&settings).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["status", "--config"])
        .arg(dir.path().join("c.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rabbit-guard status should succeed (exit {:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("forced-open") && text.contains(&consumer.queue),
        "rabbit-guard status shows forced-open and the queue {}: {text}",
        consumer.queue
    );
    // From anywhere, with only the endpoint's address (no config file).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["status", "--json", "--admin", &base])
        .current_dir(dir.path())
        .env_remove("RABBIT_GUARD_CONFIG")
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json --admin should print JSON without a config file ({e}), exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        json["breakers"][0]["state"], "forced-open",
        "status --admin without a config file: {json}"
    );
    // The endpoint's answer is exactly the typed contract the CLI reads.
    let body = reqwest::get(format!("{base}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let typed: rabbit_guard::status::StatusView = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET /status is not a StatusView ({e}): {body}"));
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        "GET /status holds no field the StatusView leaves out"
    );
    assert!(
        typed.breakers[0].is_open() && typed.consumers[0].queue == consumer.queue,
        "{typed:?}"
    );

    // A replay into a queue whose breaker is open is refused unless forced.
    let dlq = consumer.dead_letter_queue();
    let mut h = lapin::types::FieldTable::default();
    h.insert(
        "rg-original-queue".into(),
        lapin::types::AMQPValue::LongString(consumer.queue.as_str().into()),
    );
    h.insert(
        "rg-reason".into(),
        lapin::types::AMQPValue::LongString("permanent".into()),
    );
    broker
        .channel
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            Default::default(),
            b"{}",
            lapin::BasicProperties::default()
                .with_message_id("dead-1".into())
                .with_headers(h),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let replay = |force: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"));
        c.args(["dlq", "replay", "--all", "--config"])
            .arg(dir.path().join("c.toml"));
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let refused = replay(false);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "a replay into the queue of an open breaker is refused: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is open"),
        "the refusal says the breaker is open: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(broker.ready(&dlq).await, 1, "nothing replayed");

    let r = post("/breakers/dep/close", Some("t0ken")).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap()["state"],
        "closed",
        "POST /breakers/dep/close answers the new state"
    );
    assert!(
        wait_until(Duration::from_secs(10), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "closing by hand resumes consumption: {} of {} succeeded within 10 s",
        downstream.succeeded_ids().len(),
        ids.len()
    );
    let forced = replay(true);
    assert!(
        forced.status.success(),
        "a forced replay succeeds (exit {:?}): {}",
        forced.status.code(),
        String::from_utf8_lossy(&forced.stderr)
    );

    // Disabled: everything goes through and nothing trips it, however many
    // calls fail (fast_breaker trips at 50% of 10 calls).
    let r = post("/breakers/dep/disable", Some("t0ken")).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap()["state"],
        "disabled",
        "POST /breakers/dep/disable answers the new state"
    );
    downstream.set(Mode::Failing);
    let before = downstream.call_count();
    broker.publish_json(&consumer.queue, "d", 30).await;
    let failed_through = wait_until(Duration::from_secs(15), || {
        downstream.call_count() >= before + 30
    })
    .await;
    assert!(
        failed_through,
        "a disabled breaker lets every call through: {} calls of 30",
        downstream.call_count() - before
    );
    assert_eq!(
        running.state(),
        BreakerState::Disabled,
        "30 failing calls do not move a disabled breaker: {:?}",
        running.transitions()
    );
    assert_eq!(
        broker.consumers(&consumer.queue).await,
        1,
        "a disabled breaker never pauses the consumer"
    );

    // Reset: closed, with the window and backoff cleared.
    downstream.set(Mode::Healthy);
    let r = post("/breakers/dep/reset", Some("t0ken")).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap()["state"],
        "closed",
        "POST /breakers/dep/reset answers the new state"
    );
    let breakers = get_breakers(&base).await;
    let dep = &breakers["breakers"][0];
    assert_eq!(dep["state"], "closed", "{breakers}");
    assert_eq!(
        dep["window"]["failures"], 0,
        "reset clears the window: {breakers}"
    );
    running.stop().await;
    broker.cleanup().await;
}

async fn get_breakers(base: &str) -> serde_json::Value {
    let text = reqwest::get(format!("{base}/breakers"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("/breakers is not JSON ({e}): {text}"))
}

async fn wait_until_consumers(broker: &TestBroker, queue: &str, want: u32) -> bool {
    for _ in 0..200 {
        if broker.consumers(queue).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_control_needs_a_token_everywhere_and_refuses_web_pages() {
    let downstream = Downstream::start().await;
    let broker = Arc::new(TestBroker::connect().await);
    let client = reqwest::Client::new();

    // No token configured, on loopback and on every interface: control is off.
    for listen in ["127.0.0.1", "0.0.0.0"] {
        let port = free_port();
        let mut settings = with_http(settings("notoken", "http", fast_breaker()), &downstream);
        settings.admin.listen = Some(format!("{listen}:{port}"));
        broker.track(&settings.consumers[0]);
        let running = Running::start(Worker::builder(settings)).await;
        let r = client
            .post(format!("http://127.0.0.1:{port}/breakers/dep/open"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            403,
            "no token on {listen}: manual control refused"
        );
        assert_eq!(
            running.state(),
            BreakerState::Closed,
            "a refused request leaves the breaker closed ({listen})"
        );
        assert_eq!(
            reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
                .await
                .unwrap()
                .status(),
            200,
            "healthz answers on {listen}"
        );
        running.stop().await;
    }

    // A token from a file: the right one works, but not from a web page.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "from-a-file\n").unwrap();
    let port = free_port();
    let mut settings = with_http(settings("tokenfile", "http", fast_breaker()), &downstream);
    settings.admin.listen = Some(format!("127.0.0.1:{port}"));
    settings.admin.token_file = Some(token_file);
    broker.track(&settings.consumers[0]);
    let running = Running::start(Worker::builder(settings)).await;
    let base = format!("http://127.0.0.1:{port}");
    let open = |extra: &[(&str, &str)]| {
        let mut r = client
            .post(format!("{base}/breakers/dep/open"))
            .bearer_auth("from-a-file");
        for (k, v) in extra {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let r = open(&[("Origin", "https://evil.example")]).await.unwrap();
    assert_eq!(
        r.status(),
        403,
        "a cross-origin POST is refused, token or not"
    );
    let r = open(&[("Host", "evil.example:80")]).await.unwrap();
    assert_eq!(r.status(), 403, "a rebinding Host is refused");
    let r = client
        .get(format!("{base}/status"))
        .header("Host", format!("rebound.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "on loopback, even a GET with a foreign Host is refused"
    );
    assert_eq!(
        running.state(),
        BreakerState::Closed,
        "refused requests leave the breaker closed"
    );
    let r = client
        .post(format!("{base}/breakers/dep/open"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a wrong token is 401");
    let r = open(&[("Origin", &base)]).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the token from admin.token_file opens it from the endpoint itself"
    );
    assert!(
        matches!(running.state(), BreakerState::ForcedOpen),
        "forced open by the API: {:?}",
        running.state()
    );
    running.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_never_show_the_password() {
    let broker = Arc::new(TestBroker::connect().await);
    // A user of our own, so its password appears nowhere else.
    let account = TempUser::create();
    let (user, password) = (account.user.clone(), account.password.clone());

    let proxy = Proxy::start().await;
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let mut settings = with_http(settings("jsonlog", "http", fast_breaker()), &downstream);
    settings.broker.url = format!(
        "amqp://{user}:{password}@127.0.0.1:{}/%2f?heartbeat=2",
        proxy.port
    )
    .into();
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.log.format = rabbit_guard::config::LogFormat::Json;
    settings.log.level = "debug,lapin=debug".into();
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let mut child = Child::spawn(&settings, &["run"]);
    let first = broker.publish_json(&consumer.queue, "j1", 20).await;
    assert!(
        wait_until(Duration::from_secs(15), || downstream.succeeded_ids().len()
            == first.len())
        .await,
        "all {} first messages should succeed within 15 s: {} did; log:\n{}",
        first.len(),
        downstream.succeeded_ids().len(),
        child.stderr()
    );
    proxy.cut_all();
    assert!(
        wait_until(Duration::from_secs(15), || child
            .stderr()
            .contains("reconnected to the broker"))
        .await,
        "the worker should log that it reconnected within 15 s of the cut; log:\n{}",
        child.stderr()
    );
    child.signal("TERM");
    assert_eq!(
        child
            .wait(Duration::from_secs(20))
            .await
            .and_then(|s| s.code()),
        Some(0),
        "SIGTERM should exit 0 within 20 s; log:\n{}",
        child.stderr()
    );
    let log = child.stderr();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"].is_object()
                || v["message"].is_string()
                || v["level"].is_string(),
            "every log line has a level or a message: {line}"
        );
        lines += 1;
    }
    assert!(
        lines > 5,
        "more than 5 log lines expected, got {lines}:\n{log}"
    );
    assert!(
        !log.contains(&password),
        "the password appeared in the logs, {} times",
        log.matches(&password).count()
    );
    assert!(
        log.contains("***"),
        "the URL is logged masked; no \"***\" in {lines} lines:\n{log}"
    );
    eprintln!("json logs: {lines} lines, all JSON, no password");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_command_controls_a_running_worker_with_the_configured_token() {
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let broker = Arc::new(TestBroker::connect().await);
    let (settings, base) = with_admin(
        with_http(settings("breakercmd", "http", fast_breaker()), &downstream),
        Some("cmd-t0ken"),
    );
    broker.track(&settings.consumers[0]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, toml::to_string(&settings).unwrap()).unwrap();
    let running = Running::start(Worker::builder(settings)).await;
    let cmd = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
            .arg("breaker")
            .args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = cmd(&["open", "dep"]);
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("breaker dep is now forced-open"),
        "breaker open with the token from the config: {:?} {} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(5), || running.state()
            == BreakerState::ForcedOpen)
        .await,
        "the worker's breaker is forced open: {:?}",
        running.state()
    );
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "nope\n").unwrap();
    let out = cmd(&[
        "close",
        "dep",
        "--admin",
        &base,
        "--token-file",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "a wrong token is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cmd(&["reset", "dep"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(5), || running.state()
            == BreakerState::Closed)
        .await,
        "reset closes it: {:?}",
        running.state()
    );
    let out = cmd(&["open", "no-such-breaker"]);
    assert_eq!(out.status.code(), Some(1), "an unknown breaker is an error");
    let ready = |admin: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
            .args(["status", "--ready", "--admin", admin])
            .output()
            .unwrap()
    };
    let out = ready(&base);
    assert_eq!(
        out.status.code(),
        Some(0),
        "status --ready on a ready worker (the container health check): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ready(&format!("http://127.0.0.1:{}", free_port()));
    assert_eq!(
        out.status.code(),
        Some(1),
        "status --ready with no worker there"
    );
    running.stop().await;
    broker.cleanup().await;
}

/// The worker binary under `ulimit -n <limit>` (soft and hard), stderr to
/// a file.
fn spawn_limited(settings: &Settings, limit: &str) -> (std::process::Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit {limit} && exec \"$0\" run --config \"$1\"",))
        .arg(cli_binary())
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the worker under ulimit");
    (child, dir)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_clients_cannot_take_the_descriptors_a_reconnect_needs() {
    let broker = TestBroker::connect().await;
    let (mut settings, base) = with_admin(settings("admin-fds", "noop", fast_breaker()), None);
    settings.admin.max_connections = 16;
    settings.admin.request_timeout = Duration::from_secs(1);
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    let name = settings.broker.connection_name.clone();
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    // 128 descriptors, soft and hard: nothing to raise.
    let (mut child, dir) = spawn_limited(&settings, "-n 128");
    let pid = child.id();
    let log = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(15), || log()
            .contains("consumer subscribed"))
        .await,
        "the worker should start under ulimit -n 128:\n{}",
        log()
    );

    // 200 idle clients: they connect and never send a byte.
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = open_files(pid);
    assert!(
        held < 128 - 40,
        "the endpoint holds at most admin.max_connections (16) of the 200 idle clients: {held} descriptors open"
    );

    // Now the broker drops the worker's connections: it must get them back
    // while the idle clients stay connected.
    let cut = tokio::time::Instant::now();
    assert!(close_connections_named(&format!("{name}/consume"), "test") >= 1);
    let back = wait_until(Duration::from_secs(15), || {
        log().matches("reconnected to the broker").count() >= 1
    })
    .await;
    assert!(
        back,
        "the worker reconnects within 15 s while 200 idle admin clients hold on ({} descriptors open):\n{}",
        open_files(pid),
        log()
    );
    eprintln!(
        "reconnected {:?} after the cut, {} descriptors open",
        cut.elapsed(),
        open_files(pid)
    );
    // The idle ones time out (admin.request_timeout) and the endpoint serves again.
    let healthy = wait_until_async(Duration::from_secs(30), || async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    drop(idle);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let text = log();
    assert!(
        healthy,
        "/healthz answers again while the idle clients stay connected:\n{text}"
    );
    assert!(!text.contains("panicked"), "no panic:\n{text}");
    broker.cleanup().await;
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_its_hard_limit() {
    let broker = TestBroker::connect().await;
    let settings = settings("admin-rlimit", "noop", fast_breaker());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .unwrap_or_default();
    let (mut child, dir) = spawn_limited(&settings, "-Sn 256");
    let pid = child.id();
    let log = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(15), || log()
            .contains("consumer subscribed"))
        .await,
        "{}",
        log()
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .unwrap_or_default();
    assert_eq!(
        soft, hard,
        "the soft limit (256 at start) is raised to the hard one:\n{limits}"
    );
    if hard != "256" {
        assert!(log().contains("raised the open-file limit"), "{}", log());
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_refused_for_want_of_descriptors_recovers_once_they_are_free() {
    let broker = TestBroker::connect().await;
    let (mut settings, base) = with_admin(settings("admin-emfile", "noop", fast_breaker()), None);
    // A limit high enough for idle clients to take every descriptor.
    settings.admin.max_connections = 1_000;
    settings.admin.request_timeout = Duration::from_secs(600);
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.broker.reconnect.max_delay = Duration::from_secs(1);
    let name = settings.broker.connection_name.clone();
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let (mut child, dir) = spawn_limited(&settings, "-n 64");
    let pid = child.id();
    let log = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(15), || log()
            .contains("consumer subscribed"))
        .await,
        "{}",
        log()
    );
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    assert!(close_connections_named(&format!("{name}/consume"), "test") >= 1);
    let refused = wait_until(Duration::from_secs(15), || {
        log().contains("Too many open files")
    })
    .await;
    assert!(
        refused,
        "the reconnect should fail for want of descriptors:\n{}",
        log()
    );
    // The idle clients leave: the next attempt gets the descriptors, and
    // nothing from the failed ones lingers.
    drop(idle);
    let back = wait_until(Duration::from_secs(20), || {
        log().contains("reconnected to the broker")
    })
    .await;
    assert!(
        back,
        "the worker reconnects once descriptors are free:\n{}",
        log()
    );
    broker.publish_json(&consumer.queue, "after", 20).await;
    let consumed = wait_until_async(Duration::from_secs(15), || async {
        broker.ready(&consumer.queue).await == 0
    })
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = child.wait().ok();
    let text = log();
    assert!(
        consumed,
        "messages are handled again after the recovery:\n{text}"
    );
    assert!(
        !text.contains("panicked"),
        "no panic, nothing poisoned:\n{text}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "a clean exit: {status:?}\n{text}"
    );
    broker.cleanup().await;
}

/// The value of `name` for `queue` in `samples`, if there is one.
fn queue_gauge(samples: &[Sample], name: &str, queue: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get("queue").map(String::as_str) == Some(queue))
        .map(|s| s.value)
}

/// `(queue_ready, scalable_backlog, concurrency_limit, ready)` and the
/// breaker `dep`'s state, as scraped.
type Gauges = (
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<String>,
);

async fn gauges(base: &str, queue: &str) -> Gauges {
    let samples = scrape(base).await;
    (
        queue_gauge(&samples, "rabbit_guard_queue_ready", queue),
        queue_gauge(&samples, "rabbit_guard_scalable_backlog", queue),
        queue_gauge(&samples, "rabbit_guard_concurrency_limit", queue),
        samples
            .iter()
            .find(|s| s.name == "rabbit_guard_ready")
            .map(|s| s.value),
        state_of(&samples, "dep"),
    )
}

/// Scrapes until `cond` holds, at most `timeout`: whether it did, and the
/// last scrape.
async fn scrape_until(
    base: &str,
    queue: &str,
    timeout: Duration,
    cond: impl Fn(&Gauges) -> bool,
) -> (bool, Gauges) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let g = gauges(base, queue).await;
        if cond(&g) {
            return (true, g);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, g);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scalable_backlog_is_the_ready_messages_while_closed_and_0_while_open() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Slow(Duration::from_millis(300)));
    let breaker = {
        let mut b = fast_breaker();
        b.consecutive_failures = Some(3);
        // Open long enough to be scraped open, however slow the machine.
        b.open_timeout = Duration::from_secs(6);
        b.max_open_timeout = Duration::from_secs(6);
        b
    };
    let (mut settings, base) = with_admin(
        with_http(settings("backlog", "http", breaker), &downstream),
        None,
    );
    settings.consumers[0].prefetch = 1;
    settings.consumers[0].concurrency = 1;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "b", 40).await;
    let running = Running::start(Worker::builder(settings)).await;
    let q = consumer.queue.as_str();
    // Closed, one handler at a time on a slow dependency: the backlog is
    // the ready messages, all of it scalable.
    let (closed, seen) = scrape_until(&base, q, Duration::from_secs(15), |g| {
        matches!(g, (Some(r), Some(s), Some(l), Some(ready), _) if *r > 0.0 && s == r && *l == 1.0 && *ready == 1.0)
    })
    .await;
    assert!(
        closed,
        "closed: (queue_ready, scalable_backlog, concurrency_limit, ready, state) should be (n > 0, n, 1, 1, closed), are {seen:?}"
    );
    eprintln!(
        "closed: (queue_ready, scalable_backlog, concurrency_limit, ready, state) = {seen:?}"
    );
    // Open: the messages wait in the queue, and scaling must not see them.
    downstream.set(Mode::Failing);
    let (open, seen) = scrape_until(&base, q, Duration::from_secs(15), |g| {
        matches!(g, (Some(r), Some(s), Some(l), Some(ready), Some(state)) if *r > 0.0 && *s == 0.0 && *l == 0.0 && *ready == 1.0 && state == "open")
    })
    .await;
    assert!(
        open,
        "open: (queue_ready, scalable_backlog, concurrency_limit, ready, state) should be (n > 0, 0, 0, 1, open), are {seen:?}; breaker {:?}",
        running.state()
    );
    eprintln!("open: (queue_ready, scalable_backlog, concurrency_limit, ready, state) = {seen:?}");
    // Back: every message handled, nothing left.
    downstream.set(Mode::Healthy);
    assert!(
        wait_until(Duration::from_secs(60), || ids
            .iter()
            .all(|id| downstream.succeeded_ids().contains(id)))
        .await,
        "every message handled after recovery: {} of {}",
        ids.iter()
            .filter(|id| downstream.succeeded_ids().contains(*id))
            .count(),
        ids.len()
    );
    let (drained, seen) = scrape_until(
        &base,
        q,
        Duration::from_secs(15),
        |g| matches!(g, (Some(r), Some(s), _, _, _) if *r == 0.0 && *s == 0.0),
    )
    .await;
    assert!(
        drained,
        "drained: queue_ready and scalable_backlog 0, are {seen:?}"
    );
    running.stop().await;
}
