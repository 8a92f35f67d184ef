//! The binary as an operator meets it: bad config, wrong password,
//! unreachable broker, mismatched queues. One clear line, non-zero exit,
//! never a panic, never the password.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rabbit_guard::lapin::options::QueueDeclareOptions;
use rabbit_guard::lapin::types::{FieldTable, ShortString};

fn write_config(text: &str) -> (Arc<tempfile::TempDir>, std::path::PathBuf) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn minimal(url: &str, queue: &str) -> String {
    format!(
        r#"
[broker]
url = "{url}"
startup_timeout = "2s"
[broker.reconnect]
initial_delay = "200ms"
max_delay = "500ms"

[breakers.dep]

[[consumers]]
queue = "{queue}"
breaker = "dep"
handler = "noop"
"#
    )
}

fn assert_clean_failure(log: &str, code: Option<i32>, must_contain: &[&str], secret: &str) {
    assert_eq!(code, Some(1), "expected exit code 1; stderr:\n{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: "),
        "last line should be the error: {last:?}\nstderr:\n{log}"
    );
    for word in must_contain {
        assert!(
            last.contains(word),
            "error line should mention {word:?}: {last}"
        );
    }
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    assert!(!log.contains("backtrace"), "no backtrace:\n{log}");
    assert!(
        !log.contains(secret),
        "the password must never appear:\n{log}"
    );
}

