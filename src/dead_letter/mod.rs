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
pub(crate) mod json;
mod ops;
mod record;
mod select;

#[cfg(feature = "cli")]
pub(crate) use browse::message_count;
pub use browse::{Browse, browse};
pub use ops::{
    ImportReport, MoveReport, Moved, NoReplayTarget, ReplayOptions, import, purge, purge_all,
    replay, replay_target,
};
pub use record::{BrokerVersion, DeadLetter, HeaderOrigin};
pub use select::Selector;

/// Header names written by rabbit-guard (defined with the AMQP layer).
pub use crate::amqp::headers;

/// Longest error text kept in the `rg-error` header.
pub const MAX_ERROR_LEN: usize = 4096;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The handler said the message is bad ([`HandlerError::permanent`](crate::handler::HandlerError::permanent)).
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

pub use crate::text::truncate;
