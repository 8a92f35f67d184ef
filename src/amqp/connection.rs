//! Connections to the broker: connecting with backoff, watching for loss,
//! reconnecting. The worker holds two: one to consume, one to publish, so
//! that a broker blocking publishers (memory or disk alarm) never stalls acks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::amqp::oauth2::Token;
use crate::amqp::server_info::ServerInfo;
use crate::config::BrokerSettings;
use crate::error::{Error, amqp_error, describe};

/// Heartbeat used when `broker.url` does not set one (`?heartbeat=N`): short
/// enough to notice a dead peer in well under a minute.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// `0..n` in a random order (Fisher-Yates over a xorshift seeded by the
/// standard library's per-process random hash keys): every worker of a
/// fleet spreads its connections over the nodes.
fn shuffled(n: usize) -> Vec<usize> {
    use std::hash::{BuildHasher, Hasher};
    let mut order: Vec<usize> = (0..n).collect();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let mut x = hasher.finish() | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = usize::try_from(x % (i as u64 + 1)).unwrap_or(0);
        order.swap(i, j);
    }
    order
}

/// How long a clean close may wait for the broker's close-ok.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The state of one managed connection.
#[derive(Debug, Clone)]
pub(crate) enum ConnectionState {
    /// Not connected (yet, or any more).
    Down,
    /// Connected; `generation` grows with each new connection.
    Up {
        generation: u64,
        connection: Arc<Connection>,
    },
}

/// One connection to the broker, kept up for the worker's lifetime.
/// (`Debug` by hand: the parsed URI would print the password.)
pub(crate) struct ManagedConnection {
    /// Every node it may connect to (`broker.urls`, or `broker.url`), with
    /// its URL masked for people.
    nodes: Vec<(AMQPUri, String)>,
    /// The addresses, masked, for messages about all of them.
    shown_url: String,
    /// The node the current (or last) connection is on, masked.
    node: std::sync::Mutex<Option<String>>,
    /// What the broker said it is (product, version, cluster), once read.
    server: std::sync::Mutex<Option<String>>,
    name: String,
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    role: &'static str,
    settings: BrokerSettings,
    link: watch::Sender<ConnectionState>,
    suspect: Notify,
    blocked: AtomicBool,
    reconnects: AtomicU64,
    /// `[broker.oauth2]`: the newest access token, the password of every
    /// connect, sent to the open connection when a new one comes.
    tokens: Option<watch::Receiver<Option<Arc<Token>>>>,
}

impl std::fmt::Debug for ManagedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedConnection")
            .field("url", &self.shown_url)
            .field("node", &self.node())
            .field("name", &self.name)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// The runtime a connection's I/O runs on: a current-thread tokio runtime of
/// its own, driven by lapin's `lapin-io-loop` thread for that connection
/// (see `vendor/README.md`). The socket's readiness, lapin's internal tasks
/// (acks, channel commands, heartbeats) and its frames are all handled on
/// that one thread, never on a handler's thread and without a hop through
/// the control runtime for every ack.
fn io_runtime() -> std::io::Result<async_rs::TokioRuntime> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("rg-amqp-blocking")
        .build()?;
    Ok(async_rs::Runtime::tokio_with_runtime(runtime))
}

/// The next new token, or never when there are none.
async fn next_token(tokens: &mut Option<watch::Receiver<Option<Arc<Token>>>>) -> Arc<Token> {
    if let Some(rx) = tokens {
        while rx.changed().await.is_ok() {
            if let Some(token) = rx.borrow_and_update().clone() {
                return token;
            }
        }
    }
    std::future::pending().await
}

fn is_fatal_at_startup(e: &lapin::Error) -> bool {
    // 403 ACCESS_REFUSED, 530 NOT_ALLOWED (vhost), a certificate refused
    // either way or TLS files that cannot be used: retrying won't help.
    matches!(amqp_error(e), Some((403 | 530, _))) || tls_failure(e).is_some_and(|t| t.settled)
}

/// Why a TLS connection failed, carried through lapin as an I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct TlsFailure {
    pub(crate) message: String,
    /// Retrying would meet the same refusal (a certificate, a file), as
    /// opposed to a handshake cut short.
    pub(crate) settled: bool,
}

impl TlsFailure {
    fn into_lapin(self, kind: std::io::ErrorKind) -> lapin::Error {
        lapin::Error::from(std::io::Error::new(kind, self))
    }
}

