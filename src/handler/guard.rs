//! [`Context::guard`]: a handler that calls several dependencies counts
//! each call against the breaker of the dependency it called.
//!
//! A delivery starts with a permit from every breaker of its consumer. While
//! the handler runs, those permits are lent to its [`Context`]: a guarded
//! call uses the permit of its breaker (a second call to the same dependency
//! takes a new one) and records the call's outcome on it at once. When the
//! handler returns, the consumer takes back the permits no guarded call used
//! and records the handler's outcome on them (`consumer/task.rs`).

use std::future::Future;
use std::sync::{MutexGuard, PoisonError};

use tokio::time::Instant;
use tracing::warn;

use super::{Context, HandlerError};
use crate::breaker::{CallOutcome, MAX_BREAKERS_PER_CONSUMER, Permit, Permits};

/// The permits lent to a handler call, and what its guarded calls did.
#[derive(Debug, Default)]
pub(crate) struct Lent {
    /// The permits no guarded call has used (yet).
    pub(crate) permits: Option<Permits>,
    /// Breakers (by index) whose guarded call was cut short by the handler's
    /// `call_timeout`: their permit is back in `permits`, to count the timeout.
    pub(crate) cut_short: u8,
    /// Per breaker: the breaker's success count when its last guarded call
    /// started (what a failure's health verdict compares with).
    pub(crate) guard_starts: [Option<u64>; MAX_BREAKERS_PER_CONSUMER],
    /// What each guarded call recorded, by breaker index, in order (for
    /// [`testing`](crate::testing); empty unless the handler guards).
    pub(crate) guarded: Vec<(usize, CallOutcome)>,
}

impl Context {
    fn lent(&self) -> MutexGuard<'_, Lent> {
        self.delivery
            .lent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Lends a handler call the delivery's permits.
    pub(crate) fn lend(&self, permits: Permits) {
        *self.lent() = Lent {
            permits: Some(permits),
            ..Lent::default()
        };
    }

    /// Takes back what the handler call did not use.
    pub(crate) fn take_back(&self) -> Lent {
        std::mem::take(&mut *self.lent())
    }

    /// Runs `call` to the dependency guarded by the consumer's breaker
    /// named `dependency`, and counts its outcome against that breaker
    /// only: a transient error or a timeout is a failure, `Ok` a success,
    /// any other error says nothing about the dependency.
    ///
    /// For a handler that calls several dependencies (`breakers =
    /// ["billing", "inventory"]`): the consumer pauses at the broker while
    /// any of its breakers is open, and a guarded call makes sure a failing
    /// inventory service trips the inventory breaker, not billing's. The
    /// call is bounded by that breaker's `call_timeout`. Calls that are not
    /// guarded count through the handler's result (see
    /// [`HandlerError::dependency`]).
    ///
    /// ```no_run
    /// # use rabbit_guard::handler::{Context, HandlerError, ResultExt};
    /// # async fn reserve(_: u64) -> Result<(), std::io::Error> { Ok(()) }
    /// # async fn charge(_: u64) -> Result<(), std::io::Error> { Ok(()) }
    /// async fn handle(order: u64, ctx: &Context) -> Result<(), HandlerError> {
    ///     ctx.guard("inventory", async { reserve(order).await.transient() }).await?;
    ///     ctx.guard("billing", async { charge(order).await.transient() }).await?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// The call's own error, naming `dependency` (unless it names one
    /// already); a transient error without calling when that breaker refuses
    /// calls now (it opened while the handler ran), or when the call does
    /// not finish within its `call_timeout`.
    ///
    /// A name that is not one of the consumer's breakers runs the call
    /// unguarded (with a warning, once per name): add it to `breakers`.
    pub async fn guard<T>(
        &self,
        dependency: &str,
        call: impl Future<Output = Result<T, HandlerError>>,
    ) -> Result<T, HandlerError> {
        let name_it = |e: HandlerError| match e.dependency_name() {
            Some(_) => e,
            None => e.dependency(dependency),
        };
        let Some(set) = &self.breakers else {
            // A context made for a unit test: nothing to count against.
            return call.await.map_err(name_it);
        };
        let Some((index, breaker)) = set
            .position(dependency)
            .and_then(|i| set.get(i).map(|b| (i, b)))
        else {
            if set.first_unknown(dependency) {
                warn!(
                    queue = %self.delivery.queue,
                    dependency,
                    breakers = %set.names(),
                    "ctx.guard names a breaker this consumer does not have: the call runs unguarded; add it to the consumer's breakers"
                );
            }
            return call.await.map_err(name_it);
        };
        let own = self.lent().permits.as_mut().and_then(|p| p.take(index));
        let Ok(permit) = own.map_or_else(|| breaker.try_acquire(), Ok) else {
            return Err(HandlerError::transient(format!(
                "not called: breaker {dependency} is {}",
                breaker.state().name()
            ))
            .dependency(dependency));
        };
        let successes_at_start = permit.successes_at_start();
        let mut held = Held {
            ctx: self,
            index,
            permit: Some(permit),
        };
        let timeout = breaker.config().call_timeout;
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, call).await;
        let ended = Instant::now();
        let (outcome, result) = match result {
            Err(_) => {
                breaker.note_timeout();
                (
                    CallOutcome::Failure,
                    Err(HandlerError::transient(format!(
                        "no answer within breakers.{dependency}.call_timeout ({})",
                        humantime::format_duration(timeout)
                    ))),
                )
            }
            Ok(Ok(v)) => (CallOutcome::Success, Ok(v)),
            Ok(Err(e)) if e.is_transient() => (CallOutcome::Failure, Err(e)),
            Ok(Err(e)) => (CallOutcome::Ignored, Err(e)),
        };
        if let Some(permit) = held.permit.take() {
            permit.record(outcome.took(ended - started).ended(ended));
            self.lent().guarded.push((index, outcome));
        }
        if let Some(slot) = self.lent().guard_starts.get_mut(index) {
            *slot = Some(successes_at_start);
        }
        result.map_err(name_it)
    }
}

/// A guarded call's permit while the call runs. Dropped before the call
/// ended (the handler's `call_timeout` cut it short, or the handler dropped
/// the future), it goes back to the delivery's permits, marked, so the
/// timeout counts against its breaker.
struct Held<'a> {
    ctx: &'a Context,
    index: usize,
    permit: Option<Permit>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let mut lent = self.ctx.lent();
            if let Some(permits) = lent.permits.as_mut() {
                permits.put_back(self.index, permit);
                lent.cut_short |= 1 << self.index;
            }
            // Taken back already (a task the handler spawned outlived it):
            // the permit counts nothing.
        }
    }
}
