//! A fleet of workers acting as one guard (`[fleet]`).
//!
//! ```text
//!  worker A ──┐  state changes (epoch-stamped JSON)   ┌──▶ own queue ──▶ worker A
//!  worker B ──┼──────────▶ fleet exchange (fanout) ───┼──▶ own queue ──▶ worker B
//!  worker C ──┘                                        └──▶ own queue ──▶ worker C
//!
//!  probe lease of breaker X: the exclusive queue "EXCHANGE.lease.X";
//!  the worker whose connection declared it probes (and says so in its
//!  heartbeats), the broker frees it when that connection dies
//! ```
//!
//! - Each worker announces every change of its breakers (opened with reason
//!   and end of the open period, half-open, closed, forced, disabled, reset)
//!   on the fanout exchange, confirmed and mandatory; every worker reads
//!   them through its own exclusive, auto-delete, length-limited queue and
//!   takes over the newer ones (see [`ledger`]). A trip anywhere opens the
//!   breaker everywhere until the same time.
//! - The trip rules count the fleet's calls: failures in a row summed, and
//!   the rate rules on the combined window (see [`tally`]).
//! - Only messages from `fleet.users` (the AMQP `user_id`, checked by the
//!   broker), signed with `fleet.key_file` when set, are taken (see
//!   [`trust`]).
//! - Only the worker holding a breaker's probe lease starts its trials (or
//!   runs its health check); the others stay open until the verdict comes.
//!   A lease no live member announces is probed around (see [`lease`]).
//! - A worker that joins asks for the fleet's state and waits up to
//!   `fleet.join_wait` for it before its consumers start.
//! - A worker that loses the fleet (its channel or connection) guards on its
//!   own, says so in its log, `/readyz` and `/breakers`, and rejoins.

pub(crate) mod lease;
pub(crate) mod ledger;
mod session;
pub(crate) mod tally;
pub(crate) mod trust;
pub(crate) mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::lease::Lease;
use self::ledger::{Ledger, Verdict, entry_for, fleet_state, unix_ms};
use self::session::End;
use self::tally::Tally;
use self::wire::{Entry, StreakEntry};
use crate::amqp::connection::ManagedConnection;
use crate::breaker::{Breaker, Transition, TransitionReason};
use crate::config::{AuthMechanism, BrokerSettings, FleetSettings};
use crate::status::{BreakerFleetView, FleetProblem, FleetView, OthersView};

/// The longest `fleet.worker_id`.
pub(crate) const MAX_WORKER_ID: usize = 100;

/// The longest `fleet.join_wait`.
pub(crate) const MAX_JOIN_WAIT: Duration = Duration::from_secs(60);

/// The most entries in `fleet.users`.
pub(crate) const MAX_FLEET_USERS: usize = 64;

/// After the fleet was lost, the next join waits this long.
const REJOIN_DELAY: Duration = Duration::from_secs(1);

/// At most this many other workers are remembered as members.
pub(super) const MAX_MEMBERS: usize = 256;

/// A problem about refused messages shows this long after the last one.
const PROBLEM_LINGERS: Duration = Duration::from_secs(60);

/// A change of this worker's that a live member's heartbeats still do not
/// show this long after is reported (`fleet.unheard`).
const UNHEARD_AFTER: Duration = Duration::from_secs(10);

/// The probe-lease queue of `breaker`.
#[must_use]
pub(crate) fn lease_queue(exchange: &str, breaker: &str) -> String {
    format!("{exchange}.lease.{breaker}")
}

/// Where this worker stands with the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Link {
    /// Connecting to the fleet exchange for the first time.
    Joining,
    /// Reading and announcing states.
    Joined { since: std::time::SystemTime },
    /// Lost the fleet: the breakers act on this worker's calls alone.
    LocalOnly {
        since: std::time::SystemTime,
        why: String,
    },
}

impl Link {
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // shown by the admin endpoint
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Link::Joining => "joining",
            Link::Joined { .. } => "joined",
            Link::LocalOnly { .. } => "local-only",
        }
    }
}

/// What happened on this worker that the fleet must hear.
#[derive(Debug)]
pub(crate) enum Local {
    /// A breaker changed state.
    Change(String, Transition),
    /// A breaker's failures in a row changed.
    Streak(String),
}

