//! One queue's consumer: subscribes in the state its breaker is in, runs the
//! handler for each delivery under a concurrency limit, and settles each
//! delivery by the ack policy.
//!
//! | breaker | at the broker |
//! |---|---|
//! | closed / disabled | subscribed with `basic.qos(prefetch)` |
//! | open / forced open | `basic.cancel`: no consumer, messages wait in the queue |
//! | half-open | subscribed with `basic.qos(half_open_probes)` until it has its probes |
//!
//! Prefetched deliveries that have not started when the breaker opens are
//! requeued (`on_pause = "requeue"`) or dead-lettered with reason `paused`;
//! running handlers finish and their outcomes apply. Settles go out in tag
//! order as `multiple` frames where possible (`settle.rs`).
//!
//! What happens to each message is decided by `policy.rs`: success acks;
//! a transient failure is copied to the next delay queue (confirmed) and then
//! acked; a permanent error, a decode failure or a panic is copied to the
//! dead-letter exchange with its reason; a failure while the breaker was
//! tripping or probing does not count as an attempt.

mod failures;
mod in_flight;
pub(crate) mod policy;
mod probes;
mod run;
mod session;
mod settle;
mod stats;
mod subscription;
pub(crate) mod task;

pub(crate) use failures::FailureLog;
pub(crate) use policy::{Decision, Disposition, Outcome};
pub(crate) use run::ConsumerRuntime;
pub(crate) use stats::inc;
pub use stats::{ConsumerStats, HANDLER_OUTCOMES, StatsSnapshot};
pub(crate) use task::ConsumerShared;
