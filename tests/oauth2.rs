//! `[broker.oauth2]` against the RabbitMQ 4 auth node of `scripts/rabbitmq.sh
//! start-auth` (its OAuth 2 backend checks RS256 tokens signed with the
//! fixture's key, audience "rabbitmq"): a token file replaced mid-run and a
//! client-credentials grant whose tokens expire during a run of 2,000
//! messages. Renewed tokens go to the open connections with update-secret:
//! nothing is lost, nothing pauses, no connection is made again. A renewed
//! token the broker refuses makes the worker reconnect with it.
//! `#[ignore]`: `scripts/test.sh` starts the node and runs them.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use common::proxy::free_port;
use common::*;
use rabbit_guard::Worker;
use rabbit_guard::config::{OAuth2Settings, Settings};
use rabbit_guard::status::StatusView;

const PLAIN_PORT: u16 = 5676;
const MESSAGES: usize = 2_000;

fn fixture() -> PathBuf {
    let root = std::env::var("RG_RABBITMQ4_ROOT")
        .unwrap_or_else(|_| "/var/cache/rabbit-guard/rabbitmq4-trixie".to_owned());
    let dir = PathBuf::from(root).join("var/lib/rabbitmq/rg4");
    assert!(
        dir.join("fixture/jwt.key").is_file(),
        "these tests need the auth node: run scripts/rabbitmq.sh start-auth (as root) first"
    );
    dir
}

/// An access token for `sub`, valid for `secs` seconds, signed with `key`
/// (the fixture's, unless a test wants one the broker refuses).
fn token(key: &jsonwebtoken::EncodingKey, sub: &str, secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": sub,
        "aud": "rabbitmq",
        "iat": now,
        "exp": now + secs,
        "scope": "rabbitmq.read:*/* rabbitmq.write:*/* rabbitmq.configure:*/*",
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rg-test".into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn signing_key() -> jsonwebtoken::EncodingKey {
    let pem = std::fs::read(fixture().join("fixture/jwt.key")).unwrap();
    jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()
}

/// Lines of the auth node's log, from `from` on.
fn broker_log_since(from: usize) -> String {
    let text = std::fs::read_to_string(fixture().join("log/rg4@localhost.log")).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_owned()
}

fn broker_log_len() -> usize {
    std::fs::metadata(fixture().join("log/rg4@localhost.log")).map_or(0, |m| m.len() as usize)
}

fn oauth_settings(prefix: &str, oauth2: OAuth2Settings) -> (Settings, u16) {
    let mut s = settings(prefix, "noop", fast_breaker());
    // The user name is the token's business; there is no password.
    s.broker.url = format!("amqp://rabbit-guard@127.0.0.1:{PLAIN_PORT}/%2f").into();
    s.broker.oauth2 = Some(oauth2);
    s.broker.startup_timeout = Duration::from_secs(5);
    let port = free_port();
    s.admin.listen = Some(format!("127.0.0.1:{port}"));
    (s, port)
}

async fn status(port: u16) -> Option<StatusView> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/status"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str(&body).ok()
}

/// Publishes `MESSAGES` to `queue` over about `over`, confirmed.
async fn publish_steadily(broker: Arc<TestBroker>, queue: String, over: Duration) {
    let batches = 40;
    for b in 0..batches {
        broker
            .publish_json(&queue, &format!("b{b}"), MESSAGES / batches)
            .await;
        tokio::time::sleep(over / batches as u32).await;
    }
}

