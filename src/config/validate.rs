//! Validation after loading: every problem, each with its key and value.

use std::collections::BTreeSet;

use std::time::Duration;

use super::error::{ConfigError, Problem};
use super::settings::Settings;
use crate::amqp::check_name;

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
        .map(|why| problem(key, quoted(&crate::dead_letter::truncate(name, 40)), why))
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

    /// Every problem with these settings (empty when valid).
    #[must_use]
    pub fn problems(&self, extra_handlers: &[&str]) -> Vec<Problem> {
        let mut out = Vec::new();
        let b = &self.broker;
        if let Err(e) = crate::amqp::parse_uri(&b.url) {
            out.push(problem(
                "broker.url",
                quoted(&b.url.masked()),
                format!("not an AMQP URI: {e}; expected amqp://user:password@host:5672/vhost"),
            ));
        }
        if let Some(p) = name_problem("broker.connection_name".into(), &b.connection_name) {
            out.push(p);
        }
        for (key, d) in [
            ("broker.connect_timeout", b.connect_timeout),
            ("broker.consumer_timeout", b.consumer_timeout),
            ("broker.reconnect.initial_delay", b.reconnect.initial_delay),
            ("broker.reconnect.max_delay", b.reconnect.max_delay),
        ] {
            if d.is_zero() {
                out.push(problem(key, quoted("0s"), "must be greater than zero"));
            }
        }
        for (key, d) in [
            ("broker.startup_timeout", b.startup_timeout),
            ("broker.connect_timeout", b.connect_timeout),
            ("broker.consumer_timeout", b.consumer_timeout),
            ("broker.reconnect.initial_delay", b.reconnect.initial_delay),
            ("broker.reconnect.max_delay", b.reconnect.max_delay),
            ("worker.shutdown_grace", self.worker.shutdown_grace),
        ] {
            out.extend(too_long(key, d));
        }
        if b.reconnect.max_delay < b.reconnect.initial_delay {
            out.push(problem(
                "broker.reconnect.max_delay",
                quoted(&humantime::format_duration(b.reconnect.max_delay).to_string()),
                "must be at least broker.reconnect.initial_delay",
            ));
        }
        if b.reconnect.max_attempts == Some(0) {
            out.push(problem(
                "broker.reconnect.max_attempts",
                Some("0".into()),
                "must be at least 1 (leave it out to retry forever)",
            ));
        }
        if self.worker.threads == 0 || self.worker.threads > MAX_THREADS {
            out.push(problem(
                "worker.threads",
                Some(self.worker.threads.to_string()),
                format!("must be from 1 to {MAX_THREADS}"),
            ));
        }
        if let Some(listen) = &self.admin.listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            out.push(problem(
                "admin.listen",
                quoted(listen),
                "not an address:port; e.g. \"127.0.0.1:9090\" (\"0.0.0.0:9090\" for every interface, with admin.token)",
            ));
        }
        if self
            .admin
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
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            out.push(problem(
                "admin.token_file",
                None,
                "set admin.token or admin.token_file, not both",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            out.push(problem(
                "log.level",
                quoted(&self.log.level),
                format!("not a log filter ({e}); e.g. \"info\" or \"info,rabbit_guard=debug\""),
            ));
        }
        for (name, cfg) in &self.breakers {
            for (key, message) in cfg.problems() {
                let value = breaker_value(cfg, key);
                out.push(problem(format!("breakers.{name}.{key}"), value, message));
            }
        }
        if self.consumers.is_empty() {
            out.push(problem(
                "consumers",
                None,
                "no consumers configured: add a [[consumers]] table with queue, breaker and handler",
            ));
        }
        let mut queues = BTreeSet::new();
        let known_breakers = self.breakers.keys().cloned().collect::<Vec<_>>().join(", ");
        for (i, c) in self.consumers.iter().enumerate() {
            let key = |k: &str| format!("consumers[{i}].{k}");
            if c.queue.trim().is_empty() {
                out.push(problem(
                    key("queue"),
                    None,
                    "must be set to the queue to consume",
                ));
            } else if let Some(p) = name_problem(key("queue"), &c.queue) {
                out.push(p);
            } else if !queues.insert(c.queue.clone()) {
                out.push(problem(
                    key("queue"),
                    quoted(&c.queue),
                    "this queue already has a consumer above; one consumer per queue",
                ));
            }
            if c.breaker.is_empty() {
                out.push(problem(
                    key("breaker"),
                    None,
                    "must name a breaker from [breakers.NAME]",
                ));
            } else if !self.breakers.contains_key(&c.breaker) {
                let hint = if known_breakers.is_empty() {
                    "no breakers are defined: add [breakers.NAME]".to_owned()
                } else {
                    format!("defined breakers: {known_breakers}")
                };
                out.push(problem(
                    key("breaker"),
                    quoted(&c.breaker),
                    format!("unknown breaker; {hint}"),
                ));
            }
            let handler_known = crate::handlers::builtin(&c.handler).is_some()
                || extra_handlers.contains(&c.handler.as_str());
            if !handler_known {
                let mut all: Vec<&str> = crate::handlers::builtin_names();
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
            if c.prefetch == 0 {
                out.push(problem(
                    key("prefetch"),
                    Some("0".into()),
                    "must be at least 1 (0 means unlimited to RabbitMQ, which cannot be paused)",
                ));
            }
            if c.concurrency == 0 {
                out.push(problem(
                    key("concurrency"),
                    Some("0".into()),
                    "must be at least 1",
                ));
            } else if c.prefetch != 0 && c.prefetch < c.concurrency {
                out.push(problem(
                    key("prefetch"),
                    Some(c.prefetch.to_string()),
                    format!(
                        "must be at least concurrency ({}), or handlers sit idle waiting for messages",
                        c.concurrency
                    ),
                ));
            }
            for (j, d) in c.retry.delays.iter().enumerate() {
                let key = format!("consumers[{i}].retry.delays[{j}]");
                if d.is_zero() {
                    out.push(problem(key, quoted("0s"), "must be greater than zero"));
                } else if *d > MAX_RETRY_DELAY {
                    out.push(problem(
                        key,
                        quoted(&humantime::format_duration(*d).to_string()),
                        "must be at most 49d 17h 2m 47s 295ms (RabbitMQ's longest message TTL)",
                    ));
                } else if c.queue.len() <= crate::amqp::MAX_NAME_LEN
                    && let Some(p) =
                        name_problem(format!("consumers[{i}].queue"), &c.delay_queue(*d))
                {
                    out.push(problem(
                        p.key,
                        quoted(&crate::dead_letter::truncate(&c.queue, 40)),
                        format!(
                            "its delay queue {:?} {}",
                            crate::dead_letter::truncate(&c.delay_queue(*d), 40),
                            p.message
                        ),
                    ));
                }
            }
            if let Some(builtin) = crate::handlers::builtin(&c.handler) {
                for (k, value, message) in (builtin.problems)(c) {
                    out.push(problem(key(&k), value, message));
                }
            }
            if c.delivery_limit.is_some() && c.queue_type != super::settings::QueueType::Quorum {
                out.push(problem(
                    key("delivery_limit"),
                    c.delivery_limit.map(|n| n.to_string()),
                    "only quorum queues have a delivery limit: set queue_type = \"quorum\" or leave it out",
                ));
            }
            if c.delivery_limit == Some(0) {
                out.push(problem(
                    key("delivery_limit"),
                    Some("0".into()),
                    "must be at least 1",
                ));
            }
            for (k, name, derived) in [
                (
                    "dead_letter_exchange",
                    &c.dead_letter_exchange,
                    c.dead_letter_exchange(),
                ),
                (
                    "dead_letter_queue",
                    &c.dead_letter_queue,
                    c.dead_letter_queue(),
                ),
            ] {
                if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                    out.push(problem(
                        key(k),
                        quoted(""),
                        "must not be empty (leave it out for the default)",
                    ));
                } else if (name.is_some() || c.queue.len() <= crate::amqp::MAX_NAME_LEN)
                    && let Some(p) = name_problem(key(k), &derived)
                {
                    let message = if name.is_none() {
                        format!(
                            "the default name {p_msg} (a shorter queue name, or set {k})",
                            p_msg = p.message
                        )
                    } else {
                        p.message
                    };
                    out.push(problem(p.key, p.value, message));
                }
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
        _ => None,
    }
}
