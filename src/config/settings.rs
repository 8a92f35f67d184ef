//! The settings structs: one per table of the config file.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;
pub use crate::builtin_handlers::HttpSettings;
use crate::secret::{MASK, Secret, SecretUrl};

/// Everything the worker reads from its config files and environment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// `[broker]`: where RabbitMQ is and how to reach it.
    pub broker: BrokerSettings,
    /// `[worker]`: process-wide behaviour.
    pub worker: WorkerSettings,
    /// `[log]`: log format and level.
    pub log: LogSettings,
    /// `[admin]`: the metrics, health and breaker-control endpoint.
    pub admin: AdminSettings,
    /// `[telemetry]`: OpenTelemetry export of the spans (feature `otel`).
    pub telemetry: TelemetrySettings,
    /// `[fleet]`: workers on the same queues sharing their breakers' state.
    pub fleet: FleetSettings,
    /// `[breakers.NAME]`: one breaker per guarded dependency.
    pub breakers: BTreeMap<String, BreakerConfig>,
    /// `[[consumers]]`: one per queue.
    pub consumers: Vec<ConsumerSettings>,
    /// `[app]`: the application's own settings, in the same files and
    /// `RABBIT_GUARD__APP__…` variables; the worker does not read them.
    /// Read them typed with [`load_with`](super::load_with) or
    /// [`AppSection::read`]. Never printed.
    #[serde(skip_serializing)]
    pub app: AppSection,
}

/// The raw `[app]` table of a config, read into the application's own type
/// with [`read`](Self::read). Its `Debug` shows the keys, never the values
/// (they may be secrets).
#[derive(Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct AppSection {
    raw: Option<config::Value>,
}

impl std::fmt::Debug for AppSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<String> = match self.raw.clone().map(config::Value::into_table) {
            Some(Ok(table)) => table.into_keys().collect(),
            _ => Vec::new(),
        };
        f.debug_struct("AppSection")
            .field("present", &self.raw.is_some())
            .field("keys", &keys)
            .finish()
    }
}

impl AppSection {
    /// True when the config has an `[app]` table.
    #[must_use]
    pub fn is_present(&self) -> bool {
        self.raw.is_some()
    }

    /// The table as `A`. A missing table reads as an empty one, so an `A`
    /// whose fields all have defaults needs none. Text from environment
    /// variables becomes a number or boolean where `A` takes one.
    ///
    /// # Errors
    ///
    /// [`ConfigError::App`](super::ConfigError::App) naming the key when
    /// the table does not fit `A`.
    pub fn read<A: serde::de::DeserializeOwned>(&self) -> Result<A, super::ConfigError> {
        let raw = self.raw.clone().unwrap_or_else(|| {
            config::Value::new(None, config::ValueKind::Table(config::Map::new()))
        });
        let mut track = serde_path_to_error::Track::new();
        A::deserialize(serde_path_to_error::Deserializer::new(raw, &mut track)).map_err(|e| {
            let path = track.path().to_string();
            super::ConfigError::App {
                key: if path == "." || path.is_empty() {
                    "app".to_owned()
                } else {
                    format!("app.{path}")
                },
                message: {
                    // The key is named in front; drop config-rs' own mention.
                    let text = super::load::without_any_values(&e.to_string());
                    text.rsplit_once(" for key `")
                        .map_or(text.clone(), |(m, _)| m.to_owned())
                },
            }
        })
    }
}

impl<'de> Deserialize<'de> for AppSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self {
            raw: Some(config::Value::deserialize(d)?),
        })
    }
}

impl Settings {
    /// A copy fit to print: the broker password, the admin token, the
    /// `http` handlers' URL credentials and header values masked.
    #[must_use]
    pub fn redacted(&self) -> Self {
        let mut shown = self.clone();
        shown.broker.url = SecretUrl::new(self.broker.url.masked());
        for u in &mut shown.broker.urls {
            *u = SecretUrl::new(u.masked());
        }
        if let Some(u) = &self.telemetry.otlp_endpoint {
            shown.telemetry.otlp_endpoint = Some(SecretUrl::new(u.masked()));
        }
        if shown.admin.token.is_some() {
            shown.admin.token = Some(Secret::new(MASK));
        }
        if let Some(u) = shown
            .broker
            .oauth2
            .as_mut()
            .and_then(|o| o.token_url.as_mut())
        {
            *u = SecretUrl::new(u.masked());
        }
        for b in shown.breakers.values_mut() {
            if let Some(u) = b.health_check.as_mut().and_then(|h| h.url.as_mut()) {
                *u = SecretUrl::new(u.masked());
            }
        }
        for c in &mut shown.consumers {
            if let Some(h) = &mut c.http {
                h.url = SecretUrl::new(h.url.masked());
                for v in h.headers.values_mut() {
                    *v = Secret::new(MASK);
                }
            }
        }
        shown
    }
}