/// `rabbit-guard check-config` on `config`, with extra environment variables.
fn check_config(config: &str, env: &[(&str, &str)]) -> std::process::Output {
    let (_dir, path) = write_config(config);
    std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["check-config", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

async fn run_to_exit(config: &str, args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let (dir, path) = write_config(config);
    let mut child = Child::spawn_with_config(dir, &path, args);
    let status = child.wait(timeout).await;
    (status.and_then(|s| s.code()), child.stderr())
}

#[tokio::test]
async fn invalid_config_is_one_line_naming_the_key() {
    let config = minimal(&amqp_addr(), "q")
        .replace("handler = \"noop\"", "handler = \"noop\"\nprefetch = 0");
    let (code, log) = run_to_exit(&config, &["check-config"], Duration::from_secs(10)).await;
    assert_clean_failure(&log, code, &["consumers[0].prefetch", "= 0"], "guest:guest");
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    let (code, log) = run_to_exit(&config, &["run"], Duration::from_secs(10)).await;
    assert_clean_failure(&log, code, &["consumers[0].prefetch"], "guest:guest");
}

#[tokio::test]
async fn missing_config_file_says_what_to_do() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["check-config", "--config", "/nonexistent/rg.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a missing config exits 1: {err}"
    );
    assert!(
        err.contains("/nonexistent/rg.toml") && err.contains("--config"),
        "the error names the file and --config: {err}"
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown subcommand is a usage error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn check_config_prints_the_effective_config_with_the_password_masked() {
    let url = amqp_addr().replace("guest:guest", "guest:s3cret-pw");
    let out = check_config(
        &minimal(&url, "q"),
        &[("RABBIT_GUARD__CONSUMERS__0__PREFETCH", "77")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config should succeed (exit {:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("guest:***@"),
        "the password is shown masked: {text}"
    );
    assert!(
        !text.contains("s3cret-pw"),
        "the password never appears: {text}"
    );
    assert!(
        text.contains("prefetch = 77"),
        "environment override shows in the effective config: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("# warning: consumers[0]")
                && l.contains("classic work queue has no delivery limit")),
        "check-config warns that a classic work queue can loop forever: {text}"
    );
    let (dir, path) = write_config(&minimal(&url, "q"));
    let json_out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["check-config", "--json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    drop(dir);
    let v: serde_json::Value = serde_json::from_slice(&json_out.stdout).unwrap_or_else(|e| {
        panic!(
            "check-config --json prints one JSON object ({e}): {}",
            String::from_utf8_lossy(&json_out.stdout)
        )
    });
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["settings"]["broker"]["url"]
            .as_str()
            .is_some_and(|u| u.contains("guest:***@")),
        "the JSON settings are masked too: {v}"
    );
    assert!(!v.to_string().contains("s3cret-pw"), "{v}");
    assert_eq!(v["warnings"].as_array().map(Vec::len), Some(1), "{v}");
    let quorum = minimal(&url, "q").replace(
        "handler = \"noop\"",
        "handler = \"noop\"\nqueue_type = \"quorum\"\ndelivery_limit = 1000",
    );
    let out = check_config(&quorum, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("# warning") && !text.contains("# safety check"),
        "a quorum queue with a delivery limit gets no warning (exit {:?}): {text}",
        out.status.code()
    );
}

#[tokio::test]
async fn wrong_password_fails_fast_with_one_line() {
    let url = amqp_addr().replace("guest:guest", "guest:hunter2-wrong");
    let (code, log) = run_to_exit(
        &minimal(&url, &unique("pw")),
        &["run"],
        Duration::from_secs(15),
    )
    .await;
    assert_clean_failure(
        &log,
        code,
        &["refused the login", "broker.url", "guest:***@"],
        "hunter2-wrong",
    );
}

#[tokio::test]
async fn unreachable_broker_retries_then_fails_with_one_line() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("amqp://guest:p4ss-word@127.0.0.1:{port}/%2f");
    let started = std::time::Instant::now();
    let (code, log) = run_to_exit(&minimal(&url, "q"), &["run"], Duration::from_secs(20)).await;
    assert_clean_failure(
        &log,
        code,
        &["cannot reach the broker", "startup_timeout"],
        "p4ss-word",
    );
    let waiting = log
        .lines()
        .filter(|l| l.contains("waiting for the broker"))
        .count();
    assert!(
        waiting >= 2,
        "each retry is logged ({waiting} lines):\n{log}"
    );
    assert!(
        log.contains(&format!("127.0.0.1:{port}")),
        "the address is named:\n{log}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gives up after startup_timeout (2s); took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn mismatched_queue_arguments_name_the_queue_and_argument() {
    let broker = TestBroker::connect().await;
    let queue = unique("mismatch");
    broker.track_queue(&queue);
    broker.track_queue(&format!("{queue}.dlq"));
    // Someone declared the queue before, without our dead-letter arguments.
    broker
        .channel
        .queue_declare(
            ShortString::from(queue.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (code, log) = run_to_exit(
        &minimal(&amqp_addr(), &queue),
        &["run"],
        Duration::from_secs(20),
    )
    .await;
    assert_clean_failure(
        &log,
        code,
        &[
            "consumers[0]",
            &queue,
            "inequivalent arg",
            "x-dead-letter-exchange",
        ],
        "guest:guest@",
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn safety_checks_refuse_names_the_risk() {
    let queue = unique("risky");
    let config = minimal(&amqp_addr(), &queue).replace(
        "handler = \"noop\"",
        "handler = \"noop\"\nqueue_type = \"quorum\"",
    ) + "\n[worker]\nsafety_checks = \"refuse\"\n";
    let (code, log) = run_to_exit(&config, &["run"], Duration::from_secs(15)).await;
    assert_clean_failure(
        &log,
        code,
        &["refusing to start", "delivery_limit", &queue],
        "guest:guest@",
    );
    // The same check only warns by default, and check-config lists it.
    let config = config.replace("safety_checks = \"refuse\"", "safety_checks = \"warn\"");
    let out = check_config(&config, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config with safety_checks = \"warn\" should succeed (exit {:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("# safety check:") && text.contains("delivery_limit"),
        "check-config lists the safety check on delivery_limit: {text}"
    );
}

#[tokio::test]
async fn a_signal_during_startup_says_interrupted_with_the_signals_exit_code() {
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let port = common::proxy::free_port();
        let config = minimal(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), "q")
            .replace("startup_timeout = \"2s\"", "startup_timeout = \"60s\"");
        let (dir, path) = write_config(&config);
        let mut child = Child::spawn_with_config(dir, &path, &["run"]);
        assert!(
            wait_until(Duration::from_secs(15), || child
                .stderr()
                .contains("waiting for the broker"))
            .await,
            "the worker should be waiting for the broker: {}",
            child.stderr()
        );
        child.signal(signal);
        let status = child.wait(Duration::from_secs(10)).await;
        let log = child.stderr();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(code),
            "SIG{signal} while starting exits {code}: {log}"
        );
        let last = log.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: interrupted while waiting for the broker")
                && last.contains(&format!("SIG{signal}"))
                && !last.contains("cannot reach"),
            "the last line says it was interrupted, not that the broker failed: {last}"
        );
    }
}
