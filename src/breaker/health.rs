//! Active health checks: while a breaker is open, ask the dependency itself
//! whether it is back, instead of spending a real message on each trial.
//!
//! ```text
//!   Open ──check fails──▶ Open (no trial, however long the open time was)
//!     │
//!     └──check passes──▶ HalfOpen at once ──▶ real probes, as without a check
//! ```
//!
//! A check that passed while the dependency still failed the trial that
//! followed is not trusted again until it has failed once (it then tells
//! the truth again) or the open time has run out: a health endpoint that
//! always says "ok" costs no more messages than having no check at all.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::handler::BoxError;
use crate::secret::SecretUrl;

/// The shortest `health_check.interval`: a check is a request to a
/// dependency that is already in trouble.
pub const MIN_HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Why a `health_check.url` cannot be checked in a build without reqwest.
pub(crate) const NO_HTTP_CLIENT: &str = "this build has no HTTP client (the http-handler feature is off): register a HealthCheck instead";

/// How much of a failed check's error text is kept (an HTTP body can be huge).
const ERROR_TEXT: usize = 300;

/// `[breakers.NAME.health_check]`: how the dependency is asked whether it
/// is back while the breaker is open.
///
/// With `url`, the worker sends `GET url` and takes a 2xx answer as healthy.
/// Without it, a [`HealthCheck`] registered for the breaker with
/// [`WorkerBuilder::health_check`](crate::WorkerBuilder::health_check) runs.
/// A breaker with a health check leaves the open state only when a check
/// passes; the worker runs the checks (a [`Breaker`](super::Breaker) used on
/// its own runs them with [`Breaker::run_health_check`](super::Breaker::run_health_check)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthCheckConfig {
    /// `GET` this URL; 2xx = healthy, anything else (redirects included),
    /// a connection error or no answer within `timeout` = unhealthy.
    /// Printed with its credentials masked.
    pub url: Option<SecretUrl>,
    /// Time between the starts of two checks while the breaker is open
    /// (the first runs one interval after it opened). At least 100ms.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A check without an answer within this time failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            url: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }
}

impl HealthCheckConfig {
    /// A check every `interval`, each failed after `timeout`: `GET url`
    /// (2xx = healthy) when given, else the [`HealthCheck`] registered for
    /// the breaker.
    #[must_use]
    pub fn new(url: Option<SecretUrl>, interval: Duration, timeout: Duration) -> Self {
        Self {
            url,
            interval,
            timeout,
        }
    }

    /// Every problem with these settings, as `(key, message)`; keys are
    /// relative to the breaker's table (`health_check.url`).
    #[must_use]
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(url) = &self.url {
            match url::Url::parse(url.expose()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                    if cfg!(not(feature = "http-handler")) {
                        out.push(("health_check.url", NO_HTTP_CLIENT.to_owned()));
                    }
                }
                Ok(_) => out.push((
                    "health_check.url",
                    "must be an http:// or https:// URL with a host".to_owned(),
                )),
                Err(e) => out.push(("health_check.url", format!("not a URL ({e})"))),
            }
        }
        if self.interval < MIN_HEALTH_CHECK_INTERVAL {
            out.push((
                "health_check.interval",
                "must be at least 100ms (each check is a request to a dependency in trouble)"
                    .to_owned(),
            ));
        }
        if self.timeout.is_zero() {
            out.push((
                "health_check.timeout",
                "must be greater than zero".to_owned(),
            ));
        }
        for (key, value) in [
            ("health_check.interval", self.interval),
            ("health_check.timeout", self.timeout),
        ] {
            if value > crate::limits::MAX_DURATION {
                out.push((key, "must be at most 100 years (\"100y\")".to_owned()));
            }
        }
        out
    }

    /// What is checked, fit to print: the URL masked, or `custom`.
    #[must_use]
    pub fn target(&self) -> String {
        self.url
            .as_ref()
            .map_or_else(|| "custom".to_owned(), SecretUrl::masked)
    }
}