/// `[broker]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BrokerSettings {
    /// AMQP URI, e.g. `amqp://user:password@host:5672/%2f` (`amqps://` for
    /// TLS). Printed with the password masked.
    pub url: SecretUrl,
    /// The AMQP URIs of a cluster's nodes, instead of `url` (not with it):
    /// each connection is made to the first of them, in a shuffled order,
    /// that answers, and to another when its node goes away.
    pub urls: Vec<SecretUrl>,
    /// Connection name shown in the management UI and `rabbitmqctl list_connections`;
    /// `/consume` and `/publish` are appended for the worker's two connections.
    pub connection_name: String,
    /// How long to keep trying to reach the broker at startup before giving
    /// up (`"100y"`: practically forever).
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// How long one connection attempt (TCP, TLS and AMQP handshake) may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The broker's `consumer_timeout` (rabbitmq.conf; 30 minutes unless
    /// changed there). The broker closes a channel whose delivery stays
    /// unacked longer; used to check `call_timeout` at startup.
    #[serde(with = "humantime_serde")]
    pub consumer_timeout: Duration,
    /// `[broker.reconnect]`: backoff between connection attempts.
    pub reconnect: ReconnectSettings,
    /// `[broker.tls]`: the CAs, client certificate and name `amqps://`
    /// connections use.
    pub tls: TlsSettings,
    /// How the worker logs in: `"plain"` (the URL's user and password) or
    /// `"external"` (the broker takes the user from the client
    /// certificate, `broker.tls.cert_file`; needs `amqps://`).
    pub auth_mechanism: AuthMechanism,
    /// `[broker.oauth2]`: log in with an OAuth 2 access token (as the
    /// password) and renew it on the open connections before it expires.
    pub oauth2: Option<OAuth2Settings>,
}

/// `[broker.oauth2]`: where the access token comes from. Either a file an
/// operator's sidecar keeps fresh (`token_file`), or a client-credentials
/// grant (`token_url`, `client_id`, `client_secret_file`). The token is the
/// password of every connection; before it expires (its JWT `exp`, or the
/// grant's `expires_in`) the worker sends the new one on the open
/// connections (AMQP `update-secret`: no reconnect, no pause), and
/// reconnects with it if the broker refuses. Tokens and secrets are never
/// printed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OAuth2Settings {
    /// A file holding the token (its first line), read at startup and
    /// whenever it changes.
    pub token_file: Option<std::path::PathBuf>,
    /// The token endpoint of a client-credentials grant.
    pub token_url: Option<SecretUrl>,
    /// The client id of the grant.
    pub client_id: Option<String>,
    /// A file holding the client secret (its first line).
    pub client_secret_file: Option<std::path::PathBuf>,
    /// The grant's `scope`, when the provider needs one.
    pub scope: Option<String>,
    /// Renew this long before the token expires.
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
}

impl Default for OAuth2Settings {
    fn default() -> Self {
        Self {
            token_file: None,
            token_url: None,
            client_id: None,
            client_secret_file: None,
            scope: None,
            renew_before: Duration::from_secs(60),
        }
    }
}

/// `broker.auth_mechanism`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AuthMechanism {
    /// The user name and password of the URL (SASL PLAIN).
    #[default]
    Plain,
    /// The client certificate's identity (SASL EXTERNAL).
    External,
}

