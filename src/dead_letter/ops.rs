//! Replay, purge and import: every message is either still in the dead-letter
//! queue or safely somewhere else, whenever the command stops (even by
//! `kill -9`): a message is acked from the queue only after its copy is
//! confirmed, and everything not acked goes back when the channel closes.

use std::io::BufRead;
use std::time::Duration;

use lapin::options::QueuePurgeOptions;
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::time::Instant;

use super::browse::{Reader, message_count};
use super::json::{from_base64, properties_from_typed};
use super::{DeadLetter, Selector, headers};
use crate::amqp::publish::{PublishError, confirm_channel, confirmed};
use crate::error::Error;

/// How `replay` treats each message.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ReplayOptions {
    /// Refuse messages already replayed this many times (unless `force`).
    pub max_replays: u64,
    /// Replay even past `max_replays`.
    pub force: bool,
    /// Report what would move; move nothing.
    pub dry_run: bool,
    /// At most this many messages per second.
    pub rate: Option<f64>,
    /// Stop after this many selected messages.
    pub limit: Option<u64>,
    /// The work queue of the consumer this dead-letter queue belongs to (from
    /// the config): where a message rabbit-guard dead-lettered goes back.
    pub consumer_queue: Option<String>,
    /// Send every selected message here instead (`--to`).
    pub to: Option<String>,
}

/// Where a replay may send `dl`, or why not without `--to`: the queue given
/// with `to`; else the configured consumer's queue, when the headers that
/// name an origin agree with it or are absent: `x-death` (the broker's, or
/// a publisher's) and `rg-original-queue` (which a publisher could have
/// set). Never a queue named only by a header
/// a publisher controls.
///
/// # Errors
///
/// A sentence saying why the message has no trusted target.
pub fn replay_target(dl: &DeadLetter, options: &ReplayOptions) -> Result<String, NoReplayTarget> {
    if let Some(to) = &options.to {
        return Ok(to.clone());
    }
    let shown = |q: &str| crate::text::printable(&super::truncate(q, 80));
    if let Some(queue) = &dl.broker_queue {
        // x-death: the broker writes it, but anyone who can publish to the
        // dead-letter queue can too (it is delivered as written). It is
        // trusted to name the queue this dead-letter queue belongs to,
        // nothing else.
        return match &options.consumer_queue {
            Some(work) if work == queue => Ok(queue.clone()),
            Some(work) => Err(NoReplayTarget(format!(
                "its x-death header names {:?}, not {:?} (the queue this dead-letter queue belongs to); a publisher could have set it: replay it there only with --to",
                shown(queue),
                shown(work),
            ))),
            None => Err(NoReplayTarget(format!(
                "its x-death header names {:?}, and no configured consumer uses this dead-letter queue to confirm it: name the queue with --to",
                shown(queue)
            ))),
        };
    }
    let target: Result<String, String> = match (&options.consumer_queue, &dl.claimed_queue) {
        (Some(queue), None) => Ok(queue.clone()),
        (Some(queue), Some(claimed)) if claimed == queue => Ok(queue.clone()),
        (Some(queue), Some(claimed)) => Err(format!(
            "its rg-original-queue header names {:?}, not {:?} (the queue this dead-letter queue belongs to); a publisher could have set it: replay it there only with --to",
            shown(claimed),
            shown(queue)
        )),
        (None, Some(claimed)) => Err(format!(
            "its original queue {:?} comes only from the rg-original-queue header, which a publisher could have set, and no configured consumer uses this dead-letter queue: name the queue with --to",
            shown(claimed)
        )),
        (None, None) => Err(
            "no original queue (no x-death header, and no configured consumer uses this dead-letter queue): name one with --to"
                .into(),
        ),
    };
    target.map_err(NoReplayTarget)
}

/// Why a dead letter has no queue a replay may trust without `--to`
/// ([`replay_target`]); its text says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoReplayTarget(String);

/// One message handled by a move.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Moved {
    /// Its id (message id, or `#position`).
    pub id: String,
    /// Where it went (or would go), or why not.
    pub detail: String,
}

/// What a replay or purge did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MoveReport {
    /// Messages in the queue when it began.
    pub in_queue: u32,
    /// Messages looked at so far (selected or not), out of `in_queue`.
    pub scanned: u64,
    /// Moved (or deleted; or, in a dry run, would be).
    pub done: Vec<Moved>,
    /// Selected but refused by a rule (loop guard), left in place.
    pub skipped: Vec<Moved>,
    /// Selected but not moved because of an error, left in place.
    pub failed: Vec<Moved>,
}

/// Publishes to `queue` through the default exchange with confirms.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    confirmed(channel, "", queue, body, properties).await
}

