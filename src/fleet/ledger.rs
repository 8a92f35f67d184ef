//! What one worker knows of a breaker's state in the fleet, and the rule
//! that decides which announcement wins: the highest `(epoch, origin)`.
//!
//! Every change a worker makes itself (a trip, a trial's verdict, a manual
//! operation) takes as its epoch the time in milliseconds since the Unix
//! epoch, or one more than the highest epoch seen if that is later (a
//! hybrid logical clock: epochs grow with time, and by one per change within
//! a millisecond). An
//! announcement is taken over only when its stamp is higher than the one
//! the worker holds, so a duplicate (equal stamp) or a stale message (lower
//! epoch, delivered late or re-sent by a restarted worker) changes nothing,
//! and every worker that has seen the same announcements ends in the same
//! state, whatever order they came in.
//!
//! Since epochs are times, how far ahead one may be does not depend on what
//! the receiver holds: an announcement more than [`MAX_AHEAD`] ahead of the
//! receiver's clock is refused, by every worker alike (a joiner holding
//! nothing included), so a forged jump (a million ahead, `u64::MAX`) is
//! refused everywhere and cannot split the fleet or freeze its state, and
//! a long-lived fleet never runs out of room.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::wire::{Entry, WireState};
use crate::breaker::{BreakerState, FleetState, Transition, TransitionReason};

/// How far ahead of the receiver's clock an epoch may be: the workers'
/// clocks may differ by this much (as for signed messages' age), plus the
/// changes made within one millisecond.
pub(crate) const MAX_AHEAD: Duration = Duration::from_secs(60);

/// The highest epoch taken at `now_ms` (milliseconds since the Unix epoch).
pub(crate) fn ceiling(now_ms: u64) -> u64 {
    now_ms.saturating_add(u64::try_from(MAX_AHEAD.as_millis()).unwrap_or(u64::MAX))
}

/// Orders announcements: epoch first, then the origin's name, so two
/// changes made at once on two workers are ordered the same everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp {
    pub epoch: u64,
    pub origin: String,
}

/// What became of an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Newer: taken over.
    Taken,
    /// Not newer (a duplicate, or stale): nothing to do.
    Stale,
    /// More than [`MAX_AHEAD`] ahead of this worker's clock: refused.
    TooFar,
}

/// One breaker's fleet state as this worker knows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger {
    pub stamp: Stamp,
    /// The last announced state (own or taken over), re-sent to joiners.
    pub last: Option<Entry>,
    /// When `stamp` was taken (or made).
    since: Option<Instant>,
}

impl Ledger {
    /// Stamps a change made here: the time, or the next epoch if that is
    /// later; this worker as origin.
    pub(crate) fn local(&mut self, origin: &str, now: Instant, now_ms: u64) -> Stamp {
        self.stamp = Stamp {
            epoch: self.stamp.epoch.saturating_add(1).max(now_ms),
            origin: origin.to_owned(),
        };
        self.since = Some(now);
        self.stamp.clone()
    }

    /// How long ago the held stamp was taken (or made).
    pub(crate) fn age(&self, now: Instant) -> Option<Duration> {
        self.since.map(|since| now.saturating_duration_since(since))
    }

    /// Judges `stamp` at `now_ms`.
    pub(crate) fn judge(&self, stamp: &Stamp, now_ms: u64) -> Verdict {
        if stamp.epoch == 0 || *stamp <= self.stamp {
            Verdict::Stale
        } else if stamp.epoch > ceiling(now_ms) {
            Verdict::TooFar
        } else {
            Verdict::Taken
        }
    }

