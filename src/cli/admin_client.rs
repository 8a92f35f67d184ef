//! Asking a running worker's admin endpoint (`rabbit-guard status`, and the
//! breaker check before `dlq replay`).

use std::time::Duration;

use super::output;
use crate::config::Settings;
use crate::status::BreakersView;

/// The admin endpoint's base URL: `--admin` if given, else `admin.listen`
/// (an unspecified address like `0.0.0.0` is asked on loopback).
pub(crate) fn base_url(settings: &Settings, given: Option<&str>) -> Option<String> {
    if let Some(url) = given {
        return Some(url.trim_end_matches('/').to_owned());
    }
    let listen: std::net::SocketAddr = settings.admin.listen.as_deref()?.parse().ok()?;
    let host = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
    };
    Some(format!("http://{host}:{}", listen.port()))
}

/// POST `base/path` with the bearer `token`; the answer's JSON, or the
/// endpoint's own error text.
#[cfg(feature = "admin")]
pub(crate) async fn post_json(
    base: &str,
    path: &str,
    token: Option<&crate::secret::Secret>,
) -> Result<serde_json::Value, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{base}{path}");
    let mut request = client.post(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token.expose());
    }
    let response = request.send().await.map_err(|e| {
        if e.is_connect() {
            format!("no worker answers at {base} (is it running, with admin.listen set?)")
        } else {
            format!("asking {url}: {}", e.without_url())
        }
    })?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("reading {url}: {}", e.without_url()))?;
    let body: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{url} answered {status} with something that is not JSON: {e}"))?;
    if status.is_success() {
        Ok(body)
    } else {
        let why = body["error"].as_str().unwrap_or("no reason given");
        Err(format!("the worker refused ({status}): {why}"))
    }
}

/// GET `base/path`, read as `T`.
pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
) -> Result<T, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{base}{path}");
    let response = client.get(&url).send().await.map_err(|e| {
        if e.is_connect() {
            format!("no worker answers at {base} (is it running, with admin.listen set?)")
        } else {
            format!("asking {url}: {e}")
        }
    })?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("reading {url}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| {
        format!("{url} answered {status} with something that is not a worker's status ({e}); is it a rabbit-guard admin endpoint of this version?")
    })
}

/// The name of an open breaker guarding the work queue whose dead-letter
/// queue is `dlq`, as the worker's admin endpoint reports it. `None` when
/// the breaker is not open, or no admin endpoint is configured or answering
/// (then nobody consumes the work queue, and replaying feeds nothing).
pub(crate) async fn open_breaker_for_dlq(settings: &Settings, dlq: &str) -> Option<String> {
    let consumer = settings
        .consumers
        .iter()
        .find(|c| c.dead_letter_queue() == dlq)?;
    let base = base_url(settings, None)?;
    match get_json::<BreakersView>(&base, "/breakers").await {
        Ok(v) => v
            .breakers
            .iter()
            .find(|b| consumer.breaker_names().contains(&b.name.as_str()) && b.is_open())
            .map(|b| format!("{} ({})", b.name, b.state)),
        Err(e) => {
            output::error(&format!(
                "note: could not check the breaker before replaying: {e}"
            ));
            None
        }
    }
}
