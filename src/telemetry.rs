//! Logging setup: human-readable or JSON lines on stderr, filtered like `RUST_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides
/// `log.level`. Panics are logged through it too, so JSON output stays one
/// object per line. Calling it twice is harmless (the second call does nothing).
pub fn init(log: &LogSettings) {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty() && EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| log.level.clone());
    // lapin logs every connection problem at ERROR from its I/O thread,
    // repeating what rabbit-guard already reports with context; name it in
    // the filter to see it anyway.
    let directives = if directives.contains("lapin") {
        directives
    } else {
        format!("{directives},lapin=off")
    };
    let filter =
        EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => builder.try_init().is_ok(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            // The delivery's span (queue, message id, attempt, trace id) on
            // every line logged while handling it, the handler's own too.
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
            .is_ok(),
    };
    if installed {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%location, panic = %message, "panic");
        }));
    }
}
