//! The application, built from outside rabbit-guard's repository, run as
//! its users run it: its own binary against the real broker at AMQP_ADDR.
//! Good orders are checked and announced, a stateful handler counts, a
//! message with a header nested 3,000 levels deep is dead-lettered as
//! `decode` while the good messages around it are handled, SIGTERM stops it
//! cleanly with nothing left unacked, and its command line names it.
#![allow(clippy::print_stderr)]

#[path = "../../common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::{RawProps, RawPublisher, nested_headers};
use common::*;
use rabbit_guard::config::{ConsumerSettings, RetrySettings, Settings};

const ORDERS: usize = 40;
const COUNTED: usize = 25;

fn app() -> &'static str {
    env!("CARGO_BIN_EXE_outside-app")
}

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(app())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the application binary")
}

/// A config with the two consumers, written as a user writes one, plus the
/// application's own `[app]` table.
fn config(orders: &str, counts: &str) -> (Settings, String) {
    let mut s = Settings::default();
    s.broker.url = amqp_addr().into();
    s.broker.connection_name = unique("outside-app");
    s.worker.shutdown_grace = Duration::from_secs(5);
    s.breakers.insert("dep".into(), fast_breaker());
    for (queue, handler) in [(orders, "check-orders"), (counts, "count")] {
        s.consumers.push(
            ConsumerSettings::new(queue, handler)
                .with_breaker("dep")
                .with_retry(RetrySettings::new([Duration::from_millis(500)])),
        );
    }
    let text = format!(
        "{}\n[app]\nlabel = \"seen\"\n",
        toml::to_string(&s).expect("settings print as TOML")
    );
    (s, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_handles_dead_letters_and_stops_cleanly() {
    let broker = TestBroker::connect().await;
    let (orders, counts) = (unique("app-orders"), unique("app-counts"));
    let (settings, text) = config(&orders, &counts);
    for c in &settings.consumers {
        broker.track(c);
        broker.declare(c).await;
    }
    let (checked, counted) = (format!("{orders}.checked"), format!("{counts}.counted"));
    // The application declares these itself (its setup), before it consumes.
    for q in [&checked, &counted] {
        broker.track_queue(q);
    }

    // Before the worker starts: good orders with the deep one among them, a
    // bad one, one that is not JSON, and messages to count.
    let order = |i: usize| format!(r#"{{"id": {i}, "amount_cents": 100}}"#);
    for i in 0..ORDERS / 2 {
        broker
            .publish_raw(
                &orders,
                &format!("order-{i}"),
                order(i).as_bytes(),
                "application/json",
            )
            .await;
    }
    let mut raw = RawPublisher::connect(&amqp_addr()).expect("raw AMQP login");
    raw.publish(
        &orders,
        &RawProps {
            message_id: Some(b"deep".to_vec()),
            headers: Some(nested_headers(3_000)),
            ..RawProps::default()
        },
        br#"{"id": 0, "amount_cents": 1}"#,
    )
    .expect("the broker takes the deep message");
    raw.close();
    broker
        .publish_raw(
            &orders,
            "negative",
            br#"{"id": 1, "amount_cents": -5}"#,
            "application/json",
        )
        .await;
    broker
        .publish_raw(&orders, "not-json", b"<order/>", "text/xml")
        .await;
    for i in ORDERS / 2..ORDERS {
        broker
            .publish_raw(
                &orders,
                &format!("order-{i}"),
                order(i).as_bytes(),
                "application/json",
            )
            .await;
    }
    for i in 0..COUNTED {
        broker
            .publish_raw(
                &counts,
                &format!("count-{i}"),
                format!("m{i}").as_bytes(),
                "text/plain",
            )
            .await;
    }

    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path = dir.path().join("app.toml");
    std::fs::write(&path, &text).unwrap();
    let mut child = Child::spawn_with_config(dir, &path, &["run"]);

    let expected_dead = 3;
    let dlq = settings.consumers[0].dead_letter_queue();
    let ready = |q: String| {
        let broker = &broker;
        async move { broker.ready_if_exists(&q).await.unwrap_or(0) as usize }
    };
    let settled = wait_until_async(Duration::from_secs(30), || async {
        ready(checked.clone()).await >= ORDERS
            && ready(counted.clone()).await >= COUNTED
            && ready(dlq.clone()).await >= expected_dead
    })
    .await;
    let (checked_n, counted_n, dead_n) = (
        ready(checked.clone()).await,
        ready(counted.clone()).await,
        ready(dlq.clone()).await,
    );
    assert!(
        settled,
        "{checked_n} of {ORDERS} orders announced, {counted_n} of {COUNTED} counted, {dead_n} of {expected_dead} dead-lettered within 30 s; stderr:\n{}",
        child.stderr()
    );

    child.signal("TERM");
    let status = child.wait(Duration::from_secs(15)).await;
    let stderr = child.stderr();
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops the application cleanly (exit 0): {status:?}; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "no panic in the application's output:\n{stderr}"
    );
    let (orders_left, counts_left) = (broker.ready(&orders).await, broker.ready(&counts).await);
    assert_eq!(
        (orders_left, counts_left),
        (0, 0),
        "nothing is back in the work queues after the clean stop (every ack reached the broker)"
    );

    let dead = broker.drain(&dlq).await;
    let reason_of = |id: &str| {
        dead.iter()
            .find(|g| g.id == id)
            .and_then(|g| g.header_str("rg-reason"))
    };
    assert_eq!(reason_of("deep").as_deref(), Some("decode"), "{dead:?}");
    assert_eq!(reason_of("negative").as_deref(), Some("permanent"));
    assert_eq!(reason_of("not-json").as_deref(), Some("decode"));
    assert_eq!(dead.len(), expected_dead, "dead letters: {dead:?}");
    let counted_bodies: Vec<String> = broker
        .drain(&counted)
        .await
        .into_iter()
        .map(|g| String::from_utf8_lossy(&g.body).into_owned())
        .collect();
    assert!(
        counted_bodies.len() == COUNTED
            && counted_bodies
                .iter()
                .any(|b| b.starts_with(&format!("seen {COUNTED}: "))),
        "the stateful handler counted all {COUNTED} with the [app] label: {counted_bodies:?}"
    );
    let announced = broker.drain(&checked).await.len();
    assert_eq!(
        announced, ORDERS,
        "every good order was announced once (the deep one among them was not handled)"
    );
    broker.cleanup().await;
}

#[test]
fn the_command_line_is_the_applications_own() {
    let help = run(&["--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Checks and counts orders") && help.contains("outside-app"),
        "{help}"
    );
    for tool in ["demo", "flaky-server", "publish"] {
        assert!(
            !help.lines().any(|l| l.trim_start().starts_with(tool)),
            "`{tool}` is rabbit-guard's, not offered by an application that did not ask for it:\n{help}"
        );
        let out = run(&[tool]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "`outside-app {tool}` is refused as an unknown command"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("unrecognized subcommand"), "{stderr}");
    }
    let completions = run(&["help", "completions"]);
    let text = String::from_utf8_lossy(&completions.stdout);
    assert!(
        text.contains("outside-app completions bash") && !text.contains("rabbit-guard"),
        "help texts name the application's binary: {text}"
    );
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/app.toml");
    let checked = run(&["check-config", "--config", config]);
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success() && out.contains("configuration OK: 2 consumer(s), 1 breaker(s)"),
        "the README's app.toml is valid for the application: {out}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let version = run(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("outside-app {}", env!("CARGO_PKG_VERSION"))
    );
}
