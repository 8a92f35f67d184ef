//! The [`Handler`] trait: what users implement to process a queue's messages.
//!
//! ```
//! use rabbit_guard::handler::{Context, Handler, HandlerError, Json, ResultExt};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Order { id: u64, amount_cents: i64 }
//!
//! struct Billing { client: reqwest::Client }
//!
//! impl Handler for Billing {
//!     type Message = Json<Order>;
//!
//!     async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
//!         if order.amount_cents < 0 {
//!             return Err(HandlerError::permanent(format!("order {} has a negative amount", order.id)));
//!         }
//!         let response = self.client
//!             .post("http://billing.internal/charge")
//!             .header("Idempotency-Key", ctx.message_id().unwrap_or_default())
//!             .send()
//!             .await
//!             .transient()?; // the dependency failed: retry, count against the breaker
//!         match response.status() {
//!             s if s.is_success() => Ok(()),
//!             s if s.is_server_error() || s.as_u16() == 429 => {
//!                 Err(HandlerError::transient(format!("billing answered {s}")))
//!             }
//!             // A declined card (422): no retry will fix it, and it says
//!             // nothing about billing's health.
//!             s => Err(HandlerError::permanent(format!("billing rejected order {}: {s}", order.id))),
//!         }
//!     }
//! }
//! ```
//!
//! Outcomes: `Ok(())` acks; [`HandlerError::transient`] retries through the
//! delay queues and counts against the breaker; [`HandlerError::retry`]
//! retries without counting; [`HandlerError::permanent`]
//! and bodies that fail to [`Decode`] are dead-lettered at once; a panic is
//! caught and the message dead-lettered with reason `panic`. Every call is
//! bounded by the breaker's `call_timeout`; a call that outlives it is a
//! transient failure.
//!
//! A plain async function works too: [`handler_fn`], and [`with_state`] for
//! one that shares a pool or client. [`testing::Harness`](crate::testing::Harness)
//! runs a handler on a message built in a test and says what the worker
//! would do with it.

mod context;
mod decode;
mod erased;
mod error;
mod func;
mod guard;

use std::future::Future;

pub use context::Context;
pub(crate) use context::Outlet;
pub use decode::{Decode, DecodeError, Json};
pub(crate) use erased::{CallResult, ErasedHandler, erase};
pub use error::{BoxError, ErrorKind, HandlerError, ResultExt};
pub use func::{HandlerFn, StatefulHandlerFn, handler_fn, with_state};
pub(crate) use guard::Lent;

/// Processes one queue's messages. Implement it with a plain `async fn`.
///
/// The handler is shared by every concurrent call (`&self`), so keep clients
/// and pools in it and make it cheap to call.
pub trait Handler: Send + Sync + 'static {
    /// The decoded body: [`Json<T>`], `Vec<u8>`, `String` or `()`.
    type Message: Decode;

    /// Handles one message.
    ///
    /// # Errors
    ///
    /// A [`HandlerError`] saying whether the dependency (transient) or the
    /// message (permanent) is at fault.
    ///
    /// # Cancel safety
    ///
    /// The future is dropped when the call outlives `call_timeout` or the
    /// worker shuts down past its grace period; the message is then retried
    /// or requeued, so handlers must tolerate being run again (at least once).
    fn handle(
        &self,
        message: Self::Message,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A shared handler is a handler: register (or test) one `Arc` in several
/// places.
impl<H: Handler> Handler for std::sync::Arc<H> {
    type Message = H::Message;

    fn handle(
        &self,
        message: Self::Message,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).handle(message, ctx)
    }
}
