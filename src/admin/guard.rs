//! Who may talk to the admin endpoint: the token for manual control, and the
//! `Host` / `Origin` checks that keep a web page from reaching it (CSRF,
//! DNS rebinding).
//!
//! - Every `POST` (manual breaker control) needs `Authorization: Bearer
//!   <token>`, compared in constant time. Without a configured token
//!   (`admin.token` or `admin.token_file`) manual control is off.
//! - A `POST` whose `Host` or `Origin` is not this endpoint's address is
//!   refused; so is any request with a foreign `Host` while the endpoint
//!   listens on loopback (a page that rebinds its own name to 127.0.0.1 still
//!   sends that name as `Host`).
//! - The endpoint's addresses are its listen IP (any IP when it listens on
//!   every interface; any loopback IP when on loopback), `localhost`, and the
//!   names in `admin.allowed_hosts`, always with the listen port.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, Method, header};
use subtle::ConstantTimeEq;

use crate::config::AdminSettings;
use crate::secret::Secret;

/// The resolved access rules of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    listen: SocketAddr,
    token: Option<Secret>,
    allowed_hosts: Vec<String>,
}

/// Why a request is refused: the status and what to tell the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 401: no token, or the wrong one.
    Unauthorized(&'static str),
    /// 403: the request is not allowed at all (control off, foreign host).
    Forbidden(String),
}

impl Access {
    pub(crate) fn new(listen: SocketAddr, token: Option<Secret>, settings: &AdminSettings) -> Self {
        Self {
            listen,
            token,
            allowed_hosts: settings
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }

    /// True when manual control is on (a token is configured).
    pub(crate) fn control_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks `Host` and `Origin` for any request.
    pub(crate) fn check_origin(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let strict = *method != Method::GET && *method != Method::HEAD;
        if !strict && !self.listen.ip().is_loopback() {
            return Ok(());
        }
        if let Some(host) = headers.get(header::HOST) {
            let host = host.to_str().unwrap_or("");
            if !self.is_own(host, None) {
                return Err(Refusal::Forbidden(format!(
                    "Host {:?} is not this endpoint's address ({}); add the name to admin.allowed_hosts if it is",
                    crate::text::printable(&crate::text::truncate(host, 80)),
                    self.listen
                )));
            }
        }
        if strict && let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let own = url::Url::parse(origin).ok().is_some_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str()
                        .is_some_and(|h| self.is_own(h, u.port_or_known_default()))
            });
            if !own {
                return Err(Refusal::Forbidden(format!(
                    "cross-origin request from {:?} refused: manual control only from the endpoint itself (curl, rabbit-guard)",
                    crate::text::printable(&crate::text::truncate(origin, 80))
                )));
            }
        }
        Ok(())
    }

    /// Checks the bearer token of a control request.
    pub(crate) fn check_token(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            return Err(Refusal::Forbidden(
                "manual control is off: set admin.token or admin.token_file (then send Authorization: Bearer <token>)".into(),
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(given) if bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) => Ok(()),
            _ => Err(Refusal::Unauthorized(
                "missing or wrong bearer token (Authorization: Bearer …)",
            )),
        }
    }

    /// True when `host` (a `Host` header, `name[:port]`; or a bare name with
    /// `port` given apart) names this endpoint.
    fn is_own(&self, host: &str, port: Option<u16>) -> bool {
        let (name, port) = match port {
            Some(p) => (host, Some(p)),
            None => split_host_port(host),
        };
        // No port in Host means the scheme's default, 80 for plain HTTP.
        if port.unwrap_or(80) != self.listen.port() {
            return false;
        }
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let listen_ip = self.listen.ip();
        if let Ok(ip) = name.parse::<IpAddr>() {
            return ip == listen_ip
                || listen_ip.is_unspecified()
                || (listen_ip.is_loopback() && ip.is_loopback());
        }
        let name = name.to_ascii_lowercase();
        (name == "localhost" && (listen_ip.is_loopback() || listen_ip.is_unspecified()))
            || self.allowed_hosts.contains(&name)
    }
}

/// `name:port` → (`name`, port); `[v6]:port` and a bare name too.
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) => (ip, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, port.parse().ok().or(Some(0))),
        _ => (host, None),
    }
}

