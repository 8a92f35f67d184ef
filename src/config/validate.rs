//! Validation after loading: every problem, each with its key and value.

use std::collections::BTreeSet;

use std::time::Duration;

use super::error::{ConfigError, Problem};
use super::settings::{
    AdminSettings, BrokerSettings, ConsumerSettings, DEFAULT_BROKER_URL, FleetSettings,
    LogSettings, MAX_BROKER_URLS, Settings, TelemetrySettings, WorkerSettings,
};
use crate::amqp::check_name;
use crate::breaker::MAX_BREAKERS_PER_CONSUMER;

pub use crate::limits::MAX_DURATION;

/// The longest retry delay: RabbitMQ's limit for `x-message-ttl`
/// (2³² − 1 ms, about 49.7 days).
pub const MAX_RETRY_DELAY: Duration = Duration::from_millis(4_294_967_295);

/// The most threads `worker.threads` may ask for.
pub const MAX_THREADS: u16 = 1024;

fn too_long(key: &str, d: Duration) -> Option<Problem> {
    (d > MAX_DURATION).then(|| {
        problem(
            key,
            quoted(&humantime::format_duration(d).to_string()),
            "must be at most 100 years (\"100y\", which already means forever)",
        )
    })
}

fn name_problem(key: String, name: &str) -> Option<Problem> {
    check_name(name)
        .err()
        .map(|why| problem(key, quoted(&crate::text::truncate(name, 40)), why))
}

fn problem(key: impl Into<String>, value: Option<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        value,
        message: message.into(),
    }
}

fn quoted(s: &str) -> Option<String> {
    Some(format!("{s:?}"))
}