/// A custom health check, registered for a breaker with
/// [`WorkerBuilder::health_check`](crate::WorkerBuilder::health_check).
/// Implement it with a plain `async fn`.
///
/// ```
/// use rabbit_guard::breaker::HealthCheck;
/// use rabbit_guard::handler::BoxError;
///
/// struct PoolPing(/* a database pool */);
///
/// impl HealthCheck for PoolPing {
///     async fn check(&self) -> Result<(), BoxError> {
///         // e.g. `sqlx::query("SELECT 1").execute(&self.0).await?;`
///         Ok(())
///     }
/// }
/// ```
pub trait HealthCheck: Send + Sync + 'static {
    /// `Ok` when the dependency looks ready for real messages again.
    ///
    /// # Errors
    ///
    /// Why it does not; the text is logged and shown on `/breakers`.
    ///
    /// # Cancel safety
    ///
    /// The future is dropped when it outlives `health_check.timeout` (the
    /// check then failed) or the worker stops.
    fn check(&self) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// A [`HealthCheck`] behind a pointer, so one worker holds checks of
/// different types.
pub(crate) trait ErasedHealthCheck: Send + Sync + 'static {
    fn check(&self) -> BoxFuture<'_, Result<(), BoxError>>;
}

struct Erased<C>(C);

impl<C: HealthCheck> ErasedHealthCheck for Erased<C> {
    fn check(&self) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(self.0.check())
    }
}

pub(crate) fn erase<C: HealthCheck>(check: C) -> Arc<dyn ErasedHealthCheck> {
    Arc::new(Erased(check))
}

/// The built-in check: `GET url`, 2xx = healthy.
#[cfg(feature = "http-handler")]
pub(crate) struct HttpHealthCheck {
    client: reqwest::Client,
    url: reqwest::Url,
    shown: String,
    /// The URL's credentials in every form a request carries them: cut out
    /// of whatever the endpoint echoes back.
    secrets: Vec<String>,
}

#[cfg(feature = "http-handler")]
impl HttpHealthCheck {
    /// A check of `config.url`, or why there is none.
    pub(crate) fn new(config: &HealthCheckConfig) -> Result<Self, String> {
        let url = config
            .url
            .as_ref()
            .ok_or_else(|| "health_check.url is not set".to_owned())?;
        let shown = url.masked();
        let parsed = reqwest::Url::parse(url.expose())
            .map_err(|e| format!("health_check.url {shown:?} is not a URL ({e})"))?;
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A redirect is an answer, not health: 3xx fails the check.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the health check's HTTP client: {e}"))?;
        let secrets = crate::secret::echoed_forms(Some(&parsed), &[]);
        Ok(Self {
            client,
            url: parsed,
            shown,
            secrets,
        })
    }
}

#[cfg(feature = "http-handler")]
impl HealthCheck for HttpHealthCheck {
    async fn check(&self) -> Result<(), BoxError> {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        let scrub = |text: &str| crate::secret::scrub(text, &secrets);
        // `without_url`: reqwest's errors print the URL, credentials and all.
        let mut response = self
            .client
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "GET {}: {}",
                    self.shown,
                    scrub(&error_text(&e.without_url()))
                )
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // The start of the body says why; an endless one is not read (past
        // the longest secret, so one across the cut is masked whole).
        let limit = ERROR_TEXT + 1 + self.secrets.iter().map(String::len).max().unwrap_or(0);
        let mut body = Vec::new();
        while body.len() < limit {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        body.truncate(limit);
        let body =
            crate::secret::scrub_cut(String::from_utf8_lossy(&body).trim(), &secrets, ERROR_TEXT);
        let body = body.trim();
        Err(if body.is_empty() {
            format!("GET {}: HTTP {status}", self.shown)
        } else {
            format!("GET {}: HTTP {status}: {body}", self.shown)
        }
        .into())
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthResult {
    /// When it ended.
    pub at: Instant,
    /// How long it took.
    pub took: Duration,
    /// `None` when it passed; why it failed otherwise.
    pub error: Option<String>,
}

/// A breaker's health checks so far, as shown on `/breakers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthStatus {
    /// Checks run since the worker started.
    pub checks: u64,
    /// Of them, passed.
    pub passes: u64,
    /// Failed checks in a row now.
    pub failures_in_a_row: u32,
    /// The last check, if any ran.
    pub last: Option<HealthResult>,
}

impl HealthStatus {
    pub(crate) fn note(&mut self, result: HealthResult) {
        self.checks += 1;
        if result.error.is_none() {
            self.passes += 1;
            self.failures_in_a_row = 0;
        } else {
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        }
        self.last = Some(result);
    }
}

/// What a check's result did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthEffect {
    /// The check passed and the breaker went half-open.
    HalfOpen,
    /// The check passed, but the last trial after a passing check failed:
    /// the breaker waits for its open time to end.
    WaitsForOpenTime,
    /// The check failed: the breaker stays open.
    StaysOpen,
    /// The breaker was no longer open (closed or forced by hand meanwhile).
    NotOpen,
}

