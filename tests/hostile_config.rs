//! Config files, URLs and command-line values as a careless operator (or an
//! attacker) writes them: none may panic, hang, or print a secret, and an
//! IPv6 broker address is connected to, not swapped for localhost.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;

const SECRET: &str = "hunter2-s3cret";

fn write_config(text: &str) -> (Arc<tempfile::TempDir>, std::path::PathBuf) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn with_url(url: &str) -> String {
    format!(
        r#"
[broker]
url = "{url}"
startup_timeout = "1s"

[breakers.dep]

[[consumers]]
queue = "q"
breaker = "dep"
handler = "noop"
"#
    )
}

/// Runs the binary to its end; (exit code, stderr).
async fn run(config: &str, args: &[&str]) -> (Option<i32>, String) {
    let (dir, path) = write_config(config);
    let mut child = Child::spawn_with_config(dir, &path, args);
    let status = child.wait(Duration::from_secs(20)).await;
    assert!(
        status.is_some(),
        "rabbit-guard {args:?} should end within 20 s"
    );
    (status.and_then(|s| s.code()), child.stderr())
}

fn assert_refused_cleanly(what: &str, code: Option<i32>, log: &str, want_code: i32) {
    assert_eq!(code, Some(want_code), "{what}: exit code; stderr:\n{log}");
    assert!(
        !log.contains("panicked") && !log.contains("overflow"),
        "{what}: no panic:\n{log}"
    );
    assert!(
        !log.contains(SECRET),
        "{what}: the secret must not appear:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("error")),
        "{what}: an error line says why:\n{log}"
    );
}

#[tokio::test]
async fn syntax_errors_and_malformed_urls_never_print_the_password() {
    let broken = format!(
        "[broker]\nurl = \"amqp://app:{SECRET}@rabbit:5672/%2f\" trailing\n\n[breakers.dep]\n"
    );
    let (code, log) = run(&broken, &["check-config"]).await;
    assert_refused_cleanly("a TOML syntax error on the password's line", code, &log, 1);
    assert!(log.contains("line 2"), "the error names the line: {log}");

    for url in [
        format!("amqp://app:{SECRET}@rabbit:notaport/%2f"),
        format!("amqp://app:pa/{SECRET}@rabbit:5672/%2f"),
        format!("amqp://app:{SECRET}@[::1/%2f"),
        format!("amqp:app:{SECRET}@rabbit"),
        format!("http://app:{SECRET}@rabbit/"),
        format!("amqp://app:{SECRET}@rabbit/%2f?heartbeat=soon"),
    ] {
        for args in [&["check-config"][..], &["run"], &["dlq", "list"]] {
            let (code, log) = run(&with_url(&url), args).await;
            assert_refused_cleanly(&format!("{args:?} with broker.url {url}"), code, &log, 1);
            assert!(log.contains("broker.url"), "{args:?}: names the key: {log}");
        }
    }

    // A secret given where a table belongs is not quoted back either.
    let config = format!(
        "{}http.url = \"http://127.0.0.1:1/\"\nhttp.headers = \"Bearer {SECRET}\"\n",
        with_url("amqp://guest:guest@127.0.0.1:5672/%2f")
    );
    let (code, log) = run(&config, &["check-config"]).await;
    assert_refused_cleanly("http.headers given as a string", code, &log, 1);
}

#[tokio::test]
async fn values_that_would_panic_are_refused_with_their_key() {
    let base = with_url(&amqp_addr());
    let long = "q".repeat(300);
    for (what, config, key) in [
        (
            "a 300-byte queue name",
            base.replace("queue = \"q\"", &format!("queue = \"{long}\"")),
            "consumers[0].queue",
        ),
        (
            "a startup timeout past the clock",
            base.replace(
                "startup_timeout = \"1s\"",
                "startup_timeout = \"500000000y\"",
            ),
            "broker.startup_timeout",
        ),
        (
            "4e9 window buckets",
            base.replace(
                "[breakers.dep]",
                "[breakers.dep]\nwindow_buckets = 4000000000",
            ),
            "breakers.dep.window_buckets",
        ),
        (
            "an open time past the clock",
            base.replace(
                "[breakers.dep]",
                "[breakers.dep]\nopen_timeout = \"1000y\"\nmax_open_timeout = \"1000y\"",
            ),
            "breakers.dep.open_timeout",
        ),
        (
            "a shutdown grace past the clock",
            format!("[worker]\nshutdown_grace = \"900y\"\n{base}"),
            "worker.shutdown_grace",
        ),
    ] {
        for args in [&["check-config"][..], &["run"]] {
            let (code, log) = run(&config, args).await;
            assert_refused_cleanly(&format!("{what} ({args:?})"), code, &log, 1);
            assert!(log.contains(key), "{what}: names {key}: {log}");
        }
    }

    for args in [
        &["dlq", "replay", "--all", "--rate", "1e-20/s"][..],
        &["dlq", "replay", "--all", "--rate", "inf"],
        &["dlq", "list", "--since", "600000000y"],
        &["dlq", "list", "--dlq", long.as_str()],
        &["dlq", "import", "/dev/null", "--to", long.as_str()],
        &["publish", "--queue", "q", "--rate", "1e300"],
        &["demo", "--rate", "0"],
    ] {
        let (code, log) = run(&base, args).await;
        assert_refused_cleanly(&format!("{args:?}"), code, &log, 2);
    }
}