impl Settings {
    /// Checks everything that deserializing cannot: ranges, references
    /// between tables, handler names (built-ins plus `extra_handlers`).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] listing every problem found.
    pub fn validate(&self, extra_handlers: &[&str]) -> Result<(), ConfigError> {
        let problems = self.problems(extra_handlers);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every problem with these settings (empty when valid): each table's
    /// own, then what ties them together (breaker names, one consumer per
    /// queue, handler kinds).
    #[must_use]
    pub fn problems(&self, extra_handlers: &[&str]) -> Vec<Problem> {
        let mut out = self.broker.problems();
        out.extend(self.worker.problems());
        out.extend(self.admin.problems());
        out.extend(self.log.problems());
        out.extend(self.telemetry.problems());
        out.extend(
            self.fleet
                .problems(self.breakers.keys().map(String::as_str)),
        );
        for (name, cfg) in &self.breakers {
            for (key, message) in cfg.problems() {
                let value = breaker_value(cfg, key);
                out.push(problem(format!("breakers.{name}.{key}"), value, message));
            }
        }
        out.extend(self.unused_breakers());
        if self.consumers.is_empty() {
            out.push(problem(
                "consumers",
                None,
                "no consumers configured: add a [[consumers]] table with queue, breaker and handler",
            ));
        }
        let mut queues = BTreeSet::new();
        for (i, c) in self.consumers.iter().enumerate() {
            let mut own = c.problems(i);
            if own.iter().all(|p| p.key != format!("consumers[{i}].queue"))
                && !queues.insert(c.queue.clone())
            {
                own.push(problem(
                    format!("consumers[{i}].queue"),
                    quoted(&c.queue),
                    "this queue already has a consumer above: one consumer per queue in a process, because its pause at the broker, its probes, its delay queues and its counters are the queue's; for more throughput raise its concurrency (and prefetch), or run more worker processes, each its own consumer at the broker",
                ));
            }
            out.extend(own);
            out.extend(self.reference_problems(i, c, extra_handlers));
        }
        out.extend(self.copy_target_problems());
        out
    }

    /// A dead-letter or delay queue that is also a work queue (of this
    /// consumer or another) would send copies back to be handled again, in
    /// a loop: refused whatever `declare` says (with `declare = "passive"`
    /// or `"policy"` nothing else would notice).
    fn copy_target_problems(&self) -> Vec<Problem> {
        let work: Vec<(usize, &str)> = self
            .consumers
            .iter()
            .enumerate()
            .map(|(j, c)| (j, c.queue.as_str()))
            .filter(|(_, q)| !q.trim().is_empty())
            .collect();
        let consumer_of = |name: &str| work.iter().find(|(_, q)| *q == name).map(|(j, _)| *j);
        let mut out = Vec::new();
        for (i, c) in self.consumers.iter().enumerate() {
            let dlq = c.dead_letter_queue();
            if let Some(j) = consumer_of(&dlq) {
                out.push(problem(
                    format!("consumers[{i}].dead_letter_queue"),
                    quoted(&crate::text::truncate(&dlq, 80)),
                    format!(
                        "is the work queue of consumers[{j}]: its dead letters would be handled again, in a loop; name a queue of its own"
                    ),
                ));
            }
            for (k, d) in c.retry.delays.iter().enumerate() {
                let delay = c.delay_queue(*d);
                if let Some(j) = consumer_of(&delay) {
                    out.push(problem(
                        format!("consumers[{i}].retry.delays[{k}]"),
                        quoted(&humantime::format_duration(*d).to_string()),
                        format!(
                            "its delay queue {:?} is the work queue of consumers[{j}]: retries would skip their wait",
                            crate::text::truncate(&delay, 80)
                        ),
                    ));
                }
            }
        }
        out
    }

    /// A breaker no consumer names is a mistake (often a mistyped name, or
    /// an environment variable that spelt `-` as `_` and made a new one).
    fn unused_breakers(&self) -> Vec<Problem> {
        let used: Vec<&str> = self
            .consumers
            .iter()
            .flat_map(ConsumerSettings::breaker_names)
            .collect();
        self.breakers
            .keys()
            .filter(|name| !used.contains(&name.as_str()))
            .map(|name| {
                let others = self
                    .breakers
                    .keys()
                    .map(String::as_str)
                    .chain(used.iter().copied())
                    .filter(|other| other != name);
                let hint = match super::keys::closest(name, others) {
                    Some(close) if close.replace('-', "_") == name.as_str() => format!(
                        "; did you mean {close:?}? An environment variable makes the name as written: spell the '-' (env 'RABBIT_GUARD__BREAKERS__{close}__KEY=…')"
                    ),
                    Some(close) => format!("; did you mean {close:?}?"),
                    None => "; name it in a consumer's breaker, or remove it".to_owned(),
                };
                problem(
                    format!("breakers.{name}"),
                    None,
                    format!("no consumer uses this breaker{hint}"),
                )
            })
            .collect()
    }

    /// A consumer's breaker and handler must exist.
    fn reference_problems(
        &self,
        i: usize,
        c: &ConsumerSettings,
        extra_handlers: &[&str],
    ) -> Vec<Problem> {
        let mut out = Vec::new();
        let key = |k: &str| format!("consumers[{i}].{k}");
        let names = c.breaker_names();
        if !c.breaker.is_empty() && !c.breakers.is_empty() {
            out.push(problem(
                key("breakers"),
                Some(format!("{:?}", c.breakers)),
                format!(
                    "set breaker (one) or breakers (several), not both; e.g. breakers = {names:?}"
                ),
            ));
        } else if names.is_empty() {
            out.push(problem(
                key("breaker"),
                None,
                "must name a breaker from [breakers.NAME] (or several: breakers = [\"a\", \"b\"])",
            ));
        } else if names.len() > MAX_BREAKERS_PER_CONSUMER {
            out.push(problem(
                key("breakers"),
                None,
                format!(
                    "{} breakers; at most {MAX_BREAKERS_PER_CONSUMER} per consumer",
                    names.len()
                ),
            ));
        }
        // `breaker` comes first in `names`, then `breakers[…]`.
        let offset = usize::from(!c.breaker.is_empty());
        for (j, name) in names.iter().enumerate() {
            let k = if j < offset {
                key("breaker")
            } else {
                key(&format!("breakers[{}]", j - offset))
            };
            if names[..j].contains(name) {
                out.push(problem(k, quoted(name), "named twice"));
            } else if name.is_empty() {
                out.push(problem(k, None, "an empty breaker name"));
            } else if !self.breakers.contains_key(*name) {
                let known = self.breakers.keys().cloned().collect::<Vec<_>>().join(", ");
                let hint = if known.is_empty() {
                    "no breakers are defined: add [breakers.NAME]".to_owned()
                } else {
                    format!("defined breakers: {known}")
                };
                out.push(problem(k, quoted(name), format!("unknown breaker; {hint}")));
            }
        }
        let handler_known = crate::builtin_handlers::builtin(&c.handler).is_some()
            || extra_handlers.contains(&c.handler.as_str());
        if !handler_known {
            let mut all: Vec<&str> = crate::builtin_handlers::builtin_names();
            all.extend(extra_handlers);
            out.push(problem(
                key("handler"),
                quoted(&c.handler),
                format!(
                    "unknown handler kind; known: {} (custom handlers are registered from Rust with WorkerBuilder::handler)",
                    all.join(", ")
                ),
            ));
        }
        out
    }
}

impl BrokerSettings {
    /// Every problem with `[broker]`.
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if !self.urls.is_empty() && self.url.expose() != DEFAULT_BROKER_URL {
            out.push(problem(
                "broker.urls",
                None,
                "set broker.url (one node) or broker.urls (a cluster's nodes), not both",
            ));
        }
        if self.urls.len() > MAX_BROKER_URLS {
            out.push(problem(
                "broker.urls",
                None,
                format!("{} addresses; at most {MAX_BROKER_URLS}", self.urls.len()),
            ));
        }
        for (i, (key, url)) in self.addresses().into_iter().enumerate() {
            if let Err(e) = crate::amqp::parse_uri(url) {
                out.push(problem(
                    key,
                    quoted(&url.masked()),
                    format!("not an AMQP URI: {e}; expected amqp://user:password@host:5672/vhost"),
                ));
            } else if self.urls[..i].contains(url) {
                out.push(problem(key, quoted(&url.masked()), "listed twice"));
            }
        }
        out.extend(name_problem(
            "broker.connection_name".into(),
            &self.connection_name,
        ));
        let r = &self.reconnect;
        for (key, d) in [
            ("broker.connect_timeout", self.connect_timeout),
            ("broker.consumer_timeout", self.consumer_timeout),
            ("broker.reconnect.initial_delay", r.initial_delay),
            ("broker.reconnect.max_delay", r.max_delay),
        ] {
            if d.is_zero() {
                out.push(problem(key, quoted("0s"), "must be greater than zero"));
            }
        }
        for (key, d) in [
            ("broker.startup_timeout", self.startup_timeout),
            ("broker.connect_timeout", self.connect_timeout),
            ("broker.consumer_timeout", self.consumer_timeout),
            ("broker.reconnect.initial_delay", r.initial_delay),
            ("broker.reconnect.max_delay", r.max_delay),
        ] {
            out.extend(too_long(key, d));
        }
        if r.max_delay < r.initial_delay {
            out.push(problem(
                "broker.reconnect.max_delay",
                quoted(&humantime::format_duration(r.max_delay).to_string()),
                "must be at least broker.reconnect.initial_delay",
            ));
        }
        if r.max_attempts == Some(0) {
            out.push(problem(
                "broker.reconnect.max_attempts",
                Some("0".into()),
                "must be at least 1 (leave it out to retry forever)",
            ));
        }
        out.extend(self.tls_problems());
        if let Some(oauth2) = &self.oauth2 {
            out.extend(oauth2.problems());
            if self.auth_mechanism == super::AuthMechanism::External {
                out.push(problem(
                    "broker.oauth2",
                    None,
                    "logs in with a token (PLAIN); broker.auth_mechanism = \"external\" takes the certificate instead: choose one",
                ));
            }
        }
        out
    }

