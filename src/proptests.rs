//! Property tests: random, hostile input to every parser and validator
//! never panics, the header ↔ JSON codec round-trips, and masking never
//! lets a secret through.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use crate::breaker::BreakerConfig;
use crate::config::{ConsumerSettings, HttpSettings, RetrySettings, Settings};
use crate::dead_letter::{DeadLetter, headers, json};
use crate::secret::{SecretUrl, mask_url};

fn short_string() -> impl Strategy<Value = ShortString> {
    // Any text, non-ASCII and control characters included, up to 255 bytes.
    ".{0,60}".prop_filter_map("fits a short string", |s| ShortString::try_new(s).ok())
}

fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        short_string().prop_map(AMQPValue::ShortString),
        vec(any::<u8>(), 0..48).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        vec(any::<u8>(), 0..48).prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            btree_map(short_string(), inner, 0..6)
                .prop_map(|m| AMQPValue::FieldTable(FieldTable::from(m))),
        ]
    })
}

fn table() -> impl Strategy<Value = FieldTable> {
    btree_map(short_string(), amqp_value(), 0..8).prop_map(FieldTable::from)
}

/// Equal, counting two NaNs of the same width as equal.
fn same(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (a, b) {
        (AMQPValue::Float(x), AMQPValue::Float(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (AMQPValue::Double(x), AMQPValue::Double(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (AMQPValue::FieldArray(x), AMQPValue::FieldArray(y)) => {
            x.as_slice().len() == y.as_slice().len()
                && x.as_slice()
                    .iter()
                    .zip(y.as_slice())
                    .all(|(a, b)| same(a, b))
        }
        (AMQPValue::FieldTable(x), AMQPValue::FieldTable(y)) => same_table(x, y),
        _ => a == b,
    }
}

fn same_table(x: &FieldTable, y: &FieldTable) -> bool {
    x.inner().len() == y.inner().len()
        && x.inner()
            .iter()
            .zip(y.inner())
            .all(|((ka, a), (kb, b))| ka == kb && same(a, b))
}

fn properties() -> impl Strategy<Value = BasicProperties> {
    (
        proptest::option::of(short_string()),
        proptest::option::of(short_string()),
        proptest::option::of(short_string()),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(table()),
    )
        .prop_map(|(id, ct, expiration, priority, timestamp, headers)| {
            let mut p = BasicProperties::default();
            if let Some(v) = id {
                p = p.with_message_id(v);
            }
            if let Some(v) = ct {
                p = p.with_content_type(v);
            }
            if let Some(v) = expiration {
                p = p.with_expiration(v);
            }
            if let Some(v) = priority {
                p = p.with_priority(v);
            }
            if let Some(v) = timestamp {
                p = p.with_timestamp(v);
            }
            if let Some(h) = headers {
                p = p.with_headers(h);
            }
            p
        })
}

/// A value for one of rabbit-guard's own headers: every type, any content.
fn rg_header_value() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        amqp_value(),
        ".{0,30}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        "[0-9 +-]{0,25}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..100_000).prop_map(Duration::from_millis),
        any::<u64>().prop_map(Duration::from_secs),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[a-z.]{250,300}",
        Just(String::new()),
        "[ -~]{0,20}",
    ]
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        (
            duration(),
            duration(),
            duration(),
            duration(),
            duration(),
            duration(),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<f64>(),
            duration(),
            duration(),
        ),
        (
            hostile_text(),
            hostile_text(),
            proptest::option::of(hostile_text()),
        ),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            vec(duration(), 0..4),
        ),
        (
            hostile_text(),
            hostile_text(),
            btree_map(hostile_text(), hostile_text(), 0..3),
        ),
    )
        .prop_map(|(broker, breaker, names, numbers, http)| {
            let mut s = Settings::default();
            s.broker.startup_timeout = broker.0;
            s.broker.connect_timeout = broker.1;
            s.broker.consumer_timeout = broker.2;
            s.broker.reconnect.initial_delay = broker.3;
            s.broker.reconnect.max_delay = broker.4;
            s.worker.shutdown_grace = broker.5;
            s.worker.threads = numbers.2;
            s.broker.url = SecretUrl::new(http.0.clone());
            s.breakers.insert(
                "dep".into(),
                BreakerConfig {
                    window_buckets: breaker.0,
                    half_open_probes: breaker.1,
                    minimum_calls: breaker.2,
                    failure_rate: breaker.3,
                    open_timeout: breaker.4,
                    max_open_timeout: breaker.5,
                    window: broker.0,
                    call_timeout: broker.1,
                    health_check: Some(crate::breaker::HealthCheckConfig {
                        url: Some(SecretUrl::new(http.0.clone())),
                        interval: broker.2,
                        timeout: broker.3,
                    }),
                    ..BreakerConfig::default()
                },
            );
            s.consumers.push(ConsumerSettings {
                queue: names.0,
                breaker: "dep".into(),
                handler: "http".into(),
                dead_letter_exchange: Some(names.1),
                dead_letter_queue: names.2,
                prefetch: numbers.0,
                concurrency: numbers.1,
                retry: RetrySettings {
                    delays: numbers.3,
                    ..RetrySettings::default()
                },
                http: Some(HttpSettings {
                    headers: http.2.into_iter().map(|(k, v)| (k, v.into())).collect(),
                    ..HttpSettings::to(http.1)
                }),
                ..ConsumerSettings::default()
            });
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_header_value_round_trips_through_typed_json(v in amqp_value()) {
        let back = json::from_typed(&json::typed(&v));
        prop_assert!(back.as_ref().is_ok_and(|b| same(b, &v)), "{:?} came back as {:?}", v, back);
        // The plain form is for people: it only has to exist.
        let _ = json::plain(&v);
    }

    #[test]
    fn properties_round_trip_through_an_export_line(p in properties()) {
        let typed = json::properties_typed(&p);
        let line = serde_json::to_string(&typed).unwrap();
        let read: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&line).unwrap();
        let back = json::properties_from_typed(&read).unwrap();
        prop_assert_eq!(back.message_id(), p.message_id());
        prop_assert_eq!(back.expiration(), p.expiration());
        prop_assert_eq!(back.priority(), p.priority());
        match (back.headers(), p.headers()) {
            (Some(a), Some(b)) => prop_assert!(same_table(a, b)),
            (a, b) => prop_assert_eq!(a.is_none(), b.is_none()),
        }
    }

    #[test]
    fn random_json_never_panics_the_importer(text in ".{0,200}", nested in 0usize..200) {
        let _ = serde_json::from_str::<serde_json::Value>(&text).map(|v| json::from_typed(&v));
        let deep = format!("{}{{\"void\":null}}{}", "{\"array\":[".repeat(nested), "]}".repeat(nested));
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&deep) {
            let _ = json::from_typed(&v);
        }
    }

    #[test]
    fn rabbit_guards_own_headers_parse_whatever_they_hold(
        attempt in rg_header_value(),
        replays in rg_header_value(),
        deferrals in rg_header_value(),
        reason in rg_header_value(),
        at in rg_header_value(),
        death in amqp_value(),
        id in proptest::option::of(short_string()),
        body in vec(any::<u8>(), 0..64),
        last in 0u32..10,
    ) {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), attempt);
        h.insert(headers::REPLAYS.into(), replays);
        h.insert(headers::DEFERRALS.into(), deferrals);
        h.insert(headers::REASON.into(), reason);
        h.insert(headers::DEAD_LETTERED_AT.into(), at);
        h.insert("x-death".into(), death);
        let mut p = BasicProperties::default().with_headers(h);
        if let Some(id) = id {
            p = p.with_message_id(id);
        }
        let ctx = crate::handler::Context::new(
            last, "q".into(), 1, String::new(), "q".into(), false, p.clone(), body.clone(),
        );
        prop_assert!((1..=last.max(1)).contains(&ctx.attempt()), "attempt {} with {} levels", ctx.attempt(), last);
        let mut d = Delivery::mock(1, "".into(), "q".into(), false, body);
        d.properties = p;
        let dl = DeadLetter::from_delivery(1, d);
        let now = std::time::SystemTime::now();
        let _ = (dl.to_json(now), dl.to_export(), dl.age(now), dl.display_id());
        let _ = crate::dead_letter::replay_target(&dl, &crate::dead_letter::ReplayOptions::default());
    }

    #[test]
    fn wire_bytes_never_panic_the_header_parser(bytes in vec(any::<u8>(), 0..512)) {
        if let Ok((_, t)) = lapin::types::parsing::parse_field_table(&bytes[..]) {
            let _ = crate::amqp::unreadable(&t);
        }
    }

    #[test]
    fn validation_never_panics_and_refuses_what_would(s in settings()) {
        let problems = s.problems(&[]);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        if s.broker.startup_timeout > crate::config::MAX_DURATION {
            prop_assert!(keys.contains(&"broker.startup_timeout"), "{:?}", keys);
        }
        let c = &s.consumers[0];
        if c.queue.len() > 255 {
            prop_assert!(keys.contains(&"consumers[0].queue"), "{:?}", keys);
        }
        let check = s.breakers["dep"].health_check.clone().unwrap_or_default();
        if check.interval < crate::breaker::MIN_HEALTH_CHECK_INTERVAL {
            prop_assert!(keys.contains(&"breakers.dep.health_check.interval"), "{:?}", keys);
        }
        if check.timeout.is_zero() || check.timeout > crate::config::MAX_DURATION {
            prop_assert!(keys.contains(&"breakers.dep.health_check.timeout"), "{:?}", keys);
        }
        if s.breakers["dep"].window_buckets > crate::breaker::MAX_WINDOW_BUCKETS {
            prop_assert!(keys.contains(&"breakers.dep.window_buckets"), "{:?}", keys);
        }
        for p in &problems {
            prop_assert!(p.to_string().len() < 2_000, "a problem stays readable: {}", p);
        }
        let _ = crate::worker::safety::risks(&s);
        let _ = crate::worker::safety::advisories(&s);
        let _ = s.redacted();
    }

    #[test]
    fn a_url_never_prints_its_password(
        scheme in "(amqp|amqps|http|https|x)",
        user in "[a-z]{0,8}",
        password in "[A-Za-z0-9/@:?#%]{6,20}",
        host in "([a-z]{1,10}|\\[::1\\]|10\\.0\\.0\\.1)",
        tail in "(:5672)?(/[a-z%0-9]{0,8})?(\\?[a-z_]{1,8}=[a-z0-9]{0,8})?",
    ) {
        let url = format!("{scheme}://{user}:{password}@{host}{tail}");
        let shown = mask_url(&url);
        let elsewhere = format!("{scheme}://{user}:@{host}{tail}");
        if !elsewhere.contains(&password) {
            prop_assert!(!shown.contains(&password), "{} shown as {}", url, shown);
        }
        if let Err(e) = crate::amqp::parse_uri(&SecretUrl::new(url.clone())) {
            prop_assert!(!e.contains(&password) || elsewhere.contains(&password), "{}: {}", url, e);
        }
    }

    #[test]
    fn credential_parameters_never_print(name in "(api_key|TOKEN|Key|secret|password|signature|sig|access_token|X-Amz-Signature)", value in "[A-Za-z0-9]{6,16}") {
        let url = format!("https://h/p?page=1&{name}={value}&x=2");
        prop_assert!(!mask_url(&url).contains(&value));
    }

    #[test]
    fn printable_text_holds_no_control_character(s in "\\PC*|.*|[\\x00-\\x1f\\x7f-\\u{9f}\\u{202a}-\\u{202e}]{0,20}") {
        let shown = crate::text::printable(&s);
        prop_assert!(!shown.chars().any(|c| c.is_control()), "{:?}", shown);
    }

    #[test]
    fn env_values_and_keys_never_panic(key in ".{0,40}", value in ".{0,60}") {
        let sources = crate::config::Sources {
            file: None,
            run_mode: None,
            env: vec![(format!("RABBIT_GUARD__{key}"), value)],
        };
        let _ = crate::config::load_unvalidated(&sources);
    }

    #[test]
    fn admin_hosts_and_origins_never_panic(host in ".{0,60}", origin in ".{0,60}", method in "(GET|POST|PUT|HEAD)") {
        let access = crate::admin::Access::new("127.0.0.1:9090".parse().unwrap(), Some("t".into()), &crate::config::AdminSettings::default());
        let mut h = axum::http::HeaderMap::new();
        if let Ok(v) = axum::http::HeaderValue::from_str(&host) {
            h.insert(axum::http::header::HOST, v);
        }
        if let Ok(v) = axum::http::HeaderValue::from_str(&origin) {
            h.insert(axum::http::header::ORIGIN, v);
        }
        let _ = access.check_origin(&method.parse().unwrap(), &h);
        let _ = access.check_token(&h);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fleet_messages_never_panic_and_bounded_ones_round_trip(
        bytes in vec(any::<u8>(), 0..512),
        worker in ".{1,40}",
        names in vec(".{0,40}", 0..6),
        epoch in any::<u64>(),
        until in proptest::option::of(any::<u64>()),
        fleet_exchange in ".{0,300}",
        worker_id in ".{0,120}",
    ) {
        use crate::fleet::wire::{Entry, Envelope, Kind, WireState, parse, VERSION};
        let _ = parse(&bytes);
        let m = Envelope {
            v: VERSION,
            worker: worker.clone(),
            seq: 1,
            kind: Kind::State,
            breakers: names.iter().map(|n| Entry {
                name: n.clone(),
                epoch,
                origin: worker.clone(),
                state: WireState::Open,
                reason: "failure-rate".into(),
                until_ms: until,
            }).collect(),
            streaks: names.iter().map(|n| crate::fleet::wire::StreakEntry {
                name: n.clone(),
                epoch,
                failures: 3,
                window: Some(crate::fleet::wire::WireCounts { calls: epoch, failures: epoch / 2, slow: 0 }),
            }).collect(),
            leases: names.clone(),
            epochs: names.iter().map(|n| (n.clone(), epoch)).collect(),
            answer: epoch % 2 == 0,
            at_ms: epoch,
        };
        prop_assert_eq!(parse(&m.encode()), Ok(m));
        // Whatever the announcement says, the open period it gives lies
        // between now and max_open.
        let now = tokio::time::Instant::now();
        let max = Duration::from_secs(60);
        let e = Entry { name: "b".into(), epoch, origin: worker.clone(), state: WireState::Open, reason: String::new(), until_ms: until };
        if let crate::breaker::FleetState::Open { until } = crate::fleet::ledger::fleet_state(&e, now, 1_000, max) {
            prop_assert!(until >= now && until <= now + max);
        } else {
            prop_assert!(false, "an open announcement reads as open");
        }
        let fleet = crate::config::FleetSettings {
            exchange: Some(fleet_exchange),
            worker_id: Some(worker_id),
            join_wait: Duration::from_millis(epoch % 120_000),
            user: names.first().cloned(),
            users: names.clone(),
            key_file: None,
        };
        let _ = fleet.problems(names.iter().map(String::as_str));
        // Whatever a message's sender, signature and body, the trust check
        // answers without panicking, and a wrong signature never passes.
        let trust = crate::fleet::trust::Trust::new(names.clone(), crate::fleet::trust::key_from(&[b'k'; 32]));
        prop_assert!(trust.check_sender(Some(&worker), Some(&bytes), &bytes).is_err());
        if let Some(member) = names.first() {
            prop_assert_eq!(
                trust.check_sender(Some(member), Some(&bytes), &bytes),
                Err(crate::fleet::trust::Refusal::Mac),
                "a member's message with a made-up signature"
            );
        }
        let _ = trust.check_fresh(&worker, epoch, epoch, 1_000);
    }
}

#[test]
fn the_property_strategies_reach_the_edges() {
    // A sanity check that the generators above produce what they claim.
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut long_queue = false;
    for _ in 0..200 {
        let s = settings().new_tree(&mut runner).unwrap().current();
        long_queue |= s.consumers[0].queue.len() > 255;
    }
    assert!(
        long_queue,
        "the settings strategy makes names over 255 bytes"
    );
}