/// A TCP relay from `[::1]:port` to the broker, counting connections.
async fn ipv6_relay() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("[::1]:0")
        .await
        .expect("bind [::1]:0 (this test needs IPv6 loopback)");
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let target = common::proxy::broker_addr();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, accepted, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_literal_broker_host_is_the_address_connected_to() {
    let broker = Arc::new(TestBroker::connect().await);
    let (port, accepted, relay) = ipv6_relay().await;
    // A trap on 127.0.0.1 at the same port: where the old parser (host
    // `localhost`) could have gone instead.
    let trapped = Arc::new(AtomicUsize::new(0));
    let trap = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => {
            let trapped = trapped.clone();
            Some(tokio::spawn(async move {
                while listener.accept().await.is_ok() {
                    trapped.fetch_add(1, Ordering::SeqCst);
                }
            }))
        }
        Err(_) => None,
    };
    let mut settings = settings("ipv6", "noop", fast_breaker());
    settings.broker.url = format!("amqp://guest:guest@[::1]:{port}/%2f").into();
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    broker.declare(&consumer).await;
    let ids = broker.publish_json(&consumer.queue, "v6", 20).await;
    let running = Running::start(Worker::builder(settings)).await;
    let drained = wait_until_async(Duration::from_secs(15), || {
        let broker = broker.clone();
        let queue = consumer.queue.clone();
        async move { broker.counts(&queue).await == (0, 1) }
    })
    .await;
    running.stop().await;
    let counts = broker.counts(&consumer.queue).await;
    relay.abort();
    if let Some(t) = trap {
        t.abort();
    }
    assert_eq!(
        trapped.load(Ordering::SeqCst),
        0,
        "nothing may connect to 127.0.0.1:{port} instead of [::1]:{port}"
    );
    assert!(
        drained,
        "the worker at [::1]:{port} should consume and ack all {} messages within 15 s; (ready, consumers) after it stopped = {counts:?}",
        ids.len()
    );
    assert_eq!(
        counts.0,
        0,
        "all {} acked: none back in the queue after the worker stopped",
        ids.len()
    );
    assert!(
        accepted.load(Ordering::SeqCst) >= 2,
        "both connections (consume, publish) go to [::1]:{port}, not to localhost: {} accepted",
        accepted.load(Ordering::SeqCst)
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn copies_to_a_work_queue_and_values_in_syntax_errors_are_refused() {
    // A dead-letter queue that is the work queue itself: with declare =
    // "passive" nothing at the broker would object, and one bad message
    // would loop.
    for declare in ["passive", "policy", "full"] {
        let config = with_url(&amqp_addr()).replace(
            "handler = \"noop\"",
            &format!("handler = \"noop\"\ndeclare = \"{declare}\"\ndead_letter_queue = \"q\""),
        );
        for args in [&["check-config"][..], &["run"]] {
            let (code, log) = run(&config, args).await;
            assert_refused_cleanly(&format!("{args:?} with declare = {declare}"), code, &log, 1);
            assert!(
                log.contains("consumers[0].dead_letter_queue") && log.contains("loop"),
                "{args:?}, declare = {declare}: names the key and why:\n{log}"
            );
        }
    }
    // A syntax error on a line whose key no list of secret names knows:
    // the key and the place, never the value.
    for line in [
        format!("passwd = \"{SECRET}\" junk"),
        format!("Cookie = \"session={SECRET}\" junk"),
    ] {
        let config = format!("[broker]\n{line}\n");
        let (code, log) = run(&config, &["check-config"]).await;
        assert_refused_cleanly(&format!("a syntax error in {line:?}"), code, &log, 1);
        assert!(log.contains("line 2, column"), "the place: {log}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn an_admin_token_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        with_url(&amqp_addr()),
        token.display()
    );
    let (dir2, path) = write_config(&config);
    let out = std::process::Command::new(cli_binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    drop(dir2);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("admin.token_file")
            && text.contains("chmod 600")
            && !text.contains(SECRET),
        "check-config warns, without the token:\n{text}"
    );
}
