//! The built-in `http` handler against a real HTTP dependency: what each
//! kind of answer does to the message, and that a dependency that refuses
//! every message (down, or rejecting our credentials when 401 is declared
//! transient) pauses the queue instead of filling the dead-letter queue.
#![allow(clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::proxy::free_port;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::breaker::BreakerState;
use rabbit_guard::config::{HttpSettings, Settings};
use rabbit_guard::lapin;

/// Waits until the breaker is open and the queue has no consumer at the
/// broker; then checks the dependency gets no call for a while.
async fn assert_paused(
    broker: &TestBroker,
    running: &Running,
    downstream_calls: impl Fn() -> usize,
    queue: &str,
) {
    assert!(
        wait_until(Duration::from_secs(15), || matches!(
            running.state(),
            BreakerState::Open { .. }
        ))
        .await,
        "the breaker should open: {:?}, {:?}",
        running.state(),
        running.stats.snapshot()
    );
    let mut consumers = broker.consumers(queue).await;
    for _ in 0..100 {
        if consumers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        consumers = broker.consumers(queue).await;
    }
    assert_eq!(
        consumers, 0,
        "consumption stops at the broker while the breaker is open"
    );
    let (calls, state) = (downstream_calls(), running.state());
    if let BreakerState::Open { until } = state {
        // Up to the half-open time, the dependency hears nothing.
        tokio::time::sleep_until(until - Duration::from_millis(50)).await;
        assert_eq!(downstream_calls(), calls, "no call while open ({state:?})");
    }
}

