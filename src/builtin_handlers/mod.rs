//! Built-in handlers, so the binary is useful without writing Rust:
//! [`HttpHandler`] (`handler = "http"`) and [`NoopHandler`] (`handler = "noop"`).
//!
//! Each one is a file with a `Builtin` entry (its name, what is wrong with
//! its settings, how to build it) and one line in `BUILTINS`: validation,
//! `check-config` and the worker find it there.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ConsumerSettings;
use crate::handler::ErasedHandler;

#[cfg(feature = "http-handler")]
mod http;
mod http_settings;
mod noop;

#[cfg(feature = "http-handler")]
pub use http::{HttpHandler, HttpSettingsError};
pub use http_settings::{FollowRedirects, HttpSettings};
pub use noop::NoopHandler;

/// A `(key, shown value, message)` problem with a consumer's settings, the
/// key relative to the consumer.
pub(crate) type SettingsProblem = (String, Option<String>, String);

/// A built handler, or why its settings do not make one.
pub(crate) type Built = Result<Arc<dyn ErasedHandler>, String>;

/// One built-in handler kind.
pub(crate) struct Builtin {
    /// The name a consumer's `handler` gives.
    pub(crate) name: &'static str,
    /// What is wrong with a consumer's settings for it.
    pub(crate) problems: fn(&ConsumerSettings) -> Vec<SettingsProblem>,
    /// The handler for a consumer, its calls bounded by `call_timeout`.
    pub(crate) build: fn(&ConsumerSettings, Duration) -> Built,
}

/// Every built-in handler kind.
pub(crate) const BUILTINS: &[Builtin] = &[
    #[cfg(feature = "http-handler")]
    http::BUILTIN,
    noop::BUILTIN,
];

/// The names of the built-in handler kinds.
#[must_use]
pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|b| b.name).collect()
}

/// The built-in handler kind `name`, if there is one.
pub(crate) fn builtin(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}