    /// `[broker.tls]` and `broker.auth_mechanism`: they fit the URLs, and
    /// the files they name can be read and belong together.
    fn tls_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let schemes: Vec<bool> = self
            .addresses()
            .iter()
            .map(|(_, url)| {
                url.expose()
                    .trim_start()
                    .to_ascii_lowercase()
                    .starts_with("amqps://")
            })
            .collect();
        let any_tls = schemes.iter().any(|t| *t);
        let all_tls = !schemes.is_empty() && schemes.iter().all(|t| *t);
        if self.tls.is_configured() && !any_tls {
            out.push(problem(
                "broker.tls",
                None,
                "applies to amqps:// URLs, and broker.url is amqp://: use amqps:// (RabbitMQ's TLS port is 5671 by default)",
            ));
        }
        if self.auth_mechanism == super::AuthMechanism::External {
            if !all_tls {
                out.push(problem(
                    "broker.auth_mechanism",
                    quoted("external"),
                    "EXTERNAL takes the user from the client certificate: every broker URL must be amqps://",
                ));
            }
            if self.tls.cert_file.is_none() {
                out.push(problem(
                    "broker.auth_mechanism",
                    quoted("external"),
                    "EXTERNAL takes the user from the client certificate: set broker.tls.cert_file and broker.tls.key_file",
                ));
            }
        }
        if let Some(name) = &self.tls.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            out.push(problem(
                "broker.tls.server_name",
                quoted(&crate::text::truncate(name, 80)),
                "not a DNS name or IP address",
            ));
        }
        if any_tls
            && self.tls.is_configured()
            && let Err(e) = crate::amqp::tls::Tls::load(&self.tls)
        {
            out.push(problem(
                format!("broker.tls.{}", e.key.unwrap_or("ca_file")),
                None,
                e.message,
            ));
        }
        out
    }
}

