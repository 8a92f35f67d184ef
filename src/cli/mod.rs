//! The `rabbit-guard` command line: `run`, `check-config`, `dlq …`.
//!
//! An application's own binary reuses it with [`App`] (its name and
//! version, its `[app]` settings, an async setup), or with [`main_with`]
//! for a synchronous registration:
//!
//! ```no_run
//! # use rabbit_guard::builtin_handlers::NoopHandler as MyHandler;
//! fn main() -> std::process::ExitCode {
//!     rabbit_guard::cli::main_with(|worker| worker.handler("orders", MyHandler))
//! }
//! ```

pub(crate) mod admin_client;
mod app;
#[cfg(feature = "admin")]
mod breaker;
mod dlq;
mod output;
mod status;
#[cfg(feature = "demo")]
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

pub use app::App;

use crate::config::{self, Settings, Sources};
use crate::{Worker, WorkerBuilder};

/// rabbit-guard: RabbitMQ consumers that pause at the broker while their dependency fails.
#[derive(Debug, Parser)]
#[command(name = "rabbit-guard", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Config file. `$RUN_MODE.toml` and `local.toml` beside it, then
    /// RABBIT_GUARD__SECTION__KEY variables, are layered on top.
    #[arg(long, short, global = true, env = "RABBIT_GUARD_CONFIG", default_value = config::DEFAULT_CONFIG_FILE)]
    pub(crate) config: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run every configured consumer until SIGTERM or Ctrl-C.
    Run,
    /// Validate the configuration and print it as it will be used (password masked).
    CheckConfig {
        /// One JSON object: the settings (secrets masked), safety checks and warnings.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, replay, purge, export and import dead letters.
    Dlq(dlq::DlqArgs),
    /// Show a running worker's breakers, consumers and connections (from its admin endpoint).
    Status(status::StatusArgs),
    /// Open, close, reset or disable a running worker's breaker (through its admin endpoint).
    #[cfg(feature = "admin")]
    Breaker(breaker::BreakerArgs),
    /// Print a shell completion script: rabbit-guard completions bash > /etc/bash_completion.d/rabbit-guard.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Watch the idea work: a flaky dependency, a breaker that pauses consumption, nothing lost.
    #[cfg(feature = "demo")]
    Demo(tools::DemoArgs),
    /// Run a stand-in dependency that alternates between healthy (200) and failing (503).
    #[cfg(feature = "demo")]
    FlakyServer(tools::FlakyArgs),
    /// Publish a steady stream of numbered JSON messages to a queue.
    #[cfg(feature = "demo")]
    Publish(tools::PublishArgs),
}

/// The `rabbit-guard` binary's entry point: the built-in handlers, and the
/// `demo`, `flaky-server` and `publish` tools (with the `demo` feature).
#[must_use]
pub fn main() -> ExitCode {
    let setup: app::Setup = Box::new(|worker| Box::pin(async move { Ok(worker) }));
    dispatch(None, Tools::Shown, &[], |_| Ok(()), setup)
}

/// The entry point for a binary that registers its own handlers with a
/// synchronous closure. `register` is called once with default settings to
/// learn the handler names, and once more by `run`; for an async setup that
/// receives the loaded settings, for the application's own name and version
/// in `--version` and `--help`, and for the demo tools, use [`App`].
#[must_use]
pub fn main_with<F>(register: F) -> ExitCode
where
    F: Fn(WorkerBuilder) -> WorkerBuilder + 'static,
{
    let names: Vec<String> = register(Worker::builder(Settings::default()))
        .handler_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    dispatch(
        None,
        Tools::Hidden,
        &names,
        |_| Ok(()),
        Box::new(move |worker| Box::pin(async move { Ok(register(worker)) })),
    )
}

/// Whether the command line offers `demo`, `flaky-server` and `publish`:
/// rabbit-guard's own binary does, an application's only when it asks
/// ([`App::with_demo_tools`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tools {
    Shown,
    Hidden,
}

/// The subcommands of [`Tools`].
const TOOLS: [&str; 3] = ["demo", "flaky-server", "publish"];

/// The command line as `identity` names it (rabbit-guard's own when
/// `None`): its name in usage lines, `--version` and every help text.
fn command(identity: Option<app::Identity>, tools: Tools) -> clap::Command {
    use clap::CommandFactory;
    let mut command = Cli::command();
    if let Some(id) = identity {
        command = renamed(command, id.name)
            .name(id.name)
            .bin_name(id.name)
            .version(id.version);
        if let Some(about) = id.about {
            command = command.about(about);
        }
    }
    if tools == Tools::Hidden {
        // clap cannot remove a subcommand: each becomes a hidden stand-in
        // that takes any arguments, and `parse` refuses it as unknown.
        for tool in TOOLS {
            if command.find_subcommand(tool).is_some() {
                command = command.mut_subcommand(tool, |_| {
                    clap::Command::new(tool)
                        .hide(true)
                        .disable_help_flag(true)
                        .arg(
                            clap::Arg::new("any")
                                .num_args(0..)
                                .allow_hyphen_values(true)
                                .trailing_var_arg(true),
                        )
                });
            }
        }
    }
    command
}