/// `[broker.tls]`: used by every `amqps://` connection (consume, publish,
/// fleet, and the `dlq` commands). Files are read at every connect, so a
/// rotated certificate is used from the next reconnect on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsSettings {
    /// CA certificates (PEM) to trust for the broker's certificate,
    /// besides the system's (or instead, with `system_roots = false`).
    pub ca_file: Option<std::path::PathBuf>,
    /// Trust the system's CA certificates too.
    pub system_roots: bool,
    /// The client certificate (PEM, with its chain) for mutual TLS.
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key (PEM: PKCS#8, RSA or EC). Never printed.
    pub key_file: Option<std::path::PathBuf>,
    /// The name the broker's certificate must carry, when it is not the
    /// URL's host (connecting by IP address, say).
    pub server_name: Option<String>,
    /// The lowest TLS version: `"1.2"` (default) or `"1.3"`.
    pub min_version: TlsVersion,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            ca_file: None,
            system_roots: true,
            cert_file: None,
            key_file: None,
            server_name: None,
            min_version: TlsVersion::Tls12,
        }
    }
}

impl TlsSettings {
    /// True when any key is set (the defaults leave TLS to the URL).
    #[must_use]
    pub fn is_configured(&self) -> bool {
        *self != Self::default()
    }
}

/// `broker.tls.min_version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// `broker.url` when none is configured.
pub(crate) const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Most addresses in `broker.urls`.
pub(crate) const MAX_BROKER_URLS: usize = 16;

impl BrokerSettings {
    /// The nodes to connect to, with the key each comes from: `urls` when
    /// set, else `url`.
    #[must_use]
    pub fn addresses(&self) -> Vec<(String, &SecretUrl)> {
        if self.urls.is_empty() {
            vec![("broker.url".to_owned(), &self.url)]
        } else {
            self.urls
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("broker.urls[{i}]"), u))
                .collect()
        }
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            url: SecretUrl::new(DEFAULT_BROKER_URL),
            urls: Vec::new(),
            connection_name: "rabbit-guard".to_owned(),
            startup_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            consumer_timeout: Duration::from_secs(30 * 60),
            reconnect: ReconnectSettings::default(),
            tls: TlsSettings::default(),
            auth_mechanism: AuthMechanism::Plain,
            oauth2: None,
        }
    }
}

/// `[broker.reconnect]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReconnectSettings {
    /// First delay between attempts; doubles (with jitter) each attempt.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Give up after this many failed attempts in a row; unset: never give up.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectSettings {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

/// `[worker]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct WorkerSettings {
    /// On SIGTERM/SIGINT, how long running handlers may take to finish before
    /// their messages are requeued.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Threads running the worker. `1` (the default): everything on one
    /// thread, which costs the least CPU per message (no cross-thread
    /// wake-ups); raise it for handlers that do real CPU work (or move that
    /// work to `tokio::task::spawn_blocking`).
    pub threads: u16,
    /// What to do when a startup safety check finds a risk (a low quorum
    /// delivery limit, a call timeout beyond the broker's consumer timeout):
    /// `warn` (log and run), `refuse` (exit with the list), or `off`.
    pub safety_checks: SafetyChecks,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(30),
            threads: 1,
            safety_checks: SafetyChecks::Warn,
        }
    }
}

