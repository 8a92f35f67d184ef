//! `rabbit-guard dlq`, run as an operator would, against dead letters made
//! by the real runtime.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::dlq_cli::Cli;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::{RetrySettings, Settings};
use rabbit_guard::lapin;
use rabbit_guard::lapin::BasicProperties;
use rabbit_guard::lapin::options::BasicPublishOptions;
use rabbit_guard::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|v| v["message_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn settings_for(prefix: &str) -> Settings {
    let mut s = settings(prefix, "picky", fast_breaker());
    s.consumers[0].retry =
        RetrySettings::new(vec![Duration::from_millis(100), Duration::from_millis(200)]);
    s
}

/// Runs the real worker over a mix of messages until `dead` are dead-lettered.
async fn make_dead_letters(
    broker: &TestBroker,
    settings: &Settings,
) -> HashMap<String, &'static str> {
    let q = settings.consumers[0].queue.clone();
    let mut expected = HashMap::new();
    for (kind, reason, n) in [
        ("bad", "permanent", 3),
        ("garbled", "decode", 2),
        ("flaky", "retries-exhausted", 2),
        ("boom", "panic", 1),
    ] {
        for i in 0..n {
            let id = format!("{kind}-{i}");
            let body = if kind == "garbled" {
                b"{not json".to_vec()
            } else {
                format!("{{\"kind\":\"{kind}\",\"i\":{i}}}").into_bytes()
            };
            broker.publish_raw(&q, &id, &body, "application/json").await;
            expected.insert(id, reason);
        }
    }
    let running = Running::start(Worker::builder(settings.clone()).handler("picky", Picky)).await;
    // Healthy neighbours, so the last retries are judged "otherwise healthy".
    let mut n = 0;
    let done = loop {
        if running.stats.snapshot().dead_lettered as usize == expected.len() {
            break true;
        }
        if n > 300 {
            break false;
        }
        broker
            .publish_raw(
                &q,
                &format!("ok-{n}"),
                br#"{"kind":"ok"}"#,
                "application/json",
            )
            .await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    assert!(
        done,
        "all {} expected dead letters should be made, after {n} healthy neighbours: {:?}",
        expected.len(),
        running.stats.snapshot()
    );
    running.stop().await;
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_summary_show_real_dead_letters_and_leave_the_queue_as_it_was() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings_for("dlqlist");
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let expected = make_dead_letters(&broker, &settings).await;
    let cli = Cli::new(&settings);

    let lines = cli.json(&[]);
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per dead letter: {lines:#?}"
    );
    for v in &lines {
        let id = v["message_id"].as_str().unwrap();
        assert_eq!(
            v["reason"].as_str(),
            Some(expected[id]),
            "reason of {id}: {v}"
        );
        assert_eq!(
            v["original_queue"].as_str(),
            Some(consumer.queue.as_str()),
            "original queue of {id}: {v}"
        );
        let attempts = v["attempts"].as_u64().unwrap();
        if expected[id] == "retries-exhausted" {
            assert_eq!(attempts, 3, "1 + two delay levels: {v}");
            assert!(
                v["error"].as_str().unwrap().contains("billing timed out"),
                "the last error of {id} is kept: {v}"
            );
        } else {
            assert_eq!(attempts, 1, "one attempt for {id}: {v}");
        }
        assert!(
            v["headers"]["rg-handler"] == "picky",
            "rg-handler of {id} is picky: {v}"
        );
        assert!(
            v["age_seconds"].as_u64().is_some(),
            "age of {id} in whole seconds: {v}"
        );
    }
    let garbled = lines
        .iter()
        .find(|v| v["message_id"] == "garbled-0")
        .unwrap();
    assert_eq!(
        garbled["body"], "{not json",
        "a body that is not JSON is shown as text: {garbled}"
    );

    // Browsing changes nothing: same output, same order, same headers.
    let strip = |text: String| -> Vec<String> {
        text.lines()
            .map(|l| {
                let cols: Vec<&str> = l.split("  ").filter(|c| !c.is_empty()).collect();
                // Drop the AGE column (second to last): time passes.
                let mut cols: Vec<String> = cols.iter().map(|c| c.trim().to_owned()).collect();
                if cols.len() > 2 {
                    cols.remove(cols.len() - 2);
                }
                cols.join("|")
            })
            .collect()
    };
    let first = strip(cli.ok(&["list"]));
    let second = strip(cli.ok(&["list"]));
    assert_eq!(first, second, "two lists in a row print the same");
    let again = cli.json(&[]);
    assert_eq!(ids(&again), ids(&lines), "same messages in the same order");
    for (a, b) in lines.iter().zip(&again) {
        assert_eq!(
            a["headers"], b["headers"],
            "headers of {} unchanged",
            a["message_id"]
        );
        assert_eq!(
            a["body"], b["body"],
            "body of {} unchanged",
            a["message_id"]
        );
    }

    // Filters and limit.
    let bad = cli.json(&["--reason", "permanent"]);
    assert_eq!(
        ids(&bad).len(),
        3,
        "--reason permanent selects the 3 permanent ones: {:?}",
        ids(&bad)
    );
    assert!(
        ids(&bad).iter().all(|i| i.starts_with("bad-")),
        "--reason permanent selects only bad-*: {:?}",
        ids(&bad)
    );
    assert_eq!(
        cli.json(&["--grep", "BLEW UP"]).len(),
        1,
        "grep is case-insensitive, on the error"
    );
    assert_eq!(
        cli.json(&["--grep", "not json"]).len(),
        2,
        "grep searches bodies too"
    );
    assert_eq!(cli.json(&["--limit", "2"]).len(), 2, "--limit 2 lists two");
    assert_eq!(
        cli.json(&["--since", "1h"]).len(),
        expected.len(),
        "--since 1h lists every dead letter made just now"
    );

    // Summary groups by reason and error.
    let summary = cli.ok(&["summary"]);
    let count_of = |reason: &str| -> u64 {
        summary
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(reason))
            .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(
        count_of("permanent"),
        3,
        "permanent in the summary:\n{summary}"
    );
    assert_eq!(count_of("decode"), 2, "decode in the summary:\n{summary}");
    assert_eq!(
        count_of("retries-exhausted"),
        2,
        "retries-exhausted in the summary:\n{summary}"
    );
    assert_eq!(count_of("panic"), 1, "panic in the summary:\n{summary}");
    assert!(
        summary.contains("8 selected of 8"),
        "the summary counts all 8:\n{summary}"
    );

    // Show: every header and the body, pretty JSON.
    let shown = cli.ok(&["show", "bad-1", "--utc"]);
    assert!(
        shown.contains("rg-reason: \"permanent\""),
        "show prints every header: {shown}"
    );
    assert!(
        shown.contains("\"kind\": \"bad\""),
        "pretty JSON body: {shown}"
    );
    assert!(shown.contains("+00:00"), "UTC time with offset: {shown}");
    let missing = cli.run(&["show", "nope"]);
    assert_eq!(
        missing.status.code(),
        Some(1),
        "show of an unknown id exits 1: {}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // The queue itself still holds everything, in order.
    let drained = broker.drain(&consumer.dead_letter_queue()).await;
    let drained_ids: Vec<String> = drained.iter().map(|g| g.id.clone()).collect();
    assert_eq!(drained_ids, ids(&lines), "queue order after browsing");
    broker.cleanup().await;
}

/// Publishes `n` dead letters straight into `dlq`, as the runtime writes them.
async fn publish_dead_letters(
    broker: &TestBroker,
    dlq: &str,
    original: &str,
    n: usize,
    body_size: usize,
    reason: &str,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut confirms = Vec::new();
    let filler = "x".repeat(body_size.saturating_sub(20));
    for i in 0..n {
        let id = format!("{reason}-{i}");
        let mut h = FieldTable::default();
        h.insert(
            "rg-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        h.insert(
            "rg-error".into(),
            AMQPValue::LongString(LongString::from(format!("error {}", i % 3))),
        );
        h.insert(
            "rg-original-queue".into(),
            AMQPValue::LongString(LongString::from(original)),
        );
        h.insert("rg-attempt".into(), AMQPValue::LongLongInt(3));
        h.insert(
            "rg-dead-lettered-at".into(),
            AMQPValue::LongString(LongString::from("2026-01-01T00:00:00.000Z")),
        );
        // A body the test handler accepts: replayed, it is processed.
        let body = format!("{{\"kind\":\"ok\",\"i\":{i},\"pad\":\"{filler}\"}}");
        confirms.push(
            broker
                .channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(dlq),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_message_id(ShortString::from(id.as_str()))
                        .with_content_type(ShortString::from("application/json"))
                        .with_delivery_mode(2)
                        .with_headers(h),
                )
                .await
                .unwrap(),
        );
        if confirms.len() >= 1_000 {
            for c in confirms.drain(..) {
                let confirm = c.await.unwrap();
                assert!(
                    confirm.is_ack(),
                    "the broker should confirm a dead letter published to {dlq}: {confirm:?}"
                );
            }
        }
        ids.push(id);
    }
    for c in confirms {
        let confirm = c.await.unwrap();
        assert!(
            confirm.is_ack(),
            "the broker should confirm a dead letter published to {dlq}: {confirm:?}"
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_id_reason_and_all_feeds_a_healthy_worker_with_a_loop_guard() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings_for("replay");
    let consumer = settings.consumers[0].clone();
    let (q, dlq) = (consumer.queue.clone(), consumer.dead_letter_queue());
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let mut all = publish_dead_letters(&broker, &dlq, &q, 4, 50, "permanent").await;
    all.extend(publish_dead_letters(&broker, &dlq, &q, 3, 50, "retries-exhausted").await);
    let cli = Cli::new(&settings);

    let usage = cli.run(&["replay"]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "replay without a selection is a usage error"
    );
    let dry = cli.ok(&["replay", "--reason", "permanent", "--dry-run"]);
    assert!(
        dry.contains("would replay permanent-0 -> "),
        "the dry run names what it would replay: {dry}"
    );
    assert_eq!(broker.ready(&q).await, 0, "a dry run moves nothing");

    cli.ok(&["replay", "--id", "permanent-1"]);
    cli.ok(&["replay", "--reason", "retries-exhausted"]);
    assert_eq!(broker.ready(&q).await, 4, "one by id, three by reason");
    let left = ids(&cli.json(&[]));
    assert_eq!(
        left,
        ["permanent-0", "permanent-2", "permanent-3"],
        "the DLQ holds exactly the rest, in order"
    );

    // Back in the work queue (looked at without consuming): the copies start
    // over, and a healthy worker processes them.
    let moved = cli.peek(&q);
    assert_eq!(
        ids(&moved),
        [
            "permanent-1",
            "retries-exhausted-0",
            "retries-exhausted-1",
            "retries-exhausted-2"
        ],
        "the work queue holds the replayed messages, in order"
    );
    for m in &moved {
        let (id, headers) = (&m["message_id"], &m["headers"]);
        assert_eq!(headers["rg-replays"], 1, "replay count of {id}: {headers}");
        assert!(
            headers.get("rg-reason").is_none(),
            "dead-letter headers reset: {id}: {headers}"
        );
        assert!(
            headers.get("rg-attempt").is_none(),
            "attempt count reset: {id}: {headers}"
        );
    }
    let running = Running::start(Worker::builder(settings.clone()).handler("picky", Picky)).await;
    let processed = wait_until(Duration::from_secs(10), || {
        running.stats.snapshot().succeeded == 4
    })
    .await;
    let after = running.stats.snapshot();
    running.stop().await;
    assert!(
        processed,
        "the worker should process the 4 replayed messages: {after:?}"
    );
    assert_eq!(
        (broker.ready(&q).await, broker.ready(&dlq).await),
        (0, 3),
        "(work queue, DLQ) after the worker ran"
    );

    let out = cli.run(&["replay", "--all", "--rate", "100/s"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("replayed 3 of 3"),
        "replay --all (exit {:?}): {stdout}{stderr}",
        out.status.code()
    );
    assert!(
        !format!("{stdout}{stderr}").contains(['\x1b', '\r']),
        "no progress bar when not on a terminal: {stdout:?} {stderr:?}"
    );
    assert_eq!(broker.ready(&dlq).await, 0, "--all empties the DLQ");
    assert_eq!(
        broker.ready(&q).await,
        3,
        "the three left are in the work queue"
    );

    // Loop guard: a message replayed 3 times already is refused.
    broker.drain(&q).await;
    let mut h = FieldTable::default();
    h.insert(
        "rg-original-queue".into(),
        AMQPValue::LongString(LongString::from(q.as_str())),
    );
    h.insert(
        "rg-reason".into(),
        AMQPValue::LongString(LongString::from("permanent")),
    );
    h.insert("rg-replays".into(), AMQPValue::LongLongInt(3));
    broker
        .channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(dlq.as_str()),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default()
                .with_message_id("looping".into())
                .with_headers(h),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let refused = cli.run(&["replay", "--all"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("looping") && stderr.contains("already replayed 3 times"),
        "the loop guard names the message and its replays: {stderr}"
    );
    assert_eq!(
        broker.ready(&dlq).await,
        1,
        "the refused message stays in the DLQ"
    );
    cli.ok(&["replay", "--all", "--force"]);
    assert_eq!(broker.ready(&dlq).await, 0, "--force replays it");
    let forced = broker.drain(&q).await;
    assert_eq!(
        forced[0].header_u64("rg-replays"),
        Some(4),
        "a forced replay is counted: {:?}",
        forced[0]
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_5000_message_replay_loses_nothing() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings_for("killreplay");
    let consumer = settings.consumers[0].clone();
    let (q, dlq) = (consumer.queue.clone(), consumer.dead_letter_queue());
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = publish_dead_letters(&broker, &dlq, &q, 5_000, 100, "permanent").await;
    let cli = Cli::new(&settings);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["dlq", "replay", "--all", "--config"])
        .arg(cli.path("c.toml"))
        .args(["--queue", &q])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let kill_at = 1_000 + random_below(2_000) as u32;
    let mut moved = 0;
    // A deadline, not a count of polls: a loaded machine replays slower.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline {
        moved = broker.ready(&q).await;
        if moved >= kill_at || child.try_wait().ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let finished_early = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        moved >= kill_at,
        "the replay made too little progress: {moved} moved, kill planned at {kill_at}"
    );
    assert!(
        finished_early.is_none() && moved < 5_000,
        "the kill must land mid-replay: {moved} of 5000 moved, replay exit {finished_early:?}"
    );
    // Wait for the broker to return the killed reader's unacked messages.
    let settled = wait_until_async(Duration::from_secs(15), || async {
        let total = broker.ready(&q).await + broker.ready(&dlq).await;
        total >= 5_000
    })
    .await;
    assert!(
        settled,
        "all 5000 messages should be back in a queue within 15 s: {} in the work queue, {} in the DLQ",
        broker.ready(&q).await,
        broker.ready(&dlq).await
    );
    let in_queue: Vec<String> = broker.drain(&q).await.into_iter().map(|g| g.id).collect();
    let in_dlq: Vec<String> = broker.drain(&dlq).await.into_iter().map(|g| g.id).collect();
    let a: HashSet<&String> = in_queue.iter().collect();
    let b: HashSet<&String> = in_dlq.iter().collect();
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !a.contains(id) && !b.contains(id))
        .collect();
    let both = a.intersection(&b).count();
    eprintln!(
        "replay kill: killed after {moved} moved; work queue {}, DLQ {}, in both (duplicates) {both}, lost {}",
        in_queue.len(),
        in_dlq.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_exactly_the_selection_and_needs_yes() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings_for("purge");
    let consumer = settings.consumers[0].clone();
    let (q, dlq) = (consumer.queue.clone(), consumer.dead_letter_queue());
    broker.track(&consumer);
    broker.declare(&consumer).await;
    publish_dead_letters(&broker, &dlq, &q, 5, 50, "permanent").await;
    publish_dead_letters(&broker, &dlq, &q, 4, 50, "decode").await;
    let cli = Cli::new(&settings);

    let refused = cli.run(&["purge", "--reason", "decode"]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "without --yes and a terminal: refuse"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--yes"),
        "the refusal mentions --yes: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(broker.ready(&dlq).await, 9, "nothing deleted");

    cli.ok(&["purge", "--reason", "decode", "--yes"]);
    cli.ok(&["purge", "--id", "permanent-3", "--yes"]);
    let left = ids(&cli.json(&[]));
    assert_eq!(
        left,
        ["permanent-0", "permanent-1", "permanent-2", "permanent-4"],
        "exactly the rest, in order"
    );
    cli.ok(&["purge", "--all", "--yes"]);
    assert_eq!(broker.ready(&dlq).await, 0, "--all --yes purges everything");

    // A selection spread over more messages than the reader lets the broker
    // send ahead (500): the unselected ones pile up unacked, and the reader
    // must hand over to a new consumer without skipping or reordering any.
    let all = publish_dead_letters(&broker, &dlq, &q, 1_500, 50, "many").await;
    let out = cli.ok(&["purge", "--grep", "error 1", "--yes"]);
    assert!(out.contains("deleted 500 of 1500"), "{out}");
    let left = ids(&cli.json(&[]));
    let expected: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 1)
        .map(|(_, id)| id.clone())
        .collect();
    assert_in_order(&left, &expected, "exactly the 1000 unselected left");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_round_trips_byte_for_byte() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings_for("export");
    let consumer = settings.consumers[0].clone();
    let (q, dlq) = (consumer.queue.clone(), consumer.dead_letter_queue());
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let target = unique("imported");
    broker.track_queue(&target);
    broker
        .channel
        .queue_declare(
            ShortString::from(target.as_str()),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Every header type, odd properties, a binary body.
    let mut nested = FieldTable::default();
    nested.insert("deep".into(), AMQPValue::LongInt(-5));
    let mut h = FieldTable::default();
    h.insert(
        "rg-reason".into(),
        AMQPValue::LongString(LongString::from("permanent")),
    );
    h.insert("flag".into(), AMQPValue::Boolean(true));
    h.insert("small".into(), AMQPValue::ShortShortInt(-3));
    h.insert("count".into(), AMQPValue::LongLongInt(1 << 40));
    h.insert("ratio".into(), AMQPValue::Double(0.125));
    h.insert("when".into(), AMQPValue::Timestamp(1_700_000_000));
    h.insert("table".into(), AMQPValue::FieldTable(nested));
    h.insert(
        "raw".into(),
        AMQPValue::LongString(LongString::from(vec![0u8, 159, 146, 150])),
    );
    let props = BasicProperties::default()
        .with_message_id("exported-1".into())
        .with_content_type("application/octet-stream".into())
        .with_content_encoding("gzip".into())
        .with_correlation_id("corr".into())
        .with_priority(4)
        .with_timestamp(1_700_000_123)
        .with_type("order.created".into())
        .with_app_id("shop".into())
        .with_delivery_mode(2)
        .with_headers(h);
    let body: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    broker
        .channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(dlq.as_str()),
            BasicPublishOptions::default(),
            &body,
            props.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    publish_dead_letters(&broker, &dlq, &q, 3, 40, "decode").await;
    let cli = Cli::new(&settings);
    let file = cli.path("export.jsonl");
    cli.ok(&["export", "--out", file.to_str().unwrap()]);
    assert_eq!(
        broker.ready(&dlq).await,
        4,
        "export leaves the messages in place"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["dlq", "import"])
        .arg(&file)
        .args(["--to", &target, "--config"])
        .arg(cli.path("c.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dlq import should succeed (exit {:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let originals = raw_messages(&broker, &dlq).await;
    let imported = raw_messages(&broker, &target).await;
    assert_eq!(imported.len(), 4, "all 4 exported messages are imported");
    assert_eq!(
        imported, originals,
        "properties, headers and bodies identical, in order"
    );
    assert_eq!(imported[0].0, props, "every property kept");
    assert_eq!(imported[0].1, body, "binary body kept byte for byte");
    broker.cleanup().await;
}

/// (properties, body) of every message in `queue`, in order (removes them).
async fn raw_messages(broker: &TestBroker, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
    let ch = broker.connection.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(ShortString::from(queue), Default::default())
        .await
        .unwrap()
    {
        let d = m.delivery;
        out.push((d.properties.clone(), d.data.clone()));
        d.acker.ack(Default::default()).await.unwrap();
    }
    out
}

/// Peak resident memory (kB) of a process, sampled until it exits.
async fn peak_rss_kb(mut child: std::process::Child) -> (u64, std::process::ExitStatus) {
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status.lines() {
                if let Some(v) = line.strip_prefix("VmHWM:") {
                    peak = peak.max(v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
                }
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (peak, status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `got` is `expected`, element for element (message ids in queue order).
fn assert_in_order(got: &[String], expected: &[String], what: &str) {
    let first_difference = got.iter().zip(expected).position(|(a, b)| a != b);
    assert!(
        got.len() == expected.len() && first_difference.is_none(),
        "{what}, in order: {} of {} expected, first out of place at {first_difference:?}",
        got.len(),
        expected.len()
    );
}

/// The `message_id` of a `list --json` line, without parsing all of it
/// (65 MB of JSON is slow to parse in a debug build).
fn message_id_of(line: &str) -> String {
    line.split("\"message_id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no message_id in {line}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_50000_messages_streams_in_bounded_memory() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings_for("bigdlq");
    let consumer = settings.consumers[0].clone();
    let (q, dlq) = (consumer.queue.clone(), consumer.dead_letter_queue());
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let cli = Cli::new(&settings);
    let summarize = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
            .args(["dlq", "summary", "--config"])
            .arg(cli.path("c.toml"))
            .args(["--queue", &q])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // 1 KiB bodies: holding 50,000 of them would take 50 MB.
    publish_dead_letters(&broker, &dlq, &q, 5_000, 1_024, "small").await;
    let (small, status) = peak_rss_kb(summarize()).await;
    assert!(
        status.success(),
        "dlq summary of 5,000 messages should succeed: {status}"
    );
    publish_dead_letters(&broker, &dlq, &q, 45_000, 1_024, "large").await;
    assert_eq!(
        broker.ready(&dlq).await,
        50_000,
        "50,000 dead letters published"
    );
    let child = summarize();
    let (large, status) = peak_rss_kb(child).await;
    assert!(
        status.success(),
        "dlq summary of 50,000 messages should succeed: {status}"
    );
    eprintln!("browse memory: peak RSS {small} kB for 5,000 messages, {large} kB for 50,000");
    assert!(
        large < small + 20_000,
        "memory must not grow with the queue: {small} kB for 5,000 vs {large} kB for 50,000 (1 KiB each)"
    );
    assert_eq!(
        broker.ready(&dlq).await,
        50_000,
        "summary leaves all 50,000 in place"
    );

    // A slow reader (`dlq list --json | less`): the output is not read for a
    // while, so the command blocks on stdout; the broker must not pile the
    // rest of the queue into its memory meanwhile.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["dlq", "list", "--json", "--config"])
        .arg(cli.path("c.toml"))
        .args(["--queue", &q])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let rss = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    // Unread for 3 s: enough for the whole queue to arrive if nothing holds
    // it back (it takes the broker about 1 s to send 50,000).
    let stalled_until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut stalled_peak = 0;
    while tokio::time::Instant::now() < stalled_until {
        stalled_peak = stalled_peak.max(rss());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stdout = child.stdout.take().unwrap();
    let listed = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out.lines().map(message_id_of).collect::<Vec<String>>()
    });
    let (slow_peak, status) = peak_rss_kb(child).await;
    let listed = listed.await.unwrap();
    let lines = listed.len();
    eprintln!(
        "browse memory, slow reader: peak RSS {stalled_peak} kB while stalled, {slow_peak} kB in all"
    );
    assert!(
        status.success() && lines == 50_000,
        "dlq list --json should print all 50,000: {lines} lines, {status}"
    );
    assert!(
        slow_peak.max(stalled_peak) < small + 20_000,
        "a slow reader must not make memory grow with the queue: {small} kB for a 5,000 summary, \
         {stalled_peak} kB while stalled, {slow_peak} kB in all"
    );
    let published: Vec<String> = (0..5_000)
        .map(|i| format!("small-{i}"))
        .chain((0..45_000).map(|i| format!("large-{i}")))
        .collect();
    assert_in_order(
        &listed,
        &published,
        "listed in queue order across every consumer hand-over",
    );
    // Read again: the first list put everything back where it was.
    let after: Vec<String> = cli
        .ok(&["list", "--json"])
        .lines()
        .map(message_id_of)
        .collect();
    assert_in_order(&after, &published, "list leaves all 50,000 in place");
    broker.cleanup().await;
}

/// Dead letters the broker made itself (a rejected message, an expired one),
/// without any rg-* header: listed from `x-death`, bodies that are not UTF-8
/// shown in base64; replayed to the queue named in `x-death` only with
/// `--to` (it is not this dead-letter queue's consumer, and a publisher can
/// write `x-death` too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_made_dead_letters_are_read_from_x_death() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings_for("xdeath");
    let consumer = settings.consumers[0].clone();
    let dlq = consumer.dead_letter_queue();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    // A queue of someone else's that dead-letters straight into our DLQ.
    let source = unique("xdeath-source");
    broker.track_queue(&source);
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dlq.as_str())),
    );
    broker
        .channel
        .queue_declare(ShortString::from(source.as_str()), Default::default(), args)
        .await
        .unwrap();
    let binary: &[u8] = &[0xff, 0x00, 0xfe, 0x80];
    for (id, body, expiration) in [
        ("rejected-1", &b"{\"kind\":\"ok\"}"[..], None),
        ("expired-1", binary, Some("0")),
    ] {
        let mut props = BasicProperties::default().with_message_id(ShortString::from(id));
        if let Some(e) = expiration {
            props = props.with_expiration(ShortString::from(e));
        }
        broker
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(source.as_str()),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Reject the one that did not expire.
    let got = broker
        .channel
        .basic_get(
            ShortString::from(source.as_str()),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("the unexpired message is in the source queue");
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("rejected-1"),
        "the unexpired message is the one to reject"
    );
    got.delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let arrived = wait_until_async(Duration::from_secs(10), || async {
        broker.ready(&dlq).await == 2
    })
    .await;
    assert!(
        arrived,
        "both should be dead-lettered by the broker: {} in the DLQ",
        broker.ready(&dlq).await
    );

    let cli = Cli::new(&settings);
    let listed = cli.json(&[]);
    let by_id: HashMap<String, &Value> = listed
        .iter()
        .map(|v| (v["message_id"].as_str().unwrap_or_default().to_owned(), v))
        .collect();
    for (id, reason) in [("rejected-1", "rejected"), ("expired-1", "expired")] {
        let m = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id} missing from {listed:?}"));
        assert_eq!(m["broker_reason"], reason, "{id}: {m}");
        assert_eq!(m["original_queue"], source.as_str(), "{id}: {m}");
    }
    let expired = by_id["expired-1"];
    assert!(
        expired.get("body").is_none(),
        "a binary body is not shown as text: {expired}"
    );
    assert_eq!(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            expired["body_base64"].as_str().unwrap_or("")
        )
        .ok()
        .as_deref(),
        Some(binary),
        "body_base64 decodes to the body: {expired}"
    );
    assert_eq!(
        by_id["rejected-1"]["body"], "{\"kind\":\"ok\"}",
        "a UTF-8 body is shown as text: {}",
        by_id["rejected-1"]
    );
    assert_eq!(
        ids(&cli.json(&["--reason", "expired"])),
        ["expired-1"],
        "--reason filters on the broker's reason"
    );
    let table = cli.ok(&["list"]);
    assert!(
        table.contains("rejected") && table.contains("expired"),
        "the table shows the broker's reasons:\n{table}"
    );

    let refused = cli.run(&["replay", "--all"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        refused.status.code() == Some(1)
            && stderr.contains("rejected-1")
            && stderr.contains("--to")
            && broker.ready(&dlq).await == 2,
        "x-death naming another queue than this DLQ's consumer is not followed: {stderr}"
    );
    cli.ok(&["replay", "--all", "--to", &source, "--yes"]);
    let back: Vec<String> = broker
        .drain(&source)
        .await
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(
        back,
        ids(&listed),
        "replayed to the queue x-death names, in the DLQ's order (and the expired one did not expire again)"
    );
    assert_eq!(broker.ready(&dlq).await, 0, "replay --all empties the DLQ");
    broker.cleanup().await;
}
