//! Type erasure, so one worker can run handlers of different types.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Context, Decode, DecodeError, Handler, HandlerError};

/// What one call produced, before timeouts and panics are considered.
#[derive(Debug)]
pub(crate) enum CallResult {
    Ok,
    Failed(HandlerError),
    Decode(DecodeError),
}

pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn call<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, CallResult>;
}

struct Erased<H>(H);

impl<H: Handler> ErasedHandler for Erased<H> {
    fn call<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            if let Some(why) = ctx.headers().and_then(crate::amqp::unreadable) {
                return CallResult::Decode(DecodeError(format!(
                    "the message's headers could not be read: {why}"
                )));
            }
            match H::Message::decode(ctx) {
                Err(e) => CallResult::Decode(e),
                Ok(message) => match self.0.handle(message, ctx).await {
                    Ok(()) => CallResult::Ok,
                    Err(e) => CallResult::Failed(e),
                },
            }
        })
    }
}

pub(crate) fn erase<H: Handler>(handler: H) -> Arc<dyn ErasedHandler> {
    Arc::new(Erased(handler))
}
