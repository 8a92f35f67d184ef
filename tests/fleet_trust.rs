//! Issue 25, part 1: no one outside the fleet can stop or split it. Each
//! test reproduces an attack someone with ordinary broker rights could make
//! (or a failure of the broker's), and shows the fleet going on, or coming
//! back on its own, with nothing lost.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::fleet::*;
use common::*;
use rabbit_guard::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use rabbit_guard::lapin::types::{FieldTable, ShortString};
use rabbit_guard::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The longest open period of the tests' breaker: the fleet must be back
/// within two of them once the dependency is.
const MAX_OPEN: Duration = Duration::from_secs(4);

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A confirm-mode channel on a connection of its own, as `url`'s user.
async fn publisher(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect as the test's publisher: {e}"));
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

/// Publishes `body` to the fleet exchange with `user_id`; true when the
/// broker took it.
async fn forge(ch: &Channel, exchange: &str, body: &Value, user_id: Option<&str>) -> bool {
    let mut props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_type(ShortString::from("rabbit-guard.fleet"));
    if let Some(u) = user_id {
        props = props.with_user_id(ShortString::from(u));
    }
    let confirm = ch
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(""),
            BasicPublishOptions::default(),
            &serde_json::to_vec(body).unwrap(),
            props,
        )
        .await
        .unwrap();
    confirm.await.is_ok_and(|c| c.is_ack())
}

fn state_message(worker: &str, seq: u64, epoch: u64, state: &str) -> Value {
    json!({
        "v": 1, "worker": worker, "seq": seq, "kind": "state", "at_ms": now_ms(),
        "breakers": [{
            "name": "dep", "epoch": epoch, "origin": worker, "state": state,
            "reason": format!("manual-{}", if state == "closed" { "close" } else { "disable" }),
        }],
    })
}

/// `url` with another user's credentials.
fn as_user(url: &str, user: &TempUser) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_username(&user.user).unwrap();
    u.set_password(Some(&user.password)).unwrap();
    u.to_string()
}

/// The fleet problems of a member's `/readyz`, as `kind: detail` lines.
async fn problems(m: &Member) -> Vec<String> {
    m.get("/readyz")
        .await
        .and_then(|v| v["fleet"]["problems"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            format!(
                "{}: {}",
                p["kind"].as_str().unwrap_or(""),
                p["detail"].as_str().unwrap_or("")
            )
        })
        .collect()
}

async fn fleet_counter(m: &Member, name: &str) -> u64 {
    m.get("/breakers")
        .await
        .and_then(|v| v["fleet"][name].as_u64())
        .unwrap_or(0)
}

/// Sets the dependency healthy and waits for every member to consume
/// again: the time it took, which must be within two open periods.
async fn recover(
    broker: &TestBroker,
    downstream: &Downstream,
    queue: &str,
    members: &[Member],
) -> Duration {
    downstream.set(Mode::Healthy);
    let from = Instant::now();
    let n = u32::try_from(members.len()).unwrap();
    let back = wait_until_async(Duration::from_secs(30), || async {
        broker.consumers(queue).await == n
    })
    .await;
    let took = from.elapsed();
    assert!(
        back,
        "{} of {n} workers consuming 30s after the dependency recovered{}",
        broker.consumers(queue).await,
        logs(members)
    );
    assert!(
        took <= MAX_OPEN * 2 + Duration::from_secs(2),
        "the fleet took {took:?} to resume after the dependency recovered: more than two open periods ({:?}){}",
        MAX_OPEN * 2,
        logs(members)
    );
    took
}

