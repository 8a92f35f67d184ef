//! The ack policy: what happens to a message after its handler ran. Pure,
//! so every row of the outcome table is unit-tested.

use std::time::Duration;

use crate::breaker::HealthVerdict;
use crate::dead_letter::DeadLetterReason;

/// How a handler call ended, timeouts and panics included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// The handler said the dependency failed.
    Transient(String),
    /// The call outlived `call_timeout` and was cancelled.
    TimedOut(Duration),
    Permanent(String),
    Decode(String),
    Panic(String),
}

impl Outcome {
    pub(crate) fn error_text(&self) -> String {
        match self {
            Outcome::Success => String::new(),
            Outcome::Transient(e)
            | Outcome::Permanent(e)
            | Outcome::Decode(e)
            | Outcome::Panic(e) => e.clone(),
            Outcome::TimedOut(d) => format!(
                "handler did not finish within call_timeout ({})",
                humantime::format_duration(*d)
            ),
        }
    }
}

/// Where a message goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Done: ack it.
    Ack,
    /// Publish a copy to the dead-letter exchange, then ack.
    DeadLetter(DeadLetterReason),
    /// Counted attempt: copy to delay queue `level` with `rg-attempt = next_attempt`, then ack.
    Retry { level: usize, next_attempt: u32 },
    /// Not counted (the dependency's fault): copy to delay queue `level`, or to
    /// the tail of the work queue when there are no delays, with the attempt
    /// unchanged and `rg-deferrals` + 1 (and `rg-inconclusive` + 1 when
    /// `inconclusive`: nothing told an outage from a bad message), then ack.
    Defer {
        level: Option<usize>,
        inconclusive: bool,
    },
}

/// What [`decide`] says: where the message goes, or that the breaker must be
/// asked first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Where it goes.
    Final(Disposition),
    /// The last attempt failed while the breaker stayed closed: ask the
    /// breaker whether the dependency is otherwise healthy, then call
    /// [`after_verdict`] for the disposition. (A separate variant, so an
    /// unresolved verdict cannot reach the code that applies dispositions.)
    NeedsVerdict,
}

/// Longest wait for a health verdict (shorter when the breaker's window is).
pub(crate) const MAX_VERDICT_WAIT: Duration = Duration::from_secs(2);

/// Inconclusive last attempts after which the message is dead-lettered
/// anyway, so a lone bad message in an idle queue can't cycle forever. Only
/// failures with no verdict either way count; outage deferrals never do.
pub(crate) const MAX_INCONCLUSIVE: u32 = 3;

/// Decides what to do with a message.
///
/// `outage_suspected` is true when the call was a half-open probe or the
/// breaker was no longer closed right after recording it: such a failure is
/// the dependency's, not the message's, and must not use up an attempt.
pub(crate) fn decide(
    outcome: &Outcome,
    attempt: u32,
    delays: usize,
    outage_suspected: bool,
) -> Decision {
    let final_ = Decision::Final;
    match outcome {
        Outcome::Success => final_(Disposition::Ack),
        Outcome::Permanent(_) => final_(Disposition::DeadLetter(DeadLetterReason::Permanent)),
        Outcome::Decode(_) => final_(Disposition::DeadLetter(DeadLetterReason::Decode)),
        Outcome::Panic(_) => final_(Disposition::DeadLetter(DeadLetterReason::Panic)),
        Outcome::Transient(_) | Outcome::TimedOut(_) => {
            let attempt = attempt.max(1);
            if outage_suspected {
                final_(Disposition::Defer {
                    level: defer_level(attempt, delays),
                    inconclusive: false,
                })
            } else if (attempt as usize) <= delays {
                final_(Disposition::Retry {
                    level: attempt as usize - 1,
                    next_attempt: attempt + 1,
                })
            } else {
                Decision::NeedsVerdict
            }
        }
    }
}

/// The delay level a deferred message waits in: the one its current attempt
/// would use, so deferring never shortens or lengthens its schedule.
pub(crate) fn defer_level(attempt: u32, delays: usize) -> Option<usize> {
    (delays > 0).then(|| (attempt.max(1) as usize - 1).min(delays - 1))
}