/// Why a message was not moved, for the report.
fn not_moved(queue: &str, e: &PublishError) -> String {
    match e {
        PublishError::Unroutable { .. } => {
            format!("queue {queue:?} does not exist (returned unroutable)")
        }
        other => other.to_string(),
    }
}

/// `user_id` must be the publishing connection's user, or the broker closes
/// the channel: keep it only when it is.
fn keep_user_id(properties: BasicProperties, user: &str) -> BasicProperties {
    match properties.user_id() {
        Some(id) if id.as_str() != user => rebuild_without_user_id(&properties),
        _ => properties,
    }
}

/// `properties` without `CC`/`BCC`: an imported message goes to the one
/// queue named, not to every queue its headers list.
fn without_routing_headers(properties: BasicProperties) -> BasicProperties {
    if properties.headers().is_none() {
        return properties;
    }
    let table = headers::edited(&properties, &[headers::ROUTING_HEADERS], |_| {});
    properties.with_headers(table)
}

fn rebuild_without_user_id(p: &BasicProperties) -> BasicProperties {
    let mut typed = super::json::properties_typed(p);
    typed.remove("user_id");
    properties_from_typed(&typed).unwrap_or_default()
}

/// The properties of a replayed copy: attempt count and dead-letter headers
/// reset, `rg-replays` + 1, everything else kept.
fn replay_properties(dl: &DeadLetter, user: &str) -> BasicProperties {
    let table = headers::edited(
        &dl.properties,
        &[
            headers::RESET_ON_REPLAY,
            headers::BROKER_DEATH_HEADERS,
            headers::ROUTING_HEADERS,
            &["x-delivery-count"],
        ],
        |map| {
            map.insert(
                headers::REPLAYS.into(),
                AMQPValue::LongLongInt(
                    i64::try_from(dl.replays.saturating_add(1)).unwrap_or(i64::MAX),
                ),
            );
        },
    );
    keep_user_id(dl.properties.clone().with_headers(table), user)
}

/// Waits so that at most `rate` messages per second go out.
struct Pace {
    every: Option<Duration>,
    next: Instant,
}

impl Pace {
    fn new(rate: Option<f64>) -> Self {
        Self {
            every: rate
                .filter(|r| *r > 0.0)
                .map(|r| {
                    Duration::try_from_secs_f64(1.0 / r).map_or(crate::config::MAX_DURATION, |d| {
                        d.min(crate::config::MAX_DURATION)
                    })
                })
                .filter(|d| !d.is_zero()),
            next: Instant::now(),
        }
    }

    async fn wait(&mut self) {
        if let Some(every) = self.every {
            tokio::time::sleep_until(self.next).await;
            self.next = crate::amqp::deadline(self.next.max(Instant::now()), every);
        }
    }
}

/// Sends selected messages back to their original queue (see
/// [`replay_target`]: never one named only by a header a publisher could
/// have set), or to `options.to`, acking each from the
/// dead-letter queue only after its copy is confirmed. `progress` is called
/// after each message looked at.
///
/// # Errors
///
/// [`Error::QueueNotFound`] or a broker error; messages not moved by then
/// stay in the dead-letter queue.
///
/// # Cancel safety
///
/// Safe to drop at any await: a message is acked from its queue only after
/// its copy is confirmed, so dropped mid-way every message is in one queue
/// or the other (at worst in both: a duplicate).
pub async fn replay(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    options: &ReplayOptions,
    mut progress: impl FnMut(&MoveReport),
) -> Result<MoveReport, Error> {
    let user = connection.status().username();
    let mut report = MoveReport {
        in_queue: message_count(connection, dlq).await?,
        ..MoveReport::default()
    };
    if report.in_queue == 0 {
        return Ok(report);
    }
    let publisher = confirm_channel(connection).await?;
    let mut reader = Reader::open(connection, dlq).await?;
    let now = std::time::SystemTime::now();
    let mut pace = Pace::new(options.rate);
    let mut broken = None;
    while let Some(dl) = reader
        .next_selected(selector, now, &mut report, &mut progress)
        .await?
    {
        let handled = (report.done.len() + report.skipped.len() + report.failed.len()) as u64;
        if options.limit.is_some_and(|limit| handled >= limit) {
            break;
        }
        let id = dl.display_id();
        let target = match replay_target(&dl, options) {
            Ok(target) => target,
            Err(why) => {
                report.failed.push(Moved {
                    id,
                    detail: why.to_string(),
                });
                progress(&report);
                continue;
            }
        };
        if dl.replays >= options.max_replays && !options.force {
            report.skipped.push(Moved {
                id,
                detail: format!(
                    "already replayed {} times (--max-replays {}); --force to replay anyway",
                    dl.replays, options.max_replays
                ),
            });
            progress(&report);
            continue;
        }
        if options.dry_run {
            report.done.push(Moved { id, detail: target });
            progress(&report);
            continue;
        }
        pace.wait().await;
        match publish_confirmed(&publisher, &target, &dl.body, replay_properties(&dl, &user)).await
        {
            Ok(()) => {
                if let Err(e) = reader.ack(dl.delivery_tag).await {
                    // The copy is in place; the original stays too (a duplicate, never a loss).
                    broken = Some(Error::broker("removing a replayed message", e));
                    report.failed.push(Moved {
                        id,
                        detail: "copied, but could not be removed from the dead-letter queue"
                            .into(),
                    });
                    break;
                }
                report.done.push(Moved { id, detail: target });
            }
            Err(e) => {
                report.failed.push(Moved {
                    id,
                    detail: not_moved(&target, &e),
                });
                if !publisher.status().connected() {
                    break;
                }
            }
        }
        progress(&report);
    }
    let moved = if options.dry_run {
        0
    } else {
        report.done.len()
    };
    let expect = report
        .in_queue
        .saturating_sub(u32::try_from(moved).unwrap_or(u32::MAX));
    reader.close(connection, expect).await?;
    let _ = publisher.close(200, "replayed".into()).await;
    broken.map_or(Ok(report), Err)
}

