//! `http` under a consumer: the built-in `http` handler's settings, and
//! what is wrong with them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::secret::{Secret, SecretUrl};

/// `http` under a consumer: where the built-in `http` handler sends messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpSettings {
    /// The endpoint that receives each message body. Printed with its user
    /// info and credential-like query parameters masked.
    pub url: SecretUrl,
    /// HTTP method; default `POST`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers. Their values are secret (an API key, a
    /// bearer token): printed as `***`, sent marked sensitive.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Statuses below 500 that mean the dependency failed rather than the
    /// message: like 5xx and connection errors they count against the
    /// breaker and are retried. Any other non-2xx status dead-letters the
    /// message at once.
    #[serde(default = "default_transient_statuses")]
    pub transient_statuses: Vec<u16>,
    /// What to do with a redirect (3xx): `"none"` (default) makes it a
    /// permanent error naming where it pointed; `"same-origin"` follows it
    /// (at most 5) while it stays on the URL's scheme, host and port, so
    /// the configured headers and the message body never reach another
    /// host or leave https.
    #[serde(default)]
    pub follow_redirects: FollowRedirects,
}

/// `http.follow_redirects`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum FollowRedirects {
    /// A 3xx is a permanent error.
    #[default]
    None,
    /// Followed while it stays on the same origin.
    SameOrigin,
}

impl HttpSettings {
    /// Settings for `url` with every other key at its default.
    pub fn to(url: impl Into<String>) -> Self {
        Self {
            url: SecretUrl::new(url),
            method: default_method(),
            headers: BTreeMap::new(),
            transient_statuses: default_transient_statuses(),
            follow_redirects: FollowRedirects::None,
        }
    }
}

fn default_method() -> String {
    "POST".to_owned()
}

/// 408 and 429 ask to come back later.
fn default_transient_statuses() -> Vec<u16> {
    vec![408, 429]
}

impl HttpSettings {
    /// Every problem with these settings, as `(key, shown value, message)`
    /// with keys relative to the consumer (`http.url`); values that may
    /// hold a secret are shown masked or not at all.
    #[must_use]
    pub fn problems(&self) -> Vec<(String, Option<String>, String)> {
        let mut out = Vec::new();
        let shown = || Some(format!("{:?}", self.url.masked()));
        match url::Url::parse(self.url.expose()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
            Ok(_) => out.push((
                "http.url".into(),
                shown(),
                "must be an http:// or https:// URL with a host".into(),
            )),
            Err(e) => out.push(("http.url".into(), shown(), format!("not a URL ({e})"))),
        }
        if http::Method::from_bytes(self.method.as_bytes()).is_err() {
            out.push((
                "http.method".into(),
                Some(format!("{:?}", crate::text::truncate(&self.method, 40))),
                "not an HTTP method".into(),
            ));
        }
        for (name, value) in &self.headers {
            if http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                out.push((
                    "http.headers".into(),
                    Some(format!("{:?}", crate::text::truncate(name, 40))),
                    "not an HTTP header name".into(),
                ));
            } else if http::header::HeaderValue::from_str(value.expose()).is_err() {
                out.push((
                    format!("http.headers.{name}"),
                    None,
                    "not a valid header value (control characters or non-ASCII)".into(),
                ));
            }
        }
        for (j, status) in self.transient_statuses.iter().enumerate() {
            if !(300..500).contains(status) {
                out.push((
                    format!("http.transient_statuses[{j}]"),
                    Some(status.to_string()),
                    "must be a 3xx or 4xx status (2xx is success, 5xx always transient)".into(),
                ));
            }
        }
        out
    }
}