/// The [`TlsFailure`] inside a lapin error, if it is one.
pub(crate) fn tls_failure(e: &lapin::Error) -> Option<&TlsFailure> {
    match e.kind() {
        lapin::ErrorKind::IOError(io) => io.get_ref()?.downcast_ref::<TlsFailure>(),
        _ => None,
    }
}

impl ManagedConnection {
    /// `role` is appended to the connection name: `rabbit-guard/consume`.
    pub(crate) fn new(settings: &BrokerSettings, role: &'static str) -> Result<Self, Error> {
        let mut nodes = Vec::new();
        for (key, url) in settings.addresses() {
            let mut uri: AMQPUri = crate::amqp::parse_uri(url).map_err(|e| {
                Error::Config(crate::config::ConfigError::Invalid(vec![
                    crate::config::Problem {
                        key: key.clone(),
                        value: Some(format!("{:?}", url.masked())),
                        message: format!("not an AMQP URI: {e}"),
                    },
                ]))
            })?;
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
            }
            if settings.auth_mechanism == crate::config::AuthMechanism::External {
                uri.query.auth_mechanism = Some(lapin::uri::SASLMechanism::External);
            }
            nodes.push((uri, url.masked()));
        }
        let shown_url = match nodes.as_slice() {
            [(_, one)] => one.clone(),
            all => format!(
                "any of {}",
                all.iter()
                    .map(|(_, shown)| shown.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let (link, _) = watch::channel(ConnectionState::Down);
        Ok(Self {
            nodes,
            shown_url,
            node: std::sync::Mutex::new(None),
            server: std::sync::Mutex::new(None),
            name: format!("{}/{role}", settings.connection_name),
            role,
            settings: settings.clone(),
            link,
            suspect: Notify::new(),
            blocked: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            tokens: None,
        })
    }

    /// Logs in with the tokens of `[broker.oauth2]`: the newest is the
    /// password of every connect, and each new one is sent to the open
    /// connection (`update-secret`).
    #[must_use]
    pub(crate) fn with_tokens(mut self, tokens: watch::Receiver<Option<Arc<Token>>>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// The node the connection is on (or was on last), its URL masked.
    pub(crate) fn node(&self) -> Option<String> {
        self.node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The connection name the broker shows.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // read by the admin endpoint
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `consume` or `publish`.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // read by the admin endpoint
    pub(crate) fn role(&self) -> &'static str {
        self.role
    }

    /// True while connected.
    pub(crate) fn is_up(&self) -> bool {
        matches!(*self.link.borrow(), ConnectionState::Up { .. })
    }

    /// The connection now, if it is up (without waiting).
    pub(crate) fn current(&self) -> Option<Arc<Connection>> {
        match &*self.link.borrow() {
            ConnectionState::Up { connection, .. } => Some(connection.clone()),
            ConnectionState::Down => None,
        }
    }

    /// True while the broker blocks this connection (resource alarm).
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // read by the admin endpoint
    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Successful reconnections so far.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // read by the admin endpoint
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// One attempt: each node in a new shuffled order, each for at most
    /// `broker.connect_timeout`, until one answers. A refused login or
    /// vhost ends the attempt (the cluster's users are the same on every
    /// node).
    async fn connect_once(&self) -> Result<Connection, lapin::Error> {
        let mut last = None;
        for i in shuffled(self.nodes.len()) {
            let (uri, shown) = &self.nodes[i];
            match self.connect_to(uri).await {
                Ok((connection, server)) => {
                    *self
                        .server
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = server;
                    *self
                        .node
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(shown.clone());
                    return Ok(connection);
                }
                Err(e) if is_fatal_at_startup(&e) => return Err(e),
                Err(e) => {
                    if self.nodes.len() > 1 {
                        debug!(connection = %self.name, node = %shown, error = %describe(&e), "node did not answer; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            lapin::Error::from(std::io::Error::other("no broker address configured"))
        }))
    }

    /// Connects to one node; also says what the broker is ("RabbitMQ 4.0.5
    /// on Erlang/OTP 27, cluster rabbit@node1"), from the properties it sent
    /// in `connection.start`.
    async fn connect_to(
        &self,
        uri: &AMQPUri,
    ) -> Result<(Connection, Option<String>), lapin::Error> {
        let timeout = self.settings.connect_timeout;
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let runtime = io_runtime().map_err(lapin::Error::from)?;
        let mut with_token;
        let uri = match self.tokens.as_ref().and_then(|t| t.borrow().clone()) {
            Some(token) => {
                with_token = uri.clone();
                token
                    .value
                    .expose()
                    .clone_into(&mut with_token.authority.userinfo.password);
                &with_token
            }
            None => uri,
        };
        let connect = async {
            if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
                self.connect_tls(uri, props, runtime).await
            } else {
                Connection::connect_uri_with_runtime(uri.clone(), props, runtime).await
            }
        };
        // A peer that accepts TCP but never answers would hang the handshake forever.
        let connection = tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| {
                Err(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within broker.connect_timeout ({})",
                        humantime::format_duration(timeout)
                    ),
                )))
            })?;
        let server = ServerInfo::from_properties(connection.configuration().server_properties());
        Ok((connection, Some(server.to_string())))
    }