/// The token from `admin.token`, or the first line of `admin.token_file`.
///
/// # Errors
///
/// A sentence naming the file when it cannot be read or holds no token.
pub(crate) fn resolve_token(settings: &AdminSettings) -> Result<Option<Secret>, String> {
    if let Some(token) = &settings.token {
        return Ok(Some(token.clone()));
    }
    let Some(path) = &settings.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| {
            format!(
                "admin.token_file {}: cannot read it ({e}); put the admin token there (a mounted secret), or point admin.token_file (RABBIT_GUARD__ADMIN__TOKEN_FILE) at the file that holds it",
                path.display()
            )
        })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(format!(
            "admin.token_file {}: the file is empty; write the token on its first line",
            path.display()
        ));
    }
    Ok(Some(Secret::new(token)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn access(listen: &str, token: Option<&str>, allowed: &[&str]) -> Access {
        let settings = AdminSettings {
            allowed_hosts: allowed.iter().map(|s| (*s).to_owned()).collect(),
            ..AdminSettings::default()
        };
        Access::new(listen.parse().unwrap(), token.map(Secret::from), &settings)
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_this_endpoints_own_names_are_accepted_as_host() {
        let a = access("127.0.0.1:9090", Some("t"), &["worker-1"]);
        for ok in [
            "127.0.0.1:9090",
            "localhost:9090",
            "LOCALHOST:9090",
            "[::1]:9090",
            "127.0.0.2:9090",
            "worker-1:9090",
        ] {
            assert!(
                a.check_origin(&Method::POST, &headers(&[(header::HOST, ok)]))
                    .is_ok(),
                "{ok} should be accepted"
            );
        }
        for bad in [
            "evil.example:9090",
            "127.0.0.1:9091",
            "127.0.0.1",
            "10.0.0.1:9090",
            "localhost.evil:9090",
            "",
        ] {
            assert!(
                a.check_origin(&Method::POST, &headers(&[(header::HOST, bad)]))
                    .is_err(),
                "{bad:?} should be refused"
            );
            assert!(
                a.check_origin(&Method::GET, &headers(&[(header::HOST, bad)]))
                    .is_err(),
                "{bad:?} should be refused for GET on loopback too"
            );
        }
        let public = access("0.0.0.0:9090", Some("t"), &[]);
        assert!(
            public
                .check_origin(&Method::POST, &headers(&[(header::HOST, "10.1.2.3:9090")]))
                .is_ok()
        );
        assert!(
            public
                .check_origin(
                    &Method::POST,
                    &headers(&[(header::HOST, "evil.example:9090")])
                )
                .is_err()
        );
        assert!(
            public
                .check_origin(
                    &Method::GET,
                    &headers(&[(header::HOST, "prometheus-target:9090")])
                )
                .is_ok(),
            "GET on a public address takes any Host (a scrape target name)"
        );
    }

    #[test]
    fn a_cross_origin_post_is_refused() {
        let a = access("127.0.0.1:9090", Some("t"), &[]);
        let host = (header::HOST, "127.0.0.1:9090");
        assert!(
            a.check_origin(
                &Method::POST,
                &headers(&[host.clone(), (header::ORIGIN, "http://127.0.0.1:9090")])
            )
            .is_ok()
        );
        for origin in [
            "https://evil.example",
            "null",
            "http://127.0.0.1:8080",
            "file://",
        ] {
            assert!(
                a.check_origin(
                    &Method::POST,
                    &headers(&[host.clone(), (header::ORIGIN, origin)])
                )
                .is_err(),
                "Origin {origin} should be refused"
            );
        }
    }

    #[test]
    fn control_needs_the_exact_token() {
        let a = access("127.0.0.1:9090", Some("s3cret"), &[]);
        let auth = |v: &str| headers(&[(header::AUTHORIZATION, v)]);
        assert!(a.check_token(&auth("Bearer s3cret")).is_ok());
        for bad in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearer ",
            "s3cret",
            "Basic s3cret",
        ] {
            assert!(
                matches!(a.check_token(&auth(bad)), Err(Refusal::Unauthorized(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            a.check_token(&HeaderMap::new()),
            Err(Refusal::Unauthorized(_))
        ));
        let off = access("127.0.0.1:9090", None, &[]);
        assert!(matches!(
            off.check_token(&auth("Bearer x")),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn the_token_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        let settings = AdminSettings {
            token_file: Some(path.clone()),
            ..AdminSettings::default()
        };
        assert_eq!(
            resolve_token(&settings).unwrap().unwrap().expose(),
            "abc123"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(resolve_token(&settings).unwrap_err().contains("empty"));
        let missing = AdminSettings {
            token_file: Some(dir.path().join("nope")),
            ..AdminSettings::default()
        };
        assert!(resolve_token(&missing).unwrap_err().contains("cannot read"));
    }
}
