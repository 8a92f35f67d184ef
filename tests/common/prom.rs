//! A strict-enough parser of the Prometheus text exposition format, so tests
//! check the format instead of grepping.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("label without '=': {rest:?}"))?;
        let name = rest[..eq].trim();
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let after = &rest[eq + 1..];
        let mut chars = after.char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label value not quoted: {after:?}"));
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    '\\' => '\\',
                    '"' => '"',
                    other => return Err(format!("bad escape \\{other}")),
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end.ok_or("unterminated label value")?;
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = after[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Ok(labels)
}

/// Parses a whole exposition; every line must be a comment, blank, or a sample.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| at("TYPE without a name".into()))?;
                    let kind = parts
                        .next()
                        .ok_or_else(|| at("TYPE without a type".into()))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind}")));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                }
                Some("HELP") => {
                    let name = parts
                        .next()
                        .ok_or_else(|| at("HELP without a name".into()))?;
                    if !valid_name(name) {
                        return Err(at(format!("bad metric name {name}")));
                    }
                }
                _ => {}
            }
            continue;
        }
        let (name_labels, value) = match line.find('}') {
            Some(close) => (&line[..=close], line[close + 1..].trim()),
            None => {
                let sp = line.find(' ').ok_or_else(|| at("no value".into()))?;
                (&line[..sp], line[sp + 1..].trim())
            }
        };
        let (name, labels) = match name_labels.find('{') {
            Some(open) => (
                &name_labels[..open],
                parse_labels(&name_labels[open + 1..name_labels.len() - 1]).map_err(at)?,
            ),
            None => (name_labels, BTreeMap::new()),
        };
        if !valid_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let value = value
            .split_whitespace()
            .next()
            .ok_or_else(|| at("no value".into()))?;
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value: parse_value(value).map_err(at)?,
        });
    }
    Ok(samples)
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[test]
fn parser_rejects_garbage_and_reads_labels() {
    let ok = parse(
        "# HELP a_total x\n# TYPE a_total counter\na_total{q=\"x\\\"y\",r=\"z\"} 3\nb 1.5e3\n",
    )
    .unwrap();
    assert_eq!(ok.len(), 2, "two samples parsed: {ok:?}");
    assert_eq!(
        ok[0].labels["q"], "x\"y",
        "an escaped quote in a label value is unescaped: {ok:?}"
    );
    assert_eq!(
        value(&ok, "b", &[]),
        Some(1500.0),
        "a value with an exponent is read: {ok:?}"
    );
    assert!(
        parse("a{q=x} 1\n").is_err(),
        "an unquoted label value is rejected: {:?}",
        parse("a{q=x} 1\n")
    );
    assert!(
        parse("1a 2\n").is_err(),
        "a name starting with a digit is rejected: {:?}",
        parse("1a 2\n")
    );
    assert!(
        parse("a 1\n# TYPE a wat\n").is_err(),
        "an unknown metric type is rejected: {:?}",
        parse("a 1\n# TYPE a wat\n")
    );
}