/// `worker.safety_checks`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SafetyChecks {
    /// Log each risk and run.
    #[default]
    Warn,
    /// Exit with the list of risks.
    Refuse,
    /// Don't check.
    Off,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AdminSettings {
    /// Address of the admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`,
    /// `/breakers`, `/status`, manual breaker control), e.g. `127.0.0.1:9090`.
    /// Unset: no endpoint.
    pub listen: Option<String>,
    /// Bearer token required for manual breaker control (`POST /breakers/…`).
    /// Without one (here or in `token_file`), manual control is off.
    pub token: Option<Secret>,
    /// A file holding the token (its first line), so it need not sit in the
    /// config; read at startup. Not together with `token`.
    pub token_file: Option<std::path::PathBuf>,
    /// Host names (besides its IP addresses and `localhost`) by which the
    /// endpoint may be called: a `Host` header naming anything else is
    /// refused for manual control, and for every request on loopback (the
    /// DNS-rebinding guard).
    pub allowed_hosts: Vec<String>,
    /// Connections served at once; more wait in the kernel's backlog (they
    /// cost the worker no file descriptor) until one closes.
    pub max_connections: u32,
    /// A connection is closed when a request's head takes longer than this
    /// to arrive, or it sits idle this long between requests.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: None,
            token: None,
            token_file: None,
            allowed_hosts: Vec::new(),
            max_connections: 64,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// `[fleet]`: several worker processes act as one guard. Off unless
/// `exchange` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct FleetSettings {
    /// The fanout exchange the workers share their breakers' state on,
    /// e.g. `rabbit-guard.fleet`. Unset: each worker guards on its own.
    pub exchange: Option<String>,
    /// This worker's name in the fleet (logs, `/breakers`). Default:
    /// `HOSTNAME-PID`.
    pub worker_id: Option<String>,
    /// At startup, how long to wait for the fleet's state before the
    /// consumers start, so a worker joining during an outage starts paused.
    #[serde(with = "humantime_serde")]
    pub join_wait: Duration,
    /// The broker user this worker connects as, sent as the AMQP `user_id`
    /// of its fleet messages (the broker refuses a `user_id` that is not
    /// the connection's user). Default: asked of the broker at each join.
    pub user: Option<String>,
    /// The broker users whose fleet messages are taken: anything else
    /// published to the exchange is ignored (counted, logged once).
    /// Default: this worker's own user.
    pub users: Vec<String>,
    /// A file holding a shared secret (at least 32 bytes): every fleet
    /// message then carries an HMAC-SHA256 of its body, and messages
    /// without a valid one are ignored. For brokers where the workers'
    /// user is shared with other applications.
    pub key_file: Option<std::path::PathBuf>,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            exchange: None,
            worker_id: None,
            join_wait: Duration::from_secs(1),
            user: None,
            users: Vec::new(),
            key_file: None,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LogSettings {
    /// `text` (default) or `json` (one object per line).
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter, e.g. `info` or `info,rabbit_guard=debug`.
    /// The `RUST_LOG` environment variable, when set, wins.
    pub level: String,
    /// After the first handler failure of a kind (logged at once), how
    /// often further ones are summed up in one warn line per queue and kind.
    #[serde(with = "humantime_serde")]
    pub failure_summary_every: Duration,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
            failure_summary_every: Duration::from_secs(10),
        }
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TelemetrySettings {
    /// OTLP/HTTP collector to export spans to, e.g. `http://127.0.0.1:4318`
    /// (`/v1/traces` is added when the URL has no path). Unset: no export.
    /// Needs the cargo feature `otel`.
    pub otlp_endpoint: Option<crate::secret::SecretUrl>,
    /// `http/protobuf` (default) or `http/json`.
    pub otlp_protocol: OtlpProtocol,
    /// The `service.name` the spans carry.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            service_name: "rabbit-guard".to_owned(),
        }
    }
}

/// The OTLP encoding over HTTP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum OtlpProtocol {
    /// Binary protobuf.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// JSON.
    #[serde(rename = "http/json")]
    HttpJson,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What happens to prefetched messages that had not started when the breaker opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OnPause {
    /// Return them to the queue (`basic.nack` with requeue). Not an attempt.
    #[default]
    Requeue,
    /// Send them to the dead-letter queue with reason `paused`.
    DeadLetter,
}

/// RabbitMQ queue type for the work queue and the queues declared beside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum QueueType {
    /// Classic queue.
    #[default]
    Classic,
    /// Quorum queue (replicated; rejects global QoS).
    Quorum,
}

/// How much of a consumer's topology rabbit-guard declares (`declare`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Declare {
    /// Declare everything, the work queue with its dead-lettering arguments
    /// (`x-dead-letter-exchange`, `x-dead-letter-routing-key`,
    /// `x-delivery-limit`). `true` means this.
    #[default]
    Full,
    /// The work queue is someone else's: check that it exists and leave its
    /// arguments alone; declare the dead-letter exchange and queue and the
    /// delay queues. Its broker-side dead-lettering comes from a policy,
    /// which `check-config` prints.
    Policy,
    /// Declare nothing: check that every queue and exchange exists. `false`
    /// means this.
    Passive,
}

impl Declare {
    /// The name written in a config file.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Policy => "policy",
            Self::Passive => "passive",
        }
    }
}

