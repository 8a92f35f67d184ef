//! One place for what rabbit-guard reads from and writes to AMQP messages:
//! names that must fit the protocol, and tolerant reading of hostile
//! deliveries.
//!
//! The AMQP type parser (amq-protocol-types, patched under `vendor/`) never
//! fails on a header's content: a table nested deeper than
//! 100 levels, an unknown field type or a value running
//! past its table is replaced by an [`UNREADABLE_KEY`] entry, and bytes that
//! are not UTF-8 in a short string (a header name, a `message_id`) become
//! `?`. A delivery carrying such a marker is dead-lettered with reason
//! `decode` without calling its handler.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use tokio::time::Instant;

use crate::secret::{SecretUrl, scrub};

pub(crate) mod connection;
pub(crate) mod copy;
pub mod headers;
pub(crate) mod oauth2;
pub(crate) mod publish;
pub(crate) mod server_info;
pub(crate) mod tls;
pub(crate) mod topology;

/// The header rabbit-guard's AMQP parser puts where it could not read part of
/// a table (`MALFORMED_KEY` in `vendor/amq-protocol-types.patch`). Named
/// here so that only this folder knows the fork; a test keeps the two equal.
pub(crate) const UNREADABLE_KEY: &str = "x-amqp-unreadable";

pub(crate) use crate::limits::MAX_NAME_LEN;

/// `Ok` when `name` fits an AMQP short string (queue, exchange, routing key).
///
/// # Errors
///
/// A sentence giving the length, for a name over [`MAX_NAME_LEN`] bytes.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        Err(format!(
            "is {} bytes long; AMQP names are at most {MAX_NAME_LEN} bytes",
            name.len()
        ))
    } else {
        Ok(())
    }
}

/// `s` as a short string, or why it cannot be one.
///
/// # Errors
///
/// When `s` is over [`MAX_NAME_LEN`] bytes.
pub(crate) fn short(s: &str) -> Result<ShortString, String> {
    ShortString::try_new(s).map_err(|e| e.to_string())
}

/// `now + d`, or a time far enough away to mean "never" when that would
/// overflow the clock.
#[must_use]
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// `(messages ready, consumers)` of `queue`, from a passive declare on a
/// channel of its own (a missing queue closes that channel, not the
/// caller's).
///
/// # Errors
///
/// lapin's error: 404 `NOT_FOUND` when the queue does not exist.
pub(crate) async fn queue_counts(
    connection: &lapin::Connection,
    queue: &str,
) -> Result<(u32, u32), lapin::Error> {
    let channel = connection.create_channel().await?;
    let name = short(queue).map_err(|_| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "queue name over 255 bytes",
        ))
    })?;
    let declared = channel
        .queue_declare(
            name,
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "counted".into()).await;
    declared.map(|q| (q.message_count(), q.consumer_count()))
}

/// Parses `broker.url` into what lapin connects to. The error names the
/// problem without ever quoting the password. An IPv6 literal host
/// (`amqp://…@[2001:db8::1]:5672/`) is kept as that address (the URI
/// parser would fall back to `localhost`).
///
/// # Errors
///
/// A sentence saying what is wrong with the URL.
pub(crate) fn parse_uri(url: &SecretUrl) -> Result<AMQPUri, String> {
    let raw = url.expose();
    let parsed = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err(format!(
            "the scheme is {:?}; use amqp:// or amqps://",
            parsed.scheme()
        ));
    }
    if !parsed.has_host() || parsed.host_str().is_some_and(str::is_empty) {
        return Err("no host".to_owned());
    }
    let mut uri: AMQPUri = raw.parse().map_err(|e: String| {
        let password = parsed.password().unwrap_or_default();
        scrub(&e, &[raw, password])
    })?;
    match parsed.host() {
        Some(url::Host::Ipv6(addr)) => uri.authority.host = addr.to_string(),
        Some(url::Host::Ipv4(addr)) => uri.authority.host = addr.to_string(),
        _ => {}
    }
    Ok(uri)
}

