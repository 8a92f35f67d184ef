//! The breakers one consumer is guarded by, seen as one: its handler may
//! call several dependencies (`breakers = ["billing", "inventory"]`), and
//! the consumer pauses at the broker while **any** of them is open, probes
//! while any is half-open, and runs at full prefetch only when all admit
//! every call.
//!
//! A delivery starts only with a permit from every breaker of the set
//! ([`Permits`]); how its outcome is counted is [`blame`]'s business.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Breaker, BreakerState, Permit, PermitKind, Rejected};

/// Most breakers one consumer may name.
pub const MAX_BREAKERS_PER_CONSUMER: usize = 8;

/// One consumer's breakers, in the order its settings name them; the first
/// is the one a failure counts against when the handler names no dependency.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct BreakerSet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    breakers: Vec<Breaker>,
    /// `ctx.guard` names that are not in the set, warned about once each.
    unknown_warned: Mutex<Vec<String>>,
}

impl BreakerSet {
    /// `breakers` must not be empty.
    pub(crate) fn new(breakers: Vec<Breaker>) -> Self {
        assert!(!breakers.is_empty(), "a consumer has at least one breaker");
        Self {
            inner: Arc::new(Inner {
                breakers,
                unknown_warned: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The breakers, in order.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Breaker> {
        self.inner.breakers.iter()
    }

    /// The first breaker: a failure that names no dependency counts here.
    pub(crate) fn first(&self) -> &Breaker {
        &self.inner.breakers[0]
    }

    /// The breaker at `index`.
    pub(crate) fn get(&self, index: usize) -> Option<&Breaker> {
        self.inner.breakers.get(index)
    }

    /// Where the breaker named `name` is in the set.
    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.inner.breakers.iter().position(|b| b.name() == name)
    }

    /// True when the set has one breaker (the common case, kept cheap).
    fn single(&self) -> bool {
        self.inner.breakers.len() == 1
    }

    /// The names, comma-separated, for log lines.
    pub(crate) fn names(&self) -> String {
        let names: Vec<&str> = self.iter().map(Breaker::name).collect();
        names.join(", ")
    }

    /// The names of the breakers that refuse calls now (open, forced open),
    /// for log lines; all of them when none does.
    pub(crate) fn closed_to_calls(&self) -> String {
        let open: Vec<&str> = self
            .iter()
            .filter(|b| {
                matches!(
                    b.state(),
                    BreakerState::Open { .. } | BreakerState::ForcedOpen
                )
            })
            .map(Breaker::name)
            .collect();
        if open.is_empty() {
            self.names()
        } else {
            open.join(", ")
        }
    }

    /// The set's state: see [`combine`].
    pub(crate) fn state(&self) -> BreakerState {
        if self.single() {
            return self.first().state();
        }
        combine(self.iter().map(Breaker::state))
    }

    /// True when every breaker admits every call (closed or disabled), read
    /// without a lock.
    pub(crate) fn admits_all_now(&self) -> bool {
        self.iter().all(Breaker::admits_all_now)
    }

    /// The longest `call_timeout` of the set: a handler call is bounded by
    /// it (and each [`guard`](crate::handler::Context::guard)ed call by its own breaker's).
    pub(crate) fn call_timeout(&self) -> Duration {
        self.iter()
            .map(|b| b.config().call_timeout)
            .max()
            .unwrap_or_default()
    }

    /// How many probes a half-open trial of the set takes: the fewest
    /// `half_open_probes` of its half-open breakers (each probe takes a
    /// probe permit from every one of them).
    pub(crate) fn probes_per_trial(&self) -> usize {
        self.iter()
            .filter(|b| matches!(b.state(), BreakerState::HalfOpen { .. }))
            .map(|b| b.config().half_open_probes as usize)
            .min()
            .unwrap_or(0)
    }

    /// A permit from every breaker, or the first refusal (the permits taken
    /// before it are given back, counting nothing).
    pub(crate) fn try_acquire_at(&self, now: Instant) -> Result<Permits, Rejected> {
        let mut all = self.iter();
        let first = all
            .next()
            .map_or(Err(Rejected::Open), |b| b.try_acquire_at(now))?;
        let mut rest = Vec::new();
        for b in all {
            rest.push(Some(b.try_acquire_at(now)?));
        }
        Ok(Permits {
            first: Some(first),
            rest,
        })
    }

    /// [`try_acquire_at`](Self::try_acquire_at) now.
    pub(crate) fn try_acquire(&self) -> Result<Permits, Rejected> {
        self.try_acquire_at(Instant::now())
    }

    /// Sees every change of any breaker's state.
    pub(crate) fn subscribe(&self) -> StateWatch {
        StateWatch {
            set: self.clone(),
            rx: self.iter().map(Breaker::subscribe).collect(),
        }
    }

    /// Sees every probe slot given back by any breaker.
    pub(crate) fn probe_releases(&self) -> ReleaseWatch {
        ReleaseWatch {
            rx: self.iter().map(Breaker::probe_releases).collect(),
        }
    }

    /// True the first time `name` is reported as not in the set.
    pub(crate) fn first_unknown(&self, name: &str) -> bool {
        let mut warned = self
            .inner
            .unknown_warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if warned.iter().any(|w| w == name) || warned.len() >= 64 {
            return false;
        }
        warned.push(name.to_owned());
        true
    }
}

/// Several breakers' states as one, from the consumer's point of view:
/// forced open or open if any is (the latest `until`), else half-open if
/// any is (its `trial` a key of every half-open breaker's trial, so a new
/// trial of any of them is a new trial of the set), else closed, or
/// disabled when all are.
pub(crate) fn combine(states: impl Iterator<Item = BreakerState>) -> BreakerState {
    let mut open_until: Option<Instant> = None;
    let mut forced = false;
    let mut half_open: Vec<(usize, u64)> = Vec::new();
    let mut all_disabled = true;
    for (i, state) in states.enumerate() {
        match state {
            BreakerState::ForcedOpen => forced = true,
            BreakerState::Open { until } => {
                open_until = Some(open_until.map_or(until, |u| u.max(until)));
            }
            BreakerState::HalfOpen { trial } => half_open.push((i, trial)),
            BreakerState::Closed => {}
            BreakerState::Disabled => continue,
        }
        all_disabled = false;
    }
    if forced {
        BreakerState::ForcedOpen
    } else if let Some(until) = open_until {
        BreakerState::Open { until }
    } else if !half_open.is_empty() {
        BreakerState::HalfOpen {
            trial: trial_key(&half_open),
        }
    } else if all_disabled {
        BreakerState::Disabled
    } else {
        BreakerState::Closed
    }
}

/// One number for the trials of the half-open breakers `(index, trial)`:
/// FNV-1a over both.
fn trial_key(parts: &[(usize, u64)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &(i, trial) in parts {
        for byte in (i as u64)
            .to_le_bytes()
            .into_iter()
            .chain(trial.to_le_bytes())
        {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// One permit from each breaker of a set, in the set's order. A permit can
/// be taken out (a guarded call uses it) and put back.
#[derive(Debug)]
pub(crate) struct Permits {
    first: Option<Permit>,
    /// The other breakers' (empty for a one-breaker set: no allocation).
    rest: Vec<Option<Permit>>,
}

impl Permits {
    fn slot(&mut self, index: usize) -> Option<&mut Option<Permit>> {
        match index {
            0 => Some(&mut self.first),
            i => self.rest.get_mut(i - 1),
        }
    }

    /// The permits still held, with their index in the set.
    fn held(&self) -> impl Iterator<Item = (usize, &Permit)> {
        std::iter::once(&self.first)
            .chain(&self.rest)
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
    }

    /// True when any of them is a half-open probe.
    pub(crate) fn is_probe(&self) -> bool {
        self.held().any(|(_, p)| p.is_probe())
    }

    /// The set's trial these permits probe for (as [`combine`] keys it),
    /// or `None` when none is a probe.
    pub(crate) fn trial(&self) -> Option<u64> {
        if self.rest.is_empty() {
            return match self.first.as_ref()?.kind() {
                PermitKind::Probe { trial } => Some(trial),
                PermitKind::Normal => None,
            };
        }
        let parts: Vec<(usize, u64)> = self
            .held()
            .filter_map(|(i, p)| match p.kind() {
                PermitKind::Probe { trial } => Some((i, trial)),
                PermitKind::Normal => None,
            })
            .collect();
        (!parts.is_empty()).then(|| trial_key(&parts))
    }

    /// Takes the permit of breaker `index` out, if it is still here.
    pub(crate) fn take(&mut self, index: usize) -> Option<Permit> {
        self.slot(index)?.take()
    }

    /// Puts a permit back in the empty place of breaker `index` (a permit
    /// that finds its place taken counts nothing).
    pub(crate) fn put_back(&mut self, index: usize, permit: Permit) {
        if let Some(slot) = self.slot(index)
            && slot.is_none()
        {
            *slot = Some(permit);
        }
    }

    /// The indexes of the breakers whose permit is still held.
    pub(crate) fn held_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.held().map(|(i, _)| i)
    }

    /// The permits still held, owned, with their index in the set.
    pub(crate) fn into_held(self) -> impl Iterator<Item = (usize, Permit)> {
        std::iter::once(self.first)
            .chain(self.rest)
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p)))
    }
}

/// Which breaker of a set (by index) a failed call counts against: the one
/// the handler named (`HandlerError::dependency`), else the first; a name
/// that is not in the set counts against the first too (a failure is never
/// counted against nothing).
pub(crate) fn blame(set: &BreakerSet, dependency: Option<&str>) -> usize {
    dependency.and_then(|d| set.position(d)).unwrap_or(0)
}

/// Waits for any breaker of a set to change state.
#[derive(Debug)]
pub(crate) struct StateWatch {
    set: BreakerSet,
    rx: Vec<watch::Receiver<BreakerState>>,
}

impl StateWatch {
    /// The set's state now, marking every change seen.
    pub(crate) fn borrow_and_update(&mut self) -> BreakerState {
        for rx in &mut self.rx {
            rx.borrow_and_update();
        }
        self.set.state()
    }

    /// Waits until any breaker changes state.
    ///
    /// # Errors
    ///
    /// When a breaker is gone (the worker is going away).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a change not yet seen is still reported by the next call.
    pub(crate) async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        any_changed(&mut self.rx).await
    }
}

/// Waits for any breaker of a set to give a probe slot back.
#[derive(Debug)]
pub(crate) struct ReleaseWatch {
    rx: Vec<watch::Receiver<u64>>,
}

impl ReleaseWatch {
    /// Marks every release seen.
    pub(crate) fn borrow_and_update(&mut self) {
        for rx in &mut self.rx {
            rx.borrow_and_update();
        }
    }

    /// Waits until any breaker gives a probe slot back.
    ///
    /// # Errors
    ///
    /// When a breaker is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`StateWatch::changed`].
    pub(crate) async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        any_changed(&mut self.rx).await
    }
}

async fn any_changed<T>(rx: &mut [watch::Receiver<T>]) -> Result<(), watch::error::RecvError> {
    if let [one] = rx {
        // One breaker: no allocation on the consumer's loop.
        return one.changed().await;
    }
    let waits = rx.iter_mut().map(|r| Box::pin(r.changed()));
    futures_util::future::select_all(waits).await.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(ms: u64) -> BreakerState {
        BreakerState::Open {
            until: Instant::now() + Duration::from_millis(ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn any_open_breaker_opens_the_set_until_the_latest() {
        let (a, b) = (open(100), open(500));
        assert_eq!(
            combine([BreakerState::Closed, a, b].into_iter()),
            b,
            "open until the last one admits probes"
        );
        assert_eq!(
            combine([b, BreakerState::ForcedOpen].into_iter()),
            BreakerState::ForcedOpen
        );
        assert_eq!(
            combine([BreakerState::HalfOpen { trial: 1 }, a].into_iter()),
            a,
            "an open breaker wins over a half-open one: no probes while any refuses"
        );
    }

    #[test]
    fn half_open_trials_get_a_key_that_changes_with_any_of_them() {
        let s = |t1, t2| {
            combine(
                [
                    BreakerState::HalfOpen { trial: t1 },
                    BreakerState::Closed,
                    BreakerState::HalfOpen { trial: t2 },
                ]
                .into_iter(),
            )
        };
        let BreakerState::HalfOpen { trial: k } = s(3, 7) else {
            panic!("half-open");
        };
        let BreakerState::HalfOpen { trial: k2 } = s(3, 8) else {
            panic!("half-open");
        };
        assert_ne!(
            k, k2,
            "a new trial of one breaker is a new trial of the set"
        );
        assert_eq!(s(3, 7), s(3, 7), "the same trials give the same key");
        assert_eq!(
            combine([BreakerState::Closed, BreakerState::Disabled].into_iter()),
            BreakerState::Closed
        );
        assert_eq!(
            combine([BreakerState::Disabled, BreakerState::Disabled].into_iter()),
            BreakerState::Disabled
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permits_key_their_trial_as_the_state_does() {
        use crate::breaker::{BreakerConfig, CallOutcome};
        let cfg = BreakerConfig {
            minimum_calls: 1,
            open_timeout: Duration::from_secs(1),
            ..BreakerConfig::default()
        };
        let set = BreakerSet::new(vec![
            Breaker::new("billing", cfg.clone()),
            Breaker::new("inventory", cfg),
        ]);
        assert_eq!(set.state(), BreakerState::Closed);
        assert!(set.try_acquire().unwrap().trial().is_none());
        let p = set.get(1).unwrap().try_acquire().unwrap();
        p.record(CallOutcome::Failure);
        assert!(matches!(set.state(), BreakerState::Open { .. }));
        assert_eq!(
            set.try_acquire().unwrap_err(),
            Rejected::Open,
            "no delivery starts while any breaker is open"
        );
        assert_eq!(set.closed_to_calls(), "inventory");
        tokio::time::advance(Duration::from_secs(2)).await;
        let permits = set.try_acquire().expect("half-open admits a probe");
        let BreakerState::HalfOpen { trial } = set.state() else {
            panic!("half-open, got {:?}", set.state());
        };
        assert_eq!(permits.trial(), Some(trial));
        assert!(permits.is_probe());
        assert_eq!(set.probes_per_trial(), 1);
        assert_eq!(blame(&set, Some("inventory")), 1);
        assert_eq!(blame(&set, Some("unknown")), 0);
        assert_eq!(blame(&set, None), 0);
    }
}
