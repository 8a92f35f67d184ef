//! A fleet of workers acting as one guard (`[fleet]`).
//!
//! ```text
//!  worker A ──┐  state changes (epoch-stamped JSON)   ┌──▶ own queue ──▶ worker A
//!  worker B ──┼──────────▶ fleet exchange (fanout) ───┼──▶ own queue ──▶ worker B
//!  worker C ──┘                                        └──▶ own queue ──▶ worker C
//!
//!  probe lease of breaker X: the exclusive queue "EXCHANGE.lease.X";
//!  the worker whose connection declared it probes, the broker frees it
//!  when that connection dies
//! ```
//!
//! - Each worker announces every change of its breakers (opened with reason
//!   and end of the open period, half-open, closed, forced, disabled, reset)
//!   on the fanout exchange; every worker reads them through its own
//!   exclusive, auto-delete queue and takes over the newer ones (see
//!   [`ledger`]). A trip anywhere opens the breaker everywhere until the same
//!   time.
//! - Only the worker holding a breaker's probe lease starts its trials (or
//!   runs its health check); the others stay open until the verdict comes.
//!   The lease is an exclusive queue: the broker gives it to one connection
//!   and deletes it when that connection closes or dies, so another worker
//!   takes over at its next attempt.
//! - A worker that joins asks for the fleet's state and waits up to
//!   `fleet.join_wait` for it before its consumers start.
//! - A worker that loses the fleet (its channel or connection) guards on its
//!   own, says so in its log, `/readyz` and `/breakers`, and rejoins.

pub(crate) mod ledger;
pub(crate) mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::ledger::{Ledger, entry_for, fleet_state, unix_ms};
use self::wire::{Entry, Envelope, Kind, StreakEntry, VERSION};
use crate::amqp::connection::ManagedConnection;
use crate::breaker::{Breaker, BreakerState, Transition, TransitionReason};
use crate::config::FleetSettings;
use crate::error::{amqp_error, describe};
use crate::status::{BreakerFleetView, FleetView};

/// The longest `fleet.worker_id`.
pub(crate) const MAX_WORKER_ID: usize = 100;

/// The longest `fleet.join_wait`.
pub(crate) const MAX_JOIN_WAIT: Duration = Duration::from_secs(60);

/// At most this many workers' streaks are kept per breaker.
const MAX_STREAK_ORIGINS: usize = 256;

/// How often leases are looked at.
const TICK: Duration = Duration::from_millis(200);

/// After the fleet was lost, the next join waits this long.
const REJOIN_DELAY: Duration = Duration::from_secs(1);

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

/// Each other worker's failures in a row for one breaker, and when heard.
type Streaks = BTreeMap<String, (u32, Instant)>;

/// What happened on this worker that the fleet must hear.
#[derive(Debug)]
enum Local {
    /// A breaker changed state.
    Change(String, Transition),
    /// A breaker's failures in a row changed.
    Streak(String, u32),
}

#[derive(Debug, Default)]
struct Lease {
    held: bool,
    next_attempt: Option<Instant>,
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
    breakers: BTreeMap<String, Breaker>,
    ledgers: Mutex<BTreeMap<String, Ledger>>,
    leases: Mutex<BTreeMap<String, Lease>>,
    /// Per breaker, each other worker's failures in a row and when heard.
    streaks: Mutex<BTreeMap<String, Streaks>>,
    link: watch::Sender<Link>,
    /// Bumped by every state message from another worker.
    heard: watch::Sender<u64>,
    seq: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    ignored: AtomicU64,
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
    pub(crate) fn new(
        settings: &FleetSettings,
        breakers: &BTreeMap<String, Breaker>,
    ) -> Option<Self> {
        let exchange = settings.exchange.clone()?;
        let id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
        let (link, _) = watch::channel(Link::Joining);
        let (heard, _) = watch::channel(0);
        Some(Self {
            inner: Arc::new(Inner {
                exchange,
                origin: format!("{}#{}", crate::text::printable(&id), incarnation()),
                join_wait: settings.join_wait,
                breakers: breakers.clone(),
                ledgers: Mutex::new(
                    breakers
                        .keys()
                        .map(|k| (k.clone(), Ledger::default()))
                        .collect(),
                ),
                leases: Mutex::new(
                    breakers
                        .keys()
                        .map(|k| (k.clone(), Lease::default()))
                        .collect(),
                ),
                streaks: Mutex::new(BTreeMap::new()),
                link,
                heard,
                seq: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                ignored: AtomicU64::new(0),
            }),
        })
    }

