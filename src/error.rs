//! The library's error type. Every message names the cause and what to do.

use crate::config::ConfigError;

/// What can stop the worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration could not be loaded or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker rejected the user name or password.
    #[error(
        "the broker at {url} refused the login ({detail}): check the user name and password in broker.url"
    )]
    AccessRefused {
        /// The broker address, password masked.
        url: String,
        /// What the broker said.
        detail: String,
    },
    /// TLS with the broker failed for a reason retrying cannot fix: a
    /// certificate refused (theirs or ours), a file of `[broker.tls]`.
    #[error("TLS with the broker at {url} failed: {detail}")]
    Tls {
        /// The broker address, password masked.
        url: String,
        /// What was refused, and what to set.
        detail: String,
    },
    /// No OAuth 2 access token could be had (`[broker.oauth2]`).
    #[error("no OAuth 2 token for the broker: {detail}")]
    OAuth2 {
        /// What failed, naming the setting.
        detail: String,
    },
    /// The broker refused the EXTERNAL login (the client certificate's identity).
    #[error(
        "the broker at {url} refused the EXTERNAL login ({detail}): the user is the client certificate's subject (by default its CN); that user must exist and the broker must have the rabbitmq_auth_mechanism_ssl plugin enabled"
    )]
    ExternalRefused {
        /// The broker address.
        url: String,
        /// What the broker said.
        detail: String,
    },
    /// The virtual host does not exist or the user may not use it.
    #[error(
        "the broker at {url} refused the virtual host ({detail}): check the vhost at the end of broker.url (%2f is \"/\") and the user's permissions"
    )]
    VhostRefused {
        /// The broker address, password masked.
        url: String,
        /// What the broker said.
        detail: String,
    },
    /// The broker did not answer within the startup timeout (or the reconnect attempts ran out).
    #[error(
        "cannot reach the broker at {url} ({detail}); gave up after {attempts} attempts over {waited}: is RabbitMQ running, and is broker.url right? (wait longer with broker.startup_timeout)"
    )]
    Unreachable {
        /// The broker address, password masked.
        url: String,
        /// The last connection error.
        detail: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent trying, human-readable.
        waited: String,
    },
    /// A signal asked the worker to stop before it was running.
    #[error("interrupted while {while_doing}: nothing was consumed")]
    Interrupted {
        /// What it was doing, e.g. "waiting for the broker at amqp://…".
        while_doing: String,
    },
    /// A queue or exchange already exists with other arguments.
    #[error(
        "consumers[{index}]: {detail}; make the consumer's settings match the existing {kind}, delete it so it can be declared again, or, for a work queue declared by someone else, set consumers[{index}].declare = \"policy\" (keep its arguments; check-config prints the policy that adds dead-lettering) or \"passive\""
    )]
    TopologyMismatch {
        /// Which consumer.
        index: usize,
        /// `queue` or `exchange`.
        kind: &'static str,
        /// The broker's message, naming the queue and the differing argument.
        detail: String,
    },
    /// A queue or exchange that must exist does not.
    #[error(
        "consumers[{index}]: {detail}; declare it, or set consumers[{index}].declare = \"full\" (or \"policy\" to declare all but the work queue) to let rabbit-guard declare it"
    )]
    TopologyMissing {
        /// Which consumer.
        index: usize,
        /// The broker's message.
        detail: String,
    },
    /// A startup safety check found risks and `worker.safety_checks = "refuse"`.
    #[error("refusing to start (worker.safety_checks = \"refuse\"): {}", .0.join("; "))]
    Unsafe(Vec<String>),
    /// A queue named on the command line does not exist.
    #[error("queue {queue:?} does not exist: check the queue name and the vhost in broker.url")]
    QueueNotFound {
        /// The queue.
        queue: String,
    },
    /// The application's setup (`WorkerBuilder::setup`, `cli::App::setup`) failed.
    #[error("setup failed: {message}")]
    Setup {
        /// The setup's error, with its causes (URL passwords masked).
        message: String,
    },
    /// A handler could not be built from its settings.
    #[error("consumers[{index}]: {message}")]
    Handler {
        /// Which consumer.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A message was not stored by the broker (nacked, the channel failed,
    /// no confirm in time).
    #[error("publishing to {target:?}: {source}; check the queue and the broker's log")]
    Publish {
        /// The queue (or exchange) it was for.
        target: String,
        /// Why.
        #[source]
        source: crate::amqp::publish::PublishError,
    },
    /// Any other broker error.
    #[error("broker error while {context}: {source}")]
    Broker {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// An operating-system error (signals, files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A setup's error with its causes on one line, URL passwords masked.
    #[allow(clippy::needless_pass_by_value)] // made for map_err
    pub(crate) fn setup(e: crate::handler::BoxError) -> Self {
        Self::Setup {
            message: crate::secret::mask_url(&crate::text::error_chain(&*e)),
        }
    }

    #[allow(clippy::needless_pass_by_value)] // made for map_err
    pub(crate) fn oauth2(e: crate::amqp::oauth2::TokenError) -> Self {
        Self::OAuth2 { detail: e.0 }
    }

    pub(crate) fn broker(context: impl Into<String>, source: lapin::Error) -> Self {
        Self::Broker {
            context: context.into(),
            source,
        }
    }
}

/// The AMQP reply code and text of a protocol error, if it is one.
pub(crate) fn amqp_error(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            Some((amqp.get_id(), amqp.get_message().as_str().to_owned()))
        }
        _ => None,
    }
}

/// A one-line description of a broker error, without the crate's prefixes.
pub(crate) fn describe(e: &lapin::Error) -> String {
    match amqp_error(e) {
        Some((_, text)) => text,
        None => e.to_string(),
    }
}
