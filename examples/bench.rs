//! Run with `cargo run --release --example bench` (RabbitMQ at `AMQP_ADDR`,
//! default `amqp://127.0.0.1:5672/%2f`). `--help` lists the knobs.
//!
//! Measures, in one run and alternating rounds, on throwaway queues:
//! - **plain**: a hand-written lapin consumer that spawns each message's
//!   handler under a concurrency limit and acks each message when it finishes;
//! - **plain-1t**: the same on a current-thread runtime, for comparison;
//! - **no-ack**: the plain consumer with `no_ack` (no delivery guarantee: the
//!   broker's ceiling);
//! - **guard**: the rabbit-guard worker with the `noop` handler behind a closed
//!   breaker;
//!
//! at the same prefetch, with a no-op handler and with a handler that waits
//! 1 ms (latency-bound, concurrency 64). With `--sweep`, the cost as the
//! work grows instead: 1 / 10 / 100 queues in one worker, bodies of 256 B /
//! 64 KiB / 1 MiB, concurrency 8 / 256 / 1,024 (1 ms handler), one dimension
//! at a time, with CPU per message, throughput and peak memory. Each variant runs in a child process,
//! so CPU time and peak memory are its own. Then an outage scenario: the
//! dependency fails at a known instant and recovers, and the table shows how
//! fast the guard paused and resumed. Prints medians and ratios; removes its
//! queues.
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

// Printing the figures is what this program is for.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use rabbit_guard::Topology;
use rabbit_guard::Worker;
use rabbit_guard::breaker::HealthCheck;
use rabbit_guard::breaker::{BreakerConfig, BreakerState};
use rabbit_guard::config::{ConsumerSettings, RetrySettings, Settings};
use rabbit_guard::handler::{BoxError, Context, Handler, HandlerError};
use rabbit_guard::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use rabbit_guard::lapin::types::{FieldTable, ShortString};
use rabbit_guard::lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Args {
    messages: u64,
    size: usize,
    prefetch: Vec<u16>,
    rounds: usize,
    concurrency: u16,
    latency_messages: u64,
    outage: bool,
    child: Option<String>,
    queue: String,
    latency_ms: u64,
    /// Queues the guard child consumes (`{queue}.{i}` when more than one).
    queues: usize,
    sweep: bool,
    outage_only: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        messages: 200_000,
        size: 256,
        prefetch: vec![100, 1_000],
        rounds: 3,
        concurrency: 64,
        latency_messages: 50_000,
        outage: true,
        child: None,
        queue: String::new(),
        latency_ms: 0,
        queues: 1,
        sweep: false,
        outage_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--messages" => a.messages = val().parse().unwrap_or(a.messages),
            "--size" => a.size = val().parse().unwrap_or(a.size),
            "--prefetch" => a.prefetch = val().split(',').filter_map(|p| p.parse().ok()).collect(),
            "--rounds" => a.rounds = val().parse().unwrap_or(a.rounds),
            "--concurrency" => a.concurrency = val().parse().unwrap_or(a.concurrency),
            "--latency-messages" => {
                a.latency_messages = val().parse().unwrap_or(a.latency_messages);
            }
            "--no-outage" => a.outage = false,
            "--child" => a.child = Some(val()),
            "--queue" => a.queue = val(),
            "--latency-ms" => a.latency_ms = val().parse().unwrap_or(0),
            "--queues" => a.queues = val().parse().unwrap_or(1).max(1),
            "--sweep" => a.sweep = true,
            "--outage-only" => a.outage_only = true,
            "--help" | "-h" => {
                println!(
                    "bench [--messages 200000] [--size 256] [--prefetch 100,1000] [--rounds 3] \
                     [--concurrency 64] [--latency-messages 50000 (0: skip)] [--no-outage] [--outage-only] [--sweep]"
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other}; see --help");
                std::process::exit(2);
            }
        }
    }
    a
}

fn addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://127.0.0.1:5672/%2f".into())
}

/// CPU seconds used by this process so far (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident memory of this process, in KiB.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- children

/// The handler under test: nothing, or a 1 ms wait.
#[derive(Clone)]
struct Work {
    latency: Duration,
}

