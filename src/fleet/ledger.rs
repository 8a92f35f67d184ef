//! What one worker knows of a breaker's state in the fleet, and the rule
//! that decides which announcement wins: the highest `(epoch, origin)`.
//!
//! Every change a worker makes itself (a trip, a trial's verdict, a manual
//! operation) takes the next epoch after the highest it has seen. An
//! announcement is taken over only when its stamp is higher than the one
//! the worker holds, so a duplicate (equal stamp) or a stale message (lower
//! epoch, delivered late or re-sent by a restarted worker) changes nothing,
//! and every worker that has seen the same announcements ends in the same
//! state, whatever order they came in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::wire::{Entry, WireState};
use crate::breaker::{BreakerState, FleetState, Transition, TransitionReason};

/// An epoch more than this far ahead of the one held is refused: a forged
/// `u64::MAX` would otherwise freeze the breaker's fleet state for good.
pub(crate) const MAX_EPOCH_JUMP: u64 = 1_000_000;

/// Orders announcements: epoch first, then the origin's name, so two
/// changes made at once on two workers are ordered the same everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp {
    pub epoch: u64,
    pub origin: String,
}

/// One breaker's fleet state as this worker knows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger {
    pub stamp: Stamp,
    /// The last announced state (own or taken over), re-sent to joiners.
    pub last: Option<Entry>,
}

impl Ledger {
    /// Stamps a change made here: the next epoch, this worker as origin.
    pub(crate) fn local(&mut self, origin: &str) -> Stamp {
        self.stamp = Stamp {
            epoch: self.stamp.epoch.saturating_add(1),
            origin: origin.to_owned(),
        };
        self.stamp.clone()
    }

    /// True when `stamp` is newer than what is held (and not absurdly so).
    pub(crate) fn is_newer(&self, stamp: &Stamp) -> bool {
        stamp.epoch > 0
            && stamp.epoch <= self.stamp.epoch.saturating_add(MAX_EPOCH_JUMP)
            && *stamp > self.stamp
    }

    /// Takes `entry` over if it is newer; true when it was.
    pub(crate) fn accept(&mut self, entry: &Entry) -> bool {
        let stamp = Stamp {
            epoch: entry.epoch,
            origin: entry.origin.clone(),
        };
        if !self.is_newer(&stamp) {
            return false;
        }
        self.stamp = stamp;
        self.last = Some(entry.clone());
        true
    }
}

/// Milliseconds since the Unix epoch now.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The announcement of a change made here.
pub(crate) fn entry_for(
    name: &str,
    stamp: Stamp,
    t: &Transition,
    now: Instant,
    now_ms: u64,
) -> Entry {
    let (state, until_ms) = match t.to {
        BreakerState::Open { until } => {
            let left =
                u64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX);
            (WireState::Open, Some(now_ms.saturating_add(left)))
        }
        BreakerState::HalfOpen { .. } => (WireState::HalfOpen, None),
        BreakerState::Closed if t.reason == TransitionReason::ManualReset => {
            (WireState::Reset, None)
        }
        BreakerState::Closed => (WireState::Closed, None),
        BreakerState::ForcedOpen => (WireState::ForcedOpen, None),
        BreakerState::Disabled => (WireState::Disabled, None),
    };
    Entry {
        name: name.to_owned(),
        epoch: stamp.epoch,
        origin: stamp.origin,
        state,
        reason: t.reason.name().to_owned(),
        until_ms,
    }
}