impl super::OAuth2Settings {
    /// Every problem with `[broker.oauth2]`; the files it names must hold a
    /// line (never shown).
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        match (&self.token_file, &self.token_url) {
            (None, None) => out.push(problem(
                "broker.oauth2",
                None,
                "set token_file (a file something keeps fresh), or token_url with client_id and client_secret_file (a client-credentials grant)",
            )),
            (Some(_), Some(_)) => out.push(problem(
                "broker.oauth2.token_url",
                None,
                "set token_file or token_url, not both",
            )),
            _ => {}
        }
        let readable = |key: &str, path: &std::path::Path| -> Option<Problem> {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    return Some(problem(
                        key,
                        quoted(&path.display().to_string()),
                        format!("cannot read it ({e})"),
                    ));
                }
            };
            text.lines()
                .next()
                .unwrap_or("")
                .trim()
                .is_empty()
                .then(|| {
                    problem(
                        key,
                        quoted(&path.display().to_string()),
                        "the file is empty: write it on the first line",
                    )
                })
        };
        if let Some(path) = &self.token_file {
            out.extend(readable("broker.oauth2.token_file", path));
        }
        if let Some(url) = &self.token_url {
            match url::Url::parse(url.expose()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                _ => out.push(problem(
                    "broker.oauth2.token_url",
                    quoted(&url.masked()),
                    "must be an http:// or https:// URL",
                )),
            }
            if cfg!(not(feature = "http-handler")) {
                out.push(problem(
                    "broker.oauth2.token_url",
                    None,
                    "this build has no HTTP client (cargo feature http-handler): use token_file",
                ));
            }
            if self.client_id.as_deref().is_none_or(str::is_empty) {
                out.push(problem(
                    "broker.oauth2.client_id",
                    None,
                    "is required with token_url",
                ));
            }
            match &self.client_secret_file {
                None => out.push(problem(
                    "broker.oauth2.client_secret_file",
                    None,
                    "is required with token_url (a file holding the client secret)",
                )),
                Some(path) => out.extend(readable("broker.oauth2.client_secret_file", path)),
            }
        }
        if self.renew_before < std::time::Duration::from_secs(1)
            || self.renew_before > std::time::Duration::from_secs(3600)
        {
            out.push(problem(
                "broker.oauth2.renew_before",
                quoted(&humantime::format_duration(self.renew_before).to_string()),
                "must be from 1s to 1h",
            ));
        }
        out
    }
}

