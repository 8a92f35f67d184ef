//! Shared helpers for broker tests: unique names, a broker client for
//! publishing and inspecting queues, a switchable downstream HTTP server,
//! and a worker running in-process.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod dlq_cli;
pub mod prom;
pub mod proxy;
pub mod raw;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rabbit_guard::breaker::{Breaker, BreakerConfig, BreakerState, Transition};
use rabbit_guard::config::{ConsumerSettings, HttpSettings, RetrySettings, Settings};
use rabbit_guard::consumer::ConsumerStats;
use rabbit_guard::{Worker, WorkerBuilder};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "rgtest.{prefix}.{}.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls the async `cond` every 50 ms until it holds or `timeout` passes
/// (for conditions that ask the broker).
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain client connection for the test's own publishing and inspection.
pub struct TestBroker {
    pub connection: Connection,
    pub channel: Channel,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Got {
    pub id: String,
    pub headers: BTreeMap<String, AMQPValue>,
    pub body: Vec<u8>,
    pub redelivered: bool,
}

impl Got {
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.headers.get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    pub fn header_u64(&self, name: &str) -> Option<u64> {
        match self.headers.get(name)? {
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
            _ => None,
        }
    }
}

impl TestBroker {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_addr(), ConnectionProperties::default())
            .await
            .expect(
                "tests need RabbitMQ at AMQP_ADDR (default amqp://guest:guest@127.0.0.1:5672/%2f)",
            );
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            connection,
            channel,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// Remembers the queues of a consumer so [`cleanup`](Self::cleanup) deletes them.
    pub fn track(&self, c: &ConsumerSettings) {
        let mut q = self.queues.lock().unwrap();
        q.push(c.queue.clone());
        q.push(c.dead_letter_queue());
        for d in &c.retry.delays {
            q.push(c.delay_queue(*d));
        }
        self.exchanges
            .lock()
            .unwrap()
            .push(c.dead_letter_exchange());
    }

    pub fn track_queue(&self, name: &str) {
        self.queues.lock().unwrap().push(name.to_owned());
    }

    pub async fn cleanup(&self) {
        let queues: Vec<String> = self.queues.lock().unwrap().drain(..).collect();
        let exchanges: Vec<String> = self.exchanges.lock().unwrap().drain(..).collect();
        delete_all(&self.connection, &queues, &exchanges).await;
    }

    /// Declares a plain durable queue (for tests that publish before the worker starts).
    pub async fn declare(&self, c: &ConsumerSettings) {
        let topology = rabbit_guard::topology::Topology::of(0, c);
        let ch = self.connection.create_channel().await.unwrap();
        topology.declare(&ch).await.expect("declare test topology");
        let _ = ch.close(200, "ok".into()).await;
    }

    /// Publishes one message per body with ids `{prefix}-{i}`, confirmed.
    pub async fn publish_json(&self, queue: &str, prefix: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let body = format!("{{\"id\":\"{id}\",\"n\":{i}}}");
            confirms.push(
                self.channel
                    .basic_publish(
                        ShortString::from(""),
                        ShortString::from(queue),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default()
                            .with_message_id(ShortString::from(id.as_str()))
                            .with_content_type(ShortString::from("application/json"))
                            .with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
            ids.push(id);
        }
        for (id, c) in ids.iter().zip(confirms) {
            let confirm = c.await.unwrap();
            assert!(
                confirm.is_ack(),
                "the broker should confirm {id} published to {queue}: {confirm:?}"
            );
        }
        ids
    }

    /// Publishes one persistent message with `headers`, confirmed.
    pub async fn publish_with_headers(
        &self,
        queue: &str,
        id: &str,
        headers: FieldTable,
        body: &[u8],
    ) {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_message_id(ShortString::from(id))
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirm.is_ack(),
            "the broker should confirm {id} published to {queue}: {confirm:?}"
        );
    }

