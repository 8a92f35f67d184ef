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

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::types::{AMQPValue, FieldTable};

pub(crate) use lapin::types::parsing::MALFORMED_KEY as UNREADABLE_KEY;

/// Exponential backoff with jitter from `min` to `max`, without end.
pub(crate) fn backoff(min: Duration, max: Duration) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
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
    use lapin::types::parsing::{MAX_NESTING_DEPTH, parse_field_table};

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
    fn a_header_nested_past_the_limit_is_reported_not_a_crash() {
        let (_, deep) = parse_field_table(&nested(5_000)[..]).expect("parses");
        let why = unreadable(&deep).expect("marked");
        assert!(why.contains("nested deeper than 100"), "{why}");
        let (_, fine) = parse_field_table(&nested(MAX_NESTING_DEPTH)[..]).unwrap();
        assert_eq!(unreadable(&fine), None);
    }
}
