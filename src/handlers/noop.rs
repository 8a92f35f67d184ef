use crate::handler::{Context, Handler, HandlerError};

/// Acknowledges every message without looking at it. For load tests and for
/// draining a queue on purpose.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopHandler;

impl Handler for NoopHandler {
    type Message = ();

    async fn handle(&self, (): (), _ctx: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}
