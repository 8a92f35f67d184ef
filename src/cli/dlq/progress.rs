//! Progress bars on a terminal (none when piped).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::dead_letter::MoveReport;

/// A progress bar on stdout's terminal (none when piped): `len` messages
/// when known, else a spinner that counts.
pub(super) fn progress_bar(label: &str, len: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = match len {
        Some(len) => {
            let bar = ProgressBar::new(len);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:25}] {pos}/{len} {elapsed} {prefix}")
                    .map_or_else(
                        |_| ProgressStyle::default_bar(),
                        |s| s.progress_chars("=> "),
                    ),
            );
            bar
        }
        None => {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg} {prefix}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        }
    };
    bar.set_message(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

/// Moves a bar to a move report's position: scanned of in-queue, and the
/// counts so far.
pub(super) fn show_move(bar: Option<&ProgressBar>, report: &MoveReport) {
    if let Some(b) = bar {
        b.set_length(u64::from(report.in_queue));
        b.set_position(report.scanned);
        b.set_prefix(move_message(report));
    }
}

pub(super) fn move_message(report: &MoveReport) -> String {
    format!(
        "{} done, {} skipped, {} failed",
        report.done.len(),
        report.skipped.len(),
        report.failed.len()
    )
}
