//! The copies of a delivery rabbit-guard publishes before it acks the
//! original: to a delay queue (a retry, or a deferral that does not count
//! as an attempt) or to the dead-letter queue. The one place the `rg-*`
//! headers of a copy are written ([`headers`](super::headers) names them,
//! `dead_letter` reads them back), and the confirmed, retried publish that
//! stores a copy.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::headers::{self, MAX_INCONCLUSIVE, header_u64, number, text};
use super::publish::{PublishError, Publisher};
use super::topology::Topology;
use crate::consumer::ConsumerStats;
use crate::dead_letter::{DeadLetterReason, MAX_ERROR_LEN};
use crate::handler::Context;
use crate::text::truncate;

/// Why a copy is made, as the consumer's ack policy decided it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Purpose<'a> {
    /// To the dead-letter queue, saying why and with the error's text.
    DeadLetter {
        reason: DeadLetterReason,
        error: &'a str,
    },
    /// To delay level `level`, to be handled again as attempt `next_attempt`.
    Retry { level: usize, next_attempt: u32 },
    /// Put back without counting an attempt: to delay level `level`, or to
    /// the work queue's tail. One more deferral; `inconclusive` also adds
    /// one to the inconclusive count.
    Defer {
        level: Option<usize>,
        inconclusive: bool,
    },
}

/// A copy to publish before the original is acked.
#[derive(Debug)]
pub(crate) struct Copy<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) properties: BasicProperties,
}

impl<'a> Copy<'a> {
    /// Where the copy of `ctx`'s message goes for `purpose`, and its
    /// headers. Pure, so every header it writes is unit-tested.
    pub(crate) fn of(
        topology: &'a Topology,
        handler_name: &str,
        ctx: &Context,
        purpose: &Purpose<'_>,
    ) -> Self {
        match *purpose {
            Purpose::DeadLetter { reason, error } => Copy {
                exchange: &topology.dead_letter_exchange,
                routing_key: &topology.dead_letter_queue,
                properties: copy_properties(ctx.properties(), |h| {
                    h.insert(headers::REASON.into(), text(reason.as_str()));
                    h.insert(headers::ERROR.into(), text(&truncate(error, MAX_ERROR_LEN)));
                    h.insert(headers::HANDLER.into(), text(handler_name));
                    h.insert(headers::ORIGINAL_QUEUE.into(), text(&topology.queue));
                    h.insert(
                        headers::DEAD_LETTERED_AT.into(),
                        text(
                            &humantime::format_rfc3339_millis(std::time::SystemTime::now())
                                .to_string(),
                        ),
                    );
                    h.insert(headers::ATTEMPT.into(), number(ctx.attempt()));
                }),
            },
            Purpose::Retry {
                level,
                next_attempt,
            } => Copy {
                exchange: "",
                routing_key: &topology.delay_queues[level].1,
                properties: copy_properties(ctx.properties(), |h| {
                    h.insert(headers::ATTEMPT.into(), number(next_attempt));
                }),
            },
            Purpose::Defer {
                level,
                inconclusive,
            } => {
                let deferrals = header_count(ctx, headers::DEFERRALS).saturating_add(1);
                let inconclusive_count = inconclusive_count(ctx) + u32::from(inconclusive);
                Copy {
                    exchange: "",
                    routing_key: match level {
                        Some(l) => &topology.delay_queues[l].1,
                        None => &topology.queue,
                    },
                    properties: copy_properties(ctx.properties(), |h| {
                        h.insert(headers::ATTEMPT.into(), number(ctx.attempt()));
                        h.insert(headers::DEFERRALS.into(), number(deferrals));
                        if inconclusive_count > 0 {
                            h.insert(headers::INCONCLUSIVE.into(), number(inconclusive_count));
                        }
                    }),
                }
            }
        }
    }
}

/// A count kept in one of our headers; saturates instead of wrapping.
fn header_count(ctx: &Context, name: &str) -> u32 {
    ctx.headers()
        .and_then(|h| header_u64(h, name))
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// `rg-inconclusive`: more than [`MAX_INCONCLUSIVE`] is never written by
/// rabbit-guard (it dead-letters at that count), so a larger value was set
/// by a publisher and counts as none, rather than cutting the message's
/// retries short.
pub(crate) fn inconclusive_count(ctx: &Context) -> u32 {
    match header_count(ctx, headers::INCONCLUSIVE) {
        n if n > MAX_INCONCLUSIVE => 0,
        n => n,
    }
}

/// The original's properties, persistent, with `edit` applied to the
/// headers. Left out: broker death headers, `CC`/`BCC` (the copy must reach
/// one queue only), the per-message `expiration` (a
/// dead letter must not silently expire) and `user_id` (the broker rejects a
/// user id that is not the publishing connection's).
fn copy_properties(
    original: &BasicProperties,
    edit: impl FnOnce(&mut BTreeMap<ShortString, AMQPValue>),
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_headers(headers::edited(original, headers::NEVER_COPIED, edit))
        .with_delivery_mode(2);
    let o = original;
    if let Some(v) = o.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = o.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = o.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = o.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = o.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = o.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = o.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = o.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = o.app_id() {
        props = props.with_app_id(v.clone());
    }
    props
}

/// The consumer a copy is stored for: its queue (for logs), its topology
/// (declared again when a copy cannot be routed) and its counters.
#[derive(Debug)]
pub(crate) struct Place<'a> {
    pub(crate) queue: &'a str,
    pub(crate) topology: &'a Topology,
    pub(crate) stats: &'a ConsumerStats,
}