    pub async fn publish_raw(&self, queue: &str, id: &str, body: &[u8], content_type: &str) {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_message_id(ShortString::from(id))
                    .with_content_type(ShortString::from(content_type))
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirm.is_ack(),
            "the broker should confirm {id} published to {queue}: {confirm:?}"
        );
    }

    /// (ready messages, consumers) of a queue, from a passive declare.
    pub async fn counts(&self, queue: &str) -> (u32, u32) {
        let ch = self.connection.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue} should exist: {e}"));
        let _ = ch.close(200, "ok".into()).await;
        (q.message_count(), q.consumer_count())
    }

    /// Ready messages, or `None` when the queue does not exist.
    pub async fn ready_if_exists(&self, queue: &str) -> Option<u32> {
        let ch = self.connection.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = ch.close(200, "ok".into()).await;
        Some(q.message_count())
    }

    pub async fn consumers(&self, queue: &str) -> u32 {
        self.counts(queue).await.1
    }

    pub async fn ready(&self, queue: &str) -> u32 {
        self.counts(queue).await.0
    }

    /// Takes (and acks) every message in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let ch = self.connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(ShortString::from(queue), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let d = m.delivery;
            out.push(Got {
                id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                headers: d
                    .properties
                    .headers()
                    .as_ref()
                    .map(|h| {
                        h.inner()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
                body: d.data.clone(),
                redelivered: d.redelivered,
            });
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = ch.close(200, "ok".into()).await;
        out
    }
}

async fn delete_all(connection: &Connection, queues: &[String], exchanges: &[String]) {
    let Ok(ch) = connection.create_channel().await else {
        return;
    };
    for q in queues {
        let _ = ch
            .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
            .await;
    }
    for e in exchanges {
        let _ = ch
            .exchange_delete(ShortString::from(e.as_str()), Default::default())
            .await;
    }
}