impl WorkerSettings {
    /// Every problem with `[worker]`.
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = too_long("worker.shutdown_grace", self.shutdown_grace)
            .into_iter()
            .collect();
        if self.threads == 0 || self.threads > MAX_THREADS {
            out.push(problem(
                "worker.threads",
                Some(self.threads.to_string()),
                format!("must be from 1 to {MAX_THREADS}"),
            ));
        }
        out
    }
}

impl AdminSettings {
    /// Every problem with `[admin]`.
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        #[cfg(not(feature = "admin"))]
        if self.listen.is_some() {
            out.push(problem(
                "admin.listen",
                self.listen.as_deref().and_then(quoted),
                "this build has no admin endpoint (it was built without the cargo feature \"admin\"): leave admin.listen out, or build with it",
            ));
        }
        if let Some(listen) = &self.listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            out.push(problem(
                "admin.listen",
                quoted(listen),
                "not an address:port; e.g. \"127.0.0.1:9090\" (\"0.0.0.0:9090\" for every interface, with admin.token)",
            ));
        }
        if self
            .token
            .as_ref()
            .is_some_and(|t| t.expose().trim().is_empty())
        {
            out.push(problem(
                "admin.token",
                quoted(""),
                "must not be empty (leave it out for none)",
            ));
        }
        if self.token.is_some() && self.token_file.is_some() {
            out.push(problem(
                "admin.token_file",
                None,
                "set admin.token or admin.token_file, not both",
            ));
        }
        if !(1..=10_000).contains(&self.max_connections) {
            out.push(problem(
                "admin.max_connections",
                Some(self.max_connections.to_string()),
                "must be from 1 to 10000",
            ));
        }
        if self.request_timeout < std::time::Duration::from_millis(100)
            || self.request_timeout > std::time::Duration::from_secs(600)
        {
            out.push(problem(
                "admin.request_timeout",
                quoted(&humantime::format_duration(self.request_timeout).to_string()),
                "must be from 100ms to 10m",
            ));
        }
        out
    }
}

impl FleetSettings {
    /// Every problem with `[fleet]`, given the breakers' names (each names
    /// a probe-lease queue derived from the exchange).
    #[must_use]
    pub fn problems<'a>(&self, breakers: impl IntoIterator<Item = &'a str>) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some(exchange) = &self.exchange {
            if exchange.trim().is_empty() {
                out.push(problem(
                    "fleet.exchange",
                    quoted(""),
                    "must not be empty (leave it out to run without a fleet)",
                ));
            } else if exchange.starts_with("amq.") {
                out.push(problem(
                    "fleet.exchange",
                    quoted(&crate::text::truncate(exchange, 40)),
                    "names starting with \"amq.\" are reserved by RabbitMQ; e.g. \"rabbit-guard.fleet\"",
                ));
            } else if let Some(p) = name_problem("fleet.exchange".into(), exchange) {
                out.push(p);
            } else {
                for breaker in breakers {
                    let lease = crate::fleet::lease_queue(exchange, breaker);
                    if let Some(p) = name_problem("fleet.exchange".into(), &lease) {
                        out.push(problem(
                            p.key,
                            quoted(&crate::text::truncate(exchange, 40)),
                            format!(
                                "the probe-lease queue of breaker {:?} would be {:?}: {}",
                                crate::text::truncate(breaker, 40),
                                crate::text::truncate(&lease, 40),
                                p.message
                            ),
                        ));
                        break;
                    }
                }
            }
        }
        if let Some(id) = &self.worker_id
            && (id.trim().is_empty()
                || id.chars().count() > crate::fleet::MAX_WORKER_ID
                || id.chars().any(char::is_control))
        {
            out.push(problem(
                "fleet.worker_id",
                quoted(&crate::text::truncate(id, 40)),
                format!(
                    "must be 1 to {} printable characters (leave it out for HOSTNAME-PID)",
                    crate::fleet::MAX_WORKER_ID
                ),
            ));
        }
        if self.join_wait > crate::fleet::MAX_JOIN_WAIT {
            out.push(problem(
                "fleet.join_wait",
                quoted(&humantime::format_duration(self.join_wait).to_string()),
                "must be at most 1m: the consumers wait this long at startup",
            ));
        }
        out.extend(self.trust_problems());
        out
    }
}

