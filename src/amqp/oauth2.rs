//! OAuth 2 access tokens as the broker password (`[broker.oauth2]`): read
//! from a file an operator's sidecar keeps fresh, or obtained with a
//! client-credentials grant; renewed before they expire and sent to the
//! open connections with AMQP `update-secret` (see
//! [`connection`](super::connection)). A token is a secret: it is never
//! printed, and only its expiry is logged.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::OAuth2Settings;
use crate::secret::Secret;

/// How often a token file is looked at for a new token.
const FILE_POLL: Duration = Duration::from_secs(2);
/// First and longest wait before asking for a token again after a failure.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A token larger than this is not one.
const MAX_TOKEN: u64 = 64 * 1024;

/// An access token and when it expires (its JWT `exp`, or the grant's
/// `expires_in`), when known.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) value: Secret,
    pub(crate) expires: Option<SystemTime>,
}

impl Token {
    fn new(value: &str, expires_in: Option<Duration>) -> Self {
        let expires = expires_in
            .and_then(|d| SystemTime::now().checked_add(d))
            .or_else(|| jwt_expiry(value));
        Self {
            value: Secret::new(value),
            expires,
        }
    }

    /// `in 4m 59s` / `expired` / `with no known expiry`, for logs.
    pub(crate) fn expiry(&self) -> String {
        match self.expires.map(|e| e.duration_since(SystemTime::now())) {
            None => "with no known expiry".to_owned(),
            Some(Ok(left)) => format!(
                "expiring in {}",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            ),
            Some(Err(_)) => "already expired".to_owned(),
        }
    }
}

/// The `exp` claim of a JWT, read without checking the signature (the
/// broker checks it; the worker only wants to know when to renew).
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// Why no token could be had, in words that name the setting.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TokenError(pub(crate) String);

