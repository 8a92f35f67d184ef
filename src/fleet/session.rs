//! One stay in the fleet: from joining (finding this worker's broker user,
//! declaring the exchange and its own queue) until the connection or the
//! channel is gone for good, or shutdown.
//!
//! Every announcement is published mandatory on a confirm-mode channel. A
//! returned one (no queue bound: the exchange was deleted and declared
//! again, say) or one the channel died for (a deleted exchange is a 404)
//! re-declares the exchange and this worker's queue and is sent again. A
//! worker also reads its own heartbeats: one that stops hearing itself
//! (its queue lost its binding) re-declares too. A channel closed by the
//! broker is handled here; only a connection-level failure is reported to
//! the connection's supervisor.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::lease::{Attempt, Decision};
use super::ledger::{Verdict, unix_ms};
use super::tally::WINDOW_REFRESH;
use super::trust::{MAC_HEADER, Trust};
use super::wire::{self, Entry, Envelope, Kind, StreakEntry, VERSION, WireCounts};
use super::{Fleet, Local, lease_queue, lock};
use crate::breaker::{Breaker, BreakerState};
use crate::error::{amqp_error, describe};

/// How often leases, windows and hearing are looked at.
const TICK: Duration = Duration::from_millis(100);

/// A worker that let the lease go after a failed trial tries to take it
/// again only this long after the next trial is due (the others first).
const LEASE_HANDOVER: Duration = Duration::from_millis(300);

/// A sync is answered at most this often (answers are coalesced).
const ANSWER_EVERY: Duration = Duration::from_millis(500);

/// An answer waits a random delay up to this, so a fleet answers in turn.
const ANSWER_JITTER_MS: u64 = 50;

/// How long the broker may take to confirm an announcement.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// While the fleet's calls fail somewhere, a window that changed is
/// announced at most this often (otherwise every [`WINDOW_REFRESH`]): the
/// rate rules then see the others' calls within a tick.
const WINDOW_EVERY: Duration = TICK;

/// After missing messages, the fleet is asked for its state at most this
/// often.
const RESYNC_AFTER_GAP: Duration = Duration::from_secs(1);

/// Each worker's fleet queue holds at most this many bytes of messages
/// (the broker refuses more: an oversized or flooding message costs the
/// broker, not the worker) …
const QUEUE_MAX_BYTES: i64 = 4 * wire::MAX_MESSAGE as i64;

/// … and at most this many messages …
const QUEUE_MAX_LENGTH: i64 = 2_000;

/// … and hands the worker at most this many at a time.
const PREFETCH: u16 = 16;

/// Attempts to declare the fleet channel again before giving up on it.
const RESUBSCRIBE_ATTEMPTS: u32 = 3;

/// The heartbeat: often enough that a lease holder is heard several times
/// per open period, and a deaf worker notices within seconds.
pub(super) fn hello_every(breakers: &BTreeMap<String, Breaker>) -> Duration {
    breakers
        .values()
        .map(|b| b.config().open_timeout / 4)
        .min()
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
    Shutdown,
    /// The fleet channel is gone and could not be declared again; the
    /// connection is fine.
    Channel(String),
    /// The connection is gone.
    Connection(String),
}

struct Session<'a> {
    fleet: &'a Fleet,
    conn: &'a Connection,
    trust: Trust,
    user: String,
    channel: Channel,
    consumer: lapin::Consumer,
    /// This worker's fleet queue.
    queue: ShortString,
    /// When this worker last asked for the fleet's state.
    sync_at: Instant,
    answer_due: Option<Instant>,
    last_answer: Option<Instant>,
    hello_every: Duration,
    next_hello: Instant,
    /// The first own message sent since the last one heard back.
    awaiting_own: Option<(u64, Instant)>,
    /// Per breaker: the window and failures in a row last announced (and
    /// when).
    windows: BTreeMap<String, (WireCounts, u32, Instant)>,
    /// Times the fleet channel was declared again.
    redeclared: u64,
    /// Per other worker, the highest message number heard.
    seen: BTreeMap<String, u64>,
    /// When to ask for the fleet's state again, after missed messages.
    resync_due: Option<Instant>,
}

