//! AMQP values and messages as JSON: a plain form for people and scripts
//! (`dlq list --json`), and a typed, lossless form for `export` / `import`
//! that round-trips every header type, property and body byte for byte.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use lapin::BasicProperties;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use serde_json::{Map, Value, json};

/// A header value as a plain JSON value (strings, numbers, arrays, objects).
#[must_use]
pub(crate) fn plain(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!({"scale": d.scale, "value": d.value}),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => bytes_plain(s.as_bytes()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(plain).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => Value::Object(table_plain(t)),
        AMQPValue::ByteArray(b) => bytes_plain(b.as_slice()),
        AMQPValue::Void => Value::Null,
    }
}

fn bytes_plain(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => json!(s),
        Err(_) => json!({ "base64": B64.encode(b) }),
    }
}

/// A field table as a plain JSON object.
#[must_use]
pub(crate) fn table_plain(t: &FieldTable) -> Map<String, Value> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.to_string(), plain(v)))
        .collect()
}

/// A header value in the typed form: `{"type": value}`.
#[must_use]
pub(crate) fn typed(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!({ "bool": b }),
        AMQPValue::ShortShortInt(n) => json!({ "i8": n }),
        AMQPValue::ShortShortUInt(n) => json!({ "u8": n }),
        AMQPValue::ShortInt(n) => json!({ "i16": n }),
        AMQPValue::ShortUInt(n) => json!({ "u16": n }),
        AMQPValue::LongInt(n) => json!({ "i32": n }),
        AMQPValue::LongUInt(n) => json!({ "u32": n }),
        AMQPValue::LongLongInt(n) => json!({ "i64": n }),
        AMQPValue::Float(f) => json!({ "f32": float_typed(f64::from(*f)) }),
        AMQPValue::Double(f) => json!({ "f64": float_typed(*f) }),
        AMQPValue::DecimalValue(d) => json!({ "decimal": [d.scale, d.value] }),
        AMQPValue::ShortString(s) => json!({ "short": s.as_str() }),
        AMQPValue::LongString(s) => json!({ "long": B64.encode(s.as_bytes()) }),
        AMQPValue::FieldArray(a) => {
            json!({ "array": a.as_slice().iter().map(typed).collect::<Vec<_>>() })
        }
        AMQPValue::Timestamp(t) => json!({ "timestamp": t }),
        AMQPValue::FieldTable(t) => json!({ "table": table_typed(t) }),
        AMQPValue::ByteArray(b) => json!({ "bytes": B64.encode(b.as_slice()) }),
        AMQPValue::Void => json!({ "void": null }),
    }
}

/// A float as JSON: a number, or `"NaN"`, `"inf"`, `"-inf"` (which JSON
/// numbers cannot hold).
fn float_typed(f: f64) -> Value {
    if f.is_finite() {
        json!(f)
    } else if f.is_nan() {
        json!("NaN")
    } else if f > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

fn float_from_typed(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| bad(&v.to_string())),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        Value::String(s) if s == "inf" => Ok(f64::INFINITY),
        Value::String(s) if s == "-inf" => Ok(f64::NEG_INFINITY),
        _ => Err(bad(&v.to_string())),
    }
}

/// A field table in the typed form.
#[must_use]
pub(crate) fn table_typed(t: &FieldTable) -> Map<String, Value> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.to_string(), typed(v)))
        .collect()
}

fn bad(what: &str) -> String {
    format!("not a typed AMQP value: {}", cut(what))
}

/// A value quoted in an error, cut to a readable length.
fn cut(s: &str) -> String {
    crate::text::truncate(s, 60)
}

fn short(s: &str) -> Result<ShortString, String> {
    crate::amqp::short(s).map_err(|_| {
        format!(
            "{} bytes is too long for a short string (at most 255)",
            s.len()
        )
    })
}

fn int<T: TryFrom<i64>>(v: &Value) -> Result<T, String> {
    v.as_i64()
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| bad(&v.to_string()))
}

fn uint<T: TryFrom<u64>>(v: &Value) -> Result<T, String> {
    v.as_u64()
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| bad(&v.to_string()))
}

fn b64(v: &Value) -> Result<Vec<u8>, String> {
    let s = v.as_str().ok_or_else(|| bad(&v.to_string()))?;
    B64.decode(s).map_err(|e| format!("bad base64: {e}"))
}