/// First wait before publishing a copy again.
const COPY_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between attempts to publish a copy.
const COPY_RETRY_MAX: Duration = Duration::from_secs(10);

/// Publishes a copy and waits for its confirm, trying again with backoff
/// (and declaring the topology again, when rabbit-guard declares it) while
/// the broker does not store it: a deleted dead-letter queue, an unroutable
/// or nacked copy. The original stays unacked meanwhile, so nothing is
/// lost and nothing is handled again; the prefetch bounds how many wait.
/// False when the copy was given up: the session ended (the broker has
/// requeued the original), the publishing connection was lost, or the
/// broker's consumer timeout is near.
pub(crate) async fn store(
    place: &Place<'_>,
    publisher: &Publisher,
    session: &CancellationToken,
    body: &[u8],
    copy: Copy<'_>,
) -> bool {
    let Copy {
        exchange,
        routing_key,
        properties,
    } = copy;
    let deadline = super::deadline(Instant::now(), publisher.timeout());
    let mut backoff = crate::backoff::exponential(COPY_RETRY_MIN, COPY_RETRY_MAX);
    let mut waiting = None;
    loop {
        if session.is_cancelled() {
            // The channel this delivery came on is gone; the broker has
            // requeued the original, so a copy now would only be a duplicate.
            return false;
        }
        let error = match publisher
            .publish_confirmed(exchange, routing_key, body, properties.clone())
            .await
        {
            Ok(()) => {
                copies_stored(place);
                return true;
            }
            Err(e) => e,
        };
        if !publisher.is_open() {
            // The publishing connection is gone, and this publisher with
            // it: the session ends and the original goes back to the queue
            // (nacked here if its channel still works, else by the broker).
            // Not the broker refusing the copy: no trouble to report.
            debug!(queue = %place.queue, target = routing_key, error = %error, "publishing connection lost while storing a copy; returning the original");
            return false;
        }
        crate::consumer::inc(&place.stats.publish_failures);
        waiting.get_or_insert_with(|| CopyWaiting::new(place.stats));
        copy_failed(place, routing_key, &error);
        if place.topology.declares()
            && matches!(
                error,
                PublishError::Unroutable { .. } | PublishError::Broker(_)
            )
        {
            publisher.redeclare(place.topology).await;
        }
        let delay = backoff.next().unwrap_or(COPY_RETRY_MAX);
        if Instant::now() + delay >= deadline {
            warn!(
                queue = %place.queue,
                target = routing_key,
                error = %error,
                "gave up storing a copy before the broker's consumer timeout; returning the original to the queue"
            );
            return false;
        }
        tokio::select! {
            () = session.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The first failed copy of an episode is logged (with its cause) and
/// marks the consumer not ready; the rest are only counted.
fn copy_failed(place: &Place<'_>, target: &str, error: &PublishError) {
    let stats = place.stats;
    let mut trouble = stats
        .copy_trouble
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if trouble.is_none() {
        warn!(
            queue = %place.queue,
            target,
            error = %error,
            "cannot store copies of messages (retries, dead letters); retrying with backoff, their originals stay unacked"
        );
    }
    *trouble = Some(format!("copies to {target} fail: {error}"));
    stats.copy_trouble_set.store(true, Ordering::Relaxed);
}

fn copies_stored(place: &Place<'_>) {
    let stats = place.stats;
    if !stats.copy_trouble_set.load(Ordering::Relaxed) {
        return;
    }
    let mut trouble = stats
        .copy_trouble
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(why) = trouble.take() {
        stats.copy_trouble_set.store(false, Ordering::Relaxed);
        info!(queue = %place.queue, was = %why, "copies are stored again");
    }
}

/// Counts a message in `copies_waiting` while its copy is retried.
struct CopyWaiting<'a>(&'a ConsumerStats);

impl<'a> CopyWaiting<'a> {
    fn new(stats: &'a ConsumerStats) -> Self {
        stats.copies_waiting.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for CopyWaiting<'_> {
    fn drop(&mut self) {
        let stats = self.0;
        if stats.copies_waiting.fetch_sub(1, Ordering::Relaxed) == 1
            && stats.copy_trouble_set.load(Ordering::Relaxed)
        {
            // The last waiting copy was given up (its channel is gone, or the
            // consumer timeout neared): nothing waits, so nothing is wrong
            // until the next copy fails, which logs the episode again.
            stats
                .copy_trouble
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            stats.copy_trouble_set.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsumerSettings, RetrySettings};

    fn topology() -> Topology {
        let mut consumer = ConsumerSettings::new("orders", "http");
        consumer.retry = RetrySettings {
            delays: vec![Duration::from_secs(1), Duration::from_secs(5)],
            ..RetrySettings::default()
        };
        Topology::of(0, &consumer)
    }

    fn ctx(headers: &[(&str, AMQPValue)]) -> Context {
        let mut h = lapin::types::FieldTable::default();
        for (k, v) in headers {
            h.insert((*k).into(), v.clone());
        }
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_expiration("60000".into())
            .with_user_id("someone-else".into())
            .with_headers(h);
        Context::new(
            3,
            "orders".into(),
            7,
            String::new(),
            "orders".into(),
            false,
            props,
            b"{}".to_vec(),
        )
    }

    fn header<'a>(copy: &'a Copy<'_>, name: &str) -> Option<&'a AMQPValue> {
        copy.properties.headers().as_ref()?.inner().get(name)
    }

    #[test]
    fn a_dead_letter_says_why_and_carries_nothing_that_routes_or_expires() {
        let t = topology();
        let c = ctx(&[
            ("CC", text("elsewhere")),
            ("x-death", text("forged")),
            (headers::ATTEMPT, number(2)),
            ("keep", text("me")),
        ]);
        let long = "e".repeat(MAX_ERROR_LEN * 2);
        let copy = Copy::of(
            &t,
            "http",
            &c,
            &Purpose::DeadLetter {
                reason: DeadLetterReason::Permanent,
                error: &long,
            },
        );
        assert_eq!(
            (copy.exchange, copy.routing_key),
            ("orders.dlx", "orders.dlq")
        );
        assert_eq!(header(&copy, headers::REASON), Some(&text("permanent")));
        assert_eq!(header(&copy, headers::HANDLER), Some(&text("http")));
        assert_eq!(
            header(&copy, headers::ORIGINAL_QUEUE),
            Some(&text("orders"))
        );
        assert_eq!(header(&copy, headers::ATTEMPT), Some(&number(2)));
        assert_eq!(header(&copy, "keep"), Some(&text("me")));
        let Some(AMQPValue::LongString(error)) = header(&copy, headers::ERROR) else {
            panic!("rg-error missing");
        };
        assert!(
            error.as_bytes().len() <= MAX_ERROR_LEN,
            "{} bytes",
            error.as_bytes().len()
        );
        assert!(header(&copy, "CC").is_none() && header(&copy, "x-death").is_none());
        assert_eq!(
            copy.properties.expiration(),
            &None,
            "a dead letter must not expire"
        );
        assert_eq!(copy.properties.user_id(), &None);
        assert_eq!(copy.properties.delivery_mode(), &Some(2));
        assert_eq!(
            copy.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("m-1")
        );
    }

    #[test]
    fn a_retry_goes_to_its_level_with_the_next_attempt() {
        let t = topology();
        let c = ctx(&[(headers::ATTEMPT, number(2))]);
        let copy = Copy::of(
            &t,
            "http",
            &c,
            &Purpose::Retry {
                level: 1,
                next_attempt: 3,
            },
        );
        assert_eq!((copy.exchange, copy.routing_key), ("", "orders.delay.5s"));
        assert_eq!(header(&copy, headers::ATTEMPT), Some(&number(3)));
        assert!(header(&copy, headers::REASON).is_none());
    }

    #[test]
    fn a_deferral_keeps_the_attempt_and_its_counts_saturate() {
        let t = topology();
        let c = ctx(&[
            (headers::ATTEMPT, number(2)),
            (headers::DEFERRALS, AMQPValue::LongLongInt(i64::MAX)),
            (headers::INCONCLUSIVE, number(1)),
        ]);
        let copy = Copy::of(
            &t,
            "http",
            &c,
            &Purpose::Defer {
                level: None,
                inconclusive: true,
            },
        );
        assert_eq!(
            copy.routing_key, "orders",
            "no delay level: back to the work queue's tail"
        );
        assert_eq!(header(&copy, headers::ATTEMPT), Some(&number(2)));
        assert_eq!(header(&copy, headers::DEFERRALS), Some(&number(u32::MAX)));
        assert_eq!(header(&copy, headers::INCONCLUSIVE), Some(&number(2)));
    }

    #[test]
    fn a_forged_inconclusive_count_counts_as_none() {
        let c = ctx(&[(headers::INCONCLUSIVE, number(MAX_INCONCLUSIVE + 1))]);
        assert_eq!(inconclusive_count(&c), 0);
        let c = ctx(&[(headers::INCONCLUSIVE, number(MAX_INCONCLUSIVE))]);
        assert_eq!(inconclusive_count(&c), MAX_INCONCLUSIVE);
    }
}