impl FleetSettings {
    /// Problems with `fleet.user`, `fleet.users` and `fleet.key_file`.
    fn trust_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let user_problem = |key: String, user: &str| {
            (user.is_empty() || user.len() > 255 || user.chars().any(char::is_control)).then(|| {
                problem(
                    key,
                    quoted(&crate::text::truncate(user, 40)),
                    "must be a broker user name (1 to 255 bytes, no control characters)",
                )
            })
        };
        if let Some(user) = &self.user {
            out.extend(user_problem("fleet.user".into(), user));
        }
        if self.users.len() > crate::fleet::MAX_FLEET_USERS {
            out.push(problem(
                "fleet.users",
                Some(self.users.len().to_string()),
                format!(
                    "at most {} users: list the users the fleet's workers connect as",
                    crate::fleet::MAX_FLEET_USERS
                ),
            ));
        } else {
            for (i, user) in self.users.iter().enumerate() {
                out.extend(user_problem(format!("fleet.users[{i}]"), user));
            }
        }
        if let (Some(user), false) = (&self.user, self.users.is_empty())
            && !self.users.contains(user)
        {
            out.push(problem(
                "fleet.users",
                None,
                format!(
                    "must include fleet.user {:?}: the other workers would ignore this one",
                    crate::text::truncate(user, 40)
                ),
            ));
        }
        if let Some(path) = &self.key_file {
            match std::fs::read(path) {
                Err(e) => out.push(problem(
                    "fleet.key_file",
                    quoted(&path.display().to_string()),
                    format!("cannot read it ({e})"),
                )),
                Ok(bytes) if crate::fleet::trust::key_from(&bytes).is_none() => {
                    out.push(problem(
                        "fleet.key_file",
                        quoted(&path.display().to_string()),
                        format!(
                            "must hold at least {} bytes of secret (e.g. `openssl rand -hex 32 > {}`)",
                            crate::fleet::trust::MIN_KEY,
                            path.display()
                        ),
                    ));
                }
                Ok(_) => {}
            }
        }
        out
    }
}

impl TelemetrySettings {
    /// Every problem with `[telemetry]`.
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let Some(url) = &self.otlp_endpoint else {
            return out;
        };
        if !cfg!(feature = "otel") {
            out.push(problem(
                "telemetry.otlp_endpoint",
                quoted(&url.masked()),
                "this build has no OpenTelemetry export (it was built without the cargo feature \"otel\"): leave it out, or build with it",
            ));
        }
        match url::Url::parse(url.expose()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
            _ => out.push(problem(
                "telemetry.otlp_endpoint",
                quoted(&url.masked()),
                "must be an http:// or https:// URL, e.g. \"http://127.0.0.1:4318\"",
            )),
        }
        if self.service_name.trim().is_empty() {
            out.push(problem(
                "telemetry.service_name",
                quoted(""),
                "must not be empty",
            ));
        }
        out
    }
}

impl LogSettings {
    /// Every problem with `[log]`.
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            out.push(problem(
                "log.level",
                quoted(&self.level),
                format!("not a log filter ({e}); e.g. \"info\" or \"info,rabbit_guard=debug\""),
            ));
        }
        if self.failure_summary_every < Duration::from_millis(100) {
            out.push(problem(
                "log.failure_summary_every",
                quoted(&humantime::format_duration(self.failure_summary_every).to_string()),
                "must be at least 100ms",
            ));
        }
        out.extend(too_long(
            "log.failure_summary_every",
            self.failure_summary_every,
        ));
        out
    }
}

