//! Embedding rabbit-guard in an application: its own `[app]` settings from
//! files and environment (typed, checked, masked), an async setup that runs
//! once, plain async handlers with shared state, publishing and replying
//! from a handler, and an application binary with its own name.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::{ConfigError, RetrySettings, Sources, load_with};
use rabbit_guard::handler::{Context, handler_fn, with_state};
use rabbit_guard::lapin::BasicProperties;
use rabbit_guard::lapin::options::BasicPublishOptions;
use rabbit_guard::lapin::types::{FieldTable, ShortString};
use rabbit_guard::secret::Secret;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AppSettings {
    pool_size: u32,
    database: Database,
    #[serde(default)]
    greeting: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Database {
    host: String,
    password: Secret,
}

/// A config directory with a valid worker config and `app` as its `[app]` table.
fn config_dir(queue: &str, app: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("default.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[broker]
url = "{}"

[breakers.dep]
minimum_calls = 10

[[consumers]]
queue = "{queue}"
breaker = "dep"
handler = "mine"
retry.delays = ["300ms"]

{app}
"#,
            amqp_addr()
        ),
    )
    .unwrap();
    (dir, file)
}

fn sources(file: &Path, env: &[(&str, &str)]) -> Sources {
    Sources {
        file: Some(file.to_owned()),
        run_mode: None,
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

const APP: &str = r#"
[app]
pool_size = 4

[app.database]
host = "db.internal"
password = "file-secret-1x9"
"#;

#[test]
fn app_settings_come_from_the_file_and_the_environment_typed_and_masked() {
    let (_dir, file) = config_dir("q", APP);
    let env = [
        ("RABBIT_GUARD__APP__POOL_SIZE", "7"),
        ("RABBIT_GUARD__APP__DATABASE__PASSWORD", "env-secret-7q2"),
    ];
    let (settings, app) = load_with::<AppSettings>(&sources(&file, &env), &["mine"])
        .expect("a valid config with an [app] table");
    assert_eq!(
        app.pool_size, 7,
        "the variable (text) overrides the file as a number"
    );
    assert_eq!(app.database.host, "db.internal");
    assert_eq!(app.database.password.expose(), "env-secret-7q2");
    assert_eq!(app.greeting, "", "a default for a missing key");
    assert_eq!(settings.consumers[0].handler, "mine");
    for shown in [
        format!("{app:?}"),
        format!("{settings:?}"),
        format!("{:?}", settings.redacted()),
        toml::to_string(&settings.redacted()).unwrap(),
    ] {
        assert!(
            !shown.contains("env-secret-7q2") && !shown.contains("file-secret-1x9"),
            "the app's secret is never printed: {shown}"
        );
    }

    // A value that does not fit: the key is named, the value is not printed.
    let err = load_with::<AppSettings>(
        &sources(&file, &[("RABBIT_GUARD__APP__POOL_SIZE", "lots-of-them")]),
        &["mine"],
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, ConfigError::App { key, .. } if key == "app.pool_size"),
        "{err:?}"
    );
    assert!(!text.contains("lots-of-them"), "{text}");
    // A key the application does not have (its type denies unknown fields).
    let (_dir2, file2) = config_dir("q", &format!("{APP}\n[app.cache]\nsize = 1\n"));
    let err = load_with::<AppSettings>(&sources(&file2, &[]), &["mine"]).unwrap_err();
    assert!(err.to_string().contains("cache"), "{err}");
    // The worker's own keys are still checked: [app] is no loophole.
    let (_dir3, file3) = config_dir("q", &format!("{APP}\n[worker]\nthreds = 2\n"));
    let err = load_with::<AppSettings>(&sources(&file3, &[]), &["mine"]).unwrap_err();
    assert!(err.to_string().contains("worker.threds"), "{err}");
    // An application table elsewhere is refused with what to do instead.
    let (_dir4, file4) = config_dir("q", "[payments]\nkey = 1\n");
    let err = load_with::<AppSettings>(&sources(&file4, &[]), &["mine"]).unwrap_err();
    assert!(
        err.to_string().contains("payments") && err.to_string().contains("under [app]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_setup_runs_once_with_the_loaded_settings_and_state_is_shared() {
    let broker = TestBroker::connect().await;
    let queue = unique("embed-setup");
    let (_dir, file) = config_dir(&queue, APP);
    let (settings, _) = load_with::<AppSettings>(&sources(&file, &[]), &["mine"]).unwrap();
    broker.track(&settings.consumers[0]);
    let queue = settings.consumers[0].queue.clone();
    let setups = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));

    let ran = setups.clone();
    let state = handled.clone();
    let builder = Worker::builder(settings)
        .setup(|worker| async move {
            ran.fetch_add(1, Ordering::SeqCst);
            // What a real setup does: read its settings, open a resource.
            let app: AppSettings = worker.settings().app.read()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let pool = Arc::new((app.database.host, state));
            Ok(
                    worker.handler(
                        "mine",
                        with_state(
                            pool,
                            |pool: Arc<(String, Arc<AtomicUsize>)>,
                             _body: Vec<u8>,
                             _ctx: Context| async move {
                                assert_eq!(pool.0, "db.internal");
                                pool.1.fetch_add(1, Ordering::SeqCst);
                                Ok(())
                            },
                        ),
                    ),
                )
        })
        .await
        .expect("setup succeeds");
    let running = Running::start(builder).await;
    broker.publish_json(&queue, "m", 20).await;
    let done = wait_until(Duration::from_secs(10), || {
        running.stats.snapshot().succeeded == 20
    })
    .await;
    running.stop().await;
    assert!(done, "20 messages handled");
    assert_eq!(setups.load(Ordering::SeqCst), 1, "the setup ran once");
    assert_eq!(
        handled.load(Ordering::SeqCst),
        20,
        "every call shared the setup's state"
    );

    // A failing setup is an error that names it.
    let (settings, _) = load_with::<AppSettings>(&sources(&file, &[]), &["mine"]).unwrap();
    let err = Worker::builder(settings)
        .setup(|_worker| async move {
            Err::<rabbit_guard::WorkerBuilder, _>(
                "cannot connect to postgres://app:pg-pass-55@db/app".into(),
            )
        })
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("setup failed: cannot connect"), "{text}");
    assert!(
        !text.contains("pg-pass-55"),
        "a URL's password is masked: {text}"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_replies_to_an_rpc_request_with_its_correlation_id() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("embed-reply", "replier", fast_breaker());
    settings.consumers[0].retry = RetrySettings::new(vec![Duration::from_millis(300)]);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let replies = unique("embed-replies");
    broker.track_queue(&replies);
    broker.declare_queue(&replies, FieldTable::default()).await;
    let channel = broker.connection.create_channel().await.unwrap();

    let handler = handler_fn(|body: String, ctx: Context| async move {
        let answer = format!("charged {body}");
        ctx.reply(answer.as_bytes(), BasicProperties::default())
            .await
    });
    let running = Running::start(Worker::builder(settings).handler("replier", handler)).await;
    for (id, reply_to) in [("req-1", Some(replies.as_str())), ("req-2", None)] {
        let mut props = BasicProperties::default()
            .with_message_id(id.into())
            .with_correlation_id(format!("corr-{id}").as_str().into());
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(consumer.queue.as_str()),
                BasicPublishOptions::default(),
                format!("order {id}").as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let done = wait_until(Duration::from_secs(10), || {
        let s = running.stats.snapshot();
        s.succeeded == 1 && s.dead_lettered == 1
    })
    .await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert!(
        done,
        "one reply sent, one request without reply_to dead-lettered: {stats:?}"
    );
    let got = broker.drain(&replies).await;
    assert_eq!(got.len(), 1, "exactly one reply: {got:?}");
    assert_eq!(got[0].body, b"charged order req-1");
    let dlq = broker.drain(&consumer.dead_letter_queue()).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].id, "req-2");
    assert!(
        dlq[0]
            .header_str("rg-error")
            .unwrap_or_default()
            .contains("no reply_to"),
        "{:?}",
        dlq[0].header_str("rg-error")
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_fails_is_a_transient_error_and_nothing_is_lost() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("embed-publish", "publisher", fast_breaker());
    // One message at a time: a publish to a missing exchange closes the
    // publishing channel, and a copy of another message stored on it at that
    // moment would be returned and redelivered (nothing lost, but the
    // counts below would vary).
    settings.consumers[0].concurrency = 1;
    settings.consumers[0].prefetch = 1;
    settings.consumers[0].retry = RetrySettings::new(vec![Duration::from_millis(300)]);
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let out = unique("embed-out");
    broker.track_queue(&out);
    broker.declare_queue(&out, FieldTable::default()).await;
    let missing_exchange = unique("embed-no-such-exchange");
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let out_queue = out.clone();
    let handler = handler_fn(move |body: Vec<u8>, ctx: Context| {
        let (seen, out_queue, missing) =
            (seen.clone(), out_queue.clone(), missing_exchange.clone());
        async move {
            // Attempt 1 publishes to an exchange that does not exist (the
            // broker closes the channel); attempt 2 to a queue that does.
            let result = if ctx.attempt() == 1 {
                ctx.publish(&missing, "x", &body, BasicProperties::default())
                    .await
            } else {
                ctx.publish("", &out_queue, &body, BasicProperties::default())
                    .await
            };
            if let Err(e) = &result {
                seen.lock().unwrap().push((e.is_transient(), e.to_string()));
            }
            result
        }
    });
    let running = Running::start(Worker::builder(settings).handler("publisher", handler)).await;
    broker.publish_json(&consumer.queue, "p", 5).await;
    let done = wait_until(Duration::from_secs(15), || {
        running.stats.snapshot().succeeded == 5
    })
    .await;
    let stats = running.stats.snapshot();
    let by_level = running.stats.delayed_by_level();
    running.stop().await;
    assert!(
        done,
        "each message is published on its second attempt: {stats:?}"
    );
    let errors = errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 5, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|(transient, text)| *transient && text.contains("publishing to exchange")),
        "a failed publish is a transient error naming where it went: {errors:?}"
    );
    assert_eq!(
        stats.failed, 5,
        "each counted against the breaker: {stats:?}"
    );
    assert_eq!(by_level, [5], "each retried once through the delay level");
    let published = broker.drain(&out).await;
    assert_eq!(
        published.len(),
        5,
        "every message published once, on attempt 2"
    );
    assert_eq!(broker.ready(&consumer.queue).await, 0);
    assert_eq!(broker.ready(&consumer.dead_letter_queue()).await, 0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_publishing_to_a_missing_exchange_leave_the_workers_copies_alone() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("embed-publish-many", "publisher", fast_breaker());
    // Eight at a time: while one handler's publish is refused, other
    // messages' retry copies are waiting for their confirms.
    settings.consumers[0].concurrency = 8;
    settings.consumers[0].prefetch = 50;
    settings.consumers[0].retry = RetrySettings::new(vec![Duration::from_millis(300)]);
    settings.breakers.get_mut("dep").unwrap().minimum_calls = 1_000;
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let missing_exchange = unique("embed-no-such-exchange");
    let refused = Arc::new(AtomicUsize::new(0));
    let seen = refused.clone();
    let handler = handler_fn(move |body: Vec<u8>, ctx: Context| {
        let (seen, missing) = (seen.clone(), missing_exchange.clone());
        async move {
            if ctx.attempt() > 1 {
                return Ok(());
            }
            let result = ctx
                .publish(&missing, "x", &body, BasicProperties::default())
                .await;
            if result.is_err() {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            result
        }
    });
    let running = Running::start(Worker::builder(settings).handler("publisher", handler)).await;
    let n = 80;
    broker.publish_json(&consumer.queue, "m", n).await;
    let done = wait_until(Duration::from_secs(30), || {
        running.stats.snapshot().succeeded == n as u64
    })
    .await;
    let stats = running.stats.snapshot();
    let by_level = running.stats.delayed_by_level();
    running.stop().await;
    assert!(
        done,
        "every message succeeds on its second attempt: {stats:?}"
    );
    // What a channel of their own guarantees: the worker's copies never
    // fail. Whether a message is redelivered is not: now and then (1 run in
    // 5 on RabbitMQ 4) lapin takes the broker's close of the handlers'
    // channel down with the whole publishing connection, and the consumer
    // starts over (nothing lost; counted as redelivered).
    eprintln!(
        "refused publishes {}, copy failures {}, redelivered {}",
        refused.load(Ordering::SeqCst),
        stats.publish_failures,
        stats.redelivered
    );
    assert_eq!(
        stats.publish_failures, 0,
        "a handler's refused publish failed none of the worker's copies: {stats:?}"
    );
    assert!(
        by_level.len() == 1 && by_level[0] >= n as u64,
        "each message retried through the delay level: {by_level:?} {stats:?}"
    );
    assert!(
        refused.load(Ordering::SeqCst) >= n,
        "each first publish refused: {}",
        refused.load(Ordering::SeqCst)
    );
    assert_eq!(broker.ready(&consumer.dead_letter_queue()).await, 0);
    broker.cleanup().await;
}

/// The example application's binary, built by `cargo test` beside this test.
fn payments_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("examples").join("payments");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with cargo test, which builds the examples",
        bin.display()
    );
    bin
}

