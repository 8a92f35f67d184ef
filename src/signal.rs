//! SIGINT / SIGTERM → cancel a token.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::error::Error;

/// A signal that asks the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    /// Its name, `SIGINT` or `SIGTERM`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        }
    }

    /// The exit status of a process it ended: 128 + its number.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
        }
    }
}

/// Cancels `token` on the first SIGINT or SIGTERM; the task ends with the
/// signal that came.
///
/// # Errors
///
/// [`Error::Io`] when the handlers cannot be installed.
pub(crate) fn shutdown_on_signal(token: CancellationToken) -> Result<JoinHandle<Signal>, Error> {
    let io = |source| Error::Io {
        context: "installing signal handlers".into(),
        source,
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(io)?;
        let mut int = signal(SignalKind::interrupt()).map_err(io)?;
        Ok(tokio::spawn(async move {
            let signal = tokio::select! {
                _ = term.recv() => Signal::Terminate,
                _ = int.recv() => Signal::Interrupt,
            };
            info!(signal = signal.name(), "received signal");
            token.cancel();
            signal
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = io;
        Ok(tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            info!(signal = "ctrl-c", "received signal");
            token.cancel();
            Signal::Interrupt
        }))
    }
}