/// Why the parser could not read part of `headers`, if it could not: the
/// first [`UNREADABLE_KEY`] marker found, at any depth.
#[must_use]
pub(crate) fn unreadable(headers: &FieldTable) -> Option<String> {
    // Tables nest at most MAX_NESTING_DEPTH + 1 levels (the parser cuts the
    // rest), so walking them with an explicit stack stays small either way.
    let mut stack: Vec<&AMQPValue> = headers.inner().values().collect();
    if let Some(why) = marker(headers) {
        return Some(why);
    }
    while let Some(value) = stack.pop() {
        match value {
            AMQPValue::FieldTable(t) => {
                if let Some(why) = marker(t) {
                    return Some(why);
                }
                stack.extend(t.inner().values());
            }
            AMQPValue::FieldArray(a) => stack.extend(a.as_slice()),
            _ => {}
        }
    }
    None
}

fn marker(t: &FieldTable) -> Option<String> {
    match t.inner().get(UNREADABLE_KEY)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::parsing::{MALFORMED_KEY, MAX_NESTING_DEPTH, parse_field_table};

    #[test]
    fn the_unreadable_marker_is_the_one_the_parser_writes() {
        assert_eq!(UNREADABLE_KEY, MALFORMED_KEY);
    }

    /// `depth` tables nested under the key `k`, as wire bytes.
    fn nested(depth: usize) -> Vec<u8> {
        let mut inner = vec![0, 0, 0, 0];
        for _ in 0..depth {
            let mut level = vec![1, b'k', b'F'];
            level.extend_from_slice(&inner);
            let mut table = u32::try_from(level.len()).unwrap().to_be_bytes().to_vec();
            table.extend_from_slice(&level);
            inner = table;
        }
        inner
    }

    #[test]
    fn uri_hosts_are_kept_and_errors_never_quote_the_password() {
        let uri = parse_uri(&SecretUrl::new("amqp://u:p@[2001:db8::1]:5673/%2f")).unwrap();
        assert_eq!(
            (uri.authority.host.as_str(), uri.authority.port),
            ("2001:db8::1", 5673)
        );
        let uri = parse_uri(&SecretUrl::new("amqp://u:p@10.1.2.3/v")).unwrap();
        assert_eq!(uri.authority.host, "10.1.2.3");
        let uri = parse_uri(&SecretUrl::new("amqps://u:p@rabbit.internal/v")).unwrap();
        assert_eq!(
            (uri.authority.host.as_str(), uri.authority.port),
            ("rabbit.internal", 5671)
        );
        for bad in [
            "amqp://user:hunter2@host:notaport/%2f",
            "amqp://user:hunter2@/%2f",
            "http://user:hunter2@host/",
            "amqp:user:hunter2@host",
            "amqp://user:hunter2@host/%2f?heartbeat=x",
            "amqp://user:hunter2@[::1/",
        ] {
            let e = parse_uri(&SecretUrl::new(bad)).expect_err(bad);
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_past_255_bytes_and_far_deadlines_are_refused_or_capped() {
        assert!(check_name(&"q".repeat(255)).is_ok());
        assert!(
            check_name(&"q".repeat(256))
                .unwrap_err()
                .contains("256 bytes")
        );
        assert!(short(&"é".repeat(128)).is_err());
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }

    #[test]
    fn a_header_nested_past_the_limit_is_reported_not_a_crash() {
        let (_, deep) = parse_field_table(&nested(5_000)[..]).expect("parses");
        let why = unreadable(&deep).expect("marked");
        assert!(why.contains("nested deeper than 100"), "{why}");
        let (_, fine) = parse_field_table(&nested(MAX_NESTING_DEPTH)[..]).unwrap();
        assert_eq!(unreadable(&fine), None);
    }
}