/// `command` with `rabbit-guard` in its help texts replaced by `name`, at
/// every level.
fn renamed(command: clap::Command, name: &'static str) -> clap::Command {
    let swap = |s: &clap::builder::StyledStr| s.to_string().replace("rabbit-guard", name);
    let mut command = command;
    if let Some(text) = command.get_about().map(swap) {
        command = command.about(text);
    }
    if let Some(text) = command.get_long_about().map(swap) {
        command = command.long_about(text);
    }
    command = command.mut_args(|arg| {
        let mut arg = arg;
        if let Some(text) = arg.get_help().map(swap) {
            arg = arg.help(text);
        }
        if let Some(text) = arg.get_long_help().map(swap) {
            arg = arg.long_help(text);
        }
        arg
    });
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for sub in subcommands {
        command = command.mut_subcommand(sub, |c| renamed(c, name));
    }
    command
}

fn parse(identity: Option<app::Identity>, tools: Tools) -> Cli {
    use clap::FromArgMatches;
    let mut command = command(identity, tools);
    let mut matches = command.get_matches_mut();
    if tools == Tools::Hidden
        && let Some(tool) = matches.subcommand_name().filter(|n| TOOLS.contains(n))
    {
        command
            .error(
                clap::error::ErrorKind::InvalidSubcommand,
                format!("unrecognized subcommand '{tool}'"),
            )
            .exit();
    }
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit())
}

fn dispatch(
    identity: Option<app::Identity>,
    tools: Tools,
    handler_names: &[String],
    check_app: app::CheckApp,
    setup: app::Setup,
) -> ExitCode {
    let cli = parse(identity, tools);
    let names: Vec<&str> = handler_names.iter().map(String::as_str).collect();
    let sources = Sources::from_env(Some(cli.config.clone()));
    let loaded = match cli.command.needs() {
        Needs::Nothing => Ok(Settings::default()),
        Needs::Optional if !cli.config.is_file() => Ok(Settings::default()),
        Needs::Optional | Needs::Broker => config::load_unvalidated(&sources).and_then(|s| {
            // Tools need the broker and queue names, not valid handlers.
            let problems: Vec<_> = s
                .problems(&names)
                .into_iter()
                .filter(|p| p.key.starts_with("broker.") || p.key.starts_with("admin."))
                .collect();
            if problems.is_empty() {
                Ok(s)
            } else {
                Err(config::ConfigError::Invalid(problems))
            }
        }),
        Needs::Valid => config::load(&sources, &names).and_then(|s| check_app(&s).map(|()| s)),
    };
    let settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            output::error(&e.to_string());
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::CheckConfig { json } => check_config(&settings, json),
        Command::Run => run(settings, setup),
        Command::Dlq(args) => dlq::run(&settings, args),
        Command::Status(args) => status::run(&settings, &args),
        #[cfg(feature = "admin")]
        Command::Breaker(args) => breaker::run(&settings, &args),
        Command::Completions { shell } => {
            let mut command = command(identity, tools);
            let name = identity.map_or("rabbit-guard", |id| id.name);
            clap_complete::generate(shell, &mut command, name, &mut output::stream());
            ExitCode::SUCCESS
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => tools::demo(&settings, &args),
        #[cfg(feature = "demo")]
        Command::FlakyServer(args) => tools::flaky_server(&settings, &args),
        #[cfg(feature = "demo")]
        Command::Publish(args) => tools::publish(&settings, &args),
    }
}

/// How much configuration a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// None at all.
    Nothing,
    /// All of it, valid.
    Valid,
    /// The broker and queue names (a config file is required).
    Broker,
    /// As `Broker` when a config file is there, else the defaults.
    Optional,
}

impl Command {
    fn needs(&self) -> Needs {
        match self {
            Command::Run | Command::CheckConfig { .. } => Needs::Valid,
            Command::Dlq(_) => Needs::Broker,
            Command::Status(args) if args.admin.is_some() => Needs::Optional,
            Command::Status(_) => Needs::Broker,
            #[cfg(feature = "admin")]
            Command::Breaker(args) if args.admin.is_some() => Needs::Optional,
            #[cfg(feature = "admin")]
            Command::Breaker(_) => Needs::Broker,
            Command::Completions { .. } => Needs::Nothing,
            #[cfg(feature = "demo")]
            Command::Demo(_) | Command::FlakyServer(_) | Command::Publish(_) => Needs::Optional,
        }
    }
}

