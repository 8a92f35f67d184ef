//! Loading and validation tests, on files in a temporary directory and a
//! hand-built environment (the process environment is never touched).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
[breakers.dep]

[[consumers]]
queue = "q"
breaker = "dep"
handler = "noop"
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn sources(file: PathBuf) -> Sources {
    Sources {
        file: Some(file),
        run_mode: None,
        env: Vec::new(),
    }
}

fn with_env(file: PathBuf, env: &[(&str, &str)]) -> Sources {
    Sources {
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..sources(file)
    }
}

fn problems_of(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", text);
    match load(&sources(file), &[]) {
        Err(ConfigError::Invalid(problems)) => problems.iter().map(ToString::to_string).collect(),
        other => panic!("expected validation problems, got {other:?}"),
    }
}

fn assert_problem(text: &str, key: &str, value_and_words: &[&str]) {
    let problems = problems_of(text);
    let hit = problems
        .iter()
        .find(|p| p.starts_with(key) && value_and_words.iter().all(|w| p.contains(w)));
    assert!(
        hit.is_some(),
        "expected a problem at {key} mentioning {value_and_words:?}, got {problems:#?}"
    );
}

#[test]
fn the_readme_example_loads_as_written() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let s = load(&sources(path), &[]).expect("config/example.toml must load");
    let b = &s.breakers["billing-api"];
    assert_eq!(b.failure_rate, 0.5);
    assert_eq!(b.minimum_calls, 10);
    assert_eq!(b.window, Duration::from_secs(10));
    assert_eq!(b.call_timeout, Duration::from_secs(3));
    assert_eq!(b.max_open_timeout, Duration::from_secs(60));
    assert_eq!(b.consecutive_failures, Some(20));
    let c = &s.consumers[0];
    assert_eq!((c.prefetch, c.concurrency), (50, 8));
    assert_eq!(c.on_pause, OnPause::Requeue);
    assert_eq!(
        c.retry.delays,
        [Duration::from_secs(1), Duration::from_secs(5)]
    );
    assert_eq!(
        c.http.as_ref().unwrap().url.expose(),
        "http://127.0.0.1:8080/orders"
    );
}

#[test]
fn shipped_default_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
    load(&sources(path), &[]).expect("config/default.toml must load and validate");
}

#[test]
fn each_env_override_form_really_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", MINIMAL);
    let s = load(
        &with_env(
            file,
            &[
                ("RABBIT_GUARD__BROKER__URL", "amqp://u:p@10.0.0.1:5672/%2fx"),
                ("RABBIT_GUARD__BROKER__RECONNECT__MAX_ATTEMPTS", "7"),
                ("RABBIT_GUARD__LOG__FORMAT", "json"),
                ("RABBIT_GUARD__BREAKERS__DEP__FAILURE_RATE", "0.25"),
                ("RABBIT_GUARD__BREAKERS__DEP__WINDOW", "30s"),
                ("RABBIT_GUARD__CONSUMERS__0__PREFETCH", "100"),
                (
                    "RABBIT_GUARD__CONSUMERS__0__RETRY__DELAYS",
                    r#"["2s", "1m"]"#,
                ),
                ("RABBIT_GUARD__CONSUMERS__0__ON_PAUSE", "dead-letter"),
                ("UNRELATED", "x"),
            ],
        ),
        &[],
    )
    .expect("overrides should load");
    assert_eq!(s.broker.url.expose(), "amqp://u:p@10.0.0.1:5672/%2fx");
    assert_eq!(s.broker.reconnect.max_attempts, Some(7));
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.breakers["dep"].failure_rate, 0.25);
    assert_eq!(s.breakers["dep"].window, Duration::from_secs(30));
    assert_eq!(
        s.consumers.len(),
        1,
        "an indexed override must not add consumers"
    );
    assert_eq!(
        s.consumers[0].queue, "q",
        "other keys of the overridden consumer stay"
    );
    assert_eq!(s.consumers[0].prefetch, 100);
    assert_eq!(
        s.consumers[0].retry.delays,
        [Duration::from_secs(2), Duration::from_secs(60)]
    );
    assert_eq!(s.consumers[0].on_pause, OnPause::DeadLetter);
}

