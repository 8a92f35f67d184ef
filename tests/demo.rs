//! `rabbit-guard demo`, non-interactively: it must finish in under a
//! minute, print plain progress lines, report nothing lost, and remove its
//! queues (also when interrupted).
#![allow(clippy::print_stderr)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use rabbit_guard::lapin;
use rabbit_guard::lapin::options::QueueDeclareOptions;
use rabbit_guard::lapin::types::{FieldTable, ShortString};

async fn queue_exists(broker: &TestBroker, name: &str) -> bool {
    let ch = broker.connection.create_channel().await.unwrap();
    let found = ch
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = ch.close(200, "ok".into()).await;
    found
}

async fn exchange_exists(broker: &TestBroker, name: &str) -> bool {
    let ch = broker.connection.create_channel().await.unwrap();
    let found = ch
        .exchange_declare(
            ShortString::from(name),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = ch.close(200, "ok".into()).await;
    found
}

/// Kills the demo if a test fails before it exits (disarmed once it has
/// exited, so a reused pid is never hit).
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Runs the demo (3 s healthy, 6 s failing) with `extra` arguments to its
/// end; its pid and output.
async fn run_demo(extra: &[&str]) -> (u32, std::process::Output) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args([
            "demo",
            "--config",
            "/nonexistent/rg.toml",
            "--url",
            &amqp_addr(),
        ])
        .args(["--healthy-for", "3s", "--fail-for", "6s"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut kill = KillOnDrop(Some(pid));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .unwrap_or_else(|_| panic!("the demo did not finish within 120 s"))
    .unwrap()
    .unwrap();
    kill.0 = None;
    (pid, out)
}

fn demo_queues(pid: u32) -> Vec<String> {
    let q = format!("rabbit-guard-demo.{pid}.orders");
    vec![
        q.clone(),
        format!("{q}.dlq"),
        format!("{q}.delay.1s"),
        format!("{q}.delay.3s"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_to_completion_under_a_minute_and_cleans_up() {
    let broker = TestBroker::connect().await;
    let started = Instant::now();
    let (pid, out) = run_demo(&[]).await;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(60), "the demo took {took:?}");
    assert!(
        !stdout.contains("\x1b["),
        "no screen control codes when stdout is not a terminal: {} found",
        stdout.matches("\x1b[").count()
    );
    let progress = stdout.lines().filter(|l| l.contains("breaker")).count();
    assert!(
        progress >= 5,
        "at least 5 periodic plain lines, got {progress}: {stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.contains("OPEN")),
        "the breaker opened: {stdout}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains("0 dead-lettered and 0 lost"),
        "the summary reports nothing dead-lettered or lost: {summary}"
    );
    assert!(
        summary.contains("0 calls to the dependency while open"),
        "the summary reports no calls while open: {summary}"
    );
    for q in demo_queues(pid) {
        assert!(
            !queue_exists(&broker, &q).await,
            "demo queue {q} was left behind"
        );
    }
    let dlx = format!("{}.dlx", demo_queues(pid)[0]);
    assert!(
        !exchange_exists(&broker, &dlx).await,
        "demo exchange {dlx} was left behind"
    );
    eprintln!("demo: {took:?}\n{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_demo_still_removes_its_queues() {
    let broker = TestBroker::connect().await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args([
            "demo",
            "--config",
            "/nonexistent/rg.toml",
            "--url",
            &amqp_addr(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut kill = KillOnDrop(Some(pid));
    let queue = demo_queues(pid)[0].clone();
    assert!(
        wait_until_async(Duration::from_secs(15), || queue_exists(&broker, &queue)).await,
        "the demo should declare its queue {queue} within 15 s"
    );
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -INT {pid} failed: {status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the demo (pid {pid}) did not stop within 30 s of Ctrl-C"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill.0 = None;
    for q in demo_queues(pid) {
        assert!(
            !queue_exists(&broker, &q).await,
            "demo queue {q} was left behind after Ctrl-C"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_fleet_of_three_pauses_together_and_cleans_up() {
    let broker = TestBroker::connect().await;
    let (pid, out) = run_demo(&["--workers", "3"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every worker's breaker opens together: a line with three OPENs.
    assert!(
        stdout.lines().any(|l| l.contains("OPEN | OPEN | OPEN")),
        "the three workers' breakers were open together: {stdout}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains("3 workers formed a fleet"),
        "the summary names the fleet: {summary}"
    );
    assert!(
        summary.contains("0 dead-lettered and 0 lost")
            && summary.contains("0 calls to the dependency while open"),
        "nothing lost, no calls while open: {summary}"
    );
    for q in demo_queues(pid) {
        assert!(
            !queue_exists(&broker, &q).await,
            "demo queue {q} was left behind"
        );
    }
    let fleet = format!("rabbit-guard-demo.{pid}.fleet");
    assert!(
        !exchange_exists(&broker, &fleet).await,
        "demo fleet exchange {fleet} was left behind"
    );
    eprintln!("demo --workers 3:\n{summary}");
}
