//! `[broker.tls]` and EXTERNAL against the RabbitMQ 4 auth node of
//! `scripts/rabbitmq.sh start-auth` (AMQPS on 127.0.0.1:5686, client
//! certificates required, the fixture's CA trusted): mutual TLS with PLAIN
//! and with EXTERNAL, a CA the worker does not trust, a client certificate
//! the broker does not trust, an expired one, a name the broker's
//! certificate does not carry, a key that is not the certificate's, a
//! refused EXTERNAL user, and a certificate rotated between two connects.
//! Certificates are made here with rcgen, signed by the fixture's CA.
//! `#[ignore]`: `scripts/test.sh` starts the node and runs them.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::{AuthMechanism, Settings};

const PLAIN_PORT: u16 = 5676;
const TLS_PORT: u16 = 5686;

/// Where `scripts/rabbitmq.sh start-auth` keeps its CA and keys.
fn fixture() -> PathBuf {
    let root = std::env::var("RG_RABBITMQ4_ROOT")
        .unwrap_or_else(|_| "/var/cache/rabbit-guard/rabbitmq4-trixie".to_owned());
    let dir = PathBuf::from(root).join("var/lib/rabbitmq/rg4/fixture");
    assert!(
        dir.join("ca.key").is_file(),
        "these tests need the auth node: run scripts/rabbitmq.sh start-auth (as root) first; no fixture in {}",
        dir.display()
    );
    dir
}

/// `rabbitmqctl` of the auth node.
fn ctl4(args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq.sh");
    std::process::Command::new("timeout")
        .args(["120", "bash", script, "ctl", "4"])
        .args(args)
        .output()
        .expect("scripts/rabbitmq.sh runs")
}

/// A user of the auth node that exists for one test.
struct User(String);

