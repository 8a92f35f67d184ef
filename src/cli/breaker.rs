//! `rabbit-guard breaker open|close|reset|disable NAME`: manual control of
//! a running worker's breaker, through its admin endpoint (so it needs no
//! curl), with the token from the config.

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::{admin_client, output};
use crate::config::Settings;

/// `rabbit-guard breaker`
#[derive(Debug, Args)]
pub(crate) struct BreakerArgs {
    /// What to do: open (force open: consumption stays paused until
    /// released), close, reset (close and clear the window and backoff),
    /// disable (admit everything, never trip).
    pub(crate) action: Action,
    /// The breaker, as in `[breakers.NAME]`.
    pub(crate) name: String,
    /// The admin endpoint, e.g. http://127.0.0.1:9090 (default: from admin.listen).
    #[arg(long)]
    pub(crate) admin: Option<String>,
    /// Read the token from this file instead of admin.token / admin.token_file.
    #[arg(long)]
    pub(crate) token_file: Option<std::path::PathBuf>,
}

/// A manual action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Action {
    /// Force open until closed or reset.
    Open,
    /// Close.
    Close,
    /// Close and forget the window and the open-time backoff.
    Reset,
    /// Admit every call and never trip.
    Disable,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Open => "open",
            Action::Close => "close",
            Action::Reset => "reset",
            Action::Disable => "disable",
        }
    }
}

/// Runs `breaker`.
pub(crate) fn run(settings: &Settings, args: &BreakerArgs) -> ExitCode {
    let Some(base) = admin_client::base_url(settings, args.admin.as_deref()) else {
        output::error("no admin endpoint: set admin.listen in the config, or pass --admin URL");
        return ExitCode::from(2);
    };
    let mut admin = settings.admin.clone();
    if let Some(file) = &args.token_file {
        admin.token = None;
        admin.token_file = Some(file.clone());
    }
    let token = match crate::admin::resolve_token(&admin) {
        Ok(token) => token,
        Err(e) => {
            output::error(&e);
            return ExitCode::FAILURE;
        }
    };
    if token.is_none() {
        output::error(
            "no admin token: the worker refuses manual control without one; set admin.token or admin.token_file (or pass --token-file)",
        );
        return ExitCode::from(2);
    }
    let Some(runtime) = super::started(super::worker_runtime(1)) else {
        return ExitCode::FAILURE;
    };
    let path = format!(
        "/breakers/{}/{}",
        url::form_urlencoded::byte_serialize(args.name.as_bytes()).collect::<String>(),
        args.action.path()
    );
    match runtime.block_on(admin_client::post_json(&base, &path, token.as_ref())) {
        Ok(answer) => {
            output::line(&format!(
                "breaker {} is now {}",
                crate::text::printable(&args.name),
                answer["state"].as_str().unwrap_or("?")
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            output::error(&e);
            ExitCode::FAILURE
        }
    }
}
