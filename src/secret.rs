//! Keeping secrets out of logs, printed config, error texts and the admin
//! endpoint.
//!
//! Secrets live in types whose `Debug` and `Display` cannot print them:
//! [`Secret`] (a token, a header value: printed as `***`) and [`SecretUrl`]
//! (a URL: printed with its password and credential-like query parameters
//! masked). Code that needs the value asks for it by name
//! ([`Secret::expose`], [`SecretUrl::expose`]), so a new log line cannot leak
//! one by accident.
//!
//! `Serialize` writes the real value, so settings written to a file load
//! back the same; to print settings, serialize
//! [`Settings::redacted`](crate::config::Settings::redacted).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a masked secret is shown as.
pub const MASK: &str = "***";

/// `From<String>`, `From<&str>`, and serde as a plain string (the real
/// value: settings written to a file must load back the same).
macro_rules! string_newtype {
    ($name:ident) => {
        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(value)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map(Self)
            }
        }
    };
}

string_newtype!(Secret);
string_newtype!(SecretUrl);

/// A secret string (a token, a header value). `Debug` and `Display` show
/// `***`; [`expose`](Self::expose) gives the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself: only for the place that uses it (an HTTP header, a
    /// comparison), never for printing.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// A URL that may carry credentials (`amqp://user:password@host`,
/// `https://api?api_key=…`). `Debug` and `Display` show it through
/// [`mask_url`]; [`expose`](Self::expose) gives the real one.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, credentials included: only for connecting.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its secrets masked, for people.
    #[must_use]
    pub fn masked(&self) -> String {
        mask_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// True for a query parameter name that carries a credential: `api_key`,
/// `token`, `key`, `secret`, `password`, `signature`, `sig` and the like
/// (`access_token`, `X-Amz-Signature`, `client_secret`), case-insensitive.
#[must_use]
pub fn is_credential_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase().replace('-', "_");
    const EXACT: &[&str] = &[
        "api_key",
        "apikey",
        "token",
        "key",
        "secret",
        "password",
        "passwd",
        "pwd",
        "pass",
        "signature",
        "sig",
        "auth",
        "credential",
        "credentials",
        "access_token",
        "code",
    ];
    const SUFFIXES: &[&str] = &[
        "_key",
        "_token",
        "_secret",
        "_password",
        "_signature",
        "_sig",
        "_credential",
    ];
    EXACT.contains(&name.as_str()) || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The URL with its secrets masked: the password of the user info
/// (`amqp://user:***@host/vhost`) and the values of credential-like query
/// parameters (`?api_key=***`). Text that does not parse as a URL is masked
/// all the same (everything between `://` and the last `@` but the user
/// name), so a malformed URL cannot print its password either; when in
/// doubt it masks more. Text without secrets is returned unchanged.
#[must_use]
pub fn mask_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let with_query = match url[start..].find('?').map(|i| start + i) {
        Some(i) => format!("{}{}", &url[..i], mask_query(&url[i..])),
        None => url.to_owned(),
    };
    mask_userinfo(&with_query)
}

/// `scheme://user:pass@host/path` → `scheme://user:***@host/path`. Only a
/// URL with no `@` after a `:` in it is left alone; otherwise the user info
/// ends at the last `@`, wherever it is: a password with `/`, `?`, `#` or
/// `@` in it, not percent-encoded (which a URL parser would read as a port
/// and a path), is masked whole, and an `@` later in a URL with a port
/// masks a little too much rather than too little.
fn mask_userinfo(s: &str) -> String {
    let start = s.find("://").map_or(0, |i| i + 3);
    let Some(at) = s[start..].rfind('@').map(|i| start + i) else {
        return s.to_owned();
    };
    // Without `://` there is no authority to go by: any `:` before the `@`.
    let authority_end = match start {
        0 => at,
        _ => s[start..]
            .find(['/', '?', '#'])
            .map_or(s.len(), |i| start + i),
    };
    if !s[start..authority_end.min(at)].contains(':') {
        // `user@host`, or an `@` in the path or query of a URL whose
        // authority holds no `:`: no password to hide.
        return s.to_owned();
    }
    let userinfo = &s[start..at];
    match userinfo.find(':') {
        Some(colon) => format!("{}{MASK}{}", &s[..start + colon + 1], &s[at..]),
        None => s.to_owned(),
    }
}