impl ConsumerSettings {
    /// Every problem with the consumer at `consumers[index]` on its own (its
    /// breaker and handler are checked against the rest of the settings by
    /// [`Settings::problems`]).
    #[must_use]
    pub fn problems(&self, index: usize) -> Vec<Problem> {
        let mut out = self.name_problems(index);
        out.extend(self.flow_problems(index));
        out.extend(self.binding_problems(index));
        for (j, prefix) in self.reply_to_prefixes.iter().enumerate() {
            let key = format!("consumers[{index}].reply_to_prefixes[{j}]");
            if prefix.is_empty() {
                out.push(problem(
                    key,
                    quoted(""),
                    "must not be empty (it would allow every reply_to; leave the list empty for that)",
                ));
            } else if let Some(p) = name_problem(key, prefix) {
                out.push(p);
            }
        }
        if let Some(builtin) = crate::builtin_handlers::builtin(&self.handler) {
            for (k, value, message) in (builtin.problems)(self) {
                out.push(problem(format!("consumers[{index}].{k}"), value, message));
            }
        }
        out
    }

    /// `bind`: exchange names, routing keys and argument values.
    fn binding_problems(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        for (j, b) in self.bind.iter().enumerate() {
            let key = |k: &str| format!("consumers[{i}].bind[{j}].{k}");
            if b.exchange.is_empty() {
                out.push(problem(
                    key("exchange"),
                    None,
                    "is required: the exchange to bind the work queue to (every queue is already bound to the default exchange by its name)",
                ));
            } else if b.exchange.len() > crate::limits::MAX_NAME_LEN {
                out.push(problem(
                    key("exchange"),
                    None,
                    format!("is {} bytes; AMQP names are at most 255", b.exchange.len()),
                ));
            }
            if b.routing_key.len() > crate::limits::MAX_NAME_LEN {
                out.push(problem(
                    key("routing_key"),
                    None,
                    format!(
                        "is {} bytes; AMQP routing keys are at most 255",
                        b.routing_key.len()
                    ),
                ));
            }
            for (name, v) in &b.arguments {
                let fits =
                    v.is_boolean() || v.is_i64() || v.as_str().is_some_and(|s| s.len() <= 65_535);
                if !fits || name.len() > crate::limits::MAX_NAME_LEN {
                    out.push(problem(
                        key(&format!("arguments.{name}")),
                        None,
                        "binding arguments are strings, integers or booleans (names up to 255 bytes)",
                    ));
                }
            }
        }
        out
    }

    /// Prefetch, concurrency, retry delays and the delivery limit.
    fn flow_problems(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        let key = |k: &str| format!("consumers[{i}].{k}");
        if self.prefetch == 0 {
            out.push(problem(
                key("prefetch"),
                Some("0".into()),
                "must be at least 1 (0 means unlimited to RabbitMQ, which cannot be paused)",
            ));
        }
        if self.concurrency == 0 {
            out.push(problem(
                key("concurrency"),
                Some("0".into()),
                "must be at least 1",
            ));
        } else if self.prefetch != 0 && self.prefetch < self.concurrency {
            out.push(problem(
                key("prefetch"),
                Some(self.prefetch.to_string()),
                format!(
                    "must be at least concurrency ({}), or handlers sit idle waiting for messages",
                    self.concurrency
                ),
            ));
        }
        for (j, d) in self.retry.delays.iter().enumerate() {
            let key = format!("consumers[{i}].retry.delays[{j}]");
            if d.is_zero() {
                out.push(problem(key, quoted("0s"), "must be greater than zero"));
            } else if *d > MAX_RETRY_DELAY {
                out.push(problem(
                    key,
                    quoted(&humantime::format_duration(*d).to_string()),
                    "must be at most 49d 17h 2m 47s 295ms (RabbitMQ's longest message TTL)",
                ));
            } else if let Some(first) = self.retry.delays[..j].iter().position(|e| e == d) {
                out.push(problem(
                    key,
                    quoted(&humantime::format_duration(*d).to_string()),
                    format!(
                        "the same as retry.delays[{first}]: each delay is its own queue, so two levels cannot share one (list distinct delays)"
                    ),
                ));
            }
        }
        if self.retry.immediate > crate::limits::MAX_IMMEDIATE_RETRIES {
            out.push(problem(
                key("retry.immediate"),
                Some(self.retry.immediate.to_string()),
                format!(
                    "must be at most {}: each is another call to a failing dependency within one delivery; use retry.delays to wait between attempts",
                    crate::limits::MAX_IMMEDIATE_RETRIES
                ),
            ));
        }
        if self.delivery_limit.is_some() && self.queue_type != super::settings::QueueType::Quorum {
            out.push(problem(
                key("delivery_limit"),
                self.delivery_limit.map(|n| n.to_string()),
                "only quorum queues have a delivery limit: set queue_type = \"quorum\" or leave it out",
            ));
        }
        if self.delivery_limit == Some(0) {
            out.push(problem(
                key("delivery_limit"),
                Some("0".into()),
                "must be at least 1",
            ));
        }
        out
    }