#[test]
fn an_application_binary_has_its_own_name_and_checks_its_app_settings() {
    let bin = payments_binary();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(args).env_remove("RUN_MODE").env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = run(&["--version"], &[]);
    assert_eq!(code, Some(0));
    assert_eq!(
        stdout.trim(),
        format!("payments {}", env!("CARGO_PKG_VERSION")),
        "--version names the application"
    );
    let (_, help, _) = run(&["--help"], &[]);
    assert!(
        help.starts_with("Charges orders") && help.contains("Usage: payments"),
        "{help}"
    );

    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/payments.toml");
    let config = config.to_str().unwrap();
    let (code, stdout, stderr) = run(
        &["--config", config, "check-config"],
        &[("RABBIT_GUARD__APP__API_KEY", "key-from-env-3k")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("# [app]"), "{stdout}");
    assert!(
        !stdout.contains("key-from-env-3k") && !stdout.contains("change-me"),
        "the app's key is not printed: {stdout}"
    );
    let (code, _, stderr) = run(
        &["--config", config, "check-config"],
        &[("RABBIT_GUARD__APP__TIMEOUT", "soon")],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("app.timeout") && !stderr.contains("soon"),
        "check-config reads [app] as the application does: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_cannot_be_delivered_is_not_retried_and_does_not_charge_the_breaker() {
    let broker = TestBroker::connect().await;
    let mut settings = settings("embed-noreply", "replier", fast_breaker());
    // With these delays a transient error would be retried within the test.
    settings.consumers[0].retry = RetrySettings::new(vec![Duration::from_millis(200)]);
    settings.consumers[0].reply_to_prefixes =
        vec!["amq.rabbitmq.reply-to".into(), "rgtest.".into()];
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = calls.clone();
    let handler = handler_fn(move |_: String, ctx: Context| {
        let counted = counted.clone();
        async move {
            // The work a reply follows (a payment): it must not be repeated.
            counted.fetch_add(1, Ordering::Relaxed);
            ctx.reply(b"done", BasicProperties::default()).await
        }
    });
    let running = Running::start(Worker::builder(settings).handler("replier", handler)).await;
    let channel = broker.connection.create_channel().await.unwrap();
    let gone = unique("embed-requester-gone"); // no such queue: unroutable
    for (id, reply_to) in [("gone", gone.as_str()), ("elsewhere", "admin-commands")] {
        channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(consumer.queue.as_str()),
                BasicPublishOptions::default(),
                b"request",
                BasicProperties::default()
                    .with_message_id(id.into())
                    .with_reply_to(reply_to.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dlq = consumer.dead_letter_queue();
    let settled = wait_until_async(Duration::from_secs(10), || async {
        broker.ready(&dlq).await == 2
    })
    .await;
    // Longer than the retry delay: a retried request would have come back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stats = running.stats.snapshot();
    let failures = running.breaker.snapshot().counts.failures;
    running.stop().await;
    assert!(settled, "both requests dead-lettered: {stats:?}");
    assert_eq!(
        (calls.load(Ordering::Relaxed), stats.retried, failures),
        (2, 0, 0),
        "(handler calls, retries, failures charged to the breaker): each request handled once"
    );
    let dead = broker.drain(&dlq).await;
    let error = |id: &str| {
        let d = dead
            .iter()
            .find(|d| d.id == id)
            .unwrap_or_else(|| panic!("{id}: {dead:?}"));
        (
            d.header_str("rg-reason").unwrap_or_default(),
            d.header_str("rg-error").unwrap_or_default(),
        )
    };
    let (reason, text) = error("gone");
    assert!(
        reason == "permanent"
            && text.contains("was not delivered")
            && text.contains("could not be routed"),
        "an unroutable reply: {reason}: {text}"
    );
    let (reason, text) = error("elsewhere");
    assert!(
        reason == "permanent" && text.contains("not allowed") && text.contains("admin-commands"),
        "a reply_to outside reply_to_prefixes is never published to: {reason}: {text}"
    );
    broker.cleanup().await;
}
