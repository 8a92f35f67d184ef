//! A stand-in dependency: an HTTP server that answers 200, or 503 while
//! "failing", switched by hand or on a schedule.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::info;

use crate::error::Error;

/// One call the server answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    /// When it arrived.
    pub at: Instant,
    /// What it answered.
    pub status: u16,
}

#[derive(Debug, Default)]
struct Inner {
    failing: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    latency_ms: AtomicU64,
    calls: Option<Mutex<Vec<Call>>>,
    accepted_ids: Option<Mutex<HashSet<String>>>,
}

/// The flaky dependency. Dropping it stops the server.
#[derive(Debug)]
pub(crate) struct FlakyServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

async fn answer(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> StatusCode {
    let latency = inner.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let failing = inner.failing.load(Ordering::Relaxed);
    let status = if failing {
        inner.failed.fetch_add(1, Ordering::Relaxed);
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        inner.ok.fetch_add(1, Ordering::Relaxed);
        StatusCode::OK
    };
    if let (Some(ids), false) = (&inner.accepted_ids, failing)
        && let Some(id) = headers.get("x-message-id").and_then(|v| v.to_str().ok())
    {
        ids.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned());
    }
    if let Some(calls) = &inner.calls {
        calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Call {
                at: Instant::now(),
                status: status.as_u16(),
            });
    }
    status
}

impl FlakyServer {
    /// Listens on `listen` (e.g. `127.0.0.1:0`); with `record`, keeps every
    /// call for [`calls`](Self::calls).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the address cannot be bound.
    pub(crate) async fn start(listen: &str, record: bool) -> Result<Self, Error> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Io {
                context: format!("cannot listen on {listen}"),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "reading the listening address".into(),
            source,
        })?;
        let inner = Arc::new(Inner {
            calls: record.then(|| Mutex::new(Vec::new())),
            accepted_ids: record.then(|| Mutex::new(HashSet::new())),
            ..Inner::default()
        });
        let app = Router::new().fallback(answer).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { inner, addr, task })
    }

    /// Where it listens.
    #[must_use]
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer 503 (`true`) or 200 (`false`) from now on.
    pub(crate) fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::Relaxed);
    }

    /// True while answering 503.
    #[must_use]
    pub(crate) fn failing(&self) -> bool {
        self.inner.failing.load(Ordering::Relaxed)
    }

    /// Delay every answer by this much.
    pub(crate) fn set_latency(&self, latency: Duration) {
        self.inner.latency_ms.store(
            u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// (200s, 503s) answered so far.
    #[must_use]
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.inner.ok.load(Ordering::Relaxed),
            self.inner.failed.load(Ordering::Relaxed),
        )
    }

    /// Distinct message ids (`X-Message-Id`) answered with 200 (0 unless
    /// started with `record`).
    #[must_use]
    pub(crate) fn distinct_accepted(&self) -> u64 {
        self.inner.accepted_ids.as_ref().map_or(0, |ids| {
            ids.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len() as u64
        })
    }

    /// Every call so far (empty unless started with `record`).
    #[must_use]
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.inner
            .calls
            .as_ref()
            .map(|c| {
                c.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .unwrap_or_default()
    }

    /// Alternates healthy and failing forever (for `flaky-server` and
    /// `docker compose up`), logging each switch.
    pub(crate) async fn cycle(&self, healthy: Duration, failing: Duration) {
        loop {
            self.set_failing(false);
            info!(for_ = %humantime::format_duration(healthy), "dependency healthy (200)");
            tokio::time::sleep(healthy).await;
            self.set_failing(true);
            info!(for_ = %humantime::format_duration(failing), "dependency failing (503)");
            tokio::time::sleep(failing).await;
        }
    }
}

impl Drop for FlakyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
