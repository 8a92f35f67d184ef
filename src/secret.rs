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

/// At most `max` bytes of `text` (with `...` where it is cut), with every
/// secret masked. A secret that starts within them is masked whole, even
/// where the cut falls inside it; and so is a secret that `text` itself
/// ends in the middle of (it was read only that far). Read `max` plus the
/// longest secret's length of bytes, so that every secret that starts
/// within `max` is complete in `text`.
#[must_use]
#[cfg_attr(not(feature = "http-handler"), allow(dead_code))] // the http handler and health check
pub(crate) fn scrub_cut(text: &str, secrets: &[&str], max: usize) -> String {
    let secrets: Vec<&str> = secrets.iter().copied().filter(|s| s.len() >= 3).collect();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for secret in &secrets {
        ranges.extend(text.match_indices(secret).map(|(i, m)| (i, i + m.len())));
        // A secret cut off at the end of what was read.
        let bytes = secret.as_bytes();
        if let Some(k) = (3..bytes.len())
            .rev()
            .find(|&k| text.as_bytes().ends_with(&bytes[..k]))
        {
            ranges.push((text.len() - k, text.len()));
        }
    }
    ranges.sort_unstable();
    let cut = if text.len() > max {
        max.saturating_sub(3)
    } else {
        text.len()
    };
    let mut out = String::with_capacity(cut.min(text.len()) + 3);
    let mut pos = 0;
    let mut next = ranges.iter().peekable();
    while pos < cut {
        // Ranges that ended before here were inside one already masked.
        while next.peek().is_some_and(|(_, end)| *end <= pos) {
            next.next();
        }
        match next.peek() {
            Some(&&(start, end)) if start <= pos => {
                out.push_str(MASK);
                pos = end;
            }
            Some(&&(start, _)) => {
                let stop = start.min(cut);
                out.push_str(&text[pos..floor_boundary(text, stop).max(pos)]);
                pos = if stop < start { text.len() } else { start };
            }
            None => {
                out.push_str(&text[pos..floor_boundary(text, cut).max(pos)]);
                pos = text.len();
            }
        }
    }
    if text.len() > max {
        out.push_str("...");
    }
    out
}

/// The largest char boundary of `s` at or before `i`.
#[cfg_attr(not(feature = "http-handler"), allow(dead_code))] // the http handler and health check
fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Every form in which a request to `url` carries its secrets, and so in
/// which a server could echo them back (a request line, an `Authorization`
/// header) into an error text: each credential-like query value and the
/// password as written in the URL, decoded, percent-encoded and
/// form-encoded (`+` for a space), and `base64(user:password)` as HTTP
/// Basic authentication sends it. Plus `extra` (configured header values),
/// in the same forms.
#[must_use]
#[cfg_attr(not(feature = "http-handler"), allow(dead_code))] // the http handler and health check
pub(crate) fn echoed_forms(url: Option<&url::Url>, extra: &[&str]) -> Vec<String> {
    use base64::Engine as _;
    let mut out: Vec<String> = Vec::new();
    let add = |secret: &str, out: &mut Vec<String>| {
        if secret.is_empty() {
            return;
        }
        out.push(secret.to_owned());
        out.push(percent_encoded(secret));
        out.push(url::form_urlencoded::byte_serialize(secret.as_bytes()).collect());
    };
    for secret in extra {
        add(secret, &mut out);
    }
    if let Some(url) = url {
        if let Some(written) = url.password() {
            add(written, &mut out);
            let decoded = percent_decoded(written);
            add(&decoded, &mut out);
            let user = url.username();
            let b64 = base64::engine::general_purpose::STANDARD;
            for (u, p) in [
                (user.to_owned(), written.to_owned()),
                (percent_decoded(user), decoded),
            ] {
                out.push(b64.encode(format!("{u}:{p}")));
            }
        }
        for pair in url.query().unwrap_or_default().split('&') {
            if let Some((name, written)) = pair.split_once('=')
                && is_credential_param(&decode_name(name))
            {
                add(written, &mut out);
                let decoded = url::form_urlencoded::parse(format!("v={written}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                add(&decoded, &mut out);
            }
        }
    }
    // Longest first, so a secret inside another's form is not cut apart
    // before the longer one is.
    out.retain(|s| s.len() >= 3);
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

/// Every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`) as `%XX`.
#[cfg_attr(not(feature = "http-handler"), allow(dead_code))] // the http handler and health check
fn percent_encoded(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` escapes decoded (lossily, for text that is not UTF-8).
#[cfg_attr(not(feature = "http-handler"), allow(dead_code))] // the http handler and health check
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_across_the_cut_is_masked_whole() {
        let secret = "s3cr3t-token-value";
        // Starts before the cut at 20, ends after it.
        let text = format!("{}{secret} and more text after it", "x".repeat(15));
        let out = scrub_cut(&text, &[secret], 20);
        assert!(!out.contains("s3cr"), "{out}");
        assert_eq!(out, format!("{}***...", "x".repeat(15)));
        // Read only as far as its middle: masked all the same.
        let out = scrub_cut(&format!("abc {}", &secret[..8]), &[secret], 100);
        assert_eq!(out, "abc ***");
        // Short text, no secret: unchanged; long text: cut and marked.
        assert_eq!(scrub_cut("hello", &[secret], 100), "hello");
        assert_eq!(scrub_cut("é".repeat(10).as_str(), &[secret], 8), "éé...");
    }

    #[test]
    fn every_form_a_server_could_echo_is_scrubbed() {
        let url = url::Url::parse(
            "http://svc:p%40ss+w%20rd@127.0.0.1:1/x?api_key=a%2Fb+c&token=t0k-1&page=2",
        )
        .unwrap();
        let forms = echoed_forms(Some(&url), &["X-Key Value"]);
        let basic = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode("svc:p@ss+w rd")
        };
        let echoed = format!(
            "GET /x?api_key=a%2Fb+c&token=t0k-1&page=2 HTTP/1.1\r\nauthorization: Basic {basic}\r\n\
             x-key: X-Key Value\r\nform: a%2Fb+c api_key=a/b c pass=p@ss+w rd p%40ss+w%20rd X-Key+Value"
        );
        let forms: Vec<&str> = forms.iter().map(String::as_str).collect();
        let out = scrub(&echoed, &forms);
        for leaked in [
            "a%2Fb+c",
            "a/b c",
            "t0k-1",
            &basic,
            "p@ss+w rd",
            "p%40ss+w%20rd",
            "X-Key Value",
            "X-Key+Value",
        ] {
            assert!(!out.contains(leaked), "{leaked} left in {out}");
        }
        assert!(out.contains("page=2"), "only secrets are cut: {out}");
    }

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
