//! `rabbit-guard dlq` against dead letters a hostile publisher shaped:
//! replay goes only where the broker or the config says, import survives
//! lines the broker refuses, export never clobbers or leaks a file, and
//! terminal output escapes control characters.
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::dlq_cli::Cli;
use common::*;
use rabbit_guard::lapin;
use rabbit_guard::lapin::options::{BasicGetOptions, BasicRejectOptions};
use rabbit_guard::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn publish(broker: &TestBroker, queue: &str, id: &str, headers: FieldTable, body: &[u8]) {
    broker.publish_with_headers(queue, id, headers, body).await;
}

fn out(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_follows_a_queue_named_only_by_a_publishers_header() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings("forge", "noop", fast_breaker());
    let consumer = settings.consumers[0].clone();
    let (work, dlq) = (consumer.queue.clone(), consumer.dead_letter_queue());
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let victim = unique("forge-victim");
    broker.track_queue(&victim);
    broker.counts(&work).await;
    broker
        .channel
        .queue_declare(
            ShortString::from(victim.as_str()),
            lapin::options::QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // 1. Published to the work queue claiming another origin, then
    //    dead-lettered by the broker (rejected): x-death names the truth.
    let mut forged = FieldTable::default();
    forged.insert("rg-original-queue".into(), text(&victim));
    forged.insert("rg-reason".into(), text("permanent"));
    publish(&broker, &work, "via-broker", forged.clone(), b"{}").await;
    let got = broker
        .channel
        .basic_get(ShortString::from(work.as_str()), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the forged message is in the work queue");
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    // 2. Published straight into the dead-letter queue with the same claim.
    publish(&broker, &dlq, "straight-in", forged, b"{}").await;
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            broker.ready(&dlq).await == 2
        })
        .await,
        "both forged messages should be in {dlq}: {}",
        broker.ready(&dlq).await
    );

    let cli = Cli::new(&settings);
    let shown = cli.ok(&["show", "straight-in"]);
    assert!(
        shown.contains("NOT VERIFIED")
            && shown.contains(&format!("rg-original-queue: \"{victim}\"  [publisher]")),
        "dlq show marks the claimed queue and its header as unverified:\n{shown}"
    );
    let shown = cli.ok(&["show", "via-broker"]);
    assert!(
        shown.contains(&format!(
            "{work} (x-death, and this dead-letter queue's consumer)"
        )) && shown.contains("rg-reason: \"permanent\"  [publisher]"),
        "a broker-made dead letter's rg-* headers came from its publisher:\n{shown}"
    );

    let replay = cli.run(&["replay", "--all"]);
    assert_eq!(
        replay.status.code(),
        Some(1),
        "one message could not be moved: {}",
        out(&replay)
    );
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert!(
        stderr.contains("straight-in") && stderr.contains("--to"),
        "the refused message is listed with what to do: {}",
        out(&replay)
    );
    assert_eq!(
        broker.ready(&victim).await,
        0,
        "nothing reached the queue only a header named"
    );
    let back = broker.drain(&work).await;
    assert_eq!(
        back.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        ["via-broker"],
        "the broker-dead-lettered one went back to the queue x-death names"
    );
    assert_eq!(
        broker.ready(&dlq).await,
        1,
        "the refused one stays in the DLQ"
    );

    // --to a queue that is not the consumer's needs a confirmation.
    let unconfirmed = cli.run(&["replay", "--all", "--to", &victim]);
    assert_eq!(
        unconfirmed.status.code(),
        Some(2),
        "no terminal, no --yes: {}",
        out(&unconfirmed)
    );
    assert_eq!(
        broker.ready(&victim).await,
        0,
        "nothing moved without the confirmation"
    );
    let confirmed = cli.run(&["replay", "--all", "--to", &victim, "--yes"]);
    assert!(confirmed.status.success(), "{}", out(&confirmed));
    assert_eq!(
        broker.ready(&victim).await,
        1,
        "--to with --yes moves it where the operator said"
    );
    assert_eq!(broker.ready(&dlq).await, 0);

    // Named with --dlq, the queue's consumer is still found in the config.
    let mut plain = FieldTable::default();
    plain.insert("rg-reason".into(), text("permanent"));
    publish(&broker, &dlq, "no-claim", plain, b"{}").await;
    let r = cli.run_bare(&["replay", "--all", "--dlq", &dlq]);
    assert!(r.status.success(), "{}", out(&r));
    assert_eq!(
        broker.drain(&work).await.len(),
        1,
        "a dead letter without a claim goes to the consumer's queue of this DLQ"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_goes_on_past_lines_the_broker_refuses_and_lists_each() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings("import", "noop", fast_breaker());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let target = consumer.queue.clone();
    let good = |id: &str| {
        format!(
            r#"{{"properties":{{"message_id":"{id}","delivery_mode":2}},"body_base64":"e30="}}"#
        )
    };
    let lines = [
        good("first"),
        // The broker closes the channel on an expiration that is no number.
        r#"{"properties":{"message_id":"bad-expiration","expiration":"soon"},"body_base64":"e30="}"#.to_owned(),
        good("after-the-close"),
        format!(r#"{{"properties":{{"message_id":"{}"}},"body_base64":"e30="}}"#, "x".repeat(300)),
        "not json".to_owned(),
        String::new(),
        good("last"),
    ];
    let cli = Cli::new(&settings);
    let file = cli.path("import.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let r = cli.run_bare(&["import", file.to_str().unwrap(), "--to", &target]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "some lines failed: {}", out(&r));
    for (line, why) in [
        ("line 2", "expiration"),
        ("line 4", "300 bytes"),
        ("line 5", "not JSON"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(line) && l.contains(why)),
            "{line} is listed with why ({why}): {}",
            out(&r)
        );
    }
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("imported 3 messages"),
        "{}",
        out(&r)
    );
    let got: Vec<String> = broker
        .drain(&target)
        .await
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(
        got,
        ["first", "after-the-close", "last"],
        "every good line is imported, in order, the ones after the refused line too"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_checks_first_never_clobbers_and_writes_for_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings("export", "noop", fast_breaker());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let dlq = consumer.dead_letter_queue();
    publish(
        &broker,
        &dlq,
        "exported-1",
        FieldTable::default(),
        b"{\"secret\":1}",
    )
    .await;
    let cli = Cli::new(&settings);

    let existing = cli.path("existing.jsonl");
    std::fs::write(&existing, "keep me\n").unwrap();
    let r = cli.run(&["export", "--out", existing.to_str().unwrap()]);
    assert_eq!(
        r.status.code(),
        Some(2),
        "an existing file needs --force: {}",
        out(&r)
    );
    assert_eq!(
        std::fs::read_to_string(&existing).unwrap(),
        "keep me\n",
        "left untouched"
    );

    let missing_queue = cli.path("never.jsonl");
    let r = cli.run_bare(&[
        "export",
        "--dlq",
        "rgtest-no-such-queue-for-export",
        "--out",
        missing_queue.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", out(&r));
    assert!(
        !missing_queue.exists(),
        "no file for a queue that does not exist"
    );

    let fresh = cli.path("fresh.jsonl");
    let r = cli.run(&["export", "--out", fresh.to_str().unwrap()]);
    assert!(r.status.success(), "{}", out(&r));
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the export is readable by its owner only: {mode:o}"
    );
    assert!(
        std::fs::read_to_string(&fresh)
            .unwrap()
            .contains("exported-1")
    );

    let aside = cli.path("aside.txt");
    std::fs::write(&aside, "not yours\n").unwrap();
    let link = cli.path("link.jsonl");
    std::os::unix::fs::symlink(&aside, &link).unwrap();
    let r = cli.run(&["export", "--out", link.to_str().unwrap()]);
    assert_eq!(
        r.status.code(),
        Some(2),
        "a symlink at --out is an existing file: {}",
        out(&r)
    );
    let r = cli.run(&["export", "--out", link.to_str().unwrap(), "--force"]);
    assert!(r.status.success(), "{}", out(&r));
    assert_eq!(
        std::fs::read_to_string(&aside).unwrap(),
        "not yours\n",
        "the symlink's target is never written"
    );
    assert!(
        !std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "--force replaces the link itself with the export"
    );
    assert_eq!(
        broker.ready(&dlq).await,
        1,
        "export leaves the message in the queue"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_output_escapes_control_characters_from_messages() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings("escape", "noop", fast_breaker());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let dlq = consumer.dead_letter_queue();
    let mut h = FieldTable::default();
    h.insert("rg-reason".into(), text("permanent\u{1b}[2J"));
    h.insert(
        "rg-error".into(),
        text("boom\u{1b}]0;owned\u{7}\r\nfake line"),
    );
    h.insert("x-\u{1b}[31mred".into(), text("\u{9b}31m"));
    publish(
        &broker,
        &dlq,
        "id\u{1b}[1A",
        h,
        "body \u{1b}[2J\u{202e}".as_bytes(),
    )
    .await;
    let cli = Cli::new(&settings);
    for args in [&["list"][..], &["summary"], &["show", "id\u{1b}[1A"]] {
        let o = cli.run(args);
        assert!(o.status.success(), "{args:?}: {}", out(&o));
        let printed = String::from_utf8_lossy(&o.stdout);
        assert!(
            !printed.contains('\u{1b}')
                && !printed.contains('\u{7}')
                && !printed.contains('\r')
                && !printed.contains('\u{9b}')
                && !printed.contains('\u{202e}'),
            "{args:?} prints no control character: {printed:?}"
        );
        assert!(
            printed.contains("\\u{1b}"),
            "{args:?} shows them escaped: {printed}"
        );
    }
    let json = cli.json(&[]);
    assert_eq!(
        json[0]["message_id"], "id\u{1b}[1A",
        "--json keeps the exact text (JSON escapes it)"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_commands_speak_json_and_keep_late_differing_errors_apart() {
    let broker = Arc::new(TestBroker::connect().await);
    let settings = settings("readjson", "noop", fast_breaker());
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let dlq = consumer.dead_letter_queue();
    let prefix = "POST http://billing.internal/charge: 422 Unprocessable Entity: the order could not be charged because ";
    for (id, tail) in [
        ("late-a", "the card expired"),
        ("late-b", "the amount is negative"),
    ] {
        let mut h = FieldTable::default();
        h.insert("rg-reason".into(), text("permanent"));
        h.insert("rg-error".into(), text(&format!("{prefix}{tail}")));
        publish(&broker, &dlq, id, h, b"{}").await;
    }
    let cli = Cli::new(&settings);
    let summary: serde_json::Value = serde_json::from_str(&cli.ok(&["summary", "--json"]))
        .expect("summary --json is one JSON object");
    let groups = summary["groups"].as_array().expect("groups");
    assert_eq!(
        groups.len(),
        2,
        "errors that differ after 100 characters are two groups: {summary}"
    );
    assert_eq!(summary["selected"], 2, "{summary}");
    let table = cli.ok(&["summary"]);
    assert!(
        table.contains("the card") && table.contains("expired") && table.contains("negative"),
        "the table shows the whole errors (wrapped): {table}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&cli.ok(&["show", "late-a", "--json"])).expect("show --json");
    assert_eq!(shown["message_id"], "late-a", "{shown}");
    assert_eq!(shown["header_origins"]["rg-error"], "publisher", "{shown}");
    let out = cli.path("all.jsonl");
    cli.ok(&["export", "--all", "--out", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        2,
        "export --all takes everything"
    );
    let help = cli.run_bare(&["import", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--to") && !help.contains("--queue") && !help.contains("--utc"),
        "import --help lists only what import uses: {help}"
    );
    broker.cleanup().await;
}

/// A death record as RabbitMQ writes it in `x-death`.
fn death(queue: &str) -> AMQPValue {
    let mut d = FieldTable::default();
    d.insert("queue".into(), text(queue));
    d.insert("reason".into(), text("rejected"));
    d.insert("count".into(), AMQPValue::LongLongInt(1));
    d.insert("exchange".into(), text(""));
    AMQPValue::FieldArray(vec![AMQPValue::FieldTable(d)].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_trusts_x_death_only_where_it_names_this_dlqs_own_queue() {
    use rabbit_guard::dead_letter::BrokerVersion;
    let broker = Arc::new(TestBroker::connect().await);
    let version = BrokerVersion::of_server(broker.connection.configuration().server_properties());
    let settings = settings("forged-death", "noop", fast_breaker());
    let consumer = settings.consumers[0].clone();
    let (work, dlq) = (consumer.queue.clone(), consumer.dead_letter_queue());
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let victim = unique("forged-death-victim");
    broker.declare_queue(&victim, FieldTable::default()).await;
    broker.track_queue(&victim);

    // Published straight into the dead-letter queue (a narrower right than
    // publishing to the victim), as the broker would write them.
    let mut forged = FieldTable::default();
    forged.insert("x-death".into(), death(&victim));
    forged.insert("x-first-death-queue".into(), text(&victim));
    publish(&broker, &dlq, "forged-x-death", forged, b"{}").await;
    let mut last = FieldTable::default();
    last.insert("x-last-death-queue".into(), text(&victim));
    last.insert("x-last-death-reason".into(), text("rejected"));
    publish(&broker, &dlq, "forged-last-death", last, b"{}").await;
    let mut own = FieldTable::default();
    own.insert("x-death".into(), death(&work));
    publish(&broker, &dlq, "names-its-own-queue", own, b"{}").await;
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            broker.ready(&dlq).await == 3
        })
        .await,
        "the three messages should be in {dlq}: {}",
        broker.ready(&dlq).await
    );

    let cli = Cli::new(&settings);
    let shown: serde_json::Value =
        serde_json::from_str(&cli.ok(&["show", "forged-x-death", "--json"])).expect("show --json");
    // Delivered as written on 3.x and 4.x alike (4.x only stops
    // interpreting a publisher's x-death).
    assert_eq!(
        shown["header_origins"]["x-death"].as_str(),
        Some("broker or publisher"),
        "on {version} a publisher can write x-death: {shown}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&cli.ok(&["show", "forged-last-death", "--json"]))
            .expect("show --json");
    if version < BrokerVersion::parse("3.13").unwrap() {
        assert_eq!(
            (
                shown["header_origins"]["x-last-death-queue"].as_str(),
                shown["broker_queue"].as_str()
            ),
            (Some("publisher"), None),
            "before 3.13 only a publisher writes x-last-death-*, and it is not read: {shown}"
        );
    }

    let replay = cli.run(&["replay", "--all"]);
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert_eq!(
        broker.ready(&victim).await,
        0,
        "nothing reached the queue only a forged death header named: {}",
        out(&replay)
    );
    let moved: Vec<String> = broker
        .drain(&work)
        .await
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert!(
        moved.contains(&"names-its-own-queue".to_owned()),
        "an x-death naming this dead-letter queue's own work queue is followed: {moved:?}; {}",
        out(&replay)
    );
    assert!(
        stderr.contains("forged-x-death") && stderr.contains("--to"),
        "the refused message is listed with what to do: {}",
        out(&replay)
    );
    assert_eq!(replay.status.code(), Some(1), "{}", out(&replay));
    broker.cleanup().await;
}