/// Joins and stays until shutdown or a loss.
pub(super) async fn run(
    fleet: &Fleet,
    conn: &Connection,
    local: &mut mpsc::UnboundedReceiver<Local>,
    shutdown: &CancellationToken,
) -> End {
    let (channel, consumer, queue) = match subscribe(fleet, conn).await {
        Ok(c) => c,
        Err(why) => return ended(conn, why),
    };
    let user = match own_user(fleet, conn).await {
        Ok(user) => user,
        Err(end) => return end,
    };
    *lock(&fleet.inner.user) = Some(user.clone());
    let users = if fleet.inner.users.is_empty() {
        vec![user.clone()]
    } else {
        fleet.inner.users.clone()
    };
    if !users.contains(&user) {
        // Its own messages would be refused here and everywhere else.
        let _ = channel.close(200, "not a fleet member".into()).await;
        return End::Channel(format!(
            "this worker connects as broker user {:?}, which is not in fleet.users {users:?}: add it there (on every worker), or connect as one of those users",
            crate::text::printable(&user)
        ));
    }
    let trust = Trust::new(users, fleet.inner.key.clone());
    let hello_every = hello_every(&fleet.inner.breakers);
    let mut s = Session {
        fleet,
        conn,
        trust,
        user,
        channel,
        consumer,
        queue,
        sync_at: Instant::now(),
        answer_due: None,
        last_answer: None,
        hello_every,
        next_hello: Instant::now(),
        awaiting_own: None,
        windows: BTreeMap::new(),
        redeclared: 0,
        seen: BTreeMap::new(),
        resync_due: None,
    };
    match s.serve(local, shutdown).await {
        Ok(()) => End::Shutdown,
        Err(end) => end,
    }
}

/// A failure on the fleet channel: the connection's, if it is gone.
fn ended(conn: &Connection, why: String) -> End {
    if conn.status().connected() {
        End::Channel(why)
    } else {
        End::Connection(why)
    }
}

/// The `type` of the message that asks the broker who this worker is.
const WHOAMI: &str = "rabbit-guard.whoami";

/// The broker user this worker's connection is: `fleet.user`, or what the
/// broker says when a message carries a `user_id` that is not it, or (when
/// the user may impersonate others, so the broker says nothing) the URL's.
async fn own_user(fleet: &Fleet, conn: &Connection) -> Result<String, End> {
    if let Some(user) = &fleet.inner.user_setting {
        return Ok(user.clone());
    }
    let fail = |e: lapin::Error| {
        ended(
            conn,
            format!("asking the broker who this worker is: {}", describe(&e)),
        )
    };
    let channel = conn.create_channel().await.map_err(fail)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(fail)?;
    // To the fleet exchange (the one exchange the worker surely may write
    // to): the broker refuses it before routing. Should it let it through
    // (an impersonator), the workers drop it unlogged.
    let sent = channel
        .basic_publish(
            ShortString::from(fleet.inner.exchange.as_str()),
            ShortString::from(""),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default()
                .with_type(ShortString::from(WHOAMI))
                .with_user_id(ShortString::from("rabbit-guard-whoami")),
        )
        .await;
    let told = match sent {
        Ok(confirm) => confirm.await.err(),
        Err(e) => Some(e),
    };
    match told {
        Some(e) => {
            let said = amqp_error(&e).and_then(|(code, text)| {
                let (_, user) = text.split_once("authenticated user was '")?;
                (code == 406).then(|| user.trim_end_matches('\'').to_owned())
            });
            match said {
                Some(user) if !user.is_empty() => Ok(user),
                _ if !conn.status().connected() => Err(End::Connection(describe(&e))),
                _ => fallback(fleet).ok_or_else(|| {
                    End::Channel(format!(
                        "cannot tell which broker user this worker connects as (the broker said: {}); set fleet.user",
                        describe(&e)
                    ))
                }),
            }
        }
        None => {
            let _ = channel.close(200, "asked".into()).await;
            fallback(fleet).ok_or_else(|| {
                End::Channel(
                    "this worker's broker user may impersonate others (the `impersonator` tag), so the broker does not say which it is: set fleet.user"
                        .into(),
                )
            })
        }
    }
}

fn fallback(fleet: &Fleet) -> Option<String> {
    fleet.inner.url_user.clone()
}

/// Declares the exchange and this worker's queue, and reads it.
async fn subscribe(
    fleet: &Fleet,
    conn: &Connection,
) -> Result<(Channel, lapin::Consumer, ShortString), String> {
    let exchange = &fleet.inner.exchange;
    let fail = |what: &str| {
        let what = what.to_owned();
        move |e: lapin::Error| format!("{what}: {}", describe(&e))
    };
    let channel = conn
        .create_channel()
        .await
        .map_err(fail("opening the fleet channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(fail("opening the fleet channel"))?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions { global: false })
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
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(QUEUE_MAX_BYTES),
    );
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(QUEUE_MAX_LENGTH),
    );
    // reject-publish, not drop-head: the broker hands a message straight
    // to a waiting consumer before drop-head looks at the limits.
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let queue = channel
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
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
            queue.clone(),
            ShortString::from(""),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail("reading this worker's fleet queue"))?;
    Ok((channel, consumer, queue))
}