impl User {
    fn create(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", random_below(1_000_000_000));
        let password = format!("pw-{}", random_below(1_000_000_000));
        assert!(ctl4(&["add_user", &name, &password]).status.success());
        assert!(
            ctl4(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"])
                .status
                .success()
        );
        Self(name)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = ctl4(&["delete_user", &self.0]);
    }
}

/// A CA of the test's own, or the fixture's.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn fixture() -> Self {
        let dir = fixture();
        let pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap())
            .expect("the fixture's CA key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&pem, key).expect("the fixture's CA");
        Self { issuer, pem }
    }

    /// A CA nobody trusts.
    fn stranger() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "a CA nobody trusts");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client certificate for `cn`, valid from `from` to `to` days from
    /// now, and its key (PKCS#8 PEM).
    fn client(&self, cn: &str, from: i64, to: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let today = time::OffsetDateTime::now_utc();
        params.not_before = today + time::Duration::days(from);
        params.not_after = today + time::Duration::days(to);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Files of one test: the CA the worker trusts, its certificate and key.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Settings for the auth node over TLS as `user` (PLAIN with guest, or
/// EXTERNAL), trusting `ca` and presenting `cert`/`key`.
fn tls_settings(prefix: &str, host: &str, ca: &Path, cert: &Path, key: &Path) -> Settings {
    let mut s = settings(prefix, "noop", fast_breaker());
    s.broker.url = format!("amqps://guest:guest@{host}:{TLS_PORT}/%2f").into();
    s.broker.startup_timeout = Duration::from_secs(5);
    s.broker.tls.ca_file = Some(ca.to_owned());
    s.broker.tls.system_roots = false;
    s.broker.tls.cert_file = Some(cert.to_owned());
    s.broker.tls.key_file = Some(key.to_owned());
    s
}

async fn auth_broker() -> TestBroker {
    TestBroker::connect_to(&format!("amqp://guest:guest@127.0.0.1:{PLAIN_PORT}/%2f")).await
}

/// Runs `rabbit-guard <args>` with `settings` until it exits (at most 30 s):
/// exit code and stderr.
async fn run_to_exit(settings: &Settings, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Child::spawn(settings, args);
    let status = child.wait(Duration::from_secs(30)).await;
    (status.and_then(|s| s.code()), child.stderr())
}

/// The user a connection named `name` logged in as, per the auth node.
fn connection_user(name: &str) -> Option<String> {
    let out = ctl4(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "user",
        "client_properties",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains(&format!("\"{name}\"")))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the auth node: scripts/rabbitmq.sh start-auth"]
async fn mutual_tls_with_plain_and_with_external_consumes_and_the_dlq_tools_connect() {
    let ca = Ca::fixture();
    let broker = auth_broker().await;
    let files = Files::new();
    let trusted = files.write("ca.pem", &ca.pem);
    let user = User::create("rg-ext");
    let (cert, key) = ca.client(&user.0, -1, 30);
    let (cert, key) = (
        files.write("client.pem", &cert),
        files.write("client.key", &key),
    );

    for mechanism in [AuthMechanism::Plain, AuthMechanism::External] {
        let mut s = tls_settings("tls-ok", "localhost", &trusted, &cert, &key);
        s.broker.auth_mechanism = mechanism;
        if mechanism == AuthMechanism::External {
            s.broker.url = format!("amqps://localhost:{TLS_PORT}/%2f").into();
        }
        let consumer = s.consumers[0].clone();
        broker.track(&consumer);
        let name = s.broker.connection_name.clone();
        let running = Running::start(Worker::builder(s.clone())).await;
        broker.publish_json(&consumer.queue, "tls", 30).await;
        let consumed = wait_until_async(Duration::from_secs(15), || async {
            broker.ready_if_exists(&consumer.queue).await == Some(0)
                && running.stats.snapshot().succeeded >= 30
        })
        .await;
        let logged_in_as = connection_user(&format!("{name}/consume"));
        running.stop().await;
        assert!(consumed, "{mechanism:?}: 30 messages consumed over TLS");
        let expected = match mechanism {
            AuthMechanism::External => user.0.clone(),
            _ => "guest".to_owned(),
        };
        assert_eq!(
            logged_in_as.as_deref(),
            Some(expected.as_str()),
            "{mechanism:?}: the broker's user for the connection"
        );
        // The dlq commands open their connection with the same settings.
        let (code, stderr) = run_to_exit(&s, &["dlq", "list", "--json"]).await;
        assert_eq!(code, Some(0), "{mechanism:?}: dlq list over TLS: {stderr}");
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the auth node: scripts/rabbitmq.sh start-auth"]
async fn every_refusal_is_one_line_that_says_what_to_set() {
    let ca = Ca::fixture();
    let stranger = Ca::stranger();
    let files = Files::new();
    let trusted = files.write("ca.pem", &ca.pem);
    let untrusted = files.write("stranger.pem", &stranger.pem);
    let (good_cert, good_key) = ca.client("guest", -1, 30);
    let good = (
        files.write("good.pem", &good_cert),
        files.write("good.key", &good_key),
    );
    let (cert, key) = stranger.client("guest", -1, 30);
    let foreign = (
        files.write("foreign.pem", &cert),
        files.write("foreign.key", &key),
    );
    let (cert, key) = ca.client("guest", -30, -1);
    let expired = (
        files.write("expired.pem", &cert),
        files.write("expired.key", &key),
    );
    let (_, other_key) = ca.client("guest", -1, 30);
    let other_key = files.write("other.key", &other_key);

    let mut refused = tls_settings("tls-external", "localhost", &trusted, &good.0, &good.1);
    let (cert, key) = ca.client("no-such-user", -1, 30);
    refused.broker.tls.cert_file = Some(files.write("nobody.pem", &cert));
    refused.broker.tls.key_file = Some(files.write("nobody.key", &key));
    refused.broker.auth_mechanism = AuthMechanism::External;
    refused.broker.url = format!("amqps://localhost:{TLS_PORT}/%2f").into();
    type Case<'a> = (&'a str, Settings, &'a [&'a str]);
    let cases: Vec<Case<'_>> = vec![
        (
            "a CA the worker does not trust",
            tls_settings("tls-ca", "localhost", &untrusted, &good.0, &good.1),
            &[
                "not signed by a CA this worker trusts",
                "CN=localhost",
                "broker.tls.ca_file",
            ],
        ),
        (
            "a client certificate the broker does not trust",
            tls_settings("tls-client", "localhost", &trusted, &foreign.0, &foreign.1),
            &[
                "refused this worker's client certificate",
                "broker.tls.cert_file",
            ],
        ),
        (
            "an expired client certificate",
            tls_settings("tls-expired", "localhost", &trusted, &expired.0, &expired.1),
            &["client certificate", "expired"],
        ),
        (
            "an IP address the broker's certificate does not carry",
            tls_settings("tls-name", "127.0.0.1", &trusted, &good.0, &good.1),
            &[
                "not valid for the name \"127.0.0.1\"",
                "broker.tls.server_name",
            ],
        ),
        (
            "an EXTERNAL user that does not exist",
            refused,
            &["refused the EXTERNAL login", "certificate"],
        ),
    ];
    for (what, settings, says) in cases {
        let started = std::time::Instant::now();
        let (code, stderr) = run_to_exit(&settings, &["run"]).await;
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        eprintln!(
            "{what}: {:?} after {:?}: {errors:?}",
            code,
            started.elapsed()
        );
        assert_eq!(code, Some(1), "{what}: exit 1:\n{stderr}");
        assert!(
            errors.len() == 1 && says.iter().all(|s| errors[0].contains(s)),
            "{what}: one error line saying {says:?}:\n{stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10) && !stderr.contains("panicked"),
            "{what}: at once (it will not pass by waiting), no panic"
        );
    }

    // A name the certificate carries, given with server_name: connects.
    let mut by_ip = tls_settings("tls-server-name", "127.0.0.1", &trusted, &good.0, &good.1);
    by_ip.broker.tls.server_name = Some("localhost".into());
    let broker = auth_broker().await;
    broker.track(&by_ip.consumers[0]);
    let running = Running::start(Worker::builder(by_ip)).await;
    running.stop().await;

    // A key that is not the certificate's: check-config names it, without a byte of either.
    let mut mismatch = tls_settings("tls-key", "localhost", &trusted, &good.0, &other_key);
    mismatch.broker.url = format!("amqps://guest:guest@localhost:{TLS_PORT}/%2f").into();
    let (code, stderr) = run_to_exit(&mismatch, &["check-config"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("broker.tls.key_file") && stderr.contains("is not the key of"),
        "{stderr}"
    );
    let secret_line = good_key.lines().nth(1).unwrap_or("-");
    assert!(!stderr.contains(secret_line), "no key material printed");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the auth node: scripts/rabbitmq.sh start-auth"]
async fn a_rotated_certificate_is_used_from_the_next_reconnect() {
    let ca = Ca::fixture();
    let broker = auth_broker().await;
    let files = Files::new();
    let trusted = files.write("ca.pem", &ca.pem);
    let (first, second) = (User::create("rg-rot-a"), User::create("rg-rot-b"));
    let (cert, key) = ca.client(&first.0, -1, 30);
    files.write("client.pem", &cert);
    files.write("client.key", &key);
    let mut s = tls_settings(
        "tls-rotate",
        "localhost",
        &trusted,
        &files.path("client.pem"),
        &files.path("client.key"),
    );
    s.broker.auth_mechanism = AuthMechanism::External;
    s.broker.url = format!("amqps://localhost:{TLS_PORT}/%2f?heartbeat=2").into();
    s.broker.reconnect.initial_delay = Duration::from_millis(200);
    let name = s.broker.connection_name.clone();
    let consumer = s.consumers[0].clone();
    broker.track(&consumer);
    let running = Running::start(Worker::builder(s)).await;
    let consume = format!("{name}/consume");
    assert_eq!(connection_user(&consume).as_deref(), Some(first.0.as_str()));

    // The certificate is renewed on disk (a new user, to tell them apart),
    // then the connection drops: the reconnect reads the new files.
    let (cert, key) = ca.client(&second.0, -1, 30);
    files.write("client.pem", &cert);
    files.write("client.key", &key);
    let out = ctl4(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in text
        .lines()
        .filter(|l| l.contains(&format!("\"{consume}\"")))
    {
        let pid = line.split_whitespace().next().unwrap();
        assert!(
            ctl4(&["close_connection", pid, "rotation test"])
                .status
                .success()
        );
    }
    let rotated = wait_until(Duration::from_secs(15), || {
        connection_user(&consume).as_deref() == Some(second.0.as_str())
    })
    .await;
    broker.publish_json(&consumer.queue, "rotated", 10).await;
    let consumed = wait_until_async(Duration::from_secs(15), || async {
        broker.ready_if_exists(&consumer.queue).await == Some(0)
    })
    .await;
    running.stop().await;
    assert!(
        rotated,
        "the reconnect logs in with the new certificate's user {}; the broker shows {:?}",
        second.0,
        connection_user(&consume)
    );
    assert!(consumed, "and consumes with it");
    broker.cleanup().await;
}