fn http_settings(prefix: &str, url: &str) -> Settings {
    let mut s = settings(prefix, "http", fast_breaker());
    s.consumers[0].http = Some(HttpSettings::to(url));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_pause_the_queue_instead_of_dead_lettering_it() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    // The API key was rotated: every call is 401. With 401 declared
    // transient, that is an outage of the dependency, not bad messages.
    downstream.set(Mode::Status(401));
    let mut settings = http_settings("auth", &downstream.url());
    if let Some(http) = settings.consumers[0].http.as_mut() {
        http.transient_statuses = vec![401, 403, 408, 429];
    }
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "a", 60).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert_paused(
        &broker,
        &running,
        || downstream.call_count(),
        &consumer.queue,
    )
    .await;
    let dlq = consumer.dead_letter_queue();
    assert_eq!(
        broker.ready(&dlq).await,
        0,
        "a 401 declared transient pauses instead: nothing dead-lettered ({} calls so far)",
        downstream.call_count()
    );

    // The key is fixed: everything goes through, nothing was lost.
    downstream.set(Mode::Healthy);
    assert!(
        wait_until(Duration::from_secs(30), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "all {} messages processed after the fix: {} were; {:?}",
        ids.len(),
        downstream.succeeded_ids().len(),
        running.stats.snapshot()
    );
    let stats = running.stats.snapshot();
    running.stop().await;
    assert_eq!(
        (
            broker.ready(&consumer.queue).await,
            broker.ready(&dlq).await
        ),
        (0, 0),
        "(work queue, DLQ) at the end: {stats:?}"
    );
    assert!(
        downstream
            .calls()
            .iter()
            .all(|c| c.content_type == "application/json"),
        "the message's content type is forwarded"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_that_is_down_pauses_the_queue_until_it_listens_again() {
    let broker = Arc::new(TestBroker::connect().await);
    // Nothing listens on this port yet: connection refused.
    let addr = format!("127.0.0.1:{}", free_port());
    let settings = http_settings("down", &format!("http://{addr}/work"));
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "d", 40).await;
    let running = Running::start(Worker::builder(settings)).await;
    assert_paused(&broker, &running, || 0, &consumer.queue).await;
    let dlq = consumer.dead_letter_queue();
    assert_eq!(
        broker.ready(&dlq).await,
        0,
        "connection refused is an outage: nothing dead-lettered"
    );

    let downstream = Downstream::start_at(&addr).await;
    assert!(
        wait_until(Duration::from_secs(30), || downstream.succeeded_ids().len()
            == ids.len())
        .await,
        "all {} processed once the dependency listens: {} were; {:?}",
        ids.len(),
        downstream.succeeded_ids().len(),
        running.stats.snapshot()
    );
    running.stop().await;
    assert_eq!(
        (
            broker.ready(&consumer.queue).await,
            broker.ready(&dlq).await
        ),
        (0, 0),
        "(work queue, DLQ) at the end"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_sort_messages_into_done_retried_and_dead_lettered() {
    let broker = Arc::new(TestBroker::connect().await);
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let mut settings = http_settings("statuses", &downstream.url());
    // The retry ladder is short; the breaker must not trip on a few failures.
    settings.breakers.get_mut("dep").unwrap().minimum_calls = 1_000;
    if let Some(http) = settings.consumers[0].http.as_mut() {
        // This API answers 404 while a referenced record is still being
        // written: retry it.
        http.transient_statuses.push(404);
    }
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "s", 40).await;
    downstream.rule("s-0", Rule::Status(400));
    downstream.rule("s-1", Rule::Status(422));
    downstream.rule("s-2", Rule::FailTimes(2)); // 503, 503, 200
    downstream.rule("s-3", Rule::Status(429)); // never gets better
    downstream.rule("s-4", Rule::Status(401)); // permanent unless declared
    let running = Running::start(Worker::builder(settings)).await;
    let dlq = consumer.dead_letter_queue();
    // 35 plain successes + s-2 after two retries; s-0, s-1, s-4 at once and
    // s-3 after its retries end in the DLQ.
    assert!(
        wait_until_async(Duration::from_secs(30), || async {
            downstream.succeeded_ids().len() == ids.len() - 4 && broker.ready(&dlq).await == 4
        })
        .await,
        "expected 36 successes and 4 dead letters: {} and {}; {:?}",
        downstream.succeeded_ids().len(),
        broker.ready(&dlq).await,
        running.stats.snapshot()
    );
    running.stop().await;
    let dead = broker.drain(&dlq).await;
    let reason = |id: &str| {
        dead.iter()
            .find(|d| d.id == id)
            .map(|d| {
                (
                    d.header_str("rg-reason").unwrap_or_default(),
                    d.header_str("rg-error").unwrap_or_default(),
                )
            })
            .unwrap_or_else(|| panic!("{id} not in the DLQ: {dead:?}"))
    };
    for (id, status) in [("s-0", "400"), ("s-1", "422"), ("s-4", "401")] {
        let (why, error) = reason(id);
        assert_eq!(why, "permanent", "{id}: {error}");
        assert!(
            error.contains(status),
            "{id}'s error names {status}: {error}"
        );
    }
    let (why, error) = reason("s-3");
    assert_eq!(why, "retries-exhausted", "s-3 (429): {error}");
    let calls_for = |id: &str| downstream.calls().iter().filter(|c| c.id == id).count();
    assert_eq!(
        (calls_for("s-0"), calls_for("s-1"), calls_for("s-2")),
        (1, 1, 3),
        "a permanent status is not retried; a transient one is, until it succeeds"
    );
    // Every retry level, plus the last attempts that could not tell a bad
    // message from a failing dependency (nothing else was being called).
    let inconclusive = dead
        .iter()
        .find(|d| d.id == "s-3")
        .and_then(|d| d.header_u64("rg-inconclusive"))
        .unwrap_or(0);
    assert_eq!(
        calls_for("s-3") as u64,
        1 + consumer.retry.delays.len() as u64 + inconclusive,
        "a transient status walks every retry level ({inconclusive} inconclusive last attempts)"
    );
    broker.cleanup().await;
}

/// Answers the first request with a 500 whose body is `size` bytes, sent
/// in 64 KiB writes; returns how many bytes the client let it write.
async fn huge_error_server(size: usize) -> (String, tokio::task::JoinHandle<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/work", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                return 0;
            }
            request.extend_from_slice(&buf[..n]);
        }
        let head = format!(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: {size}\r\n\r\n"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let mut written = 0;
        while written < size {
            let n = chunk.len().min(size - written);
            let write = tokio::time::timeout(Duration::from_secs(2), socket.write_all(&chunk[..n]));
            match write.await {
                Ok(Ok(())) => written += n,
                // The client hung up, or stopped reading for good.
                Ok(Err(_)) | Err(_) => break,
            }
        }
        written
    });
    (url, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_error_body_is_read_only_as_far_as_the_snippet() {
    use rabbit_guard::builtin_handlers::HttpHandler;
    use rabbit_guard::handler::{Context, Handler};
    const SIZE: usize = 100 * 1024 * 1024;
    let (url, server) = huge_error_server(SIZE).await;
    let handler = HttpHandler::new(&HttpSettings::to(url), Duration::from_secs(30)).unwrap();
    let ctx = Context::for_test("q", lapin::BasicProperties::default(), b"{}".to_vec());
    let started = std::time::Instant::now();
    let err = handler
        .handle(b"{}".to_vec(), &ctx)
        .await
        .expect_err("a 500 is a failure");
    let took = started.elapsed();
    let written = server.await.unwrap();
    let text = err.to_string();
    assert!(err.is_transient(), "a 500 is transient: {text}");
    assert!(
        text.contains("500") && text.contains("xxxx") && text.len() < 1_024,
        "the error keeps the status and the start of the body: {} bytes",
        text.len()
    );
    assert!(
        written < 32 * 1024 * 1024,
        "the handler stopped reading after the snippet: the server wrote {written} of {SIZE} bytes in {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_become_a_request_is_permanent_not_transient() {
    use rabbit_guard::builtin_handlers::HttpHandler;
    use rabbit_guard::handler::{Context, Handler};
    let downstream = Downstream::start().await;
    downstream.set(Mode::Healthy);
    let handler =
        HttpHandler::new(&HttpSettings::to(downstream.url()), Duration::from_secs(5)).unwrap();
    for (what, props) in [
        (
            "message id",
            lapin::BasicProperties::default().with_message_id("id\u{1}with-a-control".into()),
        ),
        (
            "content type",
            lapin::BasicProperties::default().with_content_type("text/plain\r\nx: y".into()),
        ),
    ] {
        let ctx = Context::for_test("q", props, b"{}".to_vec());
        let err = handler
            .handle(b"{}".to_vec(), &ctx)
            .await
            .expect_err("no request can carry it");
        assert!(
            err.is_permanent(),
            "a {what} that cannot be a header is the message's fault, not the dependency's: {err}"
        );
    }
    assert_eq!(downstream.arrived_count(), 0, "nothing was sent");
}

/// What a server saw: per request, its path, `X-Api-Key` and body.
type Seen = Arc<std::sync::Mutex<Vec<(String, Option<String>, Vec<u8>)>>>;

/// A server on 127.0.0.1 (an origin of its own) that records every request
/// and answers `/cross` with a 307 to `elsewhere`, `/same` with a 307 to its
/// own `/final`, and anything else with 200.
async fn redirecting_server(elsewhere: Option<String>) -> (String, Seen) {
    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(
            |State((seen, elsewhere)): State<(Seen, Option<String>)>, req: Request| async move {
                let path = req.uri().path().to_owned();
                let key = req
                    .headers()
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default()
                    .to_vec();
                seen.lock().unwrap().push((path.clone(), key, body));
                let to = match path.as_str() {
                    "/cross" => elsewhere.map(|e| format!("{e}/steal?from=cross")),
                    "/same" => Some("/final".to_owned()),
                    _ => None,
                };
                match to {
                    Some(location) => Response::builder()
                        .status(307)
                        .header("location", location)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                    None => "ok".into_response(),
                }
            },
        )
        .with_state((seen.clone(), elsewhere));
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (base, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_never_carry_the_api_key_or_the_body_to_another_origin() {
    const KEY: &str = "k-7d1e-secret";
    let broker = Arc::new(TestBroker::connect().await);
    let (other, other_seen) = redirecting_server(None).await;
    let (dependency, seen) = redirecting_server(Some(other.clone())).await;

    for follow in ["none", "same-origin"] {
        for path in ["/cross", "/same"] {
            let mut settings = http_settings("redirect", &format!("{dependency}{path}"));
            settings.breakers.get_mut("dep").unwrap().minimum_calls = 1_000;
            if let Some(http) = settings.consumers[0].http.as_mut() {
                http.headers.insert("X-Api-Key".into(), KEY.into());
                http.follow_redirects = serde_json::from_value(serde_json::json!(follow))
                    .expect("a follow_redirects value");
            }
            let consumer = settings.consumers[0].clone();
            broker.track(&consumer);
            broker.declare(&consumer).await;
            let ids = broker.publish_json(&consumer.queue, "r", 3).await;
            let running = Running::start(Worker::builder(settings)).await;
            let dlq = consumer.dead_letter_queue();
            let followed = follow == "same-origin" && path == "/same";
            let done = wait_until_async(Duration::from_secs(15), || async {
                let finals = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.0 == "/final")
                    .count();
                if followed {
                    finals >= ids.len() && broker.ready(&consumer.queue).await == 0
                } else {
                    broker.ready(&dlq).await as usize == ids.len()
                }
            })
            .await;
            running.stop().await;
            assert!(
                done,
                "follow_redirects = {follow:?}, {path}: expected the {} messages {}; DLQ {}",
                ids.len(),
                if followed {
                    "handled at /final"
                } else {
                    "dead-lettered"
                },
                broker.ready(&dlq).await
            );
            if !followed {
                for d in broker.drain(&dlq).await {
                    let (reason, error) = (
                        d.header_str("rg-reason").unwrap_or_default(),
                        d.header_str("rg-error").unwrap_or_default(),
                    );
                    assert_eq!(reason, "permanent", "{follow}, {path}: {error}");
                    let target = if path == "/cross" {
                        &other
                    } else {
                        &dependency
                    };
                    assert!(
                        error.contains("307") && error.contains(&format!("to {target}")),
                        "{follow}, {path}: the error names the status and the origin it pointed to: {error}"
                    );
                    assert!(
                        !error.contains("steal") && !error.contains(KEY),
                        "only the origin, never the location's path or the key: {error}"
                    );
                }
            }
        }
    }
    assert!(
        other_seen.lock().unwrap().is_empty(),
        "the other origin received nothing (no key, no body): {:?}",
        other_seen.lock().unwrap()
    );
    let finals: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.0 == "/final")
        .map(|s| (s.1.clone(), !s.2.is_empty()))
        .collect();
    assert!(
        finals.len() >= 3
            && finals
                .iter()
                .all(|(key, body)| key.as_deref() == Some(KEY) && *body),
        "a same-origin redirect is followed with the key and the body: {finals:?}"
    );
    broker.cleanup().await;
}