/// Deletes the lease queues this worker holds (its connection stays, the
/// fleet channel is gone): a worker without the fleet must not keep the
/// others waiting for its trials.
pub(super) async fn let_go(fleet: &Fleet, conn: &Connection) {
    let held: Vec<String> = lock(&fleet.inner.leases)
        .iter()
        .filter(|(_, l)| l.held)
        .map(|(name, _)| name.clone())
        .collect();
    for name in held {
        let queue = lease_queue(&fleet.inner.exchange, &name);
        if let Err(e) = delete_lease(conn, &queue).await {
            warn!(breaker = %name, lease = %queue, error = %describe(&e), "could not let the probe lease go: the other workers probe around it after two open periods");
        }
    }
}

/// Deletes a lease queue this worker's connection holds, on a channel of
/// its own.
async fn delete_lease(conn: &Connection, queue: &str) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    let r = channel
        .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
        .await;
    let _ = channel.close(200, "lease let go".into()).await;
    r.map(|_| ())
}

/// Why one publish did not go through.
enum Failed {
    /// The channel is gone (a deleted exchange is a 404 that closes it).
    Channel(String),
    /// Returned: no queue is bound to the exchange.
    Returned,
    /// The broker nacked it, or did not confirm in time.
    Unconfirmed(String),
}

