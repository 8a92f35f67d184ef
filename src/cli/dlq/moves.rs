//! The commands that move messages: `replay`, `purge`, `export`, `import`.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use lapin::Connection;

use super::progress::{progress_bar, show_move};
use super::{Failure, ask, confirm, interactive, output};
use crate::config::Settings;
use crate::dead_letter::{self, ImportReport, Moved, ReplayOptions, Selector};
use crate::text::printable;

fn list_moved(what: &str, items: &[Moved]) {
    for m in items {
        output::error(&format!(
            "{what} {}: {}",
            printable(&m.id),
            printable(&m.detail)
        ));
    }
}

pub(super) async fn replay(
    settings: &Settings,
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    options: &ReplayOptions,
    yes: bool,
) -> Result<ExitCode, Failure> {
    if let Some(to) = &options.to
        && options.consumer_queue.as_ref() != Some(to)
        && !options.dry_run
        && !yes
        && !confirm(&format!(
            "send the selected messages of {dlq} to {to}, which is not the queue this dead-letter queue belongs to ({})? [y/N] ",
            options
                .consumer_queue
                .as_deref()
                .unwrap_or("none configured")
        ))?
    {
        output::line("nothing replayed");
        return Ok(ExitCode::SUCCESS);
    }
    if !options.force
        && let Some(open) = crate::cli::admin_client::open_breaker_for_dlq(settings, dlq).await
    {
        return Err(Failure::Error(format!(
            "the breaker {open} is open: replaying now would only feed a failing dependency; wait for it to close or pass --force"
        )));
    }
    // The length comes with the first report (the operation counts the queue).
    let bar = progress_bar("replaying", Some(0));
    let report = dead_letter::replay(connection, dlq, selector, options, |r| {
        show_move(bar.as_ref(), r);
    })
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = report?;
    if options.dry_run {
        for m in &report.done {
            output::line(&format!(
                "would replay {} -> {}",
                printable(&m.id),
                printable(&m.detail)
            ));
        }
        output::line(&format!(
            "dry run: {} would be replayed, {} skipped, {} failed; nothing moved",
            report.done.len(),
            report.skipped.len(),
            report.failed.len()
        ));
    } else {
        output::line(&format!(
            "replayed {} of {} messages in {dlq}; {} skipped, {} failed",
            report.done.len(),
            report.in_queue,
            report.skipped.len(),
            report.failed.len()
        ));
    }
    list_moved("skipped", &report.skipped);
    list_moved("not moved", &report.failed);
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(super) async fn purge(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    all: bool,
    yes: bool,
    limit: Option<u64>,
) -> Result<ExitCode, Failure> {
    if !yes {
        if !interactive() {
            return Err(Failure::Usage(
                "refusing to delete without --yes (no terminal to confirm on)".into(),
            ));
        }
        let now = std::time::SystemTime::now();
        let mut count = 0u64;
        dead_letter::browse(connection, dlq, |dl| {
            if all || selector.matches(&dl, now) {
                count += 1;
            }
            ControlFlow::Continue(())
        })
        .await?;
        let count = limit.map_or(count, |l| count.min(l));
        if count == 0 {
            output::line(&format!("nothing to delete in {dlq}"));
            return Ok(ExitCode::SUCCESS);
        }
        if !ask(&format!("delete {count} message(s) from {dlq}? [y/N] ")) {
            output::line("nothing deleted");
            return Ok(ExitCode::SUCCESS);
        }
    }
    if all && selector.is_empty() && limit.is_none() {
        let n = dead_letter::purge_all(connection, dlq).await?;
        output::line(&format!("deleted {n} messages from {dlq}"));
        return Ok(ExitCode::SUCCESS);
    }
    let bar = progress_bar("deleting", Some(0));
    let report = dead_letter::purge(connection, dlq, selector, limit, |r| {
        show_move(bar.as_ref(), r);
    })
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = report?;
    output::line(&format!(
        "deleted {} of {} messages in {dlq}",
        report.done.len(),
        report.in_queue
    ));
    Ok(ExitCode::SUCCESS)
}

/// Refuses an `--out` that exists (unless `--force`) or whose folder does
/// not, before anything is read or written.
pub(super) fn export_target_check(out: &std::path::Path, force: bool) -> Result<(), Failure> {
    if !force && out.symlink_metadata().is_ok() {
        return Err(Failure::Usage(format!(
            "{} exists: pass --force to replace it, or choose another --out",
            out.display()
        )));
    }
    let dir = export_dir(out);
    if !dir.is_dir() {
        return Err(Failure::Usage(format!(
            "cannot write {}: folder {} does not exist",
            out.display(),
            dir.display()
        )));
    }
    Ok(())
}

fn export_dir(out: &std::path::Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes the selection to a temporary file beside `out` (mode 0600) and
/// renames it into place when complete: a failed export leaves no partial
/// file and never touches an existing one; a symlink at `out` is replaced,
/// never followed.
pub(super) async fn export(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    out: &std::path::Path,
    force: bool,
    limit: Option<u64>,
) -> Result<ExitCode, Failure> {
    let cannot =
        |e: &dyn std::fmt::Display| Failure::Error(format!("cannot write {}: {e}", out.display()));
    // The queue first: a mistyped name must not cost a file.
    let in_queue = dead_letter::message_count(connection, dlq).await?;
    let temp = tempfile::Builder::new()
        .prefix(".rabbit-guard-export-")
        .tempfile_in(export_dir(out))
        .map_err(|e| cannot(&e))?;
    let mut writer = std::io::BufWriter::new(temp);
    let now = std::time::SystemTime::now();
    let mut written = 0u64;
    let mut write_error = None;
    let bar = progress_bar("exporting", Some(u64::from(in_queue)));
    dead_letter::browse(connection, dlq, |dl| {
        if let Some(b) = &bar {
            b.set_position(dl.position);
        }
        if !selector.matches(&dl, now) {
            return ControlFlow::Continue(());
        }
        if let Err(e) = writeln!(writer, "{}", dl.to_export()) {
            write_error = Some(e);
            return ControlFlow::Break(());
        }
        written += 1;
        if let Some(b) = &bar {
            b.set_prefix(format!("{written} written"));
        }
        if limit.is_some_and(|l| written >= l) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(e) = write_error {
        return Err(cannot(&e));
    }
    let temp = writer
        .into_inner()
        .map_err(|e| cannot(&e.error().to_string()))?;
    temp.as_file().sync_all().map_err(|e| cannot(&e))?;
    if force {
        temp.persist(out).map_err(|e| cannot(&e.error))?;
    } else {
        temp.persist_noclobber(out).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                Failure::Usage(format!(
                    "{} appeared while exporting: pass --force to replace it",
                    out.display()
                ))
            } else {
                cannot(&e.error)
            }
        })?;
    }
    output::line(&format!(
        "exported {written} messages from {} to {} (left in the queue)",
        printable(dlq),
        out.display()
    ));
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn import(
    connection: &Connection,
    file: &PathBuf,
    to: &str,
) -> Result<ExitCode, Failure> {
    let f = std::fs::File::open(file)
        .map_err(|e| Failure::Error(format!("cannot read {}: {e}", file.display())))?;
    // Count the lines of a regular file first (a streaming pass) so the bar
    // knows its length; a pipe can be read only once: a spinner then.
    let lines = if std::io::stdout().is_terminal() && f.metadata().is_ok_and(|m| m.is_file()) {
        std::fs::File::open(file).ok().map(|counted| {
            BufReader::new(counted)
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.trim().is_empty())
                .count() as u64
        })
    } else {
        None
    };
    let bar = progress_bar("importing", lines);
    let report = dead_letter::import(connection, BufReader::new(f), to, |r: &ImportReport| {
        if let Some(b) = &bar {
            b.set_position(r.published + r.failed.len() as u64);
            b.set_prefix(format!("{} failed", r.failed.len()));
        }
    })
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = report?;
    output::line(&format!(
        "imported {} messages into {to}; {} failed",
        report.published,
        report.failed.len()
    ));
    list_moved("not imported", &report.failed);
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