/// Reads a value written by [`typed`].
///
/// # Errors
///
/// A message naming what could not be read.
#[allow(clippy::cast_possible_truncation)] // f32 values were written from f32s
pub(crate) fn from_typed(v: &Value) -> Result<AMQPValue, String> {
    let obj = v
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or_else(|| bad(&v.to_string()))?;
    let (kind, inner) = obj.iter().next().ok_or_else(|| bad("{}"))?;
    Ok(match kind.as_str() {
        "bool" => AMQPValue::Boolean(inner.as_bool().ok_or_else(|| bad(&inner.to_string()))?),
        "i8" => AMQPValue::ShortShortInt(int(inner)?),
        "u8" => AMQPValue::ShortShortUInt(uint(inner)?),
        "i16" => AMQPValue::ShortInt(int(inner)?),
        "u16" => AMQPValue::ShortUInt(uint(inner)?),
        "i32" => AMQPValue::LongInt(int(inner)?),
        "u32" => AMQPValue::LongUInt(uint(inner)?),
        "i64" => AMQPValue::LongLongInt(int(inner)?),
        "f32" => AMQPValue::Float(float_from_typed(inner)? as f32),
        "f64" => AMQPValue::Double(float_from_typed(inner)?),
        "decimal" => {
            let parts = inner
                .as_array()
                .filter(|a| a.len() == 2)
                .ok_or_else(|| bad(&inner.to_string()))?;
            AMQPValue::DecimalValue(DecimalValue {
                scale: uint(&parts[0])?,
                value: uint(&parts[1])?,
            })
        }
        "short" => AMQPValue::ShortString(short(
            inner.as_str().ok_or_else(|| bad(&inner.to_string()))?,
        )?),
        "long" => AMQPValue::LongString(LongString::from(b64(inner)?)),
        "array" => {
            let items = inner.as_array().ok_or_else(|| bad(&inner.to_string()))?;
            let mut array = FieldArray::default();
            for item in items {
                array.push(from_typed(item)?);
            }
            AMQPValue::FieldArray(array)
        }
        "timestamp" => AMQPValue::Timestamp(uint(inner)?),
        "table" => AMQPValue::FieldTable(table_from_typed(
            inner.as_object().ok_or_else(|| bad(&inner.to_string()))?,
        )?),
        "bytes" => AMQPValue::ByteArray(ByteArray::from(b64(inner)?)),
        "void" => AMQPValue::Void,
        other => return Err(bad(other)),
    })
}

/// Reads a table written by [`table_typed`].
///
/// # Errors
///
/// A message naming the key that could not be read.
pub(crate) fn table_from_typed(obj: &Map<String, Value>) -> Result<FieldTable, String> {
    let mut t = FieldTable::default();
    for (k, v) in obj {
        let name = short(k).map_err(|e| format!("header name {:?}: {e}", cut(k)))?;
        t.insert(
            name,
            from_typed(v).map_err(|e| format!("header {:?}: {e}", cut(k)))?,
        );
    }
    Ok(t)
}

/// Every property in the typed form (absent ones left out).
#[must_use]
pub(crate) fn properties_typed(p: &BasicProperties) -> Map<String, Value> {
    let mut m = Map::new();
    let mut short = |k: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            m.insert(k.into(), json!(v.as_str()));
        }
    };
    short("content_type", p.content_type());
    short("content_encoding", p.content_encoding());
    short("correlation_id", p.correlation_id());
    short("reply_to", p.reply_to());
    short("expiration", p.expiration());
    short("message_id", p.message_id());
    short("type", p.kind());
    short("user_id", p.user_id());
    short("app_id", p.app_id());
    short("cluster_id", p.cluster_id());
    if let Some(v) = p.delivery_mode() {
        m.insert("delivery_mode".into(), json!(v));
    }
    if let Some(v) = p.priority() {
        m.insert("priority".into(), json!(v));
    }
    if let Some(v) = p.timestamp() {
        m.insert("timestamp".into(), json!(v));
    }
    if let Some(h) = p.headers() {
        m.insert("headers".into(), Value::Object(table_typed(h)));
    }
    m
}

