//! Why handlers fail, in the log, without flooding it.
//!
//! Every failed handling is one `debug` line (queue, message id, attempt,
//! what happens to the message, the error). At `warn` the first failure of
//! a kind is logged at once; after that, one line per queue and kind every
//! `log.failure_summary_every` (10 s by default) with how many there were
//! and one example. A kind is the outcome, what happened to the messages
//! (`retry`, `put back`, `dead-letter`: a summary never mixes them) and the
//! error text with its digits and ids folded, so a dependency answering
//! 422 for every message of a flood gives a handful of lines naming 422,
//! not one per message. When a breaker changes state, the summaries of its
//! consumers are written at once, before the transition's own line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

/// Kinds kept apart per consumer; more fold into one.
const MAX_KINDS: usize = 64;

/// One failure, as the log sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failure<'a> {
    /// `transient`, `timeout`, `permanent`, `decode` or `panic`.
    pub(crate) outcome: &'a str,
    /// What happens to the message: `retry`, `dead-letter`, `put back`.
    pub(crate) action: &'a str,
    /// The error text.
    pub(crate) error: &'a str,
    /// The message id, or `-`.
    pub(crate) message_id: &'a str,
    /// The attempt that failed.
    pub(crate) attempt: u32,
}

#[derive(Debug)]
struct Kind {
    /// Failures since the last line.
    pending: u64,
    /// When the last line was written.
    logged_at: Instant,
    example_id: String,
    example_error: String,
    outcome: String,
    action: String,
}

/// One consumer's failure summaries.
#[derive(Debug)]
pub(crate) struct FailureLog {
    queue: std::sync::Arc<str>,
    every: Duration,
    kinds: Mutex<HashMap<String, Kind>>,
}

/// The error text with what varies between messages folded: runs of digits
/// become `#` and long hex-like words `…`, cut to 120 characters.
fn kind_of(outcome: &str, action: &str, error: &str) -> String {
    let mut out = String::with_capacity(outcome.len() + action.len() + 2 + error.len().min(120));
    out.push_str(outcome);
    out.push(' ');
    out.push_str(action);
    out.push(' ');
    let mut last_digit = false;
    for word in error.split_whitespace().take(40) {
        let hexish = word.len() >= 12
            && word.chars().filter(char::is_ascii_hexdigit).count() * 4 >= word.len() * 3;
        if hexish {
            out.push('…');
        } else {
            for c in word.chars() {
                if c.is_ascii_digit() {
                    if !last_digit {
                        out.push('#');
                    }
                    last_digit = true;
                } else {
                    out.push(c);
                    last_digit = false;
                }
            }
        }
        out.push(' ');
        last_digit = false;
        if out.len() >= 120 {
            break;
        }
    }
    out
}