impl Session<'_> {
    async fn serve(
        &mut self,
        local: &mut mpsc::UnboundedReceiver<Local>,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        // Changes made while away first: they are announced with the rest.
        while let Ok(change) = local.try_recv() {
            self.fleet.away(change);
        }
        let inner = &self.fleet.inner;
        let was = inner.link.send_replace(super::Link::Joined {
            since: std::time::SystemTime::now(),
        });
        for (name, breaker) in &inner.breakers {
            let lease = lock(&inner.leases)
                .get(name)
                .map(|l| (l.held, l.problem.is_some()))
                .unwrap_or_default();
            breaker.set_fleet_gated(!lease.0 && !lease.1);
        }
        let users: Vec<&str> = self.trust.users().collect();
        if matches!(was, super::Link::LocalOnly { .. }) {
            info!(exchange = %inner.exchange, worker = %inner.origin, user = %self.user, "rejoined the fleet: breakers follow the fleet again");
        } else {
            info!(exchange = %inner.exchange, worker = %inner.origin, user = %self.user, members = ?users, signed = inner.key.is_some(), "joined the fleet");
        }
        self.hello_all().await?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let answer_at = self
                .answer_due
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = self.channel.close(200, "worker shutting down".into()).await;
                    return Ok(());
                }
                delivery = self.consumer.next() => match delivery {
                    Some(Ok(d)) => self.delivered(d).await?,
                    Some(Err(e)) => self.resubscribe(&format!("reading the fleet queue: {}", describe(&e))).await?,
                    None => self.resubscribe("the broker cancelled this worker's fleet queue").await?,
                },
                change = local.recv() => match change {
                    None => return Ok(()),
                    Some(first) => self.local_changes(first, local).await?,
                },
                () = tokio::time::sleep_until(answer_at) => self.answer().await?,
                _ = tick.tick() => self.tick().await?,
            }
        }
    }

    /// Joining (again): asks for the fleet's state, re-announces the states
    /// this worker knows, and says hello.
    async fn hello_all(&mut self) -> Result<(), End> {
        self.sync_at = Instant::now();
        self.publish(Kind::Sync, Vec::new(), Vec::new(), false)
            .await?;
        let own = self.fleet.own_entries();
        if !own.is_empty() {
            self.publish(Kind::State, own, Vec::new(), false).await?;
        }
        self.hello().await
    }

    async fn hello(&mut self) -> Result<(), End> {
        self.next_hello = Instant::now() + self.hello_every;
        // Binding again is a no-op while bound; it heals a binding lost to
        // a deleted and re-declared exchange, and a deleted one fails here.
        let bound = self
            .channel
            .queue_bind(
                self.queue.clone(),
                ShortString::from(self.fleet.inner.exchange.as_str()),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        if let Err(e) = bound {
            self.resubscribe(&format!(
                "binding this worker's fleet queue again: {}",
                describe(&e)
            ))
            .await?;
        }
        let leases: Vec<String> = lock(&self.fleet.inner.leases)
            .iter()
            .filter(|(_, l)| l.held)
            .map(|(name, _)| name.clone())
            .collect();
        let epochs = lock(&self.fleet.inner.ledgers)
            .iter()
            .map(|(name, l)| (name.clone(), l.stamp.epoch))
            .collect();
        let envelope = self.envelope(Kind::Hello, Vec::new(), Vec::new(), false);
        let envelope = Envelope {
            leases,
            epochs,
            ..envelope
        };
        self.send(envelope).await.map(|_| ())
    }

    fn envelope(
        &self,
        kind: Kind,
        breakers: Vec<Entry>,
        streaks: Vec<StreakEntry>,
        answer: bool,
    ) -> Envelope {
        Envelope {
            v: VERSION,
            worker: self.fleet.inner.origin.clone(),
            seq: self.fleet.inner.seq.fetch_add(1, Ordering::Relaxed) + 1,
            kind,
            breakers,
            streaks,
            leases: Vec::new(),
            epochs: BTreeMap::new(),
            answer,
            at_ms: unix_ms(),
        }
    }

    /// Publishes; one the broker would not confirm is logged and shown as a
    /// `fleet.announce` problem.
    async fn publish(
        &mut self,
        kind: Kind,
        breakers: Vec<Entry>,
        streaks: Vec<StreakEntry>,
        answer: bool,
    ) -> Result<(), End> {
        self.publish_checked(kind, breakers, streaks, answer)
            .await
            .map(|_| ())
    }

    /// Publishes; `Ok(Err(why))` when the broker would not confirm it even
    /// after the exchange and queue were declared again.
    async fn publish_checked(
        &mut self,
        kind: Kind,
        breakers: Vec<Entry>,
        streaks: Vec<StreakEntry>,
        answer: bool,
    ) -> Result<Result<(), String>, End> {
        let envelope = self.envelope(kind, breakers, streaks, answer);
        self.send(envelope).await
    }

    async fn send(&mut self, mut envelope: Envelope) -> Result<Result<(), String>, End> {
        // Reports and heartbeats are not waited for: the next one follows
        // soon, and a trip must not wait a round trip per failure. A lost
        // channel shows on the consumer, a lost binding on the heartbeats.
        let confirmed = !matches!(envelope.kind, Kind::Streak | Kind::Hello);
        let mut last = String::new();
        for attempt in 0..2 {
            if attempt > 0 {
                // A new number and time: the receivers have heard the
                // messages of the new channel's set-up since, and would
                // take the old number for a replay.
                envelope.seq = self.fleet.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
                envelope.at_ms = unix_ms();
            }
            let body = envelope.encode();
            match self.publish_once(&body, confirmed).await {
                Ok(()) => {
                    self.fleet.inner.sent.fetch_add(1, Ordering::Relaxed);
                    self.awaiting_own
                        .get_or_insert((envelope.seq, Instant::now()));
                    if attempt > 0 {
                        info!(exchange = %self.fleet.inner.exchange, "the fleet exchange takes announcements again");
                    }
                    self.fleet.solved("fleet.announce", "");
                    return Ok(Ok(()));
                }
                Err(Failed::Channel(why)) => {
                    last = why.clone();
                    self.resubscribe(&why).await?;
                }
                Err(Failed::Returned) => {
                    last = "the broker returned it: no queue is bound to the fleet exchange (was it deleted?)".into();
                    warn!(exchange = %self.fleet.inner.exchange, "an announcement came back unroutable: declaring the fleet exchange and this worker's queue again");
                    self.resubscribe(&last.clone()).await?;
                }
                Err(Failed::Unconfirmed(why)) => last = why,
            }
        }
        warn!(exchange = %self.fleet.inner.exchange, error = %last, "an announcement to the fleet was not confirmed");
        self.fleet.problem(
            "fleet.announce",
            "",
            format!("the last announcement to the fleet was not confirmed: {last}"),
            Some(super::PROBLEM_LINGERS),
        );
        Ok(Err(last))
    }

    async fn publish_once(&self, body: &[u8], confirmed: bool) -> Result<(), Failed> {
        let mut props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_type(ShortString::from("rabbit-guard.fleet"))
            .with_user_id(ShortString::from(self.user.as_str()));
        if let Some(mac) = self.trust.sign(body) {
            let mut headers = FieldTable::default();
            headers.insert(
                MAC_HEADER.into(),
                AMQPValue::LongString(LongString::from(mac)),
            );
            props = props.with_headers(headers);
        }
        let channel_failed = |e: lapin::Error| {
            let why = describe(&e);
            if amqp_error(&e).is_some_and(|(code, _)| code == 406) && why.contains("user_id") {
                Failed::Channel(format!(
                    "{why} (set fleet.user to the user this worker connects as)"
                ))
            } else {
                Failed::Channel(format!("announcing to the fleet: {why}"))
            }
        };
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(self.fleet.inner.exchange.as_str()),
                ShortString::from(""),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await
            .map_err(channel_failed)?;
        if !confirmed {
            return Ok(());
        }
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Err(_) => Err(Failed::Unconfirmed(format!(
                "the broker did not confirm it within {}s",
                CONFIRM_TIMEOUT.as_secs()
            ))),
            Ok(Err(e)) => Err(channel_failed(e)),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(Failed::Returned),
            Ok(Ok(Confirmation::Nack(_))) => {
                Err(Failed::Unconfirmed("the broker nacked it".into()))
            }
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
        }
    }

    /// The fleet channel failed: declares it again (a few times), then
    /// rejoins the fleet's conversation (sync and own states), staying
    /// joined; ends the session if it cannot.
    async fn resubscribe(&mut self, why: &str) -> Result<(), End> {
        if !self.conn.status().connected() {
            return Err(End::Connection(why.to_owned()));
        }
        warn!(exchange = %self.fleet.inner.exchange, error = %why, "the fleet channel failed; declaring the exchange and this worker's queue again");
        let mut last = why.to_owned();
        for attempt in 0..RESUBSCRIBE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500) * attempt).await;
            }
            if self.channel.status().connected() {
                let _ = self.channel.close(200, "declaring again".into()).await;
            }
            match subscribe(self.fleet, self.conn).await {
                Ok((channel, consumer, queue)) => {
                    self.channel = channel;
                    self.consumer = consumer;
                    self.queue = queue;
                    self.redeclared += 1;
                    self.awaiting_own = None;
                    // Messages sent meanwhile were missed: ask again.
                    self.sync_at = Instant::now();
                    let envelope = self.envelope(Kind::Sync, Vec::new(), Vec::new(), false);
                    let own = self.fleet.own_entries();
                    let body = envelope.encode();
                    if self.publish_once(&body, true).await.is_ok() {
                        self.fleet.inner.sent.fetch_add(1, Ordering::Relaxed);
                        if !own.is_empty() {
                            let state = self.envelope(Kind::State, own, Vec::new(), false);
                            let _ = self.publish_once(&state.encode(), true).await;
                        }
                        info!(exchange = %self.fleet.inner.exchange, "declared the fleet exchange and queue again; this worker hears the fleet again");
                        return Ok(());
                    }
                    last = "the broker did not take an announcement on the new channel".into();
                }
                Err(e) => last = e,
            }
            if !self.conn.status().connected() {
                return Err(End::Connection(last));
            }
        }
        Err(End::Channel(last))
    }

    async fn delivered(&mut self, d: Delivery) -> Result<(), End> {
        let outcome = self.read(&d).await;
        if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
            self.resubscribe(&format!("acknowledging a fleet message: {}", describe(&e)))
                .await?;
        }
        outcome
    }

    async fn read(&mut self, d: &Delivery) -> Result<(), End> {
        let Some(envelope) = self.admit(d) else {
            return Ok(());
        };
        self.fleet.inner.received.fetch_add(1, Ordering::Relaxed);
        self.dispatch(envelope).await
    }

    /// A message's envelope, if it is from another fleet member and well
    /// formed (counted and logged otherwise).
    fn admit(&mut self, d: &Delivery) -> Option<Envelope> {
        let inner = &self.fleet.inner;
        if d.data.len() > wire::MAX_MESSAGE {
            inner.ignored.fetch_add(1, Ordering::Relaxed);
            debug!(exchange = %inner.exchange, bytes = d.data.len(), "ignored an oversized message on the fleet exchange");
            return None;
        }
        if d.data.is_empty()
            && d.properties
                .kind()
                .as_ref()
                .is_some_and(|k| k.as_str() == WHOAMI)
        {
            // A worker asking the broker who it is (see `own_user`).
            inner.ignored.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let user = d.properties.user_id().as_ref().map(ShortString::as_str);
        let mac =
            d.properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(MAC_HEADER)? {
                    AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
                    AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
                    _ => None,
                });
        if let Err(refusal) = self.trust.check_sender(user, mac.as_deref(), &d.data) {
            self.refuse(&refusal);
            return None;
        }
        let envelope = match wire::parse(&d.data) {
            Ok(e) => e,
            Err(why) => {
                inner.ignored.fetch_add(1, Ordering::Relaxed);
                debug!(exchange = %inner.exchange, why = %crate::text::printable(&why), "ignored a message on the fleet exchange");
                return None;
            }
        };
        if envelope.worker == inner.origin {
            // Its own, heard back: the queue is still bound.
            if self
                .awaiting_own
                .is_some_and(|(seq, _)| envelope.seq >= seq)
            {
                self.awaiting_own = None;
                self.fleet.solved("fleet.deaf", "");
            }
            return None;
        }
        if let Err(refusal) =
            self.trust
                .check_fresh(&envelope.worker, envelope.seq, envelope.at_ms, unix_ms())
        {
            self.refuse(&refusal);
            return None;
        }
        Some(envelope)
    }

    /// Counts, logs (once per sender and reason) and shows a refused
    /// message.
    fn refuse(&self, refusal: &super::trust::Refusal) {
        let inner = &self.fleet.inner;
        inner.refused.fetch_add(1, Ordering::Relaxed);
        self.trust.log(&inner.exchange, refusal);
        self.fleet.problem(
            "fleet.untrusted",
            "",
            format!(
                "messages not from a fleet member were published to the fleet exchange ({} refused, the last: {}); only fleet.users should have write permission on it",
                inner.refused.load(Ordering::Relaxed),
                refusal.kind()
            ),
            Some(super::PROBLEM_LINGERS),
        );
    }

    async fn dispatch(&mut self, envelope: Envelope) -> Result<(), End> {
        let inner = &self.fleet.inner;
        // Every worker hears every other's messages in order: a gap in a
        // sender's numbers is a message missed (a lost binding, an
        // overflow), and the fleet's state is asked for again.
        let last = self.seen.get(&envelope.worker).copied();
        if last.is_none() && self.seen.len() >= super::MAX_MEMBERS {
            // Workers restarted in a rolling deploy are new origins: keep
            // the live ones.
            let members = lock(&inner.members);
            self.seen.retain(|origin, _| members.contains_key(origin));
        }
        if last.is_some() || self.seen.len() < super::MAX_MEMBERS {
            self.seen
                .insert(envelope.worker.clone(), last.unwrap_or(0).max(envelope.seq));
        }
        if let Some(last) = last
            && envelope.seq > last.saturating_add(1)
            && self.resync_due.is_none()
        {
            info!(
                exchange = %inner.exchange,
                from = %crate::text::printable(&envelope.worker),
                missed = envelope.seq - last - 1,
                "missed fleet messages; asking the fleet for its state"
            );
            // At once, or a little after the last ask (whose answers may
            // have been lost the same way).
            self.resync_due = Some((self.sync_at + RESYNC_AFTER_GAP).max(Instant::now()));
        }
        match envelope.kind {
            Kind::Sync => {
                if self.answer_due.is_none() {
                    let jitter = Duration::from_millis(
                        std::collections::hash_map::RandomState::new().hash_one(envelope.seq)
                            % ANSWER_JITTER_MS,
                    );
                    let earliest = self
                        .last_answer
                        .map_or_else(Instant::now, |t| t + ANSWER_EVERY);
                    self.answer_due = Some(earliest.max(Instant::now() + jitter));
                }
            }
            Kind::State => {
                for entry in &envelope.breakers {
                    match self.fleet.take_over(&envelope.worker, entry) {
                        // The maker of the change hears soon that this
                        // worker took it over (the epochs of a hello).
                        Verdict::Taken => {
                            self.next_hello = self.next_hello.min(Instant::now() + TICK);
                        }
                        Verdict::Stale | Verdict::TooFar => {}
                    }
                }
                inner.heard.send_modify(|n| *n += 1);
            }
            Kind::Streak => {
                for streak in &envelope.streaks {
                    self.fleet.their_streak(&envelope.worker, streak);
                }
            }
            Kind::Hello => self
                .fleet
                .hello(&envelope.worker, &envelope.leases, &envelope.epochs),
        }
        Ok(())
    }

    async fn answer(&mut self) -> Result<(), End> {
        self.answer_due = None;
        self.last_answer = Some(Instant::now());
        // Answer even with nothing to tell: the joiner then knows the
        // fleet has been heard.
        let own = self.fleet.own_entries();
        self.publish(Kind::State, own, Vec::new(), true).await?;
        Ok(())
    }

    /// Announces this worker's changes, all that are waiting in one go.
    async fn local_changes(
        &mut self,
        first: Local,
        local: &mut mpsc::UnboundedReceiver<Local>,
    ) -> Result<(), End> {
        let mut changes = Vec::new();
        let mut streaks = std::collections::BTreeSet::new();
        let mut failed_trials = Vec::new();
        let mut next = Some(first);
        while let Some(change) = next.take().or_else(|| local.try_recv().ok()) {
            match change {
                Local::Change(name, t) => {
                    if let (BreakerState::HalfOpen { .. }, BreakerState::Open { until }) =
                        (t.from, t.to)
                        && t.reason != crate::breaker::TransitionReason::Fleet
                    {
                        failed_trials.push((name.clone(), until));
                    }
                    if let Some(entry) = self.fleet.stamp_local(&name, &t) {
                        changes.push((name, t.at, entry));
                    }
                }
                Local::Streak(name) => {
                    streaks.insert(name);
                }
            }
        }
        if !changes.is_empty() {
            let entries = changes.iter().map(|(_, _, e)| e.clone()).collect();
            let redeclared = self.redeclared;
            let mut result = self
                .publish_checked(Kind::State, entries, Vec::new(), false)
                .await?;
            if result.is_ok() && self.redeclared != redeclared {
                result = Err("confirmed, but only after the fleet exchange and this worker's queue were declared again (was the exchange deleted?): the other workers take the change over when they notice, within a few seconds".into());
            }
            for (name, at, _) in &changes {
                self.fleet.record_announced(name, *at, result.clone());
            }
        }
        let mut released = false;
        for (name, until) in failed_trials {
            released |= self.release_lease(&name, until).await;
        }
        if released {
            // The fleet hears at once that the lease is free.
            self.hello().await?;
        }
        let now = Instant::now();
        let reports: Vec<StreakEntry> = streaks
            .into_iter()
            .filter_map(|name| self.fleet.own_streak(&name))
            .collect();
        if !reports.is_empty() {
            for r in &reports {
                if let Some(w) = r.window {
                    self.windows.insert(r.name.clone(), (w, r.failures, now));
                }
            }
            self.publish(Kind::Streak, Vec::new(), reports, false)
                .await?;
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if self.resync_due.is_some_and(|at| now >= at) {
            self.resync_due = None;
            self.sync_at = now;
            self.publish(Kind::Sync, Vec::new(), Vec::new(), false)
                .await?;
        }
        self.leases().await?;
        if now >= self.next_hello {
            self.hello().await?;
            self.fleet.refresh_unheard();
        }
        self.refresh_windows(now).await?;
        self.fleet.refresh_tallies();
        if let Some((_, sent)) = self.awaiting_own {
            let deaf_after = (self.hello_every * 3).max(Duration::from_secs(3));
            if now.saturating_duration_since(sent) > deaf_after {
                let why = format!(
                    "this worker has not heard its own announcements for {}s: its fleet queue lost its binding (was the exchange deleted?)",
                    deaf_after.as_secs()
                );
                self.fleet
                    .problem("fleet.deaf", "", why.clone(), Some(super::PROBLEM_LINGERS));
                self.resubscribe(&why).await?;
            }
        }
        Ok(())
    }

    /// Announces windows that changed (at most every [`WINDOW_EVERY`]), and
    /// non-empty ones every [`WINDOW_REFRESH`] so they stay fresh.
    async fn refresh_windows(&mut self, now: Instant) -> Result<(), End> {
        let mut reports = Vec::new();
        for (name, breaker) in &self.fleet.inner.breakers {
            if breaker.state() != BreakerState::Closed {
                continue;
            }
            let w = breaker.own_window();
            let w = WireCounts {
                calls: w.calls,
                failures: w.failures,
                slow: w.slow,
            };
            let streak = breaker.own_streak();
            let (last, last_streak, at) = self.windows.get(name).copied().unwrap_or((
                WireCounts::default(),
                0,
                now - WINDOW_REFRESH,
            ));
            let age = now.saturating_duration_since(at);
            // Calls leave a window a bucket at a time: a report is re-sent
            // at least that often while it has calls, so the others'
            // copies age with the window.
            let config = breaker.config();
            let refresh =
                (config.window / config.window_buckets.max(1)).clamp(TICK, WINDOW_REFRESH);
            let every = if w.failures > 0 || self.fleet.others_failing(name) {
                WINDOW_EVERY
            } else {
                refresh
            };
            let changed = w != last || streak != last_streak;
            let due = (changed && age >= every) || (w.calls > 0 && age >= refresh);
            if !due {
                continue;
            }
            if let Some(r) = self.fleet.own_streak(name) {
                self.windows.insert(name.clone(), (w, r.failures, now));
                reports.push(r);
            }
        }
        if !reports.is_empty() {
            self.publish(Kind::Streak, Vec::new(), reports, false)
                .await?;
        }
        Ok(())
    }

    /// Takes the probe lease of every breaker whose trial is due here, or
    /// that is open with no live holder heard (so every worker finds out
    /// when the lease is out of the fleet's hands), and looks again at
    /// leases probed around.
    async fn leases(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let inner = &self.fleet.inner;
        let mut won_any = false;
        for (name, breaker) in &inner.breakers {
            let due = match breaker.state() {
                BreakerState::Open { until } => {
                    breaker.config().health_check.is_some()
                        || now >= until
                        || self.fleet.live_holder(name, now).is_none()
                }
                _ => false,
            };
            let attempt = {
                let leases = lock(&inner.leases);
                leases.get(name).is_some_and(|l| {
                    !l.held
                        && (due || l.problem.is_some())
                        && l.next_attempt.is_none_or(|at| now >= at)
                })
            };
            if !attempt {
                continue;
            }
            let queue = lease_queue(&inner.exchange, name);
            let result = self.try_lease(&queue).await?;
            let holder = self.fleet.live_holder(name, now);
            let retry = breaker
                .config()
                .open_timeout
                .clamp(Duration::from_secs(1), Duration::from_secs(30));
            let fresh = self.fleet.lease_fresh(breaker);
            let (decision, was_problem) = {
                let mut leases = lock(&inner.leases);
                let Some(lease) = leases.get_mut(name) else {
                    continue;
                };
                let was = lease.problem.clone();
                (
                    lease.after(result, holder.as_deref(), &queue, fresh, retry, now),
                    was,
                )
            };
            match decision {
                Decision::Holds => {
                    info!(breaker = %name, lease = %queue, "took the probe lease: this worker runs the breaker's trials for the fleet");
                    self.fleet.solved("fleet.lease", name);
                    breaker.set_fleet_gated(false);
                    won_any = true;
                }
                Decision::Wait => {
                    debug!(breaker = %name, holder = ?holder, "another worker holds the probe lease");
                    if was_problem.is_some() {
                        self.fleet.solved("fleet.lease", name);
                    }
                    breaker.set_fleet_gated(true);
                }
                Decision::ProbeHere(why) => {
                    if was_problem.as_deref() != Some(why.as_str()) {
                        warn!(breaker = %name, "{why}");
                    }
                    self.fleet.problem("fleet.lease", name, why, None);
                    breaker.set_fleet_gated(false);
                }
            }
        }
        if won_any {
            // The fleet hears of the new holder at once.
            self.hello().await?;
        }
        Ok(())
    }

    /// A trial failed on this worker while it held the lease: lets the lease
    /// go (deletes the queue), so that the next trial is another worker's.
    /// The dependency may be down for all, and then nothing is lost; but it
    /// may be this worker's path to it that is broken, and a holder that
    /// kept the lease would keep the whole fleet open. This worker tries
    /// again only [`LEASE_HANDOVER`] after the next trial is due, when the
    /// others have had their chance. True if it let the lease go.
    async fn release_lease(&self, name: &str, until: Instant) -> bool {
        let held = lock(&self.fleet.inner.leases)
            .get(name)
            .is_some_and(|l| l.held);
        if !held {
            return false;
        }
        let queue = lease_queue(&self.fleet.inner.exchange, name);
        match delete_lease(self.conn, &queue).await {
            Ok(_) => {
                if let Some(l) = lock(&self.fleet.inner.leases).get_mut(name) {
                    l.held = false;
                    l.next_attempt = Some(until + LEASE_HANDOVER);
                }
                if let Some(breaker) = self.fleet.inner.breakers.get(name) {
                    breaker.set_fleet_gated(true);
                }
                info!(breaker = %name, lease = %queue, "a trial failed here: let the probe lease go, so that another worker runs the next trial");
                true
            }
            Err(e) => {
                debug!(breaker = %name, lease = %queue, error = %describe(&e), "could not let the probe lease go; keeping it");
                false
            }
        }
    }

    /// Declares the lease queue exclusively on a channel of its own (the
    /// broker closes that channel when it refuses; the fleet channel and the
    /// connection are not affected).
    async fn try_lease(&self, queue: &str) -> Result<Attempt, End> {
        let declare = |passive: bool| async move {
            let channel = self.conn.create_channel().await?;
            let r = channel
                .queue_declare(
                    ShortString::from(queue),
                    QueueDeclareOptions {
                        exclusive: !passive,
                        passive,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if r.is_ok() {
                let _ = channel.close(200, "lease looked at".into()).await;
            }
            r.map(|_| ())
        };
        let locked = |e: &lapin::Error| amqp_error(e).is_some_and(|(code, _)| code == 405);
        match declare(false).await {
            Ok(()) => Ok(Attempt::Won),
            Err(e) if locked(&e) => match declare(true).await {
                // It exists, and anyone may use it: not an exclusive queue.
                Ok(()) => Ok(Attempt::Squatted),
                Err(e) if locked(&e) || amqp_error(&e).is_some_and(|(c, _)| c == 404) => {
                    Ok(Attempt::Locked)
                }
                Err(e) => self.lease_error(&e),
            },
            Err(e) => self.lease_error(&e),
        }
    }

    fn lease_error(&self, e: &lapin::Error) -> Result<Attempt, End> {
        if self.conn.status().connected() {
            Ok(Attempt::Failed(describe(e)))
        } else {
            Err(End::Connection(format!(
                "taking a probe lease: {}",
                describe(e)
            )))
        }
    }
}
