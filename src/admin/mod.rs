//! The admin HTTP endpoint: Prometheus metrics, liveness and readiness,
//! breaker status, and manual breaker control.
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when connected and every consumer has a working channel (a consumer paused by its breaker is ready; the body says so); 503 otherwise |
//! | `GET /breakers` | every breaker: state, since, why, window counts, next probe time, consumers |
//! | `GET /status` | breakers, consumers and connections (what `rabbit-guard status` shows) |
//! | `POST /breakers/{name}/{open,close,disable,reset}` | manual control: needs the bearer token (`admin.token` or `admin.token_file`); off without one |
//!
//! Requests from a web page are refused (see [`guard`]): a `POST` must come
//! with the token and with this endpoint's own `Host` (and `Origin`, if
//! any), and while on loopback every request must.

mod guard;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::breaker::ManualAction;
use crate::error::Error;
pub(crate) use guard::{Access, Refusal, resolve_token};
pub(crate) use view::WorkerView;

/// The running endpoint, to stop at shutdown.
#[derive(Debug)]
pub(crate) struct AdminHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminHandle {
    /// Stops serving and waits for the server to finish.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Every how often recorded handler durations are drained into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the endpoint when `admin.listen` is set: reads the token, binds
/// (a taken port fails here, before any broker work), and serves `view`.
///
/// # Errors
///
/// An unreadable `admin.token_file`, or an address that cannot be bound.
pub(crate) async fn start(
    settings: &crate::config::AdminSettings,
    view: WorkerView,
    metrics: crate::metrics::Metrics,
) -> Result<Option<AdminHandle>, Error> {
    let Some(listen) = &settings.listen else {
        return Ok(None);
    };
    let token = resolve_token(settings).map_err(|message| {
        Error::Config(crate::config::ConfigError::Invalid(vec![
            crate::config::Problem {
                key: "admin.token_file".into(),
                value: None,
                message,
            },
        ]))
    })?;
    let (listener, addr) = bind(listen).await?;
    let access = Access::new(addr, token, settings);
    let stop = CancellationToken::new();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        // Drain recorded durations into their buckets even when nobody
        // scrapes, so memory stays flat.
        tokio::select! {
            () = metrics.run_upkeep_every(UPKEEP_EVERY) => {}
            () = upkeep_stop.cancelled() => {}
        }
    });
    let limits = Limits {
        max_connections: usize::try_from(settings.max_connections).unwrap_or(64),
        request_timeout: settings.request_timeout,
    };
    let task = tokio::spawn(serve(listener, view, access, limits, stop.clone()));
    Ok(Some(AdminHandle { stop, task }))
}

/// Binds the admin address.
///
/// # Errors
///
/// [`Error::Io`] naming the address when it cannot be bound.
pub(crate) async fn bind(listen: &str) -> Result<(TcpListener, SocketAddr), Error> {
    let addr: SocketAddr = listen.parse().map_err(|_| Error::Io {
        context: format!("admin.listen {listen:?} is not an address:port"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: format!("cannot listen on admin.listen {addr}"),
        source,
    })?;
    let local = listener.local_addr().unwrap_or(addr);
    Ok((listener, local))
}

/// What one client may take of the endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections served at once (`admin.max_connections`).
    pub(crate) max_connections: usize,
    /// A request head must arrive, and an idle connection send its next
    /// one, within this (`admin.request_timeout`).
    pub(crate) request_timeout: Duration,
}

/// Serves the endpoint until `shutdown`, with `access` deciding who may.
pub(crate) async fn serve(
    listener: TcpListener,
    view: WorkerView,
    access: Access,
    limits: Limits,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        let control = if access.control_enabled() {
            "bearer token"
        } else {
            "off: set admin.token or admin.token_file to allow it"
        };
        info!(%addr, manual_control = control, "admin endpoint listening");
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/breakers", get(breakers))
        .route("/status", get(status))
        .route("/breakers/{name}/{action}", post(control))
        .layer(middleware::from_fn_with_state(access.clone(), same_origin))
        .with_state((view, access));
    serve_connections(listener, app, limits, shutdown).await;
}

/// How long open connections may take to finish at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Accepts and serves at most `limits.max_connections` connections at once:
/// the rest wait in the kernel's backlog, costing the worker no file
/// descriptor, so idle clients cannot take the descriptors its broker
/// connections need. Each connection is closed when a request's head takes
/// longer than `limits.request_timeout`, or it sits idle that long.
async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut refused = false;
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: try again shortly, logged once a run.
                    if !refused {
                        warn!(error = %e, "admin endpoint: cannot accept a connection; trying again");
                        refused = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        refused = false;
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        let timeout = limits.request_timeout;
        connections.spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .keep_alive(true);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
}

type AppState = (WorkerView, Access);

/// Refuses requests a web page made (foreign `Host` or `Origin`) before
/// any route sees them.
async fn same_origin(State(access): State<Access>, request: Request, next: Next) -> Response {
    match access.check_origin(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refused(&refusal),
    }
}

fn refused(refusal: &Refusal) -> Response {
    match refusal {
        Refusal::Unauthorized(m) => error(StatusCode::UNAUTHORIZED, m),
        Refusal::Forbidden(m) => error(StatusCode::FORBIDDEN, m),
    }
}

async fn metrics(State((view, _)): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        view.render_metrics(),
    )
        .into_response()
}

async fn readyz(State((view, _)): State<AppState>) -> Response {
    let (ready, body) = view.readiness();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn breakers(State((view, _)): State<AppState>) -> Response {
    axum::Json(crate::status::BreakersView {
        breakers: view.breakers(),
        fleet: view.fleet().map(crate::fleet::Fleet::view),
    })
    .into_response()
}

async fn status(State((view, _)): State<AppState>) -> Response {
    axum::Json(view.status()).into_response()
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, axum::Json(json!({ "error": message }))).into_response()
}

async fn control(
    State((view, access)): State<AppState>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = access.check_token(&headers) {
        return refused(&refusal);
    }
    let action = match action.as_str() {
        "open" => ManualAction::Open,
        "close" => ManualAction::Close,
        "disable" => ManualAction::Disable,
        "reset" => ManualAction::Reset,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "unknown action {:?}: use open, close, disable or reset",
                    crate::text::printable(&crate::text::truncate(other, 40))
                ),
            );
        }
    };
    let Some(breaker) = view.breaker(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!(
                "no breaker named {:?}",
                crate::text::printable(&crate::text::truncate(&name, 80))
            ),
        );
    };
    let before = breaker.state();
    let at = tokio::time::Instant::now();
    let state = breaker.apply(action);
    // The change is announced to the fleet like any other; the answer says
    // whether the broker confirmed it.
    let fleet = match view.fleet() {
        None => None,
        Some(f) if !f.is_joined() => Some(
            "applied here only: this worker has lost the fleet (it announces the change when it rejoins)"
                .to_owned(),
        ),
        Some(_) if before == state && action != ManualAction::Reset => Some(format!(
            "no change: already {} here, nothing announced",
            state.name()
        )),
        Some(f) => Some(
            f.outcome(&name, at, std::time::Duration::from_secs(6))
                .await,
        ),
    };
    info!(breaker = %name, action = ?action, state = state.name(), fleet = fleet.as_deref().unwrap_or("off"), "breaker changed by hand");
    match fleet {
        Some(fleet) => {
            axum::Json(json!({ "breaker": name, "state": state.name(), "fleet": fleet }))
        }
        None => axum::Json(json!({ "breaker": name, "state": state.name() })),
    }
    .into_response()
}
