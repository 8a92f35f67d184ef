//! Half-open probes, as one consumer sees them: the permits it reserves
//! before subscribing (so it takes exactly as many messages as it may probe
//! with), when it hands an unused reservation to the other consumers of the
//! breaker, and whether it is done with the current trial.
//!
//! A pure state machine over [`Breaker`] permits: the session does the I/O
//! (subscribing, cancelling) and tells it what happened.

use tokio::time::Instant;

use crate::breaker::{BreakerSet, BreakerState, Permits};

/// One consumer's part in the breaker's half-open trials.
#[derive(Debug, Default)]
pub(super) struct Probes {
    /// Probe permits (one from each breaker of the consumer) taken for
    /// `trial` and not used yet.
    reserved: Vec<Permits>,
    /// The trial `reserved` belongs to.
    trial: Option<u64>,
    /// When an unused reservation is handed to the other consumers.
    hand_over_at: Option<Instant>,
    /// The trial this consumer has taken its probes for: it subscribes no
    /// more until that trial ends.
    done: Option<u64>,
}

impl Probes {
    /// Takes as many probe permits of `trial` as the breakers still have
    /// (up to `half_open_probes`, the fewest of the half-open ones); returns
    /// how many are reserved now.
    pub(super) fn reserve(&mut self, breakers: &BreakerSet, trial: u64) -> usize {
        let probes = breakers.probes_per_trial();
        while self.reserved.len() < probes {
            match breakers.try_acquire() {
                Ok(permits) if permits.trial() == Some(trial) => {
                    self.reserved.push(permits);
                }
                // Another trial, or closed meanwhile: the state watch will tell.
                Ok(_) | Err(_) => break,
            }
        }
        if !self.reserved.is_empty() {
            self.trial = Some(trial);
        }
        self.reserved.len()
    }

    /// Reserved permits not used yet.
    #[cfg(test)]
    pub(super) fn reserved(&self) -> usize {
        self.reserved.len()
    }

    /// True when no permit is reserved.
    pub(super) fn is_empty(&self) -> bool {
        self.reserved.is_empty()
    }

    /// One reserved permit, to start a probe with.
    pub(super) fn take(&mut self) -> Option<Permits> {
        let permit = self.reserved.pop()?;
        if self.reserved.is_empty() {
            self.trial = None;
            self.hand_over_at = None;
        }
        Some(permit)
    }

    /// Gives every unused permit back to the breaker (which frees their
    /// slots for other consumers).
    pub(super) fn release(&mut self) {
        self.reserved.clear();
        self.trial = None;
        self.hand_over_at = None;
    }

    /// Releases the reservation if its trial is over: permits of a finished
    /// trial must never reach the dependency.
    pub(super) fn release_if_over(&mut self, state: BreakerState) {
        if let Some(trial) = self.trial
            && state != (BreakerState::HalfOpen { trial })
        {
            self.release();
        }
    }

    /// With other consumers on the breaker: hand the reservation over if it
    /// is still unused at `at`.
    pub(super) fn hand_over_at(&mut self, at: Instant) {
        self.hand_over_at = Some(at);
    }

    /// When the reservation is to be handed over, if it is.
    pub(super) fn hand_over_deadline(&self) -> Option<Instant> {
        self.hand_over_at
    }

    /// The trial the reservation is for, while it holds permits.
    pub(super) fn trial(&self) -> Option<u64> {
        self.trial
    }

    /// The reservation for `trial` (read before its last permits were put
    /// to use) timed out: release what is left, and be done with that trial
    /// (the others probe with the permits).
    pub(super) fn expire(&mut self, trial: Option<u64>) {
        self.release();
        if let Some(trial) = trial {
            self.done = Some(trial);
        }
    }

    /// This consumer has taken its probes for `trial`.
    pub(super) fn mark_done(&mut self, trial: u64) {
        self.done = Some(trial);
    }

    /// True when this consumer is done with `trial`.
    pub(super) fn is_done(&self, trial: u64) -> bool {
        self.done == Some(trial)
    }