impl Work {
    async fn run(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

impl Handler for Work {
    type Message = ();

    async fn handle(&self, (): (), _ctx: &Context) -> Result<(), HandlerError> {
        self.run().await;
        Ok(())
    }
}

async fn child(args: Args) {
    let variant = args.child.clone().unwrap_or_default();
    let prefetch = args.prefetch[0];
    let work = Work {
        latency: Duration::from_millis(args.latency_ms),
    };
    let cpu0 = cpu_seconds();
    let (elapsed, cpu) = match variant.as_str() {
        "plain" | "plain-1t" | "no-ack" => plain(&args, prefetch, variant == "no-ack", work).await,
        _ => guard(&args, prefetch, work).await,
    };
    let rate = args.messages as f64 / elapsed.as_secs_f64();
    println!(
        "{}",
        json!({
            "rate": rate,
            "cpu_s": cpu - cpu0,
            "rss_kb": peak_rss_kb(),
            "elapsed_s": elapsed.as_secs_f64(),
        })
    );
}

/// The consumer people write by hand: spawn each handler under a semaphore,
/// ack when it finishes. Returns (time from first delivery to last ack, CPU).
async fn plain(args: &Args, prefetch: u16, no_ack: bool, work: Work) -> (Duration, f64) {
    let conn = Connection::connect(&addr(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            ShortString::from(args.queue.as_str()),
            ShortString::from(""),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let limit = Arc::new(Semaphore::new(usize::from(args.concurrency)));
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());
    let mut first = None;
    let n = args.messages;
    let mut received = 0;
    while received < n {
        let Some(Ok(delivery)) = consumer.next().await else {
            break;
        };
        received += 1;
        first.get_or_insert_with(Instant::now);
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (task_done, task_finished, work) = (done.clone(), finished.clone(), work.clone());
        tokio::spawn(async move {
            work.run().await;
            if !no_ack {
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .unwrap();
            }
            drop(permit);
            if task_done.fetch_add(1, Ordering::AcqRel) + 1 == n {
                task_finished.notify_one();
            }
        });
    }
    while done.load(Ordering::Acquire) < n {
        finished.notified().await;
    }
    let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
    let cpu = cpu_seconds();
    let _ = ch.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    (elapsed, cpu)
}

fn guard_settings(queue: &str, prefetch: u16, concurrency: u16, latency_ms: u64) -> Settings {
    let mut s = Settings::default();
    s.broker.url = addr().into();
    s.broker.connection_name = "rabbit-guard-bench".into();
    s.breakers.insert("bench".into(), BreakerConfig::default());
    // The built-in no-op handler, or the 1 ms one registered below.
    let handler = if latency_ms == 0 { "noop" } else { "work" };
    s.consumers.push(
        ConsumerSettings::new(queue, handler)
            .with_breaker("bench")
            .with_prefetch(prefetch, concurrency.min(prefetch))
            .with_retry(RetrySettings::new([])),
    );
    s
}

/// The queues of a child that consumes `queues` of them.
fn queue_names(queue: &str, queues: usize) -> Vec<String> {
    if queues <= 1 {
        vec![queue.to_owned()]
    } else {
        (0..queues).map(|i| format!("{queue}.{i}")).collect()
    }
}

async fn guard(args: &Args, prefetch: u16, work: Work) -> (Duration, f64) {
    let mut settings = guard_settings(&args.queue, prefetch, args.concurrency, args.latency_ms);
    let template = settings.consumers[0].clone();
    settings.consumers = queue_names(&args.queue, args.queues)
        .into_iter()
        .map(|queue| {
            let mut consumer = template.clone();
            consumer.queue = queue;
            consumer
        })
        .collect();
    let names = queue_names(&args.queue, args.queues);
    let worker = Worker::builder(settings)
        .handler("work", work)
        .build()
        .unwrap();
    let all: Vec<_> = names.iter().map(|q| worker.stats(q).unwrap()).collect();
    let stats = Total(all);
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run_until(stop.clone()));
    let mut first = None;
    let mut last_report = Instant::now();
    loop {
        let s = stats.snapshot();
        if s.received > 0 {
            first.get_or_insert_with(Instant::now);
        }
        if s.succeeded >= args.messages {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("guard still waiting: {s:?}");
            last_report = Instant::now();
        }
        // Looking every 5 ms costs the worker's thread next to nothing and
        // puts at most 5 ms (0.1% of a 5 s run) on the measured time.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
    let cpu = cpu_seconds();
    stop.cancel();
    task.await.unwrap().unwrap();
    (elapsed, cpu)
}

/// Several consumers' counts as one.
struct Total(Vec<Arc<rabbit_guard::worker::ConsumerStats>>);

impl Total {
    fn snapshot(&self) -> rabbit_guard::worker::StatsSnapshot {
        let mut t = rabbit_guard::worker::StatsSnapshot::default();
        for s in &self.0 {
            let s = s.snapshot();
            t.received += s.received;
            t.succeeded += s.succeeded;
        }
        t
    }
}

// ---------------------------------------------------------------- parent

async fn publish(conn: &Connection, queue: &str, n: u64, size: usize) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = vec![b'x'; size];
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(5_000);
        for _ in 0..batch {
            // The confirm is awaited below, for the whole batch.
            drop(
                ch.basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
            );
        }
        ch.wait_for_confirms().await.unwrap();
        sent += batch;
    }
    let _ = ch.close(200, "published".into()).await;
}

async fn declare(conn: &Connection, queue: &str) -> ConsumerSettings {
    let settings = guard_settings(queue, 100, 1, 0);
    let c = settings.consumers[0].clone();
    let ch = conn.create_channel().await.unwrap();
    Topology::of(0, &c).declare(&ch).await.unwrap();
    let _ = ch.close(200, "declared".into()).await;
    c
}

/// Deletes what a consumer's topology declared: the work queue, its
/// dead-letter queue and exchange, and its delay queues.
async fn delete(conn: &Connection, c: &ConsumerSettings) {
    let ch = conn.create_channel().await.unwrap();
    let delays = c.retry.delays.iter().map(|d| c.delay_queue(*d));
    for q in [c.queue.clone(), c.dead_letter_queue()]
        .into_iter()
        .chain(delays)
    {
        let _ = ch
            .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            ShortString::from(c.dead_letter_exchange().as_str()),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = ch.close(200, "deleted".into()).await;
}

#[derive(Debug, Clone, Copy, Default)]
struct Round {
    rate: f64,
    cpu_us_per_msg: f64,
    rss_mb: f64,
}

fn run_child(
    args: &Args,
    variant: &str,
    queue: &str,
    prefetch: u16,
    messages: u64,
    latency_ms: u64,
) -> Round {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--child", variant, "--queue", queue])
        .args(["--queues", &args.queues.to_string()])
        .args(["--prefetch", &prefetch.to_string()])
        .args(["--messages", &messages.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--latency-ms", &latency_ms.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    let line = BufReader::new(&out.stdout[..])
        .lines()
        .map_while(Result::ok)
        .last()
        .unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("child {variant} said {line:?}"));
    Round {
        rate: v["rate"].as_f64().unwrap_or(0.0),
        cpu_us_per_msg: v["cpu_s"].as_f64().unwrap_or(0.0) * 1e6 / messages as f64,
        rss_mb: v["rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

async fn case(
    args: &Args,
    conn: &Connection,
    title: &str,
    prefetch: u16,
    messages: u64,
    latency_ms: u64,
    variants: &[&str],
) -> BTreeMap<String, Round> {
    let mut rounds: BTreeMap<String, Vec<Round>> = BTreeMap::new();
    for round in 0..args.rounds {
        for variant in variants {
            let queue = format!(
                "rabbit-guard-bench.{}.{round}.{variant}",
                std::process::id()
            );
            let c = declare(conn, &queue).await;
            publish(conn, &queue, messages, args.size).await;
            let r = run_child(args, variant, &queue, prefetch, messages, latency_ms);
            eprintln!(
                "  {title} round {} {variant:<7} {:>9.0} msg/s",
                round + 1,
                r.rate
            );
            rounds.entry((*variant).to_owned()).or_default().push(r);
            delete(conn, &c).await;
        }
    }
    let medians: BTreeMap<String, Round> = rounds
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                Round {
                    rate: median(v.iter().map(|r| r.rate).collect()),
                    cpu_us_per_msg: median(v.iter().map(|r| r.cpu_us_per_msg).collect()),
                    rss_mb: v.iter().map(|r| r.rss_mb).fold(0.0, f64::max),
                },
            )
        })
        .collect();
    println!("\n{title}");
    println!(
        "  {:<8} {:>12} {:>16} {:>14}",
        "variant", "msg/s (med)", "CPU µs/msg (med)", "peak RSS MB"
    );
    for v in variants {
        let r = medians[*v];
        println!(
            "  {:<8} {:>12.0} {:>16.1} {:>14.1}",
            v, r.rate, r.cpu_us_per_msg, r.rss_mb
        );
    }
    if let (Some(g), Some(p)) = (medians.get("guard"), medians.get("plain")) {
        print!("  guard/plain {:.2}", g.rate / p.rate);
        if let Some(c) = medians.get("no-ack") {
            print!("   guard/no-ack ceiling {:.2}", g.rate / c.rate);
        }
        println!(
            "   CPU/msg guard/plain {:.2}",
            g.cpu_us_per_msg / p.cpu_us_per_msg
        );
        // The goals this project set itself (issue 6), judged on this run.
        let mut goals = Vec::new();
        let plain_goal = match (latency_ms, prefetch) {
            (0, 1_000..) => Some(1.4),
            (0, _) => None,
            _ => Some(0.95),
        };
        if let Some(goal) = plain_goal {
            goals.push((format!("guard/plain >= {goal}"), g.rate / p.rate >= goal));
        }
        if let Some(c) = medians.get("no-ack") {
            goals.push(("guard/ceiling >= 0.8".into(), g.rate / c.rate >= 0.8));
        }
        goals.push((
            "CPU/msg <= plain".into(),
            g.cpu_us_per_msg <= p.cpu_us_per_msg,
        ));
        if prefetch >= 1_000 && latency_ms == 0 {
            goals.push(("peak RSS < 30 MB".into(), g.rss_mb < 30.0));
        }
        let goals: Vec<String> = goals
            .into_iter()
            .map(|(goal, met)| format!("{goal}: {}", if met { "met" } else { "MISSED" }))
            .collect();
        println!("  goals: {}", goals.join(", "));
    }
    medians
}

// ---------------------------------------------------------------- outage

/// A dependency that fails while `failing` is set, counting calls.
#[derive(Clone)]
struct Dependency {
    failing: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_ok_after: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Handler for Dependency {
    type Message = ();

    async fn handle(&self, (): (), _ctx: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if self.failing.load(Ordering::Acquire) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            Err(HandlerError::transient("dependency down"))
        } else {
            self.ok.fetch_add(1, Ordering::Relaxed);
            self.first_ok_after
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
            Ok(())
        }
    }
}

async fn consumers_of(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.consumer_count())
        .unwrap_or(u32::MAX);
    let _ = ch.close(200, "ok".into()).await;
    q
}

async fn outage(conn: &Connection) {
    let queue = format!("rabbit-guard-bench.{}.outage", std::process::id());
    let mut settings = guard_settings(&queue, 200, 32, 1);
    // A busy queue trips on a run of failures: a 10 s failure rate would
    // need as many failures as the window holds successes.
    let mut breaker = BreakerConfig::default()
        .with_consecutive_failures(20)
        .with_open_timeout(Duration::from_millis(500), Duration::from_secs(2));
    breaker.minimum_calls = 20;
    let (consecutive, concurrency) = (20, 32);
    settings.breakers.insert("bench".into(), breaker);
    settings.consumers[0].retry = RetrySettings::new([Duration::from_secs(1)]);
    let c = settings.consumers[0].clone();
    {
        let ch = conn.create_channel().await.unwrap();
        Topology::of(0, &c).declare(&ch).await.unwrap();
        let _ = ch.close(200, "ok".into()).await;
    }
    let dep = Dependency {
        failing: Arc::new(AtomicBool::new(false)),
        ok: Arc::new(AtomicU64::new(0)),
        failed: Arc::new(AtomicU64::new(0)),
        first_ok_after: Arc::new(std::sync::Mutex::new(None)),
    };
    let worker = Worker::builder(settings)
        .handler("work", dep.clone())
        .build()
        .unwrap();
    let stats = worker.stats(&queue).unwrap();
    let breaker = worker.breaker("bench").unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run_until(stop.clone()));
    // A steady stream: publish 4,000 messages/s in the background.
    let publishing = CancellationToken::new();
    let publisher = {
        let (q, stop) = (queue.clone(), publishing.clone());
        let conn = Connection::connect(&addr(), ConnectionProperties::default())
            .await
            .unwrap();
        tokio::spawn(async move {
            let ch = conn.create_channel().await.unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.is_cancelled() {
                tick.tick().await;
                for _ in 0..20 {
                    let _ = ch
                        .basic_publish(
                            ShortString::from(""),
                            ShortString::from(q.as_str()),
                            BasicPublishOptions::default(),
                            b"x",
                            BasicProperties::default(),
                        )
                        .await;
                }
            }
            let _ = conn.close(200, "ok".into()).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rate_before = {
        let a = dep.ok.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        dep.ok.load(Ordering::Relaxed) - a
    };
    // Fail at a known instant.
    let failed_at = Instant::now();
    dep.failing.store(true, Ordering::Release);
    let mut paused_after = None;
    while paused_after.is_none() && failed_at.elapsed() < Duration::from_secs(10) {
        if consumers_of(conn, &queue).await == 0 {
            paused_after = Some(failed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let failing_before_pause = dep.failed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Recover, and time the first success and the return to full speed.
    *dep.first_ok_after.lock().unwrap() = None;
    let recovered_at = Instant::now();
    dep.failing.store(false, Ordering::Release);
    let mut full_after = None;
    let mut last = dep.ok.load(Ordering::Relaxed);
    while full_after.is_none() && recovered_at.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = dep.ok.load(Ordering::Relaxed);
        if (now - last) * 5 >= rate_before * 9 / 10 && breaker.state() == BreakerState::Closed {
            full_after = Some(recovered_at.elapsed());
        }
        last = now;
    }
    let first_ok = dep.first_ok_after.lock().unwrap().map(|t| t - recovered_at);
    publishing.cancel();
    let _ = publisher.await;
    // Let the backlog drain before counting dead letters.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dead = stats.snapshot().dead_lettered;
    stop.cancel();
    let _ = task.await;
    delete(conn, &c).await;
    let ms =
        |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.0}", d.as_secs_f64() * 1e3));
    println!(
        "\noutage (4,000 msg/s offered, 1 ms handler, concurrency {concurrency}, consecutive_failures {consecutive}, open_timeout 500ms)"
    );
    println!(
        "  {:<52} {:>8}",
        "failing calls before the pause", failing_before_pause
    );
    println!(
        "  {:<52} {:>8}",
        "ms from the first failure to 0 consumers at the broker",
        ms(paused_after)
    );
    println!(
        "  {:<52} {:>8}",
        "ms from recovery to the first successful call",
        ms(first_ok)
    );
    println!(
        "  {:<52} {:>8}",
        "ms from recovery to full throughput",
        ms(full_after)
    );
    println!("  {:<52} {:>8}", "messages dead-lettered", dead);
}

/// The dependency as its own health endpoint sees it.
impl HealthCheck for Dependency {
    async fn check(&self) -> Result<(), BoxError> {
        if self.failing.load(Ordering::Acquire) {
            Err("dependency down".into())
        } else {
            Ok(())
        }
    }
}

/// What one long outage cost.
struct LongOutage {
    first_ok_after: Option<Duration>,
    trial_calls: u64,
    open_time_at_recovery: Duration,
    dead_lettered: u64,
    processed: u64,
}

/// 2,000 messages waiting, the dependency down for 8 s from the worker's
/// start, `open_timeout` 2 s, `max_open_timeout` 10 s: with or without a
/// health check every second.
async fn long_outage(conn: &Connection, with_check: bool) -> LongOutage {
    let queue = format!(
        "rabbit-guard-bench.{}.long-outage.{with_check}",
        std::process::id()
    );
    let mut settings = guard_settings(&queue, 50, 8, 1);
    let breaker =
        BreakerConfig::default().with_open_timeout(Duration::from_secs(2), Duration::from_secs(10));
    settings.breakers.insert("bench".into(), breaker);
    settings.consumers[0].retry = RetrySettings::new([Duration::from_secs(1)]);
    let c = settings.consumers[0].clone();
    {
        let ch = conn.create_channel().await.unwrap();
        Topology::of(0, &c).declare(&ch).await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for _ in 0..2_000 {
            ch.basic_publish(
                ShortString::from(""),
                ShortString::from(queue.as_str()),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let _ = ch.close(200, "ok".into()).await;
    }
    let dep = Dependency {
        failing: Arc::new(AtomicBool::new(true)),
        ok: Arc::new(AtomicU64::new(0)),
        failed: Arc::new(AtomicU64::new(0)),
        first_ok_after: Arc::new(std::sync::Mutex::new(None)),
    };
    let mut builder = Worker::builder(settings).handler("work", dep.clone());
    if with_check {
        builder = builder.health_check("bench", dep.clone());
    }
    let worker = builder.build().unwrap();
    let stats = worker.stats(&queue).unwrap();
    let breaker = worker.breaker("bench").unwrap();
    let mut transitions = breaker.transitions();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(worker.run_until(stop.clone()));
    tokio::time::sleep_until(started + Duration::from_secs(8)).await;
    // Each half-open trial while the dependency was down took one real message.
    let mut trial_calls = 0;
    while let Ok(t) = transitions.try_recv() {
        trial_calls += u64::from(matches!(t.to, BreakerState::HalfOpen { .. }));
    }
    let open_time_at_recovery = breaker.snapshot().open_time;
    let recovered_at = Instant::now();
    dep.failing.store(false, Ordering::Release);
    while dep.ok.load(Ordering::Relaxed) < 2_000 && recovered_at.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_ok_after = dep
        .first_ok_after
        .lock()
        .unwrap()
        .map(|t| t.saturating_duration_since(recovered_at));
    let dead_lettered = stats.snapshot().dead_lettered;
    stop.cancel();
    let _ = task.await;
    delete(conn, &c).await;
    LongOutage {
        first_ok_after,
        trial_calls,
        open_time_at_recovery,
        dead_lettered,
        processed: dep.ok.load(Ordering::Relaxed),
    }
}

async fn long_outage_table(conn: &Connection) {
    let without = long_outage(conn, false).await;
    let with = long_outage(conn, true).await;
    let ms =
        |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.0}", d.as_secs_f64() * 1e3));
    println!(
        "\nlong outage (2,000 messages waiting, dependency down 8 s, open_timeout 2s, max_open_timeout 10s, 1 ms handler)"
    );
    println!("  {:<52} {:>10} {:>14}", "", "no check", "health check");
    println!(
        "  {:<52} {:>10} {:>14}",
        "ms from recovery to the first successful call",
        ms(without.first_ok_after),
        ms(with.first_ok_after)
    );
    println!(
        "  {:<52} {:>10} {:>14}",
        "real messages spent on trials while down", without.trial_calls, with.trial_calls
    );
    println!(
        "  {:<52} {:>10} {:>14}",
        "open time reached (s)",
        format!("{:.1}", without.open_time_at_recovery.as_secs_f64()),
        format!("{:.1}", with.open_time_at_recovery.as_secs_f64())
    );
    println!(
        "  {:<52} {:>10} {:>14}",
        "messages processed / dead-lettered",
        format!("{}/{}", without.processed, without.dead_lettered),
        format!("{}/{}", with.processed, with.dead_lettered)
    );
    let met = with
        .first_ok_after
        .is_some_and(|d| d <= Duration::from_millis(1_500))
        && with.trial_calls == 0;
    println!(
        "  goal (health check, interval 1s): first success <= 1.5 s after recovery, 0 trial messages while down: {}",
        if met { "met" } else { "MISSED" }
    );
}

/// The scale sweep: one dimension at a time from 1 queue, 256 B bodies,
/// concurrency 8 and prefetch 100, a handler that waits 1 ms.
async fn sweep(args: &Args, conn: &Connection) {
    // (queues, body bytes, concurrency, prefetch, messages)
    let plan: [(usize, usize, u16, u16, u64); 7] = [
        (1, 256, 8, 100, 20_000),
        (10, 256, 8, 100, 20_000),
        (100, 256, 8, 100, 20_000),
        (1, 64 * 1024, 8, 100, 2_000),
        (1, 1024 * 1024, 8, 100, 200),
        (1, 256, 256, 1_000, 20_000),
        (1, 256, 1_024, 2_048, 20_000),
    ];
    println!(
        "\nscale sweep (1 ms handler; one dimension at a time)\n  {:>6} {:>9} {:>11} {:>8} {:>9} {:>10} {:>12} {:>11} {:>11}",
        "queues",
        "body",
        "concurrency",
        "prefetch",
        "messages",
        "msg/s",
        "CPU µs/msg",
        "peak RSS MB",
        "RSS goal MB"
    );
    let mut cpu_at = BTreeMap::new();
    let mut rss_ok = true;
    for (i, &(queues, size, concurrency, prefetch, messages)) in plan.iter().enumerate() {
        let base = format!("rabbit-guard-bench.{}.sweep{i}", std::process::id());
        let names = queue_names(&base, queues);
        let mut declared = Vec::new();
        for q in &names {
            declared.push(declare(conn, q).await);
            publish(conn, q, messages / queues as u64, size).await;
        }
        let child_args = Args {
            queues,
            concurrency,
            ..args.clone()
        };
        let r = run_child(&child_args, "guard", &base, prefetch, messages, 1);
        for c in &declared {
            delete(conn, c).await;
        }
        let goal = 20.0 + f64::from(prefetch) * size as f64 * queues as f64 / 1_048_576.0;
        rss_ok &= r.rss_mb < goal;
        if size == 256 && concurrency == 8 {
            cpu_at.insert(queues, r.cpu_us_per_msg);
        }
        let body = match size {
            s if s >= 1_048_576 => format!("{} MiB", s / 1_048_576),
            s if s >= 1_024 => format!("{} KiB", s / 1_024),
            s => format!("{s} B"),
        };
        println!(
            "  {queues:>6} {body:>9} {concurrency:>11} {prefetch:>8} {messages:>9} {:>10.0} {:>12.1} {:>11.1} {goal:>11.0}",
            r.rate, r.cpu_us_per_msg, r.rss_mb
        );
    }
    if let (Some(one), Some(hundred)) = (cpu_at.get(&1), cpu_at.get(&100)) {
        let ratio = hundred / one;
        println!(
            "  goals: CPU/msg at 100 queues / 1 queue = {ratio:.2} (<= 1.3: {}), peak RSS under 20 MB + prefetch x body x queues: {}",
            if ratio <= 1.3 { "met" } else { "missed" },
            if rss_ok { "met" } else { "missed" }
        );
    }
}

// ---------------------------------------------------------------- main

fn main() {
    let args = parse_args();
    if args.child.is_some() {
        // plain and no-ack run as people write them (#[tokio::main]: a
        // thread pool); plain-1t on one thread for comparison; the guard on
        // the runtime the worker binary uses by default (worker.threads).
        let rt = match args.child.as_deref() {
            Some("guard") => rabbit_guard::cli::worker_runtime(Settings::default().worker.threads),
            Some("plain-1t") => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            _ => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
        }
        .unwrap();
        if args.child.as_deref() == Some("guard") {
            // Logging as the binary sets it up (info, nothing per message),
            // so the cost of each delivery's span is counted.
            rabbit_guard::telemetry::init(&rabbit_guard::config::LogSettings::default());
        }
        rt.block_on(child(args));
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,lapin=off".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = Connection::connect(&addr(), ConnectionProperties::default())
            .await
            .unwrap();
        println!(
            "rabbit-guard bench: {} messages of {} bytes, {} rounds, concurrency {}, broker {}",
            args.messages,
            args.size,
            args.rounds,
            args.concurrency,
            rabbit_guard::secret::mask_url(&addr())
        );
        if args.sweep {
            sweep(&args, &conn).await;
            let _ = conn.close(200, "bench done".into()).await;
            return;
        }
        if args.outage_only {
            outage(&conn).await;
            long_outage_table(&conn).await;
            let _ = conn.close(200, "bench done".into()).await;
            return;
        }
        for prefetch in args.prefetch.clone() {
            case(
                &args,
                &conn,
                &format!("no-op handler, prefetch {prefetch}"),
                prefetch,
                args.messages,
                0,
                &["plain", "plain-1t", "no-ack", "guard"],
            )
            .await;
        }
        if args.latency_messages > 0 {
            case(
                &args,
                &conn,
                "1 ms handler (latency-bound), concurrency 64, prefetch 1000",
                1_000,
                args.latency_messages,
                1,
                &["plain", "plain-1t", "guard"],
            )
            .await;
        }
        if args.outage {
            outage(&conn).await;
            long_outage_table(&conn).await;
        }
        let _ = conn.close(200, "bench done".into()).await;
    });
}