fn check_config(settings: &Settings, as_json: bool) -> ExitCode {
    let shown = settings.redacted();
    if as_json {
        output::line(
            &serde_json::json!({
                "ok": true,
                "settings": shown,
                "safety_checks": crate::worker::safety::risks(settings),
                "warnings": crate::worker::safety::advisories(settings),
            })
            .to_string(),
        );
        return ExitCode::SUCCESS;
    }
    match toml::to_string_pretty(&shown) {
        Ok(text) => {
            output::line(&format!(
                "# configuration OK: {} consumer(s), {} breaker(s)",
                settings.consumers.len(),
                settings.breakers.len()
            ));
            for risk in crate::worker::safety::risks(settings) {
                output::line(&format!("# safety check: {risk}"));
            }
            for advice in crate::worker::safety::advisories(settings) {
                output::line(&format!("# warning: {advice}"));
            }
            if settings.app.is_present() {
                output::line(
                    "# [app]: the application's own settings, read by its binary (never printed)",
                );
            }
            output::line(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            output::error(&format!("cannot print the configuration: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn run(settings: Settings, setup: app::Setup) -> ExitCode {
    // Kept until the end: dropping it flushes the last exported spans.
    let _telemetry = crate::telemetry::init_with(&settings.log, &settings.telemetry);
    let json_logs = settings.log.format == crate::config::LogFormat::Json;
    let Some(runtime) = started(worker_runtime(settings.worker.threads)) else {
        return ExitCode::FAILURE;
    };
    let received = Arc::new(std::sync::Mutex::new(None));
    let seen = received.clone();
    let result = runtime.block_on(async move {
        let worker = setup(Worker::builder(settings))
            .await
            .map_err(crate::Error::setup)?
            .build()?;
        let shutdown = CancellationToken::new();
        let signals = signals(shutdown.clone(), seen)?;
        let result = worker.run_until(shutdown).await;
        signals.abort();
        result
    });
    let signal = *received
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ crate::Error::Interrupted { .. }) => {
            let signal = signal.unwrap_or(crate::signal::Signal::Interrupt);
            output::error(&format!("{} ({})", e, signal.name()));
            ExitCode::from(signal.exit_code())
        }
        Err(e) => {
            if json_logs {
                tracing::error!(error = %e, "worker failed");
            }
            output::error(&e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// The runtime a command built, or `None` after saying why it could not be.
pub(crate) fn started(
    runtime: std::io::Result<tokio::runtime::Runtime>,
) -> Option<tokio::runtime::Runtime> {
    runtime
        .inspect_err(|e| output::error(&format!("cannot start the async runtime: {e}")))
        .ok()
}

/// The runtime `worker.threads` asks for: one thread (current-thread
/// runtime) or a pool.
///
/// # Errors
///
/// When the runtime cannot be built.
pub fn worker_runtime(threads: u16) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(threads))
            .enable_all()
            .build()
    }
}

/// First SIGINT/SIGTERM: graceful shutdown. A second one: exit at once (the
/// broker requeues every unacked message).
fn signals(
    token: CancellationToken,
    received: Arc<std::sync::Mutex<Option<crate::signal::Signal>>>,
) -> Result<tokio::task::JoinHandle<()>, crate::Error> {
    let first = CancellationToken::new();
    let graceful = crate::signal::shutdown_on_signal(first.clone())?;
    Ok(tokio::spawn(async move {
        first.cancelled().await;
        token.cancel();
        if let Ok(signal) = graceful.await {
            *received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(signal);
        }
        let second = CancellationToken::new();
        if let Ok(handle) = crate::signal::shutdown_on_signal(second.clone()) {
            let signal = handle.await.unwrap_or(crate::signal::Signal::Interrupt);
            tracing::warn!(
                signal = signal.name(),
                "second signal: exiting now; the broker requeues unacked messages"
            );
            std::process::exit(i32::from(signal.exit_code()));
        }
    }))
}

/// Parsers for command-line values, so no value can panic further in.
pub(crate) mod values {
    use std::time::Duration;

    use crate::config::MAX_DURATION;

    /// The fastest rate a tool paces at: faster is "as fast as it goes".
    const MAX_RATE: f64 = 1_000_000.0;
    /// The slowest: one message every 1,000 s.
    const MIN_RATE: f64 = 0.001;

    /// Messages per second: `50/s` or `2.5`, from 0.001 to 1,000,000.
    pub(crate) fn rate(s: &str) -> Result<f64, String> {
        let n = s.trim().trim_end_matches("/s").trim();
        match n.parse::<f64>() {
            Ok(r) if (MIN_RATE..=MAX_RATE).contains(&r) => Ok(r),
            _ => Err(format!(
                "expected messages per second from {MIN_RATE} to {MAX_RATE}, like 50/s"
            )),
        }
    }

    /// A duration like `30m`, `2h`, `1d`, at most 100 years.
    pub(crate) fn duration(s: &str) -> Result<Duration, String> {
        let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
        if d > MAX_DURATION {
            return Err("must be at most 100 years (100y)".into());
        }
        Ok(d)
    }

    /// A queue or exchange name: at most 255 bytes.
    pub(crate) fn name(s: &str) -> Result<String, String> {
        crate::amqp::check_name(s).map(|()| s.to_owned())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn values_that_would_panic_are_refused() {
            assert_eq!(rate("50/s"), Ok(50.0));
            assert_eq!(rate("2.5"), Ok(2.5));
            for bad in ["0/s", "1e-20/s", "inf", "NaN", "-1", "1e300", "fast"] {
                assert!(rate(bad).is_err(), "{bad}");
            }
            assert!(duration("2h").is_ok());
            assert!(duration("1000000y").is_err());
            assert!(name(&"q".repeat(255)).is_ok());
            assert!(name(&"q".repeat(256)).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