impl<'de> Deserialize<'de> for Declare {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Declare;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "\"full\", \"policy\" or \"passive\" (true and false mean full and passive)",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Declare, E> {
                Ok(if v { Declare::Full } else { Declare::Passive })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Declare, E> {
                match v {
                    "full" | "true" => Ok(Declare::Full),
                    "policy" => Ok(Declare::Policy),
                    "passive" | "false" => Ok(Declare::Passive),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// One `consumers[].bind` entry: an exchange (declared, or checked with
/// `declare = "passive"`) and the binding of the work queue to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Binding {
    /// The exchange (not `""`; an `amq.*` exchange is checked, never declared).
    pub exchange: String,
    /// Its type: `direct`, `topic`, `fanout` or `headers`.
    #[serde(rename = "type")]
    pub kind: ExchangeType,
    /// The binding's routing key (a pattern for `topic`).
    pub routing_key: String,
    /// Binding arguments, e.g. `{ "x-match" = "all", region = "eu" }` for a
    /// headers exchange: strings, integers and booleans.
    pub arguments: BTreeMap<String, serde_json::Value>,
}

impl Binding {
    /// A binding of the work queue to `exchange` (of type `kind`) with
    /// `routing_key`, without arguments.
    #[must_use]
    pub fn new(
        exchange: impl Into<String>,
        kind: ExchangeType,
        routing_key: impl Into<String>,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            kind,
            routing_key: routing_key.into(),
            arguments: BTreeMap::new(),
        }
    }

    /// With binding arguments (a headers exchange's `x-match` and values).
    #[must_use]
    pub fn with_arguments(mut self, arguments: BTreeMap<String, serde_json::Value>) -> Self {
        self.arguments = arguments;
        self
    }
}

/// An exchange type for [`Binding`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ExchangeType {
    /// Routes by exact routing key.
    #[default]
    Direct,
    /// Routes by routing-key pattern (`order.*`, `#.eu`).
    Topic,
    /// Routes to every bound queue.
    Fanout,
    /// Routes by header values (`arguments`).
    Headers,
}

/// `[[consumers]]`: one queue, its handler and the breaker guarding it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// The work queue to consume.
    pub queue: String,
    /// Name of the breaker (a key of `[breakers]`) guarding the handler's dependency.
    pub breaker: String,
    /// Several breakers, for a handler that calls several dependencies
    /// (instead of `breaker`, not with it): the consumer pauses while any is
    /// open. A transient failure counts against the breaker the handler
    /// names (`HandlerError::dependency`, `Context::guard`), else the first.
    pub breakers: Vec<String>,
    /// Handler kind: `http`, `noop`, or a name registered from Rust.
    pub handler: String,
    /// Unacknowledged messages the broker may push to this consumer (1-65535).
    pub prefetch: u16,
    /// Handlers running at once. At most `prefetch`.
    pub concurrency: u16,
    /// What to do with prefetched messages when the breaker opens.
    pub on_pause: OnPause,
    /// Type of the work queue, its dead-letter queue and its delay queues.
    pub queue_type: QueueType,
    /// What to declare at startup (idempotent): `"full"` (default, or
    /// `true`), `"policy"` (a work queue declared elsewhere keeps its
    /// arguments) or `"passive"` (or `false`: only check that everything exists).
    pub declare: Declare,
    /// Exchanges to bind the work queue to.
    pub bind: Vec<Binding>,
    /// Quorum queues only: the delivery limit, declared as `x-delivery-limit`.
    /// Unset: the broker's default (none before RabbitMQ 4.0, 20 since).
    pub delivery_limit: Option<u32>,
    /// Dead-letter exchange; default `{queue}.dlx`.
    pub dead_letter_exchange: Option<String>,
    /// Dead-letter queue; default `{queue}.dlq`.
    pub dead_letter_queue: Option<String>,
    /// `retry`: delays between attempts after transient failures.
    pub retry: RetrySettings,
    /// `http`: settings of the built-in `http` handler.
    pub http: Option<HttpSettings>,
    /// The `reply_to` values `ctx.reply` may answer: each must start with
    /// one of these (`["amq.rabbitmq.reply-to"]` allows direct reply-to
    /// only). Empty (default): any. A request with another `reply_to` is
    /// dead-lettered (`permanent`) when its handler replies.
    pub reply_to_prefixes: Vec<String>,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            queue: String::new(),
            breaker: String::new(),
            breakers: Vec::new(),
            handler: String::new(),
            prefetch: 50,
            concurrency: 8,
            on_pause: OnPause::Requeue,
            queue_type: QueueType::Classic,
            declare: Declare::Full,
            bind: Vec::new(),
            delivery_limit: None,
            dead_letter_exchange: None,
            dead_letter_queue: None,
            retry: RetrySettings::default(),
            http: None,
            reply_to_prefixes: Vec::new(),
        }
    }
}

