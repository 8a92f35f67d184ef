//! [`App`]: the command line for an application's own binary, with its
//! name and version, its `[app]` settings and an async setup.

use std::future::Future;
use std::marker::PhantomData;
use std::process::ExitCode;

use futures_util::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

use crate::WorkerBuilder;
use crate::config::{ConfigError, Settings};
use crate::handler::BoxError;

/// What `--version` and `--help` say.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity {
    pub(crate) name: &'static str,
    pub(crate) version: &'static str,
    pub(crate) about: Option<&'static str>,
}

/// The application's setup, run once on the worker's runtime before it
/// starts: it gets the builder (with the loaded settings) and returns it
/// with the handlers registered.
pub(crate) type Setup =
    Box<dyn FnOnce(WorkerBuilder) -> LocalBoxFuture<'static, Result<WorkerBuilder, BoxError>>>;

/// Reads the `[app]` table the way the setup will, so `check-config`
/// reports what would stop `run`.
pub(crate) type CheckApp = fn(&Settings) -> Result<(), ConfigError>;

/// The full `rabbit-guard` command line (`run`, `check-config`, `dlq`,
/// `status`, …) for an application's own binary: its name and version in
/// `--version` and `--help`, its typed `[app]` settings checked by
/// `check-config`, and an async setup that receives them, run only by `run`.
///
/// ```no_run
/// use rabbit_guard::cli::App;
/// use rabbit_guard::handler::{Context, HandlerError, with_state};
///
/// #[derive(serde::Deserialize)]
/// struct Payments { billing_url: String }
///
/// async fn charge(client: reqwest::Client, body: Vec<u8>, _ctx: Context) -> Result<(), HandlerError> {
///     # let _ = (client, body);
///     Ok(())
/// }
///
/// fn main() -> std::process::ExitCode {
///     App::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
///         .about("Charges orders from the orders queue")
///         .handlers(["charge"])
///         .setup(|worker, payments: Payments| async move {
///             let client = reqwest::Client::builder().build()?;
///             # let _ = payments.billing_url;
///             Ok(worker.handler("charge", with_state(client, charge)))
///         })
///         .main()
/// }
/// ```
pub struct App<A = ()> {
    identity: Identity,
    tools: super::Tools,
    handlers: Vec<String>,
    setup: Option<Setup>,
    check_app: CheckApp,
    _app: PhantomData<fn() -> A>,
}

impl<A> std::fmt::Debug for App<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.identity.name)
            .field("version", &self.identity.version)
            .field("handlers", &self.handlers)
            .finish_non_exhaustive()
    }
}

impl App<()> {
    /// An application named `name` at `version` (pass
    /// `env!("CARGO_PKG_NAME")` and `env!("CARGO_PKG_VERSION")`).
    #[must_use]
    pub fn new(name: &'static str, version: &'static str) -> Self {
        Self {
            identity: Identity {
                name,
                version,
                about: None,
            },
            tools: super::Tools::Hidden,
            handlers: Vec::new(),
            setup: None,
            check_app: |_| Ok(()),
            _app: PhantomData,
        }
    }
}

impl<A> App<A> {
    /// The one-line description `--help` shows.
    #[must_use]
    pub fn about(mut self, about: &'static str) -> Self {
        self.identity.about = Some(about);
        self
    }

    /// Also offers rabbit-guard's `demo`, `flaky-server` and `publish`
    /// commands (with the `demo` feature), which an application's binary
    /// leaves out by default.
    #[must_use]
    pub fn with_demo_tools(mut self) -> Self {
        self.tools = super::Tools::Shown;
        self
    }

    /// The handler names the setup registers, so `check-config` can
    /// validate `handler = "…"` without running the setup.
    #[must_use]
    pub fn handlers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.handlers.extend(names.into_iter().map(Into::into));
        self
    }

    /// The async setup `run` calls once, on the worker's runtime, with the
    /// builder (holding the loaded settings) and the `[app]` table read as
    /// `B`; it returns the builder with its handlers registered. An error
    /// stops the binary with `setup failed: …` and exit code 1.
    #[must_use]
    pub fn setup<B, F, Fut>(self, setup: F) -> App<B>
    where
        B: DeserializeOwned + 'static,
        F: FnOnce(WorkerBuilder, B) -> Fut + 'static,
        Fut: Future<Output = Result<WorkerBuilder, BoxError>> + 'static,
    {
        App {
            identity: self.identity,
            tools: self.tools,
            handlers: self.handlers,
            setup: Some(Box::new(move |worker: WorkerBuilder| {
                Box::pin(async move {
                    let app: B = worker.settings().app.read()?;
                    setup(worker, app).await
                })
            })),
            check_app: |settings| settings.app.read::<B>().map(drop),
            _app: PhantomData,
        }
    }

    /// Parses the command line and runs the command; the exit code to
    /// return from `main`.
    #[must_use]
    pub fn main(self) -> ExitCode {
        let setup = self
            .setup
            .unwrap_or_else(|| Box::new(|worker| Box::pin(async move { Ok(worker) })));
        super::dispatch(
            Some(self.identity),
            self.tools,
            &self.handlers,
            self.check_app,
            setup,
        )
    }
}