/// The error text of a failed check: its chain on one line, printable and
/// bounded.
pub(crate) fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    crate::text::truncate(
        &crate::text::printable(&crate::text::error_chain(error)),
        ERROR_TEXT,
    )
}

#[cfg(all(test, feature = "http-handler"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP server on 127.0.0.1 that answers by path with canned bytes;
    /// `/stall` sends the start of an error body and never the rest.
    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut request = vec![0u8; 4096];
                    let n = socket.read(&mut request).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&request[..n]).into_owned();
                    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let head = |status: &str, extra: &str| {
                        format!("HTTP/1.1 {status}\r\n{extra}connection: close\r\n\r\n")
                    };
                    let reply = match path.as_str() {
                        "/ok" => head("200 OK", "content-length: 0\r\n"),
                        "/redirect" => head(
                            "302 Found",
                            "location: http://127.0.0.1:9/health\r\ncontent-length: 0\r\n",
                        ),
                        "/stall" => format!(
                            "{}{}",
                            head("503 Service Unavailable", "content-length: 100000000\r\n"),
                            "down\u{1b}[2J ".repeat(200)
                        ),
                        _ => return, // closes the connection without an answer
                    };
                    let _ = socket.write_all(reply.as_bytes()).await;
                    if path == "/stall" {
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        addr
    }

    fn check(url: String) -> HttpHealthCheck {
        HttpHealthCheck::new(&HealthCheckConfig {
            url: Some(SecretUrl::new(url)),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn text(r: Result<(), BoxError>) -> String {
        error_text(&*r.expect_err("the check should fail"))
    }

    #[tokio::test]
    async fn the_http_check_passes_on_2xx_only_and_stays_bounded_and_quiet() {
        let addr = server().await;
        assert!(check(format!("http://{addr}/ok")).check().await.is_ok());
        let redirect = text(check(format!("http://{addr}/redirect")).check().await);
        assert!(
            redirect.contains("HTTP 302"),
            "a redirect is not health: {redirect}"
        );
        // An endless error body: the start of it is read, not the rest.
        let started = std::time::Instant::now();
        let stall = text(check(format!("http://{addr}/stall")).check().await);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "waited {:?} for a body that never ends",
            started.elapsed()
        );
        assert!(
            stall.contains("HTTP 503") && stall.contains("down"),
            "{stall}"
        );
        assert!(stall.len() <= ERROR_TEXT, "{} bytes: {stall}", stall.len());
        assert!(!stall.contains('\u{1b}'), "a control character in: {stall}");
        // A failure never prints the URL's password.
        let refused = text(
            check(format!("http://probe:hunter2@{addr}/hangup?token=s3cret"))
                .check()
                .await,
        );
        assert!(
            !refused.contains("hunter2") && !refused.contains("s3cret"),
            "{refused}"
        );
        assert!(refused.contains("GET http://probe:***@"), "{refused}");
    }
}