    /// Connects over TLS as `[broker.tls]` says, its files read now (a
    /// rotated certificate is used from the next connect on).
    async fn connect_tls(
        &self,
        uri: &AMQPUri,
        props: ConnectionProperties,
        runtime: async_rs::TokioRuntime,
    ) -> Result<Connection, lapin::Error> {
        let tls = crate::amqp::tls::Tls::load(&self.settings.tls).map_err(|e| {
            TlsFailure {
                message: e.to_string(),
                settled: true,
            }
            .into_lapin(std::io::ErrorKind::InvalidInput)
        })?;
        let name = self
            .settings
            .tls
            .server_name
            .clone()
            .unwrap_or_else(|| uri.authority.host.clone());
        let connector = lapin::tcp::RustlsConnector::from(tls.config.clone());
        let (explain, shown_name) = (tls.clone(), name.clone());
        let connect = async move |uri: AMQPUri, runtime: async_rs::TokioRuntime| {
            let addrs = runtime.to_socket_addrs((uri.authority.host.clone(), uri.authority.port));
            let stream = lapin::tcp::AsyncTcpStream::connect(&runtime, addrs).await?;
            stream.into_rustls(&connector, &name).await.map_err(|e| {
                let message = tls.explain(&e, &name);
                // A refused certificate or a failed check says so in an
                // alert or a verification error; a cut is only an I/O
                // error and may pass.
                let settled = e
                    .get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
                TlsFailure { message, settled }.into_lapin(e.kind())
            })
        };
        Connection::connector(uri.clone(), runtime, connect, props)
            .await
            .map_err(|e| match e.kind() {
                // With TLS 1.3 the broker judges our certificate after our
                // side of the handshake is done: its alert comes with the
                // first frames, through lapin's I/O loop.
                lapin::ErrorKind::IOError(io)
                    if tls_failure(&e).is_none() && crate::amqp::tls::is_tls_error(io) =>
                {
                    TlsFailure {
                        message: explain.explain(io, &shown_name),
                        settled: true,
                    }
                    .into_lapin(io.kind())
                }
                _ => e,
            })
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        crate::backoff::exponential(
            self.settings.reconnect.initial_delay,
            self.settings.reconnect.max_delay,
        )
    }

    fn next_delay(&self, backoff: &mut backon::ExponentialBackoff) -> Duration {
        backoff
            .next()
            .unwrap_or(self.settings.reconnect.max_delay)
            .min(self.settings.reconnect.max_delay)
    }

