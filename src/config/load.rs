//! Layered loading: base file, `{RUN_MODE}.toml`, `local.toml`, then
//! `RABBIT_GUARD__…` environment variables.

use std::path::{Path, PathBuf};

use config::{Config, File, FileFormat, Value, ValueKind};

use super::error::ConfigError;
use super::settings::Settings;

/// Prefix of environment overrides: `RABBIT_GUARD__BROKER__URL` sets `broker.url`.
pub const ENV_PREFIX: &str = "RABBIT_GUARD__";

/// The base file used when none is given.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";

/// Where the layers come from. [`Sources::from_env`] is what the binary uses;
/// tests build one by hand so they don't touch the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The base file (required). Default `config/default.toml`.
    pub file: Option<PathBuf>,
    /// `RUN_MODE`: when set, `{dir of file}/{run_mode}.toml` is layered on top if it exists.
    pub run_mode: Option<String>,
    /// Environment variables to consider (only `RABBIT_GUARD__…` ones are used).
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The base file `file` (or `config/default.toml`), `RUN_MODE` and every
    /// `RABBIT_GUARD__…` variable from the process environment.
    #[must_use]
    pub fn from_env(file: Option<PathBuf>) -> Self {
        Self {
            file,
            run_mode: std::env::var("RUN_MODE").ok().filter(|m| !m.is_empty()),
            // `RABBIT_GUARD_…` with one underscore too, to report it rather
            // than ignore it (`RABBIT_GUARD_CONFIG` is the CLI's own).
            env: std::env::vars()
                .filter(|(k, _)| k.starts_with("RABBIT_GUARD_") && k != "RABBIT_GUARD_CONFIG")
                .collect(),
        }
    }
}

/// Loads and validates settings from `sources`. Validation knows only the
/// built-in handlers plus `handlers`.
///
/// # Errors
///
/// [`ConfigError`] when a file is missing or malformed, a key is unknown or
/// mistyped, or a value is invalid; the message names the file or key.
pub fn load(sources: &Sources, handlers: &[&str]) -> Result<Settings, ConfigError> {
    let settings = load_unvalidated(sources)?;
    settings.validate(handlers)?;
    Ok(settings)
}

/// Loads and validates settings as [`load`] does, and the application's
/// own `[app]` table as `A` (from the same files and `RABBIT_GUARD__APP__…`
/// variables).
///
/// ```no_run
/// use rabbit_guard::config::{Sources, load_with};
/// use rabbit_guard::secret::SecretUrl;
///
/// #[derive(serde::Deserialize)]
/// struct Payments {
///     database_url: SecretUrl, // masked wherever it is printed
///     #[serde(default)]
///     pool_size: u32,
/// }
///
/// let (settings, payments) = load_with::<Payments>(&Sources::from_env(None), &["charge"])?;
/// # Ok::<(), rabbit_guard::config::ConfigError>(())
/// ```
///
/// # Errors
///
/// As [`load`]; [`ConfigError::App`] naming the key when `[app]` does not
/// fit `A`.
pub fn load_with<A: serde::de::DeserializeOwned>(
    sources: &Sources,
    handlers: &[&str],
) -> Result<(Settings, A), ConfigError> {
    let settings = load(sources, handlers)?;
    let app = settings.app.read::<A>()?;
    Ok((settings, app))
}

