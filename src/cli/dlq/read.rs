//! The commands that only read: `list`, `summary`, `show`.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::SystemTime;

use lapin::Connection;

use super::render::{self, TimeFormat, age, cell};
use super::{Failure, output};
use crate::dead_letter::{self, DeadLetter, Selector, json};
use crate::text::{printable, printable_lines};

pub(super) async fn list(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    limit: Option<u64>,
    as_json: bool,
) -> Result<ExitCode, Failure> {
    let now = std::time::SystemTime::now();
    let mut shown = 0u64;
    let mut out = output::stream().lock();
    if !as_json {
        let _ = writeln!(
            out,
            "{:>5}  {}  {}  {}  {:>3}  {}  {:>4}  {:>7}",
            "POS",
            cell("ID", 24),
            cell("REASON", 17),
            cell("ERROR", 40),
            "ATT",
            cell("QUEUE", 20),
            "AGE",
            "SIZE"
        );
    }
    let seen = dead_letter::browse(connection, dlq, |dl| {
        if !selector.matches(&dl, now) {
            return ControlFlow::Continue(());
        }
        shown += 1;
        let _ = if as_json {
            writeln!(out, "{}", dl.to_json(now))
        } else {
            writeln!(
                out,
                "{:>5}  {}  {}  {}  {:>3}  {}  {:>4}  {:>7}",
                dl.position,
                cell(&dl.display_id(), 24),
                cell(dl.reason_label(), 17),
                cell(dl.error.as_deref().unwrap_or("-"), 40),
                dl.attempts.map_or("-".into(), |a| a.to_string()),
                cell(dl.original_queue.as_deref().unwrap_or("-"), 20),
                age(dl.age(now)),
                dl.body.len()
            )
        };
        if limit.is_some_and(|l| shown >= l) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    drop(out);
    if !as_json {
        output::line(&format!(
            "{shown} shown of {} in {}",
            seen.in_queue,
            printable(dlq)
        ));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Group {
    count: u64,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
}

/// Distinct errors kept apart at most; the rest are counted together.
const MAX_GROUPS: usize = 10_000;

/// Groups by reason and the whole error text (whitespace folded), so errors
/// that differ late are not lumped together.
fn group_key(dl: &DeadLetter) -> (String, String) {
    let error = dl.error.as_deref().unwrap_or("-");
    let error: String = error.split_whitespace().collect::<Vec<_>>().join(" ");
    (dl.reason_label().to_owned(), error)
}

pub(super) async fn summary(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    as_json: bool,
    clock: TimeFormat,
) -> Result<ExitCode, Failure> {
    let now = std::time::SystemTime::now();
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    let mut total = 0u64;
    let seen = dead_letter::browse(connection, dlq, |dl| {
        if selector.matches(&dl, now) {
            total += 1;
            let mut key = group_key(&dl);
            if groups.len() >= MAX_GROUPS && !groups.contains_key(&key) {
                key = (
                    key.0,
                    format!("(more than {MAX_GROUPS} distinct errors: the rest)"),
                );
            }
            let g = groups.entry(key).or_default();
            g.count += 1;
            if let Some(at) = dl.dead_lettered_at {
                g.first = Some(g.first.map_or(at, |f| f.min(at)));
                g.last = Some(g.last.map_or(at, |l| l.max(at)));
            }
        }
        ControlFlow::Continue(())
    })
    .await?;
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
    if as_json {
        let at = |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_millis(t).to_string());
        let groups: Vec<serde_json::Value> = rows
            .iter()
            .map(|((reason, error), g)| {
                serde_json::json!({
                    "reason": reason,
                    "error": error,
                    "count": g.count,
                    "first_seen": at(g.first),
                    "last_seen": at(g.last),
                })
            })
            .collect();
        output::line(
            &serde_json::json!({
                "queue": dlq,
                "selected": total,
                "in_queue": seen.in_queue,
                "groups": groups,
            })
            .to_string(),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = render::table(&["COUNT", "REASON", "ERROR", "FIRST SEEN", "LAST SEEN"]);
    for ((reason, error), g) in rows {
        table.add_row(vec![
            g.count.to_string(),
            printable(&reason),
            printable(&error),
            clock.show(g.first),
            clock.show(g.last),
        ]);
    }
    render::right_align(&mut table, 0);
    output::line(&table.to_string());
    output::line(&format!(
        "{total} selected of {} in {}",
        seen.in_queue,
        printable(dlq)
    ));
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn show(
    connection: &Connection,
    dlq: &str,
    consumer_queue: Option<&str>,
    id: &str,
    as_json: bool,
    clock: TimeFormat,
) -> Result<ExitCode, Failure> {
    let mut found = None;
    dead_letter::browse(connection, dlq, |dl| {
        if dl.message_id.as_deref() == Some(id) {
            found = Some(dl);
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    let Some(dl) = found else {
        return Err(Failure::Error(format!(
            "no message with id {:?} in {}",
            printable(id),
            printable(dlq)
        )));
    };
    let now = std::time::SystemTime::now();
    if as_json {
        output::line(&show_json(&dl, consumer_queue, now).to_string());
        return Ok(ExitCode::SUCCESS);
    }
    let field = |k: &str, v: &str| output::line(&format!("{k:<18}{}", printable(v)));
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    field("position", &dl.position.to_string());
    field("message id", &dl.display_id());
    field("reason", &or_dash(&dl.reason));
    field("broker reason", &or_dash(&dl.broker_reason));
    field("error", &or_dash(&dl.error));
    field(
        "attempts",
        &dl.attempts.map_or("-".into(), |a| a.to_string()),
    );
    field("replays", &dl.replays.to_string());
    let origin = match (&dl.broker_queue, &dl.claimed_queue, consumer_queue) {
        (Some(q), _, _) if consumer_queue == Some(q.as_str()) => {
            format!("{q} (x-death, and this dead-letter queue's consumer)")
        }
        (Some(q), _, _) => format!(
            "{q} (x-death: set by the broker, or by whoever published it: NOT VERIFIED; replay needs --to)"
        ),
        (None, Some(c), Some(q)) if c == q => format!("{c} (this dead-letter queue's consumer)"),
        (None, Some(c), _) => format!(
            "{c} (rg-original-queue only: NOT VERIFIED, a publisher could have set it; replay needs --to)"
        ),
        (None, None, Some(q)) => format!("{q} (this dead-letter queue's consumer)"),
        (None, None, None) => "-".into(),
    };
    field("original queue", &origin);
    field(
        "dead-lettered at",
        &format!(
            "{} ({} ago)",
            clock.show(dl.dead_lettered_at),
            age(dl.age(now))
        ),
    );
    output::line("properties:");
    for (k, v) in json::properties_typed(&dl.properties) {
        if k != "headers" {
            output::line(&format!("  {k}: {}", printable(&v.to_string())));
        }
    }
    show_headers(&dl, consumer_queue);
    output::line(&format!("body ({} bytes):", dl.body.len()));
    match serde_json::from_slice::<serde_json::Value>(&dl.body) {
        Ok(v) => output::line(&printable_lines(
            &serde_json::to_string_pretty(&v).unwrap_or_default(),
        )),
        Err(_) => match dl.body_text() {
            Some(t) => output::line(&printable_lines(t)),
            None => output::line(&format!("(not UTF-8; base64) {}", json::base64(&dl.body))),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// `dlq show`'s headers: each with who set it, and where a header that
/// could not be read was cut.
fn show_headers(dl: &DeadLetter, consumer_queue: Option<&str>) {
    output::line(
        "headers (who set them: [broker], [rabbit-guard], or [publisher] and [broker or publisher] = not verified):",
    );
    if let Some(why) = dl
        .properties
        .headers()
        .as_ref()
        .and_then(crate::amqp::unreadable)
    {
        output::line(&format!(
            "  note: part of the headers could not be read and was cut where the {:?} entry is: {}",
            crate::amqp::UNREADABLE_KEY,
            printable(&why)
        ));
    }
    if let Some(h) = dl.properties.headers() {
        for (k, v) in h.inner() {
            output::line(&format!(
                "  {}: {}  [{}]",
                printable(k.as_str()),
                printable(&json::plain(v).to_string()),
                dl.header_origin(k.as_str(), consumer_queue).label()
            ));
        }
    }
}

/// `dlq show --json`: the `list --json` object, with every property typed
/// and who set each header.
fn show_json(dl: &DeadLetter, consumer_queue: Option<&str>, now: SystemTime) -> serde_json::Value {
    let mut v = dl.to_json(now);
    let origins: serde_json::Map<String, serde_json::Value> = dl
        .properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .keys()
                .map(|k| {
                    let origin = dl.header_origin(k.as_str(), consumer_queue).label();
                    (k.to_string(), serde_json::json!(origin))
                })
                .collect()
        })
        .unwrap_or_default();
    v["header_origins"] = serde_json::Value::Object(origins);
    v["unreadable_headers"] = serde_json::json!(
        dl.properties
            .headers()
            .as_ref()
            .and_then(crate::amqp::unreadable)
    );
    v["properties"] = serde_json::Value::Object(json::properties_typed(&dl.properties));
    v
}