/// A test that panics before `cleanup` still deletes its queues: the broker
/// is shared with other tests and runs.
impl Drop for TestBroker {
    fn drop(&mut self) {
        let queues: Vec<String> = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        let exchanges: Vec<String> = self
            .exchanges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        // Drop may run inside the test's runtime: clean up from a thread of our own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(c) =
                    Connection::connect(&amqp_addr(), ConnectionProperties::default()).await
                {
                    delete_all(&c, &queues, &exchanges).await;
                    let _ = c.close(200, "cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

/// How the downstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Healthy,
    /// 503 to everything.
    Failing,
    /// This status to everything.
    Status(u16),
    /// 200 after a delay.
    Slow(Duration),
    /// Random: 503 for `fail_percent`% of calls, and a latency between 0
    /// and `max_latency` for every call.
    Chaos {
        fail_percent: u64,
        max_latency: Duration,
    },
}

/// A per-message-id rule that wins over the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Always answer with this status.
    Status(u16),
    /// Answer 503 the first `n` times, then 200.
    FailTimes(u32),
}

#[derive(Debug, Clone)]
pub struct Call {
    pub id: String,
    pub status: u16,
    pub at: Instant,
    pub attempt: u32,
    pub content_type: String,
}

#[derive(Default)]
struct DownstreamInner {
    mode: Mutex<Option<Mode>>,
    rules: Mutex<HashMap<String, Rule>>,
    seen: Mutex<HashMap<String, u32>>,
    calls: Mutex<Vec<Call>>,
    /// Requests that arrived (answered or not yet).
    arrived: std::sync::atomic::AtomicUsize,
}

/// The dependency under test: an HTTP server on 127.0.0.1 that can be
/// switched between healthy, failing (503) and slow, and records every call.
#[derive(Clone)]
pub struct Downstream {
    inner: Arc<DownstreamInner>,
    pub addr: SocketAddr,
    _server: Arc<JoinHandle<()>>,
}

async fn downstream_handler(
    State(inner): State<Arc<DownstreamInner>>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let id = headers
        .get("x-message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let attempt = headers
        .get("x-attempt")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let at = Instant::now();
    inner
        .arrived
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nth = {
        let mut seen = inner.seen.lock().unwrap();
        let n = seen.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    let rule = inner.rules.lock().unwrap().get(&id).copied();
    let mode = inner.mode.lock().unwrap().unwrap_or(Mode::Healthy);
    let status = match (rule, mode) {
        (Some(Rule::Status(s)), _) => s,
        (Some(Rule::FailTimes(n)), _) if nth <= n => 503,
        (Some(Rule::FailTimes(_)), _) => 200,
        (None, Mode::Healthy) => 200,
        (None, Mode::Failing) => 503,
        (None, Mode::Status(s)) => s,
        (None, Mode::Slow(d)) => {
            tokio::time::sleep(d).await;
            200
        }
        (
            None,
            Mode::Chaos {
                fail_percent,
                max_latency,
            },
        ) => {
            let r = random_below(1_000_000);
            let latency_ms = u64::try_from(max_latency.as_millis()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(r % (latency_ms + 1))).await;
            if (r / 1_000) % 100 < fail_percent {
                503
            } else {
                200
            }
        }
    };
    inner.calls.lock().unwrap().push(Call {
        id,
        status,
        at,
        attempt,
        content_type,
    });
    StatusCode::from_u16(status).unwrap()
}

impl Downstream {
    pub async fn start() -> Self {
        Self::start_at("127.0.0.1:0").await
    }

    /// A downstream on a given address (a port that was closed until now).
    pub async fn start_at(addr: &str) -> Self {
        let inner = Arc::new(DownstreamInner::default());
        let app = Router::new()
            .fallback(downstream_handler)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            inner,
            addr,
            _server: Arc::new(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/work", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        *self.inner.mode.lock().unwrap() = Some(mode);
    }

    pub fn rule(&self, id: &str, rule: Rule) {
        self.inner.rules.lock().unwrap().insert(id.to_owned(), rule);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().unwrap().clone()
    }

    pub fn call_count(&self) -> usize {
        self.inner.calls.lock().unwrap().len()
    }

    /// Requests that arrived, answered or not (a request whose client went
    /// away before the answer is never answered).
    pub fn arrived_count(&self) -> usize {
        self.inner.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests being served right now.
    pub fn in_progress(&self) -> usize {
        self.arrived_count().saturating_sub(self.call_count())
    }

    /// Ids that got a 2xx at least once.
    pub fn succeeded_ids(&self) -> std::collections::HashSet<String> {
        self.calls()
            .into_iter()
            .filter(|c| (200..300).contains(&c.status))
            .map(|c| c.id)
            .collect()
    }
}

/// A breaker tuned for fast tests.
pub fn fast_breaker() -> BreakerConfig {
    BreakerConfig {
        failure_rate: 0.5,
        minimum_calls: 10,
        window: Duration::from_secs(10),
        window_buckets: 10,
        slow_call_duration: Duration::from_secs(2),
        slow_call_rate: 1.0,
        call_timeout: Duration::from_secs(3),
        open_timeout: Duration::from_millis(500),
        max_open_timeout: Duration::from_secs(2),
        half_open_probes: 1,
        consecutive_failures: None,
    }
}

/// Settings with one consumer of a fresh queue, handled by `handler`.
pub fn settings(prefix: &str, handler: &str, breaker: BreakerConfig) -> Settings {
    let mut s = Settings::default();
    s.broker.url = amqp_addr().into();
    s.broker.connection_name = unique(prefix);
    s.worker.shutdown_grace = Duration::from_secs(5);
    s.breakers.insert("dep".into(), breaker);
    s.consumers.push(ConsumerSettings {
        queue: unique(prefix),
        breaker: "dep".into(),
        handler: handler.into(),
        prefetch: 50,
        concurrency: 8,
        retry: RetrySettings {
            delays: vec![Duration::from_millis(500), Duration::from_secs(1)],
        },
        ..ConsumerSettings::default()
    });
    s
}

pub fn with_http(mut s: Settings, downstream: &Downstream) -> Settings {
    s.consumers[0].http = Some(HttpSettings::to(downstream.url()));
    s
}

/// Worker logs go to the test's captured output, shown when a test fails.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info,lapin=off".into()))
        .with_test_writer()
        .try_init();
}

/// A worker running in this process.
pub struct Running {
    pub token: CancellationToken,
    pub join: JoinHandle<Result<(), rabbit_guard::Error>>,
    pub breaker: Breaker,
    pub stats: Arc<ConsumerStats>,
    pub transitions: Arc<Mutex<Vec<Transition>>>,
}

impl Running {
    pub async fn start(builder: WorkerBuilder) -> Self {
        init_logs();
        let worker: Worker = builder.build().expect("test settings are valid");
        let breaker = worker.breakers().values().next().unwrap().clone();
        let queue = worker.settings().consumers[0].queue.clone();
        let stats = worker.stats(&queue).unwrap();
        let transitions = Arc::new(Mutex::new(Vec::new()));
        let mut rx = breaker.transitions();
        let sink = transitions.clone();
        tokio::spawn(async move {
            while let Ok(t) = rx.recv().await {
                sink.lock().unwrap().push(t);
            }
        });
        let token = CancellationToken::new();
        let join = tokio::spawn(worker.run_until(token.clone()));
        let running = Self {
            token,
            join,
            breaker,
            stats,
            transitions,
        };
        assert!(
            wait_until(Duration::from_secs(10), || running
                .stats
                .snapshot()
                .subscriptions
                >= 1)
            .await,
            "worker did not subscribe within 10s: {:?}",
            running.stats.snapshot()
        );
        running
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.join)
            .await
            .expect("worker did not stop within 30s")
            .unwrap()
            .expect("worker run failed");
    }

    pub fn transitions(&self) -> Vec<Transition> {
        self.transitions.lock().unwrap().clone()
    }

    pub fn state(&self) -> BreakerState {
        self.breaker.state()
    }
}

/// The `rabbit-guard` binary as a child process, killed when dropped.
pub struct Child {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl Child {
    /// Runs `rabbit-guard <args>` with `settings` written to a config file,
    /// stderr captured to a file.
    pub fn spawn(settings: &Settings, args: &[&str]) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
        Self::spawn_with_config(dir, &config, args)
    }

    pub fn spawn_with_config(
        dir: Arc<tempfile::TempDir>,
        config: &std::path::Path,
        args: &[&str],
    ) -> Self {
        let log = dir.path().join("stderr.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
            .args(args)
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("RUN_MODE")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the rabbit-guard binary");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{signal} {} failed: {status}",
            self.pid()
        );
    }

    /// Waits for the exit status, polling, up to `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Closes, through the broker, every connection whose client-provided name
/// is `name` (`rabbitmqctl close_connection`). Returns how many were closed.
pub fn close_connections_named(name: &str, reason: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("rabbitmqctl must be installed for broker-side tests");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(&needle)) {
        let pid = line.split_whitespace().next().unwrap();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, reason])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            closed += 1;
        }
    }
    closed
}

/// A pseudo-random number in `0..n` (tests only need variety, not quality).
pub fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos.wrapping_mul(2_654_435_761)) % n.max(1)
}

/// A broker user of a test's own (`rabbitmqctl add_user`), with a password
/// that appears nowhere else, deleted when dropped.
pub struct TempUser {
    pub user: String,
    pub password: String,
}

impl TempUser {
    pub fn create() -> Self {
        let user = unique("user").replace('.', "-");
        let password = format!("pw-{}-secret", random_below(1_000_000_000));
        let ctl = |args: &[&str]| {
            std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl")
        };
        let added = ctl(&["add_user", &user, &password]);
        assert!(
            added.status.success(),
            "rabbitmqctl add_user {user} failed (exit {:?}): {}",
            added.status.code(),
            String::from_utf8_lossy(&added.stderr)
        );
        let permitted = ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
        assert!(
            permitted.status.success(),
            "rabbitmqctl set_permissions for {user} failed (exit {:?}): {}",
            permitted.status.code(),
            String::from_utf8_lossy(&permitted.stderr)
        );
        Self { user, password }
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.user])
            .output();
    }
}
