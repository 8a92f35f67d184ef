//! `rabbit-guard dlq …`: inspect and replay dead letters. The arguments
//! and dispatch are here; reading commands in `read.rs`, moving ones in
//! `moves.rs`, tables and times in `render.rs`, progress bars in
//! `progress.rs`.

mod moves;
mod progress;
mod read;
mod render;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::output;
use crate::config::Settings;
use crate::dead_letter::{ReplayOptions, Selector};
use crate::error::Error;
use moves::{export, export_target_check, import, purge, replay};
use read::{list, show, summary};
use render::TimeFormat;

/// `rabbit-guard dlq`
#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// Which dead-letter queue a command reads.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct Source {
    /// The work queue whose dead-letter queue to use (as configured). Needed
    /// when the config has more than one consumer.
    #[arg(long, short, conflicts_with = "dlq", value_parser = super::values::name)]
    pub queue: Option<String>,
    /// A dead-letter queue by name, instead of --queue.
    #[arg(long, value_parser = super::values::name)]
    pub dlq: Option<String>,
}

/// How a reading command prints.
#[derive(Debug, Args, Clone, Copy, Default)]
pub(crate) struct Format {
    /// Show times in UTC instead of local time.
    #[arg(long)]
    pub utc: bool,
    /// JSON instead of a table: one object per line (`list`), one object
    /// (`summary`, `show`).
    #[arg(long)]
    pub json: bool,
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
        /// Which queue.
        #[command(flatten)]
        source: Source,
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
        /// Show at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// How to print.
        #[command(flatten)]
        show: Format,
    },
    /// Counts grouped by reason and error, with first and last seen.
    Summary {
        /// Which queue.
        #[command(flatten)]
        source: Source,
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
        /// How to print.
        #[command(flatten)]
        show: Format,
    },
    /// One message: every header and the body (pretty JSON when it is JSON).
    Show {
        /// Which queue.
        #[command(flatten)]
        source: Source,
        /// Its message id.
        id: String,
        /// How to print.
        #[command(flatten)]
        show: Format,
    },
    /// Send selected messages back to their original queue, with confirms.
    Replay {
        /// Which queue.
        #[command(flatten)]
        source: Source,
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
        /// Which queue.
        #[command(flatten)]
        source: Source,
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
        /// Which queue.
        #[command(flatten)]
        source: Source,
        /// Which messages.
        #[command(flatten)]
        filters: Filters,
        /// Every message (the same as giving no selector; accepted like
        /// `replay --all` and `purge --all`).
        #[arg(long)]
        all: bool,
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

impl DlqCommand {
    /// The queue the command reads, when it reads one (`import` does not).
    fn source(&self) -> Option<&Source> {
        match self {
            DlqCommand::List { source, .. }
            | DlqCommand::Summary { source, .. }
            | DlqCommand::Show { source, .. }
            | DlqCommand::Replay { source, .. }
            | DlqCommand::Purge { source, .. }
            | DlqCommand::Export { source, .. } => Some(source),
            DlqCommand::Import { .. } => None,
        }
    }

    /// Usage problems, found before touching the network.
    fn check_usage(&self) -> Result<(), Failure> {
        match self {
            DlqCommand::Replay { filters, all, .. } | DlqCommand::Purge { filters, all, .. }
                if !*all && filters.selector().is_empty() =>
            {
                Err(Failure::Usage(
                    "select messages with --id, --reason, --since or --grep, or pass --all".into(),
                ))
            }
            DlqCommand::Export { out, force, .. } => export_target_check(out, *force),
            _ => Ok(()),
        }
    }

    fn utc(&self) -> bool {
        match self {
            DlqCommand::List { show, .. }
            | DlqCommand::Summary { show, .. }
            | DlqCommand::Show { show, .. } => show.utc,
            _ => false,
        }
    }
}

/// A usage error (exit 2) or a failure (exit 1).
enum Failure {
    /// The command line asks for something that cannot be (exit 2).
    Usage(String),
    /// The library failed (exit 1); its error, source kept.
    Failed(Error),
    /// Something the command itself found wrong (exit 1).
    Error(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Failed(e)
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
        Err(Failure::Failed(e)) => {
            output::error(&e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// The dead-letter queue to work on, and the work queue of the configured
/// consumer it belongs to (if any).
fn dead_letter_queue(
    settings: &Settings,
    args: &Source,
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
    let (dlq, consumer_queue) = match args.command.source() {
        Some(source) => dead_letter_queue(settings, source)?,
        None => (String::new(), None),
    };
    args.command.check_usage()?;
    let connection = crate::amqp::connection::connect_once(&settings.broker, "dlq").await?;
    let clock = TimeFormat {
        utc: args.command.utc(),
    };
    let result = match args.command {
        DlqCommand::List {
            filters,
            limit,
            show,
            ..
        } => list(&connection, &dlq, &filters.selector(), limit, show.json).await,
        DlqCommand::Summary { filters, show, .. } => {
            summary(&connection, &dlq, &filters.selector(), show.json, clock).await
        }
        DlqCommand::Show { id, show: how, .. } => {
            show(
                &connection,
                &dlq,
                consumer_queue.as_deref(),
                &id,
                how.json,
                clock,
            )
            .await
        }
        DlqCommand::Replay {
            filters,
            all: _,
            source: _,
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
            ..
        } => purge(&connection, &dlq, &filters.selector(), all, yes, limit).await,
        DlqCommand::Export {
            filters,
            out,
            force,
            limit,
            ..
        } => export(&connection, &dlq, &filters.selector(), &out, force, limit).await,
        DlqCommand::Import { file, to } => import(&connection, &file, &to).await,
    };
    let _ = connection.close(200, "done".into()).await;
    result
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