/// Nothing dead-lettered, nothing left behind, every message handled.
async fn nothing_lost(
    broker: &TestBroker,
    downstream: &Downstream,
    settings: &rabbit_guard::config::Settings,
    ids: &[String],
) {
    wait_all_succeeded(downstream, ids, Duration::from_secs(30)).await;
    let dead = broker
        .drain(&settings.consumers[0].dead_letter_queue())
        .await;
    assert_eq!(dead.len(), 0, "dead-lettered: {dead:?}");
    assert_eq!(broker.ready(&settings.consumers[0].queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_probe_lease_is_reported_and_the_fleet_resumes_on_its_own() {
    let (broker, downstream, settings) = setup("fsquat").await;
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    // Anyone with configure rights: a durable, non-exclusive queue by the
    // lease's name, before the fleet starts.
    let lease = format!("{exchange}.lease.dep");
    broker.declare_queue(&lease, FieldTable::default()).await;
    broker.track_queue(&lease);
    downstream.set(Mode::Failing);
    let spawned = ["q1", "q2", "q3"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let ids = broker.publish_json(&queue, "q", 30).await;
    wait_paused(&broker, &queue).await;
    let reported = wait_until_async(Duration::from_secs(15), || async {
        let mut all = true;
        for m in &members {
            all &= problems(m)
                .await
                .iter()
                .any(|p| p.starts_with("fleet.lease: ") && p.contains("not exclusive"));
        }
        all
    })
    .await;
    let mut seen = Vec::new();
    for m in &members {
        seen.push(problems(m).await);
    }
    assert!(
        reported,
        "every worker shows the squatted lease on /readyz: {seen:?}{}",
        logs(&members)
    );
    let b = members[0].breaker().await.unwrap_or_default();
    assert!(
        b["fleet"]["lease_problem"]
            .as_str()
            .is_some_and(|p| p.contains("rabbitmqctl delete_queue")),
        "/breakers says what to do: {b}"
    );
    let took = recover(&broker, &downstream, &queue, &members).await;
    eprintln!("squatted lease: the fleet resumed {took:?} after the dependency recovered");
    nothing_lost(&broker, &downstream, &settings, &ids).await;
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusively_held_lease_no_member_announces_is_probed_around() {
    let (broker, downstream, settings) = setup("fhold").await;
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    // The lease held exclusively by a connection that is no fleet member.
    let (_squatter, ch) = publisher(&amqp_addr()).await;
    ch.queue_declare(
        ShortString::from(format!("{exchange}.lease.dep")),
        QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    downstream.set(Mode::Failing);
    let spawned = ["h1", "h2"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let ids = broker.publish_json(&queue, "h", 30).await;
    wait_paused(&broker, &queue).await;
    let reported = wait_until_async(Duration::from_secs(20), || async {
        problems(&members[0])
            .await
            .iter()
            .any(|p| p.contains("not a live fleet member"))
    })
    .await;
    assert!(
        reported,
        "a lease no member announces is reported: {:?}{}",
        problems(&members[0]).await,
        logs(&members)
    );
    let took = recover(&broker, &downstream, &queue, &members).await;
    eprintln!("lease held outside the fleet: resumed {took:?} after recovery");
    nothing_lost(&broker, &downstream, &settings, &ids).await;
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_epoch_jump_is_refused_and_a_late_joiner_is_not_locked_out() {
    let (broker, downstream, settings) = setup("fepoch").await;
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    downstream.set(Mode::Healthy);
    let spawned = ["e1", "e2"].map(|id| Member::spawn(&settings, id));
    let mut members = start_fleet(&broker, &queue, spawned.into()).await;
    // The jump comes with the fleet's own user (a leaked password, or a
    // bug): only the epoch rule stands in its way.
    let (_conn, ch) = publisher(&amqp_addr()).await;
    let user = url::Url::parse(&amqp_addr()).unwrap().username().to_owned();
    let user = if user.is_empty() {
        "guest".into()
    } else {
        user
    };
    // Epochs are times in milliseconds: a million ahead is 17 minutes in
    // the future.
    let jump_epoch = now_ms() + 1_000_000;
    let jump = state_message("forger#1", 1, jump_epoch, "closed");
    assert!(forge(&ch, &exchange, &jump, Some(&user)).await);
    let shown = wait_until_async(Duration::from_secs(10), || async {
        let mut all = true;
        for m in &members {
            all &= problems(m)
                .await
                .iter()
                .any(|p| p.starts_with("fleet.epoch: ") && p.contains(&jump_epoch.to_string()));
        }
        all
    })
    .await;
    assert!(
        shown,
        "the refused jump shows on /readyz: {:?}{}",
        problems(&members[0]).await,
        logs(&members)
    );
    for m in &members {
        let b = m.breaker().await.unwrap_or_default();
        assert!(
            b["fleet"]["epoch"].as_u64().unwrap_or(u64::MAX) < jump_epoch,
            "{} took the jump: {b}",
            m.id
        );
    }
    let late = Member::spawn(&settings, "e3");
    late.wait_joined().await;
    members.push(late);
    wait_consumers(&broker, &queue, 3).await;
    // The top of the counter, as if it answered a sync: refused too, by the
    // joiner as by the others.
    let mut ignored = Vec::new();
    for m in &members {
        ignored.push(fleet_counter(m, "ignored").await);
    }
    let mut top = state_message("forger#1", 2, u64::MAX - 1, "disabled");
    top["answer"] = json!(true);
    assert!(forge(&ch, &exchange, &top, Some(&user)).await);
    for (m, before) in members.iter().zip(&ignored) {
        assert!(
            wait_until_async(Duration::from_secs(5), || async {
                fleet_counter(m, "ignored").await > *before
            })
            .await,
            "{} ignored the answer at u64::MAX - 1 (ignored was {before}, is {}){}",
            m.id,
            fleet_counter(m, "ignored").await,
            logs(&members)
        );
        let b = m.breaker().await.unwrap_or_default();
        assert!(
            b["fleet"]["epoch"].as_u64().unwrap_or(u64::MAX) < jump_epoch && b["state"] == "closed",
            "{} took the answer at u64::MAX - 1: {b}",
            m.id
        );
    }
    downstream.set(Mode::Failing);
    let ids = broker.publish_json(&queue, "e", 40).await;
    wait_paused(&broker, &queue).await;
    let took = recover(&broker, &downstream, &queue, &members).await;
    eprintln!("after a forged epoch jump and a late joiner: resumed {took:?} after recovery");
    nothing_lost(&broker, &downstream, &settings, &ids).await;
    let epochs = || async {
        let mut epochs = Vec::new();
        for m in &members {
            epochs.push(
                m.breaker().await.unwrap_or_default()["fleet"]["epoch"]
                    .as_u64()
                    .unwrap_or(0),
            );
        }
        epochs
    };
    let agree = wait_until_async(Duration::from_secs(5), || async {
        epochs().await.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    assert!(
        agree,
        "the workers agree on the fleet's epoch: {:?}",
        epochs().await
    );
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_from_a_user_outside_fleet_users_are_ignored_counted_and_logged_once() {
    let (broker, downstream, settings) = setup("fforge").await;
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    downstream.set(Mode::Healthy);
    let spawned = ["g1", "g2"].map(|id| Member::spawn(&settings, id));
    let mut members = start_fleet(&broker, &queue, spawned.into()).await;
    // Another application's user, with ordinary rights on the vhost.
    let mallory = TempUser::create();
    let (_conn, ch) = publisher(&as_user(&amqp_addr(), &mallory)).await;
    for seq in 1..=3 {
        assert!(
            forge(
                &ch,
                &exchange,
                &state_message("mallory#1", seq, seq, "disabled"),
                Some(&mallory.user)
            )
            .await
        );
    }
    let streak = json!({
        "v": 1, "worker": "mallory#1", "seq": 4, "kind": "streak", "at_ms": now_ms(),
        "streaks": [{ "name": "dep", "epoch": 0, "failures": u32::MAX,
                      "window": { "calls": 1_000_000, "failures": 1_000_000, "slow": 0 } }],
    });
    assert!(forge(&ch, &exchange, &streak, Some(&mallory.user)).await);
    // And without any user_id.
    assert!(
        forge(
            &ch,
            &exchange,
            &state_message("anon#1", 1, 7, "disabled"),
            None
        )
        .await
    );
    let counted = wait_until_async(Duration::from_secs(10), || async {
        let mut all = true;
        for m in &members {
            all &= fleet_counter(m, "refused").await >= 5;
        }
        all
    })
    .await;
    let mut refused = Vec::new();
    for m in &members {
        refused.push(fleet_counter(m, "refused").await);
    }
    assert!(
        counted,
        "each worker counted the 5 forged messages as refused: {refused:?}"
    );
    for m in &members {
        let b = m.breaker().await.unwrap_or_default();
        assert_eq!(b["state"], "closed", "{} followed a forgery: {b}", m.id);
        let log = m.child.stderr();
        let lines = log
            .lines()
            .filter(|l| l.contains("not in fleet.users") && l.contains(&mallory.user))
            .count();
        assert_eq!(
            lines, 1,
            "{}: the foreign user is logged once, not per message:\n{log}",
            m.id
        );
        assert!(
            log.contains("carries no user_id"),
            "{}: the message without user_id is logged:\n{log}",
            m.id
        );
    }
    // The fleet restarts one worker at a time: nothing forged comes back,
    // and the breaker still trips (a disabled one never would).
    let old = members.remove(0);
    old.child.signal("KILL");
    drop(old);
    let fresh = Member::spawn(&settings, "g3");
    fresh.wait_joined().await;
    members.push(fresh);
    wait_consumers(&broker, &queue, 2).await;
    for m in &members {
        let b = m.breaker().await.unwrap_or_default();
        assert_eq!(b["state"], "closed", "{}: {b}", m.id);
    }
    downstream.set(Mode::Failing);
    let ids = broker.publish_json(&queue, "g", 30).await;
    wait_paused(&broker, &queue).await;
    recover(&broker, &downstream, &queue, &members).await;
    nothing_lost(&broker, &downstream, &settings, &ids).await;
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_file_unsigned_wrongly_signed_and_replayed_messages_are_refused() {
    let (broker, downstream, mut settings) = setup("fkey").await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("fleet.key");
    std::fs::write(&key_file, "a-secret-of-the-fleet-0123456789abcdef\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    settings.fleet.key_file = Some(key_file);
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    downstream.set(Mode::Healthy);
    let spawned = ["k1", "k2"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    // A genuine, signed message from the fleet, caught on a queue of the
    // test's own: replayed as it is, it must be refused too.
    let (conn, ch) = publisher(&amqp_addr()).await;
    let tap = conn.create_channel().await.unwrap();
    let tapq = tap
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    tap.queue_bind(
        tapq.name().clone(),
        ShortString::from(exchange.as_str()),
        ShortString::from(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let genuine = loop {
        if let Some(m) = tap
            .basic_get(tapq.name().clone(), Default::default())
            .await
            .unwrap()
        {
            let signed = m
                .properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.inner().contains_key("x-rabbit-guard-mac"));
            if signed {
                break m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no signed fleet message heard in 10s{}",
            logs(&members)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let user = url::Url::parse(&amqp_addr()).unwrap().username().to_owned();
    let user = if user.is_empty() {
        "guest".into()
    } else {
        user
    };
    let before = [
        fleet_counter(&members[0], "refused").await,
        fleet_counter(&members[1], "refused").await,
    ];
    // Unsigned, with the fleet's own user (a shared broker user).
    assert!(
        forge(
            &ch,
            &exchange,
            &state_message("mallory#1", 1, 1, "disabled"),
            Some(&user)
        )
        .await
    );
    // Signed with a made-up signature.
    let body = serde_json::to_vec(&state_message("mallory#1", 2, 2, "disabled")).unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "x-rabbit-guard-mac".into(),
        rabbit_guard::lapin::types::AMQPValue::LongString("00".repeat(32).into()),
    );
    let props = BasicProperties::default()
        .with_user_id(ShortString::from(user.as_str()))
        .with_headers(headers);
    assert!(
        ch.basic_publish(
            ShortString::from(exchange.as_str()),
            ShortString::from(""),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .is_ack()
    );
    // The genuine message, replayed.
    assert!(
        ch.basic_publish(
            ShortString::from(exchange.as_str()),
            ShortString::from(""),
            BasicPublishOptions::default(),
            &genuine.data,
            genuine.properties.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .is_ack()
    );
    // Its sender takes the replay for one of its own, heard back.
    let origin: Value = serde_json::from_slice(&genuine.data).unwrap();
    let origin = origin["worker"].as_str().unwrap_or_default().to_owned();
    let expected: Vec<u64> = members
        .iter()
        .zip(&before)
        .map(|(m, before)| before + if origin.starts_with(&m.id) { 2 } else { 3 })
        .collect();
    let counted = wait_until_async(Duration::from_secs(10), || async {
        let mut all = true;
        for (m, expected) in members.iter().zip(&expected) {
            all &= fleet_counter(m, "refused").await >= *expected;
        }
        all
    })
    .await;
    let mut refused = Vec::new();
    for m in &members {
        refused.push(fleet_counter(m, "refused").await);
    }
    assert!(
        counted,
        "each worker refused the unsigned, the wrongly signed and the replayed message (from {origin}): refused {refused:?}, expected {expected:?}{}",
        logs(&members)
    );
    for m in &members {
        let b = m.breaker().await.unwrap_or_default();
        assert_eq!(b["state"], "closed", "{} followed a forgery: {b}", m.id);
        let log = m.child.stderr();
        assert!(
            log.contains("HMAC is missing or wrong"),
            "{}: the bad signatures are logged:\n{log}",
            m.id
        );
        assert!(
            origin.starts_with(&m.id) || log.contains("it is a replay"),
            "{}: the replay is logged:\n{log}",
            m.id
        );
        assert!(
            !log.contains("a-secret-of-the-fleet"),
            "{}: the key is in the log",
            m.id
        );
    }
    // Signed messages still flow: the fleet trips and comes back as one.
    downstream.set(Mode::Failing);
    let ids = broker.publish_json(&queue, "k", 30).await;
    wait_paused(&broker, &queue).await;
    recover(&broker, &downstream, &queue, &members).await;
    nothing_lost(&broker, &downstream, &settings, &ids).await;
    drop(members);
    broker.cleanup().await;
}

/// A worker's state right after a manual operation answered.
async fn post(m: &Member, action: &str, token: &str) -> Value {
    let text = reqwest::Client::new()
        .post(format!("{}/breakers/dep/{action}", m.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_fleet_exchange_comes_back_and_manual_control_tells_the_truth() {
    let (broker, downstream, mut settings) = setup("fdel").await;
    let token = "t0ken-for-the-test";
    settings.admin.token = Some(token.into());
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    downstream.set(Mode::Healthy);
    let spawned = ["d1", "d2"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let hear_each_other = || async {
        let mut all = true;
        for (i, m) in members.iter().enumerate() {
            let other = &members[1 - i].id;
            all &= m
                .get("/breakers")
                .await
                .and_then(|v| v["fleet"]["members"].as_array().cloned())
                .is_some_and(|ms| {
                    ms.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.starts_with(other.as_str())))
                });
        }
        all
    };
    assert!(
        wait_until_async(Duration::from_secs(10), hear_each_other).await,
        "the two workers hear each other{}",
        logs(&members)
    );
    // Each round deletes the exchange, then changes a breaker by hand at
    // once, and again once the workers hear each other.
    let rounds = [
        (0, [("open", "forced-open"), ("close", "closed")]),
        (1, [("disable", "disabled"), ("reset", "closed")]),
        (0, [("open", "forced-open"), ("close", "closed")]),
    ];
    for (round, (by, steps)) in rounds.into_iter().enumerate() {
        let other = 1 - by;
        broker
            .channel
            .exchange_delete(
                ShortString::from(exchange.as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
        for (healed, (action, state)) in [false, true].into_iter().zip(steps) {
            if healed {
                assert!(
                    wait_until_async(Duration::from_secs(10), hear_each_other).await,
                    "round {round}: the workers hear each other again after the exchange was deleted{}",
                    logs(&members)
                );
            }
            let r = post(&members[by], action, token).await;
            let said = r["fleet"].as_str().unwrap_or_default().to_owned();
            let theirs = members[other].breaker().await.unwrap_or_default();
            eprintln!(
                "round {round} ({action}, healed: {healed}): {said:?}; the other worker is {}",
                theirs["state"]
            );
            if said == "applied fleet-wide" {
                assert_eq!(
                    theirs["state"],
                    state,
                    "round {round}: \"applied fleet-wide\" while the other worker is not {state}{}",
                    logs(&members)
                );
            } else {
                assert!(
                    said.starts_with("applied here"),
                    "round {round}: the answer says what happened: {r}"
                );
                assert!(!healed, "round {round}: the fleet had healed, yet {r}");
            }
            let asked = Instant::now();
            assert!(
                wait_until_async(Duration::from_secs(10), || async {
                    members[other]
                        .breaker()
                        .await
                        .is_some_and(|b| b["state"] == state)
                })
                .await,
                "round {round}: the other worker ends {state}{}",
                logs(&members)
            );
            eprintln!(
                "round {round} ({action}, healed: {healed}): the other worker was {state} {:?} later",
                asked.elapsed()
            );
        }
    }
    drop(members);
    broker.cleanup().await;
}

/// A process's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_on_the_fleet_exchange_cost_the_broker_not_the_workers() {
    let (broker, downstream, mut settings) = setup("fbig").await;
    let token = "t0ken-for-the-test";
    settings.admin.token = Some(token.into());
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    downstream.set(Mode::Healthy);
    let spawned = ["b1", "b2"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let before: Vec<u64> = members.iter().map(|m| rss(m.child.pid())).collect();
    let (conn, mut ch) = publisher(&amqp_addr()).await;
    // 100 MB three times, then 2 MiB three times: over the fleet queues'
    // 256 KiB, and under any broker's largest message (RabbitMQ 4 refuses
    // anything over 16 MiB at the channel by default, 3.10 over 128 MiB).
    let mut acked = 0;
    let mut refused = Vec::new();
    for size in [100 << 20, 100 << 20, 100 << 20, 2 << 20, 2 << 20, 2 << 20] {
        if !ch.status().connected() {
            ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
        }
        let big = vec![b'{'; size];
        let published = async {
            ch.basic_publish(
                ShortString::from(exchange.as_str()),
                ShortString::from(""),
                BasicPublishOptions::default(),
                &big,
                BasicProperties::default(),
            )
            .await?
            .await
        }
        .await;
        match published {
            Ok(confirm) if confirm.is_ack() => acked += 1,
            Ok(_) => refused.push(format!("{} MiB: nacked", size >> 20)),
            Err(e) => refused.push(format!("{} MiB: channel closed ({e})", size >> 20)),
        }
    }
    // The fleet still answers, after the broker refused them.
    let r = post(&members[0], "open", token).await;
    assert_eq!(r["fleet"], "applied fleet-wide", "{r}");
    let after: Vec<u64> = members.iter().map(|m| rss(m.child.pid())).collect();
    eprintln!(
        "3 x 100 MB and 3 x 2 MiB to the fleet exchange: {acked} taken by the broker, refused: {refused:?}; worker RSS before {before:?}, after {after:?} bytes"
    );
    assert_eq!(
        acked, 0,
        "every worker's fleet queue refuses them (refused: {refused:?}; RSS before {before:?}, after {after:?})"
    );
    // The test binary is a debug build (about 34 MB resident at rest; the
    // release build about 15 MB): what counts is that 300 MB sent to the
    // fleet did not reach the workers.
    for ((m, before), after) in members.iter().zip(&before).zip(&after) {
        assert!(
            *before > 0 && after.saturating_sub(*before) < 5 * 1024 * 1024,
            "{}: {before} bytes resident before the oversized messages, {after} after: over 5 MB more",
            m.id
        );
    }
    post(&members[1], "close", token).await;
    drop(members);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_forged_syncs_get_a_few_answers_from_each_worker() {
    let (broker, downstream, settings) = setup("fsync").await;
    let queue = settings.consumers[0].queue.clone();
    let exchange = settings.fleet.exchange.clone().unwrap();
    downstream.set(Mode::Healthy);
    let spawned = ["y1", "y2", "y3", "y4"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    // The test listens on the exchange like a member would.
    let (_listener, lch) = publisher(&amqp_addr()).await;
    let heard = lch
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .clone();
    lch.queue_bind(
        heard.clone(),
        ShortString::from(exchange.as_str()),
        ShortString::from(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (_conn, ch) = publisher(&amqp_addr()).await;
    let user = url::Url::parse(&amqp_addr()).unwrap().username().to_owned();
    let user = if user.is_empty() {
        "guest".into()
    } else {
        user
    };
    let started = Instant::now();
    let mut confirms = Vec::new();
    for i in 0..1_000u64 {
        let body = json!({"v": 1, "worker": format!("flood#{i}"), "seq": 1, "kind": "sync", "at_ms": now_ms()});
        confirms.push(
            ch.basic_publish(
                ShortString::from(exchange.as_str()),
                ShortString::from(""),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).unwrap(),
                BasicProperties::default().with_user_id(ShortString::from(user.as_str())),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }
    let flood = started.elapsed();
    // Watch for a fixed while after the flood: answers would come in it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let got = lch
            .basic_get(
                heard.clone(),
                rabbit_guard::lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        let Some(msg) = got else { break };
        let Ok(v) = serde_json::from_slice::<Value>(&msg.delivery.data) else {
            continue;
        };
        if v["kind"] == "state" && v["answer"] == true {
            *answers
                .entry(v["worker"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
    }
    // A worker answers at most once per half second however many ask, and
    // only while syncs keep arriving: the flood's length, plus the watch.
    let bound = 2 + (flood + Duration::from_secs(3)).as_millis() / 500;
    eprintln!(
        "1000 forged syncs in {flood:?}: answers per worker {answers:?} (bound {bound}: one per 500 ms)"
    );
    assert_eq!(answers.len(), 4, "every worker answered: {answers:?}");
    for (w, n) in &answers {
        assert!(
            u128::try_from(*n).unwrap() <= bound,
            "{w} answered {n} times to 1000 syncs in {flood:?}: answers are not coalesced (bound {bound})"
        );
    }
    drop(members);
    broker.cleanup().await;
}

/// The connections the broker has for `prefix`'s worker `id`.
fn connections_of(prefix: &str, id: &str) -> usize {
    let needle = format!("{{\"connection_name\",\"{prefix}-{id}");
    list_connections(&["client_properties"])
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_lease_attempts_open_no_second_connection() {
    let (broker, downstream, settings) = setup("fconn").await;
    let queue = settings.consumers[0].queue.clone();
    downstream.set(Mode::Failing);
    let spawned = ["c1", "c2", "c3"].map(|id| Member::spawn(&settings, id));
    let members = start_fleet(&broker, &queue, spawned.into()).await;
    let ids = broker.publish_json(&queue, "c", 40).await;
    wait_paused(&broker, &queue).await;
    // Three open periods of trials: the two non-holders' lease attempts
    // are refused (405) again and again.
    let prefix = &settings.broker.connection_name;
    let from = Instant::now();
    let mut most = BTreeMap::new();
    while from.elapsed() < OPEN * 3 {
        for m in &members {
            let n = connections_of(prefix, &m.id);
            let e = most.entry(m.id.clone()).or_insert(0);
            *e = (*e).max(n);
        }
    }
    eprintln!("most connections per worker during the outage: {most:?}");
    for (id, n) in &most {
        assert_eq!(
            *n,
            3,
            "{id} had {n} connections (consume, publish and fleet expected){}",
            logs(&members)
        );
    }
    for m in &members {
        let log = m.child.stderr();
        assert!(
            !log.contains("lost the connection to the broker"),
            "{}: a refused lease was taken for a lost connection:\n{log}",
            m.id
        );
    }
    recover(&broker, &downstream, &queue, &members).await;
    nothing_lost(&broker, &downstream, &settings, &ids).await;
    drop(members);
    broker.cleanup().await;
}
