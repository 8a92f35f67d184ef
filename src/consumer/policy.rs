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
    /// The handler asked for another try, not the dependency's fault.
    Retry(String),
    /// The call outlived `call_timeout` and was cancelled.
    TimedOut(Duration),
    Permanent(String),
    Decode(String),
    Panic(String),
}

impl Outcome {
    /// Index in [`HANDLER_OUTCOMES`](super::HANDLER_OUTCOMES).
    pub(crate) fn index(&self) -> usize {
        match self {
            Outcome::Success => 0,
            Outcome::Transient(_) => 1,
            Outcome::Retry(_) => 2,
            Outcome::TimedOut(_) => 3,
            Outcome::Permanent(_) => 4,
            Outcome::Decode(_) => 5,
            Outcome::Panic(_) => 6,
        }
    }

    /// Its name: the histogram's `outcome` label and the failure log's kind.
    pub(crate) fn name(&self) -> &'static str {
        super::HANDLER_OUTCOMES[self.index()]
    }

    /// Worth calling again: the dependency failed or the handler asked.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            Outcome::Transient(_) | Outcome::TimedOut(_) | Outcome::Retry(_)
        )
    }

    pub(crate) fn error_text(&self) -> String {
        match self {
            Outcome::Success => String::new(),
            Outcome::Transient(e)
            | Outcome::Retry(e)
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

pub(crate) use crate::amqp::headers::MAX_INCONCLUSIVE;

/// The shortest delay level at least `wait` long, if any.
pub(crate) fn level_at_least(delays: &[Duration], wait: Duration) -> Option<usize> {
    delays
        .iter()
        .enumerate()
        .filter(|(_, d)| **d >= wait)
        .min_by_key(|(_, d)| **d)
        .map(|(i, _)| i)
}

/// The outcome's error text says why a message is dead-lettered when the
/// handler asked for a wait longer than every delay level.
pub(crate) fn with_wait_note(
    outcome: Outcome,
    retry_after: Option<Duration>,
    delays: &[Duration],
) -> Outcome {
    let Some(wait) = retry_after else {
        return outcome;
    };
    if level_at_least(delays, wait).is_some() {
        return outcome;
    }
    let note = |e: String| {
        let longest = delays.iter().max().map_or_else(
            || "none".to_owned(),
            |d| humantime::format_duration(*d).to_string(),
        );
        format!(
            "{e} (retry_after {} is longer than every retry delay; the longest is {longest})",
            humantime::format_duration(wait)
        )
    };
    match outcome {
        Outcome::Transient(e) => Outcome::Transient(note(e)),
        Outcome::Retry(e) => Outcome::Retry(note(e)),
        other => other,
    }
}

/// Decides what to do with a message.
///
/// `outage_suspected` is true when the call was a half-open probe or the
/// breaker was no longer closed right after recording it: such a failure is
/// the dependency's, not the message's, and must not use up an attempt.
/// `retry_after` (the handler's wish) picks the delay level of a counted
/// retry: the shortest at least that long; none that long dead-letters.
pub(crate) fn decide(
    outcome: &Outcome,
    attempt: u32,
    delays: &[Duration],
    retry_after: Option<Duration>,
    outage_suspected: bool,
) -> Decision {
    let final_ = Decision::Final;
    let attempt = attempt.max(1);
    // `Some(None)`: a wait no level is long enough for.
    let wanted = retry_after.map(|wait| level_at_least(delays, wait));
    let counted_retry = || match wanted.unwrap_or(Some(attempt as usize - 1)) {
        Some(level) => Disposition::Retry {
            level,
            next_attempt: attempt + 1,
        },
        None => Disposition::DeadLetter(DeadLetterReason::RetriesExhausted),
    };
    match outcome {
        Outcome::Success => final_(Disposition::Ack),
        Outcome::Permanent(_) => final_(Disposition::DeadLetter(DeadLetterReason::Permanent)),
        Outcome::Decode(_) => final_(Disposition::DeadLetter(DeadLetterReason::Decode)),
        Outcome::Panic(_) => final_(Disposition::DeadLetter(DeadLetterReason::Panic)),
        // Not the dependency's fault: no outage deferral, no verdict.
        Outcome::Retry(_) if (attempt as usize) <= delays.len() => final_(counted_retry()),
        Outcome::Retry(_) => final_(Disposition::DeadLetter(DeadLetterReason::RetriesExhausted)),
        Outcome::Transient(_) | Outcome::TimedOut(_) => {
            if outage_suspected {
                // An outage never dead-letters; a longer wait than the
                // attempt's own level is honoured where a level allows it.
                let own = defer_level(attempt, delays.len());
                let level = match (own, wanted) {
                    (Some(own), Some(Some(w))) => {
                        Some(if delays[w] > delays[own] { w } else { own })
                    }
                    (Some(_), Some(None)) => Some(longest_level(delays)),
                    (own, _) => own,
                };
                final_(Disposition::Defer {
                    level,
                    inconclusive: false,
                })
            } else if (attempt as usize) <= delays.len() {
                final_(counted_retry())
            } else {
                Decision::NeedsVerdict
            }
        }
    }
}

/// The index of the longest delay (0 when there is one level).
fn longest_level(delays: &[Duration]) -> usize {
    delays
        .iter()
        .enumerate()
        .max_by_key(|(_, d)| **d)
        .map_or(0, |(i, _)| i)
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

    /// `decide` with `delays` levels of 1 s, 2 s, …, no wait asked for.
    fn decide(outcome: &Outcome, attempt: u32, delays: usize, outage: bool) -> Decision {
        super::decide(outcome, attempt, &levels(delays), None, outage)
    }

    fn levels(n: usize) -> Vec<Duration> {
        (1..=n as u64).map(Duration::from_secs).collect()
    }

    fn fin(d: Disposition) -> Decision {
        Decision::Final(d)
    }

    fn transient() -> Outcome {
        Outcome::Transient("503".into())
    }

    #[test]
    fn each_outcome_is_named_by_its_own_label() {
        let named = [
            (Outcome::Success, "success"),
            (transient(), "transient"),
            (Outcome::Retry("r".into()), "retry"),
            (Outcome::TimedOut(Duration::from_secs(1)), "timeout"),
            (Outcome::Permanent("p".into()), "permanent"),
            (Outcome::Decode("d".into()), "decode"),
            (Outcome::Panic("x".into()), "panic"),
        ];
        for (outcome, name) in named {
            assert_eq!(outcome.name(), name, "{outcome:?}");
        }
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

    #[test]
    fn retry_after_picks_the_shortest_level_at_least_that_long() {
        let delays = [
            Duration::from_secs(5),
            Duration::from_secs(120),
            Duration::from_secs(30),
        ];
        let wait = |secs| {
            super::decide(
                &transient(),
                1,
                &delays,
                Some(Duration::from_secs(secs)),
                false,
            )
        };
        let retry = |level| {
            fin(Disposition::Retry {
                level,
                next_attempt: 2,
            })
        };
        assert_eq!(wait(1), retry(0));
        assert_eq!(wait(5), retry(0));
        assert_eq!(
            wait(6),
            retry(2),
            "30 s is the shortest level of at least 6 s"
        );
        assert_eq!(wait(31), retry(1));
        assert_eq!(
            wait(121),
            fin(Disposition::DeadLetter(DeadLetterReason::RetriesExhausted)),
            "no level waits that long"
        );
        // The attempt still counts: past the last level the usual verdict.
        assert_eq!(
            super::decide(
                &transient(),
                4,
                &delays,
                Some(Duration::from_secs(1)),
                false
            ),
            Decision::NeedsVerdict
        );
        // An outage never dead-letters; the longer of the two waits is kept.
        assert_eq!(
            super::decide(
                &transient(),
                1,
                &delays,
                Some(Duration::from_secs(600)),
                true
            ),
            fin(defer(Some(1), false))
        );
        assert_eq!(
            super::decide(&transient(), 3, &delays, Some(Duration::from_secs(6)), true),
            fin(defer(Some(2), false)),
            "attempt 3's own level (30 s) is longer than the 6 s asked for"
        );
        let noted = with_wait_note(transient(), Some(Duration::from_secs(600)), &delays);
        assert!(
            noted
                .error_text()
                .contains("retry_after 10m is longer than every retry delay; the longest is 2m"),
            "{noted:?}"
        );
        assert_eq!(
            with_wait_note(transient(), Some(Duration::from_secs(6)), &delays),
            transient()
        );
    }

    #[test]
    fn retry_is_counted_without_outage_deferral_or_verdict() {
        let retry = Outcome::Retry("row locked".into());
        assert_eq!(
            decide(&retry, 1, 2, true),
            fin(Disposition::Retry {
                level: 0,
                next_attempt: 2
            }),
            "not the dependency's fault: an open breaker does not make it a deferral"
        );
        assert_eq!(
            decide(&retry, 3, 2, false),
            fin(Disposition::DeadLetter(DeadLetterReason::RetriesExhausted))
        );
        assert_eq!(
            decide(&retry, 1, 0, false),
            fin(Disposition::DeadLetter(DeadLetterReason::RetriesExhausted))
        );
    }
}