/// Loads settings without validating them.
///
/// # Errors
///
/// As [`load`], minus validation.
pub fn load_unvalidated(sources: &Sources) -> Result<Settings, ConfigError> {
    let base = sources
        .file
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
    if !base.is_file() {
        return Err(ConfigError::MissingFile { path: base });
    }
    let dir = base.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut layers = vec![(base, true)];
    if let Some(mode) = &sources.run_mode {
        layers.push((dir.join(format!("{mode}.toml")), false));
    }
    layers.push((dir.join("local.toml"), false));

    let mut builder = Config::builder();
    let mut used = Vec::new();
    for (path, required) in layers {
        if !required && !path.is_file() {
            continue;
        }
        // Parse each file up front so a syntax error names its file.
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::Syntax {
                path,
                message: syntax_message(&text, &e),
            });
        }
        builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        used.push(path);
    }
    for (key, value) in &sources.env {
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
            if let Some(rest) = key.strip_prefix("RABBIT_GUARD_")
                && key != "RABBIT_GUARD_CONFIG"
            {
                return Err(ConfigError::EnvPrefix {
                    variable: key.clone(),
                    suggestion: format!("{ENV_PREFIX}{}", rest.replace('_', "__")),
                });
            }
            continue;
        };
        let path = env_key_to_path(rest).ok_or_else(|| ConfigError::EnvKey {
            variable: key.clone(),
        })?;
        builder =
            builder
                .set_override(&path, env_value(value))
                .map_err(|_| ConfigError::EnvKey {
                    variable: key.clone(),
                })?;
    }
    let mut files = used
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if sources.env.iter().any(|(k, _)| k.starts_with(ENV_PREFIX)) {
        files.push_str(" and RABBIT_GUARD__* variables");
    }
    let config = builder.build().map_err(|e| ConfigError::Parse {
        files: files.clone(),
        message: without_values(&one_line(&e.to_string())),
    })?;
    if let Ok(raw) = config.clone().try_deserialize::<serde_json::Value>() {
        let keys = super::keys::unknown(&raw);
        if !keys.is_empty() {
            return Err(ConfigError::UnknownKeys { files, keys });
        }
    }
    config
        .try_deserialize::<Settings>()
        .map_err(|e| ConfigError::Parse {
            files,
            message: with_hint(&without_values(&one_line(&e.to_string()))),
        })
}

/// A deserializer's message with what to write instead, where that is
/// clear: a duration given as a bare number needs a unit.
fn with_hint(message: &str) -> String {
    if message.contains("expected a duration") {
        let number = message
            .split_once("integer `")
            .or_else(|| message.split_once("floating point `"))
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(n, _)| n.to_owned());
        let example = number.map_or_else(
            || "\"10s\"".to_owned(),
            |n| format!("\"{n}s\" or \"{n}ms\""),
        );
        format!("{message}; a duration is a string with a unit, e.g. {example}")
    } else {
        message.to_owned()
    }
}

/// The parser's message with its line and column and the key the line
/// sets (or the table it opens), never a value: any value may be a secret,
/// under any name (`passwd`, `Cookie`, a URL's password).
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    let Some(span) = e.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let source = text.lines().nth(line - 1).unwrap_or("").trim();
    let place = if let Some((key, _)) = source.split_once('=') {
        format!(" (the value of key {})", shown_name(key))
    } else if source.starts_with('[') {
        format!(" (in the table header {})", shown_name(source))
    } else {
        String::new()
    };
    format!("line {line}, column {column}: {message}{place}")
}

/// A key or table header as written, fit to print: printable, at most 80
/// characters, quoted.
fn shown_name(name: &str) -> String {
    format!(
        "{:?}",
        crate::text::truncate(&crate::text::printable(name.trim()), 80)
    )
}

/// A deserializer's message with the values it quotes cut out (`invalid
/// type: string "hunter2", expected a map` → `invalid type: a string,
/// expected a map`) when they may be secret: the key holds a URL, a token
/// or header values, or the message names no key.
pub(super) fn without_values(message: &str) -> String {
    let key = message
        .rsplit_once("for key `")
        .map(|(_, k)| k.trim_end_matches('`').to_ascii_lowercase());
    let secret = key.is_none_or(|k| {
        ["url", "token", "header", "secret", "password"]
            .iter()
            .any(|s| k.contains(s))
    });
    if !secret {
        return message.to_owned();
    }
    without_any_values(message)
}

/// A deserializer's message with every value it quotes cut out: for the
/// application's `[app]` table, whose secrets the worker cannot tell.
pub(super) fn without_any_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let after = &rest[at + "string \"".len()..];
        // The quoted value ends at the last `"` before the next `,` or `for key`.
        let end = after
            .find("\", ")
            .or_else(|| after.find("\" for key"))
            .or_else(|| after.rfind('"'))
            .unwrap_or(after.len());
        rest = after.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    // config-rs writes `consumers[0]prefetch`; put the dot back.
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphanumeric() || *n == '_')
        {
            out.push('.');
        }
    }
    out
}

