//! Handlers as plain async functions, with or without shared state.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use super::{Context, Decode, Handler, HandlerError};

/// A [`Handler`] made from an async function of the message and its
/// [`Context`]. See [`handler_fn`].
pub struct HandlerFn<F, M> {
    f: F,
    _message: PhantomData<fn() -> M>,
}

/// A [`Handler`] made from an async function of shared state, the message
/// and its [`Context`]. See [`with_state`].
pub struct StatefulHandlerFn<S, F, M> {
    state: S,
    f: F,
    _message: PhantomData<fn() -> M>,
}

/// A handler from an async function or closure, like an axum handler: the
/// decoded message and the (cheaply cloned) [`Context`] come in, the outcome
/// goes out.
///
/// ```
/// use rabbit_guard::handler::{Context, HandlerError, Json, handler_fn};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Order { id: u64 }
///
/// async fn charge(Json(order): Json<Order>, ctx: Context) -> Result<(), HandlerError> {
///     tracing::info!(order = order.id, attempt = ctx.attempt(), "charging");
///     Ok(())
/// }
///
/// let handler = handler_fn(charge);
/// # fn is_handler(_: impl rabbit_guard::handler::Handler) {}
/// # is_handler(handler);
/// ```
pub fn handler_fn<M, F, Fut>(f: F) -> HandlerFn<F, M>
where
    M: Decode,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    HandlerFn {
        f,
        _message: PhantomData,
    }
}

/// A handler from an async function that also receives `state`, cloned for
/// each call (keep it cheap to clone: an `Arc`, a connection pool, a
/// `reqwest::Client`), like apalis' `Data` and axum's `State`.
///
/// ```
/// use std::sync::Arc;
/// use rabbit_guard::handler::{Context, HandlerError, ResultExt, with_state};
///
/// struct Billing { client: reqwest::Client, url: String }
///
/// async fn charge(billing: Arc<Billing>, body: Vec<u8>, _ctx: Context) -> Result<(), HandlerError> {
///     billing.client.post(&billing.url).body(body).send().await.transient()?;
///     Ok(())
/// }
///
/// let billing = Arc::new(Billing { client: reqwest::Client::new(), url: "http://billing/charge".into() });
/// let handler = with_state(billing, charge);
/// # fn is_handler(_: impl rabbit_guard::handler::Handler) {}
/// # is_handler(handler);
/// ```
pub fn with_state<S, M, F, Fut>(state: S, f: F) -> StatefulHandlerFn<S, F, M>
where
    S: Clone + Send + Sync + 'static,
    M: Decode,
    F: Fn(S, M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    StatefulHandlerFn {
        state,
        f,
        _message: PhantomData,
    }
}

impl<M, F, Fut> Handler for HandlerFn<F, M>
where
    M: Decode,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Message = M;

    fn handle(
        &self,
        message: M,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(message, ctx.clone())
    }
}

impl<S, M, F, Fut> Handler for StatefulHandlerFn<S, F, M>
where
    S: Clone + Send + Sync + 'static,
    M: Decode,
    F: Fn(S, M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Message = M;

    fn handle(
        &self,
        message: M,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(self.state.clone(), message, ctx.clone())
    }
}

impl<F, M> fmt::Debug for HandlerFn<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn")
            .field("message", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}

impl<S, F, M> fmt::Debug for StatefulHandlerFn<S, F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatefulHandlerFn")
            .field("state", &std::any::type_name::<S>())
            .field("message", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}
