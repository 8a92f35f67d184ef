//! A secret in every place a config can hold one (the broker password, the
//! admin token, the http handler's URL user info and `api_key`, its header
//! values, a health check URL's token), a dependency that fails, refuses
//! connections and echoes what it got (its request line, `Authorization:
//! Basic …` and headers), a lost broker connection: then every log line,
//! `check-config`, `status`, `dlq list/show/summary`, the dead letters'
//! headers and every admin route are searched for each secret, in every
//! form a request carries it (as written in the URL, decoded, base64 of
//! `user:password`). None may appear.
#![allow(clippy::print_stderr)]
#![allow(clippy::too_many_lines)] // a scenario reads best top to bottom

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use common::dlq_cli::Cli;
use common::proxy::{Proxy, free_port};
use common::*;
use rabbit_guard::config::{HttpSettings, RetrySettings};

/// A dependency that answers `perm` bodies with 422, `/health` with 503 and
/// anything else with 500, echoing the request line and credentials in its
/// error body.
async fn echoing_dependency() -> u16 {
    async fn answer(
        uri: axum::http::Uri,
        headers: HeaderMap,
        RawQuery(query): RawQuery,
        body: String,
    ) -> (StatusCode, String) {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let token = headers
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let status = if uri.path() == "/health" {
            StatusCode::SERVICE_UNAVAILABLE
        } else if body.contains("perm") {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        let query = query.unwrap_or_default();
        let decoded: String = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| format!("{k}={v} "))
            .collect();
        (
            status,
            format!(
                "rejected: authorization={auth} x-api-key={key} x-auth-token={token} \
                 request line: POST {uri} HTTP/1.1; query={query}; decoded: {decoded}"
            ),
        )
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().fallback(answer);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

fn grep<'a>(secrets: &'a [(&'a str, String)], place: &str, text: &str) -> Vec<String> {
    secrets
        .iter()
        .filter(|(_, s)| text.contains(s.as_str()))
        .map(|(what, s)| {
            format!(
                "{what} appears {} times in {place}",
                text.matches(s.as_str()).count()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_anywhere_the_worker_or_the_cli_writes() {
    let broker = Arc::new(TestBroker::connect().await);
    let account = TempUser::create();
    let n = random_below(1_000_000_000);
    let token = format!("admin-token-{n}");
    // As written in the URLs (percent-encoded), and as they are meant.
    let url_password_written = format!("url%20pass%2B{n}");
    let url_password = format!("url pass+{n}");
    let api_key_written = format!("a%2Fb+c-{n}");
    let api_key = format!("a/b c-{n}");
    let health_token_written = format!("hc%2Btok-{n}");
    let health_token = format!("hc+tok-{n}");
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("svc:{url_password}"))
    };
    let bearer = format!("bearer-{n}");
    let header_key = format!("hdr-key-{n}");
    let secrets = [
        ("the broker password", account.password.clone()),
        ("admin.token", token.clone()),
        ("the http.url password", url_password.clone()),
        (
            "the http.url password as written",
            url_password_written.clone(),
        ),
        ("Basic base64(user:password)", basic.clone()),
        ("the http.url api_key", api_key.clone()),
        ("the http.url api_key as written", api_key_written.clone()),
        (
            "the http.url api_key form-encoded",
            api_key.replace('/', "%2F").replace(' ', "+"),
        ),
        ("the health check token", health_token.clone()),
        (
            "the health check token as written",
            health_token_written.clone(),
        ),
        ("the X-Auth-Token header value", bearer.clone()),
        ("the X-Api-Key header value", header_key.clone()),
    ];

    let proxy = Proxy::start().await;
    let dependency = echoing_dependency().await;
    let admin_port = free_port();
    let mut settings = settings("secrets", "http", fast_breaker());
    settings.broker.url = format!(
        "amqp://{}:{}@127.0.0.1:{}/%2f?heartbeat=2",
        account.user, account.password, proxy.port
    )
    .into();
    settings.broker.reconnect.initial_delay = Duration::from_millis(200);
    settings.admin.listen = Some(format!("127.0.0.1:{admin_port}"));
    settings.admin.token = Some(token.clone().into());
    settings.log.format = rabbit_guard::config::LogFormat::Json;
    settings.log.level = "debug".into();
    let http = |port: u16| {
        let mut h = HttpSettings::to(format!(
            "http://svc:{url_password_written}@127.0.0.1:{port}/orders?api_key={api_key_written}&page=1"
        ));
        h.headers = BTreeMap::from([
            ("X-Auth-Token".to_owned(), format!("Bearer {bearer}").into()),
            ("X-Api-Key".to_owned(), header_key.clone().into()),
        ]);
        h
    };
    settings.consumers[0].http = Some(http(dependency));
    settings.consumers[0].retry = RetrySettings::new(vec![Duration::from_millis(100)]);
    // A second consumer whose dependency refuses connections.
    let mut refused = settings.consumers[0].clone();
    refused.queue = unique("secrets-refused");
    refused.breaker = "refused".into();
    refused.http = Some(http(free_port()));
    settings.consumers.push(refused);
    settings.breakers.insert("refused".into(), fast_breaker());
    // While "dep" is open, its health check asks the echoing dependency.
    settings.breakers.get_mut("dep").unwrap().health_check =
        Some(rabbit_guard::breaker::HealthCheckConfig::new(
            Some(rabbit_guard::secret::SecretUrl::new(format!(
                "http://127.0.0.1:{dependency}/health?token={health_token_written}"
            ))),
            Duration::from_millis(200),
            Duration::from_secs(1),
        ));
    for c in &settings.consumers {
        broker.track(c);
        broker.declare(c).await;
    }
    let (work, dlq) = (
        settings.consumers[0].queue.clone(),
        settings.consumers[0].dead_letter_queue(),
    );

    let mut child = Child::spawn(&settings, &["run"]);
    for i in 0..5 {
        broker
            .publish_raw(
                &work,
                &format!("perm-{i}"),
                b"{\"kind\":\"perm\"}",
                "application/json",
            )
            .await;
    }
    broker.publish_json(&work, "fail", 20).await;
    broker
        .publish_json(&settings.consumers[1].queue, "refused", 10)
        .await;
    let dead = wait_until_async(Duration::from_secs(20), || async {
        broker.ready(&dlq).await >= 5
    })
    .await;
    assert!(
        dead,
        "the 5 permanent failures should be dead-lettered within 20 s: {} in {dlq}; log:\n{}",
        broker.ready(&dlq).await,
        child.stderr()
    );
    // The 20 failing messages open "dep", and its health check fails with
    // the token echoed back.
    let checked = wait_until(Duration::from_secs(20), || {
        child.stderr().contains("health check failed")
    })
    .await;
    assert!(
        checked,
        "a health check should fail within 20 s; log:\n{}",
        child.stderr()
    );
    proxy.cut_all();
    assert!(
        wait_until(Duration::from_secs(15), || child
            .stderr()
            .matches("reconnected to the broker")
            .count()
            >= 2)
        .await,
        "the worker should reconnect both connections within 15 s of the cut; log:\n{}",
        child.stderr()
    );

    let mut seen: Vec<(String, String)> = Vec::new();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{admin_port}");
    for route in ["/breakers", "/status", "/metrics", "/readyz", "/healthz"] {
        let body = client
            .get(format!("{base}{route}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seen.push((format!("GET {route}"), body));
    }
    for (path, auth) in [
        ("/breakers/dep/reset", token.as_str()),
        ("/breakers/dep/open", "wrong"),
    ] {
        let r = client
            .post(format!("{base}{path}"))
            .bearer_auth(auth)
            .send()
            .await
            .unwrap();
        seen.push((
            format!("POST {path}"),
            format!("{} {}", r.status(), r.text().await.unwrap()),
        ));
    }
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["status", "--admin", &base])
        .output()
        .unwrap();
    seen.push((
        "rabbit-guard status".into(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        ),
    ));

    child.signal("TERM");
    let code = child
        .wait(Duration::from_secs(20))
        .await
        .and_then(|s| s.code());
    assert_eq!(
        code,
        Some(0),
        "SIGTERM should exit 0 within 20 s; log:\n{}",
        child.stderr()
    );
    let log = child.stderr();
    assert!(
        log.lines().count() > 10,
        "the debug log has lines to search:\n{log}"
    );
    assert!(log.contains("***"), "the URLs are logged, masked:\n{log}");
    seen.push(("the worker's JSON log".into(), log));

    let cli = Cli::new(&settings);
    let listed = cli.ok(&["list", "--json"]);
    assert!(
        listed.contains("422")
            && listed.contains("rejected: authorization=Basic *** x-api-key=*** x-auth-token=***"),
        "the dead letters carry the dependency's answer, credentials cut out:\n{listed}"
    );
    seen.push(("dlq list --json".into(), listed));
    seen.push(("dlq list".into(), cli.ok(&["list"])));
    seen.push(("dlq summary".into(), cli.ok(&["summary"])));
    seen.push(("dlq show".into(), cli.ok(&["show", "perm-0"])));
    let dead_letters = broker.drain(&dlq).await;
    seen.push((
        "the dead letters' headers".into(),
        format!(
            "{:?}",
            dead_letters.iter().map(|g| &g.headers).collect::<Vec<_>>()
        ),
    ));
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_rabbit-guard"))
        .args(["check-config", "--config"])
        .arg(cli.path("c.toml"))
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    seen.push((
        "check-config".into(),
        String::from_utf8_lossy(&checked.stdout).into_owned(),
    ));

    let leaks: Vec<String> = seen
        .iter()
        .flat_map(|(place, text)| grep(&secrets, place, text))
        .collect();
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    eprintln!(
        "searched {} places ({} bytes) for {} secrets: 0 hits",
        seen.len(),
        seen.iter().map(|(_, t)| t.len()).sum::<usize>(),
        secrets.len()
    );
    broker.cleanup().await;
}