/// Runs a worker with `settings` while `MESSAGES` are published over 20 s
/// and `during` does its part; returns whether every message was handled,
/// the connections' reconnects, and the subscriptions made.
async fn run_through(
    settings: Settings,
    admin: u16,
    during: impl std::future::Future<Output = ()>,
) -> (bool, Vec<(String, u64)>, u64) {
    let broker = Arc::new(
        TestBroker::connect_to(&format!("amqp://guest:guest@127.0.0.1:{PLAIN_PORT}/%2f")).await,
    );
    let consumer = settings.consumers[0].clone();
    broker.track(&consumer);
    let running = Running::start(Worker::builder(settings)).await;
    let publisher = tokio::spawn(publish_steadily(
        broker.clone(),
        consumer.queue.clone(),
        Duration::from_secs(20),
    ));
    during.await;
    let _ = publisher.await;
    let handled = wait_until_async(Duration::from_secs(30), || async {
        running.stats.snapshot().succeeded >= MESSAGES as u64
            && broker.ready_if_exists(&consumer.queue).await == Some(0)
    })
    .await;
    let reconnects = status(admin)
        .await
        .map(|s| {
            s.connections
                .into_iter()
                .map(|c| (c.name, c.reconnects))
                .collect()
        })
        .unwrap_or_default();
    let subscriptions = running.stats.snapshot().subscriptions;
    running.stop().await;
    broker.cleanup().await;
    (handled, reconnects, subscriptions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the auth node: scripts/rabbitmq.sh start-auth"]
async fn a_token_file_replaced_mid_run_is_sent_to_the_open_connections() {
    let key = signing_key();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    // Valid for 8 s of a 20 s run: the replacement must reach the open
    // connections (the broker logs each update-secret it accepts).
    std::fs::write(&file, token(&key, "rg-worker", 8)).unwrap();
    let mut oauth2 = OAuth2Settings::default();
    oauth2.token_file = Some(file.clone());
    let (settings, admin) = oauth_settings("oauth-file", oauth2);
    let log_from = broker_log_len();
    let sidecar = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        std::fs::write(&file, token(&key, "rg-worker", 300)).unwrap();
    };
    let (handled, reconnects, subscriptions) = run_through(settings, admin, sidecar).await;
    let log = broker_log_since(log_from);
    let updates = log.matches("updated secret").count();
    eprintln!(
        "reconnects {reconnects:?}, subscriptions {subscriptions}, broker log lines about the secret: {updates}"
    );
    assert!(handled, "all {MESSAGES} messages handled");
    assert!(
        reconnects.iter().all(|(_, n)| *n == 0) && subscriptions == 1,
        "no reconnect, no new subscription (no pause): {reconnects:?}, {subscriptions} subscriptions"
    );
    assert!(
        updates >= 2,
        "the broker's log shows the new token arriving on both connections:\n{}",
        log.lines()
            .filter(|l| l.to_ascii_lowercase().contains("secret"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the auth node: scripts/rabbitmq.sh start-auth"]
async fn client_credentials_tokens_are_renewed_before_they_expire() {
    use axum::extract::State;
    use axum::routing::post;
    let key = Arc::new(signing_key());
    let grants = Arc::new(AtomicU32::new(0));
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, "s3cret-of-the-client\n").unwrap();
    // A token endpoint: client-credentials only, tokens valid for 6 s.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_url = format!("http://{}/token", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route(
            "/token",
            post(
                |State((key, grants)): State<(Arc<jsonwebtoken::EncodingKey>, Arc<AtomicU32>)>,
                 body: String| async move {
                    let form: std::collections::HashMap<String, String> =
                        url::form_urlencoded::parse(body.as_bytes())
                            .into_owned()
                            .collect();
                    let ok = form.get("grant_type").map(String::as_str)
                        == Some("client_credentials")
                        && form.get("client_id").map(String::as_str) == Some("rg-worker")
                        && form.get("client_secret").map(String::as_str)
                            == Some("s3cret-of-the-client");
                    if !ok {
                        return (
                            axum::http::StatusCode::UNAUTHORIZED,
                            "{\"error\":\"invalid_client\"}".to_owned(),
                        );
                    }
                    grants.fetch_add(1, Ordering::Relaxed);
                    let answer = serde_json::json!({
                        "access_token": token(&key, "rg-worker", 6),
                        "token_type": "Bearer",
                        "expires_in": 6,
                    });
                    (axum::http::StatusCode::OK, answer.to_string())
                },
            ),
        )
        .with_state((key.clone(), grants.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });

    let mut oauth2 = OAuth2Settings::default();
    oauth2.token_url = Some(token_url.clone().into());
    oauth2.client_id = Some("rg-worker".into());
    oauth2.client_secret_file = Some(secret_file.clone());
    oauth2.renew_before = Duration::from_secs(3);
    let (settings, admin) = oauth_settings("oauth-grant", oauth2.clone());
    let log_from = broker_log_len();
    let (handled, reconnects, subscriptions) =
        run_through(settings, admin, std::future::ready(())).await;
    let made = grants.load(Ordering::Relaxed);
    let updates = broker_log_since(log_from).matches("updated secret").count();
    eprintln!(
        "{made} grants, {updates} update-secrets at the broker, reconnects {reconnects:?}, subscriptions {subscriptions}"
    );
    assert!(
        updates as u32 >= 2 * (made - 1).min(3),
        "each renewed token reached both connections: {updates} update-secrets for {made} grants"
    );
    assert!(handled, "all {MESSAGES} messages handled");
    assert!(
        made >= 4,
        "6-second tokens renewed 3 s before they expire, over a 20 s run: {made} grants"
    );
    assert!(
        reconnects.iter().all(|(_, n)| *n == 0) && subscriptions == 1,
        "no reconnect, no pause: {reconnects:?}, {subscriptions} subscriptions"
    );

    // A wrong client secret: refused at startup with one line naming it.
    std::fs::write(&secret_file, "not-the-secret\n").unwrap();
    let (settings, _) = oauth_settings("oauth-refused", oauth2);
    let mut child = Child::spawn(&settings, &["run"]);
    let code = child
        .wait(Duration::from_secs(20))
        .await
        .and_then(|s| s.code());
    let stderr = child.stderr();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("broker.oauth2.token_url")
            && stderr.contains("401")
            && !stderr.contains("not-the-secret"),
        "the refusal names the setting and never the secret:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the auth node: scripts/rabbitmq.sh start-auth"]
async fn a_renewed_token_the_broker_refuses_makes_the_worker_reconnect_with_the_next() {
    let key = signing_key();
    // A key the broker does not know: its tokens are refused.
    let stranger = jsonwebtoken::EncodingKey::from_rsa_pem(
        rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .map(|k| k.serialize_pem())
            .unwrap_or_default()
            .as_bytes(),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, token(&key, "rg-worker", 300)).unwrap();
    let mut oauth2 = OAuth2Settings::default();
    oauth2.token_file = Some(file.clone());
    let (mut settings, admin) = oauth_settings("oauth-refused-renewal", oauth2);
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.broker.reconnect.max_delay = Duration::from_secs(1);
    let steps = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        match &stranger {
            Ok(stranger) => std::fs::write(&file, token(stranger, "rg-worker", 300)).unwrap(),
            // No RSA key generation here: a token that is not even a JWT.
            Err(_) => std::fs::write(&file, "not-a-jwt").unwrap(),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        std::fs::write(&file, token(&key, "rg-worker", 300)).unwrap();
    };
    let (handled, reconnects, _) = run_through(settings, admin, steps).await;
    eprintln!("reconnects {reconnects:?}");
    assert!(handled, "all {MESSAGES} messages handled, none lost");
    assert!(
        reconnects.iter().any(|(_, n)| *n >= 1),
        "a refused renewal closes the connection, and it is made again with the next token: {reconnects:?}"
    );
}
