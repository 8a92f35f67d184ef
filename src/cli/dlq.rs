//! `rabbit-guard dlq …`: inspect and replay dead letters.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lapin::Connection;

use super::output;
use crate::config::Settings;
use crate::dead_letter::{
    self, DeadLetter, ImportReport, MoveReport, Moved, ReplayOptions, Selector, json,
};
use crate::error::Error;
use crate::text::{printable, printable_lines};

/// `rabbit-guard dlq`
#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    /// The work queue whose dead-letter queue to use (as configured). Needed
    /// when the config has more than one consumer.
    #[arg(long, short, global = true, conflicts_with = "dlq", value_parser = super::values::name)]
    pub queue: Option<String>,
    /// A dead-letter queue by name, instead of --queue.
    #[arg(long, global = true, value_parser = super::values::name)]
    pub dlq: Option<String>,
    /// Show times in UTC instead of local time.
    #[arg(long, global = true)]
    pub utc: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// Which messages a command applies to. Every given filter must match.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct Filters {
    /// A message id (repeat for several).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// rabbit-guard's reason (permanent, decode, retries-exhausted, panic,
    /// paused) or the broker's (rejected, expired, maxlen, delivery_limit).
    #[arg(long)]
    pub reason: Option<String>,
    /// Dead-lettered within this long, e.g. 30m, 2h, 1d.
    #[arg(long, value_parser = super::values::duration)]
    pub since: Option<Duration>,
    /// Text in the error or the body (case-insensitive).
    #[arg(long)]
    pub grep: Option<String>,
}

impl Filters {
    fn selector(&self) -> Selector {
        Selector {
            ids: self.ids.clone(),
            reason: self.reason.clone(),
            since: self.since,
            grep: self.grep.clone(),
        }
    }
}

/// The `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// A table of dead letters, in queue order (the queue is left as it was).
    List {
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
        /// Show at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per line, with every header and the body.
        #[arg(long)]
        json: bool,
    },
    /// Counts grouped by reason and error, with first and last seen.
    Summary {
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
    },
    /// One message: every header and the body (pretty JSON when it is JSON).
    Show {
        /// Its message id.
        id: String,
    },
    /// Send selected messages back to their original queue, with confirms.
    Replay {
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
        /// Select every message.
        #[arg(long)]
        all: bool,
        /// Refuse messages already replayed this many times.
        #[arg(long, default_value_t = 3)]
        max_replays: u64,
        /// Replay past --max-replays, and even while the queue's breaker is open.
        #[arg(long)]
        force: bool,
        /// Print what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many per second, e.g. 50/s.
        #[arg(long, value_parser = super::values::rate)]
        rate: Option<f64>,
        /// Stop after this many.
        #[arg(long)]
        limit: Option<u64>,
        /// Send them to this queue instead of their original one (asks for
        /// confirmation unless it is the configured consumer's queue).
        #[arg(long, value_parser = super::values::name)]
        to: Option<String>,
        /// Don't ask for confirmation of --to.
        #[arg(long, short)]
        yes: bool,
    },
    /// Delete selected messages.
    Purge {
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
        /// Empty the whole queue.
        #[arg(long)]
        all: bool,
        /// Don't ask for confirmation.
        #[arg(long, short)]
        yes: bool,
        /// Stop after this many.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Write selected messages (headers, properties, body) to a JSON-lines
    /// file, leaving them in the queue.
    Export {
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
        /// The file to write (created readable by you only; never through
        /// a symlink).
        #[arg(long)]
        out: PathBuf,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
        /// Stop after this many.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Publish the messages of an export file to a queue, with confirms.
    Import {
        /// The file written by `dlq export`.
        file: PathBuf,
        /// The queue to publish them to.
        #[arg(long, value_parser = super::values::name)]
        to: String,
    },
}

/// A usage error (exit 2) or a failure (exit 1).
enum Failure {
    Usage(String),
    Error(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e.to_string())
    }
}

/// Runs a `dlq` command.
pub(crate) fn run(settings: &Settings, args: DlqArgs) -> ExitCode {
    let Some(runtime) = super::started(super::worker_runtime(1)) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(dispatch(settings, args)) {
        Ok(code) => code,
        Err(Failure::Usage(m)) => {
            output::error(&m);
            ExitCode::from(2)
        }
        Err(Failure::Error(m)) => {
            output::error(&m);
            ExitCode::FAILURE
        }
    }
}