/// The last attempt failed; `verdict` says what the neighbours saw.
/// `inconclusive` is how many earlier last attempts ended with no verdict.
pub(crate) fn after_verdict(
    verdict: HealthVerdict,
    attempt: u32,
    inconclusive: u32,
    delays: usize,
) -> Disposition {
    let level = defer_level(attempt, delays);
    match verdict {
        HealthVerdict::Healthy => Disposition::DeadLetter(DeadLetterReason::RetriesExhausted),
        HealthVerdict::Outage => Disposition::Defer {
            level,
            inconclusive: false,
        },
        HealthVerdict::Unknown if inconclusive >= MAX_INCONCLUSIVE => {
            Disposition::DeadLetter(DeadLetterReason::RetriesExhausted)
        }
        HealthVerdict::Unknown => Disposition::Defer {
            level,
            inconclusive: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `decide`'s disposition, when it has one.
    fn decide(outcome: &Outcome, attempt: u32, delays: usize, outage: bool) -> Decision {
        super::decide(outcome, attempt, delays, outage)
    }

    fn fin(d: Disposition) -> Decision {
        Decision::Final(d)
    }

    fn transient() -> Outcome {
        Outcome::Transient("503".into())
    }

    #[test]
    fn outcome_table() {
        assert_eq!(
            decide(&Outcome::Success, 1, 2, false),
            fin(Disposition::Ack)
        );
        assert_eq!(
            decide(&Outcome::Permanent("bad".into()), 1, 2, false),
            fin(Disposition::DeadLetter(DeadLetterReason::Permanent))
        );
        assert_eq!(
            decide(&Outcome::Decode("json".into()), 1, 2, true),
            fin(Disposition::DeadLetter(DeadLetterReason::Decode))
        );
        assert_eq!(
            decide(&Outcome::Panic("boom".into()), 1, 2, false),
            fin(Disposition::DeadLetter(DeadLetterReason::Panic))
        );
    }

    #[test]
    fn transient_failures_walk_the_delay_levels_then_need_a_verdict() {
        assert_eq!(
            decide(&transient(), 1, 2, false),
            fin(Disposition::Retry {
                level: 0,
                next_attempt: 2
            })
        );
        assert_eq!(
            decide(&Outcome::TimedOut(Duration::from_secs(3)), 2, 2, false),
            fin(Disposition::Retry {
                level: 1,
                next_attempt: 3
            })
        );
        assert_eq!(decide(&transient(), 3, 2, false), Decision::NeedsVerdict);
        assert_eq!(decide(&transient(), 1, 0, false), Decision::NeedsVerdict);
    }

    fn defer(level: Option<usize>, inconclusive: bool) -> Disposition {
        Disposition::Defer {
            level,
            inconclusive,
        }
    }

    #[test]
    fn outage_failures_are_deferred_without_counting() {
        assert_eq!(decide(&transient(), 1, 2, true), fin(defer(Some(0), false)));
        assert_eq!(decide(&transient(), 3, 2, true), fin(defer(Some(1), false)));
        assert_eq!(decide(&transient(), 1, 0, true), fin(defer(None, false)));
    }

    #[test]
    fn last_attempt_is_dead_lettered_only_when_the_dependency_is_otherwise_healthy() {
        assert_eq!(
            after_verdict(HealthVerdict::Healthy, 3, 0, 2),
            Disposition::DeadLetter(DeadLetterReason::RetriesExhausted)
        );
        assert_eq!(
            after_verdict(HealthVerdict::Outage, 3, MAX_INCONCLUSIVE, 2),
            defer(Some(1), false),
            "an outage never exhausts retries, however often it happened"
        );
        assert_eq!(
            after_verdict(HealthVerdict::Unknown, 3, 0, 2),
            defer(Some(1), true)
        );
        assert_eq!(
            after_verdict(HealthVerdict::Unknown, 3, MAX_INCONCLUSIVE, 2),
            Disposition::DeadLetter(DeadLetterReason::RetriesExhausted)
        );
    }
}