/// How the announcement of a breaker's change made here went.
#[derive(Debug, Clone)]
pub(crate) struct Announced {
    /// The change's time.
    pub at: Instant,
    /// Confirmed by the broker, or why not.
    pub result: Result<(), String>,
}

/// A problem shown on `/readyz` and `/breakers`.
#[derive(Debug, Clone)]
struct Problem {
    detail: String,
    since: std::time::SystemTime,
    /// Last seen; a problem with `lingers` goes away that long after.
    seen: Instant,
    lingers: Option<Duration>,
}

/// The fleet side of a worker. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    exchange: String,
    /// `ID#INCARNATION`: a restarted worker with the same id is another origin.
    origin: String,
    join_wait: Duration,
    /// `fleet.user`.
    user_setting: Option<String>,
    /// With plain authentication, the URL's user: the fallback when the
    /// broker does not say who this worker is.
    url_user: Option<String>,
    /// `fleet.users`; empty: this worker's own user.
    users: Vec<String>,
    key: Option<trust::Key>,
    /// The user found at the last join.
    user: Mutex<Option<String>>,
    breakers: BTreeMap<String, Breaker>,
    ledgers: Mutex<BTreeMap<String, Ledger>>,
    leases: Mutex<BTreeMap<String, Lease>>,
    /// Per breaker, the other worker announcing it holds the lease, and when.
    holders: Mutex<BTreeMap<String, (String, Instant)>>,
    /// Other workers, and when last heard.
    members: Mutex<BTreeMap<String, Instant>>,
    /// Per other worker, the epoch of each breaker it said it holds.
    epochs: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    /// Bumped by every heartbeat from another worker.
    hellos: watch::Sender<u64>,
    /// Per breaker, the other workers' streaks and windows.
    tallies: Mutex<BTreeMap<String, Tally>>,
    /// Per (kind, breaker), what is wrong.
    problems: Mutex<BTreeMap<(&'static str, String), Problem>>,
    link: watch::Sender<Link>,
    /// Bumped by every state message from another worker.
    heard: watch::Sender<u64>,
    /// Per breaker, how the last change made here was announced.
    announced: watch::Sender<BTreeMap<String, Announced>>,
    seq: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    ignored: AtomicU64,
    refused: AtomicU64,
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

fn incarnation() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}",
        (nanos as u64) ^ (u64::from(std::process::id()) << 32)
    )
}

