//! SIGINT / SIGTERM → cancel a token.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::error::Error;

/// Cancels `token` on the first SIGINT or SIGTERM.
///
/// # Errors
///
/// [`Error::Io`] when the handlers cannot be installed.
pub(crate) fn shutdown_on_signal(token: CancellationToken) -> Result<JoinHandle<()>, Error> {
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
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            info!(signal = name, "received signal");
            token.cancel();
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = io;
        Ok(tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                info!(signal = "ctrl-c", "received signal");
                token.cancel();
            }
        }))
    }
}