#[test]
fn env_override_of_a_dashed_breaker_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        &MINIMAL
            .replace("[breakers.dep]", "[breakers.billing-api]")
            .replace("\"dep\"", "\"billing-api\""),
    );
    let s = load(
        &with_env(
            file,
            &[("RABBIT_GUARD__BREAKERS__billing-api__MINIMUM_CALLS", "3")],
        ),
        &[],
    )
    .unwrap();
    assert_eq!(s.breakers["billing-api"].minimum_calls, 3);
}

#[test]
fn mistyped_env_key_is_an_error_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", MINIMAL);
    let err = load(
        &with_env(file, &[("RABBIT_GUARD__BROKER__URLL", "amqp://x")]),
        &[],
    )
    .expect_err("a mistyped key must not be ignored");
    let msg = err.to_string();
    assert!(
        msg.contains("urll"),
        "error should name the unknown key: {msg}"
    );
}

#[test]
fn run_mode_and_local_files_layer_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "default.toml", MINIMAL);
    write(
        dir.path(),
        "production.toml",
        "[breakers.dep]\nminimum_calls = 50\nwindow = \"1m\"\n",
    );
    write(
        dir.path(),
        "local.toml",
        "[breakers.dep]\nminimum_calls = 5\n",
    );
    let s = load(
        &Sources {
            run_mode: Some("production".into()),
            ..sources(file.clone())
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        s.breakers["dep"].window,
        Duration::from_secs(60),
        "RUN_MODE file applies"
    );
    assert_eq!(
        s.breakers["dep"].minimum_calls, 5,
        "local.toml wins over RUN_MODE"
    );
    let s = load(
        &Sources {
            run_mode: Some("production".into()),
            ..with_env(file, &[("RABBIT_GUARD__BREAKERS__DEP__MINIMUM_CALLS", "9")])
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        s.breakers["dep"].minimum_calls, 9,
        "environment wins over files"
    );
}

#[test]
fn missing_file_and_bad_toml_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let msg = load(&sources(missing), &[]).unwrap_err().to_string();
    assert!(
        msg.contains("nope.toml") && msg.contains("not found"),
        "{msg}"
    );
    let bad = write(dir.path(), "bad.toml", "[broker\nurl = 1");
    let msg = load(&sources(bad), &[]).unwrap_err().to_string();
    assert!(msg.contains("bad.toml") && msg.contains("TOML"), "{msg}");
}

#[test]
fn unknown_keys_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", &format!("{MINIMAL}\nprefech = 5\n"));
    let msg = load(&sources(file), &[]).unwrap_err().to_string();
    assert!(msg.contains("prefech"), "{msg}");
    let file = write(
        dir.path(),
        "d.toml",
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nfailure_rat = 0.5"),
    );
    let msg = load(&sources(file), &[]).unwrap_err().to_string();
    assert!(msg.contains("failure_rat"), "{msg}");
}

#[test]
fn wrong_types_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nwindow = \"ten seconds\""),
    );
    let msg = load(&sources(file), &[]).unwrap_err().to_string();
    assert!(msg.contains("window"), "{msg}");
    let file = write(dir.path(), "d.toml", &format!("{MINIMAL}prefetch = -1\n"));
    let msg = load(&sources(file), &[]).unwrap_err().to_string();
    assert!(msg.contains("prefetch"), "{msg}");
}

#[test]
fn negative_duration_is_rejected_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nopen_timeout = \"-5s\""),
    );
    let msg = load(&sources(file), &[]).unwrap_err().to_string();
    assert!(
        msg.contains("open_timeout") && msg.contains("-5s"),
        "names the key and the bad value: {msg}"
    );
}

#[test]
fn http_transient_statuses_outside_3xx_4xx() {
    assert_problem(
        &MINIMAL.replace(
            "handler = \"noop\"",
            "handler = \"http\"\nhttp.url = \"http://127.0.0.1:8080/x\"\nhttp.transient_statuses = [404, 200]",
        ),
        "consumers[0].http.transient_statuses[1]",
        &["= 200", "3xx or 4xx"],
    );
}

#[test]
fn unknown_breaker_is_named_with_the_known_ones() {
    assert_problem(
        &MINIMAL.replace("breaker = \"dep\"", "breaker = \"billing\""),
        "consumers[0].breaker",
        &["\"billing\"", "unknown breaker", "dep"],
    );
}