/// Deletes the selected messages (acks them without a copy). `progress` is
/// called after each message looked at.
///
/// # Errors
///
/// [`Error::QueueNotFound`] or a broker error.
///
/// # Cancel safety
///
/// Safe to drop at any await: a message is deleted only by its own ack;
/// whatever was not acked goes back to the queue when the channel closes.
pub async fn purge(
    connection: &Connection,
    dlq: &str,
    selector: &Selector,
    limit: Option<u64>,
    mut progress: impl FnMut(&MoveReport),
) -> Result<MoveReport, Error> {
    let mut report = MoveReport {
        in_queue: message_count(connection, dlq).await?,
        ..MoveReport::default()
    };
    if report.in_queue == 0 {
        return Ok(report);
    }
    let mut reader = Reader::open(connection, dlq).await?;
    let now = std::time::SystemTime::now();
    while let Some(dl) = reader
        .next_selected(selector, now, &mut report, &mut progress)
        .await?
    {
        if limit.is_some_and(|l| report.done.len() as u64 >= l) {
            break;
        }
        reader
            .ack(dl.delivery_tag)
            .await
            .map_err(|e| Error::broker("deleting a message", e))?;
        report.done.push(Moved {
            id: dl.display_id(),
            detail: "deleted".into(),
        });
        progress(&report);
    }
    let expect = report
        .in_queue
        .saturating_sub(u32::try_from(report.done.len()).unwrap_or(u32::MAX));
    reader.close(connection, expect).await?;
    Ok(report)
}

/// Empties the queue (`queue.purge`); returns how many messages it held.
///
/// # Errors
///
/// [`Error::QueueNotFound`] or a broker error.
pub async fn purge_all(connection: &Connection, dlq: &str) -> Result<u32, Error> {
    message_count(connection, dlq).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::broker("opening a channel", e))?;
    let n = channel
        .queue_purge(ShortString::from(dlq), QueuePurgeOptions::default())
        .await
        .map_err(|e| Error::broker(format!("purging {dlq}"), e))?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(n)
}

/// What an import did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ImportReport {
    /// Messages published and confirmed.
    pub published: u64,
    /// Lines that were not published, with the line number and why.
    pub failed: Vec<Moved>,
}