    /// Takes `entry` over if it is newer (see [`judge`](Self::judge)).
    pub(crate) fn accept(&mut self, entry: &Entry, now: Instant, now_ms: u64) -> Verdict {
        let stamp = Stamp {
            epoch: entry.epoch,
            origin: entry.origin.clone(),
        };
        let verdict = self.judge(&stamp, now_ms);
        if verdict == Verdict::Taken {
            self.stamp = stamp;
            self.since = Some(now);
            self.last = Some(entry.clone());
        }
        verdict
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

    /// Milliseconds since the Unix epoch of the tests' "now".
    const NOW_MS: u64 = 1_800_000_000_000;

    fn take(l: &mut Ledger, e: &Entry) -> bool {
        l.accept(e, Instant::now(), NOW_MS) == Verdict::Taken
    }

    #[test]
    fn only_a_newer_stamp_is_taken_over() {
        let mut l = Ledger::default();
        assert!(take(&mut l, &entry(1, "a#1", WireState::Open)));
        assert!(
            !take(&mut l, &entry(1, "a#1", WireState::Open)),
            "a duplicate"
        );
        assert!(take(&mut l, &entry(2, "b#1", WireState::Closed)));
        assert!(
            !take(&mut l, &entry(1, "c#1", WireState::Open)),
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
                    take(&mut l, e);
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
        take(&mut l, &entry(5, "a#1", WireState::Closed));
        // The same worker id, restarted: a new incarnation starting over at 1.
        assert!(!take(&mut l, &entry(1, "a#2", WireState::Open)));
        assert!(
            !take(&mut l, &entry(5, "a#0", WireState::Open)),
            "lower origin at an equal epoch"
        );
        assert_eq!(l.last.unwrap().state, WireState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn epochs_are_times_and_no_one_takes_one_from_the_future() {
        let mut l = Ledger::default();
        let now = Instant::now();
        // A change made here is stamped with the time...
        assert_eq!(l.local("a#1", now, NOW_MS).epoch, NOW_MS);
        // ...or one more than the highest seen, within the same millisecond.
        assert_eq!(l.local("a#1", now, NOW_MS).epoch, NOW_MS + 1);
        assert_eq!(
            l.accept(&entry(0, "zz", WireState::Closed), now, NOW_MS),
            Verdict::Stale,
            "epoch 0 is never news"
        );
        // The jump (a million ahead of the held epoch), a jump past
        // the clocks' allowed difference, and the top of the counter: refused,
        // whatever this worker holds.
        for forged in [NOW_MS + 1 + 1_000_000, ceiling(NOW_MS) + 1, u64::MAX] {
            assert_eq!(
                l.accept(&entry(forged, "zz", WireState::Disabled), now, NOW_MS),
                Verdict::TooFar,
                "{forged} at {NOW_MS}"
            );
            assert_eq!(
                Ledger::default().accept(&entry(forged, "zz", WireState::Disabled), now, NOW_MS),
                Verdict::TooFar,
                "{forged} at {NOW_MS}, by a joiner holding nothing"
            );
        }
        // A worker whose clock is ahead, within the allowed difference.
        assert_eq!(
            l.accept(&entry(ceiling(NOW_MS), "b#1", WireState::Open), now, NOW_MS),
            Verdict::Taken
        );
        // A joiner takes the fleet's state, however old the fleet.
        let mut joiner = Ledger::default();
        assert_eq!(
            joiner.accept(
                &entry(NOW_MS - 86_400_000, "w#1", WireState::Open),
                now,
                NOW_MS
            ),
            Verdict::Taken
        );
        // Its next change is stamped with its time: newer than everything.
        assert_eq!(joiner.local("j#1", now, NOW_MS).epoch, NOW_MS);
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
    async fn the_rate_rule_judges_the_fleets_window_and_a_worker_failing_alone_trips_alone() {
        let cfg = BreakerConfig {
            consecutive_failures: None,
            minimum_calls: 10,
            failure_rate: 0.5,
            ..BreakerConfig::default()
        };
        let now = Instant::now();
        let fail = |m: &mut StateMachine| {
            m.record(
                PermitKind::Normal,
                CallOutcome::Failure,
                Duration::ZERO,
                now,
            )
        };
        let counts = |calls, failures| crate::breaker::Counts {
            calls,
            failures,
            slow: 0,
        };
        // 8 failed calls elsewhere and 2 here: the fleet's 10 trip it, for
        // the whole fleet.
        let mut m = StateMachine::new(cfg.clone(), now);
        assert_eq!(m.set_fleet_window(counts(8, 8), now), None, "8 of 10");
        assert_eq!(fail(&mut m), None, "9 of 10");
        let t = fail(&mut m).expect("the fleet's 10th call trips it");
        assert_eq!((t.reason, t.local), (TransitionReason::FailureRate, false));
        assert_eq!((t.counts.calls, t.counts.failures), (10, 10));
        // A report alone can trip a closed breaker.
        let mut m = StateMachine::new(cfg.clone(), now);
        fail(&mut m);
        let t = m
            .set_fleet_window(counts(12, 9), now)
            .expect("13 calls, 10 failed");
        assert!(!t.local);

        // The fleet's 90 calls succeed, this worker's 10 fail: its own path
        // is broken. It opens alone, and runs its own trials even though
        // another worker holds the lease.
        let mut m = StateMachine::new(cfg, now);
        m.set_fleet_gated(true, now);
        assert_eq!(m.set_fleet_window(counts(90, 0), now), None);
        for i in 0..9 {
            assert_eq!(fail(&mut m), None, "call {i}: 10% of the fleet's");
        }
        let t = fail(&mut m).expect("10 of its own failed");
        assert_eq!((t.reason, t.local), (TransitionReason::FailureRate, true));
        assert!(!m.fleet_gated(), "a trip of its own is probed here");
        tokio::time::advance(Duration::from_secs(120)).await;
        let later = Instant::now();
        let t = m.check_open_timer(later).expect("its own trial");
        assert!(t.local);
        let trial = match t.to {
            BreakerState::HalfOpen { trial } => trial,
            other => panic!("{other:?}"),
        };
        let t = m
            .record(
                PermitKind::Probe { trial },
                CallOutcome::Success,
                Duration::ZERO,
                later,
            )
            .expect("closes on its probe");
        assert_eq!((t.to, t.local), (BreakerState::Closed, true));
        assert!(
            m.fleet_gated(),
            "closed, it follows the fleet's lease again"
        );
        // The fleet's word ends a trip of its own: it waits for the fleet's
        // prober again.
        m.set_fleet_window(counts(90, 0), later);
        for _ in 0..10 {
            fail(&mut m);
        }
        assert!(!m.fleet_gated(), "open on its own again");
        let t = m
            .adopt(
                FleetState::Open {
                    until: later + Duration::from_secs(1),
                },
                later,
            )
            .unwrap();
        assert!(!t.local);
        assert!(m.fleet_gated());
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
            local: false,
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