impl Fleet {
    /// The fleet of `settings`, if `fleet.exchange` is set.
    ///
    /// # Errors
    ///
    /// `fleet.key_file` cannot be read or is too short.
    pub(crate) fn new(
        settings: &FleetSettings,
        broker: &BrokerSettings,
        breakers: &BTreeMap<String, Breaker>,
    ) -> Result<Option<Self>, String> {
        let Some(exchange) = settings.exchange.clone() else {
            return Ok(None);
        };
        let key = match &settings.key_file {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    format!("fleet.key_file {}: cannot read it ({e})", path.display())
                })?;
                Some(trust::key_from(&bytes).ok_or_else(|| {
                    format!(
                        "fleet.key_file {}: must hold at least {} bytes of secret",
                        path.display(),
                        trust::MIN_KEY
                    )
                })?)
            }
            None => None,
        };
        let url_user = (broker.auth_mechanism == AuthMechanism::Plain && broker.oauth2.is_none())
            .then(|| crate::amqp::parse_uri(&broker.url).ok())
            .flatten()
            .map(|u| u.authority.userinfo.username);
        let id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
        let (link, _) = watch::channel(Link::Joining);
        let (heard, _) = watch::channel(0);
        let (announced, _) = watch::channel(BTreeMap::new());
        Ok(Some(Self {
            inner: Arc::new(Inner {
                exchange,
                origin: format!("{}#{}", crate::text::printable(&id), incarnation()),
                join_wait: settings.join_wait,
                user_setting: settings.user.clone(),
                url_user,
                users: settings.users.clone(),
                key,
                user: Mutex::new(None),
                breakers: breakers.clone(),
                ledgers: Mutex::new(each(breakers)),
                leases: Mutex::new(each(breakers)),
                holders: Mutex::new(BTreeMap::new()),
                members: Mutex::new(BTreeMap::new()),
                epochs: Mutex::new(BTreeMap::new()),
                hellos: watch::channel(0).0,
                tallies: Mutex::new(each(breakers)),
                problems: Mutex::new(BTreeMap::new()),
                link,
                heard,
                announced,
                seq: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                ignored: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }))
    }

    /// True while joined: manual operations then apply fleet-wide.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // shown by the admin endpoint
    pub(crate) fn is_joined(&self) -> bool {
        matches!(*self.inner.link.borrow(), Link::Joined { .. })
    }

    /// Waits until the change of `breaker` made at or after `since` was
    /// announced: `Ok` once the broker confirmed it, the reason otherwise,
    /// `None` if that took longer than `within`.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // used by the admin endpoint
    pub(crate) async fn announced(
        &self,
        breaker: &str,
        since: Instant,
        within: Duration,
    ) -> Option<Result<(), String>> {
        let mut rx = self.inner.announced.subscribe();
        let wait = async {
            loop {
                if let Some(a) = rx.borrow_and_update().get(breaker)
                    && a.at >= since
                {
                    return a.result.clone();
                }
                if rx.changed().await.is_err() {
                    return Err("the fleet stopped".to_owned());
                }
            }
        };
        tokio::time::timeout(within, wait).await.ok()
    }

    /// What became of a change of `breaker` made by hand at `since`, in
    /// words for the operator: confirmed by the broker and taken over by
    /// every other live worker ("applied fleet-wide"), or what is missing.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // used by the admin endpoint
    pub(crate) async fn outcome(&self, breaker: &str, since: Instant, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let confirmed = self.announced(breaker, since, within).await;
        match confirmed {
            None => {
                return format!(
                    "applied here; the broker has not confirmed the announcement to the fleet within {}s",
                    within.as_secs()
                );
            }
            Some(Err(why)) => {
                return format!("applied here; the fleet may not have heard it: {why}");
            }
            Some(Ok(())) => {}
        }
        let epoch = lock(&self.inner.ledgers)
            .get(breaker)
            .map_or(0, |l| l.stamp.epoch);
        let members = self.live_members(Instant::now());
        // A member that has not said yet has not taken it over.
        let behind = || self.behind(&members, breaker, epoch, true);
        let mut hellos = self.inner.hellos.subscribe();
        loop {
            let waiting = behind();
            if waiting.is_empty() {
                return if members.is_empty() {
                    "applied fleet-wide (no other worker heard lately)".to_owned()
                } else {
                    "applied fleet-wide".to_owned()
                };
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    return format!(
                        "applied here and confirmed by the broker, but {} of {} other worker(s) had not taken it over within {}s: {}",
                        waiting.len(),
                        members.len(),
                        within.as_secs(),
                        waiting.join(", ")
                    );
                }
                changed = hellos.changed() => if changed.is_err() {
                    return "applied here; the fleet stopped".to_owned();
                },
            }
        }
    }

    /// The fleet, for the admin endpoint.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // shown by the admin endpoint
    pub(crate) fn view(&self) -> FleetView {
        let link = self.inner.link.borrow().clone();
        let (since, error) = match &link {
            Link::Joining => (None, None),
            Link::Joined { since } => (Some(*since), None),
            Link::LocalOnly { since, why } => (Some(*since), Some(why.clone())),
        };
        let now = Instant::now();
        let live = self.member_fresh();
        FleetView {
            exchange: self.inner.exchange.clone(),
            worker: self.inner.origin.clone(),
            state: link.name().to_owned(),
            since: since.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            error,
            sent: self.inner.sent.load(Ordering::Relaxed),
            received: self.inner.received.load(Ordering::Relaxed),
            ignored: self.inner.ignored.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
            user: lock(&self.inner.user).clone(),
            members: lock(&self.inner.members)
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(**at) <= live)
                .map(|(m, _)| m.clone())
                .collect(),
            problems: self.problems(now),
        }
    }

    fn problems(&self, now: Instant) -> Vec<FleetProblem> {
        let mut problems = lock(&self.inner.problems);
        problems.retain(|_, p| {
            p.lingers
                .is_none_or(|l| now.saturating_duration_since(p.seen) <= l)
        });
        problems
            .iter()
            .map(|((kind, breaker), p)| FleetProblem {
                kind: (*kind).to_owned(),
                breaker: (!breaker.is_empty()).then(|| breaker.clone()),
                detail: p.detail.clone(),
                since: humantime::format_rfc3339_millis(p.since).to_string(),
            })
            .collect()
    }

    /// Shows a problem (until [`solved`](Self::solved), or `lingers` after
    /// it was last seen).
    fn problem(
        &self,
        kind: &'static str,
        breaker: &str,
        detail: String,
        lingers: Option<Duration>,
    ) {
        let mut problems = lock(&self.inner.problems);
        let p = problems
            .entry((kind, breaker.to_owned()))
            .or_insert_with(|| Problem {
                detail: String::new(),
                since: std::time::SystemTime::now(),
                seen: Instant::now(),
                lingers,
            });
        p.detail = detail;
        p.seen = Instant::now();
        p.lingers = lingers;
    }

    fn solved(&self, kind: &'static str, breaker: &str) {
        lock(&self.inner.problems).remove(&(kind, breaker.to_owned()));
    }

    /// One breaker's fleet state, for `/breakers`.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // shown by the admin endpoint
    pub(crate) fn breaker_view(&self, name: &str) -> Option<BreakerFleetView> {
        let breaker = self.inner.breakers.get(name)?;
        let (epoch, origin, announced) = {
            let ledgers = lock(&self.inner.ledgers);
            let ledger = ledgers.get(name)?;
            (
                ledger.stamp.epoch,
                (!ledger.stamp.origin.is_empty()).then(|| ledger.stamp.origin.clone()),
                ledger.last.as_ref().map(|e| e.state.name().to_owned()),
            )
        };
        let (lease_held, lease_problem) = lock(&self.inner.leases)
            .get(name)
            .map(|l| (l.held, l.problem.clone()))
            .unwrap_or_default();
        let now = Instant::now();
        let sums = lock(&self.inner.tallies)
            .get_mut(name)
            .map(|t| t.sums(breaker.config().window, now))
            .unwrap_or_default();
        Some(BreakerFleetView {
            epoch,
            origin,
            announced,
            lease_held,
            gated: breaker.fleet_gated(),
            lease_holder: self.live_holder(name, now),
            lease_problem,
            others: Some(OthersView {
                calls: sums.window.calls,
                failures: sums.window.failures,
                slow_calls: sums.window.slow,
                consecutive_failures: sums.streak,
            }),
        })
    }

    /// Waits until the worker has joined and heard the fleet's state (or
    /// `join_wait` passed, or the fleet is unreachable): then the consumers
    /// may start.
    pub(crate) async fn joined(&self, shutdown: &CancellationToken) {
        let deadline = Instant::now() + self.inner.join_wait;
        let mut link = self.inner.link.subscribe();
        let mut heard = self.inner.heard.subscribe();
        loop {
            if matches!(*link.borrow_and_update(), Link::LocalOnly { .. }) {
                return;
            }
            if *heard.borrow_and_update() > 0 {
                // Every other worker answers within moments of the first.
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(300))) => {}
                }
                return;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => return,
                _ = link.changed() => {}
                _ = heard.changed() => {}
            }
        }
    }

    /// The fleet side of the worker until `shutdown`: joins, announces,
    /// takes over, holds leases, and rejoins after a loss. Subscribes to the
    /// breakers' changes at once (none made after this call is missed); the
    /// rest runs in the returned future.
    pub(crate) fn run(
        self,
        connection: Arc<ManagedConnection>,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let receivers: Vec<_> = self
            .inner
            .breakers
            .iter()
            .map(|(name, b)| (name.clone(), b.transitions(), b.streaks()))
            .collect();
        self.run_with(receivers, connection, shutdown)
    }

    async fn run_with(
        self,
        receivers: Vec<(
            String,
            tokio::sync::broadcast::Receiver<Transition>,
            watch::Receiver<u32>,
        )>,
        connection: Arc<ManagedConnection>,
        shutdown: CancellationToken,
    ) {
        let (tx, mut local) = mpsc::unbounded_channel::<Local>();
        let mut forwarders = tokio::task::JoinSet::new();
        for (name, mut rx, mut streaks) in receivers {
            let (tx, streak_tx, streak_name) = (tx.clone(), tx.clone(), name.clone());
            forwarders.spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(t) => {
                            if tx.send(Local::Change(name.clone(), t)).is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            warn!(breaker = %name, missed = n, "breaker changes were not all announced to the fleet");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            forwarders.spawn(async move {
                while streaks.changed().await.is_ok() {
                    streaks.borrow_and_update();
                    if streak_tx.send(Local::Streak(streak_name.clone())).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        loop {
            // Changes made meanwhile are stamped as they come (and announced
            // on rejoining); streaks only matter to a joined fleet.
            let conn = loop {
                tokio::select! {
                    conn = connection.connection(&shutdown) => break conn,
                    change = local.recv() => match change {
                        Some(change) => self.away(change),
                        None => return,
                    },
                }
            };
            let Some((_, conn)) = conn else { return };
            match session::run(&self, &conn, &mut local, &shutdown).await {
                End::Shutdown => return,
                End::Channel(why) => {
                    // The connection is fine, and still holds any lease this
                    // worker took: let them go, for the fleet to go on.
                    session::let_go(&self, &conn).await;
                    self.lost(&why);
                }
                End::Connection(why) => {
                    self.lost(&why);
                    connection.report_trouble();
                }
            }
            let rejoin_at = Instant::now() + REJOIN_DELAY;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(rejoin_at) => break,
                    change = local.recv() => match change {
                        Some(change) => self.away(change),
                        None => return,
                    },
                }
            }
        }
    }

    /// A change made while not joined.
    fn away(&self, change: Local) {
        if let Local::Change(name, t) = change
            && t.reason != TransitionReason::Fleet
            && !t.local
        {
            self.stamp_local(&name, &t);
            self.record_announced(
                &name,
                t.at,
                Err("this worker is not joined to the fleet: announced when it rejoins".into()),
            );
        }
    }

    fn record_announced(&self, breaker: &str, at: Instant, result: Result<(), String>) {
        self.inner.announced.send_modify(|m| {
            m.insert(breaker.to_owned(), Announced { at, result });
        });
    }

    fn lost(&self, why: &str) {
        let first = !matches!(*self.inner.link.borrow(), Link::LocalOnly { .. });
        self.inner.link.send_replace(Link::LocalOnly {
            since: std::time::SystemTime::now(),
            why: why.to_owned(),
        });
        // The broker frees the leases with the connection; without the
        // fleet each worker probes for itself, on its own calls.
        for lease in lock(&self.inner.leases).values_mut() {
            lease.forget();
        }
        lock(&self.inner.problems).retain(|(kind, _), _| *kind != "fleet.lease");
        lock(&self.inner.holders).clear();
        for tally in lock(&self.inner.tallies).values_mut() {
            tally.clear();
        }
        for breaker in self.inner.breakers.values() {
            breaker.set_fleet_gated(false);
            breaker.set_fleet_streak(0);
            breaker.set_fleet_window(crate::breaker::Counts::default());
        }
        if first {
            warn!(exchange = %self.inner.exchange, error = %why, "lost the fleet: each breaker now acts on this worker's calls alone, until the fleet is back");
        } else {
            debug!(exchange = %self.inner.exchange, error = %why, "the fleet is still unreachable");
        }
    }

    /// Stamps a change made here; `None` for one taken over from the fleet
    /// or one that is this worker's alone.
    fn stamp_local(&self, name: &str, t: &Transition) -> Option<Entry> {
        if t.reason == TransitionReason::Fleet || t.local {
            return None;
        }
        self.clear_tally(name);
        let mut ledgers = lock(&self.inner.ledgers);
        let ledger = ledgers.get_mut(name)?;
        let (now, now_ms) = (Instant::now(), unix_ms());
        let stamp = ledger.local(&self.inner.origin, now, now_ms);
        let entry = entry_for(name, stamp, t, now, now_ms);
        ledger.last = Some(entry.clone());
        Some(entry)
    }

    /// The states to tell a joiner: every breaker this worker knows a
    /// fleet state of, as first announced (stamp and all).
    fn own_entries(&self) -> Vec<Entry> {
        lock(&self.inner.ledgers)
            .values()
            .filter_map(|l| l.last.clone())
            .collect()
    }

    /// This worker's failures in a row and window for `name`, to announce
    /// while the breaker is closed (calls that end after it opened count
    /// nowhere).
    fn own_streak(&self, name: &str) -> Option<StreakEntry> {
        let breaker = self.inner.breakers.get(name)?;
        if breaker.state() != crate::breaker::BreakerState::Closed {
            return None;
        }
        let epoch = lock(&self.inner.ledgers).get(name)?.stamp.epoch;
        let w = breaker.own_window();
        // Read now, not as last heard: a streak ends with the state it
        // tripped (a report of it after the change would trip again).
        Some(StreakEntry {
            name: name.to_owned(),
            epoch,
            failures: breaker.own_streak(),
            window: Some(wire::WireCounts {
                calls: w.calls,
                failures: w.failures,
                slow: w.slow,
            }),
        })
    }

    /// Another worker's streak and window: the breaker counts the fleet's
    /// (those fresh, and of the current epoch: a report from before the
    /// last change is over). A trip they cause names who contributed.
    fn their_streak(&self, from: &str, streak: &StreakEntry) {
        let Some(breaker) = self.inner.breakers.get(&streak.name) else {
            self.inner.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let current = lock(&self.inner.ledgers)
            .get(&streak.name)
            .is_some_and(|l| streak.epoch >= l.stamp.epoch);
        if !current {
            self.inner.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(t) = lock(&self.inner.tallies).get_mut(&streak.name) {
            t.report(from, streak, Instant::now());
        }
        self.apply_tally(&streak.name, breaker);
    }

    /// Hands the fleet's current sums to the breaker.
    fn apply_tally(&self, name: &str, breaker: &Breaker) {
        let (sums, contributors) = {
            let mut tallies = lock(&self.inner.tallies);
            let Some(t) = tallies.get_mut(name) else {
                return;
            };
            (
                t.sums(breaker.config().window, Instant::now()),
                t.contributors(),
            )
        };
        let tripped = breaker
            .set_fleet_streak(sums.streak)
            .or_else(|| breaker.set_fleet_window(sums.window));
        if let Some(t) = tripped {
            warn!(
                breaker = %name,
                reason = t.reason.name(),
                calls = t.counts.calls,
                failures = t.counts.failures,
                consecutive_failures = t.consecutive_failures,
                contributors = %contributors,
                "the fleet's calls tripped the breaker (this worker's and the others' counted together)"
            );
        }
    }

    /// True when another worker's window of `name` has failures.
    fn others_failing(&self, name: &str) -> bool {
        let Some(breaker) = self.inner.breakers.get(name) else {
            return false;
        };
        lock(&self.inner.tallies).get_mut(name).is_some_and(|t| {
            t.sums(breaker.config().window, Instant::now())
                .window
                .failures
                > 0
        })
    }

    /// Re-sums every breaker's tally (reports age out).
    fn refresh_tallies(&self) {
        for (name, breaker) in &self.inner.breakers {
            let stale = lock(&self.inner.tallies)
                .get(name)
                .is_some_and(|t| !t.is_empty());
            if stale {
                self.apply_tally(name, breaker);
            }
        }
    }

    /// A breaker changed (here or in the fleet): the reports before it are
    /// over.
    fn clear_tally(&self, name: &str) {
        if let Some(t) = lock(&self.inner.tallies).get_mut(name) {
            t.clear();
        }
    }

    /// Takes an announced state over if it is newer.
    fn take_over(&self, from: &str, entry: &Entry) -> Verdict {
        let Some(breaker) = self.inner.breakers.get(&entry.name) else {
            self.inner.ignored.fetch_add(1, Ordering::Relaxed);
            return Verdict::Stale;
        };
        let (now, now_ms) = (Instant::now(), unix_ms());
        let verdict = {
            let mut ledgers = lock(&self.inner.ledgers);
            let Some(ledger) = ledgers.get_mut(&entry.name) else {
                return Verdict::Stale;
            };
            ledger.accept(entry, now, now_ms)
        };
        match verdict {
            Verdict::Taken => {}
            Verdict::Stale => {
                self.inner.ignored.fetch_add(1, Ordering::Relaxed);
                return verdict;
            }
            Verdict::TooFar => {
                self.inner.ignored.fetch_add(1, Ordering::Relaxed);
                let detail = format!(
                    "refused an announcement of epoch {} from {} (via {}): epochs are times in milliseconds, and this one is {} ahead of this worker's clock (at most {}s may be): forged, or that worker's clock is ahead (keep the workers' clocks in sync, with NTP say)",
                    entry.epoch,
                    crate::text::printable(&entry.origin),
                    crate::text::printable(from),
                    humantime::format_duration(Duration::from_millis(
                        entry.epoch.saturating_sub(now_ms).min(u64::MAX / 2)
                    )),
                    ledger::MAX_AHEAD.as_secs(),
                );
                // Once while the problem shows (a repeating sender would
                // flood the log); its detail in /breakers stays current.
                let showing =
                    lock(&self.inner.problems).contains_key(&("fleet.epoch", entry.name.clone()));
                if showing {
                    debug!(breaker = %entry.name, "{detail}");
                } else {
                    warn!(breaker = %entry.name, "{detail}");
                }
                self.problem("fleet.epoch", &entry.name, detail, Some(PROBLEM_LINGERS));
                return verdict;
            }
        }
        self.clear_tally(&entry.name);
        let remote = fleet_state(entry, now, unix_ms(), breaker.config().max_open_timeout);
        let before = breaker.state();
        let after = breaker.adopt(remote);
        macro_rules! followed {
            ($level:ident) => {
                $level!(
                    breaker = %entry.name,
                    from = before.name(),
                    to = after.name(),
                    announced = entry.state.name(),
                    reason = %crate::text::printable(&entry.reason),
                    origin = %crate::text::printable(&entry.origin),
                    via = %crate::text::printable(from),
                    epoch = entry.epoch,
                    "breaker follows the fleet"
                )
            };
        }
        if before == after {
            followed!(debug);
        } else {
            followed!(info);
        }
        verdict
    }

    /// How long a member counts as live after its last heartbeat.
    fn member_fresh(&self) -> Duration {
        session::hello_every(&self.inner.breakers) * 3
    }

    /// How long a lease holder's announcement counts: about two open
    /// periods, and never less than a few heartbeats.
    fn lease_fresh(&self, breaker: &Breaker) -> Duration {
        (breaker.config().open_timeout * 2).max(self.member_fresh() + Duration::from_secs(1))
    }

    /// The other worker that announced holding `breaker`'s lease lately.
    fn live_holder(&self, name: &str, now: Instant) -> Option<String> {
        let fresh = self.lease_fresh(self.inner.breakers.get(name)?);
        lock(&self.inner.holders)
            .get(name)
            .filter(|(_, at)| now.saturating_duration_since(*at) <= fresh)
            .map(|(origin, _)| origin.clone())
    }

    /// The other workers heard within [`member_fresh`](Self::member_fresh).
    fn live_members(&self, now: Instant) -> Vec<String> {
        let fresh = self.member_fresh();
        lock(&self.inner.members)
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) <= fresh)
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// Those of `members` whose heartbeats hold an epoch of `breaker` below
    /// `epoch` (and, if `unknown`, those that have not said).
    fn behind(&self, members: &[String], breaker: &str, epoch: u64, unknown: bool) -> Vec<String> {
        let epochs = lock(&self.inner.epochs);
        members
            .iter()
            .filter(|m| {
                epochs
                    .get(*m)
                    .and_then(|e| e.get(breaker))
                    .map_or(unknown, |e| *e < epoch)
            })
            .cloned()
            .collect()
    }

    /// Shows, per breaker, the live members whose heartbeats still hold an
    /// older epoch than this worker's own last change, [`UNHEARD_AFTER`]
    /// after it: they refuse its announcements (its clock is ahead) or do
    /// not get them. Solved when they catch up, or someone changes the
    /// breaker after.
    fn refresh_unheard(&self) {
        let now = Instant::now();
        let members = self.live_members(now);
        for name in self.inner.breakers.keys() {
            let own = lock(&self.inner.ledgers).get(name).and_then(|l| {
                (l.stamp.origin == self.inner.origin
                    && l.age(now).is_some_and(|age| age >= UNHEARD_AFTER))
                .then(|| (l.stamp.epoch, l.age(now).unwrap_or_default()))
            });
            let behind: Vec<String> = own
                .map(|(epoch, _)| {
                    self.behind(&members, name, epoch, false)
                        .iter()
                        .map(|m| crate::text::printable(m))
                        .collect()
                })
                .unwrap_or_default();
            match own {
                Some((epoch, age)) if !behind.is_empty() => self.problem(
                    "fleet.unheard",
                    name,
                    format!(
                        "{} other worker(s) still hold an older state of this breaker {}s after this worker changed it (epoch {epoch}): {}; they refuse its announcements (is this worker's clock ahead? see their fleet.epoch problems) or do not get them",
                        behind.len(),
                        age.as_secs(),
                        behind.join(", ")
                    ),
                    None,
                ),
                _ => self.solved("fleet.unheard", name),
            }
        }
    }

    /// A heartbeat from another worker.
    fn hello(&self, from: &str, leases: &[String], epochs: &BTreeMap<String, u64>) {
        let now = Instant::now();
        {
            let mut members = lock(&self.inner.members);
            if members.len() >= MAX_MEMBERS && !members.contains_key(from) {
                let fresh = self.member_fresh();
                members.retain(|_, at| now.saturating_duration_since(*at) <= fresh);
                lock(&self.inner.epochs).retain(|m, _| members.contains_key(m));
            }
            if members.len() < MAX_MEMBERS || members.contains_key(from) {
                members.insert(from.to_owned(), now);
                let known = epochs
                    .iter()
                    .filter(|(name, _)| self.inner.breakers.contains_key(*name))
                    .map(|(name, epoch)| (name.clone(), *epoch))
                    .collect();
                lock(&self.inner.epochs).insert(from.to_owned(), known);
            }
        }
        self.inner.hellos.send_modify(|n| *n = n.wrapping_add(1));
        // A lease it no longer names, it let go of.
        lock(&self.inner.holders)
            .retain(|name, (holder, _)| holder != from || leases.contains(name));
        for name in leases {
            let Some(breaker) = self.inner.breakers.get(name) else {
                continue;
            };
            lock(&self.inner.holders).insert(name.clone(), (from.to_owned(), now));
            let mut leases = lock(&self.inner.leases);
            let Some(lease) = leases.get_mut(name) else {
                continue;
            };
            if !lease.held && lease.holder_heard() {
                drop(leases);
                self.solved("fleet.lease", name);
                info!(breaker = %name, holder = %crate::text::printable(from), "a fleet member holds the probe lease again: this worker waits for its verdict instead of probing");
                breaker.set_fleet_gated(true);
            }
        }
    }
}

/// A default value per breaker.
fn each<T: Default>(breakers: &BTreeMap<String, Breaker>) -> BTreeMap<String, T> {
    breakers.keys().map(|k| (k.clone(), T::default())).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerState;

    fn fleet() -> Fleet {
        let settings = FleetSettings {
            exchange: Some("x".into()),
            worker_id: Some("me".into()),
            ..FleetSettings::default()
        };
        let breakers = [(
            "dep".to_owned(),
            Breaker::new("dep", crate::breaker::BreakerConfig::default()),
        )]
        .into();
        Fleet::new(&settings, &BrokerSettings::default(), &breakers)
            .unwrap()
            .unwrap()
    }

    fn problems(f: &Fleet) -> Vec<String> {
        f.view().problems.iter().map(|p| p.kind.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_live_members_do_not_take_over_is_reported_until_they_do() {
        let f = fleet();
        let breaker = f.inner.breakers["dep"].clone();
        let t = Transition {
            from: BreakerState::Closed,
            to: breaker.force_open(),
            reason: TransitionReason::ManualOpen,
            counts: crate::breaker::Counts::default(),
            consecutive_failures: 0,
            at: Instant::now(),
            local: false,
        };
        let mine = f.stamp_local("dep", &t).unwrap().epoch;
        let old = BTreeMap::from([("dep".to_owned(), mine - 5)]);
        f.hello("other#1", &[], &old);
        f.refresh_unheard();
        assert!(problems(&f).is_empty(), "not before {UNHEARD_AFTER:?}");
        tokio::time::advance(UNHEARD_AFTER).await;
        f.hello("other#1", &[], &old);
        f.refresh_unheard();
        let view = f.view();
        let p = view
            .problems
            .iter()
            .find(|p| p.kind == "fleet.unheard")
            .unwrap_or_else(|| panic!("reported: {:?}", problems(&f)));
        assert!(p.detail.contains("other#1"), "{}", p.detail);
        // It took it over: solved.
        f.hello("other#1", &[], &BTreeMap::from([("dep".to_owned(), mine)]));
        f.refresh_unheard();
        assert!(problems(&f).is_empty(), "{:?}", problems(&f));
        // A member that went silent does not count.
        f.hello("gone#1", &[], &old);
        tokio::time::advance(f.member_fresh() + Duration::from_secs(1)).await;
        f.hello("other#1", &[], &BTreeMap::from([("dep".to_owned(), mine)]));
        f.refresh_unheard();
        assert!(problems(&f).is_empty(), "{:?}", problems(&f));
    }
}