/// Publishes every message of an export file (one JSON object per line, as
/// written by `dlq export`) to `queue`, each confirmed. A line the broker
/// refuses by closing the channel (a malformed `expiration`, say) is
/// reported and a new channel opened for the rest; every line not imported
/// is listed in the report with its number and why.
///
/// # Errors
///
/// The queue does not exist, the file cannot be read, or the connection is
/// lost (lines already confirmed stay published; the report so far is lost
/// with the error, so the message names the line reached).
///
/// # Cancel safety
///
/// Safe to drop at any await: lines confirmed so far are published, the
/// rest are not; a line whose confirm was pending may or may not be.
pub async fn import(
    connection: &Connection,
    lines: impl BufRead,
    queue: &str,
    mut progress: impl FnMut(&ImportReport),
) -> Result<ImportReport, Error> {
    message_count(connection, queue).await?;
    let user = connection.status().username();
    let mut channel = confirm_channel(connection).await?;
    let mut report = ImportReport::default();
    for (n, line) in lines.lines().enumerate() {
        let line_no = format!("line {}", n + 1);
        let line = line.map_err(|e| Error::Io {
            context: format!("reading the import file ({line_no})"),
            source: e,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        if !channel.status().connected() {
            if !connection.status().connected() {
                return Err(Error::Io {
                    context: format!(
                        "the connection to the broker was lost at {line_no}; {} lines were imported before it, the rest were not",
                        report.published
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
                });
            }
            channel = confirm_channel(connection).await?;
        }
        let (properties, body) = match parse_export_line(&line) {
            Ok(p) => p,
            Err(why) => {
                report.failed.push(Moved {
                    id: line_no,
                    detail: why,
                });
                progress(&report);
                continue;
            }
        };
        match publish_confirmed(
            &channel,
            queue,
            &body,
            keep_user_id(without_routing_headers(properties), &user),
        )
        .await
        {
            Ok(()) => report.published += 1,
            Err(e) => report.failed.push(Moved {
                id: line_no,
                detail: not_moved(queue, &e),
            }),
        }
        progress(&report);
    }
    let _ = channel.close(200, "imported".into()).await;
    Ok(report)
}

fn parse_export_line(line: &str) -> Result<(BasicProperties, Vec<u8>), String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let props = v
        .get("properties")
        .and_then(serde_json::Value::as_object)
        .ok_or("no \"properties\" object")?;
    let body = v
        .get("body_base64")
        .and_then(serde_json::Value::as_str)
        .ok_or("no \"body_base64\"")?;
    Ok((properties_from_typed(props)?, from_base64(body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    fn letter(replays: u64, headers: FieldTable) -> DeadLetter {
        DeadLetter {
            position: 1,
            delivery_tag: 1,
            message_id: Some("m".into()),
            reason: None,
            broker_reason: None,
            error: None,
            attempts: None,
            replays,
            original_queue: None,
            broker_queue: None,
            broker: crate::dead_letter::BrokerVersion::UNKNOWN,
            claimed_queue: None,
            dead_lettered_at: None,
            properties: BasicProperties::default().with_headers(headers),
            body: Vec::new(),
        }
    }

    #[test]
    fn a_replay_goes_only_where_the_broker_or_the_config_says() {
        let mut dl = letter(0, FieldTable::default());
        let options = |consumer: Option<&str>, to: Option<&str>| ReplayOptions {
            consumer_queue: consumer.map(str::to_owned),
            to: to.map(str::to_owned),
            ..ReplayOptions::default()
        };
        assert_eq!(
            replay_target(&dl, &options(Some("orders"), None)),
            Ok("orders".into())
        );
        assert!(
            replay_target(&dl, &options(None, None)).is_err(),
            "nothing to trust"
        );
        dl.claimed_queue = Some("admin-commands".into());
        let refused = replay_target(&dl, &options(Some("orders"), None))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("admin-commands") && refused.contains("--to"),
            "{refused}"
        );
        assert!(
            replay_target(&dl, &options(None, None)).is_err(),
            "a header alone is not trusted"
        );
        assert_eq!(
            replay_target(&dl, &options(Some("orders"), Some("admin-commands"))),
            Ok("admin-commands".into()),
            "--to decides"
        );
        dl.claimed_queue = Some("orders".into());
        assert_eq!(
            replay_target(&dl, &options(Some("orders"), None)),
            Ok("orders".into())
        );
        dl.broker_queue = Some("orders".into());
        dl.claimed_queue = Some("admin-commands".into());
        assert_eq!(
            replay_target(&dl, &options(Some("orders"), None)),
            Ok("orders".into()),
            "an x-death naming this DLQ's own work queue wins over the header"
        );
        dl.broker_queue = Some("payments".into());
        let refused = replay_target(&dl, &options(Some("orders"), None))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("payments") && refused.contains("--to"),
            "an x-death naming another queue could be a publisher's (RabbitMQ 3.x): {refused}"
        );
        assert!(
            replay_target(&dl, &options(None, None)).is_err(),
            "no configured consumer to confirm x-death: --to"
        );
    }

    #[test]
    fn a_replay_count_at_its_ceiling_saturates_and_routing_headers_are_dropped() {
        let mut h = FieldTable::default();
        h.insert("CC".into(), AMQPValue::LongString("elsewhere".into()));
        h.insert("BCC".into(), AMQPValue::LongString("elsewhere".into()));
        h.insert("keep".into(), AMQPValue::Boolean(true));
        let props = replay_properties(&letter(u64::MAX, h), "guest");
        let out = props.headers().as_ref().unwrap().inner();
        assert_eq!(
            out.get(headers::REPLAYS),
            Some(&AMQPValue::LongLongInt(i64::MAX))
        );
        assert!(
            !out.contains_key("CC") && !out.contains_key("BCC"),
            "{out:?}"
        );
        assert!(out.contains_key("keep"));
        let imported = without_routing_headers(props);
        assert!(
            !imported
                .headers()
                .as_ref()
                .unwrap()
                .inner()
                .contains_key("CC")
        );
    }
}
