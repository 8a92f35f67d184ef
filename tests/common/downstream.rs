//! The dependency under test: an HTTP server on 127.0.0.1 that can be
//! healthy, failing, slow or rule-driven per message, recording every call.

use super::*;

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
    /// The W3C trace context the request carried, if any.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

#[derive(Default)]
struct DownstreamInner {
    mode: Mutex<Option<Mode>>,
    rules: Mutex<HashMap<String, Rule>>,
    seen: Mutex<HashMap<String, u32>>,
    calls: Mutex<Vec<Call>>,
    /// Requests that arrived (answered or not yet).
    arrived: std::sync::atomic::AtomicUsize,
    /// `GET /health`: each check's time and status (not counted as calls).
    health_checks: Mutex<Vec<(Instant, u16)>>,
    /// The status `/health` gives whatever the mode (unset: it follows the mode).
    health_override: Mutex<Option<u16>>,
}

/// `GET /health` answers as the mode does (200 healthy, 503 failing) unless
/// an override is set, and is recorded apart from the calls.
async fn health_handler(State(inner): State<Arc<DownstreamInner>>) -> StatusCode {
    let status = inner.health_override.lock().unwrap().unwrap_or_else(|| {
        match inner.mode.lock().unwrap().unwrap_or(Mode::Healthy) {
            Mode::Failing => 503,
            Mode::Status(s) => s,
            _ => 200,
        }
    });
    inner
        .health_checks
        .lock()
        .unwrap()
        .push((Instant::now(), status));
    StatusCode::from_u16(status).unwrap()
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
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (traceparent, tracestate) = (header("traceparent"), header("tracestate"));
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
        traceparent,
        tracestate,
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
            .route("/health", axum::routing::get(health_handler))
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

    /// Where its health endpoint is.
    pub fn health_url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    /// Makes `/health` answer `status` whatever the mode; `None`: follow it.
    pub fn set_health(&self, status: Option<u16>) {
        *self.inner.health_override.lock().unwrap() = status;
    }

    /// Every `GET /health` so far: when, and what it answered.
    pub fn health_checks(&self) -> Vec<(Instant, u16)> {
        self.inner.health_checks.lock().unwrap().clone()
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