/// The first line of a file, trimmed: a token or a client secret.
fn first_line(key: &str, path: &Path) -> Result<String, TokenError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| TokenError(format!("{key} {}: cannot read it ({e})", path.display())))?;
    if meta.len() > MAX_TOKEN {
        return Err(TokenError(format!(
            "{key} {}: {} bytes; a token or secret is a line",
            path.display(),
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokenError(format!("{key} {}: cannot read it ({e})", path.display())))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(TokenError(format!(
            "{key} {}: the file is empty; write it on the first line",
            path.display()
        )));
    }
    Ok(line.to_owned())
}

/// Where tokens come from, and the newest one, for every connection of a
/// worker.
#[derive(Debug)]
pub(crate) struct TokenSource {
    settings: OAuth2Settings,
    newest: watch::Sender<Option<Arc<Token>>>,
    #[cfg(feature = "http-handler")]
    client: reqwest::Client,
}

impl TokenSource {
    /// A source for `settings`; no token yet (see [`fetch`](Self::fetch)).
    ///
    /// # Errors
    ///
    /// When the HTTP client for the grant cannot be made.
    pub(crate) fn new(settings: &OAuth2Settings) -> Result<Self, TokenError> {
        Ok(Self {
            settings: settings.clone(),
            newest: watch::Sender::new(None),
            #[cfg(feature = "http-handler")]
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| {
                    TokenError(format!(
                        "cannot make the HTTP client for broker.oauth2.token_url: {e}"
                    ))
                })?,
        })
    }

    /// The newest token, watched: connections send each new one.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<Token>>> {
        self.newest.subscribe()
    }

    /// Gets a token now (the file's, or a new grant) and makes it the
    /// newest.
    ///
    /// # Errors
    ///
    /// A sentence naming the setting: the file cannot be read, the grant
    /// was refused or answered nothing usable.
    pub(crate) async fn fetch(&self) -> Result<Arc<Token>, TokenError> {
        let token = Arc::new(self.obtain().await?);
        self.newest.send_replace(Some(token.clone()));
        Ok(token)
    }

    async fn obtain(&self) -> Result<Token, TokenError> {
        if let Some(path) = &self.settings.token_file {
            let value = first_line("broker.oauth2.token_file", path)?;
            return Ok(Token::new(&value, None));
        }
        self.grant().await
    }

    #[cfg(feature = "http-handler")]
    async fn grant(&self) -> Result<Token, TokenError> {
        let (Some(url), Some(id), Some(secret_file)) = (
            &self.settings.token_url,
            &self.settings.client_id,
            &self.settings.client_secret_file,
        ) else {
            return Err(TokenError(
                "broker.oauth2 needs token_file, or token_url with client_id and client_secret_file".into(),
            ));
        };
        let secret = first_line("broker.oauth2.client_secret_file", secret_file)?;
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials")
                .append_pair("client_id", id)
                .append_pair("client_secret", &secret);
            if let Some(scope) = &self.settings.scope {
                form.append_pair("scope", scope);
            }
            form.finish()
        };
        let shown = url.masked();
        let response = self
            .client
            .post(url.expose())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| {
                TokenError(format!(
                    "broker.oauth2.token_url {shown}: {}",
                    e.without_url()
                ))
            })?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| TokenError(format!("broker.oauth2.token_url {shown}: {e}")))?;
        let scrub = |text: &str| crate::secret::scrub_cut(text, &[secret.as_str()], 200);
        if !status.is_success() {
            return Err(TokenError(format!(
                "broker.oauth2.token_url {shown} answered {status}: {} (check client_id and client_secret_file)",
                scrub(body.trim())
            )));
        }
        let answer: serde_json::Value = serde_json::from_str(&body).map_err(|_| {
            TokenError(format!(
                "broker.oauth2.token_url {shown} answered {status} with something that is not JSON"
            ))
        })?;
        let token = answer
            .get("access_token")
            .and_then(serde_json::Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                TokenError(format!(
                    "broker.oauth2.token_url {shown} answered without an access_token"
                ))
            })?;
        let expires_in = answer
            .get("expires_in")
            .and_then(serde_json::Value::as_u64)
            .map(Duration::from_secs);
        Ok(Token::new(token, expires_in))
    }

    #[cfg(not(feature = "http-handler"))]
    async fn grant(&self) -> Result<Token, TokenError> {
        Err(TokenError(
            "broker.oauth2.token_url needs an HTTP client, and this build has none (cargo feature http-handler): use broker.oauth2.token_file".into(),
        ))
    }

    /// Keeps the newest token fresh until `shutdown`: a token file is read
    /// again every 2 s and whenever the token in it changes, it becomes the
    /// newest; a grant is made again `renew_before` ahead of the token's
    /// expiry (retried with backoff when it fails).
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = crate::backoff::exponential(RETRY_MIN, RETRY_MAX);
        let mut warned_stale = false;
        loop {
            let newest = self.newest.borrow().clone();
            let wait = match (&self.settings.token_file, &newest) {
                (Some(_), _) => FILE_POLL,
                (None, Some(t)) => t
                    .expires
                    .and_then(|e| e.checked_sub(self.settings.renew_before))
                    .and_then(|at| at.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::ZERO),
                (None, None) => Duration::ZERO,
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.obtain().await {
                Ok(token) => {
                    backoff = crate::backoff::exponential(RETRY_MIN, RETRY_MAX);
                    if newest.as_deref() == Some(&token) {
                        // The file still holds the same token: a sidecar
                        // late with the new one is worth one warning.
                        let due = token.expires.is_some_and(|e| {
                            e.duration_since(SystemTime::now())
                                .map_or(true, |left| left < self.settings.renew_before)
                        });
                        if due && !warned_stale {
                            warn!(token = %token.expiry(), "broker.oauth2.token_file still holds the same token, and it is about to expire: whatever renews the file is late");
                            warned_stale = true;
                        }
                        continue;
                    }
                    warned_stale = false;
                    info!(token = %token.expiry(), "new OAuth 2 token: sending it to the open connections");
                    self.newest.send_replace(Some(Arc::new(token)));
                }
                Err(e) => {
                    let delay = backoff.next().unwrap_or(RETRY_MAX);
                    warn!(error = %e, retry_in = %humantime::format_duration(delay), "could not renew the OAuth 2 token");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.signature",
            b64(&serde_json::json!({"alg": "RS256", "kid": "k"})),
            b64(&serde_json::json!({"sub": "w", "exp": exp}))
        )
    }

    #[test]
    fn a_jwt_says_when_it_expires_and_anything_else_does_not() {
        let exp = 2_000_000_000;
        assert_eq!(
            jwt_expiry(&jwt(exp)),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
        );
        for not_one in ["", "opaque-token", "a.b.c", "a.e30.c", "a.!!!.c"] {
            assert_eq!(jwt_expiry(not_one), None, "{not_one}");
        }
        let t = Token::new("opaque", Some(Duration::from_secs(300)));
        assert!(t.expiry().starts_with("expiring in 4m"), "{}", t.expiry());
        assert!(
            !format!("{t:?}").contains("opaque"),
            "a token never prints: {t:?}"
        );
    }
}