#[test]
fn several_breakers_are_checked_like_one() {
    let two = "[breakers.dep]\n[breakers.inventory]\n\n[[consumers]]\nqueue = \"q\"\nhandler = \"noop\"\n";
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        &format!("{two}breakers = [\"dep\", \"inventory\"]\n"),
    );
    let settings = load(&sources(file), &[]).expect("two known breakers are valid");
    assert_eq!(
        settings.consumers[0].breaker_names(),
        ["dep", "inventory"],
        "both guard the consumer, in order; neither is unused"
    );
    assert_problem(
        &format!("{two}breaker = \"dep\"\nbreakers = [\"inventory\"]\n"),
        "consumers[0].breakers",
        &["not both"],
    );
    assert_problem(
        &format!("{two}breakers = [\"dep\", \"invntory\"]\n"),
        "consumers[0].breakers[1]",
        &["\"invntory\"", "unknown breaker", "inventory"],
    );
    assert_problem(
        &format!("{two}breakers = [\"dep\", \"dep\"]\n"),
        "consumers[0].breakers[1]",
        &["named twice"],
    );
    assert_problem(
        &format!("{two}breakers = []\n"),
        "consumers[0].breaker",
        &["must name a breaker"],
    );
    assert_problem(
        &format!("{two}breakers = [\"dep\"]\n"),
        "breakers.inventory",
        &["no consumer uses this breaker"],
    );
}

#[test]
fn a_cluster_is_several_urls_each_checked() {
    let dir = tempfile::tempdir().unwrap();
    let three = "[broker]\nurls = [\"amqp://u:p@n1:5672/%2f\", \"amqp://u:p@n2:5672/%2f\", \"amqp://u:p@n3:5672/%2f\"]\n";
    let file = write(dir.path(), "c.toml", &format!("{three}{MINIMAL}"));
    let settings = load(&sources(file), &[]).expect("three node URLs are valid");
    let addresses: Vec<String> = settings
        .broker
        .addresses()
        .into_iter()
        .map(|(key, url)| format!("{key}={}", url.masked()))
        .collect();
    assert_eq!(addresses.len(), 3, "{addresses:?}");
    assert!(
        addresses[2].starts_with("broker.urls[2]=") && !addresses[2].contains(":p@"),
        "keyed and masked: {addresses:?}"
    );
    assert!(
        !format!("{:?}", settings.redacted()).contains(":p@"),
        "no password in the printed settings"
    );
    assert_problem(
        &format!(
            "[broker]\nurl = \"amqp://u:p@n1:5672/%2f\"\nurls = [\"amqp://u:p@n2:5672/%2f\"]\n{MINIMAL}"
        ),
        "broker.urls",
        &["not both"],
    );
    assert_problem(
        &format!(
            "[broker]\nurls = [\"amqp://u:p@n1:5672/%2f\", \"http://u:secret@n2/\"]\n{MINIMAL}"
        ),
        "broker.urls[1]",
        &["not an AMQP URI", "amqp://"],
    );
    assert!(
        !problems_of(&format!(
            "[broker]\nurls = [\"amqp://u:p@n1:5672/%2f\", \"http://u:secret@n2/\"]\n{MINIMAL}"
        ))
        .join("\n")
        .contains("secret"),
        "a bad URL's password is masked in the error"
    );
    assert_problem(
        &format!(
            "[broker]\nurls = [\"amqp://u:p@n1:5672/%2f\", \"amqp://u:p@n1:5672/%2f\"]\n{MINIMAL}"
        ),
        "broker.urls[1]",
        &["listed twice"],
    );
}

#[test]
fn prefetch_below_concurrency() {
    assert_problem(
        &format!("{MINIMAL}prefetch = 4\nconcurrency = 8\n"),
        "consumers[0].prefetch",
        &["= 4", "concurrency (8)"],
    );
}

#[test]
fn zero_prefetch_and_concurrency() {
    assert_problem(
        &format!("{MINIMAL}prefetch = 0\n"),
        "consumers[0].prefetch",
        &["= 0", "unlimited"],
    );
    assert_problem(
        &format!("{MINIMAL}concurrency = 0\n"),
        "consumers[0].concurrency",
        &["= 0"],
    );
}

