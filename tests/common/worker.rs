//! Workers for tests: fast breakers, settings with a fresh queue, and a
//! worker running in this process.

use super::*;

/// A breaker tuned for fast tests.
pub fn fast_breaker() -> BreakerConfig {
    let mut b = BreakerConfig::default()
        .with_failure_rate(0.5, 10)
        .with_call_timeout(Duration::from_secs(3))
        .with_open_timeout(Duration::from_millis(500), Duration::from_secs(2))
        .with_half_open_probes(1);
    b.window = Duration::from_secs(10);
    b.window_buckets = 10;
    b.slow_call_duration = Duration::from_secs(2);
    b.slow_call_rate = 1.0;
    b
}

/// Settings with one consumer of a fresh queue, handled by `handler`.
pub fn settings(prefix: &str, handler: &str, breaker: BreakerConfig) -> Settings {
    let mut s = Settings::default();
    s.broker.url = amqp_addr().into();
    s.broker.connection_name = unique(prefix);
    s.worker.shutdown_grace = Duration::from_secs(5);
    s.breakers.insert("dep".into(), breaker);
    s.consumers.push({
        let mut v = ConsumerSettings::default();
        v.queue = unique(prefix);
        v.breaker = "dep".into();
        v.handler = handler.into();
        v.prefetch = 50;
        v.concurrency = 8;
        v.retry = RetrySettings::new(vec![Duration::from_millis(500), Duration::from_secs(1)]);
        v
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

/// The breaker's transitions, collected from now on.
pub fn record_transitions(breaker: &Breaker) -> Arc<Mutex<Vec<Transition>>> {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let mut rx = breaker.transitions();
    let s = sink.clone();
    tokio::spawn(async move {
        while let Ok(t) = rx.recv().await {
            s.lock().unwrap().push(t);
        }
    });
    sink
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
        let transitions = record_transitions(&breaker);
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

#[derive(serde::Deserialize)]
pub struct PickyMessage {
    kind: String,
}

/// A handler that does what each message's `kind` says: "ok" succeeds,
/// "bad" is permanent ("amount is negative"), "flaky" fails transiently
/// ("billing timed out"), "panic" (or "boom") panics ("handler blew up on
/// purpose"); any other kind is permanent.
pub struct Picky;

impl rabbit_guard::handler::Handler for Picky {
    type Message = rabbit_guard::handler::Json<PickyMessage>;

    async fn handle(
        &self,
        rabbit_guard::handler::Json(msg): rabbit_guard::handler::Json<PickyMessage>,
        _ctx: &rabbit_guard::handler::Context,
    ) -> Result<(), rabbit_guard::handler::HandlerError> {
        use rabbit_guard::handler::HandlerError;
        match msg.kind.as_str() {
            "ok" => Ok(()),
            "bad" => Err(HandlerError::permanent("amount is negative")),
            "flaky" => Err(HandlerError::transient("billing timed out")),
            "panic" | "boom" => panic!("handler blew up on purpose"),
            other => Err(HandlerError::permanent(format!("unknown kind {other}"))),
        }
    }
}
