//! Every key a config may hold, to report all mistyped ones at once (serde
//! stops at the first) with the closest known key as a hint.

use serde_json::{Value, json};

use super::settings::{ConsumerSettings, Settings};
use crate::breaker::BreakerConfig;
use crate::builtin_handlers::HttpSettings;

/// The closest of `known` to `given`, if it is close enough to be a typo
/// (case, `-` for `_`, or two edits).
pub(crate) fn closest<'a>(
    given: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let given_norm = norm(given);
    known
        .into_iter()
        .map(|k| (strsim::levenshtein(&given_norm, &norm(k)), k))
        .filter(|(d, k)| *d <= 2.max(given.len() / 5) && *k != given)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The shape of a config: every table with its keys; `{"*": …}` for a map
/// with any keys (breakers), `[…]` for a list of tables (consumers), `{}`
/// for a free map (`http.headers`).
fn schema() -> Value {
    let mut s = serde_json::to_value(Settings::default()).unwrap_or_default();
    let consumer = ConsumerSettings {
        http: Some(HttpSettings::to("")),
        bind: vec![super::settings::Binding::default()],
        ..ConsumerSettings::default()
    };
    s["consumers"] = json!([serde_json::to_value(consumer).unwrap_or_default()]);
    s["breakers"] =
        json!({ "*": serde_json::to_value(BreakerConfig::default()).unwrap_or_default() });
    // The application's own: its type checks it (`load_with`).
    s["app"] = json!({});
    s
}

/// Every key of `config` (as loaded, before it is read into [`Settings`])
/// that no setting has, as `path` plus the closest known key.
pub(crate) fn unknown(config: &Value) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    walk(config, &schema(), "", &mut out);
    out
}

fn walk(value: &Value, schema: &Value, path: &str, out: &mut Vec<(String, Option<String>)>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (value, schema) {
        (Value::Object(map), Value::Object(known)) => {
            if known.is_empty() {
                return; // a free map
            }
            if let Some(each) = known.get("*") {
                for (k, v) in map {
                    walk(v, each, &join(k), out);
                }
                return;
            }
            for (k, v) in map {
                match known.get(k) {
                    Some(s) => walk(v, s, &join(k), out),
                    None => out.push((
                        join(k),
                        closest(k, known.keys().map(String::as_str)).map(str::to_owned),
                    )),
                }
            }
        }
        (Value::Array(items), Value::Array(template)) => {
            if let Some(t) = template.first() {
                for (i, v) in items.iter().enumerate() {
                    walk(v, t, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unknown_key_is_found_with_its_closest_known_one() {
        let config = json!({
            "broker": { "urll": "x", "reconnect": { "max_delay": "1s", "maxdelay": "2s" } },
            "breakers": { "dep": { "failure_rate": 0.5, "falure_rate": 0.4 } },
            "consumers": [
                { "queue": "q", "prefech": 10, "http": { "url": "u", "headers": { "X-Any": "ok" }, "metod": "GET" } },
                { "queue": "r", "retry": { "delay": ["1s"] } }
            ],
            "payments": { "key": 1 }
        });
        let mut found = unknown(&config);
        found.sort();
        let want = [
            ("breakers.dep.falure_rate", Some("failure_rate")),
            ("broker.reconnect.maxdelay", Some("max_delay")),
            ("broker.urll", Some("url")),
            ("consumers[0].http.metod", Some("method")),
            ("consumers[0].prefech", Some("prefetch")),
            ("consumers[1].retry.delay", Some("delays")),
            ("payments", None),
        ];
        let found: Vec<(&str, Option<&str>)> = found
            .iter()
            .map(|(k, s)| (k.as_str(), s.as_deref()))
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn closeness_forgives_case_and_dashes_but_not_strangers() {
        let known = ["billing-api", "inventory"];
        assert_eq!(closest("billing_api", known), Some("billing-api"));
        assert_eq!(closest("BILLING-API", known), Some("billing-api"));
        assert_eq!(closest("payments", known), None);
        assert_eq!(
            closest("billing-api", known),
            None,
            "itself is no suggestion"
        );
    }
}