#[test]
fn zero_probes() {
    assert_problem(
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nhalf_open_probes = 0"),
        "breakers.dep.half_open_probes",
        &["= 0", "at least 1"],
    );
}

#[test]
fn zero_durations() {
    for key in [
        "window",
        "call_timeout",
        "open_timeout",
        "slow_call_duration",
    ] {
        assert_problem(
            &MINIMAL.replace("[breakers.dep]", &format!("[breakers.dep]\n{key} = \"0s\"")),
            &format!("breakers.dep.{key}"),
            &["\"0s\"", "greater than zero"],
        );
    }
    assert_problem(
        &format!("{MINIMAL}retry.delays = [\"1s\", \"0s\"]\n"),
        "consumers[0].retry.delays[1]",
        &["\"0s\""],
    );
}

#[test]
fn rates_out_of_range() {
    assert_problem(
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nfailure_rate = 1.5"),
        "breakers.dep.failure_rate",
        &["= 1.5"],
    );
    assert_problem(
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nfailure_rate = 0"),
        "breakers.dep.failure_rate",
        &["= 0"],
    );
}

#[test]
fn unknown_handler_kind() {
    assert_problem(
        &MINIMAL.replace("handler = \"noop\"", "handler = \"htp\""),
        "consumers[0].handler",
        &["\"htp\"", "http, noop"],
    );
    // A handler registered from Rust is known.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        &MINIMAL.replace("handler = \"noop\"", "handler = \"orders\""),
    );
    load(&sources(file), &["orders"]).expect("registered handler name is valid");
}

#[test]
fn http_handler_needs_a_url() {
    assert_problem(
        &MINIMAL.replace("handler = \"noop\"", "handler = \"http\""),
        "consumers[0].http.url",
        &["must be set"],
    );
    assert_problem(
        &MINIMAL.replace(
            "handler = \"noop\"",
            "handler = \"http\"\nhttp.url = \"ftp://x/\"",
        ),
        "consumers[0].http.url",
        &["\"ftp://x/\"", "http://"],
    );
}

#[test]
fn no_consumers_and_duplicate_queues() {
    assert_problem("[breakers.dep]\n", "consumers", &["no consumers"]);
    assert_problem(
        &format!("{MINIMAL}\n{}", &MINIMAL.replace("[breakers.dep]", "")),
        "consumers[1].queue",
        &["\"q\"", "already"],
    );
}

#[test]
fn bad_broker_url_is_masked_in_the_error() {
    let problems = problems_of(&format!(
        "[broker]\nurl = \"http://u:hunter2@h/\"\n{MINIMAL}"
    ));
    let joined = problems.join("\n");
    assert!(joined.contains("broker.url"), "{joined}");
    assert!(!joined.contains("hunter2"), "password leaked: {joined}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let problems = problems_of(
        "[breakers.dep]\nhalf_open_probes = 0\nwindow = \"0s\"\n[[consumers]]\nqueue = \"q\"\nbreaker = \"nope\"\nhandler = \"x\"\nprefetch = 0\n",
    );
    assert!(
        problems.len() >= 5,
        "expected all five problems, got {problems:#?}"
    );
}

#[test]
fn string_keys_from_the_environment_stay_exactly_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        &format!("{MINIMAL}http.url = \"http://127.0.0.1:1/x\"\n"),
    );
    let s = load(
        &with_env(
            file,
            &[
                ("RABBIT_GUARD__ADMIN__TOKEN", "0x10"),
                (
                    "RABBIT_GUARD__CONSUMERS__0__HTTP__HEADERS__X_API_KEY",
                    "1e3",
                ),
                ("RABBIT_GUARD__BROKER__CONNECTION_NAME", "true"),
                ("RABBIT_GUARD__CONSUMERS__0__DECLARE", "false"),
                ("RABBIT_GUARD__WORKER__THREADS", "2"),
            ],
        ),
        &[],
    )
    .expect("overrides should load");
    assert_eq!(
        s.admin.token.as_ref().map(crate::secret::Secret::expose),
        Some("0x10"),
        "a token that looks like a number stays text"
    );
    assert_eq!(
        s.consumers[0].http.as_ref().unwrap().headers["x_api_key"].expose(),
        "1e3"
    );
    assert_eq!(s.broker.connection_name, "true");
    assert_eq!(
        s.consumers[0].declare,
        super::Declare::Passive,
        "a boolean key still reads false"
    );
    assert_eq!(s.worker.threads, 2, "a number key still reads 2");
}

