//! The probe lease of one breaker, as this worker sees it.
//!
//! The lease is the exclusive queue `EXCHANGE.lease.BREAKER`: the broker
//! gives it to one connection and deletes it when that connection closes.
//! A lease this worker could not take is not proof that a live worker holds
//! it (anyone with configure rights can declare that queue), so the holder
//! announces it in its heartbeats, and a worker that sees no live holder for
//! about two open periods probes on its own, says so in its log, and shows
//! a `fleet.lease` problem until the lease is back in a member's hands.

use std::time::Duration;

use tokio::time::Instant;

/// What an attempt to take the lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// This worker's connection holds it now.
    Won,
    /// Another connection holds it exclusively.
    Locked,
    /// The queue exists and is not exclusive: declared outside the fleet.
    Squatted,
    /// The broker refused the attempt (permissions, say).
    Failed(String),
}

/// What the worker must do after an attempt or a change in who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// This worker runs the breaker's trials for the fleet.
    Holds,
    /// A live member holds it: wait for its verdict.
    Wait,
    /// No member holds it: probe here, with the reason (a problem to show).
    ProbeHere(String),
}

/// One breaker's probe lease on this worker.
#[derive(Debug, Default)]
pub(crate) struct Lease {
    pub held: bool,
    pub next_attempt: Option<Instant>,
    /// Since when it was found locked with no live holder announced.
    unheld_since: Option<Instant>,
    /// While probing here without the lease: why.
    pub problem: Option<String>,
}

impl Lease {
    /// Applies an attempt's result. `holder`: the member announcing it,
    /// if one was heard within `fresh`; `retry`: when to try again.
    pub(crate) fn after(
        &mut self,
        attempt: Attempt,
        holder: Option<&str>,
        queue: &str,
        fresh: Duration,
        retry: Duration,
        now: Instant,
    ) -> Decision {
        self.held = attempt == Attempt::Won;
        self.next_attempt = (!self.held).then(|| now + retry);
        let decision = match attempt {
            Attempt::Won => Decision::Holds,
            Attempt::Locked => match holder {
                Some(_) => Decision::Wait,
                None => {
                    let since = *self.unheld_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= fresh {
                        Decision::ProbeHere(format!(
                            "the probe lease {queue:?} is held by a connection that is not a live fleet member \
                             (no worker has announced holding it for {}): probing here; find it with \
                             `rabbitmqctl list_queues name owner_pid exclusive | grep lease`",
                            humantime::format_duration(Duration::from_secs(fresh.as_secs().max(1)))
                        ))
                    } else {
                        // Try again well before giving up on it.
                        self.next_attempt = Some(now + retry.min(fresh / 4));
                        Decision::Wait
                    }
                }
            },
            Attempt::Squatted => Decision::ProbeHere(format!(
                "the probe lease {queue:?} exists and is not exclusive: someone declared it outside the fleet, \
                 so no worker can hold it; probing here. Delete it (`rabbitmqctl delete_queue {queue}`) and deny \
                 configure rights on the lease queues to everyone but the fleet's user (see the README's Fleet section)"
            )),
            Attempt::Failed(why) => Decision::ProbeHere(format!(
                "cannot take the probe lease {queue:?} ({why}): probing here; the fleet's user needs configure \
                 permission on the lease queues"
            )),
        };
        if self.held || holder.is_some() {
            self.unheld_since = None;
        }
        self.problem = match &decision {
            Decision::ProbeHere(why) => Some(why.clone()),
            _ => None,
        };
        decision
    }

    /// A member announced holding it: stop probing here.
    pub(crate) fn holder_heard(&mut self) -> bool {
        self.unheld_since = None;
        self.problem.take().is_some()
    }

    /// The fleet was lost: the broker freed the leases with the connection
    /// (or will), and each worker probes for itself.
    pub(crate) fn forget(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Duration = Duration::from_secs(4);
    const RETRY: Duration = Duration::from_secs(2);

    #[tokio::test(start_paused = true)]
    async fn a_lease_no_live_member_holds_is_probed_around_after_two_open_periods() {
        let mut l = Lease::default();
        let q = "x.lease.dep";
        assert_eq!(
            l.after(Attempt::Locked, None, q, FRESH, RETRY, Instant::now()),
            Decision::Wait
        );
        assert!(l.problem.is_none());
        tokio::time::advance(FRESH / 2).await;
        assert_eq!(
            l.after(Attempt::Locked, None, q, FRESH, RETRY, Instant::now()),
            Decision::Wait
        );
        tokio::time::advance(FRESH / 2).await;
        let d = l.after(Attempt::Locked, None, q, FRESH, RETRY, Instant::now());
        assert!(
            matches!(d, Decision::ProbeHere(ref why) if why.contains("not a live fleet member")),
            "{d:?}"
        );
        assert!(l.problem.is_some());
        // A member announces it: back to waiting for its verdict.
        assert!(l.holder_heard());
        assert_eq!(
            l.after(
                Attempt::Locked,
                Some("w2#1"),
                q,
                FRESH,
                RETRY,
                Instant::now()
            ),
            Decision::Wait
        );
        assert!(l.problem.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_squatted_or_refused_lease_is_probed_around_at_once_and_a_won_one_clears_it() {
        let mut l = Lease::default();
        let q = "x.lease.dep";
        let d = l.after(Attempt::Squatted, None, q, FRESH, RETRY, Instant::now());
        assert!(
            matches!(d, Decision::ProbeHere(ref why) if why.contains("not exclusive")),
            "{d:?}"
        );
        let d = l.after(
            Attempt::Failed("ACCESS_REFUSED".into()),
            None,
            q,
            FRESH,
            RETRY,
            Instant::now(),
        );
        assert!(matches!(d, Decision::ProbeHere(ref why) if why.contains("configure permission")));
        assert_eq!(
            l.after(Attempt::Won, None, q, FRESH, RETRY, Instant::now()),
            Decision::Holds
        );
        assert!(l.held && l.problem.is_none() && l.next_attempt.is_none());
    }
}