    /// What the broker said it is ("RabbitMQ 4.0.5 on Erlang/OTP 27,
    /// cluster rabbit@node1"), once read after the latest connect.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // read by the admin endpoint
    pub(crate) fn server(&self) -> Option<String> {
        self.server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn up(&self, connection: Connection) {
        let generation = match &*self.link.borrow() {
            ConnectionState::Up { generation, .. } => generation + 1,
            ConnectionState::Down => 1,
        };
        self.blocked.store(false, Ordering::Release);
        self.link.send_replace(ConnectionState::Up {
            generation,
            connection: Arc::new(connection),
        });
    }

    /// Connects at startup, retrying with backoff until `broker.startup_timeout`.
    ///
    /// # Errors
    ///
    /// At once for refused credentials or vhost; [`Error::Unreachable`] when
    /// the timeout passes.
    pub(crate) async fn start(&self, shutdown: &CancellationToken) -> Result<(), Error> {
        let started = Instant::now();
        let deadline = crate::amqp::deadline(started, self.settings.startup_timeout);
        let mut backoff = self.backoff();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let connected = tokio::select! {
                () = shutdown.cancelled() => return Err(self.interrupted()),
                connected = self.connect_once() => connected,
            };
            match connected {
                Ok(connection) => {
                    info!(url = %self.node().unwrap_or_default(), broker = %self.server().unwrap_or_default(), connection = %self.name, attempt, "connected to the broker");
                    self.up(connection);
                    return Ok(());
                }
                Err(e) if is_fatal_at_startup(&e) => return Err(self.fatal(&e)),
                Err(e) => {
                    let delay = self.next_delay(&mut backoff);
                    let now = Instant::now();
                    if now + delay > deadline {
                        return Err(Error::Unreachable {
                            url: self.shown_url.clone(),
                            detail: describe(&e),
                            attempts: attempt,
                            waited: humantime::format_duration(round_ms(now - started)).to_string(),
                        });
                    }
                    warn!(
                        url = %self.shown_url,
                        connection = %self.name,
                        attempt,
                        retry_in = %humantime::format_duration(round_ms(delay)),
                        error = %describe(&e),
                        "waiting for the broker"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(self.interrupted()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn interrupted(&self) -> Error {
        Error::Interrupted {
            while_doing: format!("waiting for the broker at {}", self.shown_url),
        }
    }

    fn fatal(&self, e: &lapin::Error) -> Error {
        if let Some(tls) = tls_failure(e) {
            return Error::Tls {
                url: self.shown_url.clone(),
                detail: tls.message.clone(),
            };
        }
        if self.settings.auth_mechanism == crate::config::AuthMechanism::External
            && let Some((403, detail)) = amqp_error(e)
        {
            return Error::ExternalRefused {
                url: self.shown_url.clone(),
                detail,
            };
        }
        match amqp_error(e) {
            Some((530, detail)) => Error::VhostRefused {
                url: self.shown_url.clone(),
                detail,
            },
            _ => Error::AccessRefused {
                url: self.shown_url.clone(),
                detail: describe(e),
            },
        }
    }

    /// The current connection, waiting for one if it is down. `None` on shutdown.
    pub(crate) async fn connection(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<(u64, Arc<Connection>)> {
        let mut rx = self.link.subscribe();
        loop {
            if let ConnectionState::Up {
                generation,
                connection,
            } = &*rx.borrow_and_update()
            {
                return Some((*generation, connection.clone()));
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                changed = rx.changed() => if changed.is_err() { return None },
            }
        }
    }

    /// A user of the connection saw an error: have the supervisor check it
    /// (it reconnects only when the connection itself is gone).
    pub(crate) fn report_trouble(&self) {
        self.suspect.notify_one();
    }

    /// Keeps the connection up until `shutdown`: notices loss (error events,
    /// reported trouble) and reconnects with backoff and jitter, logging every
    /// attempt. Returns an error only when `broker.reconnect.max_attempts` runs out.
    pub(crate) async fn supervise(&self, shutdown: CancellationToken) -> Result<(), Error> {
        loop {
            let Some((generation, connection)) = self.connection(&shutdown).await else {
                return Ok(());
            };
            let mut events = connection.events_listener();
            let mut tokens = self.tokens.clone();
            if let Some(t) = tokens.as_mut() {
                // It connected with the newest: only later ones are news.
                t.mark_unchanged();
            }
            let reason = loop {
                if !connection.status().connected() {
                    break "connection is no longer open".to_owned();
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = self.suspect.notified() => {}
                    token = next_token(&mut tokens) => {
                        if let Err(e) = connection
                            .update_secret(token.value.expose().into(), "OAuth 2 token renewed".into())
                            .await
                        {
                            break format!(
                                "the broker refused the renewed OAuth 2 token ({}); reconnecting with it",
                                describe(&e)
                            );
                        }
                        debug!(connection = %self.name, "sent the new OAuth 2 token (update-secret)");
                    }
                    event = events.next() => match event {
                        None => break "connection event stream ended".to_owned(),
                        // lapin reports a channel the broker closed (a 404
                        // on a passive declare, a 405 on a lease) here too:
                        // that channel's owner handles it, the connection
                        // is fine.
                        Some(Event::Error(e)) if is_channel_error(&e) && connection.status().connected() => {
                            debug!(connection = %self.name, error = %describe(&e), "the broker closed a channel; the connection stays");
                        }
                        Some(Event::Error(e)) => break describe(&e),
                        Some(Event::ConnectionBlocked(why)) => {
                            self.blocked.store(true, Ordering::Release);
                            warn!(connection = %self.name, reason = %why, "broker blocked the connection (resource alarm); publishing waits until it is unblocked");
                        }
                        Some(Event::ConnectionUnblocked) => {
                            self.blocked.store(false, Ordering::Release);
                            info!(connection = %self.name, "broker unblocked the connection");
                        }
                        Some(other) => debug!(connection = %self.name, event = ?other, "connection event"),
                    },
                }
            };
            warn!(connection = %self.name, generation, %reason, "lost the connection to the broker; reconnecting");
            self.link.send_replace(ConnectionState::Down);
            drop(connection);
            self.reconnect(&shutdown).await?;
        }
    }

    async fn reconnect(&self, shutdown: &CancellationToken) -> Result<(), Error> {
        let started = Instant::now();
        let mut backoff = self.backoff();
        let mut attempt = 0u32;
        loop {
            let delay = self.next_delay(&mut backoff);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
            match self.connect_once().await {
                Ok(connection) => {
                    info!(
                        url = %self.node().unwrap_or_default(),
                        broker = %self.server().unwrap_or_default(),
                        connection = %self.name,
                        attempt,
                        down_for = %humantime::format_duration(round_ms(started.elapsed())),
                        "reconnected to the broker"
                    );
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.up(connection);
                    return Ok(());
                }
                Err(e) => {
                    if self
                        .settings
                        .reconnect
                        .max_attempts
                        .is_some_and(|max| attempt >= max)
                    {
                        error!(url = %self.shown_url, connection = %self.name, attempt, error = %describe(&e), "giving up reconnecting (broker.reconnect.max_attempts)");
                        return Err(Error::Unreachable {
                            url: self.shown_url.clone(),
                            detail: describe(&e),
                            attempts: attempt,
                            waited: humantime::format_duration(round_ms(started.elapsed()))
                                .to_string(),
                        });
                    }
                    warn!(
                        url = %self.shown_url,
                        connection = %self.name,
                        attempt,
                        error = %describe(&e),
                        "reconnect attempt failed"
                    );
                }
            }
        }
    }

    /// Closes the connection cleanly (after the channels were closed).
    pub(crate) async fn close(&self) {
        let link = self.link.send_replace(ConnectionState::Down);
        if let ConnectionState::Up { connection, .. } = link
            && connection.status().connected()
        {
            let close = connection.close(200, "worker shutting down".into());
            match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(connection = %self.name, error = %e, "closing the connection"),
                Err(_) => {
                    warn!(connection = %self.name, "the broker did not confirm the close in time");
                }
            }
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One connection attempt for a command-line tool: no retries, one clear
/// error naming the cause.
///
/// # Errors
///
/// [`Error::AccessRefused`], [`Error::VhostRefused`] or [`Error::Unreachable`].
#[cfg(feature = "cli")]
pub(crate) async fn connect_once(
    settings: &BrokerSettings,
    role: &'static str,
) -> Result<Connection, Error> {
    let mut managed = ManagedConnection::new(settings, role)?;
    if let Some(oauth2) = &settings.oauth2 {
        let source = crate::amqp::oauth2::TokenSource::new(oauth2).map_err(Error::oauth2)?;
        source.fetch().await.map_err(Error::oauth2)?;
        managed = managed.with_tokens(source.subscribe());
    }
    let started = Instant::now();
    match managed.connect_once().await {
        Ok(c) => Ok(c),
        Err(e) if is_fatal_at_startup(&e) => Err(managed.fatal(&e)),
        Err(e) => Err(Error::Unreachable {
            url: managed.shown_url.clone(),
            detail: describe(&e),
            attempts: 1,
            waited: humantime::format_duration(round_ms(started.elapsed())).to_string(),
        }),
    }
}

/// True for a channel-level (soft) AMQP error: the broker closed one
/// channel, not the connection.
pub(crate) fn is_channel_error(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_node_is_tried_once_in_varying_orders() {
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let order = super::shuffled(3);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2], "each node once: {order:?}");
            firsts.insert(order[0]);
        }
        assert_eq!(
            firsts.len(),
            3,
            "each node comes first sometimes: {firsts:?}"
        );
        assert_eq!(super::shuffled(1), [0]);
        assert!(super::shuffled(0).is_empty());
    }
}
