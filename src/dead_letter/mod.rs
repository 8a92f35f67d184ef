//! Dead letters: why a message was given up on, the headers that say so, and
//! the operations behind `rabbit-guard dlq` (browse, replay, purge, export,
//! import).
//!
//! Every message rabbit-guard dead-letters is a copy published (with
//! publisher confirms) to the consumer's dead-letter exchange before the
//! original is acked, carrying the headers in [`headers`]. Messages the
//! broker dead-letters by itself (quorum delivery limit, TTL, max length)
//! reach the same queue through the work queue's `x-dead-letter-exchange`,
//! with the broker's `x-death` header instead.

use std::fmt;

mod browse;
pub mod json;
mod ops;
mod record;
mod select;

pub(crate) use browse::message_count;
pub use browse::{Browse, browse};
pub use ops::{
    ImportReport, MoveReport, Moved, ReplayOptions, import, purge, purge_all, replay, replay_target,
};
pub use record::{DeadLetter, HeaderOrigin};
pub use select::Selector;

/// Header names written by rabbit-guard.
pub mod headers {
    /// Attempt number of the next delivery (1-based; absent means 1). On a
    /// dead letter: the attempt that failed last.
    pub const ATTEMPT: &str = "rg-attempt";
    /// How many times the message was put back without counting an attempt
    /// because the dependency, not the message, was failing.
    pub const DEFERRALS: &str = "rg-deferrals";
    /// How many times its last attempt failed with no sign either way (no
    /// other call succeeded, the breaker did not trip); after 3 it is
    /// dead-lettered anyway.
    pub const INCONCLUSIVE: &str = "rg-inconclusive";
    /// Why the message was dead-lettered: see [`DeadLetterReason`](super::DeadLetterReason).
    pub const REASON: &str = "rg-reason";
    /// The error text (truncated to 4 KiB).
    pub const ERROR: &str = "rg-error";
    /// The handler kind that gave up on it.
    pub const HANDLER: &str = "rg-handler";
    /// The work queue it came from.
    pub const ORIGINAL_QUEUE: &str = "rg-original-queue";
    /// When it was dead-lettered, RFC 3339 UTC with milliseconds.
    pub const DEAD_LETTERED_AT: &str = "rg-dead-lettered-at";
    /// How many times `rabbit-guard dlq replay` sent it back to its queue.
    pub const REPLAYS: &str = "rg-replays";
    /// Headers a replay removes: the message starts over.
    pub const RESET_ON_REPLAY: &[&str] = &[
        ATTEMPT,
        DEFERRALS,
        INCONCLUSIVE,
        REASON,
        ERROR,
        HANDLER,
        ORIGINAL_QUEUE,
        DEAD_LETTERED_AT,
    ];
    /// Sender-selected distribution headers: the broker routes a message
    /// carrying them to every queue they name as well. Stripped from every
    /// copy rabbit-guard publishes (retries, dead letters, replays,
    /// imports), which must go to exactly one queue.
    pub const ROUTING_HEADERS: &[&str] = &["CC", "BCC"];
    /// Headers set by the broker when it dead-letters; stripped from our copies,
    /// since RabbitMQ 4 ignores (and 3.x trusts) client-set values.
    pub const BROKER_DEATH_HEADERS: &[&str] = &[
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    ];
}

/// Longest error text kept in the `rg-error` header.
pub const MAX_ERROR_LEN: usize = 4096;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The handler said the message is bad ([`HandlerError::Permanent`](crate::handler::HandlerError::Permanent)).
    Permanent,
    /// The body could not be decoded into the handler's message type.
    Decode,
    /// Transient failures through every retry delay, while the dependency was otherwise healthy.
    RetriesExhausted,
    /// The handler panicked.
    Panic,
    /// Prefetched when the breaker opened, with `on_pause = "dead-letter"`.
    Paused,
}

impl DeadLetterReason {
    /// The value of the `rg-reason` header.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::Decode => "decode",
            Self::RetriesExhausted => "retries-exhausted",
            Self::Panic => "panic",
            Self::Paused => "paused",
        }
    }

    /// Index in [`ALL`](Self::ALL).
    #[must_use]
    pub fn index(&self) -> usize {
        match self {
            Self::Permanent => 0,
            Self::Decode => 1,
            Self::RetriesExhausted => 2,
            Self::Panic => 3,
            Self::Paused => 4,
        }
    }

    /// All reasons, for help texts and metrics.
    pub const ALL: [DeadLetterReason; 5] = [
        Self::Permanent,
        Self::Decode,
        Self::RetriesExhausted,
        Self::Panic,
        Self::Paused,
    ];
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
#[must_use]
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
