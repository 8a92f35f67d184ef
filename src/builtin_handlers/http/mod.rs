use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};

use crate::config::ConsumerSettings;
use crate::handler::{Context, Handler, HandlerError, erase};

use super::http_settings::{FollowRedirects, HttpSettings};

/// `handler = "http"`: its settings' problems, and the handler built from them.
pub(super) const BUILTIN: super::Builtin = super::Builtin {
    name: "http",
    problems: |c| match &c.http {
        None => vec![(
            "http.url".into(),
            None,
            "must be set for handler = \"http\"".into(),
        )],
        Some(h) => h.problems(),
    },
    build,
};

fn build(c: &ConsumerSettings, call_timeout: Duration) -> super::Built {
    let settings = c
        .http
        .as_ref()
        .ok_or("http.url must be set for handler = \"http\"")?;
    Ok(erase(
        HttpHandler::new(settings, call_timeout).map_err(|e| e.to_string())?,
    ))
}

/// Sends each message body to an HTTP endpoint.
///
/// The request carries the body, its `content_type` (default
/// `application/octet-stream`), `X-Message-Id` (when the message has one),
/// `X-Attempt`, and the configured extra headers (marked sensitive, so
/// they never print). Error texts show the URL with its credentials masked.
///
/// | response | outcome |
/// |---|---|
/// | 2xx | success: ack |
/// | connect error, timeout, 5xx, `http.transient_statuses` (default 408, 429) | transient: counts against the breaker, retried |
/// | a redirect (3xx), unless `http.follow_redirects = "same-origin"` follows it | permanent: dead-lettered naming the origin it pointed to |
/// | any other status | permanent: dead-lettered with the status and the start of the body |
#[derive(Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: reqwest::Url,
    shown_url: String,
    method: Method,
    headers: HeaderMap,
    transient: Vec<StatusCode>,
    follow_redirects: FollowRedirects,
    /// The configured secrets (header values, URL credentials) in every
    /// form a request carries them, cut out of any response text a
    /// dependency echoes back into an error.
    secrets: Vec<String>,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // By hand: the URL's own Debug would print its credentials.
        f.debug_struct("HttpHandler")
            .field("url", &self.shown_url)
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("transient", &self.transient)
            .finish_non_exhaustive()
    }
}

/// Why an [`HttpHandler`] cannot be built from its settings (validation
/// reports these first, with their keys).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpSettingsError {
    /// `http.url` does not parse.
    #[error("http.url {url:?} is not a URL: {source}")]
    Url {
        /// The URL, credentials masked.
        url: String,
        /// The parser's error.
        #[source]
        source: url::ParseError,
    },
    /// `http.method` is no HTTP method.
    #[error("http.method {0:?} is not an HTTP method")]
    Method(String),
    /// A header name is not one.
    #[error("http.headers: {0:?} is not a header name")]
    HeaderName(String),
    /// A header value has characters a header cannot carry.
    #[error("http.headers.{0}: not a valid header value")]
    HeaderValue(String),
    /// A transient status is no HTTP status.
    #[error("http.transient_statuses: {0} is not an HTTP status")]
    Status(u16),
    /// reqwest could not make its client (TLS set-up).
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// How much of an error response body is kept in the error text.
const BODY_SNIPPET: usize = 512;

impl HttpHandler {
    /// A handler for `settings`. Calls are bounded by the breaker's
    /// `call_timeout` by the worker; `timeout` is a backstop for the
    /// connection itself.
    ///
    /// # Errors
    ///
    /// [`HttpSettingsError`] naming the bad key when the URL, method, a
    /// header or a status is invalid.
    pub fn new(settings: &HttpSettings, timeout: Duration) -> Result<Self, HttpSettingsError> {
        let url = reqwest::Url::parse(settings.url.expose()).map_err(|source| {
            HttpSettingsError::Url {
                url: settings.url.masked(),
                source,
            }
        })?;
        let method = Method::from_bytes(settings.method.as_bytes())
            .map_err(|_| HttpSettingsError::Method(settings.method.clone()))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &settings.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| HttpSettingsError::HeaderName(name.clone()))?;
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| HttpSettingsError::HeaderValue(name.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(redirect_policy(settings.follow_redirects, &url))
            .build()
            .map_err(HttpSettingsError::Client)?;
        let transient = settings
            .transient_statuses
            .iter()
            .map(|&code| StatusCode::from_u16(code).map_err(|_| HttpSettingsError::Status(code)))
            .collect::<Result<_, _>>()?;
        let header_values: Vec<&str> = settings.headers.values().map(|v| v.expose()).collect();
        let secrets = crate::secret::echoed_forms(Some(&url), &header_values);
        Ok(Self {
            client,
            shown_url: settings.url.masked(),
            url,
            method,
            headers,
            transient,
            follow_redirects: settings.follow_redirects,
            secrets,
        })
    }
}

impl HttpHandler {
    /// True for a status that means the dependency failed (5xx, or one of
    /// `http.transient_statuses`) rather than the message.
    fn is_transient(&self, status: StatusCode) -> bool {
        status.is_server_error() || self.transient.contains(&status)
    }
}

impl Handler for HttpHandler {
    type Message = Vec<u8>;