#[test]
fn values_that_would_panic_are_refused_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let long = "q".repeat(250);
    let file = write(
        dir.path(),
        "c.toml",
        &format!(
            r#"
[broker]
startup_timeout = "1000y"
[worker]
shutdown_grace = "200y"
threads = 60000
[breakers.dep]
window_buckets = 4000000000
open_timeout = "300y"
max_open_timeout = "300y"
half_open_probes = 4000000000

[[consumers]]
queue = "{long}"
breaker = "dep"
handler = "noop"
retry.delays = ["1s", "60d"]

[[consumers]]
queue = "{long}{long}"
breaker = "dep"
handler = "noop"
dead_letter_exchange = "{long}{long}"
"#
        ),
    );
    let err = load(&sources(file), &[]).expect_err("must be refused");
    let ConfigError::Invalid(problems) = &err else {
        panic!("expected validation problems, got {err}");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for want in [
        "broker.startup_timeout",
        "worker.shutdown_grace",
        "worker.threads",
        "breakers.dep.window_buckets",
        "breakers.dep.open_timeout",
        "breakers.dep.max_open_timeout",
        "breakers.dep.half_open_probes",
        "consumers[0].queue",
        "consumers[0].retry.delays[1]",
        "consumers[1].dead_letter_exchange",
        "consumers[1].queue",
    ] {
        assert!(keys.contains(&want), "{want} should be refused: {err}");
    }
    assert!(
        problems
            .iter()
            .all(|p| p.value.as_ref().is_none_or(|v| v.len() < 120)),
        "long values are cut in the message: {err}"
    );
}

#[test]
fn errors_teach_what_to_write_instead() {
    let dir = tempfile::tempdir().unwrap();
    let err = |text: &str, env: &[(&str, &str)]| {
        let file = write(dir.path(), "c.toml", text);
        load(&with_env(file, env), &[])
            .expect_err("must be refused")
            .to_string()
    };
    let e = err(
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nfailure_rate = 50"),
        &[],
    );
    assert!(e.contains("a ratio: 0.5 means 50%"), "{e}");
    let e = err(
        &MINIMAL.replace("[breakers.dep]", "[breakers.dep]\nwindow = 10"),
        &[],
    );
    assert!(
        e.contains("breakers.dep.window") && e.contains("\"10s\""),
        "{e}"
    );
    let e = err(
        &format!("{MINIMAL}prefech = 10\nretry.delay = [\"1s\"]\n[broker]\nurll = \"x\"\n"),
        &[],
    );
    for want in [
        "consumers[0].prefech (did you mean prefetch?)",
        "consumers[0].retry.delay (did you mean delays?)",
        "broker.urll (did you mean url?)",
    ] {
        assert!(
            e.contains(want),
            "every unknown key at once, with a hint: {want} in {e}"
        );
    }
    let e = err(MINIMAL, &[("RABBIT_GUARD_BROKER_URL", "amqp://x")]);
    assert!(
        e.contains("RABBIT_GUARD__BROKER__URL"),
        "one underscore is reported: {e}"
    );
    let e = err(
        &MINIMAL
            .replace("[breakers.dep]", "[breakers.billing-api]")
            .replace("breaker = \"dep\"", "breaker = \"billing-api\""),
        &[("RABBIT_GUARD__BREAKERS__BILLING_API__FAILURE_RATE", "0.3")],
    );
    assert!(
        e.contains("breakers.billing_api")
            && e.contains("no consumer uses this breaker")
            && e.contains("did you mean \"billing-api\""),
        "an env var that made a second breaker is caught: {e}"
    );
    let e = err(&format!("{MINIMAL}retry.delays = [\"1s\", \"1s\"]\n"), &[]);
    assert!(
        e.contains("consumers[0].retry.delays[1]") && e.contains("retry.delays[0]"),
        "{e}"
    );
}