/// Reads properties written by [`properties_typed`].
///
/// # Errors
///
/// A message naming the property that could not be read.
pub(crate) fn properties_from_typed(m: &Map<String, Value>) -> Result<BasicProperties, String> {
    let mut p = BasicProperties::default();
    let s = |k: &str| -> Result<Option<ShortString>, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => short(s).map(Some).map_err(|e| format!("property {k}: {e}")),
            Some(other) => Err(format!("property {k}: expected a string, got {other}")),
        }
    };
    if let Some(v) = s("content_type")? {
        p = p.with_content_type(v);
    }
    if let Some(v) = s("content_encoding")? {
        p = p.with_content_encoding(v);
    }
    if let Some(v) = s("correlation_id")? {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = s("reply_to")? {
        p = p.with_reply_to(v);
    }
    if let Some(v) = s("expiration")? {
        p = p.with_expiration(v);
    }
    if let Some(v) = s("message_id")? {
        p = p.with_message_id(v);
    }
    if let Some(v) = s("type")? {
        p = p.with_type(v);
    }
    if let Some(v) = s("user_id")? {
        p = p.with_user_id(v);
    }
    if let Some(v) = s("app_id")? {
        p = p.with_app_id(v);
    }
    if let Some(v) = s("cluster_id")? {
        p = p.with_cluster_id(v);
    }
    if let Some(v) = m.get("delivery_mode") {
        p = p.with_delivery_mode(uint(v).map_err(|e| format!("property delivery_mode: {e}"))?);
    }
    if let Some(v) = m.get("priority") {
        p = p.with_priority(uint(v).map_err(|e| format!("property priority: {e}"))?);
    }
    if let Some(v) = m.get("timestamp") {
        p = p.with_timestamp(uint(v).map_err(|e| format!("property timestamp: {e}"))?);
    }
    if let Some(v) = m.get("headers") {
        let obj = v
            .as_object()
            .ok_or("property headers: expected an object")?;
        p = p.with_headers(table_from_typed(obj)?);
    }
    Ok(p)
}

/// Base64 of `bytes`.
#[must_use]
pub(crate) fn base64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Bytes from base64.
///
/// # Errors
///
/// When `s` is not base64.
pub(crate) fn from_base64(s: &str) -> Result<Vec<u8>, String> {
    B64.decode(s).map_err(|e| format!("bad base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_type_round_trips() {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongInt(-7));
        let mut array = FieldArray::default();
        array.push(AMQPValue::Boolean(true));
        array.push(AMQPValue::LongString(LongString::from(vec![
            0xff, 0x00, b'a',
        ])));
        let values = vec![
            AMQPValue::Boolean(false),
            AMQPValue::ShortShortInt(-3),
            AMQPValue::ShortShortUInt(250),
            AMQPValue::ShortInt(-30_000),
            AMQPValue::ShortUInt(60_000),
            AMQPValue::LongInt(-2_000_000_000),
            AMQPValue::LongUInt(4_000_000_000),
            AMQPValue::LongLongInt(-9_000_000_000_000),
            AMQPValue::Float(1.25),
            AMQPValue::Double(std::f64::consts::PI),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12_345,
            }),
            AMQPValue::ShortString("short".into()),
            AMQPValue::LongString("long text é".into()),
            AMQPValue::FieldArray(array),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(inner),
            AMQPValue::ByteArray(ByteArray::from(vec![1, 2, 3, 255])),
            AMQPValue::Void,
        ];
        for v in values {
            let back = from_typed(&typed(&v)).unwrap();
            assert_eq!(back, v, "{v:?} did not round-trip");
        }
    }

    #[test]
    fn values_too_long_for_amqp_are_refused_not_a_panic() {
        let long = "x".repeat(300);
        let mut m = Map::new();
        m.insert("message_id".into(), json!(long));
        let e = properties_from_typed(&m).unwrap_err();
        assert!(e.contains("message_id") && e.contains("300 bytes"), "{e}");
        let mut h = Map::new();
        h.insert(long.clone(), json!({ "bool": true }));
        let e = table_from_typed(&h).unwrap_err();
        assert!(e.contains("header name") && e.len() < 200, "{e}");
        let e = from_typed(&json!({ "short": long })).unwrap_err();
        assert!(e.contains("300 bytes"), "{e}");
    }

    #[test]
    fn floats_json_cannot_hold_round_trip() {
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0] {
            let back = from_typed(&typed(&AMQPValue::Double(f))).unwrap();
            let AMQPValue::Double(b) = back else {
                panic!("{back:?}")
            };
            assert!(
                b.to_bits() == f.to_bits() || (b.is_nan() && f.is_nan()),
                "{f} came back as {b}"
            );
        }
        let back = from_typed(&typed(&AMQPValue::Float(f32::NAN))).unwrap();
        assert!(
            matches!(back, AMQPValue::Float(f) if f.is_nan()),
            "{back:?}"
        );
    }

    #[test]
    fn properties_round_trip() {
        let mut headers = FieldTable::default();
        headers.insert("x".into(), AMQPValue::LongLongInt(5));
        let p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_message_id("m-1".into())
            .with_correlation_id("c".into())
            .with_timestamp(1_700_000_000)
            .with_type("order".into())
            .with_app_id("app".into())
            .with_expiration("60000".into())
            .with_headers(headers);
        let back = properties_from_typed(&properties_typed(&p)).unwrap();
        assert_eq!(back, p);
    }
}