    async fn handle(&self, body: Vec<u8>, ctx: &Context) -> Result<(), HandlerError> {
        let mut request = self
            .client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .header(
                CONTENT_TYPE,
                ctx.content_type().unwrap_or("application/octet-stream"),
            )
            .header("X-Attempt", ctx.attempt().to_string())
            .body(body);
        if let Some(id) = ctx.message_id() {
            request = request.header("X-Message-Id", id);
        }
        // W3C trace context, so the dependency's spans join the publisher's
        // trace: this delivery's own span when it is exported, else the
        // message's as it came.
        #[cfg(feature = "otel")]
        let exported = crate::trace_context::current();
        #[cfg(not(feature = "otel"))]
        let exported: Vec<(String, String)> = Vec::new();
        let forwarded = !exported.is_empty();
        for (name, value) in exported {
            request = request.header(name, value);
        }
        if !forwarded
            && let Some(tp) = crate::trace_context::TraceParent::from_header(
                ctx.header(crate::trace_context::TRACEPARENT),
            )
        {
            request = request.header(crate::trace_context::TRACEPARENT, tp.header);
            if let Some(state) =
                crate::trace_context::tracestate(ctx.header(crate::trace_context::TRACESTATE))
            {
                request = request.header(crate::trace_context::TRACESTATE, state);
            }
        }
        let response = match request.send().await {
            Ok(response) => response,
            // The request could not even be built from this message (a
            // message id or content type with a control character): the
            // message's fault, not the dependency's.
            Err(e) if e.is_builder() => {
                return Err(HandlerError::permanent(format!(
                    "{} {}: the message cannot be sent as an HTTP request: {}",
                    self.method,
                    self.shown_url,
                    e.without_url()
                )));
            }
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "request failed"
                };
                // The error's own text would carry the full URL, secrets included.
                return Err(HandlerError::transient(format!(
                    "{} {}: {kind}: {}",
                    self.method,
                    self.shown_url,
                    e.without_url()
                )));
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            // Not followed (or not any further): where it pointed, as an
            // origin only (its path or query may carry anything).
            let to = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| response.url().join(l).ok())
                .map_or_else(
                    || "no usable Location".to_owned(),
                    |u| format!("to {}", u.origin().ascii_serialization()),
                );
            let why = match self.follow_redirects {
                FollowRedirects::SameOrigin => {
                    "not followed: it leaves the URL's origin, or came after 5 others"
                }
                _ => {
                    "redirects are not followed (http.follow_redirects = \"same-origin\" follows those that stay on the URL's origin)"
                }
            };
            return Err(HandlerError::permanent(format!(
                "{} {}: {status} {to}; {why}",
                self.method, self.shown_url
            )));
        }
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        let snippet = body_snippet(response, &secrets).await;
        let message = format!("{} {}: {status}: {snippet}", self.method, self.shown_url);
        if self.is_transient(status) {
            Err(HandlerError::transient(message))
        } else {
            Err(HandlerError::permanent(message))
        }
    }
}

/// Most redirects followed on the same origin.
const MAX_REDIRECTS: usize = 5;

/// `http.follow_redirects` as reqwest's policy: none, or those that stay
/// on `url`'s origin (scheme, host and port: an https URL is never sent
/// on over http), at most [`MAX_REDIRECTS`].
fn redirect_policy(follow: FollowRedirects, url: &reqwest::Url) -> reqwest::redirect::Policy {
    match follow {
        FollowRedirects::SameOrigin => {
            let origin = url.origin();
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.url().origin() == origin && attempt.previous().len() <= MAX_REDIRECTS {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            })
        }
        _ => reqwest::redirect::Policy::none(),
    }
}

/// The start of an error response's body with `secrets` masked, reading no
/// more than [`BODY_SNIPPET`] bytes of it plus the longest secret's length
/// (a dependency may answer a 500 with a body of any size; a secret across
/// the cut is masked whole). The rest is never read: the connection is
/// dropped.
async fn body_snippet(mut response: reqwest::Response, secrets: &[&str]) -> String {
    // One byte more than is kept, so the cut is marked.
    let limit = BODY_SNIPPET + 1 + secrets.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut bytes = Vec::with_capacity(limit);
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - bytes.len());
                bytes.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    crate::secret::scrub_cut(text.trim(), secrets, BODY_SNIPPET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(handler: &HttpHandler, code: u16) -> bool {
        handler.is_transient(StatusCode::from_u16(code).unwrap())
    }

    #[test]
    fn status_classes() {
        let h = HttpHandler::new(
            &HttpSettings::to("http://127.0.0.1:1/x"),
            Duration::from_secs(1),
        )
        .unwrap();
        for code in [500, 502, 503, 504, 408, 429] {
            assert!(transient(&h, code), "{code} should be transient");
        }
        for code in [400, 401, 403, 404, 409, 410, 422, 301, 304] {
            assert!(!transient(&h, code), "{code} should be permanent");
        }
        let mut settings = HttpSettings::to("http://127.0.0.1:1/x");
        settings.transient_statuses = vec![401, 403];
        let h = HttpHandler::new(&settings, Duration::from_secs(1)).unwrap();
        assert!(
            transient(&h, 401) && transient(&h, 403) && transient(&h, 503) && !transient(&h, 429),
            "the list replaces the default; 5xx stay transient"
        );
    }
}