/// What an announcement means for this worker's breaker. An open period's
/// end is read against this worker's clock and never lies further ahead
/// than `max_open` (a forged or skewed time cannot hold a breaker open).
pub(crate) fn fleet_state(
    entry: &Entry,
    now: Instant,
    now_ms: u64,
    max_open: Duration,
) -> FleetState {
    match entry.state {
        WireState::Open => {
            let left = entry
                .until_ms
                .map_or(0, |until| until.saturating_sub(now_ms));
            FleetState::Open {
                until: now + Duration::from_millis(left).min(max_open),
            }
        }
        WireState::HalfOpen => FleetState::Probing,
        WireState::Closed => FleetState::Closed,
        WireState::Reset => FleetState::Reset,
        WireState::ForcedOpen => FleetState::ForcedOpen,
        WireState::Disabled => FleetState::Disabled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{BreakerConfig, CallOutcome, PermitKind, StateMachine};

    fn entry(epoch: u64, origin: &str, state: WireState) -> Entry {
        Entry {
            name: "b".into(),
            epoch,
            origin: origin.into(),
            state,
            reason: "consecutive-failures".into(),
            until_ms: None,
        }
    }

    #[test]
    fn only_a_newer_stamp_is_taken_over() {
        let mut l = Ledger::default();
        assert!(l.accept(&entry(1, "a#1", WireState::Open)));
        assert!(!l.accept(&entry(1, "a#1", WireState::Open)), "a duplicate");
        assert!(l.accept(&entry(2, "b#1", WireState::Closed)));
        assert!(
            !l.accept(&entry(1, "c#1", WireState::Open)),
            "a stale open arriving after the close must not reopen"
        );
        assert_eq!(l.stamp.epoch, 2);
        assert_eq!(l.last.as_ref().unwrap().state, WireState::Closed);
    }

    #[test]
    fn the_same_announcements_in_any_order_end_in_the_same_state() {
        let all = [
            entry(1, "a#1", WireState::Open),
            entry(2, "a#1", WireState::HalfOpen),
            entry(3, "a#1", WireState::Closed),
            entry(3, "b#1", WireState::Open),
            entry(2, "c#1", WireState::Open),
        ];
        let mut seen = std::collections::BTreeSet::new();
        // Every rotation and its reverse.
        for start in 0..all.len() {
            for reverse in [false, true] {
                let mut order: Vec<&Entry> =
                    all.iter().cycle().skip(start).take(all.len()).collect();
                if reverse {
                    order.reverse();
                }
                let mut l = Ledger::default();
                for e in order {
                    l.accept(e);
                }
                seen.insert((l.stamp.clone(), l.last.unwrap().state.name()));
            }
        }
        assert_eq!(seen.len(), 1, "orders disagreed: {seen:?}");
        let (stamp, state) = seen.into_iter().next().unwrap();
        assert_eq!(
            (stamp.epoch, stamp.origin.as_str(), state),
            (3, "b#1", "open")
        );
    }

    #[test]
    fn a_restarted_worker_cannot_undo_the_fleets_newer_state() {
        let mut l = Ledger::default();
        l.accept(&entry(5, "a#1", WireState::Closed));
        // The same worker id, restarted: a new incarnation starting over at 1.
        assert!(!l.accept(&entry(1, "a#2", WireState::Open)));
        assert!(
            !l.accept(&entry(5, "a#0", WireState::Open)),
            "lower origin at an equal epoch"
        );
        assert_eq!(l.last.unwrap().state, WireState::Closed);
    }

    #[test]
    fn a_local_change_outranks_what_was_seen_and_forged_epochs_are_refused() {
        let mut l = Ledger::default();
        l.accept(&entry(4, "z#9", WireState::Open));
        let s = l.local("a#1");
        assert_eq!(s.epoch, 5);
        assert!(
            !l.accept(&entry(0, "zz", WireState::Closed)),
            "epoch 0 is never news"
        );
        assert!(
            !l.accept(&entry(u64::MAX, "zz", WireState::Closed)),
            "a forged jump"
        );
        assert!(l.accept(&entry(5 + MAX_EPOCH_JUMP, "zz", WireState::Closed)));
        assert_eq!(l.local("a#1").epoch, 6 + MAX_EPOCH_JUMP);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_announcement_ends_at_the_same_time_here_and_no_later_than_max_open() {
        let now = Instant::now();
        let now_ms = 1_000_000;
        let mut e = entry(1, "a#1", WireState::Open);
        e.until_ms = Some(now_ms + 1_500);
        assert_eq!(
            fleet_state(&e, now, now_ms, Duration::from_secs(60)),
            FleetState::Open {
                until: now + Duration::from_millis(1_500)
            }
        );
        e.until_ms = Some(u64::MAX);
        assert_eq!(
            fleet_state(&e, now, now_ms, Duration::from_secs(60)),
            FleetState::Open {
                until: now + Duration::from_secs(60)
            }
        );
        e.until_ms = Some(now_ms - 10);
        assert_eq!(
            fleet_state(&e, now, now_ms, Duration::from_secs(60)),
            FleetState::Open { until: now }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_taken_over_open_period_pauses_and_the_verdict_resumes() {
        let cfg = BreakerConfig::default();
        let start = Instant::now();
        let mut m = StateMachine::new(cfg, start);
        m.set_fleet_gated(true, start);
        let until = start + Duration::from_secs(2);
        let t = m.adopt(FleetState::Open { until }, start).unwrap();
        assert_eq!(
            (t.to, t.reason),
            (BreakerState::Open { until }, TransitionReason::Fleet)
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        let now = Instant::now();
        assert_eq!(
            m.check_open_timer(now),
            None,
            "gated: another worker probes"
        );
        assert_eq!(
            m.adopt(FleetState::Probing, now),
            None,
            "stays open during its trial"
        );
        let t = m.adopt(FleetState::Closed, now).unwrap();
        assert_eq!(t.to, BreakerState::Closed);
        // Re-opened by the fleet, then this worker gets the lease: its own
        // timer starts the trial as soon as the gate lifts.
        m.adopt(FleetState::Open { until: now }, now);
        let t = m.set_fleet_gated(false, now).unwrap();
        assert_eq!(t.to, BreakerState::HalfOpen { trial: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn the_streak_rule_counts_the_fleets_failures_with_its_own() {
        let cfg = BreakerConfig {
            consecutive_failures: Some(5),
            minimum_calls: 1000,
            ..BreakerConfig::default()
        };
        let now = Instant::now();
        let mut m = StateMachine::new(cfg, now);
        let fail = |m: &mut StateMachine| {
            m.record(
                PermitKind::Normal,
                CallOutcome::Failure,
                Duration::ZERO,
                now,
            )
        };
        assert_eq!(m.set_fleet_streak(3, now), None, "3 of 5 elsewhere");
        assert_eq!(fail(&mut m), None, "3 elsewhere + 1 here");
        let t = fail(&mut m).expect("3 elsewhere + 2 here trips");
        assert_eq!(t.reason, TransitionReason::ConsecutiveFailures);
        // Once closed again, the fleet's old streak is forgotten; a streak
        // that alone reaches the rule opens a closed breaker at once.
        m.adopt(FleetState::Closed, now);
        assert_eq!(fail(&mut m), None, "1 of 5 after the close");
        let t = m.set_fleet_streak(4, now).expect("4 elsewhere + 1 here");
        assert!(matches!(t.to, BreakerState::Open { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_made_here_is_announced_with_its_open_period() {
        let now = Instant::now();
        let t = Transition {
            from: BreakerState::Closed,
            to: BreakerState::Open {
                until: now + Duration::from_millis(2_000),
            },
            reason: TransitionReason::ConsecutiveFailures,
            counts: crate::breaker::Counts::default(),
            consecutive_failures: 5,
            at: now,
        };
        let e = entry_for(
            "b",
            Stamp {
                epoch: 2,
                origin: "a#1".into(),
            },
            &t,
            now,
            10_000,
        );
        assert_eq!(
            (e.state, e.until_ms, e.epoch),
            (WireState::Open, Some(12_000), 2)
        );
        assert_eq!(e.reason, "consecutive-failures");
    }
}