/// The dead-letter queue to work on, and the work queue of the configured
/// consumer it belongs to (if any).
fn dead_letter_queue(
    settings: &Settings,
    args: &DlqArgs,
) -> Result<(String, Option<String>), Failure> {
    if let Some(dlq) = &args.dlq {
        let owner = settings
            .consumers
            .iter()
            .find(|c| &c.dead_letter_queue() == dlq)
            .map(|c| c.queue.clone());
        return Ok((dlq.clone(), owner));
    }
    let queues: Vec<&str> = settings
        .consumers
        .iter()
        .map(|c| c.queue.as_str())
        .collect();
    let consumer = match &args.queue {
        Some(q) => settings.consumers.iter().find(|c| &c.queue == q).ok_or_else(|| {
            Failure::Usage(format!(
                "no consumer of queue {q:?} in the config (configured: {}); or name the dead-letter queue with --dlq",
                queues.join(", ")
            ))
        })?,
        None => match settings.consumers.as_slice() {
            [only] => only,
            _ => {
                return Err(Failure::Usage(format!(
                    "say which queue's dead letters: --queue NAME (configured: {}) or --dlq NAME",
                    if queues.is_empty() { "none".to_owned() } else { queues.join(", ") }
                )));
            }
        },
    };
    Ok((consumer.dead_letter_queue(), Some(consumer.queue.clone())))
}

async fn dispatch(settings: &Settings, args: DlqArgs) -> Result<ExitCode, Failure> {
    // Usage problems first, before touching the network.
    let needs_dlq = !matches!(args.command, DlqCommand::Import { .. });
    let (dlq, consumer_queue) = if needs_dlq {
        dead_letter_queue(settings, &args)?
    } else {
        (String::new(), None)
    };
    match &args.command {
        DlqCommand::Replay { filters, all, .. } | DlqCommand::Purge { filters, all, .. }
            if !*all && filters.selector().is_empty() =>
        {
            return Err(Failure::Usage(
                "select messages with --id, --reason, --since or --grep, or pass --all".into(),
            ));
        }
        _ => {}
    }
    if let DlqCommand::Export { out, force, .. } = &args.command {
        export_target_check(out, *force)?;
    }
    let connection = crate::connection::connect_once(&settings.broker, "dlq").await?;
    let clock = Clock { utc: args.utc };
    let result = match args.command {
        DlqCommand::List {
            filters,
            limit,
            json,
        } => list(&connection, &dlq, &filters.selector(), limit, json, clock).await,
        DlqCommand::Summary { filters } => {
            summary(&connection, &dlq, &filters.selector(), clock).await
        }
        DlqCommand::Show { id } => {
            show(&connection, &dlq, consumer_queue.as_deref(), &id, clock).await
        }
        DlqCommand::Replay {
            filters,
            all: _,
            max_replays,
            force,
            dry_run,
            rate,
            limit,
            to,
            yes,
        } => {
            let options = ReplayOptions {
                max_replays,
                force,
                dry_run,
                rate,
                limit,
                consumer_queue,
                to,
            };
            replay(
                settings,
                &connection,
                &dlq,
                &filters.selector(),
                &options,
                yes,
            )
            .await
        }
        DlqCommand::Purge {
            filters,
            all,
            yes,
            limit,
        } => purge(&connection, &dlq, &filters.selector(), all, yes, limit).await,
        DlqCommand::Export {
            filters,
            out,
            force,
            limit,
        } => export(&connection, &dlq, &filters.selector(), &out, force, limit).await,
        DlqCommand::Import { file, to } => import(&connection, &file, &to).await,
    };
    let _ = connection.close(200, "done".into()).await;
    result
}

/// How times are shown.
#[derive(Debug, Clone, Copy)]
struct Clock {
    utc: bool,
}

impl Clock {
    fn show(self, t: Option<SystemTime>) -> String {
        let Some(t) = t.and_then(|t| jiff::Timestamp::try_from(t).ok()) else {
            return "-".into();
        };
        let zone = if self.utc {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::system()
        };
        t.to_zoned(zone)
            .strftime("%Y-%m-%d %H:%M:%S %:z")
            .to_string()
    }
}

