//! The one place the CLI writes to the terminal.

use std::io::Write;

/// Writes a line to stdout; a closed pipe is not an error worth a panic.
pub(super) fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
}

/// Writes an error line to stderr.
pub(super) fn error(s: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "error: {s}");
}

/// Stdout for a command that streams many lines (a table row per message),
/// or writes something whole (a completion script, the demo's screen).
pub(crate) fn stream() -> std::io::Stdout {
    std::io::stdout()
}
