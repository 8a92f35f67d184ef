//! W3C trace context (`traceparent`, `tracestate`) carried in message
//! headers: read into each delivery's span, and forwarded by the built-in
//! `http` handler.

use lapin::types::AMQPValue;

use crate::amqp::headers::value_str;

/// The `traceparent` header's name (in AMQP headers and HTTP requests).
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header's name.
pub const TRACESTATE: &str = "tracestate";

/// A valid `traceparent`: `00-<trace id>-<parent span id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    /// The whole header, as received.
    pub header: &'a str,
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: &'a str,
    /// 16 lowercase hex digits, not all zero: the publisher's span.
    pub parent_id: &'a str,
    /// The trace flags (`01`: sampled).
    pub flags: &'a str,
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

impl<'a> TraceParent<'a> {
    /// Parses a `traceparent` value; `None` for anything malformed (a
    /// hostile header is ignored, never trusted in part).
    #[must_use]
    pub fn parse(header: &'a str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four parts; later versions may add more.
        if version.len() != 2 || version == "ff" || !version.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if !lower_hex(trace_id, 32) || !lower_hex(parent_id, 16) {
            return None;
        }
        if flags.len() != 2 || !flags.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            header,
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The `traceparent` of a message header value, if it is one.
    #[must_use]
    pub fn from_header(value: Option<&'a AMQPValue>) -> Option<Self> {
        Self::parse(value.and_then(value_str)?)
    }
}

/// A `tracestate` value fit to forward: printable ASCII, at most 512 bytes
/// (the W3C limit), else nothing.
#[must_use]
pub fn tracestate(value: Option<&AMQPValue>) -> Option<&str> {
    let s = value.and_then(value_str)?.trim();
    (s.len() <= 512 && !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b))).then_some(s)
}

/// Makes `span` a child of the trace a message's `traceparent` names (with
/// the `otel` feature: the exported span then joins the publisher's trace).
#[cfg(feature = "otel")]
pub(crate) fn link(span: &tracing::Span, headers: Option<&lapin::types::FieldTable>) {
    use opentelemetry::propagation::{Extractor, TextMapPropagator};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    struct Headers<'a>(Option<&'a lapin::types::FieldTable>);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            let value = self.0?.inner().get(key);
            match key {
                TRACEPARENT => TraceParent::from_header(value).map(|t| t.header),
                TRACESTATE => tracestate(value),
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT, TRACESTATE]
        }
    }
    if TraceParent::from_header(headers.and_then(|h| h.inner().get(TRACEPARENT))).is_none() {
        return;
    }
    let cx =
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(cx);
}

/// The W3C headers of the current span, when it is exported (feature
/// `otel`): what the `http` handler sends so the dependency's spans are
/// children of this delivery's.
#[cfg(all(feature = "otel", feature = "http-handler"))]
pub(crate) fn current() -> Vec<(String, String)> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut out = std::collections::HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_trace_parents_are_read() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(good).unwrap();
        assert_eq!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id, "00f067aa0ba902b7");
        assert_eq!(tp.flags, "01");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Injected: 1",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later")
                .is_some(),
            "a later version may add fields"
        );
    }

    #[test]
    fn tracestate_is_forwarded_only_when_safe() {
        let ok = AMQPValue::LongString("rojo=00f067aa0ba902b7".into());
        assert_eq!(tracestate(Some(&ok)), Some("rojo=00f067aa0ba902b7"));
        let crlf = AMQPValue::LongString("a=b\r\nX-Injected: 1".into());
        assert_eq!(tracestate(Some(&crlf)), None);
        let long = AMQPValue::LongString("a".repeat(600).into());
        assert_eq!(tracestate(Some(&long)), None);
    }
}