fn age(d: Option<Duration>) -> String {
    let Some(d) = d else { return "-".into() };
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Cuts `s` to `width` characters (one line, control characters escaped),
/// marking the cut with `…`.
fn cell(s: &str, width: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let one_line = printable(&one_line);
    if one_line.chars().count() <= width {
        format!("{one_line:<width$}")
    } else {
        let cut: String = one_line.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// A progress bar on stdout's terminal (none when piped): `len` messages
/// when known, else a spinner that counts.
fn progress_bar(label: &str, len: Option<u64>) -> Option<ProgressBar> {
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
fn show_move(bar: Option<&ProgressBar>, report: &MoveReport) {
    if let Some(b) = bar {
        b.set_length(u64::from(report.in_queue));
        b.set_position(report.scanned);
        b.set_prefix(move_message(report));
    }
}

async fn list(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    limit: Option<u64>,
    as_json: bool,
    clock: Clock,
) -> Result<ExitCode, Failure> {
    let now = std::time::SystemTime::now();
    let mut shown = 0u64;
    let mut out = std::io::stdout().lock();
    if !as_json {
        let _ = writeln!(
            out,
            "{:>5}  {}  {}  {}  {:>3}  {}  {:>4}  {:>7}",
            "POS",
            cell("ID", 24),
            cell("REASON", 17),
            cell("ERROR", 40),
            "ATT",
            cell("QUEUE", 20),
            "AGE",
            "SIZE"
        );
    }
    let seen = dead_letter::browse(connection, dlq, |dl| {
        if !selector.matches(&dl, now) {
            return ControlFlow::Continue(());
        }
        shown += 1;
        let _ = if as_json {
            writeln!(out, "{}", dl.to_json(now))
        } else {
            writeln!(
                out,
                "{:>5}  {}  {}  {}  {:>3}  {}  {:>4}  {:>7}",
                dl.position,
                cell(&dl.display_id(), 24),
                cell(dl.reason_label(), 17),
                cell(dl.error.as_deref().unwrap_or("-"), 40),
                dl.attempts.map_or("-".into(), |a| a.to_string()),
                cell(dl.original_queue.as_deref().unwrap_or("-"), 20),
                age(dl.age(now)),
                dl.body.len()
            )
        };
        if limit.is_some_and(|l| shown >= l) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    drop(out);
    if !as_json {
        let _ = clock;
        output::line(&format!(
            "{shown} shown of {} in {}",
            seen.in_queue,
            printable(dlq)
        ));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Group {
    count: u64,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
}

/// Groups by reason and the error's first 80 characters.
fn group_key(dl: &DeadLetter) -> (String, String) {
    let error = dl.error.as_deref().unwrap_or("-");
    let error: String = error.split_whitespace().collect::<Vec<_>>().join(" ");
    let error: String = error.chars().take(80).collect();
    (dl.reason_label().to_owned(), error)
}

async fn summary(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    clock: Clock,
) -> Result<ExitCode, Failure> {
    let now = std::time::SystemTime::now();
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    let mut total = 0u64;
    let seen = dead_letter::browse(connection, dlq, |dl| {
        if selector.matches(&dl, now) {
            total += 1;
            let g = groups.entry(group_key(&dl)).or_default();
            g.count += 1;
            if let Some(at) = dl.dead_lettered_at {
                g.first = Some(g.first.map_or(at, |f| f.min(at)));
                g.last = Some(g.last.map_or(at, |l| l.max(at)));
            }
        }
        ControlFlow::Continue(())
    })
    .await?;
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
    output::line(&format!(
        "{:>6}  {}  {}  {}  {}",
        "COUNT",
        cell("REASON", 17),
        cell("ERROR", 50),
        cell("FIRST SEEN", 25),
        "LAST SEEN"
    ));
    for ((reason, error), g) in rows {
        output::line(&format!(
            "{:>6}  {}  {}  {}  {}",
            g.count,
            cell(&reason, 17),
            cell(&error, 50),
            cell(&clock.show(g.first), 25),
            clock.show(g.last)
        ));
    }
    output::line(&format!("{total} selected of {} in {dlq}", seen.in_queue));
    Ok(ExitCode::SUCCESS)
}

async fn show(
    connection: &Connection,
    dlq: &str,
    consumer_queue: Option<&str>,
    id: &str,
    clock: Clock,
) -> Result<ExitCode, Failure> {
    let mut found = None;
    dead_letter::browse(connection, dlq, |dl| {
        if dl.message_id.as_deref() == Some(id) {
            found = Some(dl);
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    let Some(dl) = found else {
        return Err(Failure::Error(format!(
            "no message with id {:?} in {}",
            printable(id),
            printable(dlq)
        )));
    };
    let now = std::time::SystemTime::now();
    let field = |k: &str, v: &str| output::line(&format!("{k:<18}{}", printable(v)));
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    field("position", &dl.position.to_string());
    field("message id", &dl.display_id());
    field("reason", &or_dash(&dl.reason));
    field("broker reason", &or_dash(&dl.broker_reason));
    field("error", &or_dash(&dl.error));
    field(
        "attempts",
        &dl.attempts.map_or("-".into(), |a| a.to_string()),
    );
    field("replays", &dl.replays.to_string());
    let origin = match (&dl.broker_queue, &dl.claimed_queue, consumer_queue) {
        (Some(q), _, _) => format!("{q} (x-death: set by the broker)"),
        (None, Some(c), Some(q)) if c == q => format!("{c} (this dead-letter queue's consumer)"),
        (None, Some(c), _) => format!(
            "{c} (rg-original-queue only: NOT VERIFIED, a publisher could have set it; replay needs --to)"
        ),
        (None, None, Some(q)) => format!("{q} (this dead-letter queue's consumer)"),
        (None, None, None) => "-".into(),
    };
    field("original queue", &origin);
    field(
        "dead-lettered at",
        &format!(
            "{} ({} ago)",
            clock.show(dl.dead_lettered_at),
            age(dl.age(now))
        ),
    );
    output::line("properties:");
    for (k, v) in json::properties_typed(&dl.properties) {
        if k != "headers" {
            output::line(&format!("  {k}: {}", printable(&v.to_string())));
        }
    }
    output::line(
        "headers (who set them: [broker], [rabbit-guard], or [publisher] = not verified):",
    );
    if let Some(h) = dl.properties.headers() {
        for (k, v) in h.inner() {
            output::line(&format!(
                "  {}: {}  [{}]",
                printable(k.as_str()),
                printable(&json::plain(v).to_string()),
                dl.header_origin(k.as_str(), consumer_queue).label()
            ));
        }
    }
    output::line(&format!("body ({} bytes):", dl.body.len()));
    match serde_json::from_slice::<serde_json::Value>(&dl.body) {
        Ok(v) => output::line(&printable_lines(
            &serde_json::to_string_pretty(&v).unwrap_or_default(),
        )),
        Err(_) => match dl.body_text() {
            Some(t) => output::line(&printable_lines(t)),
            None => output::line(&format!("(not UTF-8; base64) {}", json::base64(&dl.body))),
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks `question` on the terminal; true for yes.
fn ask(question: &str) -> bool {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{question}");
    let _ = err.flush();
    drop(err);
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    matches!(answer.trim(), "y" | "Y" | "yes")
}

/// As [`ask`], or a usage error (exit 2) when there is no terminal.
fn confirm(question: &str) -> Result<bool, Failure> {
    if interactive() {
        Ok(ask(question))
    } else {
        Err(Failure::Usage(
            "refusing without --yes (no terminal to confirm on)".into(),
        ))
    }
}

fn list_moved(what: &str, items: &[Moved]) {
    for m in items {
        output::error(&format!(
            "{what} {}: {}",
            printable(&m.id),
            printable(&m.detail)
        ));
    }
}

fn move_message(report: &MoveReport) -> String {
    format!(
        "{} done, {} skipped, {} failed",
        report.done.len(),
        report.skipped.len(),
        report.failed.len()
    )
}

async fn replay(
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
        && let Some(open) = super::admin_client::open_breaker_for_dlq(settings, dlq).await
    {
        return Err(Failure::Error(format!(
            "the breaker {open} is open: replaying now would only feed a failing dependency; wait for it to close or pass --force"
        )));
    }
    let in_queue = dead_letter::message_count(connection, dlq).await?;
    let bar = progress_bar("replaying", Some(u64::from(in_queue)));
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

async fn purge(
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
    let in_queue = dead_letter::message_count(connection, dlq).await?;
    let bar = progress_bar("deleting", Some(u64::from(in_queue)));
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
fn export_target_check(out: &std::path::Path, force: bool) -> Result<(), Failure> {
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
async fn export(
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

async fn import(connection: &Connection, file: &PathBuf, to: &str) -> Result<ExitCode, Failure> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_cut_to_width_on_one_line() {
        assert_eq!(cell("abc", 5), "abc  ");
        assert_eq!(cell("abcdefgh", 5), "abcd…");
        assert_eq!(cell("a\nb", 5), "a b  ");
    }

    #[test]
    fn ages() {
        assert_eq!(age(Some(Duration::from_secs(59))), "59s");
        assert_eq!(age(Some(Duration::from_secs(3_600 * 5))), "5h");
        assert_eq!(age(None), "-");
    }
}