    /// A probe slot came free (a probe told nothing, or another consumer
    /// gave its reservation back): a consumer that stopped after taking its
    /// probes for the current trial may try again.
    pub(super) fn slot_released(&mut self, state: BreakerState) {
        if let BreakerState::HalfOpen { trial } = state
            && self.done == Some(trial)
            && self.reserved.is_empty()
        {
            self.done = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::breaker::{Breaker, BreakerConfig, CallOutcome};

    /// A breaker with `probes` half-open probes, tripped and moved on to its
    /// first half-open trial.
    async fn half_open(probes: u32) -> (BreakerSet, u64) {
        let breaker = Breaker::new(
            "dep",
            BreakerConfig {
                minimum_calls: 2,
                half_open_probes: probes,
                open_timeout: Duration::from_secs(1),
                ..BreakerConfig::default()
            },
        );
        for _ in 0..2 {
            breaker.try_acquire().unwrap().record(CallOutcome::Failure);
        }
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
        tokio::time::advance(Duration::from_secs(1)).await;
        breaker.check_open_timer();
        let BreakerState::HalfOpen { trial } = breaker.state() else {
            panic!("half-open after the open time: {:?}", breaker.state());
        };
        (BreakerSet::new(vec![breaker]), trial)
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_reserves_exactly_the_probes_left() {
        let (breaker, trial) = half_open(3).await;
        let (mut a, mut b) = (Probes::default(), Probes::default());
        assert_eq!(
            a.reserve(&breaker, trial),
            3,
            "the first consumer takes all three"
        );
        assert_eq!(
            b.reserve(&breaker, trial),
            0,
            "none are left for the second"
        );
        assert!(b.is_empty());
        let permit = a.take().expect("a reserved permit");
        assert!(permit.is_probe());
        assert_eq!(a.reserved(), 2);
        a.release();
        assert_eq!(
            b.reserve(&breaker, trial),
            2,
            "released permits go back to the breaker for the others"
        );
        drop(permit);
    }

    #[tokio::test(start_paused = true)]
    async fn permits_of_a_finished_trial_are_dropped() {
        let (breaker, trial) = half_open(2).await;
        let mut p = Probes::default();
        p.reserve(&breaker, trial);
        p.release_if_over(BreakerState::HalfOpen { trial });
        assert_eq!(p.reserved(), 2, "the trial goes on: keep them");
        p.release_if_over(BreakerState::HalfOpen { trial: trial + 1 });
        assert!(p.is_empty(), "another trial: drop them");
        p.reserve(&breaker, trial);
        p.release_if_over(BreakerState::Closed);
        assert!(p.is_empty(), "closed: drop them");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_reservation_is_handed_over_on_time_and_ends_the_trial_here() {
        let (breaker, trial) = half_open(1).await;
        let mut p = Probes::default();
        p.reserve(&breaker, trial);
        let at = Instant::now() + Duration::from_secs(1);
        p.hand_over_at(at);
        assert_eq!(p.hand_over_deadline(), Some(at));
        tokio::time::advance(Duration::from_secs(1)).await;
        p.expire(p.trial());
        assert!(p.is_empty() && p.hand_over_deadline().is_none());
        assert!(
            p.is_done(trial),
            "after handing over, it waits for the trial to end"
        );
        let mut other = Probes::default();
        assert_eq!(
            other.reserve(&breaker, trial),
            1,
            "another consumer gets the permit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn taking_the_last_permit_clears_the_hand_over() {
        let (breaker, trial) = half_open(1).await;
        let mut p = Probes::default();
        p.reserve(&breaker, trial);
        p.hand_over_at(Instant::now() + Duration::from_secs(1));
        let _permit = p.take().unwrap();
        assert_eq!(
            p.hand_over_deadline(),
            None,
            "a used reservation is not handed over"
        );
        assert!(p.take().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_slot_lets_a_done_consumer_probe_again() {
        let (_breaker, trial) = half_open(1).await;
        let mut p = Probes::default();
        p.mark_done(trial);
        p.slot_released(BreakerState::HalfOpen { trial: trial + 1 });
        assert!(p.is_done(trial), "a slot of another trial changes nothing");
        p.slot_released(BreakerState::HalfOpen { trial });
        assert!(!p.is_done(trial), "a slot of its trial: it may take it");
    }
}