    /// The queue's name and the names derived from it must fit AMQP.
    fn name_problems(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        let key = |k: &str| format!("consumers[{i}].{k}");
        let queue_fits = self.queue.len() <= crate::amqp::MAX_NAME_LEN;
        if self.queue.trim().is_empty() {
            out.push(problem(
                key("queue"),
                None,
                "must be set to the queue to consume",
            ));
        } else {
            out.extend(name_problem(key("queue"), &self.queue));
        }
        for d in &self.retry.delays {
            if queue_fits
                && !d.is_zero()
                && *d <= MAX_RETRY_DELAY
                && let Some(p) = name_problem(key("queue"), &self.delay_queue(*d))
            {
                out.push(problem(
                    p.key,
                    quoted(&crate::text::truncate(&self.queue, 40)),
                    format!(
                        "its delay queue {:?} {}",
                        crate::text::truncate(&self.delay_queue(*d), 40),
                        p.message
                    ),
                ));
            }
        }
        for (k, name, derived) in [
            (
                "dead_letter_exchange",
                &self.dead_letter_exchange,
                self.dead_letter_exchange(),
            ),
            (
                "dead_letter_queue",
                &self.dead_letter_queue,
                self.dead_letter_queue(),
            ),
        ] {
            if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                out.push(problem(
                    key(k),
                    quoted(""),
                    "must not be empty (leave it out for the default)",
                ));
            } else if (name.is_some() || queue_fits)
                && let Some(p) = name_problem(key(k), &derived)
            {
                let message = if name.is_none() {
                    format!(
                        "the default name {} (a shorter queue name, or set {k})",
                        p.message
                    )
                } else {
                    p.message
                };
                out.push(problem(p.key, p.value, message));
            }
        }
        out
    }
}

fn breaker_value(cfg: &crate::breaker::BreakerConfig, key: &str) -> Option<String> {
    let fmt =
        |d: std::time::Duration| Some(format!("{:?}", humantime::format_duration(d).to_string()));
    match key {
        "failure_rate" => Some(cfg.failure_rate.to_string()),
        "slow_call_rate" => Some(cfg.slow_call_rate.to_string()),
        "minimum_calls" => Some(cfg.minimum_calls.to_string()),
        "window_buckets" => Some(cfg.window_buckets.to_string()),
        "half_open_probes" => Some(cfg.half_open_probes.to_string()),
        "consecutive_failures" => cfg.consecutive_failures.map(|n| n.to_string()),
        "window" => fmt(cfg.window),
        "slow_call_duration" => fmt(cfg.slow_call_duration),
        "call_timeout" => fmt(cfg.call_timeout),
        "open_timeout" => fmt(cfg.open_timeout),
        "max_open_timeout" => fmt(cfg.max_open_timeout),
        "health_check.url" => cfg
            .health_check
            .as_ref()
            .and_then(|h| h.url.as_ref())
            .map(|u| format!("{:?}", u.masked())),
        "health_check.interval" => cfg.health_check.as_ref().and_then(|h| fmt(h.interval)),
        "health_check.timeout" => cfg.health_check.as_ref().and_then(|h| fmt(h.timeout)),
        _ => None,
    }
}
