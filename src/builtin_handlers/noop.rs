use crate::handler::{Context, Handler, HandlerError, erase};

/// `handler = "noop"`: no settings.
pub(super) const BUILTIN: super::Builtin = super::Builtin {
    name: "noop",
    problems: |_| Vec::new(),
    build: |_, _| Ok(erase(NoopHandler)),
};

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
