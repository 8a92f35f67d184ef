//! Typed settings, loaded in layers and validated once.
//!
//! Layers, later ones winning:
//! 1. the base file: `--config FILE`, default `config/default.toml`;
//! 2. `{RUN_MODE}.toml` beside it, when `RUN_MODE` is set and the file exists;
//! 3. `local.toml` beside it, when it exists (git-ignored: for your machine);
//! 4. environment variables `RABBIT_GUARD__SECTION__KEY`: path segments
//!    separated by `__`, list indexes as numbers
//!    (`RABBIT_GUARD__CONSUMERS__0__PREFETCH=100`); a value is a list or table
//!    when written as a TOML one
//!    (`RABBIT_GUARD__CONSUMERS__0__RETRY__DELAYS='["1s","5s"]'`) and text
//!    otherwise, converted to a number or boolean only where the key takes
//!    one. Unknown keys are errors, never ignored.
//!
//! Durations are written as strings: `"500ms"`, `"5s"`, `"1m"`; none may
//! exceed [`MAX_DURATION`] (100 years). Environment values for keys that
//! take a string (a token, a URL, a header value) stay exactly as written:
//! `0x10` is the text `0x10`, not the number 16.
//!
//! An application's own settings live in an `[app]` table of the same
//! files (`RABBIT_GUARD__APP__…` in the environment), read typed with
//! [`load_with`]; the worker ignores it and never prints it.

mod error;
mod keys;
mod load;
mod settings;
mod validate;

pub use error::{ConfigError, Problem};
pub use load::{DEFAULT_CONFIG_FILE, ENV_PREFIX, Sources, load, load_unvalidated, load_with};
pub use settings::{
    AdminSettings, AppSection, AuthMechanism, Binding, BrokerSettings, ConsumerSettings, Declare,
    ExchangeType, FleetSettings, HttpSettings, LogFormat, LogSettings, OAuth2Settings, OnPause,
    OtlpProtocol, QueueType, ReconnectSettings, RetrySettings, SafetyChecks, Settings,
    TelemetrySettings, TlsSettings, TlsVersion, WorkerSettings, compact_duration,
};
pub use validate::{MAX_DURATION, MAX_RETRY_DELAY, MAX_THREADS};

#[cfg(test)]
mod tests;