/// `CONSUMERS__0__RETRY__DELAYS` → `consumers[0].retry.delays`.
fn env_key_to_path(rest: &str) -> Option<String> {
    let mut path = String::new();
    for segment in rest.split("__") {
        if segment.is_empty() {
            return None;
        }
        let segment = segment.to_lowercase();
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            if path.is_empty() {
                return None;
            }
            path.push('[');
            path.push_str(&segment);
            path.push(']');
        } else {
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return None;
            }
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    (!path.is_empty()).then_some(path)
}

/// A value written as a TOML list or table (`["1s", "5s"]`, `{ url = "…" }`)
/// or a quoted TOML string is read as one; anything else stays the text it
/// is, which config-rs turns into a number or boolean only where the key
/// takes one. So `RABBIT_GUARD__ADMIN__TOKEN=0x10` is the token `0x10`,
/// not 16, while `…__PREFETCH=100` is still the number 100.
fn env_value(raw: &str) -> Value {
    let text = || Value::new(None, ValueKind::String(raw.to_owned()));
    let trimmed = raw.trim_start();
    if !trimmed.starts_with(['[', '{', '"', '\'']) {
        return text();
    }
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut table) => match table.remove("v") {
            Some(v) => Value::new(None, toml_to_config(v)),
            None => text(),
        },
        Err(_) => text(),
    }
}

fn toml_to_config(v: toml::Value) -> ValueKind {
    match v {
        toml::Value::String(s) => ValueKind::String(s),
        toml::Value::Integer(i) => ValueKind::I64(i),
        toml::Value::Float(f) => ValueKind::Float(f),
        toml::Value::Boolean(b) => ValueKind::Boolean(b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(
            a.into_iter()
                .map(|v| Value::new(None, toml_to_config(v)))
                .collect(),
        ),
        toml::Value::Table(t) => ValueKind::Table(
            t.into_iter()
                .map(|(k, v)| (k, Value::new(None, toml_to_config(v))))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_text_stays_text_and_lists_stay_lists() {
        for raw in [
            "0x10",
            "1e3",
            "true",
            "50",
            "0.5",
            "1979-05-27",
            "inf",
            "nan",
        ] {
            assert_eq!(
                env_value(raw).into_string().ok().as_deref(),
                Some(raw),
                "{raw} should stay the text it is"
            );
        }
        assert_eq!(env_value("\"quoted\"").into_string().unwrap(), "quoted");
        let list = env_value("[\"1s\", \"5s\"]").into_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(env_value("[not toml").into_string().unwrap(), "[not toml");
    }

    #[test]
    fn error_messages_do_not_quote_values() {
        assert_eq!(
            without_values(
                "invalid type: string \"hunter2\", expected a map for key `consumers[0].http.headers`"
            ),
            "invalid type: a string, expected a map for key `consumers[0].http.headers`"
        );
        assert_eq!(
            without_values("invalid type: string \"a\\\"b, c\" for key `admin.token`"),
            "invalid type: a string for key `admin.token`"
        );
        assert_eq!(
            without_values("unknown field `payments`"),
            "unknown field `payments`"
        );
        assert_eq!(
            without_values(
                "invalid value: string \"-5s\", expected a duration for key `breakers.dep.open_timeout`"
            ),
            "invalid value: string \"-5s\", expected a duration for key `breakers.dep.open_timeout`",
            "values of keys that hold no secret are shown"
        );
        let text = "[broker]\nurl = \"amqp://u:hunter2@h/\"\nport = = 1\n";
        let e = text.parse::<toml::Table>().unwrap_err();
        let m = syntax_message(text, &e);
        assert!(
            m.starts_with("line 3, column") && !m.contains("hunter2"),
            "{m}"
        );
    }

    #[test]
    fn env_keys_map_to_paths() {
        assert_eq!(
            env_key_to_path("BROKER__URL").as_deref(),
            Some("broker.url")
        );
        assert_eq!(
            env_key_to_path("CONSUMERS__0__RETRY__DELAYS").as_deref(),
            Some("consumers[0].retry.delays")
        );
        assert_eq!(
            env_key_to_path("BREAKERS__billing-api__FAILURE_RATE").as_deref(),
            Some("breakers.billing-api.failure_rate")
        );
        assert_eq!(env_key_to_path("0__X"), None);
        assert_eq!(env_key_to_path("A__B\u{1b}"), None);
        assert_eq!(env_key_to_path("A____B"), None);
        assert_eq!(env_key_to_path("A__B C"), None);
    }
}