#[test]
fn a_syntax_error_names_its_line_and_key_and_never_a_value() {
    let dir = tempfile::tempdir().unwrap();
    for (name, line) in [
        ("url", "url = \"amqp://u:hunter2@h/\" junk"),
        ("passwd", "passwd = \"hunter2\" junk"),
        ("Cookie", "Cookie = \"session=hunter2\" junk"),
        ("token", "token = \"hunter2"),
    ] {
        let file = write(dir.path(), "c.toml", &format!("[broker]\n{line}\n"));
        let e = load(&sources(file), &[]).expect_err("bad TOML").to_string();
        assert!(
            e.contains("line 2, column") && e.contains(&format!("key \"{name}\"")),
            "the position and the key: {e}"
        );
        assert!(!e.contains("hunter2"), "never a value: {e}");
    }
    let file = write(dir.path(), "h.toml", "[broker\nurl = \"x\"\n");
    let e = load(&sources(file), &[]).expect_err("bad TOML").to_string();
    assert!(e.contains("line 1") && e.contains("[broker"), "{e}");
}

#[test]
fn declare_modes_and_bindings_are_read_and_checked() {
    let base = r#"
[breakers.dep]
[[consumers]]
queue = "q"
breaker = "dep"
handler = "noop"
"#;
    for (written, mode) in [
        ("true", super::Declare::Full),
        ("false", super::Declare::Passive),
        ("\"policy\"", super::Declare::Policy),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            &format!("{base}declare = {written}\n"),
        );
        let s = load(&sources(file), &[]).unwrap();
        assert_eq!(s.consumers[0].declare, mode, "declare = {written}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        &format!("{base}declare = \"sometimes\"\n"),
    );
    let err = load(&sources(file), &[]).unwrap_err().to_string();
    assert!(err.contains("\"policy\""), "{err}");
    let bind = format!(
        "{base}bind = [{{ exchange = \"\", routing_key = \"k\" }}, {{ exchange = \"h\", type = \"headers\", arguments = {{ ratio = 0.5 }} }}]\n"
    );
    assert_problem(&bind, "consumers[0].bind[0].exchange", &["is required"]);
    assert_problem(
        &bind,
        "consumers[0].bind[1].arguments.ratio",
        &["integers or booleans"],
    );
    let typo = format!("{base}bind = [{{ exchange = \"x\", routingkey = \"k\" }}]\n");
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", &typo);
    let err = load(&sources(file), &[]).unwrap_err().to_string();
    assert!(
        err.contains("consumers[0].bind[0].routingkey (did you mean routing_key?)"),
        "{err}"
    );
}

#[test]
fn a_health_check_is_read_from_its_table_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        r#"
[breakers.dep.health_check]
url = "https://probe:s3cret@billing.internal/health?token=abc"
interval = "2s"

[[consumers]]
queue = "q"
breaker = "dep"
handler = "noop"
"#,
    );
    let s = load(
        &with_env(
            file,
            &[(
                "RABBIT_GUARD__BREAKERS__DEP__HEALTH_CHECK__TIMEOUT",
                "750ms",
            )],
        ),
        &[],
    )
    .unwrap();
    let check = s.breakers["dep"]
        .health_check
        .clone()
        .expect("a health check");
    assert_eq!(check.interval, Duration::from_secs(2));
    assert_eq!(check.timeout, Duration::from_millis(750));
    let shown = format!("{:?}", s.redacted());
    assert!(
        !shown.contains("s3cret") && !shown.contains("abc"),
        "the check's credentials are printed: {shown}"
    );
    // Without the table, no check: the open time alone decides.
    let s = load(&sources(write(dir.path(), "m.toml", MINIMAL)), &[]).unwrap();
    assert_eq!(s.breakers["dep"].health_check, None);
}

#[test]
fn health_check_settings_that_cannot_work_are_refused_with_their_key() {
    let problems = problems_of(
        r#"
[breakers.dep.health_check]
url = "ftp://user:hunter2@example.com/health"
interval = "1ms"
timeout = "0s"

[[consumers]]
queue = "q"
breaker = "dep"
handler = "noop"
"#,
    );
    let text = problems.join("\n");
    for want in [
        "breakers.dep.health_check.url",
        "breakers.dep.health_check.interval",
        "breakers.dep.health_check.timeout",
    ] {
        assert!(text.contains(want), "{want} should be refused:\n{text}");
    }
    assert!(
        !text.contains("hunter2"),
        "the password is printed:\n{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        r#"
[breakers.dep.health_check]
url = "http://127.0.0.1/health"
every = "1s"

[[consumers]]
queue = "q"
breaker = "dep"
handler = "noop"
"#,
    );
    let err = load(&sources(file), &[])
        .expect_err("an unknown key")
        .to_string();
    assert!(
        err.contains("every") && err.contains("breakers.dep.health_check"),
        "the unknown key and its table are named: {err}"
    );
}