/// `?a=1&token=x#f` → `?a=1&token=***#f`.
fn mask_query(q: &str) -> String {
    if q.is_empty() {
        return String::new();
    }
    let (query, fragment) = match q[1..].find('#') {
        Some(i) if q.starts_with('?') => q.split_at(i + 1),
        _ => (q, ""),
    };
    if !query.starts_with('?') {
        return q.to_owned();
    }
    let masked: Vec<String> = query[1..]
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_credential_param(&decode_name(name)) => {
                format!("{name}={MASK}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("?{}{fragment}", masked.join("&"))
}

fn decode_name(name: &str) -> String {
    url::form_urlencoded::parse(format!("{name}=").as_bytes())
        .next()
        .map_or_else(|| name.to_owned(), |(k, _)| k.into_owned())
}

/// `text` with every occurrence of each secret replaced by `***`: for text
/// from elsewhere (an error message) that may quote a value back.
#[must_use]
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if s.len() >= 3 {
            out = out.replace(s, MASK);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_only_the_password() {
        assert_eq!(
            mask_url("amqp://guest:s3cr%40t@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_url("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(mask_url("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(
            mask_url("amqp://user@host/?token=t"),
            "amqp://user@host/?token=***"
        );
        assert_eq!(
            mask_url("amqps://u:p@h/v?heartbeat=10"),
            "amqps://u:***@h/v?heartbeat=10"
        );
        assert_eq!(mask_url("not a url"), "not a url");
    }

    #[test]
    fn malformed_urls_do_not_print_their_password() {
        // An unencoded '/' or '@' in the password: a URL parser would cut
        // the user info short; the mask takes all of it.
        assert_eq!(
            mask_url("amqp://user:pa/ss@host:5672/%2f"),
            "amqp://user:***@host:5672/%2f"
        );
        assert_eq!(mask_url("amqp://user:p@ss@host/"), "amqp://user:***@host/");
        assert_eq!(mask_url("user:hunter2@host"), "user:***@host");
        assert_eq!(mask_url("amqp://user:pw@[::1"), "amqp://user:***@[::1");
        assert_eq!(mask_url("amqp//user:hunter2@host"), "amqp//user:***@host");
        assert_eq!(mask_url("amqp://:#00#A0@a"), "amqp://:***@a");
        assert_eq!(mask_url("amqp://u:pa?ss@h/"), "amqp://u:***@h/");
        assert_eq!(mask_url("amqp://u:a@b/c@h/"), "amqp://u:***@h/");
        assert_eq!(
            mask_url("amqp://u:p@h/?email=a@b&token=t"),
            "amqp://u:***@b&token=***",
            "an @ after a password: masks too much, never too little"
        );
        assert_eq!(mask_url("amqp://u:123/abc@h/"), "amqp://u:***@h/");
        assert_eq!(mask_url("amqp://a:0#0/0?@a"), "amqp://a:***@a");
        assert_eq!(mask_url("amqp://:@A#%0a@a"), "amqp://:***@a");
        assert_eq!(mask_url("https://h/x?email=a@b"), "https://h/x?email=a@b");
        assert_eq!(mask_url("https://h:443/x?email=a@b"), "https://h:***@b");
        assert_eq!(mask_url("amqp://a:#?pw@a"), "amqp://a:***@a");
        assert_eq!(mask_url("amqp://:@#A%0a@a"), "amqp://:***@a");
    }

    #[test]
    fn credential_query_parameters_are_masked_case_insensitively() {
        assert_eq!(
            mask_url("https://u:pw@api.example/x?page=2&API_KEY=abc&Token=t#frag"),
            "https://u:***@api.example/x?page=2&API_KEY=***&Token=***#frag"
        );
        assert_eq!(
            mask_url("https://h/x?X-Amz-Signature=s&sig=1&key=k&secret=s&password=p&signature=z"),
            "https://h/x?X-Amz-Signature=***&sig=***&key=***&secret=***&password=***&signature=***"
        );
        assert_eq!(mask_url("https://h/x?monkey=1"), "https://h/x?monkey=1");
        assert_eq!(mask_url("https://h/@me"), "https://h/@me");
        assert_eq!(
            mask_url("https://h/x?api%5Fkey=1"),
            "https://h/x?api%5Fkey=***"
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
        let u = SecretUrl::new("amqp://a:hunter2@h/");
        assert_eq!(format!("{u} {u:?}"), "amqp://a:***@h/ \"amqp://a:***@h/\"");
        assert_eq!(u.expose(), "amqp://a:hunter2@h/");
        assert_eq!(
            scrub("bad url 'amqp://a:hunter2@h'", &["hunter2"]),
            "bad url 'amqp://a:***@h'"
        );
    }
}