    /// True while joined: manual operations then apply fleet-wide.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // shown by the admin endpoint
    pub(crate) fn is_joined(&self) -> bool {
        matches!(*self.inner.link.borrow(), Link::Joined { .. })
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
        FleetView {
            exchange: self.inner.exchange.clone(),
            worker: self.inner.origin.clone(),
            state: link.name().to_owned(),
            since: since.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            error,
            sent: self.inner.sent.load(Ordering::Relaxed),
            received: self.inner.received.load(Ordering::Relaxed),
            ignored: self.inner.ignored.load(Ordering::Relaxed),
        }
    }

    /// One breaker's fleet state, for `/breakers`.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))] // shown by the admin endpoint
    pub(crate) fn breaker_view(&self, name: &str) -> Option<BreakerFleetView> {
        let ledgers = lock(&self.inner.ledgers);
        let ledger = ledgers.get(name)?;
        let lease_held = lock(&self.inner.leases).get(name).is_some_and(|l| l.held);
        Some(BreakerFleetView {
            epoch: ledger.stamp.epoch,
            origin: (!ledger.stamp.origin.is_empty()).then(|| ledger.stamp.origin.clone()),
            announced: ledger.last.as_ref().map(|e| e.state.name().to_owned()),
            lease_held,
            gated: self
                .inner
                .breakers
                .get(name)
                .is_some_and(Breaker::fleet_gated),
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
                // Every other worker answers at once; the rest of the
                // answers come within moments of the first.
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(200))) => {}
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
                    let n = *streaks.borrow_and_update();
                    if streak_tx
                        .send(Local::Streak(streak_name.clone(), n))
                        .is_err()
                    {
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
            let why = match self.session(&conn, &mut local, &shutdown).await {
                Ok(()) => return,
                Err(why) => why,
            };
            self.lost(&why);
            connection.report_trouble();
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
        if let Local::Change(name, t) = change {
            self.stamp_local(&name, &t);
        }
    }

    /// Joined once: returns `Ok` on shutdown, or why the fleet was lost.
    async fn session(
        &self,
        conn: &Connection,
        local: &mut mpsc::UnboundedReceiver<Local>,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let (channel, mut consumer) = self.subscribe(conn).await?;
        let exchange = &self.inner.exchange;
        // Changes made while away first: they are announced with the rest.
        while let Ok(change) = local.try_recv() {
            self.away(change);
        }
        let was = self.inner.link.send_replace(Link::Joined {
            since: std::time::SystemTime::now(),
        });
        for (name, breaker) in &self.inner.breakers {
            let held = lock(&self.inner.leases).get(name).is_some_and(|l| l.held);
            breaker.set_fleet_gated(!held);
        }
        if matches!(was, Link::LocalOnly { .. }) {
            info!(exchange = %exchange, worker = %self.inner.origin, "rejoined the fleet: breakers follow the fleet again");
        } else {
            info!(exchange = %exchange, worker = %self.inner.origin, "joined the fleet");
        }
        self.send(&channel, Kind::Sync, Vec::new(), Vec::new())
            .await?;
        let own = self.own_entries();
        if !own.is_empty() {
            self.send(&channel, Kind::State, own, Vec::new()).await?;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = channel.close(200, "worker shutting down".into()).await;
                    return Ok(());
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(d)) => self.received(&channel, &d.data).await?,
                    Some(Err(e)) => return Err(format!("reading the fleet queue: {}", describe(&e))),
                    None => return Err("the broker cancelled this worker's fleet queue".into()),
                },
                change = local.recv() => match change {
                    None => return Ok(()),
                    Some(Local::Change(name, t)) => {
                        if let Some(entry) = self.stamp_local(&name, &t) {
                            self.send(&channel, Kind::State, vec![entry], Vec::new()).await?;
                        }
                    }
                    Some(Local::Streak(name, failures)) => {
                        if let Some(streak) = self.own_streak(&name, failures) {
                            self.send(&channel, Kind::Streak, Vec::new(), vec![streak]).await?;
                        }
                    }
                },
                _ = tick.tick() => self.leases(conn).await?,
            }
        }
    }

    /// Declares the exchange and this worker's queue, and reads it.
    async fn subscribe(&self, conn: &Connection) -> Result<(Channel, lapin::Consumer), String> {
        let exchange = &self.inner.exchange;
        let fail = |what: &str| {
            let what = what.to_owned();
            move |e: lapin::Error| format!("{what}: {}", describe(&e))
        };
        let channel = conn
            .create_channel()
            .await
            .map_err(fail("opening the fleet channel"))?;
        channel
            .exchange_declare(
                ShortString::from(exchange.as_str()),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(fail(&format!("declaring the fleet exchange {exchange:?}")))?;
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(fail("declaring this worker's fleet queue"))?;
        let queue = queue.name().clone();
        channel
            .queue_bind(
                queue.clone(),
                ShortString::from(exchange.as_str()),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail("binding this worker's fleet queue"))?;
        let consumer = channel
            .basic_consume(
                queue,
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(fail("reading this worker's fleet queue"))?;
        Ok((channel, consumer))
    }

    fn lost(&self, why: &str) {
        let first = !matches!(*self.inner.link.borrow(), Link::LocalOnly { .. });
        self.inner.link.send_replace(Link::LocalOnly {
            since: std::time::SystemTime::now(),
            why: why.to_owned(),
        });
        // The broker frees the leases with the connection; without the
        // fleet each worker probes for itself.
        for lease in lock(&self.inner.leases).values_mut() {
            *lease = Lease::default();
        }
        for breaker in self.inner.breakers.values() {
            breaker.set_fleet_gated(false);
        }
        if first {
            warn!(exchange = %self.inner.exchange, error = %why, "lost the fleet: each breaker now acts on this worker's calls alone, until the fleet is back");
        } else {
            debug!(exchange = %self.inner.exchange, error = %why, "the fleet is still unreachable");
        }
    }

    /// Stamps a change made here; `None` for one taken over from the fleet.
    fn stamp_local(&self, name: &str, t: &Transition) -> Option<Entry> {
        if t.reason == TransitionReason::Fleet {
            return None;
        }
        self.clear_streaks(name);
        let mut ledgers = lock(&self.inner.ledgers);
        let ledger = ledgers.get_mut(name)?;
        let stamp = ledger.local(&self.inner.origin);
        let entry = entry_for(name, stamp, t, Instant::now(), unix_ms());
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

    async fn send(
        &self,
        channel: &Channel,
        kind: Kind,
        breakers: Vec<Entry>,
        streaks: Vec<StreakEntry>,
    ) -> Result<(), String> {
        let envelope = Envelope {
            v: VERSION,
            worker: self.inner.origin.clone(),
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1,
            kind,
            breakers,
            streaks,
        };
        channel
            .basic_publish(
                ShortString::from(self.inner.exchange.as_str()),
                ShortString::from(""),
                BasicPublishOptions::default(),
                &envelope.encode(),
                BasicProperties::default()
                    .with_content_type(ShortString::from("application/json"))
                    .with_type(ShortString::from("rabbit-guard.fleet")),
            )
            .await
            .map_err(|e| format!("announcing to the fleet: {}", describe(&e)))?;
        self.inner.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn received(&self, channel: &Channel, body: &[u8]) -> Result<(), String> {
        let envelope = match wire::parse(body) {
            Ok(e) => e,
            Err(why) => {
                self.inner.ignored.fetch_add(1, Ordering::Relaxed);
                debug!(exchange = %self.inner.exchange, why = %crate::text::printable(&why), "ignored a message on the fleet exchange");
                return Ok(());
            }
        };
        if envelope.worker == self.inner.origin {
            return Ok(());
        }
        self.inner.received.fetch_add(1, Ordering::Relaxed);
        match envelope.kind {
            Kind::Sync => {
                // Answer even with nothing to tell: the joiner then knows
                // the fleet has been heard.
                self.send(channel, Kind::State, self.own_entries(), Vec::new())
                    .await?;
            }
            Kind::State => {
                for entry in &envelope.breakers {
                    self.take_over(&envelope.worker, entry);
                }
                self.inner.heard.send_modify(|n| *n += 1);
            }
            Kind::Streak => {
                for streak in &envelope.streaks {
                    self.their_streak(&envelope.worker, streak);
                }
            }
        }
        Ok(())
    }

    /// This worker's failures in a row, to announce while the breaker is
    /// closed (failures of calls that end after it opened count nowhere).
    fn own_streak(&self, name: &str, failures: u32) -> Option<StreakEntry> {
        let breaker = self.inner.breakers.get(name)?;
        if breaker.state() != BreakerState::Closed {
            return None;
        }
        let epoch = lock(&self.inner.ledgers).get(name)?.stamp.epoch;
        Some(StreakEntry {
            name: name.to_owned(),
            epoch,
            failures,
        })
    }

    /// Another worker's failures in a row: the breaker counts the sum of
    /// the fleet's (those heard within the breaker's window, and of the
    /// current epoch: a streak from before the last change is over).
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
        let now = Instant::now();
        let window = breaker.config().window;
        let sum = {
            let mut all = lock(&self.inner.streaks);
            let theirs = all.entry(streak.name.clone()).or_default();
            if theirs.len() < MAX_STREAK_ORIGINS || theirs.contains_key(from) {
                theirs.insert(from.to_owned(), (streak.failures, now));
            }
            theirs.retain(|_, (n, at)| *n > 0 && now.duration_since(*at) <= window);
            theirs
                .values()
                .fold(0u32, |sum, (n, _)| sum.saturating_add(*n))
        };
        breaker.set_fleet_streak(sum);
    }

    /// A breaker changed (here or in the fleet): the streaks before it are
    /// over.
    fn clear_streaks(&self, name: &str) {
        lock(&self.inner.streaks).remove(name);
    }

    fn take_over(&self, from: &str, entry: &Entry) {
        let Some(breaker) = self.inner.breakers.get(&entry.name) else {
            self.inner.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !lock(&self.inner.ledgers)
            .get_mut(&entry.name)
            .is_some_and(|l| l.accept(entry))
        {
            self.inner.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.clear_streaks(&entry.name);
        let remote = fleet_state(
            entry,
            Instant::now(),
            unix_ms(),
            breaker.config().max_open_timeout,
        );
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
    }

    /// Takes the probe lease of every breaker whose trial is due here.
    async fn leases(&self, conn: &Connection) -> Result<(), String> {
        let now = Instant::now();
        for (name, breaker) in &self.inner.breakers {
            let due = match breaker.state() {
                BreakerState::Open { until } => {
                    breaker.config().health_check.is_some() || now >= until
                }
                _ => false,
            };
            let attempt = {
                let leases = lock(&self.inner.leases);
                let lease = leases.get(name);
                due && lease.is_some_and(|l| !l.held && l.next_attempt.is_none_or(|at| now >= at))
            };
            if !attempt {
                continue;
            }
            let won = self.try_lease(conn, name).await?;
            let retry = breaker
                .config()
                .open_timeout
                .clamp(Duration::from_secs(1), Duration::from_secs(30));
            if let Some(lease) = lock(&self.inner.leases).get_mut(name) {
                lease.held = won;
                lease.next_attempt = (!won).then(|| now + retry);
            }
            if won {
                info!(breaker = %name, lease = %lease_queue(&self.inner.exchange, name), "took the probe lease: this worker runs the breaker's trials for the fleet");
                breaker.set_fleet_gated(false);
            } else {
                debug!(breaker = %name, "another worker holds the probe lease");
            }
        }
        Ok(())
    }

    /// Declares the lease queue exclusively: true when this worker got it,
    /// false when another connection holds it.
    async fn try_lease(&self, conn: &Connection, breaker: &str) -> Result<bool, String> {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| format!("opening a lease channel: {}", describe(&e)))?;
        let declared = channel
            .queue_declare(
                ShortString::from(lease_queue(&self.inner.exchange, breaker)),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => {
                let _ = channel.close(200, "lease taken".into()).await;
                Ok(true)
            }
            // 405 RESOURCE_LOCKED: another connection holds it (and the
            // broker closed this channel).
            Err(e) if amqp_error(&e).is_some_and(|(code, _)| code == 405) => Ok(false),
            Err(e) => Err(format!(
                "taking the probe lease of {breaker:?}: {}",
                describe(&e)
            )),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