#[test]
fn a_dead_letter_or_delay_queue_that_is_a_work_queue_is_refused_in_every_declare_mode() {
    for declare in ["full", "policy", "passive"] {
        let own = MINIMAL.replace(
            "handler = \"noop\"",
            &format!("handler = \"noop\"\ndeclare = \"{declare}\"\ndead_letter_queue = \"q\""),
        );
        assert_problem(
            &own,
            "consumers[0].dead_letter_queue",
            &["\"q\"", "work queue of consumers[0]", "loop"],
        );
    }
    let other = format!(
        "{MINIMAL}\n[[consumers]]\nqueue = \"q.delay.5s\"\nbreaker = \"dep\"\nhandler = \"noop\"\ndeclare = \"passive\"\n"
    );
    assert_problem(
        &other,
        "consumers[0].retry.delays[0]",
        &["q.delay.5s", "work queue of consumers[1]"],
    );
}

#[test]
fn tls_and_login_settings_fit_the_urls_and_name_what_is_wrong() {
    let with = |broker: &str| format!("[broker]\n{broker}\n{MINIMAL}");
    assert_problem(
        &with("url = \"amqp://u:p@h/\"\ntls.ca_file = \"/etc/ca.pem\""),
        "broker.tls",
        &["amqps://"],
    );
    assert_problem(
        &with("url = \"amqp://h/\"\nauth_mechanism = \"external\""),
        "broker.auth_mechanism",
        &["amqps://"],
    );
    assert_problem(
        &with("url = \"amqps://h/\"\nauth_mechanism = \"external\""),
        "broker.auth_mechanism",
        &["broker.tls.cert_file"],
    );
    assert_problem(
        &with(
            "url = \"amqps://h/\"\ntls.ca_file = \"/nonexistent/ca.pem\"\ntls.system_roots = false",
        ),
        "broker.tls.ca_file",
        &["/nonexistent/ca.pem", "cannot read it"],
    );
    assert_problem(
        &with("url = \"amqps://h/\"\ntls.server_name = \"not a name!\""),
        "broker.tls.server_name",
        &["not a DNS name"],
    );
    let dir = tempfile::tempdir().unwrap();
    let key = write(dir.path(), "k.pem", "hello, no PEM here\n");
    assert_problem(
        &with(&format!(
            "url = \"amqps://h/\"\ntls.cert_file = \"{}\"\ntls.key_file = \"{}\"",
            key.display(),
            key.display()
        )),
        "broker.tls.cert_file",
        &["no certificate"],
    );
}

#[test]
fn oauth2_settings_name_their_source_and_never_print_a_token() {
    let with = |oauth2: &str| {
        format!("[broker]\nurl = \"amqp://h/\"\n[broker.oauth2]\n{oauth2}\n{MINIMAL}")
    };
    assert_problem(&with(""), "broker.oauth2", &["token_file", "token_url"]);
    assert_problem(
        &with("token_file = \"/t\"\ntoken_url = \"https://idp/token\""),
        "broker.oauth2.token_url",
        &["not both"],
    );
    assert_problem(
        &with("token_url = \"https://idp/token\""),
        "broker.oauth2.client_id",
        &["required"],
    );
    assert_problem(
        &with("token_url = \"https://idp/token\"\nclient_id = \"w\""),
        "broker.oauth2.client_secret_file",
        &["required"],
    );
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "token", "\n");
    assert_problem(
        &with(&format!("token_file = \"{}\"", empty.display())),
        "broker.oauth2.token_file",
        &["empty"],
    );
    let token = write(dir.path(), "good", "eyJhbGciOi.secret-part.sig\n");
    let text = with(&format!(
        "token_file = \"{}\"\nrenew_before = \"2h\"",
        token.display()
    ));
    assert_problem(&text, "broker.oauth2.renew_before", &["1s to 1h"]);
    assert!(
        problems_of(&text)
            .iter()
            .all(|p| !p.contains("secret-part")),
        "a token is never printed"
    );
}
