//! Configuration errors: each names the file or key and says what to do.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a loaded configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `consumers[0].prefetch`.
    pub key: String,
    /// The offending value as written, when there is one.
    pub value: Option<String>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} = {v}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The base config file does not exist.
    #[error(
        "config file {} not found: pass --config FILE, or run from the directory that holds config/",
        path.display()
    )]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// A config file exists but could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A config file is not valid TOML.
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment variable name does not map to a config key.
    #[error(
        "environment variable {variable} does not name a config key: write RABBIT_GUARD__SECTION__KEY, with list indexes as numbers (RABBIT_GUARD__CONSUMERS__0__PREFETCH)"
    )]
    EnvKey {
        /// The variable's name.
        variable: String,
    },
    /// A variable starting with `RABBIT_GUARD_` that is not read: overrides
    /// take two underscores after the prefix and between segments.
    #[error(
        "environment variable {variable} is not read: overrides are written RABBIT_GUARD__SECTION__KEY with two underscores (did you mean {suggestion}?)"
    )]
    EnvPrefix {
        /// The variable's name.
        variable: String,
        /// The same with the separators doubled.
        suggestion: String,
    },
    /// The `[app]` table does not fit the application's settings type.
    #[error("{key}: {message} (in the application's [app] settings)")]
    App {
        /// The key, e.g. `app.database.pool_size`.
        key: String,
        /// What did not fit (values masked).
        message: String,
    },
    /// Keys that no setting has (every one of them, with the closest known key).
    #[error("{}", unknown_message(files, keys))]
    UnknownKeys {
        /// The files that were read.
        files: String,
        /// Each unknown key's path, and the known key it is closest to.
        keys: Vec<(String, Option<String>)>,
    },
    /// A key is unknown or a value has the wrong type.
    #[error("invalid configuration (from {files}): {message}")]
    Parse {
        /// The files that were read.
        files: String,
        /// What the deserializer said, with the key.
        message: String,
    },
    /// Values are well-formed but not acceptable.
    #[error("{}", invalid_message(.0))]
    Invalid(Vec<Problem>),
}

fn unknown_message(files: &str, keys: &[(String, Option<String>)]) -> String {
    let list: Vec<String> = keys
        .iter()
        .map(|(k, hint)| match hint {
            Some(h) => format!("{k} (did you mean {h}?)"),
            None => k.clone(),
        })
        .collect();
    let noun = if keys.len() == 1 { "key" } else { "keys" };
    // A whole unknown table, like `[payments]`: most likely the
    // application's own settings.
    let app_hint = if keys
        .iter()
        .any(|(k, hint)| hint.is_none() && !k.contains(['.', '[']))
    {
        "; an application's own settings go under [app] (read them with rabbit_guard::config::load_with)"
    } else {
        ""
    };
    format!(
        "invalid configuration (from {files}): unknown {noun} {}{app_hint}; every key is listed in the README (Configuration, Reference)",
        list.join(", ")
    )
}

fn invalid_message(problems: &[Problem]) -> String {
    match problems {
        [one] => format!("invalid configuration: {one}"),
        many => {
            let mut s = format!("invalid configuration ({} problems):", many.len());
            for p in many {
                s.push_str("\n  - ");
                s.push_str(&p.to_string());
            }
            s
        }
    }
}