impl FailureLog {
    pub(crate) fn new(queue: std::sync::Arc<str>, every: Duration) -> Self {
        Self {
            queue,
            every,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Logs `failure`: always at debug; at warn when it is the first of its
    /// kind or a summary is due.
    pub(crate) fn record(&self, failure: &Failure<'_>, now: Instant) {
        debug!(
            queue = %self.queue,
            message_id = %failure.message_id,
            attempt = failure.attempt,
            outcome = failure.outcome,
            action = failure.action,
            error = %failure.error,
            "handler failed"
        );
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut key = kind_of(failure.outcome, failure.action, failure.error);
        if kinds.len() >= MAX_KINDS && !kinds.contains_key(&key) {
            key = format!("{} {} (other errors)", failure.outcome, failure.action);
        }
        match kinds.get_mut(&key) {
            None => {
                warn!(
                    queue = %self.queue,
                    message_id = %failure.message_id,
                    attempt = failure.attempt,
                    outcome = failure.outcome,
                    action = failure.action,
                    error = %failure.error,
                    "handler failed (first of its kind; more are summed up every {})",
                    humantime::format_duration(self.every)
                );
                kinds.insert(
                    key,
                    Kind {
                        pending: 0,
                        logged_at: now,
                        example_id: String::new(),
                        example_error: String::new(),
                        outcome: failure.outcome.to_owned(),
                        action: failure.action.to_owned(),
                    },
                );
            }
            Some(kind) => {
                kind.pending += 1;
                failure.message_id.clone_into(&mut kind.example_id);
                failure.error.clone_into(&mut kind.example_error);
                if now.saturating_duration_since(kind.logged_at) >= self.every {
                    self.summary(kind, now);
                }
            }
        }
    }

    /// Writes the summaries that are due (called every `every` by the
    /// worker, so a flood that stops is still counted), or with `all` every
    /// pending one (at shutdown).
    pub(crate) fn flush(&self, now: Instant, all: bool) {
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for kind in kinds.values_mut() {
            if kind.pending > 0
                && (all || now.saturating_duration_since(kind.logged_at) >= self.every)
            {
                self.summary(kind, now);
            }
        }
        // Kinds quiet for a long while start over (their next failure is a
        // "first" again), so the map does not keep every error ever seen.
        kinds.retain(|_, k| {
            k.pending > 0 || now.saturating_duration_since(k.logged_at) < self.every * 30
        });
    }

    fn summary(&self, kind: &mut Kind, now: Instant) {
        warn!(
            queue = %self.queue,
            failures = kind.pending,
            over = %humantime::format_duration(round_s(now.saturating_duration_since(kind.logged_at))),
            outcome = kind.outcome.as_str(),
            action = kind.action.as_str(),
            example_message_id = %kind.example_id,
            error = %kind.example_error,
            "handler failures"
        );
        kind.pending = 0;
        kind.logged_at = now;
    }
}

fn round_s(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_fold_what_varies_between_messages() {
        let a = kind_of(
            "permanent",
            "dead-letter",
            "POST http://h/orders/1042: 422 Unprocessable Entity: order 1042 has no amount",
        );
        let b = kind_of(
            "permanent",
            "dead-letter",
            "POST http://h/orders/77: 422 Unprocessable Entity: order 77 has no amount",
        );
        assert_eq!(a, b);
        assert!(a.contains("#"), "{a}");
        let c = kind_of(
            "transient",
            "retry",
            "POST http://h/orders/77: 503 Service Unavailable",
        );
        assert_ne!(a, c);
        let d = kind_of(
            "permanent",
            "dead-letter",
            "id 3f2b8a9c0d1e4f5a6b7c8d9e0f1a2b3c missing",
        );
        let e = kind_of(
            "permanent",
            "dead-letter",
            "id 0a1b2c3d4e5f60718293a4b5c6d7e8f9 missing",
        );
        assert_eq!(d, e, "ids fold too");
        let put_back = kind_of(
            "transient",
            "put back",
            "POST http://h/orders/77: 503 Service Unavailable",
        );
        assert_ne!(
            c, put_back,
            "a summary never mixes what happened to the messages"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_summed_up_not_repeated() {
        let log = FailureLog::new("orders".into(), Duration::from_secs(10));
        let start = Instant::now();
        for i in 0..500u32 {
            let id = format!("m-{i}");
            let error = format!("POST http://h/orders/{i}: 422 Unprocessable Entity");
            let f = Failure {
                outcome: "permanent",
                action: "dead-letter",
                error: &error,
                message_id: &id,
                attempt: 1,
            };
            log.record(&f, start + Duration::from_millis(u64::from(i) * 2));
        }
        let kinds = log.kinds.lock().unwrap();
        assert_eq!(kinds.len(), 1, "one kind for the whole flood");
        let kind = kinds.values().next().unwrap();
        assert_eq!(kind.pending, 499, "all but the first wait for the summary");
        drop(kinds);
        log.flush(start + Duration::from_secs(11), false);
        let kinds = log.kinds.lock().unwrap();
        assert_eq!(
            kinds.values().next().unwrap().pending,
            0,
            "the summary took them"
        );
    }
}
