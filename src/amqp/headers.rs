//! Header names rabbit-guard writes and reads, and tolerant readers for
//! header values (which any publisher may have set to anything).

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Attempt number of the next delivery (1-based; absent means 1). On a
/// dead letter: the attempt that failed last.
pub const ATTEMPT: &str = "rg-attempt";
/// How many times the message was put back without counting an attempt
/// because the dependency, not the message, was failing.
pub const DEFERRALS: &str = "rg-deferrals";
/// How many times its last attempt failed with no sign either way (no
/// other call succeeded, the breaker did not trip); after 3 it is
/// dead-lettered anyway.
pub const INCONCLUSIVE: &str = "rg-inconclusive";
/// The most inconclusive failures a message's last attempt may have: at
/// this count it is dead-lettered anyway (`retries-exhausted`), so a larger
/// [`INCONCLUSIVE`] was not written by rabbit-guard.
pub(crate) const MAX_INCONCLUSIVE: u32 = 3;
/// Why the message was dead-lettered: see [`DeadLetterReason`](crate::dead_letter::DeadLetterReason).
pub const REASON: &str = "rg-reason";
/// The error text (truncated to 4 KiB).
pub const ERROR: &str = "rg-error";
/// The handler kind that gave up on it.
pub const HANDLER: &str = "rg-handler";
/// The work queue it came from.
pub const ORIGINAL_QUEUE: &str = "rg-original-queue";
/// When it was dead-lettered, RFC 3339 UTC with milliseconds.
pub const DEAD_LETTERED_AT: &str = "rg-dead-lettered-at";
/// How many times `rabbit-guard dlq replay` sent it back to its queue.
pub const REPLAYS: &str = "rg-replays";
/// Headers a replay removes: the message starts over.
pub const RESET_ON_REPLAY: &[&str] = &[
    ATTEMPT,
    DEFERRALS,
    INCONCLUSIVE,
    REASON,
    ERROR,
    HANDLER,
    ORIGINAL_QUEUE,
    DEAD_LETTERED_AT,
];
/// Sender-selected distribution headers: the broker routes a message
/// carrying them to every queue they name as well. Stripped from every
/// copy rabbit-guard publishes (retries, dead letters, replays,
/// imports), which must go to exactly one queue.
pub const ROUTING_HEADERS: &[&str] = &["CC", "BCC"];
/// Headers set by the broker when it dead-letters; stripped from our copies,
/// since RabbitMQ 4 ignores (and 3.x trusts) client-set values.
pub const BROKER_DEATH_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// A header value as text, when it is a (UTF-8) string of any AMQP kind.
#[must_use]
pub fn value_str(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok(),
        _ => None,
    }
}

/// A header as a non-negative integer: any integer type, or a string of
/// digits; `None` for anything else (negative, text, a table).
#[must_use]
pub fn header_u64(h: &FieldTable, name: &str) -> Option<u64> {
    match h.inner().get(name)? {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        other => value_str(other).and_then(|s| s.trim().parse().ok()),
    }
}

/// A long-string header value.
pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A count as a header value.
pub(crate) fn number(n: u32) -> AMQPValue {
    AMQPValue::LongLongInt(i64::from(n))
}

/// Headers every copy rabbit-guard publishes leaves out: the broker's death
/// headers (RabbitMQ 4 ignores, 3.x trusts, client-set ones) and `CC`/`BCC`
/// (a copy goes to exactly one queue).
pub(crate) const NEVER_COPIED: &[&[&str]] = &[BROKER_DEATH_HEADERS, ROUTING_HEADERS];

/// The headers of `properties`, without every name in `strip`, with `edit`
/// applied: the one place a copy's headers are made.
pub(crate) fn edited(
    properties: &BasicProperties,
    strip: &[&[&str]],
    edit: impl FnOnce(&mut BTreeMap<ShortString, AMQPValue>),
) -> FieldTable {
    let mut map: BTreeMap<ShortString, AMQPValue> = properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    for name in strip.iter().flat_map(|names| names.iter()) {
        map.remove(*name);
    }
    edit(&mut map);
    FieldTable::from(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_never_carries_routing_or_death_headers() {
        let mut h = FieldTable::default();
        for name in ["CC", "BCC", "x-death", "x-first-death-queue", "keep"] {
            h.insert(name.into(), text("v"));
        }
        let p = BasicProperties::default().with_headers(h);
        let out = edited(&p, NEVER_COPIED, |m| {
            m.insert(ATTEMPT.into(), number(2));
        });
        let keys: Vec<&str> = out.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(keys, ["keep", ATTEMPT]);
    }

    #[test]
    fn integers_of_every_kind_and_digit_strings_read_as_counts() {
        let mut h = FieldTable::default();
        for (k, v) in [
            ("a", AMQPValue::ShortShortInt(-1)),
            ("b", AMQPValue::LongLongInt(7)),
            ("c", text(" 42 ")),
            ("d", text("x")),
            ("e", AMQPValue::Boolean(true)),
        ] {
            h.insert(k.into(), v);
        }
        let got: Vec<Option<u64>> = ["a", "b", "c", "d", "e", "z"]
            .iter()
            .map(|k| header_u64(&h, k))
            .collect();
        assert_eq!(got, [None, Some(7), Some(42), None, None, None]);
    }
}