impl ConsumerSettings {
    /// A consumer of `queue` whose messages go to the handler registered (or
    /// built in) as `handler`, with every other setting at its default; the
    /// fields are public, so set the rest on the value:
    ///
    /// ```
    /// # use rabbit_guard::config::ConsumerSettings;
    /// let mut orders = ConsumerSettings::new("orders", "orders").with_breaker("billing-api");
    /// orders.concurrency = 16;
    /// ```
    #[must_use]
    pub fn new(queue: impl Into<String>, handler: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            handler: handler.into(),
            ..Self::default()
        }
    }

    /// Guarded by the breaker named `breaker` (a key of `[breakers]`).
    #[must_use]
    pub fn with_breaker(mut self, breaker: impl Into<String>) -> Self {
        self.breaker = breaker.into();
        self
    }

    /// With these `retry` settings.
    #[must_use]
    pub fn with_retry(mut self, retry: RetrySettings) -> Self {
        self.retry = retry;
        self
    }

    /// At most `prefetch` unacknowledged messages, and `concurrency`
    /// handlers at once.
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16, concurrency: u16) -> Self {
        self.prefetch = prefetch;
        self.concurrency = concurrency;
        self
    }

    /// The breakers guarding the handler, in order: `breaker`, then
    /// `breakers` (validation refuses both at once).
    #[must_use]
    pub fn breaker_names(&self) -> Vec<&str> {
        std::iter::once(self.breaker.as_str())
            .filter(|b| !b.is_empty())
            .chain(self.breakers.iter().map(String::as_str))
            .collect()
    }

    /// The dead-letter exchange name.
    #[must_use]
    pub fn dead_letter_exchange(&self) -> String {
        self.dead_letter_exchange
            .clone()
            .unwrap_or_else(|| format!("{}.dlx", self.queue))
    }

    /// The dead-letter queue name.
    #[must_use]
    pub fn dead_letter_queue(&self) -> String {
        self.dead_letter_queue
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue))
    }

    /// The name of the delay queue for `delay`: `{queue}.delay.{delay}`, so a
    /// changed delay gets a new queue instead of clashing with the old TTL.
    #[must_use]
    pub fn delay_queue(&self, delay: Duration) -> String {
        format!("{}.delay.{}", self.queue, compact_duration(delay))
    }
}

/// `5s`, `1m`, `1500ms`: the shortest exact spelling, safe in a queue name.
#[must_use]
pub fn compact_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// `retry` under a consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetrySettings {
    /// One delay queue per entry: after the n-th transient failure the message
    /// waits `delays[n-1]`, then comes back. After the last, it is dead-lettered
    /// with reason `retries-exhausted`. Empty: no retries.
    #[serde(with = "duration_list")]
    pub delays: Vec<Duration>,
    /// Calls made again at once, in the same delivery, after a transient or
    /// `retry` failure and before the message waits in a delay level (as
    /// NServiceBus' and MassTransit's immediate retries). Each call counts
    /// against the breaker; they stop as soon as it opens. 0 (default): none.
    pub immediate: u32,
}

impl RetrySettings {
    /// Retries after these delays (one delay queue each), no immediate ones.
    #[must_use]
    pub fn new(delays: impl IntoIterator<Item = Duration>) -> Self {
        Self {
            delays: delays.into_iter().collect(),
            immediate: 0,
        }
    }

    /// Also `immediate` calls at once before each delay level.
    #[must_use]
    pub fn with_immediate(mut self, immediate: u32) -> Self {
        self.immediate = immediate;
        self
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
            ],
            immediate: 0,
        }
    }
}

/// `["1s", "5s"]` as a `Vec<Duration>`.
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub(super) fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for d in v {
            seq.serialize_element(&humantime::format_duration(*d).to_string())?;
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<humantime_serde::Serde<Duration>>::deserialize(d).map(|v| {
            v.into_iter()
                .map(humantime_serde::Serde::into_inner)
                .collect()
        })
    }
}
